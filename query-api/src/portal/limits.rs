//! Where the portal reads a subject's limits and subscription cycle: any
//! [`LimitStore`] (the all-in-one's embedded store, the query service's
//! optional Redis), behind one object-safe trait so the query API's state
//! stays free of the store's type.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use meterline_limits::{Balance, LimitStatus, LimitStore, LimitsError, Scope, Subject, status};
use std::time::Duration;

/// How long the portal waits for the limits store: an end user's page is
/// better served a quick 503 (the widget shows "unavailable") than a hang.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// A subject's limits now, and the anchor of its subscription's cycle.
#[derive(Debug, Clone)]
pub struct SubjectView {
    /// The subject's own subscription's `cycle_start`, if it has one.
    pub anchor: Option<DateTime<Utc>>,
    pub plan: String,
    pub limits: Vec<LimitStatus>,
}

/// Reads what the portal shows of a subject's limits.
pub trait LimitSource: Send + Sync + std::fmt::Debug {
    fn subject<'a>(&'a self, tenant: &'a str, subject: &'a Subject, now: DateTime<Utc>) -> BoxFuture<'a, Result<SubjectView, LimitsError>>;
}

/// [`LimitSource`] over a limits store: the subject's own limits, as
/// `GET /v1/{users,customers}/{id}/limits` resolves them (a user's
/// user-scope limits, a customer's customer-scope ones).
#[derive(Debug, Clone)]
pub struct StoreLimits<S>(pub S);

async fn bounded<T>(call: impl Future<Output = Result<T, LimitsError>>) -> Result<T, LimitsError> {
    tokio::time::timeout(STORE_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(LimitsError::Unavailable { message: format!("no answer within {} ms", STORE_TIMEOUT.as_millis()), source: None }))
}

impl<S: LimitStore + std::fmt::Debug> LimitSource for StoreLimits<S> {
    fn subject<'a>(&'a self, tenant: &'a str, subject: &'a Subject, now: DateTime<Utc>) -> BoxFuture<'a, Result<SubjectView, LimitsError>> {
        Box::pin(async move {
            let id = subject.id.as_str();
            let (user, customer) = match subject.scope {
                Scope::User => (Some(id), None),
                Scope::Customer => (None, Some(id)),
            };
            let book = bounded(self.0.book(tenant, user, customer)).await?;
            let own = match subject.scope {
                Scope::User => book.user.as_ref(),
                Scope::Customer => book.customer.as_ref(),
            };
            let anchor = own.and_then(|s| s.cycle_start);
            let (plan, applied) = book.of_subject(subject);
            let counters: Vec<String> = applied.iter().map(|a| a.counter(now).key).collect();
            let balances: Vec<Balance> = bounded(self.0.balances(tenant, &counters, now.timestamp_millis())).await?;
            let limits = applied.iter().zip(balances).map(|(a, b)| status(a, b, now)).collect();
            Ok(SubjectView { anchor, plan, limits })
        })
    }
}
