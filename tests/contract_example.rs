//! The reference contract (Salesforce closed-won Opportunity → NetSuite sales order) run end to end.

use meshline::contract::{self, CompiledContract, Env, Lookups, Outcome, ReasonCode, Subject};

const CONTRACT: &str = include_str!("../examples/salesforce-netsuite/contract.yaml");
const LOOKUPS: &[u8] = include_bytes!("data/contract/lookups.json");
const GOOD: &[u8] = include_bytes!("data/contract/good_record.json");

fn example() -> (CompiledContract, Env) {
    let manifest = contract::parse_manifest(CONTRACT).expect("the example manifest parses");
    let compiled = contract::compile(&manifest.spec).expect("the example contract compiles");
    let lookups =
        Lookups::from_json_bytes(&compiled, LOOKUPS).expect("the example pricebook loads");
    let env = compiled
        .env("closed-won-to-netsuite", &lookups)
        .expect("the pricebook is bound");
    (compiled, env)
}

fn with(record: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(record).unwrap();
    edit(&mut value);
    serde_json::to_vec(&value).unwrap()
}

#[test]
fn example_contract_compiles_with_its_content_hash() {
    let (compiled, _) = example();
    assert_eq!(compiled.version().to_string(), "1.2.0");
    assert!(compiled.content_hash().as_str().starts_with("sha256:"));
    assert_eq!(compiled.content_hash().as_str().len(), "sha256:".len() + 64);
}

#[test]
fn good_record_is_accepted_with_the_netsuite_payload() {
    let (compiled, env) = example();
    let outcome = compiled.process(GOOD, &env);
    let Outcome::Accepted {
        payload,
        external_id,
        warnings,
    } = &outcome
    else {
        panic!("expected accepted, got {outcome}")
    };
    assert_eq!(external_id.as_str(), "SF-0065g00000AbCdEFGH");
    assert!(warnings.is_empty(), "{warnings:?}");
    let p = payload.as_json();
    assert_eq!(p["externalId"], "SF-0065g00000AbCdEFGH");
    assert_eq!(p["entity"]["externalId"], "0015g00000XyZabCDE");
    assert_eq!(p["tranDate"], "2026-11-27");
    assert_eq!(p["memo"], "ACME Corp - 2027 renewal");
    assert_eq!(p["currency"]["refName"], "USD");
    assert_eq!(p["email"], "alice.buyer@acme.example");
    assert_eq!(p["discountRate"], 10);
    let items = p["item"]["items"].as_array().expect("line items");
    assert_eq!(items.len(), 5);
    assert_eq!(
        items[0],
        serde_json::json!({"item": {"externalId": "SKU-1001"}, "quantity": 3, "rate": 100})
    );
    assert_eq!(items[2]["rate"], serde_json::json!(19.99));
    assert_eq!(
        items[2]["rate"].to_string(),
        "19.99",
        "decimals are written exactly"
    );
}

#[test]
fn price_drifted_record_is_rejected_by_price_tolerance() {
    let (compiled, env) = example();
    let outcome = compiled.process(
        include_bytes!("data/contract/price_drift_record.json"),
        &env,
    );
    let Outcome::Rejected { reasons } = &outcome else {
        panic!("expected rejected, got {outcome}")
    };
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(reasons[0].code, ReasonCode::RuleFailed);
    assert_eq!(reasons[0].subject, Subject::Rule("price-tolerance".into()));
    assert!(reasons[0].message.contains("5%"));
}

#[test]
fn a_25_percent_discount_is_held_for_finance() {
    let (compiled, env) = example();
    let outcome = compiled.process(
        include_bytes!("data/contract/discount_25_record.json"),
        &env,
    );
    let Outcome::Held {
        rule,
        approver_role,
        message,
        warnings,
    } = &outcome
    else {
        panic!("expected held, got {outcome}")
    };
    assert_eq!(rule, "discount-approval");
    assert_eq!(approver_role, "finance");
    assert!(message.contains("20%"));
    assert!(warnings.is_empty());
}

#[test]
fn an_approved_hold_goes_on_to_the_sink() {
    let (compiled, env) = example();
    let outcome = compiled.process_approved(
        include_bytes!("data/contract/discount_25_record.json"),
        &env,
        &["discount-approval"],
    );
    assert!(outcome.is_accepted(), "{outcome}");
}

#[test]
fn a_large_deal_goes_on_with_a_warning() {
    let (compiled, env) = example();
    let record = with(GOOD, |r| r["amount"] = "750000.00".into());
    let outcome = compiled.process(&record, &env);
    let Outcome::Accepted { warnings, .. } = &outcome else {
        panic!("expected accepted, got {outcome}")
    };
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].rule, "large-deal-notice");
}

#[test]
fn every_failing_reject_rule_is_reported() {
    let (compiled, env) = example();
    let record = with(GOOD, |r| {
        r["stageName"] = "Negotiation".into();
        r["lineItems"][0]["sku"] = "SKU-UNKNOWN".into();
    });
    let Outcome::Rejected { reasons } = compiled.process(&record, &env) else {
        panic!("expected rejected")
    };
    let rules: Vec<String> = reasons.iter().map(|r| r.subject.to_string()).collect();
    assert_eq!(rules, ["rule closed-won-only", "rule known-sku"]);
}

#[test]
fn an_absent_optional_target_is_left_out_of_the_payload() {
    let (compiled, env) = example();
    let record = with(GOOD, |r| {
        r.as_object_mut().unwrap().remove("discountPercent");
    });
    let Outcome::Accepted { payload, .. } = compiled.process(&record, &env) else {
        panic!("expected accepted")
    };
    assert!(payload.as_json().get("discountRate").is_none());
}

#[test]
fn a_schema_violation_is_rejected_before_the_rules_run() {
    let (compiled, env) = example();
    let record = with(GOOD, |r| {
        r["amount"] = "-5".into();
        r["lineItems"][3]["quantity"] = 0.into();
    });
    let Outcome::Rejected { reasons } = compiled.process(&record, &env) else {
        panic!("expected rejected")
    };
    let found: Vec<(String, &str)> = reasons
        .iter()
        .map(|r| (r.subject.to_string(), r.code.label()))
        .collect();
    assert_eq!(
        found,
        [
            ("field amount".to_string(), "below_minimum"),
            ("field lineItems[3].quantity".to_string(), "below_minimum")
        ]
    );
}

#[test]
fn a_record_is_processed_the_same_on_many_threads() {
    let (compiled, env) = example();
    let compiled = std::sync::Arc::new(compiled);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (compiled, env) = (compiled.clone(), env.clone());
            std::thread::spawn(move || (0..50).all(|_| compiled.process(GOOD, &env).is_accepted()))
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
}
