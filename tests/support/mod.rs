//! Test support shared by the integration tests: a real throwaway PostgreSQL server (`postgres`) and the
//! ledger's behavioural suite that runs against every backend (`ledger_suite`). Each test binary uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod ledger_audit;
pub mod ledger_suite;
pub mod ledger_tickets;
pub mod postgres;
