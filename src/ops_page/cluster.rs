//! The controller's [`OpsBackend`]: flows and rosters from its reflector caches (the status it writes), and
//! worker requests along the path its status poll takes ([`crate::controller::poll::WorkerStatusSource`]:
//! straight to a worker pod, or through the API server's pod proxy with `--status-via-proxy`), with the
//! flow's token from the Secret the controller made for it. A person's decision carries their own personal
//! token in the identity header; the controller's authority (the flow's token) alone approves nothing.

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;

use super::backend::{BackendError, FlowRef, OpsBackend, WorkerReply};
use crate::api::{OwnershipRoster, SyncFlow};
use crate::controller::Stores;
use crate::controller::flow::build::{TOKEN_KEY, token_name};
use crate::controller::poll::{WorkerStatusSource, worker_pods};

pub struct ClusterBackend {
    pub stores: Stores,
    pub source: Arc<dyn WorkerStatusSource>,
    /// Set once this replica leads: only the leader's reflectors feed its caches.
    pub leading: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl OpsBackend for ClusterBackend {
    fn unavailable(&self) -> Option<String> {
        (!self.leading.load(std::sync::atomic::Ordering::Relaxed)).then(|| {
            "this controller replica is a standby (or still waiting for the CRDs): only the leader serves \
             the operations page; port-forward to the leader's pod (the holder of the leader Lease)"
                .to_string()
        })
    }

    async fn flows(&self) -> Vec<SyncFlow> {
        self.stores
            .flows
            .state()
            .iter()
            .map(|f| (**f).clone())
            .collect()
    }

    async fn rosters(&self) -> Vec<OwnershipRoster> {
        self.stores
            .rosters
            .state()
            .iter()
            .map(|r| (**r).clone())
            .collect()
    }

    async fn call(
        &self,
        flow: &FlowRef,
        method: http::Method,
        path: &str,
        identity: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<WorkerReply, BackendError> {
        let (ns, name) = (flow.namespace.as_str(), flow.name.as_str());
        if self
            .stores
            .flows
            .get(&ObjectRef::new(name).within(ns))
            .is_none()
        {
            return Err(BackendError::NoSuchFlow { flow: flow.clone() });
        }
        let slices = self.stores.endpoint_slices.state();
        let pods = worker_pods(&slices, ns, name);
        // The pods share the ledger, so any of them answers for the flow's records; a ready one first.
        let pod = pods
            .iter()
            .find(|p| p.ready)
            .or_else(|| pods.first())
            .ok_or_else(|| BackendError::NoWorker {
                flow: flow.clone(),
                reason:
                    "its status Service publishes no pod (is the flow paused or scaled to zero?)"
                        .into(),
            })?;
        let token = self
            .stores
            .tokens
            .get(&ObjectRef::new(&token_name(name)).within(ns))
            .and_then(|s| {
                s.data
                    .as_ref()?
                    .get(TOKEN_KEY)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            });
        let (status, body) = self
            .source
            .call_as(
                ns,
                pod,
                method.clone(),
                path,
                token.as_deref(),
                identity,
                body.as_deref(),
            )
            .await
            .map_err(|e| BackendError::Unreachable {
                flow: flow.clone(),
                method: method.to_string(),
                path: path.to_string(),
                reason: e.to_string(),
            })?;
        Ok(WorkerReply { status, body })
    }
}
