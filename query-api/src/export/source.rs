//! Where an export reads: one trait (the subscriptions' cycle anchors, and the grouped sums per segment), answered here by ClickHouse with Redis's subscriptions, and by the embedded store in the all-in-one binary.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use meterline_clickhouse::Store;
use meterline_domain::SumRow;
use meterline_limits::{Scope as SubjectScope, Subscription, SubscriptionView};
use meterline_redis::RedisLimits;
use meterline_sql::{BillingSums, Dialect, billing_sums};
use std::collections::BTreeMap;

use crate::QueryError;

/// What an export needs from a deployment.
pub trait ExportSource: Send + Sync + std::fmt::Debug {
    /// The cycle anchor of every subject of `scope` whose subscription sets
    /// `cycle_start`, by subject id.
    fn anchors<'a>(&'a self, tenant: &'a str, scope: SubjectScope) -> BoxFuture<'a, Result<BTreeMap<String, DateTime<Utc>>, QueryError>>;
    /// [`billing_sums`]'s rows (one per segment and subject with events).
    fn sums<'a>(&'a self, q: &'a BillingSums) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>>;
}

/// The anchors among a tenant's subscriptions (`Subject::key()` -> view)
/// for subjects of `scope`. A subscription that does not parse is an error,
/// not a calendar month: a bill must not silently change its periods.
pub fn anchors_of(subs: impl IntoIterator<Item = (String, SubscriptionView)>, scope: SubjectScope) -> Result<BTreeMap<String, DateTime<Utc>>, QueryError> {
    let prefix = format!("{}:", scope.name());
    let mut out = BTreeMap::new();
    for (key, view) in subs {
        let Some(id) = key.strip_prefix(&prefix) else { continue };
        let sub = Subscription::from_view(&view).map_err(|e| QueryError::Store(format!("subscription of {key}: {e}").into()))?;
        if let Some(anchor) = sub.cycle_start {
            out.insert(id.to_owned(), anchor);
        }
    }
    Ok(out)
}

/// The distributed deployment: sums from ClickHouse's `events`, anchors
/// from the limits' Redis when one is configured (else none: every subject
/// is billed per calendar month).
#[derive(Debug, Clone)]
pub struct ClickHouseExport {
    pub store: Store,
    pub redis: Option<RedisLimits>,
}

impl ExportSource for ClickHouseExport {
    fn anchors<'a>(&'a self, tenant: &'a str, scope: SubjectScope) -> BoxFuture<'a, Result<BTreeMap<String, DateTime<Utc>>, QueryError>> {
        Box::pin(async move {
            match &self.redis {
                None => Ok(BTreeMap::new()),
                Some(redis) => {
                    let subs = redis.all_subscriptions(tenant).await.map_err(|e| QueryError::Store(Box::new(e)))?;
                    anchors_of(subs, scope)
                }
            }
        })
    }

    fn sums<'a>(&'a self, q: &'a BillingSums) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async move {
            let sql = billing_sums(Dialect::ClickHouse, q).ok_or_else(|| QueryError::Store("an export names an unknown subject column".into()))?;
            Ok(self.store.query(&sql).fetch_all::<SumRow>().await?)
        })
    }
}
