//! Tickets: every exception of a flow (a dead letter, a hold, a degraded flow, a rejected or aborted contract
//! candidate, an audit difference) becomes one ticket per cause, routed to a named owner by the flow's
//! OwnershipRoster, escalated along the roster's ladder, and sent to the roster's ticket sinks (webhook, Slack,
//! Jira, GitHub, PagerDuty) from an outbox in the ledger.
//!
//! What lives where:
//! - this module: the ticket as the sinks see it ([`Ticket`]) and the fingerprint that makes one ticket per
//!   cause;
//! - `route`: which owner and which sinks a ticket goes to, and the escalation ladder (pure);
//! - `sinks`: the vendors' wire formats behind [`TicketSink`];
//! - the ledger (`crate::ledger`): the tickets and their per-sink delivery state, in the same database as the
//!   records, so a ticket is as durable as the dead letter it reports;
//! - `dispatch`: the worker's task that routes, escalates and delivers tickets with retries and backoff;
//!   its rendering and sending are shared with the controller's one ticket of its own, a flow none of whose
//!   worker pods answers (`controller::flow::outage`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::{ErrorClass, OwnerRole};

pub mod dispatch;
pub mod route;
pub mod sinks;

/// What kind of exception a ticket reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ExceptionKind {
    /// Records dead-lettered with one reason.
    DeadLetter,
    /// Records held for approval by one rule.
    Hold,
    /// The flow is Degraded: breaker open, status unavailable, SLA breached.
    FlowDegraded,
    /// A contract candidate was rejected (compatibility, preflight) or its canary aborted.
    ContractRejected,
    /// The reconciliation audit found differences it cannot explain.
    AuditMismatch,
}

impl ExceptionKind {
    pub const ALL: [ExceptionKind; 5] = [
        ExceptionKind::DeadLetter,
        ExceptionKind::Hold,
        ExceptionKind::FlowDegraded,
        ExceptionKind::ContractRejected,
        ExceptionKind::AuditMismatch,
    ];

    /// Stable label, used in the ledger, metrics and tickets.
    pub fn label(self) -> &'static str {
        match self {
            ExceptionKind::DeadLetter => "dead_letter",
            ExceptionKind::Hold => "hold",
            ExceptionKind::FlowDegraded => "flow_degraded",
            ExceptionKind::ContractRejected => "contract_rejected",
            ExceptionKind::AuditMismatch => "audit_mismatch",
        }
    }

    pub fn parse(s: &str) -> Option<ExceptionKind> {
        ExceptionKind::ALL.into_iter().find(|k| k.label() == s)
    }
}

/// Where a ticket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    /// The cause is present and nobody has acknowledged it.
    Open,
    /// A named owner acknowledged it; escalation stops, the cause is still present.
    Acknowledged,
    /// The cause cleared (dead letters replayed and delivered, holds decided, breaker closed).
    Resolved,
}

impl TicketState {
    pub fn label(self) -> &'static str {
        match self {
            TicketState::Open => "open",
            TicketState::Acknowledged => "acknowledged",
            TicketState::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<TicketState> {
        [
            TicketState::Open,
            TicketState::Acknowledged,
            TicketState::Resolved,
        ]
        .into_iter()
        .find(|k| k.label() == s)
    }
}

/// One ticket per flow and cause: `hex(sha256(namespace/flow, kind, class, reason))[..32]`. The reason is a
/// key (`erp:422`, `contract:rule_failed:discount_cap`, `breaker_open`), never a message, so records failing
/// for the same cause share a ticket.
pub fn fingerprint(
    namespace: &str,
    flow: &str,
    kind: ExceptionKind,
    class: Option<ErrorClass>,
    reason: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [
        namespace,
        flow,
        kind.label(),
        class.map(ErrorClass::label).unwrap_or("-"),
        reason,
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A named person as a ticket shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignee {
    /// The roster's owner id.
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pager: Option<String>,
}

/// One recent record behind a ticket. Every text in it is already redacted: the snapshot by the contract's
/// redaction, the ERP's response and the message by the flow's PII values (issue #7), before the ledger
/// stores them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Example {
    pub record: i64,
    pub correlation_id: String,
    pub source_key: String,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erp_response: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Value>,
}

/// A ticket as the sinks render it: everything a person needs to act without opening a terminal first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    pub fingerprint: String,
    pub namespace: String,
    pub flow: String,
    pub kind: ExceptionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<ErrorClass>,
    /// The cause's key (see [`fingerprint`]).
    pub reason: String,
    /// The contract rule behind it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// One line: what is wrong, e.g. "12 records dead-lettered: erp:422".
    pub title: String,
    /// The rule's message or the cause's explanation (redacted).
    pub summary: String,
    pub state: TicketState,
    /// The role the route (or the escalation step) gives the ticket to.
    pub role: OwnerRole,
    pub owner: Assignee,
    /// 0 before any escalation; n after the n-th step of the ladder.
    pub escalation_step: u32,
    /// Page (PagerDuty trigger) rather than only ticket.
    pub page: bool,
    /// Occurrences since the ticket opened (records dead-lettered or held, or times the cause was seen).
    pub count: u64,
    /// Occurrences still outstanding (dead letters not yet replayed and delivered, holds not decided).
    pub outstanding: u64,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<DateTime<Utc>>,
    /// The latest records behind it, newest first (at most five).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Example>,
    /// Commands to see the lineage and to replay or approve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Bumped on every change; a sink is in sync when it has been sent this version.
    pub version: i64,
}

/// A flow-level cause the controller sees and the worker cannot (an SLA breach over the flow's status, a
/// contract candidate the gates rejected or whose canary aborted), sent to the worker's `PUT /exceptions`
/// so it becomes a ticket in the same outbox as the records' exceptions. The controller sends the whole set
/// it sees each time; a cause it no longer sends has cleared. Some worker pods not answering while another
/// does is one (`status:WorkersNotAnswering`). No pod answering cannot be reported through a worker: the
/// controller keeps that ticket (`status:NoWorkerAnswering`) itself, in the flow's status
/// (`controller::flow::outage`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedCause {
    pub kind: ExceptionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<ErrorClass>,
    /// The cause's key, prefixed by [`CONTROLLER_REASON_PREFIXES`]: `sla:FailureRateOverSla`,
    /// `contract:CanaryAborted:1.3.0`.
    pub reason: String,
    /// What a person should know (no record values).
    pub summary: String,
}

/// The body of `PUT /exceptions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedCauses {
    pub causes: Vec<ReportedCause>,
}

/// The reason prefixes of the causes the controller reports: an open ticket with one of them that the
/// controller no longer sends is resolved. The worker's own flow-level cause (`breaker_open`) has none.
pub const CONTROLLER_REASON_PREFIXES: [&str; 3] = ["sla:", "contract:", "status:"];

/// At most this many causes per report (each SLA breach and one contract rejection fit easily).
pub const MAX_REPORTED_CAUSES: usize = 20;
