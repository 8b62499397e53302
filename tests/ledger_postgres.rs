//! The ledger's promises, kept by the PostgreSQL backend against a real server that the harness starts from
//! the machine's binaries (several replicas of one flow share this backend).

mod support;

use support::ledger_suite::{Fixture, ledger_suite};

ledger_suite!(Fixture::postgres);
