//! Prometheus: the alert rules check and pass their unit tests, and every
//! service's /metrics passes `promtool check metrics`.

use meterline_tests::stack::Process;
use meterline_tests::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], "");
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"], "");
    assert!(ok, "{out}");
}

#[tokio::test]
async fn ingest_and_aggregator_metrics_pass_promtool() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("promtool").await;
    let port = free_port();
    let agg = Process::start(
        "meterline-aggregator",
        &aggregator_config(port, &brokers, &topic, &ch.url, &database, ""),
    );
    let events: Vec<_> = (0..20).map(|n| event("p-user", n)).collect();
    let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("acme-ingest-key").json(&events).send().await.expect("post");
    assert_eq!(r.status(), 202);
    let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("acme-ingest-key").json(&json!([{"x": 1}])).send().await.expect("post");
    assert_eq!(r.status(), 422);
    let text = reqwest::get(format!("{}/metrics", ingest.url)).await.expect("metrics").text().await.expect("text");
    let (ok, out) = promtool(&["check", "metrics"], &text);
    assert!(ok, "ingest /metrics: {out}\n{text}");
    // The aggregator's, once it has written and its business counters exist.
    let text = poll_until(Duration::from_secs(60), "the aggregator's business counters", || async {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
        text.contains("meterline_aggregator_usage_cost_nano_usd_total{tenant=\"acme\",model=\"gpt-4o\",feature=\"chat\"}").then_some(text)
    })
    .await;
    let (ok, out) = promtool(&["check", "metrics"], &text);
    assert!(ok, "aggregator /metrics: {out}\n{text}");
    drop(agg);
    ingest.stop().await;
}
