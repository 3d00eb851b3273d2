//! The HTTP server: tenant-scoped read endpoints (thin handlers over the
//! store, typed answers), health, readiness, metrics, OpenAPI.

use axum::extract::{MatchedPath, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use axum::{Json, Router};
use meterline_domain::{AlertState, EventRow, Granularity, Kept, Metric, RetentionConfig, Rule, SumRow, TimeColumn};
use meterline_clickhouse::Limit;
use meterline_http::{ApiError, HasKeys, PathId, ReadKey, with_operations};
use meterline_schemas::tenants::{KeyRing, TenantConfig};
use meterline_sql::{DIMENSIONS, Scope};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

use crate::answers::{Alert, AlertsAnswer, Event, EventsAnswer, MarginsAnswer, Range, Ranked, Row, TopSpendersAnswer, UsageAnswer, UserUsageAnswer, WithMargin, ratio};
use crate::billing::ClickHouseBilling;
use crate::config::Config;
use crate::export::{ClickHouseExport, ExportSource};
use crate::gate::TenantGate;
use crate::params::Params;
use crate::store::{AlertsQuery, ClickHouseStore, Order, QueryStore, RankQuery, Ranking, SumsQuery};
use crate::refresh::Refresher;
use crate::{QueryError, metrics, pages};

/// The OpenAPI document, checked in beside the crate.
pub const OPENAPI: &str = include_str!("../openapi.json");

#[derive(Debug)]
pub struct AppState {
    keys: KeyRing,
    store: Arc<dyn QueryStore>,
    max_days: i64,
    /// Where `/v1/billing/export` reads; without one it answers 503.
    export: Option<Arc<dyn ExportSource>>,
    /// The Stripe meter sync's mapping and status routes, over their own
    /// state (the query service's: ClickHouse); merged into the API.
    billing: Option<Router>,
    /// Portal tokens' secrets and origins, and where the portal reads limits.
    portal: crate::portal::Portal,
    /// The limits' read routes (`crate::limits::read_routes`) over the
    /// limits' store, when this service has one; merged into the API.
    limits: Option<Router>,
    /// The horizons: a range starting before what is kept of the rows it
    /// reads answers 400, never a partial sum. `None` for a store that
    /// drops nothing (the tests' fakes).
    retention: Option<RetentionConfig>,
}

impl AppState {
    /// The query API's state over any store: the all-in-one binary passes its
    /// embedded store, the query service ClickHouse.
    pub fn new(tenants: &[TenantConfig], store: Arc<dyn QueryStore>, max_range_days: i64) -> Result<AppState, QueryError> {
        Ok(AppState { keys: KeyRing::from_config(tenants)?, store, max_days: max_range_days, export: None, billing: None, portal: crate::portal::Portal::from_config(tenants)?, limits: None, retention: None })
    }

    /// The state with the billing export reading from `source`.
    pub fn with_export(self, source: Arc<dyn ExportSource>) -> AppState {
        AppState { export: Some(source), ..self }
    }

    /// The state with the billing routes (`meterline_billing::routes`)
    /// served beside the API.
    pub fn with_billing(self, routes: Router) -> AppState {
        AppState { billing: Some(routes), ..self }
    }

    /// The state with the limits' read routes served beside the API.
    pub fn with_limits(self, routes: Router) -> AppState {
        AppState { limits: Some(routes), ..self }
    }

    /// The state with the portal reading limits and subscription cycles
    /// from `source` (without one it shows no limits and calendar months).
    pub fn with_portal_limits(self, source: Arc<dyn crate::portal::LimitSource>) -> AppState {
        AppState { portal: self.portal.with_limits(source), ..self }
    }

    /// The state with the horizons of `[retention]`, which both services pass.
    pub fn with_retention(self, retention: RetentionConfig) -> AppState {
        AppState { retention: Some(retention), ..self }
    }

    /// Refuses, naming `from`, a range whose `reads` start before what is kept.
    pub(crate) fn kept(&self, reads: &[(Kept, i64)], from: chrono::DateTime<chrono::Utc>) -> Result<(), ApiError> {
        let Some(retention) = &self.retention else { return Ok(()) };
        retention.check(reads, chrono::Utc::now()).map_err(|e| ApiError::bad_request("range_not_kept", e.message(from)).with_field("from"))
    }

    pub(crate) fn portal(&self) -> &crate::portal::Portal {
        &self.portal
    }

    pub(crate) fn query_store(&self) -> &Arc<dyn QueryStore> {
        &self.store
    }

    pub(crate) fn export_source(&self) -> Option<&Arc<dyn ExportSource>> {
        self.export.as_ref()
    }

    pub(crate) fn max_days(&self) -> i64 {
        self.max_days
    }
}

impl HasKeys for AppState {
    fn keys(&self) -> &KeyRing {
        &self.keys
    }
}

type Shared = Arc<AppState>;
type Raw = Query<HashMap<String, String>>;

/// Connects to ClickHouse and serves until `shutdown`, then drains.
pub async fn serve(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), QueryError> {
    // Every statement this service sends carries the read limits: the
    // dashboard's reads, the export's and the billing routes' alike.
    let clickhouse = meterline_clickhouse::connect(&config.clickhouse).await?.with_read_limits(config.query.read_limits());
    // Subscriptions (cycle anchors) live with the limits in Redis; without
    // it every subject is exported by calendar month.
    let redis = match &config.limits.redis_url {
        Some(url) => Some(meterline_redis::RedisLimits::connect(url).await.map_err(|e| QueryError::config("limits.redis_url", e.to_string()))?),
        None => None,
    };
    let portal_limits = redis.clone().map(|r| Arc::new(crate::portal::StoreLimits(r)) as Arc<dyn crate::portal::LimitSource>);
    let limits = redis.clone().map(|r| crate::limits::read_routes(r, &config.tenants, config.limits.clone())).transpose()?;
    let export = ClickHouseExport { store: clickhouse.clone(), redis };
    let billing = meterline_billing::BillingApi::new(ClickHouseBilling::new(clickhouse.clone()), KeyRing::from_config(&config.tenants)?, config.billing.clone());
    let gate = TenantGate::new(config.query.max_concurrent_per_tenant, Duration::from_millis(config.query.max_queue_wait_ms));
    let store: Arc<dyn QueryStore> = Arc::new(ClickHouseStore::new(clickhouse, config.server.ranking_cache_groups, gate));
    // Keeps the standing rankings fresh off the request path until the
    // server has drained (dropped at the end of this function, whichever way it ends).
    let _refresher = (config.server.ranking_cache_groups > 0).then(|| Refresher::spawn(&store, config.server.ranking_refresh(), config.server.ranking_refresh_idle()));
    let state = AppState::new(&config.tenants, store, config.server.max_range_days)?.with_export(Arc::new(export)).with_retention(config.retention.clone());
    let state = state.with_billing(meterline_billing::routes(Arc::new(billing)));
    let state = match portal_limits {
        Some(source) => state.with_portal_limits(source),
        None => state,
    };
    let state = Arc::new(match limits {
        Some(routes) => state.with_limits(routes),
        None => state,
    });
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Every API route: the one list the router is built from and the OpenAPI
/// document is checked against.
fn routes() -> Vec<(&'static str, MethodRouter<Shared>)> {
    vec![
        ("/v1/usage", get(usage)),
        ("/v1/top-spenders", get(top_spenders)),
        ("/v1/margins", get(margins)),
        ("/v1/users/{user_id}/usage", get(user_usage)),
        ("/v1/events", get(events)),
        ("/v1/alerts", get(alerts)),
        ("/v1/billing/export", get(crate::export::handler)),
        ("/v1/portal/tokens", axum::routing::post(crate::portal::routes::mint)),
        ("/v1/portal/usage", get(crate::portal::routes::usage).options(crate::portal::routes::preflight)),
    ]
}

/// The API routes' paths, the billing routes' and the limits' read routes
/// included (every deployment serves them beside the API).
pub fn route_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).chain(meterline_billing::routes::PATHS).chain(meterline_limits::READ_PATHS).collect()
}

/// The API routes alone (with the OpenAPI document), for a process that
/// serves them beside others.
pub fn api_routes(state: Shared) -> Router {
    let billing = state.billing.clone().map(|b| b.route_layer(middleware::from_fn(record)));
    let limits = state.limits.clone().map(|l| l.route_layer(middleware::from_fn(record)));
    let api = routes()
        .into_iter()
        .fold(Router::new(), |router, (path, method)| router.route(path, method))
        .route_layer(middleware::from_fn(record))
        .route("/openapi.json", get(|| async { ([("content-type", "application/json")], OPENAPI) }))
        .route("/widget.js", get(crate::portal::routes::widget))
        .with_state(state);
    let api = match billing {
        Some(billing) => api.merge(billing),
        None => api,
    };
    match limits {
        Some(limits) => api.merge(limits),
        None => api,
    }
}

/// Without the limits' store (no `[limits] redis_url`) the limits' read
/// routes answer `404` after the key is checked, saying why: the service
/// has no limits to serve (the dashboard then says so, as it does for a
/// server without them), which no retry changes.
fn limits_unconfigured(state: Shared) -> Router {
    meterline_limits::READ_PATHS
        .into_iter()
        .fold(Router::new(), |router, path| router.route(path, get(no_limits)))
        .route_layer(middleware::from_fn(record))
        .with_state(state)
}

async fn no_limits(_: ReadKey) -> ApiError {
    ApiError::not_found_what("this service has no limits store: set limits.redis_url to serve limits here")
}

/// The query service's whole router: the API, health, readiness, metrics.
pub fn router(state: Shared) -> Router {
    let ready = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move { state.store.ping().await }
        }
    };
    let unconfigured = state.limits.is_none().then(|| limits_unconfigured(state.clone()));
    // The admin dashboard at `/`: static files; its data comes from the API above.
    let api = api_routes(state).merge(meterline_dashboard::routes());
    let api = match unconfigured {
        Some(limits) => api.merge(limits),
        None => api,
    };
    with_operations(api, metrics::handle(), ready, "the store is not reachable")
}

/// Counts and times every answer by route template and status, refusals
/// included. The template comes from the router, so the label is bounded.
async fn record(path: MatchedPath, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::request(path.as_str(), response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// The answer to a store that could not answer, classified here once: a
/// read stopped by a server-side limit or refused by the tenant's cap names
/// the limit (the client can narrow its query or slow down); anything else
/// is logged at the boundary with its cause, and the client hears only that
/// it may retry. All are `503` with `Retry-After`.
pub(crate) fn unavailable(e: QueryError) -> ApiError {
    let (code, message, retry_after) = match &e {
        QueryError::Overloaded { permits, .. } => {
            ("overloaded_tenant", format!("this tenant already has {permits} queries running (query.max_concurrent_per_tenant); retry when they finish"), 1)
        }
        QueryError::ClickHouse(ch) => match ch.limit() {
            Some(Limit::Time) => (
                "query_time_limit",
                "the query ran past the server-side time limit (query.max_execution_secs); ask for a shorter range or a coarser granularity".to_owned(),
                5,
            ),
            Some(Limit::Memory) => (
                "query_memory_limit",
                "the query needed more memory than the server-side limit (query.max_memory_bytes); ask for a shorter range, a coarser granularity or fewer groups".to_owned(),
                5,
            ),
            Some(Limit::Concurrency) => ("store_overloaded", "the store is running its maximum of concurrent queries; retry later".to_owned(), 2),
            None => return unreachable_store(&e),
        },
        _ => return unreachable_store(&e),
    };
    // Expected under load, and the client is told: a warning, not an error.
    tracing::warn!(error = %e, code, "query refused");
    let mut answer = ApiError::unavailable(message);
    answer.code = code;
    answer.retry_after_secs = Some(retry_after);
    answer
}

fn unreachable_store(e: &QueryError) -> ApiError {
    tracing::error!(error = %e, "query failed");
    ApiError::unavailable("the store could not answer; retry later")
}

async fn sums(state: &AppState, scope: &Scope, q: SumsQuery) -> Result<Vec<SumRow>, ApiError> {
    state.store.sums(scope, &q).await.map_err(unavailable)
}

/// An aggregate over no rows still yields one all-zero row on some servers;
/// a group or window with no events is not a row.
fn with_events(rows: &[SumRow]) -> impl Iterator<Item = &SumRow> {
    rows.iter().filter(|r| r.s_events > 0)
}

/// Keeps the first `limit` of `rows` (asked for one more); true if more were there.
fn cut<T>(rows: &mut Vec<T>, limit: i64) -> bool {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    more
}

async fn usage(State(state): State<Shared>, ReadKey { tenant }: ReadKey, Query(raw): Raw) -> Response {
    let answer = async {
        let p = Params::new(&raw, &["group_by", "granularity", "limit", "cursor"])?;
        let group_by = p.dimensions("group_by", &[])?;
        let granularity = p.one_of("granularity", &Granularity::ALL, Granularity::as_str, Granularity::Day)?;
        let limit = p.limit(10_000, 100_000)?;
        let after = p.get("cursor").map(|c| pages::decode(c, granularity, &group_by)).transpose()?;
        let scope = p.scope(&tenant, TimeColumn::WindowStart, Some(30), state.max_days)?;
        state.kept(&state.store.rollup_reads(&scope, granularity, &group_by), scope.from)?;
        let read = after.as_ref().map_or_else(|| scope.clone(), |a| pages::rest(&scope, granularity, a));
        // One row more than asked tells whether the answer is cut.
        let q = SumsQuery { granularity, group_by: group_by.clone(), negative_only: false, order_by_margin: false, after, limit: limit + 1 };
        let mut rows = sums(&state, &read, q).await?;
        let next_cursor = cut(&mut rows, limit).then(|| rows.last().map(|r| pages::encode(granularity, &group_by, r))).flatten();
        let bucketed = granularity != Granularity::Total;
        let rows = with_events(&rows).map(|r| Row::of(r, &group_by, bucketed)).collect();
        let answer = UsageAnswer { range: Range::of(&scope), granularity: granularity.as_str(), group_by: &group_by, rows, next_cursor };
        Ok::<_, ApiError>(Json(answer).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn top_spenders(State(state): State<Shared>, ReadKey { tenant }: ReadKey, Query(raw): Raw) -> Response {
    let answer = async {
        let p = Params::new(&raw, &["by", "metric", "order", "limit"])?;
        let by = p.choice("by", &["user_id", "customer_id"], "user_id")?;
        let metric = p.one_of("metric", &Metric::ALL, Metric::as_str, Metric::Cost)?;
        let descending = p.choice("order", &["desc", "asc"], "desc")? == "desc";
        let limit = p.limit(10, 1_000)?;
        let scope = p.scope(&tenant, TimeColumn::WindowStart, Some(30), state.max_days)?;
        state.kept(&state.store.rollup_reads(&scope, Granularity::Total, &[by]), scope.from)?;
        let q = RankQuery { group_by: vec![by], order: Order::Metric { metric, descending }, negative_only: false, limit: limit + 1, count_negative: false };
        let Ranking { mut rows, total, .. } = state.store.ranking(&scope, &q).await.map_err(unavailable)?;
        let truncated = cut(&mut rows, limit);
        let of_total = metric.of(&total);
        let ranked = with_events(&rows)
            .map(|r| Ranked { row: Row::of(r, &[by], false), share: if of_total > 0 { ratio(metric.of(r), of_total, 6) } else { None } })
            .collect();
        let answer = TopSpendersAnswer { range: Range::of(&scope), by, metric: metric.as_str(), rows: ranked, truncated, total: Row::of(&total, &[], false) };
        Ok::<_, ApiError>(Json(answer).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn margins(State(state): State<Shared>, ReadKey { tenant }: ReadKey, Query(raw): Raw) -> Response {
    let answer = async {
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
        state.kept(&state.store.rollup_reads(&scope, Granularity::Total, &group_by), scope.from)?;
        let q = RankQuery { group_by: group_by.clone(), order: Order::Margin, negative_only, limit: limit + 1, count_negative: true };
        let Ranking { mut rows, total, negative } = state.store.ranking(&scope, &q).await.map_err(unavailable)?;
        let truncated = cut(&mut rows, limit);
        let answer = MarginsAnswer {
            range: Range::of(&scope),
            group_by: &group_by,
            rows: with_events(&rows).map(|r| WithMargin::of(r, &group_by)).collect(),
            truncated,
            total: WithMargin::of(&total, &[]),
            negative_margin_groups: negative.unwrap_or(0),
        };
        Ok(Json(answer).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// The most features (and models) a user's statement lists.
const STATEMENT_GROUPS: usize = 10_000;

async fn user_usage(State(state): State<Shared>, ReadKey { tenant }: ReadKey, PathId(user_id): PathId, Query(mut raw): Raw) -> Response {
    let answer = async {
        if raw.contains_key("user_id") {
            return Err(ApiError::bad_request("invalid_parameter", "the user is named in the path").with_field("user_id"));
        }
        raw.insert("user_id".to_owned(), user_id.clone());
        let p = Params::new(&raw, &[])?;
        // Default: this calendar month, as a customer-facing statement would.
        let scope = p.scope(&tenant, TimeColumn::WindowStart, None, state.max_days)?;
        let reads: Vec<(Kept, i64)> = [(Granularity::Total, &["feature"][..]), (Granularity::Day, &[][..])]
            .iter()
            .flat_map(|(g, by)| state.store.rollup_reads(&scope, *g, by))
            .collect();
        state.kept(&reads, scope.from)?;
        // One row past the cut tells a cut list from a whole one.
        let (totals, mut by_feature, mut by_model, daily) = tokio::try_join!(
            sums(&state, &scope, SumsQuery::totals(&[], 1)),
            sums(&state, &scope, SumsQuery::totals(&["feature"], STATEMENT_GROUPS as i64 + 1)),
            sums(&state, &scope, SumsQuery::totals(&["model"], STATEMENT_GROUPS as i64 + 1)),
            sums(&state, &scope, SumsQuery { granularity: Granularity::Day, ..SumsQuery::totals(&[], 10_000) }),
        )?;
        let none = SumRow::default();
        let (by_feature_truncated, by_model_truncated) = (by_feature.len() > STATEMENT_GROUPS, by_model.len() > STATEMENT_GROUPS);
        by_feature.truncate(STATEMENT_GROUPS);
        by_model.truncate(STATEMENT_GROUPS);
        let answer = UserUsageAnswer {
            user_id: &user_id,
            range: Range::of(&scope),
            totals: Row::of(totals.first().unwrap_or(&none), &[], false),
            by_feature: by_feature.iter().map(|r| Row::of(r, &["feature"], false)).collect(),
            by_model: by_model.iter().map(|r| Row::of(r, &["model"], false)).collect(),
            by_feature_truncated,
            by_model_truncated,
            daily: daily.iter().map(|r| Row::of(r, &[], true)).collect(),
        };
        Ok(Json(answer).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
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

async fn events(State(state): State<Shared>, ReadKey { tenant }: ReadKey, Query(raw): Raw) -> Response {
    let answer = async {
        let p = Params::new(&raw, &["cursor", "limit"])?;
        if p.get("user_id").is_none() {
            return Err(ApiError::bad_request("invalid_parameter", "the audit trail is per user: give user_id").with_field("user_id"));
        }
        let limit = p.limit(100, 1_000)?;
        let cursor = p.get("cursor").map(decode_cursor).transpose()?;
        let scope = p.scope(&tenant, TimeColumn::EventTime, None, state.max_days)?;
        state.kept(&[(Kept::Events, scope.from.timestamp())], scope.from)?;
        let mut rows: Vec<EventRow> = state.store.events(&scope, cursor.as_ref(), limit + 1).await.map_err(unavailable)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = if more { rows.last().map(encode_cursor) } else { None };
        let answer = EventsAnswer { range: Range::of(&scope), events: rows.iter().map(Event::of).collect(), next_cursor };
        Ok(Json(answer).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn alerts(State(state): State<Shared>, ReadKey { tenant }: ReadKey, Query(raw): Raw) -> Response {
    let answer = async {
        let p = Params::new(&raw, &["state", "rule", "limit", "cursor"])?;
        for unsupported in ["customer_id", "feature", "model", "environment", "billable"] {
            if p.get(unsupported).is_some() {
                return Err(ApiError::bad_request("invalid_parameter", "alerts are per user; filter by user_id or rule").with_field(unsupported));
            }
        }
        let state_filter = match p.choice("state", &["open", "resolved", "all"], "open")? {
            "open" => Some(AlertState::Open),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        };
        let rule = p
            .get("rule")
            .map(|r| Rule::parse(r).ok_or_else(|| ApiError::bad_request("invalid_parameter", format!("must be one of {}", Rule::names())).with_field("rule")))
            .transpose()?;
        let limit = p.limit(100, 1_000)?;
        let scope = p.scope(&tenant, TimeColumn::OpenedAt, Some(30), state.max_days)?;
        state.kept(&[(Kept::Alerts, scope.from.timestamp())], scope.from)?;
        let after = p.get("cursor").map(pages::decode_alert).transpose()?;
        let (from, to) = (scope.from.timestamp(), scope.to.timestamp());
        let q = AlertsQuery { tenant: tenant.clone(), from, to, state: state_filter, user: p.get("user_id").map(str::to_owned), rule, after, limit: limit + 1 };
        let mut rows = state.store.alerts(&q).await.map_err(unavailable)?;
        let next_cursor = cut(&mut rows, limit).then(|| rows.last().map(pages::encode_alert)).flatten();
        Ok(Json(AlertsAnswer { range: Range::of(&scope), alerts: rows.iter().map(Alert::of).collect(), next_cursor }).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}
