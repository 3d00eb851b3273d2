//! The mapping's unit tests: LiteLLM's and OpenMeter's events, rounding,
//! keys, and errors that name the CloudEvent field.

use super::*;
use chrono::TimeZone;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 15, 0, 0).single().expect("time")
}

fn map(json: &str) -> Result<Mapped, Vec<MapError>> {
    map_event(json, &Mapping::default(), &TimeBounds::default(), now())
}

fn fields(errors: &[MapError]) -> Vec<(&str, &str)> {
    errors.iter().map(|e| (e.field.as_str(), e.code)).collect()
}

/// Exactly what LiteLLM 1.110.2's `openmeter` callback posted for a mocked
/// gpt-4o-mini completion.
const LITELLM: &str = r#"{"specversion": "1.0", "type": "litellm_tokens", "id": "chatcmpl-83430a32", "time": "2026-11-27T14:55:02.165177+00:00", "subject": "u-1", "source": "litellm-proxy", "data": {"model": "gpt-4o-mini", "cost": 1.35e-05, "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}"#;

#[test]
fn maps_litellm_callback_events() {
    let m = map(LITELLM).expect("maps");
    let e = &m.event;
    assert_eq!(e.idempotency_key, "litellm-proxy/chatcmpl-83430a32");
    assert_eq!(e.user_id, "u-1");
    assert_eq!(e.feature, "litellm_tokens");
    assert_eq!(e.model, "gpt-4o-mini");
    assert_eq!((e.input_tokens, e.output_tokens, e.cached_input_tokens, e.reasoning_tokens), (10, 20, 0, 0));
    assert_eq!(e.cost_usd, Some(Nanos(13_500)));
    assert_eq!(e.timestamp.to_rfc3339(), "2026-11-27T14:55:02.165177+00:00");
    assert!(m.rounded.is_empty());
}

#[test]
fn maps_openmeter_documented_llm_events() {
    // The quick start's event: the count as a string, its kind in data.type.
    let m = map(r#"{"specversion":"1.0","type":"prompt","id":"00001","time":"2026-11-27T14:00:00.001Z","source":"chat-app","subject":"customer-1","data":{"tokens":"123456","model":"gpt4-turbo","type":"output"}}"#).expect("maps");
    assert_eq!((m.event.input_tokens, m.event.output_tokens), (0, 123_456));
    assert_eq!(m.event.idempotency_key, "chat-app/00001");
    // The SDK example: no kind is input; the provider is read too.
    let m = map(r#"{"specversion":"1.0","type":"prompt","id":"2","source":"s","subject":"my-user-id","data":{"tokens":123456,"model":"gpt4","provider":"openai"}}"#).expect("maps");
    assert_eq!((m.event.input_tokens, m.event.output_tokens), (123_456, 0));
    assert_eq!(m.event.provider.as_deref(), Some("openai"));
    // No time: the time of receipt.
    assert_eq!(m.event.timestamp, now());
    // The LangChain handler's camelCase counts.
    let m = map(r#"{"specversion":"1.0","type":"tokens","id":"3","source":"langchain","subject":"u","data":{"promptTokens":7,"completionTokens":9,"model":"gpt-4o"}}"#).expect("maps");
    assert_eq!((m.event.input_tokens, m.event.output_tokens), (7, 9));
}

#[test]
fn rounds_float_money_half_to_even_and_reports_it() {
    let m = map(&LITELLM.replace("1.35e-05", "0.00017250000000000002")).expect("maps");
    assert_eq!(m.event.cost_usd, Some(Nanos(172_500)));
    assert_eq!(m.rounded, ["cost_usd"]);
    let m = map(&LITELLM.replace(r#""cost": 1.35e-05"#, r#""cost_usd": "0.0000000025", "revenue": 2.85e-05"#)).expect("maps");
    assert_eq!((m.event.cost_usd, m.event.revenue_usd), (Some(Nanos(2)), Some(Nanos(28_500))));
    assert_eq!(m.rounded, ["cost_usd"]);
    // LiteLLM sends null cost for models it cannot price: the catalog prices it.
    assert_eq!(map(&LITELLM.replace("1.35e-05", "null")).expect("maps").event.cost_usd, None);
    let errors = map(&LITELLM.replace("1.35e-05", "-0.5")).unwrap_err();
    assert_eq!(fields(&errors), [("data.cost", "invalid_amount")]);
    assert_eq!(errors[0].message, "must not be negative");
    assert_eq!(fields(&map(&LITELLM.replace("1.35e-05", "true")).unwrap_err()), [("data.cost", "invalid_type")]);
}

#[test]
fn unusable_events_are_refused_naming_the_cloudevent_field() {
    let errors = map(&LITELLM.replace(r#""subject": "u-1", "#, "")).unwrap_err();
    assert_eq!(fields(&errors), [("subject", "missing")]);
    let errors = map(&LITELLM.replace(r#""model": "gpt-4o-mini", "#, "")).unwrap_err();
    assert_eq!(fields(&errors), [("data.model", "missing")]);
    let errors = map(&LITELLM.replace(r#""prompt_tokens": 10"#, r#""prompt_tokens": -1"#)).unwrap_err();
    assert_eq!(fields(&errors), [("data.prompt_tokens", "invalid_type")]);
    let errors = map(&LITELLM.replace("2026-11-27T14:55:02.165177+00:00", "2020-01-01T00:00:00Z")).unwrap_err();
    assert_eq!(fields(&errors), [("time", "too_old")]);
    let errors = map(r#"{"type":"x","subject":"u"}"#).unwrap_err();
    assert_eq!(fields(&errors), [("specversion", "missing"), ("id", "missing"), ("source", "missing")]);
    assert_eq!(fields(&map("[1]").unwrap_err()), [("", "not_an_object")]);
    let errors = map(r#"{"specversion":"1.0","type":"t","id":"1","source":"s","subject":"u","data":{"model":"m","tokens":5,"input_tokens":3}}"#).unwrap_err();
    assert_eq!(fields(&errors), [("data.tokens", "conflict")]);
    let errors = map(r#"{"specversion":"1.0","type":"t","id":"1","source":"s","subject":"u","data":{"model":"m","tokens":5,"type":"image"}}"#).unwrap_err();
    assert_eq!(fields(&errors), [("data.type", "invalid_type")]);
}

#[test]
fn idempotency_keys_follow_cloudevents_uniqueness() {
    assert_eq!(idempotency_key("litellm-proxy", "abc"), "litellm-proxy/abc");
    // `/` in the source is escaped: ("a/b", "c") and ("a", "b/c") differ.
    assert_eq!(idempotency_key("a/b", "c"), "a%2Fb/c");
    assert_eq!(idempotency_key("a", "b/c"), "a/b/c");
    assert_eq!(idempotency_key("100%", "x"), "100%25/x");
    let long = idempotency_key("s", &"x".repeat(300));
    assert!(long.starts_with(HASHED_KEY_PREFIX) && long.len() == HASHED_KEY_PREFIX.len() + 64, "{long}");
    assert_ne!(long, idempotency_key("s", &"x".repeat(301)));
}

#[test]
fn tenant_paths_apply() {
    let config: CloudEventsConfig = toml::from_str("model = \"data.llm.name\"\ncost_usd = \"data.usd\"\n").expect("config");
    let mapping = &config.resolve().expect("resolves").default;
    let m = map_event(
        r#"{"specversion":"1.0","type":"t","id":"1","source":"s","subject":"u","data":{"llm":{"name":"m"},"usd":"0.5"}}"#,
        mapping,
        &TimeBounds::default(),
        now(),
    )
    .expect("maps");
    assert_eq!((m.event.model.as_str(), m.event.cost_usd), ("m", Some(Nanos(500_000_000))));
}
