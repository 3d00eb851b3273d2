//! Aggregator throughput beside a plain rdkafka consumer, dedupe memory per
//! key, and freshness (ingest ack to visible in the rollups), on this machine.
//!
//! `cargo run --release -p meterline-bench --bin aggregator-bench -- [EVENTS] [FRESHNESS_RATE] [KEYING]`
//! with the stack up (`eval "$(scripts/stack up)"`). FRESHNESS_RATE is the
//! steady load of the freshness run in events/s (default 2000), or `half`
//! for half the aggregator rate this run measured (the definition).
//! KEYING is `key` (default: records on their key's home partition, as
//! ingest produces them), `user` (the keying before it, records keyed by
//! user and counted in place) or `transition` (`key` while rows counted
//! under the user keying are in the dedupe window: every new key is looked
//! up in ClickHouse).
//!
//! FRESHNESS_RATE `fill` only fills a topic and stops: it prints the
//! standalone aggregator's config for that topic and a fresh database, for
//! profiling `meterline-aggregator` on exactly this workload (`PROFILE.md`).

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

fn aggregator_config_text(brokers: &str, topic: &str, ch: &str, db: &str, port: u16) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"bench-{topic}\"\n\
         session_timeout_ms = 2000\n[clickhouse]\nurl = \"{ch}\"\ndatabase = \"{db}\"\n[[tenants]]\nid = \"acme\"\ncredit_price_usd = \"0.001\"\n"
    )
}

fn aggregator_config(brokers: &str, topic: &str, ch: &str, db: &str, port: u16) -> meterline_aggregator::Config {
    meterline_aggregator::Config::load(&aggregator_config_text(brokers, topic, ch, db, port), []).expect("bench config")
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
    let keying = std::env::args().nth(3).unwrap_or_else(|| "key".to_owned());
    anyhow::ensure!(["key", "user", "transition"].contains(&keying.as_str()), "KEYING is key, user or transition");
    let by_user = keying == "user";
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let ch = ClickHouse::shared();

    // The same records for both readers: 10,000 users, unique keys.
    let topic = unique_topic("bench-agg");
    create_topic(&brokers, &topic, 4).await;
    let now = chrono::Utc::now();
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("linger.ms", "5").set("compression.type", "lz4").create()?;
    let records: Vec<(Vec<u8>, Vec<u8>, Option<i32>)> = (0..events)
        .map(|n| {
            let e = parse_event(&event(&format!("user-{}", n % 10_000), n).to_string(), &TimeBounds::default(), now).expect("valid");
            let (key, partition) = if by_user {
                (wire::message_key("acme", &e.user_id), None)
            } else {
                (wire::message_key("acme", &e.idempotency_key), Some(wire::home_partition("acme", &e.idempotency_key, 4)))
            };
            (key, wire::encode(&Envelope { tenant: "acme".into(), received_at: now, event: e }), partition)
        })
        .collect();
    let sends = records.iter().map(|(k, p, partition)| {
        let record = FutureRecord::to(&topic).key(k).payload(p);
        producer.send(if let Some(at) = partition { record.partition(*at) } else { record }, Duration::from_secs(60))
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }

    if fresh_arg == "fill" {
        let db = ch.database(&format!("prof_{}", free_port())).await;
        let mut text = aggregator_config_text(&brokers, &topic, &ch.url, &db, free_port());
        if by_user {
            text = text.replace("[clickhouse]", "keying = \"user\"\n[clickhouse]");
        }
        println!("{text}");
        eprintln!("aggregator-bench: filled {topic} with {events} events; database {db}");
        return Ok(());
    }

    // 1. Raw consumer: drain the topic, nothing else.
    // librdkafka stops fetching for `fetch.queue.backoff.ms` (1 s by default)
    // once its local queue holds `queued.min.messages`; this reader empties
    // that queue in a fraction of a second, so with the default it stalled
    // a second in most runs (`bench/PROFILE.md`). The baseline is the client
    // at its best, not its default back-off.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "bench-raw")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..4 {
        list.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let started = Instant::now();
    let mut seen = 0usize;
    // Most of the raw drain is getting its first record (connection,
    // offsets, first fetch); both readers' rates are also given from their
    // first record on, where the bootstrap no longer counts.
    let mut raw_first = None;
    while seen < events && started.elapsed() < Duration::from_secs(300) {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            raw_first.get_or_insert_with(|| started.elapsed().as_secs_f64());
            seen += 1;
        }
    }
    let raw_secs = started.elapsed().as_secs_f64();
    let raw_first = raw_first.unwrap_or(raw_secs);
    drop(consumer);

    // 2. The aggregator, in process: from assignment to every event in ClickHouse.
    let db = ch.database(&format!("bench_{}", free_port())).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = aggregator_config(&brokers, &topic, &ch.url, &db, 0);
    if by_user {
        config.kafka.keying = meterline_schemas::wire::Keying::User;
    }
    if keying == "transition" {
        // Rows of the user keying in the window until tomorrow: the upgrade's first 35 days.
        let store = meterline_clickhouse::connect(&config.clickhouse).await?;
        store.migrate().await?;
        ch.query(&format!("INSERT INTO {db}.keying_upgrades VALUES ('{topic}', now(), now() + 86400)")).await;
    }
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
    let consumed_before = metric("meterline_aggregator_events_in_total");
    let mut agg_first = None;
    while (metric("meterline_aggregator_events_written_total") - written_before) < events as f64
        && started.elapsed() < Duration::from_secs(600)
    {
        if agg_first.is_none() && metric("meterline_aggregator_events_in_total") > consumed_before {
            agg_first = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agg_secs = started.elapsed().as_secs_f64();
    let agg_first = agg_first.unwrap_or(0.0);
    let in_clickhouse = count(&ch, &events_sql).await;
    // Minute-rollup rows each flush's INSERT made (a flush is one written_at
    // second here), and what they would be were each partition flushed by
    // its own aggregator: a user's events now spread over partitions.
    let row_key = "tenant, intDiv(toUInt32(event_time), 60), user_id, customer_id, feature, model, environment, billable";
    let rollup_rows = count(&ch, &format!("SELECT sum(n) FROM (SELECT uniqExact({row_key}) AS n FROM {db}.events GROUP BY written_at)")).await;
    let rollup_rows_split =
        count(&ch, &format!("SELECT sum(n) FROM (SELECT uniqExact({row_key}) AS n FROM {db}.events GROUP BY written_at, kafka_partition)")).await;
    let flushes = count(&ch, &format!("SELECT uniqExact(written_at) FROM {db}.events")).await;
    let lookups = metric("meterline_aggregator_dedupe_exact_lookups_total");
    let _ = stop_tx.send(());
    agg.await??;

    // 3. Freshness: steady load through ingest and a fresh aggregator; time
    //    from each batch's 202 to its user's first row in the rollups.
    let topic = unique_topic("bench-fresh");
    create_topic(&brokers, &topic, 4).await;
    let db = ch.database(&format!("fresh_{}", free_port())).await;
    let mut fresh_ingest = ingest_config(&brokers, &topic, "");
    let mut fresh_config = aggregator_config(&brokers, &topic, &ch.url, &db, 0);
    if by_user {
        fresh_ingest.kafka.keying = meterline_schemas::wire::Keying::User;
        fresh_config.kafka.keying = meterline_schemas::wire::Keying::User;
    }
    let ingest = Ingest::start(fresh_ingest).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let before = metric("meterline_aggregator_assigned_partitions");
    let agg = tokio::spawn(meterline_aggregator::serve(fresh_config, listener, async {
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
    let raw_drain = events as f64 / (raw_secs - raw_first).max(1e-3);
    let agg_drain = events as f64 / (agg_secs - agg_first).max(1e-3);
    println!("aggregator-bench: {events} events, 4 partitions, keying {keying}, ClickHouse {}", ch.query("SELECT version()").await.trim());
    println!("| path | events/s | seconds |");
    println!("|---|---:|---:|");
    println!("| raw rdkafka consumer (drain only) | {raw_rate:.0} | {raw_secs:.2} |");
    println!("| aggregator: decode, dedupe, price, roll up, write ClickHouse | {agg_rate:.0} | {agg_secs:.2} |");
    println!("ratio aggregator/raw: {:.2} (group join before timing: {joined:.1} s; rows in ClickHouse: {in_clickhouse})", agg_rate / raw_rate);
    println!(
        "from the first record: raw {} records/s (first after {raw_first:.2} s), aggregator {} events/s written (first consumed after {agg_first:.2} s): ratio {:.2}",
        thousands(raw_drain as usize),
        thousands(agg_drain as usize),
        agg_drain / raw_drain
    );
    println!(
        "minute-rollup rows: {rollup_rows} in {flushes} flushes ({:.0} per flush); with one aggregator per partition {rollup_rows_split} ({:.2}x); exact look-ups {lookups:.0}",
        rollup_rows as f64 / flushes.max(1) as f64,
        rollup_rows_split as f64 / rollup_rows.max(1) as f64
    );
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
            "keying": keying,
            "rollup_rows": rollup_rows,
            "rollup_rows_one_aggregator_per_partition": rollup_rows_split,
            "flushes": flushes,
            "exact_lookups": lookups,
            "raw_events_per_s": raw_rate,
            "raw_secs": raw_secs,
            "aggregator_events_per_s": agg_rate,
            "aggregator_secs": agg_secs,
            "ratio": agg_rate / raw_rate,
            "raw_first_record_secs": raw_first,
            "raw_drain_events_per_s": raw_drain,
            "aggregator_first_record_secs": agg_first,
            "aggregator_drain_events_per_s": agg_drain,
            "drain_ratio": agg_drain / raw_drain,
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
