//! The delivery pipeline: claim due records from the ledger, run the contract, deliver accepted payloads with
//! bounded concurrency, and report every outcome back to the ledger in batches.
//!
//! Invariants: a record is acknowledged to the CRM only once it is in the ledger (see `intake`), so it is never
//! lost; a record is only delivered while this worker holds its lease, and completions carry the claim's
//! generation and fence, so a record taken over by another replica (or superseded by a newer payload) can
//! never be completed twice. The sink upserts by external id, so the one window that remains — the ERP
//! accepted a delivery and the worker died before recording it — re-delivers the same upsert, which leaves
//! the ERP unchanged.
//!
//! Logs: every batch of recorded outcomes is one `info` line with its counts, every record in it a `debug`
//! line with its outcome and `correlation_id`; any other event about one record carries its
//! `correlation_id` too, so `jq 'select(.correlation_id == …)'` follows a record through the worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc, watch};

use super::breaker::Breaker;
use super::metrics::Metrics;
use super::slots::SharedSlots;
use crate::api::{DeliveryPolicy, ErrorClass};
use crate::connectors::{Delivery, Sink, SinkError};
use crate::contract::{
    CompileOptions, CompiledContract, Env, Outcome as ContractOutcome, ReasonCode,
};
use crate::ledger::{
    BucketSet, ClaimedRecord, Completion, LeaseRequest, Ledger, NewLineageEvent, Outcome,
};

/// A record's outcome on its way to the ledger, with the correlation id its log lines carry.
struct Done {
    completion: Completion,
    correlation_id: String,
}

/// What the contract made of a claimed record.
enum Judged {
    /// Ends here (rejected, held, retried after a CPU overrun) with this outcome.
    Done(Outcome),
    /// To be delivered: the mapped payload and its upsert key.
    Accepted {
        payload: crate::contract::Payload,
        external_id: String,
    },
}

/// Tuning of the pipeline that is not part of the flow's policy.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub worker_id: String,
    /// The buckets claimed when no rollout split file is followed (see `rollout_file`).
    pub buckets: BucketSet,
    /// The track this worker runs in a canary rollout (`stable` without one).
    pub track: crate::rollout::split::Track,
    /// The rollout split file to follow while running; when set it decides the buckets, not `buckets`.
    pub rollout_file: Option<std::path::PathBuf>,
    /// How long a claim is held; a delivery must finish well inside it.
    pub lease: Duration,
    /// Records claimed per ledger round trip.
    pub claim_batch: usize,
    /// Completions written per ledger round trip, and the longest they wait for company.
    pub complete_batch: usize,
    pub complete_linger: Duration,
    /// Idle wait between empty claims (the intake also wakes the pipeline).
    pub idle_poll: Duration,
    /// How long a graceful shutdown waits for in-flight deliveries.
    pub shutdown_grace: Duration,
    /// How the flow's contract is compiled: its bounds and the CPU clock of its per-record deadline (tests
    /// inject a deterministic clock here).
    pub contract: CompileOptions,
    /// Free space the embedded ledger's volume must keep; intake is refused below it (see `worker::disk`).
    pub disk_reserve: super::disk::DiskReserve,
    /// How the free space is read; `None` is `statvfs` on the state directory. Tests inject a double.
    pub free_space: Option<Arc<dyn super::disk::FreeSpace>>,
    /// How often the ticket task settles, routes, escalates and delivers tickets.
    pub ticket_period: Duration,
    /// The reconciliation audit's window when a request names none (`--audit-window`; the controller passes
    /// the roster's `audit.window`).
    pub audit_window: Option<Duration>,
    /// The audit's two read clients, injected (tests, `meshline dev`); `None`: the worker builds them from
    /// the flow (see `worker::audit_queries`).
    pub audit_queries: Option<crate::audit::run::AuditQueries>,
    /// How the audit retries, paces and leases (its owner is replaced by `worker_id`).
    pub audit_settings: Option<crate::audit::run::AuditSettings>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            worker_id: format!("worker-{}", std::process::id()),
            buckets: BucketSet::all(),
            track: Default::default(),
            rollout_file: None,
            lease: Duration::from_secs(60),
            claim_batch: 500,
            complete_batch: 500,
            complete_linger: Duration::from_millis(5),
            idle_poll: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(20),
            contract: CompileOptions::default(),
            disk_reserve: Default::default(),
            free_space: None,
            ticket_period: Duration::from_secs(1),
            audit_window: None,
            audit_queries: None,
            audit_settings: None,
        }
    }
}

/// The running parts of a flow's delivery, shared by the pipeline's tasks and the operations API.
pub struct Pipeline {
    pub flow: String,
    pub ledger: Arc<dyn Ledger>,
    pub contract: Arc<CompiledContract>,
    pub env: std::sync::RwLock<Arc<Env>>,
    pub sink: Arc<dyn Sink>,
    pub policy: DeliveryPolicy,
    pub options: PipelineOptions,
    pub breaker: Breaker,
    pub metrics: Arc<Metrics>,
    /// Woken by the intake when new records arrive, so an idle pipeline reacts without polling delay.
    pub wake: tokio::sync::Notify,
    /// Set while the flow cannot judge records correctly (e.g. its pricebook never loaded): records keep
    /// arriving in the ledger but none is processed, so none is rejected for a missing lookup.
    pub gate: std::sync::Mutex<Option<String>>,
    /// Moving average of the ERP's answer time in microseconds; it sizes claims (see `claim_limit`).
    pub delivery_micros: std::sync::atomic::AtomicU64,
    /// Records the intake leased to this worker as it stored them, waiting to be processed like claimed
    /// ones (see [`Pipeline::lease_request`]).
    pub handed: std::sync::Mutex<Vec<ClaimedRecord>>,
    /// Records that ingest transactions still in flight may lease (their requests' limits): the intake
    /// runs several at once on PostgreSQL, and each must leave room for the others' (see
    /// [`Pipeline::lease_request`]). Changed only under the `handed` lock.
    pub leasing: std::sync::atomic::AtomicUsize,
    /// Set once the pipeline stops taking work (shutdown): the intake leases nothing more.
    pub stopping: std::sync::atomic::AtomicBool,
    /// What keeps the worker from its work right now; `/status` lists them.
    pub problems: Arc<super::problems::Problems>,
    /// The polled source's API allowance and pace (Salesforce's `Sforce-Limit-Info`), for `/status`.
    pub source_api: Arc<crate::connectors::sources::salesforce::PollPace>,
    /// The embedded ledger's free-space guard; `None` for a PostgreSQL ledger, whose disk is not ours.
    pub disk: Option<super::disk::DiskGuard>,
    /// The flow's delivery slots, shared with the other replicas through the ledger (PostgreSQL); `None`
    /// when this worker is the flow's only replica and its own semaphore is the limit.
    pub shared_slots: Option<Arc<SharedSlots>>,
    /// The buckets this worker claims right now, its track and revision (they follow the rollout split).
    pub track: Arc<super::track::TrackBuckets>,
    /// The roster's owners as their personal tokens identify them, for approvals of held records.
    pub identities: Arc<super::identity::IdentityBook>,
}

/// What one ingest transaction may lease to this worker; while it lives, its limit counts as leased for the
/// other ingests in flight (see [`Pipeline::lease_request`]).
pub struct LeaseGrant<'a> {
    pub request: LeaseRequest,
    pipeline: &'a Pipeline,
}

impl Drop for LeaseGrant<'_> {
    fn drop(&mut self) {
        let _handed = self
            .pipeline
            .handed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.pipeline
            .leasing
            .fetch_sub(self.request.limit, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Pipeline {
    fn env(&self) -> Arc<Env> {
        self.env.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many records to claim at once: as many as the free slots can deliver within a quarter of the lease
    /// at the ERP's recent pace (a fast ERP gets whole batches, a slow one only what it can finish), so a
    /// claimed record never waits in memory long enough for its lease to run out.
    fn claim_limit(&self, free: usize) -> usize {
        let concurrency = self.policy.concurrency.max(1) as u128;
        let pace = u128::from(
            self.delivery_micros
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1),
        );
        let within = concurrency * (self.options.lease.as_micros() / 4) / pace;
        (free as u128 + within).clamp(1, self.options.claim_batch as u128) as usize
    }

    pub(super) fn observe_delivery(&self, took: Duration) {
        use std::sync::atomic::Ordering;
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = self.delivery_micros.load(Ordering::Relaxed);
        // An exponential moving average; concurrent updates may lose a sample, which does not matter here.
        let new = if old == 0 {
            sample
        } else {
            (old.saturating_mul(7) / 8).saturating_add(sample / 8)
        };
        self.delivery_micros.store(new.max(1), Ordering::Relaxed);
    }

    /// What the intake may lease to this worker in the transaction that stores new records, so they skip a
    /// claim: as many as can start soon (the claim sizing, less what was handed over and not yet started),
    /// none while the flow is gated, its circuit is open or the pipeline is stopping, and no more than the
    /// ingest's own `records`. What other ingests in flight may lease counts as taken until their grants are
    /// dropped, which the intake does once it has handed their records over (or failed), so concurrent group
    /// commits together never lease more than one would.
    pub fn lease_request(&self, records: usize) -> Option<LeaseGrant<'_>> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst)
            || self.gated().is_some()
            || self.breaker.is_open()
        {
            return None;
        }
        let buckets = self.track.current();
        if buckets.is_empty() {
            return None;
        }
        use std::sync::atomic::Ordering;
        let handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        let taken = handed.len() + self.leasing.load(Ordering::SeqCst);
        // No more than the ingest stores: a grant holds back room from the ingests beside it.
        let limit = self.claim_limit(0).saturating_sub(taken).min(records);
        if limit == 0 {
            return None;
        }
        self.leasing.fetch_add(limit, Ordering::SeqCst);
        drop(handed);
        Some(LeaseGrant {
            request: LeaseRequest {
                worker: self.options.worker_id.clone(),
                buckets,
                limit,
                lease: self.options.lease,
            },
            pipeline: self,
        })
    }

    /// Takes records the intake leased to this worker. If the pipeline has stopped meanwhile, gives them
    /// back at once rather than leave them to their lease.
    pub async fn hand_over(&self, records: Vec<ClaimedRecord>) {
        if records.is_empty() {
            return;
        }
        self.metrics.intake_leased.inc_by(records.len() as u64);
        {
            // `stopping` is read and set under the same lock, so a record is either handed over before the
            // pipeline's last look at `handed` or given back here, never left to its lease.
            let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            if !self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                handed.extend(records);
                drop(handed);
                self.wake.notify_one();
                return;
            }
        }
        let released = records
            .into_iter()
            .map(|r| Completion {
                claim: r.claim,
                outcome: Outcome::Released { not_before: None },
            })
            .collect();
        if let Err(e) = self.ledger.complete_batch(released).await {
            tracing::warn!(flow = %self.flow, error = %e, "could not give back records leased during shutdown; their leases will expire");
        }
    }

    /// Whether `record`'s lease outlasts a delivery call (which is cut off at half the lease). A record that
    /// waited in memory longer than that (an ERP that suddenly slowed, a full slot pool) must not be sent:
    /// once its lease runs out another worker may claim it (after a rollout split change, the other track),
    /// and both would put it. The fence only refuses the late completion, not the late call.
    pub fn lease_covers_delivery(&self, record: &ClaimedRecord) -> bool {
        (record.lease_expires_at - Utc::now())
            .to_std()
            .is_ok_and(|left| left > self.options.lease / 2)
    }

    /// Why intake must refuse records right now (the ledger's volume is below its reserve), if it must.
    pub fn intake_pressure(&self) -> Option<super::disk::Pressure> {
        self.disk.as_ref().and_then(|d| d.pressure())
    }

    /// Why deliveries are gated, if they are.
    pub fn gated(&self) -> Option<String> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_gate(&self, reason: Option<String>) {
        *self.gate.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.wake.notify_one();
    }

    /// Replaces the lookup snapshot (after a pricebook refresh).
    pub fn set_env(&self, env: Env) {
        *self.env.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(env);
    }

    /// Runs until `shutdown` turns true, then releases what it holds within the grace period.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let concurrency = self.policy.concurrency.max(1) as usize;
        // With a sink that takes batches, the flow's concurrency bounds requests (each a batch, see `Limited`),
        // so as many records as fill every request may be in the pipeline at once.
        let grouping = super::batch::Grouping::for_flow(&self.policy, self.sink.batch_limits());
        let records_in_flight = grouping.map_or(concurrency, |g| concurrency * g.max_records);
        let slots = Arc::new(Semaphore::new(records_in_flight));
        let (done_tx, done_rx) = mpsc::channel::<Done>(self.options.complete_batch * 4);
        let completer = tokio::spawn(self.clone().completer(done_rx));
        let (batch_tx, batcher) = match grouping {
            Some(grouping) => {
                let (tx, rx) = mpsc::channel(grouping.max_records * 2);
                let batcher = tokio::spawn(self.clone().batcher(rx, grouping));
                (Some(tx), Some(batcher))
            }
            None => (None, None),
        };
        let keeper = self
            .shared_slots
            .clone()
            .map(|slots| tokio::spawn(slots.keep(shutdown.clone())));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            if self.gated().is_some() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            if self.breaker.is_open() {
                self.metrics.breaker_open.set(1);
                self.probe().await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            self.metrics.breaker_open.set(0);
            // Claim only what can start soon, so claimed records do not wait in memory while their lease runs.
            let free = slots.available_permits();
            if free == 0 {
                tokio::select! {
                    _ = tasks.join_next() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Records the intake leased to us as it stored them come first: they are ours already.
            let handed =
                std::mem::take(&mut *self.handed.lock().unwrap_or_else(|p| p.into_inner()));
            let limit = self.claim_limit(free);
            // Read per claim: the rollout split can move buckets between tracks at any time.
            let buckets = self.track.current();
            let claimed = if !handed.is_empty() {
                handed
            } else if buckets.is_empty() {
                Vec::new()
            } else {
                match self
                    .ledger
                    .claim(&self.options.worker_id, &buckets, limit, self.options.lease)
                    .await
                {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        tracing::error!(flow = %self.flow, error = %e, "claim failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            };
            if claimed.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.options.idle_poll) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            for record in claimed {
                let permit = match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                };
                let me = self.clone();
                let done = done_tx.clone();
                let batches = batch_tx.clone();
                tasks.spawn(async move {
                    let correlation_id = record.correlation_id.clone();
                    let completion = me.process_with(record, batches.as_ref()).await;
                    drop(permit);
                    // The completer outlives every task; a send error means shutdown already gave up on us.
                    let _ = done
                        .send(Done {
                            completion,
                            correlation_id,
                        })
                        .await;
                });
            }
        }
        // Records handed over by the intake and not started go back to the queue now.
        let handed = {
            let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            std::mem::take(&mut *handed)
        };
        for record in handed {
            let released = Done {
                completion: Completion {
                    claim: record.claim,
                    outcome: Outcome::Released { not_before: None },
                },
                correlation_id: record.correlation_id,
            };
            let _ = done_tx.send(released).await;
        }
        // Graceful shutdown: in-flight deliveries finish within the grace period; what does not is left to
        // the lease (the record goes back to the queue when it expires, and the upsert makes a repeat safe).
        let deadline = tokio::time::sleep(self.options.shutdown_grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!(flow = %self.flow, left = tasks.len(), "shutdown grace elapsed; leases will expire");
                    tasks.abort_all();
                    if let Some(batcher) = &batcher {
                        batcher.abort();
                    }
                    break;
                }
            }
        }
        // Every record task has ended, so the batcher has nothing more to wait for.
        drop(batch_tx);
        if let Some(batcher) = batcher {
            let _ = batcher.await;
        }
        drop(done_tx);
        let _ = completer.await;
        if let Some(keeper) = keeper {
            // Gives back the slots still held, once no delivery uses them.
            let _ = keeper.await;
        }
    }

    /// Writes completions in batches: one transaction for many records.
    async fn completer(self: Arc<Self>, mut rx: mpsc::Receiver<Done>) {
        let mut batch = Vec::with_capacity(self.options.complete_batch);
        loop {
            let Some(first) = rx.recv().await else { break };
            batch.push(first);
            let linger = tokio::time::sleep(self.options.complete_linger);
            tokio::pin!(linger);
            while batch.len() < self.options.complete_batch {
                tokio::select! {
                    next = rx.recv() => match next { Some(c) => batch.push(c), None => break },
                    _ = &mut linger => break,
                }
            }
            self.flush(&mut batch).await;
        }
        self.flush(&mut batch).await;
    }

    async fn flush(&self, batch: &mut Vec<Done>) {
        if batch.is_empty() {
            return;
        }
        let (completions, correlation_ids): (Vec<Completion>, Vec<String>) = std::mem::take(batch)
            .into_iter()
            .map(|d| (d.completion, d.correlation_id))
            .unzip();
        let mut attempt = 0u32;
        loop {
            match self.ledger.complete_batch(completions.clone()).await {
                Ok(results) => {
                    self.log_recorded(&completions, &correlation_ids, &results);
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    // Leases protect the records meanwhile; if the ledger stays away they expire and the
                    // records are claimed again, and the upsert makes the repeat harmless.
                    tracing::error!(flow = %self.flow, error = %e, attempt, "recording outcomes failed; retrying");
                    if attempt >= 20 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10))))
                        .await;
                }
            }
        }
    }

    /// The log lines of a recorded batch of outcomes (see the module doc).
    fn log_recorded(
        &self,
        completions: &[Completion],
        correlation_ids: &[String],
        results: &[crate::ledger::CompletionResult],
    ) {
        let mut counts = [0usize; 5];
        let mut refused = 0;
        for ((c, correlation_id), r) in completions.iter().zip(correlation_ids).zip(results) {
            if *r != crate::ledger::CompletionResult::Applied {
                refused += 1;
                tracing::info!(flow = %self.flow, record = %c.claim.id, correlation_id, outcome = c.outcome.step(), result = ?r, "completion refused; another owner or a newer payload took over");
                continue;
            }
            let (index, class, detail) = match &c.outcome {
                Outcome::Delivered => (0, None, None),
                Outcome::RetryScheduled { class, .. } => (1, Some(class.label()), None),
                Outcome::DeadLettered { class, reason, .. } => {
                    // Counted here, once the ledger applied it: a refused completion is no dead letter.
                    self.metrics
                        .dead_letters
                        .get_or_create(&super::metrics::DeadLetterReasonLabel::of(reason))
                        .inc();
                    (2, Some(class.label()), Some(reason.as_str()))
                }
                Outcome::Held { rule, .. } => (3, None, Some(rule.as_str())),
                Outcome::Released { .. } => (4, None, None),
            };
            counts[index] += 1;
            // The reason key and the rule name only: messages may quote the record's values.
            tracing::debug!(
                flow = %self.flow,
                record = %c.claim.id,
                correlation_id,
                generation = c.claim.generation,
                outcome = c.outcome.step(),
                error_class = class,
                reason = detail,
                "record outcome recorded"
            );
        }
        let [delivered, retry_scheduled, dead_lettered, held, released] = counts;
        tracing::info!(
            flow = %self.flow,
            records = completions.len(),
            delivered,
            retry_scheduled,
            dead_lettered,
            held,
            released,
            refused,
            "outcomes recorded in the ledger"
        );
    }

    /// Closes the breaker when the ERP answers a probe.
    async fn probe(&self) {
        if !self.breaker.probe_due() {
            return;
        }
        match self.sink.probe().await {
            Ok(()) => {
                if let Some(open_for) = self.breaker.close() {
                    tracing::info!(flow = %self.flow, open_seconds = open_for.num_seconds(), "ERP answers again; deliveries resume");
                }
                self.wake.notify_one();
            }
            Err(e) => {
                tracing::debug!(flow = %self.flow, error = %e, "probe failed; breaker stays open")
            }
        }
    }

    /// One record: contract, then delivery, then the outcome to record.
    pub async fn process(&self, record: ClaimedRecord) -> Completion {
        self.process_with(record, None).await
    }

    /// [`Pipeline::process`], delivering through the batcher when the sink takes batches.
    async fn process_with(
        &self,
        record: ClaimedRecord,
        batches: Option<&mpsc::Sender<super::batch::Pending>>,
    ) -> Completion {
        let claim = record.claim;
        let outcome = match self.judge(&record).await {
            Judged::Done(outcome) => outcome,
            Judged::Accepted {
                payload,
                external_id,
            } => match batches {
                Some(batches) => {
                    self.deliver_batched(batches, record, payload, external_id)
                        .await
                }
                None => self.deliver(&record, &payload, &external_id).await,
            },
        };
        Completion { claim, outcome }
    }

    /// The contract's verdict on a claimed record: to deliver, or the outcome it ends with here.
    async fn judge(&self, record: &ClaimedRecord) -> Judged {
        let bytes = record.payload.as_bytes();
        let approved_rule = if record.approved_by.is_some() {
            self.approved_rule(record).await
        } else {
            None
        };
        let env = self.env();
        let contract_outcome = match &approved_rule {
            Some(rule) => self
                .contract
                .process_approved(bytes, &env, &[rule.as_str()]),
            None => self.contract.process(bytes, &env),
        };
        match contract_outcome {
            ContractOutcome::Rejected { reasons }
                if reasons
                    .iter()
                    .any(|r| r.code == ReasonCode::DeadlineExceeded) =>
            {
                Judged::Done(self.overran(record, &reasons).await)
            }
            ContractOutcome::Rejected { reasons } => {
                self.metrics.fail(ErrorClass::Permanent);
                self.metrics.dead_lettered.inc();
                let first = reasons.first();
                let key = first
                    .map(|r| format!("contract:{}:{}", r.code.label(), subject_key(&r.subject)))
                    .unwrap_or_else(|| "contract:rejected".into());
                let message = reasons
                    .iter()
                    .map(|r| format!("{}: {}", r.subject, r.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                Judged::Done(dead_letter(
                    &key,
                    ErrorClass::Permanent,
                    message,
                    None,
                    self.snapshot(record),
                ))
            }
            ContractOutcome::Held {
                rule,
                approver_role,
                ..
            } => {
                self.metrics.held.inc();
                Judged::Done(Outcome::Held {
                    rule,
                    role: approver_role,
                    snapshot: self.snapshot(record),
                })
            }
            ContractOutcome::Accepted {
                payload,
                external_id,
                warnings,
            } => {
                if !warnings.is_empty() {
                    let events = vec![NewLineageEvent {
                        record: record.claim.id,
                        step: "contract_warnings".into(),
                        detail: serde_json::to_value(&warnings).unwrap_or_default(),
                    }];
                    if let Err(e) = self.ledger.append_lineage(events).await {
                        tracing::warn!(flow = %self.flow, record = %record.claim.id, correlation_id = %record.correlation_id, error = %e, "lineage write failed");
                    }
                }
                Judged::Accepted {
                    payload,
                    external_id: external_id.as_str().to_string(),
                }
            }
        }
    }

    /// A record whose evaluation overran its CPU budget. One overrun is no verdict on the record (a page
    /// fault storm, a noisy neighbour on the same core, a cold cache can all inflate CPU time once), so it is
    /// retried with the flow's backoff like any transient failure. Only a record that overruns on
    /// [`MAX_CONSECUTIVE_OVERRUNS`] consecutive evaluations of the same payload is dead-lettered, with a reason
    /// that says so. The streak is read from the record's lineage, so it survives restarts and is the same
    /// whichever replica evaluates the record; any other outcome in between (a delivery failure, say) ends it.
    async fn overran(
        &self,
        record: &ClaimedRecord,
        reasons: &[crate::contract::Reason],
    ) -> Outcome {
        let message = reasons
            .iter()
            .map(|r| format!("{}: {}", r.subject, r.message))
            .collect::<Vec<_>>()
            .join("; ");
        let earlier = self.consecutive_overruns(record).await;
        let overruns = earlier + 1;
        if overruns >= MAX_CONSECUTIVE_OVERRUNS {
            self.metrics.fail(ErrorClass::Permanent);
            self.metrics.dead_lettered.inc();
            let subject = reasons
                .iter()
                .find(|r| r.code == ReasonCode::DeadlineExceeded)
                .map(|r| subject_key(&r.subject))
                .unwrap_or_else(|| "record".into());
            // One stable reason per subject (the count is a constant), so dead letters group and replay by it.
            let reason = format!(
                "contract:deadline_exceeded:{subject} (overran its CPU budget on {overruns} consecutive attempts)"
            );
            return dead_letter(
                &reason,
                ErrorClass::Permanent,
                message,
                None,
                self.snapshot(record),
            );
        }
        self.metrics.fail(ErrorClass::Transient);
        self.metrics.retried.inc();
        let attempts = u32::try_from(record.attempts.max(1)).unwrap_or(u32::MAX);
        let wait = backoff(&self.policy, attempts, None);
        Outcome::RetryScheduled {
            next_attempt_at: Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
            error: format!("{OVERRUN_MARK} {overruns} of {MAX_CONSECUTIVE_OVERRUNS}: {message}"),
            class: ErrorClass::Transient,
        }
    }

    /// How many evaluations of this record's current payload in a row, up to now, overran the CPU budget:
    /// the retries its lineage records with [`OVERRUN_MARK`], counted back from the newest outcome. Claims,
    /// releases and other non-verdicts are skipped; any other outcome ends the streak. If the lineage
    /// cannot be read the streak counts as zero: the record is retried rather than dead-lettered without
    /// evidence.
    async fn consecutive_overruns(&self, record: &ClaimedRecord) -> u32 {
        let detail = match self.ledger.get(record.claim.id).await {
            Ok(Some(detail)) => detail,
            Ok(None) => return 0,
            Err(e) => {
                tracing::warn!(flow = %self.flow, record = %record.claim.id, correlation_id = %record.correlation_id, error = %e, "cannot read the lineage to count deadline overruns; retrying");
                return 0;
            }
        };
        let mut streak = 0;
        for event in detail
            .lineage
            .iter()
            .rev()
            .filter(|e| e.generation == record.claim.generation)
        {
            match event.step.as_str() {
                "retry_scheduled" => {
                    let overran = event.detail["error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with(OVERRUN_MARK));
                    if !overran {
                        break;
                    }
                    streak += 1;
                }
                "delivered" | "dead_lettered" | "held" => break,
                _ => {}
            }
        }
        streak
    }

    /// The record as a person may see it with its hold or dead letter: through the contract's one redaction
    /// function. Taken here, off the happy path, so a delivered record costs no snapshot.
    fn snapshot(&self, record: &ClaimedRecord) -> Option<serde_json::Value> {
        Some(self.contract.snapshot(record.payload.as_bytes()))
    }

    /// The hold rule a person approved, so the same rule does not hold the record again.
    async fn approved_rule(&self, record: &ClaimedRecord) -> Option<String> {
        match self.ledger.get(record.claim.id).await {
            Ok(Some(detail)) => detail.record.hold_rule,
            _ => None,
        }
    }

    async fn deliver(
        &self,
        record: &ClaimedRecord,
        payload: &crate::contract::Payload,
        external_id: &str,
    ) -> Outcome {
        if self.breaker.is_open() {
            return Outcome::Released { not_before: None };
        }
        let attempt = u32::try_from(record.attempts.max(1)).unwrap_or(u32::MAX);
        let delivery = Delivery {
            external_id,
            payload: payload.as_json(),
            correlation_id: &record.correlation_id,
            attempt,
        };
        let slot = match self.shared_slot().await {
            Ok(slot) => slot,
            Err(outcome) => {
                tracing::debug!(flow = %self.flow, record = %record.claim.id, correlation_id = %record.correlation_id, "no delivery slot; the record waits");
                return outcome;
            }
        };
        if !self.lease_covers_delivery(record) {
            tracing::debug!(flow = %self.flow, record = %record.claim.id, correlation_id = %record.correlation_id, "the lease could run out during the call; the record goes back to be claimed afresh");
            return Outcome::Released { not_before: None };
        }
        self.metrics.in_flight.inc();
        let started = Instant::now();
        // The ERP call must end well inside the lease, or another replica could take the record over mid-call.
        let timeout = self.options.lease / 2;
        let result = match tokio::time::timeout(timeout, self.sink.deliver(delivery)).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::new(
                self.sink.system(),
                ErrorClass::Transient,
                format!("no answer within {timeout:?}"),
            )),
        };
        drop(slot);
        self.metrics.in_flight.dec();
        self.metrics
            .delivery_seconds
            .observe(started.elapsed().as_secs_f64());
        self.observe_delivery(started.elapsed());
        match result {
            Ok(_) => {
                self.breaker.success();
                self.metrics.delivered.inc();
                Outcome::Delivered
            }
            Err(e) => {
                let e = self.scrubbed(record, payload, e);
                self.failed(record, e)
            }
        }
    }

    /// With several replicas, the flow's concurrency is shared: a slot from the ledger before each request
    /// to the ERP (one record, or one batch). A request that cannot get one soon gives its records back to
    /// the queue (`Err` with their outcome), well before their lease could run out.
    pub(super) async fn shared_slot(&self) -> Result<Option<super::slots::SlotGuard>, Outcome> {
        let Some(slots) = &self.shared_slots else {
            return Ok(None);
        };
        match tokio::time::timeout(self.options.lease / 4, slots.acquire()).await {
            Ok(Ok(slot)) => Ok(Some(slot)),
            Ok(Err(e)) => {
                tracing::warn!(flow = %self.flow, error = %e, "no delivery slot (ledger error); records wait");
                Err(Outcome::Released {
                    not_before: Some(Utc::now() + chrono::Duration::seconds(1)),
                })
            }
            Err(_) => Err(Outcome::Released { not_before: None }),
        }
    }

    /// The ERP's error with every personal value of the record and its payload redacted. ERPs quote field
    /// values in their errors (NetSuite's `o:errorDetails`, Odoo's validation messages), and the error goes
    /// on to `last_error`, the dead letter, `/records`, the breaker's reason and the logs; this is the one
    /// place it is cleaned, before any of them sees it.
    pub(super) fn scrubbed(
        &self,
        record: &ClaimedRecord,
        payload: &crate::contract::Payload,
        mut e: SinkError,
    ) -> SinkError {
        let bytes = record.payload.as_bytes();
        e.message = self
            .contract
            .scrub_record_text(bytes, Some(payload), &e.message);
        e.response = e
            .response
            .map(|r| self.contract.scrub_record_text(bytes, Some(payload), &r));
        e
    }

    fn failed(&self, record: &ClaimedRecord, e: SinkError) -> Outcome {
        self.breaker_sees(record, &e);
        self.failure_outcome(record, e)
    }

    /// What one failed request tells the circuit breaker. A batch is one request: it counts once, however
    /// many records it carried.
    pub(super) fn breaker_sees(&self, record: &ClaimedRecord, e: &SinkError) {
        match e.class {
            ErrorClass::Transient => {
                if self.breaker.transient_failure(&e.message) {
                    tracing::warn!(flow = %self.flow, record = %record.claim.id, correlation_id = %record.correlation_id, error = %e, "every delivery is failing; circuit breaker opened");
                }
            }
            ErrorClass::Permanent | ErrorClass::Hold => self.breaker.success(),
            ErrorClass::FlowLevel | ErrorClass::Config => {
                if self.breaker.open(e.message.clone()) {
                    tracing::warn!(flow = %self.flow, record = %record.claim.id, correlation_id = %record.correlation_id, error = %e, "flow-level failure; circuit breaker opened, records wait");
                }
            }
        }
    }

    /// The outcome a record gets from a failed delivery (the breaker has already seen the failure).
    pub(super) fn failure_outcome(&self, record: &ClaimedRecord, e: SinkError) -> Outcome {
        self.metrics.fail(e.class);
        match e.class {
            ErrorClass::Transient => {
                let attempts = u32::try_from(record.attempts.max(1)).unwrap_or(u32::MAX);
                if attempts >= self.policy.max_attempts {
                    self.metrics.dead_lettered.inc();
                    let reason = format!("erp:transient:gave_up_after_{attempts}_attempts");
                    return dead_letter(
                        &reason,
                        ErrorClass::Transient,
                        e.message,
                        e.response,
                        self.snapshot(record),
                    );
                }
                self.metrics.retried.inc();
                let wait = backoff(&self.policy, attempts, e.retry_after);
                Outcome::RetryScheduled {
                    next_attempt_at: Utc::now()
                        + chrono::Duration::from_std(wait).unwrap_or_default(),
                    error: e.message,
                    class: ErrorClass::Transient,
                }
            }
            ErrorClass::Permanent | ErrorClass::Hold => {
                self.metrics.dead_lettered.inc();
                let reason = format!(
                    "erp:{}",
                    e.status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "rejected".into())
                );
                dead_letter(
                    &reason,
                    ErrorClass::Permanent,
                    e.message,
                    e.response,
                    self.snapshot(record),
                )
            }
            ErrorClass::FlowLevel | ErrorClass::Config => Outcome::Released { not_before: None },
        }
    }
}

/// Consecutive evaluations of one payload that must overrun the contract's CPU budget before the record is
/// dead-lettered. Three: a record that overran by accident (a noisy neighbour, a cold cache) gets two more
/// chances after backoff, while one whose rules really are too costly is set aside after a few seconds of
/// backoff instead of occupying the worker forever.
pub const MAX_CONSECUTIVE_OVERRUNS: u32 = 3;

/// How a retry scheduled for a deadline overrun starts its error text; the lineage keeps it, and the next
/// evaluation counts the streak from it.
const OVERRUN_MARK: &str = "contract deadline overrun";

/// The subject part of a contract dead letter's reason key (`contract:<code>:<subject>`); the preflight replay
/// names rejections by the same key.
pub(crate) fn subject_key(subject: &crate::contract::Subject) -> String {
    use crate::contract::Subject;
    match subject {
        Subject::Record => "record".into(),
        Subject::Field(path) => format!("field:{path}"),
        Subject::Rule(name) => format!("rule:{name}"),
        Subject::Mapping(target) => format!("mapping:{target}"),
        Subject::ExternalId => "external_id".into(),
    }
}

fn dead_letter(
    reason: &str,
    class: ErrorClass,
    message: String,
    erp_response: Option<String>,
    snapshot: Option<serde_json::Value>,
) -> Outcome {
    let erp_response = erp_response.or(Some(message)).filter(|s| !s.is_empty());
    Outcome::DeadLettered {
        reason: reason.to_string(),
        class,
        erp_response,
        snapshot,
    }
}

/// Exponential backoff with full jitter: a uniform wait in [0, min(max, base·2^(attempt-1))], but never less
/// than what the ERP asked for with `Retry-After`.
pub fn backoff(policy: &DeliveryPolicy, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let base = policy
        .backoff
        .as_ref()
        .and_then(|b| b.base)
        .map(Duration::from)
        .unwrap_or(Duration::from_secs(1));
    let max = policy
        .backoff
        .as_ref()
        .and_then(|b| b.max)
        .map(Duration::from)
        .unwrap_or(Duration::from_secs(300));
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let jitter =
        Duration::from_secs_f64(rand::rng().random_range(0.0..=exp.as_secs_f64().max(0.0)));
    jitter.max(retry_after.unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Backoff;

    fn policy(base: &str, max: &str) -> DeliveryPolicy {
        DeliveryPolicy {
            backoff: Some(Backoff {
                base: Some(base.parse().unwrap()),
                max: Some(max.parse().unwrap()),
            }),
            ..DeliveryPolicy::default()
        }
    }

    #[test]
    fn backoff_stays_within_the_exponential_cap_and_honours_retry_after() {
        let p = policy("100ms", "2s");
        for attempt in 1..30 {
            let cap = Duration::from_millis(100)
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(Duration::from_secs(2));
            for _ in 0..50 {
                assert!(backoff(&p, attempt, None) <= cap);
            }
        }
        assert!(backoff(&p, 1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }

    #[test]
    fn backoff_is_jittered() {
        let p = policy("1s", "60s");
        let waits: std::collections::BTreeSet<u128> =
            (0..20).map(|_| backoff(&p, 5, None).as_micros()).collect();
        assert!(waits.len() > 10, "full jitter spreads retries: {waits:?}");
    }
}
