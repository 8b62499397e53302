//! The SyncContract reconciler: compiles each version, checks it against the previous accepted revision under
//! the contract's compatibility mode, and keeps `status.versionHistory`, `currentVersion` and the `Accepted`
//! condition. Every accepted version's spec is kept as an immutable revision (a ConfigMap owned by the contract)
//! so the next version can be diffed against it and a rollback has something to return to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use super::flow::status::{carry_transition_times, differs};
use super::{Context, Error, MANAGED_BY, apply, names};
use crate::api::{Condition, ContractRevision, SyncContract, SyncContractSpec, SyncContractStatus};

const SPEC_KEY: &str = "spec.yaml";

/// Name of the ConfigMap that keeps one accepted revision: the contract's name and the first 12 hex digits of
/// its content hash (never the `sha256:` prefix, which no object name may contain).
pub fn revision_name(contract: &str, hash: &str) -> String {
    let hex = names::hex_of(hash);
    names::subdomain(&format!(
        "meshline-contract-{contract}-{}",
        &hex[..hex.len().min(12)]
    ))
}

/// What the comparison with the previous revision found.
#[derive(Debug, Clone, PartialEq)]
pub enum Previous {
    /// No revision yet: this is the first version.
    None,
    /// The previous accepted revision's spec.
    Spec(Box<SyncContractSpec>),
    /// The previous revision is recorded but its ConfigMap is gone; the change cannot be checked.
    Lost,
}

/// The contract's next status, and the revision to store when a new version is accepted. Pure.
pub fn compute(
    contract: &SyncContract,
    previous: Previous,
    compiled: Result<(), String>,
    now: &str,
) -> (SyncContractStatus, Option<ConfigMap>) {
    let g = contract.metadata.generation;
    let spec = &contract.spec;
    let old = contract.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = g;
    let hash = crate::contract::content_hash(spec).as_str().to_string();
    let known = status
        .version_history
        .last()
        .is_some_and(|r| r.content_hash == hash);
    let cond = |ok: bool, reason: &str, message: String| Condition {
        r#type: "Accepted".into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: g,
        last_transition_time: None,
    };
    let mut revision = None;
    let accepted = match compiled {
        Err(message) => cond(
            false,
            "CompileFailed",
            format!("version {} does not compile: {message}", spec.version),
        ),
        Ok(()) if known => cond(
            true,
            "Accepted",
            format!(
                "version {} compiles and is the current revision",
                spec.version
            ),
        ),
        Ok(()) => {
            let (verdict, problems) = match &previous {
                Previous::None => ("initial".to_string(), Vec::new()),
                Previous::Lost => ("unknown".to_string(), Vec::new()),
                Previous::Spec(old_spec) => {
                    let report = crate::contract::diff(old_spec, spec);
                    (
                        report.verdict().to_string(),
                        report
                            .problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>(),
                    )
                }
            };
            if problems.is_empty() {
                let signed: Vec<String> = spec
                    .sign_offs
                    .iter()
                    .filter(|s| s.version == spec.version)
                    .map(|s| s.role.as_str().to_string())
                    .collect();
                status.version_history.push(ContractRevision {
                    version: spec.version.clone(),
                    content_hash: hash.clone(),
                    observed_at: Some(now.to_string()),
                    compatibility: Some(verdict.clone()),
                    signed_off_by: signed,
                });
                // Bounded, so the status stays far below the object size limit.
                let excess = status.version_history.len().saturating_sub(50);
                status.version_history.drain(..excess);
                status.current_version = Some(spec.version.clone());
                revision = Some(revision_config_map(contract, &hash));
                cond(
                    true,
                    "Accepted",
                    format!(
                        "version {} compiles; change against the previous revision: {verdict}",
                        spec.version
                    ),
                )
            } else {
                cond(
                    false,
                    "IncompatibleChange",
                    format!(
                        "version {} is not accepted: {}",
                        spec.version,
                        problems.join("; ")
                    ),
                )
            }
        }
    };
    status.conditions = carry_transition_times(&old.conditions, vec![accepted], now);
    (status, revision)
}

fn revision_config_map(contract: &SyncContract, hash: &str) -> ConfigMap {
    let name = contract.name_any();
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "meshline".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "contract-revision".to_string(),
        ),
    ]);
    labels.insert(
        "sync.meshline.io/contract".into(),
        names::label_value(&name),
    );
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(revision_name(&name, hash)),
            namespace: contract.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: crate::api::API_VERSION.into(),
                kind: "SyncContract".into(),
                name,
                uid: contract.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            SPEC_KEY.into(),
            serde_yaml::to_string(&contract.spec).unwrap_or_default(),
        )])),
        immutable: Some(true),
        ..ConfigMap::default()
    }
}

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

async fn reconcile_inner(contract: &SyncContract, ctx: &Context) -> Result<Action, Error> {
    let ns = contract.namespace().ok_or_else(|| Error::NoNamespace {
        kind: "SyncContract",
        name: contract.name_any(),
    })?;
    if contract.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Gather: the previous accepted revision, from the cache of the controller's ConfigMaps.
    let previous = match contract
        .status
        .as_ref()
        .and_then(|s| s.version_history.last())
    {
        None => Previous::None,
        Some(last) => {
            let name = revision_name(&contract.name_any(), &last.content_hash);
            ctx.stores
                .config_maps
                .get(&ObjectRef::new(&name).within(&ns))
                .and_then(|cm| cm.data.as_ref()?.get(SPEC_KEY).cloned())
                .and_then(|yaml| serde_yaml::from_str::<SyncContractSpec>(&yaml).ok())
                .map_or(Previous::Lost, |s| Previous::Spec(Box::new(s)))
        }
    };
    let compiled = ctx.compile(contract);
    let (next, revision) = compute(contract, previous, compiled, &super::now_rfc3339());
    if let Some(cm) = &revision {
        // Immutable: created once, never re-applied.
        apply::create_once(&ctx.client, cm, &ctx.metrics).await?;
    }
    if differs(contract.status.as_ref(), &next, |s| &mut s.conditions) {
        apply::apply_status(&ctx.client, contract, &next, &ctx.metrics).await?;
    }
    Ok(Action::requeue(super::flow::RESYNC))
}
