//! The metered sum a limits counter is reconciled against: one subject's billable events matching a filter over an exact `[start, end)`, in both dialects.
//!
//! Summed from `events`, not the rollups: a `cycle` period starts at its
//! anchor's exact second and nanosecond, and only events carry that. On
//! ClickHouse the rows are taken once per idempotency key (`LIMIT 1 BY`), so
//! a repaired flush's repeated rows never count twice; SQLite's `events`
//! holds each key once by its unique index.

use crate::builder::{Sql, i, s};
use crate::scope::Dialect;

/// The columns a metered sum may name: the subject and filter columns and the summed measures.
const ALLOWED: &[&str] = &[
    "user_id",
    "customer_id",
    "feature",
    "model",
    "environment",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_nanos",
    "revenue_nanos",
    "credits_nanos",
];

/// What to sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeteredSum {
    pub tenant: String,
    /// `user_id` or `customer_id`.
    pub subject_column: &'static str,
    pub subject: String,
    /// Columns added per event and summed; none: the number of events.
    pub columns: &'static [&'static str],
    /// Equality filters: `feature`, `model`, `environment`.
    pub filters: Vec<(&'static str, String)>,
    /// The start, `(Unix seconds, nanoseconds)`, inclusive.
    pub from: (i64, i64),
    /// The end, exclusive.
    pub to: (i64, i64),
}

/// The statement answering one 64-bit integer, `total` (0 over no events).
/// `None` if `q` names a column outside the whitelist: column names are the
/// only text not bound, so they come from a fixed list.
pub fn metered_sum(dialect: Dialect, q: &MeteredSum) -> Option<Sql> {
    let named = std::iter::once(q.subject_column).chain(q.columns.iter().copied()).chain(q.filters.iter().map(|(c, _)| *c));
    if named.clone().any(|c| !ALLOWED.contains(&c)) {
        return None;
    }
    let added = q.columns.join(" + ");
    let (total, inner_columns) = match (dialect, q.columns.is_empty()) {
        (Dialect::ClickHouse, true) => ("toInt64(count())".to_owned(), "idempotency_key".to_owned()),
        (Dialect::ClickHouse, false) => (format!("toInt64(sum({added}))"), format!("idempotency_key, {}", q.columns.join(", "))),
        (Dialect::Sqlite, true) => ("COUNT(*)".to_owned(), String::new()),
        (Dialect::Sqlite, false) => (format!("COALESCE(SUM({added}), 0)"), String::new()),
    };
    let t = dialect.time_param();
    let mut sql = match dialect {
        Dialect::ClickHouse => Sql::new(format!("SELECT {total} AS total FROM (SELECT {inner_columns} FROM events WHERE ")),
        Dialect::Sqlite => Sql::new(format!("SELECT {total} AS total FROM events WHERE ")),
    };
    let ((from_s, from_ns), (to_s, to_ns)) = (q.from, q.to);
    // The whole-second range first (an index range on SQLite), then the
    // nanoseconds at the two edge seconds.
    sql.push(
        &format!(
            "tenant = ? AND {} = ? AND billable = 1 AND event_time >= {t} AND event_time <= {t} \
             AND (event_time > {t} OR event_time_ns >= ?) AND (event_time < {t} OR event_time_ns < ?)",
            q.subject_column
        ),
        [s(q.tenant.clone()), s(q.subject.clone()), i(from_s), i(to_s), i(from_s), i(from_ns), i(to_s), i(to_ns)],
    );
    for (column, value) in &q.filters {
        sql.push(&format!(" AND {column} = ?"), [s(value.clone())]);
    }
    if dialect == Dialect::ClickHouse {
        sql.push(" LIMIT 1 BY idempotency_key)", []);
    }
    Some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(columns: &'static [&'static str]) -> MeteredSum {
        MeteredSum {
            tenant: "acme".into(),
            subject_column: "user_id",
            subject: "it's-u".into(),
            columns,
            filters: vec![("feature", "chat".into())],
            from: (60, 5),
            to: (120, 0),
        }
    }

    #[test]
    fn values_are_bound_and_edges_exact_to_the_nanosecond() {
        let sql = metered_sum(Dialect::Sqlite, &q(&["input_tokens", "output_tokens"])).expect("sql");
        assert_eq!(
            sql.text,
            "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) AS total FROM events WHERE tenant = ? AND user_id = ? AND billable = 1 \
             AND event_time >= ? AND event_time <= ? AND (event_time > ? OR event_time_ns >= ?) AND (event_time < ? OR event_time_ns < ?) AND feature = ?"
        );
        assert!(!sql.text.contains("it's"));
        assert_eq!(sql.binds.len(), 9);
    }

    #[test]
    fn clickhouse_counts_each_key_once() {
        let sql = metered_sum(Dialect::ClickHouse, &q(&[])).expect("sql");
        assert!(sql.text.starts_with("SELECT toInt64(count()) AS total FROM (SELECT idempotency_key FROM events WHERE "), "{}", sql.text);
        assert!(sql.text.ends_with(" LIMIT 1 BY idempotency_key)"));
        assert!(sql.text.contains("event_time >= toDateTime(?)"));
    }

    #[test]
    fn unknown_columns_are_refused() {
        let mut bad = q(&["cost_nanos"]);
        bad.filters.push(("1=1 OR feature", "x".into()));
        assert_eq!(metered_sum(Dialect::Sqlite, &bad), None);
    }
}
