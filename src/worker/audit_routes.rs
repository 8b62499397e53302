//! The reconciliation audit on the operations API: `POST /audit/runs` starts a run (or joins the running
//! one), `GET /audit/runs/{id}` tells how far it got and its result, `GET /audit/last` the last finished
//! one. All need the flow's token, as `/status` does. The run itself is driven here, in the worker, by
//! [`AuditService`]: the worker has the flow's credentials, ledger, ticket outbox and rate limits, and
//! `meshline audit` (the controller's CronJob) only asks and waits.
//!
//! A run left behind by a worker that died is picked up again by the next request that asks about it
//! (`POST` or `GET`), once its lease has lapsed: the ledger keeps the cursors, so it resumes where it was.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::api::{ApiState, authorise, error};
use crate::audit::run::{AuditError, AuditQueries, AuditSettings, Auditor, result_of};
use crate::ledger::{AuditRun, AuditRunState, Clock, Ledger, SystemClock};

/// The longest window a request may ask for (a year and a day).
pub const MAX_WINDOW_HOURS: u32 = 8784;

/// Runs audits of one flow in the background of the worker.
pub struct AuditService {
    ledger: Arc<dyn Ledger>,
    /// The read clients, or why the flow's systems cannot be read.
    queries: Result<AuditQueries, String>,
    settings: AuditSettings,
    window: Duration,
    clock: Arc<dyn Clock>,
    /// Runs this process is driving now, so a second request does not drive one twice.
    driving: Mutex<HashSet<i64>>,
}

/// Why a run could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("flow {flow}: the audit cannot read this flow's systems: {reason}")]
    NotConfigured { flow: String, reason: String },
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl AuditService {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        queries: Result<AuditQueries, String>,
        settings: AuditSettings,
        window: Duration,
    ) -> AuditService {
        AuditService {
            ledger,
            queries,
            settings,
            window,
            clock: Arc::new(SystemClock),
            driving: Mutex::new(HashSet::new()),
        }
    }

    /// Uses `clock` for windows and the result's times (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> AuditService {
        self.clock = clock;
        self
    }

    fn auditor(&self) -> Option<Auditor> {
        let q = self.queries.as_ref().ok()?;
        Some(Auditor {
            ledger: self.ledger.clone(),
            crm: q.crm.clone(),
            erp: q.erp.clone(),
            clock: self.clock.clone(),
            settings: self.settings.clone(),
        })
    }

    /// Starts a run over the last `window` (the configured one by default), or joins the running one, and
    /// drives it in the background. Returns its id.
    pub async fn start(self: &Arc<Self>, window: Option<Duration>) -> Result<i64, StartError> {
        let auditor = self.auditor().ok_or_else(|| StartError::NotConfigured {
            flow: self.ledger.flow().to_string(),
            reason: self.queries.as_ref().err().cloned().unwrap_or_default(),
        })?;
        let now = chrono::DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_default();
        let window = crate::audit::run::window_ending(now, window.unwrap_or(self.window));
        let (id, _) = auditor.start(window).await?;
        self.drive_in_background(id);
        Ok(id)
    }

    /// Drives run `id` on a task of its own unless this process already is; a run another replica holds is
    /// left to it (the drive answers `Busy` at once).
    pub fn drive_in_background(self: &Arc<Self>, id: i64) {
        let Some(auditor) = self.auditor() else {
            return;
        };
        if !self
            .driving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
        {
            return;
        }
        let service = self.clone();
        tokio::spawn(async move {
            let flow = auditor.ledger.flow().to_string();
            match auditor.drive(id).await {
                Ok(status) => {
                    tracing::info!(flow = %flow, run = id, outcome = ?status.outcome, unexplained = status.unexplained, "audit finished")
                }
                Err(e @ (AuditError::Busy { .. } | AuditError::Finished { .. })) => {
                    tracing::debug!(flow = %flow, run = id, "{e}")
                }
                Err(e) => {
                    tracing::warn!(flow = %flow, run = id, error = %e, label = e.label(), "audit stopped; a later request resumes it")
                }
            }
            service
                .driving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// Run `id` as the ledger has it; a running one nobody drives (its lease lapsed) is resumed here.
    pub async fn run(
        self: &Arc<Self>,
        id: i64,
    ) -> Result<Option<AuditRun>, crate::ledger::LedgerError> {
        let run = self.ledger.audit_run(id).await?;
        if let Some(r) = &run
            && r.state == AuditRunState::Running
            && r.lease_until
                .is_none_or(|until| until <= self.clock.now_ms())
        {
            self.drive_in_background(id);
        }
        Ok(run)
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }
}

/// `POST /audit/runs`'s optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartRequest {
    pub window_hours: Option<u32>,
}

/// One side's progress, as `GET /audit/runs/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SideProgressView {
    pub pages: i64,
    pub orders: i64,
    pub done: bool,
}

/// A run, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditRunView {
    pub run: i64,
    /// `running` or `finished`.
    pub state: String,
    pub crm: SideProgressView,
    pub erp: SideProgressView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<crate::api::FlowAuditStatus>,
}

impl AuditRunView {
    pub fn of(run: &AuditRun) -> AuditRunView {
        let side = |p: &crate::ledger::AuditSideProgress| SideProgressView {
            pages: p.pages,
            orders: p.orders,
            done: p.done,
        };
        AuditRunView {
            run: run.id,
            state: run.state.label().to_string(),
            crm: side(&run.crm),
            erp: side(&run.erp),
            result: result_of(run),
        }
    }
}

pub(crate) async fn start(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorise(&state, &headers) {
        return r.response();
    }
    let request: StartRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StartRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "POST /audit/runs: body: {e} (expected {{\"windowHours\": N}} or nothing)"
                    ),
                );
            }
        }
    };
    if let Some(h) = request.window_hours
        && !(1..=MAX_WINDOW_HOURS).contains(&h)
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("POST /audit/runs: windowHours: {h} is outside 1..={MAX_WINDOW_HOURS}"),
        );
    }
    let window = request
        .window_hours
        .map(|h| Duration::from_secs(u64::from(h) * 3600));
    match state.audit.start(window).await {
        Ok(id) => (StatusCode::ACCEPTED, axum::Json(json!({ "run": id }))).into_response(),
        Err(e @ StartError::NotConfigured { .. }) => {
            error(StatusCode::NOT_IMPLEMENTED, e.to_string())
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

pub(crate) async fn get_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorise(&state, &headers) {
        return r.response();
    }
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("GET /audit/runs/{{id}}: id {id:?} is not a run number"),
        );
    };
    match state.audit.run(id).await {
        Ok(Some(run)) => axum::Json(AuditRunView::of(&run)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!(
                "flow {}: audit run {id} is not in the ledger",
                state.pipeline.flow
            ),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

pub(crate) async fn last(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&state, &headers) {
        return r.response();
    }
    match state.audit.ledger().audit_last().await {
        Ok(Some(run)) => axum::Json(AuditRunView::of(&run)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("flow {}: no audit has finished yet", state.pipeline.flow),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Sets the audit gauges from the last finished run before a scrape (a ledger that does not answer leaves
/// them as they were).
pub(crate) async fn refresh_gauges(state: &ApiState) {
    let Ok(Some(run)) = state.pipeline.ledger.audit_last().await else {
        return;
    };
    let Some(result) = result_of(&run) else {
        return;
    };
    let g = &state.pipeline.metrics.audit;
    let finished = run.finished_at.unwrap_or(run.started_at);
    g.last_run_timestamp_seconds.set(finished / 1000);
    g.unexplained_differences.set(result.unexplained);
    for label in crate::audit::explain::Explanation::LABELS {
        g.explained_differences
            .get_or_create(&super::metrics::ExplanationLabel {
                explanation: label.to_string(),
            })
            .set(result.explained.get(label).copied().unwrap_or(0));
    }
    for (side, count) in [("crm", result.crm.count), ("erp", result.erp.count)] {
        g.orders
            .get_or_create(&super::metrics::SideLabel { side: side.into() })
            .set(count);
    }
    g.partial.set(i64::from(
        result.outcome == Some(crate::api::AuditOutcome::Partial),
    ));
    g.duration_seconds
        .set((finished - run.started_at).max(0) as f64 / 1000.0);
}
