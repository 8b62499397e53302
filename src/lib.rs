//! Meshline: CRM→ERP syncs declared as contracts, flows and rosters, and enforced by a Kubernetes operator.
//!
//! The crate is organised by concept: `api` (the CRD types), `crd` (their generation), `contract` (the pure
//! contract engine), `rollout` (what a contract change must pass: the gates and the preflight replay),
//! `validate` (offline checks of manifests), `cli` (the `meshline` subcommands).

pub mod api;
pub mod audit;
pub mod cli;
pub mod connectors;
pub mod contract;
pub mod controller;
pub mod crd;
pub mod dev;
pub mod ledger;
pub mod metrics;
pub mod ops_page;
pub mod rollout;
pub mod sim;
pub mod tickets;
pub mod validate;
pub mod worker;
