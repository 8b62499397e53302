//! The ledger's promises about reconciliation audit runs (issue #17), run against every backend through
//! `ledger_suite!`: a page and its cursor commit together (or not at all), a run resumes after the ledger is
//! closed and reopened without counting anything twice, one replica holds a run's lease and another takes
//! it over once it lapses, and a finished run keeps its result and drops its orders.

use std::time::Duration;

use meshline::connectors::queries::AuditedOrder;
use meshline::ledger::{AuditRunState, AuditSide, LedgerError, RecordState};
use rust_decimal::Decimal;
use serde_json::json;

use super::ledger_suite::{Fixture, T0, clock, record};

const RUN_LEASE: Duration = Duration::from_secs(60);
const DAY_MS: i64 = 24 * 3600 * 1000;

fn orders(
    prefix: &str,
    range: std::ops::Range<u32>,
    currency: &str,
    cents: i64,
) -> Vec<AuditedOrder> {
    range
        .map(|i| AuditedOrder {
            external_id: format!("{prefix}{i:05}"),
            currency: currency.to_string(),
            amount: Decimal::new(cents, 2),
        })
        .collect()
}

pub async fn audit_pages_commit_with_their_cursor_and_a_reopened_ledger_resumes_without_double_counting(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let (run, started) = ledger
        .audit_start(T0 - 7 * DAY_MS, T0, "worker-a", RUN_LEASE)
        .await
        .unwrap();
    assert!(started);
    ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Crm,
            &orders("006", 0..3, "USD", 1_010),
            Some("p2"),
            RUN_LEASE,
        )
        .await
        .unwrap();
    ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Erp,
            &orders("006", 0..2, "USD", 1_010),
            Some("e2"),
            RUN_LEASE,
        )
        .await
        .unwrap();
    // The process dies here: the ledger is closed with the run half read.
    ledger.close().await;
    drop(ledger);

    let ledger = fixture.open(clock.clone()).await;
    let resumed = ledger
        .audit_run(run.id)
        .await
        .unwrap()
        .expect("the run survives");
    assert_eq!(resumed.state, AuditRunState::Running);
    assert_eq!(
        resumed.crm.cursor.as_deref(),
        Some("p2"),
        "resume from the last committed page"
    );
    assert_eq!(
        (resumed.crm.pages, resumed.crm.orders, resumed.crm.done),
        (1, 3, false)
    );
    assert_eq!((resumed.erp.pages, resumed.erp.orders), (1, 2));
    ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Crm,
            &orders("006", 3..5, "EUR", 99_999),
            None,
            RUN_LEASE,
        )
        .await
        .unwrap();
    ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Erp,
            &orders("006", 2..5, "USD", 1_010),
            None,
            RUN_LEASE,
        )
        .await
        .unwrap();
    let err = ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Crm,
            &orders("006", 9..10, "USD", 1),
            None,
            RUN_LEASE,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::InvalidInput { .. }),
        "a side read in full takes no more pages: {err}"
    );

    let tally = ledger.audit_compare(run.id).await.unwrap();
    assert_eq!(tally.crm.count, 5, "no page counted twice");
    assert_eq!(tally.crm.totals["USD"], Decimal::new(3_030, 2));
    assert_eq!(tally.crm.totals["EUR"], Decimal::new(199_998, 2));
    assert_eq!(tally.erp.count, 5);
    assert_eq!(tally.erp.totals["USD"], Decimal::new(5_050, 2));
    assert_eq!(tally.matched, 3);
    let ids: Vec<&str> = tally
        .differences
        .iter()
        .map(|d| d.external_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["00600003", "00600004"],
        "the two EUR deals have USD orders"
    );
}

pub async fn an_audit_page_that_fails_midway_stores_neither_its_orders_nor_its_cursor(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let (run, _) = ledger
        .audit_start(T0 - DAY_MS, T0, "worker-a", RUN_LEASE)
        .await
        .unwrap();
    ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Crm,
            &orders("a", 0..2, "USD", 100),
            Some("c1"),
            RUN_LEASE,
        )
        .await
        .unwrap();
    // The database refuses one order of the next page, after the cursor's update and the first inserts.
    match fixture.backend() {
        "sqlite" => {
            fixture
                .execute(
                    "CREATE TRIGGER poison BEFORE INSERT ON audit_orders WHEN NEW.external_id = 'poison' \
                     BEGIN SELECT RAISE(ABORT, 'poison order'); END;",
                )
                .await
        }
        _ => {
            fixture
                .execute(
                    "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.external_id = 'poison' THEN RAISE EXCEPTION 'poison order'; END IF; \
                     RETURN NEW; END $$; \
                     CREATE TRIGGER poison BEFORE INSERT ON audit_orders FOR EACH ROW EXECUTE FUNCTION poison();",
                )
                .await
        }
    }
    let mut page = orders("b", 0..3, "USD", 100);
    page.push(AuditedOrder {
        external_id: "poison".into(),
        currency: "USD".into(),
        amount: Decimal::ONE,
    });
    ledger
        .audit_page(
            run.id,
            "worker-a",
            AuditSide::Crm,
            &page,
            Some("c2"),
            RUN_LEASE,
        )
        .await
        .expect_err("the database refuses the page");
    let now = ledger.audit_run(run.id).await.unwrap().unwrap();
    assert_eq!(
        now.crm.cursor.as_deref(),
        Some("c1"),
        "the cursor did not move"
    );
    assert_eq!((now.crm.pages, now.crm.orders), (1, 2));
    let tally = ledger.audit_compare(run.id).await.unwrap();
    assert_eq!(
        tally.crm.count, 2,
        "none of the failed page's orders were kept"
    );
}

pub async fn an_audit_runs_lapsed_lease_is_taken_over_and_the_old_holder_is_refused(
    fixture: Fixture,
) {
    let clock = clock();
    let a = fixture.open(clock.clone()).await;
    let b = fixture.open(clock.clone()).await;
    let (run, _) = a
        .audit_start(T0 - DAY_MS, T0, "replica-a", RUN_LEASE)
        .await
        .unwrap();
    let (joined, started) = b
        .audit_start(T0 - DAY_MS, T0, "replica-b", RUN_LEASE)
        .await
        .unwrap();
    assert_eq!(
        (joined.id, started),
        (run.id, false),
        "a second start joins the running run"
    );
    assert_eq!(joined.owner.as_deref(), Some("replica-a"));
    assert!(
        b.audit_lease(run.id, "replica-b", RUN_LEASE)
            .await
            .unwrap()
            .is_none(),
        "a live lease is not taken"
    );
    a.audit_page(
        run.id,
        "replica-a",
        AuditSide::Crm,
        &orders("x", 0..2, "USD", 500),
        Some("c1"),
        RUN_LEASE,
    )
    .await
    .unwrap();

    // replica-a stops renewing (it died or hangs); once the lease lapses replica-b takes the run over.
    clock.advance(RUN_LEASE + Duration::from_millis(1));
    let taken = b
        .audit_lease(run.id, "replica-b", RUN_LEASE)
        .await
        .unwrap()
        .expect("a lapsed lease is taken over");
    assert_eq!(
        taken.crm.cursor.as_deref(),
        Some("c1"),
        "the new holder resumes from the stored cursor"
    );
    let refused = a
        .audit_page(
            run.id,
            "replica-a",
            AuditSide::Crm,
            &orders("y", 0..5, "USD", 1),
            None,
            RUN_LEASE,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, LedgerError::AuditLeaseLost { holder, .. } if holder == "replica-b"),
        "{refused}"
    );
    b.audit_page(
        run.id,
        "replica-b",
        AuditSide::Crm,
        &orders("x", 2..3, "USD", 500),
        None,
        RUN_LEASE,
    )
    .await
    .unwrap();
    assert_eq!(
        b.audit_compare(run.id).await.unwrap().crm.count,
        3,
        "the old holder's page is not in it"
    );
    let refused = a
        .audit_finish(run.id, "replica-a", &json!({}))
        .await
        .unwrap_err();
    assert_eq!(refused.label(), "audit_lease_lost");
    assert!(matches!(
        a.audit_lease(999_999, "replica-a", RUN_LEASE)
            .await
            .unwrap_err(),
        LedgerError::AuditRunNotFound { run: 999_999, .. }
    ));
}

pub async fn a_finished_audit_keeps_its_result_drops_its_orders_and_a_new_start_is_a_new_run(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    assert!(ledger.audit_last().await.unwrap().is_none());
    let (run, _) = ledger
        .audit_start(T0 - DAY_MS, T0, "w", RUN_LEASE)
        .await
        .unwrap();
    for side in AuditSide::BOTH {
        ledger
            .audit_page(
                run.id,
                "w",
                side,
                &orders("k", 0..4, "USD", 100),
                None,
                RUN_LEASE,
            )
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(5));
    ledger
        .audit_finish(run.id, "w", &json!({"run": run.id, "unexplained": 0}))
        .await
        .unwrap();
    let last = ledger
        .audit_last()
        .await
        .unwrap()
        .expect("the finished run");
    assert_eq!(last.id, run.id);
    assert_eq!(last.state, AuditRunState::Finished);
    assert_eq!(last.result, Some(json!({"run": run.id, "unexplained": 0})));
    assert_eq!(last.finished_at, Some(T0 + 5_000));
    assert_eq!(
        ledger.audit_compare(run.id).await.unwrap().crm.count,
        0,
        "the orders are gone once the result is kept"
    );
    assert!(
        ledger
            .audit_lease(run.id, "w", RUN_LEASE)
            .await
            .unwrap()
            .is_none()
    );
    let (next, started) = ledger
        .audit_start(T0, T0 + DAY_MS, "w", RUN_LEASE)
        .await
        .unwrap();
    assert!(
        started && next.id > run.id,
        "a new start after a finish is a new run"
    );
}

pub async fn audit_facts_tell_the_newest_record_of_each_source_key(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![
            record("006A", json!({"Amount": 100, "CurrencyIsoCode": "USD"})),
            record("006B", json!({"Amount": 200})),
        ])
        .await
        .unwrap();
    let facts = ledger
        .audit_facts(&["006A".into(), "006B".into(), "006-unknown".into()])
        .await
        .unwrap();
    let keys: Vec<&str> = facts.iter().map(|f| f.source_key.as_str()).collect();
    assert_eq!(keys, ["006A", "006B"], "an unknown key has no facts");
    assert_eq!(facts[0].state, RecordState::Received);
    let payload: serde_json::Value =
        serde_json::from_str(facts[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(payload["Amount"], 100);
    let too_many: Vec<String> = (0..=meshline::ledger::AUDIT_FACTS_CHUNK)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        ledger.audit_facts(&too_many).await.unwrap_err().label(),
        "invalid_input"
    );
}
