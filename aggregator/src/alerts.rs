//! Runaway alerts in the distributed pipeline: the domain's rules
//! ([`AlertBook`]) evaluated against ClickHouse's exact rollups for the
//! users flushes wrote (by the task in `evaluations.rs`), transitions stored
//! there, and the webhook and metrics that every store's alerts share
//! ([`Notifier`]).
//!
//! Why here: the aggregator is the component that knows, flush by flush,
//! which users just spent, and the rollups it has just written are exact (no
//! replay is ever counted twice), so evaluating those users once their
//! flushes are durable is both near real time and exact. Events are
//! partitioned by idempotency key, so with several aggregators one user's
//! events are written by several of them, and each evaluates the users its
//! own flushes touched against the rollups of all: two may find the same
//! user over a threshold. Before an
//! alert is opened the stored open alerts are read again, so one that
//! another aggregator opened is adopted rather than opened twice (what is
//! left is the moment between that read and the other's insert: two
//! evaluations in the same few milliseconds may both open, and the webhook
//! hears of the user twice). Open alerts are re-evaluated by whichever
//! aggregator holds them in memory (after a restart, every aggregator loads
//! all open alerts, so a resolve may be notified twice, never missed).

use chrono::Utc;
use meterline_clickhouse::write::{UserSum, user_sums};
use meterline_clickhouse::{ClickHouseError, Store};
use meterline_domain::{AlertBook, AlertRow, AlertsConfig, Notice, Periods, Rule, Spend, Transition};
use meterline_limits::notify::{LimitAlert, SIGNATURE_HEADER, signature};
use meterline_schemas::Nanos;
use meterline_schemas::tenants::TenantConfig;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::metrics;

/// Records stored transitions in the book, and tells the log, the metrics
/// and the webhook. Shared by every store's alerts, runaway and limit alike:
/// each body is signed with its tenant's `webhook_secret`, when it has one
/// ([`SIGNATURE_HEADER`], Stripe's scheme; a tenant without one is sent unsigned).
#[derive(Debug, Clone)]
pub struct Notifier {
    client: reqwest::Client,
    webhook_url: Option<String>,
    retries: u32,
    /// Webhook secrets by tenant; never logged (no `Debug` of their text).
    secrets: Arc<Secrets>,
}

/// The tenants' webhook secrets.
#[derive(Default)]
struct Secrets(HashMap<String, Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The webhook's body.
#[derive(Debug, Serialize)]
struct WebhookBody {
    event: &'static str,
    tenant: String,
    user_id: String,
    rule: String,
    observed_usd: String,
    threshold_usd: String,
    window_secs: u32,
    opened_at: u32,
}

impl Notifier {
    pub fn new(config: &AlertsConfig) -> Notifier {
        Notifier { client: reqwest::Client::new(), webhook_url: config.webhook_url.clone(), retries: config.webhook_retries, secrets: Arc::default() }
    }

    /// Signs each tenant's webhooks with its configured `webhook_secret`.
    pub fn with_secrets(mut self, tenants: &[TenantConfig]) -> Notifier {
        let secrets = tenants.iter().filter_map(|t| t.webhook_secret.as_ref().map(|s| (t.id.clone(), s.as_bytes().to_vec()))).collect();
        self.secrets = Arc::new(Secrets(secrets));
        self
    }

    /// Applies stored `transitions` to `book` and notifies the opened and resolved ones.
    pub fn applied(&self, book: &mut AlertBook, transitions: Vec<Transition>) {
        for (notice, row) in book.applied(transitions) {
            if notice == Notice::Opened {
                metrics::alert_opened(&row.tenant, &row.rule);
            }
            tracing::info!(tenant = %row.tenant, user = %row.user_id, rule = %row.rule, observed = %Nanos(row.observed_nanos), threshold = %Nanos(row.threshold_nanos), event = notice.as_str(), "runaway alert");
            self.notify(notice, row);
        }
        metrics::alerts_open(&book.open_counts());
    }

    /// Sends a runaway transition to the webhook.
    fn notify(&self, notice: Notice, alert: AlertRow) {
        let body = WebhookBody {
            event: notice.as_str(),
            observed_usd: Nanos(alert.observed_nanos).to_string(),
            threshold_usd: Nanos(alert.threshold_nanos).to_string(),
            window_secs: alert.window_secs,
            opened_at: alert.opened_at,
            tenant: alert.tenant,
            user_id: alert.user_id,
            rule: alert.rule,
        };
        self.send(&body.tenant, &body);
    }

    /// Tells the log, the metrics and the webhook of a stored limit crossing.
    pub fn limit_crossed(&self, alert: &LimitAlert) {
        metrics::alert_opened(&alert.tenant, Rule::Limit.as_str());
        tracing::info!(tenant = %alert.tenant, scope = alert.scope.name(), subject = %alert.subject_id, limit = %alert.limit, ratio = %alert.ratio, used = %alert.used, "limit alert");
        self.send(&alert.tenant, alert);
    }

    /// Sends `body` in the background, signed for `tenant`, retrying with
    /// backoff. Each attempt is signed at its own time, so a receiver's
    /// replay window holds for retries too. Needs a Tokio runtime.
    fn send(&self, tenant: &str, body: &impl Serialize) {
        let Some(url) = self.webhook_url.clone() else { return };
        let bytes = match serde_json::to_vec(body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "alert webhook body does not serialize");
                metrics::webhook_failed();
                return;
            }
        };
        let client = self.client.clone();
        let retries = self.retries;
        let secrets = self.secrets.clone();
        let tenant = tenant.to_owned();
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_millis(200);
            for attempt in 0..=retries {
                let mut request = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(bytes.clone())
                    .timeout(std::time::Duration::from_secs(5));
                if let Some(secret) = secrets.0.get(&tenant) {
                    request = request.header(SIGNATURE_HEADER, signature(secret, Utc::now().timestamp(), &bytes));
                }
                match request.send().await {
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

/// The rules over ClickHouse's rollups.
#[derive(Debug)]
pub struct Evaluator {
    book: AlertBook,
    notifier: Notifier,
}

impl Evaluator {
    /// `tenants` for their webhook secrets.
    pub fn new(config: AlertsConfig, tenants: &[TenantConfig]) -> Evaluator {
        Evaluator { notifier: Notifier::new(&config).with_secrets(tenants), book: AlertBook::new(config) }
    }

    pub fn enabled(&self) -> bool {
        self.book.enabled()
    }

    pub fn has_open(&self) -> bool {
        self.book.has_open()
    }

    /// Evaluates `touched` users (tenant, user) and every open alert's user
    /// against ClickHouse, and stores the transitions there.
    pub async fn evaluate(&mut self, store: &Store, touched: &BTreeSet<(String, String)>) -> Result<(), ClickHouseError> {
        if !self.book.enabled() {
            return Ok(());
        }
        if !self.book.loaded() {
            self.book.load(store.open_alerts().await?);
        }
        let now = Utc::now();
        for (tenant, users) in self.book.targets(touched) {
            let periods = Periods::at(&self.book.config().rules_for(&tenant), now);
            let spend = Spend {
                window: store.user_sums(&user_sums(UserSum::Cost, &tenant, periods.window, now.timestamp(), None)).await?,
                week: store.user_sums(&user_sums(UserSum::Cost, &tenant, periods.week, now.timestamp(), Some(&users))).await?,
                loss: store.user_sums(&user_sums(UserSum::Loss, &tenant, periods.month, now.timestamp(), Some(&users))).await?,
            };
            let mut transitions = self.book.decide(&tenant, &users, &spend, now.timestamp());
            if transitions.iter().any(|t| t.notice == Some(Notice::Opened)) {
                // Another aggregator's flush may have touched the same user
                // and opened it already: adopt what is stored, then decide again.
                self.book.load(store.open_alerts().await?);
                transitions = self.book.decide(&tenant, &users, &spend, now.timestamp());
            }
            if !transitions.is_empty() {
                let rows: Vec<AlertRow> = transitions.iter().map(|t| t.row.clone()).collect();
                store.insert_alerts(&rows).await?;
            }
            self.notifier.applied(&mut self.book, transitions);
        }
        Ok(())
    }
}
