//! Counting stored events against limits, inside the writer's transaction:
//! every new event adds what [`counts`] gives to its counters, and an event a
//! reservation's commit metered frees that reservation's holds; plus the
//! bounded housekeeping of the limits tables that rides on commits.
//!
//! Threshold crossings ([`notify`](meterline_limits::notify)) are found here
//! too: each counter an event moves is read back, and a move from below a
//! watching limit's threshold to at or above it fires, once, guarded by a
//! row in `limit_alerts_fired` (per counter, limit name and ratio). The
//! alert row is written in the same transaction as the count, and the
//! webhook is sent after the commit. Retried events are not counted, so they
//! cross nothing.
//!
//! Plans and subscriptions are read once and kept across commits: only a
//! limits operation (run by this same writer) can change them, and the
//! writer forgets them after every one, and after a failed commit (what was
//! read inside it may have been rolled back). A tenant without plans (the
//! common case) then costs a map lookup per event, where a lookup per
//! commit in SQLite (and its parse) cost ~12% of ingest. Subscriptions kept
//! are bounded ([`MAX_SUBSCRIPTIONS`]): past it they are read again.

use meterline_domain::{EventRow, Rule};
use meterline_limits::notify::{LimitAlert, watches};
use meterline_limits::{KEY_PREFIX, Plan, PlanView, Subject, Subscription, SubscriptionView, applicable, counts};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ledger;
use crate::EmbeddedError;

/// Housekeeping runs at most this often, each time at most this many rows per kind.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const HOUSEKEEPING_ROWS: i64 = 256;

/// Subscriptions (found or not) kept between limits operations; past this,
/// the kept ones are dropped and read again as events need them.
const MAX_SUBSCRIPTIONS: usize = 100_000;

/// A tenant's plans as counting reads them; `None` when it has none.
type Plans = Option<Arc<BTreeMap<String, Plan>>>;

/// What the writer has read of the limits configuration since the last limits operation.
#[derive(Debug, Default)]
pub(super) struct Counting {
    plans: HashMap<String, Plans>,
    subscriptions: HashMap<(String, String), Option<Subscription>>,
}

impl Counting {
    /// Forgets what was read: a limits operation may have changed it.
    pub(super) fn forget(&mut self) {
        self.plans.clear();
        self.subscriptions.clear();
    }

    /// Counts one new event row; the limit alerts it fired (stored) are
    /// added to `fired`, for the webhook after the commit.
    pub(super) fn count(&mut self, conn: &Connection, row: &EventRow, now_ms: i64, fired: &mut Vec<LimitAlert>) -> Result<(), rusqlite::Error> {
        if let Some(plans) = self.plans_of(conn, &row.tenant)? {
            let user = self.subscription(conn, &row.tenant, &Subject::user(&row.user_id))?;
            let customer = match row.customer_id.as_str() {
                "" => None,
                id => self.subscription(conn, &row.tenant, &Subject::customer(id))?,
            };
            let applied = applicable(&plans, &row.user_id, user.as_ref(), Some(&row.customer_id), customer.as_ref());
            let watching = watches(&applied, row);
            for charge in counts(&applied, row) {
                ledger::add_used(conn, &row.tenant, &charge.counter.key, charge.amount, charge.counter.keep_until)?;
                let mut watchers = watching.iter().filter(|w| w.counter.key == charge.counter.key).peekable();
                if watchers.peek().is_none() {
                    continue;
                }
                let after: i64 = conn
                    .prepare_cached("SELECT used FROM limit_counters WHERE tenant = ?1 AND counter = ?2")?
                    .query_row(params![row.tenant, charge.counter.key], |r| r.get(0))?;
                for crossing in watchers.flat_map(|w| w.crossings(after.saturating_sub(charge.amount), after)) {
                    let marked = conn
                        .prepare_cached("INSERT OR IGNORE INTO limit_alerts_fired (tenant, counter, limit_name, ratio, keep_until) VALUES (?1, ?2, ?3, ?4, ?5)")?
                        .execute(params![row.tenant, crossing.watch.counter.key, crossing.watch.limit.name, crossing.ratio, crossing.watch.counter.keep_until])?;
                    if marked == 0 {
                        continue;
                    }
                    let at = opened_at(conn, &row.tenant, &crossing.watch.subject.id, now_ms / 1_000)?;
                    super::alerts::store_row(conn, &crossing.alert_row(&row.tenant, at, u64::try_from(now_ms).unwrap_or(0)))?;
                    fired.push(crossing.body(&row.tenant));
                }
            }
        }
        // Checked whatever the plans: a reservation admitted with no limits still waits for its event.
        if row.idempotency_key.starts_with(KEY_PREFIX) {
            match ledger::counted(conn, &row.tenant, &row.idempotency_key, now_ms) {
                Ok(()) => {}
                Err(EmbeddedError::Sqlite(e)) => return Err(e),
                // The event stands; only the record's holds stay until they expire.
                Err(e) => tracing::warn!(tenant = %row.tenant, error = %e, "a reservation record does not parse; its holds were not freed"),
            }
        }
        Ok(())
    }

    fn plans_of(&mut self, conn: &Connection, tenant: &str) -> Result<Plans, rusqlite::Error> {
        if let Some(plans) = self.plans.get(tenant) {
            return Ok(plans.clone());
        }
        let mut plans = BTreeMap::new();
        let rows: Vec<(String, String)> = conn
            .prepare_cached("SELECT plan_id, body FROM limit_plans WHERE tenant = ?1")?
            .query_map(params![tenant], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (plan_id, body) in rows {
            let parsed = serde_json::from_str::<PlanView>(&body).map_err(|e| e.to_string()).and_then(|v| Plan::from_view(&v).map_err(|e| e.to_string()));
            match parsed {
                Ok(plan) => {
                    plans.insert(plan_id, plan);
                }
                // Events are never refused for a bad plan; the plans API reports it.
                Err(e) => tracing::warn!(%tenant, %plan_id, error = %e, "a stored plan does not parse; its limits count nothing"),
            }
        }
        let plans = (!plans.is_empty()).then(|| Arc::new(plans));
        self.plans.insert(tenant.to_owned(), plans.clone());
        Ok(plans)
    }

    fn subscription(&mut self, conn: &Connection, tenant: &str, subject: &Subject) -> Result<Option<Subscription>, rusqlite::Error> {
        let at = (tenant.to_owned(), subject.key());
        if let Some(sub) = self.subscriptions.get(&at) {
            return Ok(sub.clone());
        }
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            self.subscriptions.clear();
        }
        let body: Option<String> = conn
            .prepare_cached("SELECT body FROM limit_subscriptions WHERE tenant = ?1 AND subject = ?2")?
            .query_row(params![tenant, at.1], |r| r.get(0))
            .optional()?;
        let sub = body.and_then(|b| {
            let parsed = serde_json::from_str::<SubscriptionView>(&b).map_err(|e| e.to_string()).and_then(|v| Subscription::from_view(&v).map_err(|e| e.to_string()));
            parsed.map_err(|e| tracing::warn!(%tenant, subject = %at.1, error = %e, "a stored subscription does not parse; the default plan applies")).ok()
        });
        self.subscriptions.insert(at, sub.clone());
        Ok(sub)
    }
}

/// The time of a new limit alert of `subject`: `now`, or a second past its
/// latest one, so no two share the alerts table's key (tenant, user, rule,
/// opened_at) when several cross in one second.
fn opened_at(conn: &Connection, tenant: &str, subject: &str, now: i64) -> Result<i64, rusqlite::Error> {
    let last: Option<i64> = conn
        .prepare_cached("SELECT MAX(opened_at) FROM alerts WHERE tenant = ?1 AND user_id = ?2 AND rule = ?3")?
        .query_row(params![tenant, subject, Rule::Limit.as_str()], |r| r.get(0))?;
    Ok(last.map_or(now, |l| now.max(l + 1)))
}

/// Marks resolved the open limit alerts whose period has reset (the
/// `resolved_at` they hold), and drops fired-markers of counters gone; bounded.
fn limit_alerts_housekeeping(conn: &Connection, now_ms: i64, limit: i64) -> Result<usize, rusqlite::Error> {
    let now = now_ms / 1_000;
    let resolved = conn
        .prepare_cached(
            "UPDATE alerts SET state = 'resolved', updated_at = resolved_at, version = version + 1 \
             WHERE (tenant, user_id, rule, opened_at) IN (SELECT tenant, user_id, rule, opened_at FROM alerts \
             WHERE rule = ?1 AND state = 'open' AND resolved_at <= ?2 LIMIT ?3)",
        )?
        .execute(params![Rule::Limit.as_str(), now, limit])?;
    let purged = conn
        .prepare_cached(
            "DELETE FROM limit_alerts_fired WHERE (tenant, counter, limit_name, ratio) IN \
             (SELECT tenant, counter, limit_name, ratio FROM limit_alerts_fired WHERE keep_until < ?1 LIMIT ?2)",
        )?
        .execute(params![now, limit])?;
    Ok(resolved + purged)
}

/// When the limits tables were last swept and purged.
#[derive(Debug)]
pub(super) struct Housekeeping {
    last: Instant,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping { last: Instant::now() }
    }
}

impl Housekeeping {
    /// Sweeps expired holds and purges kept-too-long rows, if due; bounded work.
    pub(super) fn run(&mut self, conn: &Connection, now_ms: i64) -> Result<(), rusqlite::Error> {
        if self.last.elapsed() < HOUSEKEEPING_EVERY {
            return Ok(());
        }
        let swept = ledger::sweep(conn, now_ms, HOUSEKEEPING_ROWS)?;
        let purged = ledger::purge(conn, now_ms, HOUSEKEEPING_ROWS)? + limit_alerts_housekeeping(conn, now_ms, HOUSEKEEPING_ROWS)?;
        if swept + purged > 0 {
            tracing::debug!(swept, purged, "limits housekeeping");
        }
        self.last = Instant::now();
        Ok(())
    }
}
