//! The portal's HTTP side: `POST /v1/portal/tokens` (admin key) mints,
//! `GET /v1/portal/usage` (portal token) reads, `OPTIONS /v1/portal/usage`
//! answers CORS preflights, `/widget.js` is the embeddable script.
//!
//! CORS is written here rather than by a layer because the allowed origins
//! are per tenant and the tenant is known only from the token: a preflight
//! (which carries no token) is allowed for an origin any tenant configured,
//! the read itself only for its token's tenant's origins. Other origins get
//! no CORS headers at all, so browsers keep the answer from their pages.

use axum::Json;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use meterline_domain::{Granularity, SumRow, TimeColumn};
use meterline_http::{AdminKey, ApiError, HasKeys};
use meterline_limits::{LimitStatus, Period, Scope, Subject, window};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use super::token::{Claims, TokenError, VERSION};
use crate::answers::{Range, Row};
use crate::server::AppState;
use crate::store::SumsQuery;

type Shared = Arc<AppState>;

/// Token lifetimes, seconds: the default, and the most an admin may ask for
/// (a leaked token reads one subject's usage until then).
const DEFAULT_TTL_SECS: i64 = 3_600;
const MAX_TTL_SECS: i64 = 86_400;
/// The most bytes of a subject id, as the query filters take.
const MAX_ID_BYTES: usize = 256;

/// `POST /v1/portal/tokens`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    ttl_secs: Option<i64>,
}

/// `POST /v1/portal/tokens`'s answer.
#[derive(Debug, Serialize)]
pub struct MintAnswer {
    pub token: String,
    pub expires_at: String,
    pub scope: Scope,
    pub subject_id: String,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_field", message).with_field(field)
}

fn subject_of(request: &MintRequest) -> Result<Subject, ApiError> {
    let subject = match (&request.user_id, &request.customer_id) {
        (Some(user), None) => Subject::user(user),
        (None, Some(customer)) => Subject::customer(customer),
        _ => return Err(invalid("user_id", "give exactly one of user_id and customer_id: the one subject the token reads")),
    };
    if subject.id.is_empty() || subject.id.len() > MAX_ID_BYTES || subject.id.chars().any(char::is_control) {
        return Err(invalid(&format!("{}_id", subject.scope.name()), format!("must be 1 to {MAX_ID_BYTES} bytes without control characters")));
    }
    Ok(subject)
}

/// `POST /v1/portal/tokens`: a token reading one subject of the key's tenant.
pub async fn mint(State(state): State<Shared>, AdminKey { tenant }: AdminKey, body: String) -> Response {
    let answer = || {
        let request: MintRequest = serde_json::from_str(&body)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("the body is not a portal token request: {e}")).with_field("body"))?;
        let subject = subject_of(&request)?;
        let ttl = request.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
        if !(1..=MAX_TTL_SECS).contains(&ttl) {
            return Err(invalid("ttl_secs", format!("must be 1 to {MAX_TTL_SECS} seconds")));
        }
        let secret = state.portal().secret(&tenant).ok_or_else(|| {
            ApiError::conflict("portals are not configured for this tenant: set portal_secret in its [[tenants]] entry").with_field("portal_secret")
        })?;
        let expires = Utc::now() + chrono::Duration::seconds(ttl);
        let claims = Claims { v: VERSION, kid: secret.kid().to_owned(), tenant, scope: subject.scope, sub: subject.id.clone(), exp: expires.timestamp() };
        let token = secret.sign(&claims);
        let expires_at = DateTime::from_timestamp(claims.exp, 0).map_or_else(|| rfc3339(expires), rfc3339);
        Ok::<_, ApiError>(Json(MintAnswer { token, expires_at, scope: subject.scope, subject_id: subject.id }).into_response())
    };
    answer().unwrap_or_else(IntoResponse::into_response)
}

fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// `response` with `Access-Control-Allow-Origin: origin` when `allowed`, and
/// `Vary: Origin` always (a cache must not hand one origin's answer to another).
fn with_cors(mut response: Response, origin: Option<&str>, allowed: bool) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(value) = origin.filter(|_| allowed).and_then(|o| HeaderValue::from_str(o).ok()) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    response
}

/// A request carrying a valid portal token: its claims. Refuses API keys
/// (a leaked read key must not look like a portal session) and every
/// token that is malformed, forged, revoked or expired, with a 401.
#[derive(Debug, Clone)]
pub struct PortalBearer(pub Claims);

/// A refused portal request: the error, with CORS for an origin some tenant
/// configured so the page's script can read why (the widget shows it as
/// "unavailable").
#[derive(Debug)]
pub struct PortalRefusal {
    error: ApiError,
    origin: Option<String>,
    allowed: bool,
}

impl IntoResponse for PortalRefusal {
    fn into_response(self) -> Response {
        with_cors(self.error.into_response(), self.origin.as_deref(), self.allowed)
    }
}

impl FromRequestParts<Shared> for PortalBearer {
    type Rejection = PortalRefusal;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Self::Rejection> {
        let origin = origin(&parts.headers).map(str::to_owned);
        let allowed = origin.as_deref().is_some_and(|o| state.portal().known_origin(o));
        let refuse = |message: String| PortalRefusal { error: ApiError::unauthenticated(message).with_field("Authorization"), origin: origin.clone(), allowed };
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| refuse("missing Authorization: Bearer <portal token>".into()))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse("Authorization must be Bearer <portal token>".into()))?;
        if state.keys().authenticate(token).is_some() {
            return Err(refuse("API keys are not accepted here: mint a portal token with POST /v1/portal/tokens".into()));
        }
        let claims = super::token::verify(token, Utc::now().timestamp(), |tenant| state.portal().secret(tenant))
            .map_err(|e: TokenError| refuse(e.to_string()))?;
        Ok(PortalBearer(claims))
    }
}

/// The period the usage covers.
#[derive(Debug, Serialize)]
pub struct PortalPeriod {
    /// `cycle` when the subject's subscription anchors one, else `month`
    /// (the UTC calendar month).
    pub kind: &'static str,
    pub start: String,
    /// When the period ends and the next begins.
    pub resets_at: String,
}

/// `GET /v1/portal/usage`'s answer.
#[derive(Debug, Serialize)]
pub struct PortalUsageAnswer<'a> {
    pub scope: Scope,
    pub subject_id: &'a str,
    pub period: PortalPeriod,
    pub range: Range,
    pub totals: Row<'a>,
    pub daily: Vec<Row<'a>>,
    /// The plan the subject is on; null when this deployment reads no limits.
    pub plan: Option<String>,
    pub limits: Vec<LimitStatus>,
    /// When the token that read this expires.
    pub token_expires_at: String,
}

/// `GET /v1/portal/usage`: the token's subject's usage this period, by day,
/// and its limits.
pub async fn usage(State(state): State<Shared>, headers: HeaderMap, PortalBearer(claims): PortalBearer, Query(raw): Query<HashMap<String, String>>) -> Response {
    let origin = origin(&headers);
    let allowed = origin.is_some_and(|o| state.portal().allows(&claims.tenant, o));
    let answer = async {
        // The token names the subject and the period follows from it: a
        // parameter could only be an attempt to read something else.
        if let Some(name) = raw.keys().min() {
            return Err(ApiError::bad_request("invalid_parameter", "the portal reads its token's subject and period; it takes no parameters").with_field(name));
        }
        let now = Utc::now();
        let subject = Subject { scope: claims.scope, id: claims.sub.clone() };
        let view = match state.portal().limits() {
            Some(source) => Some(source.subject(&claims.tenant, &subject, now).await.map_err(|e| {
                tracing::warn!(error = %e, "portal: limits store failed; answering 503");
                ApiError::unavailable("the limits store is not reachable; retry")
            })?),
            None => None,
        };
        let anchor = view.as_ref().and_then(|v| v.anchor);
        let (start, end) = window(Period::Cycle, anchor, now);
        let column = match subject.scope {
            Scope::User => "user_id",
            Scope::Customer => "customer_id",
        };
        let scope = meterline_sql::Scope {
            tenant: claims.tenant.clone(),
            time_column: TimeColumn::WindowStart,
            from: start,
            to: end,
            filters: vec![(column, meterline_sql::s(subject.id.as_str()))],
        };
        let store = state.query_store();
        let (whole, by_day) = (SumsQuery::totals(&[], 1), SumsQuery { granularity: Granularity::Day, ..SumsQuery::totals(&[], 10_000) });
        let (totals, daily) = tokio::try_join!(store.sums(&scope, &whole), store.sums(&scope, &by_day))
        .map_err(crate::server::unavailable)?;
        let none = SumRow::default();
        let (plan, limits) = view.map_or((None, Vec::new()), |v| (Some(v.plan), v.limits));
        let answer = PortalUsageAnswer {
            scope: subject.scope,
            subject_id: &claims.sub,
            period: PortalPeriod { kind: if anchor.is_some() { "cycle" } else { "month" }, start: rfc3339(start), resets_at: rfc3339(end) },
            range: Range::of(&scope),
            totals: Row::of(totals.first().unwrap_or(&none), &[], false),
            daily: daily.iter().filter(|r| r.s_events > 0).map(|r| Row::of(r, &[], true)).collect(),
            plan,
            limits,
            token_expires_at: DateTime::from_timestamp(claims.exp, 0).map(rfc3339).unwrap_or_default(),
        };
        let mut response = Json(answer).into_response();
        // One end user's usage, read with a bearer token: never cached.
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok::<_, ApiError>(response)
    };
    with_cors(answer.await.unwrap_or_else(IntoResponse::into_response), origin, allowed)
}

/// `OPTIONS /v1/portal/usage`: the CORS preflight. A preflight carries no
/// token, so it is allowed for an origin any tenant configured; the read
/// that follows is allowed only for its token's tenant's origins.
pub async fn preflight(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let origin = origin(&headers);
    let allowed = origin.is_some_and(|o| state.portal().known_origin(o));
    let mut response = StatusCode::NO_CONTENT.into_response();
    if allowed {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Authorization"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    with_cors(response, origin, allowed)
}

/// `GET /widget.js`: the embeddable usage bar (`portal/widget.js`).
pub async fn widget() -> Response {
    let headers = [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=300")];
    (headers, super::WIDGET_JS).into_response()
}
