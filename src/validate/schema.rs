//! Structural validation of an object against a CRD's `openAPIV3Schema`, the way the API server does it
//! before CEL rules run: types, required fields, unknown fields, enums, lengths, bounds and patterns.

use std::collections::HashMap;

use regex::Regex;
use serde_json::Value;

/// One structural violation: the field path (`spec.sink.baseUrl`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub reason: String,
}

/// Field names that, when unknown, are almost certainly someone pasting a credential into a spec.
const CREDENTIAL_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "api_key",
    "privatekey",
    "private_key",
    "clientsecret",
    "credential",
    "dsn",
    "connectionstring",
];

/// Validates `value` against `schema`, appending every violation (not only the first).
pub fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<Violation>) {
    let mut regexes = RegexCache::default();
    walk(schema, value, path, out, &mut regexes, 0);
}

#[derive(Default)]
struct RegexCache(HashMap<String, Option<Regex>>);

impl RegexCache {
    fn get(&mut self, pattern: &str) -> Option<&Regex> {
        self.0
            .entry(pattern.to_string())
            .or_insert_with(|| Regex::new(pattern).ok())
            .as_ref()
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk(
    schema: &Value,
    value: &Value,
    path: &str,
    out: &mut Vec<Violation>,
    re: &mut RegexCache,
    depth: usize,
) {
    let push = |out: &mut Vec<Violation>, reason: String| {
        out.push(Violation {
            path: path.to_string(),
            reason,
        })
    };
    if depth > 64 {
        push(out, "nested too deeply".into());
        return;
    }
    let Some(schema) = schema.as_object() else {
        return;
    };
    if value.is_null() {
        if !schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            push(out, "must not be null".into());
        }
        return;
    }
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        if !matches!(type_name(value), "integer" | "string") {
            push(
                out,
                format!("must be an integer or a string, not {}", type_name(value)),
            );
        }
        return;
    }
    let preserve_unknown = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let Some(expected) = schema.get("type").and_then(Value::as_str) else {
        return;
    };
    let actual = type_name(value);
    let type_ok = match expected {
        "number" => matches!(actual, "number" | "integer"),
        other => other == actual,
    };
    if !type_ok {
        push(
            out,
            format!(
                "must be {} {expected}, not {} {actual}",
                article(expected),
                article(actual)
            ),
        );
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
        push(out, format!("{value} is not one of {}", list.join(", ")));
    }
    match value {
        Value::String(s) => {
            let chars = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                push(
                    out,
                    format!("is {chars} characters long; at most {max} allowed"),
                );
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                push(
                    out,
                    format!("is {chars} characters long; at least {min} required"),
                );
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                && let Some(regex) = re.get(pattern)
                && !regex.is_match(s)
            {
                push(out, format!("{s:?} does not match the pattern {pattern}"));
            }
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && v < min
            {
                push(out, format!("{n} is less than the minimum {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && v > max
            {
                push(out, format!("{n} is greater than the maximum {max}"));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                push(
                    out,
                    format!("has {} items; at most {max} allowed", items.len()),
                );
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                push(
                    out,
                    format!("has {} items; at least {min} required", items.len()),
                );
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(
                        item_schema,
                        item,
                        &format!("{path}[{i}]"),
                        out,
                        re,
                        depth + 1,
                    );
                }
            }
        }
        Value::Object(map) => {
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(name) {
                        out.push(Violation {
                            path: join(path, name),
                            reason: "required field is missing".into(),
                        });
                    }
                }
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && map.len() as u64 > max
            {
                push(
                    out,
                    format!("has {} entries; at most {max} allowed", map.len()),
                );
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, child) in map {
                let child_path = join(path, key);
                if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
                    walk(child_schema, child, &child_path, out, re, depth + 1);
                } else if let Some(additional) = additional.filter(|a| a.is_object()) {
                    walk(additional, child, &child_path, out, re, depth + 1);
                } else if !preserve_unknown && properties.is_some() {
                    out.push(Violation {
                        path: child_path,
                        reason: unknown_field_reason(key, properties),
                    });
                }
            }
        }
        _ => {}
    }
}

fn unknown_field_reason(key: &str, properties: Option<&serde_json::Map<String, Value>>) -> String {
    let lower = key.to_ascii_lowercase();
    if CREDENTIAL_WORDS.iter().any(|w| lower.contains(w)) {
        return "unknown field; credentials never go in a spec: put them in a Secret and reference it with credentialsSecretRef".into();
    }
    let mut known: Vec<&str> = properties
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    known.sort_unstable();
    match closest(key, &known) {
        Some(near) => format!("unknown field (did you mean {near:?}?)"),
        None => format!("unknown field; known fields are {}", known.join(", ")),
    }
}

fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| {
            (
                edit_distance(&key.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}
