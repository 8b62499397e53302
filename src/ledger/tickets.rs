//! The ledger's side of tickets (issue #16): one row per flow and cause in `tickets`, the per-sink delivery
//! state in `ticket_deliveries` (the outbox), and the per-owner sums in `ticket_times` that make the
//! time-to-acknowledge and time-to-resolve measures exact. Schema version 8.
//!
//! This module holds what both backends share and that needs no database: the row as stored, the
//! transitions of a ticket (an occurrence, a reopen, an assignment, an acknowledgement, a resolution) as
//! functions from the old row to the new one plus the per-owner sums they add, and the bounds on what a
//! ticket carries. Each backend loads a row under a lock, applies one of these, and stores the result, in
//! the transaction that made the change: a ticket is exactly as durable as the dead letter it reports.
//!
//! The ledger does not know the flow's namespace, so the fingerprints it computes hash namespace `""`;
//! tickets are keyed by (flow, fingerprint), which is unique within a ledger. A sender that needs a key
//! unique across namespaces (a PagerDuty `dedup_key`) combines the namespace with the fingerprint itself.
//!
//! It does not route, escalate or send anything: that is `crate::tickets`' dispatcher, which calls the
//! [`crate::ledger::Ledger`] ticket methods.

use serde_json::Value;

use super::{LedgerError, Outcome, Result, TicketAssignment, TicketRecord, to_time};
use crate::api::{ErrorClass, OwnerRole};
use crate::tickets::{self, Example, ExceptionKind, TicketState};

/// The most examples a ticket keeps (newest first).
pub const TICKET_EXAMPLES: usize = 5;

/// The longest text one example field (a message, an ERP response) or a summary keeps, in bytes.
pub const TICKET_TEXT_BYTES: usize = 4096;

/// The largest payload snapshot an example keeps, in bytes of JSON; a larger one is replaced by a marker.
pub const TICKET_SNAPSHOT_BYTES: usize = 16 * 1024;

/// The most tickets or deliveries one read returns.
pub const MAX_TICKETS_PER_READ: usize = 1000;

/// How long a begun delivery keeps its (ticket, sink) from being due again. A sender that dies mid-send
/// leaves the delivery in doubt; after this it is due again, flagged `in_doubt`, so another sender can look
/// before it sends. Without it two dispatchers (two PostgreSQL replicas) could both send one version.
pub const TICKET_SEND_LEASE_MS: i64 = 60_000;

/// The columns of a [`TicketRow`], in its field order.
pub(crate) const TICKET_COLUMNS: &str = "fingerprint, kind, class, reason, rule, summary, state, \
    count, outstanding, opened_at, updated_at, acknowledged_at, acknowledged_by, resolved_at, reopened, \
    examples, role, owner, sinks, escalation_step, page, version, measured_owner";

/// A `tickets` row as both backends store it (integers are 64-bit, JSON is text, booleans are 0/1).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub(crate) struct TicketRow {
    pub fingerprint: String,
    pub kind: String,
    pub class: Option<String>,
    pub reason: String,
    pub rule: Option<String>,
    pub summary: String,
    pub state: String,
    pub count: i64,
    pub outstanding: i64,
    pub opened_at: i64,
    pub updated_at: i64,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<i64>,
    pub reopened: i64,
    /// JSON array of [`Example`], newest first.
    pub examples: String,
    pub role: Option<String>,
    pub owner: Option<String>,
    /// JSON array of sink names.
    pub sinks: Option<String>,
    pub escalation_step: i64,
    pub page: i64,
    pub version: i64,
    /// The owner the current occurrence's `opened` was counted for (in `ticket_times`), so an occurrence is
    /// counted once however often it is reassigned; cleared when a resolved ticket reopens.
    pub measured_owner: Option<String>,
}

/// What one change adds to an owner's row of `ticket_times`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TimesDelta {
    pub owner: String,
    pub opened: i64,
    pub acknowledged: i64,
    pub resolved: i64,
    pub acknowledge_ms: i64,
    pub resolve_ms: i64,
}

/// A cause as a completion or a raise names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cause {
    pub kind: ExceptionKind,
    pub class: Option<ErrorClass>,
    pub reason: String,
    pub rule: Option<String>,
    pub summary: String,
}

impl Cause {
    pub(crate) fn fingerprint(&self, flow: &str) -> String {
        tickets::fingerprint("", flow, self.kind, self.class, &self.reason)
    }

    /// The cause behind a completion's outcome: a dead letter's reason, a hold's rule. None for the rest.
    pub(crate) fn of_outcome(outcome: &Outcome) -> Option<Cause> {
        match outcome {
            Outcome::DeadLettered { reason, class, .. } => Some(Cause {
                kind: ExceptionKind::DeadLetter,
                class: Some(*class),
                rule: rule_of_reason(reason),
                summary: truncate(
                    &format!("records dead-lettered: {reason}"),
                    TICKET_TEXT_BYTES,
                ),
                reason: truncate(reason, TICKET_TEXT_BYTES),
            }),
            Outcome::Held { rule, role, .. } => Some(Cause {
                kind: ExceptionKind::Hold,
                class: Some(ErrorClass::Hold),
                reason: truncate(&format!("hold:{rule}"), TICKET_TEXT_BYTES),
                rule: Some(rule.clone()),
                summary: truncate(
                    &format!("records held by rule {rule}, waiting for approval by {role}"),
                    TICKET_TEXT_BYTES,
                ),
            }),
            _ => None,
        }
    }

    /// A held record that a person rejected: a dead letter of its own cause, so it is neither lost in the
    /// hold's ticket (which it leaves) nor mixed with the ERP's rejections. The key names the rule, not the
    /// person's free-text reason, so the rejections of one rule share a ticket.
    pub(crate) fn rejected_hold(rule: Option<&str>) -> Cause {
        let rule = rule.unwrap_or("unknown");
        Cause {
            kind: ExceptionKind::DeadLetter,
            class: Some(ErrorClass::Hold),
            reason: truncate(&format!("hold_rejected:{rule}"), TICKET_TEXT_BYTES),
            rule: Some(rule.to_string()),
            summary: truncate(
                &format!("held records rejected by an approver (rule {rule})"),
                TICKET_TEXT_BYTES,
            ),
        }
    }
}

/// The contract rule behind a dead letter's reason key: the pipeline writes `contract:<code>:rule:<name>`
/// for a rule's rejection (`contract:<code>:field:<path>` and others for the rest, which name no rule).
pub(crate) fn rule_of_reason(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix("contract:")?;
    let (_code, subject) = rest.split_once(':')?;
    let name = subject.strip_prefix("rule:")?;
    (!name.is_empty()).then(|| name.to_string())
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One example for a ticket, with every text bounded. `snapshot` is the stored JSON text (already redacted by
/// the worker); a snapshot over [`TICKET_SNAPSHOT_BYTES`] becomes a marker, never a cut (and invalid) JSON.
pub(crate) fn example(
    record: i64,
    correlation_id: &str,
    source_key: &str,
    at: i64,
    message: Option<&str>,
    erp_response: Option<&str>,
    snapshot: Option<&Value>,
) -> Example {
    let snapshot = snapshot.map(|s| {
        let size = s.to_string().len();
        if size > TICKET_SNAPSHOT_BYTES {
            serde_json::json!({"truncated": true, "bytes": size})
        } else {
            s.clone()
        }
    });
    Example {
        record,
        correlation_id: truncate(correlation_id, TICKET_TEXT_BYTES),
        source_key: truncate(source_key, TICKET_TEXT_BYTES),
        at: to_time(at),
        message: message.map(|m| truncate(m, TICKET_TEXT_BYTES)),
        erp_response: erp_response.map(|r| truncate(r, TICKET_TEXT_BYTES)),
        snapshot,
    }
}

/// The example a completion adds to its ticket.
pub(crate) fn example_of(
    outcome: &Outcome,
    record: i64,
    correlation_id: &str,
    source_key: &str,
    now: i64,
) -> Option<Example> {
    match outcome {
        Outcome::DeadLettered {
            reason,
            erp_response,
            snapshot,
            ..
        } => Some(example(
            record,
            correlation_id,
            source_key,
            now,
            Some(reason),
            erp_response.as_deref(),
            snapshot.as_ref(),
        )),
        Outcome::Held {
            rule,
            role,
            snapshot,
        } => Some(example(
            record,
            correlation_id,
            source_key,
            now,
            Some(&format!("held by rule {rule} for {role}")),
            None,
            snapshot.as_ref(),
        )),
        _ => None,
    }
}

fn corrupt(flow: &str, fingerprint: &str, what: &'static str, detail: String) -> LedgerError {
    LedgerError::TicketCorrupt {
        flow: flow.to_string(),
        fingerprint: fingerprint.to_string(),
        what,
        detail,
    }
}

fn examples_of(flow: &str, row: &TicketRow) -> Result<Vec<Example>> {
    serde_json::from_str(&row.examples)
        .map_err(|e| corrupt(flow, &row.fingerprint, "examples", e.to_string()))
}

/// `new` (newest first) in front of the row's examples, cut to [`TICKET_EXAMPLES`].
fn prepend_examples(flow: &str, row: &TicketRow, new: Vec<Example>) -> Result<String> {
    let mut examples = new;
    examples.truncate(TICKET_EXAMPLES);
    if examples.len() < TICKET_EXAMPLES && !row.examples.is_empty() {
        let old = examples_of(flow, row)?;
        let room = TICKET_EXAMPLES - examples.len();
        examples.extend(old.into_iter().take(room));
    }
    Ok(serde_json::to_string(&examples).unwrap_or_else(|_| "[]".to_string()))
}

fn is_resolved(row: &TicketRow) -> bool {
    row.state == TicketState::Resolved.label()
}

/// `n` more occurrences of `cause` (`examples` newest first), with `outstanding` as now counted: opens the
/// ticket, counts on an open one, or reopens a resolved one as a new occurrence (opened now, acknowledgement
/// and escalation cleared; the finished occurrence's times are already in `ticket_times`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn occur(
    flow: &str,
    existing: Option<TicketRow>,
    fingerprint: &str,
    cause: &Cause,
    n: u64,
    examples: Vec<Example>,
    outstanding: i64,
    now: i64,
) -> Result<(TicketRow, Vec<TimesDelta>)> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let Some(mut row) = existing else {
        let mut row = TicketRow {
            fingerprint: fingerprint.to_string(),
            kind: cause.kind.label().to_string(),
            class: cause.class.map(|c| c.label().to_string()),
            reason: cause.reason.clone(),
            rule: cause.rule.clone(),
            summary: cause.summary.clone(),
            state: TicketState::Open.label().to_string(),
            count: n,
            outstanding,
            opened_at: now,
            updated_at: now,
            acknowledged_at: None,
            acknowledged_by: None,
            resolved_at: None,
            reopened: 0,
            examples: String::new(),
            role: None,
            owner: None,
            sinks: None,
            escalation_step: 0,
            page: 0,
            version: 1,
            measured_owner: None,
        };
        row.examples = prepend_examples(flow, &row, examples)?;
        return Ok((row, Vec::new()));
    };
    let mut times = Vec::new();
    row.examples = prepend_examples(flow, &row, examples)?;
    if is_resolved(&row) {
        row.state = TicketState::Open.label().to_string();
        row.count = n;
        row.opened_at = now;
        row.acknowledged_at = None;
        row.acknowledged_by = None;
        row.resolved_at = None;
        row.escalation_step = 0;
        row.reopened += 1;
        // The new occurrence counts as opened for the owner it is still assigned to; the dispatcher may
        // reassign it (escalation starts again at step 0), which does not count it twice.
        row.measured_owner = row.owner.clone();
        if let Some(owner) = &row.owner {
            times.push(TimesDelta {
                owner: owner.clone(),
                opened: 1,
                ..TimesDelta::default()
            });
        }
    } else {
        row.count = row.count.saturating_add(n);
    }
    row.outstanding = outstanding;
    row.summary = cause.summary.clone();
    row.updated_at = now;
    row.version += 1;
    Ok((row, times))
}

/// Resolves the ticket (the cause cleared); `None` when it already was.
pub(crate) fn resolve(mut row: TicketRow, now: i64) -> Option<(TicketRow, Vec<TimesDelta>)> {
    if is_resolved(&row) {
        return None;
    }
    let times = vec![TimesDelta {
        owner: row.owner.clone().unwrap_or_default(),
        resolved: 1,
        resolve_ms: (now - row.opened_at).max(0),
        ..TimesDelta::default()
    }];
    row.state = TicketState::Resolved.label().to_string();
    row.resolved_at = Some(now);
    row.outstanding = 0;
    row.updated_at = now;
    row.version += 1;
    Some((row, times))
}

/// Refreshes a dead letter's or hold's `outstanding` from the records attached to it, resolving it at 0.
/// `None` when nothing changed (no version bump, so the sinks are not sent the same ticket again).
pub(crate) fn settle(
    mut row: TicketRow,
    outstanding: i64,
    now: i64,
) -> Option<(TicketRow, Vec<TimesDelta>)> {
    if outstanding == 0 {
        return resolve(row, now);
    }
    if row.outstanding == outstanding || is_resolved(&row) {
        return None;
    }
    row.outstanding = outstanding;
    row.updated_at = now;
    row.version += 1;
    Some((row, Vec::new()))
}

fn sinks_text(sinks: &[String]) -> String {
    serde_json::to_string(sinks).unwrap_or_else(|_| "[]".to_string())
}

/// Gives the ticket to an owner and sinks; `None` when the assignment is what it already was.
pub(crate) fn assign(
    mut row: TicketRow,
    a: &TicketAssignment,
    now: i64,
) -> Option<(TicketRow, Vec<TimesDelta>)> {
    let role = Some(a.role.as_str().to_string());
    let owner = Some(a.owner.clone());
    let sinks = Some(sinks_text(&a.sinks));
    let step = i64::from(a.escalation_step);
    let page = i64::from(a.page);
    if row.role == role
        && row.owner == owner
        && row.sinks == sinks
        && row.escalation_step == step
        && row.page == page
    {
        return None;
    }
    let mut times = Vec::new();
    if row.measured_owner.is_none() && !is_resolved(&row) {
        times.push(TimesDelta {
            owner: a.owner.clone(),
            opened: 1,
            ..TimesDelta::default()
        });
        row.measured_owner = owner.clone();
    }
    (row.role, row.owner, row.sinks) = (role, owner, sinks);
    (row.escalation_step, row.page) = (step, page);
    row.updated_at = now;
    row.version += 1;
    Some((row, times))
}

/// An owner acknowledged an open ticket; `None` unless it was open.
pub(crate) fn acknowledge(
    mut row: TicketRow,
    by: &str,
    now: i64,
) -> Option<(TicketRow, Vec<TimesDelta>)> {
    if row.state != TicketState::Open.label() {
        return None;
    }
    let times = vec![TimesDelta {
        owner: row.owner.clone().unwrap_or_default(),
        acknowledged: 1,
        acknowledge_ms: (now - row.opened_at).max(0),
        ..TimesDelta::default()
    }];
    row.state = TicketState::Acknowledged.label().to_string();
    row.acknowledged_at = Some(now);
    row.acknowledged_by = Some(truncate(by, TICKET_TEXT_BYTES));
    row.updated_at = now;
    row.version += 1;
    Some((row, times))
}

/// The sink names of a row's assignment.
pub(crate) fn sinks_of(flow: &str, row: &TicketRow) -> Result<Vec<String>> {
    match &row.sinks {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| corrupt(flow, &row.fingerprint, "sinks", e.to_string())),
    }
}

impl TicketRow {
    pub(crate) fn into_record(self, flow: &str) -> Result<TicketRecord> {
        let fp = self.fingerprint.clone();
        let kind = ExceptionKind::parse(&self.kind)
            .ok_or_else(|| corrupt(flow, &fp, "kind", format!("unknown kind {:?}", self.kind)))?;
        let state = TicketState::parse(&self.state).ok_or_else(|| {
            corrupt(
                flow,
                &fp,
                "state",
                format!("unknown state {:?}", self.state),
            )
        })?;
        let class =
            match &self.class {
                None => None,
                Some(label) => Some(super::error_class_from_label(label).ok_or_else(|| {
                    corrupt(flow, &fp, "class", format!("unknown class {label:?}"))
                })?),
            };
        let examples = if self.examples.is_empty() {
            Vec::new()
        } else {
            examples_of(flow, &self)?
        };
        let assignment = match (&self.role, &self.owner) {
            (Some(role), Some(owner)) => Some(TicketAssignment {
                role: OwnerRole::ALL
                    .into_iter()
                    .find(|r| r.as_str() == role)
                    .ok_or_else(|| corrupt(flow, &fp, "role", format!("unknown role {role:?}")))?,
                owner: owner.clone(),
                sinks: sinks_of(flow, &self)?,
                escalation_step: u32::try_from(self.escalation_step).unwrap_or(0),
                page: self.page != 0,
            }),
            _ => None,
        };
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(TicketRecord {
            kind,
            class,
            state,
            examples,
            assignment,
            count: count(self.count),
            outstanding: count(self.outstanding),
            opened_at: to_time(self.opened_at),
            updated_at: to_time(self.updated_at),
            acknowledged_at: self.acknowledged_at.map(to_time),
            acknowledged_by: self.acknowledged_by,
            resolved_at: self.resolved_at.map(to_time),
            reopened: count(self.reopened),
            version: self.version,
            fingerprint: self.fingerprint,
            reason: self.reason,
            rule: self.rule,
            summary: self.summary,
        })
    }
}

/// Refuses a read of no rows and caps a large one at [`MAX_TICKETS_PER_READ`].
pub(crate) fn read_limit(limit: usize) -> i64 {
    limit.clamp(1, MAX_TICKETS_PER_READ) as i64
}

/// Checks a raised exception: a reason key is what makes one ticket per cause, so an empty one is refused.
pub(crate) fn check_raised(flow: &str, e: &super::RaisedException) -> Result<Cause> {
    if e.reason.trim().is_empty() {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!(
                "raise_exception: reason: a {} exception needs a reason key (e.g. breaker_open), not an \
                 empty one",
                e.kind.label()
            ),
        });
    }
    Ok(Cause {
        kind: e.kind,
        class: e.class,
        reason: truncate(&e.reason, TICKET_TEXT_BYTES),
        rule: e.rule.as_ref().map(|r| truncate(r, TICKET_TEXT_BYTES)),
        summary: truncate(&e.summary, TICKET_TEXT_BYTES),
    })
}

/// An acknowledgement names who acknowledged.
pub(crate) fn check_acknowledger(flow: &str, by: &str) -> Result<()> {
    if by.trim().is_empty() {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: "acknowledge_ticket: by: an acknowledgement names the person who made it, not an empty \
                   name"
                .to_string(),
        });
    }
    Ok(())
}

/// Checks an assignment's texts before they are stored.
pub(crate) fn check_assignment(flow: &str, a: &TicketAssignment) -> Result<()> {
    let bad = if a.owner.trim().is_empty() {
        Some("owner: a ticket is assigned to a named owner, not an empty one".to_string())
    } else if let Some(sink) = a.sinks.iter().find(|s| s.trim().is_empty()) {
        Some(format!("sinks: a sink needs a name (got {sink:?})"))
    } else if a.sinks.len() > 64 {
        Some(format!(
            "sinks: at most 64 sinks per ticket, got {}",
            a.sinks.len()
        ))
    } else {
        None
    };
    match bad {
        Some(what) => Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!("assign_ticket: {what}"),
        }),
        None => Ok(()),
    }
}

/// One `ticket_deliveries` row with its ticket's version and sinks, for the health read.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DeliveryHealthRow {
    pub sink: String,
    pub delivered_version: i64,
    pub version: i64,
    pub attempts: i64,
    pub failing_since: Option<i64>,
    pub last_error: Option<String>,
    pub sinks: Option<String>,
    /// The status of the delivery's unanswered refusal, 0 for none.
    pub refused: i64,
}

/// Sums the delivery rows per sink (only the sinks a ticket is still assigned to count as pending).
pub(crate) fn sink_health(rows: Vec<DeliveryHealthRow>) -> Vec<super::TicketSinkHealth> {
    let mut by_sink: std::collections::BTreeMap<String, (super::TicketSinkHealth, (bool, i64))> =
        Default::default();
    for row in rows {
        let entry = by_sink.entry(row.sink.clone()).or_insert_with(|| {
            (
                super::TicketSinkHealth {
                    sink: row.sink.clone(),
                    pending: 0,
                    consecutive_failures: 0,
                    failing_since: None,
                    last_error: None,
                    refused: None,
                },
                (false, i64::MIN),
            )
        });
        let assigned = row
            .sinks
            .as_deref()
            .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
            .is_some_and(|sinks| sinks.contains(&row.sink));
        if assigned && row.delivered_version < row.version {
            entry.0.pending += 1;
        }
        // Summed over the sink's tickets, not the worst one's: a sink that refuses every ticket once (a 4xx
        // waits minutes before its retry) is as broken as one that refused one ticket three times, and must
        // be reported as soon. A success resets its delivery's attempts, so only unanswered failures count.
        let attempts = u32::try_from(row.attempts).unwrap_or(u32::MAX);
        entry.0.consecutive_failures = entry.0.consecutive_failures.saturating_add(attempts);
        let refused = u16::try_from(row.refused).ok().filter(|s| *s > 0);
        if refused.is_some() && entry.0.refused.is_none() {
            entry.0.refused = refused;
        }
        if let Some(since) = row.failing_since {
            let since = to_time(since);
            entry.0.failing_since = Some(entry.0.failing_since.map_or(since, |s| s.min(since)));
            // The error that tells why the sink is failing: a refusal's (it needs a person), else that of the
            // delivery failing longest.
            let rank = (refused.is_some(), row.attempts);
            if rank > entry.1 {
                entry.1 = rank;
                entry.0.last_error = row.last_error.clone();
            }
        }
    }
    by_sink.into_values().map(|(health, _)| health).collect()
}

/// A `ticket_times` row with the owner's open tickets.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TimesRow {
    pub owner: String,
    pub opened: i64,
    pub acknowledged: i64,
    pub resolved: i64,
    pub acknowledge_ms: i64,
    pub resolve_ms: i64,
    pub open: i64,
}

pub(crate) fn measures(rows: Vec<TimesRow>) -> Vec<super::OwnerTicketMeasures> {
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    let mean = |sum: i64, n: i64| (n > 0).then(|| sum as f64 / n as f64 / 1000.0);
    rows.into_iter()
        .map(|r| super::OwnerTicketMeasures {
            opened: count(r.opened),
            acknowledged: count(r.acknowledged),
            resolved: count(r.resolved),
            open: count(r.open),
            mean_time_to_acknowledge_seconds: mean(r.acknowledge_ms, r.acknowledged),
            mean_time_to_resolve_seconds: mean(r.resolve_ms, r.resolved),
            owner: r.owner,
        })
        .collect()
}

/// The per-owner measures read, the same text on both backends: the kept sums, and the owners' open
/// tickets (an owner with open tickets and no sums yet still shows).
pub(crate) fn measures_query(p: fn(usize) -> String) -> String {
    format!(
        "SELECT owner, CAST(SUM(opened) AS BIGINT) AS opened, CAST(SUM(acknowledged) AS BIGINT) AS acknowledged, \
         CAST(SUM(resolved) AS BIGINT) AS resolved, CAST(SUM(acknowledge_ms) AS BIGINT) AS acknowledge_ms, \
         CAST(SUM(resolve_ms) AS BIGINT) AS resolve_ms, CAST(SUM(open) AS BIGINT) AS open FROM ( \
           SELECT owner, opened, acknowledged, resolved, acknowledge_ms, resolve_ms, 0 AS open \
           FROM ticket_times WHERE flow = {f} \
           UNION ALL \
           SELECT owner, 0, 0, 0, 0, 0, 1 FROM tickets \
           WHERE flow = {f} AND owner IS NOT NULL AND state <> 'resolved' \
         ) AS m GROUP BY owner ORDER BY owner",
        f = p(1)
    )
}

/// The flow-wide sums, one row.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct FlowTimesRow {
    pub opened: i64,
    pub acknowledged: i64,
    pub resolved: i64,
    pub acknowledge_ms: i64,
    pub resolve_ms: i64,
    pub open: i64,
    pub acknowledged_now: i64,
}

pub(crate) fn flow_measures(r: FlowTimesRow) -> super::FlowTicketMeasures {
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    let mean = |sum: i64, n: i64| (n > 0).then(|| sum as f64 / n as f64 / 1000.0);
    super::FlowTicketMeasures {
        opened: count(r.opened),
        acknowledged: count(r.acknowledged),
        resolved: count(r.resolved),
        open: count(r.open),
        acknowledged_now: count(r.acknowledged_now),
        mean_time_to_acknowledge_seconds: mean(r.acknowledge_ms, r.acknowledged),
        mean_time_to_resolve_seconds: mean(r.resolve_ms, r.resolved),
    }
}

/// The flow-wide measures read, the same text on both backends. Every acknowledgement and resolution adds
/// its time to exactly one owner's row of `ticket_times` (`""` when nobody was assigned), so the sums over
/// all rows are the flow's, exactly; occurrences are counted from the tickets themselves (1 + reopenings)
/// plus those of purged tickets. Parameter: flow.
pub(crate) fn flow_measures_query(p: fn(usize) -> String) -> String {
    format!(
        "SELECT CAST((SELECT COALESCE(SUM(1 + reopened), 0) FROM tickets WHERE flow = {f}) \
           + (SELECT COALESCE(SUM(value), 0) FROM ledger_counters WHERE flow = {f} AND counter = '{purged}') \
           AS BIGINT) AS opened, \
         CAST(COALESCE(SUM(acknowledged), 0) AS BIGINT) AS acknowledged, \
         CAST(COALESCE(SUM(resolved), 0) AS BIGINT) AS resolved, \
         CAST(COALESCE(SUM(acknowledge_ms), 0) AS BIGINT) AS acknowledge_ms, \
         CAST(COALESCE(SUM(resolve_ms), 0) AS BIGINT) AS resolve_ms, \
         CAST((SELECT COUNT(*) FROM tickets WHERE flow = {f} AND state <> 'resolved') AS BIGINT) AS open, \
         CAST((SELECT COUNT(*) FROM tickets WHERE flow = {f} AND state = 'acknowledged') AS BIGINT) \
           AS acknowledged_now \
         FROM ticket_times WHERE flow = {f}",
        f = p(1),
        purged = super::TICKET_OCCURRENCES_PURGED,
    )
}

/// A backend's numbered parameter: `?n` on SQLite, `$n` on PostgreSQL.
pub(crate) fn sqlite_param(i: usize) -> String {
    format!("?{i}")
}

pub(crate) fn postgres_param(i: usize) -> String {
    format!("${i}")
}

/// The upsert of a whole ticket row: parameters flow, then the [`TICKET_COLUMNS`] in order.
pub(crate) fn ticket_upsert(p: fn(usize) -> String) -> String {
    let columns: Vec<&str> = TICKET_COLUMNS.split(',').map(str::trim).collect();
    let values: Vec<String> = (1..=columns.len() + 1).map(p).collect();
    let sets: Vec<String> = columns
        .iter()
        .skip(1)
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO tickets (flow, {TICKET_COLUMNS}) VALUES ({}) \
         ON CONFLICT (flow, fingerprint) DO UPDATE SET {}",
        values.join(", "),
        sets.join(", ")
    )
}

/// The upsert adding a [`TimesDelta`]: parameters flow, owner, opened, acknowledged, resolved,
/// acknowledge_ms, resolve_ms.
pub(crate) fn times_upsert(p: fn(usize) -> String) -> String {
    format!(
        "INSERT INTO ticket_times (flow, owner, opened, acknowledged, resolved, acknowledge_ms, resolve_ms) \
         VALUES ({}) ON CONFLICT (flow, owner) DO UPDATE SET opened = ticket_times.opened + excluded.opened, \
         acknowledged = ticket_times.acknowledged + excluded.acknowledged, \
         resolved = ticket_times.resolved + excluded.resolved, \
         acknowledge_ms = ticket_times.acknowledge_ms + excluded.acknowledge_ms, \
         resolve_ms = ticket_times.resolve_ms + excluded.resolve_ms",
        (1..=7).map(p).collect::<Vec<_>>().join(", ")
    )
}

/// The outbox read: `assigned` is the backend's test that `d.sink` is among the ticket's `t.sinks` (a JSON
/// array). Parameters: flow, now, limit.
pub(crate) fn due_query(p: fn(usize) -> String, assigned: &str) -> String {
    let columns: Vec<String> = TICKET_COLUMNS
        .split(',')
        .map(|c| format!("t.{}", c.trim()))
        .collect();
    format!(
        "SELECT {}, d.sink AS d_sink, d.sink_ref AS d_sink_ref, d.in_doubt AS d_in_doubt, \
         d.attempts AS d_attempts FROM ticket_deliveries d \
         JOIN tickets t ON t.flow = d.flow AND t.fingerprint = d.fingerprint \
         WHERE d.flow = {flow} AND d.delivered_version < t.version AND d.next_attempt_at <= {now} AND {assigned} \
         ORDER BY t.updated_at, t.fingerprint, d.sink LIMIT {limit}",
        columns.join(", "),
        flow = p(1),
        now = p(2),
        limit = p(3),
    )
}

/// The delivery rows and their tickets' versions, for [`sink_health`]. Parameter: flow.
pub(crate) fn health_query(p: fn(usize) -> String) -> String {
    format!(
        "SELECT d.sink, d.delivered_version, t.version, d.attempts, d.failing_since, d.last_error, t.sinks, \
         d.refused FROM ticket_deliveries d JOIN tickets t ON t.flow = d.flow AND t.fingerprint = d.fingerprint \
         WHERE d.flow = {}",
        p(1)
    )
}

/// The outstanding count of a ticket: a range of the `records_ticket` partial index. Parameters: flow,
/// fingerprint.
pub(crate) fn outstanding_query(p: fn(usize) -> String) -> String {
    format!(
        "SELECT COUNT(*) FROM records WHERE flow = {} AND ticket = {} AND ticket IS NOT NULL",
        p(1),
        p(2)
    )
}

/// The open dead-letter and hold tickets `settle_tickets` looks at, with their attached records counted.
/// Parameters: flow, limit.
pub(crate) fn settle_query(p: fn(usize) -> String) -> String {
    format!(
        "SELECT t.fingerprint, (SELECT COUNT(*) FROM records r WHERE r.flow = t.flow AND r.ticket = t.fingerprint \
         AND r.ticket IS NOT NULL) AS attached FROM tickets t \
         WHERE t.flow = {} AND t.state <> 'resolved' AND t.kind IN ('dead_letter', 'hold') \
         ORDER BY t.updated_at LIMIT {}",
        p(1),
        p(2)
    )
}

/// The resolved tickets [`crate::ledger::Ledger::purge_tickets`] may delete, oldest resolution first, with
/// their occurrences (1 + reopenings). `assigned` is the backend's test that `d.sink` is among `t.sinks`, as
/// in [`due_query`]: a sink the ticket is no longer assigned to is never sent anything, so it holds nothing
/// back. `extra` narrows the candidates further (PostgreSQL rechecks its locked tickets with it).
/// Parameters: flow, cutoff (ms), limit.
pub(crate) fn purgeable_query(p: fn(usize) -> String, assigned: &str, extra: &str) -> String {
    format!(
        "SELECT t.fingerprint, t.reopened FROM tickets t \
         WHERE t.flow = {flow} AND t.state = 'resolved' AND t.resolved_at < {cutoff} {extra} \
         AND NOT EXISTS (SELECT 1 FROM ticket_deliveries d WHERE d.flow = t.flow \
           AND d.fingerprint = t.fingerprint AND d.delivered_version < t.version AND {assigned}) \
         AND NOT EXISTS (SELECT 1 FROM records r WHERE r.flow = t.flow AND r.ticket = t.fingerprint \
           AND r.ticket IS NOT NULL) \
         ORDER BY t.resolved_at, t.fingerprint LIMIT {limit}",
        flow = p(1),
        cutoff = p(2),
        limit = p(3),
    )
}

/// Every (fingerprint, cause, occurrences, examples newest first) of a batch of completions, grouped, in
/// fingerprint order (PostgreSQL takes the tickets' locks in this order, so two batches never deadlock).
pub(crate) type Occurrences = std::collections::BTreeMap<String, (Cause, u64, Vec<Example>)>;

pub(crate) fn add_occurrence(
    occurrences: &mut Occurrences,
    fingerprint: &str,
    cause: &Cause,
    example: Option<Example>,
) {
    let entry = occurrences
        .entry(fingerprint.to_string())
        .or_insert_with(|| (cause.clone(), 0, Vec::new()));
    entry.1 += 1;
    // Later completions of a batch are newer: they go in front.
    if let Some(example) = example {
        entry.2.insert(0, example);
        entry.2.truncate(TICKET_EXAMPLES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(reason: &str) -> Cause {
        Cause {
            kind: ExceptionKind::DeadLetter,
            class: Some(ErrorClass::Permanent),
            reason: reason.into(),
            rule: None,
            summary: format!("records dead-lettered: {reason}"),
        }
    }

    #[test]
    fn a_rule_is_read_from_a_contract_reason_key_only() {
        assert_eq!(
            rule_of_reason("contract:rule_failed:rule:discount_cap").as_deref(),
            Some("discount_cap")
        );
        assert_eq!(rule_of_reason("contract:missing:field:Amount"), None);
        assert_eq!(rule_of_reason("erp:422"), None);
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let text = "é".repeat(3000);
        let cut = truncate(&text, TICKET_TEXT_BYTES);
        assert!(cut.len() <= TICKET_TEXT_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn a_resolved_ticket_reopens_as_a_new_occurrence_for_its_owner() {
        let (row, _) = occur("f", None, "fp", &cause("erp:422"), 2, vec![], 2, 1_000).unwrap();
        let assignment = TicketAssignment {
            role: OwnerRole::SinkOwner,
            owner: "ana".into(),
            sinks: vec!["slack".into()],
            escalation_step: 0,
            page: false,
        };
        let (row, times) = assign(row, &assignment, 2_000).unwrap();
        assert_eq!(times[0].opened, 1);
        assert!(assign(row.clone(), &assignment, 2_500).is_none());
        let (row, times) = resolve(row, 61_000).unwrap();
        assert_eq!(
            (times[0].owner.as_str(), times[0].resolve_ms),
            ("ana", 60_000)
        );
        let (row, times) = occur(
            "f",
            Some(row),
            "fp",
            &cause("erp:422"),
            1,
            vec![],
            1,
            90_000,
        )
        .unwrap();
        assert_eq!(
            (row.state.as_str(), row.reopened, row.count),
            ("open", 1, 1)
        );
        assert_eq!((row.opened_at, row.resolved_at), (90_000, None));
        assert_eq!(times[0].opened, 1);
        assert_eq!(row.version, 4, "opened, assigned, resolved, reopened");
    }

    #[test]
    fn a_sink_refusing_each_of_its_tickets_once_counts_every_refusal() {
        let row = |sink: &str, attempts: i64, failing_since: Option<i64>| DeliveryHealthRow {
            sink: sink.into(),
            delivered_version: 0,
            version: 2,
            attempts,
            failing_since,
            last_error: failing_since.map(|_| "503 Service Unavailable".to_string()),
            sinks: Some(format!("[\"{sink}\"]")),
            refused: 0,
        };
        let health = sink_health(vec![
            row("hook", 1, Some(3_000)),
            row("hook", 1, Some(1_000)),
            row("hook", 1, Some(2_000)),
            // A ticket the sink took since: no failure of its own, and it resets nobody else's.
            row("hook", 0, None),
            row("jira", 2, Some(5_000)),
        ]);
        let hook = health.iter().find(|h| h.sink == "hook").unwrap();
        assert_eq!((hook.consecutive_failures, hook.pending), (3, 4));
        assert_eq!(hook.failing_since, Some(to_time(1_000)));
        assert!(crate::tickets::dispatch::failing(hook));
        let jira = health.iter().find(|h| h.sink == "jira").unwrap();
        assert_eq!(jira.consecutive_failures, 2);
        assert!(!crate::tickets::dispatch::failing(jira));
    }

    #[test]
    fn one_refusal_makes_a_sink_failing_and_its_answer_is_the_one_reported() {
        let row = |attempts: i64, refused: i64, error: &str| DeliveryHealthRow {
            sink: "jira".into(),
            delivered_version: 0,
            version: 2,
            attempts,
            failing_since: Some(1_000),
            last_error: Some(error.into()),
            sinks: Some("[\"jira\"]".into()),
            refused,
        };
        let health = sink_health(vec![
            row(2, 0, "503 Service Unavailable"),
            row(
                1,
                403,
                "403 Forbidden: the token may not create issues in OPS",
            ),
        ]);
        assert_eq!(health[0].refused, Some(403));
        assert_eq!(health[0].consecutive_failures, 3);
        assert_eq!(
            health[0].last_error.as_deref(),
            Some("403 Forbidden: the token may not create issues in OPS")
        );
        let once = sink_health(vec![row(1, 400, "400 Bad Request: no such project")]);
        assert!(crate::tickets::dispatch::failing(&once[0]), "{once:?}");
        // Two 5xx are not yet a failing sink: those may pass.
        let transient = sink_health(vec![row(2, 0, "502 Bad Gateway")]);
        assert!(!crate::tickets::dispatch::failing(&transient[0]));
    }
}
