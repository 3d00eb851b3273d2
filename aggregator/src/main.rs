//! `meterline-aggregator --config FILE`: runs the aggregator until SIGINT or SIGTERM.

use anyhow::Context;

/// jemalloc, as in every Meterline binary (why: the `meterline` binary's `src/main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let path = config_path()?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {path}"))?;
    let config = meterline_aggregator::Config::load(&text, std::env::vars()).with_context(|| format!("config {path}"))?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.server.listen))?;
    tracing::info!(addr = %listener.local_addr()?, topic = %config.kafka.topic, "aggregator starting");
    meterline_aggregator::serve(config, listener, meterline_http::shutdown_signal()).await?;
    tracing::info!("aggregator stopped");
    Ok(())
}

fn config_path() -> anyhow::Result<String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => Ok(path),
        _ => std::env::var("METERLINE_CONFIG").context("usage: meterline-aggregator --config FILE (or set METERLINE_CONFIG)"),
    }
}
