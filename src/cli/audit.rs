//! `meshline audit FLOW`: asks the flow's worker to run a reconciliation audit (or joins the one running),
//! waits for it to finish and prints what it found. It is what the controller's CronJob runs; the audit
//! itself runs in the worker (see `crate::worker::audit_routes`). Same conventions as `meshline ticket`:
//! the flow is positional and its token is read from its Secret unless `--token`/`--token-file` give it.
//!
//! Exit codes: 0 reconciled, 1 unexplained differences (each in the flow's `audit_mismatch` ticket), 2 a
//! partial result, a failure, or bad input.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use super::worker::{Endpoint, FlowEndpoint, call_as};
use crate::api::{AuditOutcome, FlowAuditStatus};
use crate::worker::audit_routes::AuditRunView;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub flow: FlowEndpoint,
    /// How far back to look, e.g. `168h` (whole hours; default: the worker's `--audit-window`).
    #[arg(long, value_parser = crate::cli::worker::parse_audit_window)]
    pub window: Option<Duration>,
    /// How often to ask the worker how far the run got.
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub poll_interval: Duration,
    /// Consecutive failed polls (a worker restarting) tolerated before giving up with exit 2; the run
    /// itself survives in the ledger and resumes.
    #[arg(long, default_value_t = 30)]
    pub poll_failures: u32,
    /// Print the result as JSON (the flow's `status.audit`).
    #[arg(long)]
    pub json: bool,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 2s: {e}"))?;
    let d: Duration = d.into();
    if d.is_zero() || d > Duration::from_secs(600) {
        return Err(format!(
            "{s:?}: the poll interval must be above 0 and at most 10m"
        ));
    }
    Ok(d)
}

/// The exit code of an outcome.
pub fn exit_code(outcome: Option<AuditOutcome>) -> u8 {
    match outcome {
        Some(AuditOutcome::Reconciled) => 0,
        Some(AuditOutcome::Unexplained) => 1,
        Some(AuditOutcome::Partial) | None => 2,
    }
}

/// The summary a person reads.
pub fn render(status: &FlowAuditStatus) -> String {
    let mut out = String::new();
    let outcome = match status.outcome {
        Some(AuditOutcome::Reconciled) => "reconciled",
        Some(AuditOutcome::Unexplained) => "unexplained differences",
        Some(AuditOutcome::Partial) => "PARTIAL (nothing is claimed reconciled)",
        None => "unknown",
    };
    out.push_str(&format!(
        "audit run {}: {outcome}\nwindow: {} to {}\n",
        status.run, status.window_from, status.window_to
    ));
    if let Some(why) = &status.partial_reason {
        out.push_str(&format!("partial: {why}\n"));
    }
    for (name, side) in [("CRM deals", &status.crm), ("ERP orders", &status.erp)] {
        let totals: Vec<String> = side
            .totals
            .iter()
            .map(|(c, t)| format!("{c} {t}"))
            .collect();
        out.push_str(&format!(
            "{name}: {} ({})\n",
            side.count,
            if totals.is_empty() {
                "no totals".to_string()
            } else {
                totals.join(", ")
            }
        ));
    }
    out.push_str(&format!("matched: {}\n", status.matched));
    if status.explained.is_empty() {
        out.push_str("explained: none\n");
    } else {
        let kinds: Vec<String> = status
            .explained
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        out.push_str(&format!("explained: {}\n", kinds.join(", ")));
    }
    out.push_str(&format!("unexplained: {}\n", status.unexplained));
    if !status.unexplained_ids.is_empty() {
        let more = status.unexplained - status.unexplained_ids.len() as i64;
        out.push_str(&format!(
            "unexplained ids: {}{}\n",
            status.unexplained_ids.join(", "),
            if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            }
        ));
    }
    if let Some(ticket) = &status.ticket {
        out.push_str(&format!("ticket: {ticket}\n"));
    }
    out
}

pub fn run(args: AuditArgs) -> ExitCode {
    let endpoint = args.flow.endpoint();
    let body = args
        .window
        .map(|w| json!({ "windowHours": w.as_secs().div_ceil(3600) }));
    let started = match call_as(&endpoint, reqwest::Method::POST, "/audit/runs", body, None) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: flow {}: cannot start an audit: {e}", args.flow.flow);
            return ExitCode::from(2);
        }
    };
    let Some(id) = started["run"].as_i64() else {
        eprintln!(
            "error: flow {}: the worker answered POST /audit/runs without a run id: {started}",
            args.flow.flow
        );
        return ExitCode::from(2);
    };
    eprintln!(
        "flow {}: audit run {id} started; waiting for it",
        args.flow.flow
    );
    let status = match wait(&endpoint, id, &args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: flow {}: audit run {id}: {e}", args.flow.flow);
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render(&status));
    }
    ExitCode::from(exit_code(status.outcome))
}

/// Polls the run until it is finished; tolerates `poll_failures` failed polls in a row.
fn wait(endpoint: &Endpoint, id: i64, args: &AuditArgs) -> Result<FlowAuditStatus, String> {
    let mut failures = 0u32;
    let mut last_progress = None;
    loop {
        match call_as(
            endpoint,
            reqwest::Method::GET,
            &format!("/audit/runs/{id}"),
            None,
            None,
        )
        .and_then(|v: Value| {
            serde_json::from_value::<AuditRunView>(v)
                .map_err(|e| format!("the worker's answer is not an audit run: {e}"))
        }) {
            Ok(view) => {
                failures = 0;
                if view.state == "finished" {
                    return view
                        .result
                        .ok_or_else(|| "finished without a result".to_string());
                }
                let progress = (view.crm.orders, view.erp.orders);
                if last_progress != Some(progress) {
                    eprintln!(
                        "  read {} deal(s){} and {} order(s){}",
                        view.crm.orders,
                        if view.crm.done { " (all)" } else { "" },
                        view.erp.orders,
                        if view.erp.done { " (all)" } else { "" }
                    );
                    last_progress = Some(progress);
                }
            }
            Err(e) => {
                failures += 1;
                if failures > args.poll_failures {
                    return Err(format!(
                        "{failures} polls in a row failed, the last: {e} (the run continues in the worker; run \
                         `meshline audit` again to join it)"
                    ));
                }
            }
        }
        std::thread::sleep(args.poll_interval);
    }
}
