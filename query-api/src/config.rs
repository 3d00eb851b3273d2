//! Query API configuration: a TOML file with `METERLINE_*` env overrides, validated at startup.

use meterline_clickhouse::ClickHouseConfig;
use meterline_schemas::config::load_toml_with_env;
use meterline_schemas::tenants::{KeyRing, TenantConfig};
use serde::Deserialize;
use std::net::SocketAddr;

use crate::QueryError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// What one read may cost ClickHouse, and how many one tenant may run at once.
    #[serde(default)]
    pub query: QueryLimits,
    pub clickhouse: ClickHouseConfig,
    /// Only `redis_url` is read: the limits' Redis, where the billing export
    /// finds subscriptions' cycle anchors. Without it, every subject is
    /// exported by calendar month.
    #[serde(default)]
    pub limits: meterline_limits::LimitsConfig,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// The Stripe meter sync: its meters and config mappings, read by the
    /// mapping route here and by `meterline stripe-sync --role distributed`.
    #[serde(default)]
    pub billing: meterline_billing::BillingConfig,
    /// The horizons the aggregator keeps (set them alike): a query over a
    /// range older than what is kept answers 400.
    #[serde(default)]
    pub retention: meterline_domain::RetentionConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Longest `from`..`to` range a request may ask for, in days.
    pub max_range_days: i64,
    /// Groups whose sums the ranking cache may hold: about 250 bytes each
    /// with short ids, up to ~1 KiB with 256-byte user and customer ids;
    /// 0 turns it off. See `ranking.rs`.
    pub ranking_cache_groups: usize,
    /// How often the ranking cache's background refresher checks the
    /// standing rankings (and slides them when the hour turns), in
    /// milliseconds. See `refresh.rs`.
    pub ranking_refresh_ms: u64,
    /// A ranking not asked for this long, in seconds, is no longer
    /// refreshed (it stays kept for requests until the group bound evicts it).
    pub ranking_refresh_idle_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_range_days: 400,
            ranking_cache_groups: 500_000,
            ranking_refresh_ms: 5_000,
            ranking_refresh_idle_secs: 900,
        }
    }
}

impl ServerConfig {
    /// The refresher's period.
    pub fn ranking_refresh(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ranking_refresh_ms)
    }

    /// How long an unasked ranking keeps being refreshed.
    pub fn ranking_refresh_idle(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ranking_refresh_idle_secs)
    }

    fn validate(&self) -> Result<(), QueryError> {
        if self.max_range_days < 1 {
            return Err(QueryError::config("server.max_range_days", "must be at least 1"));
        }
        // Faster than a count takes, passes would queue behind each other;
        // slower than an hour, the hour would turn under the standing rankings unseen.
        if !(100..=3_600_000).contains(&self.ranking_refresh_ms) {
            return Err(QueryError::config("server.ranking_refresh_ms", "must be 100 to 3600000 (one hour)"));
        }
        if self.ranking_refresh_idle_secs < 1 {
            return Err(QueryError::config("server.ranking_refresh_idle_secs", "must be at least 1"));
        }
        Ok(())
    }
}

/// Query protection: a runaway dashboard query is stopped by ClickHouse
/// (time, memory) or refused here (too many at once for its tenant), and
/// answers `503` with `Retry-After`, so that ingest and the aggregator keep
/// ClickHouse's cores and memory.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryLimits {
    /// ClickHouse's `max_execution_time` on every statement, in seconds.
    pub max_execution_secs: u64,
    /// ClickHouse's `max_memory_usage` on every statement, in bytes.
    pub max_memory_bytes: u64,
    /// ClickHouse statements one tenant may have running at once.
    pub max_concurrent_per_tenant: usize,
    /// How long a statement over that cap waits for a slot before the
    /// request answers `503 overloaded_tenant`, in milliseconds (0: at once).
    pub max_queue_wait_ms: u64,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits { max_execution_secs: 10, max_memory_bytes: 2_000_000_000, max_concurrent_per_tenant: 4, max_queue_wait_ms: 500 }
    }
}

impl QueryLimits {
    /// The settings sent with every ClickHouse statement.
    pub fn read_limits(&self) -> meterline_clickhouse::ReadLimits {
        meterline_clickhouse::ReadLimits { max_execution_secs: self.max_execution_secs, max_memory_bytes: self.max_memory_bytes }
    }

    fn validate(&self) -> Result<(), QueryError> {
        // 0 means "no limit" to ClickHouse: exactly what this section is against.
        if self.max_execution_secs == 0 {
            return Err(QueryError::config("query.max_execution_secs", "must be at least 1"));
        }
        // Below a few MiB every statement fails, however small.
        if self.max_memory_bytes < 16 << 20 {
            return Err(QueryError::config("query.max_memory_bytes", "must be at least 16777216 (16 MiB)"));
        }
        if self.max_concurrent_per_tenant == 0 {
            return Err(QueryError::config("query.max_concurrent_per_tenant", "must be at least 1"));
        }
        Ok(())
    }
}

impl Config {
    pub fn load(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, QueryError> {
        let config: Config = load_toml_with_env(text, &["server", "query", "clickhouse", "limits", "billing", "retention"], vars)?;
        config.server.validate()?;
        config.query.validate()?;
        // The dedupe window is the aggregator's to check; here only the horizons' own bounds.
        config.retention.validate(0).map_err(|meterline_domain::DomainError::Config { key, message }| QueryError::config(key, message))?;
        if config.tenants.is_empty() {
            return Err(QueryError::config("tenants", "configure at least one tenant with a read key"));
        }
        if let Err((key, message)) = config.clickhouse.validate("clickhouse") {
            return Err(QueryError::config(key, message));
        }
        KeyRing::from_config(&config.tenants)?;
        let ids: Vec<String> = config.tenants.iter().map(|t| t.id.clone()).collect();
        config.billing.validate(&ids).map_err(|e| match e {
            meterline_billing::BillingError::Config { key, message } => QueryError::config(key, message),
            other => QueryError::config("billing", other.to_string()),
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads_and_names_its_bad_keys() {
        let example = include_str!("../../config/query-api.example.toml");
        let config = Config::load(example, []).expect("example config");
        assert_eq!((config.server.max_range_days, config.server.ranking_cache_groups), (400, 500_000));
        let off = Config::load(example, [("METERLINE_SERVER__RANKING_CACHE_GROUPS".to_owned(), "0".to_owned())]).expect("override");
        assert_eq!(off.server.ranking_cache_groups, 0);
        let err = Config::load(&example.replace("ranking_cache_groups", "ranking_cache_size"), []).expect_err("unknown key");
        assert!(err.to_string().contains("ranking_cache_size"), "{err}");
    }

    #[test]
    fn the_ranking_refresher_defaults_and_is_validated() {
        let example = include_str!("../../config/query-api.example.toml");
        let config = Config::load(example, []).expect("example config");
        assert_eq!((config.server.ranking_refresh(), config.server.ranking_refresh_idle()), (std::time::Duration::from_secs(5), std::time::Duration::from_secs(900)));
        let fast = Config::load(example, [("METERLINE_SERVER__RANKING_REFRESH_MS".to_owned(), "200".to_owned())]).expect("override");
        assert_eq!(fast.server.ranking_refresh_ms, 200);
        for (key, value) in [("ranking_refresh_ms", "99"), ("ranking_refresh_ms", "3600001"), ("ranking_refresh_idle_secs", "0"), ("max_range_days", "0")] {
            let err = Config::load(example, [(format!("METERLINE_SERVER__{}", key.to_uppercase()), value.to_owned())]).expect_err(key);
            assert!(err.to_string().contains(&format!("server.{key}")), "{err}");
        }
    }

    #[test]
    fn query_limits_default_load_from_the_example_and_are_validated() {
        let example = include_str!("../../config/query-api.example.toml");
        let config = Config::load(example, []).expect("example config");
        let q = config.query;
        assert_eq!((q.max_execution_secs, q.max_memory_bytes, q.max_concurrent_per_tenant, q.max_queue_wait_ms), (10, 2_000_000_000, 4, 500));
        let tight = Config::load(example, [("METERLINE_QUERY__MAX_EXECUTION_SECS".to_owned(), "1".to_owned())]).expect("override");
        assert_eq!(tight.query.max_execution_secs, 1);
        for (key, value) in [("max_execution_secs", "0"), ("max_memory_bytes", "1000"), ("max_concurrent_per_tenant", "0")] {
            let err = Config::load(example, [(format!("METERLINE_QUERY__{}", key.to_uppercase()), value.to_owned())]).expect_err(key);
            assert!(err.to_string().contains(&format!("query.{key}")), "{err}");
        }
        let err = Config::load(&example.replace("max_queue_wait_ms", "queue_wait_ms"), []).expect_err("unknown key");
        assert!(err.to_string().contains("queue_wait_ms"), "{err}");
    }
}
