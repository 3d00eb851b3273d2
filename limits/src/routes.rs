//! The limits HTTP routes: plans and subscriptions (admin keys; plans also read with read keys), reservations (ingest keys), balances and who is nearest their caps (read keys).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use meterline_http::{AdminKey, ApiError, IngestKey, PathId, ReadKey};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Invalid;
use crate::plan::{PlanView, Scope, check_id, parse_plan};
use crate::service::Limits;
use crate::store::LimitStore;
use crate::subject::{Subject, Subscription, SubscriptionView};

/// Every path these routes serve, for the OpenAPI check and the request metrics.
pub const PATHS: [&str; 10] = [
    "/v1/plans",
    "/v1/plans/{plan_id}",
    "/v1/users/{user_id}/subscription",
    "/v1/customers/{customer_id}/subscription",
    "/v1/reservations",
    "/v1/reservations/{reservation_id}/commit",
    "/v1/reservations/{reservation_id}/release",
    "/v1/users/{user_id}/limits",
    "/v1/customers/{customer_id}/limits",
    "/v1/limits/nearest",
];

/// The paths [`read_routes`] serves (GET only on the plans').
pub const READ_PATHS: [&str; 5] = [PATHS[0], PATHS[1], PATHS[7], PATHS[8], PATHS[9]];

/// The routes over a limits service.
pub fn routes<S: LimitStore>(limits: Arc<Limits<S>>) -> Router {
    Router::new()
        .route(PATHS[0], get(list_plans::<S>))
        .route(PATHS[1], put(put_plan::<S>).get(get_plan::<S>).delete(delete_plan::<S>))
        .route(PATHS[2], put(put_user_sub::<S>).get(get_user_sub::<S>).delete(delete_user_sub::<S>))
        .route(PATHS[3], put(put_customer_sub::<S>).get(get_customer_sub::<S>).delete(delete_customer_sub::<S>))
        .route(PATHS[4], post(reserve::<S>))
        .route(PATHS[5], post(commit::<S>))
        .route(PATHS[6], post(release::<S>))
        .route(PATHS[7], get(user_limits::<S>))
        .route(PATHS[8], get(customer_limits::<S>))
        .route(PATHS[9], get(nearest::<S>))
        .with_state(limits)
}

/// The read-key routes alone (plans, balances, who is nearest their caps):
/// what a process that meters nothing serves (the query API over the
/// limits' Redis). Nothing here calls the service's meter.
pub fn read_routes<S: LimitStore>(limits: Arc<Limits<S>>) -> Router {
    Router::new()
        .route(READ_PATHS[0], get(list_plans::<S>))
        .route(READ_PATHS[1], get(get_plan::<S>))
        .route(READ_PATHS[2], get(user_limits::<S>))
        .route(READ_PATHS[3], get(customer_limits::<S>))
        .route(READ_PATHS[4], get(nearest::<S>))
        .with_state(limits)
}

type Shared<S> = State<Arc<Limits<S>>>;

fn text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| Invalid::new("body", "must be UTF-8 JSON").into())
}

/// `GET /v1/plans`.
#[derive(Debug, Serialize)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

/// A deletion's answer.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub deleted: bool,
}

// Plans are read with a read key too: they are not secret from the
// tenant's own dashboard (which signs in with one); changing them is admin.
async fn list_plans<S: LimitStore>(State(l): Shared<S>, key: ReadKey) -> Result<Json<PlanList>, ApiError> {
    let plans = l.admin("plans", l.store().plans(&key.tenant)).await?;
    Ok(Json(PlanList { plans }))
}

async fn put_plan<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(plan_id): PathId, body: Bytes) -> Result<Json<PlanView>, ApiError> {
    check_id("plan_id", &plan_id)?;
    let plan = parse_plan(text(&body)?)?;
    let view = plan.view(&plan_id);
    l.admin("put_plan", l.store().put_plan(&key.tenant, &view)).await?;
    Ok(Json(view))
}

fn no_plan(plan_id: &str) -> ApiError {
    ApiError::not_found_what(format!("no plan `{plan_id}`")).with_field("plan_id")
}

async fn get_plan<S: LimitStore>(State(l): Shared<S>, key: ReadKey, PathId(plan_id): PathId) -> Result<Json<PlanView>, ApiError> {
    check_id("plan_id", &plan_id)?;
    let plans = l.admin("plans", l.store().plans(&key.tenant)).await?;
    plans.into_iter().find(|p| p.plan_id == plan_id).map(Json).ok_or_else(|| no_plan(&plan_id))
}

async fn delete_plan<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(plan_id): PathId) -> Result<Json<Deleted>, ApiError> {
    check_id("plan_id", &plan_id)?;
    if l.admin("delete_plan", l.store().delete_plan(&key.tenant, &plan_id)).await? { Ok(Json(Deleted { deleted: true })) } else { Err(no_plan(&plan_id)) }
}

async fn put_sub<S: LimitStore>(l: &Limits<S>, tenant: &str, subject: Subject, body: &Bytes) -> Result<Json<SubscriptionView>, ApiError> {
    check_id(&format!("{}_id", subject.scope.name()), &subject.id)?;
    let sub = Subscription::parse(text(body)?)?;
    let plans = l.admin("plans", l.store().plans(tenant)).await?;
    if !plans.iter().any(|p| p.plan_id == sub.plan) {
        return Err(ApiError::bad_request("unknown_plan", format!("no plan `{}`; PUT /v1/plans/{} first", sub.plan, sub.plan)).with_field("plan"));
    }
    let view = sub.view();
    l.admin("put_subscription", l.store().put_subscription(tenant, &subject, &view)).await?;
    Ok(Json(view))
}

async fn get_sub<S: LimitStore>(l: &Limits<S>, tenant: &str, subject: Subject) -> Result<Json<SubscriptionView>, ApiError> {
    check_id(&format!("{}_id", subject.scope.name()), &subject.id)?;
    l.admin("subscription", l.store().subscription(tenant, &subject))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found_what(format!("{} `{}` has no subscription (the default plan applies)", subject.scope.name(), subject.id)))
}

async fn delete_sub<S: LimitStore>(l: &Limits<S>, tenant: &str, subject: Subject) -> Result<Json<Deleted>, ApiError> {
    check_id(&format!("{}_id", subject.scope.name()), &subject.id)?;
    if l.admin("delete_subscription", l.store().delete_subscription(tenant, &subject)).await? {
        Ok(Json(Deleted { deleted: true }))
    } else {
        Err(ApiError::not_found_what(format!("{} `{}` has no subscription", subject.scope.name(), subject.id)))
    }
}

async fn put_user_sub<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(id): PathId, body: Bytes) -> Result<Json<SubscriptionView>, ApiError> {
    put_sub(&l, &key.tenant, Subject::user(&id), &body).await
}
async fn get_user_sub<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(id): PathId) -> Result<Json<SubscriptionView>, ApiError> {
    get_sub(&l, &key.tenant, Subject::user(&id)).await
}
async fn delete_user_sub<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(id): PathId) -> Result<Json<Deleted>, ApiError> {
    delete_sub(&l, &key.tenant, Subject::user(&id)).await
}
async fn put_customer_sub<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(id): PathId, body: Bytes) -> Result<Json<SubscriptionView>, ApiError> {
    put_sub(&l, &key.tenant, Subject::customer(&id), &body).await
}
async fn get_customer_sub<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(id): PathId) -> Result<Json<SubscriptionView>, ApiError> {
    get_sub(&l, &key.tenant, Subject::customer(&id)).await
}
async fn delete_customer_sub<S: LimitStore>(State(l): Shared<S>, key: AdminKey, PathId(id): PathId) -> Result<Json<Deleted>, ApiError> {
    delete_sub(&l, &key.tenant, Subject::customer(&id)).await
}

async fn reserve<S: LimitStore>(State(l): Shared<S>, key: IngestKey, body: Bytes) -> Result<Response, ApiError> {
    let answer = l.reserve(&key.tenant, text(&body)?).await?;
    Ok((StatusCode::OK, Json(answer)).into_response())
}

async fn commit<S: LimitStore>(State(l): Shared<S>, key: IngestKey, PathId(id): PathId, body: Bytes) -> Result<Response, ApiError> {
    let answer = l.commit(&key.tenant, &id, text(&body)?).await?;
    Ok(Json(answer).into_response())
}

async fn release<S: LimitStore>(State(l): Shared<S>, key: IngestKey, PathId(id): PathId) -> Result<Response, ApiError> {
    let answer = l.release(&key.tenant, &id).await?;
    Ok(Json(answer).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserLimitsQuery {
    customer_id: Option<String>,
}

async fn user_limits<S: LimitStore>(
    State(l): Shared<S>,
    key: ReadKey,
    PathId(id): PathId,
    query: Result<Query<UserLimitsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()).with_field("customer_id"))?;
    let answer = l.subject_limits(&key.tenant, &Subject::user(&id), q.customer_id.as_deref()).await?;
    Ok(Json(answer).into_response())
}

async fn customer_limits<S: LimitStore>(State(l): Shared<S>, key: ReadKey, PathId(id): PathId) -> Result<Response, ApiError> {
    let answer = l.subject_limits(&key.tenant, &Subject { scope: Scope::Customer, id }, None).await?;
    Ok(Json(answer).into_response())
}

fn bad_parameter(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_parameter", message).with_field(field)
}

/// `GET /v1/limits/nearest?limit=&name=`. The query is read as raw pairs so
/// that an unknown parameter is refused by its own name.
async fn nearest<S: LimitStore>(State(l): Shared<S>, key: ReadKey, Query(raw): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    if let Some(unknown) = raw.keys().find(|k| !matches!(k.as_str(), "limit" | "name")) {
        return Err(bad_parameter(unknown, "unknown parameter; accepted: limit, name"));
    }
    let limit = match raw.get("limit") {
        None => crate::nearest::NEAREST_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::nearest::NEAREST_MAX).contains(n))
            .ok_or_else(|| bad_parameter("limit", format!("must be a whole number from 1 to {}", crate::nearest::NEAREST_MAX)))?,
    };
    let name = raw.get("name").map(String::as_str);
    if let Some(name) = name {
        check_id("name", name).map_err(|e| bad_parameter("name", e.message))?;
    }
    let answer = l.nearest(&key.tenant, name, limit).await?;
    Ok(Json(answer).into_response())
}
