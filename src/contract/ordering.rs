//! The ordering of a record's revisions: which field of the source record says which revision is newer, and
//! its value normalised to one sortable integer that the ledger compares.
//!
//! It owns the compile-time checks of `spec.ordering` and the extraction of the value from a record. It does
//! not decide what happens to an older revision (the ledger does: recorded as stale, never delivered).
//!
//! **Why the field must be a required `datetime` or `integer` at a fixed path.** The ledger compares two
//! revisions of one record, so each revision needs exactly one value of a type whose order means "newer":
//! a modification stamp or a version number. A string (lexical order) or a decimal would order revisions by
//! accident, and a field under an array has several values per record. Requiring the field means a
//! revision without its ordering value is refused by the schema like any other missing required field
//! (a dead letter naming the field), never delivered unordered.
//!
//! **Normal form.** A date-time becomes microseconds since the Unix epoch (UTC), so the sub-millisecond stamps
//! some systems write still order correctly and offsets compare as instants; an integer is itself. Both fit
//! an `i64`. The two scales are never compared with each other within one contract version; changing the
//! ordering field's type between versions is a breaking change the compatibility check reports.

use serde_json::Value;

use super::{CompileError, CompileErrorKind};
use crate::api::{FieldSpec, FieldType, OrderingSpec};

/// A compiled `spec.ordering`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionOrdering {
    /// The field path as declared (`systemModstamp`, `properties.hs_lastmodifieddate`).
    field: String,
    segments: Vec<String>,
    kind: OrderingKind,
}

/// The type of the ordering field, which fixes how its value is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingKind {
    /// RFC 3339 date-time with offset, normalised to microseconds since the Unix epoch.
    Datetime,
    /// A version number, compared as itself.
    Integer,
}

/// Why a record carries no usable ordering value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderingError {
    #[error("the ordering field {field} is missing")]
    Missing { field: String },
    #[error("the ordering field {field} is not {expected}")]
    Invalid {
        field: String,
        expected: &'static str,
    },
}

impl RevisionOrdering {
    /// The declared field path.
    pub fn field(&self) -> &str {
        &self.field
    }

    pub fn kind(&self) -> OrderingKind {
        self.kind
    }

    /// The record's ordering value in its normal form (see the module doc).
    pub fn value_of(&self, record: &Value) -> Result<i64, OrderingError> {
        let mut at = record;
        for segment in &self.segments {
            at = match at.get(segment) {
                Some(v) => v,
                None => {
                    return Err(OrderingError::Missing {
                        field: self.field.clone(),
                    });
                }
            };
        }
        let invalid = |expected| OrderingError::Invalid {
            field: self.field.clone(),
            expected,
        };
        match (self.kind, at) {
            (_, Value::Null) => Err(OrderingError::Missing {
                field: self.field.clone(),
            }),
            (OrderingKind::Datetime, Value::String(text)) => {
                chrono::DateTime::parse_from_rfc3339(text)
                    .map(|t| t.timestamp_micros())
                    .map_err(|_| invalid("an RFC 3339 date-time with offset"))
            }
            (OrderingKind::Datetime, _) => Err(invalid("an RFC 3339 date-time with offset")),
            // The schema reads an integer from a JSON number without a fraction (`12`, `12.0`, `1.2e1`).
            (OrderingKind::Integer, Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                        .map(|f| f as i64)
                })
                .ok_or_else(|| invalid("an integer within 64 bits")),
            (OrderingKind::Integer, _) => Err(invalid("an integer")),
        }
    }
}

/// Compiles `spec.ordering` against the declared fields; problems are added to `errors`.
pub(crate) fn compile(
    spec: Option<&OrderingSpec>,
    fields: &[FieldSpec],
    errors: &mut Vec<CompileError>,
) -> Option<RevisionOrdering> {
    let spec = spec?;
    let fail = |errors: &mut Vec<CompileError>, reason: String| {
        errors.push(CompileError::new(
            "spec.ordering.field",
            CompileErrorKind::InvalidOrdering,
            reason,
        ));
        None
    };
    if spec.field.contains("[]") {
        return fail(
            errors,
            format!(
                "{:?} is inside an array; a record needs exactly one ordering value",
                spec.field
            ),
        );
    }
    let Some(field) = fields.iter().find(|f| f.name == spec.field) else {
        return fail(
            errors,
            format!(
                "{:?} is not a declared field; declare it in spec.fields as a required datetime or integer",
                spec.field
            ),
        );
    };
    let kind = match field.r#type {
        FieldType::Datetime => OrderingKind::Datetime,
        FieldType::Integer => OrderingKind::Integer,
        other => {
            return fail(
                errors,
                format!(
                    "{:?} is of type {}; an ordering field is a datetime (a modification stamp) or an integer \
                     (a version number), whose order means newer",
                    spec.field,
                    other.as_str()
                ),
            );
        }
    };
    if !field.required {
        return fail(
            errors,
            format!(
                "{:?} must be required: a revision without its ordering value cannot be placed among the \
                 record's other revisions",
                spec.field
            ),
        );
    }
    Some(RevisionOrdering {
        field: spec.field.clone(),
        segments: spec.field.split('.').map(str::to_string).collect(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(name: &str, ty: FieldType, required: bool) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            r#type: ty,
            items: None,
            required,
            enum_values: None,
            pattern: None,
            minimum: None,
            maximum: None,
            max_length: None,
            pii: false,
            description: None,
        }
    }

    fn compiled(name: &str, fields: &[FieldSpec]) -> Result<RevisionOrdering, Vec<CompileError>> {
        let mut errors = Vec::new();
        let spec = OrderingSpec { field: name.into() };
        compile(Some(&spec), fields, &mut errors).ok_or(errors)
    }

    #[test]
    fn datetimes_normalise_to_instants_in_microseconds() {
        let ordering = compiled(
            "meta.modifiedAt",
            &[field("meta.modifiedAt", FieldType::Datetime, true)],
        )
        .unwrap();
        let at = |s: &str| ordering.value_of(&json!({"meta": {"modifiedAt": s}}));
        assert_eq!(
            at("2026-11-27T10:15:00Z").unwrap() + 1,
            at("2026-11-27T10:15:00.000001Z").unwrap()
        );
        // The same instant in another offset is the same value; a later instant is larger.
        assert_eq!(
            at("2026-11-27T11:15:00+01:00").unwrap(),
            at("2026-11-27T10:15:00Z").unwrap()
        );
        assert!(at("2026-11-27T10:20:00Z").unwrap() > at("2026-11-27T10:15:00Z").unwrap());
        assert!(matches!(
            at("27/11/2026"),
            Err(OrderingError::Invalid { .. })
        ));
        assert!(matches!(
            ordering.value_of(&json!({"meta": {}})),
            Err(OrderingError::Missing { .. })
        ));
    }

    #[test]
    fn integers_are_their_own_order() {
        let ordering = compiled("version", &[field("version", FieldType::Integer, true)]).unwrap();
        assert_eq!(ordering.value_of(&json!({"version": 7})), Ok(7));
        assert_eq!(ordering.value_of(&json!({"version": 7.0})), Ok(7));
        assert!(ordering.value_of(&json!({"version": 7.5})).is_err());
        assert!(ordering.value_of(&json!({"version": "7"})).is_err());
        assert!(matches!(
            ordering.value_of(&json!({"version": null})),
            Err(OrderingError::Missing { .. })
        ));
    }

    #[test]
    fn an_ordering_field_must_be_a_declared_required_stamp_or_version() {
        let fields = [
            field("name", FieldType::String, true),
            field("stamp", FieldType::Datetime, false),
            field("lines", FieldType::Array, true),
            field("lines[].at", FieldType::Datetime, true),
        ];
        for (name, expect) in [
            ("missing", "not a declared field"),
            ("name", "of type string"),
            ("stamp", "must be required"),
            ("lines[].at", "inside an array"),
        ] {
            let errors = compiled(name, &fields).unwrap_err();
            assert_eq!(errors.len(), 1, "{name}: {errors:?}");
            assert_eq!(errors[0].path, "spec.ordering.field");
            assert!(errors[0].reason.contains(expect), "{name}: {errors:?}");
        }
    }
}
