//! The intake: where sources hand over records. It stores them in the ledger and only then returns, so a
//! source acknowledges the CRM or advances its checkpoint only for stored records.
//!
//! **Group commit.** CRMs send one webhook per record, many at once. A transaction per webhook would make
//! the ledger's commit (an fsync on SQLite, a round trip and a WAL flush on PostgreSQL) the ceiling of the
//! whole worker and let intake crowd out delivery. So concurrent `accept` calls queue their records, and
//! whichever call gets a commit permit writes everything queued in one transaction and answers every caller
//! with its own outcomes. Each caller still returns only once its records are durable. The ledger says how
//! many such transactions may run at once ([`crate::ledger::Ledger::ingest_writers`]): one on SQLite, its
//! single writer; several on PostgreSQL, so a group's round trips and commit do not hold back the webhooks
//! that arrive meanwhile (each group still takes everything queued when it starts).
//!
//! **Logs.** Each stored batch (a group commit, a poll page) is one `info` line with its counts; each record
//! in it one `debug` line with its outcome and its `correlation_id`, the one its lineage carries, so a
//! record can be followed through the worker's logs from intake to delivery.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::pipeline::Pipeline;
use crate::connectors::{Backpressure, Intake, IntakeError, IntakeReceipt, SourceRecord};
use crate::ledger::{IncomingRecord, IngestOutcome};

/// Records written per group transaction at most; a larger queue is written in several.
const GROUP_LIMIT: usize = 5_000;

type Reply = oneshot::Sender<Result<Vec<IngestOutcome>, String>>;

/// One caller's records waiting for a group commit.
struct Waiting {
    records: Vec<IncomingRecord>,
    reply: Reply,
}

/// The ledger-backed intake of one worker.
pub struct LedgerIntake {
    pub pipeline: Arc<Pipeline>,
    queue: Arc<Mutex<Vec<Waiting>>>,
    /// One permit per group transaction the ledger lets run at once.
    committing: Arc<tokio::sync::Semaphore>,
}

impl LedgerIntake {
    pub fn new(pipeline: Arc<Pipeline>) -> LedgerIntake {
        let writers = pipeline.ledger.ingest_writers().max(1);
        LedgerIntake {
            pipeline,
            queue: Arc::default(),
            committing: Arc::new(tokio::sync::Semaphore::new(writers)),
        }
    }

    /// Stores `batch` in a group transaction with whatever else is queued (see the module doc).
    async fn ingest_grouped(
        &self,
        batch: Vec<IncomingRecord>,
    ) -> Result<Vec<IngestOutcome>, IntakeError> {
        // A batch the ledger would refuse as a whole is refused alone, so it cannot fail its group.
        if let Some(bad) = batch
            .iter()
            .find(|r| r.source_key.is_empty() || r.idempotency_key.is_empty())
        {
            return Err(IntakeError(format!(
                "a record needs a source key and an idempotency key (got source key {:?}, idempotency key {:?})",
                bad.source_key, bad.idempotency_key
            )));
        }
        let (reply, answer) = oneshot::channel();
        lock(&self.queue).push(Waiting {
            records: batch,
            reply,
        });
        let Ok(guard) = self.committing.clone().acquire_owned().await else {
            // The semaphore is never closed. Were it, the batch is not acknowledged; a writer still running
            // may store it, and the client's retry is then a duplicate.
            return Err(IntakeError(
                "the intake is shutting down; the batch was not acknowledged, retry".into(),
            ));
        };
        // An earlier holder of a permit may have written our records already; then the queue may be empty.
        // Otherwise we write the queue, in a task of its own: if our caller goes away (a webhook client that
        // hangs up), the other callers' records are still written and answered.
        let queue = self.queue.clone();
        let pipeline = self.pipeline.clone();
        let writer = tokio::spawn(async move {
            loop {
                let group = take_group(&queue);
                if group.is_empty() {
                    break;
                }
                commit_group(&pipeline, group).await;
                pipeline.metrics.intake_commits.inc();
            }
            drop(guard);
        });
        drop(writer);
        // The writer answers each group as soon as it is written; a panic in it drops our reply.
        match answer.await {
            Ok(result) => result.map_err(IntakeError),
            Err(_) => Err(IntakeError(
                "the ledger write of this batch was interrupted; nothing was acknowledged, retry"
                    .into(),
            )),
        }
    }

    /// Refuses the batch while the ledger's volume is below its reserve (nothing is stored, so nothing is
    /// acknowledged), and counts what a stored batch adds to the volume otherwise.
    fn admit(&self, records: &[SourceRecord]) -> Result<(), IntakeError> {
        let Some(disk) = &self.pipeline.disk else {
            return Ok(());
        };
        if let Some(pressure) = disk.pressure() {
            return Err(IntakeError(pressure.message));
        }
        let mut counter = ByteCounter(0);
        for record in records {
            let _ = serde_json::to_writer(&mut counter, &record.payload);
        }
        disk.wrote(counter.0);
        Ok(())
    }

    fn prepare(&self, records: Vec<SourceRecord>) -> Vec<IncomingRecord> {
        let version = self.pipeline.contract.version().to_string();
        let ordering = self.pipeline.contract.ordering();
        records
            .into_iter()
            .map(|r| IncomingRecord {
                // A revision without a usable ordering value is stored in arrival order; the contract then
                // refuses it (its ordering field is required and typed), so it is never delivered unordered.
                ordering: ordering.and_then(|o| o.value_of(&r.payload).ok()),
                idempotency_key: r.key.clone(),
                source_key: r.key,
                external_id: None,
                payload: r.payload,
                contract_version: version.clone(),
                correlation_id: r.correlation_id,
            })
            .collect()
    }

    fn receipt(&self, outcomes: &[IngestOutcome]) -> IntakeReceipt {
        let mut receipt = IntakeReceipt::default();
        for outcome in outcomes {
            tracing::debug!(
                flow = %self.pipeline.flow,
                record = %outcome.id(),
                correlation_id = outcome.correlation_id(),
                outcome = outcome.label(),
                "record ingested"
            );
            match outcome {
                IngestOutcome::Duplicate { .. } => receipt.duplicates += 1,
                IngestOutcome::Updated { .. } => receipt.updates += 1,
                IngestOutcome::Stale { .. } => receipt.stale += 1,
                IngestOutcome::Received { .. } => receipt.stored += 1,
            }
        }
        let m = &self.pipeline.metrics;
        m.received.inc_by((receipt.stored + receipt.updates) as u64);
        m.duplicates.inc_by(receipt.duplicates as u64);
        m.stale.inc_by(receipt.stale as u64);
        self.pipeline.wake.notify_one();
        receipt
    }
}

#[async_trait]
impl Intake for LedgerIntake {
    async fn accept(&self, records: Vec<SourceRecord>) -> Result<IntakeReceipt, IntakeError> {
        self.admit(&records)?;
        let batch = self.prepare(records);
        let outcomes = self.ingest_grouped(batch).await?;
        Ok(self.receipt(&outcomes))
    }

    async fn accept_with_checkpoint(
        &self,
        records: Vec<SourceRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<IntakeReceipt, IntakeError> {
        self.admit(&records)?;
        let batch = self.prepare(records);
        let outcomes = self
            .pipeline
            .ledger
            .ingest_with_checkpoint(batch, source, checkpoint)
            .await
            .map_err(|e| IntakeError(e.to_string()))?;
        self.pipeline.metrics.intake_commits.inc();
        log_batch(&self.pipeline.flow, &outcomes, "poll page");
        Ok(self.receipt(&outcomes))
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, IntakeError> {
        self.pipeline
            .ledger
            .checkpoint(source)
            .await
            .map_err(|e| IntakeError(e.to_string()))
    }

    fn backpressure(&self) -> Option<Backpressure> {
        self.pipeline.intake_pressure().map(|p| Backpressure {
            reason: p.message,
            retry_after: p.retry_after,
        })
    }
}

/// Counts the bytes of a serialisation without keeping them.
struct ByteCounter(u64);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whole callers' batches from the front of the queue, up to [`GROUP_LIMIT`] records (at least one batch).
fn take_group(queue: &Mutex<Vec<Waiting>>) -> Vec<Waiting> {
    let mut queue = lock(queue);
    let mut records = 0;
    let mut end = 0;
    for waiting in queue.iter() {
        if end > 0 && records + waiting.records.len() > GROUP_LIMIT {
            break;
        }
        records += waiting.records.len();
        end += 1;
    }
    queue.drain(..end).collect()
}

/// Writes a group in one transaction and answers each caller with the outcomes of its own records, in order.
/// New records the pipeline has room for are leased to it in the same transaction and handed over, so they
/// skip a claim (a second ledger round that would rewrite the rows just written).
async fn commit_group(pipeline: &Pipeline, group: Vec<Waiting>) {
    let mut sizes = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut records = Vec::new();
    for waiting in group {
        sizes.push(waiting.records.len());
        replies.push(waiting.reply);
        records.extend(waiting.records);
    }
    let ledger = &pipeline.ledger;
    // The grant lives until the records it leased are handed over, so a concurrent group's request counts
    // them (see `Pipeline::lease_request`).
    let grant = pipeline.lease_request(records.len());
    let stored = match &grant {
        Some(grant) => ledger.ingest_and_claim(records, &grant.request).await,
        None => ledger.ingest(records).await.map(|o| (o, Vec::new())),
    };
    let stored = match stored {
        Ok((outcomes, leased)) => {
            pipeline.hand_over(leased).await;
            Ok(outcomes)
        }
        Err(e) => Err(e),
    };
    drop(grant);
    match stored {
        Ok(outcomes) if outcomes.len() == sizes.iter().sum::<usize>() => {
            log_batch(&pipeline.flow, &outcomes, "webhook group");
            let mut outcomes = outcomes.into_iter();
            for (size, reply) in sizes.into_iter().zip(replies) {
                // A caller that went away is not answered; its records are stored all the same.
                let _ = reply.send(Ok(outcomes.by_ref().take(size).collect()));
            }
        }
        Ok(outcomes) => {
            let message = format!(
                "the ledger answered {} outcomes for {} records",
                outcomes.len(),
                sizes.iter().sum::<usize>()
            );
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
        Err(e) => {
            // Only the database can fail a validated group (unreachable, full disk): nothing of it was
            // committed, and every caller is told so and retries.
            let message = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

/// The `info` line of one stored batch: how many records of each outcome (the records' own lines are
/// `debug`, see the module doc).
fn log_batch(flow: &str, outcomes: &[IngestOutcome], batch: &str) {
    let count = |label: &str| outcomes.iter().filter(|o| o.label() == label).count();
    tracing::info!(
        flow = %flow,
        batch,
        records = outcomes.len(),
        received = count("received"),
        updated = count("updated"),
        duplicate = count("duplicate"),
        stale = count("stale"),
        "records stored in the ledger"
    );
}
