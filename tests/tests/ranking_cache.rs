//! The query API's ranking cache against the real stack: rankings stay exact
//! as of each request while the kept sums are reused, and the background
//! refresher reads a kept ranking's late hours before the next request
//! comes. Its own test binary with one test, so the cache's counters in
//! `/metrics` are this test's alone.

use chrono::{TimeZone, Utc};
use meterline_tests::stack::Process;
use meterline_tests::*;
use serde_json::{Value, json};

async fn post(url: &str, events: &[(&str, usize, i64, &str)]) {
    let batch: Vec<Value> = events
        .iter()
        .map(|(user, n, at, cost)| {
            let mut e = event(user, *n);
            e["timestamp"] = json!(Utc.timestamp_opt(*at, 0).single().expect("time").to_rfc3339());
            e["cost_usd"] = json!(cost);
            e
        })
        .collect();
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&batch).send().await.expect("post");
    assert_eq!(r.status(), 202);
}

/// (user, cost) of each row, and the total cost.
async fn top(api: &QueryApi, range: &str) -> (Vec<(String, String)>, String) {
    let (status, body) = api.get(&format!("/v1/top-spenders?metric=cost&limit=10&{range}"), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{body}");
    let rows = body["rows"].as_array().expect("rows").iter().map(|r| (r["user_id"].as_str().expect("user").to_owned(), r["cost_usd"].as_str().expect("cost").to_owned())).collect();
    (rows, body["total"]["cost_usd"].as_str().expect("total").to_owned())
}

/// The counter `series` (name and labels) in `/metrics`, 0 before it is first counted.
async fn counter(api: &QueryApi, series: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", api.url)).await.expect("metrics").text().await.expect("text");
    let prefix = format!("{series} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().expect("counter"))
}

/// The cache's look-ups by requests so far: (hit, stale, miss, slide).
async fn lookups(api: &QueryApi) -> (u64, u64, u64, u64) {
    let count = |result: &'static str| async move { counter(api, &format!("meterline_query_ranking_cache_lookups_total{{result=\"{result}\"}}")).await };
    (count("hit").await, count("stale").await, count("miss").await, count("slide").await)
}

#[tokio::test]
async fn kept_rankings_see_late_and_partial_hour_events_at_once() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("rankcache").await;
    let agg = Process::start("meterline-aggregator", &aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, ""));
    // A range in the past with partial hours at both ends: whole hours
    // [h - 5 h, h), edges [h - 5 h - 20 min, h - 5 h) and [h, h + 20 min).
    let h = Utc::now().timestamp().div_euclid(3_600) * 3_600 - 3 * 3_600;
    let fmt = |t: i64| Utc.timestamp_opt(t, 0).single().expect("time").format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let range = format!("from={}&to={}", fmt(h - 5 * 3_600 - 1_200), fmt(h + 1_200));
    // This API's refresher waits an hour between passes: what its requests
    // see below is the request path's own work.
    let api = QueryApi::start_with(&ch.url, &database, "ranking_refresh_ms = 3600000").await;
    let owned = |rows: &[(&str, &str)]| rows.iter().map(|(u, c)| ((*u).to_owned(), (*c).to_owned())).collect::<Vec<_>>();

    // e's hour, [h - 5 h, h - 4 h), leaves the range when it moves an hour on.
    post(&ingest.url, &[("a", 1, h - 3 * 3_600 + 10, "0.5"), ("b", 2, h - 2 * 3_600, "0.3"), ("d", 3, h - 5 * 3_600 - 600, "0.05"), ("e", 7, h - 4 * 3_600 - 600, "0.2")]).await;
    workload::wait_rolled_up(&ch, &database, &[("acme", 4)]).await;
    let want = (owned(&[("a", "0.5"), ("b", "0.3"), ("e", "0.2"), ("d", "0.05")]), "1.05".to_owned());
    assert_eq!(top(&api, &range).await, want);
    assert_eq!(lookups(&api).await, (0, 0, 1, 0), "the first ask reads and keeps");
    assert_eq!(top(&api, &range).await, want);
    assert_eq!(lookups(&api).await, (1, 0, 1, 0), "the second uses what was kept");

    // A late event inside the whole hours: the kept sums no longer count
    // every event, so they are read again.
    post(&ingest.url, &[("b", 4, h - 4 * 3_600, "0.4")]).await;
    workload::wait_rolled_up(&ch, &database, &[("acme", 5)]).await;
    assert_eq!(top(&api, &range).await, (owned(&[("b", "0.7"), ("a", "0.5"), ("e", "0.2"), ("d", "0.05")]), "1.45".to_owned()));
    assert_eq!(lookups(&api).await, (1, 1, 1, 0));

    // Events in the partial hours are read on every request: seen at once,
    // and the kept sums stay valid.
    post(&ingest.url, &[("c", 5, h + 300, "1.0"), ("a", 6, h - 5 * 3_600 - 60, "0.25")]).await;
    workload::wait_rolled_up(&ch, &database, &[("acme", 7)]).await;
    let all = owned(&[("c", "1"), ("a", "0.75"), ("b", "0.7"), ("e", "0.2"), ("d", "0.05")]);
    assert_eq!(top(&api, &range).await, (all, "2.7".to_owned()));
    assert_eq!(lookups(&api).await, (2, 1, 1, 0));

    // Margins share the kept sums (same tenant, filters and grouping).
    let (status, body) = api.get(&format!("/v1/margins?group_by=user_id&{range}"), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["negative_margin_groups"], json!(5), "nobody here has revenue: {body}");
    assert_eq!(body["rows"][0]["user_id"], json!("c"), "lowest margin first: {body}");
    assert_eq!(body["total"]["cost_usd"], json!("2.7"));
    assert_eq!(lookups(&api).await, (3, 1, 1, 0));

    // The range an hour later, as a dashboard's "last 30 days" moves when
    // the hour turns: the kept sums slide. e's hour left the whole hours (e
    // is now in the range's first partial hour), c's hour joined them, d
    // and a's early event are out of range.
    let moved = format!("from={}&to={}", fmt(h - 4 * 3_600 - 1_200), fmt(h + 3_600 + 1_200));
    let want = (owned(&[("c", "1"), ("b", "0.7"), ("a", "0.5"), ("e", "0.2")]), "2.4".to_owned());
    assert_eq!(top(&api, &moved).await, want);
    assert_eq!(lookups(&api).await, (3, 1, 1, 1));
    assert_eq!(top(&api, &moved).await, want);
    assert_eq!(lookups(&api).await, (4, 1, 1, 1), "the slid sums are kept for the new hours");

    // A range ending tomorrow: only past hours are kept, so events arriving
    // in the current hour are read with the edge, and the kept sums stay good.
    // (Within one clock hour: when it turns, the kept hours move, by design.)
    poll_until(std::time::Duration::from_secs(150), "two minutes clear of the hour's end", || async {
        (Utc::now().timestamp().rem_euclid(3_600) < 3_480).then_some(())
    })
    .await;
    let later = format!("from={}&to={}", fmt(h - 5 * 3_600 - 1_200), fmt(Utc::now().timestamp() + 86_400));
    let all = owned(&[("c", "1"), ("a", "0.75"), ("b", "0.7"), ("e", "0.2"), ("d", "0.05")]);
    assert_eq!(top(&api, &later).await, (all.clone(), "2.7".to_owned()));
    assert_eq!(lookups(&api).await, (4, 1, 1, 2), "three hours from a kept entry: slid");
    let now = Utc::now().timestamp();
    post(&ingest.url, &[("x", 8, now, "0.01")]).await;
    workload::wait_rolled_up(&ch, &database, &[("acme", 8)]).await;
    let mut with_x = all;
    with_x.push(("x".to_owned(), "0.01".to_owned()));
    assert_eq!(top(&api, &later).await, (with_x, "2.71".to_owned()));
    assert_eq!(lookups(&api).await, (5, 1, 1, 2), "the current hour is not kept, so its events change nothing kept");

    // A second API whose refresher passes every 200 ms: after late events
    // land in a kept hour, it reads the hour again before anyone asks, and
    // the next request answers from kept sums, exactly.
    let refreshed = QueryApi::start_with(&ch.url, &database, "ranking_refresh_ms = 200").await;
    let all = owned(&[("c", "1"), ("a", "0.75"), ("b", "0.7"), ("e", "0.2"), ("d", "0.05")]);
    assert_eq!(top(&refreshed, &range).await, (all, "2.7".to_owned()));
    assert_eq!(lookups(&refreshed).await, (5, 1, 2, 2), "its first ask reads and keeps");
    let rereads = counter(&refreshed, "meterline_query_ranking_refreshes_total{result=\"reread\"}").await;
    post(&ingest.url, &[("f", 9, h - 2 * 3_600 + 30, "0.6")]).await;
    workload::wait_rolled_up(&ch, &database, &[("acme", 9)]).await;
    // A pass that started after every table had the event has finished.
    let passes = counter(&refreshed, "meterline_query_ranking_refresh_passes_total").await;
    poll_until(std::time::Duration::from_secs(60), "two refresher passes", || async {
        (counter(&refreshed, "meterline_query_ranking_refresh_passes_total").await >= passes + 2).then_some(())
    })
    .await;
    let with_f = owned(&[("c", "1"), ("a", "0.75"), ("b", "0.7"), ("f", "0.6"), ("e", "0.2"), ("d", "0.05")]);
    assert_eq!(top(&refreshed, &range).await, (with_f, "3.3".to_owned()));
    assert_eq!(lookups(&refreshed).await, (6, 1, 2, 2), "a hit: the request read no groups, the refresher had");
    assert!(counter(&refreshed, "meterline_query_ranking_refreshes_total{result=\"reread\"}").await > rereads, "the refresher read the late hour");
    drop(agg);
    ingest.stop().await;
}
