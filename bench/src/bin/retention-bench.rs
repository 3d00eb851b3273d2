//! The embedded purge against ingest: request latency while the writer
//! deletes a large back-dated backlog between group commits, beside the
//! same load on the same data without a backlog (the raw baseline), and how
//! fast the backlog goes.
//!
//! `cargo run --release -p meterline-bench --bin retention-bench -- [ROWS] [REQUESTS]`
//! (back-dated events, default 1,000,000; sequential requests of 100 events
//! per run, default 2,000). Prints a table and one `BENCH_JSON {...}` line.

use chrono::{Duration as Days, Utc};
use meterline_tests::{Embedded, event, poll_until, temp_dir};
use serde_json::json;
use std::time::{Duration, Instant};

const BATCH: usize = 100;

fn pct(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
}

/// Back-dates `rows` events (and a minute row per 100) 500 days into the database.
fn backlog(dir: &std::path::Path, rows: usize) -> anyhow::Result<()> {
    let mut conn = rusqlite::Connection::open(dir.join("meterline.db"))?;
    let tx = conn.transaction()?;
    let old = (Utc::now() - Days::days(500)).timestamp();
    {
        let mut e = tx.prepare("INSERT INTO events VALUES ('acme', ?1, 0, ?2, 0, ?3, '', 'chat', 'm', '', '', 1, 10, 10, 0, 0, 5, 0, 0, 0, '', ?2, ?2)")?;
        let mut m = tx.prepare("INSERT OR IGNORE INTO rollups_minute VALUES ('acme', ?1, ?2, '', 'chat', 'm', '', 1, 100, 0, 0, 0, 0, 500, 0, 0, 0)")?;
        for n in 0..rows {
            let t = old + (n / 1_000) as i64;
            e.execute(rusqlite::params![format!("old-{n}"), t, format!("u{}", n % 1_000)])?;
            if n % 100 == 0 {
                m.execute(rusqlite::params![t / 60 * 60 + (n / 100 % 60) as i64, format!("u{}", n % 1_000)])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// `requests` sequential POSTs of 100 events; each request's latency, sorted.
async fn ingest(url: &str, requests: usize, tag: &str) -> anyhow::Result<Vec<Duration>> {
    let client = reqwest::Client::new();
    let mut took = Vec::with_capacity(requests);
    for r in 0..requests {
        let batch: Vec<_> = (0..BATCH)
            .map(|n| {
                let mut e = event(&format!("u{}", n % 50), r * BATCH + n);
                e["idempotency_key"] = json!(format!("{tag}-{r}-{n}"));
                e
            })
            .collect();
        let started = Instant::now();
        let response = client.post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&batch).send().await?;
        anyhow::ensure!(response.status() == 202, "ingest answered {}", response.status());
        took.push(started.elapsed());
    }
    took.sort();
    Ok(took)
}

fn rows(dir: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(dir.join("meterline.db")).and_then(|c| c.query_row(sql, [], |r| r.get(0))).unwrap_or(-1)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (backlog_rows, requests) = (args.first().copied().unwrap_or(1_000_000), args.get(1).copied().unwrap_or(2_000));
    let mut results = Vec::new();
    for with_backlog in [false, true] {
        let dir = temp_dir(if with_backlog { "retention-bench-backlog" } else { "retention-bench-raw" });
        Embedded::start(&dir, "").await.stop().await;
        if with_backlog {
            backlog(&dir, backlog_rows)?;
        }
        let server = Embedded::start(&dir, "").await;
        let started = Instant::now();
        // The backlog's end, seen from beside the load (a read connection, as a query would).
        let watched = dir.clone();
        let purged = tokio::spawn(async move {
            poll_until(Duration::from_secs(600), "the backlog purged", || async {
                (rows(&watched, "SELECT count(*) FROM events WHERE tenant = 'acme' AND idempotency_key >= 'old-' AND idempotency_key < 'old.'") == 0).then_some(())
            })
            .await;
            started.elapsed().as_secs_f64()
        });
        let took = ingest(&server.url, requests, if with_backlog { "b" } else { "r" }).await?;
        let load_secs = started.elapsed().as_secs_f64();
        let left_after_load = rows(&dir, "SELECT count(*) FROM events WHERE tenant = 'acme' AND idempotency_key >= 'old-' AND idempotency_key < 'old.'");
        let purge_secs = purged.await?;
        server.stop().await;
        results.push((with_backlog, took, load_secs, left_after_load, purge_secs));
    }
    println!("{:<10} {:>9} {:>9} {:>9} {:>10} {:>14} {:>10}", "run", "p50 ms", "p99 ms", "max ms", "events/s", "backlog left", "purged in");
    for (with_backlog, took, load_secs, left, purge_secs) in &results {
        let eps = (took.len() * BATCH) as f64 / load_secs;
        let purge = if *with_backlog { format!("{purge_secs:.1} s") } else { "-".to_owned() };
        println!(
            "{:<10} {:>9.2} {:>9.2} {:>9.2} {:>10.0} {:>14} {:>10}",
            if *with_backlog { "purging" } else { "raw" },
            pct(took, 0.5),
            pct(took, 0.99),
            pct(took, 1.0),
            eps,
            left,
            purge
        );
    }
    let (raw, purging) = (&results[0].1, &results[1].1);
    let ratio = |q: f64| pct(purging, q) / pct(raw, q).max(1e-9);
    println!("purging/raw: p50 {:.2}x, p99 {:.2}x, max {:.2}x", ratio(0.5), ratio(0.99), ratio(1.0));
    let backlog_secs = results[1].4;
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "retention",
            "backlog_rows": backlog_rows,
            "requests": requests,
            "raw_p50_ms": pct(raw, 0.5), "raw_p99_ms": pct(raw, 0.99), "raw_max_ms": pct(raw, 1.0),
            "purging_p50_ms": pct(purging, 0.5), "purging_p99_ms": pct(purging, 0.99), "purging_max_ms": pct(purging, 1.0),
            "p99_ratio": ratio(0.99),
            "backlog_purged_secs": backlog_secs,
            "purged_rows_per_s": backlog_rows as f64 / backlog_secs.max(1e-9),
        })
    );
    Ok(())
}
