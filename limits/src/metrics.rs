//! The limits metrics, defined in one place; labels are bounded (outcomes and operations, never subjects).

/// Reservations answered, by outcome (`allowed`, `denied`, `degraded_allowed`, `degraded_denied`).
pub const RESERVATIONS: &str = "meterline_limits_reservations_total";
/// Commits that metered their event.
pub const COMMITS: &str = "meterline_limits_commits_total";
pub const RELEASES: &str = "meterline_limits_releases_total";
/// Store calls that failed or timed out, by operation.
pub const STORE_ERRORS: &str = "meterline_limits_store_errors_total";
/// Flushes of counted events applied to the store (distributed), and how many were already applied.
pub const APPLIED: &str = "meterline_limits_applied_batches_total";

pub(crate) fn reservation(outcome: &'static str) {
    metrics::counter!(RESERVATIONS, "outcome" => outcome).increment(1);
}

pub(crate) fn commit() {
    metrics::counter!(COMMITS).increment(1);
}

pub(crate) fn release() {
    metrics::counter!(RELEASES).increment(1);
}

pub fn store_error(operation: &'static str) {
    metrics::counter!(STORE_ERRORS, "operation" => operation).increment(1);
}

/// `outcome`: `applied` or `already` (a re-applied flush that changed nothing).
pub fn applied(outcome: &'static str) {
    metrics::counter!(APPLIED, "outcome" => outcome).increment(1);
}
