//! The same plans and workload against both modes: the all-in-one binary
//! (SQLite) and the distributed deployment (ingest over Redis, the aggregator
//! counting into it) give identical limit answers; a customer's limit is
//! shared by its users.

use meterline_tests::limits::{Distributed, call};
use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const ADMIN: &str = "acme-admin-key";
const INGEST: &str = "acme-ingest-key";
const READ: &str = "acme-read-key";


async fn ok(method: reqwest::Method, url: String, key: &str, body: Value) -> Value {
    let (status, answer) = call(method, &url, key, Some(body)).await;
    assert!(status == 200 || status == 202, "{url}: {status} {answer}");
    answer
}

/// Plans, subscriptions and plain events (one retried).
async fn setup(url: &str, stamp: &str) {
    use reqwest::Method;
    ok(
        Method::PUT,
        format!("{url}/v1/plans/default"),
        ADMIN,
        json!({"limits": [{"name": "free", "measure": "events", "period": "day", "amount": "4"}]}),
    )
    .await;
    ok(
        Method::PUT,
        format!("{url}/v1/plans/pro"),
        ADMIN,
        json!({"limits": [
            {"name": "cap", "measure": "cost_usd", "period": "cycle", "amount": "5"},
            {"name": "premium", "measure": "cost_usd", "period": "cycle", "amount": "1", "filter": {"model": "gpt-4.1"}},
            {"name": "tokens", "measure": "total_tokens", "period": "day", "amount": "100000", "hard": false},
            {"name": "workspace", "measure": "cost_usd", "scope": "customer", "period": "month", "amount": "1.5"}
        ]}),
    )
    .await;
    ok(Method::PUT, format!("{url}/v1/customers/c1/subscription"), ADMIN, json!({"plan": "pro", "cycle_start": "2026-01-31T23:30:00Z"})).await;

    let event = |n: usize, user: &str, model: &str, cost: &str| {
        json!({"idempotency_key": format!("{stamp}-{n}"), "timestamp": chrono::Utc::now().to_rfc3339(), "user_id": user,
               "customer_id": if user == "u3" { Value::Null } else { json!("c1") }, "feature": "chat", "model": model,
               "cost_usd": cost, "input_tokens": 100 * (n + 1), "output_tokens": 10})
    };
    let plain = vec![
        event(1, "u1", "gpt-4o", "0.30"),
        event(2, "u1", "gpt-4.1", "0.45"),
        event(3, "u2", "gpt-4o", "0.25"),
        event(4, "u3", "gpt-4o", "0.01"),
        event(5, "u3", "gpt-4o", "0.01"),
        // A retry: counted once.
        event(5, "u3", "gpt-4o", "0.01"),
    ];
    ok(Method::POST, format!("{url}/v1/events"), INGEST, json!(plain)).await;
}

/// Reservations, commits and releases; every reservation answer's `allowed`.
async fn reservations(url: &str) -> Vec<bool> {
    use reqwest::Method;
    let mut allowed = Vec::new();
    let reserve = |user: &str, model: &str, estimate: Value| {
        let customer = if user == "u3" { Value::Null } else { json!("c1") };
        json!({"user_id": user, "customer_id": customer, "feature": "chat", "model": model, "estimate": estimate, "ttl_secs": 600})
    };
    let steps: Vec<(&str, &str, Value, &str)> = vec![
        // (user, model, estimate, then: commit:<cost> | release | hold)
        ("u1", "gpt-4.1", json!({"cost_usd": "0.5"}), "commit:0.2"),
        ("u1", "gpt-4.1", json!({"cost_usd": "0.5"}), "hold"),
        ("u2", "gpt-4o", json!({"input_tokens": 20000, "output_tokens": 5000}), "commit:0.1"),
        ("u2", "gpt-4o", json!({"cost_usd": "0.3"}), "release"),
        ("u2", "gpt-4o", json!({"cost_usd": "0.3"}), "hold"),
        ("u3", "gpt-4o", json!({}), "commit:0.01"),
        ("u3", "gpt-4o", json!({}), "hold"),
        ("u3", "gpt-4o", json!({}), "hold"),
    ];
    for (user, model, estimate, then) in steps {
        let answer = ok(Method::POST, format!("{url}/v1/reservations"), INGEST, reserve(user, model, estimate)).await;
        let is_allowed = answer["allowed"] == true;
        allowed.push(is_allowed);
        if !is_allowed {
            continue;
        }
        let id = answer["reservation_id"].as_str().unwrap_or_default().to_owned();
        if let Some(cost) = then.strip_prefix("commit:") {
            ok(Method::POST, format!("{url}/v1/reservations/{id}/commit"), INGEST, json!({"cost_usd": cost, "output_tokens": 7})).await;
        } else if then == "release" {
            ok(Method::POST, format!("{url}/v1/reservations/{id}/release"), INGEST, json!({})).await;
        }
    }
    allowed
}

/// Every subject's limits, without the fields that move with the clock.
async fn balances(url: &str) -> Value {
    let mut out = serde_json::Map::new();
    for path in ["users/u1/limits?customer_id=c1", "users/u2/limits?customer_id=c1", "users/u3/limits", "customers/c1/limits"] {
        let (status, mut body) = call(reqwest::Method::GET, &format!("{url}/v1/{path}"), READ, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        for limit in body["limits"].as_array_mut().into_iter().flatten() {
            if let Some(l) = limit.as_object_mut() {
                l.remove("projected_at_reset");
                l.remove("projected_exhaustion_at");
            }
        }
        out.insert(path.to_owned(), body);
    }
    Value::Object(out)
}

fn find<'a>(answers: &'a Value, path: &str, name: &str) -> &'a Value {
    answers[path]["limits"].as_array().and_then(|l| l.iter().find(|x| x["name"] == name)).unwrap_or(&Value::Null)
}

#[tokio::test]
async fn both_modes_answer_the_same_plans_and_workload_identically() {
    // The all-in-one binary.
    let dir = temp_dir("limits_conformance");
    let embedded = Embedded::start(&dir, "").await;
    setup(&embedded.url, "k").await;
    let embedded_allowed = reservations(&embedded.url).await;
    let expected = balances(&embedded.url).await;
    embedded.stop().await;

    // What the answers must show, asserted once so the comparison means something.
    assert_eq!(find(&expected, "customers/c1/limits", "workspace")["used"], "1.3", "c1's users share its limit: 0.30+0.45+0.25+0.2+0.1");
    assert_eq!(find(&expected, "users/u1/limits?customer_id=c1", "cap")["used"], "0.95");
    assert_eq!(find(&expected, "users/u2/limits?customer_id=c1", "tokens")["used"], "417", "the soft token limit counts input and output");
    assert_eq!(find(&expected, "users/u1/limits?customer_id=c1", "premium")["used"], "0.65", "only gpt-4.1 counts toward the premium sub-limit");
    assert_eq!(find(&expected, "users/u3/limits", "free")["used"], "3", "two plain events (one retried) and one commit");
    assert_eq!(find(&expected, "users/u3/limits", "free")["reserved"], "1", "one hold left");
    // 1.0 + 0.5 fits the $1.50 workspace; after the $0.20 commit another 0.5
    // does not; the 20k+5k gpt-4o tokens are priced at $0.10 and fit; then
    // the free tier's fourth event fits and its fifth does not.
    assert_eq!(embedded_allowed, vec![true, false, true, false, false, true, true, false]);

    // The distributed deployment.
    let deployment = Distributed::start("limits_conformance", 1, "").await;
    let url = deployment.url(0).to_owned();
    // Plain events are counted after the aggregator writes them (in the
    // all-in-one binary, in the same commit): let them land before
    // reserving, so both modes decide on the same counts.
    setup(&url, "k").await;
    poll_until(Duration::from_secs(30), "the plain events to be counted", || async {
        let (_, body) = call(reqwest::Method::GET, &format!("{url}/v1/customers/c1/limits"), READ, None).await;
        (find(&json!({"c": body}), "c", "workspace")["used"] == "1").then_some(())
    })
    .await;
    let distributed_allowed = reservations(&url).await;
    assert_eq!(distributed_allowed, embedded_allowed, "the same reservations are allowed and denied");
    let last = poll_until(Duration::from_secs(30), "the distributed counters to settle on the embedded answers", || async {
        let got = balances(&url).await;
        (got == expected).then_some(got)
    })
    .await;
    assert_eq!(last, expected);
}

