//! The billing export over the embedded database: the subscriptions' cycle anchors from `limit_subscriptions` and the grouped sums from `events`, for the server's route and for `meterline export`.
//!
//! The server reads on its read connections; the command opens the data
//! directory read only ([`crate::store::open_read_only`]), so it may run
//! beside a running server.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use meterline_domain::SumRow;
use meterline_limits::{Scope as SubjectScope, SubscriptionView};
use meterline_query_api::QueryError;
use meterline_query_api::export::{ExportSource, anchors_of};
use meterline_sql::{BillingSums, Dialect, billing_sums};
use rusqlite::{Connection, params};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::EmbeddedError;
use crate::query::sum_row;
use crate::store::{Embedded, binds};

fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> QueryError {
    QueryError::Store(Box::new(e))
}

/// The tenant's subscriptions, by subject key.
fn subscriptions(conn: &Connection, tenant: &str) -> Result<Vec<(String, SubscriptionView)>, EmbeddedError> {
    let bodies: Vec<(String, String)> = conn
        .prepare_cached("SELECT subject, body FROM limit_subscriptions WHERE tenant = ?1")?
        .query_map(params![tenant], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    bodies
        .into_iter()
        .map(|(subject, body)| {
            let view = serde_json::from_str(&body).map_err(|e| EmbeddedError::corrupt(format!("subscription of {subject} of tenant {tenant}"), e))?;
            Ok((subject, view))
        })
        .collect()
}

fn anchors(conn: &Connection, tenant: &str, scope: SubjectScope) -> Result<BTreeMap<String, DateTime<Utc>>, QueryError> {
    anchors_of(subscriptions(conn, tenant).map_err(store_error)?, scope)
}

fn sums(conn: &Connection, q: &BillingSums) -> Result<Vec<SumRow>, QueryError> {
    let sql = billing_sums(Dialect::Sqlite, q).ok_or_else(|| QueryError::Store("an export names an unknown subject column".into()))?;
    let mut statement = conn.prepare_cached(&sql.text).map_err(store_error)?;
    let rows = statement.query_map(binds(&sql), sum_row).map_err(store_error)?;
    rows.collect::<Result<_, _>>().map_err(store_error)
}

/// The running server's export: reads on the store's read connections.
#[derive(Debug, Clone)]
pub struct EmbeddedExport(pub Arc<Embedded>);

impl ExportSource for EmbeddedExport {
    fn anchors<'a>(&'a self, tenant: &'a str, scope: SubjectScope) -> BoxFuture<'a, Result<BTreeMap<String, DateTime<Utc>>, QueryError>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { self.0.read(move |conn| Ok(anchors(conn, &tenant, scope))).await.map_err(store_error)? })
    }

    fn sums<'a>(&'a self, q: &'a BillingSums) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        let q = q.clone();
        Box::pin(async move { self.0.read(move |conn| Ok(sums(conn, &q))).await.map_err(store_error)? })
    }
}

/// `meterline export` on a data directory: one read-only connection.
#[derive(Debug)]
pub struct ReadOnlyExport(Mutex<Connection>);

impl ReadOnlyExport {
    pub fn open(dir: &std::path::Path) -> Result<ReadOnlyExport, EmbeddedError> {
        Ok(ReadOnlyExport(Mutex::new(crate::store::open_read_only(dir)?)))
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ExportSource for ReadOnlyExport {
    fn anchors<'a>(&'a self, tenant: &'a str, scope: SubjectScope) -> BoxFuture<'a, Result<BTreeMap<String, DateTime<Utc>>, QueryError>> {
        // A command, not a server: blocking its one thread on the read is fine.
        Box::pin(std::future::ready(self.with(|conn| anchors(conn, tenant, scope))))
    }

    fn sums<'a>(&'a self, q: &'a BillingSums) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(std::future::ready(self.with(|conn| sums(conn, q))))
    }
}
