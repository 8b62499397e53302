//! Checks between objects given together: a flow's contract exists and matches its version range, the flow's
//! lookups bind the contract's, every flow has a sync owner, and the roster's ids are consistent. Also a flow's
//! worker pod settings, by the controller's own rules (which the CRD schema cannot express).

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Located, Options, Report, Severity};
use crate::api::{OwnershipRoster, RuleAction, SyncContract, SyncFlow};

pub fn check(report: &mut Report, options: &Options) {
    let missing = if options.partial {
        Severity::Warning
    } else {
        Severity::Error
    };
    let mut issues = Vec::new();

    duplicates(&report.contracts, &mut issues);
    duplicates(&report.flows, &mut issues);
    duplicates(&report.rosters, &mut issues);

    for roster in &report.rosters {
        roster_ids(roster, &mut issues);
    }
    for contract in &report.contracts {
        issues.extend(super::contract_checks(contract));
    }

    for flow in &report.flows {
        // Worker pod settings the API server would refuse, or that take the controller's labels: the controller
        // would not start the flow (each problem names its field under spec.worker).
        if let Some(worker) = &flow.object.spec.worker {
            for problem in
                crate::controller::flow::validate::worker_pod_settings(&worker.pod, "spec.worker")
            {
                issues.push(flow.issue(Severity::Error, "spec.worker", problem));
            }
        }
        let ns = flow.namespace();
        let binding = &flow.object.spec.contract;
        match semver::VersionReq::parse(&binding.version) {
            Err(e) => issues.push(flow.issue(
                Severity::Error,
                "spec.contract.version",
                format!("{:?} is not a semver range: {e}", binding.version),
            )),
            Ok(req) => {
                let named: Vec<&Located<SyncContract>> = report
                    .contracts
                    .iter()
                    .filter(|c| c.namespace() == ns && c.name() == binding.name)
                    .collect();
                if named.is_empty() {
                    issues.push(flow.issue(
                        missing,
                        "spec.contract.name",
                        format!(
                            "SyncContract {ns}/{} is not among the given manifests",
                            binding.name
                        ),
                    ));
                }
                for contract in named {
                    let version = &contract.object.spec.version;
                    match semver::Version::parse(version) {
                        Ok(v) if req.matches(&v) => contract_binding(flow, contract, &mut issues),
                        Ok(_) => issues.push(flow.issue(
                            Severity::Error,
                            "spec.contract.version",
                            format!("SyncContract {ns}/{} is at version {version}, outside the range {req}", binding.name),
                        )),
                        Err(_) => {} // reported on the contract itself
                    }
                }
            }
        }

        let rosters: Vec<&Located<OwnershipRoster>> = report
            .rosters
            .iter()
            .filter(|r| r.namespace() == ns)
            .collect();
        let owners: Vec<(&Located<OwnershipRoster>, &crate::api::Assignment)> = rosters
            .iter()
            .flat_map(|r| r.object.spec.assignments.iter().map(move |a| (*r, a)))
            .filter(|(_, a)| assignment_covers(a, &flow.object))
            .collect();
        if owners.is_empty() {
            issues.push(flow.issue(
                missing,
                "metadata.name",
                format!("no OwnershipRoster in {ns} assigns this flow a syncOwner; a flow without a sync owner does not start"),
            ));
        }
        if let Some(contract) = report
            .contracts
            .iter()
            .find(|c| c.namespace() == ns && c.name() == binding.name)
        {
            approvers(flow, contract, &owners, &mut issues);
        }
    }
    report.issues.extend(issues);
}

fn duplicates<T: kube::Resource<DynamicType = ()>>(
    objects: &[Located<T>],
    issues: &mut Vec<super::Issue>,
) {
    let mut seen: HashMap<(String, String), &Located<T>> = HashMap::new();
    for object in objects {
        let key = (object.namespace(), object.name());
        if let Some(first) = seen.get(&key) {
            issues.push(object.issue(
                Severity::Error,
                "metadata.name",
                format!(
                    "defined twice; the first is document {} of {}",
                    first.document, first.file
                ),
            ));
        } else {
            seen.insert(key, object);
        }
    }
}

fn roster_ids(roster: &Located<OwnershipRoster>, issues: &mut Vec<super::Issue>) {
    let spec = &roster.object.spec;
    let ids: BTreeSet<&str> = spec.owners.iter().map(|o| o.id.as_str()).collect();
    let sinks: BTreeSet<&str> = spec.ticket_sinks.iter().map(|t| t.name.as_str()).collect();
    for (i, a) in spec.assignments.iter().enumerate() {
        for role in crate::api::OwnerRole::ALL {
            if let Some(id) = a.owner_in(role)
                && !ids.contains(id)
            {
                issues.push(roster.issue(
                    Severity::Error,
                    format!("spec.assignments[{i}].{}", role.as_str()),
                    format!("owner {id:?} is not in spec.owners"),
                ));
            }
        }
    }
    for (i, step) in spec.escalation.iter().enumerate() {
        if let Some(id) = &step.owner
            && !ids.contains(id.as_str())
        {
            issues.push(roster.issue(
                Severity::Error,
                format!("spec.escalation[{i}].owner"),
                format!("owner {id:?} is not in spec.owners"),
            ));
        }
    }
    // The worker mounts these Secrets by name; one the API server would refuse as a name could never be
    // mounted, and the flow's pods would never start.
    let secret_refs = spec
        .identity_secret_ref
        .iter()
        .map(|r| ("spec.identitySecretRef.name".to_string(), r))
        .chain(spec.ticket_sinks.iter().enumerate().map(|(i, t)| {
            (
                format!("spec.ticketSinks[{i}].credentialsSecretRef.name"),
                &t.credentials_secret_ref,
            )
        }));
    for (field, secret) in secret_refs {
        if let Err(why) = crate::controller::names::NameRule::Subdomain.check(&secret.name) {
            issues.push(roster.issue(
                Severity::Error,
                field,
                format!("{:?} is not a valid Secret name: it {why}", secret.name),
            ));
        }
    }
    // The API server would refuse the flows' audit CronJobs; the controller writes none for such a roster.
    for (field, why) in spec
        .audit
        .as_ref()
        .map(crate::audit::schedule::problems)
        .unwrap_or_default()
    {
        issues.push(roster.issue(Severity::Error, field, why));
    }
    for (i, route) in spec.routes.iter().enumerate() {
        if let Some(sink) = &route.ticket_sink
            && !sinks.contains(sink.as_str())
        {
            issues.push(roster.issue(
                Severity::Error,
                format!("spec.routes[{i}].ticketSink"),
                format!("ticket sink {sink:?} is not in spec.ticketSinks"),
            ));
        }
        if let Some(role) = &route.approver_role
            && !spec.owners.iter().any(|o| o.approver_roles.contains(role))
        {
            issues.push(roster.issue(
                Severity::Error,
                format!("spec.routes[{i}].approverRole"),
                format!("no owner holds the approver role {role:?}, so held records could never be approved"),
            ));
        }
    }
}

fn contract_binding(
    flow: &Located<SyncFlow>,
    contract: &Located<SyncContract>,
    issues: &mut Vec<super::Issue>,
) {
    let declared: BTreeSet<&str> = contract
        .object
        .spec
        .lookups
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    let bound: BTreeSet<&str> = flow
        .object
        .spec
        .lookups
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    for name in declared.difference(&bound) {
        issues.push(flow.issue(
            Severity::Error,
            "spec.lookups",
            format!("the contract's lookup {name:?} is not bound; add it to spec.lookups"),
        ));
    }
    for (i, l) in flow.object.spec.lookups.iter().enumerate() {
        if !declared.contains(l.name.as_str()) {
            issues.push(flow.issue(
                Severity::Warning,
                format!("spec.lookups[{i}].name"),
                format!(
                    "the contract declares no lookup {:?}; it is loaded but never read",
                    l.name
                ),
            ));
        }
    }
    if contract.object.spec.source.system != source_system_name(&flow.object) {
        issues.push(flow.issue(
            Severity::Error,
            "spec.source.system",
            format!(
                "the contract reads from {:?} but the flow's source is {:?}",
                contract.object.spec.source.system,
                source_system_name(&flow.object)
            ),
        ));
    }
}

fn source_system_name(flow: &SyncFlow) -> String {
    serde_json::to_value(flow.spec.source.system)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Every hold rule needs somebody who can approve; otherwise records wait forever.
fn approvers(
    flow: &Located<SyncFlow>,
    contract: &Located<SyncContract>,
    owners: &[(&Located<OwnershipRoster>, &crate::api::Assignment)],
    issues: &mut Vec<super::Issue>,
) {
    if owners.is_empty() {
        return;
    }
    for rule in &contract.object.spec.rules {
        if rule.action != RuleAction::Hold {
            continue;
        }
        let Some(role) = &rule.approver_role else {
            continue;
        };
        let someone = owners.iter().any(|(roster, _)| {
            roster
                .object
                .spec
                .owners
                .iter()
                .any(|o| o.approver_roles.contains(role))
        });
        if !someone {
            issues.push(flow.issue(
                Severity::Error,
                "spec.contract",
                format!(
                    "contract rule {:?} holds records for the approver role {role:?}, but no owner in this flow's roster holds it",
                    rule.name
                ),
            ));
        }
    }
}

/// Whether an assignment names the flow or selects it by its labels.
pub fn assignment_covers(assignment: &crate::api::Assignment, flow: &SyncFlow) -> bool {
    let name = flow.metadata.name.as_deref().unwrap_or_default();
    if assignment.flows.iter().any(|f| f == name) {
        return true;
    }
    assignment
        .flow_selector
        .as_ref()
        .is_some_and(|s| selector_matches(s, flow.metadata.labels.as_ref()))
}

/// Label selector semantics of Kubernetes: all matchLabels and all expressions must hold; an empty selector
/// matches everything.
pub fn selector_matches(
    selector: &LabelSelector,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    let empty = std::collections::BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let match_labels = selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let expressions = selector.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(&e.key),
                "DoesNotExist" => !labels.contains_key(&e.key),
                _ => false,
            }
        })
    });
    match_labels && expressions
}
