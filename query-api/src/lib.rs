//! Meterline's query API: tenant-scoped usage, margins, top spenders and the
//! per-user audit trail over a store (ClickHouse, or the embedded store of the
//! all-in-one binary), money as exact decimals.
//!
//! Time ranges are half-open (`to` exclusive) and apply to minute windows:
//! a window belongs to a range if it starts in it. Defaults: the last 30 days,
//! or this calendar month for a user's statement and the audit trail.

mod answers;
pub mod billing;
mod cache;
mod cached;
mod config;
mod error;
pub mod export;
mod gate;
pub mod limits;
pub mod metrics;
mod pages;
mod params;
pub mod portal;
mod ranking;
mod refresh;
mod server;
mod store;

pub use cache::GroupCache;
pub use cached::{GroupReader, ranking as cached_ranking};
pub use config::{Config, QueryLimits, ServerConfig};
pub use ranking::whole_hours;
pub use refresh::{Refresher, pass as refresh_rankings};
pub use error::QueryError;
pub use params::Params;
pub use server::{AppState, OPENAPI, api_routes, route_paths, router, serve};
pub use store::{AlertsQuery, Cursor, GroupCursor, Order, QueryStore, RankQuery, Ranking, SumsQuery, TopQuery, separately};
