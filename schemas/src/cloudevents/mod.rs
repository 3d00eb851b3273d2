//! CloudEvents (OpenMeter's ingest format) to usage events: reads the fields a
//! [`Mapping`] names, builds the contract's JSON and validates it with
//! [`parse_event`], so every error follows the contract's field rules and
//! names the CloudEvent field it came from.
//!
//! `source` and `id` become the idempotency key (CloudEvents' own uniqueness
//! rule), `time` absent means the time of receipt, and money is read from its
//! text and rounded half to even to the nano (clients print binary floats).

mod config;

pub use config::{CloudEventsConfig, FieldPath, Mapping, Mappings, Paths};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use crate::event::MAX_ID_BYTES;
use crate::money::Nanos;
use crate::{TimeBounds, UsageEvent, parse_event};

/// The CloudEvents version OpenMeter and this mapping accept.
pub const SPEC_VERSION: &str = "1.0";

/// Prefix of an idempotency key hashed because `<source>/<id>` was too long.
pub const HASHED_KEY_PREFIX: &str = "ce-sha256:";

/// A CloudEvent mapped and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub event: UsageEvent,
    /// The money fields whose text had digits below a nano (rounded).
    pub rounded: Vec<&'static str>,
}

/// Why one CloudEvent was refused: the CloudEvent field (`subject`,
/// `data.model`, or empty for the event as a whole) and the contract's code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

impl MapError {
    fn new(field: &str, code: &'static str, message: impl Into<String>) -> Self {
        MapError { field: field.to_owned(), code, message: message.into() }
    }
}

/// The contract event built from a CloudEvent: values passed through as the
/// JSON they were, so the contract's own rules judge their types.
#[derive(Serialize)]
struct ContractEvent<'a> {
    idempotency_key: &'a str,
    timestamp: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    feature: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a RawValue>,
    input_tokens: Token<'a>,
    output_tokens: Token<'a>,
    cached_input_tokens: Token<'a>,
    reasoning_tokens: Token<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<Money<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revenue_usd: Option<Money<'a>>,
}

/// A token count: as sent, or a count OpenMeter's examples send as a string.
#[derive(Serialize)]
#[serde(untagged)]
enum Token<'a> {
    Raw(&'a RawValue),
    Count(u64),
}

/// An amount: rounded to the nano as a decimal string, or as sent when it is
/// not a non-negative number (the contract then says why).
#[derive(Serialize)]
#[serde(untagged)]
enum Money<'a> {
    Rounded(String),
    Raw(&'a RawValue),
}

/// A JSON object's members, values unparsed.
type Object<'a> = BTreeMap<String, &'a RawValue>;

/// The CloudEvent's attributes and its `data` object, parsed once.
struct Source<'a> {
    attributes: Object<'a>,
    data: Option<Object<'a>>,
}

impl<'a> Source<'a> {
    /// The value at `path`, treating `null` as absent.
    fn get(&self, path: &FieldPath) -> Option<&'a RawValue> {
        let (first, rest) = path.segments.split_first()?;
        let value = if first == "data" && !rest.is_empty() {
            let (key, deeper) = rest.split_first()?;
            let mut value = *self.data.as_ref()?.get(key)?;
            for key in deeper {
                value = *serde_json::from_str::<Object<'a>>(value.get()).ok()?.get(key)?;
            }
            value
        } else {
            *self.attributes.get(first)?
        };
        (value.get() != "null").then_some(value)
    }

    /// A required string attribute (`id`, `source`).
    fn required_string(&self, name: &str, errors: &mut Vec<MapError>) -> Option<String> {
        let Some(raw) = self.attributes.get(name).filter(|v| v.get() != "null") else {
            errors.push(MapError::new(name, "missing", "required CloudEvent attribute is missing"));
            return None;
        };
        match serde_json::from_str::<String>(raw.get()) {
            Ok(s) if !s.is_empty() => Some(s),
            Ok(_) => {
                errors.push(MapError::new(name, "empty", "must not be empty"));
                None
            }
            Err(_) => {
                errors.push(MapError::new(name, "invalid_type", "must be a string"));
                None
            }
        }
    }
}

/// Maps one CloudEvent (its JSON text) with `mapping`; `now` is the time of
/// receipt, used when the event has no time.
pub fn map_event(json: &str, mapping: &Mapping, bounds: &TimeBounds, now: DateTime<Utc>) -> Result<Mapped, Vec<MapError>> {
    let attributes: Object<'_> = match serde_json::from_str(json) {
        Ok(a) => a,
        Err(e) if e.is_data() => return Err(vec![MapError::new("", "not_an_object", "a CloudEvent must be a JSON object")]),
        Err(e) => return Err(vec![MapError::new("", "invalid_json", format!("event is not valid JSON: {e}"))]),
    };
    let data = attributes.get("data").and_then(|d| serde_json::from_str::<Object<'_>>(d.get()).ok());
    let source = Source { attributes, data };
    let mut errors = Vec::new();

    match source.attributes.get("specversion").map(|v| serde_json::from_str::<String>(v.get())) {
        Some(Ok(v)) if v == SPEC_VERSION => {}
        None => errors.push(MapError::new("specversion", "missing", "required CloudEvent attribute is missing")),
        Some(_) => errors.push(MapError::new("specversion", "invalid_type", format!("must be \"{SPEC_VERSION}\""))),
    }
    let id = source.required_string("id", &mut errors);
    let origin = source.required_string("source", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let key = idempotency_key(origin.as_deref().unwrap_or_default(), id.as_deref().unwrap_or_default());

    let mut reader = Reader { source: &source, from: Vec::new() };
    let received;
    let timestamp = match reader.take("timestamp", &mapping.timestamp) {
        Some(t) => t,
        None => {
            received = now_json(now);
            &*received
        }
    };
    let user_id = reader.take("user_id", &mapping.user_id);
    let customer_id = reader.take("customer_id", &mapping.customer_id);
    let feature = reader.take("feature", &mapping.feature);
    let model = reader.take("model", &mapping.model);
    let provider = reader.take("provider", &mapping.provider);
    let mut counters = [
        reader.tokens("input_tokens", &mapping.input_tokens),
        reader.tokens("output_tokens", &mapping.output_tokens),
        reader.tokens("cached_input_tokens", &mapping.cached_input_tokens),
        reader.tokens("reasoning_tokens", &mapping.reasoning_tokens),
    ];
    reader.typed_tokens(mapping, &mut counters, &mut errors);
    let mut rounded = Vec::new();
    let cost_usd = reader.money("cost_usd", &mapping.cost_usd, &mut rounded);
    let revenue_usd = reader.money("revenue_usd", &mapping.revenue_usd, &mut rounded);
    if !errors.is_empty() {
        return Err(errors);
    }
    let [input_tokens, output_tokens, cached_input_tokens, reasoning_tokens] = counters.map(|c| c.unwrap_or(Token::Count(0)));
    let contract = ContractEvent {
        idempotency_key: &key,
        timestamp,
        user_id,
        customer_id,
        feature,
        model,
        provider,
        input_tokens,
        output_tokens,
        cached_input_tokens,
        reasoning_tokens,
        cost_usd,
        revenue_usd,
    };
    let text = serde_json::to_string(&contract)
        .map_err(|e| vec![MapError::new("", "invalid_json", format!("event could not be re-encoded: {e}"))])?;
    match parse_event(&text, bounds, now) {
        Ok(event) => Ok(Mapped { event, rounded }),
        Err(rejection) => Err(rejection
            .errors
            .into_iter()
            .map(|e| MapError { field: reader.origin(&e.field), code: e.code.as_str(), message: e.message })
            .collect()),
    }
}

/// The time of receipt as a JSON string.
fn now_json(now: DateTime<Utc>) -> Box<RawValue> {
    let text = format!("\"{}\"", now.to_rfc3339_opts(SecondsFormat::Micros, true));
    // An RFC 3339 timestamp is a valid JSON string body; the fallback is never taken.
    RawValue::from_string(text).unwrap_or_else(|_| unreachable!("a timestamp is valid JSON"))
}

/// Reads mapped fields and remembers which CloudEvent field each came from.
struct Reader<'s, 'a> {
    source: &'s Source<'a>,
    /// (contract field, CloudEvent field): the path read, or when none was
    /// present the first configured, so "missing" names what to send.
    from: Vec<(&'static str, String)>,
}

impl<'a> Reader<'_, 'a> {
    fn take(&mut self, field: &'static str, paths: &[FieldPath]) -> Option<&'a RawValue> {
        let found = paths.iter().find_map(|p| self.source.get(p).map(|v| (p, v)));
        let named = found.map_or_else(|| paths.first().map(|p| p.text.clone()), |(p, _)| Some(p.text.clone()));
        self.from.push((field, named.unwrap_or_else(|| field.to_owned())));
        found.map(|(_, v)| v)
    }

    fn tokens(&mut self, field: &'static str, paths: &[FieldPath]) -> Option<Token<'a>> {
        self.take(field, paths).map(token)
    }

    /// `tokens` counted as the kind `token_type` names (input when absent).
    fn typed_tokens(&mut self, mapping: &Mapping, counters: &mut [Option<Token<'a>>; 4], errors: &mut Vec<MapError>) {
        let Some(raw) = self.take("tokens", &mapping.tokens) else { return };
        let kind = self.take("token_type", &mapping.token_type);
        let kind_field = self.origin("token_type");
        let slot = match kind.map(|k| serde_json::from_str::<String>(k.get())) {
            None => 0,
            Some(Ok(k)) => match k.as_str() {
                "input" | "prompt" => 0,
                "output" | "completion" => 1,
                "cached_input" | "cached" => 2,
                "reasoning" => 3,
                _ => {
                    errors.push(MapError::new(&kind_field, "invalid_type", "must be input, output, cached_input or reasoning"));
                    return;
                }
            },
            Some(Err(_)) => {
                errors.push(MapError::new(&kind_field, "invalid_type", "must be a string: input, output, cached_input or reasoning"));
                return;
            }
        };
        let target = ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"][slot];
        if counters[slot].is_some() {
            let tokens_field = self.origin("tokens");
            let other = self.origin(target);
            errors.push(MapError::new(&tokens_field, "conflict", format!("counts {target}, which {other} already gives")));
            return;
        }
        counters[slot] = Some(token(raw));
        // Errors in the count now belong to the `tokens` path.
        let tokens_field = self.origin("tokens");
        self.from.retain(|(f, _)| *f != target);
        self.from.push((target, tokens_field));
    }

    fn money(&mut self, field: &'static str, paths: &[FieldPath], rounded: &mut Vec<&'static str>) -> Option<Money<'a>> {
        let raw = self.take(field, paths)?;
        let text = raw.get();
        let decimal = if text.starts_with('"') { serde_json::from_str::<String>(text).ok() } else { Some(text.to_owned()) };
        match decimal.map(|d| Nanos::parse_rounded_non_negative(&d)) {
            Some(Ok(r)) => {
                if r.rounded {
                    rounded.push(field);
                }
                Some(Money::Rounded(r.value.to_string()))
            }
            // Not a non-negative decimal: the contract says why, in its words.
            _ => Some(Money::Raw(raw)),
        }
    }

    /// The CloudEvent field a contract field was read from.
    fn origin(&self, field: &str) -> String {
        if field == "idempotency_key" {
            return "id".to_owned();
        }
        self.from.iter().rev().find(|(f, _)| *f == field).map_or_else(|| field.to_owned(), |(_, p)| p.clone())
    }
}

/// A token count as sent; OpenMeter's examples send counts as strings.
fn token(raw: &RawValue) -> Token<'_> {
    match serde_json::from_str::<String>(raw.get()).ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(n) => Token::Count(n),
        None => Token::Raw(raw),
    }
}

/// `<source>/<id>`, with `%` and `/` escaped in `source` so that the first
/// `/` always ends it; hashed when longer than the contract allows.
pub fn idempotency_key(source: &str, id: &str) -> String {
    let key = format!("{}/{id}", source.replace('%', "%25").replace('/', "%2F"));
    if key.len() <= MAX_ID_BYTES {
        return key;
    }
    format!("{HASHED_KEY_PREFIX}{}", hex::encode(Sha256::digest(key.as_bytes())))
}

#[cfg(test)]
mod tests;
