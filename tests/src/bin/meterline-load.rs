//! Load generator: realistic usage traffic against `POST /v1/events`.
//!
//! ```text
//! meterline-load --url http://127.0.0.1:8080 --key demo-ingest-key [--actions 100000]
//!     [--users 10000] [--batch 500] [--concurrency 4] [--rate 0] [--seed 1] [--truth truth.json]
//! ```
//! Users are Zipf-spread (a few spend 100x the median), with 10% client
//! retries, 2% conflicting copies, 3% unpriced, late events up to 30 days and
//! events either side of the month boundary. Prints a JSON report (events/s,
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
    };
    let mut truth_path = None;
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
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let (report, truth) = run(&o).await?;
    if let Some(path) = truth_path {
        std::fs::write(&path, serde_json::to_string_pretty(&truth)?)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
