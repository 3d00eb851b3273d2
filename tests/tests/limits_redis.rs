//! The Redis limits store's contract against a private Redis: exact admission
//! under concurrency, idempotency, expiry, the reservation transitions, counting
//! once per log position, durability across a SIGKILL, and bounded failure
//! while Redis is down.

use meterline_limits::{
    Admit, Admitted, Balance, Charge, Counter, Hold, LimitStore, LimitsError, Refusal, Reservation, ReservationState, Subject, SubscriptionView,
    parse_plan,
};
use meterline_redis::{Applied, RedisLimits};
use meterline_tests::stack::Redis;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const T: &str = "acme";
/// Counters kept until 2096: no test outlives them.
const KEEP: i64 = 4_000_000_000;
const TTL_MS: i64 = 60_000;

/// Real time: the store's record expiries are absolute, so tests start at now and move forward from it.
fn base() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis()).expect("ms")
}

fn id(n: u128) -> String {
    format!("rsv_{n:032x}.7b7d")
}

fn charge(counter: &str, amount: i64, limit: i64, hard: bool) -> Charge {
    Charge { counter: Counter { key: counter.to_owned(), keep_until: KEEP }, amount, limit, hard }
}

fn admit(n: u128, checks: Vec<Charge>, idempotency_key: Option<&str>, now_ms: i64) -> Admit {
    let holds = checks
        .iter()
        .filter(|c| c.amount != 0)
        .map(|c| Hold { counter: c.counter.key.clone(), amount: c.amount, keep_until: c.counter.keep_until })
        .collect();
    Admit {
        reservation: Reservation {
            id: id(n),
            state: ReservationState::Held,
            created_at_ms: now_ms,
            expires_at_ms: now_ms + TTL_MS,
            holds,
            counted: false,
            commit_fingerprint: None,
        },
        idempotency_key: idempotency_key.map(str::to_owned),
        checks,
        now_ms,
    }
}

fn hold(counter: &str, amount: i64) -> Vec<Hold> {
    vec![Hold { counter: counter.to_owned(), amount, keep_until: KEEP }]
}

async fn store(redis: &Redis) -> RedisLimits {
    RedisLimits::connect(&redis.url()).await.expect("connect")
}

async fn balance(s: &RedisLimits, counter: &str, now_ms: i64) -> Balance {
    s.balances(T, &[counter.to_owned()], now_ms).await.expect("balances")[0]
}

#[tokio::test]
async fn two_hundred_concurrent_admits_on_a_limit_of_ten_admit_exactly_ten() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let calls = (0..200u128).map(|n| {
        let s = s.clone();
        tokio::spawn(async move { s.admit(T, &admit(n, vec![charge("u:c:0:u1", 1, 10, true)], None, now)).await })
    });
    let mut new = 0;
    let mut denied = 0;
    for call in futures::future::join_all(calls).await {
        let a = call.expect("task").expect("admit");
        assert!(a.balances[0].reserved <= 10, "a balance over the limit: {:?}", a.balances);
        match a.admitted {
            Admitted::New => new += 1,
            Admitted::Denied(refused) => {
                assert_eq!(refused, [0]);
                denied += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((new, denied), (10, 190));
    assert_eq!(balance(&s, "u:c:0:u1", now).await, Balance { used: 0, reserved: 10 });
}

#[tokio::test]
async fn a_replayed_idempotency_key_returns_the_first_reservation() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let first = s.admit(T, &admit(1, vec![charge("u:c:0:u1", 3, 10, true)], Some("req-1"), now)).await.expect("admit");
    assert_eq!(first.admitted, Admitted::New);
    assert_eq!(first.balances, [Balance { used: 0, reserved: 3 }]);
    let again = s.admit(T, &admit(2, vec![charge("u:c:0:u1", 3, 10, true)], Some("req-1"), now + 10)).await.expect("admit");
    match again.admitted {
        Admitted::Existing(r) => assert_eq!((r.id.as_str(), r.state, r.holds), (id(1).as_str(), ReservationState::Held, hold("u:c:0:u1", 3))),
        other => panic!("{other:?}"),
    }
    assert_eq!(again.balances, [Balance { used: 0, reserved: 3 }], "held once");
    assert_eq!(s.reservation(T, &id(2)).await.expect("read"), None, "the replay stored nothing");
    // The key is the tenant's: another tenant's same key is a new reservation.
    let other = s.admit("other", &admit(3, vec![charge("u:c:0:u1", 3, 10, true)], Some("req-1"), now)).await.expect("admit");
    assert_eq!(other.admitted, Admitted::New);
}

#[tokio::test]
async fn a_denial_changes_nothing() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    s.apply(T, "events/0", None, 1, &[("u:hard:0:u1".to_owned(), 8, KEEP)], &[]).await.expect("apply");
    let checks = vec![charge("u:soft:0:u1", 5, 1, false), charge("u:hard:0:u1", 3, 10, true)];
    let a = s.admit(T, &admit(1, checks, Some("req-1"), now)).await.expect("admit");
    assert_eq!(a.admitted, Admitted::Denied(vec![1]), "only the hard check refuses");
    assert_eq!(a.balances, [Balance { used: 0, reserved: 0 }, Balance { used: 8, reserved: 0 }]);
    assert_eq!(s.reservation(T, &id(1)).await.expect("read"), None);
    // Nor did the denial take the idempotency key: a smaller retry is admitted.
    let b = s.admit(T, &admit(2, vec![charge("u:hard:0:u1", 2, 10, true)], Some("req-1"), now)).await.expect("admit");
    assert_eq!(b.admitted, Admitted::New);
    assert_eq!(b.balances, [Balance { used: 8, reserved: 2 }]);
    // Exhausted: not even a zero estimate.
    let c = s.admit(T, &admit(3, vec![charge("u:hard:0:u1", 0, 10, true)], None, now)).await.expect("admit");
    assert_eq!(c.admitted, Admitted::Denied(vec![0]));
}

#[tokio::test]
async fn expiry_frees_the_room() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let one = || vec![charge("u:c:0:u1", 1, 1, true)];
    assert_eq!(s.admit(T, &admit(1, one(), None, now)).await.expect("admit").admitted, Admitted::New);
    assert_eq!(s.admit(T, &admit(2, one(), None, now + TTL_MS - 1)).await.expect("admit").admitted, Admitted::Denied(vec![0]));
    assert_eq!(balance(&s, "u:c:0:u1", now + TTL_MS).await, Balance { used: 0, reserved: 0 }, "expired at expires_at");
    assert_eq!(s.reservation(T, &id(1)).await.expect("read").expect("kept").state, ReservationState::Expired);
    assert_eq!(s.admit(T, &admit(3, one(), None, now + TTL_MS)).await.expect("admit").admitted, Admitted::New);
    // A release after expiry answers expired, and frees nothing more.
    let r = s.release(T, &id(1), now + TTL_MS + 1).await.expect("release").expect("not refused");
    assert_eq!(r.state, ReservationState::Expired);
    assert_eq!(balance(&s, "u:c:0:u1", now + TTL_MS + 1).await, Balance { used: 0, reserved: 1 });
}

#[tokio::test]
async fn a_commit_reads_its_statuses_balances_in_the_same_step() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let (c, other) = ("u:c:0:u1", "u:e:0:u1");
    s.admit(T, &admit(1, vec![charge(c, 5, 100, true)], None, now)).await.expect("admit");
    let counters = [c.to_owned(), other.to_owned()];
    let (r, balances) = s.commit_and_balances(T, &id(1), &hold(c, 3), "f", now + 1, &counters).await.expect("commit");
    assert_eq!(r.map(|r| r.state), Ok(ReservationState::Committed));
    assert_eq!(balances, [Balance { used: 0, reserved: 3 }, Balance { used: 0, reserved: 0 }], "after the commit, in the order asked");
    let (again, balances) = s.commit_and_balances(T, &id(1), &hold(c, 3), "f", now + 2, &counters).await.expect("retry");
    assert!(again.is_ok() && balances == [Balance { used: 0, reserved: 3 }, Balance { used: 0, reserved: 0 }], "a retry answers the same: {balances:?}");
    let (refused, balances) = s.commit_and_balances(T, &id(2), &hold(c, 3), "f", now + 2, &counters).await.expect("answer");
    assert_eq!((refused, balances), (Err(Refusal::NotFound), vec![]), "a refusal reads nothing");
}

#[tokio::test]
async fn commit_moves_the_hold_to_the_actual_usage_until_counted() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let c = "u:c:0:u1";
    s.admit(T, &admit(1, vec![charge(c, 5, 100, true)], Some("req-1"), now)).await.expect("admit");
    let r = s.commit(T, &id(1), &hold(c, 3), "f", now + 1).await.expect("commit").expect("committed");
    assert_eq!((r.state, r.holds.clone(), r.commit_fingerprint.as_deref()), (ReservationState::Committed, hold(c, 3), Some("f")));
    assert_eq!(balance(&s, c, now + 1).await, Balance { used: 0, reserved: 3 });
    assert_eq!(s.commit(T, &id(1), &hold(c, 3), "f", now + 2).await.expect("commit"), Ok(r.clone()), "a retry is the same");
    assert_eq!(s.commit(T, &id(1), &hold(c, 4), "g", now + 2).await.expect("commit"), Err(Refusal::DifferentUsage));
    assert_eq!(s.release(T, &id(1), now + 2).await.expect("release"), Err(Refusal::Committed));
    // Committed holds do not expire.
    assert_eq!(balance(&s, c, now + 10 * TTL_MS).await, Balance { used: 0, reserved: 3 });

    let a = s.apply(T, "events/0", None, 10, &[(c.to_owned(), 3, KEEP)], &["rsv_00000000000000000000000000000001".to_owned()]).await;
    assert_eq!(a.expect("apply"), Applied::Done);
    assert_eq!(balance(&s, c, now + 10 * TTL_MS).await, Balance { used: 3, reserved: 0 }, "counted: used, no longer held");
    let n = s.reservation(T, &id(1)).await.expect("read").expect("kept");
    assert!(n.counted && n.holds.is_empty() && n.state == ReservationState::Committed, "{n:?}");
    assert_eq!(s.commit(T, &id(1), &hold(c, 3), "f", now + 3).await.expect("commit").map(|r| r.counted), Ok(true));
    assert_eq!(balance(&s, c, now + 3).await, Balance { used: 3, reserved: 0 }, "a late retry holds nothing");
}

#[tokio::test]
async fn release_commit_after_expiry_and_counted_first() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let c = "u:c:0:u1";
    let checks = || vec![charge(c, 5, 100, true)];
    assert_eq!(s.commit(T, &id(9), &[], "f", now).await.expect("commit"), Err(Refusal::NotFound));
    assert_eq!(s.release(T, &id(9), now).await.expect("release"), Err(Refusal::NotFound));

    // Held -> released: the hold goes; a retry is the same; a commit is refused.
    s.admit(T, &admit(1, checks(), None, now)).await.expect("admit");
    let r = s.release(T, &id(1), now + 1).await.expect("release").expect("released");
    assert_eq!((r.state, r.holds.len()), (ReservationState::Released, 0));
    assert_eq!(balance(&s, c, now + 1).await.reserved, 0);
    assert_eq!(s.release(T, &id(1), now + 2).await.expect("release"), Ok(r));
    assert_eq!(s.commit(T, &id(1), &hold(c, 1), "f", now + 2).await.expect("commit"), Err(Refusal::Released));
    // Same nonce, another action: not this reservation.
    assert_eq!(s.release(T, "rsv_00000000000000000000000000000001.00", now).await.expect("release"), Err(Refusal::NotFound));

    // Expired (not yet swept: commit sweeps first, either way the same) -> committed, holding the actual usage.
    s.admit(T, &admit(2, checks(), None, now)).await.expect("admit");
    let late = s.commit(T, &id(2), &hold(c, 2), "f", now + TTL_MS + 5).await.expect("commit").expect("never refused for expiry");
    assert_eq!((late.state, late.holds), (ReservationState::Committed, hold(c, 2)));
    assert_eq!(balance(&s, c, now + TTL_MS + 5).await.reserved, 2);

    // Counted before the commit is recorded, then committed: nothing more is held.
    s.admit(T, &admit(3, checks(), None, now)).await.expect("admit");
    assert_eq!(balance(&s, c, now).await.reserved, 7);
    s.apply(T, "events/0", None, 1, &[(c.to_owned(), 4, KEEP)], &[id(3)]).await.expect("apply");
    let counted = s.reservation(T, &id(3)).await.expect("read").expect("kept");
    assert_eq!((counted.state, counted.counted, counted.commit_fingerprint.clone()), (ReservationState::Committed, true, None));
    assert_eq!(balance(&s, c, now).await, Balance { used: 4, reserved: 2 });
    let r = s.commit(T, &id(3), &hold(c, 4), "f", now + 1).await.expect("commit").expect("recorded");
    assert_eq!((r.holds.len(), r.commit_fingerprint.as_deref()), (0, Some("f")));
    assert_eq!(balance(&s, c, now + 1).await, Balance { used: 4, reserved: 2 });
}

#[tokio::test]
async fn apply_counts_each_marker_once() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let c = "c:c:0:acme-corp";
    let counts = [(c.to_owned(), 7, KEEP)];
    assert_eq!(s.marker(T, "events/3").await.expect("marker"), None);
    assert_eq!(s.apply(T, "events/3", None, 100, &counts, &[]).await.expect("apply"), Applied::Done);
    assert_eq!(s.apply(T, "events/3", None, 100, &counts, &[]).await.expect("apply"), Applied::Stale(Some(100)));
    assert_eq!(s.apply(T, "events/3", Some(99), 120, &counts, &[]).await.expect("apply"), Applied::Stale(Some(100)));
    assert_eq!(balance(&s, c, base()).await.used, 7, "a stale apply changed nothing");
    assert_eq!(s.apply(T, "events/3", Some(100), 120, &counts, &[]).await.expect("apply"), Applied::Done);
    assert_eq!(s.marker(T, "events/3").await.expect("marker"), Some(120));
    assert_eq!(s.marker(T, "events/4").await.expect("marker"), None, "per source");
    assert_eq!(balance(&s, c, base()).await.used, 14);

    assert_eq!(s.progress("events/3").await.expect("progress"), None);
    s.set_progress("events/3", 42).await.expect("set");
    assert_eq!(s.progress("events/3").await.expect("progress"), Some(42));
}

#[tokio::test]
async fn amounts_are_exact_past_two_to_the_fifty_three() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let c = "u:cost:0:whale";
    let used = (1i64 << 62) + 1;
    let limit = used + 7;
    s.apply(T, "events/0", None, 1, &[(c.to_owned(), used, KEEP)], &[]).await.expect("apply");
    // 2^62 + 1 + 6 fits; as doubles these would all round to the same value.
    let a = s.admit(T, &admit(1, vec![charge(c, 6, limit, true)], None, now)).await.expect("admit");
    assert_eq!(a.admitted, Admitted::New);
    assert_eq!(a.balances, [Balance { used, reserved: 6 }]);
    let b = s.admit(T, &admit(2, vec![charge(c, 2, limit, true)], None, now)).await.expect("admit");
    assert_eq!(b.admitted, Admitted::Denied(vec![0]), "one nano-unit over");
    assert_eq!(s.admit(T, &admit(3, vec![charge(c, 1, limit, true)], None, now)).await.expect("admit").admitted, Admitted::New);
    let big = i64::MAX - 5;
    s.admit(T, &admit(4, vec![charge("u:other:0:whale", big, i64::MAX, true)], None, now)).await.expect("admit");
    assert_eq!(s.reservation(T, &id(4)).await.expect("read").expect("stored").holds[0].amount, big);
    assert_eq!(balance(&s, "u:other:0:whale", now).await.reserved, big);
}

#[tokio::test]
async fn plans_and_subscriptions() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let plan = parse_plan(r#"{"limits":[{"name":"cap","measure":"cost_usd","period":"day","amount":"1.5"}]}"#).expect("plan");
    s.put_plan(T, &plan.view("pro")).await.expect("put");
    s.put_plan(T, &plan.view("default")).await.expect("put");
    let ids: Vec<String> = s.plans(T).await.expect("plans").into_iter().map(|p| p.plan_id).collect();
    assert_eq!(ids, ["default", "pro"]);
    assert_eq!(s.plans("other").await.expect("plans"), []);
    assert!(s.delete_plan(T, "pro").await.expect("delete"));
    assert!(!s.delete_plan(T, "pro").await.expect("delete"));

    let sub = SubscriptionView { plan: "pro".into(), cycle_start: Some("2026-01-15T00:00:00Z".into()) };
    s.put_subscription(T, &Subject::user("u1"), &sub).await.expect("put");
    assert_eq!(s.subscription(T, &Subject::user("u1")).await.expect("get"), Some(sub.clone()));
    assert_eq!(s.subscription(T, &Subject::customer("u1")).await.expect("get"), None, "scopes are apart");
    let many = s.subscriptions(T, &[Subject::customer("x"), Subject::user("u1")]).await.expect("get");
    assert_eq!(many, [None, Some(sub)]);
    let book = s.book(T, Some("u1"), Some("x")).await.expect("book");
    assert_eq!((book.plans.len(), book.user.map(|u| u.plan), book.customer), (1, Some("pro".to_owned()), None));
    assert!(s.delete_subscription(T, &Subject::user("u1")).await.expect("delete"));
    assert_eq!(s.subscription(T, &Subject::user("u1")).await.expect("get"), None);
}

#[tokio::test]
async fn data_survives_a_sigkill_and_restart() {
    let mut redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let plan = parse_plan(r#"{"limits":[{"name":"cap","measure":"events","period":"day","amount":"10"}]}"#).expect("plan");
    s.put_plan(T, &plan.view("default")).await.expect("put");
    s.admit(T, &admit(1, vec![charge("u:c:0:u1", 2, 10, true)], Some("req-1"), now)).await.expect("admit");
    s.apply(T, "events/0", None, 5, &[("u:c:0:u1".to_owned(), 3, KEEP)], &[]).await.expect("apply");
    redis.restart().await;

    let counters = ["u:c:0:u1".to_owned()];
    let balances = poll(|| s.balances(T, &counters, now)).await;
    assert_eq!(balances, [Balance { used: 3, reserved: 2 }]);
    assert_eq!(s.plans(T).await.expect("plans").len(), 1);
    assert_eq!(s.marker(T, "events/0").await.expect("marker"), Some(5));
    let replay = s.admit(T, &admit(2, vec![charge("u:c:0:u1", 2, 10, true)], Some("req-1"), now)).await.expect("admit");
    assert!(matches!(replay.admitted, Admitted::Existing(r) if r.id == id(1)), "the scripts load again after a restart");
}

/// Retries `call` until Redis answers (the connection comes back on its own).
async fn poll<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LimitsError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < deadline, "redis did not come back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn calls_fail_unavailable_within_bounds_while_redis_is_down() {
    let mut redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    s.admit(T, &admit(1, vec![charge("u:c:0:u1", 1, 10, true)], None, now)).await.expect("admit");
    redis.kill().await;
    for _ in 0..3 {
        let started = Instant::now();
        let e = s.admit(T, &admit(2, vec![charge("u:c:0:u1", 1, 10, true)], None, now)).await.expect_err("redis is down");
        assert!(matches!(e, LimitsError::Unavailable { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
    }
    redis.restart().await;
    let third = admit(3, vec![charge("u:c:0:u1", 1, 10, true)], None, now);
    let a = poll(|| s.admit(T, &third)).await;
    assert_eq!((a.admitted, a.balances), (Admitted::New, vec![Balance { used: 0, reserved: 2 }]));

    // Down from the start: connecting does not wait, calls fail in bounded time.
    let port = redis.port;
    drop(redis);
    let started = Instant::now();
    let s = RedisLimits::connect(&format!("redis://127.0.0.1:{port}")).await.expect("connects lazily");
    let e = s.plans(T).await.expect_err("nothing listens");
    assert!(matches!(e, LimitsError::Unavailable { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
}

/// One command in raw RESP on a fresh connection; the reply's first line.
async fn raw(addr: &str, args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).await.expect("reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn unreadable_records_are_corrupt_not_unavailable() {
    let redis = Redis::private().await;
    let s = store(&redis).await;
    let now = base();
    let key = "{ml:acme}:r:rsv_00000000000000000000000000000001";
    let fields = ["HSET", key, "id", &id(1), "state", "held", "created_at_ms", "0", "expires_at_ms", "9999999999999", "counted", "0", "holds", "x y"];
    assert_eq!(raw(&redis.addr(), &fields).await, ":6\r\n");
    let e = s.release(T, &id(1), now).await.expect_err("bad hold line");
    assert!(matches!(&e, LimitsError::Corrupt { key: k, .. } if k == key), "{e:?}");
    assert!(matches!(s.reservation(T, &id(1)).await, Err(LimitsError::Corrupt { .. })));
    raw(&redis.addr(), &["HSET", "{ml:acme}:plans", "pro", "{not json"]).await;
    assert!(matches!(s.plans(T).await, Err(LimitsError::Corrupt { .. })));
}
