//! The crate's error type.

/// Everything that can go wrong in the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("invalid configuration: {key}: {message}")]
    Config { key: String, message: String },
    #[error(transparent)]
    Schema(#[from] meterline_schemas::SchemaError),
    #[error("invalid configuration: {0}")]
    Domain(#[from] meterline_domain::DomainError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    ClickHouse(#[from] meterline_clickhouse::ClickHouseError),
    #[error(transparent)]
    Limits(#[from] meterline_limits::LimitsError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl AggregatorError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        AggregatorError::Config { key: key.into(), message: message.into() }
    }
}
