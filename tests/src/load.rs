//! The load generator's engine: realistic usage traffic at a fixed rate or
//! as fast as possible, streamed (events are made batch by batch as they are
//! sent, so memory does not grow with the run's length), with latency and
//! error accounting and a ground truth (running per-user sums) to verify a
//! run against the query API afterwards.

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::workload;
use source::Source;

mod source;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub url: String,
    pub key: String,
    /// Distinct actions (retries and conflicting copies come on top).
    pub actions: usize,
    pub users: usize,
    pub batch: usize,
    pub concurrency: usize,
    /// Events per second across all workers; 0 sends as fast as possible.
    pub rate: u64,
    pub seed: u64,
    /// Retries, conflicting copies, late events and the runaway user.
    pub mix: workload::Mix,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub events_sent: u64,
    pub events_accepted: u64,
    /// Events sent and not accepted (rejected by validation, or in a request
    /// that failed).
    pub events_rejected: u64,
    pub seconds: f64,
    pub accepted_per_second: f64,
    pub latency_ms: BTreeMap<String, f64>,
    /// Final answers other than 202, by status (after resending).
    pub errors_by_status: BTreeMap<u16, usize>,
    /// Retryable answers (503, 429, a dropped connection) that were sent
    /// again with the same keys.
    pub requests_resent: u64,
    pub unique_events: u64,
    pub retries: u64,
    pub conflicts: u64,
    /// The tenant's totals the run must produce: the sum of the per-user truth.
    pub truth_total: UserTruth,
}

/// Per-user totals the run must produce (events, tokens, cost, revenue in nano-USD).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UserTruth {
    pub events: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
    pub revenue_nanos: i64,
}

impl UserTruth {
    fn add(&mut self, tokens: u64, cost_nanos: i64, revenue_nanos: i64) {
        self.events += 1;
        self.tokens += tokens;
        self.cost_nanos += cost_nanos;
        self.revenue_nanos += revenue_nanos;
    }
}

/// Sends the workload without progress lines; see [`run_with_progress`].
pub async fn run(options: &LoadOptions) -> anyhow::Result<(LoadReport, BTreeMap<String, UserTruth>)> {
    run_with_progress(options, None).await
}

/// Generates the workload lazily, batch by batch (the shape of
/// `workload::generate_with`: Zipf-spread users, retries, conflicts, late
/// and month-boundary events, the runaway user), sends it with at most
/// `concurrency` requests in flight, and prints a progress line to stderr
/// every `progress` if given. Memory is bounded by the users, the batch and
/// the concurrency, never by the number of actions.
pub async fn run_with_progress(options: &LoadOptions, progress: Option<Duration>) -> anyhow::Result<(LoadReport, BTreeMap<String, UserTruth>)> {
    let batch = options.batch.max(1);
    let concurrency = options.concurrency.max(1);
    let mut source = Source::new(options, Utc::now());
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", options.url);
    let started = Instant::now();
    let mut stats = Stats::default();
    let mut in_flight: tokio::task::JoinSet<(u64, Posted)> = tokio::task::JoinSet::new();
    let every = progress.filter(|d| !d.is_zero());
    let mut next_progress = started + every.unwrap_or(Duration::ZERO);
    let mut last_progress = (started, 0u64);
    loop {
        if !source.has_more() && in_flight.is_empty() {
            break;
        }
        // Pace against the schedule: the k-th event is due at k / rate seconds.
        let due = if options.rate > 0 { started + Duration::from_secs_f64(stats.sent as f64 / options.rate as f64) } else { started };
        let may_send = in_flight.len() < concurrency && source.can_build();
        tokio::select! {
            biased;
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let (id, posted) = done?;
                source.answered(id);
                stats.record(&posted);
            }
            () = tokio::time::sleep_until(next_progress.into()), if every.is_some() => {
                let now = Instant::now();
                let (at, accepted) = last_progress;
                let recent = (stats.accepted - accepted) as f64 / now.duration_since(at).as_secs_f64().max(1e-9);
                eprintln!("{}", stats.progress_line(now.duration_since(started).as_secs_f64(), recent, in_flight.len()));
                last_progress = (now, stats.accepted);
                next_progress += every.unwrap_or(Duration::ZERO);
            }
            () = tokio::time::sleep_until(due.into()), if may_send => {
                let (id, events) = source.build(batch, Utc::now());
                stats.sent += events.len() as u64;
                let (client, url, key) = (client.clone(), url.clone(), options.key.clone());
                in_flight.spawn(async move { (id, post(&client, &url, &key, &events).await) });
            }
            else => anyhow::bail!("the load generator stalled: nothing in flight and nothing to send"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let (truth, total) = source.truth();
    let report = LoadReport {
        requests: stats.requests,
        events_sent: stats.sent,
        events_accepted: stats.accepted,
        events_rejected: stats.rejected,
        seconds,
        accepted_per_second: stats.accepted as f64 / seconds.max(1e-9),
        latency_ms: [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)].into_iter().map(|(k, q)| (k.to_owned(), stats.latency.quantile_ms(q))).collect(),
        errors_by_status: stats.errors,
        requests_resent: stats.resent,
        unique_events: source.next_action as u64,
        retries: source.retries,
        conflicts: source.conflicts,
        truth_total: total,
    };
    Ok((report, truth))
}

/// One request's outcome.
#[derive(Debug)]
struct Posted {
    latency: Duration,
    /// The last answer's status; 0 when no HTTP answer came (connection
    /// refused, reset, timeout).
    status: u16,
    events: u64,
    accepted: u64,
    /// Attempts that got a retryable answer and were sent again.
    resent: u64,
}

/// How long one batch is resent after retryable answers before it counts
/// as rejected.
const RESEND_FOR: Duration = Duration::from_secs(600);

/// Whether an answer means "try again later": the request's events are
/// neither stored nor refused for a reason of their own.
fn retryable(status: u16) -> bool {
    matches!(status, 0 | 408 | 429 | 500 | 502 | 503 | 504)
}

/// Posts one batch as a well-behaved client does: a retryable answer (a
/// `503` while the broker is away, a dropped connection) is resent with the
/// same idempotency keys after `Retry-After` or a doubling backoff, so the
/// ground truth holds across outages; it gives up after [`RESEND_FOR`].
async fn post(client: &reqwest::Client, url: &str, key: &str, events: &[Value]) -> Posted {
    let t = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut resent = 0;
    loop {
        let response = client.post(url).bearer_auth(key).json(events).send().await;
        let (status, accepted, retry_after) = match response {
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after = r.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).map(Duration::from_secs);
                let body: Value = r.json().await.unwrap_or_default();
                (status, body["accepted"].as_u64().unwrap_or(0), retry_after)
            }
            Err(_) => (0, 0, None),
        };
        if !retryable(status) || t.elapsed() >= RESEND_FOR {
            return Posted { latency: t.elapsed(), status, events: events.len() as u64, accepted, resent };
        }
        resent += 1;
        tokio::time::sleep(retry_after.unwrap_or(backoff).min(Duration::from_secs(5))).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Running counters: everything the report and the progress lines need, in
/// constant space.
#[derive(Debug, Default)]
struct Stats {
    requests: usize,
    sent: u64,
    answered: u64,
    accepted: u64,
    rejected: u64,
    resent: u64,
    errors: BTreeMap<u16, usize>,
    latency: Histogram,
}

impl Stats {
    fn record(&mut self, p: &Posted) {
        self.requests += 1;
        self.answered += p.events;
        self.accepted += p.accepted;
        self.rejected += p.events.saturating_sub(p.accepted);
        self.resent += p.resent;
        if p.status != 202 {
            *self.errors.entry(p.status).or_insert(0) += 1;
        }
        self.latency.record(p.latency);
    }

    fn progress_line(&self, elapsed: f64, recent_per_second: f64, in_flight: usize) -> String {
        let mut errors = if self.errors.is_empty() { String::new() } else { format!(", errors by status {:?}", self.errors) };
        if self.resent > 0 {
            errors += &format!(", {} requests resent", self.resent);
        }
        format!(
            "meterline-load: {elapsed:.1} s: sent {} accepted {} rejected {}, {:.0} accepted/s ({:.0} since the last line), request p99 {:.1} ms, {in_flight} in flight{errors}",
            self.sent,
            self.accepted,
            self.rejected,
            self.accepted as f64 / elapsed.max(1e-9),
            recent_per_second,
            self.latency.quantile_ms(0.99),
        )
    }
}

/// Request latencies in microseconds, log-linear: exact below 128 µs, then
/// 128 buckets per power of two (under 1% error), so percentiles stay
/// available at any run length in ~60 KiB.
#[derive(Debug)]
struct Histogram {
    counts: Vec<u64>,
    n: u64,
    max: Duration,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; Self::index(u64::MAX) + 1], n: 0, max: Duration::ZERO }
    }
}

impl Histogram {
    const SUB: u32 = 7;

    fn index(micros: u64) -> usize {
        if micros < 1 << Self::SUB {
            return micros as usize;
        }
        let exp = 63 - micros.leading_zeros();
        let sub = (micros >> (exp - Self::SUB)) & ((1 << Self::SUB) - 1);
        ((exp - Self::SUB + 1) as usize) * (1 << Self::SUB) + sub as usize
    }

    /// The smallest value of bucket `i`, in microseconds.
    /// (In u128: the bucket past the last one starts at 2^64.)
    fn lower(i: usize) -> u128 {
        let per = 1usize << Self::SUB;
        if i < per {
            return i as u128;
        }
        let exp = (i / per) as u32 + Self::SUB - 1;
        ((per + i % per) as u128) << (exp - Self::SUB)
    }

    fn record(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[Self::index(micros)] += 1;
        self.n += 1;
        self.max = self.max.max(d);
    }

    /// The `q` quantile in milliseconds, as the old sorted-list report took
    /// it (the value at rank floor(n q), 0-based, capped at the last); the max exactly.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        if q >= 1.0 {
            return self.max.as_secs_f64() * 1e3;
        }
        let rank = ((self.n as f64 * q) as u64).min(self.n - 1) + 1;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The bucket's midpoint, never above the true maximum.
                let (lo, hi) = (Self::lower(i), Self::lower(i + 1));
                let mid = (lo + hi) as f64 / 2.0 / 1e3;
                return mid.min(self.max.as_secs_f64() * 1e3);
            }
        }
        self.max.as_secs_f64() * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        for v in [0u64, 1, 127, 128, 129, 255, 256, 1_000, 12_345, 999_999, 1 << 40] {
            let i = Histogram::index(v);
            let v = u128::from(v);
            assert!(Histogram::lower(i) <= v && v < Histogram::lower(i + 1), "{v}");
            assert!((Histogram::lower(i + 1) - Histogram::lower(i)) as f64 <= (v as f64 / 100.0).max(1.0), "{v}");
        }
    }
}
