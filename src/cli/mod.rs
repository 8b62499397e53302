//! The `meshline` command line: one binary, one subcommand per role.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod contract;
pub mod controller;
mod dev;
pub mod logging;
mod replay;
mod worker;

/// Meshline: CRM→ERP syncs as executable contracts, enforced at runtime.
#[derive(Debug, Parser)]
#[command(name = "meshline", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log filter when `RUST_LOG` is not set. `meshline dev` prints its own summary on a terminal, and a
    /// worker's `info` line per stored batch and per batch of outcomes (what a cluster's log pipeline wants)
    /// would bury it, so there the worker's intake and pipeline say only warnings.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Dev(_) => "info,meshline::worker::intake=warn,meshline::worker::pipeline=warn",
            _ => "info",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions, or write them to a directory.
    Crd {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the operator: reconcile flows, contracts and rosters; write worker status back to the flows.
    Controller(Box<controller::ControllerArgs>),
    /// Run an example end to end on this machine: the real worker with CRM and ERP stand-ins.
    Dev(Box<dev::DevArgs>),
    /// Run the CRM or ERP stand-in on its own.
    Sim {
        #[command(subcommand)]
        command: dev::SimCommand,
    },
    /// Run one flow: sources, ledger, contract, sink, and the operations API.
    Worker(Box<worker::WorkerArgs>),
    /// Inspect and replay a running worker's dead letters.
    Dlq {
        #[command(subcommand)]
        command: worker::DlqCommand,
    },
    /// List, approve or reject records held for approval on a running worker.
    Hold {
        #[command(subcommand)]
        command: worker::HoldCommand,
    },
    /// Preflight a candidate contract: replay the flow's recent records through the active contract and the
    /// candidate, and write the report as the container's termination message (exit 0 passed, 1 failed the
    /// thresholds, 2 could not run).
    Replay(Box<replay::ReplayArgs>),
    /// Work with contract versions offline: classify changes (`diff`), run sample records (`check`).
    Contract {
        #[command(subcommand)]
        command: contract::ContractCommand,
    },
    /// Check manifests offline (YAML, kinds, schema, CRD rules, contract expressions, references); for CI.
    Validate {
        /// Files or directories (searched recursively for .yaml, .yml and .json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Treat references to objects that were not given (a flow's contract, its roster) as warnings.
        #[arg(long)]
        partial: bool,
    },
}

/// Output format of reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crd { out_dir } => crd(out_dir),
        Command::Validate {
            paths,
            output,
            partial,
        } => validate(&paths, output, partial),
        Command::Controller(args) => controller::controller(*args),
        Command::Dev(args) => dev::dev(*args),
        Command::Sim { command } => dev::sim(command),
        Command::Worker(args) => worker::worker(*args),
        Command::Dlq { command } => worker::dlq(command),
        Command::Hold { command } => worker::hold(command),
        Command::Contract { command } => contract::run(command),
        Command::Replay(args) => replay::replay(*args),
    }
}

fn crd(out_dir: Option<PathBuf>) -> ExitCode {
    let crds = crate::crd::all();
    match out_dir {
        None => {
            for crd in &crds {
                print!("{}", crate::crd::to_yaml(crd));
            }
            ExitCode::SUCCESS
        }
        Some(dir) => {
            for crd in &crds {
                let path = dir.join(crate::crd::file_name(crd));
                if let Err(e) = std::fs::create_dir_all(&dir)
                    .and_then(|_| std::fs::write(&path, crate::crd::to_yaml(crd)))
                {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn validate(paths: &[PathBuf], output: Output, partial: bool) -> ExitCode {
    let report = crate::validate::validate_paths(paths, &crate::validate::Options { partial });
    match output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("error: cannot serialise the report: {e}");
                return ExitCode::FAILURE;
            }
        },
        Output::Text => {
            for issue in &report.issues {
                eprintln!("{issue}");
            }
            let errors = report.error_count();
            let warnings = report.issues.len() - errors;
            let verdict = if errors == 0 { "ok" } else { "FAILED" };
            println!(
                "{verdict}: {} files, {} objects, {} ignored, {errors} errors, {warnings} warnings",
                report.files, report.objects, report.ignored
            );
        }
    }
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
