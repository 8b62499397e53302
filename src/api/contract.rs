//! `SyncContract`: the versioned, executable agreement for one exchange between a CRM and an ERP.

use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Condition;

/// What a record must look like, which business rules it must pass and what the ERP receives. Everything
/// whose change must be versioned, replayed and canaried lives here.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sync.meshline.io",
    version = "v1alpha1",
    kind = "SyncContract",
    doc = "A versioned, executable agreement for one CRM→ERP exchange: field schema, CEL business rules, mapping, SLA, compatibility mode and sign-offs.",
    namespaced,
    status = "SyncContractStatus",
    shortname = "sc",
    shortname = "contract",
    category = "meshline",
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source.entity"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target.entity"}"#,
    printcolumn = r#"{"name":"Compatibility","type":"string","jsonPath":".spec.compatibility"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.currentVersion"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.fields.all(f, self.fields.exists_one(g, g.name == f.name))", "message": "field names must be unique"},
    {"rule": "!has(self.rules) || self.rules.all(r, self.rules.exists_one(q, q.name == r.name))", "message": "rule names must be unique"},
    {"rule": "self.mapping.fields.all(f, self.mapping.fields.exists_one(g, g.target == f.target))", "message": "mapping targets must be unique"},
    {"rule": "!has(self.ordering) || self.fields.exists(f, f.name == self.ordering.field && (f.type == 'datetime' || f.type == 'integer') && has(f.required) && f.required)", "message": "ordering.field must name a declared, required datetime or integer field"}
]))]
pub struct SyncContractSpec {
    /// Semantic version of this contract content. A breaking change under the compatibility mode needs a new
    /// major version; any schema change needs at least a new minor version.
    #[schemars(length(min = 5, max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^(0|[1-9][0-9]*)\\\\.(0|[1-9][0-9]*)\\\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\\\\+[0-9A-Za-z.-]+)?$')",
        "message": "version must be semver (MAJOR.MINOR.PATCH)"
    }]))]
    pub version: String,
    /// The CRM entity records come from.
    pub source: EntityRef,
    /// The ERP entity the payload becomes.
    pub target: EntityRef,
    /// Field-level schema of the source record. Nested fields use paths: `billingAddress.city` for an object
    /// member, `lineItems[].sku` for a member of each element of an array of objects.
    #[schemars(length(min = 1, max = 200))]
    pub fields: Vec<FieldSpec>,
    /// Lookup tables the rules and the mapping read (for example the ERP pricebook). The flow binds each one
    /// to a real system; the contract declares its shape so expressions can be checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub lookups: Vec<LookupSpec>,
    /// Business rules in CEL. Each must evaluate to `true` for a record to pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub rules: Vec<RuleSpec>,
    /// How an accepted record becomes the ERP payload.
    pub mapping: MappingSpec,
    /// Which field of the source record orders its revisions (e.g. Salesforce's `systemModstamp`). With it,
    /// a revision that arrives after a newer one (webhooks arrive out of order, outbound messages are retried
    /// for hours) is recorded as stale and never delivered. Without it, the last revision to arrive wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<OrderingSpec>,
    /// Service level the flow is held to; breaking it makes the flow Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<SlaSpec>,
    /// How a new version must relate to the previous one, as in a schema registry.
    #[serde(default)]
    pub compatibility: CompatibilityMode,
    /// Who approved which version. The roster's source and sink owners sign off a version before it rolls out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub sign_offs: Vec<SignOff>,
}

/// A system and one of its entities, e.g. `salesforce` / `Opportunity` or `netsuite` / `salesOrder`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityRef {
    /// The system's name, e.g. salesforce, hubspot, netsuite, odoo.
    #[schemars(length(min = 1, max = 63))]
    pub system: String,
    /// The entity (object, record type or model) in that system.
    #[schemars(length(min = 1, max = 128))]
    pub entity: String,
}

/// The type of a field in the source record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FieldType {
    String,
    Integer,
    /// An exact decimal (money): a JSON number or a numeric string, never handled as a float.
    Decimal,
    Boolean,
    /// An RFC 3339 full date (`2026-11-27`).
    Date,
    /// An RFC 3339 date-time with offset (`2026-11-27T10:00:00Z`).
    Datetime,
    /// A string from `enumValues`.
    Enum,
    Object,
    Array,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Decimal => "decimal",
            FieldType::Boolean => "boolean",
            FieldType::Date => "date",
            FieldType::Datetime => "datetime",
            FieldType::Enum => "enum",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }
}

/// One field of the source record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type == 'enum' ? (has(self.enumValues) && size(self.enumValues) > 0) : !has(self.enumValues)", "message": "enumValues is required for type enum and only allowed there"},
    {"rule": "self.type == 'array' ? has(self.items) : !has(self.items)", "message": "items is required for type array and only allowed there"},
    {"rule": "!has(self.pattern) || self.type == 'string'", "message": "pattern applies to string fields only"},
    {"rule": "!has(self.maxLength) || self.type == 'string' || self.type == 'array'", "message": "maxLength applies to string and array fields only"},
    {"rule": "(!has(self.minimum) && !has(self.maximum)) || self.type == 'integer' || self.type == 'decimal'", "message": "minimum and maximum apply to integer and decimal fields only"}
]))]
pub struct FieldSpec {
    /// Path of the field: `amount`, `billingAddress.city`, `lineItems[].sku`.
    #[schemars(
        length(min = 1, max = 128),
        pattern(r"^[A-Za-z_][A-Za-z0-9_]*(\[\])?(\.[A-Za-z_][A-Za-z0-9_]*(\[\])?)*$")
    )]
    pub name: String,
    pub r#type: FieldType,
    /// The element type of an array field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<FieldType>,
    /// A record without this field is rejected.
    #[serde(default)]
    pub required: bool,
    /// Allowed values of an enum field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100), inner(length(max = 128)))]
    pub enum_values: Option<Vec<String>>,
    /// A regular expression (RE2 syntax, unanchored unless you anchor it) a string field must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub pattern: Option<String>,
    /// Smallest allowed value, as a decimal string (exact, e.g. "0" or "0.01").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40), pattern(r"^-?[0-9]+(\.[0-9]+)?$"))]
    pub minimum: Option<String>,
    /// Largest allowed value, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40), pattern(r"^-?[0-9]+(\.[0-9]+)?$"))]
    pub maximum: Option<String>,
    /// Longest allowed string (in characters) or array (in elements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10_000_000))]
    pub max_length: Option<u32>,
    /// Personal data: redacted in snapshots, logs, error messages and tickets.
    #[serde(default)]
    pub pii: bool,
    /// What the field means, for the people who read the contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// The field that orders a record's revisions: the source system's modification stamp or version number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderingSpec {
    /// Path of a declared, required `datetime` or `integer` field at the top level or inside objects (not
    /// inside an array): `systemModstamp`, `properties.hs_lastmodifieddate`, `version`.
    #[schemars(
        length(min = 1, max = 128),
        pattern(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    )]
    pub field: String,
}

/// The shape of a lookup table the rules read, keyed by a string (e.g. the pricebook keyed by SKU).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LookupSpec {
    /// Name the expressions use, e.g. `pricebook` in `pricebook[line.sku].unitPrice`.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z][A-Za-z0-9_]*$"))]
    pub name: String,
    /// The fields of each entry.
    #[schemars(length(min = 1, max = 50))]
    pub fields: Vec<LookupField>,
}

/// One field of a lookup entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LookupField {
    #[schemars(length(min = 1, max = 63), pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    pub r#type: FieldType,
}

/// What happens to a record that breaks a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RuleAction {
    /// The record goes to the dead letters with the rule's message.
    #[default]
    Reject,
    /// The record waits until a person in `approverRole` approves or rejects it.
    Hold,
    /// The record goes on; the warning is kept in its lineage.
    Warn,
}

/// A business rule: a CEL expression over `record`, the lookups, `contract.version` and `flow.name`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.action == 'hold' ? has(self.approverRole) : !has(self.approverRole)", "message": "approverRole is required for action hold and only allowed there"}
]))]
pub struct RuleSpec {
    /// Stable name, used by routes, metrics and tickets.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// CEL expression that is `true` when the record passes.
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,
    /// Explanation shown to the people who handle a failing record.
    #[schemars(length(min = 1, max = 1024))]
    pub message: String,
    #[serde(default)]
    pub action: RuleAction,
    /// The role that approves a held record (e.g. `finance`, `sales-ops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub approver_role: Option<String>,
}

/// How the ERP payload is built from an accepted record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MappingSpec {
    /// CEL expression for the external id: the idempotency key the sink upserts by. It must be stable for the
    /// same source record.
    #[schemars(length(min = 1, max = 4096))]
    pub external_id: String,
    /// One CEL expression per target field.
    #[schemars(length(min = 1, max = 200))]
    pub fields: Vec<MappingField>,
}

/// One field of the target payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MappingField {
    /// Path in the payload, dot-separated for nested objects (`entity.id`).
    #[schemars(
        length(min = 1, max = 256),
        pattern(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    )]
    pub target: String,
    /// CEL expression for the value. A plain `record.<path>` is copied without running the interpreter.
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,
    /// Leave the target out of the payload when the expression's source is absent, instead of failing.
    #[serde(default)]
    pub optional: bool,
}

/// Service level objectives of the exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlaSpec {
    /// Longest acceptable time from receipt to delivery (Go duration, e.g. `15m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub max_delivery_latency: Option<Duration>,
    /// Highest acceptable share of failed records, as a decimal fraction ("0.01" is 1 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12), pattern(r"^(0(\.[0-9]+)?|1(\.0+)?)$"))]
    pub max_failure_rate: Option<String>,
}

/// Compatibility between consecutive contract versions, with schema-registry semantics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum CompatibilityMode {
    /// The new version accepts every record the old one accepted (consumers upgrade first).
    #[default]
    Backward,
    /// The old version accepts every record the new one accepts (producers upgrade first).
    Forward,
    /// Both BACKWARD and FORWARD.
    Full,
    /// No check; every change is allowed with a version bump.
    None,
}

/// An approval of one contract version by one owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignOff {
    /// The owner's id in the OwnershipRoster. The gate counts a sign-off by the source owner and the sink owner
    /// the roster assigns to each flow bound to the contract.
    #[schemars(length(min = 1, max = 63))]
    pub owner: String,
    /// The version that was approved.
    #[schemars(length(min = 5, max = 64))]
    pub version: String,
    /// The content that was approved (`sha256:` and 64 hex digits, as `meshline contract diff` and the
    /// contract's status print it). With it, a sign-off approves exactly that content: one written for other
    /// content does not count. Without it, the sign-off approves whatever content carries the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71), pattern(r"^sha256:[0-9a-f]{64}$"))]
    pub content_hash: Option<String>,
    /// The roster role the approver signs as (informational: the gate matches owners, not roles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<super::common::OwnerRole>,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub approved_at: Option<String>,
}

/// What the controller observed about the contract.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncContractStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Compiled, Compatible, SignedOff, PreflightPassed, and Ready (the spec is the active revision).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The version the bound flows' workers run (the active revision's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub current_version: Option<String>,
    /// The ControllerRevision the bound flows run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub active_revision: Option<String>,
    /// The revision going through the gates, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub candidate_revision: Option<String>,
    /// Every revision the controller has kept or judged, oldest first (bounded: superseded and rejected ones
    /// beyond the history limit are pruned, never the active one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub revisions: Vec<ContractRevision>,
    /// The candidate's preflight replay on each bound flow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub preflight: Vec<PreflightResult>,
}

/// Where a revision stands. A revision moves Pending → Preflight → Active → Superseded, or ends Rejected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RevisionState {
    /// Passed the compatibility check; waiting for sign-offs.
    #[default]
    Pending,
    /// Signed off; preflight replay Jobs are running on the bound flows.
    Preflight,
    /// Failed a gate (see `message`); never reaches workers.
    Rejected,
    /// Rolled out to part of the record buckets.
    Canary,
    /// What the bound flows' workers run.
    Active,
    /// Was active; replaced by a newer revision.
    Superseded,
}

impl RevisionState {
    pub fn as_str(self) -> &'static str {
        match self {
            RevisionState::Pending => "Pending",
            RevisionState::Preflight => "Preflight",
            RevisionState::Rejected => "Rejected",
            RevisionState::Canary => "Canary",
            RevisionState::Active => "Active",
            RevisionState::Superseded => "Superseded",
        }
    }
}

/// One immutable revision of a contract: a version and its content, kept as a ControllerRevision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContractRevision {
    /// The ControllerRevision that holds the spec (none for a revision rejected before it was stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    #[schemars(length(max = 64))]
    pub version: String,
    /// SHA-256 of the canonical spec content (sign-offs left out), so a content change without a version change
    /// is caught.
    #[schemars(length(max = 71))]
    pub content_hash: String,
    #[serde(default)]
    pub state: RevisionState,
    /// When the revision entered its state (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub state_since: Option<String>,
    /// Compatibility verdict against the active revision (`initial`, `compatible`, `breaking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub compatibility: Option<String>,
    /// The owners whose sign-off counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(max = 63)))]
    pub signed_off_by: Vec<String>,
    /// The reason of the gate that decided the state (`IncompatibleChange`, `PreflightFailed`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reason: Option<String>,
    /// Why the revision is where it is (the failed gate's reason for a rejected one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub message: Option<String>,
}

/// The replay of a flow's recent records through the candidate next to the active revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreflightResult {
    /// The bound flow.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub flow: String,
    /// The candidate revision replayed.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub revision: String,
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub version: String,
    /// Running, Passed or Failed.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub phase: String,
    /// The Job that replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub job: Option<String>,
    #[serde(default)]
    pub records: i64,
    #[serde(default)]
    pub newly_rejected: i64,
    #[serde(default)]
    pub newly_held: i64,
    #[serde(default)]
    pub newly_accepted: i64,
    /// Records accepted by both revisions whose ERP payload differs.
    #[serde(default)]
    pub changed_outputs: i64,
    /// The target paths that changed most, as `path: records`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 300)))]
    pub changed_paths: Vec<String>,
    /// Why it failed, or a one-line summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub finished_at: Option<String>,
}
