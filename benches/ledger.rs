//! Ledger throughput: one round = ingest a batch of 500 new records, claim them, complete them as delivered
//! (three transactions), the shape of the worker's loop. Reported as records per second through all three.
//! SQLite always; PostgreSQL against a throwaway server started from the machine's binaries (with fsync and
//! synchronous commit on) when present.

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshline::ledger::{
    self, BucketSet, Completion, IncomingRecord, Ledger, LedgerTarget, Outcome, SystemClock,
};
use serde_json::json;

const BATCH: usize = 500;

fn batch(next: &AtomicU64) -> Vec<IncomingRecord> {
    (0..BATCH)
        .map(|_| {
            let n = next.fetch_add(1, Ordering::Relaxed);
            IncomingRecord {
                source_key: format!("006{n:012}"),
                idempotency_key: format!("Opportunity/006{n:012}"),
                external_id: Some(format!("SO-{n}")),
                payload: json!({
                    "Id": format!("006{n:012}"), "StageName": "Closed Won", "Amount": n % 10_000,
                    "AccountId": "001000000000001", "CloseDate": "2026-01-31",
                    "LineItems": [{"sku": "SKU-1", "qty": 2}, {"sku": "SKU-7", "qty": 1}]
                }),
                contract_version: "1.0.0".into(),
                correlation_id: None,
                ordering: None,
            }
        })
        .collect()
}

async fn round(ledger: &dyn Ledger, next: &AtomicU64) {
    ledger.ingest(batch(next)).await.expect("ingest");
    let claimed = ledger
        .claim("bench", &BucketSet::all(), BATCH, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), BATCH);
    let completions = claimed
        .into_iter()
        .map(|c| Completion {
            claim: c.claim,
            outcome: Outcome::Delivered,
        })
        .collect();
    ledger.complete_batch(completions).await.expect("complete");
}

fn bench_backend(c: &mut Criterion, name: &str, target: &LedgerTarget) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ledger = rt
        .block_on(ledger::open(target, "bench", Arc::new(SystemClock)))
        .expect("open ledger");
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function(format!("{name}/ingest+claim+complete/500"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                rt.block_on(round(ledger.as_ref(), &next));
            }
            start.elapsed()
        })
    });
    group.finish();
    rt.block_on(ledger.close());
}

fn sqlite(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    bench_backend(
        c,
        "sqlite",
        &LedgerTarget::Sqlite(dir.path().join("bench.db")),
    );
}

fn postgres(c: &mut Criterion) {
    let server = match std::panic::catch_unwind(|| {
        // Durable commits, as in production: the test defaults turn fsync off.
        postgres::PgServer::start_with(&[
            ("fsync", "on"),
            ("synchronous_commit", "on"),
            ("full_page_writes", "on"),
        ])
    }) {
        Ok(server) => server,
        Err(_) => {
            eprintln!(
                "ledger/postgres: skipped, no PostgreSQL server could be started (see above)"
            );
            return;
        }
    };
    let url = server.create_database("bench");
    bench_backend(c, "postgres", &LedgerTarget::Postgres(url));
}

criterion_group!(benches, sqlite, postgres);
criterion_main!(benches);
