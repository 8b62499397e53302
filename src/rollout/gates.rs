//! The gates between a contract edit and the workers, as plain functions of plain values: the controller runs
//! them on every reconcile, and `meshline contract diff`, `meshline validate` and `meshline dev` run the same
//! code offline so a reviewer sees which gates a change will face before it is merged.
//!
//! In order:
//! 1. **Compatibility** against the active revision under the contract's mode (the engine's diff): a breaking
//!    change needs a new major version, and a version never changes content. The candidate's version must also
//!    lie in every bound flow's `spec.contract.version` range, or that flow could not run it.
//! 2. **Sign-off**: the source owner and the sink owner that the roster assigns to each bound flow have signed
//!    this exact version (and, when the sign-off names one, this exact content hash). A role the assignment
//!    leaves empty is signed by the flow's sync owner, who is accountable for the flow end to end.
//! 3. **Preflight replay** of each bound flow's recent records (run by a Job; see `rollout::replay`).
//!
//! A contract's first version has nothing running to protect: it becomes active at once.

use std::collections::BTreeSet;
use std::fmt;

use crate::api::{Assignment, OwnerRole, OwnershipRoster, SyncContractSpec, SyncFlow};
use crate::contract::compat::VersionProblem;

/// A flow bound to the contract, with the roster assignment that covers it (if one does).
#[derive(Debug, Clone)]
pub struct BoundFlow<'a> {
    pub flow: &'a SyncFlow,
    /// The roster and its assignment covering the flow: the first roster by name, as the flow reconciler picks.
    pub assignment: Option<(&'a OwnershipRoster, &'a Assignment)>,
}

impl BoundFlow<'_> {
    pub fn name(&self) -> &str {
        self.flow.metadata.name.as_deref().unwrap_or_default()
    }
}

/// The flows of `flows` bound to the contract `contract` in `namespace`, with their assignments, by name.
pub fn bound_flows<'a>(
    namespace: &str,
    contract: &str,
    flows: &'a [&'a SyncFlow],
    rosters: &'a [&'a OwnershipRoster],
) -> Vec<BoundFlow<'a>> {
    let mut rosters: Vec<&OwnershipRoster> = rosters
        .iter()
        .copied()
        .filter(|r| r.metadata.namespace.as_deref().unwrap_or_default() == namespace)
        .collect();
    rosters.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out: Vec<BoundFlow<'a>> = flows
        .iter()
        .copied()
        .filter(|f| {
            f.metadata.namespace.as_deref().unwrap_or_default() == namespace
                && f.spec.contract.name == contract
                && f.metadata.deletion_timestamp.is_none()
        })
        .map(|flow| BoundFlow {
            flow,
            assignment: rosters.iter().find_map(|r| {
                r.spec
                    .assignments
                    .iter()
                    .find(|a| crate::validate::assignment_covers(a, flow))
                    .map(|a| (*r, a))
            }),
        })
        .collect();
    out.sort_by(|a, b| a.name().cmp(b.name()));
    out
}

/// Gate 1's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    /// No active revision: the first version.
    Initial,
    /// The change fits the version step (`compatible` or `breaking` with a major version).
    Allowed { verdict: &'static str },
    /// The change does not fit: `reason` is `ContentChangedWithoutVersion` or `IncompatibleChange`.
    Refused {
        reason: &'static str,
        problems: Vec<String>,
    },
}

impl Compatibility {
    pub fn passed(&self) -> bool {
        !matches!(self, Compatibility::Refused { .. })
    }
    /// `initial`, `compatible` or `breaking`, as the revision records it.
    pub fn verdict(&self) -> &'static str {
        match self {
            Compatibility::Initial => "initial",
            Compatibility::Allowed { verdict } => verdict,
            Compatibility::Refused { .. } => "refused",
        }
    }
}

/// Gate 1: the candidate against the active revision under the compatibility mode.
pub fn compatibility(
    active: Option<&SyncContractSpec>,
    candidate: &SyncContractSpec,
) -> Compatibility {
    let Some(active) = active else {
        return Compatibility::Initial;
    };
    let report = crate::contract::diff(active, candidate);
    if report.problems.is_empty() {
        return Compatibility::Allowed {
            verdict: report.verdict(),
        };
    }
    let reason = if report
        .problems
        .contains(&VersionProblem::ContentChangedWithoutVersionChange)
    {
        "ContentChangedWithoutVersion"
    } else {
        "IncompatibleChange"
    };
    let mut problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    let breaking: Vec<String> = report
        .changes
        .iter()
        .filter(|c| c.breaking)
        .take(5)
        .map(|c| format!("{} ({})", c.path, c.detail))
        .collect();
    if !breaking.is_empty() {
        problems.push(format!("breaking: {}", breaking.join(", ")));
    }
    Compatibility::Refused { reason, problems }
}

/// Bound flows whose `spec.contract.version` range does not admit `version` (flow name, range).
pub fn outside_ranges(version: &str, bound: &[BoundFlow<'_>]) -> Vec<(String, String)> {
    let parsed = semver::Version::parse(version).ok();
    bound
        .iter()
        .filter(|b| {
            let range = semver::VersionReq::parse(&b.flow.spec.contract.version).ok();
            !matches!((&parsed, range), (Some(v), Some(r)) if r.matches(v))
        })
        .map(|b| (b.name().to_string(), b.flow.spec.contract.version.clone()))
        .collect()
}

/// One sign-off the gate needs: `owner` signs for `role` of `flow`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Signer {
    pub owner: String,
    pub flow: String,
    pub role: OwnerRole,
}

/// Gate 2's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignOffs {
    /// Every sign-off needed, by owner.
    pub required: Vec<Signer>,
    /// Owners whose sign-off counts.
    pub signed: BTreeSet<String>,
    /// Needed and not given.
    pub missing: Vec<Signer>,
    /// Owners who signed this version for other content: (owner, the content hash they named).
    pub other_content: Vec<(String, String)>,
    /// Bound flows no roster assignment covers: nobody can sign for them.
    pub unassigned: Vec<String>,
}

impl SignOffs {
    pub fn passed(&self) -> bool {
        self.missing.is_empty() && self.unassigned.is_empty()
    }

    /// One line for a condition: who must still sign what.
    pub fn message(&self, version: &str, hash: &str) -> String {
        if self.passed() {
            if self.required.is_empty() {
                return format!("version {version} needs no sign-off (no bound flow)");
            }
            return format!(
                "version {version} ({hash}) is signed off by {}",
                self.signed.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "waiting for the sign-off of version {version} ({hash}) by {}",
                self.missing
                    .iter()
                    .map(|s| format!("{} ({} of flow {})", s.owner, s.role.as_str(), s.flow))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for (owner, named) in &self.other_content {
            parts.push(format!(
                "the sign-off by {owner} names content {named}, not this candidate's"
            ));
        }
        if !self.unassigned.is_empty() {
            parts.push(format!(
                "no OwnershipRoster assigns owners to flow(s) {}, so nobody can sign for them",
                self.unassigned.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// Gate 2: the sign-offs of `candidate` (whose content hash is `hash`) against the owners the bound flows'
/// assignments name.
pub fn sign_offs(candidate: &SyncContractSpec, hash: &str, bound: &[BoundFlow<'_>]) -> SignOffs {
    let mut out = SignOffs::default();
    for b in bound {
        let Some((_, assignment)) = b.assignment else {
            out.unassigned.push(b.name().to_string());
            continue;
        };
        for role in [OwnerRole::SourceOwner, OwnerRole::SinkOwner] {
            let owner = assignment
                .owner_in(role)
                .filter(|o| !o.is_empty())
                .unwrap_or(assignment.sync_owner.as_str());
            out.required.push(Signer {
                owner: owner.to_string(),
                flow: b.name().to_string(),
                role,
            });
        }
    }
    out.required.sort();
    out.required.dedup();
    for s in &candidate.sign_offs {
        if s.version != candidate.version {
            continue;
        }
        match &s.content_hash {
            Some(named) if named != hash => {
                out.other_content.push((s.owner.clone(), named.clone()));
            }
            _ => {
                out.signed.insert(s.owner.clone());
            }
        }
    }
    // Only the owners the gate asks for count as having signed.
    let needed: BTreeSet<&str> = out.required.iter().map(|s| s.owner.as_str()).collect();
    out.signed.retain(|o| needed.contains(o.as_str()));
    out.other_content
        .retain(|(o, _)| needed.contains(o.as_str()) && !out.signed.contains(o));
    out.missing = out
        .required
        .iter()
        .filter(|s| !out.signed.contains(&s.owner))
        .cloned()
        .collect();
    out
}

/// Every gate a change faces, for a reviewer: what `meshline contract diff` and `meshline validate` print.
#[derive(Debug, Clone)]
pub struct Plan {
    pub version: String,
    pub hash: String,
    pub active_version: Option<String>,
    pub compatibility: Compatibility,
    pub outside_ranges: Vec<(String, String)>,
    pub sign_offs: SignOffs,
    /// The flows whose recent records a preflight Job will replay.
    pub preflight_flows: Vec<String>,
}

/// The gates `candidate` faces against `active` with the flows `bound` to it.
pub fn plan(
    active: Option<&SyncContractSpec>,
    candidate: &SyncContractSpec,
    bound: &[BoundFlow<'_>],
) -> Plan {
    let hash = crate::contract::content_hash(candidate)
        .as_str()
        .to_string();
    let compatibility = compatibility(active, candidate);
    let initial = matches!(compatibility, Compatibility::Initial);
    Plan {
        version: candidate.version.clone(),
        active_version: active.map(|a| a.version.clone()),
        outside_ranges: outside_ranges(&candidate.version, bound),
        sign_offs: if initial {
            SignOffs::default()
        } else {
            sign_offs(candidate, &hash, bound)
        },
        preflight_flows: if initial {
            Vec::new()
        } else {
            bound.iter().map(|b| b.name().to_string()).collect()
        },
        compatibility,
        hash,
    }
}

impl Plan {
    /// The plan as JSON, for `--output json` of the offline tools.
    pub fn to_json(&self) -> serde_json::Value {
        let (compatibility, reason, problems) = match &self.compatibility {
            Compatibility::Initial => ("initial", None, Vec::new()),
            Compatibility::Allowed { verdict } => (*verdict, None, Vec::new()),
            Compatibility::Refused { reason, problems } => {
                ("refused", Some(*reason), problems.clone())
            }
        };
        serde_json::json!({
            "version": self.version,
            "contentHash": self.hash,
            "activeVersion": self.active_version,
            "compatibility": compatibility,
            "refusedBecause": reason,
            "problems": problems,
            "outsideFlowRanges": self.outside_ranges.iter().map(|(f, r)| serde_json::json!({"flow": f, "range": r})).collect::<Vec<_>>(),
            "signOffs": self.sign_offs.required.iter().map(|s| serde_json::json!({
                "owner": s.owner, "flow": s.flow, "role": s.role.as_str(),
                "signed": self.sign_offs.signed.contains(&s.owner),
            })).collect::<Vec<_>>(),
            "signOffsForOtherContent": self.sign_offs.other_content.iter().map(|(o, h)| serde_json::json!({"owner": o, "contentHash": h})).collect::<Vec<_>>(),
            "unassignedFlows": self.sign_offs.unassigned,
            "preflightFlows": self.preflight_flows,
            "blocked": !self.compatibility.passed(),
        })
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "gates for version {} ({}):", self.version, self.hash)?;
        match &self.compatibility {
            Compatibility::Initial => {
                writeln!(
                    f,
                    "  1. compatibility: first version, nothing running to protect: it becomes active at once"
                )?;
                return Ok(());
            }
            Compatibility::Allowed { verdict } => writeln!(
                f,
                "  1. compatibility: passes ({verdict} against active {})",
                self.active_version.as_deref().unwrap_or("-")
            )?,
            Compatibility::Refused { reason, problems } => writeln!(
                f,
                "  1. compatibility: BLOCKED ({reason}): {}",
                problems.join("; ")
            )?,
        }
        for (flow, range) in &self.outside_ranges {
            writeln!(
                f,
                "     flow {flow} binds range {range}, which does not admit {}: it waits until the flow's range does",
                self.version
            )?;
        }
        if self.sign_offs.required.is_empty() && self.sign_offs.unassigned.is_empty() {
            writeln!(f, "  2. sign-off: none needed (no bound flow)")?;
        } else {
            writeln!(
                f,
                "  2. sign-off: {}",
                if self.sign_offs.passed() {
                    "complete"
                } else {
                    "needed"
                }
            )?;
            for s in &self.sign_offs.required {
                let mark = if self.sign_offs.signed.contains(&s.owner) {
                    "signed"
                } else {
                    "missing"
                };
                writeln!(
                    f,
                    "     {} ({} of flow {}): {mark}",
                    s.owner,
                    s.role.as_str(),
                    s.flow
                )?;
            }
            for (owner, named) in &self.sign_offs.other_content {
                writeln!(
                    f,
                    "     {owner} signed other content ({named}); sign {} to approve this one",
                    self.hash
                )?;
            }
            for flow in &self.sign_offs.unassigned {
                writeln!(f, "     flow {flow}: no roster assignment, nobody can sign")?;
            }
        }
        if self.preflight_flows.is_empty() {
            writeln!(f, "  3. preflight replay: no bound flow")?;
        } else {
            writeln!(
                f,
                "  3. preflight replay: a Job replays recent records of {}",
                self.preflight_flows.join(", ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SignOff, SyncContract};

    fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
        let text = std::fs::read_to_string(format!(
            "{}/examples/hubspot-odoo/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        serde_yaml::from_str(&text).unwrap()
    }

    fn bump(spec: &SyncContractSpec, version: &str) -> SyncContractSpec {
        let mut s = spec.clone();
        s.version = version.into();
        s.sla = None;
        s.sign_offs.clear();
        s
    }

    fn sign(owner: &str, version: &str, hash: Option<&str>) -> SignOff {
        SignOff {
            owner: owner.into(),
            version: version.into(),
            content_hash: hash.map(str::to_string),
            role: None,
            approved_at: None,
        }
    }

    #[test]
    fn sign_offs_need_the_source_and_sink_owner_of_each_flow_for_this_content() {
        let contract: SyncContract = load("contract.yaml");
        let flow: SyncFlow = load("flow.yaml");
        let roster: OwnershipRoster = load("roster.yaml");
        let ns = flow.metadata.namespace.clone().unwrap();
        let flows = [&flow];
        let rosters = [&roster];
        let bound = bound_flows(
            &ns,
            contract.metadata.name.as_deref().unwrap(),
            &flows,
            &rosters,
        );
        assert_eq!(bound.len(), 1);
        let (_, a) = bound[0].assignment.unwrap();
        let source = a.owner_in(OwnerRole::SourceOwner).unwrap_or(&a.sync_owner);
        let sink = a.owner_in(OwnerRole::SinkOwner).unwrap_or(&a.sync_owner);

        let mut next = bump(&contract.spec, "9.9.9");
        let hash = crate::contract::content_hash(&next).as_str().to_string();
        let none = sign_offs(&next, &hash, &bound);
        assert!(!none.passed());
        let missing: BTreeSet<&str> = none.missing.iter().map(|s| s.owner.as_str()).collect();
        assert_eq!(missing, BTreeSet::from([source, sink]));

        // Signed for other content: does not count, and says so.
        let other = format!("sha256:{}", "0".repeat(64));
        next.sign_offs = vec![
            sign(source, "9.9.9", Some(&other)),
            sign(sink, "9.9.9", None),
            sign(source, "9.9.8", None),
        ];
        let partly = sign_offs(&next, &hash, &bound);
        if source != sink {
            assert!(!partly.passed());
            assert_eq!(partly.other_content, vec![(source.to_string(), other)]);
            assert!(partly.message("9.9.9", &hash).contains("names content"));
        }

        next.sign_offs = vec![
            sign(source, "9.9.9", Some(&hash)),
            sign(sink, "9.9.9", None),
            sign("somebody-else", "9.9.9", None),
        ];
        let done = sign_offs(&next, &hash, &bound);
        assert!(done.passed(), "{done:?}");
        assert!(!done.signed.contains("somebody-else"));
    }

    #[test]
    fn an_unassigned_flow_blocks_the_sign_off() {
        let contract: SyncContract = load("contract.yaml");
        let flow: SyncFlow = load("flow.yaml");
        let ns = flow.metadata.namespace.clone().unwrap();
        let flows = [&flow];
        let bound = bound_flows(&ns, contract.metadata.name.as_deref().unwrap(), &flows, &[]);
        let next = bump(&contract.spec, "9.9.9");
        let s = sign_offs(&next, "sha256:x", &bound);
        assert!(!s.passed());
        assert_eq!(s.unassigned, vec![flow.metadata.name.clone().unwrap()]);
    }

    #[test]
    fn compatibility_refuses_a_content_change_under_the_same_version() {
        let contract: SyncContract = load("contract.yaml");
        let mut same = contract.spec.clone();
        same.sla = None;
        if same == contract.spec {
            same.rules.pop();
        }
        match compatibility(Some(&contract.spec), &same) {
            Compatibility::Refused { reason, .. } => {
                assert_eq!(reason, "ContentChangedWithoutVersion")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(compatibility(None, &same), Compatibility::Initial);
        let patch = {
            let v = semver::Version::parse(&contract.spec.version).unwrap();
            let mut s = contract.spec.clone();
            s.version = format!("{}.{}.{}", v.major, v.minor, v.patch + 1);
            s.sign_offs.clear();
            s
        };
        assert!(compatibility(Some(&contract.spec), &patch).passed());
    }

    #[test]
    fn a_version_outside_a_flow_range_is_named() {
        let contract: SyncContract = load("contract.yaml");
        let flow: SyncFlow = load("flow.yaml");
        let ns = flow.metadata.namespace.clone().unwrap();
        let flows = [&flow];
        let bound = bound_flows(&ns, contract.metadata.name.as_deref().unwrap(), &flows, &[]);
        assert!(outside_ranges(&contract.spec.version, &bound).is_empty());
        let far = outside_ranges("99.0.0", &bound);
        assert_eq!(far.len(), 1);
        assert_eq!(far[0].0, flow.metadata.name.clone().unwrap());
    }
}
