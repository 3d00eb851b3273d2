//! The aggregator against the real broker and real ClickHouse 18.16: totals
//! equal an independently computed ground truth, through retries, conflicting
//! copies, late events, SIGKILLs, a rebalance, a ClickHouse outage and poison.

use meterline_tests::stack::{ClickHouse, Process};
use meterline_tests::workload::{self, Workload, event_count, fetch_totals};
use meterline_tests::*;
use serde_json::json;
use std::time::Duration;

fn brokers() -> String {
    stack_var("METERLINE_TEST_KAFKA_BROKERS")
}

fn aggregator_config(brokers: &str, topic: &str, ch: &ClickHouse, database: &str, metrics_port: u16) -> String {
    aggregator_config_flushing(brokers, topic, ch, database, metrics_port, 200)
}

fn aggregator_config_flushing(brokers: &str, topic: &str, ch: &ClickHouse, database: &str, metrics_port: u16, flush_ms: u64) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{metrics_port}\"\nshutdown_grace_secs = 20\n\
         [kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"agg-{topic}\"\nsession_timeout_ms = 2000\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\nrequest_timeout_ms = 5000\n\
         [flush]\ninterval_ms = {flush_ms}\nmax_batch_events = 5000\nmax_backoff_ms = 1000\n\
         [dedupe]\nexpected_keys_per_slice = 100000\n\
         [[tenants]]\nid = \"acme\"\ncredit_price_usd = \"0.001\"\n[[tenants]]\nid = \"globex\"\n",
        ch.url
    )
}

async fn post_batch(url: &str, batch: &[serde_json::Value]) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .bearer_auth("acme-ingest-key")
        .json(&batch)
        .send()
        .await
        .expect("post");
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"].as_u64(), Some(batch.len() as u64), "{body}");
}

async fn post_all(url: &str, batches: &[Vec<serde_json::Value>]) {
    for b in batches {
        post_batch(url, b).await;
    }
}

/// Waits until ClickHouse holds every unique event, then requires the totals
/// per user and minute to equal the ground truth exactly.
async fn assert_exact(ch: &ClickHouse, database: &str, work: &Workload, deadline: Duration, logs: &[&Process]) {
    let reached = tokio::time::timeout(
        deadline,
        poll_until(deadline, "all unique events in the rollups", || async {
            if !ch.migrated(database).await {
                return None;
            }
            let totals = fetch_totals(ch, database, "acme").await;
            (event_count(&totals) >= work.unique_events).then_some(())
        }),
    )
    .await;
    if reached.is_err() {
        for p in logs {
            eprintln!("--- aggregator log ---\n{}", p.log_tail());
        }
    }
    let totals = fetch_totals(ch, database, "acme").await;
    assert_eq!(event_count(&totals), work.unique_events, "events counted once each");
    if totals != work.expected {
        let diffs: Vec<_> = work
            .expected
            .iter()
            .filter(|(k, v)| totals.get(*k) != Some(*v))
            .take(5)
            .map(|(k, v)| format!("{k:?}: expected {v:?}, got {:?}", totals.get(k)))
            .collect();
        panic!("rollups differ from the ground truth in {} windows, e.g.\n{}", work.expected.len(), diffs.join("\n"));
    }
    // The per-user span table, written by its own insert after the minute
    // one, reaches the same per-user totals in every span length, and every
    // span starts on a multiple of its length.
    let mut per_user: std::collections::BTreeMap<String, (u64, i64, i64)> = std::collections::BTreeMap::new();
    for ((user, _), t) in &work.expected {
        let e = per_user.entry(user.clone()).or_default();
        e.0 += t.events;
        e.1 += t.cost_nanos;
        e.2 += t.revenue_nanos;
    }
    let expected: std::collections::BTreeMap<(i64, String), (u64, i64, i64)> = meterline_domain::SPAN_DAYS
        .iter()
        .flat_map(|span| per_user.iter().map(move |(u, t)| ((*span, u.clone()), *t)))
        .collect();
    let spans_sql = format!(
        "SELECT span_days, user_id, sum(events) AS e, sum(cost_nanos) AS c, sum(revenue_nanos) AS r FROM {database}.rollups_user_span \
         WHERE tenant = 'acme' GROUP BY span_days, user_id FORMAT JSONEachRow"
    );
    let num = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<i64>().ok()).or(v.as_i64()).expect("number");
    let spans = poll_until(Duration::from_secs(60), "the span table to catch up", || async {
        let rows: std::collections::BTreeMap<(i64, String), (u64, i64, i64)> = ch
            .rows(&spans_sql)
            .await
            .iter()
            .map(|r| ((num(&r["span_days"]), r["user_id"].as_str().expect("user").to_owned()), (num(&r["e"]) as u64, num(&r["c"]), num(&r["r"]))))
            .collect();
        let least = meterline_domain::SPAN_DAYS.iter().map(|span| rows.iter().filter(|((s, _), _)| s == span).map(|(_, v)| v.0).sum::<u64>()).min();
        (least >= Some(work.unique_events)).then_some(rows)
    })
    .await;
    assert_eq!(spans, expected, "per-user span rollups");
    let unaligned = ch
        .query(&format!(
            "SELECT count() FROM {database}.rollups_user_span WHERE tenant != '' AND toUInt32(window_start) % (86400 * greatest(span_days, 1)) != 0"
        ))
        .await;
    assert_eq!(unaligned.trim(), "0", "spans start on a multiple of their length");
    // The user-first daily table holds the same events per user and UTC day.
    let mut per_user_day: std::collections::BTreeMap<(String, i64), (u64, i64, i64)> = std::collections::BTreeMap::new();
    for ((user, window), t) in &work.expected {
        let e = per_user_day.entry((user.clone(), window - window.rem_euclid(86_400))).or_default();
        e.0 += t.events;
        e.1 += t.cost_nanos;
        e.2 += t.revenue_nanos;
    }
    let daily_sql = format!(
        "SELECT user_id, toUInt32(window_start) AS d, sum(events) AS e, sum(cost_nanos) AS c, sum(revenue_nanos) AS r \
         FROM {database}.rollups_user_daily WHERE tenant = 'acme' GROUP BY user_id, d FORMAT JSONEachRow"
    );
    let daily = poll_until(Duration::from_secs(60), "the user-first daily table to catch up", || async {
        let rows: std::collections::BTreeMap<(String, i64), (u64, i64, i64)> = ch
            .rows(&daily_sql)
            .await
            .iter()
            .map(|r| ((r["user_id"].as_str().expect("user").to_owned(), num(&r["d"])), (num(&r["e"]) as u64, num(&r["c"]), num(&r["r"]))))
            .collect();
        (rows.values().map(|v| v.0).sum::<u64>() >= work.unique_events).then_some(rows)
    })
    .await;
    assert_eq!(daily, per_user_day, "user-first daily rollups");
    // The audit trail holds each unique event once, with its partition and offset.
    let raw = ch
        .rows(&format!(
            "SELECT count() AS n, uniqExact(idempotency_key) AS k, sum(cost_nanos) AS c FROM {database}.events \
             WHERE tenant = 'acme' FORMAT JSONEachRow"
        ))
        .await;
    let n: u64 = raw[0]["n"].as_str().and_then(|s| s.parse().ok()).or(raw[0]["n"].as_u64()).expect("n");
    let k: u64 = raw[0]["k"].as_str().and_then(|s| s.parse().ok()).or(raw[0]["k"].as_u64()).expect("k");
    assert_eq!((n, k), (work.unique_events, work.unique_events), "raw events: one row per unique key");
}

struct Rig {
    topic: String,
    database: String,
    ingest: Ingest,
}

async fn rig(name: &str, ch: &ClickHouse, brokers: &str) -> Rig {
    let topic = unique_topic(name);
    let database = ch.database(&format!("t_{}_{}", name, free_port())).await;
    let ingest = Ingest::start(ingest_config(brokers, &topic, "")).await;
    // Create the topic before any consumer subscribes to it.
    create_topic(brokers, &topic, 4).await;
    Rig { topic, database, ingest }
}

#[tokio::test]
async fn ground_truth_totals_are_exact() {
    let ch = ClickHouse::shared();
    let r = rig("truth", &ch, &brokers()).await;
    let work = workload::generate(1, 4_000, 300, 400, chrono::Utc::now());
    assert!(work.retries > 100 && work.conflicts > 20, "the workload exercises dedupe");
    let port = free_port();
    let mut agg = Process::start("meterline-aggregator", &aggregator_config(&brokers(), &r.topic, &ch, &r.database, port));
    post_all(&r.ingest.url, &work.batches).await;
    assert_exact(&ch, &r.database, &work, Duration::from_secs(120), &[&agg]).await;
    // Operations: health, readiness, and the pipeline's metrics (lag arrives
    // with librdkafka's statistics, every 5 s).
    for path in ["healthz", "readyz"] {
        let status = reqwest::get(format!("http://127.0.0.1:{port}/{path}")).await.expect(path).status();
        assert_eq!(status, 200, "{path}");
    }
    let text = poll_until(Duration::from_secs(20), "consumer lag in /metrics", || async {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
        text.contains("meterline_aggregator_consumer_lag_messages{partition=").then_some(text)
    })
    .await;
    for needle in [
        "meterline_aggregator_events_in_total",
        "meterline_aggregator_events_written_total{tenant=\"acme\"}",
        "meterline_aggregator_duplicates_total{reason=\"retry\"}",
        "meterline_aggregator_duplicates_total{reason=\"conflict\"}",
        "meterline_aggregator_bloom_fill_ratio{partition=",
        "meterline_aggregator_flush_duration_seconds_bucket",
        "meterline_aggregator_flush_rows_bucket",
        "meterline_aggregator_unpriced_events_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let retries = metric(port, "meterline_aggregator_duplicates_total{reason=\"retry\"}").await;
    assert_eq!(retries, work.retries as f64, "every client retry dropped and counted");
    let conflicts = metric(port, "meterline_aggregator_duplicates_total{reason=\"conflict\"}").await;
    assert_eq!(conflicts, work.conflicts as f64, "every conflicting copy dropped and counted");
    // Nothing was dead-lettered, and a clean stop works.
    let dead = ch.query(&format!("SELECT count() FROM {}.dead_letters", r.database)).await;
    assert_eq!(dead.trim(), "0");
    agg.stop().await;
    r.ingest.stop().await;
}

#[tokio::test]
async fn an_empty_span_table_backfills_from_events_in_chunks() {
    // What an existing deployment sees when a new rollup table arrives: its
    // events are all in, the new table is empty. The aggregator must roll the
    // whole history up on assignment, in chunks small enough to stay atomic.
    let ch = ClickHouse::shared();
    let r = rig("backfill", &ch, &brokers()).await;
    let work = workload::generate(7, 3_000, 200, 300, chrono::Utc::now());
    let port = free_port();
    let config = aggregator_config(&brokers(), &r.topic, &ch, &r.database, port);
    let mut agg = Process::start("meterline-aggregator", &config);
    post_all(&r.ingest.url, &work.batches).await;
    assert_exact(&ch, &r.database, &work, Duration::from_secs(120), &[&agg]).await;
    agg.stop().await;
    ch.query(&format!("TRUNCATE TABLE {}.rollups_user_span", r.database)).await;

    let chunk = 400;
    let small = config.replace("max_batch_events = 5000", &format!("max_batch_events = {chunk}"));
    assert_ne!(small, config, "the test config sets max_batch_events");
    let agg = Process::start("meterline-aggregator", &small);
    // assert_exact compares every span length with the ground truth.
    assert_exact(&ch, &r.database, &work, Duration::from_secs(120), &[&agg]).await;
    let records: usize = work.batches.iter().map(Vec::len).sum();
    let markers: usize = ch
        .query(&format!("SELECT count() FROM {}.rollups_user_span WHERE tenant = '' AND markers > 0", r.database))
        .await
        .trim()
        .parse()
        .expect("count");
    assert!(markers >= records / chunk, "{records} records backfilled in {markers} chunks of at most {chunk} offsets");
    assert!(agg.log().contains("rolled up events a crash left without rollups"), "the backfill ran on assignment");
    r.ingest.stop().await;
}

/// Events in the audit table (0 until the aggregator has created it).
async fn raw_events(ch: &ClickHouse, database: &str) -> u64 {
    ch.try_query(&format!("SELECT count() FROM {database}.events")).await.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn sigkill_during_processing_loses_and_doubles_nothing() {
    let ch = ClickHouse::shared();
    let r = rig("crash", &ch, &brokers()).await;
    let work = workload::generate(2, 30_000, 500, 500, chrono::Utc::now());
    let config = aggregator_config(&brokers(), &r.topic, &ch, &r.database, free_port());
    let mut agg = Process::start("meterline-aggregator", &config);
    let url = r.ingest.url.clone();
    let batches = work.batches.clone();
    // Paced, so that the stream lasts well beyond the kills (~10 s).
    let poster = tokio::spawn(async move {
        for b in &batches {
            post_batch(&url, b).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    // Each kill lands while the aggregator is making progress (events written
    // since it last started), at a pseudo-random moment: flushes of up to
    // 5,000 events run back to back, so kills land before, during and between
    // the inserts of a flush.
    let mut rng = workload::Rng::new(99);
    let mut kills = 0;
    while kills < 4 {
        let before = raw_events(&ch, &r.database).await;
        if before >= work.unique_events {
            break;
        }
        poll_until(Duration::from_secs(60), "progress since the last restart", || async {
            (raw_events(&ch, &r.database).await > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.below(250))).await;
        agg.kill().await;
        kills += 1;
        agg.restart();
    }
    poster.await.expect("poster");
    assert!(kills >= 3, "only {kills} kills landed while the aggregator made progress");
    assert_exact(&ch, &r.database, &work, Duration::from_secs(180), &[&agg]).await;
    // Kills that fell between a flush's events insert and its rollups insert
    // show as repairs; the totals above are exact either way.
    eprintln!("kills: {kills}; rollup repairs after them: {}", agg.log().matches("rolled up events a crash left").count());
    agg.stop().await;
    r.ingest.stop().await;
}

#[tokio::test]
async fn sigkill_while_one_flush_is_written_and_the_next_decided_loses_and_doubles_nothing() {
    // Flushes overlap: while one is written, the next is consumed and
    // decided. Every write here pauses between its events insert and its
    // rollups (a test-only variable), and each kill lands once the next flush
    // is decided behind it (two flushes not yet durable): the one being
    // written has its events in ClickHouse and no rollups, the next has its
    // keys in the dedupe state and nothing written, and neither may have its
    // offsets committed.
    let ch = ClickHouse::shared();
    let r = rig("overlap", &ch, &brokers()).await;
    let work = workload::generate(8, 15_000, 300, 250, chrono::Utc::now());
    let port = free_port();
    let config = aggregator_config(&brokers(), &r.topic, &ch, &r.database, port);
    let pause = [("METERLINE_TEST_AGGREGATOR_PAUSE_BEFORE_ROLLUPS_MS", "1500")];
    let mut agg = Process::start_config_env("meterline-aggregator", &config, &pause);
    let url = r.ingest.url.clone();
    let batches = work.batches.clone();
    let poster = tokio::spawn(async move {
        for b in &batches {
            post_batch(&url, b).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut kills = 0;
    while kills < 3 {
        // Or no overlap is coming: everything posted, and the aggregator up
        // with nothing buffered or unwritten.
        let overlapping = poll_until(Duration::from_secs(60), "a flush decided while the one before it is written, or an idle aggregator", || async {
            if metric(port, "meterline_aggregator_unwritten_flushes").await >= 2.0 {
                return Some(true);
            }
            let idle = poster.is_finished()
                && metric(port, "meterline_aggregator_assigned_partitions").await == 4.0
                && metric(port, "meterline_aggregator_unwritten_flushes").await == 0.0
                && metric(port, "meterline_aggregator_buffered_events").await == 0.0;
            idle.then_some(false)
        })
        .await;
        if !overlapping {
            break;
        }
        agg.kill().await;
        kills += 1;
        agg.restart();
    }
    poster.await.expect("poster");
    assert_exact(&ch, &r.database, &work, Duration::from_secs(180), &[&agg]).await;
    assert!(kills >= 2, "only {kills} kills landed while flushes overlapped");
    // The written flush's events were in without their rollups at the kill:
    // the next start rolled them up (the pause makes that the likely place).
    let repairs = agg.log().matches("rolled up events a crash left").count();
    eprintln!("kills while flushes overlapped: {kills}; rollup repairs after them: {repairs}");
    assert!(repairs >= 1, "no kill landed between a flush's events and its rollups ({kills} kills)");
    agg.stop().await;
    r.ingest.stop().await;
}

#[tokio::test]
async fn rebalance_after_a_member_dies_keeps_totals_exact() {
    let ch = ClickHouse::shared();
    let r = rig("rebalance", &ch, &brokers()).await;
    let work = workload::generate(3, 10_000, 300, 300, chrono::Utc::now());
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Process::start("meterline-aggregator", &aggregator_config(&brokers(), &r.topic, &ch, &r.database, port_a));
    let b = Process::start("meterline-aggregator", &aggregator_config(&brokers(), &r.topic, &ch, &r.database, port_b));
    // Both members hold partitions before one of them dies.
    poll_until(Duration::from_secs(60), "both members to own partitions", || async {
        let (pa, pb) = (metric(port_a, "meterline_aggregator_assigned_partitions").await, metric(port_b, "meterline_aggregator_assigned_partitions").await);
        (pa >= 1.0 && pb >= 1.0 && pa + pb == 4.0).then_some(())
    })
    .await;
    let url = r.ingest.url.clone();
    let batches = work.batches.clone();
    let poster = tokio::spawn(async move { post_all(&url, &batches).await });
    let before = raw_events(&ch, &r.database).await;
    poll_until(Duration::from_secs(60), "both members writing", || async {
        (raw_events(&ch, &r.database).await > before + 1_000).then_some(())
    })
    .await;
    a.kill().await;
    poller_takes_all(port_b).await;
    poster.await.expect("poster");
    assert_exact(&ch, &r.database, &work, Duration::from_secs(180), &[&b]).await;
    drop(b);
    r.ingest.stop().await;
}

async fn poller_takes_all(port: u16) {
    poll_until(Duration::from_secs(60), "the survivor to own all partitions", || async {
        (metric(port, "meterline_aggregator_assigned_partitions").await == 4.0).then_some(())
    })
    .await;
}

async fn metric(port: u16, name: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else { return 0.0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test]
async fn clickhouse_outage_holds_then_resumes_without_loss() {
    let mut ch = ClickHouse::private().await;
    let r = rig("chdown", &ch, &brokers()).await;
    let work = workload::generate(4, 4_000, 200, 250, chrono::Utc::now());
    let port = free_port();
    let agg = Process::start("meterline-aggregator", &aggregator_config(&brokers(), &r.topic, &ch, &r.database, port));
    let third = work.batches.len() / 3;
    post_all(&r.ingest.url, &work.batches[..third]).await;
    poll_until(Duration::from_secs(60), "first events written", || async {
        (metric(port, "meterline_aggregator_events_written_total").await > 0.0).then_some(())
    })
    .await;
    ch.kill().await;
    post_all(&r.ingest.url, &work.batches[third..2 * third]).await;
    // Down across several flush intervals: the aggregator has failed writes and holds them.
    poll_until(Duration::from_secs(60), "failed writes while ClickHouse is down", || async {
        (metric(port, "meterline_aggregator_write_retries_total").await >= 3.0).then_some(())
    })
    .await;
    ch.restart().await;
    post_all(&r.ingest.url, &work.batches[2 * third..]).await;
    assert_exact(&ch, &r.database, &work, Duration::from_secs(180), &[&agg]).await;
    drop(agg);
    r.ingest.stop().await;
}

#[tokio::test]
async fn poison_record_goes_to_dead_letters_and_the_partition_flows_on() {
    let ch = ClickHouse::shared();
    let r = rig("poison", &ch, &brokers()).await;
    let agg = Process::start("meterline-aggregator", &aggregator_config(&brokers(), &r.topic, &ch, &r.database, free_port()));
    let before: Vec<_> = (0..10).map(|n| event("victim", n)).collect();
    post_batch(&r.ingest.url, &before).await;
    // Garbage on the same partition as the user's events.
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("producer");
    let delivery = producer
        .send(
            rdkafka::producer::FutureRecord::to(&r.topic).key("acme/victim").payload(b"\x00not a meterline record".as_slice()),
            Duration::from_secs(10),
        )
        .await
        .expect("poison sent");
    let (partition, offset) = (delivery.partition, delivery.offset);
    let after: Vec<_> = (10..20).map(|n| event("victim", n)).collect();
    post_batch(&r.ingest.url, &after).await;
    let rows = poll_until(Duration::from_secs(60), "the poison record in dead_letters and all 20 events", || async {
        if !ch.migrated(&r.database).await {
            return None;
        }
        let dead = ch
            .rows(&format!("SELECT kafka_partition, kafka_offset, reason FROM {}.dead_letters FORMAT JSONEachRow", r.database))
            .await;
        let counted = ch.query(&format!("SELECT sum(events) FROM {}.rollups_minute WHERE tenant = 'acme'", r.database)).await;
        (counted.trim() == "20" && !dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["kafka_partition"], json!(partition));
    let got_offset = rows[0]["kafka_offset"].as_str().and_then(|s| s.parse::<i64>().ok()).or(rows[0]["kafka_offset"].as_i64());
    assert_eq!(got_offset, Some(offset));
    assert!(rows[0]["reason"].as_str().expect("reason").contains("magic"), "{rows:?}");
    drop(agg);
    r.ingest.stop().await;
}

/// Events the aggregator has consumed (read from its /metrics).
async fn consumed(port: u16) -> f64 {
    metric(port, "meterline_aggregator_events_in_total").await
}

#[tokio::test]
async fn sigterm_writes_what_is_buffered_before_exiting() {
    let ch = ClickHouse::shared();
    let r = rig("drain", &ch, &brokers()).await;
    let work = workload::generate(5, 1_500, 100, 500, chrono::Utc::now());
    let port = free_port();
    // A flush interval far longer than the test: only the shutdown drain can write.
    let mut agg = Process::start(
        "meterline-aggregator",
        &aggregator_config_flushing(&brokers(), &r.topic, &ch, &r.database, port, 600_000),
    );
    post_all(&r.ingest.url, &work.batches).await;
    let records: usize = work.batches.iter().map(Vec::len).sum();
    poll_until(Duration::from_secs(60), "every record consumed into the buffer", || async {
        (consumed(port).await >= records as f64).then_some(())
    })
    .await;
    assert_eq!(raw_events(&ch, &r.database).await, 0, "nothing written before shutdown");
    agg.stop().await;
    // Exited cleanly: everything is in ClickHouse now, with no restart.
    let totals = fetch_totals(&ch, &r.database, "acme").await;
    assert_eq!(totals, work.expected);
    r.ingest.stop().await;
}

#[tokio::test]
async fn revoked_partitions_are_written_before_they_are_let_go() {
    let ch = ClickHouse::shared();
    let r = rig("revoke", &ch, &brokers()).await;
    let work = workload::generate(6, 1_500, 100, 500, chrono::Utc::now());
    let (port_a, port_b) = (free_port(), free_port());
    let slow = |port| aggregator_config_flushing(&brokers(), &r.topic, &ch, &r.database, port, 600_000);
    let a = Process::start("meterline-aggregator", &slow(port_a));
    post_all(&r.ingest.url, &work.batches).await;
    let records: usize = work.batches.iter().map(Vec::len).sum();
    poll_until(Duration::from_secs(60), "every record buffered by the first member", || async {
        (consumed(port_a).await >= records as f64).then_some(())
    })
    .await;
    assert_eq!(raw_events(&ch, &r.database).await, 0, "nothing written yet");
    // A second member joins: the rebalance revokes the first member's
    // partitions, which must write their buffers before letting go. Neither
    // member would flush on its own for ten minutes.
    let b = Process::start("meterline-aggregator", &slow(port_b));
    assert_exact(&ch, &r.database, &work, Duration::from_secs(60), &[&a, &b]).await;
    drop((a, b));
    r.ingest.stop().await;
}
