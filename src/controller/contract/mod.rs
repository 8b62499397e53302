//! The SyncContract reconciler: puts gates between a contract edit and the workers.
//!
//! Every version that compiles and passes the compatibility check is kept as an immutable ControllerRevision
//! owned by the contract. The bound flows run the **active** revision, never the live spec: a new version
//! becomes active only after its gates (compatibility, owner sign-offs, a preflight replay Job per bound flow;
//! see `crate::rollout::gates`) have passed, and until then every flow keeps delivering on the active one. The
//! status lists the revisions with their states and the preflight results; the conditions `Compiled`,
//! `Compatible`, `SignedOff`, `PreflightPassed` and `Ready` say where the current spec stands, and each gate's
//! transition is an Event on the contract and on every bound flow.
//!
//! gather (caches; the preflight pods' termination messages) → validate and decide (`status::compute`, pure)
//! → build (`build`, pure) → apply (revision, Jobs with their candidate ConfigMaps) → clean up (Jobs of a
//! replaced candidate, pruned revisions) → status and Events.

pub mod build;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::flow::status::differs;
use super::{Context, Error, FIELD_MANAGER, apply};
use crate::api::{OwnershipRoster, SyncContract, SyncContractStatus, SyncFlow};
use crate::rollout::gates;

pub use build::revision_name;
use status::{JobState, Replay};

/// While a preflight runs, the contract is looked at again this often even without a Job event.
const PREFLIGHT_RESYNC: Duration = Duration::from_secs(30);

pub async fn reconcile(contract: Arc<SyncContract>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&contract, &ctx).await;
    ctx.metrics.observe(
        "SyncContract",
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

/// The ControllerRevisions of `contract` in the cache.
fn stored_revisions(ctx: &Context, ns: &str, contract: &str) -> Vec<Arc<ControllerRevision>> {
    let label = super::names::label_value(contract);
    ctx.stores
        .revisions
        .state()
        .into_iter()
        .filter(|r| {
            r.metadata.namespace.as_deref() == Some(ns)
                && r.labels().get(build::CONTRACT_LABEL) == Some(&label)
                && r.owner_references()
                    .iter()
                    .any(|o| o.kind == "SyncContract" && o.name == contract)
        })
        .collect()
}

/// The spec of the revision `name` of this contract, from the cache.
pub fn revision_spec(ctx: &Context, ns: &str, name: &str) -> Option<crate::api::SyncContractSpec> {
    ctx.stores
        .revisions
        .get(&ObjectRef::new(name).within(ns))
        .and_then(|r| build::revision_spec(&r))
}

/// The contract as the bound flows run it: its active revision's spec under the live object's metadata. An
/// error says why there is none to run (no version activated yet, or the revision is not in the cache).
pub fn active_contract(
    ctx: &Context,
    ns: &str,
    live: &SyncContract,
) -> Result<SyncContract, String> {
    let name = live.name_any();
    let Some(active) = live.status.as_ref().and_then(|s| s.active_revision.clone()) else {
        return Err(format!(
            "SyncContract {ns}/{name} has no active revision yet: its first version is being checked"
        ));
    };
    match revision_spec(ctx, ns, &active) {
        Some(spec) => Ok(SyncContract {
            spec,
            ..live.clone()
        }),
        None => Err(format!(
            "the active revision {active} of SyncContract {ns}/{name} is not known (yet); the workers keep what they run"
        )),
    }
}

async fn reconcile_inner(contract: &SyncContract, ctx: &Context) -> Result<Action, Error> {
    let name = contract.name_any();
    let ns = contract.namespace().ok_or_else(|| Error::NoNamespace {
        kind: "SyncContract",
        name: name.clone(),
    })?;
    if contract.metadata.deletion_timestamp.is_some() {
        // Revisions and Jobs go by garbage collection, through their owner references.
        return Ok(Action::await_change());
    }
    let hash = crate::contract::content_hash(&contract.spec)
        .as_str()
        .to_string();

    // 1. Gather.
    let active_name = contract
        .status
        .as_ref()
        .and_then(|s| s.active_revision.clone());
    let active_spec = match &active_name {
        Some(n) => match revision_spec(ctx, &ns, n) {
            Some(spec) => Some(spec),
            None => {
                let active_hash = contract.status.as_ref().and_then(|s| {
                    s.revisions
                        .iter()
                        .find(|r| r.name.as_deref() == Some(n.as_str()))
                        .map(|r| r.content_hash.clone())
                });
                if active_hash.as_deref() == Some(hash.as_str()) {
                    // The active revision is the live spec: it can be stored again.
                    apply::create_once(
                        &ctx.client,
                        &build::controller_revision(
                            contract,
                            &hash,
                            next_sequence(ctx, &ns, &name),
                        ),
                        &ctx.metrics,
                    )
                    .await?;
                    Some(contract.spec.clone())
                } else {
                    // Not in the cache (yet, after a restart, or deleted by hand): judge nothing against an
                    // unknown active revision. The flows keep what they run.
                    tracing::warn!(namespace = %ns, contract = %name, revision = %n, "the active revision is not in the cache; looking again shortly");
                    return Ok(Action::requeue(Duration::from_secs(10)));
                }
            }
        },
        None => None,
    };
    let flows: Vec<Arc<SyncFlow>> = ctx.stores.flows.state();
    let rosters: Vec<Arc<OwnershipRoster>> = ctx.stores.rosters.state();
    let flow_refs: Vec<&SyncFlow> = flows.iter().map(|f| &**f).collect();
    let roster_refs: Vec<&OwnershipRoster> = rosters.iter().map(|r| &**r).collect();
    let bound = gates::bound_flows(&ns, &name, &flow_refs, &roster_refs);
    let jobs = gather_jobs(ctx, contract, &ns, &hash, &bound).await?;
    let compiled = ctx.compile(contract);

    // 2. Decide.
    let outcome = status::compute(status::Inputs {
        contract,
        compiled,
        active_spec: active_spec.as_ref(),
        bound: &bound,
        jobs: &jobs,
        now: &super::now_rfc3339(),
    });
    let next = outcome.status;

    // 3 and 4. Build and apply: the revision, then the Jobs.
    let revision = build::revision_name(&name, &hash);
    if outcome.store_revision
        && ctx
            .stores
            .revisions
            .get(&ObjectRef::new(&revision).within(&ns))
            .is_none()
    {
        apply::create_once(
            &ctx.client,
            &build::controller_revision(contract, &hash, next_sequence(ctx, &ns, &name)),
            &ctx.metrics,
        )
        .await?;
    }
    if !outcome.start_preflight.is_empty() {
        let active = SyncContract {
            spec: active_spec.clone().unwrap_or_else(|| contract.spec.clone()),
            ..contract.clone()
        };
        for flow_name in &outcome.start_preflight {
            let Some(b) = bound.iter().find(|b| b.name() == flow_name) else {
                continue;
            };
            start_preflight(ctx, contract, &active, b, &hash).await?;
        }
    }

    // 5. Clean up: the running Jobs of a candidate the spec no longer is, and revisions beyond the history.
    let current = build::short(&hash).to_string();
    let label = super::names::label_value(&name);
    for job in ctx.stores.jobs.state() {
        let mine = job.metadata.namespace.as_deref() == Some(ns.as_str())
            && job.labels().get(build::CONTRACT_LABEL) == Some(&label)
            && job
                .owner_references()
                .iter()
                .any(|o| o.kind == "SyncContract" && o.name == name);
        let other = job.labels().get(build::REVISION_LABEL) != Some(&current)
            || next.candidate_revision.is_none();
        if mine && other && !finished(&job) {
            apply::delete::<Job>(&ctx.client, &ns, &job.name_any(), &ctx.metrics).await?;
        }
    }
    let stored = stored_revisions(ctx, &ns, &name);
    for orphan in status::orphan_revisions(
        &next,
        stored
            .iter()
            .map(|r| r.metadata.name.as_deref().unwrap_or_default()),
    ) {
        apply::delete::<ControllerRevision>(&ctx.client, &ns, &orphan, &ctx.metrics).await?;
    }

    // 6. Status, and an Event per gate transition on the contract and on every bound flow.
    if differs(contract.status.as_ref(), &next, |s| &mut s.conditions) {
        apply::apply_status(&ctx.client, contract, &next, &ctx.metrics).await?;
        let events = transitions(contract.status.as_ref(), &next);
        for event in &events {
            publish(ctx, event, &contract.object_ref(&())).await;
            for b in &bound {
                publish(ctx, event, &b.flow.object_ref(&())).await;
            }
        }
    }
    Ok(if next.candidate_revision.is_some() {
        Action::requeue(PREFLIGHT_RESYNC)
    } else {
        Action::requeue(super::flow::RESYNC)
    })
}

async fn publish(ctx: &Context, event: &Event, on: &k8s_openapi::api::core::v1::ObjectReference) {
    // An Event that cannot be published must not fail the reconcile: the status already says it.
    if let Err(e) = ctx.recorder.publish(event, on).await {
        tracing::warn!(error = %e, "cannot publish an Event");
    }
}

/// The next revision number: one above the highest stored.
fn next_sequence(ctx: &Context, ns: &str, contract: &str) -> i64 {
    stored_revisions(ctx, ns, contract)
        .iter()
        .map(|r| r.revision)
        .max()
        .unwrap_or(0)
        + 1
}

fn finished(job: &Job) -> bool {
    let status = job.status.as_ref();
    status.and_then(|s| s.succeeded).unwrap_or(0) > 0
        || status.and_then(|s| s.failed).unwrap_or(0) > 0
        || status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            })
}

/// Step 1 for the preflight: the current spec's Job of each bound flow, and for a finished one whose result
/// the status does not hold yet, its pod's termination message (the replay's report).
async fn gather_jobs(
    ctx: &Context,
    contract: &SyncContract,
    ns: &str,
    hash: &str,
    bound: &[gates::BoundFlow<'_>],
) -> Result<BTreeMap<String, JobState>, Error> {
    let mut out = BTreeMap::new();
    let recorded = |flow: &str| {
        contract.status.as_ref().is_some_and(|s| {
            s.preflight.iter().any(|p| {
                p.flow == flow
                    && p.revision == build::revision_name(&contract.name_any(), hash)
                    && p.phase != "Running"
            })
        })
    };
    for b in bound {
        let flow = b.name();
        let name = build::job_name(flow, hash);
        let Some(job) = ctx.stores.jobs.get(&ObjectRef::new(&name).within(ns)) else {
            continue;
        };
        if !finished(&job) {
            out.insert(flow.to_string(), JobState::Running);
            continue;
        }
        if recorded(flow) {
            // The status has its result; nothing to read.
            continue;
        }
        out.insert(
            flow.to_string(),
            JobState::Finished(job_result(ctx, ns, &job).await?),
        );
    }
    Ok(out)
}

/// The replay's report from a finished Job: its pod's termination message, or the Job's own failure reason.
async fn job_result(ctx: &Context, ns: &str, job: &Job) -> Result<Result<Replay, String>, Error> {
    let name = job.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
        .await
        .map_err(|e| Error::api("list", "Pod", format!("{ns} (job-name={name})"), e))?;
    let message = list
        .items
        .iter()
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        })
        .find(|m| !m.trim().is_empty());
    let failure = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
        })
        .map(|c| {
            format!(
                "the preflight Job {name} failed ({}): {}",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )
        });
    Ok(match (message, failure) {
        (Some(m), failure) => match Replay::parse(&m) {
            Ok(r) => Ok(r),
            Err(e) => Err(failure.map_or(e.clone(), |f| format!("{f}; {e}"))),
        },
        (None, Some(f)) => Err(f),
        (None, None) => Err(format!(
            "the preflight Job {name} finished without a report (no termination message)"
        )),
    })
}

/// Creates one flow's preflight Job, then the ConfigMap with the candidate, owned by the Job.
async fn start_preflight(
    ctx: &Context,
    contract: &SyncContract,
    active: &SyncContract,
    b: &gates::BoundFlow<'_>,
    hash: &str,
) -> Result<(), Error> {
    let ns = contract.namespace().unwrap_or_default();
    let render = |reason: String| Error::Render {
        object: format!("preflight of SyncFlow {ns}/{}", b.name()),
        reason,
    };
    let desired = super::flow::build::build(super::flow::build::BuildInputs {
        flow: b.flow,
        contract: active,
        roster: b.assignment.map(|(r, _)| r),
        settings: &ctx.build,
        revision: contract
            .status
            .as_ref()
            .and_then(|s| s.active_revision.as_deref()),
        new_token: None,
    })
    .map_err(render)?;
    let job = build::preflight_job(build::PreflightInputs {
        contract,
        flow: b.flow,
        worker: &desired.deployment,
        hash,
    })
    .map_err(render)?;
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    ctx.metrics.writes.inc();
    let created = match api.create(&pp, &job).await {
        Ok(j) => j,
        Err(kube::Error::Api(s)) if s.code == 409 => api
            .get(&job.name_any())
            .await
            .map_err(|e| Error::api("get", "Job", format!("{ns}/{}", job.name_any()), e))?,
        Err(e) => {
            return Err(Error::api(
                "create",
                "Job",
                format!("{ns}/{}", job.name_any()),
                e,
            ));
        }
    };
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let cm = build::candidate_config_map(contract, &job, &uid).map_err(render)?;
    apply::create_once(&ctx.client, &cm, &ctx.metrics).await
}

/// Events for the gate transitions people act on.
pub fn transitions(before: Option<&SyncContractStatus>, after: &SyncContractStatus) -> Vec<Event> {
    let old = |t: &str| before.and_then(|b| b.conditions.iter().find(|c| c.r#type == t));
    let mut events = Vec::new();
    for c in &after.conditions {
        if !matches!(
            c.r#type.as_str(),
            "Compiled" | "Compatible" | "SignedOff" | "PreflightPassed" | "Ready"
        ) {
            continue;
        }
        let prev = old(&c.r#type);
        if prev.is_some_and(|p| p.status == c.status && p.reason == c.reason) {
            continue;
        }
        // A first status with everything passing is no news.
        if prev.is_none() && c.status == "True" && c.r#type != "Ready" {
            continue;
        }
        let warning = c.status == "False"
            && !matches!(
                c.reason.as_str(),
                "AwaitingSignOff" | "PreflightRunning" | "WaitingForGates"
            );
        events.push(Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: if c.status == "True" && c.r#type == "Ready" {
                "RevisionActive".into()
            } else {
                c.reason.clone()
            },
            note: Some(super::flow::event_note(&c.message)),
            action: "ContractChange".into(),
            secondary: None,
        });
    }
    events
}
