//! The embedded store: one SQLite database in the data directory holding the
//! events, both rollup tables and the alerts, written by one writer thread in
//! group commits.
//!
//! Exactly-once is structural here: a request's events, the rollup rows that
//! sum them and the alert changes they cause are written in one SQLite
//! transaction, committed (`synchronous = FULL`, so on disk) before any of the
//! requests in the group is answered 2xx. A crash before the commit loses the
//! whole group, which no client was told was accepted; a crash after it loses
//! nothing. Retries of a committed event find its key in `events` and are
//! dropped, over the whole retention (not only the 35-day window).
//!
//! The decisions are the distributed pipeline's own code: [`Decision::of`] for
//! dedupe, [`price`] for cost and revenue, [`window_start`] for the windows,
//! and the alerts [`Evaluator`] for the runaway rules. Only the log (a channel
//! to this thread instead of Kafka) and the store (SQLite instead of
//! ClickHouse) differ.

use chrono::Utc;
use meterline_aggregator::Notifier;
use meterline_domain::{AlertBook as Evaluator, AlertRow, CostSource, DAY_SECS, Decision, EventRow, MINUTE_SECS, Periods, Source, Spend, Transition, datetime_secs, fingerprint, price, window_start};
use meterline_aggregator::metrics::{self as agg_metrics, BusinessLabels};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use meterline_schemas::wire::Envelope;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

use crate::EmbeddedError;
use crate::config::Config;

/// The database file inside the data directory.
pub const DB_FILE: &str = "meterline.db";

/// The columns both rollup tables have (the daily one leaves feature, model
/// and environment empty and billable 0, as ClickHouse's does).
macro_rules! rollup_columns {
    () => {
        "tenant TEXT NOT NULL, window_start INTEGER NOT NULL, user_id TEXT NOT NULL, customer_id TEXT NOT NULL,
        feature TEXT NOT NULL, model TEXT NOT NULL, environment TEXT NOT NULL, billable INTEGER NOT NULL,
        events INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
        revenue_nanos INTEGER NOT NULL, credits_nanos INTEGER NOT NULL, unpriced_events INTEGER NOT NULL,"
    };
}

/// The schema, applied in order; `PRAGMA user_version` records how far.
const MIGRATIONS: &[&str] = &[
    // 1: events (the audit trail and the dedupe record), rollups, alerts.
    concat!(
        "CREATE TABLE events (
        tenant TEXT NOT NULL, idempotency_key TEXT NOT NULL, fingerprint INTEGER NOT NULL,
        event_time INTEGER NOT NULL, event_time_ns INTEGER NOT NULL,
        user_id TEXT NOT NULL, customer_id TEXT NOT NULL, feature TEXT NOT NULL, model TEXT NOT NULL,
        provider TEXT NOT NULL, environment TEXT NOT NULL, billable INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
        cost_nanos INTEGER NOT NULL, cost_source INTEGER NOT NULL, revenue_nanos INTEGER NOT NULL,
        credits_nanos INTEGER NOT NULL, metadata TEXT NOT NULL, received_at INTEGER NOT NULL, written_at INTEGER NOT NULL,
        UNIQUE (tenant, idempotency_key));
     CREATE INDEX events_by_user ON events (tenant, user_id, event_time, event_time_ns, idempotency_key);
     CREATE TABLE rollups_minute (",
        rollup_columns!(),
        "PRIMARY KEY (tenant, window_start, user_id, customer_id, feature, model, environment, billable)) WITHOUT ROWID;
     CREATE INDEX rollups_minute_by_user ON rollups_minute (tenant, user_id, window_start);
     -- User first: the alert rules read one user's days, and top spenders
     -- group by user, both in key order; the index serves short ranges.
     CREATE TABLE rollups_user_day (",
        rollup_columns!(),
        "PRIMARY KEY (tenant, user_id, window_start, customer_id, feature, model, environment, billable)) WITHOUT ROWID;
     CREATE INDEX rollups_user_day_by_time ON rollups_user_day (tenant, window_start);
     CREATE TABLE alerts (
        tenant TEXT NOT NULL, user_id TEXT NOT NULL, rule TEXT NOT NULL, opened_at INTEGER NOT NULL,
        state TEXT NOT NULL, observed_nanos INTEGER NOT NULL, threshold_nanos INTEGER NOT NULL,
        window_secs INTEGER NOT NULL, updated_at INTEGER NOT NULL, resolved_at INTEGER NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (tenant, user_id, rule, opened_at)) WITHOUT ROWID;
     CREATE INDEX alerts_open ON alerts (state);"
    ),
    // 2: the per-user daily table's first name was that of a retired
    // ClickHouse table with other columns; it is renamed, data and all.
    "ALTER TABLE rollups_user_day RENAME TO rollups_daily_by_user;
     DROP INDEX rollups_user_day_by_time;
     CREATE INDEX rollups_daily_by_user_by_time ON rollups_daily_by_user (tenant, window_start);",
];

/// The per-user daily rollups: every user's sums per UTC day (feature,
/// model and environment empty), ordered user first.
pub const DAILY_TABLE: &str = "rollups_daily_by_user";

/// Opens the database with the settings every connection needs.
fn connect(path: &Path) -> Result<Connection, EmbeddedError> {
    let conn = Connection::open(path)?;
    // WAL lets readers run beside the writer; FULL syncs the log at every
    // commit, so a 2xx survives power loss, not only a process crash.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), EmbeddedError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", n + 1)?;
        tx.commit()?;
        tracing::info!(migration = n + 1, "applied embedded schema migration");
    }
    Ok(())
}

/// One ingest request's events, waiting for the commit that makes them durable.
struct Job {
    events: Vec<Envelope>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// The embedded store: the writer's queue and a few read connections.
pub struct Embedded {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
    path: PathBuf,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded").field("path", &self.path).field("readers", &self.readers.len()).finish_non_exhaustive()
    }
}

impl Embedded {
    /// Opens (creating and migrating) the database in `dir` and starts the
    /// writer thread. Must be called inside a tokio runtime: the writer uses it
    /// for webhook notifications and timers.
    pub fn open(dir: &Path, config: &Config) -> Result<(Embedded, std::thread::JoinHandle<()>), EmbeddedError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE);
        let mut conn = connect(&path)?;
        migrate(&mut conn)?;
        let readers = (0..config.storage.read_connections).map(|_| connect(&path).map(Mutex::new)).collect::<Result<Vec<_>, _>>()?;
        let (jobs, rx) = mpsc::channel(config.server.max_in_flight_requests.max(1));
        let mut writer = Writer::new(conn, config)?;
        let runtime = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new().name("meterline-writer".into()).spawn(move || writer.run(rx, &runtime))?;
        Ok((Embedded { jobs, readers: Arc::new(readers), next_reader: AtomicUsize::new(0), path }, thread))
    }

    /// Queues `events` for the next group commit and waits for it.
    pub async fn append(&self, events: Vec<Envelope>) -> Result<(), EmbeddedError> {
        let (reply, done) = oneshot::channel();
        self.jobs.send(Job { events, reply }).await.map_err(|_| EmbeddedError::WriterStopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EmbeddedError::Commit(e)),
            Err(_) => Err(EmbeddedError::WriterStopped),
        }
    }

    /// True while the writer thread runs.
    pub fn writer_running(&self) -> bool {
        !self.jobs.is_closed()
    }

    /// Runs `f` on a read connection, off the async threads.
    pub async fn read<T, F>(&self, f: F) -> Result<T, EmbeddedError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let readers = self.readers.clone();
        let at = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
        tokio::task::spawn_blocking(move || {
            let conn = readers[at].lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| EmbeddedError::WriterStopped)?
        .map_err(EmbeddedError::from)
    }
}

/// Summed columns of a rollup row, as SQLite holds them.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    events: i64,
    input: i64,
    output: i64,
    cached: i64,
    reasoning: i64,
    cost: i64,
    revenue: i64,
    credits: i64,
    unpriced: i64,
}

impl Sums {
    fn add(&mut self, row: &EventRow) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.events += 1;
        self.input += n(row.input_tokens);
        self.output += n(row.output_tokens);
        self.cached += n(row.cached_input_tokens);
        self.reasoning += n(row.reasoning_tokens);
        self.cost += row.cost_nanos;
        self.revenue += row.revenue_nanos;
        self.credits += row.credits_nanos;
        self.unpriced += i64::from(row.cost_source == CostSource::Unpriced.as_u8());
    }
}

/// tenant, window start, user, customer, feature, model, environment, billable.
type RollupKey = (String, i64, String, String, String, String, String, u8);

/// What one commit wrote, for the metrics and alerts recorded after it.
#[derive(Debug, Default)]
struct Written {
    rows: Vec<EventRow>,
    duplicates: Vec<&'static str>,
    transitions: Vec<Transition>,
    evaluated: bool,
    eval_cost: Duration,
}

/// The single writer: group commits of ingest requests, rollups and alerts.
struct Writer {
    conn: Connection,
    catalog: Catalog,
    keys: KeyRing,
    evaluator: Evaluator,
    notifier: Notifier,
    business: BusinessLabels,
    max_commit_events: usize,
    /// Touched users are evaluated this often while events stream in.
    eval_every: Duration,
    /// Open alerts are re-evaluated this often when nothing arrives.
    reevaluate_every: Duration,
    touched: BTreeSet<(String, String)>,
    last_eval: Instant,
    /// How long the last evaluation took: evaluations are spaced at least
    /// four times that apart, so under heavy load they cost the writer at
    /// most a fifth of its time (alerts come a little later, writes keep up).
    eval_cost: Duration,
}

impl Writer {
    fn new(conn: Connection, config: &Config) -> Result<Writer, EmbeddedError> {
        let mut evaluator = Evaluator::new(config.alerts.clone());
        evaluator.load(open_alerts(&conn)?);
        Ok(Writer {
            conn,
            catalog: Catalog::builtin()?,
            keys: KeyRing::from_config(&config.tenants)?,
            notifier: Notifier::new(&config.alerts),
            evaluator,
            business: BusinessLabels::new(config.metrics.max_label_values),
            max_commit_events: config.storage.max_commit_events,
            eval_every: Duration::from_millis(config.storage.alert_eval_ms),
            reevaluate_every: Duration::from_secs(config.alerts.interval_secs.max(1)),
            touched: BTreeSet::new(),
            last_eval: Instant::now(),
            eval_cost: Duration::ZERO,
        })
    }

    /// How long until alerts are due, if ever.
    fn eval_due_in(&self) -> Option<Duration> {
        due_in(&self.evaluator, !self.touched.is_empty(), self.last_eval, self.eval_every.max(self.eval_cost * 4), self.reevaluate_every)
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Job>, runtime: &tokio::runtime::Handle) {
        loop {
            let wait = self.eval_due_in().unwrap_or(Duration::from_secs(3_600));
            let mut jobs = Vec::new();
            match runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                Ok(Some(job)) => {
                    let mut n = job.events.len();
                    jobs.push(job);
                    // Group commit: everything already waiting goes in the same transaction.
                    while n < self.max_commit_events {
                        match rx.try_recv() {
                            Ok(job) => {
                                n += job.events.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                }
                // Every sender is gone: the server has stopped.
                Ok(None) => return,
                Err(_) => {}
            }
            self.commit(jobs, runtime);
        }
    }

    fn commit(&mut self, jobs: Vec<Job>, runtime: &tokio::runtime::Handle) {
        let due = self.eval_due_in().is_some_and(|d| d.is_zero());
        if jobs.is_empty() && !due {
            return;
        }
        let started = Instant::now();
        let result = self.write(&jobs);
        match result {
            Ok(written) => {
                for job in jobs {
                    let _ = job.reply.send(Ok(()));
                }
                self.record(written, started, runtime);
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded commit failed; the requests are answered 503");
                agg_metrics::write_retry("events");
                for job in jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
            }
        }
    }

    /// One transaction: dedupe, events, rollups and (when due) alerts.
    fn write(&mut self, jobs: &[Job]) -> Result<Written, rusqlite::Error> {
        let mut out = Written::default();
        let now = Utc::now();
        let written_at = datetime_secs(now);
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut minute: HashMap<RollupKey, Sums> = HashMap::new();
        let mut day: HashMap<RollupKey, Sums> = HashMap::new();
        let mut touched = Vec::new();
        {
            let mut lookup = tx.prepare_cached("SELECT fingerprint FROM events WHERE tenant = ?1 AND idempotency_key = ?2")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (tenant, idempotency_key, fingerprint, event_time, event_time_ns, user_id, customer_id, \
                 feature, model, provider, environment, billable, input_tokens, output_tokens, cached_input_tokens, \
                 reasoning_tokens, cost_nanos, cost_source, revenue_nanos, credits_nanos, metadata, received_at, written_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            )?;
            for env in jobs.iter().flat_map(|j| &j.events) {
                let fp = fingerprint(&env.tenant, &env.event);
                let seen: Option<i64> = lookup.query_row(params![env.tenant, env.event.idempotency_key], |r| r.get(0)).optional()?;
                // SQLite integers are signed: fingerprints are stored bit for bit.
                match Decision::of(seen.map(|f| f as u64), fp) {
                    Decision::Retry => out.duplicates.push("retry"),
                    Decision::Conflict => {
                        tracing::warn!(tenant = %env.tenant, idempotency_key = %env.event.idempotency_key, "dropped a copy whose payload differs from the first");
                        out.duplicates.push("conflict");
                    }
                    Decision::New => {
                        let priced = price(&env.event, self.keys.tenant(&env.tenant), &self.catalog);
                        let row = EventRow::new(env, fp, priced, Source::Embedded, written_at);
                        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                        insert.execute(params![
                            row.tenant,
                            row.idempotency_key,
                            row.fingerprint as i64,
                            row.event_time,
                            row.event_time_ns,
                            row.user_id,
                            row.customer_id,
                            row.feature,
                            row.model,
                            row.provider,
                            row.environment,
                            row.billable,
                            n(row.input_tokens),
                            n(row.output_tokens),
                            n(row.cached_input_tokens),
                            n(row.reasoning_tokens),
                            row.cost_nanos,
                            row.cost_source,
                            row.revenue_nanos,
                            row.credits_nanos,
                            row.metadata,
                            row.received_at,
                            row.written_at,
                        ])?;
                        let t = i64::from(row.event_time);
                        let key = |w: i64, full: bool| -> RollupKey {
                            if full {
                                (row.tenant.clone(), w, row.user_id.clone(), row.customer_id.clone(), row.feature.clone(), row.model.clone(), row.environment.clone(), row.billable)
                            } else {
                                (row.tenant.clone(), w, row.user_id.clone(), row.customer_id.clone(), String::new(), String::new(), String::new(), 0)
                            }
                        };
                        minute.entry(key(window_start(t, MINUTE_SECS), true)).or_default().add(&row);
                        day.entry(key(window_start(t, DAY_SECS), false)).or_default().add(&row);
                        touched.push((row.tenant.clone(), row.user_id.clone()));
                        out.rows.push(row);
                    }
                }
            }
            for (table, sums) in [("rollups_minute", &minute), (DAILY_TABLE, &day)] {
                let mut upsert = tx.prepare_cached(&format!(
                    "INSERT INTO {table} (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
                     events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, revenue_nanos, \
                     credits_nanos, unpriced_events) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
                     ON CONFLICT DO UPDATE SET \
                     events = events + excluded.events, input_tokens = input_tokens + excluded.input_tokens, \
                     output_tokens = output_tokens + excluded.output_tokens, \
                     cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens, \
                     reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens, cost_nanos = cost_nanos + excluded.cost_nanos, \
                     revenue_nanos = revenue_nanos + excluded.revenue_nanos, credits_nanos = credits_nanos + excluded.credits_nanos, \
                     unpriced_events = unpriced_events + excluded.unpriced_events"
                ))?;
                for ((tenant, w, user, customer, feature, model, environment, billable), s) in sums {
                    upsert.execute(params![
                        tenant, w, user, customer, feature, model, environment, billable, s.events, s.input, s.output, s.cached,
                        s.reasoning, s.cost, s.revenue, s.credits, s.unpriced
                    ])?;
                }
            }
        }
        self.touched.extend(touched);
        let due = due_in(&self.evaluator, !self.touched.is_empty(), self.last_eval, self.eval_every.max(self.eval_cost * 4), self.reevaluate_every);
        if due.is_some_and(|d| d.is_zero()) {
            // Evaluated inside the transaction that wrote the events, against
            // the rollups as they will be committed: the alerts and the events
            // they cover land together.
            let started = Instant::now();
            out.transitions = evaluate(&tx, &self.evaluator, &self.touched, now.timestamp())?;
            out.eval_cost = started.elapsed();
            let mut store = tx.prepare_cached(
                "INSERT OR REPLACE INTO alerts (tenant, user_id, rule, opened_at, state, observed_nanos, threshold_nanos, \
                 window_secs, updated_at, resolved_at, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for t in &out.transitions {
                let a = &t.row;
                store.execute(params![
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
            }
            drop(store);
            out.evaluated = true;
        }
        tx.commit()?;
        Ok(out)
    }

    /// After a commit: metrics, and alert transitions (log, webhook).
    fn record(&mut self, written: Written, started: Instant, runtime: &tokio::runtime::Handle) {
        let mut per_tenant: HashMap<&str, (u64, u64)> = HashMap::new();
        self.business.record_all(&written.rows);
        for row in &written.rows {
            let e = per_tenant.entry(row.tenant.as_str()).or_default();
            e.0 += 1;
            e.1 += u64::from(row.cost_source == CostSource::Unpriced.as_u8());
        }
        for (tenant, (n, unpriced)) in per_tenant {
            agg_metrics::written(tenant, n);
            if unpriced > 0 {
                agg_metrics::unpriced(tenant, unpriced);
            }
        }
        for reason in written.duplicates {
            agg_metrics::duplicate(reason);
        }
        agg_metrics::flushed(started.elapsed().as_secs_f64(), written.rows.len());
        if written.evaluated {
            self.touched.clear();
            self.last_eval = Instant::now();
            self.eval_cost = written.eval_cost;
            // Webhook notifications are spawned on the runtime.
            let _guard = runtime.enter();
            self.notifier.applied(&mut self.evaluator, written.transitions);
        }
    }
}

/// How long until alerts are due, if ever: touched users every `every`,
/// open alerts alone every `reevery`.
fn due_in(evaluator: &Evaluator, touched: bool, last: Instant, every: Duration, reevery: Duration) -> Option<Duration> {
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
fn open_alerts(conn: &Connection) -> Result<Vec<AlertRow>, rusqlite::Error> {
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

/// The rules' sums from the rollups, exactly as the ClickHouse evaluator
/// reads them from minute rows: whole days come from the daily table and
/// only the partial first day of the week from minute rows, which is the
/// same sum for less reading.
fn evaluate(tx: &Transaction<'_>, evaluator: &Evaluator, touched: &BTreeSet<(String, String)>, now: i64) -> Result<Vec<Transition>, rusqlite::Error> {
    let mut out = Vec::new();
    let now_dt = chrono::DateTime::from_timestamp(now, 0).unwrap_or_else(Utc::now);
    let mut window_q = tx.prepare_cached("SELECT user_id, SUM(cost_nanos) FROM rollups_minute WHERE tenant = ?1 AND window_start >= ?2 GROUP BY user_id")?;
    let mut minutes_q = tx.prepare_cached(
        "SELECT COALESCE(SUM(cost_nanos), 0) FROM rollups_minute WHERE tenant = ?1 AND user_id = ?2 AND window_start >= ?3 AND window_start < ?4",
    )?;
    let mut days_q = tx.prepare_cached(
        "SELECT COALESCE(SUM(cost_nanos), 0), COALESCE(SUM(cost_nanos) - SUM(revenue_nanos), 0) FROM rollups_daily_by_user \
         WHERE tenant = ?1 AND user_id = ?2 AND window_start >= ?3",
    )?;
    for (tenant, users) in evaluator.targets(touched) {
        let periods = Periods::at(&evaluator.config().rules_for(&tenant), now_dt);
        let mut spend = Spend::default();
        let rows = window_q.query_map(params![tenant, periods.window], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (user, cost) = row?;
            spend.window.insert(user, cost);
        }
        let week_days = window_start(periods.week + DAY_SECS - 1, DAY_SECS);
        for user in &users {
            let partial: i64 = minutes_q.query_row(params![tenant, user, periods.week, week_days], |r| r.get(0))?;
            let (whole, _): (i64, i64) = days_q.query_row(params![tenant, user, week_days], |r| Ok((r.get(0)?, r.get(1)?)))?;
            spend.week.insert(user.clone(), partial + whole);
            let (_, loss): (i64, i64) = days_q.query_row(params![tenant, user, periods.month], |r| Ok((r.get(0)?, r.get(1)?)))?;
            spend.loss.insert(user.clone(), loss);
        }
        out.extend(evaluator.decide(&tenant, &users, &spend, now));
    }
    Ok(out)
}
