//! The encoding of accepted events on the Kafka topic, and their message keys.
//!
//! Version 1 is a compact binary record, chosen over JSON because the aggregator
//! decodes every event and the ingest path encodes every event: a fixed layout
//! costs a few length checks instead of a JSON parse. Layout, all integers
//! little-endian:
//!
//! ```text
//! magic  b'M'  | version u8 = 1
//! tenant str | received_at_nanos i64
//! idempotency_key str | timestamp_nanos i64 | user_id str | customer_id opt<str>
//! feature str | model str | provider opt<str>
//! input_tokens u64 | output_tokens u64 | cached_input_tokens u64 | reasoning_tokens u64
//! cost_usd opt<i64> | revenue_usd opt<i64> | credits opt<i64>   (nano-units)
//! billable u8 | environment str | metadata opt<str>
//! str = u32 length + UTF-8 bytes;  opt<T> = u8 0 (absent) | u8 1 + T
//! ```
//!
//! A new layout takes a new version byte; decoders refuse versions they do not
//! know (the aggregator sends those to its dead-letter table rather than guess).

use chrono::{DateTime, Utc};

use crate::event::UsageEvent;
use crate::money::Nanos;

const MAGIC: u8 = b'M';
/// The version this build writes.
pub const VERSION: u8 = 1;

/// An accepted event as it travels through Kafka: who sent it, when, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub tenant: String,
    /// When ingest accepted the event (for freshness measurement and audit).
    pub received_at: DateTime<Utc>,
    pub event: UsageEvent,
}

/// Why bytes from the topic are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("record is truncated")]
    Truncated,
    #[error("record does not start with the Meterline magic byte")]
    BadMagic,
    #[error("record has unknown encoding version {0}")]
    UnknownVersion(u8),
    #[error("record field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("record field {0} has an invalid value")]
    InvalidValue(&'static str),
    #[error("record has {0} trailing bytes")]
    TrailingBytes(usize),
}

/// The Kafka message key: tenant and user, so one user's events stay in order
/// on one partition. Tenant ids cannot contain `/`, so the key is unambiguous.
pub fn message_key(tenant: &str, user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 1 + user_id.len());
    key.extend_from_slice(tenant.as_bytes());
    key.push(b'/');
    key.extend_from_slice(user_id.as_bytes());
    key
}

/// How ingest chooses an event's partition. `Key` is the default and the
/// one dedupe is exact under whatever a copy changes; `User` is the keying
/// before it, kept for a deployment's upgrade (and its test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keying {
    /// Keyed `tenant/user_id`, partition chosen by the client's partitioner:
    /// copies of one key that change `user_id` may land on different partitions.
    User,
    /// Keyed `tenant/idempotency_key`, produced to [`home_partition`]: every
    /// copy of a key lands on one partition, whatever else it changes.
    #[default]
    Key,
}

/// The partition every copy of (tenant, idempotency key) belongs on, out of
/// `partitions`: ingest produces there and the aggregator counts only there,
/// forwarding a record it finds anywhere else. FNV-1a 64 over
/// `tenant/key`, spelled out here rather than taken from a library or the
/// client's partitioner so that its value can never change under a
/// dependency upgrade or a producer option (a change would move homes).
pub fn home_partition(tenant: &str, idempotency_key: &str, partitions: i32) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant.as_bytes().iter().chain(b"/").chain(idempotency_key.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // A partition count is positive; a non-positive one (never from a broker) maps to 0.
    let n = u64::try_from(partitions).unwrap_or(0).max(1);
    i32::try_from(hash % n).unwrap_or(0)
}

fn nanos_of(ts: DateTime<Utc>) -> i64 {
    // Event times are bounded to weeks around now, far inside i64 nanoseconds
    // (years 1677..2262); saturate rather than panic on anything else.
    ts.timestamp_nanos_opt().unwrap_or(if ts.timestamp() < 0 { i64::MIN } else { i64::MAX })
}

/// Encodes an envelope into `out` (appending).
pub fn encode_into(envelope: &Envelope, out: &mut Vec<u8>) {
    encode_parts_into(&envelope.tenant, envelope.received_at, &envelope.event, out);
}

/// Encodes the parts of an envelope without assembling one (no clone needed).
pub fn encode_parts_into(tenant: &str, received_at: DateTime<Utc>, e: &UsageEvent, out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.push(VERSION);
    put_str(out, tenant);
    out.extend_from_slice(&nanos_of(received_at).to_le_bytes());
    put_str(out, &e.idempotency_key);
    out.extend_from_slice(&nanos_of(e.timestamp).to_le_bytes());
    put_str(out, &e.user_id);
    put_opt_str(out, e.customer_id.as_deref());
    put_str(out, &e.feature);
    put_str(out, &e.model);
    put_opt_str(out, e.provider.as_deref());
    for n in [e.input_tokens, e.output_tokens, e.cached_input_tokens, e.reasoning_tokens] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for amount in [e.cost_usd, e.revenue_usd, e.credits] {
        match amount {
            Some(Nanos(v)) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            None => out.push(0),
        }
    }
    out.push(u8::from(e.billable));
    put_str(out, &e.environment);
    put_opt_str(out, e.metadata.as_deref());
}

/// Encodes an envelope into a new buffer.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + envelope.event.metadata.as_ref().map_or(0, String::len));
    encode_into(envelope, &mut out);
    out
}

/// Decodes one record from the topic.
pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    let mut r = Reader { bytes, at: 0 };
    if r.u8()? != MAGIC {
        return Err(WireError::BadMagic);
    }
    match r.u8()? {
        VERSION => {}
        other => return Err(WireError::UnknownVersion(other)),
    }
    let tenant = r.string("tenant")?;
    let received_at = DateTime::from_timestamp_nanos(r.i64()?);
    let idempotency_key = r.string("idempotency_key")?;
    let timestamp = DateTime::from_timestamp_nanos(r.i64()?);
    let user_id = r.string("user_id")?;
    let customer_id = r.opt_string("customer_id")?;
    let feature = r.string("feature")?;
    let model = r.string("model")?;
    let provider = r.opt_string("provider")?;
    let input_tokens = r.u64()?;
    let output_tokens = r.u64()?;
    let cached_input_tokens = r.u64()?;
    let reasoning_tokens = r.u64()?;
    let cost_usd = r.opt_i64("cost_usd")?.map(Nanos);
    let revenue_usd = r.opt_i64("revenue_usd")?.map(Nanos);
    let credits = r.opt_i64("credits")?.map(Nanos);
    let billable = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(WireError::InvalidValue("billable")),
    };
    let environment = r.string("environment")?;
    let metadata = r.opt_string("metadata")?;
    if r.at != bytes.len() {
        return Err(WireError::TrailingBytes(bytes.len() - r.at));
    }
    Ok(Envelope {
        tenant,
        received_at,
        event: UsageEvent {
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
            environment,
            metadata,
        },
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Every string is bounded by validation (metadata, the longest, to 4 KiB).
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len as usize]);
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len()).ok_or(WireError::Truncated)?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| WireError::InvalidUtf8(field))
    }
    fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::InvalidValue(field)),
        }
    }
    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, WireError> {
        if self.flag(field)? { self.string(field).map(Some) } else { Ok(None) }
    }
    fn opt_i64(&mut self, field: &'static str) -> Result<Option<i64>, WireError> {
        if self.flag(field)? { self.i64().map(Some) } else { Ok(None) }
    }
}
