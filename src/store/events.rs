//! The `events` table as the writer uses it: the dedupe record (the first
//! fingerprint stored under a tenant's idempotency key) and the insert of a
//! new event.

use meterline_domain::EventRow;
use rusqlite::{CachedStatement, OptionalExtension, Transaction, params};

/// The two statements, prepared once per transaction (and cached across them).
pub(super) struct Events<'t> {
    lookup: CachedStatement<'t>,
    insert: CachedStatement<'t>,
}

impl<'t> Events<'t> {
    pub(super) fn prepare(tx: &'t Transaction<'_>) -> Result<Events<'t>, rusqlite::Error> {
        Ok(Events {
            lookup: tx.prepare_cached("SELECT fingerprint FROM events WHERE tenant = ?1 AND idempotency_key = ?2")?,
            insert: tx.prepare_cached(
                "INSERT INTO events (tenant, idempotency_key, fingerprint, event_time, event_time_ns, user_id, customer_id, \
                 feature, model, provider, environment, billable, input_tokens, output_tokens, cached_input_tokens, \
                 reasoning_tokens, cost_nanos, cost_source, revenue_nanos, credits_nanos, metadata, received_at, written_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            )?,
        })
    }

    /// The fingerprint stored under `tenant`'s `idempotency_key`, if any.
    pub(super) fn seen(&mut self, tenant: &str, idempotency_key: &str) -> Result<Option<u64>, rusqlite::Error> {
        let seen: Option<i64> = self.lookup.query_row(params![tenant, idempotency_key], |r| r.get(0)).optional()?;
        // SQLite integers are signed: fingerprints are stored bit for bit.
        Ok(seen.map(|f| f as u64))
    }

    /// Stores a new event.
    pub(super) fn insert(&mut self, row: &EventRow) -> Result<(), rusqlite::Error> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.insert.execute(params![
            row.tenant,
            row.idempotency_key,
            row.fingerprint as i64,
            row.event_time,
            row.event_time_ns,
            row.user_id,
            row.customer_id,
            row.feature,
            row.model,
            row.provider,
            row.environment,
            row.billable,
            n(row.input_tokens),
            n(row.output_tokens),
            n(row.cached_input_tokens),
            n(row.reasoning_tokens),
            row.cost_nanos,
            row.cost_source,
            row.revenue_nanos,
            row.credits_nanos,
            row.metadata,
            row.received_at,
            row.written_at,
        ])?;
        Ok(())
    }
}
