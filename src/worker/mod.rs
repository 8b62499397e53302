//! The worker: runs one SyncFlow durably. Sources put records into the ledger (acknowledging the CRM only
//! after the commit), the pipeline claims them, runs the contract and delivers to the ERP, and the operations
//! API tells where every record is and why.
//!
//! The controller runs it as per-flow pods (`meshline worker --flow FILE`); `meshline dev` runs it in-process.

pub mod allocator;
pub mod api;
pub mod audit_routes;
pub mod batch;
pub mod breaker;
pub mod config;
pub mod disk;
pub mod identity;
pub mod intake;
pub mod metrics;
pub mod pipeline;
pub mod problems;
pub mod retention;
pub mod run;
pub mod slots;
pub mod starting;
pub mod ticket_routes;
pub mod track;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

pub use config::{ConfigError, RenderedFlow};
pub use pipeline::{Pipeline, PipelineOptions};

use crate::connectors::Sink;
use crate::contract::{CompiledContract, Lookups};
use crate::ledger::{Ledger, LedgerTarget, SystemClock};

/// Where the worker finds its state and secrets.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The webhook port: the source's webhook route and health, what an Ingress exposes.
    pub listen: SocketAddr,
    /// The operations port (cluster-internal): status, records, dead letters, holds, metrics.
    pub ops_listen: SocketAddr,
    /// Directory of the embedded ledger (`ledger.db`).
    pub state_dir: PathBuf,
    /// Directory holding one sub-directory per referenced Secret (`<dir>/<secret name>/<key>`).
    pub secrets_dir: Option<PathBuf>,
    /// File with the flow's token, which the operations API asks for (all of it but health and metrics).
    pub token_file: Option<PathBuf>,
    pub options: PipelineOptions,
}

/// Why a worker could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("flow {flow}: contract {contract} does not compile: {errors}")]
    Contract {
        flow: String,
        contract: String,
        errors: String,
    },
    #[error("flow {flow}: ledger: {source}")]
    Ledger {
        flow: String,
        source: Box<crate::ledger::LedgerError>,
    },
    #[error("flow {flow}: {message}")]
    Setup { flow: String, message: String },
    /// A Secret the flow needs is missing a key or holds a value that cannot be used (a non-PEM key).
    #[error("flow {flow}: {message}")]
    Credentials { flow: String, message: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
}

impl WorkerError {
    /// Stable label for metrics, conditions and tickets.
    pub fn label(&self) -> &'static str {
        match self {
            WorkerError::Config(e) => e.label(),
            WorkerError::Contract { .. } => "contract_invalid",
            WorkerError::Ledger { .. } => "ledger_unavailable",
            WorkerError::Setup { .. } => "setup_failed",
            WorkerError::Credentials { .. } => "credentials_invalid",
            WorkerError::Listen { .. } => "listen_failed",
        }
    }
}

impl WorkerError {
    /// The [`problems`] kind a worker that cannot start reports on `/status` while it retries.
    pub fn problem_kind(&self) -> &'static str {
        match self {
            WorkerError::Ledger { .. } => problems::LEDGER_UNAVAILABLE,
            WorkerError::Credentials { .. } => problems::CREDENTIALS_INVALID,
            _ => problems::STARTUP_FAILED,
        }
    }
}

/// The reconciliation audit's read clients of the flow's CRM and ERP (`crate::connectors::queries`), with the
/// same credentials the source and the sink read: the one place they are built from the flow. The ERP's keys
/// are read back to CRM ids through the contract's `mapping.externalId` (see `audit::key`). The error says why
/// the flow cannot be audited; the audit's routes answer it. Tests and `meshline dev` may inject their own
/// clients through [`PipelineOptions::audit_queries`].
pub fn audit_queries(
    rendered: &RenderedFlow,
    secrets_dir: Option<&std::path::Path>,
) -> Result<crate::audit::run::AuditQueries, String> {
    let spec = &rendered.flow.spec;
    let credentials = |secret: &str, prefix: &str| {
        crate::connectors::Credentials::new(secrets_dir.map(|d| d.join(secret)).as_deref(), prefix)
    };
    let crm = crate::connectors::queries::crm_query(
        spec,
        &credentials(&spec.source.credentials_secret_ref.name, "source"),
    )
    .map_err(|e| e.to_string())?;
    let erp = crate::connectors::queries::erp_query(
        spec,
        &credentials(&spec.sink.credentials_secret_ref.name, "sink"),
    )
    .map_err(|e| e.to_string())?;
    let template =
        crate::audit::key::KeyTemplate::of_expression(&rendered.contract.spec.mapping.external_id)?;
    Ok(crate::audit::run::AuditQueries {
        crm,
        erp: Arc::new(crate::audit::key::CrmKeyed {
            inner: erp,
            template,
        }),
    })
}

/// How the audit paces, retries and leases for this flow: `spec.audit.maxRequestsPerSecond`, else the
/// flow's delivery rate limit, else 5 requests a second per side; the CRM's money fields as the flow's
/// audit spec names them.
pub fn audit_settings(
    rendered: &RenderedFlow,
    options: &PipelineOptions,
) -> crate::audit::run::AuditSettings {
    let mut settings = options
        .audit_settings
        .clone()
        .unwrap_or_else(|| crate::audit::run::AuditSettings::new(options.worker_id.clone()));
    settings.owner = options.worker_id.clone();
    if options.audit_settings.is_none() {
        let spec = rendered.flow.spec.audit.as_ref();
        let rps = spec
            .and_then(|a| a.max_requests_per_second)
            .or(Some(rendered.flow.spec.delivery.rate_limit).filter(|r| *r > 0))
            .unwrap_or(5)
            .max(1);
        settings.min_interval = std::time::Duration::from_millis(1000 / u64::from(rps));
        if let Some(field) = spec.and_then(|a| a.crm_amount_field.clone()) {
            settings.money.amount = field;
        }
        if let Some(field) = spec.and_then(|a| a.crm_currency_field.clone()) {
            settings.money.currency = Some(field);
        }
        if let Some(currency) = spec.and_then(|a| a.default_currency.clone()) {
            settings.money.default_currency = currency;
        }
    }
    settings
}

/// The ledger a flow's spec asks for.
pub fn ledger_target(
    rendered: &RenderedFlow,
    settings: &WorkerSettings,
) -> Result<LedgerTarget, WorkerError> {
    ledger_target_in(
        rendered,
        &settings.state_dir,
        settings.secrets_dir.as_deref(),
    )
}

/// [`ledger_target`] from the two settings it reads: the embedded ledger's state directory and the mounted
/// Secrets (a PostgreSQL ledger's `url`). `meshline replay` opens the ledger the same way.
pub fn ledger_target_in(
    rendered: &RenderedFlow,
    state_dir: &std::path::Path,
    secrets_dir: Option<&std::path::Path>,
) -> Result<LedgerTarget, WorkerError> {
    let flow = rendered.flow_name();
    let spec = &rendered.flow.spec.ledger;
    match spec.r#type {
        crate::api::LedgerType::Embedded => Ok(LedgerTarget::Sqlite(state_dir.join("ledger.db"))),
        crate::api::LedgerType::Postgres => {
            let secret =
                spec.credentials_secret_ref
                    .as_ref()
                    .ok_or_else(|| WorkerError::Setup {
                        flow: flow.clone(),
                        message:
                            "spec.ledger.credentialsSecretRef is required for a postgres ledger"
                                .into(),
                    })?;
            let creds = crate::connectors::Credentials::new(
                secrets_dir.map(|d| d.join(&secret.name)).as_deref(),
                "ledger",
            );
            let url = creds.get("url").map_err(|e| WorkerError::Credentials {
                flow,
                message: e.to_string(),
            })?;
            Ok(LedgerTarget::Postgres(url))
        }
    }
}

/// The worker's two sockets, already listening: the webhook port and the operations port.
#[derive(Debug)]
pub struct Listeners {
    pub webhook: std::net::TcpListener,
    pub ops: std::net::TcpListener,
}

impl Listeners {
    /// Binds both addresses of `settings`.
    pub fn bind(settings: &WorkerSettings) -> Result<Listeners, WorkerError> {
        let bind = |addr: SocketAddr| {
            std::net::TcpListener::bind(addr).map_err(|e| WorkerError::Listen {
                addr,
                reason: e.to_string(),
            })
        };
        Ok(Listeners {
            webhook: bind(settings.listen)?,
            ops: bind(settings.ops_listen)?,
        })
    }

    /// Both sockets again (the same sockets, new handles), for a server that takes over from another.
    pub fn try_clone(&self) -> std::io::Result<Listeners> {
        Ok(Listeners {
            webhook: self.webhook.try_clone()?,
            ops: self.ops.try_clone()?,
        })
    }
}

fn serve_on(
    listener: std::net::TcpListener,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, WorkerError> {
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .map_err(|e| WorkerError::Listen {
            addr,
            reason: e.to_string(),
        })
}

/// A running worker.
pub struct Worker {
    pub pipeline: Arc<Pipeline>,
    pub intake: Arc<intake::LedgerIntake>,
    /// Where the webhook port listens.
    pub webhook_addr: SocketAddr,
    /// Where the operations port listens.
    pub ops_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    ready: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Worker {
    /// Compiles the contract, opens the ledger, starts the pipeline, the webhook port (health plus the extra
    /// routes, such as a webhook source's) and the operations API.
    pub async fn start(
        rendered: &RenderedFlow,
        settings: &WorkerSettings,
        sink: Arc<dyn Sink>,
        lookups: serde_json::Value,
        extra_routes: impl FnOnce(Arc<intake::LedgerIntake>) -> axum::Router,
    ) -> Result<Worker, WorkerError> {
        Worker::start_on(rendered, settings, sink, lookups, extra_routes, None).await
    }

    /// [`Worker::start`] on sockets already listening (`meshline worker` binds them first, to answer health
    /// and status while the pipeline cannot start yet); `None` binds `settings.listen` and
    /// `settings.ops_listen`.
    pub async fn start_on(
        rendered: &RenderedFlow,
        settings: &WorkerSettings,
        sink: Arc<dyn Sink>,
        lookups: serde_json::Value,
        extra_routes: impl FnOnce(Arc<intake::LedgerIntake>) -> axum::Router,
        listeners: Option<Listeners>,
    ) -> Result<Worker, WorkerError> {
        let flow = rendered.flow_name();
        let contract =
            crate::contract::compile_with(&rendered.contract.spec, &settings.options.contract)
                .map_err(|errors| WorkerError::Contract {
                    flow: flow.clone(),
                    contract: rendered.contract.metadata.name.clone().unwrap_or_default(),
                    errors: errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                })?;
        let contract = Arc::new(contract);
        let env = build_env(&contract, &flow, &lookups)?;
        std::fs::create_dir_all(&settings.state_dir).map_err(|e| WorkerError::Setup {
            flow: flow.clone(),
            message: format!(
                "cannot create the state directory {}: {e}",
                settings.state_dir.display()
            ),
        })?;
        let target = ledger_target(rendered, settings)?;
        let ledger: Arc<dyn Ledger> = crate::ledger::open(&target, &flow, Arc::new(SystemClock))
            .await
            .map_err(|source| WorkerError::Ledger {
                flow: flow.clone(),
                source: Box::new(source),
            })?;
        // Every outcome this worker writes counts toward its revision, which a canary's analysis compares
        // with the other track's: the ledger keeps the per-revision measures beside the state changes.
        let revision = rendered.revision_name();
        ledger
            .attribute_to(&revision)
            .map_err(|e| WorkerError::Setup {
                flow: flow.clone(),
                message: format!(
                    "cannot attribute the ledger's outcomes to revision {revision:?}: {e}"
                ),
            })?;
        let token = match &settings.token_file {
            Some(path) => Some(Arc::<str>::from(
                std::fs::read_to_string(path)
                    .map_err(|e| WorkerError::Setup {
                        flow: flow.clone(),
                        message: format!("token file {}: {e}", path.display()),
                    })?
                    .trim(),
            )),
            None => None,
        };
        let metrics = Arc::new(metrics::Metrics::new(&rendered.flow_namespace(), &flow));
        let problems = Arc::new(problems::Problems::default());
        let disk = match &target {
            LedgerTarget::Sqlite(_) => Some(disk::DiskGuard::new(
                settings.options.free_space.clone().unwrap_or_else(|| {
                    Arc::new(disk::Statvfs::new(&settings.state_dir)) as Arc<dyn disk::FreeSpace>
                }),
                settings.options.disk_reserve,
                problems.clone(),
                metrics.clone(),
            )),
            LedgerTarget::Postgres(_) => None,
        };
        if ledger.shares_delivery_slots() {
            match ledger
                .reclaim_delivery_slots(&settings.options.worker_id)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    flow = %flow,
                    slots = n,
                    "gave back the delivery slots this replica's previous process held"
                ),
                // Not fatal: those slots lapse with their leases.
                Err(e) => {
                    tracing::warn!(flow = %flow, error = %e, "could not reclaim delivery slots")
                }
            }
        }
        let shared_slots = ledger.shares_delivery_slots().then(|| {
            slots::SharedSlots::new(
                ledger.clone(),
                &settings.options.worker_id,
                rendered.flow.spec.delivery.concurrency,
            )
        });
        let track = Arc::new(match &settings.options.rollout_file {
            Some(file) => track::TrackBuckets::following(
                settings.options.track,
                revision.clone(),
                file.clone(),
                metrics.clone(),
            ),
            None => track::TrackBuckets::fixed(
                settings.options.track,
                revision,
                settings.options.buckets,
                metrics.clone(),
            ),
        });
        // Identities that cannot be used are a configuration problem on /status, not a reason to stop the
        // flow: records keep flowing and only approvals wait until the Secret is fixed.
        let identities = Arc::new(identity::IdentityBook::load(
            rendered.roster.as_ref(),
            settings.secrets_dir.as_deref(),
        ));
        if let Err(why) = identities.current().as_ref() {
            tracing::error!(flow = %flow, error = %why, "approvals are refused until the identities are fixed");
            problems.set(problems::IDENTITIES_INVALID, why.clone());
        }
        let pipeline = Arc::new(Pipeline {
            flow: flow.clone(),
            ledger,
            shared_slots,
            contract,
            env: std::sync::RwLock::new(Arc::new(env)),
            sink,
            policy: rendered.flow.spec.delivery.clone(),
            options: settings.options.clone(),
            breaker: Default::default(),
            metrics,
            wake: tokio::sync::Notify::new(),
            gate: std::sync::Mutex::new(None),
            handed: Default::default(),
            leasing: Default::default(),
            stopping: Default::default(),
            // Until the ERP has answered, assume a slow one (50 ms) so the first claims stay small.
            delivery_micros: std::sync::atomic::AtomicU64::new(50_000),
            problems,
            source_api: Default::default(),
            disk,
            track,
            identities,
        });
        let intake = Arc::new(intake::LedgerIntake::new(pipeline.clone()));
        let ready = Arc::new(AtomicBool::new(true));
        let roster = rendered.roster.clone().map(Arc::new);
        let state = api::ApiState {
            pipeline: pipeline.clone(),
            flow_namespace: Arc::from(rendered.flow_namespace().as_str()),
            roster: roster.clone(),
            token,
            ready: ready.clone(),
            audit: Arc::new(audit_routes::AuditService::new(
                pipeline.ledger.clone(),
                settings
                    .options
                    .audit_queries
                    .clone()
                    .map(Ok)
                    .unwrap_or_else(|| audit_queries(rendered, settings.secrets_dir.as_deref())),
                audit_settings(rendered, &settings.options),
                settings.options.audit_window.unwrap_or_else(|| {
                    // The roster's window, which the controller renders with the flow.
                    rendered
                        .roster
                        .as_ref()
                        .and_then(|r| r.spec.audit.as_ref()?.window)
                        .map(std::time::Duration::from)
                        .unwrap_or(crate::audit::run::DEFAULT_WINDOW)
                }),
            )),
        };
        let webhook_app = api::webhook_router(state.clone()).merge(extra_routes(intake.clone()));
        let ops_app = api::ops_router(state);
        let listeners = match listeners {
            Some(l) => l,
            None => Listeners::bind(settings)?,
        };
        let webhook = serve_on(listeners.webhook, settings.listen)?;
        let ops = serve_on(listeners.ops, settings.ops_listen)?;
        let local = |l: &tokio::net::TcpListener, addr| {
            l.local_addr().map_err(|e| WorkerError::Listen {
                addr,
                reason: e.to_string(),
            })
        };
        let webhook_addr = local(&webhook, settings.listen)?;
        let ops_addr = local(&ops, settings.ops_listen)?;
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, app, what) in [
            (webhook, webhook_app, "webhook port"),
            (ops, ops_app, "operations API"),
        ] {
            let mut server_rx = rx.clone();
            tasks.spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = server_rx.wait_for(|s| *s).await;
                });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "{what} stopped");
                }
            });
        }
        tasks.spawn(retention::run(
            pipeline.ledger.clone(),
            retention::retention_of(&rendered.flow.spec),
            pipeline.metrics.clone(),
            rx.clone(),
        ));
        if settings.options.rollout_file.is_some() {
            let woken = pipeline.clone();
            tasks.spawn(track::follow(
                pipeline.track.clone(),
                move || woken.wake.notify_one(),
                rx.clone(),
            ));
        }
        // Tickets: routed, escalated and delivered beside the pipeline, sharing only the ledger with it.
        let dispatcher = crate::tickets::dispatch::Dispatcher {
            ledger: pipeline.ledger.clone(),
            flow: rendered.flow.clone(),
            roster: rendered.roster.clone(),
            sinks: ticket_sinks(rendered, settings, &pipeline.problems),
            clock: Arc::new(SystemClock),
            signals: pipeline.clone(),
            send_lease: settings.options.lease,
        };
        tasks.spawn(dispatcher.run(settings.options.ticket_period, rx.clone()));
        tasks.spawn(pipeline.clone().run(rx));
        tracing::info!(flow = %flow, %webhook_addr, %ops_addr, backend = pipeline.ledger.backend(), "worker started");
        Ok(Worker {
            pipeline,
            intake,
            webhook_addr,
            ops_addr,
            shutdown,
            ready,
            tasks,
        })
    }

    /// A receiver that turns true when shutdown starts, for sources that run beside the pipeline.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Runs a task (a poller, a lookup refresher) until shutdown.
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Stops taking work, lets in-flight deliveries finish within the grace period, records their outcomes
    /// and closes the ledger.
    pub async fn shutdown(mut self) {
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.pipeline.ledger.close().await;
    }
}

/// The roster's ticket sinks, each with its credentials from its mounted Secret (`MESHLINE_TICKET_<SINK>_<KEY>`
/// variables for local runs). A sink that cannot be built is a problem on `/status`; its tickets wait in the
/// outbox, reported as undeliverable, until the roster or the Secret is fixed.
fn ticket_sinks(
    rendered: &RenderedFlow,
    settings: &WorkerSettings,
    problems: &problems::Problems,
) -> std::collections::BTreeMap<String, Arc<dyn crate::tickets::sinks::TicketSink>> {
    let mut out = std::collections::BTreeMap::new();
    let Some(roster) = &rendered.roster else {
        return out;
    };
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    let mut invalid = Vec::new();
    for spec in &roster.spec.ticket_sinks {
        let dir = settings
            .secrets_dir
            .as_ref()
            .map(|d| d.join(&spec.credentials_secret_ref.name));
        let credentials = crate::connectors::credentials::Credentials::new(
            dir.as_deref(),
            // Sink names may hold `-` and `.`, which an environment variable's name cannot.
            &format!(
                "TICKET_{}",
                spec.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            ),
        );
        match crate::tickets::sinks::build(spec, &credentials, client.clone()) {
            Ok(sink) => {
                out.insert(spec.name.clone(), Arc::from(sink));
            }
            Err(why) => invalid.push(format!(
                "OwnershipRoster {}: {why}",
                roster.metadata.name.as_deref().unwrap_or_default()
            )),
        }
    }
    if !invalid.is_empty() {
        tracing::error!(flow = %rendered.flow_name(), problems = %invalid.join("; "), "ticket sinks that cannot be built; their tickets wait in the outbox");
        problems.set(problems::TICKET_SINK_INVALID, invalid.join("; "));
    }
    out
}

impl crate::tickets::dispatch::FlowSignals for Pipeline {
    fn breaker_open(&self) -> Option<String> {
        self.breaker.state().map(|s| s.reason)
    }
}

/// Prepares the contract's environment for a lookup snapshot (`{"pricebook": {"SKU-1": {...}}}`).
pub fn build_env(
    contract: &CompiledContract,
    flow: &str,
    lookups: &serde_json::Value,
) -> Result<crate::contract::Env, WorkerError> {
    let tables = Lookups::from_json(contract, lookups).map_err(|e| WorkerError::Setup {
        flow: flow.to_string(),
        message: format!("lookups: {e}"),
    })?;
    contract.env(flow, &tables).map_err(|e| WorkerError::Setup {
        flow: flow.to_string(),
        message: format!("lookups: {e}"),
    })
}
