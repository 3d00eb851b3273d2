//! The seam between the query API and its store: one trait, answered by
//! ClickHouse here and by the embedded store in the all-in-one binary. The
//! conformance suite (`tests/tests/conformance.rs`) holds both to the same answers.

use futures::future::BoxFuture;
use meterline_clickhouse::query as queries;
use meterline_clickhouse::Store;
use meterline_domain::{AlertRow, EventRow, Granularity, Kept, Metric, SumRow, TimeColumn};
use meterline_sql::{Dialect, Scope};

pub use meterline_sql::{AlertsQuery, Cursor, GroupCursor};

use crate::QueryError;
use crate::cached::{self, GroupReader};
use crate::gate::TenantGate;
use crate::cache::GroupCache;
use crate::ranking;
pub use crate::ranking::{Order, RankQuery, Ranking};

/// Sums grouped by a time bucket and dimensions.
#[derive(Debug, Clone)]
pub struct SumsQuery {
    pub granularity: Granularity,
    pub group_by: Vec<&'static str>,
    /// Only groups whose revenue is below their cost.
    pub negative_only: bool,
    /// Lowest margin first instead of bucket then key order.
    pub order_by_margin: bool,
    /// Only the groups after these keys in bucket then key order (a next
    /// page); ignored with `order_by_margin`.
    pub after: Option<GroupCursor>,
    pub limit: i64,
}

impl SumsQuery {
    /// Totals over the scope, grouped by `group_by`, in key order.
    pub fn totals(group_by: &[&'static str], limit: i64) -> SumsQuery {
        SumsQuery { granularity: Granularity::Total, group_by: group_by.to_vec(), negative_only: false, order_by_margin: false, after: None, limit }
    }
}

/// The top keys of one dimension by a metric.
#[derive(Debug, Clone, Copy)]
pub struct TopQuery {
    /// `user_id` or `customer_id`.
    pub by: &'static str,
    pub metric: Metric,
    pub descending: bool,
    pub limit: i64,
}

/// What the query API needs from a store. Answers are exact integers; the
/// API formats money. Rows with no events are the caller's to drop.
pub trait QueryStore: Send + Sync + std::fmt::Debug {
    fn sums<'a>(&'a self, scope: &'a Scope, q: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>>;
    fn top<'a>(&'a self, scope: &'a Scope, q: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>>;
    /// How many groups of `group_by` have a negative margin.
    fn negative_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>>;
    /// One user's events (the scope filters by user), oldest first, after `cursor`.
    fn events<'a>(&'a self, scope: &'a Scope, cursor: Option<&'a Cursor>, limit: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>>;
    /// The latest version of each alert, newest first.
    fn alerts<'a>(&'a self, q: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>>;
    fn ping(&self) -> BoxFuture<'_, bool>;

    /// The rollups a usage question of `scope` reads, each with where its
    /// read starts, for the retention check: by default what the shared
    /// plan reads. A store that answers some questions from other rows
    /// must say so here, or a range its minute rows no longer hold would
    /// pass the check and answer a partial sum.
    fn rollup_reads(&self, scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Vec<(Kept, i64)> {
        crate::params::rollup_reads(scope, granularity, group_by)
    }

    /// A ranking with the scope's total: by default three independent
    /// statements side by side.
    fn ranking<'a>(&'a self, scope: &'a Scope, q: &'a RankQuery) -> BoxFuture<'a, Result<Ranking, QueryError>> {
        separately(self, scope, q)
    }

    /// One background pass over the store's ranking cache, if it keeps one
    /// (see `refresh.rs`): its standing questions asked within `idle` are
    /// checked, slid or read again. By default, nothing.
    fn refresh_rankings(&self, _idle: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// [`QueryStore::ranking`] from the store's `top`, `sums` and `negative_count`.
pub fn separately<'a, S: QueryStore + ?Sized>(store: &'a S, scope: &'a Scope, q: &'a RankQuery) -> BoxFuture<'a, Result<Ranking, QueryError>> {
    Box::pin(async move {
        let rows = async {
            match q.order {
                Order::Metric { metric, descending } => {
                    let by = q.group_by.first().copied().unwrap_or("user_id");
                    store.top(scope, TopQuery { by, metric, descending, limit: q.limit }).await
                }
                Order::Margin => {
                    let s = SumsQuery { granularity: Granularity::Total, group_by: q.group_by.clone(), negative_only: q.negative_only, order_by_margin: true, after: None, limit: q.limit };
                    store.sums(scope, &s).await
                }
            }
        };
        let everything = SumsQuery::totals(&[], 1);
        let totals = store.sums(scope, &everything);
        let negative = async { if q.count_negative { store.negative_count(scope, &q.group_by).await.map(Some) } else { Ok(None) } };
        let (rows, totals, negative) = futures::future::try_join3(rows, totals, negative).await?;
        Ok(Ranking { rows, total: totals.into_iter().next().unwrap_or_default(), negative })
    })
}

/// The ClickHouse store: the statements in [`queries`], bound and sent, and
/// rankings through the [`ranking`](crate::ranking) cache. Every statement
/// holds one of its tenant's slots in the [`TenantGate`] while it runs; an
/// answer the cache gives whole sends none and takes none.
#[derive(Debug)]
pub struct ClickHouseStore {
    store: Store,
    cache: GroupCache,
    gate: TenantGate,
}

impl ClickHouseStore {
    /// Keeps at most `cache_groups` groups' sums for rankings (0: none);
    /// `store` should carry the read limits (`Store::with_read_limits`).
    pub fn new(store: Store, cache_groups: usize, gate: TenantGate) -> ClickHouseStore {
        ClickHouseStore { store, cache: GroupCache::new(cache_groups), gate }
    }
}

impl GroupReader for ClickHouseStore {
    fn groups<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move { Ok(self.store.query(&queries::groups(scope, group_by)).fetch_all::<SumRow>().await?) }))
    }

    fn edge_groups<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str], ranges: &'a [(i64, i64)]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move { Ok(self.store.query(&queries::edge_groups(scope, group_by, ranges)).fetch_all::<SumRow>().await?) }))
    }

    fn event_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move { Ok(self.store.query(&queries::event_count(scope, group_by)).fetch_one::<u64>().await?) }))
    }
}

impl QueryStore for ClickHouseStore {
    fn sums<'a>(&'a self, scope: &'a Scope, q: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move {
            let sql = match (&q.after, q.order_by_margin) {
                (Some(after), false) => queries::sums_after(scope, q.granularity, &q.group_by, q.negative_only, Some(after), q.limit),
                _ => queries::sums(scope, q.granularity, &q.group_by, q.negative_only, q.order_by_margin, q.limit),
            };
            Ok(self.store.query(&sql).fetch_all().await?)
        }))
    }

    fn top<'a>(&'a self, scope: &'a Scope, q: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move { Ok(self.store.query(&queries::top(scope, q.by, q.metric, q.descending, q.limit)).fetch_all().await?) }))
    }

    fn negative_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move { Ok(self.store.query(&queries::negative_count(scope, group_by)).fetch_one().await?) }))
    }

    fn events<'a>(&'a self, scope: &'a Scope, cursor: Option<&'a Cursor>, limit: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(self.gate.read(&scope.tenant, async move { Ok(self.store.query(&meterline_sql::events(Dialect::ClickHouse, "?fields", scope, cursor, limit)).fetch_all().await?) }))
    }

    fn alerts<'a>(&'a self, q: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(self.gate.read(&q.tenant, async move {
            let sql = meterline_sql::alerts(Dialect::ClickHouse, "?fields", "alerts FINAL", q);
            Ok(self.store.query(&sql).fetch_all().await?)
        }))
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(self.store.ping())
    }

    /// A question about one user reads its whole days from
    /// `rollups_user_daily` (every dimension), whatever it groups by.
    fn rollup_reads(&self, scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Vec<(Kept, i64)> {
        match queries::one_user_days(scope, granularity) {
            Some(days) => crate::params::day_reads(scope, days),
            None => crate::params::rollup_reads(scope, granularity, group_by),
        }
    }

    fn ranking<'a>(&'a self, scope: &'a Scope, q: &'a RankQuery) -> BoxFuture<'a, Result<Ranking, QueryError>> {
        // One user's rows are read from the user-first table already (fast);
        // event-time scopes have no rollups to keep.
        // Only past hours are kept: the current one takes events all the
        // time, so a range ending later ("this month") would never be reused.
        // It and anything later are read with the edge.
        let settled = scope.to.timestamp().min(chrono::Utc::now().timestamp());
        let hours = ranking::whole_hours(scope.from.timestamp(), settled);
        match hours {
            Some(hours) if self.cache.enabled() && !scope.one_user() && scope.time_column == TimeColumn::WindowStart => {
                Box::pin(cached::ranking(&self.cache, self, scope, q, hours))
            }
            _ => separately(self, scope, q),
        }
    }

    fn refresh_rankings(&self, idle: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(crate::refresh::pass(&self.cache, self, idle))
    }
}
