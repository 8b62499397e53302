//! The reconciliation audit's read-only queries against stand-ins that check requests as the real APIs do
//! (`tests/support/audit_vendors.rs`) and, for the PostgreSQL sink's table, a real server.

mod support;

#[path = "support/sink_mock.rs"]
mod sink_mock;

#[path = "support/audit_vendors.rs"]
mod audit_vendors;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use audit_vendors::*;
use chrono::{DateTime, TimeZone, Utc};
use meshline::api::SyncFlowSpec;
use meshline::connectors::queries::{
    AuditWindow, AuditedOrder, OrderQuery, QueryError, Settings, crm_query, erp_query,
};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sink_mock::secret;

fn at(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
}

/// November 10 to 16.
fn window() -> AuditWindow {
    AuditWindow {
        from: at(10, 0),
        to: at(16, 23),
    }
}

/// A flow reading `source` and writing `sink`, with the audit allowed 1,000 requests/s so paging many pages
/// stays fast.
fn flow(source: Value, sink: Value, audit: Value) -> SyncFlowSpec {
    let mut audit = audit;
    if audit.get("maxRequestsPerSecond").is_none() {
        audit["maxRequestsPerSecond"] = json!(1000);
    }
    serde_json::from_value(json!({
        "contract": {"name": "orders"},
        "source": source,
        "sink": sink,
        "audit": audit,
    }))
    .expect("a valid SyncFlow spec")
}

fn any_sink() -> Value {
    json!({"system": "http", "baseUrl": "http://127.0.0.1:9", "credentialsSecretRef": {"name": "s"}})
}

fn any_source() -> Value {
    json!({"system": "generic", "object": "deal", "signature": "hmac-sha256", "credentialsSecretRef": {"name": "s"}})
}

/// Every page from `cursor` on, with the cursors seen.
async fn read_all(
    query: &dyn OrderQuery,
    mut cursor: Option<String>,
) -> (Vec<AuditedOrder>, usize) {
    let mut orders = Vec::new();
    let mut pages = 0;
    loop {
        let page = query
            .page(&window(), cursor.as_deref())
            .await
            .unwrap_or_else(|e| panic!("page {pages}: {e}"));
        pages += 1;
        orders.extend(page.orders);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return (orders, pages),
        }
        assert!(pages < 1000, "paging does not end");
    }
}

fn ids(orders: &[AuditedOrder]) -> BTreeSet<String> {
    orders.iter().map(|o| o.external_id.clone()).collect()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// `n` closed-won deals in the window (ids from `id`), plus lost deals and won deals outside it, which must
/// not be read.
fn crm_rows(n: usize, id: impl Fn(usize) -> String) -> (Vec<Row>, BTreeSet<String>) {
    let mut rows = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..n {
        rows.push(Row {
            id: id(i),
            won: true,
            date: at(10 + (i % 7) as u32, (i % 24) as u32),
            amount: json!(100 + i),
            currency: Some(if i % 3 == 0 { "EUR" } else { "USD" }.into()),
            external_id: None,
        });
        expected.insert(id(i));
    }
    for j in n..n + 50 {
        let (won, date) = if j % 2 == 0 {
            (false, at(12, 0))
        } else {
            (true, at(3, 0))
        };
        rows.push(Row {
            id: id(j),
            won,
            date,
            amount: json!(1),
            currency: Some("USD".into()),
            external_id: None,
        });
    }
    (rows, expected)
}

fn assert_no_violations(vendor: &Vendor) {
    assert!(
        vendor.violations().is_empty(),
        "requests the real API would refuse: {:?}",
        vendor.violations()
    );
}

// ---------------------------------------------------------------------------------------------- Salesforce

fn salesforce_flow(vendor: &Vendor, audit: Value) -> SyncFlowSpec {
    flow(
        json!({"system": "salesforce", "mode": "poll", "object": "Opportunity", "baseUrl": vendor.url(),
               "credentialsSecretRef": {"name": "sf"}}),
        any_sink(),
        audit,
    )
}

fn salesforce_secret() -> (tempfile::TempDir, meshline::connectors::Credentials) {
    secret(&[
        ("clientId", SF_CLIENT_ID),
        ("clientSecret", SF_CLIENT_SECRET),
    ])
}

#[tokio::test]
async fn salesforce_pages_by_id_neither_overlap_nor_skip_and_survive_a_restart() {
    let (rows, expected) = crm_rows(4500, salesforce_id);
    let vendor = salesforce(rows).await;
    let (_dir, creds) = salesforce_secret();
    let spec = salesforce_flow(&vendor, json!({}));
    let query = crm_query(&spec, &creds).expect("a Salesforce query");
    assert_eq!(query.system(), "salesforce");

    let first = query.page(&window(), None).await.expect("first page");
    assert_eq!(first.orders.len(), 2000);
    let cursor = first.next.clone().expect("more pages");
    // A new process (a second query object, a new login) continues from the stored cursor.
    let restarted = crm_query(&spec, &creds).expect("a Salesforce query");
    let (rest, pages) = read_all(restarted.as_ref(), Some(cursor)).await;
    assert_eq!(pages, 2);
    let mut all = first.orders.clone();
    all.extend(rest);
    assert_eq!(all.len(), 4500, "no deal read twice");
    assert_eq!(
        ids(&all),
        expected,
        "exactly the closed-won deals in the window"
    );
    let eur = all
        .iter()
        .find(|o| o.external_id == salesforce_id(3))
        .unwrap();
    assert_eq!((eur.currency.as_str(), eur.amount), ("EUR", dec("103")));
    assert_no_violations(&vendor);
}

#[tokio::test]
async fn salesforce_query_carries_the_flow_filter_and_a_single_currency_org_uses_the_default() {
    let (rows, _) = crm_rows(3, salesforce_id);
    let vendor = salesforce(rows).await;
    vendor.single_currency.store(true, Ordering::SeqCst);
    let (_dir, creds) = salesforce_secret();
    let mut spec = salesforce_flow(&vendor, json!({"defaultCurrency": "CHF"}));
    spec.source.filter = Some("Type = 'New Business'".into());
    let query = crm_query(&spec, &creds).unwrap();
    let (orders, _) = read_all(query.as_ref(), None).await;
    assert_eq!(orders.len(), 3);
    assert!(orders.iter().all(|o| o.currency == "CHF"), "{orders:?}");
    let seen = vendor.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|q| q.contains(" AND (Type = 'New Business') ")),
        "{seen:?}"
    );
    assert_no_violations(&vendor);
}

#[tokio::test]
async fn salesforce_failures_are_classified() {
    let (rows, _) = crm_rows(3, salesforce_id);
    let vendor = salesforce(rows).await;
    let (_dir, creds) = salesforce_secret();
    let query = crm_query(&salesforce_flow(&vendor, json!({})), &creds).unwrap();

    vendor.script((429, vec![("retry-after", "7".into())], "slow down".into()));
    match query.page(&window(), None).await {
        Err(QueryError::RateLimited { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    vendor.script((
        403,
        vec![],
        r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#
            .into(),
    ));
    assert!(matches!(
        query.page(&window(), None).await,
        Err(QueryError::RateLimited { .. })
    ));
    vendor.script((503, vec![], "maintenance".into()));
    assert!(matches!(
        query.page(&window(), None).await,
        Err(QueryError::Unavailable { .. })
    ));
    vendor.script((
        200,
        vec![("content-type", "application/json".into())],
        json!({"done": true, "records": [
            {"Id": salesforce_id(1), "Amount": 5, "CurrencyIsoCode": "USD"},
            {"Id": salesforce_id(2), "Amount": {"oops": 1}, "CurrencyIsoCode": "USD"},
        ]})
        .to_string(),
    ));
    let err = query.page(&window(), None).await.unwrap_err();
    assert!(
        matches!(&err, QueryError::Malformed { message, .. } if message.starts_with("records[1].Amount: not a decimal")),
        "{err}"
    );
    assert!(matches!(
        query.page(&window(), Some("x' OR Name != '")).await,
        Err(QueryError::Malformed { .. })
    ));
    // A revoked app: one new token is tried, then the refusal stands.
    vendor.revoked.store(true, Ordering::SeqCst);
    assert!(matches!(
        query.page(&window(), None).await,
        Err(QueryError::Refused { .. })
    ));
    assert_no_violations(&vendor);
}

// ------------------------------------------------------------------------------------------------- HubSpot

fn hubspot_flow(vendor: &Vendor) -> SyncFlowSpec {
    flow(
        json!({"system": "hubspot", "object": "deals", "baseUrl": vendor.url(), "signature": "hubspot-v3",
               "credentialsSecretRef": {"name": "hs"}}),
        any_sink(),
        json!({}),
    )
}

#[tokio::test]
async fn hubspot_pages_by_object_id_past_the_search_cap_and_survive_a_restart() {
    let (rows, expected) = crm_rows(4500, |i| (1000 + i * 3).to_string());
    let vendor = hubspot(rows).await;
    let (_dir, creds) = secret(&[("accessToken", HUBSPOT_TOKEN), ("clientSecret", "x")]);
    let spec = hubspot_flow(&vendor);
    let query = crm_query(&spec, &creds).unwrap();
    let first = query.page(&window(), None).await.unwrap();
    assert_eq!(first.orders.len(), 200);
    let restarted = crm_query(&spec, &creds).unwrap();
    let (rest, pages) = read_all(restarted.as_ref(), first.next.clone()).await;
    assert_eq!(pages, 22);
    let mut all = first.orders;
    all.extend(rest);
    assert_eq!(all.len(), 4500);
    assert_eq!(ids(&all), expected);
    assert_no_violations(&vendor);
}

#[tokio::test]
async fn hubspot_money_is_exact_and_an_empty_currency_is_the_default() {
    let deal = |id: &str, amount: Value, currency: Option<&str>| Row {
        id: id.into(),
        won: true,
        date: at(11, 9),
        amount,
        currency: currency.map(str::to_string),
        external_id: None,
    };
    let vendor = hubspot(vec![
        deal("1", json!("0.1"), Some("EUR")),
        deal("2", json!("0.2"), Some("EUR")),
        deal("3", json!("12345678901234.56"), Some("USD")),
        deal("4", Value::Null, Some("")),
    ])
    .await;
    let (_dir, creds) = secret(&[("accessToken", HUBSPOT_TOKEN)]);
    let query = crm_query(&hubspot_flow(&vendor), &creds).unwrap();
    let (orders, _) = read_all(query.as_ref(), None).await;
    let eur: Decimal = orders
        .iter()
        .filter(|o| o.currency == "EUR")
        .map(|o| o.amount)
        .sum();
    assert_eq!(eur, dec("0.3"));
    assert_eq!(orders[2].amount, dec("12345678901234.56"));
    assert_eq!(
        (orders[3].currency.as_str(), orders[3].amount),
        ("USD", Decimal::ZERO),
        "a null amount counts as 0, an empty currency is the default"
    );
    assert_no_violations(&vendor);
}

#[tokio::test]
async fn hubspot_failures_are_classified() {
    let vendor = hubspot(Vec::new()).await;
    let (_dir, creds) = secret(&[("accessToken", HUBSPOT_TOKEN)]);
    let query = crm_query(&hubspot_flow(&vendor), &creds).unwrap();
    vendor.script((
        429,
        vec![("retry-after", "1".into())],
        json!({"status": "error", "message": "You have reached your secondly limit.", "errorType": "RATE_LIMIT", "policyName": "SECONDLY"}).to_string(),
    ));
    match query.page(&window(), None).await {
        Err(QueryError::RateLimited {
            retry_after,
            message,
            ..
        }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
            assert!(message.contains("SECONDLY"), "{message}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    vendor.script((502, vec![], "bad gateway".into()));
    assert!(matches!(
        query.page(&window(), None).await,
        Err(QueryError::Unavailable { .. })
    ));
    vendor.script((
        200,
        vec![],
        json!({"results": [{"id": "5", "properties": {"amount": "1,000.00"}}]}).to_string(),
    ));
    let err = query.page(&window(), None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("results[0].properties.amount: not a decimal"),
        "{err}"
    );
    let (_dir2, wrong) = secret(&[("accessToken", "pat-revoked")]);
    let refused = crm_query(&hubspot_flow(&vendor), &wrong).unwrap();
    assert!(matches!(
        refused.page(&window(), None).await,
        Err(QueryError::Refused { .. })
    ));
    assert_no_violations(&vendor);
}

// ------------------------------------------------------------------------------------------------ NetSuite

fn erp_rows(n: usize) -> (Vec<Row>, BTreeSet<String>) {
    let mut rows = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..n {
        let external = salesforce_id(i);
        rows.push(Row {
            id: (500 + i * 2).to_string(),
            won: true,
            date: at(10 + (i % 7) as u32, 12),
            amount: json!(10 + i),
            currency: Some("USD".into()),
            external_id: Some(external.clone()),
        });
        expected.insert(external);
    }
    rows.push(Row {
        id: "99999".into(),
        won: true,
        date: at(2, 12),
        amount: json!(1),
        currency: Some("USD".into()),
        external_id: Some("outside".into()),
    });
    (rows, expected)
}

fn netsuite_flow(vendor: &Vendor) -> SyncFlowSpec {
    flow(
        any_source(),
        json!({"system": "netsuite", "baseUrl": vendor.url(), "recordType": "salesOrder",
               "credentialsSecretRef": {"name": "ns"}}),
        json!({}),
    )
}

fn netsuite_secret() -> (tempfile::TempDir, meshline::connectors::Credentials) {
    secret(&[
        ("accountId", NS_ACCOUNT),
        ("consumerKey", NS_CONSUMER_KEY),
        ("consumerSecret", NS_CONSUMER_SECRET),
        ("tokenId", NS_TOKEN_ID),
        ("tokenSecret", NS_TOKEN_SECRET),
    ])
}

#[tokio::test]
async fn netsuite_pages_suiteql_by_internal_id_and_survive_a_restart() {
    let (mut rows, mut expected) = erp_rows(4500);
    // An order entered by hand in NetSuite carries no external id.
    rows.push(Row {
        id: "20001".into(),
        won: true,
        date: at(12, 8),
        amount: json!("0.20"),
        currency: Some("EUR".into()),
        external_id: None,
    });
    expected.insert("netsuite:20001".into());
    let vendor = netsuite(rows).await;
    let (_dir, creds) = netsuite_secret();
    let spec = netsuite_flow(&vendor);
    let query = erp_query(&spec, &creds).unwrap();
    let first = query.page(&window(), None).await.unwrap();
    assert_eq!(first.orders.len(), 1000);
    let restarted = erp_query(&spec, &creds).unwrap();
    let (rest, pages) = read_all(restarted.as_ref(), first.next.clone()).await;
    assert_eq!(pages, 4);
    let mut all = first.orders;
    all.extend(rest);
    assert_eq!(all.len(), 4501);
    assert_eq!(ids(&all), expected);
    let manual = all.last().unwrap();
    assert_eq!(
        (manual.currency.as_str(), manual.amount),
        ("EUR", dec("0.20"))
    );
    assert_no_violations(&vendor);
}

#[tokio::test]
async fn netsuite_failures_are_classified() {
    let vendor = netsuite(Vec::new()).await;
    let (_dir, creds) = netsuite_secret();
    let query = erp_query(&netsuite_flow(&vendor), &creds).unwrap();
    vendor.script((
        429,
        vec![("retry-after", "3".into())],
        json!({"o:errorDetails": [{"detail": "Concurrent request limit exceeded.", "o:errorCode": "CONCURRENCY_LIMIT_EXCEEDED"}]}).to_string(),
    ));
    match query.page(&window(), None).await {
        Err(QueryError::RateLimited {
            retry_after,
            message,
            ..
        }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(3)));
            assert!(message.contains("CONCURRENCY_LIMIT_EXCEEDED"), "{message}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    vendor.script((500, vec![], "{}".into()));
    assert!(matches!(
        query.page(&window(), None).await,
        Err(QueryError::Unavailable { .. })
    ));
    vendor.script((
        200,
        vec![],
        json!({"hasMore": false, "items": [{"id": "7", "externalid": "006A", "amount": "12", "currency": "US Dollar"}]}).to_string(),
    ));
    let err = query.page(&window(), None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("items[0].currency: not an ISO 4217 code"),
        "{err}"
    );
    let (dir2, wrong) = netsuite_secret();
    std::fs::write(dir2.path().join("tokenSecret"), "wrong").unwrap();
    let refused = erp_query(&netsuite_flow(&vendor), &wrong).unwrap();
    assert!(matches!(
        refused.page(&window(), None).await,
        Err(QueryError::Refused { .. })
    ));
    assert_no_violations(&vendor);
}

// ---------------------------------------------------------------------------------------------------- Odoo

fn odoo_flow(vendor: &Vendor) -> SyncFlowSpec {
    flow(
        any_source(),
        json!({"system": "odoo", "baseUrl": vendor.url(), "database": ODOO_DB,
               "credentialsSecretRef": {"name": "odoo"}}),
        json!({}),
    )
}

#[tokio::test]
async fn odoo_reads_only_through_search_read_by_id_and_survives_a_restart() {
    let (mut rows, mut expected) = erp_rows(1200);
    rows.push(Row {
        id: "90000".into(),
        won: true,
        date: at(15, 1),
        amount: json!(0.1),
        currency: Some("EUR".into()),
        external_id: None,
    });
    rows.push(Row {
        id: "90001".into(),
        won: true,
        date: at(15, 2),
        amount: json!(0.2),
        currency: Some("EUR".into()),
        external_id: Some("006B".into()),
    });
    expected.insert("odoo:sale.order/90000".into());
    expected.insert("006B".into());
    let vendor = odoo(rows).await;
    let (_dir, creds) = secret(&[("login", ODOO_LOGIN), ("apiKey", ODOO_KEY)]);
    let spec = odoo_flow(&vendor);
    let query = erp_query(&spec, &creds).unwrap();
    let first = query.page(&window(), None).await.unwrap();
    assert_eq!(first.orders.len(), 500);
    let restarted = erp_query(&spec, &creds).unwrap();
    let (rest, pages) = read_all(restarted.as_ref(), first.next.clone()).await;
    assert_eq!(pages, 2);
    let mut all = first.orders;
    all.extend(rest);
    assert_eq!(all.len(), 1202);
    assert_eq!(ids(&all), expected);
    let eur: Decimal = all
        .iter()
        .filter(|o| o.currency == "EUR")
        .map(|o| o.amount)
        .sum();
    assert_eq!(eur, dec("0.3"), "0.1 + 0.2 is exactly 0.3");
    assert_no_violations(&vendor);
}

#[tokio::test]
async fn odoo_failures_are_classified() {
    let vendor = odoo(Vec::new()).await;
    let (_dir, creds) = secret(&[("login", ODOO_LOGIN), ("apiKey", ODOO_KEY)]);
    let query = erp_query(&odoo_flow(&vendor), &creds).unwrap();
    vendor.script((429, vec![("retry-after", "2".into())], "busy".into()));
    match query.page(&window(), None).await {
        Err(QueryError::RateLimited { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(2)))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    vendor.script((503, vec![], "down".into()));
    assert!(matches!(
        query.page(&window(), None).await,
        Err(QueryError::Unavailable { .. })
    ));
    vendor.script((
        200,
        vec![],
        json!({"jsonrpc": "2.0", "id": 1, "result": [{"id": 3, "client_order_ref": "006A", "amount_total": 5, "currency_id": [1]}]}).to_string(),
    ));
    let err = query.page(&window(), None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("result[0].currency_id: not a [id, name] pair"),
        "{err}"
    );
    let (_dir2, wrong) = secret(&[("login", ODOO_LOGIN), ("apiKey", "revoked")]);
    let refused = erp_query(&odoo_flow(&vendor), &wrong).unwrap();
    assert!(matches!(
        refused.page(&window(), None).await,
        Err(QueryError::Refused { .. })
    ));
    assert_no_violations(&vendor);
}

// ----------------------------------------------------------------------------------------------- PostgreSQL

#[tokio::test]
async fn postgres_reads_the_sink_table_by_key_in_a_read_only_transaction() {
    let pg = support::postgres::PgServer::start_with(&[("log_statement", "all")]);
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    // The sink's own table, filled through the sink.
    let sink =
        meshline::connectors::sinks::postgres::PostgresSink::connect_lazy(&pg.url(), "orders")
            .unwrap();
    use meshline::connectors::{Delivery, Sink};
    let mut expected = BTreeSet::new();
    let payloads: Vec<(String, Value)> = (0..2500)
        .map(|i| {
            let amount: Value = match i {
                0 => serde_json::from_str("0.1").unwrap(),
                1 => serde_json::from_str("0.2").unwrap(),
                _ => json!(i),
            };
            (
                salesforce_id(i),
                json!({"amount": amount, "currency": if i < 2 { "EUR" } else { "USD" }, "note": "x"}),
            )
        })
        .collect();
    for chunk in payloads.chunks(500) {
        let deliveries: Vec<Delivery> = chunk
            .iter()
            .map(|(id, p)| Delivery {
                external_id: id,
                payload: p,
                correlation_id: "c",
                attempt: 1,
            })
            .collect();
        sink.deliver_batch(&deliveries).await.expect("delivered");
        expected.extend(chunk.iter().map(|(id, _)| id.clone()));
    }
    // One row outside the window, one with no currency (the default applies).
    sqlx::query("UPDATE orders SET created_at = '2026-10-01T00:00:00Z' WHERE external_id = $1")
        .bind(salesforce_id(2499))
        .execute(&pool)
        .await
        .unwrap();
    expected.remove(&salesforce_id(2499));
    sqlx::query("UPDATE orders SET payload = payload - 'currency' WHERE external_id = $1")
        .bind(salesforce_id(5))
        .execute(&pool)
        .await
        .unwrap();

    let url = pg.url();
    let (_dir, creds) = secret(&[("url", url.as_str())]);
    let spec = flow(
        any_source(),
        json!({"system": "postgres", "table": "orders", "credentialsSecretRef": {"name": "pg"}}),
        json!({"defaultCurrency": "GBP"}),
    );
    // The rows were written just now: a window around today.
    let now = Utc::now();
    let window = AuditWindow {
        from: now - chrono::Duration::days(1),
        to: now + chrono::Duration::days(1),
    };
    let query = erp_query(&spec, &creds).unwrap();
    let first = query.page(&window, None).await.unwrap();
    assert_eq!(first.orders.len(), 1000);
    let restarted = erp_query(&spec, &creds).unwrap();
    let mut all = first.orders;
    let mut cursor = first.next;
    while let Some(c) = cursor {
        let page = restarted.page(&window, Some(&c)).await.unwrap();
        all.extend(page.orders);
        cursor = page.next;
    }
    assert_eq!(all.len(), 2499);
    assert_eq!(ids(&all), expected);
    let eur: Decimal = all
        .iter()
        .filter(|o| o.currency == "EUR")
        .map(|o| o.amount)
        .sum();
    assert_eq!(eur, dec("0.3"));
    let five = all
        .iter()
        .find(|o| o.external_id == salesforce_id(5))
        .unwrap();
    assert_eq!(five.currency, "GBP");

    // The server's statement log (log_statement = all): every audit SELECT ran in a transaction that had
    // been made read-only first, so the server itself would have refused a write in it.
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    let mut read_only = false;
    let mut checked = 0;
    for line in log.lines() {
        if line.contains("SET TRANSACTION READ ONLY") {
            read_only = true;
        } else if line.contains("BEGIN") || line.contains("ROLLBACK") || line.contains("COMMIT") {
            read_only = false;
        } else if line.contains("SELECT external_id AS key") {
            assert!(
                read_only,
                "an audit SELECT outside a read-only transaction: {line}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "three pages read, each read-only");
}

// ------------------------------------------------------------------------------------------------- config

#[test]
fn sides_without_a_query_api_are_config_errors_naming_the_field() {
    let (_dir, creds) = secret(&[("webhookSecret", "x")]);
    let spec = flow(any_source(), any_sink(), json!({}));
    let crm = crm_query(&spec, &creds)
        .err()
        .expect("no query for a generic source");
    assert_eq!(crm.path, "spec.source.system");
    assert!(
        crm.to_string()
            .starts_with("spec.source.system: a generic webhook source"),
        "{crm}"
    );
    let erp = erp_query(&spec, &creds)
        .err()
        .expect("no query for an http sink");
    assert_eq!(
        erp.to_string(),
        "spec.sink.system: an http sink has no query API the audit can read"
    );
}

#[test]
fn missing_credentials_and_bad_fields_name_their_path() {
    let (_dir, empty) = secret(&[]);
    let spec = flow(
        json!({"system": "hubspot", "object": "deals", "signature": "hubspot-v3", "credentialsSecretRef": {"name": "hs"}}),
        json!({"system": "odoo", "baseUrl": "http://127.0.0.1:9", "database": "erp", "credentialsSecretRef": {"name": "o"}}),
        json!({}),
    );
    let crm = crm_query(&spec, &empty).err().unwrap();
    assert_eq!(crm.path, "spec.source.credentialsSecretRef");
    assert!(crm.reason.contains("accessToken"), "{crm}");
    let erp = erp_query(&spec, &empty).err().unwrap();
    assert_eq!(erp.path, "spec.sink.credentialsSecretRef");
    assert!(erp.reason.contains("login"), "{erp}");

    let mut bad = spec.clone();
    bad.audit.as_mut().unwrap().erp_amount_field = Some("amount_total; --".into());
    let err = erp_query(&bad, &empty).err().unwrap();
    assert_eq!(err.path, "spec.audit.erpAmountField");
}

#[test]
fn the_pace_defaults_to_the_flow_delivery_rate_then_five() {
    let mut spec = flow(any_source(), any_sink(), json!({}));
    spec.audit = None;
    assert_eq!(Settings::of(&spec).unwrap().requests_per_second, 5);
    spec.delivery.rate_limit = 20;
    assert_eq!(Settings::of(&spec).unwrap().requests_per_second, 20);
    spec.audit = Some(Default::default());
    spec.audit.as_mut().unwrap().max_requests_per_second = Some(2);
    assert_eq!(Settings::of(&spec).unwrap().requests_per_second, 2);
    assert_eq!(Settings::of(&spec).unwrap().default_currency, "USD");
}
