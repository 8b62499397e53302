//! The worker end to end in one process: intake → ledger (SQLite, and PostgreSQL where the backends differ)
//! → contract → sink, with a sink double whose failures are programmable, and the operations API over real
//! HTTP.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, ErrorClass, LedgerSpec, LedgerType, SecretRef};
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::contract::{CompileOptions, CpuClock, CpuTime};
use meshline::ledger::RecordState;
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

/// How the sink double answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Unavailable,
    Unauthorized,
    /// Up (probes pass), but each order's first delivery in this mode fails with a 503.
    FailOnce,
}

#[derive(Default)]
struct ErpDouble {
    orders: Mutex<HashMap<String, Value>>,
    /// Delivery calls answered, counted only once the call's effect (a stored order) is visible, so a test
    /// that sees the count also sees the order.
    calls: AtomicUsize,
    /// Probes refused while the ERP is down.
    refused_probes: AtomicUsize,
    mode: Mutex<Option<Mode>>,
    /// External ids the ERP refuses with a 400 until cleared.
    refuse: Mutex<Vec<String>>,
    /// External ids that have had their one failure in `Mode::FailOnce`.
    failed_once: Mutex<std::collections::HashSet<String>>,
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
}

#[async_trait]
impl Sink for ErpDouble {
    fn system(&self) -> &'static str {
        "double"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        let answer = self.answer(d).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        answer
    }
    async fn probe(&self) -> Result<(), SinkError> {
        match self.mode.lock().unwrap().unwrap_or(Mode::Ok) {
            Mode::Ok | Mode::FailOnce => Ok(()),
            _ => {
                self.refused_probes.fetch_add(1, Ordering::SeqCst);
                Err(SinkError::new(
                    "double",
                    ErrorClass::Transient,
                    "still down",
                ))
            }
        }
    }
    async fn fetch_lookup(&self, _: &str, _: &str) -> Result<Vec<Value>, SinkError> {
        Ok(Vec::new())
    }
}

impl ErpDouble {
    async fn answer(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mode = self.mode.lock().unwrap().unwrap_or(Mode::Ok);
        match mode {
            Mode::Unavailable => {
                return Err(SinkError::from_status("double", 503, None, "maintenance"));
            }
            Mode::Unauthorized => {
                return Err(SinkError::from_status("double", 401, None, "INVALID_LOGIN"));
            }
            Mode::FailOnce => {
                if self
                    .failed_once
                    .lock()
                    .unwrap()
                    .insert(d.external_id.to_string())
                {
                    return Err(SinkError::from_status("double", 503, None, "busy"));
                }
            }
            Mode::Ok => {}
        }
        if self
            .refuse
            .lock()
            .unwrap()
            .iter()
            .any(|r| r == d.external_id)
        {
            return Err(SinkError::from_status(
                "double",
                400,
                None,
                r#"{"o:errorDetails":[{"detail":"Invalid item"}]}"#,
            ));
        }
        let created = self
            .orders
            .lock()
            .unwrap()
            .insert(d.external_id.to_string(), d.payload.clone())
            .is_none();
        Ok(Delivered {
            erp_id: None,
            created: Some(created),
            status: 204,
        })
    }

    /// Waits until the worker has probed the ERP during its outage and been refused `n` times: the breaker is
    /// open and has held for a while, decided by the worker's own probe schedule rather than a test's sleep.
    async fn wait_for_refused_probes(&self, n: usize) {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
        while self.refused_probes.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < give_up,
                "the worker never probed the ERP {n} times"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A CPU clock for the contract that burns a whole second at each of its first `burning` readings and then
/// stands still: the first evaluations that read it overrun any deadline, later ones never do.
struct ScriptedCpu {
    /// (current reading, readings left that burn).
    state: Mutex<(Duration, u64)>,
}

impl ScriptedCpu {
    fn burning(readings: u64) -> Arc<ScriptedCpu> {
        Arc::new(ScriptedCpu {
            state: Mutex::new((Duration::ZERO, readings)),
        })
    }
}

impl CpuTime for ScriptedCpu {
    fn cpu_time(&self) -> Duration {
        let mut state = self.state.lock().unwrap();
        let now = state.0;
        if state.1 > 0 {
            state.1 -= 1;
            state.0 += Duration::from_secs(1);
        }
        now
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

fn good_record(i: usize) -> SourceRecord {
    let mut v: Value = serde_json::from_str(&data("good_record.json")).unwrap();
    let id = format!("0065g{:013}", i);
    v["id"] = json!(id);
    SourceRecord {
        key: id,
        payload: v,
        correlation_id: None,
    }
}

struct Harness {
    worker: Worker,
    erp: Arc<ErpDouble>,
    http: reqwest::Client,
    _state: tempfile::TempDir,
    /// The PostgreSQL ledger's server, when the worker runs on one (dropped after the worker).
    _pg: Option<postgres::PgServer>,
}

const TOKEN: &str = "test-token-123";
/// Personal tokens in the example roster's identity Secret: Marcus holds `finance` (the discount hold's
/// approver role), Dana holds no approver role.
const MARCUS: &str = "marcus-personal-token-7f3a9c21";
const DANA: &str = "dana-personal-token-0b5e44d8a1";

async fn start(concurrency: u32) -> Harness {
    start_with(concurrency, CompileOptions::default()).await
}

/// The example flow, its contract and roster, as manifests give them.
fn example() -> RenderedFlow {
    RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap()
}

async fn start_with(concurrency: u32, contract: CompileOptions) -> Harness {
    start_rendered(example(), concurrency, contract).await
}

async fn start_rendered(
    rendered: RenderedFlow,
    concurrency: u32,
    contract: CompileOptions,
) -> Harness {
    start_giving_up_after(rendered, concurrency, contract, 50).await
}

async fn start_giving_up_after(
    rendered: RenderedFlow,
    concurrency: u32,
    contract: CompileOptions,
    max_attempts: u32,
) -> Harness {
    start_on(rendered, concurrency, contract, max_attempts, None).await
}

/// The example flow on a PostgreSQL ledger in a fresh server, its URL in the ledger's Secret as the
/// controller mounts it.
async fn start_on_postgres(concurrency: u32) -> Harness {
    let pg = postgres::PgServer::start();
    start_on(
        example(),
        concurrency,
        CompileOptions::default(),
        50,
        Some(pg),
    )
    .await
}

async fn start_on(
    mut rendered: RenderedFlow,
    concurrency: u32,
    contract: CompileOptions,
    max_attempts: u32,
    pg: Option<postgres::PgServer>,
) -> Harness {
    rendered.flow.spec.ledger = LedgerSpec::default();
    if pg.is_some() {
        rendered.flow.spec.ledger.r#type = LedgerType::Postgres;
        rendered.flow.spec.ledger.credentials_secret_ref = Some(SecretRef {
            name: "ledger-database".into(),
        });
    }
    rendered.flow.spec.replicas = None;
    rendered.flow.spec.delivery.concurrency = concurrency;
    rendered.flow.spec.delivery.max_attempts = max_attempts;
    rendered.flow.spec.delivery.backoff = Some(Backoff {
        base: Some("10ms".parse().unwrap()),
        max: Some("100ms".parse().unwrap()),
    });
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // The roster's identity Secret as the controller mounts it: one file per owner id.
    let identities = state.path().join("secrets/revenue-operations-identities");
    std::fs::create_dir_all(&identities).unwrap();
    std::fs::write(identities.join("marcus"), format!("{MARCUS}\n")).unwrap();
    std::fs::write(identities.join("dana"), DANA).unwrap();
    if let Some(pg) = &pg {
        let secret = state.path().join("secrets/ledger-database");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("url"), pg.url()).unwrap();
    }
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: Some(state.path().join("secrets")),
        token_file: Some(token_file),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            contract,
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
        _pg: pg,
    }
}

impl Harness {
    /// A URL on the operations port.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker.ops_addr)
    }

    /// A URL on the webhook port.
    fn webhook_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker.webhook_addr)
    }

    /// A GET on the operations API with the flow's token, as JSON.
    async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn status(&self) -> Value {
        self.get_json("/status").await
    }

    /// Waits until `/status` satisfies `done`. The 120 s give-up only keeps a broken build from hanging; it is
    /// no performance bound.
    async fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn post(&self, path: &str, body: Value, token: Option<&str>) -> reqwest::Response {
        self.post_as(path, body, token, None).await
    }

    /// A POST with the flow's token and a person's identity token.
    async fn post_as(
        &self,
        path: &str,
        body: Value,
        token: Option<&str>,
        identity: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(i) = identity {
            req = req.header("x-meshline-identity", i);
        }
        req.send().await.unwrap()
    }

    /// Sends the 25 % discount deal, which the contract holds for `finance`, and returns its record id.
    async fn held_discount(&self) -> i64 {
        let mut held: Value = serde_json::from_str(&data("discount_25_record.json")).unwrap();
        held["id"] = json!("0065g0000000000777");
        self.worker
            .intake
            .accept(vec![SourceRecord {
                key: "0065g0000000000777".into(),
                payload: held,
                correlation_id: None,
            }])
            .await
            .unwrap();
        self.wait_for("held", |s| counter(s, "held") == 1).await;
        let holds: Value = self.get_json("/holds").await;
        assert_eq!(holds["items"][0]["hold_role"], "finance");
        holds["items"][0]["id"].as_i64().unwrap()
    }

    /// Asks to approve record `id` as whoever `identity` is; returns the status and the JSON answer.
    async fn approve_as(&self, id: i64, identity: Option<&str>, body: Value) -> (u16, Value) {
        let resp = self
            .post_as(
                &format!("/records/{id}/approve"),
                body,
                Some(TOKEN),
                identity,
            )
            .await;
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn record_state(&self, id: i64) -> Value {
        self.get_json(&format!("/records/{id}")).await
    }
}

fn counter(status: &Value, name: &str) -> i64 {
    status["counters"][name].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_record_is_delivered_exactly_once_and_duplicates_are_ignored() {
    let h = start(8).await;
    let records: Vec<SourceRecord> = (0..300).map(good_record).collect();
    let receipt = h.worker.intake.accept(records.clone()).await.unwrap();
    assert_eq!(receipt.stored, 300);
    // A CRM retrying its webhook sends the same records again.
    let again = h
        .worker
        .intake
        .accept(records[..50].to_vec())
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 50));
    let status = h
        .wait_for("300 delivered", |s| counter(s, "delivered") == 300)
        .await;
    assert_eq!(counter(&status, "deadLettered"), 0);
    assert_eq!(h.erp.orders.lock().unwrap().len(), 300);
    assert_eq!(
        h.erp.calls.load(Ordering::SeqCst),
        300,
        "no record is delivered twice"
    );
    assert!(
        h.erp.max_in_flight.load(Ordering::SeqCst) <= 8,
        "the flow's concurrency is respected"
    );
    let order = h
        .erp
        .orders
        .lock()
        .unwrap()
        .get("SF-0065g0000000000007")
        .cloned()
        .unwrap();
    assert_eq!(order["entity"]["externalId"], "0015g00000XyZabCDE");
    // An idle worker takes new records in the transaction that stores them (SQLite), skipping a claim.
    let leased = metric(&h, "intake_leased").await;
    assert!(
        leased > 0.0 && leased <= 300.0,
        "leased at intake: {leased}"
    );
    h.worker.shutdown().await;
}

/// The worker's `/metrics` exposition.
async fn metrics_text(h: &Harness) -> String {
    h.http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The counter `name` (without the `_total` suffix) from the worker's `/metrics`.
async fn metric(h: &Harness, name: &str) -> f64 {
    let text = metrics_text(h).await;
    sample(&text, &format!("meshline_{name}_total"))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Refused approvals counted under `reason` in the worker's `/metrics` (0 when none were).
async fn refused(h: &Harness, reason: &str) -> f64 {
    let text = metrics_text(h).await;
    text.lines()
        .find(|l| {
            l.starts_with("meshline_approvals_refused_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The value of the series `name` in an exposition, whatever its labels (every worker series carries the
/// flow's labels).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_webhooks_share_ledger_transactions_and_each_gets_its_own_answer() {
    let h = start(8).await;
    let intake = h.worker.intake.clone();
    // 300 single-record webhooks at once (as a CRM sends them), 50 of them twice, and one without a key.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let intake = intake.clone();
        calls.spawn(async move { (i as i64, intake.accept(vec![good_record(i)]).await) });
    }
    for i in 0..50 {
        let intake = intake.clone();
        calls.spawn(async move { (1_000 + i as i64, intake.accept(vec![good_record(i)]).await) });
    }
    let intake_for_bad = intake.clone();
    calls.spawn(async move {
        let mut bad = good_record(999);
        bad.key = String::new();
        (-1, intake_for_bad.accept(vec![bad]).await)
    });
    let (mut stored, mut duplicates) = (0, 0);
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        if i < 0 {
            let e = result.expect_err("a record without a key is refused");
            assert!(e.0.contains("idempotency key"), "{}", e.0);
            continue;
        }
        let receipt = result.unwrap_or_else(|e| panic!("webhook {i}: {}", e.0));
        // Each caller hears about its own record only: stored once, and the repeat is a duplicate.
        assert_eq!(
            receipt.stored + receipt.duplicates,
            1,
            "webhook {i}: {receipt:?}"
        );
        stored += receipt.stored;
        duplicates += receipt.duplicates;
    }
    assert_eq!((stored, duplicates), (300, 50));
    let commits = metric(&h, "intake_commits").await;
    assert!(
        commits <= 175.0,
        "350 concurrent webhooks took {commits} ledger transactions; they should share them"
    );
    delivered_each_once(&h, 300).await;
    h.worker.shutdown().await;
}

/// Waits until `records` are delivered; none is dead-lettered and none reached the ERP twice.
async fn delivered_each_once(h: &Harness, records: usize) {
    let status = h
        .wait_for(&format!("{records} delivered"), |s| {
            counter(s, "delivered") == records as i64
        })
        .await;
    assert_eq!(counter(&status, "deadLettered"), 0);
    assert_eq!(
        h.erp.calls.load(Ordering::SeqCst),
        records,
        "no record is delivered twice"
    );
}

/// On PostgreSQL the intake runs several group transactions side by side (`Ledger::ingest_writers`): the
/// same crowd of webhooks, half of them carrying records another webhook carries too, each gets its own
/// answer, the groups still share transactions, and every record is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_webhooks_on_a_postgresql_ledger_commit_side_by_side_and_deliver_each_record_once()
 {
    let h = start_on_postgres(8).await;
    assert!(
        h.worker.intake.pipeline.ledger.ingest_writers() > 1,
        "a PostgreSQL ledger takes group transactions side by side"
    );
    let intake = h.worker.intake.clone();
    // 200 webhooks of 3 records each: webhook i carries records 2i, 2i+1 and 2i+2 (mod 400), so every
    // other record arrives in two webhooks that race each other through different transactions.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200usize {
        let intake = intake.clone();
        calls.spawn(async move {
            let records = (0..3).map(|k| good_record((2 * i + k) % 400)).collect();
            (i, intake.accept(records).await)
        });
    }
    let (mut stored, mut duplicates) = (0, 0);
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        let receipt = result.unwrap_or_else(|e| panic!("webhook {i}: {}", e.0));
        assert_eq!(
            receipt.stored + receipt.duplicates,
            3,
            "webhook {i}: {receipt:?}"
        );
        stored += receipt.stored;
        duplicates += receipt.duplicates;
    }
    // 600 records sent: 400 distinct (2i and 2i+1 cover them), and each 2i+2 is a repeat of 2(i+1).
    assert_eq!((stored, duplicates), (400, 200));
    let commits = metric(&h, "intake_commits").await;
    assert!(
        commits <= 150.0,
        "200 concurrent webhooks took {commits} ledger transactions; they should share them"
    );
    delivered_each_once(&h, 400).await;
    h.worker.shutdown().await;
}

/// Group transactions in flight at once share the pipeline's room for leased records: each holds back as
/// much as it stores at most, the next gets what the others left, and the room comes back when a grant is
/// done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ingests_lease_no_more_than_the_pipeline_can_start() {
    let h = start(4).await;
    let pipeline = &h.worker.intake.pipeline;
    // An ingest of 5 records holds back room for 5, no more.
    let small = pipeline
        .lease_request(5)
        .expect("an idle pipeline has room for leased records");
    assert_eq!(small.request.limit, 5);
    let first = pipeline
        .lease_request(usize::MAX)
        .expect("an idle pipeline has room beside a small ingest");
    let room = first.request.limit + 5;
    assert!(room > 5);
    assert!(
        pipeline.lease_request(usize::MAX).is_none(),
        "a third ingest in flight must not lease the room the others may take ({room} records)"
    );
    drop(small);
    assert_eq!(
        pipeline.lease_request(usize::MAX).map(|g| g.request.limit),
        Some(5),
        "the small ingest's room comes back once its grant is done"
    );
    drop(first);
    let again = pipeline
        .lease_request(usize::MAX)
        .expect("the room comes back once the grants are done");
    assert_eq!(again.request.limit, room);
    drop(again);
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_payload_is_an_update_delivered_again() {
    let h = start(2).await;
    let first = good_record(1);
    h.worker.intake.accept(vec![first.clone()]).await.unwrap();
    h.wait_for("first delivery", |s| counter(s, "delivered") == 1)
        .await;
    let mut changed = first.clone();
    changed.payload["name"] = json!("ACME Corp - renewal (amended)");
    let receipt = h.worker.intake.accept(vec![changed]).await.unwrap();
    assert_eq!(receipt.updates, 1);
    // The double counts a call only once its order is stored, so the second call means the update is there.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    while h.erp.calls.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the update never reached the ERP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let order = h
        .erp
        .orders
        .lock()
        .unwrap()
        .get("SF-0065g0000000000001")
        .cloned()
        .unwrap();
    assert_eq!(
        order["memo"], "ACME Corp - renewal (amended)",
        "the ERP holds the latest payload"
    );
    assert_eq!(h.erp.orders.lock().unwrap().len(), 1);
    assert_eq!(
        h.erp.calls.load(Ordering::SeqCst),
        2,
        "one call per revision"
    );
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_with_reasons_and_replay_after_a_fix_delivers() {
    let h = start(4).await;
    let mut drifted: Value = serde_json::from_str(&data("price_drift_record.json")).unwrap();
    drifted["id"] = json!("0065g0000000000900");
    let refused = good_record(901);
    h.erp
        .refuse
        .lock()
        .unwrap()
        .push("SF-0065g0000000000901".into());
    let mut batch: Vec<SourceRecord> = (0..20).map(good_record).collect();
    batch.push(SourceRecord {
        key: "0065g0000000000900".into(),
        payload: drifted,
        correlation_id: None,
    });
    batch.push(refused);
    h.worker.intake.accept(batch).await.unwrap();
    let status = h
        .wait_for("20 delivered, 2 dead letters", |s| {
            counter(s, "delivered") == 20 && counter(s, "deadLettered") == 2
        })
        .await;
    assert_eq!(counter(&status, "held"), 0);

    let list: Value = h.get_json("/dead-letters").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let reasons: Vec<&str> = items
        .iter()
        .map(|i| i["dead_letter_reason"].as_str().unwrap_or_default())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("price-tolerance")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"erp:400"), "{reasons:?}");
    let erp_dead = items
        .iter()
        .find(|i| i["dead_letter_reason"] == "erp:400")
        .unwrap();
    assert!(
        erp_dead["erp_response"]
            .as_str()
            .unwrap()
            .contains("Invalid item"),
        "the ERP's answer is kept"
    );
    assert!(
        !list.to_string().contains("alice.buyer@acme.example"),
        "PII never leaves through the API"
    );
    // Each dead letter keeps the redacted snapshot taken when it was dead-lettered.
    for item in items {
        let id = item["id"].as_i64().unwrap();
        let story: Value = h.get_json(&format!("/records/{id}")).await;
        let snapshots = story["snapshots"].as_array().unwrap();
        assert_eq!(snapshots.len(), 1, "{story}");
        assert_eq!(snapshots[0]["kind"], "dead_lettered");
        assert_eq!(snapshots[0]["body"]["id"], item["payload"]["id"]);
        assert!(
            !story.to_string().contains("alice.buyer@acme.example"),
            "{story}"
        );
    }

    // Finance fixes the item in the ERP, then replays by reason.
    h.erp.refuse.lock().unwrap().clear();
    let denied = h
        .post(
            "/dead-letters/replay",
            json!({"deadLetterReason": "erp:400", "actor": "marcus"}),
            None,
        )
        .await;
    assert_eq!(denied.status(), 401);
    // With a personal token the replay is in that owner's name: an unknown token is refused (not
    // downgraded to the typed name), and so is a token that is someone else's than the stated actor.
    let body = json!({"deadLetterReason": "erp:400", "actor": "marcus", "reason": "item created"});
    for (identity, why) in [
        ("not-anyones-token-4d1c88e2", "who decides is not known"),
        (DANA, "is owner \"dana\"'s"),
    ] {
        let refused = h
            .post_as(
                "/dead-letters/replay",
                body.clone(),
                Some(TOKEN),
                Some(identity),
            )
            .await;
        assert_eq!(refused.status(), 403);
        let answer: Value = refused.json().await.unwrap();
        assert!(answer["error"].as_str().unwrap().contains(why), "{answer}");
    }
    assert_eq!(
        counter(&h.status().await, "deadLettered"),
        2,
        "nothing replayed"
    );
    let replay = h
        .post_as(
            "/dead-letters/replay",
            json!({"deadLetterReason": "erp:400", "reason": "item created"}),
            Some(TOKEN),
            Some(MARCUS),
        )
        .await;
    assert_eq!(replay.status(), 200);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["by"], "marcus", "{replay}");
    assert_eq!(replay["replayed"].as_array().unwrap().len(), 1, "{replay}");
    let status = h
        .wait_for("replayed record delivered", |s| {
            counter(s, "delivered") == 21
        })
        .await;
    assert_eq!(
        counter(&status, "deadLettered"),
        1,
        "only the contract rejection is left"
    );
    assert_ne!(status["manualInterventionsPer1k"], "0");
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_outage_delays_but_dead_letters_nothing() {
    let h = start(4).await;
    *h.erp.mode.lock().unwrap() = Some(Mode::Unavailable);
    h.worker
        .intake
        .accept((0..50).map(good_record).collect())
        .await
        .unwrap();
    // Every request failing is a flow-level condition: after a streak of failures the breaker opens and
    // the records wait instead of burning their attempts.
    let status = h
        .wait_for("breaker open during the outage", |s| {
            s["circuitBreaker"].is_object()
        })
        .await;
    assert!(counter(&status, "retried") >= 1, "{status}");
    // The outage lasts until the worker's probe has been refused, so recovery goes through the probe.
    h.erp.wait_for_refused_probes(1).await;
    *h.erp.mode.lock().unwrap() = None;
    let status = h
        .wait_for("all delivered after recovery", |s| {
            counter(s, "delivered") == 50
        })
        .await;
    assert_eq!(
        counter(&status, "deadLettered"),
        0,
        "no record is dead-lettered for a transient cause"
    );
    assert!(
        status["mttrSeconds"].is_number(),
        "MTTR is measured: {status}"
    );
    assert_eq!(h.erp.orders.lock().unwrap().len(), 50);
    h.worker.shutdown().await;
}

/// Records given back while the flow cannot deliver (the ERP refuses the flow's credentials: each record
/// in flight is released, not failed) keep their attempts: with two allowed, every record still gets its
/// two real tries once the ERP is back, and a single failure then dead-letters nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_given_back_during_a_flow_level_failure_keep_their_attempts() {
    let h = start_giving_up_after(example(), 4, CompileOptions::default(), 2).await;
    *h.erp.mode.lock().unwrap() = Some(Mode::Unauthorized);
    h.worker
        .intake
        .accept((0..20).map(good_record).collect())
        .await
        .unwrap();
    h.wait_for("breaker open", |s| s["circuitBreaker"].is_object())
        .await;
    h.erp.wait_for_refused_probes(2).await;
    let refused = h.erp.calls.load(Ordering::SeqCst);
    assert!(refused >= 1, "records met the 401 and were given back");
    // The credentials are rotated, and every order now fails once before it is taken.
    *h.erp.mode.lock().unwrap() = Some(Mode::FailOnce);
    let status = h
        .wait_for("all delivered", |s| {
            counter(s, "delivered") + counter(s, "deadLettered") == 20
        })
        .await;
    assert_eq!(
        counter(&status, "deadLettered"),
        0,
        "a record released during the outage still had both its attempts: {status}"
    );
    assert_eq!(h.erp.orders.lock().unwrap().len(), 20);
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_credentials_pause_the_flow_instead_of_failing_records() {
    let h = start(4).await;
    *h.erp.mode.lock().unwrap() = Some(Mode::Unauthorized);
    h.worker
        .intake
        .accept((0..100).map(good_record).collect())
        .await
        .unwrap();
    let status = h
        .wait_for("breaker open", |s| s["circuitBreaker"].is_object())
        .await;
    assert!(
        status["circuitBreaker"]["reason"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{status}"
    );
    // While the breaker stays open the worker only probes; two refused probes span its probe backoff.
    h.erp.wait_for_refused_probes(2).await;
    let calls_while_open = h.erp.calls.load(Ordering::SeqCst);
    assert!(
        calls_while_open <= 8,
        "deliveries stop once the breaker opens ({calls_while_open} calls)"
    );
    let status = h.status().await;
    assert_eq!(
        counter(&status, "deadLettered"),
        0,
        "records wait; none is dead-lettered"
    );
    // The platform team rotates the credentials; the probe closes the breaker by itself.
    *h.erp.mode.lock().unwrap() = None;
    let status = h
        .wait_for("delivered after recovery", |s| {
            counter(s, "delivered") == 100
        })
        .await;
    assert!(status["circuitBreaker"].is_null());
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_discount_is_approved_by_the_finance_owner_in_person_and_delivered() {
    let h = start(2).await;
    let id = h.held_discount().await;

    let anonymous = h
        .post_as(
            &format!("/records/{id}/approve"),
            json!({"by": "marcus", "reason": "strategic account"}),
            Some("wrong"),
            Some(MARCUS),
        )
        .await;
    assert_eq!(
        anonymous.status(),
        401,
        "the flow's token still opens the API"
    );
    let (status, body) = h
        .approve_as(id, Some(MARCUS), json!({"by": "marcus", "reason": "  "}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("reason"), "{body}");

    // The old body (`actor` for `by`) still works; the person is the one the token names.
    let (status, body) = h
        .approve_as(
            id,
            Some(MARCUS),
            json!({"actor": "marcus", "reason": "strategic account"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["approvedBy"], "marcus");
    let status = h
        .wait_for("approved record delivered", |s| {
            counter(s, "delivered") == 1
        })
        .await;
    assert_eq!(status["manualInterventionsPer1k"], "1000");
    let story = h.record_state(id).await;
    assert_eq!(story["interventions"][0]["actor"], "marcus");
    assert_eq!(story["interventions"][0]["action"], "approve");
    assert_eq!(story["interventions"][0]["reason"], "strategic account");
    let approved = story["lineage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == "approve")
        .unwrap_or_else(|| panic!("no approve step in the lineage: {story}"));
    assert_eq!(approved["detail"]["actor"], "marcus");
    assert_eq!(approved["detail"]["reason"], "strategic account");
    assert!(
        !story.to_string().contains("alice.buyer@acme.example"),
        "PII is redacted in the record view"
    );
    // The approver's snapshot was taken when the record was held: the declared fields, personal ones redacted.
    let snapshots = story["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 1, "{story}");
    assert_eq!(snapshots[0]["kind"], "held");
    assert_eq!(snapshots[0]["body"]["id"], "0065g0000000000777");
    assert_eq!(snapshots[0]["body"]["discountPercent"], 25);
    assert!(snapshots[0]["body"].get("customerEmail").is_some());
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_a_hold_other_than_the_one_the_person_saw_is_a_conflict_and_decides_nothing()
{
    let h = start(2).await;
    let id = h.held_discount().await;
    // The operations page sends the hold as it showed it; another generation or role is not what was seen.
    for seen in [
        json!({"generation": 2, "holdRole": "finance"}),
        json!({"generation": 1, "holdRole": "legal"}),
    ] {
        let body = json!({"reason": "agreed", "seen": seen});
        let (status, answer) = h.approve_as(id, Some(MARCUS), body).await;
        assert_eq!(status, 409, "{answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("record {id} changed since it was seen"))
                && message.contains("nothing was decided"),
            "{answer}"
        );
        assert_eq!(h.record_state(id).await["record"]["state"], "held");
    }
    let body = json!({"reason": "agreed", "seen": {"generation": 1, "holdRole": "finance"}});
    let (status, answer) = h.approve_as(id, Some(MARCUS), body).await;
    assert_eq!(status, 200, "{answer}");
    assert_ne!(h.record_state(id).await["record"]["state"], "held");
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_from_anyone_but_an_owner_in_the_role_are_refused_counted_and_kept_in_the_lineage()
 {
    let h = start(2).await;
    let id = h.held_discount().await;
    let reason = json!({"reason": "looks fine to me"});
    // Each refusal: who, and the label it is counted under.
    let attempts: [(Option<&str>, Value, &str); 4] = [
        (None, reason.clone(), "unknown_identity"),
        (
            Some("a-token-nobody-was-given-123"),
            reason.clone(),
            "unknown_identity",
        ),
        // Dana is an owner, but not in `finance`.
        (Some(DANA), reason.clone(), "not_in_role"),
        // Dana's token, claiming to be Marcus.
        (
            Some(DANA),
            json!({"by": "marcus", "reason": "looks fine to me"}),
            "by_mismatch",
        ),
    ];
    for (identity, body, label) in &attempts {
        let (status, answer) = h.approve_as(id, *identity, body.clone()).await;
        assert_eq!(status, 403, "{label}: {answer}");
        assert_eq!(answer["reason"], *label, "{answer}");
        assert!(!answer["error"].as_str().unwrap().is_empty());
    }
    let rejected = h
        .post_as(
            &format!("/records/{id}/reject"),
            json!({"reason": "no"}),
            Some(TOKEN),
            Some(DANA),
        )
        .await;
    assert_eq!(rejected.status(), 403, "rejecting needs the role too");

    // The record stays held, with no intervention, and each refusal is in its lineage.
    let story = h.record_state(id).await;
    assert_eq!(story["record"]["state"], "held", "{story}");
    assert_eq!(story["interventions"].as_array().unwrap().len(), 0);
    let refusals: Vec<&Value> = story["lineage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["step"] == "approval_refused")
        .collect();
    assert_eq!(refusals.len(), 5, "{story}");
    assert_eq!(refusals[2]["detail"]["owner"], "dana");
    assert_eq!(refusals[2]["detail"]["reason"], "not_in_role");
    assert_eq!(refusals[4]["detail"]["action"], "reject");
    assert!(!story.to_string().contains(DANA), "no token in the lineage");
    let status = h.status().await;
    assert_eq!(counter(&status, "held"), 1);
    assert_eq!(status["manualInterventionsPer1k"], "0");
    // Counted by reason in /metrics.
    assert_eq!(refused(&h, "unknown_identity").await, 2.0);
    assert_eq!(refused(&h, "not_in_role").await, 2.0);
    assert_eq!(refused(&h, "by_mismatch").await, 1.0);

    // Marcus, in the role, still decides afterwards.
    let (status, body) = h
        .approve_as(
            id,
            Some(MARCUS),
            json!({"by": "marcus", "reason": "agreed with sales"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_for("delivered", |s| counter(s, "delivered") == 1)
        .await;
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roster_without_an_identity_secret_lets_nobody_approve_and_says_to_set_it() {
    let mut rendered = example();
    rendered.roster.as_mut().unwrap().spec.identity_secret_ref = None;
    let h = start_rendered(rendered, 2, CompileOptions::default()).await;
    let id = h.held_discount().await;
    let (status, body) = h
        .approve_as(
            id,
            Some(MARCUS),
            json!({"by": "marcus", "reason": "strategic account"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "no_identities");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("spec.identitySecretRef"),
        "{body}"
    );
    assert_eq!(h.record_state(id).await["record"]["state"], "held");
    assert_eq!(refused(&h, "no_identities").await, 1.0);
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_answer() {
    let h = start(2).await;
    assert_eq!(
        h.http.get(h.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        h.http.get(h.url("/readyz")).send().await.unwrap().status(),
        200
    );
    h.worker
        .intake
        .accept((0..5).map(good_record).collect())
        .await
        .unwrap();
    h.wait_for("delivered", |s| counter(s, "delivered") == 5)
        .await;
    let metrics = metrics_text(&h).await;
    for (name, value) in [
        ("meshline_records_received_total", 5.0),
        ("meshline_records_delivered_total", 5.0),
        ("meshline_queue_depth", 0.0),
    ] {
        assert_eq!(sample(&metrics, name), Some(value), "{name} in:\n{metrics}");
    }
    assert!(
        metrics.contains("meshline_delivery_duration_seconds_bucket"),
        "{metrics}"
    );
    let missing = h
        .http
        .get(h.url("/records/999999"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_port_serves_health_and_webhooks_only() {
    let h = start(2).await;
    h.worker.intake.accept(vec![good_record(1)]).await.unwrap();
    h.wait_for("delivered", |s| counter(s, "delivered") == 1)
        .await;
    for path in ["/healthz", "/readyz"] {
        let r = h.http.get(h.webhook_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} on the webhook port");
    }
    // Nothing of the operations API answers on the port an Ingress exposes, token or not.
    for path in [
        "/status",
        "/metrics",
        "/records/1",
        "/dead-letters",
        "/holds",
    ] {
        let r = h
            .http
            .get(h.webhook_url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            404,
            "{path} must not be served on the webhook port"
        );
    }
    let replay = h
        .http
        .post(h.webhook_url("/dead-letters/replay"))
        .bearer_auth(TOKEN)
        .json(&json!({"deadLetterReason": "x", "actor": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 404);
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_of_the_operations_api_needs_the_flows_token() {
    let h = start(2).await;
    h.worker.intake.accept(vec![good_record(1)]).await.unwrap();
    h.wait_for("delivered", |s| counter(s, "delivered") == 1)
        .await;
    for path in ["/status", "/records/1", "/dead-letters", "/holds"] {
        let anonymous = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path} without a token");
        assert_eq!(
            anonymous.headers()["www-authenticate"],
            "Bearer",
            "{path}: a 401 names the scheme"
        );
        let wrong = h
            .http
            .get(h.url(path))
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path} with the wrong token");
        let body: Value = wrong.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("token"),
            "{path}: {body}"
        );
        let right = h
            .http
            .get(h.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), 200, "{path} with the token");
        // The API server's service proxy keeps `Authorization` for itself; the token travels in its own header.
        let proxied = h
            .http
            .get(h.url(path))
            .header("X-Meshline-Token", TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(proxied.status(), 200, "{path} with X-Meshline-Token");
    }
    // Probes and Prometheus need no secret.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} is open");
    }
    h.worker.shutdown().await;
}

/// The lineage steps of record `id`, in order, with their details.
async fn lineage(h: &Harness, id: i64) -> Vec<(String, Value)> {
    let story: Value = h.get_json(&format!("/records/{id}")).await;
    story["lineage"]
        .as_array()
        .unwrap_or_else(|| panic!("no lineage in {story}"))
        .iter()
        .map(|e| {
            (
                e["step"].as_str().unwrap_or_default().to_string(),
                e["detail"].clone(),
            )
        })
        .collect()
}

fn with_cpu_clock(clock: Arc<ScriptedCpu>) -> CompileOptions {
    CompileOptions {
        cpu_clock: CpuClock::custom(clock),
        ..CompileOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_keeps_overrunning_its_cpu_budget_is_dead_lettered_after_three_attempts() {
    // Every evaluation burns far past the contract's 100 ms CPU budget.
    let h = start_with(2, with_cpu_clock(ScriptedCpu::burning(u64::MAX))).await;
    h.worker.intake.accept(vec![good_record(1)]).await.unwrap();
    let status = h
        .wait_for("the record dead-lettered", |s| {
            counter(s, "deadLettered") == 1
        })
        .await;
    assert_eq!(counter(&status, "retried"), 2, "{status}");
    assert_eq!(counter(&status, "delivered"), 0, "{status}");
    assert_eq!(
        h.erp.calls.load(Ordering::SeqCst),
        0,
        "nothing reached the ERP"
    );

    let list: Value = h.get_json("/dead-letters").await;
    let item = &list["items"][0];
    assert_eq!(
        item["dead_letter_reason"],
        "contract:deadline_exceeded:record (overran its CPU budget on 3 consecutive attempts)",
        "{list}"
    );
    assert_eq!(item["attempts"], 3, "{item}");
    let id = item["id"].as_i64().unwrap();
    let steps = lineage(&h, id).await;
    let retries: Vec<&Value> = steps
        .iter()
        .filter(|(step, _)| step == "retry_scheduled")
        .map(|(_, detail)| detail)
        .collect();
    assert_eq!(retries.len(), 2, "{steps:?}");
    for (n, detail) in retries.iter().enumerate() {
        let error = detail["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("contract deadline overrun {} of 3", n + 1)),
            "{error}"
        );
        assert_eq!(detail["class"], "transient");
    }
    assert_eq!(steps.last().unwrap().0, "dead_lettered", "{steps:?}");
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_overran_its_cpu_budget_once_is_retried_and_delivered() {
    // The first evaluation's two clock readings (its start and its check before the mapping) burn two
    // seconds; the clock then stands still, as if the first attempt had hit a cold cache.
    let h = start_with(2, with_cpu_clock(ScriptedCpu::burning(2))).await;
    h.worker.intake.accept(vec![good_record(1)]).await.unwrap();
    let status = h
        .wait_for("the record delivered", |s| counter(s, "delivered") == 1)
        .await;
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");
    assert_eq!(counter(&status, "retried"), 1, "{status}");
    assert_eq!(h.erp.calls.load(Ordering::SeqCst), 1);
    assert!(
        h.erp
            .orders
            .lock()
            .unwrap()
            .contains_key("SF-0065g0000000000001")
    );
    let delivered = h
        .worker
        .pipeline
        .ledger
        .list(RecordState::Delivered, None, None, 10)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1);
    let id = delivered[0].id.0;
    let steps = lineage(&h, id).await;
    let retry = steps
        .iter()
        .find(|(step, _)| step == "retry_scheduled")
        .unwrap_or_else(|| panic!("no retry in {steps:?}"));
    assert!(
        retry.1["error"]
            .as_str()
            .unwrap()
            .starts_with("contract deadline overrun 1 of 3"),
        "{retry:?}"
    );
    h.worker.shutdown().await;
}

/// The canary controller's two routes: a revision's measures over a window, and the release of a gone
/// track's leases. Both need the flow's token; bad parameters are refused naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_measures_and_lease_release_answer_the_controller() {
    let h = start(2).await;
    // The worker names its revision once it knows it; until then this test gives the handle one.
    let ledger = h.worker.pipeline.ledger.clone();
    let revision = match ledger.revision() {
        Some(r) => r.to_string(),
        None => {
            ledger.attribute_to("v-test").unwrap();
            "v-test".to_string()
        }
    };
    h.worker
        .intake
        .accept((0..5).map(good_record).collect())
        .await
        .unwrap();
    h.wait_for("delivered", |s| counter(s, "delivered") == 5)
        .await;

    let get = |path: String, token: Option<&'static str>| {
        let mut req = h.http.get(h.url(&path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap() }
    };
    let path = format!("/rollout/measures?revision={revision}&since=0");
    assert_eq!(get(path.clone(), None).await.status(), 401);
    let answer = get(path, Some(TOKEN)).await;
    assert_eq!(answer.status(), 200);
    let measures: meshline::api::TrackMeasures = answer.json().await.unwrap();
    assert_eq!(
        (measures.records, measures.delivered),
        (5, 5),
        "{measures:?}"
    );
    assert_eq!(
        (
            measures.failure_rate.as_str(),
            measures.dead_letter_rate.as_str()
        ),
        ("0", "0")
    );
    assert!(measures.p99_ms.is_some(), "{measures:?}");
    let other: meshline::api::TrackMeasures = get(
        "/rollout/measures?revision=v-other&since=0".into(),
        Some(TOKEN),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!((other.records, other.p99_ms), (0, None));

    for (query, names) in [
        ("since=0", "revision"),
        ("revision=v1", "since"),
        ("revision=v1&since=yesterday", "since"),
        ("revision=v1&since=0&until=soon", "until"),
        ("revision=v1&since=2000&until=1000", "until"),
    ] {
        let refused = get(format!("/rollout/measures?{query}"), Some(TOKEN)).await;
        assert_eq!(refused.status(), 400, "{query}");
        let body: Value = refused.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().starts_with(names),
            "{query}: {body}"
        );
    }

    let release = |query: &'static str, token: Option<&'static str>| {
        let mut req = h.http.post(h.url(&format!("/rollout/release{query}")));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap() }
    };
    assert_eq!(
        release("?ownerPrefix=meshline-f-canary-", None)
            .await
            .status(),
        401
    );
    for query in ["", "?ownerPrefix="] {
        let refused = release(query, Some(TOKEN)).await;
        assert_eq!(refused.status(), 400, "{query:?}");
        let body: Value = refused.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().starts_with("ownerPrefix"),
            "{body}"
        );
    }
    let released = release("?ownerPrefix=meshline-f-canary-", Some(TOKEN)).await;
    assert_eq!(released.status(), 200);
    assert_eq!(
        released.json::<Value>().await.unwrap(),
        json!({"released": 0}),
        "every record was delivered: no lease is left to give back"
    );
    h.worker.shutdown().await;
}
