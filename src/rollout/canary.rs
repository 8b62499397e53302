//! The canary of one contract candidate on one flow, as a pure state machine over `SyncFlow.status.canary`:
//! steps and pauses, analysis of each measurement, people's commands, abort with rollback, and promotion.
//!
//! Phases (after Argo Rollouts):
//! - `Progressing`: the canary track takes the current step's weight of the buckets. A step's clock starts
//!   when every worker of both tracks applies its weight (reported in `/status`), never when the weight was
//!   asked for, so a slow kubelet or a pod that is not up yet never shortens a step. A step is done when its
//!   pause has passed and, with an analysis, at least one measurement at this step passed: no evidence, no
//!   next step.
//! - `Paused`: by a person, or because the flow's ledger cannot be shared by two tracks (the embedded SQLite
//!   ledger lives on a volume one pod mounts): canaries need the PostgreSQL ledger, and the flow says so
//!   until a person promotes or aborts.
//! - `Promoting`: every step passed (or a person said promote); the contract makes the candidate its active
//!   revision once every bound flow is here, then the stable track runs it and the canary is removed.
//! - `Aborting`: the split goes back to stable at once; the canary Deployment is removed, and when its pods
//!   are gone the records they had leased are released to stable.
//! - `Promoted` and `Aborted` are final; `retry` starts an aborted rollout again from its first step.
//!
//! Analysis compares the canary's measures over the window with the thresholds and with the stable track's
//! measures over the same window: a threshold the stable track breaks as well (the ERP is down for everyone)
//! makes the measurement `Inconclusive`, not `Failed`, since it says nothing about the version. Failed
//! measurements beyond `failureLimit` (default 0: the first failure aborts) and measurements that could not be
//! taken beyond `consecutiveErrorLimit` in a row (default 4) abort the rollout.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::split::Split;
use crate::api::{CanaryAnalysis, CanaryMeasurement, CanaryPolicy, CanaryStatus, TrackMeasures};

/// The annotation people (and `meshline rollout`) put a command in: `<verb>:<id>`, e.g. `promote:1733059200`.
/// The id makes a command happen once however often the manifest is applied or the controller restarts; the
/// status keeps the last id acted on.
pub const COMMAND_ANNOTATION: &str = "sync.meshline.io/rollout-command";

pub const PROGRESSING: &str = "Progressing";
pub const PAUSED: &str = "Paused";
pub const PROMOTING: &str = "Promoting";
pub const PROMOTED: &str = "Promoted";
pub const ABORTING: &str = "Aborting";
pub const ABORTED: &str = "Aborted";

/// Measurements kept in the status.
const KEPT_MEASUREMENTS: usize = 10;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_CONSECUTIVE_ERROR_LIMIT: u32 = 4;
/// How often a rollout that waits for workers to apply a weight, or for its canary pods to go, looks again
/// (the status poll also wakes it).
const WAIT_REQUEUE: Duration = Duration::from_secs(10);

/// A rollout command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Pause,
    Resume,
    Promote,
    Abort,
    Retry,
}

impl Verb {
    pub const ALL: [Verb; 5] = [
        Verb::Pause,
        Verb::Resume,
        Verb::Promote,
        Verb::Abort,
        Verb::Retry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Promote => "promote",
            Verb::Abort => "abort",
            Verb::Retry => "retry",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub verb: Verb,
    pub id: String,
}

impl Command {
    /// Parses the annotation's value. An error names the annotation and says what is accepted.
    pub fn parse(value: &str) -> Result<Command, String> {
        let value = value.trim();
        let (verb, id) = value.split_once(':').unwrap_or((value, ""));
        let verb = Verb::ALL
            .into_iter()
            .find(|v| v.as_str() == verb.trim())
            .ok_or_else(|| {
                format!(
                    "annotation {COMMAND_ANNOTATION}: {:?} is not a rollout command: expected <verb>:<id> with verb pause, resume, promote, abort or retry",
                    super::clip(value, 64)
                )
            })?;
        if id.trim().is_empty() {
            return Err(format!(
                "annotation {COMMAND_ANNOTATION}: {:?} has no id: write {}:<id> (any new value, e.g. the time) so the command is acted on once",
                super::clip(value, 64),
                verb.as_str()
            ));
        }
        Ok(Command {
            verb,
            id: value.to_string(),
        })
    }

    pub fn annotation_value(verb: Verb, id: &str) -> String {
        format!("{}:{id}", verb.as_str())
    }
}

/// The contract's candidate this flow should canary.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub revision: &'a str,
    pub version: &'a str,
}

/// What the controller sees of the flow's workers.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The weight every worker of both tracks reports applying for the candidate, when they all agree (and
    /// every canary worker runs the candidate).
    pub applied_weight: Option<u8>,
    /// Pods of the canary Deployment that still exist.
    pub canary_pods: usize,
    /// Why the canary Deployment cannot make progress (`ProgressDeadlineExceeded`), if it cannot.
    pub canary_stuck: Option<String>,
    /// The revision every stable worker reports running, when they all agree.
    pub stable_revision: Option<String>,
}

/// One measurement as the controller took it.
#[derive(Clone, Debug)]
pub enum Measured {
    Taken {
        canary: TrackMeasures,
        stable: TrackMeasures,
    },
    /// The workers or the ledger did not answer.
    Error(String),
}

pub struct Inputs<'a> {
    pub policy: Option<&'a CanaryPolicy>,
    /// Whether both tracks can share the flow's ledger (PostgreSQL).
    pub shared_ledger: bool,
    /// The candidate to canary: the contract's current spec while it is in `Canary`, or rejected by an aborted
    /// canary (so `retry` can start it again).
    pub candidate: Option<Candidate<'a>>,
    /// The contract's active revision.
    pub active_revision: Option<&'a str>,
    pub previous: Option<&'a CanaryStatus>,
    /// A command not yet acted on (its id differs from `previous.last_command`), or why the annotation is
    /// not one.
    pub command: Option<Result<Command, String>>,
    pub observed: &'a Observed,
    /// The measurement taken for the window [`due`] asked for.
    pub measured: Option<Measured>,
    pub now: DateTime<Utc>,
}

/// An Event for the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

#[derive(Clone, Debug)]
pub struct Decision {
    pub status: Option<CanaryStatus>,
    /// What the rollout ConfigMap must say.
    pub split: Split,
    /// Whether the canary Deployment should exist.
    pub run_canary: bool,
    /// The canary's pods are gone: release what they had leased (before the status is written).
    pub release_leases: bool,
    pub requeue: Option<Duration>,
    pub notes: Vec<Note>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn interval(policy: &CanaryPolicy) -> Duration {
    policy
        .analysis
        .as_ref()
        .and_then(|a| a.interval)
        .map(Duration::from)
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_INTERVAL)
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The window of the measurement due now, if one is: the rollout is progressing with an analysis, its step's
/// weight is applied, and an interval has passed since the step began or since the step's last measurement.
pub fn due(
    policy: Option<&CanaryPolicy>,
    previous: Option<&CanaryStatus>,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let policy = policy?;
    policy.analysis.as_ref()?;
    let st = previous?;
    if st.phase != PROGRESSING {
        return None;
    }
    let started = parse_time(st.step_started_at.as_deref())?;
    let since = st
        .measurements
        .iter()
        .rev()
        .find(|m| m.step == st.step)
        .and_then(|m| parse_time(Some(&m.at)))
        .filter(|at| *at > started)
        .unwrap_or(started);
    (now >= since + chrono_of(interval(policy))).then_some((since, now))
}

fn rate(text: &str) -> Decimal {
    text.parse::<Decimal>().unwrap_or_default()
}

/// The verdict of one measurement and why.
pub fn judge(
    analysis: &CanaryAnalysis,
    canary: &TrackMeasures,
    stable: &TrackMeasures,
) -> (&'static str, String) {
    let min = i64::from(analysis.min_records.unwrap_or(1).max(1));
    if canary.records < min {
        return (
            "Inconclusive",
            format!(
                "the canary finished {} record(s) in the window, fewer than the {min} a measurement needs",
                canary.records
            ),
        );
    }
    let stable_counts = stable.records >= min;
    let mut failed: Vec<String> = Vec::new();
    let mut shared: Vec<String> = Vec::new();
    let mut check = |what: &str, canary_breaks: bool, stable_breaks: bool, text: String| {
        if canary_breaks {
            if stable_counts && stable_breaks {
                shared.push(format!("{what} {text}, and the stable track's as well"));
            } else {
                failed.push(format!("{what} {text}"));
            }
        }
    };
    if let Some(max) = analysis.max_failure_rate.as_deref().map(rate) {
        check(
            "failure rate",
            rate(&canary.failure_rate) > max,
            rate(&stable.failure_rate) > max,
            format!(
                "{} above {max} (stable {})",
                canary.failure_rate, stable.failure_rate
            ),
        );
    }
    if let Some(max) = analysis.max_dead_letter_rate.as_deref().map(rate) {
        check(
            "dead-letter rate",
            rate(&canary.dead_letter_rate) > max,
            rate(&stable.dead_letter_rate) > max,
            format!(
                "{} above {max} (stable {})",
                canary.dead_letter_rate, stable.dead_letter_rate
            ),
        );
    }
    if let Some(max) = analysis.max_latency_p99 {
        let max_ms = i64::try_from(Duration::from(max).as_millis()).unwrap_or(i64::MAX);
        let over = |t: &TrackMeasures| t.p99_ms.is_some_and(|p| p > max_ms);
        check(
            "p99 delivery latency",
            over(canary),
            over(stable),
            format!(
                "{} ms above {max_ms} ms (stable {})",
                canary.p99_ms.unwrap_or_default(),
                stable
                    .p99_ms
                    .map(|p| format!("{p} ms"))
                    .unwrap_or_else(|| "none".into())
            ),
        );
    }
    let figures = format!(
        "canary {} records, failure rate {}, dead-letter rate {}; stable {} records, failure rate {}, dead-letter rate {}",
        canary.records,
        canary.failure_rate,
        canary.dead_letter_rate,
        stable.records,
        stable.failure_rate,
        stable.dead_letter_rate
    );
    if !failed.is_empty() {
        ("Failed", format!("{} ({figures})", failed.join("; ")))
    } else if !shared.is_empty() {
        (
            "Inconclusive",
            format!(
                "{}: the sink or the source, not the version ({figures})",
                shared.join("; ")
            ),
        )
    } else {
        ("Passed", figures)
    }
}

fn fresh(
    candidate: Candidate<'_>,
    policy: &CanaryPolicy,
    last_command: Option<String>,
) -> CanaryStatus {
    CanaryStatus {
        revision: candidate.revision.to_string(),
        version: candidate.version.to_string(),
        phase: PROGRESSING.into(),
        step: 0,
        weight: policy.steps.first().map(|s| s.weight as i32).unwrap_or(0),
        last_command,
        message: Some(format!(
            "rolling out version {} ({}) to {}% of the buckets",
            candidate.version,
            candidate.revision,
            policy.steps.first().map(|s| s.weight).unwrap_or(0)
        )),
        ..CanaryStatus::default()
    }
}

fn set(st: &mut CanaryStatus, phase: &str, reason: &str, message: String) {
    st.phase = phase.into();
    st.reason = Some(reason.into());
    st.message = Some(super::clip(&message, 1024));
}

/// The rollout's next state. Pure.
pub fn decide(i: Inputs<'_>) -> Decision {
    let mut d = Decision {
        status: i.previous.cloned(),
        split: Split::none(),
        run_canary: false,
        release_leases: false,
        requeue: None,
        notes: Vec::new(),
    };
    let now = rfc3339(i.now);

    // Which rollout this is: the previous one, a new one, or none.
    let mut st = match (i.candidate, i.previous) {
        (None, None) => return d,
        (None, Some(prev)) => {
            let mut st = prev.clone();
            match st.phase.as_str() {
                PROMOTED | ABORTED => {}
                PROMOTING if i.active_revision == Some(st.revision.as_str()) => {}
                ABORTING => {}
                _ => {
                    let message = format!(
                        "the contract no longer offers version {} ({}) for a canary (it was edited, rejected or withdrawn); rolling back to stable",
                        st.version, st.revision
                    );
                    set(&mut st, ABORTING, "CandidateWithdrawn", message.clone());
                    d.notes.push(Note {
                        reason: "CanaryAborted",
                        message,
                        warning: true,
                    });
                }
            }
            st
        }
        (Some(c), prev) => match prev.filter(|p| p.revision == c.revision) {
            Some(prev) => prev.clone(),
            None => {
                let Some(policy) = i.policy else {
                    // No canary steps: the contract promotes after preflight; nothing runs on this flow.
                    d.status = None;
                    return d;
                };
                let last = prev.and_then(|p| p.last_command.clone());
                let mut st = fresh(c, policy, last);
                if !i.shared_ledger {
                    st.weight = 0;
                    set(
                        &mut st,
                        PAUSED,
                        "CanaryNeedsSharedLedger",
                        format!(
                            "a canary of version {} needs the PostgreSQL ledger (spec.ledger.type: postgres): the embedded ledger's volume is mounted by one pod, so a second track cannot share it; promote to switch without a canary, or abort",
                            c.version
                        ),
                    );
                    d.notes.push(Note {
                        reason: "CanaryNeedsSharedLedger",
                        message: st.message.clone().unwrap_or_default(),
                        warning: true,
                    });
                } else {
                    d.notes.push(Note {
                        reason: "CanaryStarted",
                        message: st.message.clone().unwrap_or_default(),
                        warning: false,
                    });
                }
                st
            }
        },
    };

    // A person's command.
    match &i.command {
        Some(Err(why)) => {
            d.notes.push(Note {
                reason: "RolloutCommandInvalid",
                message: why.clone(),
                warning: true,
            });
        }
        Some(Ok(cmd)) => {
            st.last_command = Some(cmd.id.clone());
            apply_command(
                &mut st,
                cmd.verb,
                i.candidate,
                i.policy,
                i.shared_ledger,
                &mut d,
            );
        }
        None => {}
    }

    let policy = i.policy;
    match st.phase.clone().as_str() {
        PROGRESSING => progress(&mut st, &i, policy, &now, &mut d),
        PAUSED if st.reason.as_deref() != Some("CanaryNeedsSharedLedger") => {
            d.split = Split {
                canary_revision: Some(st.revision.clone()),
                weight: st.weight.clamp(0, 100) as u8,
            };
            d.run_canary = true;
        }
        PROMOTING => {
            if i.active_revision == Some(st.revision.as_str())
                && i.observed.stable_revision.as_deref() == Some(st.revision.as_str())
            {
                // Every stable worker runs the candidate now: the canary goes.
                finish(&mut st, i.observed, PROMOTED, &mut d);
            } else if i.active_revision == Some(st.revision.as_str()) && st.weight > 0 {
                // Promoted by the contract; the stable workers restart on it. The canary keeps its buckets
                // until they run it, so no record goes through the old revision after the promotion.
                st.message = Some(format!(
                    "version {} is active; waiting for every stable worker to run it",
                    st.version
                ));
                d.split = Split {
                    canary_revision: Some(st.revision.clone()),
                    weight: st.weight.clamp(0, 100) as u8,
                };
                d.run_canary = true;
                d.requeue = Some(WAIT_REQUEUE);
            } else if st.reason.as_deref() == Some("CanaryNeedsSharedLedger") || st.weight <= 0 {
                d.split = Split::none();
            } else {
                d.split = Split {
                    canary_revision: Some(st.revision.clone()),
                    weight: st.weight.clamp(0, 100) as u8,
                };
                d.run_canary = true;
            }
        }
        ABORTING => finish(&mut st, i.observed, ABORTED, &mut d),
        _ => {}
    }
    d.status = Some(st);
    d
}

fn apply_command(
    st: &mut CanaryStatus,
    verb: Verb,
    candidate: Option<Candidate<'_>>,
    policy: Option<&CanaryPolicy>,
    shared_ledger: bool,
    d: &mut Decision,
) {
    let phase = st.phase.clone();
    let refused = |d: &mut Decision, why: String| {
        d.notes.push(Note {
            reason: "RolloutCommandRefused",
            message: why,
            warning: true,
        })
    };
    match (verb, phase.as_str()) {
        (Verb::Pause, PROGRESSING) => {
            set(
                st,
                PAUSED,
                "PausedByUser",
                format!("paused at step {} ({}%) by a person", st.step, st.weight),
            );
            d.notes.push(Note {
                reason: "CanaryPaused",
                message: st.message.clone().unwrap_or_default(),
                warning: false,
            });
        }
        (Verb::Resume, PAUSED) if st.reason.as_deref() == Some("CanaryNeedsSharedLedger") => {
            refused(d, "resume: this flow's embedded ledger cannot be shared by a canary; promote or abort".into());
        }
        (Verb::Resume, PAUSED) => {
            // The step starts over once its weight is applied again: a pause is not time spent measuring.
            st.step_started_at = None;
            st.applied_weight = 0;
            st.passed_measurements = 0;
            set(
                st,
                PROGRESSING,
                "ResumedByUser",
                format!("resumed at step {} ({}%)", st.step, st.weight),
            );
            d.notes.push(Note {
                reason: "CanaryResumed",
                message: st.message.clone().unwrap_or_default(),
                warning: false,
            });
        }
        (Verb::Promote, PROGRESSING | PAUSED) => {
            set(
                st,
                PROMOTING,
                "PromotedByUser",
                format!(
                    "promoted at step {} ({}%) by a person; the contract makes version {} active once every bound flow is promoted",
                    st.step, st.weight, st.version
                ),
            );
            d.notes.push(Note {
                reason: "CanaryPromoting",
                message: st.message.clone().unwrap_or_default(),
                warning: false,
            });
        }
        (Verb::Abort, PROGRESSING | PAUSED | PROMOTING) => {
            set(
                st,
                ABORTING,
                "AbortedByUser",
                format!(
                    "aborted at step {} ({}%) by a person; rolling back to stable",
                    st.step, st.weight
                ),
            );
            d.notes.push(Note {
                reason: "CanaryAborted",
                message: st.message.clone().unwrap_or_default(),
                warning: true,
            });
        }
        (Verb::Retry, ABORTED) => match (candidate, policy) {
            (Some(c), Some(p)) if c.revision == st.revision => {
                let last = st.last_command.clone();
                *st = fresh(c, p, last);
                if !shared_ledger {
                    st.weight = 0;
                    set(
                        st,
                        PAUSED,
                        "CanaryNeedsSharedLedger",
                        "a canary needs the PostgreSQL ledger".into(),
                    );
                } else {
                    st.reason = Some("RetriedByUser".into());
                }
                d.notes.push(Note {
                    reason: "CanaryRetried",
                    message: st.message.clone().unwrap_or_default(),
                    warning: false,
                });
            }
            _ => refused(
                d,
                format!(
                    "retry: version {} ({}) is no longer the contract's candidate; edit the contract to roll out a new version",
                    st.version, st.revision
                ),
            ),
        },
        (verb, phase) => refused(
            d,
            format!(
                "{}: not possible while the rollout is {phase}",
                verb.as_str()
            ),
        ),
    }
}

fn progress(
    st: &mut CanaryStatus,
    i: &Inputs<'_>,
    policy: Option<&CanaryPolicy>,
    now: &str,
    d: &mut Decision,
) {
    let Some(policy) = policy else {
        // The flow's canary steps were removed mid-rollout: nothing left to measure; promote.
        set(
            st,
            PROMOTING,
            "StepsRemoved",
            "spec.rollout.canary was removed during the rollout; promoting".into(),
        );
        return;
    };
    if let Some(why) = &i.observed.canary_stuck {
        let message = format!(
            "the canary Deployment makes no progress ({why}) at step {} ({}%); rolling back to stable",
            st.step, st.weight
        );
        set(st, ABORTING, "CanaryNotReady", message.clone());
        d.notes.push(Note {
            reason: "CanaryAborted",
            message,
            warning: true,
        });
        finish(st, i.observed, ABORTED, d);
        return;
    }
    let step = usize::try_from(st.step)
        .unwrap_or(0)
        .min(policy.steps.len().saturating_sub(1));
    st.step = step as i32;
    st.weight = policy
        .steps
        .get(step)
        .map(|s| s.weight as i32)
        .unwrap_or(st.weight);
    d.split = Split {
        canary_revision: Some(st.revision.clone()),
        weight: st.weight.clamp(0, 100) as u8,
    };
    d.run_canary = true;

    if let Some(applied) = i.observed.applied_weight {
        st.applied_weight = i32::from(applied);
    }
    if st.step_started_at.is_none() {
        if st.applied_weight == st.weight {
            st.step_started_at = Some(now.to_string());
        } else {
            st.message = Some(format!(
                "step {}: waiting for every worker of both tracks to apply {}% (they apply {}%)",
                st.step, st.weight, st.applied_weight
            ));
            d.requeue = Some(WAIT_REQUEUE);
            return;
        }
    }

    // The measurement, if one was taken.
    if let (Some(analysis), Some(measured)) = (policy.analysis.as_ref(), &i.measured) {
        let (verdict, message, canary, stable) = match measured {
            Measured::Taken { canary, stable } => {
                let (v, m) = judge(analysis, canary, stable);
                (v, m, Some(canary.clone()), Some(stable.clone()))
            }
            Measured::Error(why) => ("Error", why.clone(), None, None),
        };
        match verdict {
            "Failed" => {
                st.failed_measurements += 1;
                st.consecutive_errors = 0;
            }
            "Error" => st.consecutive_errors += 1,
            "Passed" => {
                st.passed_measurements += 1;
                st.consecutive_errors = 0;
            }
            _ => st.consecutive_errors = 0,
        }
        st.measurements.push(CanaryMeasurement {
            at: now.to_string(),
            step: st.step,
            verdict: verdict.into(),
            canary,
            stable,
            message: Some(super::clip(&message, 512)),
        });
        let extra = st.measurements.len().saturating_sub(KEPT_MEASUREMENTS);
        st.measurements.drain(..extra);
        let failure_limit = analysis.failure_limit.unwrap_or(0) as i32;
        let error_limit = analysis
            .consecutive_error_limit
            .unwrap_or(DEFAULT_CONSECUTIVE_ERROR_LIMIT) as i32;
        if verdict == "Failed" && st.failed_measurements > failure_limit {
            let message = format!(
                "analysis failed at step {} ({}%): {message}; {} failed measurement(s), limit {failure_limit}; rolling back to stable",
                st.step, st.weight, st.failed_measurements
            );
            set(st, ABORTING, "FailureLimitReached", message.clone());
            d.notes.push(Note {
                reason: "CanaryAborted",
                message,
                warning: true,
            });
            finish(st, i.observed, ABORTED, d);
            return;
        }
        if verdict == "Error" && st.consecutive_errors > error_limit {
            let message = format!(
                "{} measurement(s) in a row could not be taken at step {} (last: {message}); limit {error_limit}; rolling back to stable",
                st.consecutive_errors, st.step
            );
            set(
                st,
                ABORTING,
                "ConsecutiveErrorLimitReached",
                message.clone(),
            );
            d.notes.push(Note {
                reason: "CanaryAborted",
                message,
                warning: true,
            });
            finish(st, i.observed, ABORTED, d);
            return;
        }
        d.notes.push(Note {
            reason: "CanaryMeasured",
            message: format!("step {} ({}%): {verdict}: {message}", st.step, st.weight),
            warning: verdict == "Failed" || verdict == "Error",
        });
    }

    // Is the step done?
    let started = parse_time(st.step_started_at.as_deref()).unwrap_or(i.now);
    let pause = policy
        .steps
        .get(step)
        .and_then(|s| s.pause)
        .map(Duration::from)
        .unwrap_or_default();
    let pause_over = i.now >= started + chrono_of(pause);
    let evidence = policy.analysis.is_none() || st.passed_measurements > 0;
    if pause_over && evidence {
        if step + 1 < policy.steps.len() {
            st.step = (step + 1) as i32;
            st.weight = policy.steps[step + 1].weight as i32;
            st.step_started_at = None;
            st.passed_measurements = 0;
            st.message = Some(format!(
                "step {} passed; step {}: {}% of the buckets",
                step, st.step, st.weight
            ));
            st.reason = Some("StepPassed".into());
            d.notes.push(Note {
                reason: "CanaryStepAdvanced",
                message: st.message.clone().unwrap_or_default(),
                warning: false,
            });
            d.split.weight = st.weight.clamp(0, 100) as u8;
            d.requeue = Some(WAIT_REQUEUE);
        } else {
            let message = format!(
                "every step passed; the contract makes version {} active once every bound flow is promoted",
                st.version
            );
            set(st, PROMOTING, "StepsPassed", message.clone());
            d.notes.push(Note {
                reason: "CanaryPromoting",
                message,
                warning: false,
            });
        }
        return;
    }
    // Wake for the next measurement or the end of the pause, whichever is first.
    let mut next = if pause_over {
        None
    } else {
        Some(started + chrono_of(pause))
    };
    if policy.analysis.is_some() {
        let last = st
            .measurements
            .iter()
            .rev()
            .find(|m| m.step == st.step)
            .and_then(|m| parse_time(Some(&m.at)))
            .filter(|at| *at > started)
            .unwrap_or(started);
        let at = last + chrono_of(interval(policy));
        next = Some(next.map_or(at, |n| n.min(at)));
        if !evidence && pause_over {
            st.message = Some(format!(
                "step {} ({}%): waiting for a passing measurement",
                st.step, st.weight
            ));
        }
    }
    d.requeue = next.map(|t| {
        (t - i.now)
            .to_std()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1))
    });
}

/// The canary goes: split back to stable (for an abort) or to none (a promotion runs the candidate on
/// stable), the Deployment removed, and once its pods are gone their leases released and the final phase
/// written.
fn finish(st: &mut CanaryStatus, observed: &Observed, final_phase: &str, d: &mut Decision) {
    d.split = Split::none();
    d.run_canary = false;
    if final_phase == ABORTED {
        st.weight = 0;
    }
    if observed.canary_pods == 0 {
        d.release_leases = true;
        st.phase = final_phase.into();
        if final_phase == PROMOTED {
            st.weight = 100;
            st.reason = Some(st.reason.clone().unwrap_or_else(|| "Promoted".into()));
            st.message = Some(format!(
                "version {} ({}) is active on the stable track; the canary is removed",
                st.version, st.revision
            ));
            d.notes.push(Note {
                reason: "CanaryPromoted",
                message: st.message.clone().unwrap_or_default(),
                warning: false,
            });
        }
    } else {
        d.requeue = Some(WAIT_REQUEUE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(records: i64, failed: i64, dead: i64, p99: Option<i64>) -> TrackMeasures {
        let rate = |n: i64| {
            (Decimal::from(n) / Decimal::from(records.max(1)))
                .normalize()
                .to_string()
        };
        TrackMeasures {
            records,
            delivered: records - dead,
            failed,
            dead_lettered: dead,
            held: 0,
            failure_rate: rate(failed),
            dead_letter_rate: rate(dead),
            p99_ms: p99,
        }
    }

    fn analysis() -> CanaryAnalysis {
        serde_json::from_value(serde_json::json!({
            "maxFailureRate": "0.05", "maxDeadLetterRate": "0.01", "maxLatencyP99": "2s", "minRecords": 50
        }))
        .unwrap()
    }

    #[test]
    fn judge_fails_a_version_only_on_what_the_stable_track_does_not_share() {
        let a = analysis();
        let good = track(1000, 10, 0, Some(300));
        assert_eq!(judge(&a, &track(100, 1, 0, Some(200)), &good).0, "Passed");
        let (v, why) = judge(&a, &track(100, 10, 0, Some(200)), &good);
        assert_eq!(v, "Failed");
        assert!(why.contains("failure rate 0.1 above 0.05"), "{why}");
        let (v, why) = judge(&a, &track(100, 2, 2, Some(200)), &good);
        assert_eq!(v, "Failed");
        assert!(why.contains("dead-letter rate"), "{why}");
        let (v, why) = judge(&a, &track(100, 0, 0, Some(2500)), &good);
        assert_eq!(v, "Failed");
        assert!(why.contains("2500 ms above 2000 ms"), "{why}");
        // Stable fails the same threshold: the sink, not the version.
        let (v, why) = judge(&a, &track(100, 10, 0, None), &track(1000, 100, 0, None));
        assert_eq!(v, "Inconclusive");
        assert!(why.contains("not the version"), "{why}");
        // ...unless the stable track has too few records to say so.
        assert_eq!(
            judge(&a, &track(100, 10, 0, None), &track(10, 5, 0, None)).0,
            "Failed"
        );
        // Too few canary records: no verdict.
        assert_eq!(judge(&a, &track(49, 49, 49, None), &good).0, "Inconclusive");
    }

    #[test]
    fn a_measurement_is_due_an_interval_after_the_step_began_or_its_last_one() {
        let policy: CanaryPolicy = serde_json::from_value(serde_json::json!({
            "steps": [{"weight": 10}], "analysis": {"interval": "30s"}
        }))
        .unwrap();
        let t0 = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut st = CanaryStatus {
            phase: PROGRESSING.into(),
            ..CanaryStatus::default()
        };
        assert_eq!(
            due(Some(&policy), Some(&st), t0),
            None,
            "the step has not begun"
        );
        st.step_started_at = Some(rfc3339(t0));
        assert_eq!(
            due(Some(&policy), Some(&st), t0 + chrono::Duration::seconds(29)),
            None
        );
        let at = t0 + chrono::Duration::seconds(30);
        assert_eq!(due(Some(&policy), Some(&st), at), Some((t0, at)));
        st.measurements.push(CanaryMeasurement {
            at: rfc3339(at),
            step: 0,
            verdict: "Passed".into(),
            ..CanaryMeasurement::default()
        });
        assert_eq!(
            due(Some(&policy), Some(&st), at + chrono::Duration::seconds(10)),
            None
        );
        let next = at + chrono::Duration::seconds(30);
        assert_eq!(due(Some(&policy), Some(&st), next), Some((at, next)));
        st.phase = PAUSED.into();
        assert_eq!(
            due(Some(&policy), Some(&st), next),
            None,
            "a paused rollout is not measured"
        );
    }

    #[test]
    fn commands_need_a_known_verb_and_an_id() {
        assert_eq!(
            Command::parse(" promote:1733 ").unwrap(),
            Command {
                verb: Verb::Promote,
                id: "promote:1733".into()
            }
        );
        let err = Command::parse("promote").unwrap_err();
        assert!(
            err.contains(COMMAND_ANNOTATION) && err.contains("no id"),
            "{err}"
        );
        let err = Command::parse("rollback:1").unwrap_err();
        assert!(
            err.contains("pause, resume, promote, abort or retry"),
            "{err}"
        );
        assert_eq!(Command::annotation_value(Verb::Retry, "7"), "retry:7");
    }
}
