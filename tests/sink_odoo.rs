//! The Odoo sink against a local JSON-RPC server that behaves like Odoo's `/jsonrpc`: `common.authenticate`
//! answers a uid or `false`, `object.execute_kw` checks db, uid and API key and raises `AccessDenied`, and
//! `sale.order` supports `search` by `client_order_ref`, `search_read` with `[client_order_ref, "in", refs]`,
//! `create` of one record or of a list (all or nothing, as one transaction; raising `ValidationError`
//! without a customer) and `write`, with `order_line` kept as a real one2many (the x2many commands 0–6 applied to
//! `sale.order.line` records, so `[0, 0, …]` on a write appends); `product.product` supports paged
//! `search_read`.

#[path = "support/sink_mock.rs"]
mod sink_mock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use meshline::api::{ErrorClass, SinkSystem};
use meshline::connectors::sinks::{self, odoo::OdooSink};
use meshline::connectors::{BatchLimits, Delivery, Sink};
use serde_json::{Value, json};
use sink_mock::{check_lineage, secret, serve};
use tokio::sync::Mutex;

const DB: &str = "acme-prod";
const LOGIN: &str = "meshline@acme.example";
const UID: i64 = 7;

struct Odoo {
    api_key: Mutex<String>,
    orders: Mutex<Vec<(i64, Value)>>,
    /// `sale.order.line` records by id; an order's `order_line` holds the ids of its lines.
    lines: Mutex<BTreeMap<i64, Value>>,
    next_line: AtomicI64,
    calls: Mutex<Vec<String>>,
    /// The `args` and `kwargs` of every `execute_kw`, in the order of `calls`.
    arguments: Mutex<Vec<(Value, Value)>>,
    unavailable: AtomicBool,
    authentications: AtomicU32,
}

fn fault(id: &Value, name: &str, message: &str) -> Response {
    // Odoo reports exceptions with HTTP 200 and a JSON-RPC error member.
    Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": 200, "message": "Odoo Server Error",
        "data": {"name": name, "debug": "Traceback ...", "message": message, "arguments": [message], "context": {}}}}))
    .into_response()
}

/// Applies x2many commands to a one2many's current ids the way Odoo's ORM does; lines removed from the
/// relation are deleted (a sale order line cannot exist without its order).
fn apply_commands(
    odoo: &Odoo,
    lines: &mut BTreeMap<i64, Value>,
    mut ids: Vec<i64>,
    commands: &Value,
) -> Result<Vec<i64>, String> {
    let commands = commands
        .as_array()
        .ok_or("a one2many value must be a list of commands")?;
    for command in commands {
        let c = command.as_array().ok_or("a command must be a list")?;
        let code = c.first().and_then(Value::as_u64).ok_or("no command code")?;
        let target = c.get(1).and_then(Value::as_i64).unwrap_or(0);
        match code {
            0 => {
                let id = odoo.next_line.fetch_add(1, Ordering::SeqCst);
                lines.insert(id, c.get(2).cloned().unwrap_or(Value::Null));
                ids.push(id);
            }
            1 => {
                if !ids.contains(&target) {
                    return Err(format!("line {target} is not on this order"));
                }
                let line = lines.get_mut(&target).ok_or("missing line")?;
                for (k, v) in c[2].as_object().cloned().unwrap_or_default() {
                    line[k] = v;
                }
            }
            2 | 3 => {
                ids.retain(|i| *i != target);
                lines.remove(&target);
            }
            4 => {
                if !lines.contains_key(&target) {
                    return Err(format!("line {target} does not exist"));
                }
                if !ids.contains(&target) {
                    ids.push(target);
                }
            }
            5 => {
                for id in ids.drain(..) {
                    lines.remove(&id);
                }
            }
            6 => {
                let keep: Vec<i64> = c[2]
                    .as_array()
                    .ok_or("(6, 0, ids) needs ids")?
                    .iter()
                    .filter_map(Value::as_i64)
                    .collect();
                for id in ids.iter().filter(|i| !keep.contains(i)) {
                    lines.remove(id);
                }
                ids = keep;
            }
            other => return Err(format!("unknown x2many command {other}")),
        }
    }
    Ok(ids)
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
            odoo.arguments
                .lock()
                .await
                .push((margs.clone(), kwargs.clone()));
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
                ("sale.order", "search_read") => {
                    // Only the batch's lookup is served: one `in` leaf on the reference.
                    let leaf = &margs[0][0];
                    let (true, Some(refs)) = (
                        leaf[0] == "client_order_ref" && leaf[1] == "in",
                        leaf[2].as_array(),
                    ) else {
                        return fault(&id, "builtins.ValueError", "unsupported domain");
                    };
                    let fields = kwargs["fields"].as_array().cloned().unwrap_or_default();
                    let rows: Vec<Value> = orders
                        .iter()
                        .filter(|(_, o)| refs.contains(&o["client_order_ref"]))
                        .map(|(oid, o)| {
                            let mut row = json!({"id": oid});
                            for f in &fields {
                                let f = f.as_str().unwrap_or_default();
                                row[f] = o.get(f).cloned().unwrap_or(json!(false));
                            }
                            row
                        })
                        .collect();
                    result(&id, json!(rows))
                }
                ("sale.order", "create") => {
                    // `create` takes one dict or a list of them (Odoo 12+), in one transaction.
                    let list = match &margs[0] {
                        Value::Array(list) => list.clone(),
                        one => vec![one.clone()],
                    };
                    if list.iter().any(|vals| vals.get("partner_id").is_none()) {
                        return fault(
                            &id,
                            "odoo.exceptions.ValidationError",
                            "Customer is required (partner_id)",
                        );
                    }
                    let mut lines = odoo.lines.lock().await;
                    let mut staged_lines = lines.clone();
                    let mut staged = Vec::new();
                    for mut vals in list {
                        if let Some(commands) = vals.get("order_line").cloned() {
                            match apply_commands(&odoo, &mut staged_lines, Vec::new(), &commands) {
                                Ok(ids) => vals["order_line"] = json!(ids),
                                Err(e) => return fault(&id, "builtins.ValueError", &e),
                            }
                        }
                        staged.push((100 + (orders.len() + staged.len()) as i64, vals));
                    }
                    *lines = staged_lines;
                    let ids: Vec<i64> = staged.iter().map(|(oid, _)| *oid).collect();
                    orders.extend(staged);
                    result(&id, json!(ids))
                }
                ("sale.order", "write") => {
                    let target = margs[0][0].as_i64();
                    match orders.iter_mut().find(|(id, _)| Some(*id) == target) {
                        Some((_, o)) => {
                            for (k, v) in margs[1].as_object().cloned().unwrap_or_default() {
                                if k == "order_line" {
                                    let current: Vec<i64> = o["order_line"]
                                        .as_array()
                                        .map(|a| a.iter().filter_map(Value::as_i64).collect())
                                        .unwrap_or_default();
                                    let mut lines = odoo.lines.lock().await;
                                    match apply_commands(&odoo, &mut lines, current, &v) {
                                        Ok(ids) => o["order_line"] = json!(ids),
                                        Err(e) => return fault(&id, "builtins.ValueError", &e),
                                    }
                                } else {
                                    o[k] = v;
                                }
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
        lines: Mutex::default(),
        next_line: AtomicI64::new(500),
        calls: Mutex::default(),
        arguments: Mutex::default(),
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

impl Odoo {
    /// The values of the order's lines, in line order, as Odoo's `order_line.read()` would give them.
    async fn order_lines(&self, reference: &str) -> Vec<Value> {
        let orders = self.orders.lock().await;
        let lines = self.lines.lock().await;
        let (_, order) = orders
            .iter()
            .find(|(_, o)| o["client_order_ref"] == reference)
            .expect("order exists");
        order["order_line"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| lines[&id.as_i64().unwrap()].clone())
            .collect()
    }
}

/// What the hubspot-odoo example's mapping emits for a deal: one `[0, 0, values]` create command per line.
fn sale_order(lines: &[(i64, &str)]) -> Value {
    let commands: Vec<Value> = lines
        .iter()
        .map(|(product, qty)| json!([0, 0, {"product_id": product, "product_uom_qty": qty, "price_unit": "500"}]))
        .collect();
    json!({"partner_id": 12, "note": "Big deal", "order_line": commands})
}

#[tokio::test]
async fn updating_an_order_twice_leaves_the_same_lines() {
    let (odoo, base) = start().await;
    let sink = sink(&base, "key-1");
    let payload = sale_order(&[(1, "2"), (2, "1")]);
    let expected = vec![
        json!({"product_id": 1, "product_uom_qty": "2", "price_unit": "500"}),
        json!({"product_id": 2, "product_uom_qty": "1", "price_unit": "500"}),
    ];
    let created = sink
        .deliver(delivery("HS-1001", &payload))
        .await
        .expect("created");
    assert_eq!(created.created, Some(true));
    for update in 1..=2 {
        let written = sink
            .deliver(delivery("HS-1001", &payload))
            .await
            .expect("written");
        assert_eq!(written.created, Some(false));
        assert_eq!(
            odoo.order_lines("HS-1001").await,
            expected,
            "after update {update} the order still has exactly the deal's lines"
        );
    }
    assert_eq!(
        odoo.lines.lock().await.len(),
        2,
        "replaced lines are gone, not orphaned"
    );

    // A changed deal (a quantity changed, a line removed) is what the order then holds.
    let changed = sale_order(&[(1, "5")]);
    sink.deliver(delivery("HS-1001", &changed))
        .await
        .expect("written");
    assert_eq!(
        odoo.order_lines("HS-1001").await,
        [json!({"product_id": 1, "product_uom_qty": "5", "price_unit": "500"})]
    );
}

#[tokio::test]
async fn a_mapping_that_sets_its_own_lines_is_left_alone() {
    let (odoo, base) = start().await;
    let sink = sink(&base, "key-1");
    sink.deliver(delivery("HS-7", &sale_order(&[(1, "1")])))
        .await
        .expect("created");
    // The mapping clears and recreates itself: no second clear is added, the result is the same.
    let own = json!({"partner_id": 12, "order_line": [[5, 0, 0], [0, 0, {"product_id": 3, "product_uom_qty": "4"}]]});
    sink.deliver(delivery("HS-7", &own)).await.expect("written");
    assert_eq!(
        odoo.order_lines("HS-7").await,
        [json!({"product_id": 3, "product_uom_qty": "4"})]
    );
}

#[tokio::test]
async fn a_mixed_batch_is_one_search_one_create_and_a_write_per_existing_order() {
    let (odoo, base) = start().await;
    let sink = sink(&base, "key-1");
    assert_eq!(
        sink.batch_limits(),
        Some(BatchLimits {
            max_records: 100,
            max_bytes: BatchLimits::DEFAULT.max_bytes
        })
    );
    let old = sale_order(&[(1, "1"), (2, "1")]);
    let first = sink.deliver(delivery("HS-1", &old)).await.expect("created");
    let second = sink.deliver(delivery("HS-2", &old)).await.expect("created");
    // Someone else made two orders with the same reference.
    for _ in 0..2 {
        odoo.orders
            .lock()
            .await
            .push((900, json!({"client_order_ref": "HS-DUP", "partner_id": 1})));
    }
    odoo.calls.lock().await.clear();
    odoo.arguments.lock().await.clear();

    let updated = sale_order(&[(3, "4")]);
    let new = json!({"partner_id": 12, "note": "new"});
    let batch = [
        delivery("HS-1", &updated),
        delivery("NEW-1", &new),
        delivery("HS-DUP", &new),
        delivery("HS-2", &updated),
        delivery("NEW-2", &new),
    ];
    let results = sink.deliver_batch(&batch).await.expect("the batch ran");

    assert_eq!(
        *odoo.calls.lock().await,
        [
            "sale.order.search_read",
            "sale.order.create",
            "sale.order.write",
            "sale.order.write"
        ],
        "one search, one create for both new orders, one write per existing order"
    );
    let arguments = odoo.arguments.lock().await;
    assert_eq!(
        arguments[0],
        (
            json!([[[
                "client_order_ref",
                "in",
                ["HS-1", "NEW-1", "HS-DUP", "HS-2", "NEW-2"]
            ]]]),
            json!({"fields": ["client_order_ref"]})
        )
    );
    let created_refs: Vec<&Value> = arguments[1].0[0]
        .as_array()
        .expect("create takes a list")
        .iter()
        .map(|v| &v["client_order_ref"])
        .collect();
    assert_eq!(created_refs, ["NEW-1", "NEW-2"]);

    let outcome = |i: usize| {
        let d = results[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", batch[i].external_id));
        (d.created, d.erp_id.clone())
    };
    assert_eq!(outcome(0), (Some(false), first.erp_id.clone()));
    assert_eq!(outcome(3), (Some(false), second.erp_id.clone()));
    let orders = odoo.orders.lock().await.clone();
    for i in [1, 4] {
        let (created, erp_id) = outcome(i);
        assert_eq!(created, Some(true));
        let order = orders
            .iter()
            .find(|(id, _)| Some(id.to_string()) == erp_id)
            .expect("the id answered is the order created");
        assert_eq!(order.1["client_order_ref"], batch[i].external_id);
    }
    let dup = results[2].as_ref().unwrap_err();
    assert_eq!(dup.class, ErrorClass::Permanent);
    assert!(dup.message.contains("several"), "{dup}");
    drop(arguments);
    for reference in ["HS-1", "HS-2"] {
        assert_eq!(
            odoo.order_lines(reference).await,
            [json!({"product_id": 3, "product_uom_qty": "4", "price_unit": "500"})],
            "{reference}'s lines are replaced by a batch write too"
        );
    }
}

#[tokio::test]
async fn a_failing_create_fails_the_batch_before_anything_is_written() {
    let (odoo, base) = start().await;
    let sink = sink(&base, "key-1");
    let old = json!({"partner_id": 12, "note": "old"});
    sink.deliver(delivery("HS-1", &old)).await.expect("created");
    odoo.calls.lock().await.clear();

    let updated = json!({"partner_id": 12, "note": "updated"});
    let good = json!({"partner_id": 12, "note": "good"});
    let poison = json!({"note": "no customer"});
    let batch = [
        delivery("HS-1", &updated),
        delivery("NEW-OK", &good),
        delivery("NEW-POISON", &poison),
    ];
    let err = sink.deliver_batch(&batch).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("ValidationError"), "{err}");
    assert_eq!(
        *odoo.calls.lock().await,
        ["sale.order.search_read", "sale.order.create"],
        "the existing order is not written when the batch fails"
    );
    {
        let orders = odoo.orders.lock().await;
        assert_eq!(orders.len(), 1, "Odoo created none of the list");
        assert_eq!(orders[0].1["note"], "old");
    }

    // What the pipeline's bisection does next: the halves, until the poison record is alone.
    let results = sink
        .deliver_batch(&batch[..2])
        .await
        .expect("the good half");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let err = sink.deliver_batch(&batch[2..]).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    let orders = odoo.orders.lock().await;
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[0].1["note"], "updated");
}
