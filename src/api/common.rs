//! Types shared by more than one kind: Secret references, conditions, owner roles.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to a Secret in the object's namespace. Credentials only ever enter Meshline this way: the worker
/// mounts the Secret, nothing copies its data into a spec, a ConfigMap or a status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the same namespace as the object that references it.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A condition in the shape of `metav1.Condition`, which Argo CD's health checks and `kubectl wait` read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. Ready, Degraded, Progressing, OwnerAssigned, ContractResolved.
    #[schemars(length(max = 64))]
    pub r#type: String,
    /// "True", "False" or "Unknown".
    #[schemars(length(max = 8))]
    pub status: String,
    /// One CamelCase word that names the cause; the same word is used by metrics and tickets.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 128))]
    pub reason: String,
    /// What a human needs to know to act on it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 4096))]
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The four roles of the operating model. Every flow has a person in each; the sync owner is mandatory.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum OwnerRole {
    /// Accountable for the flow end to end; a flow without one does not start.
    SyncOwner,
    /// Owns the CRM side (data quality, the source object).
    SourceOwner,
    /// Owns the ERP side (finance, order entry).
    SinkOwner,
    /// Runs the platform (cluster, credentials, the operator).
    PlatformOwner,
}

impl OwnerRole {
    pub const ALL: [OwnerRole; 4] = [
        OwnerRole::SyncOwner,
        OwnerRole::SourceOwner,
        OwnerRole::SinkOwner,
        OwnerRole::PlatformOwner,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OwnerRole::SyncOwner => "syncOwner",
            OwnerRole::SourceOwner => "sourceOwner",
            OwnerRole::SinkOwner => "sinkOwner",
            OwnerRole::PlatformOwner => "platformOwner",
        }
    }
}

/// The one classification of failures used by the worker, the routes, the metrics and the tickets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ErrorClass {
    /// Retry with backoff (timeouts, 5xx, 429, connection errors).
    Transient,
    /// Dead-letter with the reason (contract rejections, the ERP's 4xx validation errors).
    Permanent,
    /// Wait for a human approval by a named role.
    Hold,
    /// The whole flow is failing (401/403, every request failing): open the circuit breaker, records wait.
    FlowLevel,
    /// The configuration is wrong: a condition and an Event, never a crash loop.
    Config,
}

impl ErrorClass {
    /// Stable label for metrics, condition reasons and tickets.
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Hold => "hold",
            ErrorClass::FlowLevel => "flow_level",
            ErrorClass::Config => "config",
        }
    }
}

/// How fast one owner's tickets were acknowledged and resolved (issue #16). Times are means over the tickets
/// that reached that point; a ticket reopened after it resolved counts as a new occurrence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnerTicketStats {
    /// The roster's owner id.
    #[schemars(length(max = 63))]
    pub owner: String,
    /// Tickets (occurrences) this owner was given, all time.
    pub opened: i64,
    pub acknowledged: i64,
    pub resolved: i64,
    /// Open or acknowledged now.
    pub open: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_time_to_acknowledge_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_time_to_resolve_seconds: Option<i64>,
}

/// A ticket sink that keeps refusing or failing deliveries; its tickets wait in the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailingTicketSink {
    #[schemars(length(max = 63))]
    pub sink: String,
    /// Deliveries waiting for it.
    pub pending: i64,
    pub consecutive_failures: i32,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub failing_since: Option<String>,
    /// The sink's last answer (no credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// One open ticket, as status lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenTicket {
    #[schemars(length(max = 64))]
    pub fingerprint: String,
    /// `dead_letter`, `hold`, `flow_degraded`, `contract_rejected`, `audit_mismatch`.
    #[schemars(length(max = 32))]
    pub kind: String,
    /// The cause's key, e.g. `erp:422` (never a record's value).
    #[schemars(length(max = 256))]
    pub reason: String,
    /// `open` or `acknowledged`.
    #[schemars(length(max = 16))]
    pub state: String,
    /// The owner id it is with now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub owner: Option<String>,
    pub escalation_step: i32,
    pub outstanding: i64,
    /// RFC 3339.
    #[schemars(length(max = 64))]
    pub opened_at: String,
}

/// A flow's tickets (from its ledger) or a roster's (over the flows it covers).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TicketSummary {
    /// Open or acknowledged tickets.
    pub open: i64,
    pub acknowledged: i64,
    /// Ticket occurrences opened, acknowledged and resolved, all time, over the whole flow (or the roster's
    /// flows), whoever had them: the counts the mean times below are taken over.
    #[serde(default)]
    pub occurrences_opened: i64,
    #[serde(default)]
    pub occurrences_acknowledged: i64,
    #[serde(default)]
    pub occurrences_resolved: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_time_to_acknowledge_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_time_to_resolve_seconds: Option<i64>,
    /// Per owner, at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub owners: Vec<OwnerTicketStats>,
    /// The oldest open tickets, at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub oldest: Vec<OpenTicket>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failing_sinks: Vec<FailingTicketSink>,
}
