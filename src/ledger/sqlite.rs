//! The embedded SQLite ledger: the default for one replica and for local use.
//!
//! **Connections on threads of their own.** Every write is a closure run against the one writing connection
//! on the `meshline-ledger` thread, a whole batch at a time, with cached prepared statements executed row by
//! row. A statement costs a few microseconds there, so a batch of 500 records is one hand-off between the
//! async runtime and the database instead of one per statement (which is what an async driver would cost).
//! Writes are serialised in arrival order, and every write transaction starts with `BEGIN IMMEDIATE`, so a
//! second process on the same file waits (busy timeout) instead of failing half way. Reads that people and
//! scrapers ask for (counts, the backlog, record views, listings) run on a second, query-only connection
//! (`meshline-reader`): WAL lets them read committed data alongside the writer, so a count over a large
//! ledger never holds up an ingest. A third thread (`meshline-wal`) checkpoints the WAL. Several replicas
//! need the PostgreSQL ledger.
//!
//! **Durability.** The database runs in WAL mode with `synchronous = NORMAL`, and switches to
//! `synchronous = FULL` for the transactions that the outside world is told about: ingest (the webhook's 2xx,
//! the poll checkpoint), checkpoints and manual interventions. With FULL, the commit fsyncs the WAL, which
//! also makes every earlier NORMAL commit durable. A NORMAL commit (claims, completions, lineage) survives a
//! process crash (SIGKILL) but may be lost with the OS on power failure; losing one only means a record is
//! claimed or delivered again, which the ERP upsert by external id absorbs. Batching keeps the fsyncs to one
//! per batch, not one per record.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use serde_json::{Value, json};

use super::audit::{self, RUN_COLUMNS, RunRow};
use super::schema::{self, SCHEMA_VERSION};
use super::tickets::{self, TicketRow, TimesDelta, sqlite_param};
use super::{
    ATTENTION, BackendError, BucketSet, Claim, ClaimedRecord, Clock, Completion, CompletionParams,
    CompletionResult, Counts, CountsRow, DEAD_LETTERS_PURGED, IncomingRecord, IngestOutcome,
    InterventionRow, LeaseRequest, Ledger, LedgerError, LineageRow, MAX_COUNTERS, ManualAction,
    NewLineageEvent, PAYLOADS_PURGED, PurgeReport, RECORD_COLUMNS, RECORD_FROM, RecordDetail,
    RecordId, RecordRow, RecordState, RecordView, ReplayRecord, Result, Retention, STALE_REVISIONS,
    SnapshotRow, TICKET_OCCURRENCES_PURGED, add_events, assemble_counts, assemble_detail,
    check_replay_limit, compact_outcome, completion_params, counts_from_kept, lease_ms,
    parse_state, prepare, retention_cutoff, stale_detail, tie_detail, to_time, window_start_minute,
};
use super::{AUDIT_RUNS_KEPT, AuditRecordFacts, AuditRun, AuditSide};
use super::{
    DueDelivery, FlowTicketMeasures, HeldAsSeen, OwnerTicketMeasures, RaisedException,
    TicketAssignment, TicketRecord, TicketSinkHealth,
};
use super::{
    Outcome, REVISION_RETENTION_MS, REVISION_VALUES, RevisionMeasures, RevisionTally,
    owner_prefix_pattern, revision_measures_from, revision_select, revision_slot, revision_slots,
    revision_upsert, set_revision,
};
use crate::connectors::queries::AuditedOrder;
use chrono::{DateTime, Utc};

/// `AND r.state IN (…)` when listing a state the `records_attention` index covers, so the planner uses it.
fn attention_filter(state: RecordState) -> String {
    match state {
        RecordState::Held | RecordState::DeadLettered => format!("AND r.{ATTENTION}"),
        _ => String::new(),
    }
}

/// "A state a record waits in", word for word as the `records_due` and `records_pending_age` indexes say it
/// (schema version 10), so the planner can use them.
const PENDING: &str = sqlite_pending!();

/// The newest kept payloads of a flow. `CROSS JOIN` fixes the join order in SQLite: the payloads' rowid (the
/// record id) is walked backwards and each record is one primary-key probe, so the read stops after `limit`
/// rows. Left to itself the planner may take the (flow, idempotency_key) index and sort the whole flow.
const RECENT_INPUTS: &str = "SELECT r.id, r.source_key, r.state, r.contract_version, p.body \
    FROM payloads p CROSS JOIN records r ON r.id = p.record_id \
    WHERE r.flow = ?1 ORDER BY p.record_id DESC LIMIT ?2";

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

#[derive(Debug)]
pub struct SqliteLedger {
    flow: String,
    clock: Arc<dyn Clock>,
    path: PathBuf,
    /// The one connection that writes.
    writer: Session,
    /// A second connection, for the reads people and scrapers ask (`/status` counts, record views, the
    /// backlog): WAL lets it read alongside the writer, so a long count never holds up an ingest.
    reader: Session,
    /// Dropping the sender stops the checkpointer.
    checkpointer: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
    /// The contract revision completions are attributed to ([`Ledger::attribute_to`]).
    revision: std::sync::OnceLock<String>,
}

/// One connection on a thread of its own, running the jobs sent to it in order.
#[derive(Debug)]
struct Session {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Session {
    /// Opens a connection to `path` on a new thread named `name`; a `read_only` one refuses writes.
    async fn open(
        name: &str,
        path: &Path,
        read_only: bool,
    ) -> std::result::Result<Session, BackendError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let opened = open_connection(&path).and_then(|conn| {
                    if read_only {
                        conn.pragma_update(None, "query_only", "ON")?;
                    }
                    Ok(conn)
                });
                let mut conn = match opened {
                    Ok(conn) => {
                        let _ = opened_tx.send(Ok(()));
                        conn
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                for job in queue {
                    // A panic in one operation drops its reply (the caller gets an error) and rolls its
                    // transaction back; the ledger stays usable for the others.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
            })?;
        match opened.await {
            Ok(Ok(())) => Ok(Session {
                jobs: Mutex::new(Some(jobs)),
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the ledger thread stopped while opening".into()),
        }
    }

    /// Runs `job` on this session's thread and waits for its result.
    async fn run<T, F>(&self, flow: &str, operation: &'static str, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(job(conn));
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|jobs| jobs.send(job).is_ok())
            .unwrap_or(false);
        let gone = |what: &str| LedgerError::Database {
            flow: flow.to_string(),
            operation,
            record: None,
            source: what.to_string().into(),
        };
        if !sent {
            return Err(gone("the ledger is closed"));
        }
        answer
            .await
            .map_err(|_| gone("the ledger operation was interrupted (nothing was committed)"))?
    }

    /// Lets queued jobs finish, then closes the connection and ends the thread.
    async fn close(&self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// How often the checkpointer copies the write-ahead log into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// WAL pages after which the writer checkpoints itself, should the checkpointer fall behind or be gone.
const CHECKPOINT_BACKSTOP_PAGES: i64 = 16_000;

/// Maps a rusqlite error to the ledger's, naming the flow, the operation and the record.
fn db<'f>(
    flow: &'f str,
    operation: &'static str,
    record: Option<RecordId>,
) -> impl Fn(rusqlite::Error) -> LedgerError + 'f {
    move |source| LedgerError::Database {
        flow: flow.to_string(),
        operation,
        record,
        source: source.into(),
    }
}

impl SqliteLedger {
    /// Opens (creating if missing) and migrates the ledger at `path` for `flow`.
    pub async fn open(path: impl AsRef<Path>, flow: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let open_failed = |source: BackendError| LedgerError::Open {
            flow: flow.to_string(),
            backend: "sqlite",
            target: path.display().to_string(),
            source,
        };
        let writer = Session::open("meshline-ledger", &path, false)
            .await
            .map_err(open_failed)?;
        let checkpointer = spawn_checkpointer(&path).map_err(|e| LedgerError::Open {
            flow: flow.to_string(),
            backend: "sqlite",
            target: path.display().to_string(),
            source: e.into(),
        })?;
        // The reader opens once the writer has migrated, so it never sees a half-made schema.
        let migrated = migrate(&writer, flow, clock.now_ms()).await;
        let reader = match migrated {
            Ok(()) => Session::open("meshline-reader", &path, true)
                .await
                .map_err(open_failed),
            Err(e) => Err(e),
        };
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                writer.close().await;
                drop(checkpointer);
                return Err(e);
            }
        };
        Ok(SqliteLedger {
            flow: flow.to_string(),
            clock,
            path,
            writer,
            reader,
            checkpointer: Mutex::new(Some(checkpointer)),
            revision: std::sync::OnceLock::new(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the database.
    pub async fn schema_version(&self) -> Result<i64> {
        let flow = self.flow.clone();
        self.read("read schema version", move |conn| {
            conn.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM meshline_schema",
                [],
                |r| r.get(0),
            )
            .map_err(db(&flow, "read schema version", None))
        })
        .await
    }

    /// Runs `job` on the writer's thread and waits for its result.
    async fn run<T, F>(&self, operation: &'static str, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.writer.run(&self.flow, operation, job).await
    }

    /// Runs a read-only `job` on the reader's thread.
    async fn read<T, F>(&self, operation: &'static str, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.reader.run(&self.flow, operation, job).await
    }

    async fn ingest_inner(
        &self,
        batch: Vec<IncomingRecord>,
        checkpoint: Option<(String, String)>,
        lease: Option<&LeaseRequest>,
    ) -> Result<(Vec<IngestOutcome>, Vec<ClaimedRecord>)> {
        // The lineage detail of a new record is known before the write: built here, off the ledger's thread.
        let prepared: Vec<_> = prepare(&self.flow, batch)?
            .into_iter()
            .map(|item| {
                let detail = json!({"payload_hash": item.hash, "contract_version": item.contract_version, "bucket": item.bucket}).to_string();
                (item, detail)
            })
            .collect();
        let now = self.clock.now_ms();
        let flow = self.flow.clone();
        let lease = match lease {
            Some(request) if request.limit > 0 && !request.buckets.is_empty() => Some((
                request.clone(),
                now.saturating_add(lease_ms(&flow, request.lease)?),
            )),
            _ => None,
        };
        self.run("ingest", move |conn| {
            durable(conn, &flow, |conn| {
                let err = db(&flow, "ingest", None);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&err)?;
                let mut outcomes = Vec::with_capacity(prepared.len());
                let mut claimed: Vec<ClaimedRecord> = Vec::new();
                {
                    // New keys insert; changed payloads start a new generation (lease columns untouched, so
                    // an in-flight older generation is never claimed alongside it); equal hashes are left
                    // alone and change no row. No RETURNING in these per-row statements: SQLite buffers a
                    // RETURNING clause's rows in a temporary b-tree built and torn down per execution, which
                    // cost more than the statement itself; the row is read back by its key instead. Record by record in batch order, so a batch that carries two
                    // versions of one record applies them in sequence, as two batches would.
                    let mut upsert = tx
                        .prepare_cached(
                            "INSERT INTO records (flow, source_key, idempotency_key, external_id, generation, \
                             payload_hash, contract_version, state, claimed_from, lease_owner, lease_expires_at, \
                             fence, attempts, next_attempt_at, bucket, correlation_id, received_at, updated_at, \
                             ordering_value, tally_mark) \
                             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?10, ?11, ?12, ?13, ?14, ?14, ?15, ?8, ?9, ?7, ?7, ?16, 1) \
                             ON CONFLICT (flow, idempotency_key) DO UPDATE SET source_key = excluded.source_key, \
                             external_id = excluded.external_id, generation = records.generation + 1, \
                             payload_hash = excluded.payload_hash, \
                             contract_version = excluded.contract_version, state = 'received', \
                             claimed_from = NULL, attempts = 0, next_attempt_at = excluded.received_at, \
                             last_error = NULL, last_error_class = NULL, dead_letter_reason = NULL, \
                             erp_response = NULL, hold_rule = NULL, hold_role = NULL, approved_by = NULL, \
                             bucket = excluded.bucket, correlation_id = excluded.correlation_id, \
                             received_at = excluded.received_at, updated_at = excluded.updated_at, \
                             delivered_at = NULL, first_failure_at = NULL, outcome = NULL, purged_at = NULL, \
                             ordering_value = COALESCE(excluded.ordering_value, records.ordering_value) \
                             WHERE records.payload_hash <> excluded.payload_hash \
                             AND NOT COALESCE(excluded.ordering_value < records.ordering_value, FALSE)",
                        )
                        .map_err(&err)?;
                    // A key the lookup below did not find is inserted by a plain insert: with `OR ROLLBACK` and
                    // no `DO UPDATE` it keeps no statement journal (schema version 13), where the upsert copied
                    // ~8 pages per record. The write lock is held, so the key cannot appear in between.
                    let mut insert_new = tx.prepare_cached(INSERT_NEW).map_err(&err)?;
                    let mut payloads: Vec<(i64, String)> = Vec::with_capacity(prepared.len());
                    // The stored row before the write, if any. One lookup tells what the write did (a key
                    // that was not stored was inserted, and its id is the connection's last inserted rowid;
                    // a stored one was updated to the next generation or left alone) and gives the stored
                    // ordering value, which tells an equal value (a tie, flagged) from a newer one.
                    let mut existing = tx
                        .prepare_cached(
                            "SELECT id, generation, correlation_id, ordering_value FROM records \
                             WHERE flow = ?1 AND idempotency_key = ?2",
                        )
                        .map_err(&err)?;
                    let mut stale_revision = tx
                        .prepare_cached(
                            "UPDATE records SET stale_revisions = stale_revisions + 1 WHERE id = ?1 \
                             RETURNING payload_hash, ordering_value",
                        )
                        .map_err(&err)?;
                    let mut lineage = Lineage::new(now);
                    // New records are inserted with `tally_mark` set: the insert trigger leaves them to this
                    // tally. A new revision of a stored record goes through the upsert's update, which the
                    // update trigger counts.
                    let mut tally = WriterTally::default();
                    let worker_json = lease.as_ref().map(|(request, _)| json!(request.worker));
                    for (item, received_detail) in prepared {
                        // A new record in the worker's buckets, while it has room, is inserted leased to it;
                        // should the key exist after all, the conflict path ignores the lease values.
                        let leased_to = lease.as_ref().filter(|(request, _)| {
                            claimed.len() < request.limit
                                && u8::try_from(item.bucket).is_ok_and(|b| request.buckets.contains(b))
                        });
                        let (state, claimed_from, owner, expires, fence, next_at) = match leased_to {
                            Some((request, expires)) => (
                                "delivering",
                                Some("received"),
                                Some(request.worker.as_str()),
                                Some(*expires),
                                1,
                                *expires,
                            ),
                            None => ("received", None, None, None, 0, now),
                        };
                        type Stored = (i64, i64, String, Option<i64>);
                        let read_stored = |existing: &mut rusqlite::CachedStatement<'_>| {
                            existing
                                .query_row(params![flow, item.idempotency_key], |r| {
                                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                                })
                                .optional()
                        };
                        let stored: Option<Stored> = read_stored(&mut existing).map_err(&err)?;
                        let prior: Option<i64> = stored
                            .as_ref()
                            .and_then(|(.., ordering)| *ordering)
                            .filter(|_| item.ordering.is_some());
                        let write = if stored.is_none() {
                            &mut insert_new
                        } else {
                            &mut upsert
                        };
                        let changed = write
                            .execute(params![
                                flow,
                                item.source_key,
                                item.idempotency_key,
                                item.external_id,
                                item.hash,
                                item.contract_version,
                                now,
                                item.bucket,
                                item.correlation_id,
                                state,
                                claimed_from,
                                owner,
                                expires,
                                fence,
                                next_at,
                                item.ordering,
                            ])
                            .map_err(&err)?;
                        let (id, generation, correlation_id) = match (stored, changed > 0) {
                            (None, true) => (tx.last_insert_rowid(), 1, item.correlation_id.clone()),
                            (Some((id, generation, ..)), true) => {
                                (id, generation + 1, item.correlation_id.clone())
                            }
                            (Some((id, generation, correlation_id, _)), false) => {
                                (id, generation, correlation_id)
                            }
                            // Not stored and not inserted cannot happen under the write lock; read what
                            // is there rather than guess.
                            (None, false) => {
                                let (id, generation, correlation_id, _) = read_stored(&mut existing)
                                    .map_err(&err)?
                                    .ok_or_else(|| LedgerError::Corrupt {
                                        flow: flow.clone(),
                                        record: RecordId(0),
                                        what: "record",
                                        detail: format!(
                                            "the insert of {:?} wrote nothing and no record has that key",
                                            item.idempotency_key
                                        ),
                                    })?;
                                (id, generation, correlation_id)
                            }
                        };
                        if changed > 0 {
                            let inserted = generation == 1;
                            tally.received_new += i64::from(inserted);
                            let (step, detail) = if inserted {
                                ("received", received_detail)
                            } else {
                                (
                                    "updated",
                                    json!({"payload_hash": item.hash, "previous_generation": generation - 1, "contract_version": item.contract_version}).to_string(),
                                )
                            };
                            lineage.add(id, generation, step, detail, &item.correlation_id);
                            if let (false, Some(value)) = (inserted, item.ordering.filter(|v| prior == Some(*v))) {
                                let detail = tie_detail(&item.hash, value, generation);
                                lineage.add(id, generation, "ordering_tie", detail, &item.correlation_id);
                            }
                            if let (true, Some((_, expires)), Some(worker_json)) =
                                (inserted, leased_to, worker_json.as_ref())
                            {
                                let detail = format!(
                                    r#"{{"attempt":1,"fence":1,"lease_expires_at":{expires},"taken_over_from":null,"worker":{worker_json}}}"#
                                );
                                lineage.add(id, 1, "claimed", detail, &item.correlation_id);
                                claimed.push(ClaimedRecord {
                                    claim: Claim {
                                        id: RecordId(id),
                                        generation: 1,
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
                                    lease_expires_at: to_time(*expires),
                                });
                            }
                            payloads.push((id, item.payload));
                            outcomes.push(if inserted {
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
                        } else if let Some(incoming) = item.ordering.filter(|v| prior.is_some_and(|p| *v < p)) {
                            // A late revision: older than the stored one by the ordering field. Counted and
                            // noted; the stored revision stays current.
                            let (hash, stored): (String, Option<i64>) = stale_revision
                                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                                .map_err(&err)?;
                            debug_assert_ne!(hash, item.hash);
                            let stored = stored.unwrap_or(incoming);
                            let detail = stale_detail(&item.hash, stored, incoming);
                            lineage.add(id, generation, "stale", detail, &item.correlation_id);
                            bump_counter(&tx, &flow, STALE_REVISIONS, 1).map_err(&err)?;
                            outcomes.push(IngestOutcome::Stale {
                                id: RecordId(id),
                                stored,
                                incoming,
                                correlation_id: item.correlation_id,
                            });
                        } else {
                            // A webhook retry or an overlapping poll: note it, store nothing new.
                            let detail = json!({"payload_hash": item.hash}).to_string();
                            lineage.add(id, generation, "duplicate", detail, &correlation_id);
                            outcomes.push(IngestOutcome::Duplicate {
                                id: RecordId(id),
                                correlation_id,
                            });
                        }
                    }
                    let payload_rows: Vec<[&dyn rusqlite::ToSql; 2]> = payloads
                        .iter()
                        .map(|(id, body)| [id as &dyn rusqlite::ToSql, body])
                        .collect();
                    insert_rows(
                        &tx,
                        "INSERT INTO payloads (record_id, body)",
                        "ON CONFLICT (record_id) DO UPDATE SET body = excluded.body",
                        &payload_rows,
                    )
                    .map_err(db(&flow, "ingest payloads", None))?;
                    lineage
                        .write(&tx)
                        .map_err(db(&flow, "ingest lineage", None))?;
                    tally
                        .add_to_counters(&tx, &flow, now)
                        .map_err(db(&flow, "ingest counters", None))?;
                    if let Some((source, value)) = checkpoint {
                        set_checkpoint_on(&tx, &flow, &source, &value, now)
                            .map_err(db(&flow, "set checkpoint", None))?;
                    }
                }
                tx.commit().map_err(db(&flow, "ingest commit", None))?;
                Ok((outcomes, claimed))
            })
        })
        .await
    }

    /// Runs manual actions in one durable transaction.
    async fn manual_batch(
        &self,
        ids: Vec<RecordId>,
        action: ManualAction,
        seen: Option<HeldAsSeen>,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let flow = self.flow.clone();
        let (actor, reason) = (actor.to_string(), reason.to_string());
        self.run(action.name(), move |conn| {
            durable(conn, &flow, |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db(&flow, action.name(), None))?;
                for id in ids {
                    manual(&tx, &flow, id, action, seen.as_ref(), &actor, &reason, now)?;
                }
                tx.commit().map_err(db(&flow, action.name(), None))
            })
        })
        .await
    }
}

// ---- tickets (schema version 8; the transitions live in `super::tickets`) ----------------------------------

fn ticket_row(r: &Row<'_>) -> rusqlite::Result<TicketRow> {
    Ok(TicketRow {
        fingerprint: r.get(0)?,
        kind: r.get(1)?,
        class: r.get(2)?,
        reason: r.get(3)?,
        rule: r.get(4)?,
        summary: r.get(5)?,
        state: r.get(6)?,
        count: r.get(7)?,
        outstanding: r.get(8)?,
        opened_at: r.get(9)?,
        updated_at: r.get(10)?,
        acknowledged_at: r.get(11)?,
        acknowledged_by: r.get(12)?,
        resolved_at: r.get(13)?,
        reopened: r.get(14)?,
        examples: r.get(15)?,
        role: r.get(16)?,
        owner: r.get(17)?,
        sinks: r.get(18)?,
        escalation_step: r.get(19)?,
        page: r.get(20)?,
        version: r.get(21)?,
        measured_owner: r.get(22)?,
    })
}

fn load_ticket(conn: &Connection, flow: &str, fingerprint: &str) -> Result<Option<TicketRow>> {
    conn.prepare_cached(&format!(
        "SELECT {} FROM tickets WHERE flow = ?1 AND fingerprint = ?2",
        tickets::TICKET_COLUMNS
    ))
    .and_then(|mut s| {
        s.query_row(params![flow, fingerprint], ticket_row)
            .optional()
    })
    .map_err(db(flow, "read ticket", None))
}

/// Loads a ticket for a change, or says it is not there.
fn existing_ticket(conn: &Connection, flow: &str, fingerprint: &str) -> Result<TicketRow> {
    load_ticket(conn, flow, fingerprint)?.ok_or_else(|| LedgerError::TicketNotFound {
        flow: flow.to_string(),
        fingerprint: fingerprint.to_string(),
    })
}

/// Writes a changed ticket and adds its per-owner times.
fn store_ticket(
    conn: &Connection,
    flow: &str,
    row: &TicketRow,
    times: &[TimesDelta],
) -> Result<()> {
    let err = db(flow, "write ticket", None);
    conn.prepare_cached(&tickets::ticket_upsert(sqlite_param))
        .and_then(|mut s| {
            s.execute(params![
                flow,
                row.fingerprint,
                row.kind,
                row.class,
                row.reason,
                row.rule,
                row.summary,
                row.state,
                row.count,
                row.outstanding,
                row.opened_at,
                row.updated_at,
                row.acknowledged_at,
                row.acknowledged_by,
                row.resolved_at,
                row.reopened,
                row.examples,
                row.role,
                row.owner,
                row.sinks,
                row.escalation_step,
                row.page,
                row.version,
                row.measured_owner,
            ])
        })
        .map_err(&err)?;
    for t in times {
        conn.prepare_cached(&tickets::times_upsert(sqlite_param))
            .and_then(|mut s| {
                s.execute(params![
                    flow,
                    t.owner,
                    t.opened,
                    t.acknowledged,
                    t.resolved,
                    t.acknowledge_ms,
                    t.resolve_ms
                ])
            })
            .map_err(&err)?;
    }
    Ok(())
}

/// `n` occurrences of a cause, in the caller's transaction. `outstanding` is given for a flow-level cause;
/// a dead letter's or hold's is counted from the records attached to the ticket.
#[allow(clippy::too_many_arguments)]
fn ticket_occur_on(
    conn: &Connection,
    flow: &str,
    fingerprint: &str,
    cause: &tickets::Cause,
    n: u64,
    examples: Vec<crate::tickets::Example>,
    outstanding: Option<i64>,
    now: i64,
) -> Result<()> {
    let existing = load_ticket(conn, flow, fingerprint)?;
    let outstanding = match outstanding {
        Some(n) => n,
        None => conn
            .prepare_cached(&tickets::outstanding_query(sqlite_param))
            .and_then(|mut s| s.query_row(params![flow, fingerprint], |r| r.get(0)))
            .map_err(db(flow, "count ticket records", None))?,
    };
    let (row, times) = tickets::occur(
        flow,
        existing,
        fingerprint,
        cause,
        n,
        examples,
        outstanding,
        now,
    )?;
    store_ticket(conn, flow, &row, &times)
}

/// Runs `change` on one ticket in a write transaction and stores the row it returns, if any;
/// [`LedgerError::TicketNotFound`] when the ticket is unknown.
fn change_ticket<T>(
    conn: &mut Connection,
    flow: &str,
    fingerprint: &str,
    change: impl FnOnce(&Connection, TicketRow) -> Result<(Option<(TicketRow, Vec<TimesDelta>)>, T)>,
) -> Result<T> {
    let err = db(flow, "change ticket", None);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let row = existing_ticket(&tx, flow, fingerprint)?;
    let (changed, answer) = change(&tx, row)?;
    if let Some((row, times)) = changed {
        store_ticket(&tx, flow, &row, &times)?;
    }
    tx.commit().map_err(&err)?;
    Ok(answer)
}

/// Whether `d.sink` is among the ticket's sinks (a JSON array).
const SINK_ASSIGNED: &str = "EXISTS (SELECT 1 FROM json_each(t.sinks) AS s WHERE s.value = d.sink)";

fn due_on(conn: &Connection, flow: &str, now: i64, limit: i64) -> Result<Vec<DueDelivery>> {
    let rows: Vec<(TicketRow, String, Option<String>, i64, i64)> = conn
        .prepare_cached(&tickets::due_query(sqlite_param, SINK_ASSIGNED))
        .and_then(|mut s| {
            s.query_map(params![flow, now, limit], |r| {
                Ok((
                    ticket_row(r)?,
                    r.get(23)?,
                    r.get(24)?,
                    r.get(25)?,
                    r.get(26)?,
                ))
            })?
            .collect()
        })
        .map_err(db(flow, "read due ticket deliveries", None))?;
    rows.into_iter()
        .map(|(row, sink, sink_ref, in_doubt, attempts)| {
            let fingerprint = row.fingerprint.clone();
            Ok(DueDelivery {
                ticket: row.into_record(flow)?,
                previous: sink_ref
                    .map(|text| {
                        serde_json::from_str(&text).map_err(|e| LedgerError::TicketCorrupt {
                            flow: flow.to_string(),
                            fingerprint: fingerprint.clone(),
                            what: "sink reference",
                            detail: e.to_string(),
                        })
                    })
                    .transpose()?,
                sink,
                in_doubt: in_doubt != 0,
                in_doubt_version: (in_doubt != 0).then_some(in_doubt),
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

/// Updates one delivery row; a (ticket, sink) the outbox does not know is an error naming both.
fn update_delivery(
    conn: &mut Connection,
    flow: &str,
    operation: &'static str,
    fingerprint: &str,
    sink: &str,
    sql: &str,
    values: &[&dyn rusqlite::ToSql],
) -> Result<()> {
    let mut all: Vec<&dyn rusqlite::ToSql> = vec![&flow, &fingerprint, &sink];
    all.extend_from_slice(values);
    let changed = conn
        .prepare_cached(sql)
        .and_then(|mut s| s.execute(rusqlite::params_from_iter(all)))
        .map_err(db(flow, operation, None))?;
    if changed == 0 {
        return Err(LedgerError::InvalidInput {
            flow: flow.to_string(),
            what: format!(
                "{operation}: ticket {fingerprint} has no delivery to sink {sink:?} (assign the ticket to \
                 the sink first)"
            ),
        });
    }
    Ok(())
}

/// A run's row, in [`RUN_COLUMNS`] order.
fn sqlite_run_row(r: &Row) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        window_from: r.get(1)?,
        window_to: r.get(2)?,
        state: r.get(3)?,
        owner: r.get(4)?,
        lease_until: r.get(5)?,
        crm_cursor: r.get(6)?,
        crm_done: r.get(7)?,
        crm_pages: r.get(8)?,
        crm_orders: r.get(9)?,
        erp_cursor: r.get(10)?,
        erp_done: r.get(11)?,
        erp_pages: r.get(12)?,
        erp_orders: r.get(13)?,
        result: r.get(14)?,
        started_at: r.get(15)?,
        finished_at: r.get(16)?,
    })
}

/// Runs the migrations the database lacks, on the writer.
async fn migrate(writer: &Session, flow_name: &str, now: i64) -> Result<()> {
    let flow = flow_name.to_string();
    writer
        .run(flow_name, "migrate", move |conn| {
            let failed = |version: i64| {
                let flow = flow.clone();
                move |source: rusqlite::Error| LedgerError::Migrate {
                    flow: flow.clone(),
                    version,
                    source: source.into(),
                }
            };
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(failed(0))?;
            tx.execute(schema::SQLITE_SCHEMA_TABLE, []).map_err(failed(0))?;
            let current: i64 = tx
                .query_row("SELECT COALESCE(MAX(version), 0) FROM meshline_schema", [], |r| {
                    r.get(0)
                })
                .map_err(failed(0))?;
            if current > SCHEMA_VERSION {
                return Err(LedgerError::SchemaTooNew {
                    flow: flow.clone(),
                    found: current,
                    known: SCHEMA_VERSION,
                });
            }
            for migration in schema::SQLITE.iter().filter(|m| m.version > current) {
                for statement in migration.statements {
                    tx.execute(statement, []).map_err(failed(migration.version))?;
                }
                tx.execute(
                    "INSERT INTO meshline_schema (version, description, applied_at) VALUES (?1, ?2, ?3)",
                    params![migration.version, migration.description, now],
                )
                .map_err(failed(migration.version))?;
            }
            tx.commit().map_err(failed(SCHEMA_VERSION))
        })
        .await
}

/// Copies the write-ahead log into the database file from a connection and a thread of its own, so the
/// writer's commits do not stop for it (SQLite lets a passive checkpoint run alongside a writer). The
/// writer's own automatic checkpoint stays on at a larger size as a backstop.
fn spawn_checkpointer(path: &Path) -> std::io::Result<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let path = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("meshline-wal".into())
        .spawn(move || {
            let conn = match open_connection(&path) {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(ledger = %path.display(), error = %e, "the ledger's checkpointer could not open the database; the writer checkpoints by itself");
                    return;
                }
            };
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(ledger = %path.display(), error = %e, "checkpoint failed; trying again");
                }
            }
        })?;
    Ok((stop, thread))
}

fn open_connection(path: &Path) -> std::result::Result<Connection, BackendError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    // Takes effect only on a new, empty database (before its first table): the purge then gives freed
    // pages back with `PRAGMA incremental_vacuum`. A ledger created by an older version keeps
    // `auto_vacuum = NONE` (switching needs a full `VACUUM`, which rewrites the whole file under an exclusive
    // lock, too long to do at start-up); its freed pages go to the free list and new rows reuse them, so the
    // file stops growing at its retention's steady state instead of shrinking.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(
            format!("the database refused write-ahead logging (journal mode {mode})").into(),
        );
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_BACKSTOP_PAGES)?;
    // Sorters and other transient b-trees in memory, not in temporary files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Chunked statements come in every size up to the chunk; keep them all prepared.
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Runs `f` with `synchronous = FULL`, so its commit is on disk before the caller acknowledges anything (see
/// the module doc), and returns to NORMAL whatever `f` did.
fn durable<T>(
    conn: &mut Connection,
    flow: &str,
    f: impl FnOnce(&mut Connection) -> Result<T>,
) -> Result<T> {
    let sync = |conn: &Connection, level: &str| {
        conn.pragma_update(None, "synchronous", level)
            .map_err(db(flow, "set synchronous", None))
    };
    sync(conn, "FULL")?;
    let result = f(conn);
    sync(conn, "NORMAL")?;
    result
}

/// Rows per multi-row insert: a statement's fixed cost is a large share of one small insert.
const INSERT_CHUNK: usize = 32;

/// Inserts `rows` with `head` (`INSERT INTO t (a, b, …)`) and `tail` (e.g. an `ON CONFLICT` clause), in
/// statements of [`INSERT_CHUNK`] rows and single-row statements for the rest, all cached.
fn insert_rows<const N: usize>(
    conn: &Connection,
    head: &str,
    tail: &str,
    rows: &[[&dyn rusqlite::ToSql; N]],
) -> rusqlite::Result<()> {
    let sql = |count: usize| {
        let row = format!("({})", vec!["?"; N].join(", "));
        format!("{head} VALUES {} {tail}", vec![row; count].join(", "))
    };
    let mut chunks = rows.chunks_exact(INSERT_CHUNK);
    if rows.len() >= INSERT_CHUNK {
        let mut insert = conn.prepare_cached(&sql(INSERT_CHUNK))?;
        for chunk in &mut chunks {
            insert.execute(rusqlite::params_from_iter(chunk.iter().flatten()))?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut insert = conn.prepare_cached(&sql(1))?;
        for row in rest {
            insert.execute(rusqlite::params_from_iter(row.iter()))?;
        }
    }
    Ok(())
}

/// The lineage rows of one operation, written together at its end.
struct Lineage {
    at: i64,
    rows: Vec<(i64, i64, &'static str, String, String)>,
}

impl Lineage {
    fn new(at: i64) -> Self {
        Lineage {
            at,
            rows: Vec::new(),
        }
    }

    fn add(
        &mut self,
        id: i64,
        generation: i64,
        step: &'static str,
        detail: String,
        correlation_id: &str,
    ) {
        self.rows
            .push((id, generation, step, detail, correlation_id.to_string()));
    }

    fn write(self, conn: &Connection) -> rusqlite::Result<()> {
        let rows: Vec<[&dyn rusqlite::ToSql; 6]> = self
            .rows
            .iter()
            .map(|(id, generation, step, detail, correlation_id)| {
                [
                    id as &dyn rusqlite::ToSql,
                    generation,
                    &self.at,
                    step,
                    detail,
                    correlation_id,
                ]
            })
            .collect();
        insert_rows(
            conn,
            "INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id)",
            "",
            &rows,
        )
    }
}

fn set_checkpoint_on(
    conn: &Connection,
    flow: &str,
    source: &str,
    value: &str,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO checkpoints (flow, source, value, updated_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (flow, source) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )?
    .execute(params![flow, source, value, now])
    .map(|_| ())
}

/// `AND bucket IN (…)` for a bucket set, or nothing when it is every bucket. Buckets are numbers below 100
/// that this code formats itself, so the SQL text cannot carry input.
fn bucket_filter(buckets: &BucketSet) -> String {
    if *buckets == BucketSet::all() {
        return String::new();
    }
    let list: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
    format!("AND bucket IN ({})", list.join(", "))
}

/// A record whose key the ledger does not hold, inserted at receipt (its parameters are the ingest's upsert's).
/// `OR ROLLBACK` and no conflict clause: it keeps no statement journal (schema version 13).
const INSERT_NEW: &str = "INSERT OR ROLLBACK INTO records (flow, source_key, idempotency_key, external_id, \
    generation, payload_hash, contract_version, state, claimed_from, lease_owner, lease_expires_at, fence, \
    attempts, next_attempt_at, bucket, correlation_id, received_at, updated_at, ordering_value, tally_mark) \
    VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?10, ?11, ?12, ?13, ?14, ?14, ?15, ?8, ?9, ?7, ?7, ?16, 1)";

/// Leases due records: followed by `WHERE id IN (?, …)`, whose parameters SQLite numbers from 4. No
/// RETURNING: see the ingest for why. It moves records from one waiting state to another and changes no
/// other counted column, so it changes no counter: it sets `tally_mark` and the update trigger skips it
/// (schema version 12). `OR ROLLBACK`: no statement journal (schema version 13).
const CLAIM_SET: &str = "UPDATE OR ROLLBACK records SET \
    claimed_from = CASE WHEN state = 'delivering' THEN claimed_from ELSE state END, \
    state = 'delivering', lease_owner = ?1, lease_expires_at = ?2, next_attempt_at = ?2, \
    fence = fence + 1, attempts = attempts + 1, updated_at = ?3, tally_mark = tally_mark + 1";

/// What the statements that set `tally_mark` changed in the counters (schema version 12), added once per
/// batch in the same transaction, exactly as the triggers would have added it row by row.
#[derive(Default)]
struct WriterTally {
    /// New records inserted (generation 1, waiting): `records`, `received` and `pending` +1 each, and one
    /// receipt in the current minute.
    received_new: i64,
    /// Records delivered for the first time that never failed: `delivered` +1 and `pending` -1 each.
    delivered: i64,
}

impl WriterTally {
    fn add_to_counters(&self, conn: &Connection, flow: &str, now: i64) -> rusqlite::Result<()> {
        let add = "ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value";
        if self.received_new > 0 {
            conn.prepare_cached(&format!(
                "INSERT INTO ledger_counters (flow, counter, shard, value) \
                 VALUES (?1, 'records', 0, ?2), (?1, 'received', 0, ?2), (?1, 'pending', 0, ?2) {add}"
            ))?
            .execute(params![flow, self.received_new])?;
            conn.prepare_cached(
                "INSERT INTO ledger_window (flow, minute, counter, shard, value) \
                 VALUES (?1, ?2, 'received', 0, ?3) \
                 ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = value + excluded.value",
            )?
            .execute(params![flow, now / 60_000, self.received_new])?;
        }
        if self.delivered > 0 {
            conn.prepare_cached(&format!(
                "INSERT INTO ledger_counters (flow, counter, shard, value) \
                 VALUES (?1, 'delivered', 0, ?2), (?1, 'pending', 0, -?2) {add}"
            ))?
            .execute(params![flow, self.delivered])?;
            conn.prepare_cached(
                "INSERT INTO ledger_counters (flow, counter, shard, value) \
                 VALUES (?1, 'last_delivery_at', 0, ?2) \
                 ON CONFLICT (flow, counter, shard) DO UPDATE SET value = MAX(value, excluded.value)",
            )?
            .execute(params![flow, now])?;
        }
        Ok(())
    }
}

/// `?, ?, …` for `n` parameters.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Reads a row of [`RECORD_COLUMNS`], by position.
fn record_row(r: &Row<'_>) -> rusqlite::Result<RecordRow> {
    Ok(RecordRow {
        id: r.get(0)?,
        flow: r.get(1)?,
        source_key: r.get(2)?,
        idempotency_key: r.get(3)?,
        external_id: r.get(4)?,
        generation: r.get(5)?,
        payload: r.get(6)?,
        payload_hash: r.get(7)?,
        contract_version: r.get(8)?,
        state: r.get(9)?,
        claimed_from: r.get(10)?,
        attempts: r.get(11)?,
        next_attempt_at: r.get(12)?,
        lease_owner: r.get(13)?,
        lease_expires_at: r.get(14)?,
        fence: r.get(15)?,
        last_error: r.get(16)?,
        last_error_class: r.get(17)?,
        dead_letter_reason: r.get(18)?,
        erp_response: r.get(19)?,
        hold_rule: r.get(20)?,
        hold_role: r.get(21)?,
        approved_by: r.get(22)?,
        bucket: r.get(23)?,
        correlation_id: r.get(24)?,
        received_at: r.get(25)?,
        updated_at: r.get(26)?,
        delivered_at: r.get(27)?,
        first_failure_at: r.get(28)?,
        outcome: r.get(29)?,
    })
}

fn claim_on(
    conn: &mut Connection,
    flow: &str,
    worker: &str,
    buckets: &BucketSet,
    limit: usize,
    now: i64,
    expires: i64,
) -> Result<Vec<ClaimedRecord>> {
    let err = db(flow, "claim", None);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let mut records = Vec::new();
    {
        // The write lock taken by BEGIN IMMEDIATE makes the select and the updates one atomic claim.
        let select = format!(
            "SELECT id, state, lease_owner FROM records WHERE flow = ?1 {} AND {PENDING} \
             AND next_attempt_at <= ?2 AND (lease_expires_at IS NULL OR lease_expires_at <= ?2) \
             ORDER BY next_attempt_at, id LIMIT ?3",
            bucket_filter(buckets)
        );
        let due: Vec<(i64, String, Option<String>)> = tx
            .prepare_cached(&select)
            .map_err(&err)?
            .query_map(
                params![flow, now, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(&err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(&err)?;
        // The claim's lineage detail, written without building a JSON value per record (this runs on the
        // ledger's one thread); the same keys, in the same order, as the other lineage details.
        let worker_json = json!(worker);
        let mut lineage = Lineage::new(now);
        // Leased and read back a chunk of records per statement: a statement's fixed cost is a large share
        // of a one-row update.
        for chunk in due.chunks(INSERT_CHUNK) {
            let ids = placeholders(chunk.len());
            let mut values: Vec<&dyn rusqlite::ToSql> = vec![&worker, &expires, &now];
            values.extend(chunk.iter().map(|(id, _, _)| id as &dyn rusqlite::ToSql));
            tx.prepare_cached(&format!("{CLAIM_SET} WHERE id IN ({ids})"))
                .and_then(|mut s| s.execute(rusqlite::params_from_iter(values)))
                .map_err(&err)?;
            let mut read: HashMap<i64, RecordRow> = tx
                .prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM {RECORD_FROM} WHERE r.id IN ({ids})"
                ))
                .and_then(|mut s| {
                    s.query_map(
                        rusqlite::params_from_iter(chunk.iter().map(|(id, _, _)| id)),
                        record_row,
                    )?
                    .map(|row| row.map(|row| (row.id, row)))
                    .collect()
                })
                .map_err(&err)?;
            for (id, state, owner) in chunk {
                let record = read.remove(id).ok_or_else(|| LedgerError::Corrupt {
                    flow: flow.to_string(),
                    record: RecordId(*id),
                    what: "payload",
                    detail: "the record has no stored payload".into(),
                })?;
                let taken_over_from = (state == RecordState::Delivering.as_str())
                    .then_some(owner.as_deref())
                    .flatten();
                let detail = format!(
                    r#"{{"attempt":{},"fence":{},"lease_expires_at":{expires},"taken_over_from":{},"worker":{worker_json}}}"#,
                    record.attempts,
                    record.fence,
                    json!(taken_over_from),
                );
                lineage.add(
                    *id,
                    record.generation,
                    "claimed",
                    detail,
                    &record.correlation_id,
                );
                records.push(record);
            }
        }
        lineage
            .write(&tx)
            .map_err(db(flow, "claim lineage", None))?;
    }
    tx.commit().map_err(db(flow, "claim commit", None))?;
    records.into_iter().map(RecordRow::into_claimed).collect()
}

/// A completion, one record: the statement every record delivered runs once. It fires the counter trigger and
/// updates the partial indexes, so none of its tests may be an `IN` list SQLite would build a temporary index
/// for on every run (see `sqlite_pending!`). `OR ROLLBACK`: no statement journal (schema version 13). A release
/// (`?1` NULL: no new state) gives back its claim's attempt: the record was not tried.
const COMPLETE: &str = "UPDATE OR ROLLBACK records SET state = COALESCE(?1, claimed_from, 'received'), claimed_from = NULL, \
                 lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = COALESCE(?2, next_attempt_at), \
                 last_error = COALESCE(?3, last_error), last_error_class = COALESCE(?4, last_error_class), \
                 dead_letter_reason = COALESCE(?5, dead_letter_reason), erp_response = COALESCE(?6, erp_response), \
                 hold_rule = COALESCE(?7, hold_rule), hold_role = COALESCE(?8, hold_role), retries = retries + ?9, \
                 attempts = CASE WHEN ?1 IS NULL AND attempts > 0 THEN attempts - 1 ELSE attempts END, \
                 first_failure_at = CASE WHEN ?10 THEN COALESCE(first_failure_at, ?11) ELSE first_failure_at END, \
                 delivered_at = CASE WHEN ?1 = 'delivered' THEN ?11 ELSE delivered_at END, updated_at = ?11, \
                 ticket = CASE WHEN ?1 = 'delivered' OR ?1 = 'dead_lettered' OR ?1 = 'held' THEN ?16 ELSE ticket END \
                 WHERE id = ?12 AND flow = ?13 AND generation = ?14 AND fence = ?15 AND state = 'delivering'";

/// [`COMPLETE`] for the common case, the delivery of a record that never failed, for [`INSERT_CHUNK`] records at
/// once (`?1` the time, `?2` the flow, then id, generation and fence per record; a shorter chunk is padded
/// with id -1, which no record has, so one statement serves every chunk: a statement per chunk length would
/// keep up to 32 compiled programs, each with the counter triggers compiled in, in the statement cache).
///
/// The same change as [`COMPLETE`], with `tally_mark` set so the update trigger skips it and the batch counts
/// it (`WriterTally::delivered`). One statement for a chunk of records shares its fixed cost between them, and
/// `OR ROLLBACK` spares it a statement journal (schema version 13). It returns the records it delivered; a
/// record that failed before (its recovery time counts toward MTTR) or whose claim is stale is left to
/// [`COMPLETE`].
static COMPLETE_DELIVERED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let values: Vec<String> = (0..INSERT_CHUNK)
        .map(|i| format!("(?{}, ?{}, ?{})", 3 * i + 3, 3 * i + 4, 3 * i + 5))
        .collect();
    format!(
        "UPDATE OR ROLLBACK records SET state = 'delivered', claimed_from = NULL, lease_owner = NULL, \
         lease_expires_at = NULL, delivered_at = ?1, updated_at = ?1, ticket = NULL, \
         tally_mark = tally_mark + 1 \
         FROM (VALUES {}) AS claim \
         WHERE records.id = claim.column1 AND records.generation = claim.column2 \
         AND records.fence = claim.column3 AND records.flow = ?2 AND records.state = 'delivering' \
         AND records.first_failure_at IS NULL \
         RETURNING records.id",
        values.join(", ")
    )
});

/// The id a padding row of [`COMPLETE_DELIVERED`] names: record ids start at 1.
const NO_RECORD: i64 = -1;

fn complete_on(
    conn: &mut Connection,
    flow: &str,
    revision: Option<&str>,
    completions: Vec<(Completion, CompletionParams, String)>,
    now: i64,
) -> Result<Vec<CompletionResult>> {
    let err = db(flow, "complete", None);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let mut results = Vec::with_capacity(completions.len());
    {
        let mut apply = tx.prepare_cached(COMPLETE).map_err(&err)?;
        let mut counted = WriterTally::default();
        // First deliveries of records that never failed, a chunk per statement. Only a record's first
        // completion in the batch is a candidate: a second one for the same record runs after it, as it
        // would one by one, and is refused.
        let mut seen: HashSet<i64> = HashSet::with_capacity(completions.len());
        let candidates: Vec<(i64, i64, i64)> = completions
            .iter()
            .filter(|(c, p, _)| {
                seen.insert(c.claim.id.0)
                    && matches!(c.outcome, Outcome::Delivered)
                    && p.retry_increment == 0
                    && !p.failed
                    && p.ticket.is_none()
            })
            .map(|(c, ..)| (c.claim.id.0, c.claim.generation, c.claim.fence))
            .collect();
        let mut delivered_together: HashSet<(i64, i64, i64)> = HashSet::new();
        for chunk in candidates.chunks(INSERT_CHUNK) {
            let mut values: Vec<&dyn rusqlite::ToSql> = vec![&now, &flow];
            for (id, generation, fence) in chunk {
                values.extend([id as &dyn rusqlite::ToSql, generation, fence]);
            }
            for _ in chunk.len()..INSERT_CHUNK {
                values.extend([&NO_RECORD as &dyn rusqlite::ToSql, &NO_RECORD, &NO_RECORD]);
            }
            let ids: Vec<i64> = tx
                .prepare_cached(&COMPLETE_DELIVERED)
                .and_then(|mut s| {
                    s.query_map(rusqlite::params_from_iter(values), |r| r.get(0))?
                        .collect()
                })
                .map_err(&err)?;
            let ids: HashSet<i64> = ids.into_iter().collect();
            delivered_together.extend(chunk.iter().filter(|(id, ..)| ids.contains(id)));
        }
        counted.delivered = delivered_together.len() as i64;
        let mut snapshot = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO snapshots (record_id, generation, kind, at, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(&err)?;
        // Completions that applied, for their lineage: (record, generation, step, detail).
        let mut applied_rows: Vec<(i64, i64, &'static str, String)> =
            Vec::with_capacity(completions.len());
        // The revision's tally; deliveries wait for their receipt times, read below with the correlation ids.
        let mut tally = RevisionTally::default();
        let mut delivered: Vec<i64> = Vec::new();
        // Dead letters and holds that applied, for their tickets: (record, fingerprint, cause, outcome).
        let mut attached: Vec<(i64, String, tickets::Cause, Outcome)> = Vec::new();
        for (completion, p, detail) in completions {
            let claim = completion.claim;
            let record = Some(claim.id);
            let ticket = p.ticket;
            // Taken out so a second completion of the same claim in the batch is not counted twice.
            let applied = if delivered_together.remove(&(claim.id.0, claim.generation, claim.fence))
            {
                1
            } else {
                apply
                    .execute(params![
                        p.new_state,
                        p.next_attempt_at,
                        p.last_error,
                        p.error_class,
                        p.dead_letter_reason,
                        p.erp_response,
                        p.hold_rule,
                        p.hold_role,
                        p.retry_increment,
                        p.failed,
                        now,
                        claim.id.0,
                        flow,
                        claim.generation,
                        claim.fence,
                        ticket.as_ref().map(|(fingerprint, _)| fingerprint),
                    ])
                    .map_err(db(flow, "complete", record))?
            };
            if applied == 0 {
                results.push(refused(&tx, flow, &completion, now)?);
                continue;
            }
            let step = completion.outcome.step();
            if let Some(body) = p.snapshot {
                snapshot
                    .execute(params![claim.id.0, claim.generation, step, now, body])
                    .map_err(db(flow, "complete snapshot", record))?;
            }
            applied_rows.push((claim.id.0, claim.generation, step, detail));
            if let Some((fingerprint, cause)) = ticket {
                attached.push((claim.id.0, fingerprint, cause, completion.outcome.clone()));
            }
            match completion.outcome {
                Outcome::Delivered => delivered.push(claim.id.0),
                ref outcome => tally.add(outcome, 0),
            }
            results.push(CompletionResult::Applied);
        }
        // The correlation ids for the lineage, a chunk of records per statement.
        // With them, the receipt time of each record's current generation, for the delivery latency.
        // And the source key, for the examples of tickets.
        let mut correlation: HashMap<i64, (String, i64, String)> =
            HashMap::with_capacity(applied_rows.len());
        for chunk in applied_rows.chunks(INSERT_CHUNK) {
            tx.prepare_cached(&format!(
                "SELECT id, correlation_id, received_at, source_key FROM records WHERE id IN ({})",
                placeholders(chunk.len())
            ))
            .and_then(|mut s| {
                let rows = s.query_map(
                    rusqlite::params_from_iter(chunk.iter().map(|(id, ..)| id)),
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    },
                )?;
                for row in rows {
                    let (id, correlation_id, received_at, source_key) = row?;
                    correlation.insert(id, (correlation_id, received_at, source_key));
                }
                Ok(())
            })
            .map_err(&err)?;
        }
        if let Some(revision) = revision {
            for id in &delivered {
                let received_at = correlation.get(id).map_or(now, |(_, at, _)| *at);
                tally.add(&Outcome::Delivered, now - received_at);
            }
            if !tally.is_empty() {
                let slot = revision_slot(now);
                let mut values: Vec<&dyn rusqlite::ToSql> = vec![&flow, &revision, &slot];
                values.extend(tally.values().iter().map(|v| v as &dyn rusqlite::ToSql));
                tx.prepare_cached(&revision_upsert(false))
                    .and_then(|mut s| s.execute(rusqlite::params_from_iter(values)))
                    .map_err(db(flow, "complete revision window", None))?;
            }
        }
        let mut lineage = Lineage::new(now);
        for (id, generation, step, detail) in applied_rows {
            let correlation_id = correlation.get(&id).map_or("", |(c, ..)| c.as_str());
            lineage.add(id, generation, step, detail, correlation_id);
        }
        lineage
            .write(&tx)
            .map_err(db(flow, "complete lineage", None))?;
        counted
            .add_to_counters(&tx, flow, now)
            .map_err(db(flow, "complete counters", None))?;
        // One upsert per cause in the batch, not per record: a thousand dead letters of one reason are one
        // ticket row written once.
        let mut occurrences = tickets::Occurrences::new();
        for (id, fingerprint, cause, outcome) in &attached {
            let (correlation_id, source_key) = correlation
                .get(id)
                .map_or(("", ""), |(c, _, k)| (c.as_str(), k.as_str()));
            let example = tickets::example_of(outcome, *id, correlation_id, source_key, now);
            tickets::add_occurrence(&mut occurrences, fingerprint, cause, example);
        }
        for (fingerprint, (cause, n, examples)) in occurrences {
            ticket_occur_on(&tx, flow, &fingerprint, &cause, n, examples, None, now)?;
        }
    }
    tx.commit().map_err(db(flow, "complete commit", None))?;
    Ok(results)
}

/// Releases the leases of the workers whose ids start with `prefix` (`pattern` is its escaped `LIKE` form).
/// SQLite's `LIKE` ignores ASCII case, so the prefix is compared exactly too: worker ids are pod names, and
/// `Meshline-x` is not `meshline-x`'s pod.
fn release_leases_on(
    conn: &mut Connection,
    flow: &str,
    pattern: &str,
    prefix: &str,
    now: i64,
) -> Result<u64> {
    let err = db(flow, "release leases", None);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let held: Vec<(i64, i64, String, String)> = tx
        .prepare_cached(
            "SELECT id, generation, correlation_id, lease_owner FROM records \
             WHERE flow = ?1 AND state = 'delivering' AND lease_owner LIKE ?2 ESCAPE '\\' \
             AND substr(lease_owner, 1, length(?3)) = ?3",
        )
        .and_then(|mut s| {
            s.query_map(params![flow, pattern, prefix], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect()
        })
        .map_err(&err)?;
    let mut lineage = Lineage::new(now);
    {
        // Back to where it was claimed from, due now; the fence moves so the old holder's completion is
        // refused even if nobody claims the record before it arrives.
        let mut release = tx
            .prepare_cached(
                "UPDATE records SET state = COALESCE(claimed_from, 'received'), claimed_from = NULL, \
                 lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = ?1, fence = fence + 1, \
                 updated_at = ?1 WHERE id = ?2 AND state = 'delivering'",
            )
            .map_err(&err)?;
        for (id, generation, correlation_id, owner) in &held {
            release.execute(params![now, id]).map_err(&err)?;
            lineage.add(
                *id,
                *generation,
                "lease_released",
                json!({"owner": owner}).to_string(),
                correlation_id,
            );
        }
    }
    lineage.write(&tx).map_err(&err)?;
    tx.commit().map_err(&err)?;
    Ok(held.len() as u64)
}

/// A refused completion: find out why, release a superseded holder's lease, leave a trace.
fn refused(
    conn: &Connection,
    flow: &str,
    completion: &Completion,
    now: i64,
) -> Result<CompletionResult> {
    let claim = completion.claim;
    let err = db(flow, "complete check", Some(claim.id));
    let current: Option<(i64, i64, String)> = conn
        .prepare_cached(
            "SELECT generation, fence, correlation_id FROM records WHERE id = ?1 AND flow = ?2",
        )
        .map_err(&err)?
        .query_row(params![claim.id.0, flow], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
        .map_err(&err)?;
    let Some((generation, fence, correlation_id)) = current else {
        return Ok(CompletionResult::NotFound);
    };
    let superseded = generation != claim.generation;
    if superseded && fence == claim.fence {
        // The stale holder still holds the lease over the newer generation: let it go now rather than make
        // the update wait for the lease to expire.
        conn.prepare_cached(
            "UPDATE records SET lease_owner = NULL, lease_expires_at = NULL WHERE id = ?1 AND fence = ?2",
        )
        .and_then(|mut s| s.execute(params![claim.id.0, claim.fence]))
        .map_err(db(flow, "release superseded lease", Some(claim.id)))?;
    }
    let detail = json!({
        "outcome": completion.outcome.step(),
        "claim_generation": claim.generation,
        "claim_fence": claim.fence,
        "current_fence": fence,
        "result": if superseded { "superseded" } else { "lease_lost" },
    });
    let mut lineage = Lineage::new(now);
    lineage.add(
        claim.id.0,
        generation,
        "completion_refused",
        detail.to_string(),
        &correlation_id,
    );
    lineage
        .write(conn)
        .map_err(db(flow, "complete lineage", Some(claim.id)))?;
    Ok(if superseded {
        CompletionResult::Superseded {
            current_generation: generation,
        }
    } else {
        CompletionResult::LeaseLost
    })
}

#[allow(clippy::too_many_arguments)]
fn manual(
    conn: &Connection,
    flow: &str,
    id: RecordId,
    action: ManualAction,
    seen: Option<&HeldAsSeen>,
    actor: &str,
    reason: &str,
    now: i64,
) -> Result<()> {
    let err = db(flow, action.name(), Some(id));
    #[allow(clippy::type_complexity)]
    let (state, generation, correlation_id, source_key, hold_rule, hold_role): (
        String,
        i64,
        String,
        String,
        Option<String>,
        Option<String>,
    ) = conn
        .prepare_cached(
            "SELECT state, generation, correlation_id, source_key, hold_rule, hold_role FROM records \
             WHERE id = ?1 AND flow = ?2",
        )
        .map_err(&err)?
        .query_row(params![id.0, flow], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()
        .map_err(&err)?
        .ok_or_else(|| LedgerError::NotFound {
            flow: flow.to_string(),
            record: id,
        })?;
    // Read and written in this one IMMEDIATE transaction: no ingest can slip a new generation in between.
    if let Some(changed) =
        super::hold_changed(flow, id, seen, generation, &state, hold_role.as_deref())
    {
        return Err(changed);
    }
    let from = RecordState::parse(&state).ok_or_else(|| LedgerError::Corrupt {
        flow: flow.to_string(),
        record: id,
        what: "state",
        detail: format!("unknown state {state:?}"),
    })?;
    let to = action.target_state();
    if from != action.source_state() || !from.can_transition_to(to) {
        return Err(LedgerError::IllegalTransition {
            flow: flow.to_string(),
            record: id,
            from,
            to,
        });
    }
    let approved_by = (action == ManualAction::Approve).then_some(actor);
    let dead_letter_reason =
        (action == ManualAction::Reject).then(|| format!("rejected by {actor}: {reason}"));
    // A rejected hold leaves its hold's ticket for a dead letter's (approvals and replays keep the record's
    // ticket until it is delivered or dead-lettered again).
    let rejected = (action == ManualAction::Reject).then(|| {
        let cause = tickets::Cause::rejected_hold(hold_rule.as_deref());
        (cause.fingerprint(flow), cause)
    });
    conn.prepare_cached(
        "UPDATE records SET state = ?1, approved_by = COALESCE(?2, approved_by), \
         dead_letter_reason = COALESCE(?3, dead_letter_reason), next_attempt_at = ?4, updated_at = ?4, \
         ticket = COALESCE(?6, ticket) WHERE id = ?5",
    )
    .and_then(|mut s| {
        s.execute(params![
            to.as_str(),
            approved_by,
            dead_letter_reason,
            now,
            id.0,
            rejected.as_ref().map(|(fingerprint, _)| fingerprint)
        ])
    })
    .map_err(&err)?;
    if let Some((fingerprint, cause)) = rejected {
        let snapshot: Option<String> = conn
            .prepare_cached(
                "SELECT body FROM snapshots WHERE record_id = ?1 AND generation = ?2 AND kind = 'held'",
            )
            .and_then(|mut s| s.query_row(params![id.0, generation], |r| r.get(0)).optional())
            .map_err(&err)?;
        let snapshot =
            snapshot.and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok());
        let example = tickets::example(
            id.0,
            &correlation_id,
            &source_key,
            now,
            dead_letter_reason.as_deref(),
            None,
            snapshot.as_ref(),
        );
        ticket_occur_on(
            conn,
            flow,
            &fingerprint,
            &cause,
            1,
            vec![example],
            None,
            now,
        )?;
    }
    conn.prepare_cached(
        "INSERT INTO interventions (flow, record_id, action, actor, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| s.execute(params![flow, id.0, action.name(), actor, reason, now]))
    .map_err(&err)?;
    let detail =
        json!({"actor": actor, "reason": reason, "from": from.as_str(), "to": to.as_str()});
    let mut lineage = Lineage::new(now);
    lineage.add(
        id.0,
        generation,
        action.name(),
        detail.to_string(),
        &correlation_id,
    );
    lineage.write(conn).map_err(&err)?;
    Ok(())
}

fn get_on(conn: &mut Connection, flow: &str, id: RecordId) -> Result<Option<RecordDetail>> {
    let record = Some(id);
    let err = db(flow, "get", record);
    // One read transaction: the record, its lineage and its snapshots from one state of the database.
    let tx = conn.transaction().map_err(&err)?;
    let row: Option<RecordRow> = tx
        .prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM {RECORD_FROM} WHERE r.id = ?1 AND r.flow = ?2"
        ))
        .map_err(&err)?
        .query_row(params![id.0, flow], record_row)
        .optional()
        .map_err(&err)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let lineage: Vec<LineageRow> = tx
        .prepare_cached(
            "SELECT at, generation, step, detail, correlation_id FROM lineage WHERE record_id = ?1 ORDER BY id",
        )
        .map_err(&err)?
        .query_map([id.0], |r| {
            Ok(LineageRow {
                at: r.get(0)?,
                generation: r.get(1)?,
                step: r.get(2)?,
                detail: r.get(3)?,
                correlation_id: r.get(4)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(db(flow, "get lineage", record))?;
    let snapshots: Vec<SnapshotRow> = tx
        .prepare_cached(
            "SELECT generation, kind, at, body FROM snapshots WHERE record_id = ?1 ORDER BY generation, at",
        )
        .map_err(&err)?
        .query_map([id.0], |r| {
            Ok(SnapshotRow {
                generation: r.get(0)?,
                kind: r.get(1)?,
                at: r.get(2)?,
                body: r.get(3)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(db(flow, "get snapshots", record))?;
    let interventions: Vec<InterventionRow> = tx
        .prepare_cached(
            "SELECT record_id, action, actor, reason, at FROM interventions \
             WHERE flow = ?1 AND record_id = ?2 ORDER BY id",
        )
        .map_err(&err)?
        .query_map(params![flow, id.0], |r| {
            Ok(InterventionRow {
                record_id: r.get(0)?,
                action: r.get(1)?,
                actor: r.get(2)?,
                reason: r.get(3)?,
                at: r.get(4)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(db(flow, "get interventions", record))?;
    tx.commit().map_err(&err)?;
    assemble_detail(row, lineage, snapshots, interventions).map(Some)
}

/// The kept counters, shards summed (or maxed), and the failure-rate window's sums.
fn kept_on(
    conn: &Connection,
    flow: &str,
    now: i64,
) -> Result<(HashMap<String, i64>, HashMap<String, i64>)> {
    let err = db(flow, "counts", None);
    let kept = conn
        .prepare_cached(
            "SELECT counter, SUM(value), MAX(value) FROM ledger_counters WHERE flow = ?1 GROUP BY counter",
        )
        .and_then(|mut s| {
            s.query_map([flow], |r| {
                let counter: String = r.get(0)?;
                let value: i64 = if MAX_COUNTERS.contains(&counter.as_str()) {
                    r.get(2)?
                } else {
                    r.get(1)?
                };
                Ok((counter, value))
            })?
            .collect::<rusqlite::Result<HashMap<_, _>>>()
        })
        .map_err(&err)?;
    let window = conn
        .prepare_cached(
            "SELECT counter, SUM(value) FROM ledger_window WHERE flow = ?1 AND minute >= ?2 GROUP BY counter",
        )
        .and_then(|mut s| {
            s.query_map(params![flow, window_start_minute(now)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<HashMap<_, _>>>()
        })
        .map_err(&err)?;
    Ok((kept, window))
}

/// The receipt time of the oldest waiting record: one probe of the `records_pending_age` index.
fn oldest_pending_on(conn: &Connection, flow: &str) -> Result<Option<i64>> {
    conn.prepare_cached(&format!(
        "SELECT received_at FROM records WHERE flow = ?1 AND {PENDING} \
         ORDER BY received_at LIMIT 1"
    ))
    .and_then(|mut s| s.query_row([flow], |r| r.get(0)).optional())
    .map_err(db(flow, "oldest pending", None))
}

/// The counts from the kept counters: a few dozen rows, one read transaction.
fn counts_on(conn: &mut Connection, flow: &str, now: i64) -> Result<Counts> {
    let tx = conn.transaction().map_err(db(flow, "counts", None))?;
    let (kept, window) = kept_on(&tx, flow, now)?;
    let oldest = oldest_pending_on(&tx, flow)?;
    tx.commit().map_err(db(flow, "counts", None))?;
    Ok(counts_from_kept(&kept, &window, oldest, now))
}

/// Adds `by` to a counter of events that change no record row, in the caller's transaction.
pub(crate) fn bump_counter(
    conn: &Connection,
    flow: &str,
    counter: &str,
    by: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO ledger_counters (flow, counter, shard, value) VALUES (?1, ?2, 0, ?3) \
         ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(params![flow, counter, by])
    .map(|_| ())
}

/// Purges one batch of each kind, each in a short write transaction of its own (the one writer thread is
/// shared with intake), and trims the event minutes that left the window.
fn purge_on(
    conn: &mut Connection,
    flow: &str,
    now: i64,
    retention: Retention,
    limit: usize,
) -> Result<PurgeReport> {
    let err = db(flow, "purge", None);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut report = PurgeReport::default();
    if let Some(cutoff) = retention_cutoff(now, retention.dead_letters) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let ids: Vec<i64> = tx
            .prepare_cached(&format!(
                "SELECT id FROM records WHERE flow = ?1 AND state = 'dead_lettered' AND {ATTENTION} \
                 AND updated_at < ?2 ORDER BY id LIMIT ?3"
            ))
            .and_then(|mut s| s.query_map(params![flow, cutoff, limit], |r| r.get(0))?.collect())
            .map_err(&err)?;
        for chunk in ids.chunks(INSERT_CHUNK) {
            let list = placeholders(chunk.len());
            // Interventions stay (they are the flow's history and its count), detached from the record.
            for statement in [
                format!("UPDATE interventions SET record_id = NULL WHERE record_id IN ({list})"),
                format!("DELETE FROM lineage WHERE record_id IN ({list})"),
                format!("DELETE FROM snapshots WHERE record_id IN ({list})"),
                format!("DELETE FROM payloads WHERE record_id IN ({list})"),
                format!("DELETE FROM records WHERE id IN ({list})"),
            ] {
                tx.prepare_cached(&statement)
                    .and_then(|mut s| s.execute(rusqlite::params_from_iter(chunk)))
                    .map_err(&err)?;
            }
        }
        if !ids.is_empty() {
            bump_counter(&tx, flow, DEAD_LETTERS_PURGED, ids.len() as i64).map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        report.dead_letters = ids.len() as u64;
    }
    if let Some(cutoff) = retention_cutoff(now, retention.delivered) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let due: Vec<(i64, i64, Option<String>, i64)> = tx
            .prepare_cached(
                "SELECT id, generation, external_id, delivered_at FROM records \
                 WHERE flow = ?1 AND state = 'delivered' AND purged_at IS NULL AND delivered_at < ?2 \
                 ORDER BY delivered_at LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![flow, cutoff, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(&err)?;
        {
            let mut compact = tx
                .prepare_cached(
                    "UPDATE records SET outcome = ?1, purged_at = ?2, last_error = NULL, erp_response = NULL, \
                     hold_rule = NULL, hold_role = NULL WHERE id = ?3",
                )
                .map_err(&err)?;
            for (id, generation, external_id, delivered_at) in &due {
                let outcome = compact_outcome(*generation, external_id.as_deref(), *delivered_at);
                compact.execute(params![outcome, now, id]).map_err(&err)?;
            }
        }
        for chunk in due.chunks(INSERT_CHUNK) {
            let list = placeholders(chunk.len());
            let ids: Vec<i64> = chunk.iter().map(|(id, ..)| *id).collect();
            for statement in [
                format!("DELETE FROM lineage WHERE record_id IN ({list})"),
                format!("DELETE FROM snapshots WHERE record_id IN ({list})"),
                format!("DELETE FROM payloads WHERE record_id IN ({list})"),
            ] {
                tx.prepare_cached(&statement)
                    .and_then(|mut s| s.execute(rusqlite::params_from_iter(&ids)))
                    .map_err(&err)?;
            }
        }
        if !due.is_empty() {
            bump_counter(&tx, flow, PAYLOADS_PURGED, due.len() as i64).map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        report.payloads = due.len() as u64;
    }
    conn.prepare_cached("DELETE FROM revision_window WHERE flow = ?1 AND slot < ?2")
        .and_then(|mut s| s.execute(params![flow, revision_slot(now - REVISION_RETENTION_MS)]))
        .map_err(db(flow, "prune the revision window", None))?;
    conn.prepare_cached("DELETE FROM ledger_window WHERE flow = ?1 AND minute < ?2")
        .and_then(|mut s| s.execute(params![flow, window_start_minute(now)]))
        .map_err(&err)?;
    if !report.is_empty() {
        // Gives freed pages back to the file system on a database created with incremental auto-vacuum
        // (every ledger this version creates); a no-op on older ones, whose free pages new rows reuse.
        // Stepped to the end: the pragma frees one page per step.
        conn.prepare_cached(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))
            .and_then(|mut s| {
                let mut rows = s.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            })
            .map_err(&err)?;
    }
    Ok(report)
}

/// Pages given back per purge batch: a bound on the time the writer spends on it.
const VACUUM_PAGES: i64 = 2_000;

/// The counts aggregated over every record of the flow (see [`Ledger::recount`]).
fn recount_on(conn: &Connection, flow: &str, now: i64) -> Result<Counts> {
    let err = db(flow, "counts", None);
    let row = conn
        .prepare_cached(&format!(
            "SELECT COUNT(*), COALESCE(SUM(generation), 0), COALESCE(SUM(state = 'delivered'), 0), \
             COALESCE(SUM(first_failure_at IS NOT NULL), 0), COALESCE(SUM(retries), 0), \
             COALESCE(SUM(state = 'dead_lettered'), 0), COALESCE(SUM(state = 'held'), 0), \
             COALESCE(SUM({PENDING}), 0), \
             MIN(CASE WHEN {PENDING} THEN received_at END), MAX(delivered_at), \
             AVG(CASE WHEN state = 'delivered' AND first_failure_at IS NOT NULL \
                 THEN CAST(delivered_at - first_failure_at AS REAL) END) \
             FROM records WHERE flow = ?1"
        ))
        .map_err(&err)?
        .query_row([flow], |r| {
            Ok(CountsRow {
                records: r.get(0)?,
                received: r.get(1)?,
                delivered: r.get(2)?,
                failed: r.get(3)?,
                retried: r.get(4)?,
                dead_lettered: r.get(5)?,
                held: r.get(6)?,
                pending: r.get(7)?,
                oldest_pending_at: r.get(8)?,
                last_delivery_at: r.get(9)?,
                mttr_ms: r.get(10)?,
            })
        })
        .map_err(&err)?;
    let interventions: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM interventions WHERE flow = ?1")
        .map_err(&err)?
        .query_row([flow], |r| r.get(0))
        .map_err(&err)?;
    let (kept, window) = kept_on(conn, flow, now)?;
    let mut counts = assemble_counts(row, interventions, now);
    add_events(&mut counts, &kept, &window);
    Ok(counts)
}

#[async_trait]
impl Ledger for SqliteLedger {
    fn flow(&self) -> &str {
        &self.flow
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ingest(&self, batch: Vec<IncomingRecord>) -> Result<Vec<IngestOutcome>> {
        Ok(self.ingest_inner(batch, None, None).await?.0)
    }

    async fn ingest_and_claim(
        &self,
        batch: Vec<IncomingRecord>,
        lease: &LeaseRequest,
    ) -> Result<(Vec<IngestOutcome>, Vec<ClaimedRecord>)> {
        self.ingest_inner(batch, None, Some(lease)).await
    }

    async fn ingest_with_checkpoint(
        &self,
        batch: Vec<IncomingRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<Vec<IngestOutcome>> {
        Ok(self
            .ingest_inner(
                batch,
                Some((source.to_string(), checkpoint.to_string())),
                None,
            )
            .await?
            .0)
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        let (flow, source) = (self.flow.clone(), source.to_string());
        self.read("read checkpoint", move |conn| {
            conn.prepare_cached("SELECT value FROM checkpoints WHERE flow = ?1 AND source = ?2")
                .and_then(|mut s| s.query_row(params![flow, source], |r| r.get(0)).optional())
                .map_err(db(&flow, "read checkpoint", None))
        })
        .await
    }

    async fn set_checkpoint(&self, source: &str, value: &str) -> Result<()> {
        self.ingest_inner(
            Vec::new(),
            Some((source.to_string(), value.to_string())),
            None,
        )
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
        let (flow, worker, buckets) = (self.flow.clone(), worker.to_string(), *buckets);
        self.run("claim", move |conn| {
            claim_on(conn, &flow, &worker, &buckets, limit, now, expires)
        })
        .await
    }

    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<CompletionResult>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now_ms();
        let flow = self.flow.clone();
        // What each completion writes, and its lineage detail, worked out here, off the ledger's thread.
        let completions: Vec<_> = completions
            .into_iter()
            .map(|completion| {
                let mut params = completion_params(&flow, &completion.outcome, now);
                params.detail["fence"] = json!(completion.claim.fence);
                let detail = std::mem::take(&mut params.detail).to_string();
                (completion, params, detail)
            })
            .collect();
        let revision = self.revision.get().cloned();
        self.run("complete", move |conn| {
            complete_on(conn, &flow, revision.as_deref(), completions, now)
        })
        .await
    }

    async fn append_lineage(&self, events: Vec<NewLineageEvent>) -> Result<()> {
        let now = self.clock.now_ms();
        let flow = self.flow.clone();
        self.run("append lineage", move |conn| {
            let err = db(&flow, "append lineage", None);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
                         SELECT id, generation, ?1, ?2, ?3, correlation_id FROM records WHERE id = ?4 AND flow = ?5",
                    )
                    .map_err(&err)?;
                for event in events {
                    let inserted = insert
                        .execute(params![
                            now,
                            event.step,
                            event.detail.to_string(),
                            event.record.0,
                            flow
                        ])
                        .map_err(db(&flow, "append lineage", Some(event.record)))?;
                    if inserted == 0 {
                        return Err(LedgerError::NotFound {
                            flow: flow.clone(),
                            record: event.record,
                        });
                    }
                }
            }
            tx.commit().map_err(&err)
        })
        .await
    }

    async fn approve_held(
        &self,
        id: RecordId,
        seen: &HeldAsSeen,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        let seen = Some(seen.clone());
        self.manual_batch(vec![id], ManualAction::Approve, seen, actor, reason)
            .await
    }

    async fn reject_held(
        &self,
        id: RecordId,
        seen: &HeldAsSeen,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        let seen = Some(seen.clone());
        self.manual_batch(vec![id], ManualAction::Reject, seen, actor, reason)
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
        let flow = self.flow.clone();
        let (wanted, actor, reason) = (
            dead_letter_reason.to_string(),
            actor.to_string(),
            reason.to_string(),
        );
        // Selected and replayed in one transaction, so no dead letter slips in between.
        self.run("replay by reason", move |conn| {
            durable(conn, &flow, |conn| {
                let err = db(&flow, "replay by reason", None);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&err)?;
                let ids: Vec<RecordId> = tx
                    .prepare_cached(
                        "SELECT id FROM records WHERE flow = ?1 AND state = 'dead_lettered' AND state IN ('held', 'dead_lettered') \
                         AND dead_letter_reason = ?2 ORDER BY id",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![flow, wanted], |r| r.get(0).map(RecordId))?
                            .collect()
                    })
                    .map_err(&err)?;
                for id in &ids {
                    manual(&tx, &flow, *id, ManualAction::Replay, None, &actor, &reason, now)?;
                }
                tx.commit().map_err(&err)?;
                Ok(ids)
            })
        })
        .await
    }

    async fn get(&self, id: RecordId) -> Result<Option<RecordDetail>> {
        let flow = self.flow.clone();
        self.read("get", move |conn| get_on(conn, &flow, id)).await
    }

    async fn list(
        &self,
        state: RecordState,
        reason: Option<&str>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<RecordView>> {
        let flow = self.flow.clone();
        let reason = reason.map(str::to_string);
        let rows: Vec<RecordRow> = self
            .read("list", move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM {RECORD_FROM} \
                     WHERE r.flow = ?1 AND r.state = ?2 {} AND r.id > ?3 \
                     AND (?5 IS NULL OR r.dead_letter_reason = ?5) ORDER BY r.id LIMIT ?4",
                    attention_filter(state)
                ))
                .and_then(|mut s| {
                    s.query_map(
                        params![
                            flow,
                            state.as_str(),
                            after.map_or(0, |id| id.0),
                            i64::try_from(limit).unwrap_or(i64::MAX),
                            reason
                        ],
                        record_row,
                    )?
                    .collect()
                })
                .map_err(db(&flow, "list", None))
            })
            .await?;
        rows.into_iter().map(RecordRow::into_view).collect()
    }

    async fn recent_inputs(&self, limit: usize) -> Result<Vec<ReplayRecord>> {
        check_replay_limit(&self.flow, limit)?;
        let flow = self.flow.clone();
        self.read("recent_inputs", move |conn| {
            conn.prepare_cached(RECENT_INPUTS)
                .and_then(|mut s| {
                    s.query_map(
                        params![flow, i64::try_from(limit).unwrap_or(i64::MAX)],
                        |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                row.get::<_, String>(1)?,
                                row.get::<_, String>(2)?,
                                row.get::<_, String>(3)?,
                                row.get::<_, String>(4)?,
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db(&flow, "recent_inputs", None))?
                .into_iter()
                .map(|(id, source_key, state, contract_version, payload)| {
                    Ok(ReplayRecord {
                        id: RecordId(id),
                        source_key,
                        state: parse_state(&flow, id, &state)?,
                        contract_version,
                        payload,
                    })
                })
                .collect()
        })
        .await
    }

    async fn counts(&self) -> Result<Counts> {
        let now = self.clock.now_ms();
        let flow = self.flow.clone();
        self.read("counts", move |conn| counts_on(conn, &flow, now))
            .await
    }

    async fn recount(&self) -> Result<Counts> {
        let now = self.clock.now_ms();
        let flow = self.flow.clone();
        self.read("recount", move |conn| {
            // One read transaction: the aggregate and the event counts from one state of the database.
            let tx = conn.transaction().map_err(db(&flow, "recount", None))?;
            let counts = recount_on(&tx, &flow, now)?;
            tx.commit().map_err(db(&flow, "recount", None))?;
            Ok(counts)
        })
        .await
    }

    async fn purge(&self, retention: &Retention, limit: usize) -> Result<PurgeReport> {
        let now = self.clock.now_ms();
        let (flow, retention) = (self.flow.clone(), *retention);
        self.run("purge", move |conn| {
            purge_on(conn, &flow, now, retention, limit)
        })
        .await
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>)> {
        let flow = self.flow.clone();
        let (pending, oldest): (i64, Option<i64>) = self
            .read("backlog", move |conn| {
                let tx = conn.transaction().map_err(db(&flow, "backlog", None))?;
                let pending: i64 = tx
                    .prepare_cached(
                        "SELECT COALESCE(SUM(value), 0) FROM ledger_counters \
                         WHERE flow = ?1 AND counter = 'pending'",
                    )
                    .and_then(|mut s| s.query_row([&flow], |r| r.get(0)))
                    .map_err(db(&flow, "backlog", None))?;
                let oldest = oldest_pending_on(&tx, &flow)?;
                tx.commit().map_err(db(&flow, "backlog", None))?;
                Ok((pending, oldest))
            })
            .await?;
        Ok((pending.max(0) as u64, oldest))
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
        let (flow, revision) = (self.flow.clone(), revision.to_string());
        let (first, end) = revision_slots(since, until);
        self.read("revision measures", move |conn| {
            let values: Vec<i64> = conn
                .prepare_cached(&revision_select(false))
                .and_then(|mut s| {
                    s.query_row(params![flow, revision, first, end], |r| {
                        (0..REVISION_VALUES).map(|i| r.get(i)).collect()
                    })
                })
                .map_err(db(&flow, "revision measures", None))?;
            Ok(revision_measures_from(&values))
        })
        .await
    }

    async fn release_leases(&self, owner_prefix: &str) -> Result<u64> {
        let pattern = owner_prefix_pattern(&self.flow, owner_prefix)?;
        let (flow, prefix, now) = (
            self.flow.clone(),
            owner_prefix.to_string(),
            self.clock.now_ms(),
        );
        self.run("release leases", move |conn| {
            release_leases_on(conn, &flow, &pattern, &prefix, now)
        })
        .await
    }

    async fn raise_exception(&self, exception: RaisedException) -> Result<String> {
        let cause = tickets::check_raised(&self.flow, &exception)?;
        let fingerprint = cause.fingerprint(&self.flow);
        let (now, flow, fp) = (self.clock.now_ms(), self.flow.clone(), fingerprint.clone());
        self.run("raise exception", move |conn| {
            let err = db(&flow, "raise exception", None);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            ticket_occur_on(&tx, &flow, &fp, &cause, 1, Vec::new(), Some(1), now)?;
            tx.commit().map_err(&err)
        })
        .await?;
        Ok(fingerprint)
    }

    async fn clear_exception(&self, fingerprint: &str) -> Result<bool> {
        let (now, flow, fp) = (
            self.clock.now_ms(),
            self.flow.clone(),
            fingerprint.to_string(),
        );
        self.run("clear exception", move |conn| {
            let err = db(&flow, "clear exception", None);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            let changed = match load_ticket(&tx, &flow, &fp)? {
                Some(row) => tickets::resolve(row, now),
                None => None,
            };
            if let Some((row, times)) = &changed {
                store_ticket(&tx, &flow, row, times)?;
            }
            tx.commit().map_err(&err)?;
            Ok(changed.is_some())
        })
        .await
    }

    async fn settle_tickets(&self) -> Result<Vec<String>> {
        let (now, flow) = (self.clock.now_ms(), self.flow.clone());
        self.run("settle tickets", move |conn| {
            let err = db(&flow, "settle tickets", None);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            let attached: Vec<(String, i64)> = tx
                .prepare_cached(&tickets::settle_query(sqlite_param))
                .and_then(|mut s| {
                    s.query_map(params![flow, tickets::MAX_TICKETS_PER_READ as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect()
                })
                .map_err(&err)?;
            let mut resolved = Vec::new();
            for (fingerprint, attached) in attached {
                let row = existing_ticket(&tx, &flow, &fingerprint)?;
                if let Some((row, times)) = tickets::settle(row, attached, now) {
                    if attached == 0 {
                        resolved.push(fingerprint);
                    }
                    store_ticket(&tx, &flow, &row, &times)?;
                }
            }
            tx.commit().map_err(&err)?;
            Ok(resolved)
        })
        .await
    }

    async fn tickets(&self, open_only: bool, limit: usize) -> Result<Vec<TicketRecord>> {
        let (flow, limit) = (self.flow.clone(), tickets::read_limit(limit));
        self.read("read tickets", move |conn| {
            let rows: Vec<TicketRow> = conn
                .prepare_cached(&format!(
                    "SELECT {} FROM tickets WHERE flow = ?1 AND (?2 = 0 OR state <> 'resolved') \
                     ORDER BY updated_at DESC, fingerprint LIMIT ?3",
                    tickets::TICKET_COLUMNS
                ))
                .and_then(|mut s| {
                    s.query_map(params![flow, open_only, limit], ticket_row)?
                        .collect()
                })
                .map_err(db(&flow, "read tickets", None))?;
            rows.into_iter().map(|row| row.into_record(&flow)).collect()
        })
        .await
    }

    async fn ticket(&self, fingerprint: &str) -> Result<Option<TicketRecord>> {
        let (flow, fp) = (self.flow.clone(), fingerprint.to_string());
        self.read("read ticket", move |conn| {
            load_ticket(conn, &flow, &fp)?
                .map(|row| row.into_record(&flow))
                .transpose()
        })
        .await
    }

    async fn assign_ticket(
        &self,
        fingerprint: &str,
        assignment: &TicketAssignment,
    ) -> Result<bool> {
        tickets::check_assignment(&self.flow, assignment)?;
        let (now, flow, fp) = (
            self.clock.now_ms(),
            self.flow.clone(),
            fingerprint.to_string(),
        );
        let assignment = assignment.clone();
        self.run("assign ticket", move |conn| {
            change_ticket(conn, &flow, &fp, |tx, row| {
                // The outbox rows of sinks the ticket did not have: due at once (version 0 is behind).
                for sink in &assignment.sinks {
                    tx.prepare_cached(
                        "INSERT INTO ticket_deliveries (flow, fingerprint, sink) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (flow, fingerprint, sink) DO NOTHING",
                    )
                    .and_then(|mut s| s.execute(params![flow, fp, sink]))
                    .map_err(db(&flow, "assign ticket", None))?;
                }
                let changed = tickets::assign(row, &assignment, now);
                let answer = changed.is_some();
                Ok((changed, answer))
            })
        })
        .await
    }

    async fn acknowledge_ticket(&self, fingerprint: &str, by: &str) -> Result<bool> {
        tickets::check_acknowledger(&self.flow, by)?;
        let (now, flow, fp, by) = (
            self.clock.now_ms(),
            self.flow.clone(),
            fingerprint.to_string(),
            by.to_string(),
        );
        self.run("acknowledge ticket", move |conn| {
            change_ticket(conn, &flow, &fp, |_, row| {
                let changed = tickets::acknowledge(row, &by, now);
                let answer = changed.is_some();
                Ok((changed, answer))
            })
        })
        .await
    }

    async fn ticket_deliveries_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueDelivery>> {
        let (flow, limit) = (self.flow.clone(), tickets::read_limit(limit));
        let now = now.timestamp_millis();
        self.read("read due ticket deliveries", move |conn| {
            due_on(conn, &flow, now, limit)
        })
        .await
    }

    async fn begin_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        version: i64,
        lease: Duration,
    ) -> Result<()> {
        let (flow, fp, sink) = (self.flow.clone(), fingerprint.to_string(), sink.to_string());
        let until = self
            .clock
            .now_ms()
            .saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        self.run("begin ticket delivery", move |conn| {
            // Durable before the send: a doubt lost with the OS would let a sink get the ticket twice.
            durable(conn, &flow, |conn| {
                update_delivery(
                    conn,
                    &flow,
                    "begin ticket delivery",
                    &fp,
                    &sink,
                    // `in_doubt` keeps the version sent (versions start at 1), see `DueDelivery`.
                    "UPDATE ticket_deliveries SET in_doubt = ?5, next_attempt_at = ?4 \
                     WHERE flow = ?1 AND fingerprint = ?2 AND sink = ?3",
                    &[&until, &version.max(1)],
                )
            })
        })
        .await
    }

    async fn finish_ticket_delivery(
        &self,
        fingerprint: &str,
        sink: &str,
        version: i64,
        sink_ref: Value,
    ) -> Result<()> {
        let (flow, fp, sink) = (self.flow.clone(), fingerprint.to_string(), sink.to_string());
        let (now, sink_ref) = (self.clock.now_ms(), sink_ref.to_string());
        self.run("finish ticket delivery", move |conn| {
            durable(conn, &flow, |conn| {
                update_delivery(
                    conn,
                    &flow,
                    "finish ticket delivery",
                    &fp,
                    &sink,
                    "UPDATE ticket_deliveries SET delivered_version = MAX(delivered_version, ?4), \
                     sink_ref = ?5, in_doubt = 0, attempts = 0, failing_since = NULL, last_error = NULL, \
                     refused = 0, next_attempt_at = ?6 WHERE flow = ?1 AND fingerprint = ?2 AND sink = ?3",
                    &[&version, &sink_ref, &now],
                )
            })
        })
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
        let (flow, fp, sink) = (self.flow.clone(), fingerprint.to_string(), sink.to_string());
        let error = tickets::truncate(error, tickets::TICKET_TEXT_BYTES);
        let (now, next) = (self.clock.now_ms(), next_attempt_at.timestamp_millis());
        let refused = i64::from(refused.unwrap_or(0));
        self.run("fail ticket delivery", move |conn| {
            update_delivery(
                conn,
                &flow,
                "fail ticket delivery",
                &fp,
                &sink,
                // `in_doubt` stays: a send that failed by timing out or losing its connection may have
            // reached the sink, so the next attempt still looks for its copy (or resends under that
            // version's idempotency key) instead of opening a second ticket.
            // `refused` follows the latest answer: a refusal followed by a 5xx is an outage now.
            "UPDATE ticket_deliveries SET attempts = attempts + 1, \
                 failing_since = COALESCE(failing_since, ?4), last_error = ?5, next_attempt_at = ?6, \
                 refused = ?7 WHERE flow = ?1 AND fingerprint = ?2 AND sink = ?3",
                &[&now, &error, &next, &refused],
            )
        })
        .await
    }

    async fn purge_tickets(&self, older_than: Duration, limit: usize) -> Result<Vec<String>> {
        let flow = self.flow.clone();
        let cutoff = retention_cutoff(self.clock.now_ms(), Some(older_than)).unwrap_or(i64::MIN);
        let limit = tickets::read_limit(limit);
        self.run("purge tickets", move |conn| {
            let err = db(&flow, "purge tickets", None);
            // IMMEDIATE: no occurrence can reopen a ticket between the check and the delete.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            let purgeable: Vec<(String, i64)> = tx
                .prepare_cached(&tickets::purgeable_query(sqlite_param, SINK_ASSIGNED, ""))
                .and_then(|mut s| {
                    s.query_map(params![flow, cutoff, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect()
                })
                .map_err(&err)?;
            for (fingerprint, _) in &purgeable {
                for table in ["ticket_deliveries", "tickets"] {
                    tx.prepare_cached(&format!(
                        "DELETE FROM {table} WHERE flow = ?1 AND fingerprint = ?2"
                    ))
                    .and_then(|mut s| s.execute(params![flow, fingerprint]))
                    .map_err(&err)?;
                }
            }
            let occurrences: i64 = purgeable.iter().map(|(_, reopened)| 1 + reopened).sum();
            if occurrences > 0 {
                bump_counter(&tx, &flow, TICKET_OCCURRENCES_PURGED, occurrences).map_err(&err)?;
            }
            tx.commit().map_err(&err)?;
            Ok(purgeable.into_iter().map(|(fp, _)| fp).collect())
        })
        .await
    }

    async fn ticket_sink_health(&self) -> Result<Vec<TicketSinkHealth>> {
        let flow = self.flow.clone();
        self.read("read ticket sink health", move |conn| {
            let rows = conn
                .prepare_cached(&tickets::health_query(sqlite_param))
                .and_then(|mut s| {
                    s.query_map([&flow], |r| {
                        Ok(tickets::DeliveryHealthRow {
                            sink: r.get(0)?,
                            delivered_version: r.get(1)?,
                            version: r.get(2)?,
                            attempts: r.get(3)?,
                            failing_since: r.get(4)?,
                            last_error: r.get(5)?,
                            sinks: r.get(6)?,
                            refused: r.get(7)?,
                        })
                    })?
                    .collect()
                })
                .map_err(db(&flow, "read ticket sink health", None))?;
            Ok(tickets::sink_health(rows))
        })
        .await
    }

    async fn ticket_flow_measures(&self) -> Result<FlowTicketMeasures> {
        let flow = self.flow.clone();
        self.read("read flow ticket measures", move |conn| {
            let row = conn
                .prepare_cached(&tickets::flow_measures_query(sqlite_param))
                .and_then(|mut s| {
                    s.query_row([&flow], |r| {
                        Ok(tickets::FlowTimesRow {
                            opened: r.get(0)?,
                            acknowledged: r.get(1)?,
                            resolved: r.get(2)?,
                            acknowledge_ms: r.get(3)?,
                            resolve_ms: r.get(4)?,
                            open: r.get(5)?,
                            acknowledged_now: r.get(6)?,
                        })
                    })
                })
                .map_err(db(&flow, "read flow ticket measures", None))?;
            Ok(tickets::flow_measures(row))
        })
        .await
    }

    async fn ticket_measures(&self) -> Result<Vec<OwnerTicketMeasures>> {
        let flow = self.flow.clone();
        self.read("read ticket measures", move |conn| {
            let rows = conn
                .prepare_cached(&tickets::measures_query(sqlite_param))
                .and_then(|mut s| {
                    s.query_map([&flow], |r| {
                        Ok(tickets::TimesRow {
                            owner: r.get(0)?,
                            opened: r.get(1)?,
                            acknowledged: r.get(2)?,
                            resolved: r.get(3)?,
                            acknowledge_ms: r.get(4)?,
                            resolve_ms: r.get(5)?,
                            open: r.get(6)?,
                        })
                    })?
                    .collect()
                })
                .map_err(db(&flow, "read ticket measures", None))?;
            Ok(tickets::measures(rows))
        })
        .await
    }

    async fn audit_start(
        &self,
        window_from: i64,
        window_to: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<(AuditRun, bool)> {
        let lease = lease_ms(&self.flow, lease)?;
        let (now, flow, owner) = (self.clock.now_ms(), self.flow.clone(), owner.to_string());
        let row = self
            .run("start audit", move |conn| {
                let err = db(&flow, "start audit", None);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&err)?;
                let running = tx
                    .query_row(
                        &format!(
                            "SELECT {RUN_COLUMNS} FROM audit_runs WHERE flow = ?1 AND state = 'running'"
                        ),
                        params![flow],
                        sqlite_run_row,
                    )
                    .optional()
                    .map_err(&err)?;
                if let Some(row) = running {
                    return Ok((row, false));
                }
                let row = tx
                    .query_row(
                        &format!(
                            "INSERT INTO audit_runs (flow, window_from, window_to, state, owner, lease_until, \
                             started_at) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6) RETURNING {RUN_COLUMNS}"
                        ),
                        params![flow, window_from, window_to, owner, now + lease, now],
                        sqlite_run_row,
                    )
                    .map_err(&err)?;
                tx.commit().map_err(&err)?;
                Ok((row, true))
            })
            .await?;
        Ok((row.0.into_run(&self.flow)?, row.1))
    }

    async fn audit_lease(&self, id: i64, owner: &str, lease: Duration) -> Result<Option<AuditRun>> {
        let lease = lease_ms(&self.flow, lease)?;
        let (now, flow, owner) = (self.clock.now_ms(), self.flow.clone(), owner.to_string());
        let row = self
            .run("lease audit", move |conn| {
                let err = db(&flow, "lease audit", None);
                let taken = conn
                    .query_row(
                        &format!(
                            "UPDATE audit_runs SET owner = ?3, lease_until = ?4 WHERE id = ?1 AND flow = ?2 \
                             AND state = 'running' AND (owner IS NULL OR owner = ?3 OR lease_until <= ?5) \
                             RETURNING {RUN_COLUMNS}"
                        ),
                        params![id, flow, owner, now + lease, now],
                        sqlite_run_row,
                    )
                    .optional()
                    .map_err(&err)?;
                if taken.is_none() {
                    let exists = conn
                        .query_row(
                            "SELECT 1 FROM audit_runs WHERE id = ?1 AND flow = ?2",
                            params![id, flow],
                            |_| Ok(()),
                        )
                        .optional()
                        .map_err(&err)?;
                    if exists.is_none() {
                        return Err(LedgerError::AuditRunNotFound {
                            flow: flow.clone(),
                            run: id,
                        });
                    }
                }
                Ok(taken)
            })
            .await?;
        row.map(|r| r.into_run(&self.flow)).transpose()
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
        let (now, flow, owner) = (self.clock.now_ms(), self.flow.clone(), owner.to_string());
        let rows: Vec<(String, String, String)> = orders
            .iter()
            .map(|o| {
                (
                    o.external_id.clone(),
                    o.currency.clone(),
                    o.amount.to_string(),
                )
            })
            .collect();
        let next = next.map(str::to_string);
        self.run("store audit page", move |conn| {
            let err = db(&flow, "store audit page", None);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            let s = side.label();
            // The cursor, the done flag and the page's orders commit together, fenced by the lease.
            let changed = tx
                .execute(
                    &format!(
                        "UPDATE audit_runs SET {s}_cursor = ?1, {s}_done = ?2, {s}_pages = {s}_pages + 1, \
                         {s}_orders = {s}_orders + ?3, lease_until = ?4 WHERE id = ?5 AND flow = ?6 \
                         AND state = 'running' AND owner = ?7 AND {s}_done = 0"
                    ),
                    params![
                        next,
                        i64::from(next.is_none()),
                        rows.len() as i64,
                        now + lease,
                        id,
                        flow,
                        owner
                    ],
                )
                .map_err(&err)?;
            if changed == 0 {
                let now_row = tx
                    .query_row(
                        &format!("SELECT state, owner, {s}_done FROM audit_runs WHERE id = ?1 AND flow = ?2"),
                        params![id, flow],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, i64>(2)? != 0)),
                    )
                    .optional()
                    .map_err(&err)?;
                return Err(audit::refused_write(&flow, id, &owner, now_row, Some(side)));
            }
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO audit_orders (run, side, external_id, currency, amount) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(&err)?;
                for (external_id, currency, amount) in &rows {
                    insert
                        .execute(params![id, s, external_id, currency, amount])
                        .map_err(&err)?;
                }
            }
            tx.commit().map_err(&err)
        })
        .await
    }

    async fn audit_compare(&self, id: i64) -> Result<crate::audit::compare::Tally> {
        let flow = self.flow.clone();
        self.read("compare audit", move |conn| {
            let err = db(&flow, "compare audit", None);
            let mut select = conn
                .prepare(
                    "SELECT side, external_id, currency, amount FROM audit_orders WHERE run = ?1 \
                     ORDER BY external_id, side",
                )
                .map_err(&err)?;
            let mut rows = select.query(params![id]).map_err(&err)?;
            let mut comparison = crate::audit::compare::Comparison::new();
            while let Some(row) = rows.next().map_err(&err)? {
                let side: String = row.get(0).map_err(&err)?;
                let side = AuditSide::parse(&side).ok_or_else(|| LedgerError::Corrupt {
                    flow: flow.clone(),
                    record: RecordId(0),
                    what: "audit order side",
                    detail: format!("audit run {id}: unknown side {side:?}"),
                })?;
                let amount: String = row.get(3).map_err(&err)?;
                let order = AuditedOrder {
                    external_id: row.get(1).map_err(&err)?,
                    currency: row.get(2).map_err(&err)?,
                    amount: audit::stored_amount(&flow, id, &amount)?,
                };
                comparison
                    .push(side, order)
                    .map_err(|e| LedgerError::Corrupt {
                        flow: flow.clone(),
                        record: RecordId(0),
                        what: "audit order order",
                        detail: e.to_string(),
                    })?;
            }
            Ok(comparison.finish())
        })
        .await
    }

    async fn audit_facts(&self, source_keys: &[String]) -> Result<Vec<AuditRecordFacts>> {
        audit::check_facts_request(&self.flow, source_keys)?;
        if source_keys.is_empty() {
            return Ok(Vec::new());
        }
        let (flow, keys) = (self.flow.clone(), source_keys.to_vec());
        let rows = self
            .read("read audit facts", move |conn| {
                let err = db(&flow, "read audit facts", None);
                let marks: Vec<String> = (0..keys.len()).map(|i| format!("?{}", i + 2)).collect();
                let mut select = conn
                    .prepare(&format!(
                        "SELECT r.id, r.source_key, r.state, r.dead_letter_reason, r.hold_rule, p.body \
                         FROM records r LEFT JOIN payloads p ON p.record_id = r.id \
                         WHERE r.flow = ?1 AND r.source_key IN ({}) ORDER BY r.id",
                        marks.join(", ")
                    ))
                    .map_err(&err)?;
                let mut values: Vec<&dyn rusqlite::ToSql> = vec![&flow];
                values.extend(keys.iter().map(|k| k as &dyn rusqlite::ToSql));
                let mut rows = select.query(values.as_slice()).map_err(&err)?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(&err)? {
                    let id: i64 = row.get(0).map_err(&err)?;
                    let state: String = row.get(2).map_err(&err)?;
                    out.push(AuditRecordFacts {
                        source_key: row.get(1).map_err(&err)?,
                        state: parse_state(&flow, id, &state)?,
                        dead_letter_reason: row.get(3).map_err(&err)?,
                        hold_rule: row.get(4).map_err(&err)?,
                        payload: row.get(5).map_err(&err)?,
                    });
                }
                Ok(out)
            })
            .await?;
        Ok(audit::newest_per_key(rows))
    }

    async fn audit_finish(&self, id: i64, owner: &str, result: &Value) -> Result<()> {
        let (now, flow, owner, result) = (
            self.clock.now_ms(),
            self.flow.clone(),
            owner.to_string(),
            result.to_string(),
        );
        self.run("finish audit", move |conn| {
            let err = db(&flow, "finish audit", None);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            let changed = tx
                .execute(
                    "UPDATE audit_runs SET state = 'finished', result = ?1, finished_at = ?2, lease_until = NULL \
                     WHERE id = ?3 AND flow = ?4 AND state = 'running' AND owner = ?5",
                    params![result, now, id, flow, owner],
                )
                .map_err(&err)?;
            if changed == 0 {
                let now_row = tx
                    .query_row(
                        "SELECT state, owner, 0 FROM audit_runs WHERE id = ?1 AND flow = ?2",
                        params![id, flow],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, false)),
                    )
                    .optional()
                    .map_err(&err)?;
                return Err(audit::refused_write(&flow, id, &owner, now_row, None));
            }
            tx.execute("DELETE FROM audit_orders WHERE run = ?1", params![id])
                .map_err(&err)?;
            tx.execute(
                "DELETE FROM audit_runs WHERE flow = ?1 AND state = 'finished' AND id NOT IN \
                 (SELECT id FROM audit_runs WHERE flow = ?1 AND state = 'finished' ORDER BY id DESC LIMIT ?2)",
                params![flow, AUDIT_RUNS_KEPT],
            )
            .map_err(&err)?;
            tx.commit().map_err(&err)
        })
        .await
    }

    async fn audit_run(&self, id: i64) -> Result<Option<AuditRun>> {
        let flow = self.flow.clone();
        let row = self
            .read("read audit run", move |conn| {
                conn.query_row(
                    &format!("SELECT {RUN_COLUMNS} FROM audit_runs WHERE id = ?1 AND flow = ?2"),
                    params![id, flow],
                    sqlite_run_row,
                )
                .optional()
                .map_err(db(&flow, "read audit run", None))
            })
            .await?;
        row.map(|r| r.into_run(&self.flow)).transpose()
    }

    async fn audit_last(&self) -> Result<Option<AuditRun>> {
        let flow = self.flow.clone();
        let row = self
            .read("read last audit", move |conn| {
                conn.query_row(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM audit_runs WHERE flow = ?1 AND state = 'finished' \
                         ORDER BY id DESC LIMIT 1"
                    ),
                    params![flow],
                    sqlite_run_row,
                )
                .optional()
                .map_err(db(&flow, "read last audit", None))
            })
            .await?;
        row.map(|r| r.into_run(&self.flow)).transpose()
    }

    async fn ping(&self) -> Result<()> {
        let flow = self.flow.clone();
        self.run("ping", move |conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(db(&flow, "ping", None))
        })
        .await
    }

    async fn close(&self) {
        // Operations already queued finish; the threads then close their connections and end.
        self.reader.close().await;
        self.writer.close().await;
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some((stop, thread)) = checkpointer {
                drop(stop);
                let _ = thread.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger file migrated to the current schema, opened as a plain connection (and its directory).
    async fn migrated_ledger() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let ledger = SqliteLedger::open(&path, "f", Arc::new(super::super::SystemClock))
            .await
            .unwrap();
        ledger.close().await;
        let conn = Connection::open(&path).unwrap();
        (dir, conn)
    }

    /// The program of a statement as prepared on a migrated ledger, with its triggers' sub-programs: each
    /// instruction's opcode, P1 and P2.
    fn explain(conn: &Connection, sql: &str) -> Vec<(String, i64, i64)> {
        let mut statement = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let unbound = statement.parameter_count();
        statement
            .query_map(
                rusqlite::params_from_iter(std::iter::repeat_n(rusqlite::types::Null, unbound)),
                |row| Ok((row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// The opcodes of a statement as prepared on a migrated ledger.
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        explain(conn, sql).into_iter().map(|(op, ..)| op).collect()
    }

    /// The instructions of `sql`'s program (with its triggers' sub-programs) that end the statement alone on a
    /// constraint failure (`OE_Abort`, 2, in a halt's P2; an immediate foreign key violation counted up, where
    /// an insert into the parent table counts down): SQLite keeps a statement journal for a statement that has
    /// any and writes through a trigger.
    fn aborts_alone(conn: &Connection, sql: &str) -> Vec<String> {
        explain(conn, sql)
            .into_iter()
            .filter(|(op, p1, p2)| {
                (matches!(op.as_str(), "Halt" | "HaltIfNull") && *p2 == 2)
                    || (op == "FkCounter" && *p1 == 0 && *p2 > 0)
            })
            .map(|(op, p1, p2)| format!("{op} {p1} {p2}"))
            .collect()
    }

    #[tokio::test]
    async fn the_hottest_statements_cannot_abort_alone_so_keep_no_statement_journal() {
        let (_dir, conn) = migrated_ledger().await;
        let claim = format!("{CLAIM_SET} WHERE id IN (?4)");
        for sql in [
            INSERT_NEW,
            COMPLETE,
            COMPLETE_DELIVERED.as_str(),
            claim.as_str(),
        ] {
            assert!(
                opcodes(&conn, sql).iter().any(|op| op == "Program"),
                "{sql}: fires a trigger"
            );
            assert_eq!(aborts_alone(&conn, sql), Vec::<String>::new(), "{sql}");
        }
        // The same statements without `OR ROLLBACK` could abort alone: what the check above looks for is there.
        let abortable = COMPLETE.replacen("UPDATE OR ROLLBACK", "UPDATE", 1);
        assert!(!aborts_alone(&conn, &abortable).is_empty());
        // As could any statement on `records` under the triggers of version 12, whose upserts `DO UPDATE`.
        conn.execute_batch(&format!(
            "DROP TRIGGER records_counted_update; {}",
            schema::migration_statements("sqlite", 12).unwrap()[4]
        ))
        .unwrap();
        assert!(!aborts_alone(&conn, COMPLETE).is_empty());
    }

    #[tokio::test]
    async fn a_completion_builds_no_temporary_index_and_waiting_records_are_found_by_the_partial_indexes()
     {
        let (_dir, conn) = migrated_ledger().await;
        // The completion, its counter trigger's program and the partial indexes' predicates are all coded
        // in the statement's program: an `IN` list of three or more states would show as `OpenEphemeral`.
        let completion = opcodes(&conn, COMPLETE);
        assert!(
            completion.iter().any(|op| op == "Program"),
            "the counter trigger fires"
        );
        assert!(
            !completion.iter().any(|op| op == "OpenEphemeral"),
            "{completion:?}"
        );
        let insert = opcodes(
            &conn,
            "INSERT INTO records (flow, source_key, idempotency_key, generation, payload_hash, \
             contract_version, state, bucket, correlation_id, next_attempt_at, received_at, updated_at) \
             VALUES ('f', 'k', 'i', 1, 'h', '1', 'received', 0, 'c', 0, 0, 0)",
        );
        assert!(!insert.iter().any(|op| op == "OpenEphemeral"), "{insert:?}");
        for (sql, index) in [
            (
                format!(
                    "SELECT id FROM records WHERE flow = 'f' AND {PENDING} AND next_attempt_at <= 5 \
                     ORDER BY next_attempt_at, id LIMIT 10"
                ),
                "records_due",
            ),
            (
                format!(
                    "SELECT received_at FROM records WHERE flow = 'f' AND {PENDING} ORDER BY received_at LIMIT 1"
                ),
                "records_pending_age",
            ),
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |row| row.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(
                plan.contains(&format!("USING INDEX {index}")),
                "{sql}: {plan}"
            );
        }
    }

    #[tokio::test]
    async fn the_replay_read_walks_the_payloads_backwards_without_sorting() {
        let (_dir, conn) = migrated_ledger().await;
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {RECENT_INPUTS}"))
            .unwrap()
            .query_map(params!["f", 10], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("; ");
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
        assert!(
            plan.starts_with("SCAN p"),
            "the payloads are the outer loop: {plan}"
        );
        assert!(
            plan.contains("SEARCH r USING INTEGER PRIMARY KEY"),
            "{plan}"
        );
    }
}
