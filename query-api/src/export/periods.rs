//! Billing periods: `[from, to)` cut at each subject's subscription cycle boundaries (or the calendar months), and the segments one statement sums.
//!
//! A subject with a subscription `cycle_start` is billed per cycle
//! ([`meterline_limits::window`] with `Period::Cycle`: the anchor moved whole
//! months, its day clamped at month ends); a subject without one per UTC
//! calendar month. Each period is clipped to `[from, to)`. The statement sums
//! per segment of the union of every subject's boundaries: each segment lies
//! in exactly one period of every subject, so a subject's period is the sum
//! of the segments it holds.

use chrono::{DateTime, Utc};
use meterline_limits::{Period, window};
use std::collections::BTreeSet;

/// A time as the statements bind it: `(Unix seconds, nanoseconds)`.
pub fn edge(t: DateTime<Utc>) -> (i64, i64) {
    (t.timestamp(), i64::from(t.timestamp_subsec_nanos()))
}

/// The period of a subject (cycle-anchored on `anchor`, else the calendar
/// month) that holds `at`, clipped to `[from, to)`.
pub fn period(anchor: Option<DateTime<Utc>>, at: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let (start, end) = window(Period::Cycle, anchor, at);
    (start.max(from), end.min(to))
}

/// Every period boundary of a subject strictly inside `(from, to)`, in order.
pub fn inner_boundaries(anchor: Option<DateTime<Utc>>, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let (_, end) = window(Period::Cycle, anchor, at);
        if end >= to {
            break;
        }
        out.push(end);
        at = end;
    }
    out
}

/// The segment boundaries of an export: `from`, `to`, the calendar months'
/// starts (for subjects without an anchor) and every distinct anchor's cycle
/// starts in between, sorted and distinct.
pub fn segments<'a>(anchors: impl IntoIterator<Item = &'a DateTime<Utc>>, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut all: BTreeSet<DateTime<Utc>> = BTreeSet::from([from, to]);
    // Subjects sharing an anchor share its boundaries: each anchor once.
    let distinct: BTreeSet<DateTime<Utc>> = anchors.into_iter().copied().collect();
    all.extend(inner_boundaries(None, from, to));
    for anchor in distinct {
        all.extend(inner_boundaries(Some(anchor), from, to));
    }
    all.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn an_anchor_on_the_31st_clamps_each_month_and_returns_to_the_31st() {
        let anchor = Some(t("2026-01-31T12:30:15Z"));
        let (from, to) = (t("2026-01-01T00:00:00Z"), t("2026-05-01T00:00:00Z"));
        assert_eq!(
            inner_boundaries(anchor, from, to),
            vec![t("2026-01-31T12:30:15Z"), t("2026-02-28T12:30:15Z"), t("2026-03-31T12:30:15Z"), t("2026-04-30T12:30:15Z")]
        );
        assert_eq!(period(anchor, t("2026-03-01T00:00:00Z"), from, to), (t("2026-02-28T12:30:15Z"), t("2026-03-31T12:30:15Z")));
        // Before the first boundary: the cycle that started before `from`, clipped.
        assert_eq!(period(anchor, from, from, to), (from, t("2026-01-31T12:30:15Z")));
    }

    #[test]
    fn a_mid_period_range_is_clipped_at_both_ends() {
        let anchor = Some(t("2025-11-15T12:30:15.25Z"));
        let (from, to) = (t("2026-01-20T08:00:00Z"), t("2026-02-10T00:00:00Z"));
        assert!(inner_boundaries(anchor, from, to).is_empty());
        assert_eq!(period(anchor, t("2026-02-01T00:00:00Z"), from, to), (from, to));
        let to = t("2026-03-01T00:00:00Z");
        assert_eq!(inner_boundaries(anchor, from, to), vec![t("2026-02-15T12:30:15.25Z")]);
        assert_eq!(period(anchor, t("2026-02-15T12:30:15.25Z"), from, to), (t("2026-02-15T12:30:15.25Z"), to));
        assert_eq!(period(anchor, t("2026-02-15T12:30:15.249999999Z"), from, to), (from, t("2026-02-15T12:30:15.25Z")));
    }

    #[test]
    fn without_an_anchor_periods_are_calendar_months() {
        let (from, to) = (t("2025-12-10T00:00:00Z"), t("2026-03-01T00:00:00Z"));
        assert_eq!(inner_boundaries(None, from, to), vec![t("2026-01-01T00:00:00Z"), t("2026-02-01T00:00:00Z")]);
        assert_eq!(period(None, t("2025-12-31T23:59:59Z"), from, to), (from, t("2026-01-01T00:00:00Z")));
        assert_eq!(period(None, t("2026-02-28T00:00:00Z"), from, to), (t("2026-02-01T00:00:00Z"), to));
        assert!(inner_boundaries(None, t("2026-01-02T00:00:00Z"), t("2026-01-03T00:00:00Z")).is_empty());
    }

    #[test]
    fn segments_merge_every_subjects_boundaries_once() {
        let (from, to) = (t("2026-01-01T00:00:00Z"), t("2026-03-01T00:00:00Z"));
        let a = t("2025-06-15T12:30:15Z");
        let segs = segments([&a, &a], from, to);
        assert_eq!(
            segs,
            vec![from, t("2026-01-15T12:30:15Z"), t("2026-02-01T00:00:00Z"), t("2026-02-15T12:30:15Z"), to]
        );
        // Every segment lies within one period of each subject.
        for w in segs.windows(2) {
            for anchor in [None, Some(a)] {
                let (s, e) = period(anchor, w[0], from, to);
                assert!(s <= w[0] && w[1] <= e, "[{}, {}) in [{s}, {e})", w[0], w[1]);
            }
        }
    }
}
