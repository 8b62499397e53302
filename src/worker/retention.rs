//! The ledger's retention, run beside the pipeline: purges dead letters past the flow's
//! `deadLetterRetention`, reduces delivered records past `ledger.deliveredRetention` to their compact
//! rows, and deletes tickets resolved longer ago than the longer of the two, so the ledger's size follows
//! the flow's rate, not its age. It only ever deletes what the flow's settings say may go; it never touches
//! a record that is waiting, in flight or held, nor a ticket that is open or that a sink still has to hear
//! about.
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

/// Resolved tickets per purge transaction (a ticket is one row per cause, and few).
pub const TICKET_PURGE_BATCH: usize = 100;

/// Time between purge rounds.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The pause between two batches of one round: room for intake's transactions in between.
const BETWEEN_BATCHES: Duration = Duration::from_millis(20);

/// A week: what a delivered record's payload and lineage are kept for unless the flow says otherwise.
pub const DEFAULT_DELIVERED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The retention the flow's spec asks for. A resolved ticket is kept as long as the longer of the two
/// record retentions: it is the story of records, and should not go before a record it tells of could.
pub fn retention_of(spec: &SyncFlowSpec) -> Retention {
    let dead_letters = spec.delivery.dead_letter_retention.map(Duration::from);
    let delivered = spec
        .ledger
        .delivered_retention
        .map(Duration::from)
        .unwrap_or(DEFAULT_DELIVERED_RETENTION);
    Retention {
        dead_letters,
        delivered: Some(delivered),
        resolved_tickets: Some(dead_letters.map_or(delivered, |d| d.max(delivered))),
    }
}

/// What one round purged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub dead_letters: u64,
    pub payloads: u64,
    pub tickets: u64,
}

/// One round: purge batches until one comes back empty (or shutdown starts), then the resolved tickets past
/// their retention the same way. Returns what was purged.
pub async fn purge_round(
    ledger: &dyn Ledger,
    retention: &Retention,
    metrics: &Metrics,
    shutdown: &watch::Receiver<bool>,
) -> crate::ledger::Result<Purged> {
    let mut purged = Purged::default();
    loop {
        let report = ledger.purge(retention, PURGE_BATCH).await?;
        purged.dead_letters += report.dead_letters;
        purged.payloads += report.payloads;
        metrics.dead_letters_purged.inc_by(report.dead_letters);
        metrics.payloads_purged.inc_by(report.payloads);
        if report.is_empty() || *shutdown.borrow() {
            break;
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
    let Some(older_than) = retention.resolved_tickets else {
        return Ok(purged);
    };
    while !*shutdown.borrow() {
        let gone = ledger.purge_tickets(older_than, TICKET_PURGE_BATCH).await?;
        purged.tickets += gone.len() as u64;
        if gone.len() < TICKET_PURGE_BATCH {
            break;
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
    Ok(purged)
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
            Ok(purged) if purged == Purged::default() => {}
            Ok(purged) => tracing::info!(
                flow = ledger.flow(),
                dead_letters = purged.dead_letters,
                payloads = purged.payloads,
                tickets = purged.tickets,
                "ledger retention: purged dead letters, delivered payloads and resolved tickets past their retention"
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

    #[tokio::test]
    async fn a_round_purges_resolved_tickets_past_their_retention_and_keeps_open_ones() {
        use crate::ledger::{ManualClock, RaisedException, SqliteLedger};
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_at(0);
        let ledger = SqliteLedger::open(&dir.path().join("ledger.db"), "closed-won", clock.clone())
            .await
            .unwrap();
        let cause = |reason: &str| RaisedException {
            kind: crate::tickets::ExceptionKind::FlowDegraded,
            class: Some(crate::api::ErrorClass::FlowLevel),
            reason: reason.into(),
            rule: None,
            summary: "the ERP answers 401".into(),
        };
        let resolved = ledger.raise_exception(cause("breaker_open")).await.unwrap();
        ledger.clear_exception(&resolved).await.unwrap();
        let open = ledger.raise_exception(cause("sla_breached")).await.unwrap();
        clock.advance(Duration::from_secs(8 * 24 * 3600));
        let metrics = Metrics::new("revenue", "closed-won");
        let (_tx, shutdown) = watch::channel(false);
        let mut retention = Retention {
            dead_letters: None,
            delivered: Some(DEFAULT_DELIVERED_RETENTION),
            resolved_tickets: None,
        };
        let kept = purge_round(&ledger, &retention, &metrics, &shutdown)
            .await
            .unwrap();
        assert_eq!(kept.tickets, 0, "no ticket retention, nothing purged");
        retention.resolved_tickets = Some(DEFAULT_DELIVERED_RETENTION);
        let purged = purge_round(&ledger, &retention, &metrics, &shutdown)
            .await
            .unwrap();
        assert_eq!(purged.tickets, 1);
        assert!(ledger.ticket(&resolved).await.unwrap().is_none());
        assert!(ledger.ticket(&open).await.unwrap().is_some());
        ledger.close().await;
    }

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
                delivered: Some(Duration::from_secs(168 * 3600)),
                resolved_tickets: Some(Duration::from_secs(336 * 3600)),
            },
            "the example's settings"
        );
        spec.delivery.dead_letter_retention = None;
        spec.ledger.delivered_retention = None;
        assert_eq!(
            retention_of(&spec),
            Retention {
                dead_letters: None,
                delivered: Some(DEFAULT_DELIVERED_RETENTION),
                resolved_tickets: Some(DEFAULT_DELIVERED_RETENTION),
            }
        );
        spec.delivery.dead_letter_retention = Some("720h".parse().unwrap());
        spec.ledger.delivered_retention = Some("24h".parse().unwrap());
        assert_eq!(
            retention_of(&spec),
            Retention {
                dead_letters: Some(Duration::from_secs(720 * 3600)),
                delivered: Some(Duration::from_secs(24 * 3600)),
                resolved_tickets: Some(Duration::from_secs(720 * 3600)),
            }
        );
    }
}
