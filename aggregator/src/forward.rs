//! Produces records found off their key's home partition to that partition, acked before their source offsets count as done.
//!
//! Why: a record is counted only on its key's home partition, whose dedupe
//! state holds every copy of that key ever counted there. A record
//! elsewhere (from an ingest still on the `user` keying, or produced while
//! the partition count differed) would escape that state, so it is not
//! counted where it sits: it is produced, unchanged, to its home, and only
//! then may the flush that read it record progress past it. A crash after
//! the ack but before that progress is recorded re-reads and re-forwards the
//! record; the home partition drops the second copy as a retry of the key.

use meterline_schemas::wire;
use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

use crate::config::KafkaConfig;

/// A record to produce to its home partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Forward {
    pub(crate) home: i32,
    pub(crate) key: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

impl Forward {
    /// `envelope`, keyed and placed as ingest's `key` keying would have.
    pub(crate) fn of(envelope: &wire::Envelope, home: i32) -> Forward {
        Forward { home, key: wire::message_key(&envelope.tenant, &envelope.event.idempotency_key), payload: wire::encode(envelope) }
    }
}

/// An idempotent producer to the events topic.
pub(crate) struct Forwarder {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("topic", &self.topic).finish_non_exhaustive()
    }
}

/// How long one forwarded record may wait for its ack before the flush fails and is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

impl Forwarder {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Forwarder, KafkaError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", ACK_TIMEOUT.as_millis().to_string())
            .set("linger.ms", "5")
            .set_log_level(RDKafkaLogLevel::Warning);
        // The consumer's pass-through options carry the cluster's security
        // settings; consumer-only ones are ignored by a producer with a warning.
        for (k, v) in &config.options {
            client.set(k, v);
        }
        Ok(Forwarder { producer: client.create()?, topic: config.topic.clone() })
    }

    /// Produces every record to its home partition and waits for all acks;
    /// `Err` if any was not acked (the caller retries them all: the home
    /// partition drops a copy that did land as a retry).
    pub(crate) async fn send(&self, records: &[&Forward]) -> Result<(), KafkaError> {
        let sends = records.iter().map(|r| {
            let record = FutureRecord::to(&self.topic).key(&r.key).payload(&r.payload).partition(r.home);
            self.producer.send(record, ACK_TIMEOUT)
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| e)?;
        }
        Ok(())
    }
}
