//! A request's tenant, range and filters, and the WHERE clauses both stores
//! build from it in their own dialect.

use chrono::{DateTime, Utc};
use meterline_domain::TimeColumn;

use crate::builder::{Sql, Value, i, s};

/// How a store writes what differs between the engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Times are `DateTime` columns: a bound second count is wrapped in `toDateTime`.
    ClickHouse,
    /// Times are integer seconds.
    Sqlite,
}

impl Dialect {
    /// A placeholder for a time in Unix seconds.
    pub fn time_param(self) -> &'static str {
        match self {
            Dialect::ClickHouse => "toDateTime(?)",
            Dialect::Sqlite => "?",
        }
    }
}

/// A request's range (half-open) and equality filters, for one tenant.
#[derive(Debug, Clone)]
pub struct Scope {
    pub tenant: String,
    pub time_column: TimeColumn,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Equality filters on whitelisted columns.
    pub filters: Vec<(&'static str, Value)>,
}

impl Scope {
    /// The WHERE clause for the tenant and filters over the union of `ranges`
    /// (Unix seconds, half-open) on the scope's time column.
    pub fn clause(&self, dialect: Dialect, ranges: &[(i64, i64)]) -> Sql {
        self.clause_with_column(dialect, ranges, self.time_column.as_str())
    }

    /// The WHERE clause for the whole range.
    pub fn range_clause(&self, dialect: Dialect) -> Sql {
        self.clause(dialect, &[(self.from.timestamp(), self.to.timestamp())])
    }

    /// [`Scope::clause`] with the time column written as `column` (SQLite's
    /// `+window_start`, say, which keeps the planner off an index).
    pub fn clause_with_column(&self, dialect: Dialect, ranges: &[(i64, i64)], column: &str) -> Sql {
        let t = dialect.time_param();
        let piece = format!("({column} >= {t} AND {column} < {t})");
        let time = crate::builder::repeat(ranges, " OR ", &piece, |(from, to)| vec![i((*from).max(0)), i((*to).max(0))]);
        self.clause_on(time)
    }

    /// The WHERE clause for the tenant and filters, and `condition`.
    pub fn clause_on(&self, condition: Sql) -> Sql {
        let mut sql = Sql::default();
        sql.push("tenant = ? AND (", [s(self.tenant.clone())]);
        sql.append(condition);
        sql.push(")", []);
        for (column, value) in &self.filters {
            sql.push(&format!(" AND {column} = ?"), [value.clone()]);
        }
        sql
    }

    /// True when the request is about one user (filtered by `user_id`).
    pub fn one_user(&self) -> bool {
        self.filters.iter().any(|(c, _)| *c == "user_id")
    }

    /// The same tenant and filters over `[from, to)` (Unix seconds).
    pub fn with_range(&self, from: i64, to: i64) -> Scope {
        let mut scope = self.clone();
        scope.from = DateTime::from_timestamp(from, 0).unwrap_or(self.from);
        scope.to = DateTime::from_timestamp(to, 0).unwrap_or(self.to);
        scope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_dialects_bind_the_same_values() {
        let scope = Scope {
            tenant: "t".into(),
            time_column: TimeColumn::WindowStart,
            from: DateTime::from_timestamp(100, 0).unwrap(),
            to: DateTime::from_timestamp(200, 0).unwrap(),
            filters: vec![("feature", s("chat"))],
        };
        let ch = scope.clause(Dialect::ClickHouse, &[(100, 150), (160, 200)]);
        assert_eq!(
            ch.text,
            "tenant = ? AND ((window_start >= toDateTime(?) AND window_start < toDateTime(?)) OR (window_start >= toDateTime(?) AND window_start < toDateTime(?))) AND feature = ?"
        );
        let lite = scope.clause_with_column(Dialect::Sqlite, &[(100, 150), (160, 200)], "+window_start");
        assert_eq!(lite.text, "tenant = ? AND ((+window_start >= ? AND +window_start < ?) OR (+window_start >= ? AND +window_start < ?)) AND feature = ?");
        assert_eq!(ch.binds, lite.binds);
        assert_eq!(ch.binds, vec![s("t"), i(100), i(150), i(160), i(200), s("chat")]);
    }
}
