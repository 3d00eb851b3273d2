//! Counts written events toward limits in Redis once ClickHouse holds them: idempotent per tenant and partition, catching up from ClickHouse after a crash or an outage.
//!
//! Why it is exact:
//! - **Only durable events count.** A flush is applied after its ClickHouse
//!   write (events and rollups) and before its Kafka offsets are committed,
//!   so every counted event is in the rollups a reconciliation compares with.
//! - **Nothing twice.** Each tenant keeps, per partition, the offset up to
//!   which its events were applied (`applied` in Redis). One script checks
//!   that marker is what this applier last read, adds the counts, frees the
//!   holds of committed reservations and moves the marker, atomically; rows
//!   at or before the marker are never sent. A flush applied again after a
//!   crash finds the marker moved and changes nothing.
//! - **Nothing lost.** The applier is *in sync* for a partition only while
//!   Redis has every event this aggregator wrote there. Anything else (a new
//!   assignment, a Redis error, a stale marker) makes the partition *behind*:
//!   later flushes are not applied from memory (that would move markers past
//!   unapplied rows) until a catch-up has read the missing events back from
//!   ClickHouse, in offset order, from the partition's progress in Redis up
//!   to what this aggregator wrote.
//! - **Never in the way.** A Redis failure never holds up the ClickHouse
//!   write or the offset commit: metering goes on, limits catch up when Redis
//!   is back (retried after 1 s, backing off to 30 s while it stays down,
//!   and one failure stops the round so no flush waits on every partition).
//!
//! Threshold crossings ([`notify`](meterline_limits::notify)) are read off
//! the used amounts the apply script returns: a counter moving from
//! `used - delta` to `used` over the batch crosses what lies between. Only an
//! apply that was done reports amounts, so a re-applied batch crosses
//! nothing; each crossing's fired-marker in Redis (set if absent, expiring
//! with its counter) makes it fire once per subject, limit and period
//! whatever else happens. A fired crossing is stored in ClickHouse's
//! `alerts` and sent to the webhook. At most once: a crash (or a Redis
//! error) between the counts and the markers loses that crossing's alert,
//! never the count. Limit alerts whose period has reset are marked resolved
//! here, at most once a minute.

use meterline_clickhouse::Store;
use meterline_domain::{AlertRow, AlertState, EventRow, Rule};
use meterline_limits::notify::{Crossing, Watch, watches};
use meterline_limits::{KEY_PREFIX, LimitStore, Plan, Subject, Subscription, applicable, counts, metrics as limit_metrics};
use meterline_redis::{Applied, RedisLimits};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::alerts::Notifier;
use crate::decide::Flush;

/// Events read back from ClickHouse per catch-up query.
const CATCH_UP_ROWS: u64 = 50_000;
/// Catch-up reads events no older than this: no period is longer than a
/// month, and counters of closed periods are kept only one period more.
const CATCH_UP_DAYS: i64 = 62;
/// One apply round trip may take this long before the partition falls behind.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Catch-up is retried this often at first, doubling while Redis keeps
/// failing up to `MAX_RETRY_EVERY`: an unreachable Redis (whose calls may
/// each wait the whole timeout) must not slow the flushes down.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const MAX_RETRY_EVERY: Duration = Duration::from_secs(30);
/// How often limit alerts whose period has reset are marked resolved.
const RESOLVE_EVERY: Duration = Duration::from_secs(60);

/// The crossings of one apply, by tenant.
type Crossings = Vec<(String, Vec<Crossing>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// Redis holds every event this aggregator wrote to the partition.
    InSync,
    /// Events up to this offset are in ClickHouse, and some may not be in Redis.
    Behind(i64),
}

/// The limits applier of one aggregator.
#[derive(Debug)]
pub(crate) struct LimitsApplier {
    redis: RedisLimits,
    topic: String,
    partitions: BTreeMap<i32, Sync>,
    last_retry: Option<Instant>,
    retry_every: Duration,
    notifier: Notifier,
    last_resolve: Option<Instant>,
}

impl LimitsApplier {
    /// `notifier` sends limit crossings to the alert webhook.
    pub(crate) fn new(redis: RedisLimits, topic: &str, notifier: Notifier) -> LimitsApplier {
        LimitsApplier {
            redis,
            topic: topic.to_owned(),
            partitions: BTreeMap::new(),
            last_retry: None,
            retry_every: RETRY_EVERY,
            notifier,
            last_resolve: None,
        }
    }

    fn source(&self, partition: i32) -> String {
        format!("{}/{partition}", self.topic)
    }

    /// A partition assigned with ClickHouse holding its events up to `written` (if any).
    pub(crate) fn assigned(&mut self, partition: i32, written: Option<i64>) {
        self.partitions.insert(partition, Sync::Behind(written.unwrap_or(-1)));
        self.last_retry = None;
    }

    pub(crate) fn revoked(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// After `flush` is durable in ClickHouse.
    pub(crate) async fn flushed(&mut self, store: &Store, flush: &Flush) {
        // After one failure in this flush the others are not tried: each
        // could wait the whole timeout. They catch up together later.
        let mut failed = false;
        for (p, range) in &flush.ranges {
            let Some(state) = self.partitions.get(p).copied() else { continue };
            match state {
                Sync::InSync if failed => {
                    self.partitions.insert(*p, Sync::Behind(range.up_to));
                }
                Sync::Behind(_) => {
                    self.partitions.insert(*p, Sync::Behind(range.up_to));
                }
                Sync::InSync => {
                    let rows = flush.events.get(p).map_or(&[][..], Vec::as_slice);
                    let done = tokio::time::timeout(CALL_TIMEOUT, self.apply(*p, rows, range.up_to)).await;
                    if let Ok(Ok(Some(crossings))) = done {
                        self.fire(store, crossings).await;
                    } else {
                        if let Ok(Err(e)) = &done {
                            tracing::warn!(partition = p, error = %e, "cannot count events toward limits; catching up from ClickHouse later");
                        }
                        limit_metrics::store_error("apply");
                        self.partitions.insert(*p, Sync::Behind(range.up_to));
                        failed = true;
                    }
                }
            }
        }
        self.catch_up(store).await;
    }

    /// Catches up the partitions that are behind: at most once a second,
    /// backing off while Redis fails.
    pub(crate) async fn catch_up(&mut self, store: &Store) {
        self.resolve_due(store).await;
        if self.last_retry.is_some_and(|t| t.elapsed() < self.retry_every) {
            return;
        }
        let behind: Vec<(i32, i64)> =
            self.partitions.iter().filter_map(|(p, s)| if let Sync::Behind(w) = s { Some((*p, *w)) } else { None }).collect();
        if behind.is_empty() {
            return;
        }
        self.last_retry = Some(Instant::now());
        for (p, written) in behind {
            match self.catch_up_one(store, p, written).await {
                Ok(()) => {
                    // A flush may have raised what is written meanwhile: only
                    // in sync if nothing was.
                    if self.partitions.get(&p) == Some(&Sync::Behind(written)) {
                        self.partitions.insert(p, Sync::InSync);
                        tracing::info!(partition = p, up_to = written, "limits counters caught up");
                    }
                }
                Err(e) => {
                    limit_metrics::store_error("catch_up");
                    self.retry_every = (self.retry_every * 2).min(MAX_RETRY_EVERY);
                    tracing::warn!(partition = p, error = %e, retry_in_ms = self.retry_every.as_millis() as u64, "limits catch-up failed; retrying");
                    // The rest would most likely fail the same way, each after its own wait.
                    return;
                }
            }
        }
        self.retry_every = RETRY_EVERY;
    }

    async fn catch_up_one(&self, store: &Store, p: i32, written: i64) -> Result<(), String> {
        let source = self.source(p);
        let mut after = tokio::time::timeout(CALL_TIMEOUT, self.redis.progress(&source))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?
            .unwrap_or(-1);
        let since = u32::try_from((chrono::Utc::now().timestamp() - CATCH_UP_DAYS * 86_400).max(0)).unwrap_or(0);
        while after < written {
            let rows = store.events_between(&self.topic, p, after, written, since, CATCH_UP_ROWS).await.map_err(|e| e.to_string())?;
            let up_to = if (rows.len() as u64) < CATCH_UP_ROWS { written } else { rows.last().map_or(written, |r| r.kafka_offset) };
            let applied = tokio::time::timeout(CALL_TIMEOUT * 5, self.apply(p, &rows, up_to)).await.map_err(|_| "timed out".to_owned())?;
            let Some(crossings) = applied.map_err(|e| e.to_string())? else {
                return Err("a tenant's marker kept moving".to_owned());
            };
            self.fire(store, crossings).await;
            after = up_to;
        }
        Ok(())
    }

    /// Applies `rows` (offset order) of partition `p` as every event up to
    /// `up_to`, tenant by tenant, then records the partition's progress; the
    /// crossings it made. `None` when a tenant's marker moved under it twice.
    async fn apply(&self, p: i32, rows: &[EventRow], up_to: i64) -> Result<Option<Crossings>, meterline_limits::LimitsError> {
        let source = self.source(p);
        let mut by_tenant: BTreeMap<&str, Vec<&EventRow>> = BTreeMap::new();
        for row in rows {
            by_tenant.entry(row.tenant.as_str()).or_default().push(row);
        }
        let mut crossings = Vec::new();
        for (tenant, rows) in by_tenant {
            match self.apply_tenant(tenant, &source, &rows, up_to).await? {
                Some(c) if !c.is_empty() => crossings.push((tenant.to_owned(), c)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
        self.redis.set_progress(&source, up_to).await?;
        limit_metrics::applied("applied");
        Ok(Some(crossings))
    }

    /// Stores and notifies the crossings that fire (their markers were not
    /// set yet). A failure is logged: the counts stand, the alert is lost.
    async fn fire(&self, store: &Store, crossings: Crossings) {
        let now = chrono::Utc::now();
        let version = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        for (tenant, crossings) in crossings {
            let times = match tokio::time::timeout(CALL_TIMEOUT, self.redis.fire(&tenant, &crossings, now.timestamp())).await {
                Ok(Ok(times)) => times,
                Ok(Err(e)) => {
                    tracing::warn!(%tenant, error = %e, "cannot mark limit crossings; their alerts are lost");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%tenant, "marking limit crossings timed out; their alerts are lost");
                    continue;
                }
            };
            let fired: Vec<(&Crossing, i64)> = crossings.iter().zip(times).filter_map(|(c, t)| t.map(|t| (c, t))).collect();
            if fired.is_empty() {
                continue;
            }
            let rows: Vec<AlertRow> = fired.iter().map(|(c, at)| c.alert_row(&tenant, *at, version)).collect();
            if let Err(e) = store.insert_alerts(&rows).await {
                // The webhook still hears of it: the marker is set, so nothing would retry the row.
                tracing::warn!(%tenant, error = %e, "cannot store limit alerts");
            }
            for (c, _) in fired {
                self.notifier.limit_crossed(&c.body(&tenant));
            }
        }
    }

    /// Marks resolved the open limit alerts whose period has reset (their
    /// `resolved_at`), at most once a minute. Every aggregator may do it:
    /// they write the same rows.
    async fn resolve_due(&mut self, store: &Store) {
        if self.last_resolve.is_some_and(|t| t.elapsed() < RESOLVE_EVERY) {
            return;
        }
        self.last_resolve = Some(Instant::now());
        let now = u32::try_from(chrono::Utc::now().timestamp().max(0)).unwrap_or(u32::MAX);
        let open = match store.open_alerts().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read open limit alerts; resolving them later");
                return;
            }
        };
        let due: Vec<AlertRow> = open
            .into_iter()
            .filter(|a| a.rule == Rule::Limit.as_str() && a.resolved_at > 0 && a.resolved_at <= now)
            .map(|mut a| {
                a.state = AlertState::Resolved.as_str().to_owned();
                a.updated_at = a.resolved_at;
                a.version += 1;
                a
            })
            .collect();
        if !due.is_empty()
            && let Err(e) = store.insert_alerts(&due).await
        {
            tracing::warn!(error = %e, "cannot resolve limit alerts; retrying later");
        }
    }

    /// Applies one tenant's rows; the crossings, or `None` when its marker moved under it twice.
    async fn apply_tenant(&self, tenant: &str, source: &str, rows: &[&EventRow], up_to: i64) -> Result<Option<Vec<Crossing>>, meterline_limits::LimitsError> {
        let mut plans = BTreeMap::new();
        for view in self.redis.plans(tenant).await? {
            if let Ok(plan) = Plan::from_view(&view) {
                plans.insert(view.plan_id, plan);
            }
        }
        let reserved = rows.iter().any(|r| r.idempotency_key.starts_with(KEY_PREFIX));
        if plans.is_empty() && !reserved {
            // Nothing to count or free: no marker to move either.
            return Ok(Some(Vec::new()));
        }
        let subs = self.subscriptions(tenant, rows, &plans).await?;
        let mut expected = self.redis.marker(tenant, source).await?;
        for _ in 0..2 {
            let fresh: Vec<&EventRow> = rows.iter().copied().filter(|r| expected.is_none_or(|m| r.kafka_offset > m)).collect();
            let mut totals: HashMap<String, (i64, i64)> = HashMap::new();
            // The limits watching each counter, once each.
            let mut watching: HashMap<String, Vec<Watch>> = HashMap::new();
            let mut settle = Vec::new();
            for row in &fresh {
                let user = subs.get(&Subject::user(&row.user_id));
                let customer = subs.get(&Subject::customer(&row.customer_id));
                let customer_id = (!row.customer_id.is_empty()).then_some(row.customer_id.as_str());
                let applied = applicable(&plans, &row.user_id, user, customer_id, customer);
                for charge in counts(&applied, row) {
                    let e = totals.entry(charge.counter.key).or_insert((0, charge.counter.keep_until));
                    e.0 += charge.amount;
                }
                for w in watches(&applied, row) {
                    let list = watching.entry(w.counter.key.clone()).or_default();
                    if !list.contains(&w) {
                        list.push(w);
                    }
                }
                if row.idempotency_key.starts_with(KEY_PREFIX) {
                    settle.push(row.idempotency_key.clone());
                }
            }
            let counts: Vec<(String, i64, i64)> = totals.into_iter().map(|(k, (d, keep))| (k, d, keep)).collect();
            match self.redis.apply_counted(tenant, source, expected, up_to, &counts, &settle).await? {
                (Applied::Done, used) => {
                    let mut crossings = Vec::new();
                    for ((counter, delta, _), after) in counts.iter().zip(used) {
                        for w in watching.get(counter).into_iter().flatten() {
                            crossings.extend(w.crossings(after.saturating_sub(*delta), after));
                        }
                    }
                    return Ok(Some(crossings));
                }
                (Applied::Stale(now), _) => {
                    limit_metrics::applied("already");
                    if now.is_some_and(|m| m >= up_to) {
                        return Ok(Some(Vec::new()));
                    }
                    expected = now;
                }
            }
        }
        Ok(None)
    }

    /// The subscriptions of the rows' users and customers that name a plan.
    async fn subscriptions(
        &self,
        tenant: &str,
        rows: &[&EventRow],
        plans: &BTreeMap<String, Plan>,
    ) -> Result<HashMap<Subject, Subscription>, meterline_limits::LimitsError> {
        let mut subjects: Vec<Subject> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            if seen.insert((true, row.user_id.as_str())) {
                subjects.push(Subject::user(&row.user_id));
            }
            if !row.customer_id.is_empty() && seen.insert((false, row.customer_id.as_str())) {
                subjects.push(Subject::customer(&row.customer_id));
            }
        }
        let mut out = HashMap::new();
        if plans.is_empty() {
            return Ok(out);
        }
        let views = self.redis.subscriptions(tenant, &subjects).await?;
        for (subject, view) in subjects.into_iter().zip(views) {
            if let Some(sub) = view.and_then(|v| Subscription::from_view(&v).ok()) {
                out.insert(subject, sub);
            }
        }
        Ok(out)
    }
}
