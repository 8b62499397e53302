//! The ledger's schema, as versioned migrations for each backend. Versions only ever grow; a migration is
//! never edited once released (add a new one instead). Both backends record applied versions in
//! `meshline_schema`, and both refuse a database whose newest version is above [`SCHEMA_VERSION`]: an older
//! binary writing to a newer schema could silently lose the columns it does not know.
//!
//! Times are `BIGINT` milliseconds since the Unix epoch (UTC); JSON is stored as text, so both backends read
//! back exactly what was written.

/// The newest schema version this code knows.
pub const SCHEMA_VERSION: i64 = 18;

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

/// Version 4 keeps the flow's counters in the ledger, so `/status` reads a few rows instead of aggregating
/// every record (1.1 s at a million records). Triggers on `records` and `interventions` add each row's
/// change to `ledger_counters` in the transaction that makes it, whatever statement makes it (ingest,
/// claim, completion, manual action, purge), so the counters cannot drift from the rows: they always equal
/// a recount (`Ledger::recount`). A record contributes, per counter, what the recount would count of it
/// (`received` its generation, `delivered` 1 while delivered, `mttr_sum_ms` its recovery time while delivered
/// after a failure, ...); a trigger adds the difference between the new and the old contribution.
/// `ledger_window` holds per-minute counts of events (record versions received, records failing for the
/// first time) for the failure rate over the last hour; the ledger prunes minutes older than the window.
/// `records_pending_age` makes the oldest waiting record one index probe. Existing ledgers are backfilled
/// from their rows in the same transaction.
///
/// `shard`: on PostgreSQL each connection adds to rows of its own (`pg_backend_pid()`), so replicas and
/// pool connections never wait on one hot row and never deadlock over two; reads sum the shards, and the
/// ledger folds the shards of closed connections into shard -1. SQLite has one writer: shard 0.
const COUNTERS_DESCRIPTION: &str =
    "counters and per-minute event counts kept in the same transactions";

/// Version 10 drops the primary key index of PostgreSQL's `lineage`. Every lineage row (one at receipt, claim
/// and completion of every record) wrote an entry into it, and nothing reads lineage by its id alone: a
/// record's history is read, ordered and purged through `lineage_record (record_id, id)`, which still orders
/// events by the id the sequence hands out. One index write and its WAL record less per event.
const LINEAGE_KEY_DESCRIPTION: &str = "lineage read through its record index only";

/// The SQLite counter triggers of version 4, with the test of a waiting state passed in: version 4 wrote it as
/// an `IN` list, version 10 as comparisons (see `sqlite_pending!`). One text for both, so they cannot drift.
macro_rules! sqlite_counter_triggers {
    ($new_pending:expr, $old_pending:expr) => {
        sqlite_counter_triggers!($new_pending, $old_pending, "", "")
    };
    ($new_pending:expr, $old_pending:expr, $insert_when:expr, $update_when:expr) => {
        [
            concat!("CREATE TRIGGER records_counted_insert AFTER INSERT ON records", $insert_when, " BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT NEW.flow, column1, 0, column2 FROM (VALUES
                    ('records', 1),
                    ('received', NEW.generation),
                    ('delivered', NEW.state = 'delivered'),
                    ('failed', NEW.first_failure_at IS NOT NULL),
                    ('retried', NEW.retries),
                    ('dead_lettered', NEW.state = 'dead_lettered'),
                    ('held', NEW.state = 'held'),
                    ('pending', ", $new_pending, "),
                    ('mttr_sum_ms', CASE WHEN NEW.state = 'delivered' AND NEW.first_failure_at IS NOT NULL
                        THEN COALESCE(NEW.delivered_at - NEW.first_failure_at, 0) ELSE 0 END),
                    ('mttr_count', NEW.state = 'delivered' AND NEW.first_failure_at IS NOT NULL))
                WHERE column2 <> 0
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value;
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT NEW.flow, NEW.received_at / 60000, 'received', 0, NEW.generation WHERE true
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = value + excluded.value;
            END"),
            concat!("CREATE TRIGGER records_counted_update
            AFTER UPDATE OF state, generation, first_failure_at, retries, delivered_at ON records", $update_when, " BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT NEW.flow, column1, 0, column2 FROM (VALUES
                    ('received', NEW.generation - OLD.generation),
                    ('delivered', (NEW.state = 'delivered') - (OLD.state = 'delivered')),
                    ('failed', (NEW.first_failure_at IS NOT NULL) - (OLD.first_failure_at IS NOT NULL)),
                    ('retried', NEW.retries - OLD.retries),
                    ('dead_lettered', (NEW.state = 'dead_lettered') - (OLD.state = 'dead_lettered')),
                    ('held', (NEW.state = 'held') - (OLD.state = 'held')),
                    ('pending', (", $new_pending, ")
                        - (", $old_pending, ")),
                    ('mttr_sum_ms', CASE WHEN NEW.state = 'delivered' AND NEW.first_failure_at IS NOT NULL
                        THEN COALESCE(NEW.delivered_at - NEW.first_failure_at, 0) ELSE 0 END
                        - CASE WHEN OLD.state = 'delivered' AND OLD.first_failure_at IS NOT NULL
                        THEN COALESCE(OLD.delivered_at - OLD.first_failure_at, 0) ELSE 0 END),
                    ('mttr_count', (NEW.state = 'delivered' AND NEW.first_failure_at IS NOT NULL)
                        - (OLD.state = 'delivered' AND OLD.first_failure_at IS NOT NULL)))
                WHERE column2 <> 0
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value;
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT NEW.flow, 'last_delivery_at', 0, NEW.delivered_at
                WHERE NEW.delivered_at IS NOT NULL AND NEW.delivered_at IS NOT OLD.delivered_at
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = MAX(value, excluded.value);
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT NEW.flow, NEW.received_at / 60000, 'received', 0, NEW.generation - OLD.generation
                WHERE NEW.generation > OLD.generation
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = value + excluded.value;
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT NEW.flow, NEW.first_failure_at / 60000, 'failed', 0, 1
                WHERE OLD.first_failure_at IS NULL AND NEW.first_failure_at IS NOT NULL
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = value + excluded.value;
            END"),
            concat!("CREATE TRIGGER records_counted_delete AFTER DELETE ON records BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT OLD.flow, column1, 0, -column2 FROM (VALUES
                    ('records', 1),
                    ('received', OLD.generation),
                    ('delivered', OLD.state = 'delivered'),
                    ('failed', OLD.first_failure_at IS NOT NULL),
                    ('retried', OLD.retries),
                    ('dead_lettered', OLD.state = 'dead_lettered'),
                    ('held', OLD.state = 'held'),
                    ('pending', ", $old_pending, "),
                    ('mttr_sum_ms', CASE WHEN OLD.state = 'delivered' AND OLD.first_failure_at IS NOT NULL
                        THEN COALESCE(OLD.delivered_at - OLD.first_failure_at, 0) ELSE 0 END),
                    ('mttr_count', OLD.state = 'delivered' AND OLD.first_failure_at IS NOT NULL))
                WHERE column2 <> 0
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value;
            END"),
        ]
    };
}

const SQLITE_COUNTER_TRIGGERS_V4: [&str; 3] = sqlite_counter_triggers!(
    "NEW.state IN ('received', 'validated', 'retry_scheduled', 'delivering')",
    "OLD.state IN ('received', 'validated', 'retry_scheduled', 'delivering')"
);
const SQLITE_COUNTER_TRIGGERS_V10: [&str; 3] =
    sqlite_counter_triggers!(sqlite_pending!("NEW."), sqlite_pending!("OLD."));
const SQLITE_COUNTER_TRIGGERS_V12: [&str; 3] = sqlite_counter_triggers!(
    sqlite_pending!("NEW."),
    sqlite_pending!("OLD."),
    " WHEN NEW.tally_mark = 0",
    " WHEN NEW.tally_mark = OLD.tally_mark"
);

/// Version 12 lets SQLite's hottest statements count their own rows (issue #13). A row trigger runs a
/// sub-program per record with up to four counter upserts, and its upserts make every statement on `records`
/// keep a statement journal: about 5 µs of the single ledger thread per record at receipt and 6 µs at
/// completion (a quarter of a receipt's cost, close to half a completion's). A statement that knows
/// exactly what its rows change sets `tally_mark` (a new record inserted with 1; an update that adds 1 to
/// it), which the triggers skip, and adds the sum of its rows' changes to the counters itself, once per batch
/// and in the same transaction: a new record received (records, received and pending +1, the minute's
/// receipt), a first-time delivery (delivered +1, pending -1, the last delivery time) and a claim (nothing:
/// waiting before and after). Every other statement, including one typed by hand in `sqlite3`, leaves the mark
/// as it is and is counted by the triggers as before, so the counters still cannot drift from a recount.
const TALLY_MARK_DESCRIPTION: &str =
    "the hottest statements count their own rows; the triggers count every other statement";

const SQLITE_TALLY_MARK_STATEMENTS: [&str; 5] = [
    "ALTER TABLE records ADD COLUMN tally_mark INTEGER NOT NULL DEFAULT 0",
    "DROP TRIGGER records_counted_insert",
    "DROP TRIGGER records_counted_update",
    SQLITE_COUNTER_TRIGGERS_V12[0],
    SQLITE_COUNTER_TRIGGERS_V12[1],
];

/// Adds `(counter, change)` pairs to a flow's counters (shard 0) from inside a trigger without an upsert's
/// `DO UPDATE`: a missing counter row is inserted at 0 (`DO NOTHING` if it is there), then the changes are
/// added by an update. Neither statement reads a table it writes or tests an `IN` list, so neither builds a
/// temporary table. See `COUNTERS_WITHOUT_UPSERT_DESCRIPTION` for why.
macro_rules! sqlite_add_to_counters {
    ($flow:literal, $op:literal, $( ($counter:literal, $change:expr) ),+ $(,)?) => {
        concat!(
            "INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT ", $flow, ", column1, 0, 0 FROM (VALUES ",
                $( "('", $counter, "', ", $change, "), ", )+
                "('', 0)) WHERE column2 <> 0 ON CONFLICT DO NOTHING;
            UPDATE ledger_counters SET value = value ", $op, " CASE counter",
                $( " WHEN '", $counter, "' THEN ", $change, )+ " ELSE 0 END
                WHERE flow = ", $flow, " AND shard = 0 AND CASE counter",
                $( " WHEN '", $counter, "' THEN ", $change, )+ " ELSE 0 END <> 0;"
        )
    };
}

/// Adds `value` to one minute's count of `counter` (shard 0) when `condition` holds, the same way.
macro_rules! sqlite_add_to_window {
    ($minute:literal, $counter:literal, $value:literal, $condition:literal) => {
        concat!(
            "INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT NEW.flow, ",
            $minute,
            ", '",
            $counter,
            "', 0, 0 WHERE ",
            $condition,
            "
                ON CONFLICT DO NOTHING;
            UPDATE ledger_window SET value = value + ",
            $value,
            "
                WHERE flow = NEW.flow AND minute = ",
            $minute,
            " AND counter = '",
            $counter,
            "' AND shard = 0
                AND ",
            $condition,
            ";"
        )
    };
}

/// What one inserted (`NEW.`) or deleted (`OLD.`) record row counts toward each counter.
macro_rules! sqlite_row_contributions {
    ($flow:literal, $op:literal, $row:literal) => {
        sqlite_add_to_counters!(
            $flow,
            $op,
            ("records", "1"),
            ("received", concat!($row, "generation")),
            ("delivered", concat!("(", $row, "state = 'delivered')")),
            (
                "failed",
                concat!("(", $row, "first_failure_at IS NOT NULL)")
            ),
            ("retried", concat!($row, "retries")),
            (
                "dead_lettered",
                concat!("(", $row, "state = 'dead_lettered')")
            ),
            ("held", concat!("(", $row, "state = 'held')")),
            ("pending", sqlite_pending!($row)),
            (
                "mttr_sum_ms",
                concat!(
                    "(CASE WHEN ",
                    $row,
                    "state = 'delivered' AND ",
                    $row,
                    "first_failure_at IS NOT NULL \
                    THEN COALESCE(",
                    $row,
                    "delivered_at - ",
                    $row,
                    "first_failure_at, 0) ELSE 0 END)"
                )
            ),
            (
                "mttr_count",
                concat!(
                    "(",
                    $row,
                    "state = 'delivered' AND ",
                    $row,
                    "first_failure_at IS NOT NULL)"
                )
            ),
        )
    };
}

/// Version 13 on SQLite: the counter triggers of version 12, counting the same rows the same way, with each
/// upsert's `DO UPDATE` written as an insert of a missing row and an update. SQLite keeps a statement journal
/// (a copy of every page a statement changes, so that a failing statement can be undone alone) for a
/// statement that writes through a trigger and might abort, and a `DO UPDATE` always might: so did every
/// statement on `records`, whether the trigger then ran or not (its `WHEN` is tested per row; its program is
/// part of the statement). That was ~8 pages copied per received record: under callgrind, in the end-to-end
/// benchmark's 4,000 records, the ledger thread's receipts ran 415 M instructions with the journal and 326 M
/// without (-21 %), the whole worker 2.03 G and 1.93 G (-5 %). Without `DO UPDATE` in the triggers, a
/// statement that says `OR ROLLBACK` (a constraint failure then rolls the whole transaction back, which is
/// what the ledger does with any error anyway) keeps no journal; the ledger's hottest statements say it.
/// Version 14 on PostgreSQL: a claim and a completion update `records` in place (HOT).
///
/// PostgreSQL writes an updated row as a new version. When no indexed column changed and the page has room,
/// the indexes are left alone (a heap-only tuple); otherwise every index of the table gets a new entry. The
/// partial indexes that found waiting records, their age, holds and dead letters, and purgeable deliveries all
/// named `state` (and `next_attempt_at`, `delivered_at`), so each claim and each completion wrote four index
/// entries per record, the unique key's with its uniqueness check: a plain 100-record completion `UPDATE`
/// took 1.1-2.4 ms of database time on the 2-core machine, against 0.2-0.5 ms in place.
///
/// - Waiting records are found through `record_queue` (record, flow, due time, bucket, receipt time): a row
///   exactly while the record waits (received, validated, retry scheduled, delivering), its due time the
///   record's `next_attempt_at`. Statement triggers on `records` keep it, from the transition tables, for
///   every statement that inserts, updates or deletes records, whichever code (or older binary) runs it.
/// - Holds and dead letters are found through `attention`, a stored generated column that is NULL for every
///   other state: a completion from delivering to delivered changes no indexed value.
/// - Purgeable deliveries are found through the records not yet purged, by receipt time (a record is received
///   before it is delivered, so every delivery older than a cutoff was received before it too).
/// - New pages of `records` are left half empty (fillfactor 50), so a record's next versions fit on its page.
///
/// Adding the generated column rewrites `records` once, inside the migration's transaction: as long as a copy
/// of the table takes, while the flow's workers wait. Older binaries that keep running still work (the
/// triggers queue what any writer changes), with claims and purges that now scan `records`.
const IN_PLACE_DESCRIPTION: &str = "claims and completions update records in place: waiting records in record_queue, attention as a generated column";

/// The states in which a record waits for a delivery attempt, as `record_queue` holds them.
macro_rules! waiting {
    ($row:literal) => {
        concat!(
            $row,
            "state IN ('received', 'validated', 'retry_scheduled', 'delivering')"
        )
    };
}

/// The triggers that keep `record_queue`. Each reads its statement's transition table once and finds the
/// queue's rows by record through the primary key (`record_id = ANY(...)`, the only index that names the
/// record), with sequential scans off for the function: a plan with no join and one usable index cannot turn
/// into a scan of the queue per record, which a join of the transition tables with the queue did when
/// PL/pgSQL reused a plan made while the queue was nearly empty (a claim of 500 took a second). An update
/// takes every waiting record's entry out and puts the waiting ones back: a claim, a delivery, a retry and an
/// ingest of a new revision move every entry anyway, so telling the unmoved ones apart (a join of the old
/// rows with the new) would cost more than it saves.
macro_rules! queue_trigger_function {
    ($name:literal, $body:expr) => {
        concat!(
            "CREATE FUNCTION ",
            $name,
            "() RETURNS trigger LANGUAGE plpgsql SET enable_seqscan = off AS $$ BEGIN\n",
            $body,
            "RETURN NULL;\nEND $$"
        )
    };
}

/// Takes the entries of the waiting records among `old_rows` out of the queue.
macro_rules! unqueue_old_rows {
    () => {
        unqueue_old_rows!(waiting!(""))
    };
    ($($queued:tt)+) => {
        concat!(
            "DELETE FROM record_queue WHERE record_id = ANY(ARRAY(SELECT id FROM old_rows WHERE ",
            $($queued)+,
            "));\n"
        )
    };
}

/// Queues the waiting records among `new_rows`.
macro_rules! queue_new_rows {
    () => {
        queue_new_rows!(waiting!(""))
    };
    ($($queued:tt)+) => {
        concat!(
            "INSERT INTO record_queue (record_id, flow, due_at, bucket, received_at) \
             SELECT id, flow, next_attempt_at, bucket, received_at FROM new_rows WHERE ",
            $($queued)+,
            ";\n"
        )
    };
}

const POSTGRES_QUEUE_TRIGGERS: [&str; 6] = [
    queue_trigger_function!("meshline_queue_inserted", queue_new_rows!()),
    queue_trigger_function!(
        "meshline_queue_updated",
        concat!(unqueue_old_rows!(), queue_new_rows!())
    ),
    queue_trigger_function!("meshline_queue_deleted", unqueue_old_rows!()),
    "CREATE TRIGGER records_queued_insert AFTER INSERT ON records REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION meshline_queue_inserted()",
    "CREATE TRIGGER records_queued_update AFTER UPDATE ON records REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION meshline_queue_updated()",
    "CREATE TRIGGER records_queued_delete AFTER DELETE ON records REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION meshline_queue_deleted()",
];

const POSTGRES_IN_PLACE: [&str; 17] = [
    // One row per waiting record (`record_id` is the key the triggers find it by); claims read it in due
    // order through `record_queue_due`, the backlog's age through `record_queue_age`.
    "CREATE TABLE record_queue (
        record_id BIGINT PRIMARY KEY,
        flow TEXT NOT NULL,
        due_at BIGINT NOT NULL,
        bucket BIGINT NOT NULL,
        received_at BIGINT NOT NULL
    )",
    // Not `(flow, due_at, record_id)`: an index that names `record_id` after other columns was what a
    // cached trigger plan, made while the queue was nearly empty, chose for `record_id = ANY(...)`, and
    // PostgreSQL 15 scans such an index whole once per array element (95,000 buffers for a claim of 500).
    // Equal due times come in the index's own order, the order their rows were queued in.
    "CREATE INDEX record_queue_due ON record_queue (flow, due_at)",
    "CREATE INDEX record_queue_age ON record_queue (flow, received_at)",
    concat!(
        "INSERT INTO record_queue (record_id, flow, due_at, bucket, received_at) \
         SELECT id, flow, next_attempt_at, bucket, received_at FROM records WHERE ",
        waiting!("")
    ),
    POSTGRES_QUEUE_TRIGGERS[0],
    POSTGRES_QUEUE_TRIGGERS[1],
    POSTGRES_QUEUE_TRIGGERS[2],
    POSTGRES_QUEUE_TRIGGERS[3],
    POSTGRES_QUEUE_TRIGGERS[4],
    POSTGRES_QUEUE_TRIGGERS[5],
    "ALTER TABLE records ADD COLUMN attention TEXT GENERATED ALWAYS AS \
     (CASE WHEN state IN ('held', 'dead_lettered') THEN state END) STORED",
    "DROP INDEX records_attention",
    "CREATE INDEX records_attention ON records (flow, attention, id) WHERE attention IS NOT NULL",
    "CREATE INDEX records_unpurged ON records (flow, received_at) WHERE purged_at IS NULL",
    "DROP INDEX records_claimable, records_pending_age, records_purgeable",
    "ALTER TABLE records SET (fillfactor = 50)",
    "ANALYZE record_queue",
];

/// The update trigger's function (version 15, and the versions after it that change what it does). Each
/// version adds its own flags (read from the statement's transition tables in the one pass the counters make)
/// and the blocks they gate; `queued` is which rows have an entry in `record_queue`.
macro_rules! records_updated_function {
    (
        create: $create:literal,
        preamble: $preamble:literal,
        queued: [$($queued:tt)+],
        declare: $declare:expr,
        aggregates: $aggregates:expr,
        columns: $columns:literal,
        flags: $flags:expr,
        into: $into:expr,
        blocks: [$($blocks:tt)+] $(,)?
    ) => {
    concat!(
        $create, " FUNCTION meshline_records_updated() RETURNS trigger LANGUAGE plpgsql SET enable_seqscan = off AS $$
        DECLARE
            has_window_events BOOLEAN;
            has_unqueued BOOLEAN;
            has_queued BOOLEAN;
            has_moved_deliveries BOOLEAN;
", $declare, "        BEGIN
", $preamble, "            -- The counters: new rows count, old rows count back. `last_delivery_at` takes the newest delivery
            -- time among the new rows (a row whose delivery time did not change was counted when it was set,
            -- and the counter keeps the greatest value anyway).
            WITH changes AS MATERIALIZED (
                SELECT flow,
                    ARRAY[SUM(sign), SUM(sign * generation),
                        SUM(sign * (state = 'delivered')::INT),
                        SUM(sign * (first_failure_at IS NOT NULL)::INT),
                        SUM(sign * retries),
                        SUM(sign * (state = 'dead_lettered')::INT),
                        SUM(sign * (state = 'held')::INT),
                        SUM(sign * (", waiting!(""), ")::INT),
                        SUM(sign * CASE WHEN state = 'delivered' AND first_failure_at IS NOT NULL
                            THEN COALESCE(delivered_at - first_failure_at, 0) ELSE 0 END),
                        SUM(sign * (state = 'delivered' AND first_failure_at IS NOT NULL)::INT),
                        MAX(CASE WHEN sign = 1 THEN delivered_at END)]::BIGINT[] AS sums,
                    bool_or(sign = -1 AND ", $($queued)+, ") AS unqueued,
                    bool_or(sign = 1 AND ", $($queued)+, ") AS queued,
                    bool_or(sign = -1 AND state = 'delivered' AND delivered_event IS NOT NULL
                        AND purged_at IS NULL) AS moved_deliveries", $aggregates, "
                FROM (
                    SELECT 1 AS sign, flow, state, generation, retries, first_failure_at, delivered_at,
                        delivered_event, purged_at", $columns, " FROM new_rows
                    UNION ALL
                    SELECT -1, flow, state, generation, retries, first_failure_at, delivered_at,
                        delivered_event, purged_at", $columns, " FROM old_rows
                ) AS r GROUP BY flow
            ),
            counted AS (
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT c.flow, k.counter, pg_backend_pid(), k.value FROM changes c,
                    UNNEST(ARRAY['records', 'received', 'delivered', 'failed', 'retried', 'dead_lettered', 'held',
                        'pending', 'mttr_sum_ms', 'mttr_count', 'last_delivery_at'], c.sums) AS k(counter, value)
                WHERE k.value <> 0 ORDER BY 1, 2
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = CASE
                    WHEN EXCLUDED.counter = 'last_delivery_at' THEN GREATEST(ledger_counters.value, EXCLUDED.value)
                    ELSE ledger_counters.value + EXCLUDED.value END
            )
            -- The window's events need each row's old and new version side by side; there are some exactly when
            -- the statement received a revision (a generation only grows) or a first failure (only ever set on a
            -- row that keeps it until its next revision), so a claim or a clean completion skips the join.
            SELECT COALESCE(bool_or(sums[2] <> 0 OR sums[4] <> 0), FALSE), COALESCE(bool_or(unqueued), FALSE),
                COALESCE(bool_or(queued), FALSE), COALESCE(bool_or(moved_deliveries), FALSE)", $flags, "
            INTO has_window_events, has_unqueued, has_queued, has_moved_deliveries", $into, " FROM changes;
            IF has_window_events THEN
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT flow, minute, counter, pg_backend_pid(), SUM(value) FROM (
                    SELECT n.flow, n.received_at / 60000 AS minute, 'received' AS counter,
                        n.generation - o.generation AS value
                    FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE n.generation > o.generation
                    UNION ALL
                    SELECT n.flow, n.first_failure_at / 60000, 'failed', 1
                    FROM new_rows n JOIN old_rows o ON o.id = n.id
                    WHERE o.first_failure_at IS NULL AND n.first_failure_at IS NOT NULL
                ) AS events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = ledger_window.value + EXCLUDED.value;
            END IF;
            IF has_unqueued THEN
                ", unqueue_old_rows!($($queued)+), "
            END IF;
            IF has_queued THEN
                ", queue_new_rows!($($queued)+), "
            END IF;
            -- A delivered row that moves on (a new revision, a new state) first writes out its delivery's
            -- event, under the id reserved at delivery, unless it is stored already; a compaction drops it.
            IF has_moved_deliveries THEN
                INSERT INTO lineage (id, record_id, generation, at, step, detail, correlation_id)
                SELECT o.delivered_event, o.id, o.generation, o.delivered_at, 'delivered',
                    json_build_object('fence', o.fence)::text, o.correlation_id
                FROM old_rows o JOIN new_rows n ON n.id = o.id
                WHERE o.state = 'delivered' AND o.delivered_event IS NOT NULL AND o.purged_at IS NULL
                AND n.purged_at IS NULL AND (n.state <> 'delivered' OR n.generation <> o.generation
                    OR n.delivered_event IS DISTINCT FROM o.delivered_event)
                AND NOT EXISTS (SELECT 1 FROM lineage l WHERE l.record_id = o.id AND l.id = o.delivered_event);
            END IF;
", $($blocks)+, "            RETURN NULL;
        END $$"
    )
    };
}

/// Version 15 on PostgreSQL: a delivery's lineage event lives in its record's row until the row moves on.
///
/// A completion wrote a `delivered` lineage row per record: a heap row and two index entries, ~0.3 ms of
/// database time per 100 records, for an event whose every field the record's row holds anyway (delivery time,
/// generation, fence, correlation id). The completion now reserves the event's lineage id from the lineage
/// sequence into `records.delivered_event` instead, and reading a record's lineage adds the event from the
/// row, in its place among the stored events by that id. When a statement changes a delivered row so that
/// the event would no longer read from it (a new revision, a new state), the records update trigger first
/// writes the event to `lineage` with its reserved id, from the statement's old rows: whichever code (or older
/// binary) runs the statement, the story stays whole and in order. The insert skips an event already stored
/// (found through `lineage_record`, since `lineage` has no key on its id alone: version 10), and reading skips
/// a row's event that is stored, so an event is never told twice. A purge that compacts
/// the record drops the event with the rest of its lineage. Adding the column rewrites nothing.
const DELIVERED_EVENT_DESCRIPTION: &str = "a delivery's lineage event kept in its record's row (delivered_event) until the row moves on; one update trigger for counters, queue and events";

/// Version 15 also runs one trigger per update statement instead of two. The counters' trigger (version 6)
/// and the queue's (version 14) each started a PL/pgSQL call and ran their statements whether or not they had
/// anything to do: seven statements per completion, a third of its database time. `meshline_records_updated`
/// reads the transition tables once for the counters (the newest delivery time among them, which was a
/// statement of its own) and for what else the statement needs: the window's events, taking waiting records
/// out of the queue and putting them in, writing delivered events out. A completion of deliveries runs two
/// statements, a claim three.
const POSTGRES_DELIVERED_EVENT: [&str; 7] = [
    "ALTER TABLE records ADD COLUMN delivered_event BIGINT",
    records_updated_function!(
        create: "CREATE",
        preamble: "",
        queued: [waiting!("")],
        declare: "",
        aggregates: "",
        columns: "",
        flags: "",
        into: "",
        blocks: [""],
    ),
    "DROP TRIGGER records_counted_update ON records",
    "DROP TRIGGER records_queued_update ON records",
    "CREATE TRIGGER records_updated AFTER UPDATE ON records REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION meshline_records_updated()",
    "DROP FUNCTION meshline_count_updated()",
    "DROP FUNCTION meshline_queue_updated()",
];

/// Version 16 on PostgreSQL: a claim writes its records' rows and nothing per record besides.
///
/// A claim of 500 took ~1.4 ms of database time per 100 records on a quiet machine (the budget is 1 ms), and
/// most of it was two writes per record that a record's own row can stand in for. Per record it wrote ~9.5
/// WAL records and touched ~32 buffers: the row lock and the row's update, a `claimed` lineage row (a heap row
/// and two index entries), and the queue's row taken out and put back due at the lease's end (a heap row and
/// three index entries), so an expired lease would be found again.
///
/// - **A claim's event lives in its record's row**, as a delivery's does (version 15): `claimed_event` (its
///   lineage id, reserved from the lineage sequence), `claimed_at`, `claimed_by`, `claimed_until` and
///   `claimed_over` (the worker it was taken over from), with the row's fence and attempts. Reading a record's
///   lineage adds it in its place. Every change to what the event reads moves the row's fence or its
///   generation (a claim, a release, a new revision), and when a statement does, the update trigger first
///   writes the event out to `lineage` with its reserved id, unless it is stored already. A record that the
///   intake leases as it stores it still gets a `claimed` lineage row: that row must come after its
///   `received` row, which is inserted after the record.
/// - **Leases are registered per claim, not queued per record.** `record_queue` now holds the records that
///   can be claimed once due: received, validated or retry-scheduled, or delivering with no lease (released,
///   or its lease lapsed). A leased record is listed instead in `record_leases`, one row per owner and expiry
///   (the insert and update triggers write it for each statement that leases, whichever code leased, and add
///   to the row a statement of the same owner and expiry wrote before). A claim
///   first takes the registrations that have expired (`SKIP LOCKED`, so replicas share them), clears the
///   lease of those of their records still delivering under it (waiting for their locks, in id order: a
///   record skipped here would be found by no one), which queues them, and deletes the registrations. The
///   old holder can still complete until someone claims the record, as before.
/// - A completion of leased records no longer touches the queue; it counts down their registration (`held`),
///   which goes once none of its records is held under it, so the registrations stay as few as the claims in
///   flight. The oldest waiting record is read from the queue and from the records of the registrations.
///
/// The migration lists the records leased now in `record_leases` and takes them out of the queue. A worker of
/// version 15 refuses a ledger of version 16; upgrade a flow's workers together.
const CLAIM_IN_PLACE_DESCRIPTION: &str = "a claim's event kept in its record's row (claimed_*); leased records registered per claim in record_leases instead of re-queued";

/// Which records have an entry in `record_queue` from version 16: those that can be claimed once due.
macro_rules! queued_v16 {
    () => {
        "(state IN ('received', 'validated', 'retry_scheduled') OR (state = 'delivering' AND lease_expires_at IS NULL))"
    };
}

/// Registers the leased records among `new_rows`, one row per flow, owner and expiry.
macro_rules! register_new_leases {
    () => {
        "INSERT INTO record_leases (flow, owner, expires_at, record_ids, held) \
         SELECT flow, COALESCE(lease_owner, ''), lease_expires_at, array_agg(id ORDER BY id), COUNT(*) FROM new_rows \
         WHERE state = 'delivering' AND lease_expires_at IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
         ON CONFLICT (flow, expires_at, owner) DO UPDATE SET \
         record_ids = record_leases.record_ids || EXCLUDED.record_ids, held = record_leases.held + EXCLUDED.held;\n"
    };
}

/// The insert trigger's function from version 16 on (queue the waiting records, register the leased ones), with
/// what version 18 adds after that (`extra`).
macro_rules! queue_inserted_v16 {
    ($extra:expr) => {
        concat!(
            "CREATE OR REPLACE FUNCTION meshline_queue_inserted() RETURNS trigger LANGUAGE plpgsql \
             SET enable_seqscan = off AS $$ BEGIN\n",
            queue_new_rows!(queued_v16!()),
            register_new_leases!(),
            $extra,
            "RETURN NULL;\nEND $$"
        )
    };
}

/// The delete trigger's function from version 16 on (unqueue the waiting records), with what version 18 adds
/// after that (`extra`).
macro_rules! queue_deleted_v16 {
    ($extra:expr) => {
        concat!(
            "CREATE OR REPLACE FUNCTION meshline_queue_deleted() RETURNS trigger LANGUAGE plpgsql \
             SET enable_seqscan = off AS $$ BEGIN\n",
            unqueue_old_rows!(queued_v16!()),
            $extra,
            "RETURN NULL;\nEND $$"
        )
    };
}

/// The update trigger's function from version 16 on, with what version 17 runs before it (`preamble`) and what
/// version 18 adds to its declarations, its one pass over the rows, its flags and its blocks.
macro_rules! records_updated_v16 {
    ($preamble:literal) => {
        records_updated_v16!($preamble, declare: "", aggregates: "", flags: "", into: "", blocks: "")
    };
    (
        $preamble:literal,
        declare: $declare:expr,
        aggregates: $aggregates:expr,
        flags: $flags:expr,
        into: $into:expr,
        blocks: $blocks:expr $(,)?
    ) => {
        records_updated_function!(
            create: "CREATE OR REPLACE",
            preamble: $preamble,
            queued: [queued_v16!()],
            declare: concat!("            has_moved_claims BOOLEAN;\n            has_leases BOOLEAN;\n            has_unleased BOOLEAN;\n            emptied BIGINT[];\n", $declare),
            aggregates: concat!(",
                        -- A claim's event reads the row's fence, attempts, generation and claim columns; every
                        -- change to them moves the fence or the generation, which only ever grow, so a sum over
                        -- the statement tells whether any row's did.
                        bool_or(sign = -1 AND claimed_event IS NOT NULL AND purged_at IS NULL) AS moved_claims,
                        SUM(sign * fence) <> 0 AS fenced,
                        bool_or(sign = 1 AND state = 'delivering' AND lease_expires_at IS NOT NULL) AS leased,
                        bool_or(sign = -1 AND state = 'delivering' AND lease_expires_at IS NOT NULL) AS was_leased", $aggregates),
            columns: ", fence, claimed_event, lease_expires_at",
            flags: concat!(",
                    COALESCE(bool_or(moved_claims AND (fenced OR sums[2] <> 0)), FALSE),
                    COALESCE(bool_or(leased AND fenced), FALSE), COALESCE(bool_or(was_leased), FALSE)", $flags),
            into: concat!(", has_moved_claims, has_leases, has_unleased", $into),
            blocks: ["            -- A claimed row that moves on first writes out its claim's event, under the id reserved at
                -- the claim, unless it is stored already.
                IF has_moved_claims THEN
                    INSERT INTO lineage (id, record_id, generation, at, step, detail, correlation_id)
                    SELECT o.claimed_event, o.id, o.generation, o.claimed_at, 'claimed',
                        json_build_object('worker', o.claimed_by, 'fence', o.fence, 'attempt', o.attempts,
                            'lease_expires_at', o.claimed_until, 'taken_over_from', o.claimed_over)::text,
                        o.correlation_id
                    FROM old_rows o JOIN new_rows n ON n.id = o.id
                    WHERE o.claimed_event IS NOT NULL AND o.purged_at IS NULL AND n.purged_at IS NULL
                    AND (n.claimed_event, n.claimed_at, n.generation, n.fence, n.attempts, n.correlation_id)
                        IS DISTINCT FROM (o.claimed_event, o.claimed_at, o.generation, o.fence, o.attempts, o.correlation_id)
                    AND NOT EXISTS (SELECT 1 FROM lineage l WHERE l.record_id = o.id AND l.id = o.claimed_event);
                END IF;
                -- A statement that leased records (a claim moves their fence) registers them.
                IF has_leases THEN
                    ", register_new_leases!(), "
                END IF;
                -- Records no longer held under their lease (delivered, failed, released, a new revision) count
                -- down their registration, which goes once it holds none: the registrations stay as few as the
                -- claims in flight, and reading the oldest waiting record through them stays cheap. A registration
                -- locked elsewhere is skipped, never waited for (a claim taking expired ones waits for records this
                -- statement holds): it is then left to expire, and the claim that finds it deletes it.
                IF has_unleased THEN
                    -- Per owner and expiry, the records held under it in the new rows less those in the old: a
                    -- record that stays held under its lease counts +1 - 1, one that left -1.
                    WITH unleased AS (
                        SELECT flow, owner, expires_at, -SUM(sign) AS n FROM (
                            SELECT 1 AS sign, flow, COALESCE(lease_owner, '') AS owner, lease_expires_at AS expires_at
                            FROM new_rows WHERE state = 'delivering' AND lease_expires_at IS NOT NULL
                            UNION ALL
                            SELECT -1, flow, COALESCE(lease_owner, ''), lease_expires_at
                            FROM old_rows WHERE state = 'delivering' AND lease_expires_at IS NOT NULL
                        ) AS held GROUP BY 1, 2, 3 HAVING SUM(sign) < 0
                    ),
                    counted_down AS (
                        UPDATE record_leases l SET held = l.held - u.n FROM unleased u
                        WHERE l.id IN (SELECT l2.id FROM record_leases l2 JOIN unleased u2 ON l2.flow = u2.flow
                            AND l2.expires_at = u2.expires_at AND l2.owner = u2.owner ORDER BY l2.id
                            FOR NO KEY UPDATE OF l2 SKIP LOCKED)
                        AND l.flow = u.flow AND l.expires_at = u.expires_at AND l.owner = u.owner
                        RETURNING l.id, l.held
                    )
                    SELECT array_agg(id) INTO emptied FROM counted_down WHERE held <= 0;
                    IF emptied IS NOT NULL THEN
                        DELETE FROM record_leases WHERE id = ANY(emptied);
                    END IF;
                END IF;
    ", $blocks],
        )
    };
}

const POSTGRES_CLAIM_IN_PLACE: [&str; 8] = [
    "ALTER TABLE records ADD COLUMN claimed_event BIGINT, ADD COLUMN claimed_at BIGINT, \
     ADD COLUMN claimed_until BIGINT, ADD COLUMN claimed_by TEXT, ADD COLUMN claimed_over TEXT, \
     SET (fillfactor = 40)",
    "CREATE TABLE record_leases (
        id BIGSERIAL PRIMARY KEY,
        flow TEXT NOT NULL,
        owner TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        record_ids BIGINT[] NOT NULL,
        held BIGINT NOT NULL,
        UNIQUE (flow, expires_at, owner)
    )",
    "INSERT INTO record_leases (flow, owner, expires_at, record_ids, held) \
     SELECT flow, COALESCE(lease_owner, ''), lease_expires_at, array_agg(id ORDER BY id), COUNT(*) FROM records \
     WHERE state = 'delivering' AND lease_expires_at IS NOT NULL GROUP BY 1, 2, 3",
    "DELETE FROM record_queue WHERE record_id IN \
     (SELECT id FROM records WHERE state = 'delivering' AND lease_expires_at IS NOT NULL)",
    // The receipt time of a flow's oldest waiting record: the queue's oldest entry (one probe of
    // `record_queue_age`) and the records of the registrations (one probe per record in flight), never a scan
    // of `records`, which a plan made with a young table's statistics chose (5 ms per read of the counts).
    "CREATE FUNCTION meshline_oldest_pending(flow_name TEXT) RETURNS BIGINT LANGUAGE sql STABLE \
     SET enable_seqscan = off AS $$ \
     SELECT MIN(received_at) FROM ( \
       (SELECT received_at FROM record_queue WHERE flow = flow_name ORDER BY received_at LIMIT 1) \
       UNION ALL \
       SELECT (SELECT MIN(r.received_at) FROM records r WHERE r.id = ANY(l.record_ids) AND r.state = 'delivering') \
       FROM record_leases l WHERE l.flow = flow_name) AS oldest $$",
    queue_inserted_v16!(""),
    queue_deleted_v16!(""),
    records_updated_v16!(""),
];

/// Version 17 on PostgreSQL: a completion of deliveries counts its own records, and its trigger call does nothing.
///
/// The update trigger (version 15) reads every statement's old and new rows for the counters, the window, the
/// queue and the lease registrations: ~1.3 ms of database time per 500 records completed, a third of a
/// completion of deliveries, for a change that is the same for every record (`delivering` under its claim's
/// lease to `delivered`). The completion now updates only the records it can count without reading them back:
/// held under the lease their claim's event names (`lease_owner = claimed_by AND lease_expires_at =
/// claimed_until`, tested on each row's newest version). For those it adds to the counters (delivered, pending,
/// the time to recover of those that had failed, the newest delivery) and counts down their registrations in
/// the statement itself, and it tells the trigger so in a transaction-local setting, `meshline.self_counted`,
/// which the trigger's call for that statement clears before it returns. A batch commits that way only if
/// every record qualified and was updated under the claim it names; any other batch (a lease lapsed and
/// cleared, a record leased by an older binary, a stale claim) rolls back and runs as an update the trigger
/// counts, as does every other statement.
///
/// A record the intake leases as it stores it keeps its claim's event in its row too (its `claimed` lineage row
/// was ~17,500 of 37,500 lineage rows per 20,000 records in the end-to-end bench): the ingest reserves the
/// record's `received` event id before the claim's, so the story reads in order. No table changes.
const SELF_COUNTED_DESCRIPTION: &str = "a completion of deliveries under their claims' leases counts its own records (meshline.self_counted); the intake's claim event kept in its record's row";

const POSTGRES_SELF_COUNTED: [&str; 1] = [records_updated_v16!(
    "            -- A statement that counted its own rows (a completion of deliveries, schema version 17) says so
            -- in this transaction-local setting; its own call of this trigger clears it and does nothing else.
            IF current_setting('meshline.self_counted', true) = 'on' THEN
                PERFORM set_config('meshline.self_counted', '', true);
                RETURN NULL;
            END IF;
"
)];

/// The states people page through (holds, dead letters), as PostgreSQL's triggers test them for
/// `record_attention` (version 18); the same words as [`super::ATTENTION`].
macro_rules! attention {
    () => {
        "state IN ('held', 'dead_lettered')"
    };
}

/// Version 18 on PostgreSQL: holds and dead letters are listed from a table of their own, `record_attention`,
/// not through a generated column of `records`.
///
/// Version 14 indexed them through `attention`, a stored column generated from `state`, so that a claim or a
/// completion (which changes `state` but not `attention`) could still update a record in place. But every
/// update of a record computed the column again and built the row a second time with it: under `valgrind`, a
/// completion of deliveries ran 56,600 instructions per record with the column and 47,700 without it (-16 %),
/// and a claim 7 % fewer. Now `record_attention` holds one row per held or dead-lettered record (record, flow,
/// state), kept by the records triggers from the statement's transition tables whichever statement (or code)
/// moves a record into or out of those states: the update trigger re-lists the rows of a statement whose old or
/// new rows include one in those states (a flag of its one pass over the rows, so a claim or a completion of
/// deliveries does nothing more), the insert and delete triggers list and unlist them. A completion of
/// deliveries that counts its own records (version 17) never touches those states. Listing holds and dead
/// letters, replaying dead letters by reason and purging them read `record_attention` in `(flow, state,
/// record_id)` order and lock the records they name, testing each record's state again under the lock.
///
/// The migration lists the current holds and dead letters and drops the column (and its index), which
/// rewrites nothing. A worker of version 17 refuses a ledger of version 18; upgrade a flow's workers together.
const ATTENTION_TABLE_DESCRIPTION: &str = "holds and dead letters listed in record_attention, kept by the records triggers, instead of a generated column";

const POSTGRES_ATTENTION_TABLE: [&str; 7] = [
    "CREATE TABLE record_attention (
        record_id BIGINT PRIMARY KEY,
        flow TEXT NOT NULL,
        state TEXT NOT NULL
    )",
    "CREATE INDEX record_attention_listing ON record_attention (flow, state, record_id)",
    "INSERT INTO record_attention (record_id, flow, state) SELECT id, flow, state FROM records WHERE attention IS NOT NULL",
    "ALTER TABLE records DROP COLUMN attention",
    queue_inserted_v16!(concat!(
        "INSERT INTO record_attention (record_id, flow, state) SELECT id, flow, state FROM new_rows WHERE ",
        attention!(),
        ";\n"
    )),
    queue_deleted_v16!(concat!(
        "DELETE FROM record_attention WHERE record_id = ANY(ARRAY(SELECT id FROM old_rows WHERE ",
        attention!(),
        "));\n"
    )),
    records_updated_v16!(
        "            -- A statement that counted its own rows (a completion of deliveries, schema version 17) says so
            -- in this transaction-local setting; its own call of this trigger clears it and does nothing else.
            IF current_setting('meshline.self_counted', true) = 'on' THEN
                PERFORM set_config('meshline.self_counted', '', true);
                RETURN NULL;
            END IF;
",
        declare: "            has_attention BOOLEAN;\n",
        aggregates: concat!(",
                        -- A row in a state people page through, old or new: the statement re-lists its rows.
                        bool_or(", attention!(), ") AS attention"),
        flags: ", COALESCE(bool_or(attention), FALSE)",
        into: ", has_attention",
        blocks: concat!("            -- Holds and dead letters are listed in `record_attention` (version 18): the old rows in
                -- those states leave it and the new ones enter it.
                IF has_attention THEN
                    DELETE FROM record_attention WHERE record_id = ANY(ARRAY(SELECT id FROM old_rows WHERE ", attention!(), "));
                    INSERT INTO record_attention (record_id, flow, state)
                    SELECT id, flow, state FROM new_rows WHERE ", attention!(), ";
                END IF;
"),
    ),
];

const COUNTERS_WITHOUT_UPSERT_DESCRIPTION: &str =
    "counter triggers without DO UPDATE, so the hottest statements keep no statement journal";

const SQLITE_COUNTER_TRIGGERS_V13: [&str; 3] = [
    concat!(
        "CREATE TRIGGER records_counted_insert AFTER INSERT ON records WHEN NEW.tally_mark = 0 BEGIN
        ",
        sqlite_row_contributions!("NEW.flow", "+", "NEW."),
        sqlite_add_to_window!("NEW.received_at / 60000", "received", "NEW.generation", "true"),
        "
        END"
    ),
    concat!(
        "CREATE TRIGGER records_counted_update
        AFTER UPDATE OF state, generation, first_failure_at, retries, delivered_at ON records
        WHEN NEW.tally_mark = OLD.tally_mark BEGIN
        ",
        sqlite_add_to_counters!(
            "NEW.flow",
            "+",
            ("received", "(NEW.generation - OLD.generation)"),
            (
                "delivered",
                "((NEW.state = 'delivered') - (OLD.state = 'delivered'))"
            ),
            (
                "failed",
                "((NEW.first_failure_at IS NOT NULL) - (OLD.first_failure_at IS NOT NULL))"
            ),
            ("retried", "(NEW.retries - OLD.retries)"),
            (
                "dead_lettered",
                "((NEW.state = 'dead_lettered') - (OLD.state = 'dead_lettered'))"
            ),
            ("held", "((NEW.state = 'held') - (OLD.state = 'held'))"),
            (
                "pending",
                concat!(
                    "(",
                    sqlite_pending!("NEW."),
                    " - ",
                    sqlite_pending!("OLD."),
                    ")"
                )
            ),
            (
                "mttr_sum_ms",
                "(CASE WHEN NEW.state = 'delivered' AND NEW.first_failure_at IS NOT NULL \
                THEN COALESCE(NEW.delivered_at - NEW.first_failure_at, 0) ELSE 0 END \
                - CASE WHEN OLD.state = 'delivered' AND OLD.first_failure_at IS NOT NULL \
                THEN COALESCE(OLD.delivered_at - OLD.first_failure_at, 0) ELSE 0 END)"
            ),
            (
                "mttr_count",
                "((NEW.state = 'delivered' AND NEW.first_failure_at IS NOT NULL) \
                - (OLD.state = 'delivered' AND OLD.first_failure_at IS NOT NULL))"
            ),
        ),
        "
        INSERT INTO ledger_counters (flow, counter, shard, value)
            SELECT NEW.flow, 'last_delivery_at', 0, NEW.delivered_at
            WHERE NEW.delivered_at IS NOT NULL AND NEW.delivered_at IS NOT OLD.delivered_at
            ON CONFLICT DO NOTHING;
        UPDATE ledger_counters SET value = MAX(value, NEW.delivered_at)
            WHERE flow = NEW.flow AND counter = 'last_delivery_at' AND shard = 0
            AND NEW.delivered_at IS NOT NULL AND NEW.delivered_at IS NOT OLD.delivered_at;
        ",
        sqlite_add_to_window!(
            "NEW.received_at / 60000",
            "received",
            "NEW.generation - OLD.generation",
            "NEW.generation > OLD.generation"
        ),
        sqlite_add_to_window!(
            "NEW.first_failure_at / 60000",
            "failed",
            "1",
            "OLD.first_failure_at IS NULL AND NEW.first_failure_at IS NOT NULL"
        ),
        "
        END"
    ),
    concat!(
        "CREATE TRIGGER records_counted_delete AFTER DELETE ON records BEGIN
        ",
        sqlite_row_contributions!("OLD.flow", "-", "OLD."),
        "
        END"
    ),
];

const SQLITE_COUNTERS_WITHOUT_UPSERT_STATEMENTS: [&str; 6] = [
    "DROP TRIGGER records_counted_insert",
    "DROP TRIGGER records_counted_update",
    "DROP TRIGGER records_counted_delete",
    SQLITE_COUNTER_TRIGGERS_V13[0],
    SQLITE_COUNTER_TRIGGERS_V13[1],
    SQLITE_COUNTER_TRIGGERS_V13[2],
];

/// Version 10 on SQLite: the waiting-state test as comparisons in the partial indexes and counter triggers.
const SQLITE_PENDING_STATEMENTS: [&str; 10] = [
    "DROP INDEX records_due",
    concat!(
        "CREATE INDEX records_due ON records (flow, next_attempt_at) WHERE ",
        sqlite_pending!()
    ),
    "DROP INDEX records_pending_age",
    concat!(
        "CREATE INDEX records_pending_age ON records (flow, received_at) WHERE ",
        sqlite_pending!()
    ),
    "DROP TRIGGER records_counted_insert",
    "DROP TRIGGER records_counted_update",
    "DROP TRIGGER records_counted_delete",
    SQLITE_COUNTER_TRIGGERS_V10[0],
    SQLITE_COUNTER_TRIGGERS_V10[1],
    SQLITE_COUNTER_TRIGGERS_V10[2],
];

/// The oldest waiting record in one index probe (`ORDER BY received_at LIMIT 1` over the pending rows).
const PENDING_AGE_INDEX: &str = "CREATE INDEX records_pending_age ON records (flow, received_at) \
    WHERE state IN ('received', 'validated', 'retry_scheduled', 'delivering')";

/// Delivered records whose payload and lineage are still kept, oldest delivery first: the purge's queue.
const PURGEABLE_INDEX: &str = "CREATE INDEX records_purgeable ON records (flow, delivered_at) \
    WHERE state = 'delivered' AND purged_at IS NULL";

/// The backfill of version 4, the same text on both backends: what the triggers would have counted had
/// they always been there, and the event minutes of the hour before the newest receipt (older minutes lie
/// outside every window the ledger reads).
macro_rules! counters_backfill {
    (totals) => {
        "WITH totals AS MATERIALIZED (
            SELECT flow, COUNT(*) AS records, SUM(generation) AS received,
                COUNT(*) FILTER (WHERE state = 'delivered') AS delivered,
                COUNT(*) FILTER (WHERE first_failure_at IS NOT NULL) AS failed,
                SUM(retries) AS retried,
                COUNT(*) FILTER (WHERE state = 'dead_lettered') AS dead_lettered,
                COUNT(*) FILTER (WHERE state = 'held') AS held,
                COUNT(*) FILTER (WHERE state IN ('received', 'validated', 'retry_scheduled', 'delivering'))
                    AS pending,
                SUM(CASE WHEN state = 'delivered' AND first_failure_at IS NOT NULL
                    THEN COALESCE(delivered_at - first_failure_at, 0) ELSE 0 END) AS mttr_sum_ms,
                COUNT(*) FILTER (WHERE state = 'delivered' AND first_failure_at IS NOT NULL) AS mttr_count,
                MAX(delivered_at) AS last_delivery_at
            FROM records GROUP BY flow
        )
        INSERT INTO ledger_counters (flow, counter, shard, value)
        SELECT flow, counter, 0, value FROM (
            SELECT flow, 'records' AS counter, records AS value FROM totals
            UNION ALL SELECT flow, 'received', received FROM totals
            UNION ALL SELECT flow, 'delivered', delivered FROM totals
            UNION ALL SELECT flow, 'failed', failed FROM totals
            UNION ALL SELECT flow, 'retried', retried FROM totals
            UNION ALL SELECT flow, 'dead_lettered', dead_lettered FROM totals
            UNION ALL SELECT flow, 'held', held FROM totals
            UNION ALL SELECT flow, 'pending', pending FROM totals
            UNION ALL SELECT flow, 'mttr_sum_ms', mttr_sum_ms FROM totals
            UNION ALL SELECT flow, 'mttr_count', mttr_count FROM totals
            UNION ALL SELECT flow, 'last_delivery_at', last_delivery_at FROM totals
            UNION ALL SELECT flow, 'manual_interventions', COUNT(*) FROM interventions GROUP BY flow
        ) AS backfill WHERE value IS NOT NULL AND value <> 0"
    };
    (window_received) => {
        "INSERT INTO ledger_window (flow, minute, counter, shard, value)
        SELECT flow, received_at / 60000, 'received', 0, COUNT(*) FROM records
        WHERE received_at >= (SELECT MAX(received_at) - 3600000 FROM records)
        GROUP BY flow, received_at / 60000"
    };
    (window_failed) => {
        "INSERT INTO ledger_window (flow, minute, counter, shard, value)
        SELECT flow, first_failure_at / 60000, 'failed', 0, COUNT(*) FROM records
        WHERE first_failure_at >= (SELECT MAX(received_at) - 3600000 FROM records)
        GROUP BY flow, first_failure_at / 60000"
    };
}

/// Version 5 orders a record's revisions: each record keeps the ordering value of its current revision (the
/// contract's `spec.ordering` field) so a late, older revision is recognised as stale, and counts the stale
/// revisions it refused. On PostgreSQL it also adds the delivery slots that share a flow's ERP concurrency
/// limit between replicas (see `PostgresLedger::acquire_slots`).
const ORDERING_DESCRIPTION: &str =
    "ordering value and stale revisions per record; delivery slots shared by replicas";

/// Version 6 makes a claim and a completion cheap at throughput (issue #13: ~10 ms of PostgreSQL time per
/// 100 records each, measured with `pg_stat_statements` by `benches/ledger.rs`). On PostgreSQL:
///
/// - The counter triggers aggregate a statement's rows in one pass over its transition tables. Version 4
///   called `meshline_contributions` twice per changed row (a SQL function, not inlined into a LATERAL join,
///   so each call ran the function executor) and joined old to new rows for the window's events: three
///   quarters of a claim's and almost all of a completion's database time. The window's join now runs only
///   when the statement can have such events (a generation went up, or a row carries a first failure).
/// - Claims walk `records_claimable` (flow, next attempt, id): the claim's `ORDER BY next_attempt_at, id`
///   in index order, so `LIMIT` stops after the rows it leases instead of sorting every due row first.
/// - `lineage` and `payloads` lose their foreign keys to `records`: each checked every row inserted with a
///   `SELECT … FOR KEY SHARE` of its record (four per record on the worker's path). Their writers already
///   guarantee what the keys checked: every insert names a record the same statement read or wrote (an
///   ingest's upsert, a claim's or completion's update, `append_lineage`'s join, which locks the record FOR
///   KEY SHARE as the key's check did), record ids are never reused (a sequence), and the one deleter of
///   records (the dead-letter purge) deletes their lineage and payload in the same statement. `snapshots`
///   and `interventions` keep theirs: written once per held or dead-lettered record, they cost nothing.
///
/// SQLite is unchanged (version 6 is empty there): its counters are row triggers without function calls,
/// its claim reads the due index in order, and it cannot drop a foreign key without rebuilding the table.
const CHEAP_ROUNDS_DESCRIPTION: &str = "set-based counter triggers, claims in index order, no per-row foreign-key checks on lineage and payloads";

/// The body of the version 6 counter triggers: what the statement's rows (`$rows`: `sign` +1 for a row
/// that now exists, -1 for one that no longer does, and the counted columns) add to each counter, summed in
/// one pass. The same terms as `meshline_contributions` (version 4), so the counters still equal a recount.
/// The sums become one row per counter through `UNNEST` in the select list, not a join: a completion turns
/// nested loops off (see `PostgresLedger::complete_batch`), and a plan that can only be a nested loop then
/// costs so much on paper that PostgreSQL compiles it with LLVM, hundreds of milliseconds per statement.
macro_rules! count_rows {
    ($rows:literal) => {
        concat!(
            "INSERT INTO ledger_counters (flow, counter, shard, value)
            SELECT flow, counter, pg_backend_pid(), value FROM (
                SELECT flow,
                    UNNEST(ARRAY['records', 'received', 'delivered', 'failed', 'retried', 'dead_lettered', 'held',
                        'pending', 'mttr_sum_ms', 'mttr_count']) AS counter,
                    UNNEST(ARRAY[SUM(sign), SUM(sign * generation),
                        SUM(sign * (state = 'delivered')::INT),
                        SUM(sign * (first_failure_at IS NOT NULL)::INT),
                        SUM(sign * retries),
                        SUM(sign * (state = 'dead_lettered')::INT),
                        SUM(sign * (state = 'held')::INT),
                        SUM(sign * (state IN ('received', 'validated', 'retry_scheduled', 'delivering'))::INT),
                        SUM(sign * CASE WHEN state = 'delivered' AND first_failure_at IS NOT NULL
                            THEN COALESCE(delivered_at - first_failure_at, 0) ELSE 0 END),
                        SUM(sign * (state = 'delivered' AND first_failure_at IS NOT NULL)::INT)]::BIGINT[]) AS value
                FROM (",
            $rows,
            ") AS r GROUP BY flow
            ) AS sums WHERE value <> 0 ORDER BY 1, 2
            ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value;"
        )
    };
}

/// Version 7 counts, per contract revision and 10-second slot, what the revision's workers did with records
/// (outcomes, failed attempts, dead letters, holds, and a delivery-latency histogram): what a canary's analysis
/// compares between the stable and the canary track (issue #15). The counts are exact and survive restarts
/// because each completion batch adds its tally in its own transaction, one upsert per batch (the tally is
/// summed in memory: a completion's cost is what issue #13 is about). The revision is not a column of
/// `records` (a record is claimed by either track over its life), so no trigger could know it: the worker's
/// ledger handle carries it. One wide row per slot rather than a row per counter keeps a window read to a
/// primary-key range of a few hundred rows for an hour. `shard` as in version 4 (`pg_backend_pid()` on
/// PostgreSQL, so replicas of one revision never queue on one hot row; 0 on SQLite). Slots older than seven
/// days are pruned with the per-minute window. Nothing to backfill: older completions carry no revision.
const REVISION_WINDOW_DESCRIPTION: &str =
    "per-revision outcome counts and delivery-latency histogram in 10-second slots";

/// Version 8 keeps tickets (issue #16): one row per flow and cause in `tickets` (the exception aggregate:
/// counts, the newest examples, state, assignment, a version bumped on every change a sink should see), the
/// outbox of their sends in `ticket_deliveries` (per ticket and sink: the version the sink has, the sink's own
/// reference, in-doubt flag, failures and backoff), and per-owner sums of acknowledge and resolve times in
/// `ticket_times`, added as each occurrence is acknowledged or resolved, so the means stay exact after a ticket
/// reopens. `records.ticket` attaches a dead-lettered or held record to its ticket; a partial index over the
/// attached ones makes a ticket's outstanding count a range of that index, and costs a delivered record
/// nothing (its `ticket` is NULL, so it is not in the index). Booleans are 0/1 integers on both backends, so
/// one row type reads both. Nothing to backfill: existing dead letters and holds open no ticket until they
/// are dead-lettered or held again.
const TICKETS_DESCRIPTION: &str = "tickets, their per-sink outbox and per-owner times";

/// The version 8 statements; `$int` is the backend's 64-bit integer type name.
macro_rules! tickets_tables {
    ($int:literal) => {
        [
            concat!(
                "CREATE TABLE tickets (
                flow TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                kind TEXT NOT NULL,
                class TEXT,
                reason TEXT NOT NULL,
                rule TEXT,
                summary TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
                count ",
                $int,
                " NOT NULL,
                outstanding ",
                $int,
                " NOT NULL,
                opened_at ",
                $int,
                " NOT NULL,
                updated_at ",
                $int,
                " NOT NULL,
                acknowledged_at ",
                $int,
                ",
                acknowledged_by TEXT,
                resolved_at ",
                $int,
                ",
                reopened ",
                $int,
                " NOT NULL DEFAULT 0,
                examples TEXT NOT NULL,
                role TEXT,
                owner TEXT,
                sinks TEXT,
                escalation_step ",
                $int,
                " NOT NULL DEFAULT 0,
                page ",
                $int,
                " NOT NULL DEFAULT 0,
                version ",
                $int,
                " NOT NULL,
                measured_owner TEXT,
                PRIMARY KEY (flow, fingerprint)
            )"
            ),
            "CREATE INDEX tickets_updated ON tickets (flow, updated_at)",
            concat!(
                "CREATE TABLE ticket_deliveries (
                flow TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                sink TEXT NOT NULL,
                delivered_version ",
                $int,
                " NOT NULL DEFAULT 0,
                sink_ref TEXT,
                in_doubt ",
                $int,
                " NOT NULL DEFAULT 0,
                attempts ",
                $int,
                " NOT NULL DEFAULT 0,
                next_attempt_at ",
                $int,
                " NOT NULL DEFAULT 0,
                last_error TEXT,
                failing_since ",
                $int,
                ",
                PRIMARY KEY (flow, fingerprint, sink)
            )"
            ),
            concat!(
                "CREATE TABLE ticket_times (
                flow TEXT NOT NULL,
                owner TEXT NOT NULL,
                opened ",
                $int,
                " NOT NULL DEFAULT 0,
                acknowledged ",
                $int,
                " NOT NULL DEFAULT 0,
                resolved ",
                $int,
                " NOT NULL DEFAULT 0,
                acknowledge_ms ",
                $int,
                " NOT NULL DEFAULT 0,
                resolve_ms ",
                $int,
                " NOT NULL DEFAULT 0,
                PRIMARY KEY (flow, owner)
            )"
            ),
            "ALTER TABLE records ADD COLUMN ticket TEXT",
            "CREATE INDEX records_ticket ON records (flow, ticket) WHERE ticket IS NOT NULL",
        ]
    };
}

/// Version 9: a ticket delivery remembers the HTTP status of a refusal (a 4xx other than 408 and 429) until a
/// send succeeds, so a sink whose configuration or permissions are wrong is reported failing from its first
/// such answer instead of after three backed-off attempts (10 to 20 minutes for one ticket). 0 is none.
const REFUSED_DESCRIPTION: &str = "ticket deliveries remember a sink's refusal";

const SQLITE_TICKETS: [&str; 6] = tickets_tables!("INTEGER");
const POSTGRES_TICKETS: [&str; 6] = tickets_tables!("BIGINT");

/// The version 7 table; `$tail` is `WITHOUT ROWID` on SQLite, where it makes the primary key the table's
/// own order, so a window read is one range of one b-tree.
macro_rules! revision_window_table {
    ($tail:literal) => {
        concat!(
            "CREATE TABLE revision_window (
                flow TEXT NOT NULL,
                revision TEXT NOT NULL,
                slot BIGINT NOT NULL,
                shard BIGINT NOT NULL,
                records BIGINT NOT NULL DEFAULT 0,
                delivered BIGINT NOT NULL DEFAULT 0,
                failed BIGINT NOT NULL DEFAULT 0,
                dead_lettered BIGINT NOT NULL DEFAULT 0,
                held BIGINT NOT NULL DEFAULT 0,
                le_5 BIGINT NOT NULL DEFAULT 0,
                le_10 BIGINT NOT NULL DEFAULT 0,
                le_25 BIGINT NOT NULL DEFAULT 0,
                le_50 BIGINT NOT NULL DEFAULT 0,
                le_100 BIGINT NOT NULL DEFAULT 0,
                le_250 BIGINT NOT NULL DEFAULT 0,
                le_500 BIGINT NOT NULL DEFAULT 0,
                le_1000 BIGINT NOT NULL DEFAULT 0,
                le_2500 BIGINT NOT NULL DEFAULT 0,
                le_5000 BIGINT NOT NULL DEFAULT 0,
                le_10000 BIGINT NOT NULL DEFAULT 0,
                le_30000 BIGINT NOT NULL DEFAULT 0,
                le_60000 BIGINT NOT NULL DEFAULT 0,
                le_inf BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (flow, revision, slot, shard)
            )",
            $tail
        )
    };
}

/// The bookkeeping table; created before any migration runs.
/// Version 11: the reconciliation audit's runs and the orders read so far (see `super::audit`), and the
/// records by source key, which is how an audit difference (a CRM id) finds its record. The orders' index
/// covers the comparison's read (external id order, with side, currency and amount), so it scans the index
/// alone, in byte order (`$collate`: PostgreSQL's `"C"`, SQLite's default), the order the comparison checks.
/// `$int` is the backend's 64-bit integer type, `$serial` its auto-increment key.
macro_rules! audit_tables {
    ($int:literal, $serial:literal, $collate:literal) => {
        [
            concat!(
                "CREATE TABLE audit_runs (id ",
                $serial,
                ", flow TEXT NOT NULL, window_from ",
                $int,
                " NOT NULL, window_to ",
                $int,
                " NOT NULL, state TEXT NOT NULL, owner TEXT, lease_until ",
                $int,
                ", crm_cursor TEXT, crm_done ",
                $int,
                " NOT NULL DEFAULT 0, crm_pages ",
                $int,
                " NOT NULL DEFAULT 0, crm_orders ",
                $int,
                " NOT NULL DEFAULT 0, erp_cursor TEXT, erp_done ",
                $int,
                " NOT NULL DEFAULT 0, erp_pages ",
                $int,
                " NOT NULL DEFAULT 0, erp_orders ",
                $int,
                " NOT NULL DEFAULT 0, result TEXT, started_at ",
                $int,
                " NOT NULL, finished_at ",
                $int,
                ")"
            ),
            // One running run per flow: two replicas asked to start one at once meet on this constraint.
            "CREATE UNIQUE INDEX audit_runs_running ON audit_runs (flow) WHERE state = 'running'",
            "CREATE INDEX audit_runs_flow ON audit_runs (flow, id)",
            concat!(
                "CREATE TABLE audit_orders (run ",
                $int,
                " NOT NULL, side TEXT NOT NULL, external_id TEXT NOT NULL, currency TEXT NOT NULL, \
                 amount TEXT NOT NULL)"
            ),
            concat!(
                "CREATE INDEX audit_orders_compare ON audit_orders (run, external_id",
                $collate,
                ", side, currency, amount)"
            ),
            "CREATE INDEX records_source_key ON records (flow, source_key)",
        ]
    };
}

const AUDIT_DESCRIPTION: &str = "reconciliation audit runs and the orders they read";
const SQLITE_AUDIT: [&str; 6] = audit_tables!("INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT", "");
const POSTGRES_AUDIT: [&str; 6] =
    audit_tables!("BIGINT", "BIGSERIAL PRIMARY KEY", " COLLATE \"C\"");

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
        description: COUNTERS_DESCRIPTION,
        statements: &[
            "CREATE TABLE ledger_counters (
                flow TEXT NOT NULL,
                counter TEXT NOT NULL,
                shard INTEGER NOT NULL,
                value INTEGER NOT NULL,
                PRIMARY KEY (flow, counter, shard)
            ) WITHOUT ROWID",
            "CREATE TABLE ledger_window (
                flow TEXT NOT NULL,
                minute INTEGER NOT NULL,
                counter TEXT NOT NULL,
                shard INTEGER NOT NULL,
                value INTEGER NOT NULL,
                PRIMARY KEY (flow, minute, counter, shard)
            ) WITHOUT ROWID",
            PENDING_AGE_INDEX,
            // Bounded ledger: a delivered record past its retention keeps only this row, with `outcome`
            // (one line) in place of its payload, snapshots and lineage. The ordering value (issue #11
            // part 2) is a column of this row too, so a stale revision is still recognised after the purge.
            "ALTER TABLE records ADD COLUMN outcome TEXT",
            "ALTER TABLE records ADD COLUMN purged_at INTEGER",
            PURGEABLE_INDEX,
            SQLITE_COUNTER_TRIGGERS_V4[0],
            SQLITE_COUNTER_TRIGGERS_V4[1],
            SQLITE_COUNTER_TRIGGERS_V4[2],
            "CREATE TRIGGER interventions_counted_insert AFTER INSERT ON interventions BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                VALUES (NEW.flow, 'manual_interventions', 0, 1)
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value;
            END",
            "CREATE TRIGGER interventions_counted_delete AFTER DELETE ON interventions BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                VALUES (OLD.flow, 'manual_interventions', 0, -1)
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = value + excluded.value;
            END",
            counters_backfill!(totals),
            counters_backfill!(window_received),
            counters_backfill!(window_failed),
        ],
    },
    Migration {
        version: 5,
        description: ORDERING_DESCRIPTION,
        statements: &[
            "ALTER TABLE records ADD COLUMN ordering_value INTEGER",
            "ALTER TABLE records ADD COLUMN stale_revisions INTEGER NOT NULL DEFAULT 0",
        ],
    },
    Migration {
        version: 6,
        description: CHEAP_ROUNDS_DESCRIPTION,
        statements: &[],
    },
    Migration {
        version: 7,
        description: REVISION_WINDOW_DESCRIPTION,
        statements: &[revision_window_table!(" WITHOUT ROWID")],
    },
    Migration {
        version: 8,
        description: TICKETS_DESCRIPTION,
        statements: &SQLITE_TICKETS,
    },
    Migration {
        version: 9,
        description: REFUSED_DESCRIPTION,
        statements: &[
            "ALTER TABLE ticket_deliveries ADD COLUMN refused INTEGER NOT NULL DEFAULT 0",
        ],
    },
    Migration {
        version: 10,
        description: LINEAGE_KEY_DESCRIPTION,
        // SQLite's lineage id is the table's rowid: its primary key costs no index of its own. What SQLite
        // spent per record instead was the waiting-state test (`SQLITE_PENDING_STATEMENTS`).
        statements: &SQLITE_PENDING_STATEMENTS,
    },
    Migration {
        version: 11,
        description: AUDIT_DESCRIPTION,
        statements: &SQLITE_AUDIT,
    },
    Migration {
        version: 12,
        description: TALLY_MARK_DESCRIPTION,
        statements: &SQLITE_TALLY_MARK_STATEMENTS,
    },
    Migration {
        version: 13,
        description: COUNTERS_WITHOUT_UPSERT_DESCRIPTION,
        statements: &SQLITE_COUNTERS_WITHOUT_UPSERT_STATEMENTS,
    },
    Migration {
        version: 14,
        description: "none on SQLite, which has no row versions (PostgreSQL's claims and completions update records in place)",
        statements: &[],
    },
    Migration {
        version: 15,
        description: "none on SQLite, whose completions write their lineage rows (PostgreSQL keeps a delivery's event in its record's row)",
        statements: &[],
    },
    Migration {
        version: 16,
        description: "none on SQLite, whose claims write their lineage rows and find waiting records through records itself (PostgreSQL keeps a claim's event in its record's row and registers leases per claim)",
        statements: &[],
    },
    Migration {
        version: 17,
        description: "none on SQLite, whose completions count their own records already (version 13's tally mark; PostgreSQL's completions of deliveries now do too)",
        statements: &[],
    },
    Migration {
        version: 18,
        description: "none on SQLite, whose partial index of holds and dead letters is left alone by an update between other states",
        statements: &[],
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
        description: COUNTERS_DESCRIPTION,
        statements: &[
            "CREATE TABLE ledger_counters (
                flow TEXT NOT NULL,
                counter TEXT NOT NULL,
                shard BIGINT NOT NULL,
                value BIGINT NOT NULL,
                PRIMARY KEY (flow, counter, shard)
            )",
            "CREATE TABLE ledger_window (
                flow TEXT NOT NULL,
                minute BIGINT NOT NULL,
                counter TEXT NOT NULL,
                shard BIGINT NOT NULL,
                value BIGINT NOT NULL,
                PRIMARY KEY (flow, minute, counter, shard)
            )",
            PENDING_AGE_INDEX,
            // Bounded ledger: a delivered record past its retention keeps only this row, with `outcome`
            // (one line) in place of its payload, snapshots and lineage. The ordering value (issue #11
            // part 2) is a column of this row too, so a stale revision is still recognised after the purge.
            "ALTER TABLE records ADD COLUMN outcome TEXT",
            "ALTER TABLE records ADD COLUMN purged_at BIGINT",
            PURGEABLE_INDEX,
            // What one record row counts toward each counter; a trigger adds new minus old.
            "CREATE FUNCTION meshline_contributions(p_state TEXT, p_generation BIGINT, p_retries BIGINT,
                p_first_failure_at BIGINT, p_delivered_at BIGINT)
            RETURNS TABLE (counter TEXT, value BIGINT) LANGUAGE sql IMMUTABLE AS $$
                VALUES ('records', 1::BIGINT),
                    ('received', p_generation),
                    ('delivered', (p_state = 'delivered')::INT::BIGINT),
                    ('failed', (p_first_failure_at IS NOT NULL)::INT::BIGINT),
                    ('retried', p_retries),
                    ('dead_lettered', (p_state = 'dead_lettered')::INT::BIGINT),
                    ('held', (p_state = 'held')::INT::BIGINT),
                    ('pending', (p_state IN ('received', 'validated', 'retry_scheduled', 'delivering'))::INT::BIGINT),
                    ('mttr_sum_ms', CASE WHEN p_state = 'delivered' AND p_first_failure_at IS NOT NULL
                        THEN COALESCE(p_delivered_at - p_first_failure_at, 0) ELSE 0 END),
                    ('mttr_count', (p_state = 'delivered' AND p_first_failure_at IS NOT NULL)::INT::BIGINT)
            $$",
            "CREATE FUNCTION meshline_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT n.flow, c.counter, pg_backend_pid(), SUM(c.value)
                FROM new_rows n, LATERAL meshline_contributions(n.state, n.generation, n.retries,
                    n.first_failure_at, n.delivered_at) c
                GROUP BY n.flow, c.counter HAVING SUM(c.value) <> 0 ORDER BY 1, 2
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value;
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT flow, received_at / 60000, 'received', pg_backend_pid(), SUM(generation)
                FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = ledger_window.value + EXCLUDED.value;
                RETURN NULL;
            END $$",
            "CREATE FUNCTION meshline_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT flow, counter, pg_backend_pid(), SUM(value) FROM (
                    SELECT n.flow, c.counter, c.value FROM new_rows n, LATERAL meshline_contributions(n.state,
                        n.generation, n.retries, n.first_failure_at, n.delivered_at) c
                    UNION ALL
                    SELECT o.flow, c.counter, -c.value FROM old_rows o, LATERAL meshline_contributions(o.state,
                        o.generation, o.retries, o.first_failure_at, o.delivered_at) c
                ) AS changes
                GROUP BY flow, counter HAVING SUM(value) <> 0 ORDER BY 1, 2
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value;
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT n.flow, 'last_delivery_at', pg_backend_pid(), MAX(n.delivered_at)
                FROM new_rows n JOIN old_rows o ON o.id = n.id
                WHERE n.delivered_at IS NOT NULL AND n.delivered_at IS DISTINCT FROM o.delivered_at
                GROUP BY n.flow ORDER BY 1
                ON CONFLICT (flow, counter, shard) DO UPDATE
                SET value = GREATEST(ledger_counters.value, EXCLUDED.value);
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT flow, minute, counter, pg_backend_pid(), SUM(value) FROM (
                    SELECT n.flow, n.received_at / 60000 AS minute, 'received' AS counter,
                        n.generation - o.generation AS value
                    FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE n.generation > o.generation
                    UNION ALL
                    SELECT n.flow, n.first_failure_at / 60000, 'failed', 1
                    FROM new_rows n JOIN old_rows o ON o.id = n.id
                    WHERE o.first_failure_at IS NULL AND n.first_failure_at IS NOT NULL
                ) AS events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = ledger_window.value + EXCLUDED.value;
                RETURN NULL;
            END $$",
            "CREATE FUNCTION meshline_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT o.flow, c.counter, pg_backend_pid(), -SUM(c.value)
                FROM old_rows o, LATERAL meshline_contributions(o.state, o.generation, o.retries,
                    o.first_failure_at, o.delivered_at) c
                GROUP BY o.flow, c.counter HAVING SUM(c.value) <> 0 ORDER BY 1, 2
                ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value;
                RETURN NULL;
            END $$",
            "CREATE FUNCTION meshline_count_interventions() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                IF TG_OP = 'INSERT' THEN
                    INSERT INTO ledger_counters (flow, counter, shard, value)
                    SELECT flow, 'manual_interventions', pg_backend_pid(), COUNT(*) FROM new_rows
                    GROUP BY flow ORDER BY 1
                    ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value;
                ELSE
                    INSERT INTO ledger_counters (flow, counter, shard, value)
                    SELECT flow, 'manual_interventions', pg_backend_pid(), -COUNT(*) FROM old_rows
                    GROUP BY flow ORDER BY 1
                    ON CONFLICT (flow, counter, shard) DO UPDATE SET value = ledger_counters.value + EXCLUDED.value;
                END IF;
                RETURN NULL;
            END $$",
            "CREATE TRIGGER records_counted_insert AFTER INSERT ON records REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION meshline_count_inserted()",
            "CREATE TRIGGER records_counted_update AFTER UPDATE ON records
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION meshline_count_updated()",
            "CREATE TRIGGER records_counted_delete AFTER DELETE ON records REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION meshline_count_deleted()",
            "CREATE TRIGGER interventions_counted_insert AFTER INSERT ON interventions
            REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION meshline_count_interventions()",
            "CREATE TRIGGER interventions_counted_delete AFTER DELETE ON interventions
            REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION meshline_count_interventions()",
            counters_backfill!(totals),
            counters_backfill!(window_received),
            counters_backfill!(window_failed),
        ],
    },
    Migration {
        version: 5,
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
    Migration {
        version: 6,
        description: CHEAP_ROUNDS_DESCRIPTION,
        statements: &[
            concat!(
                "CREATE OR REPLACE FUNCTION meshline_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                ",
                count_rows!(
                    "SELECT 1 AS sign, flow, state, generation, retries, first_failure_at, delivered_at FROM new_rows"
                ),
                "
                INSERT INTO ledger_window (flow, minute, counter, shard, value)
                SELECT flow, received_at / 60000, 'received', pg_backend_pid(), SUM(generation)
                FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
                ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = ledger_window.value + EXCLUDED.value;
                RETURN NULL;
            END $$"
            ),
            // `last_delivery_at` takes the newest delivery time among the rows: a row whose delivery time did
            // not change was counted when it was set, and the counter keeps the greatest value anyway.
            concat!(
                "CREATE OR REPLACE FUNCTION meshline_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                ",
                count_rows!(
                    "SELECT 1 AS sign, flow, state, generation, retries, first_failure_at, delivered_at FROM new_rows
                    UNION ALL
                    SELECT -1, flow, state, generation, retries, first_failure_at, delivered_at FROM old_rows"
                ),
                "
                INSERT INTO ledger_counters (flow, counter, shard, value)
                SELECT flow, 'last_delivery_at', pg_backend_pid(), MAX(delivered_at)
                FROM new_rows WHERE delivered_at IS NOT NULL GROUP BY flow ORDER BY 1
                ON CONFLICT (flow, counter, shard) DO UPDATE
                SET value = GREATEST(ledger_counters.value, EXCLUDED.value);
                -- The window's events need each row's old and new version side by side. A generation only
                -- grows and a first failure is only ever set on a row that then carries it, so a statement
                -- where neither shows (a claim, a clean completion) has none and skips the join.
                IF EXISTS (SELECT 1 FROM new_rows WHERE first_failure_at IS NOT NULL)
                    OR (SELECT SUM(generation) FROM new_rows) IS DISTINCT FROM (SELECT SUM(generation) FROM old_rows)
                THEN
                    INSERT INTO ledger_window (flow, minute, counter, shard, value)
                    SELECT flow, minute, counter, pg_backend_pid(), SUM(value) FROM (
                        SELECT n.flow, n.received_at / 60000 AS minute, 'received' AS counter,
                            n.generation - o.generation AS value
                        FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE n.generation > o.generation
                        UNION ALL
                        SELECT n.flow, n.first_failure_at / 60000, 'failed', 1
                        FROM new_rows n JOIN old_rows o ON o.id = n.id
                        WHERE o.first_failure_at IS NULL AND n.first_failure_at IS NOT NULL
                    ) AS events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                    ON CONFLICT (flow, minute, counter, shard) DO UPDATE SET value = ledger_window.value + EXCLUDED.value;
                END IF;
                RETURN NULL;
            END $$"
            ),
            concat!(
                "CREATE OR REPLACE FUNCTION meshline_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                ",
                count_rows!(
                    "SELECT -1 AS sign, flow, state, generation, retries, first_failure_at, delivered_at FROM old_rows"
                ),
                "
                RETURN NULL;
            END $$"
            ),
            "CREATE INDEX records_claimable ON records (flow, next_attempt_at, id)
            WHERE state IN ('received', 'validated', 'retry_scheduled', 'delivering')",
            "DROP INDEX records_due",
            "ALTER TABLE lineage DROP CONSTRAINT IF EXISTS lineage_record_id_fkey",
            "ALTER TABLE payloads DROP CONSTRAINT IF EXISTS payloads_record_id_fkey",
        ],
    },
    Migration {
        version: 7,
        description: REVISION_WINDOW_DESCRIPTION,
        statements: &[revision_window_table!("")],
    },
    Migration {
        version: 8,
        description: TICKETS_DESCRIPTION,
        statements: &POSTGRES_TICKETS,
    },
    Migration {
        version: 9,
        description: REFUSED_DESCRIPTION,
        statements: &["ALTER TABLE ticket_deliveries ADD COLUMN refused BIGINT NOT NULL DEFAULT 0"],
    },
    Migration {
        version: 10,
        description: LINEAGE_KEY_DESCRIPTION,
        statements: &["ALTER TABLE lineage DROP CONSTRAINT IF EXISTS lineage_pkey"],
    },
    Migration {
        version: 11,
        description: AUDIT_DESCRIPTION,
        statements: &POSTGRES_AUDIT,
    },
    Migration {
        version: 12,
        description: TALLY_MARK_DESCRIPTION,
        // PostgreSQL's counter triggers are statement-level: one pass over a statement's transition tables
        // for the whole batch, not a sub-program per row, so there is nothing per record to save there.
        statements: &[],
    },
    Migration {
        version: 13,
        description: COUNTERS_WITHOUT_UPSERT_DESCRIPTION,
        // PostgreSQL has no statement journal: a failed statement is undone from its own row versions.
        statements: &[],
    },
    Migration {
        version: 14,
        description: IN_PLACE_DESCRIPTION,
        statements: &POSTGRES_IN_PLACE,
    },
    Migration {
        version: 15,
        description: DELIVERED_EVENT_DESCRIPTION,
        statements: &POSTGRES_DELIVERED_EVENT,
    },
    Migration {
        version: 16,
        description: CLAIM_IN_PLACE_DESCRIPTION,
        statements: &POSTGRES_CLAIM_IN_PLACE,
    },
    Migration {
        version: 17,
        description: SELF_COUNTED_DESCRIPTION,
        statements: &POSTGRES_SELF_COUNTED,
    },    Migration {
        version: 18,
        description: ATTENTION_TABLE_DESCRIPTION,
        statements: &POSTGRES_ATTENTION_TABLE,
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
        // PostgreSQL's triggers list the same states in `record_attention` (version 18).
        assert_eq!(attention!(), super::super::ATTENTION);
    }

    #[test]
    fn sqlite_counter_triggers_keep_no_do_update() {
        // A `DO UPDATE` anywhere in a trigger on `records` gives every statement on `records` a statement
        // journal (schema version 13); the counters are kept with `DO NOTHING` inserts and updates.
        for trigger in SQLITE_COUNTER_TRIGGERS_V13 {
            let text = trigger.to_ascii_uppercase();
            assert!(
                !text.contains("DO UPDATE") && !text.contains("OR REPLACE"),
                "{trigger}"
            );
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
