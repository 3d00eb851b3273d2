//! Meterline's domain, pure (no I/O, no async runtime): how an event is
//! priced and identified, the dedupe decision, UTC windows and day spans, the
//! registry of summed measures, the runaway rules, and the row types every
//! store reads and writes. Every store and service decides through these.

mod alerts;
mod event;
mod identity;
mod measures;
mod pricing;
mod query;
mod retention;
mod window;

pub use alerts::{AlertBook, AlertRow, AlertRules, AlertState, AlertsConfig, Notice, Periods, Rule, Spend, Transition};
pub use event::{EventRow, Source};
pub use identity::{Decision, fingerprint, key_hash};
pub use measures::{Measure, SumRow, Unit};
pub use query::{Granularity, Metric, TimeColumn};
pub use retention::{Keep, Kept, NotKept, RetentionConfig};
pub use pricing::{CostSource, Priced, price};
pub use window::{DAY_SECS, MINUTE_SECS, SPAN_DAYS, datetime_secs, spans, whole_days, window_start};

/// The crate's one error type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("config key {key}: {message}")]
    Config { key: String, message: String },
}

impl DomainError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        DomainError::Config { key: key.into(), message: message.into() }
    }
}
