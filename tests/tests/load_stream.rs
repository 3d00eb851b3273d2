//! `meterline-load` as a user runs it: `--help` answers, a paced run's ground
//! truth equals what the all-in-one server's `/v1/usage` reports per user,
//! and its memory does not grow with the run's length.

use meterline_schemas::Nanos;
use meterline_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const LOAD: &str = env!("CARGO_BIN_EXE_meterline-load");

#[test]
fn help_exits_zero_and_lists_the_flags() {
    let out = std::process::Command::new(LOAD).arg("--help").output().expect("run meterline-load");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--url", "--key", "--actions", "--duration", "--users", "--batch", "--concurrency", "--rate", "--seed", "--truth", "--retry-pct",
        "--conflict-pct", "--late-pct", "--runaway", "--progress", "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    // A bad flag is a usage error (status 2) with a message, not a backtrace.
    let bad = std::process::Command::new(LOAD).args(["--rate", "fast"]).output().expect("run meterline-load");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("--rate") && !stderr.contains("backtrace"), "{stderr}");
    let no_rate = std::process::Command::new(LOAD).args(["--duration", "3"]).output().expect("run meterline-load");
    assert_eq!(no_rate.status.code(), Some(2), "{no_rate:?}");
}

/// Runs the generator with `args` to completion, sampling its peak resident
/// memory (VmHWM) while it runs: the JSON report and the peak in KiB.
async fn run_load(args: &[&str]) -> (Value, u64) {
    let mut child = tokio::process::Command::new(LOAD)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn meterline-load");
    let pid = child.id().expect("pid");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let read_out = tokio::spawn(async move {
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut s).await.map(|_| s)
    });
    let read_err = tokio::spawn(async move {
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await.map(|_| s)
    });
    let mut peak = 0;
    let status = loop {
        // VmHWM is the kernel's own high-water mark, so a sample only has to
        // come after the peak, not at it; the last one lands within 10 ms of exit.
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        match tokio::time::timeout(Duration::from_millis(10), child.wait()).await {
            Ok(status) => break status.expect("wait"),
            Err(_) => continue,
        }
    };
    let out = read_out.await.expect("stdout task").expect("stdout");
    let err = read_err.await.expect("stderr task").expect("stderr");
    assert!(status.success(), "meterline-load {args:?}: {status}\n{err}");
    (serde_json::from_str(&out).unwrap_or_else(|e| panic!("report: {e}\n{out}")), peak)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn truth_file(path: &Path) -> BTreeMap<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(path).expect("truth file")).expect("truth JSON")
}

#[tokio::test]
async fn a_paced_run_matches_the_embedded_servers_usage_per_user() {
    let dir = temp_dir("load-stream");
    let server = Embedded::start(&dir.join("data"), "").await;
    poll_until(Duration::from_secs(60), "the embedded server to be ready", || async {
        reqwest::get(format!("{}/readyz", server.url)).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    let truth_path = dir.join("truth.json");
    let truth_arg = truth_path.to_str().expect("utf-8 path");
    let (report, _) = run_load(&[
        "--url", &server.url, "--key", "acme-ingest-key", "--rate", "2000", "--duration", "3", "--users", "200", "--batch", "250",
        "--concurrency", "3", "--seed", "5", "--runaway", "true", "--progress", "1", "--truth", truth_arg,
    ])
    .await;
    assert_eq!(report["unique_events"], 6_000, "{report}");
    assert_eq!(report["events_accepted"], report["events_sent"], "{report}");
    assert_eq!(report["events_rejected"], 0, "{report}");
    assert!(report["errors_by_status"].as_object().is_some_and(|e| e.is_empty()), "{report}");
    assert!(report["retries"].as_u64() > Some(0) && report["conflicts"].as_u64() > Some(0), "{report}");
    let truth = truth_file(&truth_path);
    assert!(truth.contains_key("user-runaway"), "the runaway user is in the truth");
    let total_events: u64 = truth.values().map(|t| t["events"].as_u64().expect("events")).sum();
    assert_eq!(total_events, 6_000, "one event per action in the truth");
    assert_eq!(report["truth_total"]["events"], 6_000, "{report}");

    let now = chrono::Utc::now();
    let range = format!(
        "from={}&to={}",
        (now - chrono::Duration::days(40)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    let url = format!("{}/v1/usage?granularity=total&group_by=user_id&limit=100000&{range}", server.url);
    let usage = poll_until(Duration::from_secs(60), "/v1/usage to hold every unique event", || {
        let url = &url;
        async move {
            let (status, body) = get_json(url, Some("acme-read-key")).await;
            let rows = body["rows"].as_array().filter(|_| status == 200)?;
            let events: u64 = rows.iter().filter_map(|r| r["events"].as_u64()).sum();
            (events == 6_000).then(|| rows.clone())
        }
    })
    .await;
    let mut seen: BTreeMap<String, [i64; 4]> = BTreeMap::new();
    for row in usage {
        let user = row["user_id"].as_str().expect("user").to_owned();
        let tokens = ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"].iter().map(|k| row[k].as_u64().expect("tokens")).sum::<u64>();
        let money = |k: &str| Nanos::parse(row[k].as_str().expect("decimal")).expect("money").0;
        let sums = seen.entry(user).or_default();
        sums[0] += row["events"].as_i64().expect("events");
        sums[1] += i64::try_from(tokens).expect("tokens");
        sums[2] += money("cost_usd");
        sums[3] += money("revenue_usd");
    }
    let expected: BTreeMap<String, [i64; 4]> = truth
        .iter()
        .map(|(user, t)| (user.clone(), ["events", "tokens", "cost_nanos", "revenue_nanos"].map(|k| t[k].as_i64().expect("number"))))
        .collect();
    assert_eq!(seen, expected, "per user: events, tokens, cost and revenue in nano-USD");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An ingest stand-in that accepts every event at once: the generator, not
/// the server, is what is measured.
async fn accept_all() -> String {
    let app = axum::Router::new().route(
        "/v1/events",
        axum::routing::post(|axum::Json(events): axum::Json<Vec<serde::de::IgnoredAny>>| async move {
            (axum::http::StatusCode::ACCEPTED, axum::Json(serde_json::json!({"accepted": events.len(), "rejected": []})))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn memory_does_not_grow_with_the_runs_length() {
    let url = accept_all().await;
    let run = |actions: &'static str| {
        let url = url.clone();
        async move { run_load(&["--url", &url, "--actions", actions, "--batch", "500", "--concurrency", "4", "--progress", "0"]).await }
    };
    let (short, short_kib) = run("30000").await;
    let (long, long_kib) = run("120000").await;
    assert_eq!(short["unique_events"], 30_000, "{short}");
    assert_eq!(long["unique_events"], 120_000, "{long}");
    assert_eq!(long["events_accepted"], long["events_sent"], "{long}");
    eprintln!("peak RSS: {short_kib} KiB for 30,000 actions, {long_kib} KiB for 120,000");
    // Generating up front held every event (~1.5 KiB each as JSON values):
    // 4x the actions was ~4x the memory. Streaming holds a few batches.
    assert!(long_kib * 2 < short_kib * 3 + 2 * 20 * 1024, "peak RSS {long_kib} KiB for 4x the actions against {short_kib} KiB");
}
