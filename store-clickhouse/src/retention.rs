//! Retention in ClickHouse: drops the monthly partitions that lie wholly
//! before each table's horizon, carrying forward the progress markers that
//! still matter, and deletes resolved alerts past theirs.
//!
//! One mechanism on every server: `ALTER TABLE .. DROP PARTITION` by the
//! partition's *last* possible date (a month partition goes once the month
//! ended at least [`FUTURE_SLACK_SECS`] before the horizon), so no row inside
//! the window is ever dropped, and rows up to a month past it may stay. No
//! migration was needed: every time-series table is already partitioned by
//! month (alerts aside, below). TTL would do the
//! same on current servers, but 18.16 lacks it, and two mechanisms would
//! behave differently on the two engines the statements are proven on.
//! Dropping is idempotent (a partition already gone is no error), so any
//! number of aggregators may run it.
//!
//! Progress markers live in the rollup tables' partitions. Only the latest
//! marker of each Kafka partition matters (progress is their maximum), so
//! before a partition holding one is dropped it is written again at the
//! current time, same offset; older markers can no longer matter and go
//! with their month. Writing it again moves the repair's `written_at` bound
//! forward, so it is done only when no events past the marker await repair
//! (a crash's orphans): if any do, that table waits for the next run.
//!
//! `alerts` has no time partition (one row per state change of an alert,
//! ordered by key), so resolved alerts opened before the horizon are
//! deleted with a mutation, every version of them at once; open alerts stay
//! until resolved, since the runaway rules still track them.

use chrono::{DateTime, NaiveDate, Utc};
use meterline_domain::{Kept, Measure, RetentionConfig, Unit, datetime_secs};
use meterline_sql::{Sql, i, s};
use serde::Deserialize;

use crate::error::ClickHouseError;
use crate::statements::Rollup;
use crate::store::{Progress, Store};

/// The tables dropped by month, each with the rows it keeps and, for the
/// rollup tables, their progress markers.
const TABLES: &[(Kept, &str, Option<Rollup>)] = &[
    (Kept::Events, "events", None),
    (Kept::RollupsMinute, "rollups_minute", Some(Rollup::Minute)),
    (Kept::RollupsDaily, "rollups_user_span", Some(Rollup::UserSpans)),
    (Kept::RollupsDaily, "rollups_user_daily", Some(Rollup::UserDaily)),
    (Kept::RollupsDaily, "rollups_daily_by_dims", Some(Rollup::Dims)),
    (Kept::DeadLetters, "dead_letters", None),
    (Kept::BillingWindows, "billing_windows", None),
];

/// What one run removed from one table (partitions, or alert instances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    pub table: &'static str,
    pub partitions: u64,
    pub rows: u64,
    /// Not purged this run: events past a marker await repair.
    pub held: bool,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct PartRow {
    partition: String,
    rows: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct MarkerRow {
    topic: String,
    partition: i32,
    last_offset: i64,
    last_written: u32,
}

/// The first instant after the month partition `yyyymm`.
fn month_end(yyyymm: u32) -> Option<i64> {
    let (year, month) = (i32::try_from(yyyymm / 100).ok()?, yyyymm % 100);
    if !(1..=12).contains(&month) {
        return None;
    }
    let (year, month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    Some(NaiveDate::from_ymd_opt(year, month, 1)?.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

/// Slack between a partition's last `written_at` and the horizon: a row's
/// event time (or window) may be ahead of when it was written by up to
/// ingest's `events.max_future_secs` (default 5 minutes), and such a row
/// must not go while its time is still inside the window.
pub const FUTURE_SLACK_SECS: i64 = 86_400;

/// The month partitions (YYYYMM) whose every possible row is before
/// `oldest`: chosen by the month's end, never its start.
pub fn expired(partitions: &[u32], oldest: DateTime<Utc>) -> Vec<u32> {
    partitions.iter().copied().filter(|p| month_end(*p).is_some_and(|end| end + FUTURE_SLACK_SECS <= oldest.timestamp())).collect()
}

/// The active partitions of `table` in this database, with their rows.
fn parts(table: &str) -> Sql {
    let mut sql = Sql::new(
        "SELECT partition_id AS partition, sum(rows) AS rows FROM system.parts \
         WHERE database = currentDatabase() AND table = ? AND active GROUP BY partition_id ORDER BY partition_id",
    );
    sql.binds.push(s(table));
    sql
}

/// `table` is one of [`TABLES`]: a constant, never input.
fn drop_partition(table: &str, yyyymm: u32) -> Sql {
    let mut sql = Sql::new(format!("ALTER TABLE {table} DROP PARTITION ?"));
    sql.binds.push(i(i64::from(yyyymm)));
    sql
}

/// The latest marker of each Kafka partition in `rollup`'s table, for those
/// written before `before` (Unix seconds).
fn latest_markers(rollup: Rollup, before: i64) -> Sql {
    let mut sql = Sql::new(format!(
        "SELECT source_topic AS topic, source_partition AS partition, max(source_offset) AS last_offset, max(written_at) AS last_written \
         FROM {} WHERE tenant = '' AND markers > 0 GROUP BY source_topic, source_partition HAVING last_written < toDateTime(?)",
        rollup.table()
    ));
    sql.binds.push(i(before));
    sql
}

/// The marker again, written at `written_at`: the shape of the flush's own
/// markers (`statements::rollups_from_events`), zero sums and `markers = 1`.
fn carry_marker(rollup: Rollup, m: &MarkerRow, written_at: u32) -> Sql {
    let measures = Measure::ALL.map(Measure::column).join(", ");
    let zeros = Measure::ALL.map(|m| if m.unit() == Unit::Nanos { "toInt64(0)" } else { "toUInt64(0)" }).join(", ");
    let (span_column, span_value) = if rollup == Rollup::UserSpans { ("span_days, ", "toUInt16(0), ") } else { ("", "") };
    let mut sql = Sql::new(format!(
        "INSERT INTO {} ({span_column}tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
         source_topic, source_partition, source_offset, {measures}, markers, written_at) \
         SELECT {span_value}'', toDateTime(0), '', '', '', '', '', toUInt8(0), ?, toInt32(?), toInt64(?), {zeros}, toUInt64(1), toDateTime(?)",
        rollup.table()
    ));
    sql.binds.extend([s(m.topic.clone()), i(i64::from(m.partition)), i(m.last_offset), i(i64::from(written_at))]);
    sql
}

const RESOLVED_BEFORE: &str = "FROM alerts FINAL WHERE state = 'resolved' AND opened_at < toDateTime(?)";

/// Resolved alerts opened before a time.
fn alerts_due(before: i64) -> Sql {
    let mut sql = Sql::new(format!("SELECT count() {RESOLVED_BEFORE}"));
    sql.binds.push(i(before));
    sql
}

/// Every version of those alerts: deleting only the resolved one would bring an older open one back.
fn delete_alerts(before: i64) -> Sql {
    let mut sql = Sql::new(format!("ALTER TABLE alerts DELETE WHERE (tenant, user_id, rule, opened_at) IN (SELECT tenant, user_id, rule, opened_at {RESOLVED_BEFORE})"));
    sql.binds.push(i(before));
    sql
}

impl Store {
    /// One retention run as of `now`: every table's expired partitions, and
    /// the resolved alerts past their horizon.
    pub async fn purge(&self, retention: &RetentionConfig, now: DateTime<Utc>) -> Result<Vec<Purged>, ClickHouseError> {
        let mut out = Vec::new();
        for &(kept, table, rollup) in TABLES {
            let Some(oldest) = retention.oldest(kept, now) else { continue };
            let found: Vec<PartRow> = self.query(&parts(table)).fetch_all().await?;
            let months: Vec<u32> = found.iter().filter_map(|p| p.partition.parse().ok()).collect();
            let drop = expired(&months, oldest);
            let Some(boundary) = drop.iter().filter_map(|p| month_end(*p)).max() else { continue };
            if let Some(rollup) = rollup
                && !self.carry_markers(rollup, boundary, now).await?
            {
                out.push(Purged { table, partitions: 0, rows: 0, held: true });
                continue;
            }
            let mut purged = Purged { table, partitions: 0, rows: 0, held: false };
            for p in drop {
                self.query(&drop_partition(table, p)).execute().await?;
                purged.partitions += 1;
                purged.rows += found.iter().filter(|f| f.partition == p.to_string()).map(|f| f.rows).sum::<u64>();
                tracing::info!(table, partition = p, oldest_kept = %oldest, "dropped a partition past retention");
            }
            out.push(purged);
        }
        if let Some(oldest) = retention.oldest(Kept::Alerts, now) {
            let due: u64 = self.query(&alerts_due(oldest.timestamp())).fetch_one().await?;
            if due > 0 {
                self.query(&delete_alerts(oldest.timestamp())).execute().await?;
                out.push(Purged { table: "alerts", partitions: 0, rows: due, held: false });
            }
        }
        Ok(out)
    }

    /// Writes again, at `now`, each Kafka partition's latest marker written
    /// before `boundary`; false (nothing written for the rest) if one of them
    /// has events past it awaiting repair.
    async fn carry_markers(&self, rollup: Rollup, boundary: i64, now: DateTime<Utc>) -> Result<bool, ClickHouseError> {
        let latest: Vec<MarkerRow> = self.query(&latest_markers(rollup, boundary)).fetch_all().await?;
        for m in &latest {
            let progress = Progress { rollup_offset: Some(m.last_offset), marker_written_at: m.last_written };
            if self.orphans(&m.topic, m.partition, progress).await?.is_some() {
                tracing::warn!(table = rollup.table(), topic = %m.topic, partition = m.partition, "retention waits: events past the last marker await repair");
                return Ok(false);
            }
        }
        for m in &latest {
            self.query(&carry_marker(rollup, m, datetime_secs(now))).execute().await?;
        }
        Ok(true)
    }
}

/// Every retention statement with sample values, for the compatibility
/// check. The carried marker is written in January 2001 and that month
/// dropped again, so the check's own sample sums are unchanged.
pub(crate) fn compat_statements() -> Vec<String> {
    let old = 978_307_200; // 2001-01-01
    let marker = MarkerRow { topic: "it's".into(), partition: 3, last_offset: 42, last_written: old };
    let mut out = Vec::new();
    for &(_, table, rollup) in TABLES {
        out.push(parts(table).render(""));
        if let Some(rollup) = rollup {
            out.push(latest_markers(rollup, i64::from(old) + 86_400).render(""));
            out.push(carry_marker(rollup, &marker, old).render(""));
        }
        out.push(drop_partition(table, 200_101).render(""));
    }
    out.push(alerts_due(i64::from(old)).render(""));
    out.push(delete_alerts(i64::from(old)).render(""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).map(|t| t.to_utc()).unwrap_or_default()
    }

    #[test]
    fn a_month_goes_only_once_it_is_wholly_before_the_horizon() {
        let months = [202411, 202412, 202501, 202502];
        assert_eq!(expired(&months, at("2025-02-01T00:00:00Z")), vec![202411, 202412]);
        assert_eq!(expired(&months, at("2025-02-02T00:00:00Z")), vec![202411, 202412, 202501]);
        assert_eq!(expired(&[199913, 0], at("2025-02-01T00:00:00Z")), Vec::<u32>::new());
        assert_eq!(month_end(202412), Some(at("2025-01-01T00:00:00Z").timestamp()));
    }

    #[test]
    fn statements_bind_their_values() {
        let sql = drop_partition("events", 202501);
        assert_eq!((sql.text.as_str(), sql.binds.clone()), ("ALTER TABLE events DROP PARTITION ?", vec![i(202501)]));
        let marker = MarkerRow { topic: "t".into(), partition: 2, last_offset: 9, last_written: 5 };
        let span = carry_marker(Rollup::UserSpans, &marker, 7);
        assert!(span.text.starts_with("INSERT INTO rollups_user_span (span_days, tenant,") && span.text.contains("SELECT toUInt16(0), ''"), "{}", span.text);
        assert_eq!(span.binds, vec![s("t"), i(2), i(9), i(7)]);
        assert!(compat_statements().iter().all(|s| !s.contains('?')));
    }
}
