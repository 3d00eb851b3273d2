//! The Stripe Billing Meter Events client: one form-encoded POST per event,
//! bearer secret key, retried with backoff on `429`, `5xx` and network errors.

use std::time::Duration;

use crate::error::BillingError;

/// One meter event as Stripe takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    pub event_name: String,
    pub stripe_customer_id: String,
    pub value: i64,
    pub identifier: String,
    pub timestamp: i64,
}

impl MeterEvent {
    /// The `application/x-www-form-urlencoded` body.
    pub fn form(&self) -> String {
        let value = self.value.to_string();
        let timestamp = self.timestamp.to_string();
        [
            ("event_name", self.event_name.as_str()),
            ("payload[stripe_customer_id]", self.stripe_customer_id.as_str()),
            ("payload[value]", value.as_str()),
            ("identifier", self.identifier.as_str()),
            ("timestamp", timestamp.as_str()),
        ]
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
    }
}

/// Form encoding: unreserved bytes as they are, space as `+`, the rest `%XX`.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What Stripe made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Stripe already has an event with this identifier: it was taken before.
    Duplicate,
    /// Refused for good (bad customer, meter, timestamp): the message says why.
    Refused(String),
}

/// The secret key; its `Debug` never shows it.
struct SecretKey(String);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A client for one Stripe account.
#[derive(Debug)]
pub struct StripeClient {
    http: reqwest::Client,
    url: String,
    key: SecretKey,
    max_attempts: u32,
    backoff: Duration,
}

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl StripeClient {
    pub fn new(base_url: &str, secret_key: String, timeout: Duration, max_attempts: u32, backoff: Duration) -> Result<StripeClient, BillingError> {
        let http = reqwest::Client::builder().timeout(timeout).build().map_err(|e| BillingError::Config { key: "billing".into(), message: e.to_string() })?;
        let url = format!("{}/v1/billing/meter_events", base_url.trim_end_matches('/'));
        Ok(StripeClient { http, url, key: SecretKey(secret_key), max_attempts: max_attempts.max(1), backoff })
    }

    /// Sends `event`, retrying what may pass later; `Unavailable` once the
    /// attempts are spent.
    pub async fn send(&self, event: &MeterEvent) -> Result<Outcome, BillingError> {
        let mut delay = self.backoff;
        let mut last = String::new();
        for attempt in 1..=self.max_attempts {
            match self.attempt(event).await {
                Ok(Some(outcome)) => return Ok(outcome),
                Ok(None) => last = "Stripe answered 429 or 5xx".into(),
                Err(e) => last = e,
            }
            if attempt < self.max_attempts {
                tracing::debug!(attempt, identifier = %event.identifier, "retrying a meter event: {last}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
        Err(BillingError::Unavailable(last))
    }

    /// One request: `None` when it is worth retrying.
    async fn attempt(&self, event: &MeterEvent) -> Result<Option<Outcome>, String> {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.key.0)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(event.form())
            .send()
            .await
            .map_err(|e| format!("request failed: {}", e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Some(Outcome::Accepted));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Ok(None);
        }
        let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
        Ok(Some(classify(status.as_u16(), &body)))
    }
}

/// A 4xx answer: a duplicate identifier (taken before) or a refusal.
pub fn classify(status: u16, body: &serde_json::Value) -> Outcome {
    let error = &body["error"];
    let message = error["message"].as_str().unwrap_or("").to_owned();
    let duplicate = error["code"] == "resource_already_exists" || (error["param"] == "identifier" && message.contains("already"));
    if duplicate {
        Outcome::Duplicate
    } else {
        Outcome::Refused(format!("{status}: {}", if message.is_empty() { "no message" } else { &message }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_body_is_encoded() {
        let e = MeterEvent { event_name: "ai cost&x".into(), stripe_customer_id: "cus_1".into(), value: 42, identifier: "ml_ab".into(), timestamp: 3_600 };
        assert_eq!(e.form(), "event_name=ai+cost%26x&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=42&identifier=ml_ab&timestamp=3600");
    }

    #[test]
    fn duplicates_are_told_from_refusals() {
        let dup = serde_json::json!({"error": {"code": "resource_already_exists", "param": "identifier", "message": "exists"}});
        assert_eq!(classify(400, &dup), Outcome::Duplicate);
        let old = serde_json::json!({"error": {"param": "timestamp", "message": "too old"}});
        assert_eq!(classify(400, &old), Outcome::Refused("400: too old".into()));
    }

    #[test]
    fn the_key_is_never_shown() {
        let c = StripeClient::new("http://127.0.0.1:9", "sk_test_secret".into(), Duration::from_secs(1), 1, Duration::from_millis(1)).expect("client");
        assert!(!format!("{c:?}").contains("sk_test_secret"));
    }
}
