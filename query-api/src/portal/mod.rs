//! The end-user usage view: portal tokens minted with an admin key
//! (`POST /v1/portal/tokens`), the one read they allow
//! (`GET /v1/portal/usage`: this period's usage by day and the subject's
//! limits), its CORS, and the embeddable `/widget.js`.
//!
//! A portal token is not an API key: only [`routes::PortalBearer`] accepts
//! it, and it accepts nothing else. Its tenant and subject come from the
//! signed token alone, so no parameter can widen what it reads.

mod limits;
pub(crate) mod routes;
pub mod token;

use meterline_schemas::tenants::TenantConfig;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::QueryError;
pub use limits::{LimitSource, StoreLimits, SubjectView};
use token::Secret;

/// The widget, compiled in: served at `/widget.js`, no CDN.
pub const WIDGET_JS: &str = include_str!("widget.js");

/// Shorter secrets are refused at startup: a portal secret is what stands
/// between an end user and every other end user's usage.
const MIN_SECRET_BYTES: usize = 16;

/// One tenant's portal settings.
#[derive(Debug, Default)]
struct TenantPortal {
    secret: Option<Secret>,
    origins: BTreeSet<String>,
}

/// Every tenant's portal settings, and where limits are read.
#[derive(Debug, Default)]
pub struct Portal {
    tenants: HashMap<String, TenantPortal>,
    /// Every tenant's origins: a preflight carries no token, so it can only
    /// be answered for an origin some tenant configured.
    any_origin: BTreeSet<String>,
    limits: Option<Arc<dyn LimitSource>>,
}

impl Portal {
    /// Validates `portal_secret` and `portal_origins` of every tenant;
    /// errors name the key.
    pub fn from_config(tenants: &[TenantConfig]) -> Result<Portal, QueryError> {
        let mut portal = Portal::default();
        for (t, tenant) in tenants.iter().enumerate() {
            let secret = match &tenant.portal_secret {
                Some(s) if s.len() < MIN_SECRET_BYTES => {
                    return Err(QueryError::config(format!("tenants[{t}].portal_secret"), format!("must be at least {MIN_SECRET_BYTES} bytes")));
                }
                Some(s) => Some(Secret::new(s)),
                None => None,
            };
            let mut origins = BTreeSet::new();
            for (o, origin) in tenant.portal_origins.iter().enumerate() {
                if !valid_origin(origin) {
                    return Err(QueryError::config(
                        format!("tenants[{t}].portal_origins[{o}]"),
                        format!("{origin:?} must be a scheme and host (and port), e.g. https://app.example.com, without a path or trailing slash"),
                    ));
                }
                origins.insert(origin.clone());
                portal.any_origin.insert(origin.clone());
            }
            portal.tenants.insert(tenant.id.clone(), TenantPortal { secret, origins });
        }
        Ok(portal)
    }

    /// The portal reading limits (and subscription cycles) from `source`.
    pub fn with_limits(self, source: Arc<dyn LimitSource>) -> Portal {
        Portal { limits: Some(source), ..self }
    }

    pub(crate) fn secret(&self, tenant: &str) -> Option<&Secret> {
        self.tenants.get(tenant).and_then(|t| t.secret.as_ref())
    }

    /// True if `tenant`'s pages may read its portal answers from `origin`.
    pub(crate) fn allows(&self, tenant: &str, origin: &str) -> bool {
        self.tenants.get(tenant).is_some_and(|t| t.origins.contains(origin))
    }

    /// True if any tenant configured `origin`.
    pub(crate) fn known_origin(&self, origin: &str) -> bool {
        self.any_origin.contains(origin)
    }

    pub(crate) fn limits(&self) -> Option<&Arc<dyn LimitSource>> {
        self.limits.as_ref()
    }
}

/// `scheme://host[:port]` exactly as a browser sends it in `Origin`: the
/// comparison is byte for byte, so anything else could never match.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(secret: Option<&str>, origins: &[&str]) -> TenantConfig {
        TenantConfig {
            id: "acme".into(),
            keys: Vec::new(),
            credit_price_usd: None,
            prices: Default::default(),
            webhook_secret: None,
            portal_secret: secret.map(str::to_owned),
            portal_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
        }
    }

    #[test]
    fn secrets_and_origins_are_validated_naming_the_key() {
        let portal = Portal::from_config(&[tenant(Some("0123456789abcdef"), &["https://app.example.com", "http://localhost:3000"])]).expect("valid");
        assert!(portal.secret("acme").is_some() && portal.secret("globex").is_none());
        assert!(portal.allows("acme", "http://localhost:3000") && !portal.allows("acme", "https://evil.example.com"));
        assert!(portal.known_origin("https://app.example.com") && !portal.allows("globex", "https://app.example.com"));
        let err = Portal::from_config(&[tenant(Some("short"), &[])]).expect_err("short secret");
        assert!(err.to_string().contains("tenants[0].portal_secret"), "{err}");
        for bad in ["*", "https://app.example.com/", "app.example.com", "https://App.example.com", "ftp://x", "https://"] {
            let err = Portal::from_config(&[tenant(None, &[bad])]).expect_err(bad);
            assert!(err.to_string().contains("tenants[0].portal_origins[0]"), "{err}");
        }
    }
}
