//! The soak: an hour (or `--duration`) of realistic traffic through the whole
//! stack, sampled every 10 s, with exact totals checked at the end.
//!
//! Distributed mode starts its own tansu broker and ClickHouse 18.16 (so their
//! memory and disk are the soak's alone), then `meterline-ingest`,
//! `meterline-aggregator` and `meterline-query-api` as processes; embedded
//! mode starts the all-in-one `meterline run` over a fresh data directory.
//! `meterline-load`'s streaming generator sends at `--rate` events/s over HTTP
//! (client retries, conflicting copies, late events, the runaway user); beside
//! it run probe events (freshness: ack to visible in the query API), a
//! dashboard-like query loop (top spenders, usage by day and model, a user's
//! statement, the runaway user's alerts) and, distributed, a SIGKILL and
//! restart of the aggregator every `--kill-every`. Samples (resident memory
//! per process, consumer lag, ClickHouse parts and bytes, the embedded
//! database's size) go to CSVs in `--out`; at the end the query API's totals
//! per user must equal the generator's ground truth to the nano-dollar, and
//! the verdicts (memory flat, lag bounded, freshness per 5 minutes) are
//! printed and written to `summary.json` / `summary.md`. `bench/soak/plot.py`
//! draws the CSVs. Not part of `scripts/bench` or `scripts/test`: see
//! `bench/SOAK.md` for how it was run.
//!
//! `target/release/soak-bench --mode distributed|embedded [--duration 60m] [--rate N]
//! [--kill-every 10m] [--out DIR] [--users 10000] [--warmup 10m] [--seed 7] [--settle 20m]`
//! with the release binaries built and `eval "$(scripts/stack env)"` (for the
//! tansu binary; the soak's servers are its own).

#[path = "../../soak/sample.rs"]
mod sample;
#[path = "../../soak/traffic.rs"]
mod traffic;
#[path = "../../soak/verdict.rs"]
mod verdict;

use meterline_tests::load::{LoadOptions, run_with_progress};
use meterline_tests::stack::{ClickHouse, Process};
use meterline_tests::{Broker, free_port, poll_until, tenants_toml, workload};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which deployment is soaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Distributed,
    Embedded,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Distributed => "distributed",
            Mode::Embedded => "embedded",
        }
    }
}

/// The flags.
#[derive(Debug, Clone)]
pub struct Args {
    pub mode: Mode,
    pub duration: Duration,
    pub rate: u64,
    /// Where the rate came from (the flag, or the committed results).
    pub rate_source: String,
    /// `None`: no kills (the default in embedded mode, where a killed server
    /// would refuse the generator's requests, which keep no retry queue).
    pub kill_every: Option<Duration>,
    pub out: PathBuf,
    pub users: usize,
    pub warmup: Duration,
    pub sample_every: Duration,
    pub seed: u64,
    /// How long the end waits for the store to hold every event.
    pub settle: Duration,
}

const USAGE: &str = "soak-bench --mode distributed|embedded [--duration 60m] [--rate EVENTS_PER_S] [--kill-every 10m|0] [--out DIR] [--users N] [--warmup 10m] [--sample-every 10s] [--seed N] [--settle 20m]";

/// `90`, `90s`, `3m`, `1h`.
fn parse_duration(flag: &str, v: &str) -> anyhow::Result<Duration> {
    let (digits, unit) = v.find(|c: char| !c.is_ascii_digit()).map_or((v, ""), |i| v.split_at(i));
    let n: u64 = digits.parse().map_err(|_| anyhow::anyhow!("{flag}: {v:?} is not a duration like 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => anyhow::bail!("{flag}: unit {unit:?} must be s, m or h"),
    };
    Ok(Duration::from_secs(secs))
}

/// Half the maximum the last full `scripts/bench` run measured on this
/// machine (`bench/RESULTS.json`): the aggregator's events/s for the
/// distributed mode (the slowest stage), the all-in-one's sustained ingest for
/// the embedded mode.
fn default_rate(mode: Mode) -> anyhow::Result<(u64, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.json");
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{path}: {e}; pass --rate"))?;
    let results: serde_json::Value = serde_json::from_str(&text)?;
    let (bench, key) = match mode {
        Mode::Distributed => ("aggregator", "aggregator_events_per_s"),
        Mode::Embedded => ("embedded", "ingest_events_per_sec"),
    };
    let max = results["benchmarks"][bench]["result"][key].as_f64().ok_or_else(|| anyhow::anyhow!("{path} has no {bench}.{key}; pass --rate"))?;
    Ok(((max / 2.0) as u64, format!("half of {max:.0} events/s, bench/RESULTS.json {bench} ({})", results["date"].as_str().unwrap_or("?"))))
}

fn parse_args() -> anyhow::Result<Args> {
    let mut raw = std::env::args().skip(1);
    let (mut mode, mut duration, mut rate, mut kill_every, mut out) = (None, Duration::from_secs(3600), None, None, None);
    let (mut users, mut warmup, mut sample_every, mut seed) = (10_000usize, None, Duration::from_secs(10), 7u64);
    let mut settle = Duration::from_secs(1200);
    while let Some(flag) = raw.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = raw.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--mode" => {
                mode = Some(match value.as_str() {
                    "distributed" => Mode::Distributed,
                    "embedded" => Mode::Embedded,
                    _ => anyhow::bail!("--mode: {value:?} must be distributed or embedded"),
                })
            }
            "--duration" => duration = parse_duration(&flag, &value)?,
            "--rate" => rate = Some(value.parse::<u64>().ok().filter(|r| *r > 0).ok_or_else(|| anyhow::anyhow!("--rate: {value:?} must be a positive integer"))?),
            "--kill-every" => kill_every = Some(parse_duration(&flag, &value)?),
            "--out" => out = Some(PathBuf::from(value)),
            "--users" => users = value.parse().map_err(|_| anyhow::anyhow!("--users: {value:?} must be a positive integer"))?,
            "--warmup" => warmup = Some(parse_duration(&flag, &value)?),
            "--sample-every" => sample_every = parse_duration(&flag, &value)?,
            "--settle" => settle = parse_duration(&flag, &value)?,
            "--seed" => seed = value.parse().map_err(|_| anyhow::anyhow!("--seed: {value:?} must be an integer"))?,
            _ => anyhow::bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    let mode = mode.ok_or_else(|| anyhow::anyhow!("--mode is required\n{USAGE}"))?;
    let (rate, rate_source) = match rate {
        Some(r) => (r, "--rate".to_owned()),
        None => default_rate(mode)?,
    };
    // Kills are the distributed soak's; zero turns them off.
    let kill_every = match (mode, kill_every) {
        (_, Some(d)) if d.is_zero() => None,
        (Mode::Distributed, None) => Some(Duration::from_secs(600)),
        (Mode::Embedded, None) => None,
        (_, some) => some,
    };
    anyhow::ensure!(!sample_every.is_zero() && users > 0 && !duration.is_zero(), "--duration, --users and --sample-every must be positive");
    // Warm-up: the first 10 minutes, or a third of a shorter run.
    let warmup = warmup.unwrap_or_else(|| Duration::from_secs(600).min(duration / 3));
    let out = out.unwrap_or_else(|| PathBuf::from(format!("target/soak-{}", mode.as_str())));
    Ok(Args { mode, duration, rate, rate_source, kill_every, out, users, warmup, sample_every, seed, settle })
}

/// Where the traffic goes and what answers it.
#[derive(Debug)]
pub struct Deployment {
    /// Ingest's (or the all-in-one's) base URL.
    pub ingest_url: String,
    /// The query API's (or the all-in-one's) base URL.
    pub query_url: String,
    /// The aggregator's metrics URL (distributed).
    pub metrics_url: Option<String>,
    pub kafka: Option<sample::KafkaLag>,
    /// The broker's address and the topic (distributed).
    pub topic: Option<(String, String)>,
    /// Kafka log bytes per record, measured at the end (see `sample::kafka_bytes_per_record`).
    pub log_bytes: Option<(f64, f64)>,
    pub clickhouse: Option<(Arc<ClickHouse>, String)>,
    pub data_dir: Option<PathBuf>,
    /// Ingest and query API (distributed) or the all-in-one.
    pub services: Vec<Process>,
    pub aggregator: Option<Process>,
    _broker: Option<Broker>,
}

async fn answers(url: String) -> Option<()> {
    reqwest::get(url).await.ok().filter(|r| r.status().is_success()).map(|_| ())
}

/// The dedupe filters' size for the run, as an operator sizes them for their
/// peak: every event of the run on one of the 4 partitions, in one 7-day
/// slice, with a quarter to spare (the default, 2 M keys, is for a smaller
/// deployment; the last soak ran its filters at 2-5 x their design size).
fn keys_per_slice(args: &Args) -> u64 {
    (args.rate * args.duration.as_secs() / 4 * 5 / 4).max(2_000_000)
}

async fn start_distributed(seed: u64, keys_per_slice: u64) -> anyhow::Result<Deployment> {
    let broker = Broker::start().await;
    let brokers = broker.addr();
    let ch = Arc::new(ClickHouse::private().await);
    let db = ch.database("soak").await;
    let topic = format!("soak-events-{seed}");
    let group = "soak-aggregator";
    let tenants = tenants_toml();
    let (ingest_port, agg_port, query_port) = (free_port(), free_port(), free_port());
    // Ingest first: it creates the topic the aggregator subscribes to.
    let ingest = Process::start(
        "meterline-ingest",
        &format!("[server]\nlisten = \"127.0.0.1:{ingest_port}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\npartitions = 4\n{tenants}"),
    );
    poll_until(Duration::from_secs(60), "ingest to be ready", || answers(format!("http://127.0.0.1:{ingest_port}/readyz"))).await;
    // The production defaults (1 s flush, 10 s session): a restarted member
    // waits out its predecessor's session, as it would in production.
    let aggregator = Process::start(
        "meterline-aggregator",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{agg_port}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"{group}\"\n\
             [clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n[dedupe]\nexpected_keys_per_slice = {keys_per_slice}\n{tenants}",
            ch.url
        ),
    );
    poll_until(Duration::from_secs(120), "the aggregator to migrate", || {
        let (ch, db) = (&ch, &db);
        async move { ch.migrated(db).await.then_some(()) }
    })
    .await;
    let metrics_url = format!("http://127.0.0.1:{agg_port}/metrics");
    poll_until(Duration::from_secs(120), "the aggregator to be assigned partitions", || traffic::assigned(metrics_url.clone())).await;
    let query = Process::start(
        "meterline-query-api",
        &format!("[server]\nlisten = \"127.0.0.1:{query_port}\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n{tenants}", ch.url),
    );
    poll_until(Duration::from_secs(60), "the query API to be ready", || answers(format!("http://127.0.0.1:{query_port}/readyz"))).await;
    Ok(Deployment {
        ingest_url: format!("http://127.0.0.1:{ingest_port}"),
        query_url: format!("http://127.0.0.1:{query_port}"),
        metrics_url: Some(metrics_url),
        kafka: Some(sample::KafkaLag::new(&brokers, &topic, group, 4)?),
        topic: Some((brokers.clone(), topic.clone())),
        log_bytes: None,
        clickhouse: Some((ch, db)),
        data_dir: None,
        services: vec![ingest, query],
        aggregator: Some(aggregator),
        _broker: Some(broker),
    })
}

async fn start_embedded(out: &Path) -> anyhow::Result<Deployment> {
    let data = out.join("embedded-data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let config = out.join("meterline.toml");
    std::fs::write(&config, tenants_toml())?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Process::start_args("meterline", &["run".as_ref(), "--data-dir".as_ref(), data.as_os_str(), "--config".as_ref(), config.as_os_str(), "--listen".as_ref(), listen.as_ref()]);
    let url = format!("http://{listen}");
    poll_until(Duration::from_secs(60), "the all-in-one to be ready", || answers(format!("{url}/readyz"))).await;
    Ok(Deployment {
        ingest_url: url.clone(),
        query_url: url,
        metrics_url: None,
        kafka: None,
        topic: None,
        log_bytes: None,
        clickhouse: None,
        data_dir: Some(data),
        services: vec![server],
        aggregator: None,
        _broker: None,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak-bench: {e}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&args.out)?;
    eprintln!(
        "soak-bench: {} mode, {:?} at {} events/s ({}), kills every {:?}, warm-up {:?}, out {}",
        args.mode.as_str(),
        args.duration,
        args.rate,
        args.rate_source,
        args.kill_every,
        args.warmup,
        args.out.display()
    );
    let mut deployment = match args.mode {
        Mode::Distributed => start_distributed(args.seed, keys_per_slice(&args)).await?,
        Mode::Embedded => start_embedded(&args.out).await?,
    };
    let started = Instant::now();
    let (done_tx, done) = tokio::sync::watch::channel(false);
    // The sampler runs on through the drain, until the totals settle.
    let (sampler_tx, sampler_rx) = tokio::sync::watch::channel(false);
    let queries = Arc::new(traffic::QueryStats::default());
    let sampler = sample::Sampler::new(&args, &deployment, started, queries.clone())?;
    let sampling = tokio::spawn(sampler.run(sampler_rx));
    let probes = tokio::spawn(traffic::probe_loop(deployment.ingest_url.clone(), deployment.query_url.clone(), started, args.out.clone(), done.clone()));
    let dashboard = tokio::spawn(traffic::query_loop(deployment.query_url.clone(), started, queries.clone(), done.clone()));
    let killer = match (deployment.aggregator.take(), args.kill_every) {
        (Some(agg), Some(every)) => Some(tokio::spawn(traffic::kill_loop(agg, every, deployment.metrics_url.clone().unwrap_or_default(), started, done.clone()))),
        (agg, _) => {
            deployment.aggregator = agg;
            None
        }
    };

    // Retries and conflicting copies add ~12% to the actions: the rate
    // counts every event sent, so the run lasts about `duration`.
    let options = LoadOptions {
        url: deployment.ingest_url.clone(),
        key: "acme-ingest-key".into(),
        actions: (args.rate as f64 * args.duration.as_secs_f64() * 100.0 / 112.0) as usize,
        users: args.users,
        batch: 500,
        concurrency: 4,
        rate: args.rate,
        seed: args.seed,
        mix: workload::Mix { runaway: true, ..workload::Mix::default() },
    };
    let (report, truth) = run_with_progress(&options, Some(Duration::from_secs(60))).await?;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!("soak-bench: load done after {load_secs:.0} s: {}", serde_json::to_string(&report)?);
    // Kept on disk, so that the totals can be checked again if this process
    // cannot wait out the drain.
    std::fs::write(args.out.join("truth.json"), serde_json::to_string(&truth)?)?;

    // Probes, queries and kills stop with the load; the drain is measured by
    // the totals settling.
    let _ = done_tx.send(true);
    let probes = probes.await??;
    dashboard.await?;
    let mut kills = Vec::new();
    if let Some(k) = killer {
        let (agg, k) = k.await?;
        deployment.aggregator = Some(agg);
        kills = k;
    }
    verdict::note_kills(&args.out, &kills)?;
    let (outcome, settle_secs) = verdict::settle_and_compare(&deployment.query_url, &truth, &probes, args.settle).await;
    let alerts = traffic::runaway_alerts(&deployment.query_url).await;
    let first_alert_at = *queries.first_alert_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = sampler_tx.send(true);
    let samples = sampling.await??;
    if let Some((brokers, topic)) = deployment.topic.clone() {
        deployment.log_bytes = tokio::task::spawn_blocking(move || sample::kafka_bytes_per_record(&brokers, &topic, 200_000)).await?;
    }
    let summary = verdict::Summary::build(&args, &report, load_secs, settle_secs, &samples, &probes, &kills, first_alert_at, &alerts, &outcome, &deployment);
    summary.write(&args.out)?;
    println!("{}", summary.markdown());
    println!("BENCH_JSON {}", summary.json());
    for p in deployment.services.iter_mut().chain(deployment.aggregator.as_mut()) {
        p.kill().await;
    }
    if let Some(dir) = &deployment.data_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    if !outcome.exact() {
        anyhow::bail!("totals differ from the ground truth: {}", outcome.describe());
    }
    Ok(())
}
