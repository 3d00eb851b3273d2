//! The HTTP server: tenant-scoped read endpoints, health, readiness, metrics, OpenAPI.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use meterline_domain::{AlertState, EventRow, Granularity, Metric, Rule, SumRow, TimeColumn};
use meterline_http::{ApiError, authenticate, with_operations};
use meterline_sql::{DIMENSIONS, Scope as RangeScope};
use meterline_schemas::Nanos;
use meterline_schemas::tenants::{KeyRing, Scope, TenantConfig};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::params::Params;
use crate::store::{AlertsQuery, ClickHouseStore, Order, QueryStore, RankQuery, Ranking, SumsQuery};
use crate::{QueryError, metrics};

/// The OpenAPI document, checked in beside the crate.
pub const OPENAPI: &str = include_str!("../openapi.json");

#[derive(Debug)]
pub struct AppState {
    keys: KeyRing,
    store: Arc<dyn QueryStore>,
    max_days: i64,
}

impl AppState {
    /// The query API's state over any store: the all-in-one binary passes its
    /// embedded store, the query service ClickHouse.
    pub fn new(tenants: &[TenantConfig], store: Arc<dyn QueryStore>, max_range_days: i64) -> Result<AppState, QueryError> {
        Ok(AppState { keys: KeyRing::from_config(tenants)?, store, max_days: max_range_days })
    }
}

/// Connects to ClickHouse and serves until `shutdown`, then drains.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), QueryError> {
    let store = ClickHouseStore::new(meterline_clickhouse::connect(&config.clickhouse).await?, config.server.ranking_cache_groups);
    let state = Arc::new(AppState::new(&config.tenants, Arc::new(store), config.server.max_range_days)?);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// The API routes alone (with the OpenAPI document), for a process that
/// serves them beside others.
pub fn api_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/top-spenders", get(top_spenders))
        .route("/v1/margins", get(margins))
        .route("/v1/users/{user_id}/usage", get(user_usage))
        .route("/v1/events", get(events))
        .route("/v1/alerts", get(alerts))
        .route("/openapi.json", get(|| async { ([("content-type", "application/json")], OPENAPI) }))
        .with_state(state)
}

/// The query service's whole router: the API, health, readiness, metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let ready = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move { state.store.ping().await }
        }
    };
    with_operations(api_routes(state), metrics::handle(), ready, "the store is not reachable")
}

type Raw = Query<HashMap<String, String>>;

/// Runs a handler body with auth, timing and the metrics every endpoint shares.
async fn answer<F, Fut>(endpoint: &'static str, state: &AppState, headers: &HeaderMap, body: F) -> Response
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<Value, ApiError>>,
{
    let started = Instant::now();
    let response = match authenticate(&state.keys, headers, Scope::Read) {
        Err(e) => e.into_response(),
        Ok(principal) => match body(principal.tenant.clone()).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => e.into_response(),
        },
    };
    metrics::request(endpoint, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn fetch(state: &AppState, scope: &RangeScope, q: SumsQuery) -> Result<Vec<SumRow>, ApiError> {
    Ok(state.store.sums(scope, &q).await?)
}

fn money(n: i128) -> String {
    Nanos(i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })).to_string()
}

/// `num / den` as a decimal string with `scale` digits, rounded half away from zero.
pub fn ratio(num: i128, den: i128, scale: u32) -> Option<String> {
    if den == 0 {
        return None;
    }
    let factor = 10i128.pow(scale);
    let scaled = num * factor * 2;
    let q = (scaled.abs() / den.abs() + 1) / 2;
    let negative = (num < 0) != (den < 0) && q != 0;
    let (int, frac) = (q / factor, q % factor);
    Some(format!("{}{int}.{frac:0width$}", if negative { "-" } else { "" }, width = scale as usize))
}

fn row_json(r: &SumRow, group_by: &[&str], with_bucket: bool) -> Value {
    let mut v = json!({
        "events": r.s_events,
        "input_tokens": r.s_input,
        "output_tokens": r.s_output,
        "cached_input_tokens": r.s_cached,
        "reasoning_tokens": r.s_reasoning,
        "cost_usd": money(i128::from(r.s_cost)),
        "revenue_usd": money(i128::from(r.s_revenue)),
        "margin_usd": money(i128::from(r.s_revenue) - i128::from(r.s_cost)),
        "credits": money(i128::from(r.s_credits)),
        "unpriced_events": r.s_unpriced,
    });
    if with_bucket {
        v["window_start"] = json!(DateTime::from_timestamp(i64::from(r.g_bucket), 0).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
    }
    for d in group_by {
        let value = match *d {
            "user_id" => &r.g_user,
            "customer_id" => &r.g_customer,
            "feature" => &r.g_feature,
            _ => &r.g_model,
        };
        // Events without a customer have customer_id ''; answer null.
        v[*d] = if value.is_empty() { Value::Null } else { json!(value) };
    }
    v
}

fn range_json(scope: &RangeScope) -> Value {
    json!({"from": scope.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "to": scope.to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)})
}

async fn usage(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(raw): Raw) -> Response {
    answer("/v1/usage", &state.clone(), &headers, |tenant| async move {
        let p = Params::new(&raw, &["group_by", "granularity", "limit"])?;
        let group_by = p.dimensions("group_by", &[])?;
        let granularity = p.one_of("granularity", &Granularity::ALL, Granularity::as_str, Granularity::Day)?;
        let limit = p.limit(10_000, 100_000)?;
        let scope = p.scope(&tenant, TimeColumn::WindowStart, Some(30), state.max_days)?;
        let rows = fetch(&state, &scope, SumsQuery { granularity, group_by: group_by.clone(), negative_only: false, order_by_margin: false, limit }).await?;
        let total = granularity != Granularity::Total;
        Ok(json!({
            "range": range_json(&scope),
            "granularity": granularity.as_str(),
            "group_by": group_by,
            // An aggregate over no rows still yields one all-zero row on some
            // servers; a window with no events is not a row.
            "rows": rows.iter().filter(|r| r.s_events > 0).map(|r| row_json(r, &group_by, total)).collect::<Vec<_>>(),
        }))
    })
    .await
}

async fn top_spenders(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(raw): Raw) -> Response {
    answer("/v1/top-spenders", &state.clone(), &headers, |tenant| async move {
        let p = Params::new(&raw, &["by", "metric", "order", "limit"])?;
        let by = p.choice("by", &["user_id", "customer_id"], "user_id")?;
        let metric = p.one_of("metric", &Metric::ALL, Metric::as_str, Metric::Cost)?;
        let descending = p.choice("order", &["desc", "asc"], "desc")? == "desc";
        let limit = p.limit(10, 1_000)?;
        let scope = p.scope(&tenant, TimeColumn::WindowStart, Some(30), state.max_days)?;
        let q = RankQuery { group_by: vec![by], order: Order::Metric { metric, descending }, negative_only: false, limit, count_negative: false };
        let Ranking { rows, total: t, .. } = state.store.ranking(&scope, &q).await?;
        let value = |r: &SumRow| metric.of(r);
        let total_value = value(&t);
        let out: Vec<Value> = rows
            .iter()
            .filter(|r| r.s_events > 0)
            .map(|r| {
                let mut v = row_json(r, &[by], false);
                v["share"] = json!(if total_value > 0 { ratio(value(r), total_value, 6) } else { None });
                v
            })
            .collect();
        Ok(json!({"range": range_json(&scope), "by": by, "metric": metric.as_str(), "rows": out, "total": row_json(&t, &[], false)}))
    })
    .await
}

async fn margins(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(raw): Raw) -> Response {
    answer("/v1/margins", &state.clone(), &headers, |tenant| async move {
        let p = Params::new(&raw, &["group_by", "negative_only", "limit"])?;
        let group_by = p.dimensions("group_by", &["user_id"])?;
        if group_by.is_empty() {
            return Err(ApiError::bad_request("invalid_parameter", format!("name at least one of {}", DIMENSIONS.join(", "))).with_field("group_by"));
        }
        let negative_only = match p.get("negative_only") {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(ApiError::bad_request("invalid_parameter", "must be true or false").with_field("negative_only")),
        };
        let limit = p.limit(100, 10_000)?;
        let scope = p.scope(&tenant, TimeColumn::WindowStart, Some(30), state.max_days)?;
        let q = RankQuery { group_by: group_by.clone(), order: Order::Margin, negative_only, limit, count_negative: true };
        let Ranking { rows, total, negative } = state.store.ranking(&scope, &q).await?;
        let with_pct = |r: &SumRow, dims: &[&str]| {
            let mut v = row_json(r, dims, false);
            v["margin_pct"] = json!(ratio((i128::from(r.s_revenue) - i128::from(r.s_cost)) * 100, i128::from(r.s_revenue), 2));
            v
        };
        Ok(json!({
            "range": range_json(&scope),
            "group_by": group_by,
            "rows": rows.iter().filter(|r| r.s_events > 0).map(|r| with_pct(r, &group_by)).collect::<Vec<_>>(),
            "total": with_pct(&total, &[]),
            "negative_margin_groups": negative.unwrap_or(0),
        }))
    })
    .await
}

async fn user_usage(State(state): State<Arc<AppState>>, Path(user_id): Path<String>, headers: HeaderMap, Query(mut raw): Raw) -> Response {
    answer("/v1/users/{user_id}/usage", &state.clone(), &headers, |tenant| async move {
        if raw.contains_key("user_id") {
            return Err(ApiError::bad_request("invalid_parameter", "the user is named in the path").with_field("user_id"));
        }
        raw.insert("user_id".to_owned(), user_id.clone());
        let p = Params::new(&raw, &[])?;
        // Default: this calendar month, as a customer-facing statement would.
        let scope = p.scope(&tenant, TimeColumn::WindowStart, None, state.max_days)?;
        let (totals, by_feature, by_model, daily) = tokio::try_join!(
            fetch(&state, &scope, SumsQuery::totals(&[], 1)),
            fetch(&state, &scope, SumsQuery::totals(&["feature"], 10_000)),
            fetch(&state, &scope, SumsQuery::totals(&["model"], 10_000)),
            fetch(&state, &scope, SumsQuery { granularity: Granularity::Day, ..SumsQuery::totals(&[], 10_000) }),
        )?;
        Ok(json!({
            "user_id": user_id,
            "range": range_json(&scope),
            "totals": row_json(&totals.first().cloned().unwrap_or_default(), &[], false),
            "by_feature": by_feature.iter().map(|r| row_json(r, &["feature"], false)).collect::<Vec<_>>(),
            "by_model": by_model.iter().map(|r| row_json(r, &["model"], false)).collect::<Vec<_>>(),
            "daily": daily.iter().map(|r| row_json(r, &[], true)).collect::<Vec<_>>(),
        }))
    })
    .await
}

fn encode_cursor(r: &EventRow) -> String {
    hex::encode(format!("{}:{}:{}", r.event_time, r.event_time_ns, r.idempotency_key))
}

fn decode_cursor(text: &str) -> Result<(i64, i64, String), ApiError> {
    let bad = || ApiError::bad_request("invalid_parameter", "not a cursor this API returned").with_field("cursor");
    let bytes = hex::decode(text).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ':');
    let secs = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let nanos = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let key = parts.next().ok_or_else(bad)?.to_owned();
    Ok((secs, nanos, key))
}

async fn events(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(raw): Raw) -> Response {
    answer("/v1/events", &state.clone(), &headers, |tenant| async move {
        let p = Params::new(&raw, &["cursor", "limit"])?;
        if p.get("user_id").is_none() {
            return Err(ApiError::bad_request("invalid_parameter", "the audit trail is per user: give user_id").with_field("user_id"));
        }
        let limit = p.limit(100, 1_000)?;
        let cursor = p.get("cursor").map(decode_cursor).transpose()?;
        let scope = p.scope(&tenant, TimeColumn::EventTime, None, state.max_days)?;
        let mut rows: Vec<EventRow> = state.store.events(&scope, cursor.as_ref(), limit + 1).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next = if more { rows.last().map(encode_cursor) } else { None };
        let out: Vec<Value> = rows
            .iter()
            .map(|r| {
                let ts = DateTime::<Utc>::from_timestamp(i64::from(r.event_time), r.event_time_ns).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
                json!({
                    "idempotency_key": r.idempotency_key,
                    "timestamp": ts,
                    "user_id": r.user_id,
                    "customer_id": (!r.customer_id.is_empty()).then_some(&r.customer_id),
                    "feature": r.feature,
                    "model": r.model,
                    "provider": (!r.provider.is_empty()).then_some(&r.provider),
                    "environment": r.environment,
                    "billable": r.billable == 1,
                    "input_tokens": r.input_tokens,
                    "output_tokens": r.output_tokens,
                    "cached_input_tokens": r.cached_input_tokens,
                    "reasoning_tokens": r.reasoning_tokens,
                    "cost_usd": money(i128::from(r.cost_nanos)),
                    "cost_source": meterline_domain::CostSource::from_u8(r.cost_source).as_str(),
                    "revenue_usd": money(i128::from(r.revenue_nanos)),
                    "credits": money(i128::from(r.credits_nanos)),
                    "metadata": serde_json::from_str::<Value>(&r.metadata).ok(),
                    // Where the event sits in Kafka; null from the embedded store, which has no log.
                    "kafka_partition": r.kafka_position().map(|(p, _)| p),
                    "kafka_offset": r.kafka_position().map(|(_, o)| o),
                })
            })
            .collect();
        Ok(json!({"range": range_json(&scope), "events": out, "next_cursor": next}))
    })
    .await
}

async fn alerts(State(state): State<Arc<AppState>>, headers: HeaderMap, Query(raw): Raw) -> Response {
    answer("/v1/alerts", &state.clone(), &headers, |tenant| async move {
        let p = Params::new(&raw, &["state", "rule", "limit"])?;
        for unsupported in ["customer_id", "feature", "model", "environment", "billable"] {
            if p.get(unsupported).is_some() {
                return Err(ApiError::bad_request("invalid_parameter", "alerts are per user; filter by user_id or rule").with_field(unsupported));
            }
        }
        let which = p.choice("state", &["open", "resolved", "all"], "open")?;
        let rule = p
            .get("rule")
            .map(|r| Rule::parse(r).ok_or_else(|| ApiError::bad_request("invalid_parameter", format!("must be one of {}", Rule::names())).with_field("rule")))
            .transpose()?;
        let which = match which {
            "open" => Some(AlertState::Open),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        };
        let limit = p.limit(100, 1_000)?;
        let scope = p.scope(&tenant, TimeColumn::OpenedAt, Some(30), state.max_days)?;
        let q = AlertsQuery { tenant: tenant.clone(), from: scope.from.timestamp(), to: scope.to.timestamp(), state: which, user: p.get("user_id").map(str::to_owned), rule, limit };
        let rows = state.store.alerts(&q).await?;
        let at = |secs: u32| (secs > 0).then(|| DateTime::<Utc>::from_timestamp(i64::from(secs), 0).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))).flatten();
        let out: Vec<Value> = rows
            .iter()
            .map(|a| {
                json!({
                    "user_id": a.user_id,
                    "rule": a.rule,
                    "state": a.state,
                    "observed_usd": money(i128::from(a.observed_nanos)),
                    "threshold_usd": money(i128::from(a.threshold_nanos)),
                    "window_secs": a.window_secs,
                    "opened_at": at(a.opened_at),
                    "updated_at": at(a.updated_at),
                    "resolved_at": at(a.resolved_at),
                })
            })
            .collect();
        Ok(json!({"range": range_json(&scope), "alerts": out}))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::ratio;

    #[test]
    fn ratios_round_half_away_from_zero() {
        assert_eq!(ratio(1, 3, 6).as_deref(), Some("0.333333"));
        assert_eq!(ratio(2, 3, 6).as_deref(), Some("0.666667"));
        assert_eq!(ratio(-1, 8, 2).as_deref(), Some("-0.13"));
        assert_eq!(ratio(5, 1, 2).as_deref(), Some("5.00"));
        assert_eq!(ratio(1, 0, 2), None);
        assert_eq!(ratio(0, 7, 2).as_deref(), Some("0.00"));
    }
}
