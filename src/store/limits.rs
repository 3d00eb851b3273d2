//! The limits store of the all-in-one binary: [`LimitStore`] over the
//! embedded database. Every change runs in the writer's group commit
//! (durable before the answer); reads use the read connections.

use meterline_limits::{Admission, Admit, Balance, Hold, LimitStore, LimitsError, PlanView, Refusal, Reservation, Subject, SubscriptionView, Usage};
use rusqlite::{OptionalExtension, params};
use std::sync::Arc;

use super::{Embedded, ledger};
use crate::EmbeddedError;

/// Plans, subscriptions, counters, holds and reservations in the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedLimits(pub Arc<Embedded>);

type Result<T> = std::result::Result<T, LimitsError>;

fn json<T: serde::Serialize>(what: &str, value: &T) -> std::result::Result<String, EmbeddedError> {
    serde_json::to_string(value).map_err(|e| EmbeddedError::corrupt(what, e))
}

impl LimitStore for EmbeddedLimits {
    async fn put_plan(&self, tenant: &str, plan: &PlanView) -> Result<()> {
        let (tenant, plan_id, body) = (tenant.to_owned(), plan.plan_id.clone(), json("plan", plan)?);
        let stored = self.0.transact(move |conn| {
            conn.prepare_cached("INSERT INTO limit_plans (tenant, plan_id, body) VALUES (?1, ?2, ?3) ON CONFLICT (tenant, plan_id) DO UPDATE SET body = excluded.body")?
                .execute(params![tenant, plan_id, body])?;
            Ok(())
        });
        Ok(stored.await?)
    }

    async fn plans(&self, tenant: &str) -> Result<Vec<PlanView>> {
        let t = tenant.to_owned();
        let rows: Vec<(String, String)> = self
            .0
            .read(move |conn| {
                conn.prepare_cached("SELECT plan_id, body FROM limit_plans WHERE tenant = ?1 ORDER BY plan_id")?
                    .query_map(params![t], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .await?;
        rows.into_iter()
            .map(|(plan_id, body)| serde_json::from_str(&body).map_err(|e| LimitsError::Corrupt { key: format!("plan {plan_id}"), message: e.to_string() }))
            .collect()
    }

    async fn delete_plan(&self, tenant: &str, plan_id: &str) -> Result<bool> {
        let (tenant, plan_id) = (tenant.to_owned(), plan_id.to_owned());
        let deleted = self.0.transact(move |conn| {
            let n = conn.prepare_cached("DELETE FROM limit_plans WHERE tenant = ?1 AND plan_id = ?2")?.execute(params![tenant, plan_id])?;
            Ok(n > 0)
        });
        Ok(deleted.await?)
    }

    async fn put_subscription(&self, tenant: &str, subject: &Subject, sub: &SubscriptionView) -> Result<()> {
        let (tenant, key, body) = (tenant.to_owned(), subject.key(), json("subscription", sub)?);
        let stored = self.0.transact(move |conn| {
            conn.prepare_cached(
                "INSERT INTO limit_subscriptions (tenant, subject, body) VALUES (?1, ?2, ?3) ON CONFLICT (tenant, subject) DO UPDATE SET body = excluded.body",
            )?
            .execute(params![tenant, key, body])?;
            Ok(())
        });
        Ok(stored.await?)
    }

    async fn subscription(&self, tenant: &str, subject: &Subject) -> Result<Option<SubscriptionView>> {
        let (t, key) = (tenant.to_owned(), subject.key());
        let body: Option<String> = self
            .0
            .read(move |conn| {
                conn.prepare_cached("SELECT body FROM limit_subscriptions WHERE tenant = ?1 AND subject = ?2")?.query_row(params![t, key], |r| r.get(0)).optional()
            })
            .await?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| LimitsError::Corrupt { key: format!("subscription of {}", subject.key()), message: e.to_string() }))
            .transpose()
    }

    async fn delete_subscription(&self, tenant: &str, subject: &Subject) -> Result<bool> {
        let (tenant, key) = (tenant.to_owned(), subject.key());
        let deleted = self.0.transact(move |conn| {
            let n = conn.prepare_cached("DELETE FROM limit_subscriptions WHERE tenant = ?1 AND subject = ?2")?.execute(params![tenant, key])?;
            Ok(n > 0)
        });
        Ok(deleted.await?)
    }

    /// Plans, subscriptions and counters in one read transaction: a
    /// consistent snapshot, so a counter never names a plan read later.
    async fn usage(&self, tenant: &str) -> Result<Usage> {
        let t = tenant.to_owned();
        type Rows = (Vec<(String, String)>, Vec<(String, String)>, Vec<(String, i64)>);
        let (plans, subs, counters): Rows = self
            .0
            .read(move |conn| {
                let tx = conn.unchecked_transaction()?;
                let plans = tx.prepare_cached("SELECT plan_id, body FROM limit_plans WHERE tenant = ?1 ORDER BY plan_id")?.query_map(params![t], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
                let subs = tx.prepare_cached("SELECT subject, body FROM limit_subscriptions WHERE tenant = ?1")?.query_map(params![t], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
                let counters = tx.prepare_cached("SELECT counter, used FROM limit_counters WHERE tenant = ?1")?.query_map(params![t], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
                Ok((plans, subs, counters))
            })
            .await?;
        let corrupt = |what: String, e: serde_json::Error| LimitsError::Corrupt { key: what, message: e.to_string() };
        let plans = plans.into_iter().map(|(id, body)| serde_json::from_str(&body).map_err(|e| corrupt(format!("plan {id}"), e))).collect::<Result<Vec<PlanView>>>()?;
        let subscriptions = subs
            .into_iter()
            .map(|(subject, body)| serde_json::from_str(&body).map(|v| (subject.clone(), v)).map_err(|e| corrupt(format!("subscription of {subject}"), e)))
            .collect::<Result<_>>()?;
        Ok(Usage { plans, subscriptions, counters })
    }

    async fn balances(&self, tenant: &str, counters: &[String], now_ms: i64) -> Result<Vec<Balance>> {
        let (tenant, counters) = (tenant.to_owned(), counters.to_vec());
        Ok(self.0.read(move |conn| ledger::balances(conn, &tenant, &counters, now_ms)).await?)
    }

    async fn admit(&self, tenant: &str, admit: &Admit) -> Result<Admission> {
        let (tenant, admit) = (tenant.to_owned(), admit.clone());
        Ok(self.0.transact(move |conn| ledger::admit(conn, &tenant, &admit)).await?)
    }

    async fn reservation(&self, tenant: &str, id: &str) -> Result<Option<Reservation>> {
        let (t, key) = (tenant.to_owned(), ledger::record_key(id).to_owned());
        let record: Option<String> = self
            .0
            .read(move |conn| conn.prepare_cached("SELECT record FROM limit_reservations WHERE tenant = ?1 AND key = ?2")?.query_row(params![t, key], |r| r.get(0)).optional())
            .await?;
        let parsed: Option<Reservation> = record
            .map(|r| serde_json::from_str(&r).map_err(|e| LimitsError::Corrupt { key: format!("reservation {}", ledger::record_key(id)), message: e.to_string() }))
            .transpose()?;
        Ok(parsed.filter(|r| r.id == id))
    }

    async fn commit(&self, tenant: &str, id: &str, holds: &[Hold], fingerprint: &str, now_ms: i64) -> Result<std::result::Result<Reservation, Refusal>> {
        let (tenant, id, holds, fingerprint) = (tenant.to_owned(), id.to_owned(), holds.to_vec(), fingerprint.to_owned());
        Ok(self.0.transact(move |conn| ledger::commit(conn, &tenant, &id, holds, &fingerprint, now_ms)).await?)
    }

    async fn release(&self, tenant: &str, id: &str, now_ms: i64) -> Result<std::result::Result<Reservation, Refusal>> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        Ok(self.0.transact(move |conn| ledger::release(conn, &tenant, &id, now_ms)).await?)
    }
}
