//! One conformance suite, two stores: the same workload goes through the
//! distributed pipeline (ingest -> tansu -> aggregator -> ClickHouse 18.16) and
//! through the all-in-one binary's embedded store, and every query answer must
//! be the same, byte for byte. The embedded answers are also checked against
//! the workload's independently computed ground truth, so two stores that
//! agree on a wrong answer still fail.

use meterline_schemas::Nanos;
use meterline_tests::stack::Process;
use meterline_tests::workload;
use meterline_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

fn nanos(v: &Value) -> i64 {
    Nanos::parse(v.as_str().expect("decimal string")).expect("decimal").0
}

async fn post_all(url: &str, key: &str, batches: &[Vec<Value>]) {
    let client = reqwest::Client::new();
    for b in batches {
        let r = client.post(format!("{url}/v1/events")).bearer_auth(key).json(b).send().await.expect("post");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }
}

/// Open alerts as (user, rule, observed, threshold), which both stores must agree on.
fn open_alerts(body: &Value) -> Vec<(String, String, String, String)> {
    let mut out: Vec<_> = body["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let s = |k: &str| x[k].as_str().unwrap_or_default().to_owned();
                    (s("user_id"), s("rule"), s("observed_usd"), s("threshold_usd"))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test]
async fn both_stores_give_the_same_answers() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("conformance").await;
    let agg_config = aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, "[alerts]\ninterval_secs = 1\n");
    let mut agg = Process::start("meterline-aggregator", &agg_config);
    let dir = temp_dir("conformance");
    let embedded = Embedded::start(&dir, "[storage]\nalert_eval_ms = 100\n[alerts]\ninterval_secs = 1\n").await;

    let now = chrono::Utc::now();
    let work = workload::generate(11, 2_500, 120, 250, now);
    let globex: Vec<Value> = (0..30).map(|n| event("globex-user", n)).collect();
    for url in [&ingest.url, &embedded.url] {
        post_all(url, "acme-ingest-key", &work.batches).await;
        post_all(url, "globex-ingest-key", std::slice::from_ref(&globex)).await;
    }
    workload::wait_rolled_up(&ch, &database, &[("acme", work.unique_events), ("globex", 30)]).await;
    let api = QueryApi::start(&ch.url, &database).await;
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let wide = format!("from={}&to={}", fmt(now - chrono::Duration::days(40)), fmt(now + chrono::Duration::hours(1)));
    // Partial days at both ends: the daily table plus minute-row edges.
    let edges = format!("from={}&to={}", fmt(now - chrono::Duration::hours(24 * 20 + 7)), fmt(now - chrono::Duration::minutes(3)));

    // Ground truth first: the embedded store's minute rows equal the workload's.
    let (status, body) = get_json(&format!("{}/v1/usage?granularity=minute&group_by=user_id&limit=100000&{wide}", embedded.url), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{body}");
    let mut got: BTreeMap<(String, i64), (u64, i64, i64, u64)> = BTreeMap::new();
    for r in body["rows"].as_array().expect("rows") {
        let w = chrono::DateTime::parse_from_rfc3339(r["window_start"].as_str().expect("window")).expect("rfc3339").timestamp();
        let user = r["user_id"].as_str().expect("user").to_owned();
        got.insert((user, w), (r["events"].as_u64().expect("n"), nanos(&r["cost_usd"]), nanos(&r["revenue_usd"]), r["input_tokens"].as_u64().expect("n")));
    }
    let want: BTreeMap<(String, i64), (u64, i64, i64, u64)> =
        work.expected.iter().map(|(k, t)| (k.clone(), (t.events, t.cost_nanos, t.revenue_nanos, t.input_tokens))).collect();
    assert_eq!(got, want, "embedded minute rollups differ from the ground truth");

    let mut cases: Vec<String> = Vec::new();
    for range in [&wide, &edges] {
        for g in ["minute", "hour", "day", "month", "total"] {
            for by in ["", "user_id", "customer_id,feature", "model"] {
                cases.push(format!("/v1/usage?granularity={g}&group_by={by}&limit=100000&{range}"));
            }
        }
        for filter in ["feature=chat", "billable=true", "environment=production", "customer_id=cust-3", "user_id=user-0000", "model=gpt-4o"] {
            cases.push(format!("/v1/usage?granularity=day&group_by=user_id&{filter}&limit=100000&{range}"));
            cases.push(format!("/v1/top-spenders?{filter}&{range}"));
        }
        for by in ["user_id", "customer_id"] {
            for metric in ["cost", "tokens", "revenue", "margin"] {
                for order in ["desc", "asc"] {
                    cases.push(format!("/v1/top-spenders?by={by}&metric={metric}&order={order}&limit=7&{range}"));
                }
            }
        }
        for by in ["user_id", "customer_id,model", "feature"] {
            cases.push(format!("/v1/margins?group_by={by}&limit=50&{range}"));
            cases.push(format!("/v1/margins?group_by={by}&negative_only=true&limit=50&{range}"));
        }
        cases.push(format!("/v1/users/user-0000/usage?{range}"));
        cases.push(format!("/v1/users/user-0003/usage?{range}"));
    }
    // Answers that are refusals must be the same refusals.
    for bad in ["/v1/usage?granularity=week", "/v1/top-spenders?limit=0", "/v1/margins?group_by=", "/v1/events", "/v1/usage?from=yesterday", "/v1/alerts?state=closed"] {
        cases.push(bad.to_owned());
    }
    for case in &cases {
        let (a, body_a) = api.get(case, Some("acme-read-key")).await;
        let (b, body_b) = get_json(&format!("{}{case}", embedded.url), Some("acme-read-key")).await;
        assert_eq!((a, &body_a), (b, &body_b), "ClickHouse and embedded differ on {case}");
        assert_documented(case, a, &body_a);
    }
    // Both stores against the ground truth where the last day is read as its
    // day rows minus the minute rows after `to` (the `edges` range ends 3
    // minutes ago, so that is the cheaper read): per-user totals over the range.
    let (edges_from, edges_to) = ((now - chrono::Duration::hours(24 * 20 + 7)).timestamp(), (now - chrono::Duration::minutes(3)).timestamp());
    let day_end = (edges_to.div_euclid(86_400) + 1) * 86_400;
    let after_to = work.expected.keys().filter(|(_, w)| (edges_to..day_end).contains(w)).count();
    assert!(after_to > 0, "the workload should have minute rows after the range's end on its last day");
    let mut truth: BTreeMap<String, (u64, i64, i64)> = BTreeMap::new();
    for ((user, w), t) in &work.expected {
        if (edges_from..edges_to).contains(w) {
            let e = truth.entry(user.clone()).or_default();
            *e = (e.0 + t.events, e.1 + t.cost_nanos, e.2 + t.revenue_nanos);
        }
    }
    for base in [api.url.as_str(), embedded.url.as_str()] {
        let (status, body) = get_json(&format!("{base}/v1/usage?granularity=total&group_by=user_id&limit=100000&{edges}"), Some("acme-read-key")).await;
        assert_eq!(status, 200, "{body}");
        let got: BTreeMap<String, (u64, i64, i64)> = body["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| (r["user_id"].as_str().expect("user").to_owned(), (r["events"].as_u64().expect("n"), nanos(&r["cost_usd"]), nanos(&r["revenue_usd"]))))
            .collect();
        assert_eq!(got, truth, "{base}: per-user totals over {edges} differ from the ground truth");
    }
    // Guard against agreeing on nothing: the wide range has rows.
    let (_, top) = api.get(&format!("/v1/top-spenders?limit=3&{wide}"), Some("acme-read-key")).await;
    assert_eq!(top["rows"].as_array().map(Vec::len), Some(3), "{top}");

    // Usage cut at `limit` pages: limit 7, the same pages on both stores,
    // and the pages in order are the uncut answer, no row twice or missing.
    for query in [
        format!("granularity=day&group_by=user_id&{wide}"),
        format!("granularity=hour&group_by=customer_id,feature&{edges}"),
        format!("granularity=total&group_by=user_id&{wide}"),
        format!("granularity=month&group_by=user_id,customer_id,feature,model&{edges}"),
    ] {
        let (status, whole) = api.get(&format!("/v1/usage?limit=100000&{query}"), Some("acme-read-key")).await;
        assert_eq!((status, &whole["next_cursor"]), (200, &Value::Null), "{query}: {whole}");
        let want = whole["rows"].as_array().expect("rows");
        assert!(want.len() > 7, "{query} should be cut at 7: {} rows", want.len());
        let (mut got, mut cursor) = (Vec::new(), String::new());
        loop {
            let path = format!("/v1/usage?limit=7&{query}{cursor}");
            let (a, body_a) = api.get(&path, Some("acme-read-key")).await;
            let (b, body_b) = get_json(&format!("{}{path}", embedded.url), Some("acme-read-key")).await;
            assert_eq!((a, &body_a), (b, &body_b), "ClickHouse and embedded differ on {path}");
            assert_documented(&path, a, &body_a);
            let rows = body_a["rows"].as_array().expect("rows");
            got.extend(rows.iter().cloned());
            match body_a["next_cursor"].as_str() {
                Some(c) => {
                    assert_eq!(rows.len(), 7, "a cut page is full: {path}");
                    cursor = format!("&cursor={c}");
                }
                None => break,
            }
            assert!(got.len() <= want.len(), "{query}: paging runs past the uncut answer");
        }
        assert_eq!(&got, want, "{query}: the pages differ from the uncut answer");
    }
    // A cursor is tied to its granularity and grouping.
    let (_, first) = api.get(&format!("/v1/usage?limit=7&granularity=day&group_by=user_id&{wide}"), Some("acme-read-key")).await;
    let c = first["next_cursor"].as_str().expect("cut");
    for base in [api.url.as_str(), embedded.url.as_str()] {
        let (status, body) = get_json(&format!("{base}/v1/usage?limit=7&granularity=hour&group_by=user_id&cursor={c}&{wide}"), Some("acme-read-key")).await;
        assert_eq!((status, body["error"]["field"].as_str()), (400, Some("cursor")), "{base}: {body}");
    }

    // The audit trail, paged, the same on both.
    for user in ["user-0000", "user-0005"] {
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let path = format!("/v1/events?user_id={user}&limit=25&{wide}{cursor}");
            let (a, body_a) = api.get(&path, Some("acme-read-key")).await;
            let (b, mut body_b) = get_json(&format!("{}{path}", embedded.url), Some("acme-read-key")).await;
            assert_documented(&path, a, &body_a);
            assert_documented(&path, b, &body_b);
            // The one store-specific part: the event's Kafka position, null without Kafka.
            let mut stripped = body_a.clone();
            for (body, kafka) in [(&mut stripped, true), (&mut body_b, false)] {
                for e in body["events"].as_array_mut().expect("events") {
                    let obj = e.as_object_mut().expect("event");
                    for k in ["kafka_partition", "kafka_offset"] {
                        assert_eq!(obj.remove(k).is_some_and(|v| v.is_null()), !kafka, "{k} on {path}");
                    }
                }
            }
            assert_eq!((a, &stripped), (b, &body_b), "audit trail differs on {path}");
            pages += 1;
            match body_a["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        assert!(pages > 1, "{user}'s trail should span pages");
    }

    // Tenants stay apart on both: globex sees only its own 30 events.
    for base in [api.url.as_str(), embedded.url.as_str()] {
        let (status, body) = get_json(&format!("{base}/v1/usage?granularity=total&{wide}"), Some("globex-read-key")).await;
        assert_eq!((status, body["rows"][0]["events"].as_u64()), (200, Some(30)), "{base}: {body}");
    }

    // Runaway alerts: once both have evaluated everything, the same open set.
    let alerts = format!("/v1/alerts?limit=1000&{wide}");
    let (a, b) = poll_until(Duration::from_secs(60), "both stores to hold the same open alerts", || async {
        let (_, a) = api.get(&alerts, Some("acme-read-key")).await;
        let (_, b) = get_json(&format!("{}{alerts}", embedded.url), Some("acme-read-key")).await;
        let (a, b) = (open_alerts(&a), open_alerts(&b));
        (a == b && !a.is_empty()).then_some((a, b))
    })
    .await;
    assert_eq!(a, b);
    for base in [api.url.as_str(), embedded.url.as_str()] {
        let (status, body) = get_json(&format!("{base}{alerts}&state=all"), Some("acme-read-key")).await;
        assert_documented(&alerts, status, &body);
    }
    // Alerts page too: on each store, pages of one are the whole list
    // (polled: evaluation may change the list between two reads).
    for base in [api.url.as_str(), embedded.url.as_str()] {
        poll_until(Duration::from_secs(60), "paged alerts to equal the whole list", || async {
            let all = format!("{base}/v1/alerts?state=all&{wide}");
            let (_, whole) = get_json(&format!("{all}&limit=1000"), Some("acme-read-key")).await;
            let want = whole["alerts"].as_array().cloned().unwrap_or_default();
            let (mut got, mut cursor) = (Vec::new(), String::new());
            while got.len() <= want.len() {
                let (status, page) = get_json(&format!("{all}&limit=1{cursor}"), Some("acme-read-key")).await;
                assert_documented("/v1/alerts", status, &page);
                got.extend(page["alerts"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = format!("&cursor={c}"),
                    None => break,
                }
            }
            (want.len() > 1 && got == want).then_some(())
        })
        .await;
    }
    // The workload's heaviest user spends far above the median and its own week.
    for rule in ["peers", "self"] {
        assert!(a.iter().any(|(user, r, _, _)| user == "user-0000" && r == rule), "{rule} alert for user-0000 missing: {a:?}");
    }

    agg.stop().await;
    embedded.stop().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}
