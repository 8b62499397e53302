//! Sources and sinks: the edges of a flow, each behind a small trait.
//!
//! A source turns what a CRM sends (a webhook body, a page of a poll) into [`SourceRecord`]s and hands them to
//! an [`Intake`], which commits them to the ledger; only then does the source acknowledge the CRM or advance
//! its checkpoint. A sink delivers one accepted payload to an ERP with an upsert keyed by the external id and
//! classifies every failure into the one [`ErrorClass`] the worker, the routes and the metrics share.
//!
//! Connectors speak wire formats only; they never touch the ledger, the contract or Kubernetes.

pub mod credentials;
pub mod queries;
pub mod sinks;
pub mod sources;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::api::ErrorClass;
pub use credentials::{Credentials, CredentialsError};

/// One record as a source received it, before the contract has looked at it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    /// The record's key in the CRM (a Salesforce Id, a HubSpot object id). Buckets are derived from it.
    pub key: String,
    /// The record in the shape the contract's field schema describes.
    pub payload: Value,
    /// A correlation id the CRM sent (e.g. a `traceparent` or an event id), if any.
    pub correlation_id: Option<String>,
}

/// Where sources put records. Implemented by the worker on top of the ledger.
#[async_trait]
pub trait Intake: Send + Sync {
    /// Commits the records durably. Only after `Ok` may the CRM be acknowledged.
    async fn accept(&self, records: Vec<SourceRecord>) -> Result<IntakeReceipt, IntakeError>;
    /// Commits the records and the source's new checkpoint in one transaction.
    async fn accept_with_checkpoint(
        &self,
        records: Vec<SourceRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<IntakeReceipt, IntakeError>;
    /// The checkpoint last committed for `source`.
    async fn checkpoint(&self, source: &str) -> Result<Option<String>, IntakeError>;
    /// `Some` while the intake refuses records for now (the ledger's volume is nearly full): a webhook
    /// source answers 503 with `Retry-After`, a poller waits. Cheap to call on every request.
    fn backpressure(&self) -> Option<Backpressure> {
        None
    }
}

/// Why the intake refuses records for now, and how long the sender should wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backpressure {
    pub reason: String,
    pub retry_after: Duration,
}

/// What the intake did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeReceipt {
    pub stored: usize,
    pub duplicates: usize,
    pub updates: usize,
    /// Late revisions: older than the stored one by the contract's ordering field; stored in the lineage
    /// only, acknowledged like any other so the CRM stops resending them.
    pub stale: usize,
}

/// The intake could not store the batch; the source must not acknowledge it.
#[derive(Debug, thiserror::Error)]
#[error("records could not be stored: {0}")]
pub struct IntakeError(pub String);

/// One delivery request to a sink.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The upsert key: the contract's external id.
    pub external_id: &'a str,
    pub payload: &'a Value,
    /// Sent as `X-Correlation-Id` and inside a W3C `traceparent`, so the ERP's logs can be joined with ours.
    pub correlation_id: &'a str,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// What the ERP confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The ERP's internal id of the record, when it tells.
    pub erp_id: Option<String>,
    /// Whether the record was created (true) or an existing one updated (false), when the ERP tells.
    pub created: Option<bool>,
    pub status: u16,
}

/// A failed delivery, classified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{system} {class_label}: {message}", class_label = .class.label())]
pub struct SinkError {
    pub system: &'static str,
    pub class: ErrorClass,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// The ERP asked us to wait this long (429/503 `Retry-After`).
    pub retry_after: Option<Duration>,
    pub message: String,
    /// The ERP's answer (status line and body, truncated), kept with dead letters.
    pub response: Option<String>,
}

impl SinkError {
    pub fn new(system: &'static str, class: ErrorClass, message: impl Into<String>) -> SinkError {
        SinkError {
            system,
            class,
            status: None,
            retry_after: None,
            message: message.into(),
            response: None,
        }
    }

    /// Classifies an HTTP answer the way every sink does unless its API says otherwise: 401/403 are flow-level
    /// (credentials), 408/429/5xx are transient, other 4xx are permanent.
    pub fn from_status(
        system: &'static str,
        status: u16,
        retry_after: Option<Duration>,
        body: &str,
    ) -> SinkError {
        let class = classify_status(status);
        SinkError {
            system,
            class,
            status: Some(status),
            retry_after,
            message: format!("HTTP {status}: {}", truncate(body, 300)),
            response: Some(format!("HTTP {status}\n{}", truncate(body, 8192))),
        }
    }
}

/// The shared HTTP status classification.
pub fn classify_status(status: u16) -> ErrorClass {
    match status {
        401 | 403 => ErrorClass::FlowLevel,
        408 | 425 | 429 => ErrorClass::Transient,
        400..=499 => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// Classifies a transport error (no answer): always transient, the ERP may come back.
pub fn transport_error(system: &'static str, error: &reqwest::Error) -> SinkError {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    SinkError::new(system, ErrorClass::Transient, format!("{what}: {error}"))
}

/// Parses `Retry-After` (delta-seconds or an HTTP date).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The first `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An ERP, written to by upsert.
#[async_trait]
pub trait Sink: Send + Sync {
    /// `netsuite`, `odoo`, `http` or `postgres`.
    fn system(&self) -> &'static str;
    /// Creates or updates the record keyed by `delivery.external_id`. Must be safe to repeat.
    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError>;
    /// A cheap authenticated request, used to close the circuit breaker once the ERP answers again.
    async fn probe(&self) -> Result<(), SinkError>;
    /// Reads a lookup table (e.g. the pricebook) from the ERP: entries keyed by `key`.
    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError>;
    /// Why the sink's Secret, as mounted now, cannot be used (a rotation to a malformed key), if it cannot.
    fn credentials_problem(&self) -> Option<String> {
        None
    }
    /// `Some` when the sink delivers many records in one request ([`Sink::deliver_batch`]), with how large
    /// such a request may be. The pipeline then groups accepted records up to these limits (and a short
    /// linger) instead of calling [`Sink::deliver`] once per record.
    fn batch_limits(&self) -> Option<BatchLimits> {
        None
    }
    /// Creates or updates every record of the batch, each keyed by its external id, in one request where the
    /// ERP allows. The pipeline never puts two deliveries with the same external id in one batch.
    ///
    /// - `Ok(results)`: one result per delivery, in order — the ERP judged each record on its own (a bulk API
    ///   with per-item status, or a batch that was wholly applied).
    /// - `Err(e)`: the batch failed as a whole and, for a transient or permanent `e`, nothing in it may be
    ///   taken as written. A permanent failure (a constraint one record violates rejects the whole
    ///   transaction) is bisected by the pipeline until the poison record is alone; a transient one is
    ///   retried, every record with its own backoff. Must be safe to repeat, like [`Sink::deliver`].
    ///
    /// The default delivers one by one, for sinks without a batch API.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        let mut results = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            results.push(self.deliver(*delivery).await);
        }
        Ok(results)
    }
}

/// How large one batch of deliveries may be (see [`Sink::batch_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Records per request (at least 1).
    pub max_records: usize,
    /// Payload bytes per request (serialized JSON, summed); a single larger record still goes alone.
    pub max_bytes: usize,
}

impl BatchLimits {
    /// The pipeline's default grouping: 500 records or 1 MiB of payloads, whichever comes first.
    pub const DEFAULT: BatchLimits = BatchLimits {
        max_records: 500,
        max_bytes: 1 << 20,
    };
}

/// W3C trace context header for a correlation id: the id is hashed into a stable trace id.
pub fn traceparent(correlation_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(correlation_id.as_bytes());
    let trace = hex::encode(&digest[..16]);
    let span = hex::encode(&digest[16..24]);
    format!("00-{trace}-{span}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_follow_the_shared_rule() {
        let cases = [
            (400, ErrorClass::Permanent),
            (401, ErrorClass::FlowLevel),
            (403, ErrorClass::FlowLevel),
            (404, ErrorClass::Permanent),
            (409, ErrorClass::Permanent),
            (408, ErrorClass::Transient),
            (429, ErrorClass::Transient),
            (500, ErrorClass::Transient),
            (503, ErrorClass::Transient),
        ];
        for (status, class) in cases {
            assert_eq!(classify_status(status), class, "HTTP {status}");
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn traceparent_is_stable_and_well_formed() {
        let a = traceparent("corr-1");
        assert_eq!(a, traceparent("corr-1"));
        assert_ne!(a, traceparent("corr-2"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!((parts.len(), parts[1].len(), parts[2].len()), (4, 32, 16));
    }
}
