//! Status write-back: every status period, read each running flow's worker `/status` and, when the answer
//! moved, ask the flow reconciler to fold it into `SyncFlow.status`. The reading is behind
//! [`WorkerStatusSource`] so tests inject answers; the cluster path connects to the worker Service directly,
//! and the API server's service proxy is used only when asked (`--status-via-proxy`, e.g. a controller running
//! outside the cluster), because `services/proxy` is a broad permission.
//!
//! A worker names what keeps it from its work (`problems`) in its 200 answer, and a worker whose pipeline could
//! not start at all answers 503 with `{"error", "problems"}`; both are answers the flow's conditions name.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use kube::Client;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::flow::build::{
    OPS_PORT, OPS_PORT_NAME, TOKEN_KEY, status_service_name, token_name, worker_name,
};
use super::flow::status::Observation;
use crate::api::SyncFlow;
use crate::worker::api::{WorkerProblem, WorkerStatus};

/// A worker's answer to `GET /status`.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerAnswer {
    /// 200: the pipeline runs; its numbers, and the problems it has (a full volume, say).
    Running(Box<WorkerStatus>),
    /// 503 with the worker's own body: the process is up but could not start its pipeline.
    NotStarted(StartupFailure),
}

/// The body of a worker's 503 on `/status`: why it could not start, and what it is doing about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct StartupFailure {
    pub error: String,
    #[serde(default)]
    pub problems: Vec<WorkerProblem>,
}

/// Reads a `/status` response. A 503 is the worker's own answer only when its body is the worker's
/// `{"error", "problems"}`; any other 503 (an API server proxy with no endpoints, a load balancer) is a status
/// code, not a word from the worker.
pub fn parse_answer(url: &str, status: u16, body: &[u8]) -> Result<WorkerAnswer, FetchError> {
    match status {
        200..=299 => serde_json::from_slice(body)
            .map(|status| WorkerAnswer::Running(Box::new(status)))
            .map_err(|e| FetchError::Malformed {
                url: url.to_string(),
                reason: e.to_string(),
            }),
        503 => serde_json::from_slice::<StartupFailure>(body)
            .map(WorkerAnswer::NotStarted)
            .map_err(|_| FetchError::Status {
                url: url.to_string(),
                status,
            }),
        _ => Err(FetchError::Status {
            url: url.to_string(),
            status,
        }),
    }
}

/// Why a worker's status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: the answer is not a worker status: {reason}")]
    Malformed { url: String, reason: String },
}

impl FetchError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            FetchError::Unreachable { .. } => "unreachable",
            FetchError::Status { .. } => "http_status",
            FetchError::Malformed { .. } => "malformed",
        }
    }
}

/// Reads one worker's `/status`.
#[async_trait::async_trait]
pub trait WorkerStatusSource: Send + Sync {
    async fn fetch(
        &self,
        namespace: &str,
        flow: &str,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError>;
}

/// Over the cluster network: `http://meshline-<flow>-status.<ns>.svc:8081/status`, the headless status Service
/// that also reaches a worker whose readiness probe fails (see [`status_service_name`]).
pub struct Direct {
    http: reqwest::Client,
}

impl Direct {
    pub fn new() -> Direct {
        Direct {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Default for Direct {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl WorkerStatusSource for Direct {
    async fn fetch(
        &self,
        namespace: &str,
        flow: &str,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        let url = format!(
            "http://{}.{namespace}.svc:{OPS_PORT}/status",
            status_service_name(flow)
        );
        let mut request = self.http.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let unreachable = |e: reqwest::Error| FetchError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        parse_answer(&url, status, &body)
    }
}

/// Through the API server: `/api/v1/namespaces/<ns>/services/meshline-<flow>-status:ops/proxy/status`. The worker
/// token travels in a header the proxy forwards (`Authorization` is the API server's own).
pub struct ViaProxy {
    pub client: Client,
}

pub const PROXY_TOKEN_HEADER: &str = "X-Meshline-Token";

#[async_trait::async_trait]
impl WorkerStatusSource for ViaProxy {
    async fn fetch(
        &self,
        namespace: &str,
        flow: &str,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        let path = proxy_path(namespace, flow);
        let mut request = http::Request::get(&path);
        if let Some(token) = token {
            request = request.header(PROXY_TOKEN_HEADER, token);
        }
        let unreachable = |reason: String| FetchError::Unreachable {
            url: path.clone(),
            reason,
        };
        let request = request
            .body(kube::client::Body::from(Vec::new()))
            .map_err(|e| unreachable(e.to_string()))?;
        // `send`, not `request_text`: the latter reads any error body as an API `Status`, and the worker's 503
        // body (its startup problems) would be lost in that reading.
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        parse_answer(&path, status, &body)
    }
}

pub fn proxy_path(namespace: &str, flow: &str) -> String {
    format!(
        "/api/v1/namespaces/{namespace}/services/{}:{OPS_PORT_NAME}/proxy/status",
        status_service_name(flow)
    )
}

/// A flow whose worker should be answering: it has a Deployment scaled above zero.
fn running(ctx: &Context, flow: &SyncFlow) -> bool {
    let ns = flow.namespace().unwrap_or_default();
    ctx.stores
        .deployments
        .get(&ObjectRef::new(&worker_name(&flow.name_any())).within(&ns))
        .and_then(|d| d.spec.as_ref()?.replicas)
        .is_some_and(|r| r > 0)
        && !flow.spec.paused
}

/// One round: polls every running flow, records the answers, and returns the flows whose answer changed.
pub async fn poll_once(ctx: &Context, source: &dyn WorkerStatusSource) -> Vec<ObjectRef<SyncFlow>> {
    let mut changed = Vec::new();
    for flow in ctx.stores.flows.state() {
        if !running(ctx, &flow) {
            continue;
        }
        let ns = flow.namespace().unwrap_or_default();
        let name = flow.name_any();
        let token = ctx
            .stores
            .tokens
            .get(&ObjectRef::new(&token_name(&name)).within(&ns))
            .and_then(|s| {
                s.data
                    .as_ref()?
                    .get(TOKEN_KEY)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            });
        let observation = match source.fetch(&ns, &name, token.as_deref()).await {
            Ok(answer) => {
                let (label, observation) = match answer {
                    WorkerAnswer::Running(status) => ("ok", Observation::Answered(status)),
                    WorkerAnswer::NotStarted(failure) => {
                        tracing::info!(namespace = %ns, name = %name, error = %failure.error, "worker could not start");
                        ("not_started", Observation::NotStarted(failure))
                    }
                };
                ctx.metrics
                    .status_polls
                    .get_or_create(&super::metrics::ErrorLabel {
                        kind: "flow".into(),
                        error: label.into(),
                    })
                    .inc();
                observation
            }
            Err(e) => {
                ctx.metrics
                    .status_polls
                    .get_or_create(&super::metrics::ErrorLabel {
                        kind: "flow".into(),
                        error: e.metric_label().into(),
                    })
                    .inc();
                tracing::info!(namespace = %ns, name = %name, error = %e, "worker status unavailable");
                Observation::Unreachable(e.to_string())
            }
        };
        let key = ObjectRef::from_obj(&*flow);
        let mut map = ctx.observations.lock().unwrap_or_else(|e| e.into_inner());
        let moved = match (map.get(&key), &observation) {
            (Some(old), new) => old != new,
            (None, _) => true,
        };
        // Unreachable after an answer keeps the last answer (counters do not drop to zero on a blip). A worker
        // that says it could not start is an answer, and replaces the last one.
        let keep_old = matches!(observation, Observation::Unreachable(_))
            && matches!(
                map.get(&key),
                Some(Observation::Answered(_) | Observation::NotStarted(_))
            );
        if !keep_old {
            map.insert(key.clone(), observation);
        }
        if moved && !keep_old {
            changed.push(key);
        }
    }
    changed
}

/// The poll loop: every `period`, poll and send the flows that moved to the flow controller.
pub async fn run(
    ctx: Arc<Context>,
    source: Arc<dyn WorkerStatusSource>,
    period: Duration,
    trigger: mpsc::UnboundedSender<ObjectRef<SyncFlow>>,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for flow in poll_once(&ctx, source.as_ref()).await {
            if trigger.unbounded_send(flow).is_err() {
                return;
            }
        }
    }
}
