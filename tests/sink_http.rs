//! The generic HTTP sink against a local server that stores documents by the PUT path, checks the bearer
//! token, recomputes the `Idempotency-Key` and the HMAC signature from the body, and answers 503 with
//! `Retry-After` while "down". Its bulk endpoint (`POST /orders/bulk`) checks the same token, signature and
//! lineage, recomputes each record's `idempotencyKey`, stores each record like a PUT and answers a status per
//! record — or, when told to, misbehaves the ways a real bulk API can.

#[path = "support/sink_mock.rs"]
mod sink_mock;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use meshline::api::{ErrorClass, SinkSystem};
use meshline::api::{HttpBulk, SinkSpec};
use meshline::connectors::sinks;
use meshline::connectors::{BatchLimits, Delivery, Sink};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sink_mock::{check_lineage, header, secret, serve};
use tokio::sync::Mutex;

const TOKEN: &str = "bearer-7f3";
const SIGNING: &str = "whsec-2b";

#[derive(Default)]
struct Erp {
    docs: Mutex<HashMap<String, Value>>,
    keys: Mutex<Vec<String>>,
    down: AtomicBool,
    puts: AtomicU32,
    /// Bulk requests as received (the parsed body).
    bulk_requests: Mutex<Vec<Value>>,
    bulk_mode: Mutex<BulkMode>,
}

/// How the bulk endpoint answers.
#[derive(Clone, Debug, Default)]
enum BulkMode {
    /// Each record stored like a PUT, one result each.
    #[default]
    Honest,
    /// The whole request answered with this status (and `Retry-After: 12` for 429/503).
    Whole(u16),
    /// Honest, then the results are edited: the first record's result left out, the second's given twice,
    /// the third's renamed to an id that was not sent, the fourth's status removed.
    Unaccountable,
    /// 200 with a body that is not the documented shape.
    Garbage,
}

fn check_signature(headers: &HeaderMap, body: &[u8]) -> bool {
    let timestamp = header(headers, "x-meshline-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    header(headers, "x-meshline-signature")
        == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Stores a document like the PUT handler: the status a PUT would have answered, and the error if any.
async fn store(erp: &Erp, id: &str, doc: Value) -> (u16, Option<&'static str>) {
    if doc["amount"].as_f64().is_some_and(|a| a < 0.0) {
        return (422, Some("amount must not be negative"));
    }
    let created = erp.docs.lock().await.insert(id.to_string(), doc).is_none();
    (if created { 201 } else { 200 }, None)
}

async fn bulk(State(erp): State<Arc<Erp>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = check_lineage(&headers) {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    let mode = erp.bulk_mode.lock().await.clone();
    if let BulkMode::Whole(status) = mode {
        let status = StatusCode::from_u16(status).unwrap();
        return (status, [("Retry-After", "12")], "the whole batch").into_response();
    }
    if header(&headers, "authorization") != format!("Bearer {TOKEN}") {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    if !check_signature(&headers, &body) {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "json").into_response();
    };
    erp.bulk_requests.lock().await.push(request.clone());
    let Some(records) = request["records"].as_array() else {
        return (StatusCode::BAD_REQUEST, "records must be an array").into_response();
    };
    let mut results = Vec::new();
    for record in records {
        let id = record["externalId"].as_str().unwrap_or_default();
        let payload = record["payload"].clone();
        let expected_key = format!(
            "{id}.{}",
            &hex::encode(Sha256::digest(serde_json::to_vec(&payload).unwrap()))[..16]
        );
        if record["idempotencyKey"] != expected_key.as_str()
            || record["correlationId"].as_str().is_none_or(str::is_empty)
            || record["attempt"].as_u64().is_none()
        {
            results.push(json!({"externalId": id, "status": 400, "error": "malformed record"}));
            continue;
        }
        let (status, error) = store(&erp, id, payload).await;
        results.push(match error {
            Some(error) => json!({"externalId": id, "status": status, "error": error}),
            None => json!({"externalId": id, "status": status, "erpId": format!("erp-{id}")}),
        });
    }
    match mode {
        BulkMode::Garbage => return (StatusCode::OK, "<html>ok</html>").into_response(),
        BulkMode::Unaccountable => {
            let second = results[1].clone();
            results[2]["externalId"] = json!("NOT-SENT");
            results[3].as_object_mut().unwrap().remove("status");
            results.push(second);
            results.remove(0);
        }
        _ => {}
    }
    (StatusCode::OK, Json(json!({"results": results}))).into_response()
}

async fn upsert(
    State(erp): State<Arc<Erp>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    erp.puts.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = check_lineage(&headers) {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    if erp.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("Retry-After", "12")],
            "down",
        )
            .into_response();
    }
    if header(&headers, "authorization") != format!("Bearer {TOKEN}") {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    // The key names this version of the record: external id and the body's digest.
    let expected_key = format!("{id}.{}", &hex::encode(Sha256::digest(&body))[..16]);
    if header(&headers, "idempotency-key") != expected_key {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key does not match the request",
        )
            .into_response();
    }
    let timestamp = header(&headers, "x-meshline-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&body);
    if header(&headers, "x-meshline-signature")
        != format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "json").into_response();
    };
    if doc["amount"].as_f64().is_some_and(|a| a < 0.0) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "amount must not be negative"})),
        )
            .into_response();
    }
    erp.keys
        .lock()
        .await
        .push(header(&headers, "idempotency-key").to_string());
    let created = erp.docs.lock().await.insert(id.clone(), doc).is_none();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(json!({"id": id}))).into_response()
}

async fn start() -> (Arc<Erp>, String) {
    let erp: Arc<Erp> = Arc::default();
    let base = serve(
        Router::new()
            .route("/orders/{id}", put(upsert))
            .route("/orders/bulk", post(bulk))
            .with_state(erp.clone()),
    )
    .await;
    (erp, format!("{base}/orders"))
}

fn sink(base: &str, keys: &[(&str, &str)]) -> Arc<dyn Sink> {
    build(&sink_mock::spec(SinkSystem::Http, Some(base)), keys)
}

fn build(spec: &SinkSpec, keys: &[(&str, &str)]) -> Arc<dyn Sink> {
    let (_dir, credentials) = secret(keys);
    sinks::build(spec, credentials, sinks::http_client()).expect("builds")
}

/// A sink with `bulk: {path: /bulk, maxRecords: 50}` and the right token and signing secret.
fn bulk_sink(base: &str, keys: &[(&str, &str)]) -> Arc<dyn Sink> {
    let mut spec = sink_mock::spec(SinkSystem::Http, Some(base));
    spec.bulk = Some(HttpBulk {
        path: "/bulk".into(),
        max_records: 50,
    });
    build(&spec, keys)
}

const GOOD_KEYS: &[(&str, &str)] = &[("token", TOKEN), ("signingSecret", SIGNING)];

fn delivery<'a>(external_id: &'a str, payload: &'a Value) -> Delivery<'a> {
    Delivery {
        external_id,
        payload,
        correlation_id: "corr-http",
        attempt: 2,
    }
}

#[tokio::test]
async fn retried_delivery_reuses_its_idempotency_key_and_updates_in_place() {
    let (erp, base) = start().await;
    let sink = sink(&base, &[("token", TOKEN), ("signingSecret", SIGNING)]);
    let v1 = json!({"amount": 10});
    let v2 = json!({"amount": 12});
    let a = sink
        .deliver(delivery("SO 1/2", &v1))
        .await
        .expect("created");
    let again = sink
        .deliver(delivery("SO 1/2", &v1))
        .await
        .expect("retried");
    let b = sink
        .deliver(delivery("SO 1/2", &v2))
        .await
        .expect("updated");
    assert_eq!(
        (a.created, again.created, b.created),
        (Some(true), Some(false), Some(false))
    );
    assert_eq!(
        a.erp_id.as_deref(),
        Some("SO 1/2"),
        "an id with '/' stays one path segment"
    );
    let docs = erp.docs.lock().await;
    assert_eq!(docs.len(), 1);
    assert_eq!(docs["SO 1/2"]["amount"], 12);
    let keys = erp.keys.lock().await;
    assert_eq!(keys[0], keys[1], "a retry is the same request");
    assert_ne!(keys[1], keys[2], "an update is a new request");
}

#[tokio::test]
async fn missing_token_is_a_flow_level_error() {
    let (erp, base) = start().await;
    let err = sink(&base, &[("signingSecret", SIGNING)])
        .deliver(delivery("SO-1", &json!({})))
        .await
        .unwrap_err();
    assert_eq!((err.class, err.status), (ErrorClass::FlowLevel, Some(401)));
    let err = sink(&base, &[("token", TOKEN), ("signingSecret", "wrong")])
        .deliver(delivery("SO-1", &json!({})))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.status),
        (ErrorClass::FlowLevel, Some(401)),
        "the signature is checked"
    );
    assert!(erp.docs.lock().await.is_empty());
}

#[tokio::test]
async fn outage_is_transient_and_rejection_is_permanent() {
    let (erp, base) = start().await;
    let sink = sink(&base, &[("token", TOKEN), ("signingSecret", SIGNING)]);
    erp.down.store(true, Ordering::SeqCst);
    let err = sink
        .deliver(delivery("SO-1", &json!({"amount": 1})))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.retry_after),
        (
            ErrorClass::Transient,
            Some(std::time::Duration::from_secs(12))
        )
    );
    erp.down.store(false, Ordering::SeqCst);
    let err = sink
        .deliver(delivery("SO-1", &json!({"amount": -1})))
        .await
        .unwrap_err();
    assert_eq!((err.class, err.status), (ErrorClass::Permanent, Some(422)));
    assert!(
        err.response
            .as_deref()
            .is_some_and(|r| r.contains("must not be negative"))
    );
}

#[tokio::test]
async fn unreachable_erp_is_transient() {
    // A port nothing listens on: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = sink(&format!("http://127.0.0.1:{port}/orders"), &[])
        .deliver(delivery("SO-1", &json!({})))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.status),
        (ErrorClass::Transient, None),
        "{err}"
    );
}

#[tokio::test]
async fn bulk_answer_gives_each_record_its_own_outcome() {
    let (erp, base) = start().await;
    let sink = bulk_sink(&base, GOOD_KEYS);
    assert_eq!(
        sink.batch_limits(),
        Some(BatchLimits {
            max_records: 50,
            max_bytes: BatchLimits::DEFAULT.max_bytes
        })
    );
    erp.docs
        .lock()
        .await
        .insert("SO-2".into(), json!({"amount": 1}));
    let (new, update, bad) = (
        json!({"amount": 10}),
        json!({"amount": 20}),
        json!({"amount": -5}),
    );
    let batch = [
        Delivery {
            correlation_id: "corr-1",
            ..delivery("SO-1", &new)
        },
        Delivery {
            correlation_id: "corr-2",
            ..delivery("SO-2", &update)
        },
        Delivery {
            correlation_id: "corr-3",
            ..delivery("SO-3", &bad)
        },
    ];
    let results = sink
        .deliver_batch(&batch)
        .await
        .expect("the batch answered");
    assert_eq!(results.len(), 3);
    let created = results[0].as_ref().expect("SO-1 delivered");
    assert_eq!(
        (created.created, created.erp_id.as_deref(), created.status),
        (Some(true), Some("erp-SO-1"), 201)
    );
    let updated = results[1].as_ref().expect("SO-2 delivered");
    assert_eq!((updated.created, updated.status), (Some(false), 200));
    let rejected = results[2].as_ref().unwrap_err();
    assert_eq!(
        (rejected.class, rejected.status),
        (ErrorClass::Permanent, Some(422))
    );
    assert!(
        rejected
            .response
            .as_deref()
            .is_some_and(|r| r.contains("must not be negative")),
        "the record's own error is what the dead letter keeps: {rejected:?}"
    );

    assert_eq!(erp.puts.load(Ordering::SeqCst), 0, "no record went alone");
    let requests = erp.bulk_requests.lock().await;
    assert_eq!(requests.len(), 1, "one request for the batch");
    let records = requests[0]["records"].as_array().unwrap();
    let correlations: Vec<&str> = records
        .iter()
        .map(|r| r["correlationId"].as_str().unwrap())
        .collect();
    assert_eq!(correlations, ["corr-1", "corr-2", "corr-3"]);
    assert!(records.iter().all(|r| r["attempt"] == 2));
    let docs = erp.docs.lock().await;
    assert_eq!(
        (
            docs["SO-1"]["amount"].clone(),
            docs["SO-2"]["amount"].clone()
        ),
        (json!(10), json!(20))
    );
    assert!(!docs.contains_key("SO-3"));
}

#[tokio::test]
async fn whole_bulk_failures_are_classified_like_a_single_request() {
    let (erp, base) = start().await;
    let payload = json!({"amount": 1});
    let batch = [delivery("SO-1", &payload), delivery("SO-2", &payload)];

    // The signature covers the bulk body: a sink with another signing secret is refused.
    let err = bulk_sink(&base, &[("token", TOKEN), ("signingSecret", "wrong")])
        .deliver_batch(&batch)
        .await
        .unwrap_err();
    assert_eq!((err.class, err.status), (ErrorClass::FlowLevel, Some(401)));

    let sink = bulk_sink(&base, GOOD_KEYS);
    let cases = [
        (503, ErrorClass::Transient),
        (429, ErrorClass::Transient),
        (403, ErrorClass::FlowLevel),
        (400, ErrorClass::Permanent),
        (413, ErrorClass::Permanent),
        // The bulk endpoint is not there: a configuration error, so records wait instead of being bisected
        // into dead letters one by one.
        (404, ErrorClass::Config),
        (405, ErrorClass::Config),
    ];
    for (status, class) in cases {
        *erp.bulk_mode.lock().await = BulkMode::Whole(status);
        let err = sink.deliver_batch(&batch).await.unwrap_err();
        assert_eq!(
            (err.class, err.status),
            (class, Some(status)),
            "HTTP {status}: {err}"
        );
        if class == ErrorClass::Transient {
            assert_eq!(err.retry_after, Some(std::time::Duration::from_secs(12)));
        }
        if class == ErrorClass::Config {
            assert!(err.message.contains("spec.sink.bulk.path"), "{err}");
        }
    }

    *erp.bulk_mode.lock().await = BulkMode::Garbage;
    let err = sink.deliver_batch(&batch).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(err.message.contains("cannot be read"), "{err}");
    assert_eq!(erp.puts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn records_the_bulk_answer_does_not_account_for_are_never_delivered() {
    let (erp, base) = start().await;
    *erp.bulk_mode.lock().await = BulkMode::Unaccountable;
    let payload = json!({"amount": 1});
    let ids = ["SO-1", "SO-2", "SO-3", "SO-4", "SO-5"];
    let batch: Vec<Delivery> = ids.iter().map(|id| delivery(id, &payload)).collect();
    let results = bulk_sink(&base, GOOD_KEYS)
        .deliver_batch(&batch)
        .await
        .expect("the batch answered");
    let expect_transient = |i: usize, words: &str| {
        let err = results[i]
            .as_ref()
            .expect_err(&format!("{} must not be taken as delivered", ids[i]));
        assert_eq!(err.class, ErrorClass::Transient, "{err}");
        assert!(err.message.contains(words), "{}: {err}", ids[i]);
    };
    expect_transient(0, "no result for externalId \"SO-1\"");
    expect_transient(1, "2 results for externalId \"SO-2\"");
    expect_transient(2, "\"NOT-SENT\"");
    expect_transient(3, "no HTTP status");
    assert_eq!(
        results[4].as_ref().map(|d| d.created),
        Ok(Some(true)),
        "the one record accounted for is delivered"
    );
}

#[tokio::test]
async fn without_bulk_a_batch_is_one_put_per_record() {
    let (erp, base) = start().await;
    let sink = sink(&base, GOOD_KEYS);
    assert_eq!(sink.batch_limits(), None, "bulk is off by default");
    let payload = json!({"amount": 3});
    let results = sink
        .deliver_batch(&[delivery("SO-1", &payload), delivery("SO-2", &payload)])
        .await
        .expect("delivered");
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|d| d.created == Some(true)))
    );
    assert_eq!(erp.puts.load(Ordering::SeqCst), 2);
    assert!(erp.bulk_requests.lock().await.is_empty(), "no bulk call");
}

#[test]
fn bulk_spec_defaults_and_mistakes_name_the_field() {
    let spec: SinkSpec = serde_json::from_value(json!({
        "system": "http",
        "baseUrl": "https://erp.example/orders",
        "credentialsSecretRef": {"name": "erp"},
        "bulk": {"path": "/bulk"}
    }))
    .expect("a bulk endpoint with only a path");
    assert_eq!(spec.bulk.as_ref().map(|b| b.max_records), Some(100));

    for (path, max_records, field) in [
        ("bulk", 10, "bulk.path"),
        ("/bulk?x=1", 10, "bulk.path"),
        ("/bulk", 0, "bulk.maxRecords"),
        ("/bulk", 10_001, "bulk.maxRecords"),
    ] {
        let mut spec = sink_mock::spec(SinkSystem::Http, Some("https://erp.example/orders"));
        spec.bulk = Some(HttpBulk {
            path: path.into(),
            max_records,
        });
        let (_dir, credentials) = secret(&[]);
        let err = sinks::build(&spec, credentials, sinks::http_client())
            .err()
            .expect("refused");
        assert_eq!(err.label(), "sink_invalid");
        assert!(
            err.to_string().contains(field),
            "{path} {max_records}: {err}"
        );
    }
}
