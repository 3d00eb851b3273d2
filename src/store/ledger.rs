//! The limits tables inside the writer's transaction: counters, holds and
//! reservation records, and the admit, commit, release, counted and expiry
//! steps over them, each applying the limits crate's pure transition.
//!
//! A counter's reserved amount is the sum of its holds whose expiry is still
//! ahead, so a hold past its expiry stops counting at once, in the writer
//! and on the read connections alike; the sweep that rewrites expired
//! records and deletes their holds is housekeeping, not correctness.

use meterline_limits::{Admission, Admit, Admitted, Balance, KEEP_AFTER_EXPIRY_MS, Refusal, Reservation, ReservationState, admits};
use rusqlite::{Connection, OptionalExtension, params};

use crate::EmbeddedError;

/// The expiry of a committed hold: it lasts until its event is counted.
const NEVER: i64 = i64::MAX;

/// A reservation's row key: its id's part before the first `.`, which is
/// also the idempotency key of the event its commit meters.
pub(super) fn record_key(id: &str) -> &str {
    id.split_once('.').map_or(id, |(key, _)| key)
}

/// Each counter's used amount and live holds at `now_ms`.
pub(super) fn balances(conn: &Connection, tenant: &str, counters: &[String], now_ms: i64) -> Result<Vec<Balance>, rusqlite::Error> {
    let mut used = conn.prepare_cached("SELECT used FROM limit_counters WHERE tenant = ?1 AND counter = ?2")?;
    let mut held = conn.prepare_cached("SELECT COALESCE(SUM(amount), 0) FROM limit_holds WHERE tenant = ?1 AND counter = ?2 AND expires_at_ms > ?3")?;
    let mut out = Vec::with_capacity(counters.len());
    for counter in counters {
        let u: Option<i64> = used.query_row(params![tenant, counter], |r| r.get(0)).optional()?;
        let reserved: i64 = held.query_row(params![tenant, counter, now_ms], |r| r.get(0))?;
        out.push(Balance { used: u.unwrap_or(0), reserved });
    }
    Ok(out)
}

/// Adds counted usage to a counter, creating it.
pub(super) fn add_used(conn: &Connection, tenant: &str, counter: &str, amount: i64, keep_until: i64) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO limit_counters (tenant, counter, used, keep_until) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (tenant, counter) DO UPDATE SET used = used + excluded.used, keep_until = MAX(keep_until, excluded.keep_until)",
    )?
    .execute(params![tenant, counter, amount, keep_until])?;
    Ok(())
}

fn parse(tenant: &str, key: &str, text: &str) -> Result<Reservation, EmbeddedError> {
    serde_json::from_str(text).map_err(|e| EmbeddedError::corrupt(format!("reservation {key} of tenant {tenant}"), e))
}

/// The record stored under `key`, whatever id it carries.
fn load_key(conn: &Connection, tenant: &str, key: &str) -> Result<Option<Reservation>, EmbeddedError> {
    let text: Option<String> =
        conn.prepare_cached("SELECT record FROM limit_reservations WHERE tenant = ?1 AND key = ?2")?.query_row(params![tenant, key], |r| r.get(0)).optional()?;
    text.map(|t| parse(tenant, key, &t)).transpose()
}

/// The record of reservation `id`: a forged id sharing a real one's key is not it.
pub(super) fn load(conn: &Connection, tenant: &str, id: &str) -> Result<Option<Reservation>, EmbeddedError> {
    Ok(load_key(conn, tenant, record_key(id))?.filter(|r| r.id == id))
}

/// Stores `r` and makes its holds the only ones of its reservation.
fn save(conn: &Connection, tenant: &str, r: &Reservation, idempotency_key: Option<&str>, now_ms: i64) -> Result<(), EmbeddedError> {
    let key = record_key(&r.id);
    let record = serde_json::to_string(r).map_err(|e| EmbeddedError::corrupt(format!("reservation {key} of tenant {tenant}"), e))?;
    let sweep_at = (r.state == ReservationState::Held).then_some(r.expires_at_ms);
    // A committed call not yet counted is kept until it is; any other record
    // long enough for a late or retried commit to find it.
    let purge_at = if r.state == ReservationState::Committed && !r.counted {
        NEVER
    } else {
        r.expires_at_ms.max(now_ms).saturating_add(KEEP_AFTER_EXPIRY_MS)
    };
    conn.prepare_cached(
        "INSERT INTO limit_reservations (tenant, key, idempotency_key, expires_at_ms, sweep_at_ms, purge_at_ms, record) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
         ON CONFLICT (tenant, key) DO UPDATE SET sweep_at_ms = excluded.sweep_at_ms, purge_at_ms = excluded.purge_at_ms, record = excluded.record",
    )?
    .execute(params![tenant, key, idempotency_key, r.expires_at_ms, sweep_at, purge_at, record])?;
    conn.prepare_cached("DELETE FROM limit_holds WHERE tenant = ?1 AND reservation = ?2")?.execute(params![tenant, key])?;
    let until = if r.state == ReservationState::Committed { NEVER } else { r.expires_at_ms };
    // Two limits of one definition share a counter: their holds add up there.
    let mut insert = conn.prepare_cached(
        "INSERT INTO limit_holds (tenant, counter, reservation, amount, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (tenant, counter, reservation) DO UPDATE SET amount = amount + excluded.amount",
    )?;
    for hold in r.holds.iter().filter(|h| h.amount != 0) {
        insert.execute(params![tenant, hold.counter, key, hold.amount, until])?;
    }
    Ok(())
}

/// The atomic admission (see `LimitStore::admit`).
pub(super) fn admit(conn: &Connection, tenant: &str, admit: &Admit) -> Result<Admission, EmbeddedError> {
    let counters: Vec<String> = admit.checks.iter().map(|c| c.counter.key.clone()).collect();
    if let Some(idempotency_key) = &admit.idempotency_key {
        let found: Option<(String, String)> = conn
            .prepare_cached("SELECT key, record FROM limit_reservations WHERE tenant = ?1 AND idempotency_key = ?2")?
            .query_row(params![tenant, idempotency_key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((key, text)) = found {
            let existing = parse(tenant, &key, &text)?;
            return Ok(Admission { admitted: Admitted::Existing(existing), balances: balances(conn, tenant, &counters, admit.now_ms)? });
        }
    }
    let before = balances(conn, tenant, &counters, admit.now_ms)?;
    let refused: Vec<usize> = admit.checks.iter().zip(&before).enumerate().filter(|(_, (c, b))| !admits(c, b.used, b.reserved)).map(|(i, _)| i).collect();
    if !refused.is_empty() {
        return Ok(Admission { admitted: Admitted::Denied(refused), balances: before });
    }
    save(conn, tenant, &admit.reservation, admit.idempotency_key.as_deref(), admit.now_ms)?;
    Ok(Admission { admitted: Admitted::New, balances: balances(conn, tenant, &counters, admit.now_ms)? })
}

/// Applies `step` to the stored record of `id` and stores the result; a
/// refused step stores nothing.
fn settle(
    conn: &Connection,
    tenant: &str,
    id: &str,
    now_ms: i64,
    step: impl FnOnce(Reservation) -> Result<Reservation, Refusal>,
) -> Result<Result<Reservation, Refusal>, EmbeddedError> {
    let Some(record) = load(conn, tenant, id)? else {
        return Ok(Err(Refusal::NotFound));
    };
    match step(record) {
        Ok(next) => {
            save(conn, tenant, &next, None, now_ms)?;
            Ok(Ok(next))
        }
        Err(refusal) => Ok(Err(refusal)),
    }
}

/// A commit: [`meterline_limits::commit`], its holds moved to the actual amounts.
pub(super) fn commit(
    conn: &Connection,
    tenant: &str,
    id: &str,
    holds: Vec<meterline_limits::Hold>,
    fingerprint: &str,
    now_ms: i64,
) -> Result<Result<Reservation, Refusal>, EmbeddedError> {
    settle(conn, tenant, id, now_ms, |r| meterline_limits::commit(r, holds, fingerprint, now_ms))
}

/// A release: [`meterline_limits::release`], its holds freed.
pub(super) fn release(conn: &Connection, tenant: &str, id: &str, now_ms: i64) -> Result<Result<Reservation, Refusal>, EmbeddedError> {
    settle(conn, tenant, id, now_ms, |r| meterline_limits::release(r, now_ms))
}

/// The event metered under `key` was counted: [`meterline_limits::counted`]
/// frees the reservation's holds, if `key` is a reservation's.
pub(super) fn counted(conn: &Connection, tenant: &str, key: &str, now_ms: i64) -> Result<(), EmbeddedError> {
    if let Some(record) = load_key(conn, tenant, key)? {
        save(conn, tenant, &meterline_limits::counted(record), None, now_ms)?;
    }
    Ok(())
}

/// Rewrites up to `limit` held reservations past their expiry as expired
/// ([`meterline_limits::expire`]) and deletes their holds.
pub(super) fn sweep(conn: &Connection, now_ms: i64, limit: i64) -> Result<usize, rusqlite::Error> {
    let due: Vec<(String, String, String)> = conn
        .prepare_cached("SELECT tenant, key, record FROM limit_reservations WHERE sweep_at_ms <= ?1 LIMIT ?2")?
        .query_map(params![now_ms, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (tenant, key, text) in &due {
        let stored = parse(tenant, key, text).and_then(|r| save(conn, tenant, &meterline_limits::expire(r), None, now_ms));
        match stored {
            Ok(()) => {}
            Err(EmbeddedError::Sqlite(e)) => return Err(e),
            Err(e) => {
                // A record that does not parse is left for a reader to report,
                // but no longer swept: one bad row must not stall the sweep.
                tracing::warn!(error = %e, %tenant, "a reservation record does not parse; left in place");
                conn.prepare_cached("UPDATE limit_reservations SET sweep_at_ms = NULL WHERE tenant = ?1 AND key = ?2")?.execute(params![tenant, key])?;
                conn.prepare_cached("DELETE FROM limit_holds WHERE tenant = ?1 AND reservation = ?2")?.execute(params![tenant, key])?;
            }
        }
    }
    Ok(due.len())
}

/// Deletes up to `limit` counters past their `keep_until` and up to `limit`
/// reservation records past their keeping time, with their holds.
pub(super) fn purge(conn: &Connection, now_ms: i64, limit: i64) -> Result<usize, rusqlite::Error> {
    let counters = conn
        .prepare_cached(
            "DELETE FROM limit_counters WHERE (tenant, counter) IN \
             (SELECT tenant, counter FROM limit_counters WHERE keep_until < ?1 LIMIT ?2)",
        )?
        .execute(params![now_ms / 1_000, limit])?;
    let records: Vec<(String, String)> = conn
        .prepare_cached("SELECT tenant, key FROM limit_reservations WHERE purge_at_ms < ?1 LIMIT ?2")?
        .query_map(params![now_ms, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (tenant, key) in &records {
        conn.prepare_cached("DELETE FROM limit_holds WHERE tenant = ?1 AND reservation = ?2")?.execute(params![tenant, key])?;
        conn.prepare_cached("DELETE FROM limit_reservations WHERE tenant = ?1 AND key = ?2")?.execute(params![tenant, key])?;
    }
    Ok(counters + records.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_limits::{Charge, Counter, Hold};

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().expect("open");
        super::super::schema::migrate(&mut conn).expect("migrate");
        conn
    }

    fn admit_one(id: &str, amount: i64, limit: i64, expires_at_ms: i64, now_ms: i64) -> Admit {
        let counter = Counter { key: "c".into(), keep_until: 10_000 };
        Admit {
            reservation: Reservation {
                id: id.into(),
                state: ReservationState::Held,
                created_at_ms: now_ms,
                expires_at_ms,
                holds: vec![Hold { counter: "c".into(), amount, keep_until: 10_000 }],
                counted: false,
                commit_fingerprint: None,
            },
            idempotency_key: None,
            checks: vec![Charge { counter, amount, limit, hard: true }],
            now_ms,
        }
    }

    #[test]
    fn a_hold_past_its_expiry_stops_counting_before_and_after_the_sweep() {
        let conn = db();
        let first = admit(&conn, "t", &admit_one("rsv_a.x", 1, 1, 2_000, 1_000)).expect("admit");
        assert_eq!((first.admitted, first.balances), (Admitted::New, vec![Balance { used: 0, reserved: 1 }]));
        let full = admit(&conn, "t", &admit_one("rsv_b.x", 1, 1, 3_000, 1_500)).expect("admit");
        assert_eq!(full.admitted, Admitted::Denied(vec![0]));
        assert_eq!(balances(&conn, "t", &["c".into()], 2_000).expect("read"), vec![Balance { used: 0, reserved: 0 }]);
        assert_eq!(sweep(&conn, 2_000, 10).expect("sweep"), 1);
        assert_eq!(load(&conn, "t", "rsv_a.x").expect("load").map(|r| r.state), Some(ReservationState::Expired));
        assert_eq!(load(&conn, "t", "rsv_a.y").expect("load"), None, "another id with the same key is not it");
        assert_eq!(admit(&conn, "t", &admit_one("rsv_b.x", 1, 1, 3_000, 2_000)).expect("admit").admitted, Admitted::New);
        assert_eq!(balances(&conn, "u", &["c".into()], 2_000).expect("read"), vec![Balance::default()], "tenants apart");
    }

    #[test]
    fn counting_frees_the_holds_and_a_later_commit_only_records_itself() {
        let conn = db();
        admit(&conn, "t", &admit_one("rsv_a.x", 5, 10, 2_000, 1_000)).expect("admit");
        add_used(&conn, "t", "c", 2, 10_000).expect("count");
        counted(&conn, "t", "rsv_a", 1_100).expect("counted");
        assert_eq!(balances(&conn, "t", &["c".into()], 1_100).expect("read"), vec![Balance { used: 2, reserved: 0 }]);
        let actual = vec![Hold { counter: "c".into(), amount: 2, keep_until: 10_000 }];
        let r = commit(&conn, "t", "rsv_a.x", actual, "f", 1_200).expect("commit").expect("committed");
        assert!(r.holds.is_empty() && r.counted && r.state == ReservationState::Committed);
        assert_eq!(release(&conn, "t", "rsv_a.x", 1_300).expect("release"), Err(Refusal::Committed));
        assert_eq!(release(&conn, "t", "rsv_z.x", 1_300).expect("release"), Err(Refusal::NotFound));
    }

    #[test]
    fn purge_drops_what_nothing_reads_any_more() {
        let conn = db();
        admit(&conn, "t", &admit_one("rsv_a.x", 1, 10, 2_000, 1_000)).expect("admit");
        add_used(&conn, "t", "c", 1, 5).expect("count");
        assert_eq!(purge(&conn, 1_000, 10).expect("purge"), 0);
        let later = 2_000 + KEEP_AFTER_EXPIRY_MS + 1;
        assert_eq!(purge(&conn, later, 10).expect("purge"), 2, "the counter and the record");
        assert_eq!(load(&conn, "t", "rsv_a.x").expect("load"), None);
    }
}
