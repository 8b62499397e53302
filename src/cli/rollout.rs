//! `meshline rollout status|pause|resume|promote|abort|retry FLOW`: a person's view of, and hand on, the canary
//! rollout of a contract candidate on one flow, through the cluster KUBECONFIG names.
//!
//! It owns no rollout logic: the controller's state machine ([`crate::rollout::canary`]) decides. `status`
//! reads `SyncFlow.status.canary` and the contract's revisions; the five commands write the one annotation
//! the controller reads ([`COMMAND_ANNOTATION`], `<verb>:<id>`, with a fresh id so it is acted on once) and
//! then wait on the flow's status until `status.canary.lastCommand` names that command, to tell what it led
//! to. The controller acts on every command it sees in one reconcile and records it as acted on either way,
//! so a command it refused leaves the rollout's phase as it was (and an Event `RolloutCommandRefused` says
//! why); that is how a refusal is told from an acceptance.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use super::Output;
use crate::api::{CanaryMeasurement, CanaryStatus, SyncContract, SyncFlow, TrackMeasures};
use crate::rollout::canary::{COMMAND_ANNOTATION, Command, Verb};

/// How often the flow is read again while waiting for the controller to act on a command.
const POLL: Duration = Duration::from_millis(250);
/// The Event reason the controller gives a command it did not act on.
const REFUSED_REASON: &str = "RolloutCommandRefused";

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Show the flow's canary: revision, phase, step, weights, the last measurements and why.
    Status {
        #[command(flatten)]
        flow: FlowRef,
        /// Output format; `json` prints `status.canary` as the controller wrote it (`null` without a canary).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Pause a progressing canary at its current weight.
    Pause(CommandArgs),
    /// Resume a paused canary; its step starts over once the weight is applied again.
    Resume(CommandArgs),
    /// Promote the candidate now, skipping the remaining steps and analysis.
    Promote(CommandArgs),
    /// Abort the canary and roll back to the active revision.
    Abort(CommandArgs),
    /// Start an aborted canary again from its first step.
    Retry(CommandArgs),
}

/// The flow a command is about.
#[derive(Debug, Args)]
pub struct FlowRef {
    /// The SyncFlow's name.
    pub flow: String,
    /// Its namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct CommandArgs {
    #[command(flatten)]
    pub flow: FlowRef,
    /// How long to wait for the controller to act on the command (`0`: send it and return).
    #[arg(long, default_value = "30s", value_parser = parse_wait)]
    pub wait: Duration,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 30s, 2m or 0: {e}"))?;
    Ok(Duration::from(d))
}

/// Why a rollout command could not do what it was asked. Each message names the flow.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "cannot reach a Kubernetes cluster ({0}); set KUBECONFIG to a kubeconfig whose current context is the cluster the flow runs in"
    )]
    NoCluster(String),
    #[error("SyncFlow {namespace}/{name} not found")]
    FlowNotFound { namespace: String, name: String },
    #[error("SyncFlow {namespace}/{name}: cannot {action}: {reason}")]
    Api {
        namespace: String,
        name: String,
        action: &'static str,
        reason: String,
    },
    #[error(
        "SyncFlow {namespace}/{name} has no canary rollout (status.canary is empty), so there is nothing to {verb}"
    )]
    NoCanary {
        namespace: String,
        name: String,
        verb: &'static str,
    },
    #[error(
        "SyncFlow {namespace}/{name}: the controller did not act on `{command}` within {waited:?} (status.canary.lastCommand is {last}); is the Meshline controller running? The annotation stays, and the controller acts on it once when it reconciles the flow"
    )]
    NotActedOn {
        namespace: String,
        name: String,
        command: String,
        waited: Duration,
        last: String,
    },
    #[error("SyncFlow {namespace}/{name}: the controller refused `{verb}`: {why}")]
    Refused {
        namespace: String,
        name: String,
        verb: &'static str,
        why: String,
    },
}

impl RolloutError {
    /// A short stable label, as the other layers' errors have.
    pub fn label(&self) -> &'static str {
        match self {
            RolloutError::NoCluster(_) => "NoCluster",
            RolloutError::FlowNotFound { .. } => "FlowNotFound",
            RolloutError::Api { .. } => "ApiError",
            RolloutError::NoCanary { .. } => "NoCanary",
            RolloutError::NotActedOn { .. } => "NotActedOn",
            RolloutError::Refused { .. } => "Refused",
        }
    }
}

pub fn run(command: RolloutCommand) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            RolloutCommand::Status { flow, output } => status(&flow, output).await,
            RolloutCommand::Pause(a) => command_flow(Verb::Pause, &a).await,
            RolloutCommand::Resume(a) => command_flow(Verb::Resume, &a).await,
            RolloutCommand::Promote(a) => command_flow(Verb::Promote, &a).await,
            RolloutCommand::Abort(a) => command_flow(Verb::Abort, &a).await,
            RolloutCommand::Retry(a) => command_flow(Verb::Retry, &a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The flow's API and its namespace.
async fn flows(target: &FlowRef) -> Result<(Api<SyncFlow>, Client, String), RolloutError> {
    let client = Client::try_default()
        .await
        .map_err(|e| RolloutError::NoCluster(e.to_string()))?;
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok((
        Api::namespaced(client.clone(), &namespace),
        client,
        namespace,
    ))
}

fn api_error(e: kube::Error, namespace: &str, name: &str, action: &'static str) -> RolloutError {
    match e {
        kube::Error::Api(s) if s.code == 404 => RolloutError::FlowNotFound {
            namespace: namespace.into(),
            name: name.into(),
        },
        kube::Error::Api(s) => RolloutError::Api {
            namespace: namespace.into(),
            name: name.into(),
            action,
            reason: format!("{} ({} {})", s.message, s.code, s.reason),
        },
        // No answer at all: the cluster, not the flow, is the problem.
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
            RolloutError::NoCluster(e.to_string())
        }
        e => RolloutError::Api {
            namespace: namespace.into(),
            name: name.into(),
            action,
            reason: e.to_string(),
        },
    }
}

async fn get_flow(
    api: &Api<SyncFlow>,
    namespace: &str,
    name: &str,
) -> Result<SyncFlow, RolloutError> {
    api.get_opt(name)
        .await
        .map_err(|e| api_error(e, namespace, name, "read it"))?
        .ok_or_else(|| RolloutError::FlowNotFound {
            namespace: namespace.into(),
            name: name.into(),
        })
}

async fn status(target: &FlowRef, output: Output) -> Result<(), RolloutError> {
    let (api, client, namespace) = flows(target).await?;
    let flow = get_flow(&api, &namespace, &target.flow).await?;
    let canary = flow.status.as_ref().and_then(|s| s.canary.as_ref());
    if output == Output::Json {
        let text = serde_json::to_string_pretty(&canary).unwrap_or_else(|_| "null".into());
        println!("{text}");
        return Ok(());
    }
    let contracts: Api<SyncContract> = Api::namespaced(client, &namespace);
    let contract_name = &flow.spec.contract.name;
    let contract_line = match contracts.get_opt(contract_name).await {
        Ok(Some(c)) => describe_contract(&c),
        Ok(None) => format!("contract {contract_name}: not found"),
        Err(e) => format!("contract {contract_name}: cannot read it: {e}"),
    };
    print!(
        "{}",
        render_status(&namespace, &flow, canary, &contract_line)
    );
    Ok(())
}

/// The contract's active and candidate revisions, with their versions.
fn describe_contract(c: &SyncContract) -> String {
    let st = c.status.as_ref();
    let version_of = |revision: &str| {
        st.and_then(|s| {
            s.revisions
                .iter()
                .find(|r| r.name.as_deref() == Some(revision))
        })
        .map(|r| format!(" (version {})", r.version))
        .unwrap_or_default()
    };
    let active = st
        .and_then(|s| s.active_revision.as_deref())
        .map(|r| format!("{r}{}", version_of(r)))
        .unwrap_or_else(|| "none".into());
    let candidate = st
        .and_then(|s| s.candidate_revision.as_deref())
        .map(|r| format!("{r}{}", version_of(r)))
        .unwrap_or_else(|| "none".into());
    format!(
        "contract {}: active revision {active}, candidate revision {candidate}",
        c.name_any()
    )
}

/// The text `meshline rollout status` prints. Pure.
pub fn render_status(
    namespace: &str,
    flow: &SyncFlow,
    canary: Option<&CanaryStatus>,
    contract_line: &str,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let name = flow.name_any();
    let _ = writeln!(out, "flow {namespace}/{name}");
    let _ = writeln!(out, "{contract_line}");
    let Some(c) = canary else {
        let _ = writeln!(out, "no canary rollout on this flow");
        return out;
    };
    let steps = flow
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.canary.as_ref())
        .map(|p| p.steps.len().to_string())
        .unwrap_or_else(|| "?".into());
    let _ = writeln!(
        out,
        "canary: version {} (revision {}) {}",
        c.version, c.revision, c.phase
    );
    let _ = writeln!(
        out,
        // Steps are counted from 0, as the controller's messages and Events count them.
        "  step {} ({} of {steps}), weight {}% (applied {}%), step started {}",
        c.step,
        c.step + 1,
        c.weight,
        c.applied_weight,
        c.step_started_at.as_deref().unwrap_or("not yet")
    );
    let _ = writeln!(
        out,
        "  failed measurements {}, consecutive errors {}, passed at this step {}",
        c.failed_measurements, c.consecutive_errors, c.passed_measurements
    );
    if let Some(r) = &c.reason {
        let _ = writeln!(out, "  reason: {r}");
    }
    if let Some(m) = &c.message {
        let _ = writeln!(out, "  message: {m}");
    }
    if let Some(l) = &c.last_command {
        let _ = writeln!(out, "  last command: {l}");
    }
    if !c.measurements.is_empty() {
        let _ = writeln!(
            out,
            "  measurements (newest last; records/failure rate/dead-letter rate/p99 of each track):"
        );
        let header = format!(
            "    {:<24} {:>4} {:<12} {:<28} {:<28}",
            "AT", "STEP", "VERDICT", "CANARY", "STABLE"
        );
        let _ = writeln!(out, "{}", header.trim_end());
        for m in &c.measurements {
            let _ = writeln!(out, "{}", measurement_row(m));
        }
    }
    out
}

fn figures(t: Option<&TrackMeasures>) -> String {
    match t {
        None => "-".into(),
        Some(t) => format!(
            "{}/{}/{}/{}",
            t.records,
            t.failure_rate,
            t.dead_letter_rate,
            t.p99_ms
                .map(|p| format!("{p}ms"))
                .unwrap_or_else(|| "-".into())
        ),
    }
}

fn measurement_row(m: &CanaryMeasurement) -> String {
    let mut row = format!(
        "    {:<24} {:>4} {:<12} {:<28} {:<28}",
        m.at,
        m.step,
        m.verdict,
        figures(m.canary.as_ref()),
        figures(m.stable.as_ref())
    );
    row.truncate(row.trim_end().len());
    if let Some(msg) = &m.message {
        row.push_str("\n      ");
        row.push_str(msg);
    }
    row
}

/// A fresh command id: the time in milliseconds (so ids sort by when they were given) and a random suffix (so
/// two people commanding in the same millisecond never give the same id).
fn fresh_id() -> String {
    let ms = chrono::Utc::now().timestamp_millis();
    format!("{ms}-{:08x}", rand::random::<u32>())
}

async fn command_flow(verb: Verb, args: &CommandArgs) -> Result<(), RolloutError> {
    let (api, client, namespace) = flows(&args.flow).await?;
    let name = args.flow.flow.as_str();
    let before = get_flow(&api, &namespace, name)
        .await?
        .status
        .and_then(|s| s.canary)
        .ok_or_else(|| RolloutError::NoCanary {
            namespace: namespace.clone(),
            name: name.into(),
            verb: verb.as_str(),
        })?;
    let value = Command::annotation_value(verb, &fresh_id());
    // A JSON merge patch touching the one annotation: nothing else of the object (which Argo CD may own) is
    // sent back, so there is no conflict to resolve and no field manager to take over.
    let patch = serde_json::json!({"metadata": {"annotations": {COMMAND_ANNOTATION: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &namespace, name, "annotate it"))?;
    if args.wait.is_zero() {
        println!(
            "flow {namespace}/{name}: sent `{value}` ({COMMAND_ANNOTATION}); not waiting for the controller"
        );
        return Ok(());
    }

    // Wait on the flow's state; the bound is only a safety net for a controller that is not running.
    let mut last_seen: Option<String> = None;
    let acted = tokio::time::timeout(args.wait, async {
        loop {
            let flow = get_flow(&api, &namespace, name).await?;
            let canary = flow.status.and_then(|s| s.canary);
            last_seen = canary.as_ref().and_then(|c| c.last_command.clone());
            if let Some(c) = canary.filter(|c| c.last_command.as_deref() == Some(value.as_str())) {
                return Ok::<CanaryStatus, RolloutError>(c);
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    let after = match acted {
        Ok(r) => r?,
        Err(_) => {
            return Err(RolloutError::NotActedOn {
                namespace,
                name: name.into(),
                command: value,
                waited: args.wait,
                last: last_seen.unwrap_or_else(|| "empty".into()),
            });
        }
    };
    if refused(&before, &after) {
        let why = refusal_event(client, &namespace, name, verb)
            .await
            .unwrap_or_else(|| format!("the rollout stayed {}", after.phase));
        return Err(RolloutError::Refused {
            namespace,
            name: name.into(),
            verb: verb.as_str(),
            why,
        });
    }
    println!(
        "flow {namespace}/{name}: {} done; canary of version {} is {}{}{}",
        verb.as_str(),
        after.version,
        after.phase,
        after
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        after
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Whether the controller refused the command it recorded in `after`. Every command the state machine accepts
/// moves the rollout to another phase (pause → Paused, resume → Progressing, promote → Promoting, abort →
/// Aborting or Aborted, retry → Progressing, or Paused without a shared ledger); a refused one leaves it
/// where it was. `before` is read just before the command is sent: should the controller move the rollout on
/// its own in between (a step's analysis aborts it) and then refuse the command, this reads as accepted, and
/// the printed phase still tells the truth.
pub fn refused(before: &CanaryStatus, after: &CanaryStatus) -> bool {
    before.revision == after.revision && before.phase == after.phase
}

/// The controller's reason for refusing `verb` on the flow, from its newest `RolloutCommandRefused` Event
/// (best effort: Events may be unreadable or already gone).
async fn refusal_event(client: Client, namespace: &str, name: &str, verb: Verb) -> Option<String> {
    let events: Api<Event> = Api::namespaced(client, namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=SyncFlow,involvedObject.name={name},reason={REFUSED_REASON}"
    ));
    let list = events.list(&params).await.ok()?;
    let prefix = format!("{}:", verb.as_str());
    list.items
        .into_iter()
        .filter(|e| e.message.as_deref().is_some_and(|m| m.starts_with(&prefix)))
        .max_by_key(|e| {
            e.event_time
                .as_ref()
                .map(|t| t.0)
                .or(e.last_timestamp.as_ref().map(|t| t.0))
        })
        .and_then(|e| e.message)
}
