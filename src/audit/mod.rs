//! The reconciliation audit (issue #17): reads a flow's two sides over a window through the connectors'
//! read-only queries, compares them count for count and total for total per currency, explains every
//! difference from the ledger, and reports the result (the flow's status, `/metrics`, an `audit_mismatch`
//! ticket for what the ledger cannot explain).
//!
//! - [`compare`] (pure): matches deals and orders by external id; totals and differences.
//! - [`explain`] (pure): one difference against the ledger's facts about its record.
//! - [`schedule`] (pure): whether a roster's audit schedule and time zone are ones the API server takes.
//! - [`run`]: the driver, a durable run in the ledger that survives a restart and is leased to one replica.
//!
//! It runs inside the worker, which has the flow's credentials, ledger and ticket outbox; `meshline audit`
//! only asks the worker to run one and waits. It never writes to the CRM or the ERP.

pub mod compare;
pub mod explain;
pub mod key;
pub mod run;
pub mod schedule;
