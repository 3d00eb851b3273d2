//! The seam between the query API and its store: one trait, answered by
//! ClickHouse here and by the embedded store in the all-in-one binary. The
//! conformance suite (`tests/tests/conformance.rs`) holds both to the same answers.

use futures::future::BoxFuture;
use meterline_aggregator::alerts::AlertRow;
use meterline_aggregator::rollup::EventRow;
use meterline_aggregator::store::Store;

use crate::QueryError;
use crate::params::Scope;
use crate::queries::{self, SumRow};

/// Sums grouped by a time bucket and dimensions.
#[derive(Debug, Clone)]
pub struct SumsQuery {
    /// `minute`, `hour`, `day`, `month` or `total`.
    pub granularity: &'static str,
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
        SumsQuery { granularity: "total", group_by: group_by.to_vec(), negative_only: false, order_by_margin: false, limit }
    }
}

/// The top keys of one dimension by a metric.
#[derive(Debug, Clone, Copy)]
pub struct TopQuery {
    /// `user_id` or `customer_id`.
    pub by: &'static str,
    /// `cost`, `tokens`, `revenue` or `margin`.
    pub metric: &'static str,
    pub descending: bool,
    pub limit: i64,
}

/// Where the audit trail resumes: after (seconds, nanoseconds, idempotency key).
pub type Cursor = (i64, i64, String);

/// Alerts active in a range.
#[derive(Debug, Clone)]
pub struct AlertsQuery {
    pub tenant: String,
    pub from: i64,
    pub to: i64,
    /// `open`, `resolved` or `all`.
    pub state: &'static str,
    pub user: Option<String>,
    pub rule: Option<&'static str>,
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
}

/// The ClickHouse store: the statements in [`queries`], bound and sent.
#[derive(Debug, Clone)]
pub struct ClickHouseStore(pub Store);

impl QueryStore for ClickHouseStore {
    fn sums<'a>(&'a self, scope: &'a Scope, q: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let sql = queries::sums(scope, q.granularity, &q.group_by, q.negative_only, q.order_by_margin, q.limit);
            Ok(sql.query(self.0.client()).fetch_all().await?)
        })
    }

    fn top<'a>(&'a self, scope: &'a Scope, q: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move { Ok(queries::top(scope, q.by, q.metric, q.descending, q.limit).query(self.0.client()).fetch_all().await?) })
    }

    fn negative_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async move { Ok(queries::negative_count(scope, group_by).query(self.0.client()).fetch_one().await?) })
    }

    fn events<'a>(&'a self, scope: &'a Scope, cursor: Option<&'a Cursor>, limit: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(async move { Ok(queries::events(scope, cursor, limit).query(self.0.client()).fetch_all().await?) })
    }

    fn alerts<'a>(&'a self, q: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(async move {
            let sql = queries::alerts(&q.tenant, q.from, q.to, q.state, q.user.as_deref(), q.rule, q.limit);
            Ok(sql.query(self.0.client()).fetch_all().await?)
        })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(self.0.ping())
    }
}
