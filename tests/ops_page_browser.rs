//! The operations page in a real headless browser (Debian's `chromium`, driven over WebDriver by
//! `chromedriver`), against a real worker in this process with a held record, reached through the page's
//! direct-URL backend: the page shows the flow, an approval by someone without the hold's approver role is
//! refused and leaves the record held, and the approval of the owner who holds it releases the record.
//!
//! The WebDriver client is a few JSON calls over reqwest (no new dependency). Without chromium or
//! chromedriver the test FAILS saying how to install them: CI installs both, and a silent pass would hide a
//! page nobody tested.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::ops_page::{DirectBackend, DirectFlow};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};

const TOKEN: &str = "ops-page-flow-token-123";
/// Personal tokens in the example roster's identity Secret: Marcus holds `finance` (the discount hold's
/// approver role), Dana holds no approver role.
const MARCUS: &str = "marcus-personal-token-7f3a9c21";
const DANA: &str = "dana-personal-token-0b5e44d8a1";

/// An ERP that takes every order.
struct Erp;

#[async_trait]
impl Sink for Erp {
    fn system(&self) -> &'static str {
        "double"
    }
    async fn deliver(&self, _: Delivery<'_>) -> Result<Delivered, SinkError> {
        Ok(Delivered {
            erp_id: None,
            created: Some(true),
            status: 204,
        })
    }
    async fn probe(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn fetch_lookup(&self, _: &str, _: &str) -> Result<Vec<Value>, SinkError> {
        Ok(Vec::new())
    }
}

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/contract")
            .join(name),
    )
    .unwrap()
}

/// The executable `name` on `PATH` (or the path in `env`), or a failure that says how to install it.
fn executable(env: &str, name: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed, and the operations page's browser test needs it: \
                 `apt-get install -y chromium chromium-driver` (or set {env} to its path)"
            )
        })
}

/// A chromedriver process, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver(http: &reqwest::Client) -> Driver {
    let chromedriver = executable("MESHLINE_CHROMEDRIVER", "chromedriver");
    // A port the kernel just gave out and took back: chromedriver takes a port number, not a listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    // Wait until it says it is ready; the give-up only keeps a broken install from hanging the suite.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["value"]["ready"] == true
        {
            return driver;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "chromedriver never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn open(http: &reqwest::Client, driver: &Driver, profile: &Path) -> Browser {
        let chromium = executable("MESHLINE_CHROMIUM", "chromium");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let r: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver did not open a session: {r}"))
            .to_string();
        Browser {
            http: http.clone(),
            session: format!("{}/session/{session}", driver.url),
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let v: Value = request.send().await.unwrap().json().await.unwrap();
        if v["value"]["error"].is_string() {
            panic!("WebDriver {path}: {v}");
        }
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn source(&self) -> String {
        self.command(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        match v[ELEMENT].as_str() {
            Some(e) => e.to_string(),
            None => panic!(
                "no element {css} ({v}) on the page: {}",
                self.source().await
            ),
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// The text of the outcome a form post led to, once the browser shows it.
    async fn outcome(&self) -> String {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.source().await.contains("id=\"outcome\"") {
                let e = self.find("#outcome").await;
                return self
                    .command(reqwest::Method::GET, &format!("/element/{e}/text"), None)
                    .await
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "the post's outcome never showed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// The record's state and who approved it, as the worker's ledger has it.
async fn record(http: &reqwest::Client, worker: &Worker, id: i64) -> Value {
    http.get(format!("http://{}/records/{id}", worker.ops_addr))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["record"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_approver_releases_a_held_record_and_an_owner_without_the_role_is_refused()
{
    let http = reqwest::Client::new();
    // Fail first on a missing browser, before anything else is set up.
    let driver = start_driver(&http).await;

    let rendered = RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap();
    let mut running = rendered.clone();
    running.flow.spec.ledger = Default::default();
    running.flow.spec.replicas = None;
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // The roster's identity Secret as the controller mounts it: one file per owner id.
    let identities = state.path().join("secrets/revenue-operations-identities");
    std::fs::create_dir_all(&identities).unwrap();
    std::fs::write(identities.join("marcus"), MARCUS).unwrap();
    std::fs::write(identities.join("dana"), DANA).unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: Some(state.path().join("secrets")),
        token_file: Some(token_file.clone()),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            ..PipelineOptions::default()
        },
    };
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let worker = Worker::start(&running, &settings, Arc::new(Erp), lookups, |_| {
        axum::Router::new()
    })
    .await
    .unwrap();

    // The 25 % discount deal, which the contract holds for `finance`.
    let mut deal: Value = serde_json::from_str(&data("discount_25_record.json")).unwrap();
    deal["id"] = json!("0065g0000000000777");
    worker
        .intake
        .accept(vec![SourceRecord {
            key: "0065g0000000000777".into(),
            payload: deal,
            correlation_id: None,
        }])
        .await
        .unwrap();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    let id = loop {
        let holds: Value = http
            .get(format!("http://{}/holds", worker.ops_addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(id) = holds["items"][0]["id"].as_i64() {
            break id;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the deal was never held: {holds}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let backend = DirectBackend::new(
        vec![DirectFlow {
            flow: rendered.flow.clone(),
            ops_url: format!("http://{}", worker.ops_addr),
            token_file,
        }],
        rendered.roster.clone().into_iter().collect(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(meshline::ops_page::serve(listener, Arc::new(backend)));

    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::open(&http, &driver, profile.path()).await;

    // The main view lists the seeded flow with its held record counted.
    browser.go(&page).await;
    let main = browser.source().await;
    assert!(
        main.contains("revenue-sync/closed-won-to-netsuite"),
        "the main view does not show the flow: {main}"
    );
    let flow_page = format!("{page}/flows/revenue-sync/closed-won-to-netsuite");

    // Dana is a roster owner, but holds no `finance` role: the worker refuses, the page says so.
    browser.go(&flow_page).await;
    // The hold's context is shown as the worker redacted it: the contract's PII fields never reach the page.
    let shown = browser.source().await;
    assert!(shown.contains("0065g0000000000777"), "{shown}");
    for pii in ["alice.buyer@acme.example", "+1 555 0100"] {
        assert!(!shown.contains(pii), "{pii} is on the page: {shown}");
    }
    let form = format!("#record-{id} form.approve");
    browser
        .type_into(&format!("{form} input[name=reason]"), "looks fine")
        .await;
    browser
        .type_into(&format!("{form} input[name=identity]"), DANA)
        .await;
    browser.click(&format!("{form} button")).await;
    let refusal = browser.outcome().await;
    assert!(
        refusal.contains("403") && refusal.contains("does not hold the approver role"),
        "{refusal}"
    );
    assert_eq!(record(&http, &worker, id).await["state"], "held");

    // A token nobody was given is refused too.
    browser.go(&flow_page).await;
    browser
        .type_into(&format!("{form} input[name=reason]"), "looks fine")
        .await;
    browser
        .type_into(
            &format!("{form} input[name=identity]"),
            "not-anyones-token-0000",
        )
        .await;
    browser.click(&format!("{form} button")).await;
    let unknown = browser.outcome().await;
    assert!(unknown.contains("403"), "{unknown}");
    assert_eq!(record(&http, &worker, id).await["state"], "held");

    // Marcus holds `finance`: his approval releases the record.
    browser.go(&flow_page).await;
    browser
        .type_into(
            &format!("{form} input[name=reason]"),
            "discount agreed with the customer",
        )
        .await;
    browser
        .type_into(&format!("{form} input[name=identity]"), MARCUS)
        .await;
    browser.click(&format!("{form} button")).await;
    let done = browser.outcome().await;
    assert!(done.contains(&format!("record {id} approved")), "{done}");
    let after = record(&http, &worker, id).await;
    assert_ne!(after["state"], "held", "{after}");
    assert_eq!(after["approved_by"], "marcus", "{after}");

    browser.close().await;
    worker.shutdown().await;
}
