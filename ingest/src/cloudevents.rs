//! `POST /api/v1/events`: OpenMeter-compatible ingest of CloudEvents, mapped
//! to usage events per tenant and made durable through the same `EventLog`
//! as `POST /v1/events`.
//!
//! Answers as OpenMeter does: `204` once every event is durable, and a batch
//! with any refused event is refused whole with a `400` problem (nothing of
//! it accepted), naming each refused event's index and CloudEvent field.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use meterline_http::{ApiError, authenticate};
use meterline_schemas::cloudevents::map_event;
use meterline_schemas::prices::PriceBook;
use meterline_schemas::tenants::Scope;
use meterline_schemas::wire::Envelope;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Instant;

use crate::body;
use crate::metrics;
use crate::problem::{MAX_LISTED, Problem, ProblemItem};
use crate::server::AppState;

/// What the body holds, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `application/cloudevents+json`: one event.
    One,
    /// `application/cloudevents-batch+json`: an array of events.
    Many,
    /// `application/json`: an object or an array.
    Either,
}

/// Events ready to append, with what the metrics need.
struct Batch {
    outgoing: Vec<Envelope>,
    unpriced: u64,
    rounded_cost: u64,
    rounded_revenue: u64,
}

pub async fn post(State(state): State<Arc<AppState>>, headers: HeaderMap, request: Body) -> Response {
    let started = Instant::now();
    let response = match state.permits.try_acquire() {
        Err(_) => Problem::from(ApiError::overloaded()).into_response(),
        Ok(_permit) => {
            metrics::in_flight(1.0);
            let response = handle(&state, &headers, request).await.unwrap_or_else(|p| p.into_response());
            metrics::in_flight(-1.0);
            response
        }
    };
    metrics::request(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

// Problems are boxed: they are large and only on the error path.
async fn handle(state: &Arc<AppState>, headers: &HeaderMap, request: Body) -> Result<Response, Box<Problem>> {
    let principal = authenticate(&state.keys, headers, Scope::Ingest)?.clone();
    let shape = shape(headers)?;
    let encoding = body::encoding(headers)?;
    let raw = body::collect(request, state.max_body_bytes).await?;

    let worker_state = state.clone();
    let tenant = principal.tenant.clone();
    // Parsing and mapping are CPU work: off the async threads, as for /v1/events.
    let batch = tokio::task::spawn_blocking(move || map_all(&worker_state, &tenant, raw, encoding, shape))
        .await
        .map_err(|_| ApiError::internal())??;

    let accepted = batch.outgoing.len();
    if accepted > 0 {
        let started = Instant::now();
        let sent = state.log.append(batch.outgoing).await;
        metrics::produced(started.elapsed().as_secs_f64(), sent.is_ok());
        if let Err(e) = sent {
            tracing::warn!(error = %e, tenant = %principal.tenant, events = accepted, "event log did not ack CloudEvents; answering 503");
            return Err(ApiError::unavailable("the event log did not acknowledge the batch; retry it unchanged").into());
        }
        metrics::accepted(&principal.tenant, accepted as u64, batch.unpriced);
        for (field, n) in [("cost_usd", batch.rounded_cost), ("revenue_usd", batch.rounded_revenue)] {
            if n > 0 {
                metrics::cloudevents_rounded(&principal.tenant, field, n);
            }
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn shape(headers: &HeaderMap) -> Result<Shape, ApiError> {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/cloudevents+json" => Ok(Shape::One),
        "application/cloudevents-batch+json" => Ok(Shape::Many),
        "application/json" => Ok(Shape::Either),
        _ => Err(ApiError::unsupported_media(
            "Content-Type",
            format!(
                "{essence:?} is not supported; use application/cloudevents+json, application/cloudevents-batch+json or application/json"
            ),
        )),
    }
}

/// The JSON text of each CloudEvent in the body, in order.
fn split(text: &str, shape: Shape, max_events: usize) -> Result<Vec<&str>, ApiError> {
    let first = text.trim_start().as_bytes().first().copied();
    let many = match (shape, first) {
        (_, None) => return Err(ApiError::bad_request("invalid_json", "body is empty")),
        (Shape::One, _) => false,
        (Shape::Many, Some(b'[')) | (Shape::Either, Some(b'[')) => true,
        (Shape::Either, _) => false,
        (Shape::Many, _) => {
            return Err(ApiError::bad_request("invalid_shape", "a application/cloudevents-batch+json body must be a JSON array of events"));
        }
    };
    if !many {
        // One event: its own parse reports its errors, as event 0.
        return Ok(vec![text]);
    }
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("body is not valid JSON at line {}, column {}: {e}", e.line(), e.column()))
    })?;
    if items.len() > max_events {
        return Err(ApiError::too_large(format!("batch has more than {max_events} events")));
    }
    Ok(items.into_iter().map(RawValue::get).collect())
}

fn map_all(state: &AppState, tenant_id: &str, raw: Vec<u8>, encoding: body::Encoding, shape: Shape) -> Result<Batch, Box<Problem>> {
    let decoded = body::decode(raw, encoding, state.max_body_bytes)?;
    let text = body::text(decoded)?;
    let items = split(&text, shape, state.max_events)?;
    metrics::batch(items.len());
    let mapping = state.cloudevents.for_tenant(tenant_id);
    let tenant = state.keys.tenant(tenant_id);
    let empty = Default::default();
    let prices = PriceBook { overrides: tenant.map_or(&empty, |t| &t.prices), catalog: &state.catalog };
    let now = Utc::now();
    let mut batch = Batch { outgoing: Vec::with_capacity(items.len()), unpriced: 0, rounded_cost: 0, rounded_revenue: 0 };
    let mut listed = Vec::new();
    let mut refused = 0;
    for (index, item) in items.iter().enumerate() {
        match map_event(item, mapping, &state.bounds, now) {
            Ok(mapped) => {
                if prices.cost_of(&mapped.event).is_none() {
                    batch.unpriced += 1;
                }
                batch.rounded_cost += u64::from(mapped.rounded.contains(&"cost_usd"));
                batch.rounded_revenue += u64::from(mapped.rounded.contains(&"revenue_usd"));
                batch.outgoing.push(Envelope { tenant: tenant_id.to_owned(), received_at: now, event: mapped.event });
            }
            Err(errors) => {
                refused += 1;
                metrics::rejected(tenant_id, errors.first().map_or("invalid", |e| e.code));
                for e in errors {
                    if listed.len() < MAX_LISTED {
                        listed.push(ProblemItem { index, field: (!e.field.is_empty()).then_some(e.field), code: e.code, message: e.message });
                    }
                }
            }
        }
    }
    if refused > 0 {
        // OpenMeter refuses a batch with any invalid event whole; a client
        // fixes the event and resends all, and dedupe makes that safe.
        return Err(Box::new(Problem::invalid_events(listed, refused, items.len())));
    }
    Ok(batch)
}
