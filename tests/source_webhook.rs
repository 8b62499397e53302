//! The webhook receiver over real HTTP: signatures checked on the raw body, acknowledgement only after the
//! intake stored the records, and HubSpot events read back through a local CRM v3 API that checks its token.

#[path = "support/source_intake.rs"]
mod source_intake;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshline::connectors::sources::webhook::{
    HubspotApi, Verifier, WebhookConfig, hubspot_decode_uri, hubspot_v3_signature,
    meshline_signature, router, verify_hubspot_v3,
};
use serde_json::{Value, json};
use source_intake::MemoryIntake;

const SECRET: &str = "whsec-test";
const HUBSPOT_CLIENT_SECRET: &str = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy";
const HUBSPOT_TOKEN: &str = "pat-na1-test-token";

fn generic_config() -> WebhookConfig {
    WebhookConfig {
        flow: "test-flow".into(),
        path: "/webhook".into(),
        verifier: Verifier::HmacSha256 {
            secret: SECRET.into(),
        },
        field_map: [("id", "externalId"), ("customer.name", "customerName")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        key_pointer: "/id".into(),
        body_limit: 4096,
        tolerance: Duration::from_secs(300),
        public_url: None,
    }
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn post_signed(url: &str, body: &str, signature: &str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/webhook"))
        .header("content-type", "application/json")
        .header("x-meshline-signature", signature)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn webhook_is_acknowledged_only_after_the_record_is_stored() {
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(generic_config(), intake.clone())).await;
    let body = r#"{"externalId": "ord-1", "customerName": "Acme", "total": 12}"#;
    let signature = meshline_signature(SECRET, now(), body.as_bytes());

    intake.fail_all.store(true, Ordering::SeqCst);
    let (status, answer) = post_signed(&url, body, &signature).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"], "intake_failed");
    assert!(
        intake.keys().is_empty(),
        "nothing was acknowledged, nothing is stored"
    );

    // The CRM retries the same delivery; now the ledger takes it.
    intake.fail_all.store(false, Ordering::SeqCst);
    let (status, answer) = post_signed(&url, body, &signature).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let stored = intake
        .get("ord-1")
        .expect("stored under the fieldMap target id");
    assert_eq!(
        stored.payload,
        json!({"id": "ord-1", "customer": {"name": "Acme"}, "total": 12})
    );

    // A batch is one array; every record is stored before the single 2xx.
    let batch = r#"[{"externalId": "ord-2"}, {"externalId": 3}]"#;
    let (status, answer) = post_signed(
        &url,
        batch,
        &meshline_signature(SECRET, now(), batch.as_bytes()),
    )
    .await;
    assert_eq!(
        (status, answer["accepted"].clone()),
        (StatusCode::OK, json!(2))
    );
    assert_eq!(intake.keys(), ["3", "ord-1", "ord-2"]);
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(generic_config(), intake.clone())).await;
    let body = r#"{"externalId": "ord-1"}"#;

    let (status, answer) = post_signed(
        &url,
        body,
        &meshline_signature("another-secret", now(), body.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["error"], "bad_signature");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{answer}"
    );

    // A body changed after signing.
    let signature = meshline_signature(SECRET, now(), body.as_bytes());
    let (status, _) = post_signed(&url, r#"{"externalId": "ord-666"}"#, &signature).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let response = reqwest::Client::new()
        .post(format!("{url}/webhook"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("missing X-Meshline-Signature"),
        "{answer}"
    );

    assert_eq!(
        intake.calls.load(Ordering::SeqCst),
        0,
        "an unverified body never reaches the intake"
    );
}

#[tokio::test]
async fn replayed_old_timestamp_is_refused() {
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(generic_config(), intake.clone())).await;
    let body = r#"{"externalId": "ord-1"}"#;
    // Correctly signed, but captured six minutes ago.
    let (status, answer) = post_signed(
        &url,
        body,
        &meshline_signature(SECRET, now() - 360, body.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        answer["reason"].as_str().unwrap().contains("replay"),
        "{answer}"
    );

    // HubSpot: the same rule with millisecond timestamps and the v3 signature.
    let mut headers = HeaderMap::new();
    let uri = "https://hooks.example.com/webhook";
    let old = (chrono::Utc::now().timestamp_millis() - 6 * 60 * 1000).to_string();
    headers.insert("x-hubspot-request-timestamp", old.parse().unwrap());
    headers.insert(
        "x-hubspot-signature-v3",
        hubspot_v3_signature(HUBSPOT_CLIENT_SECRET, "POST", uri, b"[]", &old)
            .parse()
            .unwrap(),
    );
    let refused = verify_hubspot_v3(
        HUBSPOT_CLIENT_SECRET,
        "POST",
        uri,
        &headers,
        b"[]",
        chrono::Utc::now().timestamp_millis(),
    );
    assert!(refused.unwrap_err().contains("older than 300s"));
    assert_eq!(intake.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn hubspot_v3_signature_matches_the_documented_example() {
    // HubSpot's guide gives no v3 vector; this is the one in HubSpot's own client library's test suite
    // (hubspot-api-python, tests/spec/utils/test_signature.py), built with the guide's example inputs.
    let body = "{'example_field':'example_value'}";
    let signature = hubspot_v3_signature(
        HUBSPOT_CLIENT_SECRET,
        "POST",
        "https://www.example.com/webhook_uri",
        body.as_bytes(),
        "15000000",
    );
    assert_eq!(signature, "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw=");

    let mut headers = HeaderMap::new();
    headers.insert("x-hubspot-signature-v3", signature.parse().unwrap());
    headers.insert("x-hubspot-request-timestamp", "15000000".parse().unwrap());
    let uri = "https://www.example.com/webhook_uri";
    assert!(
        verify_hubspot_v3(
            HUBSPOT_CLIENT_SECRET,
            "POST",
            uri,
            &headers,
            body.as_bytes(),
            15_000_000 + 299_000
        )
        .is_ok()
    );
    assert!(
        verify_hubspot_v3(
            HUBSPOT_CLIENT_SECRET,
            "POST",
            uri,
            &headers,
            body.as_bytes(),
            15_000_000 + 301_000
        )
        .is_err()
    );
    assert!(
        verify_hubspot_v3(
            HUBSPOT_CLIENT_SECRET,
            "GET",
            uri,
            &headers,
            body.as_bytes(),
            15_000_000
        )
        .is_err()
    );

    // The guide's decoding table: these escapes are decoded before signing, others (%20, %25) are kept.
    assert_eq!(
        hubspot_decode_uri(
            "https://h.example/hook?a=%3A%2F%3F%40%21%24%27%28%29%2A%2C%3B&b=%20%25"
        ),
        "https://h.example/hook?a=:/?@!$'()*,;&b=%20%25"
    );
}

#[tokio::test]
async fn malformed_json_is_refused_with_its_path() {
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(generic_config(), intake.clone())).await;

    let body = "{\"externalId\": \"ord-1\",\n \"total\": }";
    let (status, answer) = post_signed(
        &url,
        body,
        &meshline_signature(SECRET, now(), body.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["reason"].as_str().unwrap().contains("line 2 column"),
        "{answer}"
    );

    let body = r#"[{"externalId": "ord-1"}, {"customerName": "no id"}]"#;
    let (status, answer) = post_signed(
        &url,
        body,
        &meshline_signature(SECRET, now(), body.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let reason = answer["reason"].as_str().unwrap();
    assert!(
        reason.contains("record at /1") && reason.contains("/id"),
        "{reason}"
    );

    let body = "[1]";
    let (status, answer) = post_signed(
        &url,
        body,
        &meshline_signature(SECRET, now(), body.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("/0 is a number"),
        "{answer}"
    );
    assert_eq!(
        intake.calls.load(Ordering::SeqCst),
        0,
        "a batch with one bad record is refused whole"
    );
}

#[tokio::test]
async fn oversized_body_is_refused_before_it_is_read() {
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(generic_config(), intake.clone())).await;
    let body = format!(r#"{{"externalId": "big", "pad": "{}"}}"#, "x".repeat(8192));
    let (status, _) = post_signed(
        &url,
        &body,
        &meshline_signature(SECRET, now(), body.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(intake.calls.load(Ordering::SeqCst), 0);
}

/// A local HubSpot CRM v3 API: deals with associated line items, behind the private-app token.
#[derive(Default)]
struct Hub {
    deal_reads: Mutex<Vec<BTreeMap<String, String>>>,
    batch_reads: Mutex<Vec<Value>>,
    unauthorized: AtomicUsize,
}

fn bearer_ok(hub: &Hub, headers: &HeaderMap) -> bool {
    let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {HUBSPOT_TOKEN}"));
    if !ok {
        hub.unauthorized.fetch_add(1, Ordering::SeqCst);
    }
    ok
}

async fn hub_deal(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    if !bearer_ok(&hub, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"status": "error", "category": "INVALID_AUTHENTICATION"})),
        );
    }
    hub.deal_reads.lock().unwrap().push(q.clone());
    if id != "1001" {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"status": "error", "category": "OBJECT_NOT_FOUND"})),
        );
    }
    let wanted: Vec<&str> = q
        .get("properties")
        .map(|p| p.split(',').collect())
        .unwrap_or_default();
    let all = json!({"dealname": "Big deal", "amount": "1500", "dealstage": "closedwon", "hs_object_id": "1001"});
    let properties: serde_json::Map<String, Value> = all
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| wanted.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut body = json!({"id": "1001", "properties": properties, "createdAt": "2024-05-01T10:00:00Z", "archived": false});
    if q.get("associations").map(String::as_str) == Some("line_items") {
        body["associations"] = json!({"line items": {"results": [
            {"id": "5002", "type": "deal_to_line_item"}, {"id": "5001", "type": "deal_to_line_item"}
        ]}});
    }
    (StatusCode::OK, Json(body))
}

async fn hub_batch_read(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Json(request): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !bearer_ok(&hub, &headers) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"status": "error"})));
    }
    hub.batch_reads.lock().unwrap().push(request.clone());
    let items = json!({
        "5001": {"hs_sku": "P-1", "quantity": "2", "price": "500"},
        "5002": {"hs_sku": "P-2", "quantity": "1", "price": "500"},
    });
    // Answer in an order of HubSpot's choosing: ids sorted, not as requested.
    let mut ids: Vec<String> = request["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    // Only the requested properties come back, as HubSpot does.
    let wanted: Vec<&str> = request["properties"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let results: Vec<Value> = ids
        .iter()
        .map(|id| {
            let properties: serde_json::Map<String, Value> = items[id]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| wanted.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            json!({"id": id, "properties": properties})
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({"status": "COMPLETE", "results": results})),
    )
}

#[tokio::test]
async fn hubspot_events_are_verified_then_read_back_with_their_line_items() {
    let hub = Arc::new(Hub::default());
    let hub_url = serve(
        Router::new()
            .route("/crm/v3/objects/deals/{id}", get(hub_deal))
            .route(
                "/crm/v3/objects/line_items/batch/read",
                post(hub_batch_read),
            )
            .with_state(hub.clone()),
    )
    .await;
    let config = WebhookConfig {
        verifier: Verifier::HubspotV3 {
            client_secret: HUBSPOT_CLIENT_SECRET.into(),
            api: HubspotApi {
                base_url: hub_url,
                access_token: HUBSPOT_TOKEN.into(),
                object: "deals".into(),
            },
        },
        field_map: [
            ("id", "id"),
            ("dealName", "dealname"),
            ("amount", "amount"),
            ("lineItems", "line_items"),
            ("lineItems[].sku", "hs_sku"),
            ("lineItems[].quantity", "quantity"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
        public_url: Some("https://hooks.example.com/webhook?portal=na1%3A62515".into()),
        ..generic_config()
    };
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(config, intake.clone())).await;

    // Two events on one deal and one on a deal HubSpot no longer has.
    let body = json!([
        {"eventId": 100, "subscriptionId": 7, "portalId": 62515, "appId": 1, "occurredAt": 1714557600000u64,
         "subscriptionType": "deal.creation", "attemptNumber": 0, "objectId": 1001, "changeSource": "CRM"},
        {"eventId": 101, "subscriptionId": 8, "portalId": 62515, "appId": 1, "occurredAt": 1714557600001u64,
         "subscriptionType": "deal.propertyChange", "attemptNumber": 0, "objectId": 1001, "propertyName": "dealstage",
         "propertyValue": "closedwon", "changeSource": "CRM"},
        {"eventId": 102, "subscriptionId": 7, "portalId": 62515, "appId": 1, "occurredAt": 1714557600002u64,
         "subscriptionType": "deal.creation", "attemptNumber": 0, "objectId": 999, "changeSource": "CRM"}
    ])
    .to_string();
    // HubSpot signs the URL it called, with `%3A` in the query decoded per the guide.
    let path = "/webhook?portal=na1%3A62515";
    let timestamp = chrono::Utc::now().timestamp_millis().to_string();
    let signed_uri = "https://hooks.example.com/webhook?portal=na1:62515";
    let signature = hubspot_v3_signature(
        HUBSPOT_CLIENT_SECRET,
        "POST",
        signed_uri,
        body.as_bytes(),
        &timestamp,
    );
    let send = |signature: String| {
        reqwest::Client::new()
            .post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .header("x-hubspot-signature-v3", signature)
            .header("x-hubspot-request-timestamp", timestamp.clone())
            .body(body.clone())
            .send()
    };

    let tampered = hubspot_v3_signature(
        "not-the-secret",
        "POST",
        signed_uri,
        body.as_bytes(),
        &timestamp,
    );
    assert_eq!(send(tampered).await.unwrap().status().as_u16(), 401);
    assert!(
        hub.deal_reads.lock().unwrap().is_empty(),
        "nothing is fetched for an unverified request"
    );

    let response = send(signature).await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "{}",
        response.text().await.unwrap()
    );
    let reads = hub.deal_reads.lock().unwrap().clone();
    assert_eq!(reads.len(), 2, "one read per distinct objectId");
    assert_eq!(reads[0]["properties"], "amount,dealname");
    assert_eq!(reads[0]["associations"], "line_items");
    let batch = hub.batch_reads.lock().unwrap()[0].clone();
    assert_eq!(
        batch,
        json!({"properties": ["hs_sku", "quantity"], "inputs": [{"id": "5002"}, {"id": "5001"}]})
    );
    assert_eq!(
        hub.unauthorized.load(Ordering::SeqCst),
        0,
        "every API call carried the private-app token"
    );

    assert_eq!(intake.keys(), ["1001"]);
    let record = intake.get("1001").unwrap();
    assert_eq!(
        record.payload,
        json!({"id": "1001", "dealName": "Big deal", "amount": "1500",
               "lineItems": [{"id": "5002", "sku": "P-2", "quantity": "1"}, {"id": "5001", "sku": "P-1", "quantity": "2"}]})
    );
    assert_eq!(record.correlation_id.as_deref(), Some("hubspot-event-100"));
}

/// The source of a HubSpot flow as a user writes it, with the given extra lines.
fn hubspot_source(extra: &str) -> meshline::api::SourceSpec {
    serde_yaml::from_str(&format!(
        "system: hubspot\nobject: deals\nsignature: hubspot-v3\ncredentialsSecretRef: {{name: hubspot}}\n{extra}"
    ))
    .expect("source spec parses")
}

fn hubspot_credentials() -> (tempfile::TempDir, meshline::connectors::Credentials) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("clientSecret"), HUBSPOT_CLIENT_SECRET).unwrap();
    std::fs::write(dir.path().join("accessToken"), HUBSPOT_TOKEN).unwrap();
    let credentials =
        meshline::connectors::Credentials::new(Some(dir.path()), "webhook_test_unused");
    (dir, credentials)
}

#[tokio::test]
async fn hubspot_signature_behind_a_rewriting_ingress_is_checked_against_the_public_url() {
    let hub = Arc::new(Hub::default());
    let hub_url = serve(
        Router::new()
            .route("/crm/v3/objects/deals/{id}", get(hub_deal))
            .route(
                "/crm/v3/objects/line_items/batch/read",
                post(hub_batch_read),
            )
            .with_state(hub.clone()),
    )
    .await;
    // HubSpot calls the URL configured in the app; the Ingress serves it on another host and strips the
    // `/crm/hubspot` prefix, so the worker sees `Host: 127.0.0.1:…` and `POST /webhook`.
    let configured = "https://hooks.example.com/crm/hubspot/webhook?portal=na1%3A62515";
    let body = json!([{"eventId": 200, "subscriptionId": 7, "portalId": 62515, "appId": 1,
        "occurredAt": 1714557600000u64, "subscriptionType": "deal.creation", "attemptNumber": 0,
        "objectId": 1001, "changeSource": "CRM"}])
    .to_string();
    let timestamp = chrono::Utc::now().timestamp_millis().to_string();
    let signature = hubspot_v3_signature(
        HUBSPOT_CLIENT_SECRET,
        "POST",
        &hubspot_decode_uri(configured),
        body.as_bytes(),
        &timestamp,
    );
    let (_dir, credentials) = hubspot_credentials();
    let post_as_the_ingress = |url: String| {
        reqwest::Client::new()
            .post(format!("{url}/webhook?portal=na1%3A62515"))
            .header("content-type", "application/json")
            .header("x-hubspot-signature-v3", signature.clone())
            .header("x-hubspot-request-timestamp", timestamp.clone())
            .body(body.clone())
            .send()
    };

    // Without publicUrl the worker signs https:// + its Host + its path: not what HubSpot signed.
    let source = hubspot_source(&format!("baseUrl: {hub_url}"));
    let config = WebhookConfig::from_spec("deals-to-odoo", &source, &credentials).unwrap();
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(config, intake.clone())).await;
    let refused = post_as_the_ingress(url).await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert!(intake.keys().is_empty());

    // With publicUrl (as configured in HubSpot) the same request verifies and the deal is stored.
    let source = hubspot_source(&format!("baseUrl: {hub_url}\npublicUrl: \"{configured}\""));
    let config = WebhookConfig::from_spec("deals-to-odoo", &source, &credentials).unwrap();
    assert_eq!(config.public_url.as_deref(), Some(configured));
    let intake = Arc::new(MemoryIntake::default());
    let url = serve(router(config, intake.clone())).await;
    let accepted = post_as_the_ingress(url).await.unwrap();
    assert_eq!(
        accepted.status().as_u16(),
        200,
        "{}",
        accepted.text().await.unwrap()
    );
    assert_eq!(intake.keys(), ["1001"]);
}

#[test]
fn public_url_that_is_not_an_https_url_is_refused_naming_the_field() {
    let (_dir, credentials) = hubspot_credentials();
    for (raw, why) in [
        ("http://hooks.example.com/webhook", "https"),
        ("https://user:pw@hooks.example.com/webhook", "credentials"),
        ("https://hooks.example.com/webhook#frag", "fragment"),
        ("hooks.example.com/webhook", "relative URL"),
    ] {
        let source = hubspot_source(&format!("publicUrl: \"{raw}\""));
        let err = WebhookConfig::from_spec("deals-to-odoo", &source, &credentials)
            .err()
            .unwrap_or_else(|| panic!("{raw} accepted"));
        let message = err.to_string();
        assert!(
            message.contains("deals-to-odoo")
                && message.contains("spec.source.publicUrl")
                && message.contains(why),
            "{raw}: {message}"
        );
    }
}
