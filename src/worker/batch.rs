//! Batched delivery: accepted records grouped into one request for sinks that take batches (the PostgreSQL
//! sink's multi-row upsert, Odoo's `create` with a list, an HTTP sink's bulk endpoint), with one outcome per
//! record as if each had been delivered alone.
//!
//! Each record still runs through the contract in its own task; an accepted one is handed to the batcher
//! ([`Pending`]) and its task waits for its own outcome. The batcher closes a batch at the flow's
//! `delivery.batch` limits (default 500 records or 1 MiB, capped by the sink's own) or when the first record
//! has lingered 5 ms, and sends it as one request under the flow's pressure (one slot, one rate token).
//!
//! **Per-record outcomes.** A batch the sink judged item by item gives each record its own result. A batch
//! that failed as a whole:
//! - *permanently* (a constraint one record violates rejects the whole transaction) is bisected: each half
//!   is sent again, recursively, so the poison record ends alone and is dead-lettered with the sink's own
//!   reason while the rest are delivered (about 2·log₂(n) extra requests per poison record);
//! - *transiently* counts once toward the circuit breaker and schedules every record's retry with its own
//!   attempts and backoff, exactly as a failed single delivery would;
//! - *flow-level* (credentials) opens the breaker and gives every record back.
//!
//! **Idempotency and ordering** are the single path's: the ledger hands out one generation of a record at a
//! time and fences completions, and the sink upserts by external id, so a repeated batch leaves the ERP
//! unchanged. Two records with the same external id never share a batch (a multi-row upsert cannot touch one
//! row twice, and their order would be undefined): the later one waits for the next batch.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::pipeline::Pipeline;
use crate::api::{DeliveryPolicy, ErrorClass};
use crate::connectors::{BatchLimits, Delivery, SinkError};
use crate::contract::Payload;
use crate::ledger::{ClaimedRecord, Outcome};

/// How accepted records are grouped: the flow's `delivery.batch` within the sink's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    pub max_records: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

impl Grouping {
    /// The default linger: long enough for a claim's records to leave the contract together, short enough
    /// that a lone record is not noticeably late.
    pub const LINGER: Duration = Duration::from_millis(5);

    /// The grouping for a flow whose sink takes batches of at most `sink`, or `None` when records go one
    /// by one (the sink has no batch API, or the flow set `maxRecords: 1`).
    pub fn for_flow(policy: &DeliveryPolicy, sink: Option<BatchLimits>) -> Option<Grouping> {
        let sink = sink?;
        let batch = policy.batch.clone().unwrap_or_default();
        let max_records = batch
            .max_records
            .map_or(BatchLimits::DEFAULT.max_records, |n| n as usize)
            .min(sink.max_records)
            .max(1);
        let max_bytes = batch
            .max_bytes
            .map_or(BatchLimits::DEFAULT.max_bytes, |n| n as usize)
            .min(sink.max_bytes)
            .max(1);
        let linger = batch
            .linger
            .map(Duration::from)
            .unwrap_or(Self::LINGER)
            .min(Duration::from_secs(1));
        (max_records > 1).then_some(Grouping {
            max_records,
            max_bytes,
            linger,
        })
    }
}

/// An accepted record waiting for its batch, and where its outcome goes.
pub struct Pending {
    pub record: ClaimedRecord,
    pub payload: Payload,
    pub external_id: String,
    /// The record's size as received: what the batch's byte bound counts (the mapped payload is of the same
    /// order, and serializing it a second time just to measure it would cost more than the bound is worth).
    pub bytes: usize,
    pub reply: oneshot::Sender<Outcome>,
}

/// A batch being filled.
struct Filling {
    items: Vec<Pending>,
    bytes: usize,
    keys: HashSet<String>,
}

impl Filling {
    fn new() -> Filling {
        Filling {
            items: Vec::new(),
            bytes: 0,
            keys: HashSet::new(),
        }
    }

    fn full(&self, grouping: &Grouping) -> bool {
        self.items.len() >= grouping.max_records || self.bytes >= grouping.max_bytes
    }

    /// Adds `item`, or hands it back when it belongs in a later batch: its external id is already in this
    /// one, or it would push a non-empty batch over the byte bound.
    fn offer(&mut self, item: Pending, grouping: &Grouping) -> Option<Pending> {
        let over = !self.items.is_empty() && self.bytes + item.bytes > grouping.max_bytes;
        if over || self.keys.contains(&item.external_id) {
            return Some(item);
        }
        self.keys.insert(item.external_id.clone());
        self.bytes += item.bytes;
        self.items.push(item);
        None
    }
}

impl Pipeline {
    /// Hands an accepted record to the batcher and waits for its outcome. If the batcher is gone (the
    /// worker is stopping), the record goes back to the queue untouched.
    pub(super) async fn deliver_batched(
        &self,
        batches: &mpsc::Sender<Pending>,
        record: ClaimedRecord,
        payload: Payload,
        external_id: String,
    ) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let bytes = record.payload.len();
        let pending = Pending {
            record,
            payload,
            external_id,
            bytes,
            reply,
        };
        if batches.send(pending).await.is_err() {
            return Outcome::Released { not_before: None };
        }
        outcome
            .await
            .unwrap_or(Outcome::Released { not_before: None })
    }

    /// Groups accepted records into batches and sends each as one request, until every sender is gone and
    /// every batch has been answered.
    pub(super) async fn batcher(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Pending>,
        grouping: Grouping,
    ) {
        let mut later: VecDeque<Pending> = VecDeque::new();
        let mut sending = tokio::task::JoinSet::new();
        let mut open = true;
        loop {
            while sending.try_join_next().is_some() {}
            let mut batch = Filling::new();
            // Records set aside by the previous batch go first, in their order.
            let mut set_aside = VecDeque::new();
            while let Some(item) = later.pop_front() {
                if batch.full(&grouping) {
                    set_aside.push_back(item);
                    continue;
                }
                if let Some(item) = batch.offer(item, &grouping) {
                    set_aside.push_back(item);
                }
            }
            later = set_aside;
            if batch.items.is_empty() {
                if !open {
                    break;
                }
                match rx.recv().await {
                    Some(item) => {
                        batch.offer(item, &grouping);
                    }
                    None => {
                        open = false;
                        continue;
                    }
                }
            }
            let linger = tokio::time::sleep(grouping.linger);
            tokio::pin!(linger);
            while open && !batch.full(&grouping) {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(item) => {
                            if let Some(item) = batch.offer(item, &grouping) {
                                // A record over the byte bound closes the batch; a repeated external id
                                // only waits for the next one, and this batch may still fill.
                                let over = batch.bytes + item.bytes > grouping.max_bytes;
                                later.push_back(item);
                                if over {
                                    break;
                                }
                            }
                        }
                        None => open = false,
                    },
                    _ = &mut linger => break,
                }
            }
            let me = self.clone();
            sending.spawn(async move { me.send_batch(batch.items).await });
        }
        while sending.join_next().await.is_some() {}
    }

    /// Sends one batch and replies to every record in it.
    async fn send_batch(self: Arc<Self>, items: Vec<Pending>) {
        let outcomes = if self.breaker.is_open() {
            items
                .iter()
                .map(|_| Outcome::Released { not_before: None })
                .collect()
        } else {
            match self.shared_slot().await {
                // One record whose lease could run out during the call sends the whole batch back: they are
                // claimed again with fresh leases (see `Pipeline::lease_covers_delivery`).
                Ok(_) if !items.iter().all(|p| self.lease_covers_delivery(&p.record)) => items
                    .iter()
                    .map(|_| Outcome::Released { not_before: None })
                    .collect(),
                Ok(slot) => {
                    let outcomes = self.deliver_group(&items).await;
                    drop(slot);
                    outcomes
                }
                Err(outcome) => items.iter().map(|_| outcome.clone()).collect(),
            }
        };
        self.metrics.batch_records.observe(items.len() as f64);
        for (item, outcome) in items.into_iter().zip(outcomes) {
            // A record whose task is gone (shutdown gave up on it) is left to its lease.
            let _ = item.reply.send(outcome);
        }
    }

    /// Delivers `items` as one request and, if the sink rejects the request as a whole for good, each half
    /// of it again, down to single records. One outcome per item, in order.
    fn deliver_group<'a>(&'a self, items: &'a [Pending]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let deliveries: Vec<Delivery<'_>> = items
                .iter()
                .map(|p| Delivery {
                    external_id: &p.external_id,
                    payload: p.payload.as_json(),
                    correlation_id: &p.record.correlation_id,
                    attempt: u32::try_from(p.record.attempts.max(1)).unwrap_or(u32::MAX),
                })
                .collect();
            let count = items.len();
            self.metrics.in_flight.inc();
            let started = Instant::now();
            // The ERP call must end well inside the lease, or another replica could take the records over.
            let timeout = self.options.lease / 2;
            let result =
                match tokio::time::timeout(timeout, self.sink.deliver_batch(&deliveries)).await {
                    Ok(Ok(results)) if results.len() != count => Err(SinkError::new(
                        self.sink.system(),
                        ErrorClass::Transient,
                        format!(
                            "the sink answered {} results for a batch of {count} records",
                            results.len()
                        ),
                    )),
                    Ok(result) => result,
                    Err(_) => Err(SinkError::new(
                        self.sink.system(),
                        ErrorClass::Transient,
                        format!("no answer within {timeout:?} for a batch of {count} records"),
                    )),
                };
            drop(deliveries);
            self.metrics.in_flight.dec();
            let took = started.elapsed();
            self.metrics.delivery_seconds.observe(took.as_secs_f64());
            self.observe_delivery(took / u32::try_from(count).unwrap_or(u32::MAX).max(1));
            match result {
                Ok(results) => items
                    .iter()
                    .zip(results)
                    .map(|(item, result)| match result {
                        Ok(_) => {
                            self.breaker.success();
                            self.metrics.delivered.inc();
                            Outcome::Delivered
                        }
                        Err(e) => {
                            let e = self.scrubbed(&item.record, &item.payload, e);
                            self.breaker_sees(&item.record, &e);
                            self.failure_outcome(&item.record, e)
                        }
                    })
                    .collect(),
                Err(e)
                    if count > 1 && matches!(e.class, ErrorClass::Permanent | ErrorClass::Hold) =>
                {
                    self.metrics.batch_splits.inc();
                    tracing::debug!(flow = %self.flow, records = count, error = %e, "the sink refused a whole batch; delivering each half on its own");
                    let (first, second) = items.split_at(count / 2);
                    let mut outcomes = self.deliver_group(first).await;
                    outcomes.extend(self.deliver_group(second).await);
                    outcomes
                }
                Err(e) => {
                    // One request failed: the breaker hears of it once; every record gets the failure's
                    // outcome with its own attempts, backoff and redaction.
                    self.breaker_sees(&items[0].record, &e);
                    items
                        .iter()
                        .map(|item| {
                            let e = self.scrubbed(&item.record, &item.payload, e.clone());
                            self.failure_outcome(&item.record, e)
                        })
                        .collect()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BatchPolicy;

    #[test]
    fn the_flow_batches_within_the_sinks_limits() {
        let sink = BatchLimits {
            max_records: 200,
            max_bytes: 1 << 20,
        };
        let mut policy = DeliveryPolicy::default();
        assert_eq!(
            Grouping::for_flow(&policy, Some(sink)),
            Some(Grouping {
                max_records: 200,
                max_bytes: 1 << 20,
                linger: Grouping::LINGER
            })
        );
        assert_eq!(Grouping::for_flow(&policy, None), None, "no batch API");
        policy.batch = Some(BatchPolicy {
            max_records: Some(50),
            max_bytes: Some(4096),
            linger: Some("20ms".parse().unwrap()),
        });
        assert_eq!(
            Grouping::for_flow(&policy, Some(sink)),
            Some(Grouping {
                max_records: 50,
                max_bytes: 4096,
                linger: Duration::from_millis(20)
            })
        );
        policy.batch = Some(BatchPolicy {
            max_records: Some(1),
            ..BatchPolicy::default()
        });
        assert_eq!(
            Grouping::for_flow(&policy, Some(sink)),
            None,
            "maxRecords 1 turns batching off"
        );
    }
}
