//! Dedupe snapshots on real processes (the aggregator binary, the broker,
//! ClickHouse 18.16): an assignment that loads a snapshot and then the keys
//! written after it stays exact when the aggregator was SIGKILLed between a
//! snapshot and data on either side of it, with every key retried.

use meterline_tests::stack::{ClickHouse, Process};
use meterline_tests::*;
use std::time::Duration;

/// Users of the test events; `event(user, n)` keys are `{user}-{n}`.
const USERS: usize = 20;

fn config(brokers: &str, topic: &str, ch: &ClickHouse, database: &str, snapshot_interval_secs: u64) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nshutdown_grace_secs = 20\n\
         [kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"agg-{topic}\"\nsession_timeout_ms = 2000\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\nrequest_timeout_ms = 5000\n\
         [flush]\ninterval_ms = 200\nmax_backoff_ms = 1000\n\
         [dedupe]\nexpected_keys_per_slice = 100000\nsnapshot_interval_secs = {snapshot_interval_secs}\n\
         [[tenants]]\nid = \"acme\"\ncredit_price_usd = \"0.001\"\n",
        free_port(),
        ch.url
    )
}

/// The aggregator binary on `config`, with `env`.
fn aggregator(config: &str, env: &[(&str, &str)]) -> Process {
    Process::start_config_env("meterline-aggregator", config, env)
}

/// Every user's events `n` in `range`: fixed payloads, so that sending them
/// again is a client retry.
fn events(range: std::ops::Range<usize>) -> Vec<serde_json::Value> {
    range.flat_map(|n| (0..USERS).map(move |u| event(&format!("u{u}"), n))).collect()
}

async fn post(url: &str, batch: &[serde_json::Value]) {
    for chunk in batch.chunks(100) {
        let response = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(&chunk).send().await.expect("post");
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    }
}

async fn number(ch: &ClickHouse, sql: &str) -> i64 {
    ch.try_query(sql).await.and_then(|t| t.trim().parse().ok()).unwrap_or(-1)
}

/// Waits until ClickHouse holds `unique` distinct keys and at least as many rolled-up events.
async fn written(ch: &ClickHouse, db: &str, unique: i64) {
    poll_until(Duration::from_secs(90), &format!("{unique} keys written and rolled up"), || async {
        let keys = number(ch, &format!("SELECT uniqExact(tenant, idempotency_key) FROM {db}.events")).await;
        // Each rollup table has its own insert: wait for every one of them
        // rather than lean on the order a flush writes them in.
        let mut rolled = i64::MAX;
        for table in ["rollups_minute", "rollups_user_daily", "rollups_user_span"] {
            let only = if table == "rollups_user_span" { " AND span_days = 1" } else { "" };
            rolled = rolled.min(number(ch, &format!("SELECT sum(events) FROM {db}.{table} WHERE tenant = 'acme'{only}")).await);
        }
        (keys >= unique && rolled >= unique).then_some(())
    })
    .await;
}

/// The exact totals: every unique key once in `events` and in each rollup,
/// with its cost (`event(_, n)` costs n + 1 nano-USD). The new keys come
/// after every retry in each partition's offsets, so once they are all
/// written every retry has been decided.
async fn assert_exact(ch: &ClickHouse, db: &str, unique: std::ops::Range<usize>, logs: &[&Process]) {
    let count = (unique.len() * USERS) as i64;
    let cost: i64 = unique.clone().map(|n| (n as i64 + 1) * USERS as i64).sum();
    written(ch, db, count).await;
    let raw = number(ch, &format!("SELECT count() FROM {db}.events")).await;
    let distinct = number(ch, &format!("SELECT uniqExact(tenant, idempotency_key) FROM {db}.events")).await;
    if raw != count || distinct != count {
        for p in logs {
            eprintln!("--- aggregator log ---\n{}", p.log_tail());
        }
    }
    assert_eq!((raw, distinct), (count, count), "each unique key written once");
    for table in ["rollups_minute", "rollups_user_daily"] {
        let sums = ch.query(&format!("SELECT sum(events), sum(cost_nanos) FROM {db}.{table} WHERE tenant = 'acme' FORMAT TSV")).await;
        assert_eq!(sums.trim(), format!("{count}\t{cost}"), "{table}: events and cost counted once");
    }
    let spans = ch.query(&format!("SELECT DISTINCT sum(events) FROM {db}.rollups_user_span WHERE tenant = 'acme' GROUP BY span_days FORMAT TSV")).await;
    assert_eq!(spans.trim(), count.to_string(), "every span length counts each event once");
}

#[tokio::test]
async fn assignment_after_a_crash_between_snapshot_and_data_is_exact() {
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let ch = ClickHouse::shared();
    let topic = unique_topic("snapshot");
    let db = ch.database(&format!("t_snapshot_{}", free_port())).await;
    let ingest = Ingest::start(ingest_config(&brokers, &topic, "")).await;
    create_topic(&brokers, &topic, 4).await;
    let (k1, k2, k3, k4) = (events(0..10), events(10..20), events(20..30), events(30..40));

    // 1. A snapshot, then data after it: a flush after assignment is
    //    snapshotted (one partition per flush), and the hour-long interval
    //    leaves K2 out of that partition's snapshot.
    let mut a1 = aggregator(&config(&brokers, &topic, &ch, &db, 3_600), &[]);
    post(&ingest.url, &k1).await;
    written(&ch, &db, k1.len() as i64).await;
    poll_until(Duration::from_secs(30), "a snapshot", || async {
        (number(&ch, &format!("SELECT count() FROM {db}.dedupe_snapshots")).await > 0).then_some(())
    })
    .await;
    post(&ingest.url, &k2).await;
    written(&ch, &db, (k1.len() + k2.len()) as i64).await;
    // The state the test is about: partitions with events past their snapshot.
    let behind = number(
        &ch,
        &format!(
            "SELECT count() FROM (SELECT kafka_partition, max(kafka_offset) AS last FROM {db}.events GROUP BY kafka_partition) AS e \
             ANY INNER JOIN (SELECT kafka_partition, max(covers_offset) AS covers FROM {db}.dedupe_snapshots GROUP BY kafka_partition) AS s \
             USING kafka_partition WHERE last > covers"
        ),
    )
    .await;
    assert!(behind > 0, "a partition has data written after its snapshot");
    a1.kill().await;

    // 2. Restart: the snapshot plus the keys after it. K1 and K2 retried, K3
    //    new; killed right after its next snapshot, before more data.
    let mut a2 = aggregator(&config(&brokers, &topic, &ch, &db, 1), &[("METERLINE_TEST_AGGREGATOR_HANG_AFTER_SNAPSHOT", "1")]);
    post(&ingest.url, &[k1.clone(), k2.clone(), k3.clone()].concat()).await;
    poll_until(Duration::from_secs(60), "the aggregator to stop after a snapshot", || async {
        a2.log().contains("stopping after the snapshot").then_some(())
    })
    .await;
    assert!(a2.log().contains("Snapshot { covers"), "the restart loaded a snapshot:\n{}", a2.log_tail());
    a2.kill().await;

    // 3. Restart: K1 to K3 retried again, K4 new; a damaged newest snapshot of
    //    one partition is set aside for a rebuild from events.
    ch.query(&format!(
        "INSERT INTO {db}.dedupe_snapshots (kafka_topic, kafka_partition, covers_offset, keys, payload_bytes, payload, written_at, version) \
         SELECT kafka_topic, kafka_partition, covers_offset, keys, 8, 'damaged!', written_at + 1, version FROM {db}.dedupe_snapshots \
         ORDER BY version DESC LIMIT 1"
    ))
    .await;
    let a3 = aggregator(&config(&brokers, &topic, &ch, &db, 3_600), &[]);
    post(&ingest.url, &[k1, k2, k3, k4].concat()).await;
    assert_exact(&ch, &db, 0..40, &[&a3]).await;
    assert!(a3.log().contains("Snapshot { covers"), "the restart loaded snapshots:\n{}", a3.log_tail());
    assert!(a3.log().contains("dedupe snapshot not usable"), "the damaged snapshot was set aside:\n{}", a3.log_tail());
    ingest.stop().await;
}
