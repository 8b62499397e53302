//! The local ticket receiver of `meshline dev`: every ticket sink of the roster is pointed at it as a generic
//! webhook sink, so the scenario's exceptions travel the real path (ledger outbox → dispatcher → signed HTTP
//! request) and the report can show what a ticket system would have received.
//!
//! It checks each request the way a careful receiver would: the HMAC signature over `"{timestamp}.{body}"`
//! with the generated signing secret, and the `Idempotency-Key` (`{fingerprint}:{version}`, which must match
//! the body). A resend of a version it already has is answered 200 and not recorded twice, as the webhook
//! sink's contract promises. It keeps only the ticket's routing fields, never the examples' snapshots.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// The Secret every dev ticket sink reads its `signingSecret` from.
pub const RECEIVER_SECRET: &str = "meshline-dev-ticket-receiver";

/// A signed request older or newer than this is refused as a replay.
const TIMESTAMP_TOLERANCE_SECONDS: i64 = 300;

/// One ticket version as the receiver got it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedTicket {
    /// The roster's name of the sink it was sent to.
    pub sink: String,
    /// `opened`, `updated` or `resolved`.
    pub event: String,
    pub fingerprint: String,
    pub version: i64,
    pub kind: String,
    pub reason: String,
    /// The owner id the ticket is with.
    pub owner: String,
    pub count: u64,
    pub outstanding: u64,
    pub acknowledged_by: Option<String>,
}

/// What the receiver got, shared with the scenario.
pub struct TicketReceiver {
    signing_secret: String,
    received: Mutex<Vec<ReceivedTicket>>,
    keys: Mutex<BTreeSet<String>>,
    /// Resends of a version already received (same `Idempotency-Key`).
    pub duplicates: AtomicU64,
    /// Requests refused: bad or missing signature, stale timestamp, key not matching the body.
    pub refused: AtomicU64,
}

impl TicketReceiver {
    pub fn new(signing_secret: String) -> Arc<TicketReceiver> {
        Arc::new(TicketReceiver {
            signing_secret,
            received: Mutex::new(Vec::new()),
            keys: Mutex::new(BTreeSet::new()),
            duplicates: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Every ticket version received, in arrival order.
    pub fn received(&self) -> Vec<ReceivedTicket> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why a request is refused, if it is.
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("{name} is missing"))
        };
        let timestamp = header("X-Meshline-Timestamp")?;
        let at: i64 = timestamp
            .parse()
            .map_err(|_| format!("X-Meshline-Timestamp {timestamp:?} is not Unix seconds"))?;
        if (chrono::Utc::now().timestamp() - at).abs() > TIMESTAMP_TOLERANCE_SECONDS {
            return Err("X-Meshline-Timestamp is too far from now".into());
        }
        let signature = header("X-Meshline-Signature")?;
        let digest = signature
            .strip_prefix("sha256=")
            .and_then(|h| hex::decode(h).ok())
            .ok_or("X-Meshline-Signature is not sha256=<hex>")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(self.signing_secret.as_bytes())
            .map_err(|e| e.to_string())?;
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        // `verify_slice` compares in constant time.
        mac.verify_slice(&digest)
            .map_err(|_| "X-Meshline-Signature does not match the body".to_string())
    }
}

async fn receive(
    State(receiver): State<Arc<TicketReceiver>>,
    Path(sink): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let refuse = |status: StatusCode, why: String| {
        receiver.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(sink = %sink, reason = %why, "dev ticket receiver refused a request");
        (status, why)
    };
    if let Err(why) = receiver.verify(&headers, &body) {
        return refuse(StatusCode::UNAUTHORIZED, why);
    }
    let ticket: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let text = |k: &str| ticket[k].as_str().unwrap_or_default().to_string();
    let number = |k: &str| ticket[k].as_u64().unwrap_or_default();
    let version = ticket["version"].as_i64().unwrap_or_default();
    let key = headers
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if key != format!("{}:{version}", text("fingerprint")) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("Idempotency-Key {key:?} does not name the body's fingerprint and version"),
        );
    }
    if !receiver
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key)
    {
        receiver.duplicates.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::OK, "already received".into());
    }
    receiver
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(ReceivedTicket {
            sink,
            event: text("event"),
            fingerprint: text("fingerprint"),
            version,
            kind: text("kind"),
            reason: text("reason"),
            owner: ticket["owner"]["id"].as_str().unwrap_or_default().into(),
            count: number("count"),
            outstanding: number("outstanding"),
            acknowledged_by: ticket["acknowledgedBy"].as_str().map(str::to_string),
        });
    (StatusCode::OK, "received".into())
}

/// Serves the receiver on an ephemeral local port: `POST /sinks/{sink}`.
pub async fn serve(
    receiver: Arc<TicketReceiver>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/sinks/{sink}", post(receive))
        .with_state(receiver);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

/// Points every ticket sink of the roster at the receiver as a signed webhook, keeping the sinks' names so
/// the routes that name them still apply; with no sink at all, adds one so no ticket waits in the outbox.
pub fn redirect_sinks(roster: &mut crate::api::OwnershipRoster, addr: SocketAddr) {
    let sinks = &mut roster.spec.ticket_sinks;
    if sinks.is_empty() {
        sinks.push(crate::api::TicketSink {
            name: "dev-tickets".into(),
            r#type: crate::api::TicketSinkType::Webhook,
            url: None,
            project: None,
            repository: None,
            channel: None,
            credentials_secret_ref: crate::api::SecretRef {
                name: RECEIVER_SECRET.into(),
            },
        });
    }
    for sink in sinks.iter_mut() {
        sink.r#type = crate::api::TicketSinkType::Webhook;
        sink.url = Some(format!("http://{addr}/sinks/{}", sink.name));
        sink.project = None;
        sink.repository = None;
        sink.channel = None;
        sink.credentials_secret_ref = crate::api::SecretRef {
            name: RECEIVER_SECRET.into(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(secret: &str, body: &[u8]) -> HeaderMap {
        let ts = chrono::Utc::now().timestamp().to_string();
        let mut h = HeaderMap::new();
        h.insert("X-Meshline-Timestamp", ts.parse().unwrap());
        h.insert(
            "X-Meshline-Signature",
            crate::connectors::sinks::http::signature(secret, &ts, body)
                .parse()
                .unwrap(),
        );
        h
    }

    #[test]
    fn only_requests_signed_with_the_generated_secret_are_taken() {
        let receiver = TicketReceiver::new("s3cret".into());
        let body = br#"{"fingerprint":"f","version":1}"#;
        assert!(receiver.verify(&signed("s3cret", body), body).is_ok());
        let err = receiver.verify(&signed("other", body), body).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err = receiver.verify(&HeaderMap::new(), body).unwrap_err();
        assert!(err.contains("X-Meshline-Timestamp is missing"), "{err}");
        let tampered = br#"{"fingerprint":"f","version":2}"#;
        assert!(receiver.verify(&signed("s3cret", body), tampered).is_err());
    }
}
