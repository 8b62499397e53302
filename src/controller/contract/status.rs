//! Step 2 of the contract reconcile, pure: where the contract's current spec stands against the gates, and
//! what that asks of step 4 (store a revision, start preflight Jobs, prune history). The status it writes is
//! the whole memory of a contract change: a controller that restarts at any point reads it back, with the
//! Jobs and revisions it finds, and carries on where the last one stopped.

use std::collections::BTreeMap;

use crate::api::{
    CanaryStatus, Condition, ContractRevision, PreflightResult, RevisionState, SyncContract,
    SyncContractSpec, SyncContractStatus,
};
use crate::controller::flow::canary::CANARY_ABORTED;
use crate::controller::flow::status::carry_transition_times;
use crate::rollout::canary;
use crate::rollout::gates::{self, BoundFlow, Compatibility};

use super::build::{job_name, revision_name};

/// Superseded and rejected revisions kept in the status (and their ControllerRevisions) besides the active
/// one and the candidate.
pub const HISTORY_LIMIT: usize = 10;

/// A preflight Job of the current candidate, as step 1 found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Created and not finished.
    Running,
    /// Finished: the replay's report, or why there is none (the Job failed, timed out, or its pod left no
    /// readable report).
    Finished(Result<Replay, String>),
}

/// What a preflight replay reported (from the Job's termination message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    pub passed: bool,
    pub reason: Option<String>,
    pub records: i64,
    pub newly_rejected: i64,
    pub newly_held: i64,
    pub newly_accepted: i64,
    pub changed_outputs: i64,
    pub changed_paths: Vec<String>,
}

impl Replay {
    /// Reads the report a `meshline replay` leaves as its termination message (JSON).
    pub fn parse(message: &str) -> Result<Replay, String> {
        let v: serde_json::Value = serde_json::from_str(message.trim()).map_err(|e| {
            format!(
                "the preflight pod's termination message is not a replay report ({e}): {}",
                clip(message, 300)
            )
        })?;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
        let verdict = v
            .get("verdict")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                format!(
                    "the preflight report has no verdict: {}",
                    clip(message, 300)
                )
            })?;
        let changed_paths = v
            .get("changedPaths")
            .and_then(serde_json::Value::as_array)
            .map(|paths| {
                paths
                    .iter()
                    .take(10)
                    .filter_map(|p| {
                        let path = p.get("path")?.as_str()?;
                        let records = p.get("records")?.as_i64()?;
                        Some(clip(&format!("{path}: {records}"), 300))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Replay {
            passed: verdict == "Passed",
            reason: v
                .get("reason")
                .and_then(serde_json::Value::as_str)
                .map(|r| clip(r, 1500)),
            records: n("records"),
            newly_rejected: n("newlyRejected"),
            newly_held: n("newlyHeld"),
            newly_accepted: n("newlyAccepted"),
            changed_outputs: n("changedOutputs"),
            changed_paths,
        })
    }

    pub fn summary(&self) -> String {
        format!(
            "{} records replayed: {} newly rejected, {} newly held, {} newly accepted, {} outputs changed",
            self.records,
            self.newly_rejected,
            self.newly_held,
            self.newly_accepted,
            self.changed_outputs
        )
    }
}

pub use crate::rollout::clip;

pub struct Inputs<'a> {
    pub contract: &'a SyncContract,
    pub compiled: Result<(), String>,
    /// The active revision's spec, when the status names one and its ControllerRevision was found.
    pub active_spec: Option<&'a SyncContractSpec>,
    pub bound: &'a [BoundFlow<'a>],
    /// The current spec's preflight Jobs, by flow name.
    pub jobs: &'a BTreeMap<String, JobState>,
    pub now: &'a str,
}

/// The next status and what step 4 must do for it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: SyncContractStatus,
    /// Store the current spec as a revision (created once; an existing one is left as it is).
    pub store_revision: bool,
    /// Flows whose preflight Job for the current spec must be created.
    pub start_preflight: Vec<String>,
}

fn condition(t: &str, ok: bool, reason: &str, message: String, g: Option<i64>) -> Condition {
    Condition {
        r#type: t.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: clip(&message, 4096),
        observed_generation: g,
        last_transition_time: None,
    }
}

/// The contract's next status. Pure.
pub fn compute(i: Inputs<'_>) -> Outcome {
    let contract = i.contract;
    let spec = &contract.spec;
    let g = contract.metadata.generation;
    let name = contract.metadata.name.clone().unwrap_or_default();
    let hash = crate::contract::content_hash(spec).as_str().to_string();
    let version = spec.version.clone();
    let old = contract.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = g;
    let mut out = Outcome::default();
    let now = i.now.to_string();
    let cond =
        |t: &str, ok: bool, reason: &str, message: String| condition(t, ok, reason, message, g);
    let kept = |t: &str| old.conditions.iter().find(|c| c.r#type == t).cloned();
    let mut conditions: Vec<Condition> = Vec::new();

    // An earlier candidate that the spec no longer is never reaches workers: it was replaced before it passed.
    for r in st.revisions.iter_mut() {
        if r.content_hash != hash
            && matches!(
                r.state,
                RevisionState::Pending | RevisionState::Preflight | RevisionState::Canary
            )
        {
            set_state(r, RevisionState::Rejected, &now);
            r.reason = Some("Replaced".into());
            r.message = Some(format!(
                "replaced by an edit ({version}, {hash}) before it passed its gates"
            ));
        }
    }

    if let Err(message) = &i.compiled {
        conditions.push(cond(
            "Compiled",
            false,
            "CompileFailed",
            format!("version {version} does not compile: {message}"),
        ));
        conditions.push(cond(
            "Ready",
            false,
            "CompileFailed",
            format!(
                "version {version} does not compile; the bound flows keep running {}",
                running(&st)
            ),
        ));
        st.candidate_revision = None;
        st.conditions = carry_transition_times(&old.conditions, conditions, i.now);
        out.status = st;
        return out;
    }
    conditions.push(cond(
        "Compiled",
        true,
        "Compiled",
        format!("version {version} compiles"),
    ));

    let revision = revision_name(&name, &hash);
    let index = st.revisions.iter().position(|r| r.content_hash == hash);
    let state = index.map(|x| st.revisions[x].state);

    if st.active_revision.is_none() {
        // The first version: nothing runs yet, so there is nothing for a gate to protect.
        out.store_revision = true;
        let mut entry = ContractRevision {
            name: Some(revision.clone()),
            version: version.clone(),
            content_hash: hash.clone(),
            compatibility: Some("initial".into()),
            reason: Some("Initial".into()),
            message: Some("the first version becomes active at once".into()),
            ..ContractRevision::default()
        };
        set_state(&mut entry, RevisionState::Active, &now);
        upsert(&mut st.revisions, entry);
        st.active_revision = Some(revision.clone());
        st.current_version = Some(version.clone());
        st.candidate_revision = None;
        for (t, reason) in [
            ("Compatible", "Initial"),
            ("SignedOff", "NotRequired"),
            ("PreflightPassed", "NotRequired"),
        ] {
            conditions.push(cond(
                t,
                true,
                reason,
                format!("version {version} is the contract's first: it is active at once"),
            ));
        }
        conditions.push(cond(
            "Ready",
            true,
            "Active",
            format!("version {version} ({hash}) is active"),
        ));
    } else if state == Some(RevisionState::Active) {
        st.candidate_revision = None;
        for t in ["Compatible", "SignedOff", "PreflightPassed"] {
            conditions.push(kept(t).unwrap_or_else(|| {
                cond(t, true, "Active", format!("version {version} is active"))
            }));
        }
        conditions.push(cond(
            "Ready",
            true,
            "Active",
            format!("version {version} ({hash}) is active"),
        ));
    } else if state == Some(RevisionState::Rejected)
        && st.revisions[index.unwrap_or_default()].reason.as_deref() == Some(CANARY_ABORTED)
        && canary_retried(i.bound, &revision)
    {
        // A person retried the aborted canary on a bound flow: the candidate goes back to its canary.
        candidate(&i, &mut st, &mut out, &mut conditions, &revision, &hash);
    } else if let Some(s @ (RevisionState::Rejected | RevisionState::Superseded)) = state {
        let r = &st.revisions[index.unwrap_or_default()];
        st.candidate_revision = None;
        for t in ["Compatible", "SignedOff", "PreflightPassed"] {
            if let Some(c) = kept(t) {
                conditions.push(c);
            }
        }
        let (reason, message) = if s == RevisionState::Superseded {
            (
                "SupersededContent".to_string(),
                format!(
                    "version {version} ({hash}) was active before and was superseded; to return to it, give it a new version; the bound flows keep running {}",
                    running(&st)
                ),
            )
        } else {
            (
                r.reason.clone().unwrap_or_else(|| "Rejected".into()),
                format!(
                    "version {version} was rejected: {}; the bound flows keep running {}",
                    r.message.clone().unwrap_or_default(),
                    running(&st)
                ),
            )
        };
        conditions.push(cond("Ready", false, &reason, message));
    } else {
        candidate(&i, &mut st, &mut out, &mut conditions, &revision, &hash);
    }

    prune(&mut st);
    st.conditions = carry_transition_times(&old.conditions, conditions, i.now);
    out.status = st;
    out
}

/// Gates 1 to 3 for a spec that is neither active nor judged yet.
fn candidate(
    i: &Inputs<'_>,
    st: &mut SyncContractStatus,
    out: &mut Outcome,
    conditions: &mut Vec<Condition>,
    revision: &str,
    hash: &str,
) {
    let spec = &i.contract.spec;
    let version = spec.version.clone();
    let g = i.contract.metadata.generation;
    let now = i.now.to_string();
    let cond =
        |t: &str, ok: bool, reason: &str, message: String| condition(t, ok, reason, message, g);
    let keep_running = format!("the bound flows keep running {}", running(st));

    // Gate 1: compatibility against the active revision.
    let compat = gates::compatibility(i.active_spec, spec);
    if let Compatibility::Refused { reason, problems } = &compat {
        let message = format!("version {version} is refused: {}", problems.join("; "));
        let mut entry = ContractRevision {
            version: version.clone(),
            content_hash: hash.to_string(),
            compatibility: Some("refused".into()),
            reason: Some(reason.to_string()),
            message: Some(clip(&message, 2000)),
            ..ContractRevision::default()
        };
        set_state(&mut entry, RevisionState::Rejected, &now);
        upsert(&mut st.revisions, entry);
        st.candidate_revision = None;
        conditions.push(cond("Compatible", false, reason, message.clone()));
        conditions.push(cond(
            "Ready",
            false,
            reason,
            format!("{message}; {keep_running}"),
        ));
        return;
    }
    out.store_revision = true;
    st.candidate_revision = Some(revision.to_string());
    let mut entry = st
        .revisions
        .iter()
        .find(|r| r.content_hash == hash)
        .cloned()
        .unwrap_or_else(|| {
            let mut e = ContractRevision {
                version: version.clone(),
                content_hash: hash.to_string(),
                ..ContractRevision::default()
            };
            set_state(&mut e, RevisionState::Pending, &now);
            e
        });
    entry.name = Some(revision.to_string());
    entry.compatibility = Some(compat.verdict().to_string());

    let outside = gates::outside_ranges(&version, i.bound);
    let signs = gates::sign_offs(spec, hash, i.bound);
    entry.signed_off_by = signs.signed.iter().cloned().collect();
    if outside.is_empty() {
        conditions.push(cond(
            "Compatible",
            true,
            "Compatible",
            format!(
                "version {version} is {} against the active {}",
                compat.verdict(),
                st.current_version.clone().unwrap_or_default()
            ),
        ));
    } else {
        let list = outside
            .iter()
            .map(|(f, r)| format!("{f} ({r})"))
            .collect::<Vec<_>>()
            .join(", ");
        conditions.push(cond(
            "Compatible",
            false,
            "OutsideFlowRange",
            format!(
                "version {version} is outside the spec.contract.version range of bound flow(s) {list}; it waits until their ranges admit it"
            ),
        ));
    }
    conditions.push(cond(
        "SignedOff",
        signs.passed(),
        if signs.passed() {
            "SignedOff"
        } else {
            "AwaitingSignOff"
        },
        signs.message(&version, hash),
    ));
    if !outside.is_empty() || !signs.passed() {
        // Waiting, not refused: a range edit or a sign-off moves it on.
        if entry.state != RevisionState::Pending {
            set_state(&mut entry, RevisionState::Pending, &now);
        }
        let (reason, why) = if !outside.is_empty() {
            (
                "OutsideFlowRange",
                "waits for the bound flows' version ranges",
            )
        } else {
            ("AwaitingSignOff", "waits for sign-offs")
        };
        entry.reason = Some(reason.into());
        entry.message = Some(clip(&signs.message(&version, hash), 2000));
        upsert(&mut st.revisions, entry);
        conditions.push(cond(
            "PreflightPassed",
            false,
            "WaitingForGates",
            format!("preflight starts once version {version} passes the gates before it"),
        ));
        conditions.push(cond(
            "Ready",
            false,
            reason,
            format!("version {version} {why}; {keep_running}"),
        ));
        return;
    }

    // Gate 3: a preflight replay per bound flow.
    if entry.state != RevisionState::Preflight {
        set_state(&mut entry, RevisionState::Preflight, &now);
    }
    st.preflight.retain(|p| p.revision == revision);
    let mut results: Vec<PreflightResult> = Vec::new();
    for b in i.bound {
        let flow = b.name().to_string();
        let previous = st.preflight.iter().find(|p| p.flow == flow).cloned();
        let mut r = previous.clone().unwrap_or_else(|| PreflightResult {
            flow: flow.clone(),
            revision: revision.to_string(),
            version: version.clone(),
            phase: "Running".into(),
            job: Some(job_name(&flow, hash)),
            started_at: Some(now.clone()),
            ..PreflightResult::default()
        });
        if r.phase == "Running" {
            match i.jobs.get(&flow) {
                None => {
                    // Never started, or its Job is gone before it reported (deleted by hand, or lost with
                    // its namespace's quota): start it (again).
                    out.start_preflight.push(flow.clone());
                }
                Some(JobState::Running) => {}
                Some(JobState::Finished(Ok(replay))) => {
                    r.phase = if replay.passed { "Passed" } else { "Failed" }.into();
                    r.records = replay.records;
                    r.newly_rejected = replay.newly_rejected;
                    r.newly_held = replay.newly_held;
                    r.newly_accepted = replay.newly_accepted;
                    r.changed_outputs = replay.changed_outputs;
                    r.changed_paths = replay.changed_paths.clone();
                    r.message = Some(clip(
                        &match &replay.reason {
                            Some(reason) if !replay.passed => {
                                format!("{reason} ({})", replay.summary())
                            }
                            _ => replay.summary(),
                        },
                        2000,
                    ));
                    r.finished_at = Some(now.clone());
                }
                Some(JobState::Finished(Err(reason))) => {
                    r.phase = "Failed".into();
                    r.message = Some(clip(reason, 2000));
                    r.finished_at = Some(now.clone());
                }
            }
        }
        results.push(r);
    }
    st.preflight = results;
    let failed: Vec<&PreflightResult> = st
        .preflight
        .iter()
        .filter(|p| p.phase == "Failed")
        .collect();
    let running: Vec<&str> = st
        .preflight
        .iter()
        .filter(|p| p.phase == "Running")
        .map(|p| p.flow.as_str())
        .collect();
    if !failed.is_empty() {
        let message = format!(
            "preflight of version {version} failed: {}",
            failed
                .iter()
                .map(|p| format!("flow {}: {}", p.flow, p.message.clone().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("; ")
        );
        set_state(&mut entry, RevisionState::Rejected, &now);
        entry.reason = Some("PreflightFailed".into());
        entry.message = Some(clip(&message, 2000));
        upsert(&mut st.revisions, entry);
        st.candidate_revision = None;
        conditions.push(cond(
            "PreflightPassed",
            false,
            "PreflightFailed",
            message.clone(),
        ));
        conditions.push(cond(
            "Ready",
            false,
            "PreflightFailed",
            format!("{message}; {keep_running}"),
        ));
    } else if running.is_empty() {
        let message = if st.preflight.is_empty() {
            format!("version {version} has no bound flow to replay")
        } else {
            format!(
                "preflight of version {version} passed: {}",
                st.preflight
                    .iter()
                    .map(|p| format!("flow {}: {}", p.flow, p.message.clone().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        conditions.push(cond(
            "PreflightPassed",
            true,
            "PreflightPassed",
            message.clone(),
        ));
        // Gate 4: a canary on every bound flow that declares steps, before the candidate becomes active.
        let canaried: Vec<&BoundFlow<'_>> = i
            .bound
            .iter()
            .filter(|b| {
                b.flow
                    .spec
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.canary.is_some())
            })
            .collect();
        let canary_of = |b: &BoundFlow<'_>| {
            b.flow
                .status
                .as_ref()
                .and_then(|s| s.canary.as_ref())
                .filter(|c| c.revision == revision)
                .cloned()
        };
        let aborted: Vec<(String, CanaryStatus)> = canaried
            .iter()
            .filter_map(|b| {
                canary_of(b)
                    .filter(|c| c.phase == canary::ABORTED || c.phase == canary::ABORTING)
                    .map(|c| (b.name().to_string(), c))
            })
            .collect();
        let waiting: Vec<String> = canaried
            .iter()
            .filter(|b| {
                !canary_of(b)
                    .is_some_and(|c| c.phase == canary::PROMOTING || c.phase == canary::PROMOTED)
            })
            .map(|b| {
                let at = canary_of(b)
                    .map(|c| format!("{} at step {} ({}%)", c.phase, c.step, c.weight))
                    .unwrap_or_else(|| "starting".into());
                format!("{} ({at})", b.name())
            })
            .collect();
        if !aborted.is_empty() {
            let message = format!(
                "the canary of version {version} was aborted: {}",
                aborted
                    .iter()
                    .map(|(f, c)| format!(
                        "flow {f}: {}",
                        c.message.clone().unwrap_or_else(|| c.phase.clone())
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            set_state(&mut entry, RevisionState::Rejected, &now);
            entry.reason = Some(CANARY_ABORTED.into());
            entry.message = Some(clip(&message, 2000));
            upsert(&mut st.revisions, entry);
            st.candidate_revision = None;
            conditions.push(cond("CanaryPassed", false, CANARY_ABORTED, message.clone()));
            conditions.push(cond(
                "Ready",
                false,
                CANARY_ABORTED,
                format!("{message}; {keep_running}; `meshline rollout retry` starts it again"),
            ));
            return;
        }
        if !waiting.is_empty() {
            let message = format!(
                "version {version} is in its canary on flow(s) {}",
                waiting.join(", ")
            );
            set_state(&mut entry, RevisionState::Canary, &now);
            entry.reason = Some("CanaryRunning".into());
            entry.message = Some(clip(&message, 2000));
            upsert(&mut st.revisions, entry);
            conditions.push(cond(
                "CanaryPassed",
                false,
                "CanaryRunning",
                message.clone(),
            ));
            conditions.push(cond(
                "Ready",
                false,
                "CanaryRunning",
                format!("{message}; {keep_running} on the rest of the buckets"),
            ));
            return;
        }
        conditions.push(cond(
            "CanaryPassed",
            true,
            if canaried.is_empty() {
                "NotRequired"
            } else {
                "CanaryPassed"
            },
            if canaried.is_empty() {
                format!("no bound flow declares canary steps; version {version} is promoted after its preflight")
            } else {
                format!("the canary of version {version} passed on every flow that declares steps")
            },
        ));
        // Promote: the candidate becomes what the workers run.
        for r in st.revisions.iter_mut() {
            if r.state == RevisionState::Active {
                set_state(r, RevisionState::Superseded, &now);
                r.reason = Some("Superseded".into());
                r.message = Some(format!("superseded by {version}"));
            }
        }
        set_state(&mut entry, RevisionState::Active, &now);
        entry.reason = Some("PreflightPassed".into());
        entry.message = Some(clip(&message, 2000));
        upsert(&mut st.revisions, entry);
        st.active_revision = Some(revision.to_string());
        st.current_version = Some(version.clone());
        st.candidate_revision = None;
        conditions.push(cond(
            "Ready",
            true,
            "Active",
            format!("version {version} ({hash}) is active"),
        ));
    } else {
        entry.reason = Some("PreflightRunning".into());
        entry.message = Some(format!(
            "preflight replay running on flow(s) {}",
            running.join(", ")
        ));
        upsert(&mut st.revisions, entry);
        conditions.push(cond(
            "PreflightPassed",
            false,
            "PreflightRunning",
            format!(
                "preflight replay of version {version} running on flow(s) {}",
                running.join(", ")
            ),
        ));
        conditions.push(cond(
            "Ready",
            false,
            "PreflightRunning",
            format!("version {version} is in preflight; {keep_running}"),
        ));
    }
}

/// Whether a person retried the aborted canary of `revision` on a bound flow (its canary runs again).
fn canary_retried(bound: &[BoundFlow<'_>], revision: &str) -> bool {
    bound.iter().any(|b| {
        b.flow
            .status
            .as_ref()
            .and_then(|s| s.canary.as_ref())
            .is_some_and(|c| {
                c.revision == revision
                    && matches!(c.phase.as_str(), canary::PROGRESSING | canary::PAUSED)
            })
    })
}

/// What the bound flows run now, for messages.
fn running(st: &SyncContractStatus) -> String {
    match (&st.current_version, &st.active_revision) {
        (Some(v), Some(r)) => format!("version {v} ({r})"),
        _ => "nothing yet".into(),
    }
}

fn set_state(r: &mut ContractRevision, state: RevisionState, now: &str) {
    if r.state != state || r.state_since.is_none() {
        r.state = state;
        r.state_since = Some(now.to_string());
    }
}

/// Replaces the entry with the same content hash, or appends (newest last).
fn upsert(list: &mut Vec<ContractRevision>, entry: ContractRevision) {
    match list
        .iter_mut()
        .find(|r| r.content_hash == entry.content_hash)
    {
        Some(r) => *r = entry,
        None => list.push(entry),
    }
}

/// Drops the oldest superseded and rejected revisions beyond [`HISTORY_LIMIT`]; never the active one or the
/// candidate.
fn prune(st: &mut SyncContractStatus) {
    let past = |r: &ContractRevision| {
        matches!(r.state, RevisionState::Superseded | RevisionState::Rejected)
            && r.name != st.active_revision
            && r.name != st.candidate_revision
    };
    let mut excess = st
        .revisions
        .iter()
        .filter(|r| past(r))
        .count()
        .saturating_sub(HISTORY_LIMIT);
    let keep: Vec<bool> = st
        .revisions
        .iter()
        .map(|r| {
            if excess > 0 && past(r) {
                excess -= 1;
                false
            } else {
                true
            }
        })
        .collect();
    let mut it = keep.into_iter();
    st.revisions.retain(|_| it.next().unwrap_or(true));
}

/// The ControllerRevisions that no entry of `status` names any more (pruned, or left by an older controller).
/// Never the active revision or the candidate.
pub fn orphan_revisions<'a>(
    status: &SyncContractStatus,
    stored: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    stored
        .filter(|name| {
            Some(*name) != status.active_revision.as_deref()
                && Some(*name) != status.candidate_revision.as_deref()
                && !status
                    .revisions
                    .iter()
                    .any(|r| r.name.as_deref() == Some(*name))
        })
        .map(str::to_string)
        .collect()
}
