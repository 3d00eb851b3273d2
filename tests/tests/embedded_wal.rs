//! The all-in-one's WAL stays bounded under sustained writes: with a small
//! `storage.wal_limit_mb`, concurrent clients writing many times the limit
//! never see the WAL file grow past a few commits over it, and every event
//! they were answered 202 for is stored.

use meterline_tests::*;
use rusqlite::Connection;
use serde_json::{Value, json};
use std::path::Path;

const INGEST: &str = "acme-ingest-key";
const CLIENTS: usize = 6;
const BATCHES: usize = 12;
const BATCH: usize = 500;
/// `storage.wal_limit_mb` below: the file is checked between commits, so it
/// may pass the limit by what the commits since the last check wrote (more
/// than one when the checkpoint thread's pass held the lock at a check). The
/// run of these 36,000 events without the writer's checkpoints peaked at 67 MiB.
const LIMIT_MB: u64 = 1;
const BOUND_BYTES: u64 = 16 << 20;

fn batch(client: usize, n: usize) -> Vec<Value> {
    let now = chrono::Utc::now();
    (0..BATCH)
        .map(|i| {
            json!({
                "idempotency_key": format!("wal-{client}-{n}-{i}"),
                "timestamp": (now - chrono::Duration::seconds(i as i64)).to_rfc3339(),
                "user_id": format!("u-{}", (client * 7_919 + n * 131 + i) % 2_000),
                "customer_id": format!("c-{}", i % 20),
                "feature": if i % 2 == 0 { "chat" } else { "search" },
                "model": "gpt-4o",
                "input_tokens": 100 + i,
                "output_tokens": 10 + i % 50,
            })
        })
        .collect()
}

fn wal_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("meterline.db-wal")).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wal_stays_near_its_limit_under_sustained_writes() {
    let dir = temp_dir("embedded-wal");
    let server = Embedded::start(&dir, &format!("[storage]\nwal_limit_mb = {LIMIT_MB}\nmax_commit_events = 1000\n")).await;
    let clients = (0..CLIENTS).map(|client| {
        let (url, dir) = (server.url.clone(), dir.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            // The WAL's length after each answer: it only grows between
            // restarts, so the largest seen is where it peaked.
            let mut peak = 0;
            for n in 0..BATCHES {
                let r = http.post(format!("{url}/v1/events")).bearer_auth(INGEST).json(&batch(client, n)).send().await.expect("post");
                assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
                peak = peak.max(wal_len(&dir));
            }
            peak
        })
    });
    let mut peak = 0;
    for client in clients.collect::<Vec<_>>() {
        peak = peak.max(client.await.expect("client"));
    }
    let conn = Connection::open(dir.join("meterline.db")).expect("open");
    let stored: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).expect("count");
    assert_eq!(stored, (CLIENTS * BATCHES * BATCH) as i64, "every answered event is stored");
    eprintln!("WAL peak {peak} bytes, limit {LIMIT_MB} MiB, {stored} events");
    assert!(peak > 0, "the WAL was written");
    assert!(peak <= BOUND_BYTES, "the WAL peaked at {peak} bytes, past {BOUND_BYTES} (limit {LIMIT_MB} MiB)");
    server.stop().await;
}
