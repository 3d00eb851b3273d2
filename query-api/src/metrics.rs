//! Every metric the query API exports, named `meterline_query_*`, in one place.
//! Labels: `endpoint` (the route template) and `status`: both bounded.

use metrics::{counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Once;

pub const REQUESTS: &str = "meterline_query_requests_total";
pub const DURATION: &str = "meterline_query_request_duration_seconds";

/// The process-wide recorder. It is ingest's (same `_seconds` buckets), so a
/// process running both services renders both services' metrics.
pub fn handle() -> PrometheusHandle {
    let handle = meterline_ingest::metrics::handle();
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        describe_counter!(REQUESTS, "Query API requests, by endpoint and status.");
        describe_histogram!(DURATION, metrics::Unit::Seconds, "Time to answer, by endpoint.");
    });
    handle
}

pub fn request(endpoint: &'static str, status: u16, seconds: f64) {
    counter!(REQUESTS, "endpoint" => endpoint, "status" => status.to_string()).increment(1);
    histogram!(DURATION, "endpoint" => endpoint).record(seconds);
}
