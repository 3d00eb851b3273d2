//! The flush stage machine: writes one decided flush to ClickHouse stage by stage (dead letters, events, each rollup, then the commit), asking ClickHouse what landed before any retry.

use meterline_clickhouse::{ClickHouseError, DeadLetterRow, Range, Retry, Rollup, Store};
use meterline_domain::{EventRow, key_hash};
use meterline_schemas::wire;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::decide::Flush;
use crate::metrics;

/// The longest ClickHouse error text kept as a refused record's reason.
const MAX_REASON_BYTES: usize = 1_024;

/// Which write of a flush comes next. A flush moves strictly forward, so a
/// failed write is retried without redoing the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    DeadLetters,
    Events,
    /// Only after ClickHouse refused the events insert: the refused records
    /// go to `dead_letters` instead.
    Refused,
    /// One rollup table's insert, in the order of `Rollup::ALL`.
    Rollup(Rollup),
    Commit,
}

impl Stage {
    /// The table this stage writes, for logs and metrics.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Stage::DeadLetters | Stage::Refused => "dead_letters",
            Stage::Events => "events",
            Stage::Rollup(r) => r.table(),
            Stage::Commit => "none",
        }
    }
}

/// The writes and checks a flush needs; the ClickHouse store, or a fake in tests.
pub(crate) trait FlushWriter {
    type Error: std::fmt::Display;
    /// Whether sending the same thing again can succeed.
    fn retry(error: &Self::Error) -> Retry;
    fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Per partition, the last offset of `ranges` already in `events`.
    fn events_present(&self, topic: &str, ranges: &[Range]) -> impl Future<Output = Result<HashMap<i32, i64>, Self::Error>> + Send;
    fn insert_events(&self, rows: &[&EventRow]) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// True when every range's progress marker is in `rollup`'s table.
    fn markers_present(&self, rollup: Rollup, topic: &str, ranges: &[Range]) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Rolls up the flush's events in `ranges` with their markers: one atomic INSERT.
    fn roll_up(&self, rollup: Rollup, topic: &str, ranges: &[Range], written_at: u32) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl FlushWriter for Store {
    type Error = ClickHouseError;
    fn retry(error: &ClickHouseError) -> Retry {
        error.retry()
    }
    async fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> Result<(), ClickHouseError> {
        Store::insert_dead_letters(self, rows).await
    }
    async fn events_present(&self, topic: &str, ranges: &[Range]) -> Result<HashMap<i32, i64>, ClickHouseError> {
        Store::events_present(self, topic, ranges).await
    }
    async fn insert_events(&self, rows: &[&EventRow]) -> Result<(), ClickHouseError> {
        Store::insert_events(self, rows).await
    }
    async fn markers_present(&self, rollup: Rollup, topic: &str, ranges: &[Range]) -> Result<bool, ClickHouseError> {
        Store::markers_present(self, rollup, topic, ranges).await
    }
    async fn roll_up(&self, rollup: Rollup, topic: &str, ranges: &[Range], written_at: u32) -> Result<(), ClickHouseError> {
        Store::roll_up(self, rollup, topic, ranges, written_at, written_at).await
    }
}

/// A write that failed and will be retried from its stage after a backoff.
#[derive(Debug)]
pub(crate) struct Failed<E> {
    pub(crate) stage: Stage,
    pub(crate) error: E,
    /// How the writer classified the error. A permanent one is retried too
    /// where nothing safer exists: the refused events' dead letters (events
    /// are never dropped) and the server-side rollup inserts (no client data).
    pub(crate) permanent: bool,
}

impl<E> Failed<E> {
    fn of<W: FlushWriter<Error = E>>(stage: Stage, error: E) -> Failed<E> {
        Failed { stage, permanent: W::retry(&error) == Retry::Permanent, error }
    }
}

/// A decided flush being written.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) flush: Flush,
    pub(crate) stage: Stage,
    pub(crate) started: Instant,
    /// Whether an insert of the current stage was sent before: if so, it may
    /// have landed (a timeout) or landed in part (a cut-short body), and the
    /// retry first asks ClickHouse what is there.
    attempted: bool,
    /// Why ClickHouse refused this flush's events insert, once it has.
    refused: Option<String>,
    /// The refused records, as dead letters, per partition.
    diverted: BTreeMap<i32, Vec<DeadLetterRow>>,
    /// The key hashes of the refused records, per partition: they are not in
    /// `events`, so the dedupe state must forget them.
    diverted_keys: BTreeMap<i32, Vec<u128>>,
    /// The keys this flush writes (hash, fingerprint), per partition: later
    /// decisions see them as seen until the flush is durable (`writes.rs`).
    pub(crate) keys: BTreeMap<i32, Vec<(u128, u64)>>,
}

impl Pending {
    pub(crate) fn new(flush: Flush, keys: BTreeMap<i32, Vec<(u128, u64)>>, started: Instant) -> Pending {
        Pending {
            flush,
            keys,
            stage: Stage::DeadLetters,
            started,
            attempted: false,
            refused: None,
            diverted: BTreeMap::new(),
            diverted_keys: BTreeMap::new(),
        }
    }

    /// Forgets a revoked partition's part of the flush. If its events were
    /// written but not its rollups, the next owner rebuilds them from the
    /// events (the repair on assignment).
    pub(crate) fn strip(&mut self, partition: i32) {
        self.flush.dead_letters.remove(&partition);
        self.flush.events.remove(&partition);
        self.flush.originals.remove(&partition);
        self.flush.ranges.remove(&partition);
        self.flush.commits.remove(&partition);
        // Re-read and forwarded again by the next owner if not yet acked.
        self.flush.forwards.remove(&partition);
        self.diverted.remove(&partition);
        self.diverted_keys.remove(&partition);
        self.keys.remove(&partition);
    }

    /// The keys of records ClickHouse refused as events, per partition.
    pub(crate) fn diverted_keys(&self) -> &BTreeMap<i32, Vec<u128>> {
        &self.diverted_keys
    }

    fn ranges(&self) -> Vec<Range> {
        self.flush.ranges.values().copied().collect()
    }

    /// Moves the flush forward one write at a time up to `Stage::Commit`.
    /// On a failure it stays at the failed stage, to be retried from there.
    pub(crate) async fn advance<W: FlushWriter>(&mut self, writer: &W, topic: &str) -> Result<(), Failed<W::Error>> {
        loop {
            let stage = self.stage;
            let next = match stage {
                Stage::DeadLetters => {
                    let rows: Vec<DeadLetterRow> = self.flush.dead_letters.values().flatten().cloned().collect();
                    match writer.insert_dead_letters(&rows).await {
                        Ok(()) => {
                            metrics::dead_letters(rows.len() as u64);
                            Stage::Events
                        }
                        Err(e) if W::retry(&e) == Retry::Permanent => {
                            // Records that could not be decoded hold no event
                            // to count; losing their copy costs no usage, and
                            // they stay in Kafka until retention.
                            metrics::refused("dead_letters");
                            for row in &rows {
                                tracing::error!(partition = row.kafka_partition, offset = row.kafka_offset, reason = %row.reason, error = %e, "ClickHouse refused this dead letter; dropped");
                            }
                            Stage::Events
                        }
                        Err(error) => return Err(Failed::of::<W>(stage, error)),
                    }
                }
                Stage::Events => {
                    let ranges = self.ranges();
                    let landed = if self.attempted && !ranges.is_empty() {
                        writer.events_present(topic, &ranges).await.map_err(|error| Failed::of::<W>(stage, error))?
                    } else {
                        HashMap::new()
                    };
                    if let Some(reason) = self.refused.take() {
                        self.divert(&landed, &reason);
                        if self.diverted.is_empty() { Stage::Rollup(Rollup::ALL[0]) } else { Stage::Refused }
                    } else {
                        // Each partition's rows are in offset order, so what
                        // landed is a prefix: send only the rest.
                        let rows: Vec<&EventRow> = self
                            .flush
                            .events
                            .values()
                            .flatten()
                            .filter(|r| landed.get(&r.kafka_partition).is_none_or(|last| r.kafka_offset > *last))
                            .collect();
                        self.attempted = true;
                        match writer.insert_events(&rows).await {
                            Ok(()) => {
                                pause_if_asked().await;
                                Stage::Rollup(Rollup::ALL[0])
                            }
                            Err(e) if W::retry(&e) == Retry::Permanent => {
                                // The rows themselves are refused: sending them
                                // again fails again. Ask what landed (next
                                // round), keep that, divert the rest.
                                metrics::refused("events");
                                tracing::error!(error = %e, events = rows.len(), "ClickHouse refused the events insert; writing the flush's events to dead_letters instead");
                                self.refused = Some(truncated(&e.to_string()));
                                continue;
                            }
                            Err(error) => return Err(Failed::of::<W>(stage, error)),
                        }
                    }
                }
                Stage::Refused => {
                    let rows: Vec<DeadLetterRow> = self.diverted.values().flatten().cloned().collect();
                    match writer.insert_dead_letters(&rows).await {
                        Ok(()) => {
                            metrics::dead_letters(rows.len() as u64);
                            Stage::Rollup(Rollup::ALL[0])
                        }
                        // These are events: never dropped. Held and retried
                        // like any failed write (and paged on as lag).
                        Err(error) => return Err(Failed::of::<W>(stage, error)),
                    }
                }
                Stage::Rollup(rollup) => {
                    let next = rollup.next().map_or(Stage::Commit, Stage::Rollup);
                    let ranges = self.ranges();
                    let done = if self.attempted && !ranges.is_empty() {
                        writer.markers_present(rollup, topic, &ranges).await.map_err(|error| Failed::of::<W>(stage, error))?
                    } else {
                        false
                    };
                    if !done {
                        self.attempted = true;
                        writer.roll_up(rollup, topic, &ranges, self.flush.written_at).await.map_err(|error| Failed::of::<W>(stage, error))?;
                    }
                    next
                }
                Stage::Commit => return Ok(()),
            };
            if next != stage {
                self.attempted = false;
            }
            self.stage = next;
        }
    }

    /// After a refused events insert: the rows that landed anyway (per
    /// partition a prefix, up to `landed`) stay events and are rolled up;
    /// the rest become dead letters, with their Kafka positions, and leave
    /// `events` and the rollup ranges. Commits are unchanged: the offsets
    /// advance past them.
    fn divert(&mut self, landed: &HashMap<i32, i64>, reason: &str) {
        let reason = format!("refused by ClickHouse: {reason}");
        let partitions: Vec<i32> = self.flush.events.keys().copied().collect();
        for p in partitions {
            let last = landed.get(&p).copied();
            let rows = self.flush.events.remove(&p).unwrap_or_default();
            let originals = self.flush.originals.remove(&p).unwrap_or_default();
            let (mut kept, mut kept_originals) = (Vec::new(), Vec::new());
            for (row, original) in rows.into_iter().zip(originals) {
                if last.is_some_and(|l| row.kafka_offset <= l) {
                    kept.push(row);
                    kept_originals.push(original);
                    continue;
                }
                self.diverted_keys.entry(p).or_default().push(key_hash(&row.tenant, &row.idempotency_key));
                self.diverted.entry(p).or_default().push(DeadLetterRow {
                    kafka_topic: row.kafka_topic,
                    kafka_partition: p,
                    kafka_offset: row.kafka_offset,
                    reason: reason.clone(),
                    message_key: hex::encode(&original.key),
                    payload: hex::encode(wire::encode(&original.envelope)),
                    written_at: self.flush.written_at,
                });
            }
            match (kept.last(), self.flush.ranges.get_mut(&p)) {
                (Some(row), Some(range)) => {
                    range.up_to = row.kafka_offset;
                    self.flush.events.insert(p, kept);
                    self.flush.originals.insert(p, kept_originals);
                }
                _ => {
                    self.flush.ranges.remove(&p);
                }
            }
        }
    }
}

/// Tests only: with this variable set to a number of milliseconds, every
/// flush waits that long between its events insert and its first rollup
/// insert, so that a test can SIGKILL the aggregator while one flush is
/// being written (its events in, its rollups not) and the next is being
/// decided. Inert unless set; read once.
const PAUSE_BEFORE_ROLLUPS: &str = "METERLINE_TEST_AGGREGATOR_PAUSE_BEFORE_ROLLUPS_MS";

async fn pause_if_asked() {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    let pause = PAUSE.get_or_init(|| std::env::var(PAUSE_BEFORE_ROLLUPS).ok().and_then(|v| v.parse().ok()).map(Duration::from_millis));
    if let Some(pause) = *pause {
        tracing::info!(ms = pause.as_millis() as u64, "{PAUSE_BEFORE_ROLLUPS} is set: pausing between the events insert and the rollups");
        tokio::time::sleep(pause).await;
    }
}

/// At most `MAX_REASON_BYTES` of `text`, cut at a character boundary.
fn truncated(text: &str) -> String {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests;
