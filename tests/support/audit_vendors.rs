//! Local stand-ins for the systems the reconciliation audit reads, for `tests/audit_queries.rs`: Salesforce's
//! REST query resource (with its OAuth token endpoint), HubSpot's CRM search, NetSuite's SuiteQL and Odoo's
//! JSON-RPC. Each holds a set of deals or orders and answers a query the way the real API does, after checking
//! the request as the real API would (credentials, method, path, the query's shape) and that it only reads:
//! anything else is answered 400 (or an Odoo error) and kept in `violations`, which every test asserts empty.
//! Failures (a 429, a 503, a malformed answer) are scripted per request.
//!
//! Included with `#[path = "support/audit_vendors.rs"] mod audit_vendors;` (it needs `sink_mock` beside it).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::Json;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};

use crate::sink_mock::{header, serve};

pub const SF_CLIENT_ID: &str = "audit-client";
pub const SF_CLIENT_SECRET: &str = "audit-secret";
pub const HUBSPOT_TOKEN: &str = "pat-na1-audit";
pub const NS_ACCOUNT: &str = "1234567-sb1";
pub const NS_CONSUMER_KEY: &str = "ck-audit";
pub const NS_CONSUMER_SECRET: &str = "cs-audit";
pub const NS_TOKEN_ID: &str = "tid-audit";
pub const NS_TOKEN_SECRET: &str = "ts-audit";
pub const ODOO_DB: &str = "erp";
pub const ODOO_LOGIN: &str = "audit@example.com";
pub const ODOO_KEY: &str = "odoo-key";
const ODOO_UID: i64 = 7;

/// A status, headers and body answered instead of looking at the request.
pub type Scripted = (u16, Vec<(&'static str, String)>, String);

/// One deal (CRM) or order (ERP) as the stand-in stores it.
#[derive(Clone, Debug)]
pub struct Row {
    /// The system's own id: a Salesforce Id, or a number as text (HubSpot, NetSuite, Odoo).
    pub id: String,
    /// Closed won (CRM); always true for orders.
    pub won: bool,
    pub date: DateTime<Utc>,
    /// The amount exactly as the system answers it (a JSON number, a string, null).
    pub amount: Value,
    pub currency: Option<String>,
    /// ERP: the CRM id the order carries (`None`: entered by hand).
    pub external_id: Option<String>,
}

pub struct Vendor {
    pub rows: Mutex<Vec<Row>>,
    /// Answers given before the next data requests look at anything, in order.
    pub scripts: Mutex<Vec<Scripted>>,
    /// Requests the real API would refuse, or that would write: each test asserts there are none.
    pub violations: Mutex<Vec<String>>,
    /// Data requests (not token requests) seen.
    pub queries: AtomicUsize,
    /// Every query text (SOQL, SuiteQL) or body (HubSpot, Odoo) received.
    pub seen: Mutex<Vec<String>>,
    /// Salesforce: the org has no multi-currency (no `CurrencyIsoCode` field).
    pub single_currency: std::sync::atomic::AtomicBool,
    /// Salesforce: tokens refused from now on (a revoked connected app).
    pub revoked: std::sync::atomic::AtomicBool,
    tokens: Mutex<Vec<String>>,
    url: OnceLock<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn scripted_response((status, headers, body): Scripted) -> Response {
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

impl Vendor {
    fn new(rows: Vec<Row>) -> Arc<Vendor> {
        Arc::new(Vendor {
            rows: Mutex::new(rows),
            scripts: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            queries: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            single_currency: Default::default(),
            revoked: Default::default(),
            tokens: Mutex::new(Vec::new()),
            url: OnceLock::new(),
        })
    }

    pub fn url(&self) -> String {
        self.url.get().cloned().unwrap_or_default()
    }

    pub fn script(&self, answer: Scripted) {
        lock(&self.scripts).push(answer);
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    fn refuse(&self, why: String) -> Response {
        lock(&self.violations).push(why.clone());
        (StatusCode::BAD_REQUEST, why).into_response()
    }

    /// The next scripted answer, if any: counted as a query.
    fn next_script(&self, seen: String) -> Option<Response> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        lock(&self.seen).push(seen);
        let mut scripts = lock(&self.scripts);
        (!scripts.is_empty()).then(|| scripted_response(scripts.remove(0)))
    }

    /// Rows matching `keep`, ordered by `order`, after `after`, at most `limit`; and whether more remain.
    fn select(
        &self,
        keep: impl Fn(&Row) -> bool,
        after: Option<&str>,
        numeric: bool,
        limit: usize,
    ) -> (Vec<Row>, bool) {
        let key = |id: &str| -> (u128, String) {
            if numeric {
                (id.parse().unwrap_or(u128::MAX), String::new())
            } else {
                (0, id.to_string())
            }
        };
        let mut rows: Vec<Row> = lock(&self.rows)
            .iter()
            .filter(|r| keep(r))
            .filter(|r| after.is_none_or(|a| key(&r.id) > key(a)))
            .cloned()
            .collect();
        rows.sort_by_key(|r| key(&r.id));
        let more = rows.len() > limit;
        rows.truncate(limit);
        (rows, more)
    }
}

async fn bind(vendor: Arc<Vendor>, router: axum::Router) -> Arc<Vendor> {
    let url = serve(router).await;
    vendor.url.set(url).unwrap();
    vendor
}

fn in_dates(date: DateTime<Utc>, from: NaiveDate, to: NaiveDate) -> bool {
    let d = date.date_naive();
    d >= from && d <= to
}

fn capture<'a>(re: &str, text: &'a str) -> Option<regex::Captures<'a>> {
    regex::Regex::new(re).unwrap().captures(text)
}

// ---------------------------------------------------------------------------------------------- Salesforce

/// A Salesforce org: client-credentials token endpoint and the REST query resource.
pub async fn salesforce(rows: Vec<Row>) -> Arc<Vendor> {
    let vendor = Vendor::new(rows);
    let router = axum::Router::new()
        .route("/services/oauth2/token", post(sf_token))
        .route("/services/data/v61.0/query", get(sf_query))
        .with_state(vendor.clone());
    bind(vendor, router).await
}

async fn sf_token(
    State(v): State<Arc<Vendor>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if get("grant_type") != "client_credentials"
        || get("client_id") != SF_CLIENT_ID
        || get("client_secret") != SF_CLIENT_SECRET
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let token = format!("00D-token-{}", uuid::Uuid::new_v4());
    lock(&v.tokens).push(token.clone());
    Json(json!({"access_token": token, "instance_url": v.url(), "token_type": "Bearer"}))
        .into_response()
}

async fn sf_query(
    State(v): State<Arc<Vendor>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let auth = header(&headers, "authorization").to_string();
    let token = auth.strip_prefix("Bearer ").unwrap_or("");
    if v.revoked.load(Ordering::SeqCst) || !lock(&v.tokens).iter().any(|t| t == token) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])),
        )
            .into_response();
    }
    let soql = query.get("q").cloned().unwrap_or_default();
    if let Some(answer) = v.next_script(soql.clone()) {
        return answer;
    }
    // The query resource only ever reads, but the audit's query must be exactly this shape.
    let Some(shape) = capture(
        r"^SELECT Id, (\w+)(, (\w+))? FROM Opportunity WHERE IsWon = true AND CloseDate >= (\d{4}-\d{2}-\d{2}) AND CloseDate <= (\d{4}-\d{2}-\d{2})( AND \(([^)]*)\))?( AND Id > '(\w+)')? ORDER BY Id LIMIT (\d+)$",
        &soql,
    ) else {
        return v.refuse(format!("SOQL not the audit's read-only shape: {soql}"));
    };
    if v.single_currency.load(Ordering::SeqCst) && shape.get(3).is_some() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!([{"message": "No such column 'CurrencyIsoCode' on entity 'Opportunity'.", "errorCode": "INVALID_FIELD"}])),
        )
            .into_response();
    }
    let from = NaiveDate::parse_from_str(&shape[4], "%Y-%m-%d").unwrap();
    let to = NaiveDate::parse_from_str(&shape[5], "%Y-%m-%d").unwrap();
    let limit: usize = shape[10].parse().unwrap();
    if limit > 2000 {
        return v.refuse(format!("LIMIT {limit} above 2000"));
    }
    let after = shape.get(9).map(|m| m.as_str().to_string());
    let amount_field = shape[1].to_string();
    let currency_field = shape.get(3).map(|m| m.as_str().to_string());
    let (rows, _) = v.select(
        |r| r.won && in_dates(r.date, from, to),
        after.as_deref(),
        false,
        limit,
    );
    let records: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut record = json!({
                "attributes": {"type": "Opportunity", "url": format!("/services/data/v61.0/sobjects/Opportunity/{}", r.id)},
                "Id": r.id,
            });
            record[&amount_field] = r.amount.clone();
            if let Some(field) = &currency_field {
                record[field] = json!(r.currency);
            }
            record
        })
        .collect();
    Json(json!({"totalSize": records.len(), "done": true, "records": records})).into_response()
}

/// 15-character Salesforce Ids in ascending order: `006` + a zero-padded counter.
pub fn salesforce_id(n: usize) -> String {
    format!("006{n:012}")
}

// ------------------------------------------------------------------------------------------------- HubSpot

/// A HubSpot portal's CRM search for deals.
pub async fn hubspot(rows: Vec<Row>) -> Arc<Vendor> {
    let vendor = Vendor::new(rows);
    let router = axum::Router::new()
        .route("/crm/v3/objects/deals/search", post(hs_search))
        .with_state(vendor.clone());
    bind(vendor, router).await
}

async fn hs_search(State(v): State<Arc<Vendor>>, headers: HeaderMap, body: String) -> Response {
    if header(&headers, "authorization") != format!("Bearer {HUBSPOT_TOKEN}") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"status": "error", "category": "INVALID_AUTHENTICATION"})),
        )
            .into_response();
    }
    if let Some(answer) = v.next_script(body.clone()) {
        return answer;
    }
    let Ok(request) = serde_json::from_str::<Value>(&body) else {
        return v.refuse(format!("search body is not JSON: {body}"));
    };
    if request.get("after").is_some() {
        return v.refuse("paged by `after`, which stops at 10,000 results".into());
    }
    let limit = request["limit"].as_u64().unwrap_or(10) as usize;
    if limit > 200 {
        return v.refuse(format!("limit {limit} above 200"));
    }
    if request["sorts"] != json!([{"propertyName": "hs_object_id", "direction": "ASCENDING"}]) {
        return v.refuse(format!("sorts: {}", request["sorts"]));
    }
    let groups = request["filterGroups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [group] = groups.as_slice() else {
        return v.refuse(format!("expected one filter group: {body}"));
    };
    let filters = group["filters"].as_array().cloned().unwrap_or_default();
    let find = |name: &str| filters.iter().find(|f| f["propertyName"] == name).cloned();
    if find("hs_is_closed_won")
        != Some(json!({"propertyName": "hs_is_closed_won", "operator": "EQ", "value": "true"}))
    {
        return v.refuse(format!("no hs_is_closed_won EQ true: {body}"));
    }
    let Some(close) = find("closedate").filter(|f| f["operator"] == "BETWEEN") else {
        return v.refuse(format!("no closedate BETWEEN: {body}"));
    };
    let millis = |v: &Value| v.as_str().and_then(|s| s.parse::<i64>().ok());
    let (Some(from), Some(to)) = (millis(&close["value"]), millis(&close["highValue"])) else {
        return v.refuse(format!("closedate bounds are not epoch millis: {close}"));
    };
    let after = match find("hs_object_id") {
        Some(f) if f["operator"] == "GT" => f["value"].as_str().map(str::to_string),
        Some(f) => return v.refuse(format!("hs_object_id filter: {f}")),
        None => None,
    };
    let properties: Vec<String> = request["properties"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let (rows, more) = v.select(
        |r| {
            let ms = r.date.timestamp_millis();
            r.won && ms >= from && ms <= to
        },
        after.as_deref(),
        true,
        limit,
    );
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut props = serde_json::Map::new();
            for p in &properties {
                let value = match p.as_str() {
                    "amount" => match &r.amount {
                        // HubSpot answers every property as a string.
                        Value::Number(n) => json!(n.to_string()),
                        other => other.clone(),
                    },
                    "deal_currency_code" => json!(r.currency),
                    "hs_object_id" => json!(r.id),
                    _ => Value::Null,
                };
                props.insert(p.clone(), value);
            }
            json!({"id": r.id, "properties": props, "archived": false})
        })
        .collect();
    let mut answer = json!({"total": results.len(), "results": results});
    if more {
        answer["paging"] = json!({"next": {"after": limit.to_string()}});
    }
    Json(answer).into_response()
}

// ------------------------------------------------------------------------------------------------ NetSuite

/// A NetSuite account's SuiteQL endpoint, TBA-authenticated.
pub async fn netsuite(rows: Vec<Row>) -> Arc<Vendor> {
    let vendor = Vendor::new(rows);
    let router = axum::Router::new()
        .route("/services/rest/query/v1/suiteql", post(ns_suiteql))
        .with_state(vendor.clone());
    bind(vendor, router).await
}

/// Checks a TBA `Authorization` header: realm, consumer, token and the HMAC-SHA256 signature over the URL.
fn ns_authorized(method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
    let Some(params) = header(headers, "authorization").strip_prefix("OAuth ") else {
        return false;
    };
    let mut oauth: HashMap<String, String> = HashMap::new();
    for part in params.split(", ") {
        let Some((k, v)) = part.split_once('=') else {
            return false;
        };
        let v = percent_encoding::percent_decode_str(v.trim_matches('"'))
            .decode_utf8_lossy()
            .into_owned();
        oauth.insert(k.to_string(), v);
    }
    let get = |k: &str| oauth.get(k).cloned().unwrap_or_default();
    if get("realm") != "1234567_SB1"
        || get("oauth_consumer_key") != NS_CONSUMER_KEY
        || get("oauth_token") != NS_TOKEN_ID
    {
        return false;
    }
    let signed: Vec<(String, String)> = oauth
        .iter()
        .filter(|(k, _)| k.starts_with("oauth_") && *k != "oauth_signature")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let pairs: Vec<(&str, &str)> = signed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let url = url::Url::parse(&format!("http://{}{}", header(headers, "host"), uri)).unwrap();
    let expected = meshline::connectors::sinks::netsuite::tba_signature(
        method.as_str(),
        &url,
        &pairs,
        NS_CONSUMER_SECRET,
        NS_TOKEN_SECRET,
    );
    get("oauth_signature") == expected
}

async fn ns_suiteql(
    State(v): State<Arc<Vendor>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !ns_authorized(&method, &uri, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"o:errorDetails": [{"detail": "Invalid login attempt.", "o:errorCode": "INVALID_LOGIN"}]})),
        )
            .into_response();
    }
    let q = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|b| b["q"].as_str().map(str::to_string))
        .unwrap_or_default();
    if let Some(answer) = v.next_script(q.clone()) {
        return answer;
    }
    if header(&headers, "prefer") != "transient" {
        return v.refuse("SuiteQL without `Prefer: transient`".into());
    }
    let params: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    if params.contains_key("offset") {
        return v.refuse("paged by offset, which stops at 100,000 rows".into());
    }
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(1000);
    if limit > 1000 {
        return v.refuse(format!("limit {limit} above 1000"));
    }
    let Some(shape) = capture(
        r"^SELECT t\.id AS id, t\.externalid AS externalid, t\.foreigntotal AS amount, c\.symbol AS currency FROM transaction t LEFT JOIN currency c ON c\.id = t\.currency WHERE t\.type = 'SalesOrd' AND t\.trandate BETWEEN TO_DATE\('(\d{4}-\d{2}-\d{2})', 'YYYY-MM-DD'\) AND TO_DATE\('(\d{4}-\d{2}-\d{2})', 'YYYY-MM-DD'\)( AND t\.id > (\d+))? ORDER BY t\.id$",
        &q,
    ) else {
        return v.refuse(format!("SuiteQL not the audit's read-only shape: {q}"));
    };
    let from = NaiveDate::parse_from_str(&shape[1], "%Y-%m-%d").unwrap();
    let to = NaiveDate::parse_from_str(&shape[2], "%Y-%m-%d").unwrap();
    let after = shape.get(4).map(|m| m.as_str().to_string());
    let (rows, more) = v.select(
        |r| in_dates(r.date, from, to),
        after.as_deref(),
        true,
        limit,
    );
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "links": [],
                "id": r.id,
                "externalid": r.external_id,
                // SuiteQL answers numbers as strings.
                "amount": match &r.amount { Value::Number(n) => json!(n.to_string()), a => a.clone() },
                "currency": r.currency,
            })
        })
        .collect();
    Json(json!({
        "links": [], "count": items.len(), "hasMore": more, "items": items, "offset": 0,
        "totalResults": items.len(),
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------------- Odoo

/// An Odoo database's JSON-RPC endpoint with `sale.order` records.
pub async fn odoo(rows: Vec<Row>) -> Arc<Vendor> {
    let vendor = Vendor::new(rows);
    let router = axum::Router::new()
        .route("/jsonrpc", post(odoo_rpc))
        .with_state(vendor.clone());
    bind(vendor, router).await
}

fn odoo_error(id: &Value, name: &str, message: &str) -> Response {
    Json(json!({
        "jsonrpc": "2.0", "id": id,
        "error": {"code": 200, "message": "Odoo Server Error", "data": {"name": name, "message": message}},
    }))
    .into_response()
}

async fn odoo_rpc(State(v): State<Arc<Vendor>>, Json(call): Json<Value>) -> Response {
    let id = call["id"].clone();
    let params = &call["params"];
    let args = params["args"].as_array().cloned().unwrap_or_default();
    match (params["service"].as_str(), params["method"].as_str()) {
        (Some("common"), Some("authenticate")) => {
            let ok = args.first() == Some(&json!(ODOO_DB))
                && args.get(1) == Some(&json!(ODOO_LOGIN))
                && args.get(2) == Some(&json!(ODOO_KEY));
            let result = if ok { json!(ODOO_UID) } else { json!(false) };
            return Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response();
        }
        (Some("object"), Some("execute_kw")) => {}
        other => return v.refuse(format!("unexpected JSON-RPC call {other:?}")),
    }
    if let Some(answer) = v.next_script(call.to_string()) {
        return answer;
    }
    if args.first() != Some(&json!(ODOO_DB))
        || args.get(1) != Some(&json!(ODOO_UID))
        || args.get(2) != Some(&json!(ODOO_KEY))
    {
        return odoo_error(&id, "odoo.exceptions.AccessDenied", "Access Denied");
    }
    if args.get(3) != Some(&json!("sale.order")) {
        return v.refuse(format!("model {:?}", args.get(3)));
    }
    let method = args.get(4).and_then(Value::as_str).unwrap_or("");
    if method != "search_read" {
        // create, write, unlink, action_confirm...: the audit never changes the ERP.
        return v.refuse(format!("the audit called {method:?}, not search_read"));
    }
    let domain = args
        .get(5)
        .and_then(|a| a.get(0))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let kwargs = args.get(6).cloned().unwrap_or(Value::Null);
    if kwargs["order"] != "id asc" {
        return v.refuse(format!("order {}", kwargs["order"]));
    }
    if kwargs["fields"] != json!(["client_order_ref", "amount_total", "currency_id"]) {
        return v.refuse(format!("fields {}", kwargs["fields"]));
    }
    let limit = kwargs["limit"].as_u64().unwrap_or(0) as usize;
    if limit == 0 {
        return v.refuse("search_read without a limit".into());
    }
    let odoo_time = |v: &Value| {
        v.as_str()
            .and_then(|s| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").ok())
            .map(|t| t.and_utc())
    };
    let mut from = None;
    let mut to = None;
    let mut after = None;
    for term in &domain {
        match (term[0].as_str(), term[1].as_str()) {
            (Some("date_order"), Some(">=")) => from = odoo_time(&term[2]),
            (Some("date_order"), Some("<=")) => to = odoo_time(&term[2]),
            (Some("id"), Some(">")) => after = term[2].as_i64().map(|n| n.to_string()),
            _ => return v.refuse(format!("domain term {term}")),
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return v.refuse(format!("domain without the window: {domain:?}"));
    };
    let (rows, _) = v.select(
        |r| r.date >= from && r.date <= to,
        after.as_deref(),
        true,
        limit,
    );
    let result: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id.parse::<i64>().unwrap(),
                "client_order_ref": r.external_id.clone().map(Value::String).unwrap_or(json!(false)),
                "amount_total": r.amount,
                "currency_id": r.currency.as_ref().map(|c| json!([1, c])).unwrap_or(json!(false)),
            })
        })
        .collect();
    Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
}
