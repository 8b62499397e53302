//! The operating model's measures on the worker's `/metrics` (issue #17) are the ledger's numbers, the same
//! ones `/status` and so `SyncFlow.status` carry, beside the contract's SLA objectives: an ERP that refuses
//! every order's first delivery makes every record a failure in the SLA's window. (Its own test binary: the
//! log capture of `worker_observability.rs` counts every delivery of its process.)

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, LedgerSpec};
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

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

/// The value of the one sample of `name` in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operating_measures_on_metrics_are_the_ledgers_numbers_and_the_contracts_sla() {
    let h = start().await;
    // Each order's first delivery fails (503) and its retry succeeds: two records, two failed, two delivered.
    h.worker
        .intake
        .accept(vec![
            opportunity("0065g00000MEASURE1", None),
            opportunity("0065g00000MEASURE2", None),
        ])
        .await
        .unwrap();
    // Waits on the ledger, not on the exposition: the delivered counter counts an ERP's answer before its
    // completion is committed, and a scrape reads the ledger's gauges before it encodes that counter, so a
    // scrape that began before the retries could show both deliveries beside the ledger of before.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let counts = h.worker.pipeline.ledger.counts().await.unwrap();
        if counts.delivered == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "never delivered both: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://{}/metrics", h.worker.ops_addr);
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let value = |name: &str| {
        sample(&text, name).unwrap_or_else(|| panic!("no sample of {name} in\n{text}"))
    };
    assert_eq!(value("meshline_records_delivered_total"), 2.0);
    assert_eq!(value("meshline_flow_records"), 2.0);
    assert_eq!(value("meshline_flow_received_sla_window"), 2.0);
    assert_eq!(value("meshline_flow_failed_sla_window"), 2.0);
    assert_eq!(value("meshline_flow_failure_rate_sla_window"), 1.0);
    assert_eq!(value("meshline_flow_manual_interventions"), 0.0);
    assert_eq!(value("meshline_flow_manual_interventions_per_1k"), 0.0);
    assert!(value("meshline_flow_record_mttr_seconds") >= 0.0);
    // The example contract's SLA: maxFailureRate "0.02", maxDeliveryLatency 15m.
    assert_eq!(value("meshline_sla_max_failure_rate"), 0.02);
    assert_eq!(value("meshline_sla_max_delivery_latency_seconds"), 900.0);
    assert_eq!(h.erp.accepted.load(Ordering::SeqCst), 2);
    h.worker.shutdown().await;
}
