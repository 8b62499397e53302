//! Crash: the real `meshline worker` binary is SIGKILLed at random points (mid-ingest, mid-delivery) at
//! least 20 times while a CRM pushes 10,000 records (and later revisions of some of them) by signed webhook,
//! retrying every batch until it is acknowledged. Afterwards the ERP holds every record exactly once by
//! external id with its latest payload, and the ledger's counts agree with it. Once with the embedded SQLite
//! ledger, once with PostgreSQL.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshline::ledger::{LedgerTarget, SystemClock};
use rand::{Rng, SeedableRng};
use reliability::*;

const RECORDS: usize = 10_000;
const BATCH: usize = 100;
const KILLS: u32 = 24;

/// Revision 2 of every tenth record two batches after it appeared, and revision 3 of every fiftieth four
/// batches after (some records are revised twice).
const REVISIONS: &[Revision] = &[
    Revision {
        lag: 2,
        modulus: 10,
        ending: 3,
        version: 2,
    },
    Revision {
        lag: 4,
        modulus: 50,
        ending: 3,
        version: 3,
    },
];

async fn kill_and_restart_while_the_crm_sends(ledger: LedgerChoice, seed: u64) {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let erp = Erp::start(ERP_TOKEN).await;
    // A few milliseconds per write keeps deliveries observably in flight, so kills land mid-delivery.
    erp.set_latency(Duration::from_millis(2));
    let files = FlowFiles::new(&erp.base_url(), ledger.clone(), 16);
    let mut worker = WorkerProcess::new(&files, "crash-worker");
    worker.start().await;
    let _evidence = EvidenceOnFailure::new(vec![worker.ops_url()]);

    let (batches, latest, versions) = traffic(RECORDS, BATCH, REVISIONS);
    let urls = vec![worker.url()];
    let crm = tokio::spawn(async move {
        let http = client();
        let mut stats = CrmStats::default();
        for batch in &batches {
            deliver_batch(&http, &urls, batch, &mut stats, Duration::from_secs(60)).await;
            // A steady stream rather than one burst, so kills also land while batches are being stored.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        stats
    });

    let mut mid_delivery = 0;
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        if kill % 2 == 1 {
            // Every other kill waits for a request to be at the ERP, so the crash window between the ERP's
            // answer and the ledger's record of it is hit for sure.
            let until = Instant::now() + Duration::from_secs(1);
            while erp.state.in_flight.load(Ordering::SeqCst) == 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if erp.state.in_flight.load(Ordering::SeqCst) > 0 {
            mid_delivery += 1;
        }
        worker.kill();
        // Down for a moment: the CRM's requests meet a closed port and are retried.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        worker.start().await;
    }
    let sending_done = tokio::time::timeout(Duration::from_secs(90), crm)
        .await
        .expect("the CRM finished sending within 90 s of the last kill")
        .expect("the CRM task did not panic");
    let killing_done = started.elapsed();

    // Records claimed by a killed process wait for their 60 s lease to expire, then are taken over.
    let status = worker
        .wait_for("nothing pending", Duration::from_secs(150), |s| {
            s["pending"].as_u64() == Some(0)
        })
        .await;

    // The counters the ledger keeps in the transactions that change records equal a full recount, after
    // two dozen SIGKILLs at any point of those transactions.
    worker.kill();
    let target = match &ledger {
        LedgerChoice::Embedded => {
            LedgerTarget::Sqlite(files.state_dir("crash-worker").join("ledger.db"))
        }
        LedgerChoice::Postgres(url) => LedgerTarget::Postgres(url.clone()),
    };
    let opened = meshline::ledger::open(
        &target,
        &files.rendered.flow_name(),
        std::sync::Arc::new(SystemClock),
    )
    .await
    .expect("the ledger opens after the run");
    let kept = opened.counts().await.expect("kept counts");
    let recount = opened.recount().await.expect("recount");
    opened.close().await;
    assert!(
        kept.last_delivery_at >= recount.last_delivery_at,
        "{kept:?} vs {recount:?}"
    );
    let mut comparable = kept.clone();
    comparable.last_delivery_at = recount.last_delivery_at;
    assert_eq!(
        comparable, recount,
        "the kept counters (left) equal a full recount of the ledger (right)"
    );

    let orders = erp.orders();
    let expected: HashSet<String> = latest.keys().map(|&n| external_id(n)).collect();
    let got: HashSet<String> = orders.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the ERP holds exactly the generated records: {} missing (e.g. {missing:?}), {} extra (e.g. {extra:?})",
        expected.difference(&got).count(),
        got.difference(&expected).count()
    );
    let stale: Vec<String> = latest
        .iter()
        .filter(|(n, v)| orders[&external_id(**n)]["memo"] != order_memo(**n, **v).as_str())
        .map(|(n, v)| {
            format!(
                "{}: has {}, latest is revision {v}",
                external_id(*n),
                orders[&external_id(*n)]["memo"]
            )
        })
        .take(5)
        .collect();
    assert!(
        stale.is_empty(),
        "every record holds its latest payload: {stale:?}"
    );
    assert_eq!(
        erp.violations(),
        Vec::<String>::new(),
        "every request carried the token and an Idempotency-Key"
    );

    assert_eq!(
        counter(&status, "delivered") as usize,
        orders.len(),
        "the ledger's delivered count agrees with the ERP: {status}"
    );
    assert_eq!(
        counter(&status, "deadLettered"),
        0,
        "nothing was dead-lettered: {status}"
    );
    assert_eq!(counter(&status, "held"), 0, "{status}");
    assert_eq!(
        counter(&status, "received") as usize,
        versions,
        "every record version was stored exactly once, none lost and no CRM retry counted twice: {status}"
    );

    let puts = erp.stored_puts();
    let repeated = puts.values().filter(|&&c| c > 1).count();
    assert!(
        worker.starts > KILLS,
        "the worker was restarted after every kill"
    );
    assert!(
        mid_delivery >= KILLS / 2,
        "at least half the kills hit a delivery in flight ({mid_delivery})"
    );
    assert!(
        sending_done.unanswered + sending_done.refused > 0,
        "the CRM met the worker down and retried: {sending_done:?}"
    );
    eprintln!(
        "crash ({}): {RECORDS} records, {} versions, {KILLS} SIGKILLs ({mid_delivery} mid-delivery), CRM {:?}, \
         {} ERP PUTs stored ({repeated} ids written more than once), kills over after {:.1?}, total {:.1?}",
        status["backend"],
        versions,
        sending_done,
        puts.values().sum::<u32>(),
        killing_done,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_delivery_neither_loses_nor_duplicates_with_sqlite() {
    kill_and_restart_while_the_crm_sends(LedgerChoice::Embedded, 0x5eed_0001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_delivery_neither_loses_nor_duplicates_with_postgres() {
    let pg = postgres::PgServer::start();
    let url = pg.create_database("crash");
    kill_and_restart_while_the_crm_sends(LedgerChoice::Postgres(url), 0x5eed_0002).await;
}
