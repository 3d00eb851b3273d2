//! The all-in-one binary as a real process: SIGKILL during sustained ingest
//! loses no acknowledged event and counts none twice; a restart keeps the
//! data, the generated keys and the open alerts.

use meterline_tests::stack::Process;
use meterline_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PER_BATCH: usize = 100;

/// Batch `b`: 100 events of user `u-b`, input tokens 1..=100 (5,050 in all).
fn batch(b: usize) -> Vec<Value> {
    let at = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    (0..PER_BATCH)
        .map(|i| json!({"idempotency_key": format!("k-{b}-{i}"), "timestamp": at, "user_id": format!("u-{b}"), "feature": "chat", "model": "gpt-4o", "input_tokens": i + 1}))
        .collect()
}

async fn ready(url: &str) {
    poll_until(Duration::from_secs(60), "the embedded server to be ready", || async {
        match reqwest::get(format!("{url}/readyz")).await {
            Ok(r) if r.status().is_success() => Some(()),
            _ => None,
        }
    })
    .await;
}

/// Starts the binary with the test tenants in a config file in `dir` and its
/// data in `dir/data`, and waits until it is ready; the process and its URL.
async fn start_with_tenants(dir: &std::path::Path) -> (Process, String) {
    let port = free_port();
    let config = dir.join("test.toml");
    std::fs::write(&config, format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{}", tenants_toml())).expect("config");
    let data = dir.join("data");
    let args: [&OsStr; 4] = ["--config".as_ref(), config.as_os_str(), "--data-dir".as_ref(), data.as_os_str()];
    let server = Process::start_args("meterline", &args);
    let url = format!("http://127.0.0.1:{port}");
    ready(&url).await;
    (server, url)
}

/// Events and input tokens per user, from the query API.
async fn per_user(url: &str, key: &str) -> BTreeMap<String, (u64, u64)> {
    let now = chrono::Utc::now();
    let range = format!("from={}&to={}", (now - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ"), (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ"));
    let (status, body) = get_json(&format!("{url}/v1/usage?granularity=total&group_by=user_id&limit=100000&{range}"), Some(key)).await;
    assert_eq!(status, 200, "{body}");
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["user_id"].as_str().expect("user").to_owned(), (r["events"].as_u64().expect("n"), r["input_tokens"].as_u64().expect("n"))))
        .collect()
}

#[tokio::test]
async fn sigkill_during_ingest_loses_no_acked_event_and_counts_none_twice() {
    let dir = temp_dir("embedded-kill");
    let (mut server, url) = start_with_tenants(&dir).await;

    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let mut posters = Vec::new();
    for _ in 0..4 {
        let (next, stop, acked, attempted, url) = (next.clone(), stop.clone(), acked.clone(), attempted.clone(), url.clone());
        posters.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                let b = next.fetch_add(1, Ordering::SeqCst);
                attempted.lock().expect("lock").insert(b);
                let sent = client.post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&batch(b)).send().await;
                match sent {
                    Ok(r) if r.status() == 202 => {
                        acked.lock().expect("lock").insert(b);
                    }
                    // Refused connections after the kill: not acked, so the client retries later.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    poll_until(Duration::from_secs(120), "sustained ingest to ack 40 batches", || async { (acked.lock().expect("lock").len() >= 40).then_some(()) }).await;
    server.kill().await;
    // Requests in flight at the kill get errors; give the posters a moment to see them, then stop.
    poll_until(Duration::from_secs(30), "posters to notice the dead server", || async {
        let a = attempted.lock().expect("lock").len();
        let k = acked.lock().expect("lock").len();
        (a > k).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for p in posters {
        p.await.expect("poster");
    }
    let acked: BTreeSet<usize> = acked.lock().expect("lock").clone();
    let attempted: BTreeSet<usize> = attempted.lock().expect("lock").clone();
    assert!(attempted.len() > acked.len(), "some batches must have been in flight at the kill");

    server.restart();
    ready(&url).await;
    let counts = per_user(&url, "acme-read-key").await;
    for b in &attempted {
        let got = counts.get(&format!("u-{b}")).copied();
        if acked.contains(b) {
            assert_eq!(got, Some((PER_BATCH as u64, 5_050)), "acked batch {b} after SIGKILL");
        } else {
            // Unacked: its group commit happened whole or not at all.
            assert!(got.is_none() || got == Some((PER_BATCH as u64, 5_050)), "unacked batch {b} half written: {got:?}");
        }
    }
    assert_eq!(counts.len(), counts.keys().filter(|u| attempted.iter().any(|b| **u == format!("u-{b}"))).count(), "no unknown users");

    // Clients retry everything they were not sure of (and some they were): counted once.
    let client = reqwest::Client::new();
    for b in &attempted {
        let r = client.post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&batch(*b)).send().await.expect("retry");
        assert_eq!(r.status(), 202);
    }
    let counts = per_user(&url, "acme-read-key").await;
    let want: BTreeMap<String, (u64, u64)> = attempted.iter().map(|b| (format!("u-{b}"), (PER_BATCH as u64, 5_050))).collect();
    assert_eq!(counts, want, "after retries every batch counts exactly once");
    server.stop().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test]
async fn restart_keeps_data_keys_and_open_alerts() {
    let dir = temp_dir("embedded-restart");
    let port = free_port();
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{port}");
    // No config: the first run generates one, with keys, in the data directory.
    let args: [&OsStr; 4] = ["--data-dir".as_ref(), data.as_os_str(), "--listen".as_ref(), listen.as_ref()];
    let mut server = Process::start_args("meterline", &args);
    let url = format!("http://{listen}");
    ready(&url).await;
    let keys = meterline::devconfig::stored_keys(&data).expect("generated keys");
    assert!(server.log().contains(&keys.ingest), "the first run shows the ingest key");

    let at = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let events = json!([
        {"idempotency_key": "big-1", "timestamp": at, "user_id": "big", "feature": "agent", "model": "gpt-4o", "cost_usd": "20"},
        {"idempotency_key": "small-1", "timestamp": at, "user_id": "small", "feature": "chat", "model": "gpt-4o", "cost_usd": "0.01"}
    ]);
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth(&keys.ingest).json(&events).send().await.expect("post");
    assert_eq!(r.status(), 202);
    let absolute = |body: &Value| -> Vec<Value> {
        body["alerts"].as_array().map(|a| a.iter().filter(|x| x["user_id"] == "big" && x["rule"] == "absolute").cloned().collect()).unwrap_or_default()
    };
    let opened = poll_until(Duration::from_secs(30), "an absolute alert for big", || async {
        let (_, body) = get_json(&format!("{url}/v1/alerts"), Some(&keys.read)).await;
        absolute(&body).first().cloned()
    })
    .await;
    assert_eq!((opened["state"].as_str(), opened["observed_usd"].as_str()), (Some("open"), Some("20")));
    let before = per_user(&url, &keys.read).await;

    // The same metrics as the distributed services, from one endpoint, with
    // bounded labels (tenant, model, feature; never the user).
    let metrics = reqwest::get(format!("{url}/metrics")).await.expect("metrics").text().await.expect("text");
    for series in [
        "meterline_ingest_events_accepted_total{tenant=\"dev\"} 2",
        "meterline_aggregator_usage_cost_nano_usd_total{tenant=\"dev\",model=\"gpt-4o\",feature=\"agent\"} 20000000000",
        "meterline_aggregator_alerts_open{tenant=\"dev\",rule=\"absolute\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == series), "missing {series} in\n{metrics}");
    }
    assert!(!metrics.contains("user=") && !metrics.contains("\"big\""), "no per-user label");
    let (ok, out) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "promtool check metrics: {out}");

    server.stop().await;
    server.restart();
    ready(&url).await;
    assert_eq!(server.log().matches(&keys.ingest).count(), 1, "keys are shown once, on the first run only");
    assert_eq!(meterline::devconfig::stored_keys(&data), Some(keys.clone()), "the keys survive");
    assert_eq!(per_user(&url, &keys.read).await, before, "the data survives");
    let (_, body) = get_json(&format!("{url}/v1/alerts"), Some(&keys.read)).await;
    assert_eq!(absolute(&body), vec![opened.clone()], "the open alert survives as it was");

    // More spend updates the same alert rather than opening a second one.
    let more = json!([{"idempotency_key": "big-2", "timestamp": at, "user_id": "big", "feature": "agent", "model": "gpt-4o", "cost_usd": "1"}]);
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth(&keys.ingest).json(&more).send().await.expect("post");
    assert_eq!(r.status(), 202);
    let updated = poll_until(Duration::from_secs(30), "the alert to be updated", || async {
        let (_, body) = get_json(&format!("{url}/v1/alerts"), Some(&keys.read)).await;
        let a = absolute(&body);
        (a.len() == 1 && a[0]["observed_usd"] == "21").then(|| a[0].clone())
    })
    .await;
    assert_eq!(updated["opened_at"], opened["opened_at"]);
    server.stop().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// Events per value of `dimension` (user_id or customer_id), from the query API.
async fn per(url: &str, key: &str, dimension: &str) -> BTreeMap<String, u64> {
    let now = chrono::Utc::now();
    let range = format!("from={}&to={}", (now - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ"), (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ"));
    let (status, body) = get_json(&format!("{url}/v1/usage?granularity=total&group_by={dimension}&limit=100000&{range}"), Some(key)).await;
    assert_eq!(status, 200, "{body}");
    body["rows"].as_array().expect("rows").iter().map(|r| (r[dimension].as_str().expect("value").to_owned(), r["events"].as_u64().expect("n"))).collect()
}

#[tokio::test]
async fn copies_that_change_user_or_customer_count_once() {
    let dir = temp_dir("embedded-copies");
    let (mut server, url) = start_with_tenants(&dir).await;

    let at = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let copy = |n: usize, user: String, customer: &str| {
        json!({"idempotency_key": format!("k-{n}"), "timestamp": at, "user_id": user, "customer_id": customer, "feature": "chat", "model": "gpt-4o", "input_tokens": n + 1})
    };
    let post = |batch: Vec<Value>| {
        let url = url.clone();
        async move {
            let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&batch).send().await.expect("post");
            assert_eq!(r.status(), 202);
        }
    };
    post((0..100).map(|n| copy(n, format!("u-{}", n % 5), "c-1")).collect()).await;
    // Copies in later requests: another user, another customer, both, and a plain retry.
    post((0..100).map(|n| copy(n, format!("other-{n}"), "c-1")).collect()).await;
    post((0..100).map(|n| copy(n, format!("u-{}", n % 5), "c-other")).collect()).await;
    post((0..100).map(|n| copy(n, format!("moved-{n}"), "c-moved")).collect()).await;
    post((0..100).map(|n| copy(n, format!("u-{}", n % 5), "c-1")).collect()).await;
    // A last new key: once it is counted, everything before it was decided.
    post(vec![copy(100, "last".to_owned(), "c-last")]).await;
    poll_until(Duration::from_secs(30), "the last key counted", || async { per(&url, "acme-read-key", "user_id").await.contains_key("last").then_some(()) }).await;

    let want: BTreeMap<String, u64> = (0..5).map(|u| (format!("u-{u}"), 20)).chain([("last".to_owned(), 1)]).collect();
    assert_eq!(per(&url, "acme-read-key", "user_id").await, want, "each key once, under its first copy's user");
    let customers: BTreeMap<String, u64> = [("c-1".to_owned(), 100), ("c-last".to_owned(), 1)].into();
    assert_eq!(per(&url, "acme-read-key", "customer_id").await, customers, "and its first copy's customer");
    server.stop().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}
