//! Runaway-user detection: rules evaluated against the exact rollups after
//! every flush, alerts kept in ClickHouse, and optional webhook notifications.
//!
//! Why here: the aggregator is the component that knows, flush by flush,
//! which users just spent, and the rollups it has just written are exact (no
//! replay is ever counted twice), so evaluating right after a flush is both
//! near real time and exact. Users are partitioned by Kafka key, so with
//! several aggregators each evaluates the users of its own partitions; open
//! alerts are re-evaluated by whichever aggregator holds them in memory (after
//! a restart, every aggregator loads all open alerts, so a resolve may be
//! notified twice, never missed).
//!
//! Rules, per tenant (defaults in `[alerts.rules]`, a tenant's own in `[alerts.tenants.<id>]`):
//! - `absolute`: the user's cost over the trailing window is above a threshold;
//! - `peers`: the trailing-window cost is above K times the tenant's median
//!   active user, and above a floor (so quiet tenants do not page);
//! - `self`: the trailing-window cost is above K times the user's own average
//!   per window over the last 7 days, and above a floor;
//! - `margin`: this calendar month the user's cost exceeds their revenue by
//!   more than a threshold.

use chrono::{Datelike, TimeZone, Utc};
use meterline_schemas::Nanos;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::AggregatorError;
use crate::config::{AlertRules, AlertsConfig};
use crate::metrics;
use crate::store::Store;

/// One alert as stored and as sent to the webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct AlertRow {
    pub tenant: String,
    pub user_id: String,
    pub rule: String,
    pub opened_at: u32,
    pub state: String,
    pub observed_nanos: i64,
    pub threshold_nanos: i64,
    pub window_secs: u32,
    pub updated_at: u32,
    pub resolved_at: u32,
    pub version: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct UserSum {
    user_id: String,
    total: i64,
}

pub const RULES: &[&str] = &["absolute", "peers", "self", "margin"];

/// Evaluates the rules and keeps the open alerts.
#[derive(Debug)]
pub struct Evaluator {
    config: AlertsConfig,
    open: BTreeMap<(String, String, String), AlertRow>,
    loaded: bool,
    client: reqwest::Client,
}

/// The sums the rules read for one tenant, in nano-USD.
#[derive(Debug, Default)]
pub struct Spend {
    /// Every user's cost over the trailing window (all of the tenant's users:
    /// the peers rule needs their median).
    pub window: HashMap<String, i64>,
    /// Cost over the last 7 days, for the users evaluated.
    pub week: HashMap<String, i64>,
    /// Cost minus revenue since the start of the calendar month, for the users evaluated.
    pub loss: HashMap<String, i64>,
}

/// The starts (Unix seconds) of the periods behind [`Spend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub window: i64,
    pub week: i64,
    pub month: i64,
}

impl Periods {
    pub fn at(rules: &AlertRules, now: chrono::DateTime<Utc>) -> Periods {
        let now_s = now.timestamp();
        let month = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().map_or(0, |t| t.timestamp());
        Periods { window: (now_s - i64::from(rules.window_secs)).max(0), week: (now_s - 7 * 86_400).max(0), month }
    }
}

/// One alert's change of state, decided but not yet stored.
#[derive(Debug, Clone)]
pub struct Transition {
    pub row: AlertRow,
    /// `opened` or `resolved` (notified), or `None` for an update of an open alert.
    pub event: Option<&'static str>,
}

impl Evaluator {
    pub fn new(config: AlertsConfig) -> Evaluator {
        Evaluator { config, open: BTreeMap::new(), loaded: false, client: reqwest::Client::new() }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    pub fn config(&self) -> &AlertsConfig {
        &self.config
    }

    /// False until the stored open alerts were loaded with [`Evaluator::load`].
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// Takes the open alerts as stored (after a restart).
    pub fn load(&mut self, rows: Vec<AlertRow>) {
        for r in rows {
            self.open.insert((r.tenant.clone(), r.user_id.clone(), r.rule.clone()), r);
        }
        self.loaded = true;
    }

    /// The users to evaluate, by tenant: those `touched` and every open alert's.
    pub fn targets(&self, touched: &BTreeSet<(String, String)>) -> BTreeMap<String, BTreeSet<String>> {
        let mut by_tenant: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (t, u) in touched {
            by_tenant.entry(t.clone()).or_default().insert(u.clone());
        }
        for (t, u, _) in self.open.keys() {
            by_tenant.entry(t.clone()).or_default().insert(u.clone());
        }
        by_tenant
    }

    /// The rules' verdicts on `users` of `tenant`: pure, shared by every store.
    pub fn decide(&self, tenant: &str, users: &BTreeSet<String>, spend: &Spend, now: i64) -> Vec<Transition> {
        let rules = self.config.rules_for(tenant);
        let window = i64::from(rules.window_secs);
        let median = median(spend.window.values().copied().filter(|c| *c > 0).collect());
        let windows_per_week = (7 * 86_400 / window.max(1)).max(1);
        let mut out = Vec::new();
        for user in users {
            let spent = spend.window.get(user).copied().unwrap_or(0);
            let per_window = spend.week.get(user).copied().unwrap_or(0) / windows_per_week;
            let verdicts = [
                ("absolute", spent, rules.absolute_cost.0),
                ("peers", spent, (median.saturating_mul(rules.peer_multiple)).max(rules.peer_floor.0)),
                ("self", spent, (per_window.saturating_mul(rules.self_multiple)).max(rules.self_floor.0)),
                ("margin", spend.loss.get(user).copied().unwrap_or(0), rules.margin_loss.0),
            ];
            for (rule, observed, threshold) in verdicts {
                out.extend(self.transition(tenant, user, rule, observed, threshold, rules.window_secs, now));
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn transition(&self, tenant: &str, user: &str, rule: &str, observed: i64, threshold: i64, window_secs: u32, now: i64) -> Option<Transition> {
        let key = (tenant.to_owned(), user.to_owned(), rule.to_owned());
        let holds = observed > threshold;
        let now32 = u32::try_from(now).unwrap_or(u32::MAX);
        let version = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let (row, event) = match (self.open.get(&key), holds) {
            (None, true) => {
                let row = AlertRow {
                    tenant: tenant.to_owned(),
                    user_id: user.to_owned(),
                    rule: rule.to_owned(),
                    opened_at: now32,
                    state: "open".to_owned(),
                    observed_nanos: observed,
                    threshold_nanos: threshold,
                    window_secs,
                    updated_at: now32,
                    resolved_at: 0,
                    version,
                };
                (row, Some("opened"))
            }
            (Some(open), true) if open.observed_nanos != observed || open.threshold_nanos != threshold => {
                let mut row = open.clone();
                row.observed_nanos = observed;
                row.threshold_nanos = threshold;
                row.updated_at = now32;
                row.version = version.max(open.version + 1);
                (row, None)
            }
            (Some(open), false) => {
                let mut row = open.clone();
                row.state = "resolved".to_owned();
                row.observed_nanos = observed;
                row.updated_at = now32;
                row.resolved_at = now32;
                row.version = version.max(open.version + 1);
                (row, Some("resolved"))
            }
            _ => return None,
        };
        Some(Transition { row, event })
    }

    /// Records transitions that are now stored: the open set, metrics, log
    /// lines and webhook notifications.
    pub fn applied(&mut self, transitions: Vec<Transition>) {
        for Transition { row, event } in transitions {
            let key = (row.tenant.clone(), row.user_id.clone(), row.rule.clone());
            if row.state == "open" {
                self.open.insert(key, row.clone());
            } else {
                self.open.remove(&key);
            }
            if let Some(event) = event {
                if event == "opened" {
                    metrics::alert_opened(&row.tenant, &row.rule);
                }
                tracing::info!(tenant = %row.tenant, user = %row.user_id, rule = %row.rule, observed = %Nanos(row.observed_nanos), threshold = %Nanos(row.threshold_nanos), event, "runaway alert");
                self.notify(event, row);
            }
        }
        let mut open: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (t, _, r) in self.open.keys() {
            *open.entry((t.as_str(), r.as_str())).or_default() += 1;
        }
        metrics::alerts_open(&open);
    }

    /// Evaluates `touched` users (tenant, user) and every open alert's user
    /// against ClickHouse, and stores the transitions there.
    pub async fn evaluate(&mut self, store: &Store, touched: &BTreeSet<(String, String)>) -> Result<(), AggregatorError> {
        if !self.config.enabled {
            return Ok(());
        }
        if !self.loaded {
            let rows: Vec<AlertRow> = store.client().query(crate::sql::OPEN_ALERTS).fetch_all().await?;
            self.load(rows);
        }
        let now = Utc::now();
        for (tenant, users) in self.targets(touched) {
            let periods = Periods::at(&self.config.rules_for(&tenant), now);
            let sums = |sql: &'static str, since: i64, users: Option<&BTreeSet<String>>| {
                // No users named means every user, as an empty filter always has.
                let users = users.filter(|us| !us.is_empty());
                let q = store.client().query(&crate::sql::user_sums(sql, users.is_some())).bind(&tenant).bind(since);
                match users {
                    Some(us) => q.bind(us),
                    None => q,
                }
            };
            let collect = |rows: Vec<UserSum>| rows.into_iter().map(|r| (r.user_id, r.total)).collect::<HashMap<_, _>>();
            let spend = Spend {
                window: collect(sums(crate::sql::COST_SINCE, periods.window, None).fetch_all().await?),
                week: collect(sums(crate::sql::COST_SINCE, periods.week, Some(&users)).fetch_all().await?),
                loss: collect(sums(crate::sql::LOSS_SINCE, periods.month, Some(&users)).fetch_all().await?),
            };
            let transitions = self.decide(&tenant, &users, &spend, now.timestamp());
            if !transitions.is_empty() {
                let rows: Vec<AlertRow> = transitions.iter().map(|t| t.row.clone()).collect();
                store.insert_alerts(&rows).await?;
            }
            self.applied(transitions);
        }
        Ok(())
    }

    /// Sends the webhook in the background, retrying with backoff.
    fn notify(&self, event: &'static str, alert: AlertRow) {
        let Some(url) = self.config.webhook_url.clone() else { return };
        let client = self.client.clone();
        let retries = self.config.webhook_retries;
        tokio::spawn(async move {
            let body = serde_json::json!({
                "event": event,
                "tenant": alert.tenant,
                "user_id": alert.user_id,
                "rule": alert.rule,
                "observed_usd": Nanos(alert.observed_nanos).to_string(),
                "threshold_usd": Nanos(alert.threshold_nanos).to_string(),
                "window_secs": alert.window_secs,
                "opened_at": alert.opened_at,
            });
            let mut pause = std::time::Duration::from_millis(200);
            for attempt in 0..=retries {
                match client.post(&url).json(&body).timeout(std::time::Duration::from_secs(5)).send().await {
                    Ok(r) if r.status().is_success() => return,
                    Ok(r) => tracing::warn!(status = %r.status(), attempt, "alert webhook refused"),
                    Err(e) => tracing::warn!(error = %e, attempt, "alert webhook failed"),
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
            metrics::webhook_failed();
        });
    }
}

/// The median of positive values (the lower middle for an even count).
fn median(mut values: Vec<i64>) -> i64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[(values.len() - 1) / 2]
}

impl AlertsConfig {
    pub fn rules_for(&self, tenant: &str) -> AlertRules {
        self.tenants.get(tenant).cloned().unwrap_or_else(|| self.rules.clone())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_spenders() {
        assert_eq!(super::median(vec![5, 1, 3]), 3);
        assert_eq!(super::median(vec![4, 1, 3, 2]), 2);
        assert_eq!(super::median(vec![]), 0);
    }
}
