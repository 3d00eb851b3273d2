//! The billing export's sums: every subject's billable events per segment of `[from, to)`, cut at exact boundaries, in one grouped statement per dialect.
//!
//! Like the limits reconciliation ([`crate::metered`]) it sums `events`, not
//! the rollups: a subscription cycle starts at its anchor's second and
//! nanosecond, and only events carry that. On ClickHouse the rows are taken
//! once per idempotency key (`LIMIT 1 BY`); SQLite's `events` holds each key
//! once by its unique index. The segment an event falls in is a `CASE` over
//! the boundaries, so the whole range is one statement grouped by segment and
//! subject, however many subjects or periods it holds.

use meterline_domain::Measure;

use crate::builder::{Sql, i, s};
use crate::rollups::dims;
use crate::scope::Dialect;

/// Most boundaries one statement carries: each is three binds and a `CASE`
/// arm; a longer list is sent as several statements over consecutive ranges.
pub const MAX_BOUNDARIES: usize = 256;

/// What to sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingSums {
    pub tenant: String,
    /// `user_id` or `customer_id`: the subject each row is grouped by.
    pub subject_column: &'static str,
    /// Sorted, distinct `(Unix seconds, nanoseconds)`, at least two: segment
    /// `k` is `[boundaries[k], boundaries[k + 1])`.
    pub boundaries: Vec<(i64, i64)>,
}

/// The statement answering `SumRow`s: `g_bucket` the segment index, the
/// subject in `g_user` or `g_customer`, every measure of the registry.
/// `None` if the subject column is not one of the two or there is no
/// segment. Events without a customer have no subject by customer and are
/// left out.
pub fn billing_sums(dialect: Dialect, q: &BillingSums) -> Option<Sql> {
    if !["user_id", "customer_id"].contains(&q.subject_column) || q.boundaries.len() < 2 {
        return None;
    }
    let (first, last) = (q.boundaries[0], q.boundaries[q.boundaries.len() - 1]);
    let t = dialect.time_param();
    let subject = q.subject_column;
    // The segment: the first boundary the event is before, less one.
    let before = format!("(event_time < {t} OR (event_time = {t} AND event_time_ns < ?))");
    let inner = &q.boundaries[1..q.boundaries.len() - 1];
    // One segment: a constant (a CASE needs at least one WHEN).
    let mut segment = Sql::new(if inner.is_empty() { "0" } else { "CASE" });
    for (k, &(secs, ns)) in inner.iter().enumerate() {
        segment.push(&format!(" WHEN {before} THEN {k}"), [i(secs), i(secs), i(ns)]);
    }
    if !inner.is_empty() {
        segment.push(&format!(" ELSE {} END", inner.len()), []);
    }
    let sums: Vec<String> = Measure::ALL
        .iter()
        .map(|m| {
            let expr = match (dialect, m) {
                (Dialect::ClickHouse, _) => m.from_events().to_owned(),
                (Dialect::Sqlite, Measure::Events) => "COUNT(*)".to_owned(),
                (Dialect::Sqlite, Measure::UnpricedEvents) => "SUM(cost_source = 0)".to_owned(),
                (Dialect::Sqlite, _) => format!("SUM({})", m.column()),
            };
            format!("{expr} AS {}", m.alias())
        })
        .collect();
    let bucket = match dialect {
        Dialect::ClickHouse => "toUInt32(",
        Dialect::Sqlite => "(",
    };
    let mut sql = Sql::new(format!("SELECT {bucket}"));
    sql.append(segment);
    sql.push(&format!(") AS g_bucket, {}, {} FROM ", dims(&[subject]), sums.join(", ")), []);
    let range = [s(q.tenant.clone()), i(first.0), i(last.0), i(first.0), i(first.1), i(last.0), i(last.1)];
    let condition = format!(
        "tenant = ? AND billable = 1 AND {subject} != '' AND event_time >= {t} AND event_time <= {t} \
         AND (event_time > {t} OR event_time_ns >= ?) AND (event_time < {t} OR event_time_ns < ?)"
    );
    match dialect {
        Dialect::ClickHouse => {
            sql.push(
                &format!(
                    "(SELECT idempotency_key, event_time, event_time_ns, {subject}, input_tokens, output_tokens, cached_input_tokens, \
                     reasoning_tokens, cost_nanos, cost_source, revenue_nanos, credits_nanos FROM events WHERE {condition} LIMIT 1 BY idempotency_key)"
                ),
                range,
            );
        }
        Dialect::Sqlite => {
            sql.push(&format!("events WHERE {condition}"), range);
        }
    }
    let group = if subject == "user_id" { "g_user" } else { "g_customer" };
    sql.push(&format!(" GROUP BY g_bucket, {group} ORDER BY {group}, g_bucket"), []);
    Some(sql)
}

/// `boundaries` cut into runs of at most [`MAX_BOUNDARIES`], each sharing
/// its last boundary with the next run's first: one statement each.
pub fn boundary_runs(boundaries: &[(i64, i64)]) -> Vec<&[(i64, i64)]> {
    if boundaries.len() < 2 {
        return Vec::new();
    }
    let mut runs = Vec::new();
    let mut start = 0;
    while start + 1 < boundaries.len() {
        let end = (start + MAX_BOUNDARIES - 1).min(boundaries.len() - 1);
        runs.push(&boundaries[start..=end]);
        start = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(boundaries: Vec<(i64, i64)>) -> BillingSums {
        BillingSums { tenant: "it's".into(), subject_column: "customer_id", boundaries }
    }

    #[test]
    fn segments_are_cut_at_exact_boundaries_and_values_bound() {
        let sql = billing_sums(Dialect::Sqlite, &q(vec![(60, 5), (90, 7), (120, 0)])).expect("sql");
        assert_eq!(
            sql.text,
            "SELECT (CASE WHEN (event_time < ? OR (event_time = ? AND event_time_ns < ?)) THEN 0 ELSE 1 END) AS g_bucket, \
             '' AS g_user, customer_id AS g_customer, '' AS g_feature, '' AS g_model, COUNT(*) AS s_events, SUM(input_tokens) AS s_input, \
             SUM(output_tokens) AS s_output, SUM(cached_input_tokens) AS s_cached, SUM(reasoning_tokens) AS s_reasoning, \
             SUM(cost_nanos) AS s_cost, SUM(revenue_nanos) AS s_revenue, SUM(credits_nanos) AS s_credits, SUM(cost_source = 0) AS s_unpriced \
             FROM events WHERE tenant = ? AND billable = 1 AND customer_id != '' AND event_time >= ? AND event_time <= ? \
             AND (event_time > ? OR event_time_ns >= ?) AND (event_time < ? OR event_time_ns < ?) GROUP BY g_bucket, g_customer ORDER BY g_customer, g_bucket"
        );
        assert!(!sql.text.contains("it's"));
        assert_eq!(sql.binds, vec![i(90), i(90), i(7), s("it's"), i(60), i(120), i(60), i(5), i(120), i(0)]);
    }

    #[test]
    fn clickhouse_counts_each_key_once() {
        let sql = billing_sums(Dialect::ClickHouse, &BillingSums { subject_column: "user_id", ..q(vec![(60, 0), (120, 0)]) }).expect("sql");
        assert!(sql.text.starts_with("SELECT toUInt32(0) AS g_bucket, user_id AS g_user, '' AS g_customer,"), "{}", sql.text);
        assert!(sql.text.contains("count() AS s_events"));
        assert!(sql.text.contains(" LIMIT 1 BY idempotency_key) GROUP BY g_bucket, g_user"), "{}", sql.text);
        assert!(sql.text.contains("event_time >= toDateTime(?)"));
    }

    #[test]
    fn bad_subjects_and_empty_ranges_are_refused() {
        assert_eq!(billing_sums(Dialect::Sqlite, &BillingSums { subject_column: "model", ..q(vec![(0, 0), (1, 0)]) }), None);
        assert_eq!(billing_sums(Dialect::Sqlite, &q(vec![(0, 0)])), None);
    }

    #[test]
    fn long_boundary_lists_run_in_overlapping_chunks() {
        let all: Vec<(i64, i64)> = (0..600).map(|n| (n, 0)).collect();
        let runs = boundary_runs(&all);
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![256, 256, 90]);
        assert_eq!((runs[0][255], runs[1][0]), ((255, 0), (255, 0)));
        assert_eq!(runs[2].last(), Some(&(599, 0)));
        assert!(boundary_runs(&all[..1]).is_empty());
    }
}
