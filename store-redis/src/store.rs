//! `LimitStore` over Redis: plans and subscriptions as hashes, and each reservation step one script.

use meterline_limits::{
    Admission, Admit, Admitted, Balance, Book, Hold, KEEP_AFTER_EXPIRY_MS, LimitStore, LimitsError, PlanView, Refusal, Reservation, Subject,
    SubscriptionView, Usage, book_of,
};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

use crate::client::{ADMIT, BALANCES, COMMIT, RELEASE, RedisLimits};
use crate::keys::{self, prefix};
use crate::record::{self, check_counter, hold_args};

type Result<T> = std::result::Result<T, LimitsError>;

pub(crate) fn json<T: DeserializeOwned>(key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| LimitsError::Corrupt { key: key.to_owned(), message: e.to_string() })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Plain structs of strings and enums: serializing them cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn int(key: &str, text: &str) -> Result<i64> {
    text.parse().map_err(|e| LimitsError::Corrupt { key: key.to_owned(), message: format!("not an integer: {e}") })
}

/// `used, held` pairs as scripts answer them.
fn balances(tenant: &str, flat: &[String]) -> Result<Vec<Balance>> {
    let key = keys::key(tenant, "u:/h:");
    flat.chunks(2)
        .map(|pair| match pair {
            [used, held] => Ok(Balance { used: int(&key, used)?, reserved: int(&key, held)? }),
            _ => Err(LimitsError::Corrupt { key: key.clone(), message: "odd balance list".into() }),
        })
        .collect()
}

fn refusal(reason: &[String]) -> Result<Refusal> {
    Ok(match reason.first().map(String::as_str) {
        Some("not_found") => Refusal::NotFound,
        Some("released") => Refusal::Released,
        Some("committed") => Refusal::Committed,
        Some("different_usage") => Refusal::DifferentUsage,
        other => return Err(LimitsError::Corrupt { key: "script answer".into(), message: format!("unknown refusal {other:?}") }),
    })
}

/// A commit's or a release's script answer.
fn settled(tenant: &str, key: &str, (kind, body): (String, Vec<String>)) -> Result<std::result::Result<Reservation, Refusal>> {
    match kind.as_str() {
        "ok" => Ok(Ok(record::parse(&keys::key(tenant, &format!("r:{key}")), body)?)),
        _ => Ok(Err(refusal(&body)?)),
    }
}

/// A stored record's fields as a reservation, if it is the one `id` names.
fn found(key: &str, id: &str, flat: Vec<String>) -> Result<Option<Reservation>> {
    if flat.is_empty() {
        return Ok(None);
    }
    let r = record::parse(key, flat)?;
    // Same nonce, another action: not this reservation.
    Ok((r.id == id).then_some(r))
}

/// The reads a book needs (the plans, and the two subscriptions), queued on a pipeline.
struct BookReads {
    plans_key: String,
    subs_key: String,
    fields: [String; 2],
    wanted: [bool; 2],
}

impl BookReads {
    fn new(tenant: &str, user: Option<&str>, customer: Option<&str>) -> BookReads {
        let customer = customer.filter(|c| !c.is_empty());
        BookReads {
            plans_key: keys::key(tenant, "plans"),
            subs_key: keys::key(tenant, "subs"),
            fields: [user.map(|u| Subject::user(u).key()).unwrap_or_default(), customer.map(|c| Subject::customer(c).key()).unwrap_or_default()],
            wanted: [user.is_some(), customer.is_some()],
        }
    }

    fn queue(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("HGETALL").arg(&self.plans_key).cmd("HMGET").arg(&self.subs_key).arg(&self.fields[..]);
    }

    fn book(&self, plans: BTreeMap<String, String>, subs: Vec<Option<String>>) -> Result<Book> {
        let plans = plans.into_iter().map(|(id, text)| json(&format!("{} {id}", self.plans_key), &text)).collect::<Result<Vec<PlanView>>>()?;
        let sub = |i: usize| -> Result<Option<SubscriptionView>> {
            match subs.get(i).cloned().flatten() {
                Some(text) if self.wanted[i] => json(&format!("{} {}", self.subs_key, self.fields[i]), &text).map(Some),
                _ => Ok(None),
            }
        };
        book_of(plans, sub(0)?, sub(1)?)
    }
}

impl LimitStore for RedisLimits {
    async fn put_plan(&self, tenant: &str, plan: &PlanView) -> Result<()> {
        self.query(redis::cmd("HSET").arg(keys::key(tenant, "plans")).arg(&plan.plan_id).arg(to_json(plan))).await
    }

    async fn plans(&self, tenant: &str) -> Result<Vec<PlanView>> {
        let key = keys::key(tenant, "plans");
        let all: BTreeMap<String, String> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
        all.into_iter().map(|(id, text)| json(&format!("{key} {id}"), &text)).collect()
    }

    async fn delete_plan(&self, tenant: &str, plan_id: &str) -> Result<bool> {
        let n: i64 = self.query(redis::cmd("HDEL").arg(keys::key(tenant, "plans")).arg(plan_id)).await?;
        Ok(n > 0)
    }

    async fn put_subscription(&self, tenant: &str, subject: &Subject, sub: &SubscriptionView) -> Result<()> {
        self.query(redis::cmd("HSET").arg(keys::key(tenant, "subs")).arg(subject.key()).arg(to_json(sub))).await
    }

    async fn subscription(&self, tenant: &str, subject: &Subject) -> Result<Option<SubscriptionView>> {
        let key = keys::key(tenant, "subs");
        let text: Option<String> = self.query(redis::cmd("HGET").arg(&key).arg(subject.key())).await?;
        text.map(|t| json(&format!("{key} {}", subject.key()), &t)).transpose()
    }

    async fn delete_subscription(&self, tenant: &str, subject: &Subject) -> Result<bool> {
        let n: i64 = self.query(redis::cmd("HDEL").arg(keys::key(tenant, "subs")).arg(subject.key())).await?;
        Ok(n > 0)
    }

    /// Plans and both subscriptions in one round trip: every reservation
    /// reads them.
    async fn book(&self, tenant: &str, user: Option<&str>, customer: Option<&str>) -> Result<Book> {
        let mut pipe = redis::pipe();
        let reads = BookReads::new(tenant, user, customer);
        reads.queue(&mut pipe);
        let (plans, subs): (BTreeMap<String, String>, Vec<Option<String>>) = self.pipeline(&pipe).await?;
        reads.book(plans, subs)
    }

    /// The reservation with the book, in one round trip: every commit reads both.
    async fn reservation_and_book(&self, tenant: &str, id: &str, user: &str, customer: Option<&str>) -> Result<(Option<Reservation>, Book)> {
        let rkey = keys::key(tenant, &format!("r:{}", keys::reservation(id)));
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&rkey);
        let reads = BookReads::new(tenant, Some(user), customer);
        reads.queue(&mut pipe);
        let (flat, plans, subs): (Vec<String>, BTreeMap<String, String>, Vec<Option<String>>) = self.pipeline(&pipe).await?;
        Ok((found(&rkey, id, flat)?, reads.book(plans, subs)?))
    }

    /// The counters by `SCAN` and `MGET` (as reconciliation reads them:
    /// never blocking Redis), then plans and subscriptions. Not one
    /// snapshot: a plan changed meanwhile at worst leaves a counter
    /// unmatched for this answer.
    async fn usage(&self, tenant: &str) -> Result<Usage> {
        let counters = self.counters(tenant).await?;
        let plans = self.plans(tenant).await?;
        let subscriptions = self.all_subscriptions(tenant).await?;
        Ok(Usage { plans, subscriptions, counters })
    }

    async fn balances(&self, tenant: &str, counters: &[String], now_ms: i64) -> Result<Vec<Balance>> {
        if counters.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![prefix(tenant), now_ms.to_string()];
        args.extend(counters.iter().cloned());
        let flat: Vec<String> = self.script(&BALANCES, &keys::key(tenant, "exp"), &args).await?;
        balances(tenant, &flat)
    }

    async fn admit(&self, tenant: &str, admit: &Admit) -> Result<Admission> {
        let r = &admit.reservation;
        let key = keys::reservation(&r.id);
        let kept_until = r.expires_at_ms.saturating_add(KEEP_AFTER_EXPIRY_MS);
        let mut args = vec![
            prefix(tenant),
            admit.now_ms.to_string(),
            key.to_owned(),
            admit.idempotency_key.clone().unwrap_or_default(),
            r.id.clone(),
            r.created_at_ms.to_string(),
            r.expires_at_ms.to_string(),
            kept_until.to_string(),
            admit.checks.len().to_string(),
        ];
        for c in &admit.checks {
            check_counter(&c.counter.key)?;
            args.extend([c.counter.key.clone(), c.amount.to_string(), c.limit.to_string(), if c.hard { "1" } else { "0" }.to_owned()]);
        }
        args.extend(hold_args(&r.holds)?);
        let (decision, flat, rest): (String, Vec<String>, Vec<String>) = self.script(&ADMIT, &keys::key(tenant, "exp"), &args).await?;
        let balances = balances(tenant, &flat)?;
        let admitted = match decision.as_str() {
            "new" => Admitted::New,
            "denied" => Admitted::Denied(
                rest.iter()
                    .map(|i| i.parse().map_err(|_| LimitsError::Corrupt { key: "admit answer".into(), message: format!("check index {i:?}") }))
                    .collect::<Result<_>>()?,
            ),
            _ => {
                let existing = rest.chunks(2).find(|p| p[0] == "id").map(|p| p[1].clone()).unwrap_or_default();
                Admitted::Existing(record::parse(&keys::key(tenant, &format!("r:{}", keys::reservation(&existing))), rest)?)
            }
        };
        Ok(Admission { admitted, balances })
    }

    async fn reservation(&self, tenant: &str, id: &str) -> Result<Option<Reservation>> {
        let key = keys::key(tenant, &format!("r:{}", keys::reservation(id)));
        let flat: Vec<String> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
        found(&key, id, flat)
    }

    async fn commit(&self, tenant: &str, id: &str, holds: &[Hold], fingerprint: &str, now_ms: i64) -> Result<std::result::Result<Reservation, Refusal>> {
        Ok(self.commit_and_balances(tenant, id, holds, fingerprint, now_ms, &[]).await?.0)
    }

    /// One script: the commit, and then its counters' balances.
    async fn commit_and_balances(
        &self,
        tenant: &str,
        id: &str,
        holds: &[Hold],
        fingerprint: &str,
        now_ms: i64,
        counters: &[String],
    ) -> Result<(std::result::Result<Reservation, Refusal>, Vec<Balance>)> {
        let key = keys::reservation(id);
        let mut args = vec![prefix(tenant), now_ms.to_string(), key.to_owned(), id.to_owned(), fingerprint.to_owned()];
        args.extend(hold_args(holds)?);
        args.extend(counters.iter().cloned());
        let (kind, body, flat): (String, Vec<String>, Vec<String>) = self.script(&COMMIT, &keys::key(tenant, "exp"), &args).await?;
        Ok((settled(tenant, key, (kind, body))?, balances(tenant, &flat)?))
    }

    async fn release(&self, tenant: &str, id: &str, now_ms: i64) -> Result<std::result::Result<Reservation, Refusal>> {
        let key = keys::reservation(id);
        let args = [prefix(tenant), now_ms.to_string(), key.to_owned(), id.to_owned()];
        settled(tenant, key, self.script(&RELEASE, &keys::key(tenant, "exp"), &args).await?)
    }
}
