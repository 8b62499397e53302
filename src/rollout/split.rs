//! The bucket split between a flow's two tracks during a canary, as the controller publishes it to the workers
//! and as each worker turns it into the buckets it claims.
//!
//! The controller writes the split into the flow's rollout ConfigMap (one small JSON file, [`SPLIT_FILE`]),
//! mounted into the pods of both tracks. Each worker re-reads it while it runs and reports the split it applies
//! in `/status`, so the controller starts a step's analysis only once every pod of both tracks applies the
//! step's weight. The file is deliberately not part of the worker configuration's hash: a weight change moves
//! buckets between running workers and restarts nothing.
//!
//! While the kubelet refreshes the file in one pod before another, the two tracks can briefly disagree: a
//! bucket is then claimable by both (the ledger's leases let only one deliver it) or by neither (its records
//! wait). Neither loses or repeats a record.

use serde::{Deserialize, Serialize};

use crate::ledger::BucketSet;

/// The file name of the split inside the rollout ConfigMap and its mount.
pub const SPLIT_FILE: &str = "split.json";

/// Which of a flow's two Deployments a worker belongs to.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Track {
    /// Runs the contract's active revision; takes the buckets at or above the canary weight.
    #[default]
    Stable,
    /// Runs the candidate revision; takes the buckets below the canary weight.
    Canary,
}

impl Track {
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Stable => "stable",
            Track::Canary => "canary",
        }
    }
}

/// The split the controller asks for: the candidate revision on the canary track and its weight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Split {
    /// The revision the canary track must run to take its buckets; `None` when no canary is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    /// Percentage of the buckets (0 to 100) the canary takes.
    #[serde(default)]
    pub weight: u8,
}

impl Split {
    /// No canary: the stable track takes every bucket.
    pub fn none() -> Split {
        Split::default()
    }

    /// The buckets a worker of `track` running `revision` claims under this split.
    ///
    /// A canary worker takes its share only while the split names its own revision: a canary pod still
    /// running an aborted or superseded candidate claims nothing, whatever its file says.
    pub fn buckets(&self, track: Track, revision: &str) -> BucketSet {
        let weight = self.weight.min(100);
        match (track, self.canary_revision.as_deref()) {
            (Track::Stable, None) => BucketSet::all(),
            (Track::Stable, Some(_)) => BucketSet::range(weight..100),
            (Track::Canary, Some(candidate)) if candidate == revision => {
                BucketSet::range(0..weight)
            }
            (Track::Canary, _) => BucketSet::empty(),
        }
    }

    /// Parses the split file's text; `file` names it in the error.
    pub fn parse(file: &str, text: &str) -> Result<Split, String> {
        let split: Split =
            serde_json::from_str(text).map_err(|e| format!("{file}: not a rollout split: {e}"))?;
        if split.weight > 100 {
            return Err(format!("{file}: weight: {} is above 100", split.weight));
        }
        Ok(split)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// `FROM-TO` ranges of a bucket set, for status and logs (`0-24`, `25-99`, `none`).
pub fn describe(buckets: &BucketSet) -> String {
    let mut ranges: Vec<String> = Vec::new();
    let mut start: Option<u8> = None;
    let mut previous = 0u8;
    for bucket in buckets.iter() {
        match start {
            Some(_) if bucket == previous + 1 => {}
            Some(s) => {
                ranges.push(range_text(s, previous));
                start = Some(bucket);
            }
            None => start = Some(bucket),
        }
        previous = bucket;
    }
    if let Some(s) = start {
        ranges.push(range_text(s, previous));
    }
    if ranges.is_empty() {
        "none".into()
    } else {
        ranges.join(",")
    }
}

fn range_text(from: u8, to: u8) -> String {
    if from == to {
        from.to_string()
    } else {
        format!("{from}-{to}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_split_every_bucket_exactly_once() {
        for weight in 0..=100u8 {
            let split = Split {
                canary_revision: Some("rev-b".into()),
                weight,
            };
            let stable = split.buckets(Track::Stable, "rev-a");
            let canary = split.buckets(Track::Canary, "rev-b");
            for bucket in 0..100u8 {
                assert!(
                    stable.contains(bucket) ^ canary.contains(bucket),
                    "weight {weight}, bucket {bucket}"
                );
            }
            assert_eq!(canary.iter().count(), usize::from(weight));
        }
    }

    #[test]
    fn a_canary_of_another_revision_claims_nothing() {
        let split = Split {
            canary_revision: Some("rev-c".into()),
            weight: 50,
        };
        assert!(split.buckets(Track::Canary, "rev-b").is_empty());
        assert!(Split::none().buckets(Track::Canary, "rev-b").is_empty());
        assert_eq!(
            Split::none().buckets(Track::Stable, "rev-a"),
            BucketSet::all()
        );
    }

    #[test]
    fn parse_names_the_file_and_refuses_weights_above_100() {
        let err =
            Split::parse("/etc/meshline/rollout/split.json", r#"{"weight": 101}"#).unwrap_err();
        assert!(
            err.contains("split.json") && err.contains("weight"),
            "{err}"
        );
        let err = Split::parse("split.json", "weight: 5").unwrap_err();
        assert!(err.contains("split.json"), "{err}");
        let split = Split::parse("split.json", r#"{"canaryRevision":"r","weight":25}"#).unwrap();
        assert_eq!(split.weight, 25);
        assert_eq!(Split::parse("f", &split.to_json()).unwrap(), split);
    }

    #[test]
    fn describe_prints_ranges() {
        assert_eq!(describe(&BucketSet::range(0..25)), "0-24");
        assert_eq!(describe(&BucketSet::range(25..100)), "25-99");
        assert_eq!(describe(&BucketSet::empty()), "none");
        assert_eq!(describe(&BucketSet::from_buckets([1, 2, 5])), "1-2,5");
    }
}
