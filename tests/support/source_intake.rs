//! An in-memory [`Intake`] for source tests: it stores records and checkpoints like the ledger would (records
//! and checkpoint in one step) and can be told to fail a given call, or every call, without storing anything.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use meshline::connectors::{Backpressure, Intake, IntakeError, IntakeReceipt, SourceRecord};

#[derive(Default)]
pub struct MemoryIntake {
    /// Every batch accepted, in order.
    pub batches: Mutex<Vec<Vec<SourceRecord>>>,
    /// The latest payload per key.
    pub stored: Mutex<BTreeMap<String, SourceRecord>>,
    pub checkpoints: Mutex<BTreeMap<String, String>>,
    /// Calls to `accept*` so far, failed ones included.
    pub calls: AtomicUsize,
    /// 0-based numbers of `accept*` calls that fail.
    pub fail_calls: Mutex<HashSet<usize>>,
    pub fail_all: AtomicBool,
    /// While set, the intake asks sources to hold off (as a nearly full ledger volume does).
    pub paused: Mutex<Option<Backpressure>>,
    /// How often a source asked whether it may send.
    pub backpressure_checks: AtomicUsize,
}

impl MemoryIntake {
    pub fn keys(&self) -> Vec<String> {
        self.stored.lock().unwrap().keys().cloned().collect()
    }

    pub fn accepted_keys(&self) -> Vec<String> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|r| r.key.clone())
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<SourceRecord> {
        self.stored.lock().unwrap().get(key).cloned()
    }

    fn store(
        &self,
        records: Vec<SourceRecord>,
        checkpoint: Option<(&str, &str)>,
    ) -> Result<IntakeReceipt, IntakeError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_all.load(Ordering::SeqCst) || self.fail_calls.lock().unwrap().contains(&call) {
            return Err(IntakeError(format!("test double told to fail call {call}")));
        }
        let mut stored = self.stored.lock().unwrap();
        let mut receipt = IntakeReceipt::default();
        for r in &records {
            match stored.insert(r.key.clone(), r.clone()) {
                None => receipt.stored += 1,
                Some(old) if old.payload == r.payload => receipt.duplicates += 1,
                Some(_) => receipt.updates += 1,
            }
        }
        if let Some((source, cp)) = checkpoint {
            self.checkpoints
                .lock()
                .unwrap()
                .insert(source.to_string(), cp.to_string());
        }
        self.batches.lock().unwrap().push(records);
        Ok(receipt)
    }
}

#[async_trait]
impl Intake for MemoryIntake {
    async fn accept(&self, records: Vec<SourceRecord>) -> Result<IntakeReceipt, IntakeError> {
        self.store(records, None)
    }

    async fn accept_with_checkpoint(
        &self,
        records: Vec<SourceRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<IntakeReceipt, IntakeError> {
        self.store(records, Some((source, checkpoint)))
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, IntakeError> {
        Ok(self.checkpoints.lock().unwrap().get(source).cloned())
    }

    fn backpressure(&self) -> Option<Backpressure> {
        self.backpressure_checks.fetch_add(1, Ordering::SeqCst);
        self.paused.lock().unwrap().clone()
    }
}
