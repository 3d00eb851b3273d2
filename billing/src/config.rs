//! The `[billing]` section: where Stripe is, how often to sync, and per
//! tenant the meters to feed and the customer mapping set by config.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::error::BillingError;

/// Stripe meter sync settings; without `[[billing.tenants]]` nothing is pushed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// Stripe's API base URL (tests point it at a fake).
    pub stripe_base_url: String,
    /// Time between two sync cycles.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub interval_secs: u64,
    /// An hour is pushed once it has been closed this long, so that events
    /// still in flight land first; later ones become corrections.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub settle_secs: u64,
    /// Attempts per meter event on `429`, `5xx` or a network error before the
    /// cycle gives up (the event stays pending for the next cycle).
    pub max_attempts: u32,
    /// The first retry's delay; each next one doubles, up to 30 s.
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub backoff_ms: u64,
    /// A request's timeout.
    #[serde(deserialize_with = "meterline_schemas::duration::millis")]
    pub timeout_ms: u64,
    pub tenants: Vec<TenantBilling>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            stripe_base_url: "https://api.stripe.com".into(),
            interval_secs: 60,
            settle_secs: 300,
            max_attempts: 6,
            backoff_ms: 500,
            timeout_ms: 10_000,
            tenants: Vec::new(),
        }
    }
}

/// One tenant's meters and its configured customer mapping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBilling {
    pub tenant: String,
    /// Which id is billed: `customer_id` (default) or `user_id`.
    #[serde(default)]
    pub subject: SubjectColumn,
    /// Subject id -> Stripe customer id; the API's mapping wins over these.
    #[serde(default)]
    pub customers: BTreeMap<String, String>,
    #[serde(default)]
    pub meters: Vec<MeterConfig>,
}

/// The event column naming who is billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectColumn {
    #[default]
    CustomerId,
    UserId,
}

impl SubjectColumn {
    pub fn column(self) -> &'static str {
        match self {
            SubjectColumn::CustomerId => "customer_id",
            SubjectColumn::UserId => "user_id",
        }
    }
}

/// A Stripe meter fed from one measure of the billable events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// The Stripe meter's `event_name`.
    pub event_name: String,
    pub measure: MeterMeasure,
    /// How money is sent (money measures only).
    #[serde(default)]
    pub unit: MoneyUnit,
    #[serde(default)]
    pub filter: MeterFilter,
}

/// Equality filters on the events' dimensions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterFilter {
    pub feature: Option<String>,
    pub model: Option<String>,
    pub environment: Option<String>,
}

impl MeterFilter {
    /// The filters as (column, value), in a fixed order.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        [("feature", &self.feature), ("model", &self.model), ("environment", &self.environment)]
            .into_iter()
            .filter_map(|(c, v)| v.clone().map(|v| (c, v)))
            .collect()
    }
}

/// What a meter sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterMeasure {
    CostUsd,
    RevenueUsd,
    Events,
    InputTokens,
    OutputTokens,
    CachedInputTokens,
    ReasoningTokens,
    /// Input plus output tokens.
    Tokens,
}

impl MeterMeasure {
    /// The rollup columns added up; none: the `events` count column.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            MeterMeasure::CostUsd => &["cost_nanos"],
            MeterMeasure::RevenueUsd => &["revenue_nanos"],
            MeterMeasure::Events => &["events"],
            MeterMeasure::InputTokens => &["input_tokens"],
            MeterMeasure::OutputTokens => &["output_tokens"],
            MeterMeasure::CachedInputTokens => &["cached_input_tokens"],
            MeterMeasure::ReasoningTokens => &["reasoning_tokens"],
            MeterMeasure::Tokens => &["input_tokens", "output_tokens"],
        }
    }

    pub fn is_money(self) -> bool {
        matches!(self, MeterMeasure::CostUsd | MeterMeasure::RevenueUsd)
    }
}

/// The unit a money meter's values are in. Stripe meter values are whole
/// numbers, so the price in Stripe is per one of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoneyUnit {
    /// Nano-dollars: exact, Meterline's own unit.
    #[default]
    NanoUsd,
    /// Micro-dollars: a window's remainder below one is not billed.
    MicroUsd,
    /// Cents: a window's remainder below one is not billed.
    Cent,
}

impl MoneyUnit {
    /// Nano-dollars per unit.
    pub fn nanos(self) -> i64 {
        match self {
            MoneyUnit::NanoUsd => 1,
            MoneyUnit::MicroUsd => 1_000,
            MoneyUnit::Cent => 10_000_000,
        }
    }
}

impl BillingConfig {
    /// Checks every key against the tenants the deployment knows.
    pub fn validate(&self, tenants: &[String]) -> Result<(), BillingError> {
        let bad = |key: String, message: &str| Err(BillingError::Config { key, message: message.to_owned() });
        if !(self.stripe_base_url.starts_with("http://") || self.stripe_base_url.starts_with("https://")) {
            return bad("billing.stripe_base_url".into(), "must be an http(s) URL");
        }
        if !(1..=86_400).contains(&self.interval_secs) {
            return bad("billing.interval_secs".into(), "must be between 1s and 1d");
        }
        if self.settle_secs > 86_400 {
            return bad("billing.settle_secs".into(), "must be at most 1d");
        }
        if !(1..=100).contains(&self.max_attempts) {
            return bad("billing.max_attempts".into(), "must be between 1 and 100");
        }
        if !(1..=60_000).contains(&self.backoff_ms) {
            return bad("billing.backoff_ms".into(), "must be between 1ms and 60s");
        }
        if !(100..=300_000).contains(&self.timeout_ms) {
            return bad("billing.timeout_ms".into(), "must be between 100ms and 5m");
        }
        let mut seen = Vec::new();
        for (n, t) in self.tenants.iter().enumerate() {
            let at = |key: &str| format!("billing.tenants[{n}].{key}");
            if !tenants.contains(&t.tenant) {
                return bad(at("tenant"), "is not a configured [[tenants]] id");
            }
            if seen.contains(&&t.tenant) {
                return bad(at("tenant"), "appears twice");
            }
            seen.push(&t.tenant);
            for (subject, customer) in &t.customers {
                if !valid_subject(subject) || !valid_stripe_customer(customer) {
                    return bad(at(&format!("customers.{subject}")), "must map an id (1-256 chars) to a Stripe customer id (cus_...)");
                }
            }
            let mut names = Vec::new();
            for (m, meter) in t.meters.iter().enumerate() {
                let key = |k: &str| at(&format!("meters[{m}].{k}"));
                if meter.event_name.is_empty() || meter.event_name.len() > 100 {
                    return bad(key("event_name"), "must be 1 to 100 characters (Stripe's limit)");
                }
                if names.contains(&&meter.event_name) {
                    return bad(key("event_name"), "appears twice for this tenant");
                }
                names.push(&meter.event_name);
                if !meter.measure.is_money() && meter.unit != MoneyUnit::NanoUsd {
                    return bad(key("unit"), "applies to cost_usd and revenue_usd only");
                }
            }
        }
        Ok(())
    }

    /// The tenant's billing, if it has any.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantBilling> {
        self.tenants.iter().find(|t| t.tenant == tenant)
    }
}

/// A subject id as the API takes it.
pub fn valid_subject(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256
}

/// A Stripe customer id: `cus_` and letters or digits.
pub fn valid_stripe_customer(id: &str) -> bool {
    id.len() <= 255 && id.strip_prefix("cus_").is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> BillingConfig {
        toml::from_str(text).expect("toml")
    }

    #[test]
    fn keys_are_named_in_errors() {
        let ok = "[[tenants]]\ntenant = \"acme\"\ncustomers = { c1 = \"cus_A1\" }\n[[tenants.meters]]\nevent_name = \"cost\"\nmeasure = \"cost_usd\"\nunit = \"cent\"\n";
        let tenants = vec!["acme".to_owned()];
        load(ok).validate(&tenants).expect("valid");
        for (text, key) in [
            (ok.replace("acme", "nope"), "billing.tenants[0].tenant"),
            (ok.replace("cus_A1", "A1"), "billing.tenants[0].customers.c1"),
            (ok.replace("cost_usd", "events"), "billing.tenants[0].meters[0].unit"),
            (format!("{ok}[[tenants.meters]]\nevent_name = \"cost\"\nmeasure = \"events\"\n"), "billing.tenants[0].meters[1].event_name"),
            (format!("interval_secs = 0\n{ok}"), "billing.interval_secs"),
        ] {
            let err = load(&text).validate(&tenants).expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn money_units_and_customer_ids() {
        assert_eq!(MoneyUnit::Cent.nanos(), 10_000_000);
        assert!(valid_stripe_customer("cus_NciAYcXfLnqBoz"));
        assert!(!valid_stripe_customer("cus_"));
        assert!(!valid_stripe_customer("cus_a b"));
    }
}
