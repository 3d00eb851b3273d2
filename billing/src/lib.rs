//! Stripe meter sync: each mapped customer's billable usage per configured
//! meter, pushed to Stripe's Billing Meter Events API in hourly windows as
//! deltas against what was already pushed.
//!
//! One job per module: `config` (the `[billing]` section), `plan` (the pure
//! state machine: which windows, what delta, which identifier, what is too
//! old), `stripe` (the HTTP client and its retries), `store` (the seams to
//! where mappings, sums and pushed state live), `worker` (one sync cycle and
//! the loop), `routes` (the mapping and status endpoints). The stores are
//! bound beside themselves (the embedded one in the root crate), so this
//! crate depends on no store and no service.

pub mod config;
pub mod error;
pub mod plan;
pub mod routes;
pub mod store;
pub mod stripe;
pub mod worker;

pub use config::{BillingConfig, MeterConfig, MeterMeasure, MoneyUnit, SubjectColumn, TenantBilling};
pub use error::BillingError;
pub use plan::{Decision, WindowKey, WindowState};
pub use routes::{BillingApi, routes};
pub use store::{BillingAdmin, BillingLedger, Mapping, StatusRow};
pub use stripe::{MeterEvent, Outcome, StripeClient};
pub use worker::{CycleReport, Worker};

/// Stripe's documented bound: a meter event's timestamp must be within the
/// past 35 calendar days.
pub const STRIPE_MAX_AGE_SECS: i64 = 35 * 86_400;

/// The secret key's environment variable: never a config key, never logged.
pub const SECRET_KEY_VAR: &str = "METERLINE_STRIPE_SECRET_KEY";
