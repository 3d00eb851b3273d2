//! The crate's errors: a refused input naming its field, and a store's failure classified once.

use meterline_http::ApiError;

/// An input refused: the field and the reason, for a `400`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), message: message.into() }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> ApiError {
        ApiError::bad_request("invalid_field", e.message).with_field(&e.field)
    }
}

/// The limits crate's one error type.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// The store did not answer or failed; retryable, and a reservation
    /// answers by the tenant's `on_store_error` meanwhile.
    #[error("limits store unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The store holds something it should not (a record that does not parse).
    #[error("limits store holds a bad record at {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("config key {key}: {message}")]
    Config { key: String, message: String },
}

impl LimitsError {
    pub fn unavailable(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> LimitsError {
        LimitsError::Unavailable { message: message.into(), source: Some(Box::new(source)) }
    }
}
