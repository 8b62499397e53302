//! The controller's own outbox for the one cause no worker can report: no worker pod of a flow answering
//! (crash loop, ledger unreachable, image pull failure, every pod pending). Once the silence has lasted
//! [`OutageSettings::after`] and [`OutageSettings::polls`] consecutive polls, the controller opens the ticket
//! `status:NoWorkerAnswering`, routes it with the flow's roster (`tickets::route`), sends it to the roster's
//! ticket sinks with the same `tickets::sinks` the workers use, and resolves it when a pod answers again.
//!
//! There is no ledger to keep the outbox in (the ledger may be the very thing that is down), so its state is
//! the flow's `status.outage`, written with the reconciler's status patch. A send is marked in doubt in that
//! status before it goes out, so a controller restarted or replaced mid-send resends under the same
//! idempotency key (webhook `Idempotency-Key`, PagerDuty `dedup_key`; Jira and GitHub look for their copy).
//!
//! `answer` and `plan` are pure; `deliver` is the only part that reads Secrets and calls sinks. It never logs
//! a credential: the Secret's values go straight into the sink.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use serde_json::Value;

use super::status::{Observation, PodAnswer};
use crate::api::{
    Assignment, ErrorClass, FlowOutage, OutageDelivery, OutageTicket, OwnershipRoster,
    OwnershipRosterSpec, SyncFlow,
};
use crate::connectors::Credentials;
use crate::controller::Context;
use crate::ledger::{TicketAssignment, TicketRecord};
use crate::tickets::route::{self, Cause};
use crate::tickets::sinks::{Delivery, SinkError};
use crate::tickets::{ExceptionKind, Ticket, TicketState, dispatch};

/// The reason key of the ticket (a `status:` cause, like the worker-reported `status:WorkersNotAnswering`).
pub const NO_WORKER_ANSWERING: &str = "status:NoWorkerAnswering";

/// Acknowledges the flow's open outage ticket for a roster owner: `<owner id>:<any id>`, e.g.
/// `kubectl annotate syncflow orders sync.meshline.io/acknowledge-outage=dana:1 --overwrite`. Who may set it
/// is who may patch the SyncFlow (Kubernetes RBAC); the owner named is recorded and shown at the sinks. Each
/// value counts once: a new outage needs a new id.
pub const ACK_ANNOTATION: &str = "sync.meshline.io/acknowledge-outage";
/// The CRD's bounds (see `api::OutageTicket`).
const SUMMARY_MAX: usize = 1024;
const ERROR_MAX: usize = 1024;
const SINK_REF_MAX: usize = 2048;
const DELIVERIES_MAX: usize = 10;

/// When a silence is an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutageSettings {
    /// How long no pod may answer before the ticket opens. A rollout, a rescheduled pod or a slow scheduler
    /// stays well under it.
    pub after: Duration,
    /// And in how many consecutive polls at least: one slow answer (or a controller that was itself away for
    /// `after`) is never a verdict.
    pub polls: u32,
    /// How long one send may take before it is cut off (and stays in doubt).
    pub send_lease: Duration,
}

impl Default for OutageSettings {
    fn default() -> Self {
        OutageSettings {
            after: Duration::from_secs(300),
            polls: 3,
            send_lease: crate::connectors::sinks::REQUEST_TIMEOUT + Duration::from_secs(15),
        }
    }
}

/// What the flow's worker pods said, as far as the outage is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Not polled since this controller started: nothing is known, nothing changes.
    Unknown,
    /// At least one pod answered with its numbers.
    Answering,
    /// The flow runs no worker (paused, a failed gate): there is nobody to expect an answer from.
    NotRunning,
    /// No pod answered in the last `polls` polls.
    Silent { polls: u32, summary: String },
}

/// The answer of the last poll, from whether the flow should run pods and what they said.
pub fn answer(running: bool, observation: Option<&Observation>) -> Answer {
    let Some(o) = observation.filter(|_| running) else {
        return if running {
            Answer::Unknown
        } else {
            Answer::NotRunning
        };
    };
    if o.silent_polls == 0 {
        return Answer::Answering;
    }
    let summary = if o.pods.is_empty() {
        "no worker pod of the flow is published by its status Service (none started, or every one is \
         pending); no records are received or delivered"
            .to_string()
    } else {
        let pods: Vec<String> = o
            .pods
            .iter()
            .take(5)
            .map(|p| match &p.answer {
                PodAnswer::Unreachable(e) => format!("{} unreachable ({e})", p.pod),
                PodAnswer::NotStarted(f) => format!("{} could not start ({})", p.pod, f.error),
                PodAnswer::Running(_) => format!("{} running", p.pod),
            })
            .collect();
        format!(
            "none of the flow's {} worker pod(s) answers: {}; no records are received or delivered",
            o.pods.len(),
            pods.join("; ")
        )
    };
    Answer::Silent {
        polls: o.silent_polls,
        summary: bounded(&summary, SUMMARY_MAX),
    }
}

/// What `plan` decides from.
pub struct Inputs<'a> {
    pub namespace: &'a str,
    pub flow: &'a str,
    pub previous: Option<&'a FlowOutage>,
    pub answer: &'a Answer,
    /// The roster covering the flow and its assignment.
    pub roster: Option<(&'a OwnershipRosterSpec, &'a Assignment)>,
    pub now: DateTime<Utc>,
    pub settings: &'a OutageSettings,
    /// The flow's annotation `sync.meshline.io/acknowledge-outage` (`<owner>:<id>`), if any.
    pub acknowledge: Option<&'a str>,
}

/// One send the apply step makes: `version` of the ticket to `sink`.
#[derive(Clone, Debug, PartialEq)]
pub struct Send {
    pub sink: String,
    pub version: i64,
    /// An earlier attempt may have reached the sink.
    pub in_doubt: bool,
    /// What the sink answered to the last success (create when absent).
    pub previous: Option<Value>,
}

/// The decision: the outage state to write (its sends already marked in doubt) and the sends to make.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub outage: Option<FlowOutage>,
    pub sends: Vec<Send>,
    /// When to look again without a poll's nudge (the silence reaching `after`, a retry falling due).
    pub recheck_in: Option<Duration>,
    /// Why a new acknowledgement annotation was not taken (for a Warning Event).
    pub refused: Option<String>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn bounded(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or_default()
}

/// Decides what to open, escalate, resolve and send. Pure.
pub fn plan(i: Inputs<'_>) -> Plan {
    let mut outage = i.previous.cloned().unwrap_or_default();
    let mut recheck: Option<Duration> = None;
    let mut soonest = |d: Duration| recheck = Some(recheck.map_or(d, |r: Duration| r.min(d)));
    match i.answer {
        Answer::Unknown => {}
        Answer::Answering | Answer::NotRunning => {
            outage.silent_since = None;
            if let Some(t) = outage.ticket.as_mut().filter(|t| t.state != "resolved") {
                t.state = "resolved".into();
                t.resolved_at = Some(rfc3339(i.now));
                t.version += 1;
                t.summary = bounded(
                    &format!(
                        "{} (resolved: {})",
                        t.summary,
                        if *i.answer == Answer::Answering {
                            "a worker pod answers again"
                        } else {
                            "the flow runs no worker any more"
                        }
                    ),
                    SUMMARY_MAX,
                );
            }
        }
        Answer::Silent { polls, summary } => {
            let since = outage
                .silent_since
                .as_deref()
                .and_then(parse_time)
                .unwrap_or(i.now);
            outage.silent_since = Some(rfc3339(since));
            let open = outage
                .ticket
                .as_ref()
                .is_some_and(|t| t.state != "resolved");
            let due = since + chrono::Duration::from_std(i.settings.after).unwrap_or_default();
            if !open {
                if *polls >= i.settings.polls && i.now >= due {
                    let version = outage.ticket.as_ref().map_or(0, |t| t.version) + 1;
                    let deliveries = outage
                        .ticket
                        .take()
                        .map(|t| t.deliveries)
                        .unwrap_or_default();
                    let (role, owner) = i.roster.map_or(
                        (crate::api::OwnerRole::SyncOwner, String::new()),
                        |(_, a)| (crate::api::OwnerRole::SyncOwner, a.sync_owner.clone()),
                    );
                    outage.ticket = Some(OutageTicket {
                        fingerprint: crate::tickets::fingerprint(
                            i.namespace,
                            i.flow,
                            ExceptionKind::FlowDegraded,
                            Some(ErrorClass::FlowLevel),
                            NO_WORKER_ANSWERING,
                        ),
                        state: "open".into(),
                        acknowledged_at: None,
                        acknowledged_by: None,
                        summary: summary.clone(),
                        opened_at: rfc3339(i.now),
                        resolved_at: None,
                        version,
                        owner,
                        role,
                        escalation_step: 0,
                        page: false,
                        // A reopened ticket keeps each sink's reference to its copy, which it updates.
                        deliveries,
                    });
                } else if i.now < due {
                    soonest(until(i.now, due));
                }
            }
        }
    }
    // A person acknowledging the ticket (by annotation: the controller has no API of its own for people). A
    // value is acted on once, whatever the answer, so an old one never acknowledges a later outage.
    let mut refused = None;
    if let Some(value) = i.acknowledge
        && outage.acknowledgement.as_deref() != Some(value)
    {
        outage.acknowledgement = Some(bounded(value, 128));
        let owner = value
            .split_once(':')
            .map_or(value, |(owner, _)| owner)
            .trim();
        let known = i
            .roster
            .is_some_and(|(spec, _)| spec.owners.iter().any(|o| o.id == owner));
        match outage.ticket.as_mut() {
            Some(t) if t.state == "open" && known => {
                t.state = "acknowledged".into();
                t.acknowledged_at = Some(rfc3339(i.now));
                t.acknowledged_by = Some(owner.to_string());
                t.version += 1;
            }
            Some(t) if t.state == "open" => {
                refused = Some(format!(
                    "{ACK_ANNOTATION}={value:?}: {owner:?} is not an owner in the flow's roster \
                     (the value is <owner id>:<any id>)"
                ));
            }
            _ => {
                refused = Some(format!(
                    "{ACK_ANNOTATION}={value:?}: the flow has no open outage ticket to acknowledge"
                ));
            }
        }
    }
    // Route and climb the ladder while the ticket is open; a version bump sends the change. An acknowledged
    // ticket climbs again only past the roster's `mttrTarget`, as a worker's ticket does.
    if let (Some(t), Some((spec, assignment))) = (outage.ticket.as_mut(), i.roster)
        && t.state != "resolved"
    {
        let routed = route::route(
            spec,
            assignment,
            Cause {
                class: Some(ErrorClass::FlowLevel),
                rule: None,
            },
        );
        let opened = parse_time(&t.opened_at).unwrap_or(i.now);
        let placed = route::place(
            spec,
            assignment,
            &routed,
            opened,
            if t.state == "acknowledged" {
                TicketState::Acknowledged
            } else {
                TicketState::Open
            },
            u32::try_from(t.escalation_step).unwrap_or(0),
            i.now,
        );
        let step = i32::try_from(placed.step).unwrap_or(i32::MAX);
        if (t.role, &t.owner, t.escalation_step, t.page)
            != (placed.role, &placed.owner, step, placed.page)
        {
            // The first placement is part of the opening, not a change of its own.
            if t.deliveries
                .iter()
                .any(|d| d.delivered_version == Some(t.version))
            {
                t.version += 1;
            }
            t.role = placed.role;
            t.owner = placed.owner.clone();
            t.escalation_step = step;
            t.page = placed.page;
        }
        for sink in placed.sinks {
            if t.deliveries.len() < DELIVERIES_MAX && !t.deliveries.iter().any(|d| d.sink == sink) {
                t.deliveries.push(OutageDelivery {
                    sink,
                    ..OutageDelivery::default()
                });
            }
        }
        // The next rung of the ladder, so it is reached without waiting for a poll.
        let mut ladder: Vec<Duration> = spec
            .escalation
            .iter()
            .filter(|s| !s.after.is_negative())
            .map(|s| Duration::from(s.after))
            .collect();
        ladder.sort();
        if let Some(next) = ladder.get(placed.step as usize) {
            let at = opened + chrono::Duration::from_std(*next).unwrap_or_default();
            soonest(until(i.now, at));
        }
    }
    // Every sink behind the ticket's version gets it (a resolve goes to every sink the ticket was routed
    // to), unless it is backing off.
    let mut sends = Vec::new();
    if let Some(t) = outage.ticket.as_mut() {
        for d in &mut t.deliveries {
            if d.delivered_version.is_some_and(|v| v >= t.version) {
                continue;
            }
            if let Some(at) = d.next_attempt_at.as_deref().and_then(parse_time)
                && at > i.now
            {
                soonest(until(i.now, at));
                continue;
            }
            let version = dispatch::version_to_send(
                t.version,
                d.delivered_version.is_some(),
                d.in_doubt_version,
            );
            sends.push(Send {
                sink: d.sink.clone(),
                version,
                in_doubt: d.in_doubt_version.is_some(),
                previous: d
                    .sink_ref
                    .as_deref()
                    .and_then(|r| serde_json::from_str(r).ok()),
            });
            // In doubt from before the send: written with the status before anything goes out.
            d.in_doubt_version = Some(version);
        }
    }
    let keep = outage.silent_since.is_some()
        || outage.ticket.is_some()
        || outage.acknowledgement.is_some();
    Plan {
        outage: keep.then_some(outage),
        sends,
        recheck_in: recheck,
        refused,
    }
}

/// The Event for an outage ticket that opened or resolved in this reconcile, if one did.
pub fn transition(
    before: Option<&FlowOutage>,
    after: Option<&FlowOutage>,
) -> Option<kube::runtime::events::Event> {
    use kube::runtime::events::{Event, EventType};
    let t = after?.ticket.as_ref()?;
    if before
        .and_then(|o| o.ticket.as_ref())
        .map(|b| b.state.as_str())
        == Some(t.state.as_str())
    {
        return None;
    }
    let (type_, reason, note) = if t.state == "open" {
        (
            EventType::Warning,
            "NoWorkerAnswering",
            format!(
                "outage ticket {} opened for {}: {}",
                t.fingerprint, t.owner, t.summary
            ),
        )
    } else if t.state == "acknowledged" {
        (
            EventType::Normal,
            "OutageAcknowledged",
            format!(
                "outage ticket {} acknowledged by {}",
                t.fingerprint,
                t.acknowledged_by.as_deref().unwrap_or_default()
            ),
        )
    } else {
        (
            EventType::Normal,
            "WorkerAnswering",
            format!(
                "outage ticket {} resolved: a worker pod answers again or the flow runs none",
                t.fingerprint
            ),
        )
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(super::event_note(&note)),
        action: "Outage".into(),
        secondary: None,
    })
}

/// Records the result of one send. Pure. A failure keeps the send in doubt (a timed-out send may have
/// arrived) and backs off; a failure before anything was sent (the sink could not be built) is not in doubt.
pub fn settle(
    outage: &mut FlowOutage,
    send: &Send,
    result: Result<Value, (SinkError, bool)>,
    now: DateTime<Utc>,
) {
    let Some(d) = outage
        .ticket
        .as_mut()
        .and_then(|t| t.deliveries.iter_mut().find(|d| d.sink == send.sink))
    else {
        return;
    };
    match result {
        Ok(sink_ref) => {
            d.delivered_version = Some(send.version);
            d.in_doubt_version = None;
            d.sink_ref = Some(sink_ref.to_string()).filter(|r| r.len() <= SINK_REF_MAX);
            d.attempts = 0;
            d.last_error = None;
            d.next_attempt_at = None;
        }
        Err((e, sent)) => {
            if !sent && !send.in_doubt {
                d.in_doubt_version = None;
            }
            d.attempts = d.attempts.saturating_add(1);
            let wait = dispatch::backoff(u32::try_from(d.attempts).unwrap_or(u32::MAX), &e);
            d.last_error = Some(bounded(&e.message, ERROR_MAX));
            d.next_attempt_at = Some(rfc3339(
                now + chrono::Duration::from_std(wait).unwrap_or_default(),
            ));
        }
    }
}

/// The ticket as the sinks see it, rendered by the worker's own renderer so both outboxes say the same.
pub fn ticket(
    namespace: &str,
    flow: &str,
    roster: Option<&OwnershipRoster>,
    t: &OutageTicket,
) -> Ticket {
    let opened_at = parse_time(&t.opened_at).unwrap_or_default();
    let resolved_at = t.resolved_at.as_deref().and_then(parse_time);
    let state = match t.state.as_str() {
        "resolved" => TicketState::Resolved,
        "acknowledged" => TicketState::Acknowledged,
        _ => TicketState::Open,
    };
    let record = TicketRecord {
        fingerprint: t.fingerprint.clone(),
        kind: ExceptionKind::FlowDegraded,
        class: Some(ErrorClass::FlowLevel),
        reason: NO_WORKER_ANSWERING.into(),
        rule: None,
        summary: t.summary.clone(),
        state,
        count: 1,
        outstanding: u64::from(state != TicketState::Resolved),
        opened_at,
        updated_at: resolved_at.unwrap_or(opened_at),
        acknowledged_at: t.acknowledged_at.as_deref().and_then(parse_time),
        acknowledged_by: t.acknowledged_by.clone(),
        resolved_at,
        reopened: 0,
        examples: Vec::new(),
        assignment: (!t.owner.is_empty()).then(|| TicketAssignment {
            role: t.role,
            owner: t.owner.clone(),
            sinks: t.deliveries.iter().map(|d| d.sink.clone()).collect(),
            escalation_step: u32::try_from(t.escalation_step).unwrap_or(0),
            page: t.page,
        }),
        version: t.version,
    };
    dispatch::render(namespace, flow, roster, &record)
}

/// A roster ticket sink built with the credentials the controller reads from its Secret. The error names
/// the sink, the Secret and the reason, never a value.
async fn build_sink(
    ctx: &Context,
    namespace: &str,
    roster: &OwnershipRoster,
    name: &str,
    http: &reqwest::Client,
) -> Result<Box<dyn crate::tickets::sinks::TicketSink>, String> {
    let spec = roster
        .spec
        .ticket_sinks
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            format!(
                "ticket sink {name:?} is not in OwnershipRoster {namespace}/{} any more",
                roster.name_any()
            )
        })?;
    let secret_name = &spec.credentials_secret_ref.name;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(secret_name)
        .await
        .map_err(|e| {
            format!("ticketSinks[{name}]: cannot read Secret {namespace}/{secret_name}: {e}")
        })?
        .ok_or_else(|| {
            format!("ticketSinks[{name}]: Secret {namespace}/{secret_name} not found")
        })?;
    let mut values: BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    values.extend(secret.string_data.unwrap_or_default());
    let credentials = Credentials::from_secret(&format!("{namespace}/{secret_name}"), values);
    crate::tickets::sinks::build(spec, &credentials, http.clone())
}

/// Makes the plan's sends and records each result in `outage`. The caller wrote the in-doubt marks first.
pub async fn deliver(
    ctx: &Context,
    flow: &SyncFlow,
    roster: Option<&OwnershipRoster>,
    outage: &mut FlowOutage,
    sends: &[Send],
) {
    let (ns, name) = (flow.namespace().unwrap_or_default(), flow.name_any());
    let Some(t) = outage.ticket.clone() else {
        return;
    };
    let rendered = ticket(&ns, &name, roster, &t);
    // Connect and request timeouts, as every sink call has: a hung sink must not hold the reconcile.
    let http = crate::connectors::sinks::http_client();
    for send in sends {
        let built = match roster {
            Some(r) => build_sink(ctx, &ns, r, &send.sink, &http).await,
            None => Err(format!(
                "ticket sink {:?}: the flow has no roster any more",
                send.sink
            )),
        };
        let result = match built {
            Err(why) => Err((
                SinkError {
                    retryable: false,
                    status: None,
                    message: why,
                    retry_after: None,
                },
                false,
            )),
            Ok(sink) => {
                let mut version = rendered.clone();
                version.version = send.version;
                dispatch::send(
                    sink.as_ref(),
                    Delivery {
                        ticket: &version,
                        previous: send.previous.as_ref(),
                        in_doubt: send.in_doubt,
                        now: ctx.now(),
                    },
                    ctx.outage.send_lease,
                )
                .await
                .map_err(|e| (e, true))
            }
        };
        match &result {
            Ok(_) => tracing::info!(
                namespace = %ns, flow = %name, sink = %send.sink, version = send.version,
                state = %t.state, "outage ticket delivered"
            ),
            Err((e, _)) => tracing::warn!(
                namespace = %ns, flow = %name, sink = %send.sink, status = e.status, error = %e.message,
                "outage ticket delivery failed; it is retried with backoff"
            ),
        }
        settle(outage, send, result, ctx.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::flow::status::PodObservation;

    fn roster() -> OwnershipRoster {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/hubspot-odoo/roster.yaml"
        ))
        .expect("the example roster");
        serde_yaml::from_str(&text).expect("a roster")
    }

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn silent(polls: u32) -> Answer {
        Answer::Silent {
            polls,
            summary: "none answers".into(),
        }
    }

    fn step(
        r: &OwnershipRoster,
        previous: Option<&FlowOutage>,
        answer: &Answer,
        now: DateTime<Utc>,
    ) -> Plan {
        plan(Inputs {
            namespace: "ns",
            flow: "f",
            previous,
            answer,
            roster: Some((&r.spec, &r.spec.assignments[0])),
            now,
            settings: &OutageSettings::default(),
            acknowledge: None,
        })
    }

    fn delivered(p: &Plan) -> FlowOutage {
        let mut o = p.outage.clone().unwrap();
        for s in &p.sends {
            settle(
                &mut o,
                s,
                Ok(serde_json::json!({"delivered": s.version})),
                t0(),
            );
        }
        o
    }

    #[test]
    fn a_silence_opens_a_ticket_only_once_it_lasted_both_the_time_and_the_polls() {
        let r = roster();
        let first = step(&r, None, &silent(1), t0());
        assert!(first.sends.is_empty());
        let o = first.outage.clone().unwrap();
        assert_eq!(o.silent_since.as_deref(), Some("2026-03-01T10:00:00Z"));
        assert!(o.ticket.is_none());
        assert_eq!(first.recheck_in, Some(Duration::from_secs(300)));
        // Long enough but only two polls (the controller was away): no verdict.
        let later = t0() + chrono::Duration::minutes(10);
        assert!(step(&r, Some(&o), &silent(2), later).sends.is_empty());
        // Three polls but too soon: no verdict either.
        assert!(
            step(
                &r,
                Some(&o),
                &silent(3),
                t0() + chrono::Duration::minutes(1)
            )
            .sends
            .is_empty()
        );
        let open = step(&r, Some(&o), &silent(3), later);
        let t = open.outage.as_ref().unwrap().ticket.as_ref().unwrap();
        assert_eq!((t.state.as_str(), t.version), ("open", 1));
        // FlowLevel routes to the platform owner through the roster's sre-webhook.
        assert_eq!(t.owner, "sre");
        assert_eq!(open.sends.len(), 1);
        assert_eq!(open.sends[0].sink, "sre-webhook");
        assert!(!open.sends[0].in_doubt);
        // Marked in doubt before it is sent.
        assert_eq!(t.deliveries[0].in_doubt_version, Some(1));
    }

    #[test]
    fn an_answer_before_the_verdict_clears_the_silence_and_sends_nothing() {
        let r = roster();
        let o = step(&r, None, &silent(1), t0()).outage.unwrap();
        let p = step(
            &r,
            Some(&o),
            &Answer::Answering,
            t0() + chrono::Duration::minutes(2),
        );
        assert_eq!(p.outage, None);
        assert!(p.sends.is_empty());
    }

    #[test]
    fn an_open_ticket_is_sent_once_then_resolved_once_to_the_sinks_that_had_it() {
        let r = roster();
        let o = step(&r, None, &silent(1), t0()).outage.unwrap();
        let later = t0() + chrono::Duration::minutes(6);
        let o = delivered(&step(&r, Some(&o), &silent(3), later));
        // Still silent: nothing new to send, and an unknown answer (a restarted controller) changes nothing.
        let again = step(&r, Some(&o), &silent(4), later);
        assert!(again.sends.is_empty(), "{again:?}");
        assert_eq!(again.outage.as_ref(), Some(&o));
        assert!(step(&r, Some(&o), &Answer::Unknown, later).sends.is_empty());
        let resolved = step(&r, Some(&o), &Answer::Answering, later);
        assert_eq!(resolved.sends.len(), 1);
        assert_eq!(resolved.sends[0].version, 2);
        assert!(
            resolved.sends[0].previous.is_some(),
            "an update of the sink's copy"
        );
        let o = delivered(&resolved);
        assert_eq!(o.ticket.as_ref().unwrap().state, "resolved");
        assert!(
            step(&r, Some(&o), &Answer::Answering, later)
                .sends
                .is_empty()
        );
    }

    #[test]
    fn a_send_in_doubt_is_resent_under_its_version_and_a_failure_backs_off() {
        let r = roster();
        let o = step(&r, None, &silent(1), t0()).outage.unwrap();
        let later = t0() + chrono::Duration::minutes(6);
        // The controller died after marking the send in doubt.
        let crashed = step(&r, Some(&o), &silent(3), later).outage.unwrap();
        let resend = step(&r, Some(&crashed), &Answer::Unknown, later);
        assert_eq!(resend.sends.len(), 1);
        assert!(resend.sends[0].in_doubt);
        assert_eq!(resend.sends[0].version, 1);
        let mut failed = resend.outage.clone().unwrap();
        let e = SinkError {
            retryable: true,
            status: Some(503),
            message: "ticket sink sre-webhook: POST /meshline answered 503".into(),
            retry_after: None,
        };
        settle(&mut failed, &resend.sends[0], Err((e, true)), later);
        let d = &failed.ticket.as_ref().unwrap().deliveries[0];
        assert_eq!((d.attempts, d.in_doubt_version), (1, Some(1)));
        assert!(d.last_error.as_deref().unwrap().contains("503"));
        // Backing off: not sent again until the next attempt is due.
        let waiting = step(&r, Some(&failed), &silent(4), later);
        assert!(waiting.sends.is_empty());
        assert!(waiting.recheck_in.is_some());
        let due = step(
            &r,
            Some(&failed),
            &silent(5),
            later + chrono::Duration::minutes(11),
        );
        assert_eq!(due.sends.len(), 1);
    }

    fn acknowledged(
        r: &OwnershipRoster,
        previous: &FlowOutage,
        answer: &Answer,
        now: DateTime<Utc>,
        value: &str,
    ) -> Plan {
        plan(Inputs {
            namespace: "ns",
            flow: "f",
            previous: Some(previous),
            answer,
            roster: Some((&r.spec, &r.spec.assignments[0])),
            now,
            settings: &OutageSettings::default(),
            acknowledge: Some(value),
        })
    }

    #[test]
    fn an_owner_acknowledges_the_outage_once_which_stops_the_ladder_and_reaches_the_sinks() {
        let r = roster();
        let owner = r.spec.owners[0].id.clone();
        let o = step(&r, None, &silent(1), t0()).outage.unwrap();
        let opened = t0() + chrono::Duration::minutes(6);
        let o = delivered(&step(&r, Some(&o), &silent(3), opened));
        let at = opened + chrono::Duration::minutes(10);
        let p = acknowledged(&r, &o, &silent(4), at, &format!("{owner}:1"));
        assert_eq!(p.refused, None);
        let t = p.outage.as_ref().unwrap().ticket.as_ref().unwrap();
        assert_eq!(t.state, "acknowledged");
        assert_eq!(t.acknowledged_by.as_deref(), Some(owner.as_str()));
        assert_eq!(
            t.version, 2,
            "the acknowledgement is a change the sinks get"
        );
        assert_eq!(p.sends.len(), 1);
        let rendered = ticket("ns", "f", Some(&r), t);
        assert_eq!(rendered.state, TicketState::Acknowledged);
        assert_eq!(rendered.acknowledged_by.as_deref(), Some(owner.as_str()));
        let o = delivered(&p);
        assert!(
            transition(Some(&o), Some(&o)).is_none(),
            "no Event without a change"
        );
        // Five hours on, the ladder would have paged an unacknowledged outage (see below); this one stays
        // with its owner, and the same annotation value is not taken again.
        let later = acknowledged(
            &r,
            &o,
            &silent(40),
            opened + chrono::Duration::hours(5),
            &format!("{owner}:1"),
        );
        let t = later.outage.as_ref().unwrap().ticket.as_ref().unwrap();
        assert_eq!((t.escalation_step, t.page, t.version), (0, false, 2));
        assert!(later.sends.is_empty());
        assert_eq!(later.refused, None);
        // Resolved when a pod answers; a later outage reopens it unacknowledged, and the old value does not
        // acknowledge it.
        let resolved = delivered(&acknowledged(
            &r,
            &o,
            &Answer::Answering,
            opened + chrono::Duration::hours(6),
            &format!("{owner}:1"),
        ));
        let again = t0() + chrono::Duration::hours(7);
        let silent_again = step(&r, Some(&resolved), &silent(1), again).outage.unwrap();
        let reopened = acknowledged(
            &r,
            &silent_again,
            &silent(3),
            again + chrono::Duration::minutes(6),
            &format!("{owner}:1"),
        );
        let t = reopened.outage.as_ref().unwrap().ticket.as_ref().unwrap();
        assert_eq!(t.state, "open");
        assert_eq!(t.acknowledged_by, None);
    }

    #[test]
    fn an_acknowledgement_for_someone_outside_the_roster_or_without_an_outage_is_refused_once() {
        let r = roster();
        let o = step(&r, None, &silent(1), t0()).outage.unwrap();
        let opened = t0() + chrono::Duration::minutes(6);
        let o = delivered(&step(&r, Some(&o), &silent(3), opened));
        let p = acknowledged(&r, &o, &silent(4), opened, "mallory:1");
        let why = p.refused.as_deref().expect("refused");
        assert!(why.contains("\"mallory\" is not an owner"), "{why}");
        let after = p.outage.unwrap();
        assert_eq!(after.ticket.as_ref().unwrap().state, "open");
        assert!(p.sends.is_empty());
        // Acted on once: the next reconcile with the same value says nothing more.
        assert_eq!(
            acknowledged(&r, &after, &silent(5), opened, "mallory:1").refused,
            None
        );
        // No outage at all: refused, and remembered so it cannot acknowledge a later one.
        let owner = r.spec.owners[0].id.clone();
        let quiet = acknowledged(
            &r,
            &FlowOutage::default(),
            &Answer::Answering,
            t0(),
            &format!("{owner}:7"),
        );
        assert!(quiet.refused.unwrap().contains("no open outage ticket"));
        assert_eq!(
            quiet.outage.unwrap().acknowledgement.as_deref(),
            Some(format!("{owner}:7").as_str())
        );
    }

    #[test]
    fn the_ladder_pages_an_outage_nobody_fixes() {
        let r = roster();
        let o = step(&r, None, &silent(1), t0()).outage.unwrap();
        let opened = t0() + chrono::Duration::minutes(6);
        let o = delivered(&step(&r, Some(&o), &silent(3), opened));
        // The example's ladder: 1h to the sync owner, 4h to sre with a page (no PagerDuty sink in it, so the
        // page changes the owner and the version only).
        let p = step(
            &r,
            Some(&o),
            &silent(9),
            opened + chrono::Duration::hours(5),
        );
        let t = p.outage.as_ref().unwrap().ticket.as_ref().unwrap();
        assert_eq!((t.escalation_step, t.page, t.version), (2, true, 2));
        assert_eq!(p.sends.len(), 1);
    }

    #[test]
    fn an_event_says_when_the_outage_ticket_opens_and_resolves_not_on_every_change() {
        let r = roster();
        let silent_since = step(&r, None, &silent(1), t0()).outage.unwrap();
        let later = t0() + chrono::Duration::minutes(6);
        let open = delivered(&step(&r, Some(&silent_since), &silent(3), later));
        let e = transition(Some(&silent_since), Some(&open)).expect("an Event on opening");
        assert_eq!(e.reason, "NoWorkerAnswering");
        assert!(e.note.unwrap().contains("sre"));
        let escalated = step(
            &r,
            Some(&open),
            &silent(9),
            later + chrono::Duration::hours(5),
        );
        assert!(transition(Some(&open), escalated.outage.as_ref()).is_none());
        let resolved = step(&r, Some(&open), &Answer::Answering, later).outage;
        assert_eq!(
            transition(Some(&open), resolved.as_ref()).map(|e| e.reason),
            Some("WorkerAnswering".to_string())
        );
    }

    #[test]
    fn the_answer_counts_a_pod_that_cannot_start_as_silent() {
        let mut o = Observation::from_pods(
            vec![PodObservation {
                pod: "p-1".into(),
                ready: false,
                address: "10.0.0.1".into(),
                answer: PodAnswer::Unreachable("connection refused".into()),
            }],
            None,
        );
        assert!(
            matches!(answer(true, Some(&o)), Answer::Silent { polls: 1, ref summary } if summary.contains("p-1 unreachable"))
        );
        o = Observation::from_pods(o.pods.clone(), Some(&o));
        assert!(matches!(
            answer(true, Some(&o)),
            Answer::Silent { polls: 2, .. }
        ));
        assert_eq!(answer(true, None), Answer::Unknown);
        assert_eq!(answer(false, Some(&o)), Answer::NotRunning);
    }
}
