//! The worker is observable like any workload: its JSON logs follow one record by its correlation id (a
//! top-level `correlation_id` on every line about a record: `debug` per record, `info` per batch), and every
//! metric series names the flow and its namespace.
//!
//! The logs are captured through the subscriber the binary installs (`cli::logging::json`), so the test
//! reads exactly the lines `kubectl logs` would show.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, LedgerSpec};
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::ledger::RecordId;
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

/// Everything the JSON subscriber wrote in this process.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = meshline::cli::logging::json(
            tracing_subscriber::EnvFilter::new("info,meshline=debug"),
            move || Capture(sink.clone()),
        );
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other subscriber in this test binary");
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured lines, each parsed as the JSON object it must be.
fn log_lines(buffer: &Mutex<Vec<u8>>) -> Vec<Value> {
    let text = String::from_utf8(buffer.lock().unwrap().clone()).expect("logs are UTF-8");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Waits until the captured logs satisfy `done`. The give-up only keeps a broken build from hanging.
async fn wait_for_logs(buffer: &Mutex<Vec<u8>>, what: &str, done: impl Fn(&[Value]) -> bool) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let lines = log_lines(buffer);
        if done(&lines) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the logs never showed {what}:\n{}",
            lines
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An ERP that refuses each order's first delivery with a 503, then accepts it.
#[derive(Default)]
struct FlakyErp {
    attempts: Mutex<HashMap<String, usize>>,
    accepted: AtomicUsize,
}

#[async_trait]
impl Sink for FlakyErp {
    fn system(&self) -> &'static str {
        "double"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(d.external_id.to_string()).or_default();
            *n += 1;
            *n
        };
        if attempt == 1 {
            return Err(SinkError::from_status("double", 503, None, "maintenance"));
        }
        self.accepted.fetch_add(1, Ordering::SeqCst);
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

fn opportunity(key: &str, correlation_id: Option<&str>) -> SourceRecord {
    let mut payload: Value = serde_json::from_str(&data("good_record.json")).unwrap();
    payload["id"] = json!(key);
    SourceRecord {
        key: key.to_string(),
        payload,
        correlation_id: correlation_id.map(str::to_string),
    }
}

struct Harness {
    worker: Worker,
    erp: Arc<FlakyErp>,
    _state: tempfile::TempDir,
}

/// The example flow (namespace `revenue-sync`) on an embedded ledger, retrying within milliseconds.
async fn start() -> Harness {
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.replicas = None;
    rendered.flow.spec.delivery.backoff = Some(Backoff {
        base: Some("10ms".parse().unwrap()),
        max: Some("20ms".parse().unwrap()),
    });
    let state = tempfile::tempdir().unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: None,
        token_file: None,
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            ..PipelineOptions::default()
        },
    };
    let erp = Arc::new(FlakyErp::default());
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let worker = Worker::start(&rendered, &settings, erp.clone(), lookups, |_| {
        axum::Router::new()
    })
    .await
    .unwrap();
    Harness {
        worker,
        erp,
        _state: state,
    }
}

/// The lines about the record with this correlation id: (message, outcome).
fn story(lines: &[Value], correlation_id: &str) -> Vec<(String, String)> {
    lines
        .iter()
        .filter(|l| l["correlation_id"] == correlation_id)
        .map(|l| {
            (
                l["message"].as_str().unwrap_or_default().to_string(),
                l["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_follow_one_record_by_its_correlation_id() {
    let logs = captured_logs();
    let h = start().await;
    // One record arrives with the CRM's trace id, the other without (the ledger gives it one).
    let traced = "4bf92f3577b34da6a3ce929d0e0e4736";
    h.worker
        .intake
        .accept(vec![
            opportunity("0065g00000TRACED01", Some(traced)),
            opportunity("0065g0000UNTRACED1", None),
        ])
        .await
        .unwrap();
    // The CRM retries its webhook for the traced record.
    let again = h
        .worker
        .intake
        .accept(vec![opportunity("0065g00000TRACED01", None)])
        .await
        .unwrap();
    assert_eq!(again.duplicates, 1);

    let mut untraced = None;
    for id in 1..=2 {
        let detail = h.worker.pipeline.ledger.get(RecordId(id)).await.unwrap();
        let record = detail.expect("both records are stored").record;
        if record.source_key == "0065g0000UNTRACED1" {
            untraced = Some(record.correlation_id);
        }
    }
    let untraced = untraced.expect("the untraced record is stored");
    assert_eq!(untraced.len(), 32, "a generated trace id: {untraced}");

    let delivered = |id: &str| {
        let id = id.to_string();
        move |lines: &[Value]| {
            story(lines, &id)
                .iter()
                .any(|(m, o)| m == "record outcome recorded" && o == "delivered")
        }
    };
    wait_for_logs(&logs, "the traced record delivered", delivered(traced)).await;
    wait_for_logs(&logs, "the untraced record delivered", delivered(&untraced)).await;
    assert_eq!(h.erp.accepted.load(Ordering::SeqCst), 2);
    let lines = log_lines(&logs);

    // `select(.correlation_id == …)` tells the traced record's whole story, in order. The retried webhook's
    // duplicate may be logged before or after the first delivery attempt, so it is checked apart.
    let traced_story = story(&lines, traced);
    let step = |m: &str, o: &str| (m.to_string(), o.to_string());
    let without_duplicate: Vec<_> = traced_story
        .iter()
        .filter(|(_, outcome)| outcome != "duplicate")
        .cloned()
        .collect();
    assert_eq!(
        without_duplicate,
        [
            step("record ingested", "received"),
            step("record outcome recorded", "retry_scheduled"),
            step("record outcome recorded", "delivered"),
        ],
        "{traced_story:?}"
    );
    let duplicate = traced_story
        .iter()
        .position(|s| *s == step("record ingested", "duplicate"))
        .expect("the retried webhook is logged with the stored record's correlation id");
    assert!(duplicate > 0, "{traced_story:?}");
    assert_eq!(
        story(&lines, &untraced),
        [
            step("record ingested", "received"),
            step("record outcome recorded", "retry_scheduled"),
            step("record outcome recorded", "delivered"),
        ]
    );

    // Per record: debug, with the flow and the record's id beside the correlation id. Every line about a
    // record (it names one) carries a correlation id.
    for line in lines.iter().filter(|l| l["correlation_id"] == traced) {
        assert_eq!(line["level"], "DEBUG", "{line}");
        assert_eq!(line["flow"], "closed-won-to-netsuite", "{line}");
        assert!(line["record"].is_string(), "{line}");
    }
    for line in lines.iter().filter(|l| !l["record"].is_null()) {
        assert!(
            line["correlation_id"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "a line about a record without its correlation id: {line}"
        );
    }
    // Per batch: info, with counts and no correlation id.
    let batches: Vec<&Value> = lines
        .iter()
        .filter(|l| l["flow"] == "closed-won-to-netsuite" && l["level"] == "INFO")
        .collect();
    let stored: u64 = batches
        .iter()
        .filter(|l| l["message"] == "records stored in the ledger")
        .map(|l| l["received"].as_u64().unwrap())
        .sum();
    assert!(stored >= 2, "{batches:?}");
    let recorded: Vec<&&Value> = batches
        .iter()
        .filter(|l| l["message"] == "outcomes recorded in the ledger")
        .collect();
    assert_eq!(
        recorded
            .iter()
            .map(|l| l["delivered"].as_u64().unwrap())
            .sum::<u64>(),
        2,
        "{recorded:?}"
    );
    assert!(batches.iter().all(|l| l["correlation_id"].is_null()));
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_series_names_the_flow_and_its_namespace() {
    let h = start().await;
    h.worker
        .intake
        .accept(vec![opportunity("0065g00000METRICS1", None)])
        .await
        .unwrap();
    let url = format!("http://{}/metrics", h.worker.ops_addr);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    let text = loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if text
            .lines()
            .any(|l| l.starts_with("meshline_records_delivered_total{") && l.ends_with(" 1"))
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "never delivered:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(samples.len() > 20, "{text}");
    for sample in samples {
        assert!(
            sample.contains(r#"namespace="revenue-sync""#)
                && sample.contains(r#"flow="closed-won-to-netsuite""#),
            "a series without the flow's labels: {sample}"
        );
    }
    // The error-class family keeps its own label beside them.
    assert!(
        text.lines()
            .any(|l| l.starts_with("meshline_records_failed_total{")
                && l.contains(r#"class="transient""#)
                && l.contains(r#"flow="closed-won-to-netsuite""#)),
        "{text}"
    );
    h.worker.shutdown().await;
}
