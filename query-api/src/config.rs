//! Query API configuration: a TOML file with `METERLINE_*` env overrides, validated at startup.

use meterline_aggregator::config::ClickHouseConfig;
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
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Longest `from`..`to` range a request may ask for, in days.
    pub max_range_days: i64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8081)), max_range_days: 400 }
    }
}

impl Config {
    pub fn load(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, QueryError> {
        let config: Config = load_toml_with_env(text, &["server", "clickhouse"], vars)?;
        if config.server.max_range_days < 1 {
            return Err(QueryError::Config("server.max_range_days: must be at least 1".into()));
        }
        if config.tenants.is_empty() {
            return Err(QueryError::Config("tenants: configure at least one tenant with a read key".into()));
        }
        KeyRing::from_config(&config.tenants)?;
        Ok(config)
    }
}
