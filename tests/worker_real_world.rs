//! The worker under the conditions of a real cluster: ERPs that quote personal data in their errors, and a
//! ledger volume that fills up. In one process, with sink doubles and an injectable free-space probe.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, LedgerSpec};
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::ledger::{RecordId, RecordState};
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
        state_dir: state.path().join("state"),
        secrets_dir: None,
        token_file: None,
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

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker.addr)
    }

    async fn text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
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
