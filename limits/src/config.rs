//! The `[limits]` configuration, shared by the all-in-one binary and the distributed roles, with its one `validate()`.

use meterline_schemas::duration::{millis, secs};
use serde::Deserialize;
use std::collections::BTreeMap;

use crate::error::LimitsError;

/// What a reservation answers while the store cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Admit (the call goes ahead unmetered against limits; its commit is
    /// still metered and counted when the store is back). Products that
    /// would rather lose a little margin than fail a user's call.
    #[default]
    Allow,
    /// Refuse: products where an unbounded call costs more than a failed one.
    Deny,
}

/// One tenant's limits settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    pub on_store_error: Option<OnStoreError>,
}

/// `commit_linger_us` unless set: 1 ms. In limits-bench on 2 cores it added
/// about 0.8 ms to a lone commit's p50 (far inside the 50 ms commit goal; a
/// reservation is not delayed), and at 64 clients gave about 1.4x the pairs/s
/// of no linger with a lower reserve p99, in each alternated run.
pub const DEFAULT_COMMIT_LINGER_US: u64 = 1_000;
const MAX_COMMIT_LINGER_US: u64 = 100_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Redis holding counters, holds, plans and subscriptions (distributed
    /// roles only; the all-in-one binary keeps them in its SQLite store).
    pub redis_url: Option<String>,
    /// The default for tenants that set none.
    pub on_store_error: OnStoreError,
    /// How long a reservation waits for the store before answering by `on_store_error`.
    #[serde(deserialize_with = "millis")]
    pub store_timeout_ms: u64,
    /// A reservation's hold lasts this long unless the request says otherwise.
    #[serde(deserialize_with = "secs")]
    pub default_ttl_secs: u64,
    #[serde(deserialize_with = "secs")]
    pub max_ttl_secs: u64,
    /// Distributed: how long the commit producer waits for more commits to
    /// share a Kafka produce request, in microseconds. A commit still answers
    /// only once its own event is acknowledged; this trades up to this much
    /// latency per commit for fewer produce requests (less producer CPU) when
    /// commits are concurrent.
    pub commit_linger_us: u64,
    pub tenants: BTreeMap<String, TenantLimits>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            redis_url: None,
            on_store_error: OnStoreError::Allow,
            store_timeout_ms: 250,
            default_ttl_secs: 300,
            max_ttl_secs: 86_400,
            commit_linger_us: DEFAULT_COMMIT_LINGER_US,
            tenants: BTreeMap::new(),
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), LimitsError> {
        let err = |key: &str, message: &str| Err(LimitsError::Config { key: format!("limits.{key}"), message: message.to_owned() });
        if self.store_timeout_ms == 0 {
            return err("store_timeout_ms", "must be at least 1ms");
        }
        if self.default_ttl_secs == 0 || self.default_ttl_secs > self.max_ttl_secs {
            return err("default_ttl_secs", "must be between 1s and limits.max_ttl_secs");
        }
        if self.commit_linger_us > MAX_COMMIT_LINGER_US {
            return err("commit_linger_us", "must be at most 100000 (100 ms): a commit waits this long before it is sent");
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return err("redis_url", "must be a redis:// or rediss:// URL");
        }
        Ok(())
    }

    pub fn on_store_error(&self, tenant: &str) -> OnStoreError {
        self.tenants.get(tenant).and_then(|t| t.on_store_error).unwrap_or(self.on_store_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_linger_past_100_ms_is_refused_by_name() {
        let ok = LimitsConfig { commit_linger_us: 100_000, ..LimitsConfig::default() };
        assert!(ok.validate().is_ok());
        let e = LimitsConfig { commit_linger_us: 100_001, ..LimitsConfig::default() }.validate().expect_err("refused");
        assert!(matches!(&e, LimitsError::Config { key, .. } if key == "limits.commit_linger_us"), "{e:?}");
    }
}
