use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    meshline::cli::run(meshline::cli::Cli::parse())
}
