//! The process's log subscriber, shared by every role: JSON lines in the cluster (`MESHLINE_LOG_FORMAT=json`),
//! readable text otherwise, filtered by `RUST_LOG` (default `info`; `meshline dev`
//! leaves out the per-batch lines, see [`crate::cli::Cli::default_log_filter`]), written to stderr so command output
//! stays clean.
//!
//! In JSON, an event's fields sit at the top level of its line (`flatten_event`), beside `timestamp`,
//! `level`, `target` and `message`: `kubectl logs … | jq 'select(.correlation_id == "…")'` finds every line
//! about one record.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the subscriber for this process; `default` is the filter when `RUST_LOG` is not set.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if std::env::var("MESHLINE_LOG_FORMAT").as_deref() == Ok("json") {
        // `init` also routes the `log` crate's records (some dependencies use it) into the subscriber.
        json(filter, std::io::stderr).init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
}

/// The JSON subscriber: one object per line, event fields at the top level.
pub fn json<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .finish()
}
