//! Exact dedupe whatever a copy changes, on real processes: copies of an
//! idempotency key that change `user_id` or `customer_id` count once across
//! two aggregators, and a running stack upgraded from the user keying to the
//! key keying mid-stream (records and retries in flight across the switch,
//! an aggregator SIGKILLed) keeps its totals exact. With one user's events
//! now written by several aggregators, a runaway alert still opens once.

use meterline_tests::stack::{ClickHouse, Process};
use meterline_tests::webhook::Webhooks;
use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const PARTITIONS: i32 = 4;

fn brokers() -> String {
    stack_var("METERLINE_TEST_KAFKA_BROKERS")
}

fn aggregator(topic: &str, ch: &ClickHouse, database: &str, port: u16, keying: &str) -> String {
    aggregator_with(topic, ch, database, port, keying, "")
}

fn aggregator_with(topic: &str, ch: &ClickHouse, database: &str, port: u16, keying: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_secs = 20\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\ngroup_id = \"agg-{topic}\"\nsession_timeout_ms = 2000\nkeying = \"{keying}\"\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\nrequest_timeout_ms = 5000\n\
         [flush]\ninterval_ms = 200\nmax_batch_events = 5000\nmax_backoff_ms = 1000\n\
         [dedupe]\nexpected_keys_per_slice = 100000\n\
         [[tenants]]\nid = \"acme\"\ncredit_price_usd = \"0.001\"\n[[tenants]]\nid = \"globex\"\n{extra}",
        brokers(),
        ch.url
    )
}

fn ingest(topic: &str, keying: &str) -> meterline_ingest::Config {
    let mut config = ingest_config(&brokers(), topic, "");
    config.kafka.keying = serde_json::from_value(json!(keying)).expect("keying");
    config
}

/// One copy of key `key`: `user`, `customer`, and a cost that depends on the
/// key only, so every copy of a key costs the same whichever one counts.
fn copy(key: &str, user: &str, customer: &str, n: usize) -> Value {
    json!({
        "idempotency_key": key,
        "timestamp": (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339(),
        "user_id": user,
        "customer_id": customer,
        "feature": "chat",
        "model": "gpt-4o",
        "input_tokens": 100 + n,
        "output_tokens": 20,
        "cost_usd": format!("0.{:09}", n + 1),
    })
}

async fn post(url: &str, batch: &[Value]) {
    for chunk in batch.chunks(200) {
        let response = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&chunk).send().await.expect("post");
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 202, "{body}");
    }
}

async fn scalar(ch: &ClickHouse, sql: &str) -> u64 {
    ch.try_query(sql).await.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Keys whose home partitions cover every partition, `round` apart from other rounds.
fn sentinels(round: usize) -> Vec<Value> {
    let mut keys: Vec<Option<String>> = vec![None; PARTITIONS as usize];
    let mut n = 0;
    while keys.iter().any(Option::is_none) {
        let key = format!("sentinel-{round}-{n}");
        let home = meterline_schemas::wire::home_partition("acme", &key, PARTITIONS);
        keys[home as usize].get_or_insert(key);
        n += 1;
    }
    keys.into_iter().flatten().enumerate().map(|(i, k)| copy(&k, "sentinel", &format!("c-sentinel-{round}"), 900_000 + round * 10 + i)).collect()
}

/// Waits until every record produced so far was decided: one round of
/// sentinel keys (one per partition) counted means each partition was read
/// past everything before it, including whatever that reading forwarded,
/// which a second round then trails on its home partition.
async fn drain(ch: &ClickHouse, database: &str, url: &str, rounds: std::ops::Range<usize>, logs: &[&Process]) {
    for round in rounds {
        post(url, &sentinels(round)).await;
        // Every rollup table holding the sentinels is the flush done, whatever
        // order it writes them in.
        let sqls = ["rollups_minute", "rollups_user_daily", "rollups_user_span"].map(|table| {
            format!("SELECT sum(events) FROM {database}.{table} WHERE customer_id = 'c-sentinel-{round}'")
        });
        let counted = tokio::time::timeout(
            Duration::from_secs(120),
            poll_until(Duration::from_secs(120), "sentinels counted", || async {
                for sql in &sqls {
                    if scalar(ch, sql).await < PARTITIONS as u64 {
                        return None;
                    }
                }
                Some(())
            }),
        )
        .await;
        if counted.is_err() {
            for p in logs {
                eprintln!("--- aggregator log ---\n{}", p.log_tail());
            }
            panic!("sentinel round {round} not counted");
        }
    }
}

/// Every key counted exactly once, and the rollups exactly the sums of the
/// counted events: per user and customer, events and cost.
async fn assert_once(ch: &ClickHouse, database: &str, keys: u64) {
    let twice = ch.query(&format!("SELECT idempotency_key, count() AS n FROM {database}.events GROUP BY idempotency_key HAVING n > 1 LIMIT 5")).await;
    assert!(twice.trim().is_empty(), "keys counted more than once:\n{twice}");
    let counted = scalar(ch, &format!("SELECT count() FROM {database}.events WHERE idempotency_key NOT LIKE 'sentinel-%'")).await;
    assert_eq!(counted, keys, "every key counted once");
    let from_events = ch
        .query(&format!(
            "SELECT user_id, customer_id, count(), sum(cost_nanos) FROM {database}.events GROUP BY user_id, customer_id ORDER BY user_id, customer_id FORMAT TSV"
        ))
        .await;
    // Each event once per span length in the span table: its one-day spans alone.
    for (table, only) in [("rollups_minute", ""), ("rollups_user_daily", ""), ("rollups_user_span", " AND span_days = 1")] {
        let rolled = ch
            .query(&format!(
                "SELECT user_id, customer_id, sum(events), sum(cost_nanos) FROM {database}.{table} WHERE tenant != ''{only} \
                 GROUP BY user_id, customer_id ORDER BY user_id, customer_id FORMAT TSV"
            ))
            .await;
        assert_eq!(rolled, from_events, "{table} sums exactly the counted events");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_that_change_user_or_customer_count_once_across_aggregators() {
    let ch = ClickHouse::shared();
    let topic = unique_topic("keying-copies");
    let database = ch.database(&format!("keying_copies_{}", free_port())).await;
    create_topic(&brokers(), &topic, PARTITIONS).await;
    let ingest = Ingest::start(ingest(&topic, "key")).await;
    let a = Process::start("meterline-aggregator", &aggregator(&topic, &ch, &database, free_port(), "key"));
    let b = Process::start("meterline-aggregator", &aggregator(&topic, &ch, &database, free_port(), "key"));

    // The first copies, then (in later requests, so after them on any one
    // partition) copies changing the user, the customer, both, and retries.
    let keys = 300;
    let first: Vec<Value> = (0..keys).map(|n| copy(&format!("k-{n}"), &format!("u-{}", n % 30), "c-1", n)).collect();
    post(&ingest.url, &first).await;
    let mut copies = Vec::new();
    for n in 0..keys {
        let key = format!("k-{n}");
        copies.push(copy(&key, &format!("other-{n}"), "c-1", n));
        copies.push(copy(&key, &format!("u-{}", n % 30), "c-other", n));
        copies.push(copy(&key, &format!("moved-{n}"), "c-moved", n));
        copies.push(copy(&key, &format!("u-{}", n % 30), "c-1", n));
    }
    post(&ingest.url, &copies).await;
    drain(&ch, &database, &ingest.url, 0..1, &[&a, &b]).await;

    assert_once(&ch, &database, keys as u64).await;
    let strays = ch.query(&format!("SELECT count() FROM {database}.events WHERE user_id NOT LIKE 'u-%' AND user_id != 'sentinel' OR customer_id != 'c-1' AND user_id != 'sentinel'")).await;
    assert_eq!(strays.trim(), "0", "the first copy of every key counted, no changed copy");
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrading_the_keying_mid_stream_keeps_totals_exact() {
    let ch = ClickHouse::shared();
    let topic = unique_topic("keying-upgrade");
    let database = ch.database(&format!("keying_upgrade_{}", free_port())).await;
    create_topic(&brokers(), &topic, PARTITIONS).await;
    let user = |n: usize| format!("u-{}", n % 40);

    // 1. The stack before the upgrade: user keying in ingest and aggregator.
    let old_ingest = Ingest::start(ingest(&topic, "user")).await;
    let mut old = Process::start("meterline-aggregator", &aggregator(&topic, &ch, &database, free_port(), "user"));
    let a: Vec<Value> = (0..200).map(|n| copy(&format!("a-{n}"), &user(n), "c-1", n)).collect();
    post(&old_ingest.url, &a).await;
    post(&old_ingest.url, &a[..50]).await; // retries, same user: exact under the old keying too
    let sql = format!("SELECT count() FROM {database}.events");
    poll_until(Duration::from_secs(120), "the first copies counted by the old aggregator", || async { (scalar(&ch, &sql).await >= 200).then_some(()) }).await;

    // 2. The aggregators stop for the upgrade; the old ingest keeps taking
    //    events: new keys, and copies of counted keys that change the user
    //    (they land on the new user's partition, not the first copy's).
    old.stop().await;
    let b: Vec<Value> = (0..200).map(|n| copy(&format!("b-{n}"), &user(n), "c-1", 1_000 + n)).collect();
    post(&old_ingest.url, &b).await;
    let a_moved: Vec<Value> = (0..200).map(|n| copy(&format!("a-{n}"), &format!("moved-{n}"), "c-1", n)).collect();
    post(&old_ingest.url, &a_moved).await;
    old_ingest.stop().await;

    // 3. The upgraded stack, with those records still unread: new keys,
    //    copies of both earlier sets changing user or customer, retries.
    let new_ingest = Ingest::start(ingest(&topic, "key")).await;
    let mut new = Process::start("meterline-aggregator", &aggregator(&topic, &ch, &database, free_port(), "key"));
    let c: Vec<Value> = (0..200).map(|n| copy(&format!("c-{n}"), &user(n), "c-1", 2_000 + n)).collect();
    let mut mixed = Vec::new();
    for (n, first) in c.iter().enumerate() {
        mixed.push(first.clone());
        mixed.push(copy(&format!("a-{n}"), &format!("again-{n}"), "c-2", n));
        mixed.push(copy(&format!("b-{n}"), &format!("moved-{n}"), "c-1", 1_000 + n));
        mixed.push(copy(&format!("b-{n}"), &user(n), "c-3", 1_000 + n));
    }
    post(&new_ingest.url, &mixed[..400]).await;
    // A crash mid-stream, once it has counted something of the new records.
    let csql = format!("SELECT count() FROM {database}.events WHERE idempotency_key LIKE 'c-%'");
    poll_until(Duration::from_secs(120), "the new aggregator counting", || async { (scalar(&ch, &csql).await > 0).then_some(()) }).await;
    new.kill().await;
    post(&new_ingest.url, &mixed[400..]).await;
    post(&new_ingest.url, &c[..100]).await; // retries
    new.restart();
    drain(&ch, &database, &new_ingest.url, 0..2, &[&new]).await;

    assert_once(&ch, &database, 600).await;
    // Every key counted since the upgrade sits on its home partition: the
    // records the old ingest left on their user's partition were forwarded.
    let placed = ch.query(&format!("SELECT idempotency_key, kafka_partition FROM {database}.events WHERE idempotency_key NOT LIKE 'a-%' FORMAT TSV")).await;
    let strays: Vec<&str> = placed
        .lines()
        .filter(|l| {
            let (key, partition) = l.split_once('\t').expect("two columns");
            meterline_schemas::wire::home_partition("acme", key, PARTITIONS).to_string() != partition
        })
        .collect();
    assert!(strays.is_empty(), "counted off their home partition: {strays:?}");
    let upgrades = ch.query(&format!("SELECT count(), max(legacy_until) > now() FROM {database}.keying_upgrades FORMAT TSV")).await;
    assert_eq!(upgrades.trim(), "1\t1", "the upgrade recorded once, with rows of the user keying in the window");
    new_ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runaway_alert_opens_once_when_two_aggregators_write_the_user() {
    let ch = ClickHouse::shared();
    let topic = unique_topic("keying-alerts");
    let database = ch.database(&format!("keying_alerts_{}", free_port())).await;
    create_topic(&brokers(), &topic, PARTITIONS).await;
    let hooks = Webhooks::start().await;
    let hook = &hooks.url;
    // Only the absolute rule can fire: $1 in 10 minutes.
    let alerts = format!(
        "[alerts]\nwebhook_url = \"{hook}\"\ninterval_secs = 1\n\
         [alerts.rules]\nwindow_secs = 600\nabsolute_cost = \"1\"\npeer_multiple = 1000\npeer_floor = \"1000\"\n\
         self_multiple = 1000\nself_floor = \"1000\"\nmargin_loss = \"1000\"\n"
    );
    let ingest = Ingest::start(ingest(&topic, "key")).await;
    let a = Process::start("meterline-aggregator", &aggregator_with(&topic, &ch, &database, free_port(), "key", &alerts));
    let b = Process::start("meterline-aggregator", &aggregator_with(&topic, &ch, &database, free_port(), "key", &alerts));
    drain(&ch, &database, &ingest.url, 0..1, &[&a, &b]).await; // both in the group, every partition read
    let spend = |key: &str, cost: &str| {
        let mut e = copy(key, "runaway", "c-1", 0);
        e["cost_usd"] = json!(cost);
        e
    };
    // One event over the threshold: one partition, one aggregator opens.
    post(&ingest.url, &[spend("big", "2")]).await;
    let opened = |got: &[Value]| got.iter().filter(|b| b["event"] == "opened" && b["user_id"] == "runaway").count();
    poll_until(Duration::from_secs(60), "the alert opened", || async { (opened(&hooks.bodies()) > 0).then_some(()) }).await;
    // More of its spend on every partition: both aggregators now flush the
    // user and find it over the threshold, the other one for the first time.
    let more: Vec<Value> = sentinels(100).iter().map(|s| spend(s["idempotency_key"].as_str().expect("key"), "0.1")).collect();
    post(&ingest.url, &more).await;
    drain(&ch, &database, &ingest.url, 1..3, &[&a, &b]).await;
    let rows = ch.query(&format!("SELECT count() FROM {database}.alerts FINAL WHERE user_id = 'runaway' AND state = 'open'")).await;
    assert_eq!(rows.trim(), "1", "one open alert for the user");
    assert_eq!(opened(&hooks.bodies()), 1, "the webhook heard of it once");
    ingest.stop().await;
}
