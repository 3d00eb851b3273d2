//! A route's one path id as an extractor whose refusal is the error body
//! naming the path parameter, not axum's plain-text 400.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::extract::path::ErrorKind;
use axum::http::request::Parts;

use crate::error::ApiError;

/// The one path parameter of a route (`/v1/users/{user_id}/usage`),
/// percent-decoded; an id that does not decode to UTF-8 (`%FF`) is a 400
/// naming the parameter.
#[derive(Debug, Clone)]
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let field = match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } | ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => Some(key.clone()),
                    _ => None,
                };
                let error = ApiError::bad_request("invalid_parameter", "must be percent-encoded UTF-8");
                Err(match field {
                    Some(key) => error.with_field(&key),
                    None => error,
                })
            }
            Err(_) => Err(ApiError::internal()),
        }
    }
}
