//! Meterline ingest: accepts batches of usage events over HTTP, validates them
//! against the contract in `meterline-schemas`, and produces every valid event
//! to Kafka. A 2xx means the broker acked every event reported accepted.

pub mod body;
pub mod config;
pub mod error;
pub mod metrics;
pub mod producer;
pub mod server;

pub use config::Config;
pub use error::{ApiError, IngestError};
pub use server::serve;
