//! The statements behind each endpoint, built from a request's scope. Pure:
//! the compatibility check renders the same builders with sample values.

use serde::Deserialize;

use crate::params::Scope;
use crate::sql::{Sql, i};

/// Sums over rollup rows; dimension columns are '' where not grouped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clickhouse::Row)]
pub struct SumRow {
    pub g_bucket: u32,
    pub g_user: String,
    pub g_customer: String,
    pub g_feature: String,
    pub g_model: String,
    pub s_events: u64,
    pub s_input: u64,
    pub s_output: u64,
    pub s_cached: u64,
    pub s_reasoning: u64,
    pub s_cost: i64,
    pub s_revenue: i64,
    pub s_credits: i64,
    pub s_unpriced: u64,
}

impl SumRow {
    pub fn tokens(&self) -> u64 {
        self.s_input + self.s_output + self.s_cached + self.s_reasoning
    }
}

/// The bucket expression of a granularity (a fixed set, never user text).
/// Buckets are UTC whatever the server's time zone: without the explicit
/// zone, ClickHouse starts hours, days and months at the server's local
/// midnight (a server in Asia/Kolkata would put UTC days' rows into days
/// starting 18:30 UTC), while windows, whole-day rollups and the embedded
/// store are all UTC.
pub fn bucket(granularity: &str) -> &'static str {
    match granularity {
        "minute" => "window_start",
        "hour" => "toStartOfHour(window_start, 'UTC')",
        "day" => "toStartOfDay(window_start, 'UTC')",
        "month" => "toDateTime(toStartOfMonth(window_start, 'UTC'), 'UTC')",
        _ => "toDateTime(0)",
    }
}

/// The summed columns, named as [`SumRow`] reads them (valid SQL for every store).
pub const SUMS: &str = "sum(events) AS s_events, sum(input_tokens) AS s_input, sum(output_tokens) AS s_output, \
     sum(cached_input_tokens) AS s_cached, sum(reasoning_tokens) AS s_reasoning, sum(cost_nanos) AS s_cost, \
     sum(revenue_nanos) AS s_revenue, sum(credits_nanos) AS s_credits, sum(unpriced_events) AS s_unpriced";

/// The grouped dimension columns with their aliases; '' for the others.
pub fn dims(group_by: &[&str]) -> String {
    // Aliases differ from column names on purpose: ClickHouse 18.16 resolves a
    // WHERE name to a same-named SELECT alias.
    [("user_id", "g_user"), ("customer_id", "g_customer"), ("feature", "g_feature"), ("model", "g_model")]
        .iter()
        .map(|(col, alias)| if group_by.contains(col) { format!("{col} AS {alias}") } else { format!("'' AS {alias}") })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which rollup rows answer a request. Whole UTC days come from the per-user
/// day rollups (`rollups_user_span` here), and the range's partial edge days
/// from `rollups_minute`, when the request needs nothing the per-user rows
/// drop: minute or hour buckets, or a feature, model, environment or billable
/// filter or grouping. Shared by every store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Minute rows over `[from, to)`.
    Minutes { from: i64, to: i64 },
    /// Daily rows over `[day_from, day_to)`, minute rows over `[from, day_from)` and `[day_to, to)`.
    Days { from: i64, day_from: i64, day_to: i64, to: i64 },
}

pub fn plan(scope: &Scope, granularity: &str, group_by: &[&str]) -> Plan {
    let daily_ok = matches!(granularity, "day" | "month" | "total")
        && group_by.iter().all(|d| matches!(*d, "user_id" | "customer_id"))
        && scope.filters.iter().all(|(c, _)| matches!(*c, "user_id" | "customer_id"))
        && scope.time_column == "window_start";
    let (from, to) = (scope.from.timestamp(), scope.to.timestamp());
    match whole_days(scope) {
        Some((day_from, day_to)) if daily_ok => Plan::Days { from, day_from, day_to, to },
        _ => Plan::Minutes { from, to },
    }
}

/// The whole UTC days `[day_from, day_to)` inside the request's range, if any.
fn whole_days(scope: &Scope) -> Option<(i64, i64)> {
    let day_from = (scope.from.timestamp() + 86_399).div_euclid(86_400) * 86_400;
    let day_to = scope.to.timestamp().div_euclid(86_400) * 86_400;
    (day_from < day_to).then_some((day_from, day_to))
}

/// The columns both branches of a [`Plan::Days`] source give the sums.
const ROLLUP_COLUMNS: &str = "window_start, user_id, customer_id, feature, model, environment, billable, events, \
     input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, revenue_nanos, credits_nanos, unpriced_events";

/// The `rollups_user_span` rows covering the whole days `[day_from, day_to)`:
/// for a total, the fewest aligned spans (about four for 30 days); for day
/// or month buckets, the one-day rows. Consecutive spans of one length
/// become one range condition.
fn span_condition(day_from: i64, day_to: i64, granularity: &str) -> Sql {
    let spans = if granularity == "total" {
        meterline_schemas::ddl::spans(day_from / 86_400, day_to / 86_400)
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
    let mut sql = Sql::default();
    for (n, (span, first, end)) in runs.into_iter().enumerate() {
        let or = if n == 0 { "" } else { " OR " };
        sql.push(
            &format!("{or}(span_days = ? AND window_start >= toDateTime(?) AND window_start < toDateTime(?))"),
            [i(span), i(first * 86_400), i(end * 86_400)],
        );
    }
    sql
}

/// Whole UTC days `[day_from, day_to)` of a request about one user that
/// `rollups_user_daily` (every dimension, ordered user first) can answer:
/// day, month or total buckets over window time, with at least one whole day.
fn one_user_days(scope: &Scope, granularity: &str) -> Option<(i64, i64)> {
    if !scope.one_user() || !matches!(granularity, "day" | "month" | "total") || scope.time_column != "window_start" {
        return None;
    }
    whole_days(scope)
}

/// Whole days from `table` (rows matching `days`) plus the range's partial
/// edge days from `rollups_minute`, as one UNION ALL.
fn days_and_edges(scope: &Scope, table: &str, days: Sql, (day_from, day_to): (i64, i64)) -> Sql {
    let edges = scope.clause(&[(scope.from.timestamp(), day_from), (day_to, scope.to.timestamp())]);
    let mut sql = Sql::new(format!(" FROM (SELECT {ROLLUP_COLUMNS} FROM {table} WHERE "));
    sql.push(&days.text, days.binds);
    sql.push(&format!(" UNION ALL SELECT {ROLLUP_COLUMNS} FROM rollups_minute WHERE "), []);
    sql.push(&edges.text, edges.binds);
    sql.push(")", []);
    sql
}

/// Minute rows in the union of `ranges`, as a FROM clause (with its WHERE).
fn minutes(scope: &Scope, ranges: &[(i64, i64)]) -> Sql {
    let mut sql = Sql::new(" FROM rollups_minute WHERE ");
    let f = scope.clause(ranges);
    sql.push(&f.text, f.binds);
    sql
}

/// The rows a request sums over, as a FROM clause (with its WHERE); see
/// [`plan`]. A request about one user reads its whole days from
/// `rollups_user_daily` instead, whatever it groups or filters by.
pub fn source(scope: &Scope, granularity: &str, group_by: &[&str]) -> Sql {
    if let Some(days) = one_user_days(scope, granularity) {
        return days_and_edges(scope, "rollups_user_daily", scope.clause(&[days]), days);
    }
    match plan(scope, granularity, group_by) {
        Plan::Minutes { from, to } => minutes(scope, &[(from, to)]),
        Plan::Days { day_from, day_to, .. } => {
            let spans = scope.clause_on(span_condition(day_from, day_to, granularity));
            days_and_edges(scope, "rollups_user_span", spans, (day_from, day_to))
        }
    }
}

/// The GROUP BY keys: the grouped dimensions' columns and the bucket, but
/// no constant: with constant keys ClickHouse 18.16 hashes every key
/// serialized together (and SQLite sorts), where one string key alone has a
/// fast path. The bucket stays when there is nothing else, so that no rows
/// give no group on every server.
pub fn group_keys(granularity: &str, group_by: &[&str]) -> String {
    let alias = |d: &&str| match *d {
        "user_id" => "g_user",
        "customer_id" => "g_customer",
        "feature" => "g_feature",
        _ => "g_model",
    };
    let mut keys: Vec<&str> = group_by.iter().map(alias).collect();
    if granularity != "total" || keys.is_empty() {
        keys.push("g_bucket");
    }
    keys.join(", ")
}

/// Sums grouped by bucket and dimensions, in bucket then key order.
pub fn sums(scope: &Scope, granularity: &str, group_by: &[&str], having_negative: bool, order_by_margin: bool, limit: i64) -> Sql {
    let mut sql = Sql::new(format!("SELECT toUInt32({}) AS g_bucket, {}, {SUMS}", bucket(granularity), dims(group_by)));
    let from = source(scope, granularity, group_by);
    sql.push(&from.text, from.binds);
    sql.push(&format!(" GROUP BY {}", group_keys(granularity, group_by)), []);
    if having_negative {
        sql.push(" HAVING s_revenue - s_cost < 0", []);
    }
    if order_by_margin {
        sql.push(" ORDER BY s_revenue - s_cost, g_user, g_customer, g_feature, g_model", []);
    } else {
        sql.push(" ORDER BY g_bucket, g_user, g_customer, g_feature, g_model", []);
    }
    sql.push(" LIMIT ?", [i(limit)]);
    sql
}

/// The ORDER BY expression of a top-spenders metric (a fixed set, never user text).
pub fn metric_order(metric: &str) -> &'static str {
    match metric {
        "tokens" => "s_input + s_output + s_cached + s_reasoning",
        "revenue" => "s_revenue",
        "margin" => "s_revenue - s_cost",
        _ => "s_cost",
    }
}

/// The top `limit` keys of dimension `by` ordered by `metric`.
pub fn top(scope: &Scope, by: &str, metric: &str, descending: bool, limit: i64) -> Sql {
    let order = metric_order(metric);
    let dir = if descending { "DESC" } else { "ASC" };
    let mut sql = Sql::new(format!("SELECT toUInt32(0) AS g_bucket, {}, {SUMS}", dims(&[by])));
    let from = source(scope, "total", &[by]);
    sql.push(&from.text, from.binds);
    sql.push(
        &format!(" GROUP BY {} ORDER BY {order} {dir}, g_user, g_customer LIMIT ?", group_keys("total", &[by])),
        [i(limit)],
    );
    sql
}

/// Every group's sums over the scope, unordered: what the ranking cache
/// keeps for a range's whole hours.
pub fn groups(scope: &Scope, group_by: &[&str]) -> Sql {
    grouped_totals(source(scope, "total", group_by), group_by)
}

/// Every group's sums over minute windows in `ranges` (a range's partial-hour edges).
pub fn edge_groups(scope: &Scope, group_by: &[&str], ranges: &[(i64, i64)]) -> Sql {
    grouped_totals(minutes(scope, ranges), group_by)
}

/// Each group's sums over the rows of `from`, unordered.
fn grouped_totals(from: Sql, group_by: &[&str]) -> Sql {
    let mut sql = Sql::new(format!("SELECT toUInt32(0) AS g_bucket, {}, {SUMS}", dims(group_by)));
    sql.push(&from.text, from.binds);
    sql.push(&format!(" GROUP BY {}", group_keys("total", group_by)), []);
    sql
}

/// The events in the rows [`groups`] reads for the same scope and grouping:
/// one column, no grouping, so a cached answer can be checked cheaply.
pub fn event_count(scope: &Scope, group_by: &[&str]) -> Sql {
    let mut sql = Sql::new("SELECT sum(events) AS n");
    let from = source(scope, "total", group_by);
    sql.push(&from.text, from.binds);
    sql
}

/// How many groups have a negative margin.
pub fn negative_count(scope: &Scope, group_by: &[&str]) -> Sql {
    let mut sql = Sql::new(format!("SELECT count() FROM (SELECT {}, sum(revenue_nanos) - sum(cost_nanos) AS m", dims(group_by)));
    let from = source(scope, "total", group_by);
    sql.push(&from.text, from.binds);
    sql.push(&format!(" GROUP BY {} HAVING m < 0)", group_keys("total", group_by)), []);
    sql
}

/// One user's raw events, oldest first, after the cursor position if any.
pub fn events(scope: &Scope, cursor: Option<&(i64, i64, String)>, limit: i64) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM events WHERE ");
    sql.push(&scope.filter.text, scope.binds());
    if let Some((secs, nanos, key)) = cursor {
        sql.push(
            " AND (event_time > toDateTime(?) OR (event_time = toDateTime(?) AND (event_time_ns > ? \
             OR (event_time_ns = ? AND idempotency_key > ?))))",
            [i(*secs), i(*secs), i(*nanos), i(*nanos), crate::sql::s(key.clone())],
        );
    }
    sql.push(" ORDER BY event_time, event_time_ns, idempotency_key LIMIT ?", [i(limit)]);
    sql
}

/// Runaway alerts, latest version of each, newest first. `state` is
/// open, resolved or all; the range selects alerts active in it.
pub fn alerts(tenant: &str, from: i64, to: i64, state: &str, user: Option<&str>, rule: Option<&str>, limit: i64) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM alerts FINAL WHERE tenant = ? AND opened_at < toDateTime(?) AND (state = 'open' OR resolved_at >= toDateTime(?))");
    sql.binds.extend([crate::sql::s(tenant), i(to), i(from)]);
    if state != "all" {
        sql.push(" AND state = ?", [crate::sql::s(state)]);
    }
    if let Some(u) = user {
        sql.push(" AND user_id = ?", [crate::sql::s(u)]);
    }
    if let Some(r) = rule {
        sql.push(" AND rule = ?", [crate::sql::s(r)]);
    }
    sql.push(" ORDER BY opened_at DESC, user_id, rule LIMIT ?", [i(limit)]);
    sql
}

/// Every statement above with sample values, for the compatibility check on
/// ClickHouse 18.16 and the current engine (after the aggregator's, which
/// create the tables).
pub fn compat_statements() -> Vec<String> {
    let mut raw = std::collections::HashMap::new();
    for (k, v) in [("from", "2020-01-01T00:00:00Z"), ("to", "2030-01-01T00:00:00Z"), ("feature", "chat"), ("billable", "true")] {
        raw.insert(k.to_owned(), v.to_owned());
    }
    let scope = |column: &str, raw: &std::collections::HashMap<String, String>| {
        crate::params::Params::new(raw, &[]).and_then(|p| p.scope("acme", column, Some(30), 10_000)).expect("sample scope")
    };
    let rollups = scope("window_start", &raw);
    let events_scope = scope("event_time", &raw);
    // A range with partial edge days and no feature filter: the per-user span table's path.
    let mut daily_raw = raw.clone();
    daily_raw.remove("feature");
    daily_raw.remove("billable");
    daily_raw.insert("from".into(), "2026-01-01T10:00:00Z".into());
    daily_raw.insert("to".into(), "2026-01-31T10:00:00Z".into());
    let daily = scope("window_start", &daily_raw);
    // One user over the same range: rollups_user_daily for whole days.
    let mut user_raw = daily_raw.clone();
    user_raw.insert("user_id".into(), "u-1".into());
    user_raw.insert("feature".into(), "chat".into());
    let one_user = scope("window_start", &user_raw);
    let sum_fields = "";
    let event_fields = <meterline_aggregator::rollup::EventRow as clickhouse::Row>::COLUMN_NAMES.join(",");
    let mut out = Vec::new();
    for g in ["minute", "hour", "day", "month", "total"] {
        out.push(sums(&rollups, g, &["user_id", "customer_id", "feature", "model"], false, false, 10).render(sum_fields));
    }
    out.push(sums(&rollups, "total", &["user_id"], true, true, 10).render(sum_fields));
    for m in ["cost", "tokens", "revenue", "margin"] {
        out.push(top(&rollups, "user_id", m, true, 10).render(sum_fields));
    }
    out.push(top(&rollups, "customer_id", "cost", false, 10).render(sum_fields));
    out.push(negative_count(&rollups, &["user_id", "model"]).render(sum_fields));
    out.push(sums(&daily, "day", &["user_id"], false, false, 10).render(sum_fields));
    out.push(top(&daily, "customer_id", "margin", true, 10).render(sum_fields));
    for g in ["day", "total"] {
        out.push(sums(&one_user, g, &["model"], false, false, 10).render(sum_fields));
    }
    out.push(negative_count(&daily, &["user_id"]).render(sum_fields));
    out.push(groups(&daily, &["user_id"]).render(sum_fields));
    out.push(groups(&rollups, &["customer_id", "model"]).render(sum_fields));
    out.push(edge_groups(&daily, &["user_id"], &[(1_767_261_600, 1_767_261_900), (1_769_853_000, 1_769_853_600)]).render(sum_fields));
    out.push(event_count(&daily, &["user_id"]).render(sum_fields));
    out.push(events(&events_scope, None, 100).render(&event_fields));
    let alert_fields = <meterline_aggregator::alerts::AlertRow as clickhouse::Row>::COLUMN_NAMES.join(",");
    out.push(alerts("acme", 0, 2_000_000_000, "open", Some("u-1"), Some("peers"), 10).render(&alert_fields));
    out.push(alerts("acme", 0, 2_000_000_000, "all", None, None, 10).render(&alert_fields));
    out.push(events(&events_scope, Some(&(1_800_000_000, 5, "it's".to_owned())), 100).render(&event_fields));
    out
}
