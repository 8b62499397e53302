//! Contract rollout: what a contract change must pass before it reaches the workers. The gates ([`gates`]:
//! static compatibility against the active revision, owner sign-offs) and the preflight replay ([`replay`]:
//! the flow's recent records run through the active and the candidate contract, and a report says what the
//! candidate would change). The canary (issue #15) builds on both.
//!
//! Everything in this module is pure: it takes specs, compiled contracts, flows and records and returns values.
//! Reading the ledger or the worker's operations API and writing the Job's termination message belong to the
//! CLI (`meshline replay`); creating Jobs and revisions to the controller.

pub mod canary;
pub mod gates;
pub mod replay;
pub mod split;

/// Cuts (for status messages and Events, which the API bounds) `s` to at most `max` bytes at a character boundary.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
