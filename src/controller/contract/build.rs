//! Step 3 of the contract reconcile, pure: the objects a contract change needs. A ControllerRevision per
//! content (immutable, owned by the SyncContract, as a StatefulSet keeps its revisions), and per bound flow a
//! preflight replay Job with the ConfigMap that carries the candidate (owned by the Job, so both go when the
//! Job's TTL or the controller removes it).
//!
//! The Job's pod is the flow's worker pod with another command: the same image, ServiceAccount, scheduling,
//! credentials and lookups, mounted the same way, so the replay evaluates records exactly as the workers would.
//! It never mounts the embedded ledger's volume (ReadWriteOnce, held by the worker): it reads those records
//! from the worker's operations API with the flow's token. A PostgreSQL ledger it reads directly.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, EmptyDirVolumeSource, KeyToPath, PodTemplateSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::ResourceExt;

use crate::api::{LedgerType, SyncContract, SyncContractSpec, SyncFlow};
use crate::controller::flow::build::{
    CONFIG_DIR, OPS_PORT, TOKEN_DIR, TOKEN_KEY, status_service_name,
};
use crate::controller::{FLOW_LABEL, MANAGED_BY, names};

/// The label that names a revision's or a preflight's contract.
pub const CONTRACT_LABEL: &str = "sync.meshline.io/contract";
/// The label with the first 12 hex digits of the candidate's content hash.
pub const REVISION_LABEL: &str = "sync.meshline.io/revision";
/// The pod label of preflight replay pods (the worker NetworkPolicy admits them to the operations port).
pub const PREFLIGHT_COMPONENT: &str = "preflight";
/// Where the candidate contract is mounted in a preflight pod.
pub const CANDIDATE_DIR: &str = "/etc/meshline/candidate";
pub const CANDIDATE_KEY: &str = "contract.yaml";
/// Finished Jobs are deleted by Kubernetes after this long (their result is in the contract's status by then).
pub const JOB_TTL_SECONDS: i32 = 3600;
/// Default `spec.rollout.preflightTimeout`.
pub const DEFAULT_PREFLIGHT_TIMEOUT_SECONDS: i64 = 600;
/// Default `spec.rollout.preflightRecords`.
pub const DEFAULT_PREFLIGHT_RECORDS: u32 = 1000;

/// Name of the ControllerRevision that keeps one content: the contract's name and the first 12 hex digits of its
/// hash (never the `sha256:` prefix, which no object name may contain).
pub fn revision_name(contract: &str, hash: &str) -> String {
    names::subdomain(&format!("meshline-contract-{contract}-{}", short(hash)))
}

/// The first 12 hex digits of a content hash: a valid label value and name part.
pub fn short(hash: &str) -> &str {
    let hex = names::hex_of(hash);
    &hex[..hex.len().min(12)]
}

/// The preflight Job of `flow` for the candidate `hash` (at most 63 characters: it is its pods' label value).
pub fn job_name(flow: &str, hash: &str) -> String {
    names::job(&format!("meshline-preflight-{flow}-{}", &short(hash)[..8]))
}

fn labels(contract: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        ("app.kubernetes.io/part-of".into(), "meshline".into()),
        ("app.kubernetes.io/component".into(), component.into()),
        (CONTRACT_LABEL.into(), names::label_value(contract)),
    ])
}

pub fn contract_owner(contract: &SyncContract) -> OwnerReference {
    OwnerReference {
        api_version: crate::api::API_VERSION.into(),
        kind: "SyncContract".into(),
        name: contract.name_any(),
        uid: contract.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The immutable revision of `contract`'s current spec. `sequence` orders revisions as `kubectl rollout
/// history` would.
pub fn controller_revision(
    contract: &SyncContract,
    hash: &str,
    sequence: i64,
) -> ControllerRevision {
    let name = contract.name_any();
    let mut labels = labels(&name, "contract-revision");
    labels.insert(REVISION_LABEL.into(), short(hash).to_string());
    let mut annotations = BTreeMap::new();
    annotations.insert("sync.meshline.io/content-hash".into(), hash.to_string());
    annotations.insert(
        "sync.meshline.io/version".into(),
        contract.spec.version.clone(),
    );
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(revision_name(&name, hash)),
            namespace: contract.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![contract_owner(contract)]),
            ..ObjectMeta::default()
        },
        data: Some(RawExtension(serde_json::json!({ "spec": contract.spec }))),
        revision: sequence,
    }
}

/// The spec a ControllerRevision keeps, if it is one of ours and readable.
pub fn revision_spec(revision: &ControllerRevision) -> Option<SyncContractSpec> {
    let data = revision.data.as_ref()?;
    serde_json::from_value(data.0.get("spec")?.clone()).ok()
}

/// What the preflight of one flow needs from the flow and the controller.
pub struct PreflightInputs<'a> {
    pub contract: &'a SyncContract,
    pub flow: &'a SyncFlow,
    /// The flow's worker Deployment as the flow's build step makes it (its pod template is the Job's base).
    pub worker: &'a Deployment,
    /// The candidate's content hash.
    pub hash: &'a str,
}

/// The preflight replay Job of one flow. Its ConfigMap ([`candidate_config_map`]) is created after it, owned by
/// it.
pub fn preflight_job(inputs: PreflightInputs<'_>) -> Result<Job, String> {
    let PreflightInputs {
        contract,
        flow,
        worker,
        hash,
    } = inputs;
    let flow_name = flow.metadata.name.clone().unwrap_or_default();
    let contract_name = contract.name_any();
    let rollout = flow.spec.rollout.as_ref();
    let records = rollout
        .and_then(|r| r.preflight_records)
        .unwrap_or(DEFAULT_PREFLIGHT_RECORDS);
    let max_rejected = rollout.and_then(|r| r.max_newly_rejected).unwrap_or(0);
    let timeout = rollout
        .and_then(|r| r.preflight_timeout.as_ref())
        .map(|d| std::time::Duration::from(*d).as_secs().max(1) as i64)
        .unwrap_or(DEFAULT_PREFLIGHT_TIMEOUT_SECONDS);
    let name = job_name(&flow_name, hash);

    let mut template: PodTemplateSpec = worker
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or("the worker Deployment has no pod template")?;
    let mut pod_labels = labels(&contract_name, PREFLIGHT_COMPONENT);
    pod_labels.insert(FLOW_LABEL.into(), names::label_value(&flow_name));
    pod_labels.insert(REVISION_LABEL.into(), short(hash).to_string());
    // Only the controller's labels: the worker's own pod labels (its Deployment's selector among them) must
    // never match a preflight pod, or the worker Service would route webhooks to it.
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels = Some(pod_labels.clone());
    meta.annotations = None;
    let pod = template
        .spec
        .as_mut()
        .ok_or("the worker pod template has no spec")?;
    pod.restart_policy = Some("Never".into());
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    // The embedded ledger's volume stays with the worker (ReadWriteOnce).
    for v in volumes.iter_mut() {
        if v.name == "state" {
            *v = Volume {
                name: "state".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            };
        }
    }
    volumes.push(Volume {
        name: "candidate".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.clone(),
            items: Some(vec![KeyToPath {
                key: CANDIDATE_KEY.into(),
                path: CANDIDATE_KEY.into(),
                ..KeyToPath::default()
            }]),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    let container = pod
        .containers
        .first_mut()
        .ok_or("the worker pod template has no container")?;
    container.name = "replay".into();
    container.ports = None;
    container.liveness_probe = None;
    container.readiness_probe = None;
    container.termination_message_policy = Some("FallbackToLogsOnError".into());
    container
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: "candidate".into(),
            mount_path: CANDIDATE_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    let worker_args = container.args.clone().unwrap_or_default();
    let mut args: Vec<String> = vec![
        "replay".into(),
        "--config".into(),
        format!(
            "{CONFIG_DIR}/{}",
            crate::controller::flow::build::CONFIG_KEY
        ),
        "--candidate".into(),
        format!("{CANDIDATE_DIR}/{CANDIDATE_KEY}"),
        "--records".into(),
        records.to_string(),
        "--max-newly-rejected".into(),
        max_rejected.to_string(),
        "--report".into(),
        "/dev/termination-log".into(),
    ];
    if let Some(max) = rollout.and_then(|r| r.max_changed_outputs) {
        args.push("--max-changed-outputs".into());
        args.push(max.to_string());
    }
    // The worker's credential and lookup directories, as its own arguments name them.
    for flag in ["--secrets-dir", "--lookups-dir"] {
        if let Some(i) = worker_args.iter().position(|a| a == flag)
            && let Some(value) = worker_args.get(i + 1)
        {
            args.push(flag.into());
            args.push(value.clone());
        }
    }
    if flow.spec.ledger.r#type == LedgerType::Embedded {
        let ns = flow.metadata.namespace.clone().unwrap_or_default();
        args.push("--from-worker".into());
        args.push(format!(
            "http://{}.{ns}.svc:{OPS_PORT}",
            status_service_name(&flow_name)
        ));
        args.push("--token-file".into());
        args.push(format!("{TOKEN_DIR}/{TOKEN_KEY}"));
    }
    container.args = Some(args);

    let job_labels = pod_labels;
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: flow.metadata.namespace.clone(),
            labels: Some(job_labels),
            annotations: Some(BTreeMap::from([(
                "sync.meshline.io/content-hash".to_string(),
                hash.to_string(),
            )])),
            owner_references: Some(vec![contract_owner(contract)]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            // One attempt: a crash is a failed preflight with its reason, not something to retry blindly.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(timeout),
            ttl_seconds_after_finished: Some(JOB_TTL_SECONDS),
            template,
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

/// The ConfigMap with the candidate contract, owned by its preflight Job.
pub fn candidate_config_map(
    contract: &SyncContract,
    job: &Job,
    job_uid: &str,
) -> Result<ConfigMap, String> {
    let mut manifest = SyncContract::new(&contract.name_any(), contract.spec.clone());
    manifest.metadata.namespace = contract.metadata.namespace.clone();
    let text = serde_yaml::to_string(&manifest).map_err(|e| e.to_string())?;
    if text.len() + CANDIDATE_KEY.len() > crate::controller::flow::build::CONFIG_MAP_MAX_BYTES {
        return Err(format!(
            "the candidate contract takes {} bytes, over a ConfigMap's 1 MiB",
            text.len()
        ));
    }
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: job.metadata.name.clone(),
            namespace: job.metadata.namespace.clone(),
            labels: job.metadata.labels.clone(),
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: job.name_any(),
                uid: job_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CANDIDATE_KEY.to_string(), text)])),
        immutable: Some(true),
        ..ConfigMap::default()
    })
}
