//! The limits' read routes (plans, balances, who is nearest their caps) served by the query API over the limits' store: the distributed dashboard signs in here with a read key, and its Limits view reads them.
//!
//! The routes are the limits crate's own ([`meterline_limits::read_routes`]),
//! so both deployments answer the same. They meter nothing: the service is
//! built with a meter that refuses, which no read route calls.

use axum::Router;
use chrono::Utc;
use futures::future::BoxFuture;
use meterline_limits::{Limits, LimitsConfig, LimitStore, Meter};
use meterline_schemas::TimeBounds;
use meterline_schemas::tenants::{KeyRing, TenantConfig};
use meterline_schemas::wire::Envelope;
use std::sync::Arc;

use crate::QueryError;

/// The query API reads limits and never meters: a meter that refuses, in
/// case a route that meters were ever served here by mistake.
#[derive(Debug)]
struct NoMeter;

impl Meter for NoMeter {
    fn meter(&self, _: Vec<Envelope>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(std::future::ready(Err("the query API meters nothing".to_owned())))
    }
}

/// The limits' read routes over `store` for `tenants`.
pub fn read_routes<S: LimitStore>(store: S, tenants: &[TenantConfig], config: LimitsConfig) -> Result<Router, QueryError> {
    let limits = Limits::new(store, Arc::new(NoMeter), KeyRing::from_config(tenants)?, TimeBounds::default(), config, Arc::new(Utc::now))
        .map_err(|e| QueryError::config("limits", e.to_string()))?;
    Ok(meterline_limits::read_routes(Arc::new(limits)))
}
