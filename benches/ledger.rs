//! Ledger throughput: one round = ingest a batch of 500 new records, claim them, complete them as delivered
//! (three transactions), the shape of the worker's loop. Reported as records per second through all three.
//! SQLite always; PostgreSQL against a throwaway server started from the machine's binaries (with fsync and
//! synchronous commit on) when present.
//!
//! `MESHLINE_LEDGER_DB_TIME=1 cargo bench --bench ledger` (any profile: the figures are the database's, so a
//! debug build measures the same) instead reports the PostgreSQL ledger's **database time** per 100 records
//! of a claim and of a completion, read from `pg_stat_statements`, at the worker's batch sizes over a table
//! that already holds a history and a backlog; `=verbose` also lists the statements that took the time. See
//! [`db_time`].

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
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
    // The same rounds with the completions attributed to a revision, as a worker's are: each completion
    // batch adds its tally to the revision's window (schema version 7), so the difference is that cost.
    ledger.attribute_to("v1").expect("attribute");
    group.bench_function(
        format!("{name}/ingest+claim+complete/500/attributed"),
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    rt.block_on(round(ledger.as_ref(), &next));
                }
                start.elapsed()
            })
        },
    );
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

fn main() {
    if let Some(mode) = std::env::var_os("MESHLINE_LEDGER_DB_TIME") {
        db_time::report(mode == "verbose");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

/// The PostgreSQL ledger's database time per 100 records, from `pg_stat_statements`.
///
/// Wall time of a round includes this process, the network and the scheduler of a shared machine; the issue's
/// budget (≤ 1 ms of database time per 100 records for a claim and for a completion) is about what the ledger
/// asks of PostgreSQL, so it is read from the server's own statement statistics: the execution time of every
/// top-level statement an operation sent, its triggers and foreign-key checks included. The commit's WAL flush
/// is not in these statistics (PostgreSQL commits after the `COMMIT` statement's own accounting ends); it is
/// one flush per call, whatever the records, so it shrinks per record as batches grow.
mod db_time {
    use super::*;

    use std::collections::HashMap;

    use sqlx::postgres::PgPool;

    /// A size from the environment (the table's history and backlog, the rounds), or its default.
    fn setting(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// One operation's statements since the last reset: the top-level time (ms) and each statement's
    /// (text, calls, ms).
    struct Phase {
        total_ms: f64,
        work: Work,
        statements: Vec<(String, i64, f64)>,
    }

    /// What the top-level statements made the server do, whatever the machine's load: WAL records and bytes
    /// written, shared buffers touched (hit or read) and dirtied. A change that halves these halves the
    /// database time on a quiet machine; the time alone, on a shared one, also counts waiting for a CPU.
    #[derive(Default, Clone, Copy)]
    struct Work {
        wal_records: i64,
        wal_bytes: f64,
        buffers: i64,
        dirtied: i64,
    }

    async fn reset(stats: &PgPool) {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(stats)
            .await
            .expect("reset pg_stat_statements");
    }

    async fn read(stats: &PgPool) -> Phase {
        // The statistics connection's own statements (the reset, this read) are left out by their text.
        // Statements run by triggers and foreign-key checks are counted in the top-level statement that
        // fired them; they are listed apart (marked "nested") to show where that time went.
        let rows: Vec<(bool, String, i64, f64)> = sqlx::query_as(
            "SELECT toplevel, query, calls, total_exec_time FROM pg_stat_statements \
             WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC",
        )
        .fetch_all(stats)
        .await
        .expect("read pg_stat_statements");
        let (wal_records, wal_bytes, buffers, dirtied): (i64, f64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(wal_records), 0)::bigint, COALESCE(SUM(wal_bytes), 0)::float8, \
             COALESCE(SUM(shared_blks_hit + shared_blks_read), 0)::bigint, \
             COALESCE(SUM(shared_blks_dirtied), 0)::bigint FROM pg_stat_statements \
             WHERE toplevel AND query NOT LIKE '%pg_stat_statements%'",
        )
        .fetch_one(stats)
        .await
        .expect("read pg_stat_statements work");
        Phase {
            work: Work {
                wal_records,
                wal_bytes,
                buffers,
                dirtied,
            },
            total_ms: rows
                .iter()
                .filter(|(top, ..)| *top)
                .map(|(.., ms)| ms)
                .sum(),
            statements: rows
                .into_iter()
                .map(|(top, query, calls, ms)| {
                    let query = if top {
                        query
                    } else {
                        format!("(nested) {query}")
                    };
                    (query, calls, ms)
                })
                .collect(),
        }
    }

    #[derive(Default)]
    struct Tally {
        records: usize,
        calls: usize,
        total_ms: f64,
        work: Work,
        statements: HashMap<String, (i64, f64)>,
    }

    impl Tally {
        fn add(&mut self, records: usize, phase: Phase) {
            self.records += records;
            self.calls += 1;
            self.total_ms += phase.total_ms;
            self.work.wal_records += phase.work.wal_records;
            self.work.wal_bytes += phase.work.wal_bytes;
            self.work.buffers += phase.work.buffers;
            self.work.dirtied += phase.work.dirtied;
            for (query, calls, ms) in phase.statements {
                let entry = self.statements.entry(query).or_default();
                entry.0 += calls;
                entry.1 += ms;
            }
        }

        fn per_100(&self, ms: f64) -> f64 {
            ms * 100.0 / self.records.max(1) as f64
        }

        fn print(&self, what: &str, verbose: bool) {
            println!(
                "{what}: {:.3} ms DB time per 100 records ({} calls, {} records, {:.2} ms per call)",
                self.per_100(self.total_ms),
                self.calls,
                self.records,
                self.total_ms / self.calls.max(1) as f64,
            );
            println!(
                "    per 100 records: {:.0} WAL records, {:.1} kB WAL, {:.0} buffers touched, {:.1} dirtied",
                self.per_100(self.work.wal_records as f64),
                self.per_100(self.work.wal_bytes) / 1024.0,
                self.per_100(self.work.buffers as f64),
                self.per_100(self.work.dirtied as f64),
            );
            if verbose {
                let mut statements: Vec<_> = self.statements.iter().collect();
                statements.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
                for (query, (calls, ms)) in statements.into_iter().take(12) {
                    let query: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
                    println!(
                        "    {:8.3} ms/100 records {calls:6} calls  {:.110}",
                        self.per_100(*ms),
                        query
                    );
                }
            }
        }
    }

    pub fn report(verbose: bool) {
        if !std::path::Path::new("/usr/lib/postgresql")
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .any(|v| v.path().join("lib/pg_stat_statements.so").is_file())
        {
            eprintln!(
                "ledger db time: skipped, pg_stat_statements is not installed (postgresql-contrib)"
            );
            return;
        }
        let history = setting("MESHLINE_LEDGER_DB_TIME_HISTORY", 50_000);
        let backlog = setting("MESHLINE_LEDGER_DB_TIME_BACKLOG", 10_000);
        let rounds = setting("MESHLINE_LEDGER_DB_TIME_ROUNDS", 20);
        let mut settings = vec![
            ("fsync", "on"),
            ("synchronous_commit", "on"),
            ("full_page_writes", "on"),
            ("shared_preload_libraries", "pg_stat_statements"),
            ("pg_stat_statements.track", "all"),
        ];
        // With `MESHLINE_LEDGER_DB_TIME_PLANS=<file>`, the plans of statements slower than 2 ms (with their
        // actual rows and times) are copied to that file at the end.
        let plans = std::env::var_os("MESHLINE_LEDGER_DB_TIME_PLANS");
        if plans.is_some() {
            settings.extend([
                (
                    "shared_preload_libraries",
                    "pg_stat_statements,auto_explain",
                ),
                ("auto_explain.log_min_duration", "2ms"),
                ("auto_explain.log_analyze", "on"),
                ("auto_explain.log_buffers", "on"),
            ]);
        }
        // Extra server settings, as in the worker and end-to-end benches (`MESHLINE_BENCH_PG_SETTINGS=name=value,...`).
        let extra = std::env::var("MESHLINE_BENCH_PG_SETTINGS").unwrap_or_default();
        settings.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
        let server = postgres::PgServer::start_with(&settings);
        let url = server.create_database("bench");
        server.run_sql("bench", "CREATE EXTENSION pg_stat_statements");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ledger = ledger::open(
                &LedgerTarget::Postgres(url.clone()),
                "bench",
                Arc::new(SystemClock),
            )
            .await
            .expect("open ledger");
            let stats = PgPool::connect(&url).await.expect("statistics connection");
            let next = AtomicU64::new(0);
            let lease = Duration::from_secs(600);
            for _ in 0..history.div_ceil(BATCH) {
                round(ledger.as_ref(), &next).await;
            }
            for _ in 0..backlog.div_ceil(BATCH) {
                ledger.ingest(batch(&next)).await.expect("ingest backlog");
            }
            println!(
                "ledger db time: {history} delivered records and a backlog of {backlog}; claims of {BATCH}, \
                 {rounds} rounds per completion size (fsync on)"
            );
            for completion_size in [35, 100, 500] {
                let (mut ingests, mut claims, mut completes) =
                    (Tally::default(), Tally::default(), Tally::default());
                for _ in 0..rounds {
                    // New records keep the backlog as it was, as an intake ahead of delivery does.
                    reset(&stats).await;
                    ledger.ingest(batch(&next)).await.expect("ingest");
                    ingests.add(BATCH, read(&stats).await);
                    reset(&stats).await;
                    let claimed = ledger
                        .claim("bench", &BucketSet::all(), BATCH, lease)
                        .await
                        .expect("claim");
                    claims.add(claimed.len(), read(&stats).await);
                    let mut claimed = claimed.into_iter().peekable();
                    while claimed.peek().is_some() {
                        let chunk: Vec<Completion> = claimed
                            .by_ref()
                            .take(completion_size)
                            .map(|c| Completion {
                                claim: c.claim,
                                outcome: Outcome::Delivered,
                            })
                            .collect();
                        let records = chunk.len();
                        reset(&stats).await;
                        ledger.complete_batch(chunk).await.expect("complete");
                        completes.add(records, read(&stats).await);
                    }
                }
                if completion_size == 35 {
                    ingests.print(&format!("ingest ({BATCH} new a call)"), verbose);
                }
                claims.print(&format!("claim ({BATCH} a call)"), verbose);
                completes.print(
                    &format!("complete ({completion_size} a call)"),
                    verbose,
                );
            }
            stats.close().await;
            ledger.close().await;
        });
        if let Some(plans) = plans {
            std::fs::copy(server.log_path(), &plans).expect("copy the server log");
        }
    }
}
