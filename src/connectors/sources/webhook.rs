//! The webhook receiver: an axum [`Router`] that verifies a CRM's signature on the raw body, turns the body
//! into records in the contract's shape and answers 2xx only after [`Intake::accept`] returned `Ok`.
//!
//! Answers, so the CRM's retry logic does the right thing:
//! - `200` the records are stored (a duplicate is stored too: the intake recognises it);
//! - `401` the signature or its timestamp is wrong (with the reason; the CRM should not retry forever);
//! - `400` the body is not what the scheme promises (with the JSON line/column or the record's path);
//! - `413` the body is larger than the limit;
//! - `503` the intake or the HubSpot API failed: nothing was acknowledged, the CRM retries.
//!
//! Two signature schemes:
//! - **`hmac-sha256`** (Meshline's own, for generic senders): header
//!   `X-Meshline-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` keyed with the Secret key
//!   `webhookSecret`. Several `v1=` entries may be sent while a secret is rotated; one must match. `t` must be
//!   within [`WebhookConfig::tolerance`] (5 minutes) of our clock in either direction, so a captured request
//!   cannot be replayed later. Comparison is constant-time.
//! - **`hubspot-v3`**, per HubSpot's "Validating requests" guide: `X-HubSpot-Signature-v3` is
//!   base64(HMAC-SHA256(client secret, method + URI + raw body + X-HubSpot-Request-Timestamp)); requests whose
//!   timestamp (milliseconds) is older than 5 minutes are rejected; in the URI the characters
//!   `%3A %2F %3F %40 %21 %24 %27 %28 %29 %2A %2C %3B` are decoded (and nothing else). The URI is the one HubSpot
//!   called: `https://` + `Host` + the path and query received, unless the flow sets `spec.source.publicUrl`
//!   (the URL configured in HubSpot), which is then signed as is — an Ingress may rewrite host and path.
//!   Secret keys: `clientSecret` (the app's client secret) and `accessToken` (a private-app token with
//!   `crm.objects.deals.read` and `crm.objects.line_items.read`).
//!
//! HubSpot's webhooks carry events (`objectId`, `subscriptionType`, `eventId`, …), not the record, so for each
//! distinct `objectId` the receiver reads the record through the CRM v3 objects API
//! (`GET /crm/v3/objects/{object}/{id}?properties=…&associations=line_items`, then
//! `POST /crm/v3/objects/line_items/batch/read`) and assembles `{id, <deal properties>, line_items: [{id,
//! <line item properties>}]}` before the field map applies (so map `lineItems: line_items`,
//! `lineItems[].sku: hs_sku`). A record HubSpot no longer has (404: deleted or merged) is skipped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::{SourceError, apply_field_map, child_maps, key_from_value};
use crate::api::{SourceSpec, SourceSystem, WebhookSignature};
use crate::connectors::{Credentials, Intake, SourceRecord};

type HmacSha256 = Hmac<Sha256>;

/// Header of Meshline's generic scheme.
pub const MESHLINE_SIGNATURE_HEADER: &str = "x-meshline-signature";
const HUBSPOT_SIGNATURE_HEADER: &str = "x-hubspot-signature-v3";
const HUBSPOT_TIMESTAMP_HEADER: &str = "x-hubspot-request-timestamp";
/// HubSpot rejects nothing older than this itself; its guide tells receivers to.
const HUBSPOT_MAX_AGE: Duration = Duration::from_secs(300);
/// HubSpot's batch read takes at most 100 inputs.
const HUBSPOT_BATCH: usize = 100;

/// How a webhook proves it came from the CRM.
#[derive(Clone)]
pub enum Verifier {
    /// `X-Meshline-Signature: t=…,v1=…` keyed with `webhookSecret`.
    HmacSha256 { secret: String },
    /// HubSpot's v3 signature keyed with the app's client secret; records are read back from `api`.
    HubspotV3 {
        client_secret: String,
        api: HubspotApi,
    },
}

/// Where and how HubSpot records are read back.
#[derive(Clone)]
pub struct HubspotApi {
    /// `https://api.hubapi.com` unless the flow's `baseUrl` says otherwise.
    pub base_url: String,
    /// Private-app token (Secret key `accessToken`).
    pub access_token: String,
    /// The CRM object the events are about, e.g. `deals`.
    pub object: String,
}

/// Everything one webhook endpoint needs.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The flow's name, used in logs.
    pub flow: String,
    /// Route path, `/webhook` by default.
    pub path: String,
    pub verifier: Verifier,
    pub field_map: BTreeMap<String, String>,
    /// JSON pointer into the renamed record for its key; `/id` by default (the fieldMap target `id`).
    pub key_pointer: String,
    /// Largest accepted body in bytes (1 MiB by default); larger bodies get 413 before anything is read.
    pub body_limit: usize,
    /// How far the signed timestamp may be from our clock (generic scheme; HubSpot's is fixed at 5 minutes).
    pub tolerance: Duration,
    /// The URL HubSpot calls, as configured there (`spec.source.publicUrl`); it replaces `https://` + `Host` +
    /// the received path and query in the v3 signature.
    pub public_url: Option<String>,
}

impl WebhookConfig {
    /// Builds the configuration from a flow's source and its Secret. Secret keys: `webhookSecret` for
    /// `hmac-sha256`; `clientSecret` and `accessToken` for `hubspot-v3`.
    pub fn from_spec(
        flow: &str,
        spec: &SourceSpec,
        credentials: &Credentials,
    ) -> Result<WebhookConfig, SourceError> {
        let system = system_name(spec.system);
        let verifier = match spec.signature {
            Some(WebhookSignature::HmacSha256) => Verifier::HmacSha256 {
                secret: credentials.get("webhookSecret")?,
            },
            Some(WebhookSignature::HubspotV3) => Verifier::HubspotV3 {
                client_secret: credentials.get("clientSecret")?,
                api: HubspotApi {
                    base_url: spec
                        .base_url
                        .clone()
                        .unwrap_or_else(|| "https://api.hubapi.com".into())
                        .trim_end_matches('/')
                        .to_string(),
                    access_token: credentials.get("accessToken")?,
                    object: spec.object.clone(),
                },
            },
            None => {
                return Err(SourceError::Config {
                    system,
                    reason: format!(
                        "flow {flow}: a webhook source needs `signature` (hmac-sha256 or hubspot-v3)"
                    ),
                });
            }
        };
        let public_url = spec
            .public_url
            .as_deref()
            .map(|u| public_url(flow, system, u))
            .transpose()?;
        Ok(WebhookConfig {
            flow: flow.to_string(),
            path: "/webhook".into(),
            verifier,
            field_map: spec.field_map.clone(),
            key_pointer: "/id".into(),
            body_limit: 1024 * 1024,
            tolerance: Duration::from_secs(300),
            public_url,
        })
    }
}

/// `spec.source.publicUrl`, checked: an absolute `https` URL with a host and no credentials or fragment (the
/// CRD's pattern says the same; this catches a flow file run without the API server).
fn public_url(flow: &str, system: &'static str, raw: &str) -> Result<String, SourceError> {
    let invalid = |reason: String| SourceError::Config {
        system,
        reason: format!("flow {flow}: spec.source.publicUrl {raw:?}: {reason}"),
    };
    let url = url::Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
    if url.scheme() != "https" {
        return Err(invalid(
            "must be an https URL (HubSpot calls webhooks over TLS)".into(),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not carry credentials".into()));
    }
    if url.fragment().is_some() {
        return Err(invalid(
            "must not have a fragment (HubSpot never sends one)".into(),
        ));
    }
    // As written, not as the url crate re-serialises it: HubSpot signs the string it was given.
    Ok(raw.to_string())
}

fn system_name(system: SourceSystem) -> &'static str {
    match system {
        SourceSystem::Salesforce => "salesforce",
        SourceSystem::Hubspot => "hubspot",
        SourceSystem::Generic => "generic",
    }
}

struct Shared {
    config: std::sync::RwLock<Arc<WebhookConfig>>,
    rotation: Option<Rotation>,
    intake: Arc<dyn Intake>,
    http: reqwest::Client,
}

/// Where the endpoint's secrets come from, to pick up a rotation of the mounted Secret without a restart.
struct Rotation {
    spec: SourceSpec,
    credentials: Credentials,
    seen: std::sync::Mutex<(Option<[u8; 32]>, std::time::Instant)>,
}

impl Shared {
    fn config(&self) -> Arc<WebhookConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the configuration when the Secret's files changed: looked at every 10 s, or at most once a
    /// second after a refused signature (a CRM that already signs with the new secret). Returns the new
    /// configuration when one was put in place.
    fn reload(&self, refused: bool) -> Option<Arc<WebhookConfig>> {
        let rotation = self.rotation.as_ref()?;
        let mut seen = rotation.seen.lock().unwrap_or_else(|p| p.into_inner());
        let every = if refused {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        if seen.1.elapsed() < every {
            return None;
        }
        seen.1 = std::time::Instant::now();
        let fingerprint = rotation.credentials.fingerprint();
        if fingerprint == seen.0 {
            return None;
        }
        seen.0 = fingerprint;
        let current = self.config();
        match WebhookConfig::from_spec(&current.flow, &rotation.spec, &rotation.credentials) {
            Ok(mut config) => {
                // Only the secrets come from the Secret; the rest is as the caller configured it.
                config.path = current.path.clone();
                config.field_map = current.field_map.clone();
                config.key_pointer = current.key_pointer.clone();
                config.body_limit = current.body_limit;
                config.tolerance = current.tolerance;
                config.public_url = current.public_url.clone();
                let config = Arc::new(config);
                *self.config.write().unwrap_or_else(|p| p.into_inner()) = config.clone();
                tracing::info!(flow = %current.flow, "the source's Secret changed; new webhook secret in use");
                Some(config)
            }
            Err(e) => {
                tracing::error!(flow = %current.flow, error = %e, "the source's Secret changed but cannot be used; keeping the previous secret");
                None
            }
        }
    }
}

/// The webhook endpoint: `POST {config.path}`. Mount it on the worker's HTTP server.
pub fn router(config: WebhookConfig, intake: Arc<dyn Intake>) -> Router {
    router_with(config, intake, None)
}

/// [`router`] that re-reads its secrets from `credentials` (the flow's mounted source Secret) when the files
/// change, so a rotated webhook secret is used without a restart.
pub fn router_rotating(
    config: WebhookConfig,
    intake: Arc<dyn Intake>,
    spec: &SourceSpec,
    credentials: Credentials,
) -> Router {
    let fingerprint = credentials.fingerprint();
    router_with(
        config,
        intake,
        Some(Rotation {
            spec: spec.clone(),
            credentials,
            seen: std::sync::Mutex::new((fingerprint, std::time::Instant::now())),
        }),
    )
}

fn router_with(
    config: WebhookConfig,
    intake: Arc<dyn Intake>,
    rotation: Option<Rotation>,
) -> Router {
    let limit = config.body_limit;
    let path = config.path.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        config: std::sync::RwLock::new(Arc::new(config)),
        rotation,
        intake,
        http,
    });
    Router::new()
        .route(&path, post(receive))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// A refusal, with a stable label and a reason the sender can act on.
fn refuse(status: StatusCode, label: &str, reason: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": label, "reason": reason.into()})),
    )
        .into_response()
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut config = shared.reload(false).unwrap_or_else(|| shared.config());
    // The signature covers the raw bytes, so it is checked before anything parses (and re-serialises) them.
    let mut verified = verify(&config, &method, &uri, &headers, &body);
    if verified.is_err()
        && let Some(rotated) = shared.reload(true)
    {
        config = rotated;
        verified = verify(&config, &method, &uri, &headers, &body);
    }
    let config = config.as_ref();
    if let Err(reason) = verified {
        tracing::warn!(flow = %config.flow, %reason, "webhook refused: signature");
        return refuse(StatusCode::UNAUTHORIZED, "bad_signature", reason);
    }
    // A nearly full ledger volume refuses before any work (a HubSpot read, say): the CRM retries later.
    if let Some(pressure) = shared.intake.backpressure() {
        return busy(&pressure);
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!(
                    "malformed JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            );
        }
    };
    let items = match parsed {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("/{i}"), v))
            .collect(),
        Value::Object(_) => vec![(String::new(), parsed)],
        other => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!(
                    "expected a JSON object (one record) or array (a batch) at the root, found {}",
                    kind(&other)
                ),
            );
        }
    };
    let correlation =
        header(&headers, "x-correlation-id").or_else(|| header(&headers, "traceparent"));
    let records = match &config.verifier {
        Verifier::HmacSha256 { .. } => generic_records(config, items, correlation),
        Verifier::HubspotV3 { api, .. } => hubspot_records(&shared.http, config, api, items).await,
    };
    let records = match records {
        Ok(r) => r,
        Err(response) => return response,
    };
    let count = records.len();
    if count == 0 {
        return (StatusCode::OK, axum::Json(json!({"accepted": 0}))).into_response();
    }
    match shared.intake.accept(records).await {
        Ok(receipt) => (
            StatusCode::OK,
            axum::Json(json!({"accepted": count, "stored": receipt.stored, "duplicates": receipt.duplicates, "stale": receipt.stale})),
        )
            .into_response(),
        Err(e) => {
            if let Some(pressure) = shared.intake.backpressure() {
                return busy(&pressure);
            }
            tracing::error!(flow = %config.flow, error = %e, "webhook not acknowledged: intake failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "intake_failed", format!("{e}; retry later"))
        }
    }
}

/// 503 with `Retry-After`: nothing was stored, the CRM should send the webhook again later.
fn busy(pressure: &crate::connectors::Backpressure) -> Response {
    let mut response = refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "intake_paused",
        pressure.reason.clone(),
    );
    if let Ok(value) =
        axum::http::HeaderValue::from_str(&pressure.retry_after.as_secs().max(1).to_string())
    {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, value);
    }
    response
}

fn verify(
    config: &WebhookConfig,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    match &config.verifier {
        Verifier::HmacSha256 { secret } => {
            verify_meshline(secret, headers, body, config.tolerance, now_secs())
        }
        Verifier::HubspotV3 { client_secret, .. } => {
            let uri = hubspot_request_uri(config.public_url.as_deref(), headers, uri);
            verify_hubspot_v3(
                client_secret,
                method.as_str(),
                &uri,
                headers,
                body,
                now_millis(),
            )
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[allow(clippy::result_large_err)]
fn generic_records(
    config: &WebhookConfig,
    items: Vec<(String, Value)>,
    correlation: Option<String>,
) -> Result<Vec<SourceRecord>, Response> {
    let mut records = Vec::with_capacity(items.len());
    for (path, item) in items {
        if !item.is_object() {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "malformed_record",
                format!(
                    "record at {} is {}, expected an object",
                    display_path(&path),
                    kind(&item)
                ),
            ));
        }
        let payload = apply_field_map(&config.field_map, item);
        let Some(key) = payload
            .pointer(&config.key_pointer)
            .and_then(key_from_value)
        else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "missing_key",
                format!(
                    "record at {} has no key at {} (a non-empty string or a number) after the field map",
                    display_path(&path),
                    config.key_pointer
                ),
            ));
        };
        records.push(SourceRecord {
            key,
            payload,
            correlation_id: correlation.clone(),
        });
    }
    Ok(records)
}

fn display_path(path: &str) -> &str {
    if path.is_empty() { "the root" } else { path }
}

#[allow(clippy::result_large_err)]
async fn hubspot_records(
    http: &reqwest::Client,
    config: &WebhookConfig,
    api: &HubspotApi,
    events: Vec<(String, Value)>,
) -> Result<Vec<SourceRecord>, Response> {
    // Several events (a creation and property changes) often name the same object in one batch: read it once.
    let mut wanted: Vec<(String, Option<String>)> = Vec::new();
    for (path, event) in events {
        let Some(id) = event.get("objectId").and_then(key_from_value) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "malformed_event",
                format!("HubSpot event at {}/objectId is missing or not an id", path),
            ));
        };
        let event_id = event.get("eventId").and_then(key_from_value);
        if !wanted.iter().any(|(w, _)| *w == id) {
            wanted.push((id, event_id));
        }
    }
    let mut records = Vec::with_capacity(wanted.len());
    for (id, event_id) in wanted {
        match fetch_hubspot_record(http, api, &config.field_map, &id).await {
            Ok(Some(record)) => records.push(SourceRecord {
                key: id,
                payload: apply_field_map(&config.field_map, record),
                correlation_id: event_id.map(|e| format!("hubspot-event-{e}")),
            }),
            Ok(None) => {
                tracing::info!(flow = %config.flow, object_id = %id, "HubSpot no longer has the object; event skipped")
            }
            Err(e) => {
                tracing::warn!(flow = %config.flow, object_id = %id, error = %e, "HubSpot read failed");
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.label(),
                    format!("{e}; retry later"),
                ));
            }
        }
    }
    Ok(records)
}

/// The HubSpot properties a field map asks for: top-level sources for the object, child sources for line items.
fn hubspot_properties(field_map: &BTreeMap<String, String>) -> (Vec<String>, Vec<String>) {
    let children = child_maps(field_map);
    let relationship_sources: Vec<&str> = children.values().map(|(s, _)| s.as_str()).collect();
    let mut object_props: Vec<String> = field_map
        .iter()
        .filter(|(t, s)| {
            !t.contains("[]") && s.as_str() != "id" && !relationship_sources.contains(&s.as_str())
        })
        .map(|(_, s)| s.split('.').next().unwrap_or(s).to_string())
        .collect();
    object_props.sort();
    object_props.dedup();
    let mut item_props: Vec<String> = children
        .values()
        .filter(|(s, _)| s == "line_items")
        .flat_map(|(_, inner)| inner.values().filter(|s| s.as_str() != "id").cloned())
        .collect();
    item_props.sort();
    item_props.dedup();
    (object_props, item_props)
}

async fn fetch_hubspot_record(
    http: &reqwest::Client,
    api: &HubspotApi,
    field_map: &BTreeMap<String, String>,
    id: &str,
) -> Result<Option<Value>, SourceError> {
    let (object_props, item_props) = hubspot_properties(field_map);
    let mut url = url::Url::parse(&format!(
        "{}/crm/v3/objects/{}/{}",
        api.base_url, api.object, id
    ))
    .map_err(|e| SourceError::Config {
        system: "hubspot",
        reason: format!("bad HubSpot URL: {e}"),
    })?;
    {
        let mut q = url.query_pairs_mut();
        if !object_props.is_empty() {
            q.append_pair("properties", &object_props.join(","));
        }
        q.append_pair("associations", "line_items");
    }
    let what = format!("GET deal {id}");
    let response = http
        .get(url)
        .bearer_auth(&api.access_token)
        .send()
        .await
        .map_err(|e| SourceError::Transport {
            system: "hubspot",
            what: what.clone(),
            reason: e.to_string(),
        })?;
    let status = response.status().as_u16();
    if status == 404 {
        return Ok(None);
    }
    let body = response.text().await.unwrap_or_default();
    if status == 401 || status == 403 {
        return Err(SourceError::Auth {
            system: "hubspot",
            reason: format!(
                "{what}: HTTP {status}: {}",
                crate::connectors::truncate(&body, 300)
            ),
        });
    }
    if !(200..300).contains(&status) {
        return Err(SourceError::Http {
            system: "hubspot",
            what,
            status,
            body: crate::connectors::truncate(&body, 300).into(),
        });
    }
    let object: Value = serde_json::from_str(&body).map_err(|e| SourceError::Protocol {
        system: "hubspot",
        what: what.clone(),
        reason: e.to_string(),
    })?;
    let mut record = serde_json::Map::new();
    record.insert(
        "id".into(),
        object
            .get("id")
            .cloned()
            .unwrap_or_else(|| Value::String(id.to_string())),
    );
    if let Some(Value::Object(props)) = object.get("properties") {
        for (k, v) in props {
            record.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    // The association key is the object type's label; HubSpot has answered both `line items` and `line_items`.
    let item_ids: Vec<String> = ["line items", "line_items"]
        .iter()
        .filter_map(|k| object.pointer(&format!("/associations/{k}/results")))
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|r| r.get("id").and_then(key_from_value))
        .collect();
    let mut items = Vec::with_capacity(item_ids.len());
    for chunk in item_ids.chunks(HUBSPOT_BATCH) {
        items.extend(read_line_items(http, api, chunk, &item_props).await?);
    }
    record.insert("line_items".into(), Value::Array(items));
    Ok(Some(Value::Object(record)))
}

async fn read_line_items(
    http: &reqwest::Client,
    api: &HubspotApi,
    ids: &[String],
    properties: &[String],
) -> Result<Vec<Value>, SourceError> {
    let what = format!("batch read of {} line items", ids.len());
    let body = json!({
        "properties": properties,
        "inputs": ids.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
    });
    let response = http
        .post(format!(
            "{}/crm/v3/objects/line_items/batch/read",
            api.base_url
        ))
        .bearer_auth(&api.access_token)
        .json(&body)
        .send()
        .await
        .map_err(|e| SourceError::Transport {
            system: "hubspot",
            what: what.clone(),
            reason: e.to_string(),
        })?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    if !(200..300).contains(&status) {
        return Err(SourceError::Http {
            system: "hubspot",
            what,
            status,
            body: crate::connectors::truncate(&text, 300).into(),
        });
    }
    let answer: Value = serde_json::from_str(&text).map_err(|e| SourceError::Protocol {
        system: "hubspot",
        what: what.clone(),
        reason: e.to_string(),
    })?;
    let results = answer
        .get("results")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Batch read answers in no promised order; keep the deal's association order.
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for r in results {
        let Some(id) = r.get("id").and_then(key_from_value) else {
            continue;
        };
        let mut item = serde_json::Map::new();
        item.insert("id".into(), Value::String(id.clone()));
        if let Some(Value::Object(props)) = r.get("properties") {
            for (k, v) in props {
                item.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        by_id.insert(id, Value::Object(item));
    }
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The value of `X-Meshline-Signature` for `body` signed at `t` (unix seconds): for senders and tests.
pub fn meshline_signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks Meshline's generic signature; `Err` carries the reason given to the sender.
pub fn verify_meshline(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    tolerance: Duration,
    now: i64,
) -> Result<(), String> {
    let value = header(headers, MESHLINE_SIGNATURE_HEADER)
        .ok_or_else(|| "missing X-Meshline-Signature header".to_string())?;
    let mut t: Option<i64> = None;
    let mut candidates = Vec::new();
    for part in value.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse().ok(),
            Some(("v1", v)) => candidates.push(v.to_string()),
            _ => {}
        }
    }
    let t = t.ok_or_else(|| "X-Meshline-Signature has no valid t=<unix seconds>".to_string())?;
    if (now - t).unsigned_abs() > tolerance.as_secs() {
        return Err(format!(
            "X-Meshline-Signature timestamp {t} is {}s away from now; more than {}s is refused as a replay",
            now - t,
            tolerance.as_secs()
        ));
    }
    if candidates.is_empty() {
        return Err("X-Meshline-Signature has no v1=<hex> signature".into());
    }
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    for candidate in candidates {
        let Ok(bytes) = hex::decode(&candidate) else {
            continue;
        };
        // verify_slice compares in constant time.
        if mac.clone().verify_slice(&bytes).is_ok() {
            return Ok(());
        }
    }
    Err(
        "X-Meshline-Signature does not match the body (wrong secret, or the body was changed)"
            .into(),
    )
}

/// HubSpot's v3 signature of a request, base64-encoded as in `X-HubSpot-Signature-v3`. `uri` must already
/// be in the form HubSpot signs (see [`hubspot_decode_uri`]).
pub fn hubspot_v3_signature(
    client_secret: &str,
    method: &str,
    uri: &str,
    body: &[u8],
    timestamp: &str,
) -> String {
    let mut mac =
        HmacSha256::new_from_slice(client_secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(method.as_bytes());
    mac.update(uri.as_bytes());
    mac.update(body);
    mac.update(timestamp.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Decodes exactly the percent-escapes HubSpot's guide lists for the v3 signature's URI, and no others.
pub fn hubspot_decode_uri(uri: &str) -> String {
    const DECODED: [(&str, char); 12] = [
        ("3A", ':'),
        ("2F", '/'),
        ("3F", '?'),
        ("40", '@'),
        ("21", '!'),
        ("24", '$'),
        ("27", '\''),
        ("28", '('),
        ("29", ')'),
        ("2A", '*'),
        ("2C", ','),
        ("3B", ';'),
    ];
    let mut out = String::with_capacity(uri.len());
    let mut rest = uri;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let escape = rest.get(pos + 1..pos + 3).map(str::to_ascii_uppercase);
        match escape.and_then(|e| DECODED.iter().find(|(code, _)| *code == e)) {
            Some((_, c)) => {
                out.push(*c);
                rest = &rest[pos + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The URI HubSpot signed, decoded per the guide: the configured public URL, or else `https://` + `Host` + the
/// path and query as received (right only when nothing between HubSpot and the worker rewrites them).
pub fn hubspot_request_uri(public_url: Option<&str>, headers: &HeaderMap, uri: &Uri) -> String {
    let called = match public_url {
        Some(url) => url.to_string(),
        None => {
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            format!(
                "https://{}{path}",
                header(headers, "host").unwrap_or_default()
            )
        }
    };
    hubspot_decode_uri(&called)
}

/// Checks HubSpot's v3 signature; `Err` carries the reason given to the sender.
pub fn verify_hubspot_v3(
    client_secret: &str,
    method: &str,
    uri: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_millis: i64,
) -> Result<(), String> {
    let signature = header(headers, HUBSPOT_SIGNATURE_HEADER)
        .ok_or_else(|| "missing X-HubSpot-Signature-v3 header".to_string())?;
    let timestamp = header(headers, HUBSPOT_TIMESTAMP_HEADER)
        .ok_or_else(|| "missing X-HubSpot-Request-Timestamp header".to_string())?;
    let ts: i64 = timestamp.trim().parse().map_err(|_| {
        format!("X-HubSpot-Request-Timestamp {timestamp:?} is not milliseconds since the epoch")
    })?;
    // The guide: reject a request whose timestamp is older than 5 minutes. We also refuse one more than
    // 5 minutes in the future, which only a forger or a broken clock produces.
    let age = now_millis - ts;
    if age.unsigned_abs() > HUBSPOT_MAX_AGE.as_millis() as u64 {
        return Err(format!(
            "X-HubSpot-Request-Timestamp is {}s from now; HubSpot requests older than 300s are refused as replays",
            age / 1000
        ));
    }
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return Err("X-HubSpot-Signature-v3 is not base64".into());
    };
    let mut mac =
        HmacSha256::new_from_slice(client_secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(method.as_bytes());
    mac.update(uri.as_bytes());
    mac.update(body);
    mac.update(timestamp.as_bytes());
    mac.verify_slice(&given).map_err(|_| {
        format!("X-HubSpot-Signature-v3 does not match {method} {uri} and the body (wrong client secret, or changed)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_the_listed_escapes() {
        assert_eq!(
            hubspot_decode_uri("https://h/p%3Fa%3Ab%2fc?x=%20%2C%25%40"),
            "https://h/p?a:b/c?x=%20,%25@"
        );
    }

    #[test]
    fn meshline_signature_round_trips_and_rotated_secrets_match() {
        let sig = meshline_signature("s", 100, b"{}");
        let mut headers = HeaderMap::new();
        headers.insert(
            MESHLINE_SIGNATURE_HEADER,
            format!("{sig},v1=00").parse().unwrap(),
        );
        assert!(verify_meshline("s", &headers, b"{}", Duration::from_secs(300), 120).is_ok());
        assert!(verify_meshline("s", &headers, b"{ }", Duration::from_secs(300), 120).is_err());
        assert!(verify_meshline("s", &headers, b"{}", Duration::from_secs(300), 1000).is_err());
    }
}
