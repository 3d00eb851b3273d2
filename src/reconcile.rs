//! `meterline limits reconcile`: every limits counter of closed periods checked against the sum of its metered events, in either deployment.
//!
//! The verdicts are the limits crate's ([`meterline_limits::examine`]); this
//! module reads each deployment's counters and sums: the embedded store in
//! one SQLite snapshot ([`crate::store::reconcile`]), or Redis counters
//! against ClickHouse `events`. In the distributed deployment the
//! aggregator writes a flush to ClickHouse before it counts it in Redis, and
//! events may arrive late (within the event contract's bounds): a counter
//! whose period closed moments ago can differ until the aggregator catches
//! up; a difference that stays is real.

use chrono::{DateTime, Utc};
use meterline_clickhouse::{ClickHouseError, Store};
use meterline_limits::{Definitions, Examined, LimitStore, LimitsError, Metered, ReconcileRow, ReconcileStatus, Report, Subscription, examine};
use meterline_redis::RedisLimits;
use meterline_sql::MeteredSum;
use std::fmt::Write as _;
use std::path::Path;

use crate::EmbeddedError;

/// Why a reconciliation could not run (a difference is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error("counter {0}: its metered sum names a column outside the whitelist")]
    Column(String),
}

/// The statement's input for one counter's metered sum.
pub fn sum_query(tenant: &str, m: &Metered) -> MeteredSum {
    let (from, to) = m.edges();
    MeteredSum { tenant: tenant.to_owned(), subject_column: m.subject_column(), subject: m.subject.clone(), columns: m.columns(), filters: m.filters(), from, to }
}

/// The all-in-one deployment: `tenants`' counters in the data directory `dir`.
pub fn embedded(dir: &Path, tenants: &[String], now: DateTime<Utc>) -> Result<Report, ReconcileError> {
    let conn = crate::store::open_read_only(dir)?;
    let mut rows = Vec::new();
    for tenant in tenants {
        rows.extend(crate::store::reconcile(&conn, tenant, now)?);
    }
    Ok(Report::new(now, rows))
}

/// The distributed deployment: `tenants`' counters in Redis against ClickHouse's events.
pub async fn distributed(redis: &RedisLimits, clickhouse: &Store, tenants: &[String], now: DateTime<Utc>) -> Result<Report, ReconcileError> {
    let mut rows = Vec::new();
    for tenant in tenants {
        let definitions = Definitions::of(&redis.book(tenant, None, None).await?.plans);
        for (counter, used) in redis.counters(tenant).await? {
            let anchor = match definitions.anchor_subject(&counter) {
                Some(subject) => match redis.subscription(tenant, &subject).await? {
                    Some(view) => Subscription::from_view(&view)
                        .map_err(|e| LimitsError::Corrupt { key: format!("subscription of {}", subject.key()), message: e.to_string() })?
                        .cycle_start,
                    None => None,
                },
                None => None,
            };
            rows.push(match examine(tenant, &counter, used, &definitions, anchor, now) {
                Examined::Done(row) => row,
                Examined::Sum(pending) => {
                    let sql = meterline_clickhouse::reconcile::metered_sum(&sum_query(tenant, &pending.metered)).ok_or_else(|| ReconcileError::Column(counter.clone()))?;
                    let sum = clickhouse.metered_sum(&sql).await?;
                    pending.finish(sum)
                }
            });
        }
    }
    Ok(Report::new(now, rows))
}

/// The report as a table for people, with a summary line.
pub fn table(report: &Report) -> String {
    let head = ["STATUS", "TENANT", "SUBJECT", "MEASURE", "PERIOD", "COUNTER", "METERED", "DIFF", "LIMITS", "KEY"];
    let cells: Vec<[String; 10]> = report.rows.iter().map(cells).collect();
    let mut widths = head.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        let text: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&mut out, &head);
    for row in &cells {
        line(&mut out, &row.each_ref().map(String::as_str));
    }
    let n = |s| report.count(s);
    let _ = writeln!(
        out,
        "\n{} counters at {}: {} match, {} mismatch, {} open period, {} unknown definition",
        report.rows.len(),
        report.checked_at,
        n(ReconcileStatus::Match),
        n(ReconcileStatus::Mismatch),
        n(ReconcileStatus::OpenPeriod),
        n(ReconcileStatus::UnknownDefinition)
    );
    out
}

fn cells(r: &ReconcileRow) -> [String; 10] {
    let dash = || "-".to_owned();
    let subject = match (r.scope, &r.subject) {
        (Some(scope), Some(id)) => format!("{}:{id}", scope.name()),
        _ => dash(),
    };
    let (measure, limits) = match &r.definition {
        Some(d) => (d.measure.name().to_owned(), d.limits.join(",")),
        None => (dash(), dash()),
    };
    let period = match (&r.period_start, &r.period_end) {
        (Some(s), Some(e)) => format!("{s}..{e}"),
        _ => dash(),
    };
    [
        r.status.name().to_owned(),
        r.tenant.clone(),
        subject,
        measure,
        period,
        r.counter_value.clone(),
        r.metered_sum.clone().unwrap_or_else(dash),
        r.difference.clone().unwrap_or_else(dash),
        limits,
        r.counter.clone(),
    ]
}
