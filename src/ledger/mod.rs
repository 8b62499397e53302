//! The durable ledger: the one place where a flow's records, their lineage, payload snapshots, source
//! checkpoints and manual interventions live. The worker commits a record here before it acknowledges the CRM
//! or advances a poll checkpoint, claims work from here under a lease, and reports every outcome here; the
//! counts on `/status` are kept here, so they survive restarts.
//!
//! **Counters.** Triggers (schema version 4) add every change of a record's row to `ledger_counters` in the
//! transaction that makes it, and count events per minute in `ledger_window`, so [`Ledger::counts`] reads a
//! few dozen rows whatever the size of the ledger and always equals [`Ledger::recount`], the aggregate over
//! every record. Counters of events that change no record row (purges, and e.g. stale revisions) are bumped
//! by name with the backends' `bump_counter`; a new one is a name there and a field in [`Counts`].
//!
//! **Per-revision window.** A worker's handle is attributed to the contract revision it runs
//! ([`Ledger::attribute_to`]); each completion batch then adds its outcomes and a delivery-latency histogram
//! to that revision's 10-second slot in `revision_window` (schema version 7), in the batch's own transaction
//! and as one upsert. [`Ledger::revision_measures`] sums a window's slots: what a canary's analysis compares
//! between the tracks. [`Ledger::release_leases`] hands a gone track's leases back, fenced.
//!
//! **Tickets** (schema version 8, `tickets`): one row per flow and cause, opened and counted by the
//! completions that dead-letter or hold records, in their own transaction (one upsert per cause per batch),
//! with each such record attached to its ticket (`records.ticket`) until it is delivered or fails for another
//! cause; [`Ledger::settle_tickets`] resolves a cause with nothing left attached. Flow-level causes are raised
//! and cleared by the worker. The per-sink outbox and the per-owner times live beside them.
//!
//! **Retention.** [`Ledger::purge`] removes, a small batch per call, dead letters past the flow's
//! `deadLetterRetention` and the payload, snapshots and lineage of records delivered longer ago than the
//! delivered retention. A purged delivered record keeps a compact row (idempotency key, payload hash, state,
//! a one-line `outcome`), so a duplicate is still recognised and a changed payload is still an update.
//!
//! It owns durability, idempotency (idempotency key + payload hash), the lifecycle state machine, lease
//! fencing and bucketed claiming. It does not run the contract, talk to a CRM or ERP, or redact anything (it
//! stores snapshots exactly as given).
//!
//! **Payloads and snapshots.** A record's current payload lives in `payloads`, written once per generation,
//! so the claims and completions that rewrite the record's row do not copy it. A redacted snapshot is stored
//! when a record leaves the happy path (held or dead-lettered), which is when a person reads it and when the
//! payload may later be replaced by an update; the operations API shows any record's payload through the
//! contract's redaction at read time.
//!
//! Two backends implement [`Ledger`]:
//! - [`SqliteLedger`] (`sqlite`): embedded, WAL, the default for one replica and for local use.
//! - [`PostgresLedger`] (`postgres`): several replicas of one flow; claims use `FOR UPDATE SKIP LOCKED`.
//!
//! **Why a boxed-future (object-safe) trait.** The backend is chosen at run time from the flow's `ledger`
//! setting, and the worker, the HTTP API and the CLI share one `Arc<dyn Ledger>`. Every call is batched (500
//! records a call in the worker), so the one allocation per call that `async_trait` costs is noise next to a
//! database round trip, and a generic worker would compile the whole pipeline twice for nothing.
//!
//! **Identity and generations.** A record is one row per (flow, idempotency key); its id never changes. A
//! changed payload bumps `generation`, resets the record to `received` and keeps any live lease in place, so
//! the older generation can never be claimed concurrently with the newer one: the stale holder's completion is
//! refused as [`CompletionResult::Superseded`] (and releases the lease), or the lease expires.
//!
//! **Ordering of revisions.** When the contract declares an ordering field, each incoming revision carries
//! its value ([`IncomingRecord::ordering`]) and each record keeps the value of its current revision. A
//! changed payload whose value is *below* the stored one is a late revision (webhooks arrive out of order,
//! outbound messages are retried for hours): it is [`IngestOutcome::Stale`], written to the lineage as step
//! `stale` with both values and counted in [`Counts::stale`], and the stored revision stays current, so it is
//! never delivered. An *equal* value with a different payload is applied as an update in arrival order and
//! flagged in the lineage as `ordering_tie`: the source says the two are equally new, and refusing the later
//! one could leave the ERP without an edit forever, whereas applying it leaves the ERP with the last thing the
//! CRM sent (and the flag tells a reviewer where to look). A revision without a value, or a record stored
//! before its contract declared ordering, falls back to arrival order; the stored value is never lowered.
//!
//! **Fencing.** Every claim increments the record's `fence`. A completion must present the generation and the
//! fence it claimed with; once another worker has claimed the record (after the lease expired), the old holder
//! gets [`CompletionResult::LeaseLost`] and cannot overwrite the new owner's result. A holder whose lease has
//! expired but that nobody has claimed again may still complete: no one else can have acted on the record.
//! The lease bounds how long a delivery may take; the worker must time out its ERP call well inside it.
//!
//! **Replay.** [`Ledger::recent_inputs`] reads the newest records' source payloads for the preflight replay of a
//! contract change (`crate::rollout::replay`); the operations API serves the same to a replay Job when the
//! ledger is embedded (`GET /records/recent`).
//!
//! **Time** is stored as milliseconds since the Unix epoch (UTC) in 64-bit integers on both backends, read
//! from an injectable [`Clock`], so lease expiry is testable without sleeping.

/// SQLite's test of "a state a record waits in", as comparisons: SQLite codes `x IN (a, b, c)` of three or
/// more constants as a temporary index built each time the statement runs (a page cache and a zeroed page
/// apiece), and the counter triggers and partial indexes ran that test several times for every record
/// written, about a tenth of the worker's instructions under load. Queries repeat it word for word, so the
/// planner can still use the partial indexes defined with it.
macro_rules! sqlite_pending {
    ($row:literal) => {
        concat!(
            "(",
            $row,
            "state = 'received' OR ",
            $row,
            "state = 'validated' OR ",
            $row,
            "state = 'retry_scheduled' OR ",
            $row,
            "state = 'delivering')"
        )
    };
    () => {
        sqlite_pending!("")
    };
}

mod audit;
mod error;
mod postgres;
mod schema;
mod sqlite;
mod tickets;
mod types;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

pub use audit::{
    AUDIT_FACTS_CHUNK, AUDIT_RUNS_KEPT, AuditRecordFacts, AuditRun, AuditRunState, AuditSide,
    AuditSideProgress,
};
pub use error::{BackendError, LedgerError, Result};
pub use postgres::PostgresLedger;
pub use schema::{SCHEMA_VERSION, migration_statements};
pub use sqlite::SqliteLedger;
pub use tickets::{
    MAX_TICKETS_PER_READ, TICKET_EXAMPLES, TICKET_SEND_LEASE_MS, TICKET_SNAPSHOT_BYTES,
    TICKET_TEXT_BYTES,
};
pub use types::*;

use crate::api::ErrorClass;

/// Operations the worker, the operations API and the CLI need from a flow's ledger. One handle is bound to
/// one flow; every operation is scoped to it.
#[async_trait]
pub trait Ledger: Send + Sync + fmt::Debug {
    /// The flow this handle is bound to.
    fn flow(&self) -> &str;

    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Stores a batch in one transaction (one fsync), returning one outcome per input in order. Only after
    /// this returns may the source acknowledge the batch.
    async fn ingest(&self, batch: Vec<IncomingRecord>) -> Result<Vec<IngestOutcome>>;

    /// How many ingest transactions the worker's intake may have in flight at once. A backend with one
    /// writer (SQLite) takes one at a time; PostgreSQL commits several side by side, so a group's round
    /// trips and WAL flush no longer stall every other webhook behind it (see `worker::intake`).
    fn ingest_writers(&self) -> usize {
        1
    }

    /// Like [`Ledger::ingest`], and sets the source's checkpoint in the same transaction, so a poll
    /// checkpoint never advances past records that are not stored (and never lags records that are).
    async fn ingest_with_checkpoint(
        &self,
        batch: Vec<IncomingRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<Vec<IngestOutcome>>;

    /// Like [`Ledger::ingest`], and in the same transaction leases up to `lease.limit` of the records it
    /// newly stores (those in `lease.buckets`) to `lease.worker`, returning them as [`Ledger::claim`] would:
    /// a worker that can deliver them at once skips a claim's round of the ledger. Updates and duplicates
    /// are never leased here. A backend without this path stores the batch and leases nothing, and the
    /// records are claimed as usual.
    async fn ingest_and_claim(
        &self,
        batch: Vec<IncomingRecord>,
        lease: &LeaseRequest,
    ) -> Result<(Vec<IngestOutcome>, Vec<ClaimedRecord>)> {
        let _ = lease;
        Ok((self.ingest(batch).await?, Vec::new()))
    }

    /// The opaque checkpoint last stored for a source of this flow.
    async fn checkpoint(&self, source: &str) -> Result<Option<String>>;

    async fn set_checkpoint(&self, source: &str, value: &str) -> Result<()>;

    /// Claims up to `limit` due records in `buckets`: those received, validated or retry-scheduled whose
    /// next attempt time has passed and that hold no live lease, and those delivering whose lease expired.
    /// They become `delivering`, leased to `worker` for `lease`.
    async fn claim(
        &self,
        worker: &str,
        buckets: &BucketSet,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedRecord>>;

    /// Reports the outcomes of claims in one transaction; one result per input, in order. Refused
    /// completions (superseded, lease lost) change nothing but are recorded in lineage.
    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<CompletionResult>>;

    /// Reports one outcome; a refused completion is an error ([`LedgerError::Superseded`],
    /// [`LedgerError::LeaseLost`], [`LedgerError::NotFound`]).
    async fn complete(&self, claim: Claim, outcome: Outcome) -> Result<()> {
        let results = self
            .complete_batch(vec![Completion { claim, outcome }])
            .await?;
        let flow = self.flow().to_string();
        match results.first().copied() {
            Some(CompletionResult::Applied) => Ok(()),
            Some(CompletionResult::Superseded { current_generation }) => {
                Err(LedgerError::Superseded {
                    flow,
                    record: claim.id,
                    generation: claim.generation,
                    current: current_generation,
                })
            }
            Some(CompletionResult::LeaseLost) => Err(LedgerError::LeaseLost {
                flow,
                record: claim.id,
                fence: claim.fence,
            }),
            Some(CompletionResult::NotFound) | None => Err(LedgerError::NotFound {
                flow,
                record: claim.id,
            }),
        }
    }

    /// Adds the worker's own steps (validated, mapped, request sent) to records' lineage, in one transaction.
    async fn append_lineage(&self, events: Vec<NewLineageEvent>) -> Result<()>;

    /// A held record was approved: it becomes `validated` (and remembers the approver), recorded as a
    /// manual intervention. Only while the record is still the generation and hold role the approver
    /// checked (`seen`), tested in the transaction that applies it; otherwise nothing changes and the answer
    /// is [`LedgerError::HoldChanged`] (or [`LedgerError::IllegalTransition`] when it is no longer held).
    async fn approve_held(
        &self,
        id: RecordId,
        seen: &HeldAsSeen,
        actor: &str,
        reason: &str,
    ) -> Result<()>;

    /// A held record was rejected: it becomes a dead letter, recorded as a manual intervention. Conditional
    /// on `seen` as [`Ledger::approve_held`] is.
    async fn reject_held(
        &self,
        id: RecordId,
        seen: &HeldAsSeen,
        actor: &str,
        reason: &str,
    ) -> Result<()>;

    /// Sends one dead letter back to `validated`, recorded as a manual intervention.
    async fn replay_dead_letter(&self, id: RecordId, actor: &str, reason: &str) -> Result<()>;

    /// Sends every dead letter whose reason is exactly `dead_letter_reason` back to `validated`, one
    /// intervention per record, in one transaction. Returns the records replayed.
    async fn replay_dead_letters_by_reason(
        &self,
        dead_letter_reason: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<RecordId>>;

    /// One record with its lineage, snapshots and interventions.
    async fn get(&self, id: RecordId) -> Result<Option<RecordDetail>>;

    /// Records in `state`, by id, after `after` (for paging the dead letters and the holds). With `reason`,
    /// only those whose dead-letter reason is exactly it: filtered in the query, so a page of `limit` holds
    /// `limit` matches and paging by reason reaches every one.
    async fn list(
        &self,
        state: RecordState,
        reason: Option<&str>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<RecordView>>;

    /// The current source payloads of the flow's `limit` most recently stored records, newest first (by
    /// record id, i.e. the order in which records were first stored; an update keeps its record's place).
    /// What the preflight replay evaluates. Only records that still have their payload are replayable:
    /// records delivered longer ago than the delivered retention are reduced to compact rows (and purged dead
    /// letters are gone), so they are skipped and do not count against `limit`. `limit` is at most
    /// [`MAX_REPLAY_RECORDS`]. The read walks the payloads' primary key (the record id) backwards, and only
    /// kept records have a payload row, so it costs the rows it returns, not the flow's history.
    async fn recent_inputs(&self, limit: usize) -> Result<Vec<ReplayRecord>>;

    /// The flow's counters, kept in the ledger in the transactions that change the records: a read of a
    /// few rows whatever the ledger's size (what `/status` asks on every call).
    async fn counts(&self) -> Result<Counts>;

    /// The same figures aggregated over every record of the flow, the slow way, to check the kept counters
    /// (tests, and a person debugging a ledger). The event counts (the last hour's window, the purges) have
    /// no rows to recount and are read as kept.
    async fn recount(&self) -> Result<Counts>;

    /// Purges one batch of at most `limit` dead letters past `retention.dead_letters` and reduces at most
    /// `limit` records delivered longer ago than `retention.delivered` to their compact rows, in short
    /// transactions of their own; also drops event minutes older than the failure-rate window. Call it
    /// again while it reports something purged (yielding in between, so intake is never held up).
    async fn purge(&self, retention: &Retention, limit: usize) -> Result<PurgeReport>;

    /// Records waiting (received, validated, retrying or delivering) and the receipt time (ms) of the oldest.
    /// Read through the pending-records index, so it costs what the backlog costs, not the flow's history:
    /// this is what every metrics scrape asks.
    async fn backlog(&self) -> Result<(u64, Option<i64>)>;

    /// Whether this backend shares the flow's delivery concurrency between replicas through delivery slots
    /// ([`Ledger::acquire_delivery_slots`]): PostgreSQL, where several replicas deliver one flow. SQLite serves
    /// one replica, whose own semaphore is the limit.
    fn shares_delivery_slots(&self) -> bool {
        false
    }

    /// Leases up to `want` of the flow's `limit` delivery slots to `holder` until `lease` from now: free slots
    /// and slots whose holder's lease ran out (a replica that died holding them). Returns the slots taken, none
    /// when other replicas hold them all. Slots numbered `limit` or above (left by a larger, older limit) are
    /// never handed out.
    async fn acquire_delivery_slots(
        &self,
        holder: &str,
        limit: u32,
        want: usize,
        lease: Duration,
    ) -> Result<Vec<i64>> {
        let _ = (holder, limit, want, lease);
        Err(self.no_delivery_slots())
    }

    /// Extends `holder`'s lease on `slots` to `lease` from now; returns the slots it still holds (a slot
    /// whose lease lapsed and that another replica took is not among them).
    async fn renew_delivery_slots(
        &self,
        holder: &str,
        slots: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>> {
        let _ = (holder, slots, lease);
        Err(self.no_delivery_slots())
    }

    /// Gives `holder`'s `slots` back, so any replica may take them.
    async fn release_delivery_slots(&self, holder: &str, slots: &[i64]) -> Result<()> {
        let _ = (holder, slots);
        Err(self.no_delivery_slots())
    }

    /// Gives back every slot `holder` holds. A worker calls it as it starts: worker ids are pod names, so a
    /// holder of that name is this replica's previous process (killed before it could release), and its
    /// slots would otherwise block deliveries until their leases lapse.
    async fn reclaim_delivery_slots(&self, holder: &str) -> Result<u64> {
        let _ = holder;
        Err(self.no_delivery_slots())
    }

    #[doc(hidden)]
    fn no_delivery_slots(&self) -> LedgerError {
        LedgerError::InvalidInput {
            flow: self.flow().to_string(),
            what: format!(
                "the {} ledger serves one replica and shares no delivery slots",
                self.backend()
            ),
        }
    }

    /// Attributes every completion this handle writes from now on to the contract `revision` its worker
    /// runs, in the per-revision window that [`Ledger::revision_measures`] reads. Set once, right after
    /// opening: the handle is the worker's, and a worker runs one revision for its whole life (a new
    /// revision is a new pod). Setting the same revision again is a no-op; another one, or an empty one, is
    /// refused. A handle without a revision (the CLI, a replay Job) writes no window rows.
    ///
    /// Per handle, not per process: `meshline dev` runs both tracks in one process, each with its own handle
    /// on the same ledger.
    fn attribute_to(&self, revision: &str) -> Result<()>;

    /// The revision this handle's completions are attributed to, once [`Ledger::attribute_to`] set it.
    fn revision(&self) -> Option<&str>;

    /// What the workers of `revision` did in `[since, until)`, summed over every replica (and both tracks,
    /// should both ever run it). The window is kept in 10-second slots ([`REVISION_SLOT_MS`]); a slot counts
    /// when it starts inside the window, so bounds on slot boundaries are exact. Reads only the window's
    /// rows (a primary-key range), whatever the size of the ledger.
    async fn revision_measures(
        &self,
        revision: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<RevisionMeasures>;

    /// Gives back every lease held by a worker whose id starts with `owner_prefix` (the canary's pods,
    /// `meshline-<flow>-canary-`, once they are gone): each such record returns to the state it was claimed
    /// from, claimable now, and its fence goes up, so the old holder's late completion is refused as
    /// [`CompletionResult::LeaseLost`]. Returns the records released. An empty prefix (every worker) is
    /// refused.
    async fn release_leases(&self, owner_prefix: &str) -> Result<u64>;

    // ---- tickets (issue #16; see the `tickets` module) ----------------------------------------------------
    //
    // Dead letters and holds open and count their tickets inside `complete_batch` (and a rejected hold inside
    // `reject_held`): each applied completion that dead-letters or holds a record upserts its cause's ticket
    // (count, outstanding, the newest examples, a reopen if it was resolved) and attaches the record to it
    // (`records.ticket`); a delivery detaches it in the same row update. Everything else is these calls.

    /// A flow-level cause (breaker open, SLA breached, ...): opens its ticket, counts one more occurrence on an
    /// open one, or reopens a resolved one. Returns the fingerprint. An empty reason is refused.
    async fn raise_exception(&self, exception: RaisedException) -> Result<String>;

    /// The cause cleared: resolves the ticket (version + 1). `false` when it was already resolved or is
    /// unknown (a cause that clears is no error, whether or not it was ever raised).
    async fn clear_exception(&self, fingerprint: &str) -> Result<bool>;

    /// Refreshes the outstanding count of the open dead-letter and hold tickets from the records attached to
    /// them (version + 1 only when it changed) and resolves those with none left; returns the resolved
    /// fingerprints. What makes a replayed-and-delivered reason, or decided holds, resolve their ticket.
    /// Reads at most [`MAX_TICKETS_PER_READ`] tickets, least recently updated first; call it periodically.
    async fn settle_tickets(&self) -> Result<Vec<String>>;

    /// Tickets, most recently updated first; `open_only` leaves out the resolved. `limit` is capped at
    /// [`MAX_TICKETS_PER_READ`].
    async fn tickets(&self, open_only: bool, limit: usize) -> Result<Vec<TicketRecord>>;

    async fn ticket(&self, fingerprint: &str) -> Result<Option<TicketRecord>>;

    /// Routes a ticket to an owner and sinks (version + 1 only when the assignment changed), and makes the
    /// outbox rows for sinks it did not have. The first owner of an occurrence counts it as opened in
    /// [`Ledger::ticket_measures`]. [`LedgerError::TicketNotFound`] for an unknown fingerprint.
    async fn assign_ticket(&self, fingerprint: &str, assignment: &TicketAssignment)
    -> Result<bool>;

    /// An owner acknowledged an open ticket (open → acknowledged; escalation stops). `false` when it was not
    /// open. [`LedgerError::TicketNotFound`] for an unknown fingerprint.
    async fn acknowledge_ticket(&self, fingerprint: &str, by: &str) -> Result<bool>;

    /// The outbox: every (ticket, sink of its assignment) whose sink has not been sent the ticket's current
    /// version and whose next attempt is due at `now`, least recently updated ticket first, at most `limit`
    /// (capped at [`MAX_TICKETS_PER_READ`]).
    async fn ticket_deliveries_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueDelivery>>;

    /// Marks a delivery in doubt, durably, before the send: should the process die mid-send, the next
    /// sender knows the sink may already have this version. Also keeps the pair from being due for `lease`
    /// (the worker's claim lease, [`TICKET_SEND_LEASE_MS`] by default), so a second dispatcher does not send
    /// it concurrently; a sender killed mid-send leaves it to the next one once that lease is over.
    async fn begin_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        version: i64,
        lease: std::time::Duration,
    ) -> Result<()>;

    /// The sink has `version` (never lowers what it had): clears the doubt and the failures and keeps the
    /// sink's answer (`sink_ref`: its issue key, message id, dedup key) for the next update.
    async fn finish_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        version: i64,
        sink_ref: Value,
    ) -> Result<()>;

    /// The send failed: one more consecutive failure, the first failure's time kept, due again at
    /// `next_attempt_at` (the dispatcher's backoff). `refused` is the HTTP status when the sink refused the
    /// ticket (a 4xx other than 408 and 429: its configuration or permissions, which no retry fixes); the
    /// sink then counts as failing at once ([`TicketSinkHealth::refused`]) until a send to it succeeds.
    async fn fail_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        error: &str,
        refused: Option<u16>,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<()>;

    /// Per sink: tickets waiting for it and how long it has been failing (a sink that keeps failing is
    /// itself reported: roster condition, Event, metric).
    async fn ticket_sink_health(&self) -> Result<Vec<TicketSinkHealth>>;

    /// Deletes at most `limit` tickets resolved longer than `older_than` ago, with their outbox rows, in one
    /// transaction; returns their fingerprints. Never an open or acknowledged ticket, never one that a sink of
    /// its assignment has not been sent the current version of (the resolution still has to reach it), never
    /// one a record is still attached to. The measures keep the purged tickets' occurrences: the per-owner
    /// sums live apart from the tickets, and the flow's count of occurrences is kept as a counter. Should
    /// the cause come back, it opens a new ticket (version 1), so the sinks open a new issue for it.
    async fn purge_tickets(&self, older_than: Duration, limit: usize) -> Result<Vec<String>>;

    /// Per owner (the assignment's owner when a ticket was acknowledged or resolved): occurrences opened,
    /// acknowledged and resolved, open now, and the exact mean times to acknowledge and to resolve.
    async fn ticket_measures(&self) -> Result<Vec<OwnerTicketMeasures>>;

    /// The flow's tickets as a whole, exact over every occurrence (see [`FlowTicketMeasures`]): what `/status`,
    /// `/metrics` and the roster's totals report for the flow, instead of adding up the owners' figures.
    async fn ticket_flow_measures(&self) -> Result<FlowTicketMeasures>;

    // ---- reconciliation audit (issue #17; see the `audit` module) ------------------------------------------

    /// Starts an audit run over `[window_from, window_to)` (ms) leased to `owner` for `lease`, or returns the
    /// run already running (unchanged, whoever holds it). The flag is true when this call started it.
    async fn audit_start(
        &self,
        window_from: i64,
        window_to: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<(AuditRun, bool)>;

    /// Takes run `id`'s lease for `owner` until `lease` from now: granted while the run is running and its
    /// lease is free, lapsed, or already `owner`'s. `None` when another worker holds a live lease, or the run
    /// is finished. [`LedgerError::AuditRunNotFound`] for an unknown run.
    async fn audit_lease(&self, id: i64, owner: &str, lease: Duration) -> Result<Option<AuditRun>>;

    /// Stores one page of `side` with the cursor after it (`next`; `None`: the side is read in full) in one
    /// transaction, renewing the lease. Refused with [`LedgerError::AuditLeaseLost`] (nothing stored) unless
    /// `owner` holds the lease; a page of a side already done is refused as invalid input.
    async fn audit_page(
        &self,
        id: i64,
        owner: &str,
        side: AuditSide,
        orders: &[crate::connectors::queries::AuditedOrder],
        next: Option<&str>,
        lease: Duration,
    ) -> Result<()>;

    /// Compares the orders stored for run `id`, streamed in external-id order through
    /// [`crate::audit::compare::Comparison`]: memory bounded by one external id's orders, not the window.
    async fn audit_compare(&self, id: i64) -> Result<crate::audit::compare::Tally>;

    /// What the ledger knows about the newest record of each source key (at most [`AUDIT_FACTS_CHUNK`]
    /// keys a call); keys without a record are left out.
    async fn audit_facts(&self, source_keys: &[String]) -> Result<Vec<AuditRecordFacts>>;

    /// Finishes run `id` with `result`, fenced by `owner`'s lease: stores the result, deletes the run's
    /// orders and the finished runs beyond the newest [`AUDIT_RUNS_KEPT`], in one transaction.
    async fn audit_finish(&self, id: i64, owner: &str, result: &Value) -> Result<()>;

    async fn audit_run(&self, id: i64) -> Result<Option<AuditRun>>;

    /// The newest finished run.
    async fn audit_last(&self) -> Result<Option<AuditRun>>;

    /// A cheap round trip that proves the ledger answers (the readiness probe).
    async fn ping(&self) -> Result<()>;

    /// Closes the connections (waits for in-flight statements).
    async fn close(&self);
}

/// Which ledger to open, as the flow's configuration says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerTarget {
    /// A SQLite database file (created if missing).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

/// Opens (and migrates) the ledger for `flow`.
pub async fn open(
    target: &LedgerTarget,
    flow: &str,
    clock: std::sync::Arc<dyn Clock>,
) -> Result<std::sync::Arc<dyn Ledger>> {
    Ok(match target {
        LedgerTarget::Sqlite(path) => {
            std::sync::Arc::new(SqliteLedger::open(path, flow, clock).await?)
        }
        LedgerTarget::Postgres(url) => {
            std::sync::Arc::new(PostgresLedger::connect(url, flow, clock).await?)
        }
    })
}

// ---- shared between the backends -------------------------------------------------------------------------

/// An incoming record made ready for storage.
pub(crate) struct Prepared {
    source_key: String,
    idempotency_key: String,
    external_id: Option<String>,
    payload: String,
    hash: String,
    contract_version: String,
    bucket: i64,
    correlation_id: String,
    ordering: Option<i64>,
}

pub(crate) fn prepare(flow: &str, batch: Vec<IncomingRecord>) -> Result<Vec<Prepared>> {
    batch
        .into_iter()
        .map(|record| {
            if record.idempotency_key.is_empty() || record.source_key.is_empty() {
                return Err(LedgerError::InvalidInput {
                    flow: flow.to_string(),
                    what: format!(
                        "a record needs a source key and an idempotency key (got source key {:?}, \
                         idempotency key {:?})",
                        record.source_key, record.idempotency_key
                    ),
                });
            }
            // One serialisation serves as the stored text and as the canonical form that is hashed.
            let payload = types::json_text(&record.payload);
            Ok(Prepared {
                bucket: i64::from(bucket_of(&record.source_key)),
                hash: payload_text_hash(&payload),
                payload,
                correlation_id: record
                    .correlation_id
                    .unwrap_or_else(|| new_correlation_id(&record.idempotency_key)),
                source_key: record.source_key,
                idempotency_key: record.idempotency_key,
                external_id: record.external_id,
                contract_version: record.contract_version,
                ordering: record.ordering,
            })
        })
        .collect()
}

/// Splits a batch into rounds in which every idempotency key occurs once, keeping order, so a batch that
/// carries two versions of one record applies them in sequence (the later one wins, as it would across two
/// batches). Each item keeps its index in the batch.
pub(crate) fn rounds(prepared: Vec<Prepared>) -> Vec<Vec<(usize, Prepared)>> {
    let mut rounds: Vec<Vec<(usize, Prepared)>> = Vec::new();
    let mut seen: Vec<std::collections::HashSet<String>> = Vec::new();
    for (index, item) in prepared.into_iter().enumerate() {
        // A later occurrence must land in a later round than every earlier one of the same key.
        let slot = seen
            .iter()
            .rposition(|keys| keys.contains(&item.idempotency_key))
            .map_or(0, |last| last + 1);
        if slot == seen.len() {
            seen.push(Default::default());
            rounds.push(Vec::new());
        }
        seen[slot].insert(item.idempotency_key.clone());
        rounds[slot].push((index, item));
    }
    rounds
}

/// The lineage detail of a stale revision: its payload hash and both ordering values.
pub(crate) fn stale_detail(hash: &str, stored: i64, incoming: i64) -> String {
    json!({"payload_hash": hash, "ordering": {"stored": stored, "incoming": incoming}}).to_string()
}

/// The lineage detail of an update whose ordering value equals the stored one's.
pub(crate) fn tie_detail(hash: &str, value: i64, generation: i64) -> String {
    json!({"payload_hash": hash, "ordering": value, "previous_generation": generation - 1})
        .to_string()
}

/// What a completion writes, in the same shape for both backends.
pub(crate) struct CompletionParams {
    /// `None` for a release: back to the state it was claimed from.
    new_state: Option<&'static str>,
    next_attempt_at: Option<i64>,
    last_error: Option<String>,
    error_class: Option<&'static str>,
    dead_letter_reason: Option<String>,
    erp_response: Option<String>,
    hold_rule: Option<String>,
    hold_role: Option<String>,
    retry_increment: i64,
    /// Counts as a failure (starts the MTTR clock if it is not running).
    failed: bool,
    snapshot: Option<String>,
    detail: Value,
    /// The ticket a dead letter or hold is attached to (its fingerprint and cause); `None` otherwise. A
    /// delivery detaches the record (the update writes NULL), retries and releases leave it as it is.
    ticket: Option<(String, tickets::Cause)>,
}

pub(crate) fn completion_params(flow: &str, outcome: &Outcome, now: i64) -> CompletionParams {
    let mut params = CompletionParams {
        new_state: None,
        next_attempt_at: None,
        last_error: None,
        error_class: None,
        dead_letter_reason: None,
        erp_response: None,
        hold_rule: None,
        hold_role: None,
        retry_increment: 0,
        failed: false,
        snapshot: None,
        detail: json!({}),
        ticket: tickets::Cause::of_outcome(outcome).map(|cause| (cause.fingerprint(flow), cause)),
    };
    match outcome {
        Outcome::Delivered => params.new_state = Some(RecordState::Delivered.as_str()),
        Outcome::RetryScheduled {
            next_attempt_at,
            error,
            class,
        } => {
            params.new_state = Some(RecordState::RetryScheduled.as_str());
            params.next_attempt_at = Some(next_attempt_at.timestamp_millis());
            params.last_error = Some(error.clone());
            params.error_class = Some(class.label());
            params.retry_increment = 1;
            params.failed = true;
            params.detail =
                json!({"error": error, "class": class.label(), "next_attempt_at": next_attempt_at});
        }
        Outcome::DeadLettered {
            reason,
            class,
            erp_response,
            snapshot,
        } => {
            params.new_state = Some(RecordState::DeadLettered.as_str());
            params.last_error = Some(reason.clone());
            params.error_class = Some(class.label());
            params.dead_letter_reason = Some(reason.clone());
            params.erp_response = erp_response.clone();
            params.failed = true;
            params.snapshot = snapshot.as_ref().map(Value::to_string);
            params.detail =
                json!({"reason": reason, "class": class.label(), "erp_response": erp_response});
        }
        Outcome::Held {
            rule,
            role,
            snapshot,
        } => {
            params.new_state = Some(RecordState::Held.as_str());
            params.snapshot = snapshot.as_ref().map(Value::to_string);
            params.hold_rule = Some(rule.clone());
            params.hold_role = Some(role.clone());
            params.error_class = Some(ErrorClass::Hold.label());
            params.detail = json!({"rule": rule, "role": role});
        }
        Outcome::Released { not_before } => {
            let at = not_before.map_or(now, |t| t.timestamp_millis());
            params.next_attempt_at = Some(at);
            params.detail = json!({"not_before": to_time(at)});
        }
    }
    params
}

/// The manual actions on a record, each one a lifecycle transition recorded as an intervention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ManualAction {
    Approve,
    Reject,
    Replay,
}

/// Refuses a decision on a held record that is no longer what its approver checked: another generation, or a
/// hold for another role. `None` when it still is (or when the action carries no expectation).
pub(crate) fn hold_changed(
    flow: &str,
    id: RecordId,
    seen: Option<&HeldAsSeen>,
    generation: i64,
    state: &str,
    hold_role: Option<&str>,
) -> Option<LedgerError> {
    let seen = seen?;
    let role = |r: Option<&str>| r.map_or_else(|| "no role".to_string(), |r| format!("role {r}"));
    let changed = if seen.generation != generation {
        let now = if state == RecordState::Held.as_str() {
            format!("held for {}", role(hold_role))
        } else {
            state.to_string()
        };
        format!(
            "generation {} is now generation {generation}, {now}",
            seen.generation
        )
    } else if seen.hold_role.as_deref() != hold_role {
        format!(
            "it was held for {} and is now held for {}",
            role(seen.hold_role.as_deref()),
            role(hold_role)
        )
    } else {
        return None;
    };
    Some(LedgerError::HoldChanged {
        flow: flow.to_string(),
        record: id,
        changed,
    })
}

impl ManualAction {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ManualAction::Approve => "approve",
            ManualAction::Reject => "reject",
            ManualAction::Replay => "replay",
        }
    }

    pub(crate) fn source_state(self) -> RecordState {
        match self {
            ManualAction::Approve | ManualAction::Reject => RecordState::Held,
            ManualAction::Replay => RecordState::DeadLettered,
        }
    }

    pub(crate) fn target_state(self) -> RecordState {
        match self {
            ManualAction::Approve | ManualAction::Replay => RecordState::Validated,
            ManualAction::Reject => RecordState::DeadLettered,
        }
    }
}

/// A `records` row as both backends return it (every integer is 64-bit on both).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RecordRow {
    id: i64,
    flow: String,
    source_key: String,
    idempotency_key: String,
    external_id: Option<String>,
    generation: i64,
    payload: String,
    payload_hash: String,
    contract_version: String,
    state: String,
    claimed_from: Option<String>,
    attempts: i64,
    next_attempt_at: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<i64>,
    fence: i64,
    last_error: Option<String>,
    last_error_class: Option<String>,
    dead_letter_reason: Option<String>,
    erp_response: Option<String>,
    hold_rule: Option<String>,
    hold_role: Option<String>,
    approved_by: Option<String>,
    bucket: i64,
    correlation_id: String,
    received_at: i64,
    updated_at: i64,
    delivered_at: Option<i64>,
    first_failure_at: Option<i64>,
    outcome: Option<String>,
}

/// The columns of a [`RecordRow`], in its field order, read from [`RECORD_FROM`] (or from any relation `r`
/// with the records' columns joined to `payloads p`).
pub(crate) const RECORD_COLUMNS: &str = "r.id, r.flow, r.source_key, r.idempotency_key, r.external_id, \
    r.generation, COALESCE(p.body, 'null') AS payload, r.payload_hash, r.contract_version, r.state, r.claimed_from, r.attempts, \
    r.next_attempt_at, r.lease_owner, r.lease_expires_at, r.fence, r.last_error, r.last_error_class, \
    r.dead_letter_reason, r.erp_response, r.hold_rule, r.hold_role, r.approved_by, r.bucket, r.correlation_id, \
    r.received_at, r.updated_at, r.delivered_at, r.first_failure_at, r.outcome";

/// The states people page through (holds, dead letters): the predicate of SQLite's `records_attention` partial
/// index, which queries repeat word for word so the planner uses it. PostgreSQL lists those records in
/// `record_attention` instead since schema version 18 (its `listing_source` says how a listing reaches them).
pub(crate) const ATTENTION: &str = "state IN ('held', 'dead_lettered')";

/// A record with its current payload (none once a delivered record was reduced to its compact row).
pub(crate) const RECORD_FROM: &str = "records r LEFT JOIN payloads p ON p.record_id = r.id";

/// Refuses a replay read over [`MAX_REPLAY_RECORDS`] (or of none), naming the bound.
pub(crate) fn check_replay_limit(flow: &str, limit: usize) -> Result<()> {
    if limit == 0 || limit > MAX_REPLAY_RECORDS {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!("a replay reads 1 to {MAX_REPLAY_RECORDS} records, not {limit}"),
        });
    }
    Ok(())
}

pub(crate) fn parse_state(flow: &str, id: i64, s: &str) -> Result<RecordState> {
    RecordState::parse(s).ok_or_else(|| LedgerError::Corrupt {
        flow: flow.to_string(),
        record: RecordId(id),
        what: "state",
        detail: format!("unknown state {s:?}"),
    })
}

fn parse_json(flow: &str, id: i64, what: &'static str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| LedgerError::Corrupt {
        flow: flow.to_string(),
        record: RecordId(id),
        what,
        detail: e.to_string(),
    })
}

impl RecordRow {
    pub(crate) fn into_view(self) -> Result<RecordView> {
        let state = parse_state(&self.flow, self.id, &self.state)?;
        let payload = parse_json(&self.flow, self.id, "payload", &self.payload)?;
        Ok(RecordView {
            id: RecordId(self.id),
            state,
            payload,
            source_key: self.source_key,
            idempotency_key: self.idempotency_key,
            external_id: self.external_id,
            generation: self.generation,
            payload_hash: self.payload_hash,
            contract_version: self.contract_version,
            attempts: self.attempts,
            next_attempt_at: to_time(self.next_attempt_at),
            lease_owner: self.lease_owner,
            lease_expires_at: self.lease_expires_at.map(to_time),
            last_error: self.last_error,
            last_error_class: self
                .last_error_class
                .as_deref()
                .and_then(error_class_from_label),
            dead_letter_reason: self.dead_letter_reason,
            erp_response: self.erp_response,
            hold_rule: self.hold_rule,
            hold_role: self.hold_role,
            approved_by: self.approved_by,
            bucket: self.bucket as u8,
            correlation_id: self.correlation_id,
            received_at: to_time(self.received_at),
            updated_at: to_time(self.updated_at),
            delivered_at: self.delivered_at.map(to_time),
            first_failure_at: self.first_failure_at.map(to_time),
            outcome: self.outcome,
            flow: self.flow,
        })
    }

    pub(crate) fn into_claimed(self) -> Result<ClaimedRecord> {
        let claimed_from = match self.claimed_from.as_deref() {
            Some(s) => parse_state(&self.flow, self.id, s)?,
            None => RecordState::Received,
        };
        Ok(ClaimedRecord {
            claim: Claim {
                id: RecordId(self.id),
                generation: self.generation,
                fence: self.fence,
            },
            source_key: self.source_key,
            idempotency_key: self.idempotency_key,
            external_id: self.external_id,
            // Not parsed here: the contract reads the text itself, and text that is not JSON (a damaged row)
            // becomes that record's explained dead letter instead of failing the whole claim.
            payload: self.payload,
            payload_hash: self.payload_hash,
            contract_version: self.contract_version,
            attempts: self.attempts,
            correlation_id: self.correlation_id,
            bucket: self.bucket as u8,
            claimed_from,
            approved_by: self.approved_by,
            lease_expires_at: to_time(self.lease_expires_at.unwrap_or(self.next_attempt_at)),
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LineageRow {
    at: i64,
    generation: i64,
    step: String,
    detail: String,
    correlation_id: String,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SnapshotRow {
    generation: i64,
    kind: String,
    at: i64,
    body: String,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct InterventionRow {
    record_id: Option<i64>,
    action: String,
    actor: String,
    reason: String,
    at: i64,
}

pub(crate) fn assemble_detail(
    record: RecordRow,
    lineage: Vec<LineageRow>,
    snapshots: Vec<SnapshotRow>,
    interventions: Vec<InterventionRow>,
) -> Result<RecordDetail> {
    let flow = record.flow.clone();
    let id = record.id;
    let record = record.into_view()?;
    let lineage = lineage
        .into_iter()
        .map(|row| {
            Ok(LineageEvent {
                at: to_time(row.at),
                generation: row.generation,
                detail: parse_json(&flow, id, "lineage detail", &row.detail)?,
                step: row.step,
                correlation_id: row.correlation_id,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let snapshots = snapshots
        .into_iter()
        .map(|row| {
            Ok(Snapshot {
                generation: row.generation,
                at: to_time(row.at),
                body: parse_json(&flow, id, "snapshot", &row.body)?,
                kind: row.kind,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let interventions = interventions
        .into_iter()
        .map(|row| Intervention {
            record: row.record_id.map(RecordId),
            action: row.action,
            actor: row.actor,
            reason: row.reason,
            at: to_time(row.at),
        })
        .collect();
    Ok(RecordDetail {
        record,
        lineage,
        snapshots,
        interventions,
    })
}

/// Raw aggregates of the counts query, before the derived figures.
#[derive(Debug, Default, sqlx::FromRow)]
pub(crate) struct CountsRow {
    records: i64,
    received: i64,
    delivered: i64,
    failed: i64,
    retried: i64,
    dead_lettered: i64,
    held: i64,
    pending: i64,
    oldest_pending_at: Option<i64>,
    last_delivery_at: Option<i64>,
    mttr_ms: Option<f64>,
}

/// The counters kept in `ledger_counters` whose value is the latest time, not a sum (shards take the max).
pub(crate) const MAX_COUNTERS: &[&str] = &["last_delivery_at"];

/// Counters bumped by name for events that change no record row.
pub(crate) const DEAD_LETTERS_PURGED: &str = "dead_letters_purged";
/// Occurrences (a ticket's first opening and each reopening) of the tickets purged after retention, so the
/// flow's count of occurrences does not shrink when history is purged.
pub(crate) const TICKET_OCCURRENCES_PURGED: &str = "ticket_occurrences_purged";
pub(crate) const PAYLOADS_PURGED: &str = "payloads_purged";
/// Late revisions refused as stale by the ordering field (an event: the stored row does not change).
pub(crate) const STALE_REVISIONS: &str = "stale";

/// The failure-rate window, in minutes (the SLA's "last hour").
pub(crate) const WINDOW_MINUTES: i64 = 60;

/// The first minute inside the window that ends at `now`.
pub(crate) fn window_start_minute(now: i64) -> i64 {
    now.div_euclid(60_000) - (WINDOW_MINUTES - 1)
}

/// The kept counters as read: (counter, value) with shards already summed (or maxed, see
/// [`MAX_COUNTERS`]), the window's per-counter sums, and the oldest pending receipt.
pub(crate) fn counts_from_kept(
    kept: &HashMap<String, i64>,
    window: &HashMap<String, i64>,
    oldest_pending_at: Option<i64>,
    now: i64,
) -> Counts {
    let get = |name: &str| kept.get(name).copied().unwrap_or(0);
    let mttr_count = get("mttr_count");
    let row = CountsRow {
        records: get("records"),
        received: get("received"),
        delivered: get("delivered"),
        failed: get("failed"),
        retried: get("retried"),
        dead_lettered: get("dead_lettered"),
        held: get("held"),
        pending: get("pending"),
        oldest_pending_at,
        last_delivery_at: kept.get("last_delivery_at").copied(),
        mttr_ms: (mttr_count > 0).then(|| get("mttr_sum_ms") as f64 / mttr_count as f64),
    };
    let mut counts = assemble_counts(row, get("manual_interventions"), now);
    add_events(&mut counts, kept, window);
    counts
}

/// The event counts, which only the kept counters know (a recount has no rows to count them from).
pub(crate) fn add_events(
    counts: &mut Counts,
    kept: &HashMap<String, i64>,
    window: &HashMap<String, i64>,
) {
    let get =
        |map: &HashMap<String, i64>, name: &str| map.get(name).copied().unwrap_or(0).max(0) as u64;
    counts.received_last_hour = get(window, "received");
    counts.failed_last_hour = get(window, "failed");
    counts.dead_letters_purged = get(kept, DEAD_LETTERS_PURGED);
    counts.payloads_purged = get(kept, PAYLOADS_PURGED);
    counts.stale = get(kept, STALE_REVISIONS);
}

/// The length of one slot of the per-revision window. Canary analysis intervals are at least 10 s, so a
/// finer grain would only multiply the rows a window read sums.
pub const REVISION_SLOT_MS: i64 = 10_000;

/// How long the per-revision window is kept: longer than any rollout's analysis looks back.
pub(crate) const REVISION_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// The per-revision window's counted columns, in [`RevisionTally::values`] order: the outcome counts, then
/// one column per latency bucket of [`LATENCY_BOUNDS_MS`] and `le_inf`.
pub(crate) const REVISION_COLUMNS: &str = "records, delivered, failed, dead_lettered, held, \
    le_5, le_10, le_25, le_50, le_100, le_250, le_500, le_1000, le_2500, le_5000, le_10000, le_30000, le_60000, le_inf";

/// Columns of the window: 5 outcome counts and one per latency bucket (the bounds plus `+inf`).
pub(crate) const REVISION_VALUES: usize = 5 + LATENCY_BOUNDS_MS.len() + 1;

/// The upsert of one (flow, revision, slot, shard) row of the window, adding the batch's tally: parameters
/// flow, revision, slot, then the values in [`REVISION_COLUMNS`] order. On PostgreSQL (`postgres`) the shard
/// is the connection's `pg_backend_pid()` (see schema version 4); SQLite has one writer, shard 0.
pub(crate) fn revision_upsert(postgres: bool) -> String {
    let columns: Vec<&str> = REVISION_COLUMNS.split(',').map(str::trim).collect();
    let param = |i: usize| {
        if postgres {
            format!("${i}")
        } else {
            format!("?{i}")
        }
    };
    let shard = if postgres { "pg_backend_pid()" } else { "0" };
    let values: Vec<String> = (1..=3)
        .map(param)
        .chain([shard.to_string()])
        .chain((4..4 + columns.len()).map(param))
        .collect();
    let sums: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = revision_window.{c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO revision_window (flow, revision, slot, shard, {REVISION_COLUMNS}) VALUES ({}) \
         ON CONFLICT (flow, revision, slot, shard) DO UPDATE SET {}",
        values.join(", "),
        sums.join(", ")
    )
}

/// The read of a window: every column summed over the slots `[?3, ?4)` of one revision.
pub(crate) fn revision_select(numbered: bool) -> String {
    let sums: Vec<String> = REVISION_COLUMNS
        .split(',')
        .map(|c| format!("CAST(COALESCE(SUM({}), 0) AS BIGINT)", c.trim()))
        .collect();
    let p = |i: usize| {
        if numbered {
            format!("${i}")
        } else {
            format!("?{i}")
        }
    };
    format!(
        "SELECT {} FROM revision_window WHERE flow = {} AND revision = {} AND slot >= {} AND slot < {}",
        sums.join(", "),
        p(1),
        p(2),
        p(3),
        p(4)
    )
}

/// The window slot a completion at `now` (ms) counts in.
pub(crate) fn revision_slot(now: i64) -> i64 {
    now.div_euclid(REVISION_SLOT_MS)
}

/// The slots `[first, end)` whose start lies in `[since, until)`.
pub(crate) fn revision_slots(since: DateTime<Utc>, until: DateTime<Utc>) -> (i64, i64) {
    let ceil = |ms: i64| -(-ms).div_euclid(REVISION_SLOT_MS);
    (
        ceil(since.timestamp_millis()),
        ceil(until.timestamp_millis()),
    )
}

/// What one completion batch adds to its revision's current slot, summed in memory so the batch costs one
/// upsert, not one per record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RevisionTally {
    values: [i64; REVISION_VALUES],
}

impl RevisionTally {
    /// Counts one applied completion; `latency_ms` (delivery time minus the receipt of the record's current
    /// generation) only matters for a delivery. A release is no outcome and counts nothing.
    pub(crate) fn add(&mut self, outcome: &Outcome, latency_ms: i64) {
        let v = &mut self.values;
        match outcome {
            Outcome::Released { .. } => return,
            Outcome::Delivered => {
                v[1] += 1;
                let latency = u64::try_from(latency_ms).unwrap_or(0);
                let bucket = LATENCY_BOUNDS_MS
                    .iter()
                    .position(|&le| latency <= le)
                    .unwrap_or(LATENCY_BOUNDS_MS.len());
                v[5 + bucket] += 1;
            }
            Outcome::RetryScheduled { .. } => v[2] += 1,
            Outcome::DeadLettered { .. } => {
                v[2] += 1;
                v[3] += 1;
            }
            Outcome::Held { .. } => v[4] += 1,
        }
        v[0] += 1;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.values[0] == 0
    }

    pub(crate) fn values(&self) -> &[i64; REVISION_VALUES] {
        &self.values
    }
}

/// The summed window columns (in [`REVISION_COLUMNS`] order) as measures, with the p99 bucket.
pub(crate) fn revision_measures_from(values: &[i64]) -> RevisionMeasures {
    let get = |i: usize| values.get(i).copied().unwrap_or(0).max(0) as u64;
    let bounds = LATENCY_BOUNDS_MS.iter().copied().chain([u64::MAX]);
    let latency: Vec<(u64, u64)> = bounds.enumerate().map(|(i, le)| (le, get(5 + i))).collect();
    let delivered: u64 = latency.iter().map(|(_, n)| n).sum();
    // The 99th percentile delivery is the ceil(0.99 n)-th smallest; its bucket's bound is the answer.
    let rank = (delivered * 99).div_ceil(100).max(1);
    let mut seen = 0;
    let p99_ms = (delivered > 0)
        .then(|| {
            latency.iter().find_map(|&(le, n)| {
                seen += n;
                (seen >= rank).then(|| i64::try_from(le).unwrap_or(i64::MAX))
            })
        })
        .flatten();
    RevisionMeasures {
        records: get(0),
        delivered: get(1),
        failed: get(2),
        dead_lettered: get(3),
        held: get(4),
        latency,
        p99_ms,
    }
}

/// Sets a handle's revision once (see [`Ledger::attribute_to`]).
pub(crate) fn set_revision(
    cell: &std::sync::OnceLock<String>,
    flow: &str,
    revision: &str,
) -> Result<()> {
    if revision.is_empty() {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what:
                "revision: completions need a revision name to be attributed to, not an empty one"
                    .to_string(),
        });
    }
    let set = cell.get_or_init(|| revision.to_string());
    if set != revision {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!(
                "revision: this ledger handle already attributes completions to revision {set:?}, not \
                 {revision:?} (a worker runs one revision; open another handle for another)"
            ),
        });
    }
    Ok(())
}

/// Checks a lease-owner prefix and makes it a `LIKE` pattern (`\` escapes), so `%` and `_` in a worker id
/// match themselves.
pub(crate) fn owner_prefix_pattern(flow: &str, owner_prefix: &str) -> Result<String> {
    if owner_prefix.is_empty() {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: "owner_prefix: releasing leases needs a worker id prefix; an empty one would release \
                   every worker's leases"
                .to_string(),
        });
    }
    let mut pattern = String::with_capacity(owner_prefix.len() + 1);
    for c in owner_prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    Ok(pattern)
}

/// The one-line outcome a delivered record keeps once its payload and lineage are purged.
pub(crate) fn compact_outcome(
    generation: i64,
    external_id: Option<&str>,
    delivered_at: i64,
) -> String {
    format!(
        "delivered generation {generation} as {} at {}",
        external_id.unwrap_or("(no external id)"),
        to_time(delivered_at).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

/// The cut-off time for a retention (`None` when the retention is unset).
pub(crate) fn retention_cutoff(now: i64, retention: Option<Duration>) -> Option<i64> {
    retention.map(|r| now.saturating_sub(i64::try_from(r.as_millis()).unwrap_or(i64::MAX)))
}

pub(crate) fn assemble_counts(row: CountsRow, interventions: i64, now: i64) -> Counts {
    let records = row.records.max(0) as u64;
    let manual_interventions = interventions.max(0) as u64;
    Counts {
        records,
        received: row.received.max(0) as u64,
        delivered: row.delivered.max(0) as u64,
        failed: row.failed.max(0) as u64,
        retried: row.retried.max(0) as u64,
        dead_lettered: row.dead_lettered.max(0) as u64,
        held: row.held.max(0) as u64,
        stale: 0,
        pending: row.pending.max(0) as u64,
        oldest_pending_age_seconds: row
            .oldest_pending_at
            .map(|at| ((now - at).max(0)) as f64 / 1000.0),
        last_delivery_at: row.last_delivery_at.map(to_time),
        mttr_seconds: row.mttr_ms.map(|ms| ms / 1000.0),
        manual_interventions,
        interventions_per_1000: if records == 0 {
            0.0
        } else {
            manual_interventions as f64 * 1000.0 / records as f64
        },
        ..Counts::default()
    }
}

pub(crate) fn lease_ms(flow: &str, lease: Duration) -> Result<i64> {
    let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    if ms <= 0 {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: "a claim needs a lease longer than zero".to_string(),
        });
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(key: &str) -> Prepared {
        Prepared {
            source_key: key.into(),
            idempotency_key: key.into(),
            external_id: None,
            payload: "{}".into(),
            hash: String::new(),
            contract_version: "1".into(),
            bucket: 0,
            correlation_id: String::new(),
            ordering: None,
        }
    }

    #[test]
    fn p99_is_the_bound_of_the_bucket_holding_the_99th_percentile() {
        let mut tally = RevisionTally::default();
        for _ in 0..98 {
            tally.add(&Outcome::Delivered, 7);
        }
        tally.add(&Outcome::Delivered, 300);
        tally.add(&Outcome::Delivered, 90_000);
        let m = revision_measures_from(tally.values());
        assert_eq!((m.records, m.delivered), (100, 100));
        assert_eq!(m.p99_ms, Some(500));
        assert_eq!(m.latency[1], (10, 98));
        assert_eq!(m.latency.last(), Some(&(u64::MAX, 1)));
        assert_eq!(revision_measures_from(&[0; REVISION_VALUES]).p99_ms, None);
    }

    #[test]
    fn owner_prefixes_match_wildcards_literally_and_refuse_empty() {
        assert_eq!(
            owner_prefix_pattern("f", "a_b%c\\").unwrap(),
            "a\\_b\\%c\\\\%"
        );
        let err = owner_prefix_pattern("f", "").unwrap_err().to_string();
        assert!(err.contains("owner_prefix"), "{err}");
    }

    #[test]
    fn a_slot_counts_when_it_starts_inside_the_window() {
        let at = |ms: i64| to_time(ms);
        assert_eq!(revision_slots(at(20_000), at(40_000)), (2, 4));
        assert_eq!(revision_slots(at(20_001), at(40_001)), (3, 5));
    }

    #[test]
    fn a_batch_with_repeated_keys_applies_them_in_order() {
        let batch = vec![
            prepared("a"),
            prepared("b"),
            prepared("a"),
            prepared("c"),
            prepared("a"),
        ];
        let rounds = rounds(batch);
        let indices: Vec<Vec<usize>> = rounds
            .iter()
            .map(|round| round.iter().map(|(i, _)| *i).collect())
            .collect();
        assert_eq!(indices, vec![vec![0, 1, 3], vec![2], vec![4]]);
    }
}
