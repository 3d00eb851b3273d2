//! `POST /api/v1/events` with the real OpenMeter clients (installed from PyPI
//! by `scripts/stack install`): LiteLLM's `openmeter` callback and OpenMeter's
//! Python SDK post to the all-in-one server, and per-user totals from
//! `/v1/usage` equal what they sent; a retried CloudEvent counts once; a bad
//! batch is refused whole with a problem naming the event and field. Then the
//! same route on the ingest service, into Kafka.

use meterline_schemas::Nanos;
use meterline_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const INGEST_KEY: &str = "acme-ingest-key";
const READ_KEY: &str = "acme-read-key";

/// Runs a Python script with `env` off the test's runtime (which serves the
/// server it posts to), returning what it printed.
async fn python(script: &'static str, env: &[(&str, &str)]) -> String {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    tokio::task::spawn_blocking(move || run_python(script, &env)).await.expect("python task")
}

/// Runs a Python script; panics with its stderr when it fails.
fn run_python(script: &str, env: &[(String, String)]) -> String {
    let mut child = Command::new("python3")
        .arg("-")
        .envs(env.iter().map(|(k, v)| (k, v)))
        // No network at test time: LiteLLM's bundled price map, not the remote one.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (run scripts/stack install for litellm and openmeter)");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("script");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// LiteLLM completions with its `openmeter` callback; prints what it metered.
const LITELLM: &str = r#"
import json, litellm
from litellm.litellm_core_utils.thread_pool_executor import executor
litellm.callbacks = ["openmeter"]
sent = []
for text in ["hello there", "a longer question about the weather today"]:
    r = litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": text}], mock_response="hi", user="u-1")
    sent.append({"prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens, "cost": json.dumps(r._hidden_params["response_cost"])})
# The callback runs on LiteLLM's logging thread pool: wait for its posts.
executor.shutdown(wait=True)
print(json.dumps(sent))
"#;

/// OpenMeter's SDK: one event, a batch, JSON, and a batch with a bad event.
const OPENMETER: &str = r#"
import os, openmeter, openmeter.models
from corehttp.exceptions import HttpResponseError
client = openmeter.Client(endpoint=os.environ["URL"], token=os.environ["KEY"])
def event(id, subject, data):
    return {"specversion": "1.0", "id": id, "source": "sdk-test", "type": "prompt", "subject": subject, "data": data}
client.events.ingest_event(event("1", "u-2", {"tokens": "100", "model": "gpt-4o", "type": "input"}))
client.events.ingest_events([
    event("2", "u-2", {"tokens": 50, "model": "gpt-4o", "type": "output"}),
    event("3", "u-3", {"promptTokens": 7, "completionTokens": 9, "model": "gpt-4o", "cost": 0.00017250000000000002}),
])
# The JSON variant sends only model objects (a plain dict posts no body).
client.events.ingest_events_json(openmeter.models.Event(**event("4", "u-3", {"prompt_tokens": 1, "model": "gpt-4o", "cost_usd": "0.5"})))
try:
    client.events.ingest_events([event("5", "u-4", {"model": "gpt-4o"}), event("6", None, {"model": "gpt-4o"})])
    print("accepted")
except HttpResponseError as e:
    print(e.status_code, e.response.headers.get("content-type"), e.response.text())
"#;

/// Per user: (events, input tokens, output tokens, cost).
async fn per_user(url: &str) -> BTreeMap<String, (u64, u64, u64, String)> {
    let now = chrono::Utc::now();
    let fmt = "%Y-%m-%dT%H:%M:%SZ";
    let range = format!("from={}&to={}", (now - chrono::Duration::days(1)).format(fmt), (now + chrono::Duration::hours(1)).format(fmt));
    let (status, body) = get_json(&format!("{url}/v1/usage?granularity=total&group_by=user_id&{range}"), Some(READ_KEY)).await;
    assert_eq!(status, 200, "{body}");
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
            let user = r["user_id"].as_str().expect("user").to_owned();
            (user, (n("events"), n("input_tokens"), n("output_tokens"), r["cost_usd"].as_str().expect("cost").to_owned()))
        })
        .collect()
}

async fn post_cloudevent(url: &str, event: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/api/v1/events"))
        .bearer_auth(INGEST_KEY)
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .expect("post")
}

#[tokio::test]
async fn litellm_and_openmeter_clients_meter_per_user() {
    let dir = temp_dir("cloudevents");
    let server = Embedded::start(&dir, "").await;
    let url = server.url.clone();

    let printed = python(LITELLM, &[("OPENMETER_API_ENDPOINT", url.as_str()), ("OPENMETER_API_KEY", INGEST_KEY)]).await;
    let sent: Vec<Value> = serde_json::from_str(printed.trim()).expect("litellm summary");
    let sum = |k: &str| sent.iter().map(|s| s[k].as_u64().expect("count")).sum::<u64>();
    // The callback prints cost with Python's repr, as the script did: the
    // server rounds each to the nano, half to even.
    let cost: i64 = sent.iter().map(|s| Nanos::parse_rounded_non_negative(s["cost"].as_str().expect("cost")).expect("cost").value.0).sum();
    let litellm = (2, sum("prompt"), sum("completion"), Some(Nanos(cost).to_string()));

    let refused = python(OPENMETER, &[("URL", url.as_str()), ("KEY", INGEST_KEY)]).await;
    let (status_and_type, body) = refused.trim().split_once(" {").expect("the bad batch is refused");
    assert_eq!(status_and_type, "400 application/problem+json", "{refused}");
    let problem: Value = serde_json::from_str(&format!("{{{body}")).expect("problem");
    assert_eq!((problem["status"].as_u64(), problem["index"].as_u64(), problem["field"].as_str()), (Some(400), Some(1), Some("subject")), "{problem}");
    assert!(problem["title"].is_string() && problem["type"].is_string() && problem["detail"].is_string(), "{problem}");

    // A retried CloudEvent (LiteLLM retries, a client resends) counts once.
    let retried = json!({"specversion": "1.0", "id": "r-1", "source": "retry", "type": "chat", "subject": "u-5",
        "time": chrono::Utc::now().to_rfc3339(), "data": {"model": "gpt-4o", "prompt_tokens": 3, "cost": 2.85e-05}});
    for _ in 0..2 {
        assert_eq!(post_cloudevent(&url, &retried).await.status(), 204);
    }

    let expected = BTreeMap::from([
        ("u-1".to_owned(), litellm),
        // No cost sent: the catalog prices it (checked below).
        ("u-2".to_owned(), (2, 100, 50, None)),
        ("u-3".to_owned(), (2, 8, 9, Some("0.5001725".to_owned()))),
        ("u-5".to_owned(), (1, 3, 0, Some("0.0000285".to_owned()))),
    ]);
    let totals = poll_until(Duration::from_secs(30), "the CloudEvents in /v1/usage", || {
        let (url, expected) = (url.clone(), expected.clone());
        async move {
            let got = per_user(&url).await;
            let seen: BTreeMap<String, (u64, u64, u64, Option<String>)> = got
                .iter()
                .map(|(u, (n, i, o, c))| (u.clone(), (*n, *i, *o, expected.get(u).and_then(|e| e.3.as_ref()).map(|_| c.clone()))))
                .collect();
            (seen == expected).then_some(got)
        }
    })
    .await;
    // u-2's cost comes from the catalog: priced, not zero.
    assert_ne!(totals["u-2"].3, "0", "{totals:?}");
    assert!(!totals.contains_key("u-4"), "nothing of a refused batch is accepted: {totals:?}");
    server.stop().await;
}

#[tokio::test]
async fn problems_for_bad_requests() {
    let dir = temp_dir("cloudevents-problems");
    let server = Embedded::start(&dir, "[cloudevents.tenants.acme]\nmodel = \"data.llm\"\n").await;
    let url = &server.url;
    let client = reqwest::Client::new();
    let post = |key: &str, content_type: &str, body: String| {
        client.post(format!("{url}/api/v1/events")).bearer_auth(key).header("content-type", content_type).body(body).send()
    };
    let event = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "chat", "subject": "u", "data": {"model": "gpt-4o"}});
    for (key, content_type, body, status, code) in [
        ("nope", "application/cloudevents+json", event.to_string(), 401, "unauthenticated"),
        (INGEST_KEY, "text/plain", event.to_string(), 415, "unsupported_media_type"),
        (INGEST_KEY, "application/cloudevents-batch+json", event.to_string(), 400, "invalid_shape"),
        (INGEST_KEY, "application/json", "[{".to_owned(), 400, "invalid_json"),
        // The tenant's mapping reads data.llm: data.model is not its model.
        (INGEST_KEY, "application/cloudevents+json", event.to_string(), 400, "invalid_event"),
    ] {
        let response = post(key, content_type, body).await.expect("post");
        assert_eq!(response.status().as_u16(), status, "{code}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{code}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!((problem["status"].as_u64(), problem["code"].as_str()), (Some(u64::from(status)), Some(code)), "{problem}");
        if code == "invalid_event" {
            assert_eq!((problem["index"].as_u64(), problem["field"].as_str()), (Some(0), Some("data.llm")), "{problem}");
        }
    }
    let ok = post(INGEST_KEY, "application/json", event.to_string().replace("\"model\"", "\"llm\"")).await.expect("post");
    assert_eq!(ok.status(), 204);
    assert_eq!(post(INGEST_KEY, "application/cloudevents-batch+json", "[]".to_owned()).await.expect("post").status(), 204);
    server.stop().await;
}

/// The ingest service serves the route too, and its 204 means Kafka acked.
#[tokio::test]
async fn ingest_service_produces_cloudevents_to_kafka() {
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    let topic = unique_topic("cloudevents");
    create_topic(&brokers, &topic, 4).await;
    let ingest = Ingest::start(ingest_config(&brokers, &topic, "")).await;
    let printed = python(LITELLM, &[("OPENMETER_API_ENDPOINT", ingest.url.as_str()), ("OPENMETER_API_KEY", INGEST_KEY)]).await;
    let sent: Vec<Value> = serde_json::from_str(printed.trim()).expect("litellm summary");
    let records = tokio::task::spawn_blocking(move || read_topic(&brokers, &topic, 2, Duration::from_secs(20))).await.expect("read");
    assert_eq!(records.len(), 2, "one record per completion");
    let mut tokens = 0;
    for r in &records {
        let envelope = meterline_schemas::wire::decode(&r.payload).expect("decode");
        assert_eq!((envelope.tenant.as_str(), envelope.event.user_id.as_str(), envelope.event.feature.as_str()), ("acme", "u-1", "litellm_tokens"));
        assert!(envelope.event.idempotency_key.starts_with("litellm-proxy/"), "{}", envelope.event.idempotency_key);
        tokens += envelope.event.input_tokens;
    }
    assert_eq!(tokens, sent.iter().map(|s| s["prompt"].as_u64().expect("n")).sum::<u64>());
    ingest.stop().await;
}
