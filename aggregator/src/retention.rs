//! The retention task: every `retention.interval_secs`, drops what is past
//! each table's horizon in ClickHouse (`meterline_clickhouse` retention).
//!
//! Every aggregator runs it, not one elected member: a run only drops whole
//! partitions already past the horizon and carries markers forward, so two
//! runs at once do the same thing twice, harmlessly, and the task needs no
//! coordination that could itself stall. A failed run (ClickHouse down) is
//! logged and tried again at the next interval; nothing depends on it
//! having run, since queries are refused by the horizon, not by what is
//! still stored.

use chrono::{DateTime, Utc};
use meterline_clickhouse::{ClickHouseError, Purged, Store};
use meterline_domain::RetentionConfig;
use std::future::Future;
use std::time::Duration;

use crate::metrics;

/// One run as of `now`, its results counted.
pub async fn run_once(store: &Store, retention: &RetentionConfig, now: DateTime<Utc>) -> Result<Vec<Purged>, ClickHouseError> {
    let purged = store.purge(retention, now).await?;
    for p in &purged {
        if p.held {
            metrics::retention_held(p.table);
        } else {
            metrics::retention_dropped(p.table, p.partitions, p.rows);
        }
    }
    Ok(purged)
}

/// Runs at start and then every interval until `stop`.
pub async fn run(store: Store, retention: RetentionConfig, stop: impl Future<Output = ()>) {
    let every = Duration::from_secs(retention.interval_secs);
    let mut stop = std::pin::pin!(stop);
    loop {
        if let Err(e) = run_once(&store, &retention, Utc::now()).await {
            tracing::warn!(error = %e, "retention run failed; retrying at the next interval");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return,
        }
    }
}
