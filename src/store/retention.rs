//! Retention in the embedded store: the writer deletes what is past each
//! horizon of `[retention]`, a small batch at a time between group commits.
//!
//! Each step is its own short transaction of at most [`STEP_ROWS`] deleted
//! rows, run by the writer thread after a commit, so ingest waits for one
//! step at most (milliseconds), never for a whole purge. While rows remain,
//! the next step comes [`PACE`] times the last step's duration later, so a
//! backlog (the first run after an upgrade, or after a long stop) takes at
//! most a fifth of the writer's time; once none remain the purge sleeps for
//! `retention.interval_secs`. (Unpaced, a 1,000,000-row backlog made
//! ingest's p99 7.7 times the baseline's: `retention-bench`.) Every delete walks an index from its
//! oldest end, so a step costs its own rows, not the table's size.
//!
//! What goes, per kind (horizons as in `meterline_domain::RetentionConfig`):
//! events written and dated before the horizon (a row dated ahead of its
//! writing stays until its own time leaves the window), minute and daily
//! rollup windows before it, resolved alerts opened before it (an open one
//! is still tracked by the runaway rules), and the Stripe sync's hours
//! before it. Dedupe here is the events table itself, so a key is
//! remembered as long as its event is kept; ingest refuses events older
//! than `events.max_past_secs`, which validation keeps inside the horizon.

use chrono::{DateTime, Utc};
use meterline_aggregator::metrics as agg_metrics;
use meterline_domain::{Kept, RetentionConfig};
use rusqlite::{Connection, params_from_iter, types::Value};
use std::time::{Duration, Instant};

use super::schema::{DAILY_TABLE, DIMS_TABLE, MINUTE_TABLE};

/// Most rows one step deletes, over every table.
pub(super) const STEP_ROWS: usize = 500;

/// While a backlog remains, the pause after a step is this many times its duration.
const PACE: u32 = 4;

/// A table deleted by time within each value of its leading key columns:
/// `prefix` then `time` lead an index, so each delete is a range scan.
struct Sweep {
    kept: Kept,
    table: &'static str,
    prefix: &'static [&'static str],
    time: &'static str,
    /// The primary key: what a batch's rows are deleted by.
    key: &'static str,
    /// Further conditions, constant.
    only: &'static str,
}

const ROLLUP_KEY: &str = "tenant, window_start, user_id, customer_id, feature, model, environment, billable";

const SWEEPS: &[Sweep] = &[
    Sweep { kept: Kept::RollupsMinute, table: MINUTE_TABLE, prefix: &["tenant"], time: "window_start", key: ROLLUP_KEY, only: "" },
    Sweep { kept: Kept::RollupsDaily, table: DAILY_TABLE, prefix: &["tenant"], time: "window_start", key: ROLLUP_KEY, only: "" },
    Sweep { kept: Kept::RollupsDaily, table: DIMS_TABLE, prefix: &["tenant"], time: "window_start", key: ROLLUP_KEY, only: "" },
    Sweep { kept: Kept::Alerts, table: "alerts", prefix: &[], time: "opened_at", key: "tenant, user_id, rule, opened_at", only: " AND state = 'resolved'" },
    Sweep { kept: Kept::BillingWindows, table: "billing_windows", prefix: &["tenant", "meter"], time: "window_start", key: "tenant, meter, window_start, subject", only: "" },
];

/// The writer's purge: when it is due, and whether rows remain.
#[derive(Debug)]
pub(super) struct Retention {
    config: RetentionConfig,
    next: Instant,
}

impl Retention {
    /// Due at once: a restart after a long stop purges first.
    pub(super) fn new(config: RetentionConfig) -> Retention {
        Retention { config, next: Instant::now() }
    }

    /// How long until the next step.
    pub(super) fn due_in(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    /// One step if due: logs a failure and tries again at the next interval.
    pub(super) fn step(&mut self, conn: &mut Connection) {
        if !self.due_in().is_zero() {
            return;
        }
        let started = Instant::now();
        let more = match step_at(conn, &self.config, Utc::now(), STEP_ROWS) {
            Ok(deleted) => deleted.iter().map(|(_, n)| n).sum::<usize>() >= STEP_ROWS,
            Err(e) => {
                tracing::warn!(error = %e, "embedded retention step failed; retrying at the next interval");
                false
            }
        };
        self.next = if more { Instant::now() + started.elapsed() * PACE } else { Instant::now() + Duration::from_secs(self.config.interval_secs) };
    }
}

/// One transaction deleting at most `budget` rows past the horizons as of
/// `now`: per table, how many went.
pub(super) fn step_at(conn: &mut Connection, config: &RetentionConfig, now: DateTime<Utc>, budget: usize) -> Result<Vec<(&'static str, usize)>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut left = budget;
    let mut out = Vec::new();
    if let Some(oldest) = config.oldest(Kept::Events, now) {
        let n = events(&tx, oldest.timestamp(), left)?;
        left -= n;
        out.push(("events", n));
    }
    for sweep in SWEEPS {
        let Some(oldest) = config.oldest(sweep.kept, now) else { continue };
        let mut n = 0;
        for prefix in prefixes(&tx, sweep.table, sweep.prefix)? {
            if left == n {
                break;
            }
            n += sweep_batch(&tx, sweep, &prefix, oldest.timestamp(), left - n)?;
        }
        left -= n;
        out.push((sweep.table, n));
    }
    tx.commit()?;
    for (table, n) in &out {
        if *n > 0 {
            agg_metrics::retention_dropped(table, 0, *n as u64);
        }
    }
    Ok(out)
}

/// Events written and dated before `oldest`, among the oldest `limit` by
/// row id (the single writer appends, so row ids follow `written_at`): the
/// scan stops at the window's edge instead of reading the whole table.
fn events(conn: &Connection, oldest: i64, limit: usize) -> Result<usize, rusqlite::Error> {
    if limit == 0 {
        return Ok(0);
    }
    conn.execute(
        "DELETE FROM events WHERE rowid IN (SELECT rowid FROM (SELECT rowid, written_at, event_time FROM events ORDER BY rowid LIMIT ?1) \
         WHERE written_at < ?2 AND event_time < ?2)",
        rusqlite::params![i64::try_from(limit).unwrap_or(i64::MAX), oldest],
    )
}

/// Every distinct value of the `columns` (a key's leading columns) in
/// `table`, found by seeking the key rather than scanning the table.
fn prefixes(conn: &Connection, table: &str, columns: &[&str]) -> Result<Vec<Vec<Value>>, rusqlite::Error> {
    let mut found: Vec<Vec<Value>> = vec![Vec::new()];
    for (depth, column) in columns.iter().enumerate() {
        let fixed: String = columns[..depth].iter().map(|c| format!("{c} = ? AND ")).collect();
        let mut next = conn.prepare_cached(&format!("SELECT {column} FROM {table} WHERE {fixed}{column} > ? ORDER BY {column} LIMIT 1"))?;
        let mut deeper = Vec::new();
        for prefix in &found {
            let mut after = Value::Text(String::new());
            // '' sorts first among texts; the loop below finds the rest.
            let mut exact = conn.prepare_cached(&format!("SELECT 1 FROM {table} WHERE {fixed}{column} = '' LIMIT 1"))?;
            if exact.exists(params_from_iter(prefix.iter()))? {
                deeper.push([prefix.clone(), vec![Value::Text(String::new())]].concat());
            }
            loop {
                let binds: Vec<&Value> = prefix.iter().chain(std::iter::once(&after)).collect();
                let value: Option<Value> = next.query_row(params_from_iter(binds), |r| r.get(0)).map(Some).or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
                let Some(value) = value else { break };
                deeper.push([prefix.clone(), vec![value.clone()]].concat());
                after = value;
            }
        }
        found = deeper;
    }
    Ok(found)
}

/// Up to `limit` rows of one prefix whose time is before `oldest`.
fn sweep_batch(conn: &Connection, sweep: &Sweep, prefix: &[Value], oldest: i64, limit: usize) -> Result<usize, rusqlite::Error> {
    let fixed: String = sweep.prefix.iter().map(|c| format!("{c} = ? AND ")).collect();
    let (table, key, time, only) = (sweep.table, sweep.key, sweep.time, sweep.only);
    let mut delete = conn.prepare_cached(&format!(
        "DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {fixed}{time} < ?{only} LIMIT ?)"
    ))?;
    let mut binds: Vec<Value> = prefix.to_vec();
    binds.extend([Value::Integer(oldest), Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX))]);
    delete.execute(params_from_iter(binds.iter()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_domain::Keep;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).map(|t| t.to_utc()).unwrap_or_default()
    }

    fn db() -> Connection {
        let dir = std::env::temp_dir().join(format!("meterline-retention-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut conn = super::super::schema::connect(&dir.join("db")).expect("open");
        super::super::schema::migrate(&mut conn).expect("migrate");
        conn
    }

    fn event(conn: &Connection, n: usize, tenant: &str, secs: i64) {
        conn.execute(
            "INSERT INTO events VALUES (?1, ?2, 0, ?3, 0, 'u', '', '', '', '', '', 1, 0, 0, 0, 0, 0, 0, 0, 0, '', ?3, ?3)",
            rusqlite::params![tenant, format!("k{n}"), secs],
        )
        .expect("event");
    }

    fn rollup(conn: &Connection, table: &str, tenant: &str, user: &str, secs: i64) {
        conn.execute(
            &format!("INSERT INTO {table} VALUES (?1, ?2, ?3, '', '', '', '', 1, 1, 0, 0, 0, 0, 5, 0, 0, 0)"),
            rusqlite::params![tenant, secs, user],
        )
        .expect("rollup");
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    #[test]
    fn purges_what_is_past_each_horizon_and_nothing_inside_in_small_steps() {
        let mut conn = db();
        let now = at("2026-11-27T12:00:00Z");
        let config = RetentionConfig { rollups_minute_days: Keep::Days(40), ..RetentionConfig::default() };
        let oldest_events = config.oldest(Kept::Events, now).expect("finite").timestamp();
        let oldest_minutes = config.oldest(Kept::RollupsMinute, now).expect("finite").timestamp();
        for n in 0..30 {
            event(&conn, n, if n % 2 == 0 { "acme" } else { "globex" }, oldest_events - 1 - n as i64);
        }
        event(&conn, 100, "acme", oldest_events);
        event(&conn, 101, "acme", now.timestamp());
        for (tenant, user) in [("acme", "u1"), ("acme", "u2"), ("globex", "u1"), ("", "u3")] {
            rollup(&conn, MINUTE_TABLE, tenant, user, oldest_minutes - 60);
            rollup(&conn, MINUTE_TABLE, tenant, user, oldest_minutes);
            rollup(&conn, DAILY_TABLE, tenant, user, 0);
        }
        // Steps of 7 rows: the purge takes several, each bounded.
        let mut steps = 0;
        loop {
            let deleted = step_at(&mut conn, &config, now, 7).expect("step");
            let n: usize = deleted.iter().map(|(_, n)| n).sum();
            assert!(n <= 7);
            steps += 1;
            if n < 7 {
                break;
            }
        }
        assert!(steps >= 5, "{steps} steps");
        assert_eq!(count(&conn, "SELECT count(*) FROM events"), 2, "the rows at and after the horizon stay");
        assert_eq!(count(&conn, "SELECT min(event_time) FROM events"), oldest_events);
        assert_eq!(count(&conn, &format!("SELECT count(*) FROM {MINUTE_TABLE} WHERE window_start < {oldest_minutes}")), 0);
        assert_eq!(count(&conn, &format!("SELECT count(*) FROM {MINUTE_TABLE}")), 4, "every tenant's row at the horizon stays");
        assert_eq!(count(&conn, &format!("SELECT count(*) FROM {DAILY_TABLE}")), 4, "day rollups are kept forever by default");
    }

    #[test]
    fn only_resolved_alerts_go_and_billing_windows_by_meter() {
        let mut conn = db();
        let now = at("2026-11-27T12:00:00Z");
        let config = RetentionConfig::default();
        let oldest = config.oldest(Kept::Alerts, now).expect("finite").timestamp();
        for (user, state, opened) in [("a", "resolved", oldest - 1), ("b", "open", oldest - 1), ("c", "resolved", oldest)] {
            conn.execute("INSERT INTO alerts VALUES ('t', ?1, 'peers', ?3, ?2, 0, 0, 0, 0, 0, 1)", rusqlite::params![user, state, opened]).expect("alert");
        }
        for (meter, start) in [("m1", oldest - 3_600), ("m2", oldest - 3_600), ("m2", oldest)] {
            conn.execute("INSERT INTO billing_windows VALUES ('t', ?1, 's', ?2, 'cus', 1, 1, NULL, 0, NULL, 0)", rusqlite::params![meter, start]).expect("window");
        }
        step_at(&mut conn, &config, now, STEP_ROWS).expect("step");
        assert_eq!(count(&conn, "SELECT count(*) FROM alerts WHERE user_id IN ('b', 'c')"), 2);
        assert_eq!(count(&conn, "SELECT count(*) FROM alerts"), 2);
        assert_eq!(count(&conn, "SELECT count(*) FROM billing_windows"), 1);
    }
}
