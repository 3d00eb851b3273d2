//! A limit's status for one subject now: used, reserved, remaining, and where the period's pace leads.
//!
//! Projections extrapolate linearly: the usage so far in the period, at the
//! period's average rate so far, carried to the reset (`projected_at_reset`),
//! and the instant that pace reaches the amount (`projected_exhaustion_at`,
//! `null` when it does not before the reset, or when nothing was used yet).
//! Holds are not part of the pace: they may still be released.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::book::Applied;
use crate::plan::{LimitMeasure, Period, Scope};

/// Used and held amounts of one counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    pub used: i64,
    pub reserved: i64,
}

/// One limit's status, as every limits answer writes it. Amounts are exact
/// decimal text in the measure's unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitStatus {
    pub name: String,
    pub plan: String,
    pub scope: Scope,
    pub subject_id: String,
    pub measure: LimitMeasure,
    pub period: Period,
    pub hard: bool,
    pub period_start: String,
    pub resets_at: String,
    pub limit: String,
    pub used: String,
    pub reserved: String,
    /// `limit - used - reserved`; negative when usage went past the limit
    /// (a commit is never refused), so it never hides an overage.
    pub remaining: String,
    /// `used - limit` when positive, else 0.
    pub overage: String,
    pub exhausted: bool,
    pub projected_at_reset: String,
    pub projected_exhaustion_at: Option<String>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The status of `applied` at `now` given its counter's balance.
pub fn status(applied: &Applied<'_>, balance: Balance, now: DateTime<Utc>) -> LimitStatus {
    let limit = applied.limit;
    let (start, end) = applied.window(now);
    let m = limit.measure;
    let used = i128::from(balance.used);
    let amount = i128::from(limit.amount);
    let taken = used + i128::from(balance.reserved);
    let elapsed = i128::from((now - start).num_milliseconds().max(1));
    let length = i128::from((end - start).num_milliseconds().max(1));
    let projected = if used <= 0 { used } else { used * length / elapsed };
    let exhaustion = if used <= 0 {
        None
    } else if used >= amount {
        Some(now)
    } else {
        // The pace reaches the amount `elapsed * amount / used` into the period.
        let at = elapsed * amount / used;
        (at < length).then(|| start + chrono::Duration::milliseconds(i64::try_from(at).unwrap_or(i64::MAX)))
    };
    let clamp = |v: i128| i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX });
    LimitStatus {
        name: limit.name.clone(),
        plan: applied.plan_id.clone(),
        scope: applied.subject.scope,
        subject_id: applied.subject.id.clone(),
        measure: m,
        period: limit.period,
        hard: limit.hard,
        period_start: rfc3339(start),
        resets_at: rfc3339(end),
        limit: m.format(limit.amount),
        used: m.format(balance.used),
        reserved: m.format(balance.reserved),
        remaining: m.format(clamp(amount - taken)),
        overage: m.format(clamp((used - amount).max(0))),
        exhausted: taken >= amount,
        projected_at_reset: m.format(clamp(projected)),
        projected_exhaustion_at: exhaustion.map(rfc3339),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::Book;
    use crate::plan::parse_plan;
    use std::collections::BTreeMap;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    fn book() -> Book {
        let plan = parse_plan(r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"day","amount":"1"}]}"#).expect("plan");
        Book { plans: BTreeMap::from([("default".to_owned(), plan)]), ..Book::default() }
    }

    #[test]
    fn a_quarter_spent_by_six_oclock_projects_the_whole_amount_at_midnight() {
        let b = book();
        let applied = &b.applicable("u", None)[0];
        let s = status(applied, Balance { used: 250_000_000, reserved: 50_000_000 }, at("2026-05-01T06:00:00Z"));
        assert_eq!((s.used.as_str(), s.reserved.as_str(), s.remaining.as_str()), ("0.25", "0.05", "0.7"));
        assert_eq!(s.projected_at_reset, "1");
        assert_eq!(s.projected_exhaustion_at, None, "reaches the amount exactly at the reset, not before");
        assert_eq!((s.period_start.as_str(), s.resets_at.as_str()), ("2026-05-01T00:00:00Z", "2026-05-02T00:00:00Z"));
        let faster = status(applied, Balance { used: 500_000_000, reserved: 0 }, at("2026-05-01T06:00:00Z"));
        assert_eq!(faster.projected_at_reset, "2");
        assert_eq!(faster.projected_exhaustion_at.as_deref(), Some("2026-05-01T12:00:00Z"));
    }

    #[test]
    fn overage_shows_and_remaining_goes_negative() {
        let b = book();
        let s = status(&b.applicable("u", None)[0], Balance { used: 1_200_000_000, reserved: 0 }, at("2026-05-01T12:00:00Z"));
        assert_eq!((s.remaining.as_str(), s.overage.as_str(), s.exhausted), ("-0.2", "0.2", true));
    }
}
