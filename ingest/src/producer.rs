//! The Kafka side of ingest: produce a request's events and wait for every ack.
//!
//! The producer is idempotent with `acks=all`, so librdkafka's own retries
//! never duplicate a message within its session. A request is answered 2xx only
//! when every one of its events was acked; if any was not, the request is
//! answered 503 and reports nothing accepted. Some of its events may still have
//! reached the topic: the client's retry carries the same idempotency keys and
//! the aggregator drops the second copy, so nothing is counted twice.
//!
//! Backpressure: librdkafka's queue is bounded (`queue.buffering.max.messages`
//! in `kafka.options`, 100,000 by default). A request that finds it full
//! waits for its own oldest acks to make room (or 10 ms at a time when it has
//! none in flight), up to `kafka.produce_timeout_ms`, and is answered 503 only
//! past that: a batch larger than the queue is sent whole, never refused.
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
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use meterline_schemas::wire::{self, Envelope, Keying, home_partition};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::IngestError;
use crate::config::KafkaConfig;

/// A request's events encoded for the topic: every key and payload in one
/// buffer, so encoding costs two allocations per request rather than two per
/// event (bench/PROFILE.md, "Ingest").
#[derive(Debug, Default)]
pub struct Outgoing {
    bytes: Vec<u8>,
    messages: Vec<Message>,
}

/// Where one message's key and payload are in [`Outgoing::bytes`].
#[derive(Debug)]
struct Message {
    key: Range<usize>,
    payload: Range<usize>,
    /// The partition to produce to; `None` leaves it to the client's partitioner.
    partition: Option<i32>,
}

impl Outgoing {
    /// Room for `events` records of about `record_bytes` each (key included).
    fn with_capacity(events: usize, record_bytes: usize) -> Outgoing {
        Outgoing { bytes: Vec::with_capacity(events * record_bytes), messages: Vec::with_capacity(events) }
    }

    /// Appends one event under `tenant/key_part` (the bytes of [`wire::message_key`]).
    fn push(&mut self, envelope: &Envelope, key_part: &str, partition: Option<i32>) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(envelope.tenant.as_bytes());
        self.bytes.push(b'/');
        self.bytes.extend_from_slice(key_part.as_bytes());
        let key_end = self.bytes.len();
        wire::encode_into(envelope, &mut self.bytes);
        self.messages.push(Message { key: start..key_end, payload: key_end..self.bytes.len(), partition });
    }

    /// Each message's key, payload and partition, in order.
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], Option<i32>)> {
        self.messages.iter().map(|m| (&self.bytes[m.key.clone()], &self.bytes[m.payload.clone()], m.partition))
    }
}

/// Typical size of one encoded record and its key, to size a request's buffer.
const RECORD_BYTES: usize = 192;

/// How long a send waits before trying again when librdkafka's queue is full
/// and this request has no ack of its own left to wait for.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

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
    pub async fn outgoing(&self, events: &[Envelope]) -> Result<Outgoing, IngestError> {
        let partitions = match self.config.keying {
            Keying::User => None,
            Keying::Key => Some(self.partition_count().await?),
        };
        let mut out = Outgoing::with_capacity(events.len(), RECORD_BYTES);
        for e in events {
            match partitions {
                None => out.push(e, &e.event.user_id, None),
                Some(n) => out.push(e, &e.event.idempotency_key, Some(home_partition(&e.tenant, &e.event.idempotency_key, n))),
            }
        }
        Ok(out)
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
    ///
    /// Each message is handed to librdkafka at once and its delivery awaited
    /// in order afterwards, rather than as one `FutureProducer::send` future
    /// per message joined together: that join re-polled every pending future
    /// on each wake-up and cost more per event than librdkafka's own produce
    /// (bench/PROFILE.md, "Ingest"). When librdkafka's bounded queue is full
    /// (the backpressure when the broker is slow), the send waits for this
    /// request's oldest outstanding ack, or briefly when it has none, and
    /// gives up after the produce timeout as `FutureProducer::send` would.
    ///
    /// `messages` is dropped once librdkafka holds its copy of every message,
    /// before the wait for acks: while the broker is slow, a request in
    /// flight holds only what librdkafka queued for it.
    pub async fn send_all(&self, messages: Outgoing) -> Result<(), IngestError> {
        let producer = self.current();
        let deadline = Instant::now() + self.timeout;
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::with_capacity(messages.messages.len());
        let mut failure = None;
        'send: for (key, payload, partition) in messages.iter() {
            let mut record = FutureRecord::to(&self.topic).key(key).payload(payload);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) if Instant::now() < deadline => {
                        record = back;
                        if let Some(oldest) = pending.pop_front() {
                            if let Err(e) = Self::delivered(oldest).await {
                                failure = Some(e);
                                break 'send;
                            }
                        } else {
                            tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                        }
                    }
                    Err((e, _)) => {
                        failure = Some(e);
                        break 'send;
                    }
                }
            }
        }
        drop(messages);
        // Every message handed over is awaited, even after a failure, so
        // the producer is replaced only once none of this request is queued.
        for delivery in pending {
            if let Err(e) = Self::delivered(delivery).await {
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            self.rebuild();
            // The topic may have been recreated or changed: ask again next time.
            *self.partitions.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(IngestError::Kafka(e));
        }
        Ok(())
    }

    /// The outcome of one delivery: `Err` when the broker did not ack it, or
    /// the producer went away before it could (a purge at shutdown).
    async fn delivered(delivery: DeliveryFuture) -> Result<(), KafkaError> {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_canceled) => Err(KafkaError::Canceled),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::UsageEvent;

    fn envelope(n: usize) -> Envelope {
        Envelope {
            tenant: "acme".into(),
            received_at: chrono::Utc::now(),
            event: UsageEvent {
                idempotency_key: format!("k-{n}"),
                timestamp: chrono::Utc::now(),
                user_id: format!("user-{}", n % 7),
                customer_id: None,
                feature: "chat".into(),
                model: "gpt-4o".into(),
                provider: None,
                input_tokens: 1,
                output_tokens: 1,
                cached_input_tokens: 0,
                reasoning_tokens: 0,
                cost_usd: None,
                revenue_usd: None,
                credits: None,
                billable: true,
                environment: "production".into(),
                metadata: None,
            },
        }
    }

    /// A request larger than librdkafka's queue waits for room (its own acks)
    /// instead of failing, and every event reaches the topic once.
    #[tokio::test]
    async fn a_batch_larger_than_the_client_queue_is_sent_whole() {
        let brokers = std::env::var("METERLINE_TEST_KAFKA_BROKERS").expect("run with the test stack: eval \"$(scripts/stack env)\"");
        let topic = format!("ingest-queue-full-{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
        let mut config = KafkaConfig {
            brokers,
            topic: topic.clone(),
            create_topic: true,
            partitions: 4,
            produce_timeout_ms: 10_000,
            compression: "lz4".into(),
            linger_ms: 5,
            keying: Keying::Key,
            options: Default::default(),
        };
        // 1,000 events through a queue that holds 50.
        config.options.insert("queue.buffering.max.messages".into(), "50".into());
        let producer = EventProducer::new(&config).unwrap();
        producer.ensure_topic().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Polled with a deadline: the broker reports a new topic's partitions soon after.
        while !producer.ready().await {
            assert!(Instant::now() < deadline, "topic {topic} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let events: Vec<Envelope> = (0..1_000).map(envelope).collect();
        let outgoing = producer.outgoing(&events).await.unwrap();
        producer.send_all(outgoing).await.expect("every event acked despite the full queue");

        // Read back from the start of every partition until each key is seen
        // (the test broker's watermarks count batches, not records).
        let read_topic = topic.clone();
        let (records, keys) = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            use rdkafka::{Message as _, Offset, TopicPartitionList};
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &config.brokers)
                .set("group.id", format!("{read_topic}-check"))
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let mut partitions = TopicPartitionList::new();
            for p in 0..4 {
                partitions.add_partition_offset(&read_topic, p, Offset::Beginning).unwrap();
            }
            consumer.assign(&partitions).unwrap();
            let (mut records, mut keys) = (0, std::collections::HashSet::new());
            let deadline = Instant::now() + Duration::from_secs(30);
            while keys.len() < 1_000 && Instant::now() < deadline {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                    records += 1;
                    keys.insert(m.key().unwrap_or_default().to_vec());
                }
            }
            (records, keys.len())
        })
        .await
        .unwrap();
        assert_eq!((records, keys), (1_000, 1_000), "each event on {topic} exactly once");
    }
}
