//! `meshline dev`: a whole example end to end on one machine, no cluster. The manifests are validated like
//! `meshline validate`, the real worker runs in-process on an embedded SQLite ledger, and only the CRM and the
//! ERP are stand-ins (see `crate::sim`) that speak the real wire formats, so the real source and sink code runs.

mod canary;
mod scenario;
pub mod tickets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use canary::{CanaryRun, CanaryStepRun};
pub use scenario::{
    ContractChange, Explained, OwnerTickets, Report, ScenarioOptions, TicketReport, TicketsReport,
    run as run_scenario,
};

use crate::api::{Backoff, LedgerSpec, SinkSystem, SourceMode, SourceSystem, WebhookSignature};
use crate::connectors::Credentials;
use crate::rollout::split::{SPLIT_FILE, Split, Track};
use crate::sim::crm::{self, CrmCredentials, CrmOrg, CrmStandIn};
use crate::sim::erp::{self, ErpCredentials, ErpState};
use crate::worker::run::{RunOptions, start_flow_on};
use crate::worker::{Listeners, PipelineOptions, RenderedFlow, Worker, WorkerSettings};

/// Version of the state directory's layout; a directory written by another layout is refused, not guessed at.
pub const STATE_FORMAT: u32 = 1;

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    /// Where the ledger and the generated secrets live between runs (default `.meshline/dev/<flow>`).
    pub state: Option<PathBuf>,
    pub fresh: bool,
    /// The worker's webhook port (0: any free port).
    pub port: u16,
    /// The worker's operations port: status, records, dead letters, holds, metrics (0: any free port).
    pub ops_port: u16,
}

/// Why `meshline dev` could not run; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0}")]
    Manifests(String),
    #[error("{dir}: {reason}")]
    Unsupported { dir: String, reason: String },
    #[error("state directory {dir}: {reason}")]
    State { dir: String, reason: String },
    #[error("{0}")]
    Worker(#[from] crate::worker::WorkerError),
    #[error("{0}")]
    Scenario(String),
}

impl DevError {
    pub fn label(&self) -> &'static str {
        match self {
            DevError::Manifests(_) => "manifests_invalid",
            DevError::Unsupported { .. } => "unsupported",
            DevError::State { .. } => "state_incompatible",
            DevError::Worker(e) => e.label(),
            DevError::Scenario(_) => "scenario_failed",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StateStamp {
    format: u32,
    meshline: String,
    flow: String,
}

/// A running local environment: the worker and both stand-ins.
pub struct DevEnv {
    /// The stable track's worker. The scenario replaces it (on the same ports) when it promotes a canaried
    /// contract, as a cluster restarts the stable Deployment on the new active revision.
    pub worker: Worker,
    pub erp: Arc<ErpState>,
    pub erp_addr: SocketAddr,
    pub crm: Arc<CrmStandIn>,
    /// Where the CRM stand-in's org serves its token endpoint and query resource (the flow's source
    /// `baseUrl` points here, so the audit's Salesforce query logs in and reads from it).
    pub crm_addr: SocketAddr,
    pub token: String,
    /// Each roster owner's personal token (owner id → token), generated for this run and mounted as the
    /// roster's identity Secret, so the scenario approves as the owner holding the approver role.
    pub identities: std::collections::BTreeMap<String, String>,
    /// The local webhook every roster ticket sink is pointed at (see [`tickets`]).
    pub tickets: Arc<tickets::TicketReceiver>,
    pub tickets_addr: SocketAddr,
    pub state_dir: PathBuf,
    pub flow: String,
    /// The flow, its active contract and roster as the worker runs them (with the stand-ins' addresses).
    pub rendered: RenderedFlow,
    /// How the stable worker was started (ports as bound), so a canary worker and a restarted stable worker
    /// share its ledger file, secrets and token.
    settings: WorkerSettings,
    /// Spare handles of the stable worker's two sockets, for the worker that takes over at a promotion.
    stable_sockets: Listeners,
    /// Duplicates recognised by stable workers the scenario replaced.
    retired_duplicates: u64,
    erp_task: tokio::task::JoinHandle<()>,
    crm_task: tokio::task::JoinHandle<()>,
    tickets_task: tokio::task::JoinHandle<()>,
}

impl DevEnv {
    /// The webhook port: `POST /webhook` and health.
    pub fn webhook_url(&self) -> String {
        format!("http://{}", self.worker.webhook_addr)
    }

    /// The operations port: status, records, dead letters, holds (with the token) and metrics.
    pub fn ops_url(&self) -> String {
        format!("http://{}", self.worker.ops_addr)
    }

    /// The file holding the worker's token, which the operations port asks for.
    pub fn token_file(&self) -> PathBuf {
        self.state_dir.join("api-token")
    }

    /// The file holding an owner's personal token (their key of the roster's identity Secret), for
    /// `meshline hold approve --identity-token-file`.
    pub fn identity_token_file(&self, owner: &str) -> Option<PathBuf> {
        let secret = self
            .rendered
            .roster
            .as_ref()?
            .spec
            .identity_secret_ref
            .as_ref()?;
        Some(
            self.state_dir
                .join("secrets")
                .join(&secret.name)
                .join(owner),
        )
    }

    /// The rollout split both tracks follow, in the format the controller writes into the flow's rollout
    /// ConfigMap ([`crate::rollout::split`]); the scenario rewrites it at each canary step.
    pub fn split_file(&self) -> PathBuf {
        split_file(&self.state_dir)
    }

    /// The source's Secret as the worker mounts it (the CRM stand-in's client credentials and the webhook
    /// secret), for the audit's [`crate::connectors::queries::crm_query`].
    pub fn source_credentials(&self) -> Credentials {
        let name = &self.rendered.flow.spec.source.credentials_secret_ref.name;
        Credentials::new(Some(&self.state_dir.join("secrets").join(name)), "source")
    }

    /// The sink's Secret as the worker mounts it (the ERP stand-in's TBA credentials), for the audit's
    /// [`crate::connectors::queries::erp_query`].
    pub fn sink_credentials(&self) -> Credentials {
        let name = &self.rendered.flow.spec.sink.credentials_secret_ref.name;
        Credentials::new(Some(&self.state_dir.join("secrets").join(name)), "sink")
    }

    /// The operations page's view of this run, as the controller's page shows a cluster's flows: the
    /// worker read directly through its operations port with the worker's token, the roster for the
    /// exceptions by owner. Approvals typed into the page are forwarded with the person's own token.
    pub fn page_backend(&self) -> crate::ops_page::DirectBackend {
        crate::ops_page::DirectBackend::new(
            vec![crate::ops_page::DirectFlow {
                flow: self.rendered.flow.clone(),
                ops_url: self.ops_url(),
                token_file: self.token_file(),
            }],
            self.rendered.roster.clone().into_iter().collect(),
        )
    }

    pub async fn shutdown(self) {
        self.worker.shutdown().await;
        self.erp_task.abort();
        self.crm_task.abort();
        self.tickets_task.abort();
    }
}

fn split_file(state: &Path) -> PathBuf {
    state.join("rollout").join(SPLIT_FILE)
}

/// Prepares the state directory, starts the ERP stand-in and the worker, and points the CRM stand-in at it.
pub async fn start(options: &DevOptions) -> Result<DevEnv, DevError> {
    let dir_label = options.dir.display().to_string();
    if !options.dir.exists() {
        return Err(DevError::Manifests(format!(
            "{dir_label}: no such file or directory"
        )));
    }
    let mut rendered = RenderedFlow::from_manifests(&options.dir)
        .map_err(|e| DevError::Manifests(e.to_string()))?;
    let flow = rendered.flow_name();
    let spec = &mut rendered.flow.spec;
    if spec.sink.system != SinkSystem::Netsuite {
        return Err(DevError::Unsupported {
            dir: dir_label,
            reason: format!(
                "the local ERP stand-in speaks NetSuite's REST API; this flow's sink is {:?}",
                spec.sink.system
            ),
        });
    }
    if spec.source.system == SourceSystem::Hubspot {
        return Err(DevError::Unsupported {
            dir: dir_label,
            reason: "the local CRM stand-in sends Salesforce-shaped records; this flow's source is HubSpot".into(),
        });
    }
    let state_dir = options
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(".meshline/dev").join(&flow));
    let created = prepare_state(&state_dir, &flow, options.fresh)?;
    match start_in(&mut rendered, &state_dir, options.port, options.ops_port).await {
        Ok(env) => Ok(env),
        Err(e) => {
            // Nothing half-made is left behind by a run that did not start.
            if created {
                let _ = std::fs::remove_dir_all(&state_dir);
            }
            Err(e)
        }
    }
}

/// Returns whether the directory was created by this call.
fn prepare_state(dir: &Path, flow: &str, fresh: bool) -> Result<bool, DevError> {
    let err = |reason: String| DevError::State {
        dir: dir.display().to_string(),
        reason,
    };
    if fresh && dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| err(format!("cannot remove it for --fresh: {e}")))?;
    }
    let stamp_path = dir.join("state.json");
    if dir.exists() {
        let text = std::fs::read_to_string(&stamp_path)
            .map_err(|_| err("exists but has no state.json; it was not made by `meshline dev` (use --fresh or another --state)".into()))?;
        let stamp: StateStamp = serde_json::from_str(&text)
            .map_err(|e| err(format!("state.json is unreadable ({e}); use --fresh")))?;
        if stamp.format != STATE_FORMAT {
            return Err(err(format!(
                "was written by meshline {} in state format {}, this is format {STATE_FORMAT}; use --fresh to start over",
                stamp.meshline, stamp.format
            )));
        }
        if stamp.flow != flow {
            return Err(err(format!(
                "belongs to flow {}, not {flow}; use another --state or --fresh",
                stamp.flow
            )));
        }
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
    let stamp = StateStamp {
        format: STATE_FORMAT,
        meshline: env!("CARGO_PKG_VERSION").into(),
        flow: flow.into(),
    };
    std::fs::write(
        &stamp_path,
        serde_json::to_string_pretty(&stamp).unwrap_or_default(),
    )
    .map_err(|e| err(format!("cannot write state.json: {e}")))?;
    Ok(true)
}

fn write_secret(dir: &Path, name: &str, files: &[(&str, String)]) -> Result<(), DevError> {
    let secret = dir.join(name);
    std::fs::create_dir_all(&secret).map_err(|e| DevError::State {
        dir: secret.display().to_string(),
        reason: e.to_string(),
    })?;
    for (key, value) in files {
        std::fs::write(secret.join(key), value).map_err(|e| DevError::State {
            dir: secret.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// The identity Secret a local run mounts when the roster names none.
const DEV_IDENTITY_SECRET: &str = "meshline-dev-identities";

/// Gives every roster owner a fresh personal token for this run, written as the roster's identity Secret
/// (named by the roster, or [`DEV_IDENTITY_SECRET`]) so the worker reads them through its usual loader.
fn dev_identities(
    rendered: &mut RenderedFlow,
    secrets: &Path,
) -> Result<std::collections::BTreeMap<String, String>, DevError> {
    let Some(roster) = rendered.roster.as_mut() else {
        return Ok(Default::default());
    };
    let secret = roster
        .spec
        .identity_secret_ref
        .get_or_insert_with(|| crate::api::SecretRef {
            name: DEV_IDENTITY_SECRET.into(),
        })
        .name
        .clone();
    let tokens: std::collections::BTreeMap<String, String> = roster
        .spec
        .owners
        .iter()
        .map(|o| (o.id.clone(), uuid::Uuid::new_v4().simple().to_string()))
        .collect();
    // A token left by an earlier run for an owner no longer in the roster must not keep working.
    let _ = std::fs::remove_dir_all(secrets.join(&secret));
    let files: Vec<(&str, String)> = tokens
        .iter()
        .map(|(id, t)| (id.as_str(), t.clone()))
        .collect();
    write_secret(secrets, &secret, &files)?;
    Ok(tokens)
}

/// The stand-ins' generated credentials, kept in the state directory between runs.
struct StandInCredentials {
    erp: ErpCredentials,
    crm: CrmCredentials,
    webhook_secret: String,
    api_token: String,
}

/// Reads the generated credentials back (so the ledger and secrets of an earlier run keep working), or makes them.
fn credentials(state: &Path) -> StandInCredentials {
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let path = state.join("stand-ins.json");
    if let Some(text) = read(path.clone())
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
    {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let erp = ErpCredentials {
            account_id: s("accountId"),
            consumer_key: s("consumerKey"),
            consumer_secret: s("consumerSecret"),
            token_id: s("tokenId"),
            token_secret: s("tokenSecret"),
        };
        // A state directory from before the CRM stand-in had a login gets one now.
        let crm = match (s("crmClientId"), s("crmClientSecret")) {
            (id, secret) if !id.is_empty() && !secret.is_empty() => CrmCredentials {
                client_id: id,
                client_secret: secret,
            },
            _ => CrmCredentials::generate(),
        };
        let creds = StandInCredentials {
            erp,
            crm,
            webhook_secret: s("webhookSecret"),
            api_token: s("apiToken"),
        };
        save_credentials(&path, &creds);
        return creds;
    }
    let creds = StandInCredentials {
        erp: ErpCredentials::generate(),
        crm: CrmCredentials::generate(),
        webhook_secret: uuid::Uuid::new_v4().simple().to_string(),
        api_token: uuid::Uuid::new_v4().simple().to_string(),
    };
    save_credentials(&path, &creds);
    creds
}

fn save_credentials(path: &Path, c: &StandInCredentials) {
    let v = serde_json::json!({
        "accountId": c.erp.account_id, "consumerKey": c.erp.consumer_key, "consumerSecret": c.erp.consumer_secret,
        "tokenId": c.erp.token_id, "tokenSecret": c.erp.token_secret, "webhookSecret": c.webhook_secret,
        "apiToken": c.api_token, "crmClientId": c.crm.client_id, "crmClientSecret": c.crm.client_secret,
    });
    let _ = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default());
}

async fn start_in(
    rendered: &mut RenderedFlow,
    state: &Path,
    port: u16,
    ops_port: u16,
) -> Result<DevEnv, DevError> {
    let flow = rendered.flow_name();
    let StandInCredentials {
        erp: creds,
        crm: crm_credentials,
        webhook_secret,
        api_token: token,
    } = credentials(state);
    let erp = ErpState::new(creds.clone(), erp::example_pricebook());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DevError::Scenario(format!("cannot start the ERP stand-in: {e}")))?;
    let erp_addr = listener
        .local_addr()
        .map_err(|e| DevError::Scenario(e.to_string()))?;
    let app = erp::router(erp.clone());
    let erp_task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let org = CrmOrg::new(crm_credentials.clone());
    let (crm_addr, crm_task) = match serve(crm::router(org.clone())).await {
        Ok(served) => served,
        Err(e) => {
            erp_task.abort();
            return Err(DevError::Scenario(format!(
                "cannot start the CRM stand-in: {e}"
            )));
        }
    };
    // Every early return below stops both stand-ins.
    let stop_stand_ins = || {
        erp_task.abort();
        crm_task.abort();
    };

    let secrets = state.join("secrets");
    let identities = match dev_identities(rendered, &secrets) {
        Ok(i) => i,
        Err(e) => {
            stop_stand_ins();
            return Err(e);
        }
    };
    // The ticket sinks' signing secret is generated per run and handed to the worker as a mounted Secret,
    // like every other credential here: the process environment is never touched.
    let signing_secret = uuid::Uuid::new_v4().simple().to_string();
    let receiver = tickets::TicketReceiver::new(signing_secret.clone());
    let (tickets_addr, tickets_task) = match tickets::serve(receiver.clone()).await {
        Ok(t) => t,
        Err(e) => {
            stop_stand_ins();
            return Err(DevError::Scenario(format!(
                "cannot start the local ticket receiver: {e}"
            )));
        }
    };
    if let Some(roster) = rendered.roster.as_mut() {
        tickets::redirect_sinks(roster, tickets_addr);
    }
    let written = write_secret(
        &secrets,
        tickets::RECEIVER_SECRET,
        &[("signingSecret", signing_secret)],
    );
    if let Err(e) = written {
        stop_stand_ins();
        tickets_task.abort();
        return Err(e);
    }
    let spec = &mut rendered.flow.spec;
    // The source's Secret holds the webhook secret the worker verifies and the client credentials the audit's
    // Salesforce query logs in with (generated for the stand-in, never a real org's).
    let mut source_secret = vec![("webhookSecret", webhook_secret.clone())];
    source_secret.extend(crm_credentials.secret_files());
    let token_file = state.join("api-token");
    let written = write_secret(
        &secrets,
        &spec.sink.credentials_secret_ref.name,
        &creds.secret_files(),
    )
    .and_then(|()| {
        write_secret(
            &secrets,
            &spec.source.credentials_secret_ref.name,
            &source_secret,
        )
    })
    .and_then(|()| {
        std::fs::write(&token_file, &token).map_err(|e| DevError::State {
            dir: state.display().to_string(),
            reason: e.to_string(),
        })
    });
    if let Err(e) = written {
        stop_stand_ins();
        tickets_task.abort();
        return Err(e);
    }

    // The stand-in CRM pushes signed webhooks, so a poll source is received as a webhook source here; the
    // rest of the flow (contract, lookups, sink, delivery policy) is the flow as written.
    spec.source.mode = SourceMode::Webhook;
    spec.source.signature = Some(WebhookSignature::HmacSha256);
    // The stand-in posts to the worker directly; Meshline's scheme does not sign the URL.
    spec.source.public_url = None;
    spec.source.poll_interval = None;
    // The org behind the stand-in: the client-credentials login and the query resource the audit reads.
    spec.source.base_url = Some(format!("http://{crm_addr}"));
    spec.sink.base_url = Some(format!("http://{erp_addr}"));
    spec.ledger = LedgerSpec::default();
    spec.replicas = None;
    // A laptop demo should recover in seconds, not in the production policy's minutes.
    spec.delivery.backoff = Some(Backoff {
        base: Some(Duration::from_millis(200).into()),
        max: Some(Duration::from_secs(3).into()),
    });
    spec.delivery.max_attempts = spec.delivery.max_attempts.max(12);

    // A run starts with no canary under way, whatever an interrupted run left in the split file: a stale
    // split would leave the stable worker claiming only part of the buckets and no canary to take the rest.
    let split = split_file(state);
    let reset = std::fs::create_dir_all(split.parent().unwrap_or(state))
        .and_then(|()| std::fs::write(&split, Split::none().to_json()));
    if let Err(e) = reset {
        stop_stand_ins();
        tickets_task.abort();
        return Err(DevError::State {
            dir: split.display().to_string(),
            reason: format!("cannot write the rollout split: {e}"),
        });
    }
    let mut settings = WorkerSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        ops_listen: SocketAddr::from(([127, 0, 0, 1], ops_port)),
        state_dir: state.join("ledger"),
        secrets_dir: Some(secrets),
        token_file: Some(token_file),
        options: PipelineOptions {
            worker_id: "dev".into(),
            idle_poll: Duration::from_millis(20),
            track: Track::Stable,
            rollout_file: Some(split),
            ..PipelineOptions::default()
        },
    };
    let sockets = Listeners::bind(&settings).and_then(|l| {
        let spare = l
            .try_clone()
            .map_err(|e| crate::worker::WorkerError::Listen {
                addr: settings.listen,
                reason: e.to_string(),
            })?;
        Ok((l, spare))
    });
    let started = match sockets {
        Ok((sockets, spare)) => {
            start_flow_on(rendered, &settings, &RunOptions::default(), Some(sockets))
                .await
                .map(|w| (w, spare))
        }
        Err(e) => Err(e),
    };
    let (worker, stable_sockets) = match started {
        Ok(w) => w,
        Err(e) => {
            stop_stand_ins();
            tickets_task.abort();
            return Err(e.into());
        }
    };
    // A restarted stable worker binds the same ports, so the CRM stand-in and the printed URLs stay valid.
    settings.listen = worker.webhook_addr;
    settings.ops_listen = worker.ops_addr;
    let crm = Arc::new(CrmStandIn::with_org(
        format!("http://{}/webhook", worker.webhook_addr),
        webhook_secret,
        org,
    ));
    Ok(DevEnv {
        worker,
        erp,
        erp_addr,
        crm,
        crm_addr,
        token,
        identities,
        tickets: receiver,
        tickets_addr,
        state_dir: state.to_path_buf(),
        flow,
        rendered: rendered.clone(),
        settings,
        stable_sockets,
        retired_duplicates: 0,
        erp_task,
        crm_task,
        tickets_task,
    })
}

/// Serves a stand-in's router on a free local port.
async fn serve(app: axum::Router) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}
