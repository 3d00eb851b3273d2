//! Meterline ingest: accepts batches of usage events over HTTP, validates them
//! against the contract in `meterline-schemas`, and produces every valid event
//! to Kafka. A 2xx means the broker acked every event reported accepted.

mod body;
mod cloudevents;
mod problem;
mod config;
mod error;
mod log;
pub mod metrics;
mod producer;
mod server;

pub use config::{Config, KafkaConfig, ServerConfig};
pub use error::IngestError;
pub use log::{EventLog, LogMeter};
pub use server::{AppState, BatchResponse, EventError, RejectedEvent, api_routes, router, serve};
