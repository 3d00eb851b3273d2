//! Per-partition dedupe state: an exact map of recent keys, and time-sliced
//! bloom filters over the whole window that prove most keys new.
//!
//! Design, per Kafka partition (a record is counted only on its key's home
//! partition, so every copy of an action, whatever it changes, is decided
//! where its first copy was: see `decide.rs`):
//!
//! - **Recent exact map**: key hash -> payload fingerprint for keys written in
//!   the last `recent_secs`, at most `max_recent_keys`. Client retries come
//!   seconds apart, so nearly all duplicates are caught here without I/O.
//! - **Bloom slices**: one bloom filter per `slice_secs` of processing time,
//!   kept until the slice is older than the window. A key absent from every
//!   slice is certainly new. A key present in some slice is only *maybe* seen:
//!   it is confirmed by an exact look-up in ClickHouse (batched per flush), so a
//!   false positive costs one look-up and never drops a new event.
//! - Why processing time bounds the window: ingest refuses events older than
//!   the window, so a retry accepted at time t carries an event time after
//!   t - window, and its first copy was written after that too.
//!
//! Memory is bounded and known: slices * bloom bytes (the configured
//! false-positive rate is split across the live slices, about 1.7 bytes per
//! key for 1% over seven slices) plus about 50 bytes per recent key, capped.
//!
//! The slices (not the recent map) are what a dedupe snapshot persists and
//! restores (`snapshot.rs`): a restored slice answers as it did when written.

use bloomfilter::Bloom;
use std::collections::{HashMap, VecDeque};

use crate::config::DedupeConfig;

/// What the state knows about a key before any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Seen, with this payload fingerprint.
    Seen(u64),
    /// A bloom slice holds it: ask ClickHouse.
    Maybe,
    /// Certainly never written.
    New,
}

struct Slice {
    start: i64,
    bloom: Bloom<u128>,
    inserted: usize,
}

/// The dedupe state of one partition.
pub struct PartitionDedupe {
    config: DedupeConfig,
    recent: HashMap<u128, u64>,
    recent_order: VecDeque<(i64, u128)>,
    slices: VecDeque<Slice>,
}

impl std::fmt::Debug for PartitionDedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionDedupe").field("recent", &self.recent.len()).field("slices", &self.slices.len()).finish()
    }
}

impl PartitionDedupe {
    pub fn new(config: &DedupeConfig) -> PartitionDedupe {
        PartitionDedupe { config: config.clone(), recent: HashMap::new(), recent_order: VecDeque::new(), slices: VecDeque::new() }
    }

    /// What is known of `key` without I/O.
    pub fn check(&self, key: u128) -> Known {
        if let Some(fp) = self.recent.get(&key) {
            return Known::Seen(*fp);
        }
        if self.slices.iter().any(|s| s.bloom.check(&key)) { Known::Maybe } else { Known::New }
    }

    /// Records a written key. `written_at` is processing time in Unix seconds.
    pub fn insert(&mut self, key: u128, fingerprint: u64, written_at: i64, now: i64) {
        let slice_start = written_at.div_euclid(self.config.slice_secs) * self.config.slice_secs;
        let at = match self.slices.iter().position(|s| s.start == slice_start) {
            Some(i) => i,
            None => {
                let bloom = Bloom::new_for_fp_rate(self.config.expected_keys_per_slice, self.slice_fp_rate())
                    .unwrap_or_else(|_| {
                        // Config validation keeps both parameters in range; a
                        // minimal filter would only raise the look-up rate.
                        Bloom::new(1024, 1).unwrap_or_else(|_| unreachable_bloom())
                    });
                self.slices.push_back(Slice { start: slice_start, bloom, inserted: 0 });
                self.slices.make_contiguous().sort_by_key(|s| s.start);
                self.slices.iter().position(|s| s.start == slice_start).unwrap_or(0)
            }
        };
        if let Some(slice) = self.slices.get_mut(at) {
            slice.bloom.set(&key);
            slice.inserted += 1;
        }
        if now - written_at <= self.config.recent_secs && self.recent.insert(key, fingerprint).is_none() {
            self.recent_order.push_back((written_at, key));
        }
        self.expire(now);
    }

    /// Forgets a key recorded as written that was not written after all (its
    /// events insert was refused). Only the recent map can forget; a bloom
    /// slice still holding it answers `Maybe`, and the exact look-up in
    /// ClickHouse then finds it new.
    pub fn forget(&mut self, key: u128) {
        if self.recent.remove(&key).is_some() {
            self.recent_order.retain(|(_, k)| *k != key);
        }
    }

    /// Drops recent keys past their time or count, and slices past the window.
    pub fn expire(&mut self, now: i64) {
        while let Some(&(at, key)) = self.recent_order.front() {
            if now - at > self.config.recent_secs || self.recent_order.len() > self.config.max_recent_keys {
                self.recent_order.pop_front();
                self.recent.remove(&key);
            } else {
                break;
            }
        }
        while let Some(first) = self.slices.front() {
            if first.start + self.config.slice_secs < now - self.config.window_secs {
                self.slices.pop_front();
            } else {
                break;
            }
        }
    }

    /// The false-positive rate of one slice. A key is checked against every
    /// live slice, so the configured rate is split across them to hold overall.
    fn slice_fp_rate(&self) -> f64 {
        let slices = (self.config.window_secs / self.config.slice_secs.max(1)) + 2;
        self.config.false_positive_rate / slices as f64
    }

    /// The bloom slices, oldest first, as (start, keys inserted, filter):
    /// what a snapshot persists (`snapshot.rs`). The recent map is left out:
    /// without it a recent key answers `Maybe`, and the exact look-up decides.
    pub(crate) fn slices(&self) -> impl Iterator<Item = (i64, usize, &Bloom<u128>)> {
        self.slices.iter().map(|s| (s.start, s.inserted, &s.bloom))
    }

    /// Puts back one slice read from a snapshot (replacing any slice with its start).
    pub(crate) fn restore_slice(&mut self, start: i64, inserted: usize, bloom: Bloom<u128>) {
        self.slices.retain(|s| s.start != start);
        self.slices.push_back(Slice { start, bloom, inserted });
        self.slices.make_contiguous().sort_by_key(|s| s.start);
    }

    /// Keys inserted into the live slices.
    pub(crate) fn keys(&self) -> usize {
        self.slices.iter().map(|s| s.inserted).sum()
    }

    /// Keys in the recent map.
    #[cfg(test)]
    pub fn recent_keys(&self) -> usize {
        self.recent.len()
    }

    /// Inserted keys over capacity, for the fullest slice (1.0 = at design capacity).
    pub fn fill_ratio(&self) -> f64 {
        let cap = self.config.expected_keys_per_slice.max(1) as f64;
        self.slices.iter().map(|s| s.inserted as f64 / cap).fold(0.0, f64::max)
    }

    /// Bytes held by bloom bitmaps and (approximately) the recent map.
    pub fn approx_bytes(&self) -> usize {
        let blooms: usize = self.slices.iter().map(|s| s.bloom.as_slice().len()).sum();
        // HashMap<u128, u64>: 24 bytes of entry plus control byte and load slack;
        // the order queue adds 24 more per key.
        blooms + self.recent.capacity() * 26 + self.recent_order.capacity() * 24
    }
}

#[allow(clippy::panic)]
fn unreachable_bloom() -> Bloom<u128> {
    panic!("a 1024-byte bloom filter for one item is always constructible")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DedupeConfig {
        crate::testing::dedupe_config(10_000)
    }

    #[test]
    fn recent_keys_are_exact_and_older_ones_need_a_lookup() {
        let mut d = PartitionDedupe::new(&config());
        let now = 1_800_000_000;
        assert_eq!(d.check(1), Known::New);
        d.insert(1, 11, now, now);
        assert_eq!(d.check(1), Known::Seen(11));
        d.expire(now + 601);
        assert_eq!(d.check(1), Known::Maybe, "past the recent window only the bloom remembers");
        d.expire(now + 43 * 86_400);
        assert_eq!(d.check(1), Known::New, "past the dedupe window the slice is gone");
    }

    #[test]
    fn a_forgotten_key_is_left_to_the_exact_lookup() {
        let mut d = PartitionDedupe::new(&config());
        let now = 1_800_000_000;
        d.insert(1, 11, now, now);
        d.insert(2, 22, now, now);
        d.forget(1);
        assert_eq!(d.check(1), Known::Maybe, "the bloom slice still holds it: ClickHouse decides");
        assert_eq!(d.check(2), Known::Seen(22));
        assert_eq!(d.recent_keys(), 1);
        d.insert(1, 12, now, now);
        assert_eq!(d.check(1), Known::Seen(12));
    }

    #[test]
    fn false_positive_rate_is_near_design_and_memory_is_bounded() {
        let mut d = PartitionDedupe::new(&config());
        let now = 1_800_000_000;
        for k in 0..10_000u128 {
            d.insert(k, 0, now - 7_200, now);
        }
        assert_eq!(d.recent_keys(), 0, "inserted two hours ago: bloom only");
        let positives = (1_000_000..1_100_000u128).filter(|k| d.check(*k) != Known::New).count();
        assert!(positives < 2_000, "{positives} false positives in 100k (design 1%)");
        assert!((d.fill_ratio() - 1.0).abs() < 1e-9);
        assert!(d.approx_bytes() < 20_000, "{} bytes for 10k keys", d.approx_bytes());
        let mut capped = PartitionDedupe::new(&config());
        for k in 0..5_000u128 {
            capped.insert(k, 0, now, now);
        }
        assert_eq!(capped.recent_keys(), 1_000);
    }
}
