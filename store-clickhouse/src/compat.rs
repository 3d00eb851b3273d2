//! Every statement Meterline sends to ClickHouse, with sample values, runnable
//! as is in an order that works on an empty database: what `scripts/test`
//! runs on ClickHouse 18.16 (the `sql_compat` test) and on the current engine
//! through chDB (`scripts/chdb-check.py`). Inserts are sample rows as VALUES;
//! the services send the same columns as RowBinary.

use chrono::DateTime;
use meterline_domain::{AlertRow, AlertState, EventRow, Granularity, Metric, Rule, TimeColumn};
use meterline_sql::{Dialect, Scope, Sql, Value, i, quote, s};
use serde::Serialize;
use std::collections::BTreeSet;

use crate::migrations::{MIGRATIONS, MIGRATIONS_TABLE_DDL};
use crate::queries;
use meterline_sql::AlertsQuery;
use crate::snapshots::{self, SnapshotRow};
use crate::statements::{self, Range, Rollup, UserSum};
use crate::store::{DeadLetterRow, KeyRow, LookupRow};

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

fn sample_event(written_at: u32) -> EventRow {
    EventRow {
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
    }
}

/// The aggregator's statements.
fn writer_statements() -> Vec<String> {
    let written_at = 1_800_000_000;
    let dead = DeadLetterRow {
        kafka_topic: "topic".into(),
        kafka_partition: 3,
        kafka_offset: 41,
        reason: "record does not start with the Meterline magic byte".into(),
        message_key: "61".into(),
        payload: "00ff".into(),
        written_at,
    };
    let mut out = vec![statements::SERVER_VERSION.to_owned(), statements::PING.to_owned(), MIGRATIONS_TABLE_DDL.to_owned(), statements::APPLIED_MIGRATIONS.to_owned()];
    for m in MIGRATIONS {
        out.extend(m.statements.iter().map(|s| (*s).to_owned()));
    }
    let mut record = Sql::new(statements::RECORD_MIGRATION);
    record.binds.extend([i(1), s("events, minute rollups, dead letters")]);
    out.push(record.render(""));
    out.push(values_insert("events", &sample_event(written_at)));
    out.push(values_insert("dead_letters", &dead));
    out.push(statements::orphans("topic", 3, -1, 0).render(""));
    let ranges = [Range { partition: 3, after: -1, up_to: 42 }, Range { partition: 4, after: -1, up_to: 7 }];
    for rollup in Rollup::ALL {
        out.push(statements::rollups_from_events(rollup, "topic", &ranges, written_at, written_at - 3600).render(""));
        out.push(statements::progress(rollup, "topic", 3).render(""));
        out.push(statements::markers_present(rollup, "topic", &ranges).render(""));
    }
    out.push(statements::events_present("topic", &[Range { partition: 3, after: -1, up_to: 42 }, Range { partition: 4, after: -1, up_to: 7 }]).render(""));
    let alert = AlertRow {
        tenant: "acme".into(),
        user_id: "u-1".into(),
        rule: Rule::Peers.as_str().into(),
        opened_at: written_at,
        state: AlertState::Open.as_str().into(),
        observed_nanos: 200,
        threshold_nanos: 100,
        window_secs: 3600,
        updated_at: written_at,
        resolved_at: 0,
        version: 1,
    };
    out.push(values_insert("alerts", &alert));
    out.push(Sql::new(statements::OPEN_ALERTS).render(&fields::<AlertRow>()));
    // The runaway rules: the last hour (minutes only), the week and the
    // month to date (whole days from the spans, edges from minutes).
    let now = 1_800_000_000;
    out.push(statements::user_sums(UserSum::Cost, "acme", now - 3_600, now, None).render(""));
    let users: BTreeSet<String> = ["u-1", "it's-u-2"].map(str::to_owned).into_iter().collect();
    out.push(statements::user_sums(UserSum::Cost, "acme", now - 7 * 86_400, now, Some(&users)).render(""));
    out.push(statements::user_sums(UserSum::Loss, "acme", 1_798_761_600, now, Some(&users)).render(""));
    out.push(statements::keys_since("topic", 3, 0).render(&fields::<KeyRow>()));
    out.push(statements::record_keying_upgrade("topic", written_at, written_at + 86_400).render(""));
    out.push(statements::keying_upgrade("topic").render(""));
    out.push(statements::written_since("topic", 0).render(""));
    // The payload is bytes, which JSON cannot carry as a string: the sample row by hand.
    out.push(format!(
        "INSERT INTO dedupe_snapshots ({}) VALUES ('topic', 3, 42, 1, 4, 'MLDS', {written_at}, 43)",
        fields::<SnapshotRow>().replace(',', ", ")
    ));
    out.push(snapshots::latest_snapshot("topic", 3).render(&fields::<SnapshotRow>()));
    out.push(snapshots::keys_after("topic", 3, 42, 0).render(&fields::<KeyRow>()));
    out.push(statements::events_between("topic", 3, -1, 42, 0, 50_000).render(&fields::<EventRow>()));
    let (a, b) = (["it's-a-key", "k2"], ["k3"]);
    out.push(statements::lookup([("acme", &a[..]), ("globex", &b[..])]).render(&fields::<LookupRow>()));
    out
}

/// A sample scope over `[from, to)` with `filters`.
fn scope(column: TimeColumn, from: &str, to: &str, filters: Vec<(&'static str, Value)>) -> Scope {
    let at = |t: &str| DateTime::parse_from_rfc3339(t).map(|d| d.to_utc()).unwrap_or_default();
    Scope { tenant: "acme".into(), time_column: column, from: at(from), to: at(to), filters }
}

/// The query API's statements.
fn reader_statements() -> Vec<String> {
    let wide = || vec![("feature", s("chat")), ("billable", i(1))];
    let rollups = scope(TimeColumn::WindowStart, "2020-01-01T00:00:00Z", "2030-01-01T00:00:00Z", wide());
    let events_scope = scope(TimeColumn::EventTime, "2020-01-01T00:00:00Z", "2030-01-01T00:00:00Z", wide());
    // A range with partial edge days and no feature filter: the per-user span table's path.
    let daily = scope(TimeColumn::WindowStart, "2026-01-01T10:00:00Z", "2026-01-31T10:00:00Z", vec![]);
    // One user over the same range: rollups_user_daily for whole days.
    let one_user = scope(TimeColumn::WindowStart, "2026-01-01T10:00:00Z", "2026-01-31T10:00:00Z", vec![("user_id", s("u-1")), ("feature", s("chat"))]);
    let event_fields = fields::<EventRow>();
    let all = ["user_id", "customer_id", "feature", "model"];
    let mut out = Vec::new();
    for g in Granularity::ALL {
        out.push(queries::sums(&rollups, g, &all, false, false, 10).render(""));
    }
    out.push(queries::sums(&rollups, Granularity::Total, &["user_id"], true, true, 10).render(""));
    for m in Metric::ALL {
        out.push(queries::top(&rollups, "user_id", m, true, 10).render(""));
    }
    out.push(queries::top(&rollups, "customer_id", Metric::Cost, false, 10).render(""));
    out.push(queries::negative_count(&rollups, &["user_id", "model"]).render(""));
    out.push(queries::sums(&daily, Granularity::Day, &["user_id"], false, false, 10).render(""));
    out.push(queries::top(&daily, "customer_id", Metric::Margin, true, 10).render(""));
    for g in [Granularity::Day, Granularity::Total] {
        out.push(queries::sums(&one_user, g, &["model"], false, false, 10).render(""));
    }
    out.push(queries::negative_count(&daily, &["user_id"]).render(""));
    // A last day mostly gone by: its day's rows minus the minute rows after
    // `to`, on the span, dimension and one-user paths.
    let late = |filters| scope(TimeColumn::WindowStart, "2026-01-01T10:00:00Z", "2026-01-31T22:00:00Z", filters);
    out.push(queries::sums(&late(vec![]), Granularity::Day, &["user_id"], false, false, 10).render(""));
    out.push(queries::sums(&late(vec![]), Granularity::Total, &["model"], false, false, 10).render(""));
    out.push(queries::sums(&late(vec![("user_id", s("u-1"))]), Granularity::Total, &["model"], false, false, 10).render(""));
    // Pages of usage: resuming after a group's keys, on the span and minute paths.
    let after = meterline_sql::GroupCursor { bucket: 1_767_312_000, user: "it's-u-1".into(), ..Default::default() };
    out.push(queries::sums_after(&daily, Granularity::Day, &["user_id"], false, Some(&after), 8).render(""));
    out.push(queries::sums_after(&rollups, Granularity::Hour, &all, true, Some(&after), 8).render(""));
    out.push(queries::groups(&daily, &["user_id"]).render(""));
    out.push(queries::groups(&rollups, &["customer_id", "model"]).render(""));
    out.push(queries::edge_groups(&daily, &["user_id"], &[(1_767_261_600, 1_767_261_900), (1_769_853_000, 1_769_853_600)]).render(""));
    out.push(queries::event_count(&daily, &["user_id"]).render(""));
    out.push(meterline_sql::events(Dialect::ClickHouse, "?fields", &events_scope, None, 100).render(&event_fields));
    let alert_fields = fields::<AlertRow>();
    let alerts = |state, user: Option<&str>, rule| AlertsQuery { tenant: "acme".into(), from: 0, to: 2_000_000_000, state, user: user.map(str::to_owned), rule, after: None, limit: 10 };
    out.push(meterline_sql::alerts(Dialect::ClickHouse, "?fields", "alerts FINAL", &alerts(Some(AlertState::Open), Some("u-1"), Some(Rule::Peers))).render(&alert_fields));
    out.push(meterline_sql::alerts(Dialect::ClickHouse, "?fields", "alerts FINAL", &alerts(None, None, None)).render(&alert_fields));
    let next_page = AlertsQuery { after: Some((1_800_000_000, "it's-u-1".into(), "peers".into())), ..alerts(None, None, None) };
    out.push(meterline_sql::alerts(Dialect::ClickHouse, "?fields", "alerts FINAL", &next_page).render(&alert_fields));
    out.push(meterline_sql::events(Dialect::ClickHouse, "?fields", &events_scope, Some(&(1_800_000_000, 5, "it's".to_owned())), 100).render(&event_fields));
    // Limits reconciliation: events counted, and a filtered money sum over nanosecond edges.
    let metered = |columns: &'static [&'static str], filters: Vec<(&'static str, String)>| meterline_sql::MeteredSum {
        tenant: "acme".into(),
        subject_column: "user_id",
        subject: "it's-u-1".into(),
        columns,
        filters,
        from: (1_799_999_940, 500_000_000),
        to: (1_800_002_532, 0),
    };
    for q in [metered(&[], vec![]), metered(&["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"], vec![("feature", "chat".into()), ("model", "gpt-4o".into()), ("environment", "production".into())])] {
        out.extend(statements::metered_sum(&q).map(|sql| sql.render("")));
    }
    // The billing export: per-customer sums over one segment, and per-user sums cut at sub-second boundaries.
    for (subject_column, boundaries) in [("customer_id", vec![(1_799_999_940, 0), (1_800_002_532, 0)]), ("user_id", vec![(1_799_999_940, 5), (1_800_000_015, 500_000_000), (1_800_002_532, 0)])] {
        let q = meterline_sql::BillingSums { tenant: "it's".into(), subject_column, boundaries };
        out.extend(meterline_sql::billing_sums(Dialect::ClickHouse, &q).map(|sql| sql.render("")));
    }
    out
}

/// Every statement, writers' first (they create the tables).
pub fn compat_statements() -> Vec<String> {
    let mut out = writer_statements();
    out.extend(reader_statements());
    // The Stripe meter sync's state and sums (migration 6's tables).
    let (window, customer) = crate::billing::sample_rows();
    out.push(values_insert("billing_windows", &window));
    out.push(values_insert("billing_customers", &customer));
    out.extend(crate::billing::compat_reads());
    // Retention last: it drops what the statements above wrote into 2001 only.
    out.extend(crate::retention::compat_statements());
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_placeholder_is_bound() {
        let all = super::compat_statements();
        assert!(all.iter().all(|s| !s.contains('?')), "every placeholder bound");
        assert_eq!(all.len(), 115);
    }
}
