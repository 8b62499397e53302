//! Where the operations page reads flows and rosters and reaches each flow's worker: the [`OpsBackend`]
//! trait, and the direct-URL implementation (a worker's operations URL plus its token file) that
//! `meshline dev` and tests use. The controller's implementation, through the same path its status poll
//! takes, is [`super::cluster::ClusterBackend`].
//!
//! The backend only carries requests: it never decides who may approve. A person's decision travels with
//! their own personal token in the worker's identity header, and the worker checks it against the roster.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{OwnershipRoster, SyncFlow};

/// A flow by namespace and name, as the page's URLs name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for FlowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why the page could not reach or read a flow's worker.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("flow {flow} is not known to the operations page")]
    NoSuchFlow { flow: FlowRef },
    #[error("flow {flow} has no worker pod to ask: {reason}")]
    NoWorker { flow: FlowRef, reason: String },
    #[error("flow {flow}: {method} {path}: {reason}")]
    Unreachable {
        flow: FlowRef,
        method: String,
        path: String,
        reason: String,
    },
    #[error("flow {flow}: {path}: the worker's answer is not what the page reads: {reason}")]
    Malformed {
        flow: FlowRef,
        path: String,
        reason: String,
    },
    #[error("flow {flow}: {path}: the worker answered HTTP {status}: {message}")]
    Refused {
        flow: FlowRef,
        path: String,
        status: u16,
        message: String,
    },
}

impl BackendError {
    /// A short stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            BackendError::NoSuchFlow { .. } => "no_such_flow",
            BackendError::NoWorker { .. } => "no_worker",
            BackendError::Unreachable { .. } => "unreachable",
            BackendError::Malformed { .. } => "malformed",
            BackendError::Refused { .. } => "refused",
        }
    }
}

/// A worker's answer: its HTTP status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl WorkerReply {
    /// The worker's own words: `error` of its JSON error body, else the body as text (bounded).
    pub fn message(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(500)
                    .collect()
            })
    }
}

/// What the operations page reads and where it sends people's interventions.
#[async_trait::async_trait]
pub trait OpsBackend: Send + Sync {
    /// Why the page cannot answer at all right now (a controller replica that is not the leader has no
    /// caches to read), shown with a 503 instead of an empty, misleading page.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Every flow the page shows, with its status as the controller last wrote it.
    async fn flows(&self) -> Vec<SyncFlow>;
    /// Every roster (owners, assignments, approver roles).
    async fn rosters(&self) -> Vec<OwnershipRoster>;
    /// One request to one of `flow`'s workers' operations API, with the flow's token and, when a person
    /// acts, their personal token in the identity header.
    async fn call(
        &self,
        flow: &FlowRef,
        method: http::Method,
        path: &str,
        identity: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<WorkerReply, BackendError>;
}

/// Reads a worker's JSON answer, or says why not.
pub fn read_json<T: DeserializeOwned>(
    flow: &FlowRef,
    path: &str,
    reply: &WorkerReply,
) -> Result<T, BackendError> {
    if !(200..300).contains(&reply.status) {
        return Err(BackendError::Refused {
            flow: flow.clone(),
            path: path.to_string(),
            status: reply.status,
            message: reply.message(),
        });
    }
    serde_json::from_slice(&reply.body).map_err(|e| BackendError::Malformed {
        flow: flow.clone(),
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// One flow served by a worker the page reaches by URL.
#[derive(Clone, Debug)]
pub struct DirectFlow {
    pub flow: SyncFlow,
    /// The worker's operations base URL, e.g. `http://127.0.0.1:8081`.
    pub ops_url: String,
    /// The file holding the flow's token (read at each request, so a rotation is picked up).
    pub token_file: PathBuf,
}

/// The page's backend for a local run and tests: flows and rosters given up front, each flow's numbers read
/// from its worker's `/status` (there is no controller to write them into the flow's status).
pub struct DirectBackend {
    flows: Vec<DirectFlow>,
    rosters: Vec<OwnershipRoster>,
    http: reqwest::Client,
}

impl DirectBackend {
    pub fn new(flows: Vec<DirectFlow>, rosters: Vec<OwnershipRoster>) -> DirectBackend {
        DirectBackend {
            flows,
            rosters,
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    fn find(&self, flow: &FlowRef) -> Option<&DirectFlow> {
        self.flows.iter().find(|f| {
            f.flow.metadata.name.as_deref() == Some(flow.name.as_str())
                && f.flow.metadata.namespace.as_deref().unwrap_or("default") == flow.namespace
        })
    }
}

/// Copies what a worker's `/status` says into the flow's status, as the controller would.
pub fn fold_worker_status(flow: &mut SyncFlow, s: &crate::worker::api::WorkerStatus) {
    let status = flow.status.get_or_insert_with(Default::default);
    status.counters = s.counters.clone();
    status.failure_rate = Some(s.failure_rate.clone());
    status.mttr_seconds = s.mttr_seconds;
    status.manual_interventions_per_1k = Some(s.manual_interventions_per_1k.clone());
    status.last_delivery_time = s.last_delivery_time.clone();
    status.oldest_pending_seconds = s.oldest_pending_seconds;
    status.active_contract_version = Some(s.contract_version.clone());
    if s.tickets.is_some() {
        status.tickets = s.tickets.clone();
    }
    if s.audit.is_some() {
        status.audit = s.audit.clone();
    }
}

#[async_trait::async_trait]
impl OpsBackend for DirectBackend {
    async fn flows(&self) -> Vec<SyncFlow> {
        let mut out = Vec::with_capacity(self.flows.len());
        for f in &self.flows {
            let mut flow = f.flow.clone();
            let r = flow_ref(&flow);
            match self
                .call(&r, http::Method::GET, "/status", None, None)
                .await
            {
                Ok(reply) => {
                    match read_json::<crate::worker::api::WorkerStatus>(&r, "/status", &reply) {
                        Ok(s) => fold_worker_status(&mut flow, &s),
                        Err(e) => {
                            tracing::warn!(flow = %r, error = %e, "ops page: cannot read the worker status")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(flow = %r, error = %e, "ops page: cannot reach the worker")
                }
            }
            out.push(flow);
        }
        out
    }

    async fn rosters(&self) -> Vec<OwnershipRoster> {
        self.rosters.clone()
    }

    async fn call(
        &self,
        flow: &FlowRef,
        method: http::Method,
        path: &str,
        identity: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<WorkerReply, BackendError> {
        let f = self
            .find(flow)
            .ok_or_else(|| BackendError::NoSuchFlow { flow: flow.clone() })?;
        let unreachable = |reason: String| BackendError::Unreachable {
            flow: flow.clone(),
            method: method.to_string(),
            path: path.to_string(),
            reason,
        };
        let token = std::fs::read_to_string(&f.token_file).map_err(|e| {
            unreachable(format!(
                "cannot read the flow's token file {}: {e}",
                f.token_file.display()
            ))
        })?;
        let url = format!("{}{path}", f.ops_url.trim_end_matches('/'));
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(token.trim());
        if let Some(identity) = identity {
            request = request.header(crate::worker::identity::IDENTITY_HEADER, identity);
        }
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(WorkerReply {
            status,
            body: body.to_vec(),
        })
    }
}

/// A flow's namespace and name (an object without a namespace is in `default`, as kubectl applies it).
pub fn flow_ref(flow: &SyncFlow) -> FlowRef {
    FlowRef {
        namespace: flow
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: flow.metadata.name.clone().unwrap_or_default(),
    }
}
