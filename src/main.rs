use std::process::ExitCode;

use clap::Parser;

/// Every record is parsed into, and mapped out of, many small values; mimalloc serves those allocations
/// markedly faster than glibc's malloc (the contract benchmark: about 10 % per record). The benchmarks
/// install the same allocator, so they measure what this binary runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    meshline::worker::allocator::configure();
    // Structured logs: JSON lines with `MESHLINE_LOG_FORMAT=json` (in the cluster), see `cli::logging`.
    let cli = meshline::cli::Cli::parse();
    meshline::cli::logging::init(cli.default_log_filter());
    meshline::cli::run(cli)
}
