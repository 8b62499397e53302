//! Read-only queries of both sides of a flow, for the reconciliation audit: the deals closed in the CRM and
//! the orders in the ERP over a window, page by page.
//!
//! Owns the wire formats of those reads (Salesforce SOQL, HubSpot's CRM search, NetSuite SuiteQL, Odoo
//! `search_read`, the PostgreSQL sink's table) and nothing else: the audit (`crate::audit`) decides what to
//! read, keeps the cursors durable between pages and compares. A query never writes to either system.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

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
