//! The connection to ClickHouse: version detection, migrations, the inserts
//! of a flush, and the reads that rebuild a partition's progress and dedupe
//! state. Statements come from [`statements`](crate::statements) with their
//! binds; values are only ever bound.

use clickhouse::Client;
use clickhouse::query::Query;
use meterline_domain::{AlertRow, EventRow, key_hash};
use meterline_sql::{Sql, Value};
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::time::Duration;

use crate::config::ClickHouseConfig;
use crate::error::ClickHouseError;
use crate::migrations::{MIGRATIONS, MIGRATIONS_TABLE_DDL};
use crate::statements::{self, Range, Rollup};

/// Slack on `written_at` when scanning for raw rows a crash left without
/// rollups, so that clock skew between aggregator hosts cannot hide them.
const WRITTEN_AT_SLACK_SECS: u32 = 3_600;

/// Largest number of keys in one exact look-up query.
const LOOKUP_CHUNK: usize = 500;

/// One row of `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct DeadLetterRow {
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub reason: String,
    /// The message key and payload, hex-encoded (they may be any bytes).
    pub message_key: String,
    pub payload: String,
    pub written_at: u32,
}

/// A written key, as the dedupe rebuild reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clickhouse::Row)]
pub struct KeyRow {
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: u64,
    pub written_at: u32,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct MarkerRow {
    offset: i64,
    written_at: u32,
    marker_count: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct LandedRow {
    kafka_partition: i32,
    last_offset: i64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct OrphanRow {
    last_offset: i64,
    orphans: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
pub(crate) struct LookupRow {
    pub(crate) tenant: String,
    pub(crate) idempotency_key: String,
    pub(crate) fingerprint: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct KeyingUpgradeRow {
    upgrades: u64,
    legacy_until: u32,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct WrittenRow {
    rows: u64,
    last: u32,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct UserSumRow {
    user_id: String,
    total: i64,
}

/// What ClickHouse says about one Kafka partition's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Highest offset covered by rollups (the last progress marker), if any.
    pub rollup_offset: Option<i64>,
    /// When that marker was written.
    pub marker_written_at: u32,
}

impl Progress {
    /// The `written_at` bound for a repair scan: the marker's time, less the
    /// slack for clock skew between aggregator hosts.
    pub fn repair_since(self) -> u32 {
        self.marker_written_at.saturating_sub(WRITTEN_AT_SLACK_SECS)
    }
}

/// A statement with its values bound, ready to run.
pub fn bind(client: &Client, sql: &Sql) -> Query {
    let mut q = client.query(&sql.text);
    for b in &sql.binds {
        q = match b {
            Value::Str(s) => q.bind(s.as_str()),
            Value::Int(n) => q.bind(*n),
            Value::Strs(list) => q.bind(list),
        };
    }
    q
}

/// Server-side limits on every statement a client sends: ClickHouse stops a
/// statement past them (TIMEOUT_EXCEEDED, MEMORY_LIMIT_EXCEEDED) instead of
/// letting one heavy read take the server's cores and memory from the
/// aggregator's inserts. Both settings exist on 18.16 and current servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// `max_execution_time`, in seconds.
    pub max_execution_secs: u64,
    /// `max_memory_usage`, in bytes.
    pub max_memory_bytes: u64,
}

/// The ClickHouse store.
#[derive(Clone)]
pub struct Store {
    client: Client,
    timeout: Duration,
    pub server_version: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("server_version", &self.server_version).finish_non_exhaustive()
    }
}

/// The client for `config`, tuned to the server's version: schema validation
/// (RowBinaryWithNamesAndTypes) needs a server from the last few years, so it
/// is used where the server has it and turned off for older servers (18.16).
pub async fn connect(config: &ClickHouseConfig) -> Result<Store, ClickHouseError> {
    let base = Client::default()
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_database(&config.database)
        .with_validation(false);
    let version: String = base.query(statements::SERVER_VERSION).fetch_one().await?;
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    let client = if major >= 24 { base.with_validation(true) } else { base };
    Ok(Store { client, timeout: Duration::from_millis(config.request_timeout_ms), server_version: version })
}

impl Store {
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This store with `limits` sent as settings on every statement. The
    /// client is cloned, not shared: the aggregator's writes keep theirs.
    pub fn with_read_limits(&self, limits: ReadLimits) -> Store {
        let client = self
            .client
            .clone()
            .with_setting("max_execution_time", limits.max_execution_secs.to_string())
            .with_setting("max_memory_usage", limits.max_memory_bytes.to_string());
        Store { client, ..self.clone() }
    }

    /// `sql` with its values bound.
    pub fn query(&self, sql: &Sql) -> Query {
        bind(&self.client, sql)
    }

    /// Applies the migrations this database has not seen, in order.
    pub async fn migrate(&self) -> Result<(), ClickHouseError> {
        self.client.query(MIGRATIONS_TABLE_DDL).execute().await?;
        let applied: Vec<u32> = self.client.query(statements::APPLIED_MIGRATIONS).fetch_all().await?;
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            for statement in m.statements {
                self.client.query(statement).execute().await?;
            }
            self.client.query(statements::RECORD_MIGRATION).bind(m.version).bind(m.name).execute().await?;
            tracing::info!(version = m.version, name = m.name, "applied ClickHouse migration");
        }
        Ok(())
    }

    /// True when the server answers.
    pub async fn ping(&self) -> bool {
        tokio::time::timeout(self.timeout, self.client.query(statements::PING).fetch_one::<u8>()).await.is_ok_and(|r| r.is_ok())
    }

    pub(crate) async fn insert<'v, T, R>(&self, table: &str, rows: &[R]) -> Result<(), ClickHouseError>
    where
        T: clickhouse::RowWrite,
        R: Borrow<T::Value<'v>> + Sync,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<T>(table).await?.with_timeouts(Some(self.timeout), Some(self.timeout));
        for row in rows {
            insert.write(row.borrow()).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Takes rows or references to them: a flush sends the rows it holds
    /// without copying each one first.
    pub async fn insert_events(&self, rows: &[impl Borrow<EventRow> + Sync]) -> Result<(), ClickHouseError> {
        self.insert::<EventRow, _>("events", rows).await
    }

    /// Rolls up the events in each (partition, after, up to] range written
    /// since `since`, with a progress marker per range: one atomic INSERT.
    pub async fn roll_up(&self, rollup: Rollup, topic: &str, ranges: &[Range], written_at: u32, since: u32) -> Result<(), ClickHouseError> {
        if ranges.is_empty() {
            return Ok(());
        }
        let sql = statements::rollups_from_events(rollup, topic, ranges, written_at, since);
        tokio::time::timeout(self.timeout, self.query(&sql).execute())
            .await
            .map_err(|_| ClickHouseError::TimedOut { what: "rollup insert", secs: self.timeout.as_secs() })??;
        Ok(())
    }

    pub async fn insert_alerts(&self, rows: &[AlertRow]) -> Result<(), ClickHouseError> {
        self.insert::<AlertRow, _>("alerts", rows).await
    }

    pub async fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> Result<(), ClickHouseError> {
        self.insert::<DeadLetterRow, _>("dead_letters", rows).await
    }

    /// The last progress marker of `partition`.
    pub async fn progress(&self, rollup: Rollup, topic: &str, partition: i32) -> Result<Progress, ClickHouseError> {
        let row: MarkerRow = self.query(&statements::progress(rollup, topic, partition)).fetch_one().await?;
        Ok(Progress {
            rollup_offset: (row.marker_count > 0).then_some(row.offset),
            marker_written_at: if row.marker_count > 0 { row.written_at } else { 0 },
        })
    }

    /// Per partition, the last offset of `ranges` already in `events`: after a
    /// failed (perhaps timed-out, perhaps cut-short) insert, what did land.
    pub async fn events_present(&self, topic: &str, ranges: &[Range]) -> Result<HashMap<i32, i64>, ClickHouseError> {
        let rows: Vec<LandedRow> = self.query(&statements::events_present(topic, ranges)).fetch_all().await?;
        Ok(rows.into_iter().map(|r| (r.kafka_partition, r.last_offset)).collect())
    }

    /// True when every range's progress marker is in `rollup`'s table (the
    /// rollup insert is atomic, so it is all of them or none).
    pub async fn markers_present(&self, rollup: Rollup, topic: &str, ranges: &[Range]) -> Result<bool, ClickHouseError> {
        let found: u64 = self.query(&statements::markers_present(rollup, topic, ranges)).fetch_one().await?;
        Ok(found as usize >= ranges.len())
    }

    /// The last offset of `partition`'s events past `progress`: written by a
    /// flush whose rollup insert did not happen.
    pub async fn orphans(&self, topic: &str, partition: i32, progress: Progress) -> Result<Option<i64>, ClickHouseError> {
        let sql = statements::orphans(topic, partition, progress.rollup_offset.unwrap_or(-1), progress.repair_since());
        let row: OrphanRow = self.query(&sql).fetch_one().await?;
        Ok((row.orphans > 0).then_some(row.last_offset))
    }

    /// Every key `partition` wrote since `since` (Unix seconds), streamed to `each`.
    pub async fn keys_since(&self, topic: &str, partition: i32, since: u32, mut each: impl FnMut(KeyRow)) -> Result<(), ClickHouseError> {
        let mut cursor = self.query(&statements::keys_since(topic, partition, since)).fetch::<KeyRow>()?;
        while let Some(row) = cursor.next().await? {
            each(row);
        }
        Ok(())
    }

    /// Events of one partition in `(after, up_to]`; see [`statements::events_between`].
    pub async fn events_between(&self, topic: &str, partition: i32, after: i64, up_to: i64, since: u32, limit: u64) -> Result<Vec<EventRow>, ClickHouseError> {
        Ok(self.query(&statements::events_between(topic, partition, after, up_to, since, limit)).fetch_all::<EventRow>().await?)
    }

    /// The fingerprints of those `keys` (tenant, idempotency key) already written.
    pub async fn lookup(&self, keys: &[(&str, &str)]) -> Result<HashMap<u128, u64>, ClickHouseError> {
        let mut found = HashMap::new();
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let mut by_tenant: HashMap<&str, Vec<&str>> = HashMap::new();
            for (tenant, key) in chunk {
                by_tenant.entry(tenant).or_default().push(key);
            }
            let sql = statements::lookup(by_tenant.iter().map(|(t, ks)| (*t, ks.as_slice())));
            for row in self.query(&sql).fetch_all::<LookupRow>().await? {
                found.insert(key_hash(&row.tenant, &row.idempotency_key), row.fingerprint);
            }
        }
        Ok(found)
    }

    /// Until when (Unix seconds) rows counted before `topic`'s keying upgrade
    /// stay in a dedupe window of `window_secs`; `None` when none do. The
    /// first call for a topic records the upgrade at `now`: every row
    /// written before it was counted under the user keying.
    pub async fn keying_upgrade(&self, topic: &str, window_secs: u32, now: u32) -> Result<Option<u32>, ClickHouseError> {
        let recorded: KeyingUpgradeRow = self.query(&statements::keying_upgrade(topic)).fetch_one().await?;
        let legacy_until = if recorded.upgrades > 0 {
            recorded.legacy_until
        } else {
            let written: WrittenRow = self.query(&statements::written_since(topic, now.saturating_sub(window_secs))).fetch_one().await?;
            let until = if written.rows > 0 { written.last.saturating_add(window_secs) } else { 0 };
            self.query(&statements::record_keying_upgrade(topic, now, until)).execute().await?;
            // Another aggregator may have recorded it at the same moment: the latest bound holds for both.
            let recorded: KeyingUpgradeRow = self.query(&statements::keying_upgrade(topic)).fetch_one().await?;
            recorded.legacy_until.max(until)
        };
        Ok((legacy_until > now).then_some(legacy_until))
    }

    /// The open alerts as stored.
    pub async fn open_alerts(&self) -> Result<Vec<AlertRow>, ClickHouseError> {
        Ok(self.client.query(statements::OPEN_ALERTS).fetch_all().await?)
    }

    /// A reconciliation's metered sum: one `total` (see [`statements::metered_sum`]).
    pub async fn metered_sum(&self, sql: &Sql) -> Result<i64, ClickHouseError> {
        Ok(self.query(sql).fetch_one::<i64>().await?)
    }

    /// Per-user sums for the runaway rules (see [`statements::user_sums`]).
    pub async fn user_sums(&self, sql: &Sql) -> Result<HashMap<String, i64>, ClickHouseError> {
        let rows: Vec<UserSumRow> = self.query(sql).fetch_all().await?;
        Ok(rows.into_iter().map(|r| (r.user_id, r.total)).collect())
    }
}
