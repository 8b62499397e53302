//! The flow-level causes only the controller sees (an SLA breach over the flow's status, a contract
//! candidate the gates rejected or whose canary aborted), reported to a worker so they become tickets in the
//! flow's outbox beside the records' dead letters and holds. Pure `causes`, then `report`.

use kube::ResourceExt;

use super::status::{Observation, PodAnswer, sla_breaches};
use crate::api::{ErrorClass, RevisionState, SyncContract};
use crate::controller::Context;
use crate::controller::poll::WorkerPod;
use crate::tickets::{ExceptionKind, ReportedCause, ReportedCauses};

/// The causes to report, from the ledger's numbers and the flow's contract. Pure.
pub fn causes(
    observation: Option<&Observation>,
    contract: Option<&SyncContract>,
) -> Vec<ReportedCause> {
    let mut out = Vec::new();
    if let (Some(worker), Some(contract)) =
        (observation.and_then(|o| o.ledger.as_deref()), contract)
    {
        for (reason, message) in sla_breaches(worker, contract.spec.sla.as_ref()) {
            out.push(ReportedCause {
                kind: ExceptionKind::FlowDegraded,
                class: Some(ErrorClass::FlowLevel),
                reason: format!("sla:{reason}"),
                summary: message,
            });
        }
    }
    // Pods that do not answer while another does (replicas on a shared ledger): the flow runs short-handed.
    // When none answers there is no worker to report to; the controller sends that ticket itself (`outage`).
    if let Some(o) = observation {
        let silent: Vec<&str> = o
            .pods
            .iter()
            .filter_map(|p| match &p.answer {
                PodAnswer::Unreachable(_) | PodAnswer::NotStarted(_) => Some(p.pod.as_str()),
                PodAnswer::Running(_) => None,
            })
            .collect();
        if !silent.is_empty() && o.ledger_fresh {
            out.push(ReportedCause {
                kind: ExceptionKind::FlowDegraded,
                class: Some(ErrorClass::FlowLevel),
                reason: "status:WorkersNotAnswering".into(),
                summary: format!(
                    "{} of {} worker pod(s) do not answer or could not start: {}",
                    silent.len(),
                    o.pods.len(),
                    silent
                        .iter()
                        .take(5)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    if let Some(contract) = contract {
        // The version people applied was rejected (a gate, a failed preflight, an aborted canary) and is
        // still the spec: someone must change it or roll it back. A new version clears the cause.
        let rejected = contract.status.as_ref().and_then(|s| {
            s.revisions
                .iter()
                .rev()
                .find(|r| r.version == contract.spec.version && r.state == RevisionState::Rejected)
        });
        if let Some(r) = rejected {
            let why = r.reason.as_deref().unwrap_or("Rejected");
            out.push(ReportedCause {
                kind: ExceptionKind::ContractRejected,
                class: Some(ErrorClass::Config),
                reason: format!("contract:{why}:{}", r.version),
                summary: format!(
                    "SyncContract {} version {} was rejected ({why}){}; the flow keeps running the active \
                     revision until the contract is fixed or rolled back",
                    contract.name_any(),
                    r.version,
                    r.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
                ),
            });
        }
    }
    out.truncate(crate::tickets::MAX_REPORTED_CAUSES);
    out
}

/// Sends the causes to one worker that answered the last poll (they share the ledger). A worker that does
/// not take them (unreachable, an older version) is logged and tried again on the next reconcile: the set
/// is sent whole each time, so nothing is lost by a missed report.
pub async fn report(
    ctx: &Context,
    ns: &str,
    flow: &str,
    observation: Option<&Observation>,
    causes: &[ReportedCause],
) {
    let Some(pod) = observation.and_then(|o| {
        o.pods.iter().find_map(|p| match &p.answer {
            PodAnswer::Running(_) => Some(WorkerPod {
                name: p.pod.clone(),
                address: p.address.clone(),
                ready: p.ready,
            }),
            _ => None,
        })
    }) else {
        return;
    };
    let body = match serde_json::to_vec(&ReportedCauses {
        causes: causes.to_vec(),
    }) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(flow, error = %e, "cannot encode the flow's causes");
            return;
        }
    };
    let token = super::canary::flow_token(ctx, ns, flow);
    match ctx
        .workers
        .call(
            ns,
            &pod,
            http::Method::PUT,
            "/exceptions",
            token.as_deref(),
            Some(&body),
        )
        .await
    {
        Ok((200 | 204, _)) => {}
        Ok((status, body)) => tracing::warn!(
            namespace = ns,
            flow,
            pod = %pod.name,
            status,
            answer = %String::from_utf8_lossy(&body[..body.len().min(300)]),
            "the worker did not take the flow's causes; they are sent again on the next reconcile"
        ),
        Err(e) => tracing::warn!(
            namespace = ns,
            flow,
            pod = %pod.name,
            error = %e,
            "cannot report the flow's causes to a worker; they are sent again on the next reconcile"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ContractRevision, SyncContractStatus};
    use crate::controller::flow::status::{Observation, PodObservation};
    use crate::worker::api::WorkerStatus;

    fn contract(max_failure_rate: &str) -> SyncContract {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/salesforce-netsuite/contract.yaml"
        ))
        .expect("the example contract");
        let mut c: SyncContract = serde_yaml::from_str(&text).expect("a SyncContract");
        c.spec.sla = Some(
            serde_json::from_value(serde_json::json!({"maxFailureRate": max_failure_rate}))
                .expect("an SLA"),
        );
        c
    }

    fn observed(failure_rate_last_hour: &str) -> Observation {
        let w: WorkerStatus = serde_json::from_value(serde_json::json!({
            "flow": "f", "contractVersion": "1.0.0", "backend": "sqlite",
            "counters": {"received": 1000, "delivered": 900, "failed": 100, "retried": 0,
                         "deadLettered": 100, "held": 0},
            "pending": 0, "failureRate": "0.1", "failureRateLastHour": failure_rate_last_hour,
            "lastDeliveryTime": null, "mttrSeconds": null, "manualInterventionsPer1k": "0",
            "oldestPendingSeconds": null, "circuitBreaker": null, "paused": null
        }))
        .expect("a worker status");
        Observation::from_pods(
            vec![PodObservation {
                pod: "p-1".into(),
                ready: true,
                address: "10.0.0.1".into(),
                answer: PodAnswer::Running(Box::new(w)),
            }],
            None,
        )
    }

    #[test]
    fn an_sla_breach_is_a_flow_level_cause_and_clears_with_the_breach() {
        let c = contract("0.05");
        let causes = causes(Some(&observed("0.1")), Some(&c));
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].kind, ExceptionKind::FlowDegraded);
        assert_eq!(causes[0].class, Some(ErrorClass::FlowLevel));
        assert_eq!(causes[0].reason, "sla:FailureRateOverSla");
        assert!(causes[0].summary.contains("0.05"), "{causes:?}");
        assert!(super::causes(Some(&observed("0.01")), Some(&c)).is_empty());
        // No numbers yet: nothing to say.
        assert!(super::causes(None, Some(&c)).is_empty());
    }

    #[test]
    fn a_pod_that_does_not_answer_beside_one_that_does_is_a_cause() {
        let c = contract("1");
        let mut o = observed("0");
        assert!(causes(Some(&o), Some(&c)).is_empty());
        o.pods.push(PodObservation {
            pod: "p-2".into(),
            ready: false,
            address: "10.0.0.2".into(),
            answer: PodAnswer::Unreachable("connection refused".into()),
        });
        let got = causes(Some(&o), Some(&c));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].reason, "status:WorkersNotAnswering");
        assert!(got[0].summary.contains("1 of 2 worker pod(s)") && got[0].summary.contains("p-2"));
    }

    #[test]
    fn a_rejected_version_that_is_still_the_spec_is_a_contract_cause() {
        let mut c = contract("1");
        let version = c.spec.version.clone();
        let rejected = ContractRevision {
            version: version.clone(),
            state: RevisionState::Rejected,
            reason: Some("PreflightFailed".into()),
            message: Some("12 records newly rejected".into()),
            ..Default::default()
        };
        c.status = Some(SyncContractStatus {
            revisions: vec![rejected.clone()],
            ..Default::default()
        });
        let got = causes(None, Some(&c));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].kind, ExceptionKind::ContractRejected);
        assert_eq!(got[0].reason, format!("contract:PreflightFailed:{version}"));
        assert!(got[0].summary.contains("12 records newly rejected"));
        // The owners moved on to a new version: the rejection of the old one is no longer a cause.
        c.spec.version = "99.0.0".into();
        assert!(causes(None, Some(&c)).is_empty());
        // Every reason the controller sends is one the worker accepts as the controller's.
        assert!(got.iter().all(|c| {
            crate::tickets::CONTROLLER_REASON_PREFIXES
                .iter()
                .any(|p| c.reason.starts_with(p))
        }));
    }
}
