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
