//! `meshline replay`: the preflight replay Job. Reads the flow's most recent records — from its ledger
//! (PostgreSQL, or an embedded SQLite file this process can open) or, for an embedded ledger whose volume a
//! worker pod holds, from that worker's operations API (`--from-worker`, `GET /records/recent` with the
//! flow's token) — runs them through the active contract (the rendered flow's) and the candidate, and
//! writes the report ([`crate::rollout::replay::Report`]) as the container's termination message.
//!
//! Exit codes: 0 the report passed, 1 it failed the thresholds, 2 the replay could not run (a bad file, an
//! unreachable ledger); in that last case a failed report with the reason is still written, if it can be.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::Output;
use crate::api::SyncContractSpec;
use crate::contract::{CompileOptions, CompiledContract};
use crate::ledger::{LedgerTarget, MAX_REPLAY_RECORDS, ReplayRecord};
use crate::rollout::replay::{ContractVersion, Replay, Report, Side, Thresholds};
use crate::worker::RenderedFlow;

/// Records replayed when neither `--records` nor the flow's `spec.rollout.preflightRecords` says.
pub const DEFAULT_PREFLIGHT_RECORDS: u32 = 1000;

/// Options of `meshline replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The rendered flow (as the worker's ConfigMap holds it), or a directory of manifests: the flow, its
    /// ledger, its lookups and the ACTIVE contract.
    #[arg(long)]
    pub config: PathBuf,
    /// The CANDIDATE contract: a SyncContract manifest or a bare SyncContractSpec (YAML).
    #[arg(long)]
    pub candidate: PathBuf,
    /// Records to replay, newest first (default: the flow's spec.rollout.preflightRecords, else 1000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=MAX_REPLAY_RECORDS as i64))]
    pub records: Option<u32>,
    /// Records the candidate may newly reject before the preflight fails.
    #[arg(long, default_value_t = 0)]
    pub max_newly_rejected: u64,
    /// Records whose output may change before the preflight fails (default: no bound).
    #[arg(long)]
    pub max_changed_outputs: Option<u64>,
    /// Read the records from this worker's operations API (`http://<pod or service>:8081`) instead of the
    /// ledger: how a Job reads an embedded ledger that a worker pod holds.
    #[arg(long, requires = "token_file")]
    pub from_worker: Option<String>,
    /// File holding the flow's token, for `--from-worker`.
    #[arg(long, env = "MESHLINE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where the compact report goes (the container's termination message).
    #[arg(long, default_value = "/dev/termination-log")]
    pub report: PathBuf,
    /// What is printed on stdout: a summary, or the whole report as JSON.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Directory of the embedded ledger, as the worker's `--state-dir`.
    #[arg(long, default_value = "/var/lib/meshline")]
    pub state_dir: PathBuf,
    /// Directory with one sub-directory per mounted Secret (the PostgreSQL ledger's `url`, the sink's
    /// credentials for lookups read from the ERP).
    #[arg(long, env = "MESHLINE_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Directory with ConfigMap lookups (`<name>.json`), as the worker's.
    #[arg(long)]
    pub lookups_dir: Option<PathBuf>,
}

/// Why a replay could not run; the message names the file or the source and the reason.
#[derive(Debug)]
struct Failure {
    message: String,
    active: ContractVersion,
    candidate: ContractVersion,
}

pub fn replay(args: ReplayArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &args,
                &Failure::plain(format!("cannot start the async runtime: {e}")),
            );
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(report) => {
            if let Err(e) = std::fs::write(&args.report, report.termination_message()) {
                eprintln!(
                    "error: cannot write the report to {}: {e} (choose another file with --report)",
                    args.report.display()
                );
                print(&args, &report);
                return ExitCode::from(2);
            }
            print(&args, &report);
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(failure) => fail(&args, &failure),
    }
}

impl Failure {
    fn plain(message: String) -> Failure {
        Failure {
            message,
            active: ContractVersion::default(),
            candidate: ContractVersion::default(),
        }
    }
}

fn print(args: &ReplayArgs, report: &Report) {
    match args.output {
        Output::Text => print!("{report}"),
        Output::Json => match serde_json::to_string_pretty(report) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("error: cannot serialise the report: {e}"),
        },
    }
}

/// Exit 2, leaving a failed report behind for the controller when the report file can be written.
fn fail(args: &ReplayArgs, failure: &Failure) -> ExitCode {
    eprintln!("error: {}", failure.message);
    let report = Report::failed(&failure.message, &failure.active, &failure.candidate);
    if let Err(e) = std::fs::write(&args.report, report.termination_message()) {
        eprintln!(
            "error: cannot write the failed report to {}: {e}",
            args.report.display()
        );
    }
    if args.output == Output::Json
        && let Ok(json) = serde_json::to_string_pretty(&report)
    {
        println!("{json}");
    }
    ExitCode::from(2)
}

/// The replay `meshline replay` runs, in-process (`meshline dev` preflights its contract changes so); the error
/// names the file or the source and the reason.
pub async fn run_replay(args: &ReplayArgs) -> Result<Report, String> {
    run(args).await.map_err(|f| f.message)
}

async fn run(args: &ReplayArgs) -> Result<Report, Failure> {
    let rendered = RenderedFlow::load(&args.config).map_err(|e| Failure::plain(e.to_string()))?;
    let flow = rendered.flow_name();
    let active_spec = &rendered.contract.spec;
    let candidate_spec = read_candidate(&args.candidate).map_err(Failure::plain)?;
    let versions = |message: String| Failure {
        message,
        active: ContractVersion::of_spec(active_spec),
        candidate: ContractVersion::of_spec(&candidate_spec),
    };
    // As the worker compiles its contract (the default bounds and redaction).
    let options = CompileOptions::default();
    let active = compile(
        active_spec,
        &options,
        &format!("{} (active contract)", args.config.display()),
    )
    .map_err(versions)?;
    let candidate = compile(
        &candidate_spec,
        &options,
        &args.candidate.display().to_string(),
    )
    .map_err(versions)?;

    let tables = lookups(args, &rendered, &candidate_spec)
        .await
        .map_err(versions)?;
    let active_env = crate::worker::build_env(&active, &flow, &tables)
        .map_err(|e| versions(format!("active contract: {e}")))?;
    let candidate_env = crate::worker::build_env(&candidate, &flow, &tables)
        .map_err(|e| versions(format!("candidate {}: {e}", args.candidate.display())))?;

    let limit = args
        .records
        .or_else(|| {
            rendered
                .flow
                .spec
                .rollout
                .as_ref()
                .and_then(|r| r.preflight_records)
        })
        .unwrap_or(DEFAULT_PREFLIGHT_RECORDS);
    if limit as usize > MAX_REPLAY_RECORDS {
        return Err(versions(format!(
            "{}: spec.rollout.preflightRecords: {limit} is over the bound of {MAX_REPLAY_RECORDS}",
            args.config.display()
        )));
    }
    let thresholds = Thresholds {
        max_newly_rejected: args.max_newly_rejected,
        max_changed_outputs: args.max_changed_outputs,
    };
    let mut replay = Replay::new(
        Side {
            contract: &active,
            env: &active_env,
        },
        Side {
            contract: &candidate,
            env: &candidate_env,
        },
    );
    if limit > 0 {
        match &args.from_worker {
            Some(base) => from_worker(args, base, limit as usize, &mut replay).await,
            None => from_ledger(args, &rendered, limit as usize, &mut replay).await,
        }
        .map_err(versions)?;
    }
    Ok(replay.finish(&thresholds))
}

/// The candidate: a SyncContract manifest, or a bare spec. Errors name the file, the field path, the reason.
fn read_candidate(path: &Path) -> Result<SyncContractSpec, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("{file}: not YAML: {e}"))?;
    if value.get("kind").is_some() {
        return crate::contract::parse_manifest(&text)
            .map(|c| c.spec)
            .map_err(|e| format!("{file}: {e}"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner();
        if path == "." {
            format!("{file}: not a SyncContract manifest or spec: {reason}")
        } else {
            format!("{file}: spec.{path}: {reason}")
        }
    })
}

fn compile(
    spec: &SyncContractSpec,
    options: &CompileOptions,
    what: &str,
) -> Result<CompiledContract, String> {
    crate::contract::compile_with(spec, options).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        format!("{what} does not compile:\n{}", lines.join("\n"))
    })
}

/// The flow's lookups, loaded as the worker loads them, with the field spellings of both contracts.
async fn lookups(
    args: &ReplayArgs,
    rendered: &RenderedFlow,
    candidate: &SyncContractSpec,
) -> Result<Value, String> {
    let spec = &rendered.flow.spec;
    if spec.lookups.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    let mut declared = rendered.contract.spec.lookups.clone();
    declared.extend(candidate.lookups.iter().cloned());
    // A lookup read from the ERP needs the sink; built as the worker builds it, it connects only if asked.
    let credentials = crate::connectors::Credentials::new(
        args.secrets_dir
            .as_ref()
            .map(|d| d.join(&spec.sink.credentials_secret_ref.name))
            .as_deref(),
        "sink",
    );
    let sink = crate::connectors::sinks::build(
        &spec.sink,
        credentials,
        crate::connectors::sinks::http_client(),
    )
    .map_err(|e| format!("{}: spec.sink: {e}", args.config.display()))?;
    crate::worker::run::load_lookups(
        &spec.lookups,
        &declared,
        sink.as_ref(),
        args.lookups_dir.as_deref(),
    )
    .await
    .map_err(|e| format!("lookups: {e}"))
}

async fn from_ledger(
    args: &ReplayArgs,
    rendered: &RenderedFlow,
    limit: usize,
    replay: &mut Replay<'_>,
) -> Result<(), String> {
    let flow = rendered.flow_name();
    let target =
        crate::worker::ledger_target_in(rendered, &args.state_dir, args.secrets_dir.as_deref())
            .map_err(|e| e.to_string())?;
    // Opening SQLite creates a missing file; a replay must read the worker's ledger, never start a new one.
    if let LedgerTarget::Sqlite(path) = &target
        && !path.is_file()
    {
        return Err(format!(
            "flow {flow}: no embedded ledger at {} (give the worker's --state-dir, or read it through the worker with --from-worker)",
            path.display()
        ));
    }
    let ledger = crate::ledger::open(
        &target,
        &flow,
        std::sync::Arc::new(crate::ledger::SystemClock),
    )
    .await
    .map_err(|e| format!("flow {flow}: ledger: {e}"))?;
    let records = ledger.recent_inputs(limit).await;
    ledger.close().await;
    for record in &records.map_err(|e| format!("flow {flow}: ledger: {e}"))? {
        replay.record(record);
    }
    Ok(())
}

/// Streams `GET <base>/records/recent` and replays each line as it arrives.
async fn from_worker(
    args: &ReplayArgs,
    base: &str,
    limit: usize,
    replay: &mut Replay<'_>,
) -> Result<(), String> {
    let token_file = args
        .token_file
        .as_ref()
        .ok_or("--from-worker needs --token-file")?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("token file {}: {e}", token_file.display()))?;
    let url = format!(
        "{}/records/recent?limit={limit}",
        base.trim_end_matches('/')
    );
    // No overall timeout: 100,000 records take a while to stream; the connect timeout still applies.
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let mut response = client
        .get(&url)
        .bearer_auth(token.trim())
        .send()
        .await
        .map_err(|e| format!("worker {base}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err(format!(
            "worker {base}: GET /records/recent: {status}: {message}"
        ));
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut line_number = 0usize;
    let mut feed = |line: &[u8], replay: &mut Replay<'_>| -> Result<(), String> {
        line_number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let record: ReplayRecord = serde_json::from_slice(line).map_err(|e| {
            format!("worker {base}: GET /records/recent: line {line_number} is not a record: {e}")
        })?;
        replay.record(&record);
        Ok(())
    };
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("worker {base}: the record stream broke off: {e}"))?
    {
        buffer.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = buffer[start..].iter().position(|b| *b == b'\n') {
            feed(&buffer[start..start + end], replay)?;
            start += end + 1;
        }
        buffer.drain(..start);
    }
    feed(&buffer, replay)
}
