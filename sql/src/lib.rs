//! One SQL builder for every store: statement text and its bound values
//! travel together ([`Sql`]), each engine's differences are a [`Dialect`],
//! and the pieces both stores' rollup queries share (a request's [`Scope`]
//! and WHERE clauses, the summed measures, grouping keys, ranking orders and
//! the rollup [`Plan`]) are written once here. Pure: no I/O.

mod billing;
mod builder;
mod metered;
mod meter_sync;
mod rollups;
mod scope;
mod statements;

pub use billing::{BillingSums, MAX_BOUNDARIES, billing_sums, boundary_runs};
pub use builder::{Sql, Value, i, quote, repeat, s};
pub use metered::{MeteredSum, metered_sum};
pub use meter_sync::{HourlySums, hourly_sums};
pub use rollups::{BY_BUCKET, BY_MARGIN, DIMENSIONS, DaySplit, GroupCursor, HAS_EVENTS, NEGATIVE_ONLY, Plan, dims, group_keys, having, metric_order, negated_sums_as, plan, resums, split_days, sums, sums_as};
pub use scope::{Dialect, Scope};
pub use statements::{AlertCursor, AlertsQuery, Cursor, alerts, events};
