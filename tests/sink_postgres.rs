//! The PostgreSQL sink against a real server started by the harness (`tests/support/postgres.rs`).

mod support;

#[path = "support/sink_mock.rs"]
mod sink_mock;

use meshline::api::{ErrorClass, SinkSystem};
use meshline::connectors::sinks::{self, postgres::PostgresSink};
use meshline::connectors::{Delivery, Sink};
use serde_json::{Value, json};
use sqlx::Row;
use support::postgres::PgServer;

fn delivery<'a>(external_id: &'a str, payload: &'a Value, correlation_id: &'a str) -> Delivery<'a> {
    Delivery {
        external_id,
        payload,
        correlation_id,
        attempt: 1,
    }
}

#[tokio::test]
async fn postgres_sink_keeps_its_promises() {
    // One server for the whole file: starting PostgreSQL costs more than every check below together.
    let pg = PgServer::start();
    retried_delivery_updates_instead_of_duplicating(&pg).await;
    data_postgres_cannot_store_is_a_permanent_error(&pg).await;
    unknown_role_is_a_flow_level_error(&pg).await;
    lookup_reads_rows_as_objects(&pg).await;
    unreachable_server_is_transient().await;
}

async fn retried_delivery_updates_instead_of_duplicating(pg: &PgServer) {
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    sqlx::query("CREATE SCHEMA erp")
        .execute(&pool)
        .await
        .expect("schema");
    let mut spec = sink_mock::spec(SinkSystem::Postgres, None);
    spec.table = Some("erp.sales_orders".into());
    let (_dir, credentials) = sink_mock::secret(&[("url", &pg.url())]);
    let sink =
        sinks::build(&spec, credentials, sinks::http_client()).expect("builds without connecting");

    let a = sink
        .deliver(delivery("SF-1", &json!({"amount": "10.00"}), "c1"))
        .await
        .expect("inserted");
    let b = sink
        .deliver(delivery("SF-1", &json!({"amount": "12.50"}), "c2"))
        .await
        .expect("updated");
    assert_eq!((a.created, b.created), (Some(true), Some(false)));
    let rows = sqlx::query(
        "SELECT external_id, payload::text AS payload, correlation_id FROM erp.sales_orders",
    )
    .fetch_all(&pool)
    .await
    .expect("table created by the sink");
    assert_eq!(rows.len(), 1, "one row per external id");
    let payload: Value = serde_json::from_str(&rows[0].get::<String, _>("payload")).unwrap();
    assert_eq!(payload, json!({"amount": "12.50"}));
    assert_eq!(rows[0].get::<String, _>("correlation_id"), "c2");
    sink.probe().await.expect("probe");
}

async fn data_postgres_cannot_store_is_a_permanent_error(pg: &PgServer) {
    let sink = PostgresSink::connect_lazy(&pg.url(), "orders").expect("builds");
    // jsonb cannot hold U+0000 (SQLSTATE 22P05): the record is wrong, not the database.
    let err = sink
        .deliver(delivery("SF-2", &json!({"memo": "nul\u{0}byte"}), "c"))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("SQLSTATE 22"), "{err}");
    sink.deliver(delivery("SF-3", &json!({"memo": "fine"}), "c"))
        .await
        .expect("the next record passes");
}

async fn unknown_role_is_a_flow_level_error(pg: &PgServer) {
    let url = format!(
        "postgres://nobody:secret-pw@127.0.0.1:{}/postgres",
        pg.port()
    );
    let sink = PostgresSink::connect_lazy(&url, "orders").expect("builds");
    let err = sink
        .deliver(delivery("SF-1", &json!({}), "c"))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::FlowLevel, "{err}");
    assert!(
        !err.to_string().contains("secret-pw"),
        "no password in errors: {err}"
    );
}

async fn lookup_reads_rows_as_objects(pg: &PgServer) {
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    sqlx::query("CREATE TABLE pricebook (sku text, price numeric)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO pricebook VALUES ('A-1', 9.50), ('B-2', 12), (NULL, 1)")
        .execute(&pool)
        .await
        .unwrap();
    let sink = PostgresSink::connect_lazy(&pg.url(), "orders").expect("builds");
    let mut rows = sink.fetch_lookup("pricebook", "sku").await.expect("lookup");
    rows.sort_by_key(|r| r["sku"].as_str().map(str::to_string));
    assert_eq!(
        rows,
        [
            json!({"sku": "A-1", "price": 9.50}),
            json!({"sku": "B-2", "price": 12})
        ]
    );
    let err = sink
        .fetch_lookup("pricebook; DROP TABLE x", "sku")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Config);
}

async fn unreachable_server_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = PostgresSink::connect_lazy(
        &format!("postgres://meshline@127.0.0.1:{port}/postgres"),
        "orders",
    )
    .unwrap();
    let err = sink
        .deliver(delivery("SF-1", &json!({}), "c"))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
}
