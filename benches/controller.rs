//! Controller benchmark: 1,000 SyncFlows against the in-process API double.
//!
//! Reports (1) the CPU time of one reconcile (thread CPU time, p50/p99/max, on a current-thread runtime, so
//! the double's own work on the same thread is included: the figure is an upper bound), for the first
//! reconcile (creating everything) and for a full resync of unchanged flows; (2) the writes that resync
//! made (must be 0); (3) the process RSS (controller and double together) with 1,000 flows cached.
//!
//!   cargo bench --bench controller

#[path = "../tests/controller_support/mod.rs"]
mod controller_support;

use std::sync::Arc;

use controller_support::{ApiDouble, Recorded};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use kube::runtime::watcher;
use meshline::api::{OwnershipRoster, SyncContract, SyncFlow};
use meshline::controller::flow::build::BuildSettings;
use meshline::controller::metrics::Metrics;
use meshline::controller::{Context, Stores, Writers};

const NS: &str = "commerce-sync";
const FLOWS: usize = 1000;

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

fn settle(w: &mut Writers, requests: &[Recorded], flows: &mut [SyncFlow]) {
    for r in requests
        .iter()
        .filter(|r| r.method == "PATCH" || r.method == "POST")
    {
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
            "Deployment" => {
                let mut d: Deployment = serde_json::from_value(body).unwrap();
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
                let name = r
                    .path
                    .trim_end_matches("/status")
                    .rsplit('/')
                    .next()
                    .unwrap();
                let i: usize = name.trim_start_matches("flow-").parse().unwrap();
                flows[i].status = Some(serde_json::from_value(r.body["status"].clone()).unwrap());
            }
            _ => {}
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

/// Reconciles every flow once, feeding what was applied back into the caches as the watches would (so no
/// request log accumulates), and returns the number of writes.
async fn pass(
    label: &str,
    ctx: &Arc<Context>,
    double: &ApiDouble,
    writers: &mut Writers,
    flows: &mut [SyncFlow],
) -> usize {
    let mut cpu = Vec::with_capacity(flows.len());
    let mut writes = 0;
    for i in 0..flows.len() {
        let flow = Arc::new(flows[i].clone());
        let start = thread_cpu_ns();
        meshline::controller::flow::reconcile(flow, ctx.clone())
            .await
            .unwrap();
        cpu.push(thread_cpu_ns() - start);
        let requests = double.take();
        writes += requests.iter().filter(|r| r.is_write()).count();
        settle(writers, &requests, flows);
    }
    cpu.sort_unstable();
    println!(
        "{label:<28} reconcile CPU p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms   writes {writes}",
        percentile(&cpu, 0.5),
        percentile(&cpu, 0.99),
        percentile(&cpu, 1.0)
    );
    writes
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
        let (stores, mut writers) = Stores::new();
        let mut contract: SyncContract = load("contract.yaml");
        contract.metadata.uid = Some("c".into());
        let contract = controller_support::activated(contract, &mut writers.revisions);
        put(&mut writers.contracts, contract);
        put(&mut writers.rosters, load::<OwnershipRoster>("roster.yaml"));
        let ctx = Arc::new(Context::new(
            double.client(),
            BuildSettings {
                worker_image: "img:1".into(),
                ..BuildSettings::default()
            },
            stores,
            Arc::new(Metrics::new()),
        ));
        let template: SyncFlow = load("flow.yaml");
        let mut flows: Vec<SyncFlow> = (0..FLOWS)
            .map(|i| {
                let mut f = template.clone();
                f.metadata.name = Some(format!("flow-{i:04}"));
                f.metadata.uid = Some(format!("uid-{i}"));
                f.metadata.generation = Some(1);
                f
            })
            .collect();
        for f in &flows {
            put(&mut writers.flows, f.clone());
            let path = format!(
                "/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/syncflows/{}",
                f.metadata.name.as_deref().unwrap()
            );
            double.put(&path, serde_json::to_value(f).unwrap());
        }
        let rss_before = rss_mb();
        pass(
            "first reconcile (create)",
            &ctx,
            &double,
            &mut writers,
            &mut flows,
        )
        .await;
        pass(
            "pods ready (status only)",
            &ctx,
            &double,
            &mut writers,
            &mut flows,
        )
        .await;
        let writes = pass(
            "full resync, unchanged",
            &ctx,
            &double,
            &mut writers,
            &mut flows,
        )
        .await;
        let rss = rss_mb();
        println!(
            "RSS with {FLOWS} flows cached: {rss:.1} MB (before reconciling: {rss_before:.1} MB)"
        );
        println!("writes during the unchanged resync: {writes}");
        assert_eq!(writes, 0, "an unchanged resync must not write");
        assert!(rss <= 100.0, "RSS {rss:.1} MB over the 100 MB budget");
    });
}
