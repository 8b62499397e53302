//! `meshline dlq`/`meshline hold` against a worker's closed operations API: a person with `get` on the flow's
//! token Secret needs nothing but `--flow` (the CLI reads the token through the Kubernetes API with their own
//! kubeconfig), and every way the token cannot be had ends in a message that names the Secret and why, with a
//! non-zero exit. The API server and the worker are local stand-ins that check what the real ones check: the
//! person's bearer token and the Secret's path at the API server, the flow's token at the worker.

use std::net::SocketAddr;
use std::process::Command;

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

const PERSON_TOKEN: &str = "person-kube-token";
const FLOW_TOKEN: &str = "flow-token-from-the-secret";
const NS: &str = "revenue-sync";
const FLOW: &str = "won-deals";

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        Json(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
        ),
    )
        .into_response()
}

/// The API server's Secret read: the person's token is required; `locked-down` refuses them `get`.
async fn secret(Path((ns, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    if bearer(&headers) != PERSON_TOKEN {
        return status(401, "Unauthorized", "Unauthorized");
    }
    if ns == "locked-down" {
        return status(
            403,
            "Forbidden",
            &format!(
                "secrets \"{name}\" is forbidden: User \"dana\" cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
            ),
        );
    }
    if ns != NS || name != format!("meshline-{FLOW}-token") {
        return status(404, "NotFound", &format!("secrets \"{name}\" not found"));
    }
    use base64::Engine;
    Json(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "type": "Opaque",
        "data": {"token": base64::engine::general_purpose::STANDARD.encode(FLOW_TOKEN)},
    }))
    .into_response()
}

/// The worker's operations port: the dead letters for the flow's token only.
async fn dead_letters(headers: HeaderMap) -> Response {
    if bearer(&headers) != FLOW_TOKEN {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "the flow's token is required (Authorization: Bearer <token>)"})),
        )
            .into_response();
    }
    Json(
        json!({"items": [{"id": 7, "source_key": "006-A", "dead_letter_reason": "erp:400",
        "updated_at": "2026-12-01T00:00:00Z"}], "next": 7}),
    )
    .into_response()
}

const MARCUS_IDENTITY: &str = "marcus-personal-token-5c1d9e";

/// The worker's approve route, checking what the real one checks: the flow's token, then the person's
/// identity token (only Marcus's is known, and only he holds the record's role), `by` and the reason.
async fn approve(
    Path(id): Path<i64>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if bearer(&headers) != FLOW_TOKEN {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "the flow's token is required"})),
        )
            .into_response();
    }
    let identity = headers
        .get("x-meshline-identity")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if identity != MARCUS_IDENTITY {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "who decides is not known: send your personal token", "reason": "unknown_identity"})),
        )
            .into_response();
    }
    if body["by"] != "marcus" || body["reason"] != "strategic account" || id != 812 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("unexpected request: {body}")})),
        )
            .into_response();
    }
    Json(json!({"record": id, "state": "validated", "approvedBy": "marcus"})).into_response()
}

/// The worker's replay-by-reason route as the real one decides who acts: with an identity token, the owner it
/// names (Marcus's only; a different stated actor refused); without one, the stated actor.
async fn replay(headers: HeaderMap, Json(body): Json<serde_json::Value>) -> Response {
    if bearer(&headers) != FLOW_TOKEN {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "the flow's token is required"})),
        )
            .into_response();
    }
    let stated = body["actor"].as_str().unwrap_or_default();
    let by = match headers
        .get("x-meshline-identity")
        .and_then(|v| v.to_str().ok())
    {
        Some(MARCUS_IDENTITY) if stated.is_empty() || stated == "marcus" => "marcus",
        Some(_) => {
            return (
                StatusCode::FORBIDDEN,
                Json(json!({"error": "who decides is not known: send your personal token"})),
            )
                .into_response();
        }
        None if !stated.is_empty() => stated,
        None => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "actor: who acts is required"})),
            )
                .into_response();
        }
    };
    assert_eq!(body["deadLetterReason"], "erp:400");
    Json(json!({"replayed": [7], "by": by})).into_response()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Stand {
    worker: String,
    kubeconfig: tempfile::NamedTempFile,
}

async fn stand() -> Stand {
    let api =
        serve(Router::new().route("/api/v1/namespaces/{ns}/secrets/{name}", get(secret))).await;
    let worker = serve(
        Router::new()
            .route("/dead-letters", get(dead_letters))
            .route("/records/{id}/approve", axum::routing::post(approve))
            .route("/dead-letters/replay", axum::routing::post(replay)),
    )
    .await;
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        kubeconfig.path(),
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: http://{api}
users:
- name: dana
  user:
    token: {PERSON_TOKEN}
contexts:
- name: local
  context:
    cluster: local
    user: dana
    namespace: {NS}
current-context: local
"
        ),
    )
    .unwrap();
    Stand {
        worker: format!("http://{worker}"),
        kubeconfig,
    }
}

/// Runs `meshline <args>` with the stand's kubeconfig and no token from the test's own environment.
async fn meshline(stand: &Stand, args: &[&str]) -> (bool, String, String) {
    meshline_with(stand, args, None).await
}

/// [`meshline`], with `MESHLINE_IDENTITY_TOKEN` set to `identity` when given.
async fn meshline_with(
    stand: &Stand,
    args: &[&str],
    identity: Option<&str>,
) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let kubeconfig = stand.kubeconfig.path().to_path_buf();
    let identity = identity.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshline"));
        command
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("MESHLINE_TOKEN")
            .env_remove("MESHLINE_TOKEN_FILE")
            .env_remove("MESHLINE_WORKER_URL")
            .env_remove("MESHLINE_IDENTITY_TOKEN");
        if let Some(i) = identity {
            command.env("MESHLINE_IDENTITY_TOKEN", i);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_lists_dead_letters_with_the_token_read_through_their_own_kubeconfig() {
    let s = stand().await;
    let (ok, out, err) = meshline(&s, &["dlq", "list", "--url", &s.worker, "--flow", FLOW]).await;
    assert!(ok, "{err}");
    assert!(out.contains("006-A") && out.contains("erp:400"), "{out}");
    // The namespace may be named instead of taken from the context.
    let (ok, _, err) = meshline(
        &s,
        &["dlq", "list", "--url", &s.worker, "--flow", FLOW, "-n", NS],
    )
    .await;
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_cannot_be_read_is_named_with_its_secret_and_the_reason() {
    let s = stand().await;
    let (ok, _, err) = meshline(
        &s,
        &["dlq", "list", "--url", &s.worker, "--flow", "other-flow"],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("Secret revenue-sync/meshline-other-flow-token not found"),
        "{err}"
    );
    let (ok, _, err) = meshline(
        &s,
        &[
            "dlq",
            "list",
            "--url",
            &s.worker,
            "--flow",
            FLOW,
            "-n",
            "locked-down",
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("locked-down/meshline-won-deals-token")
            && err.contains("`get` on that Secret"),
        "{err}"
    );
    // No token at all: the worker's 401, explained.
    let (ok, _, err) = meshline(&s, &["dlq", "list", "--url", &s.worker]).await;
    assert!(
        !ok && err.contains("HTTP 401") && err.contains("none was given"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_approves_a_hold_in_their_own_name_and_a_refusal_exits_non_zero_with_the_reason() {
    let s = stand().await;
    let approve = |extra: &[&str]| {
        let mut args = vec![
            "hold",
            "approve",
            FLOW,
            "812",
            "--url",
            &s.worker,
            "--by",
            "marcus",
            "--reason",
            "strategic account",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let args = approve(&[]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // The flow's token is read through the kubeconfig (FLOW), the person's from the environment.
    let (ok, out, err) = meshline_with(&s, &argv, Some(MARCUS_IDENTITY)).await;
    assert!(ok, "{err}");
    assert!(out.contains("record 812 approved by marcus"), "{out}");

    // From a file as well.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{MARCUS_IDENTITY}\n")).unwrap();
    let args = approve(&["--identity-token-file", file.path().to_str().unwrap()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = meshline(&s, &argv).await;
    assert!(ok, "{err}");

    // Someone else's token: the worker's 403 and its reason, and a non-zero exit.
    let (ok, _, err) = meshline_with(&s, &argv[..10], Some("somebody-elses-token-123")).await;
    assert!(!ok);
    assert!(
        err.contains("HTTP 403") && err.contains("who decides is not known"),
        "{err}"
    );

    // No personal token at all: refused before any request, saying how to give one.
    let (ok, _, err) = meshline(&s, &argv[..10]).await;
    assert!(!ok);
    assert!(
        err.contains("--identity-token-file") && err.contains("MESHLINE_IDENTITY_TOKEN"),
        "{err}"
    );
    // A reason is required, and the token is never an argument value.
    let (ok, _, err) = meshline_with(&s, &argv[..8], Some(MARCUS_IDENTITY)).await;
    assert!(!ok && err.contains("--reason"), "{err}");
    let (ok, _, _) = meshline_with(
        &s,
        &[&argv[..10], &["--identity-token", MARCUS_IDENTITY]].concat(),
        None,
    )
    .await;
    assert!(!ok, "there is no --identity-token option");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_by_reason_is_recorded_in_the_name_the_personal_token_proves() {
    let s = stand().await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{MARCUS_IDENTITY}\n")).unwrap();
    let base = [
        "dlq",
        "replay",
        "--url",
        &s.worker,
        "--flow",
        FLOW,
        "--reason",
        "erp:400",
        "--why",
        "item created",
    ];
    // With the personal token, no --actor is needed: the worker names who replayed.
    let (ok, out, err) = meshline(
        &s,
        &[
            &base[..],
            &["--identity-token-file", file.path().to_str().unwrap()],
        ]
        .concat(),
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("replayed: [7] by marcus"), "{out}");
    // Someone else's token is the worker's refusal, with a non-zero exit.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), "somebody-elses-token-123").unwrap();
    let (ok, _, err) = meshline(
        &s,
        &[
            &base[..],
            &["--identity-token-file", other.path().to_str().unwrap()],
        ]
        .concat(),
    )
    .await;
    assert!(!ok && err.contains("HTTP 403"), "{err}");
    // An empty token file is refused before any request.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let (ok, _, err) = meshline(
        &s,
        &[
            &base[..],
            &["--identity-token-file", empty.path().to_str().unwrap()],
        ]
        .concat(),
    )
    .await;
    assert!(
        !ok && err.contains("your personal token is needed to replay"),
        "{err}"
    );
    // Without one, --actor is required, and recorded as stated (the flow's token vouches for it).
    let (ok, _, err) = meshline(&s, &base).await;
    assert!(!ok && err.contains("--actor"), "{err}");
    let (ok, out, err) = meshline(&s, &[&base[..], &["--actor", "dana"]].concat()).await;
    assert!(ok, "{err}");
    assert!(out.contains("by dana"), "{out}");
}
