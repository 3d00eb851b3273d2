//! The single writer thread: it takes ingest requests and limits operations
//! off the job queue, group-commits them in queue order (dedupe, events,
//! limit counters, rollups, limits operations and, when due, alerts in one
//! transaction), answers each job after the commit, then records the metrics
//! and notifies alert transitions. Each commit's time per phase is recorded
//! (`phases`), so a slow commit names its phase. Between commits it keeps the
//! WAL under its limit (`checkpoint`).

use chrono::Utc;
use meterline_aggregator::Notifier;
use meterline_aggregator::metrics::{self as agg_metrics, BusinessLabels};
use meterline_domain::{AlertBook as Evaluator, CostSource, Decision, EventRow, Source, Transition, datetime_secs, fingerprint, price};
use meterline_limits::notify::LimitAlert;
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use rusqlite::Connection;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::alerts::{self, due_in, open_alerts};
use super::checkpoint::Checkpointer;
use super::counting::{Counting, Housekeeping};
use super::events::Events;
use super::jobs::{Job, Op, Pending};
use super::phases::{Phase, Phases};
use super::rollups::Rollups;
use crate::EmbeddedError;
use crate::config::Config;

/// What one commit wrote, for the metrics and alerts recorded after it.
#[derive(Debug, Default)]
struct Written {
    rows: Vec<EventRow>,
    duplicates: Vec<&'static str>,
    /// The first conflicting copy dropped (tenant, idempotency key): named
    /// in the one warning a commit logs for all of them.
    first_conflict: Option<(String, String)>,
    transitions: Vec<Transition>,
    /// Limit crossings stored by this commit, for the webhook.
    limit_alerts: Vec<LimitAlert>,
    evaluated: bool,
    eval_cost: Duration,
    phases: Phases,
}

/// The single writer: group commits of ingest requests, limits operations, rollups and alerts.
pub(super) struct Writer {
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
    housekeeping: Housekeeping,
    /// Deletes what is past `[retention]`, a small step between commits.
    retention: super::retention::Retention,
    /// Plans and subscriptions read so far, kept across commits.
    counting: Counting,
    /// WAL checkpoints beside the commits, and the WAL's bound between them
    /// (see `checkpoint`); stops with the writer.
    checkpointer: Checkpointer,
}

impl Writer {
    pub(super) fn new(conn: Connection, config: &Config) -> Result<Writer, EmbeddedError> {
        let checkpointer = Checkpointer::start(&conn, config.storage.wal_limit_mb.saturating_mul(1 << 20))?;
        let mut evaluator = Evaluator::new(config.alerts.clone());
        evaluator.load(open_alerts(&conn)?);
        Ok(Writer {
            conn,
            catalog: Catalog::builtin()?,
            keys: KeyRing::from_config(&config.tenants)?,
            notifier: Notifier::new(&config.alerts).with_secrets(&config.tenants),
            evaluator,
            business: BusinessLabels::new(config.metrics.max_label_values),
            max_commit_events: config.storage.max_commit_events,
            eval_every: Duration::from_millis(config.storage.alert_eval_ms),
            reevaluate_every: Duration::from_secs(config.alerts.interval_secs.max(1)),
            touched: BTreeSet::new(),
            last_eval: Instant::now(),
            eval_cost: Duration::ZERO,
            housekeeping: Housekeeping::default(),
            retention: super::retention::Retention::new(config.retention.clone()),
            counting: Counting::default(),
            checkpointer,
        })
    }

    /// How long until alerts are due, if ever.
    fn eval_due_in(&self) -> Option<Duration> {
        due_in(&self.evaluator, !self.touched.is_empty(), self.last_eval, self.eval_every.max(self.eval_cost * 4), self.reevaluate_every)
    }

    /// Commits until every sender of jobs is gone.
    pub(super) fn run(&mut self, mut rx: mpsc::Receiver<Job>, runtime: &tokio::runtime::Handle) {
        loop {
            let wait = self.eval_due_in().unwrap_or(Duration::from_secs(3_600)).min(self.retention.due_in());
            let mut jobs = Vec::new();
            match runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                Ok(Some(job)) => {
                    let mut n = job.weight();
                    jobs.push(job);
                    // Group commit: everything already waiting goes in the same transaction.
                    while n < self.max_commit_events {
                        match rx.try_recv() {
                            Ok(job) => {
                                n += job.weight();
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
            if self.retention.due_in().is_zero() {
                let started = Instant::now();
                self.retention.step(&mut self.conn);
                let mut phases = Phases::default();
                phases.add(Phase::Retention, started.elapsed());
                phases.record(0, started.elapsed());
            }
            // Between commits, the only moment the WAL can be made to restart.
            if let Some(spent) = self.checkpointer.bound(&self.conn) {
                let mut phases = Phases::default();
                phases.add(Phase::Checkpoint, spent);
                phases.record(0, spent);
            }
        }
    }

    fn commit(&mut self, jobs: Vec<Job>, runtime: &tokio::runtime::Handle) {
        let due = self.eval_due_in().is_some_and(|d| d.is_zero());
        if jobs.is_empty() && !due {
            return;
        }
        let started = Instant::now();
        let mut pending = Vec::with_capacity(jobs.len());
        let mut queue = jobs.into_iter();
        let result = self.write(&mut queue, &mut pending);
        if result.is_err() {
            // Plans read inside the rolled-back transaction may never have been.
            self.counting.forget();
        }
        // Jobs the failed commit never reached share its answer.
        pending.extend(queue.map(Pending::unreached));
        let outcome = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        if let Err(e) = &result {
            tracing::error!(error = %e, "embedded commit failed; the requests are answered 503");
            agg_metrics::write_retry("events");
        }
        for job in pending {
            job.answer(outcome.clone());
        }
        if let Ok(written) = result {
            self.record(written, started, runtime);
        }
    }

    /// One transaction: dedupe, events, limit counters, rollups, limits
    /// operations in queue order, and (when due) alerts. Every job taken off
    /// `queue` leaves its answer in `pending`.
    fn write(&mut self, queue: &mut std::vec::IntoIter<Job>, pending: &mut Vec<Pending>) -> Result<Written, rusqlite::Error> {
        let mut out = Written::default();
        let phases = &mut out.phases;
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let written_at = datetime_secs(now);
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut rollups = Rollups::default();
        let mut touched = Vec::new();
        let counting = &mut self.counting;
        {
            let mut events = Events::prepare(&tx)?;
            for job in queue.by_ref() {
                let envelopes = match job {
                    Job::Events { events, reply } => {
                        pending.push(Pending::Events(reply));
                        events
                    }
                    Job::Limits(op) => {
                        phases.time(Phase::LimitsOps, || run_op(&tx, op, pending))?;
                        // The operation may have changed plans or subscriptions.
                        counting.forget();
                        continue;
                    }
                };
                for env in &envelopes {
                    let fp = fingerprint(&env.tenant, &env.event);
                    let seen = phases.time(Phase::Dedupe, || events.seen(&env.tenant, &env.event.idempotency_key))?;
                    match Decision::of(seen, fp) {
                        Decision::Retry => out.duplicates.push("retry"),
                        Decision::Conflict => {
                            meterline_aggregator::conflict_dropped(&env.tenant, &env.event.idempotency_key);
                            out.first_conflict.get_or_insert_with(|| (env.tenant.clone(), env.event.idempotency_key.clone()));
                            out.duplicates.push("conflict");
                        }
                        Decision::New => {
                            let priced = price(&env.event, self.keys.tenant(&env.tenant), &self.catalog);
                            let row = EventRow::new(env, fp, priced, Source::Embedded, written_at);
                            phases.time(Phase::Insert, || events.insert(&row))?;
                            phases.time(Phase::Count, || counting.count(&tx, &row, now_ms, &mut out.limit_alerts))?;
                            rollups.add(&row);
                            touched.push((row.tenant.clone(), row.user_id.clone()));
                            out.rows.push(row);
                        }
                    }
                }
            }
            phases.time(Phase::Rollups, || rollups.upsert(&tx))?;
            let housekeeping = &mut self.housekeeping;
            phases.time(Phase::Housekeeping, || housekeeping.run(&tx, now_ms))?;
        }
        self.touched.extend(touched);
        let due = due_in(&self.evaluator, !self.touched.is_empty(), self.last_eval, self.eval_every.max(self.eval_cost * 4), self.reevaluate_every);
        if due.is_some_and(|d| d.is_zero()) {
            // Evaluated inside the transaction that wrote the events, against
            // the rollups as they will be committed: the alerts and the events
            // they cover land together.
            let started = Instant::now();
            out.transitions = alerts::evaluate(&tx, &self.evaluator, &self.touched, now.timestamp())?;
            out.eval_cost = started.elapsed();
            alerts::store(&tx, &out.transitions)?;
            out.evaluated = true;
            out.phases.add(Phase::Alerts, started.elapsed());
        }
        out.phases.time(Phase::Commit, || tx.commit())?;
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
        for reason in &written.duplicates {
            agg_metrics::duplicate(reason);
        }
        if let Some((tenant, idempotency_key)) = &written.first_conflict {
            let conflicts = written.duplicates.iter().filter(|r| **r == "conflict").count();
            meterline_aggregator::warn_conflicts(conflicts, tenant, idempotency_key);
        }
        agg_metrics::flushed(started.elapsed().as_secs_f64(), written.rows.len());
        written.phases.record(written.rows.len(), started.elapsed());
        if !written.limit_alerts.is_empty() {
            // Stored with the counts they crossed; the webhook is spawned on the runtime.
            let _guard = runtime.enter();
            for alert in &written.limit_alerts {
                self.notifier.limit_crossed(alert);
            }
        }
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

/// Runs a limits operation in a savepoint of the commit's transaction, its
/// answer left in `pending` whatever happens: a failed operation leaves
/// nothing behind, and the others in the group still commit.
fn run_op(tx: &Connection, op: Op, pending: &mut Vec<Pending>) -> Result<(), rusqlite::Error> {
    if let Err(e) = tx.execute_batch("SAVEPOINT limits_op") {
        pending.push(Pending::Limits(op.abandon()));
        return Err(e);
    }
    let ran = op.run(tx);
    let closed = tx.execute_batch(if ran.ok { "RELEASE limits_op" } else { "ROLLBACK TO limits_op; RELEASE limits_op" });
    pending.push(Pending::Limits(ran));
    closed
}
