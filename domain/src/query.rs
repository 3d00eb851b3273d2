//! The vocabulary of questions asked of the rollups: time buckets, ranking
//! metrics and orders, and which time a request's range applies to.

/// The time bucket of a usage answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Month,
    /// One bucket for the whole range.
    Total,
}

impl Granularity {
    pub const ALL: [Granularity; 5] = [Granularity::Minute, Granularity::Hour, Granularity::Day, Granularity::Month, Granularity::Total];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
            Granularity::Total => "total",
        }
    }

    pub fn parse(text: &str) -> Option<Granularity> {
        Granularity::ALL.into_iter().find(|g| g.as_str() == text)
    }

    /// Whole UTC days can answer it (day, month or total buckets).
    pub fn whole_days(self) -> bool {
        matches!(self, Granularity::Day | Granularity::Month | Granularity::Total)
    }
}

/// What a ranking ranks groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Cost,
    /// All four kinds of tokens.
    Tokens,
    Revenue,
    /// Revenue less cost.
    Margin,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Cost, Metric::Tokens, Metric::Revenue, Metric::Margin];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cost => "cost",
            Metric::Tokens => "tokens",
            Metric::Revenue => "revenue",
            Metric::Margin => "margin",
        }
    }

    pub fn parse(text: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.as_str() == text)
    }

    /// The metric's value for a row of sums.
    pub fn of(self, r: &crate::SumRow) -> i128 {
        match self {
            Metric::Cost => i128::from(r.s_cost),
            Metric::Tokens => i128::from(r.tokens()),
            Metric::Revenue => i128::from(r.s_revenue),
            Metric::Margin => r.margin(),
        }
    }
}

/// The time a request's range applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeColumn {
    /// Rollup windows: a window belongs to a range if it starts in it.
    WindowStart,
    /// Raw events' own time (the audit trail).
    EventTime,
    /// When an alert opened.
    OpenedAt,
}

impl TimeColumn {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeColumn::WindowStart => "window_start",
            TimeColumn::EventTime => "event_time",
            TimeColumn::OpenedAt => "opened_at",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for g in Granularity::ALL {
            assert_eq!(Granularity::parse(g.as_str()), Some(g));
        }
        for m in Metric::ALL {
            assert_eq!(Metric::parse(m.as_str()), Some(m));
        }
        assert_eq!(Granularity::parse("week"), None);
        assert!(Granularity::Month.whole_days() && !Granularity::Hour.whole_days());
    }
}
