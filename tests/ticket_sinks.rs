//! The five ticket sinks against local servers that check each request the way the vendor's API does:
//! method, path, auth header format, required headers, content type, JSON shape and the vendor's limits.
//! Each server keeps what a real one would (issues, comments, alerts), so the tests assert the ticket's life
//! there: opened, updated, resolved, and no second issue after a delivery that was in doubt.

#[path = "support/sink_mock.rs"]
mod sink_mock;
#[path = "support/ticket_vendors.rs"]
mod ticket_vendors;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{TimeZone, Utc};
use meshline::api::{
    ErrorClass, OwnerRole, SecretRef, TicketSink as TicketSinkSpec, TicketSinkType,
};
use meshline::connectors::Credentials;
use meshline::tickets::sinks::{self, Delivery, SinkError, SinkRef, TicketSink};
use meshline::tickets::{Assignee, Example, ExceptionKind, Ticket, TicketState, fingerprint};
use serde_json::{Value, json};
use sink_mock::{header, secret, serve};
use ticket_vendors::{Accounts, JiraIssue, Vendors};
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

/// The dispatcher's clock in these tests: fixed, unless a test passes its own to [`deliver_at`].
fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()
}

async fn deliver(
    sink: &dyn TicketSink,
    ticket: &Ticket,
    previous: Option<&SinkRef>,
    in_doubt: bool,
) -> Result<SinkRef, SinkError> {
    deliver_at(sink, ticket, previous, in_doubt, t0()).await
}

async fn deliver_at(
    sink: &dyn TicketSink,
    ticket: &Ticket,
    previous: Option<&SinkRef>,
    in_doubt: bool,
    now: chrono::DateTime<Utc>,
) -> Result<SinkRef, SinkError> {
    sink.deliver(Delivery {
        ticket,
        previous,
        in_doubt,
        now,
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

/// The shared stand-ins (tests/support/ticket_vendors.rs) with this file's accounts.
const ACCOUNTS: Accounts = Accounts {
    signing_secret: SIGNING,
    jira_email: JIRA_EMAIL,
    jira_api_token: JIRA_TOKEN,
    jira_project: "OPS",
    routing_key: ROUTING_KEY,
};

/// The signed webhook receiver and its URL (the hook named `tickets`).
async fn webhook_receiver() -> (Arc<Vendors>, String) {
    let (receiver, base) = ticket_vendors::vendors(ACCOUNTS).await;
    (receiver, format!("{base}/hooks/tickets"))
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

    // The resend reached the receiver under the same idempotency key, so a receiver that keys on it keeps
    // one copy per version.
    let mut bodies = receiver.bodies("tickets");
    assert_eq!(bodies.len(), 4);
    bodies.dedup_by_key(|b| (b["fingerprint"].clone(), b["version"].clone()));
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
    assert!(receiver.bodies("tickets").is_empty());
}

#[tokio::test]
async fn webhook_outage_is_retryable_with_the_receivers_retry_after() {
    let (receiver, url) = webhook_receiver().await;
    let (_dir, credentials) = secret(&[("signingSecret", SIGNING)]);
    let sink = build(&spec(TicketSinkType::Webhook, Some(url)), &credentials);
    receiver.script_hook("tickets", 503, &[("retry-after", "12")], "down");
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
    assert_eq!(receiver.bodies("tickets").len(), 1);
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

#[tokio::test]
async fn slack_resends_an_in_doubt_version_at_most_once() {
    let (workspace, creds, _dir) = slack_workspace().await;
    let sink = build(&spec(TicketSinkType::Slack, None), &creds);
    let open = ticket(TicketState::Open, 1);
    // A 502 from Slack's edge: the message may or may not have been posted.
    workspace.script.push(502, &[], "Bad Gateway").await;
    assert!(
        deliver(&*sink, &open, None, false)
            .await
            .unwrap_err()
            .retryable
    );
    // The one resend allowed, with no clear answer either.
    workspace.script.push(502, &[], "Bad Gateway").await;
    assert!(
        deliver(&*sink, &open, None, true)
            .await
            .unwrap_err()
            .retryable
    );
    // A second resend could be a third copy: the version counts as delivered without a post.
    assert_eq!(
        deliver(&*sink, &open, None, true).await.unwrap(),
        json!({"posted": 1})
    );
    assert!(workspace.messages.lock().await.is_empty(), "nothing posted");

    // A resend that Slack clearly refused (429) posted nothing, so it does not use up the resend.
    let update = ticket(TicketState::Open, 2);
    let posted = json!({"posted": 1});
    workspace
        .script
        .push(429, &[("retry-after", "1")], "rate_limited")
        .await;
    assert!(
        deliver(&*sink, &update, Some(&posted), true)
            .await
            .unwrap_err()
            .retryable
    );
    deliver(&*sink, &update, Some(&posted), true).await.unwrap();
    assert_eq!(workspace.messages.lock().await.len(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Jira Cloud REST v3

async fn jira() -> (Arc<Vendors>, Box<dyn TicketSink>, tempfile::TempDir) {
    let (jira, url) = ticket_vendors::vendors(ACCOUNTS).await;
    let (dir, credentials) = secret(&[("email", JIRA_EMAIL), ("apiToken", JIRA_TOKEN)]);
    let sink = build(&spec(TicketSinkType::Jira, Some(url)), &credentials);
    (jira, sink, dir)
}

/// How many of the issue's comments carry this version's marker.
fn marked(issue: &JiraIssue, ticket: &Ticket) -> usize {
    let marker = meshline::tickets::sinks::jira::marker(ticket);
    issue
        .comments
        .iter()
        .filter(|c| c.to_string().contains(&format!("\"{marker}\"")))
        .count()
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

    let issues = jira.issues();
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

    // A resend of the resolved version (the worker died after the transition) leaves the issue done and
    // does not comment again.
    deliver(&*sink, &ticket(TicketState::Resolved, 3), Some(&r2), true)
        .await
        .unwrap();
    let issue = &jira.issues()[0];
    assert_eq!(issue.status_category, "done");
    assert_eq!(issue.comments.len(), 2);
}

#[tokio::test]
async fn jira_update_retried_after_a_lost_answer_comments_once() {
    let (jira, sink, _dir) = jira().await;
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    let update = ticket(TicketState::Open, 2);
    jira.lose_next_jira_answer("comment");
    let err = deliver(&*sink, &update, Some(&r1), false)
        .await
        .unwrap_err();
    assert!(err.retryable, "{err:?}");
    // The comment stands at Jira although the sink never heard so; the retry is in doubt.
    assert_eq!(marked(&jira.issues()[0], &update), 1);
    assert_eq!(deliver(&*sink, &update, Some(&r1), true).await.unwrap(), r1);
    assert_eq!(jira.issues()[0].comments.len(), 1, "no second comment");
    assert_eq!(jira.jira_comment_reads.load(Ordering::SeqCst), 1);

    // The next version is a new comment, even in doubt: the marker is per version.
    let next = ticket(TicketState::Open, 3);
    deliver(&*sink, &next, Some(&r1), true).await.unwrap();
    let issue = &jira.issues()[0];
    assert_eq!(issue.comments.len(), 2);
    assert_eq!((marked(issue, &update), marked(issue, &next)), (1, 1));
}

#[tokio::test]
async fn jira_resolve_retried_after_a_timeout_between_comment_and_transition_comments_once() {
    let (jira, sink, _dir) = jira().await;
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    let resolved = ticket(TicketState::Resolved, 2);

    // The transition went through but its answer was lost: both calls reached Jira.
    jira.lose_next_jira_answer("transition");
    assert!(
        deliver(&*sink, &resolved, Some(&r1), false)
            .await
            .unwrap_err()
            .retryable
    );
    deliver(&*sink, &resolved, Some(&r1), true).await.unwrap();
    let issue = &jira.issues()[0];
    assert_eq!(issue.status_category, "done");
    assert_eq!(marked(issue, &resolved), 1, "one resolve comment");
    assert_eq!(issue.comments.len(), 1);

    // Only the comment got through (Jira refused the transition for a moment): the retry transitions
    // without commenting again.
    let (jira, sink, _dir) = self::jira().await;
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    jira.lose_next_jira_answer("comment");
    assert!(
        deliver(&*sink, &resolved, Some(&r1), false)
            .await
            .unwrap_err()
            .retryable
    );
    assert_eq!(jira.issues()[0].status_category, "new");
    deliver(&*sink, &resolved, Some(&r1), true).await.unwrap();
    let issue = &jira.issues()[0];
    assert_eq!(issue.status_category, "done");
    assert_eq!(marked(issue, &resolved), 1, "one resolve comment");
}

#[tokio::test]
async fn jira_in_doubt_create_waits_for_the_search_index_instead_of_creating_twice() {
    let (jira, sink, _dir) = jira().await;
    let open = ticket(TicketState::Open, 1);
    // The create reached Jira, its answer was lost, and the search has not indexed the issue yet.
    jira.lag_jira_search();
    jira.lose_next_jira_answer("create");
    assert!(
        deliver(&*sink, &open, None, false)
            .await
            .unwrap_err()
            .retryable
    );
    assert_eq!(jira.jira_creates.load(Ordering::SeqCst), 1);

    let err = deliver_at(&*sink, &open, None, true, t0())
        .await
        .unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("search"), "{}", err.message);
    assert_eq!(err.retry_after, Some(Duration::from_secs(60)));
    let later = t0() + chrono::Duration::seconds(45);
    let err = deliver_at(&*sink, &open, None, true, later)
        .await
        .unwrap_err();
    assert_eq!(
        err.retry_after,
        Some(Duration::from_secs(15)),
        "the wait counts from the first miss"
    );
    assert_eq!(
        jira.jira_creates.load(Ordering::SeqCst),
        1,
        "no second issue"
    );

    jira.index_jira();
    let found = deliver_at(
        &*sink,
        &open,
        None,
        true,
        later + chrono::Duration::seconds(5),
    )
    .await
    .unwrap();
    assert_eq!(found, json!({"key": "OPS-1"}));
    assert_eq!(jira.jira_creates.load(Ordering::SeqCst), 1);
    assert_eq!(jira.jira_searches.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn jira_in_doubt_create_creates_once_the_search_lag_window_has_passed() {
    let (jira, sink, _dir) = jira().await;
    let open = ticket(TicketState::Open, 1);
    // A create that never reached Jira (refused at its edge) leaves the delivery in doubt all the same.
    jira.script_jira(502, &[], "Bad Gateway");
    assert!(
        deliver(&*sink, &open, None, false)
            .await
            .unwrap_err()
            .retryable
    );
    assert!(deliver_at(&*sink, &open, None, true, t0()).await.is_err());
    let window = t0() + chrono::Duration::from_std(sinks::jira::SEARCH_LAG).unwrap();
    assert_eq!(
        deliver_at(&*sink, &open, None, true, window).await.unwrap(),
        json!({"key": "OPS-1"})
    );
    assert_eq!(jira.jira_creates.load(Ordering::SeqCst), 1);

    // Another ticket's wait is its own, and starts at its own first miss.
    let mut other = ticket(TicketState::Open, 1);
    other.fingerprint = "0".repeat(32);
    assert!(
        deliver_at(&*sink, &other, None, true, window)
            .await
            .is_err()
    );
    assert_eq!(jira.jira_creates.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn jira_in_doubt_reuses_the_issue_a_lost_attempt_created() {
    let (jira, sink, _dir) = jira().await;
    let open = ticket(TicketState::Open, 1);
    // The first attempt reached Jira but its answer was lost.
    deliver(&*sink, &open, None, false).await.unwrap();
    let recovered = deliver(&*sink, &open, None, true).await.unwrap();
    assert_eq!(recovered, json!({"key": "OPS-1"}));
    assert_eq!(
        jira.jira_creates.load(Ordering::SeqCst),
        1,
        "no second issue"
    );
    assert_eq!(jira.jira_searches.load(Ordering::SeqCst), 1);
    assert!(jira.issues()[0].comments.is_empty());

    // Not in doubt: no search before creating (another ticket, another issue).
    let mut other = ticket(TicketState::Open, 1);
    other.fingerprint = "0".repeat(32);
    assert_eq!(
        deliver(&*sink, &other, None, false).await.unwrap(),
        json!({"key": "OPS-2"})
    );
    assert_eq!(jira.jira_searches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn jira_refusals_and_outages_are_told_apart() {
    let (jira, sink, _dir) = jira().await;
    let open = ticket(TicketState::Open, 1);
    jira.script_jira(
        400,
        &[],
        r#"{"errorMessages":[],"errors":{"project":"valid project is required"}}"#,
    );
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

    jira.script_jira(503, &[("retry-after", "120")], "maintenance");
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert_eq!(
        (err.retryable, err.retry_after),
        (true, Some(Duration::from_secs(120)))
    );
    assert_eq!(err.refusal(), None, "an outage counts towards three");
    jira.script_jira(429, &[("retry-after", "5")], "");
    let err = deliver(&*sink, &open, None, false).await.unwrap_err();
    assert!(err.retryable);
    assert_eq!(err.refusal(), None, "a rate limit is not a refusal");
    assert_eq!(jira.jira_creates.load(Ordering::SeqCst), 0);
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
    /// When each comment was made, by the stand-in's clock (what `since` filters on).
    commented_at: Vec<chrono::DateTime<Utc>>,
}

#[derive(Default)]
struct Github {
    script: Script,
    issues: Mutex<Vec<GithubIssue>>,
    creates: Mutex<u32>,
    bodies: Mutex<Vec<Value>>,
    /// The next comment is made and then answered 502, as if the answer was lost.
    lose_comment_answer: Mutex<bool>,
    comment_reads: Mutex<u32>,
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
        commented_at: Vec::new(),
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
    issue.commented_at.push(Utc::now());
    if std::mem::take(&mut *github.lose_comment_answer.lock().await) {
        return refuse(StatusCode::BAD_GATEWAY, "Bad Gateway");
    }
    (
        StatusCode::CREATED,
        Json(json!({"id": issue.comments.len()})),
    )
        .into_response()
}

/// `GET /repos/{o}/{r}/issues/{n}/comments` as documented: `since` (ISO 8601, comments updated at or after
/// it), `per_page` (at most 100) and `page`; oldest first.
async fn github_comments(
    State(github): State<Arc<Github>>,
    Path((_, _, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = github_headers(&headers) {
        return refused;
    }
    *github.comment_reads.lock().await += 1;
    let since = match query
        .get("since")
        .map(|s| chrono::DateTime::parse_from_rfc3339(s))
    {
        None => None,
        Some(Ok(since)) => Some(since.with_timezone(&Utc)),
        Some(Err(_)) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"message": "Invalid request: since is not an ISO 8601 timestamp"})),
            )
                .into_response();
        }
    };
    let per_page: usize = query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(30)
        .min(100);
    let page: usize = query
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let issues = github.issues.lock().await;
    let Some(issue) = issues.iter().find(|i| i.number == number) else {
        return refuse(StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#);
    };
    let listed: Vec<Value> = issue
        .comments
        .iter()
        .zip(&issue.commented_at)
        .enumerate()
        .filter(|(_, (_, at))| since.is_none_or(|since| **at >= since))
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|(i, (body, at))| {
            let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            json!({"id": i + 1, "body": body, "created_at": at, "updated_at": at})
        })
        .collect();
    Json(Value::Array(listed)).into_response()
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
            post(github_comment).get(github_comments),
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
async fn github_resolve_retried_after_a_lost_comment_answer_comments_once() {
    let (github, sink, _dir) = github().await;
    let r1 = deliver(&*sink, &ticket(TicketState::Open, 1), None, false)
        .await
        .unwrap();
    let resolved = ticket(TicketState::Resolved, 2);
    // The comment was made but its answer lost, so the issue was not closed either.
    *github.lose_comment_answer.lock().await = true;
    assert!(
        deliver(&*sink, &resolved, Some(&r1), false)
            .await
            .unwrap_err()
            .retryable
    );
    deliver(&*sink, &resolved, Some(&r1), true).await.unwrap();
    let issue = github.issues.lock().await[0].clone();
    assert_eq!(issue.state, "closed");
    let marker = sinks::github::marker(&resolved);
    assert_eq!(issue.comments.len(), 1, "no second comment");
    assert!(
        issue.comments[0].ends_with(&marker),
        "{}",
        issue.comments[0]
    );
    assert_eq!(*github.comment_reads.lock().await, 1);

    // Not in doubt: no read before commenting.
    let r2 = json!({"number": issue.number, "closed": false});
    deliver(&*sink, &ticket(TicketState::Open, 3), Some(&r2), false)
        .await
        .unwrap();
    assert_eq!(*github.comment_reads.lock().await, 1);
    assert_eq!(github.issues.lock().await[0].comments.len(), 2);
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
    check("webhook", &receiver.bodies("tickets"), &[]);

    let (workspace, creds, _d2) = slack_workspace().await;
    lifecycle(build(&spec(TicketSinkType::Slack, None), &creds)).await;
    check("slack", &workspace.messages.lock().await, &["U024BE7LH"]);

    let (jira, sink, _d3) = jira().await;
    lifecycle(sink).await;
    // The versions in the comments' markers.
    check("jira", &jira.json_sent("/rest/api/3/"), &["v1", "v2", "v3"]);

    let (github, sink, _d4) = github().await;
    lifecycle(sink).await;
    // The versions in the comments' markers.
    check("github", &github.bodies.lock().await, &["v2", "v3"]);

    let (pd, sink, _d5) = pagerduty().await;
    lifecycle(sink).await;
    check("pagerduty", &pd.events.lock().await, &[ROUTING_KEY]);
}
