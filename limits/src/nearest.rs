//! Who is nearest their caps, pure: every current-period counter of a tenant matched back to the limit it counts for, ranked by the fraction of the limit's amount used.
//!
//! A counter's key names its subject, its definition (hashed) and its
//! period's start (see [`Counter::new`](crate::Counter::new)). It is matched
//! to the limits its subject resolves to on its own (its subscription's
//! plan, else `default`): a limit matches when its counter now is exactly
//! this key, so only counters of the current period rank and a changed
//! definition or an old period never does. A user with no subscription of
//! its own may be on its customer's plan, which the key does not name: its
//! counter is then matched by definition to the user-scope limits of the
//! one other plan holding that definition (none or several: left out,
//! rather than guess an amount), its period anchored at the counter's start.
//!
//! The ratio is exact: `used * 10^9 / amount` in `i128`, written as a
//! decimal (`"0.9"`). Ties order by subject, then limit name, so a page is
//! stable between two reads.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

use crate::book::{Applied, applicable, definition};
use crate::period::window;
use crate::plan::{Plan, Scope};
use crate::reconcile::{CounterKey, period_of};
use crate::subject::{Subject, Subscription};

/// The default and the largest number of rows `GET /v1/limits/nearest` answers.
pub const NEAREST_DEFAULT: usize = 20;
pub const NEAREST_MAX: usize = 500;

/// One subject's limit, ranked.
#[derive(Debug, Clone)]
pub struct Near<'a> {
    pub applied: Applied<'a>,
    /// The counter's key, to read its holds for the status.
    pub counter: String,
    pub used: i64,
    /// `used / amount` in billionths.
    pub ratio_nanos: i128,
}

/// `used / amount` in billionths; an amount of 0 (refuse everything) is
/// infinitely near once anything is used.
pub fn ratio_nanos(used: i64, amount: i64) -> i128 {
    if amount <= 0 {
        return if used > 0 { i128::from(i64::MAX) } else { 0 };
    }
    i128::from(used) * 1_000_000_000 / i128::from(amount)
}

/// The limits `subject` resolves to on its own.
fn own<'a>(plans: &'a BTreeMap<String, Plan>, subject: &Subject, sub: Option<&Subscription>) -> Vec<Applied<'a>> {
    match subject.scope {
        Scope::User => applicable(plans, &subject.id, sub, None, None),
        Scope::Customer => applicable(plans, "", None, Some(&subject.id), sub).into_iter().filter(|a| a.subject.scope == Scope::Customer).collect(),
    }
}

/// A user's counter of a limit of another plan (its customer's), when
/// exactly one other plan holds the definition; see the module docs.
fn by_definition<'a>(plans: &'a BTreeMap<String, Plan>, key: &CounterKey, skip: &str, now: DateTime<Utc>) -> Vec<Applied<'a>> {
    let mut found: Vec<Applied<'a>> = Vec::new();
    for (plan_id, plan) in plans.iter().filter(|(id, _)| id.as_str() != skip) {
        for limit in plan.limits.iter().filter(|l| l.scope == key.scope && definition(l) == key.definition) {
            let Some((start, end)) = period_of(limit.period, None, key.start) else { continue };
            if start <= now && now < end {
                found.push(Applied { subject: Subject { scope: key.scope, id: key.subject.clone() }, plan_id: plan_id.clone(), limit, anchor: Some(start) });
            }
        }
    }
    let one_plan = found.windows(2).all(|w| w[0].plan_id == w[1].plan_id);
    if one_plan { found } else { Vec::new() }
}

/// Ranks `counters` (`(key, used)`) of a tenant with `plans` and its
/// subscriptions by subject key (`user:<id>`, `customer:<id>`): the `limit`
/// nearest their caps at `now`, optionally only limits named `name`.
pub fn rank<'a>(
    plans: &'a BTreeMap<String, Plan>,
    subscriptions: &BTreeMap<String, Subscription>,
    counters: &[(String, i64)],
    name: Option<&str>,
    limit: usize,
    now: DateTime<Utc>,
) -> Vec<Near<'a>> {
    let mut out = Vec::new();
    for (counter, used) in counters {
        let Some(key) = CounterKey::parse(counter) else { continue };
        let subject = key.subject();
        let sub = subscriptions.get(&subject.key());
        let applied = own(plans, &subject, sub);
        let mut matched: Vec<Applied<'a>> = applied.into_iter().filter(|a| a.counter(now).key == *counter).collect();
        if matched.is_empty() && sub.is_none() && key.scope == Scope::User {
            // Only the plan the user resolved to (`default`) is known not to apply.
            matched = by_definition(plans, &key, crate::plan::DEFAULT_PLAN, now);
            // Its anchor is the counter's start: check the counter is this period's.
            matched.retain(|a| window(a.limit.period, a.anchor, now).0.timestamp() == key.start);
        }
        for applied in matched.into_iter().filter(|a| name.is_none_or(|n| a.limit.name == n)) {
            let ratio_nanos = ratio_nanos(*used, applied.limit.amount);
            out.push(Near { applied, counter: counter.clone(), used: *used, ratio_nanos });
        }
    }
    out.sort_by(|a, b| {
        b.ratio_nanos
            .cmp(&a.ratio_nanos)
            .then_with(|| a.applied.subject.cmp(&b.applied.subject))
            .then_with(|| a.applied.limit.name.cmp(&b.applied.limit.name))
            .then_with(|| a.applied.plan_id.cmp(&b.applied.plan_id))
    });
    out.truncate(limit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::parse_plan;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    fn plans() -> BTreeMap<String, Plan> {
        let default = parse_plan(
            r#"{"limits":[{"name":"daily","measure":"events","period":"day","amount":"10"},
                {"name":"warn","measure":"events","period":"day","amount":"20","hard":false},
                {"name":"team","measure":"events","scope":"customer","period":"day","amount":"100"}]}"#,
        )
        .expect("plan");
        let pro = parse_plan(r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"cycle","amount":"5"}]}"#).expect("plan");
        BTreeMap::from([("default".to_owned(), default), ("pro".to_owned(), pro)])
    }

    fn counter(plans: &BTreeMap<String, Plan>, plan: &str, i: usize, subject: Subject, now: DateTime<Utc>, anchor: Option<DateTime<Utc>>) -> String {
        let a = Applied { subject, plan_id: plan.to_owned(), limit: &plans[plan].limits[i], anchor };
        a.counter(now).key
    }

    #[test]
    fn ratios_are_exact_billionths() {
        assert_eq!(ratio_nanos(9, 10), 900_000_000);
        assert_eq!(ratio_nanos(1, 3), 333_333_333);
        assert_eq!(ratio_nanos(i64::MAX, 1), i128::from(i64::MAX) * 1_000_000_000, "no overflow in i128");
        assert_eq!((ratio_nanos(0, 0), ratio_nanos(1, 0)), (0, i128::from(i64::MAX)));
    }

    #[test]
    fn current_counters_rank_by_fraction_used_hard_and_soft() {
        let p = plans();
        let now = t("2026-05-01T12:00:00Z");
        let yesterday = t("2026-04-30T12:00:00Z");
        let counters = vec![
            (counter(&p, "default", 0, Subject::user("a"), now, None), 2),
            (counter(&p, "default", 0, Subject::user("b"), now, None), 9),
            (counter(&p, "default", 0, Subject::user("c"), now, None), 5),
            // Last period's: not ranked, however full.
            (counter(&p, "default", 0, Subject::user("old"), yesterday, None), 10),
            (counter(&p, "default", 2, Subject::customer("acme"), now, None), 95),
            ("garbage".to_owned(), 1),
        ];
        let ranked = rank(&p, &BTreeMap::new(), &counters, None, 20, now);
        let rows: Vec<(String, &str, i128)> = ranked.iter().map(|n| (n.applied.subject.id.clone(), n.applied.limit.name.as_str(), n.ratio_nanos)).collect();
        assert_eq!(
            rows,
            [
                ("acme".to_owned(), "team", 950_000_000),
                ("b".to_owned(), "daily", 900_000_000),
                ("c".to_owned(), "daily", 500_000_000),
                ("b".to_owned(), "warn", 450_000_000),
                ("c".to_owned(), "warn", 250_000_000),
                ("a".to_owned(), "daily", 200_000_000),
                ("a".to_owned(), "warn", 100_000_000),
            ],
            "one counter feeds every limit sharing its definition"
        );
        let daily = rank(&p, &BTreeMap::new(), &counters, Some("daily"), 2, now);
        assert_eq!(daily.iter().map(|n| n.applied.subject.id.as_str()).collect::<Vec<_>>(), ["b", "c"], "by name, truncated");
    }

    #[test]
    fn subscriptions_and_customer_plans_are_followed() {
        let p = plans();
        let now = t("2026-05-20T00:00:00Z");
        let anchor = t("2026-01-15T00:00:00Z");
        let sub = Subscription { plan: "pro".to_owned(), cycle_start: Some(anchor) };
        let subs = BTreeMap::from([("user:own".to_owned(), sub.clone())]);
        let counters = vec![
            (counter(&p, "pro", 0, Subject::user("own"), now, Some(anchor)), 4_000_000_000),
            // A member on its customer's plan: no subscription of its own.
            (counter(&p, "pro", 0, Subject::user("member"), now, Some(anchor)), 1_000_000_000),
            // A subscriber's counter of a period that is not its current cycle.
            (counter(&p, "pro", 0, Subject::user("own"), now, None), 5_000_000_000),
        ];
        let ranked = rank(&p, &subs, &counters, None, 20, now);
        let rows: Vec<(&str, &str, i128)> = ranked.iter().map(|n| (n.applied.subject.id.as_str(), n.applied.plan_id.as_str(), n.ratio_nanos)).collect();
        assert_eq!(rows, [("own", "pro", 800_000_000), ("member", "pro", 200_000_000)]);
        assert_eq!(ranked[1].applied.window(now).0, t("2026-05-15T00:00:00Z"), "the member's cycle anchors on its counter's start");
    }
}
