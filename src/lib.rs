//! Meterline in one process: ingest, dedupe and rollups, the query API,
//! limits and reservations, and runaway alerts over an embedded SQLite store
//! in a data directory, with the same HTTP API, auth, validation, metrics and
//! alerts as the distributed deployment (Kafka + ClickHouse). It reuses the
//! services' libraries; only the log (a group-commit queue instead of Kafka)
//! and the store (SQLite instead of ClickHouse) differ, behind `meterline_ingest::EventLog`,
//! `meterline_query_api::store::QueryStore` and `meterline_limits::LimitStore`.

pub mod config;
pub mod demo;
pub mod devconfig;
pub mod error;
pub mod export;
pub mod query;
pub mod reconcile;
pub mod server;
pub mod store;

pub use config::Config;
pub use error::EmbeddedError;
pub use server::serve;
