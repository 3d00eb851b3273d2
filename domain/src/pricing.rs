//! An event's cost and revenue, exact in nano-USD.

use meterline_schemas::money::NANOS_PER_UNIT;
use meterline_schemas::prices::{Catalog, PriceBook};
use meterline_schemas::tenants::Tenant;
use meterline_schemas::{Nanos, UsageEvent};
use std::collections::BTreeMap;

/// Where an event's cost came from; stored as its `u8` in `events.cost_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CostSource {
    /// No `cost_usd` and no price for the model: cost counted as 0, event counted unpriced.
    Unpriced = 0,
    /// The client sent `cost_usd`.
    Given = 1,
    /// Computed from the price catalog or the tenant's prices.
    Catalog = 2,
}

impl CostSource {
    /// The stored value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The stored value read back; anything unknown reads as unpriced.
    pub fn from_u8(v: u8) -> CostSource {
        match v {
            1 => CostSource::Given,
            2 => CostSource::Catalog,
            _ => CostSource::Unpriced,
        }
    }

    /// The name the API answers with.
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Unpriced => "unpriced",
            CostSource::Given => "given",
            CostSource::Catalog => "catalog",
        }
    }
}

/// Cost and revenue of one event, exact in nano-USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    pub cost: Nanos,
    pub cost_source: CostSource,
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
        Some(c) => (c, CostSource::Given),
        None => match book.cost_of(event) {
            Some(c) => (c, CostSource::Catalog),
            None => (Nanos::ZERO, CostSource::Unpriced),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use meterline_schemas::event::DEFAULT_ENVIRONMENT;

    pub(crate) fn event() -> UsageEvent {
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
        assert_eq!(p.cost_source, CostSource::Catalog);
        assert_eq!(p.revenue, Nanos::parse("0.0045").unwrap());
        let mut unpriced = event();
        unpriced.model = "nope".into();
        let p = price(&unpriced, None, &catalog);
        assert_eq!((p.cost, p.cost_source, p.revenue), (Nanos::ZERO, CostSource::Unpriced, Nanos::ZERO));
        let mut given = event();
        given.cost_usd = Some(Nanos(7));
        given.revenue_usd = Some(Nanos(9));
        given.credits = None;
        let p = price(&given, Some(&tenant("1")), &catalog);
        assert_eq!((p.cost, p.cost_source, p.revenue), (Nanos(7), CostSource::Given, Nanos(9)));
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

    #[test]
    fn cost_sources_round_trip_their_stored_value() {
        for s in [CostSource::Unpriced, CostSource::Given, CostSource::Catalog] {
            assert_eq!(CostSource::from_u8(s.as_u8()), s);
        }
        assert_eq!((CostSource::Unpriced.as_u8(), CostSource::Given.as_u8(), CostSource::Catalog.as_u8()), (0, 1, 2));
    }
}
