//! Poison: through the real `meshline worker` binary and the `meshline dlq` CLI. A record that breaks the
//! contract and records the ERP refuses with a 400 become dead letters with their reasons (and the ERP's
//! answer) without holding up the good records; once the causes are fixed, replaying them with the CLI —
//! one by id, the others by reason — delivers them.

#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::process::Command;
use std::time::Duration;

use reliability::*;
use serde_json::{Value, json};

/// Runs `meshline <args>`; returns (success, stdout, stderr).
async fn meshline(args: Vec<String>) -> (bool, String, String) {
    meshline_with_env(args, &[]).await
}

/// [`meshline`] with environment variables set (and no token taken from the test's own environment).
async fn meshline_with_env(args: Vec<String>, env: &[(&str, &str)]) -> (bool, String, String) {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_meshline"))
            .args(&args)
            .env_remove("MESHLINE_TOKEN")
            .env_remove("MESHLINE_TOKEN_FILE")
            .env_remove("MESHLINE_WORKER_URL")
            .envs(env)
            .output()
            .expect("run the meshline CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("CLI task")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The `ID` column of the `dlq list` line naming `key`.
fn listed_id(listing: &str, key: &str) -> String {
    listing
        .lines()
        .find(|l| l.contains(key))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{key} is not in the dead-letter list:\n{listing}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_with_reasons_and_replay_after_a_fix_delivers_them() {
    let erp = Erp::start(ERP_TOKEN).await;
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Embedded, 4);
    let mut worker = WorkerProcess::new(&files, "poison");
    worker.start().await;
    // The CRM posts to the webhook port; people and the CLI use the operations port, with the flow's token.
    let url = worker.url();
    let ops = worker.ops_url();
    let _evidence = EvidenceOnFailure::new(vec![ops.clone()]);
    let token_file = files.token_file().display().to_string();

    // Two orders name items the ERP does not have yet (400); one drifts 16 % from the pricebook.
    erp.refuse(&external_id(101));
    erp.refuse(&external_id(102));
    let mut batch: Vec<Value> = (0..20).map(|n| opportunity(n, 1)).collect();
    batch.insert(5, drifted_opportunity(100));
    batch.insert(10, opportunity(101, 1));
    batch.push(opportunity(102, 1));
    let mut crm = CrmStats::default();
    deliver_batch(
        &client(),
        std::slice::from_ref(&url),
        &batch,
        &mut crm,
        Duration::from_secs(120),
    )
    .await;

    let status = worker
        .wait_for(
            "20 delivered and 3 dead letters",
            Duration::from_secs(120),
            |s| {
                counter(s, "delivered") == 20
                    && counter(s, "deadLettered") == 3
                    && s["pending"] == 0
            },
        )
        .await;
    assert_eq!(
        erp.orders().len(),
        20,
        "poison records never block the good ones"
    );
    assert!(
        status["circuitBreaker"].is_null(),
        "record failures are not flow failures: {status}"
    );

    // The dead letters are for the flow's token holders: without a token, or with another, the CLI says so
    // and fails.
    let (ok, _, err) = meshline(args(&["dlq", "list", "--url", &ops])).await;
    assert!(
        !ok && err.contains("HTTP 401") && err.contains("none was given") && err.contains("--flow"),
        "dlq list without a token fails and says how to get one: {err}"
    );
    let (ok, _, err) = meshline_with_env(
        args(&["dlq", "list", "--url", &ops]),
        &[("MESHLINE_TOKEN", "guess")],
    )
    .await;
    assert!(
        !ok && err.contains("HTTP 401") && err.contains("refused the token"),
        "dlq list with a wrong token fails: {err}"
    );
    // The webhook port, the one an Ingress exposes, has no dead letters to show at all.
    let (ok, _, err) = meshline(args(&[
        "dlq",
        "list",
        "--url",
        &url,
        "--token-file",
        &token_file,
    ]))
    .await;
    assert!(!ok && err.contains("404"), "{err}");

    // The dead letters, with their reasons, as people see them.
    let (ok, listing, err) = meshline(args(&[
        "dlq",
        "list",
        "--url",
        &ops,
        "--token-file",
        &token_file,
    ]))
    .await;
    assert!(ok, "dlq list failed: {err}");
    let drift_line = listing
        .lines()
        .find(|l| l.contains(&opportunity_id(100)))
        .unwrap_or_else(|| panic!("the drifted record is listed:\n{listing}"));
    assert!(
        drift_line.contains("price-tolerance"),
        "the contract rule is the reason: {drift_line}"
    );
    for n in [101, 102] {
        let line = listing
            .lines()
            .find(|l| l.contains(&opportunity_id(n)))
            .unwrap_or_else(|| panic!("record {n} is listed:\n{listing}"));
        assert!(
            line.contains("erp:400"),
            "the ERP's status is the reason: {line}"
        );
    }
    // One dead letter per request: the CLI pages until it has every one with the reason (the drifted
    // record, first by id, has another reason and must neither be listed nor end the paging).
    let (ok, by_reason, err) = meshline(args(&[
        "dlq",
        "list",
        "--url",
        &ops,
        "--token-file",
        &token_file,
        "--reason",
        "erp:400",
        "--page-size",
        "1",
    ]))
    .await;
    assert!(ok, "dlq list --reason failed: {err}");
    assert!(
        !by_reason.contains(&opportunity_id(100))
            && by_reason.contains(&opportunity_id(101))
            && by_reason.contains(&opportunity_id(102)),
        "{by_reason}"
    );

    let refused_id = listed_id(&listing, &opportunity_id(101));
    let (ok, story, err) = meshline_with_env(
        args(&["dlq", "show", &refused_id]),
        &[("MESHLINE_WORKER_URL", &ops), ("MESHLINE_TOKEN", API_TOKEN)],
    )
    .await;
    assert!(ok, "dlq show failed: {err}");
    assert!(
        story.contains("INVALID_KEY_OR_REF"),
        "the ERP's answer is kept with the dead letter:\n{story}"
    );
    assert!(
        !story.contains("alice.buyer@acme.example"),
        "PII never leaves through the CLI"
    );

    // Replaying is a manual intervention: refused without the token.
    let (ok, _, err) = meshline(args(&[
        "dlq", "replay", "--url", &ops, "--reason", "erp:400", "--actor", "marcus",
    ]))
    .await;
    assert!(
        !ok && err.contains("401"),
        "replay without a token is refused: {err}"
    );
    assert_eq!(counter(&worker.status().await.unwrap(), "deadLettered"), 3);

    // Finance creates the items in NetSuite, then replays everything refused for that reason.
    erp.accept_everything();
    let (ok, out, err) = meshline(args(&[
        "dlq",
        "replay",
        "--url",
        &ops,
        "--token-file",
        &token_file,
        "--reason",
        "erp:400",
        "--actor",
        "marcus",
        "--why",
        "items created in NetSuite",
    ]))
    .await;
    assert!(ok, "replay by reason failed: {err}");
    assert!(out.contains("replayed"), "{out}");
    worker
        .wait_for(
            "the refused orders delivered",
            Duration::from_secs(120),
            |s| counter(s, "delivered") == 22 && counter(s, "deadLettered") == 1,
        )
        .await;

    // Finance raises the pricebook's price (the drifted 290.00 is within 5 % of 285.00); the worker is
    // restarted gracefully to load it, and the dead letter survives the restart in the ledger.
    let mut pricebook = pricebook();
    pricebook["SKU-1002"]["unitPrice"] = json!("285.00");
    files.set_pricebook(&pricebook);
    worker.terminate().await;
    worker.start().await;
    let drifted_id = listed_id(&listing, &opportunity_id(100));
    let (ok, _, err) = meshline(args(&[
        "dlq",
        "replay",
        "--url",
        &ops,
        "--token-file",
        &token_file,
        &drifted_id,
        "--actor",
        "priya",
        "--why",
        "pricebook updated",
    ]))
    .await;
    assert!(ok, "replay by id failed: {err}");
    let status = worker
        .wait_for("every record delivered", Duration::from_secs(120), |s| {
            counter(s, "delivered") == 23 && counter(s, "deadLettered") == 0 && s["pending"] == 0
        })
        .await;
    let (ok, listing, err) = meshline(args(&[
        "dlq",
        "list",
        "--url",
        &ops,
        "--token-file",
        &token_file,
    ]))
    .await;
    assert!(
        ok && listing.contains("no dead letters"),
        "the dead letters are empty: {listing}{err}"
    );

    let orders = erp.orders();
    assert_eq!(orders.len(), 23, "every record is in the ERP once");
    let lines = orders[&external_id(100)]["item"]["items"].to_string();
    assert!(
        lines.contains("290"),
        "the replayed order carries its own price: {lines}"
    );
    assert_eq!(
        status["manualInterventionsPer1k"], "130.43",
        "three replays over 23 records are recorded as interventions: {status}"
    );
    assert_eq!(erp.violations(), Vec::<String>::new());
}
