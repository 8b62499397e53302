//! The ledger's one error type. Every variant names the flow and, where there is one, the record, and has a
//! stable `label()` for metrics, condition reasons and tickets.

use super::types::{RecordId, RecordState};

/// The database library's own error (sqlx for PostgreSQL, rusqlite for SQLite), kept as the source.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("flow {flow}: cannot open the {backend} ledger at {target}: {source}")]
    Open {
        flow: String,
        backend: &'static str,
        target: String,
        #[source]
        source: BackendError,
    },

    #[error("flow {flow}: ledger migration to schema version {version} failed: {source}")]
    Migrate {
        flow: String,
        version: i64,
        #[source]
        source: BackendError,
    },

    #[error(
        "flow {flow}: the ledger database has schema version {found}, newer than the {known} this meshline \
         knows; run a meshline at least as new as the one that migrated it (refusing to touch the data)"
    )]
    SchemaTooNew {
        flow: String,
        found: i64,
        known: i64,
    },

    #[error("flow {flow}: ledger {operation} failed{}: {source}", record_suffix(*.record))]
    Database {
        flow: String,
        operation: &'static str,
        record: Option<RecordId>,
        #[source]
        source: BackendError,
    },

    #[error("flow {flow}: record {record} is not in the ledger")]
    NotFound { flow: String, record: RecordId },

    #[error("flow {flow}: record {record} cannot go from {from} to {to}")]
    IllegalTransition {
        flow: String,
        record: RecordId,
        from: RecordState,
        to: RecordState,
    },

    #[error(
        "flow {flow}: record {record}: the claim (fence {fence}) no longer holds the lease; another claim took \
         it over, so this completion was refused"
    )]
    LeaseLost {
        flow: String,
        record: RecordId,
        fence: i64,
    },

    #[error(
        "flow {flow}: record {record}: generation {generation} was superseded by generation {current} (the \
         source sent a changed payload); this completion was dropped"
    )]
    Superseded {
        flow: String,
        record: RecordId,
        generation: i64,
        current: i64,
    },

    #[error("flow {flow}: record {record}: stored {what} is unreadable: {detail}")]
    Corrupt {
        flow: String,
        record: RecordId,
        what: &'static str,
        detail: String,
    },

    #[error(
        "flow {flow}: record {record} changed since it was checked ({changed}); nothing was decided: look at \
         the record again and decide on what it is now"
    )]
    HoldChanged {
        flow: String,
        record: RecordId,
        /// What differs, e.g. `generation 3 is now 4, held for role finance`.
        changed: String,
    },

    #[error("flow {flow}: {what}")]
    InvalidInput { flow: String, what: String },

    #[error("flow {flow}: ticket {fingerprint} is not in the ledger")]
    TicketNotFound { flow: String, fingerprint: String },

    #[error("flow {flow}: ticket {fingerprint}: stored {what} is unreadable: {detail}")]
    TicketCorrupt {
        flow: String,
        fingerprint: String,
        what: &'static str,
        detail: String,
    },

    /// Another worker holds the audit run's lease (it took the run over after this one's lease lapsed, or
    /// holds it now): this worker must stop writing the run.
    #[error("flow {flow}: audit run {run} is leased to {holder}, not {owner}")]
    AuditLeaseLost {
        flow: String,
        run: i64,
        owner: String,
        holder: String,
    },

    #[error("flow {flow}: audit run {run} is not in the ledger")]
    AuditRunNotFound { flow: String, run: i64 },
}

fn record_suffix(record: Option<RecordId>) -> String {
    record
        .map(|id| format!(" for record {id}"))
        .unwrap_or_default()
}

impl LedgerError {
    /// Short stable label: the same word in a metric, a condition reason and a ticket.
    pub fn label(&self) -> &'static str {
        match self {
            LedgerError::Open { .. } => "ledger_open",
            LedgerError::Migrate { .. } => "ledger_migrate",
            LedgerError::SchemaTooNew { .. } => "ledger_schema_too_new",
            LedgerError::Database { .. } => "ledger_database",
            LedgerError::NotFound { .. } => "record_not_found",
            LedgerError::IllegalTransition { .. } => "illegal_transition",
            LedgerError::LeaseLost { .. } => "lease_lost",
            LedgerError::Superseded { .. } => "superseded",
            LedgerError::Corrupt { .. } => "ledger_corrupt",
            LedgerError::HoldChanged { .. } => "hold_changed",
            LedgerError::InvalidInput { .. } => "invalid_input",
            LedgerError::TicketNotFound { .. } => "ticket_not_found",
            LedgerError::TicketCorrupt { .. } => "ticket_corrupt",
            LedgerError::AuditLeaseLost { .. } => "audit_lease_lost",
            LedgerError::AuditRunNotFound { .. } => "audit_run_not_found",
        }
    }
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;
