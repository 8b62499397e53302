//! Read-only queries of both sides of a flow, for the reconciliation audit: the deals closed in the CRM and
//! the orders in the ERP over a window, page by page.
//!
//! Owns the wire formats of those reads (Salesforce SOQL, HubSpot's CRM search, NetSuite SuiteQL, Odoo
//! `search_read`, the PostgreSQL sink's table) and nothing else: the audit (`crate::audit`) decides what to
//! read, keeps the cursors durable between pages and compares. A query never writes to either system.
//!
//! Every system is read by keyset (its own id, ascending, strictly after the last one read), never by a
//! server-side cursor or an offset: those expire or top out, and the cursor has to survive a restart. Each
//! query object paces its own requests with a token bucket at `spec.audit.maxRequestsPerSecond` (default the
//! flow's `delivery.rateLimit`, or 5/s without one) and does not retry beyond what a protocol needs (one new
//! token after a 401); the audit driver retries what [`QueryError`] says is worth retrying.
//!
//! Money is exact: amounts are parsed from the answer's text (a JSON number's digits, a string) into a
//! [`Decimal`], never through a float of ours. A deal or order whose amount is null counts as 0 in its
//! currency (it exists; what it is worth is the comparison's business), and one without a currency is in
//! `spec.audit.defaultCurrency` (default `USD`).
//!
//! Constructors: [`crm_query`] for the flow's source (Salesforce, HubSpot) and [`erp_query`] for its sink
//! (NetSuite, Odoo, PostgreSQL), with the same Secret the worker mounts for them. Credential keys are the
//! connectors' own (see `salesforce`, `hubspot` and the sinks); a generic webhook source and an http sink have
//! no query API, which is a [`QueryConfigError`].

pub mod hubspot;
pub mod netsuite;
pub mod odoo;
pub mod postgres;
pub mod salesforce;

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{FlowAuditSpec, SinkSystem, SourceSystem, SyncFlowSpec};
use crate::connectors::sinks::{Bucket, BuildError};
use crate::connectors::{Credentials, SinkError};

/// One closed deal (CRM) or one order (ERP), as much of it as the audit compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditedOrder {
    /// The CRM record's id: on the CRM side its own id, on the ERP side the field that holds it.
    pub external_id: String,
    /// ISO 4217 code.
    pub currency: String,
    pub amount: Decimal,
}

/// One page of a side, and where the next one starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderPage {
    pub orders: Vec<AuditedOrder>,
    /// Opaque cursor of the next page; `None` when this was the last. It is stored in the ledger between pages
    /// so that a restarted audit resumes, so it must stay valid across a process restart (no server-side
    /// cursor that expires, no in-memory state).
    pub next: Option<String>,
}

/// The span of close dates (deals) and order dates (orders) an audit covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Why a page could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The system asked us to slow down (429, Salesforce `REQUEST_LIMIT_EXCEEDED`); worth retrying later.
    #[error("{system} rate-limited the audit: {message}")]
    RateLimited {
        system: &'static str,
        retry_after: Option<std::time::Duration>,
        message: String,
    },
    /// The system failed or could not be reached (5xx, timeout, connection); worth retrying.
    #[error("{system} is unavailable: {message}")]
    Unavailable {
        system: &'static str,
        message: String,
    },
    /// The system refused the query (authentication, permissions, a bad query): retrying won't help.
    #[error("{system} refused the audit's query: {message}")]
    Refused {
        system: &'static str,
        message: String,
    },
    /// The answer did not have the expected shape; the message names the field path.
    #[error("{system} answered something the audit cannot read: {message}")]
    Malformed {
        system: &'static str,
        message: String,
    },
}

/// One side of a flow, read page by page.
#[async_trait]
pub trait OrderQuery: Send + Sync {
    /// The system's name, for messages and metrics (`salesforce`, `hubspot`, `netsuite`, `odoo`, `postgres`).
    fn system(&self) -> &'static str;
    /// The page after `cursor` (`None`: the first page) of the deals or orders in `window`, in a stable
    /// order so that pages neither overlap nor skip.
    async fn page(
        &self,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, QueryError>;
}

/// A flow whose side the audit cannot read: names the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct QueryConfigError {
    /// The flow's field at fault, e.g. `spec.sink.system` or `spec.audit.erpAmountField`.
    pub path: String,
    pub reason: String,
}

impl QueryConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> QueryConfigError {
        QueryConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The stable label for metrics and condition reasons.
    pub fn label(&self) -> &'static str {
        "audit_query_config"
    }

    fn from_build(side: &str, error: BuildError) -> QueryConfigError {
        let path = match &error {
            BuildError::Credentials { .. } => format!("{side}.credentialsSecretRef"),
            BuildError::MissingField { field, .. } => format!("{side}.{field}"),
            BuildError::Invalid { .. } => side.to_string(),
        };
        QueryConfigError::new(path, error.to_string())
    }
}

impl QueryError {
    /// The stable label for metrics and the audit's partial reason.
    pub fn label(&self) -> &'static str {
        match self {
            QueryError::RateLimited { .. } => "audit_rate_limited",
            QueryError::Unavailable { .. } => "audit_unavailable",
            QueryError::Refused { .. } => "audit_refused",
            QueryError::Malformed { .. } => "audit_malformed",
        }
    }

    /// Whether a later attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            QueryError::RateLimited { .. } | QueryError::Unavailable { .. }
        )
    }

    pub(crate) fn malformed(system: &'static str, message: impl Into<String>) -> QueryError {
        QueryError::Malformed {
            system,
            message: message.into(),
        }
    }

    /// The class of an HTTP answer that was not a success: 429 → rate-limited, 5xx and 408 → unavailable,
    /// every other status (401, 403, a 400 for a query the system refuses) → refused.
    pub(crate) fn from_status(
        system: &'static str,
        status: u16,
        retry_after: Option<std::time::Duration>,
        body: &str,
    ) -> QueryError {
        let message = format!("HTTP {status}: {}", crate::connectors::truncate(body, 300));
        match status {
            429 => QueryError::RateLimited {
                system,
                retry_after,
                message,
            },
            408 | 500..=599 => QueryError::Unavailable { system, message },
            _ => QueryError::Refused { system, message },
        }
    }

    /// A sink's classified failure (the NetSuite and Odoo queries call through their sinks) as a query error.
    pub(crate) fn from_sink(error: SinkError) -> QueryError {
        let system = error.system;
        if error.status == Some(429) {
            return QueryError::RateLimited {
                system,
                retry_after: error.retry_after,
                message: error.message,
            };
        }
        match error.class {
            crate::api::ErrorClass::Transient => QueryError::Unavailable {
                system,
                message: error.message,
            },
            _ => QueryError::Refused {
                system,
                message: error.message,
            },
        }
    }
}

/// The audit's read of the flow's CRM side (`spec.source`): Salesforce (SOQL) or HubSpot (CRM search), with the
/// source's Secret as the worker mounts it.
pub fn crm_query(
    flow: &SyncFlowSpec,
    credentials: &Credentials,
) -> Result<Arc<dyn OrderQuery>, QueryConfigError> {
    let settings = Settings::of(flow)?;
    Ok(match flow.source.system {
        SourceSystem::Salesforce => Arc::new(salesforce::SalesforceQuery::from_spec(
            &flow.source,
            &settings,
            credentials,
        )?),
        SourceSystem::Hubspot => Arc::new(hubspot::HubspotQuery::from_spec(
            &flow.source,
            &settings,
            credentials,
        )?),
        SourceSystem::Generic => {
            return Err(QueryConfigError::new(
                "spec.source.system",
                "a generic webhook source has no query API the audit can read",
            ));
        }
    })
}

/// The audit's read of the flow's ERP side (`spec.sink`): NetSuite (SuiteQL), Odoo (`search_read`) or the
/// PostgreSQL sink's table, with the sink's Secret as the worker mounts it.
pub fn erp_query(
    flow: &SyncFlowSpec,
    credentials: &Credentials,
) -> Result<Arc<dyn OrderQuery>, QueryConfigError> {
    let settings = Settings::of(flow)?;
    Ok(match flow.sink.system {
        SinkSystem::Netsuite => Arc::new(netsuite::NetSuiteQuery::from_spec(
            &flow.sink,
            &settings,
            credentials,
        )?),
        SinkSystem::Odoo => Arc::new(odoo::OdooQuery::from_spec(
            &flow.sink,
            &settings,
            credentials,
        )?),
        SinkSystem::Postgres => Arc::new(postgres::PostgresQuery::from_spec(
            &flow.sink,
            &settings,
            credentials,
        )?),
        SinkSystem::Http => {
            return Err(QueryConfigError::new(
                "spec.sink.system",
                "an http sink has no query API the audit can read",
            ));
        }
    })
}

/// The flow's `spec.audit`, checked, with the pace resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub audit: FlowAuditSpec,
    /// Requests per second toward each side.
    pub requests_per_second: u32,
    pub default_currency: String,
}

/// Requests per second when neither `spec.audit.maxRequestsPerSecond` nor `spec.delivery.rateLimit` says.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 5;

impl Settings {
    pub fn of(flow: &SyncFlowSpec) -> Result<Settings, QueryConfigError> {
        let audit = flow.audit.clone().unwrap_or_default();
        let fields = [
            ("erpExternalIdField", &audit.erp_external_id_field),
            ("erpAmountField", &audit.erp_amount_field),
            ("erpCurrencyField", &audit.erp_currency_field),
            ("erpDateField", &audit.erp_date_field),
            ("crmAmountField", &audit.crm_amount_field),
            ("crmCurrencyField", &audit.crm_currency_field),
        ];
        // The CRD's pattern already holds these to identifiers; they are spliced into SOQL, SuiteQL and SQL,
        // so a spec that skipped the API server (a local file) is checked again here.
        for (name, value) in fields {
            if let Some(value) = value
                && !is_field_path(value)
            {
                return Err(QueryConfigError::new(
                    format!("spec.audit.{name}"),
                    format!("{value:?} is not a field name (letters, digits, `_`, dotted paths)"),
                ));
            }
        }
        let default_currency = audit
            .default_currency
            .clone()
            .unwrap_or_else(|| "USD".to_string());
        if default_currency.len() != 3 || !default_currency.chars().all(|c| c.is_ascii_uppercase())
        {
            return Err(QueryConfigError::new(
                "spec.audit.defaultCurrency",
                format!("{default_currency:?} is not an ISO 4217 code (three capital letters)"),
            ));
        }
        let requests_per_second = match audit.max_requests_per_second {
            Some(0) => {
                return Err(QueryConfigError::new(
                    "spec.audit.maxRequestsPerSecond",
                    "must be at least 1",
                ));
            }
            Some(n) => n,
            None if flow.delivery.rate_limit > 0 => flow.delivery.rate_limit,
            None => DEFAULT_REQUESTS_PER_SECOND,
        };
        Ok(Settings {
            audit,
            requests_per_second,
            default_currency,
        })
    }

    pub(crate) fn pace(&self) -> Pace {
        Pace(Bucket::new(self.requests_per_second))
    }
}

/// `ident(.ident)*`, each starting with a letter or `_`.
pub(crate) fn is_field_path(value: &str) -> bool {
    !value.is_empty()
        && value.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// A query object's own pace: one token per request, refilled at the configured rate.
#[derive(Debug)]
pub(crate) struct Pace(Bucket);

impl Pace {
    pub(crate) async fn wait(&self) {
        self.0.take().await;
    }
}

/// The value at a dotted `path` of a JSON object (`Account.Amount__c`), `None` when a step is missing.
pub(crate) fn at_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, step| v.get(step))
}

/// An amount as the answer wrote it, exactly: a JSON number by its digits, a string parsed as a decimal; null
/// (or an absent or empty field) is 0. `at` names the field path for the error.
pub(crate) fn amount(
    system: &'static str,
    value: Option<&Value>,
    at: &str,
) -> Result<Decimal, QueryError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(Decimal::ZERO),
        // Without serde_json's `arbitrary_precision` a number is held as an f64 (or an integer); its text is
        // the shortest that reads back to the same f64, which is the digits the system sent for any amount
        // an f64 can tell apart (up to 15 significant digits).
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(Decimal::ZERO),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(other) => {
            return Err(QueryError::malformed(
                system,
                format!("{at}: not a decimal: {}", kind(other)),
            ));
        }
    };
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        Decimal::from_str(&text)
    };
    parsed.map_err(|_| {
        QueryError::malformed(
            system,
            format!(
                "{at}: not a decimal: {:?}",
                crate::connectors::truncate(&text, 40)
            ),
        )
    })
}

/// A currency code as the answer wrote it; null or empty is `default`. `at` names the field path.
pub(crate) fn currency(
    system: &'static str,
    value: Option<&Value>,
    default: &str,
    at: &str,
) -> Result<String, QueryError> {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(default.to_string()),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(default.to_string()),
        Some(Value::String(s)) => {
            let code = s.trim().to_ascii_uppercase();
            if code.len() == 3 && code.chars().all(|c| c.is_ascii_alphabetic()) {
                Ok(code)
            } else {
                Err(QueryError::malformed(
                    system,
                    format!(
                        "{at}: not an ISO 4217 code: {:?}",
                        crate::connectors::truncate(s, 40)
                    ),
                ))
            }
        }
        Some(other) => Err(QueryError::malformed(
            system,
            format!("{at}: not a currency code: {}", kind(other)),
        )),
    }
}

/// What kind of JSON value this is, for an error (never the value itself: it may be customer data).
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The `Retry-After` of an answer, in seconds or as a date.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::connectors::parse_retry_after)
}

/// A request that got no answer (connection refused, timeout): the system is unavailable.
pub(crate) fn transport(system: &'static str, error: &reqwest::Error) -> QueryError {
    QueryError::Unavailable {
        system,
        message: crate::connectors::transport_error(system, error).message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_are_exact_and_null_is_zero() {
        let sum = amount("x", Some(&json!(0.1)), "a").unwrap()
            + amount("x", Some(&json!("0.2")), "b").unwrap();
        assert_eq!(sum, Decimal::from_str("0.3").unwrap());
        assert_eq!(amount("x", Some(&Value::Null), "a").unwrap(), Decimal::ZERO);
        assert_eq!(amount("x", None, "a").unwrap(), Decimal::ZERO);
        assert_eq!(
            amount("x", Some(&json!(1e3)), "a").unwrap(),
            Decimal::from(1000)
        );
        let err = amount("x", Some(&json!("ten")), "records[3].Amount").unwrap_err();
        assert!(
            err.to_string().contains("records[3].Amount: not a decimal"),
            "{err}"
        );
        let err = amount("x", Some(&json!({"v": 1})), "records[0].Amount").unwrap_err();
        assert!(err.to_string().contains("an object"), "{err}");
    }

    #[test]
    fn currencies_fall_back_to_the_default_and_must_be_codes() {
        assert_eq!(currency("x", None, "EUR", "c").unwrap(), "EUR");
        assert_eq!(currency("x", Some(&json!("")), "EUR", "c").unwrap(), "EUR");
        assert_eq!(
            currency("x", Some(&json!("usd")), "EUR", "c").unwrap(),
            "USD"
        );
        let err = currency("x", Some(&json!("US Dollar")), "EUR", "items[2].currency").unwrap_err();
        assert!(err.to_string().contains("items[2].currency"), "{err}");
    }

    #[test]
    fn field_paths_are_identifiers() {
        assert!(is_field_path("Amount"));
        assert!(is_field_path("payload.total_amount"));
        assert!(!is_field_path("Amount; DROP"));
        assert!(!is_field_path("a..b"));
        assert!(!is_field_path("1a"));
    }
}
