//! `SyncFlow`: a contract bound to a real CRM and ERP, with the operational policy that runs it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, SecretRef};

/// The runtime binding of a contract to real systems: where records come from, where they go, how delivery
/// behaves under failure and how a new contract version rolls out.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sync.meshline.io",
    version = "v1alpha1",
    kind = "SyncFlow",
    doc = "A SyncContract bound to a real CRM source and ERP sink, with delivery, rollout and ledger policy. The controller runs it as worker pods.",
    namespaced,
    status = "SyncFlowStatus",
    shortname = "sf",
    validation = kube::core::cel::Rule::new("size(self.metadata.name) <= 52").message("a flow name is at most 52 characters, so the names of its worker objects fit in 63"),
    shortname = "flow",
    category = "meshline",
    printcolumn = r#"{"name":"Contract","type":"string","jsonPath":".spec.contract.name"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.activeContractVersion"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Delivered","type":"integer","jsonPath":".status.counters.delivered"}"#,
    printcolumn = r#"{"name":"Dead","type":"integer","jsonPath":".status.counters.deadLettered"}"#,
    printcolumn = r#"{"name":"Held","type":"integer","jsonPath":".status.counters.held"}"#,
    printcolumn = r#"{"name":"Failure","type":"string","jsonPath":".status.failureRate"}"#,
    printcolumn = r#"{"name":"Canary","type":"string","jsonPath":".status.canary.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canary.weight"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.ledger) || self.ledger.type != 'embedded' || !has(self.replicas) || self.replicas <= 1", "message": "an embedded ledger supports one replica; use a postgres ledger for more"},
    {"rule": "!has(self.lookups) || self.lookups.all(l, self.lookups.exists_one(m, m.name == l.name))", "message": "lookup names must be unique"}
]))]
pub struct SyncFlowSpec {
    /// The contract this flow runs, and the versions it accepts.
    pub contract: ContractBinding,
    /// Where records come from.
    pub source: SourceSpec,
    /// Where payloads go.
    pub sink: SinkSpec,
    /// Lookup tables the contract's rules read, bound to real data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub lookups: Vec<LookupBinding>,
    /// Retries, dead letters and pressure toward the sink.
    #[serde(default)]
    pub delivery: DeliveryPolicy,
    /// How a new contract version reaches production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPolicy>,
    /// Where the worker keeps its durable state.
    #[serde(default)]
    pub ledger: LedgerSpec,
    /// Worker replicas. More than one needs a postgres ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 50))]
    pub replicas: Option<i32>,
    /// Scale the worker to zero without losing the ledger.
    #[serde(default)]
    pub paused: bool,
    /// Worker pod settings that override the controller's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerSpec>,
    /// How the reconciliation audit reads the two sides, where the defaults don't fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<super::FlowAuditSpec>,
}

/// The contract a flow uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContractBinding {
    /// Name of a SyncContract in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A semver requirement the contract's version must satisfy, e.g. `^1.2` or `>=1.0, <2.0`.
    #[serde(default = "any_version")]
    #[schemars(length(min = 1, max = 128))]
    pub version: String,
}

fn any_version() -> String {
    "*".to_string()
}

/// Source systems with a connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceSystem {
    Salesforce,
    Hubspot,
    /// Any system that can post signed JSON webhooks.
    Generic,
}

/// How records arrive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceMode {
    /// The CRM posts to the worker; the worker acknowledges after the record is in the ledger.
    #[default]
    Webhook,
    /// The worker polls the CRM's API with a durable checkpoint.
    Poll,
}

/// Webhook signature schemes the worker verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookSignature {
    /// HMAC-SHA256 of the raw body in `X-Meshline-Signature` (hex), with a timestamp against replays.
    HmacSha256,
    /// HubSpot's v3 signature (`X-HubSpot-Signature-v3`, HMAC-SHA256 over method, URI, body, timestamp).
    HubspotV3,
}

/// Where records come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'poll' || self.system == 'salesforce'", "message": "poll mode is available for salesforce; use webhooks for the other systems"},
    {"rule": "self.mode != 'webhook' || has(self.signature)", "message": "a webhook source needs a signature scheme"},
    {"rule": "!has(self.baseUrl) || !self.baseUrl.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@')", "message": "credentials must not be embedded in a URL; use credentialsSecretRef"},
    {"rule": "!has(self.publicUrl) || (has(self.signature) && self.signature == 'hubspot-v3')", "message": "publicUrl is what the hubspot-v3 signature covers; other signature schemes do not sign the URL"}
]))]
pub struct SourceSpec {
    pub system: SourceSystem,
    #[serde(default)]
    pub mode: SourceMode,
    /// The CRM object, e.g. `Opportunity` or `deals`.
    #[schemars(length(min = 1, max = 128))]
    pub object: String,
    /// Which records to take, in the source's own filter language (a SOQL WHERE clause for Salesforce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub filter: Option<String>,
    /// The API's base URL, e.g. `https://acme.my.salesforce.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://"))]
    pub base_url: Option<String>,
    /// Interval between polls in poll mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub poll_interval: Option<Duration>,
    /// How the contract's field paths map to the source's own field names, e.g. `stageName: StageName` or
    /// `lineItems[].sku: Product2.ProductCode` (for Salesforce, `lineItems: OpportunityLineItems` names the
    /// child relationship queried as a subquery). Unmapped fields keep their names.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 200))]
    pub field_map: std::collections::BTreeMap<String, String>,
    /// Signature scheme of incoming webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<WebhookSignature>,
    /// The webhook URL exactly as configured in HubSpot (`https://hooks.example.com/revenue/webhook`, with its
    /// query string if it has one). HubSpot's v3 signature covers the URL it called; without this the worker
    /// assumes `https://` + the Host header + the path it received, which an Ingress that rewrites the host
    /// or the path breaks (every request then gets 401).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https://[^/?#@\s]+(/[^#\s]*)?$"))]
    pub public_url: Option<String>,
    /// Secret with the source's credentials (OAuth client, webhook signing secret).
    pub credentials_secret_ref: SecretRef,
}

/// Sink systems with a connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SinkSystem {
    Netsuite,
    Odoo,
    Http,
    Postgres,
}

/// The write the sink performs. Only idempotent writes are offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SinkOperation {
    /// Create or update, keyed by the contract's external id.
    #[default]
    Upsert,
}

/// Where payloads go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.system == 'postgres' || has(self.baseUrl)", "message": "baseUrl is required for netsuite, odoo and http sinks"},
    {"rule": "self.system != 'postgres' || has(self.table)", "message": "table is required for a postgres sink"},
    {"rule": "self.system != 'netsuite' || has(self.recordType)", "message": "recordType is required for a netsuite sink"},
    {"rule": "self.system != 'odoo' || has(self.database)", "message": "database is required for an odoo sink"},
    {"rule": "self.system == 'http' || !has(self.bulk)", "message": "bulk is only for an http sink"},
    {"rule": "!has(self.baseUrl) || !self.baseUrl.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@')", "message": "credentials must not be embedded in a URL; use credentialsSecretRef"}
]))]
pub struct SinkSpec {
    pub system: SinkSystem,
    #[serde(default)]
    pub operation: SinkOperation,
    /// The API's base URL, e.g. `https://1234567.suitetalk.api.netsuite.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://"))]
    pub base_url: Option<String>,
    /// NetSuite record type, e.g. `salesOrder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub record_type: Option<String>,
    /// Odoo database name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub database: Option<String>,
    /// Odoo model, default `sale.order`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub model: Option<String>,
    /// PostgreSQL table (optionally schema-qualified) the payload is upserted into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 128),
        pattern(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
    )]
    pub table: Option<String>,
    /// Secret with the sink's credentials (OAuth 2.0 client and certificate, TBA tokens, API key, DSN).
    pub credentials_secret_ref: SecretRef,
    /// For an `http` sink: a bulk endpoint that takes many records in one `POST` and answers a status per
    /// record. Off when absent: every record is then its own `PUT {baseUrl}/{externalId}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<HttpBulk>,
}

/// An HTTP sink's bulk endpoint: `POST {baseUrl}{path}` with `{"records": [...]}`, answered by
/// `{"results": [...]}` with one status per record (the request and answer shapes are in the README).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpBulk {
    /// Path appended to `baseUrl`'s path, starting with `/`, e.g. `/bulk` (no query string).
    #[schemars(
        length(min = 1, max = 512),
        pattern(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
    )]
    pub path: String,
    /// Records per bulk request; default 100. `spec.delivery.batch` may lower it, never raise it.
    #[serde(default = "default_bulk_max_records")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_records: u32,
}

/// Records per bulk request when `maxRecords` is not given.
pub const DEFAULT_BULK_MAX_RECORDS: u32 = 100;

fn default_bulk_max_records() -> u32 {
    DEFAULT_BULK_MAX_RECORDS
}

/// Where a lookup's data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LookupSource {
    /// Read from the sink system with the sink's credentials (e.g. NetSuite items and their prices).
    Sink,
    /// A JSON document served over HTTP(S).
    Http,
    /// A key of a ConfigMap in the flow's namespace (a JSON object keyed like the lookup).
    ConfigMap,
}

/// Binds a contract's lookup to data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.from != 'http' || has(self.url)", "message": "url is required for an http lookup"},
    {"rule": "self.from != 'configMap' || has(self.configMapRef)", "message": "configMapRef is required for a configMap lookup"},
    {"rule": "!has(self.url) || !self.url.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@')", "message": "credentials must not be embedded in a URL; use credentialsSecretRef"}
]))]
pub struct LookupBinding {
    /// The lookup's name in the contract.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    pub from: LookupSource,
    /// For `sink`: the record type or model to read, e.g. `inventoryItem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub resource: Option<String>,
    /// For `http`: the document's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://"))]
    pub url: Option<String>,
    /// For `configMap`: the ConfigMap and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
    /// The entry field that is the key (e.g. `sku`).
    #[schemars(length(min = 1, max = 63))]
    pub key: String,
    /// How often the data is refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub refresh_interval: Option<Duration>,
    /// Credentials for an `http` lookup that needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A key of a ConfigMap in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Delivery behaviour toward the sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.backoff) || !has(self.backoff.base) || !has(self.backoff.max) || duration(self.backoff.base) <= duration(self.backoff.max)", "message": "backoff.base must not exceed backoff.max"},
    {"rule": "!has(self.batch) || !has(self.batch.linger) || duration(self.batch.linger) <= duration('1s')", "message": "batch.linger must be at most 1s"}
]))]
pub struct DeliveryPolicy {
    /// Attempts before a transiently failing record is dead-lettered. A record given back untried (circuit
    /// breaker open, no delivery slot, a flow-level error, shutdown) spends none.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Exponential backoff with full jitter between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// How long dead letters are kept before they are purged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub dead_letter_retention: Option<Duration>,
    /// Requests per second toward the sink (0 = unlimited).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100_000))]
    pub rate_limit: u32,
    /// Requests in flight toward the sink at once. NetSuite allows 15 to 65 per account, shared by all
    /// integrations.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1000))]
    pub concurrency: u32,
    /// How accepted records are grouped for a sink that takes batches (the PostgreSQL sink, Odoo's `create`,
    /// an HTTP sink with `bulk`): up to `maxRecords` records or `maxBytes` of payloads per request, waiting
    /// at most `linger` for company. Every record still gets its own outcome. Ignored by sinks without a
    /// batch API (NetSuite); `maxRecords: 1` turns batching off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchPolicy>,
}

/// Grouping of deliveries into batches (see [`DeliveryPolicy::batch`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchPolicy {
    /// Records per batch; default 500, capped by the sink's own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_records: Option<u32>,
    /// Serialized payload bytes per batch; default 1 MiB. A single larger record goes alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 67_108_864))]
    pub max_bytes: Option<u32>,
    /// Longest a record waits for others to fill its batch (Go duration); default `5ms`, at most `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s))+$"))]
    pub linger: Option<Duration>,
}

fn default_max_attempts() -> u32 {
    8
}

fn default_concurrency() -> u32 {
    4
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_attempts: default_max_attempts(),
            backoff: None,
            dead_letter_retention: None,
            rate_limit: 0,
            concurrency: default_concurrency(),
            batch: None,
        }
    }
}

/// Exponential backoff bounds (Go durations).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub base: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub max: Option<Duration>,
}

/// How a new contract version rolls out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    /// Records from the ledger replayed through old and new versions before any traffic moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub preflight_records: Option<u32>,
    /// Records the candidate may newly dead-letter in the preflight replay (default 0): accepted or held by the
    /// active revision, rejected by the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub max_newly_rejected: Option<u32>,
    /// Records whose ERP payload may change in the preflight replay (default: no limit; the report still counts
    /// them by target path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub max_changed_outputs: Option<u32>,
    /// How long a preflight replay Job may run before it counts as failed (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub preflight_timeout: Option<Duration>,
    /// Canary steps; without them a new version replaces the old one after preflight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryPolicy>,
}

/// Canary steps and their analysis, after Argo Rollouts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.steps.all(i, self.steps.exists_one(j, j.weight == i.weight))", "message": "canary weights must be distinct"},
    {"rule": "self.steps.map(s, s.weight).isSorted()", "message": "canary weights must increase"}
]))]
pub struct CanaryPolicy {
    /// The share of buckets the new version takes at each step, in increasing order.
    #[schemars(length(min = 1, max = 20))]
    pub steps: Vec<CanaryStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<CanaryAnalysis>,
}

/// One canary step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStep {
    /// Percentage of record buckets (0 to 100) on the new version.
    #[schemars(range(min = 1, max = 100))]
    pub weight: u32,
    /// How long to stay at this weight while analysis runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub pause: Option<Duration>,
}

/// When a canary step fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryAnalysis {
    /// Highest failure rate of the canary, as a decimal fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12), pattern(r"^(0(\.[0-9]+)?|1(\.0+)?)$"))]
    pub max_failure_rate: Option<String>,
    /// Highest p99 delivery latency of the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub max_latency_p99: Option<Duration>,
    /// Highest share of the canary's finished records that were dead-lettered, as a decimal fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12), pattern(r"^(0(\.[0-9]+)?|1(\.0+)?)$"))]
    pub max_dead_letter_rate: Option<String>,
    /// Records the canary must have processed before a measurement counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub min_records: Option<u32>,
    /// Failed measurements tolerated before the rollout aborts and rolls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub failure_limit: Option<u32>,
    /// Measurements in a row that could not be taken (the ledger or the workers did not answer) before the
    /// rollout aborts (default 4, as in Argo Rollouts). A measurement that was taken resets the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub consecutive_error_limit: Option<u32>,
    /// Time between measurements (default 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub interval: Option<Duration>,
}

/// Ledger backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LedgerType {
    /// SQLite on a PersistentVolumeClaim; one replica.
    #[default]
    Embedded,
    /// PostgreSQL; several replicas (and the canary) share it.
    Postgres,
}

/// The worker's durable state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'postgres' || has(self.credentialsSecretRef)", "message": "a postgres ledger needs credentialsSecretRef (a Secret with a `url` key)"},
    {"rule": "self.type != 'embedded' || !has(self.credentialsSecretRef)", "message": "an embedded ledger takes no credentials"}
]))]
pub struct LedgerSpec {
    #[serde(default)]
    pub r#type: LedgerType,
    /// Size of the embedded ledger's volume (a Kubernetes quantity, default 1Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        pattern(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    )]
    pub storage_size: Option<String>,
    /// StorageClass of the embedded ledger's volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Secret with the PostgreSQL connection URL under the key `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// How long a delivered record keeps its payload, snapshots and lineage (Go duration, default `168h`).
    /// After it only a compact row remains (idempotency key, payload hash, one-line outcome), so a duplicate
    /// is still recognised and a changed payload is still delivered as an update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub delivered_retention: Option<Duration>,
    /// What happens to the embedded ledger's PVC when the flow is deleted, after a StatefulSet's
    /// `persistentVolumeClaimRetentionPolicy`. `Retain` (the default): the PVC carries no owner reference, so it
    /// outlives the flow, and a flow re-created under the same name reuses it. `Delete`: the flow owns the PVC and
    /// garbage collection deletes it with the flow.
    #[serde(default, skip_serializing_if = "LedgerRetentionPolicy::is_retain")]
    pub retention_policy: LedgerRetentionPolicy,
}

/// Whether a flow's ledger volume outlives the flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LedgerRetentionPolicy {
    /// The PVC is kept when the flow is deleted (no owner reference); delete it by hand when the data may go.
    #[default]
    Retain,
    /// The PVC is owned by the flow and deleted with it.
    Delete,
}

impl LedgerRetentionPolicy {
    pub fn is_retain(&self) -> bool {
        *self == LedgerRetentionPolicy::Retain
    }
}

/// Worker pod overrides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Image for this flow's workers; defaults to the controller's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling, identity and metadata of the worker pods; each unset field falls back to the controller's
    /// `--worker-defaults` (the chart's `workerDefaults`).
    #[serde(flatten)]
    pub pod: WorkerPodSettings,
}

/// The worker pod settings a platform team sets, per flow or as the controller's defaults. Merging a flow's
/// settings over the defaults: a field the flow sets wins; the three maps (`nodeSelector`, `podLabels`,
/// `podAnnotations`) merge key by key with the flow's value winning; a list the flow sets, even empty, replaces the
/// default list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodSettings {
    /// ServiceAccount of the worker pods (e.g. one bound to a cloud IAM role). Its API token is still not
    /// mounted: workers never call the Kubernetes API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// Secrets with registry credentials for pulling the worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    pub image_pull_secrets: Option<Vec<super::common::SecretRef>>,
    /// Node labels a node must carry to run the worker.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the worker pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod (anti-)affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Extra annotations of the worker pods. Keys under `sync.meshline.io/` are the controller's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_annotations: BTreeMap<String, String>,
    /// Extra labels of the worker pods. The labels the controller sets (`app.kubernetes.io/` `name`,
    /// `instance`, `component`, `part-of`, `managed-by`, and keys under `sync.meshline.io/`) cannot be
    /// overridden: the Deployment's selector and the controller's caches rely on them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_labels: BTreeMap<String, String>,
}

/// What the controller and the workers report about the flow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncFlowStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Degraded, Progressing, OwnerAssigned, ContractResolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The contract revision (a ControllerRevision of the SyncContract) the stable workers run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub contract_revision: Option<String>,
    /// The latest preflight replay of a contract candidate on this flow (as the contract's status has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight: Option<super::PreflightResult>,
    /// The contract version the stable workers run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_contract_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    #[serde(default)]
    pub counters: FlowCounters,
    /// Failed records over processed records, as a decimal fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<String>,
    /// Records that failed for the first time in the SLA's window (the last hour) over record versions
    /// received in it, as a decimal fraction: what the contract's `maxFailureRate` is checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub failure_rate_sla_window: Option<String>,
    /// How the last contract change on this flow ended, and how long it took from the change to that end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contract_change: Option<ContractChangeEnd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<String>,
    /// Mean time from a record's first failure to its delivery, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mttr_seconds: Option<i64>,
    /// Approvals, rejections and replays by people, per 1,000 records, as a decimal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_interventions_per_1k: Option<String>,
    /// Age of the oldest record not yet delivered, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_seconds: Option<i64>,
    /// Each worker pod's own state (its circuit breaker, its gate, its problems), read pod by pod: these live in
    /// each process, while the counters above come from the ledger the pods share. Pods in trouble come first;
    /// at most 20 are listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub workers: Vec<WorkerPodStatus>,
    /// Worker pods read but not listed in `workers` (the list is capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_omitted: Option<i32>,
    /// The flow's exceptions as tickets: open ones, per-owner times to acknowledge and resolve, failing
    /// ticket sinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tickets: Option<super::TicketSummary>,
    /// No worker pod of the flow answering: the controller's own ticket for it, and its delivery state (the
    /// controller's outbox for the one cause no worker can report; see `controller::flow::outage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage: Option<FlowOutage>,
    /// The last reconciliation audit of the flow (CRM deals against ERP orders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<super::FlowAuditStatus>,
}

/// A contract change's end on a flow: promoted or rolled back, and the time from the change (its revision
/// stored) to that end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContractChangeEnd {
    /// The contract revision (a ControllerRevision) the change introduced.
    #[schemars(length(max = 253))]
    pub revision: String,
    #[schemars(length(max = 64))]
    pub version: String,
    /// `promoted` or `rolled_back`.
    #[schemars(length(max = 16))]
    pub outcome: String,
    /// Seconds from the revision's creation to the end.
    pub duration_seconds: i64,
    /// When it ended (RFC 3339).
    #[schemars(length(max = 64))]
    pub ended_at: String,
}

/// The controller's watch on a flow none of whose worker pods answers, kept in the status so that it survives
/// controller restarts and leader changes without a ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowOutage {
    /// Since when (RFC 3339) no worker pod has answered a status poll; absent while one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub silent_since: Option<String>,
    /// The ticket `status:NoWorkerAnswering`, once the silence lasted; kept after it resolves (the next
    /// silence reopens it under a higher version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<OutageTicket>,
    /// The last value of the annotation `sync.meshline.io/acknowledge-outage` acted on (accepted or refused),
    /// so a re-applied manifest or a later outage never takes an old acknowledgement as a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub acknowledgement: Option<String>,
}

/// The controller's ticket for a flow whose workers do not answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutageTicket {
    /// The ticket's fingerprint (as the sinks see it).
    #[schemars(length(max = 64))]
    pub fingerprint: String,
    /// `open`, `acknowledged` or `resolved`.
    #[schemars(length(max = 16))]
    pub state: String,
    /// RFC 3339, while acknowledged (cleared when a new silence reopens the ticket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub acknowledged_at: Option<String>,
    /// The roster owner who acknowledged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub acknowledged_by: Option<String>,
    /// What was seen (pod names and their errors, no record values).
    #[schemars(length(max = 1024))]
    pub summary: String,
    /// RFC 3339.
    #[schemars(length(max = 64))]
    pub opened_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub resolved_at: Option<String>,
    /// Bumped on every change a sink should see (opened, escalated, resolved).
    pub version: i64,
    /// The roster's owner id it is with now.
    #[schemars(length(max = 63))]
    pub owner: String,
    pub role: super::OwnerRole,
    pub escalation_step: i32,
    #[serde(default)]
    pub page: bool,
    /// One entry per ticket sink the ticket was routed to, at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub deliveries: Vec<OutageDelivery>,
}

/// Where one ticket sink stands with the outage ticket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutageDelivery {
    #[schemars(length(max = 63))]
    pub sink: String,
    /// The last version the sink accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_version: Option<i64>,
    /// A send of this version began and did not succeed (the controller may have stopped mid-send): it is
    /// resent under the same idempotency key, and Jira and GitHub look for their copy first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt_version: Option<i64>,
    /// What the sink answered last (its issue key or number), as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub sink_ref: Option<String>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub attempts: i32,
    /// The sink's last error (no credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
    /// Not before this time (RFC 3339) after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub next_attempt_at: Option<String>,
}

/// One worker pod as the last status poll read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodStatus {
    /// The pod's name.
    #[schemars(length(max = 253))]
    pub pod: String,
    /// Whether the pod passes its readiness probe. A pod that does not is still read (a worker that cannot start
    /// says why on `/status`).
    #[serde(default)]
    pub ready: bool,
    /// `Running` (it answered with its numbers), `NotStarted` (it answered that its pipeline could not start) or
    /// `Unreachable` (it did not answer; see `message`).
    #[schemars(length(max = 16))]
    pub state: String,
    /// Since when this pod's circuit breaker is open (RFC 3339), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub circuit_breaker_open_since: Option<String>,
    /// Why this pod processes nothing right now, if it doesn't.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub paused: Option<String>,
    /// The kinds of the problems this pod reports (`DiskPressure`, `LedgerUnavailable`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(max = 128)))]
    pub problems: Vec<String>,
    /// The breaker's reason, the startup error, or why the pod could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub message: Option<String>,
}

/// Record counts since the ledger was created.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowCounters {
    #[serde(default)]
    pub received: i64,
    #[serde(default)]
    pub delivered: i64,
    #[serde(default)]
    pub failed: i64,
    #[serde(default)]
    pub retried: i64,
    #[serde(default)]
    pub dead_lettered: i64,
    #[serde(default)]
    pub held: i64,
    /// Late revisions refused because a newer one (by the contract's ordering field) was already stored.
    #[serde(default)]
    pub stale: i64,
}

/// Delivery latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    #[serde(default)]
    pub p50_ms: i64,
    #[serde(default)]
    pub p99_ms: i64,
}

/// Progress of a canary rollout of a contract candidate on this flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// The candidate revision (a ControllerRevision of the contract) the canary track runs.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub revision: String,
    /// The candidate's contract version.
    #[schemars(length(max = 64))]
    pub version: String,
    /// `Progressing`, `Paused`, `Promoting`, `Promoted`, `Aborting` or `Aborted`.
    #[schemars(length(max = 16))]
    pub phase: String,
    /// Index of the current step in `spec.rollout.canary.steps`.
    #[serde(default)]
    pub step: i32,
    /// Bucket weight the canary track is asked to take (0 to 100).
    #[serde(default)]
    pub weight: i32,
    /// Bucket weight every worker of both tracks has reported applying; a step's analysis starts only once it
    /// equals `weight`.
    #[serde(default)]
    pub applied_weight: i32,
    /// When the current step's weight was applied by every worker (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub step_started_at: Option<String>,
    /// Failed measurements so far in this rollout (the analysis' `failureLimit` bounds them).
    #[serde(default)]
    pub failed_measurements: i32,
    /// Measurements in a row that could not be taken.
    #[serde(default)]
    pub consecutive_errors: i32,
    /// Measurements at the current step that passed.
    #[serde(default)]
    pub passed_measurements: i32,
    /// The latest measurements, newest last (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub measurements: Vec<CanaryMeasurement>,
    /// Why the rollout is paused, was aborted or promoted (`FailureLimitReached`, `PausedByUser`,
    /// `CanaryNeedsSharedLedger`, `PromotedByUser`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// The id of the last rollout command (annotation `sync.meshline.io/rollout-command`) acted on, so a command
    /// is acted on once however often the manifest is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub last_command: Option<String>,
}

/// One analysis measurement: the canary's and the stable track's measures over the same window, from the
/// ledger the tracks share.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryMeasurement {
    /// When the measurement was taken (RFC 3339).
    #[schemars(length(max = 64))]
    pub at: String,
    /// The step it was taken at.
    #[serde(default)]
    pub step: i32,
    /// `Passed`, `Failed`, `Inconclusive` (too few records, or the stable track fails as much) or `Error`.
    #[schemars(length(max = 16))]
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<TrackMeasures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<TrackMeasures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub message: Option<String>,
}

/// What one revision's workers did with records over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackMeasures {
    /// Records that reached an outcome (delivered, retry scheduled, dead-lettered, held).
    #[serde(default)]
    pub records: i64,
    #[serde(default)]
    pub delivered: i64,
    /// Delivery attempts that failed (retry scheduled or dead-lettered).
    #[serde(default)]
    pub failed: i64,
    #[serde(default)]
    pub dead_lettered: i64,
    #[serde(default)]
    pub held: i64,
    /// `failed / records`, as a decimal fraction.
    #[schemars(length(max = 12))]
    pub failure_rate: String,
    /// `deadLettered / records`, as a decimal fraction.
    #[schemars(length(max = 12))]
    pub dead_letter_rate: String,
    /// 99th percentile of delivery latency in milliseconds (upper bound of its histogram bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<i64>,
}
