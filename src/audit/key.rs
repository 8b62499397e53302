//! How an ERP order's external id leads back to the CRM record it came from. The contract's
//! `mapping.externalId` builds the ERP key from the CRM record (`"SF-" + record.id`), so the two sides of an
//! audit name one deal differently; the audit compares by the CRM's id (the ledger's source key, which every
//! explanation is looked up by) and reads each ERP key back through the expression's fixed prefix and suffix.
//!
//! Pure: the expression is evaluated once with a probe value standing in for the record's id.

use std::sync::Arc;

use async_trait::async_trait;
use kube::core::cel::cel::{Context, Program, Value};

use crate::connectors::queries::{AuditWindow, OrderPage, OrderQuery, QueryError};

/// The text around the CRM id in every ERP key the contract makes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyTemplate {
    pub prefix: String,
    pub suffix: String,
}

/// Stands in for the record's id while the expression is evaluated: no real id contains it.
const PROBE: &str = "\u{1}meshline-audit-probe\u{1}";

impl KeyTemplate {
    /// The template of a contract's `mapping.externalId` expression, which must be the record's one id field
    /// with fixed text around it (`record.id`, `"SF-" + record.id`, `"HS-" + string(record.hs_object_id)`).
    /// The error says why the audit cannot match by it.
    pub fn of_expression(expression: &str) -> Result<KeyTemplate, String> {
        let why = |reason: String| {
            format!(
                "spec.mapping.externalId ({expression}): the audit matches ERP orders to CRM deals by the CRM's id, but {reason}"
            )
        };
        let fields: std::collections::BTreeSet<&str> = expression
            .match_indices("record.")
            .map(|(i, m)| {
                let rest = &expression[i + m.len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        let field = match fields.len() {
            1 => *fields.iter().next().unwrap_or(&""),
            0 => return Err(why("the expression reads no field of the record".into())),
            _ => {
                return Err(why(format!(
                    "the expression reads {} fields of the record ({})",
                    fields.len(),
                    fields.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
        };
        let program =
            Program::compile(expression).map_err(|e| why(format!("it does not compile: {e}")))?;
        let mut context = Context::default();
        let record = std::collections::HashMap::from([(field.to_string(), PROBE.to_string())]);
        context
            .add_variable("record", record)
            .map_err(|e| why(e.to_string()))?;
        let value = program
            .execute(&context)
            .map_err(|e| why(format!("it cannot be evaluated on the id alone: {e}")))?;
        let Value::String(text) = value else {
            return Err(why("it does not give a string".into()));
        };
        match text.split(PROBE).collect::<Vec<_>>()[..] {
            [prefix, suffix] => Ok(KeyTemplate {
                prefix: prefix.to_string(),
                suffix: suffix.to_string(),
            }),
            _ => Err(why(format!(
                "record.{field} does not appear in the result exactly once, as it is"
            ))),
        }
    }

    /// The CRM id an ERP key was made from, or the key unchanged when the contract did not make it (an order
    /// entered by hand counts as an order without a deal).
    pub fn crm_id<'a>(&self, erp_key: &'a str) -> &'a str {
        erp_key
            .strip_prefix(self.prefix.as_str())
            .and_then(|k| k.strip_suffix(self.suffix.as_str()))
            .filter(|k| !k.is_empty())
            .unwrap_or(erp_key)
    }
}

/// The ERP side of a flow with its keys read back to CRM ids.
pub struct CrmKeyed {
    pub inner: Arc<dyn OrderQuery>,
    pub template: KeyTemplate,
}

#[async_trait]
impl OrderQuery for CrmKeyed {
    fn system(&self) -> &'static str {
        self.inner.system()
    }

    async fn page(
        &self,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, QueryError> {
        let mut page = self.inner.page(window, cursor).await?;
        for order in &mut page.orders {
            let id = self.template.crm_id(&order.external_id);
            if id.len() != order.external_id.len() {
                order.external_id = id.to_string();
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_examples_keys_read_back_to_crm_ids() {
        let sf = KeyTemplate::of_expression(r#""SF-" + record.id"#).unwrap();
        assert_eq!(sf.prefix, "SF-");
        assert_eq!(sf.crm_id("SF-006Dn0000000001AAA"), "006Dn0000000001AAA");
        // Not made by the contract: kept, so it counts as an order without a deal.
        assert_eq!(sf.crm_id("MANUAL-7"), "MANUAL-7");
        assert_eq!(sf.crm_id("SF-"), "SF-");
        let plain = KeyTemplate::of_expression("record.id").unwrap();
        assert_eq!(plain, KeyTemplate::default());
        let around = KeyTemplate::of_expression(r#""HS-" + record.hs_object_id + "/v1""#).unwrap();
        assert_eq!(around.crm_id("HS-42/v1"), "42");
    }

    #[test]
    fn an_expression_that_is_not_the_id_with_fixed_text_is_named() {
        for (expression, reason) in [
            (r#"record.accountId + "-" + record.id"#, "reads 2 fields"),
            (r#""fixed""#, "reads no field"),
            (r#"record.id + record.id"#, "exactly once"),
        ] {
            let e = KeyTemplate::of_expression(expression).unwrap_err();
            assert!(e.starts_with("spec.mapping.externalId"), "{e}");
            assert!(e.contains(reason), "{expression}: {e}");
        }
    }
}
