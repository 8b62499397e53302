//! The SyncFlow reconciler: a flow becomes a token Secret, a ConfigMap with its rendered configuration, a ledger
//! PVC (embedded ledger), a Service, a headless status Service, a Deployment of `meshline worker` pods and,
//! above one replica, a PodDisruptionBudget, plus a NetworkPolicy when the controller ships them
//! (`--flow-network-policies on`); and its status tells the truth about them and about the worker's numbers.
//!
//! Apply order: token Secret, ConfigMap, PVC, NetworkPolicy, Service, status Service, Deployment,
//! PodDisruptionBudget — what the pods mount exists before the pods, the policy guards the pods from their
//! first start, and the budget follows the pods it protects. With the switch off, a NetworkPolicy the
//! controller made earlier is an orphan and is deleted (`--flow-network-policies clean-up` keeps the
//! controller watching them for that, with delete rights only).
//!
//! A flow that fails a gate (contract, owner, Secrets, worker pod settings) is not started: no Deployment is
//! created, an existing one is scaled to zero, and the ledger PVC is never deleted by the controller. Only garbage
//! collection removes it, when the flow itself is deleted under `spec.ledger.retentionPolicy: Delete`; under
//! `Retain` it carries no owner reference and outlives the flow. An existing PVC's owner reference follows the
//! policy on every reconcile, started or not, so that setting `Retain` on a flow that cannot start still protects
//! its ledger before the flow is deleted.

pub mod audit;
pub mod build;
pub mod canary;
pub mod outage;
pub mod status;
pub mod tickets;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::apply::{self, up_to_date};
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{SyncFlow, SyncFlowStatus};

/// How often an unchanged flow is looked at again even without a watch event (a safety net, not the mechanism).
pub const RESYNC: Duration = Duration::from_secs(600);

/// Step 1, the only part that calls the API: the keys of each referenced Secret (`None` when it is missing).
/// Secrets are read one by one rather than cached, so the controller never holds every Secret of the cluster.
pub async fn gather_secrets(
    ctx: &Context,
    flow: &SyncFlow,
    roster: Option<&crate::api::OwnershipRoster>,
) -> Result<BTreeMap<String, Option<BTreeSet<String>>>, Error> {
    let ns = flow.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = BTreeMap::new();
    for name in build::mounted_secrets(flow, roster) {
        let secret = api
            .get_opt(&name)
            .await
            .map_err(|e| Error::api("get", "Secret", format!("{ns}/{name}"), e))?;
        let keys = secret.map(|s| {
            let mut keys: BTreeSet<String> = s.data.unwrap_or_default().into_keys().collect();
            keys.extend(s.string_data.unwrap_or_default().into_keys());
            keys
        });
        out.insert(name, keys);
    }
    Ok(out)
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub async fn reconcile(flow: Arc<SyncFlow>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&flow, &ctx).await;
    ctx.metrics.observe(
        "SyncFlow",
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

async fn reconcile_inner(flow: &SyncFlow, ctx: &Context) -> Result<Action, Error> {
    let name = flow.name_any();
    let ns = flow.namespace().ok_or_else(|| Error::NoNamespace {
        kind: "SyncFlow",
        name: name.clone(),
    })?;
    let flow_ref = ObjectRef::from_obj(flow);
    if flow.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the children through their owner references.
        ctx.observations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&flow_ref);
        return Ok(Action::await_change());
    }
    tracing::debug!(namespace = %ns, name = %name, "reconciling SyncFlow");

    // 1. Gather. The flow runs the contract's active revision, never its live spec: a new version reaches the
    // workers only through the contract's gates.
    let live_contract = ctx
        .stores
        .contracts
        .get(&ObjectRef::new(&flow.spec.contract.name).within(&ns));
    let (contract, hold) = match &live_contract {
        None => (None, None),
        Some(c) => match super::contract::active_contract(ctx, &ns, c) {
            Ok(active) => (Some(Arc::new(active)), None),
            Err(why) => (None, Some(why)),
        },
    };
    let rosters: Vec<_> = ctx
        .stores
        .rosters
        .state()
        .into_iter()
        .filter(|r| r.metadata.namespace.as_deref() == Some(ns.as_str()))
        .collect();
    let owning = validate::owning_roster(flow, &rosters);
    let secrets = gather_secrets(ctx, flow, owning.as_ref().map(|(r, _)| &**r)).await?;

    // 2. Validate.
    let mut verdict = validate::validate(validate::Inputs {
        flow,
        contract,
        rosters: &rosters,
        secrets: &secrets,
        compile: &|c| ctx.compile(c),
        worker_defaults: &ctx.build.worker_defaults,
    });
    if let Some(why) = &hold {
        // Nothing to run yet, or the active revision is not known: the children stay as they are.
        verdict.contract_resolved = validate::Gate::Failed {
            reason: "AwaitingActiveRevision",
            message: why.clone(),
        };
    }

    let worker = build::worker_name(&name);
    let live_deployment = ctx
        .stores
        .deployments
        .get(&ObjectRef::new(&worker).within(&ns));
    let live_pdb = ctx.stores.pdbs.get(&ObjectRef::new(&worker).within(&ns));
    let live_ledger = ctx
        .stores
        .pvcs
        .get(&ObjectRef::new(&build::ledger_name(&name)).within(&ns));
    let policy_name = build::network_policy_name(&name);
    let live_policy = ctx
        .stores
        .network_policies
        .get(&ObjectRef::new(&policy_name).within(&ns));
    let (replicas, capped) = if let (true, Some(contract)) =
        (verdict.startable(), verdict.contract.as_ref())
    {
        // 3. Build.
        let has_token = ctx
            .stores
            .tokens
            .get(&ObjectRef::new(&build::token_name(&name)).within(&ns))
            .is_some();
        let desired = build::build(build::BuildInputs {
            flow,
            contract,
            roster: verdict.roster.as_deref(),
            settings: &ctx.build,
            revision: live_contract
                .as_ref()
                .and_then(|c| c.status.as_ref()?.active_revision.as_deref()),
            new_token: (!has_token).then(random_token),
        })
        .map_err(|reason| Error::Render {
            object: format!("SyncFlow {ns}/{name}"),
            reason,
        })?;

        // 4. Apply, in order.
        let client = &ctx.client;
        let m = &ctx.metrics;
        if let Some(token) = &desired.token_secret {
            apply::create_once(client, token, m).await?;
        }
        let cm = ctx
            .stores
            .config_maps
            .get(&ObjectRef::new(&worker).within(&ns));
        apply::apply(
            client,
            &desired.config_map,
            up_to_date(&desired.config_map, cm.as_deref()),
            m,
        )
        .await?;
        if let Some(pvc) = &desired.ledger {
            apply::apply(client, pvc, up_to_date(pvc, live_ledger.as_deref()), m).await?;
        } else {
            keep_ledger_ownership(ctx, flow, live_ledger.as_deref()).await?;
        }
        if let Some(policy) = &desired.network_policy {
            apply::apply(
                client,
                policy,
                up_to_date(policy, live_policy.as_deref()),
                m,
            )
            .await?;
        }
        let svc = ctx
            .stores
            .services
            .get(&ObjectRef::new(&worker).within(&ns));
        apply::apply(
            client,
            &desired.service,
            up_to_date(&desired.service, svc.as_deref()),
            m,
        )
        .await?;
        let status_svc = ctx
            .stores
            .services
            .get(&ObjectRef::new(&build::status_service_name(&name)).within(&ns));
        apply::apply(
            client,
            &desired.status_service,
            up_to_date(&desired.status_service, status_svc.as_deref()),
            m,
        )
        .await?;
        // Replicas are compared as well: a flow that was stopped by a failed gate was scaled by a patch that left
        // the hash alone.
        let deployment_in_sync = up_to_date(&desired.deployment, live_deployment.as_deref())
            && live_deployment
                .as_ref()
                .and_then(|d| d.spec.as_ref())
                .and_then(|s| s.replicas)
                == Some(desired.replicas);
        apply::apply(client, &desired.deployment, deployment_in_sync, m).await?;
        match &desired.pdb {
            Some(pdb) => {
                apply::apply(client, pdb, up_to_date(pdb, live_pdb.as_deref()), m).await?;
            }
            // 5. Orphans: the budget goes when replicas drop to one or zero. The ledger PVC is never an orphan.
            None if live_pdb.is_some() => {
                apply::delete::<PodDisruptionBudget>(client, &ns, &worker, m).await?
            }
            None => {}
        }
        let audit_name = audit::cron_job_name(&name);
        let live_audit = ctx
            .stores
            .cron_jobs
            .get(&ObjectRef::new(&audit_name).within(&ns));
        match &desired.audit {
            Some(cron) => {
                apply::apply(client, cron, up_to_date(cron, live_audit.as_deref()), m).await?;
            }
            // 5. Orphans: a flow moved to a side the audit cannot read loses its CronJob.
            None if live_audit.is_some() => {
                apply::delete::<CronJob>(client, &ns, &audit_name, m).await?
            }
            None => {}
        }
        (desired.replicas, desired.capped)
    } else if hold.is_some() {
        // Held: what runs keeps running on the revision it has.
        (
            live_deployment
                .as_ref()
                .and_then(|d| d.spec.as_ref())
                .and_then(|s| s.replicas)
                .unwrap_or(0),
            None,
        )
    } else {
        // Not started: stop an existing Deployment (keeping its pods' ledger), and drop its budget.
        if let Some(d) = &live_deployment
            && d.spec.as_ref().and_then(|s| s.replicas) != Some(0)
        {
            scale_to_zero(ctx, &ns, &worker).await?;
        }
        if live_pdb.is_some() {
            apply::delete::<PodDisruptionBudget>(&ctx.client, &ns, &worker, &ctx.metrics).await?;
        }
        keep_ledger_ownership(ctx, flow, live_ledger.as_deref()).await?;
        (0, None)
    };
    // 5. Orphans: a NetworkPolicy made while the switch was on goes when it is off. A flow that is not
    // started keeps its policy while the switch is on: its pods, scaled to zero, may come back.
    if ctx.build.network_policy.is_none() && live_policy.is_some() {
        apply::delete::<NetworkPolicy>(&ctx.client, &ns, &policy_name, &ctx.metrics).await?;
    }

    let observation = ctx
        .observations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&flow_ref)
        .cloned();
    // The canary of a contract candidate, beside the stable track. A flow that does not start (a failed gate)
    // keeps its rollout where it is; a held flow too.
    let rollout = if verdict.startable() && hold.is_none() {
        Some(
            canary::reconcile(
                ctx,
                canary::Inputs {
                    flow,
                    live_contract: live_contract.as_deref(),
                    roster: verdict.roster.as_deref(),
                    stable_replicas: replicas,
                    observation: observation.as_ref(),
                },
            )
            .await?,
        )
    } else {
        None
    };

    // 6. Status, only when it changed.
    let now = super::now_rfc3339();
    let sla = verdict.contract.as_ref().and_then(|c| c.spec.sla.clone());
    let next = status::compute(status::StatusInputs {
        generation: flow.metadata.generation,
        verdict: &verdict,
        paused: flow.spec.paused,
        replicas,
        capped: capped.as_deref(),
        deployment: live_deployment.as_deref(),
        observation: observation.as_ref(),
        sla: sla.as_ref(),
        live_contract: live_contract.as_deref(),
        flow_name: &name,
        previous: flow.status.as_ref(),
        now: &now,
    });
    let mut next = next;
    let flow_label = super::metrics::FlowLabel {
        namespace: ns.clone(),
        flow: name.clone(),
    };
    // Judged on fresh numbers only: the last ones kept over a silent poll would count nothing new.
    if let Some(w) = observation
        .as_ref()
        .filter(|o| o.ledger_fresh)
        .and_then(|o| o.ledger.as_deref())
    {
        let breaches: Vec<&str> = status::sla_breaches(w, sla.as_ref())
            .into_iter()
            .map(|(reason, _)| reason)
            .collect();
        ctx.metrics.record_sla(flow_label.clone(), &breaches);
    }
    let mut requeue = RESYNC;
    if let Some(rollout) = &rollout {
        next.canary = rollout.status.clone();
        if let Some(r) = rollout.requeue {
            requeue = requeue.min(r);
        }
        for note in &rollout.notes {
            let event = Event {
                type_: if note.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: note.reason.into(),
                note: Some(event_note(&note.message)),
                action: "Rollout".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &flow.object_ref(&())).await {
                tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot publish an Event");
            }
        }
    }
    // The causes only the controller sees become tickets in the flow's outbox (issue #16).
    if verdict.startable() {
        let causes = tickets::causes(observation.as_ref(), live_contract.as_deref());
        tickets::report(ctx, &ns, &name, observation.as_ref(), &causes).await;
    }
    if let Some(t) = observation
        .as_ref()
        .and_then(|o| o.ledger.as_ref())
        .and_then(|w| w.tickets.clone())
    {
        next.tickets = Some(t);
    }
    // The last reconciliation audit, as the workers' ledger has it; kept as last seen while no worker answers.
    next.audit = observation
        .as_ref()
        .and_then(|o| o.ledger.as_ref())
        .and_then(|w| w.audit.clone())
        .or_else(|| flow.status.as_ref().and_then(|s| s.audit.clone()));
    let audit_event = audit::finished(
        flow.status.as_ref().and_then(|s| s.audit.as_ref()),
        next.audit.as_ref(),
    );
    // No worker pod answering: the controller's own ticket, from an outbox in this status (issue #16).
    let covering = verdict.roster.as_deref().and_then(|r| {
        r.spec
            .assignments
            .iter()
            .find(|a| crate::validate::assignment_covers(a, flow))
            .map(|a| (r, a))
    });
    let outage_plan = outage::plan(outage::Inputs {
        namespace: &ns,
        flow: &name,
        previous: flow.status.as_ref().and_then(|s| s.outage.as_ref()),
        answer: &outage::answer(replicas > 0, observation.as_ref()),
        roster: covering.map(|(r, a)| (&r.spec, a)),
        now: ctx.now(),
        settings: &ctx.outage,
        acknowledge: flow
            .annotations()
            .get(outage::ACK_ANNOTATION)
            .map(String::as_str),
    });
    next.outage = outage_plan.outage.clone();
    if let Some(why) = &outage_plan.refused {
        let event = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: "OutageAcknowledgementRefused".into(),
            note: Some(event_note(why)),
            action: "Outage".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &flow.object_ref(&())).await {
            tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot publish an Event");
        }
    }
    if let Some(event) = outage::transition(
        flow.status.as_ref().and_then(|s| s.outage.as_ref()),
        next.outage.as_ref(),
    ) && let Err(e) = ctx.recorder.publish(&event, &flow.object_ref(&())).await
    {
        tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot publish an Event");
    }
    if let Some(r) = outage_plan.recheck_in {
        requeue = requeue.min(r.max(Duration::from_secs(1)));
    }
    // A contract change that ended in this reconcile: kept in the status, counted once the status is written.
    let before = flow.status.as_ref().and_then(|s| s.canary.as_ref());
    let ended = super::metrics::rollout_ended(before, next.canary.as_ref()).and_then(|outcome| {
        let took = contract_change_age(ctx, &ns, next.canary.as_ref())?;
        Some((outcome, took))
    });
    if let (Some((outcome, took)), Some(canary)) = (&ended, next.canary.as_ref()) {
        next.last_contract_change = Some(crate::api::ContractChangeEnd {
            revision: canary.revision.clone(),
            version: canary.version.clone(),
            outcome: outcome.to_string(),
            duration_seconds: i64::try_from(took.as_secs()).unwrap_or(i64::MAX),
            ended_at: now.clone(),
        });
    }
    if status::differs(flow.status.as_ref(), &next, |s| &mut s.conditions) {
        // This write carries the sends' in-doubt marks: it happens before anything is sent.
        apply::apply_status(&ctx.client, flow, &next, &ctx.metrics).await?;
        // After the write, so a reconcile that fails before it and runs again counts the end once.
        if let Some((outcome, took)) = &ended {
            ctx.metrics.record_rollout_end(&flow_label, outcome, *took);
        }
        for event in transitions(flow.status.as_ref(), &next)
            .into_iter()
            .chain(audit_event)
        {
            // An Event that cannot be published must not fail the reconcile: the status already says it.
            if let Err(e) = ctx.recorder.publish(&event, &flow.object_ref(&())).await {
                tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot publish an Event");
            }
        }
    }
    if let (false, Some(mut settled)) = (outage_plan.sends.is_empty(), outage_plan.outage) {
        outage::deliver(
            ctx,
            flow,
            covering.map(|(r, _)| r),
            &mut settled,
            &outage_plan.sends,
        )
        .await;
        next.outage = Some(settled);
        apply::apply_status(&ctx.client, flow, &next, &ctx.metrics).await?;
        if let Some(retry) = next
            .outage
            .as_ref()
            .and_then(|o| o.ticket.as_ref())
            .into_iter()
            .flat_map(|t| &t.deliveries)
            .filter_map(|d| d.next_attempt_at.as_deref())
            .filter_map(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            .map(|at| {
                (at.with_timezone(&chrono::Utc) - ctx.now())
                    .to_std()
                    .unwrap_or_default()
            })
            .min()
        {
            requeue = requeue.min(retry.max(Duration::from_secs(1)));
        }
    }
    Ok(Action::requeue(requeue))
}

/// Keeps the owner reference of an existing ledger PVC in step with `spec.ledger.retentionPolicy` when the
/// reconcile does not apply the PVC itself (the flow does not start, or its ledger is no longer embedded). It
/// applies the object the build step makes, so ownership stays with one field manager, and never creates a PVC
/// that does not exist. The size and class are the live ones: a spec edit of those waits for the flow to start
/// (and the content hash is left out, so that the full apply then is not skipped).
async fn keep_ledger_ownership(
    ctx: &Context,
    flow: &SyncFlow,
    live: Option<&PersistentVolumeClaim>,
) -> Result<(), Error> {
    let Some(live) = live else { return Ok(()) };
    let mut pvc = build::ledger_claim(flow);
    if pvc.metadata.owner_references.as_deref().unwrap_or_default()
        == live
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default()
    {
        return Ok(());
    }
    if let Some(a) = pvc.metadata.annotations.as_mut() {
        a.remove(super::APPLIED_HASH);
    }
    if let (Some(want), Some(have)) = (pvc.spec.as_mut(), live.spec.as_ref()) {
        want.resources = have.resources.clone();
        want.storage_class_name = have.storage_class_name.clone();
    }
    apply::apply(&ctx.client, &pvc, false, &ctx.metrics).await?;
    Ok(())
}

/// Scales a Deployment to zero with a merge patch of `spec.replicas` alone. (A server-side apply of a partial
/// object would drop every other field this manager owns.)
async fn scale_to_zero(ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(
        name,
        &pp,
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
    )
    .await
    .map_err(|e| Error::api("scale to zero", "Deployment", format!("{ns}/{name}"), e))?;
    ctx.metrics.writes.inc();
    Ok(())
}

/// Events for the transitions people act on: a gate that fails (with its reason), became ready, degraded,
/// recovered, disk pressure and its end.
/// How long ago the canary's revision (the contract change) was stored, from its ControllerRevision's
/// creation; `None` when it is not in the cache.
fn contract_change_age(
    ctx: &Context,
    ns: &str,
    canary: Option<&crate::api::CanaryStatus>,
) -> Option<Duration> {
    let revision = ctx
        .stores
        .revisions
        .get(&ObjectRef::new(&canary?.revision).within(ns))?;
    let created_ms = revision
        .metadata
        .creation_timestamp
        .as_ref()?
        .0
        .as_millisecond();
    let age_ms = chrono::Utc::now().timestamp_millis() - created_ms;
    u64::try_from(age_ms).ok().map(Duration::from_millis)
}

pub fn transitions(before: Option<&SyncFlowStatus>, after: &SyncFlowStatus) -> Vec<Event> {
    let old = |t: &str| before.and_then(|b| b.conditions.iter().find(|c| c.r#type == t));
    let mut events = Vec::new();
    for c in &after.conditions {
        let prev = old(&c.r#type);
        let changed = prev.is_none_or(|p| p.status != c.status || p.reason != c.reason);
        if !changed {
            continue;
        }
        let event = |type_, reason: &str| Event {
            type_,
            reason: reason.into(),
            note: Some(event_note(&c.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        match (c.r#type.as_str(), c.status.as_str()) {
            ("ContractResolved" | "OwnerAssigned" | "SecretsReady", "False")
                if c.reason != "AwaitingActiveRevision" =>
            {
                events.push(event(EventType::Warning, &c.reason));
            }
            ("Ready", "True") if prev.is_none_or(|p| p.status != "True") => {
                events.push(event(EventType::Normal, "BecameReady"));
            }
            ("Degraded", "True") => events.push(event(EventType::Warning, "Degraded")),
            ("Degraded", "False") if prev.is_some_and(|p| p.status == "True") => {
                events.push(event(EventType::Normal, "Recovered"));
            }
            ("DiskPressure", "True") => events.push(event(EventType::Warning, "DiskPressure")),
            ("DiskPressure", "False") if prev.is_some_and(|p| p.status == "True") => {
                events.push(event(EventType::Normal, "DiskPressureRelieved"));
            }
            _ => {}
        }
    }
    events
}

/// An Event's `note` is at most 1 KiB (bytes, not characters: the API server refuses more), cut at a character
/// boundary.
pub fn event_note(message: &str) -> String {
    const NOTE_MAX: usize = 1024;
    if message.len() <= NOTE_MAX {
        return message.to_string();
    }
    let mut end = NOTE_MAX - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// Backoff per object: 5 s doubling to 5 min, reset by a successful reconcile (see `run::error_policy`).
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.min(6));
    Duration::from_secs(secs.min(300))
}
