//! What the aggregator calls: counted usage applied once per log position, settled reservations, and its progress.

use meterline_limits::notify::Crossing;
use meterline_limits::{KEEP_AFTER_EXPIRY_MS, LimitsError, Subject, SubscriptionView};
use redis::Script;
use std::sync::LazyLock;

use crate::client::{APPLY, RedisLimits};
use crate::keys::{self, PROGRESS, prefix};
use crate::record::check_counter;
use crate::store::json;

type Result<T> = std::result::Result<T, LimitsError>;

/// Sets crossings' fired-markers and gives the new ones their alert times.
static FIRE: LazyLock<Script> = LazyLock::new(|| Script::new(concat!(include_str!("scripts/common.lua"), "\n", include_str!("scripts/fire.lua"))));

/// What [`RedisLimits::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// The source's marker was not the one expected (another consumer
    /// applied it, or this one's read is old): the current marker; nothing changed.
    Stale(Option<i64>),
}

fn marker(key: &str, text: Option<String>) -> Result<Option<i64>> {
    text.filter(|t| !t.is_empty())
        .map(|t| t.parse().map_err(|e| LimitsError::Corrupt { key: key.to_owned(), message: format!("marker {t:?}: {e}") }))
        .transpose()
}

impl RedisLimits {
    /// Counts one batch of a tenant's events from log stream `source` (e.g.
    /// `events/3`), once: only if the tenant's marker for `source` is still
    /// `expected` (`None`: never applied), in one atomic step it adds each
    /// `(counter, delta, keep_until)` to the counter's used amount, applies
    /// `reservation::counted` to each reservation of `settle` (the `rsv_…`
    /// idempotency keys of counted events that came from reservations; ones
    /// the store no longer holds are skipped) and sets the marker to `marker`.
    pub async fn apply(&self, tenant: &str, source: &str, expected: Option<i64>, marker: i64, counts: &[(String, i64, i64)], settle: &[String]) -> Result<Applied> {
        self.apply_counted(tenant, source, expected, marker, counts, settle).await.map(|(applied, _)| applied)
    }

    /// [`apply`](Self::apply), and when it was done each count's counter's
    /// used amount after it, in the order of `counts` (empty when stale: a
    /// batch applied again moves nothing, so it crosses nothing).
    pub async fn apply_counted(
        &self,
        tenant: &str,
        source: &str,
        expected: Option<i64>,
        marker: i64,
        counts: &[(String, i64, i64)],
        settle: &[String],
    ) -> Result<(Applied, Vec<i64>)> {
        let mut args = vec![
            prefix(tenant),
            source.to_owned(),
            expected.map(|m| m.to_string()).unwrap_or_default(),
            marker.to_string(),
            KEEP_AFTER_EXPIRY_MS.to_string(),
            counts.len().to_string(),
        ];
        for (counter, delta, keep_until) in counts {
            check_counter(counter)?;
            args.extend([counter.clone(), delta.to_string(), keep_until.to_string()]);
        }
        args.extend(settle.iter().map(|k| keys::reservation(k).to_owned()));
        let key = keys::key(tenant, "applied");
        let reply: Vec<String> = self.script(&APPLY, &key, &args).await?;
        let mut reply = reply.into_iter();
        let (kind, current) = (reply.next().unwrap_or_default(), reply.next());
        if kind != "done" {
            return Ok((Applied::Stale(self::marker(&key, current)?), Vec::new()));
        }
        let used = reply
            .zip(counts)
            .map(|(text, (counter, _, _))| {
                text.parse().map_err(|e| LimitsError::Corrupt { key: keys::key(tenant, &format!("u:{counter}")), message: format!("used {text:?}: {e}") })
            })
            .collect::<Result<Vec<i64>>>()?;
        Ok((Applied::Done, used))
    }

    /// Sets each crossing's fired-marker unless it is set (it expires with
    /// the crossing's counter), atomically: per crossing, the alert's time
    /// (Unix secs; `now`, or a second past the subject's previous limit
    /// alert, so no two share the alerts table's key) when this call fired
    /// it, `None` when it had fired before.
    pub async fn fire(&self, tenant: &str, crossings: &[Crossing], now: i64) -> Result<Vec<Option<i64>>> {
        if crossings.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![prefix(tenant), now.to_string(), crossings.len().to_string()];
        for c in crossings {
            check_counter(&c.marker())?;
            args.extend([c.marker(), c.watch.subject.key(), c.watch.counter.keep_until.to_string()]);
        }
        let key = keys::key(tenant, "applied");
        let reply: Vec<String> = self.script(&FIRE, &key, &args).await?;
        Ok(reply.into_iter().map(|t| t.parse().ok()).collect())
    }

    /// The tenant's marker for `source`: the last position applied.
    pub async fn marker(&self, tenant: &str, source: &str) -> Result<Option<i64>> {
        let key = keys::key(tenant, "applied");
        let text: Option<String> = self.query(redis::cmd("HGET").arg(&key).arg(source)).await?;
        marker(&key, text)
    }

    /// The subscriptions of `subjects`, in order, in one read.
    pub async fn subscriptions(&self, tenant: &str, subjects: &[Subject]) -> Result<Vec<Option<SubscriptionView>>> {
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        let key = keys::key(tenant, "subs");
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key);
        for s in subjects {
            cmd.arg(s.key());
        }
        let texts: Vec<Option<String>> = self.query(&cmd).await?;
        texts.into_iter().zip(subjects).map(|(t, s)| t.map(|t| json(&format!("{key} {}", s.key()), &t)).transpose()).collect()
    }

    /// The offset the aggregator has counted up to in `source`, across tenants.
    pub async fn progress(&self, source: &str) -> Result<Option<i64>> {
        let text: Option<String> = self.query(redis::cmd("HGET").arg(PROGRESS).arg(source)).await?;
        marker(PROGRESS, text)
    }

    pub async fn set_progress(&self, source: &str, offset: i64) -> Result<()> {
        self.query(redis::cmd("HSET").arg(PROGRESS).arg(source).arg(offset)).await
    }
}
