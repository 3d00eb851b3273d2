//! The Stripe meter sync's sums: billable usage per subject and UTC hour
//! from the minute rollups, for a list of subjects, in both dialects.
//!
//! Summed from the rollups, not `events`: the sync's windows are whole
//! hours, which minute rows tile exactly, and they are far fewer rows. On
//! ClickHouse `rollups_minute` is exact too: it is summed by the server from
//! the deduplicated `events` in one INSERT with its progress markers, so a
//! flush's rows land once (the aggregator's repair starts after the last
//! marker), and its marker rows (tenant '') never match a tenant.

use crate::builder::{Sql, Value, i, s};
use crate::scope::Dialect;

/// The columns the sums may name: the subject and filter columns and the summed measures.
const ALLOWED: &[&str] = &[
    "user_id",
    "customer_id",
    "feature",
    "model",
    "environment",
    "events",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_nanos",
    "revenue_nanos",
];

/// What to sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourlySums {
    pub tenant: String,
    /// `user_id` or `customer_id`.
    pub subject_column: &'static str,
    /// Columns added per row and summed.
    pub columns: &'static [&'static str],
    /// Equality filters: `feature`, `model`, `environment`.
    pub filters: Vec<(&'static str, String)>,
    /// Half-open range of minute windows, Unix seconds.
    pub from: i64,
    pub to: i64,
    /// Only these subjects; at least one.
    pub subjects: Vec<String>,
}

/// The statement answering `(subject, hour, total)` rows, the hour in Unix
/// seconds and the total a 64-bit integer. `None` if a column is outside
/// the whitelist (column names are the only text not bound) or there is no
/// column or subject.
pub fn hourly_sums(dialect: Dialect, q: &HourlySums) -> Option<Sql> {
    let named = std::iter::once(q.subject_column).chain(q.columns.iter().copied()).chain(q.filters.iter().map(|(c, _)| *c));
    if named.clone().any(|c| !ALLOWED.contains(&c)) || q.columns.is_empty() || q.subjects.is_empty() {
        return None;
    }
    let (subject, added, t) = (q.subject_column, q.columns.join(" + "), dialect.time_param());
    let (hour, total) = match dialect {
        // Int64 both: a reader checking types (current ClickHouse) takes them as i64.
        Dialect::ClickHouse => ("toInt64(intDiv(toUInt32(window_start), 3600) * 3600)", format!("toInt64(sum({added}))")),
        Dialect::Sqlite => ("window_start - window_start % 3600", format!("SUM({added})")),
    };
    let mut sql = Sql::new(format!("SELECT {subject} AS subject, {hour} AS hour, {total} AS total FROM rollups_minute WHERE "));
    sql.push(&format!("tenant = ? AND billable = 1 AND window_start >= {t} AND window_start < {t}"), [s(q.tenant.clone()), i(q.from), i(q.to)]);
    match dialect {
        Dialect::ClickHouse => sql.push(&format!(" AND has(?, {subject})"), [Value::Strs(q.subjects.clone())]),
        Dialect::Sqlite => {
            let marks = vec!["?"; q.subjects.len()].join(", ");
            sql.push(&format!(" AND {subject} IN ({marks})"), q.subjects.iter().cloned().map(s))
        }
    };
    for (column, value) in &q.filters {
        sql.push(&format!(" AND {column} = ?"), [s(value.clone())]);
    }
    sql.push(" GROUP BY subject, hour ORDER BY hour, subject", []);
    Some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> HourlySums {
        HourlySums {
            tenant: "acme".into(),
            subject_column: "customer_id",
            columns: &["input_tokens", "output_tokens"],
            filters: vec![("model", "it's".into())],
            from: 0,
            to: 7_200,
            subjects: vec!["c1".into(), "c2".into()],
        }
    }

    #[test]
    fn values_are_bound() {
        let sql = hourly_sums(Dialect::Sqlite, &q()).expect("sql");
        assert_eq!(
            sql.text,
            "SELECT customer_id AS subject, window_start - window_start % 3600 AS hour, SUM(input_tokens + output_tokens) AS total FROM rollups_minute \
             WHERE tenant = ? AND billable = 1 AND window_start >= ? AND window_start < ? AND customer_id IN (?, ?) AND model = ? GROUP BY subject, hour ORDER BY hour, subject"
        );
        assert_eq!(sql.binds.len(), 6);
        assert!(!sql.text.contains("it's"));
        let ch = hourly_sums(Dialect::ClickHouse, &q()).expect("sql");
        assert!(ch.text.contains("has(?, customer_id)") && ch.text.contains("window_start >= toDateTime(?)"), "{}", ch.text);
    }

    #[test]
    fn unknown_columns_and_empty_lists_are_refused() {
        assert_eq!(hourly_sums(Dialect::Sqlite, &HourlySums { subject_column: "1=1 OR user_id", ..q() }), None);
        assert_eq!(hourly_sums(Dialect::Sqlite, &HourlySums { subjects: vec![], ..q() }), None);
    }
}
