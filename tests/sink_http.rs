//! The generic HTTP sink against a local server that stores documents by the PUT path, checks the bearer
//! token, recomputes the `Idempotency-Key` and the HMAC signature from the body, and answers 503 with
//! `Retry-After` while "down".

#[path = "support/sink_mock.rs"]
mod sink_mock;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use meshline::api::{ErrorClass, SinkSystem};
use meshline::connectors::sinks;
use meshline::connectors::{Delivery, Sink};
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
}

async fn upsert(
    State(erp): State<Arc<Erp>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
            .with_state(erp.clone()),
    )
    .await;
    (erp, format!("{base}/orders"))
}

fn sink(base: &str, keys: &[(&str, &str)]) -> Arc<dyn Sink> {
    let (_dir, credentials) = secret(keys);
    sinks::build(
        &sink_mock::spec(SinkSystem::Http, Some(base)),
        credentials,
        sinks::http_client(),
    )
    .expect("builds")
}

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
