//! Canary benchmark (issue #15, Speed): one controller managing 1,000 SyncFlows on PostgreSQL ledgers, all with
//! canary steps, 100 of them bound to contracts whose candidate is in `Canary`, against the in-process API
//! double.
//!
//! Every flow has an observation from the status poll (its stable pod, and for a canaried flow its canary pod),
//! and the workers follow the split the controller writes before the next pass, as they would. The ledger's
//! per-revision measures are answered by a scripted operations API. Between passes a manual clock moves on, so
//! measurements fall due and steps advance (10 % → 50 % with a 10-minute pause → 100 % → promoting).
//!
//! Reports: the process RSS (controller and double together, so an upper bound for the controller) after setup
//! and after the passes; per pass, the thread CPU time of one reconcile (p50/p99, canaried and idle flows apart,
//! on a current-thread runtime so the double's work is included); the API writes (Events apart) and the
//! measure calls; and how many canaries advanced a step. The only assertion is that the rollouts progressed:
//! the RSS figure is compared with the 150 MB budget by whoever reads the report.
//!
//! The API double's change log is dropped after every pass (nothing watches it), but its objects stay: the RSS
//! still counts the API server's copy of every object next to the controller's caches.
//!
//!   cargo bench --bench canary            (CANARY_BENCH_DEBUG=1 prints every write)

#[path = "../tests/controller_support/mod.rs"]
mod controller_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use controller_support::{ApiDouble, Recorded};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use meshline::api::{
    CanaryStatus, ContractRevision, OwnershipRoster, RevisionState, SignOff, SyncContract, SyncFlow,
};
use meshline::controller::contract::build as contract_build;
use meshline::controller::flow::build as flow_build;
use meshline::controller::flow::status::{Observation, PodAnswer, PodObservation};
use meshline::controller::poll::{FetchError, WorkerAnswer, WorkerPod, WorkerStatusSource};
use meshline::controller::{Context, Writers};
use meshline::ledger::ManualClock;
use serde_json::{Value, json};

const NS: &str = "commerce-sync";
const FLOWS: usize = 1000;
const CANARIES: usize = 100;
/// Canaried flows per contract in `Canary`: a candidate rolls out on every flow bound to its contract.
const FLOWS_PER_CANARY_CONTRACT: usize = 10;
/// Passes after the two that create the children: enough for every step of the policy below.
const PASSES: usize = 8;
/// More than the analysis interval (1m) and half the 10-minute pause: a measurement is due on every pass
/// whose step has started, and the pause ends two passes after its step started.
const CLOCK_STEP: Duration = Duration::from_secs(301);
const START_MS: i64 = 1_800_000_000_000;

fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn put<K: kube::Resource<DynamicType = ()> + Clone>(
    w: &mut kube::runtime::reflector::store::Writer<K>,
    obj: K,
) {
    w.apply_watcher_event(&watcher::Event::Apply(obj));
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

/// The workers' operations API: per-revision measures from a script (a healthy canary, a healthy stable
/// track), counted.
struct Workers {
    measures: BTreeMap<String, Value>,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl WorkerStatusSource for Workers {
    async fn fetch(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        _token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        unreachable!("the reconcilers read /status through the poller's observations")
    }

    async fn call(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        method: http::Method,
        path: &str,
        _token: Option<&str>,
        _body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let url = url::Url::parse(&format!("http://worker{path}")).unwrap();
        match (method.as_str(), url.path()) {
            ("GET", "/rollout/measures") => {
                let revision = url
                    .query_pairs()
                    .find(|(k, _)| k == "revision")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                match self.measures.get(&revision) {
                    Some(m) => Ok((200, m.to_string().into_bytes())),
                    None => Ok((503, b"ledger unavailable".to_vec())),
                }
            }
            ("POST", "/rollout/release") => Ok((200, br#"{"released": 0}"#.to_vec())),
            _ => Ok((404, Vec::new())),
        }
    }
}

fn measures(records: i64, failed: i64) -> Value {
    let rate = format!("{}", failed as f64 / records as f64);
    json!({"records": records, "delivered": records, "failed": failed, "deadLettered": 0, "held": 0,
           "failureRate": rate, "deadLetterRate": "0", "p99Ms": 120})
}

/// A worker's `/status`: the revision it runs and the split it applies.
fn worker(flow: &str, revision: &str, track: &str, split: &Value) -> PodAnswer {
    let status = json!({
        "flow": flow, "contractVersion": "2.0.1", "backend": "postgres",
        "counters": {"received": 200, "delivered": 199, "failed": 0, "retried": 1, "deadLettered": 1, "held": 0},
        "pending": 0, "failureRate": "0.005", "lastDeliveryTime": "2026-01-02T03:04:05Z", "mttrSeconds": null,
        "manualInterventionsPer1k": "0", "oldestPendingSeconds": null, "circuitBreaker": null, "paused": null,
        "revision": revision,
        "rollout": {"track": track, "canaryRevision": split.get("canaryRevision"),
                    "weight": split.get("weight").cloned().unwrap_or(json!(0)), "buckets": "x"},
    });
    PodAnswer::Running(Box::new(serde_json::from_value(status).unwrap()))
}

/// One flow as the bench drives it.
struct Bound {
    flow: SyncFlow,
    /// (active revision, candidate revision in `Canary`, or `None` for an idle flow).
    active: String,
    candidate: Option<String>,
}

/// Feeds what a reconcile applied back into the caches, as the watches would (so no request log accumulates):
/// a Deployment gets a uid (its canary's ConfigMap and Service wait for it) and ready pods.
fn settle(w: &mut Writers, requests: &[Recorded], bound: &mut Bound) {
    for r in requests {
        let name = r.path.rsplit('/').next().unwrap_or_default().to_string();
        if r.method == "DELETE" && r.kind() == "Deployment" {
            let mut d = Deployment::default();
            d.metadata.name = Some(name);
            d.metadata.namespace = Some(NS.into());
            w.deployments
                .apply_watcher_event(&watcher::Event::Delete(d));
            continue;
        }
        if r.method != "PATCH" && r.method != "POST" {
            continue;
        }
        let body = r.body.clone();
        match r.kind() {
            "ConfigMap" => put(
                &mut w.config_maps,
                serde_json::from_value::<ConfigMap>(body).unwrap(),
            ),
            "Service" => put(
                &mut w.services,
                serde_json::from_value::<Service>(body).unwrap(),
            ),
            "PersistentVolumeClaim" => put(
                &mut w.pvcs,
                serde_json::from_value::<PersistentVolumeClaim>(body).unwrap(),
            ),
            "Secret" => put(
                &mut w.tokens,
                serde_json::from_value::<Secret>(body).unwrap(),
            ),
            // Four replicas: every stable track has a budget.
            "PodDisruptionBudget" => put(
                &mut w.pdbs,
                serde_json::from_value::<PodDisruptionBudget>(body).unwrap(),
            ),
            "Deployment" => {
                let mut d: Deployment = serde_json::from_value(body).unwrap();
                d.metadata.uid = Some(format!("uid-{name}"));
                d.metadata.generation = Some(1);
                d.status = Some(DeploymentStatus {
                    observed_generation: Some(1),
                    ready_replicas: Some(1),
                    updated_replicas: Some(1),
                    replicas: Some(1),
                    ..DeploymentStatus::default()
                });
                put(&mut w.deployments, d);
            }
            "SyncFlow" if r.path.ends_with("/status") => {
                bound.flow.status = Some(serde_json::from_value(r.body["status"].clone()).unwrap());
            }
            _ => {}
        }
    }
}

/// The status poll's observation of every flow: its workers run their track's revision and apply the split the
/// controller last wrote (the workers follow the rollout ConfigMap); a canary pod answers while the canary
/// Deployment exists.
fn observe(ctx: &Context, flows: &[Bound]) {
    let mut map = ctx.observations.lock().unwrap();
    for b in flows {
        let name = b.flow.metadata.name.as_deref().unwrap();
        let split: Value = ctx
            .stores
            .config_maps
            .get(&ObjectRef::new(&flow_build::rollout_name(name)).within(NS))
            .and_then(|cm| serde_json::from_str(cm.data.as_ref()?.get("split.json")?).ok())
            .unwrap_or_else(|| json!({"weight": 0}));
        let mut pods = vec![PodObservation {
            pod: format!("{}-7d9f8-abcde", flow_build::worker_name(name)),
            address: "10.0.0.7".into(),
            ready: true,
            answer: worker(name, &b.active, "stable", &split),
        }];
        let canary_runs = ctx
            .stores
            .deployments
            .get(&ObjectRef::new(&flow_build::canary_name(name)).within(NS))
            .is_some();
        if let (Some(candidate), true) = (&b.candidate, canary_runs) {
            pods.push(PodObservation {
                pod: format!("{}-5c4b-xyz12", flow_build::canary_name(name)),
                address: "10.0.0.8".into(),
                ready: true,
                answer: worker(name, candidate, "canary", &split),
            });
        }
        map.insert(
            ObjectRef::from_obj(&b.flow),
            Observation::from_pods(pods, None),
        );
    }
}

/// A rollout's position: its step, and the phase (the last step passed moves it to `Promoting`).
fn position(status: Option<&CanaryStatus>) -> (u32, bool) {
    status.map_or((0, false), |c| {
        (
            c.step as u32,
            c.phase == "Promoting" || c.phase == "Promoted",
        )
    })
}

fn canary_of(b: &Bound) -> Option<&CanaryStatus> {
    b.flow.status.as_ref()?.canary.as_ref()
}

struct PassFigures {
    writes: usize,
    events: usize,
    advanced: usize,
}

/// Reconciles every flow once and prints the CPU time per reconcile, canaried and idle flows apart.
async fn pass(
    label: &str,
    ctx: &Arc<Context>,
    double: &ApiDouble,
    writers: &mut Writers,
    flows: &mut [Bound],
) -> PassFigures {
    observe(ctx, flows);
    let mut canaried = Vec::with_capacity(CANARIES);
    let mut idle = Vec::with_capacity(flows.len());
    let mut figures = PassFigures {
        writes: 0,
        events: 0,
        advanced: 0,
    };
    for b in flows.iter_mut() {
        let before = position(canary_of(b));
        let flow = Arc::new(b.flow.clone());
        let start = thread_cpu_ns();
        meshline::controller::flow::reconcile(flow, ctx.clone())
            .await
            .unwrap();
        let cpu = thread_cpu_ns() - start;
        if b.candidate.is_some() {
            canaried.push(cpu);
        } else {
            idle.push(cpu);
        }
        let requests = double.take();
        for r in requests.iter().filter(|r| r.is_write()) {
            if std::env::var_os("CANARY_BENCH_DEBUG").is_some() {
                eprintln!("{label}: {} {} {}", r.method, r.path, r.body);
            }
            if r.path.contains("/events") {
                figures.events += 1;
            } else {
                figures.writes += 1;
            }
        }
        settle(writers, &requests, b);
        if position(canary_of(b)) > before {
            figures.advanced += 1;
        }
    }
    // Nothing watches the double: its change log (every version of every object written) is the API server's
    // memory, not the controller's, and would otherwise grow with every pass and count in the RSS.
    double.forget_history();
    canaried.sort_unstable();
    idle.sort_unstable();
    println!(
        "{label:<30} canaried p50 {:6.3} ms p99 {:6.3} ms | idle p50 {:6.3} ms p99 {:6.3} ms | writes {:5} events {:4} | canaries advanced {:3} | RSS {:.1} MB",
        percentile(&canaried, 0.5),
        percentile(&canaried, 0.99),
        percentile(&idle, 0.5),
        percentile(&idle, 0.99),
        figures.writes,
        figures.events,
        figures.advanced,
        rss_mb(),
    );
    figures
}

/// `base` under `name` with its spec active and, when `candidate` is set, v2.0.2 (signed by the source and sink
/// owners) in `Canary`, as the contract reconciler leaves it after the candidate's preflight passed. Both
/// revisions land in the revision cache. Returns (contract, active revision, candidate revision).
fn contract(
    base: &SyncContract,
    name: &str,
    candidate: bool,
    writers: &mut Writers,
) -> (SyncContract, String, Option<String>) {
    let mut c = base.clone();
    c.metadata.name = Some(name.into());
    c.metadata.uid = Some(format!("uid-{name}"));
    c.metadata.generation = Some(1);
    let mut c = controller_support::activated(c, &mut writers.revisions);
    let active = c
        .status
        .as_ref()
        .and_then(|s| s.active_revision.clone())
        .unwrap();
    if !candidate {
        return (c, active, None);
    }
    c.spec.version = "2.0.2".into();
    c.spec.sla = None;
    for owner in ["lena", "tomas"] {
        c.spec.sign_offs.push(SignOff {
            owner: owner.into(),
            version: "2.0.2".into(),
            content_hash: None,
            role: None,
            approved_at: None,
        });
    }
    c.metadata.generation = Some(2);
    let hash = meshline::contract::content_hash(&c.spec)
        .as_str()
        .to_string();
    let revision = contract_build::controller_revision(&c, &hash, 2);
    let revision_name = revision.metadata.name.clone().unwrap();
    put(&mut writers.revisions, revision);
    c.status.as_mut().unwrap().revisions.push(ContractRevision {
        name: Some(revision_name.clone()),
        version: "2.0.2".into(),
        content_hash: hash,
        state: RevisionState::Canary,
        ..Default::default()
    });
    (c, active, Some(revision_name))
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let double = ApiDouble::new();
        double.put_secret(NS, "hubspot-app", &["clientSecret", "accessToken"]);
        double.put_secret(NS, "odoo-api-key", &["login", "apiKey"]);
        double.put_secret(NS, "ledger-db", &["url"]);
        let (ctx, mut writers) = controller_support::context(&double);
        let clock = ManualClock::starting_at(START_MS);

        let base: SyncContract = load("contract.yaml");
        let mut scripted = BTreeMap::new();
        let mut contracts = Vec::new();
        let (idle_contract, idle_active, _) = contract(&base, "deal-to-sale-order", false, &mut writers);
        contracts.push(idle_contract);
        let mut canary_contracts = Vec::new();
        for k in 0..CANARIES / FLOWS_PER_CANARY_CONTRACT {
            let (c, active, candidate) = contract(
                &base,
                &format!("deal-to-sale-order-{k:02}"),
                true,
                &mut writers,
            );
            let candidate = candidate.unwrap();
            // The canary fails 1 % like stable: every measurement passes.
            scripted.insert(candidate.clone(), measures(100, 1));
            scripted.insert(active.clone(), measures(900, 9));
            canary_contracts.push((c.metadata.name.clone().unwrap(), active, candidate));
            contracts.push(c);
        }
        for c in contracts {
            put(&mut writers.contracts, c);
        }
        let mut roster: OwnershipRoster = load("roster.yaml");
        roster.metadata.generation = Some(1);
        put(&mut writers.rosters, roster);
        let workers = Arc::new(Workers {
            measures: scripted,
            calls: AtomicUsize::new(0),
        });
        let ctx = Arc::new(
            Arc::into_inner(ctx)
                .unwrap()
                .with_clock(clock.clone())
                .with_workers(workers.clone()),
        );

        let template: SyncFlow = serde_json::from_value({
            let mut f = serde_json::to_value(load::<SyncFlow>("flow.yaml")).unwrap();
            f["spec"]["ledger"] =
                json!({"type": "postgres", "credentialsSecretRef": {"name": "ledger-db"}});
            f["spec"]["replicas"] = json!(4);
            f["spec"]["rollout"] = json!({
                "preflightRecords": 500,
                "canary": {
                    "steps": [{"weight": 10}, {"weight": 50, "pause": "10m"}, {"weight": 100}],
                    "analysis": {"maxFailureRate": "0.05", "maxDeadLetterRate": "0.01", "minRecords": 20,
                                 "interval": "1m", "failureLimit": 1}
                }
            });
            f
        })
        .unwrap();
        let mut flows: Vec<Bound> = (0..FLOWS)
            .map(|i| {
                let mut f = template.clone();
                f.metadata.name = Some(format!("flow-{i:04}"));
                f.metadata.uid = Some(format!("uid-flow-{i}"));
                f.metadata.generation = Some(1);
                let (active, candidate) = if i < CANARIES {
                    let (contract, active, candidate) =
                        &canary_contracts[i / FLOWS_PER_CANARY_CONTRACT];
                    f.spec.contract.name = contract.clone();
                    (active.clone(), Some(candidate.clone()))
                } else {
                    (idle_active.clone(), None)
                };
                Bound {
                    flow: f,
                    active,
                    candidate,
                }
            })
            .collect();
        for b in &flows {
            put(&mut writers.flows, b.flow.clone());
            let path = format!(
                "/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/syncflows/{}",
                b.flow.metadata.name.as_deref().unwrap()
            );
            double.put(&path, serde_json::to_value(&b.flow).unwrap());
        }
        observe(&ctx, &flows);
        let rss_setup = rss_mb();
        println!(
            "{FLOWS} flows ({CANARIES} canaried on {} contracts in Canary, {} idle), {PASSES} passes {}s apart after the two that create the children",
            CANARIES / FLOWS_PER_CANARY_CONTRACT,
            FLOWS - CANARIES,
            CLOCK_STEP.as_secs()
        );
        println!("RSS after setup (caches and observations filled): {rss_setup:.1} MB");

        pass("1 create", &ctx, &double, &mut writers, &mut flows).await;
        pass("2 canary children", &ctx, &double, &mut writers, &mut flows).await;
        let mut advanced = 0;
        let mut writes = Vec::new();
        for p in 0..PASSES {
            clock.advance(CLOCK_STEP);
            let f = pass(
                &format!("{} +{}s", p + 3, CLOCK_STEP.as_secs() * (p as u64 + 1)),
                &ctx,
                &double,
                &mut writers,
                &mut flows,
            )
            .await;
            advanced += f.advanced;
            writes.push(f.writes + f.events);
        }
        let rss_after = rss_mb();
        let promoting = flows
            .iter()
            .filter(|b| position(canary_of(b)).1)
            .count();
        let moved = flows
            .iter()
            .filter(|b| position(canary_of(b)) > (0, false))
            .count();
        // SAFETY: malloc_trim only hands free heap pages back to the kernel.
        unsafe { libc::malloc_trim(0) };
        let rss_trimmed = rss_mb();
        // The API server's copy of every object is the double's memory: without it (and trimmed), what is left
        // is the controller's caches, observations and statuses, plus the runtime and the binary's pages.
        let objects = std::mem::take(&mut *double.objects.lock().unwrap());
        drop(objects);
        // SAFETY: as above.
        unsafe { libc::malloc_trim(0) };
        let rss_controller = rss_mb();
        println!("RSS after the passes: {rss_after:.1} MB (budget 150 MB)");
        println!(
            "  free heap returned (malloc_trim): {rss_trimmed:.1} MB; without the API double's objects too: {rss_controller:.1} MB"
        );
        println!(
            "API writes per timed pass (Events included): min {} max {} mean {:.0}",
            writes.iter().min().unwrap(),
            writes.iter().max().unwrap(),
            writes.iter().sum::<usize>() as f64 / writes.len() as f64
        );
        println!(
            "measure/release calls to the workers: {}",
            workers.calls.load(Ordering::Relaxed)
        );
        println!(
            "canaries advanced: {advanced} step advances in all; {moved} of {CANARIES} advanced at least one step, {promoting} passed every step (Promoting)"
        );
        assert!(
            moved > 0 && advanced > 0,
            "no canary advanced a step: the bench measured nothing"
        );
    });
}
