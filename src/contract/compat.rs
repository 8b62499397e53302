//! Compatibility between two versions of a contract, with schema-registry meaning, and the semver rules that
//! follow from it.
//!
//! Every change between the old and the new spec is classified by its effect on the set of records the
//! contract accepts: it *widens* the set (a bound loosened, a required field made optional), *narrows* it (a
//! rule added, an enum value removed), does *both* (a type changed to an unrelated one, an expression edited:
//! expressions cannot be compared statically, so an edited one may accept and reject anything), or has *no*
//! effect (a description). Payload changes count as well: a removed or edited mapping target changes what the
//! ERP receives for the same record, and a new external id expression would duplicate every order.
//! The modes then read as in a schema registry:
//! - BACKWARD: the new version accepts every record the old one accepted, so narrowing is breaking;
//! - FORWARD: the old version accepts every record the new one accepts, so widening is breaking;
//! - FULL: both; NONE: nothing is breaking.
//!
//! A transition is judged under the mode of the old version when the mode itself changes, so relaxing the mode
//! and breaking the contract cannot happen in the same version. Breaking changes need a new major version, any
//! other schema change a new minor version, any content change at least a new patch version; the content is
//! identified by [`content_hash`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::api::{CompatibilityMode, FieldSpec, FieldType, RuleAction, SyncContractSpec};

/// SHA-256 of a spec's canonical content, as `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(String);

impl ContentHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Hashes the spec without its sign-offs (approving a version does not change it). The JSON is canonical:
/// object keys sorted, no whitespace, defaults written out by the typed spec, so the same content always has
/// the same hash whatever the YAML looked like.
pub fn content_hash(spec: &SyncContractSpec) -> ContentHash {
    let mut value = serde_json::to_value(spec).expect("a contract spec serialises to JSON");
    if let serde_json::Value::Object(map) = &mut value {
        map.remove("signOffs");
    }
    let mut text = String::new();
    canonical(&value, &mut text);
    ContentHash(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(text.as_bytes()))
    ))
}

fn canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                canonical(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// What a change does to the set of accepted records (and payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    None,
    Widens,
    Narrows,
    Both,
}

impl Effect {
    pub fn label(self) -> &'static str {
        match self {
            Effect::None => "none",
            Effect::Widens => "widens",
            Effect::Narrows => "narrows",
            Effect::Both => "both",
        }
    }

    /// Whether a change with this effect breaks `mode`.
    pub fn breaks(self, mode: CompatibilityMode) -> bool {
        match mode {
            CompatibilityMode::Backward => matches!(self, Effect::Narrows | Effect::Both),
            CompatibilityMode::Forward => matches!(self, Effect::Widens | Effect::Both),
            CompatibilityMode::Full => self != Effect::None,
            CompatibilityMode::None => false,
        }
    }
}

impl Serialize for Effect {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

/// The kinds of change, with stable labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    FieldAdded,
    FieldRemoved,
    FieldMadeRequired,
    FieldMadeOptional,
    TypeWidened,
    TypeNarrowed,
    TypeChanged,
    EnumValuesAdded,
    EnumValuesRemoved,
    PatternAdded,
    PatternRemoved,
    PatternChanged,
    BoundTightened,
    BoundLoosened,
    PiiChanged,
    DescriptionChanged,
    LookupAdded,
    LookupRemoved,
    LookupChanged,
    RuleAdded,
    RuleRemoved,
    RuleExpressionChanged,
    RuleActionChanged,
    RuleMessageChanged,
    ApproverRoleChanged,
    MappingTargetAdded,
    MappingTargetRemoved,
    MappingExpressionChanged,
    MappingOptionalChanged,
    ExternalIdChanged,
    SourceChanged,
    TargetChanged,
    SlaChanged,
    OrderingChanged,
    CompatibilityModeChanged,
    /// Content changed without any of the above (fields or rules reordered, say).
    OtherContentChanged,
}

impl ChangeKind {
    pub fn label(self) -> &'static str {
        match self {
            ChangeKind::FieldAdded => "field_added",
            ChangeKind::FieldRemoved => "field_removed",
            ChangeKind::FieldMadeRequired => "field_made_required",
            ChangeKind::FieldMadeOptional => "field_made_optional",
            ChangeKind::TypeWidened => "type_widened",
            ChangeKind::TypeNarrowed => "type_narrowed",
            ChangeKind::TypeChanged => "type_changed",
            ChangeKind::EnumValuesAdded => "enum_values_added",
            ChangeKind::EnumValuesRemoved => "enum_values_removed",
            ChangeKind::PatternAdded => "pattern_added",
            ChangeKind::PatternRemoved => "pattern_removed",
            ChangeKind::PatternChanged => "pattern_changed",
            ChangeKind::BoundTightened => "bound_tightened",
            ChangeKind::BoundLoosened => "bound_loosened",
            ChangeKind::PiiChanged => "pii_changed",
            ChangeKind::DescriptionChanged => "description_changed",
            ChangeKind::LookupAdded => "lookup_added",
            ChangeKind::LookupRemoved => "lookup_removed",
            ChangeKind::LookupChanged => "lookup_changed",
            ChangeKind::RuleAdded => "rule_added",
            ChangeKind::RuleRemoved => "rule_removed",
            ChangeKind::RuleExpressionChanged => "rule_expression_changed",
            ChangeKind::RuleActionChanged => "rule_action_changed",
            ChangeKind::RuleMessageChanged => "rule_message_changed",
            ChangeKind::ApproverRoleChanged => "approver_role_changed",
            ChangeKind::MappingTargetAdded => "mapping_target_added",
            ChangeKind::MappingTargetRemoved => "mapping_target_removed",
            ChangeKind::MappingExpressionChanged => "mapping_expression_changed",
            ChangeKind::MappingOptionalChanged => "mapping_optional_changed",
            ChangeKind::ExternalIdChanged => "external_id_changed",
            ChangeKind::SourceChanged => "source_changed",
            ChangeKind::TargetChanged => "target_changed",
            ChangeKind::SlaChanged => "sla_changed",
            ChangeKind::OrderingChanged => "ordering_changed",
            ChangeKind::CompatibilityModeChanged => "compatibility_mode_changed",
            ChangeKind::OtherContentChanged => "other_content_changed",
        }
    }
}

impl Serialize for ChangeKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

/// One classified change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// Where, by name: `spec.fields[amount].minimum`, `spec.rules[price-tolerance].expression`.
    pub path: String,
    pub kind: ChangeKind,
    pub detail: String,
    pub effect: Effect,
    /// Breaking under the mode the transition is judged by.
    pub breaking: bool,
    /// A change to what the contract does (needs at least a minor version), not only to its documentation.
    pub schema_change: bool,
}

/// The size of a version step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bump {
    None,
    Patch,
    Minor,
    Major,
}

impl Bump {
    pub fn label(self) -> &'static str {
        match self {
            Bump::None => "none",
            Bump::Patch => "patch",
            Bump::Minor => "minor",
            Bump::Major => "major",
        }
    }
}

impl Serialize for Bump {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

/// Why the version step does not fit the changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionProblem {
    InvalidVersion { which: &'static str, value: String },
    ContentChangedWithoutVersionChange,
    VersionNotIncreased { old: String, new: String },
    BreakingChangeWithoutMajorBump { breaking: usize },
    SchemaChangeWithoutMinorBump,
}

impl VersionProblem {
    pub fn label(&self) -> &'static str {
        match self {
            VersionProblem::InvalidVersion { .. } => "invalid_version",
            VersionProblem::ContentChangedWithoutVersionChange => {
                "content_changed_without_version_change"
            }
            VersionProblem::VersionNotIncreased { .. } => "version_not_increased",
            VersionProblem::BreakingChangeWithoutMajorBump { .. } => {
                "breaking_change_without_major_bump"
            }
            VersionProblem::SchemaChangeWithoutMinorBump => "schema_change_without_minor_bump",
        }
    }
}

impl fmt::Display for VersionProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionProblem::InvalidVersion { which, value } => {
                write!(f, "the {which} version {value:?} is not a semantic version")
            }
            VersionProblem::ContentChangedWithoutVersionChange => f.write_str(
                "the content changed but the version did not; a version never changes content",
            ),
            VersionProblem::VersionNotIncreased { old, new } => {
                write!(f, "the version goes from {old} to {new}; it must increase")
            }
            VersionProblem::BreakingChangeWithoutMajorBump { breaking } => {
                write!(f, "{breaking} breaking change(s) need a new major version")
            }
            VersionProblem::SchemaChangeWithoutMinorBump => {
                f.write_str("schema changes need at least a new minor version")
            }
        }
    }
}

impl Serialize for VersionProblem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("VersionProblem", 2)?;
        s.serialize_field("code", self.label())?;
        s.serialize_field("message", &self.to_string())?;
        s.end()
    }
}

/// The comparison of two versions of a contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompatReport {
    pub old_version: String,
    pub new_version: String,
    /// The mode the transition is judged by.
    #[serde(serialize_with = "mode_label")]
    pub mode: CompatibilityMode,
    pub old_hash: ContentHash,
    pub new_hash: ContentHash,
    pub changes: Vec<Change>,
    /// The smallest version step the changes need.
    pub required_bump: Bump,
    /// The version step taken.
    pub actual_bump: Bump,
    pub problems: Vec<VersionProblem>,
}

fn mode_label<S: Serializer>(mode: &CompatibilityMode, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(mode_name(*mode))
}

pub fn mode_name(mode: CompatibilityMode) -> &'static str {
    match mode {
        CompatibilityMode::Backward => "BACKWARD",
        CompatibilityMode::Forward => "FORWARD",
        CompatibilityMode::Full => "FULL",
        CompatibilityMode::None => "NONE",
    }
}

impl CompatReport {
    /// Some change breaks the mode.
    pub fn is_breaking(&self) -> bool {
        self.changes.iter().any(|c| c.breaking)
    }

    /// The new version may replace the old one: every breaking change comes with a major version, and so on.
    pub fn is_allowed(&self) -> bool {
        self.problems.is_empty()
    }

    /// `unchanged`, `compatible` or `breaking`, as `ContractRevision.compatibility` records it.
    pub fn verdict(&self) -> &'static str {
        if self.old_hash == self.new_hash {
            "unchanged"
        } else if self.is_breaking() {
            "breaking"
        } else {
            "compatible"
        }
    }
}

/// Classifies every change from `old` to `new` and checks the version step.
pub fn diff(old: &SyncContractSpec, new: &SyncContractSpec) -> CompatReport {
    let mode = if old.compatibility == new.compatibility {
        new.compatibility
    } else {
        old.compatibility
    };
    let mut changes = Changes {
        mode,
        list: Vec::new(),
    };
    changes.entities(old, new);
    changes.fields(&old.fields, &new.fields);
    changes.lookups(old, new);
    changes.rules(old, new);
    changes.mapping(old, new);
    if old.sla != new.sla {
        changes.push(
            "spec.sla".into(),
            ChangeKind::SlaChanged,
            "the service level changed".into(),
            Effect::None,
            false,
        );
    }
    changes.ordering(old, new);
    if old.compatibility != new.compatibility {
        changes.push(
            "spec.compatibility".into(),
            ChangeKind::CompatibilityModeChanged,
            format!(
                "{} → {} (applies from the next version)",
                mode_name(old.compatibility),
                mode_name(new.compatibility)
            ),
            Effect::None,
            true,
        );
    }
    let old_hash = content_hash(old);
    let new_hash = content_hash(new);
    if changes.list.is_empty() && old_hash != new_hash {
        changes.push(
            "spec".into(),
            ChangeKind::OtherContentChanged,
            "the content changed (order or formatting of declarations)".into(),
            Effect::None,
            false,
        );
    }
    let changes = changes.list;

    let required_bump = if changes.iter().any(|c| c.breaking) {
        Bump::Major
    } else if changes.iter().any(|c| c.schema_change) {
        Bump::Minor
    } else if old_hash != new_hash {
        Bump::Patch
    } else {
        Bump::None
    };
    let mut problems = Vec::new();
    let parsed = (
        semver::Version::parse(&old.version),
        semver::Version::parse(&new.version),
    );
    let actual_bump = match &parsed {
        (Ok(o), Ok(n)) => bump(o, n),
        _ => Bump::None,
    };
    match parsed {
        (Err(_), _) => problems.push(VersionProblem::InvalidVersion {
            which: "old",
            value: old.version.clone(),
        }),
        (_, Err(_)) => problems.push(VersionProblem::InvalidVersion {
            which: "new",
            value: new.version.clone(),
        }),
        (Ok(o), Ok(n)) => {
            if old_hash != new_hash && o == n {
                problems.push(VersionProblem::ContentChangedWithoutVersionChange);
            } else if n < o {
                problems.push(VersionProblem::VersionNotIncreased {
                    old: old.version.clone(),
                    new: new.version.clone(),
                });
            } else if actual_bump < required_bump {
                match required_bump {
                    Bump::Major => problems.push(VersionProblem::BreakingChangeWithoutMajorBump {
                        breaking: changes.iter().filter(|c| c.breaking).count(),
                    }),
                    Bump::Minor => problems.push(VersionProblem::SchemaChangeWithoutMinorBump),
                    _ => {}
                }
            }
        }
    }
    CompatReport {
        old_version: old.version.clone(),
        new_version: new.version.clone(),
        mode,
        old_hash,
        new_hash,
        changes,
        required_bump,
        actual_bump,
        problems,
    }
}

fn bump(old: &semver::Version, new: &semver::Version) -> Bump {
    if new <= old {
        Bump::None
    } else if new.major != old.major {
        Bump::Major
    } else if new.minor != old.minor {
        Bump::Minor
    } else {
        Bump::Patch
    }
}

struct Changes {
    mode: CompatibilityMode,
    list: Vec<Change>,
}

/// Type changes whose new type accepts every value of the old one.
fn type_effect(old: FieldType, new: FieldType) -> (ChangeKind, Effect) {
    use FieldType::*;
    match (old, new) {
        (Integer, Decimal) | (Enum, String) | (Date, String) | (Datetime, String) => {
            (ChangeKind::TypeWidened, Effect::Widens)
        }
        (Decimal, Integer) | (String, Enum) | (String, Date) | (String, Datetime) => {
            (ChangeKind::TypeNarrowed, Effect::Narrows)
        }
        _ => (ChangeKind::TypeChanged, Effect::Both),
    }
}

/// Strictness of a rule action: a failing reject rule stops a record, a hold rule parks it, a warn rule lets it go.
fn strictness(action: RuleAction) -> u8 {
    match action {
        RuleAction::Reject => 2,
        RuleAction::Hold => 1,
        RuleAction::Warn => 0,
    }
}

fn action_name(action: RuleAction) -> &'static str {
    match action {
        RuleAction::Reject => "reject",
        RuleAction::Hold => "hold",
        RuleAction::Warn => "warn",
    }
}

/// Two expressions are the same if they parse to the same tree, whatever their whitespace (YAML folding
/// changes it freely).
fn same_expression(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    use kube::core::cel::cel::parser::Parser;
    let parse = |s: &str| {
        std::panic::catch_unwind(|| Parser::new().parse(s).ok())
            .ok()
            .flatten()
    };
    if a.len() > 4096 || b.len() > 4096 {
        return false;
    }
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.split_whitespace().eq(b.split_whitespace()),
    }
}

impl Changes {
    fn push(
        &mut self,
        path: String,
        kind: ChangeKind,
        detail: String,
        effect: Effect,
        schema_change: bool,
    ) {
        let breaking = effect.breaks(self.mode);
        self.list.push(Change {
            path,
            kind,
            detail,
            effect,
            breaking,
            schema_change,
        });
    }

    /// Declaring or dropping an ordering field changes which revisions are delivered, not which records are
    /// accepted (a schema change). Moving it to another field breaks every mode but NONE: the ledger keeps
    /// each record's last ordering value and would compare values of the old field with the new one's.
    fn ordering(&mut self, old: &SyncContractSpec, new: &SyncContractSpec) {
        let field = |spec: &SyncContractSpec| spec.ordering.as_ref().map(|o| o.field.clone());
        let type_of = |spec: &SyncContractSpec, name: &str| {
            spec.fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.r#type)
        };
        let (before, after) = (field(old), field(new));
        let (detail, effect) = match (&before, &after) {
            (None, None) => return,
            (Some(b), Some(a)) if b == a && type_of(old, b) == type_of(new, a) => return,
            (None, Some(a)) => (
                format!("revisions are now ordered by {a}; older ones are no longer delivered"),
                Effect::None,
            ),
            (Some(b), None) => (
                format!("revisions were ordered by {b}; now the last to arrive wins"),
                Effect::None,
            ),
            (Some(b), Some(a)) => (
                format!(
                    "revisions were ordered by {b} and now by {a}; stored ordering values would be compared \
                     with the new field's"
                ),
                Effect::Both,
            ),
        };
        self.push(
            "spec.ordering.field".into(),
            ChangeKind::OrderingChanged,
            detail,
            effect,
            true,
        );
    }

    fn entities(&mut self, old: &SyncContractSpec, new: &SyncContractSpec) {
        if old.source != new.source {
            let detail = format!(
                "{}/{} → {}/{}",
                old.source.system, old.source.entity, new.source.system, new.source.entity
            );
            self.push(
                "spec.source".into(),
                ChangeKind::SourceChanged,
                detail,
                Effect::Both,
                true,
            );
        }
        if old.target != new.target {
            let detail = format!(
                "{}/{} → {}/{}",
                old.target.system, old.target.entity, new.target.system, new.target.entity
            );
            self.push(
                "spec.target".into(),
                ChangeKind::TargetChanged,
                detail,
                Effect::Both,
                true,
            );
        }
    }

    fn fields(&mut self, old: &[FieldSpec], new: &[FieldSpec]) {
        let old_by: BTreeMap<&str, &FieldSpec> = old.iter().map(|f| (f.name.as_str(), f)).collect();
        let new_by: BTreeMap<&str, &FieldSpec> = new.iter().map(|f| (f.name.as_str(), f)).collect();
        for f in old.iter().filter(|f| !new_by.contains_key(f.name.as_str())) {
            let (effect, what) = if f.required {
                (Effect::Widens, "required")
            } else {
                (Effect::None, "optional")
            };
            self.push(
                format!("spec.fields[{}]", f.name),
                ChangeKind::FieldRemoved,
                format!("{what} {} field removed", f.r#type.as_str()),
                effect,
                true,
            );
        }
        for f in new.iter().filter(|f| !old_by.contains_key(f.name.as_str())) {
            let (effect, what) = if f.required {
                (Effect::Narrows, "required")
            } else {
                (Effect::None, "optional")
            };
            self.push(
                format!("spec.fields[{}]", f.name),
                ChangeKind::FieldAdded,
                format!("{what} {} field added", f.r#type.as_str()),
                effect,
                true,
            );
        }
        for n in new {
            if let Some(o) = old_by.get(n.name.as_str()) {
                self.field(o, n);
            }
        }
    }

    fn field(&mut self, o: &FieldSpec, n: &FieldSpec) {
        let at = |attr: &str| format!("spec.fields[{}].{attr}", n.name);
        let mut type_changed = false;
        if o.r#type != n.r#type {
            let (kind, effect) = type_effect(o.r#type, n.r#type);
            self.push(
                at("type"),
                kind,
                format!("{} → {}", o.r#type.as_str(), n.r#type.as_str()),
                effect,
                true,
            );
            type_changed = true;
        } else if o.items != n.items {
            let name = |t: Option<FieldType>| t.map_or("none", |t| t.as_str());
            let (kind, effect) = match (o.items, n.items) {
                (Some(a), Some(b)) => type_effect(a, b),
                _ => (ChangeKind::TypeChanged, Effect::Both),
            };
            self.push(
                at("items"),
                kind,
                format!("elements {} → {}", name(o.items), name(n.items)),
                effect,
                true,
            );
        }
        match (o.required, n.required) {
            (false, true) => self.push(
                at("required"),
                ChangeKind::FieldMadeRequired,
                "optional → required".into(),
                Effect::Narrows,
                true,
            ),
            (true, false) => self.push(
                at("required"),
                ChangeKind::FieldMadeOptional,
                "required → optional".into(),
                Effect::Widens,
                true,
            ),
            _ => {}
        }
        if !type_changed && let (Some(ov), Some(nv)) = (&o.enum_values, &n.enum_values) {
            let added: Vec<&str> = nv
                .iter()
                .filter(|v| !ov.contains(v))
                .map(String::as_str)
                .collect();
            let removed: Vec<&str> = ov
                .iter()
                .filter(|v| !nv.contains(v))
                .map(String::as_str)
                .collect();
            if !added.is_empty() {
                self.push(
                    at("enumValues"),
                    ChangeKind::EnumValuesAdded,
                    format!("added {}", added.join(", ")),
                    Effect::Widens,
                    true,
                );
            }
            if !removed.is_empty() {
                self.push(
                    at("enumValues"),
                    ChangeKind::EnumValuesRemoved,
                    format!("removed {}", removed.join(", ")),
                    Effect::Narrows,
                    true,
                );
            }
        }
        match (&o.pattern, &n.pattern) {
            (None, Some(p)) => self.push(
                at("pattern"),
                ChangeKind::PatternAdded,
                format!("pattern {p} added"),
                Effect::Narrows,
                true,
            ),
            (Some(p), None) => self.push(
                at("pattern"),
                ChangeKind::PatternRemoved,
                format!("pattern {p} removed"),
                Effect::Widens,
                true,
            ),
            (Some(a), Some(b)) if a != b => {
                self.push(
                    at("pattern"),
                    ChangeKind::PatternChanged,
                    format!("{a} → {b}"),
                    Effect::Both,
                    true,
                );
            }
            _ => {}
        }
        self.bound(at("minimum"), &o.minimum, &n.minimum, true);
        self.bound(at("maximum"), &o.maximum, &n.maximum, false);
        match (o.max_length, n.max_length) {
            (None, Some(m)) => self.push(
                at("maxLength"),
                ChangeKind::BoundTightened,
                format!("maxLength {m} added"),
                Effect::Narrows,
                true,
            ),
            (Some(m), None) => self.push(
                at("maxLength"),
                ChangeKind::BoundLoosened,
                format!("maxLength {m} removed"),
                Effect::Widens,
                true,
            ),
            (Some(a), Some(b)) if b < a => self.push(
                at("maxLength"),
                ChangeKind::BoundTightened,
                format!("{a} → {b}"),
                Effect::Narrows,
                true,
            ),
            (Some(a), Some(b)) if b > a => self.push(
                at("maxLength"),
                ChangeKind::BoundLoosened,
                format!("{a} → {b}"),
                Effect::Widens,
                true,
            ),
            _ => {}
        }
        if o.pii != n.pii {
            let detail = if n.pii {
                "now personal data (redacted)"
            } else {
                "no longer personal data"
            };
            self.push(
                at("pii"),
                ChangeKind::PiiChanged,
                detail.into(),
                Effect::None,
                true,
            );
        }
        if o.description != n.description {
            self.push(
                at("description"),
                ChangeKind::DescriptionChanged,
                "description edited".into(),
                Effect::None,
                false,
            );
        }
    }

    /// A lower bound (`lower`) tightens when it rises; an upper bound when it falls.
    fn bound(&mut self, path: String, old: &Option<String>, new: &Option<String>, lower: bool) {
        let name = if lower { "minimum" } else { "maximum" };
        let parse = |s: &str| super::cel_env::parse_decimal(s).ok();
        match (old, new) {
            (None, Some(b)) => self.push(
                path,
                ChangeKind::BoundTightened,
                format!("{name} {b} added"),
                Effect::Narrows,
                true,
            ),
            (Some(a), None) => self.push(
                path,
                ChangeKind::BoundLoosened,
                format!("{name} {a} removed"),
                Effect::Widens,
                true,
            ),
            (Some(a), Some(b)) => match (parse(a), parse(b)) {
                (Some(x), Some(y)) if x == y => {}
                (Some(x), Some(y)) if (y > x) == lower => self.push(
                    path,
                    ChangeKind::BoundTightened,
                    format!("{a} → {b}"),
                    Effect::Narrows,
                    true,
                ),
                (Some(_), Some(_)) => self.push(
                    path,
                    ChangeKind::BoundLoosened,
                    format!("{a} → {b}"),
                    Effect::Widens,
                    true,
                ),
                _ if a != b => self.push(
                    path,
                    ChangeKind::BoundTightened,
                    format!("{a} → {b} (not comparable)"),
                    Effect::Both,
                    true,
                ),
                _ => {}
            },
            (None, None) => {}
        }
    }

    fn lookups(&mut self, old: &SyncContractSpec, new: &SyncContractSpec) {
        for o in &old.lookups {
            match new.lookups.iter().find(|n| n.name == o.name) {
                None => self.push(
                    format!("spec.lookups[{}]", o.name),
                    ChangeKind::LookupRemoved,
                    "lookup removed".into(),
                    Effect::None,
                    true,
                ),
                Some(n) if n != o => self.push(
                    format!("spec.lookups[{}]", o.name),
                    ChangeKind::LookupChanged,
                    "entry fields changed".into(),
                    Effect::None,
                    true,
                ),
                Some(_) => {}
            }
        }
        for n in new
            .lookups
            .iter()
            .filter(|n| !old.lookups.iter().any(|o| o.name == n.name))
        {
            self.push(
                format!("spec.lookups[{}]", n.name),
                ChangeKind::LookupAdded,
                "lookup added".into(),
                Effect::None,
                true,
            );
        }
    }

    fn rules(&mut self, old: &SyncContractSpec, new: &SyncContractSpec) {
        let gate = |action: RuleAction| action != RuleAction::Warn;
        for o in &old.rules {
            let at = |attr: &str| format!("spec.rules[{}]{attr}", o.name);
            let Some(n) = new.rules.iter().find(|n| n.name == o.name) else {
                let effect = if gate(o.action) {
                    Effect::Widens
                } else {
                    Effect::None
                };
                self.push(
                    at(""),
                    ChangeKind::RuleRemoved,
                    format!("{} rule removed", action_name(o.action)),
                    effect,
                    true,
                );
                continue;
            };
            if !same_expression(&o.expression, &n.expression) {
                let effect = if gate(o.action) || gate(n.action) {
                    Effect::Both
                } else {
                    Effect::None
                };
                self.push(
                    at(".expression"),
                    ChangeKind::RuleExpressionChanged,
                    "expression edited".into(),
                    effect,
                    true,
                );
            }
            if o.action != n.action {
                let effect = if strictness(n.action) > strictness(o.action) {
                    Effect::Narrows
                } else {
                    Effect::Widens
                };
                let detail = format!("{} → {}", action_name(o.action), action_name(n.action));
                self.push(
                    at(".action"),
                    ChangeKind::RuleActionChanged,
                    detail,
                    effect,
                    true,
                );
            } else if o.approver_role != n.approver_role {
                let detail = format!(
                    "{} → {}",
                    o.approver_role.as_deref().unwrap_or("-"),
                    n.approver_role.as_deref().unwrap_or("-")
                );
                self.push(
                    at(".approverRole"),
                    ChangeKind::ApproverRoleChanged,
                    detail,
                    Effect::None,
                    true,
                );
            }
            if o.message != n.message {
                self.push(
                    at(".message"),
                    ChangeKind::RuleMessageChanged,
                    "message edited".into(),
                    Effect::None,
                    false,
                );
            }
        }
        for n in new
            .rules
            .iter()
            .filter(|n| !old.rules.iter().any(|o| o.name == n.name))
        {
            let effect = if gate(n.action) {
                Effect::Narrows
            } else {
                Effect::None
            };
            self.push(
                format!("spec.rules[{}]", n.name),
                ChangeKind::RuleAdded,
                format!("{} rule added", action_name(n.action)),
                effect,
                true,
            );
        }
    }

    fn mapping(&mut self, old: &SyncContractSpec, new: &SyncContractSpec) {
        if !same_expression(&old.mapping.external_id, &new.mapping.external_id) {
            self.push(
                "spec.mapping.externalId".into(),
                ChangeKind::ExternalIdChanged,
                "a new idempotency key: the ERP would receive existing orders again as new ones"
                    .into(),
                Effect::Both,
                true,
            );
        }
        for o in &old.mapping.fields {
            let at = |attr: &str| format!("spec.mapping.fields[{}]{attr}", o.target);
            let Some(n) = new.mapping.fields.iter().find(|n| n.target == o.target) else {
                self.push(
                    at(""),
                    ChangeKind::MappingTargetRemoved,
                    "the ERP no longer receives this field".into(),
                    Effect::Both,
                    true,
                );
                continue;
            };
            if !same_expression(&o.expression, &n.expression) {
                self.push(
                    at(".expression"),
                    ChangeKind::MappingExpressionChanged,
                    "the ERP may receive other values".into(),
                    Effect::Both,
                    true,
                );
            }
            match (o.optional, n.optional) {
                (false, true) => self.push(
                    at(".optional"),
                    ChangeKind::MappingOptionalChanged,
                    "required → optional".into(),
                    Effect::Widens,
                    true,
                ),
                (true, false) => self.push(
                    at(".optional"),
                    ChangeKind::MappingOptionalChanged,
                    "optional → required".into(),
                    Effect::Narrows,
                    true,
                ),
                _ => {}
            }
        }
        for n in new
            .mapping
            .fields
            .iter()
            .filter(|n| !old.mapping.fields.iter().any(|o| o.target == n.target))
        {
            self.push(
                format!("spec.mapping.fields[{}]", n.target),
                ChangeKind::MappingTargetAdded,
                "the ERP receives a new field".into(),
                Effect::None,
                true,
            );
        }
    }
}
