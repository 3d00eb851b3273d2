//! Counting stored events against limits, inside the writer's transaction:
//! every new event adds what [`counts`] gives to its counters, and an event a
//! reservation's commit metered frees that reservation's holds; plus the
//! bounded housekeeping of the limits tables that rides on commits.
//!
//! Plans and subscriptions are read once per commit and tenant; a tenant
//! without plans (the common case) costs one indexed lookup per commit.

use meterline_domain::EventRow;
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

/// A tenant's plans as counting reads them; `None` when it has none.
type Plans = Option<Arc<BTreeMap<String, Plan>>>;

/// What one commit has read of the limits configuration.
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

    /// Counts one new event row.
    pub(super) fn count(&mut self, conn: &Connection, row: &EventRow, now_ms: i64) -> Result<(), rusqlite::Error> {
        if let Some(plans) = self.plans_of(conn, &row.tenant)? {
            let user = self.subscription(conn, &row.tenant, &Subject::user(&row.user_id))?;
            let customer = match row.customer_id.as_str() {
                "" => None,
                id => self.subscription(conn, &row.tenant, &Subject::customer(id))?,
            };
            let applied = applicable(&plans, &row.user_id, user.as_ref(), Some(&row.customer_id), customer.as_ref());
            for charge in counts(&applied, row) {
                ledger::add_used(conn, &row.tenant, &charge.counter.key, charge.amount, charge.counter.keep_until)?;
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
        let purged = ledger::purge(conn, now_ms, HOUSEKEEPING_ROWS)?;
        if swept + purged > 0 {
            tracing::debug!(swept, purged, "limits housekeeping");
        }
        self.last = Instant::now();
        Ok(())
    }
}
