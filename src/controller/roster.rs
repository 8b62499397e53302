//! The OwnershipRoster reconciler: the status lists the flows the roster covers and the flows of its namespace
//! that no roster gives a sync owner (those do not start).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::flow::status::{carry_transition_times, differs};
use super::{Context, Error, apply};
use crate::api::{
    Condition, OwnerTicketStats, OwnershipRoster, OwnershipRosterStatus, SyncFlow, TicketSummary,
};
use crate::validate::assignment_covers;

/// Flows (by name) the roster's assignments cover.
pub fn covered(roster: &OwnershipRoster, flows: &[Arc<SyncFlow>]) -> BTreeSet<String> {
    let ns = roster.metadata.namespace.as_deref();
    flows
        .iter()
        .filter(|f| f.metadata.namespace.as_deref() == ns)
        .filter(|f| {
            roster
                .spec
                .assignments
                .iter()
                .any(|a| assignment_covers(a, f))
        })
        .map(|f| f.name_any())
        .collect()
}

/// The tickets of the flows a roster covers, together. Counts add up; each owner's mean times are weighted
/// by the tickets behind them (acknowledged ones for the time to acknowledge, resolved ones for the time to
/// resolve), so a flow with one quick ticket does not count as much as a flow with fifty slow ones. The
/// roster-wide means weigh each flow's own flow-wide means the same way, by its occurrences: the owners'
/// rows leave out what nobody was assigned, and a status lists at most 100 of them. `None` when no covered
/// flow reports tickets yet.
pub fn tickets_of(flows: &[&SyncFlow]) -> Option<TicketSummary> {
    let summaries: Vec<(&str, &TicketSummary)> = flows
        .iter()
        .filter_map(|f| {
            f.status
                .as_ref()?
                .tickets
                .as_ref()
                .map(|t| (f.metadata.name.as_deref().unwrap_or_default(), t))
        })
        .collect();
    // The sinks the controller itself failed to reach with a flow's outage ticket (no worker answering, so
    // no worker can report them): failing on the same terms as a worker's sink.
    let outage_failing: Vec<crate::api::FailingTicketSink> = flows
        .iter()
        .filter_map(|f| f.status.as_ref()?.outage.as_ref()?.ticket.as_ref())
        .flat_map(|t| t.deliveries.iter())
        .filter(|d| d.attempts >= crate::tickets::dispatch::FAILING_AFTER as i32)
        .map(|d| crate::api::FailingTicketSink {
            sink: d.sink.clone(),
            pending: 1,
            consecutive_failures: d.attempts,
            failing_since: None,
            message: d.last_error.clone(),
        })
        .collect();
    if summaries.is_empty() && outage_failing.is_empty() {
        return None;
    }
    #[derive(Default)]
    struct Sums {
        stats: OwnerTicketStats,
        tta: f64,
        ttr: f64,
    }
    let mut owners: std::collections::BTreeMap<String, Sums> = Default::default();
    let mut out = TicketSummary::default();
    let mut oldest = Vec::new();
    let (mut tta, mut ttr) = (0.0, 0.0);
    for (flow, t) in &summaries {
        out.open += t.open;
        out.acknowledged += t.acknowledged;
        out.occurrences_opened += t.occurrences_opened;
        out.occurrences_acknowledged += t.occurrences_acknowledged;
        out.occurrences_resolved += t.occurrences_resolved;
        tta += t.mean_time_to_acknowledge_seconds.unwrap_or(0) as f64
            * t.occurrences_acknowledged as f64;
        ttr += t.mean_time_to_resolve_seconds.unwrap_or(0) as f64 * t.occurrences_resolved as f64;
        for o in &t.owners {
            let e = owners.entry(o.owner.clone()).or_default();
            e.stats.owner = o.owner.clone();
            e.stats.opened += o.opened;
            e.stats.acknowledged += o.acknowledged;
            e.stats.resolved += o.resolved;
            e.stats.open += o.open;
            e.tta += o.mean_time_to_acknowledge_seconds.unwrap_or(0) as f64 * o.acknowledged as f64;
            e.ttr += o.mean_time_to_resolve_seconds.unwrap_or(0) as f64 * o.resolved as f64;
        }
        for o in &t.oldest {
            let mut o = o.clone();
            // The roster spans flows: say which one.
            o.reason = format!("{flow}: {}", o.reason).chars().take(256).collect();
            oldest.push(o);
        }
        for s in &t.failing_sinks {
            if !out.failing_sinks.iter().any(|f| f.sink == s.sink) {
                out.failing_sinks.push(s.clone());
            }
        }
    }
    for s in outage_failing {
        if !out.failing_sinks.iter().any(|f| f.sink == s.sink) {
            out.failing_sinks.push(s);
        }
    }
    let mean = |sum: f64, n: i64| (n > 0).then(|| (sum / n as f64).round() as i64);
    for (_, s) in owners.iter_mut() {
        s.stats.mean_time_to_acknowledge_seconds = mean(s.tta, s.stats.acknowledged);
        s.stats.mean_time_to_resolve_seconds = mean(s.ttr, s.stats.resolved);
    }
    out.mean_time_to_acknowledge_seconds = mean(tta, out.occurrences_acknowledged);
    out.mean_time_to_resolve_seconds = mean(ttr, out.occurrences_resolved);
    out.owners = owners.into_values().map(|s| s.stats).take(100).collect();
    oldest.sort_by(|a, b| a.opened_at.cmp(&b.opened_at));
    oldest.truncate(10);
    out.oldest = oldest;
    out.failing_sinks.truncate(20);
    Some(out)
}

/// The roster's `TicketSinksReady` condition: False while a covered flow's worker reports a ticket sink that
/// keeps failing (its tickets wait in the outbox until it is fixed).
fn sinks_condition(roster: &OwnershipRoster, tickets: Option<&TicketSummary>) -> Condition {
    let failing = tickets.map(|t| t.failing_sinks.as_slice()).unwrap_or(&[]);
    let (status, reason, message) = if failing.is_empty() {
        (
            "True",
            "TicketSinksDelivering",
            "no ticket sink is failing".to_string(),
        )
    } else {
        (
            "False",
            "TicketSinkFailing",
            failing
                .iter()
                .map(|s| {
                    format!(
                        "ticket sink {} failed {} deliveries in a row ({} waiting){}",
                        s.sink,
                        s.consecutive_failures,
                        s.pending,
                        s.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    Condition {
        r#type: "TicketSinksReady".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: roster.metadata.generation,
        last_transition_time: None,
    }
}

/// An Event when the `TicketSinksReady` condition changes: a sink started failing (Warning) or recovered.
pub fn sinks_event(
    old: Option<&OwnershipRosterStatus>,
    next: &OwnershipRosterStatus,
) -> Option<Event> {
    let find = |s: &OwnershipRosterStatus| {
        s.conditions
            .iter()
            .find(|c| c.r#type == "TicketSinksReady")
            .cloned()
    };
    let now = find(next)?;
    let was = old.and_then(find);
    if was.as_ref().map(|c| (&c.status, &c.reason)) == Some((&now.status, &now.reason)) {
        return None;
    }
    if was.is_none() && now.status == "True" {
        return None;
    }
    Some(Event {
        type_: if now.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: now.reason.clone(),
        note: Some(now.message.chars().take(1000).collect()),
        action: "DeliverTickets".into(),
        secondary: None,
    })
}

/// The roster's `AuditScheduled` condition: whether its flows' audit CronJobs run on `spec.audit`. False, with
/// each field's reason, when the API server would refuse the schedule or time zone (the controller then
/// writes no audit CronJob for the roster's flows rather than fail their reconciles).
fn audit_condition(roster: &OwnershipRoster) -> Condition {
    let audit = roster.spec.audit.clone().unwrap_or_default();
    let problems = crate::audit::schedule::problems(&audit);
    let (status, reason, message) = if !problems.is_empty() {
        (
            "False",
            "InvalidSchedule",
            format!(
                "no flow of this roster is audited until this is fixed: {}",
                problems
                    .iter()
                    .map(|(field, why)| format!("{field}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
    } else {
        let schedule = audit
            .schedule
            .as_deref()
            .unwrap_or(crate::controller::flow::audit::DEFAULT_SCHEDULE);
        let zone = audit
            .time_zone
            .as_deref()
            .unwrap_or("the cluster's time zone");
        let window = audit
            .window
            .as_ref()
            .map_or_else(|| "168h".to_string(), |w| w.to_string());
        if audit.suspend {
            (
                "False",
                "Suspended",
                format!(
                    "spec.audit.suspend: the audit CronJobs of this roster's flows are suspended ({schedule:?}, {zone})"
                ),
            )
        } else {
            (
                "True",
                "Scheduled",
                format!(
                    "the flows are audited on {schedule:?} ({zone}) over the last {window}, each by its CronJob meshline-audit-<flow>"
                ),
            )
        }
    };
    Condition {
        r#type: "AuditScheduled".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: roster.metadata.generation,
        last_transition_time: None,
    }
}

/// The roster's next status. Pure.
pub fn compute(
    roster: &OwnershipRoster,
    rosters: &[Arc<OwnershipRoster>],
    flows: &[Arc<SyncFlow>],
    now: &str,
) -> OwnershipRosterStatus {
    let ns = roster.metadata.namespace.as_deref();
    let mine = covered(roster, flows);
    let unowned: Vec<String> = flows
        .iter()
        .filter(|f| f.metadata.namespace.as_deref() == ns)
        .filter(|f| {
            !rosters
                .iter()
                .filter(|r| r.metadata.namespace.as_deref() == ns)
                .any(|r| r.spec.assignments.iter().any(|a| assignment_covers(a, f)))
        })
        .map(|f| f.name_any())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let old = roster.status.clone().unwrap_or_default();
    let tickets = tickets_of(
        &flows
            .iter()
            .filter(|f| f.metadata.namespace.as_deref() == ns && mine.contains(&f.name_any()))
            .map(|f| f.as_ref())
            .collect::<Vec<_>>(),
    );
    let sinks = sinks_condition(roster, tickets.as_ref());
    let condition = Condition {
        r#type: "Accepted".into(),
        status: "True".into(),
        reason: if unowned.is_empty() {
            "AllFlowsOwned"
        } else {
            "FlowsWithoutSyncOwner"
        }
        .into(),
        message: if unowned.is_empty() {
            format!(
                "covers {} flow(s); every flow in the namespace has a sync owner",
                mine.len()
            )
        } else {
            format!(
                "covers {} flow(s); {} flow(s) in the namespace have no sync owner and do not start: {}",
                mine.len(),
                unowned.len(),
                unowned.join(", ")
            )
        },
        observed_generation: roster.metadata.generation,
        last_transition_time: None,
    };
    OwnershipRosterStatus {
        observed_generation: roster.metadata.generation,
        conditions: carry_transition_times(
            &old.conditions,
            vec![condition, sinks, audit_condition(roster)],
            now,
        ),
        owner_count: i32::try_from(roster.spec.owners.len()).unwrap_or(i32::MAX),
        covered_flow_count: i32::try_from(mine.len()).unwrap_or(i32::MAX),
        covered_flows: mine.into_iter().collect(),
        unowned_flow_count: i32::try_from(unowned.len()).unwrap_or(i32::MAX),
        flows_without_sync_owner: unowned,
        tickets,
    }
}

pub async fn reconcile(roster: Arc<OwnershipRoster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&roster, &ctx).await;
    ctx.metrics.observe(
        "OwnershipRoster",
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

async fn reconcile_inner(roster: &OwnershipRoster, ctx: &Context) -> Result<Action, Error> {
    if roster.namespace().is_none() {
        return Err(Error::NoNamespace {
            kind: "OwnershipRoster",
            name: roster.name_any(),
        });
    }
    if roster.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let next = compute(
        roster,
        &ctx.stores.rosters.state(),
        &ctx.stores.flows.state(),
        &super::now_rfc3339(),
    );
    if differs(roster.status.as_ref(), &next, |s| &mut s.conditions) {
        apply::apply_status(&ctx.client, roster, &next, &ctx.metrics).await?;
        if let Some(event) = sinks_event(roster.status.as_ref(), &next) {
            // An Event that cannot be published must not fail the reconcile: the status already says it.
            if let Err(e) = ctx.recorder.publish(&event, &roster.object_ref(&())).await {
                tracing::warn!(roster = %roster.name_any(), error = %e, "cannot publish an Event");
            }
        }
    }
    Ok(Action::requeue(super::flow::RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FailingTicketSink, OpenTicket, SyncFlowStatus};

    fn flow(name: &str, tickets: TicketSummary) -> SyncFlow {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/salesforce-netsuite/flow.yaml"
        ))
        .expect("the example flow");
        let mut f: SyncFlow = serde_yaml::from_str(&text).expect("a SyncFlow");
        f.metadata.name = Some(name.into());
        f.status = Some(SyncFlowStatus {
            tickets: Some(tickets),
            ..Default::default()
        });
        f
    }

    fn owner(id: &str, acked: i64, tta: i64, resolved: i64, ttr: i64) -> OwnerTicketStats {
        OwnerTicketStats {
            owner: id.into(),
            opened: acked.max(resolved),
            acknowledged: acked,
            resolved,
            open: 1,
            mean_time_to_acknowledge_seconds: (acked > 0).then_some(tta),
            mean_time_to_resolve_seconds: (resolved > 0).then_some(ttr),
        }
    }

    #[test]
    fn a_rosters_tickets_weigh_each_flows_means_by_its_tickets() {
        let a = flow(
            "a",
            TicketSummary {
                open: 2,
                acknowledged: 1,
                // Flow a also resolved a ticket nobody was assigned: in its own figures, in no owner's.
                occurrences_opened: 3,
                occurrences_acknowledged: 1,
                occurrences_resolved: 2,
                mean_time_to_acknowledge_seconds: Some(100),
                mean_time_to_resolve_seconds: Some(550),
                owners: vec![owner("dana", 1, 100, 1, 1000)],
                oldest: vec![OpenTicket {
                    reason: "erp:422".into(),
                    opened_at: "2026-12-01T10:00:00Z".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let b = flow(
            "b",
            TicketSummary {
                open: 1,
                occurrences_opened: 4,
                occurrences_acknowledged: 4,
                occurrences_resolved: 3,
                mean_time_to_acknowledge_seconds: Some(390),
                mean_time_to_resolve_seconds: Some(2000),
                owners: vec![owner("dana", 3, 500, 3, 2000), owner("sam", 1, 60, 0, 0)],
                failing_sinks: vec![FailingTicketSink {
                    sink: "jira".into(),
                    consecutive_failures: 4,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let t = tickets_of(&[&a, &b]).expect("tickets");
        assert_eq!((t.open, t.acknowledged), (3, 1));
        let dana = t.owners.iter().find(|o| o.owner == "dana").unwrap();
        // (1·100 + 3·500) / 4 and (1·1000 + 3·2000) / 4.
        assert_eq!(dana.mean_time_to_acknowledge_seconds, Some(400));
        assert_eq!(dana.mean_time_to_resolve_seconds, Some(1750));
        assert_eq!((dana.acknowledged, dana.resolved, dana.open), (4, 4, 2));
        // Over the flows' own figures: (1·100 + 4·390) / 5 and (2·550 + 3·2000) / 5.
        assert_eq!(t.mean_time_to_acknowledge_seconds, Some(332));
        assert_eq!(t.mean_time_to_resolve_seconds, Some(1420));
        assert_eq!(
            (
                t.occurrences_opened,
                t.occurrences_acknowledged,
                t.occurrences_resolved
            ),
            (7, 5, 5)
        );
        assert_eq!(t.oldest[0].reason, "a: erp:422");
        assert_eq!(t.failing_sinks.len(), 1);
        assert!(tickets_of(&[]).is_none());
    }

    #[test]
    fn a_sink_the_controller_cannot_reach_with_an_outage_ticket_is_failing_on_the_roster() {
        use crate::api::{FlowOutage, OutageDelivery, OutageTicket};
        let mut silent = flow("silent", TicketSummary::default());
        let status = silent.status.as_mut().unwrap();
        // No worker answers, so the flow has no worker summary: only the controller's outage outbox.
        status.tickets = None;
        let delivery = |sink: &str, attempts: i32| OutageDelivery {
            sink: sink.into(),
            attempts,
            last_error: Some("503 from the sink".into()),
            ..Default::default()
        };
        status.outage = Some(FlowOutage {
            ticket: Some(OutageTicket {
                fingerprint: "fp".into(),
                state: "open".into(),
                acknowledged_at: None,
                acknowledged_by: None,
                summary: "no worker pod answered".into(),
                opened_at: "2026-12-01T10:00:00Z".into(),
                resolved_at: None,
                version: 1,
                owner: "dana".into(),
                role: crate::api::OwnerRole::SyncOwner,
                escalation_step: 0,
                page: false,
                deliveries: vec![delivery("ops-webhook", 3), delivery("pager", 1)],
            }),
            ..Default::default()
        });
        let t = tickets_of(&[&silent]).expect("the outage's failing sink");
        assert_eq!(t.failing_sinks.len(), 1, "{:?}", t.failing_sinks);
        assert_eq!(t.failing_sinks[0].sink, "ops-webhook");
        assert_eq!(
            t.failing_sinks[0].message.as_deref(),
            Some("503 from the sink")
        );
        // Two failures are not yet failing, as for a worker's sink.
        if let Some(o) = silent.status.as_mut().unwrap().outage.as_mut() {
            o.ticket.as_mut().unwrap().deliveries[0].attempts = 2;
        }
        assert!(tickets_of(&[&silent]).is_none());
    }

    #[test]
    fn a_failing_sink_turns_the_condition_false_with_one_event_per_change() {
        let mut roster: OwnershipRoster = serde_yaml::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/salesforce-netsuite/roster.yaml"
            ))
            .expect("the example roster"),
        )
        .expect("a roster");
        roster.metadata.generation = Some(1);
        let failing = TicketSummary {
            failing_sinks: vec![FailingTicketSink {
                sink: "jira".into(),
                consecutive_failures: 3,
                pending: 2,
                message: Some("HTTP 401".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let status = |t: Option<&TicketSummary>| OwnershipRosterStatus {
            conditions: vec![sinks_condition(&roster, t)],
            ..Default::default()
        };
        let healthy = status(None);
        let bad = status(Some(&failing));
        assert_eq!(bad.conditions[0].status, "False");
        assert!(
            bad.conditions[0]
                .message
                .contains("jira failed 3 deliveries in a row (2 waiting): HTTP 401")
        );
        let e = sinks_event(Some(&healthy), &bad).expect("an Event when a sink starts failing");
        assert_eq!(e.reason, "TicketSinkFailing");
        assert!(matches!(e.type_, EventType::Warning));
        // Still failing, one more failure: the message changes, no second Event.
        let mut worse = failing.clone();
        worse.failing_sinks[0].consecutive_failures = 4;
        assert!(sinks_event(Some(&bad), &status(Some(&worse))).is_none());
        let back = sinks_event(Some(&bad), &healthy).expect("an Event when it recovers");
        assert!(matches!(back.type_, EventType::Normal));
        // A new roster that is healthy from the start says nothing.
        assert!(sinks_event(None, &healthy).is_none());
    }
}
