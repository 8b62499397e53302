//! The ledger's retention, run beside the pipeline: purges dead letters past the flow's
//! `deadLetterRetention` and reduces delivered records past `ledger.deliveredRetention` to their compact
//! rows, so the ledger's size follows the flow's rate, not its age. It only ever deletes what the flow's
//! settings say may go; it never touches a record that is waiting, in flight or held.
//!
//! Batches are small (a short transaction each, on SQLite on the one writer thread intake also uses) and
//! the task yields between them, so a purge of a large backlog never holds up intake.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::metrics::Metrics;
use crate::api::SyncFlowSpec;
use crate::ledger::{Ledger, Retention};

/// Records per purge transaction.
pub const PURGE_BATCH: usize = 500;

/// Time between purge rounds.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The pause between two batches of one round: room for intake's transactions in between.
const BETWEEN_BATCHES: Duration = Duration::from_millis(20);

/// A week: what a delivered record's payload and lineage are kept for unless the flow says otherwise.
pub const DEFAULT_DELIVERED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The retention the flow's spec asks for.
pub fn retention_of(spec: &SyncFlowSpec) -> Retention {
    Retention {
        dead_letters: spec.delivery.dead_letter_retention.map(Duration::from),
        delivered: Some(
            spec.ledger
                .delivered_retention
                .map(Duration::from)
                .unwrap_or(DEFAULT_DELIVERED_RETENTION),
        ),
    }
}

/// One round: purge batches until one comes back empty (or shutdown starts). Returns what was purged.
pub async fn purge_round(
    ledger: &dyn Ledger,
    retention: &Retention,
    metrics: &Metrics,
    shutdown: &watch::Receiver<bool>,
) -> crate::ledger::Result<(u64, u64)> {
    let (mut dead_letters, mut payloads) = (0, 0);
    loop {
        let report = ledger.purge(retention, PURGE_BATCH).await?;
        dead_letters += report.dead_letters;
        payloads += report.payloads;
        metrics.dead_letters_purged.inc_by(report.dead_letters);
        metrics.payloads_purged.inc_by(report.payloads);
        if report.is_empty() || *shutdown.borrow() {
            return Ok((dead_letters, payloads));
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}

/// Runs a purge round every [`PURGE_EVERY`] until shutdown. A failed round is logged and tried again at the
/// next one: retention is housekeeping, never a reason to stop delivering.
pub async fn run(
    ledger: Arc<dyn Ledger>,
    retention: Retention,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match purge_round(ledger.as_ref(), &retention, &metrics, &shutdown).await {
            Ok((0, 0)) => {}
            Ok((dead_letters, payloads)) => tracing::info!(
                flow = ledger.flow(),
                dead_letters,
                payloads,
                "ledger retention: purged dead letters and delivered payloads past their retention"
            ),
            Err(e) => {
                tracing::warn!(flow = ledger.flow(), error = %e, "ledger retention round failed; trying again later")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PURGE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_payloads_are_kept_a_week_and_dead_letters_as_the_flow_says() {
        let flow: crate::api::SyncFlow =
            serde_yaml::from_str(include_str!("../../examples/hubspot-odoo/flow.yaml"))
                .expect("the example flow");
        let mut spec = flow.spec;
        assert_eq!(
            retention_of(&spec),
            Retention {
                dead_letters: Some(Duration::from_secs(336 * 3600)),
                delivered: Some(Duration::from_secs(168 * 3600))
            },
            "the example's settings"
        );
        spec.delivery.dead_letter_retention = None;
        spec.ledger.delivered_retention = None;
        assert_eq!(
            retention_of(&spec),
            Retention {
                dead_letters: None,
                delivered: Some(DEFAULT_DELIVERED_RETENTION)
            }
        );
        spec.delivery.dead_letter_retention = Some("720h".parse().unwrap());
        spec.ledger.delivered_retention = Some("24h".parse().unwrap());
        assert_eq!(
            retention_of(&spec),
            Retention {
                dead_letters: Some(Duration::from_secs(720 * 3600)),
                delivered: Some(Duration::from_secs(24 * 3600))
            }
        );
    }
}
