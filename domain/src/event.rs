//! An event as stored: one row of `events`, the same in every store.

use meterline_schemas::wire::Envelope;
use serde::{Deserialize, Serialize};

use crate::pricing::Priced;
use crate::window::datetime_secs;

/// One row of the `events` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clickhouse", derive(clickhouse::Row))]
pub struct EventRow {
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: u64,
    pub event_time: u32,
    pub event_time_ns: u32,
    pub user_id: String,
    pub customer_id: String,
    pub feature: String,
    pub model: String,
    pub provider: String,
    pub environment: String,
    pub billable: u8,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_nanos: i64,
    pub cost_source: u8,
    pub revenue_nanos: i64,
    pub credits_nanos: i64,
    pub metadata: String,
    pub received_at: u32,
    /// Where the event sits in Kafka; `None` in a store with no log (the
    /// embedded one), which stores an empty topic.
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub written_at: u32,
}

/// Where a record came from in the log: a Kafka position, or nowhere (the
/// embedded store writes straight from the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source<'a> {
    Kafka { topic: &'a str, partition: i32, offset: i64 },
    Embedded,
}

impl EventRow {
    pub fn new(envelope: &Envelope, fingerprint: u64, priced: Priced, source: Source<'_>, written_at: u32) -> EventRow {
        let e = &envelope.event;
        let (topic, partition, offset) = match source {
            Source::Kafka { topic, partition, offset } => (topic.to_owned(), partition, offset),
            Source::Embedded => (String::new(), 0, 0),
        };
        EventRow {
            tenant: envelope.tenant.clone(),
            idempotency_key: e.idempotency_key.clone(),
            fingerprint,
            event_time: datetime_secs(e.timestamp),
            event_time_ns: e.timestamp.timestamp_subsec_nanos(),
            user_id: e.user_id.clone(),
            customer_id: e.customer_id.clone().unwrap_or_default(),
            feature: e.feature.clone(),
            model: e.model.clone(),
            provider: e.provider.clone().unwrap_or_default(),
            environment: e.environment.clone(),
            billable: u8::from(e.billable),
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            cached_input_tokens: e.cached_input_tokens,
            reasoning_tokens: e.reasoning_tokens,
            cost_nanos: priced.cost.0,
            cost_source: priced.cost_source.as_u8(),
            revenue_nanos: priced.revenue.0,
            credits_nanos: priced.credits.0,
            metadata: e.metadata.clone().unwrap_or_default(),
            received_at: datetime_secs(envelope.received_at),
            kafka_topic: topic,
            kafka_partition: partition,
            kafka_offset: offset,
            written_at,
        }
    }

    /// The event's Kafka position, if it came through Kafka.
    pub fn kafka_position(&self) -> Option<(i32, i64)> {
        (!self.kafka_topic.is_empty()).then_some((self.kafka_partition, self.kafka_offset))
    }
}
