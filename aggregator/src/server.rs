//! Runs the aggregator: connects and migrates ClickHouse (retrying while it is
//! down), serves `/healthz`, `/readyz`, `/metrics`, and runs the pipeline.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::consumer::Runner;
use meterline_clickhouse::{self as store, Store};
use crate::{AggregatorError, metrics};

/// Runs until `shutdown`, then drains within the grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AggregatorError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (store_tx, store_rx) = watch::channel::<Option<Store>>(None);
    let app = router(store_rx);
    let http = tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx.clone())).into_future());

    let Some(store) = connect(&config, stop_rx.clone()).await else {
        let _ = http.await;
        return Ok(());
    };
    let _ = store_tx.send(Some(store.clone()));
    let retention = tokio::spawn(crate::retention::run(store.clone(), config.retention.clone(), stopped(stop_rx.clone())));
    let runner = Runner::new(config, store).await?;
    let result = runner.run(stopped(stop_rx)).await;
    let _ = retention.await;
    let _ = http.await;
    result
}

/// Connects and migrates, retrying with backoff until it works or shutdown.
async fn connect(config: &Config, mut stop: watch::Receiver<bool>) -> Option<Store> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let store = store::connect(&config.clickhouse).await?;
            store.migrate().await?;
            Ok::<_, AggregatorError>(store)
        };
        match attempt.await {
            Ok(store) => {
                tracing::info!(version = %store.server_version, "ClickHouse connected and migrated");
                return Some(store);
            }
            Err(e) => tracing::warn!(error = %e, "ClickHouse not ready; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn router(store: watch::Receiver<Option<Store>>) -> Router {
    let handle = metrics::handle();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let store = store.borrow().clone();
                async move {
                    match store {
                        Some(s) if s.ping().await => (StatusCode::OK, "ready").into_response(),
                        _ => (StatusCode::SERVICE_UNAVAILABLE, "ClickHouse is not reachable").into_response(),
                    }
                }
            }),
        )
        .route("/metrics", get(move || std::future::ready(handle.render())))
}
