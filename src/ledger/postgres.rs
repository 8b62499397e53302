//! The PostgreSQL ledger: several replicas of one flow (and the canary and stable tracks) share it.
//!
//! Claims lock due rows with `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait for each other and
//! never get the same record; a claim leases the record to one worker until `lease_expires_at`, after which
//! any replica may take it over (fenced, see the parent module). Every batch operation is one round trip or
//! a few, set-based over `UNNEST` arrays, because a statement per record would cap throughput at the
//! network's round-trip time. Commits use the server's `synchronous_commit` (on by default), so an ingest
//! that returned is on disk before the source is acknowledged.
//!
//! **Row locks.** Every writer that may wait for a stored record's row lock takes those locks in record-id
//! order (an ingest in a statement of its own before its upsert, a completion through its update), so two
//! writers of the same records queue behind each other and never deadlock; the claim and the purge skip
//! locked rows instead of waiting.
//!
//! **Lineage of a delivery and of a claim.** Since schema version 15 a delivery's event stays in its record's
//! row (`delivered_event`, its reserved lineage id) until the row moves on, when the update trigger writes it
//! to `lineage`; since version 16 a claim's does too (`claimed_*`). `get` reads them from either place.
//!
//! **Leases.** `record_queue` holds the records that can be claimed once due. Since schema version 16 a
//! leased record is not in it: the triggers register each statement's leases in `record_leases` (owner,
//! expiry, record ids), and a claim first takes the expired registrations and makes the records still held
//! under them claimable again.
//!
//! **Delivery slots.** The ERP's concurrency limit is per account, not per replica, so the flow's
//! `delivery.concurrency` is shared: `delivery_slots` holds one row per slot; a replica leases slots (with a
//! holder and an expiry, taken with SKIP LOCKED) before its ERP calls and gives them back after, and a
//! replica that dies holding slots loses them when their lease runs out.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::audit::{self, RUN_COLUMNS, RunRow};
use super::parse_state;
use super::schema::{self, SCHEMA_VERSION};
use super::tickets::{self, TicketRow, TimesDelta, postgres_param};
use super::{AUDIT_RUNS_KEPT, AuditRecordFacts, AuditRun, AuditSide};
use super::{
    BucketSet, Claim, ClaimedRecord, Clock, Completion, CompletionResult, Counts, CountsRow,
    DEAD_LETTERS_PURGED, IncomingRecord, IngestOutcome, InterventionRow, LeaseRequest, Ledger,
    LedgerError, LineageRow, MAX_COUNTERS, ManualAction, NewLineageEvent, PAYLOADS_PURGED,
    PurgeReport, RECORD_COLUMNS, RECORD_FROM, RecordDetail, RecordId, RecordRow, RecordState,
    RecordView, ReplayRecord, Result, Retention, STALE_REVISIONS, SnapshotRow,
    TICKET_OCCURRENCES_PURGED, add_events, assemble_counts, assemble_detail, compact_outcome,
    completion_params, counts_from_kept, lease_ms, prepare, retention_cutoff, rounds, stale_detail,
    tie_detail, to_time, window_start_minute,
};
use super::{
    DueDelivery, FlowTicketMeasures, HeldAsSeen, OwnerTicketMeasures, RaisedException,
    TicketAssignment, TicketRecord, TicketSinkHealth,
};
use super::{
    REVISION_RETENTION_MS, REVISION_VALUES, RevisionMeasures, RevisionTally, owner_prefix_pattern,
    revision_measures_from, revision_select, revision_slot, revision_slots, revision_upsert,
    set_revision,
};
use crate::connectors::queries::AuditedOrder;
use chrono::{DateTime, Utc};

/// A run's row, in [`RUN_COLUMNS`] order.
fn pg_run_row(r: &sqlx::postgres::PgRow) -> std::result::Result<RunRow, sqlx::Error> {
    Ok(RunRow {
        id: r.try_get(0)?,
        window_from: r.try_get(1)?,
        window_to: r.try_get(2)?,
        state: r.try_get(3)?,
        owner: r.try_get(4)?,
        lease_until: r.try_get(5)?,
        crm_cursor: r.try_get(6)?,
        crm_done: r.try_get(7)?,
        crm_pages: r.try_get(8)?,
        crm_orders: r.try_get(9)?,
        erp_cursor: r.try_get(10)?,
        erp_done: r.try_get(11)?,
        erp_pages: r.try_get(12)?,
        erp_orders: r.try_get(13)?,
        result: r.try_get(14)?,
        started_at: r.try_get(15)?,
        finished_at: r.try_get(16)?,
    })
}

/// Splits the rows of a counts query: kept counters, window sums and the oldest pending receipt.
fn split_kept(
    rows: Vec<(String, String, Option<i64>)>,
) -> (HashMap<String, i64>, HashMap<String, i64>, Option<i64>) {
    let (mut kept, mut window, mut oldest) = (HashMap::new(), HashMap::new(), None);
    for (kind, counter, value) in rows {
        match kind.as_str() {
            "kept" => {
                kept.insert(counter, value.unwrap_or(0));
            }
            "window" => {
                window.insert(counter, value.unwrap_or(0));
            }
            _ => oldest = value,
        }
    }
    (kept, window, oldest)
}

/// Key of the advisory lock that serialises migrations when several replicas start at once.
const MIGRATION_LOCK: i64 = 0x6d65_7368_6c69_6e65; // "meshline"

#[derive(Debug)]
pub struct PostgresLedger {
    pool: PgPool,
    flow: String,
    clock: Arc<dyn Clock>,
    /// The largest delivery-slot limit whose rows this process has made sure exist.
    slots_created: std::sync::atomic::AtomicI64,
    /// The contract revision completions are attributed to ([`Ledger::attribute_to`]).
    revision: std::sync::OnceLock<String>,
}

/// Connections of a worker's ledger pool.
const POOL_CONNECTIONS: u32 = 8;

/// Ingest transactions a worker's intake runs side by side: half the pool, so claims, completions and
/// delivery-slot leases always find a connection. With one at a time, a group's five round trips and its
/// commit's WAL flush held back every webhook that arrived meanwhile, and the intake, not delivery, set
/// the end-to-end pace (issue #13: 7,660 records/s with one, 11,445 with four, same machine and hour).
/// Concurrent ingests are safe as they are between replicas: each locks stored rows in id order and
/// inserts new keys in key order.
const INGEST_WRITERS: usize = POOL_CONNECTIONS as usize / 2;

impl PostgresLedger {
    /// Connects to `url` and migrates the ledger for `flow`.
    pub async fn connect(url: &str, flow: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|source| LedgerError::Open {
                flow: flow.to_string(),
                backend: "postgres",
                target: redact_url(url),
                source: source.into(),
            })?;
        Self::with_pool(pool, flow, clock).await
    }

    /// Uses an existing pool (e.g. one shared with a PostgreSQL sink) and migrates.
    pub async fn with_pool(pool: PgPool, flow: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let ledger = PostgresLedger {
            pool,
            flow: flow.to_string(),
            clock,
            slots_created: Default::default(),
            revision: std::sync::OnceLock::new(),
        };
        ledger.migrate().await?;
        Ok(ledger)
    }

    /// The schema version recorded in the database.
    pub async fn schema_version(&self) -> Result<i64> {
        let version: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM meshline_schema")
            .fetch_one(&self.pool)
            .await
            .map_err(self.db("read schema version", None))?;
        Ok(version.unwrap_or(0))
    }

    fn db(
        &self,
        operation: &'static str,
        record: Option<RecordId>,
    ) -> impl Fn(sqlx::Error) -> LedgerError + '_ {
        move |source| LedgerError::Database {
            flow: self.flow.clone(),
            operation,
            record,
            source: source.into(),
        }
    }

    /// Adds `by` to a counter of events that change no record row, in the caller's transaction, on this
    /// connection's shard.
    pub(crate) async fn bump_counter(
        &self,
        conn: &mut PgConnection,
        counter: &str,
        by: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger_counters (flow, counter, shard, value) VALUES ($1, $2, pg_backend_pid(), $3) \
             ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value",
        )
        .bind(&self.flow)
        .bind(counter)
        .bind(by)
        .execute(conn)
        .await
        .map_err(self.db("bump counter", None))?;
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        let flow = self.flow.clone();
        let failed = |version: i64| {
            let flow = flow.clone();
            move |source: sqlx::Error| LedgerError::Migrate {
                flow: flow.clone(),
                version,
                source: source.into(),
            }
        };
        let mut tx = self.pool.begin().await.map_err(failed(0))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(failed(0))?;
        sqlx::query(schema::POSTGRES_SCHEMA_TABLE)
            .execute(&mut *tx)
            .await
            .map_err(failed(0))?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0)::BIGINT FROM meshline_schema")
                .fetch_one(&mut *tx)
                .await
                .map_err(failed(0))?;
        if current > SCHEMA_VERSION {
            return Err(LedgerError::SchemaTooNew {
                flow,
                found: current,
                known: SCHEMA_VERSION,
            });
        }
        for migration in schema::POSTGRES.iter().filter(|m| m.version > current) {
            for statement in migration.statements {
                sqlx::query(*statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed(migration.version))?;
            }
            sqlx::query(
                "INSERT INTO meshline_schema (version, description, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(migration.version)
            .bind(migration.description)
            .bind(self.clock.now_ms())
            .execute(&mut *tx)
            .await
            .map_err(failed(migration.version))?;
        }
        tx.commit().await.map_err(failed(SCHEMA_VERSION))?;
        Ok(())
    }

    async fn ingest_inner(
        &self,
        batch: Vec<IncomingRecord>,
        checkpoint: Option<(&str, &str)>,
        lease: Option<&LeaseRequest>,
    ) -> Result<(Vec<IngestOutcome>, Vec<ClaimedRecord>)> {
        let total = batch.len();
        let prepared = prepare(&self.flow, batch)?;
        let now = self.clock.now_ms();
        // What this ingest may lease: the worker, its buckets, how many more, and until when. A request for
        // nothing (no buckets, a limit of zero) leases nothing and costs nothing in the statement.
        let lease = match lease {
            Some(request) if request.limit > 0 && !request.buckets.is_empty() => Some((
                request,
                now.saturating_add(lease_ms(&self.flow, request.lease)?),
            )),
            _ => None,
        };
        let lease_buckets: Vec<i64> = lease
            .map(|(request, _)| request.buckets.iter().map(i64::from).collect())
            .unwrap_or_default();
        let mut lease_left = lease.map_or(0, |(request, _)| request.limit);
        let lease_worker = lease.map(|(request, _)| request.worker.as_str());
        let lease_expires = lease.map(|(_, expires)| expires);
        let mut leased: Vec<(usize, ClaimedRecord)> = Vec::new();
        // Every statement of an ingest is planned for its own arguments, in the `BEGIN`'s round trip. sqlx
        // prepares a statement once per connection and PostgreSQL may then keep a generic plan, made with the
        // statistics of that moment: one kept while the ledger was nearly empty read the whole table for every
        // stored key looked up (`seq scan` and `records_source_key`, 0.3-0.5 s per ingest of 1,000 at 3,000
        // records). Planning afresh costs ~0.6 ms of database time per ingest of 100 (the upsert 0.32 ms, the
        // lookup of stored keys 0.19, payloads and lineage 0.13, with `pg_stat_statements.track_planning`).
        let mut tx = self
            .pool
            .begin_with("BEGIN; SET LOCAL plan_cache_mode = force_custom_plan")
            .await
            .map_err(self.db("ingest", None))?;
        let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; total];
        for mut round in rounds(prepared) {
            // Stored rows are locked in id order before the upsert (below). The keys the upsert inserts go
            // in idempotency-key order (bytewise, as `COLLATE "C"` sorts), so two ingests inserting the same
            // new keys wait for each other in one order too. A round holds each key once; a later round's
            // keys are all in an earlier one, so it takes no new row lock.
            round.sort_by(|(_, a), (_, b)| a.idempotency_key.cmp(&b.idempotency_key));
            let mut positions = Vec::with_capacity(round.len());
            let mut source_keys = Vec::with_capacity(round.len());
            let mut keys = Vec::with_capacity(round.len());
            let mut external_ids = Vec::with_capacity(round.len());
            let mut hashes = Vec::with_capacity(round.len());
            let mut versions = Vec::with_capacity(round.len());
            let mut buckets = Vec::with_capacity(round.len());
            let mut correlations = Vec::with_capacity(round.len());
            let mut orderings: Vec<Option<i64>> = Vec::with_capacity(round.len());
            for (index, item) in &round {
                positions.push(i64::try_from(*index).unwrap_or(i64::MAX));
                orderings.push(item.ordering);
                source_keys.push(item.source_key.clone());
                keys.push(item.idempotency_key.clone());
                external_ids.push(item.external_id.clone());
                hashes.push(item.hash.clone());
                versions.push(item.contract_version.clone());
                buckets.push(item.bucket);
                correlations.push(item.correlation_id.clone());
            }
            // The stored rows of the round's keys, locked in record-id order before anything is written:
            // every writer of existing records locks them in id order (a completion's update reads them
            // through the primary key), so an ingest and a completion of the same records queue behind each
            // other instead of deadlocking. The upsert below then takes no new lock on a stored row; the keys
            // it inserts are new, so no completion holds them. Each key's ordering value comes back too, read
            // from its newest version (the one the upsert compares with), to tell a tie (flagged) from a newer
            // revision.
            //
            // Each key is looked up alone (`LATERAL ... LIMIT 1`: the flow and the key, the whole unique key, so
            // the planner knows it finds one row), and the rows found are then locked by id. Written as
            // `idempotency_key = ANY($2)`, the planner could not tell how many of the flow's records a hundred
            // keys select; on a ledger without statistics it read every record of the flow for each ingest
            // (see the completion on `flow = $n`). The flow comes from a subquery the planner does not fold
            // (`OFFSET 0`), so it is compared as a value unknown at planning: a flow new to a shared ledger,
            // absent from the statistics of `records`, would otherwise be taken for a handful of records, and
            // each key found by walking them through `records_source_key`.
            let (existing_keys, existing_orderings): (Vec<String>, Vec<Option<i64>>) =
                sqlx::query_as::<_, (String, Option<i64>)>(
                    "SELECT r.idempotency_key, r.ordering_value FROM records r \
                     WHERE r.id = ANY(ARRAY(SELECT s.id FROM (SELECT $1::text AS flow OFFSET 0) AS f, \
                       UNNEST($2::text[]) AS k(key), LATERAL (SELECT id FROM records \
                       WHERE flow = f.flow AND idempotency_key = k.key LIMIT 1) AS s)) \
                     ORDER BY r.id FOR NO KEY UPDATE OF r",
                )
                .bind(&self.flow)
                .bind(&keys)
                .fetch_all(&mut *tx)
                .await
                .map_err(self.db("ingest", None))?
                .into_iter()
                .unzip();
            // New keys insert; changed payloads start a new generation (lease columns untouched, so an
            // in-flight older generation is never claimed alongside it); equal hashes are left alone and
            // do not come back from RETURNING. With a lease request, the first new records of the batch (in
            // arrival order) in the requested buckets, up to the limit, are inserted already leased, as a
            // claim would lease them: "new" is read from the statement's snapshot, and a key that another
            // transaction inserts meanwhile takes the conflict path, which ignores the lease columns (so it
            // is an update or a duplicate, leased to no one). `input` is read twice, so it is materialised
            // and keeps the key order of the arrays; the lease test is a hashed lookup, not a join, so the
            // rows reach the insert in that order. `leased` is materialised and tests against `existing` (the
            // stored keys locked above): inlined, it was planned once per input row, and a test against
            // `records` itself became a hash anti-join over every record of the flow, so each ingest cost grew
            // with the ledger (18 ms per 300 records at 20,000).
            let written = sqlx::query(
                "WITH input AS MATERIALIZED (SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::text[], $8::bigint[], $9::text[], $10::bigint[], $11::bigint[]) AS t(source_key, \
                 idempotency_key, external_id, payload_hash, contract_version, bucket, correlation_id, \
                 ordering_value, position)), \
                 existing AS MATERIALIZED (SELECT * FROM UNNEST($16::text[], $17::bigint[]) \
                 AS x(idempotency_key, ordering_value)), \
                 leased AS MATERIALIZED (SELECT i.position, i.idempotency_key, \
                 nextval('lineage_id_seq') AS received_event FROM input i WHERE i.bucket = ANY($12) \
                 AND NOT EXISTS (SELECT 1 FROM existing x WHERE x.idempotency_key = i.idempotency_key) \
                 ORDER BY i.position LIMIT $13), \
                 written AS ( \
                 INSERT INTO records (flow, source_key, idempotency_key, external_id, generation, \
                 payload_hash, contract_version, state, claimed_from, lease_owner, lease_expires_at, fence, \
                 attempts, next_attempt_at, bucket, correlation_id, received_at, updated_at, ordering_value, \
                 claimed_event, claimed_at, claimed_by, claimed_until) \
                 SELECT $1, t.source_key, t.idempotency_key, t.external_id, 1, t.payload_hash, \
                 t.contract_version, CASE WHEN t.lease THEN 'delivering' ELSE 'received' END, \
                 CASE WHEN t.lease THEN 'received' END, CASE WHEN t.lease THEN $14::text END, \
                 CASE WHEN t.lease THEN $15::bigint END, t.lease::int, t.lease::int, \
                 CASE WHEN t.lease THEN $15::bigint ELSE $2 END, t.bucket, t.correlation_id, $2, $2, \
                 t.ordering_value, CASE WHEN t.lease THEN nextval('lineage_id_seq') END, \
                 CASE WHEN t.lease THEN $2 END, CASE WHEN t.lease THEN $14::text END, \
                 CASE WHEN t.lease THEN $15::bigint END \
                 FROM (SELECT i.*, i.position IN (SELECT position FROM leased) AS lease FROM input i) AS t \
                 ON CONFLICT (flow, idempotency_key) DO UPDATE SET source_key = EXCLUDED.source_key, \
                 external_id = EXCLUDED.external_id, generation = records.generation + 1, \
                 payload_hash = EXCLUDED.payload_hash, \
                 contract_version = EXCLUDED.contract_version, state = 'received', claimed_from = NULL, \
                 attempts = 0, next_attempt_at = EXCLUDED.received_at, last_error = NULL, \
                 last_error_class = NULL, dead_letter_reason = NULL, erp_response = NULL, hold_rule = NULL, \
                 hold_role = NULL, approved_by = NULL, bucket = EXCLUDED.bucket, \
                 correlation_id = EXCLUDED.correlation_id, received_at = EXCLUDED.received_at, \
                 updated_at = EXCLUDED.updated_at, delivered_at = NULL, first_failure_at = NULL, \
                 outcome = NULL, purged_at = NULL, delivered_event = NULL, claimed_event = NULL, \
                 claimed_at = NULL, claimed_by = NULL, claimed_until = NULL, claimed_over = NULL, \
                 ordering_value = COALESCE(EXCLUDED.ordering_value, records.ordering_value) \
                 WHERE records.payload_hash <> EXCLUDED.payload_hash \
                 AND NOT COALESCE(EXCLUDED.ordering_value < records.ordering_value, FALSE) \
                 RETURNING id, idempotency_key, generation, (xmax = 0) AS inserted, \
                 (xmax = 0 AND state = 'delivering') AS leased) \
                 SELECT w.id, w.idempotency_key, w.generation, w.inserted, w.leased, \
                 p.ordering_value AS prior_ordering, l.received_event \
                 FROM written w LEFT JOIN existing p ON p.idempotency_key = w.idempotency_key \
                 LEFT JOIN leased l ON w.leased AND l.idempotency_key = w.idempotency_key",
            )
            .bind(&self.flow)
            .bind(now)
            .bind(&source_keys)
            .bind(&keys)
            .bind(&external_ids)
            .bind(&hashes)
            .bind(&versions)
            .bind(&buckets)
            .bind(&correlations)
            .bind(&orderings)
            .bind(&positions)
            .bind(&lease_buckets)
            .bind(i64::try_from(lease_left).unwrap_or(i64::MAX))
            .bind(lease_worker)
            .bind(lease_expires)
            .bind(&existing_keys)
            .bind(&existing_orderings)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("ingest", None))?;
            let mut written_by_key: HashMap<String, (i64, i64, bool, bool, Option<i64>)> =
                HashMap::new();
            let mut prior_ordering: HashMap<String, i64> = HashMap::new();
            for row in written {
                let key: String = row.get("idempotency_key");
                if let Some(prior) = row.get::<Option<i64>, _>("prior_ordering") {
                    prior_ordering.insert(key.clone(), prior);
                }
                written_by_key.insert(
                    key,
                    (
                        row.get("id"),
                        row.get("generation"),
                        row.get("inserted"),
                        row.get("leased"),
                        row.get("received_event"),
                    ),
                );
            }
            let duplicate_keys: Vec<String> = keys
                .iter()
                .filter(|k| !written_by_key.contains_key(*k))
                .cloned()
                .collect();
            // Keys not written are duplicates (same payload) or late revisions (stale by the ordering field).
            let mut duplicates: HashMap<String, (i64, i64, String, Option<i64>)> = HashMap::new();
            if !duplicate_keys.is_empty() {
                let rows = sqlx::query(
                    "SELECT id, idempotency_key, generation, correlation_id, ordering_value FROM records \
                     WHERE flow = $1 AND idempotency_key = ANY($2)",
                )
                .bind(&self.flow)
                .bind(&duplicate_keys)
                .fetch_all(&mut *tx)
                .await
                .map_err(self.db("ingest duplicates", None))?;
                for row in rows {
                    duplicates.insert(
                        row.get("idempotency_key"),
                        (
                            row.get("id"),
                            row.get("generation"),
                            row.get("correlation_id"),
                            row.get("ordering_value"),
                        ),
                    );
                }
            }

            let mut lineage = LineageBatch::default();
            let mut payload_ids = Vec::with_capacity(written_by_key.len());
            let mut payload_bodies = Vec::with_capacity(written_by_key.len());
            let mut stale_ids: Vec<i64> = Vec::new();
            for (index, item) in round {
                if let Some(&(id, generation, inserted, leased_now, received_event)) =
                    written_by_key.get(&item.idempotency_key)
                {
                    let (step, detail) = if inserted {
                        (
                            "received",
                            json!({"payload_hash": item.hash, "contract_version": item.contract_version, "bucket": item.bucket}),
                        )
                    } else {
                        (
                            "updated",
                            json!({"payload_hash": item.hash, "previous_generation": generation - 1, "contract_version": item.contract_version}),
                        )
                    };
                    // A record leased as it is stored keeps its claim's event in its row (schema version 17),
                    // under a lineage id reserved after its receipt's, which this row takes.
                    lineage.push_as(
                        received_event.filter(|_| leased_now),
                        id,
                        generation,
                        step,
                        detail.to_string(),
                        item.correlation_id.clone(),
                    );
                    if let (false, Some(value)) = (
                        inserted,
                        item.ordering
                            .filter(|v| prior_ordering.get(&item.idempotency_key) == Some(v)),
                    ) {
                        lineage.push(
                            id,
                            generation,
                            "ordering_tie",
                            tie_detail(&item.hash, value, generation),
                            item.correlation_id.clone(),
                        );
                    }
                    if let (true, Some(_), Some(expires)) =
                        (leased_now, lease_worker, lease_expires)
                    {
                        lease_left = lease_left.saturating_sub(1);
                        leased.push((
                            index,
                            ClaimedRecord {
                                claim: Claim {
                                    id: RecordId(id),
                                    generation,
                                    fence: 1,
                                },
                                source_key: item.source_key.clone(),
                                idempotency_key: item.idempotency_key.clone(),
                                external_id: item.external_id.clone(),
                                payload: item.payload.clone(),
                                payload_hash: item.hash.clone(),
                                contract_version: item.contract_version.clone(),
                                attempts: 1,
                                correlation_id: item.correlation_id.clone(),
                                bucket: u8::try_from(item.bucket).unwrap_or_default(),
                                claimed_from: RecordState::Received,
                                approved_by: None,
                                lease_expires_at: to_time(expires),
                            },
                        ));
                    }
                    payload_ids.push(id);
                    payload_bodies.push(item.payload);
                    outcomes[index] = Some(if inserted {
                        IngestOutcome::Received {
                            id: RecordId(id),
                            correlation_id: item.correlation_id,
                        }
                    } else {
                        IngestOutcome::Updated {
                            id: RecordId(id),
                            generation,
                            correlation_id: item.correlation_id,
                        }
                    });
                } else if let Some((id, generation, correlation_id, stored)) =
                    duplicates.get(&item.idempotency_key)
                {
                    if let (Some(incoming), Some(stored)) = (item.ordering, *stored)
                        && incoming < stored
                    {
                        // A late revision: the stored one stays current; counted below.
                        stale_ids.push(*id);
                        lineage.push(
                            *id,
                            *generation,
                            "stale",
                            stale_detail(&item.hash, stored, incoming),
                            item.correlation_id.clone(),
                        );
                        outcomes[index] = Some(IngestOutcome::Stale {
                            id: RecordId(*id),
                            stored,
                            incoming,
                            correlation_id: item.correlation_id.clone(),
                        });
                        continue;
                    }
                    lineage.push(
                        *id,
                        *generation,
                        "duplicate",
                        json!({"payload_hash": item.hash}).to_string(),
                        correlation_id.clone(),
                    );
                    outcomes[index] = Some(IngestOutcome::Duplicate {
                        id: RecordId(*id),
                        correlation_id: correlation_id.clone(),
                    });
                }
            }
            if !payload_ids.is_empty() {
                sqlx::query(
                    "INSERT INTO payloads (record_id, body) SELECT * FROM UNNEST($1::bigint[], $2::text[]) \
                     ON CONFLICT (record_id) DO UPDATE SET body = EXCLUDED.body",
                )
                .bind(&payload_ids)
                .bind(&payload_bodies)
                .execute(&mut *tx)
                .await
                .map_err(self.db("ingest payloads", None))?;
            }
            if !stale_ids.is_empty() {
                sqlx::query(
                    "UPDATE records SET stale_revisions = stale_revisions + 1 WHERE id = ANY($1::bigint[])",
                )
                .bind(&stale_ids)
                .execute(&mut *tx)
                .await
                .map_err(self.db("ingest stale revisions", None))?;
                self.bump_counter(&mut tx, STALE_REVISIONS, stale_ids.len() as i64)
                    .await?;
            }
            lineage
                .insert(&mut tx, now)
                .await
                .map_err(self.db("ingest lineage", None))?;
        }
        if let Some((source, value)) = checkpoint {
            sqlx::query(
                "INSERT INTO checkpoints (flow, source, value, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (flow, source) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
            )
            .bind(&self.flow)
            .bind(source)
            .bind(value)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(self.db("set checkpoint", None))?;
        }
        tx.commit().await.map_err(self.db("ingest commit", None))?;
        let outcomes = outcomes
            .into_iter()
            .map(|outcome| {
                outcome.ok_or_else(|| LedgerError::InvalidInput {
                    flow: self.flow.clone(),
                    what: "a record of the batch vanished during ingest (concurrently deleted?)"
                        .into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // In arrival order, as the batch came (the rounds ran in key order).
        leased.sort_by_key(|(index, _)| *index);
        Ok((
            outcomes,
            leased.into_iter().map(|(_, claimed)| claimed).collect(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    async fn manual(
        &self,
        conn: &mut PgConnection,
        id: RecordId,
        action: ManualAction,
        seen: Option<&HeldAsSeen>,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let row = sqlx::query(
            "SELECT state, generation, correlation_id, source_key, hold_rule, hold_role FROM records \
             WHERE id = $1 AND flow = $2 FOR UPDATE",
        )
        .bind(id.0)
        .bind(&self.flow)
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.db(action.name(), Some(id)))?
        .ok_or_else(|| LedgerError::NotFound {
            flow: self.flow.clone(),
            record: id,
        })?;
        let state: String = row.get("state");
        let generation: i64 = row.get("generation");
        let correlation_id: String = row.get("correlation_id");
        let source_key: String = row.get("source_key");
        let hold_rule: Option<String> = row.get("hold_rule");
        let hold_role: Option<String> = row.get("hold_role");
        // The row is locked until this transaction ends: an ingest of a new generation waits for it, so what
        // is compared here is what the update below changes.
        if let Some(changed) = super::hold_changed(
            &self.flow,
            id,
            seen,
            generation,
            &state,
            hold_role.as_deref(),
        ) {
            return Err(changed);
        }
        let from = RecordState::parse(&state).ok_or_else(|| LedgerError::Corrupt {
            flow: self.flow.clone(),
            record: id,
            what: "state",
            detail: format!("unknown state {state:?}"),
        })?;
        let to = action.target_state();
        if from != action.source_state() || !from.can_transition_to(to) {
            return Err(LedgerError::IllegalTransition {
                flow: self.flow.clone(),
                record: id,
                from,
                to,
            });
        }
        let approved_by = (action == ManualAction::Approve).then_some(actor);
        let dead_letter_reason =
            (action == ManualAction::Reject).then(|| format!("rejected by {actor}: {reason}"));
        let detail =
            json!({"actor": actor, "reason": reason, "from": from.as_str(), "to": to.as_str()});
        // A rejected hold leaves its hold's ticket for a dead letter's (approvals and replays keep the
        // record's ticket until it is delivered or dead-lettered again).
        let rejected = (action == ManualAction::Reject).then(|| {
            let cause = tickets::Cause::rejected_hold(hold_rule.as_deref());
            (cause.fingerprint(&self.flow), cause)
        });
        sqlx::query(
            "WITH updated AS (UPDATE records SET state = $1, approved_by = COALESCE($2, approved_by), \
             dead_letter_reason = COALESCE($3, dead_letter_reason), next_attempt_at = $4, updated_at = $4, \
             ticket = COALESCE($13, ticket) WHERE id = $5 RETURNING id), \
             intervention AS (INSERT INTO interventions (flow, record_id, action, actor, reason, at) \
             VALUES ($6, $5, $7, $8, $9, $4)) \
             INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
             VALUES ($5, $10, $4, $7, $11, $12)",
        )
        .bind(to.as_str())
        .bind(approved_by)
        .bind(&dead_letter_reason)
        .bind(now)
        .bind(id.0)
        .bind(&self.flow)
        .bind(action.name())
        .bind(actor)
        .bind(reason)
        .bind(generation)
        .bind(detail.to_string())
        .bind(&correlation_id)
        .bind(rejected.as_ref().map(|(fingerprint, _)| fingerprint))
        .execute(&mut *conn)
        .await
        .map_err(self.db(action.name(), Some(id)))?;
        if let Some((fingerprint, cause)) = rejected {
            let snapshot: Option<String> = sqlx::query_scalar(
                "SELECT body FROM snapshots WHERE record_id = $1 AND generation = $2 AND kind = 'held'",
            )
            .bind(id.0)
            .bind(generation)
            .fetch_optional(&mut *conn)
            .await
            .map_err(self.db(action.name(), Some(id)))?;
            let snapshot = snapshot.and_then(|body| serde_json::from_str::<Value>(&body).ok());
            let example = tickets::example(
                id.0,
                &correlation_id,
                &source_key,
                now,
                dead_letter_reason.as_deref(),
                None,
                snapshot.as_ref(),
            );
            self.ticket_occur(conn, &fingerprint, &cause, 1, vec![example], None, now)
                .await?;
        }
        Ok(())
    }

    // ---- tickets (schema version 8; the transitions live in `super::tickets`) ------------------------------

    /// Serialises the changes of one ticket between replicas until the transaction ends. An advisory lock
    /// rather than `FOR UPDATE`: the first occurrence of a cause has no row to lock yet, and two replicas
    /// inserting it at once would collide. Callers lock several tickets in fingerprint order.
    async fn lock_ticket(&self, conn: &mut PgConnection, fingerprint: &str) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            // Flow names are Kubernetes names, so `/` cannot occur in one (and PostgreSQL text holds no NUL).
            .bind(format!("meshline-ticket/{}/{fingerprint}", self.flow))
            .execute(conn)
            .await
            .map_err(self.db("lock ticket", None))?;
        Ok(())
    }

    async fn load_ticket(
        &self,
        conn: &mut PgConnection,
        fingerprint: &str,
    ) -> Result<Option<TicketRow>> {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {} FROM tickets WHERE flow = $1 AND fingerprint = $2",
            tickets::TICKET_COLUMNS
        )))
        .bind(&self.flow)
        .bind(fingerprint)
        .fetch_optional(conn)
        .await
        .map_err(self.db("read ticket", None))
    }

    /// Locks and loads a ticket for a change, or says it is not there.
    async fn existing_ticket(
        &self,
        conn: &mut PgConnection,
        fingerprint: &str,
    ) -> Result<TicketRow> {
        self.lock_ticket(conn, fingerprint).await?;
        self.load_ticket(conn, fingerprint)
            .await?
            .ok_or_else(|| LedgerError::TicketNotFound {
                flow: self.flow.clone(),
                fingerprint: fingerprint.to_string(),
            })
    }

    /// Writes a changed ticket and adds its per-owner times.
    async fn store_ticket(
        &self,
        conn: &mut PgConnection,
        row: &TicketRow,
        times: &[TimesDelta],
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(tickets::ticket_upsert(postgres_param)))
            .bind(&self.flow)
            .bind(&row.fingerprint)
            .bind(&row.kind)
            .bind(&row.class)
            .bind(&row.reason)
            .bind(&row.rule)
            .bind(&row.summary)
            .bind(&row.state)
            .bind(row.count)
            .bind(row.outstanding)
            .bind(row.opened_at)
            .bind(row.updated_at)
            .bind(row.acknowledged_at)
            .bind(&row.acknowledged_by)
            .bind(row.resolved_at)
            .bind(row.reopened)
            .bind(&row.examples)
            .bind(&row.role)
            .bind(&row.owner)
            .bind(&row.sinks)
            .bind(row.escalation_step)
            .bind(row.page)
            .bind(row.version)
            .bind(&row.measured_owner)
            .execute(&mut *conn)
            .await
            .map_err(self.db("write ticket", None))?;
        for t in times {
            sqlx::query(AssertSqlSafe(tickets::times_upsert(postgres_param)))
                .bind(&self.flow)
                .bind(&t.owner)
                .bind(t.opened)
                .bind(t.acknowledged)
                .bind(t.resolved)
                .bind(t.acknowledge_ms)
                .bind(t.resolve_ms)
                .execute(&mut *conn)
                .await
                .map_err(self.db("write ticket times", None))?;
        }
        Ok(())
    }

    /// `n` occurrences of a cause, in the caller's transaction. `outstanding` is given for a flow-level
    /// cause; a dead letter's or hold's is counted from the records attached to the ticket.
    #[allow(clippy::too_many_arguments)]
    async fn ticket_occur(
        &self,
        conn: &mut PgConnection,
        fingerprint: &str,
        cause: &tickets::Cause,
        n: u64,
        examples: Vec<crate::tickets::Example>,
        outstanding: Option<i64>,
        now: i64,
    ) -> Result<()> {
        self.lock_ticket(conn, fingerprint).await?;
        let existing = self.load_ticket(conn, fingerprint).await?;
        let outstanding = match outstanding {
            Some(n) => n,
            None => sqlx::query_scalar(AssertSqlSafe(tickets::outstanding_query(postgres_param)))
                .bind(&self.flow)
                .bind(fingerprint)
                .fetch_one(&mut *conn)
                .await
                .map_err(self.db("count ticket records", None))?,
        };
        let (row, times) = tickets::occur(
            &self.flow,
            existing,
            fingerprint,
            cause,
            n,
            examples,
            outstanding,
            now,
        )?;
        self.store_ticket(conn, &row, &times).await
    }

    /// A completion's transaction, with the planner settings its statements are written for (see
    /// `complete_batch`). With `self_counted`, the first update of `records` in it counts its own records and
    /// the update trigger's call for it does nothing (schema version 17); the trigger clears the setting.
    async fn begin_completion(
        &self,
        self_counted: bool,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await.map_err(self.db("complete", None))?;
        sqlx::query(
            "SELECT set_config('enable_nestloop', 'off', true), set_config('enable_bitmapscan', 'off', true), \
             set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true), \
             set_config('meshline.self_counted', $1, true)",
        )
        .bind(if self_counted { "on" } else { "" })
        .execute(&mut *tx)
        .await
        .map_err(self.db("complete", None))?;
        Ok(tx)
    }

    /// Updates one delivery row (parameters flow, fingerprint, sink, then `bind`'s); a (ticket, sink) the
    /// outbox does not know is an error naming both.
    async fn update_delivery<'q>(
        &self,
        operation: &'static str,
        fingerprint: &str,
        sink: &str,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<()> {
        let changed = query
            .execute(&self.pool)
            .await
            .map_err(self.db(operation, None))?
            .rows_affected();
        if changed == 0 {
            return Err(LedgerError::InvalidInput {
                flow: self.flow.clone(),
                what: format!(
                    "{operation}: ticket {fingerprint} has no delivery to sink {sink:?} (assign the ticket \
                     to the sink first)"
                ),
            });
        }
        Ok(())
    }

    async fn manual_batch(
        &self,
        ids: Vec<RecordId>,
        action: ManualAction,
        seen: Option<&HeldAsSeen>,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db(action.name(), None))?;
        for id in ids {
            self.manual(&mut tx, id, action, seen, actor, reason, now)
                .await?;
        }
        tx.commit().await.map_err(self.db(action.name(), None))
    }
}

/// Columns of a set-based lineage (or snapshot) insert.
#[derive(Default)]
struct LineageBatch {
    /// The event's lineage id when it was reserved beforehand (an intake-leased record's receipt); the
    /// sequence's next otherwise.
    events: Vec<Option<i64>>,
    ids: Vec<i64>,
    generations: Vec<i64>,
    steps: Vec<String>,
    details: Vec<String>,
    correlations: Vec<String>,
}

impl LineageBatch {
    fn push(&mut self, id: i64, generation: i64, step: &str, detail: String, correlation: String) {
        self.push_as(None, id, generation, step, detail, correlation);
    }

    fn push_as(
        &mut self,
        event: Option<i64>,
        id: i64,
        generation: i64,
        step: &str,
        detail: String,
        correlation: String,
    ) {
        self.events.push(event);
        self.ids.push(id);
        self.generations.push(generation);
        self.steps.push(step.to_string());
        self.details.push(detail);
        self.correlations.push(correlation);
    }

    async fn insert(
        &self,
        conn: &mut PgConnection,
        now: i64,
    ) -> std::result::Result<(), sqlx::Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        // `COALESCE` takes a number from the sequence only for an event without one.
        sqlx::query(
            "INSERT INTO lineage (id, record_id, generation, at, step, detail, correlation_id) \
             SELECT COALESCE(t.event, nextval('lineage_id_seq')), t.id, t.generation, $1, t.step, t.detail, \
             t.correlation_id \
             FROM UNNEST($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[]) \
             AS t(id, generation, step, detail, correlation_id, event)",
        )
        .bind(now)
        .bind(&self.ids)
        .bind(&self.generations)
        .bind(&self.steps)
        .bind(&self.details)
        .bind(&self.correlations)
        .bind(&self.events)
        .execute(conn)
        .await
        .map(|_| ())
    }

    /// Same columns reused for snapshots: `steps` holds the kind, `details` the body.
    async fn insert_snapshots(
        &self,
        conn: &mut PgConnection,
        now: i64,
    ) -> std::result::Result<(), sqlx::Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO snapshots (record_id, generation, kind, at, body) \
             SELECT t.id, t.generation, t.kind, $1, t.body \
             FROM UNNEST($2::bigint[], $3::bigint[], $4::text[], $5::text[]) AS t(id, generation, kind, body) \
             ON CONFLICT (record_id, generation, kind) DO UPDATE SET at = EXCLUDED.at, body = EXCLUDED.body",
        )
        .bind(now)
        .bind(&self.ids)
        .bind(&self.generations)
        .bind(&self.steps)
        .bind(&self.details)
        .execute(conn)
        .await
        .map(|_| ())
    }
}

/// A connection URL without its password, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

const PENDING: &str = "('received', 'validated', 'retry_scheduled', 'delivering')";

/// The receipt time of the flow's oldest waiting record (`$1` is the flow): the oldest entry of `record_queue`
/// or, since schema version 16, the oldest record still delivering under a lease, which the queue does not
/// hold (see `meshline_oldest_pending` in the schema).
const OLDEST_PENDING: &str = "meshline_oldest_pending($1)";

/// Where a listing of records in one state (`$1` the flow, `$2` the state, `$3` the id to list after) finds
/// them, and the condition that says so: holds and dead letters through `record_attention` in id order (schema
/// version 18), the other states through the records themselves. `r.state = $2` is tested as well, on the
/// record's row, which is what decides.
fn listing_source(state: RecordState) -> (&'static str, &'static str) {
    match state {
        RecordState::Held | RecordState::DeadLettered => (
            "record_attention a JOIN records r ON r.id = a.record_id LEFT JOIN payloads p ON p.record_id = r.id",
            "AND a.flow = $1 AND a.state = $2 AND a.record_id > $3",
        ),
        _ => (RECORD_FROM, ""),
    }
}

/// The dead letters of a flow (`$1`): listed in `record_attention` (schema version 18), and dead-lettered on
/// the record's own row, which a statement that locks them (`FOR UPDATE OF r`) tests again on the newest
/// version once a lock it waited for is granted (a replay may have moved the record on meanwhile).
const DEAD_LETTERS: &str = "SELECT r.id FROM record_attention a JOIN records r ON r.id = a.record_id \
    WHERE a.flow = $1 AND a.state = 'dead_lettered' AND r.flow = $1 AND r.state = 'dead_lettered'";

#[async_trait]
impl Ledger for PostgresLedger {
    fn flow(&self) -> &str {
        &self.flow
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ingest(&self, batch: Vec<IncomingRecord>) -> Result<Vec<IngestOutcome>> {
        Ok(self.ingest_inner(batch, None, None).await?.0)
    }

    async fn ingest_with_checkpoint(
        &self,
        batch: Vec<IncomingRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<Vec<IngestOutcome>> {
        Ok(self
            .ingest_inner(batch, Some((source, checkpoint)), None)
            .await?
            .0)
    }

    async fn ingest_and_claim(
        &self,
        batch: Vec<IncomingRecord>,
        lease: &LeaseRequest,
    ) -> Result<(Vec<IngestOutcome>, Vec<ClaimedRecord>)> {
        self.ingest_inner(batch, None, Some(lease)).await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM checkpoints WHERE flow = $1 AND source = $2")
            .bind(&self.flow)
            .bind(source)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.db("read checkpoint", None))
    }

    async fn set_checkpoint(&self, source: &str, value: &str) -> Result<()> {
        self.ingest_inner(Vec::new(), Some((source, value)), None)
            .await
            .map(|_| ())
    }

    async fn claim(
        &self,
        worker: &str,
        buckets: &BucketSet,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedRecord>> {
        let lease = lease_ms(&self.flow, lease)?;
        if buckets.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.clock.now_ms();
        let expires = now.saturating_add(lease);
        let bucket_list: Vec<i64> = buckets.iter().map(i64::from).collect();
        let mut tx = self.pool.begin().await.map_err(self.db("claim", None))?;
        // First, the leases that have lapsed (schema version 16): a leased record has no entry in `record_queue`
        // but is listed in `record_leases` under its claim's owner and expiry. The registrations that expired
        // are taken with SKIP LOCKED (replicas share them); those of their records still delivering under a
        // lapsed lease lose it, which queues them (the update trigger) for the due query below to take over.
        // Their locks are waited for, in id order as every writer takes them: a record skipped here would be
        // found by no one. The registrations go, whether or not their records were still held.
        //
        // The first statement only asks whether any registration expired, and turns sequential scans off
        // for the rest of the transaction: every statement here reads through an index, and with statistics
        // of a young table (analyzed when it was small) the planner read all of `records` to find the
        // records of an empty list of registrations, 6 ms per claim in the end-to-end bench.
        //
        // It also turns sorts off, and JIT with them. The due rows below are read from `record_queue_due` in
        // its order (due time, then the order they were queued in), so `LIMIT` stops after the rows it leases;
        // each is checked against its record (the queue's row is read from the snapshot, the record's newest
        // version is locked and rechecked). With statistics that call the table tiny (a young or fast-growing
        // ledger, before autovacuum analyzes it), sorting looks free, and the planner once read every pending
        // row of the flow from another index and sorted them: ~15 ms per claim with a backlog of 10,000. The
        // read of the payloads sorts nothing (the order is restored below), and a plan made of disabled steps
        // costs enough on paper to be compiled with LLVM.
        //
        // And it plans every statement afresh (`force_custom_plan`). The statements are prepared once per
        // connection, and after five executions PostgreSQL may keep a generic plan, made with the statistics
        // of that moment. A ledger that starts empty and fills fast (a first burst of webhooks) then kept a
        // plan that thought `records` held one row: it found each due record by reading every record of the
        // flow (a nested loop over `records_source_key`), 2 s of CPU per claim of 500 at 20,000 records,
        // where a fresh plan probes the primary key. A custom plan reads the table's current size. The records
        // are found by id and their flow checked with `IS NOT DISTINCT FROM`, which no index serves, so no plan
        // reaches them through an index on the flow (see the completion).
        let (expired, ..): (bool, String, String, String, String) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM record_leases WHERE flow = $1 AND expires_at <= $2), \
             set_config('enable_sort', 'off', true), set_config('jit', 'off', true), \
             set_config('enable_seqscan', 'off', true), set_config('plan_cache_mode', 'force_custom_plan', true)",
        )
        .bind(&self.flow)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(self.db("claim", None))?;
        let lapsed: i64 = if expired {
            sqlx::query_scalar(
                "WITH expired AS ( \
                   DELETE FROM record_leases WHERE id IN (SELECT id FROM record_leases \
                     WHERE flow = $1 AND expires_at <= $2 ORDER BY expires_at LIMIT 64 FOR UPDATE SKIP LOCKED) \
                   RETURNING record_ids), \
                 lapsed AS ( \
                   SELECT r.id FROM records r WHERE r.id = ANY(ARRAY(SELECT unnest(record_ids) FROM expired)) \
                   AND r.flow IS NOT DISTINCT FROM $1 AND r.state = 'delivering' AND r.lease_expires_at <= $2 \
                   ORDER BY r.id FOR NO KEY UPDATE OF r), \
                 freed AS ( \
                   UPDATE records r SET lease_expires_at = NULL FROM lapsed \
                   WHERE r.id = lapsed.id AND r.state = 'delivering' AND r.lease_expires_at <= $2 RETURNING r.id) \
                 SELECT COUNT(*) FROM freed",
            )
            .bind(&self.flow)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(self.db("claim lapsed leases", None))?
        } else {
            0
        };
        if lapsed > 0 {
            tracing::debug!(flow = %self.flow, records = lapsed, "leases lapsed; their records are claimable again");
        }
        // Then two statements. The first locks the due rows (skipping those another replica holds), leases them
        // and returns them as leased (`RETURNING` gives the version it wrote, made from the newest committed
        // one); its claim's lineage event stays in the row (`claimed_*`, schema version 16), written out by
        // the update trigger when the row moves on. It must not read the payloads: it reads them from its
        // snapshot, but a row whose update committed after the snapshot is locked and leased in its newest
        // version, so an ingest committing mid-claim would have the newer generation leased with the older
        // payload, and the worker would deliver the old revision as the new one. The second statement reads
        // only the payloads, under a fresh snapshot while the rows stay locked (an ingest writes the row before
        // the payload and waits for the lock), so each generation comes with its own payload. Reading the
        // records there again cost a second probe of `records` per record, ~15 % of a claim's buffers.
        let sql = format!(
            "WITH due AS ( \
               SELECT r.id, r.state AS previous_state, r.lease_owner AS previous_owner \
               FROM record_queue q JOIN records r ON r.id = q.record_id \
               WHERE q.flow = $1 AND q.bucket = ANY($2) AND q.due_at <= $3 \
               AND r.flow IS NOT DISTINCT FROM $1 AND r.state IN {PENDING} AND r.next_attempt_at <= $3 \
               AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= $3) \
               ORDER BY q.due_at LIMIT $4 FOR UPDATE OF r SKIP LOCKED), \
             claimed AS ( \
               UPDATE records r SET \
               claimed_from = CASE WHEN r.state = 'delivering' THEN r.claimed_from ELSE r.state END, \
               state = 'delivering', lease_owner = $5, lease_expires_at = $6, next_attempt_at = $6, \
               fence = r.fence + 1, attempts = r.attempts + 1, updated_at = $3, \
               claimed_event = nextval('lineage_id_seq'), claimed_at = $3, claimed_by = $5, claimed_until = $6, \
               claimed_over = CASE WHEN due.previous_state = 'delivering' THEN due.previous_owner END \
               FROM due LEFT JOIN (SELECT NULL::text AS body) p ON false WHERE r.id = due.id \
               RETURNING {RECORD_COLUMNS}) \
             SELECT * FROM claimed"
        );
        // `p` stands in for the payloads, read below: RECORD_COLUMNS names `p.body`.
        let mut rows: Vec<RecordRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(&self.flow)
            .bind(&bucket_list)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(worker)
            .bind(expires)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("claim", None))?;
        if rows.is_empty() {
            tx.commit().await.map_err(self.db("claim commit", None))?;
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let mut payloads: HashMap<i64, String> =
            sqlx::query_as("SELECT record_id, body FROM payloads WHERE record_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(self.db("claim read", None))?
                .into_iter()
                .collect();
        tx.commit().await.map_err(self.db("claim commit", None))?;
        // By next attempt time and id, as before sorts went off here: every claimed row's next attempt is now
        // its lease's end, the same for all, so that is by id.
        rows.sort_by_key(|row| row.id);
        rows.into_iter()
            .filter_map(|mut row| {
                // A leased record always has its payload (only a delivered record's is reduced away); one
                // without is left out, as the join that read them did, and its lease runs out.
                let Some(payload) = payloads.remove(&row.id) else {
                    tracing::warn!(flow = %self.flow, record = row.id, "a leased record has no payload; left out of the claim");
                    return None;
                };
                row.payload = payload;
                Some(row.into_claimed())
            })
            .collect()
    }

    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<CompletionResult>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now_ms();
        let n = completions.len();
        let mut ids = Vec::with_capacity(n);
        let mut generations = Vec::with_capacity(n);
        let mut fences = Vec::with_capacity(n);
        let mut states: Vec<Option<String>> = Vec::with_capacity(n);
        let mut next_ats = Vec::with_capacity(n);
        let mut last_errors = Vec::with_capacity(n);
        let mut classes: Vec<Option<String>> = Vec::with_capacity(n);
        let mut reasons = Vec::with_capacity(n);
        let mut responses = Vec::with_capacity(n);
        let mut rules = Vec::with_capacity(n);
        let mut roles = Vec::with_capacity(n);
        let mut retry_increments = Vec::with_capacity(n);
        let mut failures = Vec::with_capacity(n);
        let mut details = Vec::with_capacity(n);
        let mut exception_snapshots = LineageBatch::default();
        let mut snapshot_by_id: HashMap<i64, String> = HashMap::new();
        let mut ticket_fps: Vec<Option<String>> = Vec::with_capacity(n);
        // Each completion's ticket cause, in batch order.
        let mut causes: Vec<Option<(String, tickets::Cause)>> = (0..n).map(|_| None).collect();
        // The statement's rows go in record-id order, the order in which the update locks them (see below).
        // A record completed twice in one batch is sent once, with its first completion: that one applies
        // and the later one is refused, as it would be in a batch of its own.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| completions[i].claim.id.0);
        order.dedup_by_key(|i| completions[*i].claim.id.0);
        for &index in &order {
            let completion = &completions[index];
            let claim = completion.claim;
            let params = completion_params(&self.flow, &completion.outcome, now);
            let mut detail = params.detail;
            detail["fence"] = json!(claim.fence);
            ids.push(claim.id.0);
            generations.push(claim.generation);
            fences.push(claim.fence);
            states.push(params.new_state.map(str::to_string));
            next_ats.push(params.next_attempt_at);
            last_errors.push(params.last_error);
            classes.push(params.error_class.map(str::to_string));
            reasons.push(params.dead_letter_reason);
            responses.push(params.erp_response);
            rules.push(params.hold_rule);
            roles.push(params.hold_role);
            retry_increments.push(params.retry_increment);
            failures.push(params.failed);
            details.push(detail.to_string());
            if let Some(snapshot) = params.snapshot {
                snapshot_by_id.insert(claim.id.0, snapshot);
            }
            ticket_fps.push(params.ticket.as_ref().map(|(fp, _)| fp.clone()));
            causes[index] = params.ticket;
        }

        // A batch of deliveries only (the steady state) takes statements of its own: every column they write is
        // the same for all its records, so they send the ids (three arrays when a batch starts again, below)
        // instead of fifteen arrays and have no lineage to insert. The same lock order (see above).
        let delivered_only = completions
            .iter()
            .all(|c| matches!(c.outcome, super::Outcome::Delivered));
        let mut tx = self.begin_completion(delivered_only).await?;
        // A backlog inserted faster than autovacuum analyzes leaves statistics that call the batch's records
        // "a handful of rows", and the planner then joins them to the batch by a nested loop that re-runs
        // the UNNEST for every record: 200-300 ms per batch of 500, and worse as batches grow. So the batch
        // is materialised once, the records are found by id, and nested loops are off for this transaction
        // (a hash join of two ~500-row sides is right whatever the statistics say).
        //
        // The update takes the batch's row locks in record-id order, the order every writer of existing
        // records takes them in (an ingest locks the stored keys it names by id before it writes): a
        // completion and an ingest of the same records then queue behind each other and never deadlock
        // (which PostgreSQL resolves by aborting one of them, 40P01). The records are read through the
        // primary key's `id = ANY` scan, which returns them in id order, and the batch's rows are in id
        // order too; bitmap and sequential scans, which return rows in the order they lie on disk, are off
        // for this transaction, so whichever side the join hashes, rows reach the update in id order. No
        // separate locking step: it cost a second read and a WAL record per row (~5 us a record), a
        // quarter of the completion. The checks (flow, generation, fence, state) are conditions of the
        // update, so PostgreSQL rechecks them on a row's newest version when it had to wait for the row.
        //
        // A delivery writes no lineage row: its event stays in the record's row, under a lineage id reserved
        // now, until the row moves on (schema version 15, `meshline_records_updated`); every other outcome is a
        // lineage row with its detail.
        //
        // A release gives its claim's attempt back (the record was not tried), so its claim's event, which
        // reads the row's attempts, is written out first, under the id reserved at the claim, as the attempt
        // it was; the update trigger and the readers then find it stored and tell it once.
        //
        // JIT goes off with them: a plan that has no other way than a nested loop (a trigger's, a check's) is
        // then costed above `jit_above_cost`, and compiling it with LLVM took 0.1-1 s per statement.
        //
        // The flow is checked with `flow IS NOT DISTINCT FROM $n`, not `flow = $n`, here and wherever records are
        // found by id (the refusal check below, a claim's due and lapsed records). Every index of `records` but
        // the primary key starts with `flow`, and a young ledger (or a flow new to a shared one) has no
        // statistics that say how many records `flow = $n` selects: the planner guessed "a handful" and found
        // the batch by reading every record of the flow through `records_source_key`, 13,700 records read to
        // complete 384 in the end-to-end bench, 13 ms a completion where 4 do. For a column that is never null
        // the two tests agree, but no index serves `IS NOT DISTINCT FROM`, so the primary key is the only way in.
        // A delivery raises no ticket, so its correlation id and source key are not read back.
        let delivery_applied = |(id, generation, fence, received_at): (i64, i64, i64, i64)| {
            (
                id,
                generation,
                fence,
                received_at,
                String::new(),
                String::new(),
            )
        };
        let applied: Vec<(i64, i64, i64, i64, String, String)> = if delivered_only {
            // The records still held under the lease their claim's event names (tested on each row's newest
            // version, so a lease cleared meanwhile fails it): each goes from `delivering` under that lease to
            // `delivered`, so the statement knows every counter's change without the trigger reading the old
            // and new rows (a third of a completion's database time): one more delivered, one less pending,
            // the time to recover of those that had failed, the newest delivery; and one record less held under
            // its claim's registration, which goes once it holds none. A registration locked elsewhere is
            // skipped, as the trigger skips it (see schema version 16). The counters' changes are summed from
            // the per-lease counts, one pass over the updated rows instead of two.
            //
            // The statement's deliveries share one lineage id, reserved once (an init plan), not one per record
            // (`nextval` was 5 % of the statement's work): an id orders the events of one record, which is all
            // that reads it (a record's history, and the write-out that finds an event stored by record and id),
            // and this one is reserved after every event of these records that came before (their claims, and
            // whatever was appended before the delivery was tried) and before any that comes after.
            let mut applied: Vec<(i64, i64, i64, i64, String, String)> =
                sqlx::query_as::<_, (i64, i64, i64, i64)>(
                    "WITH applied AS ( \
                       UPDATE records r SET state = 'delivered', claimed_from = NULL, lease_owner = NULL, \
                       lease_expires_at = NULL, delivered_at = $2, updated_at = $2, ticket = NULL, \
                       delivered_event = (SELECT nextval('lineage_id_seq')) \
                       WHERE r.id = ANY($1) AND r.flow IS NOT DISTINCT FROM $3 AND r.state = 'delivering' \
                       AND r.lease_owner = r.claimed_by AND r.lease_expires_at = r.claimed_until \
                       RETURNING r.id, r.generation, r.fence, r.received_at, r.first_failure_at, r.claimed_by, \
                       r.claimed_until), \
                     unleased AS MATERIALIZED (SELECT claimed_by AS owner, claimed_until AS expires_at, \
                       COUNT(*) AS n, COUNT(first_failure_at) AS recovered, \
                       COALESCE(SUM($2 - first_failure_at), 0)::bigint AS recovery_ms FROM applied GROUP BY 1, 2), \
                     tally AS (SELECT SUM(n)::bigint AS n, SUM(recovered)::bigint AS recovered, \
                       SUM(recovery_ms)::bigint AS recovery_ms FROM unleased), \
                     counted AS ( \
                       INSERT INTO ledger_counters (flow, counter, shard, value) \
                       SELECT $3, k.counter, pg_backend_pid(), k.value FROM tally, \
                       UNNEST(ARRAY['delivered', 'last_delivery_at', 'mttr_count', 'mttr_sum_ms', 'pending'], \
                         ARRAY[n, $2, recovered, recovery_ms, -n]) AS k(counter, value) \
                       WHERE tally.n > 0 AND k.value <> 0 ORDER BY 2 \
                       ON CONFLICT (flow, counter, shard) DO UPDATE SET value = CASE \
                         WHEN EXCLUDED.counter = 'last_delivery_at' THEN GREATEST(ledger_counters.value, EXCLUDED.value) \
                         ELSE ledger_counters.value + EXCLUDED.value END), \
                     registrations AS MATERIALIZED (SELECT l.id, l.held - u.n AS held FROM record_leases l \
                       JOIN unleased u ON l.flow = $3 AND l.expires_at = u.expires_at AND l.owner = u.owner \
                       ORDER BY l.id FOR NO KEY UPDATE OF l SKIP LOCKED), \
                     counted_down AS (UPDATE record_leases l SET held = g.held FROM registrations g \
                       WHERE l.id = g.id AND g.held > 0), \
                     emptied AS (DELETE FROM record_leases l USING registrations g \
                       WHERE l.id = g.id AND g.held <= 0) \
                     SELECT id, generation, fence, received_at FROM applied",
                )
                .bind(&ids)
                .bind(now)
                .bind(&self.flow)
                .fetch_all(&mut *tx)
                .await
                .map_err(self.db("complete", None))?
                .into_iter()
                .map(delivery_applied)
                .collect();
            // The statement does not test each record's claim (generation and fence): joining the batch's
            // arrays to the records cost a tenth of it. It is tested here instead, before anything commits: a
            // batch in which every record was updated under the claim it names is done; any other (a claim that
            // no longer holds, a lease lapsed and cleared but not yet taken, a record leased by an older binary)
            // rolls back and starts again.
            let claims: HashMap<i64, (i64, i64)> = ids
                .iter()
                .zip(generations.iter().zip(&fences))
                .map(|(id, (generation, fence))| (*id, (*generation, *fence)))
                .collect();
            let all_held = applied.len() == ids.len()
                && applied.iter().all(|(id, generation, fence, ..)| {
                    claims.get(id) == Some(&(*generation, *fence))
                });
            // Started again, it is an update the trigger counts, with each claim a condition: done in this
            // transaction, the records left over would be locked after the others, out of id order (see above).
            // It is rare: a batch of claims that all still hold, the steady state, is done at the first try.
            if !all_held {
                tx.rollback().await.map_err(self.db("complete", None))?;
                tx = self.begin_completion(false).await?;
                applied = sqlx::query_as::<_, (i64, i64, i64, i64)>(
                    "UPDATE records r SET state = 'delivered', claimed_from = NULL, lease_owner = NULL, \
                     lease_expires_at = NULL, delivered_at = $4, updated_at = $4, ticket = NULL, \
                     delivered_event = nextval('lineage_id_seq') \
                     FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS t(id, generation, fence) \
                     WHERE r.id = t.id AND r.id = ANY($1) AND r.flow IS NOT DISTINCT FROM $5 AND r.generation = t.generation \
                     AND r.fence = t.fence AND r.state = 'delivering' \
                     RETURNING r.id, r.generation, r.fence, r.received_at",
                )
                .bind(&ids)
                .bind(&generations)
                .bind(&fences)
                .bind(now)
                .bind(&self.flow)
                .fetch_all(&mut *tx)
                .await
                .map_err(self.db("complete", None))?
                .into_iter()
                .map(delivery_applied)
                .collect();
            }
            applied
        } else {
            sqlx::query_as(
                "WITH t AS MATERIALIZED (SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], \
                   $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
                   $12::bigint[], $13::bool[], $14::text[], $17::text[]) AS t(id, generation, fence, new_state, next_at, \
                   last_error, error_class, dl_reason, erp_response, hold_rule, hold_role, retry_inc, failed, \
                   detail, ticket)), \
                 applied AS ( \
                   UPDATE records r SET state = COALESCE(t.new_state, r.claimed_from, 'received'), \
                   claimed_from = NULL, lease_owner = NULL, lease_expires_at = NULL, \
                   next_attempt_at = COALESCE(t.next_at, r.next_attempt_at), \
                   last_error = COALESCE(t.last_error, r.last_error), \
                   last_error_class = COALESCE(t.error_class, r.last_error_class), \
                   dead_letter_reason = COALESCE(t.dl_reason, r.dead_letter_reason), \
                   erp_response = COALESCE(t.erp_response, r.erp_response), \
                   hold_rule = COALESCE(t.hold_rule, r.hold_rule), hold_role = COALESCE(t.hold_role, r.hold_role), \
                   retries = r.retries + t.retry_inc, \
                   attempts = CASE WHEN t.new_state IS NULL THEN GREATEST(r.attempts - 1, 0) ELSE r.attempts END, \
                   first_failure_at = CASE WHEN t.failed THEN COALESCE(r.first_failure_at, $15) ELSE r.first_failure_at END, \
                   delivered_at = CASE WHEN t.new_state = 'delivered' THEN $15 ELSE r.delivered_at END, \
                   updated_at = $15, \
                   ticket = CASE WHEN t.new_state IN ('delivered', 'dead_lettered', 'held') THEN t.ticket ELSE r.ticket END, \
                   delivered_event = CASE WHEN t.new_state = 'delivered' THEN nextval('lineage_id_seq') END \
                   FROM t WHERE r.id = t.id AND r.id = ANY($1) AND r.flow IS NOT DISTINCT FROM $16 \
                   AND r.generation = t.generation AND r.fence = t.fence AND r.state = 'delivering' \
                   RETURNING r.id, r.generation, r.fence, r.correlation_id, r.received_at, r.source_key, t.new_state, \
                   t.detail, r.attempts, r.claimed_event, r.claimed_at, r.claimed_by, r.claimed_until, r.claimed_over), \
                 claim_events AS ( \
                   INSERT INTO lineage (id, record_id, generation, at, step, detail, correlation_id) \
                   SELECT a.claimed_event, a.id, a.generation, a.claimed_at, 'claimed', \
                   json_build_object('worker', a.claimed_by, 'fence', a.fence, 'attempt', a.attempts + 1, \
                   'lease_expires_at', a.claimed_until, 'taken_over_from', a.claimed_over)::text, a.correlation_id \
                   FROM applied a WHERE a.new_state IS NULL AND a.claimed_event IS NOT NULL \
                   AND NOT EXISTS (SELECT 1 FROM lineage l WHERE l.record_id = a.id AND l.id = a.claimed_event)), \
                 lineage_rows AS ( \
                   INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
                   SELECT id, generation, $15, COALESCE(new_state, 'released'), detail, correlation_id FROM applied \
                   WHERE new_state IS DISTINCT FROM 'delivered') \
                 SELECT id, generation, fence, received_at, correlation_id, source_key FROM applied",
            )
            .bind(&ids)
            .bind(&generations)
            .bind(&fences)
            .bind(&states)
            .bind(&next_ats)
            .bind(&last_errors)
            .bind(&classes)
            .bind(&reasons)
            .bind(&responses)
            .bind(&rules)
            .bind(&roles)
            .bind(&retry_increments)
            .bind(&failures)
            .bind(&details)
            .bind(now)
            .bind(&self.flow)
            .bind(&ticket_fps)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("complete", None))?
        };
        // Each applied record's receipt time (for the latency), correlation id and source key (for tickets).
        let mut applied_claims: HashMap<i64, (i64, i64)> = HashMap::with_capacity(applied.len());
        let applied: HashMap<i64, (i64, String, String)> = applied
            .into_iter()
            .map(
                |(id, generation, fence, received_at, correlation_id, source_key)| {
                    applied_claims.insert(id, (generation, fence));
                    (id, (received_at, correlation_id, source_key))
                },
            )
            .collect();
        // Which completions applied, in batch order. A claim completed twice in one batch is applied once,
        // by its first completion; the later one is refused, as it would be in a batch of its own (and
        // so is a completion whose claim is not the one the update matched).
        let mut answered: HashSet<i64> = HashSet::with_capacity(n);
        let took: Vec<bool> = completions
            .iter()
            .map(|c| {
                applied_claims.get(&c.claim.id.0) == Some(&(c.claim.generation, c.claim.fence))
                    && answered.insert(c.claim.id.0)
            })
            .collect();
        // The revision's tally of the batch, one upsert on this connection's shard (see schema version 7).
        if let Some(revision) = self.revision.get() {
            let mut tally = RevisionTally::default();
            for (completion, took) in completions.iter().zip(&took) {
                if let (true, Some((received_at, ..))) = (took, applied.get(&completion.claim.id.0))
                {
                    tally.add(&completion.outcome, now - received_at);
                }
            }
            if !tally.is_empty() {
                let mut upsert = sqlx::query(AssertSqlSafe(revision_upsert(true)))
                    .bind(&self.flow)
                    .bind(revision)
                    .bind(revision_slot(now));
                for value in tally.values() {
                    upsert = upsert.bind(*value);
                }
                upsert
                    .execute(&mut *tx)
                    .await
                    .map_err(self.db("complete revision window", None))?;
            }
        }

        let refused: Vec<i64> = completions
            .iter()
            .zip(&took)
            .filter(|(_, took)| !**took)
            .map(|(c, _)| c.claim.id.0)
            .collect();
        let mut current: HashMap<i64, (i64, i64, String)> = HashMap::new();
        if !refused.is_empty() {
            let rows = sqlx::query(
                "SELECT id, generation, fence, correlation_id FROM records WHERE id = ANY($2) \
                 AND flow IS NOT DISTINCT FROM $1",
            )
            .bind(&self.flow)
            .bind(&refused)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("complete check", None))?;
            for row in rows {
                current.insert(
                    row.get("id"),
                    (
                        row.get("generation"),
                        row.get("fence"),
                        row.get("correlation_id"),
                    ),
                );
            }
        }

        let mut results = Vec::with_capacity(n);
        let mut refusals = LineageBatch::default();
        for (completion, took) in completions.iter().zip(&took) {
            let claim = completion.claim;
            if *took {
                if let Some(snapshot) = snapshot_by_id.remove(&claim.id.0) {
                    exception_snapshots.push(
                        claim.id.0,
                        claim.generation,
                        completion.outcome.step(),
                        snapshot,
                        String::new(),
                    );
                }
                results.push(CompletionResult::Applied);
                continue;
            }
            let Some((generation, fence, correlation_id)) = current.get(&claim.id.0) else {
                results.push(CompletionResult::NotFound);
                continue;
            };
            let superseded = *generation != claim.generation;
            if superseded && *fence == claim.fence {
                // The stale holder still holds the lease over the newer generation: release it now
                // rather than make the update wait for the lease to expire.
                sqlx::query(
                    "UPDATE records SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND fence = $2",
                )
                .bind(claim.id.0)
                .bind(claim.fence)
                .execute(&mut *tx)
                .await
                .map_err(self.db("release superseded lease", Some(claim.id)))?;
            }
            let detail = json!({
                "outcome": completion.outcome.step(),
                "claim_generation": claim.generation,
                "claim_fence": claim.fence,
                "current_fence": fence,
                "result": if superseded { "superseded" } else { "lease_lost" },
            });
            refusals.push(
                claim.id.0,
                *generation,
                "completion_refused",
                detail.to_string(),
                correlation_id.clone(),
            );
            results.push(if superseded {
                CompletionResult::Superseded {
                    current_generation: *generation,
                }
            } else {
                CompletionResult::LeaseLost
            });
        }
        refusals
            .insert(&mut tx, now)
            .await
            .map_err(self.db("complete lineage", None))?;
        exception_snapshots
            .insert_snapshots(&mut tx, now)
            .await
            .map_err(self.db("complete snapshots", None))?;
        // One upsert per cause in the batch, not per record, under the tickets' locks in fingerprint order.
        let mut occurrences = tickets::Occurrences::new();
        for ((completion, took), cause) in completions.iter().zip(&took).zip(&causes) {
            let id = completion.claim.id.0;
            if let (true, Some((_, correlation_id, source_key)), Some((fingerprint, cause))) =
                (took, applied.get(&id), cause)
            {
                let example =
                    tickets::example_of(&completion.outcome, id, correlation_id, source_key, now);
                tickets::add_occurrence(&mut occurrences, fingerprint, cause, example);
            }
        }
        for (fingerprint, (cause, count, examples)) in occurrences {
            self.ticket_occur(&mut tx, &fingerprint, &cause, count, examples, None, now)
                .await?;
        }
        tx.commit()
            .await
            .map_err(self.db("complete commit", None))?;
        Ok(results)
    }

    async fn append_lineage(&self, events: Vec<NewLineageEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let ids: Vec<i64> = events.iter().map(|e| e.record.0).collect();
        let steps: Vec<String> = events.iter().map(|e| e.step.clone()).collect();
        let details: Vec<String> = events.iter().map(|e| e.detail.to_string()).collect();
        // FOR KEY SHARE does what the foreign key to `records` did before schema version 6: a record that a
        // purge is deleting is waited for and then skipped (reported below), never left with orphan lineage.
        // Taken in record-id order like every other row lock on records, the events of one record in the
        // order given.
        let inserted = sqlx::query(
            "INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
             SELECT r.id, r.generation, $1, t.step, t.detail, r.correlation_id \
             FROM UNNEST($2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY AS t(id, step, detail, position) \
             JOIN records r ON r.id = t.id AND r.flow = $5 \
             ORDER BY r.id, t.position FOR KEY SHARE OF r",
        )
        .bind(now)
        .bind(&ids)
        .bind(&steps)
        .bind(&details)
        .bind(&self.flow)
        .execute(&self.pool)
        .await
        .map_err(self.db("append lineage", None))?;
        if inserted.rows_affected() != events.len() as u64 {
            // Find the first unknown record for the error; the rest were written, which is harmless.
            for event in &events {
                let exists: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM records WHERE id = $1 AND flow = $2")
                        .bind(event.record.0)
                        .bind(&self.flow)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(self.db("append lineage", Some(event.record)))?;
                if exists.is_none() {
                    return Err(LedgerError::NotFound {
                        flow: self.flow.clone(),
                        record: event.record,
                    });
                }
            }
        }
        Ok(())
    }

    async fn approve_held(
        &self,
        id: RecordId,
        seen: &HeldAsSeen,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        self.manual_batch(vec![id], ManualAction::Approve, Some(seen), actor, reason)
            .await
    }

    async fn reject_held(
        &self,
        id: RecordId,
        seen: &HeldAsSeen,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        self.manual_batch(vec![id], ManualAction::Reject, Some(seen), actor, reason)
            .await
    }

    async fn replay_dead_letter(&self, id: RecordId, actor: &str, reason: &str) -> Result<()> {
        self.manual_batch(vec![id], ManualAction::Replay, None, actor, reason)
            .await
    }

    async fn replay_dead_letters_by_reason(
        &self,
        dead_letter_reason: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<RecordId>> {
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("replay by reason", None))?;
        // Locked in the same transaction, so a dead letter cannot be replayed twice by two callers; in
        // record-id order, as an ingest (which may update a dead letter) locks rows, so the two never
        // deadlock.
        let ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "{DEAD_LETTERS} AND r.dead_letter_reason = $2 ORDER BY a.record_id FOR UPDATE OF r"
        )))
        .bind(&self.flow)
        .bind(dead_letter_reason)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("replay by reason", None))?;
        let ids: Vec<RecordId> = ids.into_iter().map(RecordId).collect();
        for id in &ids {
            self.manual(&mut tx, *id, ManualAction::Replay, None, actor, reason, now)
                .await?;
        }
        tx.commit()
            .await
            .map_err(self.db("replay by reason", None))?;
        Ok(ids)
    }

    async fn get(&self, id: RecordId) -> Result<Option<RecordDetail>> {
        let record = Some(id);
        // REPEATABLE READ: the record, its lineage and its snapshots from one snapshot of the database.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(self.db("get", record))?;
        let row: Option<RecordRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM {RECORD_FROM} WHERE r.id = $1 AND r.flow = $2"
        )))
        .bind(id.0)
        .bind(&self.flow)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.db("get", record))?;
        let Some(row) = row else {
            return Ok(None);
        };
        // A delivery's event (schema version 15) and a claim's (16) are kept in their record's row until the
        // row moves on: each is read from there, in its place by its reserved id, unless it has been written
        // out to `lineage`.
        let lineage: Vec<LineageRow> = sqlx::query_as(
            "SELECT at, generation, step, detail, correlation_id FROM ( \
               SELECT id, at, generation, step, detail, correlation_id FROM lineage WHERE record_id = $1 \
               UNION ALL \
               SELECT r.delivered_event, r.delivered_at, r.generation, 'delivered', \
               json_build_object('fence', r.fence)::text, r.correlation_id FROM records r \
               WHERE r.id = $1 AND r.state = 'delivered' AND r.delivered_event IS NOT NULL \
               AND r.purged_at IS NULL \
               AND NOT EXISTS (SELECT 1 FROM lineage l WHERE l.record_id = r.id AND l.id = r.delivered_event) \
               UNION ALL \
               SELECT r.claimed_event, r.claimed_at, r.generation, 'claimed', \
               json_build_object('worker', r.claimed_by, 'fence', r.fence, 'attempt', r.attempts, \
               'lease_expires_at', r.claimed_until, 'taken_over_from', r.claimed_over)::text, r.correlation_id \
               FROM records r WHERE r.id = $1 AND r.claimed_event IS NOT NULL AND r.purged_at IS NULL \
               AND NOT EXISTS (SELECT 1 FROM lineage l WHERE l.record_id = r.id AND l.id = r.claimed_event) \
             ) AS events ORDER BY id",
        )
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("get lineage", record))?;
        let snapshots: Vec<SnapshotRow> = sqlx::query_as(
            "SELECT generation, kind, at, body FROM snapshots WHERE record_id = $1 ORDER BY generation, at",
        )
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("get snapshots", record))?;
        let interventions: Vec<InterventionRow> = sqlx::query_as(
            "SELECT record_id, action, actor, reason, at FROM interventions WHERE flow = $1 AND record_id = $2 ORDER BY id",
        )
        .bind(&self.flow)
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("get interventions", record))?;
        tx.commit().await.map_err(self.db("get", record))?;
        assemble_detail(row, lineage, snapshots, interventions).map(Some)
    }

    async fn list(
        &self,
        state: RecordState,
        reason: Option<&str>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<RecordView>> {
        let (from, listed) = listing_source(state);
        let rows: Vec<RecordRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM {from} WHERE r.flow = $1 AND r.state = $2 {listed} \
             AND r.id > $3 AND ($5::TEXT IS NULL OR r.dead_letter_reason = $5) ORDER BY r.id LIMIT $4",
        )))
        .bind(&self.flow)
        .bind(state.as_str())
        .bind(after.map_or(0, |id| id.0))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(reason)
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("list", None))?;
        rows.into_iter().map(RecordRow::into_view).collect()
    }

    async fn recent_inputs(&self, limit: usize) -> Result<Vec<ReplayRecord>> {
        super::check_replay_limit(&self.flow, limit)?;
        // The payloads' primary key walked backwards: only kept records have a payload row, so the scan
        // stops after `limit` of the flow's rows (and the planner may still take the flow's key index when
        // the flow is a small part of a shared database).
        let rows: Vec<(i64, String, String, String, String)> = sqlx::query_as(
            "SELECT r.id, r.source_key, r.state, r.contract_version, p.body \
             FROM payloads p JOIN records r ON r.id = p.record_id \
             WHERE r.flow = $1 ORDER BY p.record_id DESC LIMIT $2",
        )
        .bind(&self.flow)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("recent_inputs", None))?;
        rows.into_iter()
            .map(|(id, source_key, state, contract_version, payload)| {
                Ok(ReplayRecord {
                    id: RecordId(id),
                    source_key,
                    state: super::parse_state(&self.flow, id, &state)?,
                    contract_version,
                    payload,
                })
            })
            .collect()
    }

    async fn counts(&self) -> Result<Counts> {
        let now = self.clock.now_ms();
        // One statement, so one snapshot: the kept counters (shards summed), the window's minutes and the
        // oldest waiting record (see `OLDEST_PENDING`).
        let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT 'kept' AS kind, counter, (CASE WHEN counter = ANY($3) THEN MAX(value) ELSE SUM(value) END)::BIGINT AS value \
             FROM ledger_counters WHERE flow = $1 GROUP BY counter \
             UNION ALL SELECT 'window', counter, SUM(value)::BIGINT FROM ledger_window \
             WHERE flow = $1 AND minute >= $2 GROUP BY counter \
             UNION ALL SELECT 'oldest', 'oldest_pending_at', {OLDEST_PENDING}",
        )))
        .bind(&self.flow)
            .bind(window_start_minute(now))
            .bind(MAX_COUNTERS)
            .fetch_all(&self.pool)
            .await
            .map_err(self.db("counts", None))?;
        let (kept, window, oldest) = split_kept(rows);
        Ok(counts_from_kept(&kept, &window, oldest, now))
    }

    async fn recount(&self) -> Result<Counts> {
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await.map_err(self.db("recount", None))?;
        // Both reads from one snapshot.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(self.db("recount", None))?;
        let sql = format!(
            "SELECT COUNT(*) AS records, COALESCE(SUM(generation), 0)::BIGINT AS received, \
             COUNT(*) FILTER (WHERE state = 'delivered') AS delivered, \
             COUNT(*) FILTER (WHERE first_failure_at IS NOT NULL) AS failed, \
             COALESCE(SUM(retries), 0)::BIGINT AS retried, \
             COUNT(*) FILTER (WHERE state = 'dead_lettered') AS dead_lettered, \
             COUNT(*) FILTER (WHERE state = 'held') AS held, \
             COUNT(*) FILTER (WHERE state IN {PENDING}) AS pending, \
             MIN(received_at) FILTER (WHERE state IN {PENDING}) AS oldest_pending_at, \
             MAX(delivered_at) AS last_delivery_at, \
             (AVG(delivered_at - first_failure_at) FILTER (WHERE state = 'delivered' AND first_failure_at IS NOT NULL))::DOUBLE PRECISION AS mttr_ms \
             FROM records WHERE flow = $1"
        );
        let row: CountsRow = sqlx::query_as(AssertSqlSafe(sql))
            .bind(&self.flow)
            .fetch_one(&mut *tx)
            .await
            .map_err(self.db("recount", None))?;
        let interventions: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM interventions WHERE flow = $1")
                .bind(&self.flow)
                .fetch_one(&mut *tx)
                .await
                .map_err(self.db("recount", None))?;
        let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT 'kept' AS kind, counter, SUM(value)::BIGINT AS value FROM ledger_counters \
             WHERE flow = $1 GROUP BY counter \
             UNION ALL SELECT 'window', counter, SUM(value)::BIGINT FROM ledger_window \
             WHERE flow = $1 AND minute >= $2 GROUP BY counter",
        )
        .bind(&self.flow)
        .bind(window_start_minute(now))
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("recount", None))?;
        tx.commit().await.map_err(self.db("recount", None))?;
        let (kept, window, _) = split_kept(rows);
        let mut counts = assemble_counts(row, interventions, now);
        add_events(&mut counts, &kept, &window);
        Ok(counts)
    }

    async fn purge(&self, retention: &Retention, limit: usize) -> Result<PurgeReport> {
        let now = self.clock.now_ms();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut report = PurgeReport::default();
        if let Some(cutoff) = retention_cutoff(now, retention.dead_letters) {
            let mut tx = self.pool.begin().await.map_err(self.db("purge", None))?;
            // SKIP LOCKED: a dead letter being replayed right now is left for the next round.
            let ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
                "{DEAD_LETTERS} AND r.updated_at < $2 ORDER BY a.record_id LIMIT $3 FOR UPDATE OF r SKIP LOCKED"
            )))
            .bind(&self.flow)
            .bind(cutoff)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("purge dead letters", None))?;
            let purged = ids.len() as i64;
            if purged > 0 {
                // Interventions stay (they are the flow's history and its count), detached from the record.
                // The foreign keys are checked at the end of the statement, once every CTE has run.
                sqlx::query(
                    "WITH detached AS (UPDATE interventions SET record_id = NULL WHERE record_id = ANY($1)), \
                     lineage_gone AS (DELETE FROM lineage WHERE record_id = ANY($1)), \
                     snapshots_gone AS (DELETE FROM snapshots WHERE record_id = ANY($1)), \
                     payloads_gone AS (DELETE FROM payloads WHERE record_id = ANY($1)) \
                     DELETE FROM records WHERE id = ANY($1)",
                )
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(self.db("purge dead letters", None))?;
                self.bump_counter(&mut tx, DEAD_LETTERS_PURGED, purged)
                    .await?;
            }
            tx.commit().await.map_err(self.db("purge", None))?;
            report.dead_letters = purged.max(0) as u64;
        }
        if let Some(cutoff) = retention_cutoff(now, retention.delivered) {
            let mut tx = self.pool.begin().await.map_err(self.db("purge", None))?;
            let rows: Vec<(i64, i64, Option<String>, i64)> = sqlx::query_as(
                // Through `records_unpurged`, by receipt: a record delivered before the cutoff was received
                // before it (schema version 14: no index names the delivery time, which a completion sets).
                "SELECT id, generation, external_id, delivered_at FROM records \
                 WHERE flow = $1 AND purged_at IS NULL AND received_at < $2 \
                 AND state = 'delivered' AND delivered_at < $2 \
                 ORDER BY received_at LIMIT $3 FOR UPDATE SKIP LOCKED",
            )
            .bind(&self.flow)
            .bind(cutoff)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("purge delivered", None))?;
            if !rows.is_empty() {
                let ids: Vec<i64> = rows.iter().map(|(id, ..)| *id).collect();
                let outcomes: Vec<String> = rows
                    .iter()
                    .map(|(_, generation, external_id, at)| {
                        compact_outcome(*generation, external_id.as_deref(), *at)
                    })
                    .collect();
                sqlx::query(
                    "WITH compacted AS (UPDATE records r SET outcome = t.outcome, purged_at = $3, \
                     last_error = NULL, erp_response = NULL, hold_rule = NULL, hold_role = NULL \
                     FROM UNNEST($1::bigint[], $2::text[]) AS t(id, outcome) WHERE r.id = t.id), \
                     lineage_gone AS (DELETE FROM lineage WHERE record_id = ANY($1)), \
                     snapshots_gone AS (DELETE FROM snapshots WHERE record_id = ANY($1)) \
                     DELETE FROM payloads WHERE record_id = ANY($1)",
                )
                .bind(&ids)
                .bind(&outcomes)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(self.db("purge delivered", None))?;
                self.bump_counter(&mut tx, PAYLOADS_PURGED, ids.len() as i64)
                    .await?;
            }
            tx.commit().await.map_err(self.db("purge", None))?;
            report.payloads = rows.len() as u64;
        }
        sqlx::query("DELETE FROM revision_window WHERE flow = $1 AND slot < $2")
            .bind(&self.flow)
            .bind(revision_slot(now - REVISION_RETENTION_MS))
            .execute(&self.pool)
            .await
            .map_err(self.db("prune the revision window", None))?;
        sqlx::query("DELETE FROM ledger_window WHERE flow = $1 AND minute < $2")
            .bind(&self.flow)
            .bind(window_start_minute(now))
            .execute(&self.pool)
            .await
            .map_err(self.db("purge window", None))?;
        // The shards of connections that closed are folded into shard -1, so a read sums rows of the
        // connections alive (and one more), not of every connection there ever was. Only a live backend
        // writes its own shard, so rows of a pid no longer in pg_stat_activity are written by no one.
        sqlx::query(
            "WITH gone AS (DELETE FROM ledger_counters WHERE flow = $1 AND shard >= 0 \
             AND shard NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL) RETURNING counter, value) \
             INSERT INTO ledger_counters (flow, counter, shard, value) \
             SELECT $1, counter, -1, (CASE WHEN counter = ANY($2) THEN MAX(value) ELSE SUM(value) END)::BIGINT \
             FROM gone GROUP BY counter ORDER BY counter \
             ON CONFLICT (flow, counter, shard) DO UPDATE SET value = CASE WHEN ledger_counters.counter = ANY($2) \
             THEN GREATEST(ledger_counters.value, EXCLUDED.value) ELSE ledger_counters.value + EXCLUDED.value END",
        )
        .bind(&self.flow)
        .bind(MAX_COUNTERS)
        .execute(&self.pool)
        .await
        .map_err(self.db("fold counter shards", None))?;
        Ok(report)
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>)> {
        let (pending, oldest): (i64, Option<i64>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT (SELECT COALESCE(SUM(value), 0)::BIGINT FROM ledger_counters \
             WHERE flow = $1 AND counter = 'pending'), \
             {OLDEST_PENDING}",
        )))
        .bind(&self.flow)
        .fetch_one(&self.pool)
        .await
        .map_err(self.db("backlog", None))?;
        Ok((pending.max(0) as u64, oldest))
    }

    fn shares_delivery_slots(&self) -> bool {
        true
    }

    fn ingest_writers(&self) -> usize {
        INGEST_WRITERS
    }

    async fn acquire_delivery_slots(
        &self,
        holder: &str,
        limit: u32,
        want: usize,
        lease: Duration,
    ) -> Result<Vec<i64>> {
        let limit = i64::from(limit.max(1));
        let want = i64::try_from(want).unwrap_or(i64::MAX).clamp(0, limit);
        if want == 0 {
            return Ok(Vec::new());
        }
        let now = self.clock.now_ms();
        let expires = now.saturating_add(lease_ms(&self.flow, lease)?);
        // The flow's slot rows exist once per limit a process has seen: a larger limit adds rows, a smaller
        // one leaves the surplus unused (`slot < limit` below).
        if self
            .slots_created
            .load(std::sync::atomic::Ordering::Relaxed)
            < limit
        {
            sqlx::query(
                "INSERT INTO delivery_slots (flow, slot) SELECT $1, g FROM generate_series(0, $2 - 1) AS g \
                 ON CONFLICT (flow, slot) DO NOTHING",
            )
            .bind(&self.flow)
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(self.db("create delivery slots", None))?;
            self.slots_created
                .fetch_max(limit, std::sync::atomic::Ordering::Relaxed);
        }
        // SKIP LOCKED: replicas taking slots at the same moment never wait for each other or get the same one.
        sqlx::query_scalar(
            "UPDATE delivery_slots d SET holder = $2, lease_expires_at = $3 \
             FROM (SELECT slot FROM delivery_slots WHERE flow = $1 AND slot < $4 \
                   AND (holder IS NULL OR lease_expires_at <= $5) \
                   ORDER BY slot LIMIT $6 FOR UPDATE SKIP LOCKED) free \
             WHERE d.flow = $1 AND d.slot = free.slot RETURNING d.slot",
        )
        .bind(&self.flow)
        .bind(holder)
        .bind(expires)
        .bind(limit)
        .bind(now)
        .bind(want)
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("acquire delivery slots", None))
    }

    async fn renew_delivery_slots(
        &self,
        holder: &str,
        slots: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let expires = self
            .clock
            .now_ms()
            .saturating_add(lease_ms(&self.flow, lease)?);
        sqlx::query_scalar(
            "UPDATE delivery_slots SET lease_expires_at = $3 \
             WHERE flow = $1 AND holder = $2 AND slot = ANY($4) RETURNING slot",
        )
        .bind(&self.flow)
        .bind(holder)
        .bind(expires)
        .bind(slots)
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("renew delivery slots", None))
    }

    async fn release_delivery_slots(&self, holder: &str, slots: &[i64]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE delivery_slots SET holder = NULL, lease_expires_at = 0 \
             WHERE flow = $1 AND holder = $2 AND slot = ANY($3)",
        )
        .bind(&self.flow)
        .bind(holder)
        .bind(slots)
        .execute(&self.pool)
        .await
        .map_err(self.db("release delivery slots", None))?;
        Ok(())
    }

    async fn reclaim_delivery_slots(&self, holder: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE delivery_slots SET holder = NULL, lease_expires_at = 0 WHERE flow = $1 AND holder = $2",
        )
        .bind(&self.flow)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(self.db("reclaim delivery slots", None))?;
        Ok(done.rows_affected())
    }

    fn attribute_to(&self, revision: &str) -> Result<()> {
        set_revision(&self.revision, &self.flow, revision)
    }

    fn revision(&self) -> Option<&str> {
        self.revision.get().map(String::as_str)
    }

    async fn revision_measures(
        &self,
        revision: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<RevisionMeasures> {
        let (first, end) = revision_slots(since, until);
        let row = sqlx::query(AssertSqlSafe(revision_select(true)))
            .bind(&self.flow)
            .bind(revision)
            .bind(first)
            .bind(end)
            .fetch_one(&self.pool)
            .await
            .map_err(self.db("revision measures", None))?;
        let values: Vec<i64> = (0..REVISION_VALUES)
            .map(|i| row.try_get(i))
            .collect::<std::result::Result<_, _>>()
            .map_err(self.db("revision measures", None))?;
        Ok(revision_measures_from(&values))
    }

    async fn release_leases(&self, owner_prefix: &str) -> Result<u64> {
        let pattern = owner_prefix_pattern(&self.flow, owner_prefix)?;
        let now = self.clock.now_ms();
        // Back to where it was claimed from, due now; the fence moves so the old holder's completion is
        // refused even if nobody claims the record before it arrives. `SKIP LOCKED` is not wanted here: a
        // row locked by the old holder's completion in flight is waited for, and then either completed (and
        // no longer delivering) or released. The holder's records are found through its registered leases
        // (schema version 16) and, for those whose lease lapsed and nobody took over yet, through the queue;
        // the registrations are left to expire (a claim deletes them then), so this waits on no claim.
        let released: i64 = sqlx::query_scalar(
            "WITH released AS ( \
               UPDATE records SET state = COALESCE(claimed_from, 'received'), claimed_from = NULL, \
               lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = $3, fence = fence + 1, \
               updated_at = $3 \
               FROM (SELECT r.id, r.lease_owner AS owner FROM records r WHERE r.id IN ( \
                   SELECT unnest(record_ids) FROM record_leases WHERE flow = $1 AND owner LIKE $2 ESCAPE '\\' \
                   UNION ALL SELECT record_id FROM record_queue WHERE flow = $1) \
                 AND r.flow = $1 AND r.state = 'delivering' AND r.lease_owner LIKE $2 ESCAPE '\\' \
                 ORDER BY r.id FOR NO KEY UPDATE OF r) AS held \
               WHERE records.id = held.id AND records.state = 'delivering' \
               RETURNING records.id, records.generation, records.correlation_id, held.owner), \
             lineage_rows AS ( \
               INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
               SELECT id, generation, $3, 'lease_released', json_build_object('owner', owner)::text, \
               correlation_id FROM released) \
             SELECT COUNT(*) FROM released",
        )
        .bind(&self.flow)
        .bind(pattern)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(self.db("release leases", None))?;
        Ok(released.max(0) as u64)
    }

    async fn raise_exception(&self, exception: RaisedException) -> Result<String> {
        let cause = tickets::check_raised(&self.flow, &exception)?;
        let fingerprint = cause.fingerprint(&self.flow);
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("raise exception", None))?;
        self.ticket_occur(&mut tx, &fingerprint, &cause, 1, Vec::new(), Some(1), now)
            .await?;
        tx.commit()
            .await
            .map_err(self.db("raise exception", None))?;
        Ok(fingerprint)
    }

    async fn clear_exception(&self, fingerprint: &str) -> Result<bool> {
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("clear exception", None))?;
        self.lock_ticket(&mut tx, fingerprint).await?;
        let changed = match self.load_ticket(&mut tx, fingerprint).await? {
            Some(row) => tickets::resolve(row, now),
            None => None,
        };
        if let Some((row, times)) = &changed {
            self.store_ticket(&mut tx, row, times).await?;
        }
        tx.commit()
            .await
            .map_err(self.db("clear exception", None))?;
        Ok(changed.is_some())
    }

    async fn settle_tickets(&self) -> Result<Vec<String>> {
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("settle tickets", None))?;
        let mut candidates: Vec<(String, i64)> =
            sqlx::query_as(AssertSqlSafe(tickets::settle_query(postgres_param)))
                .bind(&self.flow)
                .bind(tickets::MAX_TICKETS_PER_READ as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(self.db("settle tickets", None))?;
        // Locked in fingerprint order, as completions lock them, so the two never deadlock.
        candidates.sort();
        let mut resolved = Vec::new();
        for (fingerprint, _) in candidates {
            let row = self.existing_ticket(&mut tx, &fingerprint).await?;
            // Counted again under the lock: a completion may have attached records since the first read.
            let attached: i64 =
                sqlx::query_scalar(AssertSqlSafe(tickets::outstanding_query(postgres_param)))
                    .bind(&self.flow)
                    .bind(&fingerprint)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(self.db("settle tickets", None))?;
            if let Some((row, times)) = tickets::settle(row, attached, now) {
                if attached == 0 {
                    resolved.push(fingerprint);
                }
                self.store_ticket(&mut tx, &row, &times).await?;
            }
        }
        tx.commit().await.map_err(self.db("settle tickets", None))?;
        Ok(resolved)
    }

    async fn tickets(&self, open_only: bool, limit: usize) -> Result<Vec<TicketRecord>> {
        let rows: Vec<TicketRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {} FROM tickets WHERE flow = $1 AND (NOT $2 OR state <> 'resolved') \
             ORDER BY updated_at DESC, fingerprint LIMIT $3",
            tickets::TICKET_COLUMNS
        )))
        .bind(&self.flow)
        .bind(open_only)
        .bind(tickets::read_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("read tickets", None))?;
        rows.into_iter()
            .map(|row| row.into_record(&self.flow))
            .collect()
    }

    async fn ticket(&self, fingerprint: &str) -> Result<Option<TicketRecord>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(self.db("read ticket", None))?;
        self.load_ticket(&mut conn, fingerprint)
            .await?
            .map(|row| row.into_record(&self.flow))
            .transpose()
    }

    async fn assign_ticket(
        &self,
        fingerprint: &str,
        assignment: &TicketAssignment,
    ) -> Result<bool> {
        tickets::check_assignment(&self.flow, assignment)?;
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("assign ticket", None))?;
        let row = self.existing_ticket(&mut tx, fingerprint).await?;
        // The outbox rows of sinks the ticket did not have: due at once (version 0 is behind).
        sqlx::query(
            "INSERT INTO ticket_deliveries (flow, fingerprint, sink) SELECT $1, $2, UNNEST($3::text[]) \
             ON CONFLICT (flow, fingerprint, sink) DO NOTHING",
        )
        .bind(&self.flow)
        .bind(fingerprint)
        .bind(&assignment.sinks)
        .execute(&mut *tx)
        .await
        .map_err(self.db("assign ticket", None))?;
        let changed = tickets::assign(row, assignment, now);
        if let Some((row, times)) = &changed {
            self.store_ticket(&mut tx, row, times).await?;
        }
        tx.commit().await.map_err(self.db("assign ticket", None))?;
        Ok(changed.is_some())
    }

    async fn acknowledge_ticket(&self, fingerprint: &str, by: &str) -> Result<bool> {
        tickets::check_acknowledger(&self.flow, by)?;
        let now = self.clock.now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("acknowledge ticket", None))?;
        let row = self.existing_ticket(&mut tx, fingerprint).await?;
        let changed = tickets::acknowledge(row, by, now);
        if let Some((row, times)) = &changed {
            self.store_ticket(&mut tx, row, times).await?;
        }
        tx.commit()
            .await
            .map_err(self.db("acknowledge ticket", None))?;
        Ok(changed.is_some())
    }

    async fn ticket_deliveries_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueDelivery>> {
        let rows = sqlx::query(AssertSqlSafe(tickets::due_query(
            postgres_param,
            "jsonb_exists(t.sinks::jsonb, d.sink)",
        )))
        .bind(&self.flow)
        .bind(now.timestamp_millis())
        .bind(tickets::read_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("read due ticket deliveries", None))?;
        rows.into_iter()
            .map(|r| {
                use sqlx::FromRow;
                let row =
                    TicketRow::from_row(&r).map_err(self.db("read due ticket deliveries", None))?;
                let fingerprint = row.fingerprint.clone();
                let sink_ref: Option<String> = r.get("d_sink_ref");
                let in_doubt: i64 = r.get("d_in_doubt");
                let attempts: i64 = r.get("d_attempts");
                Ok(DueDelivery {
                    ticket: row.into_record(&self.flow)?,
                    previous: sink_ref
                        .map(|text| {
                            serde_json::from_str(&text).map_err(|e| LedgerError::TicketCorrupt {
                                flow: self.flow.clone(),
                                fingerprint: fingerprint.clone(),
                                what: "sink reference",
                                detail: e.to_string(),
                            })
                        })
                        .transpose()?,
                    sink: r.get("d_sink"),
                    in_doubt: in_doubt != 0,
                    in_doubt_version: (in_doubt != 0).then_some(in_doubt),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn begin_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        version: i64,
        lease: Duration,
    ) -> Result<()> {
        let until = self
            .clock
            .now_ms()
            .saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let query = sqlx::query(
            // `in_doubt` keeps the version sent (versions start at 1), see `DueDelivery`.
            "UPDATE ticket_deliveries SET in_doubt = $5, next_attempt_at = $4 \
             WHERE flow = $1 AND fingerprint = $2 AND sink = $3",
        )
        .bind(&self.flow)
        .bind(fingerprint)
        .bind(sink)
        .bind(until)
        .bind(version.max(1));
        self.update_delivery("begin ticket delivery", fingerprint, sink, query)
            .await
    }

    async fn finish_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        version: i64,
        sink_ref: Value,
    ) -> Result<()> {
        let query = sqlx::query(
            "UPDATE ticket_deliveries SET delivered_version = GREATEST(delivered_version, $4), \
             sink_ref = $5, in_doubt = 0, attempts = 0, failing_since = NULL, last_error = NULL, \
             refused = 0, next_attempt_at = $6 WHERE flow = $1 AND fingerprint = $2 AND sink = $3",
        )
        .bind(&self.flow)
        .bind(fingerprint)
        .bind(sink)
        .bind(version)
        .bind(sink_ref.to_string())
        .bind(self.clock.now_ms());
        self.update_delivery("finish ticket delivery", fingerprint, sink, query)
            .await
    }

    async fn fail_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        error: &str,
        refused: Option<u16>,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<()> {
        let query = sqlx::query(
            // `in_doubt` stays: a send that failed by timing out or losing its connection may have
            // reached the sink, so the next attempt still looks for its copy (or resends under that
            // version's idempotency key) instead of opening a second ticket.
            // `refused` follows the latest answer: a refusal followed by a 5xx is an outage now.
            "UPDATE ticket_deliveries SET attempts = attempts + 1, \
             failing_since = COALESCE(failing_since, $4), last_error = $5, next_attempt_at = $6, \
             refused = $7 WHERE flow = $1 AND fingerprint = $2 AND sink = $3",
        )
        .bind(&self.flow)
        .bind(fingerprint)
        .bind(sink)
        .bind(self.clock.now_ms())
        .bind(tickets::truncate(error, tickets::TICKET_TEXT_BYTES))
        .bind(next_attempt_at.timestamp_millis())
        .bind(i64::from(refused.unwrap_or(0)));
        self.update_delivery("fail ticket delivery", fingerprint, sink, query)
            .await
    }

    async fn purge_tickets(&self, older_than: Duration, limit: usize) -> Result<Vec<String>> {
        const ASSIGNED: &str = "jsonb_exists(t.sinks::jsonb, d.sink)";
        let cutoff = retention_cutoff(self.clock.now_ms(), Some(older_than)).unwrap_or(i64::MIN);
        let limit = tickets::read_limit(limit);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.db("purge tickets", None))?;
        let candidates: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(
            tickets::purgeable_query(postgres_param, ASSIGNED, ""),
        ))
        .bind(&self.flow)
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("purge tickets", None))?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // Another replica may reopen one of them meanwhile: take each ticket's lock (in fingerprint order,
        // as every writer of several tickets does) and check them again under it.
        let mut fingerprints: Vec<String> = candidates.into_iter().map(|(fp, _)| fp).collect();
        fingerprints.sort();
        for fingerprint in &fingerprints {
            self.lock_ticket(&mut tx, fingerprint).await?;
        }
        let purgeable: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(
            tickets::purgeable_query(postgres_param, ASSIGNED, "AND t.fingerprint = ANY($4)"),
        ))
        .bind(&self.flow)
        .bind(cutoff)
        .bind(limit)
        .bind(&fingerprints)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("purge tickets", None))?;
        let (gone, reopened): (Vec<String>, Vec<i64>) = purgeable.into_iter().unzip();
        if !gone.is_empty() {
            sqlx::query(
                "WITH deliveries_gone AS (DELETE FROM ticket_deliveries WHERE flow = $1 AND fingerprint = ANY($2)) \
                 DELETE FROM tickets WHERE flow = $1 AND fingerprint = ANY($2)",
            )
            .bind(&self.flow)
            .bind(&gone)
            .execute(&mut *tx)
            .await
            .map_err(self.db("purge tickets", None))?;
            let occurrences = reopened.iter().map(|r| 1 + r).sum();
            self.bump_counter(&mut tx, TICKET_OCCURRENCES_PURGED, occurrences)
                .await?;
        }
        tx.commit().await.map_err(self.db("purge tickets", None))?;
        Ok(gone)
    }

    async fn ticket_sink_health(&self) -> Result<Vec<TicketSinkHealth>> {
        let rows: Vec<tickets::DeliveryHealthRow> =
            sqlx::query_as(AssertSqlSafe(tickets::health_query(postgres_param)))
                .bind(&self.flow)
                .fetch_all(&self.pool)
                .await
                .map_err(self.db("read ticket sink health", None))?;
        Ok(tickets::sink_health(rows))
    }

    async fn ticket_flow_measures(&self) -> Result<FlowTicketMeasures> {
        let row: tickets::FlowTimesRow =
            sqlx::query_as(AssertSqlSafe(tickets::flow_measures_query(postgres_param)))
                .bind(&self.flow)
                .fetch_one(&self.pool)
                .await
                .map_err(self.db("read flow ticket measures", None))?;
        Ok(tickets::flow_measures(row))
    }

    async fn ticket_measures(&self) -> Result<Vec<OwnerTicketMeasures>> {
        let rows: Vec<tickets::TimesRow> =
            sqlx::query_as(AssertSqlSafe(tickets::measures_query(postgres_param)))
                .bind(&self.flow)
                .fetch_all(&self.pool)
                .await
                .map_err(self.db("read ticket measures", None))?;
        Ok(tickets::measures(rows))
    }

    async fn audit_start(
        &self,
        window_from: i64,
        window_to: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<(AuditRun, bool)> {
        let lease = lease_ms(&self.flow, lease)?;
        let now = self.clock.now_ms();
        let err = self.db("start audit", None);
        // Two replicas starting at once meet on the one-running-run index: the loser reads the winner's run.
        let started = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO audit_runs (flow, window_from, window_to, state, owner, lease_until, started_at) \
             VALUES ($1, $2, $3, 'running', $4, $5, $6) \
             ON CONFLICT (flow) WHERE state = 'running' DO NOTHING RETURNING {RUN_COLUMNS}"
        )))
        .bind(&self.flow)
        .bind(window_from)
        .bind(window_to)
        .bind(owner)
        .bind(now + lease)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(&err)?;
        if let Some(row) = started {
            return Ok((pg_run_row(&row).map_err(&err)?.into_run(&self.flow)?, true));
        }
        let running = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM audit_runs WHERE flow = $1 AND state = 'running'"
        )))
        .bind(&self.flow)
        .fetch_optional(&self.pool)
        .await
        .map_err(&err)?;
        match running {
            Some(row) => Ok((pg_run_row(&row).map_err(&err)?.into_run(&self.flow)?, false)),
            // It finished between the two statements: start again.
            None => {
                Box::pin(self.audit_start(
                    window_from,
                    window_to,
                    owner,
                    Duration::from_millis(lease as u64),
                ))
                .await
            }
        }
    }

    async fn audit_lease(&self, id: i64, owner: &str, lease: Duration) -> Result<Option<AuditRun>> {
        let lease = lease_ms(&self.flow, lease)?;
        let now = self.clock.now_ms();
        let err = self.db("lease audit", None);
        let taken = sqlx::query(AssertSqlSafe(format!(
            "UPDATE audit_runs SET owner = $3, lease_until = $4 WHERE id = $1 AND flow = $2 \
             AND state = 'running' AND (owner IS NULL OR owner = $3 OR lease_until <= $5) \
             RETURNING {RUN_COLUMNS}"
        )))
        .bind(id)
        .bind(&self.flow)
        .bind(owner)
        .bind(now + lease)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(&err)?;
        match taken {
            Some(row) => Ok(Some(pg_run_row(&row).map_err(&err)?.into_run(&self.flow)?)),
            None => {
                let exists = sqlx::query("SELECT 1 FROM audit_runs WHERE id = $1 AND flow = $2")
                    .bind(id)
                    .bind(&self.flow)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(&err)?;
                match exists {
                    Some(_) => Ok(None),
                    None => Err(LedgerError::AuditRunNotFound {
                        flow: self.flow.clone(),
                        run: id,
                    }),
                }
            }
        }
    }

    async fn audit_page(
        &self,
        id: i64,
        owner: &str,
        side: AuditSide,
        orders: &[AuditedOrder],
        next: Option<&str>,
        lease: Duration,
    ) -> Result<()> {
        audit::check_page(&self.flow, side, orders)?;
        let lease = lease_ms(&self.flow, lease)?;
        let now = self.clock.now_ms();
        let err = self.db("store audit page", None);
        let s = side.label();
        let mut tx = self.pool.begin().await.map_err(&err)?;
        // The cursor, the done flag and the page's orders commit together, fenced by the lease.
        let changed = sqlx::query(AssertSqlSafe(format!(
            "UPDATE audit_runs SET {s}_cursor = $1, {s}_done = $2, {s}_pages = {s}_pages + 1, \
             {s}_orders = {s}_orders + $3, lease_until = $4 WHERE id = $5 AND flow = $6 \
             AND state = 'running' AND owner = $7 AND {s}_done = 0"
        )))
        .bind(next)
        .bind(i64::from(next.is_none()))
        .bind(orders.len() as i64)
        .bind(now + lease)
        .bind(id)
        .bind(&self.flow)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(&err)?
        .rows_affected();
        if changed == 0 {
            let now_row = sqlx::query(AssertSqlSafe(format!(
                "SELECT state, owner, {s}_done FROM audit_runs WHERE id = $1 AND flow = $2"
            )))
            .bind(id)
            .bind(&self.flow)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&err)?
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    r.get::<Option<String>, _>(1),
                    r.get::<i64, _>(2) != 0,
                )
            });
            return Err(audit::refused_write(
                &self.flow,
                id,
                owner,
                now_row,
                Some(side),
            ));
        }
        let ids: Vec<&str> = orders.iter().map(|o| o.external_id.as_str()).collect();
        let currencies: Vec<&str> = orders.iter().map(|o| o.currency.as_str()).collect();
        let amounts: Vec<String> = orders.iter().map(|o| o.amount.to_string()).collect();
        sqlx::query(
            "INSERT INTO audit_orders (run, side, external_id, currency, amount) \
             SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::text[])",
        )
        .bind(id)
        .bind(s)
        .bind(&ids)
        .bind(&currencies)
        .bind(&amounts)
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)
    }

    async fn audit_compare(&self, id: i64) -> Result<crate::audit::compare::Tally> {
        use futures::TryStreamExt;
        let err = self.db("compare audit", None);
        // Streamed row by row (byte order, as the index and the comparison have it): memory stays bounded.
        let mut rows = sqlx::query(
            "SELECT side, external_id, currency, amount FROM audit_orders WHERE run = $1 \
             ORDER BY external_id COLLATE \"C\", side",
        )
        .bind(id)
        .fetch(&self.pool);
        let mut comparison = crate::audit::compare::Comparison::new();
        while let Some(row) = rows.try_next().await.map_err(&err)? {
            let side: String = row.get(0);
            let side = AuditSide::parse(&side).ok_or_else(|| LedgerError::Corrupt {
                flow: self.flow.clone(),
                record: RecordId(0),
                what: "audit order side",
                detail: format!("audit run {id}: unknown side {side:?}"),
            })?;
            let amount: String = row.get(3);
            let order = AuditedOrder {
                external_id: row.get(1),
                currency: row.get(2),
                amount: audit::stored_amount(&self.flow, id, &amount)?,
            };
            comparison
                .push(side, order)
                .map_err(|e| LedgerError::Corrupt {
                    flow: self.flow.clone(),
                    record: RecordId(0),
                    what: "audit order order",
                    detail: e.to_string(),
                })?;
        }
        Ok(comparison.finish())
    }

    async fn audit_facts(&self, source_keys: &[String]) -> Result<Vec<AuditRecordFacts>> {
        audit::check_facts_request(&self.flow, source_keys)?;
        if source_keys.is_empty() {
            return Ok(Vec::new());
        }
        // Each source key is looked up alone, with the flow as a value unknown at planning (see the ingest's
        // lookup of stored keys): on a flow without statistics, `source_key = ANY($2)` walked the flow's records.
        let rows = sqlx::query(
            "SELECT r.id, r.source_key, r.state, r.dead_letter_reason, r.hold_rule, p.body \
             FROM (SELECT $1::text AS flow OFFSET 0) AS f, \
             (SELECT DISTINCT key FROM UNNEST($2::text[]) AS u(key)) AS k, \
             LATERAL (SELECT id, source_key, state, dead_letter_reason, hold_rule FROM records \
               WHERE flow = f.flow AND source_key = k.key) AS r \
             LEFT JOIN payloads p ON p.record_id = r.id ORDER BY r.id",
        )
        .bind(&self.flow)
        .bind(source_keys)
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("read audit facts", None))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get(0);
            let state: String = row.get(2);
            out.push(AuditRecordFacts {
                source_key: row.get(1),
                state: parse_state(&self.flow, id, &state)?,
                dead_letter_reason: row.get(3),
                hold_rule: row.get(4),
                payload: row.get(5),
            });
        }
        Ok(audit::newest_per_key(out))
    }

    async fn audit_finish(&self, id: i64, owner: &str, result: &Value) -> Result<()> {
        let now = self.clock.now_ms();
        let err = self.db("finish audit", None);
        let mut tx = self.pool.begin().await.map_err(&err)?;
        let changed = sqlx::query(
            "UPDATE audit_runs SET state = 'finished', result = $1, finished_at = $2, lease_until = NULL \
             WHERE id = $3 AND flow = $4 AND state = 'running' AND owner = $5",
        )
        .bind(result.to_string())
        .bind(now)
        .bind(id)
        .bind(&self.flow)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(&err)?
        .rows_affected();
        if changed == 0 {
            let now_row =
                sqlx::query("SELECT state, owner FROM audit_runs WHERE id = $1 AND flow = $2")
                    .bind(id)
                    .bind(&self.flow)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(&err)?
                    .map(|r| (r.get::<String, _>(0), r.get::<Option<String>, _>(1), false));
            return Err(audit::refused_write(&self.flow, id, owner, now_row, None));
        }
        sqlx::query("DELETE FROM audit_orders WHERE run = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        sqlx::query(
            "DELETE FROM audit_runs WHERE flow = $1 AND state = 'finished' AND id NOT IN \
             (SELECT id FROM audit_runs WHERE flow = $1 AND state = 'finished' ORDER BY id DESC LIMIT $2)",
        )
        .bind(&self.flow)
        .bind(AUDIT_RUNS_KEPT)
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)
    }

    async fn audit_run(&self, id: i64) -> Result<Option<AuditRun>> {
        let err = self.db("read audit run", None);
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM audit_runs WHERE id = $1 AND flow = $2"
        )))
        .bind(id)
        .bind(&self.flow)
        .fetch_optional(&self.pool)
        .await
        .map_err(&err)?;
        row.map(|r| pg_run_row(&r).map_err(&err)?.into_run(&self.flow))
            .transpose()
    }

    async fn audit_last(&self) -> Result<Option<AuditRun>> {
        let err = self.db("read last audit", None);
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM audit_runs WHERE flow = $1 AND state = 'finished' \
             ORDER BY id DESC LIMIT 1"
        )))
        .bind(&self.flow)
        .fetch_optional(&self.pool)
        .await
        .map_err(&err)?;
        row.map(|r| pg_run_row(&r).map_err(&err)?.into_run(&self.flow))
            .transpose()
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(self.db("ping", None))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn connection_urls_lose_their_password_in_errors() {
        assert_eq!(
            redact_url("postgres://meshline:s3cret@db:5432/ledger"),
            "postgres://meshline@db:5432/ledger"
        );
        assert_eq!(redact_url("postgres://db/ledger"), "postgres://db/ledger");
    }
}
