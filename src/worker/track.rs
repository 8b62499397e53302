//! This worker's track in a canary rollout and the record buckets it claims right now.
//!
//! It owns the worker's side of [`crate::rollout::split`]: reading the split file the controller mounts,
//! turning it into the buckets this worker's track and revision take, and keeping them current while the
//! worker runs (the pipeline's claims and the intake's leases read [`TrackBuckets::current`] each time). It
//! decides nothing about the split itself: the controller writes it.
//!
//! A bucket set that shrinks never aborts work: records already claimed or leased under the previous set are
//! delivered and completed normally, their lease and fence keep them ours; only new claims follow the split.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::api::AppliedSplit;
use super::metrics::Metrics;
use crate::ledger::BucketSet;
use crate::rollout::split::{self, Split, Track};

/// How often the split file is read again. The kubelet refreshes a ConfigMap mount within about a minute of
/// the controller's write, so a second here is not what a step waits for.
pub const SPLIT_POLL: Duration = Duration::from_secs(1);

/// The buckets one worker claims: fixed (`--buckets`), or following a rollout split file.
pub struct TrackBuckets {
    track: Track,
    revision: String,
    /// The split file followed; `None` when the buckets are fixed.
    file: Option<PathBuf>,
    applied: RwLock<Applied>,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Debug)]
struct Applied {
    /// The split in force; `None` with fixed buckets, or while no valid split was ever read.
    split: Option<Split>,
    buckets: BucketSet,
    /// Why the file's current content is not applied, if it is not.
    error: Option<String>,
}

impl TrackBuckets {
    /// Fixed buckets, no rollout split (a local run, or `--buckets` by hand).
    pub fn fixed(
        track: Track,
        revision: String,
        buckets: BucketSet,
        metrics: Arc<Metrics>,
    ) -> TrackBuckets {
        let tracked = TrackBuckets {
            track,
            revision,
            file: None,
            applied: RwLock::new(Applied {
                split: None,
                buckets,
                error: None,
            }),
            metrics,
        };
        tracked.publish();
        tracked
    }

    /// Follows the split in `file`, read once now.
    ///
    /// A file that does not exist means no canary is under way: the stable track claims every bucket and a
    /// canary none (the controller creates the file with the canary, so a missing one is a flow that never
    /// had a rollout). A file that exists but cannot be read or parsed at start leaves this worker claiming
    /// nothing until it can: claiming every bucket could deliver the other track's records on the wrong
    /// revision, and waiting records are only late. The reason is on `/status` and in the log.
    pub fn following(
        track: Track,
        revision: String,
        file: PathBuf,
        metrics: Arc<Metrics>,
    ) -> TrackBuckets {
        let tracked = TrackBuckets {
            track,
            revision,
            file: Some(file),
            applied: RwLock::new(Applied {
                split: None,
                buckets: BucketSet::empty(),
                error: None,
            }),
            metrics,
        };
        tracked.reload();
        tracked
    }

    pub fn track(&self) -> Track {
        self.track
    }

    /// The revision this worker runs (see [`super::RenderedFlow::revision_name`]).
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The buckets to claim and lease right now.
    pub fn current(&self) -> BucketSet {
        self.read().buckets
    }

    /// The split this worker applies, for `/status`; `None` with fixed buckets.
    pub fn applied(&self) -> Option<AppliedSplit> {
        self.file.as_ref()?;
        let applied = self.read();
        let split = applied.split.clone().unwrap_or_default();
        Some(AppliedSplit {
            track: self.track,
            canary_revision: split.canary_revision,
            weight: split.weight,
            buckets: split::describe(&applied.buckets),
            error: applied.error,
        })
    }

    fn read(&self) -> Applied {
        self.applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the split file again and applies it. Returns whether the claimed buckets changed. An unreadable
    /// or invalid file keeps the split in force and records why; nothing here panics or stops the worker.
    pub fn reload(&self) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        let name = file.display().to_string();
        // The kubelet swaps the whole mount by an atomic symlink rename: reading the file in one call sees
        // either the old or the new content, never a mix.
        let read = match std::fs::read_to_string(file) {
            Ok(text) => Split::parse(&name, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Split::none()),
            Err(e) => Err(format!("{name}: cannot read the rollout split: {e}")),
        };
        let mut applied = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let before = applied.buckets;
        match read {
            Ok(split) => {
                let buckets = split.buckets(self.track, &self.revision);
                if applied.split.as_ref() != Some(&split) || applied.error.is_some() {
                    tracing::info!(
                        track = self.track.as_str(),
                        revision = %self.revision,
                        canary_revision = split.canary_revision.as_deref().unwrap_or("-"),
                        weight = split.weight,
                        buckets = %split::describe(&buckets),
                        "applying the rollout split"
                    );
                }
                *applied = Applied {
                    split: Some(split),
                    buckets,
                    error: None,
                };
            }
            Err(reason) => {
                // Logged once per distinct reason, not once per poll.
                if applied.error.as_deref() != Some(reason.as_str()) {
                    tracing::error!(
                        track = self.track.as_str(),
                        revision = %self.revision,
                        error = %reason,
                        kept = %split::describe(&applied.buckets),
                        "the rollout split cannot be applied; keeping the buckets in force"
                    );
                }
                applied.error = Some(reason);
            }
        }
        let changed = applied.buckets != before;
        drop(applied);
        self.publish();
        changed
    }

    fn publish(&self) {
        let applied = self.read();
        let weight = applied.split.as_ref().map_or(0, |s| s.weight);
        self.metrics.rollout_weight.set(i64::from(weight));
        self.metrics
            .claimed_buckets
            .set(applied.buckets.iter().count() as i64);
    }
}

/// Re-reads the split file every [`SPLIT_POLL`] until shutdown, waking the pipeline when its buckets change
/// so newly owned records are claimed without waiting for the idle poll.
pub async fn follow(
    tracked: Arc<TrackBuckets>,
    wake: impl Fn() + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SPLIT_POLL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let again = tracked.clone();
        // A mounted file is local, but a stalled volume must not stall the runtime's thread.
        match tokio::task::spawn_blocking(move || again.reload()).await {
            Ok(true) => wake(),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "reading the rollout split failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new("ns", "flow"))
    }

    #[test]
    fn a_missing_split_file_means_no_canary() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(split::SPLIT_FILE);
        let stable =
            TrackBuckets::following(Track::Stable, "rev-a".into(), file.clone(), metrics());
        let canary = TrackBuckets::following(Track::Canary, "rev-b".into(), file, metrics());
        assert_eq!(stable.current(), BucketSet::all());
        assert!(canary.current().is_empty());
        let status = canary.applied().unwrap();
        assert_eq!(
            (status.weight, status.buckets.as_str(), status.error),
            (0, "none", None)
        );
    }

    #[test]
    fn the_split_is_followed_and_a_broken_file_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(split::SPLIT_FILE);
        std::fs::write(&file, r#"{"canaryRevision":"rev-b","weight":25}"#).unwrap();
        let metrics = metrics();
        let canary =
            TrackBuckets::following(Track::Canary, "rev-b".into(), file.clone(), metrics.clone());
        assert_eq!(canary.current(), BucketSet::range(0..25));
        assert_eq!(metrics.rollout_weight.get(), 25);
        assert_eq!(metrics.claimed_buckets.get(), 25);

        std::fs::write(&file, r#"{"canaryRevision":"rev-b","weight":50}"#).unwrap();
        assert!(canary.reload(), "the buckets grew");
        assert_eq!(canary.applied().unwrap().buckets, "0-49");

        std::fs::write(&file, r#"{"canaryRevision":"rev-b","weight":150}"#).unwrap();
        assert!(!canary.reload(), "an invalid split changes nothing");
        let status = canary.applied().unwrap();
        assert_eq!((status.weight, status.buckets.as_str()), (50, "0-49"));
        let error = status.error.unwrap();
        assert!(
            error.contains("split.json") && error.contains("weight"),
            "{error}"
        );

        // The controller moved on to another candidate: this canary pod claims nothing.
        std::fs::write(&file, r#"{"canaryRevision":"rev-c","weight":50}"#).unwrap();
        assert!(canary.reload());
        assert!(canary.current().is_empty());
        assert_eq!(canary.applied().unwrap().error, None);
        assert_eq!(metrics.claimed_buckets.get(), 0);
    }

    #[test]
    fn an_invalid_file_at_start_claims_nothing_until_it_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(split::SPLIT_FILE);
        std::fs::write(&file, "weight: 5").unwrap();
        let stable =
            TrackBuckets::following(Track::Stable, "rev-a".into(), file.clone(), metrics());
        assert!(stable.current().is_empty());
        assert!(stable.applied().unwrap().error.is_some());
        std::fs::write(&file, r#"{"canaryRevision":"rev-b","weight":10}"#).unwrap();
        assert!(stable.reload());
        assert_eq!(stable.current(), BucketSet::range(10..100));
    }

    #[test]
    fn fixed_buckets_report_no_split() {
        let fixed = TrackBuckets::fixed(
            Track::Stable,
            "v1".into(),
            BucketSet::range(0..50),
            metrics(),
        );
        assert_eq!(fixed.current(), BucketSet::range(0..50));
        assert!(fixed.applied().is_none());
        assert!(!fixed.reload());
    }
}
