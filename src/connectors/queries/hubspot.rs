//! The audit's read of a HubSpot portal: closed-won deals by close date, through the CRM search API
//! (`POST {baseUrl}/crm/v3/objects/<object>/search`, `baseUrl` default `https://api.hubapi.com`, object from
//! `spec.source.object`, normally `deals`).
//!
//! One filter group: `hs_is_closed_won EQ true`, `closedate BETWEEN <from> AND <to>` (epoch milliseconds, both
//! ends included) and, after the first page, `hs_object_id GT <cursor>`; sorted by `hs_object_id` ascending,
//! 200 per page, properties `amount` and `deal_currency_code` (or `spec.audit.crmAmountField` /
//! `crmCurrencyField`). The search API stops at 10,000 results per query whatever its `after` says, so paging
//! is by keyset: the cursor is the last `hs_object_id`. HubSpot answers properties as strings; an empty
//! currency (a single-currency portal) is `spec.audit.defaultCurrency`.
//!
//! Secret key: `accessToken` (a private app's token with `crm.objects.deals.read`), the same key the
//! `hubspot-v3` webhook source reads deals back with. Search is limited to 5 requests per second per account;
//! a 429 (with `policyName` in the body, `Retry-After` when sent) is [`QueryError::RateLimited`].

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{
    AuditWindow, AuditedOrder, OrderPage, OrderQuery, Pace, QueryConfigError, QueryError, Settings,
    amount, currency, retry_after, transport,
};
use crate::api::SourceSpec;
use crate::connectors::Credentials;

const SYSTEM: &str = "hubspot";
/// Results per search request: the API's largest page.
pub const PAGE_SIZE: usize = 200;
const DEFAULT_AMOUNT: &str = "amount";
const DEFAULT_CURRENCY: &str = "deal_currency_code";

/// Closed-won deals of one portal, page by page.
pub struct HubspotQuery {
    http: reqwest::Client,
    url: String,
    token: String,
    amount_property: String,
    currency_property: String,
    default_currency: String,
    pace: Pace,
}

impl std::fmt::Debug for HubspotQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubspotQuery")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HubspotQuery {
    /// From the flow's `source`, its `audit` settings and the source's Secret (`accessToken`).
    pub fn from_spec(
        source: &SourceSpec,
        settings: &Settings,
        credentials: &Credentials,
    ) -> Result<HubspotQuery, QueryConfigError> {
        let token = credentials.get("accessToken").map_err(|e| {
            QueryConfigError::new("spec.source.credentialsSecretRef", e.to_string())
        })?;
        let object = source.object.trim();
        if object.is_empty()
            || !object
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(QueryConfigError::new(
                "spec.source.object",
                format!("{object:?} is not a HubSpot object type (e.g. deals)"),
            ));
        }
        let base = source
            .base_url
            .clone()
            .unwrap_or_else(|| "https://api.hubapi.com".into());
        Ok(HubspotQuery {
            http: crate::connectors::sinks::http_client(),
            url: format!(
                "{}/crm/v3/objects/{object}/search",
                base.trim_end_matches('/')
            ),
            token,
            amount_property: settings
                .audit
                .crm_amount_field
                .clone()
                .unwrap_or_else(|| DEFAULT_AMOUNT.into()),
            currency_property: settings
                .audit
                .crm_currency_field
                .clone()
                .unwrap_or_else(|| DEFAULT_CURRENCY.into()),
            default_currency: settings.default_currency.clone(),
            pace: settings.pace(),
        })
    }

    /// The search request of the page after `after` (an object id, already checked).
    pub fn body(&self, window: &AuditWindow, after: Option<&str>) -> Value {
        let mut filters = vec![
            json!({"propertyName": "hs_is_closed_won", "operator": "EQ", "value": "true"}),
            json!({
                "propertyName": "closedate",
                "operator": "BETWEEN",
                "value": window.from.timestamp_millis().to_string(),
                "highValue": window.to.timestamp_millis().to_string(),
            }),
        ];
        if let Some(after) = after {
            filters.push(json!({"propertyName": "hs_object_id", "operator": "GT", "value": after}));
        }
        json!({
            "filterGroups": [{"filters": filters}],
            "properties": [self.amount_property, self.currency_property, "hs_object_id"],
            "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
            "limit": PAGE_SIZE,
        })
    }

    fn read(&self, body: &Value) -> Result<OrderPage, QueryError> {
        let results = body
            .get("results")
            .and_then(Value::as_array)
            .ok_or_else(|| QueryError::malformed(SYSTEM, "results: missing or not an array"))?;
        let mut orders = Vec::with_capacity(results.len());
        for (i, deal) in results.iter().enumerate() {
            let id = match deal.get("id") {
                Some(Value::String(s)) if is_object_id(s) => s.clone(),
                Some(Value::Number(n)) if n.is_u64() => n.to_string(),
                _ => {
                    return Err(QueryError::malformed(
                        SYSTEM,
                        format!("results[{i}].id: not a HubSpot object id"),
                    ));
                }
            };
            let properties = deal.get("properties").ok_or_else(|| {
                QueryError::malformed(SYSTEM, format!("results[{i}].properties: missing"))
            })?;
            let amount = amount(
                SYSTEM,
                properties.get(&self.amount_property),
                &format!("results[{i}].properties.{}", self.amount_property),
            )?;
            let currency = currency(
                SYSTEM,
                properties.get(&self.currency_property),
                &self.default_currency,
                &format!("results[{i}].properties.{}", self.currency_property),
            )?;
            orders.push(AuditedOrder {
                external_id: id,
                currency,
                amount,
            });
        }
        let more = body.pointer("/paging/next").is_some() || orders.len() >= PAGE_SIZE;
        let next = match orders.last() {
            Some(last) if more => Some(last.external_id.clone()),
            _ => None,
        };
        Ok(OrderPage { orders, next })
    }
}

fn is_object_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.chars().all(|c| c.is_ascii_digit())
}

#[async_trait]
impl OrderQuery for HubspotQuery {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn page(
        &self,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, QueryError> {
        if let Some(cursor) = cursor
            && !is_object_id(cursor)
        {
            return Err(QueryError::malformed(
                SYSTEM,
                format!(
                    "cursor: {:?} is not a HubSpot object id",
                    crate::connectors::truncate(cursor, 40)
                ),
            ));
        }
        self.pace.wait().await;
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&self.body(window, cursor))
            .send()
            .await
            .map_err(|e| transport(SYSTEM, &e))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let body = response.text().await.map_err(|e| transport(SYSTEM, &e))?;
        if status != 200 {
            return Err(QueryError::from_status(SYSTEM, status, wait, &body));
        }
        let body: Value = serde_json::from_str(&body).map_err(|e| {
            QueryError::malformed(SYSTEM, format!("the search answer is not JSON: {e}"))
        })?;
        self.read(&body)
    }
}
