//! Splits a request body into the JSON text of each event, without parsing the events.
//!
//! Three shapes are accepted: a JSON array of events, an object `{"events": [...]}`,
//! and NDJSON (one event per line). A JSON body that does not parse is refused as a
//! whole (the client sent something other than what it meant). An NDJSON line that
//! does not parse is only that event's problem: log shippers send NDJSON line by
//! line, and one torn line must not turn a whole batch into a poison pill.

use serde::Deserialize;
use serde_json::value::RawValue;

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
