//! Every subscription of a tenant in one read: what the billing export needs to cut each subject's usage at its cycle boundaries.

use meterline_limits::{LimitsError, SubscriptionView};
use std::collections::BTreeMap;

use crate::client::RedisLimits;
use crate::keys;
use crate::store::json;

impl RedisLimits {
    /// Every subscription of `tenant`, by subject key (`user:<id>`,
    /// `customer:<id>`). One `HGETALL` of the tenant's subscriptions hash:
    /// an export reads them all once, not one per subject.
    pub async fn all_subscriptions(&self, tenant: &str) -> Result<BTreeMap<String, SubscriptionView>, LimitsError> {
        let key = keys::key(tenant, "subs");
        let all: BTreeMap<String, String> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
        all.into_iter().map(|(subject, text)| Ok((subject.clone(), json(&format!("{key} {subject}"), &text)?))).collect()
    }
}
