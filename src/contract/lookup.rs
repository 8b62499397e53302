//! Lookup data (the ERP pricebook, say) as the expressions read it.
//!
//! The worker refreshes lookups on its own schedule; this module turns one refresh into an immutable
//! [`Lookups`] snapshot whose entries are already typed CEL values (decimals as decimals), so the cost of
//! conversion is paid once per refresh and never per record. Entries are checked against the fields the
//! contract declares for the lookup. This module does not fetch anything.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use kube::core::cel::cel::objects::{Key, Value};

use super::cel_env::{self, Fields, FxBuild, Struct, decimal_value, parse_decimal};
use super::eval::LookupDecl;
use super::record::{Json, parse_value};
use crate::api::FieldType;

/// Largest lookup document accepted by [`Lookups::from_json_bytes`].
pub const MAX_LOOKUP_BYTES: usize = 256 << 20;

/// One snapshot of every lookup table, ready to share between records (wrap it in an `Arc`).
#[derive(Clone, Default)]
pub struct Lookups {
    tables: HashMap<String, Table>,
}

#[derive(Clone)]
pub(crate) struct Table {
    pub(crate) value: Value,
    pub(crate) len: usize,
    /// The entry fields the table was built for; an environment refuses a table built for other fields.
    pub(crate) keys: Arc<[Key]>,
}

impl fmt::Debug for Lookups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Lookups");
        for (name, table) in &self.tables {
            d.field(name, &format_args!("{} entries", table.len));
        }
        d.finish()
    }
}

/// Why lookup data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("lookup data is not valid JSON: {0}")]
    Parse(String),
    #[error("lookup data must be an object of tables, {0}")]
    Shape(String),
    #[error("lookup {0} is not declared by the contract")]
    Undeclared(String),
    #[error("lookup {table}, entry {key:?}, field {field}: {reason}")]
    Entry {
        table: String,
        key: String,
        field: String,
        reason: String,
    },
    #[error("lookup {0} has no data; the contract's rules read it")]
    Missing(String),
}

impl LookupError {
    /// Stable label for conditions and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LookupError::Parse(_) => "lookup_invalid_json",
            LookupError::Shape(_) => "lookup_invalid_shape",
            LookupError::Undeclared(_) => "lookup_undeclared",
            LookupError::Entry { .. } => "lookup_invalid_entry",
            LookupError::Missing(_) => "lookup_missing",
        }
    }
}

impl Lookups {
    /// Reads `{"<lookup>": {"<key>": {"<field>": value, ...}, ...}, ...}` for the lookups the contract declares.
    /// Decimal fields may be JSON numbers or numeric strings; they are read from their text, exactly.
    pub fn from_json_bytes(
        contract: &super::CompiledContract,
        bytes: &[u8],
    ) -> Result<Self, LookupError> {
        Self::from_json_bytes_for(&contract.lookups, bytes)
    }

    /// Like [`Lookups::from_json_bytes`], from an already parsed document. Numbers go through their JSON text,
    /// so a decimal with more than 15 significant digits must be given as a string to stay exact.
    pub fn from_json(
        contract: &super::CompiledContract,
        value: &serde_json::Value,
    ) -> Result<Self, LookupError> {
        Self::from_json_bytes(contract, value.to_string().as_bytes())
    }

    pub(crate) fn from_json_bytes_for(
        decls: &[LookupDecl],
        bytes: &[u8],
    ) -> Result<Self, LookupError> {
        let json = parse_value(bytes, MAX_LOOKUP_BYTES, 8)
            .map_err(|e| LookupError::Parse(e.to_string()))?;
        let Json::Object(tables) = json else {
            return Err(LookupError::Shape(format!("found {}", json.type_name())));
        };
        let mut out = Lookups::default();
        for (name, table) in &tables {
            let decl = decls
                .iter()
                .find(|d| d.name == *name)
                .ok_or_else(|| LookupError::Undeclared(name.to_string()))?;
            let Json::Object(entries) = table else {
                return Err(LookupError::Shape(format!(
                    "lookup {name} is {}, not an object of entries",
                    table.type_name()
                )));
            };
            let mut map = HashMap::with_capacity_and_hasher(entries.len(), FxBuild::default());
            for (key, entry) in entries {
                map.insert(key.to_string(), entry_value(decl, key, entry)?);
            }
            let len = map.len();
            let table = cel_env::Table {
                keys: decl.keys.clone(),
                entries: map,
            };
            out.tables.insert(
                name.to_string(),
                Table {
                    len,
                    keys: decl.keys.clone(),
                    value: Value::Opaque(Arc::new(table)),
                },
            );
        }
        Ok(out)
    }

    /// The number of entries of each table.
    pub fn sizes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.tables.iter().map(|(name, t)| (name.as_str(), t.len))
    }

    pub(crate) fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }
}

fn entry_value(decl: &LookupDecl, key: &str, entry: &Json<'_>) -> Result<Value, LookupError> {
    let err = |field: &str, reason: String| LookupError::Entry {
        table: decl.name.clone(),
        key: key.to_string(),
        field: field.to_string(),
        reason,
    };
    let Json::Object(members) = entry else {
        return Err(err(
            "-",
            format!("the entry is {}, not an object", entry.type_name()),
        ));
    };
    let mut fields = Fields::new(decl.fields.len());
    for (name, value) in members {
        let Some(index) = decl.fields.iter().position(|(n, _)| n == name) else {
            continue;
        };
        let ty = decl.fields[index].1;
        let converted = match (ty, value) {
            (_, Json::Null) => continue,
            (FieldType::String | FieldType::Enum | FieldType::Date, Json::String(s)) => {
                Value::String(Arc::new(s.to_string()))
            }
            (FieldType::Boolean, Json::Bool(b)) => Value::Bool(*b),
            (FieldType::Integer, Json::Number(n)) => Value::Int(
                n.parse()
                    .map_err(|_| err(name, "is not a 64-bit integer".into()))?,
            ),
            (FieldType::Decimal, Json::Number(n)) => {
                decimal_value(parse_decimal(n).map_err(|e| err(name, e.to_string()))?)
            }
            (FieldType::Decimal, Json::String(n)) => {
                decimal_value(parse_decimal(n).map_err(|e| err(name, e.to_string()))?)
            }
            (FieldType::Datetime, Json::String(s)) => Value::Timestamp(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|_| err(name, "is not an RFC 3339 date-time".into()))?,
            ),
            (ty, v) => {
                return Err(err(
                    name,
                    format!("expected {}, found {}", ty.as_str(), v.type_name()),
                ));
            }
        };
        fields[index] = Some(converted);
    }
    Ok(Value::Opaque(Arc::new(Struct {
        keys: decl.keys.clone(),
        fields,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decls() -> Vec<LookupDecl> {
        vec![LookupDecl::new(
            "pricebook",
            vec![
                ("unitPrice".into(), FieldType::Decimal),
                ("currency".into(), FieldType::String),
            ],
        )]
    }

    #[test]
    fn entries_are_typed_once_with_exact_decimals() {
        let lookups = Lookups::from_json_bytes_for(
            &decls(),
            br#"{"pricebook": {"SKU-1": {"unitPrice": 12.50, "currency": "USD", "extra": [1]}, "SKU-2": {"unitPrice": "0.1"}}}"#,
        )
        .unwrap();
        let table = lookups.table("pricebook").unwrap();
        assert_eq!(table.len, 2);
        let table = cel_env::as_table(&table.value).expect("a table");
        let entry = cel_env::as_struct(&table.entries["SKU-1"]).expect("an entry");
        assert_eq!(
            cel_env::as_decimal(entry.get("unitPrice").unwrap()),
            Some(rust_decimal::Decimal::new(1250, 2))
        );
        assert!(entry.get("extra").is_none());
    }

    #[test]
    fn bad_lookup_data_is_refused_with_a_label() {
        let cases: &[(&[u8], &str)] = &[
            (b"[", "lookup_invalid_json"),
            (b"[]", "lookup_invalid_shape"),
            (br#"{"pricebook": []}"#, "lookup_invalid_shape"),
            (br#"{"prices": {}}"#, "lookup_undeclared"),
            (br#"{"pricebook": {"A": 1}}"#, "lookup_invalid_entry"),
            (
                br#"{"pricebook": {"A": {"unitPrice": "cheap"}}}"#,
                "lookup_invalid_entry",
            ),
            (
                br#"{"pricebook": {"A": {"currency": 1}}}"#,
                "lookup_invalid_entry",
            ),
        ];
        for (input, label) in cases {
            let err = Lookups::from_json_bytes_for(&decls(), input).unwrap_err();
            assert_eq!(err.label(), *label, "{}", String::from_utf8_lossy(input));
        }
    }
}
