//! Wiring: the client, the CRD wait, the reflectors, leader election, the three controllers, the status poller
//! and the `/healthz`, `/readyz` and `/metrics` server.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::flow::build::{BuildSettings, NetworkPolicySettings};
use super::poll::WorkerStatusSource;
use super::{Context, Error, MANAGED_BY, RunError, Stores, metrics::Metrics};
use crate::api::{OwnershipRoster, SyncContract, SyncFlow};

/// What `meshline controller` was started with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub status_period: Duration,
    pub worker_image: String,
    /// `--worker-defaults`: pod settings under each flow's own `spec.worker`.
    pub worker_defaults: crate::api::WorkerPodSettings,
    pub lease_name: String,
    /// Namespace of the Lease (the controller's own, `POD_NAMESPACE`).
    pub lease_namespace: String,
    pub identity: String,
    /// Watch only this namespace; all when `None`.
    pub namespace: Option<String>,
    pub status_via_proxy: bool,
    /// Bounds of the status poll (concurrency, the per-flow timeout).
    pub poll: super::poll::PollSettings,
    /// Skip leader election (one replica, or a development run).
    pub no_leader_election: bool,
    /// Whether each flow gets a NetworkPolicy for its worker pods.
    pub network_policies: FlowNetworkPolicies,
    /// When no worker pod of a flow answering becomes the controller's own ticket.
    pub outage: super::flow::outage::OutageSettings,
    /// Where the operations web page listens (`--ops-page-addr`); not served when `None`.
    pub ops_page: Option<SocketAddr>,
}

/// `--flow-network-policies`: the per-flow NetworkPolicy switch. Each mode needs its own RBAC on
/// `networkpolicies`, which the chart grants for that mode only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FlowNetworkPolicies {
    /// None are made, none are watched (no RBAC on networkpolicies at all).
    #[default]
    Off,
    /// Every running flow gets one (RBAC: get, list, watch, create, patch, delete).
    On(NetworkPolicySettings),
    /// None are made; those made while the switch was on are deleted (RBAC: list, watch, delete).
    CleanUp,
}

/// The CRDs that must be Established before anything is watched.
pub const CRDS: [&str; 3] = [
    "syncflows.sync.meshline.io",
    "synccontracts.sync.meshline.io",
    "ownershiprosters.sync.meshline.io",
];

/// Which of the CRDs are missing or not yet Established (empty when all are ready).
pub async fn crds_not_established(client: &Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for name in CRDS {
        let established = api.get_opt(name).await?.is_some_and(|crd| {
            crd.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if !established {
            missing.push(name.to_string());
        }
    }
    Ok(missing)
}

async fn wait_for_crds(client: &Client) {
    loop {
        match crds_not_established(client).await {
            Ok(missing) if missing.is_empty() => return,
            Ok(missing) => tracing::error!(
                missing = %missing.join(", "),
                "CustomResourceDefinitions missing or not Established; install them with `kubectl apply --server-side -f charts/meshline/crds/` (retrying in 10s)"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot read CustomResourceDefinitions (retrying in 10s)")
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The EndpointSlices the controller watches: those of its own Services. The EndpointSlice controller copies a
/// Service's labels onto its slices (all but its own reserved ones), so the managed-by label selects them and no
/// other Service's slices are held in memory.
pub fn endpoint_slice_config() -> watcher::Config {
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"))
}

/// Per-object exponential backoff: the failure count lives in the map until the next success.
fn error_policy<K: Resource<DynamicType = ()>>(
    failures: &std::sync::Mutex<HashMap<ObjectRef<K>, u32>>,
    obj: &K,
    error: &Error,
) -> Action {
    let key = ObjectRef::from_obj(obj);
    let mut map = failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = map.entry(key).or_insert(0);
    *n += 1;
    let wait = super::flow::backoff(*n - 1);
    tracing::warn!(
        namespace = %obj.meta().namespace.clone().unwrap_or_default(),
        name = %obj.meta().name.clone().unwrap_or_default(),
        error = %error, label = error.metric_label(), retry_in_s = wait.as_secs(),
        "reconcile failed"
    );
    Action::requeue(wait)
}

/// The flows that use a contract: the ones naming it in the same namespace.
pub fn flows_of_contract(
    flows: &[Arc<SyncFlow>],
    contract: &SyncContract,
) -> Vec<ObjectRef<SyncFlow>> {
    let ns = contract.namespace();
    let name = contract.name_any();
    flows
        .iter()
        .filter(|f| f.namespace() == ns && f.spec.contract.name == name)
        .map(|f| ObjectRef::from_obj(&**f))
        .collect()
}

/// The flows a roster covers now plus those it covered when last seen (so an assignment that is removed
/// re-reconciles the flows that lost their owner). Updates the index.
pub fn flows_of_roster(
    ctx: &Context,
    roster: &OwnershipRoster,
    deleted: bool,
) -> Vec<ObjectRef<SyncFlow>> {
    let ns = roster.namespace();
    let now: HashSet<ObjectRef<SyncFlow>> = if deleted {
        HashSet::new()
    } else {
        super::roster::covered(roster, &ctx.stores.flows.state())
            .into_iter()
            .map(|n| ObjectRef::new(&n).within(ns.as_deref().unwrap_or_default()))
            .collect()
    };
    let key = ObjectRef::from_obj(roster);
    let mut index = ctx.roster_index.lock().unwrap_or_else(|e| e.into_inner());
    let before = if deleted {
        index.remove(&key)
    } else {
        index.insert(key, now.clone())
    };
    now.union(&before.unwrap_or_default()).cloned().collect()
}

/// The flows that mount a Secret, by name: their own, or their roster's (ticket sinks, identities).
pub fn flows_of_secret(
    flows: &[Arc<SyncFlow>],
    rosters: &[Arc<OwnershipRoster>],
    namespace: Option<&str>,
    secret: &str,
) -> Vec<ObjectRef<SyncFlow>> {
    flows
        .iter()
        .filter(|f| f.namespace().as_deref() == namespace)
        .filter(|f| {
            let roster = super::flow::validate::owning_roster(f, rosters);
            super::flow::build::mounted_secrets(f, roster.as_ref().map(|(r, _)| &**r))
                .iter()
                .any(|s| s == secret)
        })
        .map(|f| ObjectRef::from_obj(&**f))
        .collect()
}

/// The flow whose ledger a PVC is, by name. A retained ledger carries no owner reference, so the owner-based
/// trigger would miss it: its deletion by hand, say, must still bring its flow back to reconcile it.
pub fn flows_of_ledger(
    flows: &[Arc<SyncFlow>],
    namespace: Option<&str>,
    pvc: &str,
) -> Vec<ObjectRef<SyncFlow>> {
    flows
        .iter()
        .filter(|f| f.namespace().as_deref() == namespace)
        .filter(|f| super::flow::build::ledger_name(&f.name_any()) == pvc)
        .map(|f| ObjectRef::from_obj(&**f))
        .collect()
}

/// Runs the controller until it loses leadership or the process is stopped.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    // A Lease name the API server would refuse fails every election round; say so once, at start.
    if !settings.no_leader_election
        && let Err(reason) = super::names::NameRule::Subdomain.check(&settings.lease_name)
    {
        return Err(RunError::Lease {
            namespace: settings.lease_namespace.clone(),
            name: settings.lease_name.clone(),
            reason: format!("--lease-name {reason}"),
        });
    }
    let client = Client::try_default()
        .await
        .map_err(|e| RunError::Client(Box::new(e)))?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (stores, writers) = Stores::new();

    // The operations server starts first, so probes answer while the CRDs are awaited.
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| RunError::Listen {
            addr: settings.listen.to_string(),
            reason: e.to_string(),
        })?;
    {
        let (metrics, ready, flows) = (metrics.clone(), ready.clone(), stores.flows.clone());
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let ready = ready.clone();
                    async move {
                        if ready.load(Ordering::Relaxed) {
                            (axum::http::StatusCode::OK, "ready")
                        } else {
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "waiting for the CRDs",
                            )
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let (metrics, flows) = (metrics.clone(), flows.clone());
                    async move {
                        metrics.count_flows(&flows.state());
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics.encode(),
                        )
                    }
                }),
            );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "operations server stopped");
            }
        });
    }

    // Bound before leadership, so a bad address fails the start rather than the leader later.
    let ops_page = match settings.ops_page {
        Some(addr) => {
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| RunError::Listen {
                        addr: format!("{addr} (--ops-page-addr)"),
                        reason: e.to_string(),
                    })?,
            )
        }
        None => None,
    };
    // The page answers from the start (a standby's says so); it reads the caches once this replica leads.
    let ops_page_leading = Arc::new(AtomicBool::new(false));
    if let Some(listener) = ops_page {
        let backend = Arc::new(crate::ops_page::cluster::ClusterBackend {
            stores: stores.clone(),
            source: if settings.status_via_proxy {
                Arc::new(super::poll::ViaProxy {
                    client: client.clone(),
                })
            } else {
                Arc::new(super::poll::Direct::new())
            },
            leading: ops_page_leading.clone(),
        });
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving the operations page");
        tokio::spawn(async move {
            if let Err(e) = crate::ops_page::serve(listener, backend).await {
                tracing::error!(error = %e, "operations page stopped");
            }
        });
    }

    wait_for_crds(&client).await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(namespace = ?settings.namespace, "CustomResourceDefinitions are Established");

    // Leadership: standbys wait here; a leader that loses the lease stops (and is restarted as a standby).
    let (leader_tx, mut leader_rx) = watch::channel(settings.no_leader_election);
    if !settings.no_leader_election {
        let election = super::leader::LeaderElection::new(
            client.clone(),
            &settings.lease_namespace,
            &settings.lease_name,
            &settings.identity,
        );
        tokio::spawn(election.run(leader_tx));
        tracing::info!(lease = %settings.lease_name, identity = %settings.identity, "waiting to become the leader");
        while !*leader_rx.borrow_and_update() {
            if leader_rx.changed().await.is_err() {
                return Err(RunError::LostLeadership);
            }
        }
    }
    let lost = {
        let mut rx = leader_rx.clone();
        let always_leader = settings.no_leader_election;
        async move {
            if always_leader {
                return future::pending::<()>().await;
            }
            while *rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
        .boxed()
        .shared()
    };

    let ns = settings.namespace.as_deref();
    let source: Arc<dyn WorkerStatusSource> = if settings.status_via_proxy {
        Arc::new(super::poll::ViaProxy {
            client: client.clone(),
        })
    } else {
        Arc::new(super::poll::Direct::new())
    };
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            BuildSettings {
                worker_image: settings.worker_image.clone(),
                worker_defaults: settings.worker_defaults.clone(),
                network_policy: match &settings.network_policies {
                    FlowNetworkPolicies::On(np) => Some(np.clone()),
                    FlowNetworkPolicies::Off | FlowNetworkPolicies::CleanUp => None,
                },
            },
            stores.clone(),
            metrics.clone(),
        )
        .with_workers(source.clone())
        .with_outage(settings.outage),
    );
    ops_page_leading.store(true, Ordering::Relaxed);
    let managed =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let super::Writers {
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
    } = writers;

    // Reflected streams, shared between the caches and the controllers' triggers.
    let flows = reflector::reflector(
        wf,
        watcher(api::<SyncFlow>(&client, ns), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let contracts = reflector::reflector(
        wc,
        watcher(api::<SyncContract>(&client, ns), watcher::Config::default()),
    )
    .default_backoff();
    let rosters = reflector::reflector(
        wr,
        watcher(
            api::<OwnershipRoster>(&client, ns),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    let deployments =
        reflector::reflector(wd, watcher(api::<Deployment>(&client, ns), managed.clone()))
            .default_backoff()
            .touched_objects();
    let config_maps =
        reflector::reflector(wcm, watcher(api::<ConfigMap>(&client, ns), managed.clone()))
            .default_backoff()
            .touched_objects();
    let services = reflector::reflector(ws, watcher(api::<Service>(&client, ns), managed.clone()))
        .default_backoff()
        .touched_objects();
    let pdbs = reflector::reflector(
        wp,
        watcher(api::<PodDisruptionBudget>(&client, ns), managed.clone()),
    )
    .default_backoff()
    .touched_objects();
    let pvcs = reflector::reflector(
        wv,
        watcher(api::<PersistentVolumeClaim>(&client, ns), managed.clone()),
    )
    .default_backoff()
    .touched_objects();
    let tokens = reflector::reflector(wt, watcher(api::<Secret>(&client, ns), managed.clone()))
        .default_backoff()
        .touched_objects();
    // Contract revisions: a flow runs the active one, so a revision arriving in the cache after the contract's
    // status named it re-reconciles the contract's flows.
    let revisions = reflector::reflector(
        wrv,
        watcher(api::<ControllerRevision>(&client, ns), managed.clone()),
    )
    .default_backoff()
    .touched_objects();
    // Preflight replay Jobs, owned by their contract.
    let jobs = reflector::reflector(wj, watcher(api::<Job>(&client, ns), managed.clone()))
        .default_backoff()
        .touched_objects();
    // The flows' audit CronJobs, owned by their flow.
    let cron_jobs =
        reflector::reflector(wcj, watcher(api::<CronJob>(&client, ns), managed.clone()))
            .default_backoff()
            .touched_objects();
    // Nothing reconciles on EndpointSlices: the poller reads the cache each period, so the reflector only has
    // to be driven.
    tokio::spawn(
        reflector::reflector(
            we,
            watcher(api::<EndpointSlice>(&client, ns), endpoint_slice_config()),
        )
        .default_backoff()
        .for_each(|_| future::ready(())),
    );
    // Watched only when the switch asks for it: with it off the controller has no right to list them.
    let network_policies = match settings.network_policies {
        FlowNetworkPolicies::Off => None,
        FlowNetworkPolicies::On(_) | FlowNetworkPolicies::CleanUp => Some(
            reflector::reflector(
                wn,
                watcher(api::<NetworkPolicy>(&client, ns), managed.clone()),
            )
            .default_backoff()
            .touched_objects(),
        ),
    };
    // Referenced Secrets are watched by metadata only: the mapper needs names, and the controller should not
    // hold every Secret's data in memory.
    let secret_meta = watcher(
        api::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();

    // Contract and roster events feed both their own controllers and the flow controller, so each reflected
    // stream is split in two.
    let (contract_events_tx, contract_events_rx) =
        futures::channel::mpsc::unbounded::<(SyncContract, bool)>();
    let (roster_events_tx, roster_events_rx) =
        futures::channel::mpsc::unbounded::<(OwnershipRoster, bool)>();
    let (flow_events_tx, flow_events_rx) = futures::channel::mpsc::unbounded::<SyncFlow>();
    // The contract controller hears the same events: a flow bound or unbound changes who signs and where
    // preflight runs, and a roster edit changes the owners who sign.
    let (contract_flow_tx, contract_flow_rx) = futures::channel::mpsc::unbounded::<SyncFlow>();
    let (contract_roster_tx, contract_roster_rx) =
        futures::channel::mpsc::unbounded::<OwnershipRoster>();
    let contracts = contracts.filter_map(move |ev| {
        future::ready(match ev {
            Ok(watcher::Event::Apply(c)) | Ok(watcher::Event::InitApply(c)) => {
                let _ = contract_events_tx.unbounded_send((c.clone(), false));
                Some(Ok(c))
            }
            Ok(watcher::Event::Delete(c)) => {
                let _ = contract_events_tx.unbounded_send((c, true));
                None
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    });
    let rosters = rosters.filter_map(move |ev| {
        future::ready(match ev {
            Ok(watcher::Event::Apply(r)) | Ok(watcher::Event::InitApply(r)) => {
                let _ = roster_events_tx.unbounded_send((r.clone(), false));
                let _ = contract_roster_tx.unbounded_send(r.clone());
                Some(Ok(r))
            }
            Ok(watcher::Event::Delete(r)) => {
                let _ = contract_roster_tx.unbounded_send(r.clone());
                let _ = roster_events_tx.unbounded_send((r, true));
                None
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    });
    let flows = flows.inspect(move |f| {
        if let Ok(f) = f {
            let _ = flow_events_tx.unbounded_send(f.clone());
            let _ = contract_flow_tx.unbounded_send(f.clone());
        }
    });

    let (poll_tx, poll_rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(super::poll::run(
        ctx.clone(),
        source,
        settings.status_period,
        settings.poll.clone(),
        poll_tx,
    ));

    let flow_failures = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let contract_failures = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let roster_failures = Arc::new(std::sync::Mutex::new(HashMap::new()));

    let c1 = ctx.clone();
    let c2 = ctx.clone();
    let c3 = ctx.clone();
    let c4 = ctx.clone();
    let c5 = ctx.clone();
    let c6 = ctx.clone();
    let flow_controller =
        Controller::for_stream(flows, stores.flows.clone())
            .owns_stream(deployments)
            .owns_stream(config_maps)
            .owns_stream(services)
            .owns_stream(pdbs)
            .owns_stream(tokens)
            .owns_stream(cron_jobs)
            .owns_stream(match network_policies {
                Some(stream) => stream.left_stream(),
                None => futures::stream::pending().right_stream(),
            })
            .reconcile_on(poll_rx)
            .reconcile_on(
                pvcs.filter_map(move |pvc| {
                    future::ready(pvc.ok().map(|pvc| {
                        futures::stream::iter(flows_of_ledger(
                            &c4.stores.flows.state(),
                            pvc.metadata.namespace.as_deref(),
                            &pvc.name_any(),
                        ))
                    }))
                })
                .flatten(),
            )
            .reconcile_on(
                revisions
                    .filter_map(move |r| {
                        future::ready(r.ok().and_then(|r| {
                            let owner = r
                                .owner_references()
                                .iter()
                                .find(|o| o.kind == "SyncContract")?
                                .name
                                .clone();
                            let c = c5
                                .stores
                                .contracts
                                .get(&ObjectRef::new(&owner).within(&r.namespace()?))?;
                            Some(futures::stream::iter(flows_of_contract(
                                &c5.stores.flows.state(),
                                &c,
                            )))
                        }))
                    })
                    .flatten(),
            )
            .reconcile_on(contract_events_rx.flat_map(move |(c, _)| {
                futures::stream::iter(flows_of_contract(&c1.stores.flows.state(), &c))
            }))
            .reconcile_on(roster_events_rx.flat_map(move |(r, deleted)| {
                futures::stream::iter(flows_of_roster(&c2, &r, deleted))
            }))
            .reconcile_on(
                secret_meta
                    .filter_map(move |s| {
                        future::ready(s.ok().map(|s| {
                            futures::stream::iter(flows_of_secret(
                                &c3.stores.flows.state(),
                                &c3.stores.rosters.state(),
                                s.metadata.namespace.as_deref(),
                                &s.name_any(),
                            ))
                        }))
                    })
                    .flatten(),
            )
            .graceful_shutdown_on(lost.clone())
            .run(
                {
                    let failures = flow_failures.clone();
                    move |obj, ctx| {
                        let failures = failures.clone();
                        async move {
                            let key = ObjectRef::from_obj(&*obj);
                            let r = super::flow::reconcile(obj, ctx).await;
                            if r.is_ok() {
                                failures
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&key);
                            }
                            r
                        }
                    }
                },
                move |obj, err, _| error_policy(&flow_failures, &*obj, err),
                ctx.clone(),
            )
            .for_each(|_| future::ready(()));

    let ctx_r = ctx.clone();
    let roster_controller = Controller::for_stream(rosters, stores.rosters.clone())
        .reconcile_on(flow_events_rx.flat_map(move |f| {
            let ns = f.namespace();
            futures::stream::iter(
                ctx_r
                    .stores
                    .rosters
                    .state()
                    .iter()
                    .filter(|r| r.namespace() == ns)
                    .map(|r| ObjectRef::from_obj(&**r))
                    .collect::<Vec<_>>(),
            )
        }))
        .graceful_shutdown_on(lost.clone())
        .run(
            {
                let failures = roster_failures.clone();
                move |obj, ctx| {
                    let failures = failures.clone();
                    async move {
                        let key = ObjectRef::from_obj(&*obj);
                        let r = super::roster::reconcile(obj, ctx).await;
                        if r.is_ok() {
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&key);
                        }
                        r
                    }
                }
            },
            move |obj, err, _| error_policy(&roster_failures, &*obj, err),
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));

    let contract_controller = Controller::for_stream(contracts, stores.contracts.clone())
        .owns_stream(jobs)
        .reconcile_on(contract_flow_rx.filter_map(|f| {
            future::ready(
                f.namespace()
                    .map(|ns| ObjectRef::<SyncContract>::new(&f.spec.contract.name).within(&ns)),
            )
        }))
        .reconcile_on(contract_roster_rx.flat_map(move |r| {
            // Every contract with a flow in the roster's namespace: an owner change may complete a sign-off.
            let ns = r.namespace();
            let mut contracts: Vec<ObjectRef<SyncContract>> = c6
                .stores
                .flows
                .state()
                .iter()
                .filter(|f| f.namespace() == ns)
                .filter_map(|f| Some(ObjectRef::new(&f.spec.contract.name).within(&f.namespace()?)))
                .collect();
            contracts.sort_by(|a, b| a.name.cmp(&b.name));
            contracts.dedup();
            futures::stream::iter(contracts)
        }))
        .graceful_shutdown_on(lost.clone())
        .run(
            {
                let failures = contract_failures.clone();
                move |obj, ctx| {
                    let failures = failures.clone();
                    async move {
                        let key = ObjectRef::from_obj(&*obj);
                        let r = super::contract::reconcile(obj, ctx).await;
                        if r.is_ok() {
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&key);
                        }
                        r
                    }
                }
            },
            move |obj, err, _| error_policy(&contract_failures, &*obj, err),
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));

    tracing::info!("reconciling SyncFlows, SyncContracts and OwnershipRosters");
    tokio::join!(flow_controller, roster_controller, contract_controller);
    if settings.no_leader_election || *leader_rx.borrow() {
        Ok(())
    } else {
        Err(RunError::LostLeadership)
    }
}
