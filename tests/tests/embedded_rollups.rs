//! The all-in-one's per-dimension daily rollup and its ranking cache: usage
//! by day and model from the daily rows equals the stored events' sums, the
//! rollup is backfilled for a store made before it, rankings kept between
//! requests see late events at once, limits counting sees a plan put after
//! events were counted (plans are cached across commits), and the WAL is
//! checkpointed beside the commits.

use meterline_tests::*;
use rusqlite::Connection;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const INGEST: &str = "acme-ingest-key";
const READ: &str = "acme-read-key";

fn at(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Events over the last five days (hours apart, so partial days at both
/// ends of a range), three models, two environments, some not billable.
fn history(tag: &str, n: usize) -> Vec<Value> {
    let now = chrono::Utc::now();
    let models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"];
    (0..n)
        .map(|i| {
            json!({
                "idempotency_key": format!("{tag}-{i}"),
                "timestamp": (now - chrono::Duration::minutes(5 + 37 * i as i64)).to_rfc3339(),
                "user_id": format!("u-{}", i % 7),
                "customer_id": format!("c-{}", i % 3),
                "feature": if i % 2 == 0 { "chat" } else { "search" },
                "model": models[i % 3],
                "environment": if i % 5 == 0 { "staging" } else { "production" },
                "billable": i % 4 != 0,
                "input_tokens": 100 + i,
                "output_tokens": 10 + i % 50,
            })
        })
        .collect()
}

async fn post(url: &str, events: &[Value]) {
    let client = reqwest::Client::new();
    for chunk in events.chunks(100) {
        let r = client.post(format!("{url}/v1/events")).bearer_auth(INGEST).json(&chunk).send().await.expect("post");
        assert_eq!(r.status(), 202);
    }
}

/// Rows of a grouped sum as ((key columns...), (measures...)), exact integers.
type Sums = BTreeMap<Vec<String>, Vec<i64>>;

fn sums(conn: &Connection, sql: &str, keys: usize) -> Sums {
    let mut stmt = conn.prepare(sql).expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            let k: Vec<String> = (0..keys).map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}"))).collect::<Result<_, _>>()?;
            let v: Vec<i64> = (keys..keys + 9).map(|i| r.get(i)).collect::<Result<_, _>>()?;
            Ok((k, v))
        })
        .expect("query");
    rows.collect::<Result<_, _>>().expect("rows")
}

const MEASURES: &str = "SUM(events), SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens), SUM(reasoning_tokens), \
     SUM(cost_nanos), SUM(revenue_nanos), SUM(credits_nanos), SUM(unpriced_events)";

/// The per-dimension daily rows, and the same sums straight from the events.
fn dims_and_events(dir: &std::path::Path) -> (Sums, Sums) {
    let conn = Connection::open(dir.join("meterline.db")).expect("open");
    let dims = sums(
        &conn,
        &format!("SELECT tenant, window_start, feature, model, environment, billable, {MEASURES} FROM rollups_daily_by_dims GROUP BY 1, 2, 3, 4, 5, 6"),
        6,
    );
    let events = sums(
        &conn,
        "SELECT tenant, (event_time / 86400) * 86400, feature, model, environment, billable, COUNT(*), SUM(input_tokens), \
         SUM(output_tokens), SUM(cached_input_tokens), SUM(reasoning_tokens), SUM(cost_nanos), SUM(revenue_nanos), \
         SUM(credits_nanos), SUM(cost_source = 0) FROM events GROUP BY 1, 2, 3, 4, 5, 6",
        6,
    );
    (dims, events)
}

/// Usage by day and model from the API: (day, model) -> (events, input tokens).
async fn by_day_and_model(url: &str, range: &str) -> BTreeMap<(String, String), (u64, u64)> {
    let (status, body) = get_json(&format!("{url}/v1/usage?granularity=day&group_by=model&limit=10000&{range}"), Some(READ)).await;
    assert_eq!(status, 200, "{body}");
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| ((r["window_start"].as_str().unwrap_or_default().to_owned(), r["model"].as_str().unwrap_or_default().to_owned()), (r["events"].as_u64().unwrap_or(0), r["input_tokens"].as_u64().unwrap_or(0))))
        .collect()
}

#[tokio::test]
async fn usage_by_day_and_model_equals_the_stored_events() {
    let dir = temp_dir("embedded-dims");
    let server = Embedded::start(&dir, "").await;
    let events = history("d", 300);
    post(&server.url, &events).await;
    // A retry of every event changes nothing.
    post(&server.url, &events).await;

    let (dims, raw) = dims_and_events(&dir);
    assert!(!dims.is_empty());
    assert_eq!(dims, raw, "every daily row sums exactly its events");

    // Partial days at both ends: daily rows inside, minute rows at the edges.
    let now = chrono::Utc::now();
    let range = format!("from={}&to={}", at(now - chrono::Duration::hours(100)), at(now + chrono::Duration::hours(1)));
    let answered = by_day_and_model(&server.url, &range).await;
    let mut truth: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let from = now - chrono::Duration::hours(100);
    for e in &events {
        let t: chrono::DateTime<chrono::Utc> = e["timestamp"].as_str().and_then(|s| s.parse().ok()).expect("time");
        // Ranges apply to minute windows, as the API documents.
        if t.timestamp() / 60 * 60 < from.timestamp() {
            continue;
        }
        let day = at(chrono::DateTime::from_timestamp(t.timestamp() / 86_400 * 86_400, 0).expect("day"));
        let row = truth.entry((day, e["model"].as_str().expect("model").to_owned())).or_default();
        *row = (row.0 + 1, row.1 + e["input_tokens"].as_u64().expect("tokens"));
    }
    assert_eq!(answered, truth);
    server.stop().await;
}

#[tokio::test]
async fn a_store_made_before_the_dimension_rollup_is_backfilled() {
    let dir = temp_dir("embedded-dims-backfill");
    let server = Embedded::start(&dir, "").await;
    post(&server.url, &history("b", 200)).await;
    server.stop().await;
    {
        // Back to the schema before the rollup (migration 6), data and all.
        let conn = Connection::open(dir.join("meterline.db")).expect("open");
        conn.execute_batch("DROP TABLE rollups_daily_by_dims; PRAGMA user_version = 5;").expect("downgrade");
    }
    let server = Embedded::start(&dir, "").await;
    let (status, _) = get_json(&format!("{}/readyz", server.url), None).await;
    assert_eq!(status, 200);
    let (dims, raw) = dims_and_events(&dir);
    assert_eq!(dims.values().map(|v| v[0]).sum::<i64>(), 200);
    assert_eq!(dims, raw, "backfilled from the minute rows, exactly");
    server.stop().await;
}

/// Top spenders (user, cost) over `range`, and what the events table says.
async fn top_and_truth(url: &str, dir: &std::path::Path, range: &str, from: i64) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let (status, body) = get_json(&format!("{url}/v1/top-spenders?metric=cost&limit=3&{range}"), Some(READ)).await;
    assert_eq!(status, 200, "{body}");
    let top: Vec<(String, String)> = body["rows"].as_array().expect("rows").iter().map(|r| (r["user_id"].as_str().unwrap_or_default().to_owned(), r["cost_usd"].as_str().unwrap_or_default().to_owned())).collect();
    let conn = Connection::open(dir.join("meterline.db")).expect("open");
    let mut stmt = conn
        .prepare("SELECT user_id, SUM(cost_nanos) AS c FROM events WHERE (event_time / 60) * 60 >= ?1 GROUP BY user_id ORDER BY c DESC, user_id LIMIT 3")
        .expect("prepare");
    let truth: Vec<(String, i64)> = stmt.query_map([from], |r| Ok((r.get(0)?, r.get(1)?))).expect("query").collect::<Result<_, _>>().expect("rows");
    (top, truth.into_iter().map(|(u, c)| (u, format!("{c}"))).collect())
}

#[tokio::test]
async fn kept_rankings_see_late_events_at_once() {
    let dir = temp_dir("embedded-ranking-cache");
    let server = Embedded::start(&dir, "").await;
    post(&server.url, &history("r", 200)).await;
    let now = chrono::Utc::now();
    let from = now - chrono::Duration::days(3);
    let range = format!("from={}&to={}", at(from), at(now + chrono::Duration::hours(1)));
    let nanos = |usd: &str| -> String {
        let (whole, frac) = usd.split_once('.').unwrap_or((usd, ""));
        format!("{}", whole.parse::<i64>().expect("usd") * 1_000_000_000 + format!("{frac:0<9}").parse::<i64>().expect("usd"))
    };
    let mut answers = Vec::new();
    for late in [false, false, true] {
        if late {
            // A user nobody ranked, much spend, two days ago: inside the kept whole hours.
            let t = (now - chrono::Duration::days(2)).to_rfc3339();
            post(&server.url, &[json!({"idempotency_key": "late-1", "timestamp": t, "user_id": "u-late", "feature": "chat", "model": "gpt-4o", "cost_usd": "1000"})]).await;
        }
        let (top, truth) = top_and_truth(&server.url, &dir, &range, from.timestamp() / 60 * 60 + 60).await;
        let top: Vec<(String, String)> = top.into_iter().map(|(u, c)| (u, nanos(&c))).collect();
        assert_eq!(top, truth, "late event sent: {late}");
        answers.push(top);
    }
    assert_eq!(answers[2][0].0, "u-late", "the late event ranks at once");
    let metrics = reqwest::get(format!("{}/metrics", server.url)).await.expect("metrics").text().await.expect("text");
    assert!(metrics.lines().any(|l| l.starts_with("meterline_query_ranking_cache") && l.contains("hit")), "the second answer came from the cache");
    server.stop().await;
}

#[tokio::test]
async fn a_plan_put_after_events_were_counted_counts_the_next_ones() {
    let dir = temp_dir("embedded-plan-cache");
    let server = Embedded::start(&dir, "").await;
    let client = reqwest::Client::new();
    let event = |k: &str| json!([{"idempotency_key": k, "timestamp": chrono::Utc::now().to_rfc3339(), "user_id": "p", "feature": "chat", "model": "gpt-4o", "cost_usd": "0.25"}]);
    // Counted while the tenant has no plans: the writer keeps that it has none.
    post(&server.url, event("before").as_array().expect("one")).await;
    let plan = json!({"limits": [{"name": "budget", "measure": "cost_usd", "period": "day", "amount": "10"}]});
    let r = client.put(format!("{}/v1/plans/default", server.url)).bearer_auth("acme-admin-key").json(&plan).send().await.expect("put");
    assert_eq!(r.status(), 200);
    post(&server.url, event("after").as_array().expect("one")).await;
    let (status, body) = get_json(&format!("{}/v1/users/p/limits", server.url), Some(READ)).await;
    assert_eq!(status, 200, "{body}");
    let budget = body["limits"].as_array().expect("limits").iter().find(|l| l["name"] == "budget").cloned().expect("budget");
    assert_eq!(budget["used"], "0.25", "the event after the plan counts, the one before does not: {budget}");
    server.stop().await;
}

/// The database file's own page count (its header, offset 28): only a
/// checkpoint moves pages from the WAL into the file.
fn file_pages(dir: &std::path::Path) -> u32 {
    let bytes = std::fs::read(dir.join("meterline.db")).unwrap_or_default();
    bytes.get(28..32).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[tokio::test]
async fn the_wal_is_checkpointed_beside_the_commits() {
    let dir = temp_dir("embedded-checkpoint");
    let server = Embedded::start(&dir, "").await;
    post(&server.url, &history("c", 100)).await;
    let before = file_pages(&dir);
    // Enough pages that a checkpoint moves the file's size.
    for tag in ["w1", "w2", "w3"] {
        post(&server.url, &history(tag, 1_000)).await;
    }
    let grown = poll_until(Duration::from_secs(30), "a checkpoint to copy the WAL into the database file", || async {
        let now = file_pages(&dir);
        (now > before).then_some(now)
    })
    .await;
    assert!(grown > before);
    server.stop().await;
}
