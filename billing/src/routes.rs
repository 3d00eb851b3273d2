//! The billing HTTP routes, admin keys only: a customer's Stripe customer id
//! (`PUT`/`GET /v1/customers/{customer_id}/billing`) and the sync's status
//! per meter and customer (`GET /v1/billing/status`).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use meterline_http::{AdminKey, ApiError, HasKeys, PathId};
use meterline_schemas::tenants::KeyRing;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::config::{BillingConfig, valid_stripe_customer, valid_subject};
use crate::error::BillingError;
use crate::store::{BillingAdmin, StatusRow};

/// Every path these routes serve.
pub const PATHS: [&str; 2] = ["/v1/customers/{customer_id}/billing", "/v1/billing/status"];

/// The routes' state: the store, the keys, and the config's mappings.
#[derive(Debug)]
pub struct BillingApi<A> {
    store: A,
    keys: KeyRing,
    config: BillingConfig,
}

impl<A> BillingApi<A> {
    pub fn new(store: A, keys: KeyRing, config: BillingConfig) -> BillingApi<A> {
        BillingApi { store, keys, config }
    }
}

impl<A> HasKeys for BillingApi<A> {
    fn keys(&self) -> &KeyRing {
        &self.keys
    }
}

/// The routes over a billing store.
pub fn routes<A: BillingAdmin>(api: Arc<BillingApi<A>>) -> Router {
    Router::new().route(PATHS[0], get(get_mapping::<A>).put(put_mapping::<A>)).route(PATHS[1], get(status::<A>)).with_state(api)
}

type Shared<A> = State<Arc<BillingApi<A>>>;

/// `PUT /v1/customers/{customer_id}/billing`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingBody {
    pub stripe_customer_id: String,
}

/// A customer's Stripe customer id and where it is set (`api` or `config`).
#[derive(Debug, Serialize)]
pub struct MappingView {
    pub customer_id: String,
    pub stripe_customer_id: String,
    pub source: &'static str,
}

/// `GET /v1/billing/status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub meters: Vec<StatusRow>,
}

fn store_error(e: BillingError) -> ApiError {
    tracing::error!("billing store: {e}");
    ApiError::unavailable("the billing store is not answering")
}

fn check_subject(customer_id: &str) -> Result<(), ApiError> {
    if valid_subject(customer_id) { Ok(()) } else { Err(ApiError::bad_request("invalid_parameter", "must be 1 to 256 characters").with_field("customer_id")) }
}

async fn put_mapping<A: BillingAdmin>(State(api): Shared<A>, key: AdminKey, PathId(customer_id): PathId, body: axum::body::Bytes) -> Result<Json<MappingView>, ApiError> {
    check_subject(&customer_id)?;
    let body: MappingBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("invalid_body", format!("expected {{\"stripe_customer_id\": \"cus_...\"}}: {e}")).with_field("body"))?;
    if !valid_stripe_customer(&body.stripe_customer_id) {
        return Err(ApiError::bad_request("invalid_field", "must be a Stripe customer id: cus_ and letters or digits").with_field("stripe_customer_id"));
    }
    api.store.put_mapping(&key.tenant, &customer_id, &body.stripe_customer_id).await.map_err(store_error)?;
    Ok(Json(MappingView { customer_id, stripe_customer_id: body.stripe_customer_id, source: "api" }))
}

async fn get_mapping<A: BillingAdmin>(State(api): Shared<A>, key: AdminKey, PathId(customer_id): PathId) -> Result<Json<MappingView>, ApiError> {
    check_subject(&customer_id)?;
    if let Some(id) = api.store.mapping(&key.tenant, &customer_id).await.map_err(store_error)? {
        return Ok(Json(MappingView { customer_id, stripe_customer_id: id, source: "api" }));
    }
    match api.config.tenant(&key.tenant).and_then(|t| t.customers.get(&customer_id)) {
        Some(id) => Ok(Json(MappingView { stripe_customer_id: id.clone(), customer_id, source: "config" })),
        None => Err(ApiError::not_found_what(format!("customer `{customer_id}` has no Stripe customer")).with_field("customer_id")),
    }
}

async fn status<A: BillingAdmin>(State(api): Shared<A>, key: AdminKey) -> Result<Json<StatusView>, ApiError> {
    let meters = api.store.status(&key.tenant).await.map_err(store_error)?;
    Ok(Json(StatusView { meters }))
}
