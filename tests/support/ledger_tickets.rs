//! The ledger's promises about tickets (issue #16), run against every backend through `ledger_suite!`: one
//! ticket per cause with counts and the newest examples, opened and counted in the completions' own
//! transactions; resolved when the cause clears and reopened when it comes back; assignment,
//! acknowledgement, the per-sink outbox, and exact per-owner measures under an injected clock.

use std::time::Duration;

use meshline::api::{ErrorClass, OwnerRole};
use meshline::ledger::{
    self, BucketSet, Completion, Ledger, LedgerError, Outcome, RaisedException, TicketAssignment,
    TicketRecord,
};
use meshline::tickets::{ExceptionKind, TicketState, fingerprint};
use serde_json::json;

use super::ledger_suite::{FLOW, Fixture, LEASE, T0, as_seen, at, clock, record};

fn dead_letter(reason: &str, key: &str) -> Outcome {
    Outcome::DeadLettered {
        reason: reason.to_string(),
        class: ErrorClass::Permanent,
        erp_response: Some(format!(
            "422 Unprocessable Entity: item of {key} is inactive"
        )),
        snapshot: Some(json!({"key": key, "amount": "[redacted]"})),
    }
}

fn hold(rule: &str) -> Outcome {
    Outcome::Held {
        rule: rule.to_string(),
        role: "sinkOwner".to_string(),
        snapshot: Some(json!({"redacted": true})),
    }
}

fn dead_letter_ticket(reason: &str) -> String {
    fingerprint(
        "",
        FLOW,
        ExceptionKind::DeadLetter,
        Some(ErrorClass::Permanent),
        reason,
    )
}

/// Stores records `keys`, claims them and completes each with `outcome(key)`, in one batch in key order.
async fn complete_new(ledger: &dyn Ledger, keys: &[String], outcome: impl Fn(&str) -> Outcome) {
    let batch = keys.iter().map(|k| record(k, json!({"key": k}))).collect();
    ledger.ingest(batch).await.unwrap();
    deliver_claimed(ledger, outcome).await;
}

/// Claims every due record and completes them in one batch, in source-key order.
async fn deliver_claimed(ledger: &dyn Ledger, outcome: impl Fn(&str) -> Outcome) -> usize {
    let mut claimed = ledger
        .claim("w", &BucketSet::all(), 10_000, LEASE)
        .await
        .unwrap();
    claimed.sort_by_key(|c| c.source_key.clone());
    let completions: Vec<Completion> = claimed
        .iter()
        .map(|c| Completion {
            claim: c.claim,
            outcome: outcome(&c.source_key),
        })
        .collect();
    let n = completions.len();
    let results = ledger.complete_batch(completions).await.unwrap();
    assert!(
        results
            .iter()
            .all(|r| *r == ledger::CompletionResult::Applied)
    );
    n
}

async fn ticket(ledger: &dyn Ledger, fp: &str) -> TicketRecord {
    ledger
        .ticket(fp)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("ticket {fp} exists"))
}

fn keys(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

pub async fn dead_letters_of_one_cause_share_one_ticket_with_the_newest_examples(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    complete_new(ledger.as_ref(), &keys("a", 0..4), |k| {
        dead_letter("erp:422", k)
    })
    .await;
    clock.advance(Duration::from_secs(60));
    complete_new(ledger.as_ref(), &keys("b", 0..3), |k| {
        dead_letter("erp:422", k)
    })
    .await;
    complete_new(ledger.as_ref(), &keys("c", 0..2), |k| {
        dead_letter("contract:rule_failed:rule:discount_cap", k)
    })
    .await;

    let open = ledger.tickets(true, 100).await.unwrap();
    assert_eq!(open.len(), 2, "one ticket per cause, never one per record");
    let erp = ticket(ledger.as_ref(), &dead_letter_ticket("erp:422")).await;
    assert_eq!((erp.count, erp.outstanding), (7, 7));
    assert_eq!(erp.kind, ExceptionKind::DeadLetter);
    assert_eq!(erp.class, Some(ErrorClass::Permanent));
    assert_eq!(erp.state, TicketState::Open);
    assert_eq!(erp.reason, "erp:422");
    assert_eq!(erp.rule, None);
    assert_eq!(erp.opened_at.timestamp_millis(), T0);
    assert_eq!(erp.updated_at, at(&clock));
    // Two batches touched it: one version each, so a sink is sent each change once.
    assert_eq!(erp.version, 2);
    let newest: Vec<&str> = erp.examples.iter().map(|e| e.source_key.as_str()).collect();
    assert_eq!(newest, ["b2", "b1", "b0", "a3", "a2"], "the 5 newest first");
    let example = &erp.examples[0];
    assert_eq!(
        example.erp_response.as_deref(),
        Some("422 Unprocessable Entity: item of b2 is inactive")
    );
    assert_eq!(
        example.snapshot,
        Some(json!({"key": "b2", "amount": "[redacted]"}))
    );
    assert!(!example.correlation_id.is_empty());

    let rule = ticket(
        ledger.as_ref(),
        &dead_letter_ticket("contract:rule_failed:rule:discount_cap"),
    )
    .await;
    assert_eq!((rule.count, rule.outstanding), (2, 2));
    assert_eq!(rule.rule.as_deref(), Some("discount_cap"));
    assert_ne!(rule.fingerprint, erp.fingerprint);
    ledger.close().await;
}

pub async fn holds_open_one_ticket_per_rule_and_a_rejected_hold_moves_to_a_dead_letter_ticket(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    complete_new(ledger.as_ref(), &keys("h", 0..3), |_| {
        hold("discount-over-30")
    })
    .await;
    complete_new(ledger.as_ref(), &keys("x", 0..1), |_| hold("new-customer")).await;
    let discount = fingerprint(
        "",
        FLOW,
        ExceptionKind::Hold,
        Some(ErrorClass::Hold),
        "hold:discount-over-30",
    );
    let held = ticket(ledger.as_ref(), &discount).await;
    assert_eq!((held.count, held.outstanding), (3, 3));
    assert_eq!(held.rule.as_deref(), Some("discount-over-30"));
    assert_eq!(held.kind, ExceptionKind::Hold);
    assert_eq!(ledger.tickets(true, 100).await.unwrap().len(), 2);

    let ids: Vec<_> = ledger
        .list(ledger::RecordState::Held, None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.source_key.starts_with('h'))
        .map(|r| r.id)
        .collect();
    ledger
        .approve_held(
            ids[0],
            &as_seen(ledger.as_ref(), ids[0]).await,
            "cfo",
            "agreed",
        )
        .await
        .unwrap();
    ledger
        .reject_held(
            ids[1],
            &as_seen(ledger.as_ref(), ids[1]).await,
            "cfo",
            "not agreed",
        )
        .await
        .unwrap();
    let rejected = fingerprint(
        "",
        FLOW,
        ExceptionKind::DeadLetter,
        Some(ErrorClass::Hold),
        "hold_rejected:discount-over-30",
    );
    let rejection = ticket(ledger.as_ref(), &rejected).await;
    assert_eq!((rejection.count, rejection.outstanding), (1, 1));
    assert_eq!(rejection.rule.as_deref(), Some("discount-over-30"));
    assert_eq!(rejection.examples[0].record, ids[1].0);

    // The rejected record left the hold's ticket; the approved one stays on it until it is delivered.
    assert!(ledger.settle_tickets().await.unwrap().is_empty());
    assert_eq!(ticket(ledger.as_ref(), &discount).await.outstanding, 2);
    assert_eq!(
        deliver_claimed(ledger.as_ref(), |_| Outcome::Delivered).await,
        1
    );
    ledger.settle_tickets().await.unwrap();
    let after = ticket(ledger.as_ref(), &discount).await;
    assert_eq!((after.outstanding, after.state), (1, TicketState::Open));
    ledger.close().await;
}

pub async fn a_replayed_and_delivered_cause_resolves_and_a_new_dead_letter_reopens_it(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let fp = dead_letter_ticket("erp:422");
    complete_new(ledger.as_ref(), &keys("d", 0..3), |k| {
        dead_letter("erp:422", k)
    })
    .await;
    ledger
        .replay_dead_letters_by_reason("erp:422", "ana", "item reactivated")
        .await
        .unwrap();
    // Two are delivered; one fails again for the same reason.
    deliver_claimed(ledger.as_ref(), |k| {
        if k == "d2" {
            dead_letter("erp:422", k)
        } else {
            Outcome::Delivered
        }
    })
    .await;
    let again = ticket(ledger.as_ref(), &fp).await;
    assert_eq!((again.count, again.outstanding), (4, 1));
    let version = again.version;
    assert!(ledger.settle_tickets().await.unwrap().is_empty());
    assert_eq!(
        ticket(ledger.as_ref(), &fp).await.version,
        version,
        "settling without a change is no new version"
    );

    ledger
        .replay_dead_letters_by_reason("erp:422", "ana", "fixed")
        .await
        .unwrap();
    deliver_claimed(ledger.as_ref(), |_| Outcome::Delivered).await;
    clock.advance(Duration::from_secs(30));
    assert_eq!(ledger.settle_tickets().await.unwrap(), vec![fp.clone()]);
    let resolved = ticket(ledger.as_ref(), &fp).await;
    assert_eq!(resolved.state, TicketState::Resolved);
    assert_eq!(resolved.outstanding, 0);
    assert_eq!(resolved.resolved_at, Some(at(&clock)));
    assert_eq!(resolved.version, version + 1);
    assert!(ledger.settle_tickets().await.unwrap().is_empty());
    assert!(ledger.tickets(true, 100).await.unwrap().is_empty());

    clock.advance(Duration::from_secs(3600));
    complete_new(ledger.as_ref(), &keys("n", 0..1), |k| {
        dead_letter("erp:422", k)
    })
    .await;
    let reopened = ticket(ledger.as_ref(), &fp).await;
    assert_eq!(reopened.state, TicketState::Open);
    assert_eq!(reopened.reopened, 1);
    assert_eq!(reopened.opened_at, at(&clock));
    assert_eq!((reopened.count, reopened.outstanding), (1, 1));
    assert_eq!(reopened.resolved_at, None);
    assert_eq!(reopened.examples[0].source_key, "n0");
    ledger.close().await;
}

fn breaker() -> RaisedException {
    RaisedException {
        kind: ExceptionKind::FlowDegraded,
        class: Some(ErrorClass::FlowLevel),
        reason: "breaker_open".into(),
        rule: None,
        summary: "the ERP answers 401 to every request".into(),
    }
}

pub async fn flow_level_causes_are_raised_counted_and_cleared(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let fp = ledger.raise_exception(breaker()).await.unwrap();
    assert_eq!(
        fp,
        fingerprint(
            "",
            FLOW,
            ExceptionKind::FlowDegraded,
            Some(ErrorClass::FlowLevel),
            "breaker_open"
        )
    );
    assert_eq!(ledger.raise_exception(breaker()).await.unwrap(), fp);
    let raised = ticket(ledger.as_ref(), &fp).await;
    assert_eq!(
        (raised.count, raised.outstanding, raised.state),
        (2, 1, TicketState::Open)
    );
    assert_eq!(raised.summary, "the ERP answers 401 to every request");
    // Settling looks only at dead letters and holds: a flow-level cause has no records attached.
    assert!(ledger.settle_tickets().await.unwrap().is_empty());
    assert_eq!(ticket(ledger.as_ref(), &fp).await.state, TicketState::Open);

    clock.advance(Duration::from_secs(90));
    assert!(ledger.clear_exception(&fp).await.unwrap());
    let cleared = ticket(ledger.as_ref(), &fp).await;
    assert_eq!(cleared.state, TicketState::Resolved);
    assert_eq!(cleared.resolved_at, Some(at(&clock)));
    assert!(
        !ledger.clear_exception(&fp).await.unwrap(),
        "already resolved"
    );
    assert!(!ledger.clear_exception("no-such-cause").await.unwrap());

    let mut empty = breaker();
    empty.reason = " ".into();
    let err = ledger.raise_exception(empty).await.unwrap_err();
    assert!(matches!(err, LedgerError::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("reason"), "{err}");
    ledger.close().await;
}

fn assignment(owner: &str, sinks: &[&str]) -> TicketAssignment {
    TicketAssignment {
        role: OwnerRole::SinkOwner,
        owner: owner.to_string(),
        sinks: sinks.iter().map(|s| s.to_string()).collect(),
        escalation_step: 0,
        page: false,
    }
}

pub async fn tickets_are_assigned_and_acknowledged_once(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let fp = ledger.raise_exception(breaker()).await.unwrap();
    let before = ticket(ledger.as_ref(), &fp).await.version;
    let to_ana = assignment("ana", &["slack"]);
    assert!(ledger.assign_ticket(&fp, &to_ana).await.unwrap());
    assert!(!ledger.assign_ticket(&fp, &to_ana).await.unwrap());
    let assigned = ticket(ledger.as_ref(), &fp).await;
    assert_eq!(
        assigned.version,
        before + 1,
        "an unchanged assignment is no new version"
    );
    assert_eq!(assigned.assignment, Some(to_ana));

    clock.advance(Duration::from_secs(45));
    assert!(ledger.acknowledge_ticket(&fp, "ana").await.unwrap());
    assert!(!ledger.acknowledge_ticket(&fp, "ana").await.unwrap());
    let acked = ticket(ledger.as_ref(), &fp).await;
    assert_eq!(acked.state, TicketState::Acknowledged);
    assert_eq!(acked.acknowledged_by.as_deref(), Some("ana"));
    assert_eq!(acked.acknowledged_at, Some(at(&clock)));

    let err = ledger
        .assign_ticket("no-such-ticket", &assignment("ana", &[]))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::TicketNotFound { .. }), "{err}");
    assert!(err.to_string().contains("no-such-ticket"), "{err}");
    let err = ledger.acknowledge_ticket(&fp, "").await.unwrap_err();
    assert!(err.to_string().contains("by"), "{err}");
    let err = ledger
        .assign_ticket(&fp, &assignment("", &["slack"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("owner"), "{err}");
    ledger.close().await;
}

pub async fn the_ticket_outbox_sends_each_version_once_and_backs_off_on_failure(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let fp = ledger.raise_exception(breaker()).await.unwrap();
    ledger
        .assign_ticket(&fp, &assignment("ana", &["slack", "jira"]))
        .await
        .unwrap();
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    let sinks: Vec<&str> = due.iter().map(|d| d.sink.as_str()).collect();
    assert_eq!(sinks, ["jira", "slack"]);
    assert!(
        due.iter()
            .all(|d| !d.in_doubt && d.previous.is_none() && d.attempts == 0)
    );
    let version = due[0].ticket.version;

    // The doubt is durable: a sender killed mid-send leaves it for the next one.
    ledger
        .begin_ticket_delivery(
            &fp,
            "slack",
            version,
            Duration::from_millis(ledger::TICKET_SEND_LEASE_MS as u64),
        )
        .await
        .unwrap();
    ledger.close().await;
    let ledger = fixture.open(clock.clone()).await;
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.sink.as_str()).collect::<Vec<_>>(),
        ["jira"],
        "a begun send is not handed to a second sender"
    );
    clock.advance(Duration::from_millis(ledger::TICKET_SEND_LEASE_MS as u64));
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    let slack = due
        .iter()
        .find(|d| d.sink == "slack")
        .expect("slack due again");
    assert!(slack.in_doubt);

    ledger
        .finish_ticket_delivery(&fp, "slack", version, json!({"ts": "1700000000.1"}))
        .await
        .unwrap();
    let retry_at = at(&clock) + chrono::Duration::minutes(5);
    let failed_at = at(&clock);
    ledger
        .fail_ticket_delivery(&fp, "jira", "503 Service Unavailable", None, retry_at)
        .await
        .unwrap();
    assert!(
        ledger
            .ticket_deliveries_due(at(&clock), 100)
            .await
            .unwrap()
            .is_empty(),
        "slack has this version; jira waits for its backoff"
    );
    let health = ledger.ticket_sink_health().await.unwrap();
    let jira = health.iter().find(|h| h.sink == "jira").unwrap();
    assert_eq!((jira.pending, jira.consecutive_failures), (1, 1));
    assert_eq!(jira.failing_since, Some(failed_at));
    assert_eq!(jira.last_error.as_deref(), Some("503 Service Unavailable"));
    let slack = health.iter().find(|h| h.sink == "slack").unwrap();
    assert_eq!((slack.pending, slack.consecutive_failures), (0, 0));

    clock.advance(Duration::from_secs(300));
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].sink.as_str(), due[0].attempts), ("jira", 1));
    assert!(!due[0].in_doubt, "never begun, so never in doubt");
    ledger
        .begin_ticket_delivery(
            &fp,
            "jira",
            version,
            Duration::from_millis(ledger::TICKET_SEND_LEASE_MS as u64),
        )
        .await
        .unwrap();
    ledger
        .fail_ticket_delivery(&fp, "jira", "timeout", None, at(&clock))
        .await
        .unwrap();
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    assert!(
        due.iter().any(|d| d.sink == "jira" && d.in_doubt),
        "a send that timed out may have arrived: the retry is still in doubt"
    );
    let health = ledger.ticket_sink_health().await.unwrap();
    let jira = health.iter().find(|h| h.sink == "jira").unwrap();
    assert_eq!(jira.consecutive_failures, 2);
    assert_eq!(
        jira.failing_since,
        Some(failed_at),
        "the first failure's time is kept"
    );
    assert!(
        !meshline::tickets::dispatch::failing(jira),
        "two 5xx or timeouts may pass: not failing yet"
    );

    // A new version is due again for the sink that had the old one, with the sink's reference.
    ledger.raise_exception(breaker()).await.unwrap();
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    let slack = due
        .iter()
        .find(|d| d.sink == "slack")
        .expect("slack due for the new version");
    assert_eq!(slack.previous, Some(json!({"ts": "1700000000.1"})));
    assert_eq!(slack.ticket.version, version + 1);
    ledger
        .finish_ticket_delivery(&fp, "jira", version + 1, json!({"key": "OPS-1"}))
        .await
        .unwrap();
    // An older version finishing late does not lower what the sink has.
    ledger
        .finish_ticket_delivery(&fp, "jira", version, json!({"key": "OPS-1"}))
        .await
        .unwrap();
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.sink.as_str()).collect::<Vec<_>>(),
        ["slack"]
    );
    let jira = ledger
        .ticket_sink_health()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.sink == "jira")
        .unwrap();
    assert_eq!((jira.consecutive_failures, jira.failing_since), (0, None));

    let err = ledger
        .begin_ticket_delivery(
            &fp,
            "pagerduty",
            version,
            Duration::from_millis(ledger::TICKET_SEND_LEASE_MS as u64),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pagerduty"), "{err}");
    ledger.close().await;
}

pub async fn a_sink_that_refuses_a_ticket_is_failing_from_the_first_refusal(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let fp = ledger.raise_exception(breaker()).await.unwrap();
    ledger
        .assign_ticket(&fp, &assignment("ana", &["jira", "slack"]))
        .await
        .unwrap();
    let version = ledger.ticket(&fp).await.unwrap().unwrap().version;
    let later = at(&clock) + chrono::Duration::minutes(10);
    ledger
        .fail_ticket_delivery(
            &fp,
            "jira",
            "403 Forbidden: the token may not create issues in OPS",
            Some(403),
            later,
        )
        .await
        .unwrap();
    ledger
        .fail_ticket_delivery(&fp, "slack", "503 Service Unavailable", None, later)
        .await
        .unwrap();
    // Survives a restart: the refusal is in the ledger, not in a dispatcher's memory.
    ledger.close().await;
    let ledger = fixture.open(clock.clone()).await;
    let health = ledger.ticket_sink_health().await.unwrap();
    let jira = health.iter().find(|h| h.sink == "jira").unwrap();
    assert_eq!((jira.consecutive_failures, jira.refused), (1, Some(403)));
    assert!(
        meshline::tickets::dispatch::failing(jira),
        "one refusal is enough: {jira:?}"
    );
    assert_eq!(
        jira.last_error.as_deref(),
        Some("403 Forbidden: the token may not create issues in OPS")
    );
    let slack = health.iter().find(|h| h.sink == "slack").unwrap();
    assert_eq!((slack.consecutive_failures, slack.refused), (1, None));
    assert!(!meshline::tickets::dispatch::failing(slack));

    // Fixed: the next send succeeds and the sink is healthy again.
    ledger
        .finish_ticket_delivery(&fp, "jira", version, json!({"key": "OPS-7"}))
        .await
        .unwrap();
    let jira = ledger
        .ticket_sink_health()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.sink == "jira")
        .unwrap();
    assert_eq!((jira.consecutive_failures, jira.refused), (0, None));
    assert!(!meshline::tickets::dispatch::failing(&jira));
    ledger.close().await;
}

pub async fn ticket_measures_per_owner_are_exact(fixture: Fixture) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let cause = |reason: &str| RaisedException {
        reason: reason.into(),
        ..breaker()
    };
    // A: acknowledged after 60 s, resolved after 300 s.
    let a = ledger.raise_exception(cause("a")).await.unwrap();
    ledger
        .assign_ticket(&a, &assignment("ana", &[]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    ledger.acknowledge_ticket(&a, "ana").await.unwrap();
    clock.advance(Duration::from_secs(240));
    ledger.clear_exception(&a).await.unwrap();
    // B: resolved after 120 s without an acknowledgement; reassigned on the way (counted once).
    let b = ledger.raise_exception(cause("b")).await.unwrap();
    ledger
        .assign_ticket(&b, &assignment("ana", &[]))
        .await
        .unwrap();
    let mut escalated = assignment("ana", &["pagerduty"]);
    escalated.escalation_step = 1;
    ledger.assign_ticket(&b, &escalated).await.unwrap();
    clock.advance(Duration::from_secs(120));
    ledger.clear_exception(&b).await.unwrap();
    // A comes back: a new occurrence for ana, acknowledged after 30 s and still open.
    ledger.raise_exception(cause("a")).await.unwrap();
    clock.advance(Duration::from_secs(30));
    ledger.acknowledge_ticket(&a, "ana").await.unwrap();
    // C: bob's, open.
    let c = ledger.raise_exception(cause("c")).await.unwrap();
    ledger
        .assign_ticket(&c, &assignment("bob", &[]))
        .await
        .unwrap();

    let measures = ledger.ticket_measures().await.unwrap();
    let owners: Vec<&str> = measures.iter().map(|m| m.owner.as_str()).collect();
    assert_eq!(owners, ["ana", "bob"]);
    let ana = &measures[0];
    assert_eq!(
        (ana.opened, ana.acknowledged, ana.resolved, ana.open),
        (3, 2, 2, 1)
    );
    assert_eq!(ana.mean_time_to_acknowledge_seconds, Some(45.0));
    assert_eq!(ana.mean_time_to_resolve_seconds, Some(210.0));
    let bob = &measures[1];
    assert_eq!(
        (bob.opened, bob.acknowledged, bob.resolved, bob.open),
        (1, 0, 0, 1)
    );
    assert_eq!(bob.mean_time_to_acknowledge_seconds, None);
    assert_eq!(bob.mean_time_to_resolve_seconds, None);
    ledger.close().await;
}

pub async fn flow_wide_ticket_measures_are_exact_over_every_occurrence_not_summed_over_owners(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let cause = |reason: &str| RaisedException {
        reason: reason.into(),
        ..breaker()
    };
    let step = |s: u64| clock.advance(Duration::from_secs(s));
    // ana: A acknowledged after 60 s and resolved after 300 s; E resolved after 100 s.
    let a = ledger.raise_exception(cause("a")).await.unwrap();
    ledger
        .assign_ticket(&a, &assignment("ana", &[]))
        .await
        .unwrap();
    step(60);
    ledger.acknowledge_ticket(&a, "ana").await.unwrap();
    step(240);
    ledger.clear_exception(&a).await.unwrap();
    let e = ledger.raise_exception(cause("e")).await.unwrap();
    ledger
        .assign_ticket(&e, &assignment("ana", &[]))
        .await
        .unwrap();
    step(100);
    ledger.clear_exception(&e).await.unwrap();
    // bob: B acknowledged after 600 s and resolved after 1200 s; F still open.
    let b = ledger.raise_exception(cause("b")).await.unwrap();
    ledger
        .assign_ticket(&b, &assignment("bob", &[]))
        .await
        .unwrap();
    step(600);
    ledger.acknowledge_ticket(&b, "bob").await.unwrap();
    step(600);
    ledger.clear_exception(&b).await.unwrap();
    // D cleared after 30 s before anyone was assigned: no owner's, still the flow's.
    let d = ledger.raise_exception(cause("d")).await.unwrap();
    step(30);
    ledger.clear_exception(&d).await.unwrap();
    let f = ledger.raise_exception(cause("f")).await.unwrap();
    ledger
        .assign_ticket(&f, &assignment("bob", &[]))
        .await
        .unwrap();

    let owners = ledger.ticket_measures().await.unwrap();
    let of = |id: &str| owners.iter().find(|m| m.owner == id).unwrap();
    assert_eq!(
        (of("ana").resolved, of("ana").mean_time_to_resolve_seconds),
        (2, Some(200.0))
    );
    assert_eq!(
        (of("bob").resolved, of("bob").mean_time_to_resolve_seconds),
        (1, Some(1200.0))
    );
    let assigned: u64 = owners.iter().map(|m| m.opened).sum();
    assert_eq!(
        assigned, 4,
        "the owners' rows count only assigned occurrences"
    );

    let whole = ledger.ticket_flow_measures().await.unwrap();
    assert_eq!(
        (
            whole.opened,
            whole.acknowledged,
            whole.resolved,
            whole.open,
            whole.acknowledged_now
        ),
        (5, 2, 4, 1, 0)
    );
    // Over the occurrences, not a mean of the owners' means ((200 + 1200 + 30) / 3 = 476.7).
    assert_eq!(whole.mean_time_to_acknowledge_seconds, Some(330.0));
    assert_eq!(
        whole.mean_time_to_resolve_seconds,
        Some((300.0 + 100.0 + 1200.0 + 30.0) / 4.0)
    );
    ledger.acknowledge_ticket(&f, "bob").await.unwrap();
    let whole = ledger.ticket_flow_measures().await.unwrap();
    assert_eq!((whole.open, whole.acknowledged_now), (1, 1));
    ledger.close().await;
}

pub async fn resolved_tickets_are_purged_after_retention_unless_a_sink_has_yet_to_hear(
    fixture: Fixture,
) {
    let clock = clock();
    let ledger = fixture.open(clock.clone()).await;
    let day = Duration::from_secs(24 * 3600);
    let cause = |reason: &str| RaisedException {
        reason: reason.into(),
        ..breaker()
    };
    let resolved_and_sent = |reason: &'static str, tell_sink: bool| {
        let ledger = ledger.clone();
        async move {
            let fp = ledger.raise_exception(cause(reason)).await.unwrap();
            ledger
                .assign_ticket(&fp, &assignment("ana", &["jira"]))
                .await
                .unwrap();
            ledger.clear_exception(&fp).await.unwrap();
            let version = ledger.ticket(&fp).await.unwrap().unwrap().version;
            let sent = if tell_sink { version } else { version - 1 };
            ledger
                .finish_ticket_delivery(&fp, "jira", sent, json!({"key": reason}))
                .await
                .unwrap();
            fp
        }
    };
    let told = resolved_and_sent("told", true).await;
    let untold = resolved_and_sent("untold", false).await;
    let open = ledger.raise_exception(cause("still-open")).await.unwrap();
    ledger
        .assign_ticket(&open, &assignment("ana", &["jira"]))
        .await
        .unwrap();
    let opened_before = ledger.ticket_flow_measures().await.unwrap().opened;

    clock.advance(2 * day);
    let recent = resolved_and_sent("recent", true).await;
    let gone = ledger.purge_tickets(day, 100).await.unwrap();
    assert_eq!(
        gone,
        std::slice::from_ref(&told),
        "only the old, resolved and told ticket goes"
    );
    assert!(ledger.ticket(&told).await.unwrap().is_none());
    for kept in [&untold, &open, &recent] {
        assert!(ledger.ticket(kept).await.unwrap().is_some(), "{kept} kept");
    }
    // The sink of the kept one still gets its resolution from the outbox.
    let due = ledger.ticket_deliveries_due(at(&clock), 100).await.unwrap();
    assert!(
        due.iter().any(|d| d.ticket.fingerprint == untold),
        "{due:?}"
    );
    // Its outbox row went with the purged ticket: jira waits for two tickets, none of them the purged one.
    let jira = ledger
        .ticket_sink_health()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.sink == "jira")
        .unwrap();
    assert_eq!(jira.pending, 2, "{jira:?}");
    // The flow's count of occurrences keeps the purged one.
    assert_eq!(
        ledger.ticket_flow_measures().await.unwrap().opened,
        opened_before + 1,
        "three before, the recent one after, and the purged one still counted"
    );

    // Told at last: it goes at the next round.
    let version = ledger.ticket(&untold).await.unwrap().unwrap().version;
    ledger
        .finish_ticket_delivery(&untold, "jira", version, json!({"key": "untold"}))
        .await
        .unwrap();
    assert_eq!(ledger.purge_tickets(day, 100).await.unwrap(), [untold]);
    // The cause coming back opens a new ticket.
    let again = ledger.raise_exception(cause("told")).await.unwrap();
    assert_eq!(again, told);
    let t = ledger.ticket(&again).await.unwrap().unwrap();
    assert_eq!((t.version, t.state, t.count), (1, TicketState::Open, 1));
    ledger.close().await;
}

/// A ledger last written by a meshline that knew schema version 7 migrates to tickets with its records, and
/// its records open tickets from then on.
pub async fn a_version_7_ledger_is_migrated_to_tickets(fixture: Fixture) {
    let clock = clock();
    let int = if fixture.backend() == "sqlite" {
        "INTEGER"
    } else {
        "BIGINT"
    };
    let mut v7 = format!(
        "CREATE TABLE meshline_schema (version {int} PRIMARY KEY, description TEXT NOT NULL, \
         applied_at {int} NOT NULL);\n"
    );
    for version in 1..=7 {
        for statement in
            ledger::migration_statements(fixture.backend(), version).expect("a version")
        {
            v7.push_str(statement);
            v7.push_str(";\n");
        }
        v7.push_str(&format!(
            "INSERT INTO meshline_schema VALUES ({version}, 'v{version}', {T0});\n"
        ));
    }
    v7.push_str(&format!(
        "INSERT INTO records (id, flow, source_key, idempotency_key, generation, payload_hash, \
         contract_version, state, next_attempt_at, bucket, correlation_id, received_at, updated_at) \
         VALUES (1, '{FLOW}', 'old', 'Opportunity/old', 1, 'h', '1.0.0', 'received', {T0}, 1, 'c-old', {T0}, {T0});\n\
         INSERT INTO payloads (record_id, body) VALUES (1, '{{}}');\n"
    ));
    fixture.execute(&v7).await;

    let ledger = fixture.open(clock.clone()).await;
    assert_eq!(
        deliver_claimed(ledger.as_ref(), |k| dead_letter("erp:422", k)).await,
        1
    );
    let t = ticket(ledger.as_ref(), &dead_letter_ticket("erp:422")).await;
    assert_eq!((t.count, t.outstanding), (1, 1));
    assert_eq!(t.examples[0].correlation_id, "c-old");
    ledger.close().await;
}
