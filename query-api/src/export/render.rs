//! An export as its answers: the typed JSON (`ExportAnswer`) and the CSV, the same columns in the same order, money as exact decimals.

use chrono::{DateTime, SecondsFormat, Utc};
use meterline_domain::SumRow;
use meterline_limits::LimitMeasure;
use meterline_schemas::Nanos;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::{Billed, ExportRequest};

/// A time as the export writes it: RFC 3339 UTC, nanoseconds only when there are any.
fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A measure's sum in a row: money as exact decimal text, counts as integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Amount {
    Money(String),
    Count(u64),
}

/// `m`'s sum in `row`.
pub fn value(m: LimitMeasure, row: &SumRow) -> Amount {
    match m {
        LimitMeasure::Events => Amount::Count(row.s_events),
        LimitMeasure::InputTokens => Amount::Count(row.s_input),
        LimitMeasure::OutputTokens => Amount::Count(row.s_output),
        LimitMeasure::CachedInputTokens => Amount::Count(row.s_cached),
        LimitMeasure::ReasoningTokens => Amount::Count(row.s_reasoning),
        LimitMeasure::TotalTokens => Amount::Count(row.s_input.saturating_add(row.s_output).saturating_add(row.s_cached).saturating_add(row.s_reasoning)),
        LimitMeasure::CostUsd => Amount::Money(Nanos(row.s_cost).to_string()),
        LimitMeasure::RevenueUsd => Amount::Money(Nanos(row.s_revenue).to_string()),
        LimitMeasure::Credits => Amount::Money(Nanos(row.s_credits).to_string()),
    }
}

impl Amount {
    fn text(&self) -> String {
        match self {
            Amount::Money(s) => s.clone(),
            Amount::Count(n) => n.to_string(),
        }
    }
}

/// The chosen measures of a row, in the request's order.
#[derive(Debug)]
pub struct Measures<'a> {
    measures: &'a [LimitMeasure],
    sums: &'a SumRow,
}

impl Serialize for Measures<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.measures.len()))?;
        for m in self.measures {
            match value(*m, self.sums) {
                Amount::Money(s) => map.serialize_entry(m.name(), &s)?,
                Amount::Count(n) => map.serialize_entry(m.name(), &n)?,
            }
        }
        map.end()
    }
}

/// One row of the export.
#[derive(Debug, Serialize)]
pub struct ExportRow<'a> {
    pub tenant: &'a str,
    /// `customer` or `user`.
    pub scope: &'static str,
    pub subject_id: &'a str,
    pub period_start: String,
    pub period_end: String,
    /// `cycle` (the subject's subscription cycle) or `month` (a calendar month).
    pub period: &'static str,
    #[serde(flatten)]
    pub measures: Measures<'a>,
}

/// The JSON answer.
#[derive(Debug, Serialize)]
pub struct ExportAnswer<'a> {
    pub tenant: &'a str,
    pub by: &'static str,
    pub from: String,
    pub to: String,
    pub measures: Vec<&'static str>,
    pub rows: Vec<ExportRow<'a>>,
}

impl<'a> ExportAnswer<'a> {
    pub fn of(req: &'a ExportRequest, billed: &'a [Billed]) -> ExportAnswer<'a> {
        let rows = billed
            .iter()
            .map(|b| ExportRow {
                tenant: &req.tenant,
                scope: req.by.name(),
                subject_id: &b.subject,
                period_start: at(b.period_start),
                period_end: at(b.period_end),
                period: if b.cycle { "cycle" } else { "month" },
                measures: Measures { measures: &req.measures, sums: &b.sums },
            })
            .collect();
        ExportAnswer { tenant: &req.tenant, by: req.by.name(), from: at(req.from), to: at(req.to), measures: req.measures.iter().map(|m| m.name()).collect(), rows }
    }
}

/// A CSV field, quoted when it holds a separator, a quote or a line break (RFC 4180).
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_owned() }
}

/// The export as CSV: a header row, then one line per row, `\n`-terminated.
pub fn csv(req: &ExportRequest, billed: &[Billed]) -> String {
    let mut head = vec!["tenant", "scope", "subject_id", "period_start", "period_end", "period"];
    head.extend(req.measures.iter().map(|m| m.name()));
    let mut out = head.join(",");
    out.push('\n');
    for b in billed {
        let mut cells = vec![field(&req.tenant), req.by.name().to_owned(), field(&b.subject), at(b.period_start), at(b.period_end)];
        cells.push(if b.cycle { "cycle" } else { "month" }.to_owned());
        cells.extend(req.measures.iter().map(|m| value(*m, &b.sums).text()));
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_limits::Scope;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn csv_and_json_carry_the_same_exact_values() {
        let req = ExportRequest {
            tenant: "acme".into(),
            from: t("2026-01-01T00:00:00Z"),
            to: t("2026-02-01T00:00:00Z"),
            by: Scope::Customer,
            measures: vec![LimitMeasure::CostUsd, LimitMeasure::TotalTokens],
        };
        let sums = SumRow { s_cost: 1_000_000_001, s_input: 10, s_output: 5, s_reasoning: 1, ..SumRow::default() };
        let billed = vec![Billed { subject: "a,\"b\"".into(), period_start: req.from, period_end: t("2026-01-15T12:30:15.5Z"), cycle: true, sums }];
        assert_eq!(
            csv(&req, &billed),
            "tenant,scope,subject_id,period_start,period_end,period,cost_usd,total_tokens\n\
             acme,customer,\"a,\"\"b\"\"\",2026-01-01T00:00:00Z,2026-01-15T12:30:15.500Z,cycle,1.000000001,16\n"
        );
        let json = serde_json::to_value(ExportAnswer::of(&req, &billed)).expect("json");
        assert_eq!(json["rows"][0]["cost_usd"], "1.000000001");
        assert_eq!(json["rows"][0]["total_tokens"], 16);
        assert_eq!(json["measures"], serde_json::json!(["cost_usd", "total_tokens"]));
    }
}
