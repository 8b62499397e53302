//! The operations API's ticket routes (issue #16), all behind the flow's token like the rest of it:
//! - `GET /tickets?all=true&limit=N`: the flow's tickets as the sinks see them (open ones by default);
//! - `POST /tickets/{fingerprint}/acknowledge` (optional body `{"by": OWNER}`): a named owner takes a
//!   ticket, which stops its escalation and starts its time to resolve; the person is established as for
//!   approvals (`X-Meshline-Identity`, and a `by` naming someone else is refused);
//! - `PUT /exceptions`: the controller's set of flow-level causes (SLA breaches, a rejected contract
//!   version); each becomes a ticket, and an open one the set no longer names is resolved.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiState, authorise, error, person};
use crate::ledger::{LedgerError, RaisedException, TicketRecord};
use crate::tickets::{
    CONTROLLER_REASON_PREFIXES, ExceptionKind, MAX_REPORTED_CAUSES, ReportedCauses, Ticket,
    TicketState, dispatch,
};

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    all: bool,
    limit: Option<usize>,
}

fn ledger_error(e: LedgerError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn rendered(state: &ApiState, t: &TicketRecord) -> Ticket {
    dispatch::render(
        &state.flow_namespace,
        &state.pipeline.flow,
        state.roster.as_deref(),
        t,
    )
}

pub async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = authorise(&state, &headers) {
        return r.response();
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match state.pipeline.ledger.tickets(!q.all, limit).await {
        Ok(ts) => Json(ts.iter().map(|t| rendered(&state, t)).collect::<Vec<_>>()).into_response(),
        Err(e) => ledger_error(e),
    }
}

/// Finds a ticket by the fingerprint people see (the namespaced one the sinks carry).
async fn find(state: &ApiState, fingerprint: &str) -> Result<Option<TicketRecord>, LedgerError> {
    Ok(state
        .pipeline
        .ledger
        .tickets(false, crate::ledger::MAX_TICKETS_PER_READ)
        .await?
        .into_iter()
        .find(|t| rendered(state, t).fingerprint == fingerprint || t.fingerprint == fingerprint))
}

/// The optional body of an acknowledgement: who the person means to be. As for approvals, the identity
/// token decides who acts; a `by` naming someone else is refused rather than silently corrected.
#[derive(Debug, Default, Deserialize)]
struct Acknowledgement {
    #[serde(default)]
    by: Option<String>,
}

pub async fn acknowledge(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(fingerprint): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorise(&state, &headers) {
        return r.response();
    }
    let claimed: Acknowledgement = if body.iter().all(u8::is_ascii_whitespace) {
        Acknowledgement::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
        }
    };
    let identified = person(&state, &headers).and_then(|owner| match claimed.by {
        Some(by) if by != owner.id => Err(super::api::IdentityRefusal::ByMismatch {
            owner: owner.id,
            by,
        }),
        _ => Ok(owner),
    });
    let owner = match identified {
        Ok(o) => o,
        Err(refusal) => {
            tracing::warn!(
                flow = %state.pipeline.flow,
                ticket = %fingerprint,
                refusal = refusal.label(),
                "ticket acknowledgement refused"
            );
            state
                .pipeline
                .metrics
                .approvals_refused
                .get_or_create(&super::metrics::RefusalLabel {
                    reason: refusal.label().into(),
                })
                .inc();
            return (
                StatusCode::FORBIDDEN,
                Json(json!({"error": refusal.message(), "reason": refusal.label()})),
            )
                .into_response();
        }
    };
    let ticket = match find(&state, &fingerprint).await {
        Ok(Some(t)) => t,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no ticket {fingerprint}")),
        Err(e) => return ledger_error(e),
    };
    if ticket.state == TicketState::Resolved {
        return error(
            StatusCode::CONFLICT,
            format!("ticket {fingerprint} is resolved; nothing to acknowledge"),
        );
    }
    match state
        .pipeline
        .ledger
        .acknowledge_ticket(&ticket.fingerprint, &owner.id)
        .await
    {
        Ok(changed) => {
            tracing::info!(flow = %state.pipeline.flow, ticket = %fingerprint, owner = %owner.id, "ticket acknowledged");
            Json(json!({"ticket": fingerprint, "acknowledgedBy": owner.id, "changed": changed}))
                .into_response()
        }
        Err(e) => ledger_error(e),
    }
}

pub async fn report_causes(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorise(&state, &headers) {
        return r.response();
    }
    // The error names the field's path (`causes[0].kind`), so the controller's log says what to fix.
    let mut body = serde_json::Deserializer::from_slice(&body);
    let causes: ReportedCauses = match serde_path_to_error::deserialize(&mut body) {
        Ok(c) => c,
        Err(e) => {
            let path = e.path().to_string();
            let at = if path == "." {
                "body".to_string()
            } else {
                path
            };
            return error(StatusCode::BAD_REQUEST, format!("{at}: {}", e.inner()));
        }
    };
    if let Err(e) = body.end() {
        return error(StatusCode::BAD_REQUEST, format!("body: {e}"));
    }
    if causes.causes.len() > MAX_REPORTED_CAUSES {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "causes: {} given, at most {MAX_REPORTED_CAUSES}",
                causes.causes.len()
            ),
        );
    }
    for (i, c) in causes.causes.iter().enumerate() {
        // Dead letters and holds are the records' own tickets, opened and cleared by the ledger.
        if matches!(c.kind, ExceptionKind::DeadLetter | ExceptionKind::Hold) {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "causes[{i}].kind: {} is raised by the records themselves, not reported",
                    c.kind.label()
                ),
            );
        }
        if !CONTROLLER_REASON_PREFIXES
            .iter()
            .any(|p| c.reason.starts_with(p))
            || c.reason.len() > 256
            || c.summary.len() > 4096
        {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "causes[{i}].reason: must start with one of {CONTROLLER_REASON_PREFIXES:?} and be at most \
                     256 bytes (summary at most 4096)"
                ),
            );
        }
    }
    let ledger = &state.pipeline.ledger;
    let open = match ledger
        .tickets(true, crate::ledger::MAX_TICKETS_PER_READ)
        .await
    {
        Ok(t) => t,
        Err(e) => return ledger_error(e),
    };
    let mut raised = 0;
    for c in &causes.causes {
        // Raised once while it lasts: a cause already open is not counted again at every report.
        if open
            .iter()
            .any(|t| t.kind == c.kind && t.class == c.class && t.reason == c.reason)
        {
            continue;
        }
        if let Err(e) = ledger
            .raise_exception(RaisedException {
                kind: c.kind,
                class: c.class,
                reason: c.reason.clone(),
                rule: None,
                summary: c.summary.clone(),
            })
            .await
        {
            return ledger_error(e);
        }
        raised += 1;
    }
    let mut cleared = 0;
    for t in open.iter().filter(|t| {
        // Only the kinds the controller reports: a dead letter's reason can start with `contract:` too
        // (`contract:rule_failed:rule:…`), and its ticket clears when its records do, not here.
        matches!(
            t.kind,
            ExceptionKind::FlowDegraded | ExceptionKind::ContractRejected
        ) && CONTROLLER_REASON_PREFIXES
            .iter()
            .any(|p| t.reason.starts_with(p))
            && !causes
                .causes
                .iter()
                .any(|c| c.kind == t.kind && c.class == t.class && c.reason == t.reason)
    }) {
        match ledger.clear_exception(&t.fingerprint).await {
            Ok(true) => cleared += 1,
            Ok(false) => {}
            Err(e) => return ledger_error(e),
        }
    }
    Json(json!({"raised": raised, "cleared": cleared})).into_response()
}
