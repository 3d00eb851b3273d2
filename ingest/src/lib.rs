//! Meterline ingest: accepts batches of usage events over HTTP, validates them
//! against the contract in `meterline-schemas`, and produces every valid event
//! to Kafka. A 2xx means the broker acked every event reported accepted.

pub mod body;
pub mod config;
pub mod error;
pub mod log;
pub mod metrics;
pub mod producer;
pub mod server;

pub use config::Config;
pub use error::{ApiError, IngestError};
pub use log::EventLog;
pub use server::serve;

/// Resolves on SIGINT or SIGTERM: the shutdown future the binaries pass to `serve`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
