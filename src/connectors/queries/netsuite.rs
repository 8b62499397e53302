//! The audit's read of a NetSuite account: the sink's transactions by date, through SuiteQL over REST
//! (`POST {baseUrl}/services/rest/query/v1/suiteql?limit=1000` with `Prefer: transient`).
//!
//! The query is
//! `SELECT t.id AS id, t.externalid AS externalid, t.foreigntotal AS amount, c.symbol AS currency FROM
//! transaction t LEFT JOIN currency c ON c.id = t.currency WHERE t.type = 'SalesOrd' AND t.trandate BETWEEN
//! TO_DATE('<from>', 'YYYY-MM-DD') AND TO_DATE('<to>', 'YYYY-MM-DD') [AND t.id > <cursor>] ORDER BY t.id`.
//! `trandate` is a date: the window's ends are UTC dates, both included. `foreigntotal` is the total in the
//! transaction's own currency (`total` would be in the subsidiary's). The currency is joined for its
//! `symbol`, the ISO code (`USD`): `BUILTIN.DF(currency)` would give the currency's display name (`US
//! Dollar`), which is not what the CRM holds. The transaction type follows the sink's `recordType`
//! (`salesOrder` → `SalesOrd`, `invoice` → `CustInvc`, `cashSale` → `CashSale`, `estimate` → `Estimate`).
//! Fields come from `spec.audit` (`erpExternalIdField` default `externalid`, `erpAmountField` default
//! `foreigntotal`, `erpCurrencyField` default `currency`, `erpDateField` default `trandate`), each a column of
//! `transaction`.
//!
//! Paging is by keyset on the internal id (the cursor is the last one): SuiteQL's offset paging stops at
//! 100,000 rows. A transaction without an external id (entered by hand in NetSuite) is reported as
//! `netsuite:<internal id>`, so the audit counts it as an order without a deal and it never collides with a
//! CRM id.
//!
//! Authentication is the NetSuite sink's (OAuth 2.0 M2M or TBA, same Secret keys; see
//! `connectors::sinks::netsuite`).

use async_trait::async_trait;
use serde_json::Value;

use super::{
    AuditWindow, AuditedOrder, OrderPage, OrderQuery, Pace, QueryConfigError, QueryError, Settings,
    amount, currency,
};
use crate::api::SinkSpec;
use crate::connectors::Credentials;
use crate::connectors::sinks::netsuite::NetSuiteSink;

const SYSTEM: &str = "netsuite";
/// Rows per SuiteQL page: the API's largest.
pub const PAGE_SIZE: usize = 1000;

/// Transactions of one type in one account, page by page.
pub struct NetSuiteQuery {
    sink: NetSuiteSink,
    transaction_type: &'static str,
    external_id: String,
    amount: String,
    currency: String,
    date: String,
    default_currency: String,
    pace: Pace,
}

/// The SuiteQL `transaction.type` of a REST record type.
pub fn transaction_type(record_type: &str) -> Option<&'static str> {
    Some(match record_type.to_ascii_lowercase().as_str() {
        "salesorder" => "SalesOrd",
        "invoice" => "CustInvc",
        "cashsale" => "CashSale",
        "estimate" => "Estimate",
        _ => return None,
    })
}

fn column(
    field: &str,
    name: &str,
    value: &Option<String>,
    default: &str,
) -> Result<String, QueryConfigError> {
    let value = value.clone().unwrap_or_else(|| default.to_string());
    if value.contains('.') {
        return Err(QueryConfigError::new(
            format!("spec.audit.{field}"),
            format!("{value:?}: a NetSuite field is a column of transaction, not a path ({name})"),
        ));
    }
    Ok(value.to_ascii_lowercase())
}

impl NetSuiteQuery {
    /// From the flow's `sink`, its `audit` settings and the sink's Secret.
    pub fn from_spec(
        sink: &SinkSpec,
        settings: &Settings,
        credentials: &Credentials,
    ) -> Result<NetSuiteQuery, QueryConfigError> {
        let record_type = sink.record_type.as_deref().unwrap_or_default();
        let transaction_type = transaction_type(record_type).ok_or_else(|| {
            QueryConfigError::new(
                "spec.sink.recordType",
                format!(
                    "the audit reads salesOrder, invoice, cashSale or estimate transactions, not {record_type:?}"
                ),
            )
        })?;
        let audit = &settings.audit;
        let query = NetSuiteQuery {
            sink: NetSuiteSink::from_spec(
                sink,
                credentials,
                crate::connectors::sinks::http_client(),
            )
            .map_err(|e| QueryConfigError::from_build("spec.sink", e))?,
            transaction_type,
            external_id: column(
                "erpExternalIdField",
                "the external id",
                &audit.erp_external_id_field,
                "externalid",
            )?,
            amount: column(
                "erpAmountField",
                "the total",
                &audit.erp_amount_field,
                "foreigntotal",
            )?,
            currency: column(
                "erpCurrencyField",
                "the currency",
                &audit.erp_currency_field,
                "currency",
            )?,
            date: column(
                "erpDateField",
                "the date",
                &audit.erp_date_field,
                "trandate",
            )?,
            default_currency: settings.default_currency.clone(),
            pace: settings.pace(),
        };
        Ok(query)
    }

    /// The SuiteQL of the page after `after` (an internal id, already checked).
    pub fn suiteql(&self, window: &AuditWindow, after: Option<u64>) -> String {
        let mut q = format!(
            "SELECT t.id AS id, t.{ext} AS externalid, t.{amount} AS amount, c.symbol AS currency \
             FROM transaction t LEFT JOIN currency c ON c.id = t.{currency} \
             WHERE t.type = '{kind}' AND t.{date} BETWEEN TO_DATE('{from}', 'YYYY-MM-DD') \
             AND TO_DATE('{to}', 'YYYY-MM-DD')",
            ext = self.external_id,
            amount = self.amount,
            currency = self.currency,
            kind = self.transaction_type,
            date = self.date,
            from = window.from.date_naive().format("%Y-%m-%d"),
            to = window.to.date_naive().format("%Y-%m-%d"),
        );
        if let Some(after) = after {
            q.push_str(&format!(" AND t.id > {after}"));
        }
        q.push_str(" ORDER BY t.id");
        q
    }

    fn read(&self, body: &Value) -> Result<OrderPage, QueryError> {
        let items = body
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| QueryError::malformed(SYSTEM, "items: missing or not an array"))?;
        let mut orders = Vec::with_capacity(items.len());
        let mut last = None;
        for (i, item) in items.iter().enumerate() {
            let id = internal_id(item.get("id")).ok_or_else(|| {
                QueryError::malformed(SYSTEM, format!("items[{i}].id: not an internal id"))
            })?;
            let external_id = match item.get("externalid") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                None | Some(Value::Null) | Some(Value::String(_)) => format!("netsuite:{id}"),
                Some(_) => {
                    return Err(QueryError::malformed(
                        SYSTEM,
                        format!("items[{i}].externalid: not a string"),
                    ));
                }
            };
            orders.push(AuditedOrder {
                external_id,
                amount: amount(SYSTEM, item.get("amount"), &format!("items[{i}].amount"))?,
                currency: currency(
                    SYSTEM,
                    item.get("currency"),
                    &self.default_currency,
                    &format!("items[{i}].currency"),
                )?,
            });
            last = Some(id);
        }
        let more = body
            .get("hasMore")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            || orders.len() >= PAGE_SIZE;
        Ok(OrderPage {
            orders,
            next: last.filter(|_| more).map(|id| id.to_string()),
        })
    }
}

/// SuiteQL answers ids as strings (`"4711"`), sometimes as numbers.
fn internal_id(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

#[async_trait]
impl OrderQuery for NetSuiteQuery {
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
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                QueryError::malformed(
                    SYSTEM,
                    format!(
                        "cursor: {:?} is not an internal id",
                        crate::connectors::truncate(c, 40)
                    ),
                )
            })?),
        };
        self.pace.wait().await;
        let answer = self
            .sink
            .suiteql(&self.suiteql(window, after), PAGE_SIZE)
            .await
            .map_err(QueryError::from_sink)?;
        if !(200..300).contains(&answer.status) {
            let detail = crate::connectors::sinks::netsuite::error_details(&answer.body)
                .unwrap_or(answer.body);
            return Err(QueryError::from_status(
                SYSTEM,
                answer.status,
                answer.retry_after,
                &detail,
            ));
        }
        let body: Value = serde_json::from_str(&answer.body).map_err(|e| {
            QueryError::malformed(SYSTEM, format!("the SuiteQL answer is not JSON: {e}"))
        })?;
        self.read(&body)
    }
}
