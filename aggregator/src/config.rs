//! Aggregator configuration: a TOML file with `METERLINE_*` env overrides, validated at startup.

use meterline_schemas::config::load_toml_with_env;
use meterline_schemas::tenants::{KeyRing, TenantConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::AggregatorError;
use meterline_clickhouse::ClickHouseConfig;
use meterline_domain::AlertsConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub flush: FlushConfig,
    #[serde(default)]
    pub dedupe: DedupeConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// How long each table is kept (`retention.rs`).
    #[serde(default)]
    pub retention: meterline_domain::RetentionConfig,
    /// Limits: with `redis_url` set, counted events are applied to the
    /// limits' counters in Redis (`limits.rs`); the rest of the section is
    /// the reservation-serving role's.
    #[serde(default)]
    pub limits: meterline_limits::LimitsConfig,
    /// Tenants: their prices and credit prices (keys are ignored here).
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the metrics and health endpoints.
    pub listen: SocketAddr,
    /// How long shutdown may take to flush and commit.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9091)), shutdown_grace_secs: 30 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    #[serde(default = "KafkaConfig::default_topic")]
    pub topic: String,
    #[serde(default = "KafkaConfig::default_group")]
    pub group_id: String,
    /// A member silent this long is dropped and its partitions reassigned.
    #[serde(default = "KafkaConfig::default_session_timeout_ms")]
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub session_timeout_ms: u64,
    /// `key` (the default): a record is counted only on its key's home
    /// partition, and one found elsewhere is produced there (`forward.rs`).
    /// `user`: counted where it sits, as before the keying change; exact
    /// only while every copy of a key keeps its user_id. Set it only to run
    /// the old behaviour; going back to `user` after an upgrade is unsupported.
    #[serde(default)]
    pub keying: meterline_schemas::wire::Keying,
    /// Further librdkafka consumer properties, passed through as given.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl KafkaConfig {
    fn default_topic() -> String {
        "meterline.events.v1".to_owned()
    }
    fn default_group() -> String {
        "meterline-aggregator".to_owned()
    }
    fn default_session_timeout_ms() -> u64 {
        10_000
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// How often buffered events are written.
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub interval_ms: u64,
    /// Most events in one flush; one flush is one INSERT per table, which
    /// ClickHouse keeps atomic only below `max_insert_block_size` (1,048,576)
    /// rows, and the span rollup writes up to six rows per event.
    pub max_batch_events: usize,
    /// Most events held in memory; past it consumption pauses.
    pub max_buffered_events: usize,
    /// Longest pause between retries of a failed write.
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub max_backoff_ms: u64,
    /// How long a partition revoke may spend writing that partition's buffer
    /// before letting go (what does not make it is re-read by the next owner).
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub revoke_timeout_ms: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            interval_ms: 1_000,
            max_batch_events: 50_000,
            max_buffered_events: 200_000,
            max_backoff_ms: 5_000,
            revoke_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// How long a key is remembered (default 35 days); at least ingest's `events.max_past_secs`.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub window_secs: i64,
    /// Processing time covered by one bloom filter (default 7 days).
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub slice_secs: i64,
    /// Keys one slice is sized for, per partition; past it false positives rise.
    pub expected_keys_per_slice: usize,
    pub false_positive_rate: f64,
    /// How long a key stays in the exact recent map (default 10 minutes).
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub recent_secs: i64,
    /// Most keys in the recent map, per partition.
    pub max_recent_keys: usize,
    /// Whether each partition's bloom slices are persisted to `dedupe_snapshots`
    /// (`snapshot.rs`), so an assignment reads them and only the events after
    /// them instead of every key in the window.
    pub snapshots: bool,
    /// Least time between two snapshots of one partition (default 5 minutes):
    /// each writes every live slice, about 3.4 MB per slice at the defaults.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub snapshot_interval_secs: i64,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            window_secs: 35 * 86_400,
            slice_secs: 7 * 86_400,
            expected_keys_per_slice: 2_000_000,
            false_positive_rate: 0.01,
            recent_secs: 600,
            max_recent_keys: 500_000,
            snapshots: true,
            snapshot_interval_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct model (and feature) label values per tenant before further
    /// values are counted under `other`.
    pub max_label_values: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { max_label_values: 50 }
    }
}

impl Config {
    pub fn load(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, AggregatorError> {
        let config: Config = load_toml_with_env(text, &["server", "kafka", "clickhouse", "flush", "dedupe", "metrics", "alerts", "limits", "retention"], vars)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), AggregatorError> {
        let bad = |key: &str, message: &str| Err(AggregatorError::config(key, message));
        if let Err(meterline_limits::LimitsError::Config { key, message }) = self.limits.validate() {
            return bad(&key, &message);
        }
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers", "must name at least one host:port");
        }
        if self.kafka.group_id.is_empty() {
            return bad("kafka.group_id", "must not be empty");
        }
        if !(1_000..=300_000).contains(&self.kafka.session_timeout_ms) {
            return bad("kafka.session_timeout_ms", "must be between 1000 and 300000");
        }
        if let Err((key, message)) = self.clickhouse.validate("clickhouse") {
            return bad(&key, message);
        }
        if self.flush.interval_ms < 10 {
            return bad("flush.interval_ms", "must be at least 10");
        }
        // A flush's span rollup writes up to six rows per event, and must stay
        // one block (ClickHouse squashes an INSERT ... SELECT up to 1,048,576 rows).
        if !(1..=150_000).contains(&self.flush.max_batch_events) {
            return bad("flush.max_batch_events", "must be between 1 and 150000 (one INSERT block)");
        }
        if self.flush.max_buffered_events < self.flush.max_batch_events {
            return bad("flush.max_buffered_events", "must be at least flush.max_batch_events");
        }
        if self.dedupe.window_secs < 3_600 {
            return bad("dedupe.window_secs", "must be at least 3600");
        }
        if self.dedupe.slice_secs < 60 || self.dedupe.slice_secs > self.dedupe.window_secs {
            return bad("dedupe.slice_secs", "must be between 60 and dedupe.window_secs");
        }
        if self.dedupe.expected_keys_per_slice == 0 {
            return bad("dedupe.expected_keys_per_slice", "must be at least 1");
        }
        if !(self.dedupe.false_positive_rate > 0.0 && self.dedupe.false_positive_rate < 0.5) {
            return bad("dedupe.false_positive_rate", "must be between 0 and 0.5");
        }
        if self.dedupe.recent_secs < 0 {
            return bad("dedupe.recent_secs", "must not be negative");
        }
        if self.dedupe.snapshot_interval_secs < 1 {
            return bad("dedupe.snapshot_interval_secs", "must be at least 1");
        }
        self.alerts.validate()?;
        self.retention.validate(u64::try_from(self.dedupe.window_secs).unwrap_or(0))?;
        KeyRing::from_config(&self.tenants)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/aggregator.example.toml");

    #[test]
    fn example_config_is_valid() {
        let config = Config::load(EXAMPLE, []).unwrap();
        assert_eq!(config.flush.interval_ms, 1_000);
        assert_eq!(config.dedupe.window_secs, 35 * 86_400);
    }

    #[test]
    fn errors_name_the_key() {
        for (var, value, key) in [
            ("METERLINE_FLUSH__MAX_BATCH_EVENTS", "2000000", "flush.max_batch_events"),
            ("METERLINE_CLICKHOUSE__URL", "localhost:8123", "clickhouse.url"),
            ("METERLINE_DEDUPE__FALSE_POSITIVE_RATE", "0", "dedupe.false_positive_rate"),
            ("METERLINE_DEDUPE__SLICE_SECS", "10", "dedupe.slice_secs"),
            ("METERLINE_KAFKA__GROUPID", "x", "groupid"),
            // Raw events must outlive the dedupe window (35 days) plus the audit period.
            ("METERLINE_RETENTION__EVENTS_DAYS", "60", "retention.events_days"),
            ("METERLINE_RETENTION__ROLLUPS_MINUTE_DAYS", "always", "retention.rollups_minute_days"),
        ] {
            let err = Config::load(EXAMPLE, [(var.to_owned(), value.to_owned())]).unwrap_err().to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }
}
