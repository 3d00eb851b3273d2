//! Meterline's aggregator: a Kafka consumer group that deduplicates usage
//! events by (tenant, idempotency key), rolls them up into one-minute windows
//! and writes both to ClickHouse, with an exactly-once effect.
//!
//! # Exactly once without Kafka transactions
//!
//! ClickHouse, not Kafka, is the record of progress. Each flush is decided
//! first, without I/O but for one exact look-up (`decide.rs`), and then
//! written by a stage machine that only moves forward (`flush.rs`), in order:
//!
//! 1. `dead_letters`: records that could not be decoded (replacing engine,
//!    keyed by topic/partition/offset, so rewriting one is harmless);
//! 2. `events`: the new (deduplicated) events, each with its Kafka partition
//!    and offset, in offset order per partition;
//! 3. `rollups_user_span`: one server-side `INSERT ... SELECT` that sums the
//!    flush's events into per-user rows over aligned spans of 1 to 32 days
//!    *and* writes one progress marker per Kafka partition (the last offset
//!    it covers), in the same INSERT;
//! 4. `rollups_user_daily`: the same, into daily rows ordered by user, with
//!    markers of its own (each rollup table has its own progress and its
//!    own repair);
//! 5. `rollups_daily_by_dims`: the same, into daily rows per feature, model,
//!    environment and billable (no user or customer), ordered by time;
//! 6. `rollups_minute`: the same, into minute rows, last: the query API reads
//!    a day under way as its day rows minus the minute rows after the
//!    range's end, which needs a flush's day rows in place whenever its
//!    minute rows are (`Rollup::ALL`);
//! 7. the Kafka offset commit (best effort).
//!
//! # Overlapping flushes
//!
//! Flushes overlap (`writes.rs`): while flush N goes through the stages
//! above in a task of its own, the loop goes on consuming, and decides flush
//! N+1 (decode, dedupe, price). At most two flushes are decided and not yet
//! durable, the one being written included; while both are there and a whole
//! batch waits behind them, or a write is failing, or the buffers are full,
//! consumption pauses, so memory stays bounded. One writer at a time, in
//! decision order, so each partition's flushes land in offset order, and a
//! failed flush is retried before anything decided after it. What keeps
//! this exact:
//!
//! - **Commit only after durable**: a flush's offsets are committed after
//!   its last stage, and every earlier flush of that partition reached its
//!   last stage before it started; nothing of N+1 is committed or marked
//!   while N is being written.
//! - **Dedupe sees N while deciding N+1**: a flush's keys enter the dedupe
//!   state when it is decided, and are held exactly beside it until it is
//!   durable (a bloom `Maybe` is settled by a look-up in ClickHouse, which
//!   cannot yet find N's keys; the recent map is capped). If N's write
//!   fails it is retried, first, for as long as it takes, so N+1's drops
//!   against N's keys stay right: N will be written.
//! - **Markers and repair**: unchanged. N+1 writes nothing before N's last
//!   stage, so at any moment ClickHouse holds flushes up to some N-1 whole,
//!   maybe part of N (the crash points below), and nothing of N+1.
//! - **Revoke and drain wait for the running write** before anything else,
//!   whatever the deadline: a write must land or fail before its partitions
//!   are let go, or it could land after the next owner repaired past it.
//!
//! A crash (kill -9) while N is being written and N+1 decided loses N+1
//! with the process: its keys were only in memory, its offsets were never
//! committed, and it is read again from Kafka from the position the crash
//! points below give for N (at most one past N's last offset), and decided again
//! against dedupe state rebuilt from ClickHouse, which holds none of its
//! keys. Dedupe snapshots taken after N (`snapshot.rs`) may hold N+1's keys
//! too; an extra key answers `Maybe` and the look-up finds it new.
//!
//! One behaviour differs from flushes that do not overlap: a copy in N+1 of
//! a key whose first copy ClickHouse then refuses in N (a permanent refusal,
//! see below) is dropped as that first copy's retry, where a later flush
//! would count it; the first copy is in `dead_letters` with the same key,
//! and replaying it counts the event once.
//!
//! The rollup INSERT is one block in one table partition (tables are
//! partitioned by `written_at`, set once per flush, and a flush is capped far
//! below the squashing threshold), so it is all or nothing. The events INSERT
//! may not be: ClickHouse 18.16 commits a chunked HTTP body that a killed
//! writer cut short at a row boundary (seen here). Because each partition's
//! rows are in offset order, such a prefix is a prefix of each partition's
//! offsets, which the repair below handles. (Rollups are summed by the server
//! for exactly this reason: a cut-short client-sent rollup body could hold a
//! partition's rows without its marker, and would be counted twice.)
//!
//! When a partition is assigned, the aggregator reads its last marker, looks
//! for `events` rows past it, rolls those up with a new marker, and positions
//! the consumer after the later of that and the group's commit. The crash
//! points of the flush being written (N above; a flush decided behind it has
//! written nothing, and is read again):
//!
//! - **Before or during (2)**: none, or an offset prefix, of the flush's events
//!   is in ClickHouse. The prefix is rolled up on assignment; the rest is read
//!   again and decided again against dedupe state rebuilt from `events`.
//! - **Between (2) and (3)**: the events are in, their rollups are not; the
//!   repair rolls them up. Nothing is rolled up twice: a marker and the rows
//!   it covers land together or not at all, and the repair starts after the
//!   last marker.
//! - **Between (3) and (5)**: a rollup table whose marker is missing is
//!   repaired as above; otherwise ClickHouse holds everything, and the stale Kafka
//!   commit is ignored because the marker is later.
//! - **After (5)**: nothing to do.
//!
//! A failed write is retried from its own stage, never redoing the stages
//! before it, and only after asking ClickHouse what landed: the offsets of
//! the flush's events already in `events` (only the rest is sent again), or
//! a rollup's markers (present: that rollup is done).
//!
//! Duplicates are decided before writing: the dedupe state (see `dedupe.rs`)
//! is rebuilt on assignment from the partition's newest dedupe snapshot plus
//! the `events` written after it (or from every key in the window, with no
//! usable snapshot), so a restart or rebalance does not reopen the door to a
//! copy of an event already written. A snapshot is written only after a
//! flush's last rollup marker, and claims only the offsets up to that flush;
//! why a crash on either side of it stays exact is in `snapshot.rs`.
//!
//! # Refused data
//!
//! Failures ClickHouse classifies retryable (`ClickHouseError::retry()`:
//! network, timeouts, an overloaded server) hold the offsets, pause
//! consumption and retry with backoff, for as long as it takes. A
//! *permanent* failure, where ClickHouse refused the rows themselves, would
//! fail the same way forever, so:
//!
//! - **Events insert refused (2)**: the aggregator asks what landed anyway
//!   (as for any retry); that offset prefix stays in `events` and is rolled
//!   up as usual. Every other event of the flush is written to
//!   `dead_letters` instead, as it came from Kafka (key, wire bytes,
//!   partition, offset; reason `refused by ClickHouse: ...`), and leaves the
//!   flush's rollup ranges, so nothing is rolled up that is not in `events`.
//!   The offsets then advance past those records. The dedupe state forgets
//!   their keys, so it keeps matching `events`: a later copy is decided
//!   against `events`, as it would be after a restart. Crash points: before
//!   those dead letters land, the records are read again and refused again;
//!   after, the same, and rewriting a dead letter is harmless (keyed by
//!   position). Counted in `meterline_aggregator_refused_batches_total{table="events"}`.
//! - **Those dead letters refused too**: they are events, so they are never
//!   dropped; the flush is held and retried like a retryable failure (the
//!   consumer lag alert pages).
//! - **Dead letters of undecodable records refused (1)**: they hold no
//!   event to count, so they are dropped, each position logged at error
//!   level (the record stays in Kafka until retention), and the flush goes
//!   on. Counted with `table="dead_letters"`.
//! - **A rollup insert** sends no client data (`INSERT ... SELECT`): any
//!   failure is retried.
//!
//! A refusal diverts the whole flush (every partition in it), not only the
//! bad row; it is meant to be rare, and each diverted record can be replayed
//! from `dead_letters`.
//!
//! Rebalances (`consumer.rs`): a revoke runs inside a poll, while a write
//! may be running beside the loop; the revoke callback first waits for it
//! (one attempt, bounded by `clickhouse.request_timeout_ms`), then writes the
//! queued flushes and the revoked partitions' buffers within
//! `flush.revoke_timeout_ms`, and only then lets go. What the deadline cuts
//! off is dropped (the revoked partitions' part of the queued flushes, their
//! buffers) and re-read by the next owner from the recorded position. A
//! member that stops polling for `max.poll.interval.ms` while a write hangs
//! could in principle finish that write after its partitions moved on; write
//! timeouts are far below that interval. On a single-threaded runtime writes
//! do not overlap (each is waited for where it starts), so the revoke there
//! never has one to wait for.
//!
//! Where: `consumer.rs` (the Kafka client, rebalance callbacks, the run
//! loop), `pipeline.rs` (the state they share: driving flushes, commits,
//! alerts; `pipeline/load.rs`: loading an assigned partition, the repair
//! above),
//! `partitions.rs` (per-partition buffers, positions, pauses), `decide.rs`,
//! `flush.rs`, `writes.rs` (the queue of decided flushes and the running
//! write), `dedupe.rs`, `snapshot.rs` (dedupe snapshots, the rebuild
//! on assignment), `keying.rs` and `forward.rs` (where a record is counted,
//! and moving it there).
//!
//! Dedupe across partitions: the state above is per partition, and it is
//! exact for every copy of a key because a record is counted only on its
//! key's home partition (ingest produces there; `forward.rs` moves any other
//! record there before progress past it is recorded). Rows counted before
//! the keying upgrade, perhaps elsewhere, are a set that no longer grows and
//! are checked by an exact look-up while they are in the window
//! (`decide.rs`, `pipeline.rs`; the README's "Upgrading the keying").

mod alerts;
mod config;
mod consumer;
mod decide;
mod dedupe;
mod error;
mod evaluations;
mod flush;
mod forward;
mod keying;
mod limits;
pub mod metrics;
mod partitions;
mod pipeline;
pub mod retention;
mod server;
mod snapshot;
#[cfg(test)]
mod testing;
mod writes;

pub use alerts::{Evaluator, Notifier};
pub use dedupe::{Known, PartitionDedupe};
pub use config::{Config, DedupeConfig, FlushConfig, KafkaConfig, MetricsConfig, ServerConfig};
pub use error::AggregatorError;
pub use pipeline::{conflict_dropped, warn_conflicts};
pub use server::serve;
