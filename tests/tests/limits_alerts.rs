//! Limit alerts in the all-in-one binary: a plan's `notify_at` thresholds and
//! a hard limit's amount fire once per subject, limit and period, at the
//! alert webhook (signed with the tenant's secret, unsigned without one) and
//! in `/v1/alerts?rule=limit`; retried events fire nothing again.

use meterline_limits::notify::signature;
use meterline_schemas::tenants::hash_key;
use meterline_tests::webhook::Webhooks;
use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const SECRET: &str = "whsec_limits_alerts_test";
const HOOKED_INGEST: &str = "hooked-ingest-key";
const HOOKED_READ: &str = "hooked-read-key";
const HOOKED_ADMIN: &str = "hooked-admin-key";

/// The limit alerts received for `tenant`: each body, and its signature header.
fn limit_alerts(hooks: &Webhooks, tenant: &str) -> Vec<(Value, Option<String>, Vec<u8>)> {
    hooks
        .requests()
        .into_iter()
        .filter_map(|(sig, raw)| {
            let body: Value = serde_json::from_slice(&raw).ok()?;
            (body["kind"] == "limit" && body["tenant"] == tenant).then_some((body, sig, raw))
        })
        .collect()
}

/// Checks a `Meterline-Signature` value against the body, as a receiver would.
fn verify(header: &str, raw: &[u8]) {
    let t: i64 = header.strip_prefix("t=").and_then(|r| r.split(',').next()).and_then(|t| t.parse().ok()).expect("t= in the header");
    assert!((chrono::Utc::now().timestamp() - t).abs() < 120, "signed just now: {header}");
    assert_eq!(header, signature(SECRET.as_bytes(), t, raw), "the signature is HMAC-SHA256(secret, \"<t>.<body>\")");
}

async fn send(client: &reqwest::Client, method: reqwest::Method, url: String, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_fire_once_signed_and_are_listed() {
    let hooks = Webhooks::start().await;
    let hook = &hooks.url;
    let extra = format!(
        "[alerts]\nwebhook_url = \"{hook}\"\nwebhook_retries = 1\n\
         [[tenants]]\nid = \"hooked\"\nwebhook_secret = \"{SECRET}\"\n\
         [[tenants.keys]]\nname = \"ingest\"\nsha256 = \"{}\"\nscopes = [\"ingest\"]\n\
         [[tenants.keys]]\nname = \"read\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n\
         [[tenants.keys]]\nname = \"admin\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
        hash_key(HOOKED_INGEST),
        hash_key(HOOKED_READ),
        hash_key(HOOKED_ADMIN),
    );
    let server = Embedded::start(&temp_dir("limits-alerts"), &extra).await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", server.url);
    let plan = json!({"limits": [{"name": "daily", "measure": "events", "period": "day", "amount": "10", "notify_at": ["0.5", "1"]}]});
    for admin in [HOOKED_ADMIN, "acme-admin-key"] {
        let (status, body) = send(&client, reqwest::Method::PUT, url("/v1/plans/default"), admin, Some(plan.clone())).await;
        assert_eq!(status, 200, "{body}");
    }
    let post = |key: &'static str, user: &'static str, ns: std::ops::Range<usize>| {
        let (client, url) = (client.clone(), url("/v1/events"));
        async move {
            let events: Vec<Value> = ns.map(|n| event(user, n)).collect();
            let (status, body) = send(&client, reqwest::Method::POST, url, key, Some(json!(events))).await;
            assert_eq!(status, 202, "{body}");
        }
    };
    let listed = |n: usize| {
        let (client, url) = (client.clone(), url("/v1/alerts?rule=limit"));
        async move {
            let (status, body) = send(&client, reqwest::Method::GET, url, HOOKED_READ, None).await;
            assert_eq!(status, 200, "{body}");
            let alerts = body["alerts"].as_array().cloned().unwrap_or_default();
            (alerts.len() == n).then_some(alerts)
        }
    };

    // 6 of 10: past the half, not the amount. Events are counted one by
    // one in the writer's transaction, so the crossing is the fifth's.
    post(HOOKED_INGEST, "u1", 0..6).await;
    let first = poll_until(Duration::from_secs(20), "the 0.5 crossing at the webhook", || async {
        let got = limit_alerts(&hooks, "hooked");
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(first.len(), 1);
    let (body, sig, raw) = &first[0];
    verify(sig.as_deref().expect("a tenant with a secret is signed"), raw);
    assert_eq!(
        (&body["event"], &body["scope"], &body["subject_id"], &body["limit"], &body["plan"], &body["measure"]),
        (&json!("crossed"), &json!("user"), &json!("u1"), &json!("daily"), &json!("default"), &json!("events")),
        "{body}"
    );
    assert_eq!((&body["ratio"], &body["threshold"], &body["used"], &body["amount"]), (&json!("0.5"), &json!("5"), &json!("5"), &json!("10")), "{body}");
    assert!(body["period_start"].as_str().is_some_and(|t| t.ends_with("T00:00:00Z")) && body["resets_at"].is_string(), "{body}");
    let alerts = poll_until(Duration::from_secs(10), "the alert listed", || listed(1)).await;
    assert_eq!(
        (&alerts[0]["user_id"], &alerts[0]["rule"], &alerts[0]["state"], &alerts[0]["observed_usd"], &alerts[0]["threshold_usd"], &alerts[0]["window_secs"]),
        (&json!("u1"), &json!("limit"), &json!("open"), &json!("5"), &json!("5"), &json!(86_400)),
        "{alerts:?}"
    );

    // The same six again (retries) count nothing and fire nothing.
    post(HOOKED_INGEST, "u1", 0..6).await;
    // Six more: 12 of 10 reaches the amount, once.
    post(HOOKED_INGEST, "u1", 6..12).await;
    let both = poll_until(Duration::from_secs(20), "the 1.0 crossing at the webhook", || async {
        let got = limit_alerts(&hooks, "hooked");
        (got.len() >= 2).then_some(got)
    })
    .await;
    let (body, sig, raw) = &both[1];
    verify(sig.as_deref().expect("signed"), raw);
    assert_eq!((&body["event"], &body["ratio"], &body["threshold"], &body["used"]), (&json!("reached"), &json!("1"), &json!("10"), &json!("10")), "{body}");
    post(HOOKED_INGEST, "u1", 0..12).await;
    post(HOOKED_INGEST, "u1", 12..14).await;

    // A tenant without a secret is sent the same body, unsigned. Its
    // crossing is also the marker that u1's retries and two more events
    // were handled: the one writer commits acme's events after theirs (each
    // post is answered after its commit), stores any alert they fired in
    // their own commit, and hands their webhooks out before acme's.
    post("acme-ingest-key", "a1", 0..5).await;
    let acme = poll_until(Duration::from_secs(20), "acme's crossing", || async {
        let got = limit_alerts(&hooks, "acme");
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!((&acme[0].0["ratio"], &acme[0].1), (&json!("0.5"), &None), "{:?}", acme[0].0);
    assert_eq!(limit_alerts(&hooks, "hooked").len(), 2, "each threshold fired exactly once");
    let alerts = poll_until(Duration::from_secs(10), "both alerts listed", || listed(2)).await;
    let mut thresholds: Vec<&str> = alerts.iter().filter_map(|a| a["threshold_usd"].as_str()).collect();
    thresholds.sort_unstable();
    assert_eq!(thresholds, ["10", "5"], "{alerts:?}");

    server.stop().await;
}
