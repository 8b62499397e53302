//! The ledger's behavioural promises, written once and run against every backend by `ledger_suite!`.
//! Each function takes a [`Fixture`] (a database that can be opened, closed and reopened) and asserts one
//! promise the worker relies on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meshline::api::ErrorClass;
use meshline::ledger::{
    self, BucketSet, Claim, Clock, CompletionResult, IncomingRecord, IngestOutcome, Ledger,
    LedgerError, LedgerTarget, ManualClock, Outcome, RecordState, SCHEMA_VERSION, bucket_of,
};
use serde_json::{Value, json};

use super::postgres::PgServer;

// The ticket promises (issue #16) live in their own file and run in the same suite.
pub use super::ledger_tickets::*;
// So do the audit runs' (issue #17).
pub use super::ledger_audit::*;

pub const FLOW: &str = "closed-won-to-netsuite";
/// 2026-01-01T00:00:00Z, so times in assertions are readable.
pub const T0: i64 = 1_767_225_600_000;
pub const LEASE: Duration = Duration::from_secs(30);

/// What an approver checks of a held record before deciding: its generation and hold role as they are now.
pub async fn as_seen(ledger: &dyn Ledger, id: ledger::RecordId) -> ledger::HeldAsSeen {
    let detail = ledger
        .get(id)
        .await
        .unwrap()
        .expect("the record is in the ledger");
    ledger::HeldAsSeen::of(&detail.record)
}

/// A database for one test; dropping it removes it (and stops the server, for PostgreSQL).
pub struct Fixture {
    pub target: LedgerTarget,
    _sqlite_dir: Option<tempfile::TempDir>,
    _server: Option<PgServer>,
}

impl Fixture {
    pub fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir for the SQLite ledger");
        Fixture {
            target: LedgerTarget::Sqlite(dir.path().join("ledger.db")),
            _sqlite_dir: Some(dir),
            _server: None,
        }
    }

    pub fn postgres() -> Fixture {
        let server = PgServer::start();
        let url = server.create_database("ledger");
        Fixture {
            target: LedgerTarget::Postgres(url),
            _sqlite_dir: None,
            _server: Some(server),
        }
    }

    pub async fn open(&self, clock: Arc<dyn Clock>) -> Arc<dyn Ledger> {
        ledger::open(&self.target, FLOW, clock)
            .await
            .expect("the ledger opens and migrates")
    }

    pub async fn try_open(&self, clock: Arc<dyn Clock>) -> Result<Arc<dyn Ledger>, LedgerError> {
        ledger::open(&self.target, FLOW, clock).await
    }

    /// Runs raw SQL against the database, behind the ledger's back.
    pub async fn execute(&self, sql: &str) {
        match &self.target {
            LedgerTarget::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).expect("raw sqlite");
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                conn.execute_batch(sql).expect("raw sql");
            }
            LedgerTarget::Postgres(url) => {
                let pool = sqlx::PgPool::connect(url).await.expect("raw postgres");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&pool)
                    .await
                    .expect("raw sql");
                pool.close().await;
            }
        }
    }

    /// On PostgreSQL, that `record_queue` holds exactly the records that can be claimed once due, each at its
    /// next attempt, in its bucket and with its receipt time (schema version 14: claims read the queue, not
    /// `records`), and that every record delivering under a lease, which the queue does not hold (version 16),
    /// is registered in `record_leases` under its owner and its lease's expiry, where a claim finds it once the
    /// lease lapses, by a registration that counts at least the records it holds; and that `record_attention`
    /// lists exactly the held and dead-lettered records, each under its flow and state (version 18: listings of
    /// holds and dead letters, replays by reason and purges read it). SQLite finds waiting, held and
    /// dead-lettered records through indexes of `records` itself; there is nothing to compare.
    pub async fn assert_lists_mirror_the_records(&self) {
        let LedgerTarget::Postgres(url) = &self.target else {
            return;
        };
        let pool = sqlx::PgPool::connect(url).await.expect("raw postgres");
        let (waiting, queued): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM records \
             WHERE (state IN ('received', 'validated', 'retry_scheduled') \
             OR (state = 'delivering' AND lease_expires_at IS NULL))), \
             (SELECT count(*) FROM record_queue)",
        )
        .fetch_one(&pool)
        .await
        .expect("count the queue");
        let differences: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "WITH waiting AS (SELECT id AS record_id, flow, next_attempt_at AS due_at, bucket, received_at \
               FROM records WHERE (state IN ('received', 'validated', 'retry_scheduled') \
             OR (state = 'delivering' AND lease_expires_at IS NULL))), \
             queued AS (SELECT record_id, flow, due_at, bucket, received_at FROM record_queue) \
             (SELECT 'waiting, not queued so', * FROM (SELECT * FROM waiting EXCEPT ALL SELECT * FROM queued) a) \
             UNION ALL \
             (SELECT 'queued, not waiting so', * FROM (SELECT * FROM queued EXCEPT ALL SELECT * FROM waiting) b)",
        )
        .fetch_all(&pool)
        .await
        .expect("compare the queue with the records")
        .into_iter()
        .map(|(what, id, _flow, due, bucket, received): (String, i64, String, i64, i64, i64)| {
            (what, id, due, bucket, received)
        })
        .collect();
        let unregistered: Vec<(i64, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT r.id, r.lease_owner, r.lease_expires_at FROM records r \
             WHERE r.state = 'delivering' AND r.lease_expires_at IS NOT NULL AND NOT EXISTS ( \
               SELECT 1 FROM record_leases l WHERE l.flow = r.flow AND l.owner = r.lease_owner \
               AND l.expires_at = r.lease_expires_at AND r.id = ANY(l.record_ids)) ORDER BY r.id",
        )
        .fetch_all(&pool)
        .await
        .expect("compare the leases with their registrations");
        // A registration counts down as its records leave; it may count more than it holds (a count-down is
        // skipped while another transaction has the registration locked) but never fewer, and one that holds
        // none is gone or left to expire.
        let undercounted: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT id, held, actual FROM (SELECT l.id, l.held, (SELECT count(*) FROM records r \
               WHERE r.id = ANY(l.record_ids) AND r.state = 'delivering' AND r.lease_owner = l.owner \
               AND r.lease_expires_at = l.expires_at) AS actual FROM record_leases l) AS c \
             WHERE held < actual OR held <= 0 ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .expect("count the registrations' records");
        let misattended: Vec<(String, i64, String, String)> = sqlx::query_as(
            "WITH attention AS (SELECT id AS record_id, flow, state FROM records \
               WHERE state IN ('held', 'dead_lettered')), \
             listed AS (SELECT record_id, flow, state FROM record_attention) \
             (SELECT 'in that state, not listed so', * FROM (SELECT * FROM attention EXCEPT ALL SELECT * FROM listed) a) \
             UNION ALL \
             (SELECT 'listed, not in that state', * FROM (SELECT * FROM listed EXCEPT ALL SELECT * FROM attention) b)",
        )
        .fetch_all(&pool)
        .await
        .expect("compare record_attention with the records");
        pool.close().await;
        assert!(
            misattended.is_empty(),
            "record_attention differs from the held and dead-lettered records (what, record, flow, state): \
             {misattended:?}"
        );
        assert!(
            undercounted.is_empty(),
            "registrations counting fewer records than they hold (registration, held, actual): {undercounted:?}"
        );
        assert!(
            unregistered.is_empty(),
            "records leased with no registration in record_leases (record, owner, expiry): {unregistered:?}"
        );
        assert!(
            differences.is_empty() && waiting == queued,
            "record_queue differs from the waiting records ({waiting} waiting, {queued} queued; \
             (what, record, due, bucket, received)): {differences:?}"
        );
    }

    /// A connection pool to a PostgreSQL fixture's database, for reading what the ledger wrote.
    pub async fn raw_postgres_pool(&self) -> sqlx::PgPool {
        let LedgerTarget::Postgres(url) = &self.target else {
            panic!("a PostgreSQL fixture")
        };
        sqlx::PgPool::connect(url).await.expect("raw postgres")
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.target {
            LedgerTarget::Sqlite(_) => "sqlite",
            LedgerTarget::Postgres(_) => "postgres",
        }
    }

    /// Makes any insert of the record keyed `poison` fail inside the database, mid-transaction.
    pub async fn install_poison_trigger(&self) {
        match &self.target {
            LedgerTarget::Sqlite(_) => {
                self.execute(
                    "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.idempotency_key = 'poison' \
                     BEGIN SELECT RAISE(ABORT, 'poison record'); END;",
                )
                .await
            }
            LedgerTarget::Postgres(_) => {
                self.execute(
                    "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.idempotency_key = 'poison' THEN RAISE EXCEPTION 'poison record'; END IF; \
                     RETURN NEW; END $$; \
                     CREATE TRIGGER poison BEFORE INSERT ON records FOR EACH ROW EXECUTE FUNCTION poison();",
                )
                .await
            }
        }
    }
}

pub fn clock() -> Arc<ManualClock> {
    ManualClock::starting_at(T0)
}

pub fn record(key: &str, payload: Value) -> IncomingRecord {
    IncomingRecord {
        source_key: key.to_string(),
        idempotency_key: format!("Opportunity/{key}"),
        external_id: Some(format!("SO-{key}")),
        payload,
        contract_version: "1.0.0".to_string(),
        correlation_id: None,
        ordering: None,
    }
}

pub fn at(clock: &ManualClock) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(clock.now_ms()).expect("valid time")
}

fn permanent(reason: &str) -> Outcome {
    Outcome::DeadLettered {
        reason: reason.to_string(),
        class: ErrorClass::Permanent,
        erp_response: Some("400 Bad Request: {\"error\":\"invalid item\"}".to_string()),
        snapshot: Some(json!({"redacted": true, "reason": reason})),
    }
}

pub async fn claim_all(ledger: &dyn Ledger, worker: &str) -> Vec<ledger::ClaimedRecord> {
    ledger
        .claim(worker, &BucketSet::all(), 10_000, LEASE)
        .await
        .expect("claim")
}

pub async fn duplicate_ingest_is_recognised(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let first = ledger
        .ingest(vec![record("a", json!({"amount": 10, "stage": "won"}))])
        .await
        .unwrap();
    let IngestOutcome::Received { id, correlation_id } = first[0].clone() else {
        panic!("a new key is received, got {first:?}")
    };
    // The webhook is retried, with the keys in another order: still the same payload. The duplicate is told
    // by the stored record's correlation id, not a new one.
    let again = ledger
        .ingest(vec![record("a", json!({"stage": "won", "amount": 10}))])
        .await
        .unwrap();
    assert_eq!(again, vec![IngestOutcome::Duplicate { id, correlation_id }]);
    let counts = ledger.counts().await.unwrap();
    assert_eq!((counts.records, counts.received), (1, 1));
    let detail = ledger.get(id).await.unwrap().expect("record exists");
    assert_eq!(detail.record.generation, 1);
    let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
    assert_eq!(steps, ["received", "duplicate"]);
    // Only one record was claimable.
    assert_eq!(claim_all(ledger.as_ref(), "w1").await.len(), 1);
}

pub async fn changed_payload_is_an_update_and_the_stale_generation_cannot_complete(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![record("a", json!({"amount": 10}))])
        .await
        .unwrap();
    let stale = claim_all(ledger.as_ref(), "w1").await.remove(0);
    assert_eq!(stale.claim.generation, 1);

    // The CRM sends a change while generation 1 is being delivered.
    let updated = ledger
        .ingest(vec![record("a", json!({"amount": 12}))])
        .await
        .unwrap();
    let IngestOutcome::Updated { id, generation, .. } = updated[0].clone() else {
        panic!("a changed payload is an update, got {updated:?}")
    };
    assert_eq!((id, generation), (stale.claim.id, 2));
    // Never two generations in flight at once: generation 2 waits for the stale holder.
    assert!(claim_all(ledger.as_ref(), "w2").await.is_empty());

    let refused = ledger.complete(stale.claim, Outcome::Delivered).await;
    assert!(
        matches!(
            refused,
            Err(LedgerError::Superseded {
                generation: 1,
                current: 2,
                ..
            })
        ),
        "{refused:?}"
    );
    let view = ledger.get(id).await.unwrap().unwrap().record;
    assert_eq!(
        view.state,
        RecordState::Received,
        "the stale delivery did not mark it delivered"
    );
    assert_eq!(view.payload, json!({"amount": 12}));

    // The refusal released the lease, so the new generation goes out now, not after the lease.
    let fresh = claim_all(ledger.as_ref(), "w2").await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].claim.generation, 2);
    assert_eq!(
        serde_json::from_str::<Value>(&fresh[0].payload).unwrap(),
        json!({"amount": 12})
    );
    ledger
        .complete(fresh[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    let counts = ledger.counts().await.unwrap();
    assert_eq!(
        (counts.records, counts.received, counts.delivered),
        (1, 2, 1)
    );
    fixture.assert_lists_mirror_the_records().await;
}

pub async fn claims_only_return_the_requested_buckets(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch: Vec<IncomingRecord> = (0..300)
        .map(|i| record(&format!("k{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let canary = BucketSet::range(0..10);
    let stable = BucketSet::range(10..100);
    let expected_canary = (0..300)
        .filter(|i| bucket_of(&format!("k{i}")) < 10)
        .count();
    assert!(expected_canary > 0, "the fixture has canary records");

    let claimed = ledger.claim("canary", &canary, 1000, LEASE).await.unwrap();
    assert_eq!(claimed.len(), expected_canary);
    for record in &claimed {
        assert!(
            canary.contains(record.bucket),
            "bucket {} is not the canary's",
            record.bucket
        );
        assert_eq!(record.bucket, bucket_of(&record.source_key));
    }
    let claimed = ledger.claim("stable", &stable, 1000, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 300 - expected_canary);
    assert!(claimed.iter().all(|r| stable.contains(r.bucket)));
    assert!(
        ledger
            .claim("any", &BucketSet::all(), 1000, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn two_concurrent_claimers_never_get_the_same_record(fixture: Fixture) {
    let clock = clock();
    // Two handles with their own connections, as two replicas would have.
    let one = fixture.open(clock.clone()).await;
    let two = fixture.open(clock.clone()).await;
    for round in 0..20 {
        let batch: Vec<IncomingRecord> = (0..200)
            .map(|i| record(&format!("r{round}-{i}"), json!({"i": i})))
            .collect();
        one.ingest(batch).await.unwrap();
        let claimer = |ledger: Arc<dyn Ledger>, name: &'static str| {
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let claimed = ledger
                        .claim(name, &BucketSet::all(), 17, LEASE)
                        .await
                        .unwrap();
                    if claimed.is_empty() {
                        break;
                    }
                    mine.extend(claimed.into_iter().map(|c| c.claim));
                }
                mine
            })
        };
        let (a, b) = tokio::join!(claimer(one.clone(), "one"), claimer(two.clone(), "two"));
        let (a, b) = (a.unwrap(), b.unwrap());
        let ids_a: HashSet<_> = a.iter().map(|c| c.id).collect();
        let ids_b: HashSet<_> = b.iter().map(|c| c.id).collect();
        assert_eq!(
            ids_a.len(),
            a.len(),
            "round {round}: a claimer got a record twice"
        );
        assert!(
            ids_a.is_disjoint(&ids_b),
            "round {round}: both claimers got a record"
        );
        assert_eq!(
            ids_a.len() + ids_b.len(),
            200,
            "round {round}: every record was claimed"
        );
        let completions = a
            .iter()
            .map(|claim| ledger::Completion {
                claim: *claim,
                outcome: Outcome::Delivered,
            })
            .collect();
        let results = one.complete_batch(completions).await.unwrap();
        assert!(results.iter().all(|r| *r == CompletionResult::Applied));
        let completions = b
            .iter()
            .map(|claim| ledger::Completion {
                claim: *claim,
                outcome: Outcome::Delivered,
            })
            .collect();
        let results = two.complete_batch(completions).await.unwrap();
        assert!(results.iter().all(|r| *r == CompletionResult::Applied));
    }
    assert_eq!(one.counts().await.unwrap().delivered, 20 * 200);
}

pub async fn an_expired_lease_is_taken_over_and_the_old_holders_completion_is_refused(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![record("a", json!({"amount": 1}))])
        .await
        .unwrap();
    let crashed = claim_all(ledger.as_ref(), "replica-1").await.remove(0);
    // While the lease runs, nobody else gets the record.
    clock.advance(LEASE / 2);
    assert!(claim_all(ledger.as_ref(), "replica-2").await.is_empty());

    clock.advance(LEASE);
    let taken = claim_all(ledger.as_ref(), "replica-2").await;
    assert_eq!(taken.len(), 1, "the expired lease is taken over");
    assert_eq!(taken[0].claimed_from, RecordState::Received);
    assert_eq!(taken[0].attempts, 2);
    assert_ne!(taken[0].claim.fence, crashed.claim.fence);

    ledger
        .complete(
            taken[0].claim,
            Outcome::RetryScheduled {
                next_attempt_at: at(&clock) + chrono::Duration::seconds(60),
                error: "503 Service Unavailable".into(),
                class: ErrorClass::Transient,
            },
        )
        .await
        .unwrap();
    // The first replica comes back and reports success: it must not overwrite the new owner's result.
    let refused = ledger.complete(crashed.claim, Outcome::Delivered).await;
    assert!(
        matches!(refused, Err(LedgerError::LeaseLost { .. })),
        "{refused:?}"
    );
    assert_eq!(refused.unwrap_err().label(), "lease_lost");
    let detail = ledger.get(crashed.claim.id).await.unwrap().unwrap();
    assert_eq!(detail.record.state, RecordState::RetryScheduled);
    assert_eq!(detail.record.last_error_class, Some(ErrorClass::Transient));
    assert!(
        detail
            .lineage
            .iter()
            .any(|e| e.step == "completion_refused")
    );
    let takeover = detail
        .lineage
        .iter()
        .filter(|e| e.step == "claimed")
        .nth(1)
        .unwrap();
    assert_eq!(takeover.detail["taken_over_from"], json!("replica-1"));
    fixture.assert_lists_mirror_the_records().await;
}

pub async fn counts_and_mttr_survive_reopening_the_ledger(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch = (0..4)
        .map(|i| record(&format!("k{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let mut claimed = claim_all(ledger.as_ref(), "w").await;
    claimed.sort_by_key(|c| c.source_key.clone());
    // k0 delivers at once; k1 fails and is delivered 30 s later; k2 fails and is delivered 90 s later
    // (MTTR = 60 s); k3 is dead-lettered.
    ledger
        .complete(claimed[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    let retry = |secs| Outcome::RetryScheduled {
        next_attempt_at: at(&clock) + chrono::Duration::seconds(secs),
        error: "timeout".into(),
        class: ErrorClass::Transient,
    };
    ledger.complete(claimed[1].claim, retry(30)).await.unwrap();
    ledger.complete(claimed[2].claim, retry(90)).await.unwrap();
    ledger
        .complete(claimed[3].claim, permanent("unknown item"))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30));
    let again = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(again.len(), 1);
    ledger
        .complete(again[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    let again = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(again.len(), 1);
    ledger
        .complete(again[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    ledger
        .replay_dead_letter(
            claimed[3].claim.id,
            "ana@example.com",
            "item created in the ERP",
        )
        .await
        .unwrap();
    let before = ledger.counts().await.unwrap();
    ledger.close().await;
    drop(ledger);

    let reopened = fixture.open(clock.clone()).await;
    let after = reopened.counts().await.unwrap();
    assert_eq!(
        before, after,
        "counts come from the ledger, not from memory"
    );
    assert_eq!(after.records, 4);
    assert_eq!(after.received, 4);
    assert_eq!(after.delivered, 3);
    assert_eq!(after.failed, 3);
    assert_eq!(after.retried, 2);
    assert_eq!(after.dead_lettered, 0);
    assert_eq!(after.pending, 1, "the replayed dead letter waits again");
    assert_eq!(after.mttr_seconds, Some(60.0));
    assert_eq!(after.manual_interventions, 1);
    assert_eq!(after.interventions_per_1000, 250.0);
    assert_eq!(after.oldest_pending_age_seconds, Some(90.0));
}

pub async fn checkpoint_advances_atomically_with_the_batch(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let source = "salesforce-poll";
    assert_eq!(ledger.checkpoint(source).await.unwrap(), None);
    let page = (0..3)
        .map(|i| record(&format!("p{i}"), json!({"i": i})))
        .collect();
    ledger
        .ingest_with_checkpoint(page, source, "2026-01-01T00:00:03Z")
        .await
        .unwrap();
    assert_eq!(
        ledger.checkpoint(source).await.unwrap().as_deref(),
        Some("2026-01-01T00:00:03Z")
    );

    // A page that fails half way through storing must not move the checkpoint, nor leave half a page.
    fixture.install_poison_trigger().await;
    let mut poison_page: Vec<IncomingRecord> = (3..6)
        .map(|i| record(&format!("p{i}"), json!({"i": i})))
        .collect();
    let mut poison = record("x", json!({}));
    poison.idempotency_key = "poison".into();
    poison_page.push(poison);
    let failed = ledger
        .ingest_with_checkpoint(poison_page, source, "2026-01-01T00:00:06Z")
        .await;
    assert!(
        matches!(failed, Err(LedgerError::Database { .. })),
        "{failed:?}"
    );
    assert_eq!(
        ledger.checkpoint(source).await.unwrap().as_deref(),
        Some("2026-01-01T00:00:03Z")
    );
    assert_eq!(
        ledger.counts().await.unwrap().records,
        3,
        "no record of the failed page was kept"
    );

    ledger
        .set_checkpoint(source, "2026-01-01T00:00:09Z")
        .await
        .unwrap();
    ledger.close().await;
    let reopened = fixture.open(clock.clone()).await;
    assert_eq!(
        reopened.checkpoint(source).await.unwrap().as_deref(),
        Some("2026-01-01T00:00:09Z")
    );
}

pub async fn migrations_are_idempotent_and_a_newer_schema_version_is_refused(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![record("a", json!({"amount": 1}))])
        .await
        .unwrap();
    ledger.close().await;
    // Opening again runs the migrations again: nothing changes, nothing is lost.
    for _ in 0..2 {
        let again = fixture.open(clock.clone()).await;
        assert_eq!(again.counts().await.unwrap().records, 1);
        again.close().await;
    }
    match &fixture.target {
        LedgerTarget::Sqlite(path) => {
            let reopened = ledger::SqliteLedger::open(path, FLOW, clock.clone())
                .await
                .unwrap();
            assert_eq!(reopened.schema_version().await.unwrap(), SCHEMA_VERSION);
            reopened.close().await;
        }
        LedgerTarget::Postgres(url) => {
            let reopened = ledger::PostgresLedger::connect(url, FLOW, clock.clone())
                .await
                .unwrap();
            assert_eq!(reopened.schema_version().await.unwrap(), SCHEMA_VERSION);
            reopened.close().await;
        }
    }

    // A newer meshline migrated this database: this one must refuse rather than write to it.
    fixture
        .execute("INSERT INTO meshline_schema (version, description, applied_at) VALUES (999, 'from the future', 0)")
        .await;
    let refused = fixture.try_open(clock.clone()).await;
    let Err(error) = refused else {
        panic!("a newer schema version must be refused")
    };
    assert!(
        matches!(
            error,
            LedgerError::SchemaTooNew {
                found: 999,
                known: SCHEMA_VERSION,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.label(), "ledger_schema_too_new");
    assert!(error.to_string().contains("schema version 999"), "{error}");
}

pub async fn dead_letters_are_replayed_by_reason(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch = (0..5)
        .map(|i| record(&format!("d{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let mut claimed = claim_all(ledger.as_ref(), "w").await;
    claimed.sort_by_key(|c| c.source_key.clone());
    let completions = claimed
        .iter()
        .enumerate()
        .map(|(i, c)| ledger::Completion {
            claim: c.claim,
            outcome: if i < 3 {
                permanent("unknown item SKU-9")
            } else {
                permanent("credit hold")
            },
        })
        .collect();
    ledger.complete_batch(completions).await.unwrap();
    assert_eq!(
        ledger
            .list(RecordState::DeadLettered, None, None, 100)
            .await
            .unwrap()
            .len(),
        5
    );
    // Paging by reason, one per page, reaches every dead letter with that reason and no other: the filter is
    // in the query, so the first page is not spent on the records of another reason.
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = ledger
            .list(RecordState::DeadLettered, Some("credit hold"), after, 1)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        pages.push(page);
    }
    let by_reason: Vec<_> = pages.iter().flatten().map(|v| v.id).collect();
    let expected: Vec<_> = claimed[3..].iter().map(|c| c.claim.id).collect();
    assert_eq!(by_reason, expected);
    assert!(pages.iter().all(|p| p.len() == 1), "{pages:?}");
    assert!(
        ledger
            .list(RecordState::DeadLettered, Some("no such reason"), None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let dead_detail = ledger.get(claimed[0].claim.id).await.unwrap().unwrap();
    // The dead letter keeps the (caller-redacted) snapshot it was given, under its generation.
    let kept: Vec<(&str, i64, &Value)> = dead_detail
        .snapshots
        .iter()
        .map(|s| (s.kind.as_str(), s.generation, &s.body))
        .collect();
    assert_eq!(
        kept,
        [(
            "dead_lettered",
            1,
            &json!({"redacted": true, "reason": "unknown item SKU-9"})
        )]
    );
    let dead = dead_detail.record;
    assert_eq!(
        dead.dead_letter_reason.as_deref(),
        Some("unknown item SKU-9")
    );
    assert!(
        dead.erp_response
            .as_deref()
            .unwrap_or_default()
            .starts_with("400")
    );

    let replayed = ledger
        .replay_dead_letters_by_reason(
            "unknown item SKU-9",
            "ana@example.com",
            "SKU-9 created in NetSuite",
        )
        .await
        .unwrap();
    let expected: Vec<_> = claimed[..3].iter().map(|c| c.claim.id).collect();
    assert_eq!(replayed, expected);
    assert_eq!(
        ledger
            .list(RecordState::Validated, None, None, 100)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        ledger
            .list(RecordState::DeadLettered, None, None, 100)
            .await
            .unwrap()
            .len(),
        2
    );

    let again = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(again.len(), 3);
    assert!(
        again
            .iter()
            .all(|c| c.claimed_from == RecordState::Validated)
    );
    for c in &again {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    let counts = ledger.counts().await.unwrap();
    assert_eq!(
        (
            counts.delivered,
            counts.dead_lettered,
            counts.manual_interventions
        ),
        (3, 2, 3)
    );
    // A record that is not a dead letter cannot be replayed.
    let refused = ledger
        .replay_dead_letter(again[0].claim.id, "ana@example.com", "again")
        .await;
    assert!(
        matches!(refused, Err(LedgerError::IllegalTransition { .. })),
        "{refused:?}"
    );
    fixture.assert_lists_mirror_the_records().await;
}

pub async fn approving_and_rejecting_held_records_are_manual_interventions(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch = (0..2)
        .map(|i| record(&format!("h{i}"), json!({"discount": 40 + i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let mut claimed = claim_all(ledger.as_ref(), "w").await;
    claimed.sort_by_key(|c| c.source_key.clone());
    for c in &claimed {
        let hold = Outcome::Held {
            rule: "discount-over-30".into(),
            role: "sinkOwner".into(),
            snapshot: Some(json!({"redacted": true, "key": c.source_key})),
        };
        ledger.complete(c.claim, hold).await.unwrap();
    }
    assert_eq!(ledger.counts().await.unwrap().held, 2);
    let (approve, reject) = (claimed[0].claim.id, claimed[1].claim.id);

    ledger
        .approve_held(
            approve,
            &as_seen(ledger.as_ref(), approve).await,
            "cfo@example.com",
            "strategic account",
        )
        .await
        .unwrap();
    ledger
        .reject_held(
            reject,
            &as_seen(ledger.as_ref(), reject).await,
            "cfo@example.com",
            "discount not agreed",
        )
        .await
        .unwrap();

    let approved = ledger.get(approve).await.unwrap().unwrap();
    assert_eq!(approved.record.state, RecordState::Validated);
    assert_eq!(
        approved.record.approved_by.as_deref(),
        Some("cfo@example.com")
    );
    // The approver saw the snapshot kept with the hold.
    assert_eq!(approved.snapshots.len(), 1);
    assert_eq!(approved.snapshots[0].kind, "held");
    assert_eq!(
        approved.snapshots[0].body,
        json!({"redacted": true, "key": claimed[0].source_key})
    );
    assert_eq!(approved.interventions.len(), 1);
    assert_eq!(approved.interventions[0].action, "approve");
    assert_eq!(approved.interventions[0].actor, "cfo@example.com");
    assert_eq!(approved.interventions[0].reason, "strategic account");
    let rejected = ledger.get(reject).await.unwrap().unwrap();
    assert_eq!(rejected.record.state, RecordState::DeadLettered);
    assert_eq!(rejected.interventions[0].action, "reject");
    assert!(
        rejected
            .record
            .dead_letter_reason
            .unwrap()
            .contains("discount not agreed")
    );

    // An approved record is claimed with its approval, so the worker does not hold it again.
    let next = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].approved_by.as_deref(), Some("cfo@example.com"));
    // Approving something that is not held is an illegal transition, and changes nothing.
    let refused = ledger
        .approve_held(
            reject,
            &as_seen(ledger.as_ref(), reject).await,
            "cfo@example.com",
            "changed my mind",
        )
        .await;
    let Err(error) = refused else {
        panic!("approving a dead letter must fail")
    };
    assert!(
        matches!(
            error,
            LedgerError::IllegalTransition {
                from: RecordState::DeadLettered,
                to: RecordState::Validated,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.label(), "illegal_transition");
    let counts = ledger.counts().await.unwrap();
    assert_eq!(counts.manual_interventions, 2);
    assert_eq!(counts.interventions_per_1000, 1000.0);
    fixture.assert_lists_mirror_the_records().await;
}

pub async fn a_decision_on_a_held_record_is_refused_once_a_new_generation_is_held_for_another_role(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let held_for = |role: &str| Outcome::Held {
        rule: "discount-over-30".into(),
        role: role.into(),
        snapshot: Some(json!({"redacted": true})),
    };
    ledger
        .ingest(vec![record("race", json!({"discount": 40}))])
        .await
        .unwrap();
    let first = claim_all(ledger.as_ref(), "w").await;
    ledger
        .complete(first[0].claim, held_for("sinkOwner"))
        .await
        .unwrap();
    let id = first[0].claim.id;
    // The sink owner checks the record...
    let seen = as_seen(ledger.as_ref(), id).await;
    assert_eq!(
        (seen.generation, seen.hold_role.as_deref()),
        (1, Some("sinkOwner"))
    );
    // ...and before their decision lands the CRM sends a new revision, held for finance this time.
    let stored = ledger
        .ingest(vec![record("race", json!({"discount": 60}))])
        .await
        .unwrap();
    assert!(
        matches!(stored[0], IngestOutcome::Updated { .. }),
        "{stored:?}"
    );
    let second = claim_all(ledger.as_ref(), "w").await;
    ledger
        .complete(second[0].claim, held_for("financeOwner"))
        .await
        .unwrap();

    for decision in ["approve", "reject"] {
        let refused = if decision == "approve" {
            ledger
                .approve_held(id, &seen, "sam@example.com", "looked fine")
                .await
        } else {
            ledger
                .reject_held(id, &seen, "sam@example.com", "looked wrong")
                .await
        };
        let Err(error) = refused else {
            panic!("a {decision} of generation 1 must not land on generation 2")
        };
        assert_eq!(error.label(), "hold_changed", "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(&format!("record {id}"))
                && message.contains("generation 1 is now generation 2")
                && message.contains("financeOwner"),
            "the refusal names the record and what changed: {message}"
        );
    }
    // Nothing was decided: still held, for finance, with no intervention.
    let now = ledger.get(id).await.unwrap().unwrap();
    assert_eq!(now.record.state, RecordState::Held);
    assert_eq!(now.record.hold_role.as_deref(), Some("financeOwner"));
    assert!(now.interventions.is_empty(), "{:?}", now.interventions);
    assert_eq!(ledger.counts().await.unwrap().manual_interventions, 0);

    // A caller that checked the right generation but another role is refused too.
    let wrong_role = ledger::HeldAsSeen {
        generation: now.record.generation,
        hold_role: Some("sinkOwner".into()),
    };
    let refused = ledger
        .approve_held(id, &wrong_role, "sam@example.com", "looked fine")
        .await;
    assert!(
        matches!(refused, Err(LedgerError::HoldChanged { .. })),
        "{refused:?}"
    );
    // What finance checked now is what gets decided.
    let fresh = as_seen(ledger.as_ref(), id).await;
    ledger
        .approve_held(id, &fresh, "cfo@example.com", "agreed")
        .await
        .unwrap();
    let approved = ledger.get(id).await.unwrap().unwrap();
    assert_eq!(approved.record.state, RecordState::Validated);
    assert_eq!(approved.interventions.len(), 1);
}

pub async fn a_records_lineage_tells_its_whole_story(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let mut incoming = record("story", json!({"amount": 5}));
    incoming.correlation_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
    let id = ledger.ingest(vec![incoming]).await.unwrap()[0].id();
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    ledger
        .append_lineage(vec![ledger::NewLineageEvent {
            record: id,
            step: "validated".into(),
            detail: json!({"contract_version": "1.0.0"}),
        }])
        .await
        .unwrap();
    clock.advance(Duration::from_millis(250));
    ledger
        .complete(claimed.claim, Outcome::Delivered)
        .await
        .unwrap();
    let detail = ledger.get(id).await.unwrap().unwrap();
    let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
    assert_eq!(steps, ["received", "claimed", "validated", "delivered"]);
    assert!(
        detail
            .lineage
            .iter()
            .all(|e| e.correlation_id == "4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(detail.record.delivered_at, Some(at(&clock)));
    let delivered = detail.lineage.last().unwrap().clone();
    assert_eq!(
        (delivered.at, delivered.generation, &delivered.detail),
        (at(&clock), 1, &json!({"fence": 1}))
    );
    // A delivered record keeps no snapshot: its payload is in the ledger, and the operations API shows it
    // through the contract's redaction.
    assert!(detail.snapshots.is_empty(), "{:?}", detail.snapshots);
    assert_eq!(detail.record.payload, json!({"amount": 5}));

    // A new revision goes on with the story; the first delivery stays in it, where and as it was.
    clock.advance(Duration::from_millis(250));
    ledger
        .ingest(vec![record("story", json!({"amount": 6}))])
        .await
        .unwrap();
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    assert_eq!(claimed.claim.generation, 2);
    let revised = ledger.get(id).await.unwrap().unwrap();
    let steps: Vec<&str> = revised.lineage.iter().map(|e| e.step.as_str()).collect();
    assert_eq!(
        steps,
        [
            "received",
            "claimed",
            "validated",
            "delivered",
            "updated",
            "claimed"
        ]
    );
    assert_eq!(revised.lineage[3], delivered);
    clock.advance(Duration::from_millis(250));
    ledger
        .complete(claimed.claim, Outcome::Delivered)
        .await
        .unwrap();
    let redelivered = ledger.get(id).await.unwrap().unwrap();
    assert_eq!(redelivered.lineage[..6], revised.lineage[..]);
    let last = &redelivered.lineage[6];
    assert_eq!(
        (last.step.as_str(), last.at, last.generation, &last.detail),
        (
            "delivered",
            at(&clock),
            2,
            &json!({"fence": claimed.claim.fence})
        )
    );
    assert_eq!(redelivered.lineage.len(), 7);
    assert!(
        ledger
            .get(ledger::RecordId(999_999))
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn a_released_claim_returns_to_where_it_was(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger.ingest(vec![record("a", json!({}))]).await.unwrap();
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    // Graceful shutdown with the circuit open: give it back for later, without counting a failure.
    let later = at(&clock) + chrono::Duration::seconds(10);
    ledger
        .complete(
            claimed.claim,
            Outcome::Released {
                not_before: Some(later),
            },
        )
        .await
        .unwrap();
    let view = ledger.get(claimed.claim.id).await.unwrap().unwrap().record;
    assert_eq!(view.state, RecordState::Received);
    assert_eq!(view.lease_owner, None);
    assert!(claim_all(ledger.as_ref(), "w").await.is_empty());
    clock.advance(Duration::from_secs(10));
    assert_eq!(claim_all(ledger.as_ref(), "w").await.len(), 1);
    assert_eq!(ledger.counts().await.unwrap().failed, 0);
    // A completion for a claim that does not exist is refused, not applied.
    let bogus = Claim {
        id: ledger::RecordId(424_242),
        generation: 1,
        fence: 1,
    };
    let result = ledger.complete(bogus, Outcome::Delivered).await;
    assert!(
        matches!(result, Err(LedgerError::NotFound { .. })),
        "{result:?}"
    );
    fixture.assert_lists_mirror_the_records().await;
}

/// A release gives its claim's attempt back: the record was not tried (no delivery slot, a breaker open, a
/// lease too short for the call, shutdown), so however often it is released its next claim is the same attempt,
/// and the policy's attempts are spent only by real ones. Lineage still tells every claim with the attempt it
/// was, in order; a record the intake leased as it stored it gives its attempt back too.
pub async fn a_released_claim_gives_its_attempt_back(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger.ingest(vec![record("a", json!({}))]).await.unwrap();
    let release = Outcome::Released { not_before: None };
    for _ in 0..3 {
        let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
        assert_eq!(claimed.attempts, 1, "a released claim is not an attempt");
        ledger
            .complete(claimed.claim, release.clone())
            .await
            .unwrap();
    }
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    assert_eq!(claimed.attempts, 1);
    ledger
        .complete(
            claimed.claim,
            Outcome::RetryScheduled {
                next_attempt_at: at(&clock),
                error: "erp:503".into(),
                class: ErrorClass::Transient,
            },
        )
        .await
        .unwrap();
    let retried = claim_all(ledger.as_ref(), "w").await.remove(0);
    assert_eq!(retried.attempts, 2, "a failed attempt counts");
    ledger
        .complete(retried.claim, release.clone())
        .await
        .unwrap();
    let again = claim_all(ledger.as_ref(), "w").await.remove(0);
    assert_eq!(again.attempts, 2);
    assert_eq!(again.claimed_from, RecordState::RetryScheduled);
    ledger
        .complete(again.claim, Outcome::Delivered)
        .await
        .unwrap();

    let detail = ledger.get(again.claim.id).await.unwrap().unwrap();
    let story: Vec<(&str, Option<i64>)> = detail
        .lineage
        .iter()
        .map(|e| (e.step.as_str(), e.detail["attempt"].as_i64()))
        .collect();
    let claimed = |n| ("claimed", Some(n));
    let released = ("released", None);
    assert_eq!(
        story,
        [
            ("received", None),
            claimed(1),
            released,
            claimed(1),
            released,
            claimed(1),
            released,
            claimed(1),
            ("retry_scheduled", None),
            claimed(2),
            released,
            claimed(2),
            ("delivered", None),
        ]
    );
    let fences: Vec<i64> = detail
        .lineage
        .iter()
        .filter(|e| e.step == "claimed")
        .map(|e| e.detail["fence"].as_i64().unwrap())
        .collect();
    assert_eq!(fences, [1, 2, 3, 4, 5, 6], "every claim is fenced anew");

    // Leased by the intake as it was stored, then released: claimed again as attempt 1.
    let request = ledger::LeaseRequest {
        worker: "fast".into(),
        buckets: BucketSet::all(),
        limit: 1,
        lease: LEASE,
    };
    let (_, leased) = ledger
        .ingest_and_claim(vec![record("b", json!({}))], &request)
        .await
        .unwrap();
    if let [leased] = &leased[..] {
        assert_eq!(leased.attempts, 1);
        ledger
            .complete(leased.claim, release.clone())
            .await
            .unwrap();
    }
    let b = claim_all(ledger.as_ref(), "w").await.remove(0);
    assert_eq!(b.source_key, "b");
    assert_eq!(b.attempts, 1);
    assert_eq!(ledger.counts().await.unwrap().failed, 1);
    assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
}

pub async fn the_backlog_counts_waiting_records_and_the_oldest_receipt(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    assert_eq!(ledger.backlog().await.unwrap(), (0, None));
    ledger
        .ingest(vec![
            record("a", json!({"n": 1})),
            record("b", json!({"n": 2})),
        ])
        .await
        .unwrap();
    let first_receipt = clock.now_ms();
    clock.advance(Duration::from_secs(5));
    ledger
        .ingest(vec![record("c", json!({"n": 3}))])
        .await
        .unwrap();
    assert_eq!(ledger.backlog().await.unwrap(), (3, Some(first_receipt)));
    // Claimed records still wait (they are in flight); delivered and dead-lettered ones do not.
    let claimed = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(ledger.backlog().await.unwrap(), (3, Some(first_receipt)));
    let (a, rest) = claimed.split_first().unwrap();
    ledger.complete(a.claim, Outcome::Delivered).await.unwrap();
    ledger
        .complete(rest[0].claim, permanent("erp:400"))
        .await
        .unwrap();
    let counts = ledger.counts().await.unwrap();
    assert_eq!(ledger.backlog().await.unwrap().0, counts.pending);
    assert_eq!(counts.pending, 1);
}

/// Runs every promise above as a `#[tokio::test]` against `$fixture()`.
/// `ingest_and_claim` leases only new records, only in the requested buckets, at most the limit; what it
/// leases is claimed as `claim` would (fenced, in lineage) and nobody else claims it; the rest is claimed as
/// usual. A backend without the fast path leases nothing and loses nothing.
pub async fn new_records_can_be_leased_in_the_transaction_that_stores_them(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![
            record("old-same", json!({"v": 1})),
            record("old-changed", json!({"v": 1})),
        ])
        .await
        .unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("new-{i}")).collect();
    // The update and the duplicate come first and are in the requested buckets: only newness keeps them
    // from being leased.
    let wanted: BucketSet = BucketSet::from_buckets(
        keys.iter()
            .take(20)
            .map(|k| bucket_of(k))
            .chain([bucket_of("old-same"), bucket_of("old-changed")]),
    );
    let mut batch: Vec<IncomingRecord> = vec![
        record("old-changed", json!({"v": 2})),
        record("old-same", json!({"v": 1})),
    ];
    batch.extend(keys.iter().map(|k| record(k, json!({"k": k}))));
    let request = ledger::LeaseRequest {
        worker: "fast".into(),
        buckets: wanted,
        limit: 5,
        lease: LEASE,
    };
    let (outcomes, leased) = ledger.ingest_and_claim(batch, &request).await.unwrap();
    assert_eq!(outcomes.len(), 42);
    assert!(matches!(outcomes[0], IngestOutcome::Updated { .. }));
    assert!(matches!(outcomes[1], IngestOutcome::Duplicate { .. }));
    assert_eq!(
        leased.len(),
        5,
        "the limit, on every backend: 20 new records were in the buckets"
    );
    let arrival = |key: &str| keys.iter().position(|k| k == key).unwrap();
    let positions: Vec<usize> = leased.iter().map(|c| arrival(&c.source_key)).collect();
    let first_wanted: Vec<usize> = (0..keys.len())
        .filter(|&i| wanted.contains(bucket_of(&keys[i])))
        .take(5)
        .collect();
    assert_eq!(
        positions, first_wanted,
        "the first new records of the batch in the buckets, in arrival order"
    );
    for claimed in &leased {
        assert!(claimed.source_key.starts_with("new-"), "{claimed:?}");
        assert!(wanted.contains(claimed.bucket));
        assert_eq!((claimed.claim.generation, claimed.claim.fence), (1, 1));
        assert_eq!(claimed.attempts, 1);
        assert_eq!(claimed.claimed_from, RecordState::Received);
        assert_eq!(
            claimed.payload,
            json!({"k": claimed.source_key}).to_string()
        );
        let detail = ledger.get(claimed.claim.id).await.unwrap().unwrap();
        assert_eq!(detail.record.state, RecordState::Delivering);
        assert_eq!(detail.record.lease_owner.as_deref(), Some("fast"));
        let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
        assert_eq!(steps, ["received", "claimed"]);
        // The same event a claim tells of a first attempt.
        let claim = &detail.lineage[1].detail;
        assert_eq!(
            (
                &claim["worker"],
                &claim["fence"],
                &claim["attempt"],
                &claim["taken_over_from"]
            ),
            (&json!("fast"), &json!(1), &json!(1), &Value::Null)
        );
        assert_eq!(
            claim["lease_expires_at"],
            json!(at(&clock).timestamp_millis() + LEASE.as_millis() as i64)
        );
    }
    // Everything else (the other new records, the update and the never-claimed old record) is claimed as
    // usual; the leased ones are not.
    let rest = claim_all(ledger.as_ref(), "other").await;
    assert_eq!(rest.len() + leased.len(), 42);
    let leased_ids: HashSet<_> = leased.iter().map(|c| c.claim.id).collect();
    assert!(rest.iter().all(|c| !leased_ids.contains(&c.claim.id)));
    for claimed in leased.iter().chain(&rest) {
        ledger
            .complete(claimed.claim, Outcome::Delivered)
            .await
            .unwrap();
    }
    let counts = ledger.counts().await.unwrap();
    assert_eq!(
        (counts.records, counts.delivered, counts.pending),
        (42, 42, 0)
    );
    // Each leased record's story, in order, once its row has moved on too (a new revision).
    for claimed in &leased {
        let detail = ledger.get(claimed.claim.id).await.unwrap().unwrap();
        let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
        assert_eq!(steps, ["received", "claimed", "delivered"]);
    }
    let revised = &leased[0];
    ledger
        .ingest(vec![record(&revised.source_key, json!({"k": "revised"}))])
        .await
        .unwrap();
    let detail = ledger.get(revised.claim.id).await.unwrap().unwrap();
    let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
    assert_eq!(steps, ["received", "claimed", "delivered", "updated"]);
    ledger.close().await;
    fixture.assert_lists_mirror_the_records().await;
}

/// Another replica's intake leases only what its own pipeline asked for: what one replica's
/// `ingest_and_claim` stores beyond its limit is claimed by any replica, and the two never hold the same record.
pub async fn records_an_intake_does_not_lease_stay_claimable_by_other_replicas(fixture: Fixture) {
    let clock = clock();
    let intake = fixture.open(clock.clone()).await;
    let other = fixture.open(clock.clone()).await;
    let request = ledger::LeaseRequest {
        worker: "replica-a".into(),
        buckets: BucketSet::all(),
        limit: 8,
        lease: LEASE,
    };
    let batch: Vec<IncomingRecord> = (0..30)
        .map(|i| record(&format!("fair-{i:02}"), json!({"i": i})))
        .collect();
    let (outcomes, leased) = intake.ingest_and_claim(batch, &request).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, IngestOutcome::Received { .. }))
    );
    assert_eq!(leased.len(), 8);
    let taken = claim_all(other.as_ref(), "replica-b").await;
    assert_eq!(taken.len(), 22, "everything replica a did not lease");
    let leased_ids: HashSet<_> = leased.iter().map(|c| c.claim.id).collect();
    assert!(taken.iter().all(|c| !leased_ids.contains(&c.claim.id)));
    // A leased record is not handed out again while its lease lives, and is once it lapses, fenced.
    assert!(claim_all(other.as_ref(), "replica-b").await.is_empty());
    clock.advance(LEASE + Duration::from_secs(1));
    let taken_over = claim_all(other.as_ref(), "replica-b").await;
    let mut taken_over_ids: Vec<_> = taken_over.iter().map(|c| c.claim.id).collect();
    taken_over_ids.sort();
    let mut expected: Vec<_> = leased_ids.iter().copied().collect();
    expected.sort();
    // The 22 claimed by replica b lapsed too; only the leased ones matter here.
    assert!(expected.iter().all(|id| taken_over_ids.contains(id)));
    for claimed in taken_over
        .iter()
        .filter(|c| leased_ids.contains(&c.claim.id))
    {
        assert_eq!(claimed.claim.fence, 2);
    }
    let stale = leased[0].claim;
    assert!(matches!(
        intake.complete(stale, Outcome::Delivered).await,
        Err(LedgerError::LeaseLost { .. })
    ));
    assert_counters_equal_a_recount(intake.as_ref()).await;
    intake.close().await;
    other.close().await;
}

/// Completions and updates of the same records, in opposite orders, at the same time, many rounds: both
/// always succeed. Each backend takes the rows' locks in one order (PostgreSQL: by record id in both paths),
/// so the two wait for each other and never deadlock; a deadlock would surface here as an error (40P01 on
/// PostgreSQL), because the ledger does not retry. The records are stored one at a time in a scrambled
/// order, so their ids follow neither their keys nor the order of either batch: a path that locked by key,
/// or in the order it was given, would deadlock against one that locks by id.
pub async fn concurrent_completions_and_updates_of_the_same_records_never_deadlock(
    fixture: Fixture,
) {
    let clock = clock();
    let completer = fixture.open(clock.clone()).await;
    let intake = fixture.open(clock.clone()).await;
    let keys: Vec<String> = (0..200).map(|i| format!("lock-{i:04}")).collect();
    for i in 0..keys.len() {
        // 73 is prime to 200: every key once, ids unrelated to the keys' order.
        let key = &keys[i * 73 % keys.len()];
        intake
            .ingest(vec![record(key, json!({"round": 0}))])
            .await
            .unwrap();
    }
    for round in 1..=25 {
        let mut claimed = claim_all(completer.as_ref(), "worker").await;
        assert_eq!(claimed.len(), keys.len(), "round {round}");
        // Completions by descending id, updates by descending key, a third order for the update's batch
        // on even rounds: whatever order callers use, the ledger must not deadlock.
        claimed.sort_by_key(|c| std::cmp::Reverse(c.claim.id));
        let completions: Vec<ledger::Completion> = claimed
            .iter()
            .map(|c| ledger::Completion {
                claim: c.claim,
                outcome: Outcome::Delivered,
            })
            .collect();
        let mut updates: Vec<IncomingRecord> = keys
            .iter()
            .rev()
            .map(|k| record(k, json!({"round": round})))
            .collect();
        if round % 2 == 0 {
            let half = updates.len() / 2;
            updates.rotate_left(half);
        }
        let (completed, ingested) = tokio::join!(
            completer.complete_batch(completions),
            intake.ingest(updates)
        );
        let completed = completed.unwrap_or_else(|e| panic!("round {round}: completion: {e:?}"));
        let ingested = ingested.unwrap_or_else(|e| panic!("round {round}: ingest: {e:?}"));
        assert!(
            ingested
                .iter()
                .all(|o| matches!(o, IngestOutcome::Updated { .. })),
            "round {round}"
        );
        // Whichever committed first, every record is now its newest generation, waiting to be claimed.
        assert!(
            completed.iter().all(|r| matches!(
                r,
                CompletionResult::Applied | CompletionResult::Superseded { .. }
            )),
            "round {round}: {completed:?}"
        );
    }
    let counts = assert_counters_equal_a_recount(intake.as_ref()).await;
    assert_eq!((counts.records, counts.pending), (200, 200));
    completer.close().await;
    intake.close().await;
}

/// A ledger that an older meshline (schema version 1, payloads inline in `records`) left with one record
/// in each of two states is migrated at start-up: nothing is lost, payloads move to their own table, and the
/// records carry on through their lifecycle.
pub async fn a_version_1_ledger_is_migrated_with_its_records_and_payloads(fixture: Fixture) {
    let clock = clock();
    let mut v1 = match fixture.backend() {
        "sqlite" => {
            "CREATE TABLE meshline_schema (version INTEGER PRIMARY KEY, description TEXT NOT NULL, \
                     applied_at INTEGER NOT NULL);"
                .to_string()
        }
        _ => {
            "CREATE TABLE meshline_schema (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
              applied_at BIGINT NOT NULL);"
                .to_string()
        }
    };
    for statement in ledger::migration_statements(fixture.backend(), 1).expect("version 1") {
        v1.push_str(statement);
        v1.push_str(";\n");
    }
    v1.push_str(&format!(
        "INSERT INTO meshline_schema VALUES (1, 'version 1', {T0}); \
         INSERT INTO records (flow, source_key, idempotency_key, generation, payload, payload_hash, \
         contract_version, state, next_attempt_at, bucket, correlation_id, received_at, updated_at) VALUES \
         ('{FLOW}', 'old-1', 'Opportunity/old-1', 1, '{{\"amount\":7}}', 'h1', '1.0.0', 'received', {T0}, 3, 'c1', {T0}, {T0}), \
         ('{FLOW}', 'old-2', 'Opportunity/old-2', 1, '{{\"amount\":8}}', 'h2', '1.0.0', 'delivered', {T0}, 4, 'c2', {T0}, {T0});"
    ));
    fixture.execute(&v1).await;

    let ledger = fixture.open(clock.clone()).await;
    let counts = ledger.counts().await.unwrap();
    assert_eq!(
        (counts.records, counts.pending, counts.delivered),
        (2, 1, 1)
    );
    let delivered = ledger
        .list(RecordState::Delivered, None, None, 10)
        .await
        .unwrap();
    assert_eq!(delivered[0].payload, json!({"amount": 8}));
    let claimed = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].payload, r#"{"amount":7}"#);
    ledger
        .complete(claimed[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    // The old record's changed payload is an update in the new table.
    let outcome = ledger
        .ingest(vec![record("old-2", json!({"amount": 9}))])
        .await
        .unwrap();
    assert!(
        matches!(outcome[0], IngestOutcome::Updated { generation: 2, .. }),
        "{outcome:?}"
    );
    let updated = ledger.get(outcome[0].id()).await.unwrap().unwrap();
    assert_eq!(updated.record.payload, json!({"amount": 9}));
    ledger.close().await;
}

/// A revision of record `key` carrying ordering value `ordering` (e.g. a SystemModstamp in µs).
fn revision(key: &str, payload: Value, ordering: Option<i64>) -> IncomingRecord {
    IncomingRecord {
        ordering,
        ..record(key, payload)
    }
}

fn steps(detail: &ledger::RecordDetail) -> Vec<&str> {
    detail.lineage.iter().map(|e| e.step.as_str()).collect()
}

pub async fn an_older_revision_after_a_newer_one_is_stale_and_never_delivered(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    // Revision 2 (10:20) arrives first and is delivered.
    let first = ledger
        .ingest(vec![revision(
            "a",
            json!({"amount": 12, "at": "10:20"}),
            Some(2_000),
        )])
        .await
        .unwrap();
    let id = first[0].id();
    let claimed = claim_all(ledger.as_ref(), "w1").await;
    ledger
        .complete(claimed[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    // Then a delayed retry of revision 1 (10:15), with the source's own correlation id.
    let late = ledger
        .ingest(vec![IncomingRecord {
            correlation_id: Some("late-revision-trace".into()),
            ..revision("a", json!({"amount": 10, "at": "10:15"}), Some(1_000))
        }])
        .await
        .unwrap();
    assert_eq!(
        late,
        vec![IngestOutcome::Stale {
            id,
            stored: 2_000,
            incoming: 1_000,
            correlation_id: "late-revision-trace".into(),
        }]
    );
    let detail = ledger.get(id).await.unwrap().unwrap();
    assert_eq!(detail.record.payload, json!({"amount": 12, "at": "10:20"}));
    assert_eq!(detail.record.generation, 1);
    assert_eq!(detail.record.state, RecordState::Delivered);
    let stale = detail.lineage.last().expect("lineage");
    assert_eq!(stale.step, "stale");
    assert_eq!(stale.correlation_id, "late-revision-trace");
    assert_eq!(
        stale.detail["ordering"],
        json!({"stored": 2_000, "incoming": 1_000})
    );
    assert!(
        claim_all(ledger.as_ref(), "w1").await.is_empty(),
        "nothing to deliver"
    );
    let counts = ledger.counts().await.unwrap();
    assert_eq!((counts.stale, counts.received, counts.delivered), (1, 1, 1));

    // A newer revision is an update as usual, and is delivered.
    let newer = ledger
        .ingest(vec![revision(
            "a",
            json!({"amount": 14, "at": "10:30"}),
            Some(3_000),
        )])
        .await
        .unwrap();
    assert!(
        matches!(newer[0], IngestOutcome::Updated { generation: 2, .. }),
        "{newer:?}"
    );
    let claimed = claim_all(ledger.as_ref(), "w1").await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        serde_json::from_str::<Value>(&claimed[0].payload).unwrap(),
        json!({"amount": 14, "at": "10:30"})
    );
    // Stale counts survive reopening (they are in the ledger, not in memory).
    ledger.close().await;
    let reopened = fixture.open(clock.clone()).await;
    assert_eq!(reopened.counts().await.unwrap().stale, 1);
    reopened.close().await;
}

pub async fn equal_ordering_values_apply_in_arrival_order_flagged_as_a_tie(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![revision("a", json!({"amount": 10}), Some(1_000))])
        .await
        .unwrap();
    let tie = ledger
        .ingest(vec![revision("a", json!({"amount": 11}), Some(1_000))])
        .await
        .unwrap();
    assert!(
        matches!(tie[0], IngestOutcome::Updated { generation: 2, .. }),
        "{tie:?}"
    );
    let detail = ledger.get(tie[0].id()).await.unwrap().unwrap();
    assert_eq!(detail.record.payload, json!({"amount": 11}));
    assert_eq!(steps(&detail), ["received", "updated", "ordering_tie"]);
    let flagged = detail.lineage.last().unwrap();
    assert_eq!(flagged.detail["ordering"], json!(1_000));
    assert_eq!(flagged.generation, 2);
    // The same payload again is a duplicate, not a tie.
    let again = ledger
        .ingest(vec![revision("a", json!({"amount": 11}), Some(1_000))])
        .await
        .unwrap();
    assert!(
        matches!(again[0], IngestOutcome::Duplicate { .. }),
        "{again:?}"
    );
    assert_eq!(ledger.counts().await.unwrap().stale, 0);
}

pub async fn revisions_out_of_order_in_one_batch_keep_the_newest(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let outcomes = ledger
        .ingest(vec![
            revision("a", json!({"amount": 12}), Some(2_000)),
            revision("b", json!({"amount": 1}), Some(1_000)),
            revision("a", json!({"amount": 10}), Some(1_000)),
            revision("b", json!({"amount": 2}), Some(2_000)),
        ])
        .await
        .unwrap();
    assert!(
        matches!(outcomes[0], IngestOutcome::Received { .. }),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[1], IngestOutcome::Received { .. }),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            &outcomes[2],
            IngestOutcome::Stale {
                id,
                stored: 2_000,
                incoming: 1_000,
                ..
            } if *id == outcomes[0].id()
        ),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[3], IngestOutcome::Updated { generation: 2, .. }),
        "{outcomes:?}"
    );
    let a = ledger.get(outcomes[0].id()).await.unwrap().unwrap();
    let b = ledger.get(outcomes[1].id()).await.unwrap().unwrap();
    assert_eq!(a.record.payload, json!({"amount": 12}));
    assert_eq!(b.record.payload, json!({"amount": 2}));
    assert_eq!(ledger.counts().await.unwrap().stale, 1);

    // A revision without an ordering value follows arrival order, and never lowers the stored value: a
    // later revision older than the newest ordered one is still stale.
    let unordered = ledger
        .ingest(vec![revision("a", json!({"amount": 13}), None)])
        .await
        .unwrap();
    assert!(
        matches!(unordered[0], IngestOutcome::Updated { .. }),
        "{unordered:?}"
    );
    let late = ledger
        .ingest(vec![revision("a", json!({"amount": 11}), Some(1_500))])
        .await
        .unwrap();
    assert!(
        matches!(
            late[0],
            IngestOutcome::Stale {
                stored: 2_000,
                incoming: 1_500,
                ..
            }
        ),
        "{late:?}"
    );
}

/// Asserts that the counters the ledger keeps equal the aggregate over every record. `last_delivery_at` is
/// the time of the last delivery ever, which a recount cannot see once a delivered record was updated, so
/// it is only bounded by it.
pub async fn assert_counters_equal_a_recount(ledger: &dyn Ledger) -> ledger::Counts {
    let kept = ledger.counts().await.expect("counts");
    let recount = ledger.recount().await.expect("recount");
    assert!(
        kept.last_delivery_at >= recount.last_delivery_at,
        "kept last delivery {:?} before the recount's {:?}",
        kept.last_delivery_at,
        recount.last_delivery_at
    );
    let mut comparable = kept.clone();
    comparable.last_delivery_at = recount.last_delivery_at;
    assert_eq!(
        comparable, recount,
        "the kept counters (left) differ from a full recount (right)"
    );
    kept
}

pub fn retry_in(clock: &ManualClock, secs: i64) -> Outcome {
    Outcome::RetryScheduled {
        next_attempt_at: at(clock) + chrono::Duration::seconds(secs),
        error: "503 from the ERP".into(),
        class: ErrorClass::Transient,
    }
}

/// Every kind of state change the ledger makes, manual actions and a lease taken over included, and the
/// counters it keeps in the same transactions still equal a recount at every step.
pub async fn counters_equal_a_recount_after_a_mixed_workload(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch = (0..30)
        .map(|i| record(&format!("m{i:02}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    // Duplicates and updates, two versions of one key in one batch among them.
    ledger
        .ingest(vec![
            record("m00", json!({"i": 0})),
            record("m01", json!({"i": 100})),
            record("m01", json!({"i": 101})),
        ])
        .await
        .unwrap();
    assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    let mut claimed = claim_all(ledger.as_ref(), "w1").await;
    claimed.sort_by_key(|c| c.source_key.clone());
    assert_eq!(claimed.len(), 30);
    for (i, c) in claimed.iter().enumerate() {
        let outcome = match i % 5 {
            0 | 1 => Outcome::Delivered,
            2 => retry_in(&clock, 10),
            3 => permanent("unknown item"),
            _ => Outcome::Held {
                rule: "discount-over-30".into(),
                role: "sinkOwner".into(),
                snapshot: Some(json!({"redacted": true})),
            },
        };
        ledger.complete(c.claim, outcome).await.unwrap();
    }
    assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    // Manual actions: approve one hold, reject another, replay two dead letters (one by reason).
    let holds = ledger
        .list(RecordState::Held, None, None, 100)
        .await
        .unwrap();
    ledger
        .approve_held(
            holds[0].id,
            &as_seen(ledger.as_ref(), holds[0].id).await,
            "cfo@example.com",
            "ok",
        )
        .await
        .unwrap();
    ledger
        .reject_held(
            holds[1].id,
            &as_seen(ledger.as_ref(), holds[1].id).await,
            "cfo@example.com",
            "no",
        )
        .await
        .unwrap();
    let dead = ledger
        .list(RecordState::DeadLettered, None, None, 100)
        .await
        .unwrap();
    ledger
        .replay_dead_letter(dead[0].id, "ana@example.com", "fixed")
        .await
        .unwrap();
    ledger
        .replay_dead_letters_by_reason("unknown item", "ana@example.com", "item created")
        .await
        .unwrap();
    assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    // A delivered record changes at the source (a new generation), and another one fails then recovers.
    ledger
        .ingest(vec![record("m00", json!({"i": -1}))])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(10));
    // Worker 1 claims everything due and dies; its leases expire and worker 2 takes them over.
    let lost = claim_all(ledger.as_ref(), "w1").await;
    assert!(!lost.is_empty());
    clock.advance(LEASE + Duration::from_secs(1));
    let taken = claim_all(ledger.as_ref(), "w2").await;
    assert_eq!(taken.len(), lost.len());
    for c in &lost {
        let refused = ledger.complete(c.claim, Outcome::Delivered).await;
        assert!(
            matches!(refused, Err(LedgerError::LeaseLost { .. })),
            "{refused:?}"
        );
    }
    for (i, c) in taken.iter().enumerate() {
        let outcome = match i % 3 {
            0 => Outcome::Delivered,
            1 => retry_in(&clock, 5),
            _ => Outcome::Released { not_before: None },
        };
        ledger.complete(c.claim, outcome).await.unwrap();
    }
    assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    clock.advance(Duration::from_secs(5));
    for c in claim_all(ledger.as_ref(), "w2").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    assert_eq!(counts.records, 30);
    assert_eq!(
        counts.received, 33,
        "30 records, two updates of m01 and one of m00"
    );
    assert_eq!(counts.manual_interventions, 2 + 6);
    assert!(counts.mttr_seconds.is_some(), "{counts:?}");
    // The counts survive a restart: they are rows, not memory.
    ledger.close().await;
    let reopened = fixture.open(clock.clone()).await;
    assert_eq!(reopened.counts().await.unwrap(), counts);
    reopened.close().await;
}

/// The failure rate the SLA is checked against covers the last hour: an outage's failures stop counting an
/// hour later, while the all-time totals keep them.
/// The worker's path (new records leased as they are stored, delivered at the first attempt, a claim of
/// the ones the intake did not lease) keeps the counters and the failure-rate window exact, and a statement
/// written by hand behind the ledger's back is counted too: on SQLite the hottest statements count their own
/// rows and the triggers count every other statement (schema version 12).
pub async fn counters_stay_exact_on_the_workers_path_and_for_statements_written_by_hand(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let request = ledger::LeaseRequest {
        worker: "w".into(),
        buckets: BucketSet::all(),
        limit: 15,
        lease: LEASE,
    };
    let batch = (0..20)
        .map(|i| record(&format!("f{i:02}"), json!({"i": i})))
        .collect();
    let (_, leased) = ledger.ingest_and_claim(batch, &request).await.unwrap();
    assert_eq!(leased.len(), 15);
    let stored = assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    assert_eq!(
        (
            stored.records,
            stored.received,
            stored.pending,
            stored.received_last_hour
        ),
        (20, 20, 20, 20)
    );
    let mut claimed = leased;
    claimed.extend(claim_all(ledger.as_ref(), "w").await);
    assert_eq!(claimed.len(), 20);
    clock.advance(Duration::from_secs(2));
    let mut completions: Vec<ledger::Completion> = claimed
        .iter()
        .map(|c| ledger::Completion {
            claim: c.claim,
            outcome: Outcome::Delivered,
        })
        .collect();
    // One of them fails first and is delivered on its retry: its recovery time counts toward MTTR. And one
    // delivery is reported twice in the batch: the second one is refused, as it would be one by one.
    completions[0].outcome = retry_in(&clock, 1);
    completions.push(ledger::Completion {
        claim: claimed[7].claim,
        outcome: Outcome::Delivered,
    });
    let results = ledger.complete_batch(completions).await.unwrap();
    assert_eq!(results.len(), 21);
    assert!(
        results[..20]
            .iter()
            .all(|r| *r == CompletionResult::Applied),
        "{results:?}"
    );
    assert_ne!(results[20], CompletionResult::Applied);
    clock.advance(Duration::from_secs(1));
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    let delivered = assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    assert_eq!(
        (
            delivered.delivered,
            delivered.pending,
            delivered.failed,
            delivered.failed_last_hour
        ),
        (20, 0, 1, 1)
    );
    assert_eq!(delivered.mttr_seconds, Some(1.0), "{delivered:?}");
    assert_eq!(
        delivered.last_delivery_at.map(|t| t.timestamp_millis()),
        Some(at(&clock).timestamp_millis())
    );
    // Behind the ledger's back: a delivered record sent back to wait, another one dead-lettered, and one
    // deleted outright. The ledger still counts what the rows say.
    fixture
        .execute(
            "UPDATE records SET state = 'received', lease_owner = NULL WHERE source_key = 'f03'; \
             UPDATE records SET state = 'dead_lettered', dead_letter_reason = 'by hand' WHERE source_key = 'f04'; \
             DELETE FROM payloads WHERE record_id IN (SELECT id FROM records WHERE source_key = 'f05'); \
             DELETE FROM lineage WHERE record_id IN (SELECT id FROM records WHERE source_key = 'f05'); \
             DELETE FROM records WHERE source_key = 'f05';",
        )
        .await;
    let by_hand = assert_counters_equal_a_recount(ledger.as_ref()).await;
    fixture.assert_lists_mirror_the_records().await;
    assert_eq!(
        (
            by_hand.records,
            by_hand.delivered,
            by_hand.pending,
            by_hand.dead_lettered
        ),
        (19, 17, 1, 1)
    );
}

pub async fn the_failure_rate_window_forgets_an_outage_an_hour_later(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch = (0..10)
        .map(|i| record(&format!("o{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    // The ERP is down: every record fails once.
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger
            .complete(c.claim, retry_in(&clock, 60))
            .await
            .unwrap();
    }
    let during = ledger.counts().await.unwrap();
    assert_eq!(
        (during.received_last_hour, during.failed_last_hour),
        (10, 10)
    );
    clock.advance(Duration::from_secs(60));
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    // Half an hour on, the outage is still inside the window.
    clock.advance(Duration::from_secs(29 * 60));
    let half = ledger.counts().await.unwrap();
    assert_eq!((half.received_last_hour, half.failed_last_hour), (10, 10));
    // An hour after the outage, clean traffic only.
    clock.advance(Duration::from_secs(31 * 60));
    let batch = (0..5)
        .map(|i| record(&format!("p{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    let after = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!((after.received_last_hour, after.failed_last_hour), (5, 0));
    assert_eq!(
        (after.received, after.failed),
        (15, 10),
        "all-time totals keep the outage"
    );
    // The purge drops the minutes that left the window; the window reads the same.
    ledger
        .purge(&ledger::Retention::default(), 500)
        .await
        .unwrap();
    let pruned = ledger.counts().await.unwrap();
    assert_eq!((pruned.received_last_hour, pruned.failed_last_hour), (5, 0));
    ledger.close().await;
}

/// Past the delivered retention a record keeps only its compact row: its payload, snapshots and lineage
/// go, a duplicate is still recognised and a changed payload is still delivered as an update.
pub async fn delivered_payloads_are_purged_after_retention_and_duplicates_still_recognised(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let retention = ledger::Retention {
        dead_letters: None,
        delivered: Some(Duration::from_secs(7 * 24 * 3600)),
        resolved_tickets: None,
    };
    let batch = (0..3)
        .map(|i| record(&format!("d{i}"), json!({"amount": i})))
        .collect();
    let ids: Vec<_> = ledger
        .ingest(batch)
        .await
        .unwrap()
        .iter()
        .map(IngestOutcome::id)
        .collect();
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    // A record still waiting is never purged, whatever its age.
    ledger
        .ingest(vec![record("waiting", json!({"amount": 9}))])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(6 * 24 * 3600));
    assert!(
        ledger.purge(&retention, 500).await.unwrap().is_empty(),
        "inside the retention"
    );
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    // Two at a time: batches are bounded.
    assert_eq!(ledger.purge(&retention, 2).await.unwrap().payloads, 2);
    assert_eq!(ledger.purge(&retention, 2).await.unwrap().payloads, 1);
    assert!(ledger.purge(&retention, 2).await.unwrap().is_empty());
    let compact = ledger
        .get(ids[0])
        .await
        .unwrap()
        .expect("the compact row stays");
    assert_eq!(compact.record.state, RecordState::Delivered);
    assert_eq!(compact.record.payload, Value::Null);
    assert!(compact.lineage.is_empty(), "{:?}", compact.lineage);
    let outcome = compact.record.outcome.clone().expect("a one-line outcome");
    assert!(
        outcome.contains("delivered generation 1 as SO-d0"),
        "{outcome}"
    );
    // The CRM re-sends d0 unchanged: a duplicate, nothing to deliver.
    let again = ledger
        .ingest(vec![record("d0", json!({"amount": 0}))])
        .await
        .unwrap();
    assert!(
        matches!(&again[..], [IngestOutcome::Duplicate { id, .. }] if *id == ids[0]),
        "{again:?}"
    );
    // d1 changes: an update, delivered again with its new payload.
    let changed = ledger
        .ingest(vec![record("d1", json!({"amount": 11}))])
        .await
        .unwrap();
    assert!(
        matches!(changed[0], IngestOutcome::Updated { generation: 2, .. }),
        "{changed:?}"
    );
    let mut claimed = claim_all(ledger.as_ref(), "w").await;
    claimed.sort_by_key(|c| c.source_key.clone());
    let keys: Vec<&str> = claimed.iter().map(|c| c.source_key.as_str()).collect();
    assert_eq!(keys, ["d1", "waiting"]);
    assert_eq!(claimed[0].payload, r#"{"amount":11}"#);
    let updated = ledger.get(ids[1]).await.unwrap().unwrap().record;
    assert_eq!(
        (updated.outcome, updated.payload),
        (None, json!({"amount": 11}))
    );
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(counts.payloads_purged, 3);
    assert_eq!(counts.records, 4);
    ledger.close().await;
    fixture.assert_lists_mirror_the_records().await;
}

/// Dead letters older than `deadLetterRetention` leave the ledger whole; the purge is counted, is no
/// intervention, and the interventions made on them stay in the flow's history.
pub async fn dead_letters_are_purged_after_their_retention(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let retention = ledger::Retention {
        dead_letters: Some(Duration::from_secs(14 * 24 * 3600)),
        delivered: None,
        resolved_tickets: None,
    };
    let batch = (0..3)
        .map(|i| record(&format!("x{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let mut claimed = claim_all(ledger.as_ref(), "w").await;
    claimed.sort_by_key(|c| c.source_key.clone());
    ledger
        .complete(claimed[0].claim, permanent("unknown item"))
        .await
        .unwrap();
    let hold = Outcome::Held {
        rule: "discount-over-30".into(),
        role: "sinkOwner".into(),
        snapshot: None,
    };
    ledger.complete(claimed[1].claim, hold).await.unwrap();
    ledger
        .reject_held(
            claimed[1].claim.id,
            &as_seen(ledger.as_ref(), claimed[1].claim.id).await,
            "cfo@example.com",
            "not agreed",
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(10 * 24 * 3600));
    // A dead letter of day 10 is younger than the retention when the first two expire.
    ledger
        .complete(claimed[2].claim, permanent("unknown item"))
        .await
        .unwrap();
    let before = ledger.counts().await.unwrap();
    assert_eq!((before.dead_lettered, before.manual_interventions), (3, 1));
    clock.advance(Duration::from_secs(5 * 24 * 3600));
    let report = ledger.purge(&retention, 500).await.unwrap();
    assert_eq!(report.dead_letters, 2);
    assert!(ledger.get(claimed[0].claim.id).await.unwrap().is_none());
    assert!(ledger.get(claimed[1].claim.id).await.unwrap().is_none());
    let left = ledger
        .list(RecordState::DeadLettered, None, None, 10)
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, claimed[2].claim.id);
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(counts.dead_letters_purged, 2);
    assert_eq!(counts.dead_lettered, 1);
    assert_eq!(
        counts.manual_interventions, 1,
        "the purge is no intervention"
    );
    ledger.close().await;
    fixture.assert_lists_mirror_the_records().await;
}

/// A ledger that the previous version (schema 3, no kept counters) left is migrated with its counters
/// backfilled from its rows: an upgraded flow's `/status` is right at once.
pub async fn a_version_3_ledger_is_migrated_with_its_counters_backfilled(fixture: Fixture) {
    let clock = clock();
    let mut v3 = match fixture.backend() {
        "sqlite" => {
            "CREATE TABLE meshline_schema (version INTEGER PRIMARY KEY, description TEXT NOT NULL, \
                     applied_at INTEGER NOT NULL);"
                .to_string()
        }
        _ => {
            "CREATE TABLE meshline_schema (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
              applied_at BIGINT NOT NULL);"
                .to_string()
        }
    };
    for version in 1..=3 {
        for statement in
            ledger::migration_statements(fixture.backend(), version).expect("a version")
        {
            v3.push_str(statement);
            v3.push_str(";\n");
        }
        v3.push_str(&format!(
            "INSERT INTO meshline_schema VALUES ({version}, 'v{version}', {T0});\n"
        ));
    }
    let t1 = T0 + 60_000;
    let rows = [
        // (key, generation, state, retries, first_failure_at, delivered_at)
        (
            "a",
            1,
            "received",
            0,
            "NULL".to_string(),
            "NULL".to_string(),
        ),
        ("b", 2, "delivered", 0, "NULL".into(), t1.to_string()),
        (
            "c",
            1,
            "delivered",
            2,
            T0.to_string(),
            (T0 + 90_000).to_string(),
        ),
        ("d", 3, "dead_lettered", 1, T0.to_string(), "NULL".into()),
        ("e", 1, "held", 0, "NULL".into(), "NULL".into()),
        ("f", 1, "retry_scheduled", 1, t1.to_string(), "NULL".into()),
    ];
    for (i, (key, generation, state, retries, failed, delivered)) in rows.iter().enumerate() {
        v3.push_str(&format!(
            "INSERT INTO records (id, flow, source_key, idempotency_key, generation, payload_hash, \
             contract_version, state, retries, next_attempt_at, bucket, correlation_id, received_at, updated_at, \
             first_failure_at, delivered_at) VALUES ({id}, '{FLOW}', '{key}', 'Opportunity/{key}', {generation}, \
             'h{key}', '1.0.0', '{state}', {retries}, {T0}, 1, 'c{key}', {T0}, {T0}, {failed}, {delivered});\n\
             INSERT INTO payloads (record_id, body) VALUES ({id}, '{{}}');\n",
            id = i + 1
        ));
    }
    v3.push_str(&format!(
        "INSERT INTO interventions (flow, record_id, action, actor, reason, at) VALUES \
         ('{FLOW}', 4, 'replay', 'ana', 'fixed', {T0}), ('{FLOW}', 4, 'reject', 'ana', 'no', {T0});\n"
    ));
    fixture.execute(&v3).await;

    let ledger = fixture.open(clock.clone()).await;
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(counts.records, 6);
    assert_eq!(counts.received, 9);
    assert_eq!(counts.delivered, 2);
    assert_eq!(counts.failed, 3);
    assert_eq!(counts.retried, 4);
    assert_eq!(
        (counts.dead_lettered, counts.held, counts.pending),
        (1, 1, 2)
    );
    assert_eq!(counts.mttr_seconds, Some(90.0));
    assert_eq!(counts.manual_interventions, 2);
    assert_eq!(
        counts.last_delivery_at,
        Some(at(&clock) + chrono::Duration::seconds(90))
    );
    // And the triggers carry on from there.
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    let after = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!((after.delivered, after.pending), (4, 0));
    ledger.close().await;
}

/// The counters written by connections that have since closed (a restarted replica's) are folded together
/// by the purge, and still sum to a recount; the connections of the new ledger carry on from there.
pub async fn counters_written_by_closed_connections_still_add_up(fixture: Fixture) {
    let clock = clock();
    for round in 0..3 {
        let ledger = fixture.open(clock.clone()).await;
        let batch = (0..20)
            .map(|i| record(&format!("r{round}-{i}"), json!({"i": i})))
            .collect();
        ledger.ingest(batch).await.unwrap();
        for (i, c) in claim_all(ledger.as_ref(), "w")
            .await
            .into_iter()
            .enumerate()
        {
            let outcome = if i % 4 == 0 {
                retry_in(&clock, 1)
            } else {
                Outcome::Delivered
            };
            ledger.complete(c.claim, outcome).await.unwrap();
        }
        ledger
            .purge(&ledger::Retention::default(), 500)
            .await
            .unwrap();
        assert_counters_equal_a_recount(ledger.as_ref()).await;
        ledger.close().await;
    }
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .purge(&ledger::Retention::default(), 500)
        .await
        .unwrap();
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(
        (counts.records, counts.delivered, counts.pending),
        (60, 45, 15)
    );
    ledger.close().await;
}

/// The preflight replay reads the newest records' current payloads, newest first and bounded; records reduced
/// to compact rows after the delivered retention have no payload to replay and are skipped.
pub async fn a_replay_reads_the_newest_kept_payloads_newest_first(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(
            (0..2)
                .map(|i| record(&format!("r{i}"), json!({"amount": i})))
                .collect(),
        )
        .await
        .unwrap();
    for c in claim_all(ledger.as_ref(), "w").await {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    clock.advance(Duration::from_secs(3600));
    let retention = ledger::Retention {
        dead_letters: None,
        delivered: Some(Duration::from_secs(60)),
        resolved_tickets: None,
    };
    assert_eq!(ledger.purge(&retention, 10).await.unwrap().payloads, 2);
    ledger
        .ingest(
            (2..5)
                .map(|i| record(&format!("r{i}"), json!({"amount": i})))
                .collect(),
        )
        .await
        .unwrap();
    // r3 changes: its current payload is replayed, in its record's place.
    ledger
        .ingest(vec![record("r3", json!({"amount": 33}))])
        .await
        .unwrap();

    let all = ledger.recent_inputs(10).await.unwrap();
    let keys: Vec<&str> = all.iter().map(|r| r.source_key.as_str()).collect();
    assert_eq!(keys, ["r4", "r3", "r2"]);
    assert_eq!(all[1].payload, r#"{"amount":33}"#);
    assert_eq!(all[0].state, RecordState::Received);
    assert_eq!(all[0].contract_version, "1.0.0");
    let two = ledger.recent_inputs(2).await.unwrap();
    assert_eq!(two, all[..2]);
    for limit in [0, ledger::MAX_REPLAY_RECORDS + 1] {
        let err = ledger.recent_inputs(limit).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("a replay reads 1 to 100000 records"),
            "{err}"
        );
    }
    ledger.close().await;
}

/// The measures of `revision` over `[T0 + from_s, T0 + to_s)`.
async fn measures(
    ledger: &dyn Ledger,
    revision: &str,
    from_s: i64,
    to_s: i64,
) -> ledger::RevisionMeasures {
    let time = |s: i64| DateTime::from_timestamp_millis(T0 + s * 1000).expect("valid time");
    ledger
        .revision_measures(revision, time(from_s), time(to_s))
        .await
        .expect("revision measures")
}

pub async fn completions_are_attributed_to_the_revision_of_the_handle_that_wrote_them(
    fixture: Fixture,
) {
    let clock = clock();
    // `meshline dev` runs both tracks in one process: two handles on one ledger, one revision each.
    let stable = fixture.open(clock.clone()).await;
    let canary = fixture.open(clock.clone()).await;
    stable.attribute_to("v1").unwrap();
    canary.attribute_to("v2").unwrap();
    assert_eq!(
        (stable.revision(), canary.revision()),
        (Some("v1"), Some("v2"))
    );
    stable
        .attribute_to("v1")
        .expect("the same revision again is a no-op");
    let other = stable.attribute_to("v2").unwrap_err().to_string();
    assert!(
        other.contains("revision") && other.contains("v1"),
        "{other}"
    );
    let empty = canary.attribute_to("").unwrap_err().to_string();
    assert!(empty.contains("revision"), "{empty}");

    let batch = (0..5)
        .map(|i| record(&format!("k{i}"), json!({"i": i})))
        .collect();
    stable.ingest(batch).await.unwrap();
    let mut claimed = stable
        .claim("stable-0", &BucketSet::all(), 3, LEASE)
        .await
        .unwrap();
    let mut canary_claims = canary
        .claim("canary-0", &BucketSet::all(), 2, LEASE)
        .await
        .unwrap();
    clock.advance(Duration::from_millis(40));
    stable
        .complete(claimed.remove(0).claim, Outcome::Delivered)
        .await
        .unwrap();
    stable
        .complete(claimed.remove(0).claim, Outcome::Delivered)
        .await
        .unwrap();
    stable
        .complete(
            claimed.remove(0).claim,
            Outcome::Held {
                rule: "discount-over-20".into(),
                role: "finance".into(),
                snapshot: None,
            },
        )
        .await
        .unwrap();
    let retry = Outcome::RetryScheduled {
        next_attempt_at: at(&clock) + chrono::Duration::seconds(1),
        error: "503".into(),
        class: ErrorClass::Transient,
    };
    canary
        .complete(canary_claims.remove(0).claim, retry)
        .await
        .unwrap();
    canary
        .complete(canary_claims.remove(0).claim, permanent("unknown item"))
        .await
        .unwrap();

    let v1 = measures(stable.as_ref(), "v1", 0, 60).await;
    assert_eq!(
        (
            v1.records,
            v1.delivered,
            v1.failed,
            v1.dead_lettered,
            v1.held
        ),
        (3, 2, 0, 0, 1),
        "{v1:?}"
    );
    assert_eq!(v1.p99_ms, Some(50), "both deliveries took 40 ms: {v1:?}");
    // Either handle reads any revision: the window lives in the shared ledger.
    let v2 = measures(stable.as_ref(), "v2", 0, 60).await;
    assert_eq!(
        (
            v2.records,
            v2.delivered,
            v2.failed,
            v2.dead_lettered,
            v2.held
        ),
        (2, 0, 2, 1, 0),
        "{v2:?}"
    );
    assert_eq!(v2.p99_ms, None, "no deliveries, no latency");
    assert_eq!(v2.latency.len(), ledger::LATENCY_BOUNDS_MS.len() + 1);
    assert!(v2.latency.iter().all(|(_, n)| *n == 0));
    assert_eq!(measures(canary.as_ref(), "v3", 0, 60).await.records, 0);

    // A handle without a revision (the CLI) writes no window rows.
    let cli = fixture.open(clock.clone()).await;
    assert_eq!(cli.revision(), None);
    clock.advance(Duration::from_secs(2));
    let again = claim_all(cli.as_ref(), "cli").await;
    assert_eq!(again.len(), 1, "the retried record is due again");
    cli.complete(again[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    assert_eq!(measures(cli.as_ref(), "v2", 0, 60).await, v2);
    for handle in [stable, canary, cli] {
        handle.close().await;
    }
}

pub async fn revision_measures_count_only_their_window_and_survive_reopening(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger.attribute_to("v7").unwrap();
    let batch = (0..100)
        .map(|i| record(&format!("k{i:03}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let mut claimed = claim_all(ledger.as_ref(), "w").await;
    assert_eq!(claimed.len(), 100);
    // A known distribution: 98 deliveries at 7 ms, one at 300 ms (T0's slot), one at 90 s (slot 9).
    clock.advance(Duration::from_millis(7));
    let first: Vec<_> = claimed
        .drain(..98)
        .map(|c| ledger::Completion {
            claim: c.claim,
            outcome: Outcome::Delivered,
        })
        .collect();
    let results = ledger.complete_batch(first).await.unwrap();
    assert!(results.iter().all(|r| *r == CompletionResult::Applied));
    clock.advance(Duration::from_millis(293));
    ledger
        .complete(claimed.remove(0).claim, Outcome::Delivered)
        .await
        .unwrap();
    // The lease ran out, but nobody took the record over, so its holder may still complete.
    clock.advance(Duration::from_millis(89_700));
    ledger
        .complete(claimed.remove(0).claim, Outcome::Delivered)
        .await
        .unwrap();

    let whole = measures(ledger.as_ref(), "v7", 0, 100).await;
    assert_eq!((whole.records, whole.delivered), (100, 100));
    assert_eq!(whole.latency[1], (10, 98));
    assert_eq!(whole.latency[6], (500, 1));
    assert_eq!(whole.latency.last().copied(), Some((u64::MAX, 1)));
    assert_eq!(
        whole.p99_ms,
        Some(500),
        "the 99th of 100 deliveries is in the 500 ms bucket"
    );
    // Window boundaries: [since, until) by 10-second slots.
    assert_eq!(measures(ledger.as_ref(), "v7", 0, 10).await.records, 99);
    assert_eq!(measures(ledger.as_ref(), "v7", 10, 90).await.records, 0);
    let last = measures(ledger.as_ref(), "v7", 90, 100).await;
    assert_eq!((last.records, last.p99_ms), (1, Some(i64::MAX)), "{last:?}");
    assert_eq!(measures(ledger.as_ref(), "v7", 0, 90).await.records, 99);
    assert_eq!(measures(ledger.as_ref(), "v7", 100, 200).await.records, 0);
    ledger.close().await;
    drop(ledger);

    let reopened = fixture.open(clock.clone()).await;
    assert_eq!(
        measures(reopened.as_ref(), "v7", 0, 100).await,
        whole,
        "the measures come from the ledger, not from memory"
    );
    // Slots older than the retention are pruned with the event minutes.
    clock.advance(Duration::from_secs(8 * 24 * 3600));
    reopened
        .purge(&ledger::Retention::default(), 100)
        .await
        .unwrap();
    assert_eq!(measures(reopened.as_ref(), "v7", 0, 100).await.records, 0);
    reopened.close().await;
}

pub async fn released_leases_go_back_fenced_and_are_delivered_once(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let batch = (0..4)
        .map(|i| record(&format!("k{i}"), json!({"i": i})))
        .collect();
    ledger.ingest(batch).await.unwrap();
    let claim_one = |worker: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .claim(worker, &BucketSet::all(), 1, LEASE)
                .await
                .unwrap()
                .remove(0)
        }
    };
    let canary = claim_one("meshline-f-canary-7d9f-x2").await;
    // `_` and `%` in a prefix match themselves, and case matters: neither of these is released.
    let lookalike = claim_one("meshline-f-canaryZ7d9f").await;
    let shouting = claim_one("MESHLINE-F-CANARY-7d9f").await;
    let stable = claim_one("meshline-f-6c4b-q1").await;

    let empty = ledger.release_leases("").await.unwrap_err().to_string();
    assert!(empty.contains("owner_prefix"), "{empty}");
    assert_eq!(
        ledger.release_leases("meshline-f-canary_").await.unwrap(),
        0
    );
    assert_eq!(
        ledger.release_leases("meshline-f-canary%").await.unwrap(),
        0
    );
    assert_eq!(
        ledger.release_leases("meshline-f-canary-").await.unwrap(),
        1
    );
    assert_eq!(
        ledger.release_leases("meshline-f-canary-").await.unwrap(),
        0,
        "nothing left to release"
    );

    // The released record is claimable at once (the others are still leased) ...
    let taken = claim_all(ledger.as_ref(), "meshline-f-6c4b-q1").await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].claim.id, canary.claim.id);
    assert_eq!(taken[0].claimed_from, RecordState::Received);
    // ... and the canary's late completion is refused, whoever holds the record now.
    let late = ledger.complete(canary.claim, Outcome::Delivered).await;
    assert!(
        matches!(late, Err(LedgerError::LeaseLost { .. })),
        "{late:?}"
    );
    ledger
        .complete(taken[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    let detail = ledger.get(canary.claim.id).await.unwrap().unwrap();
    assert_eq!(detail.record.state, RecordState::Delivered);
    let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
    assert_eq!(
        steps.iter().filter(|s| **s == "delivered").count(),
        1,
        "delivered once: {steps:?}"
    );
    assert!(steps.contains(&"lease_released"), "{steps:?}");
    for untouched in [&lookalike, &stable, &shouting] {
        let view = ledger
            .get(untouched.claim.id)
            .await
            .unwrap()
            .unwrap()
            .record;
        assert_eq!(view.state, RecordState::Delivering);
        assert!(view.lease_owner.is_some());
    }
    assert_counters_equal_a_recount(ledger.as_ref()).await;
    ledger.close().await;
    fixture.assert_lists_mirror_the_records().await;
}

macro_rules! ledger_suite {
    ($fixture:path) => {
        ledger_suite!(@tests $fixture;
            duplicate_ingest_is_recognised,
            changed_payload_is_an_update_and_the_stale_generation_cannot_complete,
            claims_only_return_the_requested_buckets,
            two_concurrent_claimers_never_get_the_same_record,
            an_expired_lease_is_taken_over_and_the_old_holders_completion_is_refused,
            counts_and_mttr_survive_reopening_the_ledger,
            checkpoint_advances_atomically_with_the_batch,
            migrations_are_idempotent_and_a_newer_schema_version_is_refused,
            dead_letters_are_replayed_by_reason,
            approving_and_rejecting_held_records_are_manual_interventions,
            a_decision_on_a_held_record_is_refused_once_a_new_generation_is_held_for_another_role,
            a_records_lineage_tells_its_whole_story,
            a_released_claim_returns_to_where_it_was,
            a_released_claim_gives_its_attempt_back,
            the_backlog_counts_waiting_records_and_the_oldest_receipt,
            a_version_1_ledger_is_migrated_with_its_records_and_payloads,
            new_records_can_be_leased_in_the_transaction_that_stores_them,
            records_an_intake_does_not_lease_stay_claimable_by_other_replicas,
            concurrent_completions_and_updates_of_the_same_records_never_deadlock,
            an_older_revision_after_a_newer_one_is_stale_and_never_delivered,
            equal_ordering_values_apply_in_arrival_order_flagged_as_a_tie,
            revisions_out_of_order_in_one_batch_keep_the_newest,
            counters_equal_a_recount_after_a_mixed_workload,
            counters_stay_exact_on_the_workers_path_and_for_statements_written_by_hand,
            the_failure_rate_window_forgets_an_outage_an_hour_later,
            delivered_payloads_are_purged_after_retention_and_duplicates_still_recognised,
            dead_letters_are_purged_after_their_retention,
            a_version_3_ledger_is_migrated_with_its_counters_backfilled,
            counters_written_by_closed_connections_still_add_up,
            a_replay_reads_the_newest_kept_payloads_newest_first,
            completions_are_attributed_to_the_revision_of_the_handle_that_wrote_them,
            revision_measures_count_only_their_window_and_survive_reopening,
            released_leases_go_back_fenced_and_are_delivered_once,
            dead_letters_of_one_cause_share_one_ticket_with_the_newest_examples,
            holds_open_one_ticket_per_rule_and_a_rejected_hold_moves_to_a_dead_letter_ticket,
            a_replayed_and_delivered_cause_resolves_and_a_new_dead_letter_reopens_it,
            flow_level_causes_are_raised_counted_and_cleared,
            tickets_are_assigned_and_acknowledged_once,
            the_ticket_outbox_sends_each_version_once_and_backs_off_on_failure,
            a_sink_that_refuses_a_ticket_is_failing_from_the_first_refusal,
            ticket_measures_per_owner_are_exact,
            flow_wide_ticket_measures_are_exact_over_every_occurrence_not_summed_over_owners,
            resolved_tickets_are_purged_after_retention_unless_a_sink_has_yet_to_hear,
            a_version_7_ledger_is_migrated_to_tickets,
            audit_pages_commit_with_their_cursor_and_a_reopened_ledger_resumes_without_double_counting,
            an_audit_page_that_fails_midway_stores_neither_its_orders_nor_its_cursor,
            an_audit_runs_lapsed_lease_is_taken_over_and_the_old_holder_is_refused,
            a_finished_audit_keeps_its_result_drops_its_orders_and_a_new_start_is_a_new_run,
            audit_facts_tell_the_newest_record_of_each_source_key,
        );
    };
    (@tests $fixture:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crate::support::ledger_suite::$name($fixture()).await;
            }
        )*
    };
}

pub(crate) use ledger_suite;
