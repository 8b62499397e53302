//! Step 6 of the flow reconcile, the pure part: the status a flow should have, from the gates, the Deployment
//! and what the worker pods last said on `/status`; and whether it differs from the status it has.
//!
//! Conditions are emitted in a fixed order (gates, ContractUpToDate, then Progressing, Ready, Degraded,
//! DiskPressure, StatusUnavailable), so that a status that did not change serialises the same and is not written
//! again. The Argo CD health checks (`charts/meshline/argocd/`) look conditions up by type, not by position.
//!
//! The counters come from the ledger the pods share, read once; everything that lives in a worker process
//! comes from each pod. The workers' problems (`WorkerStatus.problems`, or the 503 body of a worker that could
//! not start) become conditions: `DiskPressure` is its own condition and degrades the flow while any pod has it
//! (that worker refuses intake but still delivers); any other problem (`LedgerUnavailable`,
//! `CredentialsInvalid`, `StartupFailed`) keeps that pod from its work, so Degraded is True with the problem's
//! kind as the reason and the worker's message as the message, and Ready is False when no pod is free of such
//! problems. Any pod's open circuit breaker or gate degrades the flow. With several pods, each message names
//! the pods it is about. A pod that does not answer makes `StatusUnavailable` True with its error.
//! `SourceApiLimit` (the CRM's daily API allowance runs low, so the poll is slowed) degrades the flow but
//! leaves it Ready: records arrive later, nothing stops.

use k8s_openapi::api::apps::v1::Deployment;
use rust_decimal::Decimal;

use super::validate::{Gate, Verdict};
use crate::api::{Condition, SlaSpec, SyncContract, SyncFlowStatus, WorkerPodStatus};
use crate::controller::poll::StartupFailure;
use crate::worker::api::{WorkerProblem, WorkerStatus};

/// The problem kind that is a condition of its own.
pub const DISK_PRESSURE: &str = "DiskPressure";
/// The problem kind of a slowed poll: it degrades the flow but does not keep the worker from its work.
pub const SOURCE_API_LIMIT: &str = "SourceApiLimit";
/// The condition that names worker pods the last poll could not read.
pub const STATUS_UNAVAILABLE: &str = "StatusUnavailable";
/// How many worker pods `status.workers` lists (the CRD's `maxItems`); the rest are counted in
/// `workersOmitted`.
pub const WORKERS_LISTED: usize = 20;
/// The CRD's bound on a listed pod's `message` and `paused`.
const WORKER_TEXT_MAX: usize = 512;
/// The reason when a worker that could not start lists no problem.
const STARTUP_FAILED: &str = "StartupFailed";
/// The CRD's bounds of a condition's `reason` and `message`: a status beyond them is refused by the API server.
pub const REASON_MAX: usize = 128;
pub const MESSAGE_MAX: usize = 4096;

/// What one worker pod answered to the last status poll.
#[derive(Debug, Clone, PartialEq)]
pub enum PodAnswer {
    Running(Box<WorkerStatus>),
    /// The worker answered 503: its pipeline could not start, for the reasons it gives.
    NotStarted(StartupFailure),
    /// The pod did not answer (or not in time), with why.
    Unreachable(String),
}

/// One worker pod in the last status poll.
#[derive(Debug, Clone, PartialEq)]
pub struct PodObservation {
    pub pod: String,
    /// The pod's IP, to reach its operations API again (a canary's measures).
    pub address: String,
    /// Whether the pod passes its readiness probe.
    pub ready: bool,
    pub answer: PodAnswer,
}

impl PodObservation {
    /// The problems the pod reports, and the error of a pod that could not start.
    fn problems(&self) -> (&[WorkerProblem], Option<&str>) {
        match &self.answer {
            PodAnswer::Running(w) => (&w.problems, None),
            PodAnswer::NotStarted(f) => (&f.problems, Some(&f.error)),
            PodAnswer::Unreachable(_) => (&[], None),
        }
    }

    /// Its problems that keep it from its work (all but disk pressure), as (reason, message); a pod that could
    /// not start and names no problem is `StartupFailed` with its error.
    fn blocking(&self) -> Vec<(String, String)> {
        let (problems, startup_error) = self.problems();
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

    fn disk_pressure(&self) -> Option<&WorkerProblem> {
        self.problem(DISK_PRESSURE)
    }

    fn problem(&self, kind: &str) -> Option<&WorkerProblem> {
        self.problems().0.iter().find(|p| p.kind == kind)
    }

    /// Running with nothing keeping it from its work.
    fn works(&self) -> bool {
        matches!(self.answer, PodAnswer::Running(_)) && self.blocking().is_empty()
    }
}

/// What the last status poll saw for one flow: the ledger's numbers once, and each published pod.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// The numbers of the ledger the pods share, from one pod that answered (the first by name); when none
    /// answered this time, the last ones read (see `ledger_fresh`), so the counters never drop to zero on a
    /// blip.
    pub ledger: Option<Box<WorkerStatus>>,
    /// Whether `ledger` was read in this poll.
    pub ledger_fresh: bool,
    /// Every worker pod the status Service publishes, sorted by name.
    pub pods: Vec<PodObservation>,
    /// Consecutive polls, this one included, in which no pod answered with its numbers (none published,
    /// none reachable, or every one unable to start); 0 when one did. It also makes each silent poll a
    /// change, so the reconciler sees every one of them (see `outage`).
    pub silent_polls: u32,
}

impl Observation {
    /// Folds one poll's pod answers into an observation, carrying the last ledger numbers when no pod gave any.
    pub fn from_pods(mut pods: Vec<PodObservation>, previous: Option<&Observation>) -> Observation {
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        let fresh = pods.iter().find_map(|p| match &p.answer {
            PodAnswer::Running(w) => Some(w.clone()),
            _ => None,
        });
        Observation {
            ledger_fresh: fresh.is_some(),
            silent_polls: if fresh.is_some() {
                0
            } else {
                previous.map_or(0, |p| p.silent_polls).saturating_add(1)
            },
            ledger: fresh.or_else(|| previous.and_then(|p| p.ledger.clone())),
            pods,
        }
    }

    /// One pod that answered with `status`: what a single-replica flow's poll sees.
    pub fn answered(pod: &str, status: WorkerStatus) -> Observation {
        Observation::from_pods(
            vec![PodObservation {
                pod: pod.into(),
                address: "127.0.0.1".into(),
                ready: true,
                answer: PodAnswer::Running(Box::new(status)),
            }],
            None,
        )
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

/// Findings (reason, message) gathered from the pods, the same finding of several pods said once with their
/// names. A flow with one pod gets the worker's message as it is.
#[derive(Default)]
struct Findings {
    multi: bool,
    items: Vec<(String, String, Vec<String>)>,
}

impl Findings {
    fn new(observation: Option<&Observation>) -> Findings {
        Findings {
            multi: observation.is_some_and(|o| o.pods.len() > 1),
            items: Vec::new(),
        }
    }
    fn push(&mut self, pod: &str, reason: String, message: String) {
        match self
            .items
            .iter_mut()
            .find(|(r, m, _)| *r == reason && *m == message)
        {
            Some((_, _, pods)) => pods.push(pod.to_string()),
            None => self.items.push((reason, message, vec![pod.to_string()])),
        }
    }
    fn render(&self) -> Vec<(String, String)> {
        self.items
            .iter()
            .map(|(reason, message, pods)| {
                let message = match (self.multi, pods.len()) {
                    (false, _) => message.clone(),
                    (true, 1) => format!("pod {}: {message}", pods[0]),
                    (true, _) => format!("pods {}: {message}", pods.join(", ")),
                };
                (reason.clone(), message)
            })
            .collect()
    }
}

/// The problems that keep pods from their work, and whether they keep the whole flow from it (no pod works).
fn blocking_problems(observation: Option<&Observation>) -> (Vec<(String, String)>, bool) {
    let mut findings = Findings::new(observation);
    let Some(o) = observation else {
        return (Vec::new(), false);
    };
    for pod in &o.pods {
        for (reason, message) in pod.blocking() {
            findings.push(&pod.pod, reason, message);
        }
    }
    let out = findings.render();
    let none_works = !out.is_empty() && !o.pods.iter().any(PodObservation::works);
    (out, none_works)
}

/// Disk pressure as the pods report it: the message (with the pods when several), and whether any does.
fn disk_pressure(observation: Option<&Observation>, with_since: bool) -> Option<String> {
    let o = observation?;
    let mut findings = Findings::new(Some(o));
    for pod in &o.pods {
        if let Some(p) = pod.disk_pressure() {
            let message = if with_since {
                format!("{} (since {})", p.message, p.since)
            } else {
                p.message.clone()
            };
            findings.push(&pod.pod, DISK_PRESSURE.into(), message);
        }
    }
    let out = findings.render();
    (!out.is_empty()).then(|| {
        out.into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// A slowed poll as the pods report it (the poller runs in every pod, each with its own allowance reading).
fn source_api_limit(observation: Option<&Observation>) -> Option<String> {
    let o = observation?;
    let mut findings = Findings::new(Some(o));
    for pod in &o.pods {
        if let Some(p) = pod.problem(SOURCE_API_LIMIT) {
            findings.push(&pod.pod, SOURCE_API_LIMIT.into(), p.message.clone());
        }
    }
    let out = findings.render();
    (!out.is_empty()).then(|| {
        out.into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Each pod's own reasons to degrade the flow: an open circuit breaker, a gate that holds all work.
fn process_breaches(observation: Option<&Observation>) -> Vec<(String, String)> {
    let mut findings = Findings::new(observation);
    for pod in observation.map(|o| o.pods.as_slice()).unwrap_or(&[]) {
        if let PodAnswer::Running(w) = &pod.answer {
            for (reason, message) in process_state_breaches(w) {
                findings.push(&pod.pod, reason.to_string(), message);
            }
        }
    }
    findings.render()
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
    /// The SyncContract as it is (its live spec and status), to say whether the flow runs its latest version.
    pub live_contract: Option<&'a SyncContract>,
    /// The flow's name (its preflight results are found by it).
    pub flow_name: &'a str,
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

/// Why the flow is degraded according to the ledger's numbers and the contract's SLA, if it is.
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
    out
}

/// Why one worker process degrades the flow, whatever the ledger says: its circuit breaker is open, or a gate
/// (a lookup that never loaded) holds all its work. These live in each process, so each pod is asked.
pub fn process_state_breaches(worker: &WorkerStatus) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
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
    status.contract_revision = v
        .contract
        .as_ref()
        .and_then(|_| i.live_contract?.status.as_ref()?.active_revision.clone());

    if let Some(w) = i.observation.and_then(|o| o.ledger.as_deref()) {
        status.counters = w.counters.clone();
        status.failure_rate = Some(w.failure_rate.clone());
        status.failure_rate_sla_window = w.failure_rate_last_hour.clone();
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
        // The workers' own problems come first: they are more specific than the numbers they cause.
        let (blocking, none_works) = blocking_problems(i.observation);
        let mut breaches: Vec<(String, String)> = blocking.clone();
        if let Some(message) = disk_pressure(i.observation, false) {
            breaches.push((DISK_PRESSURE.to_string(), message));
        }
        if let Some(message) = source_api_limit(i.observation) {
            breaches.push((SOURCE_API_LIMIT.to_string(), message));
        }
        if let Some(w) = i.observation.and_then(|o| o.ledger.as_deref()) {
            breaches.extend(
                sla_breaches(w, i.sla)
                    .into_iter()
                    .map(|(r, m)| (r.to_string(), m)),
            );
        }
        // Any pod's open breaker degrades the flow: that pod's share of the records waits.
        breaches.extend(process_breaches(i.observation));
        // Pods that stay unready after the rollout finished are a fault, not progress.
        if i.deployment.is_some() && observed && updated >= want && ready_pods < want {
            breaches.push((
                "WorkerPodsNotReady".to_string(),
                format!("{ready_pods}/{want} worker pods are ready"),
            ));
        }
        // Ready goes False for the workers' problems only when no pod can do the work; a pod in trouble beside
        // a working one is Degraded.
        ready = if let (true, Some((reason, _))) = (none_works, blocking.first()) {
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
                Some(o) if o.ledger.is_some() && !o.ledger_fresh => {
                    "within SLA as last seen; no worker pod answered (see StatusUnavailable)"
                        .to_string()
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
    let flow_name = i.flow_name;
    status.preflight = i
        .live_contract
        .and_then(|c| c.status.as_ref())
        .and_then(|s| s.preflight.iter().find(|p| p.flow == flow_name).cloned());
    if let Some(c) = contract_up_to_date(i.live_contract, v, g) {
        conditions.push(c);
    }
    conditions.extend([
        progressing,
        ready,
        degraded,
        disk_pressure_condition(running, i.observation, g),
        status_unavailable_condition(running, i.observation, g),
    ]);
    (status.workers, status.workers_omitted) = if running {
        worker_list(i.observation)
    } else {
        (Vec::new(), None)
    };
    status.conditions = carry_transition_times(
        i.previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]),
        conditions,
        i.now,
    );
    status
}

/// `ContractUpToDate`: whether the workers run the contract's current spec, and if not, which gate holds the
/// change (the contract's `Ready` reason and message). None when the contract did not resolve (its own gate
/// says why).
fn contract_up_to_date(
    live: Option<&SyncContract>,
    v: &Verdict,
    g: Option<i64>,
) -> Option<Condition> {
    let live = live?;
    let running = v.contract.as_ref()?;
    let hash = crate::contract::content_hash(&live.spec);
    if crate::contract::content_hash(&running.spec) == hash {
        return Some(condition(
            "ContractUpToDate",
            true,
            "RunningLatest",
            format!(
                "the workers run version {}, the contract's current spec",
                running.spec.version
            ),
            g,
        ));
    }
    let ready = live
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"));
    let (reason, message) = match ready {
        Some(c) if c.status == "False" => (c.reason.clone(), c.message.clone()),
        _ => (
            "ChangePending".to_string(),
            format!(
                "version {} is not judged yet; the workers run version {}",
                live.spec.version, running.spec.version
            ),
        ),
    };
    Some(condition("ContractUpToDate", false, &reason, message, g))
}

/// `DiskPressure`: True while any worker pod reports it, False when the pods that answered do not, Unknown when
/// no worker runs or none has answered yet.
fn disk_pressure_condition(
    running: bool,
    observation: Option<&Observation>,
    generation: Option<i64>,
) -> Condition {
    let answered = observation.is_some_and(|o| {
        o.pods
            .iter()
            .any(|p| !matches!(p.answer, PodAnswer::Unreachable(_)))
    });
    let (status, reason, message) = match disk_pressure(observation, true) {
        _ if !running => (
            "Unknown",
            "WorkerNotRunning",
            "no worker runs for this flow".to_string(),
        ),
        Some(message) => ("True", DISK_PRESSURE, message),
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

/// The condition that says the status is not what the pods say right now: True when a published pod did not
/// answer (with its error) or the status Service publishes no pod at all, so numbers that stopped moving are
/// never mistaken for a quiet flow.
fn status_unavailable_condition(
    running: bool,
    observation: Option<&Observation>,
    generation: Option<i64>,
) -> Condition {
    let (status, reason, message) = match observation {
        _ if !running => (
            "Unknown",
            "WorkerNotRunning",
            "no worker runs for this flow".to_string(),
        ),
        None => (
            "Unknown",
            "NoWorkerStatus",
            "the worker's status has not been read yet".to_string(),
        ),
        Some(o) if o.pods.is_empty() => (
            "True",
            "NoWorkerPods",
            "the flow's status Service publishes no worker pod yet; the counters are as last read"
                .to_string(),
        ),
        Some(o) => {
            let mut findings = Findings::new(Some(o));
            for pod in &o.pods {
                if let PodAnswer::Unreachable(e) = &pod.answer {
                    findings.push(&pod.pod, "WorkerUnreachable".into(), e.clone());
                }
            }
            let unreachable = findings.render();
            if unreachable.is_empty() {
                (
                    "False",
                    "AllWorkersAnswered",
                    format!("{} of {} worker pods answered", o.pods.len(), o.pods.len()),
                )
            } else {
                let mut message = unreachable
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; ");
                if !o.ledger_fresh {
                    message.push_str("; the counters are as last read");
                }
                ("True", "WorkerUnreachable", message)
            }
        }
    };
    Condition {
        r#type: STATUS_UNAVAILABLE.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: None,
    }
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

/// The per-pod list of the status: pods in trouble first (then by name), at most [`WORKERS_LISTED`], every
/// field within the CRD's bounds; and how many were left out.
fn worker_list(observation: Option<&Observation>) -> (Vec<WorkerPodStatus>, Option<i32>) {
    let Some(o) = observation else {
        return (Vec::new(), None);
    };
    let mut list: Vec<WorkerPodStatus> = o
        .pods
        .iter()
        .map(|p| {
            let (state, breaker, paused, message) = match &p.answer {
                PodAnswer::Running(w) => (
                    "Running",
                    w.circuit_breaker.as_ref(),
                    w.paused.as_deref(),
                    w.circuit_breaker.as_ref().map(|b| b.reason.as_str()),
                ),
                PodAnswer::NotStarted(f) => ("NotStarted", None, None, Some(f.error.as_str())),
                PodAnswer::Unreachable(e) => ("Unreachable", None, None, Some(e.as_str())),
            };
            WorkerPodStatus {
                pod: bounded(&p.pod, 253),
                ready: p.ready,
                state: state.into(),
                circuit_breaker_open_since: breaker.map(|b| bounded(&b.since, 64)),
                paused: paused.map(|r| bounded(r, WORKER_TEXT_MAX)),
                problems: p
                    .problems()
                    .0
                    .iter()
                    .take(8)
                    .map(|k| problem_reason(&k.kind))
                    .collect(),
                message: message.map(|m| bounded(m, WORKER_TEXT_MAX)),
            }
        })
        .collect();
    let trouble = |w: &WorkerPodStatus| {
        !(w.state == "Running"
            && w.ready
            && w.circuit_breaker_open_since.is_none()
            && w.paused.is_none()
            && w.problems.is_empty())
    };
    list.sort_by(|a, b| trouble(b).cmp(&trouble(a)).then_with(|| a.pod.cmp(&b.pod)));
    let omitted = list.len().saturating_sub(WORKERS_LISTED);
    list.truncate(WORKERS_LISTED);
    (
        list,
        (omitted > 0).then(|| i32::try_from(omitted).unwrap_or(i32::MAX)),
    )
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
    fn a_listed_pod_stays_within_the_crd_bounds_whatever_its_worker_says() {
        let mut w = worker("0", Some("0"));
        w.paused = Some("p".repeat(5000));
        w.circuit_breaker = Some(crate::worker::api::BreakerStatus {
            reason: "r".repeat(5000),
            since: "s".repeat(500),
        });
        w.problems = (0..12)
            .map(|i| WorkerProblem {
                kind: format!("Kind{i}"),
                message: "m".into(),
                since: "t".into(),
            })
            .collect();
        let (list, omitted) = worker_list(Some(&Observation::answered(&"n".repeat(300), w)));
        assert_eq!(omitted, None);
        let p = &list[0];
        assert_eq!(p.pod.chars().count(), 253);
        assert_eq!(p.paused.as_ref().unwrap().chars().count(), WORKER_TEXT_MAX);
        assert_eq!(p.message.as_ref().unwrap().chars().count(), WORKER_TEXT_MAX);
        assert_eq!(
            p.circuit_breaker_open_since
                .as_ref()
                .unwrap()
                .chars()
                .count(),
            64
        );
        assert_eq!(p.problems.len(), 8);
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
