//! The connection (lazy, reconnecting, every call bounded in time), the scripts, and Redis errors as `LimitsError`.

use meterline_limits::LimitsError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, RedisError, Script};
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

/// One connection attempt; a Redis that is down answers no sooner.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One command's answer on an open connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// A whole call, reconnecting included: a call never waits longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("scripts/common.lua"), "\n", include_str!(concat!("scripts/", $file)))))
    };
}

pub(crate) static ADMIT: LazyLock<Script> = script!("admit.lua");
pub(crate) static BALANCES: LazyLock<Script> = script!("balances.lua");
pub(crate) static COMMIT: LazyLock<Script> = script!("commit.lua");
pub(crate) static RELEASE: LazyLock<Script> = script!("release.lua");
pub(crate) static APPLY: LazyLock<Script> = script!("apply.lua");

type Result<T> = std::result::Result<T, LimitsError>;

/// The limits store over one Redis (a server or a cluster's entry point).
/// Cheap to clone: clones share the connection.
#[derive(Clone, Debug)]
pub struct RedisLimits {
    con: ConnectionManager,
}

impl RedisLimits {
    /// Sets up the connection without waiting for Redis: it connects on the
    /// first call, and reconnects on its own after a failure. While Redis is
    /// unreachable each call fails with `LimitsError::Unavailable` within a
    /// few seconds. Needs a Tokio runtime.
    pub async fn connect(url: &str) -> Result<RedisLimits> {
        let client = redis::Client::open(url).map_err(|e| LimitsError::Config { key: "redis.url".into(), message: e.to_string() })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let con = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| LimitsError::Config { key: "redis".into(), message: e.to_string() })?;
        Ok(RedisLimits { con })
    }

    /// `PING`: for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut con = self.con.clone();
        bounded(cmd.query_async(&mut con)).await
    }

    /// Runs a pipeline of commands (of one tenant's keys) in one round trip.
    pub(crate) async fn pipeline<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let mut con = self.con.clone();
        bounded(pipe.query_async(&mut con)).await
    }

    /// Runs a script; `key` (one of the tenant's keys) routes it to the tenant's slot.
    pub(crate) async fn script<T: FromRedisValue>(&self, script: &Script, key: &str, args: &[String]) -> Result<T> {
        let mut con = self.con.clone();
        let mut call = script.key(key);
        for a in args {
            call.arg(a);
        }
        bounded(call.invoke_async(&mut con)).await
    }
}

async fn bounded<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(classify),
        Err(_) => Err(LimitsError::Unavailable { message: format!("redis: no answer within {} s", CALL_TIMEOUT.as_secs()), source: None }),
    }
}

/// A script's own `MLCORRUPT` error is a bad record; anything else is the
/// store failing (connection, timeout, a refused command), retryable.
fn classify(e: RedisError) -> LimitsError {
    if e.code() == Some("MLCORRUPT") {
        let detail = e.detail().unwrap_or_default();
        let (key, message) = detail.split_once(": ").unwrap_or((detail, "unreadable"));
        return LimitsError::Corrupt { key: key.to_owned(), message: message.to_owned() };
    }
    LimitsError::unavailable(format!("redis: {e}"), e)
}
