//! A local Salesforce org that checks requests the way the real one does: the OAuth token endpoint (client
//! credentials, or a JWT bearer assertion verified with the test RSA public key: RS256, iss, sub, aud and an
//! exp at most 3 minutes away), bearer tokens it issued on the REST query resource, SOQL it parses enough to
//! apply the filter, the `(SystemModstamp, Id)` checkpoint, ORDER BY and LIMIT, and paging through
//! `nextRecordsUrl`. It can expire the session once (401 `INVALID_SESSION_ID`) and answer rate limits. Every
//! data answer carries `Sforce-Limit-Info: api-usage=<used>/<limit>`, counting the calls. [`start_split`]
//! serves the token endpoint on one host (login.salesforce.com) and the data on another (the org's instance),
//! named by the token response's `instance_url`, as the real JWT bearer flow does.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "3MVG9-test-consumer-key";
pub const CLIENT_SECRET: &str = "test-consumer-secret";
pub const USERNAME: &str = "integration@acme.example";

pub struct Org {
    pub records: Mutex<Vec<Value>>,
    /// Records per response batch (the real API uses up to 2,000; small here to force paging).
    pub batch_size: usize,
    pub login_url: Mutex<String>,
    pub public_key_pem: String,
    pub tokens: Mutex<HashSet<String>>,
    pub token_requests: AtomicUsize,
    pub jwt_assertions_verified: AtomicUsize,
    pub expire_session_once: AtomicBool,
    pub session_expired_answers: AtomicUsize,
    /// Answer the next n data requests with a limit error (429 then 403 REQUEST_LIMIT_EXCEEDED alternately).
    pub limit_next: AtomicUsize,
    pub limited_answers: AtomicUsize,
    pub queries: Mutex<Vec<String>>,
    pub locators: Mutex<BTreeMap<String, Vec<Value>>>,
    pub next_locator: AtomicUsize,
    /// The token response's `instance_url`; the login URL when unset.
    pub instance_url: Mutex<Option<String>>,
    /// API calls in the last 24 hours (all the org's integrations), and the org's allowance.
    pub api_used: AtomicUsize,
    pub api_limit: AtomicUsize,
}

pub struct MockOrg {
    pub org: Arc<Org>,
    pub base_url: String,
}

fn org(records: Vec<Value>, batch_size: usize) -> Arc<Org> {
    Arc::new(Org {
        records: Mutex::new(records),
        batch_size,
        login_url: Mutex::new(String::new()),
        public_key_pem: std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sources/jwt_test_key.pub.pem"
        ))
        .unwrap(),
        tokens: Mutex::new(HashSet::new()),
        token_requests: AtomicUsize::new(0),
        jwt_assertions_verified: AtomicUsize::new(0),
        expire_session_once: AtomicBool::new(false),
        session_expired_answers: AtomicUsize::new(0),
        limit_next: AtomicUsize::new(0),
        limited_answers: AtomicUsize::new(0),
        queries: Mutex::new(Vec::new()),
        locators: Mutex::new(BTreeMap::new()),
        next_locator: AtomicUsize::new(1),
        instance_url: Mutex::new(None),
        api_used: AtomicUsize::new(0),
        api_limit: AtomicUsize::new(15000),
    })
}

fn data_routes(router: Router<Arc<Org>>) -> Router<Arc<Org>> {
    router
        .route("/services/data/v61.0/query", get(query))
        .route("/services/data/v61.0/query/{locator}", get(more))
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base_url
}

/// One host serves both the token endpoint and the data (a My Domain URL).
pub async fn start(records: Vec<Value>, batch_size: usize) -> MockOrg {
    let org = org(records, batch_size);
    let app = data_routes(Router::new().route("/services/oauth2/token", post(token)))
        .with_state(org.clone());
    let base_url = serve(app).await;
    *org.login_url.lock().unwrap() = base_url.clone();
    MockOrg { org, base_url }
}

/// The token endpoint on a login host that serves no data, the data on the instance the token answer names.
/// `base_url` is the login host's.
pub async fn start_split(records: Vec<Value>, batch_size: usize) -> MockOrg {
    let org = org(records, batch_size);
    let login = serve(
        Router::new()
            .route("/services/oauth2/token", post(token))
            .with_state(org.clone()),
    )
    .await;
    let instance = serve(data_routes(Router::new()).with_state(org.clone())).await;
    *org.login_url.lock().unwrap() = login.clone();
    *org.instance_url.lock().unwrap() = Some(instance);
    MockOrg {
        org,
        base_url: login,
    }
}

/// One Opportunity as the org stores it (all fields; the query projects what the SOQL selects).
pub fn opportunity(
    id: &str,
    modstamp: &str,
    stage: &str,
    account: Option<&str>,
    items: &[(&str, &str, f64, f64)],
) -> Value {
    json!({
        "Id": id,
        "Name": format!("Deal {id}"),
        "StageName": stage,
        "Amount": items.iter().map(|(_, _, q, p)| q * p).sum::<f64>(),
        "SystemModstamp": modstamp,
        "Account": account.map(|a| json!({"attributes": {"type": "Account", "url": "/services/data/v61.0/sobjects/Account/001X"}, "Name": a})),
        "OpportunityLineItems": items.iter().map(|(code, name, q, p)| json!({
            "ProductCode": code, "Product2": {"Name": name}, "Quantity": q, "UnitPrice": p
        })).collect::<Vec<_>>(),
    })
}

fn sf_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code}])),
    )
        .into_response()
}

async fn token(
    State(org): State<Arc<Org>>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    org.token_requests.fetch_add(1, Ordering::SeqCst);
    let refuse = |d: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": d})),
        )
            .into_response()
    };
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            if form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
                || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
            {
                return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_client", "error_description": "invalid client credentials"}))).into_response();
            }
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let Some(assertion) = form.get("assertion") else {
                return refuse("no assertion".into());
            };
            let key = DecodingKey::from_rsa_pem(org.public_key_pem.as_bytes()).unwrap();
            let mut validation = Validation::new(Algorithm::RS256);
            let login_url = org.login_url.lock().unwrap().clone();
            validation.set_audience(&[login_url]);
            validation.set_issuer(&[CLIENT_ID]);
            validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
            let claims = match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
                Ok(data) => data.claims,
                Err(e) => return refuse(format!("assertion rejected: {e}")),
            };
            if claims["sub"] != USERNAME {
                return refuse("user hasn't approved this consumer".into());
            }
            let exp = claims["exp"].as_i64().unwrap_or(0);
            if exp - chrono::Utc::now().timestamp() > 180 {
                return refuse("expiration more than 3 minutes away".into());
            }
            org.jwt_assertions_verified.fetch_add(1, Ordering::SeqCst);
        }
        other => return refuse(format!("unsupported grant type {other:?}")),
    }
    let token = format!("00Dtest!{}", uuid::Uuid::new_v4().simple());
    org.tokens.lock().unwrap().insert(token.clone());
    let instance = org
        .instance_url
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| org.login_url.lock().unwrap().clone());
    Json(json!({"access_token": token, "instance_url": instance, "token_type": "Bearer"}))
        .into_response()
}

#[allow(clippy::result_large_err)]
fn authorize(org: &Org, headers: &HeaderMap) -> Result<(), Response> {
    org.api_used.fetch_add(1, Ordering::SeqCst);
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    if !org.tokens.lock().unwrap().contains(&token) {
        return Err(sf_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        ));
    }
    if org.expire_session_once.swap(false, Ordering::SeqCst) {
        org.tokens.lock().unwrap().remove(&token);
        org.session_expired_answers.fetch_add(1, Ordering::SeqCst);
        return Err(sf_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        ));
    }
    let limited = org.limit_next.load(Ordering::SeqCst);
    if limited > 0 {
        org.limit_next.fetch_sub(1, Ordering::SeqCst);
        let n = org.limited_answers.fetch_add(1, Ordering::SeqCst);
        return Err(if n.is_multiple_of(2) {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], "").into_response()
        } else {
            sf_error(
                StatusCode::FORBIDDEN,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            )
        });
    }
    Ok(())
}

fn parse_time(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z")
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(s))
        .unwrap_or_else(|e| panic!("bad datetime {s}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// Splits a SELECT list at top-level commas.
fn select_items(list: &str) -> Vec<String> {
    let (mut items, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in list.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                items.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    items.push(cur.trim().to_string());
    items
}

fn project(record: &Value, items: &[String], object: &str) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("attributes".into(), json!({"type": object, "url": format!("/services/data/v61.0/sobjects/{object}/{}", record["Id"].as_str().unwrap_or(""))}));
    for item in items {
        if let Some(inner) = item
            .strip_prefix("(SELECT ")
            .and_then(|s| s.strip_suffix(')'))
        {
            let (fields, relationship) = inner.split_once(" FROM ").expect("subquery has FROM");
            let fields = select_items(fields);
            let children: Vec<Value> = record[relationship]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|c| project(c, &fields, "OpportunityLineItem"))
                .collect();
            // An empty child relationship is null, as in the real API.
            let value = if children.is_empty() {
                Value::Null
            } else {
                json!({"totalSize": children.len(), "done": true, "records": children})
            };
            out.insert(relationship.to_string(), value);
        } else if let Some((parent, field)) = item.split_once('.') {
            let value = match &record[parent] {
                Value::Object(p) => {
                    json!({"attributes": {"type": parent}, field: p.get(field).cloned().unwrap_or(Value::Null)})
                }
                _ => Value::Null,
            };
            out.insert(parent.to_string(), value);
        } else {
            out.insert(
                item.clone(),
                record.get(item.as_str()).cloned().unwrap_or(Value::Null),
            );
        }
    }
    Value::Object(out)
}

fn page(org: &Org, mut rows: Vec<Value>) -> Response {
    let total = rows.len();
    let rest = if rows.len() > org.batch_size {
        rows.split_off(org.batch_size)
    } else {
        Vec::new()
    };
    let mut body = json!({"totalSize": total, "done": rest.is_empty(), "records": rows});
    if !rest.is_empty() {
        let locator = format!(
            "01gTEST{:04}-{}",
            org.next_locator.fetch_add(1, Ordering::SeqCst),
            org.batch_size
        );
        body["nextRecordsUrl"] = json!(format!("/services/data/v61.0/query/{locator}"));
        org.locators.lock().unwrap().insert(locator, rest);
    }
    let usage = format!(
        "api-usage={}/{}",
        org.api_used.load(Ordering::SeqCst),
        org.api_limit.load(Ordering::SeqCst)
    );
    ([("Sforce-Limit-Info", usage)], Json(body)).into_response()
}

async fn query(
    State(org): State<Arc<Org>>,
    headers: HeaderMap,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = authorize(&org, &headers) {
        return r;
    }
    let Some(soql) = params.get("q").cloned() else {
        return sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", "q is required");
    };
    org.queries.lock().unwrap().push(soql.clone());
    let malformed = |why: &str| sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", why);
    let Some(rest) = soql.strip_prefix("SELECT ") else {
        return malformed("expected SELECT");
    };
    // The outer FROM is the last " FROM " before WHERE/ORDER BY that is not inside parentheses.
    let Some(from_at) = rest.rfind(" FROM Opportunity") else {
        return malformed("only Opportunity is served");
    };
    let items = select_items(&rest[..from_at]);
    let tail = &rest[from_at + " FROM Opportunity".len()..];
    let re_cp = regex::Regex::new(
        r"\(SystemModstamp > (\S+) OR \(SystemModstamp = (\S+) AND Id > '(\w+)'\)\)",
    )
    .unwrap();
    let re_limit = regex::Regex::new(r" ORDER BY SystemModstamp, Id LIMIT (\d+)$").unwrap();
    let Some(limit) = re_limit
        .captures(tail)
        .map(|c| c[1].parse::<usize>().unwrap())
    else {
        return malformed("expected ORDER BY SystemModstamp, Id LIMIT n at the end");
    };
    let after = re_cp.captures(tail).map(|c| {
        assert_eq!(
            &c[1], &c[2],
            "both sides of the checkpoint use one timestamp"
        );
        (parse_time(&c[1]), c[3].to_string())
    });
    let closed_won_only = tail.contains("(StageName = 'Closed Won')");
    let mut rows: Vec<Value> = org
        .records
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !closed_won_only || r["StageName"] == "Closed Won")
        .filter(|r| match &after {
            None => true,
            Some((t, id)) => {
                let (rt, rid) = (
                    parse_time(r["SystemModstamp"].as_str().unwrap()),
                    r["Id"].as_str().unwrap(),
                );
                (rt, rid) > (*t, id.as_str())
            }
        })
        .cloned()
        .collect();
    rows.sort_by(|a, b| {
        (
            parse_time(a["SystemModstamp"].as_str().unwrap()),
            a["Id"].as_str().unwrap(),
        )
            .cmp(&(
                parse_time(b["SystemModstamp"].as_str().unwrap()),
                b["Id"].as_str().unwrap(),
            ))
    });
    rows.truncate(limit);
    let rows = rows
        .iter()
        .map(|r| project(r, &items, "Opportunity"))
        .collect();
    page(&org, rows)
}

async fn more(
    State(org): State<Arc<Org>>,
    headers: HeaderMap,
    Path(locator): Path<String>,
) -> Response {
    if let Err(r) = authorize(&org, &headers) {
        return r;
    }
    // A locator stays valid until its last batch is read (a retried request gets the same batch).
    let Some(rows) = org.locators.lock().unwrap().remove(&locator) else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        );
    };
    page(&org, rows)
}
