//! `--demo`: a synthetic workload posted to the server's own HTTP API (so it
//! goes through the same auth, validation, dedupe and rollups as real
//! traffic): a week of history, then a live stream with power-law users,
//! several features and models, client retries, and one runaway user.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::{Value, json};

/// A small deterministic generator (splitmix64): the demo needs variety, not secrecy.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a, T>(&mut self, weighted: &'a [(T, f64)]) -> &'a T {
        let total: f64 = weighted.iter().map(|(_, w)| w).sum();
        let mut x = self.unit() * total;
        for (v, w) in weighted {
            if x < *w {
                return v;
            }
            x -= w;
        }
        &weighted[weighted.len() - 1].0
    }
}

const USERS: usize = 300;
const FEATURES: &[(&str, f64)] = &[("chat", 0.5), ("search", 0.2), ("summarize", 0.15), ("code-review", 0.1), ("agent", 0.05)];
/// The week of history uses dearer models than the live stream, so that
/// ordinary users' live spend stays within ten times their own hourly
/// average and only the runaway user stands out at first.
const HISTORY_MODELS: &[(&str, f64)] = &[("gpt-4o-mini", 0.6), ("gpt-4o", 0.25), ("claude-sonnet-4-5", 0.15)];
const LIVE_MODELS: &[(&str, f64)] = &[("gpt-4o-mini", 0.85), ("gpt-4o", 0.1), ("claude-sonnet-4-5", 0.05)];
pub const RUNAWAY_USER: &str = "user-runaway";

/// The workload generator.
#[derive(Debug)]
pub struct Workload {
    rng: Rng,
    /// Zipf weights: user i has weight 1 / i^1.2, so the top user makes ~100x the median's calls.
    users: Vec<(usize, f64)>,
    run: String,
    seq: u64,
    seq_live: u64,
}

impl Workload {
    pub fn new(seed: u64) -> Workload {
        let users = (1..=USERS).map(|i| (i, 1.0 / (i as f64).powf(1.2))).collect();
        Workload { rng: Rng(seed), users, run: format!("{seed:x}"), seq: 0, seq_live: 0 }
    }

    fn event(&mut self, at: DateTime<Utc>, runaway: bool, models: &[(&'static str, f64)]) -> Value {
        self.seq += 1;
        let (user, customer, feature, model, input, output) = if runaway {
            (RUNAWAY_USER.to_owned(), "cust-07".to_owned(), "agent", "claude-sonnet-4-5", 100_000 + self.rng.below(50_000), 4_000 + self.rng.below(8_000))
        } else {
            let i = *self.rng.pick(&self.users);
            let input = 200 + self.rng.below(3_000);
            (format!("user-{i:03}"), format!("cust-{:02}", i % 25 + 1), *self.rng.pick(FEATURES), *self.rng.pick(models), input, 50 + self.rng.below(900))
        };
        let cached = if self.rng.below(4) == 0 { input / 2 } else { 0 };
        // Revenue in credits (0.001 USD each in the dev config): one credit
        // per 250 tokens, flat across models, so the cheap model earns money
        // and the dear ones about break even or lose it; the runaway user is
        // on a flat plan (20 credits a call) and loses money fast.
        let credits = if runaway { 20 } else { (input + output) / 250 };
        json!({
            "idempotency_key": format!("demo-{}-{}", self.run, self.seq),
            "timestamp": at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "user_id": user,
            "customer_id": customer,
            "feature": feature,
            "model": model,
            "input_tokens": input,
            "output_tokens": output,
            "cached_input_tokens": cached,
            "credits": credits.to_string(),
        })
    }

    /// `n` events spread over the week before `now`, without the runaway user.
    pub fn history(&mut self, now: DateTime<Utc>, n: usize) -> Vec<Value> {
        (0..n)
            .map(|_| {
                let ago = Duration::seconds(3_600 + i64::try_from(self.rng.below(7 * 86_400 - 7_200)).unwrap_or(0));
                self.event(now - ago, false, HISTORY_MODELS)
            })
            .collect()
    }

    /// `n` events at `now`, one in ten from the runaway user.
    pub fn live(&mut self, now: DateTime<Utc>, n: usize) -> Vec<Value> {
        (0..n)
            .map(|_| {
                self.seq_live += 1;
                self.event(now, self.seq_live.is_multiple_of(10), LIVE_MODELS)
            })
            .collect()
    }
}

/// Posts the workload to `base` until the process stops: a week of history
/// first, then `rate` events per second. Every 50th batch is sent twice, as
/// a client retry would; the second copy is dropped by dedupe.
pub async fn run(base: String, ingest_key: String, read_key: Option<String>, rate: usize) {
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/events");
    let post = |batch: Vec<Value>| {
        let client = client.clone();
        let url = url.clone();
        let key = ingest_key.clone();
        async move {
            for attempt in 0..10u32 {
                match client.post(&url).bearer_auth(&key).json(&batch).send().await {
                    Ok(r) if r.status().is_success() => return true,
                    Ok(r) => tracing::warn!(status = %r.status(), attempt, "demo batch refused"),
                    Err(e) => tracing::warn!(error = %e, attempt, "demo batch failed"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(200 << attempt.min(5))).await;
            }
            false
        }
    };
    let seed = u64::try_from(Utc::now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(7);
    let mut work = Workload::new(seed);
    let now = Utc::now();
    for _ in 0..20 {
        post(work.history(now, 1_000)).await;
    }
    let read = read_key.as_deref().unwrap_or("$METERLINE_READ_KEY");
    eprintln!(
        "\ndemo: a week of history is in; now streaming {rate} events/s with a runaway user ({RUNAWAY_USER}). Try:\n  \
         curl -s -H 'Authorization: Bearer {read}' '{base}/v1/top-spenders?limit=5'\n  \
         curl -s -H 'Authorization: Bearer {read}' '{base}/v1/margins?negative_only=true&limit=5'\n  \
         curl -s -H 'Authorization: Bearer {read}' '{base}/v1/alerts'\n"
    );
    let per_tick = (rate / 4).max(1);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut batches = 0u64;
    loop {
        tick.tick().await;
        let batch = work.live(Utc::now(), per_tick);
        batches += 1;
        if batches.is_multiple_of(50) {
            post(batch.clone()).await;
        }
        post(batch).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_law_users_and_a_runaway() {
        let mut w = Workload::new(42);
        let events = w.live(Utc::now(), 20_000);
        let count = |u: &str| events.iter().filter(|e| e["user_id"] == u).count();
        assert!(count("user-001") > 50 * count("user-150").max(1), "the top user dwarfs the median");
        assert_eq!(count(RUNAWAY_USER), 2_000);
        let keys: std::collections::HashSet<_> = events.iter().map(|e| e["idempotency_key"].as_str().unwrap_or_default().to_owned()).collect();
        assert_eq!(keys.len(), events.len(), "every action has its own key");
        let now = Utc::now();
        for e in w.history(now, 1_000) {
            let t = DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
            assert!(t < now - Duration::minutes(59) && t > now - Duration::days(7));
        }
    }
}
