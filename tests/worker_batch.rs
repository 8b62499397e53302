//! Batched delivery into a real PostgreSQL table: the worker in one process (intake → SQLite ledger → the
//! salesforce-netsuite example contract → the PostgreSQL sink's multi-row upsert), with one outcome per record.
//!
//! - A batch holding one record the table refuses (a CHECK constraint) delivers the others and dead-letters
//!   that one alone, with PostgreSQL's reason.
//! - Revisions of one key that arrive together resolve by the contract's ordering before any batch is formed:
//!   the newest is what the table holds, the stale one is never written.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshline::api::{Backoff, BatchPolicy, LedgerSpec};
use meshline::connectors::sinks::postgres::PostgresSink;
use meshline::connectors::sinks::{Limited, Pressure};
use meshline::connectors::{
    BatchLimits, Delivered, Delivery, Intake, Sink, SinkError, SourceRecord,
};
use meshline::ledger::RecordState;
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};
use sqlx::Row;

/// Only there so a broken worker fails the test instead of hanging it.
const GIVE_UP: Duration = Duration::from_secs(120);
const API_TOKEN: &str = "batch-token";

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/contract")
            .join(name),
    )
    .unwrap()
}

/// Opportunity `n` (its name becomes the ERP payload's `memo`), last modified at `modstamp`.
fn opportunity(n: usize, name: &str, modstamp: &str) -> SourceRecord {
    let mut v: Value = serde_json::from_str(&data("good_record.json")).unwrap();
    let id = format!("0065g{n:013}");
    v["id"] = json!(id);
    v["name"] = json!(name);
    v["systemModstamp"] = json!(modstamp);
    SourceRecord {
        key: id,
        payload: v,
        correlation_id: None,
    }
}

fn external_id(n: usize) -> String {
    format!("SF-0065g{n:013}")
}

struct Harness {
    worker: Worker,
    pool: sqlx::PgPool,
    http: reqwest::Client,
    _state: tempfile::TempDir,
    _pg: postgres::PgServer,
}

/// The worker with the PostgreSQL sink on table `orders`, which refuses any order whose memo is `poison`.
/// Batches of up to 100 records that wait up to a second for company, so the records of one intake call
/// share a batch even on a busy machine.
async fn start() -> Harness {
    start_with(None).await
}

/// [`start`], delivering to `sink` instead of the PostgreSQL table when given.
async fn start_with(replacement: Option<Arc<dyn Sink>>) -> Harness {
    let pg = postgres::PgServer::start();
    let url = pg.create_database("erp");
    pg.run_sql(
        "erp",
        "CREATE TABLE orders (external_id text PRIMARY KEY, payload jsonb NOT NULL, \
         correlation_id text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), \
         updated_at timestamptz NOT NULL DEFAULT now(), \
         CONSTRAINT no_poison CHECK (payload->>'memo' IS DISTINCT FROM 'poison'))",
    );
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.replicas = None;
    rendered.flow.spec.delivery.concurrency = 4;
    rendered.flow.spec.delivery.backoff = Some(Backoff {
        base: Some("10ms".parse().unwrap()),
        max: Some("100ms".parse().unwrap()),
    });
    rendered.flow.spec.delivery.batch = Some(BatchPolicy {
        max_records: Some(100),
        max_bytes: None,
        linger: Some("1s".parse().unwrap()),
    });
    let state = tempfile::tempdir().unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: None,
        token_file: Some({
            let path = state.path().join("api-token");
            std::fs::write(&path, API_TOKEN).unwrap();
            path
        }),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            ..PipelineOptions::default()
        },
    };
    let pressure = Pressure::from_policy(&rendered.flow.spec.delivery);
    let sink = PostgresSink::connect_lazy_sized(&url, "orders", pressure.concurrency).unwrap();
    let sink: Arc<dyn Sink> = match replacement {
        Some(replacement) => replacement,
        None => Arc::new(Limited::new(sink, pressure)),
    };
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let worker = Worker::start(&rendered, &settings, sink, lookups, |_| axum::Router::new())
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    Harness {
        worker,
        pool,
        http: reqwest::Client::new(),
        _state: state,
        _pg: pg,
    }
}

impl Harness {
    async fn status(&self) -> Value {
        self.http
            .get(format!("http://{}/status", self.worker.ops_addr))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.worker.ops_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls `/status` until `check` holds; fails with `what` and the last status after [`GIVE_UP`].
    async fn until(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let give_up = tokio::time::Instant::now() + GIVE_UP;
        loop {
            let status = self.status().await;
            if check(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "gave up waiting for {what}: status {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The table's memo by external id.
    async fn memos(&self) -> std::collections::BTreeMap<String, String> {
        sqlx::query("SELECT external_id, payload->>'memo' AS memo FROM orders")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get("external_id"), r.get("memo")))
            .collect()
    }
}

fn counter(status: &Value, name: &str) -> i64 {
    status["counters"][name].as_i64().unwrap_or(-1)
}

/// The value of an unlabelled-by-us metric (the flow and namespace labels aside) in the text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in the metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_the_table_refuses_is_dead_lettered_alone_and_the_rest_of_its_batch_is_delivered()
 {
    let h = start().await;
    // Held back until all 60 are stored, so they are claimed together and meet in one batch.
    h.worker
        .pipeline
        .set_gate(Some("the test stores a batch first".into()));
    let records: Vec<SourceRecord> = (0..60)
        .map(|n| {
            let name = if n == 37 {
                "poison".to_string()
            } else {
                format!("order {n}")
            };
            opportunity(n, &name, "2026-11-27T10:15:00Z")
        })
        .collect();
    let receipt = h.worker.intake.accept(records).await.unwrap();
    assert_eq!(receipt.stored, 60);
    h.worker.pipeline.set_gate(None);

    let status = h
        .until("59 delivered and one dead letter", |s| {
            counter(s, "delivered") == 59 && counter(s, "deadLettered") == 1
        })
        .await;
    assert_eq!(status["pending"].as_i64().unwrap_or(-1), 0, "{status}");

    let memos = h.memos().await;
    assert_eq!(
        memos.len(),
        59,
        "every other record of the batch is in the table"
    );
    assert!(!memos.contains_key(&external_id(37)));
    for n in (0..60).filter(|&n| n != 37) {
        assert_eq!(memos[&external_id(n)], format!("order {n}"));
    }

    // The dead letter is the poison record's, with PostgreSQL's own reason naming the constraint.
    let ledger = &h.worker.pipeline.ledger;
    let dead = ledger
        .list(RecordState::DeadLettered, None, None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let record = &dead[0];
    assert_eq!(record.source_key, "0065g0000000000037");
    assert_eq!(record.dead_letter_reason.as_deref(), Some("erp:rejected"));
    let response = record.erp_response.clone().unwrap_or_default();
    assert!(
        response.contains("no_poison") && response.contains("23514"),
        "the sink's reason names the constraint and its SQLSTATE: {response}"
    );

    // The poison record shared a batch with others, which the table refused as a whole: the pipeline split
    // it rather than dead-lettering its neighbours.
    let metrics = h.metrics().await;
    assert!(
        metric(&metrics, "meshline_delivery_batch_splits_total") >= 1.0,
        "the refused batch was split: {metrics}"
    );
    let batches = metric(&metrics, "meshline_delivery_batch_records_count");
    assert!(
        batches < 59.0,
        "records went out in batches, not one request each ({batches} requests)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_of_one_key_in_one_batch_leave_the_newest_in_the_table() {
    let h = start().await;
    h.worker
        .pipeline
        .set_gate(Some("the test stores a batch first".into()));
    // One intake call: record 1 in two revisions in order, record 2 newest first then a late older one,
    // and eight others.
    let mut records = vec![
        opportunity(1, "one: first", "2026-11-27T10:15:00Z"),
        opportunity(2, "two: newest", "2026-11-27T10:30:00Z"),
    ];
    records.extend((3..11).map(|n| opportunity(n, &format!("order {n}"), "2026-11-27T10:15:00Z")));
    records.push(opportunity(1, "one: second", "2026-11-27T10:20:00Z"));
    records.push(opportunity(
        2,
        "two: late and older",
        "2026-11-27T10:20:00Z",
    ));
    let receipt = h.worker.intake.accept(records).await.unwrap();
    assert_eq!(
        (receipt.stored, receipt.updates, receipt.stale),
        (10, 1, 1),
        "{receipt:?}"
    );
    h.worker.pipeline.set_gate(None);
    let status = h
        .until("ten delivered", |s| {
            counter(s, "delivered") == 10 && s["pending"].as_i64() == Some(0)
        })
        .await;
    assert_eq!(counter(&status, "stale"), 1, "{status}");
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");
    let memos = h.memos().await;
    assert_eq!(memos.len(), 10);
    assert_eq!(memos[&external_id(1)], "one: second");
    assert_eq!(memos[&external_id(2)], "two: newest");

    // A revision that arrives while the first is being delivered goes out after it, and wins.
    h.worker
        .intake
        .accept(vec![opportunity(
            2,
            "two: newer still",
            "2026-11-27T10:40:00Z",
        )])
        .await
        .unwrap();
    h.until("the newer revision delivered", |s| {
        s["pending"].as_i64() == Some(0)
    })
    .await;
    let give_up = tokio::time::Instant::now() + GIVE_UP;
    while h.memos().await[&external_id(2)] != "two: newer still" {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the newer revision never reached the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sink that takes batches and keeps every batch it was sent, as external id and memo.
#[derive(Default)]
struct BatchLog {
    batches: std::sync::Mutex<Vec<Vec<(String, String)>>>,
}

#[async_trait::async_trait]
impl Sink for BatchLog {
    fn system(&self) -> &'static str {
        "batch-log"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        self.deliver_batch(&[d]).await?.remove(0)
    }
    fn batch_limits(&self) -> Option<BatchLimits> {
        Some(BatchLimits::DEFAULT)
    }
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        let batch = deliveries
            .iter()
            .map(|d| {
                let memo = d.payload["memo"].as_str().unwrap_or_default().to_string();
                (d.external_id.to_string(), memo)
            })
            .collect();
        self.batches.lock().unwrap().push(batch);
        Ok(deliveries
            .iter()
            .map(|_| {
                Ok(Delivered {
                    erp_id: None,
                    created: None,
                    status: 200,
                })
            })
            .collect())
    }
    async fn probe(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn fetch_lookup(&self, _: &str, _: &str) -> Result<Vec<Value>, SinkError> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_records_with_one_external_id_never_share_a_batch() {
    let log = Arc::new(BatchLog::default());
    let h = start_with(Some(log.clone())).await;
    h.worker
        .pipeline
        .set_gate(Some("the test stores a batch first".into()));
    // Two CRM keys whose payloads carry the same Opportunity id map to one external id (a contract that
    // maps two records onto one ERP order): a multi-row upsert cannot write one row twice.
    let mut records: Vec<SourceRecord> = (0..20)
        .map(|n| opportunity(n, &format!("order {n}"), "2026-11-27T10:15:00Z"))
        .collect();
    let mut twin = opportunity(5, "order 5, second key", "2026-11-27T10:15:00Z");
    twin.key = "another-key-same-order".into();
    records.push(twin);
    assert_eq!(h.worker.intake.accept(records).await.unwrap().stored, 21);
    h.worker.pipeline.set_gate(None);
    h.until("21 delivered", |s| counter(s, "delivered") == 21)
        .await;
    let batches = log.batches.lock().unwrap().clone();
    for batch in &batches {
        let ids: std::collections::HashSet<&String> = batch.iter().map(|(id, _)| id).collect();
        assert_eq!(
            ids.len(),
            batch.len(),
            "a batch repeats an external id: {batch:?}"
        );
    }
    let delivered: Vec<&String> = batches.iter().flatten().map(|(id, _)| id).collect();
    assert_eq!(
        delivered.len(),
        21,
        "every record went out once: {batches:?}"
    );
    assert_eq!(
        delivered
            .iter()
            .filter(|id| ***id == external_id(5))
            .count(),
        2
    );
}
