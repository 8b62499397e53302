//! The controller's errors: one enum for the reconcile layer, each variant naming the object and the step that
//! failed, and each with a short stable label for metrics, logs and tickets.
//!
//! Semantically wrong manifests are *not* errors here: they become conditions and Events (see `flow::validate`),
//! because an error triggers a retry with backoff and a bad manifest does not heal by retrying.

/// A reconcile step that failed and will be retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("{action} {kind} {object}: {source}")]
    Api {
        action: &'static str,
        kind: String,
        object: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// The worker configuration could not be rendered (serialisation), which is a bug, not bad input.
    #[error("{object}: cannot render the worker configuration: {reason}")]
    Render { object: String, reason: String },
    /// An object arrived without a namespace (every Meshline kind is namespaced).
    #[error("{kind} {name} has no namespace")]
    NoNamespace { kind: &'static str, name: String },
}

impl Error {
    /// Short stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Api { source, .. } => match source.as_ref() {
                kube::Error::Api(status) if status.code == 409 => "api_conflict",
                kube::Error::Api(status) if status.code == 403 => "api_forbidden",
                kube::Error::Api(status) if status.code == 404 => "api_not_found",
                kube::Error::Api(status) if status.code == 422 => "api_invalid",
                kube::Error::Api(_) => "api_error",
                _ => "api_unreachable",
            },
            Error::Render { .. } => "render",
            Error::NoNamespace { .. } => "no_namespace",
        }
    }

    pub(crate) fn api(
        action: &'static str,
        kind: impl Into<String>,
        object: impl Into<String>,
        source: kube::Error,
    ) -> Error {
        Error::Api {
            action,
            kind: kind.into(),
            object: object.into(),
            source: Box::new(source),
        }
    }
}

/// Start-up and operations failures of `meshline controller` (not of one reconcile).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "cannot build a Kubernetes client from the kubeconfig or the in-cluster service account: {0}"
    )]
    Client(#[source] Box<kube::Error>),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("leader election on Lease {namespace}/{name}: {reason}")]
    Lease {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("lost the leader Lease; stopping so that the new leader is the only writer")]
    LostLeadership,
    #[error("{0}")]
    Config(String),
}

impl RunError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            RunError::Client(_) => "client",
            RunError::Listen { .. } => "listen",
            RunError::Lease { .. } => "lease",
            RunError::LostLeadership => "lost_leadership",
            RunError::Config(_) => "config",
        }
    }
}
