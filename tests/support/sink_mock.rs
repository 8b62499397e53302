//! Helpers for the sink tests: a local axum server on 127.0.0.1:0, a Secret directory and sink specs.
//! Included with `#[path = "support/sink_mock.rs"] mod sink_mock;` by each `tests/sink_*.rs`.
#![allow(dead_code)]

use std::path::Path;

use meshline::api::{SecretRef, SinkOperation, SinkSpec, SinkSystem};
use meshline::connectors::Credentials;

/// Serves `router` on a free loopback port; returns `http://127.0.0.1:PORT`.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("mock server");
    });
    format!("http://{addr}")
}

/// A mounted-Secret-like directory with one file per key.
pub fn secret(keys: &[(&str, &str)]) -> (tempfile::TempDir, Credentials) {
    let dir = tempfile::tempdir().expect("temp dir");
    for (key, value) in keys {
        // A trailing newline, the way `kubectl create secret --from-file` often leaves one.
        std::fs::write(dir.path().join(key), format!("{value}\n")).expect("write secret key");
    }
    let credentials = Credentials::new(Some(dir.path()), "sink_test_unused");
    (dir, credentials)
}

pub fn spec(system: SinkSystem, base_url: Option<&str>) -> SinkSpec {
    SinkSpec {
        system,
        operation: SinkOperation::Upsert,
        base_url: base_url.map(str::to_string),
        record_type: None,
        database: None,
        model: None,
        table: None,
        credentials_secret_ref: SecretRef {
            name: "sink-credentials".into(),
        },
        bulk: None,
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The header value, or "" when absent.
pub fn header<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Checks the lineage headers every sink request must carry; `Err` names what is wrong.
pub fn check_lineage(headers: &axum::http::HeaderMap) -> Result<String, String> {
    let correlation = header(headers, "x-correlation-id");
    if correlation.is_empty() {
        return Err("X-Correlation-Id is missing".into());
    }
    let traceparent = header(headers, "traceparent");
    if traceparent != meshline::connectors::traceparent(correlation) {
        return Err(format!(
            "traceparent {traceparent:?} does not belong to {correlation:?}"
        ));
    }
    Ok(correlation.to_string())
}
