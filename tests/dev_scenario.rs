//! `meshline dev`: the default scenario runs in-process against the stand-ins and reconciles; bad input gets
//! a clear error and leaves nothing behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshline::dev::{self, DevError, DevOptions, ScenarioOptions};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite")
}

fn options(dir: PathBuf, state: PathBuf) -> DevOptions {
    DevOptions {
        dir,
        state: Some(state),
        fresh: false,
        port: 0,
        ops_port: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_scenario_reconciles_every_closed_deal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = dev::start(&options(example(), tmp.path().join("state")))
        .await
        .unwrap();
    let scenario = ScenarioOptions {
        records: 60,
        rate: 200.0,
        progress: false,
        timeout: Duration::from_secs(90),
    };
    let report = dev::run_scenario(&mut env, &scenario).await.unwrap();
    let c = &report.status.counters;

    assert!(
        report.unexplained.is_empty(),
        "every difference is explained: {report}"
    );
    // The scenario's deals, and those closed while the contract changes were canaried.
    let canary_deals: usize = report
        .contract_changes
        .iter()
        .filter_map(|c| c.canary.as_ref())
        .map(|c| c.deals_sent)
        .sum();
    assert!(canary_deals > 0, "{report}");
    assert_eq!(report.deals_closed, 60 + canary_deals, "{report}");
    // Every closed deal is an ERP order exactly once, or a dead letter with its reason.
    assert_eq!(
        report.erp_orders + report.explained.len(),
        report.deals_closed,
        "{report}"
    );
    assert_eq!(
        report.erp_upserts as usize, report.erp_orders,
        "no order was written twice: {report}"
    );
    // The report's counts are the ledger's and the ERP's.
    assert_eq!(c.delivered as usize, report.erp_orders, "{report}");
    assert_eq!(
        c.received as usize, report.deals_closed,
        "the duplicate webhook was not received twice: {report}"
    );
    assert_eq!(c.dead_lettered as usize, report.explained.len());
    assert!(
        report.duplicates >= 10,
        "the re-sent webhook batch is recognised: {report}"
    );
    let reasons: Vec<&str> = report.explained.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("price-tolerance")),
        "price drift is rejected by the contract: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("erp:400")),
        "the ERP's permanent rejection is kept: {reasons:?}"
    );
    assert_eq!(
        report.approvals, 1,
        "the large discount was held and approved"
    );
    assert_eq!(c.held, 0);
    assert!(c.retried > 0, "the ERP outage caused retries: {report}");
    assert_ne!(report.status.manual_interventions_per_1k, "0");
    let text = report.to_string();
    assert!(
        text.contains("reconciled") && text.contains("/records/"),
        "{text}"
    );
    assert!(!text.contains("@customer"), "no PII in the report: {text}");
    exceptions_became_tickets_the_receiver_got(&report, &text);
    the_real_audit_reconciled(&report, &text);
    the_page_shows_the_flow_and_its_audit(&env, &report).await;
    env.shutdown().await;
}

/// The reconciliation is the real audit's (the worker's `/audit/runs`, reading the CRM org with SOQL and the
/// ERP with SuiteQL), and its counts are the scenario's.
fn the_real_audit_reconciled(report: &dev::Report, text: &str) {
    let audit = report.audit.as_ref().expect("the scenario ran an audit");
    assert_eq!(
        audit.outcome,
        Some(meshline::api::AuditOutcome::Reconciled),
        "{text}"
    );
    assert_eq!(audit.crm.count as usize, report.deals_closed, "{text}");
    assert_eq!(audit.erp.count as usize, report.erp_orders, "{text}");
    assert_eq!(audit.matched as usize, report.erp_orders, "{text}");
    assert_eq!(audit.unexplained, 0, "{text}");
    let explained: i64 = audit.explained.values().sum();
    assert_eq!(
        explained as usize,
        report.explained.len(),
        "each missing order is explained by the ledger: {text}"
    );
    assert!(
        text.contains(&format!("reconciliation audit (run {})", audit.run)),
        "{text}"
    );
}

/// The operations page `meshline dev` serves reads the running worker: the flow, its counts and the audit.
async fn the_page_shows_the_flow_and_its_audit(env: &dev::DevEnv, report: &dev::Report) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let page = tokio::spawn(meshline::ops_page::serve(
        listener,
        std::sync::Arc::new(env.page_backend()),
    ));
    let body = reqwest::get(format!("http://{addr}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    page.abort();
    let audit = report.audit.as_ref().unwrap();
    assert!(body.contains(&env.flow), "{body}");
    assert!(
        body.contains(&format!("reconciled (run {}", audit.run)),
        "the page shows the last audit: {body}"
    );
    assert!(
        body.contains(&format!(
            "CRM {} · ERP {}",
            audit.crm.count, audit.erp.count
        )),
        "{body}"
    );
    assert!(!body.contains("@customer"), "no PII on the page: {body}");
}

/// The run's exceptions are tickets routed to named owners, delivered (signed) to the local receiver, one
/// acknowledged by its owner and the approved hold resolved; the report's numbers are the run's own.
fn exceptions_became_tickets_the_receiver_got(report: &dev::Report, text: &str) {
    let t = &report.tickets;
    let c = &report.status.counters;
    assert_eq!(t.refused, 0, "every request was signed correctly: {text}");
    let dead: Vec<_> = t
        .tickets
        .iter()
        .filter(|t| t.kind == "dead_letter")
        .collect();
    // One ticket per cause, never one per record: the dead letters' reasons are the tickets' causes.
    let mut reasons: Vec<String> = report
        .explained
        .iter()
        .map(|e| e.reason.split(':').take(2).collect::<Vec<_>>().join(":"))
        .collect();
    reasons.sort();
    reasons.dedup();
    assert!(!dead.is_empty() && dead.len() <= reasons.len(), "{text}");
    assert!(
        dead.len() < c.dead_lettered as usize,
        "dead letters of one cause share a ticket: {text}"
    );
    let counted: u64 = dead.iter().map(|t| t.count).sum();
    assert_eq!(counted, c.dead_lettered as u64, "{text}");
    // Routed by the roster: the price drift to the source owner, the ERP's rejection to the sink owner.
    let owner = |reason: &str| {
        dead.iter()
            .find(|t| t.reason.contains(reason))
            .map(|t| t.owner.clone())
    };
    assert_eq!(owner("price-tolerance").as_deref(), Some("priya"), "{text}");
    assert_eq!(owner("erp:400").as_deref(), Some("marcus"), "{text}");
    for ticket in dead.iter() {
        // Nothing replayed the scenario's dead letters, so each of their tickets is still open (reporting
        // the canary's rollback must not clear `contract:rule_failed:…`).
        assert!(
            ticket.state != "resolved" && ticket.outstanding > 0,
            "{ticket:?}: {text}"
        );
    }
    for ticket in &t.tickets {
        assert_eq!(
            ticket.events.first().map(String::as_str),
            Some(if ticket.state == "resolved" && ticket.events.len() == 1 {
                "resolved"
            } else {
                "opened"
            }),
            "each ticket starts with its opening at the receiver: {ticket:?}"
        );
        assert!(!ticket.sinks.is_empty(), "{ticket:?}");
    }
    // The approved hold's ticket resolved, and the receiver saw it open and then resolve.
    let hold = t
        .tickets
        .iter()
        .find(|t| t.kind == "hold")
        .unwrap_or_else(|| panic!("the held discount is a ticket: {text}"));
    assert_eq!(hold.state, "resolved", "{text}");
    assert_eq!(hold.outstanding, 0, "{text}");
    assert_eq!(
        hold.events.last().map(String::as_str),
        Some("resolved"),
        "{text}"
    );
    // One dead-letter ticket acknowledged by its owner, as that owner.
    let (fingerprint, by) = t.acknowledged.clone().expect("a ticket was acknowledged");
    let acked = t
        .tickets
        .iter()
        .find(|t| t.fingerprint == fingerprint)
        .unwrap();
    assert_eq!(
        acked.acknowledged_by.as_deref(),
        Some(by.as_str()),
        "{text}"
    );
    assert_eq!(acked.owner, by, "{text}");
    let stats = t
        .owners
        .iter()
        .find(|o| o.owner == by)
        .unwrap_or_else(|| panic!("{by} has ticket stats: {text}"));
    assert!(stats.acknowledged >= 1, "{text}");
    assert!(stats.time_to_acknowledge_seconds.is_some(), "{text}");
    assert!(
        t.owners
            .iter()
            .any(|o| o.resolved >= 1 && o.time_to_resolve_seconds.is_some()),
        "{text}"
    );
    // The canary's rollback is reported as the controller would, and is a ticket too.
    assert!(
        t.tickets
            .iter()
            .any(|t| t.kind == "contract_rejected" && t.reason.starts_with("contract:")),
        "{text}"
    );
    assert!(text.contains("Tickets:"), "{text}");
    assert!(
        text.contains(&format!("acknowledged by {by}")) && text.contains("opened → "),
        "{text}"
    );
}

#[tokio::test]
async fn a_directory_without_manifests_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let state = tmp.path().join("state");
    let err = dev::start(&options(empty, state.clone()))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, DevError::Manifests(_)), "{err}");
    assert!(err.to_string().contains("no .yaml"), "{err}");
    assert!(!state.exists(), "no state is left behind");
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_their_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broken");
    std::fs::create_dir(&dir).unwrap();
    for name in ["contract", "roster"] {
        std::fs::copy(
            example().join(format!("{name}.yaml")),
            dir.join(format!("{name}.yaml")),
        )
        .unwrap();
    }
    let flow = std::fs::read_to_string(example().join("flow.yaml"))
        .unwrap()
        .replace("weight: 50", "weight: 5");
    std::fs::write(dir.join("flow.yaml"), flow).unwrap();
    let state = tmp.path().join("state");
    let err = dev::start(&options(dir, state.clone()))
        .await
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("canary weights must increase"),
        "{err}"
    );
    assert!(!state.exists());
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error_and_leaves_no_state() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let state = tmp.path().join("state");
    let mut opts = options(example(), state.clone());
    opts.port = port;
    let err = dev::start(&opts).await.err().expect("must fail");
    assert!(
        err.to_string()
            .contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        !state.exists(),
        "a run that did not start leaves nothing behind"
    );
}

#[tokio::test]
async fn a_state_directory_from_another_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(
        state.join("state.json"),
        r#"{"format": 99, "meshline": "9.0.0", "flow": "closed-won-to-netsuite"}"#,
    )
    .unwrap();
    let err = dev::start(&options(example(), state.clone()))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, DevError::State { .. }), "{err}");
    assert!(err.to_string().contains("--fresh"), "{err}");
    assert!(
        state.join("state.json").exists(),
        "the user's directory is not touched"
    );

    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let err = dev::start(&options(example(), foreign.clone()))
        .await
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("not made by `meshline dev`"),
        "{err}"
    );
    assert!(foreign.join("notes.txt").exists());
}

#[tokio::test]
async fn an_unsupported_sink_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hubspot-odoo");
    let err = dev::start(&options(dir, tmp.path().join("s")))
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("NetSuite"), "{err}");
}

/// The scenario changes the contract three times (issues #14 and #15): a breaking change without a major
/// version is stopped at the compatibility gate; a compatible change is signed by the roster's owners, passes
/// a preflight replay of the run's records (which reports the new ERP field on every accepted record), is
/// canaried through every step and promoted; a change whose items the ERP rejects passes the preflight but
/// fails the canary's analysis and is rolled back. No record is lost or delivered twice through any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scenario_blocks_promotes_and_rolls_back_contract_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = dev::start(&options(example(), tmp.path().join("state")))
        .await
        .unwrap();
    let scenario = ScenarioOptions {
        records: 40,
        rate: 200.0,
        progress: false,
        timeout: Duration::from_secs(90),
    };
    let report = dev::run_scenario(&mut env, &scenario).await.unwrap();
    env.shutdown().await;
    let changes = &report.contract_changes;
    assert_eq!(changes.len(), 3, "{report}");
    let blocked = &changes[0];
    assert_eq!(blocked.blocked_at.as_deref(), Some("compatibility"));
    assert!(
        blocked
            .reason
            .as_deref()
            .unwrap()
            .contains("IncompatibleChange"),
        "{blocked:?}"
    );
    assert!(
        blocked.preflight.is_none(),
        "nothing runs after a failed gate"
    );

    let passed = &changes[1];
    assert_eq!(passed.blocked_at, None, "{passed:?}");
    assert!(!passed.signed_off_by.is_empty());
    let p = passed.preflight.as_ref().expect("a preflight report");
    assert!(p.passed(), "{p:?}");
    assert!(p.records > 0);
    assert_eq!(p.newly_rejected, 0);
    // Every record both versions accept gets the new field.
    assert!(p.changed_outputs > 0);
    assert!(
        p.changed_paths
            .iter()
            .any(|c| c.path.contains("custbody_meshline_channel") && c.records == p.changed_outputs),
        "{:?}",
        p.changed_paths
    );
    let text = report.to_string();
    assert!(text.contains("BLOCKED at the compatibility gate"), "{text}");
    assert!(text.contains("preflight passed"), "{text}");

    // The compatible change went through every step of the dev policy on passing analysis, then was promoted.
    let promoted = passed
        .canary
        .as_ref()
        .expect("the passing change is canaried");
    assert_eq!(promoted.phase, "Promoted", "{report}");
    assert_eq!(promoted.revision, format!("v{}", passed.version));
    let weights: Vec<i32> = promoted.steps.iter().map(|s| s.weight).collect();
    assert_eq!(weights, vec![20, 50, 100], "{report}");
    for step in &promoted.steps {
        assert!(
            !step.measurements.is_empty(),
            "step {} measured: {report}",
            step.step
        );
        for m in &step.measurements {
            assert_eq!(m.verdict, "Passed", "{m:?}");
            let canary = m.canary.as_ref().unwrap();
            assert!(canary.records >= 5, "minRecords of evidence: {m:?}");
            assert_eq!(canary.dead_lettered, 0, "{m:?}");
            assert!(m.stable.is_some());
        }
    }
    assert!(
        promoted.deals_sent > 0,
        "records kept flowing during the canary"
    );

    // The third change: the contract accepts it, the ERP does not; the first measurement fails and rolls back.
    let rejected = &changes[2];
    assert_eq!(
        rejected.from_version, passed.version,
        "it starts from the promoted version"
    );
    assert!(
        rejected.preflight.as_ref().is_some_and(|p| p.passed()),
        "the preflight cannot see the ERP's answer: {rejected:?}"
    );
    let rollback = rejected.canary.as_ref().expect("canaried");
    assert_eq!(rollback.phase, "Aborted", "{report}");
    assert_eq!(rollback.reason.as_deref(), Some("FailureLimitReached"));
    assert!(
        rollback
            .message
            .as_deref()
            .is_some_and(|m| m.contains("dead-letter rate") && m.contains("rolling back")),
        "{rollback:?}"
    );
    assert_eq!(
        rollback.steps.len(),
        1,
        "it never left its first step: {report}"
    );
    let failed = rollback.steps[0]
        .measurements
        .last()
        .expect("a measurement");
    assert_eq!(failed.verdict, "Failed");
    let canary = failed.canary.as_ref().unwrap();
    assert!(canary.dead_lettered >= 5, "{failed:?}");
    assert_eq!(
        canary.dead_letter_rate, "1",
        "every canary record was refused by the ERP: {failed:?}"
    );
    assert_eq!(
        failed.stable.as_ref().unwrap().dead_lettered,
        0,
        "{failed:?}"
    );

    // No record lost or delivered twice across the steps, the promotion and the rollback.
    assert!(report.unexplained.is_empty(), "{report}");
    assert_eq!(
        report.erp_orders + report.explained.len(),
        report.deals_closed,
        "{report}"
    );
    assert_eq!(report.erp_upserts as usize, report.erp_orders, "{report}");
    let c = &report.status.counters;
    assert_eq!(c.delivered as usize, report.erp_orders, "{report}");
    assert_eq!(c.dead_lettered as usize, report.explained.len(), "{report}");
    assert!(
        report
            .explained
            .iter()
            .any(|e| e.reason.contains("Invalid item reference key NS-")),
        "the canary's dead letters keep the ERP's answer: {report}"
    );
    assert!(text.contains("PROMOTED"), "{text}");
    assert!(text.contains("ROLLED BACK (FailureLimitReached)"), "{text}");
}
