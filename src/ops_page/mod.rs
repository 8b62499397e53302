//! The operations web page, served by the controller (`--ops-page-addr`, off by default) and by
//! `meshline dev`: for people who do not use kubectl. It shows every flow with its health, counts, canary
//! state, last audit and open tickets; the exceptions by owner; and per flow the held records (their
//! context as the worker redacted it) with approve and reject forms, and the dead letters by reason with a
//! replay per reason. Server-rendered HTML without any JavaScript.
//!
//! Owns the HTTP routes, the HTML and the browser-facing safety (see [`guard`]). It does not own who may
//! decide: an approval or rejection is forwarded to the flow's worker with the person's own personal token
//! (typed into the form's password field, forwarded once, kept nowhere), and the worker checks it against
//! the roster's identity Secret and the hold's approver role; its refusal is what the person reads. The page
//! has no credential of its own in any URL, and it sits behind the cluster's own access control
//! (`kubectl port-forward`, or an Ingress with the organisation's SSO in front).
//!
//! The password field rather than a sign-in cookie: nothing of a person's token outlives the one request
//! it was typed for, so a page left open, a shared browser or a stolen cookie cannot approve anything.
//!
//! Data comes through [`backend::OpsBackend`]: the controller's caches and its worker path
//! ([`cluster::ClusterBackend`]), or worker URLs and token files ([`backend::DirectBackend`]).

pub mod backend;
pub mod cluster;
pub mod guard;
pub mod html;

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

pub use backend::{BackendError, DirectBackend, DirectFlow, FlowRef, OpsBackend};
use guard::CsrfKey;
use html::{DeadLetter, HeldRecord};

/// The most held records and dead letters one flow view lists (the worker's own page limit).
pub const MAX_LISTED: usize = 1000;

#[derive(Clone)]
struct PageState {
    backend: Arc<dyn OpsBackend>,
    csrf: CsrfKey,
}

/// The page's routes, every answer carrying the security headers of [`guard::secure_headers`].
pub fn router(backend: Arc<dyn OpsBackend>) -> Router {
    let state = PageState {
        backend,
        csrf: CsrfKey::random(),
    };
    Router::new()
        .route("/", get(main_page))
        .route("/exceptions", get(exceptions_page))
        .route("/style.css", get(style))
        .route("/flows/{namespace}/{name}", get(flow_page))
        .route(
            "/flows/{namespace}/{name}/records/{id}/{action}",
            post(decide),
        )
        .route(
            "/flows/{namespace}/{name}/dead-letters/replay",
            post(replay_by_reason),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Html(html::error_view("Not found", "there is no such page")),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |State(state): State<PageState>,
             request: axum::extract::Request,
             next: axum::middleware::Next| async move {
                match state.backend.unavailable() {
                    Some(why) => refused(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", &why),
                    None => next.run(request).await,
                }
            },
        ))
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                guard::secure_headers(response.headers_mut());
                response
            },
        ))
        .with_state(state)
}

/// Serves the page on `listener` until the process stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn OpsBackend>,
) -> std::io::Result<()> {
    axum::serve(listener, router(backend)).await
}

async fn main_page(State(state): State<PageState>) -> Response {
    Html(html::main_view(&state.backend.flows().await)).into_response()
}

async fn exceptions_page(State(state): State<PageState>) -> Response {
    let (flows, rosters) = (state.backend.flows().await, state.backend.rosters().await);
    Html(html::exceptions_view(&flows, &rosters)).into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        html::STYLE,
    )
        .into_response()
}

#[derive(Deserialize)]
struct Listed<T> {
    #[serde(default = "Vec::new")]
    items: Vec<T>,
}

async fn list<T: serde::de::DeserializeOwned>(
    backend: &dyn OpsBackend,
    flow: &FlowRef,
    path: &str,
) -> Result<Vec<T>, BackendError> {
    let reply = backend
        .call(flow, http::Method::GET, path, None, None)
        .await?;
    Ok(backend::read_json::<Listed<T>>(flow, path, &reply)?.items)
}

async fn flow_page(
    State(state): State<PageState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let flow = FlowRef { namespace, name };
    let backend = state.backend.as_ref();
    let holds_path = format!("/holds?limit={MAX_LISTED}");
    let dead_path = format!("/dead-letters?limit={MAX_LISTED}");
    let (holds, dead) = tokio::join!(
        list::<HeldRecord>(backend, &flow, &holds_path),
        list::<DeadLetter>(backend, &flow, &dead_path)
    );
    if let Err(BackendError::NoSuchFlow { .. }) = &holds {
        return (
            StatusCode::NOT_FOUND,
            Html(html::error_view(
                "No such flow",
                &format!("flow {flow} is not known to the operations page"),
            )),
        )
            .into_response();
    }
    let mut problems = Vec::new();
    let holds = holds.unwrap_or_else(|e| {
        problems.push(format!("held records: {e}"));
        Vec::new()
    });
    let dead = dead.unwrap_or_else(|e| {
        problems.push(format!("dead letters: {e}"));
        Vec::new()
    });
    // One nonce per browser, kept while its cookie lives; a new one when it has none.
    let (nonce, fresh) = match guard::cookie_nonce(&headers) {
        Some(n) => (n, false),
        None => (guard::new_nonce(), true),
    };
    let mut response = Html(html::flow_view(
        &flow,
        &holds,
        &dead,
        &state.csrf.token(&nonce),
        &problems,
    ))
    .into_response();
    if fresh && let Ok(cookie) = HeaderValue::from_str(&guard::nonce_cookie(&nonce)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

fn refused(status: StatusCode, title: &str, why: &str) -> Response {
    (status, Html(html::error_view(title, why))).into_response()
}

/// A decision as the form posts it.
#[derive(Deserialize)]
struct DecisionForm {
    csrf: String,
    identity: String,
    reason: String,
    /// The hold as shown: the worker refuses the decision if the record has changed since.
    generation: i64,
    #[serde(default)]
    role: String,
}

/// The worker's answer to an intervention, as the person reads it.
fn worker_outcome(
    flow: &FlowRef,
    reply: Result<backend::WorkerReply, BackendError>,
    done: &str,
) -> Response {
    match reply {
        Ok(r) if (200..300).contains(&r.status) => {
            Html(html::outcome_view(flow, true, done)).into_response()
        }
        Ok(r) => {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let message = format!("the worker refused (HTTP {}): {}", r.status, r.message());
            (status, Html(html::outcome_view(flow, false, &message))).into_response()
        }
        Err(BackendError::NoSuchFlow { .. }) => refused(
            StatusCode::NOT_FOUND,
            "No such flow",
            &format!("flow {flow} is not known to the operations page"),
        ),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Html(html::outcome_view(flow, false, &e.to_string())),
        )
            .into_response(),
    }
}

async fn decide(
    State(state): State<PageState>,
    headers: HeaderMap,
    Path((namespace, name, id, action)): Path<(String, String, i64, String)>,
    form: Result<Form<DecisionForm>, FormRejection>,
) -> Response {
    let flow = FlowRef { namespace, name };
    if action != "approve" && action != "reject" {
        return refused(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("{action:?} is not a decision: approve or reject"),
        );
    }
    let Form(form) = match form {
        Ok(f) => f,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "Bad request",
                &format!("the {action} form of record {id} of flow {flow}: {e}"),
            );
        }
    };
    if let Err(why) = guard::check_post(&state.csrf, &headers, &form.csrf) {
        tracing::warn!(flow = %flow, record = id, action, "ops page: a form post failed the same-origin or CSRF check");
        return refused(StatusCode::FORBIDDEN, "Refused", &why);
    }
    let identity = form.identity.trim();
    if identity.is_empty() {
        return refused(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "identity: your personal token is required to decide",
        );
    }
    let body = json!({
        "reason": form.reason,
        "seen": {
            "generation": form.generation,
            "holdRole": (!form.role.is_empty()).then_some(form.role.as_str()),
        },
    });
    let path = format!("/records/{id}/{action}");
    let reply = state
        .backend
        .call(
            &flow,
            http::Method::POST,
            &path,
            Some(identity),
            Some(body.to_string().into_bytes()),
        )
        .await;
    let done = if action == "approve" {
        format!("record {id} approved")
    } else {
        format!("record {id} rejected")
    };
    worker_outcome(&flow, reply, &done)
}

#[derive(Deserialize)]
struct ReplayForm {
    csrf: String,
    dead_letter_reason: String,
    /// The person's personal token: the worker records the replay in the name of the owner it names.
    identity: String,
    reason: String,
}

async fn replay_by_reason(
    State(state): State<PageState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    form: Result<Form<ReplayForm>, FormRejection>,
) -> Response {
    let flow = FlowRef { namespace, name };
    let Form(form) = match form {
        Ok(f) => f,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "Bad request",
                &format!("the replay form of flow {flow}: {e}"),
            );
        }
    };
    if let Err(why) = guard::check_post(&state.csrf, &headers, &form.csrf) {
        tracing::warn!(flow = %flow, "ops page: a form post failed the same-origin or CSRF check");
        return refused(StatusCode::FORBIDDEN, "Refused", &why);
    }
    let identity = form.identity.trim();
    if identity.is_empty() {
        return refused(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "identity: your personal token is required to replay",
        );
    }
    let body = json!({
        "deadLetterReason": form.dead_letter_reason,
        "reason": form.reason,
    });
    let reply = state
        .backend
        .call(
            &flow,
            http::Method::POST,
            "/dead-letters/replay",
            Some(identity),
            Some(body.to_string().into_bytes()),
        )
        .await;
    let done = format!(
        "dead letters with reason {:?} sent for replay",
        form.dead_letter_reason
    );
    worker_outcome(&flow, reply, &done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, SyncFlow};

    const HOSTILE: &str = "<script>alert(1)</script>";
    const BREAKOUT: &str = "\"'><img onerror>";

    /// A backend whose every value is hostile markup, and which records what reached the worker.
    #[derive(Default)]
    struct Hostile {
        calls: std::sync::Mutex<Vec<(String, Option<String>)>>,
    }

    fn hostile_flow() -> SyncFlow {
        let mut flow: SyncFlow = serde_json::from_value(json!({
            "apiVersion": "sync.meshline.io/v1alpha1",
            "kind": "SyncFlow",
            "metadata": {"name": "closed-won", "namespace": "sales"},
            "spec": serde_json::from_str::<serde_json::Value>(
                &serde_yaml::from_str::<serde_json::Value>(&std::fs::read_to_string(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite/flow.yaml"),
                ).unwrap()).unwrap()["spec"].to_string()
            ).unwrap(),
        }))
        .unwrap();
        let status = flow.status.get_or_insert_with(Default::default);
        status.conditions.push(Condition {
            r#type: "Ready".into(),
            status: "False".into(),
            reason: BREAKOUT.into(),
            message: HOSTILE.into(),
            observed_generation: None,
            last_transition_time: None,
        });
        status.failure_rate = Some(HOSTILE.into());
        flow
    }

    #[async_trait::async_trait]
    impl OpsBackend for Hostile {
        async fn flows(&self) -> Vec<SyncFlow> {
            vec![hostile_flow()]
        }
        async fn rosters(&self) -> Vec<crate::api::OwnershipRoster> {
            Vec::new()
        }
        async fn call(
            &self,
            _flow: &FlowRef,
            method: http::Method,
            path: &str,
            identity: Option<&str>,
            _body: Option<Vec<u8>>,
        ) -> Result<backend::WorkerReply, BackendError> {
            self.calls
                .lock()
                .unwrap()
                .push((format!("{method} {path}"), identity.map(str::to_string)));
            let item = json!({
                "id": 7, "generation": 2, "source_key": HOSTILE, "external_id": BREAKOUT,
                "hold_rule": HOSTILE, "hold_role": BREAKOUT,
                "dead_letter_reason": BREAKOUT, "last_error": HOSTILE,
                "payload": {"Name": HOSTILE, "Description": BREAKOUT},
            });
            Ok(backend::WorkerReply {
                status: 200,
                body: json!({ "items": [item] }).to_string().into_bytes(),
            })
        }
    }

    async fn serve_hostile() -> (String, Arc<Hostile>) {
        let backend = Arc::new(Hostile::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, backend.clone()));
        (format!("http://{addr}"), backend)
    }

    fn assert_inert(page: &str) {
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("\"'>"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
    }

    #[tokio::test]
    async fn hostile_values_in_flows_holds_and_dead_letters_render_inert_with_strict_headers() {
        let (base, _) = serve_hostile().await;
        let http = reqwest::Client::new();
        for path in ["/", "/exceptions", "/flows/sales/closed-won"] {
            let response = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            let h = response.headers().clone();
            assert_eq!(
                h["content-security-policy"],
                "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                 base-uri 'none'"
            );
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(h["referrer-policy"], "no-referrer");
            assert_eq!(h["x-frame-options"], "DENY");
            let page = response.text().await.unwrap();
            if path != "/exceptions" {
                assert_inert(&page);
            }
        }
        let flow_page = http
            .get(format!("{base}/flows/sales/closed-won"))
            .send()
            .await
            .unwrap();
        let cookie = flow_page.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let page = flow_page.text().await.unwrap();
        assert!(
            page.contains("&quot;&#39;&gt;&lt;img onerror&gt;"),
            "{page}"
        );
        // An unknown page is an error page with the same headers.
        let missing = http.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.headers()["x-content-type-options"], "nosniff");
    }

    /// The CSRF token the flow page put into its forms, and the cookie it set.
    async fn form_credentials(http: &reqwest::Client, base: &str) -> (String, String) {
        let response = http
            .get(format!("{base}/flows/sales/closed-won"))
            .send()
            .await
            .unwrap();
        let cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let page = response.text().await.unwrap();
        let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
        let token = page[at..at + 64].to_string();
        (cookie, token)
    }

    #[tokio::test]
    async fn a_cross_site_or_tokenless_post_is_refused_and_never_reaches_the_worker() {
        let (base, backend) = serve_hostile().await;
        let http = reqwest::Client::new();
        let (cookie, token) = form_credentials(&http, &base).await;
        let host = base.trim_start_matches("http://").to_string();
        let approve = format!("{base}/flows/sales/closed-won/records/7/approve");
        let form = |csrf: &str| {
            vec![
                ("csrf", csrf.to_string()),
                ("identity", "marcus-personal-token-7f3a9c21".to_string()),
                ("reason", "fine".to_string()),
                ("generation", "2".to_string()),
                ("role", "finance".to_string()),
            ]
        };
        let attempts = [
            (
                "foreign origin",
                "https://evil.example",
                Some(cookie.as_str()),
                token.clone(),
            ),
            (
                "missing CSRF token",
                base.as_str(),
                Some(cookie.as_str()),
                String::new(),
            ),
            ("missing cookie", base.as_str(), None, token.clone()),
        ];
        for (what, origin, cookie, csrf) in attempts {
            let mut request = http
                .post(&approve)
                .header("origin", origin)
                .form(&form(&csrf));
            if let Some(c) = cookie {
                request = request.header("cookie", c);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 403, "{what}");
            assert_eq!(
                response.headers()["content-security-policy"],
                guard::CONTENT_SECURITY_POLICY,
                "{what}"
            );
        }
        let cross_site = http
            .post(&approve)
            .header("sec-fetch-site", "cross-site")
            .header("cookie", &cookie)
            .form(&form(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(cross_site.status(), 403);
        let posts = |b: &Hostile| {
            b.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(c, _)| c.starts_with("POST"))
                .count()
        };
        assert_eq!(posts(&backend), 0, "a refused post reached the worker");
        // The same form from the page itself goes through, with the person's token as their identity.
        let own = http
            .post(&approve)
            .header("origin", format!("http://{host}"))
            .header("sec-fetch-site", "same-origin")
            .header("cookie", &cookie)
            .form(&form(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(own.status(), 200);
        let calls = backend.calls.lock().unwrap().clone();
        assert!(
            calls.contains(&(
                "POST /records/7/approve".to_string(),
                Some("marcus-personal-token-7f3a9c21".to_string())
            )),
            "{calls:?}"
        );
    }

    /// Replay by reason is done in a named person's name: without their token the page refuses it; with it
    /// the token travels as the identity (the worker checks it and records that owner), never a typed name.
    #[tokio::test]
    async fn a_replay_by_reason_needs_the_persons_token_and_forwards_it_as_the_identity() {
        let (base, backend) = serve_hostile().await;
        let http = reqwest::Client::new();
        let (cookie, token) = form_credentials(&http, &base).await;
        let replay = format!("{base}/flows/sales/closed-won/dead-letters/replay");
        let post = |identity: &'static str| {
            http.post(&replay)
                .header("origin", base.clone())
                .header("sec-fetch-site", "same-origin")
                .header("cookie", &cookie)
                .form(&[
                    ("csrf", token.as_str()),
                    ("dead_letter_reason", "erp:400"),
                    ("identity", identity),
                    ("reason", "the ERP's item is fixed"),
                ])
                .send()
        };
        let tokenless = post("  ").await.unwrap();
        assert_eq!(tokenless.status(), 400);
        assert!(tokenless.text().await.unwrap().contains("personal token"));
        assert!(
            backend
                .calls
                .lock()
                .unwrap()
                .iter()
                .all(|(c, _)| !c.starts_with("POST")),
            "a replay without a person reached the worker"
        );
        assert_eq!(
            post("priya-personal-token-99c1e0aa")
                .await
                .unwrap()
                .status(),
            200
        );
        let calls = backend.calls.lock().unwrap().clone();
        assert!(
            calls.contains(&(
                "POST /dead-letters/replay".to_string(),
                Some("priya-personal-token-99c1e0aa".to_string())
            )),
            "{calls:?}"
        );
    }
}
