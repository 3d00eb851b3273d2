//! The Stripe meter sync's tables in ClickHouse (migration 6): row types,
//! statements and reads for `billing_windows` (the pushed state per tenant,
//! meter, subject and hour) and `billing_customers` (the API's mappings),
//! and the hourly sums the sync pushes. Both tables are
//! `ReplacingMergeTree(version)` read with `FINAL`: a state change is a whole
//! new row with a higher version, so a write is one acknowledged INSERT.

use meterline_sql::{Dialect, HourlySums, Sql, i, s};
use serde::{Deserialize, Serialize};

use crate::error::ClickHouseError;
use crate::store::Store;

/// One version of a window's pushed state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct BillingWindowRow {
    pub tenant: String,
    pub meter: String,
    pub subject: String,
    /// The hour's start, Unix seconds (`DateTime`).
    pub window_start: u32,
    pub stripe_customer_id: String,
    pub pushed: i64,
    pub seq: i64,
    /// Meaningful only when `has_pending` is 1.
    pub pending: i64,
    pub has_pending: u8,
    pub refused: i64,
    /// The last refusal or failure; '' for none.
    pub error: String,
    pub updated_at: u32,
    pub version: u64,
}

/// One version of a subject's Stripe customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct BillingCustomerRow {
    pub tenant: String,
    pub subject: String,
    pub stripe_customer_id: String,
    pub updated_at: u32,
    pub version: u64,
}

/// One subject's sum over one hour.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clickhouse::Row)]
pub struct HourSumRow {
    pub subject: String,
    pub hour: i64,
    pub total: i64,
}

/// One meter and subject of the status, as summed by the server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clickhouse::Row)]
pub struct BillingStatusRow {
    pub meter: String,
    pub subject: String,
    /// The Stripe customer of the latest window written with one.
    pub last_customer: String,
    /// Windows with anything pushed: 0 means `last_window` is no window.
    pub pushed_windows: i64,
    pub last_window: i64,
    pub last_window_value: i64,
    pub total_pushed: i64,
    pub pending_windows: i64,
    pub pending_value: i64,
    pub refused_windows: i64,
    pub refused_value: i64,
    /// '' for none.
    pub last_error: String,
}

/// One window's latest version.
pub fn window(tenant: &str, meter: &str, subject: &str, window_start: i64) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM billing_windows FINAL WHERE tenant = ? AND meter = ? AND subject = ? AND window_start = toDateTime(?)");
    sql.binds.extend([s(tenant), s(meter), s(subject), i(window_start)]);
    sql
}

/// A meter's windows from `from` (Unix seconds) on, latest versions.
pub fn windows_since(tenant: &str, meter: &str, from: i64) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM billing_windows FINAL WHERE tenant = ? AND meter = ? AND window_start >= toDateTime(?)");
    sql.binds.extend([s(tenant), s(meter), i(from)]);
    sql
}

/// A tenant's mappings, or one subject's.
pub fn customers(tenant: &str, subject: Option<&str>) -> Sql {
    let mut sql = Sql::new("SELECT ?fields FROM billing_customers FINAL WHERE tenant = ?");
    sql.binds.push(s(tenant));
    if let Some(subject) = subject {
        sql.push(" AND subject = ?", [s(subject)]);
    }
    sql
}

/// Per meter and subject of a tenant: what `GET /v1/billing/status` shows.
/// "Latest" is by `updated_at`, then by hour, as the embedded store orders it.
pub fn status(tenant: &str) -> Sql {
    let latest = "toUInt64(updated_at) * 4294967296 + toUInt32(window_start)";
    let mut sql = Sql::new(format!(
        "SELECT meter, subject, \
            argMaxIf(stripe_customer_id, {latest}, stripe_customer_id != '') AS last_customer, \
            toInt64(countIf(pushed != 0)) AS pushed_windows, \
            toInt64(maxIf(toUInt32(window_start), pushed != 0)) AS last_window, \
            toInt64(argMaxIf(pushed, window_start, pushed != 0)) AS last_window_value, \
            toInt64(sum(pushed)) AS total_pushed, \
            toInt64(countIf(has_pending = 1)) AS pending_windows, \
            toInt64(sumIf(pending, has_pending = 1)) AS pending_value, \
            toInt64(countIf(refused != 0)) AS refused_windows, \
            toInt64(sum(refused)) AS refused_value, \
            argMaxIf(error, {latest}, error != '') AS last_error \
         FROM billing_windows FINAL WHERE tenant = ? GROUP BY meter, subject ORDER BY meter, subject"
    ));
    sql.binds.push(s(tenant));
    sql
}

/// The sync's hourly sums from `rollups_minute` (see [`meterline_sql::hourly_sums`]);
/// `None` if it names a column outside the whitelist or no subject.
pub fn hourly_sums(q: &HourlySums) -> Option<Sql> {
    meterline_sql::hourly_sums(Dialect::ClickHouse, q)
}

/// A sample row of each table, for the compatibility list's VALUES inserts.
pub(crate) fn sample_rows() -> (BillingWindowRow, BillingCustomerRow) {
    let window_row = BillingWindowRow {
        tenant: "acme".into(),
        meter: "it's_cost".into(),
        subject: "c-1".into(),
        // A whole hour, as the sync writes.
        window_start: 1_800_000_000,
        stripe_customer_id: "cus_A".into(),
        pushed: 70,
        seq: 2,
        pending: 25,
        has_pending: 1,
        refused: 0,
        error: "Stripe unavailable: 503".into(),
        updated_at: 1_800_000_000,
        version: 1_800_000_000_000_000_000,
    };
    let customer_row = BillingCustomerRow { tenant: "acme".into(), subject: "c-1".into(), stripe_customer_id: "cus_A".into(), updated_at: 1_800_000_000, version: 1 };
    (window_row, customer_row)
}

/// Every billing read with sample values, for the compatibility list (after
/// the sample rows' inserts).
pub(crate) fn compat_reads() -> Vec<String> {
    let window_fields = <BillingWindowRow as clickhouse::Row>::COLUMN_NAMES.join(",");
    let customer_fields = <BillingCustomerRow as clickhouse::Row>::COLUMN_NAMES.join(",");
    let sums = HourlySums {
        tenant: "acme".into(),
        subject_column: "customer_id",
        columns: &["input_tokens", "output_tokens"],
        filters: vec![("feature", "chat".into()), ("model", "gpt-4o".into()), ("environment", "it's".into())],
        from: 1_796_000_400,
        to: 1_800_000_000,
        subjects: vec!["c-1".into(), "it's-c-2".into()],
    };
    let mut out = vec![
        window("acme", "it's_cost", "c-1", 1_800_000_000).render(&window_fields),
        windows_since("acme", "it's_cost", 1_796_000_400).render(&window_fields),
        customers("acme", None).render(&customer_fields),
        customers("acme", Some("it's-c-1")).render(&customer_fields),
        status("acme").render(""),
    ];
    out.extend(hourly_sums(&sums).map(|sql| sql.render("")));
    out.extend(hourly_sums(&HourlySums { subject_column: "user_id", columns: &["events"], filters: vec![], ..sums }).map(|sql| sql.render("")));
    out
}

impl Store {
    /// One window's latest version, if it has any.
    pub async fn billing_window(&self, tenant: &str, meter: &str, subject: &str, window_start: i64) -> Result<Option<BillingWindowRow>, ClickHouseError> {
        Ok(self.query(&window(tenant, meter, subject, window_start)).fetch_optional().await?)
    }

    /// A meter's windows from `from` on.
    pub async fn billing_windows(&self, tenant: &str, meter: &str, from: i64) -> Result<Vec<BillingWindowRow>, ClickHouseError> {
        Ok(self.query(&windows_since(tenant, meter, from)).fetch_all().await?)
    }

    /// Writes a window's new version; it is durable (acknowledged) when this returns.
    pub async fn put_billing_window(&self, row: &BillingWindowRow) -> Result<(), ClickHouseError> {
        self.insert::<BillingWindowRow, _>("billing_windows", std::slice::from_ref(row)).await
    }

    /// A tenant's mappings, or one subject's.
    pub async fn billing_customers(&self, tenant: &str, subject: Option<&str>) -> Result<Vec<BillingCustomerRow>, ClickHouseError> {
        Ok(self.query(&customers(tenant, subject)).fetch_all().await?)
    }

    /// Writes a mapping's new version.
    pub async fn put_billing_customer(&self, row: &BillingCustomerRow) -> Result<(), ClickHouseError> {
        self.insert::<BillingCustomerRow, _>("billing_customers", std::slice::from_ref(row)).await
    }

    /// The status rows of a tenant.
    pub async fn billing_status(&self, tenant: &str) -> Result<Vec<BillingStatusRow>, ClickHouseError> {
        Ok(self.query(&status(tenant)).fetch_all().await?)
    }

    /// The rows of an [`hourly_sums`] statement.
    pub async fn hourly_sums(&self, sql: &Sql) -> Result<Vec<HourSumRow>, ClickHouseError> {
        Ok(self.query(sql).fetch_all().await?)
    }

    /// True when migration 6 (the billing tables) has been applied: the sync
    /// does not migrate, so that it never races a service doing so.
    pub async fn has_billing_tables(&self) -> Result<bool, ClickHouseError> {
        let applied: Vec<u32> = self.client().query(crate::statements::APPLIED_MIGRATIONS).fetch_all().await?;
        Ok(applied.contains(&6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bound_and_reads_take_the_latest_version() {
        let sql = window("it's", "m", "c", 3_600);
        assert!(sql.text.contains("FROM billing_windows FINAL") && !sql.text.contains("it's"));
        assert_eq!(sql.binds.len(), 4);
        assert_eq!(customers("t", Some("c")).binds.len(), 2);
        assert!(status("t").text.contains("FROM billing_windows FINAL WHERE tenant = ?"));
    }
}
