//! The billing export: billable totals per subject (customer or user) per billing period, exact, for any biller.
//!
//! One job per module: `periods` (where a subject's periods start and end),
//! `source` (what a deployment answers: anchors and grouped sums), `render`
//! (the typed JSON answer and the CSV), `route` (`GET /v1/billing/export`);
//! this file runs an export: the anchors, the segments, one grouped statement
//! per run of segments, and the segments' sums added into each subject's periods.

mod periods;
mod render;
mod route;
mod source;

use chrono::{DateTime, Utc};
use meterline_domain::SumRow;
use meterline_limits::{LimitMeasure, Scope as SubjectScope};
use meterline_sql::{BillingSums, boundary_runs};
use std::collections::BTreeMap;

use crate::QueryError;

pub use periods::{inner_boundaries, period, segments};
pub use render::{ExportAnswer, ExportRow, csv, value};
pub(crate) use route::export as handler;
pub use source::{ClickHouseExport, ExportSource, anchors_of};

/// What an export sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub tenant: String,
    /// Inclusive.
    pub from: DateTime<Utc>,
    /// Exclusive.
    pub to: DateTime<Utc>,
    pub by: SubjectScope,
    /// The measures each row carries, in this order.
    pub measures: Vec<LimitMeasure>,
}

/// One subject's sums over one of its periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billed {
    pub subject: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// The period is the subject's subscription cycle (else a calendar month).
    pub cycle: bool,
    pub sums: SumRow,
}

/// The measures a request names, comma-separated, in its order; the error
/// names the first one that is not a measure.
pub fn parse_measures(text: &str) -> Result<Vec<LimitMeasure>, String> {
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        let m = LimitMeasure::parse(name).ok_or_else(|| {
            let all: Vec<&str> = LimitMeasure::ALL.iter().map(|m| m.name()).collect();
            format!("unknown measure {name:?}; measures: {}", all.join(", "))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Runs `req` on `source`: rows by subject, then period start. A subject
/// with no billable events in a period has no row for it.
pub async fn export(source: &dyn ExportSource, req: &ExportRequest) -> Result<Vec<Billed>, QueryError> {
    if req.from >= req.to {
        return Ok(Vec::new());
    }
    let anchors = source.anchors(&req.tenant, req.by).await?;
    let cuts = segments(anchors.values(), req.from, req.to);
    let edges: Vec<(i64, i64)> = cuts.iter().map(|t| periods::edge(*t)).collect();
    let subject_column = match req.by {
        SubjectScope::User => "user_id",
        SubjectScope::Customer => "customer_id",
    };
    let mut billed: BTreeMap<(String, DateTime<Utc>), Billed> = BTreeMap::new();
    let mut offset = 0;
    for run in boundary_runs(&edges) {
        let q = BillingSums { tenant: req.tenant.clone(), subject_column, boundaries: run.to_vec() };
        for row in source.sums(&q).await? {
            let subject = if req.by == SubjectScope::User { row.g_user.clone() } else { row.g_customer.clone() };
            let Some(&start) = cuts.get(offset + row.g_bucket as usize) else {
                return Err(QueryError::Store(format!("an export statement answered segment {} of {}", row.g_bucket, run.len() - 1).into()));
            };
            let anchor = anchors.get(&subject).copied();
            let (period_start, period_end) = period(anchor, start, req.from, req.to);
            billed
                .entry((subject.clone(), period_start))
                .or_insert_with(|| Billed { subject, period_start, period_end, cycle: anchor.is_some(), sums: SumRow::default() })
                .sums
                .add(&row);
        }
        offset += run.len() - 1;
    }
    Ok(billed.into_values().collect())
}
