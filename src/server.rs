//! The all-in-one server: ingest's, the query API's and the limits' own
//! routes, auth and validation over the embedded store, on one listener,
//! with one `/metrics`.

use axum::Router;
use chrono::Utc;
use futures::future::BoxFuture;
use meterline_ingest::{EventLog, IngestError};
use meterline_limits::{Limits, LimitsError};
use meterline_query_api::QueryStore;
use meterline_schemas::tenants::KeyRing;
use meterline_schemas::wire::Envelope;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::query::EmbeddedQueries;
use crate::store::{Embedded, EmbeddedBilling, EmbeddedLimits};
use crate::EmbeddedError;

/// Ingest's event log, made durable by the embedded writer's group commit.
#[derive(Debug, Clone)]
pub struct EmbeddedLog(pub Arc<Embedded>);

impl EventLog for EmbeddedLog {
    fn append(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move { Ok(self.0.append(events).await?) })
    }

    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.0.writer_running()))
    }
}

/// A reservation commit's event takes the ingest path into the writer:
/// deduped, rolled up and counted against limits in one transaction.
impl meterline_limits::Meter for EmbeddedLog {
    fn meter(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.append(events).await.map_err(|e| e.to_string()) })
    }
}

/// The router over an open store: the whole API, health, readiness, metrics.
pub fn router(config: &Config, store: Arc<Embedded>) -> Result<Router, EmbeddedError> {
    // One process, one recorder, with every service's buckets; each crate's
    // handle then describes its metrics into it.
    let buckets: Vec<(&str, &[f64])> = meterline_ingest::metrics::BUCKETS.iter().chain(meterline_aggregator::metrics::BUCKETS).copied().collect();
    let handle = meterline_http::install_recorder(&buckets);
    let _ = meterline_ingest::metrics::handle();
    let _ = meterline_aggregator::metrics::handle();
    let _ = meterline_query_api::metrics::handle();
    crate::store::describe_writer_metrics();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog(store.clone()));
    let ingest = meterline_ingest::AppState::new(&config.tenants, config.events, &config.server, log)?.with_cloudevents(&config.cloudevents)?;
    let limits = Limits::new(
        EmbeddedLimits(store.clone()),
        Arc::new(EmbeddedLog(store.clone())),
        KeyRing::from_config(&config.tenants)?,
        config.events,
        config.limits.clone(),
        Arc::new(Utc::now),
    )
    .map_err(|e| match e {
        LimitsError::Config { key, message } => EmbeddedError::config(key, message),
        other => EmbeddedError::config("limits", other.to_string()),
    })?;
    let export = Arc::new(crate::export::EmbeddedExport(store.clone()));
    let billing = meterline_billing::BillingApi::new(EmbeddedBilling(store.clone()), KeyRing::from_config(&config.tenants)?, config.billing.clone());
    // The end-user portal reads limits and subscription cycles from the same store.
    let portal_limits = Arc::new(meterline_query_api::portal::StoreLimits(EmbeddedLimits(store.clone())));
    let queries = Arc::new(EmbeddedQueries::new(store, config.query.ranking_cache_groups));
    // The ranking cache's refresher, at the query API's default period; it ends with the router (it holds the store weakly).
    let defaults = meterline_query_api::ServerConfig::default();
    meterline_query_api::Refresher::spawn(&(queries.clone() as Arc<dyn QueryStore>), defaults.ranking_refresh(), defaults.ranking_refresh_idle()).detach();
    let query = meterline_query_api::AppState::new(&config.tenants, queries.clone(), config.query.max_range_days)?
        .with_export(export)
        .with_portal_limits(portal_limits)
        .with_retention(config.retention.clone());
    let ready = move || {
        let queries = queries.clone();
        async move { queries.ping().await }
    };
    // Each service's routes keep their own layers: the query API's request
    // metrics stay on its routes (by matched path), the limits' on none.
    let api = meterline_ingest::api_routes(Arc::new(ingest))
        .merge(meterline_query_api::api_routes(Arc::new(query)))
        .merge(meterline_limits::routes(Arc::new(limits)))
        .merge(meterline_billing::routes(Arc::new(billing)))
        // The admin dashboard at `/`: static files over the same public API.
        .merge(meterline_dashboard::routes());
    Ok(meterline_http::with_operations(api, handle, ready, "the embedded store is not answering"))
}

/// Opens the store in `data_dir` and serves until `shutdown`; then finishes
/// in-flight requests and the writer's last commit within the grace period.
pub async fn serve(config: Config, data_dir: &Path, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), EmbeddedError> {
    let (store, writer) = Embedded::open(data_dir, &config)?;
    let app = router(&config, Arc::new(store))?;
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    // The router (and with it every handle on the writer's queue) is gone:
    // the writer commits what it holds and stops.
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let joined = tokio::time::timeout(grace, tokio::task::spawn_blocking(move || writer.join())).await;
    if joined.is_err() {
        tracing::warn!("the embedded writer did not stop within the grace period");
    }
    Ok(())
}
