//! RFC 7807 problem answers (`application/problem+json`), the error format of
//! OpenMeter's API, for the routes that stand in for it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meterline_http::ApiError;
use serde::Serialize;

/// The route these problems belong to (RFC 7807 `instance`).
pub const INSTANCE: &str = "/api/v1/events";

/// At most this many per-event errors are listed: enough to fix an
/// integration, bounded so a 10,000-event batch cannot make a huge answer.
pub const MAX_LISTED: usize = 100;

/// One problem: the standard members, then Meterline's extensions.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub instance: &'static str,
    /// The stable code, as in `{"error": {"code"}}` elsewhere.
    pub code: &'static str,
    /// The first refused event's index in the request, for an event problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The CloudEvent field (`subject`, `data.model`) or header at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every refused event's errors (up to [`MAX_LISTED`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemItem>,
    #[serde(skip)]
    retry_after_secs: Option<u32>,
}

/// One error of one refused event.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemItem {
    pub index: usize,
    pub field: Option<String>,
    pub code: &'static str,
    pub message: String,
}

impl Problem {
    /// A 400 for a batch with refused events; the first names the problem.
    pub fn invalid_events(items: Vec<ProblemItem>, refused: usize, total: usize) -> Problem {
        let first = items.first().cloned();
        let detail = match &first {
            Some(e) => format!(
                "{refused} of {total} events refused, so none was accepted; event {}: {}{}",
                e.index,
                e.field.as_deref().map_or(String::new(), |f| format!("{f}: ")),
                e.message
            ),
            None => format!("{refused} of {total} events refused, so none was accepted"),
        };
        Problem {
            kind: "about:blank",
            title: "Bad Request",
            status: StatusCode::BAD_REQUEST.as_u16(),
            detail,
            instance: INSTANCE,
            code: "invalid_event",
            index: first.as_ref().map(|e| e.index),
            field: first.and_then(|e| e.field),
            errors: items,
            retry_after_secs: None,
        }
    }
}

/// Every `ApiError` (auth, content type, size, overload, broker) keeps its
/// status, code and `Retry-After`, in the problem format.
impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Problem {
        Problem {
            kind: "about:blank",
            title: e.status.canonical_reason().unwrap_or("Error"),
            status: e.status.as_u16(),
            detail: e.message,
            instance: INSTANCE,
            code: e.code,
            index: None,
            field: e.field,
            errors: Vec::new(),
            retry_after_secs: e.retry_after_secs,
        }
    }
}

impl From<ApiError> for Box<Problem> {
    fn from(e: ApiError) -> Box<Problem> {
        Box::new(Problem::from(e))
    }
}

impl IntoResponse for Box<Problem> {
    fn into_response(self) -> Response {
        (*self).into_response()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.retry_after_secs;
        let mut response = (status, axum::Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = retry {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
