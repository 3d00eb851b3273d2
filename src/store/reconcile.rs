//! Reconciliation over the embedded database: every counter of a tenant in `limit_counters` against the sum of its events, read in one snapshot.
//!
//! Events are counted in the transaction that stores them, so within one
//! read transaction a closed period's counter equals its events exactly;
//! reading counters and sums in two transactions could see an event between
//! them and report a difference that is not there.

use chrono::{DateTime, Utc};
use meterline_limits::{Definitions, Examined, Plan, PlanView, ReconcileRow, Subscription, SubscriptionView, examine};
use meterline_sql::{Dialect, metered_sum};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::collections::BTreeMap;
use std::path::Path;

use super::{DB_FILE, Embedded, binds};
use crate::EmbeddedError;
use crate::reconcile::sum_query;

/// Opens the data directory's database for reading only: the check may run
/// beside a running server (WAL lets it read while the server writes).
pub fn open_read_only(dir: &Path) -> Result<Connection, EmbeddedError> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        return Err(EmbeddedError::config("data_dir", format!("{} does not exist", path.display())));
    }
    Ok(Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?)
}

/// Every counter of `tenant` checked against its events at `now`, in one read transaction.
pub fn reconcile(conn: &Connection, tenant: &str, now: DateTime<Utc>) -> Result<Vec<ReconcileRow>, EmbeddedError> {
    let tx = conn.unchecked_transaction()?;
    let counters: Vec<(String, i64)> = tx
        .prepare("SELECT counter, used FROM limit_counters WHERE tenant = ?1 ORDER BY counter")?
        .query_map(params![tenant], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let definitions = Definitions::of(&plans(&tx, tenant)?);
    let mut rows = Vec::with_capacity(counters.len());
    for (counter, used) in counters {
        let anchor = match definitions.anchor_subject(&counter) {
            Some(subject) => subscription(&tx, tenant, &subject.key())?.and_then(|s| s.cycle_start),
            None => None,
        };
        rows.push(match examine(tenant, &counter, used, &definitions, anchor, now) {
            Examined::Done(row) => row,
            Examined::Sum(pending) => {
                let q = sum_query(tenant, &pending.metered);
                let sql = metered_sum(Dialect::Sqlite, &q).ok_or_else(|| EmbeddedError::corrupt(&counter, "a metered sum names an unknown column"))?;
                let sum: i64 = tx.prepare_cached(&sql.text)?.query_row(binds(&sql), |r| r.get(0))?;
                pending.finish(sum)
            }
        });
    }
    // Read only: nothing to keep.
    tx.rollback()?;
    Ok(rows)
}

fn plans(conn: &Connection, tenant: &str) -> Result<BTreeMap<String, Plan>, EmbeddedError> {
    let bodies: Vec<(String, String)> =
        conn.prepare("SELECT plan_id, body FROM limit_plans WHERE tenant = ?1")?.query_map(params![tenant], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    bodies
        .into_iter()
        .map(|(id, body)| {
            let view: PlanView = serde_json::from_str(&body).map_err(|e| EmbeddedError::corrupt(format!("plan {id} of tenant {tenant}"), e))?;
            let plan = Plan::from_view(&view).map_err(|e| EmbeddedError::corrupt(format!("plan {id} of tenant {tenant}"), e))?;
            Ok((id, plan))
        })
        .collect()
}

fn subscription(conn: &Connection, tenant: &str, subject: &str) -> Result<Option<Subscription>, EmbeddedError> {
    let body: Option<String> =
        conn.prepare_cached("SELECT body FROM limit_subscriptions WHERE tenant = ?1 AND subject = ?2")?.query_row(params![tenant, subject], |r| r.get(0)).optional()?;
    let what = || format!("subscription of {subject} of tenant {tenant}");
    body.map(|b| {
        let view: SubscriptionView = serde_json::from_str(&b).map_err(|e| EmbeddedError::corrupt(what(), e))?;
        Subscription::from_view(&view).map_err(|e| EmbeddedError::corrupt(what(), e))
    })
    .transpose()
}

impl Embedded {
    /// [`reconcile`] on one of the read connections.
    pub async fn reconcile(&self, tenant: &str, now: DateTime<Utc>) -> Result<Vec<ReconcileRow>, EmbeddedError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| Ok(reconcile(conn, &tenant, now))).await?
    }
}
