//! Reservations: the record a store keeps, its self-describing id, and its state machine (pure).
//!
//! ```text
//!            commit                     counted (the metered event reached the counters)
//!   Held ──────────────► Committed ───────────────────► Committed, counted (no holds)
//!    │  │ release/expiry                ▲
//!    │  └──────────────► Released / Expired (no holds)   │ commit after expiry: still metered
//!    └─ counted before the commit is recorded ───────────┘
//! ```
//!
//! A hold lives until its reservation is released, expires, or its metered
//! event is counted; a committed hold carries the actual amounts and does not
//! expire, so committed usage is always either held or counted.
//!
//! The id carries what the commit needs to meter the event (user, customer,
//! feature, model, provider, environment) after a random nonce, so a commit
//! meters even while the store is unreachable. The metered event's
//! idempotency key is `rsv_` and the nonce: a retried commit meters once.

use serde::{Deserialize, Serialize};

use crate::error::Invalid;

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    Held,
    Committed,
    Released,
    Expired,
}

/// An amount held on one counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub counter: String,
    pub amount: i64,
    /// Unix seconds the counter is kept until (see `Counter::keep_until`).
    pub keep_until: i64,
}

/// What the reserved call is: the metered event's identity fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    pub feature: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub environment: String,
    /// When the reservation was made: the metered event's time when the
    /// commit gives none, so a retried commit meters the same event.
    pub reserved_at_ms: i64,
    /// Allowed while the store was unreachable, so never stored: its commit
    /// meters without finding a record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
}

/// A reservation as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: String,
    pub state: ReservationState,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// What is held now; empty once released, expired or counted.
    pub holds: Vec<Hold>,
    /// True once the metered event was counted.
    pub counted: bool,
    /// A fingerprint of the committed event, once committed by a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_fingerprint: Option<String>,
}

impl Reservation {
    /// The state as of `now_ms`: a hold past its expiry is expired even
    /// before a store sweeps it.
    pub fn state_at(&self, now_ms: i64) -> ReservationState {
        if self.state == ReservationState::Held && self.expires_at_ms <= now_ms { ReservationState::Expired } else { self.state }
    }
}

/// Why a commit or a release was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    /// Released before: its call's usage was declared not to happen.
    Released,
    /// Committed before: a committed call's usage cannot be released.
    Committed,
    /// Committed before with different usage.
    DifferentUsage,
}

/// A commit's transition: `Ok` with the new record (unchanged if the same
/// commit was recorded before).
pub fn commit(mut r: Reservation, holds: Vec<Hold>, fingerprint: &str, now_ms: i64) -> Result<Reservation, Refusal> {
    match r.state_at(now_ms) {
        ReservationState::Released => Err(Refusal::Released),
        ReservationState::Committed => match r.commit_fingerprint.as_deref() {
            Some(f) if f != fingerprint => Err(Refusal::DifferentUsage),
            Some(_) => Ok(r),
            None => {
                // Counted before this commit was recorded.
                r.commit_fingerprint = Some(fingerprint.to_owned());
                Ok(r)
            }
        },
        ReservationState::Held | ReservationState::Expired => {
            r.state = ReservationState::Committed;
            r.commit_fingerprint = Some(fingerprint.to_owned());
            r.holds = if r.counted { Vec::new() } else { holds.into_iter().filter(|h| h.amount != 0).collect() };
            Ok(r)
        }
    }
}

/// A release's transition.
pub fn release(mut r: Reservation, now_ms: i64) -> Result<Reservation, Refusal> {
    match r.state_at(now_ms) {
        ReservationState::Committed => Err(Refusal::Committed),
        ReservationState::Released => Ok(r),
        ReservationState::Expired => {
            r.state = ReservationState::Expired;
            r.holds.clear();
            Ok(r)
        }
        ReservationState::Held => {
            r.state = ReservationState::Released;
            r.holds.clear();
            Ok(r)
        }
    }
}

/// The transition when the reservation's metered event is counted.
pub fn counted(mut r: Reservation) -> Reservation {
    r.counted = true;
    r.holds.clear();
    if matches!(r.state, ReservationState::Held | ReservationState::Expired) {
        r.state = ReservationState::Committed;
    }
    r
}

/// The transition of a hold past its expiry.
pub fn expire(mut r: Reservation) -> Reservation {
    if r.state == ReservationState::Held {
        r.state = ReservationState::Expired;
        r.holds.clear();
    }
    r
}

/// The prefix of a metered reservation's idempotency key.
pub const KEY_PREFIX: &str = "rsv_";

/// A fresh reservation id for `action`: `rsv_<32 hex>.<hex of the action's JSON>`.
pub fn new_id(action: &Action) -> String {
    let mut nonce = [0u8; 16];
    // The OS generator failing leaves zeros; the clock keeps ids distinct.
    if getrandom::fill(&mut nonce).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        nonce = now.to_le_bytes();
    }
    let json = serde_json::to_vec(action).unwrap_or_default();
    format!("{KEY_PREFIX}{}.{}", hex::encode(nonce), hex::encode(json))
}

/// The metered event's idempotency key, and the action, from a reservation id.
pub fn parse_id(id: &str) -> Result<(String, Action), Invalid> {
    let bad = || Invalid::new("reservation_id", "is not a reservation id this service issued");
    let (key, action) = id.split_once('.').ok_or_else(bad)?;
    let nonce = key.strip_prefix(KEY_PREFIX).ok_or_else(bad)?;
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let json = hex::decode(action).map_err(|_| bad())?;
    let action: Action = serde_json::from_slice(&json).map_err(|_| bad())?;
    Ok((key.to_owned(), action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> Reservation {
        Reservation {
            id: "r".into(),
            state: ReservationState::Held,
            created_at_ms: 0,
            expires_at_ms: 1_000,
            holds: vec![Hold { counter: "c".into(), amount: 5, keep_until: 0 }],
            counted: false,
            commit_fingerprint: None,
        }
    }

    #[test]
    fn commit_replaces_the_hold_and_a_retry_is_the_same() {
        let actual = vec![Hold { counter: "c".into(), amount: 1, keep_until: 0 }];
        let c = commit(held(), actual.clone(), "f", 10).expect("commits");
        assert_eq!((c.state, c.holds.clone()), (ReservationState::Committed, actual.clone()));
        assert_eq!(commit(c.clone(), actual.clone(), "f", 20), Ok(c.clone()));
        assert_eq!(commit(c.clone(), actual, "g", 20), Err(Refusal::DifferentUsage));
        assert_eq!(release(c, 30), Err(Refusal::Committed));
    }

    #[test]
    fn a_commit_after_expiry_still_holds_until_counted() {
        let actual = vec![Hold { counter: "c".into(), amount: 1, keep_until: 0 }];
        let c = commit(held(), actual, "f", 5_000).expect("never refused for expiry");
        assert_eq!(c.holds.len(), 1);
        let n = counted(c);
        assert!(n.holds.is_empty() && n.counted && n.state == ReservationState::Committed);
    }

    #[test]
    fn counted_before_the_commit_is_recorded_then_committed() {
        let n = counted(held());
        assert_eq!(n.state, ReservationState::Committed);
        let c = commit(n, vec![Hold { counter: "c".into(), amount: 1, keep_until: 0 }], "f", 10).expect("recorded");
        assert!(c.holds.is_empty(), "already counted: nothing more to hold");
        assert_eq!(c.commit_fingerprint.as_deref(), Some("f"));
    }

    #[test]
    fn release_is_idempotent_and_frees_the_hold() {
        let r = release(held(), 10).expect("released");
        assert!(r.holds.is_empty());
        assert_eq!(release(r.clone(), 20), Ok(r.clone()));
        assert_eq!(commit(r, Vec::new(), "f", 30), Err(Refusal::Released));
        assert_eq!(release(held(), 2_000).map(|r| r.state), Ok(ReservationState::Expired));
    }

    #[test]
    fn ids_carry_the_action_and_refuse_anything_else() {
        let action = Action {
            user_id: "u:1".into(),
            customer_id: Some("c".into()),
            feature: "chat".into(),
            model: "gpt-4.1".into(),
            provider: None,
            environment: "production".into(),
            reserved_at_ms: 1,
            degraded: false,
        };
        let id = new_id(&action);
        let (key, back) = parse_id(&id).expect("parses");
        assert_eq!(back, action);
        assert!(key.starts_with(KEY_PREFIX) && key.len() == 36);
        assert_ne!(new_id(&action), id);
        for bad in ["", "rsv_", "x.7b7d", &id.replace("rsv_", "rsx_"), &format!("{key}.zz")] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }
}
