//! What `meshline worker` serves while its pipeline cannot start yet (a Secret holding a malformed key, a
//! PostgreSQL ledger that is not up): the process stays alive and says why, instead of exiting into a
//! crash loop. On both ports `/healthz` answers ok (the process is fine; restarting it fixes nothing) and
//! `/readyz` answers 503 with the reason; the operations port's `/status` answers the flow's token holder
//! 503 with `{"error", "problems"}` for the controller to name in a condition; everything else, webhooks
//! included, gets 503 with `Retry-After`: nothing is stored, so the CRM keeps the record and sends it again.
//! Once the worker starts, its own routers take over the sockets.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use super::problems::Problems;

/// Seconds a refused caller is asked to wait.
const RETRY_AFTER_SECS: u64 = 5;

/// The stand-in server of a worker that has not started.
pub struct Starting {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct State {
    flow: Arc<str>,
    problems: Arc<Problems>,
    /// The flow's token: the startup problems are status, and status is for its holders only.
    token: Option<Arc<str>>,
    /// The webhook port, which an Ingress may expose: it says that the worker has not started, never why.
    public: bool,
}

impl State {
    /// One line: what keeps the worker from starting, or that it is still trying for the first time.
    fn reason(&self) -> String {
        let problems = self.problems.list();
        if self.public {
            return format!("the worker of flow {} has not started", self.flow);
        }
        if problems.is_empty() {
            return format!("the worker of flow {} is starting", self.flow);
        }
        let causes: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.kind, p.message))
            .collect();
        format!(
            "the worker of flow {} has not started ({}); it retries with backoff",
            self.flow,
            causes.join("; ")
        )
    }
}

/// Serves the stand-in routes on `listeners` (clones of the worker's sockets) until [`Starting::stop`].
pub fn serve(
    listeners: super::Listeners,
    flow: &str,
    problems: Arc<Problems>,
    token: Option<Arc<str>>,
) -> std::io::Result<Starting> {
    let state = State {
        flow: Arc::from(flow),
        problems,
        token,
        public: false,
    };
    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    let webhook_app = health.clone().fallback(refuse).with_state(State {
        public: true,
        ..state.clone()
    });
    let ops_app = health
        .route("/status", get(status))
        .fallback(refuse)
        .with_state(state);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for (listener, app) in [(listeners.webhook, webhook_app), (listeners.ops, ops_app)] {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the start-up status server stopped");
            }
        }));
    }
    Ok(Starting { stop, tasks })
}

impl Starting {
    /// Stops accepting; requests in progress are answered first.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn readyz(axum::extract::State(state): axum::extract::State<State>) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": state.reason() })),
    )
        .into_response()
}

async fn status(
    axum::extract::State(state): axum::extract::State<State>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(refused) = super::api::check_token(state.token.as_deref(), &headers) {
        return refused.response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": state.reason(), "problems": state.problems.list() })),
    )
        .into_response()
}

async fn refuse(axum::extract::State(state): axum::extract::State<State>) -> Response {
    // Whoever calls (a CRM, anyone) learns that the worker has not started, not why: the causes are status.
    let public = State {
        public: true,
        ..state
    };
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "error": "not_started",
            "reason": format!("{}; nothing was stored, retry later", public.reason()),
        })),
    )
        .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(RETRY_AFTER_SECS),
    );
    response
}
