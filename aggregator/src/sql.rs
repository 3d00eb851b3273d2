//! Every SQL statement the aggregator sends, in one place, and the same
//! statements with sample values for the compatibility check.
//!
//! `compat_statements` is what `scripts/test` runs on ClickHouse 18.16 (the
//! `sql_compat` test) and on the current engine through chDB
//! (`scripts/chdb-check.py`): DDL, every query with sample bindings, and a
//! sample row for each insert (as VALUES; the service sends the same columns
//! as RowBinary).

use meterline_schemas::ddl::{MIGRATIONS, MIGRATIONS_TABLE_DDL};
use serde::Serialize;

use crate::rollup::{EventRow, RollupRow, Source};
use crate::store::DeadLetterRow;

pub const SERVER_VERSION: &str = "SELECT version()";
pub const PING: &str = "SELECT 1";
pub const APPLIED_MIGRATIONS: &str = "SELECT version FROM schema_migrations";
pub const RECORD_MIGRATION: &str = "INSERT INTO schema_migrations (version, name, applied_at) SELECT ?, ?, now()";
pub const PROGRESS: &str = "SELECT max(source_offset) AS offset, max(written_at) AS written_at, sum(markers) AS marker_count \
     FROM rollups_minute WHERE tenant = '' AND source_topic = ? AND source_partition = ? AND markers > 0";
pub const EVENTS_AFTER: &str = "SELECT ?fields FROM events WHERE kafka_topic = ? AND kafka_partition = ? \
     AND kafka_offset > ? AND written_at >= ? ORDER BY kafka_offset";
pub const KEYS_SINCE: &str = "SELECT ?fields FROM events WHERE kafka_topic = ? AND kafka_partition = ? AND written_at >= ?";

/// The exact look-up for keys grouped by tenant: `groups[i]` keys for the
/// i-th tenant. Only placeholders are generated; values are bound.
pub fn lookup(groups: &[usize]) -> String {
    let clauses: Vec<String> =
        groups.iter().map(|n| format!("(tenant = ? AND idempotency_key IN ({}))", vec!["?"; *n].join(","))).collect();
    format!("SELECT ?fields FROM events WHERE {}", clauses.join(" OR "))
}

/// A sample value for a placeholder, as SQL text.
#[derive(Debug, Clone)]
pub enum Sample {
    Str(&'static str),
    Int(i64),
}

fn render(sql: &str, fields: &str, values: &[Sample]) -> String {
    let mut out = String::new();
    let mut values = values.iter();
    let mut rest = sql.replace("?fields", fields);
    while let Some(at) = rest.find('?') {
        out.push_str(&rest[..at]);
        match values.next() {
            Some(Sample::Str(s)) => out.push_str(&quote(s)),
            Some(Sample::Int(n)) => out.push_str(&n.to_string()),
            None => out.push('?'),
        }
        rest = rest[at + 1..].to_owned();
    }
    out.push_str(&rest);
    out
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `INSERT INTO table (cols) VALUES (...)` for one sample row.
fn values_insert<T: Serialize>(table: &str, row: &T) -> String {
    let value = serde_json::to_value(row).unwrap_or_default();
    let Some(map) = value.as_object() else { return String::new() };
    let columns: Vec<&str> = map.keys().map(String::as_str).collect();
    let values: Vec<String> = map
        .values()
        .map(|v| match v {
            serde_json::Value::String(s) => quote(s),
            other => other.to_string(),
        })
        .collect();
    format!("INSERT INTO {table} ({}) VALUES ({})", columns.join(", "), values.join(", "))
}

fn fields<T: clickhouse::Row>() -> String {
    T::COLUMN_NAMES.join(",")
}

/// Every statement, runnable as is, in an order that works on an empty database.
pub fn compat_statements() -> Vec<String> {
    let written_at = 1_800_000_000;
    let event = EventRow {
        tenant: "acme".into(),
        idempotency_key: "it's-a-key".into(),
        fingerprint: u64::MAX,
        event_time: 1_799_999_940,
        event_time_ns: 999_999_999,
        user_id: "u-1".into(),
        customer_id: String::new(),
        feature: "chat".into(),
        model: "gpt-4o".into(),
        provider: String::new(),
        environment: "production".into(),
        billable: 1,
        input_tokens: 1_000_000_000,
        output_tokens: 1,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
        cost_nanos: i64::MAX,
        cost_source: 2,
        revenue_nanos: -1,
        credits_nanos: 0,
        metadata: "{\"a\":1}".into(),
        received_at: written_at,
        kafka_topic: "topic".into(),
        kafka_partition: 3,
        kafka_offset: 42,
        written_at,
    };
    let mut rollups = crate::rollup::rollup([&event], written_at);
    rollups.push(RollupRow::marker(Source { topic: "topic", partition: 3, offset: 42 }, written_at));
    let dead = DeadLetterRow {
        kafka_topic: "topic".into(),
        kafka_partition: 3,
        kafka_offset: 41,
        reason: "record does not start with the Meterline magic byte".into(),
        message_key: "61".into(),
        payload: "00ff".into(),
        written_at,
    };
    let mut out = vec![SERVER_VERSION.to_owned(), PING.to_owned(), MIGRATIONS_TABLE_DDL.to_owned(), APPLIED_MIGRATIONS.to_owned()];
    for m in MIGRATIONS {
        out.extend(m.statements.iter().map(|s| (*s).to_owned()));
    }
    out.push(render(RECORD_MIGRATION, "", &[Sample::Int(1), Sample::Str("events, minute rollups, dead letters")]));
    out.push(values_insert("events", &event));
    out.extend(rollups.iter().map(|r| values_insert("rollups_minute", r)));
    out.push(values_insert("dead_letters", &dead));
    out.push(render(PROGRESS, "", &[Sample::Str("topic"), Sample::Int(3)]));
    out.push(render(EVENTS_AFTER, &fields::<EventRow>(), &[Sample::Str("topic"), Sample::Int(3), Sample::Int(-1), Sample::Int(0)]));
    out.push(render(
        KEYS_SINCE,
        &fields::<crate::store::KeyRow>(),
        &[Sample::Str("topic"), Sample::Int(3), Sample::Int(0)],
    ));
    out.push(render(
        &lookup(&[2, 1]),
        &fields::<crate::store::LookupRow>(),
        &[Sample::Str("acme"), Sample::Str("it's-a-key"), Sample::Str("k2"), Sample::Str("globex"), Sample::Str("k3")],
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders_and_quotes() {
        assert_eq!(render("a = ? AND b IN (?, ?)", "", &[Sample::Str("x'y"), Sample::Int(1), Sample::Int(-2)]), "a = 'x\\'y' AND b IN (1, -2)");
        assert_eq!(lookup(&[2, 1]), "SELECT ?fields FROM events WHERE (tenant = ? AND idempotency_key IN (?,?)) OR (tenant = ? AND idempotency_key IN (?))");
        let all = compat_statements();
        assert!(all.iter().all(|s| !s.contains('?')), "every placeholder bound");
    }
}
