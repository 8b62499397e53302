//! The audit's read of a Salesforce org: closed-won opportunities by close date, through the REST query
//! resource (`GET {instance_url}/services/data/v61.0/query?q=<SOQL>`).
//!
//! The SOQL is `SELECT Id, <amount>, <currency> FROM <object> WHERE IsWon = true AND CloseDate >= <from> AND
//! CloseDate <= <to> [AND (<spec.source.filter>)] [AND Id > '<cursor>'] ORDER BY Id LIMIT 2000`. `CloseDate` is
//! a date, so the window's ends are taken as UTC dates, both included. The amount field is
//! `spec.audit.crmAmountField` (default `Amount`), the currency field `spec.audit.crmCurrencyField` (default
//! `CurrencyIsoCode`).
//!
//! Paging is by keyset on `Id`: the cursor is the last Id of the page. `nextRecordsUrl` is not followed: it is
//! a server-side query locator that expires (15 minutes idle) and cannot be stored across a restart.
//!
//! An org without multi-currency has no `CurrencyIsoCode` field and answers 400 `INVALID_FIELD`; when the
//! currency field is the default one, the query notes that the org is single-currency and asks again without
//! it (once per query object), and every deal is in `spec.audit.defaultCurrency`. A configured currency field
//! that does not exist stays an error.
//!
//! Authentication is the source's own (see `connectors::sources::salesforce`: JWT bearer with `clientId`,
//! `username`, `privateKey`, optional `loginUrl`; or client credentials with `clientId`, `clientSecret` and the
//! flow's `baseUrl`), through the poller's token cache; a 401 fetches one new token.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde_json::Value;

use super::{
    AuditWindow, AuditedOrder, OrderPage, OrderQuery, Pace, QueryConfigError, QueryError, Settings,
    amount, at_path, currency, is_field_path, retry_after, transport,
};
use crate::api::SourceSpec;
use crate::connectors::Credentials;
use crate::connectors::sources::SourceError;
use crate::connectors::sources::salesforce::{SalesforceAuth, SalesforceConfig, SalesforcePoller};

const SYSTEM: &str = "salesforce";
/// Rows per query: SOQL's largest batch, so one request is one page.
pub const PAGE_SIZE: usize = 2000;
const DEFAULT_AMOUNT_FIELD: &str = "Amount";
const DEFAULT_CURRENCY_FIELD: &str = "CurrencyIsoCode";

/// Closed-won opportunities of one org, page by page.
pub struct SalesforceQuery {
    session: SalesforcePoller,
    http: reqwest::Client,
    api_version: String,
    object: String,
    filter: Option<String>,
    amount_field: String,
    currency_field: String,
    /// The currency field was configured: its absence is the operator's error, not a single-currency org.
    currency_configured: bool,
    /// Learned from an `INVALID_FIELD` answer: the org has no multi-currency.
    single_currency: AtomicBool,
    default_currency: String,
    pace: Pace,
}

impl SalesforceQuery {
    /// From the flow's `source`, its `audit` settings and the source's Secret.
    pub fn from_spec(
        source: &SourceSpec,
        settings: &Settings,
        credentials: &Credentials,
    ) -> Result<SalesforceQuery, QueryConfigError> {
        let auth = SalesforceAuth::from_credentials(credentials).map_err(|e| {
            QueryConfigError::new("spec.source.credentialsSecretRef", e.to_string())
        })?;
        let base_url = match (&source.base_url, &auth) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            // The JWT bearer login names the instance in its answer; the login URL is only a fallback.
            (None, SalesforceAuth::JwtBearer { login_url, .. }) => login_url.clone(),
            (None, SalesforceAuth::ClientCredentials { .. }) => {
                return Err(QueryConfigError::new(
                    "spec.source.baseUrl",
                    "client-credentials login to Salesforce needs the org's My Domain URL",
                ));
            }
        };
        if !is_field_path(&source.object) || source.object.contains('.') {
            return Err(QueryConfigError::new(
                "spec.source.object",
                format!("{:?} is not an sObject name", source.object),
            ));
        }
        let config = SalesforceConfig {
            base_url,
            api_version: "v61.0".into(),
            object: source.object.clone(),
            filter: source.filter.clone(),
            field_map: Default::default(),
            limit: PAGE_SIZE,
            poll_interval: std::time::Duration::from_secs(30),
            source_name: format!("salesforce:{}", source.object),
            max_attempts: 1,
            backoff_base: std::time::Duration::from_secs(1),
            backoff_max: std::time::Duration::from_secs(1),
        };
        let api_version = config.api_version.clone();
        let session = SalesforcePoller::rotating(config, credentials.clone()).map_err(|e| {
            QueryConfigError::new("spec.source.credentialsSecretRef", e.to_string())
        })?;
        Ok(SalesforceQuery {
            session,
            http: crate::connectors::sinks::http_client(),
            api_version,
            object: source.object.clone(),
            filter: source.filter.clone().filter(|f| !f.trim().is_empty()),
            amount_field: settings
                .audit
                .crm_amount_field
                .clone()
                .unwrap_or_else(|| DEFAULT_AMOUNT_FIELD.into()),
            currency_field: settings
                .audit
                .crm_currency_field
                .clone()
                .unwrap_or_else(|| DEFAULT_CURRENCY_FIELD.into()),
            currency_configured: settings.audit.crm_currency_field.is_some(),
            single_currency: AtomicBool::new(false),
            default_currency: settings.default_currency.clone(),
            pace: settings.pace(),
        })
    }

    /// The SOQL of the page after `after` (an Id, already checked).
    pub fn soql(&self, window: &AuditWindow, after: Option<&str>) -> String {
        let mut fields = vec!["Id".to_string(), self.amount_field.clone()];
        if !self.single_currency.load(Ordering::Relaxed) {
            fields.push(self.currency_field.clone());
        }
        let mut soql = format!(
            "SELECT {} FROM {} WHERE IsWon = true AND CloseDate >= {} AND CloseDate <= {}",
            fields.join(", "),
            self.object,
            window.from.date_naive().format("%Y-%m-%d"),
            window.to.date_naive().format("%Y-%m-%d"),
        );
        if let Some(filter) = &self.filter {
            soql.push_str(&format!(" AND ({filter})"));
        }
        if let Some(after) = after {
            soql.push_str(&format!(" AND Id > '{}'", soql_escape(after)));
        }
        soql.push_str(&format!(" ORDER BY Id LIMIT {PAGE_SIZE}"));
        soql
    }

    fn read(&self, body: &Value) -> Result<OrderPage, QueryError> {
        let records = body
            .get("records")
            .and_then(Value::as_array)
            .ok_or_else(|| QueryError::malformed(SYSTEM, "records: missing or not an array"))?;
        let single = self.single_currency.load(Ordering::Relaxed);
        let mut orders = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let id = record
                .get("Id")
                .and_then(Value::as_str)
                .filter(|id| is_salesforce_id(id))
                .ok_or_else(|| {
                    QueryError::malformed(SYSTEM, format!("records[{i}].Id: not a Salesforce Id"))
                })?;
            let amount = amount(
                SYSTEM,
                at_path(record, &self.amount_field),
                &format!("records[{i}].{}", self.amount_field),
            )?;
            let currency = if single {
                self.default_currency.clone()
            } else {
                currency(
                    SYSTEM,
                    at_path(record, &self.currency_field),
                    &self.default_currency,
                    &format!("records[{i}].{}", self.currency_field),
                )?
            };
            orders.push(AuditedOrder {
                external_id: id.to_string(),
                currency,
                amount,
            });
        }
        let done = body.get("done").and_then(Value::as_bool).unwrap_or(true);
        let full = orders.len() >= PAGE_SIZE;
        let next = match orders.last() {
            Some(last) if !done || full => Some(last.external_id.clone()),
            _ => None,
        };
        Ok(OrderPage { orders, next })
    }
}

/// A Salesforce Id: 15 or 18 letters and digits.
fn is_salesforce_id(id: &str) -> bool {
    (id.len() == 15 || id.len() == 18) && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A value inside a SOQL string literal: backslash and quote escaped (SOQL's reserved characters).
pub fn soql_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out
}

fn from_source(error: SourceError) -> QueryError {
    match error {
        SourceError::Http { status, body, .. } => {
            QueryError::from_status(SYSTEM, status, None, &body)
        }
        SourceError::Transport { reason, .. } => QueryError::Unavailable {
            system: SYSTEM,
            message: reason,
        },
        SourceError::Protocol { what, reason, .. } => {
            QueryError::malformed(SYSTEM, format!("{what}: {reason}"))
        }
        SourceError::Intake(e) => QueryError::Unavailable {
            system: SYSTEM,
            message: e.to_string(),
        },
        e @ (SourceError::Auth { .. }
        | SourceError::Credentials(_)
        | SourceError::Config { .. }) => QueryError::Refused {
            system: SYSTEM,
            message: e.to_string(),
        },
    }
}

#[async_trait]
impl OrderQuery for SalesforceQuery {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn page(
        &self,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, QueryError> {
        if let Some(cursor) = cursor
            && !is_salesforce_id(cursor)
        {
            return Err(QueryError::malformed(
                SYSTEM,
                format!(
                    "cursor: {:?} is not a Salesforce Id",
                    crate::connectors::truncate(cursor, 40)
                ),
            ));
        }
        let mut renewed = false;
        let mut asked_without_currency = false;
        loop {
            self.pace.wait().await;
            let (token, instance) = self.session.session().await.map_err(from_source)?;
            let url = format!("{instance}/services/data/{}/query", self.api_version);
            let soql = self.soql(window, cursor);
            let response = self
                .http
                .get(&url)
                .bearer_auth(&token)
                .query(&[("q", soql.as_str())])
                .send()
                .await
                .map_err(|e| transport(SYSTEM, &e))?;
            let status = response.status().as_u16();
            let wait = retry_after(response.headers());
            let body = response.text().await.map_err(|e| transport(SYSTEM, &e))?;
            match status {
                200 => {
                    let body: Value = serde_json::from_str(&body).map_err(|e| {
                        QueryError::malformed(SYSTEM, format!("the query answer is not JSON: {e}"))
                    })?;
                    return self.read(&body);
                }
                // Sessions end at Salesforce's discretion: one new token, then the refusal stands.
                401 if !renewed => {
                    renewed = true;
                    self.session.forget_token(&token).await;
                }
                400 if !self.currency_configured
                    && !asked_without_currency
                    && lacks_currency_field(&body) =>
                {
                    asked_without_currency = true;
                    self.single_currency.store(true, Ordering::Relaxed);
                }
                // The org's 24-hour API allowance is spent: a limit, not a refusal.
                403 if body.contains("REQUEST_LIMIT_EXCEEDED") => {
                    return Err(QueryError::RateLimited {
                        system: SYSTEM,
                        retry_after: wait,
                        message: format!(
                            "HTTP 403 REQUEST_LIMIT_EXCEEDED: {}",
                            crate::connectors::truncate(&body, 300)
                        ),
                    });
                }
                _ => return Err(QueryError::from_status(SYSTEM, status, wait, &body)),
            }
        }
    }
}

/// Whether a 400 answer says the org has no `CurrencyIsoCode` column (multi-currency off): an `INVALID_FIELD`
/// error whose message names that column, as Salesforce words it ("No such column 'CurrencyIsoCode' on
/// entity 'Opportunity'"). Any other invalid field (a misspelt configured one, a field-level security
/// refusal of `Amount`) is the user's to fix and must not be papered over by dropping the currency.
fn lacks_currency_field(body: &str) -> bool {
    let Ok(Value::Array(errors)) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    let column = format!("No such column '{DEFAULT_CURRENCY_FIELD}'");
    errors.iter().any(|e| {
        e["errorCode"] == "INVALID_FIELD"
            && e["message"].as_str().is_some_and(|m| m.contains(&column))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soql_literals_are_escaped() {
        assert_eq!(soql_escape(r"a'b\c"), r"a\'b\\c");
    }

    /// Salesforce echoes the query in the message, so "INVALID_FIELD" and "CurrencyIsoCode" both appear in
    /// an answer about another field; only the missing currency column is the single-currency signal.
    #[test]
    fn only_a_missing_currency_column_means_a_single_currency_org() {
        let answer = |column: &str| {
            serde_json::json!([{
                "message": format!("\nSELECT Id, Amount, CurrencyIsoCode FROM Opportunity WHERE IsWon = true\n                  ^\nERROR at Row:1:Column:12\nNo such column '{column}' on entity 'Opportunity'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name."),
                "errorCode": "INVALID_FIELD"
            }])
            .to_string()
        };
        assert!(lacks_currency_field(&answer("CurrencyIsoCode")));
        assert!(!lacks_currency_field(&answer("Amount")));
        assert!(!lacks_currency_field(
            &serde_json::json!([{"message": "No such column 'CurrencyIsoCode'", "errorCode": "MALFORMED_QUERY"}]).to_string()
        ));
        assert!(!lacks_currency_field(
            "No such column 'CurrencyIsoCode' INVALID_FIELD"
        ));
    }
}
