//! The Stripe meter sync against a fake Stripe: the embedded server meters
//! events, `meterline stripe-sync` runs as its own process and pushes hourly
//! deltas; the fake checks every request as Stripe would (bearer key, form
//! body, unique identifiers, the 35-day timestamp window) and answers some
//! with 429 and 503. The worker is SIGKILLed mid-sync and late events land in
//! hours already pushed: afterwards Stripe's per-customer totals equal
//! Meterline's billable totals exactly, and no identifier was taken twice.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json, Router};
use meterline_tests::stack::Process;
use meterline_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "sk_test_fake_7d1c";
const INGEST: &str = "acme-ingest-key";
const READ: &str = "acme-read-key";
const ADMIN: &str = "acme-admin-key";

/// What the fake Stripe saw.
#[derive(Debug, Default)]
struct Seen {
    requests: u64,
    /// identifier -> (event_name, customer, value, timestamp)
    accepted: HashMap<String, (String, String, i64, i64)>,
    duplicates: u64,
    injected: u64,
    /// Requests Stripe would refuse for being malformed: must stay empty.
    violations: Vec<String>,
}

impl Seen {
    /// Per (event_name, customer): the sum of accepted values.
    fn totals(&self) -> BTreeMap<(String, String), i64> {
        let mut out = BTreeMap::new();
        for (name, customer, value, _) in self.accepted.values() {
            *out.entry((name.clone(), customer.clone())).or_insert(0) += value;
        }
        out
    }
}

type Shared = Arc<Mutex<Seen>>;

fn refuse(param: &str, code: &str, message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": {"type": "invalid_request_error", "code": code, "param": param, "message": message}}))).into_response()
}

async fn meter_event(State(seen): State<Shared>, headers: HeaderMap, Form(form): Form<Vec<(String, String)>>) -> Response {
    // A little latency, so that a SIGKILL lands mid-sync.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let mut seen = seen.lock().expect("lock");
    seen.requests += 1;
    // Every 5th request is rate limited, every 7th fails: the worker retries.
    if seen.requests % 5 == 0 || seen.requests % 7 == 0 {
        seen.injected += 1;
        let status = if seen.requests % 5 == 0 { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::SERVICE_UNAVAILABLE };
        return (status, Json(json!({"error": {"type": "api_error", "message": "injected"}}))).into_response();
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {SECRET}")) {
        seen.violations.push("bad bearer key".into());
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "Invalid API Key"}}))).into_response();
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-www-form-urlencoded") {
        seen.violations.push("not form-encoded".into());
    }
    let fields: HashMap<&str, &str> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let expected = ["event_name", "payload[stripe_customer_id]", "payload[value]", "identifier", "timestamp"];
    if fields.len() != expected.len() || expected.iter().any(|k| !fields.contains_key(k)) {
        seen.violations.push(format!("fields {form:?}"));
        return refuse("payload", "parameter_missing", "bad fields".into());
    }
    let (Ok(value), Ok(timestamp)) = (fields["payload[value]"].parse::<i64>(), fields["timestamp"].parse::<i64>()) else {
        seen.violations.push(format!("numbers {form:?}"));
        return refuse("payload[value]", "parameter_invalid_integer", "not a whole number".into());
    };
    let now = chrono::Utc::now().timestamp();
    if timestamp < now - 35 * 86_400 || timestamp > now + 300 {
        seen.violations.push(format!("timestamp {timestamp} out of Stripe's window"));
        return refuse("timestamp", "parameter_invalid", "timestamp must be within the past 35 days".into());
    }
    if value <= 0 {
        seen.violations.push(format!("value {value}"));
    }
    let identifier = fields["identifier"].to_owned();
    if identifier.len() > 100 {
        seen.violations.push(format!("identifier {identifier} too long"));
    }
    if seen.accepted.contains_key(&identifier) {
        seen.duplicates += 1;
        return refuse("identifier", "resource_already_exists", format!("An event with identifier {identifier} already exists."));
    }
    let event = (fields["event_name"].to_owned(), fields["payload[stripe_customer_id]"].to_owned(), value, timestamp);
    seen.accepted.insert(identifier.clone(), event);
    // Every 9th is taken but its answer is lost: the retry must meet the duplicate.
    if seen.requests % 9 == 0 {
        seen.injected += 1;
        return (StatusCode::BAD_GATEWAY, Json(json!({"error": {"type": "api_error", "message": "answer lost"}}))).into_response();
    }
    Json(json!({"object": "billing.meter_event", "identifier": identifier, "timestamp": timestamp})).into_response()
}

/// The fake on a port-0 listener: its base URL and what it saw.
async fn fake_stripe() -> (String, Shared) {
    let seen = Shared::default();
    let app = Router::new().route("/v1/billing/meter_events", axum::routing::post(meter_event)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake stripe") });
    (url, seen)
}

fn billing_toml(stripe: &str) -> String {
    format!(
        "[billing]\nstripe_base_url = \"{stripe}\"\ninterval_secs = 1\nsettle_secs = 0\nbackoff_ms = 5\nmax_attempts = 20\n\
         [[billing.tenants]]\ntenant = \"acme\"\ncustomers = {{ cust-a = \"cus_A\", cust-old = \"cus_OLD\" }}\n\
         [[billing.tenants.meters]]\nevent_name = \"ai_cost\"\nmeasure = \"cost_usd\"\n\
         [[billing.tenants.meters]]\nevent_name = \"chat_tokens\"\nmeasure = \"tokens\"\nfilter = {{ feature = \"chat\" }}\n\
         [[billing.tenants.meters]]\nevent_name = \"calls\"\nmeasure = \"events\"\n"
    )
}

/// One generated event and what it adds to each meter when billable.
struct Ev {
    body: Value,
    customer: &'static str,
    billable: bool,
    cost_nanos: i64,
    chat_tokens: i64,
}

/// `n` events from `hours_back` hours ago on, spread over the customers.
fn events(tag: &str, n: usize, hours_back: i64) -> Vec<Ev> {
    let now = chrono::Utc::now();
    (0..n)
        .map(|k| {
            let customer = ["cust-a", "cust-b", "cust-c"][k % 3];
            let feature = if k % 4 == 0 { "search" } else { "chat" };
            let billable = k % 11 != 5;
            let at = now - chrono::Duration::hours(hours_back) + chrono::Duration::minutes(i64::try_from(k * 17 % (60 * 20)).expect("minutes"));
            let at = at.min(now - chrono::Duration::hours(1));
            let cost_nanos = 1_234_567 + i64::try_from(k).expect("k") * 1_000_003;
            let (input, output) = (100 + k as i64, 7 + (k as i64 % 13));
            let body = json!({
                "idempotency_key": format!("{tag}-{k}"),
                "timestamp": at.to_rfc3339(),
                "user_id": format!("u-{}", k % 5),
                "customer_id": customer,
                "feature": feature,
                "model": "gpt-4o",
                "input_tokens": input,
                "output_tokens": output,
                "cost_usd": format!("0.{cost_nanos:09}"),
                "billable": billable,
            });
            Ev { body, customer, billable, cost_nanos, chat_tokens: if feature == "chat" { input + output } else { 0 } }
        })
        .collect()
}

/// How many (meter, customer, hour) windows the billable events of mapped customers fill.
fn windows(all: &[Ev]) -> usize {
    let mut out = std::collections::BTreeSet::new();
    for e in all.iter().filter(|e| e.billable && e.customer != "cust-c") {
        let t = chrono::DateTime::parse_from_rfc3339(e.body["timestamp"].as_str().expect("ts")).expect("ts").timestamp();
        let hour = t - t.rem_euclid(3_600);
        out.insert(("ai_cost", e.customer, hour));
        out.insert(("calls", e.customer, hour));
        if e.chat_tokens != 0 {
            out.insert(("chat_tokens", e.customer, hour));
        }
    }
    out.len()
}

/// Per (meter, Stripe customer): what the generated billable events add up to.
fn expected(all: &[Ev]) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for e in all.iter().filter(|e| e.billable) {
        let stripe = match e.customer {
            "cust-a" => "cus_A",
            "cust-b" => "cus_B",
            _ => continue,
        };
        for (meter, v) in [("ai_cost", e.cost_nanos), ("chat_tokens", e.chat_tokens), ("calls", 1)] {
            if v != 0 {
                *out.entry((meter.to_owned(), stripe.to_owned())).or_insert(0) += v;
            }
        }
    }
    out
}

async fn post_events(url: &str, batch: &[Ev]) {
    let body: Vec<&Value> = batch.iter().map(|e| &e.body).collect();
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth(INGEST).json(&body).send().await.expect("post");
    let status = r.status();
    assert!(status.is_success(), "{status}: {}", r.text().await.unwrap_or_default());
}

async fn send(method: reqwest::Method, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let response = r.send().await.expect("request");
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// The worker's environment: its Stripe key, and its cycle log at debug.
const SYNC_ENV: [(&str, &str); 2] = [("METERLINE_STRIPE_SECRET_KEY", SECRET), ("RUST_LOG", "info,meterline_billing::worker=debug,librdkafka=warn,rdkafka=warn")];

/// The sync cycles the worker has finished, by its log: each one that ran to
/// its end logs one `stripe sync cycle` line (what it pushed at info,
/// `nothing to push` at debug); one that stopped on an error is not counted.
fn cycles(sync: &Process) -> usize {
    let log = sync.log();
    log.matches("stripe sync cycle").count() - log.matches("stripe sync cycle stopped").count()
}

/// Waits until a whole sync cycle has run after this call: the one running
/// now (if any) may have read before it, so two more must finish.
async fn another_whole_cycle(sync: &Process) {
    let before = cycles(sync);
    poll_until(Duration::from_secs(30), "two more sync cycles to finish", || {
        let n = cycles(sync);
        async move { (n >= before + 2).then_some(()) }
    })
    .await;
}

/// Meterline's billable cost per customer over everything, in nano-dollars.
async fn billable_cost(url: &str) -> BTreeMap<String, i64> {
    let now = chrono::Utc::now();
    let range = format!("from={}&to={}", (now - chrono::Duration::days(40)).format("%Y-%m-%dT%H:%M:%SZ"), (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ"));
    let (status, body) = get_json(&format!("{url}/v1/usage?granularity=total&group_by=customer_id&billable=true&{range}"), Some(READ)).await;
    assert_eq!(status, 200, "{body}");
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let cost = r["cost_usd"].as_str().expect("cost");
            let (whole, frac) = cost.split_once('.').unwrap_or((cost, ""));
            let nanos = whole.parse::<i64>().expect("whole") * 1_000_000_000 + format!("{frac:0<9}")[..9].parse::<i64>().expect("frac");
            (r["customer_id"].as_str().expect("customer").to_owned(), nanos)
        })
        .collect()
}

#[tokio::test]
async fn sync_survives_sigkill_and_corrects_late_events_exactly_once() {
    let (stripe, seen) = fake_stripe().await;
    let dir = temp_dir("stripe-sync");
    let extra = billing_toml(&stripe);
    let server = Embedded::start(&dir, &extra).await;
    let url = server.url.clone();

    // Mappings: by API (admin only, validated), and by config.
    let put = |c: &str, body: Value, key: &'static str| {
        let at = format!("{url}/v1/customers/{c}/billing");
        async move { send(reqwest::Method::PUT, &at, key, Some(body)).await }
    };
    assert_eq!(put("cust-b", json!({"stripe_customer_id": "cus_B"}), READ).await.0, 403);
    let (status, body) = put("cust-b", json!({"stripe_customer_id": "B"}), ADMIN).await;
    assert_eq!((status, &body["error"]["field"]), (400, &json!("stripe_customer_id")), "{body}");
    let (status, body) = put("cust-b", json!({"stripe_customer_id": "cus_B"}), ADMIN).await;
    assert_eq!(status, 200, "{body}");
    let (_, b) = send(reqwest::Method::GET, &format!("{url}/v1/customers/cust-b/billing"), ADMIN, None).await;
    assert_eq!((&b["stripe_customer_id"], &b["source"]), (&json!("cus_B"), &json!("api")));
    let (_, a) = send(reqwest::Method::GET, &format!("{url}/v1/customers/cust-a/billing"), ADMIN, None).await;
    assert_eq!((&a["stripe_customer_id"], &a["source"]), (&json!("cus_A"), &json!("config")));
    assert_eq!(send(reqwest::Method::GET, &format!("{url}/v1/customers/cust-c/billing"), ADMIN, None).await.0, 404);

    // A day of usage, and one event just inside ingest's 35 days but too
    // old for Stripe by the time it would be sent.
    let mut all = events("first", 240, 26);
    post_events(&url, &all).await;
    let old_at = chrono::Utc::now() - chrono::Duration::days(35) + chrono::Duration::minutes(20);
    let old = json!([{"idempotency_key": "old-1", "timestamp": old_at.to_rfc3339(), "user_id": "u-old", "customer_id": "cust-old",
        "feature": "chat", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1, "cost_usd": "0.5"}]);
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth(INGEST).json(&old).send().await.expect("post");
    assert!(r.status().is_success(), "{}", r.text().await.unwrap_or_default());

    let config = dir.join("sync.toml");
    std::fs::write(&config, format!("{extra}\n{}", tenants_toml())).expect("config");
    let args: [&OsStr; 5] = ["stripe-sync".as_ref(), "--config".as_ref(), config.as_os_str(), "--data-dir".as_ref(), dir.as_os_str()];
    let mut sync = Process::start_env("meterline", &args, &SYNC_ENV);

    // SIGKILL once part of the first sync is in.
    poll_until(Duration::from_secs(60), "the sync to push its first events", || {
        let n = seen.lock().expect("lock").accepted.len();
        async move { (n >= 40).then_some(()) }
    })
    .await;
    sync.kill().await;
    let at_kill = seen.lock().expect("lock").accepted.len();
    let first_windows = windows(&all);
    assert!(at_kill < first_windows, "the kill came after the sync had finished ({at_kill} of {first_windows} windows)");

    // Late events into hours already pushed: corrections.
    let late = events("late", 60, 25);
    post_events(&url, &late).await;
    all.extend(late);
    sync.restart();

    let want = expected(&all);
    poll_until(Duration::from_secs(120), "Stripe's totals to match Meterline's", || {
        let got = seen.lock().expect("lock").totals();
        let want = want.clone();
        async move { (got == want).then_some(()) }
    })
    .await;
    // Settled: a whole cycle after the match pushes nothing more.
    another_whole_cycle(&sync).await;
    let accepted = {
        let seen_now = seen.lock().expect("lock");
        assert_eq!(seen_now.totals(), want);
        assert!(seen_now.violations.is_empty(), "{:?}", seen_now.violations);
        assert!(seen_now.injected > 0, "no 429/5xx was injected");
        assert!(seen_now.accepted.values().all(|(_, c, _, _)| c != "cus_OLD"), "a window older than Stripe accepts was pushed");
        assert!(seen_now.duplicates > 0, "no retry met its duplicate");
        eprintln!(
            "stripe fake: {} requests, {} injected failures, {} events taken ({first_windows} windows before the late events, {at_kill} at the kill), {} duplicates refused",
            seen_now.requests, seen_now.injected, seen_now.accepted.len(), seen_now.duplicates
        );
        seen_now.accepted.len()
    };

    // Stripe's cost per customer is Meterline's billable cost, exactly.
    let meterline = billable_cost(&url).await;
    for (customer, stripe_id) in [("cust-a", "cus_A"), ("cust-b", "cus_B")] {
        assert_eq!(Some(&meterline[customer]), want.get(&("ai_cost".to_owned(), stripe_id.to_owned())), "{customer}");
    }

    // Status: everything pushed, nothing pending; the old window refused.
    let (status, body) = send(reqwest::Method::GET, &format!("{url}/v1/billing/status"), ADMIN, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(send(reqwest::Method::GET, &format!("{url}/v1/billing/status"), READ, None).await.0, 403);
    let rows = body["meters"].as_array().expect("meters");
    let row = |meter: &str, c: &str| rows.iter().find(|r| r["event_name"] == meter && r["customer_id"] == c).cloned().unwrap_or_else(|| panic!("no {meter}/{c}: {body}"));
    let a = row("ai_cost", "cust-a");
    assert_eq!(a["total_pushed"], json!(want[&("ai_cost".to_owned(), "cus_A".to_owned())]), "{a}");
    assert_eq!((a["pending_windows"].as_i64(), a["refused_windows"].as_i64()), (Some(0), Some(0)), "{a}");
    assert!(a["last_window"].is_string() && a["last_window_value"].as_i64() > Some(0), "{a}");
    let old_row = row("ai_cost", "cust-old");
    assert_eq!((old_row["refused_windows"].as_i64(), old_row["refused_value"].as_i64(), old_row["total_pushed"].as_i64()), (Some(1), Some(500_000_000), Some(0)), "{old_row}");
    assert!(rows.iter().all(|r| r["customer_id"] != "cust-c"), "an unmapped customer was synced: {body}");

    sync.stop().await;
    let log = sync.log();
    assert!(!log.contains(SECRET), "the secret key was logged");
    assert!(accepted >= want.len(), "{accepted}");
    server.stop().await;
}

#[tokio::test]
async fn sync_refuses_to_start_without_the_secret_key() {
    let dir = temp_dir("stripe-sync-nokey");
    let server = Embedded::start(&dir, &billing_toml("http://127.0.0.1:9")).await;
    let config = dir.join("sync.toml");
    std::fs::write(&config, format!("{}\n{}", billing_toml("http://127.0.0.1:9"), tenants_toml())).expect("config");
    let out = std::process::Command::new(stack::service_binary("meterline"))
        .args(["stripe-sync", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&dir)
        .env_remove("METERLINE_STRIPE_SECRET_KEY")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("METERLINE_STRIPE_SECRET_KEY"), "{err}");
    server.stop().await;
}

/// The generated events as the aggregator stores them (priced, deduplicated),
/// at Kafka offsets `first..` of partition 0 of `topic`.
fn rows(all: &[Ev], topic: &str, first: i64) -> Vec<meterline_domain::EventRow> {
    let written_at = u32::try_from(chrono::Utc::now().timestamp()).expect("u32 time");
    all.iter()
        .zip(first..)
        .map(|(e, offset)| {
            let b = &e.body;
            let at = chrono::DateTime::parse_from_rfc3339(b["timestamp"].as_str().expect("ts")).expect("ts");
            meterline_domain::EventRow {
                tenant: "acme".into(),
                idempotency_key: b["idempotency_key"].as_str().expect("key").into(),
                event_time: u32::try_from(at.timestamp()).expect("u32 time"),
                event_time_ns: at.timestamp_subsec_nanos(),
                user_id: b["user_id"].as_str().expect("user").into(),
                customer_id: e.customer.into(),
                feature: b["feature"].as_str().expect("feature").into(),
                model: "gpt-4o".into(),
                billable: u8::from(e.billable),
                input_tokens: b["input_tokens"].as_u64().expect("input"),
                output_tokens: b["output_tokens"].as_u64().expect("output"),
                cost_nanos: e.cost_nanos,
                cost_source: 1,
                kafka_topic: topic.into(),
                kafka_offset: offset,
                written_at,
                received_at: written_at,
                ..meterline_domain::EventRow::default()
            }
        })
        .collect()
}

/// Writes `batch` as one aggregator flush would: the events, then their
/// minute rollups with a progress marker (what the sync sums).
async fn flush(store: &meterline_clickhouse::Store, topic: &str, batch: &[meterline_domain::EventRow]) {
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return };
    store.insert_events(batch).await.expect("insert events");
    let range = meterline_clickhouse::Range { partition: 0, after: first.kafka_offset - 1, up_to: last.kafka_offset };
    store.roll_up(meterline_clickhouse::Rollup::Minute, topic, &[range], last.written_at, last.written_at - 3_600).await.expect("roll up");
}

#[tokio::test]
async fn distributed_sync_pushes_exact_totals_from_clickhouse() {
    let (stripe, seen) = fake_stripe().await;
    let ch = stack::ClickHouse::shared();
    let database = ch.database(&format!("stripe_sync_{}", free_port())).await;
    let ch_config: meterline_clickhouse::ClickHouseConfig = serde_json::from_value(json!({"url": ch.url, "database": database})).expect("ch config");
    let store = meterline_clickhouse::connect(&ch_config).await.expect("connect");
    store.migrate().await.expect("migrate");
    let topic = "usage";

    // A day of usage, and one event too old for Stripe by the time it would be sent.
    let mut all = events("first", 240, 26);
    let old_at = chrono::Utc::now() - chrono::Duration::days(35) + chrono::Duration::minutes(20);
    let old = Ev {
        body: json!({"idempotency_key": "old-1", "timestamp": old_at.to_rfc3339(), "user_id": "u-old", "feature": "chat", "input_tokens": 1, "output_tokens": 1}),
        customer: "cust-old",
        billable: true,
        cost_nanos: 500_000_000,
        chat_tokens: 2,
    };
    let mut first = rows(&all, topic, 0);
    first.extend(rows(std::slice::from_ref(&old), topic, 240));
    flush(&store, topic, &first).await;

    // The query service (a process) serves the mapping and status routes over ClickHouse.
    let dir = temp_dir("stripe-sync-distributed");
    let listen = format!("127.0.0.1:{}", free_port());
    let config = dir.join("query-api.toml");
    let text = format!("[server]\nlisten = \"{listen}\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\n{}\n{}", ch.url, billing_toml(&stripe), tenants_toml());
    std::fs::write(&config, text).expect("config");
    let mut api = Process::start_args("meterline", &["query-api".as_ref(), "--config".as_ref(), config.as_os_str()]);
    let url = format!("http://{listen}");
    let at = format!("{url}/v1/customers/cust-b/billing");
    let (status, body) = poll_until(Duration::from_secs(30), "the query API to take the mapping", || {
        let at = at.clone();
        async move {
            let answer = reqwest::Client::new().put(&at).bearer_auth(ADMIN).json(&json!({"stripe_customer_id": "cus_B"})).send().await.ok()?;
            let status = answer.status().as_u16();
            Some((status, answer.json::<Value>().await.unwrap_or(Value::Null)))
        }
    })
    .await;
    assert_eq!((status, &body["source"]), (200, &json!("api")), "{body}");
    assert_eq!(send(reqwest::Method::PUT, &at, READ, Some(json!({"stripe_customer_id": "cus_B"}))).await.0, 403);
    let (_, b) = send(reqwest::Method::GET, &at, ADMIN, None).await;
    assert_eq!((&b["stripe_customer_id"], &b["source"]), (&json!("cus_B"), &json!("api")), "{b}");
    let (_, a) = send(reqwest::Method::GET, &format!("{url}/v1/customers/cust-a/billing"), ADMIN, None).await;
    assert_eq!((&a["stripe_customer_id"], &a["source"]), (&json!("cus_A"), &json!("config")), "{a}");

    // The sync, distributed: the same config file; SIGKILLed once part of the first sync is in.
    let args: [&OsStr; 5] = ["stripe-sync".as_ref(), "--role".as_ref(), "distributed".as_ref(), "--config".as_ref(), config.as_os_str()];
    let mut sync = Process::start_env("meterline", &args, &SYNC_ENV);
    poll_until(Duration::from_secs(60), "the sync to push its first events", || {
        let n = seen.lock().expect("lock").accepted.len();
        async move { (n >= 40).then_some(()) }
    })
    .await;
    sync.kill().await;
    let at_kill = seen.lock().expect("lock").accepted.len();
    let first_windows = windows(&all);
    assert!(at_kill < first_windows, "the kill came after the sync had finished ({at_kill} of {first_windows} windows)\n{}", sync.log_tail());

    // Late events into hours already pushed (a later flush): corrections.
    let late = events("late", 60, 25);
    flush(&store, topic, &rows(&late, topic, 241)).await;
    all.extend(late);
    sync.restart();

    let want = expected(&all);
    poll_until(Duration::from_secs(120), "Stripe's totals to match Meterline's", || {
        let got = seen.lock().expect("lock").totals();
        let want = want.clone();
        async move { (got == want).then_some(()) }
    })
    .await;
    another_whole_cycle(&sync).await;
    {
        let seen_now = seen.lock().expect("lock");
        assert_eq!(seen_now.totals(), want, "a settled sync pushed more");
        assert!(seen_now.violations.is_empty(), "{:?}", seen_now.violations);
        assert!(seen_now.injected > 0, "no 429/5xx was injected");
        assert!(seen_now.accepted.values().all(|(_, c, _, _)| c != "cus_OLD"), "a window older than Stripe accepts was pushed");
        eprintln!(
            "stripe fake (distributed): {} requests, {} injected failures, {} events taken ({at_kill} at the kill), {} duplicates refused",
            seen_now.requests, seen_now.injected, seen_now.accepted.len(), seen_now.duplicates
        );
    }

    // Stripe's cost per customer is the query API's billable cost, exactly.
    let meterline = billable_cost(&url).await;
    for (customer, stripe_id) in [("cust-a", "cus_A"), ("cust-b", "cus_B")] {
        assert_eq!(Some(&meterline[customer]), want.get(&("ai_cost".to_owned(), stripe_id.to_owned())), "{customer}");
    }

    // Status from ClickHouse: everything pushed, nothing pending; the old window refused.
    let (status, body) = send(reqwest::Method::GET, &format!("{url}/v1/billing/status"), ADMIN, None).await;
    assert_eq!(status, 200, "{body}");
    let rows = body["meters"].as_array().expect("meters");
    let row = |meter: &str, c: &str| rows.iter().find(|r| r["event_name"] == meter && r["customer_id"] == c).cloned().unwrap_or_else(|| panic!("no {meter}/{c}: {body}"));
    for (c, stripe_id) in [("cust-a", "cus_A"), ("cust-b", "cus_B")] {
        let r = row("ai_cost", c);
        assert_eq!(r["total_pushed"], json!(want[&("ai_cost".to_owned(), stripe_id.to_owned())]), "{r}");
        assert_eq!((r["pending_windows"].as_i64(), r["refused_windows"].as_i64(), &r["stripe_customer_id"]), (Some(0), Some(0), &json!(stripe_id)), "{r}");
        assert!(r["last_window"].is_string() && r["last_window_value"].as_i64() > Some(0), "{r}");
    }
    let old_row = row("ai_cost", "cust-old");
    assert_eq!((old_row["refused_windows"].as_i64(), old_row["refused_value"].as_i64(), old_row["total_pushed"].as_i64()), (Some(1), Some(500_000_000), Some(0)), "{old_row}");
    assert!(rows.iter().all(|r| r["customer_id"] != "cust-c"), "an unmapped customer was synced: {body}");

    sync.stop().await;
    assert!(!sync.log().contains(SECRET), "the secret key was logged");
    api.stop().await;
}
