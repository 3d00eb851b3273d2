//! Query latency at scale: 100,000 users and 30 days of minute rollups in the
//! stack's ClickHouse, then p50/p99 of the query API's heavy endpoints.
//!
//! `cargo run --release -p meterline-tests --bin query-bench -- [USERS] [ROWS_PER_USER_DAY] [RUNS]`
//! with the stack up.

use meterline_tests::stack::ClickHouse;
use meterline_tests::{QueryApi, free_port};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let users = args.first().copied().unwrap_or(100_000);
    let per_day = args.get(1).copied().unwrap_or(3);
    let runs = args.get(2).copied().unwrap_or(50) as usize;
    let ch = ClickHouse::shared();
    let db = ch.database(&format!("qbench_{}", free_port())).await;
    // The schema, through the aggregator's own migrations.
    let config = meterline_aggregator::config::ClickHouseConfig {
        url: ch.url.clone(),
        database: db.clone(),
        user: "default".into(),
        password: String::new(),
        request_timeout_ms: 600_000,
    };
    let store = meterline_aggregator::store::connect(&config).await?;
    store.migrate().await?;
    let rows = users * 30 * per_day;
    let now = chrono::Utc::now().timestamp();
    let started = Instant::now();
    // Server-side generation: user n spends on `per_day` minutes of each of 30 days.
    ch.query(&format!(
        "INSERT INTO {db}.rollups_minute (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
         source_topic, source_partition, source_offset, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, \
         cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers, written_at) \
         SELECT 'acme', toDateTime(intDiv({now} - (number % 2592000), 60) * 60), concat('user-', toString(number % {users})), \
         concat('cust-', toString((number % {users}) % 97)), ['chat','search','summarize'][number % 3 + 1], ['gpt-4o','claude','llama'][number % 3 + 1], \
         'production', 1, '', -1, -1, 1, 1000, 200, 0, 0, toInt64(intHash64(number) % 50000000), toInt64(intHash64(number + 1) % 60000000), 0, 0, 0, \
         toDateTime({now}) FROM system.numbers LIMIT {rows}"
    ))
    .await;
    // The daily per-user table as the aggregator keeps it (summed from the same rows).
    ch.query(&format!(
        "INSERT INTO {db}.rollups_user_day SELECT tenant, toStartOfDay(window_start) AS d, user_id, customer_id, '', '', '', toUInt8(0), \
         '', toInt32(-1), toInt64(-1), sum(events), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens), sum(reasoning_tokens), \
         sum(cost_nanos), sum(revenue_nanos), sum(credits_nanos), sum(unpriced_events), toUInt64(0), toDateTime({now}) \
         FROM {db}.rollups_minute GROUP BY tenant, d, user_id, customer_id"
    ))
    .await;
    ch.query(&format!("OPTIMIZE TABLE {db}.rollups_minute FINAL")).await;
    ch.query(&format!("OPTIMIZE TABLE {db}.rollups_user_day FINAL")).await;
    let daily_rows = ch.query(&format!("SELECT count() FROM {db}.rollups_user_day")).await;
    let loaded = started.elapsed().as_secs_f64();
    let count = ch.query(&format!("SELECT count() FROM {db}.rollups_minute")).await;

    let api = QueryApi::start(&ch.url, &db).await;
    let from = chrono::DateTime::from_timestamp(now - 30 * 86_400, 0).expect("from").format("%Y-%m-%dT%H:%M:%SZ");
    let to = chrono::DateTime::from_timestamp(now + 60, 0).expect("to").format("%Y-%m-%dT%H:%M:%SZ");
    let queries = [
        ("top spenders by cost, 30 days", format!("/v1/top-spenders?metric=cost&limit=100&from={from}&to={to}")),
        ("lowest margins, 30 days", format!("/v1/margins?group_by=user_id&limit=100&from={from}&to={to}")),
        ("one user's usage, 30 days", format!("/v1/users/user-4242/usage?from={from}&to={to}")),
        ("usage by day and model, 30 days", format!("/v1/usage?granularity=day&group_by=model&from={from}&to={to}")),
    ];
    println!(
        "query-bench: {users} users, 30 days, {} minute rows, {} daily per-user rows (loaded in {loaded:.1} s), ClickHouse {}",
        count.trim(),
        daily_rows.trim(),
        ch.query("SELECT version()").await.trim()
    );
    println!("| query | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    let mut results = Vec::new();
    for (name, path) in &queries {
        let (status, _) = api.get(path, Some("acme-read-key")).await; // warm-up
        anyhow::ensure!(status == 200, "{name}: {status}");
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let (status, _) = api.get(path, Some("acme-read-key")).await;
            anyhow::ensure!(status == 200, "{name}: {status}");
            times.push(t.elapsed());
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let p = |q: f64| ms(times[((times.len() as f64 * q) as usize).min(times.len() - 1)]);
        println!("| {name} | {:.1} | {:.1} | {:.1} |", p(0.5), p(0.99), ms(times[times.len() - 1]));
        results.push(serde_json::json!({"query": name, "p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": ms(times[times.len() - 1])}));
    }
    ch.query(&format!("DROP DATABASE {db}")).await;
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
