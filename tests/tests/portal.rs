//! The end-user usage view against the all-in-one binary: portal tokens
//! minted with an admin key read exactly their subject's usage and limits,
//! and nothing else; tampered, expired and revoked (rotated secret) tokens
//! are refused; API keys are refused on the portal and portal tokens
//! everywhere else; CORS answers only configured origins; `/widget.js` is served.

use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const ACME_INGEST: &str = "acme-ingest-key";
const ACME_READ: &str = "acme-read-key";
const ACME_ADMIN: &str = "acme-admin-key";
const GLOBEX_ADMIN: &str = "globex-admin-key";
const SECRET: &str = "portal-secret-one-0123456789";
const ORIGIN: &str = "https://app.acme.test";

fn tenants(secret: &str) -> String {
    tenants_toml_with(&[("acme", &format!("portal_secret = \"{secret}\"\nportal_origins = [\"{ORIGIN}\"]"))])
}

async fn send(method: reqwest::Method, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(k) = key {
        request = request.bearer_auth(k);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn mint(url: &str, key: &str, body: Value) -> (u16, Value) {
    send(reqwest::Method::POST, &format!("{url}/v1/portal/tokens"), Some(key), Some(body)).await
}

async fn token(url: &str, body: Value) -> String {
    let (status, answer) = mint(url, ACME_ADMIN, body).await;
    assert_eq!(status, 200, "{answer}");
    answer["token"].as_str().expect("token").to_owned()
}

async fn portal(url: &str, token: &str) -> (u16, Value) {
    send(reqwest::Method::GET, &format!("{url}/v1/portal/usage"), Some(token), None).await
}

fn event(user: &str, n: usize, feature: &str, cost: &str) -> Value {
    json!({
        "idempotency_key": format!("{user}-{feature}-{n}"),
        "timestamp": (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339(),
        "user_id": user, "customer_id": "acme-corp", "feature": feature, "model": "gpt-4o",
        "input_tokens": 100, "output_tokens": 20, "cost_usd": cost,
    })
}

#[tokio::test]
async fn portal_tokens_read_their_subject_only_and_are_refused_when_forged_expired_or_revoked() {
    let dir = temp_dir("portal");
    let server = Embedded::start_with_tenants(&dir, "", &tenants(SECRET)).await;
    let url = server.url.clone();
    let plan = json!({"limits": [
        {"name": "monthly-spend", "measure": "cost_usd", "period": "cycle", "amount": "5"},
        {"name": "daily-gens", "measure": "events", "period": "day", "amount": "10", "filter": {"feature": "image_gen"}},
    ]});
    let (status, body) = send(reqwest::Method::PUT, &format!("{url}/v1/plans/default"), Some(ACME_ADMIN), Some(plan)).await;
    assert_eq!(status, 200, "{body}");
    let mut events: Vec<Value> = (0..7).map(|n| event("user-a", n, "image_gen", "0.4")).collect();
    events.push(event("user-a", 0, "chat", "0.62"));
    events.push(event("user-b", 0, "chat", "9.99"));
    let (status, body) = send(reqwest::Method::POST, &format!("{url}/v1/events"), Some(ACME_INGEST), Some(json!(events))).await;
    assert_eq!(status, 202, "{body}");

    // Minting: admin key only, exactly one subject, bounded TTL, configured tenants only.
    let a = token(&url, json!({"user_id": "user-a"})).await;
    let (_, minted) = mint(&url, ACME_ADMIN, json!({"user_id": "user-a", "ttl_secs": 60})).await;
    assert_eq!((minted["scope"].as_str(), minted["subject_id"].as_str()), (Some("user"), Some("user-a")), "{minted}");
    assert!(minted["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{minted}");
    for (key, body, status) in [
        (ACME_READ, json!({"user_id": "user-a"}), 403),
        (ACME_ADMIN, json!({"user_id": "user-a", "customer_id": "acme-corp"}), 400),
        (ACME_ADMIN, json!({}), 400),
        (ACME_ADMIN, json!({"user_id": "user-a", "ttl_secs": 86_401}), 400),
        (ACME_ADMIN, json!({"user_id": "user-a", "ttl_secs": 0}), 400),
        (ACME_ADMIN, json!({"user_id": "user-a", "tenant": "globex"}), 400),
        (GLOBEX_ADMIN, json!({"user_id": "user-a"}), 409),
    ] {
        let (got, answer) = mint(&url, key, body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    let (_, unconfigured) = mint(&url, GLOBEX_ADMIN, json!({"user_id": "user-a"})).await;
    assert!(unconfigured["error"]["message"].as_str().is_some_and(|m| m.contains("portal_secret")), "{unconfigured}");

    // The read: the user's statement's totals and the limits' statuses.
    let (status, mine) = portal(&url, &a).await;
    assert_eq!(status, 200, "{mine}");
    let (_, statement) = get_json(&format!("{url}/v1/users/user-a/usage"), Some(ACME_READ)).await;
    assert_documented("/v1/portal/usage", 200, &mine);
    assert_eq!(mine["totals"], statement["totals"], "{mine}\n{statement}");
    assert_eq!(mine["daily"], statement["daily"]);
    assert_eq!(mine["totals"]["cost_usd"], json!("3.42"), "{mine}");
    assert_eq!((mine["scope"].as_str(), mine["subject_id"].as_str(), mine["period"]["kind"].as_str()), (Some("user"), Some("user-a"), Some("month")));
    let (_, limits) = get_json(&format!("{url}/v1/users/user-a/limits"), Some(ACME_READ)).await;
    let pick = |v: &Value, name: &str| v["limits"].as_array().and_then(|l| l.iter().find(|x| x["name"] == name).cloned()).unwrap_or(Value::Null);
    for name in ["monthly-spend", "daily-gens"] {
        for field in ["used", "remaining", "resets_at", "limit", "measure", "period"] {
            assert_eq!(pick(&mine, name)[field], pick(&limits, name)[field], "{name}.{field}: {mine}");
        }
    }
    assert_eq!((pick(&mine, "monthly-spend")["used"].as_str(), pick(&mine, "monthly-spend")["remaining"].as_str()), (Some("3.42"), Some("1.58")));
    assert_eq!((pick(&mine, "daily-gens")["used"].as_str(), pick(&mine, "daily-gens")["limit"].as_str()), (Some("7"), Some("10")));
    assert_eq!(mine["period"]["resets_at"], pick(&mine, "monthly-spend")["resets_at"]);

    // No parameter changes the subject, and user B's token reads only B.
    for query in ["?user_id=user-b", "?customer_id=acme-corp", "?tenant=globex", "?from=2020-01-01T00:00:00Z"] {
        let (status, body) = send(reqwest::Method::GET, &format!("{url}/v1/portal/usage{query}"), Some(&a), None).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    let b = token(&url, json!({"user_id": "user-b"})).await;
    let (_, theirs) = portal(&url, &b).await;
    assert_eq!((theirs["subject_id"].as_str(), theirs["totals"]["cost_usd"].as_str()), (Some("user-b"), Some("9.99")), "{theirs}");
    let customer = token(&url, json!({"customer_id": "acme-corp"})).await;
    let (_, shared) = portal(&url, &customer).await;
    assert_eq!((shared["scope"].as_str(), shared["totals"]["cost_usd"].as_str()), (Some("customer"), Some("13.41")), "{shared}");

    // Tampered: B's signature on A's payload, a flipped character, garbage.
    let (a_payload, _) = a.split_once('.').expect("payload.signature");
    let (b_payload, b_signature) = b.split_once('.').expect("payload.signature");
    let flipped = format!("{}{}", &a[..a.len() - 1], if a.ends_with('A') { 'B' } else { 'A' });
    for forged in [format!("{a_payload}.{b_signature}"), format!("{b_payload}x.{b_signature}"), flipped, "garbage".into()] {
        let (status, body) = portal(&url, &forged).await;
        assert_eq!(status, 401, "{forged}: {body}");
        assert_eq!(body["error"]["code"], json!("unauthenticated"));
    }

    // An API key is not a portal token, and a portal token is not an API key.
    for key in [ACME_READ, ACME_ADMIN, ACME_INGEST] {
        let (status, body) = portal(&url, key).await;
        assert_eq!(status, 401, "{key}: {body}");
    }
    for path in ["/v1/usage", "/v1/users/user-a/usage", "/v1/users/user-a/limits", "/v1/alerts", "/v1/plans"] {
        let (status, body) = get_json(&format!("{url}{path}"), Some(&a)).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    let (status, _) = mint(&url, &a, json!({"user_id": "user-b"})).await;
    assert_eq!(status, 401, "a portal token mints nothing");

    // Expiry: a one-second token stops working.
    let short = token(&url, json!({"user_id": "user-a", "ttl_secs": 1})).await;
    poll_until(Duration::from_secs(10), "the one-second token to expire", || {
        let (url, short) = (url.clone(), short.clone());
        async move {
            let (status, body) = portal(&url, &short).await;
            (status == 401).then(|| assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("expired")), "{body}"))
        }
    })
    .await;

    // CORS: the configured origin only.
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{url}/v1/portal/usage"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization")
            .send()
    };
    let allowed = preflight(ORIGIN).await.expect("preflight");
    assert!(allowed.status().is_success());
    let h = allowed.headers();
    assert_eq!(h.get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some(ORIGIN));
    assert_eq!(h.get("vary").and_then(|v| v.to_str().ok()), Some("Origin"));
    assert!(h.get("access-control-allow-headers").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("authorization")));
    let other = preflight("https://evil.test").await.expect("preflight");
    assert!(other.headers().get("access-control-allow-origin").is_none() && other.headers().get("access-control-allow-headers").is_none());
    for (origin, expected) in [(ORIGIN, Some(ORIGIN)), ("https://evil.test", None)] {
        let read = client.get(format!("{url}/v1/portal/usage")).header("Origin", origin).bearer_auth(&a).send().await.expect("read");
        assert_eq!(read.status().as_u16(), 200);
        assert_eq!(read.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()), expected, "{origin}");
    }

    // The widget, compiled in.
    let widget = client.get(format!("{url}/widget.js")).send().await.expect("widget");
    assert_eq!(widget.status().as_u16(), 200);
    assert!(widget.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("text/javascript")));
    assert!(widget.text().await.expect("text").contains("/v1/portal/usage"));

    // Rotating the secret revokes every token.
    server.stop().await;
    let server = Embedded::start_with_tenants(&dir, "", &tenants("portal-secret-two-0123456789")).await;
    let (status, body) = portal(&server.url, &a).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("revoked")), "{body}");
    let fresh = token(&server.url, json!({"user_id": "user-a"})).await;
    assert_eq!(portal(&server.url, &fresh).await.0, 200);
    server.stop().await;
}
