//! The crate's error type.

/// Everything that can go wrong in the all-in-one binary.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("invalid configuration: {key}: {message}")]
    Config { key: String, message: String },
    #[error("invalid configuration: {0}")]
    Domain(#[from] meterline_domain::DomainError),
    #[error(transparent)]
    Schema(#[from] meterline_schemas::SchemaError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Ingest(#[from] meterline_ingest::IngestError),
    #[error(transparent)]
    Query(#[from] meterline_query_api::QueryError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the embedded writer has stopped")]
    WriterStopped,
    /// A stored limits record that does not parse.
    #[error("the limits store holds a bad record at {key}: {message}")]
    Corrupt { key: String, message: String },
}

impl From<EmbeddedError> for meterline_ingest::IngestError {
    fn from(e: EmbeddedError) -> Self {
        meterline_ingest::IngestError::Log(Box::new(e))
    }
}

impl From<EmbeddedError> for meterline_limits::LimitsError {
    fn from(e: EmbeddedError) -> Self {
        match e {
            EmbeddedError::Corrupt { key, message } => meterline_limits::LimitsError::Corrupt { key, message },
            other => meterline_limits::LimitsError::unavailable("the embedded store failed", other),
        }
    }
}

impl EmbeddedError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        EmbeddedError::Config { key: key.into(), message: message.into() }
    }

    pub fn corrupt(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        EmbeddedError::Corrupt { key: key.into(), message: message.to_string() }
    }
}
