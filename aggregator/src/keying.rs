//! What the `key` keying decides with: the topic's partition count (where a record is counted), the forwarder (what is not counted where it sits), and whether the keying upgrade still needs every new key looked up.
//!
//! A record is counted only on its key's home partition; the topic's
//! partition count is read on each assignment (see the README on adding
//! partitions). On the first such run over a topic the upgrade is recorded
//! in ClickHouse with how long rows counted before it stay in the dedupe
//! window (`keying_upgrades`); until then every key a partition's dedupe
//! state does not know as seen is looked up exactly, and afterwards only
//! bloom maybes are, as before. Only `kafka.keying = "key"` has this state;
//! the `user` keying counts in place.

use meterline_clickhouse::Store;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

use crate::AggregatorError;
use crate::config::KafkaConfig;
use crate::decide::{Flush, Placement};
use crate::forward::Forwarder;
use crate::metrics;

/// Whether rows counted under the user keying, perhaps off their key's home
/// partition, can still be in the dedupe window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    /// Not yet read from ClickHouse: partitions do not load until it is.
    Unknown,
    /// Until then (Unix seconds), every key not known as seen is looked up.
    Until(u32),
    /// None left, or none ever: bloom maybes only.
    Done,
}

/// The `key` keying's state.
#[derive(Debug)]
pub(crate) struct KeyingState {
    forwarder: Forwarder,
    partitions: Option<i32>,
    transition: Transition,
}

impl KeyingState {
    pub(crate) fn new(config: &KafkaConfig) -> Result<KeyingState, AggregatorError> {
        Ok(KeyingState { forwarder: Forwarder::new(config)?, partitions: None, transition: Transition::Unknown })
    }

    /// Reads the topic's partition count (on each assignment) and the
    /// upgrade's transition (once). A partition loads only after this did.
    pub(crate) async fn load<X: ConsumerContext + 'static, C: Consumer<X>>(
        &mut self,
        consumer: &C,
        store: &Store,
        topic: &str,
        window_secs: i64,
        now: u32,
    ) -> Result<(), AggregatorError> {
        // A blocking broker round trip; keep it off the other tasks' threads.
        let metadata = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(10)))?;
        let count = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
        let count = i32::try_from(count)
            .ok()
            .filter(|n| *n > 0)
            .ok_or(AggregatorError::Kafka(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)))?;
        if self.partitions != Some(count) {
            tracing::info!(partitions = count, "counting each key on its home partition out of this many");
        }
        self.partitions = Some(count);
        if self.transition == Transition::Unknown {
            let window = u32::try_from(window_secs).unwrap_or(u32::MAX);
            self.transition = match store.keying_upgrade(topic, window, now).await? {
                Some(until) => {
                    tracing::info!(until, "rows counted under the user keying are in the dedupe window: looking up every new key until then");
                    Transition::Until(until)
                }
                None => Transition::Done,
            };
        }
        Ok(())
    }

    /// Where this flush counts records.
    pub(crate) fn placement(&self) -> Placement {
        // Partitions load only after the count is known, so there is one
        // whenever there is something to decide.
        self.partitions.map_or(Placement::InPlace, |partitions| Placement::Home { partitions })
    }

    /// Whether a flush at `now` looks up every key not known as seen.
    pub(crate) fn lookup_unseen(&mut self, now: u32) -> bool {
        match self.transition {
            Transition::Until(until) if now >= until => {
                tracing::info!("no rows counted under the user keying are left in the dedupe window");
                self.transition = Transition::Done;
                false
            }
            Transition::Until(_) => true,
            Transition::Unknown | Transition::Done => false,
        }
    }

    /// Produces the flush's records found off their home partition there and
    /// waits for the acks; only then may the flush record progress past them.
    /// On `Err` the flush keeps them and is retried whole.
    pub(crate) async fn forward(&self, flush: &mut Flush) -> Result<(), KafkaError> {
        if flush.forwards.is_empty() {
            return Ok(());
        }
        let records: Vec<_> = flush.forwards.values().flatten().collect();
        self.forwarder.send(&records).await?;
        metrics::forwarded(records.len() as u64);
        flush.forwards.clear();
        Ok(())
    }
}
