//! `meshline dev` plays a canary rollout of a contract candidate, the way a cluster runs one (issue #15): a
//! second (canary) worker in this process runs the candidate on the same SQLite ledger file as the stable
//! worker (both on one machine, so the embedded ledger is shared; a cluster needs PostgreSQL for this), both
//! follow the split file the scenario rewrites at each step, and the steps are driven by the controller's own
//! pure state machine ([`crate::rollout::canary::decide`]) fed with what the workers report and what the
//! ledger measured per revision.
//!
//! **Time.** The pure state machine is given an accelerated dev clock as its `now`: the clock moves by one
//! analysis interval each time the ledger holds enough new canary evidence for a measurement, so a policy of
//! 30-second intervals and pauses plays in a few seconds. Nothing is decided by waiting: the scenario waits
//! on real state (both workers applying a weight, records finished in the ledger) and on nothing else.
//!
//! **Windows.** The ledger keeps per-revision measures in 10-second slots
//! ([`crate::ledger::REVISION_SLOT_MS`]); a dev step lasts a few seconds, so a measurement's window is the
//! step's real time widened to whole slots, and may include a few records of the previous step. The scenario
//! still asks for `minRecords` records finished at the step itself before it measures.
//!
//! It owns nothing the controller owns: no second state machine, no analysis of its own.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::{DevEnv, DevError};
use crate::api::{CanaryMeasurement, CanaryPolicy, CanaryStatus, SyncContractSpec, TrackMeasures};
use crate::ledger::REVISION_SLOT_MS;
use crate::rollout::canary::{self, Candidate, Inputs, Measured, Observed};
use crate::rollout::split::{Split, Track};
use crate::sim::crm::{DealKind, opportunity};
use crate::worker::run::{RunOptions, start_flow, start_flow_on};
use crate::worker::{RenderedFlow, Worker};

/// Deals the CRM stand-in closes per batch while a canary runs.
const BATCH: usize = 10;
/// How often the scenario looks at the workers and the ledger while it waits for a state.
const LOOK: Duration = Duration::from_millis(50);

/// One canary rollout as it went.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryRun {
    /// The candidate's revision (for a local run, `v<version>`).
    pub revision: String,
    /// The revision the stable track ran while the canary did.
    pub stable_revision: String,
    /// `Promoted` or `Aborted`.
    pub phase: String,
    /// Why, as the state machine says it (`StepsPassed`, `FailureLimitReached`, ...).
    pub reason: Option<String>,
    pub message: Option<String>,
    /// Every step reached, with the measurements taken at it.
    pub steps: Vec<CanaryStepRun>,
    /// Leases of the canary worker handed back to stable once it was gone.
    pub leases_released: u64,
    /// Deals the CRM stand-in closed while the canary ran.
    pub deals_sent: usize,
}

/// One step of a canary rollout and the analysis at it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStepRun {
    pub step: i32,
    /// Percentage of the buckets the canary took.
    pub weight: i32,
    pub measurements: Vec<CanaryMeasurement>,
}

/// A short policy for a laptop: three steps, a measurement per step, and an analysis that aborts at the
/// first failed measurement.
pub(super) fn dev_policy() -> Result<CanaryPolicy, DevError> {
    serde_json::from_value(serde_json::json!({
        "steps": [
            {"weight": 20, "pause": "30s"},
            {"weight": 50, "pause": "30s"},
            {"weight": 100, "pause": "30s"},
        ],
        "analysis": {
            "maxFailureRate": "0.5",
            "maxDeadLetterRate": "0.05",
            "minRecords": 5,
            "failureLimit": 0,
            "interval": "30s",
        },
    }))
    .map_err(|e| DevError::Scenario(format!("the dev canary policy: {e}")))
}

/// Where the next deals of the CRM stand-in come from: normal deals, numbered after the scenario's.
pub(super) struct Deals {
    pub next: usize,
    pub pricebook: Vec<(String, Decimal)>,
}

impl Deals {
    fn batch(&mut self) -> Vec<serde_json::Value> {
        let batch = (self.next..self.next + BATCH)
            .map(|n| opportunity(n, DealKind::Normal, &self.pricebook))
            .collect();
        self.next += BATCH;
        batch
    }
}

impl DevEnv {
    /// Starts a canary-track worker of `rendered` beside the stable one: same ledger file, secrets, token and
    /// split file, any free ports.
    async fn start_canary_worker(
        &self,
        rendered: &RenderedFlow,
        worker_id: String,
    ) -> Result<Worker, DevError> {
        let mut settings = self.settings.clone();
        settings.options.track = Track::Canary;
        settings.options.worker_id = worker_id;
        settings.listen.set_port(0);
        settings.ops_listen.set_port(0);
        Ok(start_flow(rendered, &settings, &RunOptions::default()).await?)
    }

    /// Puts the stable track on `rendered` (a promoted contract) as a cluster restarts the stable Deployment:
    /// the new worker takes over the same sockets first, then the old one stops gracefully (releasing its
    /// claims), so the CRM stand-in never sees the port closed.
    async fn restart_stable(&mut self, rendered: RenderedFlow) -> Result<(), DevError> {
        let sockets = self
            .stable_sockets
            .try_clone()
            .map_err(|e| DevError::Scenario(format!("cannot hand the stable ports over: {e}")))?;
        let next = start_flow_on(
            &rendered,
            &self.settings,
            &RunOptions::default(),
            Some(sockets),
        )
        .await?;
        let old = std::mem::replace(&mut self.worker, next);
        self.retired_duplicates += old.pipeline.metrics.duplicates.get();
        old.shutdown().await;
        self.rendered = rendered;
        Ok(())
    }
}

async fn status(worker: &Worker) -> Result<crate::worker::api::WorkerStatus, DevError> {
    crate::worker::api::compute_status(&worker.pipeline)
        .await
        .map_err(|e| DevError::Scenario(format!("worker status: {e}")))
}

/// What the controller would read from the workers' `/status`.
async fn observe(
    stable: &Worker,
    canary: Option<&Worker>,
    candidate: &str,
) -> Result<Observed, DevError> {
    let stable = status(stable).await?;
    let canary_status = match canary {
        Some(w) => Some(status(w).await?),
        None => None,
    };
    let applied = |s: &crate::worker::api::WorkerStatus| {
        s.rollout
            .as_ref()
            .filter(|a| a.error.is_none() && a.canary_revision.as_deref() == Some(candidate))
            .map(|a| a.weight)
    };
    let stable_weight = applied(&stable);
    let applied_weight = match &canary_status {
        Some(c) if c.revision.as_deref() == Some(candidate) && applied(c) == stable_weight => {
            stable_weight
        }
        _ => None,
    };
    Ok(Observed {
        applied_weight,
        canary_pods: usize::from(canary.is_some()),
        canary_stuck: None,
        stable_revision: stable.revision,
    })
}

fn slot_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    let ms = t.timestamp_millis().div_euclid(REVISION_SLOT_MS) * REVISION_SLOT_MS;
    DateTime::from_timestamp_millis(ms).unwrap_or(t)
}

/// The measurement window of a step that began (really) at `began`: whole ledger slots up to the current one.
fn window(began: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let until = slot_floor(Utc::now()) + chrono::Duration::milliseconds(REVISION_SLOT_MS);
    (slot_floor(began), until)
}

async fn measures(
    env: &DevEnv,
    revision: &str,
    (since, until): (DateTime<Utc>, DateTime<Utc>),
) -> Result<TrackMeasures, String> {
    env.worker
        .pipeline
        .ledger
        .revision_measures(revision, since, until)
        .await
        .map(|m| TrackMeasures::from(&m))
        .map_err(|e| format!("ledger: measures of revision {revision}: {e}"))
}

fn scenario(e: impl std::fmt::Display) -> DevError {
    DevError::Scenario(format!("canary: {e}"))
}

/// Canaries `candidate` against the stable track until the state machine promotes or aborts it. A promoted
/// candidate becomes the stable worker's contract (and `env.rendered`'s).
pub(super) async fn play(
    env: &mut DevEnv,
    candidate: &SyncContractSpec,
    deals: &mut Deals,
    timeout: Duration,
) -> Result<CanaryRun, DevError> {
    let policy = dev_policy()?;
    let interval = policy
        .analysis
        .as_ref()
        .and_then(|a| a.interval)
        .map(Duration::from)
        .unwrap_or(Duration::from_secs(30));
    let min_records = policy
        .analysis
        .as_ref()
        .and_then(|a| a.min_records)
        .map_or(1, i64::from);
    let mut candidate_flow = env.rendered.clone();
    candidate_flow.contract.spec = candidate.clone();
    let revision = candidate_flow.revision_name();
    let stable_revision = env.rendered.revision_name();
    // The worker id of a canary pod starts as the controller names them, which is what a release goes by.
    let owner_prefix = format!("meshline-{}-canary-", env.flow);
    let mut canary_worker = Some(
        env.start_canary_worker(&candidate_flow, format!("{owner_prefix}dev"))
            .await?,
    );
    let split_file = env.split_file();
    let deadline = Instant::now() + timeout;
    let mut clock = Utc::now();
    let mut active = stable_revision.clone();
    let mut status: Option<CanaryStatus> = None;
    // When the current step's weight was applied (real time), and the canary's finished records then.
    let mut step_began: Option<(DateTime<Utc>, i64)> = None;
    let mut run = CanaryRun {
        revision: revision.clone(),
        stable_revision: stable_revision.clone(),
        phase: String::new(),
        reason: None,
        message: None,
        steps: Vec::new(),
        leases_released: 0,
        deals_sent: 0,
    };
    let stuck = |what: &str, st: &Option<CanaryStatus>| {
        scenario(format!(
            "{what} within {timeout:?} (rollout: {})",
            st.as_ref()
                .and_then(|s| s.message.clone())
                .unwrap_or_default()
        ))
    };

    loop {
        if Instant::now() > deadline {
            return Err(stuck("the rollout did not finish", &status));
        }
        let observed = observe(&env.worker, canary_worker.as_ref(), &revision).await?;
        let measured = match (
            canary::due(Some(&policy), status.as_ref(), clock),
            step_began,
        ) {
            (Some(_), Some((began, _))) => {
                let w = window(began);
                Some(
                    match (
                        measures(env, &revision, w).await,
                        measures(env, &stable_revision, w).await,
                    ) {
                        (Ok(canary), Ok(stable)) => Measured::Taken { canary, stable },
                        (Err(e), _) | (_, Err(e)) => Measured::Error(e),
                    },
                )
            }
            _ => None,
        };
        let took = measured.is_some();
        let d = canary::decide(Inputs {
            policy: Some(&policy),
            // Both tracks run in this process on one ledger file.
            shared_ledger: true,
            candidate: Some(Candidate {
                revision: &revision,
                version: &candidate.version,
            }),
            active_revision: Some(&active),
            previous: status.as_ref(),
            command: None,
            observed: &observed,
            measured,
            now: clock,
        });
        write_split(&split_file, &d.split)?;
        let Some(st) = d.status.clone() else {
            return Err(scenario(
                "the state machine ended the rollout without a status",
            ));
        };
        if took && let Some(m) = st.measurements.last() {
            step_run(&mut run, m.step, weight_at(&policy, m.step))
                .measurements
                .push(m.clone());
        }
        if st.phase == canary::PROGRESSING {
            step_run(&mut run, st.step, st.weight);
        }
        if !d.run_canary
            && let Some(w) = canary_worker.take()
        {
            // The canary Deployment is removed: its pod stops (a graceful stop releases its own claims).
            w.shutdown().await;
        }
        if d.release_leases {
            run.leases_released += env
                .worker
                .pipeline
                .ledger
                .release_leases(&owner_prefix)
                .await
                .map_err(scenario)?;
            env.worker.pipeline.wake.notify_one();
        }
        let previous_start = status.as_ref().and_then(|s| s.step_started_at.clone());
        status = Some(st.clone());
        match st.phase.as_str() {
            canary::PROMOTED | canary::ABORTED => {
                run.phase = st.phase.clone();
                run.reason = st.reason.clone();
                run.message = st.message.clone();
                return Ok(run);
            }
            canary::PROMOTING if active != revision => {
                // The contract makes the candidate active once every bound flow promoted it: here, one flow.
                active = revision.clone();
            }
            canary::PROMOTING if observed.stable_revision.as_deref() != Some(revision.as_str()) => {
                env.restart_stable(candidate_flow.clone()).await?;
            }
            canary::PROMOTING | canary::ABORTING => {}
            canary::PROGRESSING if st.step_started_at.is_none() => {
                step_began = None;
                if !wait_applied(env, canary_worker.as_ref(), &revision, &d.split, deadline).await?
                {
                    return Err(stuck("both workers did not apply the split", &status));
                }
            }
            canary::PROGRESSING => {
                if previous_start != st.step_started_at || step_began.is_none() {
                    let now = Utc::now();
                    let finished = measures(env, &revision, window(now))
                        .await
                        .map_err(scenario)?;
                    step_began = Some((now, finished.records));
                }
                let (began, before) = step_began.unwrap_or((Utc::now(), 0));
                // Records keep flowing; the step is measured once the canary finished enough of them.
                let finished = loop {
                    let finished = measures(env, &revision, window(began))
                        .await
                        .map_err(scenario)?
                        .records;
                    if finished - before >= min_records {
                        break finished;
                    }
                    if Instant::now() > deadline {
                        return Err(stuck("the canary did not finish enough records", &status));
                    }
                    if status_pending(env).await? == 0 {
                        env.crm
                            .send(&deals.batch(), Duration::from_secs(60))
                            .await
                            .map_err(DevError::Scenario)?;
                        run.deals_sent += BATCH;
                    }
                    tokio::time::sleep(LOOK).await;
                };
                clock += chrono::Duration::from_std(interval).unwrap_or_default();
                // The next measurement at this step needs new evidence.
                step_began = Some((began, finished));
            }
            other => {
                return Err(scenario(format!(
                    "unexpected phase {other}: {}",
                    st.message.unwrap_or_default()
                )));
            }
        }
    }
}

fn weight_at(policy: &CanaryPolicy, step: i32) -> i32 {
    usize::try_from(step)
        .ok()
        .and_then(|s| policy.steps.get(s))
        .map_or(0, |s| s.weight as i32)
}

fn step_run(run: &mut CanaryRun, step: i32, weight: i32) -> &mut CanaryStepRun {
    if let Some(i) = run.steps.iter().position(|s| s.step == step) {
        return &mut run.steps[i];
    }
    run.steps.push(CanaryStepRun {
        step,
        weight,
        measurements: Vec::new(),
    });
    let last = run.steps.len() - 1;
    &mut run.steps[last]
}

fn write_split(file: &std::path::Path, split: &Split) -> Result<(), DevError> {
    // Written aside and renamed, as the kubelet swaps a ConfigMap mount: a worker never reads half a file.
    let aside = file.with_extension("json.new");
    std::fs::write(&aside, split.to_json())
        .and_then(|()| std::fs::rename(&aside, file))
        .map_err(|e| DevError::State {
            dir: file.display().to_string(),
            reason: format!("cannot write the rollout split: {e}"),
        })
}

async fn status_pending(env: &DevEnv) -> Result<u64, DevError> {
    Ok(status(&env.worker).await?.pending)
}

/// Waits until both workers report applying `split`; `false` if they did not by the deadline.
async fn wait_applied(
    env: &DevEnv,
    canary: Option<&Worker>,
    revision: &str,
    split: &Split,
    deadline: Instant,
) -> Result<bool, DevError> {
    loop {
        let observed = observe(&env.worker, canary, revision).await?;
        if observed.applied_weight == Some(split.weight) {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(LOOK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_policy_steps_up_to_the_whole_flow_and_measures_each_step() {
        let policy = dev_policy().unwrap();
        let weights: Vec<u32> = policy.steps.iter().map(|s| s.weight).collect();
        assert_eq!(weights, vec![20, 50, 100]);
        let analysis = policy.analysis.unwrap();
        let interval = analysis.interval.map(Duration::from).unwrap();
        // One measurement per step: each pause is one analysis interval.
        for step in &policy.steps {
            assert_eq!(step.pause.map(Duration::from), Some(interval));
        }
        assert_eq!(analysis.failure_limit, Some(0));
    }

    #[test]
    fn a_window_covers_whole_ledger_slots_from_the_step_start() {
        let began = DateTime::from_timestamp_millis(1_700_000_012_345).unwrap();
        let (since, until) = window(began);
        assert_eq!(since.timestamp_millis(), 1_700_000_010_000);
        assert_eq!(until.timestamp_millis() % REVISION_SLOT_MS, 0);
        assert!(until - since >= chrono::Duration::milliseconds(REVISION_SLOT_MS));
    }
}
