//! Reserve, commit, release and balances over any store: admission, metering of commits, store outages, and the answers.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use meterline_domain::{EventRow, Source, fingerprint, price};
use meterline_http::{ApiError, HasKeys};
use meterline_schemas::TimeBounds;
use meterline_schemas::prices::Catalog;
use meterline_schemas::tenants::KeyRing;
use meterline_schemas::wire::Envelope;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::book::{Book, charges, counts};
use crate::config::{LimitsConfig, OnStoreError};
use crate::error::LimitsError;
use crate::metrics;
use crate::request::{commit_event, estimate, parse_reserve, rfc3339_ms};
use crate::reservation::{Action, Hold, Refusal, Reservation, ReservationState, new_id, parse_id};
use crate::status::{Balance, LimitStatus, status};
use crate::store::{Admit, Admitted, LimitStore};
use crate::subject::{Subject, SubscriptionView};

/// Where a commit's event is metered: the same log `POST /v1/events` writes.
pub trait Meter: Send + Sync + std::fmt::Debug {
    /// Makes the events durable (Kafka acked, or committed in the embedded store).
    fn meter(&self, events: Vec<Envelope>) -> BoxFuture<'_, Result<(), String>>;
}

/// The time source; tests inject one to cross period boundaries.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The limits service over a store: what the HTTP routes call.
pub struct Limits<S> {
    store: S,
    meter: Arc<dyn Meter>,
    keys: KeyRing,
    catalog: Catalog,
    bounds: TimeBounds,
    config: LimitsConfig,
    clock: Clock,
}

impl<S> std::fmt::Debug for Limits<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("meter", &self.meter).finish_non_exhaustive()
    }
}

impl<S> HasKeys for Limits<S> {
    fn keys(&self) -> &KeyRing {
        &self.keys
    }
}

/// `POST /v1/reservations`' answer. A denial is an answer, not an error.
#[derive(Debug, Clone, Serialize)]
pub struct ReserveAnswer {
    pub allowed: bool,
    pub reservation_id: Option<String>,
    pub expires_at: Option<String>,
    /// The hard limits that refused, by name.
    pub denied_by: Vec<String>,
    /// The status of every limit the call touches, its hold included.
    pub limits: Vec<LimitStatus>,
    /// True when the store could not be reached and the answer follows the
    /// tenant's `on_store_error`; `limits` is then empty.
    pub degraded: bool,
    /// True when the idempotency key was used before: the first reservation.
    pub replayed: bool,
}

/// A commit's or a release's answer.
#[derive(Debug, Clone, Serialize)]
pub struct SettleAnswer {
    pub reservation_id: String,
    pub state: ReservationState,
    /// The idempotency key of the event a commit metered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub limits: Vec<LimitStatus>,
    /// True when the store could not be reached: the usage is metered and
    /// counts when the store is back.
    pub degraded: bool,
}

/// `GET /v1/{users,customers}/{id}/limits`.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectLimits {
    pub scope: crate::plan::Scope,
    pub id: String,
    pub plan: String,
    pub subscription: Option<SubscriptionView>,
    pub limits: Vec<LimitStatus>,
}

/// One row of `GET /v1/limits/nearest`: the subject's limit status and the
/// fraction of its amount used.
#[derive(Debug, Clone, Serialize)]
pub struct NearestRow {
    /// `used / limit`, exact decimal (`"0.9"`; above 1 past the limit).
    pub ratio: String,
    #[serde(flatten)]
    pub status: LimitStatus,
}

/// `GET /v1/limits/nearest`.
#[derive(Debug, Clone, Serialize)]
pub struct NearestAnswer {
    pub as_of: String,
    pub subjects: Vec<NearestRow>,
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::NotFound => ApiError::not_found_what("no reservation with this id for this tenant").with_field("reservation_id"),
        Refusal::Released => ApiError::conflict("the reservation was released; its usage cannot be committed").with_field("reservation_id"),
        Refusal::Committed => ApiError::conflict("the reservation was committed; committed usage cannot be released").with_field("reservation_id"),
        Refusal::DifferentUsage => {
            ApiError::conflict("the reservation was committed with different usage; a retried commit must repeat the first").with_field("reservation_id")
        }
    }
}

/// The limits of `applied` an action touches (by index) and their current counters.
fn touched_by(applied: &[crate::book::Applied<'_>], action: &Action, now: DateTime<Utc>) -> (Vec<usize>, Vec<String>) {
    let touched: Vec<usize> = (0..applied.len()).filter(|i| applied[*i].limit.filter.matches(&action.feature, &action.model, &action.environment)).collect();
    let counters = touched.iter().map(|i| applied[*i].counter(now).key).collect();
    (touched, counters)
}

impl<S: LimitStore> Limits<S> {
    pub fn new(store: S, meter: Arc<dyn Meter>, keys: KeyRing, bounds: TimeBounds, config: LimitsConfig, clock: Clock) -> Result<Limits<S>, LimitsError> {
        config.validate()?;
        let catalog = Catalog::builtin().map_err(|e| LimitsError::Config { key: "prices".into(), message: e.to_string() })?;
        Ok(Limits { store, meter, keys, catalog, bounds, config, clock })
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Runs a store call within the configured bound.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, LimitsError>>) -> Result<T, LimitsError> {
        match tokio::time::timeout(Duration::from_millis(self.config.store_timeout_ms), call).await {
            Ok(result) => result,
            Err(_) => Err(LimitsError::Unavailable { message: format!("no answer within {} ms", self.config.store_timeout_ms), source: None }),
        }
    }

    /// A store failure as the answer to an admin or read request.
    fn unavailable(&self, what: &'static str, e: &LimitsError) -> ApiError {
        tracing::warn!(error = %e, what, "limits store failed; answering 503");
        metrics::store_error(what);
        ApiError::unavailable("the limits store is not reachable; retry")
    }

    /// `POST /v1/reservations`.
    pub async fn reserve(&self, tenant: &str, body: &str) -> Result<ReserveAnswer, ApiError> {
        let now = self.now();
        let request = parse_reserve(body, now, &self.config)?;
        let action = request.action;
        let idempotency_key = request.idempotency_key;
        let ttl = request.ttl_secs;
        let amounts = estimate(&request.estimate, &action, self.keys.tenant(tenant), &self.catalog, now)?;
        let now_ms = now.timestamp_millis();
        let expires_at_ms = now_ms + i64::try_from(ttl).unwrap_or(i64::MAX / 2_000) * 1_000;
        let id = new_id(&action);

        let book = match self.bounded(self.store.book(tenant, Some(&action.user_id), action.customer_id.as_deref())).await {
            Ok(book) => book,
            Err(e) => return Ok(self.degraded(tenant, &e, action, expires_at_ms)),
        };
        let applied = book.applicable(&action.user_id, action.customer_id.as_deref());
        let touched = charges(&applied, &action.feature, &action.model, &action.environment, now, &amounts);
        let reservation = Reservation {
            id: id.clone(),
            state: ReservationState::Held,
            created_at_ms: now_ms,
            expires_at_ms,
            holds: crate::book::distinct(touched.iter().map(|(_, c)| c.clone()))
                .into_iter()
                .filter(|c| c.amount != 0)
                .map(|c| Hold { counter: c.counter.key, amount: c.amount, keep_until: c.counter.keep_until })
                .collect(),
            counted: false,
            commit_fingerprint: None,
        };
        let admit = Admit { reservation, idempotency_key, checks: touched.iter().map(|(_, c)| c.clone()).collect(), now_ms };
        let admission = match self.bounded(self.store.admit(tenant, &admit)).await {
            Ok(a) => a,
            Err(e) => return Ok(self.degraded(tenant, &e, action, expires_at_ms)),
        };
        let limits: Vec<LimitStatus> = touched.iter().zip(&admission.balances).map(|((i, _), b)| status(&applied[*i], *b, now)).collect();
        let answer = match admission.admitted {
            Admitted::New => ReserveAnswer {
                allowed: true,
                reservation_id: Some(id),
                expires_at: Some(rfc3339_ms(expires_at_ms)),
                denied_by: Vec::new(),
                limits,
                degraded: false,
                replayed: false,
            },
            Admitted::Existing(r) => ReserveAnswer {
                allowed: true,
                reservation_id: Some(r.id),
                expires_at: Some(rfc3339_ms(r.expires_at_ms)),
                denied_by: Vec::new(),
                limits,
                degraded: false,
                replayed: true,
            },
            Admitted::Denied(refused) => ReserveAnswer {
                allowed: false,
                reservation_id: None,
                expires_at: None,
                denied_by: refused.iter().filter_map(|j| touched.get(*j)).map(|(i, _)| applied[*i].limit.name.clone()).collect(),
                limits,
                degraded: false,
                replayed: false,
            },
        };
        metrics::reservation(if answer.allowed { "allowed" } else { "denied" });
        Ok(answer)
    }

    fn degraded(&self, tenant: &str, e: &LimitsError, mut action: Action, expires_at_ms: i64) -> ReserveAnswer {
        action.degraded = true;
        let id = new_id(&action);
        let policy = self.config.on_store_error(tenant);
        tracing::warn!(error = %e, %tenant, ?policy, "limits store unreachable; reservation answered by on_store_error");
        metrics::store_error("reserve");
        metrics::reservation(match policy {
            OnStoreError::Allow => "degraded_allowed",
            OnStoreError::Deny => "degraded_denied",
        });
        let allowed = policy == OnStoreError::Allow;
        ReserveAnswer {
            allowed,
            reservation_id: allowed.then_some(id),
            expires_at: allowed.then(|| rfc3339_ms(expires_at_ms)),
            denied_by: Vec::new(),
            limits: Vec::new(),
            degraded: true,
            replayed: false,
        }
    }

    /// `POST /v1/reservations/{id}/commit`: meters exactly one event, then
    /// moves the hold to the actual amounts. Never refused for limits or expiry.
    pub async fn commit(&self, tenant: &str, id: &str, body: &str) -> Result<SettleAnswer, ApiError> {
        let (key, action) = parse_id(id).map_err(|_| refusal(Refusal::NotFound))?;
        let now = self.now();
        let now_ms = now.timestamp_millis();
        let context = self.bounded(self.store.reservation_and_book(tenant, id, &action.user_id, action.customer_id.as_deref())).await;
        let (stored, book) = match context {
            Ok((r, book)) => (Ok(r), Some(book)),
            Err(e) => (Err(e), None),
        };
        let known = match &stored {
            // A reservation allowed while the store was down was never
            // stored: its commit still meters (the id says what to meter).
            Ok(None) if action.degraded => None,
            Ok(None) => return Err(refusal(Refusal::NotFound)),
            Ok(Some(r)) => Some(r.clone()),
            Err(_) => None,
        };
        let event = commit_event(&key, &action, body, &self.bounds, now)?;
        let fp = format!("{:016x}", fingerprint(tenant, &event));
        if let Some(r) = &known {
            // Refuse before metering what the store would refuse after.
            crate::reservation::commit(r.clone(), Vec::new(), &fp, now_ms).map_err(refusal)?;
        }
        let row = {
            let envelope = Envelope { tenant: tenant.to_owned(), received_at: now, event };
            let priced = price(&envelope.event, self.keys.tenant(tenant), &self.catalog);
            let row = EventRow::new(&envelope, 0, priced, Source::Embedded, 0);
            if let Err(e) = self.meter.meter(vec![envelope]).await {
                tracing::warn!(error = %e, %tenant, "the event log did not take a commit's event; answering 503");
                return Err(ApiError::unavailable("the event log did not acknowledge the commit; retry it unchanged"));
            }
            row
        };
        metrics::commit();
        if known.is_none() && stored.is_ok() {
            return Ok(SettleAnswer { reservation_id: id.to_owned(), state: ReservationState::Committed, idempotency_key: Some(key), limits: Vec::new(), degraded: true });
        }
        let settled = async {
            let book = match book {
                Some(book) => book,
                None => self.store.book(tenant, Some(&action.user_id), action.customer_id.as_deref()).await?,
            };
            let applied = book.applicable(&action.user_id, action.customer_id.as_deref());
            let holds: Vec<Hold> =
                counts(&applied, &row).into_iter().map(|c| Hold { counter: c.counter.key, amount: c.amount, keep_until: c.counter.keep_until }).collect();
            // The answer's statuses are read by the commit's own step: one
            // round trip fewer than a balance read after it.
            let (touched, counters) = touched_by(&applied, &action, now);
            let (outcome, balances) = self.store.commit_and_balances(tenant, id, &holds, &fp, now_ms, &counters).await?;
            let limits: Vec<LimitStatus> = touched.iter().zip(balances).map(|(i, b)| status(&applied[*i], b, now)).collect();
            Ok::<_, LimitsError>((outcome, limits))
        };
        match self.bounded(settled).await {
            Ok((Ok(r), limits)) => Ok(SettleAnswer { reservation_id: id.to_owned(), state: r.state, idempotency_key: Some(key), limits, degraded: false }),
            Ok((Err(r), _)) => Err(refusal(r)),
            Err(e) => {
                tracing::warn!(error = %e, %tenant, "limits store unreachable at commit; the usage is metered and counts when it is back");
                metrics::store_error("commit");
                Ok(SettleAnswer { reservation_id: id.to_owned(), state: ReservationState::Committed, idempotency_key: Some(key), limits: Vec::new(), degraded: true })
            }
        }
    }

    /// `POST /v1/reservations/{id}/release`.
    pub async fn release(&self, tenant: &str, id: &str) -> Result<SettleAnswer, ApiError> {
        let (_, action) = parse_id(id).map_err(|_| refusal(Refusal::NotFound))?;
        let now = self.now();
        match self.bounded(self.store.release(tenant, id, now.timestamp_millis())).await {
            Ok(Ok(r)) => {
                metrics::release();
                let limits = match self.bounded(self.store.book(tenant, Some(&action.user_id), action.customer_id.as_deref())).await {
                    Ok(book) => self.statuses_for(tenant, &book, &action, now).await.unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                Ok(SettleAnswer { reservation_id: id.to_owned(), state: r.state, idempotency_key: None, limits, degraded: false })
            }
            Ok(Err(r)) => Err(refusal(r)),
            Err(e) => Err(self.unavailable("release", &e)),
        }
    }

    /// The statuses of the limits an action touches.
    async fn statuses_for(&self, tenant: &str, book: &Book, action: &Action, now: DateTime<Utc>) -> Result<Vec<LimitStatus>, LimitsError> {
        let applied = book.applicable(&action.user_id, action.customer_id.as_deref());
        let (touched, counters) = touched_by(&applied, action, now);
        let balances = self.bounded(self.store.balances(tenant, &counters, now.timestamp_millis())).await?;
        Ok(touched.iter().zip(balances).map(|(i, b)| status(&applied[*i], b, now)).collect())
    }

    /// `GET /v1/users/{id}/limits` (with the customer's limits when
    /// `customer` is given) and `GET /v1/customers/{id}/limits`.
    pub async fn subject_limits(&self, tenant: &str, subject: &Subject, customer: Option<&str>) -> Result<SubjectLimits, ApiError> {
        crate::plan::check_id(&format!("{}_id", subject.scope.name()), &subject.id)?;
        let now = self.now();
        let (user, cust) = match subject.scope {
            crate::plan::Scope::User => (Some(subject.id.as_str()), customer),
            crate::plan::Scope::Customer => (None, Some(subject.id.as_str())),
        };
        let book = self.bounded(self.store.book(tenant, user, cust)).await.map_err(|e| self.unavailable("limits", &e))?;
        let (plan, mut applied) = book.of_subject(subject);
        if subject.scope == crate::plan::Scope::User && customer.is_some() {
            applied = book.applicable(&subject.id, customer);
        }
        let counters: Vec<String> = applied.iter().map(|a| a.counter(now).key).collect();
        let balances: Vec<Balance> =
            self.bounded(self.store.balances(tenant, &counters, now.timestamp_millis())).await.map_err(|e| self.unavailable("limits", &e))?;
        let subscription = match subject.scope {
            crate::plan::Scope::User => book.user.as_ref(),
            crate::plan::Scope::Customer => book.customer.as_ref(),
        }
        .map(|s| s.view());
        Ok(SubjectLimits {
            scope: subject.scope,
            id: subject.id.clone(),
            plan,
            subscription,
            limits: applied.iter().zip(balances).map(|(a, b)| status(a, b, now)).collect(),
        })
    }

    /// `GET /v1/limits/nearest`: the tenant's subjects whose current
    /// counters are the largest fraction of their limit; see [`crate::nearest`].
    pub async fn nearest(&self, tenant: &str, name: Option<&str>, limit: usize) -> Result<NearestAnswer, ApiError> {
        let now = self.now();
        let usage = self.bounded(self.store.usage(tenant)).await.map_err(|e| self.unavailable("nearest", &e))?;
        let book = crate::store::book_of(usage.plans, None, None).map_err(|e| self.unavailable("nearest", &e))?;
        let mut subscriptions = std::collections::BTreeMap::new();
        for (subject, view) in usage.subscriptions {
            // One bad record must not hide every other subject: it is skipped (and logged).
            match crate::subject::Subscription::from_view(&view) {
                Ok(sub) => {
                    subscriptions.insert(subject, sub);
                }
                Err(e) => tracing::warn!(%tenant, %subject, error = %e, "skipping a subscription that does not parse"),
            }
        }
        let ranked = crate::nearest::rank(&book.plans, &subscriptions, &usage.counters, name, limit, now);
        // Holds are read for the rows shown only: the ranking is by counted usage.
        let counters: Vec<String> = ranked.iter().map(|n| n.counter.clone()).collect();
        let balances = self.bounded(self.store.balances(tenant, &counters, now.timestamp_millis())).await.map_err(|e| self.unavailable("nearest", &e))?;
        let subjects = ranked
            .iter()
            .zip(balances)
            .map(|(n, b)| {
                let ratio = i64::try_from(n.ratio_nanos).unwrap_or(i64::MAX);
                NearestRow { ratio: meterline_schemas::Nanos(ratio).to_string(), status: status(&n.applied, Balance { used: n.used, reserved: b.reserved }, now) }
            })
            .collect();
        Ok(NearestAnswer { as_of: rfc3339_ms(now.timestamp_millis()), subjects })
    }

    /// Runs an admin store call, mapping a failure to `503`.
    pub async fn admin<T>(&self, what: &'static str, call: impl Future<Output = Result<T, LimitsError>>) -> Result<T, ApiError> {
        self.bounded(call).await.map_err(|e| self.unavailable(what, &e))
    }
}
