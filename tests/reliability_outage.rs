//! Outage: the ERP is down (503), then so slow that requests time out, then throttles with 429 and
//! `Retry-After`, then recovers. The worker runs in-process with its real connectors (signed webhook in,
//! `http` sink out over real HTTP) and a short lease, so its delivery timeout (half the lease) fires within
//! the test. Every record arrives in the end; none is dead-lettered for a transient cause; throttled records
//! wait at least as long as the ERP asked.

#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshline::worker::run::{RunOptions, start_flow};
use meshline::worker::{PipelineOptions, WorkerSettings};
use reliability::*;
use serde_json::Value;

/// `/status` on the operations port at `url`.
async fn status(url: &str) -> Value {
    client()
        .get(format!("{url}/status"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("/status answers")
        .json()
        .await
        .expect("/status is JSON")
}

/// How long a wait may last before the test gives up: only so a broken build cannot hang, never a
/// performance bound (a loaded machine may be slow).
const GIVE_UP: Duration = Duration::from_secs(120);

/// Waits until `done` holds (checked every 20 ms), failing after `timeout` with `what` and the status.
async fn until(url: &str, what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; /status: {}",
            status(url).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_outage_of_errors_timeouts_and_throttling_delays_but_loses_nothing() {
    let started = Instant::now();
    let erp = Erp::start(ERP_TOKEN).await;
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Embedded, 4);
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: files.state_dir("outage"),
        secrets_dir: Some(files.secrets_dir()),
        token_file: Some(files.token_file()),
        options: PipelineOptions {
            worker_id: "outage".into(),
            // The delivery timeout is half the lease: 1 s, so a slow ERP times requests out quickly.
            lease: Duration::from_secs(2),
            idle_poll: Duration::from_millis(10),
            ..PipelineOptions::default()
        },
    };
    let worker = start_flow(
        &files.rendered,
        &settings,
        &RunOptions {
            lookups_dir: Some(files.lookups_dir()),
        },
    )
    .await
    .expect("the worker starts");
    // `url` is the operations port (status); the CRM posts to the webhook port.
    let url = format!("http://{}", worker.ops_addr);
    let _evidence = EvidenceOnFailure::new(vec![url.clone()]);
    let urls = vec![format!("http://{}", worker.webhook_addr)];
    let http = client();
    let mut crm = CrmStats::default();

    // 1. Maintenance: every write and every probe answers 503.
    erp.set_mode(ErpMode::Unavailable);
    let first: Vec<Value> = (0..100).map(|n| opportunity(n, 1)).collect();
    deliver_batch(&http, &urls, &first, &mut crm, GIVE_UP).await;
    until(&url, "a streak of 503s", GIVE_UP, || {
        erp.answers().get(&503).copied().unwrap_or(0) >= 20
    })
    .await;
    // The maintenance lasts until the worker has stopped writing and holds the records behind its breaker.
    let deadline = Instant::now() + GIVE_UP;
    while !status(&url).await["circuitBreaker"].is_object() {
        assert!(Instant::now() < deadline, "the breaker never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 2. Back, but writes hang for 3 s: the worker gives up after 1 s and retries later. Records keep coming.
    erp.set_mode(ErpMode::Slow(Duration::from_secs(3)));
    let second: Vec<Value> = (100..200).map(|n| opportunity(n, 1)).collect();
    deliver_batch(&http, &urls, &second, &mut crm, GIVE_UP).await;
    until(&url, "timed-out deliveries", GIVE_UP, || {
        erp.state.slowed.load(Ordering::SeqCst) >= 8
    })
    .await;

    // 3. Throttling: 429 with Retry-After: 1.
    erp.set_mode(ErpMode::Throttling {
        retry_after_secs: 1,
    });
    let throttled_before = erp.answers().get(&429).copied().unwrap_or(0);
    until(&url, "429 answers", GIVE_UP, || {
        erp.answers().get(&429).copied().unwrap_or(0) >= throttled_before + 8
    })
    .await;
    // Throttling lasts until a throttled record has come back after its Retry-After, so the check below
    // (no record returns sooner) has returns to look at.
    until(&url, "a throttled record's return", GIVE_UP, || {
        erp.waits_after_throttling()
            .iter()
            .any(|(_, wait)| wait.is_some())
    })
    .await;

    // 4. Recovery.
    erp.set_mode(ErpMode::Ok);
    let deadline = Instant::now() + GIVE_UP;
    let status = loop {
        let s = status(&url).await;
        if counter(&s, "delivered") == 200 && s["pending"].as_u64() == Some(0) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered {GIVE_UP:?} after recovery: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let orders = erp.orders();
    assert_eq!(orders.len(), 200, "every record reached the ERP");
    for n in 0..200 {
        assert_eq!(orders[&external_id(n)]["memo"], order_memo(n, 1).as_str());
    }
    assert_eq!(
        counter(&status, "deadLettered"),
        0,
        "no record was dead-lettered for a transient cause: {status}"
    );
    assert!(
        counter(&status, "retried") > 0 && counter(&status, "failed") > 0,
        "the failures were seen and retried: {status}"
    );
    assert!(
        status["mttrSeconds"].is_number(),
        "MTTR is measured: {status}"
    );
    assert!(
        status["circuitBreaker"].is_null(),
        "the breaker closed by itself: {status}"
    );
    assert_eq!(erp.violations(), Vec::<String>::new());

    let answers = erp.answers();
    assert!(answers.get(&503).copied().unwrap_or(0) >= 20, "{answers:?}");
    assert!(answers.get(&429).copied().unwrap_or(0) >= 8, "{answers:?}");
    let slowed = erp.state.slowed.load(Ordering::SeqCst);
    assert!(slowed >= 8, "deliveries met the slow ERP: {slowed}");
    // The ERP said "not before 1 s": no record came back sooner (1 ms slack for the clocks' rounding).
    let early: Vec<_> = erp
        .waits_after_throttling()
        .into_iter()
        .filter(|(_, wait)| wait.is_some_and(|w| w < Duration::from_millis(999)))
        .collect();
    assert!(early.is_empty(), "Retry-After was not honoured: {early:?}");

    worker.shutdown().await;
    eprintln!(
        "outage: ERP answers {answers:?}, {slowed} writes met the slow ERP, status counters {}, total {:.1?}",
        status["counters"],
        started.elapsed()
    );
}
