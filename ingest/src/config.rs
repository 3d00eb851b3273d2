//! Ingest configuration: a TOML file with `METERLINE_*` env overrides, validated at startup.

use meterline_schemas::tenants::{KeyRing, TenantConfig};
use meterline_schemas::{TimeBounds, config::load_toml_with_env};
use meterline_schemas::SchemaError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::IngestError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub events: TimeBounds,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Limits: with `redis_url` set, this service also serves plans,
    /// subscriptions, reservations and balances over Redis.
    #[serde(default)]
    pub limits: meterline_limits::LimitsConfig,
    /// How `POST /api/v1/events` maps CloudEvents to usage events.
    #[serde(default)]
    pub cloudevents: meterline_schemas::cloudevents::CloudEventsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP server binds (the binary only; tests pass a listener).
    pub listen: SocketAddr,
    /// Requests processed at once; more get 429 with `Retry-After`. Worst-case
    /// request memory is about this times three times `max_body_bytes`.
    pub max_in_flight_requests: usize,
    /// Largest body, after decompression, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one request.
    pub max_events_per_request: usize,
    /// How long shutdown waits for in-flight requests and unacked messages.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub shutdown_grace_secs: u64,
}

impl ServerConfig {
    /// Checks what serde cannot, naming the key; every mode that serves
    /// ingest's routes (the service, the all-in-one binary) runs it.
    pub fn validate(&self) -> Result<(), SchemaError> {
        if self.max_in_flight_requests == 0 {
            return Err(SchemaError::config("server.max_in_flight_requests", "must be at least 1"));
        }
        if self.max_body_bytes < 1024 {
            return Err(SchemaError::config("server.max_body_bytes", "must be at least 1024"));
        }
        if self.max_events_per_request == 0 {
            return Err(SchemaError::config("server.max_events_per_request", "must be at least 1"));
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_in_flight_requests: 32,
            max_body_bytes: 10 * 1024 * 1024,
            max_events_per_request: 10_000,
            shutdown_grace_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    #[serde(default = "KafkaConfig::default_topic")]
    pub topic: String,
    /// Create the topic (with `partitions`) when it is missing, and recreate it
    /// if a broker comes back without it. Off where topics are provisioned.
    #[serde(default = "yes")]
    pub create_topic: bool,
    #[serde(default = "KafkaConfig::default_partitions")]
    pub partitions: i32,
    /// How long one event may wait for the broker's ack before the request
    /// answers 503 (librdkafka `message.timeout.ms`).
    #[serde(default = "KafkaConfig::default_produce_timeout_ms")]
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub produce_timeout_ms: u64,
    /// `none`, `gzip`, `lz4`, `zstd` or `snappy`.
    #[serde(default = "KafkaConfig::default_compression")]
    pub compression: String,
    #[serde(default = "KafkaConfig::default_linger_ms")]
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub linger_ms: u64,
    /// How events are partitioned: `key` (the default) produces every copy
    /// of an idempotency key to one partition, so dedupe is exact whatever
    /// a copy changes; `user` is the keying before it (tenant/user_id).
    #[serde(default)]
    pub keying: meterline_schemas::wire::Keying,
    /// Further librdkafka producer properties, passed through as given.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

impl KafkaConfig {
    fn default_topic() -> String {
        "meterline.events.v1".to_owned()
    }
    fn default_partitions() -> i32 {
        8
    }
    fn default_produce_timeout_ms() -> u64 {
        5_000
    }
    fn default_compression() -> String {
        "lz4".to_owned()
    }
    fn default_linger_ms() -> u64 {
        5
    }
}

impl Config {
    /// Parses TOML text and applies overrides from `vars`, then validates.
    pub fn load(text: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, IngestError> {
        let config: Config = load_toml_with_env(text, &["server", "kafka", "events", "limits", "cloudevents"], vars)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot; every message names its key.
    pub fn validate(&self) -> Result<(), IngestError> {
        let bad = |key: &str, message: &str| Err(IngestError::config(key, message));
        self.server.validate()?;
        if let Err(meterline_limits::LimitsError::Config { key, message }) = self.limits.validate() {
            return bad(&key, &message);
        }
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers", "must name at least one host:port");
        }
        if self.kafka.topic.is_empty() || self.kafka.topic.len() > 249 {
            return bad("kafka.topic", "must be 1-249 characters");
        }
        if self.kafka.partitions < 1 {
            return bad("kafka.partitions", "must be at least 1");
        }
        if !(100..=300_000).contains(&self.kafka.produce_timeout_ms) {
            return bad("kafka.produce_timeout_ms", "must be between 100 and 300000");
        }
        if !["none", "gzip", "lz4", "zstd", "snappy"].contains(&self.kafka.compression.as_str()) {
            return bad("kafka.compression", "must be one of none, gzip, lz4, zstd, snappy");
        }
        self.events.validate()?;
        self.cloudevents.validate()?;
        if self.tenants.is_empty() {
            return bad("tenants", "configure at least one tenant with a key");
        }
        KeyRing::from_config(&self.tenants)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/ingest.example.toml");

    #[test]
    fn example_config_is_valid() {
        let config = Config::load(EXAMPLE, []).unwrap();
        assert_eq!(config.kafka.topic, "meterline.events.v1");
        assert_eq!(config.kafka.keying, meterline_schemas::wire::Keying::Key, "the exact keying unless chosen otherwise");
        assert_eq!(config.events.max_past_secs, 35 * 24 * 3600);
        let ring = KeyRing::from_config(&config.tenants).unwrap();
        assert_eq!(ring.authenticate("demo-ingest-key").unwrap().tenant, "demo");
    }

    #[test]
    fn env_overrides_apply() {
        let vars = [
            ("METERLINE_KAFKA__BROKERS".to_owned(), "10.0.0.1:9092".to_owned()),
            ("METERLINE_SERVER__MAX_IN_FLIGHT_REQUESTS".to_owned(), "4".to_owned()),
        ];
        let config = Config::load(EXAMPLE, vars).unwrap();
        assert_eq!(config.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(config.server.max_in_flight_requests, 4);
    }

    #[test]
    fn errors_name_the_key() {
        for (var, value, key) in [
            ("METERLINE_SERVER__MAX_IN_FLIGHT_REQUESTS", "0", "server.max_in_flight_requests"),
            ("METERLINE_KAFKA__COMPRESSION", "brotli", "kafka.compression"),
            ("METERLINE_KAFKA__PARTITIONS", "0", "kafka.partitions"),
            ("METERLINE_KAFKA__PRODUCE_TIMEOUT_MS", "1", "kafka.produce_timeout_ms"),
            ("METERLINE_KAFKA__BROKERZ", "x", "brokerz"),
            ("METERLINE_SERVER__LISTEN", "nowhere", "listen"),
        ] {
            let err = Config::load(EXAMPLE, [(var.to_owned(), value.to_owned())]).unwrap_err().to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
        // Other METERLINE_ variables (the test stack's) are not config.
        for (var, value) in [("METERLINE_PROMTOOL", "/usr/bin/promtool"), ("METERLINE_CONFIG", "x.toml")] {
            assert!(Config::load(EXAMPLE, [(var.to_owned(), value.to_owned())]).is_ok(), "{var}");
        }
        let err = Config::load(EXAMPLE, [("METERLINE_KAFKA__KEYING".to_owned(), "tenant".to_owned())]).unwrap_err().to_string();
        assert!(err.contains("kafka.keying") && err.contains("user"), "names the key and a choice: {err}");
        let err = Config::load(&EXAMPLE.replace("id = \"demo\"", "id = \"Demo!\""), []).unwrap_err().to_string();
        assert!(err.contains("tenants[0].id"), "{err}");
    }
}
