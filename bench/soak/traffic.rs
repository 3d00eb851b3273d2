//! What runs beside the load generator during the soak: freshness probes,
//! the dashboard's queries, the aggregator's SIGKILLs, and the runaway
//! user's alerts.

use meterline_tests::stack::Process;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The probe user: its events are the soak's own, outside the generator's truth.
pub const PROBE_USER: &str = "soak-probe";
/// Each probe's cost in nano-USD ($0.000001234) and tokens (10 in, 1 out).
pub const PROBE_COST_NANOS: i64 = 1_234;
pub const PROBE_TOKENS: i64 = 11;

const READ_KEY: &str = "acme-read-key";

pub use meterline_bench::aggregator_assigned as assigned;

/// A wide range: late events go up to 30 days back.
pub fn range_params(now: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "from={}&to={}",
        (now - chrono::Duration::days(40)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(3)).format("%Y-%m-%dT%H:%M:%SZ")
    )
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let r = client.get(url).bearer_auth(READ_KEY).send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status.is_success() { Ok(body) } else { Err(format!("{status}: {body}")) }
}

/// One probe: when it was sent (seconds into the soak) and how long until
/// the query API counted it (`None`: not within the probe's deadline).
#[derive(Debug, Clone)]
pub struct Probe {
    pub sent_at: f64,
    pub visible_ms: Option<f64>,
}

/// Every 10 s, one probe event for `PROBE_USER` sent to ingest (resent with
/// the same key until a 202, as a client retries), then the query API polled
/// every 50 ms until its event count includes it. A probe still invisible
/// after 10 minutes, or when the load ends, is recorded as such (it was
/// accepted, so it still counts in the totals) and the next one goes out.
/// Returns every probe; writes `freshness.csv`.
pub async fn probe_loop(ingest: String, query: String, started: Instant, out: std::path::PathBuf, mut done: watch::Receiver<bool>) -> anyhow::Result<Vec<Probe>> {
    use std::io::Write;
    let mut csv = std::fs::File::create(out.join("freshness.csv"))?;
    writeln!(csv, "t_s,visible_ms")?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut probes = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.changed() => {}
        }
        if *done.borrow() {
            return Ok(probes);
        }
        let n = probes.len();
        let now = chrono::Utc::now();
        let event = json!([{
            "idempotency_key": format!("soak-probe-{n}"),
            "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "user_id": PROBE_USER,
            "customer_id": "cust-probe",
            "feature": "chat",
            "model": "claude-x",
            "input_tokens": 10,
            "output_tokens": 1,
            "cost_usd": "0.000001234",
        }]);
        let sent = Instant::now();
        let sent_at = started.elapsed().as_secs_f64();
        loop {
            let r = client.post(format!("{ingest}/v1/events")).bearer_auth("acme-ingest-key").json(&event).send().await;
            if r.is_ok_and(|r| r.status().as_u16() == 202) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let url = format!("{query}/v1/usage?granularity=total&user_id={PROBE_USER}&{}", range_params(now));
        let want = n as u64 + 1;
        let mut visible_ms = None;
        // The load's end does not wait on a probe stuck behind a backlog.
        while sent.elapsed() < Duration::from_secs(600) && !*done.borrow() {
            if let Ok(body) = get(&client, &url).await {
                let events: u64 = body["rows"].as_array().map_or(0, |rows| rows.iter().filter_map(|r| r["events"].as_u64()).sum());
                if events >= want {
                    visible_ms = Some(sent.elapsed().as_secs_f64() * 1e3);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writeln!(csv, "{sent_at:.1},{}", visible_ms.map_or(String::new(), |v| format!("{v:.0}")))?;
        probes.push(Probe { sent_at, visible_ms });
    }
}

/// The query loop's latencies since the sampler last drained them.
#[derive(Debug, Default)]
pub struct QueryStats {
    window: Mutex<(Vec<f64>, u64)>,
    /// When the runaway user's first alert was seen, seconds into the soak.
    pub first_alert_at: Mutex<Option<f64>>,
}

impl QueryStats {
    fn record(&self, ms: Option<f64>) {
        let mut w = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match ms {
            Some(ms) => w.0.push(ms),
            None => w.1 += 1,
        }
    }

    /// (answered, errors, p99 ms) since the last drain.
    pub fn drain(&self) -> (u64, u64, Option<f64>) {
        let mut w = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut ms, errors) = (std::mem::take(&mut w.0), std::mem::take(&mut w.1));
        ms.sort_by(f64::total_cmp);
        (ms.len() as u64, errors, crate::verdict::quantile(&ms, 0.99))
    }
}

/// A dashboard left open: every second, top spenders, usage by day and
/// model, the top user's statement, and the runaway user's alerts until the
/// first shows.
pub async fn query_loop(query: String, started: Instant, stats: std::sync::Arc<QueryStats>, done: watch::Receiver<bool>) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    let paths = [
        "/v1/top-spenders?metric=cost&limit=100".to_owned(),
        "/v1/usage?granularity=day&group_by=model".to_owned(),
        "/v1/users/user-0000/usage".to_owned(),
    ];
    let alerts = format!("{query}/v1/alerts?user_id=user-runaway&state=all");
    while !*done.borrow() {
        for p in &paths {
            let t = Instant::now();
            let ok = get(&client, &format!("{query}{p}")).await.is_ok();
            stats.record(ok.then(|| t.elapsed().as_secs_f64() * 1e3));
        }
        let seen = stats.first_alert_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
        if !seen && let Ok(body) = get(&client, &alerts).await
            && body["alerts"].as_array().is_some_and(|a| !a.is_empty())
        {
            *stats.first_alert_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One SIGKILL: when (seconds into the soak) and how long until the new
/// process had partitions again (`None`: not within 5 minutes).
#[derive(Debug, Clone)]
pub struct Kill {
    pub at: f64,
    pub reassigned_secs: Option<f64>,
}

/// SIGKILLs the aggregator every `every` and restarts it at once; hands the
/// process back when `done`.
pub async fn kill_loop(mut agg: Process, every: Duration, metrics_url: String, started: Instant, mut done: watch::Receiver<bool>) -> (Process, Vec<Kill>) {
    let mut kills = Vec::new();
    let mut next = started + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = done.changed() => {}
        }
        if *done.borrow() {
            return (agg, kills);
        }
        let at = started.elapsed().as_secs_f64();
        agg.kill().await;
        agg.restart();
        let restarted = Instant::now();
        let mut reassigned_secs = None;
        while restarted.elapsed() < Duration::from_secs(300) {
            if assigned(metrics_url.clone()).await.is_some() {
                reassigned_secs = Some(restarted.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("soak-bench: {at:.0} s: SIGKILLed the aggregator; partitions assigned again after {reassigned_secs:?} s");
        kills.push(Kill { at, reassigned_secs });
        next += every;
    }
}

/// The runaway user's alerts, as `/v1/alerts` lists them (rule and state).
pub async fn runaway_alerts(query: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    get(&client, &format!("{query}/v1/alerts?user_id=user-runaway&state=all&limit=1000"))
        .await
        .ok()
        .and_then(|b| b["alerts"].as_array().cloned())
        .unwrap_or_default()
}
