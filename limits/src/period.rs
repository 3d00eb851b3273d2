//! Period arithmetic: the UTC window a limit's counter belongs to at an instant, including monthly cycles anchored on a subscription's start.
//!
//! A cycle's k-th start is the anchor moved k months, its day clamped to the
//! month's length and its time of day kept: an anchor on Jan 31 at 23:30
//! gives Feb 28 23:30 (Feb 29 in a leap year), then Mar 31 23:30. The clamp
//! is applied to each start from the anchor, never from the clamped start
//! before it, so a short month does not shorten every later cycle.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};

use crate::plan::Period;

/// The window `[start, end)` of `period` that holds `at`. `anchor` is the
/// subscription's `cycle_start`; a `cycle` without one is the calendar month.
pub fn window(period: Period, anchor: Option<DateTime<Utc>>, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let secs = at.timestamp();
    let fixed = |len: i64| {
        let start = secs - secs.rem_euclid(len);
        (from_secs(start), from_secs(start + len))
    };
    match period {
        Period::Minute => fixed(60),
        Period::Hour => fixed(3_600),
        Period::Day => fixed(86_400),
        Period::Month => {
            let start = month_start(at.year(), at.month());
            (start, next_month_start(start))
        }
        Period::Cycle => match anchor {
            None => window(Period::Month, None, at),
            Some(anchor) => cycle(anchor, at),
        },
    }
}

fn cycle(anchor: DateTime<Utc>, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let months = |d: DateTime<Utc>| i64::from(d.year()) * 12 + i64::from(d.month0());
    // The k-th start is within a day or so of the k-th month after the
    // anchor's, so k is this difference or one less.
    let mut k = months(at) - months(anchor);
    while shifted(anchor, k) > at {
        k -= 1;
    }
    while shifted(anchor, k + 1) <= at {
        k += 1;
    }
    (shifted(anchor, k), shifted(anchor, k + 1))
}

/// `anchor` moved `k` months, the day clamped to the target month's length.
pub fn shifted(anchor: DateTime<Utc>, k: i64) -> DateTime<Utc> {
    let total = i64::from(anchor.year()) * 12 + i64::from(anchor.month0()) + k;
    let year = i32::try_from(total.div_euclid(12)).unwrap_or(i32::MAX);
    let month = u32::try_from(total.rem_euclid(12)).unwrap_or(0) + 1;
    let day = anchor.day().min(days_in_month(year, month));
    let date = NaiveDate::from_ymd_opt(year, month, day).unwrap_or(NaiveDate::MAX);
    let time = date.and_hms_opt(anchor.hour(), anchor.minute(), anchor.second()).unwrap_or_default();
    Utc.from_utc_datetime(&time) + Duration::nanoseconds(i64::from(anchor.nanosecond()))
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    let next = NaiveDate::from_ymd_opt(ny, nm, 1).unwrap_or(NaiveDate::MAX);
    next.pred_opt().map_or(28, |d| d.day())
}

fn month_start(year: i32, month: u32) -> DateTime<Utc> {
    let date = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(NaiveDate::MAX);
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
}

fn next_month_start(start: DateTime<Utc>) -> DateTime<Utc> {
    if start.month() == 12 { month_start(start.year() + 1, 1) } else { month_start(start.year(), start.month() + 1) }
}

fn from_secs(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn fixed_periods_are_utc_windows() {
        let at = t("2026-03-14T15:09:26.5Z");
        assert_eq!(window(Period::Minute, None, at), (t("2026-03-14T15:09:00Z"), t("2026-03-14T15:10:00Z")));
        assert_eq!(window(Period::Hour, None, at), (t("2026-03-14T15:00:00Z"), t("2026-03-14T16:00:00Z")));
        assert_eq!(window(Period::Day, None, at), (t("2026-03-14T00:00:00Z"), t("2026-03-15T00:00:00Z")));
        assert_eq!(window(Period::Month, None, at), (t("2026-03-01T00:00:00Z"), t("2026-04-01T00:00:00Z")));
        assert_eq!(window(Period::Month, None, t("2026-12-31T23:59:59Z")), (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z")));
    }

    #[test]
    fn a_cycle_anchored_at_a_months_end_clamps_each_month_from_the_anchor() {
        let anchor = t("2026-01-31T00:00:00Z");
        assert_eq!(window(Period::Cycle, Some(anchor), t("2026-02-15T00:00:00Z")), (anchor, t("2026-02-28T00:00:00Z")));
        assert_eq!(window(Period::Cycle, Some(anchor), t("2026-03-01T00:00:00Z")), (t("2026-02-28T00:00:00Z"), t("2026-03-31T00:00:00Z")));
        assert_eq!(window(Period::Cycle, Some(anchor), t("2026-04-30T12:00:00Z")), (t("2026-04-30T00:00:00Z"), t("2026-05-31T00:00:00Z")));
    }

    #[test]
    fn leap_years_give_february_its_29th() {
        let anchor = t("2027-01-30T00:00:00Z");
        assert_eq!(window(Period::Cycle, Some(anchor), t("2028-02-29T12:00:00Z")), (t("2028-02-29T00:00:00Z"), t("2028-03-30T00:00:00Z")));
        assert_eq!(window(Period::Cycle, Some(anchor), t("2027-02-28T12:00:00Z")), (t("2027-02-28T00:00:00Z"), t("2027-03-30T00:00:00Z")));
    }

    #[test]
    fn an_anchor_late_in_the_day_keeps_its_time_across_the_month_and_year() {
        let anchor = t("2026-01-15T23:30:00Z");
        assert_eq!(window(Period::Cycle, Some(anchor), t("2026-02-15T23:29:59Z")), (anchor, t("2026-02-15T23:30:00Z")));
        assert_eq!(window(Period::Cycle, Some(anchor), t("2026-02-15T23:30:00Z")), (t("2026-02-15T23:30:00Z"), t("2026-03-15T23:30:00Z")));
        assert_eq!(window(Period::Cycle, Some(anchor), t("2027-01-01T00:00:00Z")), (t("2026-12-15T23:30:00Z"), t("2027-01-15T23:30:00Z")));
    }

    #[test]
    fn instants_before_the_anchor_fall_in_earlier_cycles() {
        let anchor = t("2026-03-31T00:00:00Z");
        assert_eq!(window(Period::Cycle, Some(anchor), t("2026-03-01T00:00:00Z")), (t("2026-02-28T00:00:00Z"), anchor));
    }

    #[test]
    fn a_cycle_without_an_anchor_is_the_calendar_month() {
        assert_eq!(window(Period::Cycle, None, t("2026-02-10T00:00:00Z")), (t("2026-02-01T00:00:00Z"), t("2026-03-01T00:00:00Z")));
    }

    #[test]
    fn every_instant_of_a_long_stretch_lies_in_its_window_and_windows_tile() {
        let anchor = t("2024-01-31T23:30:00Z");
        let mut at = t("2023-11-01T00:00:00Z");
        let mut last_end = None;
        while at < t("2029-01-01T00:00:00Z") {
            let (start, end) = window(Period::Cycle, Some(anchor), at);
            assert!(start <= at && at < end, "{at} in [{start}, {end})");
            if let Some(prev) = last_end
                && start >= prev
            {
                assert_eq!(start, prev, "windows tile without gaps");
            }
            last_end = Some(end);
            at += Duration::hours(13);
        }
    }
}
