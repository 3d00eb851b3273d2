//! The write side of overlapping flushes: decided flushes waiting in a bounded queue, at most one of them being written (a spawned task), in decision order, and the keys they hold for later decisions until they are durable.
//!
//! Why a queue of decided flushes rather than of records: the decision
//! (decode, dedupe, price) is the CPU half of a flush and the write is the
//! ClickHouse half; with one flush decided while the previous one is written,
//! both cores work. The depth is [`DEPTH`] flushes, the one being written
//! included, so memory stays bounded: the loop pauses consumption while the
//! queue is full and a whole batch waits behind it (`Pipeline::apply_backpressure`).
//!
//! Order: one writer at a time, first in first written, so each partition's
//! flushes land in offset order, and a flush whose write fails goes back to
//! the front and is retried before anything decided after it.
//!
//! Dedupe: a flush's new keys enter the partition's dedupe state when it is
//! decided, and are also held here, exactly, until the flush is durable: the
//! dedupe state may forget an exact key (its recent map is capped by count
//! and age, and a write can be retried for as long as an outage lasts), and
//! a bloom slice's `Maybe` is settled by a look-up in ClickHouse, which
//! cannot find a key whose write has not landed. Without this, a copy in the
//! next flush of a key still in flight would be counted twice.

use meterline_clickhouse::{ClickHouseError, Store};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::flush::{Failed, Pending};
use crate::metrics;

/// Flushes decided and not yet durable, the one being written included.
pub(crate) const DEPTH: usize = 2;

/// One write attempt of a flush: the flush back, moved on as far as it got.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) pending: Pending,
    pub(crate) result: Result<(), Failed<ClickHouseError>>,
}

/// The decided flushes not yet durable.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// Waiting to be written, the next first.
    queue: VecDeque<Pending>,
    writing: Option<JoinHandle<Attempt>>,
    /// Woken when a write attempt ends, so the loop comes round to it at once.
    done: Arc<Notify>,
    /// Per partition, key hash -> fingerprint of every key a flush here writes.
    keys: HashMap<i32, HashMap<u128, u64>>,
    /// The last attempt failed: the front of the queue waits for its backoff.
    failing: bool,
}

impl Writes {
    /// What the run loop waits on besides the consumer: a write attempt ended.
    pub(crate) fn done(&self) -> Arc<Notify> {
        self.done.clone()
    }

    /// Decided and not yet durable, the one being written included.
    pub(crate) fn len(&self) -> usize {
        self.queue.len() + usize::from(self.writing.is_some())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No room to decide another flush: consumption pauses.
    pub(crate) fn full(&self) -> bool {
        self.len() >= DEPTH
    }

    /// A write failed and waits for its retry: consumption pauses, as it did
    /// before flushes overlapped, so an outage does not fill the buffers.
    pub(crate) fn failing(&self) -> bool {
        self.failing
    }

    /// Whether no write is running and one is waiting for its turn.
    pub(crate) fn can_start(&self) -> bool {
        self.writing.is_none() && !self.queue.is_empty()
    }

    /// The fingerprint of `key` if a flush not yet durable writes it on `partition`.
    pub(crate) fn known(&self, partition: i32, key: u128) -> Option<u64> {
        self.keys.get(&partition).and_then(|k| k.get(&key)).copied()
    }

    /// Queues a decided flush behind those decided before it.
    pub(crate) fn push(&mut self, pending: Pending) {
        for (p, keys) in &pending.keys {
            self.keys.entry(*p).or_default().extend(keys.iter().copied());
        }
        self.queue.push_back(pending);
        metrics::unwritten(self.len());
    }

    /// The next flush to write, out of the queue (back with `retry` if it cannot start).
    pub(crate) fn next(&mut self) -> Option<Pending> {
        self.queue.pop_front()
    }

    /// Puts a flush whose write failed (or could not start) back at the front.
    pub(crate) fn retry(&mut self, pending: Pending) {
        self.failing = true;
        self.queue.push_front(pending);
        metrics::unwritten(self.len());
    }

    /// Writes `pending` in a task of its own: the loop goes on consuming and
    /// deciding meanwhile. One attempt: on failure it comes back to be retried.
    pub(crate) fn start(&mut self, mut pending: Pending, store: Store, topic: String) {
        debug_assert!(self.writing.is_none(), "one write at a time keeps offset order");
        let done = self.done.clone();
        self.writing = Some(tokio::spawn(async move {
            let result = pending.advance(&store, &topic).await;
            done.notify_one();
            Attempt { pending, result }
        }));
        metrics::unwritten(self.len());
    }

    /// The running write's attempt, if it has ended.
    pub(crate) fn finished(&mut self) -> Option<Attempt> {
        let handle = self.writing.as_mut().filter(|h| h.is_finished())?;
        // Polled once: a finished task answers at once (None only if the
        // runtime's budget says yield, and then it is picked up next time).
        let joined = futures::FutureExt::now_or_never(handle)?;
        self.writing = None;
        Some(ended(joined))
    }

    /// Waits for the running write's attempt, if one is running. A write is
    /// never abandoned: it must land or fail before its partitions are let
    /// go (revoke) or the process exits (drain), or it could land after the
    /// next owner repaired past it.
    pub(crate) async fn wait(&mut self) -> Option<Attempt> {
        let handle = self.writing.take()?;
        Some(ended(handle.await))
    }

    /// After a flush is durable: its keys are in ClickHouse now, where the
    /// dedupe state's look-ups find them.
    pub(crate) fn written(&mut self, pending: &Pending) {
        self.failing = false;
        for (p, keys) in &pending.keys {
            if let Some(held) = self.keys.get_mut(p) {
                keys.iter().for_each(|(h, _)| {
                    held.remove(h);
                });
            }
        }
        metrics::unwritten(self.len());
    }

    /// Forgets a revoked partition's part of every queued flush. Called only
    /// with no write running (the revoke waits for it).
    pub(crate) fn strip(&mut self, partition: i32) {
        for pending in &mut self.queue {
            pending.strip(partition);
        }
        self.keys.remove(&partition);
    }
}

/// The attempt of a write task that ended; a panic in it is the process's:
/// the flush is lost from memory, and only a restart (repair and rebuild from
/// ClickHouse) knows what of it landed.
fn ended(joined: Result<Attempt, tokio::task::JoinError>) -> Attempt {
    match joined {
        Ok(attempt) => attempt,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a flush write task was cancelled: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn pending(keys: &[(i32, u128)]) -> Pending {
        let mut by_partition: BTreeMap<i32, Vec<(u128, u64)>> = BTreeMap::new();
        for (p, h) in keys {
            by_partition.entry(*p).or_default().push((*h, *h as u64 + 1));
        }
        Pending::new(Default::default(), by_partition, Instant::now())
    }

    #[test]
    fn keys_are_known_from_decision_until_durable_and_order_is_kept() {
        let mut w = Writes::default();
        w.push(pending(&[(0, 1), (1, 2)]));
        w.push(pending(&[(0, 3)]));
        assert!(w.full() && !w.failing());
        assert_eq!((w.known(0, 1), w.known(1, 2), w.known(0, 3), w.known(1, 1)), (Some(2), Some(3), Some(4), None));
        let first = w.next().expect("first");
        assert_eq!(first.keys[&0], vec![(1, 2)], "first in, first written");
        w.retry(first);
        assert!(w.failing() && w.can_start());
        let first = w.next().expect("again");
        assert_eq!(first.keys[&0], vec![(1, 2)], "a failed write goes back to the front");
        w.written(&first);
        assert!(!w.failing());
        assert_eq!((w.known(0, 1), w.known(0, 3)), (None, Some(4)), "durable keys are left to ClickHouse");
        w.strip(0);
        assert_eq!(w.known(0, 3), None);
        assert_eq!(w.len(), 1);
    }
}
