//! A NetSuite-style ERP stand-in: the REST record service (upsert by external id), SuiteQL for the pricebook
//! (`inventoryitem`) and for its sales orders (the reconciliation audit's `transaction` query, keyset-paged by
//! internal id, joined to `currency` for the ISO code), OAuth 1.0a TBA signatures checked the way NetSuite
//! checks them, a price tolerance of its own, a concurrency limit answered with 429s, and a switchable failure
//! window (503s or slow answers).
//!
//! Each upserted order becomes a transaction row with a stable internal id (the first upsert assigns it; an
//! update keeps it), its external id, `trandate` (the payload's `tranDate`), its currency and its total in that
//! currency (`foreigntotal`: the lines' quantity × rate less the payload's `discountRate` percent, rounded to
//! cents as the CRM rounds the deal's amount).

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
    /// The sales orders as SuiteQL's `transaction` table sees them.
    transactions: Mutex<Transactions>,
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
            transactions: Mutex::new(Transactions::default()),
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

    /// Stores a sales order that passed the record service's checks, as an upsert by external id does: the
    /// first one assigns the internal id, an update keeps it. `Err` is NetSuite's error code and detail for a
    /// payload it refuses (an unknown currency, a bad date or quantity).
    pub fn record_order(&self, external_id: &str, body: Value) -> Result<u64, (String, String)> {
        let mut orders = self.orders.lock().unwrap_or_else(|p| p.into_inner());
        let mut transactions = self.transactions.lock().unwrap_or_else(|p| p.into_inner());
        let internal = match transactions.by_external_id.get(external_id) {
            Some(id) => *id,
            // NetSuite never reuses an internal id; the stand-in never deletes, so the count is the next one.
            None => 1000 + transactions.by_external_id.len() as u64,
        };
        let row = Transaction::from_order(internal, external_id, &body)?;
        transactions
            .by_external_id
            .insert(external_id.to_string(), internal);
        transactions.rows.insert(internal, row);
        orders.insert(external_id.to_string(), body);
        Ok(internal)
    }

    /// Every sales order's transaction row, by internal id.
    pub fn transactions(&self) -> Vec<Transaction> {
        self.transactions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rows
            .values()
            .cloned()
            .collect()
    }
}

/// A sales order as a row of SuiteQL's `transaction` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The internal id, assigned at the first upsert and kept by updates.
    pub id: u64,
    pub external_id: String,
    pub tran_date: chrono::NaiveDate,
    /// The ISO code of the order's currency (`currency.refName`; USD, the subsidiary's, when absent).
    pub currency: String,
    /// The total in the order's currency.
    pub foreign_total: Decimal,
    pub memo: Option<String>,
    pub other_ref_num: Option<String>,
}

/// The `transaction` table: rows by internal id, and the internal id of each external id.
#[derive(Debug, Default)]
struct Transactions {
    rows: BTreeMap<u64, Transaction>,
    by_external_id: BTreeMap<String, u64>,
}

/// The account's currencies as SuiteQL's `currency` table holds them (internal id, ISO code `symbol`,
/// display `name`, exchange rate to the subsidiary's USD), with NetSuite's default internal ids.
const CURRENCIES: &[(u64, &str, &str, &str)] = &[
    (1, "USD", "US Dollar", "1"),
    (2, "GBP", "British pound", "1.27"),
    (3, "CAD", "Canadian Dollar", "0.73"),
    (4, "EUR", "Euro", "1.08"),
];

fn currency_by_symbol(symbol: &str) -> Option<(u64, &'static str, &'static str, &'static str)> {
    CURRENCIES.iter().copied().find(|c| c.1 == symbol)
}

/// A decimal the payload wrote as a JSON number or as text.
fn decimal(value: Option<&Value>) -> Option<Decimal> {
    match value? {
        Value::Number(n) => n.to_string().parse().ok(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Transaction {
    /// The row an upserted sales order makes; `Err` names the payload field NetSuite would refuse.
    fn from_order(
        id: u64,
        external_id: &str,
        body: &Value,
    ) -> Result<Transaction, (String, String)> {
        let currency = match body.pointer("/currency/refName").and_then(Value::as_str) {
            None => "USD".to_string(),
            Some(name) => match currency_by_symbol(name) {
                Some(c) => c.1.to_string(),
                None => {
                    return Err((
                        "INVALID_KEY_OR_REF".into(),
                        format!("Invalid currency reference key {name}."),
                    ));
                }
            },
        };
        let tran_date = match body.get("tranDate").and_then(Value::as_str) {
            None => chrono::Utc::now().date_naive(),
            Some(text) => chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
                (
                    "INVALID_FLD_VALUE".to_string(),
                    format!("Invalid tranDate {text:?}: expected YYYY-MM-DD."),
                )
            })?,
        };
        let mut subtotal = Decimal::ZERO;
        for (i, line) in body
            .pointer("/item/items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let quantity = decimal(line.get("quantity")).ok_or_else(|| {
                (
                    "INVALID_FLD_VALUE".to_string(),
                    format!("Invalid quantity on line {i}."),
                )
            })?;
            let rate = decimal(line.get("rate")).unwrap_or_default();
            subtotal += rate * quantity;
        }
        let discount = decimal(body.get("discountRate")).unwrap_or_default();
        // The same expression the CRM stand-in computes a deal's Amount with, so a delivered order's total
        // equals its deal's amount to the cent.
        let foreign_total = (subtotal * (Decimal::ONE - discount / Decimal::from(100))).round_dp(2);
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        Ok(Transaction {
            id,
            external_id: external_id.to_string(),
            tran_date,
            currency,
            foreign_total,
            memo: text("memo"),
            other_ref_num: text("otherRefNum"),
        })
    }

    /// A column of `transaction`, as SuiteQL answers it (text), `None` for null or an unknown column.
    fn column(&self, name: &str) -> Option<String> {
        let currency = currency_by_symbol(&self.currency);
        Some(match name {
            "id" => self.id.to_string(),
            "tranid" => format!("SO{}", self.id),
            "externalid" => self.external_id.clone(),
            "type" => "SalesOrd".into(),
            "trandate" => self.tran_date.format("%-m/%-d/%Y").to_string(),
            "currency" => currency?.0.to_string(),
            "foreigntotal" => self.foreign_total.to_string(),
            "total" => {
                let rate: Decimal = currency?.3.parse().ok()?;
                (self.foreign_total * rate).round_dp(2).to_string()
            }
            "exchangerate" => currency?.3.to_string(),
            "memo" => self.memo.clone()?,
            "otherrefnum" => self.other_ref_num.clone()?,
            _ => return None,
        })
    }
}

/// `transaction`'s columns the stand-in holds.
const TRANSACTION_COLUMNS: &[&str] = &[
    "id",
    "tranid",
    "externalid",
    "type",
    "trandate",
    "currency",
    "foreigntotal",
    "total",
    "exchangerate",
    "memo",
    "otherrefnum",
];

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
    let internal = match state.record_order(external_id, body) {
        Ok(id) => id,
        Err((code, detail)) => {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            return ns_error(StatusCode::BAD_REQUEST, &code, &detail);
        }
    };
    state.upserts.fetch_add(1, Ordering::Relaxed);
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
    let text = body.get("q").and_then(Value::as_str).unwrap_or_default();
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let q = text.to_ascii_lowercase();
    if q.contains(" from transaction ") {
        let host = headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("localhost");
        return transaction_query(&state, text, &query, host);
    }
    if !q.contains("from inventoryitem") {
        return ns_error(
            StatusCode::BAD_REQUEST,
            "INVALID_SEARCH",
            &format!("unknown table in {q}"),
        );
    }
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

/// NetSuite's answer to SuiteQL it cannot run.
fn invalid_query(reason: &str) -> Response {
    ns_error(
        StatusCode::BAD_REQUEST,
        "INVALID_PARAMETER",
        &format!(
            "Invalid search query. Detailed unprocessed description follows. Search error occurred: {reason}"
        ),
    )
}

/// The audit's read of the sales orders: `SELECT t.id AS id, t.<ext> AS externalid, t.<amount> AS amount,
/// c.<col> AS currency FROM transaction t LEFT JOIN currency c ON c.id = t.currency WHERE t.type = '<type>' AND
/// t.trandate BETWEEN TO_DATE('<from>', 'YYYY-MM-DD') AND TO_DATE('<to>', 'YYYY-MM-DD') [AND t.id > <n>] ORDER
/// BY t.id`, keywords in any case. Other shapes of `transaction` query are refused, naming what is unsupported.
fn transaction_query(
    state: &ErpState,
    text: &str,
    params: &BTreeMap<String, String>,
    host: &str,
) -> Response {
    static SHAPE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let shape = SHAPE.get_or_init(|| {
        regex::Regex::new(
            r"(?i)^\s*SELECT\s+t\.(\w+)\s+AS\s+id\s*,\s*t\.(\w+)\s+AS\s+externalid\s*,\s*t\.(\w+)\s+AS\s+amount\s*,\s*c\.(\w+)\s+AS\s+currency\s+FROM\s+transaction\s+t\s+LEFT\s+JOIN\s+currency\s+c\s+ON\s+c\.id\s*=\s*t\.(\w+)\s+WHERE\s+t\.type\s*=\s*'(\w+)'\s+AND\s+t\.(\w+)\s+BETWEEN\s+TO_DATE\s*\(\s*'([^']*)'\s*,\s*'YYYY-MM-DD'\s*\)\s+AND\s+TO_DATE\s*\(\s*'([^']*)'\s*,\s*'YYYY-MM-DD'\s*\)(?:\s+AND\s+t\.id\s*>\s*(\d+))?\s+ORDER\s+BY\s+t\.id(?:\s+ASC)?\s*$",
        )
        .expect("the transaction query pattern is valid")
    });
    let Some(m) = shape.captures(text) else {
        return invalid_query(
            "the stand-in ERP answers only the audit's transaction query (see crate::connectors::queries::netsuite)",
        );
    };
    let column = |i: usize| m[i].to_ascii_lowercase();
    for i in [1, 2, 3, 5, 7] {
        let name = column(i);
        if !TRANSACTION_COLUMNS.contains(&name.as_str()) {
            return invalid_query(&format!(
                "Field '{name}' for record 'transaction' was not found. Reason: NOT_EXPOSED - Not available for channel SEARCH"
            ));
        }
    }
    let currency_column = column(4);
    if !["id", "symbol", "name", "exchangerate"].contains(&currency_column.as_str()) {
        return invalid_query(&format!(
            "Field '{currency_column}' for record 'currency' was not found. Reason: NOT_EXPOSED - Not available for channel SEARCH"
        ));
    }
    if column(1) != "id" || column(5) != "currency" {
        return invalid_query(
            "the stand-in ERP keys pages on t.id and joins currency on t.currency",
        );
    }
    if column(7) != "trandate" {
        return invalid_query(&format!(
            "the stand-in ERP filters dates on t.trandate, not t.{}",
            column(7)
        ));
    }
    let date = |i: usize| chrono::NaiveDate::parse_from_str(&m[i], "%Y-%m-%d");
    let (Ok(from), Ok(to)) = (date(8), date(9)) else {
        return invalid_query(&format!(
            "Invalid date value {:?} or {:?} for format YYYY-MM-DD",
            &m[8], &m[9]
        ));
    };
    let after: u64 = m.get(10).and_then(|a| a.as_str().parse().ok()).unwrap_or(0);
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => 1000,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => {
            return ns_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER",
                "Invalid value for the parameter limit: it must be between 1 and 1000.",
            );
        }
    };
    let offset = match params.get("offset").map(|o| o.parse::<usize>()) {
        None => 0,
        Some(Ok(o)) => o,
        Some(Err(_)) => {
            return ns_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER",
                "Invalid value for the parameter offset.",
            );
        }
    };
    // Every stored transaction is a sales order: another type has no rows.
    let sales_orders = m[6].eq_ignore_ascii_case("SalesOrd");
    let transactions = state.transactions.lock().unwrap_or_else(|p| p.into_inner());
    let matching: Vec<&Transaction> = transactions
        .rows
        .range(after.saturating_add(1)..)
        .map(|(_, t)| t)
        .filter(|t| sales_orders && t.tran_date >= from && t.tran_date <= to)
        .collect();
    let (ext, amount) = (column(2), column(3));
    let items: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|t| {
            // SuiteQL answers every value as text and leaves null columns out.
            let mut item = serde_json::Map::new();
            item.insert("links".into(), json!([]));
            item.insert("id".into(), json!(t.id.to_string()));
            for (alias, value) in [
                ("externalid", t.column(&ext)),
                ("amount", t.column(&amount)),
                (
                    "currency",
                    currency_by_symbol(&t.currency).map(|c| match currency_column.as_str() {
                        "id" => c.0.to_string(),
                        "symbol" => c.1.to_string(),
                        "name" => c.2.to_string(),
                        _ => c.3.to_string(),
                    }),
                ),
            ] {
                if let Some(value) = value {
                    item.insert(alias.into(), Value::String(value));
                }
            }
            Value::Object(item)
        })
        .collect();
    let has_more = offset + items.len() < matching.len();
    let page =
        |o: usize| format!("http://{host}/services/rest/query/v1/suiteql?limit={limit}&offset={o}");
    let mut links = vec![json!({"rel": "self", "href": page(offset)})];
    if has_more {
        links.push(json!({"rel": "next", "href": page(offset + limit)}));
    }
    Json(json!({
        "links": links,
        "count": items.len(),
        "hasMore": has_more,
        "items": items,
        "offset": offset,
        "totalResults": matching.len(),
    }))
    .into_response()
}

async fn orders(State(state): State<Arc<ErpState>>) -> Response {
    let orders = state
        .orders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Json(json!({"count": orders.len(), "orders": orders})).into_response()
}
