//! The ledger's schema, as versioned migrations for each backend. Versions only ever grow; a migration is
//! never edited once released (add a new one instead). Both backends record applied versions in
//! `meshline_schema`, and both refuse a database whose newest version is above [`SCHEMA_VERSION`]: an older
//! binary writing to a newer schema could silently lose the columns it does not know.
//!
//! Times are `BIGINT` milliseconds since the Unix epoch (UTC); JSON is stored as text, so both backends read
//! back exactly what was written.

/// The newest schema version this code knows.
pub const SCHEMA_VERSION: i64 = 4;

/// The statements of one released migration (`backend` is `sqlite` or `postgres`), for tools and tests
/// that need a database as an older meshline left it.
pub fn migration_statements(backend: &str, version: i64) -> Option<&'static [&'static str]> {
    let migrations = match backend {
        "sqlite" => SQLITE,
        "postgres" => POSTGRES,
        _ => return None,
    };
    migrations
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.statements)
}

pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub statements: &'static [&'static str],
}

/// Version 2 moves each record's payload into a table of its own. A record's row is rewritten on every
/// claim and completion; with a 1 KB payload inline, each rewrite copied the payload too (SQLite rewrites the
/// whole row and its page into the WAL, PostgreSQL writes a new row version), three times per record. Now the
/// payload is written once per generation and the rewrites touch a ~200-byte row.
const PAYLOADS_DESCRIPTION: &str = "payloads in their own table, written once per generation";

/// Version 3 indexes by state only the records people page through (holds and dead letters). An index over
/// every state was rewritten at receipt, claim and completion of every record, for listings no one asks of
/// delivered or in-flight records.
const ATTENTION_DESCRIPTION: &str = "index by state only the holds and dead letters";

/// Version 3, the same on both backends.
const ATTENTION_STATEMENTS: &[&str] = &[
    "DROP INDEX records_state",
    "CREATE INDEX records_attention ON records (flow, state, id) WHERE state IN ('held', 'dead_lettered')",
];

/// Version 4 orders a record's revisions: each record keeps the ordering value of its current revision (the
/// contract's `spec.ordering` field) so a late, older revision is recognised as stale, and counts the stale
/// revisions it refused. On PostgreSQL it also adds the delivery slots that share a flow's ERP concurrency
/// limit between replicas (see `PostgresLedger::acquire_slots`).
const ORDERING_DESCRIPTION: &str =
    "ordering value and stale revisions per record; delivery slots shared by replicas";

/// The bookkeeping table; created before any migration runs.
pub(crate) const SQLITE_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS meshline_schema (\
    version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL)";

pub(crate) const POSTGRES_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS meshline_schema (\
    version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)";

pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        description: "records, lineage, snapshots, checkpoints, interventions",
        statements: &[
            "CREATE TABLE records (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            flow TEXT NOT NULL,
            source_key TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            external_id TEXT,
            generation INTEGER NOT NULL,
            payload TEXT NOT NULL,
            payload_hash TEXT NOT NULL,
            contract_version TEXT NOT NULL,
            state TEXT NOT NULL,
            claimed_from TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            retries INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER NOT NULL,
            lease_owner TEXT,
            lease_expires_at INTEGER,
            fence INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            last_error_class TEXT,
            dead_letter_reason TEXT,
            erp_response TEXT,
            hold_rule TEXT,
            hold_role TEXT,
            approved_by TEXT,
            bucket INTEGER NOT NULL CHECK (bucket BETWEEN 0 AND 99),
            correlation_id TEXT NOT NULL,
            received_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            delivered_at INTEGER,
            first_failure_at INTEGER,
            UNIQUE (flow, idempotency_key)
        )",
            "CREATE INDEX records_due ON records (flow, next_attempt_at)
            WHERE state IN ('received', 'validated', 'retry_scheduled', 'delivering')",
            "CREATE INDEX records_state ON records (flow, state, id)",
            "CREATE TABLE lineage (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            record_id INTEGER NOT NULL REFERENCES records (id),
            generation INTEGER NOT NULL,
            at INTEGER NOT NULL,
            step TEXT NOT NULL,
            detail TEXT NOT NULL,
            correlation_id TEXT NOT NULL
        )",
            "CREATE INDEX lineage_record ON lineage (record_id, id)",
            "CREATE TABLE snapshots (
            record_id INTEGER NOT NULL REFERENCES records (id),
            generation INTEGER NOT NULL,
            kind TEXT NOT NULL,
            at INTEGER NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (record_id, generation, kind)
        )",
            "CREATE TABLE checkpoints (
            flow TEXT NOT NULL,
            source TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (flow, source)
        )",
            "CREATE TABLE interventions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            flow TEXT NOT NULL,
            record_id INTEGER REFERENCES records (id),
            action TEXT NOT NULL,
            actor TEXT NOT NULL,
            reason TEXT NOT NULL,
            at INTEGER NOT NULL
        )",
            "CREATE INDEX interventions_record ON interventions (flow, record_id)",
        ],
    },
    Migration {
        version: 2,
        description: PAYLOADS_DESCRIPTION,
        statements: &[
            "CREATE TABLE payloads (
                record_id INTEGER PRIMARY KEY REFERENCES records (id),
                body TEXT NOT NULL
            )",
            "INSERT INTO payloads (record_id, body) SELECT id, payload FROM records",
            "ALTER TABLE records DROP COLUMN payload",
        ],
    },
    Migration {
        version: 3,
        description: ATTENTION_DESCRIPTION,
        statements: ATTENTION_STATEMENTS,
    },
    Migration {
        version: 4,
        description: ORDERING_DESCRIPTION,
        statements: &[
            "ALTER TABLE records ADD COLUMN ordering_value INTEGER",
            "ALTER TABLE records ADD COLUMN stale_revisions INTEGER NOT NULL DEFAULT 0",
        ],
    },
];

pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        description: "records, lineage, snapshots, checkpoints, interventions",
        statements: &[
            "CREATE TABLE records (
            id BIGSERIAL PRIMARY KEY,
            flow TEXT NOT NULL,
            source_key TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            external_id TEXT,
            generation BIGINT NOT NULL,
            payload TEXT NOT NULL,
            payload_hash TEXT NOT NULL,
            contract_version TEXT NOT NULL,
            state TEXT NOT NULL,
            claimed_from TEXT,
            attempts BIGINT NOT NULL DEFAULT 0,
            retries BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            lease_owner TEXT,
            lease_expires_at BIGINT,
            fence BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            last_error_class TEXT,
            dead_letter_reason TEXT,
            erp_response TEXT,
            hold_rule TEXT,
            hold_role TEXT,
            approved_by TEXT,
            bucket BIGINT NOT NULL CHECK (bucket BETWEEN 0 AND 99),
            correlation_id TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            delivered_at BIGINT,
            first_failure_at BIGINT,
            UNIQUE (flow, idempotency_key)
        )",
            "CREATE INDEX records_due ON records (flow, next_attempt_at)
            WHERE state IN ('received', 'validated', 'retry_scheduled', 'delivering')",
            "CREATE INDEX records_state ON records (flow, state, id)",
            "CREATE TABLE lineage (
            id BIGSERIAL PRIMARY KEY,
            record_id BIGINT NOT NULL REFERENCES records (id),
            generation BIGINT NOT NULL,
            at BIGINT NOT NULL,
            step TEXT NOT NULL,
            detail TEXT NOT NULL,
            correlation_id TEXT NOT NULL
        )",
            "CREATE INDEX lineage_record ON lineage (record_id, id)",
            "CREATE TABLE snapshots (
            record_id BIGINT NOT NULL REFERENCES records (id),
            generation BIGINT NOT NULL,
            kind TEXT NOT NULL,
            at BIGINT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (record_id, generation, kind)
        )",
            "CREATE TABLE checkpoints (
            flow TEXT NOT NULL,
            source TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (flow, source)
        )",
            "CREATE TABLE interventions (
            id BIGSERIAL PRIMARY KEY,
            flow TEXT NOT NULL,
            record_id BIGINT REFERENCES records (id),
            action TEXT NOT NULL,
            actor TEXT NOT NULL,
            reason TEXT NOT NULL,
            at BIGINT NOT NULL
        )",
            "CREATE INDEX interventions_record ON interventions (flow, record_id)",
        ],
    },
    Migration {
        version: 2,
        description: PAYLOADS_DESCRIPTION,
        statements: &[
            "CREATE TABLE payloads (
                record_id BIGINT PRIMARY KEY REFERENCES records (id),
                body TEXT NOT NULL
            )",
            "INSERT INTO payloads (record_id, body) SELECT id, payload FROM records",
            "ALTER TABLE records DROP COLUMN payload",
        ],
    },
    Migration {
        version: 3,
        description: ATTENTION_DESCRIPTION,
        statements: ATTENTION_STATEMENTS,
    },
    Migration {
        version: 4,
        description: ORDERING_DESCRIPTION,
        statements: &[
            "ALTER TABLE records ADD COLUMN ordering_value BIGINT",
            "ALTER TABLE records ADD COLUMN stale_revisions BIGINT NOT NULL DEFAULT 0",
            // One row per slot of a flow's delivery concurrency; a replica holds a slot for the length of
            // one ERP request. `lease_expires_at` frees the slots of a replica that died holding them.
            "CREATE TABLE delivery_slots (
                flow TEXT NOT NULL,
                slot BIGINT NOT NULL,
                holder TEXT,
                lease_expires_at BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (flow, slot)
            )",
        ],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_repeat_the_attention_index_predicate_word_for_word() {
        // SQLite uses a partial index only when the query's WHERE repeats the index's terms.
        for migrations in [SQLITE, POSTGRES] {
            let index = migrations[2].statements[1];
            assert!(index.contains(super::super::ATTENTION), "{index}");
        }
    }

    #[test]
    fn migrations_are_numbered_one_to_the_current_version() {
        for migrations in [SQLITE, POSTGRES] {
            let versions: Vec<i64> = migrations.iter().map(|m| m.version).collect();
            let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
            assert_eq!(versions, expected);
        }
    }
}
