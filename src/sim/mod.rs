//! Stand-ins for the external systems, speaking the real wire formats so the real connectors run against
//! them: a CRM that closes deals, posts signed webhooks and answers SOQL for them, and a NetSuite-style ERP
//! that takes upserts and answers SuiteQL for the pricebook and its sales orders. `meshline dev` runs
//! them in-process; `meshline sim crm|erp` runs them on their own.

pub mod crm;
pub mod erp;
pub mod soql;
