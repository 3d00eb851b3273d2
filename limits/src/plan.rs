//! Plans and their limits: the admin's contract, parsed field by field so that every refusal names its field.

use meterline_domain::EventRow;
use meterline_schemas::Nanos;
use meterline_schemas::event::{MAX_ID_BYTES, MAX_NAME_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use crate::error::Invalid;

/// The plan every user or customer without a subscription is on.
pub const DEFAULT_PLAN: &str = "default";
/// Most limits one plan may hold: each is a counter per subject and period.
pub const MAX_LIMITS: usize = 64;
/// Most `notify_at` thresholds one limit may hold.
pub const MAX_THRESHOLDS: usize = 8;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitMeasure {
    Events,
    InputTokens,
    OutputTokens,
    CachedInputTokens,
    ReasoningTokens,
    /// The four token counts added.
    TotalTokens,
    CostUsd,
    RevenueUsd,
    Credits,
}

impl LimitMeasure {
    pub const ALL: [LimitMeasure; 9] = [
        LimitMeasure::Events,
        LimitMeasure::InputTokens,
        LimitMeasure::OutputTokens,
        LimitMeasure::CachedInputTokens,
        LimitMeasure::ReasoningTokens,
        LimitMeasure::TotalTokens,
        LimitMeasure::CostUsd,
        LimitMeasure::RevenueUsd,
        LimitMeasure::Credits,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LimitMeasure::Events => "events",
            LimitMeasure::InputTokens => "input_tokens",
            LimitMeasure::OutputTokens => "output_tokens",
            LimitMeasure::CachedInputTokens => "cached_input_tokens",
            LimitMeasure::ReasoningTokens => "reasoning_tokens",
            LimitMeasure::TotalTokens => "total_tokens",
            LimitMeasure::CostUsd => "cost_usd",
            LimitMeasure::RevenueUsd => "revenue_usd",
            LimitMeasure::Credits => "credits",
        }
    }

    pub fn parse(name: &str) -> Option<LimitMeasure> {
        LimitMeasure::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Money is held in nano-units and written as exact decimals; counts are whole numbers.
    pub fn is_money(self) -> bool {
        matches!(self, LimitMeasure::CostUsd | LimitMeasure::RevenueUsd | LimitMeasure::Credits)
    }

    /// How much of this measure one stored event carries.
    pub fn of_row(self, row: &EventRow) -> i64 {
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        match self {
            LimitMeasure::Events => 1,
            LimitMeasure::InputTokens => tokens(row.input_tokens),
            LimitMeasure::OutputTokens => tokens(row.output_tokens),
            LimitMeasure::CachedInputTokens => tokens(row.cached_input_tokens),
            LimitMeasure::ReasoningTokens => tokens(row.reasoning_tokens),
            LimitMeasure::TotalTokens => {
                tokens(row.input_tokens + row.output_tokens + row.cached_input_tokens + row.reasoning_tokens)
            }
            LimitMeasure::CostUsd => row.cost_nanos,
            LimitMeasure::RevenueUsd => row.revenue_nanos,
            LimitMeasure::Credits => row.credits_nanos,
        }
    }

    /// Parses an amount of this measure: an exact decimal for money (at most
    /// nine fractional digits), a whole number for counts; never negative.
    pub fn parse_amount(self, text: &str) -> Result<i64, String> {
        if self.is_money() {
            return Nanos::parse_non_negative(text).map(|n| n.0).map_err(|e| e.to_string());
        }
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("must be a whole number of {}", self.name()));
        }
        text.parse::<i64>().map_err(|_| "is too large".to_owned())
    }

    /// The amount as the API writes it: exact decimal text.
    pub fn format(self, amount: i64) -> String {
        if self.is_money() { Nanos(amount).to_string() } else { amount.to_string() }
    }
}

/// Whose usage a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    User,
    /// Shared by every user of the customer.
    Customer,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Customer => "customer",
        }
    }
}

/// The window a limit's counter resets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Minute,
    Hour,
    Day,
    /// The UTC calendar month.
    Month,
    /// Monthly from the subscription's `cycle_start`; the calendar month for
    /// a subject on the default plan (it has no subscription to anchor on).
    Cycle,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Cycle => "cycle",
        }
    }
}

/// Which events a limit counts: all that match every field given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

impl Filter {
    pub fn matches(&self, feature: &str, model: &str, environment: &str) -> bool {
        self.feature.as_deref().is_none_or(|f| f == feature)
            && self.model.as_deref().is_none_or(|m| m == model)
            && self.environment.as_deref().is_none_or(|e| e == environment)
    }
}

/// One limit of a plan, validated. Amounts are in the measure's unit
/// (nano-units for money); `notify_at` ratios are in billionths (1.0 = 10^9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub name: String,
    pub measure: LimitMeasure,
    pub scope: Scope,
    pub period: Period,
    pub amount: i64,
    pub hard: bool,
    pub filter: Filter,
    pub notify_at: Vec<i64>,
}

/// A plan: its limits, in the order given, names unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub limits: Vec<Limit>,
}

/// A limit as written in the API and stored: amounts as exact decimal text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitView {
    pub name: String,
    pub measure: LimitMeasure,
    pub scope: Scope,
    pub period: Period,
    pub amount: String,
    pub hard: bool,
    #[serde(default)]
    pub filter: Filter,
    #[serde(default)]
    pub notify_at: Vec<String>,
}

/// A plan as the API answers it and the stores keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    pub plan_id: String,
    pub limits: Vec<LimitView>,
}

impl Plan {
    pub fn view(&self, plan_id: &str) -> PlanView {
        PlanView {
            plan_id: plan_id.to_owned(),
            limits: self
                .limits
                .iter()
                .map(|l| LimitView {
                    name: l.name.clone(),
                    measure: l.measure,
                    scope: l.scope,
                    period: l.period,
                    amount: l.measure.format(l.amount),
                    hard: l.hard,
                    filter: l.filter.clone(),
                    notify_at: l.notify_at.iter().map(|r| Nanos(*r).to_string()).collect(),
                })
                .collect(),
        }
    }

    /// The stored form back into a plan. Stored plans were validated when
    /// put, so a failure here means the store holds something else. Direct,
    /// not through JSON: every reservation reads its plans.
    pub fn from_view(view: &PlanView) -> Result<Plan, Invalid> {
        let limits = view
            .limits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let amount = l.measure.parse_amount(&l.amount).map_err(|e| Invalid::new(format!("limits[{i}].amount"), e))?;
                let notify_at = l
                    .notify_at
                    .iter()
                    .map(|r| Nanos::parse_non_negative(r).map(|n| n.0).map_err(|e| Invalid::new(format!("limits[{i}].notify_at"), e.to_string())))
                    .collect::<Result<Vec<i64>, Invalid>>()?;
                Ok(Limit {
                    name: l.name.clone(),
                    measure: l.measure,
                    scope: l.scope,
                    period: l.period,
                    amount,
                    hard: l.hard,
                    filter: l.filter.clone(),
                    notify_at,
                })
            })
            .collect::<Result<Vec<Limit>, Invalid>>()?;
        Ok(Plan { limits })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanIn<'a> {
    #[serde(borrow)]
    limits: Option<Vec<LimitIn<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitIn<'a> {
    name: Option<String>,
    measure: Option<String>,
    scope: Option<String>,
    period: Option<String>,
    #[serde(borrow)]
    amount: Option<&'a RawValue>,
    hard: Option<bool>,
    filter: Option<BTreeMap<String, String>>,
    #[serde(borrow)]
    notify_at: Option<Vec<&'a RawValue>>,
}

/// Checks a plan or subject identifier from a path.
pub fn check_id(field: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(Invalid::new(field, format!("must be at most {MAX_ID_BYTES} bytes")));
    }
    if id.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// The decimal text of a JSON string or number, as sent.
pub(crate) fn decimal_text(raw: &RawValue) -> Option<&str> {
    let text = raw.get();
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        return Some(inner);
    }
    text.bytes().next().is_some_and(|b| b == b'-' || b.is_ascii_digit()).then_some(text)
}

/// Parses `PUT /v1/plans/{id}`'s body.
pub fn parse_plan(body: &str) -> Result<Plan, Invalid> {
    let input: PlanIn = serde_json::from_str(body).map_err(|e| Invalid::new("limits", format!("the body is not a plan: {e}")))?;
    let limits = input.limits.ok_or_else(|| Invalid::new("limits", "is required (an array of limits, may be empty)"))?;
    if limits.len() > MAX_LIMITS {
        return Err(Invalid::new("limits", format!("at most {MAX_LIMITS} limits per plan")));
    }
    let mut out = Vec::with_capacity(limits.len());
    for (i, l) in limits.into_iter().enumerate() {
        let limit = parse_limit(i, l)?;
        if out.iter().any(|o: &Limit| o.name == limit.name) {
            return Err(Invalid::new(format!("limits[{i}].name"), format!("`{}` is used by another limit of this plan", limit.name)));
        }
        out.push(limit);
    }
    Ok(Plan { limits: out })
}

fn parse_limit(i: usize, l: LimitIn<'_>) -> Result<Limit, Invalid> {
    let field = |name: &str| format!("limits[{i}].{name}");
    let name = l.name.ok_or_else(|| Invalid::new(field("name"), "is required"))?;
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(Invalid::new(field("name"), format!("must be 1 to {MAX_NAME_BYTES} bytes without control characters")));
    }
    let measure_text = l.measure.ok_or_else(|| Invalid::new(field("measure"), "is required"))?;
    let measure = LimitMeasure::parse(&measure_text).ok_or_else(|| {
        let names: Vec<&str> = LimitMeasure::ALL.iter().map(|m| m.name()).collect();
        Invalid::new(field("measure"), format!("unknown measure `{measure_text}`; one of {}", names.join(", ")))
    })?;
    let scope = match l.scope.as_deref() {
        None | Some("user") => Scope::User,
        Some("customer") => Scope::Customer,
        Some(other) => return Err(Invalid::new(field("scope"), format!("unknown scope `{other}`; one of user, customer"))),
    };
    let period = match l.period.as_deref() {
        Some("minute") => Period::Minute,
        Some("hour") => Period::Hour,
        Some("day") => Period::Day,
        Some("month") => Period::Month,
        Some("cycle") => Period::Cycle,
        Some(other) => {
            return Err(Invalid::new(field("period"), format!("unknown period `{other}`; one of minute, hour, day, month, cycle")));
        }
        None => return Err(Invalid::new(field("period"), "is required")),
    };
    let raw = l.amount.ok_or_else(|| Invalid::new(field("amount"), "is required"))?;
    let text = decimal_text(raw).ok_or_else(|| Invalid::new(field("amount"), "must be a decimal number (a string or a JSON number)"))?;
    let amount = measure.parse_amount(text).map_err(|e| Invalid::new(field("amount"), e))?;
    let mut filter = Filter::default();
    for (key, value) in l.filter.unwrap_or_default() {
        if value.is_empty() || value.len() > MAX_NAME_BYTES {
            return Err(Invalid::new(field(&format!("filter.{key}")), format!("must be 1 to {MAX_NAME_BYTES} bytes")));
        }
        match key.as_str() {
            "feature" => filter.feature = Some(value),
            "model" => filter.model = Some(value),
            "environment" => filter.environment = Some(value),
            _ => return Err(Invalid::new(field(&format!("filter.{key}")), "unknown filter; one of feature, model, environment")),
        }
    }
    let thresholds = l.notify_at.unwrap_or_default();
    if thresholds.len() > MAX_THRESHOLDS {
        return Err(Invalid::new(field("notify_at"), format!("at most {MAX_THRESHOLDS} thresholds")));
    }
    let mut notify_at = Vec::with_capacity(thresholds.len());
    for (j, raw) in thresholds.into_iter().enumerate() {
        let at = format!("limits[{i}].notify_at[{j}]");
        let ratio = decimal_text(raw)
            .and_then(|t| Nanos::parse_non_negative(t).ok())
            .filter(|r| r.0 > 0 && r.0 <= 10 * meterline_schemas::money::NANOS_PER_UNIT)
            .ok_or_else(|| Invalid::new(at, "must be a ratio of the amount above 0 and at most 10 (\"0.8\" is 80%)"))?;
        notify_at.push(ratio.0);
    }
    notify_at.sort_unstable();
    notify_at.dedup();
    Ok(Limit { name, measure, scope, period, amount, hard: l.hard.unwrap_or(true), filter, notify_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses_and_prints_back() {
        let plan = parse_plan(
            r#"{"limits":[{"name":"daily-gens","measure":"events","scope":"user","period":"day","amount":"10","hard":true,
                "filter":{"feature":"image_gen"},"notify_at":["0.8","1"]},
               {"name":"cap","measure":"cost_usd","period":"month","amount":5.5}]}"#,
        )
        .expect("valid");
        assert_eq!(plan.limits[0].amount, 10);
        assert_eq!(plan.limits[0].notify_at, vec![800_000_000, 1_000_000_000]);
        assert_eq!(plan.limits[1].amount, 5_500_000_000);
        assert!(plan.limits[1].hard, "hard by default");
        let view = plan.view("pro");
        assert_eq!(view.limits[1].amount, "5.5");
        assert_eq!(Plan::from_view(&view).expect("round trip"), plan);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (r#"{"limits":[{"name":"a","measure":"tokens","period":"day","amount":"1"}]}"#, "limits[0].measure"),
            (r#"{"limits":[{"name":"a","measure":"cost_usd","period":"day","amount":"-1"}]}"#, "limits[0].amount"),
            (r#"{"limits":[{"name":"a","measure":"cost_usd","period":"day","amount":"0.0000000001"}]}"#, "limits[0].amount"),
            (r#"{"limits":[{"name":"a","measure":"events","period":"day","amount":"1.5"}]}"#, "limits[0].amount"),
            (r#"{"limits":[{"name":"a","measure":"events","period":"week","amount":"1"}]}"#, "limits[0].period"),
            (r#"{"limits":[{"name":"a","measure":"events","period":"day","amount":"1","filter":{"user":"x"}}]}"#, "limits[0].filter.user"),
            (r#"{"limits":[{"name":"a","measure":"events","period":"day","amount":"1","notify_at":["0"]}]}"#, "limits[0].notify_at[0]"),
            (r#"{"limits":[{"name":"a","measure":"events","period":"day","amount":"1"},{"name":"a","measure":"events","period":"day","amount":"1"}]}"#, "limits[1].name"),
            (r#"{}"#, "limits"),
        ];
        for (body, field) in cases {
            let err = parse_plan(body).expect_err(body);
            assert_eq!(err.field, field, "{body}: {}", err.message);
        }
    }

    #[test]
    fn filters_match_every_given_field() {
        let f = Filter { model: Some("gpt-4.1".into()), ..Filter::default() };
        assert!(f.matches("chat", "gpt-4.1", "production"));
        assert!(!f.matches("chat", "gpt-4o", "production"));
        assert!(Filter::default().matches("x", "y", "z"));
    }
}
