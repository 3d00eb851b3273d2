//! The rollups one commit writes: each new event's measures summed into its
//! minute row, its per-user day row and its per-dimension day row, then
//! added to what the tables hold (one upsert per row, its column lists
//! generated from [`Measure::ALL`]).

use meterline_domain::{CostSource, DAY_SECS, EventRow, MINUTE_SECS, Measure, SumRow, window_start};
use rusqlite::{ToSql, Transaction};
use std::collections::HashMap;

use super::schema::{DAILY_TABLE, DIMS_TABLE, MINUTE_TABLE};

/// The key of a rollup row: its table's primary key columns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RollupKey {
    tenant: String,
    window_start: i64,
    user_id: String,
    customer_id: String,
    feature: String,
    model: String,
    environment: String,
    billable: u8,
}

impl RollupKey {
    /// The key columns, in the order of [`KEY_COLUMNS`].
    fn values(&self) -> [&dyn ToSql; 8] {
        [&self.tenant, &self.window_start, &self.user_id, &self.customer_id, &self.feature, &self.model, &self.environment, &self.billable]
    }
}

/// The key columns both rollup tables have, in the order [`RollupKey::values`] binds them.
const KEY_COLUMNS: [&str; 8] = ["tenant", "window_start", "user_id", "customer_id", "feature", "model", "environment", "billable"];

/// One commit's sums, per minute row, per-user day row and per-dimension day row.
#[derive(Debug, Default)]
pub(super) struct Rollups {
    minute: HashMap<RollupKey, SumRow>,
    day: HashMap<RollupKey, SumRow>,
    dims: HashMap<RollupKey, SumRow>,
}

impl Rollups {
    /// Counts a new event in its minute row (every dimension), its per-user
    /// day row (feature, model and environment empty, billable 0) and its
    /// per-dimension day row (user and customer empty).
    pub(super) fn add(&mut self, row: &EventRow) {
        let sums = event_sums(row);
        let t = i64::from(row.event_time);
        let minute = RollupKey {
            tenant: row.tenant.clone(),
            window_start: window_start(t, MINUTE_SECS),
            user_id: row.user_id.clone(),
            customer_id: row.customer_id.clone(),
            feature: row.feature.clone(),
            model: row.model.clone(),
            environment: row.environment.clone(),
            billable: row.billable,
        };
        let day_start = window_start(t, DAY_SECS);
        let dims = RollupKey { window_start: day_start, user_id: String::new(), customer_id: String::new(), ..minute.clone() };
        let day = RollupKey {
            tenant: row.tenant.clone(),
            window_start: day_start,
            user_id: row.user_id.clone(),
            customer_id: row.customer_id.clone(),
            feature: String::new(),
            model: String::new(),
            environment: String::new(),
            billable: 0,
        };
        self.minute.entry(minute).or_default().add(&sums);
        self.day.entry(day).or_default().add(&sums);
        self.dims.entry(dims).or_default().add(&sums);
    }

    /// Adds the sums to the rollup tables, minute rows first.
    pub(super) fn upsert(&self, tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
        for (table, rows) in [(MINUTE_TABLE, &self.minute), (DAILY_TABLE, &self.day), (DIMS_TABLE, &self.dims)] {
            let mut upsert = tx.prepare_cached(&upsert_sql(table))?;
            for (key, sums) in rows {
                let measures = Measure::ALL.map(|m| stored(sums, m));
                let mut values: Vec<&dyn ToSql> = key.values().to_vec();
                values.extend(measures.iter().map(|v| v as &dyn ToSql));
                upsert.execute(values.as_slice())?;
            }
        }
        Ok(())
    }
}

/// One event's measures as a row of sums. Token counts above `i64::MAX`
/// (which SQLite cannot hold) count as `i64::MAX`.
fn event_sums(row: &EventRow) -> SumRow {
    let n = |v: u64| v.min(i64::MAX as u64);
    SumRow {
        s_events: 1,
        s_input: n(row.input_tokens),
        s_output: n(row.output_tokens),
        s_cached: n(row.cached_input_tokens),
        s_reasoning: n(row.reasoning_tokens),
        s_cost: row.cost_nanos,
        s_revenue: row.revenue_nanos,
        s_credits: row.credits_nanos,
        s_unpriced: u64::from(row.cost_source == CostSource::Unpriced.as_u8()),
        ..SumRow::default()
    }
}

/// A sum as SQLite stores it: a signed integer, bit for bit (the sums wrap
/// as SQLite's integer columns would).
fn stored(sums: &SumRow, m: Measure) -> i64 {
    sums.get(m) as i64
}

/// The upsert of one rollup row into `table`: the key columns, then every
/// measure, each added to the stored sum when the row exists.
fn upsert_sql(table: &str) -> String {
    let columns: Vec<&str> = KEY_COLUMNS.iter().copied().chain(Measure::ALL.iter().map(|m| m.column())).collect();
    let placeholders: Vec<String> = (1..=columns.len()).map(|n| format!("?{n}")).collect();
    let added: Vec<String> = Measure::ALL.iter().map(|m| format!("{c} = {c} + excluded.{c}", c = m.column())).collect();
    format!("INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT DO UPDATE SET {}", columns.join(", "), placeholders.join(", "), added.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_upsert_is_the_statement_it_replaces() {
        let table = "rollups_minute";
        let before = format!(
            "INSERT INTO {table} (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
             events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, cost_nanos, revenue_nanos, \
             credits_nanos, unpriced_events) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
             ON CONFLICT DO UPDATE SET \
             events = events + excluded.events, input_tokens = input_tokens + excluded.input_tokens, \
             output_tokens = output_tokens + excluded.output_tokens, \
             cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens, \
             reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens, cost_nanos = cost_nanos + excluded.cost_nanos, \
             revenue_nanos = revenue_nanos + excluded.revenue_nanos, credits_nanos = credits_nanos + excluded.credits_nanos, \
             unpriced_events = unpriced_events + excluded.unpriced_events"
        );
        assert_eq!(upsert_sql(table), before);
    }

    #[test]
    fn an_event_counts_in_its_minute_and_its_day() {
        let event = EventRow {
            tenant: "t".into(),
            idempotency_key: "k".into(),
            fingerprint: 0,
            event_time: 86_400 + 61,
            event_time_ns: 0,
            user_id: "u".into(),
            customer_id: "c".into(),
            feature: "f".into(),
            model: "m".into(),
            provider: String::new(),
            environment: "prod".into(),
            billable: 1,
            input_tokens: 1,
            output_tokens: 2,
            cached_input_tokens: 3,
            reasoning_tokens: 4,
            cost_nanos: -5,
            cost_source: CostSource::Unpriced.as_u8(),
            revenue_nanos: 6,
            credits_nanos: 7,
            metadata: String::new(),
            received_at: 0,
            kafka_topic: String::new(),
            kafka_partition: 0,
            kafka_offset: 0,
            written_at: 0,
        };
        let mut rollups = Rollups::default();
        rollups.add(&event);
        rollups.add(&event);
        let (minute, sums) = rollups.minute.iter().next().expect("a minute row");
        assert_eq!((minute.window_start, minute.feature.as_str(), minute.billable), (86_460, "f", 1));
        assert_eq!(Measure::ALL.map(|m| stored(sums, m)), [2, 2, 4, 6, 8, -10, 12, 14, 2]);
        let (day, same) = rollups.day.iter().next().expect("a day row");
        assert_eq!((day.window_start, day.feature.as_str(), day.environment.as_str(), day.billable), (86_400, "", "", 0));
        assert_eq!(same, sums);
        let (dims, same) = rollups.dims.iter().next().expect("a dimensions row");
        assert_eq!((dims.window_start, dims.user_id.as_str(), dims.customer_id.as_str(), dims.model.as_str(), dims.billable), (86_400, "", "", "m", 1));
        assert_eq!(same, sums);
    }
}
