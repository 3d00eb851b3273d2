//! Dedupe snapshots: each partition's bloom slices persisted to ClickHouse
//! (`dedupe_snapshots`) after a flush is durable, and the assignment-time
//! rebuild that loads the newest one and reads only the keys written after it.
//!
//! # Why
//!
//! Without a snapshot, assignment reads every key the partition wrote in the
//! dedupe window from `events` and hashes each into a bloom slice: at 10
//! million keys that is most of a minute before the partition's first flush
//! (`bench/src/bin/assign-bench.rs` measures it). A snapshot is read as a
//! few large byte strings, and the keys after it are the few minutes since.
//!
//! # What a snapshot claims, and why assignment stays exact
//!
//! A snapshot of partition p with `covers_offset` C claims: *every event of p
//! in `events` at an offset at or below C has its key in the snapshot's
//! slices* (or in a slice that has since left the window). It is written only
//! after a flush reached its commit stage, that is with the flush's events and
//! every rollup marker in ClickHouse, from the in-memory state at that moment,
//! with C the last offset of p's last durable flush (this one or an earlier
//! one). The state then holds the key of every record of p at or below C:
//! keys loaded at assignment, and keys decided since (a key enters the state
//! when it is decided, before it is written, and flushes are written in the
//! order they were decided).
//! It may hold keys that are *not* in `events` (a refused insert's records, a
//! flush cut short before a crash, the flush decided behind the one just
//! written while flushes overlap, past C): for those a slice answers `Maybe`, and the
//! exact look-up in ClickHouse finds them new, so an extra key costs one
//! look-up, never an event. The one thing that would double count is a
//! snapshot missing a written key at or below C; that is what the order above
//! rules out.
//!
//! On assignment: the newest whole snapshot, then every key of p at an offset
//! past C written since the snapshot's `written_at` less an hour (the slack
//! the rollup repair also allows for clock skew between aggregator hosts),
//! whoever wrote it. The crash points:
//!
//! - **After a flush's data, before its snapshot** (or a snapshot the
//!   interval skipped): the snapshot is older than the data; the keys past C
//!   are read from `events` on assignment.
//! - **During the snapshot insert**: one snapshot is one row, and a body cut
//!   short commits whole rows only, so the row is there or it is not; a
//!   payload that reads back shorter than written, or does not parse, is not
//!   used (a full rebuild instead). The previous snapshot stays until a whole
//!   newer row replaces it.
//! - **After the snapshot, before the next flush's data** (or with that data
//!   cut short): the records after C are read again from Kafka and decided
//!   against the snapshot plus the keys past C that did land: a key the
//!   snapshot holds answers `Maybe` and the look-up says whether it landed.
//!
//! The recent exact map is not persisted: a recent key answers `Maybe` after
//! an assignment, which costs a look-up and nothing else.
//!
//! # Format and size
//!
//! `MLDS`, format `1` (u8), `slice_secs` (i64), slice count (u32), then per
//! slice: start (i64), keys inserted (u64), filter length (u32) and the
//! filter as `bloomfilter` serializes it (its hash count, seed and bitmap);
//! integers little-endian. A payload written with another `slice_secs`, or
//! that does not parse to its last byte, is not used. The size is the
//! slices', whatever the keys: at most `window / slice + 1` slices of
//! `expected_keys_per_slice` keys at the configured rate (about 3.4 MB each,
//! 20 MB per partition at the defaults). The replacing engine keeps one row
//! per partition once parts merge. After each flush at most one partition is
//! snapshotted: one flushed past its last snapshot, which is at least
//! `dedupe.snapshot_interval_secs` old (default 5 minutes), the oldest first;
//! so a flush pays for one partition's slices at most (after a rebalance the
//! partitions take turns instead of all writing at once). A snapshot taken
//! after a flush that did not touch the partition covers the partition's last
//! flush: its state holds every key at or below it (and perhaps keys decided
//! since, which is safe as above). A failed
//! snapshot write is logged and tried again after the next flush, never
//! holding the pipeline.

use bloomfilter::Bloom;
use meterline_clickhouse::{Blob, ClickHouseError, SnapshotRow, Store};
use meterline_domain::key_hash;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use crate::AggregatorError;
use crate::config::DedupeConfig;
use crate::dedupe::PartitionDedupe;
use crate::metrics;
use crate::partitions::Partitions;

const MAGIC: &[u8; 4] = b"MLDS";
const FORMAT: u8 = 1;

/// Slack on `written_at` when reading the keys written after a snapshot, for
/// clock skew between aggregator hosts (as the rollup repair allows).
const WRITTEN_AT_SLACK_SECS: i64 = 3_600;

/// Tests only: with this variable set, the aggregator stops making progress
/// right after writing a snapshot, for the test to SIGKILL it there.
const HANG_AFTER_SNAPSHOT: &str = "METERLINE_TEST_AGGREGATOR_HANG_AFTER_SNAPSHOT";

/// Where a partition's rebuilt dedupe state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A snapshot covering offsets up to `covers`, written at `written_at`.
    Snapshot { covers: i64, written_at: i64 },
    /// Every key in the window, read from `events`.
    Events,
}

/// A partition's dedupe state, rebuilt on assignment.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) dedupe: PartitionDedupe,
    pub(crate) source: Source,
    /// Keys read from `events` (after the snapshot, or all of them).
    pub(crate) keys_read: usize,
}

impl Loaded {
    /// The snapshot it came from (when written, last offset covered), if it did.
    pub(crate) fn snapshot(&self) -> Option<(i64, i64)> {
        match self.source {
            Source::Snapshot { covers, written_at } => Some((written_at, covers)),
            Source::Events => None,
        }
    }
}

/// The partition's slices in the snapshot format.
pub(crate) fn encode(dedupe: &PartitionDedupe, slice_secs: i64) -> Vec<u8> {
    let slices: Vec<(i64, usize, Vec<u8>)> = dedupe.slices().map(|(start, inserted, bloom)| (start, inserted, bloom.to_bytes())).collect();
    let mut out = Vec::with_capacity(17 + slices.iter().map(|s| 20 + s.2.len()).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&slice_secs.to_le_bytes());
    out.extend_from_slice(&(slices.len() as u32).to_le_bytes());
    for (start, inserted, bytes) in &slices {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&(*inserted as u64).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Why a stored snapshot is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unusable {
    NotASnapshot,
    OtherFormat(u8),
    OtherSliceSecs(i64),
    Truncated,
    BadFilter,
    TrailingBytes,
}

/// A reader over a payload that fails on running short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Unusable> {
        if self.0.len() < n {
            return Err(Unusable::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Unusable> {
        self.take(N)?.try_into().map_err(|_| Unusable::Truncated)
    }
}

/// The dedupe state a payload holds, under `config`.
pub(crate) fn decode(payload: &[u8], config: &DedupeConfig) -> Result<PartitionDedupe, Unusable> {
    let mut r = Reader(payload);
    if r.take(4)? != MAGIC {
        return Err(Unusable::NotASnapshot);
    }
    let [format] = r.array::<1>()?;
    if format != FORMAT {
        return Err(Unusable::OtherFormat(format));
    }
    // Slices are aligned to `slice_secs`: another length would not line up
    // with the slices new keys go to, nor expire at the right time.
    let slice_secs = i64::from_le_bytes(r.array()?);
    if slice_secs != config.slice_secs {
        return Err(Unusable::OtherSliceSecs(slice_secs));
    }
    let count = u32::from_le_bytes(r.array()?);
    let mut dedupe = PartitionDedupe::new(config);
    for _ in 0..count {
        let start = i64::from_le_bytes(r.array()?);
        let inserted = u64::from_le_bytes(r.array()?);
        let len = u32::from_le_bytes(r.array()?) as usize;
        let bloom = Bloom::from_slice(r.take(len)?).map_err(|_| Unusable::BadFilter)?;
        dedupe.restore_slice(start, usize::try_from(inserted).unwrap_or(usize::MAX), bloom);
    }
    if !r.0.is_empty() {
        return Err(Unusable::TrailingBytes);
    }
    Ok(dedupe)
}

/// Rebuilds a newly assigned partition's dedupe state: from its newest whole
/// snapshot and the keys written after it, or (no usable snapshot, or
/// snapshots off) from every key in the window.
pub(crate) async fn rebuild(store: &Store, config: &DedupeConfig, topic: &str, partition: i32, now: i64) -> Result<Loaded, AggregatorError> {
    let started = Instant::now();
    let window_since = (now - config.window_secs).max(0);
    let mut keys_read = 0usize;
    if config.snapshots
        && let Some(row) = store.latest_snapshot(topic, partition).await?
    {
        match decode(&row.payload.0, config) {
            Ok(mut dedupe) => {
                let since = window_since.max(i64::from(row.written_at) - WRITTEN_AT_SLACK_SECS);
                store
                    .keys_after(topic, partition, row.covers_offset, u32::try_from(since).unwrap_or(0), |k| {
                        dedupe.insert(key_hash(&k.tenant, &k.idempotency_key), k.fingerprint, i64::from(k.written_at), now);
                        keys_read += 1;
                    })
                    .await?;
                dedupe.expire(now);
                metrics::partition_loaded("snapshot", started.elapsed().as_secs_f64());
                let source = Source::Snapshot { covers: row.covers_offset, written_at: i64::from(row.written_at) };
                return Ok(Loaded { dedupe, source, keys_read });
            }
            Err(reason) => {
                tracing::warn!(partition, ?reason, covers = row.covers_offset, "dedupe snapshot not usable; rebuilding from every key in the window");
            }
        }
    }
    let mut dedupe = PartitionDedupe::new(config);
    store
        .keys_since(topic, partition, u32::try_from(window_since).unwrap_or(0), |k| {
            dedupe.insert(key_hash(&k.tenant, &k.idempotency_key), k.fingerprint, i64::from(k.written_at), now);
            keys_read += 1;
        })
        .await?;
    metrics::partition_loaded("events", started.elapsed().as_secs_f64());
    Ok(Loaded { dedupe, source: Source::Events, keys_read })
}

/// After a flush is durable (every stage through the rollup markers):
/// records how far each partition it covered is flushed (`commits` holds
/// the next offsets), and writes at most one snapshot, of the partition
/// `Partitions::snapshot_due` picks, so that one flush never pays for more
/// than one partition's slices.
pub(crate) async fn after_flush(store: &Store, topic: &str, config: &DedupeConfig, partitions: &mut Partitions, commits: &BTreeMap<i32, i64>, now: i64) {
    if !config.snapshots {
        return;
    }
    for (p, next) in commits {
        if let Some(state) = partitions.get_mut(*p) {
            state.flushed_through = Some(next - 1);
        }
    }
    let Some((p, covers)) = partitions.snapshot_due(now, config.snapshot_interval_secs) else { return };
    let Some(state) = partitions.get_mut(p) else { return };
    let started = Instant::now();
    match write(store, topic, p, covers, &state.dedupe, config.slice_secs, now).await {
        Ok(bytes) => {
            state.snapshot_at = Some(now);
            state.snapshot_covers = Some(covers);
            metrics::snapshot_written(p, bytes, started.elapsed().as_secs_f64());
            tracing::info!(partition = p, covers, bytes, ms = started.elapsed().as_millis() as u64, "dedupe snapshot written");
            hang_if_asked(p).await;
        }
        Err(e) => {
            metrics::snapshot_failed();
            tracing::warn!(error = %e, partition = p, "cannot write the dedupe snapshot; trying again after the next flush");
        }
    }
}

/// Writes one snapshot row of `dedupe` covering offsets up to `covers`; its size in bytes.
async fn write(store: &Store, topic: &str, partition: i32, covers: i64, dedupe: &PartitionDedupe, slice_secs: i64, now: i64) -> Result<usize, ClickHouseError> {
    let payload = encode(dedupe, slice_secs);
    let bytes = payload.len();
    let row = SnapshotRow {
        kafka_topic: topic.to_owned(),
        kafka_partition: partition,
        covers_offset: covers,
        keys: dedupe.keys() as u64,
        payload_bytes: bytes as u64,
        payload: Blob(payload),
        written_at: u32::try_from(now).unwrap_or(0),
        version: u64::try_from(covers.saturating_add(1)).unwrap_or(0),
    };
    store.insert_snapshot(&row).await?;
    Ok(bytes)
}

/// The test-only crash point: stops here for good, for the test to SIGKILL.
async fn hang_if_asked(partition: i32) {
    static ASKED: OnceLock<bool> = OnceLock::new();
    if *ASKED.get_or_init(|| std::env::var_os(HANG_AFTER_SNAPSHOT).is_some()) {
        tracing::error!(partition, "{HANG_AFTER_SNAPSHOT} is set: stopping after the snapshot, waiting to be killed");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::Known;

    #[test]
    fn a_snapshot_round_trips_every_slice() {
        let config = crate::testing::dedupe_config(10_000);
        let now = 1_800_000_000;
        let mut d = PartitionDedupe::new(&config);
        for k in 0..3_000u128 {
            d.insert(k, 7, now - (k as i64 % 3) * 8 * 86_400, now);
        }
        let payload = encode(&d, config.slice_secs);
        let back = decode(&payload, &config).expect("decodes");
        assert_eq!(back.keys(), 3_000);
        assert_eq!(back.slices().count(), 3);
        assert!((0..3_000u128).all(|k| back.check(k) == Known::Maybe), "every key held, as a bloom positive");
        let positives = (1_000_000..1_010_000u128).filter(|k| back.check(*k) != Known::New).count();
        assert!(positives < 300, "{positives} false positives in 10k");
    }

    #[test]
    fn a_damaged_or_foreign_payload_is_not_used() {
        let config = crate::testing::dedupe_config(1_000);
        let mut d = PartitionDedupe::new(&config);
        d.insert(1, 1, 1_800_000_000, 1_800_000_000);
        let payload = encode(&d, config.slice_secs);
        assert_eq!(decode(&payload[..payload.len() - 1], &config).err(), Some(Unusable::Truncated));
        let mut longer = payload.clone();
        longer.push(0);
        assert_eq!(decode(&longer, &config).err(), Some(Unusable::TrailingBytes));
        assert_eq!(decode(b"nope", &config).err(), Some(Unusable::NotASnapshot));
        let other = DedupeConfig { slice_secs: 86_400, ..config.clone() };
        assert_eq!(decode(&payload, &other).err(), Some(Unusable::OtherSliceSecs(config.slice_secs)));
    }
}
