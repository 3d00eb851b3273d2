//! Reconciliation, pure: for each stored counter, the limit definition and period it belongs to, what to sum from the metered events, and the verdict.
//!
//! A counter's key (`u|c:<definition hash>:<period start secs>:<subject>`,
//! see [`Counter::new`](crate::Counter::new)) cannot be reversed: its
//! definition is found by hashing every limit of every plan of the tenant. A
//! counter whose definition is in no current plan is reported as
//! `unknown_definition` and not compared (its limit was changed or deleted;
//! it still expires on its own).
//!
//! The expected value is summed from the deduplicated `events` table, not
//! from the rollups: rollups are per minute, while a `cycle` period starts at
//! its anchor's exact second (and nanosecond), so only events give a
//! period's exact edges. Both compare the same thing: counting adds each
//! billable event's amount to the counter of its event time's period.
//!
//! A `cycle` period ends at the next start of the subscription's cycle. The
//! anchor used is the counter subject's own subscription's `cycle_start`,
//! when the counter's start is one of its cycle starts; otherwise (a user on
//! its customer's plan, a changed subscription, the default plan) the end is
//! the start moved one month, its day clamped to the month's length. That
//! is exact except after a start that was itself clamped (an anchor on the
//! 29th to 31st, in a shorter month), where the end comes early: such a
//! counter may be reported as a mismatch.
//!
//! Legitimate differences are mismatches too: a subject whose plan changed
//! during the period counted only while the limit applied to it.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

use crate::book::definition;
use crate::period::{shifted, window};
use crate::plan::{Filter, LimitMeasure, Period, Plan, Scope};
use crate::subject::Subject;

/// A counter's key, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterKey {
    pub scope: Scope,
    pub definition: u64,
    /// The period's start, Unix seconds (rounded down).
    pub start: i64,
    pub subject: String,
}

impl CounterKey {
    /// `None` if `key` is not a counter's key.
    pub fn parse(key: &str) -> Option<CounterKey> {
        // The subject comes last and may itself hold ':'.
        let mut parts = key.splitn(4, ':');
        let scope = match parts.next()? {
            "u" => Scope::User,
            "c" => Scope::Customer,
            _ => return None,
        };
        let hash = parts.next()?;
        if hash.len() != 16 {
            return None;
        }
        let definition = u64::from_str_radix(hash, 16).ok()?;
        let start = parts.next()?.parse().ok()?;
        let subject = parts.next()?.to_owned();
        Some(CounterKey { scope, definition, start, subject })
    }

    pub fn subject(&self) -> Subject {
        Subject { scope: self.scope, id: self.subject.clone() }
    }
}

/// What a counter counts: a limit definition, and the limits sharing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Definition {
    pub measure: LimitMeasure,
    pub period: Period,
    pub filter: Filter,
    pub scope: Scope,
    /// `plan/limit` of every current limit with this definition and scope.
    pub limits: Vec<String>,
}

/// Every definition of a tenant's plans, by scope and hash.
#[derive(Debug, Clone, Default)]
pub struct Definitions(HashMap<(Scope, u64), Definition>);

impl Definitions {
    pub fn of(plans: &BTreeMap<String, Plan>) -> Definitions {
        let mut out: HashMap<(Scope, u64), Definition> = HashMap::new();
        for (plan_id, plan) in plans {
            for limit in &plan.limits {
                let entry = out.entry((limit.scope, definition(limit))).or_insert_with(|| Definition {
                    measure: limit.measure,
                    period: limit.period,
                    filter: limit.filter.clone(),
                    scope: limit.scope,
                    limits: Vec::new(),
                });
                entry.limits.push(format!("{plan_id}/{}", limit.name));
            }
        }
        Definitions(out)
    }

    pub fn get(&self, key: &CounterKey) -> Option<&Definition> {
        self.0.get(&(key.scope, key.definition))
    }

    /// The subject whose subscription anchors `counter`'s period, if its
    /// definition is a `cycle` one: the driver looks its `cycle_start` up.
    pub fn anchor_subject(&self, counter: &str) -> Option<Subject> {
        let key = CounterKey::parse(counter)?;
        (self.get(&key)?.period == Period::Cycle).then(|| key.subject())
    }
}

/// The period `[start, end)` of a counter starting at `start` (Unix secs);
/// see the module docs for `cycle`. `None` for a start no time can have.
pub fn period_of(period: Period, anchor: Option<DateTime<Utc>>, start: i64) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let at = DateTime::from_timestamp(start, 0)?;
    if period != Period::Cycle {
        return Some((at, window(period, None, at).1));
    }
    if let Some(anchor) = anchor {
        // The key rounds a start down to its second: a second later is
        // inside the period whatever the anchor's nanoseconds.
        let (s, e) = window(Period::Cycle, Some(anchor), at + Duration::seconds(1));
        if s.timestamp() == start {
            return Some((s, e));
        }
    }
    Some((at, shifted(at, 1)))
}

/// What to sum from the metered events for one counter: the billable events
/// of the subject matching the filter with event time in `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub scope: Scope,
    pub subject: String,
    pub measure: LimitMeasure,
    pub filter: Filter,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Metered {
    /// The `events` column naming the subject.
    pub fn subject_column(&self) -> &'static str {
        match self.scope {
            Scope::User => "user_id",
            Scope::Customer => "customer_id",
        }
    }

    /// The `events` columns whose values add up to the measure; none: count rows.
    pub fn columns(&self) -> &'static [&'static str] {
        event_columns(self.measure)
    }

    /// The filter's `(column, value)` pairs, in a fixed order.
    pub fn filters(&self) -> Vec<(&'static str, String)> {
        let f = &self.filter;
        [("feature", &f.feature), ("model", &f.model), ("environment", &f.environment)]
            .into_iter()
            .filter_map(|(c, v)| v.clone().map(|v| (c, v)))
            .collect()
    }

    /// `(seconds, nanoseconds)` of the start and the end.
    pub fn edges(&self) -> ((i64, i64), (i64, i64)) {
        let split = |t: DateTime<Utc>| (t.timestamp(), i64::from(t.timestamp_subsec_nanos()));
        (split(self.start), split(self.end))
    }
}

/// The `events` columns one event's amount of `measure` adds up from (what
/// [`LimitMeasure::of_row`] reads); none for `events`, which counts rows.
pub fn event_columns(measure: LimitMeasure) -> &'static [&'static str] {
    match measure {
        LimitMeasure::Events => &[],
        LimitMeasure::InputTokens => &["input_tokens"],
        LimitMeasure::OutputTokens => &["output_tokens"],
        LimitMeasure::CachedInputTokens => &["cached_input_tokens"],
        LimitMeasure::ReasoningTokens => &["reasoning_tokens"],
        LimitMeasure::TotalTokens => &["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"],
        LimitMeasure::CostUsd => &["cost_nanos"],
        LimitMeasure::RevenueUsd => &["revenue_nanos"],
        LimitMeasure::Credits => &["credits_nanos"],
    }
}

/// A counter's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Match,
    Mismatch,
    /// No current limit has the counter's definition (or the key does not parse): not compared.
    UnknownDefinition,
    /// The period has not ended: not compared.
    OpenPeriod,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Match => "match",
            Status::Mismatch => "mismatch",
            Status::UnknownDefinition => "unknown_definition",
            Status::OpenPeriod => "open_period",
        }
    }
}

/// One counter's line of the report. Amounts are in the measure's unit as
/// the API writes them (exact decimals for money); `difference` is the
/// counter minus the metered sum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub tenant: String,
    pub counter: String,
    pub scope: Option<Scope>,
    pub subject: Option<String>,
    pub definition: Option<Definition>,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub counter_value: String,
    pub metered_sum: Option<String>,
    pub difference: Option<String>,
    pub status: Status,
}

/// A counter whose metered sum is still to be read.
#[derive(Debug, Clone)]
pub struct Pending {
    row: Row,
    used: i64,
    pub metered: Metered,
}

impl Pending {
    /// The row, with the metered sum read.
    pub fn finish(self, sum: i64) -> Row {
        let measure = self.metered.measure;
        let difference = i128::from(self.used) - i128::from(sum);
        let status = if difference == 0 { Status::Match } else { Status::Mismatch };
        let difference = i64::try_from(difference).map_or_else(|_| difference.to_string(), |d| measure.format(d));
        Row { metered_sum: Some(measure.format(sum)), difference: Some(difference), status, ..self.row }
    }
}

/// What [`examine`] found.
#[derive(Debug, Clone)]
pub enum Examined {
    /// Decided without a sum (unknown definition, open period).
    Done(Row),
    /// To compare with the metered sum.
    Sum(Pending),
}

/// Examines counter `counter` of `tenant` holding `used`, with the tenant's
/// `definitions`, the `anchor` of its subject's subscription (for `cycle`
/// definitions), at `now`: a period is closed when its end is at or before `now`.
pub fn examine(tenant: &str, counter: &str, used: i64, definitions: &Definitions, anchor: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Examined {
    let mut row = Row {
        tenant: tenant.to_owned(),
        counter: counter.to_owned(),
        scope: None,
        subject: None,
        definition: None,
        period_start: None,
        period_end: None,
        counter_value: used.to_string(),
        metered_sum: None,
        difference: None,
        status: Status::UnknownDefinition,
    };
    let Some(key) = CounterKey::parse(counter) else { return Examined::Done(row) };
    row.scope = Some(key.scope);
    row.subject = Some(key.subject.clone());
    let Some(def) = definitions.get(&key) else { return Examined::Done(row) };
    let Some((start, end)) = period_of(def.period, anchor, key.start) else { return Examined::Done(row) };
    row.definition = Some(def.clone());
    row.counter_value = def.measure.format(used);
    row.period_start = Some(rfc3339(start));
    row.period_end = Some(rfc3339(end));
    if end > now {
        row.status = Status::OpenPeriod;
        return Examined::Done(row);
    }
    let metered = Metered { scope: key.scope, subject: key.subject, measure: def.measure, filter: def.filter.clone(), start, end };
    Examined::Sum(Pending { row, used, metered })
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Every counter's row, and when they were checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checked_at: String,
    pub rows: Vec<Row>,
}

impl Report {
    /// The rows in a stable order: tenant, then counter.
    pub fn new(now: DateTime<Utc>, mut rows: Vec<Row>) -> Report {
        rows.sort_by(|a, b| (&a.tenant, &a.counter).cmp(&(&b.tenant, &b.counter)));
        Report { checked_at: rfc3339(now), rows }
    }

    pub fn count(&self, status: Status) -> usize {
        self.rows.iter().filter(|r| r.status == status).count()
    }

    /// True if no closed-period counter differs from its events.
    pub fn is_clean(&self) -> bool {
        self.count(Status::Mismatch) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::Counter;
    use crate::plan::parse_plan;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    fn plans() -> BTreeMap<String, Plan> {
        let default = parse_plan(
            r#"{"limits":[{"name":"per-minute","measure":"total_tokens","period":"minute","amount":"100","filter":{"feature":"chat"}},
                {"name":"warn","measure":"total_tokens","period":"minute","amount":"50","hard":false,"filter":{"feature":"chat"}}]}"#,
        )
        .expect("plan");
        let pro = parse_plan(
            r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"cycle","amount":"5"},
                {"name":"workspace","measure":"cost_usd","scope":"customer","period":"cycle","amount":"50"}]}"#,
        )
        .expect("plan");
        BTreeMap::from([("default".to_owned(), default), ("pro".to_owned(), pro)])
    }

    fn key(plan: &str, limit: usize, subject: Subject, start: DateTime<Utc>) -> String {
        let p = plans();
        Counter::new(&subject, &p[plan].limits[limit], start.timestamp(), start.timestamp() + 60).key
    }

    #[test]
    fn keys_parse_back_with_subjects_holding_colons() {
        let k = key("default", 0, Subject::user("u:1"), t("2026-03-01T10:00:00Z"));
        let parsed = CounterKey::parse(&k).expect("parses");
        assert_eq!((parsed.scope, parsed.start, parsed.subject.as_str()), (Scope::User, t("2026-03-01T10:00:00Z").timestamp(), "u:1"));
        for bad in ["", "x:0011223344556677:0:u", "u:0011:0:u", "u:0011223344556677:soon:u", "u:0011223344556677:0"] {
            assert_eq!(CounterKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn definitions_map_hashes_back_and_share_one_definition() {
        let defs = Definitions::of(&plans());
        let k = CounterKey::parse(&key("default", 0, Subject::user("u1"), t("2026-03-01T10:00:00Z"))).expect("key");
        let d = defs.get(&k).expect("found");
        assert_eq!((d.measure, d.period, d.filter.feature.as_deref()), (LimitMeasure::TotalTokens, Period::Minute, Some("chat")));
        assert_eq!(d.limits, ["default/per-minute", "default/warn"], "two limits, one counter");
        let customer = CounterKey { scope: Scope::Customer, ..k };
        assert!(defs.get(&customer).is_none(), "the scope is part of the identity");
    }

    #[test]
    fn closed_periods_are_compared_and_differences_reported() {
        let defs = Definitions::of(&plans());
        let counter = key("default", 0, Subject::user("u1"), t("2026-03-01T10:00:00Z"));
        let Examined::Sum(pending) = examine("acme", &counter, 120, &defs, None, t("2026-03-01T10:01:00Z")) else { panic!("closed at its end") };
        assert_eq!((pending.metered.start, pending.metered.end), (t("2026-03-01T10:00:00Z"), t("2026-03-01T10:01:00Z")));
        assert_eq!(pending.metered.subject_column(), "user_id");
        assert_eq!(pending.metered.columns().len(), 4, "total tokens add the four token columns");
        assert_eq!(pending.metered.filters(), [("feature", "chat".to_owned())]);
        assert_eq!(pending.clone().finish(120).status, Status::Match);
        let row = pending.finish(100);
        assert_eq!((row.status, row.difference.as_deref(), row.metered_sum.as_deref()), (Status::Mismatch, Some("20"), Some("100")));
    }

    #[test]
    fn open_periods_and_unknown_definitions_are_not_compared() {
        let defs = Definitions::of(&plans());
        let counter = key("default", 0, Subject::user("u1"), t("2026-03-01T10:00:00Z"));
        let Examined::Done(row) = examine("acme", &counter, 5, &defs, None, t("2026-03-01T10:00:59Z")) else { panic!("open") };
        assert_eq!(row.status, Status::OpenPeriod);
        let Examined::Done(row) = examine("acme", "u:00000000000000ff:0:u1", 5, &defs, None, t("2030-01-01T00:00:00Z")) else { panic!("unknown") };
        assert_eq!((row.status, row.subject.as_deref()), (Status::UnknownDefinition, Some("u1")));
        let Examined::Done(row) = examine("acme", "garbage", 5, &defs, None, t("2030-01-01T00:00:00Z")) else { panic!("unparsable") };
        assert_eq!(row.status, Status::UnknownDefinition);
    }

    #[test]
    fn money_is_written_as_exact_decimals() {
        let defs = Definitions::of(&plans());
        let counter = key("pro", 0, Subject::user("u1"), t("2026-01-01T00:00:00Z"));
        let Examined::Sum(p) = examine("acme", &counter, 1_500_000_000, &defs, None, t("2026-03-01T00:00:00Z")) else { panic!("closed") };
        let row = p.finish(1_000_000_001);
        assert_eq!((row.counter_value.as_str(), row.difference.as_deref()), ("1.5", Some("0.499999999")));
    }

    #[test]
    fn cycles_end_at_the_anchors_next_start_or_one_clamped_month_later() {
        let anchor = t("2026-01-31T08:30:15.25Z");
        // The Feb 28 start (clamped) ends on Mar 31 with the anchor, nanoseconds kept.
        let feb = t("2026-02-28T08:30:15.25Z");
        assert_eq!(period_of(Period::Cycle, Some(anchor), feb.timestamp()), Some((feb, t("2026-03-31T08:30:15.25Z"))));
        // Without it (or with an anchor that is not this counter's), one month from the start.
        let plain = t("2026-02-28T08:30:15Z");
        assert_eq!(period_of(Period::Cycle, None, feb.timestamp()), Some((plain, t("2026-03-28T08:30:15Z"))));
        assert_eq!(period_of(Period::Cycle, Some(t("2026-01-10T00:00:00Z")), feb.timestamp()).map(|p| p.1), Some(t("2026-03-28T08:30:15Z")));
        // The default plan's cycle is the calendar month.
        assert_eq!(period_of(Period::Cycle, None, t("2026-02-01T00:00:00Z").timestamp()).map(|p| p.1), Some(t("2026-03-01T00:00:00Z")));
        assert_eq!(period_of(Period::Month, None, t("2026-12-01T00:00:00Z").timestamp()).map(|p| p.1), Some(t("2027-01-01T00:00:00Z")));
    }

    #[test]
    fn only_cycle_counters_need_an_anchor() {
        let defs = Definitions::of(&plans());
        let cycle = key("pro", 1, Subject::customer("c1"), t("2026-01-01T00:00:00Z"));
        assert_eq!(defs.anchor_subject(&cycle), Some(Subject::customer("c1")));
        assert_eq!(defs.anchor_subject(&key("default", 0, Subject::user("u1"), t("2026-01-01T00:00:00Z"))), None);
    }

    #[test]
    fn the_report_sorts_and_counts_mismatches() {
        let defs = Definitions::of(&plans());
        let now = t("2026-03-01T10:05:00Z");
        let a = key("default", 0, Subject::user("b"), t("2026-03-01T10:00:00Z"));
        let b = key("default", 0, Subject::user("a"), t("2026-03-01T10:01:00Z"));
        let finish = |c: &str, used, sum| match examine("acme", c, used, &defs, None, now) {
            Examined::Sum(p) => p.finish(sum),
            Examined::Done(r) => r,
        };
        let report = Report::new(now, vec![finish(&a, 3, 3), finish(&b, 4, 3)]);
        assert!(report.rows.windows(2).all(|w| w[0].counter <= w[1].counter));
        assert_eq!((report.count(Status::Match), report.count(Status::Mismatch), report.is_clean()), (1, 1, false));
        let json = serde_json::to_value(&report).expect("json");
        assert!(json["rows"].as_array().expect("rows").iter().any(|r| r["status"] == "mismatch"));
    }
}
