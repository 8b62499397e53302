//! The Salesforce poller against a local org that checks OAuth, bearer tokens, SOQL and paging.

#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;
#[path = "support/salesforce_mock.rs"]
mod salesforce_mock;
#[path = "support/source_intake.rs"]
mod source_intake;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jsonwebtoken::EncodingKey;
use meshline::connectors::sources::salesforce::{
    ApiUsage, PollPace, SalesforceAuth, SalesforceConfig, SalesforcePoller,
};
use salesforce_mock::{CLIENT_ID, CLIENT_SECRET, USERNAME, opportunity};
use serde_json::{Value, json};
use source_intake::MemoryIntake;

/// The example flow's map (examples/salesforce-netsuite/flow.yaml), trimmed to the fields the org has.
fn field_map() -> BTreeMap<String, String> {
    [
        ("id", "Id"),
        ("name", "Name"),
        ("stageName", "StageName"),
        ("systemModstamp", "SystemModstamp"),
        ("accountName", "Account.Name"),
        ("amount", "Amount"),
        ("lineItems", "OpportunityLineItems"),
        ("lineItems[].sku", "ProductCode"),
        ("lineItems[].productName", "Product2.Name"),
        ("lineItems[].quantity", "Quantity"),
        ("lineItems[].unitPrice", "UnitPrice"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

fn config(base_url: &str) -> SalesforceConfig {
    SalesforceConfig {
        base_url: base_url.to_string(),
        api_version: "v61.0".into(),
        object: "Opportunity".into(),
        filter: Some("StageName = 'Closed Won'".into()),
        field_map: field_map(),
        limit: 2000,
        poll_interval: Duration::from_millis(50),
        source_name: "salesforce:Opportunity".into(),
        max_attempts: 4,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
    }
}

fn client_credentials() -> SalesforceAuth {
    SalesforceAuth::ClientCredentials {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
    }
}

fn jwt_bearer(login_url: &str) -> SalesforceAuth {
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/sources/jwt_test_key.pem"
    ))
    .unwrap();
    SalesforceAuth::JwtBearer {
        client_id: CLIENT_ID.into(),
        username: USERNAME.into(),
        key: EncodingKey::from_rsa_pem(&pem).unwrap(),
        login_url: login_url.into(),
    }
}

/// Five won deals, three of which share one SystemModstamp across the mock's 2-record page boundary, and one
/// open deal the filter leaves out.
fn org_records() -> Vec<Value> {
    vec![
        opportunity(
            "006A",
            "2024-05-01T10:00:00.000+0000",
            "Closed Won",
            Some("Acme"),
            &[("P-1", "Widget", 2.0, 10.0)],
        ),
        opportunity(
            "006B",
            "2024-05-01T11:00:00.000+0000",
            "Closed Won",
            Some("Globex"),
            &[("P-2", "Gadget", 1.0, 5.0)],
        ),
        opportunity(
            "006C",
            "2024-05-01T11:00:00.000+0000",
            "Closed Won",
            None,
            &[],
        ),
        opportunity(
            "006D",
            "2024-05-01T11:00:00.000+0000",
            "Closed Won",
            Some("Initech"),
            &[("P-1", "Widget", 3.0, 10.0)],
        ),
        opportunity(
            "006E",
            "2024-05-01T12:00:00.000+0000",
            "Closed Won",
            Some("Umbrella"),
            &[("P-3", "Gizmo", 1.0, 99.5)],
        ),
        opportunity(
            "006Z",
            "2024-05-01T12:30:00.000+0000",
            "Prospecting",
            Some("Hooli"),
            &[],
        ),
    ]
}

#[tokio::test]
async fn checkpoint_advances_only_after_the_page_is_stored() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let poller = SalesforcePoller::new(config(&org.base_url), client_credentials());
    let intake = MemoryIntake::default();
    // Pages: [A, B], [C, D], [E]. The second page's store fails.
    intake.fail_calls.lock().unwrap().insert(1);

    let err = poller.poll_once(&intake).await.unwrap_err();
    assert_eq!(err.label(), "source_intake", "{err}");
    assert_eq!(intake.keys(), ["006A", "006B"]);
    assert_eq!(
        intake.checkpoints.lock().unwrap()["salesforce:Opportunity"],
        "2024-05-01T11:00:00.000Z|006B",
        "the checkpoint is the first page's last record, not the failed page's"
    );

    let report = poller.poll_once(&intake).await.unwrap();
    assert_eq!(report.records, 3, "{report:?}");
    let second_query = org.org.queries.lock().unwrap().last().cloned().unwrap();
    assert!(
        second_query.contains("(SystemModstamp > 2024-05-01T11:00:00.000Z OR (SystemModstamp = 2024-05-01T11:00:00.000Z AND Id > '006B'))"),
        "{second_query}"
    );
    // The failed page's records are read again, the stored ones are not, and nothing is missing.
    assert_eq!(
        intake.accepted_keys(),
        ["006A", "006B", "006C", "006D", "006E"]
    );
    assert_eq!(
        intake.checkpoints.lock().unwrap()["salesforce:Opportunity"],
        "2024-05-01T12:00:00.000Z|006E"
    );

    let idle = poller.poll_once(&intake).await.unwrap();
    assert_eq!(
        (idle.records, idle.pages),
        (0, 0),
        "records sharing a SystemModstamp are not read twice"
    );
}

#[tokio::test]
async fn poll_resumes_from_the_checkpoint_after_restart() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let intake = Arc::new(MemoryIntake::default());
    let first = SalesforcePoller::new(config(&org.base_url), client_credentials());
    assert_eq!(first.poll_once(intake.as_ref()).await.unwrap().records, 5);
    drop(first);

    // While the worker was down: one new deal, and an existing one changed.
    {
        let mut records = org.org.records.lock().unwrap();
        records.push(opportunity(
            "006F",
            "2024-05-02T09:00:00.000+0000",
            "Closed Won",
            Some("Stark"),
            &[],
        ));
        records[0]["StageName"] = json!("Closed Won");
        records[0]["Amount"] = json!(25.0);
        records[0]["SystemModstamp"] = json!("2024-05-02T09:30:00.000+0000");
    }
    let tokens_before = org.org.token_requests.load(Ordering::SeqCst);

    // A new process: fresh token cache, same ledger. It runs until told to stop.
    let restarted = Arc::new(SalesforcePoller::new(
        config(&org.base_url),
        client_credentials(),
    ));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = {
        let (restarted, intake) = (restarted.clone(), intake.clone());
        tokio::spawn(async move { restarted.run(intake, shutdown).await })
    };
    // Wait for the state that matters (both changes taken in); the bound only keeps a bug from hanging.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    while intake.accepted_keys().len() < 7 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the restarted poller never read the changes: {:?}",
            intake.accepted_keys()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("run stops on shutdown")
        .unwrap()
        .unwrap();

    assert_eq!(
        intake.accepted_keys()[5..],
        ["006F", "006A"],
        "only what changed since the checkpoint is read"
    );
    let resumed_query = org.org.queries.lock().unwrap()[1].clone();
    assert!(
        resumed_query.contains("SystemModstamp = 2024-05-01T12:00:00.000Z AND Id > '006E'"),
        "{resumed_query}"
    );
    assert_eq!(intake.get("006A").unwrap().payload["amount"], json!(25.0));
    assert_eq!(
        org.org.token_requests.load(Ordering::SeqCst),
        tokens_before + 1,
        "a restarted poller gets a token"
    );
}

#[tokio::test]
async fn the_poller_stops_polling_while_the_intake_refuses_records() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let intake = Arc::new(MemoryIntake::default());
    *intake.paused.lock().unwrap() = Some(meshline::connectors::Backpressure {
        reason: "the ledger's volume is below its reserve".into(),
        retry_after: Duration::from_secs(30),
    });
    let poller = Arc::new(SalesforcePoller::new(
        config(&org.base_url),
        client_credentials(),
    ));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = {
        let (poller, intake) = (poller.clone(), intake.clone());
        tokio::spawn(async move { poller.run(intake, shutdown).await })
    };
    // The poller has looked three times (it waits the shorter of Retry-After and its poll interval).
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    while intake.backpressure_checks.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the poller never asked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        org.org.queries.lock().unwrap().is_empty() && intake.accepted_keys().is_empty(),
        "nothing is fetched while the intake cannot store it"
    );
    assert_eq!(org.org.token_requests.load(Ordering::SeqCst), 0);

    *intake.paused.lock().unwrap() = None;
    while intake.accepted_keys().len() < 5 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "polling never resumed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rotated_client_secret_is_read_again_without_a_restart() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let intake = Arc::new(MemoryIntake::default());
    // The Secret holds a revoked secret; the new one is mounted while the poller runs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("clientId"), CLIENT_ID).unwrap();
    std::fs::write(dir.path().join("clientSecret"), "revoked-secret").unwrap();
    let credentials = meshline::connectors::Credentials::new(Some(dir.path()), "source");
    let poller = Arc::new(SalesforcePoller::rotating(config(&org.base_url), credentials).unwrap());
    assert!(
        poller.poll_once(intake.as_ref()).await.is_err(),
        "the revoked secret is refused"
    );

    std::fs::write(dir.path().join("clientSecret"), CLIENT_SECRET).unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = {
        let (poller, intake) = (poller.clone(), intake.clone());
        tokio::spawn(async move { poller.run(intake, shutdown).await })
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    while intake.accepted_keys().len() < 5 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the new secret was never used"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn field_map_renames_nested_and_child_relationship_fields() {
    let org = salesforce_mock::start(org_records(), 2000).await;
    let poller = SalesforcePoller::new(config(&org.base_url), client_credentials());
    let intake = MemoryIntake::default();
    poller.poll_once(&intake).await.unwrap();

    let query = org.org.queries.lock().unwrap()[0].clone();
    assert!(
        query.contains(
            "(SELECT Product2.Name, Quantity, ProductCode, UnitPrice FROM OpportunityLineItems)"
        ),
        "{query}"
    );
    assert!(query.contains("Account.Name"), "{query}");

    let a = intake.get("006A").unwrap();
    assert_eq!(
        a.payload,
        json!({
            "id": "006A",
            "name": "Deal 006A",
            "stageName": "Closed Won",
            "systemModstamp": "2024-05-01T10:00:00.000+0000",
            "accountName": "Acme",
            "amount": 20.0,
            "lineItems": [{"sku": "P-1", "productName": "Widget", "quantity": 2.0, "unitPrice": 10.0}]
        }),
        "records reach the intake in the contract's shape, without attributes or related objects"
    );
    let c = intake.get("006C").unwrap();
    assert_eq!(
        c.payload["accountName"],
        Value::Null,
        "a missing lookup is null"
    );
    assert_eq!(
        c.payload["lineItems"],
        json!([]),
        "an empty child relationship (null in the API) is an empty array"
    );
    assert!(intake.get("006Z").is_none(), "the flow's filter is applied");
}

#[tokio::test]
async fn expired_token_is_refreshed_once() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let poller = SalesforcePoller::new(config(&org.base_url), jwt_bearer(&org.base_url));
    let intake = MemoryIntake::default();
    poller.poll_once(&intake).await.unwrap();
    assert_eq!(org.org.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        org.org.jwt_assertions_verified.load(Ordering::SeqCst),
        1,
        "the assertion's RS256 signature and claims were checked"
    );

    // The session dies between polls (revoked, or timed out on Salesforce's side).
    org.org.expire_session_once.store(true, Ordering::SeqCst);
    org.org.records.lock().unwrap().push(opportunity(
        "006G",
        "2024-05-03T08:00:00.000+0000",
        "Closed Won",
        None,
        &[],
    ));
    let report = poller.poll_once(&intake).await.unwrap();
    assert_eq!(report.records, 1);
    assert_eq!(org.org.session_expired_answers.load(Ordering::SeqCst), 1);
    assert_eq!(
        org.org.token_requests.load(Ordering::SeqCst),
        2,
        "exactly one new token for one expired session"
    );
    assert_eq!(org.org.jwt_assertions_verified.load(Ordering::SeqCst), 2);

    // Credentials that stop working are reported as such after one refresh, without a token storm.
    org.org.tokens.lock().unwrap().clear();
    *org.org.login_url.lock().unwrap() = "https://login.salesforce.com".into();
    let err = poller.poll_once(&intake).await.unwrap_err();
    assert_eq!(err.label(), "source_auth", "{err}");
    assert_eq!(org.org.token_requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn rate_limited_page_is_retried_not_skipped() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let poller = SalesforcePoller::new(config(&org.base_url), client_credentials());
    let intake = MemoryIntake::default();
    // 429 with Retry-After, then 403 REQUEST_LIMIT_EXCEEDED, on the first query; then the org answers.
    org.org.limit_next.store(2, Ordering::SeqCst);
    let report = poller.poll_once(&intake).await.unwrap();
    assert_eq!(org.org.limited_answers.load(Ordering::SeqCst), 2);
    assert_eq!(report.records, 5);
    assert_eq!(
        intake.accepted_keys(),
        ["006A", "006B", "006C", "006D", "006E"]
    );

    // A limit that outlasts the attempts fails the poll without moving the checkpoint.
    let before = intake.checkpoints.lock().unwrap().clone();
    org.org.records.lock().unwrap().push(opportunity(
        "006H",
        "2024-05-04T08:00:00.000+0000",
        "Closed Won",
        None,
        &[],
    ));
    org.org.limit_next.store(10, Ordering::SeqCst);
    let err = poller.poll_once(&intake).await.unwrap_err();
    assert_eq!(err.label(), "source_http", "{err}");
    assert_eq!(*intake.checkpoints.lock().unwrap(), before);
    org.org.limit_next.store(0, Ordering::SeqCst);
    assert_eq!(
        poller.poll_once(&intake).await.unwrap().records,
        1,
        "the next poll reads what the failed one missed"
    );
}

#[tokio::test]
async fn jwt_bearer_polls_the_instance_the_token_answer_names() {
    // The assertion goes to login.salesforce.com, which serves no data; the org lives on its own instance.
    let org = salesforce_mock::start_split(org_records(), 2).await;
    let instance = org.org.instance_url.lock().unwrap().clone().unwrap();
    assert_ne!(instance, org.base_url);
    let poller = SalesforcePoller::new(config(&org.base_url), jwt_bearer(&org.base_url));
    let intake = MemoryIntake::default();
    let report = poller
        .poll_once(&intake)
        .await
        .expect("polled the instance");
    assert_eq!(report.records, 5, "every page, nextRecordsUrl included");
    assert_eq!(
        intake.accepted_keys(),
        ["006A", "006B", "006C", "006D", "006E"]
    );
    assert_eq!(org.org.jwt_assertions_verified.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_poll_slows_as_the_daily_api_allowance_runs_low_and_says_so() {
    let org = salesforce_mock::start(org_records(), 2).await;
    let pace = Arc::new(PollPace::default());
    let mut cfg = config(&org.base_url);
    cfg.poll_interval = Duration::from_secs(30);
    let poller = SalesforcePoller::new(cfg, client_credentials()).reporting_to(pace.clone());
    let intake = MemoryIntake::default();

    // Plenty left: the configured interval, and the usage shows.
    let outcome = poller.poll_once(&intake).await;
    let calls = org.org.api_used.load(Ordering::SeqCst) as u64;
    assert_eq!(
        poller.api_usage(),
        Some(ApiUsage {
            used: calls,
            limit: 15000
        }),
        "the last answer's Sforce-Limit-Info"
    );
    assert_eq!(poller.next_wait(&outcome), Duration::from_secs(30));
    let status = pace.get().expect("reported");
    assert!(!status.slowed);
    assert_eq!((status.used, status.limit), (calls, 15000));

    // The org's other integrations used most of the allowance: 13,500 of 15,000 (90 %) → four times slower.
    org.org.api_used.store(13_499, Ordering::SeqCst);
    let outcome = poller.poll_once(&intake).await;
    assert!(outcome.is_ok());
    assert_eq!(poller.next_wait(&outcome), Duration::from_secs(120));
    let status = pace.get().unwrap();
    assert!(status.slowed);
    assert_eq!(
        (
            status.used,
            status.poll_interval_seconds,
            status.configured_interval_seconds
        ),
        (13_500, 120, 30)
    );
    assert!(
        status.describe().contains("13500/15000 (90 %)")
            && status.describe().contains("every 120s"),
        "{}",
        status.describe()
    );

    // A full page does not make a slowed poller query again at once.
    let full = Ok(meshline::connectors::sources::salesforce::PollReport {
        records: 2000,
        pages: 1,
        checkpoint: None,
        more: true,
    });
    assert_eq!(poller.next_wait(&full), Duration::from_secs(120));

    // The 24-hour window moves on and usage falls: the configured pace is back.
    org.org.api_used.store(100, Ordering::SeqCst);
    let outcome = poller.poll_once(&intake).await;
    assert_eq!(poller.next_wait(&outcome), Duration::from_secs(30));
    assert!(!pace.get().unwrap().slowed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_status_shows_the_api_usage_and_the_slowed_poll() {
    use meshline::api::{SourceMode, SourceSystem};
    use meshline::worker::run::{RunOptions, start_flow};
    use meshline::worker::{PipelineOptions, WorkerSettings};

    let org = salesforce_mock::start(org_records(), 2).await;
    // The org's other integrations have used 14,000 of 15,000 calls today (93 %): four times slower.
    org.org.api_used.store(13_999, Ordering::SeqCst);
    let erp = reliability::Erp::start(reliability::ERP_TOKEN).await;
    let mut files =
        reliability::FlowFiles::new(&erp.base_url(), reliability::LedgerChoice::Embedded, 1);
    let source = &mut files.rendered.flow.spec.source;
    source.system = SourceSystem::Salesforce;
    source.mode = SourceMode::Poll;
    source.signature = None;
    source.base_url = Some(org.base_url.clone());
    source.poll_interval = Some("30s".parse().unwrap());
    let secret_name = source.credentials_secret_ref.name.clone();
    let secret = files.secrets_dir().join(secret_name);
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("clientId"), CLIENT_ID).unwrap();
    std::fs::write(secret.join("clientSecret"), CLIENT_SECRET).unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: files.state_dir("api-allowance"),
        secrets_dir: Some(files.secrets_dir()),
        token_file: Some(files.token_file()),
        options: PipelineOptions {
            worker_id: "api-allowance".into(),
            ..PipelineOptions::default()
        },
    };
    let worker = start_flow(
        &files.rendered,
        &settings,
        &RunOptions {
            lookups_dir: Some(files.lookups_dir()),
        },
    )
    .await
    .expect("the worker starts");
    let url = format!("http://{}/status", worker.ops_addr);
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    let http = reqwest::Client::new();

    // The first poll runs at start; its answer's Sforce-Limit-Info reaches /status.
    let give_up = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status: Value = http
            .get(&url)
            .bearer_auth(token.trim())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["sourceApi"]["slowed"] == true {
            break status;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the slowed poll never showed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let api = &status["sourceApi"];
    assert_eq!(api["limit"], 15000);
    assert!(api["used"].as_u64().unwrap() >= 14_000, "{api}");
    assert_eq!(
        (
            &api["pollIntervalSeconds"],
            &api["configuredIntervalSeconds"]
        ),
        (&json!(120), &json!(30))
    );
    let problem = status["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "SourceApiLimit")
        .unwrap_or_else(|| panic!("no SourceApiLimit problem: {status}"));
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("polling every 120s instead of 30s"),
        "{problem}"
    );
    worker.shutdown().await;
}
