//! Jira Cloud ticket sink (REST API v3): one issue per ticket, created with an Atlassian Document Format
//! (ADF) description, commented on each update, commented and transitioned to a done status on resolve.
//!
//! Auth is Basic `email:apiToken` (Secret keys `email`, `apiToken`), as Atlassian documents for API tokens.
//! The issue carries the labels `meshline` and `meshline-<fingerprint>`: Jira cannot create idempotently, so
//! after an attempt that may have reached Jira (`in_doubt`) the sink first searches for that label
//! (`POST /rest/api/3/search/jql`) and reuses a found issue instead of creating a second one. The search is
//! eventually consistent on Jira's side: an issue created a moment before a crash may not be found yet, the
//! one case where a duplicate is still possible.
//!
//! Resolving is two calls (a comment, then the transition); a retry after the first succeeded comments again.
//! The transition is the first one whose target status is in the `done` category, because workflows name
//! their statuses freely but the category keys (`new`, `indeterminate`, `done`) are fixed. An issue already
//! in a done status is left as it is.

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::render::{self, clip};
use super::{
    Delivery, Event, SinkError, SinkRef, TicketSink, USER_AGENT, credential, join, send, spec_url,
};
use crate::connectors::Credentials;
use crate::tickets::Ticket;

/// Jira's limit for `summary`.
pub const SUMMARY_CHARS: usize = 255;
/// Jira's limit for a rich-text field (description, comment body), in characters of text.
pub const RICH_TEXT_CHARS: usize = 32_000;

pub struct JiraSink {
    name: String,
    http: reqwest::Client,
    base: Url,
    project: String,
    email: String,
    api_token: String,
}

impl JiraSink {
    pub fn from_spec(
        spec: &crate::api::TicketSink,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let project = spec
            .project
            .clone()
            .filter(|p| !p.trim().is_empty())
            .ok_or("project (the Jira project key) is required")?;
        Ok(JiraSink {
            name: spec.name.clone(),
            http,
            base: spec_url(spec, None)?,
            project,
            email: credential(credentials, "email")?,
            api_token: credential(credentials, "apiToken")?,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, join(&self.base, path))
            .basic_auth(&self.email, Some(&self.api_token))
            .header("Accept", "application/json")
            .header("User-Agent", USER_AGENT)
    }

    /// Sends and insists on a 2xx; returns the answer's JSON when `json`.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        json: bool,
    ) -> Result<Value, SinkError> {
        let what = format!("{method} {path}");
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = send(&self.name, &what, request).await?;
        if !answer.success() {
            return Err(answer.error(&self.name, &what));
        }
        if json {
            answer.json(&self.name, &what)
        } else {
            Ok(Value::Null)
        }
    }

    /// The issue a lost earlier attempt may have created, found by its fingerprint label.
    async fn find(&self, ticket: &Ticket) -> Result<Option<String>, SinkError> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/rest/api/3/search/jql",
                Some(json!({
                    "jql": format!("labels = \"{}\"", label(ticket)),
                    "fields": ["key"],
                    "maxResults": 1,
                })),
                true,
            )
            .await?;
        Ok(found["issues"]
            .as_array()
            .and_then(|issues| issues.first())
            .and_then(|issue| issue["key"].as_str())
            .map(str::to_string))
    }

    async fn create(&self, ticket: &Ticket) -> Result<String, SinkError> {
        let created = self
            .call(
                reqwest::Method::POST,
                "/rest/api/3/issue",
                Some(json!({"fields": {
                    "project": {"key": self.project},
                    "summary": summary(ticket),
                    "issuetype": {"name": "Task"},
                    "description": document(ticket, Event::Opened),
                    "labels": ["meshline", label(ticket)],
                }})),
                true,
            )
            .await?;
        created["key"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| SinkError {
                // The issue may exist; the next attempt is in doubt and searches before creating.
                retryable: true,
                status: Some(201),
                message: format!(
                    "ticket sink {}: POST /rest/api/3/issue answered without an issue key",
                    self.name
                ),
                retry_after: None,
            })
    }

    async fn comment(&self, key: &str, ticket: &Ticket, event: Event) -> Result<(), SinkError> {
        self.call(
            reqwest::Method::POST,
            &format!("/rest/api/3/issue/{key}/comment"),
            Some(json!({"body": document(ticket, event)})),
            false,
        )
        .await
        .map(drop)
    }

    async fn transition_to_done(&self, key: &str) -> Result<(), SinkError> {
        let path = format!("/rest/api/3/issue/{key}/transitions");
        let transitions = self.call(reqwest::Method::GET, &path, None, true).await?;
        let done = transitions["transitions"].as_array().and_then(|all| {
            all.iter()
                .find(|t| t["to"]["statusCategory"]["key"] == "done")
                .and_then(|t| t["id"].as_str())
        });
        if let Some(id) = done {
            return self
                .call(
                    reqwest::Method::POST,
                    &path,
                    Some(json!({"transition": {"id": id}})),
                    false,
                )
                .await
                .map(drop);
        }
        let issue = self
            .call(
                reqwest::Method::GET,
                &format!("/rest/api/3/issue/{key}?fields=status"),
                None,
                true,
            )
            .await?;
        if issue["fields"]["status"]["statusCategory"]["key"] == "done" {
            return Ok(());
        }
        Err(SinkError {
            retryable: false,
            status: None,
            message: format!(
                "ticket sink {}: issue {key} has no transition to a status in the done category; \
                 add one to the project's workflow",
                self.name
            ),
            retry_after: None,
        })
    }
}

/// `meshline-<fingerprint>`: Jira labels cannot contain spaces, and the fingerprint is hex.
fn label(ticket: &Ticket) -> String {
    format!("meshline-{}", ticket.fingerprint)
}

/// The summary: one line of at most 255 characters (Jira refuses longer or multi-line summaries).
pub fn summary(ticket: &Ticket) -> String {
    clip(&render::headline(ticket), SUMMARY_CHARS)
}

fn text(s: &str) -> Value {
    json!({"type": "text", "text": s})
}

/// A paragraph, or nothing for empty text: ADF refuses empty text nodes.
fn paragraph(s: &str) -> Option<Value> {
    (!s.trim().is_empty()).then(|| json!({"type": "paragraph", "content": [text(s)]}))
}

fn heading(s: &str) -> Value {
    json!({"type": "heading", "attrs": {"level": 3}, "content": [text(s)]})
}

fn code_block(s: &str) -> Option<Value> {
    (!s.trim().is_empty()).then(|| json!({"type": "codeBlock", "content": [text(s)]}))
}

fn bullet_list(items: impl IntoIterator<Item = String>) -> Option<Value> {
    let items: Vec<Value> = items
        .into_iter()
        .filter_map(|item| paragraph(&item))
        .map(|p| json!({"type": "listItem", "content": [p]}))
        .collect();
    (!items.is_empty()).then(|| json!({"type": "bulletList", "content": items}))
}

/// The ticket as an ADF document (description on create, comment body after): the lead, the summary, the
/// fields as a list, the latest records with their texts in code blocks, the commands.
pub fn document(ticket: &Ticket, event: Event) -> Value {
    let mut content: Vec<Option<Value>> = vec![paragraph(&render::lead(ticket, event))];
    if event != Event::Opened {
        content.push(paragraph(&ticket.summary));
    }
    content.push(bullet_list(
        render::fields(ticket)
            .into_iter()
            .map(|f| format!("{}: {}", f.label, f.value)),
    ));
    if !ticket.examples.is_empty() {
        content.push(Some(heading("Latest records")));
        for example in &ticket.examples {
            content.push(paragraph(&render::example_heading(example)));
            for (label, part) in render::example_parts(example) {
                content.push(paragraph(&format!("{label}:")));
                content.push(code_block(&part));
            }
        }
    }
    if !ticket.commands.is_empty() {
        content.push(Some(heading("Commands")));
        content.push(code_block(&render::commands(ticket)));
    }
    // Examples are cut per part already; this keeps the whole under Jira's field limit by dropping the
    // last nodes rather than cutting a node in half.
    let mut used = 0;
    let content: Vec<Value> = content
        .into_iter()
        .flatten()
        .take_while(|node| {
            used += node.to_string().chars().count();
            used <= RICH_TEXT_CHARS
        })
        .collect();
    json!({"type": "doc", "version": 1, "content": content})
}

/// What the sink keeps: the issue key.
fn sink_ref(key: &str) -> SinkRef {
    json!({"key": key})
}

#[async_trait]
impl TicketSink for JiraSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError> {
        let ticket = delivery.ticket;
        let event = Event::of(&delivery);
        let known = delivery.previous.and_then(|p| p["key"].as_str());
        let (key, created) = match known {
            Some(key) => (key.to_string(), false),
            None => {
                let found = if delivery.in_doubt {
                    self.find(ticket).await?
                } else {
                    None
                };
                match found {
                    Some(key) => (key, true),
                    None => (self.create(ticket).await?, true),
                }
            }
        };
        // A found issue was created by the lost attempt at this very version: its description is current.
        if !created {
            self.comment(&key, ticket, event).await?;
        }
        if event == Event::Resolved {
            if created {
                self.comment(&key, ticket, event).await?;
            }
            self.transition_to_done(&key).await?;
        }
        Ok(sink_ref(&key))
    }
}
