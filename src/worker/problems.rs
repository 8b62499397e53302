//! What keeps a worker from doing all of its work right now (a full volume, credentials it cannot use, a
//! ledger it cannot reach), each with the time it was first seen. `/status` lists them and the controller
//! names each in a condition; a problem is set when it appears and cleared when it goes away.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::api::WorkerProblem;

/// The kinds of problem, as `WorkerProblem::kind` and the condition reason spell them.
pub const DISK_PRESSURE: &str = "DiskPressure";
pub const LEDGER_UNAVAILABLE: &str = "LedgerUnavailable";
pub const CREDENTIALS_INVALID: &str = "CredentialsInvalid";
pub const STARTUP_FAILED: &str = "StartupFailed";
/// The roster's identity Secret holds a token that cannot be used (too short, shared by two owners,
/// unreadable): nobody can approve or reject held records until it is fixed; records keep flowing.
pub const IDENTITIES_INVALID: &str = "IdentitiesInvalid";
/// The CRM's API allowance runs low, so the poll is slowed: records arrive later, nothing is lost.
pub const SOURCE_API_LIMIT: &str = "SourceApiLimit";
/// A roster ticket sink cannot be built (a missing credential, a bad field): its tickets wait in the outbox.
pub const TICKET_SINK_INVALID: &str = "TicketSinkInvalid";

/// The current problems of one worker, one per kind.
#[derive(Debug, Default)]
pub struct Problems {
    current: Mutex<BTreeMap<&'static str, WorkerProblem>>,
}

impl Problems {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, WorkerProblem>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or updates the message of) a problem; `since` stays the time it first appeared.
    pub fn set(&self, kind: &'static str, message: impl Into<String>) {
        let message = message.into();
        let mut current = self.lock();
        match current.get_mut(kind) {
            Some(problem) => problem.message = message,
            None => {
                current.insert(
                    kind,
                    WorkerProblem {
                        kind: kind.to_string(),
                        message,
                        since: chrono::Utc::now()
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    },
                );
            }
        }
    }

    /// The problem went away. Returns whether there was one.
    pub fn clear(&self, kind: &'static str) -> bool {
        self.lock().remove(kind).is_some()
    }

    pub fn get(&self, kind: &'static str) -> Option<WorkerProblem> {
        self.lock().get(kind).cloned()
    }

    /// Every current problem, in a stable order.
    pub fn list(&self) -> Vec<WorkerProblem> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_keeps_its_first_time_until_it_is_cleared() {
        let problems = Problems::default();
        problems.set(DISK_PRESSURE, "1 MiB free");
        let first = problems.get(DISK_PRESSURE).unwrap();
        problems.set(DISK_PRESSURE, "2 MiB free");
        let again = problems.get(DISK_PRESSURE).unwrap();
        assert_eq!(
            (again.since, again.message.as_str()),
            (first.since, "2 MiB free")
        );
        assert!(problems.clear(DISK_PRESSURE));
        assert!(problems.list().is_empty());
    }
}
