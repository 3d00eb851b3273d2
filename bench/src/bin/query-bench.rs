//! Query latency at scale: 100,000 users and 30 days of minute rollups in the
//! stack's ClickHouse, then p50/p99 of the query API's heavy endpoints, beside
//! `clickhouse-client` running the same statements one after another (the raw
//! tool: server time over the native protocol, no HTTP, no JSON). The last
//! two rows time the ranking cache "right after late events": before each
//! ask, late rows land in hours the ranking keeps and the background
//! refresher is given its interval (two passes, polled), so they measure
//! what a dashboard sees once the refresher has caught up.
//!
//! `cargo run --release -p meterline-bench --bin query-bench -- [USERS] [ROWS_PER_USER_DAY] [RUNS]`
//! with the stack up.

use meterline_tests::stack::ClickHouse;
use meterline_tests::{QueryApi, stack_var};
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--sql") {
        return print_sql();
    }
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let users = args.first().copied().unwrap_or(100_000);
    let per_day = args.get(1).copied().unwrap_or(3);
    let runs = args.get(2).copied().unwrap_or(50) as usize;
    let ch = ClickHouse::shared();
    let (db, reused) = meterline_bench::database(&ch, "qbench").await?;
    let started = Instant::now();
    let now = if reused {
        ch.query(&format!("SELECT toUInt32(max(window_start)) FROM {db}.rollups_minute")).await.trim().parse()?
    } else {
        let now = chrono::Utc::now().timestamp();
        meterline_bench::load(&ch, &db, users, per_day, now).await;
        now
    };
    let daily_rows = ch.query(&format!("SELECT count() FROM {db}.rollups_user_span WHERE span_days = 1")).await;
    let loaded = started.elapsed().as_secs_f64();
    let count = ch.query(&format!("SELECT count() FROM {db}.rollups_minute")).await;

    let api = QueryApi::start(&ch.url, &db).await;
    let fmt = |t: i64| chrono::DateTime::from_timestamp(t, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
    // The benchmark's range, 30 days to `now` + 60 s; run k of a "moved"
    // row starts k + 1 hours earlier instead (the same rows, since the data
    // starts 30 days back), so the ranking cache holds the range an hour
    // away and slides it, as when the hour turns under a dashboard.
    let range = move |run: Option<usize>| {
        let from = now - 30 * 86_400 - run.map_or(0, |k| (k as i64 + 1) * 3_600);
        format!("from={}&to={}", fmt(from), fmt(now + 60))
    };
    type PathFor = Box<dyn Fn(Option<usize>) -> String>;
    // (name, its statements in `endpoint_statements`, the path of run k
    // (None: the warm-up), whether it asks the API without the ranking cache)
    let queries: Vec<(&str, usize, PathFor, bool)> = vec![
        ("top spenders by cost, 30 days", 0, Box::new(move |_| format!("/v1/top-spenders?metric=cost&limit=100&{}", range(None))), false),
        ("top spenders by cost, 30 days, moved an hour", 0, Box::new(move |k| format!("/v1/top-spenders?metric=cost&limit=100&{}", range(k))), false),
        ("top spenders by cost, 30 days, cold", 0, Box::new(move |_| format!("/v1/top-spenders?metric=cost&limit=100&{}", range(None))), true),
        ("lowest margins, 30 days", 1, Box::new(move |_| format!("/v1/margins?group_by=user_id&limit=100&{}", range(None))), false),
        ("lowest margins, 30 days, cold", 1, Box::new(move |_| format!("/v1/margins?group_by=user_id&limit=100&{}", range(None))), true),
        ("one user's usage, 30 days", 2, Box::new(move |_| format!("/v1/users/user-4242/usage?{}", range(None))), false),
        ("usage by day and model, 30 days", 3, Box::new(move |_| format!("/v1/usage?granularity=day&group_by=model&{}", range(None))), false),
    ];
    // Cold: the same API with the ranking cache off, which is what a first
    // ask, or one whose whole hours just received events, costs.
    let uncached = QueryApi::start_with(&ch.url, &db, "ranking_cache_groups = 0").await;
    println!(
        "query-bench: {users} users, 30 days, {} minute rows, {} daily per-user rows (loaded in {loaded:.1} s), ClickHouse {}",
        count.trim(),
        daily_rows.trim(),
        ch.query("SELECT version()").await.trim()
    );
    println!("| query | p50 ms | p99 ms | max ms | clickhouse-client p50 ms | p99 ms | ratio (client p50 / API p50) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let raw_statements = endpoint_statements(now)?;
    let tcp_port = stack_var("METERLINE_TEST_CLICKHOUSE_TCP_PORT");
    let mut results = Vec::new();
    for (name, raw_index, path, cold) in &queries {
        let api = if *cold { &uncached } else { &api };
        let statements = &raw_statements[*raw_index].1;
        let (status, _) = api.get(&path(None), Some("acme-read-key")).await; // warm-up
        anyhow::ensure!(status == 200, "{name}: {status}");
        let mut times = Vec::with_capacity(runs);
        for run in 0..runs {
            let path = path(Some(run));
            let t = Instant::now();
            let (status, _) = api.get(&path, Some("acme-read-key")).await;
            anyhow::ensure!(status == 200, "{name}: {status}");
            times.push(t.elapsed());
        }
        let raw = client_times(&tcp_port, &db, statements, runs)?;
        results.push(row(name, times, &raw));
    }
    // Right after late events: a third API whose refresher passes every
    // LATE_REFRESH_MS, alone in the process (the others are stopped first,
    // so the refresher counters in /metrics are its own). Before each timed
    // ask, late rows land in a whole day the ranking keeps, and the ask waits
    // until two passes have finished since (the refresher's interval, polled,
    // not slept), then asks top spenders and lowest margins.
    drop(api);
    drop(uncached);
    let late = QueryApi::start_with(&ch.url, &db, &format!("ranking_refresh_ms = {LATE_REFRESH_MS}")).await;
    // The counters are the process's: what the rows below add is theirs.
    let series = ["hit", "stale", "miss", "slide"].map(|r| format!("meterline_query_ranking_cache_lookups_total{{result=\"{r}\"}}"));
    let rereads = "meterline_query_ranking_refreshes_total{result=\"reread\"}";
    let mut before = Vec::new();
    for s in series.iter().map(String::as_str).chain([rereads]) {
        before.push(metric(&late.url, s).await);
    }
    let late_rows = late_events(&ch, &db, &late, users, now, runs, &range(None)).await?;
    for ((name, times), raw_index) in late_rows.into_iter().zip([0, 1]) {
        let raw = client_times(&tcp_port, &db, &raw_statements[raw_index].1, runs)?;
        results.push(row(name, times, &raw));
    }
    let mut added = Vec::new();
    for (s, b) in series.iter().map(String::as_str).chain([rereads]).zip(&before) {
        added.push(metric(&late.url, s).await - b);
    }
    // What the asks had to read themselves (the two warm-ups included: a
    // miss, then a hit), and what the refresher read for them.
    println!(
        "query-bench: right after late events, {runs} runs: request-path look-ups hit {} stale {} miss {} slide {}; refresher re-reads {}",
        added[0], added[1], added[2], added[3], added[4]
    );
    // Its refresher ends with it: stopped before the database goes.
    let late_url = late.url.clone();
    drop(late);
    meterline_tests::poll_until(Duration::from_secs(30), "the late-events API to stop", || async {
        reqwest::get(format!("{late_url}/metrics")).await.is_err().then_some(())
    })
    .await;
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("query-bench: kept database {db}");
    } else {
        ch.query(&format!("DROP DATABASE {db}")).await;
    }
    // One line for scripts/bench to collect.
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "query",
            "users": users,
            "days": 30,
            "minute_rows": count.trim().parse::<u64>().unwrap_or(0),
            "daily_rows": daily_rows.trim().parse::<u64>().unwrap_or(0),
            "runs": runs,
            "load_secs": loaded,
            "queries": results,
        })
    );
    Ok(())
}

/// The refresher period of the "right after late events" rows' API.
const LATE_REFRESH_MS: u64 = 250;

/// Prints one row (API times against the raw tool's) and returns its JSON.
fn row(name: &str, mut times: Vec<Duration>, raw: &[f64]) -> serde_json::Value {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: f64| ms(times[((times.len() as f64 * q) as usize).min(times.len() - 1)]);
    let q = |v: &[f64], at: f64| v[((v.len() as f64 * at) as usize).min(v.len() - 1)];
    let ratio = q(raw, 0.5) / p(0.5);
    println!("| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {ratio:.2} |", p(0.5), p(0.99), ms(times[times.len() - 1]), q(raw, 0.5), q(raw, 0.99));
    serde_json::json!({
        "query": name, "p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": ms(times[times.len() - 1]),
        "raw_p50_ms": q(raw, 0.5), "raw_p99_ms": q(raw, 0.99), "ratio": ratio,
    })
}

/// A counter in the API's `/metrics` (`series`: name and labels), 0 before it is first counted.
async fn metric(url: &str, series: &str) -> u64 {
    let text = match reqwest::get(format!("{url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let prefix = format!("{series} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).map_or(0, |v| v as u64)
}

/// The "right after late events" rows: `runs` times, late rows land in a
/// whole day of `range`, the refresher gets its interval, then top spenders
/// and lowest margins are timed (in turn first, so neither always follows
/// the other). Returns each row's name and times.
async fn late_events(ch: &ClickHouse, db: &str, api: &QueryApi, users: u64, now: i64, runs: usize, range: &str) -> anyhow::Result<Vec<(&'static str, Vec<Duration>)>> {
    let asks = [
        ("top spenders by cost, 30 days, right after late events", format!("/v1/top-spenders?metric=cost&limit=100&{range}")),
        ("lowest margins, 30 days, right after late events", format!("/v1/margins?group_by=user_id&limit=100&{range}")),
    ];
    for (name, path) in &asks {
        let (status, _) = api.get(path, Some("acme-read-key")).await; // warm-up: the first ask reads and keeps
        anyhow::ensure!(status == 200, "{name}: {status}");
    }
    let mut times = vec![Vec::with_capacity(runs), Vec::with_capacity(runs)];
    let passes = "meterline_query_ranking_refresh_passes_total";
    for run in 0..runs {
        for statement in late_statements(db, users, now, run as i64) {
            ch.query(&statement).await;
        }
        // A pass that started after the rows landed has finished.
        let seen = metric(&api.url, passes).await;
        meterline_tests::poll_until(Duration::from_secs(120), "two refresher passes", || async { (metric(&api.url, passes).await >= seen + 2).then_some(()) }).await;
        for k in [run % 2, 1 - run % 2] {
            let (name, path) = &asks[k];
            let t = Instant::now();
            let (status, _) = api.get(path, Some("acme-read-key")).await;
            anyhow::ensure!(status == 200, "{name}: {status}");
            times[k].push(t.elapsed());
        }
    }
    Ok(asks.iter().map(|(name, _)| *name).zip(times).collect())
}

/// Late rows for run `run`: 20 users' events in one minute ten days back
/// (a whole day of the benchmark's range, so a whole hour the ranking keeps),
/// written as the aggregator writes a late flush: the minute rows, then the
/// per-user spans and days summed from them (found by their `written_at`).
fn late_statements(db: &str, users: u64, now: i64, run: i64) -> Vec<String> {
    let at = (now - 10 * 86_400 - run * 60).div_euclid(60) * 60;
    let written = now + 100_000 + run;
    vec![
        format!(
            "INSERT INTO {db}.rollups_minute (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
             source_topic, source_partition, source_offset, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, \
             cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers, written_at) \
             SELECT 'acme', toDateTime({at}), concat('user-', toString((number * 7919 + {run}) % {users})), concat('cust-', toString(((number * 7919 + {run}) % {users}) % 97)), \
             'chat', 'gpt-4o', 'production', 1, '', -1, -1, 1, 1000, 200, 0, 0, toInt64(1000000 + number), toInt64(500000), 0, 0, 0, \
             toDateTime({written}) FROM system.numbers LIMIT 20"
        ),
        meterline_bench::span_rollups_sql(db, written, &format!("WHERE written_at = toDateTime({written})")),
        meterline_bench::daily_rollups_sql(db, written, &format!("WHERE written_at = toDateTime({written})")),
        meterline_bench::dims_rollups_sql(db, written, &format!("WHERE written_at = toDateTime({written})")),
    ]
}

/// `--sql [USERS] [ROWS_PER_USER_DAY]`: one JSON document with the schema,
/// the load and the endpoints' statements, for `scripts/chdb-query-bench.py`
/// to time the same design on the current ClickHouse engine (chDB).
fn print_sql() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(2).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let users = args.first().copied().unwrap_or(100_000);
    let per_day = args.get(1).copied().unwrap_or(3);
    let now = chrono::Utc::now().timestamp();
    let mut setup: Vec<String> = meterline_clickhouse::MIGRATIONS.iter().flat_map(|m| m.statements.iter().map(|s| (*s).to_owned())).collect();
    setup.extend(meterline_bench::load_statements("default", users, per_day, now));
    let queries: Vec<serde_json::Value> =
        endpoint_statements(now)?.into_iter().map(|(name, sql)| serde_json::json!({"query": name, "sql": sql})).collect();
    println!("{}", serde_json::json!({"users": users, "setup": setup, "queries": queries}));
    Ok(())
}

/// Each benchmarked endpoint's statements, in the order the query API sends
/// them, for the range the benchmark asks for (30 days to `now` + 60 s).
fn endpoint_statements(now: i64) -> anyhow::Result<Vec<(&'static str, Vec<String>)>> {
    use meterline_clickhouse::query::{negative_count, sums, top};
    use meterline_domain::{Granularity, Metric, TimeColumn};
    let fmt = |t: i64| chrono::DateTime::from_timestamp(t, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
    let mut raw = std::collections::HashMap::from([("from".to_owned(), fmt(now - 30 * 86_400)), ("to".to_owned(), fmt(now + 60))]);
    let scope = |raw: &std::collections::HashMap<String, String>| {
        meterline_query_api::Params::new(raw, &[])
            .and_then(|p| p.scope("acme", TimeColumn::WindowStart, Some(30), 400))
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let all = scope(&raw)?;
    raw.insert("user_id".into(), "user-4242".into());
    let one = scope(&raw)?;
    let r = |sql: meterline_sql::Sql| sql.render("");
    let totals = r(sums(&all, Granularity::Total, &[], false, false, 1));
    Ok(vec![
        ("top spenders by cost, 30 days", vec![r(top(&all, "user_id", Metric::Cost, true, 100)), totals.clone()]),
        ("lowest margins, 30 days", vec![r(sums(&all, Granularity::Total, &["user_id"], false, true, 100)), totals, r(negative_count(&all, &["user_id"]))]),
        (
            "one user's usage, 30 days",
            vec![
                r(sums(&one, Granularity::Total, &[], false, false, 1)),
                r(sums(&one, Granularity::Total, &["feature"], false, false, 10_000)),
                r(sums(&one, Granularity::Total, &["model"], false, false, 10_000)),
                r(sums(&one, Granularity::Day, &[], false, false, 10_000)),
            ],
        ),
        ("usage by day and model, 30 days", vec![r(sums(&all, Granularity::Day, &["model"], false, false, 10_000))]),
    ])
}

/// Milliseconds per run of `statements` in sequence, as `clickhouse-client
/// --time` reports each (server time, no process start), sorted.
fn client_times(tcp_port: &str, db: &str, statements: &[String], runs: usize) -> anyhow::Result<Vec<f64>> {
    let one_run: Vec<String> = statements.iter().map(|s| format!("{s} FORMAT Null")).collect();
    let script = vec![one_run.join(";\n"); runs + 1].join(";\n"); // the first run warms up
    let client = std::env::var("METERLINE_CLICKHOUSE_CLIENT").unwrap_or_else(|_| "clickhouse-client".to_owned());
    let output = Command::new(client)
        .args(["--host", "127.0.0.1", "--port", tcp_port, "--database", db, "--time", "--multiquery", "--query", &script])
        .output()?;
    anyhow::ensure!(output.status.success(), "clickhouse-client failed: {}", String::from_utf8_lossy(&output.stderr));
    let secs: Vec<f64> = String::from_utf8_lossy(&output.stderr).lines().filter_map(|l| l.trim().parse().ok()).collect();
    anyhow::ensure!(secs.len() == statements.len() * (runs + 1), "expected one time per statement, got {}", secs.len());
    let mut per_run: Vec<f64> = secs.chunks(statements.len()).skip(1).map(|c| c.iter().sum::<f64>() * 1e3).collect();
    per_run.sort_by(f64::total_cmp);
    Ok(per_run)
}
