//! Meterline's limits: plans of limits per user or customer, race-safe
//! reservations (reserve an estimate, run the AI call, commit the actual
//! usage or release), and live balances.
//!
//! The pure core (`plan`, `period`, `book`, `status`, `reservation`) decides;
//! a [`LimitStore`] keeps (Redis in the distributed deployment, SQLite in the
//! all-in-one binary); [`Limits`] validates requests, prices estimates and
//! meters commits through the same log as `POST /v1/events`; [`routes`] serves it.

mod book;
mod config;
mod error;
pub mod metrics;
pub mod notify;
mod nearest;
mod period;
mod plan;
mod reconcile;
mod request;
mod reservation;
mod routes;
mod service;
mod status;
mod store;
mod subject;

pub use book::{Amounts, Applied, Book, Charge, Counter, admits, applicable, charges, counts, distinct};
pub use config::{LimitsConfig, OnStoreError, TenantLimits};
pub use error::{Invalid, LimitsError};
pub use nearest::{NEAREST_DEFAULT, NEAREST_MAX, Near, rank as rank_nearest, ratio_nanos};
pub use period::{shifted, window};
pub use plan::{DEFAULT_PLAN, Filter, Limit, LimitMeasure, LimitView, Period, Plan, PlanView, Scope, parse_plan};
pub use reconcile::{CounterKey, Definition, Definitions, Examined, Metered, Pending, Report, Row as ReconcileRow, Status as ReconcileStatus, event_columns, examine, period_of};
pub use reservation::{Action, Hold, KEY_PREFIX, Refusal, Reservation, ReservationState, commit, counted, expire, new_id, parse_id, release};
pub use routes::{PATHS, READ_PATHS, read_routes, routes};
pub use service::{Clock, Limits, Meter, NearestAnswer, NearestRow, ReserveAnswer, SettleAnswer, SubjectLimits};
pub use status::{Balance, LimitStatus, status};
pub use store::{Admission, Admit, Admitted, KEEP_AFTER_EXPIRY_MS, LimitStore, Usage, book_of};
pub use subject::{Subject, Subscription, SubscriptionView};

#[cfg(test)]
mod memory;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod openapi_check;
