//! Rankings (top spenders, margins) from per-group sums kept between requests, exact as of each request.
//!
//! Why: a dashboard asks the same standing question ("top spenders, last
//! 30 days") again and again, and every answer groups ~100,000 users' rows
//! (~250 ms on two cores and ClickHouse 18.16, most of it per group, whatever
//! the table design). The sums over a range's whole hours rarely change once
//! those hours are past, so they are worth keeping.
//!
//! How it stays exact:
//! - A request's range `[from, to)` splits into its whole past UTC hours
//!   `[hour_from, hour_to)` and at most two edges: the partial hour at the
//!   start, and the rest from `hour_to` (a partial hour, or the current hour
//!   and anything later when the range ends in the future). The cache
//!   keeps each group's sums over the whole hours, keyed by tenant, filters,
//!   grouping and the whole-hour range; the edges (minute rows of about two
//!   hours at most, since nothing is later than a few minutes from now) are
//!   read on every request.
//! - Before a kept entry is used, the events in its whole hours are summed
//!   again: one column, no grouping (~12 ms where grouping takes ~200). Rollup
//!   rows are only ever added, each with at least one event (merges sum
//!   rows, never drop a row with events, and nothing deletes), so the same
//!   event count means the same rows. Anything added since, a late event or a
//!   flush still landing, changes the count and the entry is read again.
//!
//! - When the hour turns under a dashboard's "last 30 days", the new whole
//!   hours differ from a kept entry's by an hour at each end. The entry is
//!   slid: the hour that left is read and subtracted, the hour that came is
//!   read and added, and the old entry is checked after those reads (so the
//!   subtracted hour was read from the rows it holds). Up to
//!   [`MAX_SLIDE_HOURS`] of difference are slid; farther, it is read whole.
//!
//! A new range, or one whose whole hours just received events, costs one
//! full read, as without the cache, unless the background refresher
//! (`refresh.rs`) got there first. Memory is bounded by the number of
//! groups kept (`server.ranking_cache_groups`, about 250 bytes a group; 0
//! turns the cache off; see `cache.rs`).

use std::cmp::Ordering;
use std::collections::HashMap;

use meterline_domain::SumRow;
use meterline_sql::Value;
use meterline_domain::Metric;

/// How a ranking orders its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// By a metric, then by key.
    Metric { metric: Metric, descending: bool },
    /// Lowest margin first, then by key.
    Margin,
}

/// What a ranking endpoint (top spenders, margins) asks at once.
#[derive(Debug, Clone)]
pub struct RankQuery {
    pub group_by: Vec<&'static str>,
    pub order: Order,
    /// Only groups whose revenue is below their cost.
    pub negative_only: bool,
    pub limit: i64,
    /// Also count the groups with a negative margin.
    pub count_negative: bool,
}

/// A ranking's rows, the scope's total, and the negative-margin count if asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranking {
    pub rows: Vec<SumRow>,
    pub total: SumRow,
    pub negative: Option<u64>,
}

/// The whole UTC hours inside `[from, to)`, if any.
pub fn whole_hours(from: i64, to: i64) -> Option<(i64, i64)> {
    let hour_from = (from + 3_599).div_euclid(3_600) * 3_600;
    let hour_to = to.div_euclid(3_600) * 3_600;
    (hour_from < hour_to).then_some((hour_from, hour_to))
}

/// What a kept entry answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub tenant: String,
    pub filters: Vec<(&'static str, Value)>,
    pub group_by: Vec<&'static str>,
    pub hours: (i64, i64),
}

/// Each group's sums over a key's whole hours, and their total.
#[derive(Debug)]
pub struct Entry {
    pub key: Key,
    pub groups: Vec<SumRow>,
    pub total: SumRow,
    /// A group's index by the hash of its keys: a request finds its edge
    /// groups here in one probe each, where a binary search over the groups
    /// (or their hashes) missed the cache on every step (~1 µs an edge).
    by_hash: HashMap<u64, u32>,
}

impl Entry {
    pub fn new(key: Key, groups: Vec<SumRow>) -> Entry {
        let mut total = SumRow::default();
        let mut by_hash = HashMap::with_capacity(groups.len());
        for (at, g) in groups.iter().enumerate() {
            add(&mut total, g);
            by_hash.entry(hash(g)).or_insert(at as u32);
        }
        Entry { key, groups, total, by_hash }
    }

    /// The index of the kept group with `row`'s keys.
    fn find(&self, row: &SumRow) -> Option<usize> {
        find_in(&self.groups, &self.by_hash, row)
    }
}

/// The most hours a kept entry is slid by (hours read instead of the whole
/// range); farther apart, reading the whole range again is as cheap.
pub const MAX_SLIDE_HOURS: i64 = 24;

/// The whole hours to read to turn `base` hours into `target` hours: (from,
/// to, whether the slice is added or subtracted), or None if the ranges do
/// not overlap or are farther apart than [`MAX_SLIDE_HOURS`].
pub fn slices(base: (i64, i64), target: (i64, i64)) -> Option<Vec<(i64, i64, bool)>> {
    let ((a0, b0), (a, b)) = (base, target);
    if a >= b0 || a0 >= b || (a - a0).abs() + (b - b0).abs() > MAX_SLIDE_HOURS * 3_600 {
        return None;
    }
    let mut out = Vec::new();
    match a.cmp(&a0) {
        Ordering::Less => out.push((a, a0, true)),
        Ordering::Greater => out.push((a0, a, false)),
        Ordering::Equal => {}
    }
    match b.cmp(&b0) {
        Ordering::Greater => out.push((b0, b, true)),
        Ordering::Less => out.push((b, b0, false)),
        Ordering::Equal => {}
    }
    Some(out)
}

impl Entry {
    /// This entry moved to `key`'s hours: the groups of each slice (from
    /// [`slices`]) added or subtracted. A group left with no events has no
    /// rows in the new range; it stays, all zero, and [`rank`] skips it (as a
    /// GROUP BY would not return it) until the entry is next read whole.
    /// None if a subtracted group is not kept with at least its events,
    /// which a current entry always has.
    pub fn slid(&self, key: Key, slices: &[(bool, Vec<SumRow>)]) -> Option<Entry> {
        let mut groups = self.groups.clone();
        let mut by_hash = self.by_hash.clone();
        let mut total = self.total.clone();
        for (added, rows) in slices {
            for r in rows {
                let at = match (find_in(&groups, &by_hash, r), added) {
                    (Some(at), _) => at,
                    (None, true) => {
                        by_hash.entry(hash(r)).or_insert(groups.len() as u32);
                        let (g_user, g_customer, g_feature, g_model) = (r.g_user.clone(), r.g_customer.clone(), r.g_feature.clone(), r.g_model.clone());
                        groups.push(SumRow { g_user, g_customer, g_feature, g_model, ..SumRow::default() });
                        groups.len() - 1
                    }
                    (None, false) => return None,
                };
                let g = &mut groups[at];
                if *added {
                    add(g, r);
                    add(&mut total, r);
                } else {
                    if g.s_events < r.s_events {
                        return None;
                    }
                    subtract(g, r);
                    subtract(&mut total, r);
                }
            }
        }
        Some(Entry { key, groups, total, by_hash })
    }
}

/// The index in `groups` of the group with `row`'s keys, by its hash.
fn find_in(groups: &[SumRow], by_hash: &HashMap<u64, u32>, row: &SumRow) -> Option<usize> {
    let at = *by_hash.get(&hash(row))? as usize;
    if keys(&groups[at]) == keys(row) {
        return Some(at);
    }
    // Two groups' keys share a 64-bit hash: exact, if slow, by scanning.
    groups.iter().position(|g| keys(g) == keys(row))
}

fn hash(r: &SumRow) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    keys(r).hash(&mut h);
    h.finish()
}

fn add(a: &mut SumRow, b: &SumRow) {
    a.add(b);
}

fn subtract(a: &mut SumRow, b: &SumRow) {
    a.subtract(b);
}

fn margin(r: &SumRow) -> i128 {
    r.margin()
}

fn keys(r: &SumRow) -> (&str, &str, &str, &str) {
    r.keys()
}

/// A group's place in `order`, lowest first: the value (negated when
/// descending), then the group's keys, byte order as ClickHouse compares.
/// The same order as the SQL rankings (`queries::top`, `queries::sums` by margin).
fn value(order: Order, r: &SumRow) -> i128 {
    match order {
        Order::Metric { metric: m, descending: true } => -m.of(r),
        Order::Metric { metric: m, descending: false } => m.of(r),
        Order::Margin => margin(r),
    }
}

fn compare(a: &(i128, &SumRow), b: &(i128, &SumRow)) -> Ordering {
    a.0.cmp(&b.0).then_with(|| keys(a.1).cmp(&keys(b.1)))
}

/// The ranking `q` asks for over the kept groups plus the edges' groups.
pub fn rank(entry: &Entry, edges: &[SumRow], q: &RankQuery) -> Ranking {
    let mut total = entry.total.clone();
    // Edge groups that are also kept become patched copies (by kept index);
    // the rest are groups of their own. Edges are at most two hours of rows.
    let mut patched: Vec<(usize, SumRow)> = Vec::new();
    let mut only_edges: Vec<&SumRow> = Vec::new();
    for e in edges {
        add(&mut total, e);
        match entry.find(e) {
            Some(at) => {
                let mut sum = entry.groups[at].clone();
                add(&mut sum, e);
                patched.push((at, sum));
            }
            None => only_edges.push(e),
        }
    }
    patched.sort_unstable_by_key(|(at, _)| *at);
    let mut all: Vec<(i128, &SumRow)> = Vec::with_capacity(entry.groups.len() + only_edges.len());
    let mut next = patched.iter().peekable();
    for (at, g) in entry.groups.iter().enumerate() {
        let row = match next.peek() {
            Some((p, sum)) if *p == at => {
                next.next();
                sum
            }
            _ => g,
        };
        // A group slid out of range (see `Entry::slid`).
        if row.s_events > 0 {
            all.push((value(q.order, row), row));
        }
    }
    all.extend(only_edges.into_iter().map(|e| (value(q.order, e), e)));
    let negative = q.count_negative.then(|| all.iter().filter(|(_, r)| margin(r) < 0).count() as u64);
    if q.negative_only {
        all.retain(|(_, r)| margin(r) < 0);
    }
    let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
    if all.len() > limit && limit > 0 {
        all.select_nth_unstable_by(limit - 1, compare);
    }
    all.truncate(limit);
    all.sort_unstable_by(compare);
    Ranking { rows: all.into_iter().map(|(_, r)| r.clone()).collect(), total, negative }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, cost: i64, revenue: i64) -> SumRow {
        SumRow { g_user: user.into(), s_events: 1, s_cost: cost, s_revenue: revenue, s_input: 10, ..SumRow::default() }
    }

    fn key(hours: (i64, i64)) -> Key {
        Key { tenant: "t".into(), filters: Vec::new(), group_by: vec!["user_id"], hours }
    }

    fn q(order: Order, limit: i64) -> RankQuery {
        RankQuery { group_by: vec!["user_id"], order, negative_only: false, limit, count_negative: true }
    }

    #[test]
    fn whole_hours_are_inside_the_range() {
        assert_eq!(whole_hours(3_600, 7_200), Some((3_600, 7_200)));
        assert_eq!(whole_hours(3_601, 10_799), None);
        assert_eq!(whole_hours(3_601, 10_800), Some((7_200, 10_800)));
        assert_eq!(whole_hours(-1, 3_600), Some((0, 3_600)));
    }

    #[test]
    fn edges_add_to_kept_groups_and_new_groups_rank_too() {
        let entry = Entry::new(key((0, 3_600)), vec![row("a", 50, 100), row("b", 40, 10), row("c", 30, 0)]);
        assert_eq!((entry.total.s_cost, entry.total.s_events), (120, 3));
        let edges = [row("c", 25, 0), row("d", 60, 0)];
        let r = rank(&entry, &edges, &q(Order::Metric { metric: Metric::Cost, descending: true }, 3));
        let got: Vec<(&str, i64)> = r.rows.iter().map(|r| (r.g_user.as_str(), r.s_cost)).collect();
        assert_eq!(got, [("d", 60), ("c", 55), ("a", 50)]);
        assert_eq!((r.total.s_cost, r.total.s_events), (205, 5));
        assert_eq!(r.negative, Some(3), "b, c and d lose money");
    }

    #[test]
    fn ties_break_by_key_and_ascending_orders_work() {
        let entry = Entry::new(key((0, 3_600)), vec![row("b", 10, 10), row("a", 10, 10), row("c", 5, 50)]);
        let desc = rank(&entry, &[], &q(Order::Metric { metric: Metric::Cost, descending: true }, 2));
        assert_eq!(desc.rows.iter().map(|r| r.g_user.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let asc = rank(&entry, &[], &q(Order::Metric { metric: Metric::Cost, descending: false }, 10));
        assert_eq!(asc.rows.iter().map(|r| r.g_user.as_str()).collect::<Vec<_>>(), ["c", "a", "b"]);
        let margin = rank(&entry, &[], &RankQuery { negative_only: true, ..q(Order::Margin, 10) });
        assert!(margin.rows.is_empty(), "nobody loses money");
        let tokens = rank(&entry, &[row("c", 0, 0)], &q(Order::Metric { metric: Metric::Tokens, descending: true }, 1));
        assert_eq!((tokens.rows[0].g_user.as_str(), tokens.rows[0].s_input), ("c", 20));
    }

    #[test]
    fn slices_turn_one_hour_range_into_another() {
        let h = 3_600;
        assert_eq!(slices((0, 10 * h), (h, 11 * h)), Some(vec![(0, h, false), (10 * h, 11 * h, true)]));
        assert_eq!(slices((h, 11 * h), (0, 10 * h)), Some(vec![(0, h, true), (10 * h, 11 * h, false)]));
        assert_eq!(slices((0, 10 * h), (0, 10 * h)), Some(vec![]));
        assert_eq!(slices((0, 10 * h), (10 * h, 20 * h)), None, "no overlap");
        assert_eq!(slices((0, 100 * h), (13 * h, 112 * h)), None, "25 hours apart: read whole");
        assert_eq!(slices((0, 100 * h), (12 * h, 112 * h)).map(|s| s.len()), Some(2));
    }

    #[test]
    fn a_slid_entry_equals_one_read_over_its_hours() {
        let two = |user: &str, cost: i64| SumRow { s_events: 2, ..row(user, cost, 0) };
        let base = Entry::new(key((0, 7_200)), vec![two("a", 10), row("b", 5, 0), row("c", 1, 0)]);
        // The hour that left held b's 5 and part of a; the new hour has c and d.
        let slid = base
            .slid(key((3_600, 10_800)), &[(false, vec![row("a", 4, 0), row("b", 5, 0)]), (true, vec![row("c", 2, 0), row("d", 3, 0)])])
            .expect("consistent");
        let mut got: Vec<(&str, i64, u64)> = slid.groups.iter().map(|g| (g.g_user.as_str(), g.s_cost, g.s_events)).collect();
        got.sort();
        assert_eq!(got, [("a", 6, 1), ("b", 0, 0), ("c", 3, 2), ("d", 3, 1)]);
        assert_eq!((slid.total.s_cost, slid.total.s_events), (12, 4));
        // b had one event, all of it in the hour that left: not ranked, as a GROUP BY would not return it.
        let ranked = rank(&slid, &[], &q(Order::Metric { metric: Metric::Cost, descending: false }, 10));
        assert_eq!(ranked.rows.iter().map(|r| r.g_user.as_str()).collect::<Vec<_>>(), ["c", "d", "a"]);
        assert_eq!(ranked.negative, Some(3));
        assert_eq!(slid.key.hours, (3_600, 10_800));
        let found = slid.find(&row("d", 0, 0)).map(|at| slid.groups[at].s_cost);
        assert_eq!(found, Some(3), "new groups are found by hash");
        assert!(base.slid(key((3_600, 10_800)), &[(false, vec![row("z", 1, 0)])]).is_none(), "subtracting what was never kept");
        assert!(base.slid(key((3_600, 10_800)), &[(false, vec![row("c", 1, 0), row("c", 1, 0)])]).is_none(), "more events than kept");
    }
}
