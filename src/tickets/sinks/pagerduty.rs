//! PagerDuty ticket sink (Events API v2): pages for tickets that must page, and follows them to resolution.
//!
//! `POST https://events.pagerduty.com/v2/enqueue` (`spec.url` overrides it, for tests or a proxy) with the
//! integration's routing key from the Secret key `routingKey` (32 characters). The `dedup_key` is the
//! ticket's fingerprint, so PagerDuty folds every resend and every update of a ticket into one alert:
//! `trigger` is idempotent on an open alert, `acknowledge` and `resolve` on one already in that state.
//!
//! A PagerDuty sink only pages. A ticket that is open but not (yet) paging — `page` is false until the
//! route or an escalation step says `page: true` — is not sent: the ticket sinks beside it (Jira, Slack…)
//! carry it, and a trigger would wake someone the roster did not ask to wake. Such a delivery succeeds
//! without a request and keeps the previous reference (or `{"skipped": version}`). Likewise `acknowledge` and
//! `resolve` are only sent for an alert this sink triggered. PagerDuty answers 202 `{"status": "success"}`;
//! 400 is an invalid event (not retried), 429 and 5xx are retried.

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::render::{self, clip};
use super::{Delivery, SinkError, SinkRef, TicketSink, USER_AGENT, credential, send, spec_url};
use crate::connectors::Credentials;
use crate::tickets::{Ticket, TicketState};

pub const DEFAULT_URL: &str = "https://events.pagerduty.com/v2/enqueue";
pub const ROUTING_KEY_CHARS: usize = 32;
/// PagerDuty's limit for `payload.summary`.
pub const SUMMARY_CHARS: usize = 1024;

pub struct PagerDutySink {
    name: String,
    http: reqwest::Client,
    url: Url,
    routing_key: String,
}

impl PagerDutySink {
    pub fn from_spec(
        spec: &crate::api::TicketSink,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let routing_key = credential(credentials, "routingKey")?;
        let length = routing_key.chars().count();
        if length != ROUTING_KEY_CHARS {
            // The length, never the key: a wrong key is still a secret.
            return Err(format!(
                "credential \"routingKey\" is malformed: an Events API v2 integration key has \
                 {ROUTING_KEY_CHARS} characters, this one has {length}"
            ));
        }
        Ok(PagerDutySink {
            name: spec.name.clone(),
            http,
            url: spec_url(spec, Some(DEFAULT_URL))?,
            routing_key,
        })
    }
}

/// The Events API v2 event for `action` on `ticket`.
pub fn event(routing_key: &str, ticket: &Ticket, action: &str) -> Value {
    let details: serde_json::Map<String, Value> = render::fields(ticket)
        .into_iter()
        .map(|f| (f.label.to_string(), Value::String(f.value)))
        .collect();
    let mut details = Value::Object(details);
    details["Summary"] = json!(ticket.summary);
    if !ticket.examples.is_empty() {
        details["Latest records"] = ticket
            .examples
            .iter()
            .map(|example| {
                let mut lines = vec![render::example_heading(example)];
                lines.extend(
                    render::example_parts(example)
                        .into_iter()
                        .map(|(label, part)| format!("{label}: {part}")),
                );
                Value::String(lines.join("\n"))
            })
            .collect();
    }
    if !ticket.commands.is_empty() {
        details["Commands"] = json!(ticket.commands);
    }
    json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": ticket.fingerprint,
        "client": "meshline",
        "payload": {
            "summary": clip(&render::headline(ticket), SUMMARY_CHARS),
            "source": format!("meshline/{}/{}", ticket.namespace, ticket.flow),
            "severity": if ticket.page { "critical" } else { "warning" },
            "timestamp": render::timestamp(&ticket.updated_at),
            "component": ticket.flow,
            "group": ticket.namespace,
            "class": ticket.kind.label(),
            "custom_details": details,
        },
        "links": [],
    })
}

#[async_trait]
impl TicketSink for PagerDutySink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError> {
        let ticket = delivery.ticket;
        let triggered = delivery
            .previous
            .is_some_and(|p| p.get("dedupKey").is_some());
        let action = match ticket.state {
            TicketState::Open if ticket.page => Some("trigger"),
            TicketState::Acknowledged if triggered => Some("acknowledge"),
            TicketState::Resolved if triggered => Some("resolve"),
            _ => None,
        };
        let Some(action) = action else {
            return Ok(delivery
                .previous
                .cloned()
                .unwrap_or_else(|| json!({"skipped": ticket.version})));
        };
        let request = self
            .http
            .post(self.url.clone())
            .header("User-Agent", USER_AGENT)
            .json(&event(&self.routing_key, ticket, action));
        let what = format!("POST {} ({action})", self.url.path());
        let answer = send(&self.name, &what, request).await?;
        if !answer.success() {
            return Err(answer.error(&self.name, &what));
        }
        Ok(json!({"dedupKey": ticket.fingerprint, "action": action}))
    }
}
