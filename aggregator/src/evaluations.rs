//! Runaway evaluations beside the run loop: each flush's users are handed to one task that evaluates them against ClickHouse, so the loop goes on consuming and deciding meanwhile.
//!
//! Why a task: an evaluation reads the rollups of every user a flush touched
//! (three aggregate reads per tenant), which took as long as writing the
//! flush, and the loop could neither consume nor decide while it waited
//! (`bench/PROFILE.md`). Users touched while an evaluation runs are gathered
//! into one set and evaluated together by the next one, and evaluations
//! start at most once per [`SPACING`], and at least four times their own
//! last duration apart (as the embedded writer spaces its own), so their
//! load on ClickHouse stays the same whatever the event rate, a fifth of
//! its time at most when its reads slow down (its trailing window holds an
//! hour of every user's minute rows), and alerts stay seconds behind the
//! flush that crossed a threshold.
//!
//! Nothing is lost by the hand-over: a failed evaluation keeps its users for
//! the next one, and the drain on shutdown waits (within its deadline) for
//! what is gathered. Alerts are derived state: the rollups they read are
//! exact whatever happens here, and a user missed by a crash is evaluated
//! again when their next event is written.

use meterline_clickhouse::Store;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::alerts::Evaluator;

/// The least time between the starts of two evaluations.
const SPACING: Duration = Duration::from_secs(1);

/// The least time between the starts of two evaluations after one that
/// took `took`: [`SPACING`], or four times `took`.
fn spacing(took: Duration) -> Duration {
    SPACING.max(took * 4)
}

/// Users waiting for an evaluation, and whether one is running.
#[derive(Debug, Default)]
struct Gathered {
    users: BTreeSet<(String, String)>,
    running: bool,
}

/// The handle the pipeline keeps: hands users over, drains on shutdown.
/// Dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Evaluations {
    gathered: Arc<Mutex<Gathered>>,
    wake: Arc<Notify>,
    settled: Arc<Notify>,
    task: Option<JoinHandle<()>>,
}

impl Evaluations {
    /// Starts the task (none when alerts are off). `idle`: how often open
    /// alerts are evaluated again when no flush touches their users, so
    /// they resolve when their user calms down.
    pub(crate) fn start(mut evaluator: Evaluator, store: Store, idle: Duration) -> Evaluations {
        let gathered = Arc::new(Mutex::new(Gathered::default()));
        let (wake, settled) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let task = evaluator.enabled().then(|| {
            let (gathered, wake, settled) = (gathered.clone(), wake.clone(), settled.clone());
            tokio::spawn(async move {
                // When the last evaluation started, and how long it took.
                let mut last: Option<Instant> = None;
                let mut took = Duration::ZERO;
                loop {
                    let _ = tokio::time::timeout(idle, wake.notified()).await;
                    if let Some(wait) = last.and_then(|l| spacing(took).checked_sub(l.elapsed())) {
                        tokio::time::sleep(wait).await;
                    }
                    let users = {
                        let mut g = lock(&gathered);
                        let users = std::mem::take(&mut g.users);
                        let due = !users.is_empty() || (evaluator.has_open() && last.is_none_or(|l| l.elapsed() >= idle));
                        g.running = due;
                        if !due {
                            drop(g);
                            settled.notify_one();
                            continue;
                        }
                        users
                    };
                    let started = Instant::now();
                    last = Some(started);
                    let result = evaluator.evaluate(&store, &users).await;
                    took = started.elapsed();
                    if let Err(e) = result {
                        tracing::warn!(error = %e, users = users.len(), "runaway evaluation failed; its users are evaluated again with the next");
                        lock(&gathered).users.extend(users);
                        wake.notify_one();
                    }
                    lock(&gathered).running = false;
                    settled.notify_one();
                }
            })
        });
        Evaluations { gathered, wake, settled, task }
    }

    /// Hands over the users a durable flush touched.
    pub(crate) fn touched(&self, users: impl IntoIterator<Item = (String, String)>) {
        if self.task.is_none() {
            return;
        }
        lock(&self.gathered).users.extend(users);
        self.wake.notify_one();
    }

    /// Waits until every user handed over has been evaluated, or `deadline`.
    pub(crate) async fn drain(&self, deadline: Instant) {
        if self.task.is_none() {
            return;
        }
        loop {
            {
                let g = lock(&self.gathered);
                if g.users.is_empty() && !g.running {
                    return;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, self.settled.notified()).await.is_err() {
                tracing::warn!("runaway evaluations still waiting at the drain deadline; their users are evaluated when next written");
                return;
            }
        }
    }
}

impl Drop for Evaluations {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn lock(gathered: &Mutex<Gathered>) -> std::sync::MutexGuard<'_, Gathered> {
    gathered.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_evaluations_are_spaced_four_times_their_length_apart() {
        assert_eq!(spacing(Duration::ZERO), SPACING);
        assert_eq!(spacing(Duration::from_millis(200)), SPACING);
        assert_eq!(spacing(Duration::from_millis(600)), Duration::from_millis(2_400));
    }
}
