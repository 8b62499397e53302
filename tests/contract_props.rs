//! Property tests of the record validator and the CEL evaluation path: arbitrary input never panics and
//! always yields one of the three outcomes; decimal arithmetic is exact; and the evaluator agrees with the `cel`
//! interpreter on random expressions wherever the interpreter has an answer.

#[path = "contract_helpers.rs"]
mod helpers;

use std::sync::LazyLock;

use kube::core::cel::KubeCelExt;
use kube::core::cel::cel::objects::{Key, Map, Value};
use kube::core::cel::cel::{Context, Program};
use meshline::contract::{self, CompiledContract, Env, Lookups, Outcome};
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::sync::Arc;

const EXAMPLE: &str = include_str!("../examples/salesforce-netsuite/contract.yaml");
const GOOD: &str = include_str!("data/contract/good_record.json");

static EXAMPLE_CONTRACT: LazyLock<(CompiledContract, Env)> = LazyLock::new(|| {
    let compiled = contract::compile(&contract::parse_manifest(EXAMPLE).unwrap().spec).unwrap();
    let lookups =
        Lookups::from_json_bytes(&compiled, include_bytes!("data/contract/lookups.json")).unwrap();
    let env = compiled.env("props", &lookups).unwrap();
    (compiled, env)
});

/// The invariants of every outcome: a rejection says why, a hold names its rule and role, an acceptance has a
/// payload and a key; and the outcome prints and serialises.
fn assert_well_formed(outcome: &Outcome) {
    match outcome {
        Outcome::Rejected { reasons } => {
            assert!(!reasons.is_empty());
            assert!(
                reasons
                    .iter()
                    .all(|r| !r.message.is_empty() && !r.code.label().is_empty())
            );
        }
        Outcome::Held {
            rule,
            approver_role,
            ..
        } => assert!(!rule.is_empty() && !approver_role.is_empty()),
        Outcome::Accepted {
            payload,
            external_id,
            ..
        } => {
            assert!(payload.as_json().is_object());
            assert!(!external_id.as_str().is_empty());
        }
    }
    let _ = format!("{outcome} {outcome:?}");
    serde_json::to_string(outcome).unwrap();
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-zA-Z0-9 @.:-]{0,20}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("Closed Won"),
            Just("USD"),
            Just("SKU-1001"),
            Just("2026-11-27"),
            Just("12.50")
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 14] = [
    "id",
    "name",
    "stageName",
    "closeDate",
    "systemModstamp",
    "accountId",
    "accountName",
    "currencyIsoCode",
    "amount",
    "discountPercent",
    "customerEmail",
    "customerPhone",
    "lineItems",
    "unknownField",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_yield_one_outcome(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let (contract, env) = &*EXAMPLE_CONTRACT;
        let outcome = contract.process(&bytes, env);
        assert_well_formed(&outcome);
        prop_assert!(!outcome.is_accepted());
    }

    #[test]
    fn arbitrary_json_never_panics_and_yields_one_outcome(value in json_value()) {
        let (contract, env) = &*EXAMPLE_CONTRACT;
        assert_well_formed(&contract.process(value.to_string().as_bytes(), env));
        let _ = contract.snapshot(value.to_string().as_bytes());
    }

    #[test]
    fn a_good_record_with_any_field_replaced_never_panics(
        field in 0..FIELDS.len(),
        line_field in prop_oneof![Just("sku"), Just("quantity"), Just("unitPrice"), Just("productName")],
        value in json_value(),
        in_line in any::<bool>(),
    ) {
        let (contract, env) = &*EXAMPLE_CONTRACT;
        let mut record: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        if in_line {
            record["lineItems"][2][line_field] = value;
        } else {
            record[FIELDS[field]] = value;
        }
        let outcome = contract.process(record.to_string().as_bytes(), env);
        assert_well_formed(&outcome);
        if let Outcome::Accepted { payload, .. } = &outcome {
            prop_assert_eq!(&payload.as_json()["otherRefNum"], &record["id"]);
        }
    }

    #[test]
    fn decimal_arithmetic_is_exact(
        a in -10_000_000_000i64..10_000_000_000,
        b in -10_000_000_000i64..10_000_000_000,
        scale_a in 0u32..6,
        scale_b in 0u32..6,
        op in prop_oneof![Just("add"), Just("sub"), Just("mul")],
    ) {
        let (x, y) = (Decimal::new(a, scale_a), Decimal::new(b, scale_b));
        let expected = match op {
            "add" => x + y,
            "sub" => x - y,
            _ => x * y,
        };
        let expression = format!("decimal('{x}').{op}(decimal('{y}')) == decimal('{expected}') && string(decimal('{x}').{op}(decimal('{y}'))) == string(decimal('{expected}'))");
        prop_assert_eq!(helpers::eval(&expression), Ok(serde_json::json!(true)), "{}", expression);
    }

    #[test]
    fn the_evaluator_agrees_with_the_cel_interpreter(expression in bool_expr()) {
        static INTERPRETER: LazyLock<Context<'static>> = LazyLock::new(|| {
            let mut ctx = Context::default();
            ctx.register_all();
            // The same two fields the evaluator's record has (see helpers::RECORD).
            let record = [(Key::from("count"), Value::Int(3)), (Key::from("flag"), Value::Bool(true))];
            ctx.add_variable_from_value("record", Value::Map(Map { map: Arc::new(record.into_iter().collect()) }));
            ctx
        });
        let theirs = Program::compile(&expression).unwrap().execute(&INTERPRETER);
        let ours = helpers::eval(&expression);
        prop_assume!(!matches!(&ours, Err(e) if e.contains("ExpressionTooComplex") || e.contains("ExpressionTooLong")));
        // Where the interpreter has an answer, the evaluator gives the same one. (The evaluator may answer
        // where the interpreter fails: `all` and `exists` absorb errors as the CEL specification says.)
        if let Ok(theirs) = theirs {
            prop_assert_eq!(ours, Ok(theirs.json().unwrap()), "{}", expression);
        }
    }
}

fn int_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        (-20i64..20).prop_map(|i| i.to_string()),
        Just("record.count".to_string())
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop_oneof![Just("+"), Just("-"), Just("*"), Just("/"), Just("%")],
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (inner.clone(), inner.clone())
                .prop_map(|(a, b)| format!("(({a}) > ({b}) ? {a} : {b})")),
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("size([{}])", items.join(", "))),
            "[a-z]{0,6}".prop_map(|s| format!("size('{s}')")),
            (prop::collection::vec(inner, 0..4), -5i64..5)
                .prop_map(|(items, k)| format!("size([{}].filter(x, x > {k}))", items.join(", "))),
        ]
    })
}

fn bool_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        (
            int_expr(),
            prop_oneof![Just("<"), Just("<="), Just("=="), Just("!="), Just(">")],
            int_expr()
        )
            .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
        ("[a-z]{0,4}", "[a-z]{0,4}").prop_map(|(a, b)| format!("('{a}' + '{b}' == '{b}{a}')")),
        (int_expr(), prop::collection::vec(-5i64..5, 0..4)).prop_map(|(a, l)| format!(
            "({a} in [{}])",
            l.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        )),
        (prop::collection::vec(int_expr(), 0..4), -5i64..5)
            .prop_map(|(l, k)| format!("[{}].all(x, x > {k})", l.join(", "))),
        (prop::collection::vec(int_expr(), 0..4), -5i64..5)
            .prop_map(|(l, k)| format!("[{}].exists(x, x == {k})", l.join(", "))),
        Just("record.flag".to_string()),
    ];
    leaf.prop_recursive(2, 8, 2, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop_oneof![Just("&&"), Just("||")],
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            inner.prop_map(|a| format!("!{a}")),
        ]
    })
}
