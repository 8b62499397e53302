//! Step 2 of the flow reconcile: decide, from plain values, whether the flow may start. Pure: no API calls.
//!
//! The three gates are the operating model's: the contract resolves (exists, has a version in the flow's range,
//! compiles, its lookups are bound), a roster names a sync owner, and every referenced Secret exists with the
//! keys its connector reads. A failed gate is a condition with a precise reason, never an error to retry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::api::{OwnershipRoster, SyncContract, SyncFlow};

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
    }

    /// The first failed gate, for Ready's reason and the Event.
    pub fn first_failure(&self) -> Option<&Gate> {
        [
            &self.contract_resolved,
            &self.owner_assigned,
            &self.secrets_ready,
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
}

pub fn validate(inputs: Inputs<'_>) -> Verdict {
    let flow = inputs.flow;
    let ns = flow.metadata.namespace.as_deref().unwrap_or_default();
    let (contract_resolved, contract) = resolve_contract(flow, ns, inputs.contract, inputs.compile);

    let mut rosters: Vec<&Arc<OwnershipRoster>> = inputs
        .rosters
        .iter()
        .filter(|r| r.metadata.namespace.as_deref() == Some(ns))
        .collect();
    rosters.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let owner = rosters.iter().find_map(|r| {
        r.spec
            .assignments
            .iter()
            .find(|a| crate::validate::assignment_covers(a, flow))
            .map(|a| ((*r).clone(), a.sync_owner.clone()))
    });
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

    let secrets_ready = match crate::controller::secrets::check(flow, inputs.secrets) {
        Ok(()) => Gate::Passed {
            reason: "SecretsFound",
            message: "every referenced Secret exists with the keys its connector reads".into(),
        },
        Err((reason, message)) => Gate::Failed { reason, message },
    };

    Verdict {
        contract_resolved,
        owner_assigned,
        secrets_ready,
        contract,
        roster,
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
