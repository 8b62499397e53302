//! The worker's two HTTP faces. The webhook port (the one an Ingress exposes) serves the source's webhook route
//! and health, nothing else. The operations port (cluster-internal) serves health, metrics, the status the
//! controller copies into the flow, one record's whole story, the dead letters and the holds, and the
//! interventions on them. Every read and write of records, dead letters, holds and status needs the flow's
//! token (`Authorization: Bearer`, or [`TOKEN_HEADER`] through the API server's pod proxy, which keeps
//! `Authorization` for itself); health and `/metrics` stay open so probes and Prometheus need no secret. Every
//! payload that leaves here for people goes through the contract's redaction.
//!
//! Approving or rejecting a held record also needs a person: the flow's token is a machine credential, so
//! the decision is made by the roster owner whose personal token is in `X-Meshline-Identity` (see
//! [`super::identity`]), and only if they hold the record's approver role. Every refusal is answered 403,
//! logged, counted and written into the record's lineage.
//!
//! One route is not for people: `GET /records/recent?limit=N` streams the newest records' source payloads
//! as they are stored (NDJSON, one [`crate::ledger::ReplayRecord`] a line, newest first, at most
//! [`crate::ledger::MAX_REPLAY_RECORDS`]) to a preflight replay Job (`meshline replay --from-worker`). That is
//! how the Job reads an embedded (SQLite) ledger, whose volume this pod holds (ReadWriteOnce): over the
//! cluster network, with the flow's token. The payloads are unredacted because the replay must evaluate the
//! real values; the Job keeps them in memory and its report carries only counts and redacted examples.
//!
//! Two routes serve a canary rollout's controller (issue #15): `GET /rollout/measures` answers what one
//! contract revision's workers did over a window, read from the shared ledger (aggregate counts, no
//! payloads), and `POST /rollout/release?ownerPrefix=` gives back the leases of workers that are gone (the
//! canary's pods), so their records need not wait for the leases to expire. Both need the flow's token, as
//! `/status` does.
//!
//! The reconciliation audit's routes (`/audit/runs`, `/audit/runs/{id}`, `/audit/last`) are in
//! [`super::audit_routes`].

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::pipeline::Pipeline;
use crate::ledger::{HeldAsSeen, RecordId, RecordState, RecordView};

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub pipeline: Arc<Pipeline>,
    /// The flow's namespace and roster, for the ticket routes (their owners and the commands in a ticket).
    pub flow_namespace: Arc<str>,
    pub roster: Option<Arc<crate::api::OwnershipRoster>>,
    /// The flow's token, needed by everything but health and metrics; `None` refuses all of it.
    pub token: Option<Arc<str>>,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The reconciliation audit this worker runs (see [`super::audit_routes`]).
    pub audit: Arc<super::audit_routes::AuditService>,
}

/// The JSON on `/status`: what the controller writes into `SyncFlow.status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub flow: String,
    pub contract_version: String,
    pub backend: String,
    pub counters: crate::api::FlowCounters,
    pub pending: u64,
    /// Records that failed at least once over the records in the ledger, all time, as a decimal fraction
    /// string.
    pub failure_rate: String,
    /// Records that failed for the first time in the last hour over record versions received in it (at
    /// most 1), as a decimal fraction string: what the SLA's `maxFailureRate` is checked against, so an
    /// outage stops counting an hour after it ends. `None` from a worker that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate_last_hour: Option<String>,
    /// Record versions received in the last hour.
    #[serde(default)]
    pub received_last_hour: u64,
    /// Records that failed for the first time in the last hour.
    #[serde(default)]
    pub failed_last_hour: u64,
    /// Dead letters purged after `deadLetterRetention`, all time.
    #[serde(default)]
    pub dead_letters_purged: u64,
    /// Delivered records reduced to their compact row after the delivered retention, all time.
    #[serde(default)]
    pub payloads_purged: u64,
    pub last_delivery_time: Option<String>,
    pub mttr_seconds: Option<i64>,
    pub manual_interventions_per_1k: String,
    pub oldest_pending_seconds: Option<i64>,
    pub circuit_breaker: Option<BreakerStatus>,
    /// Why the flow processes nothing right now (e.g. a lookup that never loaded), if it doesn't.
    pub paused: Option<String>,
    /// What keeps this worker from doing all of its work (a full volume, an unreachable ledger, credentials
    /// it cannot read); the controller names each in a condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<WorkerProblem>,
    /// A polled source's API allowance (Salesforce's `Sforce-Limit-Info`) and whether the poll is slowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_api: Option<crate::connectors::sources::salesforce::SourceApiStatus>,
    /// The contract revision this worker runs and the outcomes it writes are attributed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The track (`stable` or `canary`) and the rollout split this worker applies right now; the controller
    /// waits until every pod of both tracks applies a step's weight before it measures the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<AppliedSplit>,
    /// The flow's tickets from the ledger: open ones, per-owner times, failing ticket sinks (issue #16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tickets: Option<crate::api::TicketSummary>,
    /// The last finished reconciliation audit (issue #17), what the controller writes into `status.audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::api::FlowAuditStatus>,
}

/// The rollout split one worker applies (see [`crate::rollout::split`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedSplit {
    pub track: crate::rollout::split::Track,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    pub weight: u8,
    /// The buckets it claims, as ranges (`25-99`).
    pub buckets: String,
    /// Why the split file could not be applied (the worker then keeps the split it had), if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Something that keeps the worker from doing its work. A worker that could not start its pipeline at all
/// answers `/status` with 503 and `{"error": "...", "problems": [...]}`; a running one lists them in
/// [`WorkerStatus::problems`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerProblem {
    /// A stable label, also the condition reason: `DiskPressure`, `LedgerUnavailable`,
    /// `CredentialsInvalid`, `StartupFailed`.
    pub kind: String,
    /// What is wrong and what the worker is doing about it (no PII, no secret values).
    pub message: String,
    /// RFC 3339 time the problem was first seen.
    pub since: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStatus {
    pub reason: String,
    pub since: String,
}

/// The header that carries the flow's token when `Authorization` is taken (the API server's pod proxy
/// authenticates the controller with it and does not pass it on). The controller's proxy poll sends this one.
pub const TOKEN_HEADER: &str = "x-meshline-token";

/// The webhook port's routes besides the source's own: health only (the kubelet's probes). The caller merges
/// the webhook route in.
pub fn webhook_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The operations port's routes.
pub fn ops_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/records/recent", get(recent_records))
        .route("/records/{id}", get(record))
        .route("/records/{id}/approve", post(approve))
        .route("/records/{id}/reject", post(reject))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/replay", post(replay_by_reason))
        .route("/dead-letters/{id}/replay", post(replay_one))
        .route("/holds", get(holds))
        .route("/tickets", get(super::ticket_routes::list))
        .route(
            "/tickets/{fingerprint}/acknowledge",
            post(super::ticket_routes::acknowledge),
        )
        .route("/exceptions", put(super::ticket_routes::report_causes))
        .route("/rollout/measures", get(rollout_measures))
        .route("/rollout/release", post(rollout_release))
        .route("/audit/runs", post(super::audit_routes::start))
        .route("/audit/runs/{id}", get(super::audit_routes::get_run))
        .route("/audit/last", get(super::audit_routes::last))
        .with_state(state)
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Why a request did not prove it holds the flow's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The worker was started without a token file: nothing behind the token is served to anyone.
    NoToken,
    /// No token, or the wrong one.
    Unauthorised,
}

impl Refusal {
    pub fn response(self) -> Response {
        match self {
            Refusal::NoToken => error(
                StatusCode::FORBIDDEN,
                "the operations API is closed: the worker has no token file",
            ),
            Refusal::Unauthorised => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "the flow's token is required (Authorization: Bearer <token>)",
                );
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
                r
            }
        }
    }
}

/// Checks the token a request carries against the flow's: `Authorization: Bearer`, else [`TOKEN_HEADER`].
pub fn check_token(token: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(token) = token else {
        return Err(Refusal::NoToken);
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()))
        .unwrap_or_default()
        .trim();
    // Constant-time comparison, so the token cannot be guessed byte by byte from response times.
    let equal = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if equal && !token.is_empty() {
        Ok(())
    } else {
        Err(Refusal::Unauthorised)
    }
}

/// The flow's token check, as the other route modules need it.
pub(crate) fn authorise(state: &ApiState, headers: &HeaderMap) -> Result<(), Refusal> {
    check_token(state.token.as_deref(), headers)
}

fn authorised(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    check_token(state.token.as_deref(), headers)
        .err()
        .map(Refusal::response)
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if !state.ready.load(std::sync::atomic::Ordering::Relaxed) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match state.pipeline.ledger.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ledger unavailable: {e}"),
        ),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    if let Ok((pending, oldest)) = state.pipeline.ledger.backlog().await {
        let m = &state.pipeline.metrics;
        m.queue_depth
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        let age_ms = oldest.map_or(0, |at| (chrono::Utc::now().timestamp_millis() - at).max(0));
        m.oldest_pending_seconds.set(age_ms / 1000);
    }
    refresh_operating_measures(&state).await;
    refresh_ticket_gauges(&state).await;
    super::audit_routes::refresh_gauges(&state).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.pipeline.metrics.encode(),
    )
        .into_response()
}

/// Sets the operating model's gauges from the ledger's counts before a scrape (the read `/status` makes, so
/// the two never disagree). A ledger that does not answer leaves them as they were.
async fn refresh_operating_measures(state: &ApiState) {
    let pipeline = &state.pipeline;
    let m = &pipeline.metrics.measures;
    if let Some(sla) = pipeline.contract.sla() {
        if let Some(rate) = sla
            .max_failure_rate
            .as_deref()
            .and_then(|r| r.parse::<f64>().ok())
        {
            m.sla_max_failure_rate.set(rate);
        }
        if let Some(latency) = &sla.max_delivery_latency {
            m.sla_max_delivery_latency_seconds
                .set(std::time::Duration::from(*latency).as_secs_f64());
        }
    }
    let Ok(c) = pipeline.ledger.counts().await else {
        return;
    };
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    m.records.set(to_i64(c.records));
    m.manual_interventions.set(to_i64(c.manual_interventions));
    m.manual_interventions_per_1k.set(c.interventions_per_1000);
    if let Some(s) = c.mttr_seconds {
        m.record_mttr_seconds.set(s);
    }
    m.received_sla_window.set(to_i64(c.received_last_hour));
    m.failed_sla_window.set(to_i64(c.failed_last_hour));
    m.failure_rate_sla_window.set(failure_rate_in_window(
        c.failed_last_hour,
        c.received_last_hour,
    ));
}

/// Failed over received in the SLA's window, at most 1: a failure counted in a minute whose receipt is older
/// (a retry an hour on) can make failures exceed receipts, and failures with no receipts at all are a rate
/// of 1, not a division by zero.
pub fn failure_rate_in_window(failed: u64, received: u64) -> f64 {
    if received == 0 {
        return f64::from(u8::from(failed > 0));
    }
    (failed as f64 / received as f64).min(1.0)
}

/// Sets the ticket gauges from the ledger before a scrape. A ledger that does not answer leaves them as they
/// were (the scrape still answers).
async fn refresh_ticket_gauges(state: &ApiState) {
    let ledger = &state.pipeline.ledger;
    let g = &state.pipeline.metrics.tickets;
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if let Ok(open) = ledger
        .tickets(true, crate::ledger::MAX_TICKETS_PER_READ)
        .await
    {
        for kind in crate::tickets::ExceptionKind::ALL {
            let n = open.iter().filter(|t| t.kind == kind).count() as u64;
            g.open
                .get_or_create(&super::metrics::TicketKindLabel {
                    kind: kind.label().into(),
                })
                .set(to_i64(n));
        }
    }
    if let Ok(whole) = ledger.ticket_flow_measures().await {
        g.flow_opened.set(to_i64(whole.opened));
        g.flow_resolved.set(to_i64(whole.resolved));
        if let Some(s) = whole.mean_time_to_acknowledge_seconds {
            g.flow_time_to_acknowledge.set(s);
        }
        if let Some(s) = whole.mean_time_to_resolve_seconds {
            g.flow_time_to_resolve.set(s);
        }
    }
    if let Ok(measures) = ledger.ticket_measures().await {
        for m in measures.iter().filter(|m| !m.owner.is_empty()) {
            let owner = super::metrics::OwnerLabel {
                owner: m.owner.clone(),
            };
            g.opened.get_or_create(&owner).set(to_i64(m.opened));
            g.resolved.get_or_create(&owner).set(to_i64(m.resolved));
            if let Some(s) = m.mean_time_to_acknowledge_seconds {
                g.time_to_acknowledge.get_or_create(&owner).set(s);
            }
            if let Some(s) = m.mean_time_to_resolve_seconds {
                g.time_to_resolve.get_or_create(&owner).set(s);
            }
        }
    }
    if let Ok(health) = ledger.ticket_sink_health().await {
        for h in &health {
            let sink = super::metrics::TicketSinkLabel {
                sink: h.sink.clone(),
            };
            g.sink_pending.get_or_create(&sink).set(to_i64(h.pending));
            g.sink_failing
                .get_or_create(&sink)
                .set(i64::from(crate::tickets::dispatch::failing(h)));
        }
    }
}

/// Computes the status from the ledger (so it survives restarts and agrees across replicas).
pub async fn compute_status(
    pipeline: &Pipeline,
) -> Result<WorkerStatus, crate::ledger::LedgerError> {
    let c = pipeline.ledger.counts().await?;
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    // The share of records that failed at least once (the contract's SLA `maxFailureRate` compares to it).
    let failure_rate = if c.records == 0 {
        rust_decimal::Decimal::ZERO
    } else {
        (rust_decimal::Decimal::from(c.failed) / rust_decimal::Decimal::from(c.records))
            .min(rust_decimal::Decimal::ONE)
    };
    // Over the window: a failure counted in a minute whose receipt is older (a retry an hour on) can make
    // failures exceed receipts, hence the cap.
    let failure_rate_last_hour = if c.received_last_hour == 0 {
        rust_decimal::Decimal::from(u64::from(c.failed_last_hour > 0))
    } else {
        (rust_decimal::Decimal::from(c.failed_last_hour)
            / rust_decimal::Decimal::from(c.received_last_hour))
        .min(rust_decimal::Decimal::ONE)
    };
    let per_1k = if c.records == 0 {
        rust_decimal::Decimal::ZERO
    } else {
        rust_decimal::Decimal::from(c.manual_interventions * 1000)
            / rust_decimal::Decimal::from(c.records)
    };
    Ok(WorkerStatus {
        flow: pipeline.flow.clone(),
        contract_version: pipeline.contract.version().to_string(),
        backend: pipeline.ledger.backend().to_string(),
        counters: crate::api::FlowCounters {
            received: to_i64(c.received),
            delivered: to_i64(c.delivered),
            failed: to_i64(c.failed),
            retried: to_i64(c.retried),
            dead_lettered: to_i64(c.dead_lettered),
            held: to_i64(c.held),
            stale: to_i64(c.stale),
        },
        pending: c.pending,
        failure_rate: failure_rate.round_dp(4).normalize().to_string(),
        failure_rate_last_hour: Some(failure_rate_last_hour.round_dp(4).normalize().to_string()),
        received_last_hour: c.received_last_hour,
        failed_last_hour: c.failed_last_hour,
        dead_letters_purged: c.dead_letters_purged,
        payloads_purged: c.payloads_purged,
        last_delivery_time: c
            .last_delivery_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        mttr_seconds: c.mttr_seconds.map(|s| s.round() as i64),
        manual_interventions_per_1k: per_1k.round_dp(2).normalize().to_string(),
        oldest_pending_seconds: c.oldest_pending_age_seconds.map(|s| s as i64),
        circuit_breaker: pipeline.breaker.state().map(|o| BreakerStatus {
            reason: o.reason,
            since: o.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
        paused: pipeline.gated(),
        problems: {
            // Read the volume again if the cached reading is stale, so a problem that went away clears.
            let _ = pipeline.intake_pressure();
            match pipeline.sink.credentials_problem() {
                Some(why) => pipeline.problems.set(
                    super::problems::CREDENTIALS_INVALID,
                    format!("the sink's rotated Secret cannot be used (the previous credentials stay in use): {why}"),
                ),
                None => {
                    pipeline.problems.clear(super::problems::CREDENTIALS_INVALID);
                }
            }
            // Read again here too, so a fixed (or newly broken) identity Secret shows without an approval.
            match pipeline.identities.current().as_ref() {
                Err(why) => pipeline
                    .problems
                    .set(super::problems::IDENTITIES_INVALID, why.clone()),
                Ok(_) => {
                    pipeline.problems.clear(super::problems::IDENTITIES_INVALID);
                }
            }
            match pipeline.source_api.get().filter(|s| s.slowed) {
                Some(slowed) => pipeline
                    .problems
                    .set(super::problems::SOURCE_API_LIMIT, slowed.describe()),
                None => {
                    pipeline.problems.clear(super::problems::SOURCE_API_LIMIT);
                }
            }
            pipeline.problems.list()
        },
        source_api: pipeline.source_api.get(),
        revision: Some(pipeline.track.revision().to_string()),
        rollout: pipeline.track.applied(),
        tickets: None,
        audit: None,
    })
}

async fn status(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    match compute_status(&state.pipeline).await {
        Ok(mut s) => {
            // The tickets are a second reading of the ledger; a failure there leaves them out rather than
            // failing the numbers the controller needs most.
            match crate::tickets::dispatch::read_summary(
                &state.flow_namespace,
                &state.pipeline.flow,
                state.pipeline.ledger.as_ref(),
            )
            .await
            {
                Ok(t) => s.tickets = Some(t),
                Err(e) => {
                    tracing::warn!(flow = %state.pipeline.flow, error = %e, "cannot read the tickets for /status")
                }
            }
            // Likewise the last audit: a read failure leaves it out.
            match state.pipeline.ledger.audit_last().await {
                Ok(run) => s.audit = run.as_ref().and_then(crate::audit::run::result_of),
                Err(e) => {
                    tracing::warn!(flow = %state.pipeline.flow, error = %e, "cannot read the last audit for /status")
                }
            }
            Json(s).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ledger unavailable: {e}"),
        ),
    }
}

/// A record as people see it: the payload redacted by the contract's one redaction function.
fn redacted_view(pipeline: &Pipeline, view: &RecordView) -> Value {
    let mut v = serde_json::to_value(view).unwrap_or(Value::Null);
    let bytes = serde_json::to_vec(&view.payload).unwrap_or_default();
    v["payload"] = pipeline.contract.snapshot(&bytes);
    v
}

async fn record(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    match state.pipeline.ledger.get(RecordId(id)).await {
        Ok(Some(detail)) => {
            let mut v = serde_json::to_value(&detail).unwrap_or(Value::Null);
            v["record"] = redacted_view(&state.pipeline, &detail.record);
            Json(v).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!(
                "record {id} is not in the ledger of flow {}",
                state.pipeline.flow
            ),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
pub struct RecentQuery {
    limit: Option<String>,
}

/// The newest records' source payloads as NDJSON, for a preflight replay (see the module doc).
async fn recent_records(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<RecentQuery>,
) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    let max = crate::ledger::MAX_REPLAY_RECORDS;
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => 1000,
        Some(Ok(n)) if (1..=max).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "limit: {:?} is not a number of records from 1 to {max}",
                    q.limit.unwrap_or_default()
                ),
            );
        }
    };
    match state.pipeline.ledger.recent_inputs(limit).await {
        Ok(records) => {
            // One line per record, serialised as the body is sent rather than into one large buffer.
            let lines = futures::stream::iter(records.into_iter().map(|r| {
                let mut line = serde_json::to_vec(&r).unwrap_or_default();
                line.push(b'\n');
                Ok::<_, std::convert::Infallible>(line)
            }));
            (
                [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                axum::body::Body::from_stream(lines),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A decimal fraction rounded to 4 places, the way `/status` writes its rates; "0" over nothing.
fn rate(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0".to_string();
    }
    (rust_decimal::Decimal::from(part) / rust_decimal::Decimal::from(whole))
        .round_dp(4)
        .normalize()
        .to_string()
}

impl From<&crate::ledger::RevisionMeasures> for crate::api::TrackMeasures {
    fn from(m: &crate::ledger::RevisionMeasures) -> Self {
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        crate::api::TrackMeasures {
            records: to_i64(m.records),
            delivered: to_i64(m.delivered),
            failed: to_i64(m.failed),
            dead_lettered: to_i64(m.dead_lettered),
            held: to_i64(m.held),
            failure_rate: rate(m.failed, m.records),
            dead_letter_rate: rate(m.dead_lettered, m.records),
            p99_ms: m.p99_ms,
        }
    }
}

/// A time parameter in milliseconds since the Unix epoch; the error (a 400's message) names the parameter.
fn millis_param(
    q: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    let Some(text) = q.get(name) else {
        return Ok(None);
    };
    text.parse::<i64>()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(Some)
        .ok_or_else(|| {
            format!("{name}: {text:?} is not a time in milliseconds since the Unix epoch")
        })
}

/// `GET /rollout/measures?revision=&since=&until=`: what `revision`'s workers did in `[since, until)`
/// (milliseconds since the epoch; `until` defaults to now), as the canary analysis reads it.
async fn rollout_measures(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    let revision = match q.get("revision").map(String::as_str) {
        Some(r) if !r.is_empty() => r,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "revision: the revision whose measures to read is required",
            );
        }
    };
    let since = match millis_param(&q, "since") {
        Ok(Some(t)) => t,
        Ok(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "since: the window's start (milliseconds since the Unix epoch) is required",
            );
        }
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let until = match millis_param(&q, "until") {
        Ok(t) => t.unwrap_or_else(chrono::Utc::now),
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    if until < since {
        return error(
            StatusCode::BAD_REQUEST,
            "until: the window's end comes before its start (since)",
        );
    }
    match state
        .pipeline
        .ledger
        .revision_measures(revision, since, until)
        .await
    {
        Ok(m) => Json(crate::api::TrackMeasures::from(&m)).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ledger unavailable: {e}"),
        ),
    }
}

/// `POST /rollout/release?ownerPrefix=`: gives back the leases of the workers whose ids start with the
/// prefix, and wakes the pipeline to claim their records.
async fn rollout_release(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    let prefix = match q.get("ownerPrefix").map(String::as_str) {
        Some(p) if !p.is_empty() => p,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "ownerPrefix: the worker id prefix whose leases to release is required (not empty)",
            );
        }
    };
    match state.pipeline.ledger.release_leases(prefix).await {
        Ok(released) => {
            state.pipeline.wake.notify_one();
            Json(json!({ "released": released })).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ledger unavailable: {e}"),
        ),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<i64>,
    limit: Option<usize>,
    /// Only dead letters with exactly this reason.
    reason: Option<String>,
}

async fn list(state: &ApiState, record_state: RecordState, q: ListQuery) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match state
        .pipeline
        .ledger
        .list(
            record_state,
            q.reason.as_deref(),
            q.after.map(RecordId),
            limit,
        )
        .await
    {
        Ok(views) => {
            let items: Vec<Value> = views
                .iter()
                .map(|v| redacted_view(&state.pipeline, v))
                .collect();
            let next = views.last().map(|v| v.id.0);
            Json(json!({ "items": items, "next": next })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn dead_letters(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    list(&state, RecordState::DeadLettered, q).await
}

async fn holds(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = authorised(&state, &headers) {
        return r;
    }
    list(&state, RecordState::Held, q).await
}

/// Who acts and why: recorded as a manual intervention.
#[derive(Debug, Deserialize)]
pub struct Intervention {
    /// Who acts; may be left out when the identity header names them.
    #[serde(default)]
    actor: String,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkReplay {
    dead_letter_reason: String,
    /// Who acts; may be left out when the identity header names them.
    #[serde(default)]
    actor: String,
    #[serde(default)]
    reason: String,
}

/// Who a manual intervention is by, after the flow's token. With a personal token in the identity header
/// (the operations page always sends one) it is the roster owner that token names, and a differing stated
/// `actor` is refused rather than recorded; without one it is the `actor` stated, which the flow's token
/// alone vouches for (the CLI's way, for whoever holds that token). An unknown token is refused, never
/// downgraded to the stated name.
fn actor_of(state: &ApiState, headers: &HeaderMap, stated: &str) -> Result<String, Box<Response>> {
    if let Some(refused) = authorised(state, headers) {
        return Err(Box::new(refused));
    }
    let stated = stated.trim();
    if headers.contains_key(super::identity::IDENTITY_HEADER) {
        let owner = person(state, headers).map_err(|refusal| {
            tracing::warn!(flow = %state.pipeline.flow, refusal = refusal.label(), "refused an intervention");
            Box::new(error(StatusCode::FORBIDDEN, refusal.message()))
        })?;
        if !stated.is_empty() && stated != owner.id {
            let refusal = IdentityRefusal::ByMismatch {
                owner: owner.id.clone(),
                by: stated.to_string(),
            };
            return Err(Box::new(error(StatusCode::FORBIDDEN, refusal.message())));
        }
        return Ok(owner.id);
    }
    if stated.is_empty() || stated.len() > 200 {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "actor: who acts is required (1 to 200 characters)",
        )));
    }
    Ok(stated.to_string())
}

fn ledger_error(e: crate::ledger::LedgerError) -> Response {
    use crate::ledger::LedgerError;
    let text = e.to_string();
    let status = if let LedgerError::HoldChanged { .. } | LedgerError::IllegalTransition { .. } = e
    {
        // The record moved on under the caller: its request was sound, the record is not what it was.
        StatusCode::CONFLICT
    } else if let LedgerError::NotFound { .. } | LedgerError::TicketNotFound { .. } = e {
        StatusCode::NOT_FOUND
    } else if text.contains("not found") || text.contains("no record") {
        StatusCode::NOT_FOUND
    } else if text.contains("state") || text.contains("transition") {
        StatusCode::CONFLICT
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    error(status, text)
}

/// A person's decision on a held record. Who decides is the owner their identity token names; `by` only
/// states who they mean to be (a mismatch is refused rather than silently corrected).
#[derive(Debug, Deserialize)]
pub struct Decision {
    /// The owner id the person acts as; `actor` is its older name.
    #[serde(default, alias = "actor")]
    by: Option<String>,
    /// Why (required): recorded with the decision in the lineage and the interventions.
    #[serde(default)]
    reason: String,
    /// The hold as the person saw it (the operations page sends it): a decision on a record that has since
    /// become another generation, or waits for another role, is refused (409) instead of applied to what
    /// they never saw. Without it the worker decides on the hold it reads now (the CLI's behaviour).
    #[serde(default)]
    seen: Option<SeenHold>,
}

/// What a person saw of a held record when they decided: its generation and the approver role it waited for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeenHold {
    pub generation: i64,
    #[serde(default)]
    pub hold_role: Option<String>,
}

impl SeenHold {
    /// `None` when `held` is still what was seen; otherwise what changed, for the 409's message.
    fn changed_in(&self, held: &RecordView) -> Option<String> {
        let now = HeldAsSeen::of(held);
        let seen = HeldAsSeen {
            generation: self.generation,
            hold_role: self.hold_role.clone(),
        };
        (now != seen).then(|| {
            let role = |r: &Option<String>| r.as_deref().unwrap_or("none").to_string();
            format!(
                "generation {} held for role {} is now generation {} held for role {}",
                seen.generation,
                role(&seen.hold_role),
                now.generation,
                role(&now.hold_role)
            )
        })
    }
}

/// The longest reason a decision may carry.
pub const MAX_DECISION_REASON: usize = 1000;

/// Why a request could not act as a person, or that person may not decide on the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityRefusal {
    /// Nobody can be recognised: the roster has no identity Secret, or its tokens cannot be used (the
    /// message says which and how to fix it).
    NoIdentities(String),
    /// No identity header, or a token that is no owner's.
    UnknownIdentity,
    /// The token is `owner`'s but the request names `by`.
    ByMismatch { owner: String, by: String },
    /// `owner` does not hold the record's approver role (`role`, none when the hold names none).
    NotInRole { owner: String, role: Option<String> },
}

impl IdentityRefusal {
    /// The metric label and the lineage's word for it.
    pub fn label(&self) -> &'static str {
        match self {
            IdentityRefusal::NoIdentities(_) => "no_identities",
            IdentityRefusal::UnknownIdentity => "unknown_identity",
            IdentityRefusal::ByMismatch { .. } => "by_mismatch",
            IdentityRefusal::NotInRole { .. } => "not_in_role",
        }
    }

    /// The owner the token identified, if it identified one.
    pub fn owner(&self) -> Option<&str> {
        match self {
            IdentityRefusal::ByMismatch { owner, .. }
            | IdentityRefusal::NotInRole { owner, .. } => Some(owner),
            _ => None,
        }
    }

    /// What the refused person reads.
    pub fn message(&self) -> String {
        match self {
            IdentityRefusal::NoIdentities(why) => why.clone(),
            IdentityRefusal::UnknownIdentity => format!(
                "who decides is not known: send your personal token (from the roster's identity Secret) in the \
                 {} header",
                super::identity::IDENTITY_HEADER
            ),
            IdentityRefusal::ByMismatch { owner, by } => format!(
                "the identity token given is owner {owner:?}'s, but the request says it is by {by:?}; a \
                 person decides only in their own name"
            ),
            IdentityRefusal::NotInRole {
                owner,
                role: Some(role),
            } => format!(
                "owner {owner:?} does not hold the approver role {role:?} this record waits for (the roster's \
                 spec.owners[].approverRoles)"
            ),
            IdentityRefusal::NotInRole { owner, role: None } => format!(
                "the hold names no approver role, so owner {owner:?} (nor anyone) may decide on it"
            ),
        }
    }
}

/// The person a request acts as: the roster's owner whose personal token is in the identity header. Any
/// endpoint where a named person decides (approvals here, a ticket's acknowledgement) asks this, after the
/// flow's token.
pub(crate) fn person(
    state: &ApiState,
    headers: &HeaderMap,
) -> Result<crate::api::Owner, IdentityRefusal> {
    let identities = state.pipeline.identities.current();
    let identities = match identities.as_ref() {
        Ok(ids) => ids,
        Err(why) => return Err(IdentityRefusal::NoIdentities(why.clone())),
    };
    if let Some(why) = identities.unavailable_reason() {
        return Err(IdentityRefusal::NoIdentities(why.to_string()));
    }
    let presented = headers
        .get(super::identity::IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim();
    identities
        .identify(presented)
        .cloned()
        .ok_or(IdentityRefusal::UnknownIdentity)
}

/// Counts, logs and records in the record's lineage a refused decision, and answers 403. Neither the
/// token nor any record value is written anywhere.
async fn refuse_decision(
    state: &ApiState,
    id: RecordId,
    action: &'static str,
    refusal: IdentityRefusal,
) -> Response {
    let pipeline = &state.pipeline;
    pipeline
        .metrics
        .approvals_refused
        .get_or_create(&super::metrics::RefusalLabel {
            reason: refusal.label().to_string(),
        })
        .inc();
    let owner = refusal.owner().unwrap_or("unknown");
    tracing::warn!(
        flow = %pipeline.flow,
        record = id.0,
        owner,
        action,
        reason = refusal.label(),
        "a decision on a held record was refused"
    );
    let event = crate::ledger::NewLineageEvent {
        record: id,
        step: "approval_refused".into(),
        detail: json!({ "action": action, "owner": refusal.owner(), "reason": refusal.label() }),
    };
    if let Err(e) = pipeline.ledger.append_lineage(vec![event]).await {
        // The refusal stands either way; the log and the counter still have it.
        tracing::warn!(flow = %pipeline.flow, record = id.0, error = %e, "could not record the refusal in the lineage");
    }
    (
        StatusCode::FORBIDDEN,
        Json(json!({ "error": refusal.message(), "reason": refusal.label() })),
    )
        .into_response()
}

/// Approves or rejects a held record as the person the identity token names, if they hold its approver
/// role.
async fn decide(
    state: &ApiState,
    headers: &HeaderMap,
    id: RecordId,
    body: Decision,
    action: &'static str,
) -> Response {
    if let Some(r) = authorised(state, headers) {
        return r;
    }
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_DECISION_REASON {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "reason: why you {action} is required (1 to {MAX_DECISION_REASON} characters); it is kept in the record's lineage"
            ),
        );
    }
    let pipeline = &state.pipeline;
    let held = match pipeline.ledger.get(id).await {
        Ok(Some(detail)) => detail.record,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "record {} is not in the ledger of flow {}",
                    id.0, pipeline.flow
                ),
            );
        }
        Err(e) => return ledger_error(e),
    };
    if held.state != RecordState::Held {
        return error(
            StatusCode::CONFLICT,
            format!(
                "record {} is {}, not held: there is nothing to {action}",
                id.0,
                held.state.as_str()
            ),
        );
    }
    if let Some(changed) = body.seen.as_ref().and_then(|seen| seen.changed_in(&held)) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "record {} changed since it was seen ({changed}); nothing was decided: look at it again",
                id.0
            ),
        );
    }
    let owner = match person(state, headers) {
        Ok(owner) => owner,
        Err(refusal) => return refuse_decision(state, id, action, refusal).await,
    };
    if let Some(by) = body.by.as_deref().map(str::trim).filter(|b| !b.is_empty())
        && by != owner.id
    {
        let refusal = IdentityRefusal::ByMismatch {
            owner: owner.id,
            by: by.to_string(),
        };
        return refuse_decision(state, id, action, refusal).await;
    }
    if !held
        .hold_role
        .as_deref()
        .is_some_and(|role| super::identity::holds_role(&owner, role))
    {
        let refusal = IdentityRefusal::NotInRole {
            owner: owner.id,
            role: held.hold_role,
        };
        return refuse_decision(state, id, action, refusal).await;
    }
    match apply_decision(pipeline.ledger.as_ref(), &held, &owner.id, reason, action).await {
        Ok(done) => {
            tracing::info!(flow = %pipeline.flow, record = id.0, owner = %owner.id, action, "held record decided");
            pipeline.wake.notify_one();
            Json(done).into_response()
        }
        Err(e) => ledger_error(e),
    }
}

/// Decides on `held` as the route read and checked it. What was checked is what the ledger decides on, or
/// it refuses ([`crate::ledger::LedgerError::HoldChanged`], answered 409): a new generation may have arrived
/// and been held for another role since the read.
async fn apply_decision(
    ledger: &dyn crate::ledger::Ledger,
    held: &RecordView,
    owner: &str,
    reason: &str,
    action: &'static str,
) -> Result<Value, crate::ledger::LedgerError> {
    let (id, seen) = (held.id, HeldAsSeen::of(held));
    if action == "approve" {
        ledger.approve_held(id, &seen, owner, reason).await?;
        Ok(json!({ "record": id.0, "state": "validated", "approvedBy": owner }))
    } else {
        ledger.reject_held(id, &seen, owner, reason).await?;
        Ok(json!({ "record": id.0, "state": "dead_lettered", "rejectedBy": owner }))
    }
}

async fn approve(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Json(body): Json<Decision>,
) -> Response {
    decide(&state, &headers, RecordId(id), body, "approve").await
}

async fn reject(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Json(body): Json<Decision>,
) -> Response {
    decide(&state, &headers, RecordId(id), body, "reject").await
}

async fn replay_one(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Json(body): Json<Intervention>,
) -> Response {
    let actor = match actor_of(&state, &headers, &body.actor) {
        Ok(actor) => actor,
        Err(refused) => return *refused,
    };
    match state
        .pipeline
        .ledger
        .replay_dead_letter(RecordId(id), &actor, &body.reason)
        .await
    {
        Ok(()) => {
            state.pipeline.wake.notify_one();
            Json(json!({ "replayed": [id], "by": actor })).into_response()
        }
        Err(e) => ledger_error(e),
    }
}

async fn replay_by_reason(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<BulkReplay>,
) -> Response {
    let actor = match actor_of(&state, &headers, &body.actor) {
        Ok(actor) => actor,
        Err(refused) => return *refused,
    };
    match state
        .pipeline
        .ledger
        .replay_dead_letters_by_reason(&body.dead_letter_reason, &actor, &body.reason)
        .await
    {
        Ok(ids) => {
            state.pipeline.wake.notify_one();
            Json(json!({ "replayed": ids.iter().map(|i| i.0).collect::<Vec<_>>(), "by": actor }))
                .into_response()
        }
        Err(e) => ledger_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sla_window_failure_rate_is_a_share_capped_at_one() {
        assert_eq!(failure_rate_in_window(0, 0), 0.0);
        assert_eq!(failure_rate_in_window(5, 1000), 0.005);
        // A retry an hour on counts a failure whose receipt fell out of the window.
        assert_eq!(failure_rate_in_window(7, 3), 1.0);
        // Failures with nothing received in the window: all of it failed, not a division by zero.
        assert_eq!(failure_rate_in_window(2, 0), 1.0);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn an_approval_of_a_generation_superseded_after_the_check_is_refused_and_nothing_decided()
    {
        use crate::ledger::{
            BucketSet, IncomingRecord, Ledger, ManualClock, Outcome, SqliteLedger,
        };
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteLedger::open(
            &dir.path().join("ledger.db"),
            "closed-won",
            ManualClock::starting_at(0),
        )
        .await
        .unwrap();
        let revision = |discount: i64| IncomingRecord {
            source_key: "006A".into(),
            idempotency_key: "Opportunity/006A".into(),
            external_id: None,
            payload: json!({ "discount": discount }),
            contract_version: "1.0.0".into(),
            correlation_id: None,
            ordering: None,
        };
        let hold = |role: &str| Outcome::Held {
            rule: "discount-over-30".into(),
            role: role.into(),
            snapshot: None,
        };
        let lease = std::time::Duration::from_secs(30);
        ledger.ingest(vec![revision(40)]).await.unwrap();
        let first = ledger
            .claim("w", &BucketSet::all(), 10, lease)
            .await
            .unwrap();
        ledger
            .complete(first[0].claim, hold("sinkOwner"))
            .await
            .unwrap();
        // What the route read and checked the approver's role against...
        let held = ledger.get(first[0].claim.id).await.unwrap().unwrap().record;
        // ...and what arrived before its decision reached the ledger.
        ledger.ingest(vec![revision(60)]).await.unwrap();
        let second = ledger
            .claim("w", &BucketSet::all(), 10, lease)
            .await
            .unwrap();
        ledger
            .complete(second[0].claim, hold("financeOwner"))
            .await
            .unwrap();

        let refused = apply_decision(&ledger, &held, "sam", "fine by me", "approve")
            .await
            .unwrap_err();
        let response = ledger_error(refused);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let now = ledger.get(held.id).await.unwrap().unwrap();
        assert_eq!(now.record.state, RecordState::Held);
        assert!(now.interventions.is_empty());
        ledger.close().await;
    }

    #[tokio::test]
    async fn a_decision_on_a_hold_that_changed_underneath_is_a_conflict_naming_the_record() {
        let changed = crate::ledger::LedgerError::HoldChanged {
            flow: "closed-won".into(),
            record: RecordId(42),
            changed: "generation 1 is now generation 2, held for role financeOwner".into(),
        };
        let response = ledger_error(changed);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("record 42")
                && message.contains("generation 1 is now generation 2")
                && message.contains("nothing was decided"),
            "{body}"
        );
    }

    #[test]
    fn the_flows_token_opens_the_operations_api_by_either_header() {
        let token = Some("s3cret");
        assert_eq!(
            check_token(token, &headers(&[("authorization", "Bearer s3cret")])),
            Ok(())
        );
        assert_eq!(
            check_token(token, &headers(&[("x-meshline-token", "s3cret")])),
            Ok(())
        );
    }

    #[test]
    fn a_missing_wrong_or_prefixed_token_is_unauthorised() {
        let token = Some("s3cret");
        for given in [
            headers(&[]),
            headers(&[("authorization", "Bearer s3cre")]),
            headers(&[("authorization", "Bearer s3cret2")]),
            headers(&[("authorization", "Basic s3cret")]),
            headers(&[("x-meshline-token", "")]),
        ] {
            assert_eq!(
                check_token(token, &given),
                Err(Refusal::Unauthorised),
                "{given:?}"
            );
        }
    }

    #[test]
    fn a_worker_without_a_token_serves_nobody_even_an_empty_token() {
        assert_eq!(
            check_token(None, &headers(&[("authorization", "Bearer ")])),
            Err(Refusal::NoToken)
        );
        // An empty token file is not a token everyone holds.
        assert_eq!(
            check_token(Some(""), &headers(&[("authorization", "Bearer ")])),
            Err(Refusal::Unauthorised)
        );
        assert_eq!(Refusal::NoToken.response().status(), StatusCode::FORBIDDEN);
        assert_eq!(
            Refusal::Unauthorised.response().status(),
            StatusCode::UNAUTHORIZED
        );
    }
}
