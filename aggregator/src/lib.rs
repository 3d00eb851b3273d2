//! Meterline's aggregator: a Kafka consumer group that deduplicates usage
//! events by (tenant, idempotency key), rolls them up into one-minute windows
//! and writes both to ClickHouse, with an exactly-once effect.
//!
//! # Exactly once without Kafka transactions
//!
//! ClickHouse, not Kafka, is the record of progress. Each flush writes, in order:
//!
//! 1. `dead_letters`: records that could not be decoded (replacing engine,
//!    keyed by topic/partition/offset, so rewriting one is harmless);
//! 2. `events`: the new (deduplicated) events, each with its Kafka partition
//!    and offset;
//! 3. `rollups_minute`: the flush's rollup rows *and* one progress marker per
//!    Kafka partition (its last event offset) in the same INSERT;
//! 4. the Kafka offset commit (best effort).
//!
//! Each INSERT is one block in one table partition (tables are partitioned by
//! `written_at`, set once per flush; a flush is capped below
//! `max_insert_block_size` rows), so each is all or nothing. When a partition
//! is assigned, the aggregator reads the last marker, looks for `events` rows
//! past it, and positions the consumer after whichever is later (or after the
//! group's commit, if that is later still). The crash points:
//!
//! - **Before (2)**: nothing of the flush is in ClickHouse; its records are
//!   read again and decided again. Dead letters rewritten collapse.
//! - **Between (2) and (3)**: the events are in, their rollups are not. On
//!   assignment the events past the last marker are read back and rolled up
//!   by the same code (`rollup::rollup`), with their marker, before
//!   consumption resumes after them. Nothing is rolled up twice: the marker
//!   and the rollup rows land together or not at all.
//! - **Between (3) and (4)**: ClickHouse holds everything; the stale Kafka
//!   commit is ignored because the marker is later.
//! - **After (4)**: nothing to do.
//!
//! Duplicates are decided before writing: the dedupe state (see [`dedupe`])
//! is rebuilt from `events` on assignment, so a restart or rebalance does
//! not reopen the door to a copy of an event already written.
//!
//! Rebalances: flushes run between polls, so a revoke (which runs inside a
//! poll) never races a write; the revoked partitions' unwritten buffers are
//! dropped and their next owner re-reads them from the recorded position. A
//! member that stops polling for `max.poll.interval.ms` while a write hangs
//! could in principle finish that write after its partitions moved on; write
//! timeouts (`clickhouse.request_timeout_ms`) are far below that interval.
//!
//! Limits, stated: dedupe is exact per Kafka partition. Events are keyed
//! tenant/user, so a retry (same payload) always meets its first copy; a
//! *conflicting* copy that changes `user_id` can land on another partition
//! and is then counted.

pub mod config;
pub mod dedupe;
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod rollup;
pub mod server;
pub mod sql;
pub mod store;

pub use config::Config;
pub use error::AggregatorError;
pub use server::serve;
