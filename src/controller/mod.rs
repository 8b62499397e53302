//! `meshline controller`: the control plane. It reconciles SyncFlows into per-flow worker objects, keeps the
//! status of flows, contracts and rosters true, and reads each worker's `/status` into its flow.
//!
//! Every reconcile has the same shape: gather (from the reflector caches, plus a GET of each referenced
//! Secret) → validate (pure) → build the desired objects (pure) → apply them with server-side apply under one
//! field manager, in a stated order → delete the owned objects no longer desired → write the status, only when
//! it changed. The apply step skips an object whose cached copy already carries the desired content hash, so a
//! resync of unchanged flows makes no writes at all.
//!
//! The controller writes the status of the objects users own (SyncFlow, SyncContract, OwnershipRoster) and
//! nothing else of theirs: no spec, labels, annotations or finalizers. Owner references are enough for cleanup,
//! so no finalizer is needed. This module never touches a worker's ledger or a Secret's data.

pub mod apply;
pub mod contract;
pub mod error;
pub mod flow;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod poll;
pub mod roster;
pub mod run;
pub mod secrets;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};

pub use error::{Error, RunError};
pub use run::{FlowNetworkPolicies, Settings, run};

use crate::api::{OwnershipRoster, SyncContract, SyncFlow};
use flow::build::BuildSettings;
use flow::status::Observation;

/// The one field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "meshline-controller";
/// `app.kubernetes.io/managed-by` of every object the controller creates; its caches select on it.
pub const MANAGED_BY: &str = "meshline-controller";
/// The label that names a child's flow.
pub const FLOW_LABEL: &str = "sync.meshline.io/flow";
/// Content hash of what the controller last applied to an object.
pub const APPLIED_HASH: &str = "sync.meshline.io/applied-hash";
/// Hash of the rendered configuration on the pod template: a configuration change rolls the pods.
pub const CONFIG_HASH: &str = "sync.meshline.io/config-hash";

/// The reflector caches the reconcilers read instead of the API.
#[derive(Clone)]
pub struct Stores {
    pub flows: Store<SyncFlow>,
    pub contracts: Store<SyncContract>,
    pub rosters: Store<OwnershipRoster>,
    pub deployments: Store<Deployment>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub pvcs: Store<PersistentVolumeClaim>,
    /// Only the Secrets the controller created (the workers' tokens), selected by the managed-by label.
    pub tokens: Store<Secret>,
    /// The EndpointSlices of the controller's Services (they carry their Service's labels): which worker pods
    /// each flow's status Service publishes, so the poller reads every pod.
    pub endpoint_slices: Store<EndpointSlice>,
    /// The per-flow NetworkPolicies; fed only when the controller ships or cleans them up (empty otherwise,
    /// so a controller without that RBAC never lists them).
    pub network_policies: Store<NetworkPolicy>,
    /// Contract revisions (ControllerRevisions the controller made).
    pub revisions: Store<ControllerRevision>,
    /// Preflight replay Jobs.
    pub jobs: Store<Job>,
    /// The flows' reconciliation audit CronJobs.
    pub cron_jobs: Store<CronJob>,
}

/// The writing ends of [`Stores`], fed by the reflectors (or directly by tests and the benchmark).
pub struct Writers {
    pub flows: Writer<SyncFlow>,
    pub contracts: Writer<SyncContract>,
    pub rosters: Writer<OwnershipRoster>,
    pub deployments: Writer<Deployment>,
    pub config_maps: Writer<ConfigMap>,
    pub services: Writer<Service>,
    pub pdbs: Writer<PodDisruptionBudget>,
    pub pvcs: Writer<PersistentVolumeClaim>,
    pub tokens: Writer<Secret>,
    pub endpoint_slices: Writer<EndpointSlice>,
    pub network_policies: Writer<NetworkPolicy>,
    pub revisions: Writer<ControllerRevision>,
    pub jobs: Writer<Job>,
    pub cron_jobs: Writer<CronJob>,
}

impl Stores {
    pub fn new() -> (Stores, Writers) {
        let (flows, wf) = reflector::store();
        let (contracts, wc) = reflector::store();
        let (rosters, wr) = reflector::store();
        let (deployments, wd) = reflector::store();
        let (config_maps, wcm) = reflector::store();
        let (services, ws) = reflector::store();
        let (pdbs, wp) = reflector::store();
        let (pvcs, wv) = reflector::store();
        let (tokens, wt) = reflector::store();
        let (endpoint_slices, we) = reflector::store();
        let (network_policies, wn) = reflector::store();
        let (revisions, wrv) = reflector::store();
        let (jobs, wj) = reflector::store();
        let (cron_jobs, wcj) = reflector::store();
        (
            Stores {
                flows,
                contracts,
                rosters,
                deployments,
                config_maps,
                services,
                pdbs,
                pvcs,
                tokens,
                endpoint_slices,
                network_policies,
                revisions,
                jobs,
                cron_jobs,
            },
            Writers {
                flows: wf,
                contracts: wc,
                rosters: wr,
                deployments: wd,
                config_maps: wcm,
                services: ws,
                pdbs: wp,
                pvcs: wv,
                tokens: wt,
                endpoint_slices: we,
                network_policies: wn,
                revisions: wrv,
                jobs: wj,
                cron_jobs: wcj,
            },
        )
    }
}

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    pub build: BuildSettings,
    pub stores: Stores,
    /// What each running flow's worker pods last said on `/status`, written by the poller.
    pub observations: Mutex<HashMap<ObjectRef<SyncFlow>, Observation>>,
    /// Compile verdicts by contract content hash: a contract compiles once, not once per flow per reconcile.
    compile_cache: Mutex<HashMap<String, Result<(), String>>>,
    /// The flows each roster covered when last seen, so a roster change re-reconciles the flows it used to
    /// cover as well as the ones it covers now.
    pub roster_index: Mutex<HashMap<ObjectRef<OwnershipRoster>, HashSet<ObjectRef<SyncFlow>>>>,
    pub metrics: Arc<metrics::Metrics>,
    pub recorder: Recorder,
    /// How the reconcilers reach the workers' operations API (a canary's measures, the release of its
    /// leases): the status poll's way, directly or through the API server's pod proxy.
    pub workers: Arc<dyn poll::WorkerStatusSource>,
    /// "Now" for a canary's steps and measurements; tests move a manual clock instead of sleeping.
    pub clock: Arc<dyn crate::ledger::Clock>,
    /// When no worker answering becomes the controller's own ticket (see `flow::outage`).
    pub outage: flow::outage::OutageSettings,
}

impl Context {
    pub fn new(
        client: Client,
        build: BuildSettings,
        stores: Stores,
        metrics: Arc<metrics::Metrics>,
    ) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            build,
            stores,
            observations: Mutex::new(HashMap::new()),
            compile_cache: Mutex::new(HashMap::new()),
            roster_index: Mutex::new(HashMap::new()),
            metrics,
            workers: Arc::new(poll::Direct::new()),
            clock: Arc::new(crate::ledger::SystemClock),
            outage: flow::outage::OutageSettings::default(),
        }
    }

    /// The same context judging a flow's silence by `settings`.
    pub fn with_outage(mut self, settings: flow::outage::OutageSettings) -> Context {
        self.outage = settings;
        self
    }

    /// The same context telling time by `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn crate::ledger::Clock>) -> Context {
        self.clock = clock;
        self
    }

    /// The context's "now".
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_default()
    }

    /// The same context reaching the workers through `workers` (the pod proxy, or a test's double).
    pub fn with_workers(mut self, workers: Arc<dyn poll::WorkerStatusSource>) -> Context {
        self.workers = workers;
        self
    }

    /// Compiles a contract, or returns the cached verdict for the same content.
    pub fn compile(&self, contract: &SyncContract) -> Result<(), String> {
        let key = crate::contract::content_hash(&contract.spec)
            .as_str()
            .to_string();
        if let Some(hit) = self
            .compile_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return hit.clone();
        }
        let verdict = flow::validate::compile_contract(contract);
        let mut cache = self.compile_cache.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: contracts are few; a runaway of edits just starts the cache over.
        if cache.len() > 1000 {
            cache.clear();
        }
        cache.insert(key, verdict.clone());
        verdict
    }
}

/// RFC 3339 now, to the second (the precision of `metav1.Time`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
