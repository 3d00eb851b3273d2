//! Ingest against a real broker: what is acked is on the topic exactly, what is
//! refused says why, and hostile input never gets a 5xx.
#![allow(clippy::type_complexity)]

use meterline_schemas::wire;
use meterline_schemas::{TimeBounds, parse_event};
use meterline_tests::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

fn brokers() -> String {
    stack_var("METERLINE_TEST_KAFKA_BROKERS")
}

async fn post(url: &str, key: &str, body: impl Into<reqwest::Body>, content_type: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request")
}

async fn post_json(url: &str, key: &str, body: &Value) -> (StatusCode, Value) {
    let response = post(url, key, body.to_string(), "application/json").await;
    let status = response.status();
    (status, response.json().await.expect("json body"))
}

#[tokio::test]
async fn accepted_batch_is_on_the_topic_exactly() {
    let topic = unique_topic("exact");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "")).await;
    let events: Vec<Value> = (0..60).map(|n| event(&format!("user-{}", n % 7), n)).collect();
    let (status, body) = post_json(&ingest.url, "acme-ingest-key", &json!(events)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, json!({"accepted": 60, "rejected": []}));

    let records = read_topic(&brokers(), &topic, 60, Duration::from_secs(30));
    assert_eq!(records.len(), 60, "every accepted event once, nothing more");
    let mut by_key = BTreeMap::new();
    for r in &records {
        let envelope = wire::decode(&r.payload).expect("decodes");
        assert_eq!(envelope.tenant, "acme");
        assert_eq!(r.key, format!("acme/{}", envelope.event.idempotency_key).into_bytes());
        by_key.insert(envelope.event.idempotency_key.clone(), (r.partition, r.offset, envelope.event));
    }
    for (n, sent) in events.iter().enumerate() {
        let expected = parse_event(&sent.to_string(), &TimeBounds::default(), chrono::Utc::now()).expect("valid");
        let (_, _, got) = &by_key[&expected.idempotency_key];
        assert_eq!(got, &expected, "event {n} arrives as accepted");
    }
    // Each event on its idempotency key's home partition, where every copy
    // of the key goes (the aggregator's dedupe relies on it).
    for (key, (p, _, _)) in &by_key {
        assert_eq!(*p, wire::home_partition("acme", key, 4), "{key}");
    }
    ingest.stop().await;
}

#[tokio::test]
async fn mixed_batch_accepts_the_valid_and_names_each_fault() {
    let topic = unique_topic("mixed");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "")).await;
    let mut bad_cost = event("u1", 1);
    bad_cost["cost_usd"] = json!("-3");
    let mut typo = event("u2", 2);
    typo["custmer_id"] = json!("x");
    let mut no_user = event("u3", 3);
    no_user.as_object_mut().expect("object").remove("user_id");
    let batch = json!([event("u0", 0), bad_cost, typo, 42, no_user, event("u5", 5)]);
    let (status, body) = post_json(&ingest.url, "acme-ingest-key", &batch).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], 2);
    let rejected = body["rejected"].as_array().expect("rejected");
    let summary: Vec<(u64, Value, Vec<(Value, Value)>)> = rejected
        .iter()
        .map(|r| {
            let errors = r["errors"].as_array().expect("errors").iter().map(|e| (e["field"].clone(), e["code"].clone())).collect();
            (r["index"].as_u64().expect("index"), r["idempotency_key"].clone(), errors)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, json!("u1-1"), vec![(json!("cost_usd"), json!("invalid_amount"))]),
            (2, json!("u2-2"), vec![(json!("custmer_id"), json!("unknown_field"))]),
            (3, Value::Null, vec![(Value::Null, json!("not_an_object"))]),
            (4, json!("u3-3"), vec![(json!("user_id"), json!("missing"))]),
        ]
    );
    for r in rejected {
        assert!(!r["errors"][0]["message"].as_str().expect("message").is_empty());
    }
    let records = read_topic(&brokers(), &topic, 2, Duration::from_secs(30));
    let mut keys: Vec<String> =
        records.iter().map(|r| wire::decode(&r.payload).expect("decodes").event.idempotency_key).collect();
    keys.sort();
    assert_eq!(keys, vec!["u0-0", "u5-5"]);

    // A batch with nothing valid is refused as a whole, with the same detail.
    let (status, body) = post_json(&ingest.url, "acme-ingest-key", &json!([{"user_id": "x"}])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["accepted"], 0);
    assert_eq!(body["rejected"][0]["index"], 0);
    ingest.stop().await;
}

#[tokio::test]
async fn keys_decide_the_tenant_and_what_it_may_do() {
    let topic = unique_topic("tenants");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "")).await;
    let (status, _) = post_json(&ingest.url, "globex-ingest-key", &json!([event("g-user", 1)])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // A body cannot claim another tenant: there is no such field.
    let mut claim = event("g-user", 2);
    claim["tenant"] = json!("acme");
    let (status, body) = post_json(&ingest.url, "globex-ingest-key", &json!([claim])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["rejected"][0]["errors"][0]["field"], "tenant");

    let records = read_topic(&brokers(), &topic, 1, Duration::from_secs(30));
    assert_eq!(records.len(), 1);
    assert_eq!(wire::decode(&records[0].payload).expect("decodes").tenant, "globex");
    assert_eq!(records[0].key, b"globex/g-user-1", "keyed by the tenant and the idempotency key");

    for (key, expected, code) in [
        ("acme-read-key", StatusCode::FORBIDDEN, "forbidden"),
        ("no-such-key", StatusCode::UNAUTHORIZED, "unauthenticated"),
    ] {
        let (status, body) = post_json(&ingest.url, key, &json!([event("x", 1)])).await;
        assert_eq!(status, expected, "{key}");
        assert_eq!(body["error"]["code"], code);
    }
    let response = reqwest::Client::new()
        .post(format!("{}/v1/events", ingest.url))
        .header("content-type", "application/json")
        .body("[]")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["field"], "Authorization");
    ingest.stop().await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

#[tokio::test]
async fn hostile_bodies_get_4xx_never_5xx() {
    let topic = unique_topic("hostile");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "[server]\nmax_body_bytes = 1048576\nmax_events_per_request = 100\n")).await;
    let client = reqwest::Client::new();
    let send = |body: Vec<u8>, content_type: &'static str, encoding: Option<&'static str>| {
        let mut request = client
            .post(format!("{}/v1/events", ingest.url))
            .bearer_auth("acme-ingest-key")
            .header("content-type", content_type)
            .body(body);
        if let Some(e) = encoding {
            request = request.header("content-encoding", e);
        }
        async move {
            let response = request.send().await.expect("request");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let many: Vec<Value> = (0..101).map(|n| event("u", n)).collect();
    let deep = format!("[{}1{}]", "{\"a\":".repeat(5000), "}".repeat(5000)).into_bytes();
    let cases: Vec<(&str, Vec<u8>, &'static str, Option<&'static str>, StatusCode, &str)> = vec![
        ("oversized", vec![b' '; 1_048_577], "application/json", None, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("gzip bomb", gzip(&vec![b' '; 64 * 1024 * 1024]), "application/json", Some("gzip"), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("zstd bomb", zstd::encode_all(&vec![b'['; 8 * 1024 * 1024][..], 1).expect("zstd"), "application/json", Some("zstd"), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("too many events", json!(many).to_string().into_bytes(), "application/json", None, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("malformed", b"[{\"a\": 1,\n oops}]".to_vec(), "application/json", None, StatusCode::BAD_REQUEST, "invalid_json"),
        ("not a batch", b"\"hello\"".to_vec(), "application/json", None, StatusCode::BAD_REQUEST, "invalid_shape"),
        ("non-UTF-8", b"[{\"user_id\": \"\xff\xfe\"}]".to_vec(), "application/json", None, StatusCode::BAD_REQUEST, "invalid_utf8"),
        ("bad gzip", b"definitely not gzip".to_vec(), "application/json", Some("gzip"), StatusCode::BAD_REQUEST, "invalid_encoding"),
        ("unknown encoding", b"[]".to_vec(), "application/json", Some("br"), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        ("form body", b"a=1".to_vec(), "application/x-www-form-urlencoded", None, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        ("deeply nested", deep, "application/json", None, StatusCode::UNPROCESSABLE_ENTITY, ""),
    ];
    for (name, body, content_type, encoding, expected, code) in cases {
        let (status, answer) = send(body, content_type, encoding).await;
        assert_eq!(status, expected, "{name}: {answer}");
        if !code.is_empty() {
            assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
            assert!(!answer["error"]["message"].as_str().unwrap_or("").is_empty(), "{name}");
        }
    }
    let (_, answer) = send(b"[{\"a\": 1,\n oops}]".to_vec(), "application/json", None).await;
    assert!(answer["error"]["message"].as_str().expect("message").contains("line 2, column 2"), "{answer}");

    // Compressed and NDJSON bodies that are fine are accepted.
    let ndjson = format!("{}\n{}\n", event("z", 1), event("z", 2));
    let (status, answer) = send(gzip(ndjson.as_bytes()), "application/x-ndjson", Some("gzip")).await;
    assert_eq!((status, answer["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)), "{answer}");
    let wrapped = json!({"events": [event("z", 3)]}).to_string();
    let (status, answer) = send(zstd::encode_all(wrapped.as_bytes(), 3).expect("zstd"), "application/json", Some("zstd")).await;
    assert_eq!((status, answer["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(1)), "{answer}");
    // A torn NDJSON line is that event's problem only.
    let torn = format!("{}\n{{\"idempotency_key\": \"z-9\", \n{}\n", event("z", 4), event("z", 5));
    let (status, answer) = send(torn.into_bytes(), "application/x-ndjson", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["rejected"][0]["index"], 1);
    assert_eq!(answer["rejected"][0]["errors"][0]["code"], "invalid_json");

    let health = client.get(format!("{}/healthz", ingest.url)).send().await.expect("healthz");
    assert_eq!(health.status(), StatusCode::OK, "still serving after all of it");
    let records = read_topic(&brokers(), &topic, 5, Duration::from_secs(30));
    assert_eq!(records.len(), 5, "only the five valid events reached the topic");
    ingest.stop().await;
}

#[tokio::test]
async fn broker_outage_answers_503_and_recovers_without_restart() {
    let mut broker = Broker::start().await;
    let topic = unique_topic("outage");
    let ingest = Ingest::start(ingest_config(&broker.addr(), &topic, "")).await;
    let client = reqwest::Client::new();
    let url = ingest.url.clone();
    poll_until(Duration::from_secs(30), "ingest to be ready", || {
        let (client, url) = (client.clone(), url.clone());
        async move { client.get(format!("{url}/readyz")).send().await.ok().filter(|r| r.status() == StatusCode::OK) }
    })
    .await;
    let (status, _) = post_json(&ingest.url, "acme-ingest-key", &json!([event("a", 1)])).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    broker.kill().await;
    let response = post(&ingest.url, "acme-ingest-key", json!([event("a", 2), event("b", 3)]).to_string(), "application/json").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(body.get("accepted").is_none(), "nothing reported accepted: {body}");
    let ready = client.get(format!("{}/readyz", ingest.url)).send().await.expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    // The in-memory broker comes back empty; ingest recreates its topic and
    // accepts again, with no restart of ingest.
    broker.restart().await;
    let url = ingest.url.clone();
    let accepted_key = poll_until(Duration::from_secs(60), "ingest to accept again", || {
        let url = url.clone();
        async move {
            let (status, _) = post_json(&url, "acme-ingest-key", &json!([event("a", 99)])).await;
            (status == StatusCode::ACCEPTED).then_some("a-99")
        }
    })
    .await;
    let records = read_topic(&broker.addr(), &topic, 1, Duration::from_secs(30));
    let keys: Vec<String> = records.iter().map(|r| wire::decode(&r.payload).expect("decodes").event.idempotency_key).collect();
    assert!(keys.iter().all(|k| k == accepted_key), "only the retried event: {keys:?}");
    assert!(!keys.is_empty());
    ingest.stop().await;
}

#[tokio::test]
async fn backpressure_answers_429_when_in_flight_limit_is_reached() {
    let topic = unique_topic("pressure");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "[server]\nmax_in_flight_requests = 1\n")).await;
    // Hold the only slot with a body that trickles in until released.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let slow_body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let url = ingest.url.clone();
    let slow = tokio::spawn(async move { post(&url, "acme-ingest-key", slow_body, "application/json").await.status() });
    tx.send(Ok(bytes::Bytes::from_static(b"["))).await.expect("send");
    let url = ingest.url.clone();
    let answer = poll_until(Duration::from_secs(10), "a 429 while the slot is held", || {
        let url = url.clone();
        async move {
            let r = post(&url, "acme-ingest-key", json!([event("p", 1)]).to_string(), "application/json").await;
            (r.status() == StatusCode::TOO_MANY_REQUESTS).then(|| r.headers().get("retry-after").cloned())
        }
    })
    .await;
    assert!(answer.is_some(), "429 carries Retry-After");
    tx.send(Ok(bytes::Bytes::from(format!("{}]", event("p", 2))))).await.expect("send");
    drop(tx);
    assert_eq!(slow.await.expect("slow request"), StatusCode::ACCEPTED);
    let (status, _) = post_json(&ingest.url, "acme-ingest-key", &json!([event("p", 3)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "slot released");
    ingest.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let topic = unique_topic("drain");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "")).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let slow_body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let url = ingest.url.clone();
    let slow = tokio::spawn(async move { post(&url, "acme-ingest-key", slow_body, "application/json").await.status() });
    tx.send(Ok(bytes::Bytes::from_static(b"["))).await.expect("send");
    // Wait until the server is processing it (in-flight gauge is 1).
    let url = ingest.url.clone();
    poll_until(Duration::from_secs(10), "the request to be in flight", || {
        let url = url.clone();
        async move {
            let text = reqwest::get(format!("{url}/metrics")).await.ok()?.text().await.ok()?;
            text.lines().any(|l| l.starts_with("meterline_ingest_requests_in_flight") && !l.ends_with(" 0")).then_some(())
        }
    })
    .await;
    let stopping = tokio::spawn(ingest.stop());
    tx.send(Ok(bytes::Bytes::from(format!("{}]", event("d", 1))))).await.expect("send");
    drop(tx);
    assert_eq!(slow.await.expect("slow request"), StatusCode::ACCEPTED, "in-flight request completes during shutdown");
    stopping.await.expect("stopped");
    assert_eq!(read_topic(&brokers(), &topic, 1, Duration::from_secs(30)).len(), 1);
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let topic = unique_topic("metrics");
    let ingest = Ingest::start(ingest_config(&brokers(), &topic, "")).await;
    let mut unpriced = event("m", 1);
    unpriced.as_object_mut().expect("object").remove("cost_usd");
    unpriced["model"] = json!("no-such-model-anywhere");
    let (status, _) = post_json(&ingest.url, "acme-ingest-key", &json!([unpriced, {"bad": 1}])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let text = reqwest::get(format!("{}/metrics", ingest.url)).await.expect("metrics").text().await.expect("text");
    for needle in [
        "meterline_ingest_requests_total{status=\"202\"}",
        "meterline_ingest_events_accepted_total{tenant=\"acme\"}",
        "meterline_ingest_events_rejected_total{tenant=\"acme\",reason=\"unknown_field\"}",
        "meterline_ingest_events_unpriced_total{tenant=\"acme\"}",
        "meterline_ingest_batch_size_events_bucket",
        "meterline_ingest_produce_duration_seconds_bucket",
        "meterline_ingest_requests_in_flight",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let health = reqwest::get(format!("{}/healthz", ingest.url)).await.expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let missing = reqwest::get(format!("{}/nope", ingest.url)).await.expect("404");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    ingest.stop().await;
}
