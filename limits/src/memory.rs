//! An in-memory store for the service's unit tests: the trait's contract in its plainest form, over the pure transitions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::book::admits;
use crate::error::LimitsError;
use crate::plan::PlanView;
use crate::reservation::{self, Hold, Refusal, Reservation, ReservationState};
use crate::status::Balance;
use crate::store::{Admission, Admit, Admitted, LimitStore, Usage};
use crate::subject::{Subject, SubscriptionView};

#[derive(Debug, Default)]
struct Tenant {
    plans: BTreeMap<String, PlanView>,
    subs: HashMap<String, SubscriptionView>,
    used: HashMap<String, i64>,
    reservations: HashMap<String, Reservation>,
    idempotency: HashMap<String, String>,
}

impl Tenant {
    /// Live holds on `counter` at `now_ms`.
    fn held(&self, counter: &str, now_ms: i64) -> i64 {
        self.reservations
            .values()
            .filter(|r| matches!(r.state_at(now_ms), ReservationState::Held | ReservationState::Committed))
            .flat_map(|r| &r.holds)
            .filter(|h| h.counter == counter)
            .map(|h| h.amount)
            .sum()
    }

    fn balance(&self, counter: &str, now_ms: i64) -> Balance {
        Balance { used: self.used.get(counter).copied().unwrap_or(0), reserved: self.held(counter, now_ms) }
    }
}

/// Everything in one mutex: every call is atomic.
#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    tenants: Mutex<HashMap<String, Tenant>>,
}

fn key(id: &str) -> String {
    id.split('.').next().unwrap_or(id).to_owned()
}

impl MemoryStore {
    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut Tenant) -> T) -> Result<T, LimitsError> {
        let mut all = self.tenants.lock().map_err(|_| LimitsError::Unavailable { message: "poisoned".into(), source: None })?;
        Ok(f(all.entry(tenant.to_owned()).or_default()))
    }

    /// What the counting step does for one metered event: add its counts and
    /// free its reservation's holds.
    pub(crate) fn count(&self, tenant: &str, charges: &[crate::book::Charge], event_key: &str) {
        let _ = self.with(tenant, |t| {
            for c in charges {
                *t.used.entry(c.counter.key.clone()).or_default() += c.amount;
            }
            if let Some(r) = t.reservations.remove(event_key) {
                t.reservations.insert(event_key.to_owned(), reservation::counted(r));
            }
        });
    }
}

impl LimitStore for MemoryStore {
    async fn put_plan(&self, tenant: &str, plan: &PlanView) -> Result<(), LimitsError> {
        self.with(tenant, |t| {
            t.plans.insert(plan.plan_id.clone(), plan.clone());
        })
    }
    async fn plans(&self, tenant: &str) -> Result<Vec<PlanView>, LimitsError> {
        self.with(tenant, |t| t.plans.values().cloned().collect())
    }
    async fn delete_plan(&self, tenant: &str, plan_id: &str) -> Result<bool, LimitsError> {
        self.with(tenant, |t| t.plans.remove(plan_id).is_some())
    }
    async fn put_subscription(&self, tenant: &str, subject: &Subject, sub: &SubscriptionView) -> Result<(), LimitsError> {
        self.with(tenant, |t| {
            t.subs.insert(subject.key(), sub.clone());
        })
    }
    async fn subscription(&self, tenant: &str, subject: &Subject) -> Result<Option<SubscriptionView>, LimitsError> {
        self.with(tenant, |t| t.subs.get(&subject.key()).cloned())
    }
    async fn delete_subscription(&self, tenant: &str, subject: &Subject) -> Result<bool, LimitsError> {
        self.with(tenant, |t| t.subs.remove(&subject.key()).is_some())
    }
    async fn usage(&self, tenant: &str) -> Result<Usage, LimitsError> {
        self.with(tenant, |t| Usage {
            plans: t.plans.values().cloned().collect(),
            subscriptions: t.subs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            counters: t.used.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })
    }
    async fn balances(&self, tenant: &str, counters: &[String], now_ms: i64) -> Result<Vec<Balance>, LimitsError> {
        self.with(tenant, |t| counters.iter().map(|c| t.balance(c, now_ms)).collect())
    }
    async fn admit(&self, tenant: &str, admit: &Admit) -> Result<Admission, LimitsError> {
        self.with(tenant, |t| {
            let balances = |t: &Tenant| admit.checks.iter().map(|c| t.balance(&c.counter.key, admit.now_ms)).collect::<Vec<_>>();
            if let Some(existing) = admit.idempotency_key.as_ref().and_then(|k| t.idempotency.get(k)).and_then(|k| t.reservations.get(k)) {
                return Admission { admitted: Admitted::Existing(existing.clone()), balances: balances(t) };
            }
            let before = balances(t);
            let refused: Vec<usize> =
                admit.checks.iter().zip(&before).enumerate().filter(|(_, (c, b))| !admits(c, b.used, b.reserved)).map(|(i, _)| i).collect();
            if !refused.is_empty() {
                return Admission { admitted: Admitted::Denied(refused), balances: before };
            }
            let k = key(&admit.reservation.id);
            if let Some(idem) = &admit.idempotency_key {
                t.idempotency.insert(idem.clone(), k.clone());
            }
            t.reservations.insert(k, admit.reservation.clone());
            Admission { admitted: Admitted::New, balances: balances(t) }
        })
    }
    async fn reservation(&self, tenant: &str, id: &str) -> Result<Option<Reservation>, LimitsError> {
        self.with(tenant, |t| t.reservations.get(&key(id)).cloned())
    }
    async fn commit(&self, tenant: &str, id: &str, holds: &[Hold], fingerprint: &str, now_ms: i64) -> Result<Result<Reservation, Refusal>, LimitsError> {
        self.with(tenant, |t| {
            let k = key(id);
            let r = t.reservations.get(&k).cloned().ok_or(Refusal::NotFound)?;
            let next = reservation::commit(r, holds.to_vec(), fingerprint, now_ms)?;
            t.reservations.insert(k, next.clone());
            Ok(next)
        })
    }
    async fn release(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Result<Reservation, Refusal>, LimitsError> {
        self.with(tenant, |t| {
            let k = key(id);
            let r = t.reservations.get(&k).cloned().ok_or(Refusal::NotFound)?;
            let next = reservation::release(r, now_ms)?;
            t.reservations.insert(k, next.clone());
            Ok(next)
        })
    }
}
