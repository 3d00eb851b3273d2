//! Threshold crossings, pure: which limits an event's counters watch, when a counter's move from one used amount to another crosses a `notify_at` threshold (or reaches a hard limit), the alert row and webhook body a crossing becomes, and the webhook's signature.
//!
//! A crossing is a counter going from below `ratio * amount` to at or above
//! it, compared exactly (in i128, never rounded). Each `notify_at` ratio is a
//! threshold, and a hard limit also has the ratio 1 ("reached"). The stores
//! keep a fired-marker per (counter, limit name, ratio), so a crossing fires
//! once per subject, limit and period however often its counter moves past
//! it (an amount lowered and raised again, a re-applied batch).
//!
//! The stored alert (rule `limit`) reads: `user_id` the subject's id (a
//! customer's id for a customer-scope limit), `observed_nanos` the used
//! amount and `threshold_nanos` the threshold, both in billionths of the
//! measure's unit (money is already nano-dollars; 6 events are 6e9), so the
//! alerts API's decimals read as the measure's amounts. `window_secs` is the
//! period's length. The alert is open for the rest of its period:
//! `resolved_at` holds the period's reset while it is open, and the store
//! marks it resolved once the reset has passed.

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use meterline_domain::{AlertRow, AlertState, EventRow, Rule};
use meterline_schemas::Nanos;
use meterline_schemas::money::NANOS_PER_UNIT;
use serde::Serialize;
use sha2::Sha256;

use crate::book::{Applied, Counter};
use crate::plan::{Limit, LimitMeasure, Period, Scope};
use crate::subject::Subject;

/// The ratio of a hard limit's own amount: reaching it is a crossing.
pub const REACHED: i64 = NANOS_PER_UNIT;

/// The header carrying a webhook body's signature.
pub const SIGNATURE_HEADER: &str = "Meterline-Signature";

/// The ratios (billionths of the amount) a limit notifies at: its
/// `notify_at`, and 1 for a hard limit; ascending, once each.
pub fn thresholds(limit: &Limit) -> Vec<i64> {
    let mut out = limit.notify_at.clone();
    if limit.hard {
        out.push(REACHED);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// True if used going from `before` to `after` crosses `ratio` of `amount`:
/// below the threshold before, at or above it after. Exact.
pub fn crossed(ratio: i64, amount: i64, before: i64, after: i64) -> bool {
    let threshold = i128::from(ratio) * i128::from(amount);
    let unit = i128::from(NANOS_PER_UNIT);
    i128::from(before) * unit < threshold && threshold <= i128::from(after) * unit
}

/// The least used amount at or above `ratio` of `amount` (rounded up: a
/// half of 3 events is reached at 2).
pub fn threshold_amount(ratio: i64, amount: i64) -> i64 {
    let product = i128::from(ratio) * i128::from(amount);
    let unit = i128::from(NANOS_PER_UNIT);
    let ceil = product.div_euclid(unit) + i128::from(product.rem_euclid(unit) != 0);
    i64::try_from(ceil).unwrap_or(i64::MAX)
}

/// One limit applied to one subject, watching one counter in one period:
/// what a crossing needs to be told, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub subject: Subject,
    pub plan_id: String,
    pub limit: Limit,
    pub counter: Counter,
    /// The period's start and end (the reset), Unix seconds.
    pub period_start: i64,
    pub resets_at: i64,
}

impl Watch {
    /// `applied`'s watch of the period holding `at`.
    pub fn of(applied: &Applied<'_>, at: DateTime<Utc>) -> Watch {
        let (start, end) = applied.window(at);
        Watch {
            subject: applied.subject.clone(),
            plan_id: applied.plan_id.clone(),
            limit: applied.limit.clone(),
            counter: applied.counter(at),
            period_start: start.timestamp(),
            resets_at: end.timestamp(),
        }
    }

    /// The crossings of this limit's thresholds when its counter's used
    /// amount moves from `before` to `after`, lowest first.
    pub fn crossings(&self, before: i64, after: i64) -> Vec<Crossing> {
        thresholds(&self.limit)
            .into_iter()
            .filter(|r| crossed(*r, self.limit.amount, before, after))
            .map(|ratio| Crossing { watch: self.clone(), ratio, threshold: threshold_amount(ratio, self.limit.amount), used: after })
            .collect()
    }
}

/// The limits of `applied` that one stored event counts toward and that
/// notify at all (a soft limit without `notify_at` never does), each with
/// its counter: the same matching as [`counts`](crate::book::counts), one
/// per limit (two limits sharing a counter watch it both).
pub fn watches(applied: &[Applied<'_>], row: &EventRow) -> Vec<Watch> {
    if row.billable == 0 {
        return Vec::new();
    }
    let at = DateTime::from_timestamp(i64::from(row.event_time), row.event_time_ns).unwrap_or_default();
    applied
        .iter()
        .filter(|a| a.limit.filter.matches(&row.feature, &row.model, &row.environment))
        .filter(|a| a.limit.hard || !a.limit.notify_at.is_empty())
        .map(|a| Watch::of(a, at))
        .collect()
}

/// A threshold crossed: once per subject, limit, period and ratio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub watch: Watch,
    /// Billionths of the amount (1e9 is the amount itself).
    pub ratio: i64,
    /// The least used amount at the threshold, in the measure's unit.
    pub threshold: i64,
    /// The counter's used amount after the move that crossed it.
    pub used: i64,
}

/// An amount in billionths of its measure's unit, as the alerts table holds it.
fn in_nanos(measure: LimitMeasure, value: i64) -> i64 {
    if measure.is_money() { value } else { value.saturating_mul(NANOS_PER_UNIT) }
}

fn rfc3339(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Crossing {
    /// What names the fired-marker: the counter (subject, definition,
    /// period), the limit's name and the ratio.
    pub fn marker(&self) -> String {
        format!("{}:{}:{}", self.watch.counter.key, self.ratio, self.watch.limit.name)
    }

    /// The stored alert, opened at `now` (Unix secs); see the module docs.
    pub fn alert_row(&self, tenant: &str, now: i64, version: u64) -> AlertRow {
        let w = &self.watch;
        let secs = |t: i64| u32::try_from(t.max(0)).unwrap_or(u32::MAX);
        AlertRow {
            tenant: tenant.to_owned(),
            user_id: w.subject.id.clone(),
            rule: Rule::Limit.as_str().to_owned(),
            opened_at: secs(now),
            state: AlertState::Open.as_str().to_owned(),
            observed_nanos: in_nanos(w.limit.measure, self.used),
            threshold_nanos: in_nanos(w.limit.measure, self.threshold),
            window_secs: secs(w.resets_at - w.period_start),
            updated_at: secs(now),
            resolved_at: secs(w.resets_at),
            version,
        }
    }

    /// The webhook's body.
    pub fn body(&self, tenant: &str) -> LimitAlert {
        let w = &self.watch;
        let m = w.limit.measure;
        LimitAlert {
            kind: "limit",
            event: if self.ratio >= REACHED { "reached" } else { "crossed" },
            tenant: tenant.to_owned(),
            scope: w.subject.scope,
            subject_id: w.subject.id.clone(),
            limit: w.limit.name.clone(),
            plan: w.plan_id.clone(),
            measure: m,
            period: w.limit.period,
            hard: w.limit.hard,
            ratio: Nanos(self.ratio).to_string(),
            threshold: m.format(self.threshold),
            used: m.format(self.used),
            amount: m.format(w.limit.amount),
            period_start: rfc3339(w.period_start),
            resets_at: rfc3339(w.resets_at),
        }
    }
}

/// The webhook body of a crossing; amounts are exact decimal text in the
/// measure's unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitAlert {
    /// Always `limit` (runaway alerts carry `rule` instead).
    pub kind: &'static str,
    /// `crossed` (a `notify_at` threshold below the amount) or `reached` (the amount itself or more).
    pub event: &'static str,
    pub tenant: String,
    pub scope: Scope,
    pub subject_id: String,
    pub limit: String,
    pub plan: String,
    pub measure: LimitMeasure,
    pub period: Period,
    pub hard: bool,
    /// The threshold as a ratio of the amount (`"0.8"`).
    pub ratio: String,
    pub threshold: String,
    pub used: String,
    pub amount: String,
    pub period_start: String,
    pub resets_at: String,
}

/// The `Meterline-Signature` value of `body` sent at `t` (Unix secs):
/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, Stripe's scheme (the
/// time inside the signed text lets a receiver refuse replays).
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::Book;
    use crate::plan::parse_plan;
    use std::collections::BTreeMap;

    const HALF: i64 = NANOS_PER_UNIT / 2;

    fn watch(plan: &str) -> Watch {
        let plan = parse_plan(plan).expect("plan");
        let book = Book { plans: BTreeMap::from([("default".to_owned(), plan)]), ..Book::default() };
        let at = DateTime::from_timestamp(1_767_225_600 + 3_600, 0).expect("time");
        Watch::of(&book.applicable("u1", None)[0], at)
    }

    fn ratios(c: &[Crossing]) -> Vec<i64> {
        c.iter().map(|c| c.ratio).collect()
    }

    const TEN_A_DAY: &str = r#"{"limits":[{"name":"daily","measure":"events","period":"day","amount":"10","notify_at":["0.5","1"]}]}"#;

    #[test]
    fn below_to_above_fires_and_already_above_does_not() {
        let w = watch(TEN_A_DAY);
        assert_eq!(thresholds(&w.limit), [HALF, REACHED], "1 given and implied by hard: once");
        assert!(w.crossings(3, 4).is_empty(), "still below");
        assert_eq!(ratios(&w.crossings(4, 5)), [HALF], "at the threshold counts");
        assert_eq!(ratios(&w.crossings(4, 6)), [HALF]);
        assert!(w.crossings(5, 6).is_empty(), "already at it");
        assert!(w.crossings(11, 12).is_empty(), "already past everything");
        let c = &w.crossings(9, 10)[0];
        assert_eq!((c.ratio, c.threshold, c.used), (REACHED, 10, 10));
    }

    #[test]
    fn one_jump_past_several_thresholds_fires_them_all() {
        let w = watch(r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"day","amount":"1","notify_at":["0.5","0.8"]}]}"#);
        let c = w.crossings(100_000_000, 1_200_000_000);
        assert_eq!(ratios(&c), [HALF, 800_000_000, REACHED]);
        assert_eq!(c.iter().map(|c| c.threshold).collect::<Vec<_>>(), [500_000_000, 800_000_000, NANOS_PER_UNIT]);
    }

    #[test]
    fn re_applying_the_same_move_after_it_landed_fires_nothing() {
        // A re-applied batch is seen from where the first left the counter
        // (the stores also keep a fired-marker per crossing).
        let w = watch(TEN_A_DAY);
        assert_eq!(ratios(&w.crossings(4, 6)), [HALF]);
        assert!(w.crossings(6, 6).is_empty(), "nothing moved");
        assert!(w.crossings(6, 8).is_empty());
    }

    #[test]
    fn soft_limits_notify_only_where_asked_and_thresholds_round_up() {
        let soft = watch(r#"{"limits":[{"name":"warn","measure":"events","period":"day","amount":"3","hard":false,"notify_at":["0.5"]}]}"#);
        assert_eq!(thresholds(&soft.limit), [HALF], "no implied 1 for a soft limit");
        assert!(soft.crossings(0, 1).is_empty(), "1 of 3 is below half");
        assert_eq!(soft.crossings(1, 2)[0].threshold, 2, "half of 3 events is reached at 2");
        assert!(soft.crossings(2, 30).is_empty());
        assert!(crossed(REACHED, i64::MAX, i64::MAX - 1, i64::MAX), "exact at the top of the range");
    }

    #[test]
    fn the_alert_and_the_body_read_in_the_measures_units() {
        let w = watch(TEN_A_DAY);
        let c = &w.crossings(4, 6)[0];
        let row = c.alert_row("acme", 1_767_229_200, 7);
        assert_eq!((row.rule.as_str(), row.user_id.as_str(), row.state.as_str()), ("limit", "u1", "open"));
        assert_eq!((row.observed_nanos, row.threshold_nanos, row.window_secs), (6 * NANOS_PER_UNIT, 5 * NANOS_PER_UNIT, 86_400));
        assert_eq!(row.resolved_at, 1_767_225_600 + 86_400, "resolves at the period's reset");
        let body = serde_json::to_value(c.body("acme")).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"kind": "limit", "event": "crossed", "tenant": "acme", "scope": "user", "subject_id": "u1",
                "limit": "daily", "plan": "default", "measure": "events", "period": "day", "hard": true, "ratio": "0.5",
                "threshold": "5", "used": "6", "amount": "10",
                "period_start": "2026-01-01T00:00:00Z", "resets_at": "2026-01-02T00:00:00Z"})
        );
        assert_eq!(c.marker(), format!("{}:500000000:daily", w.counter.key));
    }

    #[test]
    fn the_signature_matches_a_known_vector() {
        // python3: hmac.new(b"whsec_test", b"1767225600." + body, hashlib.sha256).hexdigest()
        let body = br#"{"kind":"limit","tenant":"acme"}"#;
        assert_eq!(
            signature(b"whsec_test", 1_767_225_600, body),
            "t=1767225600,v1=b93805da2aafbb34131c025dfa747c43bbfbb329d89d80403b6299ddeb5714d4"
        );
    }
}
