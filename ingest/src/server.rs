//! The HTTP server: `POST /v1/events`, health, readiness and metrics (and
//! the route to `POST /api/v1/events`, handled in `cloudevents.rs`).

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::Utc;
use meterline_schemas::cloudevents::{CloudEventsConfig, Mappings};
use meterline_schemas::prices::{Catalog, PriceBook};
use meterline_schemas::tenants::{KeyRing, Scope, TenantConfig};
use meterline_schemas::wire::Envelope;
use meterline_schemas::{TimeBounds, batch, parse_event};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body;
use crate::config::{Config, KafkaConfig, ServerConfig};
use meterline_http::{ApiError, authenticate, with_operations};
use crate::metrics;
use crate::log::EventLog;
use crate::producer::EventProducer;
use crate::IngestError;

/// Everything a request needs, shared by all requests.
#[derive(Debug)]
pub struct AppState {
    pub(crate) keys: KeyRing,
    pub(crate) catalog: Catalog,
    pub(crate) bounds: TimeBounds,
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) permits: Semaphore,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_events: usize,
    /// How `POST /api/v1/events` maps CloudEvents, per tenant.
    pub(crate) cloudevents: Mappings,
}

impl AppState {
    /// Ingest's state over any event log: the all-in-one binary passes its
    /// embedded store here, the ingest service its Kafka producer.
    pub fn new(
        tenants: &[TenantConfig],
        bounds: TimeBounds,
        server: &ServerConfig,
        log: Arc<dyn EventLog>,
    ) -> Result<AppState, IngestError> {
        Ok(AppState {
            keys: KeyRing::from_config(tenants)?,
            catalog: Catalog::builtin()?,
            bounds,
            log,
            permits: Semaphore::new(server.max_in_flight_requests),
            max_body_bytes: server.max_body_bytes,
            max_events: server.max_events_per_request,
            cloudevents: Mappings::default(),
        })
    }

    /// Maps CloudEvents with `config` (the built-in paths until called).
    pub fn with_cloudevents(mut self, config: &CloudEventsConfig) -> Result<AppState, IngestError> {
        self.cloudevents = config.resolve()?;
        Ok(self)
    }
}

/// The answer to a batch: how many events are durable, and why each other one is not.
#[derive(Debug, Serialize)]
pub struct BatchResponse {
    pub accepted: usize,
    pub rejected: Vec<RejectedEvent>,
}

#[derive(Debug, Serialize)]
pub struct RejectedEvent {
    pub index: usize,
    pub idempotency_key: Option<String>,
    pub errors: Vec<EventError>,
}

#[derive(Debug, Serialize)]
pub struct EventError {
    pub field: Option<String>,
    pub code: &'static str,
    pub message: String,
}

/// Runs the server on `listener` until `shutdown` resolves, then drains
/// in-flight requests and waits for outstanding broker acks, within the grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    let producer = EventProducer::new(&config.kafka)?;
    let log: Arc<dyn EventLog> = Arc::new(producer.clone());
    let state = Arc::new(AppState::new(&config.tenants, config.events, &config.server, log)?.with_cloudevents(&config.cloudevents)?);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let keeper = tokio::spawn(keep_topic(producer.clone()));
    let mut app = router(state);
    let mut commits = None;
    if let Some(url) = &config.limits.redis_url {
        // Limits are served here, beside ingest, because a commit meters its
        // event into the same topic (durable in Kafka before the answer), and
        // everything else they read is in Redis, not ClickHouse. A commit is
        // one event its caller waits on: its own producer lingers only
        // `limits.commit_linger_us` (1 ms by default; batches of events wait
        // `linger_ms`): with no linger librdkafka wakes its broker thread for
        // each message (about half the process's CPU at 64 concurrent commits
        // under perf); a short linger lets concurrent commits share a produce
        // request. Each commit still answers only once its event is acked.
        // A `linger.ms` in `kafka.options` still wins.
        let mut kafka = KafkaConfig { linger_ms: 0, ..config.kafka.clone() };
        kafka.options.entry("linger.ms".to_owned()).or_insert_with(|| (config.limits.commit_linger_us as f64 / 1_000.0).to_string());
        let producer = EventProducer::new(&kafka)?;
        commits = Some(producer.clone());
        let redis = meterline_redis::RedisLimits::connect(url).await?;
        let limits = meterline_limits::Limits::new(
            redis,
            Arc::new(crate::log::LogMeter(Arc::new(producer))),
            KeyRing::from_config(&config.tenants)?,
            config.events,
            config.limits.clone(),
            Arc::new(Utc::now),
        )?;
        app = app.merge(meterline_limits::routes(Arc::new(limits)));
    }
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    keeper.abort();
    let _ = tokio::task::spawn_blocking(move || {
        producer.flush(grace);
        if let Some(commits) = commits {
            commits.flush(grace);
        }
    })
    .await;
    Ok(())
}

/// Creates the topic at start, and again if readiness finds it gone.
async fn keep_topic(producer: EventProducer) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if !producer.ready().await {
            match producer.ensure_topic().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ensure the events topic; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            tokio::time::sleep(backoff).await;
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// The API routes alone, for a process that serves them beside others.
pub fn api_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        // OpenMeter's ingest path, for its SDKs and LiteLLM's callback.
        .route("/api/v1/events", post(crate::cloudevents::post))
        .with_state(state)
}

/// The ingest service's whole router: the API, health, readiness, metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let ready = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move { state.log.ready().await }
        }
    };
    with_operations(api_routes(state), metrics::handle(), ready, "the event log is not reachable (Kafka broker down or topic missing)")
}

async fn post_events(State(state): State<Arc<AppState>>, headers: HeaderMap, request: Body) -> Response {
    let started = Instant::now();
    let response = match state.permits.try_acquire() {
        Err(_) => ApiError::overloaded().into_response(),
        Ok(_permit) => {
            metrics::in_flight(1.0);
            let response = handle_events(&state, &headers, request).await.unwrap_or_else(IntoResponse::into_response);
            metrics::in_flight(-1.0);
            response
        }
    };
    metrics::request(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// What the blocking stage hands back: events to send and events refused.
struct Validated {
    outgoing: Vec<Envelope>,
    unpriced: u64,
    rejected: Vec<RejectedEvent>,
    rejected_reasons: Vec<&'static str>,
    total: usize,
}

async fn handle_events(state: &Arc<AppState>, headers: &HeaderMap, request: Body) -> Result<Response, ApiError> {
    let principal = authenticate(&state.keys, headers, Scope::Ingest)?.clone();
    let format = body::format(headers)?;
    let encoding = body::encoding(headers)?;
    let raw = body::collect(request, state.max_body_bytes).await?;

    let worker_state = state.clone();
    let tenant = principal.tenant.clone();
    // Decompression, parsing and validation are CPU work: keep them off the
    // async threads so one large batch cannot stall other connections.
    let validated = tokio::task::spawn_blocking(move || validate(&worker_state, &tenant, raw, encoding, format))
        .await
        .map_err(|_| ApiError::internal())??;

    metrics::batch(validated.total);
    for reason in &validated.rejected_reasons {
        metrics::rejected(&principal.tenant, reason);
    }
    let accepted = validated.outgoing.len();
    if accepted > 0 {
        let started = Instant::now();
        let sent = state.log.append(validated.outgoing).await;
        metrics::produced(started.elapsed().as_secs_f64(), sent.is_ok());
        if let Err(e) = sent {
            tracing::warn!(error = %e, tenant = %principal.tenant, events = accepted, "broker did not ack; answering 503");
            return Err(ApiError::unavailable("the event log did not acknowledge the batch; retry it unchanged"));
        }
        metrics::accepted(&principal.tenant, accepted as u64, validated.unpriced);
    }
    let status = if accepted == 0 && !validated.rejected.is_empty() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, axum::Json(BatchResponse { accepted, rejected: validated.rejected })).into_response())
}

fn validate(
    state: &AppState,
    tenant_id: &str,
    raw: Vec<u8>,
    encoding: body::Encoding,
    format: batch::BodyFormat,
) -> Result<Validated, ApiError> {
    let decoded = body::decode(raw, encoding, state.max_body_bytes)?;
    let text = body::text(decoded)?;
    let now = Utc::now();
    // An array body is split and parsed in one pass; any other, or one that
    // does not read whole, takes the two passes, which decide every error.
    let fused = match format {
        batch::BodyFormat::Json => batch::parse_array(&text, state.max_events, &state.bounds, now),
        batch::BodyFormat::Ndjson => None,
    };
    let parsed = match fused {
        Some(parsed) => parsed,
        None => batch::split(&text, format, state.max_events)
            .map_err(|e| match e {
                batch::BatchError::TooManyEvents { .. } => ApiError::too_large(e.to_string()),
                batch::BatchError::Syntax { .. } => ApiError::bad_request("invalid_json", e.to_string()),
                batch::BatchError::Shape => ApiError::bad_request("invalid_shape", e.to_string()),
            })?
            .into_iter()
            .map(|item| parse_event(item, &state.bounds, now))
            .collect(),
    };
    let tenant = state.keys.tenant(tenant_id);
    let empty = Default::default();
    let prices = PriceBook { overrides: tenant.map_or(&empty, |t| &t.prices), catalog: &state.catalog };
    let mut out = Validated {
        outgoing: Vec::with_capacity(parsed.len()),
        unpriced: 0,
        rejected: Vec::new(),
        rejected_reasons: Vec::new(),
        total: parsed.len(),
    };
    for (index, result) in parsed.into_iter().enumerate() {
        match result {
            Ok(event) => {
                if prices.cost_of(&event).is_none() {
                    out.unpriced += 1;
                }
                out.outgoing.push(Envelope { tenant: tenant_id.to_owned(), received_at: now, event });
            }
            Err(rejection) => {
                out.rejected_reasons.push(rejection.errors.first().map_or("invalid", |e| e.code.as_str()));
                out.rejected.push(RejectedEvent {
                    index,
                    idempotency_key: rejection.idempotency_key,
                    errors: rejection
                        .errors
                        .into_iter()
                        .map(|e| EventError {
                            field: (!e.field.is_empty()).then_some(e.field),
                            code: e.code.as_str(),
                            message: e.message,
                        })
                        .collect(),
                });
            }
        }
    }
    Ok(out)
}
