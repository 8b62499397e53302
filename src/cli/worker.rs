//! `meshline worker` (run one flow) and the commands people use against a running worker: `meshline dlq`
//! for the dead letters and `meshline hold` for records waiting for approval.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::worker::{PipelineOptions, RenderedFlow, WorkerSettings};

/// Options of `meshline worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The rendered flow configuration (as the controller mounts it), or a directory of manifests.
    #[arg(long)]
    pub flow: PathBuf,
    /// Address of the webhook port (the source's webhook route and health; what an Ingress exposes).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of the operations port (status, records, dead letters, holds, metrics; cluster-internal).
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub ops_listen: SocketAddr,
    /// Directory of the embedded ledger.
    #[arg(long, default_value = "/var/lib/meshline")]
    pub state_dir: PathBuf,
    /// Directory with one sub-directory per mounted Secret.
    #[arg(long, env = "MESHLINE_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// File holding the flow's token, which the operations API asks for (without it the operations API
    /// serves only health and metrics).
    #[arg(long, env = "MESHLINE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Directory with ConfigMap lookups (`<name>.json`).
    #[arg(long)]
    pub lookups_dir: Option<PathBuf>,
    /// This worker's name in leases (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    pub worker_id: Option<String>,
    /// How far back a reconciliation audit looks when its request names no window (the controller passes
    /// the roster's `audit.window`).
    #[arg(long, value_parser = parse_audit_window)]
    pub audit_window: Option<std::time::Duration>,
    /// Record buckets this worker claims, `FROM-TO` inclusive (stable takes the top, a canary the bottom).
    /// Fixed for the worker's life; with `--rollout-file` the split decides instead.
    #[arg(long, default_value = "0-99", value_parser = parse_buckets)]
    pub buckets: (u8, u8),
    /// The track this worker runs in a canary rollout: `stable` (the active revision) or `canary` (the
    /// candidate).
    #[arg(long, value_enum, default_value_t = crate::rollout::split::Track::Stable)]
    pub track: crate::rollout::split::Track,
    /// The rollout split file (`split.json` of the flow's rollout ConfigMap), re-read while the worker runs;
    /// the buckets this worker claims follow it. Without it, `--buckets` applies.
    #[arg(long)]
    pub rollout_file: Option<PathBuf>,
    /// Seconds a claim on a record is held; a worker that dies holding claims leaves them to another worker
    /// once they expire.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease: u64,
    /// Seconds a graceful shutdown waits for in-flight deliveries.
    #[arg(long, default_value_t = 20)]
    pub shutdown_grace: u64,
    /// Free space (percent of the embedded ledger's volume) below which intake is refused, so the outcomes
    /// of accepted records always fit; bounded by the two options below.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=50))]
    pub ledger_reserve_percent: u8,
    /// The reserve is at least this many MiB.
    #[arg(long, default_value_t = 64)]
    pub ledger_reserve_min_mib: u64,
    /// The reserve is at most this many MiB.
    #[arg(long, default_value_t = 1024)]
    pub ledger_reserve_max_mib: u64,
}

/// A Go duration (`168h`, `36h30m`), as the roster's `audit.window`: between one minute and a year.
pub(crate) fn parse_audit_window(s: &str) -> Result<std::time::Duration, String> {
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 168h: {e}"))?;
    let d: std::time::Duration = d.into();
    if d < std::time::Duration::from_secs(60) || d > std::time::Duration::from_secs(366 * 24 * 3600)
    {
        return Err(format!(
            "{s:?}: the audit window must be between 1m and 8784h"
        ));
    }
    Ok(d)
}

fn parse_buckets(s: &str) -> Result<(u8, u8), String> {
    let (from, to) = s.split_once('-').ok_or("expected FROM-TO, e.g. 0-99")?;
    let from: u8 = from
        .trim()
        .parse()
        .map_err(|_| format!("{from:?} is not a bucket number"))?;
    let to: u8 = to
        .trim()
        .parse()
        .map_err(|_| format!("{to:?} is not a bucket number"))?;
    if from > to || to > 99 {
        return Err(format!(
            "{s}: buckets go from 0 to 99 and FROM must not exceed TO"
        ));
    }
    Ok((from, to))
}

/// Refuses option combinations that contradict each other, naming the options and why.
fn check_args(args: &WorkerArgs) -> Result<(), String> {
    if let Some(file) = &args.rollout_file
        && args.buckets != (0, 99)
    {
        return Err(format!(
            "--buckets {}-{} and --rollout-file {} both decide the buckets this worker claims; give one \
             (with a rollout split the controller moves buckets between the tracks, a fixed range would \
             claim the other track's records)",
            args.buckets.0,
            args.buckets.1,
            file.display()
        ));
    }
    Ok(())
}

pub fn worker(args: WorkerArgs) -> ExitCode {
    if let Err(e) = check_args(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // The flow file is the controller's rendering of manifests it has already validated, so a YAML or
        // schema error here is a bug or a hand-run mistake, not a state that waiting can fix: it exits with a
        // clear message. Everything the world can fix (a Secret, the ledger's database) is retried below.
        let rendered = match RenderedFlow::load(&args.flow) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let settings = WorkerSettings {
            listen: args.listen,
            ops_listen: args.ops_listen,
            state_dir: args.state_dir,
            secrets_dir: args.secrets_dir,
            token_file: args.token_file,
            options: PipelineOptions {
                worker_id: args
                    .worker_id
                    .unwrap_or_else(|| format!("worker-{}", std::process::id())),
                buckets: crate::ledger::BucketSet::range(args.buckets.0..args.buckets.1 + 1),
                track: args.track,
                rollout_file: args.rollout_file,
                lease: std::time::Duration::from_secs(args.lease),
                audit_window: args.audit_window,
                shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace),
                disk_reserve: crate::worker::disk::DiskReserve {
                    min_bytes: args.ledger_reserve_min_mib.saturating_mul(1024 * 1024),
                    percent: args.ledger_reserve_percent,
                    max_bytes: args
                        .ledger_reserve_max_mib
                        .max(args.ledger_reserve_min_mib)
                        .saturating_mul(1024 * 1024),
                },
                ..PipelineOptions::default()
            },
        };
        let options = crate::worker::run::RunOptions {
            lookups_dir: args.lookups_dir,
        };
        let flow = rendered.flow_name();
        // The token is the controller's Secret, mounted before the container starts: an unreadable one is a
        // hand-run mistake, not something waiting fixes.
        let token = match &settings.token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(t) => Some(std::sync::Arc::<str>::from(t.trim())),
                Err(e) => {
                    eprintln!("error: token file {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            },
            None => None,
        };
        // The sockets are bound once and kept: the start-up status server answers on them until the worker
        // starts, and every start attempt serves on clones of them.
        let sockets = match crate::worker::Listeners::bind(&settings) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = format!(
            "{} and {}",
            sockets.webhook.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            sockets.ops.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let problems = std::sync::Arc::new(crate::worker::problems::Problems::default());
        let starting = match sockets
            .try_clone()
            .and_then(|s| crate::worker::starting::serve(s, &flow, problems.clone(), token))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot serve on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let signal = shutdown_signal();
        tokio::pin!(signal);
        let mut delay = START_RETRY_FIRST;
        let mut attempt = 0u32;
        let worker = loop {
            attempt += 1;
            let clone = match sockets.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: cannot serve on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let started = tokio::select! {
                started = crate::worker::run::start_flow_on(&rendered, &settings, &options, Some(clone)) => started,
                _ = &mut signal => {
                    starting.stop().await;
                    return ExitCode::SUCCESS;
                }
            };
            match started {
                Ok(worker) => break worker,
                Err(e) => {
                    let kind = e.problem_kind();
                    for other in [
                        crate::worker::problems::LEDGER_UNAVAILABLE,
                        crate::worker::problems::CREDENTIALS_INVALID,
                        crate::worker::problems::STARTUP_FAILED,
                    ] {
                        if other != kind {
                            problems.clear(other);
                        }
                    }
                    problems.set(kind, e.to_string());
                    tracing::error!(flow = %flow, error = %e, kind, attempt, retry_in_seconds = delay.as_secs(), "worker did not start; retrying");
                    eprintln!(
                        "meshline worker: attempt {attempt} failed ({kind}): {e}; retrying in {}s",
                        delay.as_secs()
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut signal => {
                    starting.stop().await;
                    return ExitCode::SUCCESS;
                }
            }
            delay = (delay * 2).min(START_RETRY_MAX);
        };
        // The worker serves on the socket now; the stand-in stops accepting.
        starting.stop().await;
        if attempt > 1 {
            tracing::info!(flow = %flow, attempt, "worker started after its problems went away");
        }
        eprintln!(
            "meshline worker: flow {} listening for webhooks on http://{} and for operations on http://{}",
            flow, worker.webhook_addr, worker.ops_addr
        );
        signal.await;
        tracing::info!("shutdown requested; finishing in-flight deliveries");
        worker.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// The first wait between start attempts; it doubles up to [`START_RETRY_MAX`].
const START_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const START_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Where a running worker is and how to authenticate to it. The token is the flow's (every read and write of
/// the operations API asks for it): `--token`, `--token-file`, or, with `--flow`, read from the flow's token
/// Secret through the Kubernetes API with your own kubeconfig and RBAC (`get` on that Secret).
#[derive(Debug, Args)]
pub struct Endpoint {
    /// Base URL of the worker's operations port (e.g. after
    /// `kubectl port-forward svc/meshline-<flow>-status 8081`).
    #[arg(
        long,
        env = "MESHLINE_WORKER_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    /// The flow's token. Prefer the environment variable or a file: arguments show in the process list.
    #[arg(
        long,
        env = "MESHLINE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the flow's token.
    #[arg(long, env = "MESHLINE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Read the token of this SyncFlow from its Secret (`meshline-<flow>-token`) through the Kubernetes
    /// API (KUBECONFIG or the in-cluster account), when no token is given.
    #[arg(long)]
    pub flow: Option<String>,
    /// Namespace of `--flow` (default: the kubeconfig context's).
    #[arg(long, short = 'n', requires = "flow")]
    pub namespace: Option<String>,
    /// The token once resolved: a paged listing asks for it once, not once per page.
    #[arg(skip)]
    resolved: std::sync::OnceLock<Option<String>>,
}

impl Endpoint {
    /// The token to send, from the first of `--token`, `--token-file` and `--flow` given; `None` when none is.
    fn resolve_token(&self) -> Result<Option<String>, String> {
        if let Some(t) = self.resolved.get() {
            return Ok(t.clone());
        }
        let token = self.find_token()?;
        Ok(self.resolved.get_or_init(|| token).clone())
    }

    fn find_token(&self) -> Result<Option<String>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_string()));
        }
        if let Some(p) = &self.token_file {
            return std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| format!("token file {}: {e}", p.display()));
        }
        match &self.flow {
            Some(flow) => token_from_cluster(flow, self.namespace.as_deref()).map(Some),
            None => Ok(None),
        }
    }
}

/// Reads a flow's token from its Secret with the caller's own Kubernetes credentials.
fn token_from_cluster(flow: &str, namespace: Option<&str>) -> Result<String, String> {
    use k8s_openapi::api::core::v1::Secret;
    let secret = crate::controller::flow::build::token_name(flow);
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("cannot reach the Kubernetes API to read the token of flow {flow}: {e}"))?;
        let ns = namespace
            .map(str::to_string)
            .unwrap_or_else(|| client.default_namespace().to_string());
        let api: kube::Api<Secret> = kube::Api::namespaced(client, &ns);
        let found = api.get_opt(&secret).await.map_err(|e| match &e {
            kube::Error::Api(status) if status.code == 403 => format!(
                "Secret {ns}/{secret} (the token of flow {flow}): {}; reading it needs `get` on that Secret",
                status.message
            ),
            _ => format!(
                "Secret {ns}/{secret} (the token of flow {flow}): cannot read it from the Kubernetes API: {e}"
            ),
        })?;
        let found = found.ok_or_else(|| {
            format!("Secret {ns}/{secret} not found: is {flow} a running SyncFlow in namespace {ns}?")
        })?;
        let bytes = found
            .data
            .as_ref()
            .and_then(|d| d.get(crate::controller::flow::build::TOKEN_KEY))
            .ok_or_else(|| format!("Secret {ns}/{secret} has no key `token`"))?;
        String::from_utf8(bytes.0.clone())
            .map(|t| t.trim().to_string())
            .map_err(|_| format!("Secret {ns}/{secret}: key `token` is not UTF-8"))
    })
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (reason, record key, when).
    List {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Only dead letters with exactly this reason (e.g. `erp:400`).
        #[arg(long)]
        reason: Option<String>,
        /// List at most this many (by default all of them; they are fetched page by page).
        #[arg(long)]
        limit: Option<usize>,
        /// Dead letters fetched per request (1 to 1000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
        page_size: u16,
    },
    /// Show one record's whole story: payload (redacted), lineage, interventions.
    Show {
        #[command(flatten)]
        endpoint: Endpoint,
        id: i64,
    },
    /// Send dead letters back for delivery after the cause was fixed: one by id, or all with a reason.
    Replay {
        #[command(flatten)]
        endpoint: Endpoint,
        /// The record id to replay.
        #[arg(required_unless_present = "reason", conflicts_with = "reason")]
        id: Option<i64>,
        /// Replay every dead letter with this reason.
        #[arg(long)]
        reason: Option<String>,
        /// Who replays (recorded as a manual intervention). With `--identity-token-file` it may be left out:
        /// the worker records the owner your personal token names (and refuses a different `--actor`).
        #[arg(long, required_unless_present = "identity_token_file")]
        actor: Option<String>,
        /// Why (recorded with it).
        #[arg(long, default_value = "")]
        why: String,
        /// File holding your personal token (your key of the roster's identity Secret): the worker checks it
        /// and records the replay in your owner id's name, as the operations page does.
        #[arg(long)]
        identity_token_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// List records held for approval.
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Approve a held record as yourself: it goes on to the ERP. You must hold the record's approver role.
    Approve(Decide),
    /// Reject a held record as yourself: it becomes a dead letter. You must hold the record's approver role.
    Reject(Decide),
}

/// A person's decision on one held record of a flow. Two credentials go with it: the flow's token (which
/// opens the operations API, read from the flow's Secret with your kubeconfig unless given) and your own
/// personal token (which says who decides; the roster's identity Secret maps it to your owner id). The
/// personal token is never an argument value, since arguments show in the process list.
#[derive(Debug, Args)]
pub struct Decide {
    #[command(flatten)]
    pub flow: FlowEndpoint,
    /// The held record's id (as `meshline hold list` shows it).
    pub record: i64,
    /// Your owner id in the flow's OwnershipRoster; the worker refuses it if your personal token is
    /// someone else's.
    #[arg(long)]
    pub by: String,
    /// Why (required, up to 1000 characters): kept in the record's lineage with your name.
    #[arg(long)]
    pub reason: String,
    /// File holding your personal token; without it the token comes from `MESHLINE_IDENTITY_TOKEN`.
    #[arg(long)]
    pub identity_token_file: Option<PathBuf>,
}

/// The variable holding a person's own token when `--identity-token-file` is not given.
pub const IDENTITY_TOKEN_ENV: &str = "MESHLINE_IDENTITY_TOKEN";

/// A person's token: the file's, else [`IDENTITY_TOKEN_ENV`]'s. The error says what it is `needed` for and
/// how to give one.
pub(super) fn identity_token(
    file: Option<&std::path::Path>,
    needed: &str,
) -> Result<String, String> {
    let token = match file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("--identity-token-file {}: {e}", p.display()))?,
        None => std::env::var(IDENTITY_TOKEN_ENV).unwrap_or_default(),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(format!(
            "your personal token is needed {needed}: give --identity-token-file FILE or set \
             {IDENTITY_TOKEN_ENV} (the value under your owner id in the roster's identity Secret)"
        ));
    }
    Ok(token)
}

impl Endpoint {
    /// The endpoint of a command that names its flow positionally (the token is looked up by that name).
    pub(super) fn for_flow(
        flow: &str,
        url: &str,
        token: Option<String>,
        token_file: Option<PathBuf>,
        namespace: Option<String>,
    ) -> Endpoint {
        Endpoint {
            url: url.to_string(),
            token,
            token_file,
            flow: Some(flow.to_string()),
            namespace,
            resolved: Default::default(),
        }
    }
}

/// The flow a person's command (`meshline hold approve|reject`, `meshline ticket`) talks to, and how to reach
/// its worker.
#[derive(Debug, Args)]
pub struct FlowEndpoint {
    /// The SyncFlow; its token is read from its Secret (`meshline-<flow>-token`) with your kubeconfig
    /// unless `--token`/`--token-file` give it.
    pub flow: String,
    /// Base URL of the worker's operations port (e.g. after
    /// `kubectl port-forward svc/meshline-<flow>-status 8081`).
    #[arg(
        long,
        env = "MESHLINE_WORKER_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    /// The flow's token. Prefer the environment variable or a file: arguments show in the process list.
    #[arg(
        long,
        env = "MESHLINE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the flow's token.
    #[arg(long, env = "MESHLINE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Namespace of the flow (default: the kubeconfig context's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

impl FlowEndpoint {
    pub(super) fn endpoint(&self) -> Endpoint {
        Endpoint::for_flow(
            &self.flow,
            &self.url,
            self.token.clone(),
            self.token_file.clone(),
            self.namespace.clone(),
        )
    }
}

impl Decide {
    fn endpoint(&self) -> Endpoint {
        self.flow.endpoint()
    }

    fn identity_token(&self) -> Result<String, String> {
        identity_token(
            self.identity_token_file.as_deref(),
            "to decide on a held record",
        )
    }

    fn send(&self, action: &str) -> Result<Value, String> {
        let identity = self.identity_token()?;
        call_as(
            &self.endpoint(),
            reqwest::Method::POST,
            &format!("/records/{}/{action}", self.record),
            Some(json!({"by": self.by, "reason": self.reason})),
            Some(&identity),
        )
    }
}

fn call(
    endpoint: &Endpoint,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    call_as(endpoint, method, path, body, None)
}

/// [`call`], with a person's identity token when a named person acts.
pub(super) fn call_as(
    endpoint: &Endpoint,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    identity: Option<&str>,
) -> Result<Value, String> {
    let token = endpoint.resolve_token()?;
    let identity = identity.map(str::to_string);
    let url = format!("{}{path}", endpoint.url.trim_end_matches('/'));
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.request(method, &url);
        let sent_token = token.is_some();
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(i) = identity {
            req = req.header(crate::worker::identity::IDENTITY_HEADER, i);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        let detail = value["error"].as_str().unwrap_or("no detail");
        match status.as_u16() {
            _ if status.is_success() => Ok(value),
            401 if !sent_token => Err(format!(
                "{url}: HTTP 401: the worker asks for the flow's token and none was given; pass --token-file, \
                 MESHLINE_TOKEN or --flow NAME (reads the flow's token Secret with your kubeconfig)"
            )),
            401 => Err(format!(
                "{url}: HTTP 401: the worker refused the token given (it is not this flow's token: {detail})"
            )),
            403 => Err(format!("{url}: HTTP 403: refused: {detail}")),
            _ => Err(format!("{url}: HTTP {status}: {detail}")),
        }
    })
}

pub(super) fn finish(result: Result<Value, String>, render: impl Fn(&Value)) -> ExitCode {
    match result {
        Ok(v) => {
            render(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Largest page the worker serves (`/dead-letters`, `/holds`).
const PAGE: usize = 1000;

/// Every item of a paged listing (`path` ends in `?` or `&`), `page` at a time, up to `limit` items, as one
/// `{"items": [...]}`. The worker filters in its ledger query, so each page is full until the last.
fn list_all(
    endpoint: &Endpoint,
    path: &str,
    limit: Option<usize>,
    page: usize,
) -> Result<Value, String> {
    let page = page.clamp(1, PAGE);
    let mut items: Vec<Value> = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let want = limit.map_or(page, |l| l.saturating_sub(items.len()).min(page));
        if want == 0 {
            break;
        }
        let mut page_path = format!("{path}limit={want}");
        if let Some(a) = after {
            page_path.push_str(&format!("&after={a}"));
        }
        let page = call(endpoint, reqwest::Method::GET, &page_path, None)?;
        let got = page["items"].as_array().cloned().unwrap_or_default();
        let full = got.len() == want;
        items.extend(got);
        match page["next"].as_i64() {
            // A next id that does not move forward would page forever; stop instead.
            Some(next) if full && after.is_none_or(|a| next > a) => after = Some(next),
            _ => break,
        }
    }
    Ok(json!({ "items": items }))
}

fn print_list(v: &Value, what: &str) {
    let items = v["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no {what}");
        return;
    }
    println!("{:<8} {:<24} {:<40} UPDATED", "ID", "KEY", "REASON");
    for i in items {
        let reason = i["dead_letter_reason"]
            .as_str()
            .or(i["hold_rule"].as_str())
            .unwrap_or("-");
        println!(
            "{:<8} {:<24} {:<40} {}",
            i["id"].to_string(),
            i["source_key"].as_str().unwrap_or("-"),
            reason,
            i["updated_at"].as_str().unwrap_or("-")
        );
    }
}

pub fn dlq(command: DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List {
            endpoint,
            reason,
            limit,
            page_size,
        } => {
            let mut path = "/dead-letters?".to_string();
            if let Some(r) = reason {
                path.push_str(&format!(
                    "reason={}&",
                    percent_encoding::utf8_percent_encode(&r, percent_encoding::NON_ALPHANUMERIC)
                ));
            }
            finish(
                list_all(&endpoint, &path, limit, usize::from(page_size)),
                |v| print_list(v, "dead letters"),
            )
        }
        DlqCommand::Show { endpoint, id } => finish(
            call(
                &endpoint,
                reqwest::Method::GET,
                &format!("/records/{id}"),
                None,
            ),
            |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        ),
        DlqCommand::Replay {
            endpoint,
            id,
            reason,
            actor,
            why,
            identity_token_file,
        } => {
            let identity = match identity_token_file
                .as_deref()
                .map(|file| identity_token(Some(file), "to replay in your name"))
                .transpose()
            {
                Ok(identity) => identity,
                Err(e) => return finish(Err(e), |_| {}),
            };
            let actor = actor.unwrap_or_default();
            let result = match (id, reason) {
                (Some(id), _) => call_as(
                    &endpoint,
                    reqwest::Method::POST,
                    &format!("/dead-letters/{id}/replay"),
                    Some(json!({"actor": actor, "reason": why})),
                    identity.as_deref(),
                ),
                (None, Some(r)) => call_as(
                    &endpoint,
                    reqwest::Method::POST,
                    "/dead-letters/replay",
                    Some(json!({"deadLetterReason": r, "actor": actor, "reason": why})),
                    identity.as_deref(),
                ),
                (None, None) => Err("give a record id or --reason".into()),
            };
            finish(result, |v| match v["by"].as_str() {
                Some(by) => println!("replayed: {} by {by}", v["replayed"]),
                None => println!("replayed: {}", v["replayed"]),
            })
        }
    }
}

pub fn hold(command: HoldCommand) -> ExitCode {
    match command {
        HoldCommand::List { endpoint } => finish(list_all(&endpoint, "/holds?", None, PAGE), |v| {
            print_list(v, "held records")
        }),
        HoldCommand::Approve(d) => finish(d.send("approve"), |v| {
            println!(
                "record {} approved by {}",
                d.record,
                v["approvedBy"].as_str().unwrap_or("-")
            )
        }),
        HoldCommand::Reject(d) => finish(d.send("reject"), |v| {
            println!(
                "record {} rejected by {}",
                d.record,
                v["rejectedBy"].as_str().unwrap_or("-")
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        endpoint: Endpoint,
    }

    #[derive(Debug, Parser)]
    struct WorkerCli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    #[test]
    fn a_rollout_file_and_fixed_buckets_are_refused_together() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--flow", "f.yaml"];
            argv.extend_from_slice(extra);
            WorkerCli::try_parse_from(argv).unwrap().worker
        };
        let both = parse(&[
            "--rollout-file",
            "/etc/rollout/split.json",
            "--buckets",
            "0-24",
        ]);
        let err = check_args(&both).unwrap_err();
        assert!(
            err.contains("--buckets 0-24") && err.contains("/etc/rollout/split.json"),
            "{err}"
        );
        let canary = parse(&["--track", "canary", "--rollout-file", "split.json"]);
        assert!(check_args(&canary).is_ok());
        assert_eq!(canary.track, crate::rollout::split::Track::Canary);
        let fixed = parse(&["--buckets", "0-24"]);
        assert!(check_args(&fixed).is_ok());
        assert_eq!(fixed.track, crate::rollout::split::Track::Stable);
        assert_eq!(fixed.lease, 60);
        assert!(WorkerCli::try_parse_from(["x", "--flow", "f", "--track", "blue"]).is_err());
    }

    #[test]
    fn the_token_comes_from_the_flag_or_the_file_and_defaults_to_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let given = Cli::try_parse_from(["x", "--token", " inline "]).unwrap();
        assert_eq!(
            given.endpoint.resolve_token().unwrap().as_deref(),
            Some("inline")
        );
        let from_file = Cli::try_parse_from(["x", "--token-file", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            from_file.endpoint.resolve_token().unwrap().as_deref(),
            Some("from-file")
        );
        let missing = Cli::try_parse_from(["x", "--token-file", "/nonexistent/token"]).unwrap();
        assert!(
            missing
                .endpoint
                .resolve_token()
                .unwrap_err()
                .contains("/nonexistent/token")
        );
        // Both at once is a mistake, and a namespace means nothing without a flow.
        assert!(Cli::try_parse_from(["x", "--token", "a", "--token-file", "b"]).is_err());
        assert!(Cli::try_parse_from(["x", "-n", "ns"]).is_err());
        // The default URL is the operations port.
        assert_eq!(given.endpoint.url, "http://127.0.0.1:8081");
    }
}
