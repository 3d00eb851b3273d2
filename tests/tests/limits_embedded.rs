//! Limits in the all-in-one binary over its embedded store: race-safe
//! admission, commits metered once and counted at their actual amounts,
//! release and expiry freeing room, plain events counting against limits,
//! refusals naming their field, key scopes and tenant isolation.

use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const ACME_INGEST: &str = "acme-ingest-key";
const ACME_READ: &str = "acme-read-key";
const ACME_ADMIN: &str = "acme-admin-key";
const GLOBEX_INGEST: &str = "globex-ingest-key";
const GLOBEX_ADMIN: &str = "globex-admin-key";

/// An all-in-one server in its own data directory, and a client for it.
struct Server {
    embedded: Embedded,
    client: reqwest::Client,
}

impl Server {
    async fn start(test: &str) -> Server {
        let embedded = Embedded::start(&temp_dir(test), "").await;
        Server { embedded, client: reqwest::Client::new() }
    }

    async fn send(&self, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.embedded.url)).bearer_auth(key);
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn put(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, key, Some(body)).await
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, key, Some(body)).await
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, key, None).await
    }

    /// PUTs plan `default` with `limits`, asserting it is taken.
    async fn default_plan(&self, limits: Value) {
        let (status, body) = self.put("/v1/plans/default", ACME_ADMIN, json!({ "limits": limits })).await;
        assert_eq!(status, 200, "{body}");
    }

    async fn reserve(&self, key: &str, body: Value) -> (u16, Value) {
        self.post("/v1/reservations", key, body).await
    }

    /// The one status of `user`'s limit `name`.
    async fn limit(&self, user: &str, name: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/users/{user}/limits"), ACME_READ).await;
        assert_eq!(status, 200, "{body}");
        body["limits"].as_array().expect("limits").iter().find(|l| l["name"] == name).cloned().unwrap_or_else(|| panic!("no limit {name}: {body}"))
    }

    async fn stop(self) {
        self.embedded.stop().await;
    }
}

fn action(user: &str) -> Value {
    json!({"user_id": user, "feature": "chat", "model": "gpt-4o"})
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    base
}

/// A `from`/`to` query range around now.
fn range() -> String {
    let now = chrono::Utc::now();
    let at = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    format!("from={}&to={}", at(now - chrono::Duration::days(1)), at(now + chrono::Duration::hours(1)))
}

fn error_field(body: &Value) -> &str {
    body["error"]["field"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_reservations_admit_exactly_the_limit() {
    let server = std::sync::Arc::new(Server::start("limits-race").await);
    server.default_plan(json!([{"name": "daily", "measure": "events", "period": "day", "amount": "10"}])).await;

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { server.reserve(ACME_INGEST, action("racer")).await })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        let (status, body) = task.await.expect("task");
        assert_eq!(status, 200, "{body}");
        if body["allowed"] == json!(true) {
            allowed += 1;
        } else {
            assert_eq!(body["denied_by"], json!(["daily"]), "{body}");
        }
    }
    assert_eq!(allowed, 10, "exactly the limit is admitted");
    let status = server.limit("racer", "daily").await;
    assert_eq!((status["used"].as_str(), status["reserved"].as_str(), status["exhausted"].as_bool()), (Some("0"), Some("10"), Some(true)), "{status}");
    if let Ok(server) = std::sync::Arc::try_unwrap(server) {
        server.stop().await;
    }
}

#[tokio::test]
async fn a_commit_counts_the_actual_cost_once_however_often_it_is_retried() {
    let server = Server::start("limits-commit").await;
    server.default_plan(json!([{"name": "spend", "measure": "cost_usd", "period": "day", "amount": "1"}])).await;

    let (status, body) = server.reserve(ACME_INGEST, with(action("committer"), json!({"estimate": {"cost_usd": "0.05"}}))).await;
    assert_eq!((status, &body["allowed"]), (200, &json!(true)), "{body}");
    assert_eq!(body["limits"][0]["reserved"], "0.05", "{body}");
    let id = body["reservation_id"].as_str().expect("id").to_owned();

    let commit = format!("/v1/reservations/{id}/commit");
    let (status, first) = server.post(&commit, ACME_INGEST, json!({"cost_usd": "0.01"})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!((first["state"].as_str(), first["limits"][0]["used"].as_str(), first["limits"][0]["reserved"].as_str()), (Some("committed"), Some("0.01"), Some("0")), "{first}");
    for _ in 0..3 {
        let (status, again) = server.post(&commit, ACME_INGEST, json!({"cost_usd": "0.01"})).await;
        assert_eq!(status, 200, "a retried commit is answered like the first: {again}");
        assert_eq!(again["idempotency_key"], first["idempotency_key"]);
    }
    let (status, different) = server.post(&commit, ACME_INGEST, json!({"cost_usd": "0.02"})).await;
    assert_eq!((status, error_field(&different)), (409, "reservation_id"), "{different}");

    let spend = server.limit("committer", "spend").await;
    assert_eq!((spend["used"].as_str(), spend["reserved"].as_str()), (Some("0.01"), Some("0")), "{spend}");
    let (status, events) = server.get(&format!("/v1/events?user_id=committer&{}", range()), ACME_READ).await;
    assert_eq!(status, 200, "{events}");
    let events = events["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "one metered event: {events:?}");
    assert_eq!(events[0]["idempotency_key"], first["idempotency_key"]);
    assert_eq!(events[0]["cost_usd"], "0.01");
    let (status, usage) = server.get(&format!("/v1/usage?granularity=total&group_by=user_id&{}", range()), ACME_READ).await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!((usage["rows"][0]["events"].as_u64(), usage["rows"][0]["cost_usd"].as_str()), (Some(1), Some("0.01")), "{usage}");
    server.stop().await;
}

#[tokio::test]
async fn release_frees_room_and_a_committed_reservation_cannot_be_released() {
    let server = Server::start("limits-release").await;
    server.default_plan(json!([{"name": "pair", "measure": "events", "period": "day", "amount": "2"}])).await;

    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, body) = server.reserve(ACME_INGEST, action("releaser")).await;
        assert_eq!(body["allowed"], json!(true), "{body}");
        ids.push(body["reservation_id"].as_str().expect("id").to_owned());
    }
    let (_, full) = server.reserve(ACME_INGEST, action("releaser")).await;
    assert_eq!(full["allowed"], json!(false), "{full}");

    let (status, released) = server.post(&format!("/v1/reservations/{}/release", ids[0]), ACME_INGEST, json!({})).await;
    assert_eq!((status, released["state"].as_str()), (200, Some("released")), "{released}");
    let (status, again) = server.post(&format!("/v1/reservations/{}/release", ids[0]), ACME_INGEST, json!({})).await;
    assert_eq!(status, 200, "a release is idempotent: {again}");
    let (_, room) = server.reserve(ACME_INGEST, action("releaser")).await;
    assert_eq!(room["allowed"], json!(true), "the released hold's room is admitted again: {room}");

    let (status, body) = server.post(&format!("/v1/reservations/{}/commit", ids[1]), ACME_INGEST, json!({"output_tokens": 5})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post(&format!("/v1/reservations/{}/release", ids[1]), ACME_INGEST, json!({})).await;
    assert_eq!((status, error_field(&body)), (409, "reservation_id"), "{body}");
    let (status, body) = server.post(&format!("/v1/reservations/{}/commit", ids[0]), ACME_INGEST, json!({})).await;
    assert_eq!(status, 409, "a released reservation cannot be committed: {body}");
    let pair = server.limit("releaser", "pair").await;
    assert_eq!((pair["used"].as_str(), pair["reserved"].as_str()), (Some("1"), Some("1")), "{pair}");
    server.stop().await;
}

#[tokio::test]
async fn an_expired_hold_frees_its_room() {
    let server = Server::start("limits-expiry").await;
    server.default_plan(json!([{"name": "one", "measure": "events", "period": "day", "amount": "1"}])).await;

    let (_, held) = server.reserve(ACME_INGEST, with(action("expirer"), json!({"ttl_secs": 2}))).await;
    assert_eq!(held["allowed"], json!(true), "{held}");
    let (_, denied) = server.reserve(ACME_INGEST, action("expirer")).await;
    assert_eq!(denied["allowed"], json!(false), "{denied}");

    poll_until(Duration::from_secs(15), "the expired hold to stop counting", || async {
        let one = server.limit("expirer", "one").await;
        (one["reserved"] == "0").then_some(())
    })
    .await;
    let (_, again) = server.reserve(ACME_INGEST, action("expirer")).await;
    assert_eq!(again["allowed"], json!(true), "the expired hold's room is admitted again: {again}");
    server.stop().await;
}

#[tokio::test]
async fn plain_events_count_against_a_hard_cost_limit() {
    let server = Server::start("limits-events").await;
    server.default_plan(json!([{"name": "budget", "measure": "cost_usd", "period": "day", "amount": "1"}])).await;

    let at = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = (0..9)
        .map(|i| json!({"idempotency_key": format!("spend-{i}"), "timestamp": at, "user_id": "spender", "feature": "chat", "model": "gpt-4o", "cost_usd": "0.10"}))
        .collect();
    let (status, body) = server.post("/v1/events", ACME_INGEST, json!(events)).await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(9)), "{body}");
    let (status, _) = server.post("/v1/events", ACME_INGEST, json!(events)).await;
    assert_eq!(status, 202, "a retried batch is deduplicated, not counted again");

    let budget = server.limit("spender", "budget").await;
    assert_eq!(budget["used"], "0.9", "{budget}");
    let (_, denied) = server.reserve(ACME_INGEST, with(action("spender"), json!({"estimate": {"cost_usd": "0.20"}}))).await;
    assert_eq!((denied["allowed"].as_bool(), &denied["denied_by"]), (Some(false), &json!(["budget"])), "{denied}");
    let (_, fits) = server.reserve(ACME_INGEST, with(action("spender"), json!({"estimate": {"cost_usd": "0.10"}}))).await;
    assert_eq!(fits["allowed"], json!(true), "what is left still fits: {fits}");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let server = Server::start("limits-invalid").await;
    let limit = |measure: &str, amount: &str| json!({"limits": [{"name": "l", "measure": measure, "period": "day", "amount": amount}]});
    for (body, field) in [
        (limit("tokens", "1"), "limits[0].measure"),
        (limit("cost_usd", "-1"), "limits[0].amount"),
        (limit("cost_usd", "0.0000000001"), "limits[0].amount"),
    ] {
        let (status, answer) = server.put("/v1/plans/p", ACME_ADMIN, body).await;
        assert_eq!((status, error_field(&answer)), (400, field), "{answer}");
    }
    let (status, answer) = server.put("/v1/users/u1/subscription", ACME_ADMIN, json!({"plan": "nope"})).await;
    assert_eq!((status, error_field(&answer)), (400, "plan"), "{answer}");
    let (status, answer) = server.reserve(ACME_INGEST, json!({"feature": "chat", "model": "gpt-4o"})).await;
    assert_eq!((status, error_field(&answer)), (400, "user_id"), "{answer}");
    for estimate in ["-0.01", "0.0000000001"] {
        let (status, answer) = server.reserve(ACME_INGEST, with(action("u1"), json!({"estimate": {"cost_usd": estimate}}))).await;
        assert_eq!((status, error_field(&answer)), (400, "estimate.cost_usd"), "{estimate}: {answer}");
    }
    let (status, plans) = server.get("/v1/plans", ACME_ADMIN).await;
    assert_eq!((status, &plans["plans"]), (200, &json!([])), "nothing refused was stored: {plans}");
    server.stop().await;
}

#[tokio::test]
async fn keys_are_scoped_and_tenants_isolated() {
    let server = Server::start("limits-isolation").await;
    let (status, body) = server.put("/v1/plans/default", ACME_INGEST, json!({"limits": []})).await;
    assert_eq!(status, 403, "an ingest key cannot write plans: {body}");
    server.default_plan(json!([{"name": "daily", "measure": "events", "period": "day", "amount": "5"}])).await;
    let (status, body) = server.reserve(ACME_READ, action("u1")).await;
    assert_eq!(status, 403, "a read key cannot reserve: {body}");

    let (status, plans) = server.get("/v1/plans", GLOBEX_ADMIN).await;
    assert_eq!((status, &plans["plans"]), (200, &json!([])), "another tenant's plans are not seen: {plans}");
    let (status, body) = server.get("/v1/plans/default", GLOBEX_ADMIN).await;
    assert_eq!(status, 404, "{body}");

    let (_, held) = server.reserve(ACME_INGEST, action("u1")).await;
    let id = held["reservation_id"].as_str().expect("id").to_owned();
    let (status, body) = server.post(&format!("/v1/reservations/{id}/commit"), GLOBEX_INGEST, json!({"cost_usd": "0.01"})).await;
    assert_eq!((status, error_field(&body)), (404, "reservation_id"), "{body}");
    let (status, body) = server.post(&format!("/v1/reservations/{id}/release"), GLOBEX_INGEST, json!({})).await;
    assert_eq!(status, 404, "{body}");
    for key in [ACME_READ, "globex-read-key"] {
        let (status, events) = server.get(&format!("/v1/events?user_id=u1&{}", range()), key).await;
        assert_eq!((status, events["events"].as_array().map(Vec::len)), (200, Some(0)), "nothing metered: {events}");
    }
    let daily = server.limit("u1", "daily").await;
    assert_eq!((daily["used"].as_str(), daily["reserved"].as_str()), (Some("0"), Some("1")), "acme's hold stands: {daily}");
    server.stop().await;
}

/// Who is nearest their caps: three users at 20%, 90% and 50% of a
/// 10-events limit rank 90, 50, 20; a read key reads plans but cannot change them.
#[tokio::test]
async fn nearest_their_caps_ranks_by_the_fraction_used_and_read_keys_read_plans() {
    let server = Server::start("limits-nearest").await;
    server.default_plan(json!([{"name": "daily", "measure": "events", "period": "day", "amount": "10"}])).await;
    let now = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = [("u20", 2), ("u90", 9), ("u50", 5)]
        .into_iter()
        .flat_map(|(user, n)| (0..n).map(move |i| (user, i)))
        .map(|(user, i)| json!({"idempotency_key": format!("{user}-{i}"), "timestamp": now, "user_id": user, "feature": "chat", "model": "gpt-4o"}))
        .collect();
    let (status, body) = server.post("/v1/events", ACME_INGEST, json!(events)).await;
    assert_eq!(status, 202, "{body}");

    let (status, body) = server.get("/v1/limits/nearest?limit=3", ACME_READ).await;
    assert_eq!(status, 200, "{body}");
    let rows: Vec<(&str, &str, &str)> = body["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .map(|r| (r["subject_id"].as_str().unwrap_or_default(), r["ratio"].as_str().unwrap_or_default(), r["used"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(rows, [("u90", "0.9", "9"), ("u50", "0.5", "5"), ("u20", "0.2", "2")], "events count in the transaction that writes them: {body}");
    assert_eq!((body["subjects"][0]["name"].as_str(), body["subjects"][0]["scope"].as_str()), (Some("daily"), Some("user")));
    let (status, one) = server.get("/v1/limits/nearest?limit=1&name=daily", ACME_READ).await;
    assert_eq!((status, one["subjects"].as_array().map(Vec::len)), (200, Some(1)), "{one}");
    let (status, none) = server.get("/v1/limits/nearest?name=other", ACME_READ).await;
    assert_eq!((status, &none["subjects"]), (200, &json!([])), "{none}");
    let (status, body) = server.get("/v1/limits/nearest?limit=501", ACME_READ).await;
    assert_eq!((status, error_field(&body)), (400, "limit"), "{body}");
    let (status, body) = server.get("/v1/limits/nearest", ACME_INGEST).await;
    assert_eq!(status, 403, "an ingest key cannot read: {body}");

    let (status, plans) = server.get("/v1/plans", ACME_READ).await;
    assert_eq!((status, plans["plans"][0]["plan_id"].as_str()), (200, Some("default")), "{plans}");
    let (status, plan) = server.get("/v1/plans/default", ACME_READ).await;
    assert_eq!((status, plan["limits"][0]["amount"].as_str()), (200, Some("10")), "{plan}");
    let (status, body) = server.put("/v1/plans/default", ACME_READ, json!({"limits": []})).await;
    assert_eq!(status, 403, "a read key cannot change a plan: {body}");
    let (status, body) = server.send(reqwest::Method::DELETE, "/v1/plans/default", ACME_READ, None).await;
    assert_eq!(status, 403, "nor delete one: {body}");
    server.stop().await;
}
