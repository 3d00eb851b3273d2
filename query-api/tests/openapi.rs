//! The OpenAPI document against the real router: every route is documented
//! (and nothing documented is missing), and every documented response shape
//! (200, 400, 401) validates the answer the running server gives. The store
//! is a fake that returns every kind of row, so each field is exercised.

use futures::future::BoxFuture;
use meterline_domain::{AlertRow, EventRow, SumRow};
use meterline_query_api::{AlertsQuery, AppState, Cursor, QueryError, QueryStore, SumsQuery, TopQuery};
use meterline_schemas::tenants::{KeyConfig, Scope as KeyScope, TenantConfig, hash_key};
use meterline_sql::Scope;
use serde_json::{Value, json};
use std::sync::Arc;

mod common;

use common::{FakeBilling, FakeExport, FakeStore, alert, event};

fn row(user: &str, customer: &str, bucket: u32) -> SumRow {
    SumRow {
        g_bucket: bucket,
        g_user: user.into(),
        g_customer: customer.into(),
        g_feature: "chat".into(),
        g_model: "gpt-4o".into(),
        s_events: 3,
        s_input: 10,
        s_output: 20,
        s_cached: 1,
        s_reasoning: 2,
        s_cost: 1_500_000_000,
        s_revenue: 1_000_000_001,
        s_credits: 7,
        s_unpriced: 1,
    }
}

/// Every kind of row, each field set somewhere: a metadata object and a
/// topic on one event only, an open alert and a resolved one.
fn fake() -> FakeStore {
    FakeStore {
        sums: vec![row("u1", "", 1_800_000_000), row("u2", "c", 1_800_003_600)],
        top: vec![row("u1", "", 0), row("u2", "c", 0)],
        events: vec![event("k1", "topic", "{\"a\":1}"), event("k2", "", ""), event("k3", "", "")],
        alerts: vec![alert("u", "open", 0), alert("u", "resolved", 1_800_000_200)],
    }
}

const READ_KEY: &str = "read-key-for-the-openapi-test";
const ADMIN_KEY: &str = "admin-key-for-the-openapi-test";

/// A status row with every optional field set (`api-c`) and one with none (`config-c`).
fn status() -> Vec<meterline_billing::StatusRow> {
    let row = |customer: &str, last: Option<&str>, error: Option<&str>| meterline_billing::StatusRow {
        event_name: "ai_cost".into(),
        customer_id: customer.into(),
        stripe_customer_id: "cus_Api".into(),
        last_window: last.map(str::to_owned),
        last_window_value: 7,
        total_pushed: 70,
        pending_windows: 1,
        pending_value: 3,
        refused_windows: 0,
        refused_value: 0,
        last_error: error.map(str::to_owned),
    };
    vec![row("api-c", Some("2026-01-01T10:00:00Z"), None), row("config-c", None, Some("No such customer: 'cus_C'"))]
}

/// The billing routes over [`FakeBilling`], with `config-c` mapped by config.
fn fake_billing(tenants: &[TenantConfig]) -> axum::Router {
    let config = meterline_billing::BillingConfig {
        tenants: vec![meterline_billing::TenantBilling {
            tenant: "acme".into(),
            subject: Default::default(),
            customers: [("config-c".to_owned(), "cus_C".to_owned())].into(),
            meters: vec![],
        }],
        ..Default::default()
    };
    let keys = meterline_schemas::tenants::KeyRing::from_config(tenants).expect("keys");
    meterline_billing::routes(Arc::new(meterline_billing::BillingApi::new(FakeBilling(status()), keys, config)))
}

async fn serve() -> String {
    let tenants = vec![TenantConfig {
        id: "acme".into(),
        keys: vec![
            KeyConfig { name: "read".into(), sha256: hash_key(READ_KEY), scopes: vec![KeyScope::Read] },
            KeyConfig { name: "admin".into(), sha256: hash_key(ADMIN_KEY), scopes: vec![KeyScope::Admin] },
        ],
        credit_price_usd: None,
        prices: Default::default(),
        webhook_secret: None,
        portal_secret: Some("portal-secret-0123456789".into()),
        portal_origins: vec!["https://app.acme.test".into()],
    }];
    let limits = meterline_query_api::limits::read_routes(common::FakeLimits, &tenants, Default::default()).expect("limits routes");
    let state = Arc::new(
        AppState::new(&tenants, Arc::new(fake()), 400).expect("state").with_export(Arc::new(FakeExport(vec![row("u1", "c", 0), row("u2", "d", 0)]))).with_billing(fake_billing(&tenants)).with_limits(limits),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, meterline_query_api::router(state)).await });
    url
}

fn document() -> Value {
    serde_json::from_str(meterline_query_api::OPENAPI).expect("openapi.json parses")
}

/// The schema documented for `path`'s `status` answer, with the document's
/// components beside it so that its `$ref`s resolve.
fn schema(doc: &Value, path: &str, status: &str) -> Value {
    let mut schema = doc["paths"][path]["get"]["responses"][status]["content"]["application/json"]["schema"].clone();
    assert!(schema.is_object(), "{path} documents no {status} answer");
    schema["components"] = doc["components"].clone();
    schema
}

#[test]
fn every_route_is_documented_and_every_documented_path_is_a_route() {
    let doc = document();
    let mut documented: Vec<&str> = doc["paths"].as_object().expect("paths").keys().map(String::as_str).collect();
    let mut routes = meterline_query_api::route_paths();
    documented.sort_unstable();
    routes.sort_unstable();
    assert_eq!(documented, routes);
}

#[tokio::test]
async fn every_documented_answer_validates_against_the_running_server() {
    let url = serve().await;
    let doc = document();
    let client = reqwest::Client::new();
    // A request answered 200 and one answered 400 for every route; each
    // route is also asked without a key (401).
    let asks = [
        ("/v1/usage", "/v1/usage?group_by=user_id,customer_id,feature,model&granularity=hour", "/v1/usage?granularity=week"),
        ("/v1/usage", "/v1/usage?granularity=total", "/v1/usage?group_by=planet"),
        ("/v1/top-spenders", "/v1/top-spenders?by=customer_id&metric=margin", "/v1/top-spenders?metric=vibes"),
        ("/v1/margins", "/v1/margins?group_by=user_id,model&negative_only=true", "/v1/margins?negative_only=maybe"),
        ("/v1/users/{user_id}/usage", "/v1/users/u/usage", "/v1/users/u/usage?user_id=v"),
        ("/v1/events", "/v1/events?user_id=u&limit=2", "/v1/events?user_id=u&cursor=zz"),
        ("/v1/alerts", "/v1/alerts?state=all", "/v1/alerts?rule=selfish"),
        // Cut answers (the fake has two rows of each): a cursor or `truncated`.
        ("/v1/usage", "/v1/usage?group_by=user_id&limit=1", "/v1/usage?cursor=zz"),
        ("/v1/top-spenders", "/v1/top-spenders?limit=1", "/v1/top-spenders?limit=1001"),
        ("/v1/margins", "/v1/margins?limit=1", "/v1/margins?limit=0"),
        ("/v1/alerts", "/v1/alerts?limit=1", "/v1/alerts?cursor=zz"),
        ("/v1/billing/export", "/v1/billing/export?from=2026-01-01T00:00:00Z&to=2027-02-01T00:00:00Z&measures=events,total_tokens,cost_usd,credits", "/v1/billing/export?from=2026-01-01T00:00:00Z"),
        // The limits' read routes (over the fake limits store).
        ("/v1/plans", "/v1/plans", ""),
        ("/v1/plans/{plan_id}", "/v1/plans/default", "/v1/plans/%01"),
        ("/v1/users/{user_id}/limits", "/v1/users/u1/limits", "/v1/users/u1/limits?customer=c"),
        ("/v1/customers/{customer_id}/limits", "/v1/customers/c/limits", "/v1/customers/%01/limits"),
        ("/v1/limits/nearest", "/v1/limits/nearest?limit=1", "/v1/limits/nearest?limit=501"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (path, ok, bad) in asks {
        seen.insert(path);
        // The export takes an admin key; a read key is refused (403).
        let key = if path == "/v1/billing/export" { ADMIN_KEY } else { READ_KEY };
        let mut cases = vec![(ok, Some(key), 200), (bad, Some(key), 400), (ok, None, 401)];
        // `GET /v1/plans` takes no parameter: it has no 400.
        cases.retain(|(query, _, _)| !query.is_empty());
        if key == ADMIN_KEY {
            cases.push((ok, Some(READ_KEY), 403));
        }
        for (query, key, status) in cases {
            let mut request = client.get(format!("{url}{query}"));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.expect("request");
            assert_eq!(response.status().as_u16(), status, "{query}");
            let body: Value = response.json().await.expect("JSON body");
            let validator = jsonschema::validator_for(&schema(&doc, path, &status.to_string())).expect("schema compiles");
            let errors: Vec<String> = validator.iter_errors(&body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
            assert!(errors.is_empty(), "{query} ({status}) does not match the document: {errors:?}\n{body}");
        }
    }
    // The billing routes (admin keys): each method and documented status.
    let long = format!("/v1/customers/{}/billing", "c".repeat(257));
    let (good, bad) = (json!({"stripe_customer_id": "cus_New"}), json!({"stripe_customer_id": "New"}));
    let billing = [
        ("/v1/customers/{customer_id}/billing", "get", "/v1/customers/api-c/billing".to_owned(), None, Some(ADMIN_KEY), 200),
        ("/v1/customers/{customer_id}/billing", "get", "/v1/customers/config-c/billing".to_owned(), None, Some(ADMIN_KEY), 200),
        ("/v1/customers/{customer_id}/billing", "get", "/v1/customers/nobody/billing".to_owned(), None, Some(ADMIN_KEY), 404),
        ("/v1/customers/{customer_id}/billing", "get", long.clone(), None, Some(ADMIN_KEY), 400),
        ("/v1/customers/{customer_id}/billing", "get", "/v1/customers/api-c/billing".to_owned(), None, None, 401),
        ("/v1/customers/{customer_id}/billing", "get", "/v1/customers/api-c/billing".to_owned(), None, Some(READ_KEY), 403),
        ("/v1/customers/{customer_id}/billing", "put", "/v1/customers/c/billing".to_owned(), Some(&good), Some(ADMIN_KEY), 200),
        ("/v1/customers/{customer_id}/billing", "put", "/v1/customers/c/billing".to_owned(), Some(&bad), Some(ADMIN_KEY), 400),
        ("/v1/customers/{customer_id}/billing", "put", long, Some(&good), Some(ADMIN_KEY), 400),
        ("/v1/customers/{customer_id}/billing", "put", "/v1/customers/c/billing".to_owned(), Some(&good), None, 401),
        ("/v1/customers/{customer_id}/billing", "put", "/v1/customers/c/billing".to_owned(), Some(&good), Some(READ_KEY), 403),
        ("/v1/billing/status", "get", "/v1/billing/status".to_owned(), None, Some(ADMIN_KEY), 200),
        ("/v1/billing/status", "get", "/v1/billing/status".to_owned(), None, None, 401),
        ("/v1/billing/status", "get", "/v1/billing/status".to_owned(), None, Some(READ_KEY), 403),
    ];
    for (path, method, query, body, key, status) in billing {
        seen.insert(path);
        let mut request = if method == "put" { client.put(format!("{url}{query}")) } else { client.get(format!("{url}{query}")) };
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), status, "{method} {query}");
        let answer: Value = response.json().await.expect("JSON body");
        let mut schema = doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]["schema"].clone();
        assert!(schema.is_object(), "{method} {path} documents no {status} answer");
        schema["components"] = doc["components"].clone();
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = validator.iter_errors(&answer).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        assert!(errors.is_empty(), "{method} {query} ({status}) does not match the document: {errors:?}\n{answer}");
    }
    // The portal: a token minted with the admin key reads /v1/portal/usage.
    let minted = client.post(format!("{url}/v1/portal/tokens")).bearer_auth(ADMIN_KEY).json(&json!({"user_id": "u"})).send().await.expect("mint");
    let minted: Value = minted.json().await.expect("json");
    let token = minted["token"].as_str().expect("token").to_owned();
    let portal = [
        ("/v1/portal/tokens", "post", "/v1/portal/tokens", Some(json!({"user_id": "u", "ttl_secs": 60})), Some(ADMIN_KEY), 200),
        ("/v1/portal/tokens", "post", "/v1/portal/tokens", Some(json!({"user_id": "u", "customer_id": "c"})), Some(ADMIN_KEY), 400),
        ("/v1/portal/tokens", "post", "/v1/portal/tokens", Some(json!({"user_id": "u"})), None, 401),
        ("/v1/portal/tokens", "post", "/v1/portal/tokens", Some(json!({"user_id": "u"})), Some(READ_KEY), 403),
        ("/v1/portal/usage", "get", "/v1/portal/usage", None, Some(token.as_str()), 200),
        ("/v1/portal/usage", "get", "/v1/portal/usage?user_id=v", None, Some(token.as_str()), 400),
        ("/v1/portal/usage", "get", "/v1/portal/usage", None, Some(READ_KEY), 401),
    ];
    for (path, method, query, body, key, status) in portal {
        seen.insert(path);
        let mut request = if method == "post" { client.post(format!("{url}{query}")) } else { client.get(format!("{url}{query}")) };
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), status, "{method} {query}");
        let answer: Value = response.json().await.expect("JSON body");
        let mut schema = doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]["schema"].clone();
        assert!(schema.is_object(), "{method} {path} documents no {status} answer");
        schema["components"] = doc["components"].clone();
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = validator.iter_errors(&answer).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        assert!(errors.is_empty(), "{method} {query} ({status}) does not match the document: {errors:?}\n{answer}");
    }
    assert_eq!(seen.len(), meterline_query_api::route_paths().len(), "every route asked");
    // The fake's rows carry every optional field both ways, so the answers
    // above exercised nulls and values alike.
    let body: Value = client.get(format!("{url}/v1/events?user_id=u&limit=2")).bearer_auth(READ_KEY).send().await.expect("request").json().await.expect("json");
    assert_eq!(body["events"][0]["kafka_partition"], json!(3));
    assert_eq!(body["events"][1]["kafka_partition"], Value::Null);
    assert!(body["next_cursor"].is_string());
    for (query, cut) in [("/v1/usage?limit=1", "next_cursor"), ("/v1/alerts?limit=1", "next_cursor"), ("/v1/top-spenders?limit=1", "truncated"), ("/v1/margins?limit=1", "truncated")] {
        let body: Value = client.get(format!("{url}{query}")).bearer_auth(READ_KEY).send().await.expect("request").json().await.expect("json");
        assert!(body[cut].is_string() || body[cut] == json!(true), "{query} says it is cut: {body}");
        let whole: Value = client.get(format!("{url}{query}0")).bearer_auth(READ_KEY).send().await.expect("request").json().await.expect("json");
        assert!(whole[cut].is_null() || whole[cut] == json!(false), "{query}0 is whole: {whole}");
    }
}

/// A store whose reads are refused: the tenant's cap for sums, ClickHouse's
/// time limit for rankings, its memory limit for the audit trail, and an
/// unreachable server for alerts.
#[derive(Debug)]
struct Refusing;

fn clickhouse_said(text: &str) -> QueryError {
    QueryError::ClickHouse(meterline_clickhouse::ClickHouseError::Client(clickhouse::error::Error::BadResponse(text.into())))
}

impl QueryStore for Refusing {
    fn sums<'a>(&'a self, _: &'a Scope, _: &'a SumsQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async { Err(QueryError::Overloaded { tenant: "acme".into(), permits: 4 }) })
    }
    fn top<'a>(&'a self, _: &'a Scope, _: TopQuery) -> BoxFuture<'a, Result<Vec<SumRow>, QueryError>> {
        Box::pin(async { Err(clickhouse_said("Code: 159, e.displayText() = DB::Exception: Timeout exceeded: elapsed 1.4 seconds, maximum: 1")) })
    }
    fn negative_count<'a>(&'a self, _: &'a Scope, _: &'a [&'static str]) -> BoxFuture<'a, Result<u64, QueryError>> {
        Box::pin(async { Ok(0) })
    }
    fn events<'a>(&'a self, _: &'a Scope, _: Option<&'a Cursor>, _: i64) -> BoxFuture<'a, Result<Vec<EventRow>, QueryError>> {
        Box::pin(async { Err(clickhouse_said("Code: 241. DB::Exception: Memory limit (for query) exceeded")) })
    }
    fn alerts<'a>(&'a self, _: &'a AlertsQuery) -> BoxFuture<'a, Result<Vec<AlertRow>, QueryError>> {
        Box::pin(async { Err(QueryError::ClickHouse(meterline_clickhouse::ClickHouseError::Client(clickhouse::error::Error::TimedOut))) })
    }
    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

#[tokio::test]
async fn refused_reads_answer_the_documented_503_naming_the_limit_with_retry_after() {
    // Through the config loader: the tenant's optional fields keep their defaults.
    let text = format!(
        "[clickhouse]\nurl = \"http://127.0.0.1:1\"\n[[tenants]]\nid = \"acme\"\n[[tenants.keys]]\nname = \"read\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
        hash_key(READ_KEY)
    );
    let tenants = meterline_query_api::Config::load(&text, []).expect("config").tenants;
    let state = Arc::new(AppState::new(&tenants, Arc::new(Refusing), 400).expect("state"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, meterline_query_api::router(state)).await });
    let doc = document();
    for (path, query, code, names) in [
        ("/v1/usage", "/v1/usage", "overloaded_tenant", "query.max_concurrent_per_tenant"),
        ("/v1/top-spenders", "/v1/top-spenders", "query_time_limit", "query.max_execution_secs"),
        ("/v1/events", "/v1/events?user_id=u", "query_memory_limit", "query.max_memory_bytes"),
        ("/v1/alerts", "/v1/alerts", "unavailable", "retry later"),
    ] {
        let response = reqwest::Client::new().get(format!("{url}{query}")).bearer_auth(READ_KEY).send().await.expect("request");
        assert_eq!(response.status().as_u16(), 503, "{query}");
        let retry_after: u32 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
        assert!(retry_after >= 1, "{query}");
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(body["error"]["code"], json!(code), "{query}: {body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(names), "{query}: {message}");
        // 5xx answers say nothing internal: no ClickHouse text reaches the client.
        assert!(!message.contains("DB::Exception"), "{query}: {message}");
        let validator = jsonschema::validator_for(&schema(&doc, path, "503")).expect("schema compiles");
        assert!(validator.is_valid(&body), "{query} (503) does not match the document: {body}");
        assert!(doc["paths"][path]["get"]["responses"]["503"]["headers"]["Retry-After"].is_object(), "{path} documents Retry-After");
        assert!(doc["paths"][path]["get"]["responses"]["503"]["description"].as_str().is_some_and(|d| d.contains(code)), "{path} documents {code}");
    }
    // No limits store configured: the limits' read routes say so, with the documented 404.
    for (path, query) in [("/v1/limits/nearest", "/v1/limits/nearest"), ("/v1/plans", "/v1/plans"), ("/v1/users/{user_id}/limits", "/v1/users/u/limits")] {
        let response = reqwest::Client::new().get(format!("{url}{query}")).bearer_auth(READ_KEY).send().await.expect("request");
        assert_eq!(response.status().as_u16(), 404, "{query}");
        let body: Value = response.json().await.expect("JSON body");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("limits.redis_url")), "{query}: {body}");
        let validator = jsonschema::validator_for(&schema(&doc, path, "404")).expect("schema compiles");
        assert!(validator.is_valid(&body), "{query} (404) does not match the document: {body}");
    }
}
