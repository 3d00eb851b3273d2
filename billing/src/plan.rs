//! The pure core of the sync: for one (tenant, meter, subject, hour) window,
//! what to do given what Meterline sums now and what was pushed before.
//!
//! A window's pushed state is `pushed` (the sum of the values Stripe took),
//! `seq` (how many meter events it was given an identifier for) and
//! `pending` (a value written down before it is sent). The worker writes
//! `pending` durably, sends it under identifier `seq`, and only then adds it
//! to `pushed`; after a crash the pending value is sent again with the same
//! identifier and value, which Stripe refuses as a duplicate if it had taken
//! it: nothing is pushed twice, and nothing that was not sent is counted.

use sha2::{Digest, Sha256};

use crate::STRIPE_MAX_AGE_SECS;

/// An hour, in seconds.
pub const HOUR_SECS: i64 = 3_600;

/// A window that would reach Stripe's 35-day bound within this margin is
/// treated as too old already: a retried request must not cross it.
pub const AGE_MARGIN_SECS: i64 = HOUR_SECS;

/// Which window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub tenant: String,
    /// The Stripe meter's `event_name`.
    pub meter: String,
    /// The customer (or user) id in Meterline.
    pub subject: String,
    /// The hour's start, Unix seconds.
    pub window_start: i64,
}

/// What was pushed for a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowState {
    pub pushed: i64,
    pub seq: i64,
    /// Written down under identifier `seq`, not yet known to be taken.
    pub pending: Option<i64>,
    /// A delta Stripe will never take (the window is too old).
    pub refused: i64,
    /// The Stripe customer the pending (or last) event went to: a resent
    /// event goes where the first copy went.
    pub customer: String,
}

/// What to do with one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Pushed and current agree.
    Nothing,
    /// Write down `value` under sequence `seq`, then send it.
    Push { seq: i64, value: i64 },
    /// A crash left `value` pending under `seq`: send it again, same identifier.
    Resend { seq: i64, value: i64 },
    /// Too old for Stripe: record `value` (the whole unpushed delta) as refused.
    Refuse { value: i64 },
    /// The sum went down (events were deleted by hand): nothing is sent;
    /// Stripe's sum meters take no negative corrections from us.
    Shrunk { by: i64 },
}

/// The decision for a window whose current sum is `current` at `now`.
pub fn decide(window_start: i64, current: i64, state: &WindowState, now: i64) -> Decision {
    let too_old = is_too_old(window_start, now);
    let unsent = current - state.pushed;
    match state.pending {
        Some(value) if !too_old => Decision::Resend { seq: state.seq, value },
        // A pending value that aged out is not known to be taken or not;
        // all that is unpushed is reported refused.
        Some(_) => Decision::Refuse { value: unsent },
        None if unsent == 0 => Decision::Nothing,
        None if unsent < 0 => Decision::Shrunk { by: -unsent },
        None if too_old && unsent == state.refused => Decision::Nothing,
        None if too_old => Decision::Refuse { value: unsent },
        None => Decision::Push { seq: state.seq + 1, value: unsent },
    }
}

/// True when Stripe would refuse an event timestamped `window_start` at `now`.
pub fn is_too_old(window_start: i64, now: i64) -> bool {
    window_start < now - STRIPE_MAX_AGE_SECS + AGE_MARGIN_SECS
}

/// The start of the hour holding `t`.
pub fn hour_of(t: i64) -> i64 {
    t.div_euclid(HOUR_SECS) * HOUR_SECS
}

/// The windows a cycle at `now` looks at, half-open `[from, to)` in seconds:
/// back a day past Stripe's bound (so windows that aged out unpushed are
/// seen and reported), up to the last hour closed for `settle_secs`.
pub fn range(now: i64, settle_secs: i64) -> (i64, i64) {
    (hour_of(now - STRIPE_MAX_AGE_SECS - 86_400), hour_of(now - settle_secs))
}

/// The meter event's value from a window's sum: money in `unit_nanos`
/// nano-dollars per unit, rounded down (exact integer division); counts as they are.
pub fn value_of(sum: i64, unit_nanos: i64) -> i64 {
    if unit_nanos <= 1 { sum } else { sum.div_euclid(unit_nanos) }
}

/// The deterministic identifier of a window's `seq`-th meter event: the same
/// inputs give the same identifier in any process, different ones differ.
pub fn identifier(key: &WindowKey, seq: i64) -> String {
    let mut h = Sha256::new();
    for part in [key.tenant.as_bytes(), key.meter.as_bytes(), key.subject.as_bytes()] {
        // Length-prefixed, so that no two tuples hash the same bytes.
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(key.window_start.to_be_bytes());
    h.update(seq.to_be_bytes());
    format!("ml_{}", &hex::encode(h.finalize())[..40])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000;

    fn state(pushed: i64, seq: i64, pending: Option<i64>) -> WindowState {
        WindowState { pushed, seq, pending, refused: 0, customer: String::new() }
    }

    #[test]
    fn deltas_against_what_was_pushed() {
        let w = hour_of(NOW) - 2 * HOUR_SECS;
        assert_eq!(decide(w, 0, &WindowState::default(), NOW), Decision::Nothing);
        assert_eq!(decide(w, 70, &WindowState::default(), NOW), Decision::Push { seq: 1, value: 70 });
        assert_eq!(decide(w, 70, &state(70, 1, None), NOW), Decision::Nothing);
        // A late event: a correction with the next identifier.
        assert_eq!(decide(w, 95, &state(70, 1, None), NOW), Decision::Push { seq: 2, value: 25 });
        assert_eq!(decide(w, 60, &state(70, 1, None), NOW), Decision::Shrunk { by: 10 });
    }

    #[test]
    fn a_pending_value_is_resent_unchanged_whatever_the_sum() {
        let w = hour_of(NOW) - HOUR_SECS;
        assert_eq!(decide(w, 999, &state(70, 2, Some(25)), NOW), Decision::Resend { seq: 2, value: 25 });
    }

    #[test]
    fn too_old_windows_are_refused_once() {
        let old = hour_of(NOW - STRIPE_MAX_AGE_SECS);
        assert!(is_too_old(old, NOW));
        assert!(!is_too_old(hour_of(NOW - STRIPE_MAX_AGE_SECS) + 2 * HOUR_SECS, NOW));
        assert_eq!(decide(old, 50, &state(20, 1, None), NOW), Decision::Refuse { value: 30 });
        let refused = WindowState { refused: 30, ..state(20, 1, None) };
        assert_eq!(decide(old, 50, &refused, NOW), Decision::Nothing);
        assert_eq!(decide(old, 55, &refused, NOW), Decision::Refuse { value: 35 });
        assert_eq!(decide(old, 50, &state(20, 2, Some(30)), NOW), Decision::Refuse { value: 30 });
    }

    #[test]
    fn identifiers_are_deterministic_and_distinct() {
        let key = WindowKey { tenant: "acme".into(), meter: "cost".into(), subject: "c1".into(), window_start: 3_600 };
        assert_eq!(identifier(&key, 1), identifier(&key.clone(), 1));
        assert_ne!(identifier(&key, 1), identifier(&key, 2));
        let shifted = WindowKey { tenant: "acm".into(), meter: "ecost".into(), ..key.clone() };
        assert_ne!(identifier(&key, 1), identifier(&shifted, 1));
        assert!(identifier(&key, 1).len() <= 100);
    }

    #[test]
    fn windows_range_and_units() {
        let (from, to) = range(NOW, 300);
        assert_eq!(to, hour_of(NOW - 300));
        assert!(is_too_old(from, NOW));
        assert_eq!(from % HOUR_SECS, 0);
        assert_eq!(value_of(1_234_567_891, 10_000_000), 123);
        assert_eq!(value_of(1_234_567_891, 1), 1_234_567_891);
    }
}
