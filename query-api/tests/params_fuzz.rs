//! Property tests over every query endpoint's parameters, against the real
//! router in-process over a fake store (which always answers): arbitrary
//! query strings (the routes' real parameter names and junk, values from
//! valid to absurd, repeated keys, percent-encoding edge cases) and arbitrary
//! path ids. Whatever comes in: no panic, no 5xx, and every 4xx is the error
//! body `{"error": {"code", "message", "field"}}`; a 400 names its field,
//! which is one of the route's parameters documented in `openapi.json` or the
//! unknown parameter the request sent.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use meterline_domain::{EventRow, SumRow};
use meterline_query_api::AppState;
use meterline_schemas::tenants::{TenantConfig, hash_key};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

mod common;

use common::{FakeBilling, FakeExport, FakeStore, alert};

const READ_KEY: &str = "read-key-for-the-params-fuzz";
const ADMIN_KEY: &str = "admin-key-for-the-params-fuzz";
/// CI runs the same cases every time; `METERLINE_FUZZ_SEED=<u64>` explores others.
const SEED: u64 = 0x6d65_7465_726c_696e;

fn seed() -> u64 {
    std::env::var("METERLINE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED)
}
const CASES: u32 = 256;

fn row(user: &str, bucket: u32) -> SumRow {
    SumRow { g_bucket: bucket, g_user: user.into(), g_customer: "c".into(), g_feature: "chat".into(), g_model: "gpt-4o".into(), s_events: 2, s_cost: 5, s_revenue: 3, ..SumRow::default() }
}

/// The shared event with only the columns every row has.
fn event(key: &str) -> EventRow {
    EventRow { provider: String::new(), cached_input_tokens: 0, reasoning_tokens: 0, revenue_nanos: 0, kafka_partition: 0, kafka_offset: 0, ..common::event(key, "", "") }
}

/// Two rows of everything, so that a `limit=1` cuts and hands out a cursor.
fn fake() -> FakeStore {
    FakeStore {
        sums: vec![row("u1", 1_800_000_000), row("u2", 1_800_003_600)],
        top: vec![row("u1", 0), row("u2", 0)],
        events: vec![event("k1"), event("k2")],
        alerts: vec![alert("u1", "open", 0), alert("u2", "open", 0)],
    }
}

fn router() -> axum::Router {
    static ROUTER: OnceLock<axum::Router> = OnceLock::new();
    ROUTER
        .get_or_init(|| {
            // From its config form, so that fields added with defaults need no change here.
            let tenant = serde_json::json!({"id": "acme", "keys": [
                {"name": "read", "sha256": hash_key(READ_KEY), "scopes": ["read"]},
                {"name": "admin", "sha256": hash_key(ADMIN_KEY), "scopes": ["admin"]},
            ]});
            let tenants: Vec<TenantConfig> = vec![serde_json::from_value(tenant).expect("tenant config")];
            let keys = meterline_schemas::tenants::KeyRing::from_config(&tenants).expect("keys");
            let billing = meterline_billing::routes(Arc::new(meterline_billing::BillingApi::new(FakeBilling(Vec::new()), keys, Default::default())));
            let limits = meterline_query_api::limits::read_routes(common::FakeLimits, &tenants, Default::default()).expect("limits routes");
            let state = AppState::new(&tenants, Arc::new(fake()), 400).expect("state").with_export(Arc::new(FakeExport(vec![row("u1", 0), row("u2", 0)]))).with_billing(billing).with_limits(limits);
            meterline_query_api::router(Arc::new(state))
        })
        .clone()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime"))
}

/// The parameters `openapi.json` documents for `method` `path`.
fn documented(path: &str, method: &str) -> BTreeSet<String> {
    static DOC: OnceLock<Value> = OnceLock::new();
    let doc = DOC.get_or_init(|| serde_json::from_str(meterline_query_api::OPENAPI).expect("openapi.json parses"));
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is documented");
    op["parameters"].as_array().map(|ps| ps.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

// ---- generators -----------------------------------------------------------

/// Every parameter name any route takes, and a few near misses.
const NAMES: &[&str] = &[
    "from", "to", "user_id", "customer_id", "feature", "model", "environment", "billable", "group_by", "granularity", "limit", "cursor", "by", "metric",
    "order", "negative_only", "state", "rule", "measures", "format", "form", "name", "Limit", "user_id[]", "limit ", "",
];

fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z_]{1,12}",
        ".{0,12}",
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
        Just("x".repeat(300)),
        Just("\u{0}\u{7f}\u{202e}é漢🦀".to_owned()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => proptest::sample::select(NAMES).prop_map(str::to_owned), 1 => junk()]
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..=1_001).prop_map(|n| n.to_string()),
        proptest::sample::select(&[
            "0", "-1", "1", "1000", "1001", "10000", "100000", "100001", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
            "99999999999999999999999999", "+5", " 5", "5 ", "1e3", "1.5", "0x10", "٣",
        ][..])
        .prop_map(str::to_owned),
    ]
}

fn time() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(&[
            "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2025-01-01T00:00:00Z", "0000-01-01T00:00:00Z", "0000-01-31T00:00:00Z", "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999999999-23:59", "0000-01-01T00:00:00+23:59", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z", "2026-01-01", "yesterday", "2026-01-01T00:00:60Z", "2016-12-31T23:59:60Z", "2026-01-01t00:00:00z",
        ][..])
        .prop_map(str::to_owned),
        // Anywhere chrono can represent, as RFC 3339.
        (-62_135_596_800i64..=253_402_300_799).prop_map(|s| chrono::DateTime::from_timestamp(s, 0).map(|t| t.to_rfc3339()).unwrap_or_default()),
        (1_700_000_000i64..=1_900_000_000).prop_map(|s| chrono::DateTime::from_timestamp(s, 0).map(|t| t.to_rfc3339()).unwrap_or_default()),
    ]
}

/// Cursors: junk, hex of junk, and hex of the documented shapes with arbitrary fields.
fn cursor() -> impl Strategy<Value = String> {
    let g = proptest::sample::select(&["minute", "hour", "day", "month", "total", "week", ""][..]);
    let groups = proptest::sample::select(&["", "user_id", "user_id,model", "model,user_id", "planet"][..]);
    prop_oneof![
        junk(),
        junk().prop_map(|s| hex_of(&s)),
        (g, groups, number(), junk(), junk(), junk(), junk())
            .prop_map(|(g, gr, b, u, c, f, m)| hex_of(&format!("{g}:{gr}:{b}:{}:{}:{}:{}", hex_of(&u), hex_of(&c), hex_of(&f), hex_of(&m)))),
        (number(), number(), junk()).prop_map(|(s, n, k)| hex_of(&format!("{s}:{n}:{k}"))),
        (number(), junk(), junk()).prop_map(|(o, u, r)| hex_of(&format!("{o}:{}:{}", hex_of(&u), hex_of(&r)))),
        (number(), junk(), junk()).prop_map(|(o, u, r)| hex_of(&format!("{o}:{u}:{r}"))),
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => time(),
        2 => number(),
        2 => cursor(),
        3 => proptest::sample::select(&[
            "user_id", "customer_id", "feature", "model", "user_id,model", "user_id,user_id", ",,,", " user_id , model ", "planet", "minute", "hour", "day",
            "month", "total", "week", "cost", "tokens", "revenue", "margin", "asc", "desc", "true", "false", "TRUE", "1", "open", "resolved", "all", "peers",
            "selfish", "customer", "user", "json", "csv", "xml", "events,total_tokens,cost_usd,credits", "events,,", "", "u", "acme",
        ][..])
        .prop_map(str::to_owned),
        2 => junk(),
    ]
}

/// One byte of a query component, encoded one of the ways a client might.
fn encode(text: &str, style: &[u8]) -> String {
    let mut out = String::new();
    for (i, b) in text.bytes().enumerate() {
        let pick = style.get(i % style.len().max(1)).copied().unwrap_or(0) % 3;
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' if pick != 0 => out.push(char::from(b)),
            b' ' if pick == 1 => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What `application/x-www-form-urlencoded` decoding makes of a component:
/// `+` is a space, `%XX` a byte, anything else itself; lossy UTF-8.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match (char::from(bytes[i + 1]).to_digit(16), char::from(bytes[i + 2]).to_digit(16)) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw piece of a query string: a pair encoded some way, or one of the
/// malformed shapes a client or an attacker sends.
#[derive(Debug, Clone)]
enum Piece {
    Pair(String, String, Vec<u8>),
    Raw(&'static str),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        8 => (key(), value(), proptest::collection::vec(any::<u8>(), 1..4)).prop_map(|(k, v, s)| Piece::Pair(k, v, s)),
        1 => proptest::sample::select(&[
            "", "=", "==", "limit", "limit=", "=5", "%", "%G1", "%FF", "limit=%", "limit=%ZZ", "limit=%FF%FE", "user_id=%C0%AF", "user_id=%00", "%E2%80%AE=1",
            "limit=1&limit=2", "from=2026-01-01T00:00:00Z&from=", "&&&", "user_id=a&user_id=", "cursor=%2", "to=2026-01-01T00:00:00%2B01:00", "to=2026-01-01T00:00:00+01:00",
            ";", "a;b=c", "limit=5#frag",
        ][..])
        .prop_map(Piece::Raw),
    ]
}

/// The query string of `pieces` and the decoded keys it sends.
fn query_of(pieces: &[Piece]) -> (String, BTreeSet<String>) {
    let mut keys = BTreeSet::new();
    let parts: Vec<String> = pieces
        .iter()
        .map(|p| match p {
            Piece::Pair(k, v, style) => {
                keys.insert(k.clone());
                format!("{}={}", encode(k, style), encode(v, style))
            }
            Piece::Raw(raw) => {
                for pair in raw.split('&').filter(|p| !p.is_empty()) {
                    let k = pair.split_once('=').map_or(pair, |(k, _)| k);
                    keys.insert(decode(k));
                }
                (*raw).to_owned()
            }
        })
        .collect();
    (parts.join("&"), keys)
}

fn query() -> impl Strategy<Value = Vec<Piece>> {
    proptest::collection::vec(piece(), 0..7)
}

/// A path segment: an arbitrary id, encoded some way, or a malformed one.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (junk(), proptest::collection::vec(any::<u8>(), 1..4)).prop_map(|(id, s)| encode(&id, &s)),
        1 => proptest::sample::select(&["u", "api-c", "%FF", "%C0%AF", "%2F", "%00", "%", "%G1", "a%2Fb", "..", ".", "%20", "+", "%E2%80%AE"][..]).prop_map(str::to_owned),
        1 => Just("c".repeat(257)),
        1 => Just("%C3%A9".repeat(129)),
    ]
}

// ---- the checks ------------------------------------------------------------

/// What one request got back.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

fn send(method: Method, uri: &str, key: &str, body: Option<&str>) -> Result<Answer, TestCaseError> {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())));
    // A URI the client could not even send is not the server's to answer.
    let Ok(request) = request else { return Err(TestCaseError::reject("not a URI")) };
    let uri = uri.to_owned();
    // Spawned, so the request's future lives on the heap as in a server
    // (not on the test thread's stack), and a panic in a handler is caught
    // here as a failed case rather than tearing the test down unshrunk.
    let answer = runtime().spawn(async move {
        let response = router().oneshot(request).await.map_err(|e| TestCaseError::fail(format!("{uri}: {e}")))?;
        let status = response.status();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let body = axum::body::to_bytes(response.into_body(), 64 << 20).await.map_err(|e| TestCaseError::fail(format!("{uri}: body: {e}")))?;
        Ok(Answer { status, content_type, body: body.to_vec() })
    });
    runtime().block_on(answer).map_err(|e| TestCaseError::fail(format!("the handler panicked: {e}")))?
}

/// The properties every answer keeps: no 5xx; a 200 is JSON (or the
/// export's CSV); an error is the error body, a 400 naming a documented
/// parameter of `doc_path` or one of the `sent` keys it does not know.
fn check(uri: &str, answer: &Answer, doc_path: &str, method: &str, sent: &BTreeSet<String>) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(&answer.body);
    prop_assert!(!answer.status.is_server_error(), "{method} {uri}: {} {text}", answer.status);
    if answer.status.is_success() {
        if answer.content_type.starts_with("text/csv") {
            return Ok(());
        }
        prop_assert!(serde_json::from_slice::<Value>(&answer.body).is_ok(), "{method} {uri}: 2xx not JSON: {text}");
        return Ok(());
    }
    prop_assert!(answer.status.is_client_error(), "{method} {uri}: {} {text}", answer.status);
    prop_assert!(answer.content_type.starts_with("application/json"), "{method} {uri}: {} as {:?}, not the JSON error body: {text}", answer.status, answer.content_type);
    let body: Value = serde_json::from_slice(&answer.body).map_err(|e| TestCaseError::fail(format!("{method} {uri}: {e}: {text}")))?;
    let error = &body["error"];
    prop_assert!(error["code"].as_str().is_some_and(|c| !c.is_empty()), "{method} {uri}: no code: {body}");
    prop_assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {uri}: no message: {body}");
    prop_assert!(error.get("field").is_some_and(|f| f.is_null() || f.is_string()), "{method} {uri}: field neither null nor a string: {body}");
    let field = error["field"].as_str();
    match answer.status {
        StatusCode::BAD_REQUEST => {
            let Some(field) = field else { return Err(TestCaseError::fail(format!("{method} {uri}: a 400 names no field: {body}"))) };
            let mut known = documented(doc_path, method);
            // A body's refusal names the body or its field.
            if method == "put" {
                known.extend(["body".to_owned(), "stripe_customer_id".to_owned()]);
            }
            if method == "post" {
                known.extend(["body", "user_id", "customer_id", "ttl_secs", "portal_secret"].map(str::to_owned));
            }
            prop_assert!(
                known.contains(field) || (sent.contains(field) && error["message"].as_str().is_some_and(|m| m.contains("unknown parameter") || m.contains("alerts are per user"))),
                "{method} {uri}: field {field:?} is neither a documented parameter ({known:?}) nor an unknown one sent ({sent:?}): {body}"
            );
        }
        StatusCode::UNAUTHORIZED => prop_assert_eq!(field, Some("Authorization"), "{} {}: {}", method, uri, body),
        StatusCode::NOT_FOUND => {
            // A route's own 404 (no such customer mapping) names the path's id; the fallback names nothing.
            prop_assert!(field.is_none() || documented(doc_path, method).contains(field.unwrap_or_default()), "{method} {uri}: {body}");
        }
        _ => {}
    }
    Ok(())
}

/// Runs `test` on `CASES` values of `strategy`, on a thread with room to
/// shrink: the generators' value trees nest deep, and shrinking them in a
/// debug build outgrows a test thread's 2 MiB stack.
fn run<S: Strategy + Send + 'static>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError> + Send + 'static) {
    let outcome = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let mut runner = TestRunner::new(RunnerConfig { cases: CASES, max_global_rejects: CASES * 4, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(seed()), ..RunnerConfig::default() });
            runner.run(&strategy, test).map_err(|e| e.to_string())
        })
        .expect("thread")
        .join()
        .expect("the runner does not panic");
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// One flat route (`path` has no id) asked with any query string.
fn fuzz_flat(path: &'static str, key: &'static str) {
    run(query(), move |pieces| {
        let (q, sent) = query_of(&pieces);
        let uri = if q.is_empty() { path.to_owned() } else { format!("{path}?{q}") };
        let answer = send(Method::GET, &uri, key, None)?;
        check(&uri, &answer, path, "get", &sent)
    });
}

#[test]
fn usage_parameters() {
    fuzz_flat("/v1/usage", READ_KEY);
}

#[test]
fn top_spenders_parameters() {
    fuzz_flat("/v1/top-spenders", READ_KEY);
}

#[test]
fn margins_parameters() {
    fuzz_flat("/v1/margins", READ_KEY);
}

#[test]
fn events_parameters() {
    fuzz_flat("/v1/events", READ_KEY);
}

#[test]
fn alerts_parameters() {
    fuzz_flat("/v1/alerts", READ_KEY);
}

#[test]
fn billing_export_parameters() {
    fuzz_flat("/v1/billing/export", ADMIN_KEY);
}

#[test]
fn billing_status_parameters() {
    fuzz_flat("/v1/billing/status", ADMIN_KEY);
}

#[test]
fn user_statement_path_and_parameters() {
    run((segment(), query()), |(id, pieces)| {
        let (q, sent) = query_of(&pieces);
        let uri = format!("/v1/users/{id}/usage{}", if q.is_empty() { String::new() } else { format!("?{q}") });
        let answer = send(Method::GET, &uri, READ_KEY, None)?;
        check(&uri, &answer, "/v1/users/{user_id}/usage", "get", &sent)
    });
}

#[test]
fn billing_mapping_path_ids() {
    let body = proptest::sample::select(&[r#"{"stripe_customer_id": "cus_New"}"#, r#"{"stripe_customer_id": "New"}"#, "{}", "", "[", r#"{"stripe_customer_id": "cus_A", "x": 1}"#][..]);
    run((segment(), query(), any::<bool>(), body), |(id, pieces, put, body)| {
        let (q, sent) = query_of(&pieces);
        let uri = format!("/v1/customers/{id}/billing{}", if q.is_empty() { String::new() } else { format!("?{q}") });
        let (method, name) = if put { (Method::PUT, "put") } else { (Method::GET, "get") };
        let answer = send(method, &uri, ADMIN_KEY, put.then_some(body))?;
        check(&uri, &answer, "/v1/customers/{customer_id}/billing", name, &sent)
    });
}

#[test]
fn portal_usage_tokens_and_parameters() {
    // Arbitrary bearer text where a portal token belongs: never a 5xx, an
    // error body naming Authorization or the parameter.
    run((junk(), query()), |(token, pieces)| {
        let (q, sent) = query_of(&pieces);
        let uri = if q.is_empty() { "/v1/portal/usage".to_owned() } else { format!("/v1/portal/usage?{q}") };
        let answer = send(Method::GET, &uri, &token, None)?;
        check(&uri, &answer, "/v1/portal/usage", "get", &sent)
    });
}

#[test]
fn portal_token_bodies() {
    let body = proptest::sample::select(
        &[
            r#"{"user_id": "u-1"}"#,
            r#"{"customer_id": "c-1", "ttl_secs": 60}"#,
            r#"{"user_id": "u-1", "customer_id": "c-1"}"#,
            r#"{"ttl_secs": -1}"#,
            r#"{"user_id": "", "ttl_secs": 99999999999}"#,
            r#"{"user_id": 7}"#,
            "{}",
            "",
            "[",
        ][..],
    );
    run((query(), body), |(pieces, body)| {
        let (q, sent) = query_of(&pieces);
        let uri = if q.is_empty() { "/v1/portal/tokens".to_owned() } else { format!("/v1/portal/tokens?{q}") };
        let answer = send(Method::POST, &uri, ADMIN_KEY, Some(body))?;
        check(&uri, &answer, "/v1/portal/tokens", "post", &sent)
    });
}

#[test]
fn plans_parameters() {
    fuzz_flat("/v1/plans", READ_KEY);
}

#[test]
fn nearest_parameters() {
    fuzz_flat("/v1/limits/nearest", READ_KEY);
}

#[test]
fn plan_and_limits_path_ids_and_parameters() {
    let paths = proptest::sample::select(&[("/v1/plans/{plan_id}", "plans"), ("/v1/users/{user_id}/limits", "users"), ("/v1/customers/{customer_id}/limits", "customers")][..]);
    run((paths, segment(), query()), |((doc_path, head), id, pieces)| {
        let (q, sent) = query_of(&pieces);
        let tail = if head == "plans" { String::new() } else { "/limits".to_owned() };
        let uri = format!("/v1/{head}/{id}{tail}{}", if q.is_empty() { String::new() } else { format!("?{q}") });
        let answer = send(Method::GET, &uri, READ_KEY, None)?;
        check(&uri, &answer, doc_path, "get", &sent)
    });
}

/// Every route is fuzzed above.
#[test]
fn every_route_is_fuzzed() {
    let fuzzed = [
        "/v1/usage",
        "/v1/top-spenders",
        "/v1/margins",
        "/v1/events",
        "/v1/alerts",
        "/v1/billing/export",
        "/v1/billing/status",
        "/v1/users/{user_id}/usage",
        "/v1/customers/{customer_id}/billing",
        "/v1/portal/tokens",
        "/v1/portal/usage",
        "/v1/plans",
        "/v1/plans/{plan_id}",
        "/v1/users/{user_id}/limits",
        "/v1/customers/{customer_id}/limits",
        "/v1/limits/nearest",
    ];
    let mut routes = meterline_query_api::route_paths();
    routes.sort_unstable();
    let mut fuzzed = fuzzed.to_vec();
    fuzzed.sort_unstable();
    assert_eq!(routes, fuzzed);
}
