//! Contract rollout: what a contract change must pass before it reaches workers. Today that is the preflight
//! replay ([`replay`]): the flow's recent records run through the active and the candidate contract, and a
//! report says what the candidate would change. The gates (static compatibility, owner sign-off) and the
//! canary are added here later.
//!
//! Everything in this module is pure: it takes compiled contracts and records and returns values. Reading
//! the ledger, the worker's operations API and writing the Job's termination message belong to the CLI
//! (`meshline replay`).

pub mod replay;
