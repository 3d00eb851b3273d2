//! The raw SQLite baseline the embedded writer is measured against: the same
//! event rows and rollup upserts, written by a plain `rusqlite` loop into a
//! database the all-in-one migrated, one transaction per batch, WAL with
//! `synchronous = FULL`. No HTTP, no JSON, no pricing, no limits, no alerts:
//! what the store itself costs. Also fills a store quickly (the 10M row).

use rusqlite::{Connection, params};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// The rollup tables the writer upserts, with the key each row of an event
/// lands on: (user, customer, feature, model, environment, billable, window).
const ROLLUPS: [(&str, bool, bool, i64); 3] = [
    // table, keeps the user and customer, keeps feature/model/environment/billable, window
    ("rollups_minute", true, true, 60),
    ("rollups_daily_by_user", true, false, 86_400),
    ("rollups_daily_by_dims", false, true, 86_400),
];

/// One event as the bench makes it.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub key: String,
    pub at: i64,
    pub user: String,
    pub customer: String,
    pub feature: &'static str,
    pub model: &'static str,
    pub input: i64,
    pub output: i64,
}

impl RawEvent {
    /// Cost in nano-USD: $2.50 and $10 a million input and output tokens.
    fn cost(&self) -> i64 {
        self.input * 2_500 + self.output * 10_000
    }
}

type Key = (&'static str, String, i64, String, String, &'static str, &'static str, &'static str, i64);

/// Opens the migrated database at `path` as the writer does.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// Writes `batches` (each one transaction): returns events/s.
pub fn write(conn: &mut Connection, batches: impl Iterator<Item = Vec<RawEvent>>) -> rusqlite::Result<(f64, u64)> {
    let started = Instant::now();
    let mut n = 0u64;
    let upserts: Vec<String> = ROLLUPS.iter().map(|(t, ..)| upsert_sql(t)).collect();
    // The same tables the writer has: a store from before a rollup was added lacks it.
    let mut present = Vec::new();
    for r in ROLLUPS {
        let n: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [r.0], |r| r.get(0))?;
        if n > 0 {
            present.push(r);
        }
    }
    for batch in batches {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO events (tenant, idempotency_key, fingerprint, event_time, event_time_ns, user_id, customer_id, \
                 feature, model, provider, environment, billable, input_tokens, output_tokens, cached_input_tokens, \
                 reasoning_tokens, cost_nanos, cost_source, revenue_nanos, credits_nanos, metadata, received_at, written_at) \
                 VALUES ('acme', ?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, 'openai', '', 1, ?8, ?9, 0, 0, ?10, 1, 0, 1500000000, '', ?3, ?3)",
            )?;
            let mut sums: HashMap<Key, [i64; 4]> = HashMap::new();
            for e in &batch {
                if insert.execute(params![e.key, fingerprint(&e.key), e.at, e.user, e.customer, e.feature, e.model, e.input, e.output, e.cost()])? == 0 {
                    continue;
                }
                n += 1;
                for &(table, users, dims, window) in &present {
                    let pick = |keep: bool, v: &str| if keep { v.to_owned() } else { String::new() };
                    let key = (
                        table,
                        "acme".to_owned(),
                        e.at.div_euclid(window) * window,
                        pick(users, &e.user),
                        pick(users, &e.customer),
                        if dims { e.feature } else { "" },
                        if dims { e.model } else { "" },
                        "",
                        i64::from(dims),
                    );
                    let s = sums.entry(key).or_default();
                    *s = [s[0] + 1, s[1] + e.input, s[2] + e.output, s[3] + e.cost()];
                }
            }
            for (k, s) in &sums {
                let at = ROLLUPS.iter().position(|r| r.0 == k.0).unwrap_or(0);
                tx.prepare_cached(&upserts[at])?.execute(params![k.1, k.2, k.3, k.4, k.5, k.6, k.7, k.8, s[0], s[1], s[2], s[3], 1_500_000_000i64 * s[0]])?;
            }
        }
        tx.commit()?;
    }
    Ok((n as f64 / started.elapsed().as_secs_f64(), n))
}

/// A fixed 64-bit hash of the key (the writer's fingerprint is of the payload).
fn fingerprint(key: &str) -> i64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)) as i64
}

fn upsert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (tenant, window_start, user_id, customer_id, feature, model, environment, billable, events, input_tokens, \
         output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, revenue_nanos, credits_nanos, unpriced_events) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0, 0, ?12, 0, ?13, 0) ON CONFLICT DO UPDATE SET \
         events = events + excluded.events, input_tokens = input_tokens + excluded.input_tokens, \
         output_tokens = output_tokens + excluded.output_tokens, cost_nanos = cost_nanos + excluded.cost_nanos, \
         credits_nanos = credits_nanos + excluded.credits_nanos"
    )
}
