//! What every Meterline HTTP server shares: the error answer ([`ApiError`]),
//! the key extractors ([`ReadKey`], [`IngestKey`], [`AdminKey`]), the operations routes
//! (health, readiness, metrics, 404), the Prometheus recorder and the
//! shutdown signal.

mod auth;
mod error;
mod operations;
mod path;
mod recorder;

pub use auth::{AdminKey, HasKeys, IngestKey, ReadKey, authenticate};
pub use error::ApiError;
pub use operations::{shutdown_signal, with_operations};
pub use path::PathId;
pub use recorder::install as install_recorder;
