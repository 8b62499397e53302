//! Tickets end to end (issue #16): a real worker in-process, with the ERP as a double and the ticket sinks as
//! local stand-ins for the vendors (a signed webhook receiver, a Jira Cloud stand-in, PagerDuty's Events API),
//! checked the way the vendors check. Every wait polls the state that matters (what a stand-in received, the
//! worker's `/status`); the 120 s give-up only keeps a broken build from hanging.
//!
//! The last test drives the ticket task (`Dispatcher`) directly over a SQLite ledger with a manual clock, to
//! walk the escalation ladder without waiting hours.

#[path = "support/sink_mock.rs"]
mod sink_mock;
#[path = "support/ticket_vendors.rs"]
mod ticket_vendors;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshline::api::{Backoff, ErrorClass, LedgerSpec, OwnershipRoster};
use meshline::connectors::{Delivered, Delivery, Intake, Sink, SinkError, SourceRecord};
use meshline::ledger::{Ledger, LedgerTarget, ManualClock, RaisedException};
use meshline::tickets::dispatch::{Dispatcher, FlowSignals};
use meshline::tickets::sinks::{Delivery as TicketDelivery, SinkRef, TicketSink};
use meshline::tickets::{ExceptionKind, Ticket, TicketState, fingerprint};
use meshline::worker::{PipelineOptions, RenderedFlow, Worker, WorkerSettings};
use serde_json::{Value, json};
use ticket_vendors::{Accounts, Vendors};

const FLOW: &str = "closed-won-to-netsuite";
const NAMESPACE: &str = "revenue-sync";
/// The flow's token for the operations API.
const TOKEN: &str = "test-token-123";
/// Personal tokens in the roster's identity Secret: Marcus holds `finance` (the discount hold's approver
/// role), Dana holds no approver role.
const MARCUS: &str = "marcus-personal-token-7f3a9c21";
const DANA: &str = "dana-personal-token-0b5e44d8a1";
/// The webhook sinks' signing secret, as the receiver knows it.
const SIGNING: &str = "whsec-tickets-e2e-41";
const JIRA_EMAIL: &str = "meshline-bot@acme.example";
const JIRA_TOKEN: &str = "jira-api-token-e2e-77";
const JIRA_PROJECT: &str = "SALES";
const ROUTING_KEY: &str = "R0UT1NGKEYE2E456789ABCDEFGHIJKLM";

// ---------------------------------------------------------------------------------------------------------
// The vendors: one local server standing in for every ticket sink of a test (tests/support/ticket_vendors.rs).

const ACCOUNTS: Accounts = Accounts {
    signing_secret: SIGNING,
    jira_email: JIRA_EMAIL,
    jira_api_token: JIRA_TOKEN,
    jira_project: JIRA_PROJECT,
    routing_key: ROUTING_KEY,
};

async fn vendors() -> (Arc<Vendors>, String) {
    ticket_vendors::vendors(ACCOUNTS).await
}

// ---------------------------------------------------------------------------------------------------------
// The ERP double

/// Upserts everything except the external ids it is told to refuse, which it answers with a 422 and the
/// given text (an ERP quoting the record's values back, as NetSuite's `o:errorDetails` do).
#[derive(Default)]
struct Erp {
    refuse: Mutex<HashMap<String, String>>,
    orders: Mutex<HashMap<String, Value>>,
}

#[async_trait]
impl Sink for Erp {
    fn system(&self) -> &'static str {
        "double"
    }
    async fn deliver(&self, d: Delivery<'_>) -> Result<Delivered, SinkError> {
        if let Some(text) = self.refuse.lock().unwrap().get(d.external_id) {
            return Err(SinkError::from_status("double", 422, None, text));
        }
        let created = self
            .orders
            .lock()
            .unwrap()
            .insert(d.external_id.to_string(), d.payload.clone())
            .is_none();
        Ok(Delivered {
            erp_id: None,
            created: Some(created),
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

// ---------------------------------------------------------------------------------------------------------
// Records

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/contract")
            .join(name),
    )
    .unwrap()
}

fn record_id(i: usize) -> String {
    format!("0065g{i:013}")
}

fn external_id(i: usize) -> String {
    format!("SF-{}", record_id(i))
}

/// Record `i` from `file`, with its own id and personal values (the contract marks both `pii: true`).
fn record_from(file: &str, i: usize) -> SourceRecord {
    let mut v: Value = serde_json::from_str(&data(file)).unwrap();
    v["id"] = json!(record_id(i));
    v["customerEmail"] = json!(email(i));
    v["customerPhone"] = json!(phone(i));
    SourceRecord {
        key: record_id(i),
        payload: v,
        correlation_id: None,
    }
}

fn good(i: usize) -> SourceRecord {
    record_from("good_record.json", i)
}

/// Fails the contract's `price-tolerance` rule (a line 16 % over the pricebook).
fn price_drift(i: usize) -> SourceRecord {
    record_from("price_drift_record.json", i)
}

/// Fails `known-sku`: a line whose SKU the pricebook does not have.
fn unknown_sku(i: usize) -> SourceRecord {
    let mut r = good(i);
    r.payload["lineItems"][0]["sku"] = json!("SKU-9999");
    r
}

/// Fails `has-lines`.
fn no_lines(i: usize) -> SourceRecord {
    let mut r = good(i);
    r.payload["lineItems"] = json!([]);
    r
}

fn email(i: usize) -> String {
    format!("buyer.{i}@customer-{i}.example")
}

fn phone(i: usize) -> String {
    format!("+1 555 01{i:02}")
}

/// The ERP's answer to an order it refuses, quoting the customer's personal values.
fn erp_refusal(i: usize) -> String {
    format!(
        r#"{{"o:errorDetails":[{{"detail":"Customer {} (phone {}) has no billing address","o:errorCode":"INVALID_FLD_VALUE"}}]}}"#,
        email(i),
        phone(i)
    )
}

fn ticket_fp(kind: ExceptionKind, class: Option<ErrorClass>, reason: &str) -> String {
    fingerprint(NAMESPACE, FLOW, kind, class, reason)
}

fn erp_422() -> String {
    ticket_fp(
        ExceptionKind::DeadLetter,
        Some(ErrorClass::Permanent),
        "erp:422",
    )
}

// ---------------------------------------------------------------------------------------------------------
// The worker

/// A ticket sink of the test roster: its name and type.
#[derive(Clone, Copy)]
enum SinkKind {
    Webhook,
    Jira,
    Pagerduty,
}

/// The example flow with a roster whose routes are `routes` (YAML flow style) and whose ticket sinks are
/// `sinks`, all pointed at the stand-ins at `base`, with their Secrets under `secrets`.
fn roster(routes: &str, sinks: &[(&str, SinkKind)], base: &str, secrets: &Path) -> OwnershipRoster {
    let mut entries = Vec::new();
    for (name, kind) in sinks {
        let dir = secrets.join(format!("ticket-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |key: &str, value: &str| {
            std::fs::write(dir.join(key), format!("{value}\n")).unwrap();
        };
        let entry = match kind {
            SinkKind::Webhook => {
                write("signingSecret", SIGNING);
                format!("{{name: {name}, type: webhook, url: '{base}/hooks/{name}'")
            }
            SinkKind::Jira => {
                write("email", JIRA_EMAIL);
                write("apiToken", JIRA_TOKEN);
                format!("{{name: {name}, type: jira, url: '{base}', project: {JIRA_PROJECT}")
            }
            SinkKind::Pagerduty => {
                write("routingKey", ROUTING_KEY);
                format!("{{name: {name}, type: pagerduty, url: '{base}/v2/enqueue'")
            }
        };
        entries.push(format!(
            "{entry}, credentialsSecretRef: {{name: ticket-{name}}}}}"
        ));
    }
    let yaml = format!(
        r#"
apiVersion: sync.meshline.io/v1alpha1
kind: OwnershipRoster
metadata: {{name: revenue-operations, namespace: {NAMESPACE}}}
spec:
  owners:
    - {{id: dana, name: Dana Okafor, email: dana.okafor@acme.example}}
    - {{id: priya, name: Priya Raman, email: priya.raman@acme.example}}
    - {{id: marcus, name: Marcus Lindqvist, email: marcus.lindqvist@acme.example, approverRoles: [finance]}}
    - {{id: platform-team, name: Platform Engineering, pager: PPLAT01}}
  assignments:
    - {{flows: [{FLOW}], syncOwner: dana, sourceOwner: priya, sinkOwner: marcus, platformOwner: platform-team}}
  routes: {routes}
  ticketSinks: [{}]
  identitySecretRef: {{name: revenue-operations-identities}}
"#,
        entries.join(", ")
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("test roster: {e}\n{yaml}"))
}

fn example() -> RenderedFlow {
    RenderedFlow::from_manifests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
    )
    .unwrap()
}

struct Harness {
    worker: Worker,
    erp: Arc<Erp>,
    vendors: Arc<Vendors>,
    http: reqwest::Client,
    _state: tempfile::TempDir,
}

/// A worker on the example flow and contract with the test roster, its ticket task ticking every 50 ms.
/// `before` runs on the stand-ins before the worker starts (to script an outage from the first request).
async fn start(routes: &str, sinks: &[(&str, SinkKind)], before: impl FnOnce(&Vendors)) -> Harness {
    let (vendors, base) = vendors().await;
    before(&vendors);
    let state = tempfile::tempdir().unwrap();
    let secrets = state.path().join("secrets");
    let mut rendered = example();
    rendered.roster = Some(roster(routes, sinks, &base, &secrets));
    rendered.flow.spec.ledger = LedgerSpec::default();
    rendered.flow.spec.replicas = None;
    rendered.flow.spec.delivery.concurrency = 4;
    rendered.flow.spec.delivery.max_attempts = 50;
    rendered.flow.spec.delivery.backoff = Some(Backoff {
        base: Some("10ms".parse().unwrap()),
        max: Some("100ms".parse().unwrap()),
    });
    let token_file = state.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // The roster's identity Secret as the controller mounts it: one file per owner id.
    let identities = secrets.join("revenue-operations-identities");
    std::fs::create_dir_all(&identities).unwrap();
    std::fs::write(identities.join("marcus"), format!("{MARCUS}\n")).unwrap();
    std::fs::write(identities.join("dana"), DANA).unwrap();
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.path().join("state"),
        secrets_dir: Some(secrets),
        token_file: Some(token_file),
        options: PipelineOptions {
            idle_poll: Duration::from_millis(10),
            ticket_period: Duration::from_millis(50),
            ..PipelineOptions::default()
        },
    };
    let erp = Arc::new(Erp::default());
    let lookups: Value = serde_json::from_str(&data("lookups.json")).unwrap();
    let worker = Worker::start(&rendered, &settings, erp.clone(), lookups, |_| {
        axum::Router::new()
    })
    .await
    .unwrap();
    Harness {
        worker,
        erp,
        vendors,
        http: reqwest::Client::new(),
        _state: state,
    }
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker.ops_addr)
    }

    async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn status(&self) -> Value {
        self.get_json("/status").await
    }

    /// Every ticket the worker has, resolved ones too, as the sinks see them.
    async fn tickets(&self) -> Vec<Value> {
        self.get_json("/tickets?all=true")
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until `/status` satisfies `done`.
    async fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&self, records: Vec<SourceRecord>) {
        self.worker.intake.accept(records).await.unwrap();
    }

    /// The ERP refuses record `i` with a 422 quoting its customer's personal values.
    fn refuse(&self, i: usize) {
        self.erp
            .refuse
            .lock()
            .unwrap()
            .insert(external_id(i), erp_refusal(i));
    }

    /// A request on the operations API with the flow's token and, when given, a person's identity token.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        identity: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(i) = identity {
            req = req.header("x-meshline-identity", i);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn put_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let resp = self
            .http
            .put(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

fn counter(status: &Value, name: &str) -> i64 {
    status["counters"][name].as_i64().unwrap_or(-1)
}

/// The worker's ticket for a contract rule, found through `/tickets`.
async fn rule_ticket(h: &Harness, rule: &str) -> Value {
    h.tickets()
        .await
        .into_iter()
        .find(|t| t["rule"] == rule && t["kind"] == "dead_letter")
        .unwrap_or_else(|| panic!("no ticket for rule {rule}"))
}

/// Routes of the routing tests: ERP rejections to the sink owner on the webhook, the pricing rule's to the
/// source owner on Jira (the more specific route wins over the class's).
const ROUTES: &str = "[{errorClass: Permanent, action: escalate, role: sinkOwner, ticketSink: ops-webhook}, \
     {rule: price-tolerance, action: escalate, role: sourceOwner, ticketSink: sales-jira}]";
const SINKS: &[(&str, SinkKind)] = &[
    ("ops-webhook", SinkKind::Webhook),
    ("sales-jira", SinkKind::Jira),
];

// ---------------------------------------------------------------------------------------------------------
// 1. Routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cause_gets_one_ticket_at_its_routes_sink_with_its_routes_owner_and_later_failures_update_it()
 {
    let h = start(ROUTES, SINKS, |_| {}).await;
    h.refuse(1);
    h.refuse(2);
    let mut batch: Vec<SourceRecord> = (10..15).map(good).collect();
    batch.extend([good(1), good(2), price_drift(3)]);
    h.send(batch).await;
    h.wait_for("5 delivered, 3 dead letters", |s| {
        counter(s, "delivered") == 5 && counter(s, "deadLettered") == 3
    })
    .await;

    let fp = erp_422();
    let latest = h
        .vendors
        .wait("the ERP rejections' ticket counting both records", |v| {
            v.events_of("ops-webhook", &fp)
                .into_iter()
                .find(|b| b["count"] == 2)
        })
        .await;
    let pricing = rule_ticket(&h, "price-tolerance").await;
    let pricing_fp = pricing["fingerprint"].as_str().unwrap().to_string();
    let issue = h
        .vendors
        .wait("the pricing rule's Jira issue", |v| v.issues().pop())
        .await;

    // The ERP's rejections: one ticket, to the sink owner, at the webhook, signed.
    let bodies = h.vendors.bodies("ops-webhook");
    assert!(
        bodies.iter().all(|b| b["fingerprint"] == fp),
        "only the ERP rejections' ticket goes to the webhook: {bodies:?}"
    );
    assert_eq!(bodies[0]["event"], "opened", "{bodies:?}");
    assert_eq!(latest["kind"], "dead_letter");
    assert_eq!(latest["reason"], "erp:422");
    assert_eq!(latest["role"], "sinkOwner");
    assert_eq!(latest["owner"]["id"], "marcus");
    assert_eq!(latest["owner"]["name"], "Marcus Lindqvist");
    assert_eq!(latest["outstanding"], 2);
    let examples = latest["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 2, "{latest}");
    assert!(
        examples
            .iter()
            .any(|e| e["sourceKey"] == record_id(1) && e["correlationId"].as_str().is_some())
    );
    assert_eq!(h.vendors.bad_signatures.load(Ordering::SeqCst), 0);

    // The pricing rule's rejection: one Jira issue, for the source owner.
    assert_eq!(pricing["owner"]["id"], "priya");
    assert_eq!(pricing["role"], "sourceOwner");
    assert_eq!(h.vendors.jira_creates.load(Ordering::SeqCst), 1);
    assert!(
        issue.labels.contains(&format!("meshline-{pricing_fp}")),
        "{:?}",
        issue.labels
    );
    assert!(
        issue.description.to_string().contains("Priya Raman"),
        "the issue names its owner: {}",
        issue.description
    );

    // More of the same causes: the tickets are updated, no new ones.
    h.refuse(4);
    h.send(vec![good(4), price_drift(5)]).await;
    let updated = h
        .vendors
        .wait("the ERP rejections' ticket counting three", |v| {
            v.events_of("ops-webhook", &fp)
                .into_iter()
                .find(|b| b["count"] == 3)
        })
        .await;
    assert_eq!(updated["event"], "updated");
    let issue = h
        .vendors
        .wait("a comment on the pricing issue", |v| {
            v.issues().pop().filter(|i| !i.comments.is_empty())
        })
        .await;
    assert_eq!(h.vendors.jira_creates.load(Ordering::SeqCst), 1);
    assert_eq!(h.vendors.issues().len(), 1);
    assert_eq!(issue.status_category, "new");
    let hooks = h.vendors.bodies("ops-webhook");
    assert_eq!(
        hooks.iter().filter(|b| b["event"] == "opened").count(),
        1,
        "{hooks:?}"
    );
    let open: Vec<Value> = h
        .tickets()
        .await
        .into_iter()
        .filter(|t| t["state"] == "open")
        .collect();
    assert_eq!(open.len(), 2, "one ticket per cause: {open:?}");
    assert_eq!(h.status().await["tickets"]["open"], 2);
    h.worker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// 2. PII

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ticket_carries_a_personal_value_even_when_the_erp_quotes_it() {
    let h = start(ROUTES, SINKS, |_| {}).await;
    for i in 1..=3 {
        h.refuse(i);
    }
    h.send(vec![good(1), good(2), good(3), price_drift(4), good(5)])
        .await;
    let fp = erp_422();
    h.vendors
        .wait("the ERP rejections' ticket with all three examples", |v| {
            v.events_of("ops-webhook", &fp)
                .into_iter()
                .find(|b| b["count"] == 3)
        })
        .await;
    h.vendors
        .wait("the pricing rule's Jira issue", |v| v.issues().pop())
        .await;

    let received = h.vendors.everything_received();
    // The tickets did carry the ERP's answers and the snapshots, only redacted.
    assert!(
        received.contains("has no billing address"),
        "the ERP's answer reaches the ticket: {received}"
    );
    assert!(received.contains("[REDACTED]"), "{received}");
    let api = serde_json::to_string(&h.tickets().await).unwrap();
    for i in 1..=5 {
        for value in [email(i), phone(i)] {
            assert!(
                !received.contains(&value),
                "a sink received the personal value {value:?}: {received}"
            );
            assert!(!api.contains(&value), "/tickets shows {value:?}: {api}");
        }
    }
    h.worker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// 3. Self-resolving

/// The ERP refuses two records; after the fix, replaying that reason delivers them and the ticket resolves at
/// `sink`. Returns the harness for sink-specific checks.
async fn replayed_cause_resolves(kind: SinkKind) -> Harness {
    let routes = "[{errorClass: Permanent, action: escalate, role: sinkOwner, ticketSink: ops}]";
    let h = start(routes, &[("ops", kind)], |_| {}).await;
    h.refuse(1);
    h.refuse(2);
    h.send(vec![good(1), good(2), good(3)]).await;
    h.wait_for("1 delivered, 2 dead letters", |s| {
        counter(s, "delivered") == 1 && counter(s, "deadLettered") == 2
    })
    .await;
    let fp = erp_422();
    match kind {
        SinkKind::Webhook => {
            h.vendors
                .wait("the ticket at the webhook", |v| {
                    v.events_of("ops", &fp)
                        .into_iter()
                        .find(|b| b["outstanding"] == 2)
                })
                .await;
        }
        _ => {
            h.vendors
                .wait("the ticket's Jira issue", |v| v.issues().pop())
                .await;
        }
    }
    // A replay before the fix dead-letters them again: the ticket stays open.
    let (status, _) = h
        .request(
            reqwest::Method::POST,
            "/dead-letters/replay",
            Some(json!({"deadLetterReason": "erp:422", "actor": "marcus", "reason": "try again"})),
            None,
        )
        .await;
    assert_eq!(status, 200);
    h.wait_for("the replay dead-lettered again", |s| {
        counter(s, "deadLettered") == 2
    })
    .await;
    let ticket = h
        .tickets()
        .await
        .into_iter()
        .find(|t| t["fingerprint"] == fp)
        .unwrap();
    assert_eq!(
        ticket["state"], "open",
        "a replay that fails again resolves nothing: {ticket}"
    );

    h.erp.refuse.lock().unwrap().clear();
    let (status, body) = h
        .request(
            reqwest::Method::POST,
            "/dead-letters/replay",
            Some(json!({"deadLetterReason": "erp:422", "actor": "marcus", "reason": "billing addresses added"})),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"].as_array().unwrap().len(), 2, "{body}");
    h.wait_for("the replayed records delivered", |s| {
        counter(s, "delivered") == 3
    })
    .await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_fixed_cause_resolves_its_webhook_ticket() {
    let h = replayed_cause_resolves(SinkKind::Webhook).await;
    let fp = erp_422();
    let resolved = h
        .vendors
        .wait("the resolved event", |v| {
            v.events_of("ops", &fp)
                .into_iter()
                .find(|b| b["event"] == "resolved")
        })
        .await;
    assert_eq!(resolved["state"], "resolved");
    assert_eq!(resolved["outstanding"], 0);
    assert!(resolved["resolvedAt"].is_string(), "{resolved}");
    let ticket = h
        .tickets()
        .await
        .into_iter()
        .find(|t| t["fingerprint"] == fp)
        .unwrap();
    assert_eq!(ticket["state"], "resolved");
    let status = h
        .wait_for("no open ticket", |s| s["tickets"]["open"] == 0)
        .await;
    let marcus = status["tickets"]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["owner"] == "marcus")
        .cloned()
        .unwrap_or_else(|| panic!("no measures for marcus: {status}"));
    assert_eq!(marcus["resolved"], 1, "{marcus}");
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_fixed_cause_transitions_its_jira_issue_to_done() {
    let h = replayed_cause_resolves(SinkKind::Jira).await;
    let issue = h
        .vendors
        .wait("the issue in a done status", |v| {
            v.issues().pop().filter(|i| i.status_category == "done")
        })
        .await;
    assert!(
        !issue.comments.is_empty(),
        "the resolution is commented first"
    );
    assert_eq!(h.vendors.jira_creates.load(Ordering::SeqCst), 1);
    assert!(issue.labels.contains(&format!("meshline-{}", erp_422())));
    h.worker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// 4. Holds, approvals and acknowledgements

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_opens_a_ticket_an_owner_acknowledges_and_the_approval_by_role_resolves() {
    let routes = "[{rule: discount-approval, action: holdForApproval, approverRole: finance, role: sinkOwner, \
                  ticketSink: ops-webhook}]";
    let h = start(routes, &[("ops-webhook", SinkKind::Webhook)], |_| {}).await;
    h.send(vec![record_from("discount_25_record.json", 7)])
        .await;
    h.wait_for("held", |s| counter(s, "held") == 1).await;
    let holds = h.get_json("/holds").await;
    let id = holds["items"][0]["id"].as_i64().unwrap();
    let opened = h
        .vendors
        .wait("the hold's ticket", |v| {
            v.bodies("ops-webhook")
                .into_iter()
                .find(|b| b["kind"] == "hold")
        })
        .await;
    let fp = opened["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(opened["event"], "opened");
    assert_eq!(opened["rule"], "discount-approval");
    assert_eq!(opened["owner"]["id"], "marcus");
    assert!(
        opened["commands"]
            .to_string()
            .contains(&format!("meshline hold approve {FLOW} {id}")),
        "{opened}"
    );

    // Acknowledging needs a person the roster knows.
    let ack = format!("/tickets/{fp}/acknowledge");
    for identity in [None, Some("a-token-nobody-was-given-123")] {
        let (status, body) = h.request(reqwest::Method::POST, &ack, None, identity).await;
        assert_eq!(status, 403, "{identity:?}: {body}");
    }
    assert_eq!(h.status().await["tickets"]["acknowledged"], 0);
    let (status, body) = h
        .request(reqwest::Method::POST, &ack, None, Some(MARCUS))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acknowledgedBy"], "marcus");
    let status = h
        .wait_for("the acknowledgement in /status", |s| {
            s["tickets"]["acknowledged"] == 1
        })
        .await;
    let marcus = status["tickets"]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["owner"] == "marcus")
        .cloned()
        .unwrap_or_else(|| panic!("no measures for marcus: {status}"));
    assert_eq!(
        (marcus["opened"].as_i64(), marcus["acknowledged"].as_i64()),
        (Some(1), Some(1)),
        "{marcus}"
    );
    assert!(marcus["meanTimeToAcknowledgeSeconds"].is_i64(), "{marcus}");
    let acked = h
        .vendors
        .wait("the acknowledgement at the sink", |v| {
            v.events_of("ops-webhook", &fp)
                .into_iter()
                .find(|b| b["state"] == "acknowledged")
        })
        .await;
    assert_eq!(acked["acknowledgedBy"], "marcus");

    // Dana is an owner but not in the approver role; Marcus is.
    let approve = format!("/records/{id}/approve");
    let reason = json!({"reason": "strategic account"});
    let (status, body) = h
        .request(
            reqwest::Method::POST,
            &approve,
            Some(reason.clone()),
            Some(DANA),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = h
        .request(reqwest::Method::POST, &approve, Some(reason), Some(MARCUS))
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_for("the approved record delivered", |s| {
        counter(s, "delivered") == 1
    })
    .await;
    let resolved = h
        .vendors
        .wait("the hold's ticket resolved", |v| {
            v.events_of("ops-webhook", &fp)
                .into_iter()
                .find(|b| b["event"] == "resolved")
        })
        .await;
    assert_eq!(resolved["outstanding"], 0);
    let status = h
        .wait_for("no open ticket", |s| s["tickets"]["open"] == 0)
        .await;
    assert_eq!(status["tickets"]["acknowledged"], 0);
    // A resolved ticket has nothing left to acknowledge.
    let (status, _) = h
        .request(reqwest::Method::POST, &ack, None, Some(MARCUS))
        .await;
    assert_eq!(status, 409);
    h.worker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// 5. Ticket sinks that fail

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_delays_a_ticket_and_a_refusing_sink_is_reported_while_records_flow() {
    // ERP rejections go to a receiver that is down for its first answer; every contract rejection goes to
    // one that refuses everything (misconfigured).
    let routes = "[{errorClass: Permanent, action: escalate, role: sinkOwner, ticketSink: flaky}, \
                  {rule: price-tolerance, action: escalate, role: sourceOwner, ticketSink: refusing}, \
                  {rule: known-sku, action: escalate, role: sourceOwner, ticketSink: refusing}, \
                  {rule: has-lines, action: escalate, role: sourceOwner, ticketSink: refusing}]";
    let sinks = [
        ("flaky", SinkKind::Webhook),
        ("refusing", SinkKind::Webhook),
    ];
    let h = start(routes, &sinks, |v| {
        v.script_hook("flaky", 503, &[], "scripted outage");
        v.refusing.lock().unwrap().insert("refusing".into());
    })
    .await;
    h.refuse(1);
    h.send(vec![
        good(1),
        price_drift(2),
        unknown_sku(3),
        no_lines(4),
        good(5),
    ])
    .await;

    let fp = erp_422();
    let taken = h
        .vendors
        .wait("the ticket at the receiver after its outage", |v| {
            v.events_of("flaky", &fp).into_iter().next()
        })
        .await;
    assert_eq!(taken["event"], "opened");
    assert!(
        h.vendors.attempts.lock().unwrap()["flaky"] >= 2,
        "the first attempt met the outage"
    );

    let status = h
        .wait_for("the refusing sink reported", |s| {
            s["tickets"]["failingSinks"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["sink"] == "refusing"))
        })
        .await;
    let failing = status["tickets"]["failingSinks"].as_array().unwrap();
    assert_eq!(
        failing.len(),
        1,
        "the recovered sink is not failing: {failing:?}"
    );
    assert_eq!(
        failing[0]["pending"], 3,
        "its three tickets wait: {failing:?}"
    );
    assert!(
        failing[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("400")),
        "{failing:?}"
    );
    let metrics = h.metrics().await;
    let gauge = |sink: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("meshline_ticket_sink_failing{")
                    && l.contains(&format!("sink=\"{sink}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(gauge("refusing").as_deref(), Some("1"), "{metrics}");
    assert_ne!(gauge("flaky").as_deref(), Some("1"), "{metrics}");
    assert!(
        h.vendors.bodies("refusing").is_empty(),
        "nothing was taken by the refusing receiver"
    );

    // Records are never held up by a ticket sink.
    h.send((10..40).map(good).collect()).await;
    h.wait_for("every good record delivered", |s| {
        counter(s, "delivered") == 31
    })
    .await;
    h.worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_refusing_its_one_ticket_is_reported_failing_after_that_one_answer() {
    // One ticket, one refusal: the backoff would put a third attempt 10 to 20 minutes away, so the sink must
    // be reported from the first answer.
    let routes = "[{rule: known-sku, action: escalate, role: sourceOwner, ticketSink: refusing}]";
    let h = start(routes, &[("refusing", SinkKind::Webhook)], |v| {
        v.refusing.lock().unwrap().insert("refusing".into());
    })
    .await;
    h.send(vec![unknown_sku(1)]).await;

    let status = h
        .wait_for("the refusing sink reported", |s| {
            s["tickets"]["failingSinks"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["sink"] == "refusing"))
        })
        .await;
    let failing = &status["tickets"]["failingSinks"][0];
    assert_eq!(failing["consecutiveFailures"], 1, "{failing}");
    assert_eq!(failing["pending"], 1, "{failing}");
    assert!(
        failing["message"]
            .as_str()
            .is_some_and(|m| m.contains("400")),
        "{failing}"
    );
    assert_eq!(
        h.vendors.attempts.lock().unwrap()["refusing"],
        1,
        "reported after one attempt, not after three"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshline_ticket_sink_failing{")
                && l.contains("sink=\"refusing\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    h.worker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// 6. The controller's causes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_sla_cause_opens_a_ticket_until_a_report_leaves_it_out_and_bad_reports_are_refused()
 {
    let routes =
        "[{errorClass: FlowLevel, action: escalate, role: platformOwner, ticketSink: ops-webhook}]";
    let h = start(routes, &[("ops-webhook", SinkKind::Webhook)], |_| {}).await;
    let breach = json!({"causes": [{
        "kind": "flow_degraded",
        "class": "FlowLevel",
        "reason": "sla:FailureRateOverSla",
        "summary": "failure rate 5% over the contract's 2%"
    }]});
    let (status, body) = h
        .request(
            reqwest::Method::PUT,
            "/exceptions",
            Some(breach.clone()),
            None,
        )
        .await;
    assert_eq!((status, body["raised"].as_i64()), (200, Some(1)), "{body}");
    // The controller reports the whole set every period: a cause still there is not raised again.
    let (status, body) = h
        .request(reqwest::Method::PUT, "/exceptions", Some(breach), None)
        .await;
    assert_eq!((status, body["raised"].as_i64()), (200, Some(0)), "{body}");

    let fp = ticket_fp(
        ExceptionKind::FlowDegraded,
        Some(ErrorClass::FlowLevel),
        "sla:FailureRateOverSla",
    );
    let opened = h
        .vendors
        .wait("the SLA ticket", |v| {
            v.events_of("ops-webhook", &fp).into_iter().next()
        })
        .await;
    assert_eq!(opened["event"], "opened");
    assert_eq!(opened["owner"]["id"], "platform-team");
    assert_eq!(opened["summary"], "failure rate 5% over the contract's 2%");

    let (status, body) = h
        .request(
            reqwest::Method::PUT,
            "/exceptions",
            Some(json!({"causes": []})),
            None,
        )
        .await;
    assert_eq!((status, body["cleared"].as_i64()), (200, Some(1)), "{body}");
    h.vendors
        .wait("the SLA ticket resolved", |v| {
            v.events_of("ops-webhook", &fp)
                .into_iter()
                .find(|b| b["event"] == "resolved")
        })
        .await;
    assert_eq!(
        h.vendors.bodies("ops-webhook").len(),
        2,
        "opened and resolved, nothing else"
    );

    // Bad reports: refused, naming the field.
    let cases = [
        (
            r#"{"causes":[{"kind":"flow_degraded","reason":"breaker_open","summary":"x"}]}"#,
            "causes[0].reason",
        ),
        (
            r#"{"causes":[{"kind":"sla_breached","reason":"sla:X","summary":"x"}]}"#,
            "causes[0].kind",
        ),
        (
            r#"{"causes":[{"kind":"flow_degraded","reason":"sla:X"}]}"#,
            "summary",
        ),
        (r#"{"causes": "all of them"}"#, "causes"),
        ("not json", "body"),
    ];
    for (body, field) in cases {
        let (status, answer) = h.put_raw("/exceptions", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(field),
            "{body}: the error names {field}: {answer}"
        );
    }
    let open: Vec<Value> = h
        .tickets()
        .await
        .into_iter()
        .filter(|t| t["state"] != "resolved")
        .collect();
    assert!(open.is_empty(), "a refused report raises nothing: {open:?}");
    h.worker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// 7. Escalation, with the ledger's clock in the test's hand

/// A ticket sink that keeps every ticket it is sent.
struct Recording {
    name: String,
    sent: Mutex<Vec<Ticket>>,
}

impl Recording {
    fn new(name: &str) -> Arc<Recording> {
        Arc::new(Recording {
            name: name.into(),
            sent: Mutex::new(Vec::new()),
        })
    }

    /// What it holds of ticket `fp`: the last version sent.
    fn latest(&self, fp: &str) -> Option<Ticket> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|t| t.fingerprint == fp)
            .cloned()
    }

    fn count(&self, fp: &str) -> usize {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.fingerprint == fp)
            .count()
    }
}

#[async_trait]
impl TicketSink for Recording {
    fn name(&self) -> &str {
        &self.name
    }
    async fn deliver(
        &self,
        d: TicketDelivery<'_>,
    ) -> Result<SinkRef, meshline::tickets::sinks::SinkError> {
        self.sent.lock().unwrap().push(d.ticket.clone());
        Ok(json!({"version": d.ticket.version}))
    }
}

struct Healthy;

impl FlowSignals for Healthy {
    fn breaker_open(&self) -> Option<String> {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_ticket_climbs_the_ladder_and_pages_and_an_acknowledged_one_stays() {
    let (_vendors, base) = vendors().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = example();
    let mut roster = roster(
        "[{errorClass: FlowLevel, action: escalate, role: sinkOwner, ticketSink: finance-jira}]",
        &[
            ("finance-jira", SinkKind::Jira),
            ("platform-pager", SinkKind::Pagerduty),
        ],
        &base,
        &dir.path().join("secrets"),
    );
    roster.spec.escalation = serde_yaml::from_str(
        "[{after: 30m, role: syncOwner}, {after: 2h, role: platformOwner, page: true}]",
    )
    .unwrap();
    rendered.roster = Some(roster.clone());
    let clock = ManualClock::starting_at(1_767_225_600_000);
    let ledger: Arc<dyn Ledger> = meshline::ledger::open(
        &LedgerTarget::Sqlite(dir.path().join("ledger.db")),
        FLOW,
        clock.clone(),
    )
    .await
    .unwrap();
    let (jira, pager) = (
        Recording::new("finance-jira"),
        Recording::new("platform-pager"),
    );
    let mut sinks: BTreeMap<String, Arc<dyn TicketSink>> = BTreeMap::new();
    sinks.insert("finance-jira".into(), jira.clone());
    sinks.insert("platform-pager".into(), pager.clone());
    let dispatcher = Dispatcher {
        ledger: ledger.clone(),
        flow: rendered.flow.clone(),
        roster: Some(roster),
        sinks,
        clock: clock.clone(),
        signals: Arc::new(Healthy),
        send_lease: std::time::Duration::from_secs(60),
    };
    let raise = |reason: &str| RaisedException {
        kind: ExceptionKind::FlowDegraded,
        class: Some(ErrorClass::FlowLevel),
        reason: reason.into(),
        rule: None,
        summary: format!("{reason} for the last 10 minutes"),
    };
    let climbing_fp = ticket_fp(
        ExceptionKind::FlowDegraded,
        Some(ErrorClass::FlowLevel),
        "sla:LatencyOverSla",
    );
    let acked_fp = ticket_fp(
        ExceptionKind::FlowDegraded,
        Some(ErrorClass::FlowLevel),
        "sla:FailureRateOverSla",
    );
    let ledger_fp = ledger
        .raise_exception(raise("sla:LatencyOverSla"))
        .await
        .unwrap();
    let acked_ledger_fp = ledger
        .raise_exception(raise("sla:FailureRateOverSla"))
        .await
        .unwrap();

    let tick = dispatcher.tick().await.unwrap();
    assert_eq!(tick.assigned, 2, "{tick:?}");
    for fp in [&climbing_fp, &acked_fp] {
        let t = jira.latest(fp).expect("delivered at once");
        assert_eq!(
            (t.owner.id.as_str(), t.escalation_step, t.page),
            ("marcus", 0, false)
        );
    }
    assert!(pager.sent.lock().unwrap().is_empty(), "nothing pages yet");

    // Marcus acknowledges one of them ten minutes in.
    clock.advance(Duration::from_secs(10 * 60));
    assert!(
        ledger
            .acknowledge_ticket(&acked_ledger_fp, "marcus")
            .await
            .unwrap()
    );
    dispatcher.tick().await.unwrap();
    assert_eq!(
        jira.latest(&acked_fp).unwrap().state,
        TicketState::Acknowledged
    );

    // Just short of the first step nothing moves; past it the unacknowledged one goes to the sync owner.
    clock.advance(Duration::from_secs(20 * 60 - 1));
    let tick = dispatcher.tick().await.unwrap();
    assert_eq!(tick.assigned, 0, "{tick:?}");
    clock.advance(Duration::from_secs(2));
    dispatcher.tick().await.unwrap();
    let t = jira.latest(&climbing_fp).unwrap();
    assert_eq!(
        (t.owner.id.as_str(), t.escalation_step, t.page),
        ("dana", 1, false)
    );
    assert!(
        pager.sent.lock().unwrap().is_empty(),
        "step 1 does not page"
    );

    // Past two hours: the platform owner, paged.
    clock.advance(Duration::from_secs(90 * 60));
    dispatcher.tick().await.unwrap();
    let t = jira.latest(&climbing_fp).unwrap();
    assert_eq!(
        (t.owner.id.as_str(), t.escalation_step, t.page),
        ("platform-team", 2, true)
    );
    let paged = pager
        .latest(&climbing_fp)
        .expect("paged at the step that says so");
    assert_eq!(paged.owner.id, "platform-team");
    assert!(paged.page);
    let stored = ledger.ticket(&ledger_fp).await.unwrap().unwrap();
    assert_eq!(stored.assignment.unwrap().escalation_step, 2);

    // Hours later: the top of the ladder is where it stays, and nothing is sent again for no change.
    let (jira_sends, pager_sends) = (jira.count(&climbing_fp), pager.count(&climbing_fp));
    clock.advance(Duration::from_secs(6 * 3600));
    dispatcher.tick().await.unwrap();
    assert_eq!(jira.count(&climbing_fp), jira_sends);
    assert_eq!(pager.count(&climbing_fp), pager_sends);

    // The acknowledged one never climbed and never paged.
    let t = jira.latest(&acked_fp).unwrap();
    assert_eq!(
        (t.owner.id.as_str(), t.escalation_step, t.page),
        ("marcus", 0, false)
    );
    assert_eq!(pager.count(&acked_fp), 0);
    let stored = ledger.ticket(&acked_ledger_fp).await.unwrap().unwrap();
    assert_eq!(stored.state, TicketState::Acknowledged);
    assert_eq!(stored.assignment.unwrap().escalation_step, 0);

    // The cause clears: resolved at both sinks the climbing ticket reached.
    assert!(ledger.clear_exception(&ledger_fp).await.unwrap());
    dispatcher.tick().await.unwrap();
    assert_eq!(
        jira.latest(&climbing_fp).unwrap().state,
        TicketState::Resolved
    );
    assert_eq!(
        pager.latest(&climbing_fp).unwrap().state,
        TicketState::Resolved
    );
    ledger.close().await;
}
