//! Test fixtures shared by the unit tests: buffered records, good and bad.

use chrono::{DateTime, Utc};
use meterline_schemas::event::UsageEvent;
use meterline_schemas::wire::{self, Envelope};

use crate::config::DedupeConfig;
use crate::partitions::Buffered;

pub(crate) const TENANT: &str = "acme";

/// A decodable record at `offset`: `user`'s event under idempotency `key`.
pub(crate) fn buffered(offset: i64, key: &str, user: &str, input_tokens: u64) -> Buffered {
    let at = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let event = UsageEvent {
        idempotency_key: key.to_owned(),
        timestamp: at,
        user_id: user.to_owned(),
        customer_id: None,
        feature: "chat".to_owned(),
        model: "gpt-4o".to_owned(),
        provider: None,
        input_tokens,
        output_tokens: 0,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
        cost_usd: None,
        revenue_usd: None,
        credits: None,
        billable: true,
        environment: "production".to_owned(),
        metadata: None,
    };
    let envelope = Envelope { tenant: TENANT.to_owned(), received_at: at, event };
    Buffered::new(offset, wire::message_key(TENANT, user), envelope)
}

/// A record at `offset` whose payload does not decode.
pub(crate) fn garbage(offset: i64, payload: &[u8]) -> Buffered {
    Buffered::decode(offset, None, Some(payload))
}

/// A dedupe configuration with a 35-day window in 7-day slices of
/// `expected_keys_per_slice` keys each.
pub(crate) fn dedupe_config(expected_keys_per_slice: usize) -> DedupeConfig {
    DedupeConfig {
        window_secs: 35 * 86_400,
        slice_secs: 7 * 86_400,
        expected_keys_per_slice,
        false_positive_rate: 0.01,
        recent_secs: 600,
        max_recent_keys: 1_000,
        snapshots: true,
        snapshot_interval_secs: 300,
    }
}
