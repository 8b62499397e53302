//! Two replicas: two `meshline worker` processes (different worker ids and ports) run one flow on one
//! PostgreSQL ledger. The CRM's batches land on either (as behind a Service); both deliver, and with no crash
//! every record is PUT to the ERP exactly once. The flow's concurrency is the ERP account's, shared by the
//! replicas: the ERP never sees more requests at once than the flow allows.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::time::{Duration, Instant};

use reliability::*;
use serde_json::Value;

const RECORDS: usize = 3_000;
/// The flow's `delivery.concurrency`: per ERP account, however many replicas deliver.
const CONCURRENCY: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_deliver_a_record_twice() {
    let started = Instant::now();
    let pg = postgres::PgServer::start();
    let erp = Erp::start(ERP_TOKEN).await;
    erp.set_latency(Duration::from_millis(2));
    let files = FlowFiles::new(
        &erp.base_url(),
        LedgerChoice::Postgres(pg.create_database("replicas")),
        CONCURRENCY,
    );
    let mut a = WorkerProcess::new(&files, "replica-a");
    let mut b = WorkerProcess::new(&files, "replica-b");
    a.start().await;
    b.start().await;
    let _evidence = EvidenceOnFailure::new(vec![a.ops_url(), b.ops_url()]);

    let urls = vec![a.url(), b.url()];
    let http = client();
    let mut crm = CrmStats::default();
    let batches: Vec<Vec<Value>> = (0..RECORDS)
        .map(|n| opportunity(n, 1))
        .collect::<Vec<_>>()
        .chunks(50)
        .map(<[Value]>::to_vec)
        .collect();
    // Batches alternate between the replicas, so both ingest and both claim.
    for batch in &batches {
        deliver_batch(&http, &urls, batch, &mut crm, Duration::from_secs(120)).await;
    }

    let status = a
        .wait_for("every record delivered", Duration::from_secs(120), |s| {
            counter(s, "delivered") == RECORDS as i64 && s["pending"] == 0
        })
        .await;
    let status_b = b.status().await.expect("replica b answers");
    assert_eq!(
        status["counters"], status_b["counters"],
        "both replicas report the one shared ledger"
    );

    let puts = erp.stored_puts();
    assert_eq!(puts.len(), RECORDS, "every record reached the ERP");
    let twice: Vec<_> = puts.iter().filter(|(_, c)| **c != 1).take(10).collect();
    assert!(twice.is_empty(), "no record was delivered twice: {twice:?}");
    let calls = erp.state.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(calls, RECORDS, "no delivery was even attempted twice");
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");

    let delivered_a = a.metric("records_delivered").await;
    let delivered_b = b.metric("records_delivered").await;
    assert!(
        delivered_a > 0.0 && delivered_b > 0.0,
        "both replicas delivered (a: {delivered_a}, b: {delivered_b})"
    );
    assert_eq!(
        (delivered_a + delivered_b) as usize,
        RECORDS,
        "the replicas' deliveries add up"
    );
    assert_eq!(erp.violations(), Vec::<String>::new());
    let peak = erp
        .state
        .max_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= CONCURRENCY as usize,
        "two replicas put {peak} requests at the ERP at once; the flow allows {CONCURRENCY}"
    );
    eprintln!(
        "replicas: {RECORDS} records, delivered by a: {delivered_a}, by b: {delivered_b}, max in flight at the ERP {}, total {:.1?}",
        erp.state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        started.elapsed()
    );
}
