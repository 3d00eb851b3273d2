//! Every statement the aggregator sends to ClickHouse, each built with its
//! binds ([`Sql`]): the order of values travels with the text.

use meterline_domain::{Granularity, Measure, SPAN_DAYS, Unit, whole_days};
use meterline_sql::{Dialect, MeteredSum, Sql, Value, i, repeat, s};
use std::collections::BTreeSet;

use crate::queries::span_condition;

pub const SERVER_VERSION: &str = "SELECT version()";
pub const PING: &str = "SELECT 1";
pub const APPLIED_MIGRATIONS: &str = "SELECT version FROM schema_migrations";
pub const RECORD_MIGRATION: &str = "INSERT INTO schema_migrations (version, name, applied_at) SELECT ?, ?, now()";

/// A rollup table written from `events`, with its own progress markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollup {
    /// `rollups_minute`: every dimension, one-minute windows.
    Minute,
    /// `rollups_user_span`: tenant, user and customer, over aligned spans of
    /// 1 to 32 days (each event counts once in each span length).
    UserSpans,
    /// `rollups_user_daily`: every dimension, one-day windows, ordered user
    /// first, for the questions about one user.
    UserDaily,
    /// `rollups_daily_by_dims`: one-day windows per feature, model,
    /// environment and billable (user and customer ''), ordered by time.
    Dims,
}

impl Rollup {
    /// In the order a flush writes them: the day tables before the minutes,
    /// so that at any moment each flush's events are in a day table if they
    /// are in `rollups_minute`. A read of a day under way as its day rows
    /// minus the minute rows after `to` (`meterline_sql::split_days`) then
    /// never takes off what its day rows lack: a flush half written counts
    /// its events stamped after `to` too, until its minute rows land, and
    /// never goes below the truth.
    pub const ALL: [Rollup; 4] = [Rollup::UserSpans, Rollup::UserDaily, Rollup::Dims, Rollup::Minute];

    pub fn table(self) -> &'static str {
        match self {
            Rollup::Minute => "rollups_minute",
            Rollup::UserSpans => "rollups_user_span",
            Rollup::UserDaily => "rollups_user_daily",
            Rollup::Dims => "rollups_daily_by_dims",
        }
    }

    /// The rollup written after this one in a flush, if any.
    pub fn next(self) -> Option<Rollup> {
        Rollup::ALL.iter().skip_while(|r| **r != self).nth(1).copied()
    }
}

/// Offsets (after, up to] of one Kafka partition whose events to roll up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub after: i64,
    pub up_to: i64,
}

/// The last progress marker of one Kafka partition in `rollup`.
pub fn progress(rollup: Rollup, topic: &str, partition: i32) -> Sql {
    let mut sql = Sql::new(format!(
        "SELECT max(source_offset) AS offset, max(written_at) AS written_at, sum(markers) AS marker_count \
         FROM {} WHERE tenant = '' AND source_topic = ? AND source_partition = ? AND markers > 0",
        rollup.table()
    ));
    sql.binds.extend([s(topic), i(i64::from(partition))]);
    sql
}

/// The last offset and count of a partition's events past `after` written
/// since `since`: events whose rollup insert did not happen.
pub fn orphans(topic: &str, partition: i32, after: i64, since: u32) -> Sql {
    let mut sql = Sql::new(
        "SELECT max(kafka_offset) AS last_offset, count() AS orphans FROM events \
         WHERE kafka_topic = ? AND kafka_partition = ? AND kafka_offset > ? AND written_at >= toDateTime(?)",
    );
    sql.binds.extend([s(topic), i(i64::from(partition)), i(after), i(i64::from(since))]);
    sql
}

/// Every key a partition wrote since `since` (Unix seconds).
pub fn keys_since(topic: &str, partition: i32, since: u32) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM events WHERE kafka_topic = ? AND kafka_partition = ? AND written_at >= ?");
    sql.binds.extend([s(topic), i(i64::from(partition)), i(i64::from(since))]);
    sql
}

/// Up to `limit` events of one partition in offset order, after `after` and
/// at most `up_to`, whose event time is at or after `since` (Unix seconds):
/// what the limits applier counts when it catches up.
pub fn events_between(topic: &str, partition: i32, after: i64, up_to: i64, since: u32, limit: u64) -> Sql {
    let mut sql = Sql::new(
        "SELECT ?fields FROM events WHERE kafka_topic = ? AND kafka_partition = ? AND kafka_offset > ? AND kafka_offset <= ? \
         AND event_time >= ? ORDER BY kafka_offset LIMIT 1 BY kafka_offset LIMIT ?",
    );
    sql.binds.extend([s(topic), i(i64::from(partition)), i(after), i(up_to), i(i64::from(since)), i(i64::try_from(limit).unwrap_or(i64::MAX))]);
    sql
}

/// The exact look-up of keys, grouped by tenant.
pub fn lookup<'a>(by_tenant: impl IntoIterator<Item = (&'a str, &'a [&'a str])>) -> Sql {
    let clauses = by_tenant.into_iter().map(|(tenant, keys)| {
        let mut sql = Sql::new(format!("(tenant = ? AND idempotency_key IN ({}))", vec!["?"; keys.len()].join(",")));
        sql.binds.push(s(tenant));
        sql.binds.extend(keys.iter().map(|k| s(*k)));
        sql
    });
    let mut sql = Sql::new("SELECT ?fields FROM events WHERE ");
    sql.append(Sql::join(clauses, " OR "));
    sql
}

/// The recorded keying upgrade of a topic: how many records, and the
/// latest `legacy_until` (Unix seconds, 0 for none).
pub fn keying_upgrade(topic: &str) -> Sql {
    let mut sql = Sql::new("SELECT count() AS upgrades, toUInt32(max(legacy_until)) AS legacy_until FROM keying_upgrades WHERE topic = ?");
    sql.binds.push(s(topic));
    sql
}

/// The events of a topic written since `since` (Unix seconds): how many,
/// and the latest `written_at`. At the keying upgrade these are the rows
/// counted under the user keying that are still in the dedupe window.
pub fn written_since(topic: &str, since: u32) -> Sql {
    let mut sql = Sql::new("SELECT count() AS rows, toUInt32(max(written_at)) AS last FROM events WHERE kafka_topic = ? AND written_at >= toDateTime(?)");
    sql.binds.extend([s(topic), i(i64::from(since))]);
    sql
}

/// Records a topic's keying upgrade at `upgraded_at`, with rows counted
/// before it in the window until `legacy_until` (0: none).
pub fn record_keying_upgrade(topic: &str, upgraded_at: u32, legacy_until: u32) -> Sql {
    let mut sql = Sql::new("INSERT INTO keying_upgrades (topic, upgraded_at, legacy_until) SELECT ?, toDateTime(?), toDateTime(?)");
    sql.binds.extend([s(topic), i(i64::from(upgraded_at)), i(i64::from(legacy_until))]);
    sql
}

/// `(partition, after, up to]` per range, OR-ed.
fn offset_ranges(ranges: &[Range]) -> Sql {
    repeat(ranges, " OR ", "(kafka_partition = ? AND kafka_offset > ? AND kafka_offset <= ?)", |r| {
        vec![i(i64::from(r.partition)), i(r.after), i(r.up_to)]
    })
}

/// The measures summed from `events`, aliased `s_*`.
fn event_sums() -> String {
    Measure::ALL.iter().map(|m| format!("{} AS {}", m.from_events(), m.alias())).collect::<Vec<_>>().join(", ")
}

/// Rolls up the events of the offset `ranges` written since `since` into
/// `rollup`'s table, with one progress marker per range written at
/// `written_at`, in one server-side INSERT ... SELECT.
///
/// Why server-side: ClickHouse 18.16 commits a chunked HTTP INSERT body that
/// ends early at a row boundary (a writer killed mid-stream) as if it were
/// complete. A prefix of an `events` insert is safe (each partition's rows are
/// in offset order, so a prefix is a prefix of its offsets, and the repair
/// picks it up), but a prefix of client-sent rollups could hold a partition's
/// rows without its marker, and the repair would count them twice. An INSERT
/// ... SELECT has no client body to cut, and squashes into one block: one part.
pub fn rollups_from_events(rollup: Rollup, topic: &str, ranges: &[Range], written_at: u32, since: u32) -> Sql {
    let table = rollup.table();
    let measures = Measure::ALL.map(Measure::column).join(", ");
    let columns = format!(
        "tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
         source_topic, source_partition, source_offset, {measures}, markers, written_at"
    );
    let sums = event_sums();
    // An event's Unix minute and day, by arithmetic: UTC whatever the server's time zone.
    let minute = "intDiv(toUInt32(event_time), 60) * 60";
    let day = "intDiv(toUInt32(event_time), 86400) * 86400";
    let zeros = Measure::ALL.map(|m| if m.unit() == Unit::Nanos { "toInt64(0)" } else { "toUInt64(0)" }).join(", ");
    let marker_select = format!("SELECT '', toDateTime(0), '', '', '', '', '', toUInt8(0), ?, toInt32(?), toInt64(?), {zeros}, toUInt64(1), toDateTime(?)");
    let written = i(i64::from(written_at));
    let (head, marker_select) = match rollup {
        // The same rows, in minute or (Unix) day windows; by dimension
        // without the user and customer.
        Rollup::Minute | Rollup::UserDaily | Rollup::Dims => {
            let window = format!("toDateTime({})", if rollup == Rollup::Minute { minute } else { day });
            let people = if rollup == Rollup::Dims { "'', ''" } else { "user_id, customer_id" };
            let head = format!(
                "INSERT INTO {table} ({columns}) \
                 SELECT tenant, {window} AS w, {people}, feature, model, environment, billable, \
                 '', toInt32(-1), toInt64(-1), {sums}, toUInt64(0), toDateTime(?) "
            );
            (head, marker_select)
        }
        // Each daily row once per span length, its window moved back to the
        // span's first day; markers have span 0. Still one INSERT, one block.
        Rollup::UserSpans => {
            let aliases = Measure::ALL.map(Measure::alias).join(", ");
            let head = format!(
                "INSERT INTO {table} (span_days, {columns}) \
                 SELECT span, s_tenant, toDateTime(intDiv(s_day, 86400 * span) * (86400 * span)), s_user, s_customer, \
                 '', '', '', toUInt8(0), '', toInt32(-1), toInt64(-1), {aliases}, toUInt64(0), toDateTime(?) \
                 FROM (SELECT tenant AS s_tenant, {day} AS s_day, user_id AS s_user, customer_id AS s_customer, {sums} "
            );
            (head, marker_select.replacen("SELECT ", "SELECT toUInt16(0), ", 1))
        }
    };
    let mut sql = Sql::new(head);
    sql.binds.push(written.clone());
    sql.push("FROM events WHERE kafka_topic = ? AND written_at >= toDateTime(?) AND (", [s(topic), i(i64::from(since))]);
    sql.append(offset_ranges(ranges));
    sql.push(")", []);
    match rollup {
        Rollup::Minute | Rollup::UserDaily => sql.push(" GROUP BY tenant, w, user_id, customer_id, feature, model, environment, billable", []),
        Rollup::Dims => sql.push(" GROUP BY tenant, w, feature, model, environment, billable", []),
        Rollup::UserSpans => {
            let lengths = SPAN_DAYS.map(|d| d.to_string()).join(", ");
            sql.push(&format!(" GROUP BY s_tenant, s_day, s_user, s_customer) ARRAY JOIN [{lengths}] AS span"), [])
        }
    };
    sql.push(" UNION ALL ", []);
    sql.append(repeat(ranges, " UNION ALL ", &marker_select, |r| {
        vec![s(topic), i(i64::from(r.partition)), i(r.up_to), written.clone()]
    }));
    sql
}

pub const OPEN_ALERTS: &str = "SELECT ?fields FROM alerts FINAL WHERE state = 'open'";

/// What a runaway rule sums per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSum {
    Cost,
    /// Cost minus revenue.
    Loss,
}

/// Per-user sums for a tenant since a time (as of `now`), for the named
/// users or (with `None`, or none named) every user.
///
/// Whole UTC days from `since` through `now`'s day come from the per-user
/// spans (about four rows per user for a month), the rest (a partial first
/// day, and anything stamped after today) from minute rows: the week and
/// month-to-date rules run beside every flush, and read over minutes alone
/// they scanned every user's minutes of the month (late events spread those
/// over every day), which took more of ClickHouse's core than the writes;
/// reading today from minutes scanned every minute of the day so far, a
/// read that grew all day. A sum from `since` has no end, so today's day row
/// needs nothing taken off. Both tables get each flush's events from the
/// same rows, so the sum is the same.
///
/// One array rather than a placeholder per user: the client fills
/// placeholders by scanning from the first, so n of them cost n^2 (at 10,000
/// users a tenth of the aggregator's instructions), and ClickHouse 18.16
/// reads the array three to four times faster than a 10,000-element IN list.
pub fn user_sums(what: UserSum, tenant: &str, since: i64, now: i64, users: Option<&BTreeSet<String>>) -> Sql {
    let measure = match what {
        UserSum::Cost => "sum(cost_nanos)",
        UserSum::Loss => "sum(cost_nanos) - sum(revenue_nanos)",
    };
    let users = users.filter(|us| !us.is_empty()).map(|us| Value::Strs(us.iter().cloned().collect()));
    let only = |sql: &mut Sql| {
        if let Some(users) = &users {
            sql.push(" AND user_id IN (SELECT arrayJoin(?))", [users.clone()]);
        }
    };
    let tomorrow = now.div_euclid(86_400) * 86_400 + 86_400;
    let mut sql = Sql::new(format!("SELECT user_id, {measure} AS total FROM "));
    match whole_days(since, tomorrow) {
        Some((day_from, day_to)) => {
            sql.push("(SELECT user_id, cost_nanos, revenue_nanos FROM rollups_user_span WHERE tenant = ? AND (", [s(tenant)]);
            sql.append(span_condition(day_from, day_to, Granularity::Total));
            sql.push(")", []);
            only(&mut sql);
            sql.push(
                " UNION ALL SELECT user_id, cost_nanos, revenue_nanos FROM rollups_minute WHERE tenant = ? \
                 AND ((window_start >= toDateTime(?) AND window_start < toDateTime(?)) OR window_start >= toDateTime(?))",
                [s(tenant), i(since.max(0)), i(day_from), i(day_to)],
            );
            only(&mut sql);
            sql.push(")", []);
        }
        None => {
            sql.push("rollups_minute WHERE tenant = ? AND window_start >= toDateTime(?)", [s(tenant), i(since.max(0))]);
            only(&mut sql);
        }
    }
    sql.push(" GROUP BY user_id", []);
    sql
}

/// The offset ranges' last event already in `events`, per partition.
pub fn events_present(topic: &str, ranges: &[Range]) -> Sql {
    let mut sql = Sql::new("SELECT kafka_partition, max(kafka_offset) AS last_offset FROM events WHERE kafka_topic = ? AND (");
    sql.binds.push(s(topic));
    sql.append(offset_ranges(ranges));
    sql.push(") GROUP BY kafka_partition", []);
    sql
}

/// How many of the ranges' progress markers exist in `rollup`'s table.
pub fn markers_present(rollup: Rollup, topic: &str, ranges: &[Range]) -> Sql {
    let mut sql = Sql::new(format!("SELECT count() FROM {} WHERE tenant = '' AND source_topic = ? AND markers > 0 AND (", rollup.table()));
    sql.binds.push(s(topic));
    sql.append(repeat(ranges, " OR ", "(source_partition = ? AND source_offset = ?)", |r| vec![i(i64::from(r.partition)), i(r.up_to)]));
    sql.push(")", []);
    sql
}

/// The metered sum a limits counter is reconciled against (see
/// [`meterline_sql::metered_sum`]); `None` if it names a column outside the whitelist.
pub fn metered_sum(q: &MeteredSum) -> Option<Sql> {
    meterline_sql::metered_sum(Dialect::ClickHouse, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_writes_every_day_table_before_its_minutes() {
        // A day under way is read as its day rows minus minute rows: a flush
        // half written must never have minute rows without its day rows.
        let at = |r: Rollup| Rollup::ALL.iter().position(|x| *x == r);
        for day_table in [Rollup::UserSpans, Rollup::UserDaily, Rollup::Dims] {
            assert!(at(day_table) < at(Rollup::Minute), "{} is written after rollups_minute", day_table.table());
        }
        assert_eq!(Rollup::Minute.next(), None);
    }

    #[test]
    fn a_rule_reads_today_from_the_day_rows() {
        let now = 1_800_000_000; // 08:00 UTC
        let today = now / 86_400 * 86_400;
        let week = user_sums(UserSum::Cost, "acme", now - 7 * 86_400, now, None);
        // Spans up to tomorrow, minutes only for the first partial day and after today.
        assert!(week.binds.contains(&i(today + 86_400)), "{:?}", week.binds);
        assert!(week.text.contains("window_start >= toDateTime(?)"));
        let minute_binds = &week.binds[week.binds.len() - 3..];
        assert_eq!(minute_binds, [i(now - 7 * 86_400), i(today - 6 * 86_400), i(today + 86_400)]);
        // The trailing hour inside today stays on minutes.
        let hour = user_sums(UserSum::Cost, "acme", now - 3_600, now, None);
        assert!(!hour.text.contains("rollups_user_span"), "{}", hour.text);
    }
}
