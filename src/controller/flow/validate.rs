//! Step 2 of the flow reconcile: decide, from plain values, whether the flow may start. Pure: no API calls.
//!
//! The three gates are the operating model's: the contract resolves (exists, has a version in the flow's range,
//! compiles, its lookups are bound), a roster names a sync owner, and every referenced Secret exists with the
//! keys its connector reads. A failed gate is a condition with a precise reason, never an error to retry.
//!
//! A fourth check, [`worker_pod_settings`], refuses `spec.worker` pod settings the API server would refuse (or
//! that would take the controller's own labels): the flow then does not start, and Ready says which field and
//! why, instead of every reconcile failing on a refused Deployment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Affinity, NodeSelectorRequirement, PodAffinityTerm, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::{OwnershipRoster, SyncContract, SyncFlow, WorkerPodSettings};
use crate::controller::names::{self, NameRule};
use crate::controller::{CONFIG_HASH, FLOW_LABEL};

/// The result of one gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Passed {
        reason: &'static str,
        message: String,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
}

impl Gate {
    pub fn passed(&self) -> bool {
        matches!(self, Gate::Passed { .. })
    }
    pub fn reason(&self) -> &'static str {
        match self {
            Gate::Passed { reason, .. } | Gate::Failed { reason, .. } => reason,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            Gate::Passed { message, .. } | Gate::Failed { message, .. } => message,
        }
    }
}

/// Everything the gates decided, and what the build step needs from them.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub contract_resolved: Gate,
    pub owner_assigned: Gate,
    pub secrets_ready: Gate,
    /// The worker pod settings (`spec.worker` over the controller's defaults) are ones the API server accepts.
    pub worker_settings: Gate,
    /// The contract the worker runs, when it resolved.
    pub contract: Option<Arc<SyncContract>>,
    /// The roster whose assignment covers the flow (the first by name when several do).
    pub roster: Option<Arc<OwnershipRoster>>,
}

impl Verdict {
    /// Whether the worker may run: every gate passed.
    pub fn startable(&self) -> bool {
        self.contract_resolved.passed()
            && self.owner_assigned.passed()
            && self.secrets_ready.passed()
            && self.worker_settings.passed()
    }

    /// The first failed gate, for Ready's reason and the Event.
    pub fn first_failure(&self) -> Option<&Gate> {
        [
            &self.contract_resolved,
            &self.owner_assigned,
            &self.secrets_ready,
            &self.worker_settings,
        ]
        .into_iter()
        .find(|g| !g.passed())
    }
}

/// The inputs of the gates, gathered by step 1.
pub struct Inputs<'a> {
    pub flow: &'a SyncFlow,
    /// The SyncContract named by the flow, in its namespace, if it exists.
    pub contract: Option<Arc<SyncContract>>,
    /// The rosters of the flow's namespace.
    pub rosters: &'a [Arc<OwnershipRoster>],
    /// Keys of each referenced Secret; `None` when the Secret does not exist.
    pub secrets: &'a BTreeMap<String, Option<BTreeSet<String>>>,
    /// Compiles a contract spec; `Err` carries the compiler's messages. Injected so results can be cached.
    pub compile: &'a dyn Fn(&SyncContract) -> Result<(), String>,
    /// The controller's `--worker-defaults` (checked when the controller starts).
    pub worker_defaults: &'a WorkerPodSettings,
}

/// The roster whose assignment covers the flow (the first by name when several do) and the sync owner it
/// names. The reconcile asks before gathering the Secrets too, since the roster's Secrets are mounted in the
/// flow's pods.
pub fn owning_roster(
    flow: &SyncFlow,
    rosters: &[Arc<OwnershipRoster>],
) -> Option<(Arc<OwnershipRoster>, String)> {
    let ns = flow.metadata.namespace.as_deref().unwrap_or_default();
    let mut rosters: Vec<&Arc<OwnershipRoster>> = rosters
        .iter()
        .filter(|r| r.metadata.namespace.as_deref() == Some(ns))
        .collect();
    rosters.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    rosters.iter().find_map(|r| {
        r.spec
            .assignments
            .iter()
            .find(|a| crate::validate::assignment_covers(a, flow))
            .map(|a| ((*r).clone(), a.sync_owner.clone()))
    })
}

pub fn validate(inputs: Inputs<'_>) -> Verdict {
    let flow = inputs.flow;
    let ns = flow.metadata.namespace.as_deref().unwrap_or_default();
    let (contract_resolved, contract) = resolve_contract(flow, ns, inputs.contract, inputs.compile);

    let owner = owning_roster(flow, inputs.rosters);
    let (owner_assigned, roster) = match owner {
        Some((roster, owner)) => (
            Gate::Passed {
                reason: "SyncOwnerAssigned",
                message: format!(
                    "OwnershipRoster {} names {owner} as the sync owner",
                    roster.metadata.name.as_deref().unwrap_or_default()
                ),
            },
            Some(roster),
        ),
        None => (
            Gate::Failed {
                reason: "NoSyncOwner",
                message: format!(
                    "no OwnershipRoster in namespace {ns} assigns this flow a syncOwner (by name or flowSelector); a flow without a sync owner does not start"
                ),
            },
            None,
        ),
    };

    let secrets_ready =
        match crate::controller::secrets::check(flow, roster.as_deref(), inputs.secrets) {
            Ok(()) => Gate::Passed {
                reason: "SecretsFound",
                message: "every referenced Secret exists with the keys its connector reads".into(),
            },
            Err((reason, message)) => Gate::Failed { reason, message },
        };

    let mut problems = flow
        .spec
        .worker
        .as_ref()
        .map(|w| worker_pod_settings(&w.pod, "spec.worker"))
        .unwrap_or_default();
    // Each side is valid on its own; only the merged annotations can outgrow the API server's limit together.
    let merged = super::build::pod_settings(flow, inputs.worker_defaults);
    let annotation_bytes = annotations_size(&merged.pod_annotations) + CONFIG_HASH.len() + 32;
    if annotation_bytes > ANNOTATIONS_MAX_BYTES {
        problems.push(format!(
            "spec.worker.podAnnotations: with the controller's defaults the pod annotations take {annotation_bytes} bytes, over the API server's {ANNOTATIONS_MAX_BYTES}"
        ));
    }
    let worker_settings = if problems.is_empty() {
        Gate::Passed {
            reason: "WorkerSettingsValid",
            message: "the worker pod settings are valid".into(),
        }
    } else {
        Gate::Failed {
            reason: "InvalidWorkerSettings",
            message: problems.join("; "),
        }
    };

    Verdict {
        contract_resolved,
        owner_assigned,
        secrets_ready,
        worker_settings,
        contract,
        roster,
    }
}

/// The API server's limit on all annotations of one object, keys and values together.
pub const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

fn annotations_size(annotations: &BTreeMap<String, String>) -> usize {
    annotations.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// The labels the controller sets on worker pods: its selector and its caches rely on them, so no setting may
/// override them.
fn reserved_label(key: &str) -> bool {
    key.starts_with("sync.meshline.io/")
        || key == FLOW_LABEL
        || super::build::labels("").contains_key(key)
}

/// What is wrong with a set of worker pod settings, one `field: reason` per problem, `field` under `at` (the flow's
/// `spec.worker`, or the controller's `--worker-defaults`). Follows the API server's pod validation (apimachinery
/// and `ValidatePodSpec`) for the fields it checks, and adds the controller's reserved labels and annotations.
pub fn worker_pod_settings(s: &WorkerPodSettings, at: &str) -> Vec<String> {
    let mut out = Vec::new();
    let subdomain = |field: &str, value: &str, out: &mut Vec<String>| {
        if let Err(e) = NameRule::Subdomain.check(value) {
            out.push(format!("{at}.{field}: {value:?} {e}"));
        }
    };
    if let Some(sa) = &s.service_account_name {
        subdomain("serviceAccountName", sa, &mut out);
    }
    if let Some(pc) = &s.priority_class_name {
        subdomain("priorityClassName", pc, &mut out);
    }
    for (i, secret) in s.image_pull_secrets.iter().flatten().enumerate() {
        subdomain(
            &format!("imagePullSecrets[{i}].name"),
            &secret.name,
            &mut out,
        );
    }
    label_map(&format!("{at}.nodeSelector"), &s.node_selector, &mut out);
    label_map(&format!("{at}.podLabels"), &s.pod_labels, &mut out);
    for key in s.pod_labels.keys().filter(|k| reserved_label(k)) {
        out.push(format!(
            "{at}.podLabels[{key}]: the controller sets this label (its Deployment selects pods by it) and it cannot be overridden"
        ));
    }
    for key in s.pod_annotations.keys() {
        // The API server checks annotation keys case-insensitively.
        if let Err(e) = names::check_qualified_name(&key.to_lowercase()) {
            out.push(format!(
                "{at}.podAnnotations[{key}]: not a valid annotation key: {e}"
            ));
        }
        if key.starts_with("sync.meshline.io/") {
            out.push(format!(
                "{at}.podAnnotations[{key}]: keys under sync.meshline.io/ are the controller's"
            ));
        }
    }
    let size = annotations_size(&s.pod_annotations);
    if size > ANNOTATIONS_MAX_BYTES - CONFIG_HASH.len() - 32 {
        out.push(format!(
            "{at}.podAnnotations: {size} bytes, over what the API server allows on a pod beside the controller's own ({} bytes in all)",
            ANNOTATIONS_MAX_BYTES
        ));
    }
    for (i, t) in s.tolerations.iter().flatten().enumerate() {
        toleration(&format!("{at}.tolerations[{i}]"), t, &mut out);
    }
    if let Some(a) = &s.affinity {
        affinity(&format!("{at}.affinity"), a, &mut out);
    }
    out
}

fn label_map(field: &str, map: &BTreeMap<String, String>, out: &mut Vec<String>) {
    for (k, v) in map {
        if let Err(e) = names::check_qualified_name(k) {
            out.push(format!("{field}[{k}]: not a valid label key: {e}"));
        }
        if let Err(e) = names::check_label_value(v) {
            out.push(format!("{field}[{k}]: value {v:?}: {e}"));
        }
    }
}

fn toleration(field: &str, t: &Toleration, out: &mut Vec<String>) {
    let key = t.key.as_deref().unwrap_or_default();
    let operator = t.operator.as_deref().unwrap_or_default();
    let value = t.value.as_deref().unwrap_or_default();
    if !key.is_empty()
        && let Err(e) = names::check_qualified_name(key)
    {
        out.push(format!(
            "{field}.key: {key:?} is not a valid taint key: {e}"
        ));
    }
    match operator {
        "" | "Equal" => {
            if key.is_empty() {
                out.push(format!(
                    "{field}.operator: must be Exists when key is empty (to tolerate every taint)"
                ));
            }
            if let Err(e) = names::check_label_value(value) {
                out.push(format!("{field}.value: {value:?}: {e}"));
            }
        }
        "Exists" => {
            if !value.is_empty() {
                out.push(format!(
                    "{field}.value: must be empty when operator is Exists"
                ));
            }
        }
        other => out.push(format!(
            "{field}.operator: {other:?} is not one of Equal, Exists"
        )),
    }
    let effect = t.effect.as_deref().unwrap_or_default();
    if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        out.push(format!(
            "{field}.effect: {effect:?} is not one of NoSchedule, PreferNoSchedule, NoExecute"
        ));
    }
    if t.toleration_seconds.is_some() && effect != "NoExecute" {
        out.push(format!(
            "{field}.tolerationSeconds: only a NoExecute toleration may set it"
        ));
    }
}

fn node_requirement(field: &str, r: &NodeSelectorRequirement, out: &mut Vec<String>) {
    if let Err(e) = names::check_qualified_name(&r.key) {
        out.push(format!("{field}.key: {:?}: {e}", r.key));
    }
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => out.push(format!(
            "{field}.values: must be non-empty with operator {}",
            r.operator
        )),
        "Exists" | "DoesNotExist" if !values.is_empty() => out.push(format!(
            "{field}.values: must be empty with operator {}",
            r.operator
        )),
        "Gt" | "Lt" if values.len() != 1 || values[0].parse::<i64>().is_err() => out.push(format!(
            "{field}.values: operator {} takes exactly one integer value",
            r.operator
        )),
        "In" | "NotIn" | "Exists" | "DoesNotExist" | "Gt" | "Lt" => {}
        other => out.push(format!(
            "{field}.operator: {other:?} is not one of In, NotIn, Exists, DoesNotExist, Gt, Lt"
        )),
    }
}

fn label_selector(field: &str, s: &LabelSelector, out: &mut Vec<String>) {
    label_map(
        &format!("{field}.matchLabels"),
        s.match_labels.as_ref().unwrap_or(&BTreeMap::new()),
        out,
    );
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if let Err(err) = names::check_qualified_name(&e.key) {
            out.push(format!("{f}.key: {:?}: {err}", e.key));
        }
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => out.push(format!(
                "{f}.values: must be non-empty with operator {}",
                e.operator
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => out.push(format!(
                "{f}.values: must be empty with operator {}",
                e.operator
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => out.push(format!(
                "{f}.operator: {other:?} is not one of In, NotIn, Exists, DoesNotExist"
            )),
        }
    }
}

fn pod_affinity_term(field: &str, t: &PodAffinityTerm, out: &mut Vec<String>) {
    if t.topology_key.is_empty() {
        out.push(format!("{field}.topologyKey: must not be empty"));
    } else if let Err(e) = names::check_qualified_name(&t.topology_key) {
        out.push(format!("{field}.topologyKey: {:?}: {e}", t.topology_key));
    }
    if let Some(s) = &t.label_selector {
        label_selector(&format!("{field}.labelSelector"), s, out);
    }
}

fn weight(field: &str, w: i32, out: &mut Vec<String>) {
    if !(1..=100).contains(&w) {
        out.push(format!("{field}.weight: {w} is not in the range 1 to 100"));
    }
}

fn affinity(field: &str, a: &Affinity, out: &mut Vec<String>) {
    if let Some(node) = &a.node_affinity {
        if let Some(required) = &node.required_during_scheduling_ignored_during_execution {
            let f = format!("{field}.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution");
            if required.node_selector_terms.is_empty() {
                out.push(format!(
                    "{f}.nodeSelectorTerms: must have at least one term"
                ));
            }
            for (i, term) in required.node_selector_terms.iter().enumerate() {
                for (j, r) in term.match_expressions.iter().flatten().enumerate() {
                    node_requirement(
                        &format!("{f}.nodeSelectorTerms[{i}].matchExpressions[{j}]"),
                        r,
                        out,
                    );
                }
            }
        }
        for (i, p) in node
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .flatten()
            .enumerate()
        {
            let f = format!(
                "{field}.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[{i}]"
            );
            weight(&f, p.weight, out);
            for (j, r) in p.preference.match_expressions.iter().flatten().enumerate() {
                node_requirement(&format!("{f}.preference.matchExpressions[{j}]"), r, out);
            }
        }
    }
    let pod_terms = [
        (
            "podAffinity",
            a.pod_affinity.as_ref().map(|p| {
                (
                    &p.required_during_scheduling_ignored_during_execution,
                    &p.preferred_during_scheduling_ignored_during_execution,
                )
            }),
        ),
        (
            "podAntiAffinity",
            a.pod_anti_affinity.as_ref().map(|p| {
                (
                    &p.required_during_scheduling_ignored_during_execution,
                    &p.preferred_during_scheduling_ignored_during_execution,
                )
            }),
        ),
    ];
    for (name, terms) in pod_terms {
        let Some((required, preferred)) = terms else {
            continue;
        };
        for (i, t) in required.iter().flatten().enumerate() {
            pod_affinity_term(
                &format!("{field}.{name}.requiredDuringSchedulingIgnoredDuringExecution[{i}]"),
                t,
                out,
            );
        }
        for (i, w) in preferred.iter().flatten().enumerate() {
            let f = format!("{field}.{name}.preferredDuringSchedulingIgnoredDuringExecution[{i}]");
            weight(&f, w.weight, out);
            pod_affinity_term(&format!("{f}.podAffinityTerm"), &w.pod_affinity_term, out);
        }
    }
}

fn resolve_contract(
    flow: &SyncFlow,
    ns: &str,
    contract: Option<Arc<SyncContract>>,
    compile: &dyn Fn(&SyncContract) -> Result<(), String>,
) -> (Gate, Option<Arc<SyncContract>>) {
    let binding = &flow.spec.contract;
    let failed = |reason, message| (Gate::Failed { reason, message }, None);
    let req = match semver::VersionReq::parse(&binding.version) {
        Ok(r) => r,
        Err(e) => {
            return failed(
                "InvalidVersionRange",
                format!(
                    "spec.contract.version {:?} is not a semver range: {e}",
                    binding.version
                ),
            );
        }
    };
    let Some(contract) = contract else {
        return failed(
            "ContractNotFound",
            format!("SyncContract {ns}/{} does not exist", binding.name),
        );
    };
    let version = &contract.spec.version;
    match semver::Version::parse(version) {
        Ok(v) if req.matches(&v) => {}
        Ok(_) => {
            return failed(
                "NoVersionInRange",
                format!(
                    "SyncContract {ns}/{} is at version {version}, outside the flow's range {}",
                    binding.name, binding.version
                ),
            );
        }
        Err(e) => {
            return failed(
                "InvalidContractVersion",
                format!(
                    "SyncContract {ns}/{} has version {version:?}, not semver: {e}",
                    binding.name
                ),
            );
        }
    }
    if let Err(message) = compile(&contract) {
        return failed(
            "ContractCompileFailed",
            format!(
                "SyncContract {ns}/{} version {version} does not compile: {message}",
                binding.name
            ),
        );
    }
    let bound: BTreeSet<&str> = flow.spec.lookups.iter().map(|l| l.name.as_str()).collect();
    let unbound: Vec<&str> = contract
        .spec
        .lookups
        .iter()
        .map(|l| l.name.as_str())
        .filter(|n| !bound.contains(n))
        .collect();
    if !unbound.is_empty() {
        return failed(
            "LookupNotBound",
            format!(
                "SyncContract {ns}/{} declares lookup(s) {} that spec.lookups does not bind",
                binding.name,
                unbound.join(", ")
            ),
        );
    }
    (
        Gate::Passed {
            reason: "ContractResolved",
            message: format!(
                "SyncContract {} version {version} compiles and is in range {}",
                binding.name, binding.version
            ),
        },
        Some(contract),
    )
}

/// The compiler's verdict on a contract, as one message (every error, `path: reason`).
pub fn compile_contract(contract: &SyncContract) -> Result<(), String> {
    crate::contract::compile(&contract.spec)
        .map(|_| ())
        .map_err(|errors| {
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
}
