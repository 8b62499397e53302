//! The intake: where sources hand over records. It stores them in the ledger (one transaction per batch) and
//! only then returns, so a source acknowledges the CRM or advances its checkpoint only for stored records.

use std::sync::Arc;

use async_trait::async_trait;

use super::pipeline::Pipeline;
use crate::connectors::{Intake, IntakeError, IntakeReceipt, SourceRecord};
use crate::ledger::{IncomingRecord, IngestOutcome};

/// The ledger-backed intake of one worker.
pub struct LedgerIntake {
    pub pipeline: Arc<Pipeline>,
}

impl LedgerIntake {
    fn prepare(&self, records: Vec<SourceRecord>) -> Vec<IncomingRecord> {
        let version = self.pipeline.contract.version().to_string();
        records
            .into_iter()
            .map(|r| {
                // Snapshots leave the hot path, so they go through the one redaction function.
                let snapshot = serde_json::to_vec(&r.payload)
                    .ok()
                    .map(|bytes| self.pipeline.contract.snapshot(&bytes));
                IncomingRecord {
                    idempotency_key: r.key.clone(),
                    source_key: r.key,
                    external_id: None,
                    payload: r.payload,
                    snapshot,
                    contract_version: version.clone(),
                    correlation_id: r.correlation_id,
                }
            })
            .collect()
    }

    fn receipt(&self, outcomes: &[IngestOutcome]) -> IntakeReceipt {
        let mut receipt = IntakeReceipt::default();
        for outcome in outcomes {
            match outcome {
                IngestOutcome::Duplicate { .. } => receipt.duplicates += 1,
                IngestOutcome::Updated { .. } => receipt.updates += 1,
                _ => receipt.stored += 1,
            }
        }
        let m = &self.pipeline.metrics;
        m.received.inc_by((receipt.stored + receipt.updates) as u64);
        m.duplicates.inc_by(receipt.duplicates as u64);
        self.pipeline.wake.notify_one();
        receipt
    }
}

#[async_trait]
impl Intake for LedgerIntake {
    async fn accept(&self, records: Vec<SourceRecord>) -> Result<IntakeReceipt, IntakeError> {
        let batch = self.prepare(records);
        let outcomes = self
            .pipeline
            .ledger
            .ingest(batch)
            .await
            .map_err(|e| IntakeError(e.to_string()))?;
        Ok(self.receipt(&outcomes))
    }

    async fn accept_with_checkpoint(
        &self,
        records: Vec<SourceRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<IntakeReceipt, IntakeError> {
        let batch = self.prepare(records);
        let outcomes = self
            .pipeline
            .ledger
            .ingest_with_checkpoint(batch, source, checkpoint)
            .await
            .map_err(|e| IntakeError(e.to_string()))?;
        Ok(self.receipt(&outcomes))
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, IntakeError> {
        self.pipeline
            .ledger
            .checkpoint(source)
            .await
            .map_err(|e| IntakeError(e.to_string()))
    }
}
