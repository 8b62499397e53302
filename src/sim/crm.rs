//! A Salesforce-style CRM stand-in: it closes Opportunities and posts them as signed webhooks (the generic
//! HMAC-SHA256 scheme the worker verifies), retrying like a CRM does until the worker acknowledges.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::connectors::sources::webhook::meshline_signature;

/// What the scenario wants a deal to look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DealKind {
    /// Prices at the pricebook (within a cent or two).
    Normal,
    /// One line's price drifted 8 % from the pricebook: the contract rejects it.
    PriceDrift,
    /// One line 4 % off: inside the contract's 5 %, outside the ERP's 3 %; the ERP rejects it.
    ErpRejects,
    /// A 25 % discount: held for finance.
    BigDiscount,
}

/// One closed-won Opportunity in the shape Salesforce's REST API gives it.
pub fn opportunity(n: usize, kind: DealKind, pricebook: &[(String, Decimal)]) -> Value {
    let mut rng = rand::rng();
    let id = format!("006Dn{:010}AAA", n);
    let lines = 1 + n % 5;
    let mut items = Vec::new();
    let mut total = Decimal::ZERO;
    for i in 0..lines {
        let (sku, price) = &pricebook[(n + i) % pricebook.len()];
        let qty = 1 + rng.random_range(0..20u32);
        let mut rate = *price;
        if i == 0 {
            match kind {
                DealKind::PriceDrift => rate = (*price * Decimal::new(108, 2)).round_dp(2),
                DealKind::ErpRejects => rate = (*price * Decimal::new(104, 2)).round_dp(2),
                _ => {}
            }
        }
        total += rate * Decimal::from(qty);
        items.push(json!({
            "ProductCode": sku,
            "Product2": {"Name": format!("Product {sku}")},
            "Quantity": qty,
            "UnitPrice": rate.to_string(),
        }));
    }
    let discount = if kind == DealKind::BigDiscount {
        Decimal::from(25)
    } else {
        Decimal::from(rng.random_range(0..15u32))
    };
    let amount = (total * (Decimal::ONE - discount / Decimal::from(100))).round_dp(2);
    json!({
        "Id": id,
        "Name": format!("Deal {n}"),
        "StageName": "Closed Won",
        "CloseDate": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "SystemModstamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "AccountId": format!("001Dn{:010}AAA", n % 97),
        "Account": {"Name": format!("Customer {}", n % 97)},
        "CurrencyIsoCode": "USD",
        "Amount": amount.to_string(),
        "Discount_Percent__c": discount.to_string(),
        "Customer_Email__c": format!("buyer{n}@customer{}.example", n % 97),
        "Customer_Phone__c": format!("+1 555 {:04}", n % 10_000),
        "OpportunityLineItems": items,
    })
}

/// Posts signed webhooks to a worker.
pub struct CrmStandIn {
    pub target: String,
    secret: String,
    http: reqwest::Client,
    /// Every Opportunity closed so far (its Id), for reconciliation.
    pub closed: Mutex<Vec<String>>,
    pub webhook_attempts: std::sync::atomic::AtomicU64,
}

impl CrmStandIn {
    pub fn new(target: impl Into<String>, secret: impl Into<String>) -> CrmStandIn {
        CrmStandIn {
            target: target.into(),
            secret: secret.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            closed: Mutex::new(Vec::new()),
            webhook_attempts: Default::default(),
        }
    }

    /// Sends a batch and retries (as Salesforce outbound messages do) until the worker answers 2xx, or gives up
    /// after `deadline`.
    pub async fn send(&self, batch: &[Value], deadline: Duration) -> Result<(), String> {
        let body = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            self.webhook_attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = chrono::Utc::now().timestamp();
            let result = self
                .http
                .post(&self.target)
                .header("content-type", "application/json")
                .header(
                    "x-meshline-signature",
                    meshline_signature(&self.secret, t, &body),
                )
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => {
                    let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
                    for record in batch {
                        if let Some(id) = record["Id"].as_str()
                            && !closed.iter().any(|c| c == id)
                        {
                            closed.push(id.to_string());
                        }
                    }
                    return Ok(());
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status();
                    return Err(format!(
                        "the worker refused the webhook: HTTP {status}: {}",
                        r.text().await.unwrap_or_default()
                    ));
                }
                _ => {}
            }
            if started.elapsed() > deadline {
                return Err(format!(
                    "no acknowledgement from {} within {deadline:?}",
                    self.target
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}
