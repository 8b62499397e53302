//! The audit's read of the PostgreSQL sink's table (`spec.sink.table`, the DSN in the Secret key `url`): the
//! rows whose date is in the window, by key, in a read-only transaction (`SET TRANSACTION READ ONLY` first, so
//! the server itself refuses any write in it).
//!
//! The sink's table has the columns `external_id` (the key), `payload` (jsonb), `correlation_id`,
//! `created_at` and `updated_at`. Each `spec.audit` field names either one of those columns or a path into the
//! payload (`amount`, `totals.gross`, with an optional leading `payload.`):
//!
//! | field                | default              | read as                                           |
//! |----------------------|----------------------|---------------------------------------------------|
//! | `erpExternalIdField` | `external_id` column | text; a payload path that is null → the key       |
//! | `erpAmountField`     | payload `amount`     | the JSON number's text, exact (jsonb is numeric)  |
//! | `erpCurrencyField`   | payload `currency`   | text; absent → `spec.audit.defaultCurrency`        |
//! | `erpDateField`       | `created_at` column  | a payload value is cast to `timestamptz`          |
//!
//! Paging is by keyset on `external_id` (the primary key, so its index serves `ORDER BY` and `>`); the cursor
//! is the last key read. The window's ends are both included.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::{
    AuditWindow, AuditedOrder, OrderPage, OrderQuery, Pace, QueryConfigError, QueryError, Settings,
    amount, currency,
};
use crate::api::SinkSpec;
use crate::connectors::Credentials;
use crate::connectors::sinks::postgres::quote_table;
use serde_json::Value;

const SYSTEM: &str = "postgres";
/// Rows per page.
pub const PAGE_SIZE: i64 = 1000;
/// The sink's own columns; any other field name is a path into `payload`.
const COLUMNS: [&str; 4] = ["external_id", "correlation_id", "created_at", "updated_at"];

/// The rows of the sink's table, page by page.
pub struct PostgresQuery {
    pool: PgPool,
    select: String,
    table: String,
    default_currency: String,
    pace: Pace,
}

/// A field as an SQL expression: a quoted column of the sink's table, or `payload #>> '{a,b}'`. The field
/// was checked to be `ident(.ident)*`, so it can be spliced.
fn expression(field: &str) -> (String, bool) {
    if COLUMNS.contains(&field) {
        return (format!("\"{field}\""), true);
    }
    let path = field.strip_prefix("payload.").unwrap_or(field);
    (
        format!("(payload #>> '{{{}}}')", path.replace('.', ",")),
        false,
    )
}

impl PostgresQuery {
    /// From the flow's `sink`, its `audit` settings and the sink's Secret (`url`). Connects lazily.
    pub fn from_spec(
        sink: &SinkSpec,
        settings: &Settings,
        credentials: &Credentials,
    ) -> Result<PostgresQuery, QueryConfigError> {
        let table = sink
            .table
            .as_deref()
            .ok_or_else(|| QueryConfigError::new("spec.sink.table", "is required"))?;
        let quoted = quote_table(table).ok_or_else(|| {
            QueryConfigError::new(
                "spec.sink.table",
                format!("{table:?} is not an identifier or schema.identifier"),
            )
        })?;
        let url = credentials
            .get("url")
            .map_err(|e| QueryConfigError::new("spec.sink.credentialsSecretRef", e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_lazy(&url)
            .map_err(|e| {
                QueryConfigError::new(
                    "spec.sink.credentialsSecretRef",
                    format!("the url in the Secret: {e}"),
                )
            })?;
        let audit = &settings.audit;
        let (external_id, _) = expression(
            audit
                .erp_external_id_field
                .as_deref()
                .unwrap_or("external_id"),
        );
        let (amount, _) = expression(audit.erp_amount_field.as_deref().unwrap_or("amount"));
        let (currency, _) = expression(audit.erp_currency_field.as_deref().unwrap_or("currency"));
        let (date, column) = expression(audit.erp_date_field.as_deref().unwrap_or("created_at"));
        let date = if column {
            date
        } else {
            format!("{date}::timestamptz")
        };
        let select = format!(
            "SELECT external_id AS key, ({external_id})::text AS external_id, ({amount})::text AS amount, \
             ({currency})::text AS currency FROM {quoted} \
             WHERE {date} >= $1::timestamptz AND {date} <= $2::timestamptz AND ($3::text IS NULL OR external_id > $3) \
             ORDER BY external_id LIMIT $4"
        );
        Ok(PostgresQuery {
            pool,
            select,
            table: quoted,
            default_currency: settings.default_currency.clone(),
            pace: settings.pace(),
        })
    }

    fn failure(&self, error: sqlx::Error) -> QueryError {
        let code = match &error {
            sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
            _ => None,
        };
        let message = format!(
            "reading {}: {error}{}",
            self.table,
            code.as_deref()
                .map(|c| format!(" (SQLSTATE {c})"))
                .unwrap_or_default()
        );
        match code.as_deref() {
            // 22: data exceptions (a payload date that is not a timestamp, say): the rows are not readable.
            Some(c) if c.starts_with("22") => QueryError::Malformed {
                system: SYSTEM,
                message,
            },
            // 28 / 42501 / 3D000 / 42P01 (no such table) / 42xxx: no retry fixes those.
            Some(c) if c.starts_with("28") || c.starts_with("42") || c == "3D000" => {
                QueryError::Refused {
                    system: SYSTEM,
                    message,
                }
            }
            // 53300 too many connections, 57P03 starting up: a rate of sorts, worth retrying.
            _ => QueryError::Unavailable {
                system: SYSTEM,
                message,
            },
        }
    }
}

#[async_trait]
impl OrderQuery for PostgresQuery {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn page(
        &self,
        window: &AuditWindow,
        cursor: Option<&str>,
    ) -> Result<OrderPage, QueryError> {
        self.pace.wait().await;
        let mut tx = self.pool.begin().await.map_err(|e| self.failure(e))?;
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(|e| self.failure(e))?;
        let rows = sqlx::query(AssertSqlSafe(self.select.clone()))
            // sqlx is built without its chrono types: the window travels as RFC 3339 text.
            .bind(window.from.to_rfc3339())
            .bind(window.to.to_rfc3339())
            .bind(cursor)
            .bind(PAGE_SIZE)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.failure(e))?;
        // Nothing to keep: ending the read-only transaction either way releases its snapshot.
        tx.rollback().await.map_err(|e| self.failure(e))?;
        let mut orders = Vec::with_capacity(rows.len());
        let mut last = None;
        for (i, row) in rows.iter().enumerate() {
            let text = |name: &str| -> Result<Option<String>, QueryError> {
                row.try_get::<Option<String>, _>(name)
                    .map_err(|e| QueryError::malformed(SYSTEM, format!("rows[{i}].{name}: {e}")))
            };
            let key = text("key")?
                .ok_or_else(|| QueryError::malformed(SYSTEM, format!("rows[{i}].key: null")))?;
            let external_id = text("external_id")?.unwrap_or_else(|| key.clone());
            let amount_text = text("amount")?.map(Value::String);
            let currency_text = text("currency")?.map(Value::String);
            orders.push(AuditedOrder {
                external_id,
                amount: amount(SYSTEM, amount_text.as_ref(), &format!("rows[{i}].amount"))?,
                currency: currency(
                    SYSTEM,
                    currency_text.as_ref(),
                    &self.default_currency,
                    &format!("rows[{i}].currency"),
                )?,
            });
            last = Some(key);
        }
        let full = orders.len() as i64 >= PAGE_SIZE;
        Ok(OrderPage {
            orders,
            next: last.filter(|_| full),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_columns_or_payload_paths() {
        assert_eq!(expression("created_at"), ("\"created_at\"".into(), true));
        assert_eq!(
            expression("payload.totals.gross"),
            ("(payload #>> '{totals,gross}')".into(), false)
        );
        assert_eq!(
            expression("amount"),
            ("(payload #>> '{amount}')".into(), false)
        );
    }
}
