//! Meterline's aggregator: Kafka consumer group that deduplicates events and
//! writes windowed rollups to ClickHouse. Built under the aggregator issue; the
//! topic encoding it consumes is [`meterline_schemas::wire`].
