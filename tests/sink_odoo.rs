//! The Odoo sink against a local JSON-RPC server that behaves like Odoo's `/jsonrpc`: `common.authenticate`
//! answers a uid or `false`, `object.execute_kw` checks db, uid and API key and raises `AccessDenied`, and
//! `sale.order` supports `search` by `client_order_ref`, `create` (raising `ValidationError` without a
//! customer) and `write`; `product.product` supports paged `search_read`.

#[path = "support/sink_mock.rs"]
mod sink_mock;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use meshline::api::{ErrorClass, SinkSystem};
use meshline::connectors::sinks::{self, odoo::OdooSink};
use meshline::connectors::{Delivery, Sink};
use serde_json::{Value, json};
use sink_mock::{check_lineage, secret, serve};
use tokio::sync::Mutex;

const DB: &str = "acme-prod";
const LOGIN: &str = "meshline@acme.example";
const UID: i64 = 7;

struct Odoo {
    api_key: Mutex<String>,
    orders: Mutex<Vec<(i64, Value)>>,
    calls: Mutex<Vec<String>>,
    unavailable: AtomicBool,
    authentications: AtomicU32,
}

fn fault(id: &Value, name: &str, message: &str) -> Response {
    // Odoo reports exceptions with HTTP 200 and a JSON-RPC error member.
    Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": 200, "message": "Odoo Server Error",
        "data": {"name": name, "debug": "Traceback ...", "message": message, "arguments": [message], "context": {}}}}))
    .into_response()
}

fn result(id: &Value, value: Value) -> Response {
    Json(json!({"jsonrpc": "2.0", "id": id, "result": value})).into_response()
}

async fn jsonrpc(
    State(odoo): State<Arc<Odoo>>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    if let Err(e) = check_lineage(&headers) {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    if odoo.unavailable.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("Retry-After", "30")],
            "maintenance",
        )
            .into_response();
    }
    let id = req["id"].clone();
    if req["jsonrpc"] != "2.0" || req["method"] != "call" {
        return fault(
            &id,
            "werkzeug.exceptions.BadRequest",
            "not a JSON-RPC 2.0 call",
        );
    }
    let params = &req["params"];
    let args = params["args"].as_array().cloned().unwrap_or_default();
    let key = odoo.api_key.lock().await.clone();
    match (params["service"].as_str(), params["method"].as_str()) {
        (Some("common"), Some("authenticate")) => {
            odoo.authentications.fetch_add(1, Ordering::SeqCst);
            let ok =
                args.len() == 4 && args[0] == DB && args[1] == LOGIN && args[2] == key.as_str();
            result(&id, if ok { json!(UID) } else { json!(false) })
        }
        (Some("object"), Some("execute_kw")) => {
            if args.len() != 7 || args[0] != DB || args[1] != UID || args[2] != key.as_str() {
                return fault(&id, "odoo.exceptions.AccessDenied", "Access Denied");
            }
            let (model, method) = (
                args[3].as_str().unwrap_or(""),
                args[4].as_str().unwrap_or(""),
            );
            odoo.calls.lock().await.push(format!("{model}.{method}"));
            let (margs, kwargs) = (&args[5], &args[6]);
            let mut orders = odoo.orders.lock().await;
            match (model, method) {
                ("sale.order", "search") => {
                    let domain = &margs[0];
                    let ids: Vec<i64> = orders
                        .iter()
                        .filter(|(_, o)| match domain.get(0) {
                            Some(leaf) => {
                                leaf[0] == "client_order_ref"
                                    && leaf[1] == "="
                                    && o["client_order_ref"] == leaf[2]
                            }
                            None => true,
                        })
                        .map(|(id, _)| *id)
                        .take(kwargs["limit"].as_u64().unwrap_or(u64::MAX) as usize)
                        .collect();
                    result(&id, json!(ids))
                }
                ("sale.order", "create") => {
                    let vals = margs[0].clone();
                    if vals.get("partner_id").is_none() {
                        return fault(
                            &id,
                            "odoo.exceptions.ValidationError",
                            "Customer is required (partner_id)",
                        );
                    }
                    let new = 100 + orders.len() as i64;
                    orders.push((new, vals));
                    result(&id, json!([new]))
                }
                ("sale.order", "write") => {
                    let target = margs[0][0].as_i64();
                    match orders.iter_mut().find(|(id, _)| Some(*id) == target) {
                        Some((_, o)) => {
                            for (k, v) in margs[1].as_object().cloned().unwrap_or_default() {
                                o[k] = v;
                            }
                            result(&id, json!(true))
                        }
                        None => fault(&id, "odoo.exceptions.MissingError", "Record does not exist"),
                    }
                }
                ("product.product", "search_read") => {
                    let (offset, limit) = (
                        kwargs["offset"].as_u64().unwrap_or(0),
                        kwargs["limit"].as_u64().unwrap_or(80),
                    );
                    let rows: Vec<Value> = (offset..(offset + limit).min(1200))
                        .map(|i| json!({"id": i + 1, "default_code": format!("SKU-{i:04}"), "list_price": 9.5}))
                        .collect();
                    result(&id, json!(rows))
                }
                _ => fault(&id, "builtins.AttributeError", "unknown model or method"),
            }
        }
        _ => fault(&id, "werkzeug.exceptions.NotFound", "unknown service"),
    }
}

async fn start() -> (Arc<Odoo>, String) {
    let odoo = Arc::new(Odoo {
        api_key: Mutex::new("key-1".into()),
        orders: Mutex::default(),
        calls: Mutex::default(),
        unavailable: AtomicBool::new(false),
        authentications: AtomicU32::new(0),
    });
    let base = serve(
        Router::new()
            .route("/jsonrpc", post(jsonrpc))
            .with_state(odoo.clone()),
    )
    .await;
    (odoo, base)
}

fn sink(base: &str, api_key: &str) -> Arc<dyn Sink> {
    let mut spec = sink_mock::spec(SinkSystem::Odoo, Some(base));
    spec.database = Some(DB.into());
    let (_dir, credentials) = secret(&[("login", LOGIN), ("apiKey", api_key)]);
    sinks::build(&spec, credentials, sinks::http_client()).expect("odoo sink builds")
}

fn delivery<'a>(external_id: &'a str, payload: &'a Value) -> Delivery<'a> {
    Delivery {
        external_id,
        payload,
        correlation_id: "corr-odoo",
        attempt: 1,
    }
}

#[tokio::test]
async fn retried_delivery_writes_the_same_sale_order() {
    let (odoo, base) = start().await;
    let sink = sink(&base, "key-1");
    let first = json!({"partner_id": 12, "note": "first"});
    let second = json!({"partner_id": 12, "note": "second"});
    let a = sink
        .deliver(delivery("SF-006A", &first))
        .await
        .expect("created");
    let b = sink
        .deliver(delivery("SF-006A", &second))
        .await
        .expect("written");
    assert_eq!((a.created, b.created), (Some(true), Some(false)));
    assert_eq!(a.erp_id, b.erp_id);
    let orders = odoo.orders.lock().await;
    assert_eq!(orders.len(), 1, "one sale.order per client reference");
    assert_eq!(orders[0].1["client_order_ref"], "SF-006A");
    assert_eq!(orders[0].1["note"], "second");
    assert_eq!(
        *odoo.calls.lock().await,
        [
            "sale.order.search",
            "sale.order.create",
            "sale.order.search",
            "sale.order.write"
        ]
    );
    assert_eq!(
        odoo.authentications.load(Ordering::SeqCst),
        1,
        "the uid is reused"
    );
}

#[tokio::test]
async fn wrong_api_key_is_a_flow_level_error() {
    let (odoo, base) = start().await;
    let err = sink(&base, "stale-key")
        .deliver(delivery("SF-1", &json!({"partner_id": 1})))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::FlowLevel, "{err}");
    assert!(
        !err.message.contains("stale-key"),
        "credentials never appear in errors: {err}"
    );

    // A key revoked while the worker runs: execute_kw raises AccessDenied; after rotation the probe recovers.
    let sink = sink(&base, "key-1");
    sink.deliver(delivery("SF-1", &json!({"partner_id": 1})))
        .await
        .expect("delivered");
    *odoo.api_key.lock().await = "key-2".into();
    let err = sink
        .deliver(delivery("SF-2", &json!({"partner_id": 1})))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::FlowLevel);
    assert!(err.message.contains("AccessDenied"), "{err}");
    assert!(sink.probe().await.is_err());
    assert_eq!(odoo.orders.lock().await.len(), 1);
}

#[tokio::test]
async fn validation_error_is_permanent() {
    let (odoo, base) = start().await;
    let err = sink(&base, "key-1")
        .deliver(delivery("SF-9", &json!({"note": "no customer"})))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(
        err.message.contains("ValidationError") && err.message.contains("partner_id"),
        "{err}"
    );
    assert!(
        err.response
            .as_deref()
            .is_some_and(|r| r.contains("odoo.exceptions.ValidationError"))
    );
    assert!(odoo.orders.lock().await.is_empty());
}

#[tokio::test]
async fn maintenance_window_is_transient_with_retry_after() {
    let (odoo, base) = start().await;
    odoo.unavailable.store(true, Ordering::SeqCst);
    let err = sink(&base, "key-1")
        .deliver(delivery("SF-1", &json!({"partner_id": 1})))
        .await
        .unwrap_err();
    assert_eq!((err.class, err.status), (ErrorClass::Transient, Some(503)));
    assert_eq!(err.retry_after, Some(std::time::Duration::from_secs(30)));
}

#[tokio::test]
async fn lookup_pages_through_search_read() {
    let (_odoo, base) = start().await;
    let rows = sink(&base, "key-1")
        .fetch_lookup("product.product", "default_code")
        .await
        .expect("lookup");
    assert_eq!(rows.len(), 1200);
    assert_eq!(rows[1199]["default_code"], "SKU-1199");
}

#[tokio::test]
async fn odoo_sink_is_direct_about_its_secret_keys() {
    let mut spec = sink_mock::spec(SinkSystem::Odoo, Some("https://acme.odoo.com"));
    spec.database = Some(DB.into());
    let (_dir, credentials) = secret(&[("login", LOGIN)]);
    let err = OdooSink::from_spec(&spec, &credentials, sinks::http_client())
        .err()
        .expect("refused");
    assert_eq!(err.label(), "sink_credentials");
    assert!(err.to_string().contains("\"apiKey\""), "{err}");
}
