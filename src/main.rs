//! `meterline`: the all-in-one binary, and the distributed roles.
//!
//! ```text
//! meterline [run] [--data-dir DIR] [--config FILE] [--listen ADDR] [--demo]
//! meterline ingest     --config FILE     # distributed: HTTP -> Kafka
//! meterline aggregator --config FILE     # distributed: Kafka -> ClickHouse
//! meterline query-api  --config FILE     # distributed: HTTP over ClickHouse
//! ```

use anyhow::{Context, bail};
use std::path::PathBuf;

const USAGE: &str = "usage:
  meterline [run] [--data-dir DIR] [--config FILE] [--listen ADDR] [--demo] [--demo-rate N]
      all in one process over an embedded store in DIR (default ./data); with no
      --config, DIR/meterline.toml is generated on first run with a dev tenant
  meterline ingest|aggregator|query-api --config FILE
      one role of the distributed deployment (Kafka + ClickHouse)";

#[derive(Debug, Default)]
struct RunArgs {
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    listen: Option<String>,
    demo: bool,
    demo_rate: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("ingest" | "aggregator" | "query-api") => runtime.block_on(role(&args[0], &args[1..])),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("run") => runtime.block_on(run(parse_run(&args[1..])?)),
        Some("demo") => runtime.block_on(run(RunArgs { demo: true, ..parse_run(&args[1..])? })),
        _ => runtime.block_on(run(parse_run(&args)?)),
    }
}

fn parse_run(args: &[String]) -> anyhow::Result<RunArgs> {
    let mut out = RunArgs::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--data-dir" => out.data_dir = Some(PathBuf::from(value()?)),
            "--config" => out.config = Some(PathBuf::from(value()?)),
            "--listen" => out.listen = Some(value()?.clone()),
            "--demo" => out.demo = true,
            "--demo-rate" => out.demo_rate = Some(value()?.parse().context("--demo-rate must be events per second")?),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(out)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.or_else(|| std::env::var_os("METERLINE_DATA_DIR").map(PathBuf::from)).unwrap_or_else(|| PathBuf::from("data"));
    let (path, generated) = match args.config {
        Some(p) => (p, None),
        None => meterline::devconfig::ensure(&data_dir).with_context(|| format!("preparing data directory {}", data_dir.display()))?,
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if let Some(listen) = &args.listen {
        vars.push(("METERLINE_SERVER__LISTEN".into(), listen.clone()));
    }
    let config = meterline::Config::load(&text, vars).with_context(|| format!("config {}", path.display()))?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    if let Some(keys) = &generated {
        // Shown once; kept in the data directory for later.
        eprintln!(
            "\nFirst run: generated {} with a development tenant \"dev\".\n  ingest key: {}\n  read key:   {}\n(kept in {})\n",
            path.display(),
            keys.ingest,
            keys.read,
            data_dir.join(meterline::devconfig::KEYS_FILE).display()
        );
    }
    tracing::info!(%addr, data_dir = %data_dir.display(), "meterline listening (embedded store)");
    if args.demo {
        let keys = meterline::devconfig::stored_keys(&data_dir)
            .context("--demo needs the generated dev keys (run without --config once, or use the generated data directory)")?;
        let rate = args.demo_rate.unwrap_or(20);
        tokio::spawn(meterline::demo::run(format!("http://{addr}"), keys.ingest, Some(keys.read), rate));
    }
    meterline::serve(config, &data_dir, listener, meterline_http::shutdown_signal()).await?;
    tracing::info!("meterline stopped");
    Ok(())
}

/// One role of the distributed deployment, from its own config file.
async fn role(name: &str, args: &[String]) -> anyhow::Result<()> {
    let path = match args {
        [flag, path] if flag == "--config" => path.clone(),
        [] => std::env::var("METERLINE_CONFIG").with_context(|| format!("usage: meterline {name} --config FILE (or set METERLINE_CONFIG)"))?,
        _ => bail!("usage: meterline {name} --config FILE"),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {path}"))?;
    let shutdown = meterline_http::shutdown_signal();
    match name {
        "ingest" => {
            let config = meterline_ingest::Config::load(&text, std::env::vars()).with_context(|| format!("config {path}"))?;
            let listener = bind(config.server.listen).await?;
            meterline_ingest::serve(config, listener, shutdown).await?;
        }
        "aggregator" => {
            let config = meterline_aggregator::Config::load(&text, std::env::vars()).with_context(|| format!("config {path}"))?;
            let listener = bind(config.server.listen).await?;
            meterline_aggregator::serve(config, listener, shutdown).await?;
        }
        _ => {
            let config = meterline_query_api::Config::load(&text, std::env::vars()).with_context(|| format!("config {path}"))?;
            let listener = bind(config.server.listen).await?;
            meterline_query_api::serve(config, listener, shutdown).await?;
        }
    }
    tracing::info!(role = name, "stopped");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding server.listen {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    Ok(listener)
}
