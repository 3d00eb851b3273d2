//! Every metric the query API exports, named `meterline_query_*`, in one place.
//! Labels: `endpoint` (the route template), `status` and the cache's and
//! refresher's `result`: all bounded. The look-ups counter counts requests
//! only, so it says what requests had to read; the refresher's work is
//! counted apart.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Once;

pub const REQUESTS: &str = "meterline_query_requests_total";
pub const DURATION: &str = "meterline_query_request_duration_seconds";
pub const RANKING_CACHE: &str = "meterline_query_ranking_cache_lookups_total";
pub const RANKING_CACHE_GROUPS: &str = "meterline_query_ranking_cache_groups";
pub const RANKING_REFRESH: &str = "meterline_query_ranking_refreshes_total";
pub const RANKING_REFRESH_PASSES: &str = "meterline_query_ranking_refresh_passes_total";

/// The process-wide recorder (shared with any other service in the
/// process), with the query API's metrics described.
pub fn handle() -> PrometheusHandle {
    let handle = meterline_http::install_recorder(&[]);
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        describe_counter!(REQUESTS, "Query API requests, by endpoint and status.");
        describe_histogram!(DURATION, metrics::Unit::Seconds, "Time to answer, by endpoint.");
        describe_counter!(RANKING_CACHE, "Ranking cache look-ups, by result: hit, slide (a kept range a few hours away, moved), stale (events arrived since), miss.");
        describe_gauge!(RANKING_CACHE_GROUPS, "Groups' sums held by the ranking cache.");
        describe_counter!(
            RANKING_REFRESH,
            "Standing rankings the background refresher looked at, by result: fresh (count unchanged), slide (moved with the clock), reread (events arrived), error."
        );
        describe_counter!(RANKING_REFRESH_PASSES, "Passes of the ranking cache's background refresher.");
    });
    handle
}

/// One answer of `endpoint`, a route template (a bounded set).
pub fn request(endpoint: &str, status: u16, seconds: f64) {
    counter!(REQUESTS, "endpoint" => endpoint.to_owned(), "status" => status.to_string()).increment(1);
    histogram!(DURATION, "endpoint" => endpoint.to_owned()).record(seconds);
}

/// `result`: `hit`, `slide`, `stale` or `miss`.
pub fn ranking_cache(result: &'static str) {
    counter!(RANKING_CACHE, "result" => result).increment(1);
}

pub fn ranking_cache_groups(groups: usize) {
    gauge!(RANKING_CACHE_GROUPS).set(groups as f64);
}

/// `result`: `fresh`, `slide`, `reread` or `error`.
pub fn ranking_refresh(result: &'static str) {
    counter!(RANKING_REFRESH, "result" => result).increment(1);
}

pub fn ranking_refresh_pass() {
    counter!(RANKING_REFRESH_PASSES).increment(1);
}
