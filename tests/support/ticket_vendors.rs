//! Local stand-ins for the ticket sinks' vendors, shared by `tests/ticket_sinks.rs` (one sink at a time) and
//! `tests/worker_tickets.rs` (a whole worker): a signed webhook receiver, Jira Cloud REST v3 and PagerDuty's
//! Events API v2, on one server. Each checks a request the way the vendor does (auth, content type, JSON
//! shape, ADF, the idempotency key) and keeps what the vendor would (issues, comments, alerts), so a test
//! asserts a ticket's life there. Jira's search can be made to lag behind its writes, and a write's answer can
//! be lost after the write happened, which is what an in-doubt delivery has to survive.
//!
//! Included with `#[path = "support/ticket_vendors.rs"] mod ticket_vendors;` (it needs `sink_mock` beside it).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::sink_mock::{header, serve};

/// A status, headers and body answered instead of looking at the request (an outage, a rate limit).
pub type Scripted = (u16, Vec<(&'static str, String)>, String);

fn scripted_response((status, headers, body): Scripted) -> Response {
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, why.into()).into_response()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a Jira stand-in keeps of one issue.
#[derive(Clone, Debug)]
pub struct JiraIssue {
    pub key: String,
    pub labels: Vec<String>,
    pub status_category: &'static str,
    pub description: Value,
    /// Comment bodies (ADF), oldest first.
    pub comments: Vec<Value>,
}

/// What the stand-ins accept: the webhook signing secret, Jira's credentials and project, PagerDuty's
/// routing key.
#[derive(Clone, Copy, Debug)]
pub struct Accounts {
    pub signing_secret: &'static str,
    pub jira_email: &'static str,
    pub jira_api_token: &'static str,
    pub jira_project: &'static str,
    pub routing_key: &'static str,
}

pub struct Vendors {
    accounts: Accounts,
    /// Every request body any sink sent, byte for byte, with its path: the PII checks read all of it.
    pub raw: Mutex<Vec<(String, Vec<u8>)>>,

    /// Webhook requests per hook name, answered or not.
    pub attempts: Mutex<HashMap<String, usize>>,
    /// Answers a hook gives before it looks at the next requests, in order.
    pub scripts: Mutex<HashMap<String, Vec<Scripted>>>,
    /// Hooks that refuse every request with a 400.
    pub refusing: Mutex<HashSet<String>>,
    /// Webhook bodies taken (signature verified, idempotency key right), per hook name, in order; a resend
    /// is taken again, so a test sees it.
    pub hooks: Mutex<HashMap<String, Vec<Value>>>,
    /// Webhook requests refused for a signature that did not verify.
    pub bad_signatures: AtomicUsize,

    pub jira: Mutex<Vec<JiraIssue>>,
    pub jira_creates: AtomicUsize,
    pub jira_searches: AtomicUsize,
    pub jira_comment_reads: AtomicUsize,
    /// Answers Jira gives to the next writes (create, comment, transition) before looking at them.
    pub jira_script: Mutex<Vec<Scripted>>,
    /// Kinds of Jira write (`create`, `comment`, `transition`) whose next one is made and then answered with
    /// a gateway timeout, as if the answer was lost on the way back.
    jira_lose_answers: Mutex<Vec<&'static str>>,
    /// `Some(n)`: Jira's search sees only the first `n` issues (the rest are not indexed yet).
    jira_search_sees: Mutex<Option<usize>>,

    /// PagerDuty events accepted, in order.
    pub pages: Mutex<Vec<Value>>,
}

impl Vendors {
    pub fn new(accounts: Accounts) -> Vendors {
        Vendors {
            accounts,
            raw: Mutex::default(),
            attempts: Mutex::default(),
            scripts: Mutex::default(),
            refusing: Mutex::default(),
            hooks: Mutex::default(),
            bad_signatures: AtomicUsize::new(0),
            jira: Mutex::default(),
            jira_creates: AtomicUsize::new(0),
            jira_searches: AtomicUsize::new(0),
            jira_comment_reads: AtomicUsize::new(0),
            jira_script: Mutex::default(),
            jira_lose_answers: Mutex::default(),
            jira_search_sees: Mutex::default(),
            pages: Mutex::default(),
        }
    }

    /// Queues an answer `hook` gives before looking at its next request.
    pub fn script_hook(
        &self,
        hook: &str,
        status: u16,
        headers: &[(&'static str, &str)],
        body: &str,
    ) {
        lock(&self.scripts)
            .entry(hook.into())
            .or_default()
            .push(scripted(status, headers, body));
    }

    /// Queues an answer Jira gives to its next write before looking at it.
    pub fn script_jira(&self, status: u16, headers: &[(&'static str, &str)], body: &str) {
        lock(&self.jira_script).push(scripted(status, headers, body));
    }

    /// Jira makes its next write of `kind` (`create`, `comment` or `transition`) and answers it with a 504,
    /// as a gateway that timed out after forwarding it.
    pub fn lose_next_jira_answer(&self, kind: &'static str) {
        lock(&self.jira_lose_answers).push(kind);
    }

    /// Jira's search stops seeing issues created from now on, until [`Vendors::index_jira`].
    pub fn lag_jira_search(&self) {
        *lock(&self.jira_search_sees) = Some(lock(&self.jira).len());
    }

    /// Jira's search catches up with every issue.
    pub fn index_jira(&self) {
        *lock(&self.jira_search_sees) = None;
    }

    pub fn bodies(&self, hook: &str) -> Vec<Value> {
        lock(&self.hooks).get(hook).cloned().unwrap_or_default()
    }

    /// The bodies `hook` took for ticket `fp`.
    pub fn events_of(&self, hook: &str, fp: &str) -> Vec<Value> {
        self.bodies(hook)
            .into_iter()
            .filter(|b| b["fingerprint"] == fp)
            .collect()
    }

    pub fn issues(&self) -> Vec<JiraIssue> {
        lock(&self.jira).clone()
    }

    /// The JSON bodies sent to paths starting with `prefix`, in order.
    pub fn json_sent(&self, prefix: &str) -> Vec<Value> {
        lock(&self.raw)
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .filter_map(|(_, body)| serde_json::from_slice(body).ok())
            .collect()
    }

    /// Everything every sink sent, as text.
    pub fn everything_received(&self) -> String {
        lock(&self.raw)
            .iter()
            .map(|(path, body)| format!("{path}\n{}\n", String::from_utf8_lossy(body)))
            .collect()
    }

    /// Polls this server's state until `done` holds (the 120 s give-up only keeps a broken build from
    /// hanging).
    pub async fn wait<T>(&self, what: &str, done: impl Fn(&Vendors) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(v) = done(self) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; hooks: {:?}; jira: {:?}",
                lock(&self.hooks),
                self.issues()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn record(&self, path: String, body: &[u8]) {
        lock(&self.raw).push((path, body.to_vec()));
    }

    /// The receiver's side of the webhook signature: HMAC-SHA256 over `"{timestamp}.{body}"`.
    fn signature_valid(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let timestamp = header(headers, "x-meshline-timestamp");
        if timestamp.parse::<i64>().is_err() {
            return false;
        }
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.accounts.signing_secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        header(headers, "x-meshline-signature")
            == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Jira's Basic auth for API tokens; `Some(refusal)` when it does not match.
    fn jira_auth(&self, headers: &HeaderMap) -> Option<Response> {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                self.accounts.jira_email, self.accounts.jira_api_token
            ))
        );
        (header(headers, "authorization") != expected)
            .then(|| refuse(StatusCode::UNAUTHORIZED, "Client must be authenticated"))
    }

    /// The scripted answer for a Jira write, if one is queued.
    fn jira_scripted(&self) -> Option<Response> {
        let mut queue = lock(&self.jira_script);
        (!queue.is_empty()).then(|| scripted_response(queue.remove(0)))
    }

    /// `answer`, or a gateway timeout when this write's answer is to be lost (the write stands).
    fn jira_answer(&self, kind: &str, answer: Response) -> Response {
        let mut lose = lock(&self.jira_lose_answers);
        if let Some(i) = lose.iter().position(|k| *k == kind) {
            lose.remove(i);
            refuse(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
        } else {
            answer
        }
    }
}

fn scripted(status: u16, headers: &[(&'static str, &str)], body: &str) -> Scripted {
    let headers = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    (status, headers, body.into())
}

// ---------------------------------------------------------------------------------------------------------
// The signed webhook receiver

async fn webhook(
    State(v): State<Arc<Vendors>>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    v.record(format!("/hooks/{hook}"), &body);
    *lock(&v.attempts).entry(hook.clone()).or_default() += 1;
    let scripted = lock(&v.scripts)
        .get_mut(&hook)
        .filter(|s| !s.is_empty())
        .map(|s| s.remove(0));
    if let Some(scripted) = scripted {
        return scripted_response(scripted);
    }
    if lock(&v.refusing).contains(&hook) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this receiver expects schema v2 (misconfigured)",
        );
    }
    if !header(&headers, "content-type").starts_with("application/json") {
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "json only");
    }
    if !v.signature_valid(&headers, &body) {
        v.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return refuse(StatusCode::UNAUTHORIZED, "bad signature");
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let key = format!(
        "{}:{}",
        parsed["fingerprint"].as_str().unwrap_or(""),
        parsed["version"]
    );
    if header(&headers, "idempotency-key") != key {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key is not fingerprint:version",
        );
    }
    lock(&v.hooks).entry(hook).or_default().push(parsed);
    StatusCode::NO_CONTENT.into_response()
}

// ---------------------------------------------------------------------------------------------------------
// Jira Cloud REST v3

/// The ADF rules Jira enforces for the nodes meshline writes.
pub fn check_adf(doc: &Value) -> Result<(), String> {
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
                if let Some(marks) = n.get("marks") {
                    if parent == "codeBlock" {
                        return Err("ADF: marks in a codeBlock".into());
                    }
                    let known = ["code", "em", "strong", "link"];
                    let marks = marks.as_array().ok_or("ADF: marks is not an array")?;
                    if let Some(m) = marks
                        .iter()
                        .find(|m| !known.iter().any(|k| m["type"] == *k))
                    {
                        return Err(format!("ADF: unknown mark {m}"));
                    }
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

async fn jira_create(State(v): State<Arc<Vendors>>, headers: HeaderMap, body: Bytes) -> Response {
    v.record("/rest/api/3/issue".into(), &body);
    if let Some(scripted) = v.jira_scripted() {
        return scripted;
    }
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "not JSON");
    };
    let fields = &body["fields"];
    let summary = fields["summary"].as_str().unwrap_or("");
    let mut errors = serde_json::Map::new();
    if fields["project"]["key"] != v.accounts.jira_project {
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
                .filter_map(|s| s.as_str().map(str::to_string))
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
    v.jira_creates.fetch_add(1, Ordering::SeqCst);
    let mut issues = lock(&v.jira);
    let key = format!("{}-{}", v.accounts.jira_project, issues.len() + 1);
    issues.push(JiraIssue {
        key: key.clone(),
        labels,
        status_category: "new",
        description: fields["description"].clone(),
        comments: Vec::new(),
    });
    let id = 10_000 + issues.len();
    v.jira_answer(
        "create",
        (
            StatusCode::CREATED,
            Json(json!({"id": id.to_string(), "key": key, "self": format!("https://acme.atlassian.net/rest/api/3/issue/{id}")})),
        )
            .into_response(),
    )
}

async fn jira_comment(
    State(v): State<Arc<Vendors>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    v.record(format!("/rest/api/3/issue/{key}/comment"), &body);
    if let Some(scripted) = v.jira_scripted() {
        return scripted;
    }
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "not JSON");
    };
    if let Err(e) = check_adf(&body["body"]) {
        return refuse(StatusCode::BAD_REQUEST, e);
    }
    let mut issues = lock(&v.jira);
    let Some(issue) = issues.iter_mut().find(|i| i.key == key) else {
        return refuse(StatusCode::NOT_FOUND, "Issue does not exist");
    };
    issue.comments.push(body["body"].clone());
    let id = issue.comments.len().to_string();
    v.jira_answer(
        "comment",
        (StatusCode::CREATED, Json(json!({"id": id}))).into_response(),
    )
}

/// `GET /rest/api/3/issue/{key}/comment` as documented: `startAt`, `maxResults`, `orderBy` (`created`,
/// `-created` or `+created`); a page of `{id, body, created}` with `startAt`, `maxResults` and `total`.
async fn jira_comments(
    State(v): State<Arc<Vendors>>,
    Path(key): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    v.jira_comment_reads.fetch_add(1, Ordering::SeqCst);
    let newest_first = match query.get("orderBy").map(String::as_str) {
        None | Some("created" | "+created") => false,
        Some("-created") => true,
        Some(other) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("orderBy {other:?} is not supported"),
            );
        }
    };
    let number = |name: &str, default: usize| {
        query.get(name).map_or(Ok(default), |n| {
            n.parse::<usize>().map_err(|_| name.to_string())
        })
    };
    let (start_at, max_results) = match (number("startAt", 0), number("maxResults", 100)) {
        (Ok(s), Ok(m)) => (s, m),
        (Err(name), _) | (_, Err(name)) => {
            return refuse(StatusCode::BAD_REQUEST, format!("{name} is not a number"));
        }
    };
    let issues = lock(&v.jira);
    let Some(issue) = issues.iter().find(|i| i.key == key) else {
        return refuse(StatusCode::NOT_FOUND, "Issue does not exist");
    };
    let mut all: Vec<Value> = issue
        .comments
        .iter()
        .enumerate()
        .map(|(i, body)| {
            json!({"id": (i + 1).to_string(), "body": body,
                   "created": format!("2026-01-01T00:00:{:02}.000+0000", i % 60)})
        })
        .collect();
    if newest_first {
        all.reverse();
    }
    let page: Vec<Value> = all
        .iter()
        .skip(start_at)
        .take(max_results)
        .cloned()
        .collect();
    Json(json!({"startAt": start_at, "maxResults": max_results, "total": all.len(), "comments": page}))
        .into_response()
}

const JIRA_TRANSITIONS: [(&str, &str, &str); 3] = [
    ("11", "Start progress", "indeterminate"),
    ("31", "Done", "done"),
    ("41", "Reopen", "new"),
];

async fn jira_transitions(
    State(v): State<Arc<Vendors>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    let issues = lock(&v.jira);
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
    State(v): State<Arc<Vendors>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    v.record(format!("/rest/api/3/issue/{key}/transitions"), &body);
    if let Some(scripted) = v.jira_scripted() {
        return scripted;
    }
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "not JSON");
    };
    let mut issues = lock(&v.jira);
    let Some(issue) = issues.iter_mut().find(|i| i.key == key) else {
        return refuse(StatusCode::NOT_FOUND, "Issue does not exist");
    };
    let id = body["transition"]["id"].as_str().unwrap_or("");
    // Only an offered transition is valid: a done issue cannot be "done" again.
    let offered = issue.status_category != "done" || id == "41";
    match JIRA_TRANSITIONS.iter().find(|(t, _, _)| *t == id) {
        Some((_, _, to)) if offered && *to != issue.status_category => {
            issue.status_category = to;
            v.jira_answer("transition", StatusCode::NO_CONTENT.into_response())
        }
        _ => refuse(StatusCode::BAD_REQUEST, "Transition id is not valid"),
    }
}

async fn jira_issue(
    State(v): State<Arc<Vendors>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    let issues = lock(&v.jira);
    match issues.iter().find(|i| i.key == key) {
        Some(i) => Json(json!({"key": i.key, "fields": {"status": {"statusCategory": {"key": i.status_category}}}})).into_response(),
        None => refuse(StatusCode::NOT_FOUND, "Issue does not exist"),
    }
}

async fn jira_search(
    State(v): State<Arc<Vendors>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = v.jira_auth(&headers) {
        return refused;
    }
    v.jira_searches.fetch_add(1, Ordering::SeqCst);
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
    // Search reads an index that trails the writes (eventual consistency).
    let indexed = lock(&v.jira_search_sees).unwrap_or(usize::MAX);
    let found: Vec<Value> = v
        .issues()
        .iter()
        .take(indexed)
        .filter(|i| i.labels.iter().any(|l| l == label))
        .take(body["maxResults"].as_u64().unwrap_or(50) as usize)
        .map(|i| json!({"id": "1", "key": i.key}))
        .collect();
    Json(json!({"issues": found, "isLast": true})).into_response()
}

// ---------------------------------------------------------------------------------------------------------
// PagerDuty Events API v2

async fn pagerduty(State(v): State<Arc<Vendors>>, body: Bytes) -> Response {
    v.record("/v2/enqueue".into(), &body);
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid event");
    };
    if event["routing_key"] != v.accounts.routing_key
        || !matches!(
            event["event_action"].as_str(),
            Some("trigger" | "acknowledge" | "resolve")
        )
        || event["dedup_key"].as_str().is_none_or(str::is_empty)
    {
        return refuse(StatusCode::BAD_REQUEST, "invalid event");
    }
    let dedup = event["dedup_key"].clone();
    lock(&v.pages).push(event);
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "success", "message": "Event processed", "dedup_key": dedup})),
    )
        .into_response()
}

/// Starts the stand-ins; returns them and their base URL (hooks at `/hooks/{name}`, Jira at the root,
/// PagerDuty at `/v2/enqueue`).
pub async fn vendors(accounts: Accounts) -> (Arc<Vendors>, String) {
    let v = Arc::new(Vendors::new(accounts));
    let router = axum::Router::new()
        .route("/hooks/{hook}", post(webhook))
        .route("/rest/api/3/issue", post(jira_create))
        .route("/rest/api/3/issue/{key}", get(jira_issue))
        .route(
            "/rest/api/3/issue/{key}/comment",
            get(jira_comments).post(jira_comment),
        )
        .route(
            "/rest/api/3/issue/{key}/transitions",
            get(jira_transitions).post(jira_transition),
        )
        .route("/rest/api/3/search/jql", post(jira_search))
        .route("/v2/enqueue", post(pagerduty))
        .with_state(v.clone());
    let base = serve(router).await;
    (v, base)
}
