//! The Salesforce poller: SOQL over `SystemModstamp` through the REST query resource, with a durable
//! checkpoint that advances only after the records of a page are stored.
//!
//! **Query.** The SELECT list comes from the flow's `fieldMap` (plus `Id` and `SystemModstamp`); a mapped child
//! relationship (`lineItems: OpportunityLineItems` with `lineItems[].sku: ProductCode`) becomes a subquery:
//! `SELECT Id, SystemModstamp, Account.Name, …, (SELECT ProductCode, … FROM OpportunityLineItems) FROM
//! Opportunity WHERE (<filter>) AND (SystemModstamp > T OR (SystemModstamp = T AND Id > 'I')) ORDER BY
//! SystemModstamp, Id LIMIT 2000`, sent as `GET {baseUrl}/services/data/v61.0/query?q=…`. Pages are followed
//! through `nextRecordsUrl` (as are a child relationship's own `nextRecordsUrl`s); subquery results
//! (`{totalSize, done, records}`) are flattened to arrays, an empty one (`null`) to `[]`, and `attributes` is
//! dropped everywhere before the field map renames the record.
//!
//! **Checkpoint.** It is the pair `(SystemModstamp, Id)` of the last record stored, written as
//! `2024-05-01T10:00:00.000Z|006…`. Many records share a `SystemModstamp` (a mass update stamps thousands with
//! the same millisecond), so a bare `SystemModstamp > T` would lose those after a page boundary and `>=` would
//! re-read them forever once more than a page shares one; ordering by `(SystemModstamp, Id)` and resuming
//! strictly after the pair reads each record exactly once per change. SOQL allows `>` on `Id`, and the ORDER
//! BY makes the last record of each page its greatest pair. Every page goes to
//! [`Intake::accept_with_checkpoint`], which stores the records and the checkpoint in one transaction, so a
//! crash or an intake failure re-reads the page on the next poll (the intake recognises duplicates by key and
//! payload hash). Not handled: a transaction that commits after a later one with an earlier `SystemModstamp`
//! can slip behind the checkpoint; a periodic full re-sync (clear the checkpoint) covers that rare case.
//!
//! **OAuth 2.0**, chosen by the Secret's keys:
//! - client credentials: `clientId`, `clientSecret` → `POST {baseUrl}/services/oauth2/token` with
//!   `grant_type=client_credentials` (the token endpoint must be the org's My Domain);
//! - JWT bearer: `clientId`, `username`, `privateKey` (PEM, RSA) and optionally `loginUrl` (default
//!   `https://login.salesforce.com`; `https://test.salesforce.com` for sandboxes) → `POST
//!   {loginUrl}/services/oauth2/token` with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` and an RS256
//!   assertion `{iss: clientId, sub: username, aud: loginUrl, exp: now + 170 s}` (Salesforce wants `exp` within
//!   3 minutes). `privateKey` wins when both sets are present.
//!
//! API calls go to the token response's `instance_url`, not to `baseUrl`: the JWT bearer flow is sent to
//! `login.salesforce.com`, and only the answer says which host serves the org (an `instance_url` that is not
//! `https` is refused unless the token endpoint itself was plain HTTP, as a local test org is).
//!
//! **The org's daily API allowance.** Every API answer carries `Sforce-Limit-Info: api-usage=18/15000` (calls
//! in the last 24 hours / the org's allowance), which every integration of the org shares. From
//! 80 % of it on ([`SLOW_DOWN_AT`]), the poller stretches its interval, doubling for every further 5 % (85 % → 2×,
//! 90 % → 4×, 95 % → 8×, at most [`SLOWEST_POLL`]) and stops following a full page at once, so Meshline does
//! not spend what the org's other integrations still need; [`PollPace`] carries the reading and the interval
//! to the worker's `/status`, which reports the slowed poll as a problem.
//!
//! The token is cached and fetched again once when the API answers 401 `INVALID_SESSION_ID`. 429, 5xx and 403
//! `REQUEST_LIMIT_EXCEEDED` back off (honouring `Retry-After`) and retry the same request: a page is never
//! skipped; after the last attempt the poll fails and the next one starts again from the checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use tokio::sync::{Mutex, watch};

use super::{SourceError, apply_field_map, child_maps};
use crate::api::SourceSpec;
use crate::connectors::{Credentials, Intake, SourceRecord, parse_retry_after, truncate};

const SYSTEM: &str = "salesforce";
/// The share of the org's daily API allowance from which the poller slows down, in basis points (80 %).
pub const SLOW_DOWN_AT: u64 = 8000;
/// The longest a slowed poller waits between polls.
pub const SLOWEST_POLL: Duration = Duration::from_secs(3600);

/// The org's API usage, from `Sforce-Limit-Info: api-usage=<used>/<limit>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiUsage {
    pub used: u64,
    pub limit: u64,
}

impl ApiUsage {
    /// Reads the `api-usage` entry of a `Sforce-Limit-Info` header (which may list others, such as
    /// `per-app-api-usage=17/250(appName=sample-app)`).
    pub fn from_limit_info(header: &str) -> Option<ApiUsage> {
        header.split(',').find_map(|entry| {
            let (name, value) = entry.trim().split_once('=')?;
            if name.trim() != "api-usage" {
                return None;
            }
            let (used, limit) = value.trim().split_once('/')?;
            let limit: u64 = limit.trim().parse().ok()?;
            (limit > 0).then_some(ApiUsage {
                used: used.trim().parse().ok()?,
                limit,
            })
        })
    }

    /// The share used, in basis points (integers, so 13,500 of 15,000 is exactly 90 %).
    pub fn basis_points(&self) -> u64 {
        self.used.saturating_mul(10_000) / self.limit.max(1)
    }
}

/// The interval between polls for the configured one and the org's usage: unchanged below [`SLOW_DOWN_AT`],
/// then doubled for every 5 % more, never above [`SLOWEST_POLL`] (nor below the configured interval).
pub fn paced_interval(configured: Duration, usage: Option<ApiUsage>) -> Duration {
    let Some(usage) = usage.filter(|u| u.basis_points() >= SLOW_DOWN_AT) else {
        return configured;
    };
    let doublings = ((usage.basis_points() - SLOW_DOWN_AT) / 500).min(16) as u32;
    configured
        .saturating_mul(1u32 << doublings)
        .min(SLOWEST_POLL)
        .max(configured)
}

/// What the poller last learned of the org's API allowance, shared with the worker's `/status`.
#[derive(Debug, Default)]
pub struct PollPace {
    current: std::sync::Mutex<Option<SourceApiStatus>>,
}

/// The source API's allowance as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceApiStatus {
    /// API calls the org made in the last 24 hours (all its integrations, not only Meshline).
    pub used: u64,
    /// The org's 24-hour allowance.
    pub limit: u64,
    /// The interval the poller uses now, in seconds.
    pub poll_interval_seconds: u64,
    /// The configured interval, in seconds.
    pub configured_interval_seconds: u64,
    /// Whether the poll is slowed to spare the allowance.
    pub slowed: bool,
}

impl SourceApiStatus {
    /// One sentence for a problem or a condition.
    pub fn describe(&self) -> String {
        let percent = self.used.saturating_mul(100) / self.limit.max(1);
        if self.slowed {
            format!(
                "Salesforce API usage is {}/{} ({percent} %) of the org's 24-hour allowance; polling every {}s \
                 instead of {}s until it falls below {} %",
                self.used,
                self.limit,
                self.poll_interval_seconds,
                self.configured_interval_seconds,
                SLOW_DOWN_AT / 100
            )
        } else {
            format!(
                "Salesforce API usage is {}/{} ({percent} %) of the org's 24-hour allowance",
                self.used, self.limit
            )
        }
    }
}

impl PollPace {
    pub fn get(&self) -> Option<SourceApiStatus> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, status: SourceApiStatus) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }
}

/// What a poller needs besides credentials.
#[derive(Debug, Clone)]
pub struct SalesforceConfig {
    /// The org's My Domain URL, e.g. `https://acme.my.salesforce.com`: the client-credentials token endpoint's
    /// host. API calls go to the token answer's `instance_url`; this is their host only if an answer lacks it.
    pub base_url: String,
    /// REST API version, `v61.0`.
    pub api_version: String,
    /// The sObject, e.g. `Opportunity`.
    pub object: String,
    /// A SOQL WHERE clause, ANDed with the checkpoint condition.
    pub filter: Option<String>,
    pub field_map: BTreeMap<String, String>,
    /// Records per query (SOQL `LIMIT`); the API itself pages within it.
    pub limit: usize,
    pub poll_interval: Duration,
    /// The checkpoint's name in the ledger.
    pub source_name: String,
    /// Attempts per request on 429 / 5xx / `REQUEST_LIMIT_EXCEEDED` / connection errors.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl SalesforceConfig {
    /// From a flow's `source` (`baseUrl` is required in poll mode).
    pub fn from_spec(flow: &str, spec: &SourceSpec) -> Result<SalesforceConfig, SourceError> {
        let base_url = spec.base_url.clone().ok_or_else(|| SourceError::Config {
            system: SYSTEM,
            reason: format!(
                "flow {flow}: a Salesforce poll source needs baseUrl (the org's My Domain URL)"
            ),
        })?;
        let poll_interval = spec
            .poll_interval
            .map(Duration::from)
            .unwrap_or(Duration::from_secs(30));
        Ok(SalesforceConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_version: "v61.0".into(),
            object: spec.object.clone(),
            filter: spec.filter.clone(),
            field_map: spec.field_map.clone(),
            limit: 2000,
            poll_interval,
            source_name: format!("salesforce:{}", spec.object),
            max_attempts: 6,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        })
    }
}

/// How the poller obtains an access token.
#[derive(Clone)]
pub enum SalesforceAuth {
    ClientCredentials {
        client_id: String,
        client_secret: String,
    },
    JwtBearer {
        client_id: String,
        username: String,
        key: EncodingKey,
        login_url: String,
    },
}

impl std::fmt::Debug for SalesforceAuth {
    // Never print secrets or keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SalesforceAuth::ClientCredentials { client_id, .. } => {
                write!(f, "ClientCredentials({client_id})")
            }
            SalesforceAuth::JwtBearer {
                client_id,
                username,
                login_url,
                ..
            } => {
                write!(f, "JwtBearer({client_id}, {username}, {login_url})")
            }
        }
    }
}

impl SalesforceAuth {
    /// Picks the flow by the Secret's keys: `privateKey` (+ `clientId`, `username`, optional `loginUrl`) means
    /// JWT bearer, otherwise `clientId` + `clientSecret` means client credentials.
    pub fn from_credentials(credentials: &Credentials) -> Result<SalesforceAuth, SourceError> {
        let client_id = credentials.get("clientId")?;
        if let Some(pem) = credentials.optional("privateKey")? {
            let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                SourceError::Credentials(crate::connectors::CredentialsError::Malformed {
                    key: "privateKey".into(),
                    reason: format!("not an RSA private key in PEM form: {e}"),
                })
            })?;
            return Ok(SalesforceAuth::JwtBearer {
                client_id,
                username: credentials.get("username")?,
                key,
                login_url: credentials
                    .optional("loginUrl")?
                    .unwrap_or_else(|| "https://login.salesforce.com".into())
                    .trim_end_matches('/')
                    .to_string(),
            });
        }
        Ok(SalesforceAuth::ClientCredentials {
            client_id,
            client_secret: credentials.get("clientSecret")?,
        })
    }
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    pub records: usize,
    pub pages: usize,
    /// The checkpoint stored last, if any page was stored.
    pub checkpoint: Option<String>,
    /// The query hit its LIMIT: poll again at once.
    pub more: bool,
}

/// `(SystemModstamp, Id)` of the last stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// A SOQL datetime literal, `YYYY-MM-DDThh:mm:ss.sssZ`.
    pub modstamp: String,
    pub id: String,
}

impl Checkpoint {
    pub fn parse(s: &str) -> Result<Checkpoint, SourceError> {
        let bad = |why: &str| SourceError::Protocol {
            system: SYSTEM,
            what: "the stored checkpoint".into(),
            reason: format!("{s:?}: {why}"),
        };
        let (stamp, id) = s
            .split_once('|')
            .ok_or_else(|| bad("expected <SystemModstamp>|<Id>"))?;
        let modstamp =
            soql_datetime(stamp).ok_or_else(|| bad("the timestamp is not a datetime"))?;
        // Ids go into the SOQL text: only the characters a Salesforce Id has.
        if id.is_empty() || id.len() > 18 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(bad("the Id is not a Salesforce Id"));
        }
        Ok(Checkpoint {
            modstamp,
            id: id.to_string(),
        })
    }

    pub fn encode(&self) -> String {
        format!("{}|{}", self.modstamp, self.id)
    }
}

/// Salesforce answers `2024-05-01T10:00:00.000+0000`; SOQL wants `2024-05-01T10:00:00.000Z` (unquoted).
pub fn soql_datetime(value: &str) -> Option<String> {
    let parsed = chrono::DateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f%z")
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(value))
        .ok()?;
    Some(
        parsed
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string(),
    )
}

/// Builds the poll's SOQL from the field map, the filter and the checkpoint.
pub fn build_soql(config: &SalesforceConfig, after: Option<&Checkpoint>) -> String {
    let children = child_maps(&config.field_map);
    let mut fields: Vec<String> = vec!["Id".into(), "SystemModstamp".into()];
    let push = |fields: &mut Vec<String>, f: &str| {
        if !fields.iter().any(|x| x.eq_ignore_ascii_case(f)) {
            fields.push(f.to_string());
        }
    };
    for (target, source) in &config.field_map {
        if target.contains("[]") || children.contains_key(target) {
            continue;
        }
        push(&mut fields, source);
    }
    for (relationship, inner) in children.values() {
        let mut child_fields: Vec<String> = Vec::new();
        for source in inner.values() {
            push(&mut child_fields, source);
        }
        if child_fields.is_empty() {
            child_fields.push("Id".into());
        }
        fields.push(format!(
            "(SELECT {} FROM {relationship})",
            child_fields.join(", ")
        ));
    }
    let mut conditions = Vec::new();
    if let Some(filter) = config.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        conditions.push(format!("({filter})"));
    }
    if let Some(cp) = after {
        conditions.push(format!(
            "(SystemModstamp > {t} OR (SystemModstamp = {t} AND Id > '{id}'))",
            t = cp.modstamp,
            id = cp.id
        ));
    }
    let mut soql = format!("SELECT {} FROM {}", fields.join(", "), config.object);
    if !conditions.is_empty() {
        soql.push_str(" WHERE ");
        soql.push_str(&conditions.join(" AND "));
    }
    soql.push_str(&format!(
        " ORDER BY SystemModstamp, Id LIMIT {}",
        config.limit
    ));
    soql
}

/// Polls one org object into an intake.
pub struct SalesforcePoller {
    config: SalesforceConfig,
    auth: std::sync::RwLock<SalesforceAuth>,
    /// The mounted Secret the auth came from and the digest of its files, so a rotated Secret is read again
    /// before the next token request (which follows a 401 too) without a restart.
    rotation: Option<(Credentials, std::sync::Mutex<Option<[u8; 32]>>)>,
    http: reqwest::Client,
    /// The access token and the `instance_url` it came with.
    token: Mutex<Option<(String, String)>>,
    /// The last `Sforce-Limit-Info` reading.
    usage: std::sync::Mutex<Option<ApiUsage>>,
    pace: Arc<PollPace>,
}

impl SalesforcePoller {
    pub fn new(config: SalesforceConfig, auth: SalesforceAuth) -> SalesforcePoller {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap_or_default();
        SalesforcePoller {
            config,
            auth: std::sync::RwLock::new(auth),
            rotation: None,
            http,
            token: Mutex::new(None),
            usage: std::sync::Mutex::new(None),
            pace: Arc::default(),
        }
    }

    /// Reports the API allowance and the pace to `pace` (the worker's `/status` reads it).
    pub fn reporting_to(mut self, pace: Arc<PollPace>) -> SalesforcePoller {
        self.pace = pace;
        self
    }

    /// The last `Sforce-Limit-Info` reading, if an answer carried one.
    pub fn api_usage(&self) -> Option<ApiUsage> {
        *self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to wait before the next poll, after one that ended with `outcome`: at once after a full page
    /// (more is waiting), the configured interval otherwise — unless the org's API allowance runs low, when
    /// the paced interval applies to both.
    pub fn next_wait(&self, outcome: &Result<PollReport, SourceError>) -> Duration {
        let configured = self.config.poll_interval;
        let usage = self.api_usage();
        let paced = paced_interval(configured, usage);
        if let Some(usage) = usage {
            self.pace.set(SourceApiStatus {
                used: usage.used,
                limit: usage.limit,
                poll_interval_seconds: paced.as_secs(),
                configured_interval_seconds: configured.as_secs(),
                slowed: paced > configured,
            });
        }
        match outcome {
            Ok(report) if report.more && paced == configured => Duration::ZERO,
            _ => paced,
        }
    }

    fn record_usage(&self, headers: &reqwest::header::HeaderMap) {
        let reading = headers
            .get("sforce-limit-info")
            .and_then(|v| v.to_str().ok())
            .and_then(ApiUsage::from_limit_info);
        if let Some(reading) = reading {
            *self.usage.lock().unwrap_or_else(|p| p.into_inner()) = Some(reading);
        }
    }

    /// Re-reads the auth from the Secret if its files changed since they were last read.
    fn reload_auth(&self) {
        let Some((credentials, seen)) = &self.rotation else {
            return;
        };
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let fingerprint = credentials.fingerprint();
        if fingerprint == *seen {
            return;
        }
        *seen = fingerprint;
        match SalesforceAuth::from_credentials(credentials) {
            Ok(auth) => {
                *self.auth.write().unwrap_or_else(|p| p.into_inner()) = auth;
                tracing::info!(source = %self.config.source_name, "the source's Secret changed; new credentials in use");
            }
            Err(e) => {
                tracing::error!(source = %self.config.source_name, error = %e, "the source's Secret changed but cannot be used; keeping the previous credentials");
            }
        }
    }

    /// From a flow's source and its mounted Secret.
    pub fn from_spec(
        flow: &str,
        spec: &SourceSpec,
        credentials: &Credentials,
    ) -> Result<SalesforcePoller, SourceError> {
        let fingerprint = credentials.fingerprint();
        let mut poller = SalesforcePoller::new(
            SalesforceConfig::from_spec(flow, spec)?,
            SalesforceAuth::from_credentials(credentials)?,
        );
        poller.rotation = Some((credentials.clone(), std::sync::Mutex::new(fingerprint)));
        Ok(poller)
    }

    /// [`SalesforcePoller::new`] that reads its auth again from `credentials` (a mounted Secret) whenever the
    /// Secret's files changed before a token request.
    pub fn rotating(
        config: SalesforceConfig,
        credentials: Credentials,
    ) -> Result<SalesforcePoller, SourceError> {
        let fingerprint = credentials.fingerprint();
        let mut poller =
            SalesforcePoller::new(config, SalesforceAuth::from_credentials(&credentials)?);
        poller.rotation = Some((credentials, std::sync::Mutex::new(fingerprint)));
        Ok(poller)
    }

    pub fn config(&self) -> &SalesforceConfig {
        &self.config
    }

    /// Polls until `shutdown` turns true (or its sender is dropped). A poll in progress finishes its current
    /// request and page first: stopping between pages loses nothing, the checkpoint is per page.
    pub async fn run(
        &self,
        intake: Arc<dyn Intake>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // While the intake refuses records (a nearly full ledger volume) a poll would only fetch pages
            // it cannot store; the checkpoint stays where it is and polling resumes when space is back.
            if let Some(pressure) = intake.backpressure() {
                tracing::info!(source = %self.config.source_name, reason = %pressure.reason, "intake paused; not polling");
                tokio::select! {
                    changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return Ok(()) },
                    _ = tokio::time::sleep(pressure.retry_after.min(self.config.poll_interval).max(Duration::from_millis(100))) => {}
                }
                continue;
            }
            let outcome = self.poll_once(intake.as_ref()).await;
            if matches!(outcome, Err(SourceError::Config { .. })) {
                return outcome.map(|_| ());
            }
            if let Err(e) = &outcome {
                tracing::warn!(source = %self.config.source_name, error = %e, label = e.label(), "poll failed; retrying from the checkpoint");
            }
            let wait = self.next_wait(&outcome);
            if wait > self.config.poll_interval {
                tracing::info!(source = %self.config.source_name, wait_seconds = wait.as_secs(), "the org's API allowance runs low; polling less often");
            }
            tokio::select! {
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return Ok(()) },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One poll: query from the stored checkpoint, store page by page with the page's checkpoint.
    pub async fn poll_once(&self, intake: &dyn Intake) -> Result<PollReport, SourceError> {
        let start = match intake.checkpoint(&self.config.source_name).await? {
            Some(s) => Some(Checkpoint::parse(&s)?),
            None => None,
        };
        let soql = build_soql(&self.config, start.as_ref());
        let query_url = format!(
            "{}/services/data/{}/query",
            self.instance_url().await?,
            self.config.api_version
        );
        let mut page = self.get_json(&query_url, Some(&soql)).await?;
        let mut report = PollReport::default();
        loop {
            let raw = page
                .get("records")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !raw.is_empty() {
                let mut records = Vec::with_capacity(raw.len());
                let mut last = None;
                for record in raw {
                    let (record, checkpoint) = self.prepare(record).await?;
                    last = Some(checkpoint);
                    records.push(record);
                }
                let checkpoint = last.expect("page is not empty").encode();
                let n = records.len();
                intake
                    .accept_with_checkpoint(records, &self.config.source_name, &checkpoint)
                    .await?;
                report.records += n;
                report.pages += 1;
                report.checkpoint = Some(checkpoint);
            }
            let done = page.get("done").and_then(Value::as_bool).unwrap_or(true);
            let next = page
                .get("nextRecordsUrl")
                .and_then(Value::as_str)
                .map(str::to_string);
            match next {
                Some(next) if !done => {
                    page = self.get_json(&self.absolute(&next).await?, None).await?
                }
                _ => break,
            }
        }
        report.more = report.records >= self.config.limit;
        Ok(report)
    }

    /// A `nextRecordsUrl` (a path on the instance) as a URL.
    async fn absolute(&self, path: &str) -> Result<String, SourceError> {
        if path.starts_with("http://") || path.starts_with("https://") {
            Ok(path.to_string())
        } else {
            Ok(format!("{}{}", self.instance_url().await?, path))
        }
    }

    /// The host that serves the org's API: the token response's `instance_url`.
    async fn instance_url(&self) -> Result<String, SourceError> {
        Ok(self.session().await?.1)
    }

    /// Flattens, renames and keys one record; returns it with its checkpoint.
    async fn prepare(&self, mut record: Value) -> Result<(SourceRecord, Checkpoint), SourceError> {
        let what = || "a query result record".to_string();
        let id = record
            .get("Id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| SourceError::Protocol {
                system: SYSTEM,
                what: what(),
                reason: "it has no Id".into(),
            })?;
        let modstamp = record
            .get("SystemModstamp")
            .and_then(Value::as_str)
            .and_then(soql_datetime)
            .ok_or_else(|| SourceError::Protocol {
                system: SYSTEM,
                what: what(),
                reason: format!("record {id} has no readable SystemModstamp"),
            })?;
        for (relationship, _) in child_maps(&self.config.field_map).values() {
            let children = self
                .child_records(
                    record
                        .get(relationship.as_str())
                        .cloned()
                        .unwrap_or(Value::Null),
                )
                .await?;
            if let Value::Object(map) = &mut record {
                map.insert(relationship.clone(), Value::Array(children));
            }
        }
        let record = flatten(record);
        let payload = apply_field_map(&self.config.field_map, record);
        Ok((
            SourceRecord {
                key: id.clone(),
                payload,
                correlation_id: None,
            },
            Checkpoint { modstamp, id },
        ))
    }

    /// A subquery's result as an array, following its own `nextRecordsUrl` when it was cut.
    async fn child_records(&self, value: Value) -> Result<Vec<Value>, SourceError> {
        let mut out = Vec::new();
        let mut current = value;
        loop {
            if current.is_null() {
                return Ok(out);
            }
            out.extend(
                current
                    .get("records")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            );
            let done = current.get("done").and_then(Value::as_bool).unwrap_or(true);
            match current.get("nextRecordsUrl").and_then(Value::as_str) {
                Some(next) if !done => {
                    current = self.get_json(&self.absolute(next).await?, None).await?
                }
                _ => return Ok(out),
            }
        }
    }

    /// The access token and its `instance_url`, cached (the audit's read-only query shares this login).
    pub(crate) async fn session(&self) -> Result<(String, String), SourceError> {
        let mut cached = self.token.lock().await;
        if let Some(session) = cached.as_ref() {
            return Ok(session.clone());
        }
        let session = self.fetch_token().await?;
        *cached = Some(session.clone());
        Ok(session)
    }

    pub(crate) async fn forget_token(&self, stale: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|(token, _)| token == stale) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<(String, String), SourceError> {
        self.reload_auth();
        let auth = self.auth.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (url, form): (String, Vec<(&str, String)>) = match &auth {
            SalesforceAuth::ClientCredentials {
                client_id,
                client_secret,
            } => (
                format!("{}/services/oauth2/token", self.config.base_url),
                vec![
                    ("grant_type", "client_credentials".into()),
                    ("client_id", client_id.clone()),
                    ("client_secret", client_secret.clone()),
                ],
            ),
            SalesforceAuth::JwtBearer {
                client_id,
                username,
                key,
                login_url,
            } => {
                let claims = serde_json::json!({
                    "iss": client_id,
                    "sub": username,
                    "aud": login_url,
                    // Salesforce refuses an assertion whose exp is more than 3 minutes away.
                    "exp": chrono::Utc::now().timestamp() + 170,
                });
                let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
                    .map_err(|e| SourceError::Auth {
                        system: SYSTEM,
                        reason: format!("signing the JWT assertion: {e}"),
                    })?;
                (
                    format!("{login_url}/services/oauth2/token"),
                    vec![
                        (
                            "grant_type",
                            "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                        ),
                        ("assertion", assertion),
                    ],
                )
            }
        };
        let what = "the OAuth token request".to_string();
        let response =
            self.http
                .post(&url)
                .form(&form)
                .send()
                .await
                .map_err(|e| SourceError::Transport {
                    system: SYSTEM,
                    what: what.clone(),
                    reason: e.to_string(),
                })?;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        if status >= 500 || status == 429 {
            return Err(SourceError::Http {
                system: SYSTEM,
                what,
                status,
                body: truncate(&body, 300).into(),
            });
        }
        if status != 200 {
            // 400 invalid_grant / invalid_client: the credentials or the connected app are wrong.
            return Err(SourceError::Auth {
                system: SYSTEM,
                reason: format!(
                    "token endpoint {url} answered HTTP {status}: {}",
                    truncate(&body, 300)
                ),
            });
        }
        let parsed: Value = serde_json::from_str(&body).map_err(|e| SourceError::Protocol {
            system: SYSTEM,
            what: what.clone(),
            reason: e.to_string(),
        })?;
        let token = parsed
            .get("access_token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| SourceError::Protocol {
                system: SYSTEM,
                what: what.clone(),
                reason: "no access_token in the answer".into(),
            })?;
        let instance = match parsed.get("instance_url").and_then(Value::as_str) {
            Some(instance) => {
                instance_url(instance, &url).map_err(|reason| SourceError::Protocol {
                    system: SYSTEM,
                    what,
                    reason,
                })?
            }
            // Salesforce always sends it; without it, the configured URL is the best guess.
            None => self.config.base_url.clone(),
        };
        Ok((token, instance))
    }

    /// GET with the bearer token: refreshes the token once on `INVALID_SESSION_ID`, backs off and retries the
    /// same request on limits and server errors.
    async fn get_json(&self, url: &str, soql: Option<&str>) -> Result<Value, SourceError> {
        let mut refreshed = false;
        let mut attempt: u32 = 0;
        let what = if soql.is_some() {
            "the SOQL query".to_string()
        } else {
            format!("GET {url}")
        };
        loop {
            attempt += 1;
            let (token, _) = self.session().await?;
            let mut request = self.http.get(url).bearer_auth(&token);
            if let Some(q) = soql {
                request = request.query(&[("q", q)]);
            }
            let (status, retry_after, body) = match request.send().await {
                Ok(response) => {
                    self.record_usage(response.headers());
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    (
                        status,
                        retry_after,
                        response.text().await.unwrap_or_default(),
                    )
                }
                Err(e) => {
                    if attempt >= self.config.max_attempts {
                        return Err(SourceError::Transport {
                            system: SYSTEM,
                            what,
                            reason: e.to_string(),
                        });
                    }
                    self.backoff(attempt, None).await;
                    continue;
                }
            };
            if status == 200 {
                return serde_json::from_str(&body).map_err(|e| SourceError::Protocol {
                    system: SYSTEM,
                    what,
                    reason: e.to_string(),
                });
            }
            if status == 401 {
                // Sessions expire (or are revoked) at Salesforce's discretion: one fresh token, then give up.
                if !refreshed {
                    refreshed = true;
                    attempt -= 1;
                    self.forget_token(&token).await;
                    continue;
                }
                return Err(SourceError::Auth {
                    system: SYSTEM,
                    reason: format!(
                        "{what}: HTTP 401 after a fresh token: {}",
                        truncate(&body, 300)
                    ),
                });
            }
            // The org's 24-hour API limit answers 403 REQUEST_LIMIT_EXCEEDED; concurrency limits answer 429/503.
            let limited = status == 429
                || status >= 500
                || (status == 403 && body.contains("REQUEST_LIMIT_EXCEEDED"));
            if limited && attempt < self.config.max_attempts {
                self.backoff(attempt, retry_after).await;
                continue;
            }
            return Err(SourceError::Http {
                system: SYSTEM,
                what,
                status,
                body: truncate(&body, 300).into(),
            });
        }
    }

    async fn backoff(&self, attempt: u32, retry_after: Option<Duration>) {
        let ceiling = self
            .config
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.backoff_max);
        // Full jitter, unless the API said how long to wait.
        let wait = retry_after
            .map(|r| r.min(self.config.backoff_max))
            .unwrap_or_else(|| {
                let millis = ceiling.as_millis() as u64;
                Duration::from_millis(if millis == 0 {
                    0
                } else {
                    rand::random_range(0..=millis)
                })
            });
        tokio::time::sleep(wait).await;
    }
}

/// The token response's `instance_url`, checked: the bearer token goes there, so it must be `https` (plain
/// HTTP only when the token endpoint itself was, which only a local test org is) with a host.
fn instance_url(instance: &str, token_url: &str) -> Result<String, String> {
    let parsed =
        url::Url::parse(instance).map_err(|e| format!("instance_url {instance:?}: {e}"))?;
    let plain_allowed = token_url.starts_with("http://");
    let scheme_ok = parsed.scheme() == "https" || (plain_allowed && parsed.scheme() == "http");
    if !scheme_ok || parsed.host_str().is_none() {
        return Err(format!(
            "instance_url {instance:?} is not an https URL; the access token is not sent there"
        ));
    }
    Ok(instance.trim_end_matches('/').to_string())
}

/// Drops `attributes` everywhere and turns any remaining subquery result into its records.
fn flatten(value: Value) -> Value {
    match value {
        Value::Object(mut map) => {
            map.remove("attributes");
            if map.contains_key("records")
                && map.contains_key("done")
                && map.contains_key("totalSize")
            {
                let records = map.remove("records").unwrap_or(Value::Array(Vec::new()));
                return flatten(records);
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, flatten(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(flatten).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(fm: &[(&str, &str)]) -> SalesforceConfig {
        SalesforceConfig {
            base_url: "https://x".into(),
            api_version: "v61.0".into(),
            object: "Opportunity".into(),
            filter: Some("StageName = 'Closed Won'".into()),
            field_map: fm
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            limit: 2000,
            poll_interval: Duration::from_secs(30),
            source_name: "salesforce:Opportunity".into(),
            max_attempts: 3,
            backoff_base: Duration::ZERO,
            backoff_max: Duration::ZERO,
        }
    }

    #[test]
    fn soql_selects_mapped_fields_subqueries_and_resumes_after_the_pair() {
        let cfg = config(&[
            ("id", "Id"),
            ("accountName", "Account.Name"),
            ("lineItems", "OpportunityLineItems"),
            ("lineItems[].sku", "ProductCode"),
            ("lineItems[].quantity", "Quantity"),
        ]);
        let cp = Checkpoint::parse("2024-05-01T10:00:00.000+0000|006A").unwrap();
        assert_eq!(
            build_soql(&cfg, Some(&cp)),
            "SELECT Id, SystemModstamp, Account.Name, (SELECT Quantity, ProductCode FROM OpportunityLineItems) \
             FROM Opportunity WHERE (StageName = 'Closed Won') AND (SystemModstamp > 2024-05-01T10:00:00.000Z OR \
             (SystemModstamp = 2024-05-01T10:00:00.000Z AND Id > '006A')) ORDER BY SystemModstamp, Id LIMIT 2000"
        );
    }

    #[test]
    fn limit_info_is_read_among_other_entries() {
        assert_eq!(
            ApiUsage::from_limit_info("api-usage=18/15000"),
            Some(ApiUsage {
                used: 18,
                limit: 15000
            })
        );
        assert_eq!(
            ApiUsage::from_limit_info(
                "per-app-api-usage=17/250(appName=sample-app), api-usage=13500/15000"
            ),
            Some(ApiUsage {
                used: 13500,
                limit: 15000
            })
        );
        assert_eq!(ApiUsage::from_limit_info("api-usage=5/0"), None);
        assert_eq!(ApiUsage::from_limit_info("per-app-api-usage=17/250"), None);
    }

    #[test]
    fn the_poll_slows_as_the_allowance_runs_low() {
        let base = Duration::from_secs(30);
        let at = |used| paced_interval(base, Some(ApiUsage { used, limit: 1000 }));
        assert_eq!(paced_interval(base, None), base);
        assert_eq!(at(799), base);
        assert_eq!(at(800), base);
        assert_eq!(at(850), base * 2);
        assert_eq!(at(900), base * 4);
        assert_eq!(at(990), base * 8);
        assert_eq!(
            at(5000),
            SLOWEST_POLL,
            "an exceeded allowance waits the longest"
        );
    }

    #[test]
    fn instance_url_must_be_https_unless_the_token_endpoint_was_plain() {
        let login = "https://login.salesforce.com/services/oauth2/token";
        assert_eq!(
            instance_url("https://acme.my.salesforce.com/", login).unwrap(),
            "https://acme.my.salesforce.com"
        );
        assert!(instance_url("http://acme.my.salesforce.com", login).is_err());
        assert!(instance_url("not a url", login).is_err());
        assert!(
            instance_url(
                "http://127.0.0.1:9",
                "http://127.0.0.1:8/services/oauth2/token"
            )
            .is_ok()
        );
    }

    #[test]
    fn checkpoint_refuses_what_would_inject_soql() {
        assert!(Checkpoint::parse("2024-05-01T10:00:00.000Z|006' OR Id != '").is_err());
        assert!(Checkpoint::parse("yesterday|006A").is_err());
    }

    #[test]
    fn flatten_drops_attributes_and_unwraps_subqueries() {
        let v = serde_json::json!({"attributes": {"type": "Opportunity"}, "Account": {"attributes": {}, "Name": "A"},
            "Kids": {"totalSize": 1, "done": true, "records": [{"attributes": {}, "X": 1}]}});
        assert_eq!(
            flatten(v),
            serde_json::json!({"Account": {"Name": "A"}, "Kids": [{"X": 1}]})
        );
    }
}
