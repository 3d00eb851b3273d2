//! Ingest throughput beside the broker's raw limit, on this machine.
//!
//! Sends the same events three ways to the stack's broker and prints events/s
//! and the ratios: (1) a plain rdkafka producer sending the already-encoded
//! wire records (the broker's own limit for this client and these settings),
//! (2) `POST /v1/events` on an in-process ingest server, in JSON batches,
//! (3) the same events as CloudEvents batches to `POST /api/v1/events` (the
//! OpenMeter-compatible path), at the same batch size.
//!
//! `cargo run --release -p meterline-bench --bin ingest-bench -- [EVENTS] [BATCH] [CONCURRENCY] [ROUNDS]`
//! with the stack up (`eval "$(scripts/stack up)"`).

use meterline_schemas::wire::{self, Envelope};
use meterline_schemas::{TimeBounds, parse_event};
use meterline_tests::{event, ingest_config, stack_var, unique_topic, Ingest};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let events = args.first().copied().unwrap_or(200_000);
    let batch = args.get(1).copied().unwrap_or(1_000);
    let concurrency = args.get(2).copied().unwrap_or(4);
    let rounds = args.get(3).copied().unwrap_or(3).max(1);
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");

    // The same events for both runs: 5,000 users, realistic field sizes.
    let bodies: Vec<serde_json::Value> = (0..events).map(|n| event(&format!("user-{}", n % 5_000), n)).collect();
    let now = chrono::Utc::now();
    let records: Vec<(Vec<u8>, Vec<u8>)> = bodies
        .iter()
        .map(|b| {
            let e = parse_event(&b.to_string(), &TimeBounds::default(), now).expect("valid event");
            (wire::message_key("acme", &e.user_id), wire::encode(&Envelope { tenant: "acme".into(), received_at: now, event: e }))
        })
        .collect();
    let avg_record = records.iter().map(|r| r.1.len()).sum::<usize>() / records.len().max(1);

    let payloads: Vec<String> = bodies.chunks(batch).map(|c| serde_json::Value::from(c.to_vec()).to_string()).collect();
    let avg_body = payloads.iter().map(String::len).sum::<usize>() / payloads.len().max(1);
    let cloud: Vec<serde_json::Value> = bodies.iter().map(cloudevent).collect();
    let cloud_payloads: Vec<String> = cloud.chunks(batch).map(|c| serde_json::Value::from(c.to_vec()).to_string()).collect();

    // Rounds alternate which path goes first, and each path's median counts:
    // one path takes a second or two, and a burst of other work on this
    // shared machine should move one round, not the ratio.
    let (mut raw_times, mut ingest_times, mut cloud_times, mut latencies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for path in [[0, 1, 2], [1, 2, 0], [2, 0, 1]][round % 3] {
            match path {
                0 => raw_times.push(raw_round(&brokers, &records).await?),
                1 => {
                    let (secs, mut l) = ingest_round(&brokers, &payloads, concurrency, NATIVE).await?;
                    ingest_times.push(secs);
                    latencies.append(&mut l);
                }
                _ => cloud_times.push(ingest_round(&brokers, &cloud_payloads, concurrency, CLOUDEVENTS).await?.0),
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (raw_secs, ingest_secs, cloud_secs) = (median(&mut raw_times), median(&mut ingest_times), median(&mut cloud_times));
    println!("rounds, seconds (sorted): raw {raw_times:.2?}, ingest {ingest_times:.2?}, cloudevents {cloud_times:.2?}");
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    let raw_rate = events as f64 / raw_secs;
    // The warm-up batch is excluded from both count and time.
    let ingest_rate = (events as f64) / ingest_secs;
    let cloud_rate = (events as f64) / cloud_secs;

    println!(
        "ingest-bench: {events} events, batches of {batch}, concurrency {concurrency}, median of {rounds} rounds, {} cores",
        std::thread::available_parallelism()?
    );
    println!("record {avg_record} B on the topic; request body {avg_body} B ({} B/event JSON)", avg_body / batch.max(1));
    println!("| path | events/s | seconds |");
    println!("|---|---:|---:|");
    println!("| raw rdkafka producer (acks=all, idempotent, lz4) | {raw_rate:.0} | {raw_secs:.2} |");
    println!("| POST /v1/events via ingest | {ingest_rate:.0} | {ingest_secs:.2} |");
    println!("| POST /api/v1/events (CloudEvents batches) via ingest | {cloud_rate:.0} | {cloud_secs:.2} |");
    println!("ratio ingest/raw: {:.2}; CloudEvents / native: {:.2}", ingest_rate / raw_rate, cloud_rate / ingest_rate);
    println!("request latency ms: p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}", pct(0.5), pct(0.9), pct(0.99), pct(1.0));
    // One line for scripts/bench to collect.
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "ingest",
            "events": events,
            "batch": batch,
            "concurrency": concurrency,
            "rounds": rounds,
            "raw_events_per_s": raw_rate,
            "raw_secs": raw_secs,
            "ingest_events_per_s": ingest_rate,
            "ingest_secs": ingest_secs,
            "ratio": ingest_rate / raw_rate,
            "cloudevents_events_per_s": cloud_rate,
            "cloudevents_secs": cloud_secs,
            "cloudevents_ratio": cloud_rate / ingest_rate,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        })
    );
    Ok(())
}

/// Seconds for a plain rdkafka producer, with ingest's settings, to send
/// `records` to a fresh topic.
async fn raw_round(brokers: &str, records: &[(Vec<u8>, Vec<u8>)]) -> anyhow::Result<f64> {
    let topic = unique_topic("bench-raw");
    meterline_tests::create_topic(brokers, &topic, 8).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .create()?;
    // Warm up the connection and the producer id outside the timing.
    producer.send(FutureRecord::to(&topic).key("warm").payload("up"), Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    // Every record in flight at once: librdkafka batches and pipelines them
    // as well as it can, which is the limit ingest is measured against.
    let started = Instant::now();
    let sends = records.iter().map(|(k, p)| producer.send(FutureRecord::to(&topic).key(k).payload(p), Duration::from_secs(60)));
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// An ingest path: its route, content type and success status.
#[derive(Debug, Clone, Copy)]
struct Path {
    route: &'static str,
    content_type: &'static str,
    ok: u16,
}

const NATIVE: Path = Path { route: "/v1/events", content_type: "application/json", ok: 202 };
const CLOUDEVENTS: Path = Path { route: "/api/v1/events", content_type: "application/cloudevents-batch+json", ok: 204 };

/// One event as the CloudEvent LiteLLM's `openmeter` callback would send for it.
fn cloudevent(e: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0",
        "id": e["idempotency_key"],
        "source": "bench",
        "type": e["feature"],
        "subject": e["user_id"],
        "time": e["timestamp"],
        "data": {
            "model": e["model"],
            "prompt_tokens": e["input_tokens"],
            "completion_tokens": e["output_tokens"],
            "cost": e["cost_usd"],
            "customer_id": e["customer_id"],
        },
    })
}

/// Seconds for `path` on a fresh in-process ingest server to take
/// `payloads`, `concurrency` requests at a time, and each request's latency.
async fn ingest_round(brokers: &str, payloads: &[String], concurrency: usize, path: Path) -> anyhow::Result<(f64, Vec<Duration>)> {
    let topic = unique_topic("bench-ingest");
    meterline_tests::create_topic(brokers, &topic, 8).await;
    let ingest = Ingest::start(ingest_config(brokers, &topic, "")).await;
    let client = reqwest::Client::new();
    let post = |body: String| {
        let (client, url) = (client.clone(), ingest.url.clone());
        async move {
            let r = client
                .post(format!("{url}{}", path.route))
                .bearer_auth("acme-ingest-key")
                .header("content-type", path.content_type)
                .body(body)
                .send()
                .await?;
            let status = r.status().as_u16();
            anyhow::ensure!(status == path.ok, "status {status}: {}", r.text().await.unwrap_or_default());
            Ok::<_, anyhow::Error>(())
        }
    };
    post(payloads[0].clone()).await?; // warm-up, not timed
    let started = Instant::now();
    let mut latencies = Vec::new();
    for group in payloads.chunks(concurrency) {
        let timed = group.iter().cloned().map(|b| {
            let f = post(b);
            async move {
                let t = Instant::now();
                f.await.map(|_| t.elapsed())
            }
        });
        for r in futures::future::join_all(timed).await {
            latencies.push(r?);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    ingest.stop().await;
    Ok((secs, latencies))
}
