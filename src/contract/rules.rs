//! Business rules: compiled from `spec.rules`, evaluated against each valid record.
//!
//! A rule is a CEL expression that is `true` when the record passes. What a failing rule does is its action:
//! `reject` sends the record to the dead letters with the rule's message, `hold` parks it for the approver
//! role, `warn` lets it go on with a warning. This module decides a rule's verdict; turning verdicts into one
//! outcome is the contract's job (`CompiledContract::process`).

use std::collections::HashMap;

use kube::core::cel::cel::objects::Value;

use super::cel_env::type_name;
use super::eval::{self, Declarations, EvalError, Frame, Program};
use super::{CompileError, CompileErrorKind};
use crate::api::{RuleAction, RuleSpec};

#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) message: String,
    pub(crate) action: RuleAction,
    pub(crate) approver_role: Option<String>,
    pub(crate) program: Program,
}

/// What one rule said about one record.
pub(crate) enum Verdict {
    Pass,
    Fail,
    Error(EvalError),
}

impl Rule {
    pub(crate) fn check(&self, frame: &mut Frame<'_>) -> Verdict {
        match self.program.eval(frame) {
            Ok(Value::Bool(true)) => Verdict::Pass,
            Ok(Value::Bool(false)) => Verdict::Fail,
            Ok(other) => Verdict::Error(EvalError {
                kind: eval::EvalErrorKind::Runtime,
                message: format!("the rule evaluated to a {}, not a bool", type_name(&other)),
            }),
            Err(e) => Verdict::Error(e),
        }
    }
}

fn is_rule_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub(crate) fn compile(
    specs: &[RuleSpec],
    decls: &Declarations<'_>,
    errors: &mut Vec<CompileError>,
) -> Vec<Rule> {
    let mut rules = Vec::with_capacity(specs.len());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let at = |attr: &str| format!("spec.rules[{i}].{attr}");
        let mut ok = true;
        let mut fail = |path: String, kind, reason: String| {
            errors.push(CompileError::new(path, kind, reason));
            ok = false;
        };
        if !is_rule_name(&spec.name) {
            fail(
                at("name"),
                CompileErrorKind::InvalidRule,
                format!(
                    "{:?} is not a rule name (lowercase letters, digits and '-')",
                    spec.name
                ),
            );
        } else if let Some(first) = seen.insert(&spec.name, i) {
            fail(
                at("name"),
                CompileErrorKind::InvalidRule,
                format!(
                    "rule {:?} is declared twice (first at spec.rules[{first}])",
                    spec.name
                ),
            );
        }
        if spec.message.trim().is_empty() {
            fail(
                at("message"),
                CompileErrorKind::MissingMessage,
                "a rule needs a message for the people who handle a failing record".into(),
            );
        }
        match (spec.action, &spec.approver_role) {
            (RuleAction::Hold, None) => fail(
                at("approverRole"),
                CompileErrorKind::InvalidRule,
                "a hold rule needs the approverRole that releases it".into(),
            ),
            (RuleAction::Hold, Some(role)) if role.trim().is_empty() => fail(
                at("approverRole"),
                CompileErrorKind::InvalidRule,
                "approverRole must not be empty".into(),
            ),
            (RuleAction::Reject | RuleAction::Warn, Some(_)) => fail(
                at("approverRole"),
                CompileErrorKind::InvalidRule,
                "approverRole applies to hold rules only".into(),
            ),
            _ => {}
        }
        match eval::compile(decls, &spec.expression, &at("expression")) {
            Ok(program) if ok => rules.push(Rule {
                name: spec.name.clone(),
                message: spec.message.clone(),
                action: spec.action,
                approver_role: spec.approver_role.clone(),
                program,
            }),
            Ok(_) => {}
            Err(e) => errors.extend(e),
        }
    }
    rules
}
