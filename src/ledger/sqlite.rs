//! The embedded SQLite ledger: the default for one replica and for local use.
//!
//! **Durability.** The database runs in WAL mode with `synchronous = NORMAL`, and switches to
//! `synchronous = FULL` for the transactions that the outside world is told about: ingest (the webhook's 2xx,
//! the poll checkpoint), checkpoints and manual interventions. With FULL, the commit fsyncs the WAL, which
//! also makes every earlier NORMAL commit durable. A NORMAL commit (claims, completions, lineage) survives a
//! process crash (SIGKILL) but may be lost with the OS on power failure; losing one only means a record is
//! claimed or delivered again, which the ERP upsert by external id absorbs. Batching keeps the fsyncs to one
//! per batch, not one per record.
//!
//! **Concurrency.** One connection, so every operation is serialised inside the process, and every write
//! transaction starts with `BEGIN IMMEDIATE`, so a second process on the same file waits (busy timeout)
//! instead of failing half way. Several replicas need the PostgreSQL ledger.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};

use super::schema::{self, SCHEMA_VERSION};
use super::{
    BucketSet, ClaimedRecord, Clock, Completion, CompletionResult, Counts, CountsRow,
    IncomingRecord, IngestOutcome, InterventionRow, Ledger, LedgerError, LineageRow, ManualAction,
    NewLineageEvent, Prepared, RECORD_COLUMNS, RecordDetail, RecordId, RecordRow, RecordState,
    RecordView, Result, SnapshotRow, assemble_counts, assemble_detail, completion_params, lease_ms,
    prepare, rounds,
};

#[derive(Debug)]
pub struct SqliteLedger {
    pool: SqlitePool,
    flow: String,
    clock: Arc<dyn Clock>,
    path: PathBuf,
}

impl SqliteLedger {
    /// Opens (creating if missing) and migrates the ledger at `path` for `flow`.
    pub async fn open(path: impl AsRef<Path>, flow: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options)
            .await
            .map_err(|source| LedgerError::Open {
                flow: flow.to_string(),
                backend: "sqlite",
                target: path.display().to_string(),
                source,
            })?;
        let ledger = SqliteLedger {
            pool,
            flow: flow.to_string(),
            clock,
            path,
        };
        ledger.migrate().await?;
        Ok(ledger)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
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
            source,
        }
    }

    async fn migrate(&self) -> Result<()> {
        let flow = self.flow.clone();
        let failed = |version: i64| {
            let flow = flow.clone();
            move |source| LedgerError::Migrate {
                flow: flow.clone(),
                version,
                source,
            }
        };
        let mut conn = self.pool.acquire().await.map_err(failed(0))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(failed(0))?;
        sqlx::query(schema::SQLITE_SCHEMA_TABLE)
            .execute(&mut *tx)
            .await
            .map_err(failed(0))?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM meshline_schema")
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
        for migration in schema::SQLITE.iter().filter(|m| m.version > current) {
            for statement in migration.statements {
                sqlx::query(*statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed(migration.version))?;
            }
            sqlx::query("INSERT INTO meshline_schema (version, description, applied_at) VALUES ($1, $2, $3)")
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

    /// Runs `PRAGMA synchronous` on the one connection; see the module doc for when FULL is used.
    async fn set_sync(&self, conn: &mut SqliteConnection, full: bool) -> Result<()> {
        let pragma = if full {
            "PRAGMA synchronous = FULL"
        } else {
            "PRAGMA synchronous = NORMAL"
        };
        sqlx::query(pragma)
            .execute(conn)
            .await
            .map_err(self.db("set synchronous", None))?;
        Ok(())
    }

    async fn ingest_inner(
        &self,
        batch: Vec<IncomingRecord>,
        checkpoint: Option<(&str, &str)>,
    ) -> Result<Vec<IngestOutcome>> {
        let total = batch.len();
        let prepared = prepare(&self.flow, batch)?;
        let now = self.clock.now_ms();
        let mut conn = self.pool.acquire().await.map_err(self.db("ingest", None))?;
        self.set_sync(&mut conn, true).await?;
        let result = async {
            let mut tx = conn
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(self.db("ingest", None))?;
            let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; total];
            for round in rounds(prepared) {
                self.ingest_round(&mut tx, round, now, &mut outcomes)
                    .await?;
            }
            if let Some((source, value)) = checkpoint {
                set_checkpoint_on(&mut tx, &self.flow, source, value, now)
                    .await
                    .map_err(self.db("set checkpoint", None))?;
            }
            tx.commit().await.map_err(self.db("ingest commit", None))?;
            outcomes
                .into_iter()
                .map(|outcome| {
                    outcome.ok_or_else(|| LedgerError::InvalidInput {
                        flow: self.flow.clone(),
                        what: "a record of the batch was neither stored nor found during ingest"
                            .into(),
                    })
                })
                .collect::<Result<Vec<_>>>()
        }
        .await;
        self.set_sync(&mut conn, false).await?;
        result
    }

    /// One round of a batch (every idempotency key once), set-based: the statements take the whole round
    /// as one JSON array read with `json_each`, because sqlx runs each SQLite statement on the
    /// connection's worker thread and a statement per record would spend its time on that hand-off.
    async fn ingest_round(
        &self,
        conn: &mut SqliteConnection,
        round: Vec<(usize, Prepared)>,
        now: i64,
        outcomes: &mut [Option<IngestOutcome>],
    ) -> Result<()> {
        let rows: Vec<Value> = round
            .iter()
            .map(|(_, item)| {
                json!({
                    "s": item.source_key, "k": item.idempotency_key, "e": item.external_id,
                    "p": item.payload, "h": item.hash, "c": item.contract_version, "b": item.bucket,
                    "r": item.correlation_id,
                })
            })
            .collect();
        // New keys insert; changed payloads start a new generation (lease columns untouched, so an
        // in-flight older generation is never claimed alongside it); equal hashes are left alone and do
        // not come back from RETURNING. (`WHERE true` resolves SQLite's INSERT…SELECT…ON CONFLICT parse.)
        let written = sqlx::query(
            "INSERT INTO records (flow, source_key, idempotency_key, external_id, generation, payload, \
             payload_hash, contract_version, state, next_attempt_at, bucket, correlation_id, received_at, \
             updated_at) \
             SELECT $1, value ->> '$.s', value ->> '$.k', value ->> '$.e', 1, value ->> '$.p', \
             value ->> '$.h', value ->> '$.c', 'received', $2, value ->> '$.b', value ->> '$.r', $2, $2 \
             FROM json_each($3) WHERE true \
             ON CONFLICT (flow, idempotency_key) DO UPDATE SET source_key = excluded.source_key, \
             external_id = excluded.external_id, generation = records.generation + 1, \
             payload = excluded.payload, payload_hash = excluded.payload_hash, \
             contract_version = excluded.contract_version, state = 'received', claimed_from = NULL, \
             attempts = 0, next_attempt_at = excluded.next_attempt_at, last_error = NULL, \
             last_error_class = NULL, dead_letter_reason = NULL, erp_response = NULL, hold_rule = NULL, \
             hold_role = NULL, approved_by = NULL, bucket = excluded.bucket, \
             correlation_id = excluded.correlation_id, received_at = excluded.received_at, \
             updated_at = excluded.updated_at, delivered_at = NULL, first_failure_at = NULL \
             WHERE records.payload_hash <> excluded.payload_hash \
             RETURNING id, idempotency_key, generation",
        )
        .bind(&self.flow)
        .bind(now)
        .bind(Value::Array(rows).to_string())
        .fetch_all(&mut *conn)
        .await
        .map_err(self.db("ingest", None))?;
        let mut written_by_key: HashMap<String, (i64, i64)> = HashMap::new();
        for row in written {
            written_by_key.insert(
                row.get("idempotency_key"),
                (row.get("id"), row.get("generation")),
            );
        }
        let duplicate_keys: Vec<&str> = round
            .iter()
            .map(|(_, item)| item.idempotency_key.as_str())
            .filter(|k| !written_by_key.contains_key(*k))
            .collect();
        let mut duplicates: HashMap<String, (i64, i64, String)> = HashMap::new();
        if !duplicate_keys.is_empty() {
            let rows = sqlx::query(
                "SELECT id, idempotency_key, generation, correlation_id FROM records \
                 WHERE flow = $1 AND idempotency_key IN (SELECT value FROM json_each($2))",
            )
            .bind(&self.flow)
            .bind(json!(duplicate_keys).to_string())
            .fetch_all(&mut *conn)
            .await
            .map_err(self.db("ingest duplicates", None))?;
            for row in rows {
                duplicates.insert(
                    row.get("idempotency_key"),
                    (
                        row.get("id"),
                        row.get("generation"),
                        row.get("correlation_id"),
                    ),
                );
            }
        }

        let mut lineage = Vec::with_capacity(round.len());
        let mut snapshots = Vec::new();
        for (index, item) in round {
            if let Some(&(id, generation)) = written_by_key.get(&item.idempotency_key) {
                let inserted = generation == 1;
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
                lineage.push(json!({"i": id, "g": generation, "s": step, "d": detail.to_string(), "c": item.correlation_id}));
                if let Some(snapshot) = item.snapshot {
                    snapshots
                        .push(json!({"i": id, "g": generation, "k": "received", "b": snapshot}));
                }
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
            } else if let Some((id, generation, correlation_id)) =
                duplicates.get(&item.idempotency_key)
            {
                // A webhook retry or an overlapping poll: note it, store nothing new.
                lineage.push(json!({"i": id, "g": generation, "s": "duplicate", "d": json!({"payload_hash": item.hash}).to_string(), "c": correlation_id}));
                outcomes[index] = Some(IngestOutcome::Duplicate { id: RecordId(*id) });
            }
        }
        insert_lineage_set(&mut *conn, lineage, now)
            .await
            .map_err(self.db("ingest lineage", None))?;
        insert_snapshot_set(&mut *conn, snapshots, now)
            .await
            .map_err(self.db("ingest snapshots", None))?;
        Ok(())
    }

    /// A refused completion: find out why, release a superseded holder's lease, leave a trace.
    async fn refused(
        &self,
        conn: &mut SqliteConnection,
        completion: &Completion,
        now: i64,
    ) -> Result<CompletionResult> {
        let claim = completion.claim;
        let record = Some(claim.id);
        let current = sqlx::query(
            "SELECT generation, fence, correlation_id FROM records WHERE id = $1 AND flow = $2",
        )
        .bind(claim.id.0)
        .bind(&self.flow)
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.db("complete check", record))?;
        let Some(current) = current else {
            return Ok(CompletionResult::NotFound);
        };
        let generation: i64 = current.get("generation");
        let fence: i64 = current.get("fence");
        let correlation_id: String = current.get("correlation_id");
        let superseded = generation != claim.generation;
        if superseded && fence == claim.fence {
            // The stale holder still holds the lease over the newer generation: let it go now rather
            // than make the update wait for the lease to expire.
            sqlx::query(
                "UPDATE records SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND fence = $2",
            )
            .bind(claim.id.0)
            .bind(claim.fence)
            .execute(&mut *conn)
            .await
            .map_err(self.db("release superseded lease", record))?;
        }
        let detail = json!({
            "outcome": completion.outcome.step(),
            "claim_generation": claim.generation,
            "claim_fence": claim.fence,
            "current_fence": fence,
            "result": if superseded { "superseded" } else { "lease_lost" },
        });
        let lineage = vec![
            json!({"i": claim.id.0, "g": generation, "s": "completion_refused", "d": detail.to_string(), "c": correlation_id}),
        ];
        insert_lineage_set(&mut *conn, lineage, now)
            .await
            .map_err(self.db("complete lineage", record))?;
        Ok(if superseded {
            CompletionResult::Superseded {
                current_generation: generation,
            }
        } else {
            CompletionResult::LeaseLost
        })
    }

    async fn manual(
        &self,
        conn: &mut SqliteConnection,
        id: RecordId,
        action: ManualAction,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let row = sqlx::query(
            "SELECT state, generation, correlation_id FROM records WHERE id = $1 AND flow = $2",
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
        sqlx::query(
            "UPDATE records SET state = $1, approved_by = COALESCE($2, approved_by), \
             dead_letter_reason = COALESCE($3, dead_letter_reason), next_attempt_at = $4, updated_at = $4 \
             WHERE id = $5",
        )
        .bind(to.as_str())
        .bind(approved_by)
        .bind(&dead_letter_reason)
        .bind(now)
        .bind(id.0)
        .execute(&mut *conn)
        .await
        .map_err(self.db(action.name(), Some(id)))?;
        sqlx::query(
            "INSERT INTO interventions (flow, record_id, action, actor, reason, at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&self.flow)
        .bind(id.0)
        .bind(action.name())
        .bind(actor)
        .bind(reason)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(self.db(action.name(), Some(id)))?;
        let detail =
            json!({"actor": actor, "reason": reason, "from": from.as_str(), "to": to.as_str()});
        insert_lineage(
            &mut *conn,
            id.0,
            generation,
            now,
            action.name(),
            &detail.to_string(),
            &correlation_id,
        )
        .await
        .map_err(self.db(action.name(), Some(id)))?;
        Ok(())
    }

    /// Runs manual actions in one durable transaction.
    async fn manual_batch(
        &self,
        ids: Vec<RecordId>,
        action: ManualAction,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(self.db(action.name(), None))?;
        self.set_sync(&mut conn, true).await?;
        let result = async {
            let mut tx = conn
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(self.db(action.name(), None))?;
            for id in ids {
                self.manual(&mut tx, id, action, actor, reason, now).await?;
            }
            tx.commit().await.map_err(self.db(action.name(), None))
        }
        .await;
        self.set_sync(&mut conn, false).await?;
        result
    }
}

async fn insert_lineage(
    conn: &mut SqliteConnection,
    id: i64,
    generation: i64,
    at: i64,
    step: &str,
    detail: &str,
    correlation_id: &str,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(generation)
    .bind(at)
    .bind(step)
    .bind(detail)
    .bind(correlation_id)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Inserts lineage rows given as JSON objects `{i: record, g: generation, s: step, d: detail, c: correlation}`.
async fn insert_lineage_set(
    conn: &mut SqliteConnection,
    rows: Vec<Value>,
    at: i64,
) -> std::result::Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
         SELECT value ->> '$.i', value ->> '$.g', $1, value ->> '$.s', value ->> '$.d', value ->> '$.c' \
         FROM json_each($2)",
    )
    .bind(at)
    .bind(Value::Array(rows).to_string())
    .execute(conn)
    .await
    .map(|_| ())
}

/// Inserts snapshots given as JSON objects `{i: record, g: generation, k: kind, b: body text}`.
async fn insert_snapshot_set(
    conn: &mut SqliteConnection,
    rows: Vec<Value>,
    at: i64,
) -> std::result::Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT OR REPLACE INTO snapshots (record_id, generation, kind, at, body) \
         SELECT value ->> '$.i', value ->> '$.g', value ->> '$.k', $1, value ->> '$.b' FROM json_each($2)",
    )
    .bind(at)
    .bind(Value::Array(rows).to_string())
    .execute(conn)
    .await
    .map(|_| ())
}

async fn set_checkpoint_on(
    conn: &mut SqliteConnection,
    flow: &str,
    source: &str,
    value: &str,
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (flow, source, value, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (flow, source) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )
    .bind(flow)
    .bind(source)
    .bind(value)
    .bind(now)
    .execute(conn)
    .await
    .map(|_| ())
}

/// `bucket IN (…)` for a bucket set. Buckets are numbers below 100 that this code formats itself, so the
/// SQL text cannot carry input.
fn bucket_filter(buckets: &BucketSet) -> String {
    let list: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
    format!("bucket IN ({})", list.join(", "))
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
        self.ingest_inner(batch, None).await
    }

    async fn ingest_with_checkpoint(
        &self,
        batch: Vec<IncomingRecord>,
        source: &str,
        checkpoint: &str,
    ) -> Result<Vec<IngestOutcome>> {
        self.ingest_inner(batch, Some((source, checkpoint))).await
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
        self.ingest_inner(Vec::new(), Some((source, value)))
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
        let mut conn = self.pool.acquire().await.map_err(self.db("claim", None))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.db("claim", None))?;
        let select = format!(
            "SELECT id, state, lease_owner FROM records WHERE flow = $1 AND {} \
             AND state IN ('received', 'validated', 'retry_scheduled', 'delivering') \
             AND next_attempt_at <= $2 AND (lease_expires_at IS NULL OR lease_expires_at <= $2) \
             ORDER BY next_attempt_at, id LIMIT $3",
            bucket_filter(buckets)
        );
        let due = sqlx::query(AssertSqlSafe(select))
            .bind(&self.flow)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("claim", None))?;
        if due.is_empty() {
            tx.commit().await.map_err(self.db("claim commit", None))?;
            return Ok(Vec::new());
        }
        let mut taken_over_from: HashMap<i64, Option<String>> = HashMap::new();
        let mut ids = Vec::with_capacity(due.len());
        for row in due {
            let id: i64 = row.get("id");
            let state: String = row.get("state");
            let owner: Option<String> = row.get("lease_owner");
            taken_over_from.insert(
                id,
                (state == RecordState::Delivering.as_str())
                    .then_some(owner)
                    .flatten(),
            );
            ids.push(id);
        }
        // The write lock taken by BEGIN IMMEDIATE makes the select and this update one atomic claim.
        let update = format!(
            "UPDATE records SET claimed_from = CASE WHEN state = 'delivering' THEN claimed_from ELSE state END, \
             state = 'delivering', lease_owner = $1, lease_expires_at = $2, next_attempt_at = $2, \
             fence = fence + 1, attempts = attempts + 1, updated_at = $3 \
             WHERE id IN (SELECT value FROM json_each($4)) RETURNING {RECORD_COLUMNS}"
        );
        let mut records: Vec<RecordRow> = sqlx::query_as(AssertSqlSafe(update))
            .bind(worker)
            .bind(expires)
            .bind(now)
            .bind(json!(ids).to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(self.db("claim", None))?;
        records.sort_by_key(|r| r.id);
        let lineage = records
            .iter()
            .map(|record| {
                let detail = json!({
                    "worker": worker, "fence": record.fence, "attempt": record.attempts,
                    "lease_expires_at": expires,
                    "taken_over_from": taken_over_from.get(&record.id).cloned().flatten(),
                });
                json!({"i": record.id, "g": record.generation, "s": "claimed", "d": detail.to_string(), "c": record.correlation_id})
            })
            .collect();
        insert_lineage_set(&mut tx, lineage, now)
            .await
            .map_err(self.db("claim lineage", None))?;
        tx.commit().await.map_err(self.db("claim commit", None))?;
        records.into_iter().map(RecordRow::into_claimed).collect()
    }

    async fn complete_batch(&self, completions: Vec<Completion>) -> Result<Vec<CompletionResult>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now_ms();
        let mut rows = Vec::with_capacity(completions.len());
        let mut params_by_index = Vec::with_capacity(completions.len());
        for completion in &completions {
            let claim = completion.claim;
            let params = completion_params(&completion.outcome, now);
            rows.push(json!({
                "id": claim.id.0, "g": claim.generation, "f": claim.fence, "st": params.new_state,
                "na": params.next_attempt_at, "le": params.last_error, "ec": params.error_class,
                "dr": params.dead_letter_reason, "er": params.erp_response, "hr": params.hold_rule,
                "ho": params.hold_role, "ri": params.retry_increment, "fa": params.failed,
            }));
            params_by_index.push(params);
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(self.db("complete", None))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.db("complete", None))?;
        let applied = sqlx::query(
            "WITH t AS MATERIALIZED (SELECT value ->> '$.id' AS id, value ->> '$.g' AS g, value ->> '$.f' AS f, \
               value ->> '$.st' AS st, value ->> '$.na' AS na, value ->> '$.le' AS le, value ->> '$.ec' AS ec, \
               value ->> '$.dr' AS dr, value ->> '$.er' AS er, value ->> '$.hr' AS hr, value ->> '$.ho' AS ho, \
               value ->> '$.ri' AS ri, value ->> '$.fa' AS fa FROM json_each($2)) \
             UPDATE records SET state = COALESCE(t.st, claimed_from, 'received'), claimed_from = NULL, \
             lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = COALESCE(t.na, next_attempt_at), \
             last_error = COALESCE(t.le, last_error), last_error_class = COALESCE(t.ec, last_error_class), \
             dead_letter_reason = COALESCE(t.dr, dead_letter_reason), erp_response = COALESCE(t.er, erp_response), \
             hold_rule = COALESCE(t.hr, hold_rule), hold_role = COALESCE(t.ho, hold_role), retries = retries + t.ri, \
             first_failure_at = CASE WHEN t.fa THEN COALESCE(first_failure_at, $1) ELSE first_failure_at END, \
             delivered_at = CASE WHEN t.st = 'delivered' THEN $1 ELSE delivered_at END, updated_at = $1 \
             FROM t \
             WHERE records.id = t.id AND records.flow = $3 AND records.generation = t.g \
             AND records.fence = t.f AND records.state = 'delivering' \
             RETURNING id, correlation_id",
        )
        .bind(now)
        .bind(Value::Array(rows).to_string())
        .bind(&self.flow)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.db("complete", None))?;
        let applied: HashMap<i64, String> = applied
            .into_iter()
            .map(|row| (row.get("id"), row.get("correlation_id")))
            .collect();

        let mut results = Vec::with_capacity(completions.len());
        let mut lineage = Vec::with_capacity(completions.len());
        let mut snapshots = Vec::new();
        for (completion, params) in completions.iter().zip(params_by_index) {
            let claim = completion.claim;
            let Some(correlation_id) = applied.get(&claim.id.0) else {
                results.push(self.refused(&mut tx, completion, now).await?);
                continue;
            };
            let mut detail = params.detail;
            detail["fence"] = json!(claim.fence);
            lineage.push(json!({"i": claim.id.0, "g": claim.generation, "s": completion.outcome.step(), "d": detail.to_string(), "c": correlation_id}));
            if let Some(snapshot) = params.snapshot {
                snapshots.push(json!({"i": claim.id.0, "g": claim.generation, "k": "dead_lettered", "b": snapshot}));
            }
            results.push(CompletionResult::Applied);
        }
        insert_lineage_set(&mut tx, lineage, now)
            .await
            .map_err(self.db("complete lineage", None))?;
        insert_snapshot_set(&mut tx, snapshots, now)
            .await
            .map_err(self.db("complete snapshots", None))?;
        tx.commit()
            .await
            .map_err(self.db("complete commit", None))?;
        Ok(results)
    }

    async fn append_lineage(&self, events: Vec<NewLineageEvent>) -> Result<()> {
        let now = self.clock.now_ms();
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(self.db("append lineage", None))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.db("append lineage", None))?;
        for event in events {
            let inserted = sqlx::query(
                "INSERT INTO lineage (record_id, generation, at, step, detail, correlation_id) \
                 SELECT id, generation, $1, $2, $3, correlation_id FROM records WHERE id = $4 AND flow = $5",
            )
            .bind(now)
            .bind(&event.step)
            .bind(event.detail.to_string())
            .bind(event.record.0)
            .bind(&self.flow)
            .execute(&mut *tx)
            .await
            .map_err(self.db("append lineage", Some(event.record)))?;
            if inserted.rows_affected() == 0 {
                return Err(LedgerError::NotFound {
                    flow: self.flow.clone(),
                    record: event.record,
                });
            }
        }
        tx.commit().await.map_err(self.db("append lineage", None))
    }

    async fn approve_held(&self, id: RecordId, actor: &str, reason: &str) -> Result<()> {
        self.manual_batch(vec![id], ManualAction::Approve, actor, reason)
            .await
    }

    async fn reject_held(&self, id: RecordId, actor: &str, reason: &str) -> Result<()> {
        self.manual_batch(vec![id], ManualAction::Reject, actor, reason)
            .await
    }

    async fn replay_dead_letter(&self, id: RecordId, actor: &str, reason: &str) -> Result<()> {
        self.manual_batch(vec![id], ManualAction::Replay, actor, reason)
            .await
    }

    async fn replay_dead_letters_by_reason(
        &self,
        dead_letter_reason: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<RecordId>> {
        // Selected and replayed under one connection, so no dead letter slips in between.
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM records WHERE flow = $1 AND state = 'dead_lettered' AND dead_letter_reason = $2 ORDER BY id",
        )
        .bind(&self.flow)
        .bind(dead_letter_reason)
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("replay by reason", None))?;
        let ids: Vec<RecordId> = ids.into_iter().map(RecordId).collect();
        self.manual_batch(ids.clone(), ManualAction::Replay, actor, reason)
            .await?;
        Ok(ids)
    }

    async fn get(&self, id: RecordId) -> Result<Option<RecordDetail>> {
        let record = Some(id);
        let mut conn = self.pool.acquire().await.map_err(self.db("get", record))?;
        let mut tx = conn.begin().await.map_err(self.db("get", record))?;
        let row: Option<RecordRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE id = $1 AND flow = $2"
        )))
        .bind(id.0)
        .bind(&self.flow)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.db("get", record))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let lineage: Vec<LineageRow> = sqlx::query_as(
            "SELECT at, generation, step, detail, correlation_id FROM lineage WHERE record_id = $1 ORDER BY id",
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
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<RecordView>> {
        let rows: Vec<RecordRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE flow = $1 AND state = $2 AND id > $3 ORDER BY id LIMIT $4"
        )))
        .bind(&self.flow)
        .bind(state.as_str())
        .bind(after.map_or(0, |id| id.0))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(self.db("list", None))?;
        rows.into_iter().map(RecordRow::into_view).collect()
    }

    async fn counts(&self) -> Result<Counts> {
        let now = self.clock.now_ms();
        let row: CountsRow = sqlx::query_as(
            "SELECT COUNT(*) AS records, COALESCE(SUM(generation), 0) AS received, \
             COALESCE(SUM(state = 'delivered'), 0) AS delivered, \
             COALESCE(SUM(first_failure_at IS NOT NULL), 0) AS failed, \
             COALESCE(SUM(retries), 0) AS retried, \
             COALESCE(SUM(state = 'dead_lettered'), 0) AS dead_lettered, \
             COALESCE(SUM(state = 'held'), 0) AS held, \
             COALESCE(SUM(state IN ('received', 'validated', 'retry_scheduled', 'delivering')), 0) AS pending, \
             MIN(CASE WHEN state IN ('received', 'validated', 'retry_scheduled', 'delivering') THEN received_at END) AS oldest_pending_at, \
             MAX(delivered_at) AS last_delivery_at, \
             AVG(CASE WHEN state = 'delivered' AND first_failure_at IS NOT NULL THEN CAST(delivered_at - first_failure_at AS REAL) END) AS mttr_ms \
             FROM records WHERE flow = $1",
        )
        .bind(&self.flow)
        .fetch_one(&self.pool)
        .await
        .map_err(self.db("counts", None))?;
        let interventions: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM interventions WHERE flow = $1")
                .bind(&self.flow)
                .fetch_one(&self.pool)
                .await
                .map_err(self.db("counts", None))?;
        Ok(assemble_counts(row, interventions, now))
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>)> {
        let (pending, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(received_at) FROM records WHERE flow = $1 \
             AND state IN ('received', 'validated', 'retry_scheduled', 'delivering')",
        )
        .bind(&self.flow)
        .fetch_one(&self.pool)
        .await
        .map_err(self.db("backlog", None))?;
        Ok((pending.max(0) as u64, oldest))
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
