//! Shared helpers for the contract engine's integration tests (included with `#[path]`; it has no tests itself).
#![allow(dead_code)]

use meshline::contract::{
    self, CompileError, CompileOptions, CompiledContract, Env, Lookups, Outcome,
};

/// A small contract with one field of every type, a lookup, and one mapping target `v` whose expression is the
/// one under test. Rules are optional.
pub fn spec_yaml(expression: &str, rules: &str) -> String {
    format!(
        r#"apiVersion: sync.meshline.io/v1alpha1
kind: SyncContract
metadata:
  name: test
spec:
  version: 1.0.0
  source: {{system: crm, entity: Deal}}
  target: {{system: erp, entity: order}}
  fields:
    - {{name: id, type: string, required: true}}
    - {{name: title, type: string}}
    - {{name: count, type: integer}}
    - {{name: price, type: decimal}}
    - {{name: ratio, type: decimal}}
    - {{name: flag, type: boolean}}
    - {{name: day, type: date}}
    - {{name: at, type: datetime}}
    - {{name: stage, type: enum, enumValues: [Open, Won]}}
    - {{name: tags, type: array, items: string}}
    - {{name: lines, type: array, items: object}}
    - {{name: "lines[].sku", type: string}}
    - {{name: "lines[].qty", type: integer}}
    - {{name: "lines[].price", type: decimal}}
    - {{name: address, type: object}}
    - {{name: address.city, type: string}}
    - {{name: email, type: string, pii: true}}
    - {{name: phone, type: string, pii: true}}
  lookups:
    - name: prices
      fields: [{{name: price, type: decimal}}, {{name: label, type: string}}]
  rules:
{rules}
  mapping:
    externalId: '"D-" + record.id'
    fields:
      - target: v
        expression: {expression}
"#,
        expression = serde_json::to_string(expression).unwrap(),
        rules = if rules.is_empty() {
            "    []".to_string()
        } else {
            rules.to_string()
        },
    )
}

pub const RECORD: &str = r#"{"id":"r1","title":"Hello","count":3,"price":"12.50","ratio":"0.1","flag":true,
"day":"2026-11-27","at":"2026-11-27T10:00:00Z","stage":"Won","tags":["a","b"],
"lines":[{"sku":"A","qty":2,"price":"1.25"},{"sku":"B","qty":1,"price":"10"}],
"address":{"city":"Oslo"},"email":"alice@example.com","phone":"+47 555 0100"}"#;

pub const LOOKUPS: &str =
    r#"{"prices": {"A": {"price": "1.20", "label": "Apple"}, "B": {"price": "10.00"}}}"#;

pub fn compile_yaml(
    yaml: &str,
    options: &CompileOptions,
) -> Result<CompiledContract, Vec<CompileError>> {
    let manifest = contract::parse_manifest(yaml).map_err(|e| vec![e])?;
    contract::compile_with(&manifest.spec, options)
}

pub fn compiled(expression: &str, rules: &str) -> Result<CompiledContract, Vec<CompileError>> {
    compile_yaml(&spec_yaml(expression, rules), &CompileOptions::default())
}

pub fn env(contract: &CompiledContract) -> Env {
    let lookups = Lookups::from_json_bytes(contract, LOOKUPS.as_bytes()).expect("test lookups");
    contract.env("test-flow", &lookups).expect("env")
}

/// Evaluates `expression` as the mapping target `v` against `record`: the value, or the rejection's text.
pub fn eval_on(expression: &str, record: &str) -> Result<serde_json::Value, String> {
    let contract = compiled(expression, "").map_err(|e| format!("compile error: {e:?}"))?;
    match contract.process(record.as_bytes(), &env(&contract)) {
        Outcome::Accepted { payload, .. } => Ok(payload
            .as_json()
            .get("v")
            .cloned()
            .unwrap_or(serde_json::Value::Null)),
        other => Err(other.to_string()),
    }
}

pub fn eval(expression: &str) -> Result<serde_json::Value, String> {
    eval_on(expression, RECORD)
}
