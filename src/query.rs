//! The query API's store trait answered from the embedded database: the same
//! plans as ClickHouse ([`queries::plan`]), the same sums and orderings, in
//! SQLite's dialect. Values are only ever bound, never formatted into the text.

use futures::future::BoxFuture;
use meterline_domain::{AlertRow, EventRow, Granularity, SumRow};
use meterline_query_api::{AlertsQuery, Cursor, QueryError, QueryStore, SumsQuery, TopQuery};
use meterline_sql::{BY_BUCKET, BY_MARGIN, Dialect, NEGATIVE_ONLY, Plan, Scope, Sql, dims, group_keys, having, i, metric_order, plan, resums, sums_as};
use std::sync::Arc;

use crate::store::{self, Embedded};

/// The embedded store seen by the query API.
#[derive(Debug, Clone)]
pub struct EmbeddedQueries(pub Arc<Embedded>);

const LITE: Dialect = Dialect::Sqlite;

/// Sums by bucket and dimensions over the rows [`plan`] picks, as a
/// complete SELECT (callers add HAVING, ORDER BY, LIMIT). Each table is
/// summed on its own first: SQLite then aggregates the daily table in its
/// user-first key order without sorting, and the outer GROUP BY sees only
/// partial sums. The partial sums are named `p_*`, not `s_*`: in the outer
/// ORDER BY and HAVING expressions SQLite would resolve such a name to the
/// subquery's column (one row's partial sum), not to the total.
fn grouped(scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Sql {
    // `user_id` alone streams in the daily table's key order.
    let keys = group_keys(granularity, group_by);
    let inner = |table: &str, range: (i64, i64)| {
        let mut q = Sql::new(format!("SELECT {} AS g_bucket, {}, {} FROM {table} WHERE ", bucket(granularity), dims(group_by), sums_as("p_")));
        // A long range reads most of the daily table: scan it in key order
        // rather than through the time index (the unary + keeps the index out).
        let key_order = table == store::DAILY_TABLE && range.1 - range.0 >= 7 * 86_400;
        q.append(scope.clause_with_column(LITE, &[range], if key_order { "+window_start" } else { "window_start" }));
        q.push(&format!(" GROUP BY {keys}"), []);
        q
    };
    let mut q = Sql::new(format!("SELECT g_bucket, g_user, g_customer, g_feature, g_model, {} FROM (", resums("p_")));
    match plan(scope, granularity, group_by) {
        Plan::Minutes { from, to } => q.append(inner("rollups_minute", (from, to))),
        Plan::Days { from, day_from, day_to, to } => {
            // One branch per edge: an OR of two ranges would scan every minute row.
            q.append(Sql::join([inner(store::DAILY_TABLE, (day_from, day_to)), inner("rollups_minute", (from, day_from)), inner("rollups_minute", (day_to, to))], " UNION ALL "))
        }
    };
    q.push(&format!(") GROUP BY {keys}"), []);
    q
}

/// The bucket expression of a granularity, on UTC Unix seconds.
fn bucket(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Minute => "window_start",
        Granularity::Hour => "(window_start / 3600) * 3600",
        Granularity::Day => "(window_start / 86400) * 86400",
        Granularity::Month => "CAST(strftime('%s', window_start, 'unixepoch', 'start of month') AS INTEGER)",
        Granularity::Total => "0",
    }
}

pub(crate) fn sum_row(r: &rusqlite::Row<'_>) -> Result<SumRow, rusqlite::Error> {
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
    async fn rows<T, F>(&self, q: Sql, map: F) -> Result<Vec<T>, QueryError>
    where
        T: Send + 'static,
        F: Fn(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.0
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&q.text)?;
                stmt.query_map(store::binds(&q), map)?.collect()
            })
            .await
            .map_err(|e| QueryError::Store(Box::new(e)))
    }
}

impl QueryStore for EmbeddedQueries {
    fn sums<'a>(&'a self, scope: &'a Scope, s: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let mut q = grouped(scope, s.granularity, &s.group_by);
            // A page's cursor applies in bucket then key order only, as on ClickHouse.
            let after = if s.order_by_margin { None } else { s.after.as_ref() };
            q.append(having(s.negative_only, after));
            q.push(if s.order_by_margin { BY_MARGIN } else { BY_BUCKET }, []);
            q.push(" LIMIT ?", [i(s.limit)]);
            self.rows(q, sum_row).await
        })
    }

    fn top<'a>(&'a self, scope: &'a Scope, t: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let mut q = grouped(scope, Granularity::Total, &[t.by]);
            let dir = if t.descending { "DESC" } else { "ASC" };
            q.push(&format!(" ORDER BY {} {dir}, g_user, g_customer LIMIT ?", metric_order(t.metric)), [i(t.limit)]);
            self.rows(q, sum_row).await
        })
    }

    fn negative_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async move {
            let mut q = Sql::new("SELECT count(*) FROM (");
            q.append(grouped(scope, Granularity::Total, group_by));
            q.push(&format!("{NEGATIVE_ONLY})"), []);
            let counts = self.rows(q, |r| r.get::<_, i64>(0)).await?;
            Ok(counts.first().map_or(0, |n| u64::try_from(*n).unwrap_or(0)))
        })
    }

    fn events<'a>(&'a self, scope: &'a Scope, cursor: Option<&'a Cursor>, limit: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(async move { self.rows(meterline_sql::events(LITE, EVENT_COLUMNS, scope, cursor, limit), event_row).await })
    }

    fn alerts<'a>(&'a self, a: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(async move { self.rows(meterline_sql::alerts(LITE, store::ALERT_COLUMNS, "alerts", a), store::alert_row).await })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.0.writer_running() && self.0.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok() })
    }
}
