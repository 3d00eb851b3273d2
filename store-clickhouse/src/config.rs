//! Where ClickHouse is, and how long a request to it may take.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    #[serde(default = "ClickHouseConfig::default_database")]
    pub database: String,
    #[serde(default = "ClickHouseConfig::default_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// Per-request timeout; a write that takes longer is retried.
    #[serde(default = "ClickHouseConfig::default_request_timeout_ms")]
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub request_timeout_ms: u64,
}

impl ClickHouseConfig {
    fn default_database() -> String {
        "default".to_owned()
    }
    fn default_user() -> String {
        "default".to_owned()
    }
    fn default_request_timeout_ms() -> u64 {
        10_000
    }

    /// Checks the values every mode needs, naming the key (`prefix.url`, ...).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, &'static str)> {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err((format!("{prefix}.url"), "must be an http:// or https:// URL"));
        }
        if self.request_timeout_ms == 0 {
            return Err((format!("{prefix}.request_timeout_ms"), "must be at least 1"));
        }
        Ok(())
    }
}
