//! The load generator's smoke mode: a run through the real pipeline, then its
//! ground truth verified against the query API, user by user.

use meterline_schemas::Nanos;
use meterline_tests::load::{LoadOptions, run};
use meterline_tests::stack::Process;
use meterline_tests::*;
use std::time::Duration;

#[tokio::test]
async fn load_generator_ground_truth_matches_the_query_api() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("load").await;
    let agg = Process::start(
        "meterline-aggregator",
        &aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, ""),
    );
    let options = LoadOptions {
        url: ingest.url.clone(),
        key: "acme-ingest-key".into(),
        actions: 3_000,
        users: 200,
        batch: 250,
        concurrency: 3,
        rate: 0,
        seed: 11,
        // The optional runaway user too, and more retries than the default.
        mix: meterline_tests::workload::Mix { retry_pct: 20, runaway: true, ..Default::default() },
    };
    let (report, truth) = run(&options).await.expect("load run");
    assert!(report.errors_by_status.is_empty(), "{report:?}");
    assert_eq!(report.events_accepted, report.events_sent);
    assert_eq!(report.unique_events, 3_000);
    assert!(report.retries > 0 && report.conflicts > 0);

    let api = QueryApi::start(&ch.url, &database).await;
    let now = chrono::Utc::now();
    let range = format!(
        "from={}&to={}",
        (now - chrono::Duration::days(40)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    let rows = poll_until(Duration::from_secs(120), "every unique event to be queryable", || {
        let (api, range) = (&api, &range);
        async move {
            let (status, body) = api.get(&format!("/v1/top-spenders?limit=1000&{range}"), Some("acme-read-key")).await;
            (status == 200 && body["total"]["events"] == serde_json::json!(3_000)).then(|| body["rows"].as_array().cloned().unwrap_or_default())
        }
    })
    .await;
    assert_eq!(rows.len(), truth.len(), "one row per user");
    assert_eq!(rows[0]["user_id"], "user-runaway", "the runaway user spends the most");
    for row in rows {
        let user = row["user_id"].as_str().expect("user");
        let t = &truth[user];
        let tokens = ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"].iter().map(|k| row[k].as_u64().expect("n")).sum::<u64>();
        assert_eq!(row["events"].as_u64(), Some(t.events), "{user}");
        assert_eq!(tokens, t.tokens, "{user}");
        assert_eq!(Nanos::parse(row["cost_usd"].as_str().expect("cost")).expect("decimal").0, t.cost_nanos, "{user}");
        assert_eq!(Nanos::parse(row["revenue_usd"].as_str().expect("revenue")).expect("decimal").0, t.revenue_nanos, "{user}");
    }
    drop(agg);
    ingest.stop().await;
}
