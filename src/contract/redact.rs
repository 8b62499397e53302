//! PII redaction: the one place that decides what a personal value looks like once it leaves the hot path.
//!
//! Snapshots, logs, error messages, dead-letter reasons and tickets all call [`redact`] (directly or through the
//! helpers here), so there is exactly one rule to audit. A redacted value is either a fixed marker or a keyed,
//! stable hash (HMAC-SHA256), which lets an operator see that two records carry the same e-mail address without
//! seeing the address. This module never logs and never stores a raw value.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The marker that replaces a personal value when no key is configured.
pub const REDACTED: &str = "[REDACTED]";

/// How personal values are redacted.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Redaction {
    /// Every personal value becomes `[REDACTED]`.
    #[default]
    Fixed,
    /// Every personal value becomes `[REDACTED:<16 hex digits>]`, the start of an HMAC-SHA256 under the key: the
    /// same value always gives the same marker, and nobody without the key can test a guess.
    Keyed(RedactionKey),
}

impl Redaction {
    /// A keyed redaction; the key should come from a Secret, never from a spec.
    pub fn keyed(key: impl Into<Vec<u8>>) -> Self {
        Redaction::Keyed(RedactionKey(Arc::from(key.into())))
    }
}

impl fmt::Debug for Redaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redaction::Fixed => f.write_str("Redaction::Fixed"),
            Redaction::Keyed(_) => f.write_str("Redaction::Keyed(..)"),
        }
    }
}

/// Key material for [`Redaction::Keyed`]. Its `Debug` does not print the key.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactionKey(Arc<[u8]>);

impl fmt::Debug for RedactionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedactionKey(..)")
    }
}

/// Redacts one personal value. Every other redaction path in Meshline goes through this function.
pub fn redact(value: &str, redaction: &Redaction) -> String {
    match redaction {
        Redaction::Fixed => REDACTED.to_string(),
        Redaction::Keyed(RedactionKey(key)) => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
            mac.update(value.as_bytes());
            let tag = mac.finalize().into_bytes();
            format!("[REDACTED:{}]", hex::encode(&tag[..8]))
        }
    }
}

/// Redacts a JSON value as a whole: a string by its text, anything else by its compact JSON text.
pub fn redact_json(value: &serde_json::Value, redaction: &Redaction) -> serde_json::Value {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    serde_json::Value::String(redact(&text, redaction))
}

/// Replaces every occurrence of a known personal value in a message (an error text from a function, say) by
/// its redacted form. Over-redaction is the safe failure: a short value may hide an innocent substring too.
pub fn scrub(message: &str, personal_values: &[String], redaction: &Redaction) -> String {
    let mut out = message.to_string();
    // Longest first, so a value that contains another is replaced whole.
    let mut values: Vec<&String> = personal_values.iter().filter(|v| !v.is_empty()).collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for value in values {
        if out.contains(value.as_str()) {
            out = out.replace(value.as_str(), &redact(value, redaction));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_redaction_hides_the_value_entirely() {
        assert_eq!(redact("alice@example.com", &Redaction::Fixed), "[REDACTED]");
    }

    #[test]
    fn keyed_redaction_is_stable_per_key_and_hides_the_value() {
        let a = Redaction::keyed(b"key-a".to_vec());
        let b = Redaction::keyed(b"key-b".to_vec());
        let first = redact("alice@example.com", &a);
        assert_eq!(first, redact("alice@example.com", &a));
        assert_ne!(first, redact("bob@example.com", &a));
        assert_ne!(first, redact("alice@example.com", &b));
        assert!(first.starts_with("[REDACTED:") && !first.contains("alice"));
        assert!(!format!("{a:?}").contains("key-a"));
    }

    #[test]
    fn scrub_replaces_every_personal_value_in_a_message() {
        let msg = "no such key: alice@example.com (alice)";
        let out = scrub(
            msg,
            &["alice".into(), "alice@example.com".into(), String::new()],
            &Redaction::Fixed,
        );
        assert_eq!(out, "no such key: [REDACTED] ([REDACTED])");
    }

    #[test]
    fn json_values_are_redacted_whole() {
        let v = serde_json::json!({"street": "1 Main St"});
        assert_eq!(
            redact_json(&v, &Redaction::Fixed),
            serde_json::json!("[REDACTED]")
        );
    }
}
