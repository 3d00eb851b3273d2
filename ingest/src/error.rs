//! The crate's error type.


/// Everything that can go wrong in ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid configuration: {key}: {message}")]
    Config { key: String, message: String },
    #[error(transparent)]
    Schema(#[from] meterline_schemas::SchemaError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("event log: {0}")]
    Log(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Limits(#[from] meterline_limits::LimitsError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}


impl IngestError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        IngestError::Config { key: key.into(), message: message.into() }
    }
}
