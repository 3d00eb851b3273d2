//! ClickHouse DDL: the ordered migrations every service applies at startup.
//!
//! Each statement must run unchanged on ClickHouse 18.16 (the integration
//! tests' server) and on the current engine (checked through chDB in CI), so
//! they use only what 18.16 has: no TTL, no DateTime64, no LowCardinality, no
//! SimpleAggregateFunction. Migrations are idempotent (`IF NOT EXISTS`), so two
//! services starting at once cannot trip over each other.
//!
//! Atomicity is designed into the partition keys. ClickHouse makes one INSERT
//! atomic only when its rows land in one table partition and one block, so the
//! tables written in the ingest path are partitioned by `written_at`, a value
//! the writer sets once per flush: a flush is one part, all or nothing. (Event
//! time would split a flush holding late events across months.)

/// A rollup table ordered by time (`rollups_minute`, and the retired
/// `rollups_user_day`). Every rollup table shares its columns and engine
/// ([`rollup_columns!`], [`rollup_engine!`]): the query API reads whole days
/// from one and edge minutes from another in one `UNION ALL`, and the
/// aggregator writes them all with the same INSERT column list.
macro_rules! rollup_table {
    () => {
        concat!(rollup_columns!(), rollup_engine!(), "
        ORDER BY (tenant, window_start, user_id, customer_id, feature, model, environment, billable,
            source_topic, source_partition, source_offset)")
    };
}

/// The rollup columns, without the closing parenthesis.
macro_rules! rollup_columns {
    () => {
        "            tenant String,
            window_start DateTime,
            user_id String,
            customer_id String,
            feature String,
            model String,
            environment String,
            billable UInt8,
            source_topic String,
            source_partition Int32,
            source_offset Int64,
            events UInt64,
            input_tokens UInt64,
            output_tokens UInt64,
            cached_input_tokens UInt64,
            reasoning_tokens UInt64,
            cost_nanos Int64,
            revenue_nanos Int64,
            credits_nanos Int64,
            unpriced_events UInt64,
            markers UInt64,
            written_at DateTime"
    };
}

/// The rollup engine and partitioning, from the closing parenthesis of the columns.
macro_rules! rollup_engine {
    () => {
        "
        ) ENGINE = SummingMergeTree((events, input_tokens, output_tokens, cached_input_tokens,
            reasoning_tokens, cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers))
        PARTITION BY toYYYYMM(written_at)"
    };
}

/// One migration: a version, a name for humans, and its statements.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// The table recording which migrations were applied.
pub const MIGRATIONS_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations \
     (version UInt32, name String, applied_at DateTime) ENGINE = MergeTree ORDER BY version";

/// All migrations, in the order they apply.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "events, minute rollups, dead letters",
    statements: &[
        // The deduplicated raw events: the audit trail behind every bill, and the
        // record of progress (each row carries its Kafka partition and offset).
        // Ordered by key so the dedupe's exact look-ups are index look-ups.
        "CREATE TABLE IF NOT EXISTS events (
            tenant String,
            idempotency_key String,
            fingerprint UInt64,
            event_time DateTime,
            event_time_ns UInt32,
            user_id String,
            customer_id String,
            feature String,
            model String,
            provider String,
            environment String,
            billable UInt8,
            input_tokens UInt64,
            output_tokens UInt64,
            cached_input_tokens UInt64,
            reasoning_tokens UInt64,
            cost_nanos Int64,
            cost_source UInt8,
            revenue_nanos Int64,
            credits_nanos Int64,
            metadata String,
            received_at DateTime,
            kafka_topic String,
            kafka_partition Int32,
            kafka_offset Int64,
            written_at DateTime
        ) ENGINE = MergeTree
        PARTITION BY toYYYYMM(written_at)
        ORDER BY (tenant, idempotency_key)",
        // One-minute rollups. Data rows have source_partition = -1 and sum
        // together; each flush also writes one progress marker per Kafka
        // partition (tenant '', its own source key, so it never sums with
        // anything), in the same INSERT as the rows it covers. Markers carry
        // markers = 1: SummingMergeTree deletes rows whose summed columns are
        // all zero when it merges, which would erase the record of progress.
        concat!("CREATE TABLE IF NOT EXISTS rollups_minute (", rollup_table!()),
        // Records that could not be decoded, with what is needed to replay them.
        // Replaying a partition may write the same record again; the replacing
        // engine keeps one row per (topic, partition, offset).
        "CREATE TABLE IF NOT EXISTS dead_letters (
            kafka_topic String,
            kafka_partition Int32,
            kafka_offset Int64,
            reason String,
            message_key String,
            payload String,
            written_at DateTime
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(written_at)
        ORDER BY (kafka_topic, kafka_partition, kafka_offset)",
    ],
}, Migration {
    version: 2,
    name: "runaway-user alerts",
    statements: &[
        // One row per alert instance (tenant, user, rule, opened_at); each
        // update writes a higher version, and readers take the latest (FINAL).
        "CREATE TABLE IF NOT EXISTS alerts (
            tenant String,
            user_id String,
            rule String,
            opened_at DateTime,
            state String,
            observed_nanos Int64,
            threshold_nanos Int64,
            window_secs UInt32,
            updated_at DateTime,
            resolved_at DateTime,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (tenant, user_id, rule, opened_at)",
    ],
}, Migration {
    version: 3,
    name: "daily per-user rollups",
    statements: &[
        // Daily sums per tenant, user and customer (feature, model and
        // environment are '' and billable 0): what 30-day top spenders and
        // margins read for whole days, a thirtieth or less of the minute rows.
        // Same columns as rollups_minute, so a range can read whole days here
        // and its edges there in one UNION ALL. Written by its own INSERT ...
        // SELECT from events with its own progress markers; an existing
        // deployment backfills it from events on the next assignment.
        concat!("CREATE TABLE IF NOT EXISTS rollups_user_day (", rollup_table!()),
    ],
}, Migration {
    version: 4,
    name: "per-user rollups over aligned spans of days",
    statements: &[
        // Per tenant, user and customer, the sums over aligned spans of 1, 2,
        // 4, 8, 16 and 32 UTC days (a span of n days starts on a Unix day
        // divisible by n). Any run of whole days is a handful of such spans,
        // so 30-day top spenders read about 4 rows per user rather than 30.
        // Span 1 holds exactly what `rollups_user_day` held; it replaces that
        // table, which is no longer written or read (migrations only add).
        // Ordered by span then time: a range query reads only its spans.
        concat!(
            "CREATE TABLE IF NOT EXISTS rollups_user_span (
            span_days UInt16,
",
            rollup_columns!(),
            rollup_engine!(),
            "
        ORDER BY (tenant, span_days, window_start, user_id, customer_id, source_topic, source_partition, source_offset)"
        ),
    ],
}, Migration {
    version: 5,
    name: "daily rollups ordered by user",
    statements: &[
        // Every dimension in one-day (UTC) windows, ordered by user first: a
        // user's statement (totals by feature and model, daily series) reads
        // that user's rows only, where `rollups_minute`, ordered by time,
        // would scan every user's minutes in the range.
        concat!(
            "CREATE TABLE IF NOT EXISTS rollups_user_daily (",
            rollup_columns!(),
            rollup_engine!(),
            "
        ORDER BY (tenant, user_id, window_start, customer_id, feature, model, environment, billable,
            source_topic, source_partition, source_offset)"
        ),
    ],
}, Migration {
    version: 6,
    name: "Stripe meter sync state",
    statements: &[
        // The sync's pushed state per tenant, meter, subject and hour, as the
        // embedded `billing_windows`: each state change is a whole new row
        // with a higher version, and readers take the latest (FINAL).
        // `has_pending` stands for the embedded NULL (no Nullable in the
        // -If aggregates the status reads). Partitioned by the hour's month:
        // a window's versions stay in one partition, where FINAL replaces.
        "CREATE TABLE IF NOT EXISTS billing_windows (
            tenant String,
            meter String,
            subject String,
            window_start DateTime,
            stripe_customer_id String,
            pushed Int64,
            seq Int64,
            pending Int64,
            has_pending UInt8,
            refused Int64,
            error String,
            updated_at DateTime,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (tenant, meter, subject, window_start)",
        // The Stripe customer of a subject, as set through the API; the latest
        // version wins (FINAL).
        "CREATE TABLE IF NOT EXISTS billing_customers (
            tenant String,
            subject String,
            stripe_customer_id String,
            updated_at DateTime,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (tenant, subject)",
    ],
}, Migration {
    version: 7,
    name: "keying upgrades",
    statements: &[
        // When aggregators counting only on a key's home partition first
        // ran on a topic, and until when rows counted before (under the
        // user keying, perhaps off their key's home) stay in the dedupe
        // window: toDateTime(0) when there were none. Written once, by the
        // first such aggregator; two starting at once may both write, and
        // readers take the latest `legacy_until`.
        "CREATE TABLE IF NOT EXISTS keying_upgrades (
            topic String,
            upgraded_at DateTime,
            legacy_until DateTime
        ) ENGINE = MergeTree
        ORDER BY topic",
    ],
}, Migration {
    version: 8,
    name: "dedupe snapshots",
    statements: &[
        // One row per snapshot of a Kafka partition's dedupe bloom slices
        // (format: aggregator/src/snapshot.rs), so that an assignment reads
        // the snapshot and only the events after `covers_offset` instead of
        // every key in the 35-day window. Replacing by `version` (the covered
        // offset + 1) keeps one row per partition once parts merge; readers
        // take the highest version, so no FINAL. Partitioned by Kafka
        // partition: a partition's rows share a table partition (so they
        // replace each other), and a merge rewrites one partition's rows
        // (about 20 MB each at the default sizing), never every partition's.
        "CREATE TABLE IF NOT EXISTS dedupe_snapshots (
            kafka_topic String,
            kafka_partition Int32,
            covers_offset Int64,
            keys UInt64,
            payload_bytes UInt64,
            payload String,
            written_at DateTime,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY kafka_partition
        ORDER BY (kafka_topic, kafka_partition)",
    ],
}, Migration {
    version: 9,
    name: "daily rollups by dimension",
    statements: &[
        // Daily sums per (feature, model, environment, billable), user and
        // customer '': what "usage by day and model" over 30 days reads for
        // whole days, about a day's distinct dimension rows whatever the
        // users, where `rollups_minute` holds every user's minutes (and late
        // events spread those over the whole range). Ordered by time, so a
        // range reads only its days. The embedded store's
        // `rollups_daily_by_dims`, same name. An existing deployment
        // backfills it from events on the next assignment.
        concat!(
            "CREATE TABLE IF NOT EXISTS rollups_daily_by_dims (",
            rollup_columns!(),
            rollup_engine!(),
            "
        ORDER BY (tenant, window_start, feature, model, environment, billable, user_id, customer_id,
            source_topic, source_partition, source_offset)"
        ),
    ],
}];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_statements_avoid_what_18_16_lacks() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        for m in MIGRATIONS {
            for s in m.statements {
                assert!(s.contains("IF NOT EXISTS"), "{s}");
                for missing in ["TTL", "DateTime64", "LowCardinality", "SimpleAggregateFunction", "toStartOfInterval"] {
                    assert!(!s.contains(missing), "{missing} in {s}");
                }
            }
        }
    }
}
