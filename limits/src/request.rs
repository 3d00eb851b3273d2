//! A reservation request parsed field by field and its estimate priced; a commit's body made into the metered event.

use chrono::{DateTime, SecondsFormat, Utc};
use meterline_domain::price;
use meterline_http::ApiError;
use meterline_schemas::event::{DEFAULT_ENVIRONMENT, MAX_ID_BYTES, MAX_NAME_BYTES};
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::Tenant;
use meterline_schemas::{TimeBounds, UsageEvent, parse_event};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use crate::book::Amounts;
use crate::config::LimitsConfig;
use crate::error::Invalid;
use crate::plan::{LimitMeasure, decimal_text};
use crate::reservation::Action;

/// `POST /v1/reservations`' body, checked.
pub(crate) struct ReserveRequest<'a> {
    pub(crate) action: Action,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) ttl_secs: u64,
    /// Measure name -> amount as sent; priced by [`estimate`].
    pub(crate) estimate: BTreeMap<String, &'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveIn<'a> {
    user_id: Option<String>,
    customer_id: Option<String>,
    feature: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    environment: Option<String>,
    #[serde(borrow)]
    estimate: Option<BTreeMap<String, &'a RawValue>>,
    ttl_secs: Option<u64>,
    idempotency_key: Option<String>,
}

/// The event fields a commit may not set: they come from the reservation.
const FROM_RESERVATION: [&str; 7] = ["idempotency_key", "user_id", "customer_id", "feature", "model", "provider", "environment"];

pub(crate) fn rfc3339_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn name(field: &str, value: Option<String>, max: usize, required: bool) -> Result<Option<String>, Invalid> {
    match value {
        None if required => Err(Invalid::new(field, "is required")),
        None => Ok(None),
        Some(v) if v.is_empty() || v.len() > max || v.chars().any(char::is_control) => {
            Err(Invalid::new(field, format!("must be 1 to {max} bytes without control characters")))
        }
        Some(v) => Ok(Some(v)),
    }
}

/// Parses a reservation request made at `now`.
pub(crate) fn parse_reserve<'a>(body: &'a str, now: DateTime<Utc>, config: &LimitsConfig) -> Result<ReserveRequest<'a>, Invalid> {
    let input: ReserveIn = serde_json::from_str(body).map_err(|e| Invalid::new("body", format!("not a reservation request: {e}")))?;
    let action = Action {
        user_id: name("user_id", input.user_id, MAX_ID_BYTES, true)?.unwrap_or_default(),
        customer_id: name("customer_id", input.customer_id, MAX_ID_BYTES, false)?,
        feature: name("feature", input.feature, MAX_NAME_BYTES, true)?.unwrap_or_default(),
        model: name("model", input.model, MAX_NAME_BYTES, true)?.unwrap_or_default(),
        provider: name("provider", input.provider, MAX_NAME_BYTES, false)?,
        environment: name("environment", input.environment, MAX_NAME_BYTES, false)?.unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned()),
        reserved_at_ms: now.timestamp_millis(),
        degraded: false,
    };
    let idempotency_key = name("idempotency_key", input.idempotency_key, MAX_ID_BYTES, false)?;
    let ttl_secs = input.ttl_secs.unwrap_or(config.default_ttl_secs);
    if ttl_secs == 0 || ttl_secs > config.max_ttl_secs {
        return Err(Invalid::new("ttl_secs", format!("must be between 1 and {}", config.max_ttl_secs)));
    }
    Ok(ReserveRequest { action, idempotency_key, ttl_secs, estimate: input.estimate.unwrap_or_default() })
}

/// The estimate's amounts, priced: tokens without `cost_usd` are priced
/// as an event with those tokens would be.
pub(crate) fn estimate(raw: &BTreeMap<String, &RawValue>, action: &Action, tenant: Option<&Tenant>, catalog: &Catalog, now: DateTime<Utc>) -> Result<Amounts, Invalid> {
    let mut amounts = BTreeMap::new();
    for (key, value) in raw {
        let field = format!("estimate.{key}");
        let measure = LimitMeasure::parse(key).ok_or_else(|| {
            let names: Vec<&str> = LimitMeasure::ALL.iter().map(|m| m.name()).collect();
            Invalid::new(&field, format!("unknown measure `{key}`; one of {}", names.join(", ")))
        })?;
        let text = decimal_text(value).ok_or_else(|| Invalid::new(&field, "must be a decimal number (a string or a JSON number)"))?;
        amounts.insert(measure, measure.parse_amount(text).map_err(|e| Invalid::new(&field, e))?);
    }
    let token_measures =
        [LimitMeasure::InputTokens, LimitMeasure::OutputTokens, LimitMeasure::CachedInputTokens, LimitMeasure::ReasoningTokens];
    if !amounts.contains_key(&LimitMeasure::TotalTokens) && token_measures.iter().any(|m| amounts.contains_key(m)) {
        let total: i64 = token_measures.iter().map(|m| amounts.get(m).copied().unwrap_or(0)).sum();
        amounts.insert(LimitMeasure::TotalTokens, total);
    }
    if !amounts.contains_key(&LimitMeasure::CostUsd) || (!amounts.contains_key(&LimitMeasure::RevenueUsd) && amounts.contains_key(&LimitMeasure::Credits)) {
        let tokens = |m| u64::try_from(*amounts.get(&m).unwrap_or(&0)).unwrap_or(0);
        let event = UsageEvent {
            idempotency_key: String::new(),
            timestamp: now,
            user_id: action.user_id.clone(),
            customer_id: action.customer_id.clone(),
            feature: action.feature.clone(),
            model: action.model.clone(),
            provider: action.provider.clone(),
            input_tokens: tokens(LimitMeasure::InputTokens),
            output_tokens: tokens(LimitMeasure::OutputTokens),
            cached_input_tokens: tokens(LimitMeasure::CachedInputTokens),
            reasoning_tokens: tokens(LimitMeasure::ReasoningTokens),
            cost_usd: amounts.get(&LimitMeasure::CostUsd).map(|n| meterline_schemas::Nanos(*n)),
            revenue_usd: amounts.get(&LimitMeasure::RevenueUsd).map(|n| meterline_schemas::Nanos(*n)),
            credits: amounts.get(&LimitMeasure::Credits).map(|n| meterline_schemas::Nanos(*n)),
            billable: true,
            environment: action.environment.clone(),
            metadata: None,
        };
        let priced = price(&event, tenant, catalog);
        amounts.entry(LimitMeasure::CostUsd).or_insert(priced.cost.0);
        amounts.entry(LimitMeasure::RevenueUsd).or_insert(priced.revenue.0);
    }
    Ok(Amounts(amounts))
}

/// The commit's body made into the metered event: the reservation gives
/// its identity, the body its usage; the contract's rules apply.
pub(crate) fn commit_event(key: &str, action: &Action, body: &str, bounds: &TimeBounds, now: DateTime<Utc>) -> Result<UsageEvent, ApiError> {
    let mut object: serde_json::Map<String, serde_json::Value> = if body.trim().is_empty() {
        serde_json::Map::new()
    } else {
        serde_json::from_str(body).map_err(|e| Invalid::new("body", format!("must be a JSON object of the call's usage: {e}")))?
    };
    for field in FROM_RESERVATION {
        if object.contains_key(field) {
            return Err(Invalid::new(field, "comes from the reservation; a commit gives only usage, money, billable, metadata and timestamp").into());
        }
    }
    object.insert("idempotency_key".into(), key.into());
    object.insert("user_id".into(), action.user_id.clone().into());
    if let Some(c) = &action.customer_id {
        object.insert("customer_id".into(), c.clone().into());
    }
    object.insert("feature".into(), action.feature.clone().into());
    object.insert("model".into(), action.model.clone().into());
    if let Some(p) = &action.provider {
        object.insert("provider".into(), p.clone().into());
    }
    object.insert("environment".into(), action.environment.clone().into());
    object.entry("timestamp").or_insert_with(|| rfc3339_ms(action.reserved_at_ms).into());
    let text = serde_json::Value::Object(object).to_string();
    parse_event(&text, bounds, now).map_err(|rejection| {
        let first = rejection.errors.into_iter().next();
        match first {
            Some(e) => ApiError::bad_request(e.code.as_str(), e.message).with_field(&e.field),
            None => ApiError::bad_request("invalid", "the commit is not a valid usage event"),
        }
    })
}

