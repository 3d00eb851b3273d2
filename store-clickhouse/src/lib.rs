//! The ClickHouse store: connection and version detection, migrations, row
//! types, every statement the aggregator and the query API send (each with
//! its binds, through `meterline-sql`), and the compatibility list that
//! `sql_compat` (ClickHouse 18.16) and `chdb-check` (the current engine) run.

mod billing;
mod compat;
mod config;
mod error;
mod migrations;
mod queries;
mod retention;
mod snapshots;
mod statements;
mod store;

pub use billing::{BillingCustomerRow, BillingStatusRow, BillingWindowRow, HourSumRow};
pub use compat::compat_statements;
pub use config::ClickHouseConfig;
pub use error::{ClickHouseError, Limit, Retry, exception_code};
pub use migrations::{MIGRATIONS, Migration};
pub use retention::{Purged, expired as expired_partitions};
pub use snapshots::{Blob, SnapshotRow};
pub use statements::{Range, Rollup, UserSum};
pub use store::{DeadLetterRow, KeyRow, Progress, ReadLimits, Store, bind, connect};

/// The query API's statements, by endpoint.
pub mod query {
    pub use crate::queries::{bucket, edge_groups, event_count, groups, negative_count, one_user_days, source, sums, sums_after, top};
}

/// The aggregator's statements.
pub mod write {
    pub use crate::statements::{UserSum, user_sums};
}

/// The Stripe meter sync's statements.
pub mod meter_sync {
    pub use crate::billing::{customers, hourly_sums, status, window, windows_since};
}

/// The limits reconciliation's statement.
pub mod reconcile {
    pub use crate::statements::metered_sum;
}
