//! Splits a request body into its events: the JSON text of each, or for an array body the parsed events in the same pass.
//!
//! Three shapes are accepted: a JSON array of events, an object `{"events": [...]}`,
//! and NDJSON (one event per line). A JSON body that does not parse is refused as a
//! whole (the client sent something other than what it meant). An NDJSON line that
//! does not parse is only that event's problem: log shippers send NDJSON line by
//! line, and one torn line must not turn a whole batch into a poison pill.
//!
//! [`parse_array`] is the fast path for the usual shape, a JSON array: it
//! splits the body and parses its events in one pass, where [`split`] then
//! [`parse_event`](crate::parse_event) read every event twice (a tenth of
//! ingest's instructions per event; bench/PROFILE.md, "Ingest"). It answers
//! only for bodies it reads whole; any other takes the two passes, which
//! alone decide every error.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

use crate::event::{EventSeed, Rejection, TimeBounds, UsageEvent};

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
}

/// Why a body is not a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("body is not valid JSON at line {line}, column {column}: {message}")]
    Syntax { line: usize, column: usize, message: String },
    #[error("body must be a JSON array of events or an object {{\"events\": [...]}}")]
    Shape,
    #[error("batch has more than {limit} events")]
    TooManyEvents { limit: usize },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// The JSON text of each event in the body, in order.
pub fn split(body: &str, format: BodyFormat, max_events: usize) -> Result<Vec<&str>, BatchError> {
    let events: Vec<&str> = match format {
        BodyFormat::Ndjson => body
            .split('\n')
            .map(|line| line.strip_suffix('\r').unwrap_or(line))
            .filter(|line| !line.trim().is_empty())
            .collect(),
        BodyFormat::Json => {
            let first = body.trim_start().as_bytes().first().copied();
            match first {
                Some(b'[') => serde_json::from_str::<Vec<&RawValue>>(body)
                    .map_err(syntax)?
                    .into_iter()
                    .map(RawValue::get)
                    .collect(),
                Some(b'{') => {
                    let wrapped = serde_json::from_str::<Wrapped<'_>>(body).map_err(|e| {
                        if e.is_data() { BatchError::Shape } else { syntax(e) }
                    })?;
                    wrapped.events.into_iter().map(RawValue::get).collect()
                }
                None => return Err(BatchError::Syntax { line: 1, column: 0, message: "body is empty".to_owned() }),
                Some(_) => {
                    // Tell a scalar body (wrong shape) from garbage (bad syntax).
                    return Err(match serde_json::from_str::<&RawValue>(body) {
                        Ok(_) => BatchError::Shape,
                        Err(e) => syntax(e),
                    });
                }
            }
        }
    };
    if events.len() > max_events {
        return Err(BatchError::TooManyEvents { limit: max_events });
    }
    Ok(events)
}

/// Each event of a JSON array body, parsed as [`parse_event`](crate::parse_event)
/// would parse its text, in one pass; `None` when the body is not an array
/// of at most `max_events` events that reads without error, and [`split`]
/// must find out why.
pub fn parse_array(
    body: &str,
    max_events: usize,
    bounds: &TimeBounds,
    now: DateTime<Utc>,
) -> Option<Vec<Result<UsageEvent, Rejection>>> {
    if body.trim_start().as_bytes().first() != Some(&b'[') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(body);
    let events = de.deserialize_seq(Events { seed: EventSeed { bounds, now }, max_events }).ok()??;
    de.end().ok()?;
    Some(events)
}

/// The elements of a batch array, parsed; `None` past `max_events`.
struct Events<'t> {
    seed: EventSeed<'t>,
    max_events: usize,
}

impl<'de> Visitor<'de> for Events<'_> {
    type Value = Option<Vec<Result<UsageEvent, Rejection>>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let mut events = Vec::new();
        while let Some(event) = seq.next_element_seed(EventSeed { bounds: self.seed.bounds, now: self.seed.now })? {
            if events.len() == self.max_events {
                // Over the limit: stop here; the caller's split reports it.
                return Ok(None);
            }
            events.push(event);
        }
        Ok(Some(events))
    }
}

fn syntax(e: serde_json::Error) -> BatchError {
    let message = e.to_string();
    // serde_json appends " at line L column C"; the position is reported separately.
    let message = match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    };
    BatchError::Syntax { line: e.line(), column: e.column(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_shapes() {
        assert_eq!(split(r#"[{"a":1}, {"b":2}]"#, BodyFormat::Json, 10).unwrap(), vec![r#"{"a":1}"#, r#"{"b":2}"#]);
        assert_eq!(split(r#" {"events": [{"a":1}]} "#, BodyFormat::Json, 10).unwrap(), vec![r#"{"a":1}"#]);
        assert_eq!(split("{\"a\":1}\r\n\n  \n{oops\n", BodyFormat::Ndjson, 10).unwrap(), vec!["{\"a\":1}", "{oops"]);
        assert!(split("[]", BodyFormat::Json, 10).unwrap().is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_batch() {
        assert!(matches!(split("[{\"a\":1},", BodyFormat::Json, 10), Err(BatchError::Syntax { line: 1, .. })));
        assert!(matches!(split("\n\n  [1,\n  x]", BodyFormat::Json, 10), Err(BatchError::Syntax { line: 4, column: 3, .. })));
        assert_eq!(split("42", BodyFormat::Json, 10), Err(BatchError::Shape));
        assert_eq!(split(r#"{"evnts": []}"#, BodyFormat::Json, 10), Err(BatchError::Shape));
        assert!(matches!(split("", BodyFormat::Json, 10), Err(BatchError::Syntax { .. })));
        assert_eq!(split("[1,2,3]", BodyFormat::Json, 2), Err(BatchError::TooManyEvents { limit: 2 }));
        assert_eq!(split("{}\n{}\n{}", BodyFormat::Ndjson, 2), Err(BatchError::TooManyEvents { limit: 2 }));
    }

    /// The one-pass path answers exactly as split then `parse_event` do, and
    /// leaves every body it cannot read whole to them.
    #[test]
    fn parse_array_matches_split_then_parse() {
        let now = chrono::Utc::now();
        let bounds = TimeBounds::default();
        let ts = (now - chrono::Duration::minutes(1)).to_rfc3339();
        let good = format!(r#"{{"idempotency_key":"k1","timestamp":"{ts}","user_id":"u","feature":"chat","model":"gpt-4o","cost_usd":"0.001"}}"#);
        let escaped = format!(r#"{{"idempotency_k\u0065y":"k\"2","timestamp":"{ts}","user_id":"u\u00e9","feature":"chat","model":"m"}}"#);
        let faults = format!(r#"{{"idempotency_key":"k3","timestamp":"{ts}","user_id":"u","user_id":"v","feature":"","model":7,"extra":1,"input_tokens":-1,"metadata":[]}}"#);
        let control = r#"{"idempotency_key":"k\u0001","timestamp":"nope","user_id":null}"#;
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        for body in [
            format!("[{good}, {escaped},{faults} , {control}]"),
            format!(" [ {good}, 1, -2.5, \"text\", null, true, [1, {{\"a\": 2}}], {deep}, {{}} ] "),
            "[]".to_owned(),
        ] {
            let fused = parse_array(&body, 100, &bounds, now).unwrap_or_else(|| panic!("reads whole: {body:.200}"));
            let two_pass: Vec<_> = split(&body, BodyFormat::Json, 100).unwrap().into_iter().map(|t| crate::parse_event(t, &bounds, now)).collect();
            assert_eq!(fused, two_pass, "{body:.200}");
        }
        // Left to split, which reports why (or, for 1e400, refuses only the event).
        for body in [
            format!("[{good},{good}]"),      // over the limit of 1
            format!("[{good},"),             // syntax
            format!("{{\"events\":[{good}]}}"), // the wrapped shape
            "[1e400]".to_owned(),            // a number serde_json will not hold
            "42".to_owned(),
        ] {
            assert!(parse_array(&body, 1, &bounds, now).is_none(), "{body:.200}");
        }
        assert_eq!(split("[1e400]", BodyFormat::Json, 1).unwrap().len(), 1);
    }

    #[test]
    fn deep_nesting_is_skimmed_not_recursed() {
        // Event texts are captured without building values, so depth costs no
        // stack; the event itself is refused later as not an object.
        let deep = format!("[{}{}]", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(split(&deep, BodyFormat::Json, 10).unwrap().len(), 1);
        let unbalanced = format!("[{}", "[".repeat(100_000));
        assert!(matches!(split(&unbalanced, BodyFormat::Json, 10), Err(BatchError::Syntax { .. })));
    }
}
