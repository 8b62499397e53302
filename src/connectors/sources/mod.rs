//! CRM sources: signed webhooks (generic HMAC-SHA256, HubSpot v3) and the Salesforce REST query poller.
//!
//! Every source hands records to an [`Intake`](super::Intake) and acknowledges the CRM (a 2xx, an advanced
//! checkpoint) only after the intake returned `Ok`, so a crash between receipt and storage makes the CRM send
//! again rather than lose the record. Sources speak wire formats and rename fields with the flow's `fieldMap`
//! ([`apply_field_map`]); they never validate against the contract and never touch the ledger directly.
//!
//! The worker starts a source with [`webhook::router`] (mount the returned axum `Router` on its HTTP port) or
//! [`salesforce::SalesforcePoller::run`] (a task that polls until shutdown).

pub mod salesforce;
pub mod webhook;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::api::ErrorClass;
use crate::connectors::{CredentialsError, IntakeError};

/// A source failed; the CRM has not been acknowledged for whatever was in flight.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{system}: the source is misconfigured: {reason}")]
    Config {
        system: &'static str,
        reason: String,
    },
    #[error("source credentials: {0}")]
    Credentials(#[from] CredentialsError),
    #[error("{system}: authentication failed: {reason}")]
    Auth {
        system: &'static str,
        reason: String,
    },
    #[error("{system}: {what} answered HTTP {status}: {body}")]
    Http {
        system: &'static str,
        what: String,
        status: u16,
        body: String,
    },
    #[error("{system}: {what} failed: {reason}")]
    Transport {
        system: &'static str,
        what: String,
        reason: String,
    },
    #[error("{system}: {what} returned an answer we cannot read: {reason}")]
    Protocol {
        system: &'static str,
        what: String,
        reason: String,
    },
    #[error("source intake: {0}")]
    Intake(#[from] IntakeError),
}

impl SourceError {
    /// Short stable label for metrics and condition reasons.
    pub fn label(&self) -> &'static str {
        match self {
            SourceError::Config { .. } => "source_config",
            SourceError::Credentials(_) => "source_credentials",
            SourceError::Auth { .. } => "source_auth",
            SourceError::Http { .. } => "source_http",
            SourceError::Transport { .. } => "source_transport",
            SourceError::Protocol { .. } => "source_protocol",
            SourceError::Intake(_) => "source_intake",
        }
    }

    /// How the worker should treat the failure: configuration and credentials are flow-level or config
    /// problems, everything else is transient (the next poll starts again from the stored checkpoint).
    pub fn class(&self) -> ErrorClass {
        match self {
            SourceError::Config { .. } => ErrorClass::Config,
            SourceError::Credentials(_) | SourceError::Auth { .. } => ErrorClass::FlowLevel,
            _ => ErrorClass::Transient,
        }
    }
}

/// One `fieldMap` entry split into its parts: `lineItems[].sku` → child `lineItems`, rest `sku`.
fn split_child(target: &str) -> Option<(&str, &str)> {
    let (parent, rest) = target.split_once("[].")?;
    Some((parent, rest))
}

/// The child relationships a field map describes: `lineItems` → (source name, the map inside each element).
pub fn child_maps(
    field_map: &BTreeMap<String, String>,
) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
    let mut children: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
    for (target, source) in field_map {
        if let Some((parent, rest)) = split_child(target) {
            let entry = children.entry(parent.to_string()).or_insert_with(|| {
                let source = field_map
                    .get(parent)
                    .cloned()
                    .unwrap_or_else(|| parent.to_string());
                (source, BTreeMap::new())
            });
            entry.1.insert(rest.to_string(), source.clone());
        }
    }
    children
}

/// Renames a source record into the contract's shape.
///
/// `field_map` maps a contract field path to the source's field name: `stageName: StageName` renames a field,
/// `accountName: Account.Name` lifts a field out of a related object, `customer.email: Email` nests one, and
/// `lineItems: OpportunityLineItems` with `lineItems[].sku: ProductCode` renames an array and the fields of
/// each of its elements (recursively, so `a[].b[].c` works). Fields the map does not mention keep their names;
/// a source field that is absent stays absent, and one behind a null related object becomes `null`.
/// Related objects emptied by the renaming (`Account` once `Account.Name` moved) are dropped.
pub fn apply_field_map(field_map: &BTreeMap<String, String>, record: Value) -> Value {
    let Value::Object(mut working) = record else {
        return record;
    };
    let children = child_maps(field_map);
    // Take every source value first and insert afterwards, so that swaps (`a: b`, `b: a`) work.
    let mut taken: Vec<(&str, Value)> = Vec::new();
    let mut touched_parents: Vec<&str> = Vec::new();
    for (target, source) in field_map {
        if split_child(target).is_some() {
            continue;
        }
        let path: Vec<&str> = source.split('.').collect();
        if path.len() > 1 {
            touched_parents.push(path[0]);
        }
        if let Some(value) = take_path(&mut working, &path) {
            taken.push((target.as_str(), value));
        }
    }
    for parent in touched_parents {
        let empty = match working.get(parent) {
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::Null) => true,
            _ => false,
        };
        if empty {
            working.remove(parent);
        }
    }
    for (target, value) in taken {
        insert_path(&mut working, target, value);
    }
    for (target, (_, inner)) in &children {
        if let Some(Value::Array(items)) = get_path_mut(&mut working, target) {
            let renamed: Vec<Value> = items
                .drain(..)
                .map(|item| apply_field_map(inner, item))
                .collect();
            *items = renamed;
        }
    }
    Value::Object(working)
}

fn take_path(object: &mut Map<String, Value>, path: &[&str]) -> Option<Value> {
    match path {
        [] => None,
        [last] => object.remove(*last),
        [first, rest @ ..] => match object.get_mut(*first)? {
            Value::Object(inner) => take_path(inner, rest),
            // A null lookup (Salesforce sends `"Account": null` when there is none) means the field is null.
            Value::Null => Some(Value::Null),
            _ => None,
        },
    }
}

fn insert_path(object: &mut Map<String, Value>, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            object.insert(path.to_string(), value);
        }
        Some((first, rest)) => {
            let slot = object
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            if let Value::Object(inner) = slot {
                insert_path(inner, rest, value);
            }
        }
    }
}

fn get_path_mut<'a>(object: &'a mut Map<String, Value>, path: &str) -> Option<&'a mut Value> {
    match path.split_once('.') {
        None => object.get_mut(path),
        Some((first, rest)) => match object.get_mut(first)? {
            Value::Object(inner) => get_path_mut(inner, rest),
            _ => None,
        },
    }
}

/// A record key from a JSON value: strings as they are, numbers in their decimal form (HubSpot ids).
pub(crate) fn key_from_value(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn renames_lifts_related_fields_and_renames_inside_child_arrays() {
        let fm = map(&[
            ("id", "Id"),
            ("stageName", "StageName"),
            ("accountName", "Account.Name"),
            ("lineItems", "OpportunityLineItems"),
            ("lineItems[].sku", "ProductCode"),
            ("lineItems[].productName", "Product2.Name"),
        ]);
        let record = json!({
            "Id": "006A", "StageName": "Closed Won", "Account": {"Name": "Acme"}, "Extra": 1,
            "OpportunityLineItems": [{"ProductCode": "P-1", "Product2": {"Name": "Widget"}, "Quantity": 2}]
        });
        assert_eq!(
            apply_field_map(&fm, record),
            json!({
                "id": "006A", "stageName": "Closed Won", "accountName": "Acme", "Extra": 1,
                "lineItems": [{"sku": "P-1", "productName": "Widget", "Quantity": 2}]
            })
        );
    }

    #[test]
    fn null_related_object_gives_null_and_absent_fields_stay_absent() {
        let fm = map(&[("accountName", "Account.Name"), ("amount", "Amount")]);
        let out = apply_field_map(&fm, json!({"Account": null}));
        assert_eq!(out, json!({"accountName": null}));
    }

    #[test]
    fn swaps_and_nested_targets_work() {
        let fm = map(&[("a", "b"), ("b", "a"), ("customer.email", "Email")]);
        let out = apply_field_map(&fm, json!({"a": 1, "b": 2, "Email": "x@y"}));
        assert_eq!(out, json!({"a": 2, "b": 1, "customer": {"email": "x@y"}}));
    }

    #[test]
    fn unmapped_parent_keeps_its_name_but_children_are_renamed() {
        let fm = map(&[("items[].sku", "code")]);
        let out = apply_field_map(
            &fm,
            json!({"items": [{"code": "A"}, {"code": "B", "q": 1}]}),
        );
        assert_eq!(out, json!({"items": [{"sku": "A"}, {"sku": "B", "q": 1}]}));
    }

    #[test]
    fn child_maps_name_their_source_relationship() {
        let fm = map(&[
            ("lineItems", "OpportunityLineItems"),
            ("lineItems[].sku", "ProductCode"),
        ]);
        let children = child_maps(&fm);
        assert_eq!(children["lineItems"].0, "OpportunityLineItems");
        assert_eq!(children["lineItems"].1, map(&[("sku", "ProductCode")]));
    }
}
