//! Generic webhook ticket sink: `POST {url}` with the whole [`Ticket`] as JSON plus
//! `"event": "opened" | "updated" | "resolved"`.
//!
//! Signed exactly like the HTTP ERP sink (`crate::connectors::sinks::http`), so one receiver-side verifier
//! serves both: with the Secret key `signingSecret`, `X-Meshline-Timestamp` (Unix seconds) and
//! `X-Meshline-Signature: sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">`. The optional key `token` adds
//! `Authorization: Bearer …`. `Idempotency-Key: {fingerprint}:{version}` names one version of one ticket, so a
//! receiver drops a resend after a crash and still takes the next version. Any 2xx is delivered.

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::{Delivery, Event, SinkError, SinkRef, TicketSink, USER_AGENT, send, spec_url};
use crate::connectors::Credentials;
use crate::connectors::sinks::http::signature;

pub struct WebhookSink {
    name: String,
    http: reqwest::Client,
    url: Url,
    signing_secret: Option<String>,
    token: Option<String>,
}

impl WebhookSink {
    pub fn from_spec(
        spec: &crate::api::TicketSink,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        Ok(WebhookSink {
            name: spec.name.clone(),
            http,
            url: spec_url(spec, None)?,
            signing_secret: credentials
                .optional("signingSecret")
                .map_err(|e| e.to_string())?,
            token: credentials.optional("token").map_err(|e| e.to_string())?,
        })
    }
}

/// The body: the ticket's own JSON with the event beside its fields.
pub fn body(delivery: &Delivery<'_>) -> Result<Value, serde_json::Error> {
    let mut body = serde_json::to_value(delivery.ticket)?;
    if let Value::Object(fields) = &mut body {
        fields.insert("event".into(), json!(Event::of(delivery).label()));
    }
    Ok(body)
}

#[async_trait]
impl TicketSink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError> {
        let ticket = delivery.ticket;
        let body = body(&delivery)
            .and_then(|b| serde_json::to_vec(&b))
            .map_err(|e| SinkError {
                retryable: false,
                status: None,
                message: format!(
                    "ticket sink {}: the ticket is not serialisable: {e}",
                    self.name
                ),
                retry_after: None,
            })?;
        let mut request = self
            .http
            .post(self.url.clone())
            .header("Content-Type", "application/json")
            .header("User-Agent", USER_AGENT)
            .header(
                "Idempotency-Key",
                format!("{}:{}", ticket.fingerprint, ticket.version),
            );
        if let Some(secret) = &self.signing_secret {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            request = request
                .header("X-Meshline-Signature", signature(secret, &timestamp, &body))
                .header("X-Meshline-Timestamp", timestamp);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let what = format!("POST {}", self.url.path());
        let answer = send(&self.name, &what, request.body(body)).await?;
        if !answer.success() {
            return Err(answer.error(&self.name, &what));
        }
        Ok(json!({"delivered": ticket.version}))
    }
}
