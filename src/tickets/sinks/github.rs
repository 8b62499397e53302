//! GitHub Issues ticket sink (REST API, version 2022-11-28): one issue per ticket, created with a Markdown
//! body, commented on each update, commented and closed as completed on resolve, reopened if the cause comes
//! back.
//!
//! The token comes from the Secret key `token` (a fine-grained token with Issues read/write, or a classic
//! one with `repo`). Every request carries `Authorization: Bearer …`, `Accept: application/vnd.github+json`,
//! `X-GitHub-Api-Version` and a `User-Agent`, which GitHub requires. The base URL is `https://api.github.com`
//! unless `spec.url` names another (GitHub Enterprise Server's `https://HOST/api/v3`, or a test server).
//!
//! Issues carry the labels `meshline` and `meshline-<fingerprint>` (GitHub creates missing labels for a
//! token that may push). Creating is not idempotent, so after an attempt that may have reached GitHub
//! (`in_doubt`) the sink lists the repository's issues with that label first and reuses one it finds.
//! Resolving is two calls too (a comment, then closing), and an update's answer can be lost, so every comment
//! ends with a hidden HTML comment `<!-- meshline:<fp>:v<version> -->`; an in-doubt resend first lists the
//! issue's comments updated since an hour before the ticket's version (`since`, covering clock skew; one page
//! of 100) and skips its comment when the marker is there. Closing an issue that is closed already is a no-op.
//! GitHub answers its rate limits with 403 or 429 and `x-ratelimit-remaining: 0` or `retry-after`; those
//! are retried after the time it names, other 4xx are not.

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::render::{self, clip};
use super::{
    Delivery, Event, SinkError, SinkRef, TicketSink, USER_AGENT, credential, join, send, spec_url,
};
use crate::connectors::Credentials;
use crate::tickets::{Ticket, TicketState};

pub const DEFAULT_API: &str = "https://api.github.com";
pub const API_VERSION: &str = "2022-11-28";
/// GitHub refuses a title over 256 characters.
pub const TITLE_CHARS: usize = 256;
/// GitHub refuses an issue or comment body over 65,536 characters.
pub const BODY_CHARS: usize = 65_536;

pub struct GithubSink {
    name: String,
    http: reqwest::Client,
    base: Url,
    /// `owner/name`.
    repository: String,
    token: String,
}

impl GithubSink {
    pub fn from_spec(
        spec: &crate::api::TicketSink,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let repository = spec
            .repository
            .clone()
            .ok_or("repository (owner/name) is required")?;
        let valid = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        };
        match repository.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) => {}
            _ => return Err(format!("repository {repository:?} is not owner/name")),
        }
        Ok(GithubSink {
            name: spec.name.clone(),
            http,
            base: spec_url(spec, Some(DEFAULT_API))?,
            repository,
            token: credential(credentials, "token")?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, SinkError> {
        let path = format!("/repos/{}{path}", self.repository);
        let what = format!("{method} {path}");
        let mut request = self
            .http
            .request(method, join(&self.base, &path))
            .bearer_auth(&self.token)
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", API_VERSION)
            .header("User-Agent", USER_AGENT);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = send(&self.name, &what, request).await?;
        if !answer.success() {
            return Err(answer.error(&self.name, &what));
        }
        answer.json(&self.name, &what)
    }

    /// The issue a lost earlier attempt may have created, found by its fingerprint label.
    async fn find(&self, ticket: &Ticket) -> Result<Option<u64>, SinkError> {
        let found = self
            .call(
                reqwest::Method::GET,
                &format!("/issues?labels={}&state=all&per_page=10", label(ticket)),
                None,
            )
            .await?;
        Ok(found.as_array().and_then(|issues| {
            issues
                .iter()
                // The issues endpoint lists pull requests too.
                .filter(|issue| issue.get("pull_request").is_none())
                .find_map(|issue| issue["number"].as_u64())
        }))
    }

    async fn create(&self, ticket: &Ticket) -> Result<u64, SinkError> {
        let created = self
            .call(
                reqwest::Method::POST,
                "/issues",
                Some(json!({
                    "title": clip(&render::headline(ticket), TITLE_CHARS),
                    "body": clip(&render::markdown(ticket, Event::Opened), BODY_CHARS),
                    "labels": ["meshline", label(ticket)],
                })),
            )
            .await?;
        created["number"].as_u64().ok_or_else(|| SinkError {
            retryable: true,
            status: Some(201),
            message: format!(
                "ticket sink {}: POST /repos/{}/issues answered without an issue number",
                self.name, self.repository
            ),
            retry_after: None,
        })
    }

    /// Whether a comment on the issue updated since shortly before this version carries its marker.
    async fn commented(&self, number: u64, ticket: &Ticket) -> Result<bool, SinkError> {
        let since = (ticket.updated_at - chrono::Duration::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let comments = self
            .call(
                reqwest::Method::GET,
                &format!("/issues/{number}/comments?since={since}&per_page=100"),
                None,
            )
            .await?;
        let marker = marker(ticket);
        Ok(comments.as_array().is_some_and(|all| {
            all.iter()
                .any(|c| c["body"].as_str().is_some_and(|b| b.contains(&marker)))
        }))
    }

    /// Comments this version, unless an in-doubt earlier attempt already did.
    async fn comment(
        &self,
        number: u64,
        ticket: &Ticket,
        event: Event,
        in_doubt: bool,
    ) -> Result<(), SinkError> {
        if in_doubt && self.commented(number, ticket).await? {
            return Ok(());
        }
        let marker = marker(ticket);
        let room = BODY_CHARS - marker.chars().count() - 2;
        let body = format!(
            "{}\n\n{marker}",
            clip(&render::markdown(ticket, event), room)
        );
        self.call(
            reqwest::Method::POST,
            &format!("/issues/{number}/comments"),
            Some(json!({ "body": body })),
        )
        .await
        .map(drop)
    }

    async fn set_state(&self, number: u64, closed: bool) -> Result<(), SinkError> {
        let body = if closed {
            json!({"state": "closed", "state_reason": "completed"})
        } else {
            json!({"state": "open", "state_reason": "reopened"})
        };
        self.call(
            reqwest::Method::PATCH,
            &format!("/issues/{number}"),
            Some(body),
        )
        .await
        .map(drop)
    }
}

/// The hidden marker of this version's comment (rendered Markdown does not show HTML comments).
pub fn marker(ticket: &Ticket) -> String {
    format!(
        "<!-- meshline:{}:v{} -->",
        ticket.fingerprint, ticket.version
    )
}

fn label(ticket: &Ticket) -> String {
    format!("meshline-{}", ticket.fingerprint)
}

#[async_trait]
impl TicketSink for GithubSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError> {
        let ticket = delivery.ticket;
        let event = Event::of(&delivery);
        let known = delivery.previous.and_then(|p| p["number"].as_u64());
        let was_closed = delivery
            .previous
            .and_then(|p| p["closed"].as_bool())
            .unwrap_or(false);
        let (number, created) = match known {
            Some(number) => (number, false),
            None => {
                let found = if delivery.in_doubt {
                    self.find(ticket).await?
                } else {
                    None
                };
                match found {
                    Some(number) => (number, true),
                    None => (self.create(ticket).await?, true),
                }
            }
        };
        // A created (or found) issue's body is this version already; anything later is a comment.
        if !created || event == Event::Resolved {
            self.comment(number, ticket, event, delivery.in_doubt)
                .await?;
        }
        let closed = ticket.state == TicketState::Resolved;
        if closed || was_closed {
            self.set_state(number, closed).await?;
        }
        Ok(json!({"number": number, "closed": closed}))
    }
}
