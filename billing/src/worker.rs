//! One sync cycle and the loop around it: for every tenant, meter and mapped
//! subject, each hour's current sum against its pushed state, through
//! [`decide`](crate::plan::decide), oldest hour first.

use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::config::{BillingConfig, MeterConfig, TenantBilling};
use crate::error::BillingError;
use crate::plan::{Decision, WindowKey, WindowState, decide, identifier, range, value_of};
use crate::store::{BillingLedger, SumsQuery};
use crate::stripe::{MeterEvent, Outcome, StripeClient};

/// What one cycle did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CycleReport {
    /// Meter events Stripe took (or already had).
    pub sent: u64,
    /// Of those, the ones Stripe already had (a resend after a crash).
    pub duplicates: u64,
    /// Windows newly recorded as too old for Stripe.
    pub refused: u64,
    /// Events Stripe refused for another reason, left pending.
    pub failed: u64,
}

/// The sync worker over a ledger.
#[derive(Debug)]
pub struct Worker<L> {
    ledger: L,
    stripe: StripeClient,
    config: BillingConfig,
}

impl<L: BillingLedger> Worker<L> {
    pub fn new(ledger: L, stripe: StripeClient, config: BillingConfig) -> Worker<L> {
        Worker { ledger, stripe, config }
    }

    /// Cycles every `interval_secs` until `shutdown`. Stopping mid-cycle is
    /// safe: a value is written down before it is sent.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let cycle = async {
                // One `stripe sync cycle` line per finished cycle: the sync's
                // tests count them to know a whole cycle ran (no metrics here).
                match self.cycle(chrono::Utc::now().timestamp()).await {
                    Ok(report) if report != CycleReport::default() => tracing::info!(?report, "stripe sync cycle"),
                    Ok(_) => tracing::debug!("stripe sync cycle: nothing to push"),
                    Err(e) => tracing::warn!("stripe sync cycle stopped: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(self.config.interval_secs)).await;
            };
            tokio::select! {
                () = cycle => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// One pass over every tenant at `now` (Unix seconds).
    pub async fn cycle(&self, now: i64) -> Result<CycleReport, BillingError> {
        let mut report = CycleReport::default();
        for tenant in &self.config.tenants {
            if tenant.meters.is_empty() {
                continue;
            }
            let mut customers = tenant.customers.clone();
            // The API's mapping wins over the config's.
            customers.extend(self.ledger.mappings(&tenant.tenant).await?.into_iter().map(|m| (m.subject, m.stripe_customer_id)));
            for meter in &tenant.meters {
                self.meter(tenant, meter, &customers, now, &mut report).await?;
            }
        }
        Ok(report)
    }

    async fn meter(&self, tenant: &TenantBilling, meter: &MeterConfig, customers: &BTreeMap<String, String>, now: i64, report: &mut CycleReport) -> Result<(), BillingError> {
        let settle = i64::try_from(self.config.settle_secs).unwrap_or(i64::MAX);
        let (from, to) = range(now, settle);
        // (window, subject) -> (current value, pushed state), oldest first.
        let mut windows: BTreeMap<(i64, String), (i64, WindowState)> = BTreeMap::new();
        if !customers.is_empty() {
            let q = SumsQuery {
                tenant: tenant.tenant.clone(),
                subject: tenant.subject,
                columns: meter.measure.columns(),
                filters: meter.filter.pairs(),
                from,
                to,
                subjects: customers.keys().cloned().collect(),
            };
            for s in self.ledger.sums(&q).await? {
                windows.entry((s.window_start, s.subject)).or_default().0 = value_of(s.sum, meter.unit.nanos());
            }
        }
        for (subject, window_start, state) in self.ledger.states(&tenant.tenant, &meter.event_name, from).await? {
            // Windows past `to` (settling) wait until they have settled.
            if window_start < to {
                windows.entry((window_start, subject)).or_default().1 = state;
            }
        }
        for ((window_start, subject), (current, state)) in windows {
            let key = WindowKey { tenant: tenant.tenant.clone(), meter: meter.event_name.clone(), subject, window_start };
            match decide(window_start, current, &state, now) {
                Decision::Nothing => {}
                Decision::Push { seq, value } => {
                    // A subject whose mapping went away keeps what it was sent.
                    let Some(customer) = customers.get(&key.subject) else { continue };
                    self.ledger.begin(&key, customer, seq, value).await?;
                    self.send(&key, customer, seq, value, report).await?;
                }
                Decision::Resend { seq, value } => self.send(&key, &state.customer, seq, value, report).await?,
                Decision::Refuse { value } => {
                    tracing::warn!(tenant = %key.tenant, meter = %key.meter, subject = %key.subject, window_start, value, "a window's delta is older than Stripe accepts; recorded as refused");
                    self.ledger.refuse(&key, value, "older than the 35 days Stripe accepts").await?;
                    report.refused += 1;
                }
                Decision::Shrunk { by } => {
                    tracing::warn!(tenant = %key.tenant, meter = %key.meter, subject = %key.subject, window_start, by, "a window's sum went below what was pushed; nothing sent");
                }
            }
        }
        Ok(())
    }

    /// Sends the window's pending event; on success it joins `pushed`.
    async fn send(&self, key: &WindowKey, customer: &str, seq: i64, value: i64, report: &mut CycleReport) -> Result<(), BillingError> {
        let event = MeterEvent { event_name: key.meter.clone(), stripe_customer_id: customer.to_owned(), value, identifier: identifier(key, seq), timestamp: key.window_start };
        match self.stripe.send(&event).await {
            Ok(outcome @ (Outcome::Accepted | Outcome::Duplicate)) => {
                self.ledger.finish(key, seq).await?;
                report.sent += 1;
                report.duplicates += u64::from(outcome == Outcome::Duplicate);
                Ok(())
            }
            Ok(Outcome::Refused(message)) => {
                tracing::warn!(tenant = %key.tenant, meter = %key.meter, subject = %key.subject, identifier = %event.identifier, "Stripe refused a meter event: {message}");
                self.ledger.note(key, &message).await?;
                report.failed += 1;
                Ok(())
            }
            Err(e) => {
                self.ledger.note(key, &e.to_string()).await?;
                Err(e)
            }
        }
    }
}
