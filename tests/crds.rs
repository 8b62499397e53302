//! The CRDs in `crds/` and in the chart are exactly what the code generates, and a real API server would
//! accept them (structural, known formats, CEL rules within the cost budget).

use std::path::Path;

use meshline::crd;

#[test]
fn crds_folder_matches_generated_crds() {
    for dir in ["crds", "charts/meshline/crds"] {
        let generated = crd::all();
        let mut expected_files: Vec<String> = generated.iter().map(crd::file_name).collect();
        expected_files.sort();
        let mut actual_files: Vec<String> =
            std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
                .unwrap_or_else(|e| panic!("{dir} must exist: {e}"))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        actual_files.sort();
        assert_eq!(
            actual_files, expected_files,
            "{dir} holds other files than the generated CRDs"
        );
        for crd in &generated {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(dir)
                .join(crd::file_name(crd));
            let on_disk = std::fs::read_to_string(&path).unwrap();
            assert!(
                on_disk == crd::to_yaml(crd),
                "{} is stale: run `cargo run -- crd --out-dir {dir}`",
                path.display()
            );
        }
    }
}

#[test]
fn generated_crds_pass_the_api_server_rules_we_know() {
    for crd in crd::all() {
        let problems = crd::lint(&crd);
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            crd.spec.names.kind,
            problems.join("\n")
        );
    }
}

#[test]
fn lint_catches_an_unbounded_list_under_a_rule() {
    let mut crd = crd::all().remove(1);
    let mut schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    let steps = schema
        .pointer_mut("/openAPIV3Schema/properties/spec/properties/rollout/properties/canary/properties/steps")
        .expect("canary steps in the SyncFlow schema");
    steps.as_object_mut().unwrap().remove("maxItems");
    crd.spec.versions[0].schema = Some(serde_json::from_value(schema).unwrap());
    let problems = crd::lint(&crd);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("steps") && p.contains("maxItems")),
        "{problems:?}"
    );
}

#[test]
fn crds_have_status_short_names_category_and_columns() {
    for crd in crd::all() {
        assert_eq!(crd.spec.group, "sync.meshline.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["meshline".to_string()][..])
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty())
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4)
        );
    }
}

#[test]
fn semver_rule_keeps_its_cel_escapes() {
    // The API server must store `\\.` (a CEL string escape for the regex `\.`); one backslash fails to compile.
    let yaml = crd::to_yaml(&crd::all()[0]);
    assert!(
        yaml.contains(r"(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)"),
        "semver rule lost its escapes"
    );
}
