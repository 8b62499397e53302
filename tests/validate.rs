//! `meshline validate` as a pull-request check: the examples pass, every kind of mistake is reported with its
//! file, object, field path and reason, and no input makes it panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use meshline::validate::{self, Options, Report, Severity};
use proptest::prelude::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn validate_text(files: &[(&str, &str)]) -> Report {
    let mut issues = Vec::new();
    let mut docs = Vec::new();
    for (name, text) in files {
        docs.extend(validate::parse_documents(
            name,
            text.as_bytes(),
            &mut issues,
        ));
    }
    let mut report = validate::validate_documents(docs, &Options::default());
    issues.append(&mut report.issues);
    report.issues = issues;
    report
}

fn example(name: &str) -> String {
    std::fs::read_to_string(repo(&format!("examples/salesforce-netsuite/{name}.yaml"))).unwrap()
}

/// The three closed-won manifests with one textual replacement applied to one of them.
fn closed_won_with(file: &str, from: &str, to: &str) -> Report {
    let mut texts: Vec<(String, String)> = ["contract", "flow", "roster"]
        .iter()
        .map(|n| (n.to_string(), example(n)))
        .collect();
    let target = texts.iter_mut().find(|(n, _)| n == file).unwrap();
    assert!(target.1.contains(from), "{from:?} not in {file}.yaml");
    target.1 = target.1.replacen(from, to, 1);
    let refs: Vec<(&str, &str)> = texts
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    validate_text(&refs)
}

fn errors(report: &Report) -> Vec<String> {
    report
        .issues
        .iter()
        .filter(|i| i.severity == Severity::Error)
        .map(|i| i.to_string())
        .collect()
}

fn assert_error(report: &Report, path: &str, reason_part: &str) {
    let found = report
        .issues
        .iter()
        .any(|i| i.severity == Severity::Error && i.path == path && i.reason.contains(reason_part));
    assert!(
        found,
        "expected an error at {path:?} containing {reason_part:?}, got:\n{}",
        errors(report).join("\n")
    );
}

#[test]
fn every_example_passes_validation() {
    let dirs: Vec<PathBuf> = std::fs::read_dir(repo("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert!(dirs.len() >= 2, "at least two example sets");
    for dir in dirs {
        let report = validate::validate_paths(std::slice::from_ref(&dir), &Options::default());
        assert!(
            report.is_ok(),
            "{}:\n{}",
            dir.display(),
            errors(&report).join("\n")
        );
        assert_eq!(
            report.objects,
            3,
            "{} should hold a roster, a contract and a flow",
            dir.display()
        );
        assert!(
            dir.join("README.md").exists(),
            "{} needs a README",
            dir.display()
        );
    }
}

#[test]
fn the_cli_exits_non_zero_and_names_file_object_path_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let flow = example("flow").replace("replicas: 2", "replicas: 2\n  replcas: 3");
    std::fs::write(dir.path().join("flow.yaml"), flow).unwrap();
    std::fs::write(dir.path().join("contract.yaml"), example("contract")).unwrap();
    std::fs::write(dir.path().join("roster.yaml"), example("roster")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshline"))
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("flow.yaml"), "{stderr}");
    assert!(
        stderr.contains("SyncFlow revenue-sync/closed-won-to-netsuite"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.replcas: unknown field (did you mean \"replicas\"?)"),
        "{stderr}"
    );

    let ok = Command::new(env!("CARGO_BIN_EXE_meshline"))
        .args(["validate", "--output", "json"])
        .arg(repo("examples"))
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(json["objects"], 6);
}

#[test]
fn schema_errors_are_all_reported_with_paths() {
    let report = closed_won_with(
        "flow",
        "concurrency: 10",
        "concurrency: ten\n    maxAttempts2: 3",
    );
    assert_error(
        &report,
        "spec.delivery.concurrency",
        "must be an integer, not a string",
    );
    assert_error(&report, "spec.delivery.maxAttempts2", "unknown field");

    let report = closed_won_with(
        "contract",
        "      required: true\n      maxLength: 120",
        "      maxLength: 120",
    );
    assert!(
        report.is_ok(),
        "dropping `required` is allowed: {:?}",
        errors(&report)
    );

    let report = closed_won_with(
        "contract",
        "compatibility: BACKWARD",
        "compatibility: SIDEWAYS",
    );
    assert_error(&report, "spec.compatibility", "is not one of");

    let report = closed_won_with("flow", "  source:\n    system: salesforce\n", "  source:\n");
    assert_error(&report, "spec.source.system", "required field is missing");
}

#[test]
fn credentials_inline_are_refused() {
    let report = closed_won_with(
        "flow",
        "name: netsuite-m2m",
        "name: netsuite-m2m\n      clientSecret: s3cr3t",
    );
    assert_error(
        &report,
        "spec.sink.credentialsSecretRef.clientSecret",
        "credentials never go in a spec",
    );

    let report = closed_won_with(
        "flow",
        "https://acme.my.salesforce.com",
        "https://api:pw@acme.my.salesforce.com",
    );
    assert_error(
        &report,
        "spec.source",
        "credentials must not be embedded in a URL",
    );

    let report = closed_won_with(
        "flow",
        "    credentialsSecretRef:\n      name: meshline-ledger-pg\n",
        "",
    );
    assert_error(&report, "spec.ledger", "needs credentialsSecretRef");
}

#[test]
fn crd_cel_rules_are_enforced_offline() {
    let report = closed_won_with("flow", "weight: 50", "weight: 10");
    assert_error(
        &report,
        "spec.rollout.canary",
        "canary weights must be distinct",
    );

    let report = closed_won_with("flow", "weight: 50", "weight: 5");
    assert_error(
        &report,
        "spec.rollout.canary",
        "canary weights must increase",
    );

    let report = closed_won_with("flow", "weight: 100", "weight: 120");
    assert_error(
        &report,
        "spec.rollout.canary.steps[2].weight",
        "greater than the maximum",
    );

    let report = closed_won_with("contract", "version: 1.2.0\n", "version: 1.2.x\n");
    assert_error(&report, "spec.version", "semver");

    let report = closed_won_with(
        "contract",
        "      action: hold\n      approverRole: finance\n",
        "      action: hold\n",
    );
    assert_error(&report, "spec.rules[4]", "approverRole is required");

    let long = "closed-won-to-netsuite-for-the-emea-region-and-its-subsidiaries";
    let report = closed_won_with(
        "flow",
        "name: closed-won-to-netsuite",
        &format!("name: {long}"),
    );
    assert_error(&report, "metadata.name", "at most 52 characters");

    let report = closed_won_with("flow", "type: postgres", "type: embedded");
    assert_error(&report, "spec", "embedded ledger supports one replica");

    // NetSuite has no batch upsert: a bulk endpoint on its sink is a mistake, not a silent no-op.
    let report = closed_won_with(
        "flow",
        "    recordType: salesOrder\n",
        "    recordType: salesOrder\n    bulk:\n      path: /bulk\n",
    );
    assert_error(&report, "spec.sink", "bulk is only for an http sink");
    let report = closed_won_with(
        "flow",
        "    recordType: salesOrder\n",
        "    recordType: salesOrder\n    bulk:\n      path: bulk\n",
    );
    assert_error(&report, "spec.sink.bulk.path", "");
}

/// The three hubspot-odoo manifests with one textual replacement applied to the flow.
fn won_deals_flow_with(from: &str, to: &str) -> Report {
    let read = |n: &str| {
        std::fs::read_to_string(repo(&format!("examples/hubspot-odoo/{n}.yaml"))).unwrap()
    };
    let flow = read("flow");
    assert!(flow.contains(from), "{from:?} not in flow.yaml");
    let flow = flow.replacen(from, to, 1);
    validate_text(&[
        ("contract", &read("contract")),
        ("flow", &flow),
        ("roster", &read("roster")),
    ])
}

#[test]
fn public_url_must_be_an_https_url_signed_by_hubspot() {
    let report = won_deals_flow_with("publicUrl: https://", "publicUrl: http://");
    assert_error(
        &report,
        "spec.source.publicUrl",
        "does not match the pattern",
    );
    let report = won_deals_flow_with("publicUrl: https://", "publicUrl: https://user:pw@");
    assert_error(
        &report,
        "spec.source.publicUrl",
        "does not match the pattern",
    );

    // Meshline's own scheme signs the body and a timestamp, not the URL: a publicUrl there is a mistake.
    let report = won_deals_flow_with("signature: hubspot-v3", "signature: hmac-sha256");
    assert_error(
        &report,
        "spec.source",
        "publicUrl is what the hubspot-v3 signature covers",
    );
}

#[test]
fn a_modification_stamp_without_ordering_is_a_warning_and_a_bad_ordering_field_an_error() {
    let warnings = |report: &Report| -> Vec<(String, String)> {
        report
            .issues
            .iter()
            .filter(|i| i.severity == Severity::Warning)
            .map(|i| (i.path.clone(), i.reason.clone()))
            .collect()
    };
    // The example orders by systemModstamp: nothing to warn about.
    let ordered = closed_won_with("contract", "version: 1.2.0\n", "version: 1.2.0\n");
    assert!(warnings(&ordered).is_empty(), "{:?}", ordered.issues);

    // Without its ordering, the stamp is named in a warning; the contract is still valid.
    let unordered = closed_won_with("contract", "  ordering:\n    field: systemModstamp\n", "");
    assert!(unordered.is_ok(), "{}", errors(&unordered).join("\n"));
    let found = warnings(&unordered);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "spec.fields[4].name");
    assert!(found[0].1.contains("systemModstamp"), "{found:?}");
    assert!(found[0].1.contains("ordering"), "{found:?}");

    // An ordering field that is not a stamp or a version number is refused by the CRD's rule, as the API
    // server would (the contract engine's own check, at spec.ordering.field, is unit-tested with it).
    let report = closed_won_with(
        "contract",
        "    field: systemModstamp\n",
        "    field: name\n",
    );
    assert_error(
        &report,
        "spec",
        "ordering.field must name a declared, required datetime or integer field",
    );
}

#[test]
fn contract_expressions_are_compiled_and_checked_against_the_schema() {
    let report = closed_won_with(
        "contract",
        "expression: size(record.lineItems) > 0",
        "expression: size(record.lineItemz) > 0",
    );
    let found = report
        .issues
        .iter()
        .any(|i| i.path == "spec.rules[1].expression" && i.reason.contains("lineItemz"));
    assert!(
        found,
        "an unknown field in a rule is reported at its path: {:?}",
        errors(&report)
    );

    let report = closed_won_with(
        "contract",
        "expression: record.stageName == \"Closed Won\"",
        "expression: record.stageName ==",
    );
    assert!(
        report
            .issues
            .iter()
            .any(|i| i.path == "spec.rules[0].expression"),
        "a CEL syntax error is reported at its path: {:?}",
        errors(&report)
    );

    let report = closed_won_with(
        "contract",
        "expression: record.accountId",
        "expression: record.accountId.nope",
    );
    assert!(
        report
            .issues
            .iter()
            .any(|i| i.path.starts_with("spec.mapping.fields[1]")),
        "a mapping expression is checked too: {:?}",
        errors(&report)
    );

    let report = closed_won_with(
        "contract",
        "pricebook[l.sku].unitPrice.mul",
        "pricebook[l.sku].listPrice.mul",
    );
    assert!(
        report
            .issues
            .iter()
            .any(|i| i.path == "spec.rules[3].expression" && i.reason.contains("listPrice")),
        "lookup entry fields must be declared: {:?}",
        errors(&report)
    );
}

#[test]
fn references_between_objects_are_checked() {
    let report = closed_won_with("flow", "version: ^1.2", "version: ^2");
    assert_error(&report, "spec.contract.version", "outside the range");

    let report = closed_won_with(
        "flow",
        "name: opportunity-to-sales-order",
        "name: no-such-contract",
    );
    assert_error(
        &report,
        "spec.contract.name",
        "not among the given manifests",
    );

    let report = closed_won_with(
        "roster",
        "flows: [\"closed-won-to-netsuite\"]",
        "flows: [\"another-flow\"]",
    );
    assert_error(
        &report,
        "metadata.name",
        "a flow without a sync owner does not start",
    );

    let report = closed_won_with("roster", "      approverRoles: [\"finance\"]\n", "");
    assert_error(
        &report,
        "spec.routes[1].approverRole",
        "no owner holds the approver role",
    );

    let report = closed_won_with("flow", "    - name: pricebook\n", "    - name: prices\n");
    assert_error(&report, "spec.lookups", "lookup \"pricebook\" is not bound");

    // An audit schedule the API server would refuse for the flows' CronJobs.
    let report = closed_won_with(
        "roster",
        "spec:\n",
        "spec:\n  audit:\n    schedule: \"0 2 * * 7\"\n    timeZone: Europe/Berln\n",
    );
    assert_error(
        &report,
        "spec.audit.schedule",
        "day of week: end of range (7)",
    );
    assert_error(
        &report,
        "spec.audit.timeZone",
        "unknown time zone \"Europe/Berln\"",
    );

    let report = closed_won_with("roster", "sinkOwner: marcus", "sinkOwner: nobody");
    assert_error(
        &report,
        "spec.assignments[0].sinkOwner",
        "not in spec.owners",
    );
}

#[test]
fn partial_mode_turns_missing_peers_into_warnings() {
    let mut issues = Vec::new();
    let docs = validate::parse_documents("flow.yaml", example("flow").as_bytes(), &mut issues);
    let strict = validate::validate_documents(docs.clone(), &Options::default());
    assert_eq!(strict.error_count(), 2, "{:?}", strict.issues);
    let partial = validate::validate_documents(docs, &Options { partial: true });
    assert_eq!(partial.error_count(), 0, "{:?}", partial.issues);
    assert_eq!(partial.issues.len(), 2);
}

#[test]
fn hostile_files_get_clear_errors() {
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "binary",
            vec![0xff, 0xfe, 0x00, 0x9f, 0x92, 0x96],
            "not UTF-8",
        ),
        ("syntax", b"kind: [unclosed".to_vec(), "YAML syntax"),
        ("deep", deep.into_bytes(), "recursion limit exceeded"),
        ("scalar", b"just a string".to_vec(), "must be a mapping"),
        (
            "no kind",
            b"apiVersion: sync.meshline.io/v1alpha1\nmetadata: {name: x}".to_vec(),
            "apiVersion and kind",
        ),
        (
            "wrong version",
            b"apiVersion: sync.meshline.io/v1\nkind: SyncFlow\nmetadata: {name: x}".to_vec(),
            "not served",
        ),
        (
            "unknown kind",
            b"apiVersion: sync.meshline.io/v1alpha1\nkind: SyncThing\nmetadata: {name: x}".to_vec(),
            "unknown kind",
        ),
        (
            "duplicate key",
            b"apiVersion: a/v1\napiVersion: b/v1\nkind: X".to_vec(),
            "duplicate",
        ),
        (
            "tag",
            b"apiVersion: !custom aGVsbG8=\nkind: X".to_vec(),
            "YAML tag",
        ),
    ];
    for (name, bytes, reason) in cases {
        let mut issues = Vec::new();
        let docs = validate::parse_documents(name, &bytes, &mut issues);
        let mut report = validate::validate_documents(docs, &Options::default());
        issues.append(&mut report.issues);
        let errors: Vec<_> = issues
            .iter()
            .filter(|i| i.severity == Severity::Error)
            .collect();
        assert!(!errors.is_empty(), "{name}: expected an error");
        assert!(
            errors.iter().all(|e| e.file == name),
            "{name}: every error names the file"
        );
        assert!(
            errors.iter().any(|e| e.reason.contains(reason)),
            "{name}: {errors:?}"
        );
    }
}

#[test]
fn multi_document_files_and_foreign_kinds() {
    let text = format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: revenue-sync}}\n---\n{}\n---\n{}\n---\n{}\n---\n",
        example("roster"),
        example("contract"),
        example("flow")
    );
    let report = validate_text(&[("all.yaml", &text)]);
    assert!(report.is_ok(), "{:?}", errors(&report));
    assert_eq!(report.objects, 3);
    assert_eq!(report.ignored, 1);

    let twice = format!("{}\n---\n{}", example("roster"), example("roster"));
    let report = validate_text(&[
        ("twice.yaml", &twice),
        ("c", &example("contract")),
        ("f", &example("flow")),
    ]);
    assert_error(&report, "metadata.name", "defined twice");
}

#[test]
fn oversized_and_empty_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    let line =
        "# padding padding padding padding padding padding padding padding padding padding\n";
    std::fs::write(
        &big,
        line.repeat((validate::MAX_FILE_BYTES as usize / line.len()) + 10),
    )
    .unwrap();
    let report = validate::validate_paths(&[big], &Options::default());
    assert!(
        report.issues.iter().any(|i| i.reason.contains("refused")),
        "{:?}",
        report.issues
    );

    // A 10 MB file of valid YAML is read, not refused, and yields a clear verdict.
    let ten = dir.path().join("ten.yaml");
    let doc = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {k: \"".to_string()
        + &"v".repeat(10 * 1024 * 1024)
        + "\"}\n";
    std::fs::write(&ten, doc).unwrap();
    let report = validate::validate_paths(&[ten], &Options::default());
    assert_eq!(report.ignored, 1);
    assert!(
        !report.is_ok(),
        "no Meshline object in the input is an error"
    );

    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let report = validate::validate_paths(&[empty], &Options::default());
    assert!(
        report
            .issues
            .iter()
            .any(|i| i.reason.contains("no sync.meshline.io objects"))
    );

    let report = validate::validate_paths(&[dir.path().join("missing.yaml")], &Options::default());
    assert!(
        report
            .issues
            .iter()
            .any(|i| i.reason.contains("no such file"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut issues = Vec::new();
        let docs = validate::parse_documents("fuzz", &bytes, &mut issues);
        let _ = validate::validate_documents(docs, &Options::default());
    }

    #[test]
    fn mutated_examples_never_panic(pos in 0usize..4000, byte in any::<u8>()) {
        let mut text = example("flow").into_bytes();
        let i = pos % text.len();
        text[i] = byte;
        let mut issues = Vec::new();
        let docs = validate::parse_documents("flow", &text, &mut issues);
        let _ = validate::validate_documents(docs, &Options::default());
    }
}

#[test]
fn worker_pod_settings_the_controller_would_refuse_are_errors() {
    let report = closed_won_with(
        "flow",
        "  replicas: 2",
        "  replicas: 2\n  worker:\n    podLabels:\n      sync.meshline.io/flow: other\n      team: -revops\n    tolerations:\n      - key: dedicated\n        operator: Exists\n        value: sync",
    );
    assert_error(
        &report,
        "spec.worker",
        "spec.worker.podLabels[sync.meshline.io/flow]: the controller sets this label",
    );
    assert_error(
        &report,
        "spec.worker",
        "spec.worker.podLabels[team]: value \"-revops\"",
    );
    assert_error(
        &report,
        "spec.worker",
        "spec.worker.tolerations[0].value: must be empty when operator is Exists",
    );
    let fine = closed_won_with(
        "flow",
        "  replicas: 2",
        "  replicas: 2\n  worker:\n    serviceAccountName: sync-workers\n    podLabels:\n      team: revops\n    nodeSelector:\n      pool: integration",
    );
    assert!(errors(&fine).is_empty(), "{:?}", errors(&fine));
}
