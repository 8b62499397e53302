//! A NetSuite-style ERP stand-in: the REST record service (upsert by external id), SuiteQL for the pricebook,
//! OAuth 1.0a TBA signatures checked the way NetSuite checks them, a price tolerance of its own, a concurrency
//! limit answered with 429s, and a switchable failure window (503s or slow answers).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::connectors::sinks::netsuite::{realm, tba_signature};

/// The TBA credentials the stand-in accepts (the dev mode writes the same into the sink's Secret directory).
#[derive(Debug, Clone)]
pub struct ErpCredentials {
    pub account_id: String,
    pub consumer_key: String,
    pub consumer_secret: String,
    pub token_id: String,
    pub token_secret: String,
}

impl ErpCredentials {
    /// Fresh random credentials.
    pub fn generate() -> ErpCredentials {
        let r = || uuid::Uuid::new_v4().simple().to_string();
        ErpCredentials {
            account_id: "1234567-sb1".into(),
            consumer_key: r(),
            consumer_secret: r(),
            token_id: r(),
            token_secret: r(),
        }
    }

    /// The Secret keys the NetSuite sink reads.
    pub fn secret_files(&self) -> Vec<(&'static str, String)> {
        vec![
            ("accountId", self.account_id.clone()),
            ("consumerKey", self.consumer_key.clone()),
            ("consumerSecret", self.consumer_secret.clone()),
            ("tokenId", self.token_id.clone()),
            ("tokenSecret", self.token_secret.clone()),
        ]
    }
}

/// How the ERP misbehaves right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 503 Service Unavailable for every request.
    Unavailable,
    /// Answers only after this long.
    Slow(Duration),
}

/// The ERP's state, shared with the scenario that inspects it.
#[derive(Debug)]
pub struct ErpState {
    pub credentials: ErpCredentials,
    /// SKU → (unit price, currency).
    pub pricebook: BTreeMap<String, (Decimal, String)>,
    /// The ERP's own tolerance on a line's rate against the pricebook (NetSuite validates prices too).
    pub tolerance: Decimal,
    /// Concurrent requests allowed (NetSuite's per-account concurrency governance).
    pub concurrency_limit: u32,
    pub orders: Mutex<BTreeMap<String, Value>>,
    in_flight: AtomicU32,
    pub requests: AtomicU64,
    pub throttled: AtomicU64,
    pub rejected: AtomicU64,
    pub upserts: AtomicU64,
    failure: Mutex<Option<(Failure, Instant)>>,
    nonces: Mutex<HashSet<String>>,
}

impl ErpState {
    pub fn new(
        credentials: ErpCredentials,
        pricebook: BTreeMap<String, (Decimal, String)>,
    ) -> Arc<ErpState> {
        Arc::new(ErpState {
            credentials,
            pricebook,
            tolerance: Decimal::new(3, 2),
            concurrency_limit: 5,
            orders: Mutex::new(BTreeMap::new()),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            upserts: AtomicU64::new(0),
            failure: Mutex::new(None),
            nonces: Mutex::new(HashSet::new()),
        })
    }

    /// Misbehave for `window`.
    pub fn fail_for(&self, failure: Failure, window: Duration) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((failure, Instant::now() + window));
    }

    fn current_failure(&self) -> Option<Failure> {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        match *f {
            Some((failure, until)) if Instant::now() < until => Some(failure),
            Some(_) => {
                *f = None;
                None
            }
            None => None,
        }
    }

    pub fn order_count(&self) -> usize {
        self.orders.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The default pricebook of the closed-won example.
pub fn example_pricebook() -> BTreeMap<String, (Decimal, String)> {
    [
        ("SKU-1001", "100.00"),
        ("SKU-1002", "250.00"),
        ("SKU-1003", "19.99"),
        ("SKU-1004", "5.00"),
        ("SKU-1005", "1200.00"),
    ]
    .into_iter()
    .map(|(sku, price)| {
        (
            sku.to_string(),
            (price.parse().unwrap_or_default(), "USD".to_string()),
        )
    })
    .collect()
}

pub fn router(state: Arc<ErpState>) -> Router {
    Router::new()
        .route("/services/rest/record/v1/{record_type}/{id}", put(upsert))
        .route("/services/rest/record/v1/{record_type}", get(list))
        .route("/services/rest/query/v1/suiteql", post(suiteql))
        .route("/sim/orders", get(orders))
        .with_state(state)
}

fn ns_error(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = json!({
        "type": "https://www.rfc-editor.org/rfc/rfc9110.html#section-15",
        "title": status.canonical_reason().unwrap_or_default(),
        "status": status.as_u16(),
        "o:errorDetails": [{ "detail": detail, "o:errorCode": code }]
    });
    (status, Json(body)).into_response()
}

/// Checks the TBA `Authorization` header exactly as NetSuite does: realm, consumer key, token, a fresh
/// timestamp, an unused nonce and the HMAC-SHA256 signature over the request.
fn authenticate(
    state: &ErpState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Box<Response>> {
    let unauthorized =
        |why: &str| Box::new(ns_error(StatusCode::UNAUTHORIZED, "INVALID_LOGIN", why));
    let header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("missing Authorization"))?;
    let params = header
        .strip_prefix("OAuth ")
        .ok_or_else(|| unauthorized("not an OAuth header"))?;
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for part in params.split(',') {
        if let Some((k, v)) = part.trim().split_once('=') {
            let v = v.trim_matches('"');
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .to_string();
            fields.insert(k.to_string(), v);
        }
    }
    let c = &state.credentials;
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or_default();
    if get("realm") != realm(&c.account_id)
        || get("oauth_consumer_key") != c.consumer_key
        || get("oauth_token") != c.token_id
    {
        return Err(unauthorized("unknown realm, consumer or token"));
    }
    if get("oauth_signature_method") != "HMAC-SHA256" {
        return Err(unauthorized("signature method must be HMAC-SHA256"));
    }
    let ts: i64 = get("oauth_timestamp").parse().unwrap_or(0);
    if (chrono::Utc::now().timestamp() - ts).abs() > 300 {
        return Err(unauthorized("timestamp outside the allowed window"));
    }
    if !state
        .nonces
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(format!("{ts}:{}", get("oauth_nonce")))
    {
        return Err(unauthorized("nonce already used"));
    }
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let url = url::Url::parse(&format!("http://{host}{uri}"))
        .map_err(|_| unauthorized("bad request URL"))?;
    let oauth: Vec<(&str, &str)> = fields
        .iter()
        .filter(|(k, _)| k.starts_with("oauth_") && *k != "oauth_signature")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let expected = tba_signature(
        method.as_str(),
        &url,
        &oauth,
        &c.consumer_secret,
        &c.token_secret,
    );
    if expected != get("oauth_signature") {
        return Err(unauthorized("signature does not match"));
    }
    Ok(())
}

/// Applies governance and the failure window around a handler.
async fn govern<'s>(
    state: &'s ErpState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Guard<'s>, Box<Response>> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    authenticate(state, method, uri, headers)?;
    match state.current_failure() {
        Some(Failure::Unavailable) => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "NetSuite is down for maintenance",
            )
                .into_response()
                .into());
        }
        Some(Failure::Slow(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let guard = Guard(&state.in_flight);
    if now > state.concurrency_limit {
        state.throttled.fetch_add(1, Ordering::Relaxed);
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({"o:errorDetails": [{"detail": "Concurrent request limit exceeded", "o:errorCode": "CONCURRENCY_LIMIT_EXCEEDED"}]})),
        )
            .into_response()
            .into());
    }
    Ok(guard)
}

struct Guard<'a>(&'a AtomicU32);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn upsert(
    State(state): State<Arc<ErpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((record_type, id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let _guard = match govern(&state, &method, &uri, &headers).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    // A request takes a little while, as a real ERP's does, so concurrency matters.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let Some(external_id) = id.strip_prefix("eid:") else {
        return ns_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ID",
            "only upsert by external id (eid:) is supported",
        );
    };
    if record_type != "salesOrder" {
        return ns_error(
            StatusCode::NOT_FOUND,
            "NONEXISTENT_RECORD_TYPE",
            &format!("record type {record_type} is not enabled"),
        );
    }
    let items = body
        .pointer("/item/items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if items.is_empty() {
        state.rejected.fetch_add(1, Ordering::Relaxed);
        return ns_error(
            StatusCode::BAD_REQUEST,
            "USER_ERROR",
            "You must enter at least one line item for this transaction.",
        );
    }
    for (i, line) in items.iter().enumerate() {
        let sku = line
            .pointer("/item/externalId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let rate = line.get("rate").and_then(|r| match r {
            Value::Number(n) => n.to_string().parse::<Decimal>().ok(),
            Value::String(s) => s.parse::<Decimal>().ok(),
            _ => None,
        });
        let Some((price, _)) = state.pricebook.get(sku) else {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            return ns_error(
                StatusCode::BAD_REQUEST,
                "INVALID_KEY_OR_REF",
                &format!("Invalid item reference key {sku} (line {i})."),
            );
        };
        let Some(rate) = rate else {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            return ns_error(
                StatusCode::BAD_REQUEST,
                "INVALID_FLD_VALUE",
                &format!("Invalid rate on line {i}."),
            );
        };
        if (rate - *price).abs() > *price * state.tolerance {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            return ns_error(
                StatusCode::BAD_REQUEST,
                "INVALID_FLD_VALUE",
                &format!(
                    "Line {i} ({sku}): rate {rate} deviates from the price level {price} by more than {}%.",
                    state.tolerance * Decimal::from(100)
                ),
            );
        }
    }
    state.upserts.fetch_add(1, Ordering::Relaxed);
    let mut orders = state.orders.lock().unwrap_or_else(|p| p.into_inner());
    let internal = orders.len() + 1000;
    orders.insert(external_id.to_string(), body);
    let location = format!("/services/rest/record/v1/salesOrder/{internal}");
    (StatusCode::NO_CONTENT, [("location", location)]).into_response()
}

async fn list(
    State(state): State<Arc<ErpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match govern(&state, &method, &uri, &headers).await {
        Ok(_guard) => Json(json!({"count": 0, "hasMore": false, "items": [], "offset": 0, "totalResults": state.order_count()})).into_response(),
        Err(r) => *r,
    }
}

/// SuiteQL for the pricebook: `SELECT * FROM inventoryItem`, paged with limit/offset like NetSuite.
async fn suiteql(
    State(state): State<Arc<ErpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let _guard = match govern(&state, &method, &uri, &headers).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    if headers.get("prefer").and_then(|v| v.to_str().ok()) != Some("transient") {
        return ns_error(
            StatusCode::BAD_REQUEST,
            "INVALID_HEADER",
            "SuiteQL requires the header Prefer: transient",
        );
    }
    let q = body
        .get("q")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !q.contains("from inventoryitem") {
        return ns_error(
            StatusCode::BAD_REQUEST,
            "INVALID_SEARCH",
            &format!("unknown table in {q}"),
        );
    }
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let limit: usize = query
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let offset: usize = query
        .get("offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SuiteQL answers with lower-case column names.
    let rows: Vec<Value> = state
        .pricebook
        .iter()
        .map(|(sku, (price, currency))| json!({"sku": sku, "unitprice": price.to_string(), "currency": currency}))
        .collect();
    let page: Vec<Value> = rows.iter().skip(offset).take(limit).cloned().collect();
    let has_more = offset + page.len() < rows.len();
    Json(json!({"count": page.len(), "hasMore": has_more, "items": page, "offset": offset, "totalResults": rows.len()})).into_response()
}

async fn orders(State(state): State<Arc<ErpState>>) -> Response {
    let orders = state
        .orders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Json(json!({"count": orders.len(), "orders": orders})).into_response()
}
