//! The five ticket sinks against local servers that check each request the way the vendor's API does:
//! method, path, auth header format, required headers, content type, JSON shape and the vendor's limits.
//! Each server keeps what a real one would (issues, comments, alerts), so the tests assert the ticket's life
//! there: opened, updated, resolved, and no second issue after a delivery that was in doubt.

#[path = "support/sink_mock.rs"]
mod sink_mock;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use chrono::{TimeZone, Utc};
use hmac::{Hmac, Mac};
use meshline::api::{
    ErrorClass, OwnerRole, SecretRef, TicketSink as TicketSinkSpec, TicketSinkType,
};
use meshline::connectors::Credentials;
use meshline::tickets::sinks::{self, Delivery, SinkError, SinkRef, TicketSink};
use meshline::tickets::{Assignee, Example, ExceptionKind, Ticket, TicketState, fingerprint};
use serde_json::{Value, json};
use sha2::Sha256;
use sink_mock::{header, secret, serve};
use tokio::sync::Mutex;

const SIGNING: &str = "whsec-tickets-9c";
const JIRA_EMAIL: &str = "bot@example.net";
const JIRA_TOKEN: &str = "jira-token-5d1";
const GITHUB_TOKEN: &str = "ghp_tickettoken0042";
const ROUTING_KEY: &str = "R0UT1NGKEY0123456789ABCDEFGHIJKL";
/// The path part of the Slack incoming-webhook URL: the secret part of it.
const SLACK_PATH: &str = "/services/T0001/B0002/s3cretW3bhookPath";

// ---------------------------------------------------------------------------------------------------------
// Tickets and specs

/// A dead-letter ticket whose examples carry what upstream redaction leaves: the ERP's error text and the
/// snapshot had an e-mail address and a phone number, now `[REDACTED]`.
fn ticket(state: TicketState, version: i64) -> Ticket {
    let at = Utc.with_ymd_and_hms(2026, 3, 2, 9, 30, 0).unwrap();
    let fp = fingerprint(
        "sales",
        "orders",
        ExceptionKind::DeadLetter,
        Some(ErrorClass::Permanent),
        "erp:422",
    );
    Ticket {
        fingerprint: fp,
        namespace: "sales".into(),
        flow: "orders".into(),
        kind: ExceptionKind::DeadLetter,
        class: Some(ErrorClass::Permanent),
        reason: "erp:422".into(),
        rule: Some("discount_cap".into()),
        title: "3 records dead-lettered: erp:422".into(),
        summary: "The ERP refused the order: customer [REDACTED] has no billing address.".into(),
        state,
        role: OwnerRole::SinkOwner,
        owner: Assignee {
            id: "dana".into(),
            name: "Dana Ortiz".into(),
            email: None,
            chat: Some("@U024BE7LH".into()),
            pager: None,
        },
        escalation_step: 0,
        page: true,
        count: 3 + version as u64,
        outstanding: if state == TicketState::Resolved { 0 } else { 3 },
        opened_at: at,
        updated_at: at + chrono::Duration::minutes(version),
        acknowledged_at: None,
        acknowledged_by: None,
        resolved_at: (state == TicketState::Resolved).then(|| at + chrono::Duration::hours(2)),
        examples: vec![Example {
            record: 4711,
            correlation_id: "c0ffee-17".into(),
            source_key: "0065g00000XyZ01".into(),
            at,
            message: Some("customer [REDACTED] needs a billing address <street> & city".into()),
            erp_response: Some(
                r#"{"error": {"code": "INVALID_FLD", "message": "email [REDACTED], phone [REDACTED]"}}"#
                    .into(),
            ),
            snapshot: Some(json!({"Id": "0065g00000XyZ01", "Email": "[REDACTED]", "Amount": 1250.5})),
        }],
        commands: vec![
            "meshline lineage sales/orders --record 4711".into(),
            "meshline dlq replay sales/orders --reason erp:422".into(),
        ],
        version,
    }
}

fn spec(kind: TicketSinkType, url: Option<String>) -> TicketSinkSpec {
    TicketSinkSpec {
        name: format!("{kind:?}-ops").to_lowercase(),
        r#type: kind,
        url,
        project: Some("OPS".into()),
        repository: Some("acme/erp-sync".into()),
        channel: Some("#erp-sync".into()),
        credentials_secret_ref: SecretRef {
            name: "ticket-credentials".into(),
        },
    }
}

fn build(spec: &TicketSinkSpec, credentials: &Credentials) -> Box<dyn TicketSink> {
    sinks::build(spec, credentials, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

async fn deliver(
    sink: &dyn TicketSink,
    ticket: &Ticket,
    previous: Option<&SinkRef>,
    in_doubt: bool,
) -> Result<SinkRef, SinkError> {
    sink.deliver(Delivery {
        ticket,
        previous,
        in_doubt,
    })
    .await
}

/// Answers queued for the next requests, before the mock looks at them (an outage, a rate limit, a refusal).
#[derive(Default)]
struct Script(Mutex<Vec<Scripted>>);

/// A status, headers and body.
type Scripted = (u16, Vec<(&'static str, String)>, String);

impl Script {
    async fn push(&self, status: u16, headers: &[(&'static str, &str)], body: &str) {
        let headers = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.0.lock().await.push((status, headers, body.into()));
    }

    async fn next(&self) -> Option<Response> {
        let mut queue = self.0.lock().await;
        if queue.is_empty() {
            return None;
        }
        let (status, headers, body) = queue.remove(0);
        let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
        for (name, value) in headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        Some(response)
    }
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, why.into()).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    header(headers, "content-type").starts_with("application/json")
}

// ---------------------------------------------------------------------------------------------------------
// "No other data": every data-like token a sink sends (one with a digit or an `@`) comes from the ticket.

fn string_leaves(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| string_leaves(v, out)),
        Value::Object(fields) => fields.values().for_each(|v| string_leaves(v, out)),
        _ => {}
    }
}

fn assert_only_ticket_data(format: &str, bodies: &[Value], tickets: &[&Ticket], allowed: &[&str]) {
    let source: String = tickets
        .iter()
        .map(|t| serde_json::to_string(t).unwrap())
        .collect();
    let mut texts = Vec::new();
    bodies.iter().for_each(|b| string_leaves(b, &mut texts));
    assert!(
        texts.iter().any(|t| t.contains("[REDACTED]")),
        "{format}: the examples' redacted texts were not sent at all"
    );
    for text in &texts {
        let tokens = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '+')));
        for token in tokens.map(|t| t.trim_matches('.')) {
            let data_like = token.chars().any(|c| c.is_ascii_digit() || c == '@');
            if data_like && !source.contains(token) && !allowed.contains(&token) {
                panic!("{format} sent {token:?}, which is not in the ticket: {text:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Generic webhook

#[derive(Default)]
struct WebhookReceiver {
    script: Script,
    bodies: Mutex<Vec<Value>>,
    idempotency_keys: Mutex<Vec<String>>,
}

fn signature_valid(headers: &HeaderMap, body: &[u8]) -> bool {
    let timestamp = header(headers, "x-meshline-timestamp");
    if timestamp.parse::<i64>().is_err() {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    header(headers, "x-meshline-signature")
        == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn webhook_receive(
    State(receiver): State<Arc<WebhookReceiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(scripted) = receiver.script.next().await {
        return scripted;
    }
    if !is_json(&headers) {
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "json only");
    }
    if !signature_valid(&headers, &body) {
        return refuse(StatusCode::UNAUTHORIZED, "bad signature");
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let expected_key = format!(
        "{}:{}",
        parsed["fingerprint"].as_str().unwrap_or(""),
        parsed["version"]
    );
    if header(&headers, "idempotency-key") != expected_key {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key is not fingerprint:version",
        );
    }
    let mut keys = receiver.idempotency_keys.lock().await;
    if !keys.contains(&expected_key) {
        keys.push(expected_key);
        receiver.bodies.lock().await.push(parsed);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn webhook_receiver() -> (Arc<WebhookReceiver>, String) {
    let receiver = Arc::new(WebhookReceiver::default());
    let router = Router::new()
        .route("/hooks/tickets", post(webhook_receive))
        .with_state(receiver.clone());
    let url = format!("{}/hooks/tickets", serve(router).await);
    (receiver, url)
}

#[tokio::test]
async fn webhook_sends_each_event_signed_and_a_resend_is_recognised() {
    let (receiver, url) = webhook_receiver().await;
    let (_dir, credentials) = secret(&[("signingSecret", SIGNING)]);
    let sink = build(&spec(TicketSinkType::Webhook, Some(url)), &credentials);

    let opened = ticket(TicketState::Open, 1);
    let r1 = deliver(&*sink, &opened, None, false).await.unwrap();
    assert_eq!(r1, json!({"delivered": 1}));
    let updated = ticket(TicketState::Open, 2);
    let r2 = deliver(&*sink, &updated, Some(&r1), false).await.unwrap();
    // The worker died before recording the answer: the same version again, which the receiver drops.
    deliver(&*sink, &updated, Some(&r1), true).await.unwrap();
    let resolved = ticket(TicketState::Resolved, 3);
    deliver(&*sink, &resolved, Some(&r2), false).await.unwrap();

    let bodies = receiver.bodies.lock().await.clone();
    let events: Vec<&str> = bodies
        .iter()
        .map(|b| b["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["opened", "updated", "resolved"]);
    // The body is the ticket itself plus the event, nothing else.
    for (body, sent) in bodies.iter().zip([&opened, &updated, &resolved]) {
        let mut body = body.clone();
        body.as_object_mut().unwrap().remove("event");
        assert_eq!(body, serde_json::to_value(sent).unwrap());
    }
    assert_eq!(receiver.idempotency_keys.lock().await.len(), 3);
}

#[tokio::test]
async fn webhook_with_a_wrong_signing_secret_is_refused_and_not_retried() {
    let (receiver, url) = webhook_receiver().await;
    let (_dir, credentials) = secret(&[("signingSecret", "not-the-receivers-secret")]);
    let sink = build(&spec(TicketSinkType::Webhook, Some(url)), &credentials);
    let err = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(401), false), "{err:?}");
    assert!(!err.message.contains("not-the-receivers-secret"));
    assert!(receiver.bodies.lock().await.is_empty());
}

#[tokio::test]
async fn webhook_outage_is_retryable_with_the_receivers_retry_after() {
    let (receiver, url) = webhook_receiver().await;
    let (_dir, credentials) = secret(&[("signingSecret", SIGNING)]);
    let sink = build(&spec(TicketSinkType::Webhook, Some(url)), &credentials);
    receiver
        .script
        .push(503, &[("retry-after", "12")], "down")
        .await;
    let err = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap_err();
    assert_eq!(
        (err.status, err.retryable, err.retry_after),
        (Some(503), true, Some(Duration::from_secs(12))),
        "{err:?}"
    );
    deliver(&*sink, &ticket(TicketState::Open, 1), None, true)
        .await
        .unwrap();
    assert_eq!(receiver.bodies.lock().await.len(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Slack incoming webhook

#[derive(Default)]
struct SlackWorkspace {
    script: Script,
    messages: Mutex<Vec<Value>>,
}

fn chars(v: &Value) -> usize {
    v.as_str().map(|s| s.chars().count()).unwrap_or(0)
}

/// Block Kit's rules as Slack enforces them for the blocks meshline uses; `Err` is Slack's answer.
fn check_block_kit(message: &Value) -> Result<(), String> {
    let text = message["text"].as_str().ok_or("no_text")?;
    if text.trim().is_empty() {
        return Err("no_text".into());
    }
    let blocks = message["blocks"]
        .as_array()
        .ok_or("invalid_blocks: blocks")?;
    if blocks.is_empty() || blocks.len() > 50 {
        return Err(format!("invalid_blocks: {} blocks", blocks.len()));
    }
    let mrkdwn_or_plain = |t: &Value, max: usize, what: &str| -> Result<(), String> {
        let kind = t["type"].as_str().unwrap_or("");
        if !matches!(kind, "mrkdwn" | "plain_text")
            || chars(&t["text"]) == 0
            || chars(&t["text"]) > max
        {
            return Err(format!(
                "invalid_blocks: {what} ({kind}, {} chars)",
                chars(&t["text"])
            ));
        }
        Ok(())
    };
    for block in blocks {
        match block["type"].as_str().unwrap_or("") {
            "header" => {
                if block["text"]["type"] != "plain_text" {
                    return Err("invalid_blocks: header text must be plain_text".into());
                }
                mrkdwn_or_plain(&block["text"], 150, "header")?;
            }
            "section" => {
                let fields = block["fields"].as_array();
                if block.get("text").is_none() && fields.is_none() {
                    return Err("invalid_blocks: a section needs text or fields".into());
                }
                if block.get("text").is_some() {
                    mrkdwn_or_plain(&block["text"], 3000, "section text")?;
                }
                if let Some(fields) = fields {
                    if fields.len() > 10 {
                        return Err("invalid_blocks: more than 10 fields".into());
                    }
                    for field in fields {
                        mrkdwn_or_plain(field, 2000, "field")?;
                    }
                }
            }
            "context" => {
                let elements = block["elements"]
                    .as_array()
                    .ok_or("invalid_blocks: context")?;
                if elements.is_empty() || elements.len() > 10 {
                    return Err("invalid_blocks: context elements".into());
                }
                for element in elements {
                    mrkdwn_or_plain(element, 3000, "context element")?;
                }
            }
            other => return Err(format!("invalid_blocks: unknown block type {other:?}")),
        }
    }
    Ok(())
}

async fn slack_post(
    State(workspace): State<Arc<SlackWorkspace>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(scripted) = workspace.script.next().await {
        return scripted;
    }
    if !is_json(&headers) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_payload");
    }
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_payload");
    };
    if let Err(why) = check_block_kit(&message) {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    workspace.messages.lock().await.push(message);
    (StatusCode::OK, "ok").into_response()
}

async fn slack_workspace() -> (Arc<SlackWorkspace>, Credentials, tempfile::TempDir) {
    let workspace = Arc::new(SlackWorkspace::default());
    let router = Router::new()
        .route(SLACK_PATH, post(slack_post))
        .with_state(workspace.clone());
    let url = format!("{}{SLACK_PATH}", serve(router).await);
    let (dir, credentials) = secret(&[("webhookUrl", url.as_str())]);
    (workspace, credentials, dir)
}

fn header_text(message: &Value) -> String {
    message["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn slack_posts_one_block_kit_message_per_event() {
    let (workspace, credentials, _dir) = slack_workspace().await;
    // spec.url points nowhere: the webhook URL is a credential and comes only from the Secret.
    let sink = build(
        &spec(
            TicketSinkType::Slack,
            Some("http://127.0.0.1:9/not-used".into()),
        ),
        &credentials,
    );
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    assert_eq!(r1, json!({"posted": 1}));
    let r2 = deliver(&*sink, &ticket(TicketState::Open, 2), Some(&r1), false)
        .await
        .unwrap();
    deliver(&*sink, &ticket(TicketState::Resolved, 3), Some(&r2), false)
        .await
        .unwrap();

    let messages = workspace.messages.lock().await.clone();
    let heads: Vec<String> = messages.iter().map(header_text).collect();
    assert!(
        heads[0].starts_with("[opened] sales/orders: 3 records dead-lettered"),
        "{heads:?}"
    );
    assert!(heads[1].starts_with("[updated] "), "{heads:?}");
    assert!(heads[2].starts_with("[resolved] "), "{heads:?}");
    let first = messages[0].to_string();
    assert!(
        first.contains("<@U024BE7LH>"),
        "the owner is mentioned by member id: {first}"
    );
    assert!(
        first.contains("&lt;street&gt; &amp; city"),
        "mrkdwn is escaped: {first}"
    );
    assert!(first.contains("meshline dlq replay sales/orders --reason erp:422"));
}

#[tokio::test]
async fn slack_message_stays_within_block_kit_limits_for_a_huge_ticket() {
    let (workspace, credentials, _dir) = slack_workspace().await;
    let sink = build(&spec(TicketSinkType::Slack, None), &credentials);
    let mut huge = ticket(TicketState::Open, 1);
    huge.title = "é".repeat(400);
    huge.summary = "<&>".repeat(5000);
    huge.reason = "ü".repeat(3000);
    let example = huge.examples[0].clone();
    huge.examples = (0..5)
        .map(|i| Example {
            record: i,
            message: Some("x`y".repeat(3000)),
            erp_response: Some("é".repeat(9000)),
            ..example.clone()
        })
        .collect();
    huge.commands = (0..200)
        .map(|i| format!("meshline lineage {i} {}", "z".repeat(50)))
        .collect();
    deliver(&*sink, &huge, None, false).await.unwrap();
    let message = workspace.messages.lock().await[0].clone();
    assert!(chars(&message["blocks"][0]["text"]["text"]) <= 150);
    assert!(header_text(&message).ends_with('…'));
}

#[tokio::test]
async fn slack_refusals_are_final_rate_limits_are_retried_and_the_url_is_never_quoted() {
    let (workspace, credentials, _dir) = slack_workspace().await;
    let sink = build(&spec(TicketSinkType::Slack, None), &credentials);
    let open = ticket(TicketState::Open, 1);

    workspace.script.push(404, &[], "no_service").await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(404), false), "{err:?}");
    assert!(err.message.contains("no_service"), "{}", err.message);
    assert!(
        !err.message.contains("s3cretW3bhookPath"),
        "{}",
        err.message
    );

    workspace
        .script
        .push(429, &[("retry-after", "30")], "rate_limited")
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!(
        (err.retryable, err.retry_after),
        (true, Some(Duration::from_secs(30)))
    );

    // A connection failure quotes no URL either.
    let (_dir2, unreachable) = secret(&[(
        "webhookUrl",
        "http://127.0.0.1:9/services/T1/B2/s3cretW3bhookPath",
    )]);
    let err = deliver(
        &*build(&spec(TicketSinkType::Slack, None), &unreachable),
        &open,
        None,
        false,
    )
    .await
    .unwrap_err();
    assert!(err.retryable);
    assert!(
        !err.message.contains("s3cretW3bhookPath"),
        "{}",
        err.message
    );
}

// ---------------------------------------------------------------------------------------------------------
// Jira Cloud REST v3

#[derive(Clone, Debug)]
struct JiraIssue {
    key: String,
    labels: Vec<String>,
    status_category: &'static str,
    description: Value,
    comments: Vec<Value>,
}

#[derive(Default)]
struct Jira {
    script: Script,
    issues: Mutex<Vec<JiraIssue>>,
    creates: Mutex<u32>,
    searches: Mutex<u32>,
    /// Every body a client sent, for the "no other data" check.
    bodies: Mutex<Vec<Value>>,
}

/// `Some(refusal)` when the request would be refused.
fn jira_auth(headers: &HeaderMap) -> Option<Response> {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{JIRA_EMAIL}:{JIRA_TOKEN}"))
    );
    if header(headers, "authorization") != expected {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "Client must be authenticated",
        ));
    }
    None
}

/// The ADF rules Jira enforces for the nodes meshline writes.
fn check_adf(doc: &Value) -> Result<(), String> {
    if doc["type"] != "doc" || doc["version"] != 1 {
        return Err("ADF: the root must be {type: doc, version: 1}".into());
    }
    fn node(n: &Value, parent: &str) -> Result<(), String> {
        let kind = n["type"].as_str().ok_or("ADF: a node without type")?;
        let allowed_in = |parents: &[&str]| {
            if parents.contains(&parent) {
                Ok(())
            } else {
                Err(format!("ADF: {kind} inside {parent}"))
            }
        };
        match kind {
            "paragraph" | "heading" | "bulletList" | "codeBlock" => {
                allowed_in(&["doc", "listItem"])?
            }
            "listItem" => allowed_in(&["bulletList"])?,
            "text" => {
                allowed_in(&["paragraph", "heading", "codeBlock"])?;
                if n["text"].as_str().is_none_or(str::is_empty) {
                    return Err("ADF: empty text node".into());
                }
                if parent == "codeBlock" && n.get("marks").is_some() {
                    return Err("ADF: marks in a codeBlock".into());
                }
                return Ok(());
            }
            other => return Err(format!("ADF: unknown node type {other:?}")),
        }
        if kind == "heading" && !(1..=6).contains(&n["attrs"]["level"].as_u64().unwrap_or(0)) {
            return Err("ADF: heading without level 1-6".into());
        }
        let content = n["content"]
            .as_array()
            .ok_or(format!("ADF: {kind} without content"))?;
        if matches!(kind, "bulletList" | "listItem") && content.is_empty() {
            return Err(format!("ADF: empty {kind}"));
        }
        content.iter().try_for_each(|child| node(child, kind))
    }
    doc["content"]
        .as_array()
        .ok_or("ADF: doc without content")?
        .iter()
        .try_for_each(|n| node(n, "doc"))
}

async fn jira_create(
    State(jira): State<Arc<Jira>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(scripted) = jira.script.next().await {
        return scripted;
    }
    if let Some(refused) = jira_auth(&headers) {
        return refused;
    }
    jira.bodies.lock().await.push(body.clone());
    let fields = &body["fields"];
    let summary = fields["summary"].as_str().unwrap_or("");
    let mut errors = serde_json::Map::new();
    if fields["project"]["key"] != "OPS" {
        errors.insert("project".into(), json!("valid project is required"));
    }
    if summary.trim().is_empty() || summary.chars().count() > 255 || summary.contains(['\n', '\r'])
    {
        errors.insert(
            "summary".into(),
            json!("Summary must be less than 255 characters and on one line."),
        );
    }
    if fields["issuetype"]["name"].as_str().is_none() {
        errors.insert("issuetype".into(), json!("Specify an issue type"));
    }
    if let Err(e) = check_adf(&fields["description"]) {
        errors.insert("description".into(), json!(e));
    }
    let labels: Vec<String> = fields["labels"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if labels.iter().any(|l| l.contains(' ') || l.len() > 255) {
        errors.insert("labels".into(), json!("Labels cannot contain spaces"));
    }
    if !errors.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"errorMessages": [], "errors": errors})),
        )
            .into_response();
    }
    *jira.creates.lock().await += 1;
    let mut issues = jira.issues.lock().await;
    let key = format!("OPS-{}", issues.len() + 1);
    issues.push(JiraIssue {
        key: key.clone(),
        labels,
        status_category: "new",
        description: fields["description"].clone(),
        comments: Vec::new(),
    });
    let id = 10000 + issues.len();
    (
        StatusCode::CREATED,
        Json(json!({"id": id.to_string(), "key": key, "self": format!("https://example.atlassian.net/rest/api/3/issue/{id}")})),
    )
        .into_response()
}

async fn jira_comment(
    State(jira): State<Arc<Jira>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = jira_auth(&headers) {
        return refused;
    }
    jira.bodies.lock().await.push(body.clone());
    if let Err(e) = check_adf(&body["body"]) {
        return refuse(StatusCode::BAD_REQUEST, e);
    }
    let mut issues = jira.issues.lock().await;
    let Some(issue) = issues.iter_mut().find(|i| i.key == key) else {
        return refuse(StatusCode::NOT_FOUND, "Issue does not exist");
    };
    issue.comments.push(body["body"].clone());
    (
        StatusCode::CREATED,
        Json(json!({"id": issue.comments.len().to_string()})),
    )
        .into_response()
}

const JIRA_TRANSITIONS: [(&str, &str, &str); 3] = [
    ("11", "Start progress", "indeterminate"),
    ("31", "Done", "done"),
    ("41", "Reopen", "new"),
];

async fn jira_transitions(
    State(jira): State<Arc<Jira>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = jira_auth(&headers) {
        return refused;
    }
    let issues = jira.issues.lock().await;
    let Some(issue) = issues.iter().find(|i| i.key == key) else {
        return refuse(StatusCode::NOT_FOUND, "Issue does not exist");
    };
    // Like a real workflow, only the transitions out of the current status are offered.
    let offered: Vec<Value> = JIRA_TRANSITIONS
        .iter()
        .filter(|(_, _, to)| *to != issue.status_category)
        .filter(|(_, _, to)| issue.status_category != "done" || *to == "new")
        .map(
            |(id, name, to)| json!({"id": id, "name": name, "to": {"statusCategory": {"key": to}}}),
        )
        .collect();
    Json(json!({"transitions": offered})).into_response()
}

async fn jira_transition(
    State(jira): State<Arc<Jira>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = jira_auth(&headers) {
        return refused;
    }
    let mut issues = jira.issues.lock().await;
    let Some(issue) = issues.iter_mut().find(|i| i.key == key) else {
        return refuse(StatusCode::NOT_FOUND, "Issue does not exist");
    };
    let id = body["transition"]["id"].as_str().unwrap_or("");
    match JIRA_TRANSITIONS.iter().find(|(t, _, _)| *t == id) {
        Some((_, _, to)) => {
            issue.status_category = to;
            StatusCode::NO_CONTENT.into_response()
        }
        None => refuse(StatusCode::BAD_REQUEST, "Transition id is not valid"),
    }
}

async fn jira_issue(
    State(jira): State<Arc<Jira>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = jira_auth(&headers) {
        return refused;
    }
    let issues = jira.issues.lock().await;
    match issues.iter().find(|i| i.key == key) {
        Some(issue) => Json(json!({"key": issue.key, "fields": {"status": {"statusCategory": {"key": issue.status_category}}}})).into_response(),
        None => refuse(StatusCode::NOT_FOUND, "Issue does not exist"),
    }
}

async fn jira_search(
    State(jira): State<Arc<Jira>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = jira_auth(&headers) {
        return refused;
    }
    *jira.searches.lock().await += 1;
    let jql = body["jql"].as_str().unwrap_or("");
    let Some(label) = jql
        .strip_prefix("labels = \"")
        .and_then(|r| r.strip_suffix('"'))
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("Error in the JQL Query: {jql}"),
        );
    };
    let issues = jira.issues.lock().await;
    let found: Vec<Value> = issues
        .iter()
        .filter(|i| i.labels.iter().any(|l| l == label))
        .take(body["maxResults"].as_u64().unwrap_or(50) as usize)
        .map(|i| json!({"id": "1", "key": i.key}))
        .collect();
    Json(json!({"issues": found, "isLast": true})).into_response()
}

async fn jira() -> (Arc<Jira>, Box<dyn TicketSink>, tempfile::TempDir) {
    let jira = Arc::new(Jira::default());
    let router = Router::new()
        .route("/rest/api/3/issue", post(jira_create))
        .route("/rest/api/3/issue/{key}", get(jira_issue))
        .route("/rest/api/3/issue/{key}/comment", post(jira_comment))
        .route(
            "/rest/api/3/issue/{key}/transitions",
            get(jira_transitions).post(jira_transition),
        )
        .route("/rest/api/3/search/jql", post(jira_search))
        .with_state(jira.clone());
    let url = serve(router).await;
    let (dir, credentials) = secret(&[("email", JIRA_EMAIL), ("apiToken", JIRA_TOKEN)]);
    let sink = build(&spec(TicketSinkType::Jira, Some(url)), &credentials);
    (jira, sink, dir)
}

#[tokio::test]
async fn jira_issue_is_created_commented_and_transitioned_to_done() {
    let (jira, sink, _dir) = jira().await;
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    assert_eq!(r1, json!({"key": "OPS-1"}));
    let r2 = deliver(&*sink, &ticket(TicketState::Open, 2), Some(&r1), false)
        .await
        .unwrap();
    assert_eq!(r2, r1);
    let r3 = deliver(&*sink, &ticket(TicketState::Resolved, 3), Some(&r2), false)
        .await
        .unwrap();
    assert_eq!(r3, r1);

    let issues = jira.issues.lock().await.clone();
    assert_eq!(issues.len(), 1, "one issue per ticket");
    let issue = &issues[0];
    let fp = ticket(TicketState::Open, 1).fingerprint;
    assert_eq!(
        issue.labels,
        ["meshline".to_string(), format!("meshline-{fp}")]
    );
    assert_eq!(
        issue.comments.len(),
        2,
        "one comment per update and one on resolve"
    );
    assert!(
        issue.comments[1]
            .to_string()
            .contains("Resolved: the cause cleared")
    );
    assert_eq!(issue.status_category, "done");
    assert!(
        issue
            .description
            .to_string()
            .contains("meshline dlq replay sales/orders")
    );

    // A resend of the resolved version (the worker died after the transition) leaves the issue done.
    deliver(&*sink, &ticket(TicketState::Resolved, 3), Some(&r2), true)
        .await
        .unwrap();
    assert_eq!(jira.issues.lock().await[0].status_category, "done");
}

#[tokio::test]
async fn jira_in_doubt_reuses_the_issue_a_lost_attempt_created() {
    let (jira, sink, _dir) = jira().await;
    let open = ticket(TicketState::Open, 1);
    // The first attempt reached Jira but its answer was lost.
    deliver(&*sink, &open, None, false).await.unwrap();
    let recovered = deliver(&*sink, &open, None, true).await.unwrap();
    assert_eq!(recovered, json!({"key": "OPS-1"}));
    assert_eq!(*jira.creates.lock().await, 1, "no second issue");
    assert_eq!(*jira.searches.lock().await, 1);
    assert!(jira.issues.lock().await[0].comments.is_empty());

    // Not in doubt: no search before creating (another ticket, another issue).
    let mut other = ticket(TicketState::Open, 1);
    other.fingerprint = "0".repeat(32);
    assert_eq!(
        deliver(&*sink, &other, None, false).await.unwrap(),
        json!({"key": "OPS-2"})
    );
    assert_eq!(*jira.searches.lock().await, 1);
}

#[tokio::test]
async fn jira_refusals_and_outages_are_told_apart() {
    let (jira, sink, _dir) = jira().await;
    let open = ticket(TicketState::Open, 1);
    jira.script
        .push(
            400,
            &[],
            r#"{"errorMessages":[],"errors":{"project":"valid project is required"}}"#,
        )
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(400), false), "{err:?}");
    assert_eq!(
        err.refusal(),
        Some(400),
        "a refusal: the sink is failing at once"
    );
    assert!(
        err.message.contains("valid project is required"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("jira-ops"),
        "names the sink: {}",
        err.message
    );
    assert!(!err.message.contains(JIRA_TOKEN));

    jira.script
        .push(503, &[("retry-after", "120")], "maintenance")
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!(
        (err.retryable, err.retry_after),
        (true, Some(Duration::from_secs(120)))
    );
    assert_eq!(err.refusal(), None, "an outage counts towards three");
    jira.script.push(429, &[("retry-after", "5")], "").await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert!(err.retryable);
    assert_eq!(err.refusal(), None, "a rate limit is not a refusal");
    assert_eq!(*jira.creates.lock().await, 0);
}

// ---------------------------------------------------------------------------------------------------------
// GitHub Issues REST

#[derive(Clone, Debug)]
struct GithubIssue {
    number: u64,
    title: String,
    labels: Vec<String>,
    state: String,
    state_reason: Option<String>,
    comments: Vec<String>,
}

#[derive(Default)]
struct Github {
    script: Script,
    issues: Mutex<Vec<GithubIssue>>,
    creates: Mutex<u32>,
    bodies: Mutex<Vec<Value>>,
}

/// GitHub's rules for every REST request: a User-Agent (403 without one), the token as Bearer, and the
/// documented media type and API version.
/// `Some(refusal)` when the request would be refused.
fn github_headers(headers: &HeaderMap) -> Option<Response> {
    if header(headers, "user-agent").is_empty() {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "Request forbidden by administrative rules. Please make sure your request has a User-Agent header",
        ));
    }
    if header(headers, "authorization") != format!("Bearer {GITHUB_TOKEN}") {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            r#"{"message":"Bad credentials"}"#,
        ));
    }
    if header(headers, "accept") != "application/vnd.github+json" {
        return Some(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported Accept",
        ));
    }
    if header(headers, "x-github-api-version") != "2022-11-28" {
        return Some(refuse(StatusCode::BAD_REQUEST, "unsupported API version"));
    }
    None
}

fn issue_json(issue: &GithubIssue) -> Value {
    json!({
        "number": issue.number,
        "title": issue.title,
        "state": issue.state,
        "labels": issue.labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>(),
    })
}

async fn github_create(
    State(github): State<Arc<Github>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(scripted) = github.script.next().await {
        return scripted;
    }
    if let Some(refused) = github_headers(&headers) {
        return refused;
    }
    if (owner.as_str(), repo.as_str()) != ("acme", "erp-sync") {
        return refuse(StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#);
    }
    github.bodies.lock().await.push(body.clone());
    let title = body["title"].as_str().unwrap_or("");
    if title.trim().is_empty() || title.chars().count() > 256 || chars(&body["body"]) > 65536 {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": "Validation Failed"})),
        )
            .into_response();
    }
    let Some(labels) = body["labels"].as_array().and_then(|l| {
        l.iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
    }) else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": "labels must be strings"})),
        )
            .into_response();
    };
    *github.creates.lock().await += 1;
    let mut issues = github.issues.lock().await;
    let issue = GithubIssue {
        number: 100 + issues.len() as u64,
        title: title.into(),
        labels,
        state: "open".into(),
        state_reason: None,
        comments: Vec::new(),
    };
    let answer = issue_json(&issue);
    issues.push(issue);
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn github_list(
    State(github): State<Arc<Github>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = github_headers(&headers) {
        return refused;
    }
    let state = query.get("state").map(String::as_str).unwrap_or("open");
    let wanted: Vec<&str> = query
        .get("labels")
        .map(|l| l.split(',').collect())
        .unwrap_or_default();
    let issues = github.issues.lock().await;
    let mut listed: Vec<Value> = issues
        .iter()
        .filter(|i| state == "all" || i.state == state)
        .filter(|i| wanted.iter().all(|w| i.labels.iter().any(|l| l == w)))
        .map(issue_json)
        .collect();
    // A pull request with the same label, which the issues endpoint also lists.
    if !wanted.is_empty() {
        listed.insert(
            0,
            json!({"number": 7, "state": "open", "pull_request": {"url": "x"}}),
        );
    }
    Json(Value::Array(listed)).into_response()
}

async fn github_comment(
    State(github): State<Arc<Github>>,
    Path((_, _, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = github_headers(&headers) {
        return refused;
    }
    github.bodies.lock().await.push(body.clone());
    let Some(text) = body["body"].as_str().filter(|b| !b.trim().is_empty()) else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": "body is missing"})),
        )
            .into_response();
    };
    let mut issues = github.issues.lock().await;
    let Some(issue) = issues.iter_mut().find(|i| i.number == number) else {
        return refuse(StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#);
    };
    issue.comments.push(text.into());
    (
        StatusCode::CREATED,
        Json(json!({"id": issue.comments.len()})),
    )
        .into_response()
}

async fn github_update(
    State(github): State<Arc<Github>>,
    Path((_, _, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = github_headers(&headers) {
        return refused;
    }
    let state = body["state"].as_str().unwrap_or("");
    let reason = body["state_reason"].as_str();
    if !matches!(state, "open" | "closed")
        || !matches!(
            reason,
            None | Some("completed" | "not_planned" | "reopened")
        )
    {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": "Validation Failed"})),
        )
            .into_response();
    }
    let mut issues = github.issues.lock().await;
    let Some(issue) = issues.iter_mut().find(|i| i.number == number) else {
        return refuse(StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#);
    };
    issue.state = state.into();
    issue.state_reason = reason.map(str::to_string);
    Json(issue_json(issue)).into_response()
}

async fn github() -> (Arc<Github>, Box<dyn TicketSink>, tempfile::TempDir) {
    let github = Arc::new(Github::default());
    let router = Router::new()
        .route(
            "/repos/{owner}/{repo}/issues",
            post(github_create).get(github_list),
        )
        .route(
            "/repos/{owner}/{repo}/issues/{number}",
            axum::routing::patch(github_update),
        )
        .route(
            "/repos/{owner}/{repo}/issues/{number}/comments",
            post(github_comment),
        )
        .with_state(github.clone());
    let url = serve(router).await;
    let (dir, credentials) = secret(&[("token", GITHUB_TOKEN)]);
    // A client without a default User-Agent: the sink must send its own.
    let sink = build(&spec(TicketSinkType::Github, Some(url)), &credentials);
    (github, sink, dir)
}

#[tokio::test]
async fn github_issue_is_created_commented_closed_and_reopened_when_the_cause_returns() {
    let (github, sink, _dir) = github().await;
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    assert_eq!(r1["number"], 100);
    let r2 = deliver(&*sink, &ticket(TicketState::Open, 2), Some(&r1), false)
        .await
        .unwrap();
    let r3 = deliver(&*sink, &ticket(TicketState::Resolved, 3), Some(&r2), false)
        .await
        .unwrap();
    {
        let issues = github.issues.lock().await;
        assert_eq!(issues.len(), 1);
        let issue = &issues[0];
        assert_eq!(
            (issue.state.as_str(), issue.state_reason.as_deref()),
            ("closed", Some("completed"))
        );
        assert_eq!(issue.comments.len(), 2);
        assert!(issue.comments[1].starts_with("Resolved: the cause cleared"));
        let fp = ticket(TicketState::Open, 1).fingerprint;
        assert!(issue.labels.contains(&format!("meshline-{fp}")));
        assert!(
            issue
                .title
                .starts_with("sales/orders: 3 records dead-lettered")
        );
    }
    // The cause came back under the same fingerprint: the same issue reopens, no new one.
    deliver(&*sink, &ticket(TicketState::Open, 4), Some(&r3), false)
        .await
        .unwrap();
    let issues = github.issues.lock().await;
    assert_eq!((issues.len(), issues[0].state.as_str()), (1, "open"));
    assert_eq!(issues[0].comments.len(), 3);
}

#[tokio::test]
async fn github_in_doubt_reuses_the_issue_a_lost_attempt_created() {
    let (github, sink, _dir) = github().await;
    let open = ticket(TicketState::Open, 1);
    deliver(&*sink, &open, None, false).await.unwrap();
    let recovered = deliver(&*sink, &open, None, true).await.unwrap();
    assert_eq!(
        recovered["number"], 100,
        "the issue, not the pull request with the same label"
    );
    assert_eq!(*github.creates.lock().await, 1, "no second issue");

    // In doubt but nothing reached GitHub: the search finds nothing and the issue is created.
    let mut other = ticket(TicketState::Open, 1);
    other.fingerprint = "1".repeat(32);
    assert_eq!(
        deliver(&*sink, &other, None, true).await.unwrap()["number"],
        101
    );
}

#[tokio::test]
async fn github_rate_limits_are_retried_after_the_reset_and_other_refusals_are_not() {
    let (github, sink, _dir) = github().await;
    let open = ticket(TicketState::Open, 1);
    let reset = (Utc::now().timestamp() + 600).to_string();
    github
        .script
        .push(
            403,
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", &reset),
            ],
            r#"{"message":"API rate limit exceeded"}"#,
        )
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    let wait = err
        .retry_after
        .expect("the reset time becomes the retry delay");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(600),
        "{wait:?}"
    );

    github
        .script
        .push(
            429,
            &[("retry-after", "60")],
            r#"{"message":"secondary rate limit"}"#,
        )
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!(
        (err.retryable, err.retry_after),
        (true, Some(Duration::from_secs(60)))
    );

    github
        .script
        .push(
            403,
            &[],
            r#"{"message":"Resource not accessible by personal access token"}"#,
        )
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(403), false));
    assert!(!err.message.contains(GITHUB_TOKEN));
    assert_eq!(*github.creates.lock().await, 0);
}

// ---------------------------------------------------------------------------------------------------------
// PagerDuty Events API v2

#[derive(Default)]
struct PagerDuty {
    script: Script,
    /// Every accepted event, in order.
    events: Mutex<Vec<Value>>,
    /// Alert state by dedup key, the way PagerDuty folds events.
    alerts: Mutex<HashMap<String, String>>,
}

fn check_event(event: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    if event["routing_key"].as_str().is_none_or(|k| k.len() != 32) {
        errors.push("'routing_key' must be a 32 character string");
    }
    let action = event["event_action"].as_str().unwrap_or("");
    if !matches!(action, "trigger" | "acknowledge" | "resolve") {
        errors.push("'event_action' is invalid");
    }
    if event["dedup_key"]
        .as_str()
        .is_none_or(|k| k.is_empty() || k.len() > 255)
    {
        errors.push("'dedup_key' must be 1-255 characters");
    }
    if action == "trigger" {
        let payload = &event["payload"];
        if chars(&payload["summary"]) == 0 || chars(&payload["summary"]) > 1024 {
            errors.push("'payload.summary' is missing or longer than 1024 characters");
        }
        if chars(&payload["source"]) == 0 {
            errors.push("'payload.source' is missing");
        }
        if !matches!(
            payload["severity"].as_str(),
            Some("critical" | "error" | "warning" | "info")
        ) {
            errors.push("'payload.severity' is invalid");
        }
        if !payload["custom_details"].is_object() && !payload["custom_details"].is_null() {
            errors.push("'payload.custom_details' must be an object");
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

async fn pagerduty_enqueue(
    State(pd): State<Arc<PagerDuty>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(scripted) = pd.script.next().await {
        return scripted;
    }
    let invalid = |why: String| {
        (StatusCode::BAD_REQUEST, Json(json!({"status": "invalid event", "message": "Event object is invalid", "errors": [why]}))).into_response()
    };
    if !is_json(&headers) {
        return invalid("Content-Type must be application/json".into());
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return invalid("body is not JSON".into());
    };
    if let Err(why) = check_event(&event) {
        return invalid(why);
    }
    let dedup = event["dedup_key"].as_str().unwrap().to_string();
    let action = event["event_action"].as_str().unwrap();
    let state = match action {
        "trigger" => "triggered",
        "acknowledge" => "acknowledged",
        _ => "resolved",
    };
    pd.alerts.lock().await.insert(dedup.clone(), state.into());
    pd.events.lock().await.push(event);
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "success", "message": "Event processed", "dedup_key": dedup})),
    )
        .into_response()
}

async fn pagerduty() -> (Arc<PagerDuty>, Box<dyn TicketSink>, tempfile::TempDir) {
    let pd = Arc::new(PagerDuty::default());
    let router = Router::new()
        .route("/v2/enqueue", post(pagerduty_enqueue))
        .with_state(pd.clone());
    let url = format!("{}/v2/enqueue", serve(router).await);
    let (dir, credentials) = secret(&[("routingKey", ROUTING_KEY)]);
    let sink = build(&spec(TicketSinkType::Pagerduty, Some(url)), &credentials);
    (pd, sink, dir)
}

#[tokio::test]
async fn pagerduty_triggers_acknowledges_and_resolves_one_alert() {
    let (pd, sink, _dir) = pagerduty().await;
    let open = ticket(TicketState::Open, 1);
    let r1 = deliver(&*sink, &open, None, false).await.unwrap();
    // A resend folds into the same alert.
    let r1b = deliver(&*sink, &open, None, true).await.unwrap();
    assert_eq!(r1, r1b);
    let mut acked = ticket(TicketState::Acknowledged, 2);
    acked.acknowledged_at = Some(acked.updated_at);
    acked.acknowledged_by = Some("dana".into());
    let r2 = deliver(&*sink, &acked, Some(&r1), false).await.unwrap();
    deliver(&*sink, &ticket(TicketState::Resolved, 3), Some(&r2), false)
        .await
        .unwrap();

    let events = pd.events.lock().await.clone();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["event_action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["trigger", "trigger", "acknowledge", "resolve"]);
    assert!(events.iter().all(|e| e["dedup_key"] == open.fingerprint));
    assert_eq!(events[0]["payload"]["severity"], "critical");
    assert_eq!(events[0]["payload"]["source"], "meshline/sales/orders");
    let alerts = pd.alerts.lock().await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[&open.fingerprint], "resolved");
}

#[tokio::test]
async fn pagerduty_only_pages_tickets_that_ask_to() {
    let (pd, sink, _dir) = pagerduty().await;
    let mut quiet = ticket(TicketState::Open, 1);
    quiet.page = false;
    let r1 = deliver(&*sink, &quiet, None, false).await.unwrap();
    assert_eq!(r1, json!({"skipped": 1}));
    // Resolved without ever paging: nothing to resolve.
    let mut cleared = ticket(TicketState::Resolved, 2);
    cleared.page = false;
    assert_eq!(
        deliver(&*sink, &cleared, Some(&r1), false).await.unwrap(),
        r1
    );
    assert!(pd.events.lock().await.is_empty());

    // An escalation step that pages: now it triggers.
    let mut escalated = ticket(TicketState::Open, 2);
    escalated.escalation_step = 1;
    let r2 = deliver(&*sink, &escalated, Some(&r1), false).await.unwrap();
    assert_eq!(r2["dedupKey"], escalated.fingerprint);
    assert_eq!(pd.events.lock().await.len(), 1);
}

#[tokio::test]
async fn pagerduty_invalid_events_are_final_and_overload_is_retried() {
    let (pd, sink, _dir) = pagerduty().await;
    let open = ticket(TicketState::Open, 1);
    pd.script
        .push(400, &[("content-type", "application/json")], r#"{"status":"invalid event","message":"Event object is invalid","errors":["'payload.summary' is missing"]}"#)
        .await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(400), false), "{err:?}");
    assert!(err.message.contains("payload.summary"), "{}", err.message);
    assert!(!err.message.contains(ROUTING_KEY));

    pd.script.push(429, &[], "").await;
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(429), true));
    pd.script.push(502, &[], "Bad Gateway").await;
    assert!(
        deliver(&*sink, &open, None, false)
            .await
            .unwrap_err()
            .retryable
    );
    assert!(pd.events.lock().await.is_empty());
}

// ---------------------------------------------------------------------------------------------------------
// Build errors

#[test]
fn a_missing_or_malformed_credential_is_a_build_error_naming_the_sink_and_key() {
    // (type, the Secret's keys, what the error must say)
    type Case<'a> = (TicketSinkType, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (TicketSinkType::Slack, &[], "\"webhookUrl\" is missing"),
        (
            TicketSinkType::Jira,
            &[("email", JIRA_EMAIL)],
            "\"apiToken\" is missing",
        ),
        (
            TicketSinkType::Github,
            &[("token", "\n")],
            "\"token\" is empty",
        ),
        (
            TicketSinkType::Pagerduty,
            &[("routingKey", "short-secret-key")],
            "\"routingKey\" is malformed",
        ),
        (
            TicketSinkType::Slack,
            &[("webhookUrl", "hooks.slack.com/s3cret")],
            "\"webhookUrl\" is malformed",
        ),
    ];
    for (kind, keys, expected) in cases {
        let (_dir, credentials) = secret(keys);
        let spec = spec(kind, Some("https://example.atlassian.net".into()));
        let err = match sinks::build(&spec, &credentials, reqwest::Client::new()) {
            Ok(_) => panic!("{kind:?} built without its credential"),
            Err(e) => e,
        };
        assert!(
            err.starts_with(&format!("ticketSinks[{}]", spec.name)),
            "{err}"
        );
        assert!(err.contains(expected), "{kind:?}: {err}");
        assert!(
            err.contains("ticket-credentials"),
            "names the Secret: {err}"
        );
        for (_, value) in keys {
            assert!(
                value.trim().is_empty() || !err.contains(value),
                "quotes a secret: {err}"
            );
        }
    }
    // Fields the spec must carry.
    let (_dir, credentials) = secret(&[
        ("email", JIRA_EMAIL),
        ("apiToken", JIRA_TOKEN),
        ("token", GITHUB_TOKEN),
    ]);
    let mut jira = spec(TicketSinkType::Jira, None);
    let err = sinks::build(&jira, &credentials, reqwest::Client::new())
        .err()
        .unwrap();
    assert!(err.contains("url is required"), "{err}");
    jira.url = Some("https://example.atlassian.net".into());
    jira.project = None;
    let err = sinks::build(&jira, &credentials, reqwest::Client::new())
        .err()
        .unwrap();
    assert!(err.contains("project"), "{err}");
    let mut github = spec(TicketSinkType::Github, None);
    github.repository = Some("no-slash".into());
    let err = sinks::build(&github, &credentials, reqwest::Client::new())
        .err()
        .unwrap();
    assert!(err.contains("owner/name"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------
// PII: a sink sends the ticket's (redacted) words and nothing else

#[tokio::test]
async fn every_format_sends_only_what_the_redacted_ticket_holds() {
    let open = ticket(TicketState::Open, 1);
    let update = ticket(TicketState::Open, 2);
    let resolved = ticket(TicketState::Resolved, 3);
    let lifecycle = |sink: Box<dyn TicketSink>| {
        let (open, update, resolved) = (open.clone(), update.clone(), resolved.clone());
        async move {
            let r1 = deliver(&*sink, &open, None, false).await.unwrap();
            let r2 = deliver(&*sink, &update, Some(&r1), false).await.unwrap();
            deliver(&*sink, &resolved, Some(&r2), false).await.unwrap();
        }
    };
    // Versions, counts and timestamps differ per delivery: the source is the three tickets together.
    let tickets = [&open, &update, &resolved];
    let check = |format: &str, bodies: &[Value], allowed: &[&str]| {
        assert_only_ticket_data(format, bodies, &tickets, allowed)
    };

    let (receiver, url) = webhook_receiver().await;
    let (_d1, creds) = secret(&[("signingSecret", SIGNING)]);
    lifecycle(build(&spec(TicketSinkType::Webhook, Some(url)), &creds)).await;
    check("webhook", &receiver.bodies.lock().await, &[]);

    let (workspace, creds, _d2) = slack_workspace().await;
    lifecycle(build(&spec(TicketSinkType::Slack, None), &creds)).await;
    check("slack", &workspace.messages.lock().await, &["U024BE7LH"]);

    let (jira, sink, _d3) = jira().await;
    lifecycle(sink).await;
    check("jira", &jira.bodies.lock().await, &[]);

    let (github, sink, _d4) = github().await;
    lifecycle(sink).await;
    check("github", &github.bodies.lock().await, &[]);

    let (pd, sink, _d5) = pagerduty().await;
    lifecycle(sink).await;
    check("pagerduty", &pd.events.lock().await, &[ROUTING_KEY]);
}
