//! The query API's store trait answered from the embedded database: the same
//! plans as ClickHouse ([`plan`]: minute, per-user daily or per-dimension
//! daily rows), the same sums and orderings, in SQLite's dialect.
//! Rankings (top spenders, margins) go through the query API's ranking cache
//! ([`GroupCache`]), which this store feeds as a [`GroupReader`]; see the
//! query API's `ranking.rs` for why its answers stay exact. Values are only
//! ever bound, never formatted into the text.

use futures::future::BoxFuture;
use meterline_domain::{AlertRow, EventRow, Granularity, SumRow, TimeColumn};
use meterline_query_api::{AlertsQuery, Cursor, GroupCache, GroupReader, QueryError, QueryStore, RankQuery, Ranking, SumsQuery, TopQuery, cached_ranking, refresh_rankings, separately, whole_hours};
use meterline_sql::{BY_BUCKET, BY_MARGIN, Dialect, HAS_EVENTS, NEGATIVE_ONLY, Plan, Scope, Sql, dims, group_keys, having, i, metric_order, negated_sums_as, plan, resums, split_days, sums_as};
use std::sync::Arc;

use crate::store::{self, Embedded};

/// The embedded store seen by the query API, with its ranking cache.
#[derive(Debug)]
pub struct EmbeddedQueries {
    store: Arc<Embedded>,
    cache: GroupCache,
}

impl EmbeddedQueries {
    /// Keeps at most `cache_groups` groups' sums for rankings (0: none).
    pub fn new(store: Arc<Embedded>, cache_groups: usize) -> EmbeddedQueries {
        EmbeddedQueries { store, cache: GroupCache::new(cache_groups) }
    }
}

const LITE: Dialect = Dialect::Sqlite;
const MINUTES: &str = "rollups_minute";

/// One part of a read: a table's rows over a range, added, or subtracted
/// when `minus`.
struct Part {
    table: &'static str,
    range: (i64, i64),
    minus: bool,
}

impl Part {
    fn new(table: &'static str, range: (i64, i64), minus: bool) -> Part {
        Part { table, range, minus }
    }
}

/// The tables and ranges a read of `scope` sums, as [`plan`] picks them:
/// whole days from the per-dimension or per-user daily rows, and minute
/// rows for the rest; a last day under way is its day's rows minus the
/// minute rows after `to` ([`split_days`]). Every rollup table gets every
/// event in the same commit, so any choice sums the same events.
fn sources(scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Vec<Part> {
    // One branch per edge: an OR of two ranges would scan every minute row.
    let days = |table, whole| {
        let split = split_days(scope.from.timestamp(), whole, scope.to.timestamp(), chrono::Utc::now().timestamp());
        let minutes = |ranges: Vec<(i64, i64)>, minus| ranges.into_iter().map(move |r| Part::new(MINUTES, r, minus));
        std::iter::once(Part::new(table, split.days, false)).chain(minutes(split.plus, false)).chain(minutes(split.minus, true)).collect()
    };
    match plan(scope, granularity, group_by) {
        Plan::DimDays { day_from, day_to, .. } => days(store::DIMS_TABLE, (day_from, day_to)),
        Plan::Days { day_from, day_to, .. } => days(store::DAILY_TABLE, (day_from, day_to)),
        Plan::Minutes { from, to } => vec![Part::new(MINUTES, (from, to), false)],
    }
}

/// The WHERE clause of one source: a long range of the per-user daily table
/// is scanned in key order rather than through its time index (the unary +
/// keeps the index out), which reads most of the table anyway.
fn source_clause(scope: &Scope, table: &str, ranges: &[(i64, i64)]) -> Sql {
    let long = ranges.iter().map(|(a, b)| b - a).sum::<i64>() >= 7 * 86_400;
    let column = if table == store::DAILY_TABLE && long { "+window_start" } else { "window_start" };
    scope.clause_with_column(LITE, ranges, column)
}

/// Sums by bucket and dimensions over `sources`, as a complete SELECT
/// (callers add HAVING, ORDER BY, LIMIT). Each table is summed on its own
/// first: SQLite then aggregates the daily table in its user-first key order
/// without sorting, and the outer GROUP BY sees only partial sums. The
/// partial sums are named `p_*`, not `s_*`: in the outer ORDER BY and HAVING
/// expressions SQLite would resolve such a name to the subquery's column
/// (one row's partial sum), not to the total.
fn grouped_over(scope: &Scope, granularity: Granularity, group_by: &[&str], sources: &[Part]) -> Sql {
    let keys = group_keys(granularity, group_by);
    let inner = |table: &str, ranges: &[(i64, i64)], minus: bool| {
        let sums = if minus { negated_sums_as("p_") } else { sums_as("p_") };
        let mut q = Sql::new(format!("SELECT {} AS g_bucket, {}, {sums} FROM {table} WHERE ", bucket(granularity), dims(group_by)));
        q.append(source_clause(scope, table, ranges));
        q.push(&format!(" GROUP BY {keys}"), []);
        q
    };
    let mut q = Sql::new(format!("SELECT g_bucket, g_user, g_customer, g_feature, g_model, {} FROM (", resums("p_")));
    q.append(Sql::join(sources.iter().map(|p| inner(p.table, &[p.range], p.minus)), " UNION ALL "));
    q.push(&format!(") GROUP BY {keys}"), []);
    q
}

/// [`grouped_over`] the scope's [`sources`].
fn grouped(scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Sql {
    grouped_over(scope, granularity, group_by, &sources(scope, granularity, group_by))
}

/// The events in the rows [`grouped`] reads for the same scope and
/// grouping (totals): one column summed, nothing grouped.
fn event_count(scope: &Scope, group_by: &[&str]) -> Sql {
    let parts = sources(scope, Granularity::Total, group_by).into_iter().map(|p| {
        let sign = if p.minus { "-" } else { "" };
        let mut q = Sql::new(format!("SELECT {sign}COALESCE(SUM(events), 0) AS n FROM {} WHERE ", p.table));
        q.append(source_clause(scope, p.table, &[p.range]));
        q
    });
    let mut q = Sql::new("SELECT COALESCE(SUM(n), 0) FROM (");
    q.append(Sql::join(parts, " UNION ALL "));
    q.push(")", []);
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
        self.store
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
            q.push(&format!(" HAVING {HAS_EVENTS} ORDER BY {} {dir}, g_user, g_customer LIMIT ?", metric_order(t.metric)), [i(t.limit)]);
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
        Box::pin(async move { self.store.writer_running() && self.store.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok() })
    }

    fn ranking<'a>(&'a self, scope: &'a Scope, q: &'a RankQuery) -> BoxFuture<'a, Result<Ranking, QueryError>> {
        // As on ClickHouse: only past whole hours are kept (the current one
        // takes events all the time), one user's rows are few, and
        // event-time scopes have no rollups to keep.
        let settled = scope.to.timestamp().min(chrono::Utc::now().timestamp());
        match whole_hours(scope.from.timestamp(), settled) {
            Some(hours) if self.cache.enabled() && !scope.one_user() && scope.time_column == TimeColumn::WindowStart => {
                Box::pin(cached_ranking(&self.cache, self, scope, q, hours))
            }
            _ => separately(self, scope, q),
        }
    }

    fn refresh_rankings(&self, idle: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(refresh_rankings(&self.cache, self, idle))
    }
}

impl GroupReader for EmbeddedQueries {
    fn groups<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        let mut q = grouped(scope, Granularity::Total, group_by);
        q.push(&format!(" HAVING {HAS_EVENTS}"), []);
        Box::pin(self.rows(q, sum_row))
    }

    fn edge_groups<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str], ranges: &'a [(i64, i64)]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        // One branch per range: an OR of two ranges would scan every minute row.
        let sources: Vec<Part> = ranges.iter().map(|r| Part::new(MINUTES, *r, false)).collect();
        Box::pin(self.rows(grouped_over(scope, Granularity::Total, group_by, &sources), sum_row))
    }

    fn event_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async move {
            let n = self.rows(event_count(scope, group_by), |r| r.get::<_, i64>(0)).await?;
            Ok(n.first().map_or(0, |n| u64::try_from(*n).unwrap_or(0)))
        })
    }
}
