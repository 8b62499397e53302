//! The reconciliation audit's driver against a real SQLite ledger and in-memory sides: a side that keeps
//! failing gives a partial result (never "reconciled"), a run killed mid-way and resumed by another worker
//! gives the same result as an uninterrupted one, every difference is explained from the ledger or counted,
//! and unexplained differences open the flow's `audit_mismatch` ticket, which a reconciling run resolves.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::AuditOutcome;
use meshline::audit::run::{AuditSettings, Auditor, mismatch_fingerprint};
use meshline::connectors::queries::{AuditWindow, AuditedOrder, OrderPage, OrderQuery, QueryError};
use meshline::ledger::{
    self, BucketSet, Clock, IncomingRecord, Ledger, LedgerTarget, ManualClock, Outcome,
};
use meshline::tickets::TicketState;
use rust_decimal::Decimal;
use serde_json::json;

const FLOW: &str = "closed-won-to-netsuite";
const T0: i64 = 1_767_225_600_000;

/// One side in memory, paged by index, with scripted failures and an optional stall.
struct MemorySide {
    system: &'static str,
    orders: Vec<AuditedOrder>,
    page_size: usize,
    /// Errors returned, in order, before (and instead of) pages; `None` entries serve a page.
    script: Mutex<VecDeque<Option<QueryError>>>,
    /// Every later call fails with this once the script is used up.
    then_fail: Option<QueryError>,
    /// Calls at or after this number never answer (a process that is about to be killed).
    stall_at: Option<usize>,
    calls: AtomicUsize,
    stalled: tokio::sync::Notify,
    cursors: Mutex<Vec<Option<String>>>,
}

impl MemorySide {
    fn new(system: &'static str, mut orders: Vec<AuditedOrder>, page_size: usize) -> MemorySide {
        orders.sort_by(|a, b| a.external_id.cmp(&b.external_id));
        MemorySide {
            system,
            orders,
            page_size,
            script: Mutex::new(VecDeque::new()),
            then_fail: None,
            stall_at: None,
            calls: AtomicUsize::new(0),
            stalled: tokio::sync::Notify::new(),
            cursors: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl OrderQuery for MemorySide {
    fn system(&self) -> &'static str {
        self.system
    }

    async fn page(&self, _: &AuditWindow, cursor: Option<&str>) -> Result<OrderPage, QueryError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        self.cursors
            .lock()
            .unwrap()
            .push(cursor.map(str::to_string));
        if self.stall_at.is_some_and(|at| call >= at) {
            self.stalled.notify_one();
            std::future::pending::<()>().await;
        }
        if let Some(Some(e)) = self.script.lock().unwrap().pop_front() {
            return Err(e);
        }
        if self.script.lock().unwrap().is_empty()
            && let Some(e) = &self.then_fail
        {
            return Err(e.clone());
        }
        let start: usize = cursor.map_or(0, |c| c.parse().unwrap());
        let end = (start + self.page_size).min(self.orders.len());
        Ok(OrderPage {
            orders: self.orders[start..end].to_vec(),
            next: (end < self.orders.len()).then(|| end.to_string()),
        })
    }
}

fn order(id: &str, currency: &str, amount: &str) -> AuditedOrder {
    AuditedOrder {
        external_id: id.into(),
        currency: currency.into(),
        amount: amount.parse().unwrap(),
    }
}

/// `n` deals with their orders, in two currencies with cents.
fn matching(n: usize) -> (Vec<AuditedOrder>, Vec<AuditedOrder>) {
    let deals: Vec<AuditedOrder> = (0..n)
        .map(|i| {
            let currency = if i % 3 == 0 { "EUR" } else { "USD" };
            order(
                &format!("006{i:06}"),
                currency,
                &format!("{}.{:02}", 100 + i, i % 100),
            )
        })
        .collect();
    (deals.clone(), deals)
}

fn settings(owner: &str) -> AuditSettings {
    AuditSettings {
        max_attempts: 3,
        backoff: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(5),
        min_interval: Duration::ZERO,
        ..AuditSettings::new(owner)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    target: LedgerTarget,
    clock: Arc<ManualClock>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        Setup {
            target: LedgerTarget::Sqlite(dir.path().join("ledger.db")),
            _dir: dir,
            clock: ManualClock::starting_at(T0),
        }
    }

    async fn ledger(&self) -> Arc<dyn Ledger> {
        ledger::open(&self.target, FLOW, self.clock.clone())
            .await
            .unwrap()
    }

    fn auditor(
        &self,
        ledger: &Arc<dyn Ledger>,
        crm: Arc<MemorySide>,
        erp: Arc<MemorySide>,
        owner: &str,
    ) -> Auditor {
        Auditor {
            ledger: ledger.clone(),
            crm,
            erp,
            clock: self.clock.clone(),
            settings: settings(owner),
        }
    }
}

fn window() -> AuditWindow {
    AuditWindow {
        from: chrono::DateTime::from_timestamp_millis(T0 - 7 * 86_400_000).unwrap(),
        to: chrono::DateTime::from_timestamp_millis(T0).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_that_rate_limits_then_fails_is_partial_never_reconciled() {
    let setup = Setup::new();
    let ledger = setup.ledger().await;
    let (deals, orders) = matching(10);
    let crm = Arc::new(MemorySide::new("salesforce", deals, 4));
    let mut erp = MemorySide::new("netsuite", orders, 4);
    erp.script = Mutex::new(
        [
            None,
            Some(QueryError::RateLimited {
                system: "netsuite",
                retry_after: Some(Duration::from_millis(2)),
                message: "429 Too Many Requests".into(),
            }),
        ]
        .into(),
    );
    erp.then_fail = Some(QueryError::Unavailable {
        system: "netsuite",
        message: "503 Service Unavailable".into(),
    });
    let erp = Arc::new(erp);
    let auditor = setup.auditor(&ledger, crm, erp.clone(), "worker-a");
    let (id, _) = auditor.start(window()).await.unwrap();
    let status = auditor.drive(id).await.unwrap();

    assert_eq!(status.outcome, Some(AuditOutcome::Partial));
    let why = status.partial_reason.as_deref().unwrap();
    assert!(
        why.contains("erp side (netsuite)") && why.contains("3 attempt(s)") && why.contains("503"),
        "{why}"
    );
    // The first ERP page was read; the second failed three times (a rate limit, then two outages).
    assert_eq!(erp.calls.load(Ordering::SeqCst), 4);
    assert_eq!(
        (status.crm.count, status.erp.count),
        (10, 4),
        "the counts cover what was read"
    );
    assert!(
        status.ticket.is_none(),
        "a partial run proves nothing either way"
    );
    assert!(ledger.tickets(true, 10).await.unwrap().is_empty());
    let run = ledger.audit_run(id).await.unwrap().unwrap();
    assert_eq!(run.state, ledger::AuditRunState::Finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_query_is_not_retried_and_the_run_is_partial() {
    let setup = Setup::new();
    let ledger = setup.ledger().await;
    let (deals, orders) = matching(3);
    let mut crm = MemorySide::new("hubspot", deals, 10);
    crm.then_fail = Some(QueryError::Refused {
        system: "hubspot",
        message: "403 missing scope crm.objects.deals.read".into(),
    });
    let crm = Arc::new(crm);
    let auditor = setup.auditor(
        &ledger,
        crm.clone(),
        Arc::new(MemorySide::new("odoo", orders, 10)),
        "w",
    );
    let (id, _) = auditor.start(window()).await.unwrap();
    let status = auditor.drive(id).await.unwrap();
    assert_eq!(status.outcome, Some(AuditOutcome::Partial));
    assert_eq!(
        crm.calls.load(Ordering::SeqCst),
        1,
        "retrying a refusal won't help"
    );
    assert!(
        status
            .partial_reason
            .unwrap()
            .contains("crm.objects.deals.read")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_after_some_pages_and_resumed_elsewhere_gives_the_uninterrupted_result() {
    let (mut deals, mut orders) = matching(50);
    // A few differences, so the comparison has something to say.
    deals.push(order("006-no-order", "USD", "10.00"));
    orders.push(order("006-no-deal", "USD", "7.50"));
    orders[5].amount += Decimal::new(1, 2);

    let whole = {
        let setup = Setup::new();
        let ledger = setup.ledger().await;
        let auditor = setup.auditor(
            &ledger,
            Arc::new(MemorySide::new("salesforce", deals.clone(), 7)),
            Arc::new(MemorySide::new("netsuite", orders.clone(), 7)),
            "worker-a",
        );
        let (id, _) = auditor.start(window()).await.unwrap();
        auditor.drive(id).await.unwrap()
    };

    let setup = Setup::new();
    let ledger = setup.ledger().await;
    let mut crm = MemorySide::new("salesforce", deals.clone(), 7);
    crm.stall_at = Some(3);
    let crm = Arc::new(crm);
    let auditor = setup.auditor(
        &ledger,
        crm.clone(),
        Arc::new(MemorySide::new("netsuite", orders.clone(), 7)),
        "worker-a",
    );
    let (id, _) = auditor.start(window()).await.unwrap();
    let task = tokio::spawn(async move { auditor.drive(id).await });
    // The fourth CRM call means three pages are committed; the worker is then killed.
    crm.stalled.notified().await;
    task.abort();
    let _ = task.await;
    ledger.close().await;
    drop(ledger);

    let ledger = setup.ledger().await;
    let run = ledger.audit_run(id).await.unwrap().unwrap();
    assert_eq!((run.crm.pages, run.crm.orders), (3, 21));
    let crm = Arc::new(MemorySide::new("salesforce", deals, 7));
    let other = setup.auditor(
        &ledger,
        crm.clone(),
        Arc::new(MemorySide::new("netsuite", orders, 7)),
        "worker-b",
    );
    assert!(
        matches!(
            other.drive(id).await,
            Err(meshline::audit::run::AuditError::Busy { .. })
        ),
        "the dead worker's lease is respected until it lapses"
    );
    setup.clock.advance(Duration::from_secs(121));
    let resumed = other.drive(id).await.unwrap();
    assert_eq!(
        crm.cursors.lock().unwrap()[0].as_deref(),
        Some("21"),
        "resumed from the stored cursor"
    );

    assert_eq!(resumed.crm, whole.crm, "no page counted twice");
    assert_eq!(resumed.erp, whole.erp);
    assert_eq!(resumed.matched, whole.matched);
    assert_eq!(resumed.explained, whole.explained);
    assert_eq!(
        (resumed.unexplained, &resumed.unexplained_ids),
        (whole.unexplained, &whole.unexplained_ids)
    );
    assert_eq!(whole.unexplained, 3);
    assert_eq!(whole.crm.count, 51);
}

async fn ingest(ledger: &Arc<dyn Ledger>, key: &str, payload: serde_json::Value) {
    ledger
        .ingest(vec![IncomingRecord {
            source_key: key.into(),
            idempotency_key: format!("Opportunity/{key}"),
            external_id: Some(format!("SO-{key}")),
            payload,
            contract_version: "1.0.0".into(),
            correlation_id: None,
            ordering: None,
        }])
        .await
        .unwrap();
}

/// Claims every due record and completes each with the outcome `decide` gives its source key.
async fn complete_all(ledger: &Arc<dyn Ledger>, decide: impl Fn(&str) -> Option<Outcome>) {
    let claimed = ledger
        .claim("w", &BucketSet::all(), 100, Duration::from_secs(30))
        .await
        .unwrap();
    for c in claimed {
        match decide(&c.source_key) {
            Some(outcome) => ledger.complete(c.claim, outcome).await.unwrap(),
            None => ledger
                .complete(c.claim, Outcome::Released { not_before: None })
                .await
                .unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differences_are_explained_from_the_ledger_and_the_rest_open_a_ticket_a_reconciling_run_resolves()
 {
    let setup = Setup::new();
    let ledger = setup.ledger().await;
    for key in [
        "006-dead",
        "006-held",
        "006-stale",
        "006-edited",
        "006-flight",
    ] {
        ingest(
            &ledger,
            key,
            json!({"Amount": 100, "CurrencyIsoCode": "USD", "Name": "ACME <b>"}),
        )
        .await;
    }
    complete_all(&ledger, |key| match key {
        "006-dead" => Some(Outcome::DeadLettered {
            reason: "erp:422".into(),
            class: meshline::api::ErrorClass::Permanent,
            erp_response: None,
            snapshot: None,
        }),
        "006-held" => Some(Outcome::Held {
            rule: "discount_cap".into(),
            role: "finance".into(),
            snapshot: None,
        }),
        "006-stale" | "006-edited" => Some(Outcome::Delivered),
        _ => None,
    })
    .await;
    let deals = vec![
        order("006-dead", "USD", "100"),
        order("006-held", "USD", "100"),
        order("006-stale", "USD", "120"), // the CRM changed after the ledger delivered 100
        order("006-edited", "USD", "100"), // delivered 100, the ERP says 90: edited in the ERP
        order("006-flight", "USD", "100"),
        order("006-unknown", "USD", "5"),
        order("006-ok", "EUR", "1.10"),
    ];
    let orders = vec![
        order("006-stale", "USD", "100"),
        order("006-edited", "USD", "90"),
        order("006-ok", "EUR", "1.1"),
        order("SO-orphan", "USD", "3"),
    ];
    let auditor = setup.auditor(
        &ledger,
        Arc::new(MemorySide::new("salesforce", deals, 3)),
        Arc::new(MemorySide::new("netsuite", orders, 3)),
        "w",
    );
    let (id, _) = auditor.start(window()).await.unwrap();
    let status = auditor.drive(id).await.unwrap();

    assert_eq!(status.outcome, Some(AuditOutcome::Unexplained));
    assert_eq!(status.matched, 1);
    assert_eq!(status.crm.totals["USD"], "525");
    assert_eq!(status.crm.totals["EUR"], "1.1");
    assert_eq!(
        status.explained,
        [
            ("deadLettered", 1),
            ("held", 1),
            ("inFlight", 1),
            ("staleRevision", 1)
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    );
    assert_eq!(status.unexplained, 3);
    assert_eq!(
        status.unexplained_ids,
        ["006-edited", "006-unknown", "SO-orphan"]
    );
    let fingerprint = status.ticket.clone().expect("a ticket for the unexplained");
    assert_eq!(fingerprint, mismatch_fingerprint(FLOW));
    let ticket = ledger.ticket(&fingerprint).await.unwrap().unwrap();
    assert_eq!(ticket.state, TicketState::Open);
    assert!(
        ticket
            .summary
            .contains("006-edited, 006-unknown, SO-orphan"),
        "{}",
        ticket.summary
    );
    assert!(
        !ticket.summary.contains("ACME"),
        "no customer data in a ticket: {}",
        ticket.summary
    );
    let last = ledger.audit_last().await.unwrap().unwrap();
    assert_eq!(
        meshline::audit::run::result_of(&last).as_ref(),
        Some(&status)
    );

    // Everything fixed: the next run reconciles and resolves the ticket.
    setup.clock.advance(Duration::from_secs(3600));
    let (deals, orders) = matching(5);
    let auditor = setup.auditor(
        &ledger,
        Arc::new(MemorySide::new("salesforce", deals, 2)),
        Arc::new(MemorySide::new("netsuite", orders, 2)),
        "w",
    );
    let (id, _) = auditor.start(window()).await.unwrap();
    let status = auditor.drive(id).await.unwrap();
    assert_eq!(status.outcome, Some(AuditOutcome::Reconciled));
    assert_eq!((status.matched, status.unexplained), (5, 0));
    assert_eq!(
        ledger.ticket(&fingerprint).await.unwrap().unwrap().state,
        TicketState::Resolved
    );
    let _ = setup.clock.now_ms();
}
