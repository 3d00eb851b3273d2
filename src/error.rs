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
}

impl From<EmbeddedError> for meterline_ingest::IngestError {
    fn from(e: EmbeddedError) -> Self {
        meterline_ingest::IngestError::Log(Box::new(e))
    }
}

impl EmbeddedError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        EmbeddedError::Config { key: key.into(), message: message.into() }
    }
}
