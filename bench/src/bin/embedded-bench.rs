//! The embedded mode's limits on this machine: sustained ingest through the
//! real HTTP path into SQLite (group commits, dedupe, both rollups, alerts),
//! then query latency with USERS users' history over DAYS days loaded the same way;
//! beside it the raw SQLite baseline (`raw`: the same rows by a plain loop) and
//! their ratio; and, with STORED > 0, the scale row: STORED events written
//! into the store first, then 10,000 events/s offered and the queries timed.
//!
//! `cargo run --release -p meterline-bench --bin embedded-bench -- [EVENTS] [USERS] [DAYS] [RUNS] [STORED] [OFFER_SECS]`
//! (no stack needed). Prints tables and one `BENCH_JSON {...}` line.
//! `BENCH_SCALE_DIR`: keep (and reuse, if already filled) the scale row's store there.

#[path = "embedded_bench/raw.rs"]
mod raw;
#[path = "embedded_bench/scale.rs"]
mod scale;

use meterline_tests::{Embedded, get_json, temp_dir};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BATCH: usize = 1_000;
const CONCURRENCY: usize = 4;
const FEATURES: [&str; 3] = ["chat", "search", "summarize"];
const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"];

/// Pre-serialized batch bodies, so the client's JSON work is not timed.
fn bodies(events: usize, users: usize, days: i64, tag: &str) -> Vec<bytes_body::Body> {
    let now = chrono::Utc::now();
    let mut out = Vec::new();
    let mut n = 0usize;
    while n < events {
        let batch: Vec<serde_json::Value> = (n..(n + BATCH).min(events))
            .map(|i| {
                // History mode spreads user-days evenly; stream mode is the last minute.
                let (user, at) = if days > 0 {
                    let day = (i / users) as i64 % days;
                    (i % users, now - chrono::Duration::days(day) - chrono::Duration::minutes(2 + (i % 600) as i64))
                } else {
                    (power_law_user(i, users), now - chrono::Duration::minutes(1))
                };
                json!({
                    "idempotency_key": format!("{tag}-{i}"),
                    "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "user_id": format!("user-{user}"),
                    "customer_id": format!("cust-{}", user % 97),
                    "feature": FEATURES[i % 3],
                    "model": MODELS[i % 3],
                    "input_tokens": 500 + i % 3_000,
                    "output_tokens": 100 + i % 700,
                    "credits": "1.5",
                })
            })
            .collect();
        n += batch.len();
        out.push(bytes_body::Body(serde_json::to_vec(&batch).expect("json"), batch.len()));
    }
    out
}

mod bytes_body {
    /// A request body and how many events it holds.
    #[derive(Debug, Clone)]
    pub struct Body(pub Vec<u8>, pub usize);
}

/// Posts every body with `CONCURRENCY` clients: events/s and request latencies.
async fn post_all(url: &str, bodies: Vec<bytes_body::Body>) -> (f64, Vec<Duration>) {
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (bodies, next, url) = (bodies.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { return times };
                let t = Instant::now();
                let r = client
                    .post(format!("{url}/v1/events"))
                    .bearer_auth("acme-ingest-key")
                    .header("content-type", "application/json")
                    .body(body.0.clone())
                    .send()
                    .await
                    .expect("post");
                assert_eq!(r.status(), 202, "batch refused");
                times.push(t.elapsed());
            }
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.expect("poster"));
    }
    let events: usize = bodies.iter().map(|b| b.1).sum();
    times.sort();
    (events as f64 / started.elapsed().as_secs_f64(), times)
}

fn pct(times: &[Duration], q: f64) -> f64 {
    times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1e3
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Times each query `runs` times after one warm-up: p50 and p99 per query, printed as table rows.
pub(crate) async fn time_queries(base: &str, queries: &[(&str, String)], runs: usize) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut results = serde_json::Map::new();
    for (name, path) in queries {
        let url = format!("{base}{path}");
        let (status, _) = get_json(&url, Some("acme-read-key")).await;
        anyhow::ensure!(status == 200, "{name}: {status}");
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let (status, _) = get_json(&url, Some("acme-read-key")).await;
            anyhow::ensure!(status == 200, "{name}: {status}");
            times.push(t.elapsed());
        }
        times.sort();
        println!("| {name} | {:.1} | {:.1} |", pct(&times, 0.5), pct(&times, 0.99));
        results.insert(name.to_string(), json!({"p50_ms": pct(&times, 0.5), "p99_ms": pct(&times, 0.99)}));
    }
    Ok(results)
}

/// A fresh store the all-in-one migrated (started and stopped once), for raw writes.
pub(crate) async fn migrated(dir: &std::path::Path) -> anyhow::Result<rusqlite::Connection> {
    Embedded::start(dir, "").await.stop().await;
    Ok(raw::open(&dir.join("meterline.db"))?)
}

/// The stream's events (same users, power law, times) as raw rows, in batches.
fn raw_stream(events: usize, tag: &'static str) -> impl Iterator<Item = Vec<raw::RawEvent>> {
    let at = (chrono::Utc::now() - chrono::Duration::minutes(1)).timestamp();
    (0..events).step_by(BATCH).map(move |start| (start..(start + BATCH).min(events)).map(|i| raw_event(i, tag, power_law_user(i, 10_000), at)).collect())
}

/// User k of `users` with weight 1/(k+1), as the stream spreads them.
pub(crate) fn power_law_user(i: usize, users: usize) -> usize {
    let k = ((i.wrapping_mul(2_654_435_761) % 1_000_003) as f64 / 1_000_003.0 * 9.21).exp() as usize - 1;
    k.min(users - 1)
}

pub(crate) fn raw_event(i: usize, tag: &str, user: usize, at: i64) -> raw::RawEvent {
    raw::RawEvent {
        key: format!("{tag}-{i}"),
        at,
        user: format!("user-{user}"),
        customer: format!("cust-{}", user % 97),
        feature: FEATURES[i % 3],
        model: MODELS[i % 3],
        input: 500 + (i % 3_000) as i64,
        output: 100 + (i % 700) as i64,
    }
}

/// The raw baseline over a fresh migrated store: events/s.
async fn raw_baseline(events: usize) -> anyhow::Result<f64> {
    let dir = temp_dir("embedded-bench-raw");
    let mut conn = migrated(&dir).await?;
    let (rate, _) = tokio::task::block_in_place(|| raw::write(&mut conn, raw_stream(events, "s")))?;
    drop(conn);
    std::fs::remove_dir_all(&dir)?;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let events = args.first().copied().unwrap_or(300_000);
    let users = args.get(1).copied().unwrap_or(10_000);
    let days = args.get(2).copied().unwrap_or(30) as i64;
    let runs = args.get(3).copied().unwrap_or(50);
    let stored = args.get(4).copied().unwrap_or(0);
    let offer_secs = args.get(5).copied().unwrap_or(60);
    let dir = temp_dir("embedded-bench");
    let extra = format!("[server]\nmax_in_flight_requests = 64\n{}", std::env::var("BENCH_EXTRA").unwrap_or_default().replace("\\n", "\n"));
    let server = Embedded::start(&dir, &extra).await;

    // 1. Sustained ingest: acked events/s, every event durable before its 202.
    let stream = bodies(events, 10_000, 0, "s");
    let (rate, times) = post_all(&server.url, stream).await;
    println!(
        "embedded-bench: ingest {events} events in batches of {BATCH}, {CONCURRENCY} concurrent: {rate:.0} events/s, request p50 {:.1} ms p99 {:.1} ms",
        pct(&times, 0.5),
        pct(&times, 0.99)
    );

    // 1b. The raw store on the same machine: the same count of events, rows and upserts.
    let raw_rate = raw_baseline(events).await?;
    println!("embedded-bench: raw SQLite baseline {raw_rate:.0} events/s (one transaction per {BATCH}); embedded/raw {:.2}", rate / raw_rate);

    // 2. History: every user on every day, through the same path.
    let history = bodies(users * days as usize, users, days, "h");
    let loaded = Instant::now();
    let (history_rate, _) = post_all(&server.url, history).await;
    println!("embedded-bench: history {users} users x {days} days loaded in {:.1} s ({history_rate:.0} events/s)", loaded.elapsed().as_secs_f64());

    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(30)).format("%Y-%m-%dT%H:%M:%SZ");
    let to = (now + chrono::Duration::minutes(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let queries = [
        ("top_spenders", format!("/v1/top-spenders?metric=cost&limit=100&from={from}&to={to}")),
        ("margins", format!("/v1/margins?group_by=user_id&limit=100&from={from}&to={to}")),
        ("user_usage", format!("/v1/users/user-42/usage?from={from}&to={to}")),
        ("usage_day_model", format!("/v1/usage?granularity=day&group_by=model&from={from}&to={to}")),
    ];
    println!("| query (30 days, {users} users) | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    let results = time_queries(&server.url, &queries, runs).await?;
    let db_bytes: u64 = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!("embedded-bench: database {:.1} MiB on disk, process peak RSS {} MiB", db_bytes as f64 / 1_048_576.0, rss_kib("VmHWM:") / 1024);
    server.stop().await;
    let scale = if stored > 0 { Some(scale::run(stored, offer_secs, runs, &queries).await?) } else { None };
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "embedded",
            "ingest_events_per_sec": rate,
            "ingest_p50_ms": pct(&times, 0.5),
            "ingest_p99_ms": pct(&times, 0.99),
            "raw_events_per_sec": raw_rate,
            "embedded_over_raw": rate / raw_rate,
            "scale": scale,
            "history_events_per_sec": history_rate,
            "users": users,
            "days": days,
            "queries": results,
            "db_bytes": db_bytes,
            "peak_rss_kib": rss_kib("VmHWM:"),
        })
    );
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("embedded-bench: kept {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
