//! Resident memory of each service binary at steady state under load.
//!
//! Starts the release binaries `meterline-ingest`, `meterline-aggregator` and
//! `meterline-query-api` as their own processes against the stack, drives
//! `meterline-load`'s workload through ingest at a fixed rate while a client
//! queries the query API back to back, and samples VmRSS from
//! `/proc/<pid>/status` every 250 ms. Steady state is the second half of the
//! load; VmHWM (the peak) is read at its end.
//!
//! `cargo run --release -p meterline-bench --bin memory-bench -- [RATE] [SECONDS]`
//! with the stack up and the service binaries built (`cargo build --release --workspace --bins`).

use meterline_tests::load::{LoadOptions, run};
use meterline_tests::stack::{ClickHouse, Process};
use meterline_tests::{free_port, poll_until, stack_var, tenants_toml, unique_topic};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};


/// VmRSS and VmHWM of `pid` in KiB, from /proc.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn answers(url: String) -> Option<()> {
    reqwest::get(url).await.ok().filter(|r| r.status().is_success()).map(|_| ())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let rate = args.first().copied().unwrap_or(20_000);
    let seconds = args.get(1).copied().unwrap_or(60);
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let ch = ClickHouse::shared();
    let topic = unique_topic("bench-mem");
    let db = ch.database(&format!("mem_{}", free_port())).await;
    let tenants = tenants_toml();
    let (ingest_port, agg_port, query_port) = (free_port(), free_port(), free_port());

    // Ingest first: it creates the topic the aggregator subscribes to.
    let mut ingest = Process::start(
        "meterline-ingest",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{ingest_port}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\npartitions = 4\n{tenants}"
        ),
    );
    poll_until(Duration::from_secs(60), "ingest to be ready", || answers(format!("http://127.0.0.1:{ingest_port}/readyz"))).await;
    let mut aggregator = Process::start(
        "meterline-aggregator",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{agg_port}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"bench-{topic}\"\n\
             [clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n{tenants}",
            ch.url
        ),
    );
    poll_until(Duration::from_secs(60), "the aggregator to migrate", || {
        let (ch, db) = (&ch, &db);
        async move { ch.migrated(db).await.then_some(()) }
    })
    .await;
    let metrics_url = format!("http://127.0.0.1:{agg_port}/metrics");
    poll_until(Duration::from_secs(60), "the aggregator to be assigned partitions", || {
        meterline_bench::aggregator_assigned(metrics_url.clone())
    })
    .await;
    let mut query = Process::start(
        "meterline-query-api",
        &format!("[server]\nlisten = \"127.0.0.1:{query_port}\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n{tenants}", ch.url),
    );
    poll_until(Duration::from_secs(60), "the query API to be ready", || answers(format!("http://127.0.0.1:{query_port}/readyz"))).await;

    let services = [("ingest", &ingest), ("aggregator", &aggregator), ("query-api", &query)];
    let pids: Vec<(&str, u32)> =
        services.iter().map(|(name, p)| p.pid().map(|pid| (*name, pid)).ok_or_else(|| anyhow::anyhow!("{name} has no pid"))).collect::<Result<_, _>>()?;
    let idle: Vec<u64> = pids.iter().map(|(_, pid)| memory_kib(*pid).map_or(0, |m| m.0)).collect();

    // Load: the load generator's workload at `rate` events/s (copies included).
    // Retries and conflicting copies add about 12% on top of the actions.
    let options = LoadOptions {
        url: format!("http://127.0.0.1:{ingest_port}"),
        key: "acme-ingest-key".into(),
        actions: (rate * seconds * 100 / 112) as usize,
        users: 10_000,
        batch: 500,
        concurrency: 4,
        rate,
        seed: 7,
        mix: Default::default(),
    };
    let done = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    // Readers too, so the query API's memory is measured while it works.
    let reader = {
        let (done, queries) = (done.clone(), queries.clone());
        let base = format!("http://127.0.0.1:{query_port}");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let paths = ["/v1/top-spenders?metric=cost&limit=100", "/v1/usage?granularity=day&group_by=model", "/v1/margins?group_by=user_id"];
            let mut i = 0usize;
            while !done.load(Ordering::SeqCst) {
                let r = client.get(format!("{base}{}", paths[i % paths.len()])).bearer_auth("acme-read-key").send().await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    queries.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
            }
        })
    };
    let sampler = {
        let (done, pids) = (done.clone(), pids.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples: Vec<(f64, Vec<u64>)> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !done.load(Ordering::SeqCst) {
                tick.tick().await;
                samples.push((started.elapsed().as_secs_f64(), pids.iter().map(|(_, pid)| memory_kib(*pid).map_or(0, |m| m.0)).collect()));
            }
            samples
        })
    };
    let (report, _) = run(&options).await?;
    done.store(true, Ordering::SeqCst);
    let samples = sampler.await?;
    reader.await?;
    let peaks: Vec<u64> = pids.iter().map(|(_, pid)| memory_kib(*pid).map_or(0, |m| m.1)).collect();
    let written = ch.query(&format!("SELECT count() FROM {db}.events")).await.trim().parse::<u64>().unwrap_or(0);

    for p in [&mut ingest, &mut aggregator, &mut query] {
        p.stop().await;
    }
    ch.query(&format!("DROP DATABASE {db}")).await;

    let half = report.seconds / 2.0;
    let steady: Vec<&Vec<u64>> = samples.iter().filter(|(t, _)| *t >= half).map(|(_, v)| v).collect();
    println!(
        "memory-bench: {} events sent at {rate} events/s target ({:.0} accepted/s) over {:.1} s, {} queries answered, {written} events in ClickHouse",
        report.events_sent,
        report.accepted_per_second,
        report.seconds,
        queries.load(Ordering::SeqCst)
    );
    println!("| service | idle RSS MiB | steady RSS MiB (median) | steady RSS MiB (max) | peak MiB (VmHWM) |");
    println!("|---|---:|---:|---:|---:|");
    let mut json = serde_json::Map::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let mut values: Vec<u64> = steady.iter().map(|v| v[i]).collect();
        values.sort_unstable();
        let median = values.get(values.len() / 2).copied().unwrap_or(0);
        let max = values.last().copied().unwrap_or(0);
        // The kernel folds per-thread RSS counters into VmHWM lazily, so a
        // sample can read a little above it: the peak is the larger of the two.
        let peak = peaks[i].max(max);
        println!("| {name} | {:.1} | {:.1} | {:.1} | {:.1} |", mib(idle[i]), mib(median), mib(max), mib(peak));
        json.insert(
            (*name).to_owned(),
            serde_json::json!({"idle_rss_mib": mib(idle[i]), "steady_rss_mib": mib(median), "steady_rss_max_mib": mib(max), "peak_mib": mib(peak)}),
        );
    }
    // One line for scripts/bench to collect.
    println!(
        "BENCH_JSON {}",
        serde_json::json!({
            "bench": "memory",
            "rate": rate,
            "seconds": report.seconds,
            "events_sent": report.events_sent,
            "accepted_per_s": report.accepted_per_second,
            "errors_by_status": report.errors_by_status,
            "queries": queries.load(Ordering::SeqCst),
            "events_in_clickhouse": written,
            "samples": steady.len(),
            "services": json,
        })
    );
    Ok(())
}
