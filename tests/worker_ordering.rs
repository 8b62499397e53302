//! Revisions arrive out of order; the ERP must still end with the newest. The worker end to end in one process
//! (intake → SQLite ledger → the salesforce-netsuite example contract, ordered by `systemModstamp` → an ERP
//! double that keeps every request it saw, in order, and can hold one until the test lets it go).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, LedgerSpec};
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Only there so a broken worker fails the test instead of hanging it.
const GIVE_UP: Duration = Duration::from_secs(120);

#[derive(Default)]
struct ErpDouble {
    /// What the ERP holds, by external id.
    orders: Mutex<HashMap<String, Value>>,
    /// Every request as it started and as it was applied: ("start" | "applied", memo).
    log: Mutex<Vec<(&'static str, String)>>,
    /// A request with this memo waits for `release` before the ERP applies it.
    hold_memo: Mutex<Option<String>>,
    held: Notify,
    release: Notify,
}

#[async_trait]
impl Sink for ErpDouble {
    fn system(&self) -> &'static str {
        "double"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        let memo = d.payload["memo"].as_str().unwrap_or_default().to_string();
        self.log.lock().unwrap().push(("start", memo.clone()));
        let hold = self.hold_memo.lock().unwrap().as_deref() == Some(memo.as_str());
        if hold {
            // A slow ERP: the request sits here until the test has seen the next revision stored.
            self.held.notify_one();
            self.release.notified().await;
        }
        self.orders
            .lock()
            .unwrap()
            .insert(d.external_id.to_string(), d.payload.clone());
        self.log.lock().unwrap().push(("applied", memo));
        Ok(Delivered {
            erp_id: None,
            created: None,
            status: 204,
        })
    }
    async fn probe(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn fetch_lookup(&self, _: &str, _: &str) -> Result<Vec<Value>, SinkError> {
        Ok(Vec::new())
    }
}

impl ErpDouble {
    fn memo_of(&self, external_id: &str) -> Option<String> {
        self.orders
            .lock()
            .unwrap()
            .get(external_id)
            .and_then(|o| o["memo"].as_str().map(str::to_string))
    }

    fn log(&self) -> Vec<(&'static str, String)> {
        self.log.lock().unwrap().clone()
    }
}

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/contract")
            .join(name),
    )
    .unwrap()
}

const ID: &str = "0065g0000000000042";
const EXTERNAL_ID: &str = "SF-0065g0000000000042";

/// A revision of the one Opportunity these tests change: its name (the ERP's memo) says which, and its
/// SystemModstamp says when Salesforce made it.
fn revision(name: &str, modstamp: &str) -> SourceRecord {
    let mut v: Value = serde_json::from_str(&data("good_record.json")).unwrap();
    v["id"] = json!(ID);
    v["name"] = json!(name);
    v["systemModstamp"] = json!(modstamp);
    SourceRecord {
        key: ID.to_string(),
        payload: v,
        correlation_id: None,
    }
}

struct Harness {
    worker: Worker,
    erp: Arc<ErpDouble>,
    http: reqwest::Client,
    _state: tempfile::TempDir,
}

async fn start() -> Harness {
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    assert_eq!(
        rendered
            .contract
            .spec
            .ordering
            .as_ref()
            .map(|o| o.field.as_str()),
        Some("systemModstamp"),
        "the example orders its revisions"
    );
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.replicas = None;
    rendered.flow.spec.delivery.concurrency = 4;
    rendered.flow.spec.delivery.backoff = Some(Backoff {
        base: Some("10ms".parse().unwrap()),
        max: Some("100ms".parse().unwrap()),
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
    let erp = Arc::new(ErpDouble::default());
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let worker = Worker::start(&rendered, &settings, erp.clone(), lookups, |_| {
        axum::Router::new()
    })
    .await
    .unwrap();
    Harness {
        worker,
        erp,
        http: reqwest::Client::new(),
        _state: state,
    }
}

/// The operations API's token, which `/status` asks for.
const API_TOKEN: &str = "ordering-token";

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

    /// Polls `check` until it holds; fails with `what` and the last status after [`GIVE_UP`].
    async fn until(&self, what: &str, check: impl Fn(&Harness, &Value) -> bool) -> Value {
        let give_up = tokio::time::Instant::now() + GIVE_UP;
        loop {
            let status = self.status().await;
            if check(self, &status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "gave up waiting for {what}: status {status}, ERP log {:?}",
                self.erp.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn counter(status: &Value, name: &str) -> i64 {
    status["counters"][name].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_older_revision_never_overwrites_the_newer_one_at_the_erp() {
    let h = start().await;
    // Revision 2 (10:20) arrives first and reaches the ERP.
    let receipt = h
        .worker
        .intake
        .accept(vec![revision("revision 2", "2026-11-27T10:20:00Z")])
        .await
        .unwrap();
    assert_eq!(receipt.stored, 1);
    h.until("revision 2 at the ERP", |h, s| {
        h.erp.memo_of(EXTERNAL_ID).as_deref() == Some("revision 2") && counter(s, "delivered") == 1
    })
    .await;

    // Then Salesforce's delayed retry of revision 1 (10:15): acknowledged, recorded as stale, not stored.
    let receipt = h
        .worker
        .intake
        .accept(vec![revision("revision 1", "2026-11-27T10:15:00Z")])
        .await
        .unwrap();
    assert_eq!((receipt.stale, receipt.updates), (1, 0));
    let status = h
        .until("the stale count", |_, s| counter(s, "stale") == 1)
        .await;
    assert_eq!(counter(&status, "delivered"), 1);

    // Revision 3 (10:30) is an update and goes out; the ERP saw 2 then 3, never 1.
    h.worker
        .intake
        .accept(vec![revision("revision 3", "2026-11-27T10:30:00Z")])
        .await
        .unwrap();
    h.until("revision 3 at the ERP", |h, s| {
        h.erp.memo_of(EXTERNAL_ID).as_deref() == Some("revision 3") && counter(s, "delivered") == 1
    })
    .await;
    let applied: Vec<String> = h
        .erp
        .log()
        .into_iter()
        .filter(|(what, _)| *what == "applied")
        .map(|(_, memo)| memo)
        .collect();
    assert_eq!(applied, ["revision 2", "revision 3"]);

    // The record's lineage names the stale revision with both SystemModstamps (µs since the epoch).
    let ledger = &h.worker.pipeline.ledger;
    let view = ledger
        .list(meshline::ledger::RecordState::Delivered, None, None, 10)
        .await
        .unwrap();
    let detail = ledger.get(view[0].id).await.unwrap().unwrap();
    let stale = detail
        .lineage
        .iter()
        .find(|e| e.step == "stale")
        .expect("a stale step in the lineage");
    let micros = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .timestamp_micros()
    };
    assert_eq!(
        stale.detail["ordering"],
        json!({"stored": micros("2026-11-27T10:20:00Z"), "incoming": micros("2026-11-27T10:15:00Z")})
    );
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_revision_arriving_while_the_older_is_in_flight_ends_at_the_erp() {
    let h = start().await;
    *h.erp.hold_memo.lock().unwrap() = Some("generation 1".into());
    let held = h.erp.held.notified();
    h.worker
        .intake
        .accept(vec![revision("generation 1", "2026-11-27T10:15:00Z")])
        .await
        .unwrap();
    // Generation 1's PUT is now at the (slow) ERP.
    tokio::time::timeout(GIVE_UP, held)
        .await
        .expect("generation 1 reaches the ERP");

    // Generation 2 arrives and is stored while generation 1 is in flight.
    let receipt = h
        .worker
        .intake
        .accept(vec![revision("generation 2", "2026-11-27T10:20:00Z")])
        .await
        .unwrap();
    assert_eq!(receipt.updates, 1, "generation 2 is stored as an update");
    assert_eq!(
        h.erp.log(),
        [("start", "generation 1".to_string())],
        "generation 2 is not sent while generation 1 is in flight"
    );
    // Now the ERP answers generation 1.
    h.erp.release.notify_one();

    let status = h
        .until("generation 2 at the ERP", |h, s| {
            h.erp.memo_of(EXTERNAL_ID).as_deref() == Some("generation 2")
                && counter(s, "delivered") == 1
                && s["pending"] == 0
        })
        .await;
    assert_eq!(counter(&status, "deadLettered"), 0);
    // Generation 2 was sent only after the ERP had applied generation 1, so nothing can reorder them there.
    assert_eq!(
        h.erp.log(),
        [
            ("start", "generation 1".to_string()),
            ("applied", "generation 1".to_string()),
            ("start", "generation 2".to_string()),
            ("applied", "generation 2".to_string()),
        ]
    );
    h.worker.shutdown().await;
}
