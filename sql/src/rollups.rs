//! The statement pieces both stores' rollup queries share: the summed
//! measures, the grouped dimensions and their keys, ranking orders, and the
//! plan that picks which rollup rows answer a request.

use meterline_domain::{DAY_SECS, Granularity, Measure, Metric, TimeColumn, whole_days};

use crate::builder::{Sql, i, s};
use crate::scope::Scope;

/// The summed columns, named as `SumRow` reads them (valid SQL for every
/// store), from the measures registry.
pub fn sums() -> String {
    sums_as("s_")
}

/// [`sums`] with aliases starting `prefix` instead of `s_` (partial sums
/// that an outer query sums again).
pub fn sums_as(prefix: &str) -> String {
    signed_sums_as(prefix, "")
}

/// [`sums_as`] negated, for rows a read subtracts, where integers are
/// signed (SQLite's).
pub fn negated_sums_as(prefix: &str) -> String {
    signed_sums_as(prefix, "-")
}

fn signed_sums_as(prefix: &str, sign: &str) -> String {
    Measure::ALL
        .iter()
        .map(|m| format!("{sign}sum({}) AS {prefix}{}", m.column(), &m.alias()[2..]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sums of `prefix`-named partial sums, named as `SumRow` reads them.
pub fn resums(prefix: &str) -> String {
    Measure::ALL
        .iter()
        .map(|m| format!("sum({prefix}{}) AS {}", &m.alias()[2..], m.alias()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The dimensions a request may filter or group by, with their columns.
pub const DIMENSIONS: &[&str] = &["user_id", "customer_id", "feature", "model"];

/// The alias of a grouped dimension (as `SumRow` reads it).
fn alias(dimension: &str) -> &'static str {
    match dimension {
        "user_id" => "g_user",
        "customer_id" => "g_customer",
        "feature" => "g_feature",
        _ => "g_model",
    }
}

/// The grouped dimension columns with their aliases; '' for the others.
pub fn dims(group_by: &[&str]) -> String {
    // Aliases differ from column names on purpose: ClickHouse 18.16 resolves a
    // WHERE name to a same-named SELECT alias.
    DIMENSIONS
        .iter()
        .map(|col| if group_by.contains(col) { format!("{col} AS {}", alias(col)) } else { format!("'' AS {}", alias(col)) })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The GROUP BY keys: the grouped dimensions' columns and the bucket, but
/// no constant: with constant keys ClickHouse 18.16 hashes every key
/// serialized together (and SQLite sorts), where one string key alone has a
/// fast path. The bucket stays when there is nothing else, so that no rows
/// give no group on every server.
pub fn group_keys(granularity: Granularity, group_by: &[&str]) -> String {
    let mut keys: Vec<&str> = group_by.iter().map(|d| alias(d)).collect();
    if granularity != Granularity::Total || keys.is_empty() {
        keys.push("g_bucket");
    }
    keys.join(", ")
}

/// The ORDER BY expression of a ranking metric.
pub fn metric_order(metric: Metric) -> &'static str {
    match metric {
        Metric::Tokens => "s_input + s_output + s_cached + s_reasoning",
        Metric::Revenue => "s_revenue",
        Metric::Margin => "s_revenue - s_cost",
        Metric::Cost => "s_cost",
    }
}

/// Lowest margin first, then by key.
pub const BY_MARGIN: &str = " ORDER BY s_revenue - s_cost, g_user, g_customer, g_feature, g_model";
/// Bucket, then key order.
pub const BY_BUCKET: &str = " ORDER BY g_bucket, g_user, g_customer, g_feature, g_model";
/// Only groups whose revenue is below their cost.
pub const NEGATIVE_ONLY: &str = " HAVING s_revenue - s_cost < 0";

/// Where an answer in [`BY_BUCKET`] order resumes: after the group with
/// these keys ('' for a dimension not grouped, as [`dims`] selects it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupCursor {
    pub bucket: i64,
    pub user: String,
    pub customer: String,
    pub feature: String,
    pub model: String,
}

/// Only groups with events. A day read as its day rows minus the minute
/// rows after `to` ([`split_days`]) leaves a group of zeros for a key whose
/// rows there all lie after `to`; a group with rows in the range has events.
pub const HAS_EVENTS: &str = "s_events != 0";

/// The HAVING clause of grouped sums: only groups with events
/// ([`HAS_EVENTS`]), only negative margins if asked, and only the groups
/// after `after` in [`BY_BUCKET`] order (keyset paging: the keys are unique
/// per group, so no group is skipped or repeated between pages, and both
/// stores compare strings bytewise).
pub fn having(negative_only: bool, after: Option<&GroupCursor>) -> Sql {
    let mut conditions = vec![Sql::new(HAS_EVENTS)];
    if negative_only {
        conditions.push(Sql::new("s_revenue - s_cost < 0"));
    }
    if let Some(c) = after {
        // Spelled out rather than a tuple comparison, which ClickHouse 18.16
        // and SQLite do not share.
        let mut sql = Sql::new(
            "(g_bucket > ? OR (g_bucket = ? AND (g_user > ? OR (g_user = ? AND (g_customer > ? OR (g_customer = ? \
             AND (g_feature > ? OR (g_feature = ? AND g_model > ?))))))))",
        );
        sql.binds = vec![
            i(c.bucket),
            i(c.bucket),
            s(c.user.clone()),
            s(c.user.clone()),
            s(c.customer.clone()),
            s(c.customer.clone()),
            s(c.feature.clone()),
            s(c.feature.clone()),
            s(c.model.clone()),
        ];
        conditions.push(sql);
    }
    let mut out = Sql::new(" HAVING ");
    out.append(Sql::join(conditions, " AND "));
    out
}

/// Which rollup rows answer a request. Whole UTC days of window time come
/// from a daily rollup when one holds every dimension the request groups or
/// filters by, and the range's partial edge days from minute rows:
/// - no user or customer in it (grouped by feature or model, filtered by
///   feature, model, environment or billable, or neither): the per-dimension
///   daily rows, about a day's distinct (feature, model, environment,
///   billable) rows whatever the users;
/// - only users and customers: the per-user daily rows;
/// - anything else, or minute and hour buckets: minute rows throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Minute rows over `[from, to)`.
    Minutes { from: i64, to: i64 },
    /// Per-user daily rows over `[day_from, day_to)`, minute rows over `[from, day_from)` and `[day_to, to)`.
    Days { from: i64, day_from: i64, day_to: i64, to: i64 },
    /// Per-dimension daily rows over `[day_from, day_to)`, minute rows over the edges.
    DimDays { from: i64, day_from: i64, day_to: i64, to: i64 },
}

pub fn plan(scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Plan {
    let days_ok = granularity.whole_days() && scope.time_column == TimeColumn::WindowStart;
    let only = |allowed: &[&str]| group_by.iter().all(|d| allowed.contains(d)) && scope.filters.iter().all(|(c, _)| allowed.contains(c));
    let (from, to) = (scope.from.timestamp(), scope.to.timestamp());
    match whole_days(from, to) {
        Some((day_from, day_to)) if days_ok && only(&["feature", "model", "environment", "billable"]) => Plan::DimDays { from, day_from, day_to, to },
        Some((day_from, day_to)) if days_ok && only(&["user_id", "customer_id"]) => Plan::Days { from, day_from, day_to, to },
        _ => Plan::Minutes { from, to },
    }
}

/// The rows a day plan (`Plan::Days`, `Plan::DimDays`, or a question about
/// one user) sums: day rows over `days`, minute rows added over `plus` and
/// subtracted over `minus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaySplit {
    pub days: (i64, i64),
    pub plus: Vec<(i64, i64)>,
    pub minus: Vec<(i64, i64)>,
}

/// How the range `[from, to)` with whole days `[day_from, day_to)` is read at
/// `now`. The left edge `[from, day_from)` is read from minute rows. The
/// right edge `[day_to, to)` is read either so, or as its whole day's rows
/// minus the minute rows of `[to, day_to + 1 day)`, whichever reads fewer
/// minute rows, counting only time up to `now` (minute rows after `now` are
/// few: only events stamped ahead of the clock). A dashboard's `to` is
/// usually now, so its last day is read as that day's rows, whatever the
/// hour, where the minute rows of the day so far grow all day.
///
/// Exact in integers: a day row is the sum of that day's minute rows, every
/// store writes a flush's day rows no later than its minute rows (the
/// aggregator's stage order; the embedded store's one transaction), so the
/// difference never counts a minute row its day row lacks. The left edge
/// keeps its minute rows: its complement lies before `from`, where retention
/// may already have dropped the day rows the check at the range's start
/// does not cover.
pub fn split_days(from: i64, (day_from, day_to): (i64, i64), to: i64, now: i64) -> DaySplit {
    let mut split = DaySplit { days: (day_from, day_to), plus: Vec::new(), minus: Vec::new() };
    if from < day_from {
        split.plus.push((from, day_from));
    }
    if to > day_to {
        let rows_until = |a: i64, b: i64| (b.min(now) - a).max(0);
        let day_end = day_to + DAY_SECS;
        if rows_until(to, day_end) < rows_until(day_to, to) {
            split.days.1 = day_end;
            if to < day_end {
                split.minus.push((to, day_end));
            }
        } else {
            split.plus.push((day_to, to));
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_come_from_the_registry_as_before() {
        assert_eq!(
            sums(),
            "sum(events) AS s_events, sum(input_tokens) AS s_input, sum(output_tokens) AS s_output, \
             sum(cached_input_tokens) AS s_cached, sum(reasoning_tokens) AS s_reasoning, sum(cost_nanos) AS s_cost, \
             sum(revenue_nanos) AS s_revenue, sum(credits_nanos) AS s_credits, sum(unpriced_events) AS s_unpriced"
        );
        assert!(resums("p_").starts_with("sum(p_events) AS s_events, sum(p_input) AS s_input"));
        assert_eq!(group_keys(Granularity::Total, &["model", "user_id"]), "g_model, g_user");
        assert_eq!(group_keys(Granularity::Total, &[]), "g_bucket");
        assert_eq!(dims(&["feature"]), "'' AS g_user, '' AS g_customer, feature AS g_feature, '' AS g_model");
    }

    #[test]
    fn plans_read_the_daily_rows_that_hold_every_dimension_asked() {
        use chrono::DateTime;
        let scope = |filters: Vec<(&'static str, crate::Value)>| Scope {
            tenant: "t".into(),
            time_column: TimeColumn::WindowStart,
            from: DateTime::from_timestamp(86_400 * 10 + 600, 0).unwrap_or_default(),
            to: DateTime::from_timestamp(86_400 * 40 + 60, 0).unwrap_or_default(),
            filters,
        };
        let (from, day_from, day_to, to) = (86_400 * 10 + 600, 86_400 * 11, 86_400 * 40, 86_400 * 40 + 60);
        let dims = Plan::DimDays { from, day_from, day_to, to };
        let users = Plan::Days { from, day_from, day_to, to };
        let minutes = Plan::Minutes { from, to };
        assert_eq!(plan(&scope(vec![]), Granularity::Day, &["model"]), dims);
        assert_eq!(plan(&scope(vec![("environment", s("prod")), ("billable", i(1))]), Granularity::Total, &["feature", "model"]), dims);
        assert_eq!(plan(&scope(vec![]), Granularity::Total, &[]), dims);
        assert_eq!(plan(&scope(vec![]), Granularity::Total, &["user_id"]), users);
        assert_eq!(plan(&scope(vec![("customer_id", s("c"))]), Granularity::Month, &["user_id"]), users);
        assert_eq!(plan(&scope(vec![("customer_id", s("c"))]), Granularity::Day, &["model"]), minutes);
        assert_eq!(plan(&scope(vec![]), Granularity::Day, &["model", "user_id"]), minutes);
        assert_eq!(plan(&scope(vec![]), Granularity::Hour, &["model"]), minutes);
        let mut by_event_time = scope(vec![]);
        by_event_time.time_column = TimeColumn::EventTime;
        assert_eq!(plan(&by_event_time, Granularity::Day, &["model"]), minutes);
        let short = scope(vec![]).with_range(86_400 * 10 + 600, 86_400 * 11 + 60);
        assert_eq!(plan(&short, Granularity::Day, &["model"]), Plan::Minutes { from, to: 86_400 * 11 + 60 });
    }

    #[test]
    fn a_last_day_under_way_is_read_as_its_day_row_minus_what_follows() {
        let day = 86_400 * 40;
        let (from, whole) = (86_400 * 10 + 600, (86_400 * 11, day));
        // `to` is now, early in the day: the day row, minus the minute rows after now.
        let split = split_days(from, whole, day + 3_600, day + 3_600);
        assert_eq!(split, DaySplit { days: (86_400 * 11, day + 86_400), plus: vec![(from, 86_400 * 11)], minus: vec![(day + 3_600, day + 86_400)] });
        // `to` hours past now: the day row alone would do, the minus range is kept anyway.
        assert_eq!(split_days(from, whole, day + 7_200, day + 3_600).minus, vec![(day + 7_200, day + 86_400)]);
        // A past day: whichever side of `to` is shorter.
        let past = day + 5 * 86_400;
        assert_eq!(split_days(from, whole, day + 3_600, past).plus, vec![(from, 86_400 * 11), (day, day + 3_600)]);
        assert_eq!(split_days(from, whole, day + 80_000, past).minus, vec![(day + 80_000, day + 86_400)]);
        // Halves read the same: minute rows as before.
        assert_eq!(split_days(from, whole, day + 43_200, past).days, whole);
        // A range in the future has no rows on either side: minute rows as before.
        assert_eq!(split_days(from, whole, day + 3_600, day - 10).days, whole);
        // No edges.
        assert_eq!(split_days(86_400 * 11, whole, day, day + 10), DaySplit { days: whole, plus: vec![], minus: vec![] });
    }

    #[test]
    fn pages_resume_after_the_last_keys_bound() {
        assert_eq!(having(false, None).text, " HAVING s_events != 0");
        assert_eq!(having(true, None).text, " HAVING s_events != 0 AND s_revenue - s_cost < 0");
        let c = GroupCursor { bucket: 86_400, user: "it's".into(), ..GroupCursor::default() };
        let sql = having(true, Some(&c));
        assert!(sql.text.starts_with(" HAVING s_events != 0 AND s_revenue - s_cost < 0 AND (g_bucket > ? OR (g_bucket = ? AND (g_user > ?"), "{}", sql.text);
        assert!(!sql.text.contains("it's"));
        assert_eq!(sql.binds.len(), 9);
        assert_eq!(sql.binds[..3], [i(86_400), i(86_400), s("it's")]);
        assert_eq!(sql.text.matches('(').count(), sql.text.matches(')').count());
    }
}
