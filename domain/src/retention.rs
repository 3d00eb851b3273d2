//! How long each table's rows are kept (`[retention]`), shared by every mode
//! that holds or reads them, and the oldest time a query may still ask about.
//!
//! Horizons are whole UTC days: with `n` days, rows older than the start of
//! the UTC day `n` days ago may go, and every row from that day on is kept.
//! Stores drop coarser units than that (ClickHouse whole months), so they
//! keep somewhat more than promised, never less; a query is answered only if
//! its range starts at or after the promise, so an answer over partly dropped
//! data (a silent partial sum) cannot happen.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Deserializer};

use crate::DomainError;
use crate::window::DAY_SECS;

/// The audit period raw events are kept past the dedupe window at least:
/// a month's bills can still be checked against the events behind them.
pub const MIN_AUDIT_DAYS: u32 = 31;

/// Shortest horizon of the rollups: the default views (the last 30 days, this
/// calendar month, a subscription cycle) never ask for more.
pub const MIN_ROLLUP_DAYS: u32 = 32;

/// Shortest horizon of the Stripe sync's state: Stripe takes meter events up
/// to 35 days old, and the sync reads its state for the hours it may push.
pub const MIN_BILLING_DAYS: u32 = 35;

/// How long a table's rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Days(u32),
    /// Never dropped (written as `"forever"`).
    Forever,
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Keep, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Days(i64),
            Word(String),
        }
        let bad = |what: String| serde::de::Error::custom(format!("{what} is neither a whole number of days (up to {}) nor \"forever\"", u32::MAX));
        match Raw::deserialize(d)? {
            Raw::Days(n) => u32::try_from(n).map(Keep::Days).map_err(|_| bad(n.to_string())),
            Raw::Word(w) if w == "forever" => Ok(Keep::Forever),
            Raw::Word(w) => Err(bad(format!("{w:?}"))),
        }
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::Days(n) => write!(f, "{n} days"),
            Keep::Forever => f.write_str("forever"),
        }
    }
}

/// The kinds of rows retention bounds; each store maps them to its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kept {
    /// Raw events: the audit trail, the dedupe record, what limits and
    /// billing exports sum.
    Events,
    /// Minute rollups: minute and hour buckets, feature, model, environment
    /// and billable breakdowns, and the partial edge days of any range.
    RollupsMinute,
    /// Day rollups (ClickHouse's per-user spans and user-first days, the
    /// embedded per-user days): whole days of per-user and per-customer sums.
    RollupsDaily,
    /// Records the aggregator could not decode or ClickHouse refused.
    DeadLetters,
    /// Runaway-user alerts, by when they opened.
    Alerts,
    /// The Stripe meter sync's pushed state per hour.
    BillingWindows,
}

impl Kept {
    pub const ALL: [Kept; 6] = [Kept::Events, Kept::RollupsMinute, Kept::RollupsDaily, Kept::DeadLetters, Kept::Alerts, Kept::BillingWindows];

    /// The config key (and metric label).
    pub fn key(self) -> &'static str {
        match self {
            Kept::Events => "events_days",
            Kept::RollupsMinute => "rollups_minute_days",
            Kept::RollupsDaily => "rollups_daily_days",
            Kept::DeadLetters => "dead_letters_days",
            Kept::Alerts => "alerts_days",
            Kept::BillingWindows => "billing_windows_days",
        }
    }

    /// What a refused query is told it asked for.
    pub fn describe(self) -> &'static str {
        match self {
            Kept::Events => "raw events",
            Kept::RollupsMinute => "minute rollups (minute and hour buckets, feature, model, environment and billable breakdowns, partial days)",
            Kept::RollupsDaily => "day rollups",
            Kept::DeadLetters => "dead letters",
            Kept::Alerts => "alerts",
            Kept::BillingWindows => "Stripe sync state",
        }
    }
}

/// `[retention]`: per kind of rows, how many days are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Raw events (default 400 days): at least the dedupe window plus
    /// [`MIN_AUDIT_DAYS`].
    pub events_days: Keep,
    /// Minute rollups (default 400 days: the longest range a query may ask
    /// for, so any breakdown the API offers over it can be answered).
    pub rollups_minute_days: Keep,
    /// Day rollups (default forever: a few rows per user and day).
    pub rollups_daily_days: Keep,
    /// Dead letters (default 400 days, as the events they stand for).
    pub dead_letters_days: Keep,
    /// Alerts (default 400 days).
    pub alerts_days: Keep,
    /// The Stripe sync's state (default 400 days).
    pub billing_windows_days: Keep,
    /// How often the purge runs.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            events_days: Keep::Days(400),
            rollups_minute_days: Keep::Days(400),
            rollups_daily_days: Keep::Forever,
            dead_letters_days: Keep::Days(400),
            alerts_days: Keep::Days(400),
            billing_windows_days: Keep::Days(400),
            interval_secs: 3_600,
        }
    }
}

/// A range that starts before what is kept of the rows it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotKept {
    pub kept: Kept,
    /// The oldest instant still kept.
    pub oldest: DateTime<Utc>,
}

impl NotKept {
    /// The refusal's text, naming the range's start, what it reads and the oldest date kept.
    pub fn message(&self, from: DateTime<Utc>) -> String {
        format!(
            "the range starts at {}, before the oldest {} kept ({}, retention.{}); ask from {} or later",
            from.format("%Y-%m-%dT%H:%M:%SZ"),
            self.kept.describe(),
            self.oldest.format("%Y-%m-%dT%H:%M:%SZ"),
            self.kept.key(),
            self.oldest.format("%Y-%m-%dT%H:%M:%SZ"),
        )
    }
}

impl RetentionConfig {
    pub fn keep(&self, kept: Kept) -> Keep {
        match kept {
            Kept::Events => self.events_days,
            Kept::RollupsMinute => self.rollups_minute_days,
            Kept::RollupsDaily => self.rollups_daily_days,
            Kept::DeadLetters => self.dead_letters_days,
            Kept::Alerts => self.alerts_days,
            Kept::BillingWindows => self.billing_windows_days,
        }
    }

    /// The oldest instant of `kept` still promised at `now` (the start of a
    /// UTC day), or `None` when it is kept forever.
    pub fn oldest(&self, kept: Kept, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.keep(kept) {
            Keep::Forever => None,
            Keep::Days(n) => {
                let secs = (now - Duration::days(i64::from(n))).timestamp();
                DateTime::from_timestamp(secs.div_euclid(DAY_SECS) * DAY_SECS, 0)
            }
        }
    }

    /// Refuses the first read `(kind, from)` whose start is before what is kept of it.
    pub fn check(&self, reads: &[(Kept, i64)], now: DateTime<Utc>) -> Result<(), NotKept> {
        for &(kept, from) in reads {
            if let Some(oldest) = self.oldest(kept, now)
                && from < oldest.timestamp()
            {
                return Err(NotKept { kept, oldest });
            }
        }
        Ok(())
    }

    /// Checks the horizons; `dedupe_secs` is how long the mode remembers
    /// idempotency keys (the aggregator's `dedupe.window_secs`, the embedded
    /// mode's `events.max_past_secs`), which raw events must outlive. Errors
    /// name the key under `retention.`.
    pub fn validate(&self, dedupe_secs: u64) -> Result<(), DomainError> {
        let days = |k: Kept| match self.keep(k) {
            Keep::Days(n) => Some(n),
            Keep::Forever => None,
        };
        let key = |k: Kept| format!("retention.{}", k.key());
        let dedupe_days = u32::try_from(dedupe_secs.div_ceil(DAY_SECS as u64)).unwrap_or(u32::MAX);
        let min_events = dedupe_days.saturating_add(MIN_AUDIT_DAYS);
        if days(Kept::Events).is_some_and(|n| n < min_events) {
            return Err(DomainError::config(key(Kept::Events), format!("must be at least {min_events} (the dedupe window, {dedupe_days} days, plus a {MIN_AUDIT_DAYS}-day audit period)")));
        }
        for k in [Kept::RollupsMinute, Kept::RollupsDaily] {
            if days(k).is_some_and(|n| n < MIN_ROLLUP_DAYS) {
                return Err(DomainError::config(key(k), format!("must be at least {MIN_ROLLUP_DAYS}, so the default views (30 days, a month) are never refused")));
            }
        }
        // A refused event's dead letter must outlive the time it could still be replayed and counted.
        if days(Kept::DeadLetters).is_some_and(|n| n < dedupe_days) {
            return Err(DomainError::config(key(Kept::DeadLetters), format!("must be at least the dedupe window, {dedupe_days} days")));
        }
        if days(Kept::Alerts).is_some_and(|n| n < MIN_ROLLUP_DAYS) {
            return Err(DomainError::config(key(Kept::Alerts), format!("must be at least {MIN_ROLLUP_DAYS}")));
        }
        if days(Kept::BillingWindows).is_some_and(|n| n < MIN_BILLING_DAYS) {
            return Err(DomainError::config(key(Kept::BillingWindows), format!("must be at least {MIN_BILLING_DAYS} (Stripe takes meter events up to 35 days old)")));
        }
        if !(60..=86_400).contains(&self.interval_secs) {
            return Err(DomainError::config("retention.interval_secs", "must be between 60 and 86400"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).map(|t| t.to_utc()).unwrap_or_default()
    }

    #[test]
    fn horizons_start_at_a_utc_day_and_forever_has_none() {
        let r = RetentionConfig::default();
        let now = at("2026-11-27T17:30:00Z");
        assert_eq!(r.oldest(Kept::Events, now), Some(at("2025-10-23T00:00:00Z")));
        assert_eq!(r.oldest(Kept::RollupsDaily, now), None);
        // A "last 400 days" range asked a moment earlier is still inside.
        assert_eq!(r.check(&[(Kept::Events, at("2025-10-23T17:29:00Z").timestamp())], now), Ok(()));
        let refused = r.check(&[(Kept::RollupsDaily, 0), (Kept::RollupsMinute, at("2025-10-22T23:59:59Z").timestamp())], now).unwrap_err();
        assert_eq!(refused, NotKept { kept: Kept::RollupsMinute, oldest: at("2025-10-23T00:00:00Z") });
        let text = refused.message(at("2025-10-22T23:59:59Z"));
        assert!(text.contains("2025-10-22T23:59:59Z") && text.contains("2025-10-23T00:00:00Z") && text.contains("retention.rollups_minute_days"), "{text}");
    }

    #[test]
    fn config_reads_days_or_forever_and_names_bad_keys() {
        let r: RetentionConfig = toml::from_str("events_days = 500\nrollups_minute_days = \"forever\"\n").expect("config");
        assert_eq!((r.events_days, r.rollups_minute_days, r.interval_secs), (Keep::Days(500), Keep::Forever, 3_600));
        assert!(toml::from_str::<RetentionConfig>("events_days = \"always\"\n").unwrap_err().to_string().contains("forever"));
        assert!(toml::from_str::<RetentionConfig>("event_days = 5\n").is_err());
        assert!(toml::from_str::<RetentionConfig>("alerts_days = -1\n").unwrap_err().to_string().contains("whole number of days"));
        let week = 7 * 86_400;
        assert_eq!(RetentionConfig::default().validate(35 * 86_400), Ok(()));
        for (r, key) in [
            (RetentionConfig { events_days: Keep::Days(65), ..Default::default() }, "retention.events_days"),
            (RetentionConfig { rollups_minute_days: Keep::Days(7), ..Default::default() }, "retention.rollups_minute_days"),
            (RetentionConfig { dead_letters_days: Keep::Days(5), ..Default::default() }, "retention.dead_letters_days"),
            (RetentionConfig { billing_windows_days: Keep::Days(34), ..Default::default() }, "retention.billing_windows_days"),
            (RetentionConfig { interval_secs: 1, ..Default::default() }, "retention.interval_secs"),
        ] {
            let DomainError::Config { key: got, .. } = r.validate(35 * 86_400).unwrap_err();
            assert_eq!(got, key);
        }
        assert_eq!(RetentionConfig { events_days: Keep::Days(38), ..Default::default() }.validate(week), Ok(()));
    }
}
