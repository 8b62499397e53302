//! Graceful shutdown: the real `meshline worker` binary gets SIGTERM (as Kubernetes sends it) while a slow ERP
//! holds deliveries in flight and more records wait in its claims. Every record it held is then either
//! completed (the in-flight deliveries finish within the grace period and are recorded) or released back to
//! the queue, so none waits for a lease to expire; after a restart every record reaches the ERP exactly
//! once and none is delivered twice.

#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshline::ledger::{self, LedgerTarget, RecordState, SystemClock};
use reliability::*;
use serde_json::Value;

const RECORDS: usize = 400;
const GIVE_UP: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_or_releases_what_the_worker_holds_and_a_restart_delivers_each_once() {
    let erp = Erp::start(ERP_TOKEN).await;
    // Slow enough that deliveries are in flight when the signal comes, quick enough to finish within the
    // worker's 5 s grace period.
    erp.set_latency(Duration::from_millis(400));
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Embedded, 8);
    let mut worker = WorkerProcess::new(&files, "sigterm");
    worker.start().await;
    let _evidence = EvidenceOnFailure::new(vec![worker.ops_url()]);

    let urls = vec![worker.url()];
    let http = client();
    let mut crm = CrmStats::default();
    let records: Vec<Value> = (0..RECORDS).map(|n| opportunity(n, 1)).collect();
    for batch in records.chunks(50) {
        deliver_batch(&http, &urls, batch, &mut crm, GIVE_UP).await;
    }

    // Wait for the state that matters: deliveries at the ERP right now, with most records still to go.
    let give_up = Instant::now() + GIVE_UP;
    while erp.state.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < give_up, "no delivery ever reached the ERP");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stored_before = erp.stored_puts().len();
    assert!(
        stored_before < RECORDS,
        "records are still waiting when the signal comes ({stored_before} stored)"
    );
    worker.terminate().await;
    let stored_at_exit = erp.stored_puts();

    // With the worker gone, the ledger itself shows nothing was left to its lease: every record is delivered
    // or back in the queue, and every record the ERP stored is recorded as delivered.
    let target = LedgerTarget::Sqlite(files.state_dir("sigterm").join("ledger.db"));
    let flow = files.rendered.flow_name();
    let ledger = ledger::open(&target, &flow, Arc::new(SystemClock))
        .await
        .expect("the ledger opens after the shutdown");
    let delivering = ledger
        .list(RecordState::Delivering, None, None, RECORDS)
        .await
        .unwrap();
    assert!(
        delivering.is_empty(),
        "{} records were left under a lease: {:?}",
        delivering.len(),
        delivering
            .iter()
            .map(|r| (&r.source_key, &r.lease_owner))
            .take(5)
            .collect::<Vec<_>>()
    );
    let delivered = ledger
        .list(RecordState::Delivered, None, None, RECORDS)
        .await
        .unwrap();
    assert_eq!(
        delivered.len(),
        stored_at_exit.len(),
        "every delivery the ERP stored before the exit was recorded"
    );
    let counts = ledger.counts().await.unwrap();
    assert_eq!(counts.received as usize, RECORDS, "{counts:?}");
    assert!(
        counts.pending > 0,
        "some records were released, not delivered: {counts:?}"
    );
    ledger.close().await;
    drop(ledger);

    worker.start().await;
    let status = worker
        .wait_for("every record delivered after the restart", GIVE_UP, |s| {
            counter(s, "delivered") == RECORDS as i64 && s["pending"] == 0
        })
        .await;
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");
    let puts = erp.stored_puts();
    assert_eq!(puts.len(), RECORDS, "every record reached the ERP");
    let twice: Vec<_> = puts.iter().filter(|(_, c)| **c != 1).take(10).collect();
    assert!(twice.is_empty(), "no record was delivered twice: {twice:?}");
    assert_eq!(
        erp.state.calls.load(Ordering::SeqCst),
        RECORDS,
        "no delivery was even attempted twice"
    );
    assert_eq!(erp.violations(), Vec::<String>::new());
    eprintln!(
        "sigterm: {stored_before} stored when the signal came, {} at exit, {} released and delivered after the restart",
        stored_at_exit.len(),
        RECORDS - stored_at_exit.len()
    );
}
