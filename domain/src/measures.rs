//! The one registry of the summed measures: their rollup columns, the
//! aliases statements give their sums, their JSON names, how each is summed
//! from raw events, and the arithmetic on a row of sums. Every table, statement,
//! ranking and renderer derives its list from [`Measure::ALL`].

use serde::Deserialize;

/// A measure every rollup row sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    Events,
    InputTokens,
    OutputTokens,
    CachedInputTokens,
    ReasoningTokens,
    Cost,
    Revenue,
    Credits,
    UnpricedEvents,
}

/// What a measure counts, which decides how it is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count of events.
    Events,
    Tokens,
    /// Nano-USD (or nano-credits), rendered as an exact decimal.
    Nanos,
}

impl Measure {
    /// Every measure, in the order of the rollup columns and of [`SumRow`].
    pub const ALL: [Measure; 9] = [
        Measure::Events,
        Measure::InputTokens,
        Measure::OutputTokens,
        Measure::CachedInputTokens,
        Measure::ReasoningTokens,
        Measure::Cost,
        Measure::Revenue,
        Measure::Credits,
        Measure::UnpricedEvents,
    ];

    /// The four token measures.
    pub const TOKENS: [Measure; 4] = [Measure::InputTokens, Measure::OutputTokens, Measure::CachedInputTokens, Measure::ReasoningTokens];

    /// The rollup tables' column.
    pub fn column(self) -> &'static str {
        match self {
            Measure::Events => "events",
            Measure::InputTokens => "input_tokens",
            Measure::OutputTokens => "output_tokens",
            Measure::CachedInputTokens => "cached_input_tokens",
            Measure::ReasoningTokens => "reasoning_tokens",
            Measure::Cost => "cost_nanos",
            Measure::Revenue => "revenue_nanos",
            Measure::Credits => "credits_nanos",
            Measure::UnpricedEvents => "unpriced_events",
        }
    }

    /// The alias a statement gives the measure's sum (the [`SumRow`] field).
    pub fn alias(self) -> &'static str {
        match self {
            Measure::Events => "s_events",
            Measure::InputTokens => "s_input",
            Measure::OutputTokens => "s_output",
            Measure::CachedInputTokens => "s_cached",
            Measure::ReasoningTokens => "s_reasoning",
            Measure::Cost => "s_cost",
            Measure::Revenue => "s_revenue",
            Measure::Credits => "s_credits",
            Measure::UnpricedEvents => "s_unpriced",
        }
    }

    /// The name in API answers.
    pub fn json(self) -> &'static str {
        match self {
            Measure::Cost => "cost_usd",
            Measure::Revenue => "revenue_usd",
            Measure::Credits => "credits",
            other => other.column(),
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Measure::Events | Measure::UnpricedEvents => Unit::Events,
            Measure::Cost | Measure::Revenue | Measure::Credits => Unit::Nanos,
            _ => Unit::Tokens,
        }
    }

    /// The measure summed from rows of `events` (one row per event).
    pub fn from_events(self) -> &'static str {
        match self {
            Measure::Events => "count()",
            Measure::UnpricedEvents => "countIf(cost_source = 0)",
            Measure::InputTokens => "sum(input_tokens)",
            Measure::OutputTokens => "sum(output_tokens)",
            Measure::CachedInputTokens => "sum(cached_input_tokens)",
            Measure::ReasoningTokens => "sum(reasoning_tokens)",
            Measure::Cost => "sum(cost_nanos)",
            Measure::Revenue => "sum(revenue_nanos)",
            Measure::Credits => "sum(credits_nanos)",
        }
    }
}

/// A row of sums over rollup rows, with the group it belongs to; dimension
/// keys are '' where not grouped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "clickhouse", derive(clickhouse::Row))]
pub struct SumRow {
    pub g_bucket: u32,
    pub g_user: String,
    pub g_customer: String,
    pub g_feature: String,
    pub g_model: String,
    pub s_events: u64,
    pub s_input: u64,
    pub s_output: u64,
    pub s_cached: u64,
    pub s_reasoning: u64,
    pub s_cost: i64,
    pub s_revenue: i64,
    pub s_credits: i64,
    pub s_unpriced: u64,
}

impl SumRow {
    /// The sum of `m`, widened so that money and tokens compare and subtract
    /// without overflow.
    pub fn get(&self, m: Measure) -> i128 {
        match m {
            Measure::Events => i128::from(self.s_events),
            Measure::InputTokens => i128::from(self.s_input),
            Measure::OutputTokens => i128::from(self.s_output),
            Measure::CachedInputTokens => i128::from(self.s_cached),
            Measure::ReasoningTokens => i128::from(self.s_reasoning),
            Measure::Cost => i128::from(self.s_cost),
            Measure::Revenue => i128::from(self.s_revenue),
            Measure::Credits => i128::from(self.s_credits),
            Measure::UnpricedEvents => i128::from(self.s_unpriced),
        }
    }

    /// Adds `other`'s sums to this row's (wrapping, as the stores' integer sums do).
    pub fn add(&mut self, other: &SumRow) {
        self.combine(other, 1);
    }

    /// Takes `other`'s sums from this row's.
    pub fn subtract(&mut self, other: &SumRow) {
        self.combine(other, -1);
    }

    fn combine(&mut self, o: &SumRow, sign: i8) {
        let u = |a: &mut u64, b: u64| *a = if sign > 0 { a.wrapping_add(b) } else { a.wrapping_sub(b) };
        let i = |a: &mut i64, b: i64| *a = if sign > 0 { a.wrapping_add(b) } else { a.wrapping_sub(b) };
        u(&mut self.s_events, o.s_events);
        u(&mut self.s_input, o.s_input);
        u(&mut self.s_output, o.s_output);
        u(&mut self.s_cached, o.s_cached);
        u(&mut self.s_reasoning, o.s_reasoning);
        i(&mut self.s_cost, o.s_cost);
        i(&mut self.s_revenue, o.s_revenue);
        i(&mut self.s_credits, o.s_credits);
        u(&mut self.s_unpriced, o.s_unpriced);
    }

    /// All four kinds of tokens.
    pub fn tokens(&self) -> u64 {
        self.s_input + self.s_output + self.s_cached + self.s_reasoning
    }

    /// Revenue less cost, in nano-USD.
    pub fn margin(&self) -> i128 {
        i128::from(self.s_revenue) - i128::from(self.s_cost)
    }

    /// The group's key columns, in order.
    pub fn keys(&self) -> (&str, &str, &str, &str) {
        (&self.g_user, &self.g_customer, &self.g_feature, &self.g_model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_names_each_measure_once_and_agrees_with_sum_row() {
        let mut seen = std::collections::HashSet::new();
        for m in Measure::ALL {
            assert!(seen.insert(m.column()) && seen.insert(m.alias()), "{m:?} named twice");
        }
        // One distinct value per field: each measure reads its own field.
        let row = SumRow { s_events: 1, s_input: 2, s_output: 3, s_cached: 4, s_reasoning: 5, s_cost: 6, s_revenue: 7, s_credits: 8, s_unpriced: 9, ..SumRow::default() };
        let got: Vec<i128> = Measure::ALL.iter().map(|m| row.get(*m)).collect();
        assert_eq!(got, (1..=9).collect::<Vec<i128>>());
        assert_eq!(row.tokens() as i128, Measure::TOKENS.iter().map(|m| row.get(*m)).sum::<i128>());
        assert_eq!(Measure::Cost.json(), "cost_usd");
        assert_eq!(Measure::InputTokens.json(), "input_tokens");
    }

    #[test]
    fn add_then_subtract_is_identity() {
        let a = SumRow { s_events: 3, s_cost: -5, s_revenue: 9, s_unpriced: 1, ..SumRow::default() };
        let b = SumRow { s_events: 2, s_cost: 7, s_input: 11, ..SumRow::default() };
        let mut c = a.clone();
        c.add(&b);
        assert_eq!((c.s_events, c.s_cost, c.s_input), (5, 2, 11));
        assert_eq!(c.margin(), 7);
        c.subtract(&b);
        assert_eq!(c, a);
    }
}
