//! The worker's ticket task: settles tickets whose cause cleared, routes and escalates the open ones per the
//! roster, raises and clears the worker's own flow-level causes (the circuit breaker), and delivers every
//! ticket's current version to its sinks from the ledger's outbox, with retries and backoff.
//!
//! It runs beside the pipeline and shares nothing with it but the ledger, so a ticket sink that is down, slow
//! or refusing never holds up a record. A delivery is marked in doubt in the ledger before it is sent and
//! settled after, so a worker killed in between knows on restart that the sink may already have it (Jira and
//! GitHub then look for their copy and their version's comment instead of adding a second; the webhook's
//! `Idempotency-Key` and PagerDuty's `dedup_key` make a resend harmless; Slack's incoming webhooks cannot, so
//! a Slack resend may post twice, see `sinks::slack`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::route::{self, Cause};
use super::sinks::{Delivery, SinkError, TicketSink};
use super::{ExceptionKind, Ticket, TicketState};
use crate::api::{Assignment, ErrorClass, OwnershipRoster, SyncFlow};
use crate::ledger::{
    Clock, Ledger, RaisedException, TicketAssignment, TicketRecord, TicketSinkHealth,
};

/// The reason key of the worker's own flow-level cause.
pub const BREAKER_OPEN: &str = "breaker_open";

/// Deliveries attempted per tick; the rest wait for the next.
const DELIVERIES_PER_TICK: usize = 50;
/// Open tickets routed per tick.
const TICKETS_PER_TICK: usize = 500;
/// Backoff after a failed delivery: `BASE · 2^(attempts-1)`, at most `MAX`, half of it jittered.
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// A sink with this many failed attempts outstanding (over all its tickets) is reported as failing.
pub const FAILING_AFTER: u32 = 3;

/// What one tick did, for tests, the report of `meshline dev` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    pub resolved: Vec<String>,
    pub assigned: usize,
    pub delivered: Vec<(String, String, TicketState)>,
    pub failed: Vec<(String, String, String)>,
}

/// The worker's flow-level state the ticket task watches.
pub trait FlowSignals: Send + Sync {
    /// Why the circuit breaker is open, if it is.
    fn breaker_open(&self) -> Option<String>;
}

/// Routes, escalates and delivers the tickets of one flow.
pub struct Dispatcher {
    pub ledger: Arc<dyn Ledger>,
    pub flow: SyncFlow,
    pub roster: Option<OwnershipRoster>,
    pub sinks: BTreeMap<String, Arc<dyn TicketSink>>,
    pub clock: Arc<dyn Clock>,
    pub signals: Arc<dyn FlowSignals>,
    /// How long a begun send keeps its (ticket, sink) from other senders: the worker's claim lease, so a
    /// worker killed mid-send has its ticket resent as soon as its records are taken over. A send is cut off
    /// at it, so two senders never have one version in flight at once.
    pub send_lease: Duration,
}

impl Dispatcher {
    fn namespace(&self) -> String {
        self.flow.metadata.namespace.clone().unwrap_or_default()
    }

    fn flow_name(&self) -> String {
        self.flow.metadata.name.clone().unwrap_or_default()
    }

    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_default()
    }

    /// The roster's assignment for this flow, if a roster covers it.
    fn assignment(&self) -> Option<(&OwnershipRoster, &Assignment)> {
        let roster = self.roster.as_ref()?;
        let a = roster
            .spec
            .assignments
            .iter()
            .find(|a| crate::validate::assignment_covers(a, &self.flow))?;
        Some((roster, a))
    }

    /// One pass: settle, raise or clear the breaker's cause, route and escalate, deliver what is due.
    pub async fn tick(&self) -> Result<Tick, crate::ledger::LedgerError> {
        let mut tick = Tick {
            resolved: self.ledger.settle_tickets().await?,
            ..Tick::default()
        };
        self.breaker().await?;
        tick.assigned = self.assign().await?;
        self.deliver(&mut tick).await?;
        Ok(tick)
    }

    async fn breaker(&self) -> Result<(), crate::ledger::LedgerError> {
        // The ledger's own key (it hashes no namespace; see `ledger::tickets`).
        let fp = super::fingerprint(
            "",
            &self.flow_name(),
            ExceptionKind::FlowDegraded,
            Some(ErrorClass::FlowLevel),
            BREAKER_OPEN,
        );
        match self.signals.breaker_open() {
            Some(why) => {
                // Raised once per opening: an open ticket for it is left alone (its count is the openings).
                let open = self
                    .ledger
                    .ticket(&fp)
                    .await?
                    .is_some_and(|t| t.state != TicketState::Resolved);
                if !open {
                    self.ledger
                        .raise_exception(RaisedException {
                            kind: ExceptionKind::FlowDegraded,
                            class: Some(ErrorClass::FlowLevel),
                            reason: BREAKER_OPEN.into(),
                            rule: None,
                            summary: format!(
                                "the circuit breaker is open: {why}; records wait until the ERP answers"
                            ),
                        })
                        .await?;
                }
            }
            None => {
                self.ledger.clear_exception(&fp).await?;
            }
        }
        Ok(())
    }

    /// Routes every open ticket and moves it up the ladder; returns how many changed.
    async fn assign(&self) -> Result<usize, crate::ledger::LedgerError> {
        let Some((roster, assignment)) = self.assignment() else {
            return Ok(0);
        };
        let now = self.now();
        let mut changed = 0;
        for t in self.ledger.tickets(true, TICKETS_PER_TICK).await? {
            let routed = route::route(
                &roster.spec,
                assignment,
                Cause {
                    class: t.class,
                    rule: t.rule.as_deref(),
                },
            );
            let reached = t.assignment.as_ref().map_or(0, |a| a.escalation_step);
            let placed = route::place(
                &roster.spec,
                assignment,
                &routed,
                t.opened_at,
                t.state,
                reached,
                now,
            );
            let next = TicketAssignment {
                role: placed.role,
                owner: placed.owner,
                sinks: placed.sinks,
                escalation_step: placed.step,
                page: placed.page,
            };
            if t.assignment.as_ref() != Some(&next)
                && self.ledger.assign_ticket(&t.fingerprint, &next).await?
            {
                changed += 1;
                if placed.step > reached {
                    tracing::info!(
                        flow = %self.flow_name(),
                        ticket = %t.fingerprint,
                        step = placed.step,
                        owner = %next.owner,
                        page = next.page,
                        "ticket escalated"
                    );
                }
            }
        }
        Ok(changed)
    }

    async fn deliver(&self, tick: &mut Tick) -> Result<(), crate::ledger::LedgerError> {
        let now = self.now();
        let due = self
            .ledger
            .ticket_deliveries_due(now, DELIVERIES_PER_TICK)
            .await?;
        for d in due {
            let Some(sink) = self.sinks.get(&d.sink) else {
                // A sink the roster no longer names (or whose Secret could not be read): kept in the outbox
                // and reported, so fixing the roster delivers it.
                let next = now + chrono::Duration::from_std(BACKOFF_MAX).unwrap_or_default();
                let why = format!(
                    "ticket sink {:?} is not configured (not in the roster, or its credentials are missing)",
                    d.sink
                );
                self.ledger
                    .fail_ticket_delivery(&d.ticket.fingerprint, &d.sink, &why, None, next)
                    .await?;
                tick.failed
                    .push((d.ticket.fingerprint.clone(), d.sink.clone(), why));
                continue;
            };
            let mut ticket = self.render(&d.ticket);
            ticket.version =
                version_to_send(ticket.version, d.previous.is_some(), d.in_doubt_version);
            self.ledger
                .begin_ticket_delivery(
                    &d.ticket.fingerprint,
                    &d.sink,
                    ticket.version,
                    self.send_lease,
                )
                .await?;
            let result = send(
                sink.as_ref(),
                Delivery {
                    ticket: &ticket,
                    previous: d.previous.as_ref(),
                    in_doubt: d.in_doubt,
                    now,
                },
                self.send_lease,
            )
            .await;
            match result {
                Ok(sink_ref) => {
                    self.ledger
                        .finish_ticket_delivery(
                            &d.ticket.fingerprint,
                            &d.sink,
                            ticket.version,
                            sink_ref,
                        )
                        .await?;
                    tick.delivered.push((
                        d.ticket.fingerprint.clone(),
                        d.sink.clone(),
                        ticket.state,
                    ));
                }
                Err(e) => {
                    let wait = backoff(d.attempts + 1, &e);
                    let next = now + chrono::Duration::from_std(wait).unwrap_or_default();
                    tracing::warn!(
                        flow = %self.flow_name(),
                        ticket = %d.ticket.fingerprint,
                        sink = %d.sink,
                        status = e.status,
                        retryable = e.retryable,
                        error = %e.message,
                        retry_in_s = wait.as_secs(),
                        "ticket delivery failed; it stays in the outbox"
                    );
                    self.ledger
                        .fail_ticket_delivery(
                            &d.ticket.fingerprint,
                            &d.sink,
                            &e.message,
                            e.refusal(),
                            next,
                        )
                        .await?;
                    tick.failed
                        .push((d.ticket.fingerprint.clone(), d.sink.clone(), e.message));
                }
            }
        }
        Ok(())
    }

    /// The ticket as sinks see it.
    pub fn render(&self, t: &TicketRecord) -> Ticket {
        render(
            &self.namespace(),
            &self.flow_name(),
            self.roster.as_ref(),
            t,
        )
    }

    /// Runs ticks every `period` until shutdown. A failing ledger is logged and retried on the next tick.
    pub async fn run(self, period: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.tick().await {
                tracing::warn!(flow = %self.flow_name(), error = %e, "ticket task: ledger error; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// The version a delivery sends: the ticket's current one, except after a first send in doubt (the sender
/// died after sending, before recording) while the ticket moved on. The sink may already have that version
/// as its first, so it is resent under that version's number: an idempotent sink drops it (and one that never
/// got it takes it as the first), and the current version follows as an update. Sending the current one as a
/// new first version would open the ticket twice at the sink. Shared by the worker's outbox and the
/// controller's (`controller::flow::outage`).
pub fn version_to_send(current: i64, delivered_before: bool, in_doubt_version: Option<i64>) -> i64 {
    match in_doubt_version {
        Some(sent) if !delivered_before && sent < current => sent,
        _ => current,
    }
}

/// One delivery to one sink, cut off at `lease` (a sender holds a send for at most that long, so two senders
/// never have one version in flight at once); a send cut off is retryable and stays in doubt.
pub async fn send(
    sink: &dyn TicketSink,
    delivery: Delivery<'_>,
    lease: Duration,
) -> Result<super::sinks::SinkRef, SinkError> {
    match tokio::time::timeout(lease, sink.deliver(delivery)).await {
        Ok(result) => result,
        Err(_) => Err(SinkError {
            retryable: true,
            status: None,
            message: format!(
                "ticket sink {}: no answer within the send lease of {lease:?}",
                sink.name()
            ),
            retry_after: None,
        }),
    }
}

/// The wait before the next attempt. A refusal (4xx) waits the longest: it needs a person to fix the sink's
/// configuration, and retrying it every few seconds only fills the sink's logs.
pub fn backoff(attempts: u32, e: &SinkError) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let wait = if e.retryable { exp } else { BACKOFF_MAX };
    // Half fixed, half jittered: sinks recovering from an outage are not hit by every flow at once.
    let half = wait / 2;
    let jitter = Duration::from_millis(rand::random_range(0..=half.as_millis() as u64));
    (half + jitter).max(e.retry_after.unwrap_or_default())
}

/// A sink is failing once [`FAILING_AFTER`] of its attempts failed without a success since (see
/// [`TicketSinkHealth::consecutive_failures`]): a 5xx or a lost connection may pass. A refusal (a 4xx other
/// than 408 and 429) makes it failing from the first one: its configuration or permissions are wrong, no
/// retry fixes that, and with the backoff three of them would take 10 to 20 minutes to add up.
pub fn failing(health: &TicketSinkHealth) -> bool {
    health.refused.is_some() || health.consecutive_failures >= FAILING_AFTER
}

/// The ticket as the sinks see it: the ledger's record, the owner from the roster, a title, and the commands
/// to look closer and to act.
pub fn render(
    namespace: &str,
    flow: &str,
    roster: Option<&OwnershipRoster>,
    t: &TicketRecord,
) -> Ticket {
    let (role, owner) = match (&t.assignment, roster) {
        (Some(a), Some(r)) => (a.role, route::assignee(&r.spec, &a.owner)),
        (Some(a), None) => (
            a.role,
            super::Assignee {
                id: a.owner.clone(),
                name: a.owner.clone(),
                ..Default::default()
            },
        ),
        (None, _) => (
            crate::api::OwnerRole::SyncOwner,
            super::Assignee {
                id: String::new(),
                name: "unassigned".into(),
                ..Default::default()
            },
        ),
    };
    let n = t.outstanding.max(1);
    let title = match t.kind {
        ExceptionKind::DeadLetter => format!("{flow}: {n} record(s) dead-lettered: {}", t.reason),
        ExceptionKind::Hold => format!(
            "{flow}: {n} record(s) held for approval by rule {}",
            t.rule.as_deref().unwrap_or(&t.reason)
        ),
        ExceptionKind::FlowDegraded => format!("{flow}: flow degraded: {}", t.reason),
        ExceptionKind::ContractRejected => format!("{flow}: contract change stopped: {}", t.reason),
        ExceptionKind::AuditMismatch => format!("{flow}: audit differences: {}", t.reason),
    };
    let title = match t.state {
        TicketState::Resolved => format!("[resolved] {title}"),
        _ => title,
    };
    let port_forward =
        format!("kubectl -n {namespace} port-forward svc/meshline-{flow}-status 8081");
    let endpoint = format!("--flow {flow} -n {namespace}");
    let newest = t.examples.first().map(|e| e.record);
    let mut commands = Vec::new();
    match t.kind {
        ExceptionKind::DeadLetter => {
            commands.push(port_forward);
            commands.push(format!(
                "meshline dlq list {endpoint} --reason '{}'",
                t.reason
            ));
            if let Some(id) = newest {
                commands.push(format!("meshline dlq show {endpoint} {id}"));
            }
            commands.push(format!(
                "meshline dlq replay {endpoint} --reason '{}' --actor <your-owner-id> --why '<the fix>'",
                t.reason
            ));
        }
        ExceptionKind::Hold => {
            commands.push(port_forward);
            commands.push(format!("meshline hold list {endpoint}"));
            if let Some(id) = newest {
                commands.push(format!("meshline dlq show {endpoint} {id}"));
                commands.push(format!(
                    "meshline hold approve {flow} {id} -n {namespace} --by <your-owner-id> --reason '<why>'"
                ));
                commands.push(format!(
                    "meshline hold reject {flow} {id} -n {namespace} --by <your-owner-id> --reason '<why>'"
                ));
            }
        }
        ExceptionKind::FlowDegraded => {
            commands.push(format!("kubectl -n {namespace} describe syncflow {flow}"));
        }
        ExceptionKind::ContractRejected => {
            commands.push(format!("meshline rollout status {flow} -n {namespace}"));
            commands.push(format!("kubectl -n {namespace} describe syncflow {flow}"));
        }
        ExceptionKind::AuditMismatch => {
            commands.push(format!("kubectl -n {namespace} describe syncflow {flow}"));
        }
    }
    Ticket {
        // The ledger's key is unique within the flow's ledger; outside it (Jira labels, PagerDuty dedup keys,
        // a webhook receiver's idempotency) the namespace counts too.
        fingerprint: super::fingerprint(namespace, flow, t.kind, t.class, &t.reason),
        namespace: namespace.to_string(),
        flow: flow.to_string(),
        kind: t.kind,
        class: t.class,
        reason: t.reason.clone(),
        rule: t.rule.clone(),
        title,
        summary: t.summary.clone(),
        state: t.state,
        role,
        owner,
        escalation_step: t.assignment.as_ref().map_or(0, |a| a.escalation_step),
        page: t.assignment.as_ref().is_some_and(|a| a.page),
        count: t.count,
        outstanding: t.outstanding,
        opened_at: t.opened_at,
        updated_at: t.updated_at,
        acknowledged_at: t.acknowledged_at,
        acknowledged_by: t.acknowledged_by.clone(),
        resolved_at: t.resolved_at,
        examples: t.examples.clone(),
        commands,
        version: t.version,
    }
}

/// The flow's tickets as `/status` reports them (and the controller copies into the flow's status): open and
/// acknowledged counts, the oldest open tickets, per-owner times, and the sinks that keep failing.
///
/// The flow-wide counts and times come from `whole` (exact over the flow's tickets), not from adding up the
/// owners' rows, which leave out what was never assigned; `open` (capped by the read) only lists the oldest.
pub fn summary(
    namespace: &str,
    flow: &str,
    open: &[TicketRecord],
    whole: &crate::ledger::FlowTicketMeasures,
    measures: &[crate::ledger::OwnerTicketMeasures],
    health: &[TicketSinkHealth],
) -> crate::api::TicketSummary {
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut oldest: Vec<&TicketRecord> = open.iter().collect();
    oldest.sort_by_key(|t| t.opened_at);
    crate::api::TicketSummary {
        open: to_i64(whole.open),
        acknowledged: to_i64(whole.acknowledged_now),
        occurrences_opened: to_i64(whole.opened),
        occurrences_acknowledged: to_i64(whole.acknowledged),
        occurrences_resolved: to_i64(whole.resolved),
        mean_time_to_acknowledge_seconds: whole
            .mean_time_to_acknowledge_seconds
            .map(|s| s.round() as i64),
        mean_time_to_resolve_seconds: whole.mean_time_to_resolve_seconds.map(|s| s.round() as i64),
        owners: measures
            .iter()
            .take(100)
            .map(|m| crate::api::OwnerTicketStats {
                owner: m.owner.clone(),
                opened: to_i64(m.opened),
                acknowledged: to_i64(m.acknowledged),
                resolved: to_i64(m.resolved),
                open: to_i64(m.open),
                mean_time_to_acknowledge_seconds: m
                    .mean_time_to_acknowledge_seconds
                    .map(|s| s.round() as i64),
                mean_time_to_resolve_seconds: m
                    .mean_time_to_resolve_seconds
                    .map(|s| s.round() as i64),
            })
            .collect(),
        oldest: oldest
            .into_iter()
            .take(10)
            .map(|t| crate::api::OpenTicket {
                fingerprint: super::fingerprint(namespace, flow, t.kind, t.class, &t.reason),
                kind: t.kind.label().into(),
                reason: t.reason.chars().take(200).collect(),
                state: t.state.label().into(),
                owner: t.assignment.as_ref().map(|a| a.owner.clone()),
                escalation_step: t
                    .assignment
                    .as_ref()
                    .map_or(0, |a| i32::try_from(a.escalation_step).unwrap_or(i32::MAX)),
                outstanding: to_i64(t.outstanding),
                opened_at: t
                    .opened_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })
            .collect(),
        failing_sinks: health
            .iter()
            .filter(|h| failing(h))
            .take(20)
            .map(|h| crate::api::FailingTicketSink {
                sink: h.sink.clone(),
                pending: to_i64(h.pending),
                consecutive_failures: i32::try_from(h.consecutive_failures).unwrap_or(i32::MAX),
                failing_since: h
                    .failing_since
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                message: h
                    .last_error
                    .as_ref()
                    .map(|m| m.chars().take(1000).collect()),
            })
            .collect(),
    }
}

/// Reads what [`summary`] needs from the ledger.
pub async fn read_summary(
    namespace: &str,
    flow: &str,
    ledger: &dyn Ledger,
) -> Result<crate::api::TicketSummary, crate::ledger::LedgerError> {
    let open = ledger.tickets(true, TICKETS_PER_TICK).await?;
    let whole = ledger.ticket_flow_measures().await?;
    let measures = ledger.ticket_measures().await?;
    let health = ledger.ticket_sink_health().await?;
    Ok(summary(namespace, flow, &open, &whole, &measures, &health))
}
