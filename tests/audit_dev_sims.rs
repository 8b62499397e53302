//! `meshline dev`'s stand-ins answer the reconciliation audit's reads: the real Salesforce and NetSuite query
//! clients (built by `crm_query`/`erp_query` from the dev flow and the dev Secrets) log in to the CRM and ERP
//! stand-ins and read back exactly the deals closed and the orders delivered, page by page, inside the window
//! only; a query the stand-in would not run gets Salesforce's (or NetSuite's) own refusal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, Utc};
use meshline::api::FlowAuditSpec;
use meshline::connectors::Credentials;
use meshline::connectors::queries::{
    AuditWindow, AuditedOrder, OrderQuery, QueryError, crm_query, erp_query,
};
use meshline::dev::{self, DevOptions};
use meshline::sim::crm::{self, CrmCredentials, CrmOrg, DealKind, opportunity};
use meshline::sim::erp::{self, ErpCredentials, ErpState};
use meshline::worker::RenderedFlow;
use rust_decimal::Decimal;
use serde_json::{Value, json};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite")
}

/// From midnight UTC `days_back` days ago to now.
fn window(days_back: u64) -> AuditWindow {
    let today = Utc::now().date_naive();
    AuditWindow {
        from: midnight(today - Days::new(days_back)),
        to: Utc::now(),
    }
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    date.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

/// Every page of a side, in order; and how many pages it took.
async fn read_all(query: &dyn OrderQuery, window: &AuditWindow) -> (Vec<AuditedOrder>, usize) {
    let mut orders = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = query.page(window, cursor.as_deref()).await.unwrap();
        pages += 1;
        orders.extend(page.orders);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return (orders, pages),
        }
        assert!(pages < 100, "{} never ends its pages", query.system());
    }
}

/// Id → (currency, amount), asserting no id came twice (pages neither overlap nor repeat).
fn by_id(orders: &[AuditedOrder], strip: &str) -> BTreeMap<String, (String, Decimal)> {
    let mut out = BTreeMap::new();
    for o in orders {
        let id = o
            .external_id
            .strip_prefix(strip)
            .unwrap_or(&o.external_id)
            .to_string();
        let previous = out.insert(id.clone(), (o.currency.clone(), o.amount));
        assert!(previous.is_none(), "{id} read twice");
    }
    out
}

fn expected(deals: &[Value], from: NaiveDate) -> BTreeMap<String, (String, Decimal)> {
    deals
        .iter()
        .filter(|d| {
            d["CloseDate"]
                .as_str()
                .unwrap()
                .parse::<NaiveDate>()
                .unwrap()
                >= from
        })
        .map(|d| {
            (
                d["Id"].as_str().unwrap().to_string(),
                (
                    d["CurrencyIsoCode"].as_str().unwrap().to_string(),
                    d["Amount"].as_str().unwrap().parse().unwrap(),
                ),
            )
        })
        .collect()
}

fn pricebook() -> Vec<(String, Decimal)> {
    erp::example_pricebook()
        .into_iter()
        .map(|(sku, (price, _))| (sku, price))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_run_deals_and_their_orders_read_back_exactly_through_the_audit_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let env = dev::start(&DevOptions {
        dir: example(),
        state: Some(tmp.path().join("state")),
        fresh: true,
        port: 0,
        ops_port: 0,
    })
    .await
    .unwrap();
    let pricebook = pricebook();
    let deals: Vec<Value> = (0..300)
        .map(|n| opportunity(n, DealKind::Normal, &pricebook))
        .collect();
    for batch in deals.chunks(50) {
        env.crm.send(batch, Duration::from_secs(300)).await.unwrap();
    }
    // Wait on the ERP's state; the ceiling only keeps a broken pipeline from hanging the suite.
    let mut polls = 0;
    while env.erp.order_count() < deals.len() {
        polls += 1;
        assert!(
            polls < 30_000,
            "only {} of {} orders arrived",
            env.erp.order_count(),
            deals.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let spec = &env.rendered.flow.spec;
    assert_eq!(
        spec.source.base_url.as_deref(),
        Some(format!("http://{}", env.crm_addr).as_str())
    );
    let crm = crm_query(spec, &env.source_credentials()).unwrap();
    let erp = erp_query(spec, &env.sink_credentials()).unwrap();

    // Deals close today and on the two days before: a week's window holds them all, on both sides.
    let week = window(7);
    let all = expected(&deals, week.from.date_naive());
    assert_eq!(all.len(), 300);
    let currencies: std::collections::BTreeSet<&str> =
        all.values().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        currencies.into_iter().collect::<Vec<_>>(),
        ["EUR", "GBP", "USD"]
    );
    let (deals_read, _) = read_all(crm.as_ref(), &week).await;
    assert_eq!(by_id(&deals_read, ""), all);
    let (orders_read, _) = read_all(erp.as_ref(), &week).await;
    // The contract's mapping writes the deal's Id as `SF-<Id>` into the order's external id.
    assert_eq!(by_id(&orders_read, "SF-"), all);

    // From yesterday: the deals closed two days ago, and their orders, are outside.
    let recent = window(1);
    let inside = expected(&deals, recent.from.date_naive());
    assert!(inside.len() < all.len() && !inside.is_empty());
    assert_eq!(by_id(&read_all(crm.as_ref(), &recent).await.0, ""), inside);
    assert_eq!(
        by_id(&read_all(erp.as_ref(), &recent).await.0, "SF-"),
        inside
    );

    // A window before any deal closed reads nothing on either side.
    let past = AuditWindow {
        from: midnight(NaiveDate::from_ymd_opt(2020, 1, 1).unwrap()),
        to: midnight(NaiveDate::from_ymd_opt(2020, 1, 31).unwrap()),
    };
    assert!(read_all(crm.as_ref(), &past).await.0.is_empty());
    assert!(read_all(erp.as_ref(), &past).await.0.is_empty());
    env.shutdown().await;
}

/// The stand-ins served on their own, with the example flow pointed at them and their Secrets.
struct Sims {
    org: Arc<CrmOrg>,
    erp: Arc<ErpState>,
    flow: meshline::api::SyncFlowSpec,
    crm_credentials: Credentials,
    erp_credentials: Credentials,
    crm_url: String,
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn sims() -> Sims {
    let crm_creds = CrmCredentials::generate();
    let erp_creds = ErpCredentials::generate();
    let org = CrmOrg::new(crm_creds.clone());
    let erp = ErpState::new(erp_creds.clone(), erp::example_pricebook());
    let crm_url = serve(crm::router(org.clone())).await;
    let erp_url = serve(erp::router(erp.clone())).await;
    let mut flow = RenderedFlow::from_manifests(&example()).unwrap().flow.spec;
    flow.source.base_url = Some(crm_url.clone());
    flow.sink.base_url = Some(erp_url);
    // The audit paces itself at the flow's rate; these tests read a few pages.
    flow.delivery.rate_limit = 50;
    let secret = |files: Vec<(&str, String)>| {
        Credentials::from_secret(
            "test",
            files.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        )
    };
    Sims {
        org,
        erp,
        flow,
        crm_credentials: secret(crm_creds.secret_files()),
        erp_credentials: secret(erp_creds.secret_files()),
        crm_url,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_deals_and_orders_page_by_keyset_without_overlap_or_gap() {
    let s = sims().await;
    let today = Utc::now().date_naive();
    let currencies = ["USD", "EUR", "GBP"];
    let mut deals = Vec::new();
    for n in 0..4_500usize {
        let deal = json!({
            "Id": format!("006Dn{n:010}AAA"),
            "Name": format!("Deal {n}"),
            // Every seventh deal is lost: not an order, never read.
            "StageName": if n % 7 == 3 { "Closed Lost" } else { "Closed Won" },
            "CloseDate": (today - Days::new((n % 10) as u64)).to_string(),
            "CurrencyIsoCode": currencies[n % 3],
            "Amount": format!("{}.{:02}", 100 + n, n % 100),
        });
        s.org.close(&deal).unwrap();
        deals.push(deal);
    }
    let won: Vec<Value> = deals
        .iter()
        .filter(|d| d["StageName"] == "Closed Won")
        .cloned()
        .collect();
    // 2,500 orders, each a line of 19.99 × quantity less a discount percent.
    let mut orders = BTreeMap::new();
    for n in 0..2_500usize {
        let quantity = 1 + n % 7;
        let discount = Decimal::from((n % 4) * 5);
        let body = json!({
            "externalId": format!("SF-{n}"),
            "tranDate": (today - Days::new((n % 10) as u64)).to_string(),
            "currency": {"refName": currencies[n % 3]},
            "discountRate": discount.to_string(),
            "item": {"items": [{"item": {"externalId": "SKU-1003"}, "quantity": quantity, "rate": "19.99"}]},
        });
        s.erp.record_order(&format!("SF-{n}"), body).unwrap();
        let total = (Decimal::new(1999, 2)
            * Decimal::from(quantity)
            * (Decimal::ONE - discount / Decimal::from(100)))
        .round_dp(2);
        orders.insert(
            format!("SF-{n}"),
            (
                currencies[n % 3].to_string(),
                total,
                today - Days::new((n % 10) as u64),
            ),
        );
    }
    let crm = crm_query(&s.flow, &s.crm_credentials).unwrap();
    let erp = erp_query(&s.flow, &s.erp_credentials).unwrap();

    let all = window(10);
    let (read, pages) = read_all(crm.as_ref(), &all).await;
    assert_eq!(by_id(&read, ""), expected(&won, all.from.date_naive()));
    assert!(read.len() > 3_800, "{}", read.len());
    // SOQL's 2,000-row pages, keyed on Id ascending.
    assert_eq!(pages, read.len().div_ceil(2_000));
    assert!(read.windows(2).all(|w| w[0].external_id < w[1].external_id));

    let (read, pages) = read_all(erp.as_ref(), &all).await;
    let want: BTreeMap<String, (String, Decimal)> = orders
        .iter()
        .map(|(k, (c, t, _))| (k.clone(), (c.clone(), *t)))
        .collect();
    assert_eq!(by_id(&read, ""), want);
    assert_eq!(pages, 3, "SuiteQL's 1,000-row pages");

    // The last five days only, on both sides.
    let recent = window(4);
    let (read, _) = read_all(crm.as_ref(), &recent).await;
    assert_eq!(by_id(&read, ""), expected(&won, recent.from.date_naive()));
    let (read, _) = read_all(erp.as_ref(), &recent).await;
    let want: BTreeMap<String, (String, Decimal)> = orders
        .iter()
        .filter(|(_, (_, _, date))| *date >= recent.from.date_naive())
        .map(|(k, (c, t, _))| (k.clone(), (c.clone(), *t)))
        .collect();
    assert_eq!(want.len(), 1_250);
    assert_eq!(by_id(&read, ""), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_the_org_would_not_run_get_salesforces_error_array() {
    let s = sims().await;
    let http = reqwest::Client::new();
    let c = s.crm_credentials.clone();
    let login = |secret: String| {
        http.post(format!("{}/services/oauth2/token", s.crm_url))
            .form(&[
                ("grant_type", "client_credentials".to_string()),
                ("client_id", c.get("clientId").unwrap()),
                ("client_secret", secret),
            ])
            .send()
    };
    let refused = login("wrong".into()).await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    let token: Value = login(c.get("clientSecret").unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    let query = |soql: &str, token: &str| {
        http.get(format!("{}/services/data/v61.0/query", s.crm_url))
            .bearer_auth(token)
            .query(&[("q", soql)])
            .send()
    };
    for (soql, code, says) in [
        (
            "SELECT Id, Amont FROM Opportunity",
            "INVALID_FIELD",
            "No such column 'Amont' on entity 'Opportunity'",
        ),
        (
            "SELECT Id FROM Opportunities",
            "INVALID_TYPE",
            "sObject type 'Opportunities' is not supported",
        ),
        (
            "SELECT Id FROM Opportunity WHERE CloseDate >= '2026-11-01'",
            "INVALID_FIELD",
            "must be of type date",
        ),
        (
            "SELECT Id FROM Opportunity WHERE IsWon = true ORDER Id",
            "MALFORMED_QUERY",
            "unexpected token",
        ),
    ] {
        let answer = query(soql, &token).await.unwrap();
        assert_eq!(answer.status(), 400, "{soql}");
        let body: Value = answer.json().await.unwrap();
        let errors = body.as_array().expect("Salesforce's errors are an array");
        assert_eq!(errors.len(), 1, "{body}");
        assert_eq!(errors[0]["errorCode"], code, "{soql}: {body}");
        let message = errors[0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{soql}: {message}");
        assert!(message.contains("ERROR at Row:1:Column:"), "{message}");
    }
    let answer = query("SELECT Id FROM Opportunity", "not-a-token")
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "INVALID_SESSION_ID");

    // Through the audit's own clients: a configured field neither system has is a refusal naming it.
    let mut flow = s.flow.clone();
    flow.audit = Some(FlowAuditSpec {
        crm_amount_field: Some("Amont".into()),
        erp_amount_field: Some("grandtotal".into()),
        ..FlowAuditSpec::default()
    });
    let crm = crm_query(&flow, &s.crm_credentials).unwrap();
    match crm.page(&window(7), None).await {
        Err(QueryError::Refused { message, .. }) => {
            assert!(message.contains("INVALID_FIELD"), "{message}");
            assert!(message.contains("Amont"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let erp = erp_query(&flow, &s.erp_credentials).unwrap();
    match erp.page(&window(7), None).await {
        Err(QueryError::Refused { message, .. }) => {
            assert!(message.contains("Field 'grandtotal'"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
