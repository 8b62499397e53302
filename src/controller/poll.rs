//! Status write-back: every status period, read `/status` from every worker pod of each running flow and, when
//! what they say moved, ask the flow reconciler to fold it into `SyncFlow.status`.
//!
//! A request to the flow's Service reaches one random pod, but a circuit breaker, a gate and a worker's
//! problems live in each process: so the poller reads each pod the flow's status Service publishes, from the
//! EndpointSlice cache (ready or not: a worker that fails its startup is exactly the one to read). The counters
//! come from the ledger the pods share, so they are taken once, from one pod that answered; each pod gives its
//! own process state (see [`Observation`]).
//!
//! Bounds: flows are polled [`PollSettings::flows_at_once`] at a time and, within a flow,
//! [`PollSettings::pods_at_once`] pods at a time, so at most their product of requests is in flight. The
//! whole poll of one flow is bounded by [`PollSettings::timeout`], a network bound (the one wall-clock bound
//! in the status path): a pod that has not answered by then is `Unreachable`, which the flow's
//! `StatusUnavailable` condition names, never a silent freeze of the last numbers.
//!
//! The reading is behind [`WorkerStatusSource`] so tests inject answers; the cluster path connects to each pod
//! directly, and the API server's pod proxy is used only when asked (`--status-via-proxy`, e.g. a controller
//! running outside the cluster), because `pods/proxy` is a broad permission.
//!
//! A worker names what keeps it from its work (`problems`) in its 200 answer, and a worker whose pipeline could
//! not start at all answers 503 with `{"error", "problems"}`; both are answers the flow's conditions name.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{StreamExt, stream};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::flow::build::{
    OPS_PORT, TOKEN_KEY, canary_status_service_name, status_service_name, token_name, worker_name,
};
use super::flow::status::{Observation, PodAnswer, PodObservation};
use crate::api::SyncFlow;
use crate::worker::api::{WorkerProblem, WorkerStatus};

/// The port a worker serves `/status` on. The one place the poller names it.
pub fn status_port() -> i32 {
    OPS_PORT
}

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How the poller bounds its work.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// The whole poll of one flow, all its pods: a pod that has not answered by then is `Unreachable`.
    pub timeout: Duration,
    /// Flows polled at the same time.
    pub flows_at_once: usize,
    /// Pods of one flow polled at the same time.
    pub pods_at_once: usize,
}

impl Default for PollSettings {
    fn default() -> Self {
        PollSettings {
            timeout: Duration::from_secs(10),
            flows_at_once: 8,
            pods_at_once: 8,
        }
    }
}

/// One worker pod the flow's status Service publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPod {
    pub name: String,
    /// The pod's IP.
    pub address: String,
    /// Whether the pod passes its readiness probe.
    pub ready: bool,
}

/// The worker pods behind a flow's status Service, from the EndpointSlices of that Service: one entry per pod
/// (a dual-stack pod is in two slices), sorted by name. Terminating pods are left out: they are on their way
/// out, and what their process says is no longer the flow's state.
///
/// The status Service publishes pods that are not ready, so the EndpointSlice controller marks every endpoint
/// `ready`; the pod's own readiness is the endpoint's `serving`.
pub fn worker_pods(slices: &[Arc<EndpointSlice>], namespace: &str, flow: &str) -> Vec<WorkerPod> {
    // Both tracks: the stable workers' status Service and, during a canary, the canary's.
    let services = [status_service_name(flow), canary_status_service_name(flow)];
    let mut pods = BTreeMap::new();
    let of_flow = slices.iter().filter(|s| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && s.labels()
                .get(SERVICE_NAME_LABEL)
                .is_some_and(|l| services.contains(l))
            && matches!(s.address_type.as_str(), "IPv4" | "IPv6")
    });
    for slice in of_flow {
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            if conditions.terminating == Some(true) {
                continue;
            }
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let name = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone())
                .unwrap_or_else(|| address.clone());
            let ready = conditions.serving.or(conditions.ready).unwrap_or(false);
            pods.entry(name.clone()).or_insert(WorkerPod {
                name,
                address: address.clone(),
                ready,
            });
        }
    }
    pods.into_values().collect()
}

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

/// Reads one worker pod's `/status`.
#[async_trait::async_trait]
pub trait WorkerStatusSource: Send + Sync {
    async fn fetch(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError>;

    /// Another operations endpoint of one pod: `path` with its query (`/rollout/measures?...`) and, for a
    /// write, a JSON body, answered with the HTTP status and body. The canary's analysis reads the ledger's per-revision measures through it.
    async fn call(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError>;

    /// [`Self::call`] on behalf of a person: their personal token travels in the worker's identity header
    /// (`X-Meshline-Identity`), so the worker, not the caller, decides whether they may act. A source that
    /// cannot carry it refuses rather than act with the flow's token alone.
    #[allow(clippy::too_many_arguments)]
    async fn call_as(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        identity: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        match identity {
            None => self.call(namespace, pod, method, path, token, body).await,
            Some(_) => Err(FetchError::Unreachable {
                url: path.to_string(),
                reason: "this worker source cannot carry a person's identity".into(),
            }),
        }
    }
}

/// Over the cluster network, to the pod's own address on the operations port: `http://<pod IP>:8081/status`.
pub struct Direct {
    http: reqwest::Client,
}

impl Direct {
    pub fn new() -> Direct {
        Direct {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
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

/// The URL of a pod's `/status` (an IPv6 address in brackets).
pub fn pod_url(pod: &WorkerPod) -> String {
    let host = if pod.address.contains(':') {
        format!("[{}]", pod.address)
    } else {
        pod.address.clone()
    };
    format!("http://{host}:{}/status", status_port())
}

#[async_trait::async_trait]
impl WorkerStatusSource for Direct {
    async fn fetch(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        let (status, body) = self
            .call(namespace, pod, http::Method::GET, "/status", token, None)
            .await?;
        parse_answer(&pod_url(pod), status, &body)
    }

    async fn call(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        self.call_as(namespace, pod, method, path, token, None, body)
            .await
    }

    async fn call_as(
        &self,
        _namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        identity: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        let url = pod_url(pod).replace("/status", path);
        let mut request = self.http.request(method, &url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(identity) = identity {
            request = request.header(crate::worker::identity::IDENTITY_HEADER, identity);
        }
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        let unreachable = |e: reqwest::Error| FetchError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        Ok((status, body.to_vec()))
    }
}

/// Through the API server's pod proxy: `/api/v1/namespaces/<ns>/pods/<pod>:8081/proxy/status` (the operations
/// port). The worker token travels in a header the proxy forwards (`Authorization` is the API server's own).
pub struct ViaProxy {
    pub client: Client,
}

pub const PROXY_TOKEN_HEADER: &str = "X-Meshline-Token";

#[async_trait::async_trait]
impl WorkerStatusSource for ViaProxy {
    async fn fetch(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        let (status, body) = self
            .call(namespace, pod, http::Method::GET, "/status", token, None)
            .await?;
        parse_answer(&pod_proxy_path(namespace, &pod.name), status, &body)
    }

    async fn call(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        self.call_as(namespace, pod, method, path, token, None, body)
            .await
    }

    async fn call_as(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        identity: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        let full =
            pod_proxy_path(namespace, &pod.name).replace("/proxy/status", &format!("/proxy{path}"));
        let mut request = http::Request::builder().method(method).uri(&full);
        if let Some(token) = token {
            request = request.header(PROXY_TOKEN_HEADER, token);
        }
        // The pod proxy keeps `Authorization` for itself but passes other headers on to the worker.
        if let Some(identity) = identity {
            request = request.header(crate::worker::identity::IDENTITY_HEADER, identity);
        }
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let unreachable = |reason: String| FetchError::Unreachable {
            url: full.clone(),
            reason,
        };
        let request = request
            .body(kube::client::Body::from(
                body.map(<[u8]>::to_vec).unwrap_or_default(),
            ))
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
        Ok((status, body.to_vec()))
    }
}

pub fn pod_proxy_path(namespace: &str, pod: &str) -> String {
    format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}:{}/proxy/status",
        status_port()
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

fn count(ctx: &Context, label: &str) {
    ctx.metrics
        .status_polls
        .get_or_create(&super::metrics::ErrorLabel {
            kind: "flow".into(),
            error: label.into(),
        })
        .inc();
}

/// Reads every published pod of one flow, at most `pods_at_once` at a time, all within `timeout` of the start.
async fn poll_flow(
    ctx: &Context,
    source: &dyn WorkerStatusSource,
    settings: &PollSettings,
    flow: &SyncFlow,
    slices: &[Arc<EndpointSlice>],
) -> Vec<PodObservation> {
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
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let (ns, name, token) = (&ns, &name, token.as_deref());
    stream::iter(worker_pods(slices, ns, name))
        .map(|pod| async move {
            // `timeout_at` polls the request before the clock, so an answer that is there is never refused.
            let answer = match tokio::time::timeout_at(deadline, source.fetch(ns, &pod, token)).await {
                Ok(Ok(WorkerAnswer::Running(status))) => {
                    count(ctx, "ok");
                    PodAnswer::Running(status)
                }
                Ok(Ok(WorkerAnswer::NotStarted(failure))) => {
                    count(ctx, "not_started");
                    tracing::info!(namespace = %ns, name = %name, pod = %pod.name, error = %failure.error, "worker could not start");
                    PodAnswer::NotStarted(failure)
                }
                Ok(Err(e)) => {
                    count(ctx, e.metric_label());
                    tracing::info!(namespace = %ns, name = %name, pod = %pod.name, error = %e, "worker status unavailable");
                    PodAnswer::Unreachable(e.to_string())
                }
                Err(_) => {
                    count(ctx, "timeout");
                    let e = format!(
                        "no answer within {}s, the bound of one flow's status poll",
                        settings.timeout.as_secs_f64()
                    );
                    tracing::info!(namespace = %ns, name = %name, pod = %pod.name, error = %e, "worker status unavailable");
                    PodAnswer::Unreachable(e)
                }
            };
            PodObservation {
                address: pod.address,
                pod: pod.name,
                ready: pod.ready,
                answer,
            }
        })
        .buffered(settings.pods_at_once.max(1))
        .collect()
        .await
}

/// One round: polls every running flow, records what its pods said, and returns the flows whose observation
/// changed.
pub async fn poll_once(
    ctx: &Context,
    source: &dyn WorkerStatusSource,
    settings: &PollSettings,
) -> Vec<ObjectRef<SyncFlow>> {
    let flows: Vec<_> = ctx
        .stores
        .flows
        .state()
        .into_iter()
        .filter(|f| running(ctx, f))
        .collect();
    // Slices by (namespace, Service) once per round, so a round costs one pass over the cache, not one per flow.
    let mut by_service: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
    for slice in ctx.stores.endpoint_slices.state() {
        if let (Some(ns), Some(service)) = (
            slice.metadata.namespace.clone(),
            slice.labels().get(SERVICE_NAME_LABEL).cloned(),
        ) {
            by_service.entry((ns, service)).or_default().push(slice);
        }
    }
    let polled: Vec<(ObjectRef<SyncFlow>, Vec<PodObservation>)> = stream::iter(flows)
        .map(|flow| {
            let ns = flow.namespace().unwrap_or_default();
            let name = flow.name_any();
            let slices: Vec<Arc<EndpointSlice>> = [
                status_service_name(&name),
                canary_status_service_name(&name),
            ]
            .into_iter()
            .filter_map(|service| by_service.get(&(ns.clone(), service)))
            .flatten()
            .cloned()
            .collect();
            async move {
                let pods = poll_flow(ctx, source, settings, &flow, &slices).await;
                (ObjectRef::from_obj(&*flow), pods)
            }
        })
        .buffer_unordered(settings.flows_at_once.max(1))
        .collect()
        .await;
    let mut changed = Vec::new();
    let mut map = ctx.observations.lock().unwrap_or_else(|e| e.into_inner());
    for (key, pods) in polled {
        let observation = Observation::from_pods(pods, map.get(&key));
        if map.get(&key) != Some(&observation) {
            map.insert(key.clone(), observation);
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
    settings: PollSettings,
    trigger: mpsc::UnboundedSender<ObjectRef<SyncFlow>>,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for flow in poll_once(&ctx, source.as_ref(), &settings).await {
            if trigger.unbounded_send(flow).is_err() {
                return;
            }
        }
    }
}
