//! The reconciliation audit's cost (issue #17's target: 100,000 orders on each side in at most 60 s and
//! 128 MB of peak RSS): the real driver against a real SQLite ledger on disk, both sides in-memory stand-ins
//! paged 2,000 at a time, with 0.5% of the orders differing. Prints wall seconds and the process's peak RSS
//! (`getrusage`'s `ru_maxrss`), and fails when either target is missed.
//!
//! The stand-ins make each page on demand from its index, so the figure is the driver's and the ledger's,
//! not the test data's.

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshline::api::AuditOutcome;
use meshline::audit::run::{AuditSettings, Auditor};
use meshline::connectors::queries::{AuditWindow, AuditedOrder, OrderPage, OrderQuery, QueryError};
use meshline::ledger::{self, LedgerTarget, SystemClock};
use rust_decimal::Decimal;

const ORDERS: usize = 100_000;
const PAGE: usize = 2_000;
/// One order in this many differs in amount on the ERP side.
const DIFFERENT_EVERY: usize = 200;

struct Side {
    system: &'static str,
    erp: bool,
}

#[async_trait]
impl OrderQuery for Side {
    fn system(&self) -> &'static str {
        self.system
    }

    async fn page(&self, _: &AuditWindow, cursor: Option<&str>) -> Result<OrderPage, QueryError> {
        let start: usize = cursor.map_or(0, |c| c.parse().expect("our cursor"));
        let end = (start + PAGE).min(ORDERS);
        let orders = (start..end)
            .map(|i| {
                let mut amount = Decimal::new(10_000 + (i as i64 % 90_000), 2);
                if self.erp && i % DIFFERENT_EVERY == 0 {
                    amount += Decimal::new(1, 2);
                }
                AuditedOrder {
                    external_id: format!("006{i:012}"),
                    currency: if i % 4 == 0 { "EUR" } else { "USD" }.to_string(),
                    amount,
                }
            })
            .collect();
        Ok(OrderPage {
            orders,
            next: (end < ORDERS).then(|| end.to_string()),
        })
    }
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes one rusage to the pointer it is given, which is valid and aligned.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    // Linux reports kilobytes.
    usage.ru_maxrss as u64 * 1024
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (status, took) = runtime.block_on(async {
        let ledger = ledger::open(
            &LedgerTarget::Sqlite(dir.path().join("ledger.db")),
            "bench-audit",
            Arc::new(SystemClock),
        )
        .await
        .expect("ledger");
        let auditor = Auditor {
            ledger: ledger.clone(),
            crm: Arc::new(Side {
                system: "salesforce",
                erp: false,
            }),
            erp: Arc::new(Side {
                system: "netsuite",
                erp: true,
            }),
            clock: Arc::new(SystemClock),
            settings: AuditSettings {
                min_interval: Duration::ZERO,
                ..AuditSettings::new("bench")
            },
        };
        let now = chrono::Utc::now();
        let window = AuditWindow {
            from: now - chrono::Duration::days(7),
            to: now,
        };
        let started = Instant::now();
        let (id, _) = auditor.start(window).await.expect("start");
        let status = auditor.drive(id).await.expect("drive");
        let took = started.elapsed();
        ledger.close().await;
        (status, took)
    });
    let rss = peak_rss_bytes();
    println!(
        "audit: {} deals and {} orders, {} matched, {} unexplained, in {:.2} s; peak RSS {:.1} MB",
        status.crm.count,
        status.erp.count,
        status.matched,
        status.unexplained,
        took.as_secs_f64(),
        rss as f64 / (1024.0 * 1024.0)
    );
    assert_eq!(status.crm.count, ORDERS as i64);
    assert_eq!(status.erp.count, ORDERS as i64);
    assert_eq!(status.unexplained, (ORDERS / DIFFERENT_EVERY) as i64);
    assert_eq!(status.outcome, Some(AuditOutcome::Unexplained));
    assert!(
        took <= Duration::from_secs(60),
        "target: at most 60 s, took {took:?}"
    );
    assert!(
        rss <= 128 * 1024 * 1024,
        "target: at most 128 MB peak RSS, was {rss} bytes"
    );
}
