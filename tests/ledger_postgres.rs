//! The ledger's promises, kept by the PostgreSQL backend against a real server that the harness starts from
//! the machine's binaries (several replicas of one flow share this backend).

mod support;

use support::ledger_suite::{Fixture, ledger_suite};

ledger_suite!(Fixture::postgres);

/// The flow's delivery slots are shared by replicas: never more holders than the limit, a slot given back
/// is free for another replica, and a dead replica's slots come free when their lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_slots_are_shared_between_replicas_and_a_dead_holders_expire() {
    use std::time::Duration;

    let fixture = Fixture::postgres();
    let clock = support::ledger_suite::clock();
    let a = fixture.open(clock.clone()).await;
    let b = fixture.open(clock.clone()).await;
    assert!(a.shares_delivery_slots());
    let lease = Duration::from_secs(30);

    let mut held_a = a
        .acquire_delivery_slots("replica-a", 3, 5, lease)
        .await
        .unwrap();
    held_a.sort();
    assert_eq!(
        held_a,
        [0, 1, 2],
        "at most the limit, however many are wanted"
    );
    assert!(
        b.acquire_delivery_slots("replica-b", 3, 3, lease)
            .await
            .unwrap()
            .is_empty(),
        "replica b gets none while a holds them all"
    );

    a.release_delivery_slots("replica-a", &[1]).await.unwrap();
    assert_eq!(
        b.acquire_delivery_slots("replica-b", 3, 3, lease)
            .await
            .unwrap(),
        [1],
        "a slot given back goes to the replica that asks"
    );
    // Releasing a slot one no longer holds changes nothing.
    a.release_delivery_slots("replica-a", &[1]).await.unwrap();
    assert!(
        a.acquire_delivery_slots("replica-a", 3, 3, lease)
            .await
            .unwrap()
            .is_empty()
    );

    // A lowered limit hands out no slot above it.
    a.release_delivery_slots("replica-a", &[0, 2])
        .await
        .unwrap();
    assert_eq!(
        a.acquire_delivery_slots("replica-a", 1, 3, lease)
            .await
            .unwrap(),
        [0]
    );

    // Replica b keeps its slot alive; replica a dies holding slot 0, whose lease then runs out.
    clock.advance(Duration::from_secs(20));
    assert_eq!(
        b.renew_delivery_slots("replica-b", &[1], lease)
            .await
            .unwrap(),
        [1]
    );
    clock.advance(Duration::from_secs(15));
    let mut taken = b
        .acquire_delivery_slots("replica-b", 3, 3, lease)
        .await
        .unwrap();
    taken.sort();
    assert_eq!(
        taken,
        [0, 2],
        "a's lapsed slot and the free one; b's own renewed slot is not re-taken"
    );
    assert!(
        a.renew_delivery_slots("replica-a", &[0], lease)
            .await
            .unwrap()
            .is_empty(),
        "the dead holder learns it lost the slot"
    );
}

/// A replica killed holding slots gives them back as its next process starts (worker ids are pod names, so
/// the restarted container has the same one): it does not wait out their leases, and nobody else's slots
/// are touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_reclaims_the_slots_its_killed_process_held() {
    use std::time::Duration;

    let fixture = Fixture::postgres();
    let clock = support::ledger_suite::clock();
    let before = fixture.open(clock.clone()).await;
    let other = fixture.open(clock.clone()).await;
    let lease = Duration::from_secs(30);
    let mut held = before
        .acquire_delivery_slots("pod-a", 4, 3, lease)
        .await
        .unwrap();
    held.sort();
    assert_eq!(held, [0, 1, 2]);
    assert_eq!(
        other
            .acquire_delivery_slots("pod-b", 4, 4, lease)
            .await
            .unwrap(),
        [3]
    );
    // pod-a is killed (no release) and its container restarts under the same name.
    drop(before);
    let after = fixture.open(clock.clone()).await;
    assert_eq!(after.reclaim_delivery_slots("pod-a").await.unwrap(), 3);
    let mut again = after
        .acquire_delivery_slots("pod-a", 4, 4, lease)
        .await
        .unwrap();
    again.sort();
    assert_eq!(
        again,
        [0, 1, 2],
        "at once, not after the lease; pod-b keeps 3"
    );
    assert_eq!(
        other
            .renew_delivery_slots("pod-b", &[3], lease)
            .await
            .unwrap(),
        [3]
    );
}

/// A claim whose snapshot predates the ingest of a newer generation, but which reaches that record only after
/// the ingest committed, leases the newer generation (PostgreSQL locks the newest version of a row) and must
/// hand it over with that generation's payload, not the older one its snapshot saw: otherwise the worker
/// delivers the older revision as the newer one and the ERP keeps it. (SQLite claims under its one write
/// lock, so an ingest cannot commit in the middle of a claim there.)
///
/// The interleaving is forced without timing: a trigger makes the claim wait on an advisory lock the test
/// holds when it leases the record it reaches first (`gate`), after its snapshot was taken and before it
/// locks the second record (`late`), and the newer revision of `late` is ingested meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_hands_over_the_payload_of_the_generation_it_leased() {
    use meshline::ledger::{BucketSet, IngestOutcome, LedgerTarget};
    use serde_json::json;
    use sqlx::Connection;
    use support::ledger_suite::{LEASE, record};

    const GATE: i64 = 7203;
    let fixture = Fixture::postgres();
    let clock = support::ledger_suite::clock();
    let ledger = fixture.open(clock.clone()).await;
    ledger
        .ingest(vec![
            record("gate", json!({"revision": 1})),
            record("late", json!({"revision": 1})),
        ])
        .await
        .unwrap();
    fixture
        .execute(&format!(
            "CREATE FUNCTION wait_at_gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NEW; END $$; \
             CREATE TRIGGER wait_at_gate BEFORE UPDATE ON records FOR EACH ROW \
             WHEN (NEW.source_key = 'gate' AND NEW.state = 'delivering') EXECUTE FUNCTION wait_at_gate();"
        ))
        .await;
    let LedgerTarget::Postgres(url) = &fixture.target else {
        unreachable!("a PostgreSQL fixture")
    };
    let mut gate = sqlx::PgConnection::connect(url).await.unwrap();
    const AT_THE_GATE: &str = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'";
    const ON_A_ROW: &str = "SELECT count(*) FROM pg_stat_activity \
        WHERE wait_event_type = 'Lock' AND wait_event IN ('transactionid', 'tuple')";
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(GATE)
        .execute(&mut gate)
        .await
        .unwrap();

    let claimer = ledger.clone();
    let claim = tokio::spawn(async move {
        claimer
            .claim("worker-a", &BucketSet::all(), 10, LEASE)
            .await
            .expect("claim")
    });
    while sqlx::query_scalar::<_, i64>(AT_THE_GATE)
        .fetch_one(&mut gate)
        .await
        .unwrap()
        == 0
    {
        assert!(!claim.is_finished(), "the claim passed the gate");
        tokio::task::yield_now().await;
    }

    let ingester = ledger.clone();
    let ingest = tokio::spawn(async move {
        ingester
            .ingest(vec![record("late", json!({"revision": 2}))])
            .await
            .expect("ingest")
    });
    while !ingest.is_finished() {
        // Should the claim have locked `late` before leasing `gate` (another plan), the ingest waits for the
        // claim, which waits for the gate: open it, and say the test could not force its interleaving.
        let blocked = sqlx::query_scalar::<_, i64>(ON_A_ROW)
            .fetch_one(&mut gate)
            .await
            .unwrap();
        if blocked > 0 {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(GATE)
                .execute(&mut gate)
                .await
                .unwrap();
            panic!(
                "the claim locked `late` before it reached the gate; the interleaving was not forced"
            );
        }
        tokio::task::yield_now().await;
    }
    let outcome = ingest.await.unwrap();
    assert!(
        matches!(outcome[..], [IngestOutcome::Updated { generation: 2, .. }]),
        "the newer revision is stored while the claim waits: {outcome:?}"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(GATE)
        .execute(&mut gate)
        .await
        .unwrap();

    let claimed = claim.await.unwrap();
    let handed: Vec<(String, i64, i64)> = claimed
        .iter()
        .map(|c| {
            let payload: serde_json::Value = serde_json::from_str(&c.payload).unwrap();
            (
                c.source_key.clone(),
                c.claim.generation,
                payload["revision"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(
        handed.iter().any(|(key, _, _)| key == "late"),
        "the claim leased `late` too: {handed:?}"
    );
    for (key, generation, revision) in &handed {
        assert_eq!(
            generation, revision,
            "{key}: generation {generation} leased with revision {revision}'s payload (all: {handed:?})"
        );
    }
}

/// A claim and a completion rewrite a record's row in place (a heap-only update that writes no index entry):
/// since schema version 14 no index of `records` names a column they change, and its pages keep room for the
/// row's next versions. The counts are PostgreSQL's own, read once the ledger's connections closed and their
/// statistics reached the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_update_records_in_place() {
    use meshline::ledger::{BucketSet, Completion, Outcome};
    use serde_json::json;
    use support::ledger_suite::{LEASE, record};

    const RECORDS: usize = 400;
    let fixture = Fixture::postgres();
    let ledger = fixture.open(support::ledger_suite::clock()).await;
    ledger
        .ingest(
            (0..RECORDS)
                .map(|i| record(&format!("hot{i:03}"), json!({"i": i})))
                .collect(),
        )
        .await
        .unwrap();
    let claimed = ledger
        .claim("worker-a", &BucketSet::all(), RECORDS, LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), RECORDS);
    let completions = claimed
        .into_iter()
        .map(|c| Completion {
            claim: c.claim,
            outcome: Outcome::Delivered,
        })
        .collect();
    ledger.complete_batch(completions).await.unwrap();
    ledger.close().await;
    fixture.assert_lists_mirror_the_records().await;

    let stats = fixture.raw_postgres_pool().await;
    // A backend sends its table statistics when it goes idle or exits; the ledger's connections have closed,
    // so the counts arrive. This waits for them, not for a time.
    let (updated, in_place) = loop {
        let (updated, in_place): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'records'",
        )
        .fetch_one(&stats)
        .await
        .unwrap();
        if updated >= 2 * RECORDS as i64 {
            break (updated, in_place);
        }
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&stats)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        updated,
        2 * RECORDS as i64,
        "one claim and one completion per record"
    );
    assert!(
        in_place * 100 >= updated * 95,
        "{in_place} of {updated} updates of records were in place (heap-only); the rest wrote an entry in \
         every index of the table"
    );
    stats.close().await;
}

/// A completion and an ingest of the same stored records take their row locks in one order, whichever of the
/// two starts waiting first. A third transaction holds the record with the lowest id, so both must stop on
/// it; once it lets go, the one that queued first goes on while the other waits. Had either path locked rows
/// in another order (by key, or in the order it was given), it would hold rows the other needs while it
/// waits: PostgreSQL would find the deadlock and abort one of them (40P01), which the ledger reports as an
/// error. The ids of the records follow neither their keys nor the batches' orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_ingests_lock_stored_records_in_one_order() {
    use meshline::ledger::{BucketSet, Completion, CompletionResult, IngestOutcome, Outcome};
    use serde_json::json;
    use support::ledger_suite::{LEASE, clock, record};

    const RECORDS: usize = 60;
    let fixture = Fixture::postgres();
    let clock = clock();
    let completer = fixture.open(clock.clone()).await;
    let intake = fixture.open(clock.clone()).await;
    let keys: Vec<String> = (0..RECORDS).map(|i| format!("order-{i:03}")).collect();
    for i in 0..RECORDS {
        // 7 is prime to 60: every key once, their ids in neither the keys' order nor its reverse (and the
        // lowest id not on the lowest key).
        intake
            .ingest(vec![record(
                &keys[(i * 7 + 13) % RECORDS],
                json!({"round": 0}),
            )])
            .await
            .unwrap();
    }
    let side = fixture.raw_postgres_pool().await;
    let waiting = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_one(&side)
        .await
        .unwrap();
        n
    };
    let wait_for = |n: i64| {
        let waiting = &waiting;
        async move {
            // Waits for the state (n sessions queued on a lock), not for a time.
            while waiting().await < n {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };

    for (round, completion_first) in [(1, true), (2, false)] {
        let mut claimed = completer
            .claim("worker", &BucketSet::all(), RECORDS, LEASE)
            .await
            .unwrap();
        assert_eq!(claimed.len(), RECORDS, "round {round}");
        let lowest = claimed.iter().map(|c| c.claim.id.0).min().unwrap();
        // Given in descending key order; the update's batch by descending payload.
        claimed.sort_by(|a, b| b.idempotency_key.cmp(&a.idempotency_key));
        let completions: Vec<Completion> = claimed
            .iter()
            .map(|c| Completion {
                claim: c.claim,
                outcome: Outcome::Delivered,
            })
            .collect();
        let updates: Vec<_> = keys
            .iter()
            .rev()
            .map(|k| record(k, json!({"round": round})))
            .collect();

        let mut gate = side.begin().await.unwrap();
        sqlx::query("SELECT id FROM records WHERE id = $1 FOR UPDATE")
            .bind(lowest)
            .execute(&mut *gate)
            .await
            .unwrap();
        let complete = {
            let completer = completer.clone();
            move || tokio::spawn(async move { completer.complete_batch(completions).await })
        };
        let ingest = {
            let intake = intake.clone();
            move || tokio::spawn(async move { intake.ingest(updates).await })
        };
        let (completed, ingested) = if completion_first {
            let completed = complete();
            wait_for(1).await;
            let ingested = ingest();
            wait_for(2).await;
            (completed, ingested)
        } else {
            let ingested = ingest();
            wait_for(1).await;
            let completed = complete();
            wait_for(2).await;
            (completed, ingested)
        };
        gate.commit().await.unwrap();
        let completed = completed
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: completion: {e:?}"));
        let ingested = ingested
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: ingest: {e:?}"));
        assert!(
            ingested
                .iter()
                .all(|o| matches!(o, IngestOutcome::Updated { .. })),
            "round {round}: {ingested:?}"
        );
        // The completion that queued first applied; the one that queued behind the ingest found newer
        // generations and was refused for them.
        let expected = |r: &CompletionResult| {
            if completion_first {
                *r == CompletionResult::Applied
            } else {
                matches!(r, CompletionResult::Superseded { .. })
            }
        };
        assert!(
            completed.iter().all(expected),
            "round {round}: {completed:?}"
        );
        fixture.assert_lists_mirror_the_records().await;
    }
    side.close().await;
    completer.close().await;
    intake.close().await;
}

/// Since schema version 15 a delivery writes no lineage row: its event is read from the record's row until a
/// statement moves the row on, and then it is in `lineage` once, under the id reserved at delivery, whichever
/// statement moved it (here a new revision, then a hand-written update as an older binary or an operator
/// might run). A compacted record leaves no lineage behind, whether its event was still in its row or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_event_is_written_out_once_when_its_row_moves_on() {
    use meshline::ledger::{Outcome, RecordId};
    use serde_json::json;
    use support::ledger_suite::{claim_all, clock, record};

    let fixture = Fixture::postgres();
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let db = fixture.raw_postgres_pool().await;
    let stored = |id: RecordId| {
        let db = db.clone();
        async move {
            let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT id, step, generation FROM lineage WHERE record_id = $1 AND step = 'delivered' \
                 ORDER BY id",
            )
            .bind(id.0)
            .fetch_all(&db)
            .await
            .unwrap();
            rows
        }
    };
    let reserved = |id: RecordId| {
        let db = db.clone();
        async move {
            let event: Option<i64> =
                sqlx::query_scalar("SELECT delivered_event FROM records WHERE id = $1")
                    .bind(id.0)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            event
        }
    };

    let id = ledger
        .ingest(vec![record("moves-on", json!({"v": 1}))])
        .await
        .unwrap()[0]
        .id();
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    ledger
        .complete(claimed.claim, Outcome::Delivered)
        .await
        .unwrap();
    let first = reserved(id)
        .await
        .expect("the delivery reserved its event's id");
    assert!(stored(id).await.is_empty(), "read from the row, not stored");
    let steps = |d: &meshline::ledger::RecordDetail| -> Vec<String> {
        d.lineage.iter().map(|e| e.step.clone()).collect()
    };
    assert_eq!(
        steps(&ledger.get(id).await.unwrap().unwrap()),
        ["received", "claimed", "delivered"]
    );

    // A new revision moves the row on: the event is written out under its id, before the revision's own.
    ledger
        .ingest(vec![record("moves-on", json!({"v": 2}))])
        .await
        .unwrap();
    assert_eq!(stored(id).await, [(first, "delivered".to_string(), 1)]);
    assert_eq!(reserved(id).await, None);
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    ledger
        .complete(claimed.claim, Outcome::Delivered)
        .await
        .unwrap();
    let second = reserved(id).await.expect("the second delivery's id");
    assert!(second > first);
    assert_eq!(
        steps(&ledger.get(id).await.unwrap().unwrap()),
        [
            "received",
            "claimed",
            "delivered",
            "updated",
            "claimed",
            "delivered"
        ]
    );

    // An update that does not know the column (an older binary's ingest) still writes the event out, and
    // once: the row's stale id then names a stored event, which reading does not tell again.
    sqlx::query("UPDATE records SET generation = generation + 1, state = 'received' WHERE id = $1")
        .bind(id.0)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE records SET state = 'delivered' WHERE id = $1")
        .bind(id.0)
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(
        stored(id).await,
        [
            (first, "delivered".to_string(), 1),
            (second, "delivered".to_string(), 2)
        ]
    );
    assert_eq!(
        steps(&ledger.get(id).await.unwrap().unwrap()),
        [
            "received",
            "claimed",
            "delivered",
            "updated",
            "claimed",
            "delivered"
        ]
    );

    // Past the retention the record is compacted: none of its lineage stays, in the table or read from the
    // row (whose reserved id the compaction leaves as it was).
    let delivered = ledger
        .ingest(vec![record("compacted", json!({"v": 1}))])
        .await
        .unwrap()[0]
        .id();
    let claimed = claim_all(ledger.as_ref(), "w").await.remove(0);
    ledger
        .complete(claimed.claim, Outcome::Delivered)
        .await
        .unwrap();
    assert!(reserved(delivered).await.is_some());
    clock.advance(std::time::Duration::from_secs(3600));
    let retention = meshline::ledger::Retention {
        dead_letters: None,
        delivered: Some(std::time::Duration::from_secs(60)),
        resolved_tickets: None,
    };
    assert_eq!(ledger.purge(&retention, 500).await.unwrap().payloads, 2);
    for record in [id, delivered] {
        let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM lineage WHERE record_id = $1")
            .bind(record.0)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(kept, 0, "record {record}");
        let compact = ledger.get(record).await.unwrap().unwrap();
        assert!(compact.lineage.is_empty(), "{:?}", compact.lineage);
    }
    db.close().await;
    ledger.close().await;
}

/// A claim's lineage event stays in its record's row (schema version 16) and is written out, once and under
/// the id reserved at the claim, when the row moves on: a takeover, a release, a new revision. Whatever moves
/// it, the record's story tells every claim once, in its place, with its own worker, fence and attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_event_is_written_out_once_when_its_row_moves_on() {
    use meshline::api::ErrorClass;
    use meshline::ledger::{BucketSet, Clock, Outcome, RecordId};
    use serde_json::{Value, json};
    use support::ledger_suite::{LEASE, at, claim_all, clock, record};

    let fixture = Fixture::postgres();
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let db = fixture.raw_postgres_pool().await;
    let stored = |id: RecordId| {
        let db = db.clone();
        async move {
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT id, detail FROM lineage WHERE record_id = $1 AND step = 'claimed' ORDER BY id",
            )
            .bind(id.0)
            .fetch_all(&db)
            .await
            .unwrap();
            rows.into_iter()
                .map(|(id, detail)| (id, serde_json::from_str::<Value>(&detail).unwrap()))
                .collect::<Vec<_>>()
        }
    };
    let reserved = |id: RecordId| {
        let db = db.clone();
        async move {
            let event: Option<i64> =
                sqlx::query_scalar("SELECT claimed_event FROM records WHERE id = $1")
                    .bind(id.0)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            event
        }
    };
    // The claims in the record's story: (worker, fence, attempt, taken over from), and every step.
    let story = |id: RecordId| {
        let ledger = ledger.clone();
        async move {
            let detail = ledger.get(id).await.unwrap().unwrap();
            let claims: Vec<(Value, Value, Value, Value)> = detail
                .lineage
                .iter()
                .filter(|e| e.step == "claimed")
                .map(|e| {
                    (
                        e.detail["worker"].clone(),
                        e.detail["fence"].clone(),
                        e.detail["attempt"].clone(),
                        e.detail["taken_over_from"].clone(),
                    )
                })
                .collect();
            let steps: Vec<String> = detail.lineage.iter().map(|e| e.step.clone()).collect();
            (claims, steps)
        }
    };

    let id = ledger
        .ingest(vec![record("claimed-often", json!({"v": 1}))])
        .await
        .unwrap()[0]
        .id();
    let first = claim_all(ledger.as_ref(), "w1").await.remove(0);
    let first_event = reserved(id)
        .await
        .expect("the claim reserved its event's id");
    assert!(stored(id).await.is_empty(), "read from the row, not stored");
    let detail = ledger.get(id).await.unwrap().unwrap();
    let claimed = detail.lineage.iter().find(|e| e.step == "claimed").unwrap();
    assert_eq!(
        claimed.detail,
        json!({"worker": "w1", "fence": 1, "attempt": 1,
               "lease_expires_at": clock.now_ms() + LEASE.as_millis() as i64, "taken_over_from": null})
    );
    assert_eq!(claimed.at, at(&clock));

    // The lease lapses and another worker takes the record over: the first claim's event is written out
    // under its reserved id, with the first claim's fence and attempt.
    clock.advance(LEASE * 2);
    let second = claim_all(ledger.as_ref(), "w2").await.remove(0);
    assert_eq!(second.claim.id, id);
    let written = stored(id).await;
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0].0, first_event);
    assert_eq!(
        (
            &written[0].1["worker"],
            &written[0].1["fence"],
            &written[0].1["attempt"]
        ),
        (&json!("w1"), &json!(1), &json!(1))
    );
    assert_eq!(
        story(id).await,
        (
            vec![
                (json!("w1"), json!(1), json!(1), Value::Null),
                (json!("w2"), json!(2), json!(2), json!("w1")),
            ],
            vec!["received".into(), "claimed".into(), "claimed".into()]
        )
    );

    // A completion leaves the claim's columns as they are: nothing more is written out.
    ledger
        .complete(
            second.claim,
            Outcome::RetryScheduled {
                next_attempt_at: at(&clock) + chrono::Duration::seconds(1),
                error: "503 Service Unavailable".into(),
                class: ErrorClass::Transient,
            },
        )
        .await
        .unwrap();
    assert_eq!(stored(id).await.len(), 1);
    // The late completion of the first holder is refused and moves nothing either.
    assert!(
        ledger
            .complete(first.claim, Outcome::Delivered)
            .await
            .is_err()
    );
    assert_eq!(stored(id).await.len(), 1);

    // A release moves the fence: the releasing worker's claim is written out before the release's event.
    clock.advance(std::time::Duration::from_secs(2));
    let third = claim_all(ledger.as_ref(), "w3").await.remove(0);
    assert_eq!(ledger.release_leases("w3").await.unwrap(), 1);
    assert_eq!(
        stored(id).await.len(),
        3,
        "w2's claim moved on with w3's, w3's with the release"
    );
    let (claims, steps) = story(id).await;
    assert_eq!(
        claims,
        vec![
            (json!("w1"), json!(1), json!(1), Value::Null),
            (json!("w2"), json!(2), json!(2), json!("w1")),
            (json!("w3"), json!(3), json!(3), Value::Null),
        ]
    );
    assert_eq!(steps.iter().filter(|s| *s == "claimed").count(), 3);
    let released = steps.iter().position(|s| s == "lease_released").unwrap();
    let third_claim = steps.iter().rposition(|s| s == "claimed").unwrap();
    assert!(third_claim < released, "{steps:?}");
    assert!(
        ledger
            .complete(third.claim, Outcome::Delivered)
            .await
            .is_err()
    );

    // A new revision while a claim is held writes that claim out with the generation it was made for.
    let fourth = claim_all(ledger.as_ref(), "w4").await.remove(0);
    assert_eq!(fourth.claim.generation, 1);
    ledger
        .ingest(vec![record("claimed-often", json!({"v": 2}))])
        .await
        .unwrap();
    assert_eq!(
        reserved(id).await,
        None,
        "a new revision starts without a claim"
    );
    let generations: Vec<i64> = sqlx::query_scalar(
        "SELECT generation FROM lineage WHERE record_id = $1 AND step = 'claimed' ORDER BY id",
    )
    .bind(id.0)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(generations, [1, 1, 1, 1]);
    // The new revision waits for w4's lease (an in-flight older generation is never claimed alongside it).
    assert!(
        ledger
            .claim("w5", &BucketSet::all(), 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    clock.advance(LEASE * 2);
    let fifth = claim_all(ledger.as_ref(), "w5").await.remove(0);
    assert_eq!(fifth.claim.generation, 2);
    ledger
        .complete(fifth.claim, Outcome::Delivered)
        .await
        .unwrap();
    let (claims, steps) = story(id).await;
    assert_eq!(claims.len(), 5, "{claims:?}");
    // w4's claim was of generation 1 (the release had moved the fence to 4); w5's is the new revision's
    // first attempt, of a record that was waiting, not taken over.
    assert_eq!(claims[3], (json!("w4"), json!(5), json!(4), Value::Null));
    assert_eq!(claims[4], (json!("w5"), json!(6), json!(1), Value::Null));
    assert_eq!(
        steps[steps.len() - 3..],
        ["updated".to_string(), "claimed".into(), "delivered".into()],
        "{steps:?}"
    );
    fixture.assert_lists_mirror_the_records().await;
    db.close().await;
    ledger.close().await;
}

/// Since schema version 17 a record the intake leases as it stores it keeps its claim's event in its row, as a
/// claim's is (version 16): the ingest writes one lineage row per record, its receipt, under an id reserved
/// before the claim's, and the event is written out, once and in its place, when the row moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_keeps_its_claim_event_in_the_record_row() {
    use meshline::ledger::{BucketSet, LeaseRequest, Outcome};
    use serde_json::json;
    use support::ledger_suite::{LEASE, clock, record};

    let fixture = Fixture::postgres();
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let db = fixture.raw_postgres_pool().await;
    let stored = |step: &'static str| {
        let db = db.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM lineage WHERE step = $1")
                .bind(step)
                .fetch_one(&db)
                .await
                .unwrap();
            n
        }
    };
    let request = LeaseRequest {
        worker: "intake".into(),
        buckets: BucketSet::all(),
        limit: 3,
        lease: LEASE,
    };
    let (_, leased) = ledger
        .ingest_and_claim(
            (0..5)
                .map(|i| record(&format!("r{i}"), json!({"i": i})))
                .collect(),
            &request,
        )
        .await
        .unwrap();
    assert_eq!(leased.len(), 3);
    assert_eq!((stored("received").await, stored("claimed").await), (5, 0));
    // Each leased record's receipt comes before its claim's reserved id.
    let order: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT l.id, r.claimed_event FROM records r JOIN lineage l ON l.record_id = r.id \
         WHERE r.claimed_event IS NOT NULL ORDER BY r.id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(order.len(), 3);
    assert!(
        order.iter().all(|(received, claimed)| received < claimed),
        "{order:?}"
    );

    for claimed in &leased {
        ledger
            .complete(claimed.claim, Outcome::Delivered)
            .await
            .unwrap();
    }
    assert_eq!(stored("claimed").await, 0, "a delivery keeps it in the row");
    // A new revision moves the row on: the claim's and the delivery's events are written out, once.
    ledger
        .ingest(vec![record(&leased[0].source_key, json!({"i": "new"}))])
        .await
        .unwrap();
    assert_eq!((stored("claimed").await, stored("delivered").await), (1, 1));
    let detail = ledger.get(leased[0].claim.id).await.unwrap().unwrap();
    let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
    assert_eq!(steps, ["received", "claimed", "delivered", "updated"]);
    assert_eq!(detail.lineage[1].detail["worker"], "intake");
    let rest = ledger
        .claim("w", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(rest.len(), 3, "the two never leased and the new revision");
    db.close().await;
    ledger.close().await;
}

/// Since schema version 17 a completion of deliveries counts its own records when each is still held under the
/// lease its claim's event names, and the update trigger's call for it does nothing. A batch with any other
/// record starts again as an update the trigger counts. Either way the counters equal a recount, the queue holds
/// exactly the waiting records, and the registrations go once they hold nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_of_deliveries_count_their_own_records_or_start_again_for_the_trigger() {
    use meshline::ledger::{BucketSet, Completion, CompletionResult, Outcome};
    use serde_json::json;
    use support::ledger_suite::{LEASE, assert_counters_equal_a_recount, clock, record, retry_in};

    let fixture = Fixture::postgres();
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let db = fixture.raw_postgres_pool().await;
    let registrations = || {
        let db = db.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM record_leases")
                .fetch_one(&db)
                .await
                .unwrap();
            n
        }
    };
    let delivered = |claims: &[meshline::ledger::ClaimedRecord]| -> Vec<Completion> {
        claims
            .iter()
            .map(|c| Completion {
                claim: c.claim,
                outcome: Outcome::Delivered,
            })
            .collect()
    };
    ledger
        .ingest(
            (0..8)
                .map(|i| record(&format!("r{i}"), json!({"i": i})))
                .collect(),
        )
        .await
        .unwrap();

    // Two of them fail once first, so their delivery adds to the time to recover.
    let first = ledger
        .claim("w", &BucketSet::all(), 2, LEASE)
        .await
        .unwrap();
    for claimed in &first {
        ledger
            .complete(claimed.claim, retry_in(&clock, 0))
            .await
            .unwrap();
    }
    clock.advance(std::time::Duration::from_secs(3));

    // The steady state: every record still held under its claim's lease, counted by the completion itself.
    let steady = ledger
        .claim("w", &BucketSet::all(), 8, LEASE)
        .await
        .unwrap();
    assert_eq!(steady.len(), 8);
    let results = ledger.complete_batch(delivered(&steady)).await.unwrap();
    assert!(
        results.iter().all(|r| *r == CompletionResult::Applied),
        "{results:?}"
    );
    assert_eq!(registrations().await, 0, "the emptied registration goes");
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(counts.delivered, 8);
    assert!(
        counts.mttr_seconds.is_some_and(|s| s >= 3.0),
        "the two that had failed recovered 3 s later: {counts:?}"
    );
    fixture.assert_lists_mirror_the_records().await;
    // The batch's deliveries share one lineage id, reserved after each record's claim.
    let events: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT delivered_event, claimed_event FROM records WHERE state = 'delivered' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(events.len(), 8);
    assert!(
        events
            .iter()
            .all(|&(delivered, claimed)| delivered == events[0].0 && delivered > claimed),
        "(delivered event, claimed event) per record: {events:?}"
    );
    // Revised at the source, each record writes its delivery out under that id, once, and its story reads
    // claimed, delivered, updated in that order.
    ledger
        .ingest(
            (0..8)
                .map(|i| record(&format!("r{i}"), json!({"i": i, "revised": true})))
                .collect(),
        )
        .await
        .unwrap();
    let stored: (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT record_id) FROM lineage WHERE step = 'delivered' AND id = $1",
    )
    .bind(events[0].0)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(stored, (8, 8));
    for claimed in &steady {
        let detail = ledger.get(claimed.claim.id).await.unwrap().unwrap();
        let steps: Vec<&str> = detail.lineage.iter().map(|e| e.step.as_str()).collect();
        let tail = &steps[steps.len() - 3..];
        assert_eq!(tail, ["claimed", "delivered", "updated"], "{steps:?}");
    }
    let revised = ledger
        .claim("w", &BucketSet::all(), 8, LEASE)
        .await
        .unwrap();
    assert_eq!(revised.len(), 8);
    ledger.complete_batch(delivered(&revised)).await.unwrap();
    assert_counters_equal_a_recount(ledger.as_ref()).await;

    ledger
        .ingest(
            (8..11)
                .map(|i| record(&format!("r{i}"), json!({"i": i})))
                .collect(),
        )
        .await
        .unwrap();
    // One record's lease lapses and a claim for no bucket of its own clears it (which queues it) without
    // taking it; the holder then completes it with two records whose lease still runs, in one batch.
    let short = ledger
        .claim("w", &BucketSet::all(), 1, LEASE)
        .await
        .unwrap();
    clock.advance(LEASE / 2);
    let long = ledger
        .claim("w", &BucketSet::all(), 2, LEASE)
        .await
        .unwrap();
    assert_eq!((short.len(), long.len()), (1, 2));
    clock.advance(LEASE / 2 + std::time::Duration::from_millis(1));
    let none = BucketSet::from_buckets(
        (0..100u8).filter(|b| *b != short[0].bucket && long.iter().all(|l| l.bucket != *b)),
    );
    assert!(
        ledger
            .claim("other", &none, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    let lease_cleared: Option<i64> =
        sqlx::query_scalar("SELECT lease_expires_at FROM records WHERE id = $1")
            .bind(short[0].claim.id.0)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(lease_cleared, None, "the lapsed lease is cleared");
    fixture.assert_lists_mirror_the_records().await;
    let mixed: Vec<_> = short.iter().chain(&long).cloned().collect();
    let results = ledger.complete_batch(delivered(&mixed)).await.unwrap();
    assert!(
        results.iter().all(|r| *r == CompletionResult::Applied),
        "{results:?}"
    );
    assert_eq!(registrations().await, 0);
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(counts.delivered, 11);
    fixture.assert_lists_mirror_the_records().await;

    // A record leased as an older binary leased it (no claim event in its row) is counted by the trigger too.
    ledger
        .ingest(vec![record("r11", json!({"i": 11}))])
        .await
        .unwrap();
    let legacy = ledger
        .claim("w", &BucketSet::all(), 1, LEASE)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE records SET claimed_event = NULL, claimed_at = NULL, claimed_by = NULL, claimed_until = NULL \
         WHERE id = $1",
    )
    .bind(legacy[0].claim.id.0)
    .execute(&db)
    .await
    .unwrap();
    let results = ledger.complete_batch(delivered(&legacy)).await.unwrap();
    assert_eq!(results, [CompletionResult::Applied]);
    assert_eq!(registrations().await, 0);
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!(counts.delivered, 12);
    assert_eq!(counts.pending, 0);
    fixture.assert_lists_mirror_the_records().await;

    // A claim taken over: its record is held under the new holder's claim, which the statement's own test
    // (the lease its claim's event names) cannot tell from the old holder's. The claim's fence is tested before
    // anything commits: the old holder's batch starts again, its stale claim is refused and its fresh one
    // applied, and the new holder delivers the record.
    ledger
        .ingest(vec![record("r12", json!({"i": 12}))])
        .await
        .unwrap();
    let lapsing = ledger
        .claim("w", &BucketSet::all(), 1, LEASE)
        .await
        .unwrap();
    clock.advance(LEASE + std::time::Duration::from_millis(1));
    ledger
        .ingest(vec![record("r13", json!({"i": 13}))])
        .await
        .unwrap();
    let taken = ledger
        .claim("x", &BucketSet::all(), 1, LEASE)
        .await
        .unwrap();
    assert_eq!(taken[0].claim.id, lapsing[0].claim.id);
    let fresh = ledger
        .claim("w", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(fresh.len(), 1);
    let stale_and_fresh: Vec<_> = lapsing.iter().chain(&fresh).cloned().collect();
    let results = ledger
        .complete_batch(delivered(&stale_and_fresh))
        .await
        .unwrap();
    assert_eq!(
        results,
        [CompletionResult::LeaseLost, CompletionResult::Applied]
    );
    let detail = ledger.get(taken[0].claim.id).await.unwrap().unwrap();
    assert_eq!(detail.record.lease_owner.as_deref(), Some("x"));
    let results = ledger.complete_batch(delivered(&taken)).await.unwrap();
    assert_eq!(results, [CompletionResult::Applied]);
    assert_eq!(registrations().await, 0);
    let counts = assert_counters_equal_a_recount(ledger.as_ref()).await;
    assert_eq!((counts.delivered, counts.pending), (14, 0));
    fixture.assert_lists_mirror_the_records().await;
    db.close().await;
    ledger.close().await;
}

/// Since schema version 16 a leased record has no entry in `record_queue`: each claim registers its records
/// in `record_leases` under its owner and expiry, and the claim that finds a registration expired makes the
/// records still held under it claimable again, and deletes it. The oldest waiting record counts the records
/// in flight, and a worker's release finds records whose lease lapsed and that nobody took over yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_registered_per_claim_and_found_again_once_they_lapse() {
    use meshline::ledger::{BucketSet, Clock, Outcome, bucket_of};
    use serde_json::json;
    use support::ledger_suite::{LEASE, clock, record};

    let fixture = Fixture::postgres();
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let db = fixture.raw_postgres_pool().await;
    let registrations = || {
        let db = db.clone();
        async move {
            let rows: Vec<(String, i64, Vec<i64>, i64)> = sqlx::query_as(
                "SELECT owner, expires_at, record_ids, held FROM record_leases ORDER BY expires_at, owner",
            )
            .fetch_all(&db)
            .await
            .unwrap();
            rows
        }
    };
    let queued = || {
        let db = db.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM record_queue")
                .fetch_one(&db)
                .await
                .unwrap();
            n
        }
    };

    let received_at = clock.now_ms();
    ledger
        .ingest(
            (0..6)
                .map(|i| record(&format!("r{i}"), json!({"i": i})))
                .collect(),
        )
        .await
        .unwrap();
    let a = ledger
        .claim("a", &BucketSet::all(), 3, LEASE)
        .await
        .unwrap();
    let a_expiry = clock.now_ms() + LEASE.as_millis() as i64;
    let mut a_ids: Vec<i64> = a.iter().map(|c| c.claim.id.0).collect();
    a_ids.sort();
    assert_eq!(
        registrations().await,
        [("a".to_string(), a_expiry, a_ids.clone(), 3)]
    );
    assert_eq!(
        queued().await,
        3,
        "only the records nobody holds are queued"
    );
    fixture.assert_lists_mirror_the_records().await;
    ledger
        .complete(a[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    assert_eq!(
        registrations().await[0].3,
        2,
        "a completion counts its registration down"
    );

    clock.advance(LEASE / 2);
    let b = ledger
        .claim("b", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(b.len(), 3, "a's records stay a's while its lease runs");
    assert_eq!(queued().await, 0);
    // Everything waiting is in flight: the oldest receipt is read through the registrations.
    assert_eq!(ledger.backlog().await.unwrap(), (5, Some(received_at)));
    assert!(
        ledger
            .counts()
            .await
            .unwrap()
            .oldest_pending_age_seconds
            .is_some()
    );

    // a's lease lapses, b's does not: the next claim takes over a's two undelivered records, and a's
    // registration goes while b's stays.
    clock.advance(LEASE / 2 + std::time::Duration::from_millis(1));
    let c = ledger
        .claim("c", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    let mut taken: Vec<i64> = c.iter().map(|c| c.claim.id.0).collect();
    taken.sort();
    assert_eq!(
        taken,
        a_ids[..]
            .iter()
            .copied()
            .filter(|id| *id != a[0].claim.id.0)
            .collect::<Vec<_>>()
    );
    let owners: Vec<String> = registrations().await.into_iter().map(|(o, ..)| o).collect();
    assert_eq!(owners, ["b", "c"]);
    fixture.assert_lists_mirror_the_records().await;
    // The first holder's late completion is refused and counts nothing down; c's completions empty c's
    // registration, which goes.
    assert!(
        ledger
            .complete(a[1].claim, Outcome::Delivered)
            .await
            .is_err()
    );
    for claimed in &c {
        ledger
            .complete(claimed.claim, Outcome::Delivered)
            .await
            .unwrap();
    }
    let owners: Vec<String> = registrations().await.into_iter().map(|(o, ..)| o).collect();
    assert_eq!(owners, ["b"]);

    // d's lease lapses and a claim for other buckets only makes its record claimable (queued) without
    // taking it: a release of d's leases still finds it, through the queue.
    for claimed in &b {
        ledger
            .complete(claimed.claim, Outcome::Delivered)
            .await
            .unwrap();
    }
    assert!(
        registrations().await.is_empty(),
        "no claim in flight, no registration"
    );
    ledger
        .ingest(vec![record("late", json!({"i": 9}))])
        .await
        .unwrap();
    let d = ledger
        .claim("d", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(d.len(), 1);
    clock.advance(LEASE * 2);
    let other = BucketSet::from_buckets((0..=u8::MAX).filter(|b| *b != bucket_of("late")));
    assert!(
        ledger
            .claim("e", &other, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        queued().await,
        1,
        "the lapsed lease's record is claimable again"
    );
    assert!(
        registrations().await.is_empty(),
        "the expired registration went"
    );
    fixture.assert_lists_mirror_the_records().await;
    assert_eq!(ledger.release_leases("d").await.unwrap(), 1);
    assert!(
        ledger
            .complete(d[0].claim, Outcome::Delivered)
            .await
            .is_err()
    );
    let again = ledger
        .claim("f", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    ledger
        .complete(again[0].claim, Outcome::Delivered)
        .await
        .unwrap();
    assert_eq!(ledger.backlog().await.unwrap(), (0, None));
    fixture.assert_lists_mirror_the_records().await;
    db.close().await;
    ledger.close().await;
}

/// The SQL that leaves a PostgreSQL ledger as meshline's schema `version` left it, recorded as applied at `T0`.
fn schema_at(version: i64) -> String {
    let mut sql =
        "CREATE TABLE meshline_schema (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
                   applied_at BIGINT NOT NULL);\n"
            .to_string();
    for applied in 1..=version {
        for statement in
            meshline::ledger::migration_statements("postgres", applied).expect("a version")
        {
            sql.push_str(statement);
            sql.push_str(";\n");
        }
        sql.push_str(&format!(
            "INSERT INTO meshline_schema VALUES ({applied}, 'v{applied}', {});\n",
            support::ledger_suite::T0
        ));
    }
    sql
}

/// A ledger of schema version 15 with records in flight: the migration registers their leases and takes them
/// out of the queue, and once a lease lapses the record is taken over as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_15_ledger_with_records_in_flight_is_migrated_with_their_leases() {
    use meshline::ledger::{self, BucketSet, Outcome};
    use support::ledger_suite::{FLOW, LEASE, T0, clock};

    let fixture = Fixture::postgres();
    let clock = clock();
    let mut v15 = schema_at(15);
    let lease_end = T0 + 10_000;
    // (key, state, lease owner, lease end, fence)
    let rows = [
        (
            "held",
            "delivering",
            "'old-worker'",
            lease_end.to_string(),
            1,
        ),
        ("waiting", "received", "NULL", "NULL".to_string(), 0),
    ];
    for (i, (key, state, owner, expires, fence)) in rows.iter().enumerate() {
        v15.push_str(&format!(
            "INSERT INTO records (id, flow, source_key, idempotency_key, generation, payload_hash, \
             contract_version, state, claimed_from, lease_owner, lease_expires_at, fence, attempts, \
             next_attempt_at, bucket, correlation_id, received_at, updated_at) VALUES ({id}, '{FLOW}', '{key}', \
             'Opportunity/{key}', 1, 'h{key}', '1.0.0', '{state}', {claimed_from}, {owner}, {expires}, {fence}, \
             {fence}, {next}, 1, 'c{key}', {T0}, {T0});\n\
             INSERT INTO payloads (record_id, body) VALUES ({id}, '{{}}');\n",
            id = i + 1,
            claimed_from = if *state == "delivering" { "'received'" } else { "NULL" },
            next = if *state == "delivering" { lease_end } else { T0 },
        ));
    }
    v15.push_str("SELECT setval('records_id_seq', 2);\n");
    fixture.execute(&v15).await;

    let ledger = fixture.open(clock.clone()).await;
    const { assert!(ledger::SCHEMA_VERSION >= 16) };
    fixture.assert_lists_mirror_the_records().await;
    let now = ledger
        .claim("new-worker", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].source_key, "waiting");
    clock.advance(std::time::Duration::from_millis(10_001));
    let taken = ledger
        .claim("new-worker", &BucketSet::all(), 10, LEASE)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].source_key, "held");
    assert_eq!(taken[0].claim.fence, 2);
    let detail = ledger.get(taken[0].claim.id).await.unwrap().unwrap();
    let takeover = detail.lineage.iter().find(|e| e.step == "claimed").unwrap();
    assert_eq!(takeover.detail["taken_over_from"], "old-worker");
    for c in now.into_iter().chain(taken) {
        ledger.complete(c.claim, Outcome::Delivered).await.unwrap();
    }
    assert_eq!(ledger.backlog().await.unwrap(), (0, None));
    fixture.assert_lists_mirror_the_records().await;
    ledger.close().await;
}

/// A ledger of schema version 17 with holds and dead letters: the migration lists them in `record_attention`
/// and drops the generated `attention` column, and listing, replaying by reason, rejecting and purging find
/// them there, with the list kept as records move into and out of those states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_17_ledger_lists_its_holds_and_dead_letters_in_record_attention() {
    use meshline::ledger::{self, RecordState};
    use support::ledger_suite::{FLOW, T0, as_seen, clock};

    let fixture = Fixture::postgres();
    let clock = clock();
    let mut v17 = schema_at(17);
    // (key, state, dead-letter reason, hold rule and role)
    let rows = [
        ("held", "held", "NULL", "'discount-over-30'", "'sinkOwner'"),
        ("dead-a", "dead_lettered", "'unknown item'", "NULL", "NULL"),
        ("dead-b", "dead_lettered", "'closed period'", "NULL", "NULL"),
        ("waiting", "received", "NULL", "NULL", "NULL"),
    ];
    for (i, (key, state, reason, rule, role)) in rows.iter().enumerate() {
        v17.push_str(&format!(
            "INSERT INTO records (id, flow, source_key, idempotency_key, generation, payload_hash, \
             contract_version, state, fence, attempts, next_attempt_at, bucket, correlation_id, received_at, \
             updated_at, dead_letter_reason, hold_rule, hold_role) VALUES ({id}, '{FLOW}', '{key}', \
             'Opportunity/{key}', 1, 'h{key}', '1.0.0', '{state}', 1, 1, {T0}, 1, 'c{key}', {T0}, {T0}, \
             {reason}, {rule}, {role});\n\
             INSERT INTO payloads (record_id, body) VALUES ({id}, '{{}}');\n",
            id = i + 1,
        ));
    }
    v17.push_str("SELECT setval('records_id_seq', 4);\n");
    fixture.execute(&v17).await;

    let ledger = fixture.open(clock.clone()).await;
    const { assert!(ledger::SCHEMA_VERSION >= 18) };
    fixture.assert_lists_mirror_the_records().await;
    let db = fixture.raw_postgres_pool().await;
    let (listed, column): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM record_attention), (SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'records' AND column_name = 'attention')",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (listed, column),
        (3, 0),
        "listed holds and dead letters, and the generated column left"
    );

    let keys = |views: Vec<ledger::RecordView>| -> Vec<String> {
        views.into_iter().map(|v| v.source_key).collect()
    };
    let held = ledger
        .list(RecordState::Held, None, None, 10)
        .await
        .unwrap();
    assert_eq!(keys(held.clone()), ["held"]);
    let dead = ledger
        .list(RecordState::DeadLettered, None, None, 10)
        .await
        .unwrap();
    assert_eq!(keys(dead.clone()), ["dead-a", "dead-b"]);
    // A page after the first dead letter, and a page by reason.
    let after = ledger
        .list(RecordState::DeadLettered, None, Some(dead[0].id), 10)
        .await
        .unwrap();
    assert_eq!(keys(after), ["dead-b"]);
    let by_reason = ledger
        .list(RecordState::DeadLettered, Some("closed period"), None, 10)
        .await
        .unwrap();
    assert_eq!(keys(by_reason), ["dead-b"]);

    // Replayed by reason: the dead letter leaves the list (it waits again) and is replayed once.
    let replayed = ledger
        .replay_dead_letters_by_reason("unknown item", "ana@example.com", "item created")
        .await
        .unwrap();
    assert_eq!(replayed, [dead[0].id]);
    assert!(
        ledger
            .replay_dead_letters_by_reason("unknown item", "ana@example.com", "again")
            .await
            .unwrap()
            .is_empty()
    );
    fixture.assert_lists_mirror_the_records().await;
    // A rejected hold becomes a dead letter: it moves from one list to the other.
    ledger
        .reject_held(
            held[0].id,
            &as_seen(ledger.as_ref(), held[0].id).await,
            "cfo@example.com",
            "no",
        )
        .await
        .unwrap();
    fixture.assert_lists_mirror_the_records().await;
    assert!(
        ledger
            .list(RecordState::Held, None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        keys(
            ledger
                .list(RecordState::DeadLettered, None, None, 10)
                .await
                .unwrap()
        ),
        ["held", "dead-b"]
    );
    // A new revision of a dead letter at the source takes it off the list.
    ledger
        .ingest(vec![support::ledger_suite::record(
            "dead-b",
            serde_json::json!({"revised": true}),
        )])
        .await
        .unwrap();
    fixture.assert_lists_mirror_the_records().await;
    // Purged after its retention, the last dead letter leaves the list with its record.
    clock.advance(std::time::Duration::from_secs(15 * 24 * 3600));
    let retention = ledger::Retention {
        dead_letters: Some(std::time::Duration::from_secs(14 * 24 * 3600)),
        delivered: None,
        resolved_tickets: None,
    };
    assert_eq!(ledger.purge(&retention, 10).await.unwrap().dead_letters, 1);
    fixture.assert_lists_mirror_the_records().await;
    let listed: i64 = sqlx::query_scalar("SELECT count(*) FROM record_attention")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(listed, 0);
    support::ledger_suite::assert_counters_equal_a_recount(ledger.as_ref()).await;
    db.close().await;
    ledger.close().await;
}

/// A ledger that starts empty and then fills fast (a worker's first claims, then a burst of webhooks the
/// intake cannot lease) still claims by probing the primary key. The claim's statements are prepared once
/// per connection, and PostgreSQL may keep a generic plan after five executions, made with the statistics of
/// that moment: one made while `records` held a handful of rows found each due record by reading every
/// record of the flow: here 4.7 million index entries of `records` read in all, against 46,000 with fresh
/// plans (2 s of CPU per claim of 500 at 20,000 records in the end-to-end bench). Autovacuum is off for `records` here, as on a ledger filling
/// faster than autovacuum comes by, so no new statistics replan it behind the test's back. The work is
/// counted in index entries read (`pg_stat_user_indexes`), which no machine's speed changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_a_ledger_that_filled_after_its_first_claims_reads_records_by_key() {
    use meshline::ledger::{BucketSet, Completion, Outcome};
    use serde_json::json;
    use support::ledger_suite::{LEASE, record};

    const RECORDS: usize = 10_000;
    const CLAIM: usize = 500;
    let fixture = Fixture::postgres();
    let ledger = fixture.open(support::ledger_suite::clock()).await;
    let raw = fixture.raw_postgres_pool().await;
    sqlx::query("ALTER TABLE records SET (autovacuum_enabled = false)")
        .execute(&raw)
        .await
        .unwrap();
    // The first claims, one record each, while the ledger is nearly empty.
    for i in 0..12 {
        ledger
            .ingest(vec![record(&format!("early{i:02}"), json!({"i": i}))])
            .await
            .unwrap();
        let claimed = ledger
            .claim("worker-a", &BucketSet::all(), 1, LEASE)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        ledger
            .complete_batch(vec![Completion {
                claim: claimed[0].claim,
                outcome: Outcome::Delivered,
            }])
            .await
            .unwrap();
    }
    // Then the burst, stored without leases, and a claim of it. The first stored (claimed first) have the
    // last source keys, so a plan that walks the flow's records in key order for each meets all the others.
    for batch in 0..RECORDS / 1_000 {
        let rank = RECORDS / 1_000 - batch;
        ledger
            .ingest(
                (0..1_000)
                    .map(|i| record(&format!("burst{rank:02}-{i:04}"), json!({"i": i})))
                    .collect(),
            )
            .await
            .unwrap();
    }
    let claimed = ledger
        .claim("worker-a", &BucketSet::all(), CLAIM, LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), CLAIM);
    ledger.close().await;
    let read = records_index_reads_once_counted(&raw, (RECORDS + 12) as i64, 0).await;
    // Everything the ledger did read index entries of `records`: a few per record stored, claimed or
    // completed. Walking the flow's records for each due record reads about 9,000 per record claimed.
    assert!(
        read <= (10 * (RECORDS + CLAIM)) as i64,
        "the ledger read {read} index entries of records for {RECORDS} records stored and {CLAIM} claimed"
    );
    raw.close().await;
}

/// Stores `count` records named `{prefix}-{i:05}`, 1,000 an ingest.
async fn ingest_burst(ledger: &dyn meshline::ledger::Ledger, prefix: &str, count: usize) {
    for batch in 0..count.div_ceil(1_000) {
        let records = (batch * 1_000..count.min((batch + 1) * 1_000))
            .map(|i| {
                support::ledger_suite::record(
                    &format!("{prefix}-{i:05}"),
                    serde_json::json!({"i": i}),
                )
            })
            .collect();
        ledger.ingest(records).await.unwrap();
    }
}

/// Completes every claimed record as delivered, in one batch, and checks that each completion applied.
async fn deliver_all(
    ledger: &dyn meshline::ledger::Ledger,
    claimed: &[meshline::ledger::ClaimedRecord],
) {
    use meshline::ledger::{Completion, CompletionResult, Outcome};
    let results = ledger
        .complete_batch(
            claimed
                .iter()
                .map(|c| Completion {
                    claim: c.claim,
                    outcome: Outcome::Delivered,
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(results.len(), claimed.len());
    assert!(results.iter().all(|r| *r == CompletionResult::Applied));
}

/// Index entries of `records` read so far, once the statistics count at least `inserted` inserts and `updated`
/// updates of it. A backend sends its statistics when it exits (closing the ledger closes them all), so this
/// waits for them to be counted, not for a time.
async fn records_index_reads_once_counted(raw: &sqlx::PgPool, inserted: i64, updated: i64) -> i64 {
    loop {
        let (ins, upd, read): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'records'), \
             (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'records'), \
             (SELECT COALESCE(SUM(idx_tup_read), 0)::BIGINT FROM pg_stat_user_indexes WHERE relname = 'records')",
        )
        .fetch_one(raw)
        .await
        .unwrap();
        if ins >= inserted && upd >= updated {
            return read;
        }
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(raw)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The statements that find a flow's records by id or by key (a completion, the check of a refused one, an
/// ingest's lock of the stored keys) read those records and no others, whatever the statistics say. A ledger
/// that is young, or a flow new to a shared ledger, has no statistics that tell the planner how many records
/// `flow = $1` selects; it guessed "a handful", and then read every record of the flow through
/// `records_source_key` and filtered them, for each completion and each ingest: in the end-to-end bench,
/// 13,700 records read to complete 384, and 13 ms a completion where 4 would do. Autovacuum is off for
/// `records` here, as on a ledger filling faster than autovacuum comes by; the work is counted in index
/// entries read, which no machine's speed changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_ingests_on_a_ledger_without_statistics_read_only_their_records() {
    use meshline::ledger::{BucketSet, Completion, CompletionResult, Outcome};
    use serde_json::json;
    use support::ledger_suite::{LEASE, record};

    const RECORDS: usize = 10_000;
    const CLAIM: usize = 500;
    const REVISED: usize = 100;
    let fixture = Fixture::postgres();
    let raw = fixture.raw_postgres_pool().await;
    let ledger = fixture.open(support::ledger_suite::clock()).await;
    sqlx::query("ALTER TABLE records SET (autovacuum_enabled = false)")
        .execute(&raw)
        .await
        .unwrap();
    ingest_burst(&*ledger, "burst", RECORDS).await;
    let claimed = ledger
        .claim("worker-a", &BucketSet::all(), CLAIM, LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), CLAIM);
    ledger.close().await;
    let before = records_index_reads_once_counted(&raw, RECORDS as i64, CLAIM as i64).await;

    // A worker that starts now plans with the statistics of now: none.
    let ledger = fixture.open(support::ledger_suite::clock()).await;
    deliver_all(&*ledger, &claimed).await;
    // A completion refused (already applied): its records are read again for the refusal's detail.
    let refused = ledger
        .complete_batch(vec![Completion {
            claim: claimed[0].claim,
            outcome: Outcome::Delivered,
        }])
        .await
        .unwrap();
    assert_ne!(refused, vec![CompletionResult::Applied]);
    // New revisions of stored keys: the ingest locks the stored rows by key before it writes.
    let outcomes = ledger
        .ingest(
            (0..REVISED)
                .map(|i| record(&format!("burst-{i:05}"), json!({"i": i, "revised": true})))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), REVISED);
    ledger.close().await;
    let after =
        records_index_reads_once_counted(&raw, RECORDS as i64, (CLAIM + CLAIM + REVISED) as i64)
            .await;
    // A record found by id or key is a few index entries; one statement that walks the flow reads 10,000.
    let read = after - before;
    assert!(
        read <= (4 * (CLAIM + 1 + REVISED)) as i64,
        "completing {CLAIM} records and revising {REVISED} read {read} index entries of records"
    );
    raw.close().await;
}

/// The same on a shared ledger for a flow new to it: the statistics of `records` know only the flows that were
/// there when it was last analyzed, and take a new one for a handful of records, so a plan that reached the
/// new flow's records through an index on the flow walked them all. Completing its records, revising its keys
/// and reading an audit's facts by source key read those records and no others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_new_to_a_shared_ledger_completes_and_revises_by_id_and_key() {
    use meshline::ledger::BucketSet;
    use serde_json::json;
    use support::ledger_suite::{LEASE, record};

    const OLD_FLOW_RECORDS: usize = 10_000;
    const RECORDS: usize = 5_000;
    const CLAIM: usize = 500;
    const REVISED: usize = 100;
    let fixture = Fixture::postgres();
    let raw = fixture.raw_postgres_pool().await;
    let old_flow = fixture.open(support::ledger_suite::clock()).await;
    ingest_burst(&*old_flow, "old", OLD_FLOW_RECORDS).await;
    old_flow.close().await;
    // The statistics now say every record belongs to the old flow, and stay so (autovacuum off).
    for sql in [
        "ANALYZE records",
        "ALTER TABLE records SET (autovacuum_enabled = false)",
    ] {
        sqlx::query(sql).execute(&raw).await.unwrap();
    }
    let open_new = || async {
        meshline::ledger::open(&fixture.target, "new-flow", support::ledger_suite::clock())
            .await
            .expect("the new flow's ledger opens")
    };
    let ledger = open_new().await;
    ingest_burst(&*ledger, "new", RECORDS).await;
    let claimed = ledger
        .claim("worker-a", &BucketSet::all(), CLAIM, LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), CLAIM);
    ledger.close().await;
    let stored = (OLD_FLOW_RECORDS + RECORDS) as i64;
    let before = records_index_reads_once_counted(&raw, stored, CLAIM as i64).await;

    let ledger = open_new().await;
    deliver_all(&*ledger, &claimed).await;
    let outcomes = ledger
        .ingest(
            (0..REVISED)
                .map(|i| {
                    record(
                        &format!("new-{:05}", 2_000 + i),
                        json!({"i": i, "revised": true}),
                    )
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), REVISED);
    // An audit reads the facts of a page of source keys (one asked twice, one unknown).
    let mut keys: Vec<String> = (0..REVISED)
        .map(|i| format!("new-{:05}", 3_000 + i))
        .collect();
    keys.push(keys[0].clone());
    keys.push("unknown".to_string());
    let facts = ledger.audit_facts(&keys).await.unwrap();
    assert_eq!(facts.len(), REVISED);
    ledger.close().await;
    let after =
        records_index_reads_once_counted(&raw, stored, (CLAIM + CLAIM + REVISED) as i64).await;
    // A record found by id or key is a few index entries; one statement that walks the flow reads 5,000.
    let read = after - before;
    assert!(
        read <= (4 * (CLAIM + 2 * REVISED)) as i64,
        "completing {CLAIM} records, revising {REVISED} and auditing {REVISED} of a new flow read {read} index entries of records"
    );
    raw.close().await;
}
