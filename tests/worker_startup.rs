//! The real `meshline worker` binary and its Secrets. No crash loops: started while what it needs is broken
//! (a Secret holding a key that is not PEM, a PostgreSQL ledger that is not up yet), it stays up, says why on
//! `/readyz` and `/status`, refuses webhooks with 503 (nothing accepted and lost), and starts by itself once
//! the problem is fixed, then delivers. Rotation: Secret files swapped in place (as Kubernetes does) are
//! picked up without a restart.

#[path = "support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "support/reliability.rs"]
#[allow(dead_code)]
mod reliability;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use meshline::api::SinkSystem;
use reliability::*;
use serde_json::{Value, json};

/// Give-up bound of every wait: only there so a broken build fails instead of hanging.
const GIVE_UP: Duration = Duration::from_secs(120);

/// A NetSuite double for OAuth 2.0 M2M: the token endpoint verifies the PS256 assertion with the test
/// certificate's public key, the record service wants the token it issued.
struct NetSuiteM2m {
    addr: SocketAddr,
    tokens_issued: Arc<AtomicUsize>,
    upserts: Arc<AtomicUsize>,
}

const ACCESS_TOKEN: &str = "ns-m2m-access-token";

impl NetSuiteM2m {
    async fn start() -> NetSuiteM2m {
        let tokens_issued = Arc::new(AtomicUsize::new(0));
        let upserts = Arc::new(AtomicUsize::new(0));
        let public = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sources/jwt_test_key.pub.pem"
        ))
        .unwrap();
        let issued = tokens_issued.clone();
        let token = move |body: String| {
            let issued = issued.clone();
            let public = public.clone();
            async move {
                let assertion = url::form_urlencoded::parse(body.as_bytes())
                    .find(|(k, _)| k == "client_assertion")
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
                let key = jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap();
                let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::PS256);
                validation.validate_aud = false;
                match jsonwebtoken::decode::<Value>(&assertion, &key, &validation) {
                    Ok(_) => {
                        issued.fetch_add(1, Ordering::SeqCst);
                        axum::Json(json!({"access_token": ACCESS_TOKEN, "expires_in": "3600"}))
                            .into_response()
                    }
                    Err(e) => (
                        StatusCode::BAD_REQUEST,
                        axum::Json(
                            json!({"error": "invalid_client", "error_description": e.to_string()}),
                        ),
                    )
                        .into_response(),
                }
            }
        };
        let authorised = |headers: &HeaderMap| {
            headers.get("authorization").and_then(|v| v.to_str().ok())
                == Some(&format!("Bearer {ACCESS_TOKEN}"))
        };
        let counted = upserts.clone();
        let upsert = move |headers: HeaderMap| {
            let counted = counted.clone();
            async move {
                if !authorised(&headers) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                counted.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::NO_CONTENT,
                    [(
                        "location",
                        "http://erp/services/rest/record/v1/salesOrder/1",
                    )],
                )
                    .into_response()
            }
        };
        let list = move |headers: HeaderMap| async move {
            if authorised(&headers) {
                axum::Json(json!({"items": []})).into_response()
            } else {
                StatusCode::UNAUTHORIZED.into_response()
            }
        };
        let app = axum::Router::new()
            .route(
                "/services/rest/auth/oauth2/v1/token",
                axum::routing::post(token),
            )
            .route(
                "/services/rest/record/v1/salesOrder/{id}",
                axum::routing::put(upsert),
            )
            .route(
                "/services/rest/record/v1/salesOrder",
                axum::routing::get(list),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        NetSuiteM2m {
            addr,
            tokens_issued,
            upserts,
        }
    }
}

/// `meshline worker` as a child process whose start-up is not expected to succeed at first.
struct Process {
    child: Child,
    /// The webhook port.
    url: String,
    /// The operations port.
    ops: String,
    log: PathBuf,
}

impl Process {
    fn spawn(files: &FlowFiles) -> Process {
        let port = free_port();
        let ops_port = free_port();
        let log = files.dir.path().join("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshline"))
            .arg("worker")
            .arg("--flow")
            .arg(files.flow_file())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ops-listen")
            .arg(format!("127.0.0.1:{ops_port}"))
            .arg("--state-dir")
            .arg(files.state_dir("w"))
            .arg("--secrets-dir")
            .arg(files.secrets_dir())
            .arg("--lookups-dir")
            .arg(files.lookups_dir())
            .arg("--token-file")
            .arg(files.token_file())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Process {
            child,
            url: format!("http://127.0.0.1:{port}"),
            ops: format!("http://127.0.0.1:{ops_port}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the worker exited ({status}); log:\n{}", self.log());
        }
    }

    /// Polls `path` on the operations port, with the flow's token, until `done` holds for its status code and
    /// JSON body (`Null` when not JSON).
    async fn wait_for(
        &mut self,
        path: &str,
        what: &str,
        done: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        let http = client();
        let give_up = Instant::now() + GIVE_UP;
        let mut last = None;
        loop {
            self.assert_alive();
            if let Ok(r) = http
                .get(format!("{}{path}", self.ops))
                .bearer_auth(API_TOKEN)
                .send()
                .await
            {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                if done(status, &body) {
                    return body;
                }
                last = Some((status, body));
            }
            assert!(
                Instant::now() < give_up,
                "gave up waiting for {what}; last {path}: {last:?}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn webhook(&self, batch: &[Value]) -> reqwest::Response {
        let body = serde_json::to_vec(batch).unwrap();
        let t = chrono::Utc::now().timestamp();
        client()
            .post(format!("{}/webhook", self.url))
            .header("content-type", "application/json")
            .header(
                "x-meshline-signature",
                meshline::connectors::sources::webhook::meshline_signature(
                    WEBHOOK_SECRET,
                    t,
                    &body,
                ),
            )
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn problem_kinds(body: &Value) -> Vec<String> {
    body["problems"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Stand-in behaviour until the pipeline runs: healthy process, not ready, status and webhooks refused.
async fn assert_waiting_for(worker: &mut Process, kind: &str, mentions: &str) {
    let status = worker
        .wait_for("/status", &format!("{kind} on /status"), |code, body| {
            code == 503 && problem_kinds(body).iter().any(|k| k == kind)
        })
        .await;
    let problem = status["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == kind)
        .unwrap()
        .clone();
    assert!(
        problem["message"].as_str().unwrap().contains(mentions) && problem["since"].is_string(),
        "{problem}"
    );
    assert!(status["error"].as_str().unwrap().contains(kind), "{status}");
    let http = client();
    // The startup problems are status: for the flow's token holders only.
    let anonymous = http
        .get(format!("{}/status", worker.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "the stand-in's /status asks for the token"
    );
    for base in [&worker.url, &worker.ops] {
        let healthz = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(healthz.status(), 200, "the process itself is healthy");
        let readyz = http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(readyz.status(), 503);
    }
    let readyz = http
        .get(format!("{}/readyz", worker.ops))
        .send()
        .await
        .unwrap();
    assert!(readyz.text().await.unwrap().contains(kind));
    // The webhook port, which an Ingress may expose, says that the worker has not started but not why.
    let public = http
        .get(format!("{}/readyz", worker.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!public.contains(kind), "{public}");
    let public_status = http
        .get(format!("{}/status", worker.url))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(public_status.status(), 503);
    assert!(
        !public_status.text().await.unwrap().contains(kind),
        "no status on the webhook port"
    );
    let refused = worker.webhook(&[opportunity(1, 1)]).await;
    assert_eq!(
        refused.status(),
        503,
        "a webhook before the pipeline runs is refused"
    );
    assert!(refused.headers().get("retry-after").is_some());
    worker.assert_alive();
}

/// After the fix: ready, and a record sent by the CRM reaches the ERP.
async fn assert_recovers_and_delivers(worker: &mut Process) {
    worker
        .wait_for("/readyz", "readiness", |code, _| code == 200)
        .await;
    let mut stats = CrmStats::default();
    deliver_batch(
        &client(),
        std::slice::from_ref(&worker.url),
        &[opportunity(1, 1)],
        &mut stats,
        GIVE_UP,
    )
    .await;
    let status = worker
        .wait_for("/status", "the delivery", |code, body| {
            code == 200 && counter(body, "delivered") == 1
        })
        .await;
    assert!(problem_kinds(&status).is_empty(), "{status}");
    let log = worker.log();
    assert!(
        log.contains("worker did not start; retrying") && log.contains("attempt"),
        "every attempt is logged:\n{log}"
    );
}

fn write_secret(files: &FlowFiles, secret: &str, key: &str, value: &str) {
    let dir = files.secrets_dir().join(secret);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(key), value).unwrap();
}

fn rewrite_flow(files: &FlowFiles) {
    std::fs::write(
        files.flow_file(),
        serde_yaml::to_string(&files.rendered).unwrap(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_key_keeps_the_worker_up_until_the_secret_is_fixed() {
    let erp = NetSuiteM2m::start().await;
    let mut files = FlowFiles::new("http://unused", LedgerChoice::Embedded, 2);
    let sink = &mut files.rendered.flow.spec.sink;
    sink.system = SinkSystem::Netsuite;
    sink.base_url = Some(format!("http://{}", erp.addr));
    sink.record_type = Some("salesOrder".into());
    let secret = sink.credentials_secret_ref.name.clone();
    rewrite_flow(&files);
    write_secret(&files, &secret, "clientId", "client-1");
    write_secret(&files, &secret, "certificateId", "cert-1");
    write_secret(
        &files,
        &secret,
        "privateKey",
        "-----BEGIN NONSENSE-----\nnot a key\n",
    );

    let mut worker = Process::spawn(&files);
    assert_waiting_for(&mut worker, "CredentialsInvalid", "privateKey").await;
    assert_eq!(erp.upserts.load(Ordering::SeqCst), 0);

    // The Secret is fixed in place, as a `kubectl apply` of the Secret does; no restart.
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sources/jwt_test_key.pem"),
    )
    .unwrap();
    write_secret(&files, &secret, "privateKey", &good);
    assert_recovers_and_delivers(&mut worker).await;
    assert_eq!(erp.upserts.load(Ordering::SeqCst), 1);
    assert!(erp.tokens_issued.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_database_that_is_not_up_yet_keeps_the_worker_waiting_not_crashing() {
    let erp = Erp::start(ERP_TOKEN).await;
    let port = free_port();
    let url = format!("postgres://meshline@127.0.0.1:{port}/startup");
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Postgres(url.clone()), 2);

    let mut worker = Process::spawn(&files);
    assert_waiting_for(&mut worker, "LedgerUnavailable", "ledger").await;

    // PostgreSQL comes up on the port the Secret names.
    let pg = postgres::PgServer::start_on(port, &[]);
    assert_eq!(pg.create_database("startup"), url);
    assert_recovers_and_delivers(&mut worker).await;
    assert_eq!(erp.orders().len(), 1);
}

/// Lays a Secret out as Kubernetes mounts it: `<key> -> ..data/<key>`, `..data -> ..<version>`.
fn mount_secret(files: &FlowFiles, secret: &str, version: &str, keys: &[(&str, &str)]) {
    let dir = files.secrets_dir().join(secret);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    for (key, value) in keys {
        std::fs::write(data.join(key), format!("{value}\n")).unwrap();
    }
    // The atomic swap: a new symlink renamed over `..data`.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (key, _) in keys {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("..data/{key}"), &link).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_erp_token_is_picked_up_without_a_restart() {
    let erp = Erp::start(ERP_TOKEN).await;
    let files = FlowFiles::new(&erp.base_url(), LedgerChoice::Embedded, 4);
    let secret = files
        .rendered
        .flow
        .spec
        .sink
        .credentials_secret_ref
        .name
        .clone();
    std::fs::remove_file(files.secrets_dir().join(&secret).join("token")).unwrap();
    mount_secret(&files, &secret, "2026_11_30_v1", &[("token", ERP_TOKEN)]);
    let source = files
        .rendered
        .flow
        .spec
        .source
        .credentials_secret_ref
        .name
        .clone();
    std::fs::remove_file(files.secrets_dir().join(&source).join("webhookSecret")).unwrap();
    mount_secret(
        &files,
        &source,
        "2026_11_30_v1",
        &[("webhookSecret", WEBHOOK_SECRET)],
    );
    let mut worker = WorkerProcess::new(&files, "w");
    worker.start().await;
    let http = client();
    let urls = [worker.url()];
    let mut stats = CrmStats::default();
    let first: Vec<Value> = (1..=20).map(|n| opportunity(n, 1)).collect();
    deliver_batch(&http, &urls, &first, &mut stats, GIVE_UP).await;
    worker
        .wait_for("20 delivered", GIVE_UP, |s| counter(s, "delivered") == 20)
        .await;

    // The token is rotated at the ERP (the old one is revoked at once) and in the Secret, in place.
    const NEW_TOKEN: &str = "erp-token-rotated";
    erp.rotate_token(NEW_TOKEN);
    mount_secret(&files, &secret, "2026_11_30_v2", &[("token", NEW_TOKEN)]);
    let second: Vec<Value> = (21..=40).map(|n| opportunity(n, 1)).collect();
    deliver_batch(&http, &urls, &second, &mut stats, GIVE_UP).await;
    let status = worker
        .wait_for("40 delivered", GIVE_UP, |s| counter(s, "delivered") == 40)
        .await;
    assert!(
        status["circuitBreaker"].is_null(),
        "the breaker is closed: {status}"
    );
    assert_eq!(counter(&status, "deadLettered"), 0, "{status}");
    let orders = erp.orders();
    assert!((21..=40).all(|n| orders.contains_key(&external_id(n))));
    // The old token is refused from the rotation on; the ERP refused nothing but that.
    let old = http
        .put(format!("{}/{}", erp.base_url(), external_id(99)))
        .bearer_auth(ERP_TOKEN)
        .header("idempotency-key", format!("{}.1", external_id(99)))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
    let refused: Vec<String> = erp.violations();
    assert!(
        refused.iter().all(|v| v.contains("bearer token")),
        "{refused:?}"
    );

    // The webhook secret is rotated: the CRM signs with the new one, which the worker picks up in place.
    const NEW_WEBHOOK_SECRET: &str = "whsec-rotated";
    mount_secret(
        &files,
        &source,
        "2026_11_30_v2",
        &[("webhookSecret", NEW_WEBHOOK_SECRET)],
    );
    let send = |secret: &'static str, n: usize| {
        let http = http.clone();
        let url = worker.url();
        async move {
            let body = serde_json::to_vec(&[opportunity(n, 1)]).unwrap();
            let t = chrono::Utc::now().timestamp();
            http.post(format!("{url}/webhook"))
                .header("content-type", "application/json")
                .header(
                    "x-meshline-signature",
                    meshline::connectors::sources::webhook::meshline_signature(secret, t, &body),
                )
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let give_up = Instant::now() + GIVE_UP;
    loop {
        let status = send(NEW_WEBHOOK_SECRET, 41).await;
        if status == 200 {
            break;
        }
        // Refused until the worker looks at its Secret again (at most once a second after a refusal).
        assert_eq!(status, 401);
        assert!(
            Instant::now() < give_up,
            "the new webhook secret was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        send(WEBHOOK_SECRET, 42).await,
        401,
        "the old webhook secret is refused"
    );
    worker
        .wait_for("41 delivered", GIVE_UP, |s| counter(s, "delivered") == 41)
        .await;

    // A rotation to a Secret that cannot be used (its token cannot be read) keeps the working credentials and
    // is named on /status. The Secret is looked at every 10 s while deliveries go through, so records keep
    // coming until the problem shows.
    let broken = files.secrets_dir().join(&secret).join("..2026_11_30_v3");
    std::fs::create_dir_all(broken.join("token")).unwrap();
    let tmp = files.secrets_dir().join(&secret).join("..data_tmp");
    std::os::unix::fs::symlink("..2026_11_30_v3", &tmp).unwrap();
    std::fs::rename(&tmp, files.secrets_dir().join(&secret).join("..data")).unwrap();
    let give_up = Instant::now() + GIVE_UP;
    let mut n = 100;
    loop {
        n += 1;
        assert_eq!(send(NEW_WEBHOOK_SECRET, n).await, 200);
        let status = worker.status().await.unwrap_or_default();
        let problem = status["problems"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["kind"] == "CredentialsInvalid"))
            .cloned();
        if let Some(problem) = problem {
            assert!(
                problem["message"].as_str().unwrap().contains("token"),
                "{problem}"
            );
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the unusable Secret was never reported: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let delivered = n as i64 - 100 + 41;
    worker
        .wait_for("deliveries with the previous credentials", GIVE_UP, |s| {
            counter(s, "delivered") == delivered
        })
        .await;
    assert_eq!(worker.starts, 1, "no restart");
    worker.terminate().await;
}
