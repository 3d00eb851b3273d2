//! The seams to where billing state lives: [`BillingAdmin`] for the HTTP
//! routes (customer mappings, status) and [`BillingLedger`] for the worker
//! (mappings, hourly sums, pushed state). Each deployment binds them beside
//! its store; the embedded one is SQLite tables in the root crate.

use serde::Serialize;
use std::future::Future;

use crate::config::SubjectColumn;
use crate::error::BillingError;
use crate::plan::{WindowKey, WindowState};

type Result<T> = std::result::Result<T, BillingError>;

/// A subject's Stripe customer, as set through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub subject: String,
    pub stripe_customer_id: String,
}

/// One meter and subject in `GET /v1/billing/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusRow {
    pub event_name: String,
    pub customer_id: String,
    /// The Stripe customer of the last event sent.
    pub stripe_customer_id: String,
    /// The latest hour with anything pushed (RFC 3339), if any.
    pub last_window: Option<String>,
    /// What that hour holds in Stripe.
    pub last_window_value: i64,
    /// Everything pushed over the windows still tracked.
    pub total_pushed: i64,
    /// Windows with an event written down but not yet known to be taken.
    pub pending_windows: i64,
    pub pending_value: i64,
    /// Windows whose delta Stripe will never take (older than 35 days).
    pub refused_windows: i64,
    pub refused_value: i64,
    /// The last refusal or failure Stripe gave for one of these windows.
    pub last_error: Option<String>,
}

/// What the worker sums for one meter: billable usage per subject and hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumsQuery {
    pub tenant: String,
    pub subject: SubjectColumn,
    /// Rollup columns added up.
    pub columns: &'static [&'static str],
    pub filters: Vec<(&'static str, String)>,
    /// Half-open, Unix seconds, whole hours.
    pub from: i64,
    pub to: i64,
    /// Only these subjects (the mapped ones).
    pub subjects: Vec<String>,
}

/// One subject's sum over one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourSum {
    pub subject: String,
    pub window_start: i64,
    pub sum: i64,
}

/// The routes' store.
pub trait BillingAdmin: Send + Sync + 'static {
    fn put_mapping(&self, tenant: &str, subject: &str, stripe_customer_id: &str) -> impl Future<Output = Result<()>> + Send;
    fn mapping(&self, tenant: &str, subject: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    fn status(&self, tenant: &str) -> impl Future<Output = Result<Vec<StatusRow>>> + Send;
}

/// The worker's store. Every write is durable when it returns: the worker
/// moves on only after it.
pub trait BillingLedger: Send + Sync + 'static {
    /// The API-set mappings of a tenant.
    fn mappings(&self, tenant: &str) -> impl Future<Output = Result<Vec<Mapping>>> + Send;
    fn sums(&self, q: &SumsQuery) -> impl Future<Output = Result<Vec<HourSum>>> + Send;
    /// The pushed state of a meter's windows from `from` on.
    fn states(&self, tenant: &str, meter: &str, from: i64) -> impl Future<Output = Result<Vec<(String, i64, WindowState)>>> + Send;
    /// Writes `value` down as pending under `seq`, for `stripe_customer_id`.
    fn begin(&self, key: &WindowKey, stripe_customer_id: &str, seq: i64, value: i64) -> impl Future<Output = Result<()>> + Send;
    /// Stripe has the pending value of `seq`: it joins `pushed`.
    fn finish(&self, key: &WindowKey, seq: i64) -> impl Future<Output = Result<()>> + Send;
    /// Records `value` as refused for good (too old), dropping any pending one.
    fn refuse(&self, key: &WindowKey, value: i64, reason: &str) -> impl Future<Output = Result<()>> + Send;
    /// Records why the window's pending event is still pending.
    fn note(&self, key: &WindowKey, error: &str) -> impl Future<Output = Result<()>> + Send;
}
