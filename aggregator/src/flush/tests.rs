//! The flush stage machine against a fake writer: retries resume at the failed stage after asking what landed; refusals divert events to dead letters; a revoke strips a partition.

use super::*;
use crate::decide::{Inputs, decide};
use crate::dedupe::Known;
use crate::testing::{buffered, garbage};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use std::collections::VecDeque;
use std::sync::Mutex;

const TOPIC: &str = "events";

#[derive(Debug)]
struct FakeError {
    permanent: bool,
}

impl std::fmt::Display for FakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.permanent { "Code: 27. DB::Exception: Cannot parse input" } else { "timed out" })
    }
}

/// One call the machine made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    DeadLetters(Vec<(i32, i64)>),
    EventsPresent,
    Events(Vec<(i32, i64)>),
    MarkersPresent(Rollup),
    RollUp(Rollup, Vec<Range>),
}

/// The next call of `op` fails (permanently or not) after `land` of its rows landed.
#[derive(Debug)]
struct Fail {
    op: &'static str,
    permanent: bool,
    land: usize,
}

/// A ClickHouse that keeps what lands and fails as scripted.
#[derive(Debug, Default)]
struct Fake {
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<Call>,
    script: VecDeque<Fail>,
    dead_letters: Vec<DeadLetterRow>,
    events: Vec<(i32, i64)>,
    rolled: Vec<(Rollup, Vec<Range>)>,
}

impl FakeState {
    /// Lands `rows` (or the scripted part of them) and answers.
    fn land<T>(&mut self, op: &str, rows: Vec<T>, into: impl FnOnce(&mut FakeState, Vec<T>)) -> Result<(), FakeError> {
        let fail = if self.script.front().is_some_and(|f| f.op == op) { self.script.pop_front() } else { None };
        let n = fail.as_ref().map_or(rows.len(), |f| f.land.min(rows.len()));
        into(self, rows.into_iter().take(n).collect());
        fail.map_or(Ok(()), |f| Err(FakeError { permanent: f.permanent }))
    }
}

impl Fake {
    fn scripted(script: Vec<Fail>) -> Fake {
        Fake { state: Mutex::new(FakeState { script: script.into(), ..FakeState::default() }) }
    }
    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }
}

impl FlushWriter for Fake {
    type Error = FakeError;
    fn retry(error: &FakeError) -> Retry {
        if error.permanent { Retry::Permanent } else { Retry::Retryable }
    }
    async fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> Result<(), FakeError> {
        self.with(|s| {
            s.calls.push(Call::DeadLetters(rows.iter().map(|r| (r.kafka_partition, r.kafka_offset)).collect()));
            s.land("dead_letters", rows.to_vec(), |s, rows| s.dead_letters.extend(rows))
        })
    }
    async fn events_present(&self, _topic: &str, ranges: &[Range]) -> Result<HashMap<i32, i64>, FakeError> {
        self.with(|s| {
            s.calls.push(Call::EventsPresent);
            let mut landed = HashMap::new();
            for (p, o) in &s.events {
                if ranges.iter().any(|r| r.partition == *p && r.after < *o && *o <= r.up_to) {
                    let last = landed.entry(*p).or_insert(*o);
                    *last = (*last).max(*o);
                }
            }
            Ok(landed)
        })
    }
    async fn insert_events(&self, rows: &[&EventRow]) -> Result<(), FakeError> {
        let positions: Vec<(i32, i64)> = rows.iter().map(|r| (r.kafka_partition, r.kafka_offset)).collect();
        self.with(|s| {
            s.calls.push(Call::Events(positions.clone()));
            s.land("events", positions, |s, rows| s.events.extend(rows))
        })
    }
    async fn markers_present(&self, rollup: Rollup, _topic: &str, ranges: &[Range]) -> Result<bool, FakeError> {
        self.with(|s| {
            s.calls.push(Call::MarkersPresent(rollup));
            Ok(s.rolled.iter().any(|(r, rs)| *r == rollup && ranges.iter().all(|x| rs.contains(x))))
        })
    }
    async fn roll_up(&self, rollup: Rollup, _topic: &str, ranges: &[Range], _written_at: u32) -> Result<(), FakeError> {
        self.with(|s| {
            s.calls.push(Call::RollUp(rollup, ranges.to_vec()));
            // A rollup insert is atomic: all of it lands (then perhaps times out), or none.
            s.land("roll_up", vec![(rollup, ranges.to_vec())], |s, rows| s.rolled.extend(rows))
        })
    }
}

/// Partition 0: offsets 10..=12 new, 13 undecodable; partition 1: offsets 20..=21 new.
fn pending() -> Pending {
    let (tenants, catalog, found) = (KeyRing::default(), Catalog::builtin().unwrap(), HashMap::new());
    let inputs = Inputs { topic: TOPIC, written_at: 1_800_000_000, tenants: &tenants, catalog: &catalog, found: &found, placement: crate::decide::Placement::InPlace };
    let batches = vec![
        (0, vec![buffered(10, "a", "u1", 1), buffered(11, "b", "u1", 1), buffered(12, "c", "u1", 1), garbage(13, b"?")]),
        (1, vec![buffered(20, "d", "u2", 1), buffered(21, "e", "u2", 1)]),
    ];
    Pending::new(decide(&inputs, batches, |_, _| Known::New).flush, BTreeMap::new(), Instant::now())
}

fn ranges() -> Vec<Range> {
    vec![Range { partition: 0, after: 9, up_to: 12 }, Range { partition: 1, after: 19, up_to: 21 }]
}

fn rollups(ranges: &[Range]) -> Vec<Call> {
    Rollup::ALL.iter().map(|r| Call::RollUp(*r, ranges.to_vec())).collect()
}

fn run<T>(f: impl Future<Output = T>) -> T {
    futures::executor::block_on(f)
}

#[test]
fn a_clean_flush_writes_each_stage_once_in_order() {
    let (fake, mut p) = (Fake::default(), pending());
    run(p.advance(&fake, TOPIC)).unwrap();
    let mut expected = vec![Call::DeadLetters(vec![(0, 13)]), Call::Events(vec![(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)])];
    expected.extend(rollups(&ranges()));
    assert_eq!(fake.calls(), expected);
    assert_eq!(p.stage, Stage::Commit);
    assert_eq!(p.flush.commits, BTreeMap::from([(0, 14), (1, 22)]));
    assert!(p.diverted_keys().is_empty());
}

#[test]
fn a_failed_events_insert_resumes_there_and_sends_only_what_did_not_land() {
    // The insert is cut short after two rows (a prefix of partition 0), then times out.
    let fake = Fake::scripted(vec![Fail { op: "events", permanent: false, land: 2 }]);
    let mut p = pending();
    let failed = run(p.advance(&fake, TOPIC)).unwrap_err();
    assert_eq!((failed.stage, failed.permanent), (Stage::Events, false));
    assert_eq!(fake.calls().len(), 2, "dead letters, then the failed insert");
    run(p.advance(&fake, TOPIC)).unwrap();
    let mut expected = vec![Call::EventsPresent, Call::Events(vec![(0, 12), (1, 20), (1, 21)])];
    expected.extend(rollups(&ranges()));
    assert_eq!(fake.calls(), expected, "no dead letters again; only the rows that did not land");
    assert_eq!(fake.with(|s| s.events.len()), 5, "every event once");
}

#[test]
fn a_failed_rollup_is_checked_for_its_markers_before_it_is_sent_again() {
    // The first rollup lands and then times out; the second fails outright.
    let [first, second, rest @ ..] = Rollup::ALL;
    let fake = Fake::scripted(vec![
        Fail { op: "roll_up", permanent: false, land: 1 },
        Fail { op: "roll_up", permanent: false, land: 0 },
    ]);
    let mut p = pending();
    assert_eq!(run(p.advance(&fake, TOPIC)).unwrap_err().stage, Stage::Rollup(first));
    fake.calls();
    assert_eq!(run(p.advance(&fake, TOPIC)).unwrap_err().stage, Stage::Rollup(second));
    assert_eq!(fake.calls(), vec![Call::MarkersPresent(first), Call::RollUp(second, ranges())]);
    run(p.advance(&fake, TOPIC)).unwrap();
    let mut expected = vec![Call::MarkersPresent(second), Call::RollUp(second, ranges())];
    expected.extend(rest.iter().map(|r| Call::RollUp(*r, ranges())));
    assert_eq!(fake.calls(), expected);
    let landed = fake.with(|s| s.rolled.iter().filter(|(r, _)| *r == first).count());
    assert_eq!(landed, 1, "the rollup that landed is not sent twice");
}

#[test]
fn refused_events_become_dead_letters_and_the_offsets_still_advance() {
    let fake = Fake::scripted(vec![Fail { op: "events", permanent: true, land: 0 }]);
    let mut p = pending();
    run(p.advance(&fake, TOPIC)).unwrap();
    let mut expected = vec![
        Call::DeadLetters(vec![(0, 13)]),
        Call::Events(vec![(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)]),
        Call::EventsPresent,
        Call::DeadLetters(vec![(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)]),
    ];
    expected.extend(rollups(&[]));
    assert_eq!(fake.calls(), expected, "nothing is rolled up: no range is left");
    assert!(p.flush.events.is_empty() && p.flush.ranges.is_empty());
    assert_eq!(p.flush.commits, BTreeMap::from([(0, 14), (1, 22)]), "the offsets advance past the refused records");
    let letter = fake.with(|s| s.dead_letters[1].clone());
    assert!(letter.reason.starts_with("refused by ClickHouse: Code: 27."), "{}", letter.reason);
    assert_eq!(letter.message_key, hex::encode(b"acme/u1"));
    let payload = wire::decode(&hex::decode(&letter.payload).unwrap()).unwrap();
    assert_eq!((payload.tenant.as_str(), payload.event.idempotency_key.as_str()), ("acme", "a"), "the record as it came");
    assert_eq!(p.diverted_keys().values().map(Vec::len).sum::<usize>(), 5);
    assert_eq!(p.diverted_keys()[&1][0], key_hash("acme", "d"));
}

#[test]
fn a_refused_insert_keeps_and_rolls_up_what_landed() {
    // Two rows of partition 0 landed before the refusal: they stay events.
    let fake = Fake::scripted(vec![Fail { op: "events", permanent: true, land: 2 }]);
    let mut p = pending();
    run(p.advance(&fake, TOPIC)).unwrap();
    let kept = [Range { partition: 0, after: 9, up_to: 11 }];
    let calls = fake.calls();
    assert_eq!(calls[3], Call::DeadLetters(vec![(0, 12), (1, 20), (1, 21)]));
    assert_eq!(calls[4..], rollups(&kept)[..]);
    assert_eq!(p.flush.events[&0].iter().map(|r| r.kafka_offset).collect::<Vec<_>>(), vec![10, 11]);
    assert_eq!(p.flush.originals[&0].len(), 2);
    assert!(!p.flush.events.contains_key(&1));
}

#[test]
fn refused_records_are_held_when_their_dead_letters_are_refused_too() {
    let fake = Fake::scripted(vec![
        Fail { op: "events", permanent: true, land: 0 },
        Fail { op: "dead_letters", permanent: true, land: 0 },
    ]);
    let mut p = pending();
    let failed = run(p.advance(&fake, TOPIC)).unwrap_err();
    assert_eq!((failed.stage, failed.permanent), (Stage::Refused, true), "events are never dropped");
    fake.calls();
    run(p.advance(&fake, TOPIC)).unwrap();
    assert_eq!(fake.calls()[0], Call::DeadLetters(vec![(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)]));
}

#[test]
fn refused_dead_letters_of_undecodable_records_are_dropped_and_the_flush_goes_on() {
    let fake = Fake::scripted(vec![Fail { op: "dead_letters", permanent: true, land: 0 }]);
    let mut p = pending();
    run(p.advance(&fake, TOPIC)).unwrap();
    assert_eq!(fake.with(|s| s.events.len()), 5);
    assert!(fake.with(|s| s.dead_letters.is_empty()));
    // A retryable failure of the same insert is retried as before.
    let fake = Fake::scripted(vec![Fail { op: "dead_letters", permanent: false, land: 0 }]);
    let mut p = pending();
    assert_eq!(run(p.advance(&fake, TOPIC)).unwrap_err().stage, Stage::DeadLetters);
    fake.calls();
    run(p.advance(&fake, TOPIC)).unwrap();
    assert_eq!(fake.calls()[0], Call::DeadLetters(vec![(0, 13)]));
}

#[test]
fn a_revoke_mid_flush_strips_the_partition() {
    let fake = Fake::scripted(vec![Fail { op: "events", permanent: false, land: 0 }]);
    let mut p = pending();
    run(p.advance(&fake, TOPIC)).unwrap_err();
    fake.calls();
    p.strip(0);
    assert!(!p.flush.events.contains_key(&0) && !p.flush.originals.contains_key(&0) && !p.flush.dead_letters.contains_key(&0));
    assert_eq!(p.flush.commits, BTreeMap::from([(1, 22)]));
    run(p.advance(&fake, TOPIC)).unwrap();
    let only = [Range { partition: 1, after: 19, up_to: 21 }];
    let mut expected = vec![Call::EventsPresent, Call::Events(vec![(1, 20), (1, 21)])];
    expected.extend(rollups(&only));
    assert_eq!(fake.calls(), expected);
}
