//! The whole worker — intake → ledger → contract → sink — with an in-process sink that answers at once, on
//! the example contract (closed-won Opportunity → NetSuite sales order, five line items, CEL rules against a
//! pricebook). Reports, on SQLite and on PostgreSQL (a throwaway server with fsync, synchronous commit and
//! full-page writes on):
//!
//! - throughput: records per second from the first ingest (four concurrent senders of 500-record batches)
//!   until the last outcome is in the ledger;
//! - added latency at a steady 500 records/s: intake accept → sink call, p50/p99/max;
//! - memory: RSS of a fresh process holding a 100,000-record backlog, and its peak while draining it;
//! - pressure: with a 20 ms sink and concurrency N, the most requests ever in flight (must be ≤ N) and the
//!   share of a backlog's time the N slots were all busy.
//!
//! `cargo bench --bench worker` (release). Not a criterion loop: each figure is one timed run of a realistic
//! size, which is what the targets are stated in.

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshline::api::{LedgerSpec, LedgerType, SecretRef};
use meshline::connectors::sinks::{Limited, Pressure};
use meshline::connectors::{
    Delivered, Delivery, Intake, IntakeError, IntakeReceipt, Sink, SinkError, SourceRecord,
};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

/// Answers at once (or after `delay`), recording when each record reached it and how many were in flight.
#[derive(Default)]
struct BenchSink {
    delay: Duration,
    delivered: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    arrivals: Mutex<Option<HashMap<String, Instant>>>,
}

#[async_trait]
impl Sink for BenchSink {
    fn system(&self) -> &'static str {
        "bench"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(map) = self.arrivals.lock().unwrap().as_mut() {
            map.insert(d.external_id.to_string(), Instant::now());
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.delivered.fetch_add(1, Ordering::SeqCst);
        Ok(Delivered {
            erp_id: None,
            created: Some(true),
            status: 201,
        })
    }
    async fn probe(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn fetch_lookup(&self, _: &str, _: &str) -> Result<Vec<Value>, SinkError> {
        Ok(Vec::new())
    }
}

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/contract")
            .join(name),
    )
    .expect("contract test data")
}

struct Records {
    template: Value,
    next: u64,
}

impl Records {
    fn new() -> Records {
        Records {
            template: serde_json::from_str(&data("good_record.json")).expect("good_record.json"),
            next: 0,
        }
    }
    fn take(&mut self, n: usize) -> Vec<SourceRecord> {
        (0..n)
            .map(|_| {
                let id = format!("0065g{:013}", self.next);
                self.next += 1;
                let mut payload = self.template.clone();
                payload["id"] = json!(id);
                SourceRecord {
                    key: id,
                    payload,
                    correlation_id: None,
                }
            })
            .collect()
    }
}

enum Backend<'s> {
    Sqlite,
    /// Every run gets a database of its own: runs reuse record keys, which in a shared ledger would be
    /// recognised as duplicates of the previous run's and never delivered.
    Postgres(&'s postgres::PgServer),
}

struct Bench {
    worker: Worker,
    sink: Arc<BenchSink>,
    _state: tempfile::TempDir,
}

async fn start(backend: &Backend<'_>, sink: BenchSink, concurrency: u32) -> Bench {
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .expect("example flow");
    rendered.flow.spec.delivery.concurrency = concurrency;
    rendered.flow.spec.delivery.rate_limit = 0;
    let state = tempfile::tempdir().expect("temp dir");
    let secrets = state.path().join("secrets");
    rendered.flow.spec.ledger = match backend {
        Backend::Sqlite => LedgerSpec::default(),
        Backend::Postgres(server) => {
            static RUNS: AtomicUsize = AtomicUsize::new(0);
            let run = RUNS.fetch_add(1, Ordering::SeqCst);
            let url = server.create_database(&format!("bench_worker_{run}"));
            // CREATE DATABASE writes the template into the WAL; flush it now, or the checkpoint that
            // follows lands inside the timed run.
            server.run_sql("postgres", "CHECKPOINT");
            std::fs::create_dir_all(secrets.join("ledger-pg")).unwrap();
            std::fs::write(secrets.join("ledger-pg/url"), url).unwrap();
            LedgerSpec {
                r#type: LedgerType::Postgres,
                credentials_secret_ref: Some(SecretRef {
                    name: "ledger-pg".into(),
                }),
                ..LedgerSpec::default()
            }
        }
    };
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: Some(secrets),
        token_file: None,
        options: PipelineOptions {
            worker_id: "bench".into(),
            idle_poll: Duration::from_millis(5),
            ..PipelineOptions::default()
        },
    };
    let sink = Arc::new(sink);
    // The same pressure wrapper `start_flow` puts around every real sink.
    let limited = Arc::new(Limited::new(
        sink.clone(),
        Pressure::from_policy(&rendered.flow.spec.delivery),
    ));
    let lookups: Value = serde_json::from_str(&data("lookups.json")).expect("lookups.json");
    let worker = Worker::start(&rendered, &settings, limited, lookups, |_| {
        axum::Router::new()
    })
    .await
    .expect("worker starts");
    Bench {
        worker,
        sink,
        _state: state,
    }
}

/// Waits until every record is delivered and recorded; false if that takes longer than `limit`.
async fn drained(bench: &Bench, total: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if bench.sink.delivered.load(Ordering::SeqCst) >= total {
            // `counts` aggregates the whole ledger; polled at a gentle pace so it does not slow the
            // completions it waits for (the figure is at most one interval late).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let counts = bench.worker.pipeline.ledger.counts().await.expect("counts");
            if counts.pending == 0 {
                assert_eq!(
                    counts.delivered, total,
                    "every record delivered: {counts:?}"
                );
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// Senders of webhook batches at once in the throughput run, as a CRM sends: each waits for its own
/// acknowledgement, and the intake's group commit may write several in one transaction.
const SENDERS: usize = 4;

/// Records/s through the whole worker: ingest in webhook-sized batches of 500 from a few concurrent senders
/// while the pipeline delivers. Building the records (the source's JSON) is part of the measured time.
async fn throughput(backend: &Backend<'_>, total: usize) -> f64 {
    let bench = start(backend, BenchSink::default(), 64).await;
    let mut records = Records::new();
    let started = Instant::now();
    let mut senders: tokio::task::JoinSet<Result<IntakeReceipt, IntakeError>> =
        tokio::task::JoinSet::new();
    for _ in 0..total / 500 {
        let batch = records.take(500);
        if senders.len() >= SENDERS {
            let sent = senders.join_next().await.expect("a sender");
            sent.expect("sender task").expect("ingest");
        }
        let intake = bench.worker.intake.clone();
        senders.spawn(async move { intake.accept(batch).await });
    }
    while let Some(sent) = senders.join_next().await {
        sent.expect("sender task").expect("ingest");
    }
    assert!(
        drained(&bench, total as u64, DRAIN_LIMIT).await,
        "throughput run did not drain"
    );
    let rate = total as f64 / started.elapsed().as_secs_f64();
    bench.worker.shutdown().await;
    rate
}

/// Added latency (intake accept → sink call) of single-record webhooks at a steady rate.
async fn latency(
    backend: &Backend<'_>,
    per_second: u32,
    seconds: u32,
) -> (Duration, Duration, Duration) {
    let sink = BenchSink {
        arrivals: Mutex::new(Some(HashMap::new())),
        ..BenchSink::default()
    };
    let bench = start(backend, sink, 16).await;
    let intake = bench.worker.intake.clone();
    let total = (per_second * seconds) as usize;
    let mut records = Records::new();
    let batches: Vec<Vec<SourceRecord>> = (0..total).map(|_| records.take(1)).collect();
    let interval = Duration::from_secs(1) / per_second;
    let started = tokio::time::Instant::now();
    let mut handed = HashMap::with_capacity(total);
    let mut senders = tokio::task::JoinSet::new();
    for (i, batch) in batches.into_iter().enumerate() {
        tokio::time::sleep_until(started + interval * i as u32).await;
        handed.insert(format!("SF-{}", batch[0].key), Instant::now());
        let intake = intake.clone();
        // Each webhook is its own request, as from a CRM: they do not wait for each other.
        senders.spawn(async move { intake.accept(batch).await.expect("ingest") });
    }
    while senders.join_next().await.is_some() {}
    let all = drained(&bench, total as u64, DRAIN_LIMIT).await;
    let arrivals = bench.sink.arrivals.lock().unwrap().take().unwrap();
    // A record still undelivered when the drain limit passed counts with the time it has waited so far.
    let mut lat: Vec<Duration> = handed
        .iter()
        .map(|(id, t)| {
            arrivals
                .get(id)
                .map_or_else(|| t.elapsed(), |a| a.duration_since(*t))
        })
        .collect();
    if !all {
        println!(
            "  (not drained within {DRAIN_LIMIT:?}: {} of {total} delivered)",
            arrivals.len()
        );
    }
    lat.sort();
    bench.worker.shutdown().await;
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    (at(0.50), at(0.99), *lat.last().unwrap())
}

/// With a 20 ms sink and concurrency `n`: the most in flight ever, and the share of samples (taken every
/// millisecond while at least `n` records waited) at which all `n` slots were busy.
async fn pressure(backend: &Backend<'_>, n: u32, total: usize) -> (usize, f64) {
    let sink = BenchSink {
        delay: Duration::from_millis(20),
        ..BenchSink::default()
    };
    let bench = start(backend, sink, n).await;
    let mut records = Records::new();
    for _ in 0..total / 500 {
        bench
            .worker
            .intake
            .accept(records.take(500))
            .await
            .expect("ingest");
    }
    let (mut samples, mut full) = (0u64, 0u64);
    while bench.sink.delivered.load(Ordering::SeqCst) + (n as u64) * 2 < total as u64 {
        samples += 1;
        if bench.sink.in_flight.load(Ordering::SeqCst) == n as usize {
            full += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        drained(&bench, total as u64, DRAIN_LIMIT).await,
        "pressure run did not drain"
    );
    let max = bench.sink.max_in_flight.load(Ordering::SeqCst);
    bench.worker.shutdown().await;
    (max, full as f64 / samples.max(1) as f64)
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Runs in a fresh process (see `main`): RSS with a 100,000-record backlog stored but gated, then the peak
/// while the pipeline drains it.
async fn memory_child(backlog: usize) {
    let bench = start(&Backend::Sqlite, BenchSink::default(), 64).await;
    bench
        .worker
        .pipeline
        .set_gate(Some("benchmark: hold the backlog".into()));
    let mut records = Records::new();
    for _ in 0..backlog / 500 {
        bench
            .worker
            .intake
            .accept(records.take(500))
            .await
            .expect("ingest");
    }
    let counts = bench.worker.pipeline.ledger.counts().await.expect("counts");
    assert_eq!(counts.pending, backlog as u64);
    let backlog_rss = proc_status_kb("VmRSS:");
    bench.worker.pipeline.set_gate(None);
    assert!(
        drained(&bench, backlog as u64, Duration::from_secs(600)).await,
        "backlog did not drain"
    );
    let peak = proc_status_kb("VmHWM:");
    println!("MEMORY {backlog_rss} {peak}");
    bench.worker.shutdown().await;
}

fn memory(backlog: usize) -> (f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .env("MESHLINE_BENCH_MEMORY", backlog.to_string())
        .output()
        .expect("run the memory probe");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("MEMORY "))
        .unwrap_or_else(|| {
            panic!(
                "memory probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0] / 1024.0, v[1] / 1024.0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    meshline::worker::allocator::configure();
    if let Ok(backlog) = std::env::var("MESHLINE_BENCH_MEMORY") {
        runtime().block_on(memory_child(backlog.parse().expect("backlog size")));
        return;
    }
    // `cargo test --benches` runs benches once as a smoke test; keep it small then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (records, seconds, backlog) = if quick {
        (2_000, 1, 5_000)
    } else {
        (50_000, 10, 100_000)
    };
    // Extra server settings for a profiling run, e.g. `MESHLINE_BENCH_PG_SETTINGS=shared_preload_libraries=auto_explain`.
    let extra = std::env::var("MESHLINE_BENCH_PG_SETTINGS").unwrap_or_default();
    // Durable commits and full-page writes, as in production: the test defaults turn all three off.
    let mut settings = vec![
        ("fsync", "on"),
        ("synchronous_commit", "on"),
        ("full_page_writes", "on"),
    ];
    settings.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
    // Started at its first use, not up front: initdb and the server's start-up take a core for a second or
    // two, which would otherwise overlap (and slow) the SQLite run that goes first.
    let pg = std::cell::OnceCell::new();
    let backend = |name: &str| match name {
        "sqlite" => Backend::Sqlite,
        _ => Backend::Postgres(pg.get_or_init(|| postgres::PgServer::start_with(&settings))),
    };
    // `MESHLINE_BENCH_ONLY=throughput,latency,pressure,memory` and `MESHLINE_BENCH_BACKENDS=sqlite,postgres`
    // narrow a run (e.g. for a profiler); both default to everything.
    let wanted = |var: &str, item: &str| {
        std::env::var(var).map_or(true, |list| list.split(',').any(|x| x.trim() == item))
    };
    let part = |name: &str| wanted("MESHLINE_BENCH_ONLY", name);
    let backends: Vec<&str> = ["sqlite", "postgres"]
        .into_iter()
        .filter(|name| wanted("MESHLINE_BENCH_BACKENDS", name))
        .collect();
    let rt = runtime();
    println!("worker benchmark: example contract, in-process instant sink, 2 runtime threads");
    for name in backends.iter().filter(|_| part("throughput")) {
        let rate = rt.block_on(throughput(&backend(name), records));
        let target = if *name == "sqlite" {
            20_000.0
        } else {
            10_000.0
        };
        println!(
            "{name:<8} throughput: {rate:>8.0} records/s over {records} records (target ≥ {target:.0}) {}",
            if rate >= target { "ok" } else { "MISSED" }
        );
    }
    for name in backends.iter().filter(|_| part("latency")) {
        let (p50, p99, max) = rt.block_on(latency(&backend(name), 500, seconds));
        println!(
            "{name:<8} added latency at 500 records/s for {seconds} s: p50 {p50:.2?}, p99 {p99:.2?}, max {max:.2?} (target p99 ≤ 20 ms) {}",
            if p99 <= Duration::from_millis(20) {
                "ok"
            } else {
                "MISSED"
            }
        );
    }
    let n = 16;
    for name in backends.iter().filter(|_| part("pressure")) {
        let (max, full) = rt.block_on(pressure(
            &backend(name),
            n,
            if quick { 1_000 } else { 4_000 },
        ));
        println!(
            "{name:<8} pressure with a 20 ms sink, concurrency {n}: max in flight {max} (must be ≤ {n}), all {n} slots busy {:.1} % of the backlog's time {}",
            full * 100.0,
            if max as u32 <= n { "ok" } else { "EXCEEDED" }
        );
        assert!(
            max as u32 <= n,
            "the worker exceeded the flow's concurrency"
        );
    }
    if !part("memory") {
        return;
    }
    let (rss, peak) = memory(backlog);
    println!(
        "sqlite   memory: RSS {rss:.1} MB holding a {backlog}-record backlog, peak {peak:.1} MB while draining it (target ≤ 64 MB) {}",
        if peak <= 64.0 { "ok" } else { "MISSED" }
    );
}
