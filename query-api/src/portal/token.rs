//! Portal tokens: short-lived, read-only bearer tokens bound to one end user
//! (or customer) of one tenant, signed with the tenant's `portal_secret`.
//!
//! Format: `<payload>.<signature>`, both unpadded base64url. The payload is
//! the JSON of [`Claims`] (`{"v":1,"kid":…,"tenant":…,"scope":…,"sub":…,
//! "exp":…}`); the signature is HMAC-SHA256 keyed by the secret over the
//! payload's base64url text exactly as sent, so nothing is re-encoded before
//! checking. Nothing is stored server side: a token is valid while its
//! signature verifies and `exp` is in the future, so rotating the secret
//! revokes every token at once. `kid` (a hash prefix of the secret) only
//! tells a revoked token from a forged one in the 401's message.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use meterline_limits::Scope;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The payload format's version; a token of another version is refused.
pub const VERSION: u8 = 1;

/// Longer than any token this server mints (ids are at most 256 bytes): a
/// bound on what is decoded and parsed before the signature is checked.
const MAX_TOKEN_BYTES: usize = 2_048;

/// What a token says, all of it signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub v: u8,
    /// Which secret signed it: see [`Secret::kid`].
    pub kid: String,
    pub tenant: String,
    pub scope: Scope,
    /// The user or customer id: the only subject the token reads.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// Why a presented token is refused. Every case is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a portal token (mint one with POST /v1/portal/tokens)")]
    Malformed,
    #[error("the token's tenant mints no portal tokens")]
    NotConfigured,
    #[error("the portal token's signature does not verify")]
    BadSignature,
    #[error("the portal token was revoked: its tenant's portal secret has changed")]
    Revoked,
    #[error("the portal token expired")]
    Expired,
}

/// A tenant's portal secret. Its `Debug` shows only the key id.
#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Secret {
    pub fn new(secret: &str) -> Secret {
        // A domain-separated hash, so the kid is not a prefix of a hash of
        // the secret that anything else might publish.
        let digest = Sha256::new().chain_update(b"meterline-portal-kid\0").chain_update(secret.as_bytes()).finalize();
        Secret { key: secret.as_bytes().to_vec(), kid: hex::encode(&digest[..4]) }
    }

    /// 8 hex digits naming this secret in the tokens it signs.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length: `new_from_slice` cannot fail here.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(payload.as_bytes());
        mac
    }

    /// The token for `claims`, signed with this secret.
    pub fn sign(&self, claims: &Claims) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(json);
        let signature = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{signature}")
    }
}

/// The claims of `token`, unverified: which tenant's secret to check it with.
pub fn read(token: &str) -> Result<(Claims, &str, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let (payload, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    if claims.v != VERSION {
        return Err(TokenError::Malformed);
    }
    Ok((claims, payload, signature))
}

/// Checks `token` with its tenant's secret (`secret_of(tenant)`) at `now`
/// (Unix seconds): the claims if it is genuine, current and unexpired.
pub fn verify<'a>(token: &str, now: i64, secret_of: impl FnOnce(&str) -> Option<&'a Secret>) -> Result<Claims, TokenError> {
    let (claims, payload, signature) = read(token)?;
    let secret = secret_of(&claims.tenant).ok_or(TokenError::NotConfigured)?;
    // Constant-time comparison inside `verify_slice`.
    if secret.mac(payload).verify_slice(&signature).is_err() {
        // Only a signature that fails says anything about the kid: a token
        // from an older secret is "revoked", anything else forged.
        return Err(if claims.kid != secret.kid { TokenError::Revoked } else { TokenError::BadSignature });
    }
    if now >= claims.exp {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(secret: &Secret, exp: i64) -> Claims {
        Claims { v: VERSION, kid: secret.kid().to_owned(), tenant: "acme".into(), scope: Scope::User, sub: "user-a".into(), exp }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let secret = Secret::new("s3cret-s3cret-s3cret");
        let token = secret.sign(&claims(&secret, 1_000));
        assert_eq!(verify(&token, 999, |t| (t == "acme").then_some(&secret)), Ok(claims(&secret, 1_000)));
        assert_eq!(verify(&token, 1_000, |_| Some(&secret)), Err(TokenError::Expired));
        assert_eq!(verify(&token, 0, |_| None), Err(TokenError::NotConfigured));
    }

    #[test]
    fn tampered_rotated_and_garbage_tokens_are_refused() {
        let secret = Secret::new("s3cret-s3cret-s3cret");
        let token = secret.sign(&claims(&secret, 1_000));
        // Another subject with the old signature.
        let mut other = claims(&secret, 1_000);
        other.sub = "user-b".into();
        let forged = format!("{}.{}", secret.sign(&other).split_once('.').map(|p| p.0).unwrap_or(""), token.split_once('.').map(|p| p.1).unwrap_or(""));
        assert_eq!(verify(&forged, 0, |_| Some(&secret)), Err(TokenError::BadSignature));
        let rotated = Secret::new("another-secret-entirely");
        assert_ne!(rotated.kid(), secret.kid());
        assert_eq!(verify(&token, 0, |_| Some(&rotated)), Err(TokenError::Revoked));
        for garbage in ["", "abc", "a.b", "acme-read-key", &format!("{token}x"), &"a".repeat(3_000)] {
            assert!(verify(garbage, 0, |_| Some(&secret)).is_err(), "{garbage}");
        }
        assert!(!format!("{secret:?}").contains("s3cret"));
    }
}
