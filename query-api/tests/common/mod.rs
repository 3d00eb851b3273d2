//! A limits store for the query API's route tests: one `default` plan (10 events a day per user) and two users' counters of today, so the limits' read routes answer 200 without Redis.

use chrono::Utc;
use meterline_limits::{
    Admission, Admit, Balance, Hold, LimitStore, LimitsError, PlanView, Refusal, Reservation, Subject, SubscriptionView, Usage, parse_plan,
};
use std::collections::BTreeMap;

/// The read routes never reserve: those calls fail as an unreachable store would.
fn unused<T>() -> Result<T, LimitsError> {
    Err(LimitsError::Unavailable { message: "the fake limits store only reads".into(), source: None })
}

#[derive(Debug, Clone)]
pub struct FakeLimits;

impl FakeLimits {
    fn plan() -> PlanView {
        let plan = parse_plan(r#"{"limits":[{"name":"daily","measure":"events","period":"day","amount":"10"}]}"#).expect("plan");
        plan.view("default")
    }
}

impl LimitStore for FakeLimits {
    async fn put_plan(&self, _: &str, _: &PlanView) -> Result<(), LimitsError> {
        unused()
    }
    async fn plans(&self, _: &str) -> Result<Vec<PlanView>, LimitsError> {
        Ok(vec![FakeLimits::plan()])
    }
    async fn delete_plan(&self, _: &str, _: &str) -> Result<bool, LimitsError> {
        unused()
    }
    async fn put_subscription(&self, _: &str, _: &Subject, _: &SubscriptionView) -> Result<(), LimitsError> {
        unused()
    }
    async fn subscription(&self, _: &str, _: &Subject) -> Result<Option<SubscriptionView>, LimitsError> {
        Ok(None)
    }
    async fn delete_subscription(&self, _: &str, _: &Subject) -> Result<bool, LimitsError> {
        unused()
    }
    async fn usage(&self, tenant: &str) -> Result<Usage, LimitsError> {
        let plans = self.plans(tenant).await?;
        let book = meterline_limits::book_of(plans.clone(), None, None)?;
        let now = Utc::now();
        let counters = [("u1", 9), ("u2", 2)].into_iter().map(|(user, used)| (book.applicable(user, None)[0].counter(now).key, used)).collect();
        Ok(Usage { plans, subscriptions: BTreeMap::new(), counters })
    }
    async fn balances(&self, _: &str, counters: &[String], _: i64) -> Result<Vec<Balance>, LimitsError> {
        Ok(vec![Balance { used: 1, reserved: 1 }; counters.len()])
    }
    async fn admit(&self, _: &str, _: &Admit) -> Result<Admission, LimitsError> {
        unused()
    }
    async fn reservation(&self, _: &str, _: &str) -> Result<Option<Reservation>, LimitsError> {
        unused()
    }
    async fn commit(&self, _: &str, _: &str, _: &[Hold], _: &str, _: i64) -> Result<Result<Reservation, Refusal>, LimitsError> {
        unused()
    }
    async fn release(&self, _: &str, _: &str, _: i64) -> Result<Result<Reservation, Refusal>, LimitsError> {
        unused()
    }
}

