//! The audit's driver: one durable run in the flow's ledger, read page by page from both sides, compared,
//! explained, reported.
//!
//! **Durable and resumable.** A run is a row in the ledger (see `crate::ledger`'s audit module). Each page
//! and the cursor after it commit in one transaction, so a worker that dies mid-run leaves a run that the
//! next one (or another replica, once the lease lapses) resumes from the last committed page, counting
//! nothing twice. The lease is renewed by every page; a worker that lost it stops at its next write.
//!
//! **Never a false "reconciled".** A page that fails with `RateLimited` (honouring its `retry_after`) or
//! `Unavailable` is retried with bounded exponential backoff, counted in attempts: after
//! [`AuditSettings::max_attempts`] the side counts as unread and the result is `Partial` with the reason.
//! `Refused` and `Malformed` are not retried. Only a run that read both sides in full can be `Reconciled`.
//! A partial run neither opens nor resolves the mismatch ticket: it proves nothing either way.
//!
//! **Tickets.** Unexplained differences open (or update) the flow's one `audit_mismatch` ticket through the
//! ledger's exceptions, which the worker's ticket dispatcher routes and sends like any other; its summary
//! holds counts, totals and the first [`MAX_UNEXPLAINED_IDS`] external ids (CRM ids, no customer data). A
//! later run that reconciles resolves it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::compare::Tally;
use super::explain::{MoneyFields, explain};
use crate::api::{AuditOutcome, FlowAuditStatus};
use crate::connectors::queries::{AuditWindow, OrderPage, OrderQuery, QueryError};
use crate::ledger::{
    AUDIT_FACTS_CHUNK, AuditRun, AuditRunState, AuditSide, Clock, Ledger, LedgerError,
    RaisedException,
};
use crate::tickets::ExceptionKind;

/// How many unexplained ids a result and its ticket list.
pub const MAX_UNEXPLAINED_IDS: usize = 20;

/// The ticket cause's key: one `audit_mismatch` ticket per flow.
pub const AUDIT_MISMATCH_REASON: &str = "audit_mismatch";

/// The window audited when nothing else says: the roster's default, 7 days.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(168 * 3600);

/// A flow's two sides' read clients.
#[derive(Clone)]
pub struct AuditQueries {
    pub crm: Arc<dyn OrderQuery>,
    pub erp: Arc<dyn OrderQuery>,
}

impl std::fmt::Debug for AuditQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditQueries")
            .field("crm", &self.crm.system())
            .field("erp", &self.erp.system())
            .finish()
    }
}

/// How the driver reads and leases.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// This worker's id (the pod name): the run's lease holder.
    pub owner: String,
    /// How long a run stays leased without a page being stored.
    pub lease: Duration,
    /// Attempts per page before a side counts as unread.
    pub max_attempts: u32,
    /// The first retry's wait; doubled per attempt up to `backoff_cap` (a `retry_after` is honoured up to the
    /// cap too).
    pub backoff: Duration,
    pub backoff_cap: Duration,
    /// The least time between two page requests to one side (`1 / maxRequestsPerSecond`).
    pub min_interval: Duration,
    /// Where the CRM's money is in the ledger's stored source payloads.
    pub money: MoneyFields,
}

impl AuditSettings {
    pub fn new(owner: impl Into<String>) -> AuditSettings {
        AuditSettings {
            owner: owner.into(),
            lease: Duration::from_secs(120),
            max_attempts: 6,
            backoff: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            min_interval: Duration::from_millis(200),
            money: MoneyFields::default(),
        }
    }
}

/// Why a run could not be driven to a result. (A side that cannot be read is no error: it is a `Partial`
/// result.)
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("flow {flow}: audit: {source}")]
    Ledger {
        flow: String,
        #[source]
        source: LedgerError,
    },
    /// Another worker holds the run's lease; it is driving the run.
    #[error("flow {flow}: audit run {run} is being run by another worker")]
    Busy { flow: String, run: i64 },
    #[error("flow {flow}: audit run {run} is already finished")]
    Finished { flow: String, run: i64 },
    #[error("flow {flow}: audit window: {reason}")]
    Window { flow: String, reason: String },
}

impl AuditError {
    /// Stable label for metrics and messages.
    pub fn label(&self) -> &'static str {
        match self {
            AuditError::Ledger { source, .. } => source.label(),
            AuditError::Busy { .. } => "audit_busy",
            AuditError::Finished { .. } => "audit_finished",
            AuditError::Window { .. } => "audit_window_invalid",
        }
    }
}

/// The window of length `length` ending at `now`.
pub fn window_ending(now: DateTime<Utc>, length: Duration) -> AuditWindow {
    AuditWindow {
        from: now - chrono::Duration::from_std(length).unwrap_or(chrono::Duration::MAX),
        to: now,
    }
}

/// The result stored with a finished run.
pub fn result_of(run: &AuditRun) -> Option<FlowAuditStatus> {
    run.result
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// RFC 3339 (seconds, UTC) of a ledger time in milliseconds.
pub fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Drives runs of one flow.
pub struct Auditor {
    pub ledger: Arc<dyn Ledger>,
    pub crm: Arc<dyn OrderQuery>,
    pub erp: Arc<dyn OrderQuery>,
    pub clock: Arc<dyn Clock>,
    pub settings: AuditSettings,
}

impl Auditor {
    fn flow(&self) -> String {
        self.ledger.flow().to_string()
    }

    fn ledger_error(&self, source: LedgerError) -> AuditError {
        AuditError::Ledger {
            flow: self.flow(),
            source,
        }
    }

    /// Starts a run over `window`, or joins the running one: its id, and whether this call started it.
    pub async fn start(&self, window: AuditWindow) -> Result<(i64, bool), AuditError> {
        if window.from >= window.to {
            return Err(AuditError::Window {
                flow: self.flow(),
                reason: format!(
                    "from {} is not before to {}",
                    window.from.to_rfc3339(),
                    window.to.to_rfc3339()
                ),
            });
        }
        let (run, started) = self
            .ledger
            .audit_start(
                window.from.timestamp_millis(),
                window.to.timestamp_millis(),
                &self.settings.owner,
                self.settings.lease,
            )
            .await
            .map_err(|e| self.ledger_error(e))?;
        Ok((run.id, started))
    }

    /// Drives run `id` to its result: takes the lease, reads what is left of both sides, compares,
    /// explains, opens or resolves the ticket and finishes the run.
    pub async fn drive(&self, id: i64) -> Result<FlowAuditStatus, AuditError> {
        let run = self
            .ledger
            .audit_lease(id, &self.settings.owner, self.settings.lease)
            .await
            .map_err(|e| self.ledger_error(e))?;
        let Some(run) = run else {
            let now = self
                .ledger
                .audit_run(id)
                .await
                .map_err(|e| self.ledger_error(e))?;
            return Err(match now.map(|r| r.state) {
                Some(AuditRunState::Finished) => AuditError::Finished {
                    flow: self.flow(),
                    run: id,
                },
                _ => AuditError::Busy {
                    flow: self.flow(),
                    run: id,
                },
            });
        };
        let window = AuditWindow {
            from: Utc
                .timestamp_millis_opt(run.window_from)
                .single()
                .unwrap_or_default(),
            to: Utc
                .timestamp_millis_opt(run.window_to)
                .single()
                .unwrap_or_default(),
        };
        let mut partial = Vec::new();
        for side in AuditSide::BOTH {
            if let Some(why) = self.read_side(&run, side, &window).await? {
                partial.push(why);
            }
        }
        // The comparison and the explanations store nothing, so nothing renews the lease while they run:
        // renew it now, so another replica does not take the run over (and raise its ticket twice) meanwhile.
        if self
            .ledger
            .audit_lease(id, &self.settings.owner, self.settings.lease)
            .await
            .map_err(|e| self.ledger_error(e))?
            .is_none()
        {
            return Err(AuditError::Busy {
                flow: self.flow(),
                run: id,
            });
        }
        let tally = self
            .ledger
            .audit_compare(id)
            .await
            .map_err(|e| self.ledger_error(e))?;
        let mut status = self.explain(&run, &window, tally, partial).await?;
        self.report(&mut status).await?;
        status.finished_at = Some(rfc3339(self.clock.now_ms()));
        let result = serde_json::to_value(&status).expect("the status serialises");
        self.ledger
            .audit_finish(id, &self.settings.owner, &result)
            .await
            .map_err(|e| self.ledger_error(e))?;
        Ok(status)
    }

    /// Reads `side` from its stored cursor to the end; `Some(reason)` when it could not be read in full.
    async fn read_side(
        &self,
        run: &AuditRun,
        side: AuditSide,
        window: &AuditWindow,
    ) -> Result<Option<String>, AuditError> {
        let query = match side {
            AuditSide::Crm => &self.crm,
            AuditSide::Erp => &self.erp,
        };
        let progress = run.side(side);
        let (mut cursor, mut done) = (progress.cursor.clone(), progress.done);
        while !done {
            let page = match self.page(query.as_ref(), window, cursor.as_deref()).await {
                Ok(page) => page,
                Err((e, attempts)) => {
                    return Ok(Some(format!(
                        "the {} side ({}) could not be read in full after {attempts} attempt(s): {e}",
                        side.label(),
                        query.system()
                    )));
                }
            };
            // A cursor that does not move would read the same page for ever and count it each time.
            if page.next.is_some() && page.next == cursor {
                return Ok(Some(format!(
                    "the {} side ({}) returned the same cursor twice; stopped reading it",
                    side.label(),
                    query.system()
                )));
            }
            self.ledger
                .audit_page(
                    run.id,
                    &self.settings.owner,
                    side,
                    &page.orders,
                    page.next.as_deref(),
                    self.settings.lease,
                )
                .await
                .map_err(|e| self.ledger_error(e))?;
            done = page.next.is_none();
            cursor = page.next;
        }
        Ok(None)
    }

    /// One page, retried while the error is transient, at most `max_attempts` times. The verdict is the
    /// attempt count; the waits only space the attempts out.
    async fn page(
        &self,
        query: &dyn OrderQuery,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, (QueryError, u32)> {
        let s = &self.settings;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if !s.min_interval.is_zero() {
                tokio::time::sleep(s.min_interval).await;
            }
            let error = match query.page(window, cursor).await {
                Ok(page) => return Ok(page),
                Err(e) => e,
            };
            let wait = match &error {
                QueryError::RateLimited {
                    retry_after: Some(after),
                    ..
                } => *after,
                QueryError::RateLimited { .. } | QueryError::Unavailable { .. } => s
                    .backoff
                    .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1))),
                QueryError::Refused { .. } | QueryError::Malformed { .. } => {
                    return Err((error, attempt));
                }
            };
            if attempt >= s.max_attempts.max(1) {
                return Err((error, attempt));
            }
            tracing::info!(flow = %self.ledger.flow(), system = query.system(), attempt, error = %error, "audit page failed; retrying");
            tokio::time::sleep(wait.min(s.backoff_cap)).await;
        }
    }

    /// Turns the comparison into the status: every difference explained from the ledger or counted.
    async fn explain(
        &self,
        run: &AuditRun,
        window: &AuditWindow,
        tally: Tally,
        partial: Vec<String>,
    ) -> Result<FlowAuditStatus, AuditError> {
        let mut explained: BTreeMap<String, i64> = BTreeMap::new();
        let (mut unexplained, mut unexplained_ids) = (0i64, Vec::new());
        for chunk in tally.differences.chunks(AUDIT_FACTS_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|d| d.external_id.clone()).collect();
            let facts = self
                .ledger
                .audit_facts(&keys)
                .await
                .map_err(|e| self.ledger_error(e))?;
            let facts: HashMap<&str, _> =
                facts.iter().map(|f| (f.source_key.as_str(), f)).collect();
            for difference in chunk {
                let facts = facts.get(difference.external_id.as_str()).copied();
                match explain(difference, facts, &self.settings.money) {
                    Some(why) => *explained.entry(why.label().to_string()).or_default() += 1,
                    None => {
                        unexplained += 1;
                        if unexplained_ids.len() < MAX_UNEXPLAINED_IDS {
                            unexplained_ids.push(difference.external_id.clone());
                        }
                    }
                }
            }
        }
        let outcome = if !partial.is_empty() {
            AuditOutcome::Partial
        } else if unexplained > 0 {
            AuditOutcome::Unexplained
        } else {
            AuditOutcome::Reconciled
        };
        Ok(FlowAuditStatus {
            run: run.id,
            outcome: Some(outcome),
            partial_reason: (!partial.is_empty()).then(|| truncate(&partial.join("; "), 1024)),
            started_at: rfc3339(run.started_at),
            finished_at: None,
            window_from: window
                .from
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            window_to: window.to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            crm: tally.crm.summary(),
            erp: tally.erp.summary(),
            matched: tally.matched,
            explained,
            unexplained,
            unexplained_ids,
            ticket: None,
        })
    }

    /// Opens or updates the mismatch ticket for unexplained differences; resolves it when reconciled.
    async fn report(&self, status: &mut FlowAuditStatus) -> Result<(), AuditError> {
        match status.outcome {
            Some(AuditOutcome::Unexplained) => {
                let fingerprint = self
                    .ledger
                    .raise_exception(RaisedException {
                        kind: ExceptionKind::AuditMismatch,
                        class: None,
                        reason: AUDIT_MISMATCH_REASON.into(),
                        rule: None,
                        summary: ticket_summary(status),
                    })
                    .await
                    .map_err(|e| self.ledger_error(e))?;
                status.ticket = Some(fingerprint);
            }
            Some(AuditOutcome::Reconciled) => {
                let fingerprint = mismatch_fingerprint(self.ledger.flow());
                self.ledger
                    .clear_exception(&fingerprint)
                    .await
                    .map_err(|e| self.ledger_error(e))?;
            }
            Some(AuditOutcome::Partial) | None => {}
        }
        Ok(())
    }
}

/// The fingerprint of a flow's `audit_mismatch` ticket (as the ledger computes it for a raised exception).
pub fn mismatch_fingerprint(flow: &str) -> String {
    crate::tickets::fingerprint(
        "",
        flow,
        ExceptionKind::AuditMismatch,
        None,
        AUDIT_MISMATCH_REASON,
    )
}

/// The ticket's one paragraph: counts, totals and the first unexplained ids. Ids are CRM record ids; no
/// amounts of single deals, no names.
pub fn ticket_summary(status: &FlowAuditStatus) -> String {
    let totals = |t: &BTreeMap<String, String>| {
        if t.is_empty() {
            "nothing".to_string()
        } else {
            t.iter()
                .map(|(c, v)| format!("{c} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let explained: i64 = status.explained.values().sum();
    let more = status.unexplained - status.unexplained_ids.len() as i64;
    truncate(
        &format!(
            "audit run {} ({} to {}): {} difference(s) the ledger does not explain, {explained} explained, \
             {} matched; CRM {} deal(s) totalling {}; ERP {} order(s) totalling {}; unexplained ids: {}{}",
            status.run,
            status.window_from,
            status.window_to,
            status.unexplained,
            status.matched,
            status.crm.count,
            totals(&status.crm.totals),
            status.erp.count,
            totals(&status.erp.totals),
            status.unexplained_ids.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
        crate::ledger::TICKET_TEXT_BYTES,
    )
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
