//! Batches under crashes and sink outages: the real `meshline worker` binary delivers into a real PostgreSQL
//! table in multi-row upserts (each batch slowed so it is observably in flight) while it is SIGKILLed at
//! random points — every other kill while a batch statement is running — and while the sink database drops
//! every connection and refuses new ones for a while, in the middle of batches. A CRM pushes 4,000 records
//! and later revisions of some by signed webhook, retrying every batch until it is acknowledged. Afterwards
//! the table holds every record exactly once by external id with its latest payload, and the ledger's counts
//! agree with it. Once with the embedded SQLite ledger, once with PostgreSQL.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use meshline::api::{BatchPolicy, SinkSystem};
use rand::{Rng, SeedableRng};
use reliability::*;
use sqlx::Row;

const RECORDS: usize = 4_000;
const BATCH: usize = 100;
const KILLS: u32 = 12;
const OUTAGES: u32 = 3;

/// Revision 2 of every tenth record, two batches after it first appeared.
const REVISIONS: &[Revision] = &[Revision {
    lag: 2,
    modulus: 10,
    ending: 3,
    version: 2,
}];

/// Batch statements running in the sink database right now.
async fn batches_in_flight(admin: &sqlx::PgPool) -> i64 {
    sqlx::query(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = 'sink' AND state = 'active' \
         AND query LIKE 'INSERT INTO \"orders\"%'",
    )
    .fetch_one(admin)
    .await
    .map(|r| r.get("n"))
    .unwrap_or(0)
}

async fn crash_and_outage_while_batches_are_delivered(
    pg: &postgres::PgServer,
    ledger: LedgerChoice,
    seed: u64,
) {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sink_url = pg.create_database("sink");
    // The table the sink would create, plus what the test watches: every row written (so repeats are
    // visible) and a pause per statement, so batches are in flight long enough for kills to land in them.
    pg.run_sql(
        "sink",
        "CREATE TABLE orders (external_id text PRIMARY KEY, payload jsonb NOT NULL, \
         correlation_id text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), \
         updated_at timestamptz NOT NULL DEFAULT now()); \
         CREATE TABLE writes (seq bigserial, external_id text NOT NULL, memo text); \
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(0.03); RETURN NULL; END $$; \
         CREATE TRIGGER slow BEFORE INSERT ON orders FOR EACH STATEMENT EXECUTE FUNCTION slow(); \
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO writes (external_id, memo) VALUES (NEW.external_id, NEW.payload->>'memo'); RETURN NULL; END $$; \
         CREATE TRIGGER audit AFTER INSERT OR UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION audit();",
    );
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .expect("admin connection");

    let mut files = FlowFiles::new("http://127.0.0.1:9", ledger.clone(), 8);
    {
        let spec = &mut files.rendered.flow.spec;
        spec.sink.system = SinkSystem::Postgres;
        spec.sink.base_url = None;
        spec.sink.table = Some("orders".into());
        spec.delivery.batch = Some(BatchPolicy {
            max_records: Some(200),
            ..BatchPolicy::default()
        });
    }
    let sink_secret = files
        .secrets_dir()
        .join(&files.rendered.flow.spec.sink.credentials_secret_ref.name);
    std::fs::create_dir_all(&sink_secret).expect("secret dir");
    std::fs::write(sink_secret.join("url"), &sink_url).expect("sink url");
    std::fs::write(
        files.flow_file(),
        serde_yaml::to_string(&files.rendered).expect("rendered flow serialises"),
    )
    .expect("flow file");

    let mut worker = WorkerProcess::new(&files, "batch-crash-worker");
    worker.start().await;
    let _evidence = EvidenceOnFailure::new(vec![worker.ops_url()]);

    let (batches, latest, versions) = traffic(RECORDS, BATCH, REVISIONS);
    let total_batches = batches.len();
    // How many of the CRM's webhook batches were acknowledged: the kills are spread over the traffic by
    // it, not by the clock, so however fast the worker drains, every kill finds records still arriving.
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let urls = vec![worker.url()];
    let crm = tokio::spawn({
        let acknowledged = acknowledged.clone();
        async move {
            let http = client();
            let mut stats = CrmStats::default();
            for batch in &batches {
                deliver_batch(&http, &urls, batch, &mut stats, Duration::from_secs(60)).await;
                acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            stats
        }
    });

    let mut mid_batch = 0;
    let mut outages = 0;
    for kill in 0..KILLS {
        let due = (kill as usize + 1) * total_batches / (KILLS as usize + 2);
        while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < due && !crm.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        if kill % 2 == 1 {
            // Wait for a batch statement to be running, so the crash lands between the sink's work and the
            // ledger's record of it. Records are still arriving (see `due`), so one comes.
            while batches_in_flight(&admin).await == 0 && !crm.is_finished() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if batches_in_flight(&admin).await > 0 {
            mid_batch += 1;
        }
        if kill % 4 == 2 && outages < OUTAGES {
            // A sink outage in the middle of batches: every connection to the sink database is dropped and
            // new ones are refused for a while; the worker keeps running.
            outages += 1;
            sqlx::query("ALTER DATABASE sink ALLOW_CONNECTIONS false")
                .execute(&admin)
                .await
                .expect("close the sink database");
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = 'sink' AND pid <> pg_backend_pid()",
            )
            .execute(&admin)
            .await
            .expect("drop the sink's connections");
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
            sqlx::query("ALTER DATABASE sink ALLOW_CONNECTIONS true")
                .execute(&admin)
                .await
                .expect("reopen the sink database");
            continue;
        }
        worker.kill();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        worker.start().await;
    }
    let sending = tokio::time::timeout(Duration::from_secs(90), crm)
        .await
        .expect("the CRM finished sending within 90 s of the last kill")
        .expect("the CRM task did not panic");

    // Records leased by a killed process wait for their lease to expire, then are taken over.
    let status = worker
        .wait_for("nothing pending", Duration::from_secs(150), |s| {
            s["pending"].as_u64() == Some(0)
        })
        .await;
    worker.kill();

    let sink = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&sink_url)
        .await
        .expect("sink connection");
    let rows: BTreeMap<String, String> =
        sqlx::query("SELECT external_id, payload->>'memo' AS memo FROM orders")
            .fetch_all(&sink)
            .await
            .expect("read the table")
            .into_iter()
            .map(|r| (r.get("external_id"), r.get("memo")))
            .collect();
    let expected: HashSet<String> = latest.keys().map(|&n| external_id(n)).collect();
    let got: HashSet<String> = rows.keys().cloned().collect();
    assert!(
        expected == got,
        "the table holds exactly the generated records: {} missing (e.g. {:?}), {} extra",
        expected.difference(&got).count(),
        expected.difference(&got).take(5).collect::<Vec<_>>(),
        got.difference(&expected).count()
    );
    let stale: Vec<String> = latest
        .iter()
        .filter(|(n, v)| rows[&external_id(**n)] != order_memo(**n, **v))
        .map(|(n, v)| {
            format!(
                "{}: has {}, latest is revision {v}",
                external_id(*n),
                rows[&external_id(*n)]
            )
        })
        .take(5)
        .collect();
    assert!(
        stale.is_empty(),
        "every record holds its latest payload: {stale:?}"
    );

    // Repeated writes happen only in the crash window (the table committed, the worker died before its
    // ledger did) and carry a payload the record really had: never an older revision after a newer one.
    // Writes of one row are serialized by its row lock, so their sequence numbers are in commit order
    // (a heap's physical order is not: concurrent inserts fill different pages).
    let writes: Vec<(String, String)> =
        sqlx::query("SELECT external_id, memo FROM writes ORDER BY seq")
            .fetch_all(&sink)
            .await
            .expect("read the writes")
            .into_iter()
            .map(|r| (r.get("external_id"), r.get("memo")))
            .collect();
    let mut last_revision: BTreeMap<&str, u32> = BTreeMap::new();
    for (id, memo) in &writes {
        let n: usize = latest
            .keys()
            .find(|&&n| external_id(n) == *id)
            .copied()
            .expect("a generated record");
        let revision = (1..=2)
            .find(|&v| order_memo(n, v) == *memo)
            .unwrap_or_else(|| panic!("{id} was written with a payload it never had: {memo}"));
        let previous = last_revision.insert(id, revision).unwrap_or(0);
        assert!(
            revision >= previous,
            "{id}: revision {revision} was written after revision {previous}"
        );
    }

    assert_eq!(
        counter(&status, "delivered") as usize,
        rows.len(),
        "the ledger's delivered count agrees with the table: {status}"
    );
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");
    assert_eq!(
        counter(&status, "received") as usize,
        versions,
        "every record version was stored exactly once: {status}"
    );
    assert_eq!(outages, OUTAGES, "every sink outage happened");
    assert!(
        mid_batch >= KILLS / 4,
        "kills and outages hit batches in flight ({mid_batch})"
    );
    let mut seen = HashSet::new();
    let repeats = writes.iter().filter(|w| !seen.insert(*w)).count();
    eprintln!(
        "batch crash ({}): {RECORDS} records, {versions} versions, {} SIGKILLs and {OUTAGES} sink outages \
         ({mid_batch} mid-batch), CRM {sending:?}, {} row writes ({repeats} repeats of a version), total {:.1?}",
        status["backend"],
        KILLS - OUTAGES,
        writes.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_sink_outages_mid_batch_neither_lose_nor_duplicate_with_sqlite() {
    let pg = postgres::PgServer::start();
    crash_and_outage_while_batches_are_delivered(&pg, LedgerChoice::Embedded, 0xba7c_0001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_sink_outages_mid_batch_neither_lose_nor_duplicate_with_postgres() {
    let pg = postgres::PgServer::start();
    let url = pg.create_database("ledger");
    crash_and_outage_while_batches_are_delivered(&pg, LedgerChoice::Postgres(url), 0xba7c_0002)
        .await;
}
