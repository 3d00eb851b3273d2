//! Every metric ingest exports, named `meterline_ingest_*`, in one place.
//!
//! Labels are bounded: `tenant` comes from configuration (not from requests),
//! `reason` from the closed set of validation codes, `status` from HTTP codes,
//! `field` from the two money fields.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;

pub const REQUESTS: &str = "meterline_ingest_requests_total";
pub const REQUEST_DURATION: &str = "meterline_ingest_request_duration_seconds";
pub const IN_FLIGHT: &str = "meterline_ingest_requests_in_flight";
pub const EVENTS_ACCEPTED: &str = "meterline_ingest_events_accepted_total";
pub const EVENTS_REJECTED: &str = "meterline_ingest_events_rejected_total";
pub const EVENTS_UNPRICED: &str = "meterline_ingest_events_unpriced_total";
pub const BATCH_SIZE: &str = "meterline_ingest_batch_size_events";
pub const PRODUCE_DURATION: &str = "meterline_ingest_produce_duration_seconds";
pub const PRODUCE_FAILURES: &str = "meterline_ingest_produce_failures_total";
pub const CLOUDEVENTS_ROUNDED: &str = "meterline_ingest_cloudevents_rounded_total";

/// Bucket bounds of ingest's histograms other than `*_seconds`.
pub const BUCKETS: &[(&str, &[f64])] = &[(BATCH_SIZE, &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0])];

/// The process-wide Prometheus recorder (shared with any other service in
/// the process), with ingest's metrics described.
pub fn handle() -> PrometheusHandle {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    let handle = meterline_http::install_recorder(BUCKETS);
    DESCRIBED.call_once(describe);
    handle
}

fn describe() {
    describe_counter!(REQUESTS, "HTTP requests to POST /v1/events, by status code.");
    describe_histogram!(REQUEST_DURATION, metrics::Unit::Seconds, "Time to answer POST /v1/events.");
    describe_gauge!(IN_FLIGHT, "Requests to POST /v1/events being processed.");
    describe_counter!(EVENTS_ACCEPTED, "Events acked by Kafka and reported accepted, by tenant.");
    describe_counter!(EVENTS_REJECTED, "Events rejected by validation, by tenant and reason.");
    describe_counter!(EVENTS_UNPRICED, "Accepted events with no cost_usd and no catalog price, by tenant.");
    describe_histogram!(BATCH_SIZE, "Events per request body.");
    describe_histogram!(PRODUCE_DURATION, metrics::Unit::Seconds, "Time from first send to last broker ack, per request.");
    describe_counter!(PRODUCE_FAILURES, "Requests answered 503 because the broker did not ack.");
    describe_counter!(
        CLOUDEVENTS_ROUNDED,
        "Amounts of accepted CloudEvents rounded half to even to the nano, by tenant and field (cost_usd, revenue_usd)."
    );
}

pub fn request(status: u16, seconds: f64) {
    counter!(REQUESTS, "status" => status.to_string()).increment(1);
    histogram!(REQUEST_DURATION).record(seconds);
}

pub fn in_flight(delta: f64) {
    gauge!(IN_FLIGHT).increment(delta);
}

pub fn batch(size: usize) {
    histogram!(BATCH_SIZE).record(size as f64);
}

pub fn accepted(tenant: &str, n: u64, unpriced: u64) {
    counter!(EVENTS_ACCEPTED, "tenant" => tenant.to_owned()).increment(n);
    if unpriced > 0 {
        counter!(EVENTS_UNPRICED, "tenant" => tenant.to_owned()).increment(unpriced);
    }
}

pub fn rejected(tenant: &str, reason: &'static str) {
    counter!(EVENTS_REJECTED, "tenant" => tenant.to_owned(), "reason" => reason).increment(1);
}

pub fn produced(seconds: f64, ok: bool) {
    histogram!(PRODUCE_DURATION).record(seconds);
    if !ok {
        counter!(PRODUCE_FAILURES).increment(1);
    }
}

/// `field` is `cost_usd` or `revenue_usd`: a closed set, from the mapping.
pub fn cloudevents_rounded(tenant: &str, field: &'static str, n: u64) {
    counter!(CLOUDEVENTS_ROUNDED, "tenant" => tenant.to_owned(), "field" => field).increment(n);
}
