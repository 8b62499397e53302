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

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
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
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], html::STYLE).into_response()
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
    let mut response =
        Html(html::flow_view(&flow, &holds, &dead, &state.csrf.token(&nonce), &problems))
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
fn worker_outcome(flow: &FlowRef, reply: Result<backend::WorkerReply, BackendError>, done: &str) -> Response {
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
    actor: String,
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
    let body = json!({
        "deadLetterReason": form.dead_letter_reason,
        "actor": form.actor,
        "reason": form.reason,
    });
    let reply = state
        .backend
        .call(
            &flow,
            http::Method::POST,
            "/dead-letters/replay",
            None,
            Some(body.to_string().into_bytes()),
        )
        .await;
    let done = format!(
        "dead letters with reason {:?} sent for replay",
        form.dead_letter_reason
    );
    worker_outcome(&flow, reply, &done)
}
