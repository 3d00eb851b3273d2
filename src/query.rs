//! The query API's store trait answered from the embedded database: the same
//! plans as ClickHouse ([`queries::plan`]), the same sums and orderings, in
//! SQLite's dialect. Values are only ever bound, never formatted into the text.

use futures::future::BoxFuture;
use meterline_aggregator::alerts::AlertRow;
use meterline_aggregator::rollup::EventRow;
use meterline_query_api::QueryError;
use meterline_query_api::params::Scope;
use meterline_query_api::queries::{self, Plan, SumRow};
use meterline_query_api::sql::Value as Bound;
use meterline_query_api::store::{AlertsQuery, Cursor, QueryStore, SumsQuery, TopQuery};
use rusqlite::types::Value;
use std::sync::Arc;

use crate::store::{self, Embedded};

/// The embedded store seen by the query API.
#[derive(Debug, Clone)]
pub struct EmbeddedQueries(pub Arc<Embedded>);

/// SQL text with its values, in order.
#[derive(Debug, Default)]
struct Q {
    text: String,
    binds: Vec<Value>,
}

impl Q {
    fn push(&mut self, text: &str, binds: impl IntoIterator<Item = Value>) {
        self.text.push_str(text);
        self.binds.extend(binds);
    }

    fn append(&mut self, other: Q) {
        self.push(&other.text, other.binds);
    }
}

fn int(v: i64) -> Value {
    Value::Integer(v)
}

/// The tenant, the union of `ranges` on the scope's time column, and the filters.
fn clause(scope: &Scope, ranges: &[(i64, i64)]) -> Q {
    clause_on(scope, ranges, &scope.time_column)
}

/// [`clause`] with the time column written as `column` (e.g. `+window_start`,
/// which keeps SQLite from using an index on it).
fn clause_on(scope: &Scope, ranges: &[(i64, i64)], column: &str) -> Q {
    let mut q = Q::default();
    q.push("tenant = ? AND (", [Value::Text(scope.tenant.clone())]);
    for (n, (from, to)) in ranges.iter().enumerate() {
        let or = if n == 0 { "" } else { " OR " };
        q.push(&format!("{or}({column} >= ? AND {column} < ?)"), [int((*from).max(0)), int((*to).max(0))]);
    }
    q.push(")", []);
    for (column, value) in &scope.filters {
        let v = match value {
            Bound::Str(s) => Value::Text(s.clone()),
            Bound::Int(n) => int(*n),
        };
        q.push(&format!(" AND {column} = ?"), [v]);
    }
    q
}

/// The outer sums over per-table partial sums `p_*` (named as [`SumRow`]
/// reads them). The partial sums must not be called `s_*`: in the outer
/// ORDER BY and HAVING expressions SQLite would resolve such a name to the
/// subquery's column (one row's partial sum), not to the total.
const RESUMS: &str = "sum(p_events) AS s_events, sum(p_input) AS s_input, sum(p_output) AS s_output, sum(p_cached) AS s_cached, \
     sum(p_reasoning) AS s_reasoning, sum(p_cost) AS s_cost, sum(p_revenue) AS s_revenue, sum(p_credits) AS s_credits, \
     sum(p_unpriced) AS s_unpriced";

/// Sums by bucket and dimensions over the rows [`queries::plan`] picks, as a
/// complete SELECT (callers add HAVING, ORDER BY, LIMIT). Each table is
/// summed on its own first: SQLite then aggregates the daily table in its
/// user-first key order without sorting, and the outer GROUP BY sees only
/// partial sums.
fn grouped(scope: &Scope, granularity: &str, group_by: &[&str]) -> Q {
    // `user_id` alone streams in the daily table's key order.
    let keys = queries::group_keys(granularity, group_by);
    let inner = |table: &str, range: (i64, i64)| {
        let mut q = Q::default();
        let partial = queries::SUMS.replace(" AS s_", " AS p_");
        q.push(&format!("SELECT {} AS g_bucket, {}, {partial} FROM {table} WHERE ", bucket(granularity), queries::dims(group_by)), []);
        // A long range reads most of the daily table: scan it in key order
        // rather than through the time index (the unary + keeps the index out).
        let key_order = table == "rollups_user_day" && range.1 - range.0 >= 7 * 86_400;
        q.append(clause_on(scope, &[range], if key_order { "+window_start" } else { "window_start" }));
        q.push(&format!(" GROUP BY {keys}"), []);
        q
    };
    let mut q = Q::default();
    q.push(&format!("SELECT g_bucket, g_user, g_customer, g_feature, g_model, {RESUMS} FROM ("), []);
    match queries::plan(scope, granularity, group_by) {
        Plan::Minutes { from, to } => q.append(inner("rollups_minute", (from, to))),
        Plan::Days { from, day_from, day_to, to } => {
            q.append(inner("rollups_user_day", (day_from, day_to)));
            q.push(" UNION ALL ", []);
            // One branch per edge: an OR of two ranges would scan every minute row.
            q.append(inner("rollups_minute", (from, day_from)));
            q.push(" UNION ALL ", []);
            q.append(inner("rollups_minute", (day_to, to)));
        }
    }
    q.push(&format!(") GROUP BY {keys}"), []);
    q
}

/// The bucket expression of a granularity, on UTC Unix seconds.
fn bucket(granularity: &str) -> &'static str {
    match granularity {
        "minute" => "window_start",
        "hour" => "(window_start / 3600) * 3600",
        "day" => "(window_start / 86400) * 86400",
        "month" => "CAST(strftime('%s', window_start, 'unixepoch', 'start of month') AS INTEGER)",
        _ => "0",
    }
}

fn sum_row(r: &rusqlite::Row<'_>) -> Result<SumRow, rusqlite::Error> {
    let u = |i: usize| -> Result<u64, rusqlite::Error> { Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0)) };
    Ok(SumRow {
        g_bucket: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
        g_user: r.get(1)?,
        g_customer: r.get(2)?,
        g_feature: r.get(3)?,
        g_model: r.get(4)?,
        s_events: u(5)?,
        s_input: u(6)?,
        s_output: u(7)?,
        s_cached: u(8)?,
        s_reasoning: u(9)?,
        s_cost: r.get(10)?,
        s_revenue: r.get(11)?,
        s_credits: r.get(12)?,
        s_unpriced: u(13)?,
    })
}

const EVENT_COLUMNS: &str = "tenant, idempotency_key, fingerprint, event_time, event_time_ns, user_id, customer_id, feature, model, \
     provider, environment, billable, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, cost_source, \
     revenue_nanos, credits_nanos, metadata, received_at, written_at";

fn event_row(r: &rusqlite::Row<'_>) -> Result<EventRow, rusqlite::Error> {
    let u = |i: usize| -> Result<u64, rusqlite::Error> { Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0)) };
    Ok(EventRow {
        tenant: r.get(0)?,
        idempotency_key: r.get(1)?,
        fingerprint: r.get::<_, i64>(2)? as u64,
        event_time: r.get(3)?,
        event_time_ns: r.get(4)?,
        user_id: r.get(5)?,
        customer_id: r.get(6)?,
        feature: r.get(7)?,
        model: r.get(8)?,
        provider: r.get(9)?,
        environment: r.get(10)?,
        billable: r.get(11)?,
        input_tokens: u(12)?,
        output_tokens: u(13)?,
        cached_input_tokens: u(14)?,
        reasoning_tokens: u(15)?,
        cost_nanos: r.get(16)?,
        cost_source: r.get(17)?,
        revenue_nanos: r.get(18)?,
        credits_nanos: r.get(19)?,
        metadata: r.get(20)?,
        received_at: r.get(21)?,
        written_at: r.get(22)?,
        // The embedded store has no Kafka position.
        kafka_topic: String::new(),
        kafka_partition: 0,
        kafka_offset: 0,
    })
}

impl EmbeddedQueries {
    async fn rows<T, F>(&self, q: Q, map: F) -> Result<Vec<T>, QueryError>
    where
        T: Send + 'static,
        F: Fn(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.0
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&q.text)?;
                stmt.query_map(rusqlite::params_from_iter(q.binds.iter()), map)?.collect()
            })
            .await
            .map_err(|e| QueryError::Store(e.to_string()))
    }
}

impl QueryStore for EmbeddedQueries {
    fn sums<'a>(&'a self, scope: &'a Scope, s: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let mut q = grouped(scope, s.granularity, &s.group_by);
            if s.negative_only {
                q.push(" HAVING s_revenue - s_cost < 0", []);
            }
            if s.order_by_margin {
                q.push(" ORDER BY s_revenue - s_cost, g_user, g_customer, g_feature, g_model", []);
            } else {
                q.push(" ORDER BY g_bucket, g_user, g_customer, g_feature, g_model", []);
            }
            q.push(" LIMIT ?", [int(s.limit)]);
            self.rows(q, sum_row).await
        })
    }

    fn top<'a>(&'a self, scope: &'a Scope, t: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let mut q = grouped(scope, "total", &[t.by]);
            let dir = if t.descending { "DESC" } else { "ASC" };
            q.push(&format!(" ORDER BY {} {dir}, g_user, g_customer LIMIT ?", queries::metric_order(t.metric)), [int(t.limit)]);
            self.rows(q, sum_row).await
        })
    }

    fn negative_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async move {
            let mut q = Q::default();
            q.push("SELECT count(*) FROM (", []);
            q.append(grouped(scope, "total", group_by));
            q.push(" HAVING s_revenue - s_cost < 0)", []);
            let counts = self.rows(q, |r| r.get::<_, i64>(0)).await?;
            Ok(counts.first().map_or(0, |n| u64::try_from(*n).unwrap_or(0)))
        })
    }

    fn events<'a>(&'a self, scope: &'a Scope, cursor: Option<&'a Cursor>, limit: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(async move {
            let mut q = Q::default();
            q.push(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE "), []);
            q.append(clause(scope, &[(scope.from.timestamp(), scope.to.timestamp())]));
            if let Some((secs, nanos, key)) = cursor {
                q.push(
                    " AND (event_time > ? OR (event_time = ? AND (event_time_ns > ? OR (event_time_ns = ? AND idempotency_key > ?))))",
                    [int(*secs), int(*secs), int(*nanos), int(*nanos), Value::Text(key.clone())],
                );
            }
            q.push(" ORDER BY event_time, event_time_ns, idempotency_key LIMIT ?", [int(limit)]);
            self.rows(q, event_row).await
        })
    }

    fn alerts<'a>(&'a self, a: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(async move {
            let mut q = Q::default();
            q.push(
                &format!("SELECT {} FROM alerts WHERE tenant = ? AND opened_at < ? AND (state = 'open' OR resolved_at >= ?)", store::ALERT_COLUMNS),
                [Value::Text(a.tenant.clone()), int(a.to), int(a.from)],
            );
            if a.state != "all" {
                q.push(" AND state = ?", [Value::Text(a.state.to_owned())]);
            }
            if let Some(u) = &a.user {
                q.push(" AND user_id = ?", [Value::Text(u.clone())]);
            }
            if let Some(r) = a.rule {
                q.push(" AND rule = ?", [Value::Text(r.to_owned())]);
            }
            q.push(" ORDER BY opened_at DESC, user_id, rule LIMIT ?", [int(a.limit)]);
            self.rows(q, store::alert_row).await
        })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.0.writer_running() && self.0.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok() })
    }
}
