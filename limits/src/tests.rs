//! The service over the in-memory store with an injected clock: periods reset with no job running, estimates are priced, commits meter once.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use meterline_domain::{EventRow, Source, price};
use meterline_http::ApiError;
use meterline_schemas::TimeBounds;
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use meterline_schemas::wire::Envelope;
use std::sync::{Arc, Mutex};

use crate::book::{Book, counts};
use crate::config::LimitsConfig;
use crate::memory::MemoryStore;
use crate::plan::parse_plan;
use crate::service::{Clock, Limits, Meter, ReserveAnswer};
use crate::store::LimitStore;
use crate::subject::{Subject, Subscription};

/// Keeps what a commit metered; the test counts it when it chooses (as the
/// aggregator would, some time after the commit).
#[derive(Debug, Default)]
struct Recorded(Mutex<Vec<Envelope>>);

impl Meter for Recorded {
    fn meter(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), String>> {
        if let Ok(mut all) = self.0.lock() {
            all.extend(events);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

struct Rig {
    limits: Limits<Arc<MemoryStore>>,
    store: Arc<MemoryStore>,
    meter: Arc<Recorded>,
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl LimitStore for Arc<MemoryStore> {
    async fn put_plan(&self, t: &str, p: &crate::plan::PlanView) -> Result<(), crate::LimitsError> {
        (**self).put_plan(t, p).await
    }
    async fn plans(&self, t: &str) -> Result<Vec<crate::plan::PlanView>, crate::LimitsError> {
        (**self).plans(t).await
    }
    async fn delete_plan(&self, t: &str, id: &str) -> Result<bool, crate::LimitsError> {
        (**self).delete_plan(t, id).await
    }
    async fn put_subscription(&self, t: &str, s: &Subject, v: &crate::subject::SubscriptionView) -> Result<(), crate::LimitsError> {
        (**self).put_subscription(t, s, v).await
    }
    async fn subscription(&self, t: &str, s: &Subject) -> Result<Option<crate::subject::SubscriptionView>, crate::LimitsError> {
        (**self).subscription(t, s).await
    }
    async fn delete_subscription(&self, t: &str, s: &Subject) -> Result<bool, crate::LimitsError> {
        (**self).delete_subscription(t, s).await
    }
    async fn balances(&self, t: &str, c: &[String], now: i64) -> Result<Vec<crate::status::Balance>, crate::LimitsError> {
        (**self).balances(t, c, now).await
    }
    async fn admit(&self, t: &str, a: &crate::store::Admit) -> Result<crate::store::Admission, crate::LimitsError> {
        (**self).admit(t, a).await
    }
    async fn reservation(&self, t: &str, id: &str) -> Result<Option<crate::reservation::Reservation>, crate::LimitsError> {
        (**self).reservation(t, id).await
    }
    async fn commit(
        &self,
        t: &str,
        id: &str,
        h: &[crate::reservation::Hold],
        f: &str,
        now: i64,
    ) -> Result<Result<crate::reservation::Reservation, crate::reservation::Refusal>, crate::LimitsError> {
        (**self).commit(t, id, h, f, now).await
    }
    async fn release(&self, t: &str, id: &str, now: i64) -> Result<Result<crate::reservation::Reservation, crate::reservation::Refusal>, crate::LimitsError> {
        (**self).release(t, id, now).await
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
}

impl Rig {
    fn new(start: &str) -> Rig {
        let store = Arc::new(MemoryStore::default());
        let meter = Arc::new(Recorded::default());
        let now = Arc::new(Mutex::new(at(start)));
        let clock_now = now.clone();
        let clock: Clock = Arc::new(move || clock_now.lock().map(|t| *t).unwrap_or_default());
        let keys = KeyRing::from_config(&[]).expect("keys");
        let limits = Limits::new(store.clone(), meter.clone(), keys, TimeBounds::default(), LimitsConfig::default(), clock).expect("limits");
        Rig { limits, store, meter, now }
    }

    fn set(&self, time: &str) {
        if let Ok(mut now) = self.now.lock() {
            *now = at(time);
        }
    }

    async fn plan(&self, id: &str, body: &str) {
        let plan = parse_plan(body).expect("plan");
        self.store.put_plan("acme", &plan.view(id)).await.expect("put");
    }

    async fn reserve(&self, user: &str, estimate: &str) -> ReserveAnswer {
        let body = format!(r#"{{"user_id":"{user}","feature":"chat","model":"gpt-4o","estimate":{estimate}}}"#);
        self.limits.reserve("acme", &body).await.expect("reserve answers")
    }

    /// Counts every metered event not counted yet, as the aggregator does.
    async fn count_metered(&self) {
        let events: Vec<Envelope> = self.meter.0.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        for envelope in events {
            if !seen.insert(envelope.event.idempotency_key.clone()) {
                continue; // the pipeline's dedupe
            }
            let e = &envelope.event;
            let mut book = Book::default();
            for view in self.store.plans("acme").await.expect("plans") {
                book.plans.insert(view.plan_id.clone(), crate::plan::Plan::from_view(&view).expect("plan"));
            }
            book.user = self.store.subscription("acme", &Subject::user(&e.user_id)).await.expect("sub").map(|v| Subscription::from_view(&v).expect("sub"));
            let priced = price(e, None, &Catalog::builtin().expect("catalog"));
            let row = EventRow::new(&envelope, 0, priced, Source::Embedded, 0);
            let charges = counts(&book.applicable(&e.user_id, e.customer_id.as_deref()), &row);
            self.store.count("acme", &charges, &e.idempotency_key);
        }
    }

    async fn commit(&self, id: &str, body: &str) -> Result<crate::service::SettleAnswer, ApiError> {
        self.limits.commit("acme", id, body).await
    }
}

#[tokio::test]
async fn a_cycle_limit_resets_at_its_anchor_with_no_job_running() {
    let rig = Rig::new("2026-02-27T12:00:00Z");
    rig.plan("pro", r#"{"limits":[{"name":"monthly","measure":"events","period":"cycle","amount":"3"}]}"#).await;
    let sub = Subscription { plan: "pro".into(), cycle_start: Some(at("2026-01-31T23:30:00Z")) };
    rig.store.put_subscription("acme", &Subject::user("u"), &sub.view()).await.expect("subscribe");
    for _ in 0..3 {
        let r = rig.reserve("u", "{}").await;
        assert!(r.allowed);
        rig.commit(r.reservation_id.as_deref().unwrap_or_default(), "{}").await.expect("commit");
    }
    rig.count_metered().await;
    let denied = rig.reserve("u", "{}").await;
    assert!(!denied.allowed);
    assert_eq!(denied.limits[0].resets_at, "2026-02-28T23:30:00Z", "Jan 31 clamps to Feb 28, at the anchor's time of day");
    rig.set("2026-02-28T23:29:59Z");
    assert!(!rig.reserve("u", "{}").await.allowed, "one second before the anchor");
    rig.set("2026-02-28T23:30:00Z");
    let fresh = rig.reserve("u", "{}").await;
    assert!(fresh.allowed, "the new cycle starts at the anchor");
    assert_eq!((fresh.limits[0].period_start.as_str(), fresh.limits[0].resets_at.as_str()), ("2026-02-28T23:30:00Z", "2026-03-31T23:30:00Z"));
}

#[tokio::test]
async fn an_estimate_in_tokens_is_priced_and_the_actual_replaces_it() {
    let rig = Rig::new("2026-05-01T10:00:00Z");
    rig.plan("default", r#"{"limits":[{"name":"cost","measure":"cost_usd","period":"day","amount":"1"}]}"#).await;
    let r = rig.reserve("u", r#"{"input_tokens":1000,"output_tokens":1000}"#).await;
    assert!(r.allowed);
    assert_eq!(r.limits[0].reserved, "0.0125", "gpt-4o: 1000 in at $2.50/M plus 1000 out at $10/M");
    let id = r.reservation_id.unwrap_or_default();
    let first = rig.commit(&id, r#"{"cost_usd":"0.01"}"#).await.expect("commit");
    assert_eq!(first.limits[0].reserved, "0.01", "held at the actual until counted");
    let again = rig.commit(&id, r#"{"cost_usd":"0.01"}"#).await.expect("a retried commit answers the same");
    assert_eq!(again.idempotency_key, first.idempotency_key);
    assert_eq!(rig.meter.0.lock().map(|v| v.len()).unwrap_or(0), 2, "each retry is sent; the pipeline's dedupe keeps one");
    let conflict = rig.commit(&id, r#"{"cost_usd":"0.02"}"#).await.expect_err("different usage");
    assert_eq!(conflict.status.as_u16(), 409);
    rig.count_metered().await;
    let after = rig.limits.subject_limits("acme", &Subject::user("u"), None).await.expect("limits");
    assert_eq!((after.limits[0].used.as_str(), after.limits[0].reserved.as_str()), ("0.01", "0"), "counted once, the hold freed");
}

#[tokio::test]
async fn holds_expire_by_the_clock_and_release_frees_them() {
    let rig = Rig::new("2026-05-01T10:00:00Z");
    rig.plan("default", r#"{"limits":[{"name":"gens","measure":"events","period":"day","amount":"1"}]}"#).await;
    let body = r#"{"user_id":"u","feature":"chat","model":"m","ttl_secs":2}"#;
    assert!(rig.limits.reserve("acme", body).await.expect("reserve").allowed);
    assert!(!rig.limits.reserve("acme", body).await.expect("reserve").allowed, "held");
    rig.set("2026-05-01T10:00:02Z");
    let second = rig.limits.reserve("acme", body).await.expect("reserve");
    assert!(second.allowed, "the first hold expired");
    let id = second.reservation_id.unwrap_or_default();
    rig.limits.release("acme", &id).await.expect("release");
    rig.limits.release("acme", &id).await.expect("release is idempotent");
    assert!(rig.limits.reserve("acme", body).await.expect("reserve").allowed, "released room is free");
    let released_commit = rig.commit(&id, "{}").await.expect_err("a released reservation cannot be committed");
    assert_eq!(released_commit.status.as_u16(), 409);
}

#[tokio::test]
async fn commits_refuse_what_belongs_to_the_reservation_and_unknown_ids() {
    let rig = Rig::new("2026-05-01T10:00:00Z");
    let r = rig.reserve("u", "{}").await;
    assert!(r.allowed && r.limits.is_empty(), "no plan: everything is allowed, nothing is limited");
    let id = r.reservation_id.unwrap_or_default();
    let e = rig.commit(&id, r#"{"user_id":"other"}"#).await.expect_err("identity comes from the reservation");
    assert_eq!((e.status.as_u16(), e.field.as_deref()), (400, Some("user_id")));
    let e = rig.commit(&id, r#"{"cost_usd":"0.0000000001"}"#).await.expect_err("over-precise");
    assert_eq!((e.status.as_u16(), e.field.as_deref()), (400, Some("cost_usd")));
    let e = rig.limits.commit("globex", &id, "{}").await.expect_err("another tenant's reservation");
    assert_eq!(e.status.as_u16(), 404);
    let e = rig.commit("rsv_nope", "{}").await.expect_err("not an id");
    assert_eq!(e.status.as_u16(), 404);
    assert!(rig.meter.0.lock().map(|v| v.is_empty()).unwrap_or(false), "nothing refused was metered");
}

#[tokio::test]
async fn soft_limits_only_report_and_sub_limits_deny_their_model() {
    let rig = Rig::new("2026-05-01T10:00:00Z");
    rig.plan(
        "default",
        r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"month","amount":"5"},
            {"name":"premium","measure":"cost_usd","period":"month","amount":"1","filter":{"model":"gpt-4o"}},
            {"name":"heads-up","measure":"cost_usd","period":"month","amount":"0.5","hard":false}]}"#,
    )
    .await;
    let denied = rig.reserve("u", r#"{"cost_usd":"1.5"}"#).await;
    assert!(!denied.allowed);
    assert_eq!(denied.denied_by, vec!["premium".to_owned()], "the soft limit never denies");
    let other = rig.limits.reserve("acme", r#"{"user_id":"u","feature":"chat","model":"gpt-4o-mini","estimate":{"cost_usd":"1.5"}}"#).await.expect("reserve");
    assert!(other.allowed, "the premium sub-limit counts only its model");
    assert_eq!(other.limits.len(), 2);
}
