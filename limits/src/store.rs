//! The seam to where limits live: one trait, implemented over Redis (distributed) and over the embedded SQLite store.
//!
//! Every method is one atomic step on the store. `admit` is the one that
//! must be atomic across every process serving reservations for the tenant:
//! it reads each checked counter's used and held amounts, applies
//! [`admits`](crate::book::admits) to every hard check, and only if all pass
//! stores the reservation and adds its holds, all in one step. Holds past
//! their expiry are dropped before any read (lazily; no job runs).

use std::collections::BTreeMap;
use std::future::Future;

use crate::book::{Book, Charge};
use crate::error::LimitsError;
use crate::plan::{Plan, PlanView};
use crate::reservation::{Refusal, Reservation};
use crate::status::Balance;
use crate::subject::{Subject, Subscription, SubscriptionView};

/// A reservation to admit.
#[derive(Debug, Clone)]
pub struct Admit {
    /// The record to store if admitted: state `Held`, its holds the checks'
    /// non-zero amounts.
    pub reservation: Reservation,
    /// A retried reserve with the same key returns the first reservation.
    pub idempotency_key: Option<String>,
    /// Every counter the reservation touches, hard and soft.
    pub checks: Vec<Charge>,
    pub now_ms: i64,
}

/// What `admit` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    New,
    /// The indexes of the checks that refused; nothing was stored.
    Denied(Vec<usize>),
    /// The idempotency key was used before: that reservation.
    Existing(Reservation),
}

/// `admit`'s answer: the decision, and each check's balance after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub admitted: Admitted,
    pub balances: Vec<Balance>,
}

/// Everything ranking who is nearest their caps reads of a tenant, in one
/// read where the store can.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub plans: Vec<PlanView>,
    /// Every subscription, by subject key (`user:<id>`, `customer:<id>`).
    pub subscriptions: BTreeMap<String, SubscriptionView>,
    /// Every counter still kept, `(key, used)`: current and past periods.
    pub counters: Vec<(String, i64)>,
}

/// How long a store keeps a reservation's record after it expired or was
/// counted: a late commit or a retried one within this still finds it.
pub const KEEP_AFTER_EXPIRY_MS: i64 = 7 * 86_400_000;

type Result<T> = std::result::Result<T, LimitsError>;

/// Plans, subscriptions, counters, holds and reservations of every tenant.
pub trait LimitStore: Send + Sync + 'static {
    /// Replaces (or creates) a plan.
    fn put_plan(&self, tenant: &str, plan: &PlanView) -> impl Future<Output = Result<()>> + Send;
    /// Every plan of the tenant, by id.
    fn plans(&self, tenant: &str) -> impl Future<Output = Result<Vec<PlanView>>> + Send;
    /// True if it existed.
    fn delete_plan(&self, tenant: &str, plan_id: &str) -> impl Future<Output = Result<bool>> + Send;

    fn put_subscription(&self, tenant: &str, subject: &Subject, sub: &SubscriptionView) -> impl Future<Output = Result<()>> + Send;
    fn subscription(&self, tenant: &str, subject: &Subject) -> impl Future<Output = Result<Option<SubscriptionView>>> + Send;
    /// True if it existed.
    fn delete_subscription(&self, tenant: &str, subject: &Subject) -> impl Future<Output = Result<bool>> + Send;

    /// Each counter's used amount and live holds at `now_ms`.
    fn balances(&self, tenant: &str, counters: &[String], now_ms: i64) -> impl Future<Output = Result<Vec<Balance>>> + Send;
    /// The atomic admission; see the module docs.
    fn admit(&self, tenant: &str, admit: &Admit) -> impl Future<Output = Result<Admission>> + Send;
    fn reservation(&self, tenant: &str, id: &str) -> impl Future<Output = Result<Option<Reservation>>> + Send;
    /// Applies [`reservation::commit`](crate::reservation::commit) to the
    /// stored record and moves its holds to `holds`, atomically. A missing
    /// record is `Refusal::NotFound`. Stores keep a record for
    /// [`KEEP_AFTER_EXPIRY_MS`] past its expiry (and a committed one until
    /// counted, then as long again).
    fn commit(
        &self,
        tenant: &str,
        id: &str,
        holds: &[crate::reservation::Hold],
        fingerprint: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<std::result::Result<Reservation, Refusal>>> + Send;
    /// [`commit`](LimitStore::commit), then the balances of `counters` (the
    /// statuses a commit answers), in one round trip where the store can;
    /// none after a refusal. A failed balance read after a commit that took
    /// effect answers no balances rather than hide the commit.
    fn commit_and_balances(
        &self,
        tenant: &str,
        id: &str,
        holds: &[crate::reservation::Hold],
        fingerprint: &str,
        now_ms: i64,
        counters: &[String],
    ) -> impl Future<Output = Result<(std::result::Result<Reservation, Refusal>, Vec<Balance>)>> + Send {
        async move {
            let outcome = self.commit(tenant, id, holds, fingerprint, now_ms).await?;
            let balances = match &outcome {
                Ok(_) => self.balances(tenant, counters, now_ms).await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            Ok((outcome, balances))
        }
    }
    /// Applies [`reservation::release`](crate::reservation::release) and frees its holds, atomically.
    fn release(&self, tenant: &str, id: &str, now_ms: i64) -> impl Future<Output = Result<std::result::Result<Reservation, Refusal>>> + Send;

    /// The tenant's plans, subscriptions and counters, for
    /// `GET /v1/limits/nearest`. A store that cannot list its counters
    /// keeps this default, and the route answers `503`.
    fn usage(&self, tenant: &str) -> impl Future<Output = Result<Usage>> + Send {
        let _ = tenant;
        async { Err(LimitsError::Unavailable { message: "this limits store cannot list its counters".into(), source: None }) }
    }

    /// A reservation and the book of its user and customer: what a commit
    /// reads before it meters, in one round trip where the store can.
    fn reservation_and_book(
        &self,
        tenant: &str,
        id: &str,
        user: &str,
        customer: Option<&str>,
    ) -> impl Future<Output = Result<(Option<Reservation>, Book)>> + Send {
        async move { Ok((self.reservation(tenant, id).await?, self.book(tenant, Some(user), customer).await?)) }
    }

    /// The tenant's plans and the subscriptions of `user` and `customer`.
    fn book(&self, tenant: &str, user: Option<&str>, customer: Option<&str>) -> impl Future<Output = Result<Book>> + Send {
        async move {
            let plans = self.plans(tenant).await?;
            let user_sub = match user {
                Some(user) => self.subscription(tenant, &Subject::user(user)).await?,
                None => None,
            };
            let customer_sub = match customer.filter(|c| !c.is_empty()) {
                Some(customer) => self.subscription(tenant, &Subject::customer(customer)).await?,
                None => None,
            };
            book_of(plans, user_sub, customer_sub)
        }
    }
}

/// A book from what a store keeps: for stores that read it in one round trip.
pub fn book_of(plans: Vec<PlanView>, user: Option<SubscriptionView>, customer: Option<SubscriptionView>) -> Result<Book> {
    let mut book = Book::default();
    for view in plans {
        let plan = Plan::from_view(&view).map_err(|e| LimitsError::Corrupt { key: format!("plan {}", view.plan_id), message: e.to_string() })?;
        book.plans.insert(view.plan_id, plan);
    }
    let parse = |v: Option<SubscriptionView>, who: &str| {
        v.map(|v| Subscription::from_view(&v).map_err(|e| LimitsError::Corrupt { key: format!("subscription of {who}"), message: e.to_string() })).transpose()
    };
    book.user = parse(user, "the user")?;
    book.customer = parse(customer, "the customer")?;
    Ok(book)
}
