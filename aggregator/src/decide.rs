//! The decision of a flush, pure (no I/O): each buffered record is a dead letter, a record to forward to its home partition, a duplicate or a new priced event, and each partition gets its rows, rollup range and commit.
//!
//! Exactness across partitions: under the `key` keying a record is counted
//! only on its key's home partition ([`home_partition`]), so the home
//! partition's dedupe state has seen every counted copy of the key, whatever
//! else the copies change; a record found elsewhere is forwarded there, never
//! counted where it sits. The only counted copies the home may not know are
//! those the `user` keying counted before the upgrade, on other partitions: a
//! set that no longer grows. While any of them is in the dedupe window the
//! caller looks up every key its dedupe state does not know as seen, and
//! `inputs.found` holds those already written anywhere.

use meterline_clickhouse::{DeadLetterRow, Range};
use meterline_domain::{Decision, EventRow, Source, fingerprint, price};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use meterline_schemas::wire::{Envelope, home_partition};
use std::collections::{BTreeMap, HashMap};

use crate::dedupe::Known;
use crate::forward::Forward;
use crate::partitions::{Buffered, Decoded};

/// The record a new event was made from: what a refused events insert writes
/// to `dead_letters` instead, as it came (its key, its wire encoding).
#[derive(Debug)]
pub(crate) struct Original {
    pub(crate) key: Vec<u8>,
    pub(crate) envelope: Envelope,
}

/// What one flush writes, as decided: per Kafka partition.
#[derive(Debug, Default)]
pub(crate) struct Flush {
    pub(crate) dead_letters: BTreeMap<i32, Vec<DeadLetterRow>>,
    /// New events, in offset order per partition.
    pub(crate) events: BTreeMap<i32, Vec<EventRow>>,
    /// The records `events` were made from, one for one.
    pub(crate) originals: BTreeMap<i32, Vec<Original>>,
    /// The offsets whose events this flush rolls up.
    pub(crate) ranges: BTreeMap<i32, Range>,
    /// The next offset to commit.
    pub(crate) commits: BTreeMap<i32, i64>,
    /// Per source partition, records to produce to their home partition
    /// before this flush records progress past them.
    pub(crate) forwards: BTreeMap<i32, Vec<Forward>>,
    pub(crate) written_at: u32,
}

/// What a decision reads besides the records and the dedupe state.
#[derive(Debug)]
pub(crate) struct Inputs<'a> {
    pub(crate) topic: &'a str,
    /// The flush's processing time, Unix seconds.
    pub(crate) written_at: u32,
    pub(crate) tenants: &'a KeyRing,
    pub(crate) catalog: &'a Catalog,
    /// The exact look-up's answer for the keys the dedupe state only maybe
    /// knows: key hash -> fingerprint of the copy already written.
    pub(crate) found: &'a HashMap<u128, u64>,
    pub(crate) placement: Placement,
}

/// Where a record may be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Where it sits (the `user` keying: exact only while copies keep their user).
    InPlace,
    /// Only on its key's home partition out of this many; elsewhere it is forwarded.
    Home { partitions: i32 },
}

/// A decided flush, and what the caller records of it.
#[derive(Debug)]
pub(crate) struct Decided {
    pub(crate) flush: Flush,
    /// Per partition, the keys this flush writes with their fingerprints, in
    /// record order: the dedupe state learns them.
    pub(crate) new_keys: BTreeMap<i32, Vec<(u128, u64)>>,
    /// Copies dropped with the first copy's payload.
    pub(crate) retries: u64,
    /// Copies dropped with a different payload: (tenant, idempotency key).
    pub(crate) conflicts: Vec<(String, String)>,
    /// Maybe-known keys the look-up found new.
    pub(crate) false_positives: u64,
}

/// Decides every record of `batches` (per partition, in offset order),
/// given what is `known` of each record's key on its partition and, for
/// the keys it only maybe knows, `inputs.found`. A key new to the dedupe
/// state is new unless an earlier record of the same batch wrote it.
pub(crate) fn decide(inputs: &Inputs<'_>, batches: Vec<(i32, Vec<Buffered>)>, known: impl Fn(i32, &Decoded) -> Known) -> Decided {
    let written_at = inputs.written_at;
    let mut decided = Decided {
        flush: Flush { written_at, ..Flush::default() },
        new_keys: BTreeMap::new(),
        retries: 0,
        conflicts: Vec::new(),
        false_positives: 0,
    };
    for (p, taken) in batches {
        let mut batch_new: HashMap<u128, u64> = HashMap::new();
        let mut new_keys = Vec::new();
        let mut rows = Vec::new();
        let mut originals = Vec::new();
        let mut dead = Vec::new();
        let last_offset = taken.last().map(|b| b.offset);
        for b in taken {
            let d = match b.decoded {
                Ok(d) => d,
                Err((reason, payload)) => {
                    dead.push(DeadLetterRow {
                        kafka_topic: inputs.topic.to_owned(),
                        kafka_partition: p,
                        kafka_offset: b.offset,
                        reason,
                        message_key: hex::encode(&b.key),
                        payload: hex::encode(payload),
                        written_at,
                    });
                    continue;
                }
            };
            let env = &d.envelope;
            if let Placement::Home { partitions } = inputs.placement {
                let home = home_partition(&env.tenant, &env.event.idempotency_key, partitions);
                if home != p {
                    decided.flush.forwards.entry(p).or_default().push(Forward::of(env, home));
                    continue;
                }
            }
            let h = d.hash;
            let fp = fingerprint(&env.tenant, &env.event);
            let seen = match batch_new.get(&h) {
                Some(f) => Some(*f),
                None => match known(p, &d) {
                    Known::Seen(f) => Some(f),
                    Known::Maybe => {
                        let f = inputs.found.get(&h).copied();
                        if f.is_none() {
                            decided.false_positives += 1;
                        }
                        f
                    }
                    // Looked up only while rows the user keying counted
                    // elsewhere are in the window; otherwise not in `found`.
                    Known::New => inputs.found.get(&h).copied(),
                },
            };
            match Decision::of(seen, fp) {
                Decision::Retry => decided.retries += 1,
                Decision::Conflict => decided.conflicts.push((d.envelope.tenant, d.envelope.event.idempotency_key)),
                Decision::New => {
                    batch_new.insert(h, fp);
                    new_keys.push((h, fp));
                    let priced = price(&env.event, inputs.tenants.tenant(&env.tenant), inputs.catalog);
                    let source = Source::Kafka { topic: inputs.topic, partition: p, offset: b.offset };
                    rows.push(EventRow::new(env, fp, priced, source, written_at));
                    originals.push(Original { key: b.key, envelope: d.envelope });
                }
            }
        }
        if let Some(last) = last_offset {
            decided.flush.commits.insert(p, last + 1);
        }
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            // Rows are in offset order.
            decided.flush.ranges.insert(p, Range { partition: p, after: first.kafka_offset - 1, up_to: last.kafka_offset });
            decided.flush.events.insert(p, rows);
            decided.flush.originals.insert(p, originals);
        }
        if !dead.is_empty() {
            decided.flush.dead_letters.insert(p, dead);
        }
        if !new_keys.is_empty() {
            decided.new_keys.insert(p, new_keys);
        }
    }
    decided
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TENANT, buffered, garbage};
    use meterline_domain::key_hash;

    fn inputs<'a>(found: &'a HashMap<u128, u64>, tenants: &'a KeyRing, catalog: &'a Catalog) -> Inputs<'a> {
        Inputs { topic: "events", written_at: 1_800_000_000, tenants, catalog, found, placement: Placement::InPlace }
    }

    fn offsets(rows: &[EventRow]) -> Vec<i64> {
        rows.iter().map(|r| r.kafka_offset).collect()
    }

    #[test]
    fn each_record_is_new_a_duplicate_or_a_dead_letter() {
        let (tenants, catalog) = (KeyRing::default(), Catalog::builtin().unwrap());
        let first = buffered(10, "a", "user-1", 100);
        let fp_a = first.decoded.as_ref().map(|d| fingerprint(&d.envelope.tenant, &d.envelope.event)).unwrap();
        // "seen" was written before with this payload, "changed" with another,
        // "maybe" and "cleared" are in a bloom filter: the look-up finds
        // "maybe" written, "cleared" not (a false positive).
        let seen = buffered(11, "seen", "user-1", 100);
        let fp_seen = seen.decoded.as_ref().map(|d| fingerprint(&d.envelope.tenant, &d.envelope.event)).unwrap();
        let maybe = buffered(12, "maybe", "user-1", 100);
        let fp_maybe = maybe.decoded.as_ref().map(|d| fingerprint(&d.envelope.tenant, &d.envelope.event)).unwrap();
        let found = HashMap::from([(key_hash(TENANT, "maybe"), fp_maybe)]);
        let batch = vec![
            first,
            seen,
            buffered(13, "changed", "user-1", 100),
            maybe,
            buffered(14, "cleared", "user-1", 100),
            garbage(15, b"\xffjunk"),
            buffered(16, "a", "user-1", 100),  // the same batch wrote it: a retry
            buffered(17, "a", "user-1", 999),  // ... with another payload: a conflict
            buffered(18, "b", "user-2", 100),
        ];
        let known = |p: i32, d: &Decoded| {
            let h = d.hash;
            assert_eq!(p, 3);
            if h == key_hash(TENANT, "seen") {
                Known::Seen(fp_seen)
            } else if h == key_hash(TENANT, "changed") {
                Known::Seen(1)
            } else if h == key_hash(TENANT, "maybe") || h == key_hash(TENANT, "cleared") {
                Known::Maybe
            } else {
                Known::New
            }
        };
        let d = decide(&inputs(&found, &tenants, &catalog), vec![(3, batch)], known);
        let rows = &d.flush.events[&3];
        assert_eq!(offsets(rows), vec![10, 14, 18]);
        assert_eq!(rows[0].fingerprint, fp_a);
        assert_eq!((rows[0].kafka_topic.as_str(), rows[0].kafka_partition, rows[0].written_at), ("events", 3, 1_800_000_000));
        assert_eq!(d.flush.originals[&3].iter().map(|o| o.envelope.event.idempotency_key.as_str()).collect::<Vec<_>>(), ["a", "cleared", "b"]);
        assert_eq!(d.retries, 3, "seen, maybe (found by the look-up), and the batch's own copy of a");
        assert_eq!(d.conflicts, vec![(TENANT.to_owned(), "changed".to_owned()), (TENANT.to_owned(), "a".to_owned())]);
        assert_eq!(d.false_positives, 1);
        let dead = &d.flush.dead_letters[&3];
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].kafka_offset, dead[0].payload.as_str(), dead[0].message_key.as_str()), (15, "ff6a756e6b", ""));
        assert!(!dead[0].reason.is_empty());
        assert_eq!(d.new_keys[&3].iter().map(|(h, _)| *h).collect::<Vec<_>>(), vec![
            key_hash(TENANT, "a"),
            key_hash(TENANT, "cleared"),
            key_hash(TENANT, "b")
        ]);
        assert_eq!(d.flush.ranges[&3], Range { partition: 3, after: 9, up_to: 18 });
        assert_eq!(d.flush.commits[&3], 19);
    }

    #[test]
    fn ranges_and_commits_are_per_partition() {
        let (tenants, catalog, found) = (KeyRing::default(), Catalog::builtin().unwrap(), HashMap::new());
        let batches = vec![
            (0, vec![buffered(5, "x", "u", 1), buffered(6, "y", "u", 1)]),
            // Only duplicates: committed past, nothing rolled up.
            (1, vec![buffered(40, "dup", "u", 1)]),
            // Only a dead letter: the same.
            (2, vec![garbage(7, b"")]),
            (4, vec![garbage(99, b"?"), buffered(100, "z", "u", 1), buffered(101, "dup", "u", 1)]),
        ];
        let known = |_: i32, d: &Decoded| if d.hash == key_hash(TENANT, "dup") { Known::Seen(0) } else { Known::New };
        let d = decide(&inputs(&found, &tenants, &catalog), batches, known);
        assert_eq!(d.flush.commits, BTreeMap::from([(0, 7), (1, 41), (2, 8), (4, 102)]));
        assert_eq!(
            d.flush.ranges,
            BTreeMap::from([(0, Range { partition: 0, after: 4, up_to: 6 }), (4, Range { partition: 4, after: 99, up_to: 100 })])
        );
        assert_eq!(d.flush.events.keys().copied().collect::<Vec<_>>(), vec![0, 4]);
        assert_eq!(d.flush.dead_letters.keys().copied().collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(d.retries, 0, "a different payload under a seen key is a conflict");
        assert_eq!(d.conflicts.len(), 2);
        assert_eq!(d.false_positives, 0);
    }

    #[test]
    fn only_the_home_partition_counts_a_key_and_others_forward_it() {
        let (tenants, catalog) = (KeyRing::default(), Catalog::builtin().unwrap());
        let home = |k: &str| home_partition(TENANT, k, 4);
        let (here, away) = {
            let mut keys = (0..).map(|n| format!("k-{n}"));
            let here = keys.by_ref().find(|k| home(k) == 1).unwrap();
            let away = keys.find(|k| home(k) != 1).unwrap();
            (here, away)
        };
        // "legacy" is new to this partition's state; the transition look-up
        // found it written elsewhere before the upgrade, under another user.
        let legacy = (0..).map(|n| format!("l-{n}")).find(|k| home(k) == 1).unwrap();
        let found = HashMap::from([(key_hash(TENANT, &legacy), 7)]);
        let mut inputs = inputs(&found, &tenants, &catalog);
        inputs.placement = Placement::Home { partitions: 4 };
        let batch = vec![buffered(5, &here, "u", 1), buffered(6, &away, "u", 1), buffered(7, &legacy, "someone-else", 1), garbage(8, b"?")];
        let d = decide(&inputs, vec![(1, batch)], |_, _| Known::New);
        assert_eq!(offsets(&d.flush.events[&1]), vec![5], "counted here: only the key at home");
        let forwards = &d.flush.forwards[&1];
        assert_eq!(forwards.len(), 1);
        assert_eq!((forwards[0].home, forwards[0].key.as_slice()), (home(&away), format!("{TENANT}/{away}").as_bytes()));
        let forwarded = meterline_schemas::wire::decode(&forwards[0].payload).unwrap();
        assert_eq!((forwarded.event.idempotency_key.as_str(), forwarded.event.user_id.as_str()), (away.as_str(), "u"), "forwarded unchanged");
        assert_eq!(d.conflicts, vec![(TENANT.to_owned(), legacy.clone())], "a new key found written is a copy");
        assert_eq!(d.flush.commits[&1], 9, "progress past the forwarded and the dead");
        assert_eq!(d.flush.dead_letters[&1].len(), 1, "an undecodable record has no home: a dead letter where it is");
        // Counted in place, as before the keying: nothing is forwarded.
        inputs.placement = Placement::InPlace;
        let d = decide(&inputs, vec![(1, vec![buffered(6, &away, "u", 1)])], |_, _| Known::New);
        assert!(d.flush.forwards.is_empty() && d.flush.events[&1].len() == 1);
    }

    #[test]
    fn nothing_to_decide_decides_nothing() {
        let (tenants, catalog, found) = (KeyRing::default(), Catalog::builtin().unwrap(), HashMap::new());
        let d = decide(&inputs(&found, &tenants, &catalog), Vec::new(), |_, _| Known::New);
        assert!(d.flush.events.is_empty() && d.flush.commits.is_empty() && d.new_keys.is_empty());
    }
}
