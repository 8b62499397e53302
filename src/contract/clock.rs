//! The one clock the contract engine reads: the CPU time of the thread that evaluates a record.
//!
//! The per-record deadline bounds work, never the scheduler. A thread that is not scheduled for a while (a
//! busy node, a noisy neighbour) spends no CPU time meanwhile, so waiting never counts against a record; an
//! expression that burns CPU does. Wall-clock time is never read here.
//!
//! [`CpuClock`] is the handle the engine holds. By default it reads `CLOCK_THREAD_CPUTIME_ID`; tests inject a
//! [`CpuTime`] of their own that advances deterministically.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A source of CPU time for the calling thread. Implement it to inject a deterministic clock.
pub trait CpuTime: Send + Sync {
    /// CPU time the calling thread has consumed so far. Must never go backwards on one thread.
    fn cpu_time(&self) -> Duration;
}

/// The clock a compiled contract measures its per-record deadline with.
#[derive(Clone, Default)]
pub struct CpuClock {
    /// `None` is the calling thread's real CPU clock; kept as the common case without a virtual call.
    custom: Option<Arc<dyn CpuTime>>,
}

impl CpuClock {
    /// The calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`).
    pub const fn thread() -> Self {
        CpuClock { custom: None }
    }

    /// A clock of the caller's making (tests).
    pub fn custom(clock: Arc<dyn CpuTime>) -> Self {
        CpuClock {
            custom: Some(clock),
        }
    }

    /// CPU time the calling thread has consumed so far.
    #[inline]
    pub fn now(&self) -> Duration {
        match &self.custom {
            None => thread_cpu_time(),
            Some(clock) => clock.cpu_time(),
        }
    }
}

/// A point on a [`CpuClock`]: the reading at which an evaluation has spent its budget.
#[derive(Clone, Copy)]
pub(crate) struct CpuDeadline<'c> {
    clock: &'c CpuClock,
    at: Duration,
}

impl CpuDeadline<'_> {
    /// Whether the calling thread has spent the budget.
    #[inline]
    pub(crate) fn passed(&self) -> bool {
        self.clock.now() >= self.at
    }
}

impl CpuClock {
    /// The deadline `budget` of CPU time from now, on the calling thread.
    pub(crate) fn deadline_after(&self, budget: Duration) -> CpuDeadline<'_> {
        CpuDeadline {
            clock: self,
            at: self.now().saturating_add(budget),
        }
    }
}

impl fmt::Debug for CpuClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.custom {
            None => "CpuClock(thread)",
            Some(_) => "CpuClock(custom)",
        })
    }
}

impl PartialEq for CpuClock {
    fn eq(&self, other: &Self) -> bool {
        match (&self.custom, &other.custom) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`. The call cannot fail for this clock id on the platforms the
/// worker runs on; if it ever did, the reading is zero, which makes the deadline never fire rather than
/// reject a valid record (the step budget still bounds the work).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(cpu: Duration) {
        let clock = CpuClock::thread();
        let start = clock.now();
        let mut x = 0u64;
        while clock.now().saturating_sub(start) < cpu {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn the_thread_clock_advances_with_work_and_not_with_waiting() {
        let clock = CpuClock::thread();
        let before = clock.now();
        spin(Duration::from_millis(5));
        let worked = clock.now().saturating_sub(before);
        assert!(worked >= Duration::from_millis(5), "{worked:?}");
        // A parked thread consumes no CPU time, however long it is away.
        let before = clock.now();
        std::thread::park_timeout(Duration::from_millis(50));
        let waited = clock.now().saturating_sub(before);
        assert!(waited < Duration::from_millis(50), "{waited:?}");
    }
}
