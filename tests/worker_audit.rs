//! The reconciliation audit through a real worker's operations API (in-process worker, real HTTP): `POST
//! /audit/runs` starts a run that the worker drives over its injected read clients, `GET /audit/runs/{id}`
//! follows it to its result, unexplained differences open the flow's `audit_mismatch` ticket, `/status`
//! carries the last audit and `/metrics` its stable series; and `meshline audit FLOW` (the binary) does the
//! same from outside and exits 1 on unexplained differences.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::LedgerSpec;
use meshline::audit::run::{AuditQueries, AuditSettings};
use meshline::connectors::queries::{AuditWindow, AuditedOrder, OrderPage, OrderQuery, QueryError};
use meshline::connectors::{Delivered, Delivery, Sink, SinkError};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

const TOKEN: &str = "flow-token-for-the-audit-test";

struct NoErp;

#[async_trait]
impl Sink for NoErp {
    fn system(&self) -> &'static str {
        "double"
    }
    async fn deliver(&self, _: Delivery<'_>) -> Result<Delivered, SinkError> {
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

/// One side in memory, one order a page.
struct Side(&'static str, Vec<AuditedOrder>);

#[async_trait]
impl OrderQuery for Side {
    fn system(&self) -> &'static str {
        self.0
    }
    async fn page(&self, _: &AuditWindow, cursor: Option<&str>) -> Result<OrderPage, QueryError> {
        let at: usize = cursor.map_or(0, |c| c.parse().unwrap());
        Ok(OrderPage {
            orders: self.1.get(at).cloned().into_iter().collect(),
            next: (at + 1 < self.1.len()).then(|| (at + 1).to_string()),
        })
    }
}

fn order(id: &str, amount: i64) -> AuditedOrder {
    AuditedOrder {
        external_id: id.into(),
        currency: "USD".into(),
        amount: amount.into(),
    }
}

struct Harness {
    worker: Worker,
    state: tempfile::TempDir,
    client: reqwest::Client,
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker.ops_addr)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

async fn start() -> Harness {
    let mut rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.replicas = None;
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: None,
        token_file: Some(token_file),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            audit_queries: Some(AuditQueries {
                crm: Arc::new(Side(
                    "salesforce",
                    vec![order("006A", 100), order("006B", 250), order("006C", 75)],
                )),
                erp: Arc::new(Side(
                    "netsuite",
                    vec![order("006A", 100), order("006B", 250)],
                )),
            }),
            audit_settings: Some(AuditSettings {
                min_interval: Duration::ZERO,
                backoff: Duration::from_millis(1),
                ..AuditSettings::new("ignored")
            }),
            ..PipelineOptions::default()
        },
    };
    let lookups: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/contract/lookups.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let worker = Worker::start(&rendered, &settings, Arc::new(NoErp), lookups, |_| {
        axum::Router::new()
    })
    .await
    .unwrap();
    Harness {
        worker,
        state,
        client: reqwest::Client::new(),
    }
}

/// Follows a run until it is finished. The give-up only keeps a broken build from hanging.
async fn wait_finished(h: &Harness, id: i64) -> Value {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (code, run) = h.get(&format!("/audit/runs/{id}")).await;
        assert_eq!(code, 200, "{run}");
        if run["state"] == "finished" {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "run {id} never finished: {run}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_started_over_the_api_finishes_opens_a_ticket_and_shows_in_status_and_metrics() {
    let h = start().await;
    let flow = h.worker.pipeline.flow.clone();

    let refused = h.client.post(h.url("/audit/runs")).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401, "the flow's token is needed");
    let bad = h
        .client
        .post(h.url("/audit/runs"))
        .bearer_auth(TOKEN)
        .body(r#"{"windowHours": 0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let why: Value = bad.json().await.unwrap();
    assert!(
        why["error"].as_str().unwrap().contains("windowHours"),
        "{why}"
    );

    let started = h
        .client
        .post(h.url("/audit/runs"))
        .bearer_auth(TOKEN)
        .json(&json!({"windowHours": 24}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status().as_u16(), 202);
    let id = started.json::<Value>().await.unwrap()["run"]
        .as_i64()
        .unwrap();
    let run = wait_finished(&h, id).await;
    let result = &run["result"];
    assert_eq!(result["outcome"], "unexplained", "{run}");
    assert_eq!(result["crm"]["count"], 3);
    assert_eq!(result["crm"]["totals"]["USD"], "425");
    assert_eq!(result["erp"]["totals"]["USD"], "350");
    assert_eq!(result["matched"], 2);
    assert_eq!(result["unexplainedIds"], json!(["006C"]));
    assert_eq!(
        (run["crm"]["pages"].as_i64(), run["crm"]["done"].as_bool()),
        (Some(3), Some(true))
    );
    let fingerprint = result["ticket"].as_str().expect("a ticket").to_string();
    let ticket = h
        .worker
        .pipeline
        .ledger
        .ticket(&fingerprint)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ticket.kind, meshline::tickets::ExceptionKind::AuditMismatch);
    assert!(ticket.summary.contains("006C"), "{}", ticket.summary);

    let (_, status) = h.get("/status").await;
    assert_eq!(status["audit"]["run"], id, "{status}");
    assert_eq!(status["audit"]["unexplained"], 1);
    let (_, last) = h.get("/audit/last").await;
    assert_eq!(last["run"], id);
    let metrics = h
        .client
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        format!(
            "meshline_audit_unexplained_differences{{namespace=\"revenue-sync\",flow=\"{flow}\"}} 1"
        ),
        format!(
            "meshline_audit_orders{{namespace=\"revenue-sync\",flow=\"{flow}\",side=\"crm\"}} 3"
        ),
        format!("meshline_audit_partial{{namespace=\"revenue-sync\",flow=\"{flow}\"}} 0"),
        format!(
            "meshline_audit_explained_differences{{namespace=\"revenue-sync\",flow=\"{flow}\",explanation=\"inFlight\"}} 0"
        ),
    ] {
        assert!(metrics.contains(&series), "missing {series} in:\n{metrics}");
    }
    assert!(metrics.contains("meshline_audit_last_run_timestamp_seconds{"));
    assert!(metrics.contains("meshline_audit_duration_seconds{"));

    // The CronJob's command: joins or starts a run, waits, prints, exits 1 on unexplained differences.
    let token_file = h.state.path().join("token");
    let url = format!("http://{}", h.worker.ops_addr);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshline"))
            .args([
                "audit",
                &flow,
                "--url",
                &url,
                "--poll-interval",
                "20ms",
                "--token-file",
            ])
            .arg(&token_file)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("unexplained: 1") && stdout.contains("unexplained ids: 006C"),
        "{stdout}"
    );
    assert!(stdout.contains("CRM deals: 3 (USD 425)"), "{stdout}");
    let (_, later) = h.get("/audit/last").await;
    assert!(
        later["run"].as_i64().unwrap() > id,
        "the command ran a new audit"
    );
}
