//! The admin dashboard: an HTML shell, a few plain JavaScript modules, one
//! stylesheet and the vendored uPlot, compiled into the binary and served at
//! `/` by every server that mounts [`routes`] (the all-in-one binary and the
//! query API). It holds no data and no key: the page calls the public API
//! with the read key the user signs in with.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One compiled-in file: the path it is served at, its content type, its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file the dashboard serves; `/` is the shell.
pub const ASSETS: &[Asset] = &[
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_bytes!("../index.html") },
    Asset { path: "/dashboard/dashboard.css", content_type: CSS, body: include_bytes!("../dashboard.css") },
    Asset { path: "/dashboard/js/app.js", content_type: JS, body: include_bytes!("../js/app.js") },
    Asset { path: "/dashboard/js/api.js", content_type: JS, body: include_bytes!("../js/api.js") },
    Asset { path: "/dashboard/js/format.js", content_type: JS, body: include_bytes!("../js/format.js") },
    Asset { path: "/dashboard/js/chart.js", content_type: JS, body: include_bytes!("../js/chart.js") },
    Asset { path: "/dashboard/js/views.js", content_type: JS, body: include_bytes!("../js/views.js") },
    Asset { path: "/dashboard/vendor/uPlot.iife.min.js", content_type: JS, body: include_bytes!("../vendor/uPlot.iife.min.js") },
    Asset { path: "/dashboard/vendor/uPlot.min.css", content_type: CSS, body: include_bytes!("../vendor/uPlot.min.css") },
];

/// The page may load only its own files and call only its own origin: a
/// read key typed into it cannot be sent anywhere else. uPlot sizes its
/// elements with inline styles, hence `style-src 'unsafe-inline'`.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn serve(asset: Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, asset.content_type),
            // The files change with the binary; revalidating is cheap and an
            // upgraded server never runs a stale module beside a new one.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        asset.body,
    )
        .into_response()
}

/// The dashboard's routes, stateless, to merge into a server's router.
pub fn routes() -> Router {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        let asset = *asset;
        router.route(asset.path, get(move || std::future::ready(serve(asset))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_asset_is_served_with_its_type() {
        for asset in ASSETS {
            let response = routes().oneshot(Request::get(asset.path).body(Body::empty()).expect("request")).await.expect("answer");
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.path);
            assert_eq!(response.headers()[header::CONTENT_TYPE], asset.content_type, "{}", asset.path);
            assert!(response.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        }
    }

    /// Every file the shell and the modules name is one the server has, and
    /// nothing is fetched from elsewhere (no CDN).
    #[test]
    fn references_resolve_to_compiled_in_files() {
        let text = |a: &Asset| String::from_utf8_lossy(a.body).into_owned();
        for asset in ASSETS.iter().filter(|a| a.path == "/" || a.path.ends_with("/app.js") || a.path.ends_with("views.js")) {
            let body = text(asset);
            assert!(!body.contains("http://") && !body.contains("https://"), "{} names another origin", asset.path);
            for reference in body.split(['"', '\'']).filter(|s| s.starts_with("/dashboard/") || (s.starts_with("./") && s.ends_with(".js"))) {
                let path = reference.strip_prefix("./").map_or_else(|| reference.to_owned(), |rest| format!("/dashboard/js/{rest}"));
                assert!(ASSETS.iter().any(|a| a.path == path), "{} names {reference}, which is not served", asset.path);
            }
        }
    }
}
