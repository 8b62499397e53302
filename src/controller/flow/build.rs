//! Step 3 of the flow reconcile: the objects a running flow needs, as typed Kubernetes objects. Pure: the same
//! inputs give byte-identical objects, which is what lets the apply step skip unchanged objects by hash.
//!
//! Objects: the token Secret (only when it does not exist yet), the ConfigMap with the rendered flow, the
//! ledger PVC (embedded ledger), the Service (the webhook port only: what an Ingress points at), the status
//! Service (headless, the operations port only, for the controller's status poll and people's `meshline dlq`),
//! the Deployment, the PodDisruptionBudget (replicas > 1) and, when the controller runs with
//! `--flow-network-policies on`, the NetworkPolicy that closes the worker's ports to everyone else. Every
//! one is owned by the flow (controller owner reference), so deleting the flow deletes them; the ledger PVC only
//! under `spec.ledger.retentionPolicy: Delete`. Under `Retain` (the default) the PVC has no owner reference and
//! outlives the flow, and the same flow name re-created finds its ledger again (the PVC's name derives from it).
//!
//! The worker pod's scheduling, identity and metadata settings are the flow's `spec.worker` merged over the
//! controller's defaults ([`pod_settings`]).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use crate::api::{
    LedgerRetentionPolicy, LedgerType, LookupSource, OwnershipRoster, SourceMode, SyncContract,
    SyncFlow, WorkerPodSettings,
};
use crate::controller::{APPLIED_HASH, CONFIG_HASH, FLOW_LABEL, MANAGED_BY, names};
use crate::rollout::split::{Split, Track};
use crate::worker::RenderedFlow;

/// The worker's webhook port, named [`WEBHOOK_PORT_NAME`] on the container and the Service: the webhook route
/// and health only, the one port an Ingress may expose.
pub const WEBHOOK_PORT: i32 = 8080;
pub const WEBHOOK_PORT_NAME: &str = "webhook";
/// The worker's operations port, named [`OPS_PORT_NAME`] on the container and the status Service: status,
/// records, dead letters and holds (all behind the flow's token) and `/metrics`. Cluster-internal.
pub const OPS_PORT: i32 = 8081;
pub const OPS_PORT_NAME: &str = "ops";
pub const CONFIG_KEY: &str = "flow.yaml";
pub const CONFIG_DIR: &str = "/etc/meshline";
pub const STATE_DIR: &str = "/var/lib/meshline";
pub const SECRETS_DIR: &str = "/var/run/meshline/secrets";
pub const TOKEN_DIR: &str = "/var/run/meshline/token";
pub const LOOKUPS_DIR: &str = "/etc/meshline/lookups";
/// Where both tracks of a canaried flow read the bucket split ([`crate::rollout::split`]).
pub const ROLLOUT_DIR: &str = "/etc/meshline/rollout";
pub const TOKEN_KEY: &str = "token";
const DEFAULT_LEDGER_SIZE: &str = "1Gi";
/// The API server's limit on a ConfigMap's `data` and `binaryData`, keys included.
pub const CONFIG_MAP_MAX_BYTES: usize = 1024 * 1024;
/// Non-root user of the image (distroless `nonroot`), the same as the controller's.
const RUN_AS: i64 = 65532;

/// The name of a flow's ConfigMap, Service, Deployment and PodDisruptionBudget. One name for all four, so it
/// follows the strictest rule among them, the Service's DNS-1035 label (a flow name with dots, valid for a
/// SyncFlow, would not be). A flow name is at most 52 characters (a CRD rule), so a dotless one is kept as is.
pub fn worker_name(flow: &str) -> String {
    names::dns_label(&format!("meshline-{flow}"))
}
/// The canary track's Deployment and its ConfigMap (the candidate's rendered flow). Its pods are named
/// `<this>-<hash>-<hash>`, which is how their ledger leases are found once they are gone.
pub fn canary_name(flow: &str) -> String {
    names::subdomain(&format!("meshline-{flow}-canary"))
}
/// The canary's headless status Service (the status poll reads the canary's pods through it).
pub fn canary_status_service_name(flow: &str) -> String {
    names::dns_label(&format!("meshline-{flow}-canary-status"))
}
/// The ConfigMap with the bucket split, mounted by both tracks.
pub fn rollout_name(flow: &str) -> String {
    names::subdomain(&format!("meshline-{flow}-rollout"))
}
/// Whether the flow's workers follow a bucket split: it declares canary steps and its ledger can be shared by
/// two tracks.
pub fn follows_split(flow: &SyncFlow) -> bool {
    flow.spec.ledger.r#type == LedgerType::Postgres
        && flow
            .spec
            .rollout
            .as_ref()
            .is_some_and(|r| r.canary.is_some())
}
/// The headless Service the controller reads `/status` through. It publishes pods that are not ready, because a
/// worker that cannot start fails its readiness probe and is then behind no other Service, while its 503 on
/// `/status` is exactly what the controller must read to name the cause in a condition.
pub fn status_service_name(flow: &str) -> String {
    names::dns_label(&format!("meshline-{flow}-status"))
}
/// The flow's NetworkPolicy.
pub fn network_policy_name(flow: &str) -> String {
    names::subdomain(&format!("meshline-{flow}-worker"))
}
/// The embedded ledger's PVC.
pub fn ledger_name(flow: &str) -> String {
    names::subdomain(&format!("meshline-{flow}-ledger"))
}
/// The Secret with the worker's API token.
pub fn token_name(flow: &str) -> String {
    names::subdomain(&format!("meshline-{flow}-token"))
}

/// What the controller was started with that shapes the workers.
#[derive(Debug, Clone, Default)]
pub struct BuildSettings {
    /// `--worker-image`: the image of every worker unless a flow sets `spec.worker.image`.
    pub worker_image: String,
    /// `--worker-defaults`: the pod settings of every worker, under each flow's own `spec.worker`.
    pub worker_defaults: WorkerPodSettings,
    /// `--flow-network-policies on`: each flow gets a NetworkPolicy built from these; `None` builds none.
    pub network_policy: Option<NetworkPolicySettings>,
}

/// Who may reach a worker's ports when the controller ships per-flow NetworkPolicies. Egress is not
/// restricted: a worker calls its CRM, its ERP, its PostgreSQL ledger and DNS, addresses only the flow's
/// owner knows, so a policy that named them would break flows more often than it protected them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicySettings {
    /// Namespaces whose pods may reach the webhook port (the ingress controller's), by their
    /// `kubernetes.io/metadata.name` label. Empty: no one, and a poll-mode flow's webhook port is closed
    /// regardless.
    pub webhook_from_namespaces: Vec<String>,
    /// The controller's namespace and pod labels: the operations port admits the controller's pods.
    pub controller_namespace: String,
    pub controller_pod_labels: BTreeMap<String, String>,
    /// Namespaces whose pods may reach the operations port for `/metrics` (Prometheus'). The rest of the
    /// port still asks for the flow's token.
    pub metrics_from_namespaces: Vec<String>,
    /// CIDRs admitted to the operations port besides the controller: with `--status-via-proxy` the API
    /// server's pod proxy calls the worker from the control plane's addresses, which no pod selector
    /// matches.
    pub api_server_cidrs: Vec<String>,
}

/// The inputs of the build step.
pub struct BuildInputs<'a> {
    pub flow: &'a SyncFlow,
    pub contract: &'a SyncContract,
    pub roster: Option<&'a OwnershipRoster>,
    pub settings: &'a BuildSettings,
    /// The contract revision `contract` is (the ControllerRevision's name), rendered for the workers.
    pub revision: Option<&'a str>,
    /// A fresh token when the flow's token Secret does not exist yet; `None` when it does (it is never rewritten,
    /// so the people holding the token keep a working one).
    pub new_token: Option<String>,
}

/// The desired children of a running flow.
#[derive(Debug, Clone)]
pub struct Desired {
    pub token_secret: Option<Secret>,
    pub config_map: ConfigMap,
    pub ledger: Option<PersistentVolumeClaim>,
    pub service: Service,
    /// Headless, with not-ready pods published: the controller's way to every worker's `/status`.
    pub status_service: Service,
    pub deployment: Deployment,
    pub pdb: Option<PodDisruptionBudget>,
    /// Set when the controller ships per-flow NetworkPolicies.
    pub network_policy: Option<NetworkPolicy>,
    /// The nightly reconciliation audit; `None` for a flow whose sides have no query API.
    pub audit: Option<k8s_openapi::api::batch::v1::CronJob>,
    /// Replicas after the embedded-ledger cap and `spec.paused`.
    pub replicas: i32,
    /// Set when `spec.replicas` was lowered to 1 because the ledger is embedded.
    pub capped: Option<String>,
}

/// The owner reference that makes the flow own (and garbage-collect) a child.
pub fn owner_reference(flow: &SyncFlow) -> OwnerReference {
    OwnerReference {
        api_version: crate::api::API_VERSION.into(),
        kind: "SyncFlow".into(),
        name: flow.metadata.name.clone().unwrap_or_default(),
        uid: flow.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The owner references of the ledger PVC: the flow's under `retentionPolicy: Delete`, none under `Retain`.
/// Leaving the field out of a server-side apply releases the reference this field manager set before, so a
/// switch from `Delete` to `Retain` takes the PVC out of the garbage collector's reach.
pub fn ledger_owner_references(flow: &SyncFlow) -> Option<Vec<OwnerReference>> {
    match flow.spec.ledger.retention_policy {
        LedgerRetentionPolicy::Delete => Some(vec![owner_reference(flow)]),
        LedgerRetentionPolicy::Retain => None,
    }
}

/// The worker pod settings in effect: the flow's `spec.worker` over the controller's defaults. A field the flow
/// sets wins; `nodeSelector`, `podLabels` and `podAnnotations` merge key by key (the flow's value wins); a list the
/// flow sets, even an empty one, replaces the default list.
pub fn pod_settings(flow: &SyncFlow, defaults: &WorkerPodSettings) -> WorkerPodSettings {
    let Some(own) = flow.spec.worker.as_ref().map(|w| &w.pod) else {
        return defaults.clone();
    };
    let merged = |d: &BTreeMap<String, String>, o: &BTreeMap<String, String>| {
        let mut m = d.clone();
        m.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    };
    WorkerPodSettings {
        service_account_name: own
            .service_account_name
            .clone()
            .or_else(|| defaults.service_account_name.clone()),
        image_pull_secrets: own
            .image_pull_secrets
            .clone()
            .or_else(|| defaults.image_pull_secrets.clone()),
        node_selector: merged(&defaults.node_selector, &own.node_selector),
        tolerations: own
            .tolerations
            .clone()
            .or_else(|| defaults.tolerations.clone()),
        affinity: own.affinity.clone().or_else(|| defaults.affinity.clone()),
        priority_class_name: own
            .priority_class_name
            .clone()
            .or_else(|| defaults.priority_class_name.clone()),
        pod_annotations: merged(&defaults.pod_annotations, &own.pod_annotations),
        pod_labels: merged(&defaults.pod_labels, &own.pod_labels),
    }
}

/// The standard labels of every child, plus the flow label the mappers and selectors use.
/// The flow's name is a label value only through [`names::label_value`] (a valid flow name may be longer than a
/// label value may).
pub fn labels(flow: &str) -> BTreeMap<String, String> {
    let value = names::label_value(flow);
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "meshline-worker".into()),
        ("app.kubernetes.io/instance".into(), value.clone()),
        ("app.kubernetes.io/component".into(), "worker".into()),
        ("app.kubernetes.io/part-of".into(), "meshline".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
        (FLOW_LABEL.into(), value),
    ])
}

/// The canary track's labels: the standard ones with component `worker-canary`, so the stable Deployment's
/// selector (and the Service webhooks arrive through) never matches a canary pod.
pub fn canary_labels(flow: &str) -> BTreeMap<String, String> {
    let mut l = labels(flow);
    l.insert(
        "app.kubernetes.io/component".into(),
        CANARY_COMPONENT.into(),
    );
    l
}

pub const CANARY_COMPONENT: &str = "worker-canary";

/// The canary Deployment's pod selector.
pub fn canary_selector(flow: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/component".into(),
            CANARY_COMPONENT.into(),
        ),
        (FLOW_LABEL.into(), names::label_value(flow)),
    ])
}

/// The pod selector: stable for the life of the flow (a Deployment's selector is immutable).
pub fn selector(flow: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/component".into(), "worker".into()),
        (FLOW_LABEL.into(), names::label_value(flow)),
    ])
}

fn meta(flow: &SyncFlow, name: String) -> ObjectMeta {
    let flow_name = flow.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name),
        namespace: flow.metadata.namespace.clone(),
        labels: Some(labels(&flow_name)),
        owner_references: Some(vec![owner_reference(flow)]),
        ..ObjectMeta::default()
    }
}

/// Only what the worker reads: name, namespace, labels and spec. Status, resourceVersion and managed fields
/// are left out, or every status write would change the configuration and roll the pods.
fn scrubbed_meta(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone(),
        ..ObjectMeta::default()
    }
}

/// The worker's configuration, exactly the `RenderedFlow` the worker reads with `--flow`.
pub fn render(
    flow: &SyncFlow,
    contract: &SyncContract,
    roster: Option<&OwnershipRoster>,
    revision: Option<&str>,
) -> Result<String, String> {
    let mut flow = SyncFlow::new(
        flow.metadata.name.as_deref().unwrap_or_default(),
        flow.spec.clone(),
    );
    let mut contract_c = SyncContract::new(
        contract.metadata.name.as_deref().unwrap_or_default(),
        contract.spec.clone(),
    );
    flow.metadata = scrubbed_meta(&flow.metadata.clone());
    // The worker never reads the retention policy; changing it must not change the configuration hash and
    // restart the worker.
    flow.spec.ledger.retention_policy = LedgerRetentionPolicy::default();
    contract_c.metadata = scrubbed_meta(&contract.metadata);
    let roster = roster.map(|r| {
        let mut c = OwnershipRoster::new(
            r.metadata.name.as_deref().unwrap_or_default(),
            r.spec.clone(),
        );
        c.metadata = scrubbed_meta(&r.metadata);
        c
    });
    serde_yaml::to_string(&RenderedFlow {
        flow,
        contract: contract_c,
        roster,
        revision: revision.map(str::to_string),
    })
    .map_err(|e| e.to_string())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Stamps the object's content hash into `metadata.annotations`, so the next reconcile can tell from its cache
/// that the live object already is what it would apply, and write nothing.
fn stamp<T: serde::Serialize + kube::Resource>(mut obj: T) -> T {
    let hash = serde_json::to_vec(&obj)
        .map(|b| sha256_hex(&b))
        .unwrap_or_default();
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH.into(), hash[..32].to_string());
    obj
}

/// Every Secret the worker mounts, deduplicated, in a stable order: the flow's and its roster's (the ticket
/// sinks' credentials and the owners' identities).
pub fn mounted_secrets(flow: &SyncFlow, roster: Option<&OwnershipRoster>) -> Vec<String> {
    crate::controller::secrets::requirements(flow, roster)
        .into_keys()
        .collect()
}

pub fn build(inputs: BuildInputs<'_>) -> Result<Desired, String> {
    let flow = inputs.flow;
    let name = flow.metadata.name.clone().unwrap_or_default();
    let spec = &flow.spec;
    let embedded = spec.ledger.r#type == LedgerType::Embedded;
    let asked = spec.replicas.unwrap_or(1).max(0);
    let (mut replicas, capped) = if embedded && asked > 1 {
        (
            1,
            Some(format!(
                "spec.replicas is {asked} but the embedded ledger supports one replica; running 1 (use a postgres ledger for more)"
            )),
        )
    } else {
        (asked, None)
    };
    if spec.paused {
        replicas = 0;
    }

    let rendered = render(flow, inputs.contract, inputs.roster, inputs.revision)?;
    // The API server refuses a ConfigMap whose data exceeds 1 MiB; say which object and by how much instead.
    if CONFIG_KEY.len() + rendered.len() > CONFIG_MAP_MAX_BYTES {
        return Err(format!(
            "the rendered flow, contract and roster take {} bytes, over the {CONFIG_MAP_MAX_BYTES} bytes a ConfigMap may hold (data of ConfigMap {})",
            rendered.len(),
            worker_name(&name)
        ));
    }
    let config_hash = sha256_hex(rendered.as_bytes());

    let token_secret = inputs.new_token.map(|token| Secret {
        metadata: meta(flow, token_name(&name)),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.into(), token)])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    });

    let config_map = stamp(ConfigMap {
        metadata: meta(flow, worker_name(&name)),
        data: Some(BTreeMap::from([(CONFIG_KEY.into(), rendered)])),
        ..ConfigMap::default()
    });

    let ledger = embedded.then(|| ledger_claim(flow));

    let service = stamp(Service {
        metadata: meta(flow, worker_name(&name)),
        spec: Some(ServiceSpec {
            selector: Some(selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some(WEBHOOK_PORT_NAME.into()),
                port: WEBHOOK_PORT,
                target_port: Some(IntOrString::String(WEBHOOK_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });

    let status_service = stamp(Service {
        metadata: meta(flow, status_service_name(&name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some(OPS_PORT_NAME.into()),
                port: OPS_PORT,
                target_port: Some(IntOrString::String(OPS_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });

    let deployment = stamp(deployment(
        flow,
        inputs.roster,
        &name,
        replicas,
        embedded,
        &config_hash,
        inputs.settings,
        Track::Stable,
    ));

    let pdb = (replicas > 1).then(|| {
        stamp(PodDisruptionBudget {
            metadata: meta(flow, worker_name(&name)),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector(&name)),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        })
    });

    let network_policy = inputs
        .settings
        .network_policy
        .as_ref()
        .map(|np| stamp(network_policy(flow, &name, np)));

    let audit = super::audit::cron_job(flow, inputs.roster, &deployment)?.map(stamp);

    Ok(Desired {
        audit,
        token_secret,
        config_map,
        ledger,
        service,
        status_service,
        deployment,
        pdb,
        network_policy,
        replicas,
        capped,
    })
}

/// The embedded ledger's PVC. Built from the flow alone (no contract), so the reconciler can keep a live PVC's
/// ownership in step with `retentionPolicy` even while the flow does not start.
pub fn ledger_claim(flow: &SyncFlow) -> PersistentVolumeClaim {
    let name = flow.metadata.name.clone().unwrap_or_default();
    let spec = &flow.spec;
    let mut requests = BTreeMap::new();
    requests.insert(
        "storage".to_string(),
        Quantity(
            spec.ledger
                .storage_size
                .clone()
                .unwrap_or_else(|| DEFAULT_LEDGER_SIZE.into()),
        ),
    );
    stamp(PersistentVolumeClaim {
        metadata: ObjectMeta {
            owner_references: ledger_owner_references(flow),
            ..meta(flow, ledger_name(&name))
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(requests),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: spec.ledger.storage_class_name.clone(),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    })
}

/// `matchExpressions: kubernetes.io/metadata.name In [namespaces]` (the label the API server sets on every
/// namespace).
fn namespaces_named(namespaces: &[String]) -> LabelSelector {
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: Some(namespaces.to_vec()),
        }]),
        ..LabelSelector::default()
    }
}

fn tcp_port(name: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// The flow's worker pods admit, on the webhook port, the configured namespaces' pods (a webhook flow only),
/// and on the operations port the controller's pods, the metrics namespaces' pods and the API server's
/// CIDRs. Nothing else reaches them. Egress is left open (see [`NetworkPolicySettings`]). The kubelet's
/// probes come from the node and are not subject to a pod's ingress policy in the usual CNIs.
fn network_policy(flow: &SyncFlow, name: &str, settings: &NetworkPolicySettings) -> NetworkPolicy {
    let mut rules = Vec::new();
    if flow.spec.source.mode == SourceMode::Webhook && !settings.webhook_from_namespaces.is_empty()
    {
        rules.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(namespaces_named(&settings.webhook_from_namespaces)),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![tcp_port(WEBHOOK_PORT_NAME)]),
        });
    }
    let mut ops_from = vec![NetworkPolicyPeer {
        // One peer with both selectors: the controller's pods in the controller's namespace, not either.
        namespace_selector: Some(namespaces_named(std::slice::from_ref(
            &settings.controller_namespace,
        ))),
        pod_selector: Some(LabelSelector {
            match_labels: Some(settings.controller_pod_labels.clone()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }];
    // The flow's preflight replay pods read an embedded ledger's recent records through the operations API,
    // and its audit pods ask a worker to run the reconciliation audit.
    for component in ["preflight", super::audit::AUDIT_COMPONENT] {
        ops_from.push(NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/component".to_string(),
                        component.to_string(),
                    ),
                    (FLOW_LABEL.to_string(), names::label_value(name)),
                ])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        });
    }
    if !settings.metrics_from_namespaces.is_empty() {
        ops_from.push(NetworkPolicyPeer {
            namespace_selector: Some(namespaces_named(&settings.metrics_from_namespaces)),
            ..NetworkPolicyPeer::default()
        });
    }
    for cidr in &settings.api_server_cidrs {
        ops_from.push(NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.clone(),
                except: None,
            }),
            ..NetworkPolicyPeer::default()
        });
    }
    rules.push(NetworkPolicyIngressRule {
        from: Some(ops_from),
        ports: Some(vec![tcp_port(OPS_PORT_NAME)]),
    });
    NetworkPolicy {
        metadata: meta(flow, network_policy_name(name)),
        spec: Some(NetworkPolicySpec {
            // Both tracks: the canary's pods are the flow's workers too.
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    FLOW_LABEL.to_string(),
                    names::label_value(name),
                )])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app.kubernetes.io/component".into(),
                    operator: "In".into(),
                    values: Some(vec!["worker".into(), CANARY_COMPONENT.into()]),
                }]),
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(rules),
            egress: None,
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn deployment(
    flow: &SyncFlow,
    roster: Option<&OwnershipRoster>,
    name: &str,
    replicas: i32,
    embedded: bool,
    config_hash: &str,
    settings: &BuildSettings,
    track: Track,
) -> Deployment {
    let spec = &flow.spec;
    let image = spec
        .worker
        .as_ref()
        .and_then(|w| w.image.clone())
        .unwrap_or_else(|| settings.worker_image.clone());

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: match track {
                    Track::Stable => worker_name(name),
                    Track::Canary => canary_name(name),
                },
                items: Some(vec![KeyToPath {
                    key: CONFIG_KEY.into(),
                    path: CONFIG_KEY.into(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        if embedded {
            Volume {
                name: "state".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: ledger_name(name),
                    read_only: None,
                }),
                ..Volume::default()
            }
        } else {
            // A postgres ledger keeps nothing durable locally; the worker still wants a writable state dir.
            Volume {
                name: "state".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }
        },
        Volume {
            name: "token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(token_name(name)),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("tmp", "/tmp", false),
        mount("state", STATE_DIR, false),
        mount("token", TOKEN_DIR, true),
    ];
    // Credentials are mounted, never copied: the worker reads `<secrets-dir>/<secret>/<key>`. The roster's
    // Secrets too (ticket sinks, identities), so a person's token never passes through the controller.
    for (i, secret) in mounted_secrets(flow, roster).iter().enumerate() {
        let volume = format!("secret-{i}");
        volumes.push(Volume {
            name: volume.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount(&volume, &format!("{SECRETS_DIR}/{secret}"), true));
    }
    let config_map_lookups: Vec<VolumeProjection> = spec
        .lookups
        .iter()
        .filter(|l| l.from == LookupSource::ConfigMap)
        .filter_map(|l| {
            l.config_map_ref.as_ref().map(|r| VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: r.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: r.key.clone(),
                        path: format!("{}.json", l.name),
                        ..KeyToPath::default()
                    }]),
                    ..ConfigMapProjection::default()
                }),
                ..VolumeProjection::default()
            })
        })
        .collect();
    let mut args: Vec<String> = [
        "worker",
        "--flow",
        "/etc/meshline/flow.yaml",
        "--listen",
        &format!("0.0.0.0:{WEBHOOK_PORT}"),
        "--ops-listen",
        &format!("0.0.0.0:{OPS_PORT}"),
        "--state-dir",
        STATE_DIR,
        "--secrets-dir",
        SECRETS_DIR,
        "--token-file",
        "/var/run/meshline/token/token",
    ]
    .into_iter()
    .map(|a| a.to_string())
    .collect();
    if follows_split(flow) {
        // Both tracks read the split from a file the controller rewrites: a weight change moves buckets
        // between running workers without restarting either. Optional, so a pod never waits for it: without
        // the file a stable worker takes every bucket and a canary none.
        volumes.push(Volume {
            name: "rollout".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: rollout_name(name),
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("rollout", ROLLOUT_DIR, true));
        args.extend([
            "--track".to_string(),
            track.as_str().to_string(),
            "--rollout-file".to_string(),
            format!("{ROLLOUT_DIR}/{}", crate::rollout::split::SPLIT_FILE),
        ]);
    } else {
        args.extend(["--buckets".to_string(), "0-99".to_string()]);
    }
    if !config_map_lookups.is_empty() {
        volumes.push(Volume {
            name: "lookups".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(config_map_lookups),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("lookups", LOOKUPS_DIR, true));
        args.push("--lookups-dir".into());
        args.push(LOOKUPS_DIR.into());
    }

    // Both probes on the webhook port: its readiness is what the Service in front of an Ingress routes by, and
    // the operations port answers the same health from the same process.
    let probe = |path: &str, delay: i32, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(WEBHOOK_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(delay),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let resources = spec
        .worker
        .as_ref()
        .and_then(|w| w.resources.clone())
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("256Mi".into()),
            )])),
            ..ResourceRequirements::default()
        });
    let container = Container {
        name: "worker".into(),
        image: Some(image),
        args: Some(args),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar {
                name: "MESHLINE_LOG_FORMAT".into(),
                value: Some("json".into()),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some(WEBHOOK_PORT_NAME.into()),
                container_port: WEBHOOK_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(OPS_PORT_NAME.into()),
                container_port: OPS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(probe("/healthz", 10, 20)),
        readiness_probe: Some(probe("/readyz", 3, 10)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = pod_settings(flow, &settings.worker_defaults);
    // The controller's own labels and annotation are inserted last: validation refuses settings that name them,
    // and this order keeps the selector intact even if it did not.
    let (track_labels, track_selector, deployment_name) = match track {
        Track::Stable => (labels(name), selector(name), worker_name(name)),
        Track::Canary => (
            canary_labels(name),
            canary_selector(name),
            canary_name(name),
        ),
    };
    let mut pod_labels = pod.pod_labels.clone();
    pod_labels.extend(track_labels.clone());
    pod_labels.extend(track_selector.clone());
    let mut pod_annotations = pod.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH.into(), config_hash[..32].to_string());
    Deployment {
        metadata: ObjectMeta {
            labels: Some(track_labels),
            ..meta(flow, deployment_name)
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(track_selector),
                ..LabelSelector::default()
            },
            // SQLite on a ReadWriteOnce volume: the old pod must let go before the new one opens the ledger.
            strategy: embedded.then(|| DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // Workers never call the Kubernetes API, whichever ServiceAccount they run as.
                    automount_service_account_token: Some(false),
                    service_account_name: pod.service_account_name,
                    image_pull_secrets: pod.image_pull_secrets.map(|secrets| {
                        secrets
                            .into_iter()
                            .map(|s| LocalObjectReference { name: s.name })
                            .collect()
                    }),
                    node_selector: (!pod.node_selector.is_empty()).then_some(pod.node_selector),
                    tolerations: pod.tolerations,
                    affinity: pod.affinity,
                    priority_class_name: pod.priority_class_name,
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(30),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The canary track of a flow: the candidate's rendered flow, the Deployment that runs it on the buckets below
/// the weight, and its status Service. The ConfigMap and the Service are owned by the Deployment (`owner`, once
/// it exists), so removing the Deployment at the end of a rollout removes them by garbage collection.
#[derive(Debug, Clone)]
pub struct Canary {
    pub deployment: Deployment,
    pub config_map: Option<ConfigMap>,
    pub status_service: Option<Service>,
}

pub struct CanaryInputs<'a> {
    pub flow: &'a SyncFlow,
    pub candidate: &'a SyncContract,
    pub revision: &'a str,
    pub roster: Option<&'a OwnershipRoster>,
    pub settings: &'a BuildSettings,
    /// Stable replicas; the canary runs a share of them by weight, at least one.
    pub stable_replicas: i32,
    pub weight: u8,
    /// The live canary Deployment, whose uid owns the ConfigMap and the Service.
    pub owner: Option<&'a Deployment>,
}

/// Canary replicas: the weight's share of the stable replicas, rounded up, at least one (zero when the flow is
/// stopped).
pub fn canary_replicas(stable_replicas: i32, weight: u8) -> i32 {
    if stable_replicas <= 0 {
        return 0;
    }
    let share = (i64::from(stable_replicas) * i64::from(weight.min(100)) + 99) / 100;
    share.clamp(1, i64::from(stable_replicas)) as i32
}

pub fn build_canary(i: CanaryInputs<'_>) -> Result<Canary, String> {
    let flow = i.flow;
    let name = flow.metadata.name.clone().unwrap_or_default();
    let rendered = render(flow, i.candidate, i.roster, Some(i.revision))?;
    if CONFIG_KEY.len() + rendered.len() > CONFIG_MAP_MAX_BYTES {
        return Err(format!(
            "the rendered candidate takes {} bytes, over the {CONFIG_MAP_MAX_BYTES} bytes a ConfigMap may hold (data of ConfigMap {})",
            rendered.len(),
            canary_name(&name)
        ));
    }
    let config_hash = sha256_hex(rendered.as_bytes());
    let deployment = stamp(deployment(
        flow,
        i.roster,
        &name,
        canary_replicas(i.stable_replicas, i.weight),
        false,
        &config_hash,
        i.settings,
        Track::Canary,
    ));
    let owned = |n: String| -> Option<ObjectMeta> {
        let owner = i.owner?;
        let uid = owner.metadata.uid.clone()?;
        Some(ObjectMeta {
            name: Some(n),
            namespace: flow.metadata.namespace.clone(),
            labels: Some(canary_labels(&name)),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: owner.metadata.name.clone().unwrap_or_default(),
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        })
    };
    let config_map = owned(canary_name(&name)).map(|metadata| {
        stamp(ConfigMap {
            metadata,
            data: Some(BTreeMap::from([(CONFIG_KEY.into(), rendered)])),
            ..ConfigMap::default()
        })
    });
    let status_service = owned(canary_status_service_name(&name)).map(|metadata| {
        stamp(Service {
            metadata,
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(canary_selector(&name)),
                ports: Some(vec![ServicePort {
                    name: Some(OPS_PORT_NAME.into()),
                    port: OPS_PORT,
                    target_port: Some(IntOrString::String(OPS_PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    });
    Ok(Canary {
        deployment,
        config_map,
        status_service,
    })
}

/// The ConfigMap with the bucket split both tracks follow.
pub fn rollout_config_map(flow: &SyncFlow, split: &Split) -> ConfigMap {
    let name = flow.metadata.name.clone().unwrap_or_default();
    stamp(ConfigMap {
        metadata: meta(flow, rollout_name(&name)),
        data: Some(BTreeMap::from([(
            crate::rollout::split::SPLIT_FILE.into(),
            split.to_json(),
        )])),
        ..ConfigMap::default()
    })
}
