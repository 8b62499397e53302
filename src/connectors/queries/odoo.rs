//! The audit's read of an Odoo database: the sink's model (default `sale.order`) by order date, through
//! JSON-RPC `object.execute_kw(db, uid, apiKey, model, "search_read", [domain], {fields, order, limit})`.
//!
//! The domain is `[[date, ">=", from], [date, "<=", to], ["id", ">", cursor]]` (Odoo datetimes are UTC
//! `YYYY-MM-DD HH:MM:SS`; both ends included), the order `id asc`, 500 rows a page; the cursor is the last
//! id. Fields come from `spec.audit`: `erpExternalIdField` (default: the sink's reference field,
//! `client_order_ref` on `sale.order`), `erpAmountField` (default `amount_total`), `erpCurrencyField`
//! (default `currency_id`, a many2one that answers `[id, "EUR"]`: the code is its display name) and
//! `erpDateField` (default `date_order`). An order without a reference (`false`, entered by hand) is reported
//! as `odoo:<model>/<id>`, so the audit counts it as an order without a deal and it never collides with a CRM
//! id.
//!
//! Only `search_read` is ever called: the query never writes. Authentication is the Odoo sink's (`login`,
//! `apiKey`, the spec's `database`), through the sink's session.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{
    AuditWindow, AuditedOrder, OrderPage, OrderQuery, Pace, QueryConfigError, QueryError, Settings,
    amount, currency, kind,
};
use crate::api::SinkSpec;
use crate::connectors::Credentials;
use crate::connectors::sinks::odoo::{OdooSink, reference_field};

const SYSTEM: &str = "odoo";
/// Rows per `search_read`.
pub const PAGE_SIZE: usize = 500;

/// Orders of one Odoo model, page by page.
pub struct OdooQuery {
    sink: OdooSink,
    external_id: String,
    amount: String,
    currency: String,
    date: String,
    default_currency: String,
    pace: Pace,
}

fn field(name: &str, value: &Option<String>, default: &str) -> Result<String, QueryConfigError> {
    let value = value.clone().unwrap_or_else(|| default.to_string());
    if value.contains('.') {
        return Err(QueryConfigError::new(
            format!("spec.audit.{name}"),
            format!("{value:?}: search_read reads fields of the model itself, not paths"),
        ));
    }
    Ok(value)
}

impl OdooQuery {
    /// From the flow's `sink`, its `audit` settings and the sink's Secret.
    pub fn from_spec(
        sink: &SinkSpec,
        settings: &Settings,
        credentials: &Credentials,
    ) -> Result<OdooQuery, QueryConfigError> {
        let odoo = OdooSink::from_spec(sink, credentials, crate::connectors::sinks::http_client())
            .map_err(|e| QueryConfigError::from_build("spec.sink", e))?;
        let audit = &settings.audit;
        Ok(OdooQuery {
            external_id: field(
                "erpExternalIdField",
                &audit.erp_external_id_field,
                reference_field(odoo.model()),
            )?,
            amount: field("erpAmountField", &audit.erp_amount_field, "amount_total")?,
            currency: field("erpCurrencyField", &audit.erp_currency_field, "currency_id")?,
            date: field("erpDateField", &audit.erp_date_field, "date_order")?,
            default_currency: settings.default_currency.clone(),
            pace: settings.pace(),
            sink: odoo,
        })
    }

    /// The `search_read` arguments of the page after `after`: `(args, kwargs)`.
    pub fn request(&self, window: &AuditWindow, after: Option<i64>) -> (Value, Value) {
        let format = "%Y-%m-%d %H:%M:%S";
        let mut domain = vec![
            json!([self.date, ">=", window.from.format(format).to_string()]),
            json!([self.date, "<=", window.to.format(format).to_string()]),
        ];
        if let Some(after) = after {
            domain.push(json!(["id", ">", after]));
        }
        (
            json!([domain]),
            json!({
                "fields": [self.external_id, self.amount, self.currency],
                "order": "id asc",
                "limit": PAGE_SIZE,
            }),
        )
    }

    fn read(&self, result: &Value) -> Result<OrderPage, QueryError> {
        let rows = result
            .as_array()
            .ok_or_else(|| QueryError::malformed(SYSTEM, "result: not a list of records"))?;
        let mut orders = Vec::with_capacity(rows.len());
        let mut last = None;
        for (i, row) in rows.iter().enumerate() {
            let id = row.get("id").and_then(Value::as_i64).ok_or_else(|| {
                QueryError::malformed(SYSTEM, format!("result[{i}].id: not a record id"))
            })?;
            let external_id = match row.get(&self.external_id) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                None | Some(Value::Bool(false)) | Some(Value::Null) | Some(Value::String(_)) => {
                    format!("odoo:{}/{id}", self.sink.model())
                }
                Some(other) => {
                    return Err(QueryError::malformed(
                        SYSTEM,
                        format!(
                            "result[{i}].{}: not a reference: {}",
                            self.external_id,
                            kind(other)
                        ),
                    ));
                }
            };
            // A many2one answers `[id, display name]`; a plain char field its value.
            let currency_at = format!("result[{i}].{}", self.currency);
            let code = match row.get(&self.currency) {
                Some(Value::Array(pair)) => match pair.as_slice() {
                    [_, name] => Some(name),
                    _ => {
                        return Err(QueryError::malformed(
                            SYSTEM,
                            format!("{currency_at}: not a [id, name] pair"),
                        ));
                    }
                },
                other => other,
            };
            orders.push(AuditedOrder {
                external_id,
                amount: amount(
                    SYSTEM,
                    row.get(&self.amount),
                    &format!("result[{i}].{}", self.amount),
                )?,
                currency: currency(SYSTEM, code, &self.default_currency, &currency_at)?,
            });
            last = Some(id);
        }
        let full = orders.len() >= PAGE_SIZE;
        Ok(OrderPage {
            orders,
            next: last.filter(|_| full).map(|id| id.to_string()),
        })
    }
}

#[async_trait]
impl OrderQuery for OdooQuery {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn page(
        &self,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, QueryError> {
        let after = match cursor {
            None => None,
            Some(c) => Some(c.parse::<i64>().map_err(|_| {
                QueryError::malformed(
                    SYSTEM,
                    format!(
                        "cursor: {:?} is not a record id",
                        crate::connectors::truncate(c, 40)
                    ),
                )
            })?),
        };
        let (args, kwargs) = self.request(window, after);
        self.pace.wait().await;
        let result = self
            .sink
            .execute_kw(
                self.sink.model(),
                "search_read",
                args,
                kwargs,
                &uuid::Uuid::new_v4().to_string(),
            )
            .await
            .map_err(QueryError::from_sink)?;
        self.read(&result)
    }
}
