//! `meterline`: the all-in-one binary, the distributed roles, and config tools.
//!
//! ```text
//! meterline [run] [--data-dir DIR] [--config FILE] [--listen ADDR] [--demo] [--demo-rate N]
//! meterline demo [same flags as run]   # run with demo traffic
//! meterline ingest     --config FILE     # distributed: HTTP -> Kafka
//! meterline aggregator --config FILE     # distributed: Kafka -> ClickHouse
//! meterline query-api  --config FILE     # distributed: HTTP over ClickHouse
//! meterline config check FILE [--role ROLE]
//! meterline keys new --tenant T --scopes ingest,read [--name NAME]
//! meterline stripe-sync [--config FILE] [--data-dir DIR] [--role all-in-one|distributed]   # push billable usage to Stripe meters
//! meterline limits reconcile [--config FILE] [--data-dir DIR] [--role all-in-one|aggregator] [--tenant T] [--json]
//! meterline export --tenant T --from TIME --to TIME [--by customer|user] [--measures M,..] [--format csv|json] [--role all-in-one|query-api] [--config FILE] [--data-dir DIR]
//! ```

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meterline_schemas::tenants::{KeyConfig, KeyRing, Scope, TenantConfig, hash_key};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The allocator of every Meterline binary. Under glibc's, the all-in-one's
/// resident memory kept rising at a steady load while the bytes it had in
/// use did not: freed memory fragments across glibc's per-thread arenas and
/// stays with the process. jemalloc gives it back; vector and quickwit make
/// the same choice. It is built unprefixed (the workspace's
/// `unprefixed_malloc_on_supported_platforms`), so on Linux it is also the C
/// libraries' `malloc`: librdkafka's prefetch buffers and SQLite's pages.
/// Under glibc the aggregator kept 60-70 MiB of librdkafka's freed catch-up
/// buffers after every restart. Libraries, tests and benches keep the
/// system allocator, so the benches' raw baselines are unchanged. Measured
/// in bench/SOAK.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Per-user usage metering for AI products: ingest, dedupe, rollups and queries.
///
/// With no subcommand, runs everything in one process over an embedded store
/// (the same as `meterline run`). The distributed deployment (Kafka +
/// ClickHouse) runs `ingest`, `aggregator` and `query-api` separately.
#[derive(Debug, Parser)]
#[command(name = "meterline", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process over an embedded store (the default).
    Run(RunArgs),
    /// Like `run`, with generated demo traffic (the same as `run --demo`).
    Demo(RunArgs),
    /// Distributed role: accept events over HTTP and produce them to Kafka.
    Ingest(RoleArgs),
    /// Distributed role: consume Kafka, dedupe, and write rollups to ClickHouse.
    Aggregator(RoleArgs),
    /// Distributed role: serve the query HTTP API over ClickHouse.
    QueryApi(RoleArgs),
    /// Inspect configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Limits operations.
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Push each mapped customer's billable usage to Stripe's meters in hourly
    /// windows, as deltas (one process per data directory, or with --role
    /// distributed one per ClickHouse database; the secret key comes from
    /// METERLINE_STRIPE_SECRET_KEY).
    StripeSync(StripeSyncArgs),
    /// Billable totals per customer or user per billing period (each
    /// subject's subscription cycle, else the calendar month), exact, as CSV
    /// or JSON on stdout: the same answer as GET /v1/billing/export.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// The tenant to export.
    #[arg(long, value_name = "T")]
    tenant: String,
    /// Start, RFC 3339, inclusive.
    #[arg(long, value_name = "TIME")]
    from: String,
    /// End, RFC 3339, exclusive.
    #[arg(long, value_name = "TIME")]
    to: String,
    /// Whose usage each row sums.
    #[arg(long, value_enum, default_value_t = ExportBy::Customer)]
    by: ExportBy,
    /// Comma-separated measures, in column order [default: all nine].
    #[arg(long, value_name = "M,..")]
    measures: Option<String>,
    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    format: ExportFormat,
    /// Which deployment: the embedded store, or ClickHouse (and the limits'
    /// Redis for cycle anchors) from a query API config.
    #[arg(long, value_enum, default_value_t = ExportRole::AllInOne)]
    role: ExportRole,
    /// The deployment's config: the all-in-one's (default DIR/meterline.toml), or the query API's.
    #[arg(long, value_name = "FILE", env = "METERLINE_CONFIG")]
    config: Option<PathBuf>,
    /// The all-in-one's data directory (with --role all-in-one).
    #[arg(long, value_name = "DIR", env = "METERLINE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportBy {
    Customer,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportRole {
    /// The all-in-one binary's SQLite store (read only; the server may run).
    AllInOne,
    /// ClickHouse's events, and subscriptions from [limits] redis_url if set.
    QueryApi,
}

#[derive(Debug, Args)]
struct StripeSyncArgs {
    /// The deployment's config with [billing]: the all-in-one's (default
    /// DIR/meterline.toml), or the query API's (with --role distributed).
    #[arg(long, value_name = "FILE", env = "METERLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Which deployment: the embedded store, or ClickHouse (the usage and
    /// the pushed state) from a query API config.
    #[arg(long, value_enum, default_value_t = SyncRole::AllInOne)]
    role: SyncRole,
    /// The all-in-one's data directory, whose database holds the usage and the pushed state.
    #[arg(long, value_name = "DIR", env = "METERLINE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SyncRole {
    /// The all-in-one binary's SQLite store (one sync per data directory).
    AllInOne,
    /// ClickHouse, from the query API's config (run exactly one).
    Distributed,
}

/// The all-in-one mode's flags.
#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Directory of the embedded store; without --config, DIR/meterline.toml is
    /// generated there on first run with a development tenant and keys.
    #[arg(long, value_name = "DIR", env = "METERLINE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Config file to use instead of the one in the data directory.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address the HTTP server binds, overriding the config's server.listen.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Also send demo traffic to the server with the generated dev keys.
    #[arg(long)]
    demo: bool,
    /// Demo events per second (with --demo).
    #[arg(long, value_name = "N", default_value_t = 20)]
    demo_rate: usize,
}

/// A distributed role's flags.
#[derive(Debug, Args)]
struct RoleArgs {
    /// The role's TOML config (see config/<role>.example.toml).
    /// METERLINE_<SECTION>__<KEY> variables override keys in it.
    #[arg(long, value_name = "FILE", env = "METERLINE_CONFIG")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load and validate a config as ROLE would at startup (METERLINE_* overrides
    /// included) and print what it would run with, secrets masked as "***".
    /// Exits non-zero with the offending key on an invalid config.
    Check {
        /// The TOML config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Which role's config FILE is.
        #[arg(long, value_enum, default_value_t = Role::AllInOne)]
        role: Role,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a random API key: prints the key (once; only its hash is
    /// configured) and the [[tenants.keys]] block to add under the tenant.
    New {
        /// The tenant id the key belongs to ([[tenants]] id).
        #[arg(long, value_name = "T")]
        tenant: String,
        /// What the key may do, comma-separated: ingest, read, admin.
        #[arg(long, value_enum, value_delimiter = ',', required = true, value_name = "SCOPES")]
        scopes: Vec<ScopeArg>,
        /// Label for logs and audits [default: TENANT-SCOPES, e.g. acme-ingest-read].
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Check every limits counter of a closed period against the sum of its
    /// metered events (billable, same subject, measure and filter) and print
    /// each counter's verdict: match, mismatch, open_period or
    /// unknown_definition. Exits non-zero if any closed-period counter differs.
    Reconcile(ReconcileArgs),
}

#[derive(Debug, Args)]
struct ReconcileArgs {
    /// The deployment's config: the all-in-one's (default DIR/meterline.toml),
    /// or an aggregator's with [clickhouse] and [limits] redis_url.
    #[arg(long, value_name = "FILE", env = "METERLINE_CONFIG")]
    config: Option<PathBuf>,
    /// The all-in-one's data directory (with --role all-in-one).
    #[arg(long, value_name = "DIR", env = "METERLINE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Which deployment: the embedded store, or Redis and ClickHouse.
    #[arg(long, value_enum, default_value_t = ReconcileRole::AllInOne)]
    role: ReconcileRole,
    /// Only this tenant [default: every tenant of the config].
    #[arg(long, value_name = "T")]
    tenant: Option<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReconcileRole {
    /// The all-in-one binary's SQLite store (read only; the server may run).
    AllInOne,
    /// Redis counters against ClickHouse events, from an aggregator config.
    Aggregator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// The all-in-one binary (`meterline run`).
    AllInOne,
    Ingest,
    Aggregator,
    QueryApi,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::AllInOne => "all-in-one",
            Role::Ingest => "ingest",
            Role::Aggregator => "aggregator",
            Role::QueryApi => "query-api",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScopeArg {
    /// Send events.
    Ingest,
    /// Query usage.
    Read,
    /// Everything the tenant can do.
    Admin,
}

impl ScopeArg {
    fn scope(self) -> (Scope, &'static str) {
        match self {
            ScopeArg::Ingest => (Scope::Ingest, "ingest"),
            ScopeArg::Read => (Scope::Read, "read"),
            ScopeArg::Admin => (Scope::Admin, "admin"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match cli.command {
        None => runtime()?.block_on(run(cli.run)),
        Some(Command::Run(args)) => runtime()?.block_on(run(args)),
        Some(Command::Demo(args)) => runtime()?.block_on(run(RunArgs { demo: true, ..args })),
        Some(Command::Ingest(args)) => runtime()?.block_on(role(Role::Ingest, &args.config)),
        Some(Command::Aggregator(args)) => runtime()?.block_on(role(Role::Aggregator, &args.config)),
        Some(Command::QueryApi(args)) => runtime()?.block_on(role(Role::QueryApi, &args.config)),
        Some(Command::Config(ConfigCommand::Check { file, role })) => config_check(&file, role),
        Some(Command::Keys(KeysCommand::New { tenant, scopes, name })) => keys_new(&tenant, &scopes, name),
        Some(Command::Limits(LimitsCommand::Reconcile(args))) => runtime()?.block_on(reconcile(args)),
        Some(Command::StripeSync(args)) => runtime()?.block_on(stripe_sync(args)),
        Some(Command::Export(args)) => runtime()?.block_on(export(args)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir;
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
            "\nFirst run: generated {} with a development tenant \"dev\".\n  ingest key: {}\n  read key:   {}\n  admin key:  {}\n(kept in {})\n",
            path.display(),
            keys.ingest,
            keys.read,
            keys.admin.as_deref().unwrap_or("none"),
            data_dir.join(meterline::devconfig::KEYS_FILE).display()
        );
        eprintln!("Dashboard (signs in with the read key): {}\n", dashboard_url(addr, &keys.read));
    }
    tracing::info!(%addr, data_dir = %data_dir.display(), "meterline listening (embedded store)");
    if args.demo {
        let keys = meterline::devconfig::stored_keys(&data_dir)
            .context("--demo needs the generated dev keys (run without --config once, or use the generated data directory)")?;
        eprintln!("Demo traffic on; the dashboard: {}", dashboard_url(addr, &keys.read));
        tokio::spawn(meterline::demo::run(format!("http://{addr}"), keys.ingest, Some(keys.read), args.demo_rate));
    }
    meterline::serve(config, &data_dir, listener, meterline_http::shutdown_signal()).await?;
    tracing::info!("meterline stopped");
    Ok(())
}

/// The dashboard's sign-in link: the fragment never reaches the server or
/// its logs, and the page drops it from the address bar once read.
fn dashboard_url(addr: std::net::SocketAddr, read_key: &str) -> String {
    let host = if addr.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    format!("http://{host}/#key={read_key}")
}

/// One role of the distributed deployment, from its own config file.
async fn role(role: Role, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let context = || format!("config {}", path.display());
    let shutdown = meterline_http::shutdown_signal();
    match role {
        Role::Ingest => {
            let config = meterline_ingest::Config::load(&text, std::env::vars()).with_context(context)?;
            let listener = bind(config.server.listen).await?;
            meterline_ingest::serve(config, listener, shutdown).await?;
        }
        Role::Aggregator => {
            let config = meterline_aggregator::Config::load(&text, std::env::vars()).with_context(context)?;
            let listener = bind(config.server.listen).await?;
            meterline_aggregator::serve(config, listener, shutdown).await?;
        }
        Role::QueryApi => {
            let config = meterline_query_api::Config::load(&text, std::env::vars()).with_context(context)?;
            let listener = bind(config.server.listen).await?;
            meterline_query_api::serve(config, listener, shutdown).await?;
        }
        Role::AllInOne => unreachable!("the all-in-one mode runs through run()"),
    }
    tracing::info!(role = role.name(), "stopped");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding server.listen {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    Ok(listener)
}

/// `meterline limits reconcile`: the report, and an error (exit 1) if any closed-period counter differs.
async fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    let path = match (&args.config, args.role) {
        (Some(p), _) => p.clone(),
        (None, ReconcileRole::AllInOne) => args.data_dir.join(meterline::devconfig::CONFIG_FILE),
        (None, ReconcileRole::Aggregator) => anyhow::bail!("--role aggregator needs --config FILE (the aggregator's config)"),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
    let context = || format!("config {}", path.display());
    let pick = |tenants: &[TenantConfig]| -> anyhow::Result<Vec<String>> {
        let all: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
        match &args.tenant {
            Some(t) if all.contains(t) => Ok(vec![t.clone()]),
            Some(t) => anyhow::bail!("--tenant {t:?} is not a tenant of {}", path.display()),
            None => Ok(all),
        }
    };
    let now = chrono::Utc::now();
    let report = match args.role {
        ReconcileRole::AllInOne => {
            let config = meterline::Config::load(&text, std::env::vars()).with_context(context)?;
            meterline::reconcile::embedded(&args.data_dir, &pick(&config.tenants)?, now)?
        }
        ReconcileRole::Aggregator => {
            let config = meterline_aggregator::Config::load(&text, std::env::vars()).with_context(context)?;
            let url = config.limits.redis_url.as_deref().context("limits.redis_url is not set: the aggregator config counts no limits")?;
            let redis = meterline_redis::RedisLimits::connect(url).await?;
            let clickhouse = meterline_clickhouse::connect(&config.clickhouse).await.context("connecting to ClickHouse")?;
            meterline::reconcile::distributed(&redis, &clickhouse, &pick(&config.tenants)?, now).await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", meterline::reconcile::table(&report));
    }
    let differ = report.count(meterline_limits::ReconcileStatus::Mismatch);
    anyhow::ensure!(differ == 0, "{differ} closed-period counter(s) differ from their metered events");
    Ok(())
}

/// `meterline export`: the billing export on stdout.
async fn export(args: ExportArgs) -> anyhow::Result<()> {
    use meterline_query_api::export::{ClickHouseExport, ExportAnswer, ExportRequest, ExportSource, csv, parse_measures};
    let path = match (&args.config, args.role) {
        (Some(p), _) => p.clone(),
        (None, ExportRole::AllInOne) => args.data_dir.join(meterline::devconfig::CONFIG_FILE),
        (None, ExportRole::QueryApi) => anyhow::bail!("--role query-api needs --config FILE (the query API's config)"),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
    let context = || format!("config {}", path.display());
    let time = |name: &str, v: &str| {
        chrono::DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&chrono::Utc)).with_context(|| format!("--{name} must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"))
    };
    let (from, to) = (time("from", &args.from)?, time("to", &args.to)?);
    anyhow::ensure!(from < to, "--to must be after --from");
    let measures = match &args.measures {
        Some(text) => parse_measures(text).map_err(|e| anyhow::anyhow!("--measures: {e}"))?,
        None => meterline_limits::LimitMeasure::ALL.to_vec(),
    };
    let by = match args.by {
        ExportBy::Customer => meterline_limits::Scope::Customer,
        ExportBy::User => meterline_limits::Scope::User,
    };
    let (tenants, source): (Vec<TenantConfig>, Box<dyn ExportSource>) = match args.role {
        ExportRole::AllInOne => {
            let config = meterline::Config::load(&text, std::env::vars()).with_context(context)?;
            (config.tenants, Box::new(meterline::export::ReadOnlyExport::open(&args.data_dir)?))
        }
        ExportRole::QueryApi => {
            let config = meterline_query_api::Config::load(&text, std::env::vars()).with_context(context)?;
            let store = meterline_clickhouse::connect(&config.clickhouse).await.context("connecting to ClickHouse")?;
            let redis = match &config.limits.redis_url {
                Some(url) => Some(meterline_redis::RedisLimits::connect(url).await?),
                None => None,
            };
            (config.tenants, Box::new(ClickHouseExport { store, redis }))
        }
    };
    anyhow::ensure!(tenants.iter().any(|t| t.id == args.tenant), "--tenant {:?} is not a tenant of {}", args.tenant, path.display());
    let req = ExportRequest { tenant: args.tenant, from, to, by, measures };
    let billed = meterline_query_api::export::export(source.as_ref(), &req).await?;
    match args.format {
        ExportFormat::Csv => print!("{}", csv(&req, &billed)),
        ExportFormat::Json => println!("{}", serde_json::to_string(&ExportAnswer::of(&req, &billed))?),
    }
    Ok(())
}

/// `meterline stripe-sync --role distributed`: the sync worker over ClickHouse
/// until SIGTERM, from the query API's config (its [clickhouse] and [billing]).
async fn stripe_sync_distributed(args: StripeSyncArgs) -> anyhow::Result<()> {
    let path = args.config.context("--role distributed needs --config FILE (the query API's config, with [billing])")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
    let config = meterline_query_api::Config::load(&text, std::env::vars()).with_context(|| format!("config {}", path.display()))?;
    let key = stripe_secret_key()?;
    let store = meterline_clickhouse::connect(&config.clickhouse).await.context("connecting to ClickHouse")?;
    let ledger = meterline_query_api::billing::ClickHouseBilling::open(store).await?;
    let stripe = stripe_client(&config.billing, key)?;
    let b = &config.billing;
    tracing::info!(base_url = %b.stripe_base_url, tenants = b.tenants.len(), interval_secs = b.interval_secs, "stripe sync started (ClickHouse)");
    meterline_billing::Worker::new(ledger, stripe, config.billing.clone()).run(meterline_http::shutdown_signal()).await;
    tracing::info!("stripe sync stopped");
    Ok(())
}

/// The Stripe secret key: from the environment only, never a config key.
fn stripe_secret_key() -> anyhow::Result<String> {
    let key = std::env::var(meterline_billing::SECRET_KEY_VAR).ok().filter(|k| !k.is_empty());
    key.with_context(|| format!("{} is not set: the Stripe secret key comes from the environment only", meterline_billing::SECRET_KEY_VAR))
}

fn stripe_client(b: &meterline_billing::BillingConfig, key: String) -> anyhow::Result<meterline_billing::StripeClient> {
    let timeout = std::time::Duration::from_millis(b.timeout_ms);
    Ok(meterline_billing::StripeClient::new(&b.stripe_base_url, key, timeout, b.max_attempts, std::time::Duration::from_millis(b.backoff_ms))?)
}

/// `meterline stripe-sync`: the sync worker over the embedded store until SIGTERM.
async fn stripe_sync(args: StripeSyncArgs) -> anyhow::Result<()> {
    if args.role == SyncRole::Distributed {
        return stripe_sync_distributed(args).await;
    }
    let path = args.config.clone().unwrap_or_else(|| args.data_dir.join(meterline::devconfig::CONFIG_FILE));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
    let config = meterline::Config::load(&text, std::env::vars()).with_context(|| format!("config {}", path.display()))?;
    let key = std::env::var(meterline_billing::SECRET_KEY_VAR).ok().filter(|k| !k.is_empty());
    let key = key.with_context(|| format!("{} is not set: the Stripe secret key comes from the environment only", meterline_billing::SECRET_KEY_VAR))?;
    // One sync per data directory: two would compute the same windows'
    // deltas and race to push them.
    let lock_path = args.data_dir.join("stripe-sync.lock");
    let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| anyhow::anyhow!("another stripe-sync holds {}", lock_path.display()))?;
    let ledger = meterline::store::SqliteLedger::open(&args.data_dir)?;
    let b = &config.billing;
    let stripe = meterline_billing::StripeClient::new(
        &b.stripe_base_url,
        key,
        std::time::Duration::from_millis(b.timeout_ms),
        b.max_attempts,
        std::time::Duration::from_millis(b.backoff_ms),
    )?;
    tracing::info!(base_url = %b.stripe_base_url, tenants = b.tenants.len(), interval_secs = b.interval_secs, "stripe sync started");
    meterline_billing::Worker::new(ledger, stripe, config.billing.clone()).run(meterline_http::shutdown_signal()).await;
    drop(lock);
    tracing::info!("stripe sync stopped");
    Ok(())
}

/// Replaces secrets in a config before it is printed.
const MASK: &str = "***";

/// `meterline config check`: loads `path` as `role` would and prints the result, masked.
fn config_check(path: &Path, role: Role) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let context = || format!("config {} ({} role)", path.display(), role.name());
    let vars = std::env::vars();
    let shown = match role {
        Role::AllInOne => {
            let mut c = meterline::Config::load(&text, vars).with_context(context)?;
            mask_tenants(&mut c.tenants);
            mask_opt_url(&mut c.alerts.webhook_url);
            format!("{c:#?}")
        }
        Role::Ingest => {
            let mut c = meterline_ingest::Config::load(&text, vars).with_context(context)?;
            mask_tenants(&mut c.tenants);
            mask_options(&mut c.kafka.options);
            format!("{c:#?}")
        }
        Role::Aggregator => {
            let mut c = meterline_aggregator::Config::load(&text, vars).with_context(context)?;
            mask_tenants(&mut c.tenants);
            mask_options(&mut c.kafka.options);
            c.clickhouse.password = MASK.to_owned();
            c.clickhouse.url = mask_url(&c.clickhouse.url, false);
            mask_opt_url(&mut c.alerts.webhook_url);
            format!("{c:#?}")
        }
        Role::QueryApi => {
            let mut c = meterline_query_api::Config::load(&text, vars).with_context(context)?;
            mask_tenants(&mut c.tenants);
            c.clickhouse.password = MASK.to_owned();
            c.clickhouse.url = mask_url(&c.clickhouse.url, false);
            format!("{c:#?}")
        }
    };
    println!("# {}: a valid {} config (with METERLINE_* overrides applied; secrets shown as {MASK})", path.display(), role.name());
    println!("{shown}");
    Ok(())
}

fn mask_tenants(tenants: &mut [TenantConfig]) {
    for key in tenants.iter_mut().flat_map(|t| t.keys.iter_mut()) {
        key.sha256 = MASK.to_owned();
    }
}

/// librdkafka properties that may hold credentials (sasl.password, ssl.key.pem, ...).
fn mask_options(options: &mut BTreeMap<String, String>) {
    for (name, value) in options.iter_mut() {
        let name = name.to_ascii_lowercase();
        if ["password", "secret", "key", "jaas", "token", "credential"].iter().any(|s| name.contains(s)) {
            *value = MASK.to_owned();
        }
    }
}

/// A webhook URL often carries its token in the path: only scheme and host are shown.
fn mask_opt_url(url: &mut Option<String>) {
    if let Some(u) = url {
        *u = mask_url(u, true);
    }
}

/// `url` with any user info masked, and its path and query too when `path` is set
/// (a query is always masked: it may carry a password).
fn mask_url(url: &str, path: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return MASK.to_owned() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("{MASK}@{host}"),
        None => authority.to_owned(),
    };
    let tail = if tail.is_empty() || tail == "/" {
        tail.to_owned()
    } else if path {
        format!("/{MASK}")
    } else {
        match tail.split_once(['?', '#']) {
            Some((p, _)) => format!("{p}?{MASK}"),
            None => tail.to_owned(),
        }
    };
    format!("{scheme}://{host}{tail}")
}

/// `meterline keys new`: a fresh key and its config block.
fn keys_new(tenant: &str, scopes: &[ScopeArg], name: Option<String>) -> anyhow::Result<()> {
    let mut unique: Vec<ScopeArg> = Vec::new();
    for s in scopes {
        if !unique.contains(s) {
            unique.push(*s);
        }
    }
    let names: Vec<&str> = unique.iter().map(|s| s.scope().1).collect();
    let name = name.unwrap_or_else(|| format!("{tenant}-{}", names.join("-")));
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    let key = format!("mlk_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let config = KeyConfig { name: name.clone(), sha256: hash_key(&key), scopes: unique.iter().map(|s| s.scope().0).collect() };
    // The same validation a service applies at startup (tenant id, hash, scopes).
    let tenant_config = TenantConfig { id: tenant.to_owned(), keys: vec![config.clone()], credit_price_usd: None, prices: BTreeMap::new(), webhook_secret: None, portal_secret: None, portal_origins: Vec::new() };
    let ring = KeyRing::from_config(std::slice::from_ref(&tenant_config)).map_err(|e| anyhow::anyhow!("--tenant {tenant:?}: {e}"))?;
    anyhow::ensure!(ring.authenticate(&key).is_some(), "the generated key does not authenticate against its own hash");
    let quoted = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let scopes_toml = names.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ");
    println!("New key for tenant {tenant:?}; it is shown only now (the config keeps its SHA-256):\n");
    println!("    {key}\n");
    println!("Add this under the [[tenants]] block with id = {}:\n", quoted(tenant));
    println!("[[tenants.keys]]\nname = {}\nsha256 = {}\nscopes = [{scopes_toml}]", quoted(&config.name), quoted(&config.sha256));
    Ok(())
}
