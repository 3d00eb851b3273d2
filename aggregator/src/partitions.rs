//! Per-partition state: assignment, position, buffered records, dedupe state, and the pause decisions that keep memory bounded.

use meterline_schemas::wire::{self, Envelope};
use std::collections::BTreeMap;

use crate::config::DedupeConfig;
use crate::dedupe::{Known, PartitionDedupe};
use meterline_domain::key_hash;

/// The spare records' room a partition's buffer keeps after a flush takes
/// from it, at least (it keeps up to twice what it still holds beyond that).
const SPARE_RECORDS: usize = 4_096;

/// Gives back a buffer's room beyond what it holds and the spare. A
/// catch-up after a restart fills the buffers to `max_buffered_events` and a
/// `Vec` keeps its largest capacity for good: at a few hundred bytes a
/// record, that room stayed allocated for the life of the process, the
/// aggregator's step at a restart in the soak (bench/SOAK.md).
fn shrink_spare(buffer: &mut Vec<Buffered>) {
    let keep = (2 * buffer.len()).max(SPARE_RECORDS);
    if buffer.capacity() > 2 * keep {
        buffer.shrink_to(keep);
    }
}

/// A partition's assignment change, recorded by the rebalance callbacks and
/// acted on by the loop between polls.
#[derive(Debug)]
pub(crate) enum Change {
    Assign(Vec<i32>),
}

/// A record taken off the topic, waiting for the next flush.
#[derive(Debug)]
pub(crate) struct Buffered {
    pub(crate) offset: i64,
    pub(crate) key: Vec<u8>,
    /// The envelope, or why it could not be decoded and the bytes that could not.
    pub(crate) decoded: Result<Decoded, (String, Vec<u8>)>,
}

/// A decoded record, with what the flush's decision reads of it more than
/// once, computed once: its key hash, and what its partition's dedupe state
/// knew of that key when the flush checked it.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) envelope: Envelope,
    /// `key_hash(tenant, idempotency key)`.
    pub(crate) hash: u128,
    /// The dedupe state's answer, once `Partitions::check` asked it (the
    /// state does not change between that check and the decision).
    pub(crate) known: Option<Known>,
}

impl Buffered {
    /// Decodes one record; one that cannot be decoded keeps its bytes for `dead_letters`.
    pub(crate) fn decode(offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) -> Buffered {
        let key = key.unwrap_or_default().to_vec();
        match payload {
            None => Buffered { offset, key, decoded: Err(("record has no payload".to_owned(), Vec::new())) },
            Some(bytes) => match wire::decode(bytes) {
                Ok(envelope) => Buffered::new(offset, key, envelope),
                Err(e) => Buffered { offset, key, decoded: Err((e.to_string(), bytes.to_vec())) },
            },
        }
    }

    /// A record that decoded to `envelope`.
    pub(crate) fn new(offset: i64, key: Vec<u8>, envelope: Envelope) -> Buffered {
        let hash = key_hash(&envelope.tenant, &envelope.event.idempotency_key);
        Buffered { offset, key, decoded: Ok(Decoded { envelope, hash, known: None }) }
    }
}

/// One assigned partition.
#[derive(Debug)]
pub(crate) struct PartitionState {
    /// Positioned and its dedupe state loaded: records may be taken.
    pub(crate) ready: bool,
    pub(crate) paused: bool,
    /// Records below this offset were already taken; refetches are ignored.
    pub(crate) next_offset: i64,
    pub(crate) buffer: Vec<Buffered>,
    pub(crate) dedupe: PartitionDedupe,
    /// When its dedupe state was last snapshotted (Unix seconds), if it was (`snapshot.rs`).
    pub(crate) snapshot_at: Option<i64>,
    /// The last offset the newest snapshot covers, if there is one.
    pub(crate) snapshot_covers: Option<i64>,
    /// The last offset of its last durable flush: what a snapshot taken
    /// after it covers (its dedupe state holds every key up to there).
    pub(crate) flushed_through: Option<i64>,
}

/// Every assigned partition's state.
#[derive(Debug, Default)]
pub(crate) struct Partitions {
    states: BTreeMap<i32, PartitionState>,
}

impl Partitions {
    /// A newly assigned partition: paused, not ready, nothing buffered.
    pub(crate) fn assign(&mut self, partition: i32, dedupe: &DedupeConfig) {
        self.states.insert(
            partition,
            PartitionState {
                ready: false,
                paused: true,
                next_offset: 0,
                buffer: Vec::new(),
                dedupe: PartitionDedupe::new(dedupe),
                snapshot_at: None,
                snapshot_covers: None,
                flushed_through: None,
            },
        );
    }

    /// Forgets a revoked partition, its buffer and its dedupe state.
    pub(crate) fn revoke(&mut self, partition: i32) {
        self.states.remove(&partition);
    }

    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    pub(crate) fn get_mut(&mut self, partition: i32) -> Option<&mut PartitionState> {
        self.states.get_mut(&partition)
    }

    /// Partitions assigned but not yet loaded.
    pub(crate) fn loading(&self) -> Vec<i32> {
        self.states.iter().filter(|(_, s)| !s.ready).map(|(p, _)| *p).collect()
    }

    /// Marks a loaded partition ready to take records from `start`, with the
    /// dedupe state rebuilt for it and the snapshot it came from (when
    /// written, last offset covered), if it did.
    pub(crate) fn ready(&mut self, partition: i32, start: i64, dedupe: PartitionDedupe, snapshot: Option<(i64, i64)>) -> Option<&PartitionState> {
        let state = self.states.get_mut(&partition)?;
        state.ready = true;
        state.next_offset = start;
        state.buffer.clear();
        state.dedupe = dedupe;
        state.snapshot_at = snapshot.map(|s| s.0);
        state.snapshot_covers = snapshot.map(|s| s.1);
        state.flushed_through = None;
        Some(state)
    }

    /// The partition to snapshot next, if any: flushed past its last
    /// snapshot, which is at least `interval` old (or missing); the one
    /// snapshotted longest ago (never first), so that one snapshot per flush
    /// reaches every partition in turn.
    pub(crate) fn snapshot_due(&self, now: i64, interval: i64) -> Option<(i32, i64)> {
        self.states
            .iter()
            .filter(|(_, s)| s.ready && s.snapshot_at.is_none_or(|at| now - at >= interval))
            .filter_map(|(p, s)| s.flushed_through.filter(|f| s.snapshot_covers.is_none_or(|c| *f > c)).map(|f| (*p, f, s.snapshot_at)))
            .min_by_key(|(_, _, at)| *at)
            .map(|(p, f, _)| (p, f))
    }

    /// Keeps one record in its partition's buffer. False when it is not
    /// kept: the partition is not ours or not positioned yet, or the record
    /// is a refetch of one already taken.
    pub(crate) fn take(&mut self, partition: i32, offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) -> bool {
        let Some(state) = self.states.get_mut(&partition) else { return false };
        if !state.ready || offset < state.next_offset {
            return false;
        }
        state.next_offset = offset + 1;
        state.buffer.push(Buffered::decode(offset, key, payload));
        true
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffered_in(None)
    }

    /// Records buffered in `only` these partitions, or in all.
    pub(crate) fn buffered_in(&self, only: Option<&[i32]>) -> usize {
        self.states.iter().filter(|(p, _)| only.is_none_or(|o| o.contains(p))).map(|(_, s)| s.buffer.len()).sum()
    }

    /// How many records of each ready partition (of `only` these, or all)
    /// the next flush takes: up to `max` in all, in partition order.
    pub(crate) fn quota(&self, only: Option<&[i32]>, max: usize) -> BTreeMap<i32, usize> {
        let mut quota = BTreeMap::new();
        let mut left = max;
        for (p, state) in &self.states {
            if state.ready && !state.buffer.is_empty() && left > 0 && only.is_none_or(|o| o.contains(p)) {
                let n = state.buffer.len().min(left);
                quota.insert(*p, n);
                left -= n;
            }
        }
        quota
    }

    /// Asks each partition's dedupe state about every record of `quota`,
    /// once: the look-up below and the decision read the answer.
    pub(crate) fn check(&mut self, quota: &BTreeMap<i32, usize>) {
        for (p, n) in quota {
            let Some(state) = self.states.get_mut(p) else { continue };
            let dedupe = &state.dedupe;
            for b in state.buffer.iter_mut().take(*n) {
                if let Ok(d) = &mut b.decoded {
                    d.known = Some(dedupe.check(d.hash));
                }
            }
        }
    }

    /// The (tenant, idempotency key) of every record in `quota` that a bloom
    /// filter may hold (after `check`): they need an exact answer from ClickHouse.
    pub(crate) fn maybe_keys(&self, quota: &BTreeMap<i32, usize>) -> Vec<(&str, &str)> {
        self.keys_where(quota, |known| known == Known::Maybe)
    }

    /// The (tenant, idempotency key) of every record in `quota` that its
    /// partition's dedupe state does not know as seen (maybe or new, after
    /// `check`): during the keying upgrade all of them need an exact answer
    /// (`decide.rs`).
    pub(crate) fn unseen_keys(&self, quota: &BTreeMap<i32, usize>) -> Vec<(&str, &str)> {
        self.keys_where(quota, |known| !matches!(known, Known::Seen(_)))
    }

    fn keys_where(&self, quota: &BTreeMap<i32, usize>, wanted: impl Fn(Known) -> bool) -> Vec<(&str, &str)> {
        let mut keys = Vec::new();
        for (p, n) in quota {
            let Some(state) = self.states.get(p) else { continue };
            for b in state.buffer.iter().take(*n) {
                if let Ok(d) = &b.decoded
                    && wanted(d.known.unwrap_or_else(|| state.dedupe.check(d.hash)))
                {
                    keys.push((d.envelope.tenant.as_str(), d.envelope.event.idempotency_key.as_str()));
                }
            }
        }
        keys
    }

    /// Takes the records of `quota` out of their buffers.
    pub(crate) fn drain(&mut self, quota: &BTreeMap<i32, usize>) -> Vec<(i32, Vec<Buffered>)> {
        quota
            .iter()
            .filter_map(|(p, n)| {
                let state = self.states.get_mut(p)?;
                let n = (*n).min(state.buffer.len());
                let taken = state.buffer.drain(..n).collect();
                shrink_spare(&mut state.buffer);
                Some((*p, taken))
            })
            .collect()
    }

    /// What a partition's dedupe state knows of a key (`New` for a partition not held).
    pub(crate) fn known(&self, partition: i32, key: u128) -> Known {
        self.states.get(&partition).map_or(Known::New, |s| s.dedupe.check(key))
    }

    /// The partitions whose pause state should change: every partition is
    /// paused while `hold` (a write failing, or the buffers full) or while
    /// it is not ready, and fetching otherwise.
    pub(crate) fn pause_changes(&self, hold: bool) -> Vec<(i32, bool)> {
        self.states
            .iter()
            .filter_map(|(p, s)| {
                let want = hold || !s.ready;
                (want != s.paused).then_some((*p, want))
            })
            .collect()
    }

    pub(crate) fn set_paused(&mut self, partition: i32, paused: bool) {
        if let Some(state) = self.states.get_mut(&partition) {
            state.paused = paused;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DedupeConfig {
        crate::testing::dedupe_config(1_000)
    }

    #[test]
    fn records_are_taken_once_and_only_when_ready() {
        let mut ps = Partitions::default();
        ps.assign(0, &config());
        assert!(!ps.take(0, 5, None, Some(b"x")), "not positioned yet");
        assert!(!ps.take(1, 5, None, Some(b"x")), "not ours");
        ps.ready(0, 5, PartitionDedupe::new(&config()), None);
        assert!(!ps.take(0, 4, None, Some(b"x")), "before the position");
        assert!(ps.take(0, 5, Some(b"k"), None));
        assert!(!ps.take(0, 5, None, Some(b"x")), "a refetch");
        assert!(ps.take(0, 6, None, Some(b"garbage")));
        assert_eq!(ps.buffered(), 2);
        let drained = ps.drain(&ps.quota(None, 10));
        let [(0, records)] = drained.as_slice() else { panic!("{drained:?}") };
        assert_eq!(records[0].decoded.as_ref().err().map(|e| e.0.as_str()), Some("record has no payload"));
        assert_eq!(records[0].key, b"k");
        assert_eq!(records[1].decoded.as_ref().err().map(|e| e.1.clone()), Some(b"garbage".to_vec()));
        assert_eq!(ps.buffered(), 0);
    }

    #[test]
    fn the_quota_caps_a_flush_and_pauses_follow_hold_and_readiness() {
        let mut ps = Partitions::default();
        for p in [0, 1, 2] {
            ps.assign(p, &config());
        }
        for p in [0, 1] {
            ps.ready(p, 0, PartitionDedupe::new(&config()), None);
            for o in 0..3 {
                ps.take(p, o, None, None);
            }
        }
        assert_eq!(ps.quota(None, 4), BTreeMap::from([(0, 3), (1, 1)]));
        assert_eq!(ps.quota(Some(&[1]), 4), BTreeMap::from([(1, 3)]));
        assert_eq!(ps.buffered_in(Some(&[1, 2])), 3);
        // Assigned partitions start paused; ready ones resume unless held.
        assert_eq!(ps.pause_changes(false), vec![(0, false), (1, false)]);
        assert_eq!(ps.pause_changes(true), vec![]);
        ps.set_paused(0, false);
        assert_eq!(ps.pause_changes(true), vec![(0, true)]);
        ps.revoke(0);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps.loading(), vec![2]);
    }

    #[test]
    fn a_buffer_gives_back_the_room_of_a_catch_up() {
        let mut ps = Partitions::default();
        ps.assign(0, &config());
        ps.ready(0, 0, PartitionDedupe::new(&config()), None);
        for o in 0..100_000 {
            ps.take(0, o, None, None);
        }
        let capacity = |ps: &mut Partitions| ps.get_mut(0).map_or(0, |s| s.buffer.capacity());
        assert!(capacity(&mut ps) >= 100_000);
        ps.drain(&BTreeMap::from([(0, 90_000)]));
        let after = capacity(&mut ps);
        assert!((10_000..=4 * 10_000).contains(&after), "room for 10,000 records kept {after}");
        ps.drain(&BTreeMap::from([(0, 10_000)]));
        let after = capacity(&mut ps);
        assert!(after <= 4 * SPARE_RECORDS, "an empty buffer kept room for {after}");
        // A steady load does not reallocate at every flush.
        for o in 100_000..101_000 {
            ps.take(0, o, None, None);
        }
        let steady = capacity(&mut ps);
        ps.drain(&BTreeMap::from([(0, 1_000)]));
        assert_eq!(capacity(&mut ps), steady);
    }

    #[test]
    fn one_partition_is_due_for_a_snapshot_at_a_time_oldest_first() {
        let mut ps = Partitions::default();
        for p in [0, 1, 2] {
            ps.assign(p, &config());
        }
        ps.ready(0, 0, PartitionDedupe::new(&config()), Some((1_000, 9)));
        ps.ready(1, 0, PartitionDedupe::new(&config()), Some((1_100, 5)));
        ps.ready(2, 0, PartitionDedupe::new(&config()), None);
        assert_eq!(ps.snapshot_due(2_000, 300), None, "nothing flushed since the snapshots");
        let flushed = |ps: &mut Partitions, p: i32, through: i64| ps.get_mut(p).map(|s| s.flushed_through = Some(through));
        flushed(&mut ps, 0, 9);
        assert_eq!(ps.snapshot_due(2_000, 300), None, "flushed no further than the snapshot covers");
        flushed(&mut ps, 0, 12);
        flushed(&mut ps, 1, 7);
        assert_eq!(ps.snapshot_due(1_200, 300), None, "the interval has not passed");
        assert_eq!(ps.snapshot_due(2_000, 300), Some((0, 12)), "the oldest snapshot first");
        flushed(&mut ps, 2, 3);
        assert_eq!(ps.snapshot_due(2_000, 300), Some((2, 3)), "a partition never snapshotted before any other");
    }
}
