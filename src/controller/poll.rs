//! Status write-back: every status period, read each running flow's worker `/status` and, when the answer
//! moved, ask the flow reconciler to fold it into `SyncFlow.status`. The reading is behind
//! [`WorkerStatusSource`] so tests inject answers; the cluster path connects to the worker Service directly,
//! and the API server's service proxy is used only when asked (`--status-via-proxy`, e.g. a controller running
//! outside the cluster), because `services/proxy` is a broad permission.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use kube::Client;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::flow::build::{TOKEN_KEY, WORKER_PORT, token_name, worker_name};
use super::flow::status::Observation;
use crate::api::SyncFlow;
use crate::worker::api::WorkerStatus;

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
    ) -> Result<WorkerStatus, FetchError>;
}

/// Over the cluster network: `http://meshline-<flow>.<ns>.svc:8080/status`.
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
    ) -> Result<WorkerStatus, FetchError> {
        let url = format!(
            "http://{}.{namespace}.svc:{WORKER_PORT}/status",
            worker_name(flow)
        );
        let mut request = self.http.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| FetchError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url,
                status: response.status().as_u16(),
            });
        }
        response.json().await.map_err(|e| FetchError::Malformed {
            url,
            reason: e.to_string(),
        })
    }
}

/// Through the API server: `/api/v1/namespaces/<ns>/services/meshline-<flow>:http/proxy/status`. The worker
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
    ) -> Result<WorkerStatus, FetchError> {
        let path = proxy_path(namespace, flow);
        let mut request = http::Request::get(&path);
        if let Some(token) = token {
            request = request.header(PROXY_TOKEN_HEADER, token);
        }
        let request = request
            .body(Vec::new())
            .map_err(|e| FetchError::Unreachable {
                url: path.clone(),
                reason: e.to_string(),
            })?;
        let text = self
            .client
            .request_text(request)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) => FetchError::Status {
                    url: path.clone(),
                    status: s.code,
                },
                other => FetchError::Unreachable {
                    url: path.clone(),
                    reason: other.to_string(),
                },
            })?;
        serde_json::from_str(&text).map_err(|e| FetchError::Malformed {
            url: path,
            reason: e.to_string(),
        })
    }
}

pub fn proxy_path(namespace: &str, flow: &str) -> String {
    format!(
        "/api/v1/namespaces/{namespace}/services/{}:http/proxy/status",
        worker_name(flow)
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
            Ok(status) => {
                ctx.metrics
                    .status_polls
                    .get_or_create(&super::metrics::ErrorLabel {
                        kind: "flow".into(),
                        error: "ok".into(),
                    })
                    .inc();
                Observation::Answered(Box::new(status))
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
        // Unreachable after an answer keeps the last answer (counters do not drop to zero on a blip).
        let keep_old = matches!(observation, Observation::Unreachable(_))
            && matches!(map.get(&key), Some(Observation::Answered(_)));
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
