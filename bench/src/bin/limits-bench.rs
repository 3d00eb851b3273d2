//! Limits on this machine: reserve-then-commit latency and pairs/s at 1, 16
//! and 64 concurrent clients, in the distributed mode (one `meterline-ingest`
//! process over a private Redis and the stack's broker) beside the raw store
//! (`redis-benchmark` running an admit-sized Lua script on the same Redis),
//! and in the embedded mode (the all-in-one server over SQLite).
//!
//! `cargo run --release -p meterline-bench --bin limits-bench -- [SECONDS] [USERS] [LEVELS] [MODES]`
//! (seconds per level, default 20; users spread over, default 1,000; levels
//! as `1,16,64`; modes `distributed,embedded`, both by default) with the
//! stack up (`eval "$(scripts/stack up)"`) and `meterline-ingest` built in
//! the same profile. Prints a table, the CPU each process spent per pair
//! (and per raw admit), and one `BENCH_JSON {...}` line.

#[path = "limits_bench/cpu.rs"]
mod cpu;

use cpu::{Pids, Reading, Who};
use meterline_tests::stack::{Process, Redis};
use meterline_tests::{Embedded, create_topic, free_port, poll_until, stack_var, temp_dir, tenants_toml, unique_topic};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const INGEST: &str = "acme-ingest-key";
const ADMIN: &str = "acme-admin-key";
/// The goals of the limits issue.
const RESERVE_P99_AT_16_MS: f64 = 5.0;
const RESERVE_P99_AT_64_MS: f64 = 10.0;
const COMMIT_P99_MS: f64 = 50.0;
const MIN_RATIO: f64 = 0.25;

/// The raw store's admit, the work of Meterline's (`store-redis/src/scripts/admit.lua`)
/// for one hard limit: read the counter and its held sum, compare with the
/// estimate and the limit, add the hold, write the reservation's small hash.
/// KEYS = counter, held sum, reservation (one hash tag); ARGV = amount, limit, expires_at_ms.
const RAW_ADMIT: &str = "local used = tonumber(redis.call('GET', KEYS[1]) or '0') \
     local held = tonumber(redis.call('GET', KEYS[2]) or '0') \
     if used + held + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end \
     redis.call('INCRBY', KEYS[2], ARGV[1]) \
     redis.call('HSET', KEYS[3], 'state', 'held', 'amount', ARGV[1], 'expires_at_ms', ARGV[3], 'holds', ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. KEYS[2]) \
     redis.call('PEXPIRE', KEYS[3], 600000) \
     return 1";

/// One level's client-side numbers for one mode.
#[derive(Debug, Default)]
struct Level {
    reserve: Vec<Duration>,
    commit: Vec<Duration>,
    pairs: usize,
    denied: usize,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
}

impl Level {
    fn pairs_per_s(&self) -> f64 {
        self.pairs as f64 / self.secs.max(1e-9)
    }

    fn json(&self) -> Value {
        json!({
            "pairs": self.pairs,
            "pairs_per_s": self.pairs_per_s(),
            "reserve_p50_ms": pct(&self.reserve, 0.5),
            "reserve_p99_ms": pct(&self.reserve, 0.99),
            "commit_p50_ms": pct(&self.commit, 0.5),
            "commit_p99_ms": pct(&self.commit, 0.99),
            "denied": self.denied,
            "errors": self.errors,
            "first_error": self.first_error,
        })
    }
}

/// What `redis-benchmark` measured at one concurrency.
#[derive(Debug, Clone, Copy)]
struct Raw {
    requests: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// One reserve-then-commit pair's outcome.
enum Pair {
    Done(Duration, Duration),
    Denied,
    Failed(String),
}

async fn pair(client: &reqwest::Client, url: &str, user: usize) -> Pair {
    let body = json!({
        "user_id": format!("user-{user}"),
        "customer_id": format!("cust-{}", user % 20),
        "feature": "chat",
        "model": "gpt-4o",
        "estimate": {"input_tokens": 500, "output_tokens": 200},
    });
    let t = Instant::now();
    let answer = client.post(format!("{url}/v1/reservations")).bearer_auth(INGEST).json(&body).send().await;
    let (status, held) = match answer {
        Ok(r) => (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null)),
        Err(e) => return Pair::Failed(format!("reserve: {e}")),
    };
    let reserve = t.elapsed();
    if status != 200 {
        return Pair::Failed(format!("reserve: {status} {held}"));
    }
    if held["allowed"] != true {
        return Pair::Denied;
    }
    let Some(id) = held["reservation_id"].as_str() else { return Pair::Failed(format!("reserve: no id in {held}")) };
    let t = Instant::now();
    let answer = client
        .post(format!("{url}/v1/reservations/{id}/commit"))
        .bearer_auth(INGEST)
        .json(&json!({"input_tokens": 450, "output_tokens": 150}))
        .send()
        .await;
    match answer {
        Ok(r) if r.status() == 200 => Pair::Done(reserve, t.elapsed()),
        Ok(r) => {
            let status = r.status();
            Pair::Failed(format!("commit: {status} {}", r.text().await.unwrap_or_default()))
        }
        Err(e) => Pair::Failed(format!("commit: {e}")),
    }
}

/// `clients` clients, each looping reserve then commit for `secs` seconds
/// after one untimed warm-up pair (its connection), users spread over `users`.
async fn run_level(url: &str, clients: usize, secs: u64, users: usize, salt: usize) -> Level {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (barrier, url) = (barrier.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
            let mut level = Level::default();
            // A client's users: a stride through all of them, so clients rarely share one.
            let mut n = c * 7_919 + salt;
            let _ = pair(&client, &url, n % users).await;
            barrier.wait().await;
            let deadline = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < deadline {
                n = n.wrapping_add(clients * 104_729 + 1);
                match pair(&client, &url, n % users).await {
                    Pair::Done(r, c) => {
                        level.pairs += 1;
                        level.reserve.push(r);
                        level.commit.push(c);
                    }
                    Pair::Denied => level.denied += 1,
                    Pair::Failed(e) => {
                        level.errors += 1;
                        level.first_error.get_or_insert(e);
                    }
                }
            }
            level
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut total = Level::default();
    for t in tasks {
        let l = t.await.expect("client task");
        total.pairs += l.pairs;
        total.denied += l.denied;
        total.errors += l.errors;
        total.reserve.extend(l.reserve);
        total.commit.extend(l.commit);
        if total.first_error.is_none() {
            total.first_error = l.first_error;
        }
    }
    total.secs = started.elapsed().as_secs_f64();
    total.reserve.sort();
    total.commit.sort();
    total
}

/// Plan `default`: every admit checks two hard limits that never deny.
async fn put_default_plan(url: &str) -> anyhow::Result<()> {
    let limits = json!({"limits": [
        {"name": "daily-cost", "measure": "cost_usd", "period": "day", "amount": "1000000", "hard": true},
        {"name": "daily-calls", "measure": "events", "period": "day", "amount": "1000000000", "hard": true},
    ]});
    let r = reqwest::Client::new().put(format!("{url}/v1/plans/default")).bearer_auth(ADMIN).json(&limits).send().await?;
    let status = r.status();
    anyhow::ensure!(status == 200, "PUT /v1/plans/default: {status} {}", r.text().await.unwrap_or_default());
    Ok(())
}

/// `redis-cli` on the bench Redis with `args`: its trimmed output.
fn redis_cli(redis: &Redis, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &redis.port.to_string()]).args(args).output()?;
    anyhow::ensure!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `redis-benchmark -c CLIENTS -n REQUESTS --csv EVALSHA ...` over `users`
/// counters, all keys under one hash tag: requests/s and latency percentiles.
fn redis_benchmark(redis: &Redis, sha: &str, clients: usize, requests: usize, users: usize) -> anyhow::Result<Raw> {
    let expires = (chrono::Utc::now().timestamp_millis() + 300_000).to_string();
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string(), "-r", &users.to_string(), "--csv"])
        .args(["EVALSHA", sha, "3", "{ml:raw}:u:__rand_int__", "{ml:raw}:h:__rand_int__", "{ml:raw}:r:__rand_int__"])
        .args(["1", "1000000000000", &expires])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "redis-benchmark failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    // The header, then "<test>","rps","avg","min","p50","p95","p99","max".
    let row = text.lines().rev().find(|l| !l.trim().is_empty() && !l.starts_with("\"test\"")).unwrap_or_default();
    let fields: Vec<f64> = row.rsplitn(8, ',').take(7).map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN)).collect();
    anyhow::ensure!(fields.len() == 7 && fields.iter().all(|f| f.is_finite()), "unexpected redis-benchmark output: {text}");
    // rsplitn gives the fields from the right: max, p99, p95, p50, min, avg, rps.
    Ok(Raw { requests, rps: fields[6], p50_ms: fields[3], p99_ms: fields[1] })
}

/// The raw admit rate at `clients`: a short probe sizes a run of about `secs` seconds.
/// Also answers the probe's request count.
fn raw_level(redis: &Redis, sha: &str, clients: usize, secs: u64, users: usize) -> anyhow::Result<(Raw, usize)> {
    let probe = redis_benchmark(redis, sha, clients, 2_000.max(clients * 50), users)?;
    let requests = ((probe.rps * secs as f64) as usize).clamp(2_000, 20_000_000);
    Ok((redis_benchmark(redis, sha, clients, requests, users)?, probe.requests))
}

fn ingest_toml(topic: &str, port: u16, redis: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_secs = 5\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\npartitions = 4\nproduce_timeout_ms = 3000\n\
         [limits]\nredis_url = \"{redis}\"\n{}",
        stack_var("METERLINE_TEST_KAFKA_BROKERS"),
        tenants_toml()
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

/// The distributed goals at one level: (reserve p99, commit p99, ratio), `None` where none is set.
fn goals(clients: usize, level: &Level, ratio: f64) -> (Option<bool>, bool, bool) {
    let reserve_goal = match clients {
        16 => Some(RESERVE_P99_AT_16_MS),
        64 => Some(RESERVE_P99_AT_64_MS),
        _ => None,
    };
    (reserve_goal.map(|g| pct(&level.reserve, 0.99) <= g), pct(&level.commit, 0.99) <= COMMIT_P99_MS, ratio >= MIN_RATIO)
}

/// One level's CPU seconds per process, as per-operation microseconds.
fn per_op_us(cpu: &Reading, ops: f64) -> [f64; 4] {
    std::array::from_fn(|i| cpu.0[i] / ops.max(1.0) * 1e6)
}

fn cpu_json(cpu: &Reading, ops: f64) -> Value {
    let us = per_op_us(cpu, ops);
    let mut map = serde_json::Map::new();
    for (who, us) in cpu::ALL.iter().zip(us) {
        map.insert(who.name().replace(' ', "_"), json!(us));
    }
    map.insert("total".into(), json!(us.iter().sum::<f64>()));
    Value::Object(map)
}

/// The distributed mode and the raw store: (levels, raw levels, CPU per level, CPU per raw level).
async fn distributed(secs: u64, users: usize, levels: &[usize]) -> anyhow::Result<(Vec<Level>, Vec<Raw>, Vec<Reading>, Vec<Reading>)> {
    let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
    // One ingest process over a private Redis (AOF, an fsync per write, as
    // deployed) and the stack's broker.
    let redis = Redis::private().await;
    let topic = unique_topic("limits-bench");
    create_topic(&brokers, &topic, 4).await;
    let port = free_port();
    let mut ingest = Process::start("meterline-ingest", &ingest_toml(&topic, port, &redis.url()));
    let url = format!("http://127.0.0.1:{port}");
    poll_until(Duration::from_secs(30), "ingest to answer", || async {
        reqwest::get(format!("{url}/healthz")).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    put_default_plan(&url).await?;
    let sha = redis_cli(&redis, &["SCRIPT", "LOAD", RAW_ADMIT])?;
    anyhow::ensure!(sha.len() == 40, "SCRIPT LOAD answered {sha:?}");
    let broker_port = format!("tcp://{brokers}");
    let pids = Pids {
        ingest: ingest.pid(),
        redis: cpu::find(&["redis-server", &redis.addr()]),
        broker: cpu::find(&["tansu", &broker_port]).or_else(|| cpu::find(&["tansu"])),
    };

    let (mut done, mut raw, mut cpus, mut raw_cpus) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, &clients) in levels.iter().enumerate() {
        let before = cpu::read(&pids);
        let level = run_level(&url, clients, secs, users, i * 31).await;
        cpus.push(cpu::read(&pids).since(&before));
        eprintln!("limits-bench: distributed, {clients} clients: {:.0} pairs/s", level.pairs_per_s());
        done.push(level);
        let before = cpu::read(&pids);
        let (r, probe) = raw_level(&redis, &sha, clients, secs, users)?;
        // The probe's CPU is not the sized run's: taken out by its share of the requests.
        let spent = cpu::read(&pids).since(&before);
        raw_cpus.push(Reading(std::array::from_fn(|k| spent.0[k] * r.requests as f64 / (r.requests + probe) as f64)));
        eprintln!("limits-bench: raw admit, {clients} clients: {:.0} requests/s", r.rps);
        raw.push(r);
    }
    ingest.stop().await;
    drop(redis);
    Ok((done, raw, cpus, raw_cpus))
}

/// The embedded mode: the all-in-one server in this process, over a fresh data dir.
async fn embedded(secs: u64, users: usize, levels: &[usize]) -> anyhow::Result<Vec<Level>> {
    let dir = temp_dir("limits-bench");
    let server = Embedded::start(&dir, "").await;
    poll_until(Duration::from_secs(30), "the embedded server to answer", || async {
        reqwest::get(format!("{}/healthz", server.url)).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    put_default_plan(&server.url).await?;
    let mut out = Vec::new();
    for (i, &clients) in levels.iter().enumerate() {
        let level = run_level(&server.url, clients, secs, users, i * 31).await;
        eprintln!("limits-bench: embedded, {clients} clients: {:.0} pairs/s", level.pairs_per_s());
        out.push(level);
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.first().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let users: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(1_000).max(1);
    let levels: Vec<usize> = args.get(2).map_or("1,16,64", String::as_str).split(',').map(str::parse).collect::<Result<_, _>>()?;
    let modes = args.get(3).map_or("distributed,embedded", String::as_str);
    let unknown: Vec<&str> = modes.split(',').filter(|m| !matches!(*m, "distributed" | "embedded")).collect();
    anyhow::ensure!(unknown.is_empty(), "unknown modes {unknown:?}: distributed, embedded");

    let (dist, raw, cpus, raw_cpus) =
        if modes.contains("distributed") { distributed(secs, users, &levels).await? } else { (Vec::new(), Vec::new(), Vec::new(), Vec::new()) };
    let emb = if modes.contains("embedded") { embedded(secs, users, &levels).await? } else { Vec::new() };

    println!(
        "limits-bench: reserve-then-commit pairs, {secs} s per level, {users} users, plan `default` with two hard limits that never deny, {} cores",
        std::thread::available_parallelism()?
    );
    println!("raw: redis-benchmark EVALSHA of an admit-sized script (read counter and held sum, compare, INCRBY, HSET, PEXPIRE) on the same Redis (AOF, appendfsync always)");
    println!(
        "| mode | clients | reserve p50 ms | reserve p99 ms | commit p50 ms | commit p99 ms | pairs/s | raw admits/s (p99 ms) | pairs/s ÷ raw | reserve p99 goal | commit p99 ≤ {COMMIT_P99_MS} ms | ratio ≥ {MIN_RATIO} | denied/errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|");
    let row = |mode: &str, clients: usize, l: &Level, raw_cell: String, ratio_cell: String, goal_cells: [String; 3]| {
        println!(
            "| {mode} | {clients} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {raw_cell} | {ratio_cell} | {} | {} | {} | {}/{} |",
            pct(&l.reserve, 0.5),
            pct(&l.reserve, 0.99),
            pct(&l.commit, 0.5),
            pct(&l.commit, 0.99),
            l.pairs_per_s(),
            goal_cells[0],
            goal_cells[1],
            goal_cells[2],
            l.denied,
            l.errors,
        );
    };
    let dash = || "—".to_owned();
    let mut json_levels = Vec::new();
    for (i, &clients) in levels.iter().enumerate() {
        let mut level = json!({"clients": clients});
        if let (Some(d), Some(r)) = (dist.get(i), raw.get(i)) {
            let ratio = d.pairs_per_s() / r.rps;
            let (reserve_ok, commit_ok, ratio_ok) = goals(clients, d, ratio);
            let reserve_goal = match (clients, reserve_ok) {
                (16, Some(ok)) => format!("≤ {RESERVE_P99_AT_16_MS} ms: {}", verdict(ok)),
                (64, Some(ok)) => format!("≤ {RESERVE_P99_AT_64_MS} ms: {}", verdict(ok)),
                _ => dash(),
            };
            row(
                "distributed",
                clients,
                d,
                format!("{:.0} ({:.2})", r.rps, r.p99_ms),
                format!("{ratio:.2}"),
                [reserve_goal, verdict(commit_ok).to_owned(), verdict(ratio_ok).to_owned()],
            );
            level["distributed"] = d.json();
            level["raw"] = json!({"requests": r.requests, "admits_per_s": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms});
            level["ratio"] = json!(ratio);
            level["goals"] = json!({"reserve_p99": reserve_ok, "commit_p99": commit_ok, "ratio": ratio_ok});
            level["cpu_us_per_pair"] = cpu_json(&cpus[i], d.pairs as f64);
            level["cpu_us_per_raw_admit"] = cpu_json(&raw_cpus[i], r.requests as f64);
        }
        if let Some(e) = emb.get(i) {
            row("embedded", clients, e, dash(), dash(), [dash(), dash(), dash()]);
            level["embedded"] = e.json();
        }
        json_levels.push(level);
    }
    if !dist.is_empty() {
        // What each process spent: on shared cores, the pairs/s a level can
        // reach is bounded by its total, as the raw admits/s is by the raw's.
        println!("CPU µs per distributed pair (per raw admit), by process; `ceiling` is raw CPU per admit ÷ CPU per pair, the ratio if both were CPU-bound:");
        println!("| clients | {} | total | ceiling |", cpu::ALL.map(Who::name).join(" | "));
        println!("|---:|{}---:|---:|", "---:|".repeat(cpu::ALL.len()));
        for (i, &clients) in levels.iter().enumerate() {
            let pair = per_op_us(&cpus[i], dist[i].pairs as f64);
            let admit = per_op_us(&raw_cpus[i], raw[i].requests as f64);
            let cells: Vec<String> = pair.iter().zip(admit).map(|(p, a)| format!("{p:.0} ({a:.0})")).collect();
            let (p, a) = (pair.iter().sum::<f64>(), admit.iter().sum::<f64>());
            println!("| {clients} | {} | {p:.0} ({a:.0}) | {:.2} |", cells.join(" | "), a / p.max(1e-9));
        }
    }
    for (mode, list) in [("distributed", &dist), ("embedded", &emb)] {
        if let Some(e) = list.iter().find_map(|l| l.first_error.as_deref()) {
            println!("limits-bench: {mode}: first error: {e}");
        }
    }
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "limits",
            "seconds_per_level": secs,
            "users": users,
            "goals": {"reserve_p99_ms_at_16": RESERVE_P99_AT_16_MS, "reserve_p99_ms_at_64": RESERVE_P99_AT_64_MS,
                      "commit_p99_ms": COMMIT_P99_MS, "min_ratio": MIN_RATIO},
            "levels": json_levels,
        })
    );
    Ok(())
}
