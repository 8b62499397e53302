//! The ledger's vocabulary: record states and their legal transitions, what the worker hands in (incoming
//! records, outcomes) and what it gets back (claims, record views, counts), the stable bucket hash and the
//! clock. Pure values only: nothing here touches a database.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::ErrorClass;

/// Number of stable buckets that record keys are spread over. Canary weights are whole percentages.
pub const BUCKETS: u8 = 100;

/// Primary key of a record in the ledger. Stable across updates (a changed payload bumps the generation,
/// not the id), so `GET /records/{id}` tells the whole story of one source record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordId(pub i64);

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a record is in its life. Stored as [`RecordState::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Durably stored; not yet through the contract.
    Received,
    /// Passed the contract (or was approved / replayed) and waits for delivery.
    Validated,
    /// Waits for an approver role.
    Held,
    /// Claimed by a worker under a lease.
    Delivering,
    /// The ERP accepted it. Terminal until the source sends a changed payload.
    Delivered,
    /// A transient failure; claimable again at `next_attempt_at`.
    RetryScheduled,
    /// A permanent failure or a rejection; waits for a replay.
    DeadLettered,
}

impl RecordState {
    pub const ALL: [RecordState; 7] = [
        RecordState::Received,
        RecordState::Validated,
        RecordState::Held,
        RecordState::Delivering,
        RecordState::Delivered,
        RecordState::RetryScheduled,
        RecordState::DeadLettered,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Received => "received",
            RecordState::Validated => "validated",
            RecordState::Held => "held",
            RecordState::Delivering => "delivering",
            RecordState::Delivered => "delivered",
            RecordState::RetryScheduled => "retry_scheduled",
            RecordState::DeadLettered => "dead_lettered",
        }
    }

    pub fn parse(s: &str) -> Option<RecordState> {
        RecordState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
    }

    /// States a worker may claim (once `next_attempt_at` has passed and no live lease remains).
    pub fn is_claimable(self) -> bool {
        matches!(
            self,
            RecordState::Received | RecordState::Validated | RecordState::RetryScheduled
        )
    }

    /// The lifecycle graph. A changed payload from the source is not a transition: it starts a new
    /// generation in `received` from any state (see `Ledger::ingest`).
    ///
    /// `delivering → received|validated|retry_scheduled` is the release of a claim without an attempt
    /// (graceful shutdown, open circuit breaker): the record goes back to where it was claimed from.
    pub fn can_transition_to(self, to: RecordState) -> bool {
        use RecordState::*;
        matches!(
            (self, to),
            (Received, Validated | Held | DeadLettered | Delivering)
                | (Validated, Held | DeadLettered | Delivering)
                | (RetryScheduled, Delivering | DeadLettered)
                | (
                    Delivering,
                    Delivered | RetryScheduled | DeadLettered | Held | Received | Validated
                )
                | (Held, Validated | DeadLettered)
                | (DeadLettered, Validated)
        )
    }
}

impl fmt::Display for RecordState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses an [`ErrorClass`] from its stable label (the form the ledger stores).
pub fn error_class_from_label(label: &str) -> Option<ErrorClass> {
    [
        ErrorClass::Transient,
        ErrorClass::Permanent,
        ErrorClass::Hold,
        ErrorClass::FlowLevel,
        ErrorClass::Config,
    ]
    .into_iter()
    .find(|class| class.label() == label)
}

/// The stable bucket of a record key: the first 8 bytes of SHA-256(key) read as a big-endian `u64`, mod 100.
///
/// Every replica, every version and every language must agree on this number, because the stable/canary
/// split is expressed in buckets; that is why it is not Rust's randomly seeded `Hasher`.
pub fn bucket_of(record_key: &str) -> u8 {
    let digest = Sha256::digest(record_key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(BUCKETS)) as u8
}

/// SHA-256 (hex) of the payload's canonical JSON: object keys sorted at every level, no whitespace. Key order
/// in the source's JSON must not turn a retried webhook into an "update".
pub fn payload_hash(payload: &Value) -> String {
    payload_text_hash(&json_text(payload))
}

/// A JSON value's compact text, exactly as `Value::to_string` writes it (the canonical form below), written
/// into a byte buffer: `to_string` goes through `fmt::Write` one token at a time, which made serialising a
/// 1 KB record one of the worker's larger costs per record (issue #13).
pub fn json_text(value: &Value) -> String {
    // Writing a `Value` cannot fail (its keys are strings, a `String` takes every byte); should it ever,
    // the slower writer gives the same text rather than lose the payload.
    serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
}

/// [`payload_hash`] of a payload already serialised with `Value::to_string`. serde_json keeps object members
/// sorted by key (its map is ordered; the crate does not enable `preserve_order`) and writes no whitespace,
/// so that text is the canonical form; a test pins this against a canonical writer, so the day a dependency
/// turns `preserve_order` on, the test fails rather than every stored hash silently changing.
pub(crate) fn payload_text_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A new correlation id in the W3C trace-id shape (32 lowercase hex digits), so the sink can carry it in a
/// `traceparent` header. Unique, not secret: SHA-256 over the process id, a process-wide counter, the time and
/// the record key.
pub fn new_correlation_id(record_key: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(std::process::id().to_be_bytes());
    hasher.update(n.to_be_bytes());
    hasher.update(nanos.to_be_bytes());
    hasher.update(record_key.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// A set of buckets (0–99) a worker claims from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketSet {
    bits: u128,
}

impl BucketSet {
    pub fn all() -> BucketSet {
        BucketSet::range(0..BUCKETS)
    }

    pub fn empty() -> BucketSet {
        BucketSet { bits: 0 }
    }

    /// Buckets in `range` (clamped to 0–99). A canary at weight w takes `0..w`, stable takes `w..100`.
    pub fn range(range: Range<u8>) -> BucketSet {
        let mut set = BucketSet::empty();
        for bucket in range.start..range.end.min(BUCKETS) {
            set.bits |= 1u128 << bucket;
        }
        set
    }

    pub fn from_buckets(buckets: impl IntoIterator<Item = u8>) -> BucketSet {
        let mut set = BucketSet::empty();
        for bucket in buckets.into_iter().filter(|b| *b < BUCKETS) {
            set.bits |= 1u128 << bucket;
        }
        set
    }

    pub fn contains(&self, bucket: u8) -> bool {
        bucket < BUCKETS && self.bits & (1u128 << bucket) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        (0..BUCKETS).filter(|b| self.contains(*b))
    }
}

/// One record as a source hands it to the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingRecord {
    /// The record's key in the source system (e.g. a Salesforce Id). The bucket is derived from it.
    pub source_key: String,
    /// The identity of the record for idempotency: same key and same payload hash is a duplicate, same key
    /// and a different hash is an update.
    pub idempotency_key: String,
    /// The upsert key at the ERP, if known at receipt.
    pub external_id: Option<String>,
    pub payload: Value,
    pub contract_version: String,
    /// Taken from the source when it sends one (e.g. a `traceparent`), otherwise generated at receipt.
    pub correlation_id: Option<String>,
    /// The revision's ordering value (the contract's `spec.ordering` field, normalised by the contract), if
    /// the contract declares one and the record carries it. A revision whose value is below the stored one
    /// is stale; `None` keeps the arrival-order rule (see [`IngestOutcome::Stale`]).
    pub ordering: Option<i64>,
}

/// A worker's request to lease the records an ingest newly stores, in the same transaction, instead of
/// claiming them afterwards (see [`crate::ledger::Ledger::ingest_and_claim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    pub worker: String,
    /// Only records in these buckets are leased (a canary worker leases only its share).
    pub buckets: BucketSet,
    /// At most this many.
    pub limit: usize,
    pub lease: std::time::Duration,
}

/// What `ingest` did with one incoming record, in batch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// A new record.
    Received {
        id: RecordId,
        correlation_id: String,
    },
    /// Same key, changed payload: a new generation re-enters the pipeline. Any claim on an older generation
    /// is superseded and cannot complete.
    Updated {
        id: RecordId,
        generation: i64,
        correlation_id: String,
    },
    /// Same key, same payload hash: nothing new was stored. The correlation id is the stored record's (the
    /// one its lineage and logs already carry).
    Duplicate {
        id: RecordId,
        correlation_id: String,
    },
    /// Same key, changed payload, but an ordering value older than the stored revision's: a late revision.
    /// Recorded in the lineage (step `stale`) and counted; the stored payload stays current and nothing is
    /// delivered.
    Stale {
        id: RecordId,
        stored: i64,
        incoming: i64,
        /// The late revision's own correlation id, as its `stale` lineage event records it.
        correlation_id: String,
    },
}

impl IngestOutcome {
    pub fn id(&self) -> RecordId {
        match self {
            IngestOutcome::Received { id, .. }
            | IngestOutcome::Updated { id, .. }
            | IngestOutcome::Duplicate { id, .. }
            | IngestOutcome::Stale { id, .. } => *id,
        }
    }

    /// The correlation id the record's lineage event for this outcome carries.
    pub fn correlation_id(&self) -> &str {
        match self {
            IngestOutcome::Received { correlation_id, .. }
            | IngestOutcome::Updated { correlation_id, .. }
            | IngestOutcome::Duplicate { correlation_id, .. }
            | IngestOutcome::Stale { correlation_id, .. } => correlation_id,
        }
    }

    /// The outcome's name in logs: the lineage step it wrote.
    pub fn label(&self) -> &'static str {
        match self {
            IngestOutcome::Received { .. } => "received",
            IngestOutcome::Updated { .. } => "updated",
            IngestOutcome::Duplicate { .. } => "duplicate",
            IngestOutcome::Stale { .. } => "stale",
        }
    }
}

/// The fencing handle of one claim. A completion must present all three: the generation proves the payload
/// is still current, the fence proves nobody has claimed the record since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Claim {
    pub id: RecordId,
    pub generation: i64,
    pub fence: i64,
}

/// A record handed to a worker by `claim`, in state `delivering` under a lease.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedRecord {
    pub claim: Claim,
    pub source_key: String,
    pub idempotency_key: String,
    pub external_id: Option<String>,
    /// The payload's JSON text as stored; the contract parses it once, in its own reader.
    pub payload: String,
    pub payload_hash: String,
    pub contract_version: String,
    /// Delivery attempts including this one.
    pub attempts: i64,
    pub correlation_id: String,
    pub bucket: u8,
    /// The state the record was claimed from; `delivering` means an expired lease was taken over.
    pub claimed_from: RecordState,
    /// Set once a held record was approved, so the worker does not hold it again for the same rule.
    pub approved_by: Option<String>,
    pub lease_expires_at: DateTime<Utc>,
}

/// How a claimed record ended this round.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Delivered,
    RetryScheduled {
        next_attempt_at: DateTime<Utc>,
        error: String,
        class: ErrorClass,
    },
    DeadLettered {
        reason: String,
        class: ErrorClass,
        /// The ERP's answer, verbatim (status line and body), for the person who fixes it.
        erp_response: Option<String>,
        /// Redacted payload snapshot to keep with the dead letter (the ledger stores it as given).
        snapshot: Option<Value>,
    },
    Held {
        rule: String,
        role: String,
        /// Redacted payload snapshot to keep with the hold, for the approver (the ledger stores it as given).
        snapshot: Option<Value>,
    },
    /// Give the record back without counting a failure (graceful shutdown, open circuit breaker, no delivery
    /// slot, a lease too short for the call, a flow-level error). It returns to the state it was claimed from
    /// and is claimable again at `not_before` (now if `None`), and its claim's attempt is given back: the
    /// record was not tried, so however often it is released, it is retried as often as the policy says and
    /// given up only after that many real attempts (a busy machine is never a verdict on a record).
    Released {
        not_before: Option<DateTime<Utc>>,
    },
}

impl Outcome {
    /// The step name written to lineage.
    pub fn step(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::RetryScheduled { .. } => "retry_scheduled",
            Outcome::DeadLettered { .. } => "dead_lettered",
            Outcome::Held { .. } => "held",
            Outcome::Released { .. } => "released",
        }
    }
}

/// One completion in a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub claim: Claim,
    pub outcome: Outcome,
}

/// The per-item answer of `complete_batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionResult {
    Applied,
    /// The source sent a newer payload while this generation was in flight; the completion was dropped and
    /// the newer generation will be delivered instead.
    Superseded {
        current_generation: i64,
    },
    /// The lease was taken over by another claim (or the record is no longer delivering); the completion
    /// was refused so it cannot overwrite the new owner's result.
    LeaseLost,
    NotFound,
}

/// A lineage event the worker adds for a step the ledger does not see itself (validated, mapped, request).
#[derive(Clone, Debug, PartialEq)]
pub struct NewLineageEvent {
    pub record: RecordId,
    pub step: String,
    pub detail: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LineageEvent {
    pub at: DateTime<Utc>,
    pub generation: i64,
    pub step: String,
    pub detail: Value,
    pub correlation_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub generation: i64,
    /// `received` (at ingest) or `dead_lettered` (kept with the dead letter).
    pub kind: String,
    pub at: DateTime<Utc>,
    pub body: Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Intervention {
    pub record: Option<RecordId>,
    /// `approve`, `reject` or `replay`.
    pub action: String,
    pub actor: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// What an approver checked of a held record before deciding on it: the generation they looked at and the
/// approver role the hold asked for. [`crate::ledger::Ledger::approve_held`] and
/// [`crate::ledger::Ledger::reject_held`] apply the decision only while the record is still exactly that, in
/// the transaction that applies it: a newer generation may arrive between the check and the decision and be
/// held again under another role, and a decision on what the approver never saw would be forged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldAsSeen {
    pub generation: i64,
    pub hold_role: Option<String>,
}

impl HeldAsSeen {
    /// What a caller saw in `record`.
    pub fn of(record: &RecordView) -> HeldAsSeen {
        HeldAsSeen {
            generation: record.generation,
            hold_role: record.hold_role.clone(),
        }
    }
}

/// The current row of one record (without lineage).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordView {
    pub id: RecordId,
    pub flow: String,
    pub source_key: String,
    pub idempotency_key: String,
    pub external_id: Option<String>,
    pub generation: i64,
    pub payload: Value,
    pub payload_hash: String,
    pub contract_version: String,
    pub state: RecordState,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_class: Option<ErrorClass>,
    pub dead_letter_reason: Option<String>,
    pub erp_response: Option<String>,
    pub hold_rule: Option<String>,
    pub hold_role: Option<String>,
    pub approved_by: Option<String>,
    pub bucket: u8,
    pub correlation_id: String,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub first_failure_at: Option<DateTime<Utc>>,
    /// Set once a delivered record was reduced to its compact row after the delivered retention: a
    /// one-line outcome in place of the payload (then `null`), snapshots and lineage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// One record with its whole story.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordDetail {
    pub record: RecordView,
    pub lineage: Vec<LineageEvent>,
    pub snapshots: Vec<Snapshot>,
    pub interventions: Vec<Intervention>,
}

/// Counters computed from the ledger's rows, so they survive restarts and agree across replicas.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Distinct records (source keys) in the ledger.
    pub records: u64,
    /// Record versions received: every new record plus every changed payload (duplicates excluded).
    pub received: u64,
    pub delivered: u64,
    /// Records of the current generation that failed at least once (retried or dead-lettered).
    pub failed: u64,
    /// Retries scheduled, all time.
    pub retried: u64,
    pub dead_lettered: u64,
    pub held: u64,
    /// Late revisions refused because a newer one (by the contract's ordering field) was already stored.
    pub stale: u64,
    /// Received, validated, retry-scheduled or delivering.
    pub pending: u64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub last_delivery_at: Option<DateTime<Utc>>,
    /// Mean of (delivered_at − first_failure_at) over delivered records that had failed first.
    pub mttr_seconds: Option<f64>,
    pub manual_interventions: u64,
    /// Manual interventions per 1,000 records (0 when the ledger is empty).
    pub interventions_per_1000: f64,
    /// Record versions received in the last hour (the failure-rate window), counted per minute as they
    /// happened.
    pub received_last_hour: u64,
    /// Records that failed for the first time (in their current generation) in the last hour.
    pub failed_last_hour: u64,
    /// Dead letters purged after the flow's `deadLetterRetention`, all time. A purged dead letter leaves
    /// the ledger, and with it every count above.
    pub dead_letters_purged: u64,
    /// Delivered records whose payload, snapshots and lineage were purged after the delivered retention,
    /// all time. Their compact rows remain (and count above), so duplicates are still recognised.
    pub payloads_purged: u64,
}

/// How long the ledger keeps what it no longer needs, from the flow's spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Dead letters not touched for this long are purged whole (`None`: kept until replayed).
    pub dead_letters: Option<std::time::Duration>,
    /// Delivered records keep their payload, snapshots and lineage this long after delivery, then only a
    /// compact row (`None`: kept for ever).
    pub delivered: Option<std::time::Duration>,
    /// Resolved tickets are deleted this long after they resolved (`None`: kept for ever); see
    /// [`crate::ledger::Ledger::purge_tickets`].
    pub resolved_tickets: Option<std::time::Duration>,
}

/// What one purge batch removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    pub dead_letters: u64,
    /// Delivered records reduced to their compact row.
    pub payloads: u64,
}

impl PurgeReport {
    pub fn is_empty(&self) -> bool {
        self.dead_letters == 0 && self.payloads == 0
    }
}

/// Where the ledger gets "now". Tests use [`ManualClock`] to expire leases without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch, UTC.
    fn now_ms(&self) -> i64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    pub fn starting_at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: AtomicI64::new(ms),
        })
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.now.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

pub(crate) fn to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_hash_is_stable_across_versions() {
        // Pinned values: changing the hash would move every record to another track mid-canary.
        assert_eq!(bucket_of("006A000000abcde"), bucket_of("006A000000abcde"));
        let digest = Sha256::digest(b"opportunity-1");
        let expected = u64::from_be_bytes(digest[..8].try_into().unwrap()) % 100;
        assert_eq!(u64::from(bucket_of("opportunity-1")), expected);
    }

    /// The canonical form written the slow, obvious way: keys sorted at every level.
    fn write_canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write_canonical(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_canonical(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }

    #[test]
    fn serialised_payloads_are_canonical_so_their_hash_is_the_canonical_hash() {
        let samples = [
            r#"{"z":1,"a":{"y":[3,{"q":"é\"","b":null}],"x":1.5e3},"m":true,"Z":-0.0,"é":"\u0001"}"#,
            r#"[{"b":2,"a":1},{"d":{"c":{"b":{"a":[]}}}}]"#,
            r#"{"amount":"12.50","lineItems":[{"sku":"A","quantity":2},{"quantity":1,"sku":"B"}]}"#,
        ];
        for text in samples {
            let value: Value = serde_json::from_str(text).unwrap();
            let mut canonical = String::new();
            write_canonical(&value, &mut canonical);
            assert_eq!(value.to_string(), canonical, "{text}");
            assert_eq!(json_text(&value), canonical, "{text}");
            assert_eq!(
                payload_hash(&value),
                hex::encode(Sha256::digest(canonical.as_bytes()))
            );
        }
    }

    #[test]
    fn payload_hash_ignores_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"a":1,"b":{"y":2,"x":[1,{"q":1,"p":2}]}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"b":{"x":[1,{"p":2,"q":1}],"y":2},"a":1}"#).unwrap();
        assert_eq!(payload_hash(&a), payload_hash(&b));
        let c: Value =
            serde_json::from_str(r#"{"a":2,"b":{"y":2,"x":[1,{"q":1,"p":2}]}}"#).unwrap();
        assert_ne!(payload_hash(&a), payload_hash(&c));
    }

    #[test]
    fn illegal_transitions_are_rejected_by_the_graph() {
        assert!(RecordState::Received.can_transition_to(RecordState::Validated));
        assert!(RecordState::Delivering.can_transition_to(RecordState::Delivered));
        assert!(!RecordState::Delivered.can_transition_to(RecordState::Delivering));
        assert!(!RecordState::Held.can_transition_to(RecordState::Delivered));
        assert!(!RecordState::DeadLettered.can_transition_to(RecordState::Delivered));
        for state in RecordState::ALL {
            assert_eq!(RecordState::parse(state.as_str()), Some(state));
        }
    }

    #[test]
    fn bucket_ranges_split_canary_and_stable() {
        let canary = BucketSet::range(0..10);
        let stable = BucketSet::range(10..100);
        for b in 0..100 {
            assert!(canary.contains(b) ^ stable.contains(b));
        }
        assert_eq!(BucketSet::all().iter().count(), 100);
    }
}

/// The most records one [`crate::ledger::Ledger::recent_inputs`] call returns: the preflight replay's bound
/// (`spec.rollout.preflightRecords` allows at most this many), so a replay's memory stays bounded.
pub const MAX_REPLAY_RECORDS: usize = 100_000;

/// A record's current source payload, as the contract evaluates it: what a preflight replay runs through the
/// active and the candidate contract. The payload is the exact text the source sent (not re-serialised JSON),
/// so the replay parses the same bytes the worker did, duplicate keys and long decimals included.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayRecord {
    pub id: RecordId,
    pub source_key: String,
    pub state: RecordState,
    /// The contract version that was current when this payload was received.
    pub contract_version: String,
    pub payload: String,
}

/// Upper bounds (inclusive, milliseconds) of the delivery-latency histogram a revision's window keeps; a
/// last bucket (`+inf`, [`u64::MAX`] in [`RevisionMeasures::latency`]) takes the rest. Log-scale, so one
/// fixed set serves an ERP that answers in 20 ms and one that answers in 20 s. Fixed: the window stores one
/// column per bucket, so changing them is a schema migration.
pub const LATENCY_BOUNDS_MS: [u64; 13] = [
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
];

/// What one contract revision's workers did with records over a time window, read from the ledger's
/// per-revision window (exact: written in the completions' own transactions, so it survives restarts and
/// counts every replica of the revision). What canary analysis compares between the two tracks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RevisionMeasures {
    /// Completions that reached an outcome: delivered, retry scheduled, dead-lettered or held (a release
    /// is not an outcome). A record retried twice and then delivered counts three times.
    pub records: u64,
    pub delivered: u64,
    /// Failed attempts: retries scheduled plus dead letters.
    pub failed: u64,
    pub dead_lettered: u64,
    pub held: u64,
    /// Deliveries per latency bucket, `(upper bound in ms, count)` in bound order, [`u64::MAX`] for `+inf`;
    /// every bucket is listed, empty ones with 0. Latency is delivery time minus the receipt of the
    /// record's current generation.
    pub latency: Vec<(u64, u64)>,
    /// The upper bound of the latency bucket holding the 99th percentile delivery (`i64::MAX` when that is
    /// the `+inf` bucket); `None` without deliveries.
    pub p99_ms: Option<i64>,
}

// ---- tickets (issue #16): the durable exception aggregate and its outbox --------------------------------

/// A flow-level cause the worker saw (breaker open, status unavailable, SLA breached, a rejected contract
/// candidate): [`crate::ledger::Ledger::raise_exception`] opens its ticket or counts one more occurrence.
/// Dead letters and holds need no call: the completions that make them open their tickets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaisedException {
    pub kind: crate::tickets::ExceptionKind,
    pub class: Option<ErrorClass>,
    /// The cause's key (`breaker_open`, `sla_breached`), never a message: it is what the fingerprint hashes.
    pub reason: String,
    pub rule: Option<String>,
    /// One line for a person, already redacted.
    pub summary: String,
}

/// Who a ticket is routed to and where it is sent, as the dispatcher decided from the roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TicketAssignment {
    pub role: crate::api::OwnerRole,
    /// The roster's owner id.
    pub owner: String,
    /// The roster's ticket sink names this ticket goes to.
    pub sinks: Vec<String>,
    /// 0 before any escalation; n after the n-th step of the ladder.
    pub escalation_step: u32,
    pub page: bool,
}

/// One ticket as the ledger keeps it: one per flow and cause.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TicketRecord {
    pub fingerprint: String,
    pub kind: crate::tickets::ExceptionKind,
    pub class: Option<ErrorClass>,
    pub reason: String,
    pub rule: Option<String>,
    pub summary: String,
    pub state: crate::tickets::TicketState,
    /// Occurrences since the ticket (re)opened.
    pub count: u64,
    /// Dead letters or holds still attached to the ticket (as of the last completion touching it or the last
    /// [`crate::ledger::Ledger::settle_tickets`]); 1 for an open flow-level cause.
    pub outstanding: u64,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// How many times a resolved cause came back.
    pub reopened: u64,
    /// The latest records behind it, newest first, at most [`crate::ledger::TICKET_EXAMPLES`].
    pub examples: Vec<crate::tickets::Example>,
    pub assignment: Option<TicketAssignment>,
    /// Bumped on every change a sink should see; a sink is in sync when it was sent this version.
    pub version: i64,
}

/// One (ticket, sink) pair whose sink has not been sent the ticket's current version.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DueDelivery {
    pub ticket: TicketRecord,
    pub sink: String,
    /// What the sink answered to the last delivery that succeeded (its issue key, message ts, dedup key):
    /// present means update the sink's ticket, absent means create it.
    pub previous: Option<Value>,
    /// A send began and neither finished nor failed (the process died mid-send): the sink may or may not
    /// have the ticket, so the sender must look before it creates another.
    pub in_doubt: bool,
    /// The version whose send is in doubt (the `in_doubt` column keeps it; 0 is none). The ticket may have
    /// moved on since, and a sink that got that version must not be sent a second first version.
    pub in_doubt_version: Option<i64>,
    /// Consecutive failed attempts.
    pub attempts: u32,
}

/// How one ticket sink is doing, for the roster's condition and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TicketSinkHealth {
    pub sink: String,
    /// Tickets this sink has not been sent the current version of.
    pub pending: u64,
    /// Failed attempts not yet followed by a success, summed over its tickets (a delivery that succeeds
    /// starts its count again).
    pub consecutive_failures: u32,
    /// Since when it has been failing (the oldest unresolved failure).
    pub failing_since: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// The HTTP status of a refusal (a 4xx other than 408 and 429) not yet followed by a success on that
    /// delivery: the sink is failing from this one answer, as retries will not fix it.
    pub refused: Option<u16>,
}

/// The flow's tickets as a whole, exact over every occurrence whoever had it (including those nobody was
/// assigned yet). Not a sum of [`OwnerTicketMeasures`]: an owner's `opened` counts an occurrence when it is
/// first assigned, so the owners' figures leave out what was never assigned and cannot be added up.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FlowTicketMeasures {
    /// Occurrences opened, all time: each ticket's first opening and every reopening (purged tickets'
    /// included).
    pub opened: u64,
    /// Occurrences acknowledged and resolved, all time.
    pub acknowledged: u64,
    pub resolved: u64,
    /// Tickets open or acknowledged now, and of those the acknowledged.
    pub open: u64,
    pub acknowledged_now: u64,
    /// Means over the acknowledged (resolved) occurrences, in seconds.
    pub mean_time_to_acknowledge_seconds: Option<f64>,
    pub mean_time_to_resolve_seconds: Option<f64>,
}

/// How fast one owner's tickets were acknowledged and resolved, exact over every occurrence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OwnerTicketMeasures {
    /// The roster's owner id; empty for tickets acknowledged or resolved before anyone was assigned.
    pub owner: String,
    /// Ticket occurrences first assigned to this owner.
    pub opened: u64,
    pub acknowledged: u64,
    pub resolved: u64,
    /// Tickets assigned to this owner and not resolved now.
    pub open: u64,
    pub mean_time_to_acknowledge_seconds: Option<f64>,
    pub mean_time_to_resolve_seconds: Option<f64>,
}
