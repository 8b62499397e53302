//! The reconciliation audit's wire shapes: when a roster's flows are audited, how a flow's two sides are read
//! where the connectors' conventions don't fit, and what the last audit found (in the flow's status).
//!
//! An audit compares the deals closed in the CRM with the orders in the ERP over a window, count for count
//! and total for total per currency, matched by external id; every difference is explained from the ledger or
//! counted as unexplained. It only reads both systems.

use std::collections::BTreeMap;

use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// When the flows a roster owns are audited. The controller runs the audit as one CronJob per flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSchedule {
    /// A five-field cron schedule, e.g. `0 2 * * *` (the default: nightly at 02:00 in `timeZone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 128), pattern(r"^(\S+\s+){4}\S+$"))]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule`, e.g. `Europe/Berlin`. Default: the cluster's (UTC on most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z][A-Za-z0-9_+/-]*$"))]
    pub time_zone: Option<String>,
    /// How far back the audit looks, by close date (deals) and order date (orders). Default `168h` (7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub window: Option<Duration>,
    /// Keep the audits from running (their CronJobs are suspended, not deleted).
    #[serde(default)]
    pub suspend: bool,
}

/// How the audit reads a flow's two sides where the connectors' defaults don't fit (see the README's audit
/// section for the defaults of each system).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowAuditSpec {
    /// The ERP field holding the CRM record's id (NetSuite `externalId`, Odoo `client_order_ref`, the
    /// PostgreSQL sink's key column by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub erp_external_id_field: Option<String>,
    /// The ERP field holding the order's total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub erp_amount_field: Option<String>,
    /// The ERP field holding the order's currency code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub erp_currency_field: Option<String>,
    /// The ERP field holding the order's date, which the window applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub erp_date_field: Option<String>,
    /// The CRM field holding the deal's amount (Salesforce `Amount`, HubSpot `amount` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub crm_amount_field: Option<String>,
    /// The CRM field holding the deal's currency (Salesforce `CurrencyIsoCode`, HubSpot `deal_currency_code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub crm_currency_field: Option<String>,
    /// The currency of deals and orders that carry none (single-currency orgs). Default `USD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 3), pattern(r"^[A-Z]{3}$"))]
    pub default_currency: Option<String>,
    /// Requests per second the audit may make to each side. Default: the flow's `delivery.rateLimit`
    /// (or 5 without one), so the audit never competes harder with the flow's own traffic than the flow does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_requests_per_second: Option<u32>,
}

/// How an audit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AuditOutcome {
    /// Both sides read in full; every difference explained.
    Reconciled,
    /// Both sides read in full; some differences unexplained (each is in a ticket).
    Unexplained,
    /// A side could not be read in full (rate limit, failure, timeout): the counts cover only what was read,
    /// and nothing is claimed reconciled.
    Partial,
}

/// Count and money totals of one side.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSideSummary {
    /// Deals (CRM) or orders (ERP) in the window.
    pub count: i64,
    /// Totals per ISO currency code, as decimals.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub totals: BTreeMap<String, String>,
}

/// The last reconciliation audit of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowAuditStatus {
    /// The run's id in the flow's ledger.
    pub run: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AuditOutcome>,
    /// Why the result is partial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub partial_reason: Option<String>,
    /// When the run started and finished (RFC 3339).
    #[schemars(length(max = 64))]
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub finished_at: Option<String>,
    /// The window audited (RFC 3339).
    #[schemars(length(max = 64))]
    pub window_from: String,
    #[schemars(length(max = 64))]
    pub window_to: String,
    pub crm: AuditSideSummary,
    pub erp: AuditSideSummary,
    /// Deals with an order of the same amount and currency.
    pub matched: i64,
    /// Explained differences by explanation: `held`, `deadLettered`, `inFlight`, `staleRevision`,
    /// `filtered`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub explained: BTreeMap<String, i64>,
    /// Differences the ledger does not explain: deals without an order, orders without a deal, and orders
    /// whose amount or currency differs from the deal's.
    pub unexplained: i64,
    /// The first unexplained differences' external ids (CRM ids, never customer data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub unexplained_ids: Vec<String>,
    /// The ticket the unexplained differences are in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub ticket: Option<String>,
}
