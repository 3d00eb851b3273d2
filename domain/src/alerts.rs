//! The runaway-user rules, pure: their configuration, the sums they read, and
//! the book of open alerts that turns those sums into transitions. The stores
//! read the sums and write the transitions; this decides.
//!
//! Rules, per tenant (defaults in `[alerts.rules]`, a tenant's own in `[alerts.tenants.<id>]`):
//! - `absolute`: the user's cost over the trailing window is above a threshold;
//! - `peers`: the trailing-window cost is above K times the tenant's median
//!   active user, and above a floor (so quiet tenants do not page);
//! - `self`: the trailing-window cost is above K times the user's own average
//!   per window over the last 7 days, and above a floor;
//! - `margin`: this calendar month the user's cost exceeds their revenue by
//!   more than a threshold.
//!
//! A fifth rule, `limit`, is not evaluated here: a plan's limit crossing a
//! `notify_at` threshold (or a hard limit being reached) is detected where
//! events are counted and stored with the same row ([`Rule::Limit`]). Those
//! rows never enter the [`AlertBook`]: they have no runaway verdict to
//! resolve them.

use chrono::{Datelike, TimeZone, Utc};
use meterline_schemas::Nanos;
use meterline_schemas::money::NANOS_PER_UNIT;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::DomainError;

/// One alert as stored and as sent to the webhook. `rule` and `state` hold
/// [`Rule::as_str`] and [`AlertState::as_str`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clickhouse", derive(clickhouse::Row))]
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

/// An alert's rule: the four runaway rules, and a plan limit's threshold crossing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    Absolute,
    Peers,
    /// Named `self` in configuration, storage and the API.
    OwnHistory,
    Margin,
    /// A limit's `notify_at` threshold crossed, or a hard limit reached
    /// (stored by the limits counting, not decided by [`AlertBook`]).
    Limit,
}

impl Rule {
    pub const ALL: [Rule; 5] = [Rule::Absolute, Rule::Peers, Rule::OwnHistory, Rule::Margin, Rule::Limit];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Absolute => "absolute",
            Rule::Peers => "peers",
            Rule::OwnHistory => "self",
            Rule::Margin => "margin",
            Rule::Limit => "limit",
        }
    }

    pub fn parse(text: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The names, for messages: `absolute, peers, self, margin`.
    pub fn names() -> String {
        Rule::ALL.map(Rule::as_str).join(", ")
    }

    /// True for the rules the [`AlertBook`] evaluates (not `limit`).
    pub fn is_runaway(self) -> bool {
        match self {
            Rule::Absolute | Rule::Peers | Rule::OwnHistory | Rule::Margin => true,
            Rule::Limit => false,
        }
    }
}

/// An alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Open,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Resolved => "resolved",
        }
    }
}

/// What a transition tells the webhook and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Opened,
    Resolved,
}

impl Notice {
    pub fn as_str(self) -> &'static str {
        match self {
            Notice::Opened => "opened",
            Notice::Resolved => "resolved",
        }
    }
}

/// Runaway-user rules: defaults and per-tenant replacements.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    pub enabled: bool,
    /// The rules for every tenant without its own.
    pub rules: AlertRules,
    /// Rules for particular tenants, replacing the defaults as a whole.
    pub tenants: BTreeMap<String, AlertRules>,
    /// Receives `{"event": "opened"|"resolved", ...}` for each runaway
    /// transition and `{"kind": "limit", ...}` for each limit crossing,
    /// signed with the tenant's `webhook_secret` when it has one
    /// (`Meterline-Signature: t=<unix secs>,v1=<hex HMAC-SHA256 of "<t>.<body>">`).
    pub webhook_url: Option<String>,
    pub webhook_retries: u32,
    /// How often open alerts are re-evaluated when no events arrive.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub interval_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig { enabled: true, rules: AlertRules::default(), tenants: BTreeMap::new(), webhook_url: None, webhook_retries: 5, interval_secs: 30 }
    }
}

/// Thresholds of the four rules (money in decimal USD in the file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertRules {
    /// The trailing window the cost rules look at.
    #[serde(deserialize_with = "meterline_schemas::duration::secs")]
    pub window_secs: u32,
    #[serde(deserialize_with = "usd")]
    pub absolute_cost: Nanos,
    pub peer_multiple: i64,
    #[serde(deserialize_with = "usd")]
    pub peer_floor: Nanos,
    pub self_multiple: i64,
    #[serde(deserialize_with = "usd")]
    pub self_floor: Nanos,
    #[serde(deserialize_with = "usd")]
    pub margin_loss: Nanos,
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            window_secs: 3_600,
            absolute_cost: Nanos(10 * NANOS_PER_UNIT),
            peer_multiple: 50,
            peer_floor: Nanos(NANOS_PER_UNIT),
            self_multiple: 10,
            self_floor: Nanos(NANOS_PER_UNIT),
            margin_loss: Nanos(5 * NANOS_PER_UNIT),
        }
    }
}

fn usd<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Nanos, D::Error> {
    let text = String::deserialize(d)?;
    Nanos::parse_non_negative(&text).map_err(|e| serde::de::Error::custom(format!("{text:?} {e}")))
}

impl AlertsConfig {
    /// The rules `tenant` is held to.
    pub fn rules_for(&self, tenant: &str) -> AlertRules {
        self.tenants.get(tenant).cloned().unwrap_or_else(|| self.rules.clone())
    }

    /// Checks every rule set, naming the key of the first bad value.
    pub fn validate(&self) -> Result<(), DomainError> {
        for (key, rules) in std::iter::once(("alerts.rules".to_owned(), &self.rules))
            .chain(self.tenants.iter().map(|(t, r)| (format!("alerts.tenants.{t}"), r)))
        {
            if rules.window_secs < 60 {
                return Err(DomainError::config(format!("{key}.window_secs"), "must be at least 60"));
            }
            if rules.peer_multiple < 1 || rules.self_multiple < 1 {
                return Err(DomainError::config(key, "peer_multiple and self_multiple must be at least 1"));
            }
        }
        Ok(())
    }
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
    /// Opened or resolved (notified), or `None` for an update of an open alert.
    pub notice: Option<Notice>,
}

/// The open alerts and the rules that open and resolve them.
#[derive(Debug)]
pub struct AlertBook {
    config: AlertsConfig,
    open: BTreeMap<(String, String, String), AlertRow>,
    loaded: bool,
}

impl AlertBook {
    pub fn new(config: AlertsConfig) -> AlertBook {
        AlertBook { config, open: BTreeMap::new(), loaded: false }
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

    /// False until the stored open alerts were loaded with [`AlertBook::load`].
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// Takes the open alerts as stored (after a restart). Rows of other
    /// rules (`limit`) are left out: nothing here would ever resolve them.
    pub fn load(&mut self, rows: Vec<AlertRow>) {
        for r in rows.into_iter().filter(|r| Rule::parse(&r.rule).is_some_and(Rule::is_runaway)) {
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

    /// The rules' verdicts on `users` of `tenant`.
    pub fn decide(&self, tenant: &str, users: &BTreeSet<String>, spend: &Spend, now: i64) -> Vec<Transition> {
        let rules = self.config.rules_for(tenant);
        let window = i64::from(rules.window_secs);
        let median = median(spend.window.values().copied().filter(|c| *c > 0).collect());
        let windows_per_week = (7 * 86_400 / window.max(1)).max(1);
        let version = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let mut out = Vec::new();
        for user in users {
            let spent = spend.window.get(user).copied().unwrap_or(0);
            let per_window = spend.week.get(user).copied().unwrap_or(0) / windows_per_week;
            let verdicts = [
                (Rule::Absolute, spent, rules.absolute_cost.0),
                (Rule::Peers, spent, (median.saturating_mul(rules.peer_multiple)).max(rules.peer_floor.0)),
                (Rule::OwnHistory, spent, (per_window.saturating_mul(rules.self_multiple)).max(rules.self_floor.0)),
                (Rule::Margin, spend.loss.get(user).copied().unwrap_or(0), rules.margin_loss.0),
            ];
            for (rule, observed, threshold) in verdicts {
                let verdict = Verdict { tenant, user, rule, observed, threshold, window_secs: rules.window_secs };
                out.extend(self.transition(&verdict, now, version));
            }
        }
        out
    }

    fn transition(&self, v: &Verdict<'_>, now: i64, version: u64) -> Option<Transition> {
        let key = (v.tenant.to_owned(), v.user.to_owned(), v.rule.as_str().to_owned());
        let holds = v.observed > v.threshold;
        let now32 = u32::try_from(now).unwrap_or(u32::MAX);
        let (row, notice) = match (self.open.get(&key), holds) {
            (None, true) => {
                let row = AlertRow {
                    tenant: v.tenant.to_owned(),
                    user_id: v.user.to_owned(),
                    rule: v.rule.as_str().to_owned(),
                    opened_at: now32,
                    state: AlertState::Open.as_str().to_owned(),
                    observed_nanos: v.observed,
                    threshold_nanos: v.threshold,
                    window_secs: v.window_secs,
                    updated_at: now32,
                    resolved_at: 0,
                    version,
                };
                (row, Some(Notice::Opened))
            }
            (Some(open), true) if open.observed_nanos != v.observed || open.threshold_nanos != v.threshold => {
                let mut row = open.clone();
                row.observed_nanos = v.observed;
                row.threshold_nanos = v.threshold;
                row.updated_at = now32;
                row.version = version.max(open.version + 1);
                (row, None)
            }
            (Some(open), false) => {
                let mut row = open.clone();
                row.state = AlertState::Resolved.as_str().to_owned();
                row.observed_nanos = v.observed;
                row.updated_at = now32;
                row.resolved_at = now32;
                row.version = version.max(open.version + 1);
                (row, Some(Notice::Resolved))
            }
            _ => return None,
        };
        Some(Transition { row, notice })
    }

    /// Records transitions that are now stored, and hands back those to
    /// notify (opened and resolved alerts).
    pub fn applied(&mut self, transitions: Vec<Transition>) -> Vec<(Notice, AlertRow)> {
        let mut notices = Vec::new();
        for Transition { row, notice } in transitions {
            let key = (row.tenant.clone(), row.user_id.clone(), row.rule.clone());
            if row.state == AlertState::Open.as_str() {
                self.open.insert(key, row.clone());
            } else {
                self.open.remove(&key);
            }
            if let Some(notice) = notice {
                notices.push((notice, row));
            }
        }
        notices
    }

    /// Open alerts by (tenant, rule).
    pub fn open_counts(&self) -> BTreeMap<(&str, &str), usize> {
        let mut open: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (t, _, r) in self.open.keys() {
            *open.entry((t.as_str(), r.as_str())).or_default() += 1;
        }
        open
    }
}

/// One rule's sums for one user.
struct Verdict<'a> {
    tenant: &'a str,
    user: &'a str,
    rule: Rule,
    observed: i64,
    threshold: i64,
    window_secs: u32,
}

/// The median of positive values (the lower middle for an even count).
fn median(mut values: Vec<i64>) -> i64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[(values.len() - 1) / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_spenders() {
        assert_eq!(median(vec![5, 1, 3]), 3);
        assert_eq!(median(vec![4, 1, 3, 2]), 2);
        assert_eq!(median(vec![]), 0);
    }

    fn users(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_alert_opens_updates_and_resolves() {
        let mut book = AlertBook::new(AlertsConfig::default());
        let usd = |n: i64| n * NANOS_PER_UNIT;
        let mut spend = Spend::default();
        spend.window.insert("u".into(), usd(11));
        let opened = book.decide("t", &users(&["u"]), &spend, 1_000);
        let rules: Vec<&str> = opened.iter().map(|t| t.row.rule.as_str()).collect();
        // 11 USD in the window is over absolute (10), the peers floor (1; the
        // median is its own) is under 50 x 11, and over the self floor.
        assert_eq!(rules, ["absolute", "self"]);
        assert!(opened.iter().all(|t| t.notice == Some(Notice::Opened)));
        let notices = book.applied(opened);
        assert_eq!(notices.len(), 2);
        assert_eq!(book.open_counts().get(&("t", "absolute")), Some(&1));

        spend.window.insert("u".into(), usd(12));
        let updated = book.decide("t", &users(&["u"]), &spend, 1_060);
        assert!(updated.iter().all(|t| t.notice.is_none() && t.row.state == "open" && t.row.opened_at == 1_000));
        assert!(book.applied(updated).is_empty());

        spend.window.insert("u".into(), 0);
        let resolved = book.decide("t", &users(&["u"]), &spend, 1_120);
        assert_eq!(resolved.len(), 2);
        assert!(resolved.iter().all(|t| t.notice == Some(Notice::Resolved) && t.row.resolved_at == 1_120));
        book.applied(resolved);
        assert!(!book.has_open());
    }

    #[test]
    fn rules_parse_their_names() {
        for r in Rule::ALL {
            assert_eq!(Rule::parse(r.as_str()), Some(r));
        }
        assert_eq!(Rule::parse("selfish"), None);
        assert_eq!(Rule::names(), "absolute, peers, self, margin, limit");
        assert!(Rule::ALL.iter().filter(|r| !r.is_runaway()).eq([Rule::Limit].iter()));
    }

    #[test]
    fn stored_limit_alerts_stay_out_of_the_book() {
        let mut book = AlertBook::new(AlertsConfig::default());
        let row = |rule: &str| AlertRow {
            tenant: "t".into(),
            user_id: "u".into(),
            rule: rule.into(),
            opened_at: 1,
            state: "open".into(),
            observed_nanos: 1,
            threshold_nanos: 1,
            window_secs: 60,
            updated_at: 1,
            resolved_at: 0,
            version: 1,
        };
        book.load(vec![row("limit")]);
        assert!(!book.has_open(), "a limit alert is no runaway alert to re-evaluate");
        book.load(vec![row("peers")]);
        assert!(book.has_open());
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = AlertsConfig::default();
        c.tenants.insert("acme".into(), AlertRules { window_secs: 5, ..AlertRules::default() });
        assert!(c.validate().unwrap_err().to_string().contains("alerts.tenants.acme.window_secs"));
    }
}
