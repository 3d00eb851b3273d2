//! The Stripe meter sync over the embedded database: the routes' store
//! ([`EmbeddedBilling`], writes through the writer's group commit) and the
//! sync worker's ledger ([`SqliteLedger`], its own connection in the
//! `meterline stripe-sync` process; SQLite's locks and WAL let it write
//! `billing_windows` beside the server, and no one else writes that table).

use meterline_billing::store::{HourSum, SumsQuery};
use meterline_billing::{BillingAdmin, BillingError, BillingLedger, Mapping, StatusRow, WindowKey, WindowState};
use meterline_sql::{Dialect, HourlySums, hourly_sums};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::schema::connect;
use super::{DB_FILE, Embedded, binds};

type Result<T> = std::result::Result<T, BillingError>;

fn store(e: impl std::fmt::Display) -> BillingError {
    BillingError::Store(e.to_string())
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Customer mappings and status for the routes.
#[derive(Debug, Clone)]
pub struct EmbeddedBilling(pub Arc<Embedded>);

impl BillingAdmin for EmbeddedBilling {
    async fn put_mapping(&self, tenant: &str, subject: &str, stripe_customer_id: &str) -> Result<()> {
        let (tenant, subject, customer) = (tenant.to_owned(), subject.to_owned(), stripe_customer_id.to_owned());
        let stored = self.0.transact(move |conn| {
            conn.prepare_cached(
                "INSERT INTO billing_customers (tenant, subject, stripe_customer_id, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, subject) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id, updated_at = excluded.updated_at",
            )?
            .execute(params![tenant, subject, customer, now_secs()])?;
            Ok(())
        });
        stored.await.map_err(store)
    }

    async fn mapping(&self, tenant: &str, subject: &str) -> Result<Option<String>> {
        let (tenant, subject) = (tenant.to_owned(), subject.to_owned());
        self.0
            .read(move |conn| {
                conn.prepare_cached("SELECT stripe_customer_id FROM billing_customers WHERE tenant = ?1 AND subject = ?2")?.query_row(params![tenant, subject], |r| r.get(0)).optional()
            })
            .await
            .map_err(store)
    }

    async fn status(&self, tenant: &str) -> Result<Vec<StatusRow>> {
        let tenant = tenant.to_owned();
        self.0.read(move |conn| status(conn, &tenant)).await.map_err(store)
    }
}

/// Per meter and subject: the latest pushed window and its value, totals,
/// what is pending and what was refused, the last error.
fn status(conn: &Connection, tenant: &str) -> std::result::Result<Vec<StatusRow>, rusqlite::Error> {
    let same = "x.tenant = w.tenant AND x.meter = w.meter AND x.subject = w.subject";
    let sql = format!(
        "SELECT meter, subject, \
            (SELECT stripe_customer_id FROM billing_windows x WHERE {same} AND stripe_customer_id != '' ORDER BY updated_at DESC, window_start DESC LIMIT 1), \
            MAX(CASE WHEN pushed != 0 THEN window_start END), \
            COALESCE((SELECT pushed FROM billing_windows x WHERE {same} AND pushed != 0 ORDER BY window_start DESC LIMIT 1), 0), \
            SUM(pushed), SUM(pending IS NOT NULL), COALESCE(SUM(pending), 0), SUM(refused != 0), SUM(refused), \
            (SELECT error FROM billing_windows x WHERE {same} AND error IS NOT NULL ORDER BY updated_at DESC LIMIT 1) \
         FROM billing_windows w WHERE tenant = ?1 GROUP BY meter, subject ORDER BY meter, subject"
    );
    let rfc3339 = |w: Option<i64>| w.and_then(|w| chrono::DateTime::from_timestamp(w, 0)).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    conn.prepare_cached(&sql)?
        .query_map(params![tenant], |r| {
            Ok(StatusRow {
                event_name: r.get(0)?,
                customer_id: r.get(1)?,
                stripe_customer_id: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                last_window: rfc3339(r.get(3)?),
                last_window_value: r.get(4)?,
                total_pushed: r.get(5)?,
                pending_windows: r.get(6)?,
                pending_value: r.get(7)?,
                refused_windows: r.get(8)?,
                refused_value: r.get(9)?,
                last_error: r.get(10)?,
            })
        })?
        .collect()
}

/// The worker's ledger: one connection of its own, used off the async threads.
#[derive(Debug, Clone)]
pub struct SqliteLedger {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteLedger {
    /// Opens the data directory's database, which the server must have
    /// created: the sync does not migrate, so that two processes never race
    /// to apply a migration.
    pub fn open(dir: &Path) -> std::result::Result<SqliteLedger, crate::EmbeddedError> {
        let path = dir.join(DB_FILE);
        if !path.is_file() {
            return Err(crate::EmbeddedError::config("data_dir", format!("{} does not exist: start `meterline` on this data directory first", path.display())));
        }
        let conn = connect(&path)?;
        let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'billing_windows'", [], |r| r.get(0))?;
        if tables == 0 {
            return Err(crate::EmbeddedError::config("data_dir", "the database predates the billing tables: start this version of `meterline` on it first"));
        }
        Ok(SqliteLedger { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> std::result::Result<T, rusqlite::Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(store)?
        .map_err(store)
    }

    /// Runs one statement on `key`'s window.
    async fn window(&self, key: &WindowKey, sql: &'static str, a: Option<i64>, text: Option<String>) -> Result<()> {
        let k = key.clone();
        let changed = self
            .run(move |conn| conn.prepare_cached(sql)?.execute(params![k.tenant, k.meter, k.window_start, k.subject, a, text, now_secs()]))
            .await?;
        if changed == 1 { Ok(()) } else { Err(BillingError::Store(format!("window {key:?}: expected one row, changed {changed}"))) }
    }
}

impl BillingLedger for SqliteLedger {
    async fn mappings(&self, tenant: &str) -> Result<Vec<Mapping>> {
        let tenant = tenant.to_owned();
        self.run(move |conn| {
            conn.prepare_cached("SELECT subject, stripe_customer_id FROM billing_customers WHERE tenant = ?1")?
                .query_map(params![tenant], |r| Ok(Mapping { subject: r.get(0)?, stripe_customer_id: r.get(1)? }))?
                .collect()
        })
        .await
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
        let sql = hourly_sums(Dialect::Sqlite, &h).ok_or_else(|| BillingError::Store("the hourly sums name a column outside the whitelist".into()))?;
        self.run(move |conn| {
            conn.prepare(&sql.text)?.query_map(binds(&sql), |r| Ok(HourSum { subject: r.get(0)?, window_start: r.get(1)?, sum: r.get(2)? }))?.collect()
        })
        .await
    }

    async fn states(&self, tenant: &str, meter: &str, from: i64) -> Result<Vec<(String, i64, WindowState)>> {
        let (tenant, meter) = (tenant.to_owned(), meter.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "SELECT subject, window_start, pushed, seq, pending, refused, stripe_customer_id FROM billing_windows \
                 WHERE tenant = ?1 AND meter = ?2 AND window_start >= ?3",
            )?
            .query_map(params![tenant, meter, from], |r| {
                Ok((r.get(0)?, r.get(1)?, WindowState { pushed: r.get(2)?, seq: r.get(3)?, pending: r.get(4)?, refused: r.get(5)?, customer: r.get(6)? }))
            })?
            .collect()
        })
        .await
    }

    async fn begin(&self, key: &WindowKey, stripe_customer_id: &str, seq: i64, value: i64) -> Result<()> {
        let (key, customer) = (key.clone(), stripe_customer_id.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO billing_windows (tenant, meter, window_start, subject, stripe_customer_id, pushed, seq, pending, refused, error, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, 0, NULL, ?8) \
                 ON CONFLICT (tenant, meter, window_start, subject) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id, \
                 seq = excluded.seq, pending = excluded.pending, updated_at = excluded.updated_at",
            )?
            .execute(params![key.tenant, key.meter, key.window_start, key.subject, customer, seq, value, now_secs()])
        })
        .await?;
        Ok(())
    }

    async fn finish(&self, key: &WindowKey, seq: i64) -> Result<()> {
        self.window(
            key,
            "UPDATE billing_windows SET pushed = pushed + pending, pending = NULL, error = NULL, updated_at = ?7 \
             WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND subject = ?4 AND seq = ?5 AND pending IS NOT NULL AND ?6 IS NULL",
            Some(seq),
            None,
        )
        .await
    }

    async fn refuse(&self, key: &WindowKey, value: i64, reason: &str) -> Result<()> {
        let (key, reason) = (key.clone(), reason.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO billing_windows (tenant, meter, window_start, subject, stripe_customer_id, pushed, seq, pending, refused, error, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, '', 0, 0, NULL, ?5, ?6, ?7) \
                 ON CONFLICT (tenant, meter, window_start, subject) DO UPDATE SET pending = NULL, refused = excluded.refused, \
                 error = excluded.error, updated_at = excluded.updated_at",
            )?
            .execute(params![key.tenant, key.meter, key.window_start, key.subject, value, reason, now_secs()])
        })
        .await?;
        Ok(())
    }

    async fn note(&self, key: &WindowKey, error: &str) -> Result<()> {
        self.window(
            key,
            "UPDATE billing_windows SET error = ?6, updated_at = ?7 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND subject = ?4 AND ?5 IS NULL",
            None,
            Some(error.to_owned()),
        )
        .await
    }
}
