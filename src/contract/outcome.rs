//! The one typed result of running a record through a contract: accepted, rejected or held.
//!
//! An outcome is what leaves the engine, so it is built to be safe to print: personal values inside reasons are
//! already redacted when the reason is created, and the payload and external id print (`Debug`, `Display`,
//! `Serialize`) in their redacted form. Only [`Payload::as_json`] and [`ExternalId::as_str`] give the raw values,
//! for the sink. Labels are stable words shared by metrics, dead-letter reasons and tickets.

use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::redact::{Redaction, redact, redact_json};

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum Outcome {
    /// The record passed; the sink receives `payload`, upserted by `external_id`.
    #[serde(rename_all = "camelCase")]
    Accepted {
        payload: Payload,
        external_id: ExternalId,
        warnings: Vec<Warning>,
    },
    /// The record goes to the dead letters with every reason found.
    Rejected { reasons: Vec<Reason> },
    /// The record waits until a person with `approver_role` approves it.
    #[serde(rename_all = "camelCase")]
    Held {
        rule: String,
        approver_role: String,
        message: String,
        warnings: Vec<Warning>,
    },
}

impl Outcome {
    /// Stable label: `accepted`, `rejected` or `held`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Held { .. } => "held",
        }
    }

    /// The error class the worker files the record under, if it does not go on.
    pub fn error_class(&self) -> Option<crate::api::ErrorClass> {
        match self {
            Outcome::Accepted { .. } => None,
            Outcome::Rejected { .. } => Some(crate::api::ErrorClass::Permanent),
            Outcome::Held { .. } => Some(crate::api::ErrorClass::Hold),
        }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Outcome::Accepted { .. })
    }

    pub(crate) fn rejected(reason: Reason) -> Self {
        Outcome::Rejected {
            reasons: vec![reason],
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted {
                external_id,
                warnings,
                ..
            } => {
                write!(f, "accepted as {external_id}")?;
                if !warnings.is_empty() {
                    write!(f, " with {} warning(s): ", warnings.len())?;
                    join(f, warnings)?;
                }
                Ok(())
            }
            Outcome::Rejected { reasons } => {
                f.write_str("rejected: ")?;
                join(f, reasons)
            }
            Outcome::Held {
                rule,
                approver_role,
                message,
                ..
            } => {
                write!(f, "held for {approver_role} by rule {rule}: {message}")
            }
        }
    }
}

fn join<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str("; ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// Why a record was rejected. The codes are grouped by the stage that found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    // The bytes.
    RecordTooLarge,
    InvalidUtf8,
    NestingTooDeep,
    InvalidJson,
    DuplicateKey,
    NotAnObject,
    // The field schema.
    MissingField,
    WrongType,
    NumberOutOfRange,
    InvalidDecimal,
    InvalidDate,
    InvalidDatetime,
    NotInEnum,
    PatternMismatch,
    BelowMinimum,
    AboveMaximum,
    TooLong,
    TooManyViolations,
    // The business rules.
    RuleFailed,
    RuleError,
    // The evaluation bounds.
    CostBudgetExceeded,
    DeadlineExceeded,
    // The mapping.
    MappingError,
    ExternalIdError,
    /// A bug in the engine, caught so that one record cannot take a worker down.
    Internal,
}

impl ReasonCode {
    /// Stable label for metrics, dead-letter reasons and tickets.
    pub fn label(self) -> &'static str {
        match self {
            ReasonCode::RecordTooLarge => "record_too_large",
            ReasonCode::InvalidUtf8 => "invalid_utf8",
            ReasonCode::NestingTooDeep => "nesting_too_deep",
            ReasonCode::InvalidJson => "invalid_json",
            ReasonCode::DuplicateKey => "duplicate_key",
            ReasonCode::NotAnObject => "not_an_object",
            ReasonCode::MissingField => "missing_field",
            ReasonCode::WrongType => "wrong_type",
            ReasonCode::NumberOutOfRange => "number_out_of_range",
            ReasonCode::InvalidDecimal => "invalid_decimal",
            ReasonCode::InvalidDate => "invalid_date",
            ReasonCode::InvalidDatetime => "invalid_datetime",
            ReasonCode::NotInEnum => "not_in_enum",
            ReasonCode::PatternMismatch => "pattern_mismatch",
            ReasonCode::BelowMinimum => "below_minimum",
            ReasonCode::AboveMaximum => "above_maximum",
            ReasonCode::TooLong => "too_long",
            ReasonCode::TooManyViolations => "too_many_violations",
            ReasonCode::RuleFailed => "rule_failed",
            ReasonCode::RuleError => "rule_error",
            ReasonCode::CostBudgetExceeded => "cost_budget_exceeded",
            ReasonCode::DeadlineExceeded => "deadline_exceeded",
            ReasonCode::MappingError => "mapping_error",
            ReasonCode::ExternalIdError => "external_id_error",
            ReasonCode::Internal => "internal_error",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

/// What a reason is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "camelCase")]
pub enum Subject {
    /// The record as a whole (it could not be read, or it is too costly).
    Record,
    /// A field, by its JSON path in the record (`lineItems[2].sku`).
    Field(String),
    /// A business rule, by name.
    Rule(String),
    /// A target field of the payload.
    Mapping(String),
    /// The external id expression.
    ExternalId,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Record => f.write_str("record"),
            Subject::Field(path) => write!(f, "field {path}"),
            Subject::Rule(name) => write!(f, "rule {name}"),
            Subject::Mapping(target) => write!(f, "mapping {target}"),
            Subject::ExternalId => f.write_str("external id"),
        }
    }
}

/// One reason a record was rejected. `value` is the offending value, already redacted when it is personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub code: ReasonCode,
    pub subject: Subject,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl Reason {
    pub(crate) fn new(code: ReasonCode, subject: Subject, message: impl Into<String>) -> Self {
        Reason {
            code,
            subject,
            message: message.into(),
            value: None,
        }
    }

    pub(crate) fn with_value(mut self, value: Option<String>) -> Self {
        self.value = value;
        self
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [{}]", self.subject, self.message, self.code)?;
        if let Some(value) = &self.value {
            write!(f, " (value {value})")?;
        }
        Ok(())
    }
}

/// Why a warning was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WarningCode {
    /// A `warn` rule evaluated to false.
    RuleFailed,
    /// A `warn` rule could not be evaluated; the record goes on, as it would have with a failing warn rule.
    RuleError,
}

impl WarningCode {
    pub fn label(self) -> &'static str {
        match self {
            WarningCode::RuleFailed => "rule_failed",
            WarningCode::RuleError => "rule_error",
        }
    }
}

impl Serialize for WarningCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

/// A `warn` rule that did not pass. The record goes on; the warning is kept in its lineage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub code: WarningCode,
    pub rule: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.message)
    }
}

/// The idempotency key the sink upserts by.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalId {
    raw: String,
    /// Set when the expression reads a personal field: the form that is printed instead of `raw`.
    redacted: Option<String>,
}

impl ExternalId {
    pub(crate) fn new(raw: String, personal: bool, redaction: &Redaction) -> Self {
        let redacted = personal.then(|| redact(&raw, redaction));
        ExternalId { raw, redacted }
    }

    /// The raw key, for the sink's upsert. Do not log it: print the `ExternalId` itself.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    fn shown(&self) -> &str {
        self.redacted.as_deref().unwrap_or(&self.raw)
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl fmt::Debug for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExternalId({:?})", self.shown())
    }
}

impl Serialize for ExternalId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

/// Which payload targets carry personal data, and how to redact them.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct PayloadPrivacy {
    /// Dot-separated target paths whose expression reads a personal field.
    pub(crate) personal_targets: Vec<String>,
    pub(crate) redaction: Redaction,
}

/// The ERP payload of an accepted record.
#[derive(Clone, PartialEq)]
pub struct Payload {
    value: serde_json::Value,
    privacy: Arc<PayloadPrivacy>,
}

impl Payload {
    pub(crate) fn new(value: serde_json::Value, privacy: Arc<PayloadPrivacy>) -> Self {
        Payload { value, privacy }
    }

    /// The raw payload, for the sink. Do not log it: use [`Payload::redacted`] (or print the `Payload`).
    pub fn as_json(&self) -> &serde_json::Value {
        &self.value
    }

    pub fn into_json(self) -> serde_json::Value {
        self.value
    }

    /// The text of every personal target's value (strings as they are, anything else as compact JSON), so a
    /// message quoting the payload can be scrubbed of them.
    pub(crate) fn personal_values(&self, out: &mut Vec<String>) {
        for target in &self.privacy.personal_targets {
            let mut node = &self.value;
            for segment in target.split('.') {
                match node.get(segment) {
                    Some(child) => node = child,
                    None => {
                        node = &serde_json::Value::Null;
                        break;
                    }
                }
            }
            match node {
                serde_json::Value::Null => {}
                serde_json::Value::String(s) => out.push(s.clone()),
                other => out.push(other.to_string()),
            }
        }
    }

    /// The payload with every target that reads personal data redacted: the form for snapshots and logs.
    pub fn redacted(&self) -> serde_json::Value {
        let mut out = self.value.clone();
        for target in &self.privacy.personal_targets {
            let mut node = &mut out;
            let mut segments = target.split('.').peekable();
            while let Some(segment) = segments.next() {
                let serde_json::Value::Object(map) = node else {
                    break;
                };
                let Some(child) = map.get_mut(segment) else {
                    break;
                };
                if segments.peek().is_none() {
                    *child = redact_json(child, &self.privacy.redaction);
                    break;
                }
                node = child;
            }
        }
        out
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({})", self.redacted())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable_words() {
        assert_eq!(ReasonCode::RuleFailed.label(), "rule_failed");
        assert_eq!(
            ReasonCode::CostBudgetExceeded.label(),
            "cost_budget_exceeded"
        );
        assert_eq!(WarningCode::RuleError.label(), "rule_error");
        let held = Outcome::Held {
            rule: "discount-approval".into(),
            approver_role: "finance".into(),
            message: "needs approval".into(),
            warnings: vec![],
        };
        assert_eq!(held.label(), "held");
        assert_eq!(held.error_class(), Some(crate::api::ErrorClass::Hold));
    }

    #[test]
    fn payload_prints_personal_targets_redacted_but_keeps_them_for_the_sink() {
        let privacy = Arc::new(PayloadPrivacy {
            personal_targets: vec!["email".into(), "contact.phone".into()],
            redaction: Redaction::Fixed,
        });
        let payload = Payload::new(
            serde_json::json!({"email": "a@b.example", "contact": {"phone": "+1 555"}, "memo": "ok"}),
            privacy,
        );
        let shown = format!("{payload:?} {}", serde_json::to_string(&payload).unwrap());
        assert!(
            !shown.contains("a@b.example") && !shown.contains("+1 555"),
            "{shown}"
        );
        assert!(shown.contains("memo"));
        assert_eq!(payload.as_json()["email"], "a@b.example");
    }
}
