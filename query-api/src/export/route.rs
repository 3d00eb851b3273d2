//! `GET /v1/billing/export`: an admin key's tenant's billing export, as JSON or CSV.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use meterline_http::{AdminKey, ApiError};
use meterline_limits::{LimitMeasure, Scope as SubjectScope};
use std::collections::HashMap;
use std::sync::Arc;

use super::{ExportAnswer, ExportRequest, csv, export as run, parse_measures};
use crate::server::AppState;

/// The parameters the route takes; any other is refused (a typo, or a filter
/// the export does not apply, must not pass unnoticed).
const ACCEPTED: &[&str] = &["from", "to", "by", "measures", "format"];

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_parameter", message).with_field(param)
}

/// The request a query string asks for, or the 400 naming its parameter.
fn request(tenant: String, raw: &HashMap<String, String>, max_days: i64) -> Result<(ExportRequest, bool), ApiError> {
    if let Some(unknown) = raw.keys().find(|k| !ACCEPTED.contains(&k.as_str())) {
        return Err(bad(unknown, format!("unknown parameter; accepted: {}", ACCEPTED.join(", "))));
    }
    let p = crate::Params::new(raw, ACCEPTED)?;
    let from = p.time("from")?.ok_or_else(|| bad("from", "required: the export's start (RFC 3339, inclusive)"))?;
    let to = p.time("to")?.ok_or_else(|| bad("to", "required: the export's end (RFC 3339, exclusive)"))?;
    if to <= from {
        return Err(bad("to", "must be after from"));
    }
    if (to - from).num_seconds() > max_days * 86_400 {
        return Err(bad("to", format!("the range may span at most {max_days} days")));
    }
    let by = match p.choice("by", &["customer", "user"], "customer")? {
        "user" => SubjectScope::User,
        _ => SubjectScope::Customer,
    };
    let measures = match p.get("measures") {
        None => LimitMeasure::ALL.to_vec(),
        Some(text) => parse_measures(text).map_err(|e| bad("measures", e))?,
    };
    let as_csv = p.choice("format", &["json", "csv"], "json")? == "csv";
    Ok((ExportRequest { tenant, from, to, by, measures }, as_csv))
}

pub(crate) async fn export(State(state): State<Arc<AppState>>, AdminKey { tenant }: AdminKey, Query(raw): Query<HashMap<String, String>>) -> Response {
    let answer = async {
        let (req, as_csv) = request(tenant, &raw, state.max_days())?;
        // Billing sums raw events: an export from before they are kept would under-count.
        state.kept(&[(meterline_domain::Kept::Events, req.from.timestamp())], req.from)?;
        let Some(source) = state.export_source() else {
            return Err(ApiError::unavailable("this server has no billing export configured"));
        };
        let billed = run(source.as_ref(), &req).await.map_err(crate::server::unavailable)?;
        if as_csv {
            return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv(&req, &billed)).into_response());
        }
        Ok(Json(ExportAnswer::of(&req, &billed)).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}
