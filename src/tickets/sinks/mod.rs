//! Ticket sinks: the vendors' wire formats for tickets and pages, behind one small trait so the dispatcher
//! treats them alike. Each sink brings its copy of a ticket up to the ticket's current version: create it the
//! first time, comment or update it while it stays open, close or resolve it when the cause clears.

use async_trait::async_trait;
use serde_json::Value;

use super::Ticket;

/// What a sink keeps about its copy of a ticket (a Jira issue key, a GitHub issue number, a PagerDuty
/// dedup key), stored by the ledger beside the ticket and handed back on the next delivery.
pub type SinkRef = Value;

/// One delivery of a ticket's current version to one sink.
#[derive(Clone, Copy, Debug)]
pub struct Delivery<'a> {
    pub ticket: &'a Ticket,
    /// What the sink returned last time; `None` before the first success.
    pub previous: Option<&'a SinkRef>,
    /// An earlier attempt at this version may have reached the sink (the worker died between sending and
    /// recording the answer). A sink that cannot create idempotently looks for its copy first.
    pub in_doubt: bool,
    /// The dispatcher's clock at this attempt. A sink that waits out a vendor's lag (Jira's search) measures
    /// the wait by it, so a test's manual clock drives it too.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// A delivery that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// Worth retrying later (5xx, 429, connection errors); otherwise the sink refused the request (4xx) and
    /// the ticket sink is reported as failing until its configuration is fixed. Either way the ticket stays
    /// in the outbox: nothing is dropped.
    pub retryable: bool,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    /// What went wrong, without credentials.
    pub message: String,
    /// `Retry-After`, when the sink sent one.
    pub retry_after: Option<std::time::Duration>,
}

impl SinkError {
    /// The HTTP status when the sink refused the ticket: a 4xx other than 408 (Request Timeout) and 429 (Too
    /// Many Requests), which say "later" rather than "no". `None` for everything a retry may get past.
    pub fn refusal(&self) -> Option<u16> {
        self.status
            .filter(|s| (400..500).contains(s) && *s != 408 && *s != 429)
    }
}

/// A ticket or paging system.
#[async_trait]
pub trait TicketSink: Send + Sync {
    /// The roster's name for this sink.
    fn name(&self) -> &str;
    /// Brings the sink's copy of `delivery.ticket` to its current version and returns what to keep for the
    /// next delivery.
    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError>;
}

pub mod github;
pub mod jira;
pub mod pagerduty;
pub mod render;
pub mod slack;
pub mod webhook;

use std::time::Duration;

use url::Url;

use super::TicketState;
use crate::api::TicketSinkType;
use crate::connectors::Credentials;
use crate::connectors::sinks::REQUEST_TIMEOUT;

/// The most of a vendor's answer that is read; the rest is left unread (an answer is a short JSON or `ok`).
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// The most of a vendor's answer quoted in a [`SinkError`] message.
const QUOTED_ANSWER_CHARS: usize = 300;

/// What a delivery does to the sink's copy of a ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The sink has no copy yet: create it.
    Opened,
    /// The sink has a copy and the cause is still present: add the new counts and examples.
    Updated,
    /// The cause cleared: close or resolve the copy. A ticket that cleared before its first delivery is
    /// still `Resolved` (a receiver learns that it happened and that it is over), never `Opened`.
    Resolved,
}

impl Event {
    pub fn of(delivery: &Delivery<'_>) -> Event {
        if delivery.ticket.state == TicketState::Resolved {
            Event::Resolved
        } else if delivery.previous.is_none() {
            Event::Opened
        } else {
            Event::Updated
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Event::Opened => "opened",
            Event::Updated => "updated",
            Event::Resolved => "resolved",
        }
    }
}

/// Builds the sink a roster's `ticketSinks[]` entry describes, reading its credentials from its Secret. The
/// error names the entry, the field or Secret key and the reason, and never quotes a credential.
pub fn build(
    spec: &crate::api::TicketSink,
    credentials: &Credentials,
    client: reqwest::Client,
) -> Result<Box<dyn TicketSink>, String> {
    let built: Result<Box<dyn TicketSink>, String> = match spec.r#type {
        TicketSinkType::Webhook => {
            webhook::WebhookSink::from_spec(spec, credentials, client).map(|s| Box::new(s) as _)
        }
        TicketSinkType::Slack => {
            slack::SlackSink::from_spec(spec, credentials, client).map(|s| Box::new(s) as _)
        }
        TicketSinkType::Jira => {
            jira::JiraSink::from_spec(spec, credentials, client).map(|s| Box::new(s) as _)
        }
        TicketSinkType::Github => {
            github::GithubSink::from_spec(spec, credentials, client).map(|s| Box::new(s) as _)
        }
        TicketSinkType::Pagerduty => {
            pagerduty::PagerDutySink::from_spec(spec, credentials, client).map(|s| Box::new(s) as _)
        }
    };
    built.map_err(|reason| {
        format!(
            "ticketSinks[{}] ({}, Secret {:?}): {reason}",
            spec.name,
            type_label(spec.r#type),
            spec.credentials_secret_ref.name
        )
    })
}

fn type_label(kind: TicketSinkType) -> &'static str {
    match kind {
        TicketSinkType::Webhook => "webhook",
        TicketSinkType::Slack => "slack",
        TicketSinkType::Jira => "jira",
        TicketSinkType::Github => "github",
        TicketSinkType::Pagerduty => "pagerduty",
    }
}

/// A required Secret key; an empty value is as useless as a missing one.
fn credential(credentials: &Credentials, key: &str) -> Result<String, String> {
    let value = credentials.get(key).map_err(|e| e.to_string())?;
    if value.trim().is_empty() {
        return Err(format!("credential {key:?} is empty"));
    }
    Ok(value)
}

/// `spec.url` parsed, or `default` when the spec has none (`None` default: the field is required).
fn spec_url(spec: &crate::api::TicketSink, default: Option<&str>) -> Result<Url, String> {
    let raw = match (&spec.url, default) {
        (Some(url), _) => url.as_str(),
        (None, Some(default)) => default,
        (None, None) => return Err("url is required".into()),
    };
    let url = Url::parse(raw).map_err(|e| format!("url {raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("url {raw:?} must be http or https"));
    }
    Ok(url)
}

/// `base` with `path` (and its `?query`, if any) appended to its own path (a base may carry a context path,
/// e.g. Jira or GitHub Enterprise behind a proxy).
fn join(base: &Url, path_and_query: &str) -> Url {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    url.set_query(query);
    url
}

/// A vendor's answer, read up to [`MAX_ANSWER_BYTES`].
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    /// `x-ratelimit-remaining: 0` (GitHub's primary rate limit).
    rate_limited: bool,
    body: String,
}

impl Answer {
    fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A refusal: 408, 429 and 5xx are worth retrying, and so is a 403 that is a rate limit (GitHub answers
    /// its rate limits with 403 plus `x-ratelimit-remaining: 0` or `retry-after`); any other 4xx is the
    /// sink refusing this request until its configuration (or ours) changes.
    fn error(&self, sink: &str, what: &str) -> SinkError {
        let retryable = matches!(self.status, 408 | 429 | 500..=599)
            || (self.status == 403 && (self.rate_limited || self.retry_after.is_some()));
        SinkError {
            retryable,
            status: Some(self.status),
            message: format!(
                "ticket sink {sink}: {what} answered {}: {}",
                self.status,
                render::clip(self.body.trim(), QUOTED_ANSWER_CHARS)
            ),
            retry_after: self.retry_after,
        }
    }

    /// The answer's JSON. A 2xx that is not JSON is retried: the vendor (or a proxy in front of it) is not
    /// answering the documented way.
    fn json(&self, sink: &str, what: &str) -> Result<Value, SinkError> {
        serde_json::from_str(&self.body).map_err(|e| SinkError {
            retryable: true,
            status: Some(self.status),
            message: format!(
                "ticket sink {sink}: {what} answered {} with a body that is not JSON ({e}): {}",
                self.status,
                render::clip(self.body.trim(), QUOTED_ANSWER_CHARS)
            ),
            retry_after: None,
        })
    }
}

/// Sends `request`. `what` names the request in errors (method and path, never the URL: a Slack webhook URL
/// is a credential). Bodies are never logged.
async fn send(
    sink: &str,
    what: &str,
    request: reqwest::RequestBuilder,
) -> Result<Answer, SinkError> {
    let transport = |e: reqwest::Error| {
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        SinkError {
            retryable: true,
            status: None,
            // `without_url`: reqwest quotes the URL otherwise, and a Slack webhook URL is its credential.
            message: format!("ticket sink {sink}: {what} {kind}: {}", e.without_url()),
            retry_after: None,
        }
    };
    let mut response = request
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(transport)?;
    let status = response.status().as_u16();
    let headers = response.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let rate_limited = header("x-ratelimit-remaining").is_some_and(|v| v.trim() == "0");
    let retry_after = header("retry-after")
        .and_then(crate::connectors::parse_retry_after)
        .or_else(|| {
            // GitHub's primary rate limit says when the window resets (Unix seconds) instead.
            let reset: i64 = header("x-ratelimit-reset")?.trim().parse().ok()?;
            let wait = reset - chrono::Utc::now().timestamp();
            rate_limited.then(|| Duration::from_secs(wait.max(0) as u64))
        });
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        let room = MAX_ANSWER_BYTES - body.len();
        if chunk.len() >= room {
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status,
        retry_after,
        rate_limited,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The `User-Agent` every ticket request carries (GitHub refuses requests without one).
const USER_AGENT: &str = concat!("meshline/", env!("CARGO_PKG_VERSION"));
