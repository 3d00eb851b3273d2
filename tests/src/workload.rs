//! A ground-truth workload: realistic events with retries, conflicting copies,
//! late events and a month boundary, and the totals they must produce,
//! computed here independently of the service code.

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Sums for one (user, minute window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_nanos: i64,
    pub revenue_nanos: i64,
    pub unpriced_events: u64,
}

/// Batches to post in order, and what they must add up to.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Originals with their copies (retries, conflicting copies) one to three
    /// batches after them: post in order, one at a time.
    pub batches: Vec<Vec<Value>>,
    /// The same events split for concurrent senders: every original first,
    /// then every copy. A copy must not overtake its original, or the
    /// conflicting copy would be the first and win.
    pub originals: Vec<Value>,
    pub copies: Vec<Value>,
    /// Keyed by (user_id, window start in Unix seconds).
    pub expected: BTreeMap<(String, i64), Totals>,
    pub unique_events: u64,
    pub retries: u64,
    pub conflicts: u64,
}

/// xorshift64*: deterministic and dependency-free.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// gpt-4o at $2.50 / $1.25 cached / $10 output per million tokens, rounded half up per event.
fn gpt4o_cost(input: u64, cached: u64, output: u64, reasoning: u64) -> i64 {
    let micro = i128::from(input) * 2_500_000_000 + i128::from(cached) * 1_250_000_000 + i128::from(output + reasoning) * 10_000_000_000;
    i64::try_from((micro + 500_000) / 1_000_000).expect("cost fits")
}

fn decimal(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

/// The traffic mix, in percent of actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Actions sent twice, as a client retry.
    pub retry_pct: u64,
    /// Actions followed by a copy with the same key and another payload.
    pub conflict_pct: u64,
    /// Events stamped 1 hour to 30 days in the past.
    pub late_pct: u64,
    /// One user (`user-runaway`) makes every twentieth call, each 100k+ tokens.
    pub runaway: bool,
}

impl Default for Mix {
    fn default() -> Self {
        Mix { retry_pct: 10, conflict_pct: 2, late_pct: 20, runaway: false }
    }
}

/// `actions` distinct AI actions over `users` users with the default [`Mix`];
/// see [`generate_with`].
pub fn generate(seed: u64, actions: usize, users: usize, batch_size: usize, now: DateTime<Utc>) -> Workload {
    generate_with(seed, actions, users, batch_size, now, Mix::default())
}

/// `actions` distinct AI actions over `users` users with a power-law spread
/// (user k weighs 1/(k+1)^1.2), each user in one of 20 customers, 3% unpriced
/// events, the mix's retries, conflicting copies and late events, and of the
/// rest 1 in 8 either side of the last month boundary. Credits convert at 0.001 USD.
pub fn generate_with(seed: u64, actions: usize, users: usize, batch_size: usize, now: DateTime<Utc>, mix: Mix) -> Workload {
    let mut rng = Rng::new(seed);
    let weights: Vec<f64> = (0..users).map(|k| 1.0 / ((k + 1) as f64).powf(1.2)).collect();
    let total: f64 = weights.iter().sum();
    let month_start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().expect("month start");
    let mut originals = Vec::with_capacity(actions);
    let mut expected: BTreeMap<(String, i64), Totals> = BTreeMap::new();
    for i in 0..actions {
        let mut pick = (rng.below(1_000_000) as f64 / 1_000_000.0) * total;
        let mut user = users - 1;
        for (k, w) in weights.iter().enumerate() {
            if pick < *w {
                user = k;
                break;
            }
            pick -= w;
        }
        let runaway = mix.runaway && i % 20 == 0;
        let customer = format!("cust-{}", user % 20);
        let user = if runaway { "user-runaway".to_owned() } else { format!("user-{user:04}") };
        let ts = if runaway {
            now - Duration::milliseconds(rng.below(600_000) as i64)
        } else if rng.chance(mix.late_pct) {
            now - Duration::seconds(3_600 + rng.below(30 * 86_400 - 7_200) as i64)
        } else {
            match rng.below(8) {
                0 => month_start - Duration::milliseconds(1 + rng.below(120_000) as i64),
                1 if month_start < now - Duration::minutes(3) => month_start + Duration::milliseconds(rng.below(120_000) as i64),
                _ => now - Duration::milliseconds(rng.below(600_000) as i64),
            }
        };
        let (mut input, cached, output, reasoning) = (rng.below(8_000), rng.below(2_000), rng.below(1_500), rng.below(300));
        if runaway {
            input += 100_000;
        }
        let feature = ["chat", "search", "summarize"][rng.below(3) as usize];
        let mut event = json!({
            "idempotency_key": format!("w{seed}-{i}"),
            "timestamp": ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "user_id": user,
            "customer_id": customer,
            "feature": feature,
            "input_tokens": input,
            "output_tokens": output,
            "cached_input_tokens": cached,
            "reasoning_tokens": reasoning,
        });
        let mut unpriced = 0;
        let cost = if runaway {
            event["model"] = json!("gpt-4o");
            gpt4o_cost(input, cached, output, reasoning)
        } else if rng.chance(3) {
            // No cost_usd and a model no catalog prices: counted, cost 0.
            event["model"] = json!("mystery-model");
            unpriced = 1;
            0
        } else if rng.chance(30) {
            event["model"] = json!("gpt-4o");
            gpt4o_cost(input, cached, output, reasoning)
        } else {
            let cost = rng.below(50_000_000) as i64;
            event["model"] = json!(["claude-x", "llama-y"][rng.below(2) as usize]);
            event["cost_usd"] = json!(decimal(cost));
            cost
        };
        let revenue = match rng.below(10) {
            0..=4 => {
                let r = rng.below(80_000_000) as i64;
                event["revenue_usd"] = json!(decimal(r));
                r
            }
            5..=7 => {
                let micro_credits = rng.below(50_000_000) as i64;
                event["credits"] = json!(format!("{}.{:06}", micro_credits / 1_000_000, micro_credits % 1_000_000));
                micro_credits
            }
            _ => 0,
        };
        let window = ts.timestamp().div_euclid(60) * 60;
        let t = expected.entry((user, window)).or_default();
        t.events += 1;
        t.input_tokens += input;
        t.output_tokens += output;
        t.cached_input_tokens += cached;
        t.reasoning_tokens += reasoning;
        t.cost_nanos += cost;
        t.revenue_nanos += revenue;
        t.unpriced_events += unpriced;
        originals.push(event);
    }
    // Batches of originals, with retries and conflicting copies posted after
    // their original was acked (one to three batches later).
    let mut batches: Vec<Vec<Value>> = originals.chunks(batch_size).map(<[Value]>::to_vec).collect();
    let mut copies = Vec::new();
    let (mut retries, mut conflicts) = (0, 0);
    let count = batches.len();
    for (i, original) in originals.iter().enumerate() {
        let target = (i / batch_size.max(1) + 1 + rng.below(3) as usize).min(count);
        if rng.chance(mix.retry_pct) {
            retries += 1;
            push(&mut batches, target, original.clone());
            copies.push(original.clone());
        }
        if rng.chance(mix.conflict_pct) {
            conflicts += 1;
            let mut changed = original.clone();
            changed["input_tokens"] = json!(changed["input_tokens"].as_u64().unwrap_or(0) + 1);
            changed["cost_usd"] = json!("0.5");
            changed.as_object_mut().map(|o| o.remove("credits"));
            push(&mut batches, target, changed.clone());
            copies.push(changed);
        }
    }
    Workload { batches, originals, copies, expected, unique_events: actions as u64, retries, conflicts }
}

fn push(batches: &mut Vec<Vec<Value>>, at: usize, event: Value) {
    if at >= batches.len() {
        batches.push(Vec::new());
    }
    batches[at].push(event);
}

/// The rollup totals ClickHouse holds for `tenant` in `database`.
pub async fn fetch_totals(ch: &crate::stack::ClickHouse, database: &str, tenant: &str) -> BTreeMap<(String, i64), Totals> {
    let sql = format!(
        "SELECT user_id, toUInt32(window_start) AS w, sum(events) AS e, sum(input_tokens) AS i, sum(output_tokens) AS o, \
         sum(cached_input_tokens) AS c, sum(reasoning_tokens) AS r, sum(cost_nanos) AS cost, sum(revenue_nanos) AS rev, sum(unpriced_events) AS u \
         FROM {database}.rollups_minute WHERE tenant = '{tenant}' GROUP BY user_id, w FORMAT JSONEachRow"
    );
    let num = |v: &Value| -> i64 {
        match v {
            Value::String(s) => s.parse().expect("number"),
            other => other.as_i64().expect("number"),
        }
    };
    ch.rows(&sql)
        .await
        .into_iter()
        .map(|r| {
            let key = (r["user_id"].as_str().expect("user").to_owned(), num(&r["w"]));
            let t = Totals {
                events: num(&r["e"]) as u64,
                input_tokens: num(&r["i"]) as u64,
                output_tokens: num(&r["o"]) as u64,
                cached_input_tokens: num(&r["c"]) as u64,
                reasoning_tokens: num(&r["r"]) as u64,
                cost_nanos: num(&r["cost"]),
                revenue_nanos: num(&r["rev"]),
                unpriced_events: num(&r["u"]) as u64,
            };
            (key, t)
        })
        .collect()
}

/// Sum of events over all windows.
pub fn event_count(totals: &BTreeMap<(String, i64), Totals>) -> u64 {
    totals.values().map(|t| t.events).sum()
}

/// Waits (up to two minutes) until ClickHouse's rollups (minute, per-user
/// span and day, day by dimension) hold `want` events for each (tenant, count).
pub async fn wait_rolled_up(ch: &crate::stack::ClickHouse, database: &str, want: &[(&str, u64)]) {
    crate::poll_until(std::time::Duration::from_secs(120), "every event rolled up in ClickHouse", || async {
        if !ch.migrated(database).await {
            return None;
        }
        for (tenant, n) in want {
            if event_count(&fetch_totals(ch, database, tenant).await) != *n {
                return None;
            }
            // A flush writes the per-user spans and days and the days by
            // dimension, then the minute rollup: queries read them all.
            for table in ["rollups_user_span WHERE span_days = 1 AND", "rollups_user_daily WHERE", "rollups_daily_by_dims WHERE"] {
                let got = ch.query(&format!("SELECT sum(events) FROM {database}.{table} tenant = '{tenant}'")).await;
                if got.trim().parse::<u64>().ok() != Some(*n) {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;
}
