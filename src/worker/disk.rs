//! Free space on the embedded ledger's volume. When intake has filled it, completions cannot be written
//! either: the worker keeps delivering but cannot record it, and only more space recovers. So intake is
//! refused (503 with `Retry-After`, and the poller waits) while free space is below a reserve, which keeps
//! room for the completions of everything already accepted.
//!
//! The free space is read through [`FreeSpace`] (`statvfs` in production, a double in tests) and cached: it
//! is read again after [`DiskGuard::REFRESH`] or once intake has written [`DiskGuard::REFRESH_BYTES`] since,
//! so a burst of webhooks costs one system call per few megabytes, not one per request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use super::problems::{DISK_PRESSURE, Problems};

/// Space on a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// What an unprivileged writer may still use (`f_bavail`: root's reserved blocks excluded).
    pub available: u64,
    pub total: u64,
}

/// Reads the free space of the ledger's filesystem.
pub trait FreeSpace: Send + Sync + std::fmt::Debug {
    fn space(&self) -> std::io::Result<Space>;
}

/// `statvfs(3)` on a path of the filesystem.
#[derive(Debug, Clone)]
pub struct Statvfs {
    pub path: PathBuf,
}

impl Statvfs {
    pub fn new(path: &Path) -> Statvfs {
        Statvfs {
            path: path.to_path_buf(),
        }
    }
}

impl FreeSpace for Statvfs {
    fn space(&self) -> std::io::Result<Space> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a NUL-terminated string and `stat` a properly sized, writable struct.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fragment = stat.f_frsize as u64;
        Ok(Space {
            available: (stat.f_bavail as u64).saturating_mul(fragment),
            total: (stat.f_blocks as u64).saturating_mul(fragment),
        })
    }
}

/// How much of the ledger's volume intake must leave free: a share of the volume, at least a floor and at
/// most a ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskReserve {
    pub min_bytes: u64,
    pub percent: u8,
    pub max_bytes: u64,
}

impl Default for DiskReserve {
    /// max(64 MiB, 5 %), at most 1 GiB: on the default 1 GiB volume 64 MiB holds the completions and lineage
    /// of a large backlog and SQLite's WAL checkpoint; the share grows it on larger volumes; the ceiling keeps
    /// a ledger on a large shared disk (`meshline dev`, a node's disk) from refusing records with gigabytes
    /// still free.
    fn default() -> Self {
        DiskReserve {
            min_bytes: 64 * 1024 * 1024,
            percent: 5,
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl DiskReserve {
    pub fn bytes(&self, total: u64) -> u64 {
        let share = (u128::from(total) * u128::from(self.percent.min(100)) / 100) as u64;
        share.min(self.max_bytes).max(self.min_bytes)
    }
}

/// Intake is refused for now; the sender should retry after `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pressure {
    pub message: String,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Cached {
    read_at: Option<Instant>,
    written_since: u64,
    pressure: Option<Pressure>,
}

/// Decides whether intake may write, from the cached free space of the ledger's volume.
pub struct DiskGuard {
    probe: Arc<dyn FreeSpace>,
    reserve: DiskReserve,
    problems: Arc<Problems>,
    metrics: Arc<Metrics>,
    cached: Mutex<Cached>,
}

impl std::fmt::Debug for DiskGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskGuard")
            .field("probe", &self.probe)
            .field("reserve", &self.reserve)
            .finish_non_exhaustive()
    }
}

impl DiskGuard {
    /// Longest a reading is trusted.
    pub const REFRESH: Duration = Duration::from_millis(250);
    /// Intake bytes after which the space is read again, however recent the reading.
    pub const REFRESH_BYTES: u64 = 4 * 1024 * 1024;
    /// What a refused sender is told to wait.
    pub const RETRY_AFTER: Duration = Duration::from_secs(30);

    pub fn new(
        probe: Arc<dyn FreeSpace>,
        reserve: DiskReserve,
        problems: Arc<Problems>,
        metrics: Arc<Metrics>,
    ) -> DiskGuard {
        DiskGuard {
            probe,
            reserve,
            problems,
            metrics,
            cached: Mutex::new(Cached {
                read_at: None,
                written_since: 0,
                pressure: None,
            }),
        }
    }

    /// `Some` while intake must be refused. Reads the free space again when the cached reading is stale.
    pub fn pressure(&self) -> Option<Pressure> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let stale = cached
            .read_at
            .is_none_or(|at| at.elapsed() >= Self::REFRESH)
            || cached.written_since >= Self::REFRESH_BYTES;
        if stale {
            cached.pressure = self.read();
            cached.read_at = Some(Instant::now());
            cached.written_since = 0;
        }
        cached.pressure.clone()
    }

    /// Intake wrote about `bytes` to the ledger.
    pub fn wrote(&self, bytes: u64) {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached.written_since = cached.written_since.saturating_add(bytes);
    }

    fn read(&self) -> Option<Pressure> {
        match self.probe.space() {
            Ok(space) => {
                let reserve = self.reserve.bytes(space.total);
                self.metrics
                    .ledger_free_bytes
                    .set(i64::try_from(space.available).unwrap_or(i64::MAX));
                if space.available < reserve {
                    let message = format!(
                        "the ledger's volume has {} free, below the reserve of {} kept for recording \
                         deliveries; intake is refused (503, Retry-After) until space is freed",
                        mib(space.available),
                        mib(reserve)
                    );
                    if self.problems.get(DISK_PRESSURE).is_none() {
                        tracing::warn!(
                            free = space.available,
                            reserve,
                            "disk pressure: intake refused"
                        );
                    }
                    self.problems.set(DISK_PRESSURE, message.clone());
                    self.metrics.disk_pressure.set(1);
                    Some(Pressure {
                        message,
                        retry_after: Self::RETRY_AFTER,
                    })
                } else {
                    if self.problems.clear(DISK_PRESSURE) {
                        tracing::info!(
                            free = space.available,
                            reserve,
                            "disk pressure over: intake resumes"
                        );
                    }
                    self.metrics.disk_pressure.set(0);
                    None
                }
            }
            Err(e) => {
                // Not knowing is not a reason to refuse records: the ledger's own write errors still stop a
                // write that does not fit, and nothing was acknowledged for it.
                tracing::warn!(error = %e, "cannot read the ledger volume's free space");
                None
            }
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_share_between_floor_and_ceiling() {
        let r = DiskReserve::default();
        assert_eq!(r.bytes(1 << 30), 64 * 1024 * 1024);
        assert_eq!(r.bytes(4 << 30), (4u64 << 30) / 20);
        assert_eq!(r.bytes(250 << 30), 1 << 30);
    }

    #[test]
    fn statvfs_reads_the_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let space = Statvfs::new(dir.path()).space().unwrap();
        assert!(
            space.total > 0 && space.available <= space.total,
            "{space:?}"
        );
        assert!(Statvfs::new(Path::new("/no/such/dir")).space().is_err());
    }
}
