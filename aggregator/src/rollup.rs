//! The per-event arithmetic: an event's cost and revenue, its dedupe identity
//! and fingerprint, and its row in `events`. Pure code. (Minute rollups are
//! summed from `events` by ClickHouse itself; see `sql::rollups_from_events`.)

use chrono::{DateTime, Utc};
use meterline_schemas::ddl::cost_source;
use meterline_schemas::money::NANOS_PER_UNIT;
use meterline_schemas::prices::{Catalog, PriceBook};
use meterline_schemas::tenants::Tenant;
use meterline_schemas::wire::{self, Envelope};
use meterline_schemas::{Nanos, UsageEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Cost and revenue of one event, exact in nano-USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    pub cost: Nanos,
    pub cost_source: u8,
    pub revenue: Nanos,
    pub credits: Nanos,
}

/// Prices one event: `cost_usd` if given, else the tenant's prices, else the
/// catalog, else unpriced (cost 0, counted). Revenue is `revenue_usd`, or
/// `credits` times the tenant's credit price rounded half up to the nano; with
/// no credit price configured, credits are kept but revenue is 0.
pub fn price(event: &UsageEvent, tenant: Option<&Tenant>, catalog: &Catalog) -> Priced {
    let empty = BTreeMap::new();
    let book = PriceBook { overrides: tenant.map_or(&empty, |t| &t.prices), catalog };
    let (cost, source) = match event.cost_usd {
        Some(c) => (c, cost_source::GIVEN),
        None => match book.cost_of(event) {
            Some(c) => (c, cost_source::CATALOG),
            None => (Nanos::ZERO, cost_source::UNPRICED),
        },
    };
    let credits = event.credits.unwrap_or(Nanos::ZERO);
    let revenue = match (event.revenue_usd, event.credits, tenant.and_then(|t| t.credit_price)) {
        (Some(r), _, _) => r,
        (None, Some(c), Some(unit)) => {
            let product = i128::from(c.0) * i128::from(unit.0);
            let half = i128::from(NANOS_PER_UNIT / 2);
            Nanos(i64::try_from((product + half) / i128::from(NANOS_PER_UNIT)).unwrap_or(i64::MAX))
        }
        _ => Nanos::ZERO,
    };
    Priced { cost, cost_source: source, revenue, credits }
}

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

/// One row of the `events` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct EventRow {
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: u64,
    pub event_time: u32,
    pub event_time_ns: u32,
    pub user_id: String,
    pub customer_id: String,
    pub feature: String,
    pub model: String,
    pub provider: String,
    pub environment: String,
    pub billable: u8,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_nanos: i64,
    pub cost_source: u8,
    pub revenue_nanos: i64,
    pub credits_nanos: i64,
    pub metadata: String,
    pub received_at: u32,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub written_at: u32,
}

/// Seconds since the epoch as ClickHouse `DateTime` holds them (UInt32),
/// clamped to its range; validated event times are always inside it.
pub fn datetime_secs(ts: DateTime<Utc>) -> u32 {
    u32::try_from(ts.timestamp().max(0)).unwrap_or(u32::MAX)
}

/// Width of a minute rollup window, in seconds.
pub const MINUTE_SECS: i64 = 60;
/// Width of a daily rollup window, in seconds (UTC days).
pub const DAY_SECS: i64 = 86_400;

/// The start of the `width`-second window holding `secs`: UTC windows, by
/// the same arithmetic the ClickHouse inserts do (so a server in another
/// time zone assigns the same windows), and the embedded store's.
pub fn window_start(secs: i64, width: i64) -> i64 {
    secs.div_euclid(width) * width
}

/// Where a record came from in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl EventRow {
    pub fn new(envelope: &Envelope, fingerprint: u64, priced: Priced, source: Source<'_>, written_at: u32) -> EventRow {
        let e = &envelope.event;
        EventRow {
            tenant: envelope.tenant.clone(),
            idempotency_key: e.idempotency_key.clone(),
            fingerprint,
            event_time: datetime_secs(e.timestamp),
            event_time_ns: e.timestamp.timestamp_subsec_nanos(),
            user_id: e.user_id.clone(),
            customer_id: e.customer_id.clone().unwrap_or_default(),
            feature: e.feature.clone(),
            model: e.model.clone(),
            provider: e.provider.clone().unwrap_or_default(),
            environment: e.environment.clone(),
            billable: u8::from(e.billable),
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            cached_input_tokens: e.cached_input_tokens,
            reasoning_tokens: e.reasoning_tokens,
            cost_nanos: priced.cost.0,
            cost_source: priced.cost_source,
            revenue_nanos: priced.revenue.0,
            credits_nanos: priced.credits.0,
            metadata: e.metadata.clone().unwrap_or_default(),
            received_at: datetime_secs(envelope.received_at),
            kafka_topic: source.topic.to_owned(),
            kafka_partition: source.partition,
            kafka_offset: source.offset,
            written_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::event::DEFAULT_ENVIRONMENT;

    fn event() -> UsageEvent {
        UsageEvent {
            idempotency_key: "k".into(),
            timestamp: DateTime::parse_from_rfc3339("2026-01-31T23:59:59.5Z").unwrap().with_timezone(&Utc),
            user_id: "u".into(),
            customer_id: None,
            feature: "f".into(),
            model: "gpt-4o".into(),
            provider: None,
            input_tokens: 1_000_000,
            output_tokens: 0,
            cached_input_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: None,
            revenue_usd: None,
            credits: Some(Nanos::parse("3").unwrap()),
            billable: true,
            environment: DEFAULT_ENVIRONMENT.into(),
            metadata: None,
        }
    }

    fn tenant(credit_price: &str) -> Tenant {
        Tenant { id: "t".into(), credit_price: Some(Nanos::parse(credit_price).unwrap()), prices: BTreeMap::new() }
    }

    #[test]
    fn prices_from_catalog_and_credits() {
        let catalog = Catalog::builtin().unwrap();
        let p = price(&event(), Some(&tenant("0.0015")), &catalog);
        assert_eq!(p.cost, Nanos::parse("2.5").unwrap());
        assert_eq!(p.cost_source, cost_source::CATALOG);
        assert_eq!(p.revenue, Nanos::parse("0.0045").unwrap());
        let mut unpriced = event();
        unpriced.model = "nope".into();
        let p = price(&unpriced, None, &catalog);
        assert_eq!((p.cost, p.cost_source, p.revenue), (Nanos::ZERO, cost_source::UNPRICED, Nanos::ZERO));
        let mut given = event();
        given.cost_usd = Some(Nanos(7));
        given.revenue_usd = Some(Nanos(9));
        given.credits = None;
        let p = price(&given, Some(&tenant("1")), &catalog);
        assert_eq!((p.cost, p.cost_source, p.revenue), (Nanos(7), cost_source::GIVEN, Nanos(9)));
    }

    #[test]
    fn credit_conversion_rounds_half_up_once() {
        let catalog = Catalog::builtin().unwrap();
        let mut e = event();
        e.credits = Some(Nanos(1)); // one nano-credit at 0.5 USD = 0.5 nano-USD
        assert_eq!(price(&e, Some(&tenant("0.5")), &catalog).revenue, Nanos(1));
        e.credits = Some(Nanos(3)); // 1.5 -> 2
        assert_eq!(price(&e, Some(&tenant("0.5")), &catalog).revenue, Nanos(2));
    }

}
