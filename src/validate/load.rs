//! Reading manifest files into JSON documents, with limits so that no input can exhaust memory or panic.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::Issue;

/// Largest manifest file read. Real manifests are kilobytes; anything near this is a mistake or an attack.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest nesting accepted in a document (the YAML parser has its own, lower recursion limit too).
pub const MAX_DEPTH: usize = 64;
/// Most documents read from one file.
pub const MAX_DOCUMENTS: usize = 10_000;

/// One YAML document of one file.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: String,
    /// 1-based position of the document in its file.
    pub index: usize,
    pub value: Value,
}

/// Expands directories (recursively, `.yaml`, `.yml` and `.json` files, sorted) and keeps files as given.
pub fn expand(paths: &[PathBuf], issues: &mut Vec<Issue>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            collect_dir(path, &mut files, issues, 0);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            issues.push(Issue::file_error(
                path.display().to_string(),
                "no such file or directory",
            ));
        }
    }
    files
}

fn collect_dir(dir: &Path, files: &mut Vec<PathBuf>, issues: &mut Vec<Issue>, depth: usize) {
    if depth > 32 {
        issues.push(Issue::file_error(
            dir.display().to_string(),
            "directory nesting deeper than 32 levels",
        ));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            issues.push(Issue::file_error(
                dir.display().to_string(),
                format!("cannot read directory: {e}"),
            ));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_dir(&path, files, issues, depth + 1);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(path);
        }
    }
}

/// Reads one file into its documents; problems become issues naming the file.
pub fn read_file(path: &Path, issues: &mut Vec<Issue>) -> Vec<Document> {
    let name = path.display().to_string();
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) => {
            issues.push(Issue::file_error(name, format!("cannot read: {e}")));
            return Vec::new();
        }
    };
    if size > MAX_FILE_BYTES {
        issues.push(Issue::file_error(
            name,
            format!(
                "file is {size} bytes; manifests larger than {MAX_FILE_BYTES} bytes are refused"
            ),
        ));
        return Vec::new();
    }
    match std::fs::read(path) {
        Ok(bytes) => parse_documents(&name, &bytes, issues),
        Err(e) => {
            issues.push(Issue::file_error(name, format!("cannot read: {e}")));
            Vec::new()
        }
    }
}

/// Splits bytes into YAML documents (JSON is YAML too) and converts each to JSON.
pub fn parse_documents(file: &str, bytes: &[u8], issues: &mut Vec<Issue>) -> Vec<Document> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        issues.push(Issue::file_error(
            file,
            format!("input is larger than {MAX_FILE_BYTES} bytes"),
        ));
        return Vec::new();
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            issues.push(Issue::file_error(
                file,
                format!(
                    "not UTF-8 text (invalid byte at offset {}); is this a binary file?",
                    e.valid_up_to()
                ),
            ));
            return Vec::new();
        }
    };
    let mut documents = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        if index > MAX_DOCUMENTS {
            issues.push(Issue::file_error(
                file,
                format!("more than {MAX_DOCUMENTS} documents in one file"),
            ));
            break;
        }
        let yaml = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                issues.push(Issue::document_error(
                    file,
                    index,
                    format!("YAML syntax: {e}"),
                ));
                // After a syntax error the stream cannot be resynchronised reliably.
                break;
            }
        };
        match yaml_to_json(yaml, 0) {
            Ok(Value::Null) => {}
            Ok(value) => documents.push(Document {
                file: file.to_string(),
                index,
                value,
            }),
            Err(reason) => issues.push(Issue::document_error(file, index, reason)),
        }
    }
    documents
}

/// Converts YAML to JSON, refusing what Kubernetes would refuse: non-string keys, tags, and over-deep nesting.
fn yaml_to_json(yaml: serde_yaml::Value, depth: usize) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    if depth > MAX_DEPTH {
        return Err(format!("nesting deeper than {MAX_DEPTH} levels"));
    }
    Ok(match yaml {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("number {n} is not representable in JSON"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .map(|v| yaml_to_json(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    other => return Err(format!("mapping key {other:?} is not a string")),
                };
                out.insert(key, yaml_to_json(v, depth + 1)?);
            }
            Value::Object(out)
        }
        Y::Tagged(tagged) => {
            return Err(format!(
                "YAML tag {} is not allowed in a manifest",
                tagged.tag
            ));
        }
    })
}
