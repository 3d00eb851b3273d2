//! Tenants and their API keys: configuration format and authentication.
//!
//! Only SHA-256 hashes of keys are configured, so a leaked config file does not
//! leak keys. A presented key is hashed and compared against every configured
//! hash in constant time, without stopping at the first match, so response
//! timing says nothing about which hashes exist. The tenant always comes from
//! the key, never from a request body.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use subtle::ConstantTimeEq;

use crate::SchemaError;
use crate::money::Nanos;
use crate::prices::{ModelPrice, PriceText};

/// What a key may do. `admin` may do everything its tenant can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

/// One API key as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A label for logs and audits (never the key itself).
    pub name: String,
    /// Lowercase hex SHA-256 of the key; see [`hash_key`].
    pub sha256: String,
    pub scopes: Vec<Scope>,
}

/// One tenant as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Lowercase letters, digits, `_` and `-`, at most 64 bytes.
    pub id: String,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// USD value of one credit, for events that report revenue in `credits`.
    #[serde(default)]
    pub credit_price_usd: Option<String>,
    /// Prices that replace or add to the catalog for this tenant, by model name.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceText>,
    /// The key the alert webhook's `Meterline-Signature` header is an
    /// HMAC-SHA256 with, for this tenant's alerts; without one they are sent
    /// unsigned. (Env overrides address sections, not `[[tenants]]` entries:
    /// it is set in the file.)
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// The key end-user portal tokens (`POST /v1/portal/tokens`) are signed
    /// with (HMAC-SHA256); without one the tenant mints none. Changing it
    /// revokes every token signed before.
    #[serde(default)]
    pub portal_secret: Option<String>,
    /// Browser origins (`https://app.example.com`) whose pages may read
    /// `/v1/portal/usage` with a portal token (CORS).
    #[serde(default)]
    pub portal_origins: Vec<String>,
}

/// A tenant after validation: prices parsed.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub credit_price: Option<Nanos>,
    pub prices: BTreeMap<String, ModelPrice>,
}

/// Who a presented key belongs to and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    pub key_name: String,
    scopes: Vec<Scope>,
}

impl Principal {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// The lowercase hex SHA-256 of a key, as written in the config.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// All tenants' keys, ready to authenticate requests.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    entries: Vec<([u8; 32], Principal)>,
    tenants: BTreeMap<String, Tenant>,
}

impl KeyRing {
    /// Validates the tenants section; errors name the offending key path.
    pub fn from_config(tenants: &[TenantConfig]) -> Result<KeyRing, SchemaError> {
        let mut ring = KeyRing::default();
        let mut seen_hashes = HashSet::new();
        for (t, tenant) in tenants.iter().enumerate() {
            let at = format!("tenants[{t}]");
            if !valid_tenant_id(&tenant.id) {
                return Err(SchemaError::config(
                    format!("{at}.id"),
                    format!("{:?} must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit", tenant.id),
                ));
            }
            if ring.tenants.contains_key(&tenant.id) {
                return Err(SchemaError::config(format!("{at}.id"), format!("tenant {:?} is configured twice", tenant.id)));
            }
            for (k, key) in tenant.keys.iter().enumerate() {
                let kat = format!("{at}.keys[{k}]");
                let hash: [u8; 32] = hex::decode(&key.sha256)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| SchemaError::config(format!("{kat}.sha256"), "must be 64 hex digits (the SHA-256 of the key)"))?;
                if key.scopes.is_empty() {
                    return Err(SchemaError::config(format!("{kat}.scopes"), "must name at least one of ingest, read, admin"));
                }
                if !seen_hashes.insert(hash) {
                    return Err(SchemaError::config(format!("{kat}.sha256"), "the same key is configured twice"));
                }
                ring.entries.push((
                    hash,
                    Principal { tenant: tenant.id.clone(), key_name: key.name.clone(), scopes: key.scopes.clone() },
                ));
            }
            let credit_price = match &tenant.credit_price_usd {
                Some(text) => Some(
                    Nanos::parse_non_negative(text)
                        .map_err(|e| SchemaError::config(format!("{at}.credit_price_usd"), format!("{text:?} {e}")))?,
                ),
                None => None,
            };
            let prices = tenant
                .prices
                .iter()
                .map(|(model, text)| Ok((model.clone(), ModelPrice::from_text(text, &format!("{at}.prices.{model}"))?)))
                .collect::<Result<_, SchemaError>>()?;
            ring.tenants.insert(tenant.id.clone(), Tenant { id: tenant.id.clone(), credit_price, prices });
        }
        Ok(ring)
    }

    /// The principal owning `presented`, if any.
    pub fn authenticate(&self, presented: &str) -> Option<&Principal> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (hash, principal) in &self.entries {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(principal);
            }
        }
        found
    }

    pub fn tenant(&self, id: &str) -> Option<&Tenant> {
        self.tenants.get(id)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }
}

fn valid_tenant_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, key: &str, scopes: Vec<Scope>) -> TenantConfig {
        TenantConfig {
            id: id.into(),
            keys: vec![KeyConfig { name: format!("{id}-key"), sha256: hash_key(key), scopes }],
            credit_price_usd: Some("0.001".into()),
            prices: BTreeMap::new(),
            webhook_secret: None,
            portal_secret: None,
            portal_origins: Vec::new(),
        }
    }

    #[test]
    fn keys_map_to_their_tenant_and_scopes() {
        let ring = KeyRing::from_config(&[tenant("a", "key-a", vec![Scope::Ingest]), tenant("b", "key-b", vec![Scope::Admin])])
            .unwrap();
        let a = ring.authenticate("key-a").unwrap();
        assert_eq!(a.tenant, "a");
        assert!(a.allows(Scope::Ingest) && !a.allows(Scope::Read));
        let b = ring.authenticate("key-b").unwrap();
        assert!(b.allows(Scope::Read) && b.allows(Scope::Ingest));
        assert!(ring.authenticate("key-c").is_none());
        assert_eq!(ring.tenant("a").unwrap().credit_price, Some(Nanos(1_000_000)));
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = KeyRing::from_config(&[tenant("Bad/Id", "k", vec![Scope::Read])]).unwrap_err();
        assert!(err.to_string().contains("tenants[0].id"), "{err}");
        let mut t = tenant("a", "k", vec![Scope::Read]);
        t.keys[0].sha256 = "abc".into();
        assert!(KeyRing::from_config(&[t]).unwrap_err().to_string().contains("tenants[0].keys[0].sha256"));
        let err = KeyRing::from_config(&[tenant("a", "same", vec![Scope::Read]), tenant("b", "same", vec![Scope::Read])]);
        assert!(err.unwrap_err().to_string().contains("tenants[1].keys[0].sha256"));
        let mut t = tenant("a", "k", vec![Scope::Read]);
        t.credit_price_usd = Some("-1".into());
        assert!(KeyRing::from_config(&[t]).unwrap_err().to_string().contains("tenants[0].credit_price_usd"));
    }
}
