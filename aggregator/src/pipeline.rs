//! The aggregator's state, shared by the run loop and the revoke callback: assignments applied and loaded (repair, dedupe rebuild, seek: `pipeline/load.rs`), flushes decided and handed to the writer (`writes.rs`), finished writes committed and counted, alerts evaluated.
//!
//! Keying (`kafka.keying = "key"`, the default; `keying.rs`): a flush counts
//! a record only on its key's home partition and forwards any other there
//! first, acked before the flush writes anything, so before any progress
//! past it is recorded.

use chrono::Utc;
use meterline_clickhouse::Store;
use meterline_schemas::wire::Keying;
use meterline_domain::{CostSource, EventRow, datetime_secs};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::AggregatorError;
use crate::config::Config;
use crate::decide::{Flush, Inputs, Placement, decide};
use crate::dedupe::Known;
use crate::evaluations::Evaluations;
use crate::keying::KeyingState;
use crate::flush::Pending;
use crate::limits::LimitsApplier;
use crate::metrics;
use crate::partitions::{Change, Partitions};
use crate::writes::{Attempt, Writes};

mod load;

/// The aggregator's state: buffers, dedupe, the decided flushes not yet
/// durable. Shared by the consumer loop and the revoke callback, which lock
/// it in turn (never during a poll); a running write holds none of it.
pub struct Pipeline {
    pub(crate) config: Config,
    store: Store,
    topic: String,
    catalog: Catalog,
    tenants: KeyRing,
    changes: Arc<Mutex<Vec<Change>>>,
    partitions: Partitions,
    writes: Writes,
    /// Whether writes run beside the loop (a multi-threaded runtime) or are
    /// waited for where they start (one thread: nothing to overlap with, and
    /// a revoke callback could not wait for a write it cannot drive).
    overlap: bool,
    backoff: Duration,
    next_attempt: Instant,
    next_load: Instant,
    business: metrics::BusinessLabels,
    /// Updated once per record: registered once, not looked up each time.
    per_record: metrics::PerRecord,
    /// Runaway evaluations, in a task beside the loop (`evaluations.rs`).
    alerts: Evaluations,
    /// Counts written events toward limits, when limits are configured.
    limits: Option<LimitsApplier>,
    /// The `key` keying's state; `None` under the `user` keying (count in place).
    keying: Option<KeyingState>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("topic", &self.topic).field("partitions", &self.partitions.len()).finish()
    }
}

impl Pipeline {
    /// The state of a consumer of `config.kafka.topic`, acting on the
    /// assignments its rebalance callbacks record in `changes`.
    pub(crate) async fn new(config: Config, store: Store, changes: Arc<Mutex<Vec<Change>>>) -> Result<Pipeline, AggregatorError> {
        let now = Instant::now();
        let limits = match &config.limits.redis_url {
            Some(url) => Some(LimitsApplier::new(
                meterline_redis::RedisLimits::connect(url).await?,
                &config.kafka.topic,
                crate::alerts::Notifier::new(&config.alerts).with_secrets(&config.tenants),
            )),
            None => None,
        };
        let keying = match config.kafka.keying {
            Keying::Key => Some(KeyingState::new(&config.kafka)?),
            Keying::User => None,
        };
        Ok(Pipeline {
            limits,
            keying,
            topic: config.kafka.topic.clone(),
            catalog: Catalog::builtin()?,
            tenants: KeyRing::from_config(&config.tenants)?,
            alerts: Evaluations::start(
                crate::alerts::Evaluator::new(config.alerts.clone(), &config.tenants),
                store.clone(),
                Duration::from_secs(config.alerts.interval_secs),
            ),
            store,
            changes,
            partitions: Partitions::default(),
            writes: Writes::default(),
            overlap: tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread),
            backoff: Duration::from_millis(100),
            next_attempt: now,
            next_load: now,
            business: metrics::BusinessLabels::new(config.metrics.max_label_values),
            per_record: metrics::PerRecord::new(),
            config,
        })
    }

    /// Writes the decided flushes and the buffered records (of `only` these
    /// partitions, or all) until none are left or the deadline passes,
    /// retrying failed writes with backoff. A write already running is
    /// waited for whatever the deadline (see `Writes::wait`), and none is
    /// left running on return.
    pub(crate) async fn flush_until_empty<X: ConsumerContext + 'static, C: Consumer<X>>(
        &mut self,
        consumer: &C,
        only: Option<&[i32]>,
        deadline: Instant,
    ) {
        self.wait_write(consumer).await;
        while (!self.writes.is_empty() || self.partitions.buffered_in(only) > 0) && Instant::now() < deadline {
            self.next_attempt = self.next_attempt.min(Instant::now());
            self.flush_some(consumer, only, true).await;
            self.wait_write(consumer).await;
            if self.writes.failing() {
                tokio::time::sleep(self.backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
        if !self.writes.is_empty() || self.partitions.buffered_in(only) > 0 {
            tracing::warn!(buffered = self.partitions.buffered_in(only), flushes = self.writes.len(), "flush deadline ran out; unwritten events will be re-read by the next owner");
        }
    }

    /// Forgets revoked partitions: their state, and their part of the queued
    /// flushes (none is being written: the revoke waited for it).
    pub(crate) fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.revoke(*p);
            if let Some(limits) = self.limits.as_mut() {
                limits.revoked(*p);
            }
            self.writes.strip(*p);
            tracing::info!(partition = p, "partition revoked");
        }
        metrics::partitions(self.partitions.len());
    }

    /// Woken when a write attempt ends (`Runner::run` waits on it with the consumer).
    pub(crate) fn write_done(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.writes.done()
    }

    pub(crate) fn buffered(&self) -> usize {
        self.partitions.buffered()
    }

    /// Keeps one record from the topic in its partition's buffer.
    pub(crate) fn take<M: Message>(&mut self, m: &M) {
        if m.topic() != self.topic {
            return;
        }
        if self.partitions.take(m.partition(), m.offset(), m.key(), m.payload()) {
            self.per_record.taken(self.partitions.buffered());
        }
    }

    /// Pauses fetching while a write is failing or the buffer is full, and
    /// while the queue of decided flushes is full once a whole batch waits
    /// behind it, so memory stays bounded; the loop keeps polling to stay in
    /// the group. A full queue alone does not pause: librdkafka drops what
    /// it prefetched for a paused partition and fetches it again on resume,
    /// and the batch the next decision needs would then arrive only after
    /// the write it waits for has ended (`bench/PROFILE.md`).
    pub(crate) fn apply_backpressure<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        let hold = self.writes.failing() || self.buffered() >= self.config.flush.max_buffered_events || (self.writes.full() && self.batch_waits());
        for (p, want) in self.partitions.pause_changes(hold) {
            let mut list = TopicPartitionList::new();
            list.add_partition(&self.topic, p);
            let result = if want { consumer.pause(&list) } else { consumer.resume(&list) };
            match result {
                Ok(()) => self.partitions.set_paused(p, want),
                Err(e) => tracing::warn!(error = %e, partition = p, "cannot change pause state"),
            }
        }
    }

    /// Applies recorded assignments and loads any partition not yet ready.
    pub(crate) async fn apply_changes<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        self.apply_recorded();
        if Instant::now() < self.next_load {
            return;
        }
        for p in self.partitions.loading() {
            if let Err(e) = self.load(consumer, p).await {
                tracing::warn!(error = %e, partition = p, "cannot load partition state; retrying");
                self.next_load = Instant::now() + Duration::from_secs(1);
                return;
            }
        }
    }

    /// Applies assignments recorded by the rebalance callback.
    pub(crate) fn apply_recorded(&mut self) {
        let changes = std::mem::take(&mut *self.changes.lock().unwrap_or_else(|p| p.into_inner()));
        // Called once per record: the gauge only when something changed.
        if changes.is_empty() {
            return;
        }
        for change in changes {
            match change {
                Change::Assign(ps) => {
                    for p in ps {
                        self.partitions.assign(p, &self.config.dedupe);
                        tracing::info!(partition = p, "partition assigned");
                    }
                }
            }
        }
        metrics::partitions(self.partitions.len());
    }

    /// Decides what is buffered (when the queue has room) and starts the
    /// next write, or retries a failed one when its backoff is over.
    pub(crate) async fn flush<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        self.flush_some(consumer, None, true).await;
        if self.writes.is_empty()
            && let Some(limits) = self.limits.as_mut()
        {
            limits.catch_up(&self.store).await;
        }
    }

    /// Waits (until `deadline`) for the runaway evaluations of every
    /// flush written so far: on shutdown, after the last flush.
    pub(crate) async fn drain_evaluations(&self, deadline: Instant) {
        self.alerts.drain(deadline).await;
    }

    /// Finishes a write that ended and starts the next one, deciding more
    /// only if a whole batch waits: otherwise new flushes are decided on the
    /// flush interval or a full batch, so that batches stay large.
    pub(crate) async fn written<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        let decide = self.batch_waits();
        self.flush_some(consumer, None, decide).await;
    }

    /// A whole batch (`flush.max_batch_events`) is buffered: enough to decide a flush now.
    pub(crate) fn batch_waits(&self) -> bool {
        self.buffered() >= self.config.flush.max_batch_events
    }

    /// Finishes a write that ended, decides one more flush if `decide` and
    /// the queue has room, and starts the next write if none is running.
    async fn flush_some<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C, only: Option<&[i32]>, decide: bool) {
        if let Some(attempt) = self.writes.finished() {
            self.completed(consumer, attempt).await;
        }
        if decide && !self.writes.full() {
            match self.decide(only).await {
                Ok(Some(pending)) => self.writes.push(pending),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check keys in ClickHouse; will retry");
                    metrics::write_retry("lookup");
                    self.fail();
                }
            }
        }
        if self.start_write().await && !self.overlap {
            self.wait_write(consumer).await;
        }
    }

    fn fail(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(self.config.flush.max_backoff_ms));
    }

    /// Takes up to one batch from the buffers and decides every record
    /// (`decide.rs`). Nothing is taken from the buffers unless the exact
    /// look-up the decision needs succeeds.
    async fn decide(&mut self, only: Option<&[i32]>) -> Result<Option<Pending>, AggregatorError> {
        let quota = self.partitions.quota(only, self.config.flush.max_batch_events);
        if quota.is_empty() {
            return Ok(None);
        }
        // Keys a bloom filter may hold need an exact answer from ClickHouse;
        // during the keying upgrade's transition, so does every key not seen here.
        let transition = self.keying.as_mut().is_some_and(|k| k.lookup_unseen(now_secs()));
        self.partitions.check(&quota);
        let maybe = if transition { self.partitions.unseen_keys(&quota) } else { self.partitions.maybe_keys(&quota) };
        let found = if maybe.is_empty() { HashMap::new() } else { self.store.lookup(&maybe).await? };
        let looked_up = maybe.len() as u64;
        if transition {
            metrics::transition_lookups(looked_up);
        }

        let started = Instant::now();
        let written_at = now_secs();
        let batches = self.partitions.drain(&quota);
        let placement = self.keying.as_ref().map_or(Placement::InPlace, KeyingState::placement);
        let inputs = Inputs { topic: &self.topic, written_at, tenants: &self.tenants, catalog: &self.catalog, found: &found, placement };
        let (partitions, writes) = (&self.partitions, &self.writes);
        // A key of a flush not yet durable is seen, whatever the dedupe state
        // answers: ClickHouse cannot confirm it yet (`writes.rs`).
        let decided = decide(&inputs, batches, |p, d| {
            writes.known(p, d.hash).map_or_else(|| d.known.unwrap_or_else(|| partitions.known(p, d.hash)), Known::Seen)
        });

        metrics::duplicates("retry", decided.retries);
        metrics::duplicates("conflict", decided.conflicts.len() as u64);
        for (tenant, idempotency_key) in &decided.conflicts {
            conflict_dropped(tenant, idempotency_key);
        }
        if let Some((tenant, idempotency_key)) = decided.conflicts.first() {
            warn_conflicts(decided.conflicts.len(), tenant, idempotency_key);
        }
        let now = i64::from(written_at);
        for p in quota.keys() {
            let Some(state) = self.partitions.get_mut(*p) else { continue };
            for (h, fp) in decided.new_keys.get(p).into_iter().flatten() {
                state.dedupe.insert(*h, *fp, now, now);
            }
            metrics::dedupe_state(*p, state.dedupe.fill_ratio(), state.dedupe.approx_bytes());
        }
        metrics::exact_lookups(looked_up, decided.false_positives);
        metrics::buffered(self.buffered());
        Ok(Some(Pending::new(decided.flush, decided.new_keys, started)))
    }

    /// Starts writing the next decided flush (`flush.rs`, in a task of its
    /// own: `writes.rs`) if no write is running and any backoff is over;
    /// whether it did.
    async fn start_write(&mut self) -> bool {
        if !self.writes.can_start() || (self.writes.failing() && Instant::now() < self.next_attempt) {
            return false;
        }
        let Some(mut pending) = self.writes.next() else { return false };
        // Forwards first: the writes below record progress past their offsets.
        if let Some(keying) = &self.keying
            && let Err(e) = keying.forward(&mut pending.flush).await
        {
            tracing::warn!(error = %e, "cannot forward records to their home partitions; holding offsets and retrying");
            metrics::write_retry("forward");
            self.writes.retry(pending);
            self.fail();
            return false;
        }
        self.writes.start(pending, self.store.clone(), self.topic.clone());
        true
    }

    /// Waits for the running write, if any, and finishes it.
    async fn wait_write<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        if let Some(attempt) = self.writes.wait().await {
            self.completed(consumer, attempt).await;
        }
    }

    /// After a write attempt: a failed flush goes back to the front of the
    /// queue (consumption paused) and is retried after a backoff; a durable
    /// one is committed and counted.
    async fn completed<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C, attempt: Attempt) {
        let Attempt { pending, result } = attempt;
        if let Err(failed) = result {
            let table = failed.stage.table();
            if failed.permanent {
                tracing::error!(error = %failed.error, table, "ClickHouse refused a write that cannot be skipped; holding offsets and retrying");
            } else {
                tracing::warn!(error = %failed.error, table, "ClickHouse write failed; holding offsets and retrying");
            }
            metrics::write_retry(table);
            self.writes.retry(pending);
            self.fail();
            return;
        }
        self.writes.written(&pending);
        // The next flush is written while this one's bookkeeping (snapshot,
        // commit, limits, alerts) runs: it depends on nothing below.
        if self.overlap {
            self.start_write().await;
        }
        // Records ClickHouse refused as events went to dead_letters: they
        // are not in `events`, so the dedupe state must not hold them either.
        for (p, keys) in pending.diverted_keys() {
            if let Some(state) = self.partitions.get_mut(*p) {
                keys.iter().for_each(|k| state.dedupe.forget(*k));
            }
        }
        // Every stage is durable now: what a snapshot may claim (`snapshot.rs`).
        crate::snapshot::after_flush(&self.store, &self.topic, &self.config.dedupe, &mut self.partitions, &pending.flush.commits, Utc::now().timestamp()).await;
        let flush = &pending.flush;
        self.commit(consumer, flush);
        if let Some(limits) = self.limits.as_mut() {
            limits.flushed(&self.store, flush).await;
        }
        self.business.record_all(flush.events.values().flatten());
        let mut per_tenant: HashMap<&str, (u64, u64)> = HashMap::new();
        for row in flush.events.values().flatten() {
            let entry = per_tenant.entry(&row.tenant).or_default();
            entry.0 += 1;
            entry.1 += u64::from(row.cost_source == CostSource::Unpriced.as_u8());
        }
        for (tenant, (written, unpriced)) in per_tenant {
            metrics::written(tenant, written);
            if unpriced > 0 {
                metrics::unpriced(tenant, unpriced);
            }
        }
        metrics::flushed(pending.started.elapsed().as_secs_f64(), flush.events.values().map(Vec::len).sum());
        self.backoff = Duration::from_millis(100);
        // Distinct users first: a flush holds many rows per user, and only the users are copied.
        let users: HashSet<(&str, &str)> =
            flush.events.values().flatten().map(|r: &EventRow| (r.tenant.as_str(), r.user_id.as_str())).collect();
        self.alerts.touched(users.into_iter().map(|(t, u)| (t.to_owned(), u.to_owned())));
    }

    /// Commits the flush's offsets to Kafka. Best effort: ClickHouse is the
    /// record of progress, and a lost commit only means a partition's next
    /// owner starts from ClickHouse's position instead.
    fn commit<X: ConsumerContext + 'static, C: Consumer<X>>(&self, consumer: &C, flush: &Flush) {
        if flush.commits.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (p, next) in &flush.commits {
            if list.add_partition_offset(&self.topic, *p, Offset::Offset(*next)).is_err() {
                return;
            }
        }
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit failed; ClickHouse still holds the progress");
        }
    }
}

pub(crate) fn now_secs() -> u32 {
    datetime_secs(Utc::now())
}

/// One conflicting copy dropped, at debug level: the warning is per flush
/// ([`warn_conflicts`]).
pub fn conflict_dropped(tenant: &str, idempotency_key: &str) {
    tracing::debug!(%tenant, %idempotency_key, "dropped a copy whose payload differs from the first");
}

/// One warning per flush (or embedded commit) for the conflicting copies it
/// dropped, naming the first: a client reusing keys would otherwise write a
/// log line per event. Both modes log through here.
pub fn warn_conflicts(conflicts: usize, tenant: &str, idempotency_key: &str) {
    tracing::warn!(conflicts, %tenant, %idempotency_key, "dropped copies whose payload differs from the first copy of their key (the first of them named)");
}
