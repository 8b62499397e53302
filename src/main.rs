use std::process::ExitCode;

use clap::Parser;

/// Every record is parsed into, and mapped out of, many small values; mimalloc serves those allocations
/// markedly faster than glibc's malloc (the contract benchmark: about 10 % per record). The benchmarks
/// install the same allocator, so they measure what this binary runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    meshline::worker::allocator::configure();
    init_logging();
    meshline::cli::run(meshline::cli::Cli::parse())
}

/// Structured logs: JSON lines when `MESHLINE_LOG_FORMAT=json` (in the cluster), readable text otherwise;
/// the level comes from `RUST_LOG` (default `info`). Logs go to stderr so command output stays clean.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("MESHLINE_LOG_FORMAT").as_deref() == Ok("json") {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}
