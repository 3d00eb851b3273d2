//! The ranking cache's background refresher: keeps the standing questions' kept sums fresh off the request path.
//!
//! Why: a kept entry whose hours just received late events, or whose hours
//! a "last 30 days" dashboard moved past when the hour turned, costs the next
//! request a full read (~250 ms at 100,000 users) or a slide. Every
//! `server.ranking_refresh_ms` (default 5,000) the refresher takes the
//! standing questions (asked within `server.ranking_refresh_idle_secs`, at
//! most [`MAX_STANDING`](crate::cache::MAX_STANDING), see `cache.rs`) and
//! for each:
//! - if the hour turned under it (a trailing range, or one running into the
//!   future, see [`Moves`](crate::cache::Moves)), slides it to the hours the
//!   next request will ask for, exactly as a request would (`cached::slide`);
//! - otherwise runs the same cheap check a request runs (one ungrouped event
//!   count over its whole hours) and, if the count moved, reads its hours again.
//!
//! It only saves requests work, never decides an answer: a request still
//! checks the kept sums itself (`cached.rs`), so if the refresher is behind,
//! stopped or failing, answers are as exact as without it, only slower.
//! Its reads go through the same store (and, on ClickHouse, the same
//! per-tenant slots) as the tenant's own requests, one statement at a time.
//!
//! The count does not say which hours changed, so a changed entry is read
//! again whole, in the background; finding the changed hours would need
//! per-hour counts, one grouped statement more per check.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use meterline_domain::TimeColumn;
use meterline_sql::Scope;

use crate::cache::{GroupCache, Standing};
use crate::cached::{self, GroupReader};
use crate::ranking::{self, Entry, Key};
use crate::store::QueryStore;
use crate::{QueryError, metrics};

/// What one pass did to one standing question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// The count matched: nothing to read.
    Fresh,
    /// Moved to the hours the clock brought, by reading the hours between.
    Slid,
    /// Read again whole (events arrived, or too far to slide).
    Reread,
}

impl Refreshed {
    pub fn as_str(self) -> &'static str {
        match self {
            Refreshed::Fresh => "fresh",
            Refreshed::Slid => "slide",
            Refreshed::Reread => "reread",
        }
    }
}

/// One pass over `cache`'s standing questions (asked within `idle`),
/// reading through `reader`. A question whose reads fail is left as it is
/// (a request checks it anyway) and counted as an error.
pub async fn pass<R: GroupReader + ?Sized>(cache: &GroupCache, reader: &R, idle: Duration) {
    pass_at(cache, reader, idle, chrono::Utc::now().timestamp()).await;
}

/// [`pass`] as if the clock read `now` (Unix seconds) for where the hours moved.
pub async fn pass_at<R: GroupReader + ?Sized>(cache: &GroupCache, reader: &R, idle: Duration, now: i64) {
    let mut failed: Option<(usize, QueryError, String)> = None;
    for standing in cache.standing(Instant::now(), idle) {
        match one(cache, reader, &standing, now).await {
            Ok(done) => metrics::ranking_refresh(done.as_str()),
            Err(e) => {
                metrics::ranking_refresh("error");
                match &mut failed {
                    Some((n, _, _)) => *n += 1,
                    None => failed = Some((1, e, standing.entry.key.tenant.clone())),
                }
            }
        }
    }
    // A tenant over its slots, or the store away: the next pass retries.
    // One line a pass, however many rankings failed, with the first cause.
    if let Some((failures, error, tenant)) = failed {
        tracing::warn!(failures, first_error = %error, first_tenant = %tenant, "ranking refresh failed");
    }
    metrics::ranking_refresh_pass();
    metrics::ranking_cache_groups(cache.groups());
}

async fn one<R: GroupReader + ?Sized>(cache: &GroupCache, reader: &R, standing: &Standing, now: i64) -> Result<Refreshed, QueryError> {
    let Standing { entry, moves } = standing;
    let kept = &entry.key;
    let target = moves.hours_at(kept.hours, now);
    // Slid already (by a request, or an earlier pass) yet still asked for
    // at its own hours: a range that did not move after all. Keep it fresh there.
    let target = if target != kept.hours && cache.holds(&Key { hours: target, ..kept.clone() }) { kept.hours } else { target };
    let key = Key { hours: target, ..kept.clone() };
    let scope = scope_of(&key);
    let done = if target != kept.hours {
        let slid = match ranking::slices(kept.hours, target) {
            Some(slices) => cached::slide(reader, &scope, &key.group_by, entry, key.clone(), slices).await?,
            None => None,
        };
        match slid {
            Some(slid) => (slid, Refreshed::Slid),
            None => (Entry::new(key.clone(), reader.groups(&scope, &key.group_by).await?), Refreshed::Reread),
        }
    } else if reader.event_count(&scope, &key.group_by).await? == entry.total.s_events {
        return Ok(Refreshed::Fresh);
    } else {
        (Entry::new(key.clone(), reader.groups(&scope, &key.group_by).await?), Refreshed::Reread)
    };
    cache.refreshed(entry, done.0);
    Ok(done.1)
}

/// The scope a key's whole hours were read with (rankings are kept for
/// window-time scopes only).
fn scope_of(key: &Key) -> Scope {
    let at = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
    Scope { tenant: key.tenant.clone(), time_column: TimeColumn::WindowStart, from: at(key.hours.0), to: at(key.hours.1), filters: key.filters.clone() }
}

/// The refresher task: a pass every `every` over `store`'s ranking cache
/// ([`QueryStore::refresh_rankings`]). It holds the store weakly, so it
/// ends with the server that owns the store; dropping the handle stops it
/// at once (the server does, when it shuts down).
#[derive(Debug)]
pub struct Refresher(Option<tokio::task::JoinHandle<()>>);

impl Refresher {
    /// Starts the task on the current Tokio runtime.
    pub fn spawn(store: &Arc<dyn QueryStore>, every: Duration, idle: Duration) -> Refresher {
        let store: Weak<dyn QueryStore> = Arc::downgrade(store);
        Refresher(Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            // A slow pass (a re-read under load) delays the next; no burst after it.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else { return };
                store.refresh_rankings(idle).await;
            }
        })))
    }

    /// Lets the task run until the store is dropped (for a server with no
    /// shutdown hook of its own to hold the handle in).
    pub fn detach(mut self) {
        self.0.take();
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}
