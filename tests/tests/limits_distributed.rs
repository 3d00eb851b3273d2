//! Limits in the distributed deployment, against real processes: two ingest
//! services serving reservations over one Redis, the aggregator counting
//! metered events into it, the broker and ClickHouse 18.16; through SIGKILLs
//! of the aggregator and of a reservation server, and a Redis restart.

use futures::future::join_all;
use meterline_tests::limits::{Distributed, aggregator_toml, call, ingest_toml};
use meterline_tests::stack::{ClickHouse, Process, Redis};
use meterline_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const ADMIN: &str = "acme-admin-key";
const INGEST: &str = "acme-ingest-key";
const READ: &str = "acme-read-key";

/// The deployment, and what these tests read of it.
struct Rig(Distributed);

impl std::ops::Deref for Rig {
    type Target = Distributed;
    fn deref(&self) -> &Distributed {
        &self.0
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Distributed {
        &mut self.0
    }
}

impl Rig {
    async fn start(name: &str, servers: usize, limits: &str) -> Rig {
        Rig(Distributed::start(name, servers, limits).await)
    }

    /// Events of one user metered in ClickHouse, by idempotency key.
    async fn metered(&self, user: &str) -> BTreeMap<String, u64> {
        let rows = self
            .ch
            .rows(&format!(
                "SELECT idempotency_key, count() AS n FROM {}.events WHERE tenant = 'acme' AND user_id = '{user}' GROUP BY idempotency_key FORMAT JSONEachRow",
                self.database
            ))
            .await;
        rows.iter()
            .map(|r| (r["idempotency_key"].as_str().unwrap_or_default().to_owned(), r["n"].as_str().and_then(|n| n.parse().ok()).or(r["n"].as_u64()).unwrap_or(0)))
            .collect()
    }
}


async fn put_plan(url: &str, plan: &str, limits: Value) {
    let (status, body) = call(reqwest::Method::PUT, &format!("{url}/v1/plans/{plan}"), ADMIN, Some(json!({ "limits": limits }))).await;
    assert_eq!(status, 200, "{body}");
}

async fn reserve(url: &str, user: &str, estimate: Value, ttl: u64) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        &format!("{url}/v1/reservations"),
        INGEST,
        Some(json!({"user_id": user, "feature": "chat", "model": "gpt-4o", "estimate": estimate, "ttl_secs": ttl})),
    )
    .await
}

async fn used(url: &str, user: &str, limit: &str) -> Option<String> {
    used_as(url, READ, user, limit).await
}

/// The used amount of `user`'s `limit`, read with `key` (its tenant's).
async fn used_as(url: &str, key: &str, user: &str, limit: &str) -> Option<String> {
    let (status, body) = call(reqwest::Method::GET, &format!("{url}/v1/users/{user}/limits"), key, None).await;
    if status != 200 {
        return None;
    }
    body["limits"].as_array()?.iter().find(|l| l["name"] == limit).map(|l| l["used"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn six_tabs_across_two_reservation_servers_get_exactly_ten() {
    let rig = Rig::start("six_tabs", 2, "").await;
    put_plan(rig.url(0), "default", json!([{"name": "daily-gens", "measure": "events", "period": "day", "amount": "10"}])).await;
    let answers = join_all((0..200).map(|i| reserve(rig.url(i), "tabby", json!({}), 300))).await;
    let allowed = answers.iter().filter(|(s, b)| *s == 200 && b["allowed"] == true).count();
    let denied = answers.iter().filter(|(s, b)| *s == 200 && b["allowed"] == false).count();
    assert_eq!((allowed, denied), (10, 190), "{:?}", answers.iter().find(|(s, _)| *s != 200));
    let denial = answers.iter().find(|(_, b)| b["allowed"] == false).map(|(_, b)| b.clone()).unwrap_or_default();
    assert_eq!(denial["denied_by"], json!(["daily-gens"]));
    assert_eq!(denial["limits"][0]["reserved"], "10");
    assert_eq!(denial["limits"][0]["remaining"], "0");
}

#[tokio::test]
async fn plain_events_count_and_a_commit_meters_once_through_the_pipeline() {
    let rig = Rig::start("plain_events", 1, "").await;
    let url = rig.url(0);
    put_plan(url, "default", json!([{"name": "daily-cost", "measure": "cost_usd", "period": "day", "amount": "1"}])).await;
    let now = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = (0..9)
        .map(|n| json!({"idempotency_key": format!("plain-{n}"), "timestamp": now, "user_id": "spender", "feature": "chat", "model": "gpt-4o", "cost_usd": "0.1"}))
        .collect();
    let (status, body) = call(reqwest::Method::POST, &format!("{url}/v1/events"), INGEST, Some(json!(events))).await;
    assert_eq!(status, 202, "{body}");
    let started = Instant::now();
    poll_until(Duration::from_secs(20), "the aggregator to count $0.90", || async {
        (used(url, "spender", "daily-cost").await.as_deref() == Some("0.9")).then_some(())
    })
    .await;
    println!("plain events counted toward the limit {} ms after their 202", started.elapsed().as_millis());
    let (_, denied) = reserve(url, "spender", json!({"cost_usd": "0.2"}), 60).await;
    assert_eq!(denied["allowed"], false, "{denied}");

    // Estimate $0.05, actual $0.01: the hold is replaced, then counted.
    let (_, held) = reserve(url, "saver", json!({"cost_usd": "0.05"}), 60).await;
    assert_eq!(held["allowed"], true, "{held}");
    assert_eq!(held["limits"][0]["reserved"], "0.05");
    let id = held["reservation_id"].as_str().unwrap_or_default().to_owned();
    let commit = format!("{url}/v1/reservations/{id}/commit");
    let mut keys = BTreeSet::new();
    for _ in 0..3 {
        let (status, body) = call(reqwest::Method::POST, &commit, INGEST, Some(json!({"cost_usd": "0.01", "input_tokens": 12}))).await;
        assert_eq!(status, 200, "{body}");
        keys.insert(body["idempotency_key"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(keys.len(), 1, "every retry names the same metered event");
    poll_until(Duration::from_secs(20), "the commit to be counted", || async {
        let (_, body) = call(reqwest::Method::GET, &format!("{url}/v1/users/saver/limits"), READ, None).await;
        let l = &body["limits"][0];
        (l["used"] == "0.01" && l["reserved"] == "0").then_some(())
    })
    .await;
    let metered = rig.metered("saver").await;
    assert_eq!(metered.values().sum::<u64>(), 1, "three commits, one event: {metered:?}");
    let (status, _) = call(reqwest::Method::POST, &format!("{url}/v1/reservations/{id}/release"), INGEST, None).await;
    assert_eq!(status, 409, "a committed reservation cannot be released");
}

#[tokio::test]
async fn sigkills_and_a_redis_restart_admit_nothing_past_the_limit_and_lose_no_commit() {
    // Deny while Redis is down: the hard limit must hold through the restart.
    let mut rig = Rig::start("limits_crash", 2, "on_store_error = \"deny\"\nstore_timeout_ms = 500").await;
    put_plan(rig.url(0), "default", json!([{"name": "daily", "measure": "events", "period": "day", "amount": "40"}])).await;
    let users = ["ann", "bob", "cat"];
    let mut committed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut allowed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut degraded = 0;
    for round in 0..12 {
        let urls: Vec<String> = rig.servers.iter().map(|(_, u)| u.clone()).collect();
        let calls = users.iter().flat_map(|u| (0..5).map(move |i| (*u, i))).map(|(user, i)| {
            let url = urls[(round + i) % urls.len()].clone();
            let urls = urls.clone();
            async move {
                let (status, body) = reserve(&url, user, json!({}), 600).await;
                let degraded = body["degraded"] == true;
                        if status != 200 || body["allowed"] != true {
                    return (user, None, degraded);
                }
                let id = body["reservation_id"].as_str().unwrap_or_default().to_owned();
                // Retry the commit until it is answered, on either server:
                // the client's job when its server died under it.
                for attempt in 0..80 {
                    let commit = format!("{}/v1/reservations/{id}/commit", urls[attempt % urls.len()]);
                    let (s, b) = call(reqwest::Method::POST, &commit, INGEST, Some(json!({"output_tokens": 3}))).await;
                    if s == 200 {
                        return (user, Some(b["idempotency_key"].as_str().unwrap_or_default().to_owned()), degraded);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                panic!("a commit was never answered");
            }
        });
        // The faults land while the round's calls are in flight.
        let chaos = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            match round {
                3 => rig.aggregator.kill().await,
                5 => rig.aggregator.restart(),
                6 => rig.servers[0].0.kill().await,
                7 => rig.redis.kill().await,
                9 => rig.redis.restart().await,
                10 => rig.servers[0].0.restart(),
                _ => {}
            }
        };
        let (answers, ()) = tokio::join!(join_all(calls), chaos);
        for (user, key, was_degraded) in answers {
            degraded += usize::from(was_degraded);
            if let Some(key) = key {
                *allowed.entry(user).or_default() += 1;
                committed.entry(user).or_default().insert(key);
            }
        }
    }
    println!("admitted and committed per user: {allowed:?}; answered while Redis was down: {degraded}");
    assert!(degraded > 0, "no reservation met the Redis outage; the test did not test it");
    for user in users {
        let n = allowed.get(user).copied().unwrap_or(0);
        assert!(n <= 40, "{user}: {n} reservations admitted past a hard limit of 40");
        assert!(n >= 20, "{user}: only {n} admitted; the test did not reach the limit");
    }
    // Every acknowledged commit is metered once, and the counters agree
    // with ClickHouse once the aggregator caught up.
    for user in users {
        let want = committed.get(user).cloned().unwrap_or_default();
        let metered = poll_until(Duration::from_secs(60), "every commit to be metered", || async {
            let m = rig.metered(user).await;
            want.iter().all(|k| m.contains_key(k)).then_some(m)
        })
        .await;
        assert!(metered.values().all(|n| *n == 1), "{user}: an event metered twice: {metered:?}");
        let total = metered.len().to_string();
        poll_until(Duration::from_secs(60), "the counter to equal the metered events", || async {
            (used(rig.url(1), user, "daily").await.as_deref() == Some(total.as_str())).then_some(())
        })
        .await;
    }
}

/// Limit alerts through the aggregator: events metered through ingest and
/// counted into Redis cross the plan's thresholds once each, the webhook
/// hears of them signed with the tenant's secret, and ClickHouse's `alerts`
/// holds them with rule `limit`; retried events fire nothing again.
#[tokio::test]
async fn limit_crossings_fire_once_through_the_aggregator() {
    const SECRET: &str = "whsec_distributed";
    let hooks = meterline_tests::webhook::Webhooks::start().await;
    let hook = &hooks.url;
    let limit_bodies = || -> Vec<(Value, Option<String>, Vec<u8>)> {
        hooks
            .requests()
            .into_iter()
            .filter_map(|(sig, raw)| serde_json::from_slice::<Value>(&raw).ok().filter(|b| b["kind"] == "limit").map(|b| (b, sig, raw)))
            .collect()
    };

    let hooked = format!(
        "[[tenants]]\nid = \"hooked\"\nwebhook_secret = \"{SECRET}\"\n\
         [[tenants.keys]]\nname = \"ingest\"\nsha256 = \"{}\"\nscopes = [\"ingest\"]\n\
         [[tenants.keys]]\nname = \"read\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n\
         [[tenants.keys]]\nname = \"admin\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
        meterline_schemas::tenants::hash_key("hooked-ingest"),
        meterline_schemas::tenants::hash_key("hooked-read"),
        meterline_schemas::tenants::hash_key("hooked-admin"),
    );
    let ch = ClickHouse::shared();
    let topic = unique_topic("limit_alerts");
    let database = ch.database(&format!("l_limit_alerts_{}", free_port())).await;
    create_topic(&stack_var("METERLINE_TEST_KAFKA_BROKERS"), &topic, 4).await;
    let redis = Redis::private().await;
    let agg_config = aggregator_toml(&topic, &ch, &database, free_port(), &redis.url())
        .replacen("[limits]\n", &format!("[alerts]\nwebhook_url = \"{hook}\"\nwebhook_retries = 1\n[limits]\n"), 1);
    let mut aggregator = Process::start("meterline-aggregator", &format!("{agg_config}\n{hooked}"));
    let port = free_port();
    let mut ingest = Process::start("meterline-ingest", &format!("{}\n{hooked}", ingest_toml(&topic, port, &redis.url(), "")));
    let url = format!("http://127.0.0.1:{port}");
    poll_until(Duration::from_secs(30), "ingest to answer", || async {
        reqwest::get(format!("{url}/healthz")).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    let plan = json!({"limits": [{"name": "daily", "measure": "events", "period": "day", "amount": "10", "notify_at": ["0.5", "1"]}]});
    let (status, body) = call(reqwest::Method::PUT, &format!("{url}/v1/plans/default"), "hooked-admin", Some(plan)).await;
    assert_eq!(status, 200, "{body}");
    let post_as = |user: &'static str, ns: std::ops::Range<usize>| {
        let url = url.clone();
        async move {
            let events: Vec<Value> = ns.map(|n| event(user, n)).collect();
            let (status, body) = call(reqwest::Method::POST, &format!("{url}/v1/events"), "hooked-ingest", Some(json!(events))).await;
            assert_eq!(status, 202, "{body}");
        }
    };
    let post = |ns: std::ops::Range<usize>| post_as("d1", ns);
    let verify = |header: Option<&str>, raw: &[u8]| {
        let header = header.expect("signed");
        let t: i64 = header.strip_prefix("t=").and_then(|r| r.split(',').next()).and_then(|t| t.parse().ok()).expect("t=");
        assert_eq!(header, meterline_limits::notify::signature(SECRET.as_bytes(), t, raw));
    };

    post(0..6).await;
    let first = poll_until(Duration::from_secs(60), "the 0.5 crossing at the webhook", || async {
        let got = limit_bodies();
        (!got.is_empty()).then_some(got)
    })
    .await;
    let (body, sig, raw) = &first[0];
    verify(sig.as_deref(), raw);
    assert_eq!((&body["tenant"], &body["subject_id"], &body["ratio"], &body["threshold"]), (&json!("hooked"), &json!("d1"), &json!("0.5"), &json!("5")), "{body}");
    // Counted per flush: the move may jump past the threshold.
    assert!(body["used"].as_str().and_then(|u| u.parse::<i64>().ok()).is_some_and(|u| (5..=6).contains(&u)), "{body}");

    post(0..6).await;
    post(6..12).await;
    let both = poll_until(Duration::from_secs(60), "the 1.0 crossing at the webhook", || async {
        let got = limit_bodies();
        (got.len() >= 2).then_some(got)
    })
    .await;
    verify(both[1].1.as_deref(), &both[1].2);
    assert_eq!((&both[1].0["event"], &both[1].0["ratio"]), (&json!("reached"), &json!("1")), "{}", both[1].0);
    post(0..12).await;
    post(12..14).await;
    let stored = poll_until(Duration::from_secs(30), "both alerts in ClickHouse", || async {
        let rows = ch
            .rows(&format!("SELECT user_id, state, threshold_nanos FROM {database}.alerts FINAL WHERE tenant = 'hooked' AND rule = 'limit' FORMAT JSONEachRow"))
            .await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    assert!(stored.iter().all(|r| r["user_id"] == "d1" && r["state"] == "open"), "{stored:?}");

    // Every d1 event counted: the flush holding the last of them has been
    // applied, and its crossings are read, stored and handed to the webhook
    // right after its apply, before the aggregator applies a later flush.
    let counted = poll_until(Duration::from_secs(30), "d1's 14 events counted", || async {
        used_as(&url, "hooked-read", "d1", "daily").await.filter(|u| u.parse::<u64>().is_ok_and(|n| n >= 14))
    })
    .await;
    assert_eq!(counted, "14", "the retried events were counted again");
    // A marker posted only now lands in a later flush: once its own
    // crossing is at the webhook, a second one for d1 would have been sent.
    post_as("d1-marker", 0..5).await;
    poll_until(Duration::from_secs(60), "the marker's crossing at the webhook", || async {
        limit_bodies().iter().any(|(b, _, _)| b["subject_id"] == "d1-marker").then_some(())
    })
    .await;
    let d1 = limit_bodies().into_iter().filter(|(b, _, _)| b["subject_id"] == "d1").count();
    assert_eq!(d1, 2, "each threshold fired exactly once");
    ingest.stop().await;
    aggregator.stop().await;
}

/// Who is nearest their caps, distributed: plain events counted by the
/// aggregator into Redis, ranked by the ingest service and by the query API
/// reading the same Redis (where the distributed dashboard reads it).
#[tokio::test]
async fn nearest_their_caps_ranks_from_redis_on_ingest_and_the_query_api() {
    let rig = Rig::start("nearest", 1, "").await;
    let url = rig.url(0).to_owned();
    let plan = json!([{"name": "daily", "measure": "events", "period": "day", "amount": "10"}]);
    put_plan(&url, "default", plan).await;
    let now = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = [("near-20", 2), ("near-90", 9), ("near-50", 5)]
        .into_iter()
        .flat_map(|(user, n)| (0..n).map(move |i| (user, i)))
        .map(|(user, i)| json!({"idempotency_key": format!("{user}-{i}"), "timestamp": now, "user_id": user, "feature": "chat", "model": "gpt-4o"}))
        .collect();
    let (status, body) = call(reqwest::Method::POST, &format!("{url}/v1/events"), INGEST, Some(json!(events))).await;
    assert_eq!(status, 202, "{body}");

    // The query API over the same ClickHouse and Redis, in-process.
    let text = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"{}\"\n[limits]\nredis_url = \"{}\"\n{}",
        rig.ch.url,
        rig.database,
        rig.redis.url(),
        tenants_toml()
    );
    let config = meterline_query_api::Config::load(&text, []).expect("query config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let query = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { meterline_query_api::serve(config, listener, std::future::pending()).await.expect("serve") });

    let ranked = |base: String| async move {
        let (status, body) = call(reqwest::Method::GET, &format!("{base}/v1/limits/nearest?limit=3"), READ, None).await;
        let rows: Vec<(String, String)> = body["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| (r["subject_id"].as_str().unwrap_or_default().to_owned(), r["ratio"].as_str().unwrap_or_default().to_owned()))
            .collect();
        (status, rows, body)
    };
    let expected: Vec<(String, String)> = [("near-90", "0.9"), ("near-50", "0.5"), ("near-20", "0.2")].map(|(u, r)| (u.to_owned(), r.to_owned())).to_vec();
    poll_until(Duration::from_secs(30), "the aggregator to count every event", || async {
        let (_, rows, _) = ranked(url.clone()).await;
        (rows == expected).then_some(())
    })
    .await;
    let (status, rows, body) = ranked(query.clone()).await;
    assert_eq!((status, rows), (200, expected.clone()), "the query API ranks the same from Redis: {body}");
    assert_eq!((body["subjects"][0]["used"].as_str(), body["subjects"][0]["limit"].as_str(), body["subjects"][0]["hard"].as_bool()), (Some("9"), Some("10"), Some(true)), "{body}");

    // A read key reads plans on both; changing one still needs admin.
    for base in [&url, &query] {
        let (status, plans) = call(reqwest::Method::GET, &format!("{base}/v1/plans"), READ, None).await;
        assert_eq!((status, plans["plans"][0]["plan_id"].as_str()), (200, Some("default")), "{base}: {plans}");
        let (status, one) = call(reqwest::Method::GET, &format!("{base}/v1/plans/default"), READ, None).await;
        assert_eq!((status, one["limits"][0]["name"].as_str()), (200, Some("daily")), "{base}: {one}");
    }
    let (status, body) = call(reqwest::Method::PUT, &format!("{url}/v1/plans/default"), READ, Some(json!({"limits": []}))).await;
    assert_eq!(status, 403, "a read key cannot change a plan: {body}");
    let (status, _) = call(reqwest::Method::PUT, &format!("{query}/v1/plans/default"), ADMIN, Some(json!({"limits": []}))).await;
    assert_eq!(status, 405, "the query API serves no plan changes");
}
