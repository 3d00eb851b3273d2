//! The process-wide Prometheus recorder: installed once, shared by every
//! server in the process (the all-in-one binary, tests running several).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Buckets of every `*_seconds` histogram.
const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The recorder, installed on first use with `buckets` (full metric name and
/// bucket bounds) beside the shared seconds buckets. The first caller's
/// buckets win: each service's crate passes its own, and a process that runs
/// several services calls each, so all are passed before anything records.
///
/// The recorder keeps every histogram sample until it is folded into the
/// buckets, which only a render or an upkeep does: without a scrape, a
/// service's memory would grow with every request (the soak saw ingest climb
/// 19 -> 30 MiB in an hour, its `/metrics` never read). So a thread runs the
/// upkeep every [`UPKEEP_EVERY`] for the life of the process.
pub fn install(buckets: &[(&str, &[f64])]) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    static BUCKETS: std::sync::Mutex<Vec<(String, Vec<f64>)>> = std::sync::Mutex::new(Vec::new());
    BUCKETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(buckets.iter().map(|(n, b)| ((*n).to_owned(), b.to_vec())));
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            let all = BUCKETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            for (name, bounds) in std::iter::once(("_seconds".to_owned(), SECONDS.to_vec())).chain(all) {
                let matcher = if name == "_seconds" { Matcher::Suffix(name) } else { Matcher::Full(name) };
                builder = match builder.set_buckets_for_metric(matcher, &bounds) {
                    Ok(b) => b,
                    // Only an empty bucket list is refused, and every list here is constant.
                    Err(_) => PrometheusBuilder::new(),
                };
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding
            // process); then this handle renders what was recorded through
            // it, which is nothing.
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the metrics upkeep thread; histograms are folded only when /metrics is read");
            }
            handle
        })
        .clone()
}
