//! A reservation between Rust and its Redis hash: the arguments a script takes and the record it answers.

use meterline_limits::{Hold, LimitsError, Reservation, ReservationState};
use std::collections::HashMap;

fn parse_state(s: &str) -> Option<ReservationState> {
    Some(match s {
        "held" => ReservationState::Held,
        "committed" => ReservationState::Committed,
        "released" => ReservationState::Released,
        "expired" => ReservationState::Expired,
        _ => return None,
    })
}

/// A counter name the record's hold lines can carry (no line breaks or other control characters).
pub(crate) fn check_counter(counter: &str) -> Result<(), LimitsError> {
    if counter.is_empty() || counter.chars().any(char::is_control) {
        return Err(LimitsError::Config { key: "counter".into(), message: format!("{counter:?} is not a counter name the Redis store can keep") });
    }
    Ok(())
}

/// Holds as script arguments: a count, then (counter, amount, keep_until) each.
pub(crate) fn hold_args(holds: &[Hold]) -> Result<Vec<String>, LimitsError> {
    let mut args = vec![holds.len().to_string()];
    for h in holds {
        check_counter(&h.counter)?;
        args.extend([h.counter.clone(), h.amount.to_string(), h.keep_until.to_string()]);
    }
    Ok(args)
}

/// A record from its hash's fields (`HGETALL`'s flat list).
pub(crate) fn parse(key: &str, flat: Vec<String>) -> Result<Reservation, LimitsError> {
    let bad = |message: String| LimitsError::Corrupt { key: key.to_owned(), message };
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        fields.insert(k, v);
    }
    let field = |name: &str| fields.get(name).ok_or_else(|| bad(format!("no field {name}")));
    let int = |name: &str| field(name)?.parse::<i64>().map_err(|e| bad(format!("{name}: {e}")));
    let mut holds = Vec::new();
    for line in field("holds")?.lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(amount), Some(keep), Some(counter)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!("hold line {line:?}")));
        };
        let amount = amount.parse().map_err(|e| bad(format!("hold amount: {e}")))?;
        let keep_until = keep.parse().map_err(|e| bad(format!("hold keep_until: {e}")))?;
        holds.push(Hold { counter: counter.to_owned(), amount, keep_until });
    }
    Ok(Reservation {
        id: field("id")?.clone(),
        state: parse_state(field("state")?).ok_or_else(|| bad("unknown state".into()))?,
        created_at_ms: int("created_at_ms")?,
        expires_at_ms: int("expires_at_ms")?,
        holds,
        counted: field("counted")? == "1",
        commit_fingerprint: fields.get("fp").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_reads_back_with_exact_amounts() {
        let flat = ["id", "rsv_1.x", "state", "committed", "created_at_ms", "1", "expires_at_ms", "2", "counted", "0", "fp", "f"]
            .into_iter()
            .map(String::from)
            .chain(["holds".to_owned(), "9223372036854775807 10 u:ab:0:user 1\n-3 10 c:x".to_owned()])
            .collect();
        let r = parse("k", flat).expect("parses");
        assert_eq!(r.holds[0], Hold { counter: "u:ab:0:user 1".into(), amount: i64::MAX, keep_until: 10 });
        assert_eq!(r.holds[1].amount, -3);
        assert_eq!((r.state, r.commit_fingerprint.as_deref(), r.counted), (ReservationState::Committed, Some("f"), false));
        assert!(matches!(parse("k", vec!["id".into(), "x".into()]), Err(LimitsError::Corrupt { .. })));
    }
}
