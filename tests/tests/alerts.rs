//! Runaway users: one user jumps to 200x the median, the alert opens, shows in
//! the query API, in /metrics and at the webhook, and resolves when the user
//! calms down; a tenant whose users are all quiet gets no alert.


use meterline_tests::stack::Process;
use meterline_tests::webhook::Webhooks;
use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

fn spend(user: &str, n: usize, cost: &str) -> Value {
    json!({
        "idempotency_key": format!("{user}-{n}-{cost}"),
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "user_id": user,
        "feature": "chat",
        "model": "gpt-4o",
        "cost_usd": cost,
        "revenue_usd": cost,
    })
}

async fn post(url: &str, key: &str, events: Vec<Value>) {
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth(key).json(&events).send().await.expect("post");
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn runaway_user_opens_notifies_and_resolves() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("runaway").await;

    let hooks = Webhooks::start().await;
    let hook = &hooks.url;

    let metrics_port = free_port();
    let config = aggregator_config(
        metrics_port,
        &brokers,
        &topic,
        &ch.url,
        &database,
        &format!(
            "[alerts]\nwebhook_url = \"{hook}\"\ninterval_secs = 1\n\
             [alerts.rules]\nwindow_secs = 120\nabsolute_cost = \"1000\"\npeer_multiple = 50\npeer_floor = \"0.1\"\n\
             self_multiple = 10\nself_floor = \"0.1\"\nmargin_loss = \"1000\"\n"
        ),
    );
    let agg = Process::start("meterline-aggregator", &config);
    let api = QueryApi::start(&ch.url, &database).await;

    // Quiet traffic: 20 acme users and 10 globex users spend $0.003 each.
    let quiet = |prefix: &str, users: usize| -> Vec<Value> {
        (0..users).flat_map(|u| (0..3).map(move |n| (u, n))).map(|(u, n)| spend(&format!("{prefix}-{u}"), n, "0.001")).collect()
    };
    post(&ingest.url, "acme-ingest-key", quiet("acme", 20)).await;
    post(&ingest.url, "globex-ingest-key", quiet("globex", 10)).await;
    poll_until(Duration::from_secs(60), "the quiet traffic rolled up", || async {
        let (status, body) = api.get("/v1/usage?granularity=total", Some("acme-read-key")).await;
        (status == 200 && body["rows"][0]["events"] == json!(60)).then_some(())
    })
    .await;
    // One user jumps to 200x the median: $0.60 against $0.003.
    post(&ingest.url, "acme-ingest-key", (0..6).map(|n| spend("runaway", n, "0.1")).collect()).await;
    let opened = poll_until(Duration::from_secs(60), "the peers alert to open", || async {
        let (_, body) = api.get("/v1/alerts?state=open&rule=peers", Some("acme-read-key")).await;
        body["alerts"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0]["user_id"], "runaway");
    assert_eq!(opened[0]["observed_usd"], "0.6");
    assert_eq!(opened[0]["threshold_usd"], "0.15", "50 x the $0.003 median");
    assert_eq!(opened[0]["window_secs"], 120);
    let text = poll_until(Duration::from_secs(20), "the open alert in /metrics", || async {
        let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.ok()?.text().await.ok()?;
        text.contains("meterline_aggregator_alerts_open{tenant=\"acme\",rule=\"peers\"} 1").then_some(text)
    })
    .await;
    assert!(!text.contains("tenant=\"globex\",rule="), "no alert series for the quiet tenant");
    poll_until(Duration::from_secs(30), "the webhook to hear of it", || async {
        hooks.bodies().iter().any(|b| b["event"] == "opened" && b["user_id"] == "runaway" && b["rule"] == "peers").then_some(())
    })
    .await;

    // The quiet tenant has no alert at all.
    let (_, body) = api.get("/v1/alerts?state=all", Some("globex-read-key")).await;
    assert_eq!(body["alerts"], json!([]));
    // No acme user but the runaway one is alerted.
    let (_, body) = api.get("/v1/alerts?state=all", Some("acme-read-key")).await;
    assert!(body["alerts"].as_array().expect("alerts").iter().all(|a| a["user_id"] == "runaway"), "{body}");

    // The user calms down: once the spike leaves the 2-minute window, the alert resolves.
    poll_until(Duration::from_secs(240), "the alert to resolve", || async {
        let (_, body) = api.get("/v1/alerts?state=resolved&rule=peers", Some("acme-read-key")).await;
        body["alerts"].as_array().filter(|a| a.iter().any(|x| x["user_id"] == "runaway")).map(|_| ())
    })
    .await;
    poll_until(Duration::from_secs(30), "the webhook to hear it resolved", || async {
        hooks.bodies().iter().any(|b| b["event"] == "resolved" && b["user_id"] == "runaway" && b["rule"] == "peers").then_some(())
    })
    .await;
    drop(agg);
    ingest.stop().await;
}
