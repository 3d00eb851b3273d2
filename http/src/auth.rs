//! Who is asking: the bearer key checked against the tenants' keys, as an
//! extractor a handler takes as an argument ([`ReadKey`], [`IngestKey`], [`AdminKey`]).

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header;
use axum::http::request::Parts;
use meterline_schemas::tenants::{KeyRing, Principal, Scope};
use std::sync::Arc;

use crate::error::ApiError;

/// A server state that holds the tenants' keys.
pub trait HasKeys {
    fn keys(&self) -> &KeyRing;
}

impl<T: HasKeys> HasKeys for Arc<T> {
    fn keys(&self) -> &KeyRing {
        (**self).keys()
    }
}

/// The principal behind the request's bearer key, if it may use `scope`.
/// Shared by every HTTP service, so that all answer 401 and 403 alike.
pub fn authenticate<'a>(keys: &'a KeyRing, headers: &HeaderMap, scope: Scope) -> Result<&'a Principal, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthenticated("missing Authorization: Bearer <key>").with_field("Authorization"))?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::unauthenticated("Authorization must be Bearer <key>").with_field("Authorization"))?;
    let principal = keys.authenticate(key).ok_or_else(|| ApiError::unauthenticated("unknown API key").with_field("Authorization"))?;
    if !principal.allows(scope) {
        return Err(ApiError::forbidden(format!("this key lacks the {scope:?} scope").to_lowercase()));
    }
    Ok(principal)
}

macro_rules! key_extractor {
    ($name:ident, $scope:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name {
            /// The tenant the key belongs to.
            pub tenant: String,
        }

        impl<S: HasKeys + Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
                let principal = authenticate(state.keys(), &parts.headers, $scope)?;
                Ok($name { tenant: principal.tenant.clone() })
            }
        }
    };
}

key_extractor!(ReadKey, Scope::Read, "A request made with a key that has the read scope.");
key_extractor!(IngestKey, Scope::Ingest, "A request made with a key that has the ingest scope.");
key_extractor!(AdminKey, Scope::Admin, "A request made with a key that has the admin scope.");
