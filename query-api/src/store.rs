//! The seam between the query API and its store: one trait, answered by
//! ClickHouse here and by the embedded store in the all-in-one binary. The
//! conformance suite (`tests/tests/conformance.rs`) holds both to the same answers.

use futures::future::BoxFuture;
use meterline_clickhouse::query as queries;
use meterline_clickhouse::Store;
use meterline_domain::{AlertRow, EventRow, Granularity, Metric, SumRow, TimeColumn};
use meterline_sql::{Dialect, Scope};

pub use meterline_sql::{AlertsQuery, Cursor};

use crate::QueryError;
use crate::ranking::{self, Entry, GroupCache, Key};
use crate::metrics;

/// Sums grouped by a time bucket and dimensions.
#[derive(Debug, Clone)]
pub struct SumsQuery {
    pub granularity: Granularity,
    pub group_by: Vec<&'static str>,
    /// Only groups whose revenue is below their cost.
    pub negative_only: bool,
    /// Lowest margin first instead of bucket then key order.
    pub order_by_margin: bool,
    pub limit: i64,
}

impl SumsQuery {
    /// Totals over the scope, grouped by `group_by`, in key order.
    pub fn totals(group_by: &[&'static str], limit: i64) -> SumsQuery {
        SumsQuery { granularity: Granularity::Total, group_by: group_by.to_vec(), negative_only: false, order_by_margin: false, limit }
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

/// How a ranking orders its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// By a metric, then by key.
    Metric { metric: Metric, descending: bool },
    /// Lowest margin first, then by key.
    Margin,
}

/// What a ranking endpoint (top spenders, margins) asks at once.
#[derive(Debug, Clone)]
pub struct RankQuery {
    pub group_by: Vec<&'static str>,
    pub order: Order,
    /// Only groups whose revenue is below their cost.
    pub negative_only: bool,
    pub limit: i64,
    /// Also count the groups with a negative margin.
    pub count_negative: bool,
}

/// A ranking's rows, the scope's total, and the negative-margin count if asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranking {
    pub rows: Vec<SumRow>,
    pub total: SumRow,
    pub negative: Option<u64>,
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

    /// A ranking with the scope's total: by default three independent
    /// statements side by side.
    fn ranking<'a>(&'a self, scope: &'a Scope, q: &'a RankQuery) -> BoxFuture<'a, Result<Ranking, QueryError>> {
        separately(self, scope, q)
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
                    let s = SumsQuery { granularity: Granularity::Total, group_by: q.group_by.clone(), negative_only: q.negative_only, order_by_margin: true, limit: q.limit };
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
/// rankings through the [`ranking`](crate::ranking) cache.
#[derive(Debug)]
pub struct ClickHouseStore {
    store: Store,
    cache: GroupCache,
}

impl ClickHouseStore {
    /// Keeps at most `cache_groups` groups' sums for rankings (0: none).
    pub fn new(store: Store, cache_groups: usize) -> ClickHouseStore {
        ClickHouseStore { store, cache: GroupCache::new(cache_groups) }
    }

    /// A ranking from the kept sums over the range's whole hours (checked,
    /// or read and kept) plus the partial-hour edges, read every time.
    async fn ranking_kept(&self, scope: &Scope, q: &RankQuery, hours: (i64, i64)) -> Result<Ranking, QueryError> {
        let key = Key { tenant: scope.tenant.clone(), filters: scope.filters.clone(), group_by: q.group_by.clone(), hours };
        let inner = scope.with_range(hours.0, hours.1);
        let (from, to) = (scope.from.timestamp(), scope.to.timestamp());
        let edge_ranges: Vec<(i64, i64)> = [(from, hours.0), (hours.1, to)].into_iter().filter(|(a, b)| a < b).collect();
        let edges = async {
            if edge_ranges.is_empty() {
                return Ok(Vec::new());
            }
            self.store.query(&queries::edge_groups(scope, &q.group_by, &edge_ranges)).fetch_all::<SumRow>().await
        };
        let read = async {
            let groups = self.store.query(&queries::groups(&inner, &q.group_by)).fetch_all::<SumRow>().await?;
            Ok::<_, QueryError>(self.cache.put(Entry::new(key.clone(), groups)))
        };
        let (entry, edges) = match self.cache.get(&key) {
            Some(kept) => {
                let count = self.store.query(&queries::event_count(&inner, &q.group_by)).fetch_one::<u64>();
                let (events, edges) = tokio::try_join!(count, edges)?;
                if events == kept.total.s_events {
                    metrics::ranking_cache("hit");
                    (kept, edges)
                } else {
                    metrics::ranking_cache("stale");
                    (read.await?, edges)
                }
            }
            None => match self.cache.nearest(&key).and_then(|base| Some((ranking::slices(base.key.hours, hours)?, base))) {
                // A kept entry a few hours away (the hour turned under a
                // dashboard's "last 30 days"): read only the hours between.
                Some((slices, base)) => {
                    let reads = futures::future::try_join_all(slices.into_iter().map(|(from, to, added)| {
                        let sql = queries::groups(&scope.with_range(from, to), &q.group_by);
                        async move { Ok::<_, clickhouse::error::Error>((added, self.store.query(&sql).fetch_all::<SumRow>().await?)) }
                    }));
                    let (slices, edges) = tokio::try_join!(reads, edges)?;
                    // The base is checked after the slices were read: an equal
                    // count then means the subtracted hours were read from the
                    // very rows the base holds.
                    let base_scope = scope.with_range(base.key.hours.0, base.key.hours.1);
                    let events = self.store.query(&queries::event_count(&base_scope, &q.group_by)).fetch_one::<u64>().await?;
                    match (events == base.total.s_events).then(|| base.slid(key.clone(), &slices)).flatten() {
                        Some(entry) => {
                            metrics::ranking_cache("slide");
                            (self.cache.put(entry), edges)
                        }
                        None => {
                            metrics::ranking_cache("stale");
                            (read.await?, edges)
                        }
                    }
                }
                None => {
                    metrics::ranking_cache("miss");
                    let (entry, edges) = tokio::try_join!(read, async { Ok::<_, QueryError>(edges.await?) })?;
                    (entry, edges)
                }
            },
        };
        metrics::ranking_cache_groups(self.cache.groups());
        Ok(ranking::rank(&entry, &edges, q))
    }
}

impl QueryStore for ClickHouseStore {
    fn sums<'a>(&'a self, scope: &'a Scope, q: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let sql = queries::sums(scope, q.granularity, &q.group_by, q.negative_only, q.order_by_margin, q.limit);
            Ok(self.store.query(&sql).fetch_all().await?)
        })
    }

    fn top<'a>(&'a self, scope: &'a Scope, q: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move { Ok(self.store.query(&queries::top(scope, q.by, q.metric, q.descending, q.limit)).fetch_all().await?) })
    }

    fn negative_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async move { Ok(self.store.query(&queries::negative_count(scope, group_by)).fetch_one().await?) })
    }

    fn events<'a>(&'a self, scope: &'a Scope, cursor: Option<&'a Cursor>, limit: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(async move { Ok(self.store.query(&meterline_sql::events(Dialect::ClickHouse, "?fields", scope, cursor, limit)).fetch_all().await?) })
    }

    fn alerts<'a>(&'a self, q: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(async move {
            let sql = meterline_sql::alerts(Dialect::ClickHouse, "?fields", "alerts FINAL", q);
            Ok(self.store.query(&sql).fetch_all().await?)
        })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(self.store.ping())
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
                Box::pin(self.ranking_kept(scope, q, hours))
            }
            _ => separately(self, scope, q),
        }
    }
}
