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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8081)), max_range_days: 400, ranking_cache_groups: 500_000 }
    }
}

impl Config {
    pub fn load(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, QueryError> {
        let config: Config = load_toml_with_env(text, &["server", "clickhouse", "limits", "billing"], vars)?;
        if config.server.max_range_days < 1 {
            return Err(QueryError::config("server.max_range_days", "must be at least 1"));
        }
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
}
