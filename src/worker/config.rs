//! The worker's configuration: the flow, the resolved contract version and the roster's routes, as the
//! controller renders them into a ConfigMap (and `meshline dev` builds them in memory).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::api::{OwnershipRoster, SyncContract, SyncFlow};

/// Everything one worker needs to run one flow, minus credentials (those are mounted from Secrets).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenderedFlow {
    pub flow: SyncFlow,
    pub contract: SyncContract,
    /// The roster that owns the flow; its routes decide what happens to exceptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster: Option<OwnershipRoster>,
    /// The contract revision (the SyncContract's ControllerRevision) `contract` is, as the controller rendered
    /// it; the ledger attributes this worker's outcomes to it so a canary's analysis can compare revisions.
    /// Local runs leave it out and go by the contract's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// A configuration that cannot be used, naming the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Unreadable { file: String, reason: String },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

impl ConfigError {
    pub fn label(&self) -> &'static str {
        match self {
            ConfigError::Unreadable { .. } => "config_unreadable",
            ConfigError::Invalid { .. } => "config_invalid",
        }
    }
}

impl RenderedFlow {
    /// Reads either the rendered form (`flow:`, `contract:`, `roster:` keys) or plain manifests (a file or a
    /// directory with one SyncFlow, its SyncContract and optionally an OwnershipRoster), validating the
    /// manifests exactly as `meshline validate` does.
    pub fn load(path: &Path) -> Result<RenderedFlow, ConfigError> {
        let file = path.display().to_string();
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
                file: file.clone(),
                reason: e.to_string(),
            })?;
            if let Ok(rendered) = serde_yaml::from_str::<RenderedFlow>(&text) {
                return Ok(rendered);
            }
        }
        Self::from_manifests(path)
    }

    /// Validates manifests and picks the flow, its contract and its roster.
    pub fn from_manifests(path: &Path) -> Result<RenderedFlow, ConfigError> {
        let file = path.display().to_string();
        let report = crate::validate::validate_paths(
            &[path.to_path_buf()],
            &crate::validate::Options::default(),
        );
        if !report.is_ok() {
            let lines: Vec<String> = report
                .issues
                .iter()
                .filter(|i| i.severity == crate::validate::Severity::Error)
                .map(|i| i.to_string())
                .collect();
            return Err(ConfigError::Invalid {
                file,
                reason: format!("invalid manifests:\n{}", lines.join("\n")),
            });
        }
        let flow = match report.flows.as_slice() {
            [one] => one,
            [] => {
                return Err(ConfigError::Invalid {
                    file,
                    reason: "no SyncFlow found".into(),
                });
            }
            many => {
                let names: Vec<String> = many.iter().map(|f| f.name()).collect();
                return Err(ConfigError::Invalid {
                    file,
                    reason: format!(
                        "more than one SyncFlow ({}); give one flow's directory",
                        names.join(", ")
                    ),
                });
            }
        };
        let ns = flow.namespace();
        let binding = &flow.object.spec.contract;
        let contract = report
            .contracts
            .iter()
            .find(|c| c.namespace() == ns && c.name() == binding.name)
            .ok_or_else(|| ConfigError::Invalid {
                file: file.clone(),
                reason: format!("SyncContract {} not found", binding.name),
            })?;
        let roster = report
            .rosters
            .iter()
            .find(|r| {
                r.namespace() == ns
                    && r.object
                        .spec
                        .assignments
                        .iter()
                        .any(|a| crate::validate::assignment_covers(a, &flow.object))
            })
            .map(|r| r.object.clone());
        Ok(RenderedFlow {
            flow: flow.object.clone(),
            contract: contract.object.clone(),
            roster,
            revision: None,
        })
    }

    /// The name of the revision this worker runs, which the ledger attributes its outcomes to and the rollout
    /// split names: the controller's revision, or for a local run (none rendered) `v<contract version>`.
    /// The one place that fallback lives.
    pub fn revision_name(&self) -> String {
        self.revision
            .clone()
            .unwrap_or_else(|| format!("v{}", self.contract.spec.version))
    }

    pub fn flow_name(&self) -> String {
        self.flow.metadata.name.clone().unwrap_or_default()
    }

    /// The flow's namespace; `default` for manifests that name none, as `kubectl apply` would place them.
    pub fn flow_namespace(&self) -> String {
        self.flow
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revision_is_the_rendered_one_or_the_contract_version() {
        let mut rendered = RenderedFlow::from_manifests(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
        )
        .unwrap();
        let version = rendered.contract.spec.version.clone();
        assert_eq!(rendered.revision_name(), format!("v{version}"));
        rendered.revision = Some("orders-7c9f".into());
        assert_eq!(rendered.revision_name(), "orders-7c9f");
    }
}
