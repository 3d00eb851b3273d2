//! A webhook receiver on port 0 for the alert tests: it answers every POST to
//! `/hook` with 200 and keeps each request's signature header and raw body.

use meterline_limits::notify::SIGNATURE_HEADER;
use std::sync::{Arc, Mutex};

/// One request as it arrived.
#[derive(Debug, Clone)]
struct Request {
    signature: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// The receiver: point a service's `webhook_url` at `url`.
#[derive(Debug)]
pub struct Webhooks {
    pub url: String,
    received: Arc<Mutex<Vec<Request>>>,
}

impl Webhooks {
    /// Starts it in this process; it serves until the test's runtime ends.
    pub async fn start() -> Webhooks {
        let received: Arc<Mutex<Vec<Request>>> = Arc::default();
        let sink = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let request = Request { signature: header(SIGNATURE_HEADER), content_type: header("content-type"), body: body.to_vec() };
                    sink.lock().expect("lock").push(request);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Webhooks { url, received }
    }

    /// Every request so far, in arrival order: its signature header (absent
    /// when unsigned) and its raw body, which is what a signature covers.
    pub fn requests(&self) -> Vec<(Option<String>, Vec<u8>)> {
        self.received.lock().expect("lock").iter().map(|r| (r.signature.clone(), r.body.clone())).collect()
    }

    /// Every body so far, in arrival order, as JSON. Panics on a request not
    /// sent as JSON: alert webhooks always are, and a receiver parsing JSON
    /// would reject it.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        let received = self.received.lock().expect("lock").clone();
        received
            .iter()
            .map(|r| {
                let json_type = r.content_type.as_deref().is_some_and(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
                assert!(json_type, "a webhook sent as {:?}, not application/json: {}", r.content_type, String::from_utf8_lossy(&r.body));
                serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("a webhook body that is not JSON ({e}): {}", String::from_utf8_lossy(&r.body)))
            })
            .collect()
    }
}
