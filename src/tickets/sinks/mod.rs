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

/// A ticket or paging system.
#[async_trait]
pub trait TicketSink: Send + Sync {
    /// The roster's name for this sink.
    fn name(&self) -> &str;
    /// Brings the sink's copy of `delivery.ticket` to its current version and returns what to keep for the
    /// next delivery.
    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError>;
}
