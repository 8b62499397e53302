//! Stand-ins for the external systems, speaking the real wire formats so the real connectors run against
//! them: a CRM that closes deals and posts signed webhooks, and a NetSuite-style ERP. `meshline dev` runs
//! them in-process; `meshline sim crm|erp` runs them on their own.

pub mod crm;
pub mod erp;
