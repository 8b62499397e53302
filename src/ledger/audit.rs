//! The reconciliation audit's durable state (schema version 11): one row per run in `audit_runs` (its window,
//! its lease, each side's cursor and done flag, the result) and the orders read so far in `audit_orders`.
//!
//! A page of orders and the cursor after it are written in one transaction, fenced by the run's lease, so an
//! audit restarted after a crash resumes from the last committed page and never counts a page twice; a
//! replica whose lease lapsed and was taken over gets [`super::LedgerError::AuditLeaseLost`] and stops. At
//! most one run per flow is running at a time (a partial unique index), so two replicas asked to start one
//! at once end up on the same run. The stored orders serve only the comparison: finishing a run deletes them
//! and keeps its result.
//!
//! The comparison streams the stored orders in external-id order through [`crate::audit::compare`], so memory
//! stays bounded by one external id's orders, not by the window. It owns no explaining and no ticket: the
//! driver (`crate::audit::run`) does that.

use serde_json::Value;

use super::RecordState;
use crate::connectors::queries::AuditedOrder;

/// Which system a row was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuditSide {
    /// The CRM's closed deals.
    Crm,
    /// The ERP's orders.
    Erp,
}

impl AuditSide {
    pub const BOTH: [AuditSide; 2] = [AuditSide::Crm, AuditSide::Erp];

    /// Stable label, used in the ledger, metrics and messages.
    pub fn label(self) -> &'static str {
        match self {
            AuditSide::Crm => "crm",
            AuditSide::Erp => "erp",
        }
    }

    pub fn parse(s: &str) -> Option<AuditSide> {
        AuditSide::BOTH.into_iter().find(|side| side.label() == s)
    }
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditRunState {
    /// Reading or comparing; resumable by whoever holds (or next takes) the lease.
    Running,
    /// The result is stored and the orders are gone.
    Finished,
}

impl AuditRunState {
    pub fn label(self) -> &'static str {
        match self {
            AuditRunState::Running => "running",
            AuditRunState::Finished => "finished",
        }
    }

    pub fn parse(s: &str) -> Option<AuditRunState> {
        [AuditRunState::Running, AuditRunState::Finished]
            .into_iter()
            .find(|state| state.label() == s)
    }
}

/// One side's progress in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditSideProgress {
    /// The cursor of the next page to read (`None`: the first page, or none left once `done`).
    pub cursor: Option<String>,
    /// Every page of the side is stored.
    pub done: bool,
    /// Pages and orders stored so far.
    pub pages: i64,
    pub orders: i64,
}

/// One audit run as the ledger keeps it. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRun {
    pub id: i64,
    pub window_from: i64,
    pub window_to: i64,
    pub state: AuditRunState,
    /// The worker that holds (or last held) the lease, and until when.
    pub owner: Option<String>,
    pub lease_until: Option<i64>,
    pub crm: AuditSideProgress,
    pub erp: AuditSideProgress,
    /// The result (a `FlowAuditStatus` as JSON) once finished.
    pub result: Option<Value>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

impl AuditRun {
    pub fn side(&self, side: AuditSide) -> &AuditSideProgress {
        match side {
            AuditSide::Crm => &self.crm,
            AuditSide::Erp => &self.erp,
        }
    }
}

/// What the ledger knows about the record behind one source key (the CRM record's id), as the audit's
/// explanations need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecordFacts {
    pub source_key: String,
    pub state: RecordState,
    pub dead_letter_reason: Option<String>,
    pub hold_rule: Option<String>,
    /// The source payload of the ledger's newest revision (what was, or will be, delivered); `None` once
    /// the delivered retention reduced the record to its compact row.
    pub payload: Option<String>,
}

/// Checks a page before it is stored: an empty external id or currency, or an unparseable row, cannot be
/// compared, so it is refused naming the row (the query's parser should never produce one).
pub(crate) fn check_page(
    flow: &str,
    side: AuditSide,
    orders: &[AuditedOrder],
) -> super::Result<()> {
    for (i, order) in orders.iter().enumerate() {
        if order.external_id.is_empty() || order.currency.trim().is_empty() {
            return Err(super::LedgerError::InvalidInput {
                flow: flow.to_string(),
                what: format!(
                    "audit page of the {} side, order {i}: external id {:?} and currency {:?} must not be empty",
                    side.label(),
                    order.external_id,
                    order.currency
                ),
            });
        }
    }
    Ok(())
}

/// The columns of a run, in the order both backends read them.
pub(crate) const RUN_COLUMNS: &str = "id, window_from, window_to, state, owner, lease_until, \
    crm_cursor, crm_done, crm_pages, crm_orders, erp_cursor, erp_done, erp_pages, erp_orders, result, \
    started_at, finished_at";

/// How many source keys one facts query asks for (kept under SQLite's parameter limit).
pub const AUDIT_FACTS_CHUNK: usize = 500;

/// Finished runs kept per flow; older ones are deleted by the retention's purge.
pub const AUDIT_RUNS_KEPT: i64 = 50;

/// A run's row as both backends read it (in [`RUN_COLUMNS`] order).
pub(crate) struct RunRow {
    pub id: i64,
    pub window_from: i64,
    pub window_to: i64,
    pub state: String,
    pub owner: Option<String>,
    pub lease_until: Option<i64>,
    pub crm_cursor: Option<String>,
    pub crm_done: i64,
    pub crm_pages: i64,
    pub crm_orders: i64,
    pub erp_cursor: Option<String>,
    pub erp_done: i64,
    pub erp_pages: i64,
    pub erp_orders: i64,
    pub result: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

impl RunRow {
    pub(crate) fn into_run(self, flow: &str) -> super::Result<AuditRun> {
        let corrupt = |what: &'static str, detail: String| super::LedgerError::Corrupt {
            flow: flow.to_string(),
            record: super::RecordId(0),
            what,
            detail: format!("audit run {}: {detail}", self.id),
        };
        let state = AuditRunState::parse(&self.state)
            .ok_or_else(|| corrupt("audit run state", format!("unknown state {:?}", self.state)))?;
        let result = match &self.result {
            Some(text) => Some(
                serde_json::from_str(text)
                    .map_err(|e| corrupt("audit run result", e.to_string()))?,
            ),
            None => None,
        };
        Ok(AuditRun {
            id: self.id,
            window_from: self.window_from,
            window_to: self.window_to,
            state,
            owner: self.owner,
            lease_until: self.lease_until,
            crm: AuditSideProgress {
                cursor: self.crm_cursor,
                done: self.crm_done != 0,
                pages: self.crm_pages,
                orders: self.crm_orders,
            },
            erp: AuditSideProgress {
                cursor: self.erp_cursor,
                done: self.erp_done != 0,
                pages: self.erp_pages,
                orders: self.erp_orders,
            },
            result,
            started_at: self.started_at,
            finished_at: self.finished_at,
        })
    }
}

/// Why a fenced write of run `id` changed nothing, from what the run's row says now (`None`: no such run).
pub(crate) fn refused_write(
    flow: &str,
    id: i64,
    owner: &str,
    now: Option<(String, Option<String>, bool)>,
    side: Option<AuditSide>,
) -> super::LedgerError {
    match now {
        None => super::LedgerError::AuditRunNotFound {
            flow: flow.to_string(),
            run: id,
        },
        Some((state, _, _)) if state != AuditRunState::Running.label() => {
            super::LedgerError::InvalidInput {
                flow: flow.to_string(),
                what: format!("audit run {id} is {state}; nothing more can be written to it"),
            }
        }
        Some((_, holder, _)) if holder.as_deref() != Some(owner) => {
            super::LedgerError::AuditLeaseLost {
                flow: flow.to_string(),
                run: id,
                owner: owner.to_string(),
                holder: holder.unwrap_or_else(|| "nobody".into()),
            }
        }
        Some(_) => super::LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!(
                "audit run {id}: the {} side is already read in full; a further page is refused",
                side.map_or("", AuditSide::label)
            ),
        },
    }
}

/// Parses a stored amount.
pub(crate) fn stored_amount(
    flow: &str,
    run: i64,
    text: &str,
) -> super::Result<rust_decimal::Decimal> {
    text.parse().map_err(|e| super::LedgerError::Corrupt {
        flow: flow.to_string(),
        record: super::RecordId(0),
        what: "audit order amount",
        detail: format!("audit run {run}: amount {text:?}: {e}"),
    })
}

/// Keeps the newest record's facts per source key (rows come in record-id order).
pub(crate) fn newest_per_key(rows: Vec<AuditRecordFacts>) -> Vec<AuditRecordFacts> {
    let mut by_key: std::collections::HashMap<String, AuditRecordFacts> =
        std::collections::HashMap::new();
    for row in rows {
        by_key.insert(row.source_key.clone(), row);
    }
    let mut out: Vec<AuditRecordFacts> = by_key.into_values().collect();
    out.sort_by(|a, b| a.source_key.cmp(&b.source_key));
    out
}

pub(crate) fn check_facts_request(flow: &str, keys: &[String]) -> super::Result<()> {
    if keys.len() > AUDIT_FACTS_CHUNK {
        return Err(super::LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!(
                "audit facts of {} source keys asked at once; at most {AUDIT_FACTS_CHUNK}",
                keys.len()
            ),
        });
    }
    Ok(())
}
