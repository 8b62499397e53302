//! The `meshline` command line: one binary, one subcommand per role.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod audit;
mod contract;
pub mod controller;
mod dev;
pub mod logging;
pub mod replay;
pub mod rollout;
mod ticket;
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
    /// Run a reconciliation audit of a flow on its worker and wait for it: CRM deals against ERP orders,
    /// counts and totals per currency, every difference explained from the ledger (exit 0 reconciled, 1
    /// unexplained differences, 2 partial, failed or bad input).
    Audit(Box<audit::AuditArgs>),
    /// List a running worker's exception tickets, or acknowledge one as yourself.
    Ticket {
        #[command(subcommand)]
        command: ticket::TicketCommand,
    },
    /// Preflight a candidate contract: replay the flow's recent records through the active contract and the
    /// candidate, and write the report as the container's termination message (exit 0 passed, 1 failed the
    /// thresholds, 2 could not run).
    Replay(Box<replay::ReplayArgs>),
    /// Watch and command the canary rollout of a contract candidate on a flow (pause, resume, promote, abort,
    /// retry), in the cluster KUBECONFIG names.
    Rollout {
        #[command(subcommand)]
        command: rollout::RolloutCommand,
    },
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
        /// The manifests as deployed now (e.g. the base branch's checkout): each contract given is judged
        /// against its previous version there, as the controller's compatibility gate will judge it.
        #[arg(long)]
        previous: Vec<PathBuf>,
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
            previous,
        } => validate(&paths, output, partial, &previous),
        Command::Controller(args) => controller::controller(*args),
        Command::Dev(args) => dev::dev(*args),
        Command::Sim { command } => dev::sim(command),
        Command::Worker(args) => worker::worker(*args),
        Command::Dlq { command } => worker::dlq(command),
        Command::Hold { command } => worker::hold(command),
        Command::Ticket { command } => ticket::run(command),
        Command::Audit(args) => audit::run(*args),
        Command::Contract { command } => contract::run(command),
        Command::Replay(args) => replay::replay(*args),
        Command::Rollout { command } => rollout::run(command),
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

/// The gates each contract of `report` faces: against its previous version in `previous` (when given and
/// found there), with the flows and rosters given alongside it.
fn gate_plans(
    report: &crate::validate::Report,
    previous: Option<&crate::validate::Report>,
) -> Vec<(String, crate::rollout::gates::Plan)> {
    // Flows and rosters without a namespace sit in `default`, as kubectl would put them.
    let flows: Vec<crate::api::SyncFlow> = report
        .flows
        .iter()
        .map(|f| {
            let mut f = f.object.clone();
            f.metadata.namespace.get_or_insert_with(|| "default".into());
            f
        })
        .collect();
    let rosters: Vec<crate::api::OwnershipRoster> = report
        .rosters
        .iter()
        .map(|r| {
            let mut r = r.object.clone();
            r.metadata.namespace.get_or_insert_with(|| "default".into());
            r
        })
        .collect();
    let fr: Vec<&crate::api::SyncFlow> = flows.iter().collect();
    let rr: Vec<&crate::api::OwnershipRoster> = rosters.iter().collect();
    let mut out = Vec::new();
    for c in &report.contracts {
        let (ns, name) = (c.namespace(), c.name());
        let bound = crate::rollout::gates::bound_flows(&ns, &name, &fr, &rr);
        let before = previous.and_then(|p| {
            p.contracts
                .iter()
                .find(|o| o.namespace() == ns && o.name() == name)
                .map(|o| o.object.spec.clone())
        });
        let plan = match &before {
            Some(old) => crate::rollout::gates::plan(Some(old), &c.object.spec, &bound),
            // Without the deployed version, a reviewer still needs to know who must sign.
            None => crate::rollout::gates::Plan {
                sign_offs: crate::rollout::gates::sign_offs(
                    &c.object.spec,
                    crate::contract::content_hash(&c.object.spec).as_str(),
                    &bound,
                ),
                preflight_flows: bound.iter().map(|b| b.name().to_string()).collect(),
                ..crate::rollout::gates::plan(None, &c.object.spec, &bound)
            },
        };
        out.push((c.label(), plan));
    }
    out
}

fn validate(paths: &[PathBuf], output: Output, partial: bool, previous: &[PathBuf]) -> ExitCode {
    let mut report = crate::validate::validate_paths(paths, &crate::validate::Options { partial });
    let before = (!previous.is_empty()).then(|| {
        crate::validate::validate_paths(previous, &crate::validate::Options { partial: true })
    });
    let plans = if report.is_ok() {
        gate_plans(&report, before.as_ref())
    } else {
        Vec::new()
    };
    report.gates = plans
        .iter()
        .map(|(label, plan)| {
            let mut v = plan.to_json();
            v["contract"] = serde_json::json!(label);
            v
        })
        .collect();
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
            for (label, plan) in &plans {
                if before.is_none() {
                    println!(
                        "{label} version {} ({}): as a change to a running version (pass --previous to check compatibility), it needs",
                        plan.version, plan.hash
                    );
                    for s in &plan.sign_offs.required {
                        let mark = if plan.sign_offs.signed.contains(&s.owner) {
                            "signed"
                        } else {
                            "missing"
                        };
                        println!(
                            "  sign-off by {} ({} of flow {}): {mark}",
                            s.owner,
                            s.role.as_str(),
                            s.flow
                        );
                    }
                    for (owner, named) in &plan.sign_offs.other_content {
                        println!("  {owner} signed other content ({named})");
                    }
                    for flow in &plan.sign_offs.unassigned {
                        println!(
                            "  flow {flow}: no roster assignment among the files given, nobody can sign"
                        );
                    }
                } else {
                    print!("{label} {plan}");
                }
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
    let refused: Vec<&String> = plans
        .iter()
        .filter(|(_, p)| !p.compatibility.passed())
        .map(|(l, _)| l)
        .collect();
    if !refused.is_empty() && output == Output::Text {
        eprintln!(
            "error: the controller will refuse the new version of {}: see the compatibility gate above",
            refused
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if report.is_ok() && refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
