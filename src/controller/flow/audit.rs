//! The flow's nightly reconciliation audit, as the controller runs it: one CronJob per flow on its roster's
//! schedule, whose pod runs `meshline audit FLOW` against the flow's workers (the audit itself runs in a
//! worker, which has the flow's credentials, ledger, ticket outbox and rate limit; see `crate::audit`), and the
//! last result carried from the workers' `/status` into `status.audit` with an Event when a new run ends.
//!
//! Owns building the CronJob (pure) and the status and Event of a finished run (pure). The reconciler applies
//! the CronJob and deletes it when the flow no longer has one.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{
    CronJob, CronJobSpec, JobSpec, JobTemplateSpec, PodFailurePolicy,
    PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, ResourceRequirements, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::events::{Event, EventType};

use super::build::{OPS_PORT, TOKEN_DIR, TOKEN_KEY, status_service_name};
use crate::api::{
    AuditOutcome, FlowAuditStatus, OwnershipRoster, SinkSystem, SourceSystem, SyncFlow,
};
use crate::controller::{FLOW_LABEL, MANAGED_BY, names};

/// The audit pods' `app.kubernetes.io/component`; the flow's NetworkPolicy admits these pods to the
/// operations port.
pub const AUDIT_COMPONENT: &str = "audit";
/// Nightly at 02:00, when the roster names no schedule.
pub const DEFAULT_SCHEDULE: &str = "0 2 * * *";
/// A Job that has not started this long after its time is skipped, not run late into the working day.
const STARTING_DEADLINE_SECONDS: i64 = 3600;
/// A backstop for a Job that can never finish (a worker that accepts the run but never completes it). The
/// audit's own retries end a run long before; slowness of a side makes a partial result, never this.
const ACTIVE_DEADLINE_SECONDS: i64 = 6 * 3600;
/// A failed pod is retried: the run lives in the ledger, so a retried Job joins the running audit where it is.
const BACKOFF_LIMIT: i32 = 3;

/// The CronJob's name (at most 52 characters: the Jobs it creates get a suffix).
pub fn cron_job_name(flow: &str) -> String {
    names::cron_job(&format!("meshline-audit-{flow}"))
}

/// Why a flow gets no audit, when it gets none: a side without a query API the audit can read.
pub fn unauditable(flow: &SyncFlow) -> Option<String> {
    if flow.spec.source.system == SourceSystem::Generic {
        return Some(
            "spec.source.system: a generic webhook source has no query API the audit can read"
                .into(),
        );
    }
    if flow.spec.sink.system == SinkSystem::Http {
        return Some("spec.sink.system: an http sink has no query API the audit can read".into());
    }
    None
}

/// The flow's audit CronJob, built from its worker Deployment's pod template (image, pull secrets, placement,
/// security context), or `None` when the flow cannot be audited. The pod mounts only the flow's token: it asks
/// a worker to run the audit and waits for the result, so it never holds a credential of either system.
pub fn cron_job(
    flow: &SyncFlow,
    roster: Option<&OwnershipRoster>,
    worker: &Deployment,
) -> Result<Option<CronJob>, String> {
    if unauditable(flow).is_some() {
        return Ok(None);
    }
    // A schedule the API server would refuse: no audit rather than a refused write that fails the flow's
    // whole reconcile; the roster's `AuditScheduled` condition says why.
    if roster
        .and_then(|r| r.spec.audit.as_ref())
        .is_some_and(|s| !crate::audit::schedule::problems(s).is_empty())
    {
        return Ok(None);
    }
    let flow_name = flow.metadata.name.clone().unwrap_or_default();
    let ns = flow.metadata.namespace.clone().unwrap_or_default();
    let schedule = roster.and_then(|r| r.spec.audit.as_ref());
    let mut template = worker
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or("the worker Deployment has no pod template")?;
    let pod_labels = labels(&flow_name);
    // Only the audit's labels: the worker's own (its Deployment's selector among them) must never match an
    // audit pod, or the worker Services would route webhooks and status polls to it.
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels = Some(pod_labels.clone());
    meta.annotations = None;
    let pod = template
        .spec
        .as_mut()
        .ok_or("the worker pod template has no spec")?;
    // Never restarted in place: each attempt is a pod of its own, so the Job's pod failure policy can tell
    // an audit that found differences (exit 1: final, the ticket has them) from one that could not finish
    // (exit 2: retried, and the retry joins the run where it stopped).
    pod.restart_policy = Some("Never".into());
    pod.termination_grace_period_seconds = Some(10);
    // The token and a scratch directory; no config, no ledger, no credentials.
    pod.volumes = Some(
        pod.volumes
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.name == "token")
            .chain(std::iter::once(Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("16Mi".into())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            }))
            .collect(),
    );
    let container = pod
        .containers
        .first_mut()
        .ok_or("the worker pod template has no container")?;
    container.name = "audit".into();
    container.ports = None;
    container.liveness_probe = None;
    container.readiness_probe = None;
    container.env = None;
    container.termination_message_policy = Some("FallbackToLogsOnError".into());
    container.volume_mounts = Some(vec![
        VolumeMount {
            name: "token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ]);
    // The pod only waits on a worker: a small request, and a limit that a loop could not outgrow unnoticed.
    container.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("10m".into())),
            ("memory".to_string(), Quantity("32Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("64Mi".into()),
        )])),
        ..ResourceRequirements::default()
    });
    container.args = Some(vec![
        "audit".into(),
        flow_name.clone(),
        "--url".into(),
        format!(
            "http://{}.{ns}.svc:{OPS_PORT}",
            status_service_name(&flow_name)
        ),
        "--token-file".into(),
        format!("{TOKEN_DIR}/{TOKEN_KEY}"),
    ]);
    Ok(Some(CronJob {
        metadata: ObjectMeta {
            name: Some(cron_job_name(&flow_name)),
            namespace: flow.metadata.namespace.clone(),
            labels: Some(pod_labels.clone()),
            owner_references: Some(vec![super::build::owner_reference(flow)]),
            ..ObjectMeta::default()
        },
        spec: Some(CronJobSpec {
            schedule: schedule
                .and_then(|s| s.schedule.clone())
                .unwrap_or_else(|| DEFAULT_SCHEDULE.into()),
            time_zone: schedule.and_then(|s| s.time_zone.clone()),
            // A paused flow has no worker to ask.
            suspend: Some(schedule.is_some_and(|s| s.suspend) || flow.spec.paused),
            // One audit at a time: the worker would join the running one anyway.
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: Some(STARTING_DEADLINE_SECONDS),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(BACKOFF_LIMIT),
                    pod_failure_policy: Some(pod_failure_policy()),
                    active_deadline_seconds: Some(ACTIVE_DEADLINE_SECONDS),
                    template,
                    ..JobSpec::default()
                }),
            },
        }),
        ..CronJob::default()
    }))
}

/// Exit 1 (`meshline audit`: the audit finished with unexplained differences) fails the Job at once: running
/// it again would find the same differences. A pod evicted or preempted (`DisruptionTarget`) is not counted
/// against the retries. Anything else (exit 2: partial, unreachable worker) is retried up to the backoff limit.
fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some("audit".into()),
                    operator: "In".into(),
                    values: vec![1],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    }
}

/// The audit pods' labels.
pub fn labels(flow: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "meshline-audit".into()),
        (
            "app.kubernetes.io/instance".into(),
            names::label_value(flow),
        ),
        ("app.kubernetes.io/component".into(), AUDIT_COMPONENT.into()),
        ("app.kubernetes.io/part-of".into(), "meshline".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
        (FLOW_LABEL.into(), names::label_value(flow)),
    ])
}

/// The Event of a run that finished since the status last said: a new run id with an outcome.
pub fn finished(
    before: Option<&FlowAuditStatus>,
    after: Option<&FlowAuditStatus>,
) -> Option<Event> {
    let after = after?;
    let outcome = after.outcome?;
    if before.is_some_and(|b| b.run == after.run && b.outcome.is_some()) {
        return None;
    }
    let totals = |t: &BTreeMap<String, String>| {
        if t.is_empty() {
            "nothing".to_string()
        } else {
            t.iter()
                .map(|(c, a)| format!("{a} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let explained: i64 = after.explained.values().sum();
    let counts = format!(
        "{} deals ({}) against {} orders ({}), {} matched, {explained} differences explained",
        after.crm.count,
        totals(&after.crm.totals),
        after.erp.count,
        totals(&after.erp.totals),
        after.matched
    );
    let (type_, reason, note) = match outcome {
        AuditOutcome::Reconciled => (
            EventType::Normal,
            "AuditReconciled",
            format!("audit {}: reconciled: {counts}", after.run),
        ),
        AuditOutcome::Unexplained => (
            EventType::Warning,
            "AuditUnexplained",
            format!(
                "audit {}: {} unexplained differences ({}{}): {counts}",
                after.run,
                after.unexplained,
                after.unexplained_ids.join(", "),
                if (after.unexplained_ids.len() as i64) < after.unexplained {
                    ", ..."
                } else {
                    ""
                }
            ),
        ),
        AuditOutcome::Partial => (
            EventType::Warning,
            "AuditPartial",
            format!(
                "audit {}: partial, not reconciled ({}): {counts}",
                after.run,
                after
                    .partial_reason
                    .as_deref()
                    .unwrap_or("a side was not read in full")
            ),
        ),
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(super::event_note(&note)),
        action: "Audit".into(),
        secondary: None,
    })
}
