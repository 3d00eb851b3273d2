//! Key names: every key of a tenant carries its hash tag `{ml:<tenant>}` (see the crate docs).

/// The prefix of every key of `tenant`; the scripts build their keys from it.
pub(crate) fn prefix(tenant: &str) -> String {
    format!("{{ml:{tenant}}}:")
}

pub(crate) fn key(tenant: &str, name: &str) -> String {
    format!("{}{name}", prefix(tenant))
}

/// A reservation's key part: its id before the first `.`, the metered event's idempotency key.
pub(crate) fn reservation(id: &str) -> &str {
    id.split_once('.').map_or(id, |(k, _)| k)
}

/// The cross-tenant per-source progress hash.
pub(crate) const PROGRESS: &str = "{ml}:progress";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_tag_and_reservation_key() {
        assert_eq!(key("acme", "plans"), "{ml:acme}:plans");
        assert_eq!(reservation("rsv_00.7b7d"), "rsv_00");
        assert_eq!(reservation("rsv_00"), "rsv_00");
    }
}
