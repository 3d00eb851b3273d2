//! Dedupe snapshots: the statements and store calls that persist one Kafka
//! partition's serialized bloom slices (`dedupe_snapshots`, migration 8) and
//! read back the newest one, plus the read of the keys written after it.
//!
//! The payload is opaque here (the aggregator's `snapshot.rs` owns its
//! format); this file only moves it. One snapshot is one row: ClickHouse
//! 18.16 may commit an insert body cut short at a row boundary, and a single
//! row is all there or absent, never a mix of two snapshots' slices.

use meterline_sql::{Sql, i, s};
use serde::{Deserialize, Serialize};

use crate::error::ClickHouseError;
use crate::store::{KeyRow, Store};

/// Bytes sent and read as a ClickHouse `String` (RowBinary length-prefixed), not as a sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Blob, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Blob, E> {
                Ok(Blob(v.as_bytes().to_vec()))
            }
        }
        deserializer.deserialize_byte_buf(Bytes)
    }
}

/// One row of `dedupe_snapshots`: a partition's dedupe state holding every
/// key of its events at offsets up to `covers_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct SnapshotRow {
    pub kafka_topic: String,
    pub kafka_partition: i32,
    /// Every event of this partition at or below this offset has its key in `payload`.
    pub covers_offset: i64,
    /// Keys inserted into the slices (for operators; the payload carries its own).
    pub keys: u64,
    /// `payload`'s length as written: a row whose payload reads back shorter is not used.
    pub payload_bytes: u64,
    pub payload: Blob,
    /// When it was written (Unix seconds): bounds the scan for keys written after it.
    pub written_at: u32,
    /// The replacing engine keeps the highest: `covers_offset + 1` (offsets only grow).
    pub version: u64,
}

/// The newest snapshot of a partition whose payload is whole.
pub fn latest_snapshot(topic: &str, partition: i32) -> Sql {
    let mut sql = Sql::new(
        "SELECT ?fields FROM dedupe_snapshots WHERE kafka_topic = ? AND kafka_partition = ? \
         AND length(payload) = payload_bytes ORDER BY version DESC, written_at DESC LIMIT 1",
    );
    sql.binds.extend([s(topic), i(i64::from(partition))]);
    sql
}

/// The keys a partition wrote after offset `after` and since `since` (Unix seconds).
pub fn keys_after(topic: &str, partition: i32, after: i64, since: u32) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM events WHERE kafka_topic = ? AND kafka_partition = ? AND kafka_offset > ? AND written_at >= ?");
    sql.binds.extend([s(topic), i(i64::from(partition)), i(after), i(i64::from(since))]);
    sql
}

impl Store {
    /// Writes one snapshot row.
    pub async fn insert_snapshot(&self, row: &SnapshotRow) -> Result<(), ClickHouseError> {
        self.insert::<SnapshotRow, _>("dedupe_snapshots", std::slice::from_ref(row)).await
    }

    /// The newest whole snapshot of `partition`, if any.
    pub async fn latest_snapshot(&self, topic: &str, partition: i32) -> Result<Option<SnapshotRow>, ClickHouseError> {
        Ok(self.query(&latest_snapshot(topic, partition)).fetch_optional::<SnapshotRow>().await?)
    }

    /// Every key `partition` wrote after offset `after` and since `since`, streamed to `each`.
    pub async fn keys_after(&self, topic: &str, partition: i32, after: i64, since: u32, mut each: impl FnMut(KeyRow)) -> Result<(), ClickHouseError> {
        let mut cursor = self.query(&keys_after(topic, partition, after, since)).fetch::<KeyRow>()?;
        while let Some(row) = cursor.next().await? {
            each(row);
        }
        Ok(())
    }
}
