//! The event contract as a client sees it: validation answers, the published
//! JSON Schema agreeing with the Rust rules, and the wire encoding round trip.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use meterline_schemas::event::{FIELDS, MAX_ID_BYTES, MAX_NAME_BYTES, REQUIRED_FIELDS};
use meterline_schemas::wire::{self, Envelope};
use meterline_schemas::{ErrorCode, Nanos, TimeBounds, UsageEvent, parse_event};
use proptest::prelude::*;
use serde_json::{Value, json};

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T12:00:00Z").unwrap().with_timezone(&Utc)
}

fn base() -> Value {
    json!({
        "idempotency_key": "req-1",
        "timestamp": "2026-11-23T11:59:00Z",
        "user_id": "user-1",
        "feature": "chat",
        "model": "gpt-4o"
    })
}

fn with(field: &str, value: Value) -> Value {
    let mut v = base();
    v[field] = value;
    v
}

fn parse(v: &Value) -> Result<UsageEvent, meterline_schemas::Rejection> {
    parse_event(&v.to_string(), &TimeBounds::default(), now())
}

fn codes(v: &Value) -> Vec<(String, ErrorCode)> {
    parse(v).unwrap_err().errors.into_iter().map(|e| (e.field, e.code)).collect()
}

#[test]
fn minimal_event_gets_defaults() {
    let e = parse(&base()).unwrap();
    assert_eq!(e.environment, "production");
    assert!(e.billable);
    assert_eq!((e.input_tokens, e.output_tokens, e.cached_input_tokens, e.reasoning_tokens), (0, 0, 0, 0));
    assert_eq!((e.cost_usd, e.revenue_usd, e.credits, e.customer_id, e.metadata), (None, None, None, None, None));
}

#[test]
fn full_event_is_held_exactly() {
    let mut v = base();
    for (k, val) in [
        ("customer_id", json!("acme")),
        ("provider", json!("openai")),
        ("input_tokens", json!(1200)),
        ("output_tokens", json!(300)),
        ("cached_input_tokens", json!(50)),
        ("reasoning_tokens", json!(7)),
        ("cost_usd", json!("0.000123456")),
        ("credits", serde_json::from_str::<Value>("0.1").unwrap()),
        ("billable", json!(false)),
        ("environment", json!("staging")),
        ("metadata", json!({"trace": "t-1", "n": [1, 2]})),
    ] {
        v[k] = val;
    }
    let e = parse(&v).unwrap();
    assert_eq!(e.cost_usd, Some(Nanos(123_456)));
    assert_eq!(e.credits, Some(Nanos(100_000_000)));
    assert_eq!(e.timestamp, now() - Duration::minutes(1));
    assert_eq!(e.metadata.as_deref(), Some(r#"{"n":[1,2],"trace":"t-1"}"#));
    assert!(!e.billable);
}

#[test]
fn amounts_from_json_numbers_do_not_drift() {
    let text = r#"{"idempotency_key":"k","timestamp":"2026-11-23T11:59:00Z","user_id":"u","feature":"f","model":"m",
        "cost_usd":0.1,"revenue_usd":0.30000000000000004e0}"#;
    let rejected = parse_event(text, &TimeBounds::default(), now()).unwrap_err();
    assert_eq!(rejected.errors[0].field, "revenue_usd");
    assert_eq!(rejected.errors[0].code, ErrorCode::InvalidAmount);
    let text = text.replace("0.30000000000000004e0", "0.2");
    let e = parse_event(&text, &TimeBounds::default(), now()).unwrap();
    assert_eq!(e.cost_usd.unwrap().0 + e.revenue_usd.unwrap().0, Nanos::parse("0.3").unwrap().0);
}

#[test]
fn every_error_names_its_field() {
    let mut v = base();
    v.as_object_mut().unwrap().remove("user_id");
    v["feature"] = json!("");
    v["model"] = json!("x".repeat(MAX_NAME_BYTES + 1));
    v["input_tokens"] = json!(-1);
    v["output_tokens"] = json!(1.5);
    v["cost_usd"] = json!("-0.01");
    v["revenue_usd"] = json!("1e-12");
    v["billable"] = json!("yes");
    v["custmer_id"] = json!("typo");
    v["provider"] = json!("open\u{7}ai");
    let mut got = codes(&v);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("billable".into(), ErrorCode::InvalidType),
            ("cost_usd".into(), ErrorCode::InvalidAmount),
            ("custmer_id".into(), ErrorCode::UnknownField),
            ("feature".into(), ErrorCode::Empty),
            ("input_tokens".into(), ErrorCode::InvalidType),
            ("model".into(), ErrorCode::TooLong),
            ("output_tokens".into(), ErrorCode::InvalidType),
            ("provider".into(), ErrorCode::ControlCharacter),
            ("revenue_usd".into(), ErrorCode::InvalidAmount),
            ("user_id".into(), ErrorCode::Missing),
        ]
    );
    assert_eq!(parse(&v).unwrap_err().idempotency_key.as_deref(), Some("req-1"));
}

#[test]
fn time_bounds_are_enforced_and_configurable() {
    assert_eq!(codes(&with("timestamp", json!("2026-10-18T11:59:59Z"))), vec![("timestamp".into(), ErrorCode::TooOld)]);
    assert!(parse(&with("timestamp", json!("2026-10-19T12:00:01Z"))).is_ok());
    assert_eq!(
        codes(&with("timestamp", json!("2026-11-23T12:05:01Z"))),
        vec![("timestamp".into(), ErrorCode::TooFarInFuture)]
    );
    assert!(parse(&with("timestamp", json!("2026-11-23T13:04:00+01:00"))).is_ok());
    assert_eq!(codes(&with("timestamp", json!("yesterday"))), vec![("timestamp".into(), ErrorCode::InvalidTimestamp)]);
    let tight = TimeBounds { max_past_secs: 30, max_future_secs: 0 };
    assert!(parse_event(&base().to_string(), &tight, now()).is_err());
}

#[test]
fn shape_errors() {
    assert_eq!(codes(&json!([1])), vec![("".into(), ErrorCode::NotAnObject)]);
    let dup = r#"{"idempotency_key":"a","idempotency_key":"b","timestamp":"2026-11-23T11:59:00Z","user_id":"u","feature":"f","model":"m"}"#;
    let err = parse_event(dup, &TimeBounds::default(), now()).unwrap_err();
    assert_eq!(err.errors[0].code, ErrorCode::DuplicateField);
    assert_eq!(codes(&with("revenue_usd", json!("1")).tap(|v| v["credits"] = json!(2))), vec![("credits".into(), ErrorCode::Conflict)]);
    assert_eq!(codes(&with("metadata", json!([1]))), vec![("metadata".into(), ErrorCode::InvalidType)]);
    assert_eq!(codes(&with("metadata", json!({"x": "y".repeat(4096)}))), vec![("metadata".into(), ErrorCode::TooLong)]);
    assert_eq!(codes(&with("user_id", json!("u".repeat(MAX_ID_BYTES + 1)))), vec![("user_id".into(), ErrorCode::TooLong)]);
    assert!(parse(&with("user_id", json!("é".repeat(MAX_ID_BYTES / 2)))).is_ok());
    assert!(parse(&with("customer_id", Value::Null)).is_ok());
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for Value {}

fn schema() -> Value {
    serde_json::from_str(include_str!("../event.schema.json")).unwrap()
}

#[test]
fn json_schema_lists_the_same_fields_and_bounds() {
    let s = schema();
    let props: Vec<&str> = s["properties"].as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = FIELDS.to_vec();
    let mut props_sorted = props.clone();
    expected.sort();
    props_sorted.sort();
    assert_eq!(props_sorted, expected);
    let required: Vec<&str> = s["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(required, REQUIRED_FIELDS);
    assert_eq!(s["$defs"]["id"]["maxLength"], json!(MAX_ID_BYTES));
    assert_eq!(s["$defs"]["name"]["maxLength"], json!(MAX_NAME_BYTES));
    assert_eq!(s["additionalProperties"], json!(false));
}

#[test]
fn json_schema_and_rust_agree_on_examples() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let cases: Vec<(Value, bool)> = vec![
        (base(), true),
        (with("cost_usd", json!("0.000000001")), true),
        (with("cost_usd", json!(0.25)), true),
        (with("cost_usd", json!("0.0000000001")), false),
        (with("cost_usd", json!("-1")), false),
        (with("cost_usd", json!(-1)), false),
        (with("cost_usd", json!(true)), false),
        (with("revenue_usd", json!("2")).tap(|v| v["credits"] = json!("1")), false),
        (with("credits", json!("1")), true),
        (with("input_tokens", json!(5)), true),
        (with("input_tokens", json!(-5)), false),
        (with("input_tokens", json!(1_000_000_001u64)), false),
        (with("user_id", json!("")), false),
        (with("user_id", json!("a\nb")), false),
        (with("user_id", json!("a".repeat(257))), false),
        (with("model", json!("m".repeat(128))), true),
        (with("model", json!("m".repeat(129))), false),
        (with("billable", json!(false)), true),
        (with("billable", json!(1)), false),
        (with("metadata", json!({"a": 1})), true),
        (with("metadata", json!("x")), false),
        (with("environment", Value::Null), true),
        (with("extra", json!(1)), false),
        (base().tap(|v| { v.as_object_mut().unwrap().remove("model"); }), false),
        (json!("not an object"), false),
    ];
    for (case, valid) in cases {
        assert_eq!(validator.is_valid(&case), valid, "schema on {case}");
        assert_eq!(parse(&case).is_ok(), valid, "rust on {case}: {:?}", parse(&case).err());
    }
}

fn arb_event() -> impl Strategy<Value = UsageEvent> {
    let s = "[a-zA-Z0-9é_-]{1,40}";
    (
        (s, any::<i64>(), s, proptest::option::of(s), s, s, proptest::option::of(s)),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (proptest::option::of(any::<i64>()), proptest::option::of(any::<i64>()), proptest::option::of(any::<i64>())),
        (any::<bool>(), s, proptest::option::of("\\{[^}]{0,50}\\}")),
    )
        .prop_map(|((key, ts, user, customer, feature, model, provider), tokens, money, (billable, env, metadata))| UsageEvent {
            idempotency_key: key,
            timestamp: DateTime::from_timestamp_nanos(ts),
            user_id: user,
            customer_id: customer,
            feature,
            model,
            provider,
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            cached_input_tokens: tokens.2,
            reasoning_tokens: tokens.3,
            cost_usd: money.0.map(Nanos),
            revenue_usd: money.1.map(Nanos),
            credits: money.2.map(Nanos),
            billable,
            environment: env,
            metadata,
        })
}

proptest! {
    #[test]
    fn wire_round_trips(event in arb_event(), tenant in "[a-z0-9]{1,20}", at in any::<i64>()) {
        let envelope = Envelope { tenant, received_at: DateTime::from_timestamp_nanos(at), event };
        let bytes = wire::encode(&envelope);
        prop_assert_eq!(wire::decode(&bytes), Ok(envelope));
        // Every strict prefix is refused, never misread.
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(wire::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn wire_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = wire::decode(&bytes);
    }

    #[test]
    fn event_parser_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = parse_event(&text, &TimeBounds::default(), now());
    }

    #[test]
    fn event_parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_event(&text, &TimeBounds::default(), now());
        let _ = meterline_schemas::batch::split(&text, meterline_schemas::batch::BodyFormat::Json, 100);
        let _ = meterline_schemas::batch::split(&text, meterline_schemas::batch::BodyFormat::Ndjson, 100);
    }

    #[test]
    fn event_parser_never_panics_on_mutated_events(
        field in proptest::sample::select(FIELDS.to_vec()),
        value in prop_oneof![
            Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), any::<f64>().prop_map(|f| json!(f)),
            "\\PC{0,300}".prop_map(|s| json!(s)), Just(json!([])), Just(json!({})),
        ],
    ) {
        let _ = parse(&with(field, value));
    }
}

/// Home partitions are part of the contract between ingest, the aggregator
/// and every record already on a topic: a change would move keys' homes.
/// Values computed independently (FNV-1a 64 of "tenant/key", modulo n).
#[test]
fn home_partitions_never_change() {
    let homes: Vec<i32> = [("acme", "k-0", 4), ("acme", "k-1", 4), ("acme", "order-42", 8), ("globex", "k-0", 4), ("acme", "k-0", 1)]
        .iter()
        .map(|(t, k, n)| wire::home_partition(t, k, *n))
        .collect();
    assert_eq!(homes, vec![0, 3, 1, 1, 0]);
    assert_eq!(wire::home_partition("acme", "k-0", 0), 0, "no partitions (never from a broker) is not a panic");
    let spread: std::collections::BTreeSet<i32> = (0..1_000).map(|n| wire::home_partition("acme", &format!("key-{n}"), 8)).collect();
    assert_eq!(spread.len(), 8, "keys spread over every partition");
}
