//! The Stripe meter sync over ClickHouse: [`ClickHouseBilling`] is both the
//! routes' store (`BillingAdmin`, served by the query service) and the
//! distributed sync worker's ledger (`BillingLedger`, in `meterline
//! stripe-sync --role distributed`), over `billing_windows` and
//! `billing_customers` (migration 6).
//!
//! A state change reads the window's latest version and writes a whole new
//! row with a higher version; the INSERT is acknowledged before the worker
//! moves on. Versions are `max(previous + 1, now in nanoseconds)`: above
//! every version read, and above a write that timed out but landed later
//! (it carries an earlier clock), so two versions of a window never tie.

use meterline_billing::store::{HourSum, SumsQuery};
use meterline_billing::{BillingAdmin, BillingError, BillingLedger, Mapping, StatusRow, WindowKey, WindowState};
use meterline_clickhouse::{BillingCustomerRow, BillingWindowRow, Store};
use meterline_sql::HourlySums;

type Result<T> = std::result::Result<T, BillingError>;

fn store(e: impl std::fmt::Display) -> BillingError {
    BillingError::Store(e.to_string())
}

/// Now, as `updated_at` (seconds) and as a version floor (nanoseconds).
fn now() -> (u32, u64) {
    let t = chrono::Utc::now();
    (u32::try_from(t.timestamp()).unwrap_or(u32::MAX), u64::try_from(t.timestamp_nanos_opt().unwrap_or(i64::MAX)).unwrap_or(0))
}

fn next_version(previous: u64, floor: u64) -> u64 {
    previous.saturating_add(1).max(floor)
}

fn hour(window_start: i64) -> Result<u32> {
    u32::try_from(window_start).map_err(|_| BillingError::Store(format!("window {window_start} is outside ClickHouse's DateTime")))
}

/// Billing state in ClickHouse.
#[derive(Debug, Clone)]
pub struct ClickHouseBilling {
    store: Store,
}

impl ClickHouseBilling {
    pub fn new(store: Store) -> ClickHouseBilling {
        ClickHouseBilling { store }
    }

    /// For the sync worker: the store, once the billing tables exist (the
    /// sync does not migrate; the aggregator does at startup).
    pub async fn open(store: Store) -> Result<ClickHouseBilling> {
        if store.has_billing_tables().await.map_err(store_error_context)? {
            Ok(ClickHouseBilling { store })
        } else {
            Err(BillingError::Store("the database has no billing tables (ClickHouse migration 6): start this version of the aggregator on it first".into()))
        }
    }

    /// Reads `key`'s latest version, lets `change` make the next one, and
    /// writes it.
    async fn update(&self, key: &WindowKey, change: impl FnOnce(Option<BillingWindowRow>) -> Result<BillingWindowRow>) -> Result<()> {
        let current = self.store.billing_window(&key.tenant, &key.meter, &key.subject, key.window_start).await.map_err(store)?;
        let previous = current.as_ref().map_or(0, |r| r.version);
        let mut row = change(current)?;
        let (updated_at, floor) = now();
        row.updated_at = updated_at;
        row.version = next_version(previous, floor);
        self.store.put_billing_window(&row).await.map_err(store)
    }

    /// A fresh window row for `key`.
    fn fresh(key: &WindowKey) -> Result<BillingWindowRow> {
        Ok(BillingWindowRow { tenant: key.tenant.clone(), meter: key.meter.clone(), subject: key.subject.clone(), window_start: hour(key.window_start)?, ..BillingWindowRow::default() })
    }
}

fn store_error_context(e: meterline_clickhouse::ClickHouseError) -> BillingError {
    BillingError::Store(format!("reading the applied migrations: {e}"))
}

impl BillingAdmin for ClickHouseBilling {
    async fn put_mapping(&self, tenant: &str, subject: &str, stripe_customer_id: &str) -> Result<()> {
        // Several query services may write; the latest clock wins, and never
        // below a version already read.
        let previous = self.store.billing_customers(tenant, Some(subject)).await.map_err(store)?.first().map_or(0, |r| r.version);
        let (updated_at, floor) = now();
        let row = BillingCustomerRow {
            tenant: tenant.to_owned(),
            subject: subject.to_owned(),
            stripe_customer_id: stripe_customer_id.to_owned(),
            updated_at,
            version: next_version(previous, floor),
        };
        self.store.put_billing_customer(&row).await.map_err(store)
    }

    async fn mapping(&self, tenant: &str, subject: &str) -> Result<Option<String>> {
        Ok(self.store.billing_customers(tenant, Some(subject)).await.map_err(store)?.into_iter().next().map(|r| r.stripe_customer_id))
    }

    async fn status(&self, tenant: &str) -> Result<Vec<StatusRow>> {
        let rfc3339 = |w: i64| chrono::DateTime::from_timestamp(w, 0).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let rows = self.store.billing_status(tenant).await.map_err(store)?;
        Ok(rows
            .into_iter()
            .map(|r| StatusRow {
                event_name: r.meter,
                customer_id: r.subject,
                stripe_customer_id: r.last_customer,
                last_window: if r.pushed_windows > 0 { rfc3339(r.last_window) } else { None },
                last_window_value: r.last_window_value,
                total_pushed: r.total_pushed,
                pending_windows: r.pending_windows,
                pending_value: r.pending_value,
                refused_windows: r.refused_windows,
                refused_value: r.refused_value,
                last_error: Some(r.last_error).filter(|e| !e.is_empty()),
            })
            .collect())
    }
}

impl BillingLedger for ClickHouseBilling {
    async fn mappings(&self, tenant: &str) -> Result<Vec<Mapping>> {
        let rows = self.store.billing_customers(tenant, None).await.map_err(store)?;
        Ok(rows.into_iter().map(|r| Mapping { subject: r.subject, stripe_customer_id: r.stripe_customer_id }).collect())
    }

    async fn sums(&self, q: &SumsQuery) -> Result<Vec<HourSum>> {
        let h = HourlySums {
            tenant: q.tenant.clone(),
            subject_column: q.subject.column(),
            columns: q.columns,
            filters: q.filters.clone(),
            from: q.from,
            to: q.to,
            subjects: q.subjects.clone(),
        };
        let sql = meterline_clickhouse::meter_sync::hourly_sums(&h).ok_or_else(|| BillingError::Store("the hourly sums name a column outside the whitelist".into()))?;
        let rows = self.store.hourly_sums(&sql).await.map_err(store)?;
        Ok(rows.into_iter().map(|r| HourSum { subject: r.subject, window_start: r.hour, sum: r.total }).collect())
    }

    async fn states(&self, tenant: &str, meter: &str, from: i64) -> Result<Vec<(String, i64, WindowState)>> {
        let rows = self.store.billing_windows(tenant, meter, from).await.map_err(store)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let state = WindowState { pushed: r.pushed, seq: r.seq, pending: (r.has_pending == 1).then_some(r.pending), refused: r.refused, customer: r.stripe_customer_id };
                (r.subject, i64::from(r.window_start), state)
            })
            .collect())
    }

    async fn begin(&self, key: &WindowKey, stripe_customer_id: &str, seq: i64, value: i64) -> Result<()> {
        self.update(key, |current| {
            let row = match current {
                Some(row) => row,
                None => Self::fresh(key)?,
            };
            Ok(BillingWindowRow { stripe_customer_id: stripe_customer_id.to_owned(), seq, pending: value, has_pending: 1, ..row })
        })
        .await
    }

    async fn finish(&self, key: &WindowKey, seq: i64) -> Result<()> {
        self.update(key, |current| match current {
            Some(row) if row.seq == seq && row.has_pending == 1 => Ok(BillingWindowRow { pushed: row.pushed + row.pending, pending: 0, has_pending: 0, error: String::new(), ..row }),
            other => Err(BillingError::Store(format!("window {key:?}: no pending value under seq {seq} (found {other:?})"))),
        })
        .await
    }

    async fn refuse(&self, key: &WindowKey, value: i64, reason: &str) -> Result<()> {
        self.update(key, |current| {
            let row = match current {
                Some(row) => row,
                None => Self::fresh(key)?,
            };
            Ok(BillingWindowRow { pending: 0, has_pending: 0, refused: value, error: reason.to_owned(), ..row })
        })
        .await
    }

    async fn note(&self, key: &WindowKey, error: &str) -> Result<()> {
        self.update(key, |current| match current {
            Some(row) => Ok(BillingWindowRow { error: error.to_owned(), ..row }),
            None => Err(BillingError::Store(format!("window {key:?}: no row to note an error on"))),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_always_increase() {
        assert_eq!(next_version(5, 3), 6);
        assert_eq!(next_version(5, 100), 100);
        assert_eq!(next_version(u64::MAX, 0), u64::MAX);
        assert!(hour(-1).is_err());
    }
}
