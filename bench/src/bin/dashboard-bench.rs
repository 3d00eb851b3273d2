//! The dashboard's load time at scale, in a real browser: 100,000 users and
//! 30 days of minute rollups in the stack's ClickHouse (the same load as
//! `query-bench`), the query API over them with its ranking cache, and
//! headless Chromium opening each view. A view is loaded when the dashboard
//! sets `body[data-loaded]` (all its API calls answered and rendered); its
//! time is `performance.now()` then, from the document's navigation start.
//!
//! Each view is opened RUNS times as a fresh document (the first is cold:
//! nothing cached yet for that question), then RUNS times in the app by
//! changing the hash, as the nav links do.
//!
//! `cargo run --release -p meterline-bench --bin dashboard-bench -- [USERS] [ROWS_PER_USER_DAY] [RUNS]`
//! with the stack up.

use meterline_tests::browser::Browser;
use meterline_tests::stack::ClickHouse;
use meterline_tests::QueryApi;
use std::time::{Duration, Instant};

/// The goal: every view's data in under a second.
const GOAL_MS: f64 = 1_000.0;
/// How long one view may take before the bench gives up on it.
const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let users = args.first().copied().unwrap_or(100_000);
    let per_day = args.get(1).copied().unwrap_or(3);
    let runs = args.get(2).copied().unwrap_or(10).max(1) as usize;
    let ch = ClickHouse::shared();
    let (db, reused) = meterline_bench::database(&ch, "dbench").await?;
    let started = Instant::now();
    if !reused {
        meterline_bench::load(&ch, &db, users, per_day, chrono::Utc::now().timestamp()).await;
    }
    let loaded = started.elapsed().as_secs_f64();
    let count = ch.query(&format!("SELECT count() FROM {db}.rollups_minute")).await;

    // The query API serves the dashboard at `/`, with the ranking cache on (its default).
    let api = QueryApi::start(&ch.url, &db).await;
    println!(
        "dashboard-bench: {users} users, 30 days, {} minute rows (loaded in {loaded:.1} s), ClickHouse {}, {runs} runs per view",
        count.trim(),
        ch.query("SELECT version()").await.trim()
    );

    let b = Browser::start().await;
    // Signs in as a person would; the key stays in the tab's sessionStorage.
    b.goto(&format!("{}/#key=acme-read-key", api.url)).await;
    wait_loaded(&b, "overview", 0).await?;

    // The user page's path is the top spender's, asked for when its turn
    // comes: asking earlier would warm the ranking cache before the top
    // spenders view's cold run.
    let views = [
        ("Overview, 30 days", "overview", "/overview?range=30d"),
        ("Top spenders, 30 days", "top-spenders", "/top-spenders?range=30d&metric=cost"),
        ("Money-losing users, 30 days", "losing", "/losing?range=30d"),
        ("Runaway alerts, 30 days", "alerts", "/alerts?range=30d"),
        ("User page (the top spender), 30 days", "user", ""),
    ];
    println!("| view | cold ms | warm p50 ms | warm p99 ms | in-app p50 ms | in-app p99 ms | goal | met |");
    println!("|---|---:|---:|---:|---:|---:|---|---|");
    let mut results = Vec::new();
    for (name, id, path) in views {
        let path = if id == "user" {
            let (status, top) = api.get("/v1/top-spenders?metric=cost&limit=1", Some("acme-read-key")).await;
            anyhow::ensure!(status == 200, "top spenders: {status} {top}");
            let user = top["rows"][0]["user_id"].as_str().ok_or_else(|| anyhow::anyhow!("no top spender: {top}"))?;
            format!("/user/{}?range=30d", encode(user))
        } else {
            path.to_owned()
        };
        // Fresh documents: a blank page between, so each run loads the page,
        // its scripts and the view's data, as opening a shared link does.
        let mut page = Vec::with_capacity(runs);
        for _ in 0..runs {
            b.goto("about:blank").await;
            b.goto(&format!("{}/#{path}", api.url)).await;
            page.push(wait_loaded(&b, id, 0).await?.0);
        }
        let cold = page[0];
        let mut warm: Vec<f64> = if runs > 1 { page[1..].to_vec() } else { page.clone() };
        warm.sort_by(f64::total_cmp);
        // In the app: the hash changes (a parameter the view ignores makes each
        // run a new URL), as when the nav is clicked; timed from the route's start.
        let mut in_app = Vec::with_capacity(runs);
        let mut seq = b.eval("return window.__meterlineTimings.length").await.as_u64().unwrap_or(0);
        for run in 0..runs {
            let sep = if path.contains('?') { '&' } else { '?' };
            b.eval(&format!("location.hash = {}", serde_json::json!(format!("#{path}{sep}bench_run={run}")))).await;
            let (_, route_ms, now) = wait_loaded(&b, id, seq).await?;
            in_app.push(route_ms);
            seq = now;
        }
        in_app.sort_by(f64::total_cmp);
        let (p50, p99) = (pct(&warm, 0.5), pct(&warm, 0.99));
        let (a50, a99) = (pct(&in_app, 0.5), pct(&in_app, 0.99));
        // The goal is the standing view (through the ranking cache): warm and
        // in-app p99. Cold is shown beside it.
        let met = p99 < GOAL_MS && a99 < GOAL_MS;
        println!(
            "| {name} | {cold:.0} | {p50:.0} | {p99:.0} | {a50:.0} | {a99:.0} | < 1,000 ms | {}{} |",
            if met { "yes" } else { "no" },
            if cold >= GOAL_MS { " (cold over)" } else { "" }
        );
        results.push(serde_json::json!({
            "view": name, "id": id, "cold_ms": cold, "p50_ms": p50, "p99_ms": p99,
            "in_app_p50_ms": a50, "in_app_p99_ms": a99, "met": met, "cold_met": cold < GOAL_MS,
        }));
    }
    b.stop().await;
    drop(api);
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("dashboard-bench: kept database {db}");
    } else if !reused {
        ch.query(&format!("DROP DATABASE {db}")).await;
    }
    // One line for scripts/bench to collect.
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "dashboard",
            "users": users,
            "days": 30,
            "minute_rows": count.trim().parse::<u64>().unwrap_or(0),
            "runs": runs,
            "load_secs": loaded,
            "goal_ms": GOAL_MS,
            "views": results,
        })
    );
    Ok(())
}

/// Waits for the view `id` to say it loaded, after load number `after` of
/// this document; its (ms from navigation start, ms from the route's start,
/// load number), from the dashboard's own timing record.
async fn wait_loaded(b: &Browser, id: &str, after: u64) -> anyhow::Result<(f64, f64, u64)> {
    let started = Instant::now();
    loop {
        let got = b
            .eval("const t = window.__meterlineTimings; const m = document.body && document.body.dataset.loaded; return m && t ? [m, t[t.length - 1]] : null")
            .await;
        if let Some(marker) = got[0].as_str()
            && got[1]["seq"].as_u64().unwrap_or(0) > after
        {
            anyhow::ensure!(marker.starts_with(&format!("{id}:")) && !marker.ends_with(":error"), "{id}: the page says {marker}: {}", b.text("#main").await.unwrap_or_default());
            let t = &got[1];
            return Ok((t["ms"].as_f64().unwrap_or(f64::NAN), t["route_ms"].as_f64().unwrap_or(f64::NAN), t["seq"].as_u64().unwrap_or(0)));
        }
        anyhow::ensure!(started.elapsed() < DEADLINE, "{id}: not loaded after {DEADLINE:?}: {}", b.text("body").await.unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `q` quantile of sorted `v` (nearest rank).
fn pct(v: &[f64], q: f64) -> f64 {
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// A user id as one URL path segment.
fn encode(id: &str) -> String {
    id.bytes()
        .map(|c| if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) { (c as char).to_string() } else { format!("%{c:02X}") })
        .collect()
}
