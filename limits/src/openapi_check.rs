//! `limits/openapi.json` against the real routes: every path in [`PATHS`]
//! is documented with exactly the methods [`routes`] serves, and every
//! documented answer (each operation's 200 and each error status it lists)
//! validates the body the running routes give, over the in-memory store.
//! Answers are closed (`additionalProperties: false`), and every documented
//! field is shown to be needed, so a field added to an answer type without
//! documenting it fails here, as does a documented field no answer carries.
//!
//! [`PATHS`]: crate::PATHS
//! [`routes`]: crate::routes

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use meterline_domain::{EventRow, Source, price};
use meterline_schemas::TimeBounds;
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::{KeyConfig, KeyRing, Scope as KeyScope, TenantConfig, hash_key};
use meterline_schemas::wire::Envelope;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

use crate::book::{Book, counts};
use crate::config::LimitsConfig;
use crate::error::LimitsError;
use crate::memory::MemoryStore;
use crate::plan::{Plan, PlanView};
use crate::reservation::{Hold, Refusal, Reservation};
use crate::service::{Clock, Limits, Meter};
use crate::status::Balance;
use crate::store::{Admission, Admit, LimitStore, Usage};
use crate::subject::{Subject, Subscription, SubscriptionView};

const OPENAPI: &str = include_str!("../openapi.json");
const TENANT: &str = "acme";
const ADMIN: &str = "limits-openapi-admin-key";
const INGEST: &str = "limits-openapi-ingest-key";
const READ: &str = "limits-openapi-read-key";
/// Every method a route could serve, for the "documented == served" check.
const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn document() -> Value {
    serde_json::from_str(OPENAPI).expect("limits/openapi.json parses")
}

/// The in-memory store, and a switch that makes every call fail as an unreachable store would.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    down: AtomicBool,
}

impl Flaky {
    fn up(&self) -> Result<(), LimitsError> {
        if self.down.load(Ordering::SeqCst) { Err(LimitsError::Unavailable { message: "down for the test".into(), source: None }) } else { Ok(()) }
    }
}

impl LimitStore for Flaky {
    async fn put_plan(&self, t: &str, p: &PlanView) -> Result<(), LimitsError> {
        self.up()?;
        self.inner.put_plan(t, p).await
    }
    async fn plans(&self, t: &str) -> Result<Vec<PlanView>, LimitsError> {
        self.up()?;
        self.inner.plans(t).await
    }
    async fn delete_plan(&self, t: &str, id: &str) -> Result<bool, LimitsError> {
        self.up()?;
        self.inner.delete_plan(t, id).await
    }
    async fn put_subscription(&self, t: &str, s: &Subject, v: &SubscriptionView) -> Result<(), LimitsError> {
        self.up()?;
        self.inner.put_subscription(t, s, v).await
    }
    async fn subscription(&self, t: &str, s: &Subject) -> Result<Option<SubscriptionView>, LimitsError> {
        self.up()?;
        self.inner.subscription(t, s).await
    }
    async fn delete_subscription(&self, t: &str, s: &Subject) -> Result<bool, LimitsError> {
        self.up()?;
        self.inner.delete_subscription(t, s).await
    }
    async fn usage(&self, t: &str) -> Result<Usage, LimitsError> {
        self.up()?;
        self.inner.usage(t).await
    }
    async fn balances(&self, t: &str, c: &[String], now: i64) -> Result<Vec<Balance>, LimitsError> {
        self.up()?;
        self.inner.balances(t, c, now).await
    }
    async fn admit(&self, t: &str, a: &Admit) -> Result<Admission, LimitsError> {
        self.up()?;
        self.inner.admit(t, a).await
    }
    async fn reservation(&self, t: &str, id: &str) -> Result<Option<Reservation>, LimitsError> {
        self.up()?;
        self.inner.reservation(t, id).await
    }
    async fn commit(&self, t: &str, id: &str, h: &[Hold], f: &str, now: i64) -> Result<Result<Reservation, Refusal>, LimitsError> {
        self.up()?;
        self.inner.commit(t, id, h, f, now).await
    }
    async fn release(&self, t: &str, id: &str, now: i64) -> Result<Result<Reservation, Refusal>, LimitsError> {
        self.up()?;
        self.inner.release(t, id, now).await
    }
}

/// Keeps what commits metered, or refuses it as an unacknowledging log would.
#[derive(Debug, Default)]
struct Recorded {
    events: Mutex<Vec<Envelope>>,
    fail: AtomicBool,
}

impl Meter for Recorded {
    fn meter(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), String>> {
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err("the log is down for the test".to_owned())));
        }
        if let Ok(mut all) = self.events.lock() {
            all.extend(events);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

fn keys() -> KeyRing {
    let key = |name: &str, key: &str, scope| KeyConfig { name: name.into(), sha256: hash_key(key), scopes: vec![scope] };
    KeyRing::from_config(&[TenantConfig {
        id: TENANT.into(),
        keys: vec![key("admin", ADMIN, KeyScope::Admin), key("ingest", INGEST, KeyScope::Ingest), key("read", READ, KeyScope::Read)],
        credit_price_usd: Some("0.01".into()),
        prices: BTreeMap::new(),
        webhook_secret: None,
        portal_secret: None,
        portal_origins: Vec::new(),
    }])
    .expect("keys")
}

struct Rig {
    app: Router,
    limits: Arc<Limits<Flaky>>,
    meter: Arc<Recorded>,
}

impl Rig {
    fn new() -> Rig {
        let meter = Arc::new(Recorded::default());
        let now = DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z").expect("time").with_timezone(&Utc);
        let clock: Clock = Arc::new(move || now);
        let limits = Limits::new(Flaky::default(), meter.clone(), keys(), TimeBounds::default(), LimitsConfig::default(), clock).expect("limits");
        let limits = Arc::new(limits);
        Rig { app: crate::routes(limits.clone()), limits, meter }
    }

    fn store_down(&self, down: bool) {
        self.limits.store().down.store(down, Ordering::SeqCst);
    }

    /// One request through the router: its status and its body as JSON (`null` when empty).
    async fn call(&self, method: &str, uri: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let mut request = Request::builder().method(Method::from_bytes(method.to_uppercase().as_bytes()).expect("method")).uri(uri);
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned()))).expect("request");
        let response = self.app.clone().oneshot(request).await.expect("the router answers");
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {uri}: not JSON ({e}): {bytes:?}")) };
        (status, value)
    }

    /// Counts every metered event not counted yet, as the aggregator would.
    async fn count_metered(&self) {
        let events: Vec<Envelope> = self.meter.events.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        let store = &self.limits.store().inner;
        let catalog = Catalog::builtin().expect("catalog");
        for envelope in events {
            let e = &envelope.event;
            let mut book = Book::default();
            for view in store.plans(TENANT).await.expect("plans") {
                book.plans.insert(view.plan_id.clone(), Plan::from_view(&view).expect("plan"));
            }
            let sub = |v: Option<SubscriptionView>| v.map(|v| Subscription::from_view(&v).expect("subscription"));
            book.user = sub(store.subscription(TENANT, &Subject::user(&e.user_id)).await.expect("subscription"));
            if let Some(c) = &e.customer_id {
                book.customer = sub(store.subscription(TENANT, &Subject::customer(c)).await.expect("subscription"));
            }
            let row = EventRow::new(&envelope, 0, price(e, None, &catalog), Source::Embedded, 0);
            let charges = counts(&book.applicable(&e.user_id, e.customer_id.as_deref()), &row);
            store.count(TENANT, &charges, &e.idempotency_key);
        }
    }
}

/// A schema of the document, with the document's components beside it so its `$ref`s resolve.
fn with_components(doc: &Value, schema: &Value, what: &str) -> jsonschema::Validator {
    assert!(schema.is_object(), "{what}: documents no schema");
    let mut schema = schema.clone();
    schema["components"] = doc["components"].clone();
    jsonschema::options().should_validate_formats(true).build(&schema).unwrap_or_else(|e| panic!("{what}: the schema does not compile: {e}"))
}

fn errors(validator: &jsonschema::Validator, body: &Value) -> Vec<String> {
    validator.iter_errors(body).map(|e| format!("{e} at {}", e.instance_path())).collect()
}

/// One answer seen: the operation, its status and its body.
#[derive(Debug, Clone)]
struct Seen {
    method: &'static str,
    path: &'static str,
    status: u16,
    body: Value,
}

/// Drives requests and checks each answer (and each 200's request body) against the document.
struct Checker {
    doc: Value,
    rig: Rig,
    seen: Vec<Seen>,
}

impl Checker {
    fn response_schema<'d>(doc: &'d Value, method: &str, path: &str, status: u16) -> &'d Value {
        &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]["schema"]
    }

    /// Sends one request to `path` (as `uri`), asserts its status and validates its answer.
    async fn ask(&mut self, method: &'static str, path: &'static str, uri: &str, key: Option<&str>, body: Option<&str>, status: u16) -> Value {
        let (got, answer) = self.rig.call(method, uri, key, body).await;
        assert_eq!(got, status, "{method} {uri} with {body:?}: {answer}");
        let what = format!("{method} {path} {status}");
        let validator = with_components(&self.doc, Self::response_schema(&self.doc, method, path, status), &what);
        let errs = errors(&validator, &answer);
        assert!(errs.is_empty(), "{method} {uri} ({status}) does not match the document: {errs:?}\n{answer}");
        if status == 200
            && let Some(body) = body
        {
            let request = &self.doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"];
            let validator = with_components(&self.doc, request, &format!("{method} {path} request"));
            let sent: Value = serde_json::from_str(body).expect("the test sends JSON");
            let errs = errors(&validator, &sent);
            assert!(errs.is_empty(), "{method} {path}: the request the routes took does not match the document: {errs:?}\n{sent}");
        }
        self.seen.push(Seen { method, path, status, body: answer.clone() });
        answer
    }
}

#[tokio::test]
async fn every_path_is_documented_with_exactly_the_methods_served() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<&str> = doc["paths"].as_object().expect("paths").keys().map(String::as_str).collect();
    let served: BTreeSet<&str> = crate::PATHS.into_iter().collect();
    assert_eq!(documented, served, "the document's paths are not crate::PATHS");
    assert_eq!(served.len(), crate::PATHS.len(), "PATHS holds no duplicate");

    let rig = Rig::new();
    for path in crate::PATHS {
        let uri = path.replace('{', "x").replace('}', "");
        let placeholders: BTreeSet<String> =
            path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).map(str::to_owned).collect();
        for method in METHODS {
            // Without a key, a served method answers 401 before anything else; one not served answers 405.
            let (status, _) = rig.call(method, &uri, None, None).await;
            let operation = &doc["paths"][path][method];
            assert_ne!(status, 404, "{method} {path}: the routes do not serve this path");
            assert_eq!(operation.is_object(), status != 405, "{method} {path}: documented != served (answered {status})");
            if !operation.is_object() {
                continue;
            }
            let in_path: BTreeSet<String> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().expect("parameter name").to_owned())
                .collect();
            assert_eq!(in_path, placeholders, "{method} {path}: path parameters");
            assert_eq!(operation["security"], json!([{ "bearer": [] }]), "{method} {path}: bearer auth");
            let description = operation["description"].as_str().unwrap_or_default();
            let scope = if path.starts_with("/v1/reservations") {
                "ingest"
            } else if path.ends_with("/limits") || path.starts_with("/v1/limits/") || (method == "get" && path.starts_with("/v1/plans")) {
                "read"
            } else {
                "admin"
            };
            assert!(description.contains(&format!("the {scope} scope")), "{method} {path}: the description names the key scope: {description}");
            assert!(operation["responses"]["200"].is_object(), "{method} {path}: documents its 200");
        }
    }
}

#[tokio::test]
async fn every_documented_answer_validates_against_the_running_routes() {
    let mut c = Checker { doc: document(), rig: Rig::new(), seen: Vec::new() };
    const PLANS: &str = "/v1/plans";
    const PLAN: &str = "/v1/plans/{plan_id}";
    const USER_SUB: &str = "/v1/users/{user_id}/subscription";
    const CUSTOMER_SUB: &str = "/v1/customers/{customer_id}/subscription";
    const RESERVE: &str = "/v1/reservations";
    const COMMIT: &str = "/v1/reservations/{reservation_id}/commit";
    const RELEASE: &str = "/v1/reservations/{reservation_id}/release";
    const USER_LIMITS: &str = "/v1/users/{user_id}/limits";
    const CUSTOMER_LIMITS: &str = "/v1/customers/{customer_id}/limits";
    const NEAREST: &str = "/v1/limits/nearest";
    let (admin, ingest, read) = (Some(ADMIN), Some(INGEST), Some(READ));

    // Plans: the default plan (soft cap, filtered hard limit) and a paid one with a customer-scope cycle limit.
    let default_plan = r#"{"limits":[
        {"name":"gens","measure":"events","period":"day","amount":2,"filter":{"feature":"chat"}},
        {"name":"cap","measure":"cost_usd","scope":"user","period":"month","amount":"5.5","hard":false,"notify_at":["0.8",1]}]}"#;
    let pro_plan = r#"{"limits":[
        {"name":"tokens","measure":"total_tokens","period":"day","amount":"100000","filter":{"model":"gpt-4o","environment":"production"}},
        {"name":"team","measure":"cost_usd","scope":"customer","period":"cycle","amount":"50"}]}"#;
    let put = c.ask("put", PLAN, "/v1/plans/default", admin, Some(default_plan), 200).await;
    assert_eq!(put["limits"][1]["amount"], "5.5");
    c.ask("put", PLAN, "/v1/plans/pro", admin, Some(pro_plan), 200).await;
    c.ask("put", PLAN, "/v1/plans/gone", admin, Some(r#"{"limits":[]}"#), 200).await;
    let list = c.ask("get", PLANS, "/v1/plans", admin, None, 200).await;
    assert_eq!(list["plans"].as_array().map(Vec::len), Some(3));
    c.ask("get", PLAN, "/v1/plans/pro", read, None, 200).await;
    let read_list = c.ask("get", PLANS, "/v1/plans", read, None, 200).await;
    assert_eq!(read_list, list, "a read key reads the plans an admin key does");

    // Subscriptions, with and without a cycle anchor.
    c.ask("put", USER_SUB, "/v1/users/u1/subscription", admin, Some(r#"{"plan":"pro","cycle_start":"2026-01-31T23:30:00Z"}"#), 200).await;
    c.ask("put", USER_SUB, "/v1/users/u3/subscription", admin, Some(r#"{"plan":"gone"}"#), 200).await;
    c.ask("put", CUSTOMER_SUB, "/v1/customers/c1/subscription", admin, Some(r#"{"plan":"pro"}"#), 200).await;
    c.ask("get", USER_SUB, "/v1/users/u1/subscription", admin, None, 200).await;
    c.ask("get", CUSTOMER_SUB, "/v1/customers/c1/subscription", admin, None, 200).await;

    // Reserve (new, replayed), commit, count; reserve again and release.
    let reserve = r#"{"user_id":"u1","customer_id":"c1","feature":"chat","model":"gpt-4o","provider":"openai","environment":"production",
        "estimate":{"input_tokens":1000,"output_tokens":"500"},"ttl_secs":60,"idempotency_key":"req-1"}"#;
    let first = c.ask("post", RESERVE, "/v1/reservations", ingest, Some(reserve), 200).await;
    assert_eq!((first["allowed"].clone(), first["replayed"].clone()), (json!(true), json!(false)), "{first}");
    let again = c.ask("post", RESERVE, "/v1/reservations", ingest, Some(reserve), 200).await;
    assert_eq!(again["replayed"], json!(true));
    let id = first["reservation_id"].as_str().expect("an id").to_owned();
    let commit = format!("/v1/reservations/{id}/commit");
    let usage = r#"{"input_tokens":900,"output_tokens":400,"cached_input_tokens":0,"reasoning_tokens":null,"cost_usd":"0.01","revenue_usd":0.02,
        "credits":null,"billable":true,"metadata":{"run":1}}"#;
    let settled = c.ask("post", COMMIT, &commit, ingest, Some(usage), 200).await;
    assert!(settled["idempotency_key"].is_string(), "a commit names its event: {settled}");
    c.rig.count_metered().await;
    let second = c.ask("post", RESERVE, "/v1/reservations", admin, Some(r#"{"user_id":"u1","customer_id":"c1","feature":"chat","model":"gpt-4o"}"#), 200).await;
    let release = format!("/v1/reservations/{}/release", second["reservation_id"].as_str().expect("an id"));
    let released = c.ask("post", RELEASE, &release, ingest, None, 200).await;
    assert!(released.get("idempotency_key").is_none() && released["state"] == "released", "{released}");

    // The default plan's two events a day for u2: used up (exhaustion now), then a denial.
    for _ in 0..2 {
        let r = c.ask("post", RESERVE, "/v1/reservations", ingest, Some(r#"{"user_id":"u2","feature":"chat","model":"gpt-4o-mini"}"#), 200).await;
        let uri = format!("/v1/reservations/{}/commit", r["reservation_id"].as_str().expect("an id"));
        c.ask("post", COMMIT, &uri, ingest, None, 200).await;
    }
    c.rig.count_metered().await;
    let denied = c.ask("post", RESERVE, "/v1/reservations", ingest, Some(r#"{"user_id":"u2","feature":"chat","model":"gpt-4o-mini"}"#), 200).await;
    assert_eq!((denied["allowed"].clone(), denied["denied_by"].clone(), denied["reservation_id"].clone()), (json!(false), json!(["gens"]), Value::Null));

    // Balances: with and without a subscription, a customer, a projection.
    let mine = c.ask("get", USER_LIMITS, "/v1/users/u1/limits?customer_id=c1", read, None, 200).await;
    assert!(mine["subscription"].is_object() && mine["limits"].as_array().is_some_and(|l| l.len() == 2), "{mine}");
    let u2 = c.ask("get", USER_LIMITS, "/v1/users/u2/limits", read, None, 200).await;
    assert!(u2["subscription"].is_null() && u2["limits"][0]["projected_exhaustion_at"].is_string(), "{u2}");
    c.ask("get", CUSTOMER_LIMITS, "/v1/customers/c1/limits", read, None, 200).await;
    let nearest = c.ask("get", NEAREST, "/v1/limits/nearest?limit=5&name=gens", read, None, 200).await;
    assert_eq!((nearest["subjects"][0]["subject_id"].clone(), nearest["subjects"][0]["ratio"].clone()), (json!("u2"), json!("1")), "{nearest}");
    let all = c.ask("get", NEAREST, "/v1/limits/nearest", read, None, 200).await;
    assert!(all["subjects"].as_array().is_some_and(|s| s.len() >= 2), "{all}");

    // 400s: each refusal names its field.
    let bad_id = "%01";
    for (method, path, uri, body) in [
        ("put", PLAN, "/v1/plans/p".to_owned(), r#"{"limits":[{"name":"a","measure":"events","period":"day","amount":"1.5"}]}"#),
        ("put", PLAN, format!("/v1/plans/{bad_id}"), r#"{"limits":[]}"#),
        ("get", PLAN, format!("/v1/plans/{bad_id}"), ""),
        ("delete", PLAN, format!("/v1/plans/{bad_id}"), ""),
        ("put", USER_SUB, "/v1/users/u1/subscription".to_owned(), r#"{"plan":"nope"}"#),
        ("get", USER_SUB, format!("/v1/users/{bad_id}/subscription"), ""),
        ("delete", USER_SUB, format!("/v1/users/{bad_id}/subscription"), ""),
        ("put", CUSTOMER_SUB, "/v1/customers/c1/subscription".to_owned(), r#"{"plan":"pro","cycle_start":"yesterday"}"#),
        ("get", CUSTOMER_SUB, format!("/v1/customers/{bad_id}/subscription"), ""),
        ("delete", CUSTOMER_SUB, format!("/v1/customers/{bad_id}/subscription"), ""),
        ("post", RESERVE, "/v1/reservations".to_owned(), r#"{"feature":"chat","model":"gpt-4o"}"#),
        ("post", COMMIT, commit.clone(), r#"{"user_id":"someone-else"}"#),
        ("get", USER_LIMITS, "/v1/users/u1/limits?customer=c1".to_owned(), ""),
        ("get", CUSTOMER_LIMITS, format!("/v1/customers/{bad_id}/limits"), ""),
        ("get", NEAREST, "/v1/limits/nearest?limit=501".to_owned(), ""),
        ("get", NEAREST, "/v1/limits/nearest?limit=0".to_owned(), ""),
    ] {
        let key = if path == RESERVE || path == COMMIT { ingest } else if path.ends_with("/limits") || path == NEAREST { read } else { admin };
        let e = c.ask(method, path, &uri, key, (!body.is_empty()).then_some(body), 400).await;
        assert!(e["error"]["field"].is_string(), "{method} {uri}: a 400 names its field: {e}");
    }

    // 404s and 409s.
    c.ask("get", PLAN, "/v1/plans/nope", admin, None, 404).await;
    c.ask("delete", PLAN, "/v1/plans/nope", admin, None, 404).await;
    for (path, uri) in [(USER_SUB, "/v1/users/u2/subscription"), (CUSTOMER_SUB, "/v1/customers/c2/subscription")] {
        c.ask("get", path, uri, admin, None, 404).await;
        c.ask("delete", path, uri, admin, None, 404).await;
    }
    c.ask("post", COMMIT, "/v1/reservations/rsv_nope/commit", ingest, None, 404).await;
    c.ask("post", RELEASE, "/v1/reservations/rsv_nope/release", ingest, None, 404).await;
    c.ask("post", COMMIT, &release.replace("/release", "/commit"), ingest, None, 409).await;
    c.ask("post", RELEASE, &commit.replace("/commit", "/release"), ingest, None, 409).await;

    // 401 without a key or with an unknown one, 403 with a key lacking the scope, on every operation.
    let doc = c.doc.clone();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let path: &'static str = crate::PATHS.into_iter().find(|p| p == path).expect("a served path");
        let uri = path.replace('{', "x").replace('}', "");
        for method in METHODS.into_iter().filter(|m| item[*m].is_object()) {
            c.ask(method, path, &uri, None, None, 401).await;
            c.ask(method, path, &uri, Some("not-a-key"), None, 401).await;
            let read_scope = path.ends_with("/limits") || path.starts_with("/v1/limits/") || (method == "get" && path.starts_with("/v1/plans"));
            let lacking = if read_scope { INGEST } else { READ };
            c.ask(method, path, &uri, Some(lacking), None, 403).await;
        }
    }

    // The store unreachable: admin and read routes answer 503; a reservation is degraded, never refused by the outage.
    c.rig.store_down(true);
    let degraded = c.ask("post", RESERVE, "/v1/reservations", ingest, Some(r#"{"user_id":"u9","feature":"chat","model":"gpt-4o"}"#), 200).await;
    assert_eq!((degraded["degraded"].clone(), degraded["allowed"].clone()), (json!(true), json!(true)), "on_store_error defaults to allow");
    let held = format!("/v1/reservations/{}", degraded["reservation_id"].as_str().expect("an id"));
    let late = c.ask("post", COMMIT, &format!("{held}/commit"), ingest, Some("{}"), 200).await;
    assert_eq!(late["degraded"], json!(true), "the usage is metered; it counts when the store is back");
    c.ask("post", RELEASE, &format!("{held}/release"), ingest, None, 503).await;
    c.ask("get", PLANS, "/v1/plans", admin, None, 503).await;
    for verb in ["put", "get", "delete"] {
        let body = (verb == "put").then_some(r#"{"limits":[]}"#);
        c.ask(verb, PLAN, "/v1/plans/p", admin, body, 503).await;
        let body = (verb == "put").then_some(r#"{"plan":"pro"}"#);
        c.ask(verb, USER_SUB, "/v1/users/u1/subscription", admin, body, 503).await;
        c.ask(verb, CUSTOMER_SUB, "/v1/customers/c1/subscription", admin, body, 503).await;
    }
    c.ask("get", USER_LIMITS, "/v1/users/u1/limits", read, None, 503).await;
    c.ask("get", CUSTOMER_LIMITS, "/v1/customers/c1/limits", read, None, 503).await;
    c.ask("get", NEAREST, "/v1/limits/nearest", read, None, 503).await;
    c.rig.store_down(false);
    // The event log not acknowledging a commit.
    c.rig.meter.fail.store(true, Ordering::SeqCst);
    let r = c.ask("post", RESERVE, "/v1/reservations", ingest, Some(r#"{"user_id":"u9","feature":"chat","model":"gpt-4o"}"#), 200).await;
    c.ask("post", COMMIT, &format!("/v1/reservations/{}/commit", r["reservation_id"].as_str().expect("an id")), ingest, None, 503).await;
    c.rig.meter.fail.store(false, Ordering::SeqCst);

    // Deletions last.
    c.ask("delete", USER_SUB, "/v1/users/u1/subscription", admin, None, 200).await;
    c.ask("delete", CUSTOMER_SUB, "/v1/customers/c1/subscription", admin, None, 200).await;
    c.ask("delete", PLAN, "/v1/plans/gone", admin, None, 200).await;

    // Every documented answer of every operation was asked for and validated.
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS.into_iter().filter(|m| item[*m].is_object()) {
            for status in item[method]["responses"].as_object().expect("responses").keys() {
                documented.insert((method.to_owned(), path.clone(), status.clone()));
            }
        }
    }
    let asked: BTreeSet<(String, String, String)> = c.seen.iter().map(|s| (s.method.to_owned(), s.path.to_owned(), s.status.to_string())).collect();
    let missing: Vec<_> = documented.difference(&asked).collect();
    assert!(missing.is_empty(), "documented answers never exercised: {missing:?}");
    let undocumented: Vec<_> = asked.difference(&documented).collect();
    assert!(undocumented.is_empty(), "answers given but not documented: {undocumented:?}");

    every_documented_field_is_needed(&doc, &c.seen);
}

/// Each property of each 200 schema, removed from the document, makes some
/// answer seen fail: the answers are closed (an undocumented field fails) and
/// no documented field is one no answer carries.
fn every_documented_field_is_needed(doc: &Value, seen: &[Seen]) {
    let oks: Vec<&Seen> = seen.iter().filter(|s| s.status == 200).collect();
    let mut schemas: BTreeSet<String> = BTreeSet::new();
    for s in &oks {
        let schema = Checker::response_schema(doc, s.method, s.path, 200);
        let name = schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")).expect("200 schemas are named components");
        schemas.insert(name.to_owned());
    }
    // The components the answers nest, closed too.
    schemas.extend(["LimitStatus", "Limit", "Filter", "Subscription"].map(str::to_owned));
    for name in &schemas {
        let component = &doc["components"]["schemas"][name];
        assert_eq!(component["additionalProperties"], json!(false), "{name} is closed");
        for property in component["properties"].as_object().expect("properties").keys() {
            let mut cut = doc.clone();
            let target = &mut cut["components"]["schemas"][name];
            target["properties"].as_object_mut().expect("properties").remove(property);
            if let Some(required) = target["required"].as_array_mut() {
                required.retain(|r| r != property);
            }
            let fails = oks.iter().any(|s| {
                let validator = with_components(&cut, Checker::response_schema(&cut, s.method, s.path, 200), "cut");
                !validator.is_valid(&s.body)
            });
            assert!(fails, "{name}.{property}: no answer fails without it documented (not closed, or never answered)");
        }
    }
}
