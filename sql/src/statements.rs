//! The statements both stores share word for word but for the dialect: one
//! user's audit trail and the runaway alerts.

use meterline_domain::{AlertState, Rule};

use crate::builder::{Sql, i, s};
use crate::scope::{Dialect, Scope};

/// Where the audit trail resumes: after (seconds, nanoseconds, idempotency key).
pub type Cursor = (i64, i64, String);

/// One user's raw events, oldest first, after the cursor position if any.
/// Shared by both dialects (event times are integer seconds in both).
pub fn events(dialect: Dialect, columns: &str, scope: &Scope, cursor: Option<&Cursor>, limit: i64) -> Sql {
    let mut sql = Sql::new(format!("SELECT {columns} FROM events WHERE "));
    sql.append(scope.range_clause(dialect));
    if let Some((secs, nanos, key)) = cursor {
        let t = dialect.time_param();
        sql.push(
            &format!(" AND (event_time > {t} OR (event_time = {t} AND (event_time_ns > ? OR (event_time_ns = ? AND idempotency_key > ?))))"),
            [i(*secs), i(*secs), i(*nanos), i(*nanos), s(key.clone())],
        );
    }
    sql.push(" ORDER BY event_time, event_time_ns, idempotency_key LIMIT ?", [i(limit)]);
    sql
}

/// What the alerts endpoint asks for.
#[derive(Debug, Clone)]
pub struct AlertsQuery {
    pub tenant: String,
    pub from: i64,
    pub to: i64,
    /// `None` for every state.
    pub state: Option<AlertState>,
    pub user: Option<String>,
    pub rule: Option<Rule>,
    /// Only the alerts after this one in the answer's order (a next page).
    pub after: Option<AlertCursor>,
    pub limit: i64,
}

/// Where a list of alerts resumes: after (opened_at seconds, user id, rule),
/// which is unique per tenant and the list's order.
pub type AlertCursor = (i64, String, String);

/// Runaway alerts, latest version of each, newest first; the range selects
/// alerts active in it. `table` is `alerts FINAL` on ClickHouse (the latest
/// version of each) and `alerts` where rows are updated in place.
pub fn alerts(dialect: Dialect, columns: &str, table: &str, q: &AlertsQuery) -> Sql {
    let t = dialect.time_param();
    let mut sql = Sql::new(format!("SELECT {columns} FROM {table} WHERE tenant = ? AND opened_at < {t} AND (state = 'open' OR resolved_at >= {t})"));
    sql.binds.extend([s(q.tenant.clone()), i(q.to), i(q.from)]);
    if let Some(state) = q.state {
        sql.push(" AND state = ?", [s(state.as_str())]);
    }
    if let Some(u) = &q.user {
        sql.push(" AND user_id = ?", [s(u.clone())]);
    }
    if let Some(r) = q.rule {
        sql.push(" AND rule = ?", [s(r.as_str())]);
    }
    if let Some((opened_at, user, rule)) = &q.after {
        sql.push(
            &format!(" AND (opened_at < {t} OR (opened_at = {t} AND (user_id > ? OR (user_id = ? AND rule > ?))))"),
            [i(*opened_at), i(*opened_at), s(user.clone()), s(user.clone()), s(rule.clone())],
        );
    }
    sql.push(" ORDER BY opened_at DESC, user_id, rule LIMIT ?", [i(q.limit)]);
    sql
}
