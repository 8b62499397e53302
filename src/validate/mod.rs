//! Offline validation of Meshline manifests, for pull-request checks in a GitOps repository.
//!
//! It checks, in the order the API server and the controller would: YAML syntax, the kind, the CRD's structural
//! schema, the CRD's CEL rules, the typed decoding, the contract's own expressions (through the contract engine),
//! and finally the references between the objects given together. Every issue names the file, the object, the
//! field path and the reason. Nothing here touches a cluster or the network.

mod load;
mod refs;
mod schema;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::api::{API_VERSION, GROUP, OwnershipRoster, SyncContract, SyncFlow};

pub use load::{MAX_FILE_BYTES, parse_documents};
pub use refs::{assignment_covers, selector_matches};

/// How bad an issue is: errors fail the check, warnings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub severity: Severity,
    pub file: String,
    /// 1-based document index in the file, when the issue is about one document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    /// `Kind namespace/name`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Field path inside the object, e.g. `spec.rules[2].expression`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    pub reason: String,
}

impl Issue {
    pub fn file_error(file: impl Into<String>, reason: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Error,
            file: file.into(),
            document: None,
            object: None,
            path: String::new(),
            reason: reason.into(),
        }
    }

    pub fn document_error(
        file: impl Into<String>,
        document: usize,
        reason: impl Into<String>,
    ) -> Issue {
        Issue {
            document: Some(document),
            ..Issue::file_error(file, reason)
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{label}: {}", self.file)?;
        if let Some(doc) = self.document {
            write!(f, " (document {doc})")?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// The result of validating a set of manifests.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub files: usize,
    pub objects: usize,
    /// Documents of other kinds (Secrets, Namespaces, ...) that were passed over.
    pub ignored: usize,
    pub issues: Vec<Issue>,
    /// For each contract given, the gates its version faces before it reaches workers (filled by
    /// `meshline validate`; see `crate::rollout::gates`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<serde_json::Value>,
    #[serde(skip)]
    pub contracts: Vec<Located<SyncContract>>,
    #[serde(skip)]
    pub flows: Vec<Located<SyncFlow>>,
    #[serde(skip)]
    pub rosters: Vec<Located<OwnershipRoster>>,
}

impl Report {
    pub fn error_count(&self) -> usize {
        self.issues
            .iter()
            .filter(|i| i.severity == Severity::Error)
            .count()
    }

    pub fn is_ok(&self) -> bool {
        self.error_count() == 0
    }
}

/// A decoded object and where it came from.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub file: String,
    pub document: usize,
    pub object: T,
}

impl<T: kube::Resource<DynamicType = ()>> Located<T> {
    pub fn namespace(&self) -> String {
        self.object
            .meta()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string())
    }

    pub fn name(&self) -> String {
        self.object.meta().name.clone().unwrap_or_default()
    }

    pub fn label(&self) -> String {
        format!("{} {}/{}", T::kind(&()), self.namespace(), self.name())
    }

    fn issue(
        &self,
        severity: Severity,
        path: impl Into<String>,
        reason: impl Into<String>,
    ) -> Issue {
        Issue {
            severity,
            file: self.file.clone(),
            document: Some(self.document),
            object: Some(self.label()),
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Options of a validation run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// References to objects not given (a flow's contract, a roster) are warnings instead of errors, for
    /// checking one file whose peers live elsewhere.
    pub partial: bool,
}

/// Validates files and directories.
pub fn validate_paths(paths: &[PathBuf], options: &Options) -> Report {
    let mut issues = Vec::new();
    let files = load::expand(paths, &mut issues);
    let mut documents = Vec::new();
    for file in &files {
        documents.extend(load::read_file(file, &mut issues));
    }
    let mut report = validate_documents(documents, options);
    report.files = files.len();
    issues.append(&mut report.issues);
    report.issues = issues;
    if report.files == 0 && report.is_ok() {
        report.issues.push(Issue::file_error(
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            "no .yaml, .yml or .json files found",
        ));
    } else if report.objects == 0 && report.is_ok() {
        report.issues.push(Issue::file_error(
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            format!("no {GROUP} objects found"),
        ));
    }
    report
}

/// Validates already-parsed documents.
pub fn validate_documents(documents: Vec<load::Document>, options: &Options) -> Report {
    static SCHEMAS: std::sync::OnceLock<Vec<(String, Value)>> = std::sync::OnceLock::new();
    let schemas = SCHEMAS.get_or_init(crate::crd::schemas);
    let cel = kube::core::cel::Validator::new();
    let mut report = Report::default();
    for doc in documents {
        check_document(doc, schemas, &cel, &mut report);
    }
    refs::check(&mut report, options);
    report
}

fn check_document(
    doc: load::Document,
    schemas: &[(String, Value)],
    cel: &kube::core::cel::Validator,
    report: &mut Report,
) {
    let load::Document { file, index, value } = doc;
    let err = |path: &str, object: Option<String>, reason: String| Issue {
        severity: Severity::Error,
        file: file.clone(),
        document: Some(index),
        object,
        path: path.to_string(),
        reason,
    };
    let Some(map) = value.as_object() else {
        report.issues.push(err(
            "",
            None,
            format!("a manifest must be a mapping, not {}", short_type(&value)),
        ));
        return;
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str);
    let kind = map.get("kind").and_then(Value::as_str);
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        report.issues.push(err(
            "",
            None,
            "apiVersion and kind (both strings) are required".into(),
        ));
        return;
    };
    if !api_version.starts_with(&format!("{GROUP}/")) {
        report.ignored += 1;
        return;
    }
    let object = object_label(kind, map);
    if api_version != API_VERSION {
        report.issues.push(err(
            "apiVersion",
            Some(object),
            format!("{api_version} is not served; use {API_VERSION}"),
        ));
        return;
    }
    let Some((_, schema)) = schemas.iter().find(|(k, _)| k == kind) else {
        let kinds: Vec<&str> = schemas.iter().map(|(k, _)| k.as_str()).collect();
        report.issues.push(err(
            "kind",
            Some(object),
            format!("unknown kind {kind}; {GROUP} has {}", kinds.join(", ")),
        ));
        return;
    };
    report.objects += 1;

    let mut violations = Vec::new();
    check_metadata(kind, map.get("metadata"), &mut violations);
    // The API server manages metadata and status; the CRD schema leaves them open, so only spec is walked.
    let mut spec_only = value.clone();
    if let Some(obj) = spec_only.as_object_mut() {
        obj.remove("status");
    }
    schema::check(schema, &strip_metadata(&spec_only), "", &mut violations);
    if violations.is_empty() {
        let root = kube::core::cel::RootContext {
            api_version: API_VERSION.to_string(),
            api_group: GROUP.to_string(),
            kind: kind.to_string(),
        };
        if let Err(errors) = cel.validate_with_context(schema, &spec_only, None, Some(&root)) {
            for e in errors.iter() {
                violations.push(schema::Violation {
                    path: e.field_path.clone(),
                    reason: e.message.clone(),
                });
            }
        }
    }
    let had_violations = !violations.is_empty();
    for v in violations {
        report
            .issues
            .push(err(&v.path, Some(object.clone()), v.reason));
    }
    if had_violations {
        return;
    }
    let result = match kind {
        "SyncContract" => keep(&mut report.contracts, &value, &file, index),
        "SyncFlow" => keep(&mut report.flows, &value, &file, index),
        "OwnershipRoster" => keep(&mut report.rosters, &value, &file, index),
        _ => Ok(()),
    };
    if let Err((path, reason)) = result {
        report.issues.push(err(&path, Some(object), reason));
    }
}

/// Decodes a document into its typed object and keeps it for the reference checks.
fn keep<T: serde::de::DeserializeOwned>(
    list: &mut Vec<Located<T>>,
    value: &Value,
    file: &str,
    document: usize,
) -> Result<(), (String, String)> {
    let object = decode::<T>(value)?;
    list.push(Located {
        file: file.to_string(),
        document,
        object,
    });
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })
}

fn strip_metadata(value: &Value) -> Value {
    let mut value = value.clone();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("metadata");
        obj.remove("apiVersion");
        obj.remove("kind");
    }
    value
}

/// Flow names become Deployment, Service and ConfigMap names with a prefix, so they must be DNS labels short
/// enough to leave room for it.
pub const MAX_FLOW_NAME: usize = 52;

fn check_metadata(kind: &str, metadata: Option<&Value>, out: &mut Vec<schema::Violation>) {
    let v = |path: &str, reason: String| schema::Violation {
        path: path.to_string(),
        reason,
    };
    let Some(meta) = metadata.and_then(Value::as_object) else {
        out.push(v("metadata", "metadata with a name is required".into()));
        return;
    };
    match meta.get("name").and_then(Value::as_str) {
        None => out.push(v("metadata.name", "required field is missing".into())),
        Some(name) => {
            let max = if kind == "SyncFlow" {
                MAX_FLOW_NAME
            } else {
                253
            };
            if !is_dns_label(name) || name.len() > max {
                out.push(v(
                    "metadata.name",
                    format!("{name:?} must be lower-case letters, digits and '-', start with a letter, end with a letter or digit, at most {max} characters"),
                ));
            }
        }
    }
    if let Some(ns) = meta.get("namespace")
        && !ns
            .as_str()
            .is_some_and(|ns| is_dns_label(ns) && ns.len() <= 63)
    {
        out.push(v(
            "metadata.namespace",
            format!("{ns} is not a valid namespace name"),
        ));
    }
    for field in ["labels", "annotations"] {
        if let Some(map) = meta.get(field) {
            match map.as_object() {
                Some(map) => {
                    for (k, val) in map {
                        if !val.is_string() {
                            out.push(v(
                                &format!("metadata.{field}.{k}"),
                                "must be a string (quote it)".into(),
                            ));
                        }
                    }
                }
                None => out.push(v(
                    &format!("metadata.{field}"),
                    "must be a map of strings".into(),
                )),
            }
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_lowercase()
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn object_label(kind: &str, map: &serde_json::Map<String, Value>) -> String {
    let meta = map.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    format!("{kind} {ns}/{name}")
}

fn short_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// The contract's own checks, from the contract engine: the field schema is coherent, every CEL expression
/// compiles, references only declared fields and lookups, and stays within the evaluation limits.
fn contract_checks(contract: &Located<SyncContract>) -> Vec<Issue> {
    let mut issues = unordered_stamp_warnings(contract);
    match crate::contract::compile(&contract.object.spec) {
        Ok(_) => {}
        Err(errors) => issues.extend(errors.into_iter().map(|e| {
            contract.issue(
                Severity::Error,
                e.path,
                format!("{} ({})", e.reason, e.kind.label()),
            )
        })),
    }
    issues
}

/// Names (compared in lower case, `_` ignored) that CRMs and ERPs give a record's modification stamp.
const MODIFICATION_STAMPS: &[&str] = &[
    "systemmodstamp",
    "lastmodifieddate",
    "hslastmodifieddate",
    "updatedat",
    "modifiedat",
    "modifiedon",
    "lastmodified",
    "lastupdated",
    "writedate",
    "datemodified",
    "modificationdate",
];

/// A contract that has a modification stamp but orders nothing lets a late, older revision of a record
/// overwrite a newer one at the ERP. A warning, not an error: arrival order is right for a source that
/// guarantees it.
fn unordered_stamp_warnings(contract: &Located<SyncContract>) -> Vec<Issue> {
    let spec = &contract.object.spec;
    if spec.ordering.is_some() {
        return Vec::new();
    }
    spec.fields
        .iter()
        .enumerate()
        .filter(|(_, f)| f.r#type == crate::api::FieldType::Datetime && !f.name.contains("[]"))
        .filter(|(_, f)| {
            let last = f.name.rsplit('.').next().unwrap_or(&f.name);
            let folded: String = last
                .chars()
                .filter(|c| *c != '_')
                .flat_map(char::to_lowercase)
                .collect();
            MODIFICATION_STAMPS.contains(&folded.as_str())
        })
        .map(|(i, f)| {
            contract.issue(
                Severity::Warning,
                format!("spec.fields[{i}].name"),
                format!(
                    "{:?} looks like a modification stamp but the contract declares no ordering: a late, older \
                     revision of a record would overwrite a newer one at the ERP. Add `ordering: {{field: {}}}` \
                     (and make the field required) unless the source guarantees delivery in order",
                    f.name, f.name
                ),
            )
        })
        .collect()
}
