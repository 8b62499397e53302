//! Personal data never leaves the engine in the clear, except in the payload handed to the sink: not in an
//! outcome's `Display`, `Debug` or JSON, not in a violation, a rule error, a function's error, a snapshot or a
//! held record. The one redaction function decides what appears instead.

#[path = "contract_helpers.rs"]
mod helpers;

use helpers::compile_yaml;
use meshline::contract::{
    CompileOptions, CompiledContract, Env, Lookups, Outcome, Redaction, redact,
};

const EMAIL: &str = "alice.private@example.com";
const PHONE: &str = "+47 555 0100";
const SECRETS: [&str; 4] = [EMAIL, "alice.private", PHONE, "555 0100"];

fn contract(rules: &str, external_id: &str, redaction: Redaction) -> (CompiledContract, Env) {
    let yaml = format!(
        r#"apiVersion: sync.meshline.io/v1alpha1
kind: SyncContract
metadata: {{name: pii}}
spec:
  version: 1.0.0
  source: {{system: crm, entity: Contact}}
  target: {{system: erp, entity: customer}}
  fields:
    - {{name: id, type: string, required: true}}
    - {{name: email, type: string, pii: true, pattern: "^[^@]+@[^@]+$", maxLength: 40}}
    - {{name: phone, type: string, pii: true}}
    - {{name: contact, type: object}}
    - {{name: contact.mobile, type: string, pii: true}}
    - {{name: score, type: integer}}
  lookups:
    - name: blocked
      fields: [{{name: reason, type: string}}]
  rules:
{rules}
  mapping:
    externalId: {external_id}
    fields:
      - {{target: customer.email, expression: record.email}}
      - {{target: customer.greeting, expression: "'Hello ' + record.phone", optional: true}}
      - {{target: ref, expression: record.id}}
"#
    );
    let options = CompileOptions {
        redaction,
        ..CompileOptions::default()
    };
    let compiled = compile_yaml(&yaml, &options).expect("the PII contract compiles");
    let lookups =
        Lookups::from_json_bytes(&compiled, br#"{"blocked": {"x@y.z": {"reason": "fraud"}}}"#)
            .unwrap();
    let env = compiled.env("pii-flow", &lookups).unwrap();
    (compiled, env)
}

fn record(email: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"id": "c1", "email": email, "phone": PHONE, "contact": {"mobile": PHONE}, "score": 5}))
        .unwrap()
}

/// Every way an outcome can be printed or serialised.
fn printed(outcome: &Outcome) -> String {
    format!(
        "{outcome}\n{outcome:?}\n{}\n{}",
        serde_json::to_string(outcome).unwrap(),
        serde_json::to_string_pretty(outcome).unwrap()
    )
}

fn assert_clean(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret:?} leaked into:\n{text}");
    }
}

#[test]
fn an_accepted_record_prints_its_personal_payload_fields_redacted() {
    let (contract, env) = contract("    []", "record.id", Redaction::Fixed);
    let outcome = contract.process(&record(EMAIL), &env);
    let Outcome::Accepted { payload, .. } = &outcome else {
        panic!("{outcome}")
    };
    // The sink gets the real values...
    assert_eq!(payload.as_json()["customer"]["email"], EMAIL);
    assert_eq!(
        payload.as_json()["customer"]["greeting"],
        format!("Hello {PHONE}")
    );
    // ...and nothing else does.
    assert_clean(&printed(&outcome));
    assert_clean(&payload.redacted().to_string());
    assert!(printed(&outcome).contains("[REDACTED]"));
}

#[test]
fn an_external_id_made_from_personal_data_prints_redacted() {
    let (contract, env) = contract("    []", "record.email", Redaction::Fixed);
    let outcome = contract.process(&record(EMAIL), &env);
    let Outcome::Accepted { external_id, .. } = &outcome else {
        panic!("{outcome}")
    };
    assert_eq!(external_id.as_str(), EMAIL);
    assert_clean(&printed(&outcome));
}

#[test]
fn violations_of_personal_fields_carry_the_redacted_value() {
    let (contract, env) = contract("    []", "record.id", Redaction::Fixed);
    for bad in [
        "alice.private-at-example.com",
        "alice.private@example.com.with.a.very.long.tail.example",
    ] {
        let outcome = contract.process(&record(bad), &env);
        let Outcome::Rejected { reasons } = &outcome else {
            panic!("{outcome}")
        };
        assert_eq!(reasons[0].value.as_deref(), Some("[REDACTED]"));
        let text = printed(&outcome);
        assert!(!text.contains("alice.private"), "{text}");
    }
    // A wrong type of a personal field is redacted too.
    let outcome = contract.process(br#"{"id": "c1", "email": 5551234, "phone": 5550100}"#, &env);
    assert!(
        !printed(&outcome).contains("5551234") && !printed(&outcome).contains("5550100"),
        "{outcome}"
    );
}

#[test]
fn errors_that_would_quote_a_personal_value_are_scrubbed() {
    let rules = "    - {name: not-blocked, expression: 'blocked[record.email].reason == \"\"', message: m}\n    - {name: mobile-quantity, expression: 'quantity(record.contact.mobile).isInteger()', message: m}\n    - {name: phone-int, expression: 'int(record.phone) > 0', message: m, action: warn}";
    let (contract, env) = contract(rules, "record.id", Redaction::Fixed);
    let outcome = contract.process(&record(EMAIL), &env);
    let Outcome::Rejected { reasons } = &outcome else {
        panic!("{outcome}")
    };
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].message.contains("no such key (not shown"),
        "{}",
        reasons[0].message
    );
    assert!(
        reasons[1]
            .message
            .contains("quantity failed (details not shown"),
        "{}",
        reasons[1].message
    );
    assert_clean(&printed(&outcome));
}

#[test]
fn a_held_record_and_its_warnings_carry_no_personal_values() {
    let rules = "    - {name: review, expression: 'record.score > 10', message: Low scores need review, action: hold, approverRole: sales-ops}\n    - {name: phone-int, expression: 'int(record.phone) > 0', message: m, action: warn}";
    let (contract, env) = contract(rules, "record.id", Redaction::Fixed);
    let outcome = contract.process(&record(EMAIL), &env);
    assert!(matches!(outcome, Outcome::Held { .. }), "{outcome}");
    assert_clean(&printed(&outcome));
}

#[test]
fn snapshots_keep_declared_fields_and_redact_the_personal_ones() {
    let (contract, _) = contract("    []", "record.id", Redaction::Fixed);
    let bytes = serde_json::to_vec(&serde_json::json!({
        "id": "c1", "email": EMAIL, "phone": PHONE, "contact": {"mobile": PHONE, "note": PHONE}, "score": 5, "undeclared": PHONE
    }))
    .unwrap();
    let snapshot = contract.snapshot(&bytes);
    assert_eq!(snapshot["id"], "c1");
    assert_eq!(snapshot["score"], 5);
    assert_eq!(snapshot["email"], "[REDACTED]");
    assert_eq!(snapshot["contact"]["mobile"], "[REDACTED]");
    assert!(snapshot.get("undeclared").is_none() && snapshot["contact"].get("note").is_none());
    assert_clean(&snapshot.to_string());
    // A record that cannot be read is described, never quoted.
    let unreadable = contract.snapshot(format!("{{\"email\": \"{EMAIL}\"").as_bytes());
    assert_clean(&unreadable.to_string());
    assert_eq!(unreadable["$unreadable"]["reason"], "invalid_json");
}

#[test]
fn keyed_redaction_gives_a_stable_token_without_the_value_or_the_key() {
    let key = b"redaction-key-from-a-secret".to_vec();
    let (contract, env) = contract("    []", "record.id", Redaction::keyed(key.clone()));
    let first = contract.process(&record("alice.private-at-example.com"), &env);
    let second = contract.process(&record("alice.private-at-example.com"), &env);
    let Outcome::Rejected { reasons } = &first else {
        panic!()
    };
    let token = reasons[0].value.clone().unwrap();
    assert!(
        token.starts_with("[REDACTED:") && token.len() == "[REDACTED:]".len() + 16,
        "{token}"
    );
    assert_eq!(
        token,
        redact("alice.private-at-example.com", &Redaction::keyed(key))
    );
    assert_eq!(printed(&first), printed(&second));
    let text = printed(&first) + &format!("{:?}", contract.redaction());
    assert!(
        !text.contains("alice.private") && !text.contains("redaction-key"),
        "{text}"
    );
}
