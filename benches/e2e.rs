//! End to end, as deployed: a real PostgreSQL server, the real `meshline worker` binary with its HTTP intake,
//! signed webhooks from concurrent senders, and the PostgreSQL sink writing into a real table. Once with each
//! ledger (embedded SQLite; PostgreSQL in its own database on the same server), each a few rounds.
//!
//! A round: a fresh sink database (and ledger database), a fresh worker on the example contract with the
//! `postgres` sink (`orders_e2e`), N Salesforce-shaped opportunities (~1 KB, five line items) cut into webhook
//! bodies that are serialised and signed before the clock starts. The clock starts at the first request and
//! stops when `SELECT count(*) FROM orders_e2e` equals N, counted once the worker's `/status` says all N are
//! delivered (which the ledger records only after the sink committed them; counting a growing table every
//! poll would take CPU from the system under test). Reported per round and as the median:
//!
//! - records/s (N / time until the table holds all N rows) and the time until every request was acknowledged;
//! - CPU seconds of the worker process, of PostgreSQL (postmaster and all its children) and of the senders
//!   (their own runtime thread), so "the senders are not the bottleneck" is a measurement;
//! - with `pg_stat_statements` (when the contrib module is installed): the top statements by database time,
//!   and for the PostgreSQL ledger the database time per 100 records of its claim and its completion.
//!
//! Each round is then checked: the table holds exactly the N expected external ids, and the worker's
//! `/status` counts N delivered and no dead letters. Anything else fails the run.
//!
//! `cargo bench --bench e2e` (release). Knobs: `MESHLINE_BENCH_RECORDS` (20,000), `MESHLINE_BENCH_PER_REQUEST`
//! (100), `MESHLINE_BENCH_SENDERS` (4), `MESHLINE_BENCH_CONCURRENCY` (the flow's delivery concurrency, 16),
//! `MESHLINE_BENCH_ROUNDS` (3), `MESHLINE_BENCH_BACKENDS=sqlite,postgres` (or `MESHLINE_BENCH=sqlite`) and
//! `MESHLINE_BENCH_PG_SETTINGS=name=value,...` as in the worker bench. `cargo test --bench e2e` runs it once,
//! small, on the debug binary: a smoke test of the harness, whose figures mean nothing.

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "../tests/support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::time::{Duration, Instant};

use reliability::{
    EvidenceOnFailure, FlowFiles, LedgerChoice, SinkChoice, WEBHOOK_SECRET, WorkerProcess, counter,
    external_id, opportunity,
};
use sqlx::{Connection, PgConnection, Row};

/// The sink's table; the sink creates it at its first delivery.
const TABLE: &str = "orders_e2e";

/// How often the bench counts the table's rows: the figure is at most this late.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A give-up only: a healthy round takes seconds, and a stuck one must fail, not hang.
const GIVE_UP: Duration = Duration::from_secs(600);

/// The ledger statements whose database time the issue bounds (≤ 1 ms per 100 records each), recognised by a
/// fragment of their text in `pg_stat_statements`. The claim is two statements in one transaction: the one that
/// leases due rows and the one that reads the leased records with their payloads. Kept in step with
/// `src/ledger/postgres.rs`; when none matches, the report says so rather than print a zero.
const CLAIM_STATEMENTS: &[&str] = &["WITH due AS (", "JOIN payloads p ON p.record_id"];
/// The completion is one of three statements (a batch of deliveries only has one of its own, and one it starts
/// again with); all reserve the delivery's lineage id, which no other statement does: the batch of deliveries
/// once per statement, the others per record. The last fragment is the completion of binaries before
/// PostgreSQL ledger schema version 15 (for `MESHLINE_WORKER_BIN` comparisons).
const COMPLETION_STATEMENTS: &[&str] = &[
    "delivered_event = (SELECT nextval(",
    "delivered_event = nextval(",
    "UPDATE records r SET state = COALESCE(t.new_state",
];

#[derive(Clone, Debug)]
struct Knobs {
    records: usize,
    per_request: usize,
    senders: usize,
    concurrency: u32,
    rounds: usize,
    backends: Vec<&'static str>,
    pg_settings: String,
}

fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            panic!("{name}={text:?} is not a valid value (expected a positive number)")
        }),
        Err(_) => default,
    }
}

impl Knobs {
    fn from_env(quick: bool) -> Knobs {
        let knobs = Knobs {
            records: knob("MESHLINE_BENCH_RECORDS", if quick { 1_000 } else { 20_000 }),
            per_request: knob("MESHLINE_BENCH_PER_REQUEST", 100),
            senders: knob("MESHLINE_BENCH_SENDERS", 4),
            concurrency: knob("MESHLINE_BENCH_CONCURRENCY", 16),
            rounds: knob("MESHLINE_BENCH_ROUNDS", if quick { 1 } else { 3 }),
            backends: {
                // As the worker bench: a comma-separated list; `MESHLINE_BENCH` names one ledger.
                let list = std::env::var("MESHLINE_BENCH_BACKENDS")
                    .or_else(|_| std::env::var("MESHLINE_BENCH"))
                    .unwrap_or_else(|_| "sqlite,postgres".into());
                let names: Vec<&str> = list.split(',').map(str::trim).collect();
                if let Some(bad) = names.iter().find(|n| !["sqlite", "postgres"].contains(n)) {
                    panic!(
                        "MESHLINE_BENCH_BACKENDS names {bad:?}; expected sqlite and/or postgres"
                    );
                }
                ["sqlite", "postgres"]
                    .into_iter()
                    .filter(|b| names.contains(b))
                    .collect()
            },
            pg_settings: std::env::var("MESHLINE_BENCH_PG_SETTINGS").unwrap_or_default(),
        };
        for (name, value) in [
            ("MESHLINE_BENCH_RECORDS", knobs.records),
            ("MESHLINE_BENCH_PER_REQUEST", knobs.per_request),
            ("MESHLINE_BENCH_SENDERS", knobs.senders),
            ("MESHLINE_BENCH_CONCURRENCY", knobs.concurrency as usize),
            ("MESHLINE_BENCH_ROUNDS", knobs.rounds),
        ] {
            assert!(value > 0, "{name} must be at least 1");
        }
        knobs
    }
}

// ---- CPU time from /proc -----------------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` after the command name, which is in parentheses and may itself contain
/// spaces or parentheses (hence the last `)`). Index 0 is field 3 (`state`) of proc(5).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Seconds in proc(5) fields `utime`, `stime` (own), and `cutime`, `cstime` (reaped children's).
struct ProcCpu {
    own: f64,
    reaped_children: f64,
    parent: u32,
}

fn proc_cpu(pid: u32) -> Option<ProcCpu> {
    let f = stat_fields(pid)?;
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = ticks_per_second();
    Some(ProcCpu {
        // proc(5) fields 14-17 and 4, shifted by the 3 fields before `state`.
        own: (tick(11) + tick(12)) / hz,
        reaped_children: (tick(13) + tick(14)) / hz,
        parent: f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

/// CPU seconds (user + system, all threads) a process has used so far.
fn process_cpu(pid: u32) -> f64 {
    proc_cpu(pid).map_or(0.0, |c| c.own)
}

/// CPU seconds the whole PostgreSQL server has used so far. PostgreSQL is a process per connection plus
/// background processes (checkpointer, WAL writer, autovacuum…), all children of the postmaster. The sum is
/// the postmaster's own time, plus every live child's own time, plus the postmaster's `cutime + cstime`, which
/// the kernel adds up for children it has already reaped (a backend whose connection closed, an autovacuum
/// worker that finished). A child moves from the second term to the third when it is reaped, so the sum only
/// grows, and the difference of two readings is the server's CPU time between them — including a backend that
/// came and went in between. (A child reaped during the scan itself can be missed by that one reading; in a
/// round only autovacuum workers come and go, the worker's connections live throughout.) Grandchildren are not
/// counted: PostgreSQL does not create any.
fn postgres_cpu(postmaster: u32) -> f64 {
    let Some(root) = proc_cpu(postmaster) else {
        return 0.0;
    };
    let children: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_cpu)
        .filter(|c| c.parent == postmaster)
        .map(|c| c.own)
        .sum();
    root.own + root.reaped_children + children
}

/// CPU seconds the calling thread has used so far.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

// ---- the senders -------------------------------------------------------------------------------------------

/// One webhook request, ready to send: the serialised batch and its signature.
struct SignedBody {
    body: Vec<u8>,
    signature: String,
}

/// The N records cut into requests and signed now, so neither JSON nor HMAC is on the clock. The signature's
/// timestamp must stay within the receiver's tolerance (5 minutes) until the last request is sent, which a
/// round does by a wide margin.
fn signed_bodies(records: usize, per_request: usize) -> Vec<SignedBody> {
    let t = chrono::Utc::now().timestamp();
    (0..records)
        .collect::<Vec<_>>()
        .chunks(per_request)
        .map(|chunk| {
            let batch: Vec<serde_json::Value> = chunk.iter().map(|n| opportunity(*n, 1)).collect();
            let body = serde_json::to_vec(&batch).expect("a batch serialises");
            let signature = meshline::connectors::sources::webhook::meshline_signature(
                WEBHOOK_SECRET,
                t,
                &body,
            );
            SignedBody { body, signature }
        })
        .collect()
}

struct Sent {
    /// From the first request until the last request was acknowledged.
    acknowledged: Duration,
    /// CPU seconds of the senders' thread while sending.
    cpu: f64,
    /// 503 answers (the intake could not store the batch; it was sent again).
    refused: usize,
}

/// Sends every body from `senders` concurrent senders, each waiting for its acknowledgement before its next
/// request, as a CRM does. All of it runs on one thread with a runtime of its own, so that thread's CPU time is
/// the senders' whole cost. `ready` gets the start instant as the first request goes out.
fn send_all(
    url: String,
    bodies: Vec<SignedBody>,
    senders: usize,
    ready: tokio::sync::oneshot::Sender<Instant>,
) -> std::thread::JoinHandle<Sent> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the senders' runtime");
        runtime.block_on(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("the senders' client");
            let queue = std::sync::Mutex::new(bodies.into_iter());
            let url = format!("{url}/webhook");
            let cpu_before = thread_cpu();
            let started = Instant::now();
            let _ = ready.send(started);
            let one_sender = || async {
                let mut refused = 0;
                loop {
                    let Some(next) = queue.lock().unwrap().next() else {
                        return refused;
                    };
                    loop {
                        let answer = http
                            .post(&url)
                            .header("content-type", "application/json")
                            .header("x-meshline-signature", &next.signature)
                            .body(next.body.clone())
                            .send()
                            .await
                            .unwrap_or_else(|e| panic!("webhook request to {url} failed: {e}"));
                        let status = answer.status();
                        if status.is_success() {
                            break;
                        }
                        // 503: nothing was stored, send it again (a CRM's retry); anything else is a bug.
                        assert_eq!(
                            status,
                            reqwest::StatusCode::SERVICE_UNAVAILABLE,
                            "the webhook refused a batch: {}",
                            answer.text().await.unwrap_or_default()
                        );
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            let refused: usize = futures::future::join_all((0..senders).map(|_| one_sender()))
                .await
                .into_iter()
                .sum();
            Sent {
                acknowledged: started.elapsed(),
                cpu: thread_cpu() - cpu_before,
                refused,
            }
        })
    })
}

// ---- one round ---------------------------------------------------------------------------------------------

/// A `pg_stat_statements` row.
struct Statement {
    database: String,
    calls: i64,
    total_ms: f64,
    /// Planning time, which `total_ms` leaves out (the server tracks it: `pg_stat_statements.track_planning`).
    plan_ms: f64,
    rows: i64,
    query: String,
}

struct Round {
    records: usize,
    /// From the first request until the table held every row.
    all_rows: Duration,
    sent: Sent,
    worker_cpu: f64,
    postgres_cpu: f64,
    /// The bench's own counting backend, included in `postgres_cpu`.
    polling_cpu: f64,
    polls: u64,
    statements: Option<Vec<Statement>>,
}

impl Round {
    fn rate(&self) -> f64 {
        self.records as f64 / self.all_rows.as_secs_f64()
    }
}

/// Rows of `TABLE`, or 0 before the sink has created it (SQLSTATE 42P01, undefined table).
async fn count_rows(conn: &mut PgConnection) -> i64 {
    match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders_e2e")
        .fetch_one(&mut *conn)
        .await
    {
        Ok(n) => n,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => 0,
        Err(e) => panic!("cannot count the rows of {TABLE}: {e}"),
    }
}

/// Creates a database for this round, with `pg_stat_statements` in it when the server preloads it.
async fn round_database(pg: &postgres::PgServer, name: &str, statements: bool) -> String {
    let url = pg.create_database(name);
    if statements {
        let mut conn = PgConnection::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {name}: {e}"));
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE EXTENSION pg_stat_statements in {name}: {e}"));
    }
    url
}

async fn top_statements(conn: &mut PgConnection) -> Vec<Statement> {
    sqlx::query(
        "SELECT d.datname, s.calls, s.total_exec_time, s.total_plan_time, s.rows, \
           regexp_replace(s.query, '\\s+', ' ', 'g') AS query \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         ORDER BY s.total_exec_time DESC",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap_or_else(|e| panic!("cannot read pg_stat_statements: {e}"))
    .into_iter()
    .map(|row| Statement {
        database: row.get("datname"),
        calls: row.get("calls"),
        total_ms: row.get("total_exec_time"),
        plan_ms: row.get("total_plan_time"),
        rows: row.get("rows"),
        query: row.get("query"),
    })
    .collect()
}

async fn round(
    pg: &postgres::PgServer,
    backend: &str,
    number: usize,
    knobs: &Knobs,
    statements: bool,
) -> Round {
    let n = knobs.records;
    // Fresh databases every round: a second round's records have the same keys, which an old ledger would
    // recognise as duplicates and an old table would already hold.
    let sink_url = round_database(pg, &format!("e2e_sink_{backend}_{number}"), statements).await;
    let ledger = match backend {
        "sqlite" => LedgerChoice::Embedded,
        _ => LedgerChoice::Postgres(
            round_database(pg, &format!("e2e_ledger_{number}"), statements).await,
        ),
    };
    // CREATE DATABASE writes the template into the WAL; flush it now, or the checkpoint that follows lands
    // inside the timed run.
    pg.run_sql("postgres", "CHECKPOINT");
    let files = FlowFiles::with_sink(
        SinkChoice::Postgres {
            url: &sink_url,
            table: TABLE,
        },
        ledger,
        knobs.concurrency,
    );
    let mut worker = WorkerProcess::new(&files, "e2e");
    worker.start().await;
    let _evidence = EvidenceOnFailure::new(vec![worker.ops_url()]);
    let worker_pid = worker.pid().expect("the worker runs");
    let postmaster = pg.pid().expect("PostgreSQL runs");

    let bodies = signed_bodies(n, knobs.per_request);
    let mut poll = PgConnection::connect(&sink_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the sink database: {e}"));
    let poll_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut poll)
        .await
        .expect("the polling backend's pid");
    let poll_pid = u32::try_from(poll_pid).expect("a pid");
    if statements {
        // Only the timed run's statements (not the worker's migrations and start-up).
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut poll)
            .await
            .expect("pg_stat_statements_reset");
    }

    let worker_before = process_cpu(worker_pid);
    let postgres_before = postgres_cpu(postmaster);
    let poll_before = process_cpu(poll_pid);
    let (ready, started) = tokio::sync::oneshot::channel();
    let senders = send_all(worker.url(), bodies, knobs.senders, ready);
    let started = started.await.expect("the senders start");
    let mut polls = 0u64;
    let all_rows = loop {
        // The worker's ledger counts a record delivered only after the sink committed its row, so its
        // `/status` (kept counters: a cheap read) says when the table may be complete; the table is counted
        // only then. Counting a growing table every 20 ms cost PostgreSQL ~15 % of a core at 60,000 rows,
        // CPU taken from the system under test. The figure is at most one poll and one completion late.
        //
        // Nor is `/status` read before the senders have every acknowledgement: the table is complete only once
        // every record is stored, and a record is acknowledged as its ingest commits, so this adds at most the
        // last answer's way back to the figure. With a PostgreSQL ledger, `/status` reads the oldest waiting
        // record through the records of every lease in flight (~5 ms of database time a read); reading it every
        // 20 ms of a round took ~9 % of PostgreSQL's CPU from the system under test.
        let delivered = if senders.is_finished() {
            worker
                .status()
                .await
                .map_or(0, |s| counter(&s, "delivered").max(0))
        } else {
            0
        };
        let elapsed = started.elapsed();
        let rows = if delivered >= n as i64 {
            polls += 1;
            count_rows(&mut poll).await
        } else {
            0
        };
        if rows == n as i64 {
            break elapsed;
        }
        assert!(
            rows < n as i64,
            "{TABLE} holds {rows} rows, more than the {n} records sent"
        );
        // A worker that died would otherwise be waited for until the give-up.
        let state = stat_fields(worker_pid).and_then(|f| f.first().cloned());
        assert!(
            state.as_deref().is_some_and(|s| s != "Z"),
            "the worker exited mid-round with {rows} of {n} rows in {TABLE}; log:\n{}",
            worker.log_tail()
        );
        assert!(
            elapsed < GIVE_UP,
            "{TABLE} holds {rows} of {n} rows after {GIVE_UP:?}; log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(POLL_EVERY).await;
    };
    let sent = senders.join().expect("the senders finish");
    // The work of a record ends when the ledger has its outcome, a little after its row is in: the CPU
    // figures are read once it has recorded all of them.
    let status = worker
        .wait_for("every record delivered", GIVE_UP, |s| {
            counter(s, "delivered") >= n as i64 && s["pending"].as_u64() == Some(0)
        })
        .await;
    let worker_cpu = process_cpu(worker_pid) - worker_before;
    let postgres_cpu = postgres_cpu(postmaster) - postgres_before;
    let polling_cpu = process_cpu(poll_pid) - poll_before;

    assert_eq!(counter(&status, "delivered"), n as i64, "{status}");
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");
    let ids: Vec<String> = (0..n).map(external_id).collect();
    let row = sqlx::query(
        "SELECT count(*) AS rows, count(DISTINCT external_id) AS distinct_ids, \
           count(*) FILTER (WHERE external_id = ANY($1)) AS expected FROM orders_e2e",
    )
    .bind(&ids)
    .fetch_one(&mut poll)
    .await
    .expect("the table's final contents");
    let (rows, distinct, expected): (i64, i64, i64) = (
        row.get("rows"),
        row.get("distinct_ids"),
        row.get("expected"),
    );
    assert!(
        rows == n as i64 && distinct == n as i64 && expected == n as i64,
        "{TABLE} holds {rows} rows, {distinct} distinct external ids, {expected} of the {n} sent; expected exactly the {n} sent"
    );
    let statements = if statements {
        Some(top_statements(&mut poll).await)
    } else {
        None
    };
    worker.terminate().await;
    Round {
        records: n,
        all_rows,
        sent,
        worker_cpu,
        postgres_cpu,
        polling_cpu,
        polls,
        statements,
    }
}

// ---- the report --------------------------------------------------------------------------------------------

fn print_round(backend: &str, number: usize, r: &Round) {
    let per_record_us = |cpu: f64| cpu / r.records as f64 * 1e6;
    println!(
        "{backend:<8} round {number}: {:>7.0} records/s ({} rows in {:.2} s); all acknowledged after {:.2} s ({} refused and resent)",
        r.rate(),
        r.records,
        r.all_rows.as_secs_f64(),
        r.sent.acknowledged.as_secs_f64(),
        r.sent.refused,
    );
    println!(
        "{:<8}   CPU: worker {:.2} s ({:.0} µs/record), PostgreSQL {:.2} s ({:.0} µs/record; of it the bench's {} counts {:.2} s), senders {:.2} s",
        "",
        r.worker_cpu,
        per_record_us(r.worker_cpu),
        r.postgres_cpu,
        per_record_us(r.postgres_cpu),
        r.polls,
        r.polling_cpu,
        r.sent.cpu,
    );
    let Some(statements) = &r.statements else {
        return;
    };
    println!(
        "{:<8}   top statements by database time (calls, total, per call, rows, planning in all):",
        ""
    );
    for s in statements.iter().take(6) {
        let query: String = s.query.chars().take(90).collect();
        println!(
            "{:<8}     {:>7} {:>9.1} ms {:>8.3} ms {:>7} {:>7.1} ms  [{}] {query}",
            "",
            s.calls,
            s.total_ms,
            s.total_ms / s.calls.max(1) as f64,
            s.rows,
            s.plan_ms,
            s.database,
        );
    }
    if backend != "postgres" {
        return;
    }
    let ledger_db = format!("e2e_ledger_{number}");
    for (what, fragments) in [
        ("claim", CLAIM_STATEMENTS),
        ("completion", COMPLETION_STATEMENTS),
    ] {
        let matched: Vec<&Statement> = statements
            .iter()
            .filter(|s| s.database == ledger_db && fragments.iter().any(|f| s.query.contains(f)))
            .collect();
        if matched.is_empty() {
            println!(
                "{:<8}   ledger {what}: no statement matched {fragments:?}; see the statements above",
                ""
            );
            continue;
        }
        let total: f64 = matched.iter().map(|s| s.total_ms).sum();
        let per_100 = total / r.records as f64 * 100.0;
        // Each matched statement's share, so a pattern that caught the wrong statement shows.
        let parts: Vec<String> = matched
            .iter()
            .map(|s| {
                let head: String = s.query.chars().take(24).collect();
                format!("{} calls {:.0} ms \"{head}…\"", s.calls, s.total_ms)
            })
            .collect();
        println!(
            "{:<8}   ledger {what}: {per_100:.2} ms of database time per 100 records (target ≤ 1 ms) {}; {total:.0} ms in all: {}",
            "",
            if per_100 <= 1.0 { "ok" } else { "MISSED" },
            parts.join("; "),
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn main() {
    // `cargo test --benches` runs benches once as a smoke test; keep it small then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let knobs = Knobs::from_env(quick);
    let statements = postgres::has_server_library("pg_stat_statements");
    // Durable commits and full-page writes, as in production: the test defaults turn all three off.
    let mut settings = vec![
        ("fsync", "on"),
        ("synchronous_commit", "on"),
        ("full_page_writes", "on"),
    ];
    if statements {
        settings.push(("shared_preload_libraries", "pg_stat_statements"));
        // Planning is CPU the server spends too, outside each statement's execution time.
        settings.push(("pg_stat_statements.track_planning", "on"));
    }
    settings.extend(
        knobs
            .pg_settings
            .split(',')
            .filter_map(|kv| kv.split_once('=')),
    );
    let binary = reliability::worker_binary();
    println!(
        "end-to-end benchmark: {} records, {} per signed webhook, {} senders, delivery concurrency {}, {} round(s); worker {}; PostgreSQL sink table {TABLE}{}",
        knobs.records,
        knobs.per_request,
        knobs.senders,
        knobs.concurrency,
        knobs.rounds,
        binary.display(),
        if statements {
            ""
        } else {
            " (pg_stat_statements is not installed: no statement figures)"
        }
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for backend in &knobs.backends {
        // A fresh server per ledger, so one ledger's leftovers (dead tuples, autovacuum) cannot slow the other.
        let pg = postgres::PgServer::start_with(&settings);
        let rounds: Vec<Round> = (1..=knobs.rounds)
            .map(|number| {
                let r = runtime.block_on(round(&pg, backend, number, &knobs, statements));
                print_round(backend, number, &r);
                r
            })
            .collect();
        let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        println!(
            "{backend:<8} median of {}: {:>7.0} records/s, acknowledged after {:.2} s; CPU worker {:.2} s, PostgreSQL {:.2} s, senders {:.2} s",
            rounds.len(),
            med(&Round::rate),
            med(&|r| r.sent.acknowledged.as_secs_f64()),
            med(&|r| r.worker_cpu),
            med(&|r| r.postgres_cpu),
            med(&|r| r.sent.cpu),
        );
    }
}
