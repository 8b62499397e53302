//! PostgreSQL table sink: `INSERT … ON CONFLICT (external_id) DO UPDATE`, one row per external id, a whole
//! batch of records in one statement (see [`PostgresSink::deliver_batch`]).
//!
//! The table (`spec.table`, optionally `schema.table`) is created on first use when missing:
//!
//! | column           | type          | meaning                                   |
//! |------------------|---------------|-------------------------------------------|
//! | `external_id`    | `text` (PK)   | the contract's external id                |
//! | `payload`        | `jsonb`       | the latest delivered payload              |
//! | `correlation_id` | `text`        | the delivery that wrote it (lineage)      |
//! | `created_at`     | `timestamptz` | first delivery                            |
//! | `updated_at`     | `timestamptz` | last delivery                             |
//!
//! The DSN comes from the Secret key `url`. The table name is already restricted by the CRD's pattern; it is
//! checked again here and always quoted as an identifier, so it can never change the statement's meaning.
//! Errors: no connection → transient; a failed login or missing privilege → flow-level; a data or constraint
//! error (SQLSTATE classes 22 and 23) → permanent.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::OnceCell;

use super::{BuildError, credential, required};
use crate::api::{ErrorClass, SinkSpec};
use crate::connectors::{BatchLimits, Credentials, Delivered, Delivery, Sink, SinkError};

const SYSTEM: &str = "postgres";
const MAX_LOOKUP_ROWS: i64 = 200_000;

/// Upserts payloads into one table.
pub struct PostgresSink {
    pool: PgPool,
    table: String,
    upsert: String,
    upsert_batch: String,
    ready: OnceCell<()>,
}

/// `"schema"."table"` for a name matching `ident(.ident)?`, or `None`.
pub fn quote_table(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let ident = |p: &&str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(ident) {
        return None;
    }
    Some(
        parts
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// The class of a database error.
pub fn classify(error: &sqlx::Error) -> ErrorClass {
    match error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // 28: invalid authorization (bad password, unknown role); 42501: insufficient privilege.
            Some(code) if code.starts_with("28") || code == "42501" => ErrorClass::FlowLevel,
            // 3D000: the database does not exist — nothing a retry fixes, nothing a record did.
            Some("3D000") => ErrorClass::FlowLevel,
            Some(code) if code.starts_with("22") || code.starts_with("23") => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        },
        sqlx::Error::Configuration(_) => ErrorClass::Config,
        _ => ErrorClass::Transient,
    }
}

fn failure(what: &str, table: &str, error: sqlx::Error) -> SinkError {
    let class = classify(&error);
    let code = match &error {
        sqlx::Error::Database(db) => db
            .code()
            .map(|c| format!(" (SQLSTATE {c})"))
            .unwrap_or_default(),
        _ => String::new(),
    };
    // sqlx's messages never include the DSN's password.
    let mut err = SinkError::new(SYSTEM, class, format!("{what} {table}: {error}{code}"));
    err.response = Some(format!("{error}{code}"));
    err
}

impl PostgresSink {
    /// Reads `table` and the Secret key `url`; connects lazily, with up to `connections` connections (the
    /// flow's delivery concurrency: one per request it may have in flight).
    pub fn from_spec(
        spec: &SinkSpec,
        credentials: &Credentials,
        connections: usize,
    ) -> Result<Self, BuildError> {
        let table = required(SYSTEM, "table", spec.table.as_ref())?;
        Self::connect_lazy_sized(&credential(SYSTEM, credentials, "url")?, table, connections)
    }

    /// [`PostgresSink::connect_lazy_sized`] with the default flow's concurrency.
    pub fn connect_lazy(url: &str, table: &str) -> Result<Self, BuildError> {
        Self::connect_lazy_sized(url, table, super::Pressure::default().concurrency)
    }

    pub fn connect_lazy_sized(
        url: &str,
        table: &str,
        connections: usize,
    ) -> Result<Self, BuildError> {
        let quoted = quote_table(table).ok_or_else(|| BuildError::Invalid {
            system: SYSTEM,
            reason: format!("table {table:?} is not an identifier or schema.identifier"),
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(connections.max(1)).unwrap_or(u32::MAX))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy(url)
            .map_err(|e| BuildError::Invalid {
                system: SYSTEM,
                reason: format!("the url in the Secret: {e}"),
            })?;
        // `xmax = 0` holds only for a row this statement inserted, which tells a create from an update.
        let upsert = format!(
            "INSERT INTO {quoted} (external_id, payload, correlation_id) VALUES ($1, $2::jsonb, $3) \
             ON CONFLICT (external_id) DO UPDATE SET payload = EXCLUDED.payload, \
             correlation_id = EXCLUDED.correlation_id, updated_at = now() \
             RETURNING (xmax = 0) AS created"
        );
        // The batch form: one statement for the whole batch, so one transaction and one WAL flush. The arrays
        // travel as text and are cast inside the statement (a jsonb array bind would be parsed twice).
        let upsert_batch = format!(
            "INSERT INTO {quoted} (external_id, payload, correlation_id) \
             SELECT e, p::jsonb, c FROM unnest($1::text[], $2::text[], $3::text[]) AS batch(e, p, c) \
             ON CONFLICT (external_id) DO UPDATE SET payload = EXCLUDED.payload, \
             correlation_id = EXCLUDED.correlation_id, updated_at = now() \
             RETURNING external_id, (xmax = 0) AS created"
        );
        Ok(PostgresSink {
            pool,
            table: quoted,
            upsert,
            upsert_batch,
            ready: OnceCell::new(),
        })
    }

    async fn ensure_table(&self) -> Result<(), SinkError> {
        self.ready
            .get_or_try_init(|| async {
                let ddl = format!(
                    "CREATE TABLE IF NOT EXISTS {} (external_id text PRIMARY KEY, payload jsonb NOT NULL, \
                     correlation_id text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), \
                     updated_at timestamptz NOT NULL DEFAULT now())",
                    self.table
                );
                match sqlx::query(AssertSqlSafe(ddl)).execute(&self.pool).await {
                    Ok(_) => Ok(()),
                    // Two replicas racing on IF NOT EXISTS: the loser sees a duplicate type or table.
                    Err(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("23505" | "42P07")) => {
                        Ok(())
                    }
                    Err(e) => Err(failure("cannot create", &self.table, e)),
                }
            })
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError> {
        self.ensure_table().await?;
        let row = sqlx::query(AssertSqlSafe(self.upsert.clone()))
            .bind(delivery.external_id)
            .bind(crate::ledger::json_text(delivery.payload))
            .bind(delivery.correlation_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| failure("cannot upsert into", &self.table, e))?;
        let created: bool = row
            .try_get("created")
            .map_err(|e| failure("cannot read from", &self.table, e))?;
        Ok(Delivered {
            erp_id: Some(delivery.external_id.to_string()),
            created: Some(created),
            status: 200,
        })
    }

    fn batch_limits(&self) -> Option<BatchLimits> {
        Some(BatchLimits::DEFAULT)
    }

    /// One multi-row upsert in one transaction. A data or constraint error of any row (SQLSTATE classes 22
    /// and 23: a CHECK constraint, a trigger that raises, `\u0000` in a text value) rejects the whole
    /// statement and nothing is written: that is a permanent `Err` for the batch, which the pipeline
    /// bisects down to the record that causes it, each half its own statement, so the error reaches the
    /// one record it belongs to with PostgreSQL's own message.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_table().await?;
        let mut ids = Vec::with_capacity(deliveries.len());
        let mut payloads = Vec::with_capacity(deliveries.len());
        let mut correlation_ids = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            ids.push(d.external_id);
            payloads.push(crate::ledger::json_text(d.payload));
            correlation_ids.push(d.correlation_id);
        }
        let rows = sqlx::query(AssertSqlSafe(self.upsert_batch.clone()))
            .bind(&ids)
            .bind(&payloads)
            .bind(&correlation_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| failure("cannot upsert into", &self.table, e))?;
        let mut created = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let id: String = row
                .try_get("external_id")
                .map_err(|e| failure("cannot read from", &self.table, e))?;
            let was_created: bool = row
                .try_get("created")
                .map_err(|e| failure("cannot read from", &self.table, e))?;
            created.insert(id, was_created);
        }
        Ok(deliveries
            .iter()
            .map(|d| match created.get(d.external_id) {
                Some(was_created) => Ok(Delivered {
                    erp_id: Some(d.external_id.to_string()),
                    created: Some(*was_created),
                    status: 200,
                }),
                // A trigger that silently skips a row (`RETURN NULL` in a BEFORE trigger) writes nothing and
                // returns no row for it: that record was not delivered, and saying so beats a false success.
                None => Err(SinkError::new(
                    SYSTEM,
                    ErrorClass::Permanent,
                    format!(
                        "{}: the upsert wrote no row for this record (a trigger on the table skipped it)",
                        self.table
                    ),
                )),
            })
            .collect())
    }

    async fn probe(&self) -> Result<(), SinkError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| failure("cannot reach", &self.table, e))
    }

    /// Every row of the table or view `resource` as a JSON object (`to_jsonb(row)`); rows without `key` are
    /// left out.
    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError> {
        let quoted = quote_table(resource).ok_or_else(|| {
            SinkError::new(
                SYSTEM,
                ErrorClass::Config,
                format!("lookup resource {resource:?} is not a table name"),
            )
        })?;
        let sql =
            format!("SELECT to_jsonb(t)::text AS row FROM {quoted} t LIMIT {MAX_LOOKUP_ROWS}");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| failure("cannot read", &quoted, e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row
                .try_get("row")
                .map_err(|e| failure("cannot read", &quoted, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| {
                SinkError::new(
                    SYSTEM,
                    ErrorClass::Transient,
                    format!("row of {quoted}: {e}"),
                )
            })?;
            if value.get(key).is_some_and(|v| !v.is_null()) {
                out.push(value);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted_identifiers_or_refused() {
        assert_eq!(
            quote_table("erp.orders").as_deref(),
            Some("\"erp\".\"orders\"")
        );
        assert_eq!(quote_table("orders_2"), Some("\"orders_2\"".to_string()));
        for bad in ["", "1x", "a.b.c", "x\"; DROP TABLE y; --", "a b", "a."] {
            assert_eq!(quote_table(bad), None, "{bad:?}");
        }
    }
}
