//! The query API against the real stack: after the ground-truth workload,
//! every endpoint's numbers equal what the test computes itself.

use meterline_clickhouse::write::{UserSum, user_sums};
use meterline_schemas::Nanos;
use meterline_tests::stack::Process;
use meterline_tests::workload::{self, Totals};
use meterline_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn nanos(v: &Value) -> i64 {
    Nanos::parse(v.as_str().expect("decimal string")).expect("decimal").0
}

fn share(value: i128, total: i128) -> String {
    // Six decimals, rounded half away from zero, computed here independently.
    let q = (value * 2_000_000 / total + 1) / 2;
    format!("{}.{:06}", q / 1_000_000, q % 1_000_000)
}

#[tokio::test]
async fn every_endpoint_equals_the_ground_truth() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("query").await;
    let agg_config = aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, "");
    let agg = Process::start("meterline-aggregator", &agg_config);
    let work = workload::generate(7, 2_500, 150, 500, chrono::Utc::now());
    for b in &work.batches {
        let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("acme-ingest-key").json(b).send().await.expect("post");
        assert_eq!(r.status(), 202);
    }
    // Another tenant's traffic, which acme must never see.
    let globex: Vec<Value> = (0..30).map(|n| event("globex-user", n)).collect();
    let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("globex-ingest-key").json(&globex).send().await.expect("post");
    assert_eq!(r.status(), 202);
    workload::wait_rolled_up(&ch, &database, &[("acme", work.unique_events), ("globex", 30)]).await;

    let api = QueryApi::start(&ch.url, &database).await;
    let now = chrono::Utc::now();
    let range = format!(
        "from={}&to={}",
        (now - chrono::Duration::days(40)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    let key = Some("acme-read-key");

    // Usage per user and minute: exactly the ground truth.
    let (status, body) = api.get(&format!("/v1/usage?granularity=minute&group_by=user_id&limit=100000&{range}"), key).await;
    assert_eq!(status, 200, "{body}");
    let mut got: BTreeMap<(String, i64), Totals> = BTreeMap::new();
    for r in body["rows"].as_array().expect("rows") {
        let w = chrono::DateTime::parse_from_rfc3339(r["window_start"].as_str().expect("window")).expect("rfc3339").timestamp();
        got.insert(
            (r["user_id"].as_str().expect("user").to_owned(), w),
            Totals {
                events: r["events"].as_u64().expect("events"),
                input_tokens: r["input_tokens"].as_u64().expect("n"),
                output_tokens: r["output_tokens"].as_u64().expect("n"),
                cached_input_tokens: r["cached_input_tokens"].as_u64().expect("n"),
                reasoning_tokens: r["reasoning_tokens"].as_u64().expect("n"),
                cost_nanos: nanos(&r["cost_usd"]),
                revenue_nanos: nanos(&r["revenue_usd"]),
                unpriced_events: r["unpriced_events"].as_u64().expect("n"),
            },
        );
        assert_eq!(nanos(&r["margin_usd"]), nanos(&r["revenue_usd"]) - nanos(&r["cost_usd"]));
    }
    assert_eq!(got, work.expected, "usage by user and minute");

    // By user and day, read from the 1-day spans for whole days and minute
    // rows for the range's edges: the same numbers.
    let (status, body) = api.get(&format!("/v1/usage?granularity=day&group_by=user_id&limit=100000&{range}"), key).await;
    assert_eq!(status, 200, "{body}");
    let mut expected_days: BTreeMap<(String, i64), (u64, i64, i64)> = BTreeMap::new();
    for ((user, window), t) in &work.expected {
        let e = expected_days.entry((user.clone(), window.div_euclid(86_400) * 86_400)).or_default();
        e.0 += t.events;
        e.1 += t.cost_nanos;
        e.2 += t.revenue_nanos;
    }
    let got_days: BTreeMap<(String, i64), (u64, i64, i64)> = body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let day = chrono::DateTime::parse_from_rfc3339(r["window_start"].as_str().expect("day")).expect("rfc3339").timestamp();
            ((r["user_id"].as_str().expect("user").to_owned(), day), (r["events"].as_u64().expect("n"), nanos(&r["cost_usd"]), nanos(&r["revenue_usd"])))
        })
        .collect();
    assert_eq!(got_days, expected_days, "usage by user and day");

    // Per-user totals, computed from the ground truth.
    let mut users: BTreeMap<String, Totals> = BTreeMap::new();
    for ((user, _), t) in &work.expected {
        let u = users.entry(user.clone()).or_default();
        u.events += t.events;
        u.cost_nanos += t.cost_nanos;
        u.revenue_nanos += t.revenue_nanos;
        u.input_tokens += t.input_tokens;
    }
    let total_cost: i128 = users.values().map(|t| i128::from(t.cost_nanos)).sum();

    // Top spenders by cost: order, values and shares exact.
    let (status, body) = api.get(&format!("/v1/top-spenders?metric=cost&limit=10&{range}"), key).await;
    assert_eq!(status, 200, "{body}");
    let mut expected: Vec<(&String, &Totals)> = users.iter().collect();
    expected.sort_by(|a, b| b.1.cost_nanos.cmp(&a.1.cost_nanos).then(a.0.cmp(b.0)));
    let rows = body["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 10);
    for (row, (user, t)) in rows.iter().zip(&expected) {
        assert_eq!(row["user_id"], json!(user));
        assert_eq!(nanos(&row["cost_usd"]), t.cost_nanos);
        assert_eq!(row["share"], json!(share(i128::from(t.cost_nanos), total_cost)), "{user}");
    }
    assert_eq!(i128::from(nanos(&body["total"]["cost_usd"])), total_cost);

    // Lowest margin first, and the negative-margin users counted and listed.
    let negative: Vec<&String> = users.iter().filter(|(_, t)| t.revenue_nanos < t.cost_nanos).map(|(u, _)| u).collect();
    assert!(!negative.is_empty(), "the workload has users who lose money");
    let (status, body) = api.get(&format!("/v1/margins?group_by=user_id&negative_only=true&limit=10000&{range}"), key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["negative_margin_groups"], json!(negative.len()));
    let listed: Vec<&str> = body["rows"].as_array().expect("rows").iter().map(|r| r["user_id"].as_str().expect("user")).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, negative.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let margins: Vec<i64> = body["rows"].as_array().expect("rows").iter().map(|r| nanos(&r["margin_usd"])).collect();
    assert!(margins.windows(2).all(|w| w[0] <= w[1]), "lowest margin first");

    // One user's statement.
    let (top_user, top) = expected[0];
    let (status, body) = api.get(&format!("/v1/users/{top_user}/usage?{range}"), key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["totals"]["events"], json!(top.events));
    assert_eq!(nanos(&body["totals"]["cost_usd"]), top.cost_nanos);
    assert_eq!(nanos(&body["totals"]["revenue_usd"]), top.revenue_nanos);
    let daily: u64 = body["daily"].as_array().expect("daily").iter().map(|d| d["events"].as_u64().expect("n")).sum();
    let by_feature: u64 = body["by_feature"].as_array().expect("f").iter().map(|d| d["events"].as_u64().expect("n")).sum();
    assert_eq!((daily, by_feature), (top.events, top.events));

    // The audit trail, paged: every one of the user's events, once.
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let c = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, body) = api.get(&format!("/v1/events?user_id={top_user}&limit=37&{range}{c}"), key).await;
        assert_eq!(status, 200, "{body}");
        for e in body["events"].as_array().expect("events") {
            keys.push(e["idempotency_key"].as_str().expect("key").to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!((keys.len() as u64, unique.len() as u64), (top.events, top.events));

    // The runaway rules' per-user sums (the aggregator's statement): whole
    // days from the per-user spans and partial days from minutes, equal to
    // the ground truth over the week, 20 days (the workload's late events
    // span 30) and the last hour (minutes only).
    let store = meterline_clickhouse::connect(&meterline_clickhouse::ClickHouseConfig {
        url: ch.url.clone(),
        database: database.clone(),
        user: "default".into(),
        password: String::new(),
        request_timeout_ms: 30_000,
    })
    .await
    .expect("connect");
    let now_s = now.timestamp();
    for (what, since) in [(UserSum::Cost, now_s - 7 * 86_400 - 1_234), (UserSum::Loss, now_s - 20 * 86_400), (UserSum::Cost, now_s - 3_600)] {
        let mut want: BTreeMap<String, i64> = BTreeMap::new();
        for ((user, _), t) in work.expected.iter().filter(|((_, window), _)| *window >= since) {
            *want.entry(user.clone()).or_default() += match what {
                UserSum::Cost => t.cost_nanos,
                UserSum::Loss => t.cost_nanos - t.revenue_nanos,
            };
        }
        let got = store.user_sums(&user_sums(what, "acme", since, now_s, None)).await.expect("user sums");
        let got: BTreeMap<String, i64> = got.into_iter().collect();
        assert_eq!(got, want, "{what:?} since {since}");
    }

    // Tenants are isolated; keys are scoped.
    let (status, body) = api.get(&format!("/v1/top-spenders?limit=1000&{range}"), Some("globex-read-key")).await;
    assert_eq!(status, 200);
    let seen: Vec<&str> = body["rows"].as_array().expect("rows").iter().map(|r| r["user_id"].as_str().expect("u")).collect();
    assert_eq!(seen, vec!["globex-user"]);
    let (_, body) = api.get(&format!("/v1/usage?granularity=total&user_id=globex-user&{range}"), key).await;
    assert_eq!(body["rows"], json!([]), "acme's key sees nothing of globex's user");
    assert_eq!(api.get("/v1/usage", Some("acme-ingest-key")).await.0, 403);
    assert_eq!(api.get("/v1/usage", None).await.0, 401);

    // Bad parameters are named.
    for (query, field) in [
        ("/v1/usage?granularity=week", "granularity"),
        ("/v1/usage?group_by=planet", "group_by"),
        ("/v1/usage?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", "from"),
        ("/v1/usage?to=yesterday", "to"),
        ("/v1/top-spenders?limit=5000", "limit"),
        ("/v1/top-spenders?metric=vibes", "metric"),
        ("/v1/usage?colour=blue", "colour"),
        ("/v1/events", "user_id"),
        ("/v1/events?user_id=u&cursor=zz", "cursor"),
    ] {
        let (status, body) = api.get(query, key).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["field"], json!(field), "{query}: {body}");
    }
    let (status, body) = api.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(body["paths"]["/v1/top-spenders"].is_object(), "OpenAPI document served");
    let served: Value = body;
    let checked_in: Value = serde_json::from_str(include_str!("../../query-api/openapi.json")).expect("openapi.json");
    assert_eq!(served, checked_in);
    // The query API's own metrics pass promtool.
    let text = reqwest::get(format!("{}/metrics", api.url)).await.expect("metrics").text().await.expect("text");
    assert!(text.contains("meterline_query_requests_total{endpoint=\"/v1/top-spenders\",status=\"200\"}"), "{text}");
    let (ok, out) = promtool(&["check", "metrics"], &text);
    assert!(ok, "query API /metrics: {out}\n{text}");
    drop(agg);
    ingest.stop().await;
}

/// Hour, day and month buckets are UTC on a server whose own time zone is
/// not: Asia/Kolkata (UTC+5:30) moves both hour and day boundaries, so
/// local bucketing would put each event in the wrong window.
#[tokio::test]
async fn buckets_are_utc_on_a_server_in_another_time_zone() {
    use chrono::{Datelike, TimeZone, Utc};
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let ch = stack::ClickHouse::private_in("Asia/Kolkata").await;
    assert_eq!(ch.query("SELECT timezone()").await.trim(), "Asia/Kolkata");
    let topic = unique_topic("tz");
    let database = ch.database("tz").await;
    create_topic(&brokers, &topic, 4).await;
    let ingest = Ingest::start(ingest_config(&brokers, &topic, "")).await;
    let agg = Process::start("meterline-aggregator", &aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, ""));

    // Ten minutes either side of two hours around this month's first UTC
    // midnight (at most 31 days ago, inside the accepted 35).
    let now = Utc::now();
    let month = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().expect("month start").timestamp();
    let times = [month - 2 * 3600 + 600, month + 2 * 3600 + 600];
    let batch: Vec<Value> = times
        .iter()
        .enumerate()
        .map(|(n, t)| {
            let mut e = event("tz-user", n);
            e["timestamp"] = json!(Utc.timestamp_opt(*t, 0).single().expect("time").to_rfc3339());
            e
        })
        .collect();
    let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("acme-ingest-key").json(&batch).send().await.expect("post");
    assert_eq!(r.status(), 202);
    workload::wait_rolled_up(&ch, &database, &[("acme", 2)]).await;

    let api = QueryApi::start(&ch.url, &database).await;
    let fmt = |t: i64| Utc.timestamp_opt(t, 0).single().expect("time").format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let range = format!("from={}&to={}", fmt(month - 3 * 86_400 - 1800), fmt(now.timestamp() + 3600));
    let prev_month = {
        let m = Utc.timestamp_opt(month - 86_400, 0).single().expect("time");
        Utc.with_ymd_and_hms(m.year(), m.month(), 1, 0, 0, 0).single().expect("month").timestamp()
    };
    let day = |t: i64| t.div_euclid(86_400) * 86_400;
    let hour = |t: i64| t.div_euclid(3600) * 3600;
    // Each granularity through both rollup paths: whole days from the
    // per-user spans with minute edges, and (filtered by feature) minutes only.
    for (granularity, want) in [
        ("hour", [hour(times[0]), hour(times[1])]),
        ("day", [day(times[0]), day(times[1])]),
        ("month", [prev_month, month]),
    ] {
        for filter in ["", "&feature=chat"] {
            let (status, body) = api.get(&format!("/v1/usage?granularity={granularity}{filter}&{range}"), Some("acme-read-key")).await;
            assert_eq!(status, 200, "{body}");
            let got: Vec<(i64, u64)> = body["rows"]
                .as_array()
                .expect("rows")
                .iter()
                .map(|r| {
                    let w = chrono::DateTime::parse_from_rfc3339(r["window_start"].as_str().expect("window")).expect("rfc3339");
                    (w.timestamp(), r["events"].as_u64().expect("events"))
                })
                .collect();
            assert_eq!(got, vec![(want[0], 1), (want[1], 1)], "{granularity}{filter}: {body}");
        }
    }
    drop(agg);
    ingest.stop().await;
}
