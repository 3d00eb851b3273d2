//! The billing export on the all-in-one binary: billable totals per customer
//! (and per user) per billing period, cut at a subscription cycle's exact
//! second for one customer and at calendar months for the other, with a
//! retried event counted once and non-billable and out-of-range events left
//! out; the route's CSV and JSON exactly, and `meterline export` printing
//! the same as the route, beside the running server.

use meterline_domain::EventRow;
use meterline_limits::LimitStore;
use meterline_tests::stack::{self, service_binary};
use meterline_tests::*;
use serde_json::{Value, json};
use std::path::Path;

const ACME_INGEST: &str = "acme-ingest-key";
const ACME_ADMIN: &str = "acme-admin-key";
const ACME_READ: &str = "acme-read-key";
/// Events from January 2026 are in bounds whatever day the test runs on.
// Fixed January 2026 dates, five years of accepted past, and nothing purged:
// the test means the same whenever it runs.
const EXTRA: &str = "[events]\nmax_past_secs = 157680000\n[retention]\nevents_days = \"forever\"\nrollups_minute_days = \"forever\"\ndead_letters_days = \"forever\"\n";
const RANGE: &str = "from=2026-01-10T00:00:00Z&to=2026-02-20T00:00:00Z";

async fn send(client: &reqwest::Client, method: reqwest::Method, url: String, key: &str, body: Value) -> (u16, Value) {
    let response = client.request(method, url).bearer_auth(key).json(&body).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The route's status, content type and body.
async fn get(client: &reqwest::Client, url: String, key: &str) -> (u16, String, String) {
    let response = client.get(url).bearer_auth(key).send().await.expect("request");
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (status, content_type, response.text().await.expect("body"))
}

/// `meterline export` over `dir`, with no inherited `METERLINE_*` variables: its stdout.
fn cli(dir: &Path, config: &Path, args: &[&str]) -> String {
    let mut command = std::process::Command::new(service_binary("meterline"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("METERLINE_") {
            command.env_remove(name);
        }
    }
    command.args(["export", "--tenant", "acme", "--from", "2026-01-10T00:00:00Z", "--to", "2026-02-20T00:00:00Z", "--data-dir"]).arg(dir).arg("--config").arg(config).args(args);
    let out = command.env("RUST_BACKTRACE", "0").output().expect("run meterline");
    assert!(out.status.success(), "meterline export failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The by-customer CSV of the events below (cost_usd, revenue_usd, total_tokens).
fn expected_csv(tenant: &str) -> String {
    [
        "tenant,scope,subject_id,period_start,period_end,period,cost_usd,revenue_usd,total_tokens",
        "T,customer,c-cycle,2026-01-10T00:00:00Z,2026-01-15T12:30:15Z,cycle,1.000000001,0.1,120",
        "T,customer,c-cycle,2026-01-15T12:30:15Z,2026-02-15T12:30:15Z,cycle,0.5,0.1,125",
        "T,customer,c-cycle,2026-02-15T12:30:15Z,2026-02-20T00:00:00Z,cycle,0.25,0.1,120",
        "T,customer,c-month,2026-01-10T00:00:00Z,2026-02-01T00:00:00Z,month,2,0.1,120",
        "T,customer,c-month,2026-02-01T00:00:00Z,2026-02-20T00:00:00Z,month,3,0.1,121",
        "",
    ]
    .map(|line| line.replacen("T,", &format!("{tenant},"), 1))
    .join("\n")
}

fn event(key: &str, at: &str, user: &str, customer: &str, cost: &str, extra: Value) -> Value {
    let mut e = json!({"idempotency_key": key, "timestamp": at, "user_id": user, "customer_id": customer, "feature": "chat", "model": "gpt-4o",
        "input_tokens": 100, "output_tokens": 20, "cost_usd": cost, "revenue_usd": "0.1"});
    if let (Some(e), Some(x)) = (e.as_object_mut(), extra.as_object()) {
        e.extend(x.clone());
        if customer.is_empty() {
            e.remove("customer_id");
        }
    }
    e
}

#[tokio::test]
async fn the_export_cuts_at_each_customers_cycle_or_month_exactly_and_the_cli_agrees() {
    let dir = temp_dir("export");
    let server = Embedded::start(&dir, EXTRA).await;
    let config = dir.join("export.toml");
    std::fs::write(&config, format!("{EXTRA}\n{}", tenants_toml())).expect("config");
    let client = reqwest::Client::new();
    let put = reqwest::Method::PUT;
    let (status, body) = send(&client, put.clone(), format!("{}/v1/plans/pro", server.url), ACME_ADMIN, json!({"limits": []})).await;
    assert_eq!(status, 200, "{body}");
    let sub = json!({"plan": "pro", "cycle_start": "2025-12-15T12:30:15Z"});
    let (status, body) = send(&client, put, format!("{}/v1/customers/c-cycle/subscription", server.url), ACME_ADMIN, sub).await;
    assert_eq!(status, 200, "{body}");

    let batch = json!([
        // c-cycle: a nanosecond before its cycle boundary, on it (and retried), a nanosecond after the next.
        event("k1", "2026-01-15T12:30:14.999999999Z", "u-1", "c-cycle", "1.000000001", json!({})),
        event("k2", "2026-01-15T12:30:15Z", "u-1", "c-cycle", "0.5", json!({"reasoning_tokens": 5})),
        event("k2", "2026-01-15T12:30:15Z", "u-1", "c-cycle", "0.5", json!({"reasoning_tokens": 5})),
        event("k3", "2026-01-20T00:00:00Z", "u-1", "c-cycle", "9", json!({"billable": false})),
        event("k4", "2026-02-15T12:30:15.000000001Z", "u-1", "c-cycle", "0.25", json!({})),
        // Outside [from, to).
        event("k5", "2026-01-09T23:59:59.999999999Z", "u-1", "c-cycle", "7", json!({})),
        event("k6", "2026-02-20T00:00:00Z", "u-2", "c-month", "7", json!({})),
        // c-month: either side of the calendar month's start.
        event("k7", "2026-01-31T23:59:59.999999999Z", "u-2", "c-month", "2", json!({})),
        event("k8", "2026-02-01T00:00:00Z", "u-3", "c-month", "3", json!({"cached_input_tokens": 1})),
        // No customer: in no by-customer row.
        event("k9", "2026-01-12T00:00:00Z", "u-4", "", "4", json!({})),
    ]);
    let (status, body) = send(&client, reqwest::Method::POST, format!("{}/v1/events", server.url), ACME_INGEST, batch).await;
    assert_eq!(status, 202, "{body}");
    assert!(body["rejected"].as_array().is_none_or(Vec::is_empty), "{body}");

    let url = |query: &str| format!("{}/v1/billing/export?{RANGE}&{query}", server.url);
    let (status, content_type, csv) = get(&client, url("measures=cost_usd,revenue_usd,total_tokens&format=csv"), ACME_ADMIN).await;
    assert_eq!((status, content_type.as_str()), (200, "text/csv; charset=utf-8"), "{csv}");
    assert_eq!(csv, expected_csv("acme"));

    let (status, _, text) = get(&client, url("measures=events,cost_usd&by=user"), ACME_ADMIN).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).expect("json");
    let row = |user: &str, start: &str, end: &str, events: u64, cost: &str| {
        json!({"tenant": "acme", "scope": "user", "subject_id": user, "period_start": start, "period_end": end, "period": "month", "events": events, "cost_usd": cost})
    };
    // Users are on their own subscriptions only: u-1's customer's cycle does not cut its rows.
    assert_eq!(
        answer,
        json!({"tenant": "acme", "by": "user", "from": "2026-01-10T00:00:00Z", "to": "2026-02-20T00:00:00Z", "measures": ["events", "cost_usd"], "rows": [
            row("u-1", "2026-01-10T00:00:00Z", "2026-02-01T00:00:00Z", 2, "1.500000001"),
            row("u-1", "2026-02-01T00:00:00Z", "2026-02-20T00:00:00Z", 1, "0.25"),
            row("u-2", "2026-01-10T00:00:00Z", "2026-02-01T00:00:00Z", 1, "2"),
            row("u-3", "2026-02-01T00:00:00Z", "2026-02-20T00:00:00Z", 1, "3"),
            row("u-4", "2026-01-10T00:00:00Z", "2026-02-01T00:00:00Z", 1, "4"),
        ]})
    );

    // The command reads the same store read only, beside the server, and prints the same.
    assert_eq!(cli(&dir, &config, &["--measures", "cost_usd,revenue_usd,total_tokens"]), csv);
    assert_eq!(cli(&dir, &config, &["--measures", "events,cost_usd", "--by", "user", "--format", "json"]).trim_end(), text);

    // An admin key only; parameters named when wrong.
    let (status, _, _) = get(&client, url("format=csv"), ACME_READ).await;
    assert_eq!(status, 403);
    for (query, field) in [("measures=tokens", "measures"), ("by=model", "by"), ("format=xml", "format"), ("user_id=u-1", "user_id")] {
        let (status, _, text) = get(&client, url(query), ACME_ADMIN).await;
        let body: Value = serde_json::from_str(&text).expect("error json");
        assert_eq!((status, body["error"]["field"].as_str()), (400, Some(field)), "{query}: {text}");
    }
    let (status, _, _) = get(&client, format!("{}/v1/billing/export?from=2026-01-10T00:00:00Z", server.url), ACME_ADMIN).await;
    assert_eq!(status, 400);
    server.stop().await;
}

/// An event row as the aggregator stores it (cost and revenue already priced).
fn row(tenant: &str, key: &str, at: &str, customer: &str, cost_nanos: i64, billable: u8, extra_tokens: u64) -> EventRow {
    let t = chrono::DateTime::parse_from_rfc3339(at).expect("time");
    EventRow {
        tenant: tenant.into(),
        idempotency_key: key.into(),
        event_time: u32::try_from(t.timestamp()).expect("u32 time"),
        event_time_ns: t.timestamp_subsec_nanos(),
        user_id: "u-1".into(),
        customer_id: customer.into(),
        feature: "chat".into(),
        model: "gpt-4o".into(),
        billable,
        input_tokens: 100,
        output_tokens: 20,
        reasoning_tokens: extra_tokens,
        cost_nanos,
        cost_source: 1,
        revenue_nanos: 100_000_000,
        ..EventRow::default()
    }
}

#[tokio::test]
async fn the_query_api_exports_from_clickhouse_with_cycle_anchors_from_redis() {
    let tenant = format!("export-{}", free_port());
    let ch = stack::ClickHouse::shared();
    let database = ch.database(&format!("export_{}", free_port())).await;
    let config: meterline_clickhouse::ClickHouseConfig = serde_json::from_value(json!({"url": ch.url, "database": database})).expect("ch config");
    let store = meterline_clickhouse::connect(&config).await.expect("connect");
    store.migrate().await.expect("migrate");
    let r = |key, at, customer, cost, billable, extra| row(&tenant, key, at, customer, cost, billable, extra);
    let rows = vec![
        r("k1", "2026-01-15T12:30:14.999999999Z", "c-cycle", 1_000_000_001, 1, 0),
        r("k2", "2026-01-15T12:30:15Z", "c-cycle", 500_000_000, 1, 5),
        // A repaired flush's repeated row: the same key, counted once.
        r("k2", "2026-01-15T12:30:15Z", "c-cycle", 500_000_000, 1, 5),
        r("k3", "2026-01-20T00:00:00Z", "c-cycle", 9_000_000_000, 0, 0),
        r("k4", "2026-02-15T12:30:15.000000001Z", "c-cycle", 250_000_000, 1, 0),
        r("k5", "2026-01-09T23:59:59.999999999Z", "c-cycle", 7_000_000_000, 1, 0),
        r("k6", "2026-02-20T00:00:00Z", "c-month", 7_000_000_000, 1, 0),
        r("k7", "2026-01-31T23:59:59.999999999Z", "c-month", 2_000_000_000, 1, 0),
        r("k8", "2026-02-01T00:00:00Z", "c-month", 3_000_000_000, 1, 1),
        r("k9", "2026-01-12T00:00:00Z", "", 4_000_000_000, 1, 0),
    ];
    store.insert_events(&rows).await.expect("insert");
    let redis = stack::Redis::private().await;
    let limits = meterline_redis::RedisLimits::connect(&redis.url()).await.expect("redis");
    let sub = meterline_limits::SubscriptionView { plan: "pro".into(), cycle_start: Some("2025-12-15T12:30:15Z".into()) };
    limits.put_subscription(&tenant, &meterline_limits::Subject::customer("c-cycle"), &sub).await.expect("subscribe");

    // The query service with an admin key and the limits' Redis.
    let admin = meterline_schemas::tenants::hash_key("export-admin-key");
    let text = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\n[limits]\nredis_url = \"{}\"\n\
         [[tenants]]\nid = \"{tenant}\"\n[[tenants.keys]]\nname = \"admin\"\nsha256 = \"{admin}\"\nscopes = [\"admin\"]\n",
        ch.url,
        redis.url()
    );
    let config = meterline_query_api::Config::load(&text, []).expect("query config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { meterline_query_api::serve(config, listener, std::future::pending()).await.expect("serve") });
    let client = reqwest::Client::new();
    let query = format!("{url}/v1/billing/export?{RANGE}&measures=cost_usd,revenue_usd,total_tokens&format=csv");
    let csv = poll_until(std::time::Duration::from_secs(10), "the query API", || {
        let (client, query) = (client.clone(), query.clone());
        async move {
            let (status, _, body) = get(&client, query, "export-admin-key").await;
            (status == 200).then_some(body)
        }
    })
    .await;
    assert_eq!(csv, expected_csv(&tenant));
}
