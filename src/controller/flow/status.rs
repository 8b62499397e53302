//! Step 6 of the flow reconcile, the pure part: the status a flow should have, from the gates, the Deployment
//! and the worker's last `/status` answer; and whether it differs from the status it has.
//!
//! Conditions are emitted in a fixed order (gates, then Progressing, Ready, Degraded, DiskPressure) because the
//! Argo CD health Lua in the README returns on the first of Ready/Progressing it meets.
//!
//! The worker's problems (`WorkerStatus.problems`, or the 503 body of a worker that could not start) become
//! conditions: `DiskPressure` is its own condition and degrades the flow while it holds (the worker refuses
//! intake but still delivers); any other problem (`LedgerUnavailable`, `CredentialsInvalid`, `StartupFailed`)
//! keeps the worker from its work, so Ready is False and Degraded True, with the problem's kind as the reason and
//! the worker's message as the message. `SourceApiLimit` (the CRM's daily API allowance runs low, so the poll
//! is slowed) degrades the flow but leaves it Ready: records arrive later, nothing stops.

use k8s_openapi::api::apps::v1::Deployment;
use rust_decimal::Decimal;

use super::validate::{Gate, Verdict};
use crate::api::{Condition, SlaSpec, SyncFlowStatus};
use crate::controller::poll::StartupFailure;
use crate::worker::api::{WorkerProblem, WorkerStatus};

/// The problem kind that is a condition of its own.
pub const DISK_PRESSURE: &str = "DiskPressure";
/// The problem kind of a slowed poll: it degrades the flow but does not keep the worker from its work.
pub const SOURCE_API_LIMIT: &str = "SourceApiLimit";
/// The reason when a worker that could not start lists no problem.
const STARTUP_FAILED: &str = "StartupFailed";
/// The CRD's bounds of a condition's `reason` and `message`: a status beyond them is refused by the API server.
pub const REASON_MAX: usize = 128;
pub const MESSAGE_MAX: usize = 4096;

/// What the last status poll saw for one flow.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    Answered(Box<WorkerStatus>),
    /// The worker answered 503: its pipeline could not start, for the reasons it gives.
    NotStarted(StartupFailure),
    /// The worker did not answer; the counters keep their last values.
    Unreachable(String),
}

impl Observation {
    /// The problems the worker reports, and the error of a worker that could not start.
    fn problems(&self) -> (&[WorkerProblem], Option<&str>) {
        match self {
            Observation::Answered(w) => (&w.problems, None),
            Observation::NotStarted(f) => (&f.problems, Some(&f.error)),
            Observation::Unreachable(_) => (&[], None),
        }
    }
}

/// A problem's kind as a condition reason: one CamelCase word within the CRD's bound, or `WorkerProblem` when
/// the worker sent something else (the reason is what metrics and routes match on; it must stay a word).
fn problem_reason(kind: &str) -> String {
    let word = !kind.is_empty()
        && kind.len() <= REASON_MAX
        && kind.starts_with(|c: char| c.is_ascii_alphabetic())
        && kind.chars().all(|c| c.is_ascii_alphanumeric());
    if word {
        kind.to_string()
    } else {
        "WorkerProblem".to_string()
    }
}

/// The problems that keep the worker from its work (all but disk pressure), as (reason, message); a worker that
/// could not start and names no problem is `StartupFailed` with its error.
fn blocking_problems(observation: Option<&Observation>) -> Vec<(String, String)> {
    let Some(o) = observation else {
        return Vec::new();
    };
    let (problems, startup_error) = o.problems();
    let mut out: Vec<(String, String)> = problems
        .iter()
        .filter(|p| p.kind != DISK_PRESSURE && p.kind != SOURCE_API_LIMIT)
        .map(|p| (problem_reason(&p.kind), p.message.clone()))
        .collect();
    if let (true, Some(error)) = (out.is_empty(), startup_error) {
        out.push((STARTUP_FAILED.to_string(), error.to_string()));
    }
    out
}

fn disk_pressure(observation: Option<&Observation>) -> Option<&WorkerProblem> {
    problem(observation, DISK_PRESSURE)
}

fn problem<'a>(observation: Option<&'a Observation>, kind: &str) -> Option<&'a WorkerProblem> {
    observation?.problems().0.iter().find(|p| p.kind == kind)
}

/// The inputs of the status computation.
pub struct StatusInputs<'a> {
    pub generation: Option<i64>,
    pub verdict: &'a Verdict,
    pub paused: bool,
    /// Replicas the controller asks for (0 when paused or not startable).
    pub replicas: i32,
    /// Why replicas were lowered (embedded ledger).
    pub capped: Option<&'a str>,
    /// The Deployment as the cache last saw it.
    pub deployment: Option<&'a Deployment>,
    pub observation: Option<&'a Observation>,
    pub sla: Option<&'a SlaSpec>,
    pub previous: Option<&'a SyncFlowStatus>,
    /// RFC 3339 "now", for conditions whose status changes.
    pub now: &'a str,
}

fn condition(
    t: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        r#type: t.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: None,
    }
}

fn gate(t: &str, g: &Gate, generation: Option<i64>) -> Condition {
    condition(t, g.passed(), g.reason(), g.message(), generation)
}

/// Pods of the Deployment: (ready, updated, rollout observed).
fn pods(d: Option<&Deployment>) -> (i32, i32, bool) {
    let Some(d) = d else { return (0, 0, false) };
    let s = d.status.clone().unwrap_or_default();
    let observed =
        s.observed_generation.is_some() && s.observed_generation == d.metadata.generation;
    (
        s.ready_replicas.unwrap_or(0),
        s.updated_replicas.unwrap_or(0),
        observed,
    )
}

/// Go duration (`15m`, `1h30m`, `90s`) in seconds.
pub fn duration_seconds(d: &kube::core::Duration) -> f64 {
    std::time::Duration::from(*d).as_secs_f64()
}

/// Why the flow is degraded according to the worker's numbers and the contract's SLA, if it is.
pub fn sla_breaches(worker: &WorkerStatus, sla: Option<&SlaSpec>) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(sla) = sla {
        // The last hour's rate, so an outage stops counting an hour after it ends instead of keeping the
        // flow Degraded until thousands of clean records dilute it; the all-time rate from an older worker.
        let (measured, window) = match &worker.failure_rate_last_hour {
            Some(rate) => (rate, " over the last hour"),
            None => (&worker.failure_rate, ""),
        };
        if let (Some(max), Ok(rate)) = (
            sla.max_failure_rate
                .as_deref()
                .and_then(|m| m.parse::<Decimal>().ok()),
            measured.parse::<Decimal>(),
        ) && rate > max
        {
            out.push((
                "FailureRateOverSla",
                format!(
                    "failure rate {rate}{window} is over the contract's SLA maxFailureRate {max}"
                ),
            ));
        }
        if let (Some(max), Some(age)) = (
            sla.max_delivery_latency.as_ref(),
            worker.oldest_pending_seconds,
        ) && (age as f64) > duration_seconds(max)
        {
            out.push((
                "DeliveryLatencyOverSla",
                format!("the oldest pending record is {age}s old, over the contract's SLA maxDeliveryLatency {max}"),
            ));
        }
    }
    if let Some(breaker) = &worker.circuit_breaker {
        out.push((
            "CircuitBreakerOpen",
            format!(
                "the worker's circuit breaker is open since {}: {}",
                breaker.since, breaker.reason
            ),
        ));
    }
    if let Some(reason) = &worker.paused {
        out.push((
            "WorkerGated",
            format!("the worker processes nothing: {reason}"),
        ));
    }
    out
}

pub fn compute(i: StatusInputs<'_>) -> SyncFlowStatus {
    let g = i.generation;
    let v = i.verdict;
    let mut status = i.previous.cloned().unwrap_or_default();
    status.observed_generation = g;
    status.active_contract_version = v.contract.as_ref().map(|c| c.spec.version.clone());

    if let Some(Observation::Answered(w)) = i.observation {
        status.counters = w.counters.clone();
        status.failure_rate = Some(w.failure_rate.clone());
        status.last_delivery_time = w.last_delivery_time.clone();
        status.mttr_seconds = w.mttr_seconds;
        status.manual_interventions_per_1k = Some(w.manual_interventions_per_1k.clone());
        status.oldest_pending_seconds = w.oldest_pending_seconds;
    }

    let mut conditions = vec![
        gate("ContractResolved", &v.contract_resolved, g),
        gate("OwnerAssigned", &v.owner_assigned, g),
        gate("SecretsReady", &v.secrets_ready, g),
    ];
    let (ready_pods, updated, observed) = pods(i.deployment);
    let (progressing, ready, degraded);
    if let Some(failed) = v.first_failure() {
        let msg = format!("not started: {}", failed.message());
        progressing = condition("Progressing", false, failed.reason(), msg.clone(), g);
        ready = condition("Ready", false, failed.reason(), msg.clone(), g);
        degraded = condition("Degraded", true, failed.reason(), msg, g);
    } else if i.paused {
        let msg = "paused by spec.paused: scaled to 0, the ledger is kept";
        progressing = condition("Progressing", false, "Paused", msg, g);
        ready = condition("Ready", true, "Paused", msg, g);
        degraded = condition("Degraded", false, "Paused", msg, g);
    } else {
        let want = i.replicas;
        let rolled = i.deployment.is_some() && observed && updated >= want && ready_pods >= want;
        let cap = i.capped.map(|c| format!("; {c}")).unwrap_or_default();
        progressing = if rolled {
            condition(
                "Progressing",
                false,
                "RolledOut",
                format!("{ready_pods}/{want} worker pods ready{cap}"),
                g,
            )
        } else {
            condition(
                "Progressing",
                true,
                "RollingOut",
                format!("{ready_pods}/{want} worker pods ready, {updated} updated{cap}"),
                g,
            )
        };
        // The worker's own problems come first: they are more specific than the numbers they cause.
        let blocking = blocking_problems(i.observation);
        let mut breaches: Vec<(String, String)> = blocking.clone();
        if let Some(p) = disk_pressure(i.observation) {
            breaches.push((DISK_PRESSURE.to_string(), p.message.clone()));
        }
        if let Some(p) = problem(i.observation, SOURCE_API_LIMIT) {
            breaches.push((SOURCE_API_LIMIT.to_string(), p.message.clone()));
        }
        if let Some(Observation::Answered(w)) = i.observation {
            breaches.extend(
                sla_breaches(w, i.sla)
                    .into_iter()
                    .map(|(r, m)| (r.to_string(), m)),
            );
        }
        // Pods that stay unready after the rollout finished are a fault, not progress.
        if i.deployment.is_some() && observed && updated >= want && ready_pods < want {
            breaches.push((
                "WorkerPodsNotReady".to_string(),
                format!("{ready_pods}/{want} worker pods are ready"),
            ));
        }
        ready = if let Some((reason, _)) = blocking.first() {
            let message = blocking
                .iter()
                .map(|b| b.1.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition("Ready", false, reason, message, g)
        } else if rolled {
            condition(
                "Ready",
                true,
                "WorkerRunning",
                format!("{ready_pods}/{want} worker pods ready{cap}"),
                g,
            )
        } else {
            condition(
                "Ready",
                false,
                "RollingOut",
                format!("{ready_pods}/{want} worker pods ready{cap}"),
                g,
            )
        };
        degraded = if breaches.is_empty() {
            let why = match i.observation {
                Some(Observation::Unreachable(e)) => {
                    format!("within SLA as last seen; worker status unavailable: {e}")
                }
                _ => "within SLA".to_string(),
            };
            condition("Degraded", false, "WithinSla", why, g)
        } else {
            let reason = breaches[0].0.as_str();
            let message = breaches
                .iter()
                .map(|b| b.1.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition("Degraded", true, reason, message, g)
        };
    }
    let running = v.first_failure().is_none() && !i.paused;
    conditions.extend([
        progressing,
        ready,
        degraded,
        disk_pressure_condition(running, i.observation, g),
    ]);
    status.conditions = carry_transition_times(
        i.previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]),
        conditions,
        i.now,
    );
    status
}

/// `DiskPressure`: True while the worker reports it, False when its last answer does not, Unknown when no worker
/// runs or none has answered yet.
fn disk_pressure_condition(
    running: bool,
    observation: Option<&Observation>,
    generation: Option<i64>,
) -> Condition {
    let answered = matches!(
        observation,
        Some(Observation::Answered(_) | Observation::NotStarted(_))
    );
    let (status, reason, message) = match disk_pressure(observation) {
        _ if !running => (
            "Unknown",
            "WorkerNotRunning",
            "no worker runs for this flow".to_string(),
        ),
        Some(p) => (
            "True",
            DISK_PRESSURE,
            format!("{} (since {})", p.message, p.since),
        ),
        None if answered => (
            "False",
            "NoDiskPressure",
            "the worker reports enough free space".to_string(),
        ),
        None => (
            "Unknown",
            "NoWorkerStatus",
            "the worker's status has not been read yet".to_string(),
        ),
    };
    Condition {
        r#type: DISK_PRESSURE.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: None,
    }
}

/// Keeps a condition within the CRD's bounds (a worker's message, a compile error), so that the status write
/// is never refused for its length.
fn within_bounds(c: &mut Condition) {
    if c.reason.chars().count() > REASON_MAX {
        c.reason = c.reason.chars().take(REASON_MAX).collect();
    }
    if c.message.chars().count() > MESSAGE_MAX {
        let mut m: String = c.message.chars().take(MESSAGE_MAX - 1).collect();
        m.push('…');
        c.message = m;
    }
}

/// `lastTransitionTime` moves only when a condition's status changes; otherwise the previous time is kept.
/// Every condition also leaves here within the CRD's bounds on `reason` and `message`.
pub fn carry_transition_times(
    previous: &[Condition],
    mut next: Vec<Condition>,
    now: &str,
) -> Vec<Condition> {
    for c in &mut next {
        within_bounds(c);
        c.last_transition_time = match previous.iter().find(|p| p.r#type == c.r#type) {
            Some(p) if p.status == c.status && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(now.to_string()),
        };
    }
    next
}

fn without_times(conditions: &[Condition]) -> Vec<Condition> {
    conditions
        .iter()
        .map(|c| Condition {
            last_transition_time: None,
            ..c.clone()
        })
        .collect()
}

/// Whether a status write is needed: anything differs except the transition times.
pub fn differs<S: Clone + PartialEq>(
    current: Option<&S>,
    next: &S,
    conditions: impl Fn(&mut S) -> &mut Vec<Condition>,
) -> bool {
    let Some(current) = current else { return true };
    let (mut a, mut b) = (current.clone(), next.clone());
    let ca = without_times(conditions(&mut a));
    *conditions(&mut a) = ca;
    let cb = without_times(conditions(&mut b));
    *conditions(&mut b) = cb;
    a != b
}

/// The status of a condition type, if present.
pub fn condition_status<'a>(conditions: &'a [Condition], t: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.r#type == t)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(all_time: &str, last_hour: Option<&str>) -> WorkerStatus {
        serde_json::from_value(serde_json::json!({
            "flow": "f", "contractVersion": "1.0.0", "backend": "sqlite",
            "counters": {"received": 1000, "delivered": 500, "failed": 500, "retried": 0,
                         "deadLettered": 500, "held": 0},
            "pending": 0, "failureRate": all_time, "failureRateLastHour": last_hour,
            "lastDeliveryTime": null, "mttrSeconds": null, "manualInterventionsPer1k": "0",
            "oldestPendingSeconds": null, "circuitBreaker": null, "paused": null
        }))
        .expect("a worker status")
    }

    fn sla(max: &str) -> SlaSpec {
        serde_json::from_value(serde_json::json!({"maxFailureRate": max})).expect("an SLA")
    }

    #[test]
    fn an_outage_that_ended_over_an_hour_ago_no_longer_breaches_the_failure_rate_sla() {
        // Half the records ever received failed in an old outage; none failed in the last hour.
        assert!(sla_breaches(&worker("0.5", Some("0")), Some(&sla("0.05"))).is_empty());
        let now = sla_breaches(&worker("0.01", Some("0.2")), Some(&sla("0.05")));
        assert_eq!(now.len(), 1, "{now:?}");
        assert_eq!(now[0].0, "FailureRateOverSla");
        assert!(now[0].1.contains("over the last hour"), "{}", now[0].1);
        // A worker that predates the window is judged on its all-time rate.
        assert_eq!(
            sla_breaches(&worker("0.5", None), Some(&sla("0.05")))[0].0,
            "FailureRateOverSla"
        );
    }
}
