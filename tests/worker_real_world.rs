//! The worker under the conditions of a real cluster: ERPs that quote personal data in their errors, and a
//! ledger volume that fills up. In one process, with sink doubles and an injectable free-space probe.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, LedgerSpec};
use meshline::connectors::sources::webhook;
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::ledger::{RecordId, RecordState};
use meshline::worker::disk::{FreeSpace, Space};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

/// Give-up bound of every wait: only there so a broken build fails instead of hanging.
const GIVE_UP: Duration = Duration::from_secs(120);

const EMAIL_RETRY: &str = "grace.hopper@navy.example";
const PHONE_RETRY: &str = "+1 202 555 0143";
const EMAIL_REFUSED: &str = "ada.lovelace@engine.example";
const PHONE_REFUSED: &str = "+44 20 7946 0018";

/// An ERP that quotes the customer's e-mail and phone number in its errors, as NetSuite's `o:errorDetails`
/// and Odoo's validation messages do: a 503 for one record until released, a 400 for another.
#[derive(Default)]
struct QuotingErp {
    orders: Mutex<HashMap<String, Value>>,
    /// External id answered 503 while `unavailable` holds.
    retry_id: Mutex<String>,
    unavailable: AtomicBool,
    /// External id always refused with a 400.
    refused_id: Mutex<String>,
    /// The phone number of each external id (the ERP found it on the customer it matched).
    phones: Mutex<HashMap<String, String>>,
}

#[async_trait]
impl Sink for QuotingErp {
    fn system(&self) -> &'static str {
        "netsuite"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        let email = d.payload["email"].as_str().unwrap_or_default().to_string();
        let phone = self
            .phones
            .lock()
            .unwrap()
            .get(d.external_id)
            .cloned()
            .unwrap_or_default();
        if *self.retry_id.lock().unwrap() == d.external_id
            && self.unavailable.load(Ordering::SeqCst)
        {
            let body = json!({"title": "Service Unavailable", "o:errorDetails": [{
                "detail": format!("Customer {email} (phone {phone}) is locked by another request."),
                "o:errorCode": "RECORD_LOCKED"}]});
            return Err(SinkError::from_status(
                "netsuite",
                503,
                None,
                &body.to_string(),
            ));
        }
        if *self.refused_id.lock().unwrap() == d.external_id {
            let body = json!({"title": "Bad Request", "o:errorDetails": [{
                "detail": format!("Invalid value {email} for field email: a customer with phone {phone} already uses it."),
                "o:errorPath": "email", "o:errorCode": "INVALID_CONTENT"}]});
            return Err(SinkError::from_status(
                "netsuite",
                400,
                None,
                &body.to_string(),
            ));
        }
        self.orders
            .lock()
            .unwrap()
            .insert(d.external_id.to_string(), d.payload.clone());
        Ok(Delivered {
            erp_id: None,
            created: Some(true),
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

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/contract")
            .join(name),
    )
    .unwrap()
}

fn record(i: usize, email: &str, phone: &str) -> SourceRecord {
    let mut v: Value = serde_json::from_str(&data("good_record.json")).unwrap();
    let id = format!("0065g{:013}", i);
    v["id"] = json!(id);
    v["customerEmail"] = json!(email);
    v["customerPhone"] = json!(phone);
    SourceRecord {
        key: id,
        payload: v,
        correlation_id: None,
    }
}

fn external_id(i: usize) -> String {
    format!("SF-0065g{:013}", i)
}

/// Everything the worker logs, captured for the test to search.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn install() -> LogBuffer {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buffer
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Harness {
    worker: Worker,
    http: reqwest::Client,
    _state: tempfile::TempDir,
}

async fn start(sink: Arc<dyn Sink>, options: PipelineOptions) -> Harness {
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.replicas = None;
    rendered.flow.spec.delivery.concurrency = 4;
    rendered.flow.spec.delivery.max_attempts = 1_000;
    rendered.flow.spec.delivery.backoff = Some(Backoff {
        base: Some("20ms".parse().unwrap()),
        max: Some("200ms".parse().unwrap()),
    });
    let state = tempfile::tempdir().unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: None,
        token_file: Some(api_token_file(&state)),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            ..options
        },
    };
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let worker = Worker::start(&rendered, &settings, sink, lookups, |_| axum::Router::new())
        .await
        .unwrap();
    Harness {
        worker,
        http: reqwest::Client::new(),
        _state: state,
    }
}

/// The operations API's token, which every read of it needs.
const API_TOKEN: &str = "real-world-token";

fn api_token_file(state: &tempfile::TempDir) -> std::path::PathBuf {
    let path = state.path().join("api-token");
    std::fs::write(&path, API_TOKEN).unwrap();
    path
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

    async fn text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.text(path).await).unwrap()
    }

    /// The ledger's row of the record with `key`, polled until `done` holds.
    async fn wait_for_record(
        &self,
        key: &str,
        what: &str,
        done: impl Fn(&meshline::ledger::RecordView) -> bool,
    ) -> meshline::ledger::RecordDetail {
        let give_up = tokio::time::Instant::now() + GIVE_UP;
        loop {
            let mut last = None;
            for id in 1..=20 {
                if let Some(detail) = self.worker.pipeline.ledger.get(RecordId(id)).await.unwrap()
                    && detail.record.source_key == key
                {
                    if done(&detail.record) {
                        return detail;
                    }
                    last = Some(detail.record);
                }
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "gave up waiting for {what} of {key}: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The parts of a ledger row that the worker wrote about it (the payload itself is the CRM's record,
/// stored as sent, and redacted on the way out by `/records`).
fn written_by_the_worker(detail: &meshline::ledger::RecordDetail) -> String {
    let mut v = serde_json::to_value(detail).unwrap();
    v["record"]["payload"] = Value::Null;
    v.to_string()
}

fn assert_no_pii(place: &str, text: &str) {
    for value in [EMAIL_RETRY, PHONE_RETRY, EMAIL_REFUSED, PHONE_REFUSED] {
        assert!(
            !text.contains(value),
            "{place} contains the personal value {value:?}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erp_errors_quoting_personal_data_are_stored_and_served_redacted() {
    let logs = LogBuffer::install();
    let erp = Arc::new(QuotingErp::default());
    *erp.retry_id.lock().unwrap() = external_id(1);
    *erp.refused_id.lock().unwrap() = external_id(2);
    erp.unavailable.store(true, Ordering::SeqCst);
    erp.phones
        .lock()
        .unwrap()
        .insert(external_id(1), PHONE_RETRY.into());
    erp.phones
        .lock()
        .unwrap()
        .insert(external_id(2), PHONE_REFUSED.into());
    let h = start(erp.clone(), PipelineOptions::default()).await;
    let retried = record(1, EMAIL_RETRY, PHONE_RETRY);
    let refused = record(2, EMAIL_REFUSED, PHONE_REFUSED);
    h.worker
        .intake
        .accept(vec![retried.clone(), refused.clone()])
        .await
        .unwrap();

    // The 503: the retry's last error says what the ERP said, without the customer's data.
    let waiting = h
        .wait_for_record(&retried.key, "a retry with its last error", |r| {
            r.state == RecordState::RetryScheduled && r.last_error.is_some()
        })
        .await;
    let last_error = waiting.record.last_error.clone().unwrap();
    assert!(
        last_error.contains("RECORD_LOCKED") && last_error.contains("[REDACTED]"),
        "the ERP's answer stays readable: {last_error}"
    );
    assert_no_pii("the retry's ledger row", &written_by_the_worker(&waiting));
    assert_no_pii(
        "/records of the retry",
        &h.text(&format!("/records/{}", waiting.record.id.0)).await,
    );
    assert_no_pii("/status during the retries", &h.text("/status").await);

    // The 400: the dead letter keeps the ERP's answer, redacted.
    let dead = h
        .wait_for_record(&refused.key, "the dead letter", |r| {
            r.state == RecordState::DeadLettered
        })
        .await;
    let answer = dead.record.erp_response.clone().unwrap();
    assert!(
        answer.contains("INVALID_CONTENT") && answer.contains("[REDACTED]"),
        "the dead letter keeps the ERP's answer: {answer}"
    );
    assert_eq!(dead.record.dead_letter_reason.as_deref(), Some("erp:400"));
    assert_no_pii(
        "the dead letter's ledger row",
        &written_by_the_worker(&dead),
    );
    assert_no_pii(
        "/records of the dead letter",
        &h.text(&format!("/records/{}", dead.record.id.0)).await,
    );
    let listed = h.json("/dead-letters").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    assert_no_pii("/dead-letters", &listed.to_string());

    // The ERP comes back: the retried record is delivered, with the real e-mail (only the stored texts
    // are redacted, never the delivery).
    erp.unavailable.store(false, Ordering::SeqCst);
    let delivered = h
        .wait_for_record(&retried.key, "the delivery", |r| {
            r.state == RecordState::Delivered
        })
        .await;
    assert_eq!(
        erp.orders.lock().unwrap()[&external_id(1)]["email"],
        EMAIL_RETRY
    );
    assert_no_pii(
        "the delivered record's ledger row",
        &written_by_the_worker(&delivered),
    );
    assert_no_pii("/metrics", &h.text("/metrics").await);
    assert_no_pii("/status", &h.text("/status").await);
    h.worker.shutdown().await;
    let logs = logs.text();
    assert!(
        logs.contains("worker started"),
        "the logs are captured: {logs}"
    );
    assert_no_pii("the worker's logs", &logs);
}

/// The ledger volume's free space, as the test sets it.
#[derive(Debug)]
struct VolumeDouble {
    available: AtomicU64,
    reads: AtomicU64,
}

const GIB: u64 = 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

impl FreeSpace for VolumeDouble {
    fn space(&self) -> std::io::Result<Space> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(Space {
            available: self.available.load(Ordering::SeqCst),
            total: GIB,
        })
    }
}

/// An ERP that holds every delivery until the test opens it, so records are in flight while the volume fills.
struct GatedErp {
    open: tokio::sync::Semaphore,
    orders: Mutex<HashMap<String, Value>>,
}

#[async_trait]
impl Sink for GatedErp {
    fn system(&self) -> &'static str {
        "http"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        drop(self.open.acquire().await.unwrap());
        self.orders
            .lock()
            .unwrap()
            .insert(d.external_id.to_string(), d.payload.clone());
        Ok(Delivered {
            erp_id: None,
            created: Some(true),
            status: 200,
        })
    }
    async fn probe(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn fetch_lookup(&self, _: &str, _: &str) -> Result<Vec<Value>, SinkError> {
        Ok(Vec::new())
    }
}

const WEBHOOK_SECRET: &str = "whsec-disk-test";

async fn send_webhook(h: &Harness, i: usize) -> reqwest::Response {
    let body = serde_json::to_vec(&record(i, EMAIL_RETRY, PHONE_RETRY).payload).unwrap();
    let t = chrono::Utc::now().timestamp();
    h.http
        .post(h.webhook_url("/webhook"))
        .header(
            "x-meshline-signature",
            webhook::meshline_signature(WEBHOOK_SECRET, t, &body),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn disk_problem(status: &Value) -> Option<Value> {
    status["problems"]
        .as_array()?
        .iter()
        .find(|p| p["kind"] == "DiskPressure")
        .cloned()
}

/// The value of the series `name`, whatever its labels (every worker series carries the flow's labels).
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_volume_refuses_intake_but_still_records_deliveries() {
    let volume = Arc::new(VolumeDouble {
        available: AtomicU64::new(600 * MIB),
        reads: AtomicU64::new(0),
    });
    let erp = Arc::new(GatedErp {
        open: tokio::sync::Semaphore::new(0),
        orders: Mutex::default(),
    });
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.delivery.concurrency = 8;
    let state = tempfile::tempdir().unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: None,
        token_file: Some(api_token_file(&state)),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            free_space: Some(volume.clone()),
            ..PipelineOptions::default()
        },
    };
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let webhook_config = webhook::WebhookConfig {
        flow: "disk".into(),
        path: "/webhook".into(),
        verifier: webhook::Verifier::HmacSha256 {
            secret: WEBHOOK_SECRET.into(),
        },
        field_map: Default::default(),
        key_pointer: "/id".into(),
        body_limit: 1 << 20,
        tolerance: Duration::from_secs(300),
        public_url: None,
    };
    let worker = Worker::start(&rendered, &settings, erp.clone(), lookups, move |intake| {
        webhook::router(webhook_config, intake as Arc<dyn Intake>)
    })
    .await
    .unwrap();
    let h = Harness {
        worker,
        http: reqwest::Client::new(),
        _state: state,
    };

    // Room to spare: five records are accepted and go to the ERP, which holds them.
    for i in 1..=5 {
        assert_eq!(send_webhook(&h, i).await.status(), 200);
    }
    assert!(disk_problem(&h.json("/status").await).is_none());

    // The volume drops below the reserve (64 MiB of 1 GiB): the next webhook is refused, nothing stored.
    volume.available.store(10 * MIB, Ordering::SeqCst);
    let give_up = tokio::time::Instant::now() + GIVE_UP;
    let refused = loop {
        let response = send_webhook(&h, 6).await;
        if response.status() == 503 {
            break response;
        }
        assert_eq!(response.status(), 200, "only 503 or 200");
        // Stored before the cached reading went stale; the pressure check comes before the duplicate
        // check, so the next attempt is refused all the same.
        assert!(
            tokio::time::Instant::now() < give_up,
            "intake never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused.headers().get("retry-after").is_some(),
        "a refusal tells the CRM when to retry"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "intake_paused", "{body}");
    let direct = h
        .worker
        .intake
        .accept(vec![record(8, EMAIL_RETRY, PHONE_RETRY)])
        .await;
    assert!(direct.is_err(), "the intake itself refuses under pressure");
    assert!(h.worker.intake.backpressure().is_some());
    let status = h.json("/status").await;
    let problem = disk_problem(&status).unwrap_or_else(|| panic!("no DiskPressure in {status}"));
    assert!(
        problem["message"].as_str().unwrap().contains("reserve") && problem["since"].is_string(),
        "{problem}"
    );
    let metrics = h.text("/metrics").await;
    assert_eq!(
        gauge(&metrics, "meshline_disk_pressure"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        gauge(&metrics, "meshline_ledger_volume_free_bytes"),
        Some((10 * MIB) as f64)
    );
    let received_under_pressure = status["counters"]["received"].as_i64().unwrap();

    // Completions still fit: the ERP answers and every accepted record is recorded as delivered.
    erp.open.add_permits(1_000);
    let give_up = tokio::time::Instant::now() + GIVE_UP;
    loop {
        let status = h.json("/status").await;
        if status["counters"]["delivered"].as_i64() == Some(received_under_pressure) {
            assert!(disk_problem(&status).is_some(), "still under pressure");
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "completions stalled: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Space is freed: intake resumes, and the refused record is stored and delivered.
    volume.available.store(500 * MIB, Ordering::SeqCst);
    let give_up = tokio::time::Instant::now() + GIVE_UP;
    loop {
        let response = send_webhook(&h, 9).await;
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 503);
        assert!(
            tokio::time::Instant::now() < give_up,
            "intake never resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let give_up = tokio::time::Instant::now() + GIVE_UP;
    loop {
        let status = h.json("/status").await;
        if status["counters"]["delivered"].as_i64() == Some(received_under_pressure + 1) {
            assert!(disk_problem(&status).is_none(), "{status}");
            assert_eq!(
                status["counters"]["received"].as_i64(),
                Some(received_under_pressure + 1)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "not delivered: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(erp.orders.lock().unwrap().contains_key(&external_id(9)));
    assert!(
        !erp.orders.lock().unwrap().contains_key(&external_id(8)),
        "a refused record is not stored"
    );
    assert_eq!(
        gauge(&h.text("/metrics").await, "meshline_disk_pressure"),
        Some(0.0)
    );
    h.worker.shutdown().await;
}
