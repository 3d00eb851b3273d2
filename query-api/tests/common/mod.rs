//! The fakes the query API's route tests share, so every route answers without ClickHouse or Redis: a query store and an export source answering the rows a test hands them, a billing store, and a limits store with one `default` plan (10 events a day per user) and two users' counters of today.

use chrono::Utc;
use futures::future::BoxFuture;
use meterline_domain::{AlertRow, EventRow, SumRow};
use meterline_limits::{
    Admission, Admit, Balance, Hold, LimitStore, LimitsError, PlanView, Refusal, Reservation, Subject, SubscriptionView, Usage, parse_plan,
};
use meterline_query_api::{AlertsQuery, Cursor, QueryError, QueryStore, SumsQuery, TopQuery};
use meterline_sql::Scope;
use std::collections::BTreeMap;

/// A query store that answers every read with the rows it was given.
#[derive(Debug, Default)]
pub struct FakeStore {
    pub sums: Vec<SumRow>,
    pub top: Vec<SumRow>,
    pub events: Vec<EventRow>,
    pub alerts: Vec<AlertRow>,
}

impl QueryStore for FakeStore {
    fn sums<'a>(&'a self, _: &'a Scope, _: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async { Ok(self.sums.clone()) })
    }
    fn top<'a>(&'a self, _: &'a Scope, _: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async { Ok(self.top.clone()) })
    }
    fn negative_count<'a>(&'a self, _: &'a Scope, _: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async { Ok(1) })
    }
    fn events<'a>(&'a self, _: &'a Scope, _: Option<&'a Cursor>, _: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(async { Ok(self.events.clone()) })
    }
    fn alerts<'a>(&'a self, _: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(async { Ok(self.alerts.clone()) })
    }
    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// An event of tenant `acme` with every column set (`provider`, the token
/// kinds, a negative revenue, a Kafka position); a test clears what it wants empty.
pub fn event(key: &str, topic: &str, metadata: &str) -> EventRow {
    EventRow {
        tenant: "acme".into(),
        idempotency_key: key.into(),
        fingerprint: 1,
        event_time: 1_800_000_000,
        event_time_ns: 5,
        user_id: "u".into(),
        customer_id: String::new(),
        feature: "chat".into(),
        model: "gpt-4o".into(),
        provider: "openai".into(),
        environment: "production".into(),
        billable: 1,
        input_tokens: 1,
        output_tokens: 2,
        cached_input_tokens: 3,
        reasoning_tokens: 4,
        cost_nanos: 5,
        cost_source: 2,
        revenue_nanos: -6,
        credits_nanos: 0,
        metadata: metadata.into(),
        received_at: 1_800_000_001,
        kafka_topic: topic.into(),
        kafka_partition: 3,
        kafka_offset: 42,
        written_at: 1_800_000_002,
    }
}

/// A `peers` alert of tenant `acme` for `user`.
pub fn alert(user: &str, state: &str, resolved_at: u32) -> AlertRow {
    AlertRow {
        tenant: "acme".into(),
        user_id: user.into(),
        rule: "peers".into(),
        opened_at: 1_800_000_000,
        state: state.into(),
        observed_nanos: 200,
        threshold_nanos: 100,
        window_secs: 3_600,
        updated_at: 1_800_000_100,
        resolved_at,
        version: 1,
    }
}

/// An export source with customer `c` anchored to a billing cycle, summing to the rows it was given.
#[derive(Debug)]
pub struct FakeExport(pub Vec<SumRow>);

impl meterline_query_api::export::ExportSource for FakeExport {
    fn anchors<'a>(&'a self, _: &'a str, _: meterline_limits::Scope) -> BoxFuture<'a, Result<BTreeMap<String, chrono::DateTime<Utc>>, QueryError>> {
        Box::pin(async { Ok([("c".to_owned(), chrono::DateTime::from_timestamp(1_800_000_000, 5).expect("time"))].into()) })
    }
    fn sums<'a>(&'a self, _: &'a meterline_sql::BillingSums) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async { Ok(self.0.clone()) })
    }
}

/// A billing store with one API mapping (`api-c`) whose status is the rows it was given.
#[derive(Debug)]
pub struct FakeBilling(pub Vec<meterline_billing::StatusRow>);

impl meterline_billing::BillingAdmin for FakeBilling {
    async fn put_mapping(&self, _: &str, _: &str, _: &str) -> Result<(), meterline_billing::BillingError> {
        Ok(())
    }
    async fn mapping(&self, _: &str, subject: &str) -> Result<Option<String>, meterline_billing::BillingError> {
        Ok((subject == "api-c").then(|| "cus_Api".to_owned()))
    }
    async fn status(&self, _: &str) -> Result<Vec<meterline_billing::StatusRow>, meterline_billing::BillingError> {
        Ok(self.0.clone())
    }
}

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

