//! The load generator's source of events: the workload made on demand from a seed, batch by batch, with its retries and conflicting copies held back until their originals were answered, and the ground truth summed as it goes.

use chrono::{DateTime, Datelike, Duration as Span, TimeZone, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use super::{LoadOptions, UserTruth};
use crate::workload::{self, Rng};

/// A retry or conflicting copy waiting for its original's answer: a client
/// never retries before its first attempt was answered, and a conflicting
/// copy that overtook its original would be the one that wins.
#[derive(Debug)]
struct Copy {
    /// The batch holding the original.
    origin: u64,
    /// Sent no earlier than this batch (one to three batches after the original).
    not_before: u64,
    event: Value,
}

/// The workload, made on demand: the same per-action shape as
/// `workload::generate_with` (kept separate so that other tests' fixed
/// workloads do not change), with the ground truth summed as it goes.
#[derive(Debug)]
pub(super) struct Source {
    rng: Rng,
    seed: u64,
    actions: usize,
    mix: workload::Mix,
    /// Cumulative Zipf weights (user k weighs 1/(k+1)^1.2), searched in
    /// O(log users) per event.
    cumulative: Vec<f64>,
    month_start: DateTime<Utc>,
    pub(super) next_action: usize,
    next_batch: u64,
    in_flight: HashSet<u64>,
    pending: VecDeque<Copy>,
    pub(super) retries: u64,
    pub(super) conflicts: u64,
    truth: HashMap<String, UserTruth>,
    total: UserTruth,
}

impl Source {
    pub(super) fn new(o: &LoadOptions, now: DateTime<Utc>) -> Source {
        let mut sum = 0.0;
        let cumulative = (0..o.users.max(1))
            .map(|k| {
                sum += 1.0 / ((k + 1) as f64).powf(1.2);
                sum
            })
            .collect();
        // The first of the month at the start; a run that crosses into the
        // next month still sends valid (older) events around it.
        let month_start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().unwrap_or(now);
        Source {
            rng: Rng::new(o.seed),
            seed: o.seed,
            actions: o.actions,
            mix: o.mix,
            cumulative,
            month_start,
            next_action: 0,
            next_batch: 0,
            in_flight: HashSet::new(),
            pending: VecDeque::new(),
            retries: 0,
            conflicts: 0,
            truth: HashMap::new(),
            total: UserTruth::default(),
        }
    }

    fn exhausted(&self) -> bool {
        self.next_action >= self.actions
    }

    pub(super) fn has_more(&self) -> bool {
        !self.exhausted() || !self.pending.is_empty()
    }

    fn sendable(&self, c: &Copy, batch: u64) -> bool {
        // Once no original is left, batches stop counting: only the answer matters.
        !self.in_flight.contains(&c.origin) && (self.exhausted() || c.not_before <= batch)
    }

    pub(super) fn can_build(&self) -> bool {
        !self.exhausted() || self.pending.iter().any(|c| self.sendable(c, self.next_batch))
    }

    pub(super) fn answered(&mut self, batch: u64) {
        self.in_flight.remove(&batch);
    }

    /// The next batch: due copies first, then new actions, at most `size` events.
    pub(super) fn build(&mut self, size: usize, now: DateTime<Utc>) -> (u64, Vec<Value>) {
        let id = self.next_batch;
        self.next_batch += 1;
        let mut events = Vec::with_capacity(size);
        let mut i = 0;
        while i < self.pending.len() && events.len() < size {
            if self.sendable(&self.pending[i], id) {
                events.extend(self.pending.remove(i).map(|c| c.event));
            } else {
                i += 1;
            }
        }
        while events.len() < size && !self.exhausted() {
            events.push(self.action(id, now));
        }
        self.in_flight.insert(id);
        (id, events)
    }

    /// One action in batch `batch`, its copies queued, its sums added to the truth.
    fn action(&mut self, batch: u64, now: DateTime<Utc>) -> Value {
        let i = self.next_action;
        self.next_action += 1;
        let (rng, mix) = (&mut self.rng, self.mix);
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let pick = (rng.below(1_000_000) as f64 / 1_000_000.0) * total;
        let user = self.cumulative.partition_point(|c| *c <= pick).min(self.cumulative.len() - 1);
        let runaway = mix.runaway && i.is_multiple_of(20);
        let customer = format!("cust-{}", user % 20);
        let user = if runaway { "user-runaway".to_owned() } else { format!("user-{user:04}") };
        let ts = if runaway {
            now - Span::milliseconds(rng.below(600_000) as i64)
        } else if rng.chance(mix.late_pct) {
            now - Span::seconds(3_600 + rng.below(30 * 86_400 - 7_200) as i64)
        } else {
            match rng.below(8) {
                0 => self.month_start - Span::milliseconds(1 + rng.below(120_000) as i64),
                1 if self.month_start < now - Span::minutes(3) => self.month_start + Span::milliseconds(rng.below(120_000) as i64),
                _ => now - Span::milliseconds(rng.below(600_000) as i64),
            }
        };
        let (mut input, cached, output, reasoning) = (rng.below(8_000), rng.below(2_000), rng.below(1_500), rng.below(300));
        if runaway {
            input += 100_000;
        }
        let feature = ["chat", "search", "summarize"][rng.below(3) as usize];
        let mut event = json!({
            "idempotency_key": format!("w{}-{i}", self.seed),
            "timestamp": ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "user_id": user,
            "customer_id": customer,
            "feature": feature,
            "input_tokens": input,
            "output_tokens": output,
            "cached_input_tokens": cached,
            "reasoning_tokens": reasoning,
        });
        let cost = if runaway {
            event["model"] = json!("gpt-4o");
            gpt4o_cost(input, cached, output, reasoning)
        } else if rng.chance(3) {
            // No cost_usd and a model no catalog prices: counted, cost 0.
            event["model"] = json!("mystery-model");
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
                // Credits convert at 0.001 USD: a micro-credit is a nano-USD.
                let micro_credits = rng.below(50_000_000) as i64;
                event["credits"] = json!(format!("{}.{:06}", micro_credits / 1_000_000, micro_credits % 1_000_000));
                micro_credits
            }
            _ => 0,
        };
        let tokens = input + output + cached + reasoning;
        self.truth.entry(user).or_default().add(tokens, cost, revenue);
        self.total.add(tokens, cost, revenue);

        let not_before = batch + 1 + self.rng.below(3);
        if self.rng.chance(mix.retry_pct) {
            self.retries += 1;
            self.pending.push_back(Copy { origin: batch, not_before, event: event.clone() });
        }
        if self.rng.chance(mix.conflict_pct) {
            self.conflicts += 1;
            let mut changed = event.clone();
            changed["input_tokens"] = json!(input + 1);
            changed["cost_usd"] = json!("0.5");
            changed.as_object_mut().map(|o| o.remove("credits"));
            self.pending.push_back(Copy { origin: batch, not_before, event: changed });
        }
        event
    }

    /// The per-user truth, sorted for the file, and the tenant's total.
    pub(super) fn truth(&mut self) -> (BTreeMap<String, UserTruth>, UserTruth) {
        (std::mem::take(&mut self.truth).into_iter().collect(), self.total.clone())
    }
}

/// gpt-4o at $2.50 / $1.25 cached / $10 output per million tokens, rounded
/// half up per event (as `workload` prices it).
fn gpt4o_cost(input: u64, cached: u64, output: u64, reasoning: u64) -> i64 {
    let micro = i128::from(input) * 2_500_000_000 + i128::from(cached) * 1_250_000_000 + i128::from(output + reasoning) * 10_000_000_000;
    // At most ~10^9 tokens of the generator's own making: always fits.
    i64::try_from((micro + 500_000) / 1_000_000).unwrap_or(i64::MAX)
}

fn decimal(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}
