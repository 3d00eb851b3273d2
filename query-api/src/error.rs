//! The crate's error type. The handlers turn a store's failure into a 503
//! (`meterline_http::ApiError`) and log it there; `server::unavailable`
//! says which 503 (a limit, the tenant's cap, or the store being down).

/// Everything that can go wrong in the query API.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("invalid configuration: {key}: {message}")]
    Config { key: String, message: String },
    #[error(transparent)]
    Schema(#[from] meterline_schemas::SchemaError),
    #[error(transparent)]
    ClickHouse(#[from] meterline_clickhouse::ClickHouseError),
    /// Another store's failure (the embedded one's), kept whole for the log.
    #[error("store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The tenant already has its cap of reads running (see `gate.rs`).
    #[error("tenant {tenant} already has {permits} ClickHouse reads running")]
    Overloaded { tenant: String, permits: usize },
}

impl From<clickhouse::error::Error> for QueryError {
    fn from(e: clickhouse::error::Error) -> QueryError {
        QueryError::ClickHouse(e.into())
    }
}

impl QueryError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        QueryError::Config { key: key.into(), message: message.into() }
    }
}
