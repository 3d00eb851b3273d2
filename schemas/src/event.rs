//! The usage event contract: field rules, parsing and validation of one event.
//!
//! One usage event is one AI action by one end user. Validation is field by
//! field so that a rejected event carries every reason at once, each naming its
//! field; a client fixing its integration should not have to play whack-a-mole.
//! The published JSON Schema (`schemas/event.schema.json`) states the same rules
//! and a test keeps the two in step.

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::money::{MoneyError, NANOS_PER_UNIT, Nanos};

mod read;
pub(crate) use read::EventSeed;
use read::{Fill, string_of};

/// Longest identifier (`idempotency_key`, `user_id`, `customer_id`), in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest name (`feature`, `model`, `provider`, `environment`), in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Largest `metadata` object, in bytes of JSON text as sent.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Largest token count of one kind in one event. A billion tokens is two orders
/// of magnitude past any context window; anything larger is a unit mistake, and
/// the cap keeps sums over billions of events inside 64 bits.
pub const MAX_TOKENS: u64 = 1_000_000_000;
/// Largest amount (cost, revenue, credits) of one event: one million units.
pub const MAX_AMOUNT: Nanos = Nanos(1_000_000 * NANOS_PER_UNIT);
/// Environment assumed when an event names none.
pub const DEFAULT_ENVIRONMENT: &str = "production";

/// Every top-level field of the contract, in documentation order.
pub const FIELDS: &[&str] = &[
    "idempotency_key",
    "timestamp",
    "user_id",
    "customer_id",
    "feature",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_usd",
    "revenue_usd",
    "credits",
    "billable",
    "environment",
    "metadata",
];

/// Fields an event must carry.
pub const REQUIRED_FIELDS: &[&str] = &["idempotency_key", "timestamp", "user_id", "feature", "model"];

/// A validated usage event. Amounts are exact nano-units; see [`crate::money`].
///
/// Token counts are disjoint: `input_tokens` are uncached input tokens,
/// `cached_input_tokens` are input tokens served from the provider's cache,
/// `output_tokens` are visible output and `reasoning_tokens` hidden reasoning
/// output. Cost from the price catalog is the sum of each count times its price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub idempotency_key: String,
    pub timestamp: DateTime<Utc>,
    pub user_id: String,
    pub customer_id: Option<String>,
    pub feature: String,
    pub model: String,
    pub provider: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
    /// Provider cost in nano-USD, when the client knows it.
    pub cost_usd: Option<Nanos>,
    /// What the tenant charged for the action, in nano-USD.
    pub revenue_usd: Option<Nanos>,
    /// What the tenant charged, in nano-credits (converted with the tenant's credit price).
    pub credits: Option<Nanos>,
    pub billable: bool,
    pub environment: String,
    /// The `metadata` object as the JSON text the client sent.
    pub metadata: Option<String>,
}

/// Stable, machine-readable reason a field was refused. Used as the metrics
/// label for rejections, so the set is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotAnObject,
    InvalidJson,
    Missing,
    InvalidType,
    Empty,
    TooLong,
    ControlCharacter,
    InvalidTimestamp,
    TooOld,
    TooFarInFuture,
    InvalidAmount,
    OutOfRange,
    UnknownField,
    DuplicateField,
    Conflict,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotAnObject => "not_an_object",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::Missing => "missing",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::Empty => "empty",
            ErrorCode::TooLong => "too_long",
            ErrorCode::ControlCharacter => "control_character",
            ErrorCode::InvalidTimestamp => "invalid_timestamp",
            ErrorCode::TooOld => "too_old",
            ErrorCode::TooFarInFuture => "too_far_in_future",
            ErrorCode::InvalidAmount => "invalid_amount",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::DuplicateField => "duplicate_field",
            ErrorCode::Conflict => "conflict",
        }
    }
}

/// One reason one field of one event was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The top-level field, or empty when the event as a whole is at fault.
    pub field: String,
    pub code: ErrorCode,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        FieldError { field: field.to_owned(), code, message: message.into() }
    }
}

/// An event that failed validation, with every reason found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The event's key when it had a readable one, so the client can match the answer.
    pub idempotency_key: Option<String>,
    pub errors: Vec<FieldError>,
}

/// The time bounds an event must fall within. Both are configuration; the past
/// bound must not exceed the aggregator's dedupe window, or a retry older than
/// the window could be counted twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeBounds {
    /// Oldest accepted event time, in seconds before now (default 35 days).
    #[serde(default = "TimeBounds::default_max_past_secs")]
    #[serde(deserialize_with = "crate::duration::secs")]
    pub max_past_secs: u64,
    /// Newest accepted event time, in seconds after now (default 5 minutes).
    #[serde(default = "TimeBounds::default_max_future_secs")]
    #[serde(deserialize_with = "crate::duration::secs")]
    pub max_future_secs: u64,
}

impl TimeBounds {
    fn default_max_past_secs() -> u64 {
        35 * 24 * 3600
    }
    fn default_max_future_secs() -> u64 {
        300
    }

    /// Checks what serde cannot, naming the key; every mode that validates
    /// events runs it.
    pub fn validate(&self) -> Result<(), crate::SchemaError> {
        if self.max_past_secs == 0 {
            return Err(crate::SchemaError::config("events.max_past_secs", "must be positive"));
        }
        Ok(())
    }
}

impl Default for TimeBounds {
    fn default() -> Self {
        TimeBounds { max_past_secs: Self::default_max_past_secs(), max_future_secs: Self::default_max_future_secs() }
    }
}

/// Parses and validates one event given as JSON text.
///
/// `now` is injected so that callers (and tests) decide what "now" is.
pub fn parse_event(json: &str, bounds: &TimeBounds, now: DateTime<Utc>) -> Result<UsageEvent, Rejection> {
    let trimmed = json.trim_start();
    if !trimmed.starts_with('{') {
        let code = if serde_json::from_str::<&RawValue>(json).is_ok() { ErrorCode::NotAnObject } else { ErrorCode::InvalidJson };
        let message = match code {
            ErrorCode::NotAnObject => "an event must be a JSON object".to_owned(),
            _ => describe_json_error(json),
        };
        return Err(Rejection { idempotency_key: None, errors: vec![FieldError::new("", code, message)] });
    }
    let mut builder = Builder::default();
    // What `serde_json::from_str` does (the same errors), into the builder.
    let mut de = serde_json::Deserializer::from_str(json);
    if let Err(e) = Fill(&mut builder).deserialize(&mut de).and_then(|()| de.end()) {
        return Err(Rejection {
            idempotency_key: None,
            errors: vec![FieldError::new("", ErrorCode::InvalidJson, format!("event is not valid JSON: {e}"))],
        });
    }
    builder.build(bounds, now)
}

fn describe_json_error(json: &str) -> String {
    match serde_json::from_str::<&RawValue>(json) {
        Ok(_) => "event is valid JSON".to_owned(),
        Err(e) => format!("event is not valid JSON: {e}"),
    }
}

#[derive(Default)]
struct Builder<'a> {
    values: [Option<&'a RawValue>; FIELDS.len()],
    errors: Vec<FieldError>,
}

impl<'a> Builder<'a> {
    /// Takes one member as read; a duplicate or unknown name is an error.
    fn member(&mut self, key: &str, value: &'a RawValue) {
        match FIELDS.iter().position(|f| *f == key) {
            Some(i) if self.values[i].is_some() => {
                self.errors.push(FieldError::new(key, ErrorCode::DuplicateField, "field appears more than once"))
            }
            Some(i) => self.values[i] = Some(value),
            None => self.errors.push(FieldError::new(
                &printable(key),
                ErrorCode::UnknownField,
                "unknown field; see the event contract for the accepted fields",
            )),
        }
    }

    fn build(mut self, bounds: &TimeBounds, now: DateTime<Utc>) -> Result<UsageEvent, Rejection> {
        let idempotency_key = self.id("idempotency_key", true, MAX_ID_BYTES);
        let timestamp = self.timestamp(bounds, now);
        let user_id = self.id("user_id", true, MAX_ID_BYTES);
        let customer_id = self.id("customer_id", false, MAX_ID_BYTES);
        let feature = self.id("feature", true, MAX_NAME_BYTES);
        let model = self.id("model", true, MAX_NAME_BYTES);
        let provider = self.id("provider", false, MAX_NAME_BYTES);
        let input_tokens = self.tokens("input_tokens");
        let output_tokens = self.tokens("output_tokens");
        let cached_input_tokens = self.tokens("cached_input_tokens");
        let reasoning_tokens = self.tokens("reasoning_tokens");
        let cost_usd = self.amount("cost_usd");
        let revenue_usd = self.amount("revenue_usd");
        let credits = self.amount("credits");
        if revenue_usd.is_some() && credits.is_some() {
            self.errors.push(FieldError::new(
                "credits",
                ErrorCode::Conflict,
                "give revenue either as revenue_usd or as credits, not both",
            ));
        }
        let billable = self.boolean("billable", true);
        let environment = self.id("environment", false, MAX_NAME_BYTES);
        let metadata = self.metadata();

        if !self.errors.is_empty() {
            return Err(Rejection { idempotency_key, errors: self.errors });
        }
        // Every required field produced an error if absent, so these hold here.
        match (idempotency_key, timestamp, user_id, feature, model) {
            (Some(idempotency_key), Some(timestamp), Some(user_id), Some(feature), Some(model)) => Ok(UsageEvent {
                idempotency_key,
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
                credits,
                billable,
                environment: environment.unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned()),
                metadata,
            }),
            (idempotency_key, ..) => Err(Rejection {
                idempotency_key,
                errors: vec![FieldError::new("", ErrorCode::Missing, "a required field is missing")],
            }),
        }
    }

    /// The raw value of `field`, treating JSON `null` as absent.
    fn raw(&self, field: &str) -> Option<&'a RawValue> {
        let i = FIELDS.iter().position(|f| *f == field)?;
        self.values[i].filter(|v| v.get() != "null")
    }

    fn missing(&mut self, field: &str, required: bool) {
        if required {
            self.errors.push(FieldError::new(field, ErrorCode::Missing, "required field is missing"));
        }
    }

    fn id(&mut self, field: &str, required: bool, max: usize) -> Option<String> {
        let Some(raw) = self.raw(field) else {
            self.missing(field, required);
            return None;
        };
        let Some(text) = string_of(raw) else {
            self.errors.push(FieldError::new(field, ErrorCode::InvalidType, "must be a string"));
            return None;
        };
        if text.is_empty() {
            self.errors.push(FieldError::new(field, ErrorCode::Empty, "must not be empty"));
            return None;
        }
        if text.len() > max {
            self.errors.push(FieldError::new(field, ErrorCode::TooLong, format!("must be at most {max} bytes")));
            return None;
        }
        if text.chars().any(char::is_control) {
            self.errors.push(FieldError::new(field, ErrorCode::ControlCharacter, "must not contain control characters"));
            return None;
        }
        Some(text.into_owned())
    }

    fn timestamp(&mut self, bounds: &TimeBounds, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        const FIELD: &str = "timestamp";
        let Some(raw) = self.raw(FIELD) else {
            self.missing(FIELD, true);
            return None;
        };
        let Some(text) = string_of(raw) else {
            self.errors.push(FieldError::new(FIELD, ErrorCode::InvalidType, "must be an RFC 3339 string"));
            return None;
        };
        let Ok(parsed) = DateTime::parse_from_rfc3339(&text) else {
            self.errors.push(FieldError::new(
                FIELD,
                ErrorCode::InvalidTimestamp,
                "must be an RFC 3339 timestamp with a UTC offset, e.g. 2026-11-23T10:15:00Z",
            ));
            return None;
        };
        let ts = parsed.with_timezone(&Utc);
        let oldest = now - chrono::Duration::seconds(bounds.max_past_secs as i64);
        let newest = now + chrono::Duration::seconds(bounds.max_future_secs as i64);
        if ts < oldest {
            self.errors.push(FieldError::new(
                FIELD,
                ErrorCode::TooOld,
                format!("is more than {} seconds in the past", bounds.max_past_secs),
            ));
            return None;
        }
        if ts > newest {
            self.errors.push(FieldError::new(
                FIELD,
                ErrorCode::TooFarInFuture,
                format!("is more than {} seconds in the future", bounds.max_future_secs),
            ));
            return None;
        }
        Some(ts)
    }

    fn tokens(&mut self, field: &str) -> u64 {
        let Some(raw) = self.raw(field) else { return 0 };
        match serde_json::from_str::<u64>(raw.get()) {
            Ok(n) if n <= MAX_TOKENS => n,
            Ok(_) => {
                self.errors.push(FieldError::new(field, ErrorCode::OutOfRange, format!("must be at most {MAX_TOKENS}")));
                0
            }
            Err(_) => {
                self.errors.push(FieldError::new(field, ErrorCode::InvalidType, "must be a non-negative integer"));
                0
            }
        }
    }

    fn amount(&mut self, field: &str) -> Option<Nanos> {
        let raw = self.raw(field)?;
        let text = raw.get();
        // A decimal string or a bare JSON number; both are read from their text,
        // never through a float.
        let parsed = if text.starts_with('"') {
            match string_of(raw) {
                Some(s) => Nanos::parse_non_negative(&s),
                None => Err(MoneyError::Syntax),
            }
        } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            Nanos::parse_non_negative(text)
        } else {
            self.errors.push(FieldError::new(field, ErrorCode::InvalidType, "must be a decimal number or a decimal string"));
            return None;
        };
        match parsed {
            Ok(v) if v <= MAX_AMOUNT => Some(v),
            Ok(_) => {
                self.errors.push(FieldError::new(field, ErrorCode::OutOfRange, format!("must be at most {MAX_AMOUNT}")));
                None
            }
            Err(e) => {
                self.errors.push(FieldError::new(field, ErrorCode::InvalidAmount, e.to_string()));
                None
            }
        }
    }

    fn boolean(&mut self, field: &str, default: bool) -> bool {
        let Some(raw) = self.raw(field) else { return default };
        match raw.get() {
            "true" => true,
            "false" => false,
            _ => {
                self.errors.push(FieldError::new(field, ErrorCode::InvalidType, "must be true or false"));
                default
            }
        }
    }

    fn metadata(&mut self) -> Option<String> {
        const FIELD: &str = "metadata";
        let raw = self.raw(FIELD)?;
        let text = raw.get();
        if !text.starts_with('{') {
            self.errors.push(FieldError::new(FIELD, ErrorCode::InvalidType, "must be a JSON object"));
            return None;
        }
        if text.len() > MAX_METADATA_BYTES {
            self.errors.push(FieldError::new(
                FIELD,
                ErrorCode::TooLong,
                format!("must be at most {MAX_METADATA_BYTES} bytes of JSON"),
            ));
            return None;
        }
        Some(text.to_owned())
    }
}

/// A field name as it may be echoed back: bounded and free of control characters.
fn printable(name: &str) -> String {
    let mut out: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    if out.len() < name.len() && name.chars().count() > 64 {
        out.push('…');
    }
    out
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(de::Error::custom("error codes are produced, never read"))
    }
}
