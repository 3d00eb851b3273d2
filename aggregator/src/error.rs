//! The crate's error type.

/// Everything that can go wrong in the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Schema(#[from] meterline_schemas::SchemaError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse: {0}")]
    Store(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
