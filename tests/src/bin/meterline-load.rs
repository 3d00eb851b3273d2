//! Load generator: realistic usage traffic against `POST /v1/events`.
//!
//! ```text
//! meterline-load --url http://127.0.0.1:8080 --key demo-ingest-key [--actions 100000 | --duration SECS]
//!     [--users 10000] [--batch 500] [--concurrency 4] [--rate 0] [--seed 1] [--truth truth.json]
//!     [--retry-pct 10] [--conflict-pct 2] [--late-pct 20] [--runaway true]
//! ```
//! Users are Zipf-spread (a few spend 100x the median), each in one of 20
//! customers, with client retries, conflicting copies, 3% unpriced, late
//! events up to 30 days, events either side of the month boundary and,
//! optionally, a runaway user. `--duration` (with `--rate`) sends rate x
//! duration actions: the workload is generated up front, so its ground truth
//! is known before the first request. Prints a JSON report (events/s,
//! latency p50/p90/p99/max, errors by status) and writes the per-user ground
//! truth to `--truth`, to verify the run against the query API afterwards.

use meterline_tests::load::{LoadOptions, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut o = LoadOptions {
        url: "http://127.0.0.1:8080".into(),
        key: "demo-ingest-key".into(),
        actions: 100_000,
        users: 10_000,
        batch: 500,
        concurrency: 4,
        rate: 0,
        seed: 1,
        mix: meterline_tests::workload::Mix::default(),
    };
    let mut truth_path = None;
    let mut duration = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [flag, value] = pair else { anyhow::bail!("every flag takes a value: {pair:?}") };
        match flag.as_str() {
            "--url" => o.url = value.clone(),
            "--key" => o.key = value.clone(),
            "--actions" => o.actions = value.parse()?,
            "--users" => o.users = value.parse()?,
            "--batch" => o.batch = value.parse()?,
            "--concurrency" => o.concurrency = value.parse()?,
            "--rate" => o.rate = value.parse()?,
            "--seed" => o.seed = value.parse()?,
            "--truth" => truth_path = Some(value.clone()),
            "--duration" => duration = Some(value.parse::<usize>()?),
            "--retry-pct" => o.mix.retry_pct = value.parse()?,
            "--conflict-pct" => o.mix.conflict_pct = value.parse()?,
            "--late-pct" => o.mix.late_pct = value.parse()?,
            "--runaway" => o.mix.runaway = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    if let Some(secs) = duration {
        anyhow::ensure!(o.rate > 0, "--duration needs --rate (events per second)");
        o.actions = secs * usize::try_from(o.rate)?;
    }
    for (flag, pct) in [("--retry-pct", o.mix.retry_pct), ("--conflict-pct", o.mix.conflict_pct), ("--late-pct", o.mix.late_pct)] {
        anyhow::ensure!(pct <= 100, "{flag} is a percentage, 0 to 100");
    }
    let (report, truth) = run(&o).await?;
    if let Some(path) = truth_path {
        std::fs::write(&path, serde_json::to_string_pretty(&truth)?)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
