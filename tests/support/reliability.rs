//! Harness of the reliability tests: an ERP double that speaks the generic HTTP sink's wire format and keeps
//! score, a rendered flow on disk with its Secrets as the controller mounts them, the real `meshline worker`
//! binary as a child process that can be SIGKILLed and restarted on the same state and port, and a CRM that
//! signs its webhooks and retries every batch until it is acknowledged.
//!
//! The double checks what the real API would (bearer token, `Idempotency-Key`), answers with programmable
//! trouble (503, slow answers past the client's timeout, 429 with `Retry-After`, 400 for refused ids) and
//! stores by external id with PUT semantics, so "exactly once" is a property of its final state and "never
//! twice" of its per-id PUT counts.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use meshline::api::{
    Backoff, LedgerSpec, LedgerType, LookupSource, SecretRef, SinkSystem, SourceMode, SourceSystem,
    WebhookSignature,
};
use meshline::worker::RenderedFlow;
use serde_json::{Value, json};

/// How the ERP double answers PUTs right now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ErpMode {
    Ok,
    /// 503 to writes and to the health probe (maintenance).
    Unavailable,
    /// Writes hang this long before they are processed (the health probe still answers).
    Slow(Duration),
    /// 429 with `Retry-After: <seconds>` to writes (the health probe still answers).
    Throttling {
        retry_after_secs: u64,
    },
}

/// The ERP's state and the score it keeps.
pub struct ErpState {
    token: Mutex<String>,
    mode: Mutex<ErpMode>,
    /// Processing time of a write, so deliveries are observably in flight.
    latency: Mutex<Duration>,
    orders: Mutex<HashMap<String, Value>>,
    /// Accepted (stored) PUTs per external id.
    stored: Mutex<HashMap<String, u32>>,
    /// When each accepted (stored) PUT per `Idempotency-Key` (one key per version of a record) arrived.
    stored_keys: Mutex<HashMap<String, Vec<Instant>>>,
    /// Arrival times of every PUT per external id, and of the 429s sent for it.
    arrivals: Mutex<HashMap<String, Vec<Instant>>>,
    throttled: Mutex<HashMap<String, Vec<Instant>>>,
    answers: Mutex<BTreeMap<u16, usize>>,
    /// External ids the ERP refuses, with the 4xx status it answers them.
    refuse: Mutex<HashMap<String, u16>>,
    violations: Mutex<Vec<String>>,
    pub calls: AtomicUsize,
    /// Writes that met a slow ERP (most of them outlive the client's patience).
    pub slowed: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

/// A running ERP double on 127.0.0.1.
pub struct Erp {
    pub addr: SocketAddr,
    pub state: Arc<ErpState>,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Also runs when the server drops the handler because the client went away (killed or timed out).
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Erp {
    /// Starts the double on the current Tokio runtime; its API lives under `/erp`.
    pub async fn start(token: &str) -> Erp {
        let state = Arc::new(ErpState {
            token: Mutex::new(token.to_string()),
            mode: Mutex::new(ErpMode::Ok),
            latency: Mutex::new(Duration::from_millis(1)),
            orders: Mutex::default(),
            stored: Mutex::default(),
            stored_keys: Mutex::default(),
            arrivals: Mutex::default(),
            throttled: Mutex::default(),
            answers: Mutex::default(),
            refuse: Mutex::default(),
            violations: Mutex::default(),
            calls: AtomicUsize::new(0),
            slowed: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/erp", get(probe))
            .route("/erp/{id}", put(upsert))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the ERP double");
        let addr = listener.local_addr().expect("ERP double address");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("ERP double serves");
        });
        Erp { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/erp", self.addr)
    }

    /// From now on only `token` is accepted (the old one was revoked at the ERP).
    pub fn rotate_token(&self, token: &str) {
        *self.state.token.lock().unwrap() = token.to_string();
    }

    pub fn set_mode(&self, mode: ErpMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    pub fn refuse(&self, external_id: &str) {
        self.refuse_with(external_id, 400);
    }

    /// Refuses `external_id` with `status` (a 4xx other than 401/403/408/429, so a permanent error), so
    /// refusals differ by reason (`erp:<status>`).
    pub fn refuse_with(&self, external_id: &str, status: u16) {
        self.state
            .refuse
            .lock()
            .unwrap()
            .insert(external_id.into(), status);
    }

    pub fn accept_everything(&self) {
        self.state.refuse.lock().unwrap().clear();
    }

    pub fn orders(&self) -> HashMap<String, Value> {
        self.state.orders.lock().unwrap().clone()
    }

    /// Stored PUTs per external id.
    pub fn stored_puts(&self) -> HashMap<String, u32> {
        self.state.stored.lock().unwrap().clone()
    }

    /// Stored PUTs per `Idempotency-Key`: a key stored twice is one version of a record delivered twice.
    pub fn stored_keys(&self) -> HashMap<String, u32> {
        self.state
            .stored_keys
            .lock()
            .unwrap()
            .iter()
            .map(|(k, t)| (k.clone(), t.len() as u32))
            .collect()
    }

    /// When each stored PUT per `Idempotency-Key` arrived.
    pub fn stored_key_times(&self) -> HashMap<String, Vec<Instant>> {
        self.state.stored_keys.lock().unwrap().clone()
    }

    /// How often each status was answered to a PUT.
    pub fn answers(&self) -> BTreeMap<u16, usize> {
        self.state.answers.lock().unwrap().clone()
    }

    /// Requests that broke the wire contract (no token, no idempotency key); must stay empty.
    pub fn violations(&self) -> Vec<String> {
        self.state.violations.lock().unwrap().clone()
    }

    /// For every 429 sent, the wait until the same record's next PUT (`None` if none came).
    pub fn waits_after_throttling(&self) -> Vec<(String, Option<Duration>)> {
        let throttled = self.state.throttled.lock().unwrap();
        let arrivals = self.state.arrivals.lock().unwrap();
        let mut out = Vec::new();
        for (id, times) in throttled.iter() {
            for t in times {
                let next = arrivals
                    .get(id)
                    .and_then(|a| a.iter().find(|a| *a > t))
                    .map(|a| a.duration_since(*t));
                out.push((id.clone(), next));
            }
        }
        out
    }
}

fn count(state: &ErpState, status: StatusCode) {
    *state
        .answers
        .lock()
        .unwrap()
        .entry(status.as_u16())
        .or_default() += 1;
}

async fn probe(State(state): State<Arc<ErpState>>) -> Response {
    match *state.mode.lock().unwrap() {
        ErpMode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response(),
        // The health endpoint is not throttled and answers at once, like most ERPs' metadata endpoints.
        _ => (StatusCode::OK, "{}").into_response(),
    }
}

async fn upsert(
    State(state): State<Arc<ErpState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&state.in_flight);
    let arrived = Instant::now();
    state
        .arrivals
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_default()
        .push(arrived);

    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let token = state.token.lock().unwrap().clone();
    if header("authorization") != format!("Bearer {token}") {
        state
            .violations
            .lock()
            .unwrap()
            .push(format!("{id}: wrong or missing bearer token"));
        count(&state, StatusCode::UNAUTHORIZED);
        return (StatusCode::UNAUTHORIZED, "INVALID_LOGIN").into_response();
    }
    if !header("idempotency-key").starts_with(&format!("{id}.")) {
        state.violations.lock().unwrap().push(format!(
            "{id}: Idempotency-Key {:?}",
            header("idempotency-key")
        ));
        count(&state, StatusCode::UNPROCESSABLE_ENTITY);
        return (StatusCode::UNPROCESSABLE_ENTITY, "Idempotency-Key required").into_response();
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            state
                .violations
                .lock()
                .unwrap()
                .push(format!("{id}: body is not JSON: {e}"));
            count(&state, StatusCode::BAD_REQUEST);
            return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
        }
    };
    let mode = *state.mode.lock().unwrap();
    match mode {
        ErpMode::Unavailable => {
            count(&state, StatusCode::SERVICE_UNAVAILABLE);
            return (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response();
        }
        ErpMode::Throttling { retry_after_secs } => {
            state
                .throttled
                .lock()
                .unwrap()
                .entry(id)
                .or_default()
                .push(arrived);
            count(&state, StatusCode::TOO_MANY_REQUESTS);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry_after_secs.to_string())],
                r#"{"error":"concurrency limit exceeded"}"#,
            )
                .into_response();
        }
        ErpMode::Slow(wait) => {
            state.slowed.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(wait).await;
            // Only reached when the client waited that long; a timed-out client's request is dropped here.
        }
        ErpMode::Ok => {}
    }
    let latency = *state.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let refused = state.refuse.lock().unwrap().get(&id).copied();
    if let Some(status) = refused {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        count(&state, status);
        return (
            status,
            r#"{"o:errorDetails":[{"detail":"Invalid item reference","o:errorCode":"INVALID_KEY_OR_REF"}]}"#,
        )
            .into_response();
    }
    let created = state
        .orders
        .lock()
        .unwrap()
        .insert(id.clone(), payload)
        .is_none();
    *state.stored.lock().unwrap().entry(id).or_default() += 1;
    state
        .stored_keys
        .lock()
        .unwrap()
        .entry(header("idempotency-key").to_string())
        .or_default()
        .push(arrived);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    };
    count(&state, status);
    status.into_response()
}

// ---- records ---------------------------------------------------------------------------------------------

fn data(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/contract")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A valid closed-won Opportunity numbered `n`, in its `version`-th revision (the name carries it).
pub fn opportunity(n: usize, version: u32) -> Value {
    let mut v: Value = serde_json::from_str(&data("good_record.json")).expect("good_record.json");
    v["id"] = json!(opportunity_id(n));
    v["name"] = json!(order_memo(n, version));
    v
}

/// A later revision a CRM sends: `version` of every record whose number ends in `ending` modulo `modulus`,
/// sent `lag` batches after the record first appeared.
#[derive(Debug, Clone, Copy)]
pub struct Revision {
    pub lag: usize,
    pub modulus: usize,
    pub ending: usize,
    pub version: u32,
}

/// A CRM's traffic: batches of `per_batch` new records (`records` in all), and in later batches the given
/// revisions of earlier ones, so "latest payload" is tested. Returns the batches, the latest version of every
/// record, and the number of record versions sent.
pub fn traffic(
    records: usize,
    per_batch: usize,
    revisions: &[Revision],
) -> (Vec<Vec<Value>>, BTreeMap<usize, u32>, usize) {
    let mut latest: BTreeMap<usize, u32> = BTreeMap::new();
    let mut batches = Vec::new();
    let mut versions = 0;
    for b in 0..records / per_batch {
        let mut batch = Vec::new();
        for n in b * per_batch..(b + 1) * per_batch {
            batch.push(opportunity(n, 1));
            latest.insert(n, 1);
        }
        for r in revisions.iter().filter(|r| b >= r.lag) {
            let earlier = (b - r.lag) * per_batch..(b - r.lag + 1) * per_batch;
            for n in earlier.filter(|n| n % r.modulus == r.ending) {
                batch.push(opportunity(n, r.version));
                latest.insert(n, r.version);
            }
        }
        versions += batch.len();
        batches.push(batch);
    }
    (batches, latest, versions)
}

pub fn opportunity_id(n: usize) -> String {
    format!("0065g{n:013}")
}

/// The ERP external id the contract maps record `n` to.
pub fn external_id(n: usize) -> String {
    format!("SF-{}", opportunity_id(n))
}

/// The memo (the contract maps `name` to it) of revision `version` of record `n`.
pub fn order_memo(n: usize, version: u32) -> String {
    format!("Order {n} revision {version}")
}

/// A record whose line price drifts 16 % from the pricebook (the contract's `price-tolerance` rejects it).
pub fn drifted_opportunity(n: usize) -> Value {
    let mut v: Value =
        serde_json::from_str(&data("price_drift_record.json")).expect("price_drift_record.json");
    v["id"] = json!(opportunity_id(n));
    v["name"] = json!(order_memo(n, 1));
    v
}

/// The pricebook the example contract's records are priced against, keyed by SKU.
pub fn pricebook() -> Value {
    let lookups: Value = serde_json::from_str(&data("lookups.json")).expect("lookups.json");
    lookups["pricebook"].clone()
}

// ---- a rendered flow on disk -----------------------------------------------------------------------------

pub const WEBHOOK_SECRET: &str = "whsec-reliability";
pub const ERP_TOKEN: &str = "erp-token-reliability";
pub const API_TOKEN: &str = "ops-token-reliability";

/// Where the flow's ledger lives.
#[derive(Clone, Debug)]
pub enum LedgerChoice {
    Embedded,
    Postgres(String),
}

/// Where the flow delivers.
#[derive(Clone, Copy, Debug)]
pub enum SinkChoice<'a> {
    /// The generic `http` sink at the ERP double's base URL.
    Http(&'a str),
    /// The `postgres` sink: upserts into `table` of the database at `url` (its Secret key `url`).
    Postgres { url: &'a str, table: &'a str },
}

/// The example contract's flow, rewritten for a test: a signed generic webhook source, the `http` sink at
/// the ERP double (or another sink, see [`FlowFiles::with_sink`]), the pricebook from a mounted ConfigMap, and
/// the chosen ledger.
pub struct FlowFiles {
    pub dir: tempfile::TempDir,
    pub rendered: RenderedFlow,
}

impl FlowFiles {
    pub fn new(erp_base_url: &str, ledger: LedgerChoice, concurrency: u32) -> FlowFiles {
        FlowFiles::with_sink(SinkChoice::Http(erp_base_url), ledger, concurrency)
    }

    pub fn with_sink(sink: SinkChoice<'_>, ledger: LedgerChoice, concurrency: u32) -> FlowFiles {
        let mut rendered = RenderedFlow::from_manifests(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/salesforce-netsuite"),
        )
        .expect("the example flow loads");
        let spec = &mut rendered.flow.spec;
        spec.source.system = SourceSystem::Generic;
        spec.source.mode = SourceMode::Webhook;
        spec.source.signature = Some(WebhookSignature::HmacSha256);
        spec.source.field_map.clear();
        spec.source.filter = None;
        spec.source.base_url = None;
        spec.source.poll_interval = None;
        spec.sink.record_type = None;
        match sink {
            SinkChoice::Http(base_url) => {
                spec.sink.system = SinkSystem::Http;
                spec.sink.base_url = Some(base_url.to_string());
            }
            SinkChoice::Postgres { table, .. } => {
                spec.sink.system = SinkSystem::Postgres;
                spec.sink.base_url = None;
                spec.sink.table = Some(table.to_string());
            }
        }
        for lookup in &mut spec.lookups {
            lookup.from = LookupSource::ConfigMap;
            lookup.resource = None;
            lookup.refresh_interval = Some("1s".parse().expect("duration"));
        }
        // The example roster's ticket sinks are SaaS endpoints these tests cannot reach (and have no Secrets
        // for): a test about tickets sets its own sinks.
        if let Some(roster) = rendered.roster.as_mut() {
            roster.spec.ticket_sinks.clear();
            roster
                .spec
                .routes
                .iter_mut()
                .for_each(|r| r.ticket_sink = None);
        }
        let spec = &mut rendered.flow.spec;
        spec.delivery.concurrency = concurrency;
        spec.delivery.rate_limit = 0;
        spec.delivery.max_attempts = 50;
        spec.delivery.backoff = Some(Backoff {
            base: Some("20ms".parse().expect("duration")),
            max: Some("500ms".parse().expect("duration")),
        });
        spec.ledger = match &ledger {
            LedgerChoice::Embedded => LedgerSpec::default(),
            LedgerChoice::Postgres(_) => LedgerSpec {
                r#type: LedgerType::Postgres,
                credentials_secret_ref: Some(SecretRef {
                    name: "ledger-pg".into(),
                }),
                ..LedgerSpec::default()
            },
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let files = FlowFiles { dir, rendered };
        let spec = &files.rendered.flow.spec;
        files.secret(
            &spec.source.credentials_secret_ref.name,
            "webhookSecret",
            WEBHOOK_SECRET,
        );
        match sink {
            SinkChoice::Http(_) => {
                files.secret(&spec.sink.credentials_secret_ref.name, "token", ERP_TOKEN)
            }
            SinkChoice::Postgres { url, .. } => {
                files.secret(&spec.sink.credentials_secret_ref.name, "url", url)
            }
        }
        if let LedgerChoice::Postgres(url) = &ledger {
            files.secret("ledger-pg", "url", url);
        }
        std::fs::write(files.token_file(), format!("{API_TOKEN}\n")).expect("token file");
        files.set_pricebook(&pricebook());
        std::fs::write(
            files.flow_file(),
            serde_yaml::to_string(&files.rendered).expect("rendered flow serialises"),
        )
        .expect("flow file");
        files
    }

    fn secret(&self, secret: &str, key: &str, value: &str) {
        let dir = self.secrets_dir().join(secret);
        std::fs::create_dir_all(&dir).expect("secret dir");
        std::fs::write(dir.join(key), format!("{value}\n")).expect("secret file");
    }

    /// Replaces the mounted pricebook (as a ConfigMap update would).
    pub fn set_pricebook(&self, pricebook: &Value) {
        std::fs::create_dir_all(self.lookups_dir()).expect("lookups dir");
        std::fs::write(
            self.lookups_dir().join("pricebook.json"),
            pricebook.to_string(),
        )
        .expect("pricebook");
    }

    pub fn flow_file(&self) -> PathBuf {
        self.dir.path().join("flow.yaml")
    }
    pub fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }
    pub fn lookups_dir(&self) -> PathBuf {
        self.dir.path().join("lookups")
    }
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("api-token")
    }
    /// The state directory of worker `name` (each replica its own, as each pod has its own volume).
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("state").join(name)
    }
}

// ---- the worker process ----------------------------------------------------------------------------------

/// The `meshline` binary the worker processes run: cargo's build of this target, or `MESHLINE_WORKER_BIN`
/// (a benchmark built in one profile can then drive a binary built in another).
pub fn worker_binary() -> PathBuf {
    std::env::var_os("MESHLINE_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshline")))
}

/// A free 127.0.0.1 port, reused across a worker's restarts like a pod's fixed port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One `meshline worker` process of a flow, restartable on the same port and state.
pub struct WorkerProcess {
    pub name: String,
    /// The webhook port.
    pub port: u16,
    /// The operations port.
    pub ops_port: u16,
    flow: PathBuf,
    state_dir: PathBuf,
    secrets_dir: PathBuf,
    lookups_dir: PathBuf,
    token_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub starts: u32,
    /// Further `meshline worker` options (a track, a rollout file, a lease).
    extra_args: Vec<String>,
}

impl WorkerProcess {
    pub fn new(files: &FlowFiles, name: &str) -> WorkerProcess {
        WorkerProcess {
            name: name.to_string(),
            port: free_port(),
            ops_port: free_port(),
            flow: files.flow_file(),
            state_dir: files.state_dir(name),
            secrets_dir: files.secrets_dir(),
            lookups_dir: files.lookups_dir(),
            token_file: files.token_file(),
            log: files.dir.path().join(format!("{name}.log")),
            child: None,
            starts: 0,
            extra_args: Vec::new(),
        }
    }

    /// Runs `flow` (another rendered flow file) from the next start on, as a pod restarted on a new
    /// ConfigMap would.
    pub fn use_flow(&mut self, flow: &Path) {
        self.flow = flow.to_path_buf();
    }

    /// Keeps the embedded ledger in `dir` (two processes sharing one ledger file).
    pub fn use_state_dir(&mut self, dir: &Path) {
        self.state_dir = dir.to_path_buf();
    }

    /// Passes `args` to `meshline worker` from the next start on, replacing earlier extra options.
    pub fn use_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// The webhook port's base URL (where the CRM sends).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The operations port's base URL (status, dead letters, metrics; the reads need [`API_TOKEN`]).
    pub fn ops_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ops_port)
    }

    /// Starts the process and waits until `/readyz` answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("worker log");
        let child = Command::new(worker_binary())
            .arg("worker")
            .arg("--flow")
            .arg(&self.flow)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--ops-listen")
            .arg(format!("127.0.0.1:{}", self.ops_port))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--secrets-dir")
            .arg(&self.secrets_dir)
            .arg("--lookups-dir")
            .arg(&self.lookups_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--worker-id")
            .arg(&self.name)
            .arg("--shutdown-grace")
            .arg("5")
            .args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn meshline worker");
        self.child = Some(child);
        self.starts += 1;
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited during start-up ({status}); log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.url())).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within 30 s; log:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id while it runs (a benchmark reads its CPU time from `/proc/<pid>/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown code runs, exactly like an OOM kill or a node loss.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the graceful shutdown to finish.
    pub async fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            // A give-up only, so a worker that ignores the signal cannot hang the test.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "{} exited with {status} on SIGTERM; log:\n{}",
                        self.name,
                        self.log_tail()
                    );
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} ignored SIGTERM for 120 s",
                    self.name
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `/status`, or `None` while the worker does not answer.
    pub async fn status(&self) -> Option<Value> {
        let r = client()
            .get(format!("{}/status", self.ops_url()))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Polls `/status` until `done` holds, failing after `timeout` with the last status and the log.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Some(status) = self.status().await {
                if done(&status) {
                    return status;
                }
                last = status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out after {timeout:?} waiting for {what}; last /status: {last}\nlog:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A Prometheus counter of this process (`meshline_<name>_total`), 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let Ok(r) = client()
            .get(format!("{}/metrics", self.ops_url()))
            .send()
            .await
        else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(&format!("meshline_{name}_total")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

pub fn counter(status: &Value, name: &str) -> i64 {
    status["counters"][name].as_i64().unwrap_or(-1)
}

// ---- evidence on failure ----------------------------------------------------------------------------------

/// What the ledger says about a run, fetched from a worker's operations API: the counters and every dead
/// letter's id, key, reason and last error (all pages). A failing reliability test prints it, so the failure
/// names its cause (a reason such as `contract:deadline_exceeded:record` says more than "2 missing"). `url` is
/// the operations port's.
pub async fn ledger_evidence(url: &str) -> String {
    let http = client();
    let mut out = String::new();
    match http
        .get(format!("{url}/status"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
    {
        Ok(r) => match r.json::<Value>().await {
            Ok(status) => out.push_str(&format!(
                "counters {}, pending {}, circuit breaker {}",
                status["counters"], status["pending"], status["circuitBreaker"]
            )),
            Err(e) => out.push_str(&format!("/status is not JSON: {e}")),
        },
        Err(e) => return format!("{url} does not answer, no ledger evidence: {e}"),
    }
    let mut after: Option<i64> = None;
    let mut listed = 0;
    loop {
        let mut path = format!("{url}/dead-letters?limit=1000");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        let page = match http.get(&path).bearer_auth(API_TOKEN).send().await {
            Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
            Err(e) => {
                out.push_str(&format!("\n  dead letters unavailable: {e}"));
                break;
            }
        };
        let items = page["items"].as_array().cloned().unwrap_or_default();
        for item in &items {
            listed += 1;
            // A dead letter's last error is its reason; the message (the contract's or the ERP's answer)
            // is kept beside it.
            let detail: String = item["erp_response"]
                .as_str()
                .unwrap_or("-")
                .chars()
                .take(300)
                .collect();
            out.push_str(&format!(
                "\n  dead letter {} ({}), {} attempts: reason {}; last error {}; detail {detail}",
                item["id"],
                item["source_key"].as_str().unwrap_or("?"),
                item["attempts"],
                item["dead_letter_reason"].as_str().unwrap_or("-"),
                item["last_error"].as_str().unwrap_or("-"),
            ));
        }
        match page["next"].as_i64() {
            Some(next) if items.len() == 1000 && after.is_none_or(|a| next > a) => {
                after = Some(next)
            }
            _ => break,
        }
    }
    if listed == 0 {
        out.push_str("\n  no dead letters");
    }
    out
}

/// Prints [`ledger_evidence`] for each worker URL if the test fails while it is alive. Create it after the
/// workers (locals drop in reverse order), so the workers still answer when it looks.
pub struct EvidenceOnFailure {
    urls: Vec<String>,
}

impl EvidenceOnFailure {
    pub fn new(urls: Vec<String>) -> EvidenceOnFailure {
        EvidenceOnFailure { urls }
    }
}

impl Drop for EvidenceOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let urls = std::mem::take(&mut self.urls);
        // Dropped while a test unwinds, possibly on a runtime thread: fetch on a thread of its own.
        let report = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the evidence");
            runtime.block_on(async move {
                let mut report = String::new();
                for url in &urls {
                    report.push_str(&format!("\n{url}: {}", ledger_evidence(url).await));
                }
                report
            })
        })
        .join()
        .unwrap_or_else(|_| "\n(the evidence could not be collected)".into());
        eprintln!("---- ledger evidence at the failure ----{report}");
    }
}

// ---- the CRM ----------------------------------------------------------------------------------------------

/// What the CRM went through to get its batches acknowledged.
#[derive(Debug, Default, Clone)]
pub struct CrmStats {
    pub batches: usize,
    pub attempts: usize,
    /// Attempts that got no answer (connection refused or reset while the worker was down).
    pub unanswered: usize,
    /// Attempts answered with a non-2xx status (e.g. 503 while the ledger was unavailable).
    pub refused: usize,
}

/// Sends one batch as a signed webhook and retries it, as a CRM does, until a 2xx; re-signs every attempt so
/// the timestamp stays fresh. A 400 or 401 is a bug in the test or the worker and fails at once.
pub async fn deliver_batch(
    http: &reqwest::Client,
    urls: &[String],
    batch: &[Value],
    stats: &mut CrmStats,
    timeout: Duration,
) {
    let body = serde_json::to_vec(batch).expect("batch serialises");
    let deadline = Instant::now() + timeout;
    let mut turn = stats.batches;
    stats.batches += 1;
    loop {
        let url = &urls[turn % urls.len()];
        turn += 1;
        stats.attempts += 1;
        let t = chrono::Utc::now().timestamp();
        let signature =
            meshline::connectors::sources::webhook::meshline_signature(WEBHOOK_SECRET, t, &body);
        let sent = http
            .post(format!("{url}/webhook"))
            .header("content-type", "application/json")
            .header("x-meshline-signature", signature)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r)
                if r.status() == StatusCode::BAD_REQUEST
                    || r.status() == StatusCode::UNAUTHORIZED =>
            {
                let status = r.status();
                panic!(
                    "webhook refused the batch with {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Ok(_) => stats.refused += 1,
            Err(_) => stats.unanswered += 1,
        }
        assert!(
            Instant::now() < deadline,
            "the CRM could not get a batch acknowledged within {timeout:?} ({stats:?})"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
