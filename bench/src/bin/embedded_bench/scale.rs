//! The embedded bench's scale row: a store filled with STORED events (the
//! raw loop, the same rows and rollups a real run leaves, spread over ~10,000
//! users and the last 30 days), then the all-in-one over it, offered 10,000
//! events/s (batches of 500, 4 clients, the load generator's default mix) for
//! OFFER_SECS, and the queries timed over the grown store.

use meterline_tests::load::{self, LoadOptions};
use meterline_tests::workload::Mix;
use meterline_tests::{Embedded, temp_dir};
use serde_json::json;
use std::time::Instant;

use super::{migrated, power_law_user, raw, raw_event, time_queries};

const USERS: usize = 10_000;
/// How many events each fill transaction holds.
const FILL_BATCH: usize = 20_000;

/// Fills (or reuses) the store, offers the load, times the queries.
pub async fn run(stored: usize, offer_secs: usize, runs: usize, queries: &[(&str, String)]) -> anyhow::Result<serde_json::Value> {
    let keep = std::env::var_os("BENCH_SCALE_DIR").map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| temp_dir("embedded-bench-scale"));
    if !dir.join("meterline.db").exists() {
        std::fs::create_dir_all(&dir)?;
        let mut conn = migrated(&dir).await?;
        let now = chrono::Utc::now().timestamp();
        let batches = (0..stored).step_by(FILL_BATCH).map(move |start| {
            (start..(start + FILL_BATCH).min(stored))
                .map(|i| {
                    // Spread over the last 30 days (minutes apart), users on the stream's power law.
                    let back = (i.wrapping_mul(7_919) % (30 * 1_440)) as i64 * 60 + 120;
                    raw_event(i, "fill", power_law_user(i, USERS), now - back)
                })
                .collect()
        });
        let started = Instant::now();
        let (rate, n) = tokio::task::block_in_place(|| raw::write(&mut conn, batches))?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        println!("embedded-bench: filled {n} events in {:.0} s ({rate:.0} events/s)", started.elapsed().as_secs_f64());
    }
    let server = Embedded::start(&dir, "[server]\nmax_in_flight_requests = 64\n").await;
    let options = LoadOptions {
        url: server.url.clone(),
        key: "acme-ingest-key".into(),
        actions: 10_000 * offer_secs,
        users: USERS,
        batch: 500,
        concurrency: 4,
        rate: 10_000,
        seed: std::process::id().into(),
        mix: Mix::default(),
    };
    let (report, _) = load::run(&options).await?;
    let (p99, max) = (report.latency_ms.get("p99").copied().unwrap_or(0.0), report.latency_ms.get("max").copied().unwrap_or(0.0));
    println!(
        "embedded-bench: {stored} events stored, 10,000 events/s offered for {offer_secs} s: accepted {:.0} events/s, request p99 {p99:.0} ms, max {max:.0} ms, errors {:?}",
        report.accepted_per_second, report.errors_by_status
    );
    println!("| query (30 days, {stored} events stored, {USERS} users) | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    let results = time_queries(&server.url, queries, runs).await?;
    server.stop().await;
    let db_bytes: u64 = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!("embedded-bench: scale store {:.1} MiB on disk", db_bytes as f64 / 1_048_576.0);
    if keep.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(json!({
        "stored": stored,
        "offered_per_sec": 10_000,
        "accepted_per_sec": report.accepted_per_second,
        "request_p99_ms": p99,
        "request_max_ms": max,
        "queries": results,
        "db_bytes": db_bytes,
    }))
}
