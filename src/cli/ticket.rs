//! `meshline ticket list|ack`: a flow's exception tickets on a running worker, and a named owner taking one.
//! Same conventions as `meshline hold`: the flow is positional (its token is read from its Secret with your
//! kubeconfig unless `--token`/`--token-file` give it), and a person acts with their own token from
//! `--identity-token-file` or `MESHLINE_IDENTITY_TOKEN`, never from an argument value.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;

use super::worker::{FlowEndpoint, call_as, finish, identity_token};

#[derive(Debug, Subcommand)]
pub enum TicketCommand {
    /// List a flow's tickets (open and acknowledged; `--all` adds the resolved ones).
    List {
        #[command(flatten)]
        flow: FlowEndpoint,
        /// Resolved tickets too.
        #[arg(long)]
        all: bool,
        /// At most this many (the worker serves up to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the tickets as JSON, as the sinks receive them.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge a ticket as yourself: its escalation stops and its time to resolve starts.
    Ack {
        #[command(flatten)]
        flow: FlowEndpoint,
        /// The ticket's fingerprint (as `meshline ticket list` shows it).
        fingerprint: String,
        /// Your owner id in the flow's OwnershipRoster; the worker refuses it if your personal token is
        /// someone else's.
        #[arg(long)]
        by: String,
        /// File holding your personal token; without it the token comes from `MESHLINE_IDENTITY_TOKEN`.
        #[arg(long)]
        identity_token_file: Option<PathBuf>,
    },
}

fn print_tickets(v: &Value) {
    let tickets = v.as_array().cloned().unwrap_or_default();
    if tickets.is_empty() {
        println!("no tickets");
        return;
    }
    println!(
        "{:<34} {:<18} {:<13} {:<14} {:>6} {:>6}  REASON",
        "FINGERPRINT", "KIND", "STATE", "OWNER", "COUNT", "OPEN"
    );
    for t in tickets {
        let text = |k: &str| t[k].as_str().unwrap_or("-").to_string();
        let owner = match t["acknowledgedBy"].as_str() {
            Some(by) => format!("{} (ack {by})", t["owner"]["id"].as_str().unwrap_or("-")),
            None => t["owner"]["id"].as_str().unwrap_or("-").to_string(),
        };
        println!(
            "{:<34} {:<18} {:<13} {:<14} {:>6} {:>6}  {}",
            text("fingerprint"),
            text("kind"),
            text("state"),
            owner,
            t["count"],
            t["outstanding"],
            text("reason")
        );
    }
}

pub fn run(command: TicketCommand) -> ExitCode {
    match command {
        TicketCommand::List {
            flow,
            all,
            limit,
            json,
        } => {
            let path = format!("/tickets?all={all}&limit={}", limit.clamp(1, 1000));
            let result = call_as(&flow.endpoint(), reqwest::Method::GET, &path, None, None);
            finish(result, |v| {
                if json {
                    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
                } else {
                    print_tickets(v)
                }
            })
        }
        TicketCommand::Ack {
            flow,
            fingerprint,
            by,
            identity_token_file,
        } => {
            let result = identity_token(identity_token_file.as_deref(), "to acknowledge a ticket")
                .and_then(|identity| {
                    // The path segment is the fingerprint as given; one with a slash or a space must not
                    // turn into another route.
                    let encoded = percent_encoding::utf8_percent_encode(
                        &fingerprint,
                        percent_encoding::NON_ALPHANUMERIC,
                    );
                    call_as(
                        &flow.endpoint(),
                        reqwest::Method::POST,
                        &format!("/tickets/{encoded}/acknowledge"),
                        // The worker establishes who acts from the personal token and refuses a `by`
                        // naming someone else, so a token of another person is not used unnoticed.
                        Some(serde_json::json!({ "by": by })),
                        Some(&identity),
                    )
                });
            finish(result, |v| {
                println!(
                    "ticket {fingerprint} acknowledged by {}{}",
                    v["acknowledgedBy"].as_str().unwrap_or("-"),
                    if v["changed"] == Value::Bool(false) {
                        " (it already was)"
                    } else {
                        ""
                    }
                )
            })
        }
    }
}
