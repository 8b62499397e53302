//! The mapping: how an accepted record becomes the ERP payload and its external id.
//!
//! Each target field has a CEL expression. An expression that is just `record.<path>` is copied straight from
//! the record without the evaluator, which is most of a typical mapping. Targets are dot-separated paths into
//! nested objects. A target marked `optional` is left out when its source is absent instead of failing the
//! record. This module also works out which targets carry personal data, so the payload prints redacted.

use std::collections::HashSet;
use std::sync::Arc;

use kube::core::cel::cel::objects::Value;

use super::cel_env::{as_struct, type_name, value_to_json};
use super::eval::{self, Declarations, EvalError, EvalErrorKind, Frame, Program};
use super::outcome::PayloadPrivacy;
use super::redact::Redaction;
use super::{CompileError, CompileErrorKind};
use crate::api::MappingSpec;

/// Longest external id accepted; ERPs limit their keys, and a key is logged with every delivery.
pub const MAX_EXTERNAL_ID_LEN: usize = 512;

#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) external_id: Program,
    pub(crate) targets: Vec<Target>,
    pub(crate) privacy: Arc<PayloadPrivacy>,
}

#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) name: String,
    segments: Vec<String>,
    optional: bool,
    /// The expression is the external id's (a payload commonly carries its own key): computed once.
    same_as_external_id: bool,
    /// A plain copy of a field nothing else reads: the reader already wrote its JSON to this slot.
    pub(crate) json_slot: Option<usize>,
    pub(crate) program: Program,
}

/// Why a mapping could not be built for a record.
pub(crate) enum MappingFailure {
    /// A target (by name) failed.
    Target(String, EvalError),
    /// The external id failed.
    ExternalId(EvalError),
}

fn is_target(target: &str) -> bool {
    target.split('.').all(|s| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

pub(crate) fn compile(
    spec: &MappingSpec,
    decls: &Declarations<'_>,
    redaction: &Redaction,
    errors: &mut Vec<CompileError>,
) -> Option<Mapping> {
    let external_id = eval::compile(decls, &spec.external_id, "spec.mapping.externalId")
        .map_err(|e| errors.extend(e))
        .ok();
    if spec.fields.is_empty() {
        errors.push(CompileError::new(
            "spec.mapping.fields",
            CompileErrorKind::InvalidMapping,
            "a mapping needs at least one target field".into(),
        ));
    }
    let mut targets = Vec::with_capacity(spec.fields.len());
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, field) in spec.fields.iter().enumerate() {
        let at = |attr: &str| format!("spec.mapping.fields[{i}].{attr}");
        if !is_target(&field.target) {
            errors.push(CompileError::new(
                at("target"),
                CompileErrorKind::InvalidMapping,
                format!(
                    "{:?} is not a target path (use `memo` or `entity.externalId`)",
                    field.target
                ),
            ));
            continue;
        }
        if !seen.insert(&field.target) {
            errors.push(CompileError::new(
                at("target"),
                CompileErrorKind::InvalidMapping,
                format!("target {:?} is mapped twice", field.target),
            ));
            continue;
        }
        // `entity` and `entity.id` cannot both be set: one would overwrite the other.
        if let Some(other) = spec.fields[..i]
            .iter()
            .map(|f| f.target.as_str())
            .find(|other| is_prefix(other, &field.target) || is_prefix(&field.target, other))
        {
            errors.push(CompileError::new(
                at("target"),
                CompileErrorKind::InvalidMapping,
                format!("target {:?} overlaps target {other:?}", field.target),
            ));
            continue;
        }
        match eval::compile(decls, &field.expression, &at("expression")) {
            Ok(program) => targets.push(Target {
                name: field.target.clone(),
                segments: field.target.split('.').map(str::to_string).collect(),
                optional: field.optional,
                same_as_external_id: field.expression.trim() == spec.external_id.trim(),
                json_slot: None,
                program,
            }),
            Err(e) => errors.extend(e),
        }
    }
    let external_id = external_id?;
    let privacy = Arc::new(PayloadPrivacy {
        personal_targets: targets
            .iter()
            .filter(|t| t.program.personal)
            .map(|t| t.name.clone())
            .collect(),
        redaction: redaction.clone(),
    });
    Some(Mapping {
        external_id,
        targets,
        privacy,
    })
}

fn is_prefix(prefix: &str, path: &str) -> bool {
    path.len() > prefix.len() && path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'.'
}

impl Mapping {
    /// Builds the payload and the raw external id for a record that passed its rules.
    pub(crate) fn build(
        &self,
        frame: &mut Frame<'_>,
        record: &Value,
        json: &mut [Option<serde_json::Value>],
    ) -> Result<(serde_json::Value, String), MappingFailure> {
        let key_value = self.external_id.eval(frame);
        // The key as the payload repeats it, when a target has the external id's expression.
        let key_json: fn(&str) -> serde_json::Value;
        let external_id = match key_value {
            Ok(Value::String(s)) if !s.is_empty() && s.len() <= MAX_EXTERNAL_ID_LEN => {
                key_json = |key| serde_json::Value::String(key.to_string());
                // Usually the only reference, so the string is taken rather than copied.
                Arc::try_unwrap(s).unwrap_or_else(|s| s.as_str().to_string())
            }
            Ok(Value::Int(i)) => {
                key_json = |key| serde_json::Value::from(key.parse::<i64>().unwrap_or_default());
                i.to_string()
            }
            Ok(Value::UInt(u)) => {
                key_json = |key| serde_json::Value::from(key.parse::<u64>().unwrap_or_default());
                u.to_string()
            }
            Ok(Value::String(s)) => {
                let problem = if s.is_empty() {
                    "is empty".to_string()
                } else {
                    format!("is longer than {MAX_EXTERNAL_ID_LEN} bytes")
                };
                return Err(MappingFailure::ExternalId(EvalError {
                    kind: EvalErrorKind::Runtime,
                    message: format!("the external id {problem}"),
                }));
            }
            Ok(other) => {
                return Err(MappingFailure::ExternalId(EvalError {
                    kind: EvalErrorKind::Runtime,
                    message: format!(
                        "the external id must be a string or an int, not a {}",
                        type_name(&other)
                    ),
                }));
            }
            Err(e) => return Err(MappingFailure::ExternalId(e)),
        };
        let mut payload = serde_json::Map::new();
        for target in &self.targets {
            let value = match &target.program.direct {
                _ if target.same_as_external_id => Ok(key_json(&external_id)),
                Some(direct) if target.json_slot.is_some() => {
                    match target
                        .json_slot
                        .and_then(|slot| json.get_mut(slot))
                        .and_then(Option::take)
                    {
                        Some(v) => Ok(v),
                        None => Err(EvalError {
                            kind: EvalErrorKind::NoSuchKey,
                            message: format!("{} is absent", direct.path),
                        }),
                    }
                }
                Some(direct) => match follow(record, &direct.slots) {
                    Some(v) => value_to_json(v).map_err(|m| EvalError {
                        kind: EvalErrorKind::Runtime,
                        message: m,
                    }),
                    None => Err(EvalError {
                        kind: EvalErrorKind::NoSuchKey,
                        message: format!("{} is absent", direct.path),
                    }),
                },
                None => target.program.eval_json(frame),
            };
            let value = match value {
                Ok(serde_json::Value::Null) if target.optional => continue,
                Ok(v) => v,
                Err(e) if target.optional && e.kind == EvalErrorKind::NoSuchKey => continue,
                Err(e) => return Err(MappingFailure::Target(target.name.clone(), e)),
            };
            insert(&mut payload, &target.segments, value);
        }
        Ok((serde_json::Value::Object(payload), external_id))
    }
}

fn follow<'v>(record: &'v Value, slots: &[usize]) -> Option<&'v Value> {
    let mut value = record;
    for &slot in slots {
        value = as_struct(value)?.fields.get(slot)?.as_ref()?;
    }
    Some(value)
}

fn insert(
    payload: &mut serde_json::Map<String, serde_json::Value>,
    segments: &[String],
    value: serde_json::Value,
) {
    let (last, parents) = segments
        .split_last()
        .expect("a target has at least one segment");
    let mut node = payload;
    for segment in parents {
        let child = node
            .entry(segment.clone())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if !child.is_object() {
            *child = serde_json::Value::Object(serde_json::Map::new());
        }
        node = child.as_object_mut().expect("just made an object");
    }
    node.insert(last.clone(), value);
}
