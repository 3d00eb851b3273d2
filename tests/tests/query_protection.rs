//! Query protection against the real stack (ClickHouse 18.16): a runaway
//! dashboard query is stopped by ClickHouse's time limit and answers `503`
//! with `Retry-After` naming the limit, while ingest and the aggregator keep
//! writing; and one tenant's heavy reads past its concurrency cap are refused
//! (`503 overloaded_tenant`) while another tenant's light read succeeds.

use meterline_tests::stack::Process;
use meterline_tests::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Rows of acme's minute rollups: enough that grouping them by minute and
/// user takes ClickHouse several seconds on two cores (~3 s measured), far
/// past the 1 s limit the query API is given here.
const HEAVY_ROWS: u64 = 6_000_000;

/// GET `path` as `key`: status, `Retry-After` and the JSON body.
async fn ask(api: &QueryApi, path: &str, key: &str) -> (u16, Option<u32>, Value) {
    let response = reqwest::Client::new().get(format!("{}{path}", api.url)).bearer_auth(key).send().await.expect("GET");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (status, retry_after, response.json().await.unwrap_or(Value::Null))
}

/// Globex's events in `range`, as the query API totals them (None until it answers).
async fn globex_events(api: &QueryApi, range: &str) -> Option<u64> {
    let (status, _, body) = ask(api, &format!("/v1/usage?granularity=total&{range}"), "globex-read-key").await;
    if status != 200 {
        return None;
    }
    body["rows"].as_array()?.first().map_or(Some(0), |r| r["events"].as_u64())
}

#[tokio::test]
async fn a_runaway_query_answers_503_and_never_starves_the_pipeline() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("query_protection").await;
    let agg = Process::start("meterline-aggregator", &aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, ""));
    poll_until(Duration::from_secs(60), "the aggregator to migrate", || async { ch.migrated(&database).await.then_some(()) }).await;
    // A heavy month of acme's minutes, straight into the rollups: one row per
    // user and minute (5,000 users), spread over the last 20 days.
    ch.query(&format!(
        "INSERT INTO {database}.rollups_minute (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
         source_topic, source_partition, source_offset, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, \
         cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers, written_at) \
         SELECT 'acme', toDateTime(intDiv(toUInt32(now()) - 86400 * 20, 60) * 60 + 60 * intDiv(number, 5000) % (86400 * 20)), \
         concat('u', toString(number % 5000)), '', 'chat', 'gpt-4o', '', 1, 'heavy', 0, toInt64(number), 1, 10, 10, 0, 0, 1000, 2000, 0, 0, 0, now() \
         FROM numbers({HEAVY_ROWS})"
    ))
    .await;
    let api = QueryApi::start_with(
        &ch.url,
        &database,
        "ranking_cache_groups = 0\n[query]\nmax_execution_secs = 1\nmax_concurrent_per_tenant = 2\nmax_queue_wait_ms = 0",
    )
    .await;
    let now = chrono::Utc::now();
    let range = format!(
        "from={}&to={}",
        (now - chrono::Duration::days(25)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    let heavy = format!("/v1/usage?granularity=minute&group_by=user_id&limit=100000&{range}");

    // The heavy query, with globex's events posted while it runs.
    let before = poll_until(Duration::from_secs(30), "the query API to answer", || globex_events(&api, &range)).await;
    let posted = 200;
    let started = Instant::now();
    let (refused, ()) = tokio::join!(ask(&api, &heavy, "acme-read-key"), async {
        for batch in 0..4 {
            let events: Vec<Value> = (0..posted / 4).map(|n| event("globex-user", batch * 1_000 + n)).collect();
            let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("globex-ingest-key").json(&events).send().await.expect("post");
            assert_eq!(r.status(), 202, "ingest keeps accepting during the heavy query");
        }
    });
    let (status, retry_after, body) = refused;
    assert_eq!(status, 503, "the heavy query is stopped: {}", body["error"]);
    assert_eq!(body["error"]["code"], "query_time_limit", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("query.max_execution_secs")), "{body}");
    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After: {retry_after:?}");
    assert_documented(&heavy, status, &body);
    // Stopped by ClickHouse near its 1 s limit, not run to the end.
    assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());
    poll_until(Duration::from_secs(60), "every event posted during the heavy query to be readable", || async {
        globex_events(&api, &range).await.filter(|n| *n == before + posted as u64)
    })
    .await;

    // The cap: three heavy reads of acme at once against two slots: at least
    // one is refused at once, while globex's light read is answered.
    let heavy_one = || ask(&api, &heavy, "acme-read-key");
    let (a, b, c, light) = tokio::join!(heavy_one(), heavy_one(), heavy_one(), async {
        // After acme's reads have taken their slots.
        tokio::time::sleep(Duration::from_millis(100)).await;
        ask(&api, &format!("/v1/usage?granularity=total&{range}"), "globex-read-key").await
    });
    let codes: Vec<&str> = [&a, &b, &c].iter().map(|(_, _, body)| body["error"]["code"].as_str().unwrap_or("none")).collect();
    for (status, retry_after, body) in [&a, &b, &c] {
        assert_eq!(*status, 503, "{}", body["error"]);
        assert!(retry_after.is_some(), "{}", body["error"]);
        assert_documented(&heavy, *status, body);
    }
    assert!(codes.contains(&"overloaded_tenant"), "one of three over a cap of two is refused: {codes:?}");
    assert!(codes.iter().all(|c| ["overloaded_tenant", "query_time_limit"].contains(c)), "{codes:?}");
    let overloaded = [&a, &b, &c].into_iter().find(|(_, _, body)| body["error"]["code"] == "overloaded_tenant").map(|(_, _, body)| body.clone());
    assert!(overloaded.is_some_and(|b| b["error"]["message"].as_str().is_some_and(|m| m.contains("query.max_concurrent_per_tenant"))));
    let (status, _, body) = light;
    assert_eq!(status, 200, "another tenant's light read is answered: {body}");
    assert_eq!(body["rows"][0]["events"].as_u64(), Some(before + posted as u64));
    drop(agg);
}
