//! What every Meterline HTTP server answers beside its API: health,
//! readiness, metrics and the JSON 404; and the shutdown signal.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;

use crate::error::ApiError;

/// Adds `/healthz`, `/readyz` (200 while `ready` says so, else 503 saying
/// `unready`), `/metrics` rendered from `metrics`, and the JSON 404 for
/// anything else.
pub fn with_operations<F, Fut>(api: Router, metrics: PrometheusHandle, ready: F, unready: &'static str) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let readyz = move || {
        let ready = ready.clone();
        async move {
            if ready().await {
                (StatusCode::OK, "ready").into_response()
            } else {
                ApiError::unavailable(unready).into_response()
            }
        }
    };
    api.route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .fallback(|| async { ApiError::not_found() })
}

/// Resolves on SIGINT or SIGTERM: the shutdown future the binaries pass to `serve`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
