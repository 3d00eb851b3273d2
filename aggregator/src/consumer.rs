//! The Kafka side: the rdkafka client's set-up, its context (rebalance callbacks, lag statistics), and the run loop that polls, buffers, decides flushes between polls and hands them to the writer running beside it.

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::AggregatorError;
use crate::config::Config;
use crate::metrics;
use crate::partitions::Change;
use crate::pipeline::Pipeline;
use meterline_clickhouse::Store;

/// The consumer's context: records assignments, flushes on revoke, reports lag.
pub struct Ctx {
    topic: String,
    changes: Arc<Mutex<Vec<Change>>>,
    state: Arc<tokio::sync::Mutex<Pipeline>>,
    revoke_timeout: Duration,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("topic", &self.topic).finish_non_exhaustive()
    }
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
        // This runs inside a poll, while a write may be running beside the
        // loop (`writes.rs`). Wait for it, whatever the deadline (it must not
        // land after the next owner repaired past it), then write the queued
        // flushes and the revoked partitions' buffers and commit before
        // letting go, within the deadline; what does not make it is dropped
        // and re-read by the next owner from ClickHouse's record, so the
        // deadline costs re-reading, never correctness.
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
            // without flushing, which is safe for the reason above. Writes
            // do not overlap on such a runtime (each is waited for where it
            // starts), so none is running here.
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

enum Step<'c> {
    Stop,
    Housekeeping,
    /// Borrowed from the consumer's queue: copied once, into the buffer, not first into an owned message.
    Record(Result<BorrowedMessage<'c>, rdkafka::error::KafkaError>),
    Tick,
    Written,
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
    pub async fn new(config: Config, store: Store) -> Result<Runner, AggregatorError> {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(tokio::sync::Mutex::new(Pipeline::new(config.clone(), store, changes.clone()).await?));
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
        let write_done = {
            let mut p = self.state.lock().await;
            p.apply_changes(consumer).await;
            p.apply_backpressure(consumer);
            p.write_done()
        };
        loop {
            // The lock is not held while polling: the revoke callback runs
            // inside the poll and takes it.
            let step = tokio::select! {
                biased;
                _ = &mut shutdown => Step::Stop,
                _ = tick.tick() => Step::Tick,
                // Before records: a write that ended frees the queue and lets the next one start.
                _ = write_done.notified() => Step::Written,
                m = consumer.recv() => Step::Record(m),
                _ = housekeeping.tick() => Step::Housekeeping,
            };
            let mut p = self.state.lock().await;
            match step {
                Step::Stop => break,
                Step::Housekeeping => {}
                Step::Tick => p.flush(consumer).await,
                Step::Written => p.written(consumer).await,
                Step::Record(Ok(m)) => {
                    // An assignment seen in this poll is applied before the record is kept.
                    p.apply_recorded();
                    p.take(&m);
                    drop(m);
                    if p.batch_waits() {
                        p.flush(consumer).await;
                    }
                }
                Step::Record(Err(e)) => {
                    drop(p);
                    tracing::warn!(error = %e, "consumer error");
                    // The broker is down or restarting: no busy loop.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    p = self.state.lock().await;
                }
            }
            // Before the next poll, under the same lock as the step: one lock
            // per record (each lock of the async mutex is a few hundred
            // instructions, and the loop takes one record per turn).
            p.apply_changes(consumer).await;
            p.apply_backpressure(consumer);
        }
        let mut p = self.state.lock().await;
        let deadline = Instant::now() + Duration::from_secs(p.config.server.shutdown_grace_secs);
        p.apply_changes(consumer).await;
        p.flush_until_empty(consumer, None, deadline).await;
        p.drain_evaluations(deadline).await;
        drop(p);
        let c = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await;
        Ok(())
    }
}

