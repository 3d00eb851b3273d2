//! The runaway alerts in the embedded store: when evaluation is due
//! ([`due_in`]), the rules' spend read from the rollups inside the writer's
//! transaction, the transitions stored, and the stored alerts read back
//! ([`open_alerts`], [`alert_row`]).

use chrono::Utc;
use meterline_domain::{AlertBook, AlertRow, DAY_SECS, Periods, Spend, Transition, window_start};
use meterline_sql::{Sql, i, s};
use rusqlite::{Connection, Transaction, params};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::binds;
use super::schema::{DAILY_TABLE, MINUTE_TABLE};

/// How long until alerts are due, if ever: touched users every `every`,
/// open alerts alone every `reevery`.
pub(super) fn due_in(evaluator: &AlertBook, touched: bool, last: Instant, every: Duration, reevery: Duration) -> Option<Duration> {
    if !evaluator.enabled() {
        return None;
    }
    let period = if touched {
        every
    } else if evaluator.has_open() {
        reevery
    } else {
        return None;
    };
    Some(period.saturating_sub(last.elapsed()))
}

/// The stored open alerts.
pub(super) fn open_alerts(conn: &Connection) -> Result<Vec<AlertRow>, rusqlite::Error> {
    let mut stmt = conn.prepare(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE state = 'open'"))?;
    stmt.query_map([], alert_row)?.collect()
}

/// The columns [`alert_row`] reads, in order.
pub const ALERT_COLUMNS: &str =
    "tenant, user_id, rule, opened_at, state, observed_nanos, threshold_nanos, window_secs, updated_at, resolved_at, version";

pub fn alert_row(r: &rusqlite::Row<'_>) -> Result<AlertRow, rusqlite::Error> {
    Ok(AlertRow {
        tenant: r.get(0)?,
        user_id: r.get(1)?,
        rule: r.get(2)?,
        opened_at: r.get(3)?,
        state: r.get(4)?,
        observed_nanos: r.get(5)?,
        threshold_nanos: r.get(6)?,
        window_secs: r.get(7)?,
        updated_at: r.get(8)?,
        resolved_at: r.get(9)?,
        version: u64::try_from(r.get::<_, i64>(10)?).unwrap_or(0),
    })
}

/// Stores decided transitions: each replaces its alert's row.
pub(super) fn store(tx: &Transaction<'_>, transitions: &[Transition]) -> Result<(), rusqlite::Error> {
    transitions.iter().try_for_each(|t| store_row(tx, &t.row))
}

/// Stores one alert, replacing its row (runaway transitions, limit crossings).
pub(super) fn store_row(conn: &Connection, a: &AlertRow) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO alerts (tenant, user_id, rule, opened_at, state, observed_nanos, threshold_nanos, \
         window_secs, updated_at, resolved_at, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        a.tenant,
        a.user_id,
        a.rule,
        a.opened_at,
        a.state,
        a.observed_nanos,
        a.threshold_nanos,
        a.window_secs,
        a.updated_at,
        a.resolved_at,
        i64::try_from(a.version).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

/// Every user's cost in the tenant's minute rows since `from`.
fn window_costs(tenant: &str, from: i64) -> Sql {
    let mut q = Sql::new(format!("SELECT user_id, SUM(cost_nanos) FROM {MINUTE_TABLE}"));
    q.push(" WHERE tenant = ? AND window_start >= ? GROUP BY user_id", [s(tenant), i(from)]);
    q
}

/// Every user's cost in the tenant's minute rows over `[from, to)`: one
/// range read of the key for all users. Read per user instead, SQLite's
/// planner took the same key range (tenant, time) for each user and so read
/// the whole day once per touched user: at 8.1M stored events and ~10,000
/// touched users an evaluation took 7.6-24 s inside the commit, stalling
/// ingest (`embedded-bench` scale row); this read takes ~50 ms there.
fn minutes_costs(tenant: &str, from: i64, to: i64) -> Sql {
    let mut q = Sql::new(format!("SELECT user_id, SUM(cost_nanos) FROM {MINUTE_TABLE}"));
    q.push(" WHERE tenant = ? AND window_start >= ? AND window_start < ? GROUP BY user_id", [s(tenant), i(from), i(to)]);
    q
}

/// One user's cost and loss (cost less revenue) in daily rows since `from`.
fn days_cost_and_loss(tenant: &str, user: &str, from: i64) -> Sql {
    let mut q = Sql::new(format!("SELECT COALESCE(SUM(cost_nanos), 0), COALESCE(SUM(cost_nanos) - SUM(revenue_nanos), 0) FROM {DAILY_TABLE}"));
    q.push(" WHERE tenant = ? AND user_id = ? AND window_start >= ?", [s(tenant), s(user), i(from)]);
    q
}

/// Runs a read of (user, cost) rows (of fixed text, so its statement is cached).
fn user_costs(tx: &Transaction<'_>, q: &Sql) -> Result<std::collections::HashMap<String, i64>, rusqlite::Error> {
    tx.prepare_cached(&q.text)?.query_map(binds(q), |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?.collect()
}

/// Runs a one-row read (of fixed text, so its statement is cached).
fn one_row<T>(tx: &Transaction<'_>, q: &Sql, f: impl FnOnce(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error>) -> Result<T, rusqlite::Error> {
    tx.prepare_cached(&q.text)?.query_row(binds(q), f)
}

/// The rules' sums from the rollups, exactly as the ClickHouse evaluator
/// reads them from minute rows: whole days come from the daily table and
/// only the partial first day of the week from minute rows, which is the
/// same sum for less reading.
pub(super) fn evaluate(tx: &Transaction<'_>, evaluator: &AlertBook, touched: &BTreeSet<(String, String)>, now: i64) -> Result<Vec<Transition>, rusqlite::Error> {
    let mut out = Vec::new();
    let now_dt = chrono::DateTime::from_timestamp(now, 0).unwrap_or_else(Utc::now);
    for (tenant, users) in evaluator.targets(touched) {
        let periods = Periods::at(&evaluator.config().rules_for(&tenant), now_dt);
        let mut spend = Spend::default();
        let window = window_costs(&tenant, periods.window);
        spend.window = user_costs(tx, &window)?;
        let week_days = window_start(periods.week + DAY_SECS - 1, DAY_SECS);
        let partials = user_costs(tx, &minutes_costs(&tenant, periods.week, week_days))?;
        for user in &users {
            let partial = partials.get(user).copied().unwrap_or(0);
            let (whole, _): (i64, i64) = one_row(tx, &days_cost_and_loss(&tenant, user, week_days), |r| Ok((r.get(0)?, r.get(1)?)))?;
            spend.week.insert(user.clone(), partial + whole);
            let (_, loss): (i64, i64) = one_row(tx, &days_cost_and_loss(&tenant, user, periods.month), |r| Ok((r.get(0)?, r.get(1)?)))?;
            spend.loss.insert(user.clone(), loss);
        }
        out.extend(evaluator.decide(&tenant, &users, &spend, now));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spend_reads_bind_in_order() {
        // The statements the store always sent, with positional placeholders
        // (SQLite numbers `?` in order) instead of numbered ones.
        let q = window_costs("t", 1);
        assert_eq!(q.text, "SELECT user_id, SUM(cost_nanos) FROM rollups_minute WHERE tenant = ? AND window_start >= ? GROUP BY user_id");
        assert_eq!(q.binds, vec![s("t"), i(1)]);
        let q = minutes_costs("t", 1, 2);
        assert_eq!(q.text, "SELECT user_id, SUM(cost_nanos) FROM rollups_minute WHERE tenant = ? AND window_start >= ? AND window_start < ? GROUP BY user_id");
        assert_eq!(q.binds, vec![s("t"), i(1), i(2)]);
        let q = days_cost_and_loss("t", "u", 3);
        assert_eq!(
            q.text,
            "SELECT COALESCE(SUM(cost_nanos), 0), COALESCE(SUM(cost_nanos) - SUM(revenue_nanos), 0) FROM rollups_daily_by_user \
             WHERE tenant = ? AND user_id = ? AND window_start >= ?"
        );
        assert_eq!(q.binds, vec![s("t"), s("u"), i(3)]);
    }

    #[test]
    fn one_read_gives_each_users_minutes_in_the_range() {
        let dir = std::env::temp_dir().join(format!("meterline-alerts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut conn = super::super::schema::connect(&dir.join("db")).expect("open");
        super::super::schema::migrate(&mut conn).expect("migrate");
        // (tenant, user, minute, cost): the range is [600, 1200).
        for (tenant, user, at, cost) in [("t", "a", 540, 1), ("t", "a", 600, 10), ("t", "a", 1140, 20), ("t", "b", 660, 300), ("t", "b", 1200, 4_000), ("o", "a", 600, 50_000)] {
            conn.execute(
                &format!("INSERT INTO {MINUTE_TABLE} VALUES (?1, ?2, ?3, '', '', '', '', 1, 1, 0, 0, 0, 0, ?4, 0, 0, 0)"),
                params![tenant, at, user, cost],
            )
            .expect("rollup");
        }
        let tx = conn.transaction().expect("tx");
        let costs = user_costs(&tx, &minutes_costs("t", 600, 1_200)).expect("read");
        assert_eq!(costs, [("a".to_owned(), 30), ("b".to_owned(), 300)].into_iter().collect());
    }
}
