//! Meterline's query API: tenant-scoped usage, margins, top spenders and the
//! per-user audit trail over a store (ClickHouse, or the embedded store of the
//! all-in-one binary), money as exact decimals.
//!
//! Time ranges are half-open (`to` exclusive) and apply to minute windows:
//! a window belongs to a range if it starts in it. Defaults: the last 30 days,
//! or this calendar month for a user's statement and the audit trail.

pub mod config;
pub mod error;
pub mod metrics;
pub mod params;
pub mod queries;
pub mod ranking;
pub mod server;
pub mod sql;
pub mod store;

pub use config::Config;
pub use error::QueryError;
pub use server::serve;
