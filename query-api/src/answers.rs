//! The API's answers as typed `Serialize` structs: rows of sums rendered
//! from the measures registry (money as exact decimals), ranges, events and
//! alerts.

use chrono::{DateTime, SecondsFormat, Utc};
use meterline_domain::{AlertRow, CostSource, EventRow, Measure, SumRow, Unit};
use meterline_schemas::Nanos;
use meterline_sql::Scope;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// Nano-USD as an exact decimal, clamped to what an `i64` holds.
pub fn money(n: i128) -> String {
    Nanos(i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })).to_string()
}

/// `num / den` as a decimal string with `scale` digits, rounded half away from zero.
pub fn ratio(num: i128, den: i128, scale: u32) -> Option<String> {
    if den == 0 {
        return None;
    }
    let factor = 10i128.pow(scale);
    let scaled = num * factor * 2;
    let q = (scaled.abs() / den.abs() + 1) / 2;
    let negative = (num < 0) != (den < 0) && q != 0;
    let (int, frac) = (q / factor, q % factor);
    Some(format!("{}{int}.{frac:0width$}", if negative { "-" } else { "" }, width = scale as usize))
}

fn rfc3339(secs: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp(secs, 0).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// The request's range, as answered.
#[derive(Debug, Serialize)]
pub struct Range {
    pub from: String,
    pub to: String,
}

impl Range {
    pub fn of(scope: &Scope) -> Range {
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        Range { from: at(scope.from), to: at(scope.to) }
    }
}

/// Every measure of a row of sums, named and rendered by the registry, and
/// the margin (revenue less cost).
#[derive(Debug)]
pub struct Sums<'a>(pub &'a SumRow);

impl Serialize for Sums<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(Measure::ALL.len() + 1))?;
        for m in Measure::ALL {
            let v = self.0.get(m);
            match m.unit() {
                Unit::Nanos => map.serialize_entry(m.json(), &money(v))?,
                Unit::Events | Unit::Tokens => map.serialize_entry(m.json(), &u64::try_from(v).unwrap_or(0))?,
            }
        }
        map.serialize_entry("margin_usd", &money(self.0.margin()))?;
        map.end()
    }
}

/// A grouped key: absent when not grouped, `null` when empty (events
/// without a customer have customer_id '').
type Key = Option<Option<String>>;

/// One row of sums with its bucket and grouped keys.
#[derive(Debug, Serialize)]
pub struct Row<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Key,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Key,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Key,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Key,
    #[serde(flatten)]
    pub sums: Sums<'a>,
}

impl<'a> Row<'a> {
    /// `r` with the keys of `group_by`, and its bucket if `with_bucket`.
    pub fn of(r: &'a SumRow, group_by: &[&str], with_bucket: bool) -> Row<'a> {
        let key = |dimension: &str, value: &String| group_by.contains(&dimension).then(|| (!value.is_empty()).then(|| value.clone()));
        Row {
            window_start: with_bucket.then(|| rfc3339(i64::from(r.g_bucket))),
            user_id: key("user_id", &r.g_user),
            customer_id: key("customer_id", &r.g_customer),
            feature: key("feature", &r.g_feature),
            model: key("model", &r.g_model),
            sums: Sums(r),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UsageAnswer<'a> {
    pub range: Range,
    pub granularity: &'static str,
    pub group_by: &'a [&'static str],
    pub rows: Vec<Row<'a>>,
    /// Pass as `cursor` (with the same parameters) for the rows after these;
    /// null when there are none.
    pub next_cursor: Option<String>,
}

/// A top spender with its share of the tenant's total for the metric.
#[derive(Debug, Serialize)]
pub struct Ranked<'a> {
    #[serde(flatten)]
    pub row: Row<'a>,
    pub share: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TopSpendersAnswer<'a> {
    pub range: Range,
    pub by: &'static str,
    pub metric: &'static str,
    pub rows: Vec<Ranked<'a>>,
    /// More groups than `limit` exist: the ranking is a top N, cut on purpose.
    pub truncated: bool,
    pub total: Row<'a>,
}

/// A row with its margin as a percentage of revenue (2 decimals).
#[derive(Debug, Serialize)]
pub struct WithMargin<'a> {
    #[serde(flatten)]
    pub row: Row<'a>,
    pub margin_pct: Option<String>,
}

impl<'a> WithMargin<'a> {
    pub fn of(r: &'a SumRow, group_by: &[&str]) -> WithMargin<'a> {
        WithMargin { row: Row::of(r, group_by, false), margin_pct: ratio(r.margin() * 100, i128::from(r.s_revenue), 2) }
    }
}

#[derive(Debug, Serialize)]
pub struct MarginsAnswer<'a> {
    pub range: Range,
    pub group_by: &'a [&'static str],
    pub rows: Vec<WithMargin<'a>>,
    /// More groups than `limit` exist (lowest margins first, cut on purpose).
    pub truncated: bool,
    pub total: WithMargin<'a>,
    pub negative_margin_groups: u64,
}

#[derive(Debug, Serialize)]
pub struct UserUsageAnswer<'a> {
    pub user_id: &'a str,
    pub range: Range,
    pub totals: Row<'a>,
    pub by_feature: Vec<Row<'a>>,
    pub by_model: Vec<Row<'a>>,
    /// More features (models) than the lists hold exist in the range: the
    /// lists are cut at `STATEMENT_GROUPS`, and say so.
    pub by_feature_truncated: bool,
    pub by_model_truncated: bool,
    pub daily: Vec<Row<'a>>,
}

/// One event of the audit trail.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub idempotency_key: &'a str,
    pub timestamp: Option<String>,
    pub user_id: &'a str,
    pub customer_id: Option<&'a str>,
    pub feature: &'a str,
    pub model: &'a str,
    pub provider: Option<&'a str>,
    pub environment: &'a str,
    pub billable: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_usd: String,
    pub cost_source: &'static str,
    pub revenue_usd: String,
    pub credits: String,
    /// The event's metadata (a JSON object), or null.
    pub metadata: Option<serde_json::Value>,
    /// Where the event sits in Kafka; null from the embedded store, which has no log.
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
}

impl<'a> Event<'a> {
    pub fn of(r: &'a EventRow) -> Event<'a> {
        let nonempty = |s: &'a String| (!s.is_empty()).then_some(s.as_str());
        Event {
            idempotency_key: &r.idempotency_key,
            timestamp: DateTime::<Utc>::from_timestamp(i64::from(r.event_time), r.event_time_ns).map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            user_id: &r.user_id,
            customer_id: nonempty(&r.customer_id),
            feature: &r.feature,
            model: &r.model,
            provider: nonempty(&r.provider),
            environment: &r.environment,
            billable: r.billable == 1,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cached_input_tokens: r.cached_input_tokens,
            reasoning_tokens: r.reasoning_tokens,
            cost_usd: money(i128::from(r.cost_nanos)),
            cost_source: CostSource::from_u8(r.cost_source).as_str(),
            revenue_usd: money(i128::from(r.revenue_nanos)),
            credits: money(i128::from(r.credits_nanos)),
            metadata: serde_json::from_str(&r.metadata).ok(),
            kafka_partition: r.kafka_position().map(|(p, _)| p),
            kafka_offset: r.kafka_position().map(|(_, o)| o),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventsAnswer<'a> {
    pub range: Range,
    pub events: Vec<Event<'a>>,
    pub next_cursor: Option<String>,
}

/// One runaway alert.
#[derive(Debug, Serialize)]
pub struct Alert<'a> {
    pub user_id: &'a str,
    pub rule: &'a str,
    pub state: &'a str,
    pub observed_usd: String,
    pub threshold_usd: String,
    pub window_secs: u32,
    pub opened_at: Option<String>,
    pub updated_at: Option<String>,
    pub resolved_at: Option<String>,
}

impl<'a> Alert<'a> {
    pub fn of(a: &'a AlertRow) -> Alert<'a> {
        let at = |secs: u32| (secs > 0).then(|| rfc3339(i64::from(secs))).flatten();
        Alert {
            user_id: &a.user_id,
            rule: &a.rule,
            state: &a.state,
            observed_usd: money(i128::from(a.observed_nanos)),
            threshold_usd: money(i128::from(a.threshold_nanos)),
            window_secs: a.window_secs,
            opened_at: at(a.opened_at),
            updated_at: at(a.updated_at),
            resolved_at: at(a.resolved_at),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AlertsAnswer<'a> {
    pub range: Range,
    pub alerts: Vec<Alert<'a>>,
    /// Pass as `cursor` for the alerts after these; null when there are none.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_round_half_away_from_zero() {
        assert_eq!(ratio(1, 3, 6).as_deref(), Some("0.333333"));
        assert_eq!(ratio(2, 3, 6).as_deref(), Some("0.666667"));
        assert_eq!(ratio(-1, 8, 2).as_deref(), Some("-0.13"));
        assert_eq!(ratio(5, 1, 2).as_deref(), Some("5.00"));
        assert_eq!(ratio(1, 0, 2), None);
        assert_eq!(ratio(0, 7, 2).as_deref(), Some("0.00"));
    }

    #[test]
    fn rows_render_every_measure_and_only_grouped_keys() {
        let r = SumRow { g_user: "u".into(), g_bucket: 86_400, s_events: 2, s_input: 5, s_cost: 1_500_000_000, s_revenue: 1_000_000_000, ..SumRow::default() };
        let v = serde_json::to_value(Row::of(&r, &["user_id", "customer_id"], true)).unwrap();
        assert_eq!(v["user_id"], "u");
        assert!(v["customer_id"].is_null() && v.get("customer_id").is_some(), "grouped but empty: null");
        assert!(v.get("model").is_none(), "not grouped: absent");
        assert_eq!(v["window_start"], "1970-01-02T00:00:00Z");
        assert_eq!((v["events"].as_u64(), v["input_tokens"].as_u64()), (Some(2), Some(5)));
        assert_eq!((v["cost_usd"].as_str(), v["margin_usd"].as_str()), (Some("1.5"), Some("-0.5")));
        for m in Measure::ALL {
            assert!(v.get(m.json()).is_some(), "{} rendered", m.json());
        }
    }
}
