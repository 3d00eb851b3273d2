//! What reconciliation reads from Redis: every counter of a tenant with its counted usage.

use meterline_limits::LimitsError;

use crate::client::RedisLimits;
use crate::keys::prefix;

/// Keys asked for per `SCAN` step and per `MGET`.
const BATCH: usize = 500;

/// `text` with Redis glob's special characters escaped, to match literally.
fn glob_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisLimits {
    /// Every counter of `tenant` (`{ml:<tenant>}:u:<counter>`) as `(counter,
    /// used)`, the counter without its prefix. `SCAN` walks the keyspace in
    /// steps, so this never blocks Redis; a counter created or expiring
    /// during the walk may be missed, and one that expired between the walk
    /// and the read is left out. On a cluster it reads the node the
    /// connection names, which holds the tenant's slot.
    pub async fn counters(&self, tenant: &str) -> Result<Vec<(String, i64)>, LimitsError> {
        let head = format!("{}u:", prefix(tenant));
        let pattern = format!("{}*", glob_literal(&head));
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) =
                self.query(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(BATCH)).await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key more than once.
        keys.sort();
        keys.dedup();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let values: Vec<Option<String>> = self.query(redis::cmd("MGET").arg(chunk)).await?;
            for (key, value) in chunk.iter().zip(values) {
                let Some(text) = value else { continue };
                let used = text.parse().map_err(|e| LimitsError::Corrupt { key: key.clone(), message: format!("not an integer: {e}") })?;
                out.push((key.strip_prefix(&head).unwrap_or(key).to_owned(), used));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_prefixes_match_literally() {
        assert_eq!(glob_literal("{ml:a*b}:u:"), "{ml:a\\*b}:u:");
        assert_eq!(glob_literal("{ml:acme}:u:"), "{ml:acme}:u:");
    }
}
