//! Rankings through the [`GroupCache`], over any store that can read a
//! scope's groups: the cache decides what to read (a check, a slide, a whole
//! read) and a [`GroupReader`] reads it. See `ranking.rs` for why it stays exact.

use futures::future::BoxFuture;
use meterline_domain::SumRow;
use meterline_sql::Scope;

use crate::QueryError;
use crate::metrics;
use crate::cache::{GroupCache, Moves};
use crate::ranking::{self, Entry, Key, RankQuery, Ranking};

/// The three reads a cached ranking needs from a store.
pub trait GroupReader: Send + Sync {
    /// Every group's sums over the scope's range.
    fn groups<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>>;
    /// Every group's sums over the scope's minute rows in `ranges`.
    fn edge_groups<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str], ranges: &'a [(i64, i64)]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>>;
    /// The events in the rows [`GroupReader::groups`] reads for the same scope.
    fn event_count<'a>(&'a self, scope: &'a Scope, group_by: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>>;
}

/// A ranking from the kept sums over the range's whole `hours` (checked,
/// slid, or read and kept) plus the partial-hour edges, read every time.
/// Whatever the background refresher did, the kept sums are checked here
/// before they are used: the refresher only saves this request the read.
pub async fn ranking<R: GroupReader + ?Sized>(cache: &GroupCache, reader: &R, scope: &Scope, q: &RankQuery, hours: (i64, i64)) -> Result<Ranking, QueryError> {
    let key = Key { tenant: scope.tenant.clone(), filters: scope.filters.clone(), group_by: q.group_by.clone(), hours };
    let now = chrono::Utc::now().timestamp();
    let moves = Moves::of(scope.to.timestamp(), now);
    let inner = scope.with_range(hours.0, hours.1);
    let (from, to) = (scope.from.timestamp(), scope.to.timestamp());
    let edge_ranges: Vec<(i64, i64)> = [(from, hours.0), (hours.1, to)].into_iter().filter(|(a, b)| a < b).collect();
    let edges = async {
        if edge_ranges.is_empty() {
            return Ok(Vec::new());
        }
        reader.edge_groups(scope, &q.group_by, &edge_ranges).await
    };
    let read = async {
        let groups = reader.groups(&inner, &q.group_by).await?;
        Ok::<_, QueryError>(cache.put(Entry::new(key.clone(), groups), moves, now))
    };
    let (entry, edges) = match cache.get(&key, moves) {
        Some(kept) => {
            let (events, edges) = tokio::try_join!(reader.event_count(&inner, &q.group_by), edges)?;
            if events == kept.total.s_events {
                metrics::ranking_cache("hit");
                (kept, edges)
            } else {
                metrics::ranking_cache("stale");
                (read.await?, edges)
            }
        }
        None => match cache.nearest(&key).and_then(|base| Some((ranking::slices(base.key.hours, hours)?, base))) {
            // A kept entry a few hours away (the hour turned under a
            // dashboard's "last 30 days"): read only the hours between.
            Some((slices, base)) => match tokio::try_join!(slide(reader, scope, &q.group_by, &base, key.clone(), slices), edges)? {
                (Some(entry), edges) => {
                    metrics::ranking_cache("slide");
                    (cache.put(entry, moves, now), edges)
                }
                (None, edges) => {
                    metrics::ranking_cache("stale");
                    (read.await?, edges)
                }
            },
            None => {
                metrics::ranking_cache("miss");
                tokio::try_join!(read, edges)?
            }
        },
    };
    metrics::ranking_cache_groups(cache.groups());
    Ok(ranking::rank(&entry, &edges, q))
}

/// `base` moved to `key`'s hours by reading only the `slices` between
/// (from [`ranking::slices`]), or None if `base` no longer counts every
/// event in its hours (then `key`'s hours are to be read whole).
pub async fn slide<R: GroupReader + ?Sized>(reader: &R, scope: &Scope, group_by: &[&'static str], base: &Entry, key: Key, slices: Vec<(i64, i64, bool)>) -> Result<Option<Entry>, QueryError> {
    let scopes: Vec<(Scope, bool)> = slices.into_iter().map(|(from, to, added)| (scope.with_range(from, to), added)).collect();
    let slices = futures::future::try_join_all(scopes.iter().map(|(s, added)| async move { Ok::<_, QueryError>((*added, reader.groups(s, group_by).await?)) })).await?;
    // The base is checked after the slices were read: an equal count then
    // means the subtracted hours were read from the very rows the base holds.
    let events = reader.event_count(&scope.with_range(base.key.hours.0, base.key.hours.1), group_by).await?;
    Ok((events == base.total.s_events).then(|| base.slid(key, &slices)).flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ranking::Order;
    use chrono::DateTime;
    use meterline_domain::{Metric, TimeColumn};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Minute rows in memory: (window start, user, cost), one event each;
    /// counts the reads of each kind.
    #[derive(Default)]
    struct Fake {
        rows: Mutex<Vec<(i64, String, i64)>>,
        group_reads: AtomicUsize,
        counts: AtomicUsize,
    }

    impl Fake {
        /// One event a minute past each of 30 hours from `T0`, over four users.
        fn thirty_hours() -> Fake {
            let rows = (0..30).map(|h| (T0 + h * H + 60, format!("u{}", h % 4), 10 + h)).collect();
            Fake { rows: Mutex::new(rows), ..Fake::default() }
        }

        fn sums(&self, ranges: &[(i64, i64)]) -> Vec<SumRow> {
            let mut by_user: std::collections::BTreeMap<String, SumRow> = Default::default();
            for (at, user, cost) in self.rows.lock().unwrap().iter() {
                if ranges.iter().any(|(a, b)| a <= at && at < b) {
                    let g = by_user.entry(user.clone()).or_insert_with(|| SumRow { g_user: user.clone(), ..SumRow::default() });
                    g.add(&SumRow { s_events: 1, s_cost: *cost, ..SumRow::default() });
                }
            }
            by_user.into_values().collect()
        }
        fn range(scope: &Scope) -> (i64, i64) {
            (scope.from.timestamp(), scope.to.timestamp())
        }
    }

    impl GroupReader for Fake {
        fn groups<'a>(&'a self, scope: &'a Scope, _: &'a [&'static str]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
            self.group_reads.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(self.sums(&[Fake::range(scope)])) })
        }
        fn edge_groups<'a>(&'a self, _: &'a Scope, _: &'a [&'static str], ranges: &'a [(i64, i64)]) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
            Box::pin(async move { Ok(self.sums(ranges)) })
        }
        fn event_count<'a>(&'a self, scope: &'a Scope, _: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
            self.counts.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(self.sums(&[Fake::range(scope)]).iter().map(|r| r.s_events).sum()) })
        }
    }

    const H: i64 = 3_600;
    const T0: i64 = 1_800_000_000 / H * H;

    fn scope(from: i64, to: i64) -> Scope {
        Scope {
            tenant: "t".into(),
            time_column: TimeColumn::WindowStart,
            from: DateTime::from_timestamp(from, 0).unwrap(),
            to: DateTime::from_timestamp(to, 0).unwrap(),
            filters: vec![],
        }
    }

    fn top() -> RankQuery {
        RankQuery { group_by: vec!["user_id"], order: Order::Metric { metric: Metric::Cost, descending: true }, negative_only: false, limit: 10, count_negative: false }
    }

    async fn ask(cache: &GroupCache, fake: &Fake, from: i64, to: i64) -> Vec<(String, i64)> {
        let hours = ranking::whole_hours(from, to).unwrap();
        let r = ranking(cache, fake, &scope(from, to), &top(), hours).await.unwrap();
        r.rows.iter().map(|r| (r.g_user.clone(), r.s_cost)).collect()
    }

    fn fresh(fake: &Fake, from: i64, to: i64) -> Vec<(String, i64)> {
        let mut rows: Vec<(String, i64)> = fake.sums(&[(from, to)]).into_iter().map(|r| (r.g_user, r.s_cost)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        rows
    }

    #[tokio::test]
    async fn hits_stale_reads_and_slides_agree_with_a_fresh_read() {
        let fake = Fake::thirty_hours();
        let cache = GroupCache::new(1_000);
        let (from, to) = (T0 + 30, T0 + 20 * H + 30);
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "miss");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 1);
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "hit");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 1, "a hit reads no groups");
        // A late event inside the kept hours: the count differs, read again.
        fake.rows.lock().unwrap().push((T0 + 5 * H, "u9".into(), 1_000));
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "stale");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 2);
        // The hour turns: slid by reading the hour that left and the one that came.
        let (from2, to2) = (from + H, to + H);
        assert_eq!(ask(&cache, &fake, from2, to2).await, fresh(&fake, from2, to2), "slide");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 4, "two one-hour slices, not the whole range");
        assert!(fake.counts.load(Ordering::Relaxed) >= 2);
    }

    #[tokio::test]
    async fn the_refresher_rereads_late_hours_so_the_next_ask_reads_no_groups() {
        let fake = Fake::thirty_hours();
        let cache = GroupCache::new(1_000);
        let idle = std::time::Duration::from_secs(60);
        let (from, to) = (T0 + 30, T0 + 20 * H + 30);
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "miss");
        crate::refresh::pass(&cache, &fake, idle).await;
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 1, "unchanged: the refresher only counted");
        // A late event in a kept hour: the refresher reads the hours again, no request needed.
        fake.rows.lock().unwrap().push((T0 + 5 * H, "u9".into(), 1_000));
        crate::refresh::pass(&cache, &fake, idle).await;
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 2, "read again in the background");
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "exact");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 2, "the request found fresh sums: no read of its own");
        // Events the refresher has not seen yet: the request still checks, and reads.
        fake.rows.lock().unwrap().push((T0 + 6 * H, "u8".into(), 2_000));
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "exact without the refresher");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 3);
        // An idle question is no longer refreshed.
        fake.rows.lock().unwrap().push((T0 + 7 * H, "u7".into(), 5));
        crate::refresh::pass(&cache, &fake, std::time::Duration::ZERO).await;
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 3, "forgotten by the refresher");
    }

    #[tokio::test]
    async fn the_refresher_slides_a_trailing_range_when_the_hour_turns() {
        let now = chrono::Utc::now().timestamp();
        let hour = now.div_euclid(H) * H;
        let fake = Fake::default();
        {
            let mut rows = fake.rows.lock().unwrap();
            for h in -30..2 {
                rows.push((hour + h * H + 60, format!("u{}", h.rem_euclid(5)), 100 + h));
            }
        }
        let cache = GroupCache::new(1_000);
        // "The last 20 hours", asked now; then asked again an hour later.
        let (from, to) = (hour - 20 * H + 30, hour + 30);
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "miss");
        crate::refresh::pass_at(&cache, &fake, std::time::Duration::from_secs(60), now + H).await;
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 3, "slid in the background: the hour that left and the one that came");
        let (from2, to2) = (from + H, to + H);
        assert_eq!(ask(&cache, &fake, from2, to2).await, fresh(&fake, from2, to2), "exact");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 3, "the request found the new hours kept: a hit, no slide of its own");
        // The slide replaced the old hours. Asked again after all (a client
        // clock behind the turn): slid back, and from then on both stand,
        // and a late event is read into each by the refresher.
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to), "slid back from the new hours");
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 5, "the hour at each end, not the whole range");
        fake.rows.lock().unwrap().push((hour - 5 * H, "u9".into(), 1_000));
        crate::refresh::pass_at(&cache, &fake, std::time::Duration::from_secs(60), now + H).await;
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 7, "each read again where it is asked, not slid again");
        assert_eq!(ask(&cache, &fake, from, to).await, fresh(&fake, from, to));
        assert_eq!(ask(&cache, &fake, from2, to2).await, fresh(&fake, from2, to2));
        assert_eq!(fake.group_reads.load(Ordering::Relaxed), 7, "both hits");
    }
}
