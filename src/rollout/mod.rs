//! What a contract change must pass before it reaches the workers: the gates (compatibility, owner sign-offs)
//! and the preflight replay of recent ledger records through the active and the candidate revision.

pub mod gates;
