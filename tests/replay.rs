//! `meshline replay`, the preflight replay Job, against real ledgers filled by a real worker: the embedded
//! SQLite ledger read from its file, a PostgreSQL ledger read through its URL Secret, and an embedded ledger
//! read through the running worker's operations API (`--from-worker`), which asks for the flow's token.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshline::rollout::replay::{PathCount, Report, Verdict};
use reliability::*;
use serde_json::Value;

/// Good records sent (numbered 0..GOOD), and records whose price drifts (rejected by both contracts).
const GOOD: usize = 40;
const DRIFTED: usize = 2;

/// Sends the traffic to a fresh worker and waits until every record is delivered or dead-lettered.
async fn fill(worker: &mut WorkerProcess) {
    worker.start().await;
    let http = client();
    let mut crm = CrmStats::default();
    let (batches, _, _) = traffic(GOOD, 10, &[]);
    for batch in &batches {
        deliver_batch(
            &http,
            &[worker.url()],
            batch,
            &mut crm,
            Duration::from_secs(60),
        )
        .await;
    }
    let drifted: Vec<Value> = (GOOD..GOOD + DRIFTED).map(drifted_opportunity).collect();
    deliver_batch(
        &http,
        &[worker.url()],
        &drifted,
        &mut crm,
        Duration::from_secs(60),
    )
    .await;
    worker
        .wait_for("every record settled", Duration::from_secs(60), |s| {
            counter(s, "delivered") == GOOD as i64
                && counter(s, "deadLettered") == DRIFTED as i64
                && s["pending"] == 0
        })
        .await;
}

/// The flow's contract with `edit` applied, written to `name` in the flow's directory: as a manifest, or
/// (with `bare`) as a bare spec.
fn candidate(files: &FlowFiles, name: &str, bare: bool, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut contract = serde_json::to_value(&files.rendered.contract).expect("contract");
    contract["spec"]["version"] = "1.3.0".into();
    edit(&mut contract["spec"]);
    let path = files.dir.path().join(name);
    let doc = if bare {
        contract["spec"].clone()
    } else {
        contract
    };
    std::fs::write(&path, serde_yaml::to_string(&doc).expect("yaml")).expect("candidate file");
    path
}

/// The candidate that changes an output: the memo gets a prefix.
fn memo_prefixed(files: &FlowFiles) -> PathBuf {
    candidate(files, "memo.yaml", false, |spec| {
        for field in spec["mapping"]["fields"].as_array_mut().expect("fields") {
            if field["target"] == "memo" {
                field["expression"] = r#""Order: " + record.name"#.into();
            }
        }
    })
}

/// A new rule that rejects the records numbered 5, 15, 25 and 35 (as a bare spec).
fn rejecting_rule(files: &FlowFiles) -> PathBuf {
    candidate(files, "rule.yaml", true, |spec| {
        spec["rules"]
            .as_array_mut()
            .expect("rules")
            .push(serde_json::json!({
                "name": "no-fives",
                "expression": r#"!record.name.endsWith("5 revision 1")"#,
                "message": "orders numbered ...5 are refused",
                "action": "reject",
            }));
    })
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    report: Option<Report>,
}

async fn replay(files: &FlowFiles, state_dir: &Path, candidate: &Path, extra: &[&str]) -> Run {
    let report = files.dir.path().join(format!(
        "report-{}.json",
        candidate.file_stem().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&report);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshline"))
        .arg("replay")
        .arg("--config")
        .arg(files.flow_file())
        .arg("--candidate")
        .arg(candidate)
        .arg("--report")
        .arg(&report)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--secrets-dir")
        .arg(files.secrets_dir())
        .arg("--lookups-dir")
        .arg(files.lookups_dir())
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run meshline replay");
    let text = std::fs::read_to_string(&report).ok();
    if let Some(text) = &text {
        assert!(
            text.len() <= 4096,
            "termination message of {} bytes",
            text.len()
        );
    }
    Run {
        code: out.status.code().expect("an exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report: text.map(|t| Report::parse(&t).expect("the report parses")),
    }
}

/// The promises every backend keeps: a changed output is counted by path and passes; a rule that newly
/// rejects records fails the default threshold, naming the numbers.
async fn changed_outputs_pass_and_new_rejections_fail(
    files: &FlowFiles,
    state_dir: &Path,
    extra: &[&str],
) {
    let run = replay(files, state_dir, &memo_prefixed(files), extra).await;
    assert_eq!(
        run.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    let report = run.report.expect("a report");
    assert_eq!(report.verdict, Verdict::Passed);
    assert_eq!(report.records, (GOOD + DRIFTED) as u64);
    assert_eq!(report.changed_outputs, GOOD as u64, "{report:?}");
    assert_eq!(
        report.changed_paths,
        vec![PathCount {
            path: "memo".into(),
            records: GOOD as u64
        }]
    );
    assert_eq!(
        (
            report.newly_rejected,
            report.newly_held,
            report.newly_accepted
        ),
        (0, 0, 0)
    );
    assert_eq!(
        (
            report.active_version.as_str(),
            report.candidate_version.as_str()
        ),
        ("1.2.0", "1.3.0")
    );
    assert!(run.stdout.contains("preflight PASSED"), "{}", run.stdout);
    // No payload leaves in the report: the customers' e-mail addresses are nowhere in it.
    assert!(!run.stdout.contains("@acme.example"), "{}", run.stdout);

    let run = replay(files, state_dir, &rejecting_rule(files), extra).await;
    assert_eq!(
        run.code, 1,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    let report = run.report.expect("a report");
    assert_eq!(report.verdict, Verdict::Failed);
    assert_eq!(report.newly_rejected, 4, "{report:?}");
    assert_eq!(report.changed_outputs, 0);
    assert!(
        report
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("4 records newly rejected, over maxNewlyRejected 0")),
        "{report:?}"
    );
    assert!(
        report.examples.iter().all(|e| e
            .outcome
            .as_ref()
            .is_some_and(|o| o.before == "accepted"
                && o.after == "rejected:contract:rule_failed:rule:no-fives"))
    );

    // The same change passes when the flow tolerates four rejections.
    let mut tolerant = extra.to_vec();
    tolerant.extend(["--max-newly-rejected", "4"]);
    let run = replay(files, state_dir, &rejecting_rule(files), &tolerant).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_an_embedded_ledger_from_its_file() {
    let erp = Erp::start(ERP_TOKEN).await;
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Embedded, 4);
    let mut worker = WorkerProcess::new(&files, "sqlite");
    fill(&mut worker).await;
    worker.terminate().await;
    changed_outputs_pass_and_new_rejections_fail(&files, &files.state_dir("sqlite"), &[]).await;

    // A state directory without a ledger is an error, never a new empty ledger that passes.
    let empty = files.dir.path().join("no-ledger");
    let run = replay(&files, &empty, &memo_prefixed(&files), &[]).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("no embedded ledger at"),
        "{}",
        run.stderr
    );
    assert!(!empty.join("ledger.db").exists());
    let report = run.report.expect("a failed report is still written");
    assert_eq!(report.verdict, Verdict::Failed);
    assert_eq!(report.candidate_version, "1.3.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_a_postgres_ledger() {
    let pg = postgres::PgServer::start();
    let erp = Erp::start(ERP_TOKEN).await;
    let files = FlowFiles::new(
        &erp.base_url(),
        LedgerChoice::Postgres(pg.create_database("replay")),
        4,
    );
    let mut worker = WorkerProcess::new(&files, "pg");
    fill(&mut worker).await;
    // The worker keeps running: a preflight reads the ledger alongside it.
    changed_outputs_pass_and_new_rejections_fail(&files, &files.state_dir("job"), &[]).await;
    worker.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_an_embedded_ledger_through_the_workers_operations_api() {
    let erp = Erp::start(ERP_TOKEN).await;
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Embedded, 4);
    let mut worker = WorkerProcess::new(&files, "sqlite");
    fill(&mut worker).await;
    // The Job has no volume: its state directory is empty, the records come from the worker.
    let nowhere = files.dir.path().join("job-state");
    let ops = worker.ops_url();
    let token = files.token_file();
    let extra = [
        "--from-worker",
        ops.as_str(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    changed_outputs_pass_and_new_rejections_fail(&files, &nowhere, &extra).await;

    let wrong = files.dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let run = replay(
        &files,
        &nowhere,
        &memo_prefixed(&files),
        &[
            "--from-worker",
            ops.as_str(),
            "--token-file",
            wrong.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(run.stderr.contains("401"), "{}", run.stderr);
    let report = run.report.expect("a failed report");
    assert_eq!(report.verdict, Verdict::Failed);
    assert!(report.reason.unwrap().contains("token is required"));

    // The route's bound is stated, not silently clamped.
    let r = client()
        .get(format!("{ops}/records/recent?limit=100001"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("from 1 to 100000"));
    // Newest first, a bounded number.
    let r = client()
        .get(format!("{ops}/records/recent?limit=3"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines: Vec<Value> = r
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["id"].as_i64() > lines[1]["id"].as_i64());
    assert_eq!(lines[0]["sourceKey"], opportunity_id(GOOD + DRIFTED - 1));
    worker.terminate().await;
}

#[tokio::test]
async fn a_bad_candidate_names_its_file_and_field_and_still_leaves_a_report() {
    let files = FlowFiles::new("http://127.0.0.1:9/erp", LedgerChoice::Embedded, 1);
    let bad = candidate(&files, "bad.yaml", true, |spec| {
        spec["rules"][0]["action"] = "explode".into();
    });
    let run = replay(&files, &files.state_dir("none"), &bad, &[]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("bad.yaml") && run.stderr.contains("spec.rules[0].action"),
        "{}",
        run.stderr
    );
    let report = run.report.expect("a failed report");
    assert_eq!(report.verdict, Verdict::Failed);
    assert!(report.reason.unwrap().contains("spec.rules[0].action"));

    let broken = candidate(&files, "broken.yaml", false, |spec| {
        spec["rules"][0]["expression"] = "record.stageName ==".into();
    });
    let run = replay(&files, &files.state_dir("none"), &broken, &[]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("broken.yaml") && run.stderr.contains("spec.rules[0].expression"),
        "{}",
        run.stderr
    );
}
