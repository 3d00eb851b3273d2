//! The crate's error type; HTTP answers use ingest's `ApiError` shape.

use meterline_ingest::ApiError;

/// Everything that can go wrong in the query API.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Schema(#[from] meterline_schemas::SchemaError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Aggregator(#[from] meterline_aggregator::AggregatorError),
    #[error("store: {0}")]
    Store(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        // The cause goes to the log, never into the answer.
        tracing::error!(error = %e, "query failed");
        ApiError::unavailable("the store could not answer; retry later")
    }
}
