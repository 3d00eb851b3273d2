//! Retention on real servers: ClickHouse 18.16 drops the back-dated
//! partitions past each horizon (an injected clock), carries forward the
//! progress markers that still matter, waits while events await repair,
//! and keeps every row inside the windows; the query API and the all-in-one
//! answer 400 naming `from` for a range older than what is kept.

use chrono::{DateTime, Duration, Utc};
use meterline_clickhouse::{Rollup, Store};
use meterline_domain::{Keep, Kept, RetentionConfig};
use meterline_tests::stack::ClickHouse;
use meterline_tests::*;
use serde_json::Value;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).map(|t| t.to_utc()).expect("rfc3339")
}

fn secs(text: &str) -> i64 {
    at(text).timestamp()
}

fn rfc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

async fn store(ch: &ClickHouse, database: &str) -> Store {
    let config: meterline_clickhouse::ClickHouseConfig = toml::from_str(&format!("url = \"{}\"\ndatabase = \"{database}\"\n", ch.url)).expect("config");
    let store = meterline_clickhouse::connect(&config).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// An event of partition `p` at `offset`, dated and written at `written`.
async fn event(ch: &ClickHouse, db: &str, key: &str, p: i32, offset: i64, written: i64) {
    ch.query(&format!(
        "INSERT INTO {db}.events (tenant, idempotency_key, user_id, event_time, kafka_topic, kafka_partition, kafka_offset, written_at, cost_nanos) \
         SELECT 'acme', '{key}', 'u', toDateTime({written}), 't', {p}, {offset}, toDateTime({written}), 5"
    ))
    .await;
}

/// A data row (`marker` None) or a progress marker of partition `p` in a rollup table.
async fn rollup(ch: &ClickHouse, db: &str, table: &str, marker: Option<(i32, i64)>, written: i64) {
    let span = if table == "rollups_user_span" { ("span_days, ", "1, ") } else { ("", "") };
    let (tenant, p, offset, events, markers) = match marker {
        Some((p, offset)) => ("", p, offset, 0, 1),
        None => ("acme", -1, -1, 1, 0),
    };
    ch.query(&format!(
        "INSERT INTO {db}.{table} ({}tenant, window_start, user_id, source_topic, source_partition, source_offset, events, cost_nanos, markers, written_at) \
         SELECT {}'{tenant}', toDateTime({written}), 'u', 't', {p}, {offset}, {events}, {}, {markers}, toDateTime({written})",
        span.0, span.1, events * 5
    ))
    .await;
}

async fn count(ch: &ClickHouse, sql: &str) -> u64 {
    ch.query(sql).await.trim().parse().expect("count")
}

/// `written_at` of the rows left in `table`, oldest first.
async fn written(ch: &ClickHouse, db: &str, table: &str) -> Vec<i64> {
    ch.query(&format!("SELECT toUInt32(written_at) FROM {db}.{table} WHERE tenant != '' ORDER BY written_at"))
        .await
        .lines()
        .map(|l| l.parse().expect("secs"))
        .collect()
}

#[tokio::test]
async fn clickhouse_drops_partitions_past_each_horizon_and_nothing_inside() {
    let ch = ClickHouse::shared();
    let db = ch.database(&format!("retention_{}", free_port())).await;
    let store = store(&ch, &db).await;
    // The injected clock: raw events keep 400 days (from 2024-12-11), minute rollups 60 (from 2025-11-16).
    let now = at("2026-01-15T12:00:00Z");
    let retention = RetentionConfig { rollups_minute_days: Keep::Days(60), ..RetentionConfig::default() };
    assert_eq!(retention.oldest(Kept::Events, now), Some(at("2024-12-11T00:00:00Z")));
    assert_eq!(retention.oldest(Kept::RollupsMinute, now), Some(at("2025-11-16T00:00:00Z")));

    // Events: two months wholly before the horizon, then the month holding
    // it (rows before and at the horizon), then later ones.
    let events = ["2024-10-15T00:00:00Z", "2024-11-30T23:59:59Z", "2024-12-01T00:00:00Z", "2024-12-10T23:59:59Z", "2024-12-11T00:00:00Z", "2025-06-01T00:00:00Z"];
    for (n, t) in events.iter().enumerate() {
        event(&ch, &db, &format!("k{n}"), 1, n as i64, secs(t)).await;
    }
    // Minute rollups: data rows in a dropped month and in the one holding the horizon.
    for t in ["2025-09-10T00:00:00Z", "2025-10-31T23:59:00Z", "2025-11-01T00:00:00Z", "2025-11-16T00:00:00Z", "2026-01-15T11:00:00Z"] {
        rollup(&ch, &db, "rollups_minute", None, secs(t)).await;
    }
    // Markers: partition 0 idle since 2024-10 (its only marker would go with
    // its month); partition 1's latest is recent, its older ones may go.
    rollup(&ch, &db, "rollups_minute", Some((0, 41)), secs("2024-10-15T00:00:00Z")).await;
    rollup(&ch, &db, "rollups_minute", Some((1, 10)), secs("2025-09-10T00:00:00Z")).await;
    rollup(&ch, &db, "rollups_minute", Some((1, 20)), secs("2026-01-15T11:00:00Z")).await;
    // Day rollups are kept forever by default.
    rollup(&ch, &db, "rollups_user_span", None, secs("2020-01-01T00:00:00Z")).await;
    rollup(&ch, &db, "rollups_user_daily", None, secs("2020-01-01T00:00:00Z")).await;
    for (offset, t) in [(1, "2024-11-01T00:00:00Z"), (2, "2024-12-11T00:00:00Z")] {
        ch.query(&format!("INSERT INTO {db}.dead_letters (kafka_topic, kafka_partition, kafka_offset, written_at) SELECT 't', 0, {offset}, toDateTime({})", secs(t))).await;
    }
    // Alerts: an old resolved one (two versions: open, then resolved), an old one still open, a resolved one inside the window.
    for (user, state, version, opened) in [("a", "open", 1, "2024-11-01T00:00:00Z"), ("a", "resolved", 2, "2024-11-01T00:00:00Z"), ("b", "open", 1, "2024-11-01T00:00:00Z"), ("c", "resolved", 2, "2024-12-11T00:00:00Z")] {
        ch.query(&format!(
            "INSERT INTO {db}.alerts (tenant, user_id, rule, opened_at, state, version) SELECT 'acme', '{user}', 'peers', toDateTime({}), '{state}', {version}",
            secs(opened)
        ))
        .await;
    }

    let purged = store.purge(&retention, now).await.expect("purge");
    let dropped = |table: &str| purged.iter().find(|p| p.table == table).map(|p| (p.partitions, p.rows, p.held));
    assert_eq!(dropped("events"), Some((2, 2, false)), "{purged:?}");
    // Two months of data rows, and the month of partition 0's only marker.
    assert_eq!(dropped("rollups_minute").map(|d| d.0), Some(3), "{purged:?}");
    assert_eq!(dropped("rollups_user_span"), None);

    // Nothing inside the window went: every event from the horizon on, and
    // the rest of the month holding it.
    let left = written(&ch, &db, "events").await;
    assert_eq!(left, events[2..].iter().map(|t| secs(t)).collect::<Vec<_>>());
    let minutes = written(&ch, &db, "rollups_minute").await;
    assert_eq!(minutes, ["2025-11-01T00:00:00Z", "2025-11-16T00:00:00Z", "2026-01-15T11:00:00Z"].map(secs).to_vec());
    assert_eq!(count(&ch, &format!("SELECT count() FROM {db}.rollups_user_span")).await, 1);
    assert_eq!(count(&ch, &format!("SELECT count() FROM {db}.rollups_user_daily")).await, 1);
    assert_eq!(count(&ch, &format!("SELECT count() FROM {db}.dead_letters")).await, 1);

    // Progress survives: partition 0's marker was carried forward (same
    // offset, written now), partition 1's latest was never at risk.
    let p0 = store.progress(Rollup::Minute, "t", 0).await.expect("progress");
    assert_eq!((p0.rollup_offset, i64::from(p0.marker_written_at)), (Some(41), now.timestamp()));
    assert_eq!(store.progress(Rollup::Minute, "t", 1).await.expect("progress").rollup_offset, Some(20));

    // Only the old resolved alert goes, with its open version (a mutation: polled).
    poll_until(std::time::Duration::from_secs(30), "the old resolved alert deleted", || async {
        let users = ch.query(&format!("SELECT user_id FROM {db}.alerts ORDER BY user_id, version")).await;
        (users.lines().collect::<Vec<_>>() == ["b", "c"]).then_some(())
    })
    .await;

    // Idempotent: a second run (another aggregator's) finds nothing more.
    let again = store.purge(&retention, now).await.expect("purge again");
    assert!(again.iter().all(|p| p.partitions == 0 && p.rows == 0), "{again:?}");
    assert_eq!(written(&ch, &db, "events").await, left);
}

#[tokio::test]
async fn a_marker_with_events_past_it_holds_its_table_until_repaired() {
    let ch = ClickHouse::shared();
    let db = ch.database(&format!("retention_held_{}", free_port())).await;
    let store = store(&ch, &db).await;
    let now = at("2026-01-15T12:00:00Z");
    let retention = RetentionConfig { rollups_minute_days: Keep::Days(60), ..RetentionConfig::default() };
    // Partition 2's last marker (offset 5) is in a month past the minute
    // horizon, and a crash left event 6 without rollups after it.
    let old = secs("2025-09-10T00:00:00Z");
    rollup(&ch, &db, "rollups_minute", Some((2, 5)), old).await;
    rollup(&ch, &db, "rollups_minute", None, old).await;
    event(&ch, &db, "orphan", 2, 6, old + 60).await;

    let purged = store.purge(&retention, now).await.expect("purge");
    assert!(purged.iter().any(|p| p.table == "rollups_minute" && p.held && p.partitions == 0), "{purged:?}");
    // Carrying the marker forward now would hide event 6 from the repair (it
    // scans from the marker's written_at): so nothing of the table went.
    assert_eq!(count(&ch, &format!("SELECT count() FROM {db}.rollups_minute")).await, 2);
    let p = store.progress(Rollup::Minute, "t", 2).await.expect("progress");
    assert_eq!(store.orphans("t", 2, p).await.expect("orphans"), Some(6));

    // The repair on assignment rolls event 6 up with its marker; then the month goes.
    store.roll_up(Rollup::Minute, "t", &[meterline_clickhouse::Range { partition: 2, after: 5, up_to: 6 }], now.timestamp() as u32, p.repair_since()).await.expect("repair");
    let purged = store.purge(&retention, now).await.expect("purge");
    assert!(purged.iter().any(|p| p.table == "rollups_minute" && !p.held && p.partitions == 1), "{purged:?}");
    assert_eq!(store.progress(Rollup::Minute, "t", 2).await.expect("progress").rollup_offset, Some(6));
}

/// The 400 a query over a range older than what is kept answers.
fn assert_not_kept(status: u16, body: &Value, oldest: DateTime<Utc>) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "from", "{body}");
    assert_eq!(body["error"]["code"], "range_not_kept", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    // The horizon is a UTC day: a run across midnight may see the next one.
    let days = [oldest, oldest + Duration::days(1)].map(rfc);
    assert!(days.iter().any(|d| message.contains(d.as_str())), "{message} names none of {days:?}");
}

#[tokio::test]
async fn the_query_api_refuses_a_range_before_the_horizon_naming_from() {
    let ch = ClickHouse::shared();
    let db = ch.database(&format!("retention_query_{}", free_port())).await;
    store(&ch, &db).await;
    let api = QueryApi::start(&ch.url, &db).await;
    let now = Utc::now();
    let oldest = RetentionConfig::default().oldest(Kept::Events, now).expect("finite");
    let key = Some("acme-read-key");
    let old = format!("from={}&to={}", rfc(now - Duration::days(450)), rfc(now - Duration::days(300)));
    for path in ["/v1/usage?granularity=hour", "/v1/events?user_id=u", "/v1/top-spenders?by=user_id", "/v1/alerts?state=all"] {
        let (status, body) = api.get(&format!("{path}&{old}"), key).await;
        assert_not_kept(status, &body, oldest);
    }
    // Inside the windows: answered.
    let inside = format!("from={}&to={}", rfc(now - Duration::days(399)), rfc(now));
    for path in ["/v1/usage?granularity=day&group_by=model", "/v1/events?user_id=u", "/v1/top-spenders?by=user_id"] {
        let (status, body) = api.get(&format!("{path}&{inside}"), key).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test]
async fn the_embedded_writer_purges_back_dated_rows_and_queries_before_the_horizon_are_refused() {
    let dir = temp_dir("retention");
    let extra = "[retention]\nrollups_minute_days = 40\n";
    // First start creates the database; the rows are then back-dated into it.
    Embedded::start(&dir, extra).await.stop().await;
    let now = Utc::now();
    let config = RetentionConfig { rollups_minute_days: Keep::Days(40), ..RetentionConfig::default() };
    let (oldest_events, oldest_minutes) = (config.oldest(Kept::Events, now).expect("finite"), config.oldest(Kept::RollupsMinute, now).expect("finite"));
    let day = |t: DateTime<Utc>| t.timestamp().div_euclid(86_400) * 86_400;
    {
        let conn = rusqlite::Connection::open(dir.join("meterline.db")).expect("open");
        let mut stamps: Vec<i64> = (0..3_000).map(|n| oldest_events.timestamp() - 1 - n).collect();
        stamps.extend([oldest_events.timestamp(), now.timestamp() - 60]);
        for (n, t) in stamps.iter().enumerate() {
            conn.execute(
                "INSERT INTO events VALUES ('acme', ?1, 0, ?2, 0, 'u', '', '', '', '', '', 1, 0, 0, 0, 0, 5, 0, 0, 0, '', ?2, ?2)",
                rusqlite::params![format!("k{n}"), t],
            )
            .expect("event");
        }
        for t in [oldest_minutes.timestamp() - 60, oldest_minutes.timestamp(), day(now - Duration::days(50))] {
            conn.execute("INSERT INTO rollups_minute VALUES ('acme', ?1, 'u', '', '', '', '', 1, 1, 0, 0, 0, 0, 5, 0, 0, 0)", [t]).expect("minute");
        }
        conn.execute("INSERT INTO rollups_daily_by_user VALUES ('acme', ?1, 'u', '', '', '', '', 0, 1, 0, 0, 0, 0, 7, 0, 0, 0)", [day(now - Duration::days(50))]).expect("day");
    }
    let server = Embedded::start(&dir, extra).await;
    let conn = rusqlite::Connection::open(dir.join("meterline.db")).expect("open");
    let rows = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).expect("count");
    // 3,000 rows past the horizon: several paced steps of at most 500, between commits.
    poll_until(std::time::Duration::from_secs(30), "the back-dated events purged", || async {
        (rows("SELECT count(*) FROM events") == 2).then_some(())
    })
    .await;
    assert_eq!(rows("SELECT min(event_time) FROM events"), oldest_events.timestamp(), "the row at the horizon stays");
    poll_until(std::time::Duration::from_secs(30), "the old minutes purged", || async {
        (rows("SELECT count(*) FROM rollups_minute") == 1).then_some(())
    })
    .await;
    assert_eq!(rows("SELECT min(window_start) FROM rollups_minute"), oldest_minutes.timestamp());

    let key = Some("acme-read-key");
    // Hour buckets read minute rows, kept 40 days: 50 days ago is refused.
    let (from, to) = (DateTime::from_timestamp(day(now - Duration::days(50)), 0).expect("t"), DateTime::from_timestamp(day(now - Duration::days(45)), 0).expect("t"));
    let range = format!("from={}&to={}", rfc(from), rfc(to));
    let (status, body) = get_json(&format!("{}/v1/usage?granularity=hour&{range}", server.url), key).await;
    assert_not_kept(status, &body, oldest_minutes);
    // Whole days per user read the day rollups, kept: answered, from them.
    let (status, body) = get_json(&format!("{}/v1/usage?granularity=total&group_by=user_id&{range}", server.url), key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"][0]["cost_usd"], "0.000000007", "{body}");
    // One user by feature, and a user's statement (by feature and model),
    // read minute rows here: the per-user day rows hold no feature or model.
    // Refused, where the day rows alone would have answered a partial sum.
    let (status, body) = get_json(&format!("{}/v1/usage?granularity=day&user_id=u&feature=f&{range}", server.url), key).await;
    assert_not_kept(status, &body, oldest_minutes);
    let (status, body) = get_json(&format!("{}/v1/users/u/usage?{range}", server.url), key).await;
    assert_not_kept(status, &body, oldest_minutes);
    let (status, body) = get_json(&format!("{}/v1/events?user_id=u&from={}&to={}", server.url, rfc(now - Duration::days(420)), rfc(now - Duration::days(300))), key).await;
    assert_not_kept(status, &body, oldest_events);
    server.stop().await;
}

#[tokio::test]
async fn the_running_aggregator_drops_back_dated_partitions_at_start() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("retention_agg").await;
    let store = store(&ch, &database).await;
    let now = Utc::now();
    // Back-dated: a 2020 month of events and minute rows, with partition 0's
    // only marker in it; and rows from yesterday.
    let (ancient, recent) = (secs("2020-03-10T00:00:00Z"), (now - Duration::days(1)).timestamp());
    event(&ch, &database, "ancient", 0, 0, ancient).await;
    event(&ch, &database, "recent", 0, 1, recent).await;
    rollup(&ch, &database, "rollups_minute", None, ancient).await;
    rollup(&ch, &database, "rollups_minute", Some((0, 1)), ancient).await;
    rollup(&ch, &database, "rollups_minute", None, recent).await;

    let metrics_port = free_port();
    let mut agg = meterline_tests::stack::Process::start("meterline-aggregator", &aggregator_config(metrics_port, &brokers, &topic, &ch.url, &database, ""));
    poll_until(std::time::Duration::from_secs(60), "the 2020 partitions dropped by the aggregator", || async {
        let tables = ["events", "rollups_minute"].map(|t| format!("SELECT count() FROM {database}.{t} WHERE written_at < toDateTime({recent})"));
        let left = ch.query(&tables.join(" UNION ALL ")).await;
        left.lines().all(|n| n.trim() == "0").then_some(())
    })
    .await;
    assert_eq!(written(&ch, &database, "events").await, vec![recent]);
    assert_eq!(written(&ch, &database, "rollups_minute").await, vec![recent]);
    let progress = store.progress(Rollup::Minute, "t", 0).await.expect("progress");
    assert_eq!(progress.rollup_offset, Some(1), "the marker was carried forward");
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("meterline_aggregator_retention_dropped_partitions_total{table=\"events\"} 1"), "{metrics}");
    agg.stop().await;
    ingest.stop().await;
}
