//! The query API's statements in ClickHouse's dialect, built from a
//! request's [`Scope`]: which rollup rows answer it (per-user spans, the
//! user-first daily table, the daily rows by dimension, minutes), and the sums, rankings, audit trail and
//! alerts over them. Pure but for the clock, which only picks between reads
//! that sum the same rows ([`split_days`]): the compatibility check renders
//! the same builders.

use meterline_domain::{Granularity, Measure, Metric, TimeColumn, Unit, spans};
use meterline_sql::{BY_BUCKET, BY_MARGIN, Dialect, GroupCursor, HAS_EVENTS, Plan, Scope, Sql, dims, group_keys, having, i, metric_order, plan, split_days, sums as sum_columns};

const CH: Dialect = Dialect::ClickHouse;

/// The bucket expression of a granularity. Buckets are UTC whatever the
/// server's time zone: without the explicit zone, ClickHouse starts hours,
/// days and months at the server's local midnight (a server in Asia/Kolkata
/// would put UTC days' rows into days starting 18:30 UTC), while windows,
/// whole-day rollups and the embedded store are all UTC.
pub fn bucket(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Minute => "window_start",
        Granularity::Hour => "toStartOfHour(window_start, 'UTC')",
        Granularity::Day => "toStartOfDay(window_start, 'UTC')",
        Granularity::Month => "toDateTime(toStartOfMonth(window_start, 'UTC'), 'UTC')",
        Granularity::Total => "toDateTime(0)",
    }
}

/// The columns both branches of a whole-days-plus-edges source give the sums.
const ROLLUP_COLUMNS: &str = "window_start, user_id, customer_id, feature, model, environment, billable, events, \
     input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, revenue_nanos, credits_nanos, unpriced_events";

/// The `rollups_user_span` rows covering the whole days `[day_from, day_to)`:
/// for a total, the fewest aligned spans (about four for 30 days); for day
/// or month buckets, the one-day rows. Consecutive spans of one length
/// become one range condition.
pub(crate) fn span_condition(day_from: i64, day_to: i64, granularity: Granularity) -> Sql {
    let spans = if granularity == Granularity::Total {
        spans(day_from / 86_400, day_to / 86_400)
    } else {
        (day_from / 86_400..day_to / 86_400).map(|d| (1, d)).collect()
    };
    let mut runs: Vec<(i64, i64, i64)> = Vec::new();
    for (span, day) in spans {
        match runs.last_mut() {
            Some((s, _, end)) if *s == span && *end == day => *end += span,
            _ => runs.push((span, day, day + span)),
        }
    }
    meterline_sql::repeat(runs, " OR ", "(span_days = ? AND window_start >= toDateTime(?) AND window_start < toDateTime(?))", |(span, first, end)| {
        vec![i(span), i(first * 86_400), i(end * 86_400)]
    })
}

/// Whole UTC days `[day_from, day_to)` of a request about one user that
/// `rollups_user_daily` (every dimension, ordered user first) can answer:
/// day, month or total buckets over window time, with at least one whole day.
pub fn one_user_days(scope: &Scope, granularity: Granularity) -> Option<(i64, i64)> {
    if !scope.one_user() || !granularity.whole_days() || scope.time_column != TimeColumn::WindowStart {
        return None;
    }
    meterline_domain::whole_days(scope.from.timestamp(), scope.to.timestamp())
}

/// [`ROLLUP_COLUMNS`] with every measure negated, for minute rows a read
/// subtracts. Unsigned measures are negated in two's complement
/// (`bitNot(x) + 1`, still `UInt64`, as UNION ALL needs the same types in
/// every branch): `sum` wraps modulo 2^64, so a total that is not negative
/// comes out exact.
fn negated_columns() -> String {
    ROLLUP_COLUMNS
        .split(", ")
        .map(|c| match Measure::ALL.iter().find(|m| m.column() == c).map(|m| m.unit()) {
            Some(Unit::Nanos) => format!("-{c} AS {c}"),
            Some(Unit::Events | Unit::Tokens) => format!("bitNot({c}) + 1 AS {c}"),
            None => c.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whole days from `table` (the rows `days` selects for a day range) plus
/// the range's partial edge days from `rollups_minute`, as one UNION ALL; a
/// last day under way is its day's rows minus the minute rows after `to`
/// ([`split_days`]).
pub(crate) fn days_and_edges(scope: &Scope, table: &str, days: impl Fn((i64, i64)) -> Sql, whole: (i64, i64)) -> Sql {
    let split = split_days(scope.from.timestamp(), whole, scope.to.timestamp(), chrono::Utc::now().timestamp());
    let mut sql = Sql::new(format!(" FROM (SELECT {ROLLUP_COLUMNS} FROM {table} WHERE "));
    sql.append(days(split.days));
    if !split.plus.is_empty() {
        sql.push(&format!(" UNION ALL SELECT {ROLLUP_COLUMNS} FROM rollups_minute WHERE "), []);
        sql.append(scope.clause(CH, &split.plus));
    }
    if !split.minus.is_empty() {
        sql.push(&format!(" UNION ALL SELECT {} FROM rollups_minute WHERE ", negated_columns()), []);
        sql.append(scope.clause(CH, &split.minus));
    }
    sql.push(")", []);
    sql
}

/// Minute rows in the union of `ranges`, as a FROM clause (with its WHERE).
fn minutes(scope: &Scope, ranges: &[(i64, i64)]) -> Sql {
    let mut sql = Sql::new(" FROM rollups_minute WHERE ");
    sql.append(scope.clause(CH, ranges));
    sql
}

/// The rows a request sums over, as a FROM clause (with its WHERE); see
/// [`plan`]. A request about one user reads its whole days from
/// `rollups_user_daily` instead, whatever it groups or filters by.
pub fn source(scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Sql {
    let days = |range: (i64, i64)| scope.clause(CH, &[range]);
    if let Some(whole) = one_user_days(scope, granularity) {
        return days_and_edges(scope, "rollups_user_daily", days, whole);
    }
    match plan(scope, granularity, group_by) {
        Plan::Minutes { from, to } => minutes(scope, &[(from, to)]),
        Plan::DimDays { day_from, day_to, .. } => days_and_edges(scope, "rollups_daily_by_dims", days, (day_from, day_to)),
        Plan::Days { day_from, day_to, .. } => {
            let spans = |(day_from, day_to)| scope.clause_on(span_condition(day_from, day_to, granularity));
            days_and_edges(scope, "rollups_user_span", spans, (day_from, day_to))
        }
    }
}

/// Sums grouped by bucket and dimensions, in bucket then key order (or
/// lowest margin first).
pub fn sums(scope: &Scope, granularity: Granularity, group_by: &[&str], having_negative: bool, order_by_margin: bool, limit: i64) -> Sql {
    grouped_sums(scope, granularity, group_by, having(having_negative, None), if order_by_margin { BY_MARGIN } else { BY_BUCKET }, limit)
}

/// Sums in bucket then key order, only the groups after `after`: one page
/// of a grouped answer.
pub fn sums_after(scope: &Scope, granularity: Granularity, group_by: &[&str], having_negative: bool, after: Option<&GroupCursor>, limit: i64) -> Sql {
    grouped_sums(scope, granularity, group_by, having(having_negative, after), BY_BUCKET, limit)
}

fn grouped_sums(scope: &Scope, granularity: Granularity, group_by: &[&str], having: Sql, order: &str, limit: i64) -> Sql {
    let mut sql = Sql::new(format!("SELECT toUInt32({}) AS g_bucket, {}, {}", bucket(granularity), dims(group_by), sum_columns()));
    sql.append(source(scope, granularity, group_by));
    sql.push(&format!(" GROUP BY {}", group_keys(granularity, group_by)), []);
    sql.append(having);
    sql.push(order, []);
    sql.push(" LIMIT ?", [i(limit)]);
    sql
}

/// The top `limit` keys of dimension `by` ordered by `metric`.
pub fn top(scope: &Scope, by: &str, metric: Metric, descending: bool, limit: i64) -> Sql {
    let dir = if descending { "DESC" } else { "ASC" };
    let mut sql = Sql::new(format!("SELECT toUInt32(0) AS g_bucket, {}, {}", dims(&[by]), sum_columns()));
    sql.append(source(scope, Granularity::Total, &[by]));
    sql.push(
        &format!(" GROUP BY {} HAVING {HAS_EVENTS} ORDER BY {} {dir}, g_user, g_customer LIMIT ?", group_keys(Granularity::Total, &[by]), metric_order(metric)),
        [i(limit)],
    );
    sql
}

/// Every group's sums over the scope, unordered: what the ranking cache
/// keeps for a range's whole hours.
pub fn groups(scope: &Scope, group_by: &[&str]) -> Sql {
    grouped_totals(source(scope, Granularity::Total, group_by), group_by)
}

/// Every group's sums over minute windows in `ranges` (a range's partial-hour edges).
pub fn edge_groups(scope: &Scope, group_by: &[&str], ranges: &[(i64, i64)]) -> Sql {
    grouped_totals(minutes(scope, ranges), group_by)
}

/// Each group's sums over the rows of `from`, unordered.
fn grouped_totals(from: Sql, group_by: &[&str]) -> Sql {
    let mut sql = Sql::new(format!("SELECT toUInt32(0) AS g_bucket, {}, {}", dims(group_by), sum_columns()));
    sql.append(from);
    sql.push(&format!(" GROUP BY {} HAVING {HAS_EVENTS}", group_keys(Granularity::Total, group_by)), []);
    sql
}

/// The events in the rows [`groups`] reads for the same scope and grouping:
/// one column, no grouping, so a cached answer can be checked cheaply.
pub fn event_count(scope: &Scope, group_by: &[&str]) -> Sql {
    let mut sql = Sql::new("SELECT sum(events) AS n");
    sql.append(source(scope, Granularity::Total, group_by));
    sql
}

/// How many groups have a negative margin.
pub fn negative_count(scope: &Scope, group_by: &[&str]) -> Sql {
    let mut sql = Sql::new(format!("SELECT count() FROM (SELECT {}, sum(revenue_nanos) - sum(cost_nanos) AS m", dims(group_by)));
    sql.append(source(scope, Granularity::Total, group_by));
    sql.push(&format!(" GROUP BY {} HAVING m < 0)", group_keys(Granularity::Total, group_by)), []);
    sql
}

