//! Loading an assigned partition: repairs rollups a crash left behind, rebuilds its dedupe state and positions the consumer (the assignment half of the exactly-once argument in `lib.rs`).

use chrono::Utc;
use meterline_clickhouse::{Range, Rollup};
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

use super::{Pipeline, now_secs};
use crate::AggregatorError;
use crate::metrics;

impl Pipeline {
    /// Makes a newly assigned partition ready: repairs rollups a crash left
    /// behind, rebuilds its dedupe state, and positions the consumer after
    /// the last record ClickHouse holds (or the group's commit, if later).
    pub(super) async fn load<X: ConsumerContext + 'static, C: Consumer<X>>(&mut self, consumer: &C, partition: i32) -> Result<(), AggregatorError> {
        let started = Instant::now();
        let topic = self.topic.clone();
        if let Some(keying) = self.keying.as_mut() {
            keying.load(consumer, &self.store, &topic, self.config.dedupe.window_secs, now_secs()).await?;
        }
        let mut written_next: Option<i64> = None;
        for rollup in Rollup::ALL {
            let progress = self.store.progress(rollup, &topic, partition).await?;
            written_next = written_next.max(progress.rollup_offset.map(|o| o + 1));
            if let Some(last) = self.store.orphans(&topic, partition, progress).await? {
                // The crash came between a flush's events insert and this
                // rollup's insert (or cut the events insert short); or the
                // table is new and backfills. Roll those events up, with
                // their marker, before consuming after them.
                // In chunks of at most a flush's worth of offsets, each with
                // its marker: a backfill of a new table can cover the whole
                // history, and one INSERT stays atomic only while it is one
                // block (see `max_batch_events`). A crash between chunks
                // resumes after the last chunk's marker.
                let first = progress.rollup_offset.unwrap_or(-1);
                let chunk = i64::try_from(self.config.flush.max_batch_events).unwrap_or(i64::MAX);
                let mut after = first;
                while after < last {
                    let up_to = last.min(after.saturating_add(chunk));
                    let range = Range { partition, after, up_to };
                    self.store.roll_up(rollup, &topic, &[range], now_secs(), progress.repair_since()).await?;
                    after = up_to;
                }
                metrics::repaired();
                tracing::warn!(partition, table = rollup.table(), after = first, up_to = last, "rolled up events a crash left without rollups");
                written_next = written_next.max(Some(last + 1));
            }
        }
        if let Some(limits) = self.limits.as_mut() {
            limits.assigned(partition, written_next.map(|next| next - 1));
        }
        let loaded = crate::snapshot::rebuild(&self.store, &self.config.dedupe, &topic, partition, Utc::now().timestamp()).await?;
        let (keys, source, snapshot) = (loaded.keys_read, loaded.source, loaded.snapshot());

        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, partition);
        // A blocking broker round trip; keep it off the other tasks' threads.
        let committed = tokio::task::block_in_place(|| consumer.committed_offsets(list, Duration::from_secs(10)))?;
        let committed = committed.find_partition(&topic, partition).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        let start = match (written_next, committed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let offset = start.map_or(Offset::Beginning, Offset::Offset);
        consumer.seek(&topic, partition, offset, Duration::from_secs(10))?;
        if let Some(state) = self.partitions.ready(partition, start.unwrap_or(0), loaded.dedupe, snapshot) {
            metrics::dedupe_state(partition, state.dedupe.fill_ratio(), state.dedupe.approx_bytes());
        }
        tracing::info!(partition, ?start, keys, ?source, ms = started.elapsed().as_millis() as u64, "partition ready");
        Ok(())
    }
}
