//! The aggregator's state, shared by the run loop and the revoke callback: assignments applied and loaded (repair, dedupe rebuild, seek), flushes decided and driven, offsets committed, alerts evaluated.
//!
//! Keying (`kafka.keying = "key"`, the default; `keying.rs`): a flush counts
//! a record only on its key's home partition and forwards any other there
//! first, acked before the flush writes anything, so before any progress
//! past it is recorded.

use chrono::Utc;
use meterline_clickhouse::{Range, Rollup, Store};
use meterline_schemas::wire::Keying;
use meterline_domain::{CostSource, EventRow, datetime_secs};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::AggregatorError;
use crate::config::Config;
use crate::decide::{Flush, Inputs, Placement, decide};
use crate::keying::KeyingState;
use crate::flush::Pending;
use crate::limits::LimitsApplier;
use crate::metrics;
use crate::partitions::{Change, Partitions};

/// The aggregator's state: buffers, dedupe, the pending flush. Shared by the
/// consumer loop and the revoke callback, which lock it in turn (never during a poll).
pub struct Pipeline {
    pub(crate) config: Config,
    store: Store,
    topic: String,
    catalog: Catalog,
    tenants: KeyRing,
    changes: Arc<Mutex<Vec<Change>>>,
    partitions: Partitions,
    pending: Option<Pending>,
    backoff: Duration,
    next_attempt: Instant,
    next_load: Instant,
    business: metrics::BusinessLabels,
    alerts: crate::alerts::Evaluator,
    last_evaluation: Instant,
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
            store,
            changes,
            partitions: Partitions::default(),
            pending: None,
            backoff: Duration::from_millis(100),
            next_attempt: now,
            next_load: now,
            business: metrics::BusinessLabels::new(config.metrics.max_label_values),
            alerts: crate::alerts::Evaluator::new(config.alerts.clone(), &config.tenants),
            last_evaluation: now,
            config,
        })
    }

    /// Writes buffered records (of `only` these partitions, or all) until none
    /// are left or the deadline passes, retrying failed writes with backoff.
    pub(crate) async fn flush_until_empty<X: ConsumerContext + 'static, C: Consumer<X>>(
        &mut self,
        consumer: &C,
        only: Option<&[i32]>,
        deadline: Instant,
    ) {
        while (self.pending.is_some() || self.partitions.buffered_in(only) > 0) && Instant::now() < deadline {
            self.next_attempt = self.next_attempt.min(Instant::now());
            self.flush_some(consumer, only).await;
            if self.pending.is_some() {
                tokio::time::sleep(self.backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
        if self.pending.is_some() || self.partitions.buffered_in(only) > 0 {
            tracing::warn!(buffered = self.partitions.buffered_in(only), "flush deadline ran out; unwritten events will be re-read by the next owner");
        }
    }

    /// Forgets revoked partitions: their state, and their part of a pending flush.
    pub(crate) fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.revoke(*p);
            if let Some(limits) = self.limits.as_mut() {
                limits.revoked(*p);
            }
            if let Some(pending) = self.pending.as_mut() {
                pending.strip(*p);
            }
            tracing::info!(partition = p, "partition revoked");
        }
        metrics::partitions(self.partitions.len());
    }

    pub(crate) fn buffered(&self) -> usize {
        self.partitions.buffered()
    }

    /// Keeps one record from the topic in its partition's buffer.
    pub(crate) fn take(&mut self, m: &OwnedMessage) {
        if m.topic() != self.topic {
            return;
        }
        if self.partitions.take(m.partition(), m.offset(), m.key(), m.payload()) {
            metrics::consumed(1);
            metrics::buffered(self.buffered());
        }
    }

    /// Pauses fetching while a write is failing or the buffer is full, so
    /// memory stays bounded; the loop keeps polling to stay in the group.
    pub(crate) fn apply_backpressure<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        let hold = self.pending.is_some() || self.buffered() >= self.config.flush.max_buffered_events;
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

    /// Makes a newly assigned partition ready: repairs rollups a crash left
    /// behind, rebuilds its dedupe state, and positions the consumer after
    /// the last record ClickHouse holds (or the group's commit, if later).
    async fn load<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C, partition: i32) -> Result<(), AggregatorError> {
        let started = Instant::now();
        let topic = self.topic.clone();
        if let Some(keying) = self.keying.as_mut() {
            keying.load(consumer, &self.store, &topic, self.config.dedupe.window_secs, now_secs()).await?;
        }
        let mut written_next: Option<i64> = None;
        for rollup in Rollup::ALL {
            let progress = self.store.progress(rollup, &topic, partition).await?;
            written_next = written_next.max(progress.rollup_offset.map(|o| o + 1));
            if let Some(last) = self.store.orphans(&topic, partition, progress).await? {
                // The crash came between a flush's events insert and this
                // rollup's insert (or cut the events insert short); or the
                // table is new and backfills. Roll those events up, with
                // their marker, before consuming after them.
                // In chunks of at most a flush's worth of offsets, each with
                // its marker: a backfill of a new table can cover the whole
                // history, and one INSERT stays atomic only while it is one
                // block (see `max_batch_events`). A crash between chunks
                // resumes after the last chunk's marker.
                let first = progress.rollup_offset.unwrap_or(-1);
                let chunk = i64::try_from(self.config.flush.max_batch_events).unwrap_or(i64::MAX);
                let mut after = first;
                while after < last {
                    let up_to = last.min(after.saturating_add(chunk));
                    let range = Range { partition, after, up_to };
                    self.store.roll_up(rollup, &topic, &[range], now_secs(), progress.repair_since()).await?;
                    after = up_to;
                }
                metrics::repaired();
                tracing::warn!(partition, table = rollup.table(), after = first, up_to = last, "rolled up events a crash left without rollups");
                written_next = written_next.max(Some(last + 1));
            }
        }
        if let Some(limits) = self.limits.as_mut() {
            limits.assigned(partition, written_next.map(|next| next - 1));
        }
        let loaded = crate::snapshot::rebuild(&self.store, &self.config.dedupe, &topic, partition, Utc::now().timestamp()).await?;
        let (keys, source, snapshot) = (loaded.keys_read, loaded.source, loaded.snapshot());

        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, partition);
        // A blocking broker round trip; keep it off the other tasks' threads.
        let committed = tokio::task::block_in_place(|| consumer.committed_offsets(list, Duration::from_secs(10)))?;
        let committed = committed.find_partition(&topic, partition).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        let start = match (written_next, committed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let offset = start.map_or(Offset::Beginning, Offset::Offset);
        consumer.seek(&topic, partition, offset, Duration::from_secs(10))?;
        if let Some(state) = self.partitions.ready(partition, start.unwrap_or(0), loaded.dedupe, snapshot) {
            metrics::dedupe_state(partition, state.dedupe.fill_ratio(), state.dedupe.approx_bytes());
        }
        tracing::info!(partition, ?start, keys, ?source, ms = started.elapsed().as_millis() as u64, "partition ready");
        Ok(())
    }

    /// Writes what is buffered, or retries the pending flush when its backoff is over.
    pub(crate) async fn flush<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        self.flush_some(consumer, None).await;
        // Open alerts resolve when their user calms down, even with no traffic.
        let idle = Duration::from_secs(self.config.alerts.interval_secs);
        if self.pending.is_none() && self.alerts.has_open() && self.last_evaluation.elapsed() >= idle {
            self.evaluate_alerts(&Default::default()).await;
        }
        if self.pending.is_none()
            && let Some(limits) = self.limits.as_mut()
        {
            limits.catch_up(&self.store).await;
        }
    }

    /// Runs the runaway rules; a failure is logged and retried next time,
    /// never allowed to hold up the pipeline.
    async fn evaluate_alerts(&mut self, touched: &BTreeSet<(String, String)>) {
        if !self.alerts.enabled() {
            return;
        }
        self.last_evaluation = Instant::now();
        if let Err(e) = self.alerts.evaluate(&self.store, touched).await {
            tracing::warn!(error = %e, "runaway evaluation failed; it runs again after the next flush");
        }
    }

    async fn flush_some<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C, only: Option<&[i32]>) {
        if self.pending.is_none() {
            match self.decide(only).await {
                Ok(Some(pending)) => self.pending = Some(pending),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check keys in ClickHouse; will retry");
                    metrics::write_retry("lookup");
                    self.fail();
                    return;
                }
            }
        } else if Instant::now() < self.next_attempt {
            return;
        }
        self.write(consumer).await;
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
        let partitions = &self.partitions;
        let decided = decide(&inputs, batches, |p, h| partitions.known(p, h));

        metrics::duplicates("retry", decided.retries);
        metrics::duplicates("conflict", decided.conflicts.len() as u64);
        for (tenant, idempotency_key) in &decided.conflicts {
            tracing::warn!(%tenant, %idempotency_key, "dropped a copy whose payload differs from the first");
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
        Ok(Some(Pending::new(decided.flush, started)))
    }

    /// Moves the pending flush forward (`flush.rs`); on failure it stays
    /// pending (consumption paused) and is retried after a backoff.
    async fn write<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C) {
        let Some(mut pending) = self.pending.take() else { return };
        // Forwards first: the writes below record progress past their offsets.
        if let Some(keying) = &self.keying
            && let Err(e) = keying.forward(&mut pending.flush).await
        {
            tracing::warn!(error = %e, "cannot forward records to their home partitions; holding offsets and retrying");
            metrics::write_retry("forward");
            self.pending = Some(pending);
            self.fail();
            return;
        }
        if let Err(failed) = pending.advance(&self.store, &self.topic).await {
            let table = failed.stage.table();
            if failed.permanent {
                tracing::error!(error = %failed.error, table, "ClickHouse refused a write that cannot be skipped; holding offsets and retrying");
            } else {
                tracing::warn!(error = %failed.error, table, "ClickHouse write failed; holding offsets and retrying");
            }
            metrics::write_retry(table);
            self.pending = Some(pending);
            self.fail();
            return;
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
        let touched: BTreeSet<(String, String)> = users.into_iter().map(|(t, u)| (t.to_owned(), u.to_owned())).collect();
        self.evaluate_alerts(&touched).await;
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

fn now_secs() -> u32 {
    datetime_secs(Utc::now())
}
