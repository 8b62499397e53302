//! The ledger's promises, kept by the embedded SQLite backend (the default for one replica).

mod support;

use support::ledger_suite::{Fixture, ledger_suite};

ledger_suite!(Fixture::sqlite);
