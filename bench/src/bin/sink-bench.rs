//! The aggregator's ClickHouse writer beside `clickhouse-client` inserting the same rows into the same server.
//!
//! Builds realistic `events` rows the way the aggregator does (workload events
//! from four tenants, parsed, priced and fingerprinted by the aggregator's own
//! code), then inserts them into two fresh, identically migrated databases:
//! (1) through `Store::insert_events` in batches of the aggregator's default
//! `flush.max_batch_events`, one after another as its flushes are, and (2)
//! with `clickhouse-client` over the native protocol from a RowBinary file of
//! the same rows, in one run (the tool at its best). Each path runs ROUNDS
//! times into its emptied table and its median time counts. Both tables are
//! then compared by a hash of every column, so the two numbers are for the same data.
//!
//! `cargo run --release -p meterline-bench --bin sink-bench -- [ROWS] [BATCH] [ROUNDS]`
//! with the stack up (`eval "$(scripts/stack up)"`).

use meterline_aggregator::FlushConfig;
use meterline_clickhouse::{self as store, ClickHouseConfig, Store};
use meterline_domain::{self as rollup, EventRow, Source};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::Tenant;
use meterline_schemas::wire::{self, Envelope};
use meterline_schemas::{Nanos, TimeBounds, parse_event};
use meterline_tests::stack::ClickHouse;
use meterline_tests::{free_port, stack_var, workload};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Instant;

const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
const TOPIC: &str = "meterline.events.v1";
const PARTITIONS: u64 = 4;

/// Every column of `events`, in table (and `EventRow` field) order.
const COLUMNS: &str = "tenant, idempotency_key, fingerprint, event_time, event_time_ns, user_id, customer_id, feature, model, \
     provider, environment, billable, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, \
     cost_source, revenue_nanos, credits_nanos, metadata, received_at, kafka_topic, kafka_partition, kafka_offset, written_at";

/// `rows` events rows spread over the tenants, built by the aggregator's own
/// parse, price and fingerprint code so sizes and values are what it writes.
fn build_rows(rows: usize) -> anyhow::Result<Vec<EventRow>> {
    let now = chrono::Utc::now();
    let written_at = rollup::datetime_secs(now);
    let catalog = Catalog::builtin()?;
    let bounds = TimeBounds::default();
    let mut offsets = [0i64; PARTITIONS as usize];
    let mut out = Vec::with_capacity(rows);
    for (t, tenant_id) in TENANTS.iter().enumerate() {
        let tenant = Tenant { id: (*tenant_id).to_owned(), credit_price: Some(Nanos::parse("0.001")?), prices: BTreeMap::new() };
        let share = rows / TENANTS.len() + usize::from(t < rows % TENANTS.len());
        let work = workload::generate(t as u64 + 1, share, 10_000, 1_000, now);
        for (i, mut json) in work.originals.into_iter().enumerate() {
            // A quarter of real events carry a little metadata (request ids, regions).
            if i % 4 == 0 {
                json["metadata"] = serde_json::json!({"request_id": format!("req-{t}-{i:08x}"), "region": "eu-west-1"});
            }
            let event = parse_event(&json.to_string(), &bounds, now).map_err(|r| anyhow::anyhow!("invalid workload event: {r:?}"))?;
            let priced = rollup::price(&event, Some(&tenant), &catalog);
            let fingerprint = rollup::fingerprint(tenant_id, &event);
            // Partition by a hash of the message key (a stand-in for librdkafka's),
            // so a user's rows share a partition; offsets count up per partition.
            let key = wire::message_key(tenant_id, &event.user_id);
            let partition = (key.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b))) % PARTITIONS) as usize;
            let offset = offsets[partition];
            offsets[partition] += 1;
            let envelope = Envelope { tenant: (*tenant_id).to_owned(), received_at: now, event };
            let source = Source::Kafka { topic: TOPIC, partition: partition as i32, offset };
            out.push(EventRow::new(&envelope, fingerprint, priced, source, written_at));
        }
    }
    Ok(out)
}

/// ClickHouse's RowBinary encoding of `rows`, written independently of the
/// clickhouse crate so the two paths share no serializer.
fn row_binary(rows: &[EventRow]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        let mut n = s.len();
        // LEB128 length prefix.
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::with_capacity(rows.len() * 256);
    for r in rows {
        string(&mut out, &r.tenant);
        string(&mut out, &r.idempotency_key);
        out.extend_from_slice(&r.fingerprint.to_le_bytes());
        out.extend_from_slice(&r.event_time.to_le_bytes());
        out.extend_from_slice(&r.event_time_ns.to_le_bytes());
        string(&mut out, &r.user_id);
        string(&mut out, &r.customer_id);
        string(&mut out, &r.feature);
        string(&mut out, &r.model);
        string(&mut out, &r.provider);
        string(&mut out, &r.environment);
        out.push(r.billable);
        out.extend_from_slice(&r.input_tokens.to_le_bytes());
        out.extend_from_slice(&r.output_tokens.to_le_bytes());
        out.extend_from_slice(&r.cached_input_tokens.to_le_bytes());
        out.extend_from_slice(&r.reasoning_tokens.to_le_bytes());
        out.extend_from_slice(&r.cost_nanos.to_le_bytes());
        out.push(r.cost_source);
        out.extend_from_slice(&r.revenue_nanos.to_le_bytes());
        out.extend_from_slice(&r.credits_nanos.to_le_bytes());
        string(&mut out, &r.metadata);
        out.extend_from_slice(&r.received_at.to_le_bytes());
        string(&mut out, &r.kafka_topic);
        out.extend_from_slice(&r.kafka_partition.to_le_bytes());
        out.extend_from_slice(&r.kafka_offset.to_le_bytes());
        out.extend_from_slice(&r.written_at.to_le_bytes());
    }
    out
}

/// A fresh database with the aggregator's migrations applied, and a store on it.
async fn migrated(ch: &ClickHouse, name: &str) -> anyhow::Result<(String, Store)> {
    let db = ch.database(&format!("{name}_{}", free_port())).await;
    let config = ClickHouseConfig {
        url: ch.url.clone(),
        database: db.clone(),
        user: "default".into(),
        password: String::new(),
        // Generous: a slow insert here should show as a low rate, not an error.
        request_timeout_ms: 600_000,
    };
    let store = store::connect(&config).await?;
    store.migrate().await?;
    Ok((db, store))
}

/// Row count and an order-independent hash of every column of `db.events`.
async fn digest(ch: &ClickHouse, db: &str) -> String {
    ch.query(&format!("SELECT count(), groupBitXor(cityHash64({COLUMNS})) FROM {db}.events")).await.trim().to_owned()
}

fn clickhouse_client() -> String {
    std::env::var("METERLINE_CLICKHOUSE_CLIENT").unwrap_or_else(|_| "clickhouse-client".to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let rows_wanted = args.first().copied().unwrap_or(1_000_000);
    let batch = args.get(1).copied().unwrap_or(FlushConfig::default().max_batch_events).max(1);
    let rounds = args.get(2).copied().unwrap_or(3).max(1);
    let ch = ClickHouse::shared();
    let tcp_port = stack_var("METERLINE_TEST_CLICKHOUSE_TCP_PORT");
    let version = ch.query("SELECT version()").await.trim().to_owned();

    let built = Instant::now();
    let rows = build_rows(rows_wanted)?;
    let n = rows.len();
    let file = std::env::temp_dir().join(format!("meterline-sink-bench-{}.rowbinary", std::process::id()));
    let encoded = row_binary(&rows);
    std::fs::write(&file, &encoded)?;
    let build_secs = built.elapsed().as_secs_f64();

    let (db_ml, store_ml) = migrated(&ch, "sink_ml").await?;
    let (db_cc, _) = migrated(&ch, "sink_cc").await?;
    // Rounds alternate which path goes first, and each path's median counts,
    // so a burst of other work on this shared machine moves one round, not the ratio.
    let (mut ml_times, mut cc_times) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for db in [&db_ml, &db_cc] {
            ch.query(&format!("TRUNCATE TABLE {db}.events")).await;
        }
        for path in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if path == 0 {
                // 1. The aggregator's writer: sequential inserts of one flush's worth each.
                let started = Instant::now();
                for chunk in rows.chunks(batch) {
                    store_ml.insert_events(chunk).await?;
                }
                ml_times.push(started.elapsed().as_secs_f64());
            } else {
                // 2. clickhouse-client, the whole file in one run, process start
                //    included (that is what using the tool costs).
                let started = Instant::now();
                let output = Command::new(clickhouse_client())
                    .args(["--host", "127.0.0.1", "--port", &tcp_port, "--database", &db_cc, "--query"])
                    .arg(format!("INSERT INTO events ({COLUMNS}) FORMAT RowBinary"))
                    .stdin(std::fs::File::open(&file)?)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .output()?;
                cc_times.push(started.elapsed().as_secs_f64());
                anyhow::ensure!(output.status.success(), "clickhouse-client failed: {}", String::from_utf8_lossy(&output.stderr));
            }
        }
    }

    // 3. For diagnosis: the same writer with every row in one insert, to tell
    //    the per-batch cost from the per-row cost.
    let (db_one, store_one) = migrated(&ch, "sink_one").await?;
    let started = Instant::now();
    store_one.insert_events(&rows).await?;
    let one_secs = started.elapsed().as_secs_f64();

    let (d_ml, d_cc, d_one) = (digest(&ch, &db_ml).await, digest(&ch, &db_cc).await, digest(&ch, &db_one).await);
    anyhow::ensure!(d_ml == d_cc && d_ml == d_one, "the targets differ: meterline {d_ml}, clickhouse-client {d_cc}, one insert {d_one}");
    for db in [&db_ml, &db_cc, &db_one] {
        ch.query(&format!("DROP DATABASE {db}")).await;
    }
    std::fs::remove_file(&file)?;

    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (ml_secs, cc_secs) = (median(&mut ml_times), median(&mut cc_times));
    let ml_rate = n as f64 / ml_secs;
    let cc_rate = n as f64 / cc_secs;
    let one_rate = n as f64 / one_secs;
    let ratio = ml_rate / cc_rate;
    println!(
        "sink-bench: {n} events rows ({} tenants, {:.0} B/row RowBinary, built in {build_secs:.1} s), ClickHouse {version}",
        TENANTS.len(),
        encoded.len() as f64 / n.max(1) as f64
    );
    println!("| path (median of {rounds} rounds) | rows/s | seconds |");
    println!("|---|---:|---:|");
    println!("| Store::insert_events, batches of {batch} (HTTP RowBinary, sequential) | {ml_rate:.0} | {ml_secs:.2} |");
    println!("| clickhouse-client, one RowBinary file (native protocol) | {cc_rate:.0} | {cc_secs:.2} |");
    println!("| Store::insert_events, all rows in one insert (one run, diagnosis) | {one_rate:.0} | {one_secs:.2} |");
    println!("ratio meterline/clickhouse-client: {ratio:.2} (tables identical: {d_ml})");
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "sink",
            "rows": n,
            "batch": batch,
            "rounds": rounds,
            "meterline_secs_all": ml_times,
            "clickhouse_client_secs_all": cc_times,
            "bytes_per_row": encoded.len() as f64 / n.max(1) as f64,
            "meterline_rows_per_s": ml_rate,
            "meterline_secs": ml_secs,
            "clickhouse_client_rows_per_s": cc_rate,
            "clickhouse_client_secs": cc_secs,
            "meterline_one_insert_rows_per_s": one_rate,
            "ratio": ratio,
            "clickhouse_version": version,
        })
    );
    Ok(())
}
