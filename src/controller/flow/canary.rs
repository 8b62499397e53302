//! The canary part of the flow reconcile: while the flow's contract has a candidate in `Canary`, run it on a
//! second Deployment beside the stable one, move the bucket split by the flow's steps, measure, and end the
//! rollout by promotion or abort (the state machine is [`crate::rollout::canary`], pure).
//!
//! Gather: the candidate (the contract's status and its revision cache), a person's command (annotation
//! [`COMMAND_ANNOTATION`]), what every worker of both tracks applies (the status poll), the canary Deployment
//! (its `ProgressDeadlineExceeded`), and, when a measurement is due, the ledger's per-revision measures read
//! through a stable worker's operations API. Then decide (pure), build (pure, [`super::build::build_canary`]),
//! apply (the rollout ConfigMap, the canary's Deployment, ConfigMap and status Service), clean up (the canary
//! Deployment once the rollout no longer needs it; its ConfigMap and Service follow by garbage collection) and
//! release the leases the canary's pods held once they are gone.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;

use super::build;
use super::status::{Observation, PodAnswer};
use crate::api::{
    CanaryStatus, OwnershipRoster, RevisionState, SyncContract, SyncFlow, TrackMeasures,
};
use crate::controller::apply::{self, up_to_date};
use crate::controller::poll::WorkerPod;
use crate::controller::{Context, Error};
use crate::rollout::canary::{
    self, COMMAND_ANNOTATION, Candidate, Command, Decision, Measured, Observed,
};
use crate::rollout::split::Track;

/// What the canary step gives the status step.
pub struct Outcome {
    pub status: Option<CanaryStatus>,
    pub requeue: Option<Duration>,
    pub notes: Vec<canary::Note>,
}

/// The contract's candidate for a canary: its current spec's revision while it is in `Canary`, or while it was
/// rejected by an aborted canary (a `retry` starts it again). Returns (revision, version).
pub fn candidate_of(contract: &SyncContract) -> Option<(String, String)> {
    let status = contract.status.as_ref()?;
    let hash = crate::contract::content_hash(&contract.spec)
        .as_str()
        .to_string();
    let entry = status.revisions.iter().find(|r| r.content_hash == hash)?;
    let canary_state = entry.state == RevisionState::Canary
        || (entry.state == RevisionState::Rejected
            && entry.reason.as_deref() == Some(CANARY_ABORTED));
    canary_state
        .then(|| Some((entry.name.clone()?, entry.version.clone())))
        .flatten()
}

/// The reason a contract revision is rejected with when a bound flow's canary aborted.
pub const CANARY_ABORTED: &str = "CanaryAborted";

/// The weight every worker of both tracks applies for `candidate`, when they all agree and at least one canary
/// worker (running the candidate) answered; `None` while any disagrees or has not answered.
pub fn applied_weight(observation: Option<&Observation>, candidate: &str) -> Option<u8> {
    let observation = observation?;
    let mut weight: Option<u8> = None;
    let mut canary_seen = false;
    for pod in &observation.pods {
        let PodAnswer::Running(w) = &pod.answer else {
            return None;
        };
        let split = w.rollout.as_ref()?;
        if split.canary_revision.as_deref() != Some(candidate) || split.error.is_some() {
            return None;
        }
        if split.track == Track::Canary {
            if w.revision.as_deref() != Some(candidate) {
                return None;
            }
            canary_seen = true;
        }
        match weight {
            None => weight = Some(split.weight),
            Some(x) if x == split.weight => {}
            Some(_) => return None,
        }
    }
    weight.filter(|_| canary_seen)
}

/// The revision every stable worker reports running, when all of them answered and agree.
pub fn stable_revision(observation: Option<&Observation>) -> Option<String> {
    let mut revision: Option<String> = None;
    for pod in &observation?.pods {
        let PodAnswer::Running(w) = &pod.answer else {
            return None;
        };
        if w.rollout.as_ref().is_some_and(|r| r.track == Track::Canary) {
            continue;
        }
        let this = w.revision.clone()?;
        match &revision {
            None => revision = Some(this),
            Some(r) if *r == this => {}
            Some(_) => return None,
        }
    }
    revision
}

/// A stable worker that answered the last poll, to read the shared ledger through.
fn stable_pod(observation: Option<&Observation>) -> Option<WorkerPod> {
    observation?.pods.iter().find_map(|p| match &p.answer {
        PodAnswer::Running(w) if w.rollout.as_ref().is_none_or(|r| r.track == Track::Stable) => {
            Some(WorkerPod {
                name: p.pod.clone(),
                address: p.address.clone(),
                ready: p.ready,
            })
        }
        _ => None,
    })
}

/// The flow's token, from the cache of token Secrets.
pub(crate) fn flow_token(ctx: &Context, ns: &str, flow: &str) -> Option<String> {
    ctx.stores
        .tokens
        .get(&ObjectRef::new(&build::token_name(flow)).within(ns))
        .and_then(|s| {
            s.data
                .as_ref()?
                .get(build::TOKEN_KEY)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        })
}

async fn measures(
    ctx: &Context,
    ns: &str,
    flow: &str,
    pod: &WorkerPod,
    revision: &str,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
) -> Result<TrackMeasures, String> {
    let path = format!(
        "/rollout/measures?revision={}&since={}&until={}",
        url_encode(revision),
        since.timestamp_millis(),
        until.timestamp_millis()
    );
    // Behind the flow's token, like `/status`.
    let token = flow_token(ctx, ns, flow);
    let (status, body) = ctx
        .workers
        .call(ns, pod, http::Method::GET, &path, token.as_deref(), None)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!(
            "worker {} answered {status} to {path}: {}",
            pod.name,
            crate::controller::contract::status::clip(&String::from_utf8_lossy(&body), 300)
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("worker {}: {path}: not the measures: {e}", pod.name))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Why the canary Deployment cannot progress, from its `Progressing` condition.
fn stuck(deployment: Option<&Deployment>) -> Option<String> {
    deployment?
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| {
            format!(
                "ProgressDeadlineExceeded: {}",
                c.message.clone().unwrap_or_default()
            )
        })
}

pub struct Inputs<'a> {
    pub flow: &'a SyncFlow,
    pub live_contract: Option<&'a SyncContract>,
    pub roster: Option<&'a OwnershipRoster>,
    /// Replicas of the stable track.
    pub stable_replicas: i32,
    pub observation: Option<&'a Observation>,
}

pub async fn reconcile(ctx: &Context, i: Inputs<'_>) -> Result<Outcome, Error> {
    let flow = i.flow;
    let ns = flow.namespace().unwrap_or_default();
    let name = flow.name_any();
    let previous = flow.status.as_ref().and_then(|s| s.canary.as_ref());
    let policy = flow.spec.rollout.as_ref().and_then(|r| r.canary.as_ref());
    let now = ctx.now();

    // 1. Gather.
    let found = i.live_contract.and_then(candidate_of);
    let candidate_spec = match &found {
        Some((revision, _)) => {
            match crate::controller::contract::revision_spec(ctx, &ns, revision) {
                Some(spec) => Some(spec),
                None => {
                    // Not in the revision cache yet: wait for it rather than act on half the picture.
                    return Ok(Outcome {
                        status: previous.cloned(),
                        requeue: Some(Duration::from_secs(5)),
                        notes: Vec::new(),
                    });
                }
            }
        }
        None => None,
    };
    let active_revision = i
        .live_contract
        .and_then(|c| c.status.as_ref()?.active_revision.clone());
    let command = flow
        .annotations()
        .get(COMMAND_ANNOTATION)
        .filter(|v| previous.and_then(|p| p.last_command.as_deref()) != Some(v.trim()))
        .map(|v| Command::parse(v));
    // A refused command is reported once: remember its value as acted on.
    let refused_id = match &command {
        Some(Err(_)) => flow
            .annotations()
            .get(COMMAND_ANNOTATION)
            .map(|v| v.trim().to_string()),
        _ => None,
    };
    let canary_deployment = ctx
        .stores
        .deployments
        .get(&ObjectRef::new(&build::canary_name(&name)).within(&ns));
    let candidate_name = found.as_ref().map(|(r, _)| r.as_str());
    let mut observed = Observed {
        applied_weight: candidate_name.and_then(|c| applied_weight(i.observation, c)),
        canary_pods: 0,
        canary_stuck: stuck(canary_deployment.as_deref()),
        stable_revision: stable_revision(i.observation),
    };
    observed.canary_pods = if canary_deployment.is_some() {
        // The Deployment still exists: its pods may too.
        1
    } else if previous.is_some_and(|p| {
        matches!(
            p.phase.as_str(),
            canary::ABORTING | canary::PROMOTING | canary::PROGRESSING | canary::PAUSED
        )
    }) {
        canary_pods(ctx, &ns, &name).await?
    } else {
        0
    };
    let window = canary::due(policy, previous, now);
    let measured = match (window, candidate_name, active_revision.as_deref()) {
        (Some((since, until)), Some(candidate), Some(active)) => {
            Some(match stable_pod(i.observation) {
                None => Measured::Error(
                    "no stable worker answered the last status poll, so the ledger could not be read".into(),
                ),
                Some(pod) => {
                    let canary_m = measures(ctx, &ns, &name, &pod, candidate, since, until).await;
                    let stable_m = measures(ctx, &ns, &name, &pod, active, since, until).await;
                    match (canary_m, stable_m) {
                        (Ok(canary), Ok(stable)) => Measured::Taken { canary, stable },
                        (Err(e), _) | (_, Err(e)) => Measured::Error(e),
                    }
                }
            })
        }
        _ => None,
    };

    // 2. Decide.
    let mut d: Decision = canary::decide(canary::Inputs {
        policy,
        shared_ledger: flow.spec.ledger.r#type == crate::api::LedgerType::Postgres,
        candidate: found
            .as_ref()
            .map(|(revision, version)| Candidate { revision, version }),
        active_revision: active_revision.as_deref(),
        previous,
        command,
        observed: &observed,
        measured,
        now,
    });
    if let (Some(id), Some(st)) = (refused_id, d.status.as_mut()) {
        st.last_command = Some(id);
    }

    // 3.–5. Build, apply, clean up.
    let client = &ctx.client;
    let m = &ctx.metrics;
    if build::follows_split(flow) {
        let desired = build::rollout_config_map(flow, &d.split);
        let live = ctx
            .stores
            .config_maps
            .get(&ObjectRef::new(&build::rollout_name(&name)).within(&ns));
        apply::apply(client, &desired, up_to_date(&desired, live.as_deref()), m).await?;
    }
    // The revision the canary runs: the candidate, or (promoted, while the stable workers restart on it) the
    // revision the rollout is about.
    let run = d
        .status
        .as_ref()
        .map(|s| s.revision.clone())
        .filter(|_| d.run_canary);
    let run_spec = match (&run, &found, candidate_spec) {
        (Some(r), Some((c, _)), Some(spec)) if r == c => Some(spec),
        (Some(r), _, _) => crate::controller::contract::revision_spec(ctx, &ns, r),
        _ => None,
    };
    if run.is_some() && run_spec.is_none() {
        // Its revision is not in the cache (yet): leave the canary as it is.
        return Ok(Outcome {
            status: previous.cloned(),
            requeue: Some(Duration::from_secs(5)),
            notes: d.notes,
        });
    }
    match (run, run_spec, i.live_contract) {
        (Some(revision), Some(spec), Some(live)) => {
            let revision = revision.as_str();
            let contract = SyncContract {
                spec,
                ..live.clone()
            };
            let desired = build::build_canary(build::CanaryInputs {
                flow,
                candidate: &contract,
                revision,
                roster: i.roster,
                settings: &ctx.build,
                stable_replicas: i.stable_replicas,
                weight: d.split.weight,
                owner: canary_deployment.as_deref(),
            })
            .map_err(|reason| Error::Render {
                object: format!("canary of SyncFlow {ns}/{name}"),
                reason,
            })?;
            let in_sync = up_to_date(&desired.deployment, canary_deployment.as_deref())
                && canary_deployment
                    .as_ref()
                    .and_then(|d| d.spec.as_ref()?.replicas)
                    == desired.deployment.spec.as_ref().and_then(|s| s.replicas);
            apply::apply(client, &desired.deployment, in_sync, m).await?;
            if let Some(cm) = &desired.config_map {
                let live: Option<std::sync::Arc<ConfigMap>> = ctx
                    .stores
                    .config_maps
                    .get(&ObjectRef::new(&build::canary_name(&name)).within(&ns));
                apply::apply(client, cm, up_to_date(cm, live.as_deref()), m).await?;
            }
            if let Some(svc) = &desired.status_service {
                let live: Option<std::sync::Arc<Service>> = ctx
                    .stores
                    .services
                    .get(&ObjectRef::new(&build::canary_status_service_name(&name)).within(&ns));
                apply::apply(client, svc, up_to_date(svc, live.as_deref()), m).await?;
            }
            if desired.config_map.is_none() {
                // The Deployment was just created; its ConfigMap and Service follow once its uid is known.
                d.requeue = Some(
                    d.requeue
                        .map_or(Duration::from_secs(2), |r| r.min(Duration::from_secs(2))),
                );
            }
        }
        _ => {
            if canary_deployment.is_some() {
                apply::delete::<Deployment>(client, &ns, &build::canary_name(&name), m).await?;
            }
        }
    }
    let finished_now = d.release_leases
        && previous.is_none_or(|p| !matches!(p.phase.as_str(), canary::ABORTED | canary::PROMOTED));
    if finished_now {
        release_leases(ctx, &ns, &name, i.observation, &mut d).await;
    }
    Ok(Outcome {
        status: d.status,
        requeue: d.requeue,
        notes: d.notes,
    })
}

/// Pods of the flow's canary Deployment that still exist (terminating ones included: they may still deliver).
async fn canary_pods(ctx: &Context, ns: &str, flow: &str) -> Result<usize, Error> {
    let selector = build::canary_selector(flow)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| Error::api("list", "Pod", format!("{ns} ({selector})"), e))?;
    Ok(list.items.len())
}

/// Gives the records the canary's (now gone) pods had leased back to stable at once, instead of after their
/// leases lapse. Best effort: with no stable worker to ask, the leases lapse on their own and stable takes
/// the records then; either way no record is lost, and none is delivered twice (the pods are gone).
async fn release_leases(
    ctx: &Context,
    ns: &str,
    flow: &str,
    observation: Option<&Observation>,
    d: &mut Decision,
) {
    let prefix = format!("{}-", build::canary_name(flow));
    let Some(pod) = stable_pod(observation) else {
        d.notes.push(canary::Note {
            reason: "CanaryLeasesLapse",
            message: format!(
                "no stable worker answered to release the canary's leases ({prefix}*); its unfinished records go back to stable when their leases lapse"
            ),
            warning: false,
        });
        return;
    };
    let path = format!("/rollout/release?ownerPrefix={}", url_encode(&prefix));
    let token = flow_token(ctx, ns, flow);
    let answer = ctx
        .workers
        .call(ns, &pod, http::Method::POST, &path, token.as_deref(), None)
        .await;
    let (reason, message, warning) = match answer {
        Ok((200, body)) => {
            let released = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("released")?.as_u64())
                .unwrap_or(0);
            (
                "CanaryLeasesReleased",
                format!("{released} record(s) the canary's pods had leased went back to stable"),
                false,
            )
        }
        Ok((status, body)) => (
            "CanaryLeasesLapse",
            format!(
                "worker {} answered {status} to the release of the canary's leases ({}); its unfinished records go back to stable when their leases lapse",
                pod.name,
                crate::controller::contract::status::clip(&String::from_utf8_lossy(&body), 200)
            ),
            true,
        ),
        Err(e) => (
            "CanaryLeasesLapse",
            format!(
                "the release of the canary's leases failed ({e}); its unfinished records go back to stable when their leases lapse"
            ),
            true,
        ),
    };
    d.notes.push(canary::Note {
        reason,
        message,
        warning,
    });
}
