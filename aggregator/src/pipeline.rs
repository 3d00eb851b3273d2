//! The consumer loop: per-partition buffers, flushes, and the protocol that
//! gives an exactly-once effect without Kafka transactions (see the crate docs).

use chrono::Utc;
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use meterline_schemas::wire::{self, Envelope};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::AggregatorError;
use crate::config::Config;
use crate::dedupe::{Known, PartitionDedupe};
use crate::metrics;
use meterline_domain::{Decision, EventRow, Source, datetime_secs, fingerprint, key_hash, price};
use meterline_clickhouse::Rollup;
use meterline_clickhouse::{DeadLetterRow, Range, Store};

/// A partition's assignment change, recorded by the rebalance callbacks and
/// acted on by the loop between polls.
#[derive(Debug)]
enum Change {
    Assign(Vec<i32>),
}

/// The consumer's context: records assignments, flushes on revoke, reports lag.
pub struct Ctx {
    topic: String,
    changes: Arc<Mutex<Vec<Change>>>,
    state: Arc<tokio::sync::Mutex<Pipeline>>,
    revoke_timeout: Duration,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (id, p) in &topic.partitions {
                if *id >= 0 && p.consumer_lag >= 0 {
                    metrics::lag(*id, p.consumer_lag);
                }
            }
        }
    }
}

impl Ctx {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
    fn record(&self, change: Change) {
        self.changes.lock().unwrap_or_else(|p| p.into_inner()).push(change);
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let partitions = self.partitions(list);
        // This runs inside a poll, and flushes run between polls, so no write is
        // in flight. Write the revoked partitions' buffers and commit before
        // letting go, within the deadline; what does not make it is dropped and
        // re-read by the next owner from ClickHouse's record, so the deadline
        // costs re-reading, never correctness.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let state = self.state.clone();
        let deadline = Instant::now() + self.revoke_timeout;
        let work = async move {
            let mut p = state.lock().await;
            p.apply_recorded();
            if multi_thread {
                p.flush_until_empty(consumer, Some(&partitions), deadline).await;
            }
            p.revoke(&partitions);
        };
        if multi_thread {
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(work));
        } else {
            // No runtime to write with (or one that cannot block): revoke
            // without flushing, which is safe for the reason above.
            futures::executor::block_on(work);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // Hold new partitions until their progress and dedupe state are
            // loaded from ClickHouse and the consumer is positioned there.
            if let Err(e) = consumer.pause(list) {
                tracing::warn!(error = %e, "cannot pause newly assigned partitions");
            }
            self.record(Change::Assign(self.partitions(list)));
        }
    }
}

type Consumer_ = StreamConsumer<Ctx>;

/// A record taken off the topic, waiting for the next flush.
struct Buffered {
    offset: i64,
    key: Vec<u8>,
    decoded: Result<Envelope, (String, Vec<u8>)>,
}

struct PartitionState {
    ready: bool,
    paused: bool,
    /// Records below this offset were already taken; refetches are ignored.
    next_offset: i64,
    buffer: Vec<Buffered>,
    dedupe: PartitionDedupe,
}

/// Which write of a flush comes next. A flush moves strictly forward, so a
/// failed write is retried without redoing the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    DeadLetters,
    Events,
    /// One rollup table's insert, in the order of `Rollup::ALL`.
    Rollup(Rollup),
    Commit,
}

/// A decided flush being written.
struct Pending {
    stage: Stage,
    started: Instant,
    dead_letters: BTreeMap<i32, Vec<DeadLetterRow>>,
    events: BTreeMap<i32, Vec<EventRow>>,
    /// Per partition, the offsets whose events this flush rolls up.
    ranges: BTreeMap<i32, Range>,
    written_at: u32,
    /// Whether an insert of the current stage was sent before: if so, it may
    /// have landed (a timeout) or landed in part (a cut-short body), and the
    /// retry first asks ClickHouse what is there.
    attempted: bool,
    /// Next offset to commit, per partition.
    commits: BTreeMap<i32, i64>,
}

impl Pending {
    /// Forgets a revoked partition's part of the flush. If its events were
    /// written but not its rollups, the next owner rebuilds them from the
    /// events (the repair on assignment).
    fn strip(&mut self, partition: i32) {
        self.dead_letters.remove(&partition);
        self.events.remove(&partition);
        self.ranges.remove(&partition);
        self.commits.remove(&partition);
    }
}

/// The aggregator's state: buffers, dedupe, the pending flush. Shared by the
/// consumer loop and the revoke callback, which lock it in turn (never during a poll).
pub struct Pipeline {
    config: Config,
    store: Store,
    topic: String,
    catalog: Catalog,
    tenants: KeyRing,
    changes: Arc<Mutex<Vec<Change>>>,
    partitions: BTreeMap<i32, PartitionState>,
    pending: Option<Pending>,
    backoff: Duration,
    next_attempt: Instant,
    next_load: Instant,
    business: metrics::BusinessLabels,
    alerts: crate::alerts::Evaluator,
    last_evaluation: Instant,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("topic", &self.topic).field("partitions", &self.partitions.len()).finish()
    }
}

enum Step {
    Stop,
    Housekeeping,
    Record(Result<OwnedMessage, rdkafka::error::KafkaError>),
    Tick,
}

/// The consumer and the state it feeds.
pub struct Runner {
    consumer: Arc<Consumer_>,
    state: Arc<tokio::sync::Mutex<Pipeline>>,
    topic: String,
    flush_interval: Duration,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Runner {
    pub fn new(config: Config, store: Store) -> Result<Runner, AggregatorError> {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let now = Instant::now();
        let state = Arc::new(tokio::sync::Mutex::new(Pipeline {
            topic: config.kafka.topic.clone(),
            catalog: Catalog::builtin()?,
            tenants: KeyRing::from_config(&config.tenants)?,
            store,
            changes: changes.clone(),
            partitions: BTreeMap::new(),
            pending: None,
            backoff: Duration::from_millis(100),
            next_attempt: now,
            next_load: now,
            business: metrics::BusinessLabels::new(config.metrics.max_label_values),
            alerts: crate::alerts::Evaluator::new(config.alerts.clone()),
            last_evaluation: now,
            config: config.clone(),
        }));
        let ctx = Ctx {
            topic: config.kafka.topic.clone(),
            changes,
            state: state.clone(),
            revoke_timeout: Duration::from_millis(config.flush.revoke_timeout_ms),
        };
        let session = config.kafka.session_timeout_ms;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("group.id", &config.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 4).max(100).to_string())
            .set("statistics.interval.ms", "5000")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &config.kafka.options {
            client.set(k, v);
        }
        let consumer: Consumer_ = client.create_with_context(ctx)?;
        Ok(Runner {
            consumer: Arc::new(consumer),
            state,
            topic: config.kafka.topic.clone(),
            flush_interval: Duration::from_millis(config.flush.interval_ms),
        })
    }

    /// Consumes until `shutdown`, then writes what is buffered and commits,
    /// within the configured grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AggregatorError> {
        self.consumer.subscribe(&[&self.topic])?;
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The stream does not wake for rebalance events alone, so the loop
        // comes round at least this often to serve them.
        let mut housekeeping = tokio::time::interval(Duration::from_millis(100));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let consumer = &*self.consumer;
        loop {
            {
                let mut p = self.state.lock().await;
                p.apply_changes(consumer).await;
                p.apply_backpressure(consumer);
            }
            // The lock is not held while polling: the revoke callback runs
            // inside the poll and takes it.
            let step = tokio::select! {
                biased;
                _ = &mut shutdown => Step::Stop,
                _ = tick.tick() => Step::Tick,
                m = consumer.recv() => Step::Record(m.map(|m| m.detach())),
                _ = housekeeping.tick() => Step::Housekeeping,
            };
            let mut p = self.state.lock().await;
            match step {
                Step::Stop => break,
                Step::Housekeeping => {}
                Step::Tick => p.flush(consumer).await,
                Step::Record(Ok(m)) => {
                    // An assignment seen in this poll is applied before the record is kept.
                    p.apply_recorded();
                    p.take(m);
                    if p.buffered() >= p.config.flush.max_batch_events {
                        p.flush(consumer).await;
                    }
                }
                Step::Record(Err(e)) => {
                    drop(p);
                    tracing::warn!(error = %e, "consumer error");
                    // The broker is down or restarting: no busy loop.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let mut p = self.state.lock().await;
        let deadline = Instant::now() + Duration::from_secs(p.config.server.shutdown_grace_secs);
        p.apply_changes(consumer).await;
        p.flush_until_empty(consumer, None, deadline).await;
        drop(p);
        let c = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await;
        Ok(())
    }
}

impl Pipeline {
    /// Writes buffered records (of `only` these partitions, or all) until none
    /// are left or the deadline passes, retrying failed writes with backoff.
    async fn flush_until_empty<C: Consumer<Ctx>>(&mut self, consumer: &C, only: Option<&[i32]>, deadline: Instant) {
        while (self.pending.is_some() || self.buffered_in(only) > 0) && Instant::now() < deadline {
            self.next_attempt = self.next_attempt.min(Instant::now());
            self.flush_some(consumer, only).await;
            if self.pending.is_some() {
                tokio::time::sleep(self.backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
        if self.pending.is_some() || self.buffered_in(only) > 0 {
            tracing::warn!(buffered = self.buffered_in(only), "flush deadline ran out; unwritten events will be re-read by the next owner");
        }
    }

    fn buffered_in(&self, only: Option<&[i32]>) -> usize {
        self.partitions.iter().filter(|(p, _)| only.is_none_or(|o| o.contains(p))).map(|(_, s)| s.buffer.len()).sum()
    }

    /// Forgets revoked partitions: their state, and their part of a pending flush.
    fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.remove(p);
            if let Some(pending) = self.pending.as_mut() {
                pending.strip(*p);
            }
            tracing::info!(partition = p, "partition revoked");
        }
        metrics::partitions(self.partitions.len());
    }

    fn buffered(&self) -> usize {
        self.partitions.values().map(|p| p.buffer.len()).sum()
    }

    /// Keeps one record from the topic in its partition's buffer.
    fn take(&mut self, m: OwnedMessage) {
        if m.topic() != self.topic {
            return;
        }
        let Some(state) = self.partitions.get_mut(&m.partition()) else { return };
        if !state.ready || m.offset() < state.next_offset {
            // Not positioned yet, or a refetch of a record already taken.
            return;
        }
        state.next_offset = m.offset() + 1;
        metrics::consumed(1);
        let payload = m.payload().unwrap_or_default();
        let decoded = match m.payload() {
            None => Err(("record has no payload".to_owned(), Vec::new())),
            Some(_) => wire::decode(payload).map_err(|e| (e.to_string(), payload.to_vec())),
        };
        state.buffer.push(Buffered { offset: m.offset(), key: m.key().unwrap_or_default().to_vec(), decoded });
        metrics::buffered(self.buffered());
    }

    /// Pauses fetching while a write is failing or the buffer is full, so
    /// memory stays bounded; the loop keeps polling to stay in the group.
    fn apply_backpressure<C: Consumer<Ctx>>(&mut self, consumer: &C) {
        let hold = self.pending.is_some() || self.buffered() >= self.config.flush.max_buffered_events;
        let topic = self.topic.clone();
        for (p, state) in self.partitions.iter_mut() {
            let want = hold || !state.ready;
            if want != state.paused {
                let mut list = TopicPartitionList::new();
                list.add_partition(&topic, *p);
                let result = if want { consumer.pause(&list) } else { consumer.resume(&list) };
                match result {
                    Ok(()) => state.paused = want,
                    Err(e) => tracing::warn!(error = %e, partition = p, "cannot change pause state"),
                }
            }
        }
    }

    /// Applies recorded assignments and loads any partition not yet ready.
    async fn apply_changes<C: Consumer<Ctx>>(&mut self, consumer: &C) {
        self.apply_recorded();
        if Instant::now() < self.next_load {
            return;
        }
        let loading: Vec<i32> = self.partitions.iter().filter(|(_, s)| !s.ready).map(|(p, _)| *p).collect();
        for p in loading {
            if let Err(e) = self.load(consumer, p).await {
                tracing::warn!(error = %e, partition = p, "cannot load partition state; retrying");
                self.next_load = Instant::now() + Duration::from_secs(1);
                return;
            }
        }
    }

    /// Applies assignments recorded by the rebalance callback.
    fn apply_recorded(&mut self) {
        let changes = std::mem::take(&mut *self.changes.lock().unwrap_or_else(|p| p.into_inner()));
        for change in changes {
            match change {
                Change::Assign(ps) => {
                    for p in ps {
                        self.partitions.insert(
                            p,
                            PartitionState {
                                ready: false,
                                paused: true,
                                next_offset: 0,
                                buffer: Vec::new(),
                                dedupe: PartitionDedupe::new(&self.config.dedupe),
                            },
                        );
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
    async fn load<C: Consumer<Ctx>>(&mut self, consumer: &C, partition: i32) -> Result<(), AggregatorError> {
        let started = Instant::now();
        let topic = self.topic.clone();
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
        let now = Utc::now().timestamp();
        let mut dedupe = PartitionDedupe::new(&self.config.dedupe);
        let since = u32::try_from((now - self.config.dedupe.window_secs).max(0)).unwrap_or(0);
        let mut keys = 0usize;
        self.store
            .keys_since(&topic, partition, since, |k| {
                dedupe.insert(key_hash(&k.tenant, &k.idempotency_key), k.fingerprint, i64::from(k.written_at), now);
                keys += 1;
            })
            .await?;

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
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.ready = true;
            state.next_offset = start.unwrap_or(0);
            state.buffer.clear();
            state.dedupe = dedupe;
            metrics::dedupe_state(partition, state.dedupe.fill_ratio(), state.dedupe.approx_bytes());
        }
        tracing::info!(partition, ?start, keys, ms = started.elapsed().as_millis() as u64, "partition ready");
        Ok(())
    }

    /// Writes what is buffered, or retries the pending flush when its backoff is over.
    async fn flush<C: Consumer<Ctx>>(&mut self, consumer: &C) {
        self.flush_some(consumer, None).await;
        // Open alerts resolve when their user calms down, even with no traffic.
        let idle = Duration::from_secs(self.config.alerts.interval_secs);
        if self.pending.is_none() && self.alerts.has_open() && self.last_evaluation.elapsed() >= idle {
            self.evaluate_alerts(&Default::default()).await;
        }
    }

    /// Runs the runaway rules; a failure is logged and retried next time,
    /// never allowed to hold up the pipeline.
    async fn evaluate_alerts(&mut self, touched: &std::collections::BTreeSet<(String, String)>) {
        if !self.alerts.enabled() {
            return;
        }
        self.last_evaluation = Instant::now();
        if let Err(e) = self.alerts.evaluate(&self.store, touched).await {
            tracing::warn!(error = %e, "runaway evaluation failed; it runs again after the next flush");
        }
    }

    async fn flush_some<C: Consumer<Ctx>>(&mut self, consumer: &C, only: Option<&[i32]>) {
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

    /// Takes up to one batch from the buffers and decides every record:
    /// dead letter, duplicate, or new (priced and rolled up). Nothing is taken
    /// from the buffers unless the whole decision succeeds.
    async fn decide(&mut self, only: Option<&[i32]>) -> Result<Option<Pending>, AggregatorError> {
        let max = self.config.flush.max_batch_events;
        let mut quota: BTreeMap<i32, usize> = BTreeMap::new();
        let mut left = max;
        for (p, state) in &self.partitions {
            if state.ready && !state.buffer.is_empty() && left > 0 && only.is_none_or(|o| o.contains(p)) {
                let n = state.buffer.len().min(left);
                quota.insert(*p, n);
                left -= n;
            }
        }
        if quota.is_empty() {
            return Ok(None);
        }
        // Keys a bloom filter may hold need an exact answer from ClickHouse.
        let mut maybe: Vec<(&str, &str)> = Vec::new();
        for (p, n) in &quota {
            let state = &self.partitions[p];
            for b in &state.buffer[..*n] {
                if let Ok(env) = &b.decoded
                    && state.dedupe.check(key_hash(&env.tenant, &env.event.idempotency_key)) == Known::Maybe
                {
                    maybe.push((&env.tenant, &env.event.idempotency_key));
                }
            }
        }
        let found = if maybe.is_empty() { HashMap::new() } else { self.store.lookup(&maybe).await? };
        let looked_up = maybe.len() as u64;

        let written_at = now_secs();
        let now = i64::from(written_at);
        let mut pending = Pending {
            stage: Stage::DeadLetters,
            started: Instant::now(),
            dead_letters: BTreeMap::new(),
            events: BTreeMap::new(),
            ranges: BTreeMap::new(),
            written_at,
            attempted: false,
            commits: BTreeMap::new(),
        };
        let mut false_positives = 0u64;
        for (p, n) in quota {
            let Some(state) = self.partitions.get_mut(&p) else { continue };
            let taken: Vec<Buffered> = state.buffer.drain(..n).collect();
            let mut batch_new: HashMap<u128, u64> = HashMap::new();
            let mut rows = Vec::new();
            let mut dead = Vec::new();
            for b in &taken {
                let source = Source::Kafka { topic: &self.topic, partition: p, offset: b.offset };
                let env = match &b.decoded {
                    Ok(env) => env,
                    Err((reason, payload)) => {
                        dead.push(DeadLetterRow {
                            kafka_topic: self.topic.clone(),
                            kafka_partition: p,
                            kafka_offset: b.offset,
                            reason: reason.clone(),
                            message_key: hex::encode(&b.key),
                            payload: hex::encode(payload),
                            written_at,
                        });
                        continue;
                    }
                };
                let h = key_hash(&env.tenant, &env.event.idempotency_key);
                let fp = fingerprint(&env.tenant, &env.event);
                let seen = match batch_new.get(&h) {
                    Some(f) => Some(*f),
                    None => match state.dedupe.check(h) {
                        Known::Seen(f) => Some(f),
                        Known::Maybe => {
                            let f = found.get(&h).copied();
                            if f.is_none() {
                                false_positives += 1;
                            }
                            f
                        }
                        Known::New => None,
                    },
                };
                match Decision::of(seen, fp) {
                    Decision::Retry => metrics::duplicate("retry"),
                    Decision::Conflict => {
                        metrics::duplicate("conflict");
                        tracing::warn!(
                            tenant = %env.tenant,
                            idempotency_key = %env.event.idempotency_key,
                            "dropped a copy whose payload differs from the first"
                        );
                    }
                    Decision::New => {
                        batch_new.insert(h, fp);
                        let tenant = self.tenants.tenant(&env.tenant);
                        let priced = price(&env.event, tenant, &self.catalog);
                        rows.push(EventRow::new(env, fp, priced, source, written_at));
                    }
                }
            }
            for (h, fp) in batch_new {
                state.dedupe.insert(h, fp, now, now);
            }
            metrics::dedupe_state(p, state.dedupe.fill_ratio(), state.dedupe.approx_bytes());
            if let Some(last) = taken.last() {
                pending.commits.insert(p, last.offset + 1);
            }
            if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
                // Rows are in offset order.
                pending.ranges.insert(p, Range { partition: p, after: first.kafka_offset - 1, up_to: last.kafka_offset });
                pending.events.insert(p, rows);
            }
            if !dead.is_empty() {
                pending.dead_letters.insert(p, dead);
            }
        }
        metrics::exact_lookups(looked_up, false_positives);
        metrics::buffered(self.buffered());
        Ok(Some(pending))
    }

    /// Moves the pending flush forward one write at a time; on failure it
    /// stays pending (consumption paused) and is retried after a backoff.
    async fn write<C: Consumer<Ctx>>(&mut self, consumer: &C) {
        let Some(mut pending) = self.pending.take() else { return };
        loop {
            let result = match pending.stage {
                Stage::DeadLetters => {
                    let rows: Vec<DeadLetterRow> = pending.dead_letters.values().flatten().cloned().collect();
                    self.store.insert_dead_letters(&rows).await.map(|()| {
                        metrics::dead_letters(rows.len() as u64);
                        Stage::Events
                    })
                }
                Stage::Events => {
                    let ranges: Vec<Range> = pending.ranges.values().copied().collect();
                    let landed = if pending.attempted && !ranges.is_empty() {
                        self.store.events_present(&self.topic, &ranges).await
                    } else {
                        Ok(HashMap::new())
                    };
                    match landed {
                        Err(e) => Err(e),
                        Ok(landed) => {
                            // Each partition's rows are in offset order, so what
                            // landed is a prefix: send only the rest.
                            let rows: Vec<&EventRow> = pending
                                .events
                                .values()
                                .flatten()
                                .filter(|r| landed.get(&r.kafka_partition).is_none_or(|last| r.kafka_offset > *last))
                                .collect();
                            pending.attempted = true;
                            self.store.insert_events(&rows).await.map(|()| Stage::Rollup(Rollup::ALL[0]))
                        }
                    }
                }
                Stage::Rollup(rollup) => {
                    let next = rollup.next().map_or(Stage::Commit, Stage::Rollup);
                    let ranges: Vec<Range> = pending.ranges.values().copied().collect();
                    let done = if pending.attempted && !ranges.is_empty() {
                        self.store.markers_present(rollup, &self.topic, &ranges).await
                    } else {
                        Ok(false)
                    };
                    match done {
                        Err(e) => Err(e),
                        Ok(true) => Ok(next),
                        Ok(false) => {
                            pending.attempted = true;
                            self.store.roll_up(rollup, &self.topic, &ranges, pending.written_at, pending.written_at).await.map(|()| next)
                        }
                    }
                }
                Stage::Commit => break,
            };
            match result {
                Ok(next) => {
                    if next != pending.stage {
                        pending.attempted = false;
                    }
                    pending.stage = next;
                }
                Err(e) => {
                    let table = match pending.stage {
                        Stage::DeadLetters => "dead_letters",
                        Stage::Events => "events",
                        Stage::Rollup(r) => r.table(),
                        Stage::Commit => "none",
                    };
                    tracing::warn!(error = %e, table, "ClickHouse write failed; holding offsets and retrying");
                    metrics::write_retry(table);
                    self.pending = Some(pending);
                    self.fail();
                    return;
                }
            }
        }
        self.commit(consumer, &pending);
        self.business.record_all(pending.events.values().flatten());
        let mut per_tenant: HashMap<&str, (u64, u64)> = HashMap::new();
        for row in pending.events.values().flatten() {
            let entry = per_tenant.entry(&row.tenant).or_default();
            entry.0 += 1;
            entry.1 += u64::from(row.cost_source == meterline_domain::CostSource::Unpriced.as_u8());
        }
        for (tenant, (written, unpriced)) in per_tenant {
            metrics::written(tenant, written);
            if unpriced > 0 {
                metrics::unpriced(tenant, unpriced);
            }
        }
        metrics::flushed(pending.started.elapsed().as_secs_f64(), pending.events.values().map(Vec::len).sum());
        self.backoff = Duration::from_millis(100);
        // Distinct users first: a flush holds many rows per user, and only the users are copied.
        let users: std::collections::HashSet<(&str, &str)> =
            pending.events.values().flatten().map(|r| (r.tenant.as_str(), r.user_id.as_str())).collect();
        let touched: std::collections::BTreeSet<(String, String)> =
            users.into_iter().map(|(t, u)| (t.to_owned(), u.to_owned())).collect();
        self.evaluate_alerts(&touched).await;
    }

    /// Commits the flush's offsets to Kafka. Best effort: ClickHouse is the
    /// record of progress, and a lost commit only means a partition's next
    /// owner starts from ClickHouse's position instead.
    fn commit<C: Consumer<Ctx>>(&self, consumer: &C, pending: &Pending) {
        if pending.commits.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (p, next) in &pending.commits {
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
