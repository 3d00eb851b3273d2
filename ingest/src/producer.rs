//! The Kafka side of ingest: produce a request's events and wait for every ack.
//!
//! The producer is idempotent with `acks=all`, so librdkafka's own retries
//! never duplicate a message within its session. A request is answered 2xx only
//! when every one of its events was acked; if any was not, the request is
//! answered 503 and reports nothing accepted. Some of its events may still have
//! reached the topic: the client's retry carries the same idempotency keys and
//! the aggregator drops the second copy, so nothing is counted twice.
//!
//! Keying (`kafka.keying`): by default each event is keyed
//! `tenant/idempotency_key` and produced to that key's home partition
//! ([`home_partition`], out of the topic's partition count as the broker
//! reports it), so every copy of a key, whatever it changes, reaches the one
//! partition whose dedupe state knows the key. The aggregator counts a record
//! only on its home partition and forwards any other (the `user` keying's, or
//! one produced while the partition count was different), so a stale count
//! here costs a forward, never a double count.
//!
//! After a failed request the producer instance is replaced (at most every few
//! seconds). An idempotent producer's session can outlive its broker's memory
//! of it: a broker that restarts without its producer state (the in-memory
//! test broker; a cluster restored from backup) answers `UNKNOWN_PRODUCER_ID`
//! forever, and librdkafka never asks for a new id. A fresh instance does.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use meterline_schemas::wire::{self, Envelope, Keying, home_partition};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::IngestError;
use crate::config::KafkaConfig;

/// One encoded event ready to send.
#[derive(Debug)]
pub struct Outgoing {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    /// The partition to produce to; `None` leaves it to the client's partitioner.
    pub partition: Option<i32>,
}

/// Shortest time between two producer replacements, so that an outage does
/// not churn through instances.
const REBUILD_INTERVAL: Duration = Duration::from_secs(3);

/// Produces to the events topic.
#[derive(Clone)]
pub struct EventProducer {
    producer: Arc<RwLock<FutureProducer>>,
    last_rebuild: Arc<Mutex<Instant>>,
    topic: Arc<str>,
    timeout: Duration,
    config: KafkaConfig,
    /// The topic's partition count as the broker last reported it, if it has.
    partitions: Arc<Mutex<Option<i32>>>,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl EventProducer {
    pub fn new(config: &KafkaConfig) -> Result<EventProducer, IngestError> {
        Ok(EventProducer {
            producer: Arc::new(RwLock::new(Self::create(config)?)),
            last_rebuild: Arc::new(Mutex::new(Instant::now())),
            topic: Arc::from(config.topic.as_str()),
            timeout: Duration::from_millis(config.produce_timeout_ms),
            config: config.clone(),
            partitions: Arc::new(Mutex::new(None)),
        })
    }

    /// The messages for `events` under the configured keying.
    pub async fn outgoing(&self, events: &[Envelope]) -> Result<Vec<Outgoing>, IngestError> {
        let partitions = match self.config.keying {
            Keying::User => None,
            Keying::Key => Some(self.partition_count().await?),
        };
        Ok(events
            .iter()
            .map(|e| match partitions {
                None => Outgoing { key: wire::message_key(&e.tenant, &e.event.user_id), payload: wire::encode(e), partition: None },
                Some(n) => Outgoing {
                    key: wire::message_key(&e.tenant, &e.event.idempotency_key),
                    payload: wire::encode(e),
                    partition: Some(home_partition(&e.tenant, &e.event.idempotency_key, n)),
                },
            })
            .collect())
    }

    /// The topic's partition count: the last one seen, or asked of the broker.
    async fn partition_count(&self) -> Result<i32, IngestError> {
        let known = *self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        match known {
            Some(n) => Ok(n),
            None => self
                .fetch_partition_count()
                .await
                .ok_or(IngestError::Kafka(rdkafka::error::KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition))),
        }
    }

    /// Asks the broker for the topic's partitions and remembers the count;
    /// `None` when it does not answer in time or has no such topic.
    async fn fetch_partition_count(&self) -> Option<i32> {
        let producer = self.current();
        let topic = self.topic.clone();
        let count = tokio::task::spawn_blocking(move || {
            let metadata = producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)).ok()?;
            let partitions = metadata.topics().iter().find(|t| t.error().is_none())?.partitions().len();
            i32::try_from(partitions).ok().filter(|n| *n > 0)
        })
        .await
        .ok()
        .flatten()?;
        *self.partitions.lock().unwrap_or_else(|p| p.into_inner()) = Some(count);
        Some(count)
    }

    fn create(config: &KafkaConfig) -> Result<FutureProducer, IngestError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", &config.compression)
            .set("linger.ms", config.linger_ms.to_string())
            .set("message.timeout.ms", config.produce_timeout_ms.to_string())
            // Fail fast on a dead connection rather than wait out TCP defaults.
            .set("socket.connection.setup.timeout.ms", "3000")
            // Short reconnect backoff: a broker that comes back is used within
            // a second, and failures during an outage surface at the timeout.
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "500")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &config.options {
            client.set(k, v);
        }
        Ok(client.create()?)
    }

    fn current(&self) -> FutureProducer {
        // A poisoned lock only means a panic elsewhere mid-swap; the value is intact.
        self.producer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the producer instance unless that was done moments ago.
    fn rebuild(&self) {
        let mut last = self.last_rebuild.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < REBUILD_INTERVAL {
            return;
        }
        *last = Instant::now();
        match Self::create(&self.config) {
            Ok(fresh) => {
                *self.producer.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                tracing::info!("replaced the Kafka producer after a failed request");
            }
            Err(e) => tracing::warn!(error = %e, "cannot create a new Kafka producer"),
        }
    }

    /// Sends every message and waits for all acks. `Err` if any was not acked.
    pub async fn send_all(&self, messages: &[Outgoing]) -> Result<(), IngestError> {
        let producer = self.current();
        let sends = messages.iter().map(|m| {
            let mut record = FutureRecord::to(&self.topic).key(&m.key).payload(&m.payload);
            if let Some(p) = m.partition {
                record = record.partition(p);
            }
            // The queue timeout bounds the wait for room in librdkafka's bounded
            // queue; that wait is the backpressure when the broker is slow.
            producer.send(record, self.timeout)
        });
        let results = futures::future::join_all(sends).await;
        if let Some(Err((e, _))) = results.into_iter().find(Result::is_err) {
            self.rebuild();
            // The topic may have been recreated or changed: ask again next time.
            *self.partitions.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(IngestError::Kafka(e));
        }
        Ok(())
    }

    /// True when the broker answers a metadata request for the topic in
    /// time; the partition count it reports is the one keying uses next.
    pub async fn ready(&self) -> bool {
        self.fetch_partition_count().await.is_some()
    }

    /// Creates the topic if it is missing. Brokers without durable storage (the
    /// in-memory test broker) forget topics on restart, so this runs again
    /// whenever readiness finds the topic gone.
    pub async fn ensure_topic(&self) -> Result<(), IngestError> {
        if !self.config.create_topic {
            return Ok(());
        }
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.config.brokers);
        let admin: AdminClient<DefaultClientContext> = client.create()?;
        let topic = NewTopic::new(&self.config.topic, self.config.partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))).request_timeout(Some(Duration::from_secs(5)));
        let results = admin.create_topics([&topic], &options).await?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(IngestError::Kafka(rdkafka::error::KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }

    /// Waits up to `grace` for queued messages to be acked.
    pub fn flush(&self, grace: Duration) {
        if let Err(e) = self.current().flush(grace) {
            tracing::warn!(error = %e, "producer queue not empty at shutdown");
        }
    }
}
