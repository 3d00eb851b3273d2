//! The ranking cache's kept entries: most recently asked first, bounded in groups, and which of them are standing questions the background refresher keeps fresh.
//!
//! Bounds:
//! - Memory: at most `server.ranking_cache_groups` groups over all entries;
//!   the least recently asked go first (an entry larger than the bound is
//!   answered, not kept).
//! - Refresh work: an entry is a *standing question* while a request asked
//!   for it within `server.ranking_refresh_idle_secs`; the refresher looks at
//!   most [`MAX_STANDING`] of them per pass, most recently asked first. An
//!   entry asked no more is forgotten by the refresher (no statement is sent
//!   for it again) but stays for requests until the group bound evicts it.
//! - An entry whose question moved to new hours (the hour turned under
//!   "the last 30 days") is replaced by the entry kept for those hours,
//!   slid or read whole, by a request or the refresher alike: the question
//!   moved on, and keeping both would grow the cache by a ranking's groups
//!   every hour until the bound. An entry kept for other hours (a
//!   neighbouring range) replaces nothing. A client whose clock is behind
//!   the turn gets the old hours slid back, kept beside the new ones until
//!   the next request on the server's clock keeps the new hours again: it
//!   costs that client a slide, never a wrong answer.
//!
//! Entries are keyed by tenant first ([`Key`]): nothing one tenant asked is
//! ever answered to, or refreshed on behalf of, another.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ranking::{Entry, Key, slices};

/// The most standing questions one refresher pass looks at: each costs one
/// event count per pass (~12 ms at 100,000 users), so a busy cache of many
/// small tenants' questions cannot turn the refresher into a load of its own.
pub const MAX_STANDING: usize = 32;

/// How a question's whole hours move with the clock, judged from the
/// request's `to` against the time it was asked (see [`Moves::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moves {
    /// Ended more than an hour before it was asked: its hours never move.
    Fixed,
    /// Ends more than an hour after it was asked ("this month", "until
    /// tomorrow"): its start stays, its end follows the clock up to `until`.
    End { until: i64 },
    /// Ends about when it was asked ("the last 30 days", the dashboard's
    /// default): both ends follow the clock.
    Trailing,
}

impl Moves {
    /// How a range ending at `to`, asked at `now` (Unix seconds), moves.
    /// A range ending within an hour of the ask is taken for a trailing
    /// window: a client computes "now" on its own clock, a little off the
    /// server's, and a fixed range that recent is re-read by a request at
    /// most once an hour (a slide back) if the guess was wrong.
    pub fn of(to: i64, now: i64) -> Moves {
        if to > now + 3_600 {
            Moves::End { until: to }
        } else if to >= now - 3_600 {
            Moves::Trailing
        } else {
            Moves::Fixed
        }
    }

    /// The whole hours a question kept at `hours` will ask for at `now`, the
    /// way [`whole_hours`](crate::ranking::whole_hours) cuts a range (only
    /// past hours are kept).
    pub fn hours_at(self, hours: (i64, i64), now: i64) -> (i64, i64) {
        let hour = now.div_euclid(3_600) * 3_600;
        match self {
            Moves::Fixed => hours,
            Moves::End { until } => (hours.0, hours.1.max(hour.min(until.div_euclid(3_600) * 3_600))),
            Moves::Trailing if hour > hours.1 => (hours.0 + (hour - hours.1), hour),
            Moves::Trailing => hours,
        }
    }
}

#[derive(Debug)]
struct Slot {
    entry: Arc<Entry>,
    /// When a request last asked for it (or for the entry it was slid from).
    asked: Instant,
    /// How the question that last asked for it moves with the clock.
    moves: Moves,
}

/// The kept entries, most recently asked first, at most `max_groups` groups in all.
#[derive(Debug)]
pub struct GroupCache {
    max_groups: usize,
    slots: Mutex<VecDeque<Slot>>,
}

/// A standing question as the refresher sees it.
#[derive(Debug, Clone)]
pub struct Standing {
    pub entry: Arc<Entry>,
    pub moves: Moves,
}

impl GroupCache {
    pub fn new(max_groups: usize) -> GroupCache {
        GroupCache { max_groups, slots: Mutex::new(VecDeque::new()) }
    }

    pub fn enabled(&self) -> bool {
        self.max_groups > 0
    }

    fn slots(&self) -> MutexGuard<'_, VecDeque<Slot>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry for `key`, asked for now by a request whose range `moves`.
    pub fn get(&self, key: &Key, moves: Moves) -> Option<Arc<Entry>> {
        let mut slots = self.slots();
        let at = slots.iter().position(|s| &s.entry.key == key)?;
        let mut slot = slots.remove(at)?;
        (slot.asked, slot.moves) = (Instant::now(), moves);
        let entry = slot.entry.clone();
        slots.push_front(slot);
        Some(entry)
    }

    /// The kept entry for the same tenant, filters and grouping whose hours
    /// are fewest hours of reading away from `key`'s, within
    /// [`MAX_SLIDE_HOURS`](crate::ranking::MAX_SLIDE_HOURS).
    pub fn nearest(&self, key: &Key) -> Option<Arc<Entry>> {
        let slots = self.slots();
        slots
            .iter()
            .map(|s| &s.entry)
            .filter(|e| e.key.tenant == key.tenant && e.key.filters == key.filters && e.key.group_by == key.group_by)
            .filter(|e| slices(e.key.hours, key.hours).is_some())
            .min_by_key(|e| (e.key.hours.0 - key.hours.0).abs() + (e.key.hours.1 - key.hours.1).abs())
            .cloned()
    }

    /// Keeps `entry`, asked at `now` (Unix seconds) by a request whose
    /// range `moves`, evicting the least recently asked beyond the bound;
    /// an entry larger than the bound is not kept. It replaces the entry
    /// with its key, and any entry of the same question (tenant, filters,
    /// grouping) whose hours moved to `entry`'s by `now`, however `entry`
    /// was made (slid from it, or read whole because it was stale or too
    /// far away).
    pub fn put(&self, entry: Entry, moves: Moves, now: i64) -> Arc<Entry> {
        let entry = Arc::new(entry);
        let mut slots = self.slots();
        let key = &entry.key;
        let same_question = |k: &Key| k.tenant == key.tenant && k.filters == key.filters && k.group_by == key.group_by;
        let moved_on = |s: &Slot| s.moves.hours_at(s.entry.key.hours, now) == key.hours;
        slots.retain(|s| s.entry.key != *key && !(same_question(&s.entry.key) && moved_on(s)));
        slots.push_front(Slot { entry: entry.clone(), asked: Instant::now(), moves });
        self.bound(&mut slots);
        entry
    }

    /// The refresher's write: `fresh` replaces `old`, read again over the
    /// same hours or slid to the hours its question moved to, keeping when
    /// it was asked and its place in line: refreshing is not asking.
    /// Nothing is written if `old` is no longer kept, or a request kept an
    /// entry for `fresh`'s key meanwhile (what a request keeps is as fresh
    /// as what the refresher read).
    pub fn refreshed(&self, old: &Arc<Entry>, fresh: Entry) -> bool {
        let mut slots = self.slots();
        let Some(at) = slots.iter().position(|s| Arc::ptr_eq(&s.entry, old)) else { return false };
        if fresh.key != old.key && slots.iter().any(|s| s.entry.key == fresh.key) {
            return false;
        }
        slots[at].entry = Arc::new(fresh);
        self.bound(&mut slots);
        true
    }

    /// Whether an entry for `key` is kept.
    pub fn holds(&self, key: &Key) -> bool {
        self.slots().iter().any(|s| &s.entry.key == key)
    }

    /// The standing questions asked within `idle` of `now`, most recently
    /// asked first, at most [`MAX_STANDING`].
    pub fn standing(&self, now: Instant, idle: Duration) -> Vec<Standing> {
        self.slots()
            .iter()
            .filter(|s| now.saturating_duration_since(s.asked) <= idle)
            .map(|s| Standing { entry: s.entry.clone(), moves: s.moves })
            .take(MAX_STANDING)
            .collect()
    }

    fn bound(&self, slots: &mut VecDeque<Slot>) {
        slots.retain(|s| s.entry.groups.len() <= self.max_groups);
        let mut held: usize = slots.iter().map(|s| s.entry.groups.len()).sum();
        while held > self.max_groups {
            held -= slots.pop_back().map_or(0, |s| s.entry.groups.len());
        }
    }

    /// Groups held now.
    pub fn groups(&self) -> usize {
        self.slots().iter().map(|s| s.entry.groups.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_domain::SumRow;

    fn row(user: &str) -> SumRow {
        SumRow { g_user: user.into(), s_events: 1, s_cost: 1, ..SumRow::default() }
    }

    fn key(hours: (i64, i64)) -> Key {
        Key { tenant: "t".into(), filters: Vec::new(), group_by: vec!["user_id"], hours }
    }

    fn entry(hours: (i64, i64), groups: usize) -> Entry {
        Entry::new(key(hours), (0..groups).map(|n| row(&n.to_string())).collect())
    }

    const F: Moves = Moves::Fixed;

    #[test]
    fn the_cache_keeps_at_most_its_bound_of_groups() {
        let cache = GroupCache::new(5);
        cache.put(entry((0, 1), 2), F, 0);
        cache.put(entry((0, 2), 2), F, 0);
        assert!(cache.get(&key((0, 1)), F).is_some(), "used, so most recent");
        cache.put(entry((0, 3), 2), F, 0);
        assert_eq!(cache.groups(), 4);
        assert!(cache.get(&key((0, 2)), F).is_none(), "the least recently used went");
        cache.put(entry((0, 1), 1), F, 0);
        assert_eq!(cache.get(&key((0, 1)), F).map(|e| e.groups.len()), Some(1), "replaced, not duplicated");
        let big = cache.put(entry((0, 4), 6), F, 0);
        assert_eq!(big.groups.len(), 6);
        assert!(cache.get(&key((0, 4)), F).is_none(), "larger than the bound: answered, not kept");
        assert!(!GroupCache::new(0).enabled());
    }

    #[test]
    fn standing_questions_are_the_recently_asked_and_slid_ones_are_replaced() {
        let h = 3_600;
        let cache = GroupCache::new(100);
        let a = cache.put(entry((0, 10 * h), 2), Moves::Trailing, 10 * h + 30);
        let t0 = Instant::now();
        assert_eq!(cache.standing(t0, Duration::from_secs(60)).len(), 1);
        assert!(cache.standing(t0 + Duration::from_secs(61), Duration::from_secs(60)).is_empty(), "idle: forgotten by the refresher");
        assert!(cache.get(&key((0, 10 * h)), Moves::Trailing).is_some(), "but still kept for requests");

        // The refresher slides it: the slid entry takes its place, with the
        // time it was asked; the old hours are no longer kept.
        assert!(cache.refreshed(&a, entry((h, 11 * h), 3)));
        let standing = cache.standing(Instant::now(), Duration::from_secs(60));
        assert_eq!(standing.iter().map(|s| s.entry.key.hours).collect::<Vec<_>>(), [(h, 11 * h)]);
        assert_eq!(cache.groups(), 3, "replaced, not kept beside");
        assert!(cache.get(&key((0, 10 * h)), F).is_none());
        assert!(!cache.refreshed(&a, entry((2 * h, 12 * h), 3)), "the old entry is gone: nothing written");

        // A request keeps a trailing question where the clock moved it
        // (slid, or read whole after a late event): the old hours go too.
        let now = 11 * h + 30;
        assert!(cache.get(&key((h, 11 * h)), Moves::Trailing).is_some());
        cache.put(entry((2 * h, 12 * h), 4), Moves::Trailing, now + h);
        assert!(cache.get(&key((h, 11 * h)), F).is_none(), "the question moved on");
        assert_eq!(cache.groups(), 4);

        // Kept anywhere else (the old hours asked by a clock behind the
        // turn): both kept, both standing.
        assert!(cache.get(&key((2 * h, 12 * h)), Moves::Trailing).is_some());
        cache.put(entry((h, 11 * h), 3), Moves::Trailing, now + h);
        let hours: Vec<_> = cache.standing(Instant::now(), Duration::from_secs(60)).iter().map(|s| s.entry.key.hours).collect();
        assert_eq!(hours, [(h, 11 * h), (2 * h, 12 * h)]);
        assert_eq!(cache.groups(), 7, "both kept");
        // Another question's entries are never taken for this one's.
        let other = Entry::new(Key { group_by: vec!["customer_id"], ..key((2 * h, 12 * h)) }, vec![row("c")]);
        assert!(cache.get(&key((h, 11 * h)), Moves::Trailing).is_some());
        cache.put(other, Moves::Trailing, now + h);
        assert_eq!(cache.groups(), 8, "a grouping by customer replaces nothing grouped by user");

        // Refreshing an entry no longer kept writes nothing.
        let gone = Arc::new(entry((50 * h, 60 * h), 1));
        assert!(!cache.refreshed(&gone, entry((50 * h, 60 * h), 1)));
    }

    #[test]
    fn an_open_ended_question_is_replaced_as_its_end_moves() {
        let h = 3_600;
        let cache = GroupCache::new(1_000);
        // "Until 20:00", asked at 10:00 and again at 11:00: its start stays, its end follows the clock.
        let moves = Moves::End { until: 20 * h };
        cache.put(entry((0, 10 * h), 2), moves, 10 * h + 30);
        cache.put(entry((0, 11 * h), 3), moves, 11 * h + 30);
        assert!(cache.get(&key((0, 10 * h)), F).is_none(), "its end moved on");
        assert_eq!(cache.groups(), 3);
    }

    #[test]
    fn the_refresher_never_writes_over_hours_a_request_kept() {
        let h = 3_600;
        let cache = GroupCache::new(1_000);
        let first = cache.put(entry((0, 10 * h), 2), Moves::Trailing, 10 * h + 30);
        // A client clock ahead asks the next hours before the server's hour turns: both kept.
        cache.put(entry((h, 11 * h), 3), Moves::Trailing, 10 * h + 40);
        assert_eq!(cache.groups(), 5);
        // The refresher then slides the first to those hours: the request's entry stands.
        assert!(!cache.refreshed(&first, entry((h, 11 * h), 9)));
        assert_eq!(cache.get(&key((h, 11 * h)), F).map(|e| e.groups.len()), Some(3));
    }

    #[test]
    fn a_trailing_question_kept_for_a_day_holds_one_entry() {
        let h = 3_600;
        let cache = GroupCache::new(1_000_000);
        let mut kept = cache.put(entry((0, 720 * h), 100), Moves::Trailing, 720 * h + 60);
        for turn in 1..=24 {
            let hours = (turn * h, (720 + turn) * h);
            kept = cache.put(entry(hours, 100), Moves::Trailing, (720 + turn) * h + 60);
        }
        assert_eq!(cache.groups(), 100, "one entry's groups, whatever the hours turned");
        assert_eq!(kept.key.hours, (24 * h, 744 * h));
    }

    #[test]
    fn a_question_moves_with_the_clock_as_its_end_says() {
        let h = 3_600;
        let now = 100 * h + 30;
        assert_eq!(Moves::of(now + 60, now), Moves::Trailing);
        assert_eq!(Moves::of(now - 600, now), Moves::Trailing, "a client clock a little behind");
        assert_eq!(Moves::of(now + 2 * h, now), Moves::End { until: now + 2 * h });
        assert_eq!(Moves::of(now - 2 * h, now), Moves::Fixed);
        let kept = (10 * h, 100 * h);
        assert_eq!(Moves::Trailing.hours_at(kept, now), kept, "the hour has not turned");
        assert_eq!(Moves::Trailing.hours_at(kept, now + h), (11 * h, 101 * h));
        assert_eq!(Moves::End { until: 101 * h + 5 }.hours_at(kept, now + 5 * h), (10 * h, 101 * h), "no later than its end");
        assert_eq!(Moves::Fixed.hours_at(kept, now + 5 * h), kept);
    }
}
