//! What can go wrong syncing to Stripe, typed for callers to classify.

/// A billing error.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// The store failed; the cycle stops and the next one starts over.
    #[error("billing store: {0}")]
    Store(String),
    /// Stripe did not take an event after every retry.
    #[error("Stripe unavailable: {0}")]
    Unavailable(String),
}
