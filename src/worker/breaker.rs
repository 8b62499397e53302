//! The circuit breaker: flow-level failures (expired credentials, an ERP that fails every request) pause
//! deliveries instead of burning through records; a probe closes it again once the ERP answers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive transient failures, with no success in between, after which the whole flow counts as failing.
pub const FAILING_STREAK: u32 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenState {
    pub reason: String,
    pub since: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Default)]
struct Inner {
    open: Option<OpenState>,
    streak: u32,
    next_probe: Option<Instant>,
    probe_backoff: Duration,
}

/// Shared by every delivery task of a worker.
#[derive(Debug, Default)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> Option<OpenState> {
        self.lock().open.clone()
    }

    pub fn is_open(&self) -> bool {
        self.lock().open.is_some()
    }

    /// Opens (or keeps open) the breaker with a reason. Returns true when this call opened it.
    pub fn open(&self, reason: impl Into<String>) -> bool {
        let mut inner = self.lock();
        let opened = inner.open.is_none();
        if opened {
            inner.open = Some(OpenState {
                reason: reason.into(),
                since: chrono::Utc::now(),
            });
            inner.probe_backoff = Duration::from_millis(250);
            inner.next_probe = Some(Instant::now() + inner.probe_backoff);
        }
        opened
    }

    /// A delivery succeeded.
    pub fn success(&self) {
        let mut inner = self.lock();
        inner.streak = 0;
    }

    /// A delivery failed transiently; returns true when the streak opened the breaker.
    pub fn transient_failure(&self, message: &str) -> bool {
        let streak = {
            let mut inner = self.lock();
            inner.streak += 1;
            inner.streak
        };
        streak >= FAILING_STREAK
            && self.open(format!(
                "{streak} deliveries in a row failed; last: {message}"
            ))
    }

    /// Whether a probe is due now (and books the next one with a growing interval, up to 30 s).
    pub fn probe_due(&self) -> bool {
        let mut inner = self.lock();
        if inner.open.is_none() {
            return false;
        }
        let now = Instant::now();
        if inner.next_probe.is_some_and(|t| t > now) {
            return false;
        }
        inner.probe_backoff = (inner.probe_backoff * 2).min(Duration::from_secs(30));
        inner.next_probe = Some(now + inner.probe_backoff);
        true
    }

    /// The probe succeeded: close. Returns how long the breaker was open.
    pub fn close(&self) -> Option<chrono::Duration> {
        let mut inner = self.lock();
        inner.streak = 0;
        inner.next_probe = None;
        inner.open.take().map(|o| chrono::Utc::now() - o.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_of_transient_failures_opens_and_a_probe_closes() {
        let breaker = Breaker::default();
        for _ in 0..FAILING_STREAK - 1 {
            assert!(!breaker.transient_failure("503"));
        }
        assert!(breaker.transient_failure("503"));
        assert!(breaker.is_open());
        assert!(breaker.state().unwrap().reason.contains("in a row"));
        assert!(breaker.close().is_some());
        assert!(!breaker.is_open());
    }

    #[test]
    fn a_success_resets_the_streak() {
        let breaker = Breaker::default();
        for _ in 0..FAILING_STREAK - 1 {
            breaker.transient_failure("503");
        }
        breaker.success();
        assert!(!breaker.transient_failure("503"));
    }
}
