//! Aggregator throughput beside a plain rdkafka consumer, dedupe memory per
//! key, and freshness (ingest ack to visible in the rollups), on this machine.
//!
//! `cargo run --release -p meterline-bench --bin aggregator-bench -- [EVENTS] [FRESHNESS_RATE]`
//! with the stack up (`eval "$(scripts/stack up)"`). FRESHNESS_RATE is the
//! steady load of the freshness run in events/s (default 2000), or `half`
//! for half the aggregator rate this run measured (the definition).

use meterline_aggregator::DedupeConfig;
use meterline_aggregator::{Known, PartitionDedupe};
use meterline_schemas::wire::{self, Envelope};
use meterline_schemas::{TimeBounds, parse_event};
use meterline_tests::stack::ClickHouse;
use meterline_tests::{Ingest, create_topic, event, free_port, ingest_config, stack_var, unique_topic};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn aggregator_config(brokers: &str, topic: &str, ch: &str, db: &str, port: u16) -> meterline_aggregator::Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"bench-{topic}\"\n\
         session_timeout_ms = 2000\n[clickhouse]\nurl = \"{ch}\"\ndatabase = \"{db}\"\n[[tenants]]\nid = \"acme\"\ncredit_price_usd = \"0.001\"\n"
    );
    meterline_aggregator::Config::load(&text, []).expect("bench config")
}

async fn count(ch: &ClickHouse, sql: &str) -> u64 {
    ch.query(sql).await.trim().parse().unwrap_or(0)
}

fn metric(name: &str) -> f64 {
    let text = meterline_aggregator::metrics::handle().render();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(300_000);
    let fresh_arg = std::env::args().nth(2).unwrap_or_else(|| "2000".to_owned());
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let ch = ClickHouse::shared();

    // The same records for both readers: 10,000 users, unique keys.
    let topic = unique_topic("bench-agg");
    create_topic(&brokers, &topic, 4).await;
    let now = chrono::Utc::now();
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("linger.ms", "5").set("compression.type", "lz4").create()?;
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..events)
        .map(|n| {
            let e = parse_event(&event(&format!("user-{}", n % 10_000), n).to_string(), &TimeBounds::default(), now).expect("valid");
            (wire::message_key("acme", &e.user_id), wire::encode(&Envelope { tenant: "acme".into(), received_at: now, event: e }))
        })
        .collect();
    let sends = records.iter().map(|(k, p)| producer.send(FutureRecord::to(&topic).key(k).payload(p), Duration::from_secs(60)));
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }

    // 1. Raw consumer: drain the topic, nothing else.
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "bench-raw").create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..4 {
        list.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let started = Instant::now();
    let mut seen = 0usize;
    while seen < events && started.elapsed() < Duration::from_secs(300) {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            seen += 1;
        }
    }
    let raw_secs = started.elapsed().as_secs_f64();
    drop(consumer);

    // 2. The aggregator, in process: from assignment to every event in ClickHouse.
    let db = ch.database(&format!("bench_{}", free_port())).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = aggregator_config(&brokers, &topic, &ch.url, &db, 0);
    let written_before = metric("meterline_aggregator_events_written_total");
    let agg = tokio::spawn(meterline_aggregator::serve(config, listener, async {
        let _ = stop_rx.await;
    }));
    let join_started = Instant::now();
    while metric("meterline_aggregator_assigned_partitions") < 4.0 && join_started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let joined = join_started.elapsed().as_secs_f64();
    let started = Instant::now();
    let events_sql = format!("SELECT count() FROM {db}.events");
    while (metric("meterline_aggregator_events_written_total") - written_before) < events as f64
        && started.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agg_secs = started.elapsed().as_secs_f64();
    let in_clickhouse = count(&ch, &events_sql).await;
    let _ = stop_tx.send(());
    agg.await??;

    // 3. Freshness: steady load through ingest and a fresh aggregator; time
    //    from each batch's 202 to its user's first row in the rollups.
    let topic = unique_topic("bench-fresh");
    create_topic(&brokers, &topic, 4).await;
    let db = ch.database(&format!("fresh_{}", free_port())).await;
    let ingest = Ingest::start(ingest_config(&brokers, &topic, "")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let before = metric("meterline_aggregator_assigned_partitions");
    let agg = tokio::spawn(meterline_aggregator::serve(aggregator_config(&brokers, &topic, &ch.url, &db, 0), listener, async {
        let _ = stop_rx.await;
    }));
    let t = Instant::now();
    while metric("meterline_aggregator_assigned_partitions") < 4.0 && t.elapsed() < Duration::from_secs(60) && before < 4.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = reqwest::Client::new();
    let mut acked: HashMap<String, Instant> = HashMap::new();
    let mut seen_at: HashMap<String, Instant> = HashMap::new();
    // 10 batches a second, one user each; ingest takes at most 10,000 events a request.
    let fresh_rate = if fresh_arg == "half" { (events as f64 / agg_secs / 2.0) as usize } else { fresh_arg.parse()? };
    let (batches, per_batch) = (100usize, (fresh_rate / 10).clamp(1, 10_000));
    let visible_sql = format!("SELECT DISTINCT user_id FROM {db}.rollups_minute WHERE tenant = 'acme' AND user_id LIKE 'fresh-%' FORMAT TSV");
    let load_started = Instant::now();
    for b in 0..batches {
        let user = format!("fresh-{b}");
        let body: Vec<_> = (0..per_batch).map(|n| event(&user, n)).collect();
        let r = client.post(format!("{}/v1/events", ingest.url)).bearer_auth("acme-ingest-key").json(&body).send().await?;
        anyhow::ensure!(r.status() == 202, "ingest answered {}", r.status());
        acked.insert(user, Instant::now());
        // 10 batches a second: `fresh_rate` events/s (2,000 by default, a moderate steady load).
        let next = load_started + Duration::from_millis(100 * (b as u64 + 1));
        while Instant::now() < next {
            for u in ch.query(&visible_sql).await.lines() {
                seen_at.entry(u.to_owned()).or_insert_with(Instant::now);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen_at.len() < batches && Instant::now() < deadline {
        for u in ch.query(&visible_sql).await.lines() {
            seen_at.entry(u.to_owned()).or_insert_with(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh_secs = load_started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> =
        acked.iter().filter_map(|(u, a)| seen_at.get(u).map(|s| s.saturating_duration_since(*a).as_secs_f64() * 1e3)).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
    let _ = stop_tx.send(());
    agg.await??;
    ingest.stop().await;

    // 4. Dedupe memory at 10 million keys (default sizing: 2M keys per 7-day
    //    slice, 1% false positives, 500k recent keys), spread over 35 days.
    let config = DedupeConfig::default();
    let mut d = PartitionDedupe::new(&config);
    let now_s = chrono::Utc::now().timestamp();
    let keys = 10_000_000u128;
    for k in 0..keys {
        let written = now_s - (35 * 86_400) + (k as i64 * 35 * 86_400 / keys as i64);
        d.insert(k.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834), k as u64, written, now_s);
    }
    let bytes = d.approx_bytes();
    let probes = 1_000_000u128;
    let fp = (0..probes).filter(|k| d.check(k.wrapping_mul(31) + (1u128 << 100)) != Known::New).count();
    let fp_ratio = fp as f64 / probes as f64;

    let raw_rate = events as f64 / raw_secs;
    let agg_rate = events as f64 / agg_secs;
    println!("aggregator-bench: {events} events, 4 partitions, ClickHouse {}", ch.query("SELECT version()").await.trim());
    println!("| path | events/s | seconds |");
    println!("|---|---:|---:|");
    println!("| raw rdkafka consumer (drain only) | {raw_rate:.0} | {raw_secs:.2} |");
    println!("| aggregator: decode, dedupe, price, roll up, write ClickHouse | {agg_rate:.0} | {agg_secs:.2} |");
    println!("ratio aggregator/raw: {:.2} (group join before timing: {joined:.1} s; rows in ClickHouse: {in_clickhouse})", agg_rate / raw_rate);
    println!("freshness ack->rollup ms at {} events/s: p50 {:.0}, p99 {:.0}, max {:.0} ({} of {batches} batches seen)", thousands(per_batch * 10), pct(0.5), pct(0.99), pct(1.0), lat.len());
    println!(
        "dedupe at 10M keys: {:.1} MiB, {:.2} bytes/key; bloom false-positive ratio {:.4} -> {:.0} exact look-ups/s at the aggregator rate above",
        bytes as f64 / 1048576.0,
        bytes as f64 / keys as f64,
        fp_ratio,
        fp_ratio * agg_rate
    );
    // One line for scripts/bench to collect.
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "aggregator",
            "events": events,
            "raw_events_per_s": raw_rate,
            "raw_secs": raw_secs,
            "aggregator_events_per_s": agg_rate,
            "aggregator_secs": agg_secs,
            "ratio": agg_rate / raw_rate,
            "rows_in_clickhouse": in_clickhouse,
            "group_join_secs": joined,
            "freshness": {
                "target_events_per_s": per_batch * 10,
                // What the pacing loop achieved (a slow ingest answer stretches it).
                "achieved_events_per_s": (batches * per_batch) as f64 / fresh_secs.max(1e-9),
                "batches": batches,
                "batches_seen": lat.len(),
                "p50_ms": pct(0.5),
                "p99_ms": pct(0.99),
                "max_ms": pct(1.0),
            },
            "dedupe": {
                "keys": keys as u64,
                "bytes": bytes,
                "bytes_per_key": bytes as f64 / keys as f64,
                "bloom_false_positive_ratio": fp_ratio,
            },
        })
    );
    Ok(())
}

/// `n` with thousands separators, as the human output has always shown the rate.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let groups: Vec<String> = digits.as_bytes().rchunks(3).rev().map(|g| String::from_utf8_lossy(g).into_owned()).collect();
    groups.join(",")
}
