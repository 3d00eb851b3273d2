//! The load generator's engine: realistic usage traffic at a fixed rate or
//! as fast as possible, with latency and error accounting and a ground truth
//! (per-user totals) to verify a run against the query API afterwards.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use crate::workload::{self, Totals};

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
    pub seconds: f64,
    pub accepted_per_second: f64,
    pub latency_ms: BTreeMap<String, f64>,
    pub errors_by_status: BTreeMap<u16, usize>,
    pub unique_events: u64,
    pub retries: u64,
    pub conflicts: u64,
}

/// Per-user totals the run must produce (events, tokens, cost, revenue in nano-USD).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UserTruth {
    pub events: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
    pub revenue_nanos: i64,
}

/// Generates the workload (Zipf-spread users, retries, conflicts, late and
/// month-boundary events: see `workload::generate`) and sends it.
pub async fn run(options: &LoadOptions) -> anyhow::Result<(LoadReport, BTreeMap<String, UserTruth>)> {
    let work = workload::generate_with(options.seed, options.actions, options.users, options.batch.max(1), chrono::Utc::now(), options.mix);
    let truth = truth(&work.expected);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Originals first, then retries and conflicting copies: a client never
    // retries before its first attempt was answered.
    let mut all = Vec::new();
    for phase in [&work.originals, &work.copies] {
        let batches = phase.chunks(options.batch.max(1)).map(<[serde_json::Value]>::to_vec).collect();
        all.extend(send(options, batches, &client, started, &sent).await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    report(all, seconds, &work).map(|r| (r, truth))
}

type Sent = (Duration, u16, u64, u64);

async fn send(
    options: &LoadOptions,
    batches: std::collections::VecDeque<Vec<serde_json::Value>>,
    client: &reqwest::Client,
    started: Instant,
    sent: &Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Vec<Sent>> {
    let batches = Arc::new(Mutex::new(batches));
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let (batches, client, sent, o) = (batches.clone(), client.clone(), sent.clone(), options.clone());
        workers.push(tokio::spawn(async move {
            let mut results: Vec<Sent> = Vec::new();
            loop {
                let Some(batch) = batches.lock().await.pop_front() else { break };
                let n = batch.len() as u64;
                if o.rate > 0 {
                    // Pace against the schedule: the k-th event is due at k / rate seconds.
                    let due = started + Duration::from_secs_f64(sent.fetch_add(n, std::sync::atomic::Ordering::SeqCst) as f64 / o.rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let t = Instant::now();
                let response = client.post(format!("{}/v1/events", o.url)).bearer_auth(&o.key).json(&batch).send().await;
                let (status, accepted) = match response {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        (status, body["accepted"].as_u64().unwrap_or(0))
                    }
                    Err(_) => (0, 0),
                };
                results.push((t.elapsed(), status, n, accepted));
            }
            results
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await?);
    }
    Ok(all)
}

fn report(all: Vec<Sent>, seconds: f64, work: &workload::Workload) -> anyhow::Result<LoadReport> {
    let mut latencies: Vec<f64> = all.iter().map(|r| r.0.as_secs_f64() * 1e3).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1))).copied().unwrap_or(0.0);
    let mut errors = BTreeMap::new();
    for r in all.iter().filter(|r| r.1 != 202) {
        *errors.entry(r.1).or_insert(0) += 1;
    }
    let accepted: u64 = all.iter().map(|r| r.3).sum();
    Ok(LoadReport {
        requests: all.len(),
        events_sent: all.iter().map(|r| r.2).sum(),
        events_accepted: accepted,
        seconds,
        accepted_per_second: accepted as f64 / seconds.max(1e-9),
        latency_ms: [("p50", pct(0.5)), ("p90", pct(0.9)), ("p99", pct(0.99)), ("max", pct(1.0))].into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        errors_by_status: errors,
        unique_events: work.unique_events,
        retries: work.retries,
        conflicts: work.conflicts,
    })
}

fn truth(expected: &BTreeMap<(String, i64), Totals>) -> BTreeMap<String, UserTruth> {
    let mut out: BTreeMap<String, UserTruth> = BTreeMap::new();
    for ((user, _), t) in expected {
        let u = out.entry(user.clone()).or_default();
        u.events += t.events;
        u.tokens += t.input_tokens + t.output_tokens + t.cached_input_tokens + t.reasoning_tokens;
        u.cost_nanos += t.cost_nanos;
        u.revenue_nanos += t.revenue_nanos;
    }
    out
}
