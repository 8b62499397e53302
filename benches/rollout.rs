//! Canary analysis reads: `Ledger::revision_measures` over a 1-minute and a 1-hour window, on a ledger that
//! holds `MESHLINE_BENCH_RECORDS` records (default 10,000,000) and seven days of per-revision window rows for
//! two revisions (10-second slots, as the completions write them). The promise is that the read costs the
//! window's rows (a primary-key range), not the ledger's size: ≤ 5 ms at ten million records.
//!
//! The records are made in bulk by the database itself (`generate_series` on PostgreSQL, a recursive CTE on
//! SQLite, one transaction each), through the ledger's own triggers, so the counters agree with them. A
//! smaller `MESHLINE_BENCH_RECORDS` gives a quick run. PostgreSQL runs against a throwaway server started from
//! the machine's binaries, when present.

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{Criterion, criterion_group};
use meshline::ledger::{self, Ledger, LedgerTarget, ManualClock, REVISION_SLOT_MS};

const FLOW: &str = "bench";
/// 2026-01-08T00:00:00Z: the end of the seven days of traffic.
const END: i64 = 1_767_830_400_000;
const DAYS_MS: i64 = 7 * 24 * 3600 * 1000;

fn records() -> i64 {
    std::env::var("MESHLINE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(10_000_000)
}

/// Record rows `from..=to` of `records`, delivered, received evenly over the seven days before [`END`].
/// `ids` is the relation of those ids, named `n(i)`.
fn records_insert(ids: &str, records: i64) -> String {
    let step = DAYS_MS / records.max(1);
    format!(
        "INSERT INTO records (flow, source_key, idempotency_key, external_id, generation, payload_hash, \
         contract_version, state, next_attempt_at, bucket, correlation_id, received_at, updated_at, \
         delivered_at, attempts) \
         SELECT '{FLOW}', '006' || i, 'Opportunity/006' || i, 'SO-' || i, 1, 'h', '1.0.0', 'delivered', \
         {start} + i * {step}, i % 100, 'c' || i, {start} + i * {step}, {start} + i * {step} + i % 500, \
         {start} + i * {step} + i % 500, 1 FROM {ids}",
        start = END - DAYS_MS,
    )
}

/// Rows per fill transaction: a transaction's WAL (SQLite) or dead tuples stay bounded, so a large fill does
/// not need the ledger's size again in free disk.
const FILL_CHUNK: i64 = 1_000_000;

/// The window rows seven days of completions by two revisions leave: one row per revision and slot.
fn window_insert(slots: &str, records: i64) -> String {
    let per_slot = (records / (2 * DAYS_MS / REVISION_SLOT_MS)).max(1);
    format!(
        "INSERT INTO revision_window (flow, revision, slot, shard, records, delivered, failed, dead_lettered, \
         held, le_50, le_100, le_250, le_inf) \
         SELECT '{FLOW}', r.revision, s, 0, {per_slot} + 2, {per_slot}, 2, 1, 0, {per_slot} - 3, 1, 1, 1 \
         FROM {slots} CROSS JOIN (SELECT 'v1' AS revision UNION ALL SELECT 'v2') AS r"
    )
}

fn fill_sqlite(path: &std::path::Path, records: i64) {
    let conn = rusqlite::Connection::open(path).expect("raw sqlite");
    let (first, last) = (
        (END - DAYS_MS) / REVISION_SLOT_MS,
        END / REVISION_SLOT_MS - 1,
    );
    for from in (1..=records).step_by(FILL_CHUNK as usize) {
        let to = (from + FILL_CHUNK - 1).min(records);
        conn.execute_batch(&format!(
            "BEGIN; {}; COMMIT; PRAGMA wal_checkpoint(TRUNCATE);",
            records_insert(
                &format!(
                    "(WITH RECURSIVE n(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM n WHERE i < {to}) \
                     SELECT i FROM n)"
                ),
                records
            ),
        ))
        .expect("fill the SQLite ledger's records");
    }
    conn.execute_batch(&format!(
        "BEGIN; {}; COMMIT; ANALYZE;",
        window_insert(
            &format!(
                "(WITH RECURSIVE n(s) AS (SELECT {first} UNION ALL SELECT s + 1 FROM n WHERE s < {last}) \
                 SELECT s FROM n)"
            ),
            records
        ),
    ))
    .expect("fill the SQLite ledger");
}

fn fill_postgres(server: &postgres::PgServer, records: i64) {
    let (first, last) = (
        (END - DAYS_MS) / REVISION_SLOT_MS,
        END / REVISION_SLOT_MS - 1,
    );
    // One `-c` string is one transaction; VACUUM must run outside it.
    for from in (1..=records).step_by(FILL_CHUNK as usize) {
        let to = (from + FILL_CHUNK - 1).min(records);
        server.run_sql(
            "bench",
            &records_insert(&format!("generate_series({from}, {to}) AS n(i)"), records),
        );
    }
    server.run_sql(
        "bench",
        &window_insert(&format!("generate_series({first}, {last}) AS s"), records),
    );
    server.run_sql("bench", "VACUUM ANALYZE");
}

fn bench_reads(c: &mut Criterion, name: &str, target: &LedgerTarget, fill: impl FnOnce()) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clock = ManualClock::starting_at(END);
    // Opened once first, so the schema exists before the fill.
    let ledger: Arc<dyn Ledger> = rt
        .block_on(ledger::open(target, FLOW, clock.clone()))
        .expect("open ledger");
    rt.block_on(ledger.close());
    let started = Instant::now();
    fill();
    let ledger: Arc<dyn Ledger> = rt
        .block_on(ledger::open(target, FLOW, clock))
        .expect("reopen ledger");
    let counts = rt.block_on(ledger.counts()).expect("counts");
    eprintln!(
        "rollout/{name}: {} records filled in {:.1} s",
        counts.records,
        started.elapsed().as_secs_f64()
    );
    let time = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).expect("valid time");
    let mut group = c.benchmark_group("rollout");
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(4));
    for (window, ms) in [("1m", 60_000), ("1h", 3_600_000)] {
        let m = rt
            .block_on(ledger.revision_measures("v2", time(END - ms), time(END)))
            .expect("measures");
        assert!(m.records > 0, "the window holds rows: {m:?}");
        group.bench_function(format!("{name}/revision_measures/{window}"), |b| {
            b.iter(|| {
                rt.block_on(ledger.revision_measures("v2", time(END - ms), time(END)))
                    .expect("measures")
            })
        });
    }
    group.finish();
    rt.block_on(ledger.close());
}

fn sqlite(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rollout.db");
    let target = LedgerTarget::Sqlite(path.clone());
    bench_reads(c, "sqlite", &target, || fill_sqlite(&path, records()));
}

fn postgres(c: &mut Criterion) {
    let server = match std::panic::catch_unwind(postgres::PgServer::start) {
        Ok(server) => server,
        Err(_) => {
            eprintln!(
                "rollout/postgres: skipped, no PostgreSQL server could be started (see above)"
            );
            return;
        }
    };
    let url = server.create_database("bench");
    bench_reads(c, "postgres", &LedgerTarget::Postgres(url), || {
        fill_postgres(&server, records())
    });
}

criterion_group!(benches, sqlite, postgres);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
