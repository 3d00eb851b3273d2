//! Partition assignment at scale: time from assignment to the partition's
//! first flush with KEYS keys (default 10 million) in its 35-day dedupe
//! window, when the dedupe state is rebuilt from every key (snapshots off:
//! the path before snapshots) and from a dedupe snapshot plus the TAIL keys
//! written after it; beside the bare ClickHouse read of those keys.
//!
//! `cargo run --release -p meterline-bench --bin assign-bench -- [KEYS] [TAIL]`
//! with the stack up (`eval "$(scripts/stack up)"`).
//!
//! The window is filled in ClickHouse directly (one `INSERT ... SELECT` from
//! `numbers()`), spread evenly over the last 34 days of `written_at` as a
//! steady stream would be. Their Kafka offsets are below 0, as if the topic
//! held them before this run, and each rollup table gets a progress marker
//! at offset -1: the aggregator positions at offset 0, finds nothing to
//! repair, and the one record produced before each run is its first flush.

use meterline_clickhouse::{ClickHouseConfig, Store};
use meterline_schemas::wire::{self, Envelope};
use meterline_schemas::{TimeBounds, parse_event};
use meterline_tests::stack::ClickHouse;
use meterline_tests::{create_topic, event, free_port, stack_var, unique_topic};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

fn aggregator_config(brokers: &str, topic: &str, ch: &str, db: &str, snapshots: bool) -> meterline_aggregator::Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"bench-{topic}\"\n\
         session_timeout_ms = 2000\n[clickhouse]\nurl = \"{ch}\"\ndatabase = \"{db}\"\nrequest_timeout_ms = 60000\n\
         [flush]\ninterval_ms = 200\n[dedupe]\nsnapshots = {snapshots}\n\
         [[tenants]]\nid = \"acme\"\ncredit_price_usd = \"0.001\"\n"
    );
    meterline_aggregator::Config::load(&text, []).expect("bench config")
}

fn metric(name: &str) -> f64 {
    let text = meterline_aggregator::metrics::handle().render();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Sends `n` fresh events (keys `{prefix}-0..n`) to partition 0.
async fn produce(producer: &FutureProducer, topic: &str, prefix: &str, n: usize) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| {
            let mut body = event(&format!("user-{}", i % 1_000), i);
            body["idempotency_key"] = serde_json::json!(format!("{prefix}-{i}"));
            let e = parse_event(&body.to_string(), &TimeBounds::default(), now).expect("valid event");
            (wire::message_key("acme", &e.user_id), wire::encode(&Envelope { tenant: "acme".into(), received_at: now, event: e }))
        })
        .collect();
    let sends = records.iter().map(|(k, p)| producer.send(FutureRecord::to(topic).partition(0).key(k).payload(p), Duration::from_secs(60)));
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// One run's timings, in seconds.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Partition assigned (the gauge rose) to its first events written.
    assign_to_flush: f64,
    /// The dedupe rebuild alone (`meterline_aggregator_partition_load_seconds`).
    load: f64,
}

/// Starts an aggregator in this process and times assignment to its first
/// flush of `expect` events; the caller stops it.
async fn run(config: meterline_aggregator::Config, expect: f64, source: &str) -> anyhow::Result<(Run, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let written = metric("meterline_aggregator_events_written_total");
    let load_sum = format!("meterline_aggregator_partition_load_seconds_sum{{source=\"{source}\"}}");
    let loaded = metric(&load_sum);
    let agg = tokio::spawn(async move {
        meterline_aggregator::serve(config, listener, async {
            let _ = stop_rx.await;
        })
        .await
        .map_err(anyhow::Error::from)
    });
    let deadline = Instant::now() + Duration::from_secs(900);
    while metric("meterline_aggregator_assigned_partitions") < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let assigned = Instant::now();
    while metric("meterline_aggregator_events_written_total") - written < expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::ensure!(Instant::now() < deadline, "no first flush within 15 minutes");
    let r = Run { assign_to_flush: assigned.elapsed().as_secs_f64(), load: metric(&load_sum) - loaded };
    Ok((r, stop_tx, agg))
}

async fn stop(stop_tx: tokio::sync::oneshot::Sender<()>, agg: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    let _ = stop_tx.send(());
    agg.await??;
    // The gauge falls as the partition is revoked; the next run times from its rise.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric("meterline_aggregator_assigned_partitions") > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::ensure!(metric("meterline_aggregator_assigned_partitions") == 0.0, "the partition was not let go at stop");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(10_000_000);
    let tail: usize = std::env::args().nth(2).map(|a| a.parse()).transpose()?.unwrap_or(10_000);
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let ch = ClickHouse::shared();
    let topic = unique_topic("bench-assign");
    create_topic(&brokers, &topic, 1).await;
    let db = ch.database(&format!("assign_{}", free_port())).await;
    let store: Store = meterline_clickhouse::connect(&ClickHouseConfig { database: db.clone(), request_timeout_ms: 600_000, ..aggregator_config(&brokers, &topic, &ch.url, &db, true).clickhouse }).await?;
    store.migrate().await?;

    // The window: `keys` events of partition 0, written evenly over 34 days.
    let now = chrono::Utc::now().timestamp();
    let span = 34 * 86_400i64;
    let written = format!("toDateTime({} + intDiv(number * {span}, {keys}))", now - span);
    let filled = Instant::now();
    ch.query(&format!(
        "INSERT INTO {db}.events (tenant, idempotency_key, fingerprint, event_time, event_time_ns, user_id, customer_id, feature, model, \
         provider, environment, billable, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, cost_source, \
         revenue_nanos, credits_nanos, metadata, received_at, kafka_topic, kafka_partition, kafka_offset, written_at) \
         SELECT 'acme', concat('fill-', toString(number)), cityHash64(number), {written}, 0, concat('user-', toString(number % 10000)), '', \
         'chat', 'gpt-4o', 'openai', 'production', 1, 1000, 100, 0, 0, 3500, 2, 0, 0, '', {written}, '{topic}', 0, toInt64(number) - {keys}, {written} \
         FROM numbers({keys})"
    ))
    .await;
    for table in ["rollups_minute", "rollups_user_span", "rollups_user_daily"] {
        ch.query(&format!(
            "INSERT INTO {db}.{table} (tenant, source_topic, source_partition, source_offset, markers, written_at) VALUES ('', '{topic}', 0, -1, 1, {now})"
        ))
        .await;
    }
    let fill_secs = filled.elapsed().as_secs_f64();

    // Raw baseline: the same keys read through the same client, nothing else.
    let started = Instant::now();
    let mut read = 0u64;
    store.keys_since(&topic, 0, u32::try_from(now - 35 * 86_400)?, |_| read += 1).await?;
    let raw_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(read == keys, "the raw read found {read} of {keys} keys");

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).set("linger.ms", "5").create()?;

    // Before: every key in the window rebuilt (snapshots off).
    produce(&producer, &topic, "before", 1).await?;
    let (before, tx, agg) = run(aggregator_config(&brokers, &topic, &ch.url, &db, false), 1.0, "events").await?;
    stop(tx, agg).await?;

    // With snapshots, first assignment: no snapshot yet, so a full rebuild;
    // the first flush writes one. Then TAIL more keys, after the snapshot.
    produce(&producer, &topic, "first", 1).await?;
    let snapshots_before = metric("meterline_aggregator_dedupe_snapshots_total");
    let snapshot_secs_before = metric("meterline_aggregator_dedupe_snapshot_seconds_sum");
    let (first, tx, agg) = run(aggregator_config(&brokers, &topic, &ch.url, &db, true), 1.0, "events").await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric("meterline_aggregator_dedupe_snapshots_total") - snapshots_before < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snapshot_bytes = metric("meterline_aggregator_dedupe_snapshot_bytes{partition=\"0\"}");
    let snapshot_secs = metric("meterline_aggregator_dedupe_snapshot_seconds_sum") - snapshot_secs_before;
    let written_before = metric("meterline_aggregator_events_written_total");
    produce(&producer, &topic, "tail", tail).await?;
    while metric("meterline_aggregator_events_written_total") - written_before < tail as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop(tx, agg).await?;

    // After: the snapshot and the TAIL keys written after it.
    produce(&producer, &topic, "after", 1).await?;
    let (after, tx, agg) = run(aggregator_config(&brokers, &topic, &ch.url, &db, true), 1.0, "snapshot").await?;
    stop(tx, agg).await?;
    let total: u64 = ch.query(&format!("SELECT count() FROM {db}.events")).await.trim().parse()?;
    anyhow::ensure!(total == keys + 3 + tail as u64, "{total} events in ClickHouse, expected {}", keys + 3 + tail as u64);
    let version = ch.query("SELECT version()").await;
    // Ten million rows are not worth keeping on the shared server.
    ch.query(&format!("DROP DATABASE {db}")).await;

    println!("assign-bench: {keys} keys in one partition's window (filled in {fill_secs:.1} s), tail {tail}, ClickHouse {}", version.trim());
    println!("| path | assignment -> first flush (s) | dedupe rebuild (s) | rebuild / raw read |");
    println!("|---|---:|---:|---:|");
    println!("| raw: the keys read from ClickHouse, nothing else | | {raw_secs:.2} | 1.00 |");
    println!("| before: every key in the window (snapshots off) | {:.2} | {:.2} | {:.2} |", before.assign_to_flush, before.load, before.load / raw_secs);
    println!("| first assignment with snapshots on (no snapshot yet) | {:.2} | {:.2} | {:.2} |", first.assign_to_flush, first.load, first.load / raw_secs);
    println!("| after: snapshot + {tail} keys after it | {:.2} | {:.2} | {:.3} |", after.assign_to_flush, after.load, after.load / raw_secs);
    println!(
        "snapshot {:.1} MiB, written in {snapshot_secs:.2} s (once per partition per interval; inside the first run's first flush); speed-up before/after (assignment -> first flush): {:.1}x",
        snapshot_bytes / 1048576.0,
        before.assign_to_flush / after.assign_to_flush
    );
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "assign",
            "keys": keys,
            "tail_keys": tail,
            "raw_read_secs": raw_secs,
            "before_assign_to_flush_secs": before.assign_to_flush,
            "before_rebuild_secs": before.load,
            "first_assign_to_flush_secs": first.assign_to_flush,
            "after_assign_to_flush_secs": after.assign_to_flush,
            "after_rebuild_secs": after.load,
            "ratio_before_to_raw": before.load / raw_secs,
            "ratio_after_to_raw": after.load / raw_secs,
            "snapshot_bytes": snapshot_bytes,
            "snapshot_write_secs": snapshot_secs,
        })
    );
    Ok(())
}
