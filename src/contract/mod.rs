//! The contract engine: compiles a `SyncContract` spec once per version and runs each record through it.
//!
//! A record's life in here: bounded parsing of its bytes ([`record`]), validation against the field schema and
//! conversion into typed CEL values ([`schema`]), the business rules ([`rules`]), and the mapping to the ERP
//! payload and its external id ([`mapping`]). The result is one [`Outcome`]: accepted, rejected or held. Every
//! evaluation is bounded by a step budget and a CPU-time deadline ([`eval`], [`clock`]); personal data is redacted by one function
//! ([`redact`]) wherever it leaves; compatibility between two versions is classified in [`compat`].
//!
//! This module is pure: no network, no database, no Kubernetes, and no clock but the evaluating thread's CPU
//! clock, which the per-record deadline reads (a busy scheduler never turns a valid record into a rejection). The
//! worker, the preflight replay, `meshline validate` and `meshline contract` all call it.
//!
//! The API for callers:
//! - [`compile`] turns a spec into a [`CompiledContract`] (`Send + Sync`, compile once per version) or a list of
//!   [`CompileError`]s that name the spec path and the reason.
//! - [`CompiledContract::check_expression`] compile-checks a standalone expression against the contract.
//! - [`CompiledContract::env`] binds a flow name and a [`Lookups`] snapshot, once per refresh.
//! - [`CompiledContract::process`] runs one record and never panics.
//! - [`compat::diff`] and [`compat::content_hash`] compare versions.

mod cel_env;
mod clock;
pub mod compat;
mod eval;
mod lookup;
mod mapping;
mod ordering;
mod outcome;
mod record;
mod redact;
mod rules;
mod schema;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube::core::cel::cel::objects::{Key, Map, Value};
use serde::Serialize;

pub use cel_env::{CelDecimal, DECIMAL_TYPE, decimal_to_json};
pub use clock::{CpuClock, CpuTime};
pub use compat::{CompatReport, ContentHash, content_hash, diff};
pub use lookup::{LookupError, Lookups, MAX_LOOKUP_BYTES};
pub use mapping::MAX_EXTERNAL_ID_LEN;
pub use ordering::{OrderingError, OrderingKind, RevisionOrdering};
pub use outcome::{
    ExternalId, Outcome, Payload, Reason, ReasonCode, Subject, Warning, WarningCode,
};
pub use record::ParseError;
pub use redact::{REDACTED, Redaction, RedactionKey, redact, redact_json, scrub};

use crate::api::{FieldType, LookupSpec, RuleAction, SyncContractSpec};
use eval::{Declarations, Frame, LookupDecl};

/// Bounds on what one contract and one record may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest record, in bytes.
    pub max_record_bytes: usize,
    /// Deepest nesting of arrays and objects in a record.
    pub max_depth: usize,
    /// Longest expression, in bytes (the CRD allows 4096).
    pub max_expression_len: usize,
    /// Deepest nesting of comprehensions (`all`, `exists`, `map`, ...) in one expression.
    pub max_comprehension_depth: usize,
    /// Step budget for all expressions of one record together.
    pub max_cost: u64,
    /// CPU time the evaluating thread may spend on one record (see [`CpuClock`]). Time the thread waits for
    /// the scheduler does not count.
    pub deadline: Duration,
    /// Most violations reported for one record.
    pub max_violations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: 1 << 20,
            max_depth: 64,
            max_expression_len: 4096,
            max_comprehension_depth: 3,
            max_cost: 1_000_000,
            deadline: Duration::from_millis(100),
            max_violations: 100,
        }
    }
}

/// How a contract is compiled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompileOptions {
    pub limits: Limits,
    pub redaction: Redaction,
    /// The clock of the per-record deadline: the evaluating thread's CPU time unless a test injects one.
    pub cpu_clock: CpuClock,
}

/// A problem in a contract spec, at a path relative to the manifest (`spec.rules[2].expression`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompileError {
    pub path: String,
    pub reason: String,
    pub kind: CompileErrorKind,
}

impl CompileError {
    pub(crate) fn new(path: impl Into<String>, kind: CompileErrorKind, reason: String) -> Self {
        CompileError {
            path: path.into(),
            reason,
            kind,
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for CompileError {}

/// The kind of a compile error, with a stable label for conditions and Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompileErrorKind {
    InvalidManifest,
    InvalidVersion,
    InvalidEntity,
    InvalidFieldName,
    DuplicateField,
    UndeclaredParent,
    InvalidFieldOption,
    BadPattern,
    BadBound,
    InvalidLookup,
    InvalidRule,
    MissingMessage,
    InvalidMapping,
    InvalidSla,
    InvalidOrdering,
    CelSyntax,
    UnknownReference,
    UnknownFunction,
    UnsupportedSyntax,
    InvalidConstant,
    ExpressionTooLong,
    ExpressionTooComplex,
}

impl CompileErrorKind {
    pub fn label(self) -> &'static str {
        match self {
            CompileErrorKind::InvalidManifest => "invalid_manifest",
            CompileErrorKind::InvalidVersion => "invalid_version",
            CompileErrorKind::InvalidEntity => "invalid_entity",
            CompileErrorKind::InvalidFieldName => "invalid_field_name",
            CompileErrorKind::DuplicateField => "duplicate_field",
            CompileErrorKind::UndeclaredParent => "undeclared_parent",
            CompileErrorKind::InvalidFieldOption => "invalid_field_option",
            CompileErrorKind::BadPattern => "bad_pattern",
            CompileErrorKind::BadBound => "bad_bound",
            CompileErrorKind::InvalidLookup => "invalid_lookup",
            CompileErrorKind::InvalidRule => "invalid_rule",
            CompileErrorKind::MissingMessage => "missing_message",
            CompileErrorKind::InvalidMapping => "invalid_mapping",
            CompileErrorKind::InvalidSla => "invalid_sla",
            CompileErrorKind::InvalidOrdering => "invalid_ordering",
            CompileErrorKind::CelSyntax => "cel_syntax",
            CompileErrorKind::UnknownReference => "unknown_reference",
            CompileErrorKind::UnknownFunction => "unknown_function",
            CompileErrorKind::UnsupportedSyntax => "unsupported_syntax",
            CompileErrorKind::InvalidConstant => "invalid_constant",
            CompileErrorKind::ExpressionTooLong => "expression_too_long",
            CompileErrorKind::ExpressionTooComplex => "expression_too_complex",
        }
    }
}

impl Serialize for CompileErrorKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

/// A contract version, compiled: immutable and shareable between threads.
pub struct CompiledContract {
    id: u64,
    version: semver::Version,
    content_hash: ContentHash,
    schema: schema::Schema,
    pub(crate) lookups: Vec<LookupDecl>,
    rules: Vec<rules::Rule>,
    mapping: mapping::Mapping,
    ordering: Option<RevisionOrdering>,
    limits: Limits,
    cpu_clock: CpuClock,
    redaction: Redaction,
    /// `contract` as expressions see it.
    contract_value: Value,
    slots: usize,
    /// The service levels the flow's measures are compared with (exported as gauges beside them).
    sla: Option<crate::api::SlaSpec>,
}

impl fmt::Debug for CompiledContract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledContract")
            .field("version", &self.version.to_string())
            .field("content_hash", &self.content_hash)
            .field(
                "rules",
                &self
                    .rules
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field(
                "targets",
                &self
                    .mapping
                    .targets
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Compiles a contract with the default limits and fixed redaction.
pub fn compile(spec: &SyncContractSpec) -> Result<CompiledContract, Vec<CompileError>> {
    compile_with(spec, &CompileOptions::default())
}

/// Names expressions may not use for a lookup: the other variables, and the namespaces of library functions
/// (a lookup called `math` would hide `math.abs`).
const RESERVED_NAMES: &[&str] = &[
    "record",
    "contract",
    "flow",
    "math",
    "sets",
    "lists",
    "strings",
    "base64",
    "optional",
    "format",
    "jsonpatch",
    "ip",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
    "true",
    "false",
    "null",
];

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Compiles a contract. Every problem found is reported, not only the first.
pub fn compile_with(
    spec: &SyncContractSpec,
    options: &CompileOptions,
) -> Result<CompiledContract, Vec<CompileError>> {
    let mut errors = Vec::new();
    let version = match semver::Version::parse(&spec.version) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(CompileError::new(
                "spec.version",
                CompileErrorKind::InvalidVersion,
                format!(
                    "{:?} is not a semantic version (MAJOR.MINOR.PATCH): {e}",
                    spec.version
                ),
            ));
            None
        }
    };
    for (path, entity) in [("spec.source", &spec.source), ("spec.target", &spec.target)] {
        if entity.system.trim().is_empty() || entity.entity.trim().is_empty() {
            errors.push(CompileError::new(
                path,
                CompileErrorKind::InvalidEntity,
                "system and entity must not be empty".into(),
            ));
        }
    }
    if spec.fields.is_empty() {
        errors.push(CompileError::new(
            "spec.fields",
            CompileErrorKind::InvalidFieldName,
            "a contract declares at least one field".into(),
        ));
    }
    let schema = schema::compile(&spec.fields, &mut errors);
    let lookups = compile_lookups(&spec.lookups, &mut errors);
    let ordering = ordering::compile(spec.ordering.as_ref(), &spec.fields, &mut errors);
    if let Some(sla) = &spec.sla
        && let Some(rate) = &sla.max_failure_rate
        && !cel_env::parse_decimal(rate)
            .is_ok_and(|r| r >= rust_decimal::Decimal::ZERO && r <= rust_decimal::Decimal::ONE)
    {
        errors.push(CompileError::new(
            "spec.sla.maxFailureRate",
            CompileErrorKind::InvalidSla,
            format!("{rate:?} is not a fraction between 0 and 1"),
        ));
    }
    let decls = Declarations {
        schema: &schema,
        lookups: &lookups,
        limits: &options.limits,
    };
    let rules = rules::compile(&spec.rules, &decls, &mut errors);
    let mapping = mapping::compile(&spec.mapping, &decls, &options.redaction, &mut errors);
    let (Some(version), Some(mapping), true) = (version, mapping, errors.is_empty()) else {
        return Err(errors);
    };
    let (mut schema, mut mapping) = (schema, mapping);
    // Which fields records carry as CEL values: those some expression reads. A scalar field that only one
    // plain mapping copy reads is carried as its JSON instead, which is all the payload needs.
    let mut needed: std::collections::HashSet<String> = rules
        .iter()
        .map(|r| &r.program)
        .chain(
            mapping
                .targets
                .iter()
                .filter(|t| t.program.direct.is_none())
                .map(|t| &t.program),
        )
        .chain([&mapping.external_id])
        .flat_map(|p| p.needed.iter().cloned())
        .collect();
    schema.mark_needed(&needed.iter().map(String::as_str).collect());
    let copies = |path: &str, targets: &[mapping::Target]| {
        targets
            .iter()
            .filter(|t| t.program.direct.as_ref().is_some_and(|d| d.path == path))
            .count()
    };
    let mut slots = 0;
    for i in 0..mapping.targets.len() {
        let Some(direct) = mapping.targets[i].program.direct.clone() else {
            continue;
        };
        let field = direct.path.trim_start_matches("record.");
        if copies(&direct.path, &mapping.targets) == 1 && schema.assign_json_slot(field, slots) {
            mapping.targets[i].json_slot = Some(slots);
            slots += 1;
        } else {
            needed.extend(mapping.targets[i].program.needed.iter().cloned());
        }
    }
    schema.json_slots = slots;
    schema.mark_needed(&needed.iter().map(String::as_str).collect());
    let slots = rules
        .iter()
        .map(|r| r.program.slots)
        .chain(mapping.targets.iter().map(|t| t.program.slots))
        .chain([mapping.external_id.slots])
        .max()
        .unwrap_or(0);
    let contract_value = Value::Map(Map {
        map: Arc::new(
            [(
                Key::from("version"),
                Value::String(Arc::new(spec.version.clone())),
            )]
            .into_iter()
            .collect(),
        ),
    });
    Ok(CompiledContract {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        version,
        content_hash: content_hash(spec),
        schema,
        lookups,
        rules,
        mapping,
        ordering,
        limits: options.limits.clone(),
        cpu_clock: options.cpu_clock.clone(),
        redaction: options.redaction.clone(),
        contract_value,
        slots,
        sla: spec.sla.clone(),
    })
}

fn compile_lookups(specs: &[LookupSpec], errors: &mut Vec<CompileError>) -> Vec<LookupDecl> {
    let is_name = |s: &str, first_lower: bool| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| {
            if first_lower {
                c.is_ascii_lowercase()
            } else {
                c.is_ascii_alphabetic() || c == '_'
            }
        }) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut out = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let mut fail = |path: String, reason: String| {
            errors.push(CompileError::new(
                path,
                CompileErrorKind::InvalidLookup,
                reason,
            ))
        };
        if !is_name(&spec.name, true) {
            fail(
                format!("spec.lookups[{i}].name"),
                format!(
                    "{:?} is not a lookup name (a lowercase letter, then letters, digits, '_')",
                    spec.name
                ),
            );
            continue;
        }
        if RESERVED_NAMES.contains(&spec.name.as_str()) {
            fail(
                format!("spec.lookups[{i}].name"),
                format!(
                    "{:?} is reserved in expressions; choose another name",
                    spec.name
                ),
            );
            continue;
        }
        if specs[..i].iter().any(|s| s.name == spec.name) {
            fail(
                format!("spec.lookups[{i}].name"),
                format!("lookup {:?} is declared twice", spec.name),
            );
            continue;
        }
        if spec.fields.is_empty() {
            fail(
                format!("spec.lookups[{i}].fields"),
                "a lookup declares at least one field".into(),
            );
        }
        let mut fields = Vec::with_capacity(spec.fields.len());
        for (j, field) in spec.fields.iter().enumerate() {
            let at = format!("spec.lookups[{i}].fields[{j}]");
            if !is_name(&field.name, false) {
                fail(
                    format!("{at}.name"),
                    format!("{:?} is not a field name", field.name),
                );
            } else if spec.fields[..j].iter().any(|f| f.name == field.name) {
                fail(
                    format!("{at}.name"),
                    format!("field {:?} is declared twice", field.name),
                );
            } else if matches!(field.r#type, FieldType::Object | FieldType::Array) {
                fail(
                    format!("{at}.type"),
                    format!("lookup fields are scalars, not {}", field.r#type.as_str()),
                );
            } else {
                fields.push((field.name.clone(), field.r#type));
            }
        }
        out.push(LookupDecl::new(&spec.name, fields));
    }
    out
}

/// A compiled contract bound to one flow and one snapshot of its lookups. Prepare it once per lookup refresh
/// and share it between records; it holds no per-record state.
#[derive(Clone)]
pub struct Env {
    contract_id: u64,
    flow: Value,
    tables: Vec<Value>,
    largest_table: usize,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env")
            .field("flow", &self.flow)
            .field("tables", &self.tables.len())
            .finish_non_exhaustive()
    }
}

impl CompiledContract {
    pub fn version(&self) -> &semver::Version {
        &self.version
    }

    /// SHA-256 of the canonical spec content (sign-offs excluded), as the controller stores it in status.
    pub fn content_hash(&self) -> &ContentHash {
        &self.content_hash
    }

    /// The contract's SLA, if it sets one.
    pub fn sla(&self) -> Option<&crate::api::SlaSpec> {
        self.sla.as_ref()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The field that orders this record's revisions, if the contract declares one (`spec.ordering`).
    pub fn ordering(&self) -> Option<&RevisionOrdering> {
        self.ordering.as_ref()
    }

    pub fn redaction(&self) -> &Redaction {
        &self.redaction
    }

    /// Names of the lookups the contract declares.
    pub fn lookup_names(&self) -> impl Iterator<Item = &str> {
        self.lookups.iter().map(|l| l.name.as_str())
    }

    /// Compile-checks a standalone expression (a flow-level filter, say) against this contract's fields and
    /// lookups, with the same references, functions and limits as the contract's own expressions. `path` names
    /// the expression in errors.
    pub fn check_expression(&self, path: &str, expression: &str) -> Result<(), Vec<CompileError>> {
        let decls = Declarations {
            schema: &self.schema,
            lookups: &self.lookups,
            limits: &self.limits,
        };
        eval::compile(&decls, expression, path).map(|_| ())
    }

    /// Binds a flow name and a lookup snapshot. Fails if a lookup the contract declares has no data, so a
    /// worker does not start rejecting every record for a missing pricebook.
    pub fn env(&self, flow_name: &str, lookups: &Lookups) -> Result<Env, LookupError> {
        let mut tables = Vec::with_capacity(self.lookups.len());
        let mut largest_table = 0;
        for decl in &self.lookups {
            let table = lookups
                .table(&decl.name)
                .ok_or_else(|| LookupError::Missing(decl.name.clone()))?;
            if table.keys != decl.keys {
                return Err(LookupError::Shape(format!(
                    "lookup {} was loaded for other entry fields; load it for this contract version",
                    decl.name
                )));
            }
            largest_table = largest_table.max(table.len);
            tables.push(table.value.clone());
        }
        let flow = Value::Map(Map {
            map: Arc::new(
                [(
                    Key::from("name"),
                    Value::String(Arc::new(flow_name.to_string())),
                )]
                .into_iter()
                .collect(),
            ),
        });
        Ok(Env {
            contract_id: self.id,
            flow,
            tables,
            largest_table,
        })
    }

    /// Runs one record through the contract. Never panics: a failure of the engine itself becomes a rejection
    /// with the `internal_error` label.
    pub fn process(&self, record: &[u8], env: &Env) -> Outcome {
        self.process_approved(record, env, &[])
    }

    /// Like [`CompiledContract::process`], for a record whose hold was approved: hold rules named in
    /// `approved_rules` count as passed.
    pub fn process_approved(&self, record: &[u8], env: &Env, approved_rules: &[&str]) -> Outcome {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run(record, env, approved_rules)
        })) {
            Ok(outcome) => outcome,
            Err(_) => Outcome::rejected(Reason::new(
                ReasonCode::Internal,
                Subject::Record,
                "the contract engine failed on this record; it is kept in the dead letters for investigation",
            )),
        }
    }

    fn run(&self, bytes: &[u8], env: &Env, approved: &[&str]) -> Outcome {
        // The deadline is a reading of this thread's CPU clock: parsing and validation count, waiting does not.
        let deadline = self.cpu_clock.deadline_after(self.limits.deadline);
        if env.contract_id != self.id {
            return Outcome::rejected(Reason::new(
                ReasonCode::Internal,
                Subject::Record,
                "the environment was prepared for another contract version",
            ));
        }
        let mut validator = schema::Validator::new(&self.redaction, self.limits.max_violations);
        let record = match validator.read(
            &self.schema,
            bytes,
            self.limits.max_record_bytes,
            self.limits.max_depth,
        ) {
            Ok(record) => record,
            Err(e) => {
                return Outcome::rejected(Reason::new(
                    parse_code(&e),
                    Subject::Record,
                    e.to_string(),
                ));
            }
        };
        let longest_list = validator.max_list_len;
        let mut json = std::mem::take(&mut validator.json);
        let violations = validator.finish();
        if !violations.is_empty() {
            return Outcome::Rejected {
                reasons: violations,
            };
        }

        // The static bound: refuse a record whose worst case exceeds the budget before spending any of it.
        let estimate = self
            .programs()
            .map(|p| p.estimate(longest_list, env.largest_table))
            .fold(0u64, u64::saturating_add);
        if estimate > self.limits.max_cost {
            return Outcome::rejected(Reason::new(
                ReasonCode::CostBudgetExceeded,
                Subject::Record,
                format!(
                    "the worst-case cost of this record's rules and mapping is {estimate} steps, over the budget of {} (its longest list has {longest_list} elements)",
                    self.limits.max_cost
                ),
            ));
        }

        let mut frame = Frame::new(
            &record,
            &env.tables,
            &self.contract_value,
            &env.flow,
            self.slots,
            self.limits.max_cost,
            deadline,
        );
        let scrub = |message: &str| {
            let mut values = Vec::new();
            schema::personal_values(&self.schema, &record, &mut values);
            redact::scrub(message, &values, &self.redaction)
        };
        let mut reasons = Vec::new();
        let mut hold = None;
        let mut warnings = Vec::new();
        for rule in &self.rules {
            match rule.check(&mut frame) {
                rules::Verdict::Pass => {}
                rules::Verdict::Fail => match rule.action {
                    RuleAction::Reject => reasons.push(Reason::new(
                        ReasonCode::RuleFailed,
                        Subject::Rule(rule.name.clone()),
                        rule.message.clone(),
                    )),
                    RuleAction::Hold if approved.contains(&rule.name.as_str()) => {}
                    RuleAction::Hold => {
                        hold.get_or_insert(rule);
                    }
                    RuleAction::Warn => warnings.push(Warning {
                        code: WarningCode::RuleFailed,
                        rule: rule.name.clone(),
                        message: rule.message.clone(),
                    }),
                },
                rules::Verdict::Error(e) => {
                    let message = explain(&e, rule.program.personal, scrub);
                    match (bound_code(&e), rule.action) {
                        (Some(code), _) => {
                            reasons.push(Reason::new(
                                code,
                                Subject::Rule(rule.name.clone()),
                                message,
                            ));
                            return Outcome::Rejected { reasons };
                        }
                        (None, RuleAction::Warn) => warnings.push(Warning {
                            code: WarningCode::RuleError,
                            rule: rule.name.clone(),
                            message,
                        }),
                        (None, _) => reasons.push(Reason::new(
                            ReasonCode::RuleError,
                            Subject::Rule(rule.name.clone()),
                            message,
                        )),
                    }
                }
            }
        }
        if !reasons.is_empty() {
            return Outcome::Rejected { reasons };
        }
        if let Some(rule) = hold {
            return Outcome::Held {
                rule: rule.name.clone(),
                approver_role: rule.approver_role.clone().unwrap_or_default(),
                message: rule.message.clone(),
                warnings,
            };
        }
        // Inside an evaluation the frame reads the CPU clock every 1024 steps; between the rules and the
        // mapping it is read once more, so a record never reaches the sink past its deadline.
        if let Err(e) = frame.check_deadline() {
            return Outcome::rejected(Reason::new(
                ReasonCode::DeadlineExceeded,
                Subject::Record,
                e.message,
            ));
        }
        match self.mapping.build(&mut frame, &record, &mut json) {
            Ok((payload, external_id)) => Outcome::Accepted {
                external_id: ExternalId::new(
                    external_id,
                    self.mapping.external_id.personal,
                    &self.redaction,
                ),
                payload: Payload::new(payload, self.mapping.privacy.clone()),
                warnings,
            },
            Err(failure) => {
                let (subject, error, code, personal) = match failure {
                    mapping::MappingFailure::Target(target, e) => {
                        let personal = self
                            .mapping
                            .targets
                            .iter()
                            .any(|t| t.name == target && t.program.personal);
                        (
                            Subject::Mapping(target),
                            e,
                            ReasonCode::MappingError,
                            personal,
                        )
                    }
                    mapping::MappingFailure::ExternalId(e) => (
                        Subject::ExternalId,
                        e,
                        ReasonCode::ExternalIdError,
                        self.mapping.external_id.personal,
                    ),
                };
                let code = bound_code(&error).unwrap_or(code);
                Outcome::rejected(Reason::new(code, subject, explain(&error, personal, scrub)))
            }
        }
    }

    fn programs(&self) -> impl Iterator<Item = &eval::Program> {
        self.rules
            .iter()
            .map(|r| &r.program)
            .chain(
                self.mapping
                    .targets
                    .iter()
                    .filter(|t| t.program.direct.is_none())
                    .map(|t| &t.program),
            )
            .chain([&self.mapping.external_id])
    }

    /// The record as lineage and dead-letter snapshots keep it: declared fields only, personal fields redacted
    /// by [`redact`]. A record that cannot be read is described, never quoted.
    pub fn snapshot(&self, record: &[u8]) -> serde_json::Value {
        match record::parse_record(record, self.limits.max_record_bytes, self.limits.max_depth) {
            Ok(record::Json::Object(members)) => {
                schema::snapshot(&self.schema.root, &members, &self.redaction)
            }
            Ok(_) => serde_json::Value::Null,
            Err(e) => {
                serde_json::json!({"$unreadable": {"bytes": record.len(), "reason": e.label()}})
            }
        }
    }
}

impl CompiledContract {
    /// Every personal value of `record` (the raw bytes the source sent) and of the personal targets of its
    /// ERP `payload`, replaced wherever it appears in `message` by [`redact`] (through [`scrub`]). For texts
    /// from outside the contract, such as an ERP's error answer, which quote field values (NetSuite's
    /// `o:errorDetails`, Odoo's `ValidationError`). Values are also matched as a JSON string escapes them
    /// (`\"`, `\/`, `\u00e9`), since error bodies are mostly JSON.
    pub fn scrub_record_text(
        &self,
        record: &[u8],
        payload: Option<&Payload>,
        message: &str,
    ) -> String {
        let mut values = Vec::new();
        if let Ok(record::Json::Object(members)) =
            record::parse_record(record, self.limits.max_record_bytes, self.limits.max_depth)
        {
            schema::personal_texts(&self.schema.root, &members, &mut values);
        }
        if let Some(payload) = payload {
            payload.personal_values(&mut values);
        }
        if values.is_empty() {
            return message.to_string();
        }
        let escaped: Vec<String> = values
            .iter()
            .flat_map(|v| json_escapings(v))
            .filter(|e| !values.contains(e))
            .collect();
        values.extend(escaped);
        redact::scrub(message, &values, &self.redaction)
    }
}

/// How a JSON encoder may have written `value` inside a string: serde's minimal escaping, with `/` escaped
/// (PHP, some Java libraries) and with every non-ASCII character as `\uXXXX` (Python's default, so Odoo's).
fn json_escapings(value: &str) -> Vec<String> {
    let minimal = serde_json::to_string(value).unwrap_or_default();
    let minimal = minimal
        .strip_prefix('"')
        .and_then(|m| m.strip_suffix('"'))
        .unwrap_or(&minimal)
        .to_string();
    let slashed = minimal.replace('/', "\\/");
    let ascii = |text: &str| {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out
    };
    let mut out = vec![ascii(&minimal), ascii(&slashed), minimal, slashed];
    out.retain(|v| v != value);
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod scrub_record_text_tests {
    use super::*;

    const CONTRACT: &str = r#"
apiVersion: sync.meshline.io/v1alpha1
kind: SyncContract
metadata: {name: c}
spec:
  version: 1.0.0
  source: {system: salesforce, entity: Opportunity}
  target: {system: netsuite, entity: salesOrder}
  fields:
    - {name: id, type: string, required: true}
    - {name: email, type: string, pii: true}
    - {name: contact, type: object}
    - {name: contact.name, type: string, pii: true}
  mapping:
    externalId: record.id
    fields:
      - {target: mail, expression: 'record.email.lowerAscii()'}
"#;

    #[test]
    fn erp_texts_lose_every_personal_value_in_every_json_spelling() {
        let spec = parse_manifest(CONTRACT).unwrap();
        let contract = compile(&spec.spec).unwrap();
        let record = br#"{"id": "r1", "email": "Jos\u00e9.A/B@x.example", "contact": {"name": "Zo\u00eb Q"}}"#;
        let env = contract.env("f", &Lookups::default()).unwrap();
        let Outcome::Accepted { payload, .. } = contract.process(record, &env) else {
            panic!("the record is accepted");
        };
        let message = r#"{"detail": "José.A/B@x.example, Jos\u00e9.A\/B@x.example, josé.a/b@x.example and Zo\u00eb Q for r1"}"#;
        let out = contract.scrub_record_text(record, Some(&payload), message);
        assert_eq!(
            out,
            r#"{"detail": "[REDACTED], [REDACTED], [REDACTED] and [REDACTED] for r1"}"#
        );
    }
}

fn parse_code(e: &ParseError) -> ReasonCode {
    match e {
        ParseError::TooLarge { .. } => ReasonCode::RecordTooLarge,
        ParseError::InvalidUtf8 { .. } => ReasonCode::InvalidUtf8,
        ParseError::TooDeep { .. } => ReasonCode::NestingTooDeep,
        ParseError::Syntax { .. } => ReasonCode::InvalidJson,
        ParseError::DuplicateKey { .. } => ReasonCode::DuplicateKey,
        ParseError::NotAnObject { .. } => ReasonCode::NotAnObject,
    }
}

/// The message of an evaluation error as a reason shows it. An expression that reads personal data may
/// have put a personal value (or a piece of one) into a missing key or a library's error message, so for such
/// an expression those details are withheld; exact personal values are scrubbed from every message anyway.
fn explain(e: &eval::EvalError, personal: bool, scrub: impl Fn(&str) -> String) -> String {
    let message = match e.kind {
        eval::EvalErrorKind::NoSuchKey if personal => {
            "no such key (not shown: the expression reads personal data)".to_string()
        }
        eval::EvalErrorKind::Library if personal => {
            let function = e.message.split(':').next().unwrap_or("a function");
            format!("{function} failed (details not shown: the expression reads personal data)")
        }
        _ => scrub(&e.message),
    };
    format!("could not be evaluated: {message}")
}

fn bound_code(e: &eval::EvalError) -> Option<ReasonCode> {
    match e.kind {
        eval::EvalErrorKind::Budget => Some(ReasonCode::CostBudgetExceeded),
        eval::EvalErrorKind::Deadline => Some(ReasonCode::DeadlineExceeded),
        _ => None,
    }
}

/// Reads a `SyncContract` manifest (YAML). Errors carry the field path and the reason, as compile errors do.
pub fn parse_manifest(yaml: &str) -> Result<crate::api::SyncContract, CompileError> {
    let invalid = |reason: String| CompileError::new("", CompileErrorKind::InvalidManifest, reason);
    let value: serde_yaml::Value =
        serde_yaml::from_str(yaml).map_err(|e| invalid(format!("not YAML: {e}")))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != "SyncContract" {
        return Err(CompileError::new(
            "kind",
            CompileErrorKind::InvalidManifest,
            format!("expected kind SyncContract, found {kind:?}"),
        ));
    }
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    if api_version != crate::api::API_VERSION {
        return Err(CompileError::new(
            "apiVersion",
            CompileErrorKind::InvalidManifest,
            format!(
                "expected {}, found {api_version:?}",
                crate::api::API_VERSION
            ),
        ));
    }
    // Deserialising from a YAML value loses positions, so the path of the offending field is tracked instead.
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        if path == "." {
            invalid(reason)
        } else {
            CompileError::new(path, CompileErrorKind::InvalidManifest, reason)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_contracts_and_environments_are_shareable_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<CompiledContract>();
        shareable::<Env>();
        shareable::<Lookups>();
        shareable::<Outcome>();
    }
}
