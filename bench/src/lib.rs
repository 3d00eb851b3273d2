//! What the benchmark binaries share: the 30 days of rollups that
//! `query-bench` and `dashboard-bench` measure over, generated server-side in
//! the stack's ClickHouse.

use meterline_tests::free_port;
use meterline_tests::stack::ClickHouse;

/// The database a bench measures over, migrated with the aggregator's own
/// migrations: the one `BENCH_DB` names (a database `BENCH_KEEP` kept, to skip
/// the load while iterating; the bool is then true), else a fresh
/// `<prefix>_<port>`.
pub async fn database(ch: &ClickHouse, prefix: &str) -> anyhow::Result<(String, bool)> {
    let reuse = std::env::var("BENCH_DB").ok();
    let db = match &reuse {
        Some(db) => db.clone(),
        None => ch.database(&format!("{prefix}_{}", free_port())).await,
    };
    let config = meterline_clickhouse::ClickHouseConfig {
        url: ch.url.clone(),
        database: db.clone(),
        user: "default".into(),
        password: String::new(),
        request_timeout_ms: 600_000,
    };
    meterline_clickhouse::connect(&config).await?.migrate().await?;
    Ok((db, reuse.is_some()))
}

/// Fills `db` (already migrated) with `users` users x 30 days ending at `now`,
/// `per_day` minute rows per user-day, and the span, user-first daily and
/// by-dimension daily rows the aggregator would keep for them; then merges every part, as a settled
/// table is.
pub async fn load(ch: &ClickHouse, db: &str, users: u64, per_day: u64, now: i64) {
    // Server-side generation: user n spends on `per_day` minutes of each of 30 days.
    for statement in load_statements(db, users, per_day, now) {
        ch.query(&statement).await;
    }
    ch.query(&format!("OPTIMIZE TABLE {db}.rollups_minute FINAL")).await;
    ch.query(&format!("OPTIMIZE TABLE {db}.rollups_user_span FINAL")).await;
    ch.query(&format!("OPTIMIZE TABLE {db}.rollups_user_daily FINAL")).await;
    ch.query(&format!("OPTIMIZE TABLE {db}.rollups_daily_by_dims FINAL")).await;
}

/// The per-user span rows summed from `db.rollups_minute` rows, as the
/// aggregator keeps them, stamped `written_at = written`; `filter` narrows
/// the minute rows read (`""` for all, or a `WHERE` clause).
pub fn span_rollups_sql(db: &str, written: i64, filter: &str) -> String {
    format!(
        "INSERT INTO {db}.rollups_user_span (span_days, tenant, window_start, user_id, customer_id, feature, model, environment, \
         billable, source_topic, source_partition, source_offset, events, input_tokens, output_tokens, cached_input_tokens, \
         reasoning_tokens, cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers, written_at) \
         SELECT span, t, toDateTime(intDiv(d, 86400 * span) * (86400 * span)), u, c, '', '', '', toUInt8(0), '', toInt32(-1), toInt64(-1), \
         e, it, ot, ct, rt, co, re, cr, un, toUInt64(0), toDateTime({written}) \
         FROM (SELECT tenant AS t, intDiv(toUInt32(window_start), 86400) * 86400 AS d, user_id AS u, customer_id AS c, sum(events) AS e, \
         sum(input_tokens) AS it, sum(output_tokens) AS ot, sum(cached_input_tokens) AS ct, sum(reasoning_tokens) AS rt, \
         sum(cost_nanos) AS co, sum(revenue_nanos) AS re, sum(credits_nanos) AS cr, sum(unpriced_events) AS un \
         FROM {db}.rollups_minute {filter} GROUP BY t, d, u, c) ARRAY JOIN [{}] AS span",
        meterline_domain::SPAN_DAYS.map(|d| d.to_string()).join(", ")
    )
}

/// The user-first daily rows summed from `db.rollups_minute` rows, as the
/// aggregator keeps them, stamped `written_at = written`; `filter` as in
/// [`span_rollups_sql`].
pub fn daily_rollups_sql(db: &str, written: i64, filter: &str) -> String {
    day_rows_sql(db, "rollups_user_daily", "user_id, customer_id", "user_id, customer_id, ", written, filter)
}

/// The daily rows by dimension (user and customer '') summed from
/// `db.rollups_minute` rows, as the aggregator keeps them; arguments as in
/// [`daily_rollups_sql`].
pub fn dims_rollups_sql(db: &str, written: i64, filter: &str) -> String {
    day_rows_sql(db, "rollups_daily_by_dims", "'', ''", "", written, filter)
}

/// Day rows of `table` from minute rows, with `people` as the user and
/// customer columns and `grouped` the same in the GROUP BY.
fn day_rows_sql(db: &str, table: &str, people: &str, grouped: &str, written: i64, filter: &str) -> String {
    format!(
        "INSERT INTO {db}.{table} (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
         source_topic, source_partition, source_offset, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, \
         cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers, written_at) \
         SELECT tenant, toDateTime(intDiv(toUInt32(window_start), 86400) * 86400) AS d, {people}, feature, model, environment, \
         billable, '', toInt32(-1), toInt64(-1), sum(events), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens), \
         sum(reasoning_tokens), sum(cost_nanos), sum(revenue_nanos), sum(credits_nanos), sum(unpriced_events), toUInt64(0), \
         toDateTime({written}) FROM {db}.rollups_minute {filter} GROUP BY tenant, d, {grouped}feature, model, environment, billable"
    )
}

/// The statements that fill `db` with `users` users x 30 days ending at `now`.
pub fn load_statements(db: &str, users: u64, per_day: u64, now: i64) -> Vec<String> {
    let rows = users * 30 * per_day;
    vec![
        format!(
        "INSERT INTO {db}.rollups_minute (tenant, window_start, user_id, customer_id, feature, model, environment, billable, \
         source_topic, source_partition, source_offset, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, \
         cost_nanos, revenue_nanos, credits_nanos, unpriced_events, markers, written_at) \
         SELECT 'acme', toDateTime(intDiv({now} - (number % 2592000), 60) * 60), concat('user-', toString(number % {users})), \
         concat('cust-', toString((number % {users}) % 97)), ['chat','search','summarize'][number % 3 + 1], ['gpt-4o','claude','llama'][number % 3 + 1], \
         'production', 1, '', -1, -1, 1, 1000, 200, 0, 0, toInt64(intHash64(number) % 50000000), toInt64(intHash64(number + 1) % 60000000), 0, 0, 0, \
         toDateTime({now}) FROM system.numbers LIMIT {rows}"
    ),
    // The per-user span table as the aggregator keeps it (summed from the same rows).
    span_rollups_sql(db, now, ""),
    // The user-first daily table as the aggregator keeps it.
    daily_rollups_sql(db, now, ""),
    // The daily rows by dimension as the aggregator keeps them.
    dims_rollups_sql(db, now, ""),
    ]
}

/// True once the aggregator whose metrics are at `metrics_url` has partitions assigned.
pub async fn aggregator_assigned(metrics_url: String) -> Option<()> {
    let text = reqwest::get(metrics_url).await.ok()?.text().await.ok()?;
    let assigned: f64 = text
        .lines()
        .filter(|l| l.starts_with(meterline_aggregator::metrics::PARTITIONS))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (assigned > 0.0).then_some(())
}
