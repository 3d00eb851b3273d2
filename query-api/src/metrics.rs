//! Every metric the query API exports, named `meterline_query_*`, in one place.
//! Labels: `endpoint` (the route template) and `status`: both bounded.

use metrics::{counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const REQUESTS: &str = "meterline_query_requests_total";
pub const DURATION: &str = "meterline_query_request_duration_seconds";

pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            describe_counter!(REQUESTS, "Query API requests, by endpoint and status.");
            describe_histogram!(DURATION, metrics::Unit::Seconds, "Time to answer, by endpoint.");
            handle
        })
        .clone()
}

pub fn request(endpoint: &'static str, status: u16, seconds: f64) {
    counter!(REQUESTS, "endpoint" => endpoint, "status" => status.to_string()).increment(1);
    histogram!(DURATION, "endpoint" => endpoint).record(seconds);
}
