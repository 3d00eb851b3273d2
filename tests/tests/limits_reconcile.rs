//! `meterline limits reconcile` on the all-in-one binary: counters of closed
//! periods equal the sums of their events, to the nanosecond edge, with
//! retries, non-billable events and filtered-out events in the mix; a
//! corrupted counter is reported with its difference and a non-zero exit;
//! a counter whose definition left the plans is reported, not compared.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use meterline_tests::stack::service_binary;
use meterline_tests::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Output;

const ACME_INGEST: &str = "acme-ingest-key";
const ACME_ADMIN: &str = "acme-admin-key";

/// Runs `meterline limits reconcile` over `dir` with no inherited `METERLINE_*` variables.
fn reconcile(dir: &Path, config: &Path, extra: &[&str]) -> Output {
    let mut command = std::process::Command::new(service_binary("meterline"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("METERLINE_") {
            command.env_remove(name);
        }
    }
    command.args(["limits", "reconcile", "--data-dir"]).arg(dir).arg("--config").arg(config).args(["--tenant", "acme"]).args(extra);
    command.env("RUST_BACKTRACE", "0").output().expect("run meterline")
}

/// The JSON report and whether the command succeeded.
fn report(dir: &Path, config: &Path) -> (bool, Value, String) {
    let out = reconcile(dir, config, &["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    (out.status.success(), value, stderr)
}

fn rows(report: &Value) -> &Vec<Value> {
    report["rows"].as_array().expect("rows")
}

async fn send(client: &reqwest::Client, method: reqwest::Method, url: String, key: &str, body: Value) -> (u16, Value) {
    let response = client.request(method, url).bearer_auth(key).json(&body).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn plan(token_feature: &str) -> Value {
    json!({"limits": [
        {"name": "tokens", "measure": "total_tokens", "period": "minute", "amount": "1000000", "hard": false, "filter": {"feature": token_feature}},
        {"name": "spend", "measure": "cost_usd", "scope": "customer", "period": "minute", "amount": "100"},
        {"name": "calls", "measure": "events", "period": "minute", "amount": "1000", "filter": {"feature": "chat", "model": "gpt-4o"}}
    ]})
}

#[tokio::test]
async fn embedded_counters_reconcile_and_a_corrupted_one_is_reported() {
    let dir = temp_dir("limits_reconcile");
    let server = Embedded::start(&dir, "").await;
    let config = dir.join("reconcile.toml");
    std::fs::write(&config, tenants_toml()).expect("config");
    let client = reqwest::Client::new();
    let (status, body) = send(&client, reqwest::Method::PUT, format!("{}/v1/plans/default", server.url), ACME_ADMIN, plan("chat")).await;
    assert_eq!(status, 200, "{body}");

    // A minute ten minutes ago: closed. Events on both of its edges, one a
    // nanosecond before it, a retry, a non-billable one and one the token
    // limit's filter leaves out.
    let now = Utc::now();
    let minute = DateTime::from_timestamp(now.timestamp() - 600 - now.timestamp().rem_euclid(60), 0).expect("minute");
    let event = |key: &str, t: DateTime<Utc>, user: &str, extra: Value| {
        let mut e = json!({"idempotency_key": key, "timestamp": at(t), "user_id": user, "customer_id": "c-1", "feature": "chat", "model": "gpt-4o",
            "input_tokens": 100, "output_tokens": 20, "cached_input_tokens": 5, "reasoning_tokens": 2, "cost_usd": "0.001000001"});
        if let (Some(e), Some(x)) = (e.as_object_mut(), extra.as_object()) {
            e.extend(x.clone());
        }
        e
    };
    let last_ns = Duration::seconds(60) - Duration::nanoseconds(1);
    let batch = json!([
        event("k1", minute, "u-1", json!({})),
        event("k2", minute + last_ns, "u-1", json!({"input_tokens": 7, "cost_usd": "0.5"})),
        event("k3", minute - Duration::nanoseconds(1), "u-1", json!({"input_tokens": 1000})),
        event("k4", minute + Duration::seconds(30), "u-1", json!({"feature": "search", "input_tokens": 9999})),
        event("k5", minute + Duration::seconds(31), "u-1", json!({"billable": false, "input_tokens": 8888})),
        event("k6", minute + Duration::seconds(32), "u-2", json!({"model": "gpt-4.1", "cost_usd": "2"})),
        event("k1", minute, "u-1", json!({})),
    ]);
    let (status, body) = send(&client, reqwest::Method::POST, format!("{}/v1/events", server.url), ACME_INGEST, batch).await;
    assert_eq!(status, 202, "{body}");
    assert!(body["rejected"].as_array().is_none_or(Vec::is_empty), "{body}");

    // Beside the running server, every counter matches its events.
    let (ok, first, stderr) = report(&dir, &config);
    assert!(ok, "{first:#}\n{stderr}");
    let statuses: Vec<&str> = rows(&first).iter().filter_map(|r| r["status"].as_str()).collect();
    assert!(statuses.len() >= 6, "tokens x3 periods/users, spend x2, calls x3: {first:#}");
    assert!(statuses.iter().all(|s| *s == "match"), "{first:#}");
    let find = |report: &Value, subject: &str, measure: &str, start: DateTime<Utc>| -> Value {
        rows(report)
            .iter()
            .find(|r| r["subject"] == subject && r["definition"]["measure"] == measure && r["period_start"] == start.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            .cloned()
            .unwrap_or_else(|| panic!("no {subject} {measure} counter at {start}: {report:#}"))
    };
    let tokens = find(&first, "u-1", "total_tokens", minute);
    assert_eq!(tokens["counter_value"], "161", "k1 (127) and k2 (34), each once: {tokens}");
    assert_eq!(find(&first, "c-1", "cost_usd", minute)["metered_sum"], "2.502000002", "k1, k2, k4 and k6 (the spend limit has no filter)");
    assert_eq!(find(&first, "u-1", "events", minute)["metered_sum"], "2");
    assert_eq!(find(&first, "u-1", "total_tokens", minute - Duration::seconds(60))["metered_sum"], "1027");
    let table = reconcile(&dir, &config, &[]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && text.contains("match") && text.contains(" 0 mismatch"), "{text}");

    // One counter off by 7 tokens: reported with its difference, exit non-zero.
    let db = rusqlite::Connection::open(dir.join("meterline.db")).expect("db");
    db.busy_timeout(std::time::Duration::from_secs(10)).expect("busy timeout");
    let counter = tokens["counter"].as_str().expect("counter");
    let changed = db.execute("UPDATE limit_counters SET used = used + 7 WHERE tenant = 'acme' AND counter = ?1", [counter]).expect("corrupt");
    assert_eq!(changed, 1);
    let (ok, second, stderr) = report(&dir, &config);
    assert!(!ok, "a mismatch exits non-zero: {second:#}");
    assert!(stderr.contains("differ"), "{stderr}");
    let bad = find(&second, "u-1", "total_tokens", minute);
    assert_eq!((bad["status"].as_str(), bad["counter_value"].as_str(), bad["metered_sum"].as_str(), bad["difference"].as_str()), (Some("mismatch"), Some("168"), Some("161"), Some("7")));
    assert_eq!(rows(&second).iter().filter(|r| r["status"] == "mismatch").count(), 1, "{second:#}");
    let table = reconcile(&dir, &config, &[]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(!table.status.success() && text.contains("mismatch") && text.contains(counter), "{text}");

    // The token limit now counts another feature: its old counters belong to no plan.
    let (status, body) = send(&client, reqwest::Method::PUT, format!("{}/v1/plans/default", server.url), ACME_ADMIN, plan("search")).await;
    assert_eq!(status, 200, "{body}");
    let (ok, third, stderr) = report(&dir, &config);
    assert!(ok, "unknown definitions are not compared: {third:#}\n{stderr}");
    let old = rows(&third).iter().find(|r| r["counter"] == counter).cloned().expect("still listed");
    assert_eq!(old["status"], "unknown_definition");
    server.stop().await;
}

/// The distributed reconcile: counters in Redis (applied by the aggregator)
/// against the events in ClickHouse.
#[tokio::test]
async fn distributed_counters_reconcile_against_clickhouse_and_a_corrupted_one_is_reported() {
    let deployment = meterline_tests::limits::Distributed::start("limits_reconcile_d", 1, "").await;
    let (url, aggregator_toml, redis) = (deployment.url(0).to_owned(), deployment.aggregator_toml.clone(), &deployment.redis);
    let client = reqwest::Client::new();
    let (status, body) = send(&client, reqwest::Method::PUT, format!("{url}/v1/plans/default"), ACME_ADMIN, plan("chat")).await;
    assert_eq!(status, 200, "{body}");
    let now = Utc::now();
    let minute = DateTime::from_timestamp(now.timestamp() - 600 - now.timestamp().rem_euclid(60), 0).expect("minute");
    let batch: Vec<Value> = (0..6)
        .map(|n| {
            json!({"idempotency_key": format!("d{n}"), "timestamp": at(minute + Duration::seconds(n)), "user_id": format!("u-{}", n % 2),
                   "customer_id": "c-1", "feature": "chat", "model": "gpt-4o", "input_tokens": 10 + n, "cost_usd": "0.25"})
        })
        .collect();
    let (status, body) = send(&client, reqwest::Method::POST, format!("{url}/v1/events"), ACME_INGEST, json!(batch)).await;
    assert_eq!(status, 202, "{body}");

    let dir = temp_dir("limits_reconcile_d");
    let config = dir.join("aggregator.toml");
    std::fs::write(&config, &aggregator_toml).expect("config");
    let run = |json: bool| {
        let mut command = std::process::Command::new(service_binary("meterline"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("METERLINE_") {
                command.env_remove(name);
            }
        }
        command.args(["limits", "reconcile", "--role", "aggregator", "--config"]).arg(&config).args(["--tenant", "acme"]);
        if json {
            command.arg("--json");
        }
        command.env("RUST_BACKTRACE", "0").output().expect("run meterline")
    };
    // The aggregator counts after ClickHouse holds the events: poll until
    // every counter (2 users x tokens and calls, the customer's spend) matches.
    let first = poll_until(std::time::Duration::from_secs(30), "every counter to reconcile", || async {
        let out = run(true);
        let report: Value = serde_json::from_slice(&out.stdout).ok()?;
        let statuses: Vec<String> = rows(&report).iter().filter_map(|r| r["status"].as_str().map(str::to_owned)).collect();
        // Partitions flush on their own: a partial count matches too, so wait for all six events.
        let all_metered = rows(&report).iter().any(|r| r["definition"]["measure"] == "cost_usd" && r["metered_sum"] == "1.5");
        (out.status.success() && statuses.len() == 5 && statuses.iter().all(|s| s == "match") && all_metered).then_some(report)
    })
    .await;
    let spend = rows(&first).iter().find(|r| r["definition"]["measure"] == "cost_usd").cloned().expect("spend");
    assert_eq!((spend["counter_value"].as_str(), spend["metered_sum"].as_str()), (Some("1.5"), Some("1.5")), "{spend}");

    // One counter off by 7 in Redis: reported, and the command fails.
    let counter = spend["counter"].as_str().expect("counter");
    let cli = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "INCRBY", &format!("{{ml:acme}}:u:{counter}"), "7"])
        .output()
        .expect("redis-cli");
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let out = run(true);
    assert!(!out.status.success(), "a mismatch exits non-zero");
    let second: Value = serde_json::from_slice(&out.stdout).expect("report");
    let bad = rows(&second).iter().find(|r| r["counter"] == counter).cloned().expect("the counter");
    assert_eq!((bad["status"].as_str(), bad["difference"].as_str()), (Some("mismatch"), Some("0.000000007")), "{bad}");
}
