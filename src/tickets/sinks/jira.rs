//! Jira Cloud ticket sink (REST API v3): one issue per ticket, created with an Atlassian Document Format
//! (ADF) description, commented on each update, commented and transitioned to a done status on resolve.
//!
//! Auth is Basic `email:apiToken` (Secret keys `email`, `apiToken`), as Atlassian documents for API tokens.
//!
//! Jira has no idempotent writes, so every write is made safe to repeat for one (fingerprint, version):
//! - **Create.** The issue carries the labels `meshline` and `meshline-<fingerprint>`. After an attempt that
//!   may have reached Jira (`in_doubt`) the sink first looks the label up with an exact JQL match
//!   (`POST /rest/api/3/search/jql`) and reuses a found issue. Jira's search is eventually consistent: an
//!   issue created a moment ago may not be indexed yet. So an in-doubt lookup that finds nothing does not
//!   create at once: it fails retryably and looks again on a later attempt, until [`SEARCH_LAG`] has passed
//!   (by the dispatcher's clock) since this process first missed it; only then does it create. The remaining
//!   window: an issue Jira takes longer than [`SEARCH_LAG`] to index is created twice. The first miss is
//!   kept in memory, so a restart starts the wait again (a longer wait, never a shorter one).
//! - **Comment.** Each comment ends with a small footer whose text is the marker `meshline:<fp>:v<version>`.
//!   An in-doubt resend first reads the issue's newest comments (`GET /rest/api/3/issue/{key}/comment`,
//!   `orderBy=-created`, the newest [`COMMENTS_READ`]) and skips the comment when the marker is there, so a
//!   lost answer or a timeout between the two calls of a resolve never comments twice. The comment list's
//!   `expand` offers only `renderedBody`, not comment properties, hence a marker in the text.
//! - **Transition.** To the first transition whose target status is in the `done` category, because
//!   workflows name their statuses freely but the category keys (`new`, `indeterminate`, `done`) are fixed.
//!   An issue already in a done status is left as it is (an in-doubt resend reads the status first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
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
/// How long an in-doubt create waits for Jira's search to index an issue a lost attempt may have created.
/// Atlassian gives no bound; indexing normally takes seconds.
pub const SEARCH_LAG: Duration = Duration::from_secs(60);
/// The newest comments read for an in-doubt resend's marker: its comment, if posted, is among the newest
/// unless people added this many since.
pub const COMMENTS_READ: usize = 50;

pub struct JiraSink {
    name: String,
    http: reqwest::Client,
    base: Url,
    project: String,
    email: String,
    api_token: String,
    /// Per fingerprint, when an in-doubt create first found nothing (see the module doc).
    missed: Mutex<HashMap<String, DateTime<Utc>>>,
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
            missed: Mutex::new(HashMap::new()),
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

    /// The issue an in-doubt create should use: the one a lost attempt created, `None` to create one now,
    /// or a retryable error while Jira's search may still be indexing it.
    async fn find_settled(
        &self,
        ticket: &Ticket,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, SinkError> {
        let found = self.find(ticket).await?;
        let mut missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        if found.is_some() {
            missed.remove(&ticket.fingerprint);
            return Ok(found);
        }
        let first = *missed.entry(ticket.fingerprint.clone()).or_insert(now);
        let waited = (now - first).to_std().unwrap_or_default();
        if waited >= SEARCH_LAG {
            // Created now; if this create is lost too, the next attempt waits afresh.
            missed.remove(&ticket.fingerprint);
            return Ok(None);
        }
        let left = SEARCH_LAG - waited;
        Err(SinkError {
            retryable: true,
            status: None,
            message: format!(
                "ticket sink {}: an earlier attempt may have created the issue for ticket {} and Jira's \
                 search does not show it yet; looking again before creating (at most {}s more)",
                self.name,
                ticket.fingerprint,
                left.as_secs()
            ),
            // One more look once the window has passed: a lookup every few seconds would only count as
            // failures against the sink's health.
            retry_after: Some(left),
        })
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

    /// Whether one of the issue's newest comments carries `marker`.
    async fn commented(&self, key: &str, marker: &str) -> Result<bool, SinkError> {
        let comments = self
            .call(
                reqwest::Method::GET,
                &format!(
                    "/rest/api/3/issue/{key}/comment?orderBy=-created&maxResults={COMMENTS_READ}"
                ),
                None,
                true,
            )
            .await?;
        Ok(comments["comments"]
            .as_array()
            .is_some_and(|all| all.iter().any(|c| carries(&c["body"], marker))))
    }

    /// Comments this version, unless an in-doubt earlier attempt already did.
    async fn comment(
        &self,
        key: &str,
        ticket: &Ticket,
        event: Event,
        in_doubt: bool,
    ) -> Result<(), SinkError> {
        if in_doubt && self.commented(key, &marker(ticket)).await? {
            return Ok(());
        }
        self.call(
            reqwest::Method::POST,
            &format!("/rest/api/3/issue/{key}/comment"),
            Some(json!({"body": document(ticket, event)})),
            false,
        )
        .await
        .map(drop)
    }

    async fn done(&self, key: &str) -> Result<bool, SinkError> {
        let issue = self
            .call(
                reqwest::Method::GET,
                &format!("/rest/api/3/issue/{key}?fields=status"),
                None,
                true,
            )
            .await?;
        Ok(issue["fields"]["status"]["statusCategory"]["key"] == "done")
    }

    async fn transition_to_done(&self, key: &str, in_doubt: bool) -> Result<(), SinkError> {
        // Transitioning a done issue again would fail or, in workflows with a done→done transition, add a
        // second entry to its history.
        if in_doubt && self.done(key).await? {
            return Ok(());
        }
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
        if self.done(key).await? {
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

/// `meshline:<fingerprint>:v<version>`: what marks a comment (or description) as this version's.
pub fn marker(ticket: &Ticket) -> String {
    format!("meshline:{}:v{}", ticket.fingerprint, ticket.version)
}

/// Whether the ADF document has a text node that is exactly `marker` (exactly: `…:v1` is a prefix of
/// `…:v12`).
fn carries(node: &Value, marker: &str) -> bool {
    match node {
        Value::Object(fields) => {
            (fields.get("type").is_some_and(|t| t == "text")
                && fields.get("text").is_some_and(|t| t == marker))
                || fields
                    .get("content")
                    .is_some_and(|content| carries(content, marker))
        }
        Value::Array(nodes) => nodes.iter().any(|n| carries(n, marker)),
        _ => false,
    }
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
    // The marker footer is never dropped: an in-doubt resend finds this version's comment by it.
    let footer = json!({"type": "paragraph", "content": [
        {"type": "text", "text": "sent by Meshline · ", "marks": [{"type": "em"}]},
        {"type": "text", "text": marker(ticket), "marks": [{"type": "code"}]},
    ]});
    // Examples are cut per part already; this keeps the whole under Jira's field limit by dropping the
    // last nodes rather than cutting a node in half.
    let mut used = footer.to_string().chars().count();
    let content: Vec<Value> = content
        .into_iter()
        .flatten()
        .take_while(|node| {
            used += node.to_string().chars().count();
            used <= RICH_TEXT_CHARS
        })
        .chain([footer])
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
        let in_doubt = delivery.in_doubt;
        let known = delivery.previous.and_then(|p| p["key"].as_str());
        let (key, created) = match known {
            Some(key) => (key.to_string(), false),
            None => {
                let found = if in_doubt {
                    self.find_settled(ticket, delivery.now).await?
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
        // A resolve comments even then, and (in doubt) only if no earlier attempt at this version did.
        if !created || event == Event::Resolved {
            self.comment(&key, ticket, event, in_doubt).await?;
        }
        if event == Event::Resolved {
            self.transition_to_done(&key, in_doubt).await?;
        }
        Ok(sink_ref(&key))
    }
}
