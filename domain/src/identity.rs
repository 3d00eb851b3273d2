//! An event's dedupe identity (tenant and idempotency key) and its payload
//! fingerprint, and the decision every store makes from them.

use chrono::DateTime;
use meterline_schemas::UsageEvent;
use meterline_schemas::wire;

/// The dedupe identity of an event: a 128-bit hash of tenant and key.
pub fn key_hash(tenant: &str, idempotency_key: &str) -> u128 {
    let mut buf = Vec::with_capacity(tenant.len() + 1 + idempotency_key.len());
    buf.extend_from_slice(tenant.as_bytes());
    buf.push(0);
    buf.extend_from_slice(idempotency_key.as_bytes());
    xxhash_rust::xxh3::xxh3_128(&buf)
}

/// A stable hash of an event's payload, to tell a retry (same payload) from a
/// conflicting copy. It hashes the v1 wire encoding with the ingest time
/// zeroed, so two copies compare equal exactly when every field agrees.
pub fn fingerprint(tenant: &str, event: &UsageEvent) -> u64 {
    let mut buf = Vec::with_capacity(192);
    wire::encode_parts_into(tenant, DateTime::from_timestamp_nanos(0), event, &mut buf);
    xxhash_rust::xxh3::xxh3_64(&buf)
}

/// What becomes of a copy of an event, given the payload fingerprint already
/// written under its (tenant, idempotency key), if any. The first copy wins;
/// every store (ClickHouse pipeline, embedded) decides through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// First copy: write and count it.
    New,
    /// Same payload as the first copy: a client retry, dropped.
    Retry,
    /// Different payload under a used key: dropped, counted and logged.
    Conflict,
}

impl Decision {
    pub fn of(seen: Option<u64>, fingerprint: u64) -> Decision {
        match seen {
            None => Decision::New,
            Some(f) if f == fingerprint => Decision::Retry,
            Some(_) => Decision::Conflict,
        }
    }

    /// The metric label of a dropped copy (`None` for a new one).
    pub fn duplicate_reason(self) -> Option<&'static str> {
        match self {
            Decision::New => None,
            Decision::Retry => Some("retry"),
            Decision::Conflict => Some("conflict"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_copy_wins() {
        assert_eq!(Decision::of(None, 7), Decision::New);
        assert_eq!(Decision::of(Some(7), 7), Decision::Retry);
        assert_eq!(Decision::of(Some(8), 7), Decision::Conflict);
        assert_eq!(Decision::Conflict.duplicate_reason(), Some("conflict"));
    }

    #[test]
    fn keys_are_scoped_by_tenant_and_fingerprints_by_payload() {
        assert_ne!(key_hash("a", "bc"), key_hash("ab", "c"), "the separator keeps tenant and key apart");
        assert_eq!(key_hash("t", "k"), key_hash("t", "k"));
        let e = crate::pricing::tests::event();
        let mut other = e.clone();
        other.output_tokens += 1;
        assert_eq!(fingerprint("t", &e), fingerprint("t", &e.clone()));
        assert_ne!(fingerprint("t", &e), fingerprint("t", &other));
    }
}
