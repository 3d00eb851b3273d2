//! The price catalog format, tenant price overrides, and cost from token counts.
//!
//! Prices are USD per million tokens held as integer nano-USD, so a price like
//! $0.075/M is exactly 75,000,000. The built-in catalog (`schemas/prices/catalog.json`)
//! is generated from litellm's MIT-licensed price map by `scripts/gen-price-catalog.py`;
//! its header names the source, version and date.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::SchemaError;
use crate::event::UsageEvent;
use crate::money::Nanos;

/// The catalog shipped with this build.
pub const BUILTIN_CATALOG_JSON: &str = include_str!("../prices/catalog.json");

/// One model's prices as written in a catalog or a tenant override: decimal USD
/// per million tokens. `cached_input` defaults to `input` and `reasoning` to
/// `output`, which is how providers that do not price them separately bill.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceText {
    pub input: String,
    pub output: String,
    #[serde(default)]
    pub cached_input: Option<String>,
    #[serde(default)]
    pub reasoning: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
}

/// One model's prices, nano-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: Nanos,
    pub output: Nanos,
    pub cached_input: Nanos,
    pub reasoning: Nanos,
}

impl ModelPrice {
    /// Parses decimal text; `context` names the entry in error messages.
    pub fn from_text(text: &PriceText, context: &str) -> Result<ModelPrice, SchemaError> {
        let parse = |field: &str, value: &str| {
            Nanos::parse_non_negative(value)
                .map_err(|e| SchemaError::Price { key: format!("{context}.{field}"), message: format!("{value:?} {e}") })
        };
        let input = parse("input", &text.input)?;
        let output = parse("output", &text.output)?;
        let cached_input = match &text.cached_input {
            Some(v) => parse("cached_input", v)?,
            None => input,
        };
        let reasoning = match &text.reasoning {
            Some(v) => parse("reasoning", v)?,
            None => output,
        };
        Ok(ModelPrice { input, output, cached_input, reasoning })
    }

    /// Cost of one event's tokens in nano-USD, rounded half up to the nano.
    ///
    /// Each event's cost is rounded once, from the exact sum of its parts, so
    /// the bill is the sum of per-event costs that a customer can recompute.
    pub fn cost(&self, event: &UsageEvent) -> Nanos {
        let micro = [
            (event.input_tokens, self.input),
            (event.cached_input_tokens, self.cached_input),
            (event.output_tokens, self.output),
            (event.reasoning_tokens, self.reasoning),
        ]
        .iter()
        .map(|(tokens, price)| i128::from(*tokens) * i128::from(price.0))
        .sum::<i128>();
        let rounded = (micro + 500_000) / 1_000_000;
        // Validation bounds tokens to 1e9 and catalog prices are far below the
        // $9e3/token that could overflow; saturate regardless.
        Nanos(i64::try_from(rounded).unwrap_or(i64::MAX))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    format_version: u32,
    catalog_version: String,
    #[allow(dead_code)]
    source: String,
    #[allow(dead_code)]
    retrieved: String,
    #[allow(dead_code)]
    unit: String,
    models: BTreeMap<String, PriceText>,
}

/// A parsed price catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub version: String,
    models: BTreeMap<String, ModelPrice>,
}

impl Catalog {
    /// Parses a catalog file (format version 1).
    pub fn parse(json: &str) -> Result<Catalog, SchemaError> {
        let file: CatalogFile = serde_json::from_str(json)
            .map_err(|e| SchemaError::Price { key: "catalog".to_owned(), message: e.to_string() })?;
        if file.format_version != 1 {
            return Err(SchemaError::Price {
                key: "catalog.format_version".to_owned(),
                message: format!("unsupported format version {}", file.format_version),
            });
        }
        let models = file
            .models
            .iter()
            .map(|(name, text)| Ok((name.clone(), ModelPrice::from_text(text, &format!("models.{name}"))?)))
            .collect::<Result<_, SchemaError>>()?;
        Ok(Catalog { version: file.catalog_version, models })
    }

    /// The catalog shipped with this build.
    pub fn builtin() -> Result<Catalog, SchemaError> {
        Self::parse(BUILTIN_CATALOG_JSON)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model)
    }
}

/// Prices as one tenant sees them: its overrides first, then the catalog.
#[derive(Debug, Clone, Copy)]
pub struct PriceBook<'a> {
    pub overrides: &'a BTreeMap<String, ModelPrice>,
    pub catalog: &'a Catalog,
}

impl PriceBook<'_> {
    /// The price of `model`, trying `provider/model` before the bare name in
    /// each source (catalog keys such as `azure/gpt-4o` differ from `gpt-4o`).
    pub fn lookup(&self, provider: Option<&str>, model: &str) -> Option<ModelPrice> {
        let qualified = provider.map(|p| format!("{p}/{model}"));
        let names = qualified.as_deref().into_iter().chain(std::iter::once(model));
        for name in names {
            if let Some(p) = self.overrides.get(name).or_else(|| self.catalog.get(name)) {
                return Some(*p);
            }
        }
        None
    }

    /// The event's cost: `cost_usd` when given, else from the price of its model;
    /// `None` when neither is known (the event is counted as unpriced).
    pub fn cost_of(&self, event: &UsageEvent) -> Option<Nanos> {
        event.cost_usd.or_else(|| self.lookup(event.provider.as_deref(), &event.model).map(|p| p.cost(event)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DEFAULT_ENVIRONMENT;

    fn event(input: u64, cached: u64, output: u64, reasoning: u64) -> UsageEvent {
        UsageEvent {
            idempotency_key: "k".into(),
            timestamp: chrono::DateTime::from_timestamp_nanos(0),
            user_id: "u".into(),
            customer_id: None,
            feature: "f".into(),
            model: "gpt-4o".into(),
            provider: None,
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            reasoning_tokens: reasoning,
            cost_usd: None,
            revenue_usd: None,
            credits: None,
            billable: true,
            environment: DEFAULT_ENVIRONMENT.into(),
            metadata: None,
        }
    }

    #[test]
    fn builtin_catalog_parses_and_prices_known_models() {
        let catalog = Catalog::builtin().unwrap();
        assert!(catalog.len() > 1000, "catalog has {} models", catalog.len());
        let gpt4o = catalog.get("gpt-4o").unwrap();
        // $2.50/M input, $1.25/M cached, $10/M output.
        assert_eq!(gpt4o.cost(&event(1_000, 2_000, 500, 0)), Nanos::parse("0.0100").unwrap());
    }

    #[test]
    fn rounds_each_event_once_half_up() {
        let price = ModelPrice { input: Nanos(75_000_000), output: Nanos(0), cached_input: Nanos(37_500_000), reasoning: Nanos(0) };
        // 1 cached token at $0.0375/M = 37.5 nano: rounds to 38.
        assert_eq!(price.cost(&event(0, 1, 0, 0)), Nanos(38));
        // 3 cached = 112.5 -> 113; one rounding, not three.
        assert_eq!(price.cost(&event(0, 3, 0, 0)), Nanos(113));
        assert_eq!(price.cost(&event(0, 0, 0, 0)), Nanos(0));
    }

    #[test]
    fn overrides_win_and_provider_qualified_names_first() {
        let catalog = Catalog::parse(
            r#"{"format_version":1,"catalog_version":"t","source":"s","retrieved":"r","unit":"u","models":{
                "m": {"input": "1", "output": "2"}, "acme/m": {"input": "3", "output": "4"}}}"#,
        )
        .unwrap();
        let mut overrides = BTreeMap::new();
        let book = PriceBook { overrides: &overrides, catalog: &catalog };
        assert_eq!(book.lookup(None, "m").unwrap().input, Nanos::parse("1").unwrap());
        assert_eq!(book.lookup(Some("acme"), "m").unwrap().input, Nanos::parse("3").unwrap());
        assert_eq!(book.lookup(Some("other"), "m").unwrap().reasoning, Nanos::parse("2").unwrap());
        assert!(book.lookup(None, "nope").is_none());
        let text = PriceText { input: "9".into(), output: "9".into(), cached_input: None, reasoning: None, provider: None };
        overrides.insert("m".to_owned(), ModelPrice::from_text(&text, "t").unwrap());
        let book = PriceBook { overrides: &overrides, catalog: &catalog };
        assert_eq!(book.lookup(None, "m").unwrap().input, Nanos::parse("9").unwrap());
        let mut given = event(1, 0, 0, 0);
        given.model = "nope".into();
        assert_eq!(book.cost_of(&given), None);
        given.cost_usd = Some(Nanos(5));
        assert_eq!(book.cost_of(&given), Some(Nanos(5)));
    }
}
