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
//!    and offset, in offset order per partition;
//! 3. `rollups_minute`: one server-side `INSERT ... SELECT` that sums the
//!    flush's events into minute rollups *and* writes one progress marker per
//!    Kafka partition (the last offset it covers), in the same INSERT;
//! 4. `rollups_user_span`: the same, into per-user rows over aligned spans of
//!    1 to 32 days, with markers of its own (each rollup table has its own
//!    progress and its own repair);
//! 5. `rollups_user_daily`: the same, into daily rows ordered by user;
//! 6. the Kafka offset commit (best effort).
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
//! the consumer after the later of that and the group's commit. The crash points:
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
//! Duplicates are decided before writing: the dedupe state (see `dedupe.rs`)
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

mod alerts;
mod config;
mod dedupe;
mod error;
pub mod metrics;
mod pipeline;
mod server;

pub use alerts::{Evaluator, Notifier};
pub use dedupe::{Known, PartitionDedupe};
pub use config::{Config, DedupeConfig, FlushConfig, KafkaConfig, MetricsConfig, ServerConfig};
pub use error::AggregatorError;
pub use server::serve;
