//! Load generator: realistic usage traffic against `POST /v1/events`.
//!
//! Users are Zipf-spread (a few spend 100x the median), each in one of 20
//! customers, with client retries, conflicting copies, 3% unpriced, late
//! events up to 30 days, events either side of the month boundary and,
//! optionally, a runaway user. Events are generated batch by batch as they
//! are sent and the ground truth is kept as running per-user sums, so memory
//! stays bounded whatever `--actions` or `--duration`. Prints a progress line
//! to stderr every `--progress` seconds, then a JSON report (events/s,
//! latency p50/p90/p99/max, errors by status) to stdout, and writes the
//! per-user ground truth to `--truth`, to verify the run against the query
//! API afterwards.

use clap::{CommandFactory, Parser, error::ErrorKind};
use meterline_tests::load::{LoadOptions, run_with_progress};
use meterline_tests::workload::Mix;
use std::path::PathBuf;
use std::time::Duration;

/// Posts realistic usage traffic to a Meterline ingest endpoint and reports
/// throughput, latency and the ground truth the run must produce.
#[derive(Debug, Parser)]
#[command(name = "meterline-load", version)]
struct Cli {
    /// Base URL of ingest or of the all-in-one server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Ingest key (bearer token).
    #[arg(long, default_value = "demo-ingest-key")]
    key: String,
    /// Distinct actions to send (retries and conflicting copies come on top).
    #[arg(long, default_value_t = 100_000, conflicts_with = "duration")]
    actions: usize,
    /// Instead of --actions: send rate x duration actions (needs --rate).
    /// Retries and conflicting copies (~12% by default) come on top, so the
    /// run lasts that much longer.
    #[arg(long, value_name = "SECS")]
    duration: Option<usize>,
    /// Distinct users (Zipf-spread).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    users: u64,
    /// Events per request.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Events per second (copies included); 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seed of the workload (also names the idempotency keys: `w<seed>-<n>`).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the per-user ground truth (events, tokens, cost and revenue in
    /// nano-USD) to this JSON file.
    #[arg(long, value_name = "FILE")]
    truth: Option<PathBuf>,
    /// Percent of actions sent twice, as a client retry.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    retry_pct: u64,
    /// Percent of actions followed by a copy with the same key and another payload.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=100))]
    conflict_pct: u64,
    /// Percent of events stamped 1 hour to 30 days in the past.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=100))]
    late_pct: u64,
    /// Add `user-runaway`, making every twentieth call at 100k+ tokens.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    runaway: bool,
    /// Seconds between progress lines on stderr; 0 for none.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    progress: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut actions = cli.actions;
    if let Some(secs) = cli.duration {
        if cli.rate == 0 {
            // A usage error like clap's own: message, usage, exit status 2.
            Cli::command().error(ErrorKind::MissingRequiredArgument, "--duration needs --rate (events per second)").exit();
        }
        actions = secs.saturating_mul(usize::try_from(cli.rate)?);
    }
    if !(cli.progress.is_finite() && cli.progress >= 0.0) {
        Cli::command().error(ErrorKind::ValueValidation, "--progress takes a number of seconds, 0 or more").exit();
    }
    let options = LoadOptions {
        url: cli.url,
        key: cli.key,
        actions,
        users: usize::try_from(cli.users)?,
        batch: usize::try_from(cli.batch)?,
        concurrency: usize::try_from(cli.concurrency)?,
        rate: cli.rate,
        seed: cli.seed,
        mix: Mix { retry_pct: cli.retry_pct, conflict_pct: cli.conflict_pct, late_pct: cli.late_pct, runaway: cli.runaway },
    };
    let (report, truth) = run_with_progress(&options, Some(Duration::from_secs_f64(cli.progress))).await?;
    if let Some(path) = cli.truth {
        std::fs::write(&path, serde_json::to_string_pretty(&truth)?)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
