//! The all-in-one binary's configuration: one TOML file (by default
//! `<data dir>/meterline.toml`, generated on first run) with `METERLINE_*`
//! env overrides, validated at startup with messages that name the key.

use meterline_aggregator::MetricsConfig;
use meterline_domain::AlertsConfig;
use meterline_ingest::ServerConfig;
use meterline_limits::{LimitsConfig, LimitsError};
use meterline_schemas::config::load_toml_with_env;
use meterline_schemas::tenants::{KeyRing, TenantConfig};
use meterline_schemas::TimeBounds;
use serde::Deserialize;

use crate::EmbeddedError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP server: the same keys as ingest's `[server]`.
    #[serde(default)]
    pub server: ServerConfig,
    /// Event time bounds: the same as ingest's `[events]`.
    #[serde(default)]
    pub events: TimeBounds,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub query: QueryConfig,
    /// Runaway-user rules: the same as the aggregator's `[alerts]`.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Business metric label caps: the same as the aggregator's `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Limits: reservation TTLs and the answer when the store fails; plans,
    /// counters and reservations live in the embedded store.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Stripe meter sync: the meters and mappings `meterline stripe-sync` pushes.
    #[serde(default)]
    pub billing: meterline_billing::BillingConfig,
    /// How `POST /api/v1/events` maps CloudEvents: the same as ingest's `[cloudevents]`.
    #[serde(default)]
    pub cloudevents: meterline_schemas::cloudevents::CloudEventsConfig,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// How long events, rollups and alerts are kept: purged by the writer
    /// (`store/retention.rs`), and queries before a horizon answer 400.
    #[serde(default)]
    pub retention: meterline_domain::RetentionConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Most events one group commit writes; requests waiting beyond it go in the next.
    pub max_commit_events: usize,
    /// SQLite connections serving reads beside the one writer.
    pub read_connections: usize,
    /// Runaway rules are evaluated at most this often while events stream in
    /// (and this often for open alerts when none do), in milliseconds.
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub alert_eval_ms: u64,
    /// Once the WAL file passes this size, in MiB, the writer checkpoints it
    /// between group commits so it restarts (see `store/checkpoint.rs`).
    pub wal_limit_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { max_commit_events: 20_000, read_connections: 4, alert_eval_ms: 1_000, wal_limit_mb: 256 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Longest `from`..`to` range a request may ask for, in days.
    pub max_range_days: i64,
    /// Groups whose sums the ranking cache may hold (about 250 bytes each),
    /// as the query API's `server.ranking_cache_groups`; 0 turns it off.
    pub ranking_cache_groups: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig { max_range_days: 400, ranking_cache_groups: 200_000 }
    }
}

impl Config {
    pub fn load(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, EmbeddedError> {
        let config: Config = load_toml_with_env(text, &["server", "events", "storage", "query", "alerts", "metrics", "limits", "billing", "cloudevents", "retention"], vars)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), EmbeddedError> {
        let bad = |key: &str, message: &str| Err(EmbeddedError::config(key, message));
        self.server.validate()?;
        self.events.validate()?;
        self.cloudevents.validate()?;
        if !(1..=1_000_000).contains(&self.storage.max_commit_events) {
            return bad("storage.max_commit_events", "must be between 1 and 1000000");
        }
        if !(1..=64).contains(&self.storage.read_connections) {
            return bad("storage.read_connections", "must be between 1 and 64");
        }
        if !(10..=3_600_000).contains(&self.storage.alert_eval_ms) {
            return bad("storage.alert_eval_ms", "must be between 10 and 3600000");
        }
        if !(1..=1_048_576).contains(&self.storage.wal_limit_mb) {
            return bad("storage.wal_limit_mb", "must be between 1 and 1048576 (MiB)");
        }
        if self.query.max_range_days < 1 {
            return bad("query.max_range_days", "must be at least 1");
        }
        self.alerts.validate()?;
        // Embedded dedupe is the events table itself: a key is remembered as
        // long as its event is kept, and ingest refuses events older than max_past_secs.
        self.retention.validate(self.events.max_past_secs)?;
        if self.limits.redis_url.is_some() {
            return bad("limits.redis_url", "the all-in-one binary keeps limits in its embedded store; remove it (Redis is for the distributed roles)");
        }
        self.limits.validate().map_err(|e| match e {
            LimitsError::Config { key, message } => EmbeddedError::config(key, message),
            other => EmbeddedError::config("limits", other.to_string()),
        })?;
        if self.tenants.is_empty() {
            return bad("tenants", "configure at least one tenant with keys");
        }
        KeyRing::from_config(&self.tenants)?;
        let ids: Vec<String> = self.tenants.iter().map(|t| t.id.clone()).collect();
        self.billing.validate(&ids).map_err(|e| match e {
            meterline_billing::BillingError::Config { key, message } => EmbeddedError::config(key, message),
            other => EmbeddedError::config("billing", other.to_string()),
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[[tenants]]\nid = \"dev\"\n[[tenants.keys]]\nname = \"k\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"read\"]\n";

    #[test]
    fn shared_sections_run_their_own_validation() {
        assert!(Config::load(BASE, []).is_ok());
        for (section, key) in [
            ("[server]\nmax_in_flight_requests = 0\n", "server.max_in_flight_requests"),
            ("[events]\nmax_past_secs = 0\n", "events.max_past_secs"),
            ("[alerts.rules]\nwindow_secs = \"30s\"\n", "alerts.rules.window_secs"),
            ("[storage]\nalert_eval_ms = \"2h\"\n", "storage.alert_eval_ms"),
            ("[storage]\nwal_limit_mb = 0\n", "storage.wal_limit_mb"),
            ("[limits]\ndefault_ttl_secs = 0\n", "limits.default_ttl_secs"),
            ("[limits]\nredis_url = \"redis://127.0.0.1:6379\"\n", "limits.redis_url"),
        ] {
            let err = Config::load(&format!("{section}{BASE}"), []).expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let config = Config::load(&format!("[storage]\nalert_eval_ms = \"2s\"\n{BASE}"), []).expect("units");
        assert_eq!(config.storage.alert_eval_ms, 2_000);
    }
}
