//! UTC windows by arithmetic: minute and day windows, the aligned day spans
//! of the per-user span rollups, and the seconds ClickHouse's `DateTime` holds.

use chrono::{DateTime, Utc};

/// Width of a minute rollup window, in seconds.
pub const MINUTE_SECS: i64 = 60;
/// Width of a daily rollup window, in seconds (UTC days).
pub const DAY_SECS: i64 = 86_400;

/// Seconds since the epoch as ClickHouse `DateTime` holds them (UInt32),
/// clamped to its range; validated event times are always inside it.
pub fn datetime_secs(ts: DateTime<Utc>) -> u32 {
    u32::try_from(ts.timestamp().max(0)).unwrap_or(u32::MAX)
}

/// The start of the `width`-second window holding `secs`: UTC windows, by
/// the same arithmetic the ClickHouse inserts do (so a server in another
/// time zone assigns the same windows), and the embedded store's.
pub fn window_start(secs: i64, width: i64) -> i64 {
    secs.div_euclid(width) * width
}

/// The span lengths of `rollups_user_span`, in days, longest first.
pub const SPAN_DAYS: [i64; 6] = [32, 16, 8, 4, 2, 1];

/// Covers the whole Unix days `[day_from, day_to)` with the fewest aligned
/// spans of [`SPAN_DAYS`]: `(span_days, first_day)` in order. Greedy from the
/// left is optimal for power-of-two spans aligned to their own length.
pub fn spans(day_from: i64, day_to: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut day = day_from;
    while day < day_to {
        let span = SPAN_DAYS.iter().copied().find(|s| day.rem_euclid(*s) == 0 && day + s <= day_to).unwrap_or(1);
        out.push((span, day));
        day += span;
    }
    out
}

/// The whole UTC days `[day_from, day_to)` inside `[from, to)`, if any.
pub fn whole_days(from: i64, to: i64) -> Option<(i64, i64)> {
    let day_from = (from + DAY_SECS - 1).div_euclid(DAY_SECS) * DAY_SECS;
    let day_to = to.div_euclid(DAY_SECS) * DAY_SECS;
    (day_from < day_to).then_some((day_from, day_to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_tile_the_days_exactly_with_few_aligned_spans() {
        for day_from in 20_700..20_800 {
            for len in 0..200 {
                let day_to = day_from + len;
                let spans = spans(day_from, day_to);
                let mut next = day_from;
                for (span, first) in &spans {
                    assert_eq!(*first, next, "gap or overlap in {day_from}..{day_to}: {spans:?}");
                    assert_eq!(first % span, 0, "unaligned span in {spans:?}");
                    next += span;
                }
                assert_eq!(next, day_to);
                // At most one span of each length climbing up and one coming
                // down, plus the 32-day spans in between.
                assert!(spans.len() as i64 <= 2 * SPAN_DAYS.len() as i64 + len / 32, "{day_from}..{day_to}: {spans:?}");
            }
        }
        assert_eq!(spans(20_751, 20_780), vec![(1, 20_751), (16, 20_752), (8, 20_768), (4, 20_776)]);
    }

    #[test]
    fn windows_are_utc_by_arithmetic() {
        assert_eq!(window_start(119, MINUTE_SECS), 60);
        assert_eq!(window_start(-1, DAY_SECS), -DAY_SECS);
        assert_eq!(whole_days(10, 2 * DAY_SECS + 5), Some((DAY_SECS, 2 * DAY_SECS)));
        assert_eq!(whole_days(DAY_SECS, 2 * DAY_SECS), Some((DAY_SECS, 2 * DAY_SECS)));
        assert_eq!(whole_days(10, DAY_SECS + 5), None);
    }
}
