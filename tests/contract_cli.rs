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

/// The example contract at another version, with or without its sign-offs, in a temporary directory.
fn bumped(dir: &std::path::Path, version: &str, keep_sign_offs: bool) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/hubspot-odoo/contract.yaml"
    ))
    .unwrap();
    let mut c: meshline::api::SyncContract = serde_yaml::from_str(&text).unwrap();
    c.spec.version = version.into();
    if keep_sign_offs {
        for s in &mut c.spec.sign_offs {
            s.version = version.into();
        }
    } else {
        c.spec.sign_offs.clear();
    }
    let path = dir.join(format!("contract-{version}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(&c).unwrap()).unwrap();
    path
}

#[test]
fn diff_with_the_flows_and_rosters_names_the_owners_who_must_sign() {
    let dir = tempfile::tempdir().unwrap();
    let old = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/hubspot-odoo/contract.yaml"
    );
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    for f in ["flow.yaml", "roster.yaml"] {
        std::fs::copy(
            format!("{}/examples/hubspot-odoo/{f}", env!("CARGO_MANIFEST_DIR")),
            manifests.join(f),
        )
        .unwrap();
    }
    let new = bumped(dir.path(), "2.0.2", false);
    let out = meshline(&[
        "contract",
        "diff",
        old,
        new.to_str().unwrap(),
        "--manifests",
        manifests.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("2. sign-off: needed"), "{stdout}");
    assert!(
        stdout.contains("lena (sourceOwner of flow won-deals-to-odoo): missing"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tomas (sinkOwner of flow won-deals-to-odoo): missing"),
        "{stdout}"
    );
    assert!(stdout.contains("preflight replay: a Job replays recent records of won-deals-to-odoo"));

    // The same as JSON, with the content hash a sign-off can name.
    let out = meshline(&[
        "contract",
        "diff",
        old,
        new.to_str().unwrap(),
        "--manifests",
        manifests.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gates = &v["gates"];
    assert!(
        gates["contentHash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let owners: Vec<(&str, bool)> = gates["signOffs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["owner"].as_str().unwrap(), s["signed"].as_bool().unwrap()))
        .collect();
    assert_eq!(owners, vec![("lena", false), ("tomas", false)]);

    // Signed: complete.
    let signed = bumped(dir.path(), "2.0.3", true);
    let out = meshline(&[
        "contract",
        "diff",
        old,
        signed.to_str().unwrap(),
        "--manifests",
        manifests.to_str().unwrap(),
    ]);
    assert!(text(&out).0.contains("2. sign-off: complete"));
}

#[test]
fn validate_against_the_deployed_version_fails_a_change_the_controller_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let base = |f: &str| format!("{}/examples/hubspot-odoo/{f}", env!("CARGO_MANIFEST_DIR"));
    // Same version, other content: the controller refuses it.
    let text_ = std::fs::read_to_string(base("contract.yaml")).unwrap();
    let mut c: meshline::api::SyncContract = serde_yaml::from_str(&text_).unwrap();
    c.spec.sla = None;
    let edited = dir.path().join("contract.yaml");
    std::fs::write(&edited, serde_yaml::to_string(&c).unwrap()).unwrap();
    let out = meshline(&[
        "validate",
        edited.to_str().unwrap(),
        &base("flow.yaml"),
        &base("roster.yaml"),
        "--previous",
        &base("contract.yaml"),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("BLOCKED (ContentChangedWithoutVersion)"),
        "{stdout}"
    );
    assert!(stderr.contains("will refuse the new version"), "{stderr}");

    // Without --previous it still names who must sign, and passes.
    let out = meshline(&[
        "validate",
        &base("contract.yaml"),
        &base("flow.yaml"),
        &base("roster.yaml"),
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("sign-off by lena (sourceOwner of flow won-deals-to-odoo)"),
        "{stdout}"
    );
}
