//! A Salesforce-style CRM stand-in: it closes Opportunities and posts them as signed webhooks (the generic
//! HMAC-SHA256 scheme the worker verifies), retrying like a CRM does until the worker acknowledges. It is also
//! the org those deals live in ([`CrmOrg`]): an HTTP server with Salesforce's client-credentials token endpoint
//! and REST query resource, so the reconciliation audit's real SOQL client reads back what was closed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::NaiveDate;
use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::soql::{self, FieldValue, Soql};

use crate::connectors::sources::webhook::meshline_signature;

/// What the scenario wants a deal to look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DealKind {
    /// Prices at the pricebook (within a cent or two).
    Normal,
    /// One line's price drifted 8 % from the pricebook: the contract rejects it.
    PriceDrift,
    /// One line 4 % off: inside the contract's 5 %, outside the ERP's 3 %; the ERP rejects it.
    ErpRejects,
    /// A 25 % discount: held for finance.
    BigDiscount,
}

/// The currency of deal `n`: mostly USD, some EUR and GBP, so an audit compares totals per currency.
pub fn deal_currency(n: usize) -> &'static str {
    match n % 10 {
        7 => "EUR",
        9 => "GBP",
        _ => "USD",
    }
}

/// The close date of deal `n`: today or one of the two days before, so the deals span a window.
pub fn deal_close_date(n: usize) -> NaiveDate {
    chrono::Utc::now().date_naive() - chrono::Days::new((n % 3) as u64)
}

/// One closed-won Opportunity in the shape Salesforce's REST API gives it.
pub fn opportunity(n: usize, kind: DealKind, pricebook: &[(String, Decimal)]) -> Value {
    let mut rng = rand::rng();
    let id = format!("006Dn{:010}AAA", n);
    let lines = 1 + n % 5;
    let mut items = Vec::new();
    let mut total = Decimal::ZERO;
    for i in 0..lines {
        let (sku, price) = &pricebook[(n + i) % pricebook.len()];
        let qty = 1 + rng.random_range(0..20u32);
        let mut rate = *price;
        if i == 0 {
            match kind {
                DealKind::PriceDrift => rate = (*price * Decimal::new(108, 2)).round_dp(2),
                DealKind::ErpRejects => rate = (*price * Decimal::new(104, 2)).round_dp(2),
                _ => {}
            }
        }
        total += rate * Decimal::from(qty);
        items.push(json!({
            "ProductCode": sku,
            "Product2": {"Name": format!("Product {sku}")},
            "Quantity": qty,
            "UnitPrice": rate.to_string(),
        }));
    }
    let discount = if kind == DealKind::BigDiscount {
        Decimal::from(25)
    } else {
        Decimal::from(rng.random_range(0..15u32))
    };
    let amount = (total * (Decimal::ONE - discount / Decimal::from(100))).round_dp(2);
    json!({
        "Id": id,
        "Name": format!("Deal {n}"),
        "StageName": "Closed Won",
        "CloseDate": deal_close_date(n).format("%Y-%m-%d").to_string(),
        "SystemModstamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "AccountId": format!("001Dn{:010}AAA", n % 97),
        "Account": {"Name": format!("Customer {}", n % 97)},
        "CurrencyIsoCode": deal_currency(n),
        "Amount": amount.to_string(),
        "Discount_Percent__c": discount.to_string(),
        "Customer_Email__c": format!("buyer{n}@customer{}.example", n % 97),
        "Customer_Phone__c": format!("+1 555 {:04}", n % 10_000),
        "OpportunityLineItems": items,
    })
}

/// The client-credentials login the org accepts (the connected app's consumer key and secret).
#[derive(Debug, Clone)]
pub struct CrmCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl CrmCredentials {
    /// Fresh random credentials, never a real org's.
    pub fn generate() -> CrmCredentials {
        CrmCredentials {
            client_id: format!("3MVG9dev{}", uuid::Uuid::new_v4().simple()),
            client_secret: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The Secret keys the Salesforce source (and the audit's query) read for a client-credentials login.
    pub fn secret_files(&self) -> Vec<(&'static str, String)> {
        vec![
            ("clientId", self.client_id.clone()),
            ("clientSecret", self.client_secret.clone()),
        ]
    }
}

/// One Opportunity as the org holds it: the fields its query resource can select and filter on.
#[derive(Debug, Clone, PartialEq)]
pub struct Deal {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub close_date: NaiveDate,
    /// The deal's total, exactly the `Amount` its webhook carried.
    pub amount: Decimal,
    pub currency: String,
    pub account_id: Option<String>,
    pub system_modstamp: Option<String>,
}

impl Deal {
    /// From an Opportunity in the REST shape [`opportunity`] produces; names the field that is wrong.
    pub fn from_opportunity(record: &Value) -> Result<Deal, String> {
        let text = |field: &str| -> Result<String, String> {
            record
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("Opportunity.{field}: missing or not text"))
        };
        let id = text("Id")?;
        let close_date = text("CloseDate")?;
        let close_date = NaiveDate::parse_from_str(&close_date, "%Y-%m-%d")
            .map_err(|e| format!("Opportunity {id}: CloseDate {close_date:?}: {e}"))?;
        let amount = match record.get("Amount") {
            Some(Value::String(s)) => s.parse::<Decimal>().ok(),
            Some(Value::Number(n)) => n.to_string().parse::<Decimal>().ok(),
            _ => None,
        }
        .ok_or_else(|| format!("Opportunity {id}: Amount: not a decimal"))?;
        Ok(Deal {
            name: text("Name").unwrap_or_default(),
            stage: text("StageName")?,
            close_date,
            amount,
            currency: text("CurrencyIsoCode")?,
            account_id: text("AccountId").ok(),
            system_modstamp: text("SystemModstamp").ok(),
            id,
        })
    }

    pub fn is_won(&self) -> bool {
        self.stage == "Closed Won"
    }

    /// The value of one of [`soql::FIELDS`].
    pub fn field(&self, field: &str) -> FieldValue {
        let text = |s: &str| FieldValue::Text(s.to_string());
        match field {
            "Id" => text(&self.id),
            "Name" => text(&self.name),
            "StageName" => text(&self.stage),
            "CloseDate" => FieldValue::Date(self.close_date),
            "IsWon" => FieldValue::Boolean(self.is_won()),
            "IsClosed" => FieldValue::Boolean(self.stage.starts_with("Closed")),
            "Amount" => FieldValue::Number(self.amount),
            "CurrencyIsoCode" => text(&self.currency),
            "AccountId" => self.account_id.as_deref().map_or(FieldValue::Null, text),
            "SystemModstamp" => self
                .system_modstamp
                .as_deref()
                .map_or(FieldValue::Null, text),
            _ => FieldValue::Null,
        }
    }

    /// The record as the query resource answers it: `attributes`, then the selected fields.
    fn to_record(&self, version: &str, fields: &[&str]) -> Value {
        let mut record = serde_json::Map::new();
        record.insert(
            "attributes".into(),
            json!({"type": soql::OBJECT, "url": format!("/services/data/{version}/sobjects/{}/{}", soql::OBJECT, self.id)}),
        );
        for field in fields {
            let value = match self.field(field) {
                FieldValue::Text(s) => Value::String(s),
                FieldValue::Date(d) => Value::String(d.format("%Y-%m-%d").to_string()),
                FieldValue::Boolean(b) => Value::Bool(b),
                // Salesforce answers currency fields as JSON numbers; the digits are the amount's own.
                FieldValue::Number(n) => {
                    serde_json::from_str(&n.normalize().to_string()).unwrap_or(Value::Null)
                }
                FieldValue::Null => Value::Null,
            };
            record.insert((*field).to_string(), value);
        }
        Value::Object(record)
    }
}

/// Records in one answer of the query resource; the rest wait behind `nextRecordsUrl`.
pub const QUERY_BATCH: usize = 2000;

/// The org: its deals, its login, and the tokens it has issued.
#[derive(Debug)]
pub struct CrmOrg {
    pub credentials: CrmCredentials,
    deals: Mutex<BTreeMap<String, Deal>>,
    tokens: Mutex<HashSet<String>>,
    /// Query locators: the remaining records of a query whose answer was cut at [`QUERY_BATCH`].
    locators: Mutex<HashMap<String, Vec<Value>>>,
    /// Query requests served (token requests not counted).
    pub queries: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CrmOrg {
    pub fn new(credentials: CrmCredentials) -> Arc<CrmOrg> {
        Arc::new(CrmOrg {
            credentials,
            deals: Mutex::new(BTreeMap::new()),
            tokens: Mutex::new(HashSet::new()),
            locators: Mutex::new(HashMap::new()),
            queries: AtomicU64::new(0),
        })
    }

    /// Records an Opportunity (a newer revision replaces the older one).
    pub fn close(&self, opportunity: &Value) -> Result<(), String> {
        let deal = Deal::from_opportunity(opportunity)?;
        lock(&self.deals).insert(deal.id.clone(), deal);
        Ok(())
    }

    /// Every deal the org holds, by Id.
    pub fn deals(&self) -> Vec<Deal> {
        lock(&self.deals).values().cloned().collect()
    }

    fn select(&self, query: &Soql) -> Vec<Deal> {
        let mut rows: Vec<Deal> = lock(&self.deals)
            .values()
            .filter(|d| query.matches(&|f| d.field(f)))
            .cloned()
            .collect();
        if let Some((field, ascending)) = query.order_by {
            rows.sort_by(|a, b| {
                let o = soql::compare(&a.field(field), &b.field(field))
                    .unwrap_or(std::cmp::Ordering::Equal);
                if ascending { o } else { o.reverse() }
            });
        }
        if let Some(limit) = query.limit {
            rows.truncate(limit);
        }
        rows
    }
}

/// The org's API: `POST /services/oauth2/token` (client credentials) and `GET /services/data/vNN.N/query`
/// (with its `nextRecordsUrl` locators), answering as Salesforce does.
pub fn router(org: Arc<CrmOrg>) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/data/{version}/query", get(query))
        .route("/services/data/{version}/query/{locator}", get(more))
        .with_state(org)
}

/// Salesforce's REST error body: an array of `{message, errorCode}`.
fn sf_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code}])),
    )
        .into_response()
}

async fn token(
    State(org): State<Arc<CrmOrg>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"})),
        )
            .into_response();
    }
    if field("client_id") != org.credentials.client_id
        || field("client_secret") != org.credentials.client_secret
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_client", "error_description": "invalid client credentials"})),
        )
            .into_response();
    }
    let token = format!("00Ddev!{}", uuid::Uuid::new_v4().simple());
    lock(&org.tokens).insert(token.clone());
    // The org serves its API where it was reached; a real org names its My Domain here.
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Json(json!({
        "access_token": token,
        "instance_url": format!("http://{host}"),
        "id": format!("http://{host}/id/00Ddev0000000000AAA/005dev0000000000AAA"),
        "token_type": "Bearer",
        "issued_at": chrono::Utc::now().timestamp_millis().to_string(),
    }))
    .into_response()
}

/// Whether the request carries a token this org issued.
fn authorized(org: &CrmOrg, headers: &HeaderMap) -> bool {
    let token = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    lock(&org.tokens).contains(token)
}

fn invalid_session() -> Response {
    sf_error(
        StatusCode::UNAUTHORIZED,
        "INVALID_SESSION_ID",
        "Session expired or invalid",
    )
}

fn known_version(version: &str) -> bool {
    version
        .strip_prefix('v')
        .and_then(|v| v.split_once('.'))
        .is_some_and(|(major, minor)| {
            major.parse::<u32>().is_ok_and(|m| (20..=70).contains(&m)) && minor == "0"
        })
}

async fn query(
    State(org): State<Arc<CrmOrg>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&org, &headers) {
        return invalid_session();
    }
    if !known_version(&version) {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    }
    org.queries.fetch_add(1, Ordering::Relaxed);
    let Some(text) = params.get("q") else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "A query string has to be specified",
        );
    };
    let parsed = match soql::parse(text) {
        Ok(q) => q,
        Err(e) => return sf_error(StatusCode::BAD_REQUEST, e.error_code, &e.message),
    };
    let mut records: Vec<Value> = org
        .select(&parsed)
        .iter()
        .map(|d| d.to_record(&version, &parsed.fields))
        .collect();
    let total = records.len();
    let rest = records.split_off(total.min(QUERY_BATCH));
    answer(&org, &version, total, records, rest)
}

/// One batch; what is left is kept behind a locator, as Salesforce's `nextRecordsUrl` does.
fn answer(
    org: &CrmOrg,
    version: &str,
    total: usize,
    records: Vec<Value>,
    rest: Vec<Value>,
) -> Response {
    if rest.is_empty() {
        return Json(json!({"totalSize": total, "done": true, "records": records})).into_response();
    }
    let served = total - rest.len();
    let locator = format!("01gdev{}-{served}", uuid::Uuid::new_v4().simple());
    lock(&org.locators).insert(locator.clone(), rest);
    Json(json!({
        "totalSize": total,
        "done": false,
        "nextRecordsUrl": format!("/services/data/{version}/query/{locator}"),
        "records": records,
    }))
    .into_response()
}

async fn more(
    State(org): State<Arc<CrmOrg>>,
    Path((version, locator)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&org, &headers) {
        return invalid_session();
    }
    org.queries.fetch_add(1, Ordering::Relaxed);
    let Some(mut remaining) = lock(&org.locators).remove(&locator) else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        );
    };
    let served: usize = locator
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let total = served + remaining.len();
    let rest = remaining.split_off(remaining.len().min(QUERY_BATCH));
    answer(&org, &version, total, remaining, rest)
}

/// Posts signed webhooks to a worker.
pub struct CrmStandIn {
    pub target: String,
    secret: String,
    http: reqwest::Client,
    /// Every Opportunity the worker acknowledged so far (its Id).
    pub closed: Mutex<Vec<String>>,
    pub webhook_attempts: std::sync::atomic::AtomicU64,
    /// The org the deals live in, whether or not their webhook got through: what the audit reads.
    pub org: Arc<CrmOrg>,
}

impl CrmStandIn {
    /// A stand-in whose org accepts freshly generated credentials (`meshline sim crm`, which serves no API).
    pub fn new(target: impl Into<String>, secret: impl Into<String>) -> CrmStandIn {
        CrmStandIn::with_org(target, secret, CrmOrg::new(CrmCredentials::generate()))
    }

    /// A stand-in that records what it closes in `org` (served by [`router`]).
    pub fn with_org(
        target: impl Into<String>,
        secret: impl Into<String>,
        org: Arc<CrmOrg>,
    ) -> CrmStandIn {
        CrmStandIn {
            target: target.into(),
            secret: secret.into(),
            org,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            closed: Mutex::new(Vec::new()),
            webhook_attempts: Default::default(),
        }
    }

    /// Sends a batch and retries (as Salesforce outbound messages do) until the worker answers 2xx, or gives up
    /// after `deadline`.
    pub async fn send(&self, batch: &[Value], deadline: Duration) -> Result<(), String> {
        let body = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
        // The deals are closed in the CRM before any webhook is sent: a delivery that never arrives is exactly
        // what the audit has to find.
        for record in batch {
            self.org.close(record)?;
        }
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            self.webhook_attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = chrono::Utc::now().timestamp();
            let result = self
                .http
                .post(&self.target)
                .header("content-type", "application/json")
                .header(
                    "x-meshline-signature",
                    meshline_signature(&self.secret, t, &body),
                )
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => {
                    let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
                    for record in batch {
                        if let Some(id) = record["Id"].as_str()
                            && !closed.iter().any(|c| c == id)
                        {
                            closed.push(id.to_string());
                        }
                    }
                    return Ok(());
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status();
                    return Err(format!(
                        "the worker refused the webhook: HTTP {status}: {}",
                        r.text().await.unwrap_or_default()
                    ));
                }
                _ => {}
            }
            if started.elapsed() > deadline {
                return Err(format!(
                    "no acknowledgement from {} within {deadline:?}",
                    self.target
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}
