//! `meshline contract diff` and `meshline contract check`, run as a user or CI would run them.

use std::process::{Command, Output};

const EXAMPLE: &str = "examples/salesforce-netsuite/contract.yaml";
const DATA: &str = "tests/data/contract";

fn meshline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshline"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("meshline runs")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn diff_of_a_compatible_version_exits_0() {
    let out = meshline(&[
        "contract",
        "diff",
        EXAMPLE,
        &format!("{DATA}/contract_v1_3_compatible.yaml"),
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("field_added") && stdout.contains("spec.fields[region]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("verdict: compatible") && stdout.contains("allowed"),
        "{stdout}"
    );
}

#[test]
fn diff_of_a_breaking_change_without_a_major_version_exits_3() {
    let out = meshline(&[
        "contract",
        "diff",
        EXAMPLE,
        &format!("{DATA}/contract_v1_3_breaking.yaml"),
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("not allowed: 2 breaking change(s) need a new major version"),
        "{stdout}"
    );

    let out = meshline(&[
        "contract",
        "diff",
        EXAMPLE,
        &format!("{DATA}/contract_v1_3_breaking.yaml"),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(json["allowed"], false);
    assert_eq!(json["verdict"], "breaking");
    assert_eq!(
        json["problems"][0]["code"],
        "breaking_change_without_major_bump"
    );
    assert_eq!(json["changes"].as_array().unwrap().len(), 2);
}

#[test]
fn diff_of_a_breaking_change_with_a_major_version_exits_0() {
    let out = meshline(&[
        "contract",
        "diff",
        EXAMPLE,
        &format!("{DATA}/contract_v2_breaking_major.yaml"),
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("verdict: breaking") && stdout.contains("taken: major"),
        "{stdout}"
    );
}

#[test]
fn diff_of_changed_content_under_the_same_version_exits_3() {
    let out = meshline(&[
        "contract",
        "diff",
        EXAMPLE,
        &format!("{DATA}/contract_v1_2_edited.yaml"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out)
            .0
            .contains("the content changed but the version did not")
    );
}

#[test]
fn invalid_input_exits_2_and_names_the_file_the_path_and_the_reason() {
    let invalid = format!("{DATA}/contract_invalid.yaml");
    let out = meshline(&["contract", "diff", EXAMPLE, &invalid]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(&format!(
            "{invalid}: spec.rules[0].expression: record.stage is not a field"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{invalid}: spec.rules[1].message:")),
        "{stderr}"
    );

    let bad_type = format!("{DATA}/contract_bad_type.yaml");
    let out = meshline(&[
        "contract",
        "check",
        &bad_type,
        "--records",
        &format!("{DATA}/records.jsonl"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains(&format!(
            "{bad_type}: spec.fields[8].type: unknown variant `money`"
        )),
        "{}",
        text(&out).1
    );

    for args in [
        vec![
            "contract",
            "diff",
            EXAMPLE,
            "tests/data/contract/no-such-file.yaml",
        ],
        vec![
            "contract",
            "diff",
            EXAMPLE,
            "tests/data/contract/not_a_contract.yaml",
        ],
        vec![
            "contract",
            "check",
            EXAMPLE,
            "--records",
            "tests/data/contract/no-such-file.jsonl",
            "--lookups",
            "tests/data/contract/lookups.json",
        ],
        vec![
            "contract",
            "check",
            EXAMPLE,
            "--records",
            "tests/data/contract/records.jsonl",
        ],
    ] {
        let out = meshline(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out).1);
        assert!(text(&out).1.starts_with("error: "), "{args:?}");
    }
    assert!(
        text(&meshline(&[
            "contract",
            "check",
            EXAMPLE,
            "--records",
            "tests/data/contract/records.jsonl"
        ]))
        .1
        .contains("pricebook")
    );
}

#[test]
fn check_prints_counts_and_the_first_failures_per_reason_with_personal_values_redacted() {
    let records = format!("{DATA}/records.jsonl");
    let lookups = format!("{DATA}/lookups.json");
    let out = meshline(&[
        "contract",
        "check",
        EXAMPLE,
        "--records",
        &records,
        "--lookups",
        &lookups,
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("records 7: accepted 1, rejected 5, held 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rule_failed: 2") && stdout.contains("line 2: rule price-tolerance"),
        "{stdout}"
    );
    assert!(
        stdout.contains("duplicate_key: 1") && stdout.contains("not_an_object: 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("discount-approval (for finance): 1"),
        "{stdout}"
    );
    assert!(stdout.contains("(value [REDACTED])"), "{stdout}");
    for secret in [
        "not-an-email",
        "bob@private.example",
        "alice.buyer@acme.example",
        "555 0100",
    ] {
        assert!(!stdout.contains(secret), "{secret} leaked: {stdout}");
    }

    let out = meshline(&[
        "contract",
        "check",
        EXAMPLE,
        "--records",
        &records,
        "--lookups",
        &lookups,
        "--output",
        "json",
        "--show",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(json["records"], 7);
    assert_eq!(json["accepted"], 1);
    assert_eq!(json["reasons"]["rule_failed"]["count"], 2);
    assert_eq!(
        json["reasons"]["rule_failed"]["examples"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        json["reasons"]["pattern_mismatch"]["examples"][0]["value"],
        "[REDACTED]"
    );
}
