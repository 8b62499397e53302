//! Two figures of the bounded, constant-time ledger (issue #11 parts 5 and 6).
//!
//! **`/status` at scale** (`MESHLINE_BENCH=status`, the default): a ledger of `MESHLINE_STATUS_RECORDS`
//! records (default 10 million; 99 % delivered, the rest pending, held and dead-lettered) is built with bulk
//! SQL straight into the tables of the current schema (the counting triggers set aside during the load and
//! the counters then backfilled by the migration's own statement, as an upgraded ledger gets them), then
//! `Ledger::counts` — what `compute_status` awaits on every `/status` call — is timed
//! `MESHLINE_STATUS_CALLS` times (default 2,000). Prints p50, p99 and max per backend
//! (`MESHLINE_STATUS_BACKENDS`, default `sqlite,postgres`).
//!
//! **Ledger size** (`MESHLINE_BENCH=size`): `MESHLINE_SIZE_RECORDS` records (default 20,000) with a ~1 KB
//! payload go through the real ledger API on SQLite (ingest, claim, deliver); the bytes in use (pages minus
//! free pages) per record are measured before and after the delivered retention purges them, and the
//! steady state of a flow receiving 1 million records a day with 7-day retention is computed from them.

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshline::ledger::{
    self, BucketSet, Completion, IncomingRecord, LedgerTarget, ManualClock, Outcome, Retention,
    SystemClock,
};
use serde_json::json;

const FLOW: &str = "closed-won-to-netsuite";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The migration statement that starts with `prefix` (the backfill, a trigger), so the bench loads exactly
/// what the schema defines.
fn statement(backend: &str, prefix: &str) -> &'static str {
    ledger::migration_statements(backend, 4)
        .expect("schema version 4")
        .iter()
        .find(|s| s.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no statement starting with {prefix:?}"))
}

/// The bulk load, the same SQL on both backends: `n` records, ids 1..=n, a state mix in which 1 in 100 is
/// not delivered.
fn bulk_insert(n: usize, series: &str) -> String {
    format!(
        "INSERT INTO records (flow, source_key, idempotency_key, external_id, generation, payload_hash, \
         contract_version, state, retries, next_attempt_at, bucket, correlation_id, received_at, updated_at, \
         delivered_at, first_failure_at) \
         SELECT '{FLOW}', 'k' || i, 'Opportunity/k' || i, 'SO-' || i, 1, 'h' || i, '1.0.0', \
         CASE WHEN i % 100 = 1 THEN 'received' WHEN i % 100 = 2 THEN 'held' \
              WHEN i % 100 = 3 THEN 'dead_lettered' ELSE 'delivered' END, \
         CASE WHEN i % 10 = 0 THEN 1 ELSE 0 END, 1767225600000 + i, i % 100, 'c' || i, \
         1767225600000 + i, 1767225600000 + i, \
         CASE WHEN i % 100 > 3 THEN 1767225660000 + i END, \
         CASE WHEN i % 10 = 0 THEN 1767225630000 + i END \
         FROM {series} WHERE i <= {n}"
    )
}

async fn load_sqlite(path: &std::path::Path, n: usize) {
    let opened = ledger::open(
        &LedgerTarget::Sqlite(path.to_path_buf()),
        FLOW,
        Arc::new(SystemClock),
    )
    .await
    .expect("open");
    opened.close().await;
    let conn = rusqlite::Connection::open(path).expect("raw sqlite");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA cache_size = -200000; \
         DROP TRIGGER records_counted_insert; BEGIN;",
    )
    .expect("prepare load");
    conn.execute(
        &bulk_insert(
            n,
            &format!(
                "(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s) AS g"
            ),
        ),
        [],
    )
    .expect("bulk insert");
    conn.execute(statement("sqlite", "WITH totals"), [])
        .expect("backfill");
    conn.execute(
        statement("sqlite", "CREATE TRIGGER records_counted_insert"),
        [],
    )
    .expect("trigger back");
    conn.execute_batch("COMMIT; ANALYZE; PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("commit");
}

async fn load_postgres(url: &str, n: usize) {
    let opened = ledger::open(
        &LedgerTarget::Postgres(url.to_string()),
        FLOW,
        Arc::new(SystemClock),
    )
    .await
    .expect("open");
    opened.close().await;
    let pool = sqlx::PgPool::connect(url).await.expect("raw postgres");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE records DISABLE TRIGGER records_counted_insert; \
         {}; {}; \
         ALTER TABLE records ENABLE TRIGGER records_counted_insert;",
        bulk_insert(n, &format!("generate_series(1, {n}) AS g(i)")),
        statement("postgres", "WITH totals"),
    )))
    .execute(&pool)
    .await
    .expect("bulk load");
    // Outside the load's transaction: VACUUM refuses to run in one.
    sqlx::raw_sql("VACUUM ANALYZE records")
        .execute(&pool)
        .await
        .expect("vacuum");
    pool.close().await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn time_status(name: &str, target: LedgerTarget, n: usize, calls: usize) {
    let opened = ledger::open(&target, FLOW, Arc::new(SystemClock))
        .await
        .expect("open");
    let counts = opened.counts().await.expect("counts");
    assert_eq!(
        counts.records as usize, n,
        "the load is what the counters say"
    );
    for _ in 0..calls / 10 {
        opened.counts().await.expect("warm-up");
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        std::hint::black_box(opened.counts().await.expect("counts"));
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "status {name}: {n} records, {calls} calls of counts(): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms \
         (pending {}, delivered {}, oldest pending {:?} s)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
        counts.pending,
        counts.delivered,
        counts.oldest_pending_age_seconds.map(|s| s.round()),
    );
    opened.close().await;
}

async fn status_bench() {
    let n = env_usize("MESHLINE_STATUS_RECORDS", 10_000_000);
    let calls = env_usize("MESHLINE_STATUS_CALLS", 2_000);
    let backends = std::env::var("MESHLINE_STATUS_BACKENDS").unwrap_or("sqlite,postgres".into());
    for backend in backends.split(',').map(str::trim) {
        let started = Instant::now();
        match backend {
            "sqlite" => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("ledger.db");
                load_sqlite(&path, n).await;
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                println!(
                    "status sqlite: loaded {n} records in {:.0?} ({} MB)",
                    started.elapsed(),
                    size / 1_000_000
                );
                time_status("sqlite", LedgerTarget::Sqlite(path), n, calls).await;
            }
            "postgres" => {
                let server = postgres::PgServer::start();
                let url = server.create_database("status");
                load_postgres(&url, n).await;
                println!(
                    "status postgres: loaded {n} records in {:.0?}",
                    started.elapsed()
                );
                time_status("postgres", LedgerTarget::Postgres(url), n, calls).await;
            }
            other => panic!("MESHLINE_STATUS_BACKENDS: unknown backend {other:?}"),
        }
    }
}

/// Bytes in use in a SQLite database: its pages minus the free ones.
fn bytes_in_use(path: &std::path::Path) -> u64 {
    let conn = rusqlite::Connection::open(path).expect("raw sqlite");
    let _: Option<String> = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .ok();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    let size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    ((pages - free) * size) as u64
}

async fn size_bench() {
    let n = env_usize("MESHLINE_SIZE_RECORDS", 20_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.db");
    let clock = ManualClock::starting_at(1_767_225_600_000);
    let opened = ledger::open(&LedgerTarget::Sqlite(path.clone()), FLOW, clock.clone())
        .await
        .expect("open");
    let empty = bytes_in_use(&path);
    let line = |i: usize| json!({"sku": format!("SKU-{}", 1000 + i % 50), "quantity": 1 + i % 7, "unitPrice": "129.00", "description": "Annual subscription, premium support tier"});
    for start in (0..n).step_by(500) {
        let batch: Vec<IncomingRecord> = (start..(start + 500).min(n))
            .map(|i| IncomingRecord {
                source_key: format!("006Dn{i:013}"),
                idempotency_key: format!("Opportunity/006Dn{i:013}"),
                external_id: Some(format!("SF-006Dn{i:013}")),
                // The systemModstamp below in µs, as the example contract's ordering field yields it.
                ordering: Some(1_769_854_500_000_000),
                // About 1 KB, like the example's closed-won opportunity.
                payload: json!({
                    "id": format!("006Dn{i:013}"), "name": format!("Order {i} revision 1"),
                    "stageName": "Closed Won", "amount": "4210.50", "currency": "EUR",
                    "closeDate": "2026-01-31", "systemModstamp": "2026-01-31T10:15:00Z",
                    "account": {"id": "001Dn000001AbCdEF", "name": "Acme Industrial GmbH",
                                "billingCountry": "DE", "vatId": "DE123456789"},
                    "owner": {"email": "rep@example.com", "phone": "+49 30 1234567"},
                    "lineItems": [line(i), line(i + 1), line(i + 2)],
                }),
                contract_version: "1.0.0".into(),
                correlation_id: None,
            })
            .collect();
        opened.ingest(batch).await.expect("ingest");
        let claimed = opened
            .claim("w", &BucketSet::all(), 500, Duration::from_secs(60))
            .await
            .expect("claim");
        opened
            .complete_batch(
                claimed
                    .into_iter()
                    .map(|c| Completion {
                        claim: c.claim,
                        outcome: Outcome::Delivered,
                    })
                    .collect(),
            )
            .await
            .expect("complete");
    }
    let full = bytes_in_use(&path) - empty;
    clock.advance(Duration::from_secs(8 * 24 * 3600));
    let retention = Retention {
        dead_letters: None,
        delivered: Some(Duration::from_secs(7 * 24 * 3600)),
        resolved_tickets: None,
    };
    while !opened
        .purge(&retention, 500)
        .await
        .expect("purge")
        .is_empty()
    {}
    opened.close().await;
    let compact = bytes_in_use(&path) - empty;
    let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let (auto_vacuum, free): (i64, i64) = {
        let conn = rusqlite::Connection::open(&path).expect("raw sqlite");
        (
            conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
                .unwrap(),
            conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap(),
        )
    };
    println!("size sqlite: auto_vacuum {auto_vacuum} (2 = incremental), {free} free pages left");
    let (per_full, per_compact) = (full as f64 / n as f64, compact as f64 / n as f64);
    let day = 1_000_000.0;
    println!(
        "size sqlite: {n} delivered records: {per_full:.0} bytes/record with payload and lineage, \
         {per_compact:.0} bytes/record after the delivered retention (file {} MB after incremental vacuum)",
        file / 1_000_000
    );
    println!(
        "size sqlite: 1M records/day, 7-day retention: {:.2} GB of full records + {:.0} MB of compact rows \
         per day of distinct keys ever seen (steady state {:.2} GB + compact rows of the distinct keys)",
        7.0 * day * per_full / 1e9,
        day * per_compact / 1e6,
        7.0 * day * per_full / 1e9,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match std::env::var("MESHLINE_BENCH").as_deref() {
        Ok("size") => runtime.block_on(size_bench()),
        Ok("status") | Err(_) => runtime.block_on(status_bench()),
        Ok(other) => panic!("MESHLINE_BENCH: status or size, not {other:?}"),
    }
}
