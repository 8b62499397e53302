//! `meshline ticket list|ack` against a real worker (the one `meshline dev` runs, on the example flow): a
//! dead letter becomes a ticket the CLI lists, its owner acknowledges it in their own name, and a token that
//! is nobody's or a `--by` naming someone else is refused with the worker's reason and a non-zero exit.
//! Also the worker's `PUT /exceptions`: the controller's causes never clear a record's own ticket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshline::dev::{self, DevOptions};
use meshline::sim::crm::{DealKind, opportunity};

/// Runs `meshline <args>` with only the given identity token (none from the test's own environment).
async fn meshline(args: Vec<String>, identity: Option<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshline"));
        command
            .args(&args)
            .env_remove("MESHLINE_TOKEN")
            .env_remove("MESHLINE_TOKEN_FILE")
            .env_remove("MESHLINE_WORKER_URL")
            .env_remove("MESHLINE_IDENTITY_TOKEN");
        if let Some(i) = identity {
            command.env("MESHLINE_IDENTITY_TOKEN", i);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn started(tmp: &tempfile::TempDir) -> dev::DevEnv {
    dev::start(&DevOptions {
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
        state: Some(tmp.path().join("state")),
        fresh: false,
        port: 0,
        ops_port: 0,
    })
    .await
    .unwrap()
}

/// Closes one deal whose price drifts past the contract's tolerance: a dead letter whose reason is
/// `contract:rule_failed:rule:price-tolerance`, so a ticket routed to the source owner.
async fn price_drift(env: &dev::DevEnv) {
    let pricebook: Vec<_> = env
        .erp
        .pricebook
        .iter()
        .map(|(k, (p, _))| (k.clone(), *p))
        .collect();
    env.crm
        .send(
            &[opportunity(0, DealKind::PriceDrift, &pricebook)],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
}

async fn put_causes(env: &dev::DevEnv, causes: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .put(format!("{}/exceptions", env.ops_url()))
        .bearer_auth(&env.token)
        .json(&causes)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_causes_never_clear_a_dead_letter_ticket_whose_reason_starts_with_contract()
{
    let tmp = tempfile::tempdir().unwrap();
    let env = started(&tmp).await;
    price_drift(&env).await;
    let ledger = env.worker.pipeline.ledger.clone();
    let dead = loop {
        let open = ledger.tickets(true, 100).await.unwrap();
        if let Some(t) = open
            .iter()
            .find(|t| t.reason.starts_with("contract:rule_failed"))
        {
            break t.fingerprint.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rejected = serde_json::json!({"causes": [{"kind": "contract_rejected", "class": "Config",
        "reason": "contract:FailureLimitReached:2.0.0", "summary": "rolled back by its canary"}]});
    let (code, body) = put_causes(&env, rejected).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["raised"], 1, "{body}");
    // The controller no longer sees the rejection: its ticket clears, the dead letter's stays.
    let (code, body) = put_causes(&env, serde_json::json!({"causes": []})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cleared"], 1, "only the contract's own ticket: {body}");
    let ticket = ledger.ticket(&dead).await.unwrap().unwrap();
    assert_ne!(
        ticket.state,
        meshline::tickets::TicketState::Resolved,
        "the dead letter is still there: {ticket:?}"
    );
    // A reported cause may not pose as a record's own ticket.
    let (code, body) = put_causes(
        &env,
        serde_json::json!({"causes": [{"kind": "dead_letter", "reason": "contract:x", "summary": "s"}]}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("causes[0].kind"),
        "{body}"
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_lists_and_acknowledges_a_ticket_and_anyone_else_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let env = started(&tmp).await;
    price_drift(&env).await;
    let flow = env.flow.clone();
    let token_file = env.token_file().display().to_string();
    let base = |sub: &str| -> Vec<String> {
        [
            "ticket",
            sub,
            flow.as_str(),
            "--url",
            &env.ops_url(),
            "--token-file",
            &token_file,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // Wait on the state: the ticket exists and the dispatcher has given it to its owner.
    let fingerprint = loop {
        let mut args = base("list");
        args.push("--json".into());
        let (ok, out, err) = meshline(args, None).await;
        assert!(ok, "{err}");
        let tickets: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(t) = tickets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == "dead_letter" && t["owner"]["id"] == "priya")
        {
            break t["fingerprint"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ok, table, err) = meshline(base("list"), None).await;
    assert!(ok, "{err}");
    assert!(
        table.contains(&fingerprint)
            && table.contains("price-tolerance")
            && table.contains("priya"),
        "{table}"
    );

    let ack = |by: &str| {
        let mut args = base("ack");
        args.push(fingerprint.clone());
        args.extend(["--by".to_string(), by.to_string()]);
        args
    };
    // A token that is nobody's: refused, with the worker's reason.
    let (ok, out, err) = meshline(ack("priya"), Some("not-anyones-token".into())).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("HTTP 403") && err.contains("personal token"),
        "{err}"
    );
    // Marcus's token with `--by priya`: a person acts only in their own name.
    let marcus = env.identities["marcus"].clone();
    let (ok, out, err) = meshline(ack("priya"), Some(marcus)).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("HTTP 403") && err.contains("\"marcus\"'s"),
        "{err}"
    );
    // No personal token at all: the CLI says how to give one before calling anyone.
    let (ok, _, err) = meshline(ack("priya"), None).await;
    assert!(!ok);
    assert!(err.contains("MESHLINE_IDENTITY_TOKEN"), "{err}");
    let listed = env
        .worker
        .pipeline
        .ledger
        .tickets(false, 100)
        .await
        .unwrap();
    assert!(
        listed.iter().all(|t| t.acknowledged_by.is_none()),
        "no refused request acknowledged anything"
    );

    // Priya, from her token file.
    let file = tmp.path().join("priya-token");
    std::fs::write(&file, &env.identities["priya"]).unwrap();
    let mut args = ack("priya");
    args.extend([
        "--identity-token-file".to_string(),
        file.display().to_string(),
    ]);
    let (ok, out, err) = meshline(args, None).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("ticket {fingerprint} acknowledged by priya")),
        "{out}"
    );
    let (ok, table, err) = meshline(base("list"), None).await;
    assert!(ok, "{err}");
    assert!(
        table.contains("acknowledged") && table.contains("(ack priya)"),
        "{table}"
    );
    env.shutdown().await;
}
