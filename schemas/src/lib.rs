//! Meterline's shared contract: usage events, their validation and wire
//! encoding, the price catalog, tenant keys and configuration plumbing.
//!
//! Pure code only: no async runtime and no I/O, so every service and every test
//! agrees on the contract by linking the same functions.

pub mod batch;
pub mod cloudevents;
pub mod config;
pub mod duration;
pub mod event;
pub mod money;
pub mod prices;
pub mod tenants;
pub mod wire;

pub use event::{ErrorCode, FieldError, Rejection, TimeBounds, UsageEvent, parse_event};
pub use money::Nanos;

/// Errors in configuration and contract data (the crate's one error type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("config key {key}: {message}")]
    Config { key: String, message: String },
    #[error("config: {0}")]
    ConfigFile(String),
    #[error("price {key}: {message}")]
    Price { key: String, message: String },
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

impl SchemaError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        SchemaError::Config { key: key.into(), message: message.into() }
    }
}
