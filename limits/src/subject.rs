//! Who a limit is counted for (a user or a customer), and the subscription that puts a subject on a plan.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Invalid;
use crate::plan::{Scope, check_id};

/// A user or a customer of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject {
    pub scope: Scope,
    pub id: String,
}

impl Subject {
    pub fn user(id: &str) -> Subject {
        Subject { scope: Scope::User, id: id.to_owned() }
    }
    pub fn customer(id: &str) -> Subject {
        Subject { scope: Scope::Customer, id: id.to_owned() }
    }

    /// The subject as stores key it: `user:<id>` or `customer:<id>`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.scope.name(), self.id)
    }
}

/// A subject's plan, and the anchor of its `cycle` periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub plan: String,
    pub cycle_start: Option<DateTime<Utc>>,
}

/// A subscription as the API writes it and the stores keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionView {
    pub plan: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_start: Option<String>,
}

impl Subscription {
    pub fn view(&self) -> SubscriptionView {
        SubscriptionView { plan: self.plan.clone(), cycle_start: self.cycle_start.map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)) }
    }

    /// Parses a subscription's body (`PUT .../subscription`) or its stored form.
    pub fn parse(body: &str) -> Result<Subscription, Invalid> {
        let view: SubscriptionView =
            serde_json::from_str(body).map_err(|e| Invalid::new("body", format!("the body is not a subscription: {e}")))?;
        Subscription::from_view(&view)
    }

    pub fn from_view(view: &SubscriptionView) -> Result<Subscription, Invalid> {
        check_id("plan", &view.plan)?;
        let cycle_start = match &view.cycle_start {
            None => None,
            Some(text) => Some(
                DateTime::parse_from_rfc3339(text)
                    .map_err(|e| Invalid::new("cycle_start", format!("must be an RFC 3339 time with an offset: {e}")))?
                    .with_timezone(&Utc),
            ),
        };
        Ok(Subscription { plan: view.plan.clone(), cycle_start })
    }
}
