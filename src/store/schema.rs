//! The database's schema and connections: the migrations (applied in order,
//! recorded in `PRAGMA user_version`) and the pragmas every connection sets.

use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

use crate::EmbeddedError;

/// The columns both rollup tables have (the daily one leaves feature, model
/// and environment empty and billable 0, as ClickHouse's does).
macro_rules! rollup_columns {
    () => {
        "tenant TEXT NOT NULL, window_start INTEGER NOT NULL, user_id TEXT NOT NULL, customer_id TEXT NOT NULL,
        feature TEXT NOT NULL, model TEXT NOT NULL, environment TEXT NOT NULL, billable INTEGER NOT NULL,
        events INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
        revenue_nanos INTEGER NOT NULL, credits_nanos INTEGER NOT NULL, unpriced_events INTEGER NOT NULL,"
    };
}

/// The schema, applied in order; `PRAGMA user_version` records how far.
const MIGRATIONS: &[&str] = &[
    // 1: events (the audit trail and the dedupe record), rollups, alerts.
    concat!(
        "CREATE TABLE events (
        tenant TEXT NOT NULL, idempotency_key TEXT NOT NULL, fingerprint INTEGER NOT NULL,
        event_time INTEGER NOT NULL, event_time_ns INTEGER NOT NULL,
        user_id TEXT NOT NULL, customer_id TEXT NOT NULL, feature TEXT NOT NULL, model TEXT NOT NULL,
        provider TEXT NOT NULL, environment TEXT NOT NULL, billable INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
        cost_nanos INTEGER NOT NULL, cost_source INTEGER NOT NULL, revenue_nanos INTEGER NOT NULL,
        credits_nanos INTEGER NOT NULL, metadata TEXT NOT NULL, received_at INTEGER NOT NULL, written_at INTEGER NOT NULL,
        UNIQUE (tenant, idempotency_key));
     CREATE INDEX events_by_user ON events (tenant, user_id, event_time, event_time_ns, idempotency_key);
     CREATE TABLE rollups_minute (",
        rollup_columns!(),
        "PRIMARY KEY (tenant, window_start, user_id, customer_id, feature, model, environment, billable)) WITHOUT ROWID;
     CREATE INDEX rollups_minute_by_user ON rollups_minute (tenant, user_id, window_start);
     -- User first: the alert rules read one user's days, and top spenders
     -- group by user, both in key order; the index serves short ranges.
     CREATE TABLE rollups_user_day (",
        rollup_columns!(),
        "PRIMARY KEY (tenant, user_id, window_start, customer_id, feature, model, environment, billable)) WITHOUT ROWID;
     CREATE INDEX rollups_user_day_by_time ON rollups_user_day (tenant, window_start);
     CREATE TABLE alerts (
        tenant TEXT NOT NULL, user_id TEXT NOT NULL, rule TEXT NOT NULL, opened_at INTEGER NOT NULL,
        state TEXT NOT NULL, observed_nanos INTEGER NOT NULL, threshold_nanos INTEGER NOT NULL,
        window_secs INTEGER NOT NULL, updated_at INTEGER NOT NULL, resolved_at INTEGER NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (tenant, user_id, rule, opened_at)) WITHOUT ROWID;
     CREATE INDEX alerts_open ON alerts (state);"
    ),
    // 2: the per-user daily table's first name was that of a retired
    // ClickHouse table with other columns; it is renamed, data and all.
    "ALTER TABLE rollups_user_day RENAME TO rollups_daily_by_user;
     DROP INDEX rollups_user_day_by_time;
     CREATE INDEX rollups_daily_by_user_by_time ON rollups_daily_by_user (tenant, window_start);",
    // 3: limits. Plans and subscriptions are the API's JSON bodies; counters
    // hold counted usage; a hold is a row per (counter, reservation), so a
    // counter's reserved amount is the sum of its holds not yet expired and
    // a hold past its expiry stops counting without anything rewriting it.
    // A committed hold never expires (`expires_at_ms` is i64::MAX).
    // `sweep_at_ms` is set while a reservation is held, for the sweep that
    // turns expired ones into `expired` records; `purge_at_ms` is when the
    // record may go.
    "CREATE TABLE limit_plans (tenant TEXT NOT NULL, plan_id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, plan_id)) WITHOUT ROWID;
     CREATE TABLE limit_subscriptions (tenant TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, subject)) WITHOUT ROWID;
     CREATE TABLE limit_counters (
        tenant TEXT NOT NULL, counter TEXT NOT NULL, used INTEGER NOT NULL, keep_until INTEGER NOT NULL,
        PRIMARY KEY (tenant, counter)) WITHOUT ROWID;
     CREATE INDEX limit_counters_by_keep ON limit_counters (keep_until);
     CREATE TABLE limit_holds (
        tenant TEXT NOT NULL, counter TEXT NOT NULL, reservation TEXT NOT NULL, amount INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, counter, reservation)) WITHOUT ROWID;
     CREATE INDEX limit_holds_by_reservation ON limit_holds (tenant, reservation);
     CREATE TABLE limit_reservations (
        tenant TEXT NOT NULL, key TEXT NOT NULL, idempotency_key TEXT, expires_at_ms INTEGER NOT NULL,
        sweep_at_ms INTEGER, purge_at_ms INTEGER NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (tenant, key)) WITHOUT ROWID;
     CREATE UNIQUE INDEX limit_reservations_by_idempotency_key ON limit_reservations (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
     CREATE INDEX limit_reservations_to_sweep ON limit_reservations (sweep_at_ms) WHERE sweep_at_ms IS NOT NULL;
     CREATE INDEX limit_reservations_to_purge ON limit_reservations (purge_at_ms);",
    // 4: limit alerts. A fired-marker per (counter, limit name, ratio) makes a
    // threshold crossing fire once per subject, limit and period; it goes
    // with its counter (`keep_until`). Open limit alerts hold their period's
    // reset in `resolved_at`; the index finds those due to resolve.
    "CREATE TABLE limit_alerts_fired (
        tenant TEXT NOT NULL, counter TEXT NOT NULL, limit_name TEXT NOT NULL, ratio INTEGER NOT NULL, keep_until INTEGER NOT NULL,
        PRIMARY KEY (tenant, counter, limit_name, ratio)) WITHOUT ROWID;
     CREATE INDEX limit_alerts_fired_by_keep ON limit_alerts_fired (keep_until);
     CREATE INDEX alerts_limit_due ON alerts (rule, state, resolved_at);",
    // 5: Stripe meter sync. The API's customer mappings; per (meter, subject,
    // hour) what Stripe took (`pushed`), the identifier sequence, a value
    // written down before it is sent (`pending`, NULL when none), a delta
    // too old for Stripe (`refused`), the last error, and the Stripe
    // customer the pending (or last) event went to.
    "CREATE TABLE billing_customers (
        tenant TEXT NOT NULL, subject TEXT NOT NULL, stripe_customer_id TEXT NOT NULL, updated_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, subject)) WITHOUT ROWID;
     CREATE TABLE billing_windows (
        tenant TEXT NOT NULL, meter TEXT NOT NULL, subject TEXT NOT NULL, window_start INTEGER NOT NULL,
        stripe_customer_id TEXT NOT NULL, pushed INTEGER NOT NULL, seq INTEGER NOT NULL, pending INTEGER,
        refused INTEGER NOT NULL, error TEXT, updated_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, meter, window_start, subject)) WITHOUT ROWID;",
    // 6: daily rows by feature, model, environment and billable (user and
    // customer empty), for usage by day and model without reading a month of
    // minute rows: about a day's distinct (feature, model, environment,
    // billable) rows, whatever the users. Backfilled from the minute rows,
    // which hold every event stored so far.
    concat!(
        "CREATE TABLE rollups_daily_by_dims (",
        rollup_columns!(),
        "PRIMARY KEY (tenant, window_start, feature, model, environment, billable, user_id, customer_id)) WITHOUT ROWID;
     INSERT INTO rollups_daily_by_dims
        SELECT tenant, (window_start / 86400) * 86400, '', '', feature, model, environment, billable,
            SUM(events), SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens), SUM(reasoning_tokens),
            SUM(cost_nanos), SUM(revenue_nanos), SUM(credits_nanos), SUM(unpriced_events)
        FROM rollups_minute GROUP BY tenant, (window_start / 86400) * 86400, feature, model, environment, billable;"
    ),
];

/// The minute rollups: every dimension's sums per UTC minute.
pub(super) const MINUTE_TABLE: &str = "rollups_minute";

/// The per-user daily rollups: every user's sums per UTC day (feature,
/// model and environment empty), ordered user first.
pub const DAILY_TABLE: &str = "rollups_daily_by_user";

/// The daily rollups by dimension: every (feature, model, environment,
/// billable)'s sums per UTC day (user and customer empty).
pub const DIMS_TABLE: &str = "rollups_daily_by_dims";

/// Opens the database with the settings every connection needs.
pub(super) fn connect(path: &Path) -> Result<Connection, EmbeddedError> {
    let conn = Connection::open(path)?;
    // WAL lets readers run beside the writer; FULL syncs the log at every
    // commit, so a 2xx survives power loss, not only a process crash.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// Applies, each in its own transaction, the migrations the database has not seen yet.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), EmbeddedError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", n + 1)?;
        tx.commit()?;
        tracing::info!(migration = n + 1, "applied embedded schema migration");
    }
    Ok(())
}
