//! Which limits apply to a user's action, and the counters they charge: the one resolution every store and both modes use.
//!
//! Resolution, for an action of user U of customer C (C may be absent):
//! - U's **user-scope** limits come from U's subscription's plan, else C's
//!   subscription's plan (a workspace's plan applies to each of its members),
//!   else the `default` plan.
//! - C's **customer-scope** limits come from C's subscription's plan, else the
//!   `default` plan, and count every user of C. No customer, no customer limits.
//! - A subscription naming a plan that no longer exists falls back to `default`.
//! - A `cycle` period anchors on the subscription the plan came from; with
//!   none (the default plan) it is the calendar month.
//!
//! A counter is named by its subject, the limit's *definition* (measure,
//! period and filter, hashed) and its period's start, never by the limit's
//! name or amount: raising an amount keeps the count, and changing what a
//! limit counts starts a fresh counter instead of mixing two definitions.

use chrono::{DateTime, Utc};
use meterline_domain::EventRow;
use std::collections::BTreeMap;
use xxhash_rust::xxh3::xxh3_64;

use crate::period::window;
use crate::plan::{DEFAULT_PLAN, Limit, LimitMeasure, Plan, Scope};
use crate::subject::{Subject, Subscription};

/// What a store reads to resolve one user's limits: the tenant's plans and
/// the two subscriptions that may apply.
#[derive(Debug, Clone, Default)]
pub struct Book {
    pub plans: BTreeMap<String, Plan>,
    pub user: Option<Subscription>,
    pub customer: Option<Subscription>,
}

/// One limit applied to one subject.
#[derive(Debug, Clone)]
pub struct Applied<'a> {
    pub subject: Subject,
    pub plan_id: String,
    pub limit: &'a Limit,
    pub anchor: Option<DateTime<Utc>>,
}

impl Applied<'_> {
    /// The period holding `at`.
    pub fn window(&self, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        window(self.limit.period, self.anchor, at)
    }

    /// The counter of this limit's period holding `at`.
    pub fn counter(&self, at: DateTime<Utc>) -> Counter {
        let (start, end) = self.window(at);
        Counter::new(&self.subject, self.limit, start.timestamp(), end.timestamp())
    }
}

/// A named counter and how long a store must keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// `u|c` : definition hash : period start (Unix secs) : subject id.
    pub key: String,
    /// Unix seconds after which nothing reads the counter: its period's end
    /// plus one more period and an hour, long enough to reconcile it.
    pub keep_until: i64,
}

impl Counter {
    pub fn new(subject: &Subject, limit: &Limit, start: i64, end: i64) -> Counter {
        let kind = match subject.scope {
            Scope::User => 'u',
            Scope::Customer => 'c',
        };
        Counter { key: format!("{kind}:{:016x}:{start}:{}", definition(limit), subject.id), keep_until: end + (end - start) + 3_600 }
    }
}

/// A hash of what a limit counts: measure, period and filter.
pub(crate) fn definition(limit: &Limit) -> u64 {
    let f = &limit.filter;
    let text = format!(
        "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        limit.measure.name(),
        limit.period.name(),
        f.feature.as_deref().unwrap_or("\u{0}"),
        f.model.as_deref().unwrap_or("\u{0}"),
        f.environment.as_deref().unwrap_or("\u{0}"),
    );
    xxh3_64(text.as_bytes())
}

impl Book {
    /// Every limit that applies to `user` (and `customer`), user-scope first,
    /// each in its plan's order.
    pub fn applicable(&self, user: &str, customer: Option<&str>) -> Vec<Applied<'_>> {
        applicable(&self.plans, user, self.user.as_ref(), customer, self.customer.as_ref())
    }

    /// The limits that apply to a subject alone (its status page): a user's
    /// user-scope limits, or a customer's customer-scope limits.
    pub fn of_subject(&self, subject: &Subject) -> (String, Vec<Applied<'_>>) {
        match subject.scope {
            Scope::User => {
                let (plan_id, _, _) = resolve(&self.plans, self.user.as_ref().or(self.customer.as_ref()));
                (plan_id, self.applicable(&subject.id, None))
            }
            Scope::Customer => {
                let (plan_id, _, _) = resolve(&self.plans, self.customer.as_ref());
                let applied = applicable(&self.plans, "", None, Some(&subject.id), self.customer.as_ref())
                    .into_iter()
                    .filter(|a| a.subject.scope == Scope::Customer)
                    .collect();
                (plan_id, applied)
            }
        }
    }
}

/// Every limit of `plans` that applies to `user` with its subscription
/// `user_sub`, and to `customer` with `customer_sub`; see the module docs.
/// The form a store counting many users' events uses: one plans map, each
/// row's two subscriptions.
pub fn applicable<'a>(
    plans: &'a BTreeMap<String, Plan>,
    user: &str,
    user_sub: Option<&Subscription>,
    customer: Option<&str>,
    customer_sub: Option<&Subscription>,
) -> Vec<Applied<'a>> {
    let mut out = Vec::new();
    let (plan_id, plan, anchor) = resolve(plans, user_sub.or(customer_sub));
    for limit in plan.iter().flat_map(|p| &p.limits).filter(|l| l.scope == Scope::User) {
        out.push(Applied { subject: Subject::user(user), plan_id: plan_id.clone(), limit, anchor });
    }
    if let Some(customer) = customer.filter(|c| !c.is_empty()) {
        let (plan_id, plan, anchor) = resolve(plans, customer_sub);
        for limit in plan.iter().flat_map(|p| &p.limits).filter(|l| l.scope == Scope::Customer) {
            out.push(Applied { subject: Subject::customer(customer), plan_id: plan_id.clone(), limit, anchor });
        }
    }
    out
}

fn resolve<'a>(plans: &'a BTreeMap<String, Plan>, sub: Option<&Subscription>) -> (String, Option<&'a Plan>, Option<DateTime<Utc>>) {
    if let Some(sub) = sub
        && let Some(plan) = plans.get(&sub.plan)
    {
        return (sub.plan.clone(), Some(plan), sub.cycle_start);
    }
    (DEFAULT_PLAN.to_owned(), plans.get(DEFAULT_PLAN), None)
}

/// What an action adds to each measure: an estimate before the call, the
/// metered event after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts(pub BTreeMap<LimitMeasure, i64>);

impl Amounts {
    /// The amount of `measure`; a measure not given counts 0, except
    /// `events`, which counts 1 (one reservation is one call).
    pub fn of(&self, measure: LimitMeasure) -> i64 {
        match (self.0.get(&measure), measure) {
            (Some(v), _) => *v,
            (None, LimitMeasure::Events) => 1,
            (None, _) => 0,
        }
    }

    /// What one stored event adds.
    pub fn of_row(row: &EventRow) -> Amounts {
        Amounts(LimitMeasure::ALL.into_iter().map(|m| (m, m.of_row(row))).collect())
    }
}

/// A hold or a count on one counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub counter: Counter,
    pub amount: i64,
    /// The limit's amount.
    pub limit: i64,
    pub hard: bool,
}

/// The counters `applied` charges for an action by `feature`/`model` in
/// `environment` at `at`, with the action's amounts. Limits whose filter does
/// not match charge nothing and are left out.
pub fn charges(applied: &[Applied<'_>], feature: &str, model: &str, environment: &str, at: DateTime<Utc>, amounts: &Amounts) -> Vec<(usize, Charge)> {
    applied
        .iter()
        .enumerate()
        .filter(|(_, a)| a.limit.filter.matches(feature, model, environment))
        .map(|(i, a)| (i, Charge { counter: a.counter(at), amount: amounts.of(a.limit.measure), limit: a.limit.amount, hard: a.limit.hard }))
        .collect()
}

/// What one stored event adds to its counters: nothing if it is not billable.
/// Two limits with one definition (a soft warning and a hard cap on the same
/// measure, say) share one counter: it is counted once.
pub fn counts(applied: &[Applied<'_>], row: &EventRow) -> Vec<Charge> {
    if row.billable == 0 {
        return Vec::new();
    }
    let at = DateTime::from_timestamp(i64::from(row.event_time), row.event_time_ns).unwrap_or_default();
    distinct(charges(applied, &row.feature, &row.model, &row.environment, at, &Amounts::of_row(row)).into_iter().map(|(_, c)| c))
}

/// The charges with one per counter: what holds and counts add (checks stay
/// one per limit, each against its own amount).
pub fn distinct(charges: impl IntoIterator<Item = Charge>) -> Vec<Charge> {
    let mut seen = std::collections::HashSet::new();
    charges.into_iter().filter(|c| seen.insert(c.counter.key.clone())).collect()
}

/// The admission rule for one hard limit, shared by every store (the Redis
/// script states it again): the limit is not yet exhausted, and the hold fits.
pub fn admits(charge: &Charge, used: i64, reserved: i64) -> bool {
    if !charge.hard {
        return true;
    }
    let taken = i128::from(used) + i128::from(reserved);
    taken < i128::from(charge.limit) && taken + i128::from(charge.amount) <= i128::from(charge.limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::parse_plan;

    fn book() -> Book {
        let mut plans = BTreeMap::new();
        plans.insert(
            "default".to_owned(),
            parse_plan(r#"{"limits":[{"name":"free","measure":"events","period":"day","amount":"10"}]}"#).expect("plan"),
        );
        plans.insert(
            "pro".to_owned(),
            parse_plan(
                r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"cycle","amount":"5"},
                    {"name":"premium","measure":"cost_usd","period":"cycle","amount":"1","filter":{"model":"gpt-4.1"}},
                    {"name":"workspace","measure":"cost_usd","scope":"customer","period":"month","amount":"50"}]}"#,
            )
            .expect("plan"),
        );
        Book { plans, user: None, customer: None }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn users_without_a_subscription_get_the_default_plan() {
        let b = book();
        let applied = b.applicable("u1", Some("c1"));
        assert_eq!(applied.iter().map(|a| a.limit.name.as_str()).collect::<Vec<_>>(), ["free"]);
    }

    #[test]
    fn a_customers_plan_applies_to_its_users_and_to_the_customer() {
        let mut b = book();
        b.customer = Some(Subscription { plan: "pro".into(), cycle_start: Some(at("2026-01-15T00:00:00Z")) });
        let applied = b.applicable("u1", Some("c1"));
        let names: Vec<(&str, Scope)> = applied.iter().map(|a| (a.limit.name.as_str(), a.subject.scope)).collect();
        assert_eq!(names, [("cap", Scope::User), ("premium", Scope::User), ("workspace", Scope::Customer)]);
        let c = charges(&applied, "chat", "gpt-4o", "production", at("2026-02-20T00:00:00Z"), &Amounts(BTreeMap::from([(LimitMeasure::CostUsd, 7)])));
        assert_eq!(c.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2], "the premium sub-limit counts only its model");
        assert!(c[0].1.counter.key.contains(&at("2026-02-15T00:00:00Z").timestamp().to_string()), "cycle anchored on the 15th");
        assert!(c[1].1.counter.key.starts_with("c:"), "the customer's counter");
    }

    #[test]
    fn a_subscription_to_a_deleted_plan_falls_back_to_default() {
        let mut b = book();
        b.user = Some(Subscription { plan: "gone".into(), cycle_start: None });
        assert_eq!(b.applicable("u1", None)[0].limit.name, "free");
    }

    #[test]
    fn counters_follow_the_definition_not_the_name_or_amount() {
        let b = book();
        let a = &b.applicable("u1", None)[0];
        let mut renamed = a.limit.clone();
        renamed.name = "other".into();
        renamed.amount = 99;
        let key = |l: &Limit| Counter::new(&Subject::user("u1"), l, 0, 86_400).key;
        assert_eq!(key(a.limit), key(&renamed));
        renamed.filter.feature = Some("image_gen".into());
        assert_ne!(key(a.limit), key(&renamed));
    }

    #[test]
    fn admission_needs_room_left_and_the_hold_to_fit() {
        let charge = |amount, limit| Charge { counter: Counter { key: String::new(), keep_until: 0 }, amount, limit, hard: true };
        assert!(admits(&charge(1, 10), 9, 0));
        assert!(!admits(&charge(1, 10), 9, 1));
        assert!(!admits(&charge(0, 10), 10, 0), "an exhausted limit admits nothing, not even a zero estimate");
        assert!(admits(&charge(0, 10), 9, 0));
        assert!(!admits(&charge(5, 10), 6, 0));
        let soft = Charge { hard: false, ..charge(5, 10) };
        assert!(admits(&soft, 100, 0));
    }

    #[test]
    fn two_limits_on_one_definition_count_once() {
        let plan = parse_plan(
            r#"{"limits":[{"name":"warn","measure":"events","period":"day","amount":"5","hard":false},
                {"name":"cap","measure":"events","period":"day","amount":"10"}]}"#,
        )
        .expect("plan");
        let b = Book { plans: BTreeMap::from([("default".to_owned(), plan)]), ..Book::default() };
        let applied = b.applicable("u1", None);
        let row = EventRow { feature: "chat".into(), model: "m".into(), environment: "production".into(), billable: 1, ..EventRow::default() };
        assert_eq!(counts(&applied, &row).len(), 1, "one counter, counted once");
        let checks = charges(&applied, "chat", "m", "production", at("2026-01-01T00:00:00Z"), &Amounts::default());
        assert_eq!(checks.len(), 2, "each limit still checks its own amount");
        assert_eq!(distinct(checks.into_iter().map(|(_, c)| c)).len(), 1);
    }

    #[test]
    fn non_billable_events_count_nowhere() {
        let b = book();
        let applied = b.applicable("u1", None);
        let mut row = EventRow { feature: "chat".into(), model: "m".into(), environment: "production".into(), billable: 1, ..EventRow::default() };
        assert_eq!(counts(&applied, &row).len(), 1);
        row.billable = 0;
        assert!(counts(&applied, &row).is_empty());
    }
}
