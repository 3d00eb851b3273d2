//! The soak's end: the query API's totals per user against the load
//! generator's ground truth (exact, in nano-USD), and the verdicts over the
//! samples (memory flat, lag bounded, freshness per 5 minutes, growth per
//! million events), written as `summary.json` and `summary.md`.

use crate::sample::{SERVICES, Sample};
use crate::traffic::{Kill, PROBE_COST_NANOS, PROBE_TOKENS, PROBE_USER, Probe, range_params};
use crate::{Args, Deployment, Mode};
use meterline_schemas::Nanos;
use meterline_tests::load::{LoadReport, UserTruth};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// The nearest-rank `q` quantile of sorted `v`.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Events, tokens, cost and revenue (nano-USD) of one user.
type Sums = [i64; 4];

/// The comparison of the query API's per-user totals with the ground truth.
#[derive(Debug, Default)]
pub struct Outcome {
    pub expected: Sums,
    pub seen: Sums,
    pub users_expected: usize,
    pub users_seen: usize,
    /// (user, expected, seen) where they differ; the first 20.
    pub mismatches: Vec<(String, Option<Sums>, Option<Sums>)>,
    pub differing_users: usize,
    pub settled: bool,
}

impl Outcome {
    pub fn exact(&self) -> bool {
        self.settled && self.differing_users == 0 && self.expected == self.seen
    }

    pub fn describe(&self) -> String {
        format!(
            "{} of {} users differ (seen {}); totals expected {:?}, seen {:?}; first: {:?}",
            self.differing_users, self.users_expected, self.users_seen, self.expected, self.seen, self.mismatches
        )
    }
}

fn add(a: &mut Sums, b: &Sums) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

fn row_sums(row: &Value) -> Option<Sums> {
    let tokens: u64 = ["input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"].iter().map(|k| row[*k].as_u64()).sum::<Option<u64>>()?;
    let money = |k: &str| row[k].as_str().and_then(|s| Nanos::parse(s).ok()).map(|n| n.0);
    Some([row["events"].as_i64()?, i64::try_from(tokens).ok()?, money("cost_usd")?, money("revenue_usd")?])
}

async fn get(client: &reqwest::Client, url: &str) -> Option<Value> {
    let r = client.get(url).bearer_auth("acme-read-key").send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Waits (up to `settle`) until the tenant's event count in the query API
/// is the truth's plus the probes, then compares every user's totals with
/// the truth. Returns the outcome and the seconds the wait took.
pub async fn settle_and_compare(query: &str, truth: &BTreeMap<String, UserTruth>, probes: &[Probe], settle: Duration) -> (Outcome, f64) {
    let mut expected: BTreeMap<String, Sums> =
        truth.iter().map(|(u, t)| (u.clone(), [t.events as i64, t.tokens as i64, t.cost_nanos, t.revenue_nanos])).collect();
    let n = probes.len() as i64;
    if n > 0 {
        expected.insert(PROBE_USER.to_owned(), [n, n * PROBE_TOKENS, n * PROBE_COST_NANOS, 0]);
    }
    let mut out = Outcome { users_expected: expected.len(), ..Outcome::default() };
    for s in expected.values() {
        add(&mut out.expected, s);
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client");
    let range = range_params(chrono::Utc::now());
    let waited = Instant::now();
    while waited.elapsed() < settle {
        let total = get(&client, &format!("{query}/v1/usage?granularity=total&{range}")).await;
        let events = total.and_then(|b| b["rows"].as_array().map(|r| r.iter().filter_map(|r| r["events"].as_i64()).sum::<i64>()));
        if events == Some(out.expected[0]) {
            out.settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let settle_secs = waited.elapsed().as_secs_f64();
    let mut seen: BTreeMap<String, Sums> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{query}/v1/usage?granularity=total&group_by=user_id&limit=100000&{range}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={}", urlencode(c)));
        }
        let Some(body) = get(&client, &url).await else { break };
        for row in body["rows"].as_array().into_iter().flatten() {
            if let (Some(user), Some(s)) = (row["user_id"].as_str(), row_sums(row)) {
                add(seen.entry(user.to_owned()).or_default(), &s);
            }
        }
        cursor = body["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    out.users_seen = seen.len();
    for s in seen.values() {
        add(&mut out.seen, s);
    }
    for user in expected.keys().chain(seen.keys().filter(|u| !expected.contains_key(*u))) {
        let (e, s) = (expected.get(user).copied(), seen.get(user).copied());
        if e != s {
            out.differing_users += 1;
            if out.mismatches.len() < 20 {
                out.mismatches.push((user.clone(), e, s));
            }
        }
    }
    (out, settle_secs)
}

fn urlencode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// Writes `kills.csv`.
pub fn note_kills(out: &Path, kills: &[Kill]) -> anyhow::Result<()> {
    let mut text = String::from("t_s,reassigned_s\n");
    for k in kills {
        let _ = writeln!(text, "{:.1},{}", k.at, k.reassigned_secs.map_or(String::new(), |s| format!("{s:.1}")));
    }
    std::fs::write(out.join("kills.csv"), text)?;
    Ok(())
}

/// Least-squares line through (t, y): (value at `t0`, value at `t1`).
fn fit(points: &[(f64, f64)], t0: f64, t1: f64) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if n < 2.0 {
        return None;
    }
    let (mt, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    Some((my + slope * (t0 - mt), my + slope * (t1 - mt)))
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

/// Everything the soak concluded.
pub struct Summary {
    json: Value,
    markdown: String,
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        args: &Args,
        report: &LoadReport,
        load_secs: f64,
        settle_secs: f64,
        samples: &[Sample],
        probes: &[Probe],
        kills: &[Kill],
        first_alert_at: Option<f64>,
        alerts: &[Value],
        outcome: &Outcome,
        d: &Deployment,
    ) -> Summary {
        let mut md = String::new();
        let warm = args.warmup.as_secs_f64();
        let in_load = |s: &&Sample| s.t >= warm && s.t <= load_secs;
        let _ = writeln!(
            md,
            "## Soak, {} mode\n\n{:.0} s of load at {} events/s offered ({}); {:.0} accepted/s; {} events sent ({} unique actions, {} retries, {} conflicting copies), {} rejected, {} requests resent after a retryable answer; request p99 {:.1} ms; {} kills; warm-up {:.0} s.\n",
            args.mode.as_str(),
            load_secs,
            args.rate,
            args.rate_source,
            report.accepted_per_second,
            report.events_sent,
            report.unique_events,
            report.retries,
            report.conflicts,
            report.events_rejected,
            report.requests_resent,
            report.latency_ms.get("p99").copied().unwrap_or(0.0),
            kills.len(),
            warm
        );

        // Memory: a line through the post-warm-up samples; flat if it rises
        // by at most 10% over the span. Per-10-minute medians and maxima show the shape.
        let _ = writeln!(md, "### Resident memory after warm-up\n\n| process | first MiB (fit) | last MiB (fit) | growth | min MiB | max MiB | flat (≤ 10%)? |\n|---|---:|---:|---:|---:|---:|---|");
        let mut memory = serde_json::Map::new();
        let names: Vec<&str> = samples.iter().flat_map(|s| s.rss_kib.keys().copied()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for name in names.iter().copied().chain(["bench"]) {
            let points: Vec<(f64, f64)> = samples
                .iter()
                .filter(in_load)
                .filter_map(|s| if name == "bench" { Some((s.t, s.bench_rss_kib as f64)) } else { s.rss_kib.get(name).map(|k| (s.t, *k as f64)) })
                .collect();
            let (Some(first), Some(last)) = (points.first(), points.last()) else { continue };
            let Some((a, b)) = fit(&points, first.0, last.0) else { continue };
            let growth = (b - a) / a * 100.0;
            let (lo, hi) = points.iter().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
            let judged = SERVICES.contains(&name);
            let flat = growth <= 10.0;
            let verdict = if judged { if flat { "**yes**" } else { "**no**" } } else { "(not judged)" };
            let label = if name == "bench" { "soak-bench (load generator)" } else { name };
            let _ = writeln!(md, "| {label} | {:.1} | {:.1} | {growth:+.1}% | {:.1} | {:.1} | {verdict} |", mib(a), mib(b), mib(lo), mib(hi));
            memory.insert(name.to_owned(), json!({"fit_first_mib": mib(a), "fit_last_mib": mib(b), "growth_pct": growth, "min_mib": mib(lo), "max_mib": mib(hi), "judged": judged, "flat": flat}));
        }

        // Lag: bounded if, in every 10-minute window after warm-up, it came
        // back to at most 5 s of traffic (the aggregator caught up after each
        // kill), and it drained to that after the load.
        let window = args.kill_every.unwrap_or(Duration::from_secs(600)).as_secs_f64();
        let caught_up = args.rate as f64 * 5.0;
        let mut lag_json = Value::Null;
        if args.mode == Mode::Distributed {
            let _ = writeln!(md, "\n### Consumer lag (high watermark minus committed offset, all partitions)\n\n| window | max messages | min messages | caught up (≤ {caught_up:.0})? |\n|---|---:|---:|---|");
            let mut all_caught_up = true;
            let mut windows = Vec::new();
            let mut start = warm;
            while start < load_secs - 1.0 {
                let end = (start + window).min(load_secs);
                let lags: Vec<i64> = samples.iter().filter(|s| s.t >= start && s.t < end).filter_map(|s| s.lag).collect();
                if let (Some(max), Some(min)) = (lags.iter().max(), lags.iter().min()) {
                    let ok = (*min as f64) <= caught_up;
                    all_caught_up &= ok;
                    let _ = writeln!(md, "| {:.0}-{:.0} min | {max} | {min} | {} |", start / 60.0, end / 60.0, if ok { "yes" } else { "**no**" });
                    windows.push(json!({"from_s": start, "to_s": end, "max": max, "min": min, "caught_up": ok}));
                }
                start = end;
            }
            let final_lag = samples.last().and_then(|s| s.lag);
            let drained = final_lag.is_some_and(|l| l as f64 <= caught_up);
            let max_lag = samples.iter().filter_map(|s| s.lag).max();
            let bounded = all_caught_up && drained;
            let _ = writeln!(md, "\nMax {max_lag:?} messages over the run; {final_lag:?} after the drain. **Lag bounded: {}**.", if bounded { "yes" } else { "no" });
            lag_json = json!({"windows": windows, "max": max_lag, "final": final_lag, "caught_up_threshold": caught_up, "bounded": bounded});
        }

        // Freshness: per 5-minute window of probe send times.
        let _ = writeln!(md, "\n### Freshness (probe sent to visible in the query API), per 5 minutes\n\n| window | probes | p50 ms | p99 ms | max ms | not visible | kill in window |\n|---|---:|---:|---:|---:|---:|---|");
        let mut fresh = Vec::new();
        let mut start = 0.0;
        while start < load_secs - 1.0 {
            let end = start + 300.0;
            let mut ms: Vec<f64> = probes.iter().filter(|p| p.sent_at >= start && p.sent_at < end).filter_map(|p| p.visible_ms).collect();
            let missing = probes.iter().filter(|p| p.sent_at >= start && p.sent_at < end && p.visible_ms.is_none()).count();
            ms.sort_by(f64::total_cmp);
            let kill = kills.iter().any(|k| k.at >= start && k.at < end);
            let q = |x| quantile(&ms, x).map_or("-".to_owned(), |v| format!("{v:.0}"));
            let _ = writeln!(md, "| {:.0}-{:.0} min | {} | {} | {} | {} | {missing} | {} |", start / 60.0, end / 60.0, ms.len(), q(0.5), q(0.99), q(1.0), if kill { "yes" } else { "" });
            fresh.push(json!({"from_s": start, "to_s": end, "probes": ms.len(), "p50_ms": quantile(&ms, 0.5), "p99_ms": quantile(&ms, 0.99), "max_ms": quantile(&ms, 1.0), "missing": missing, "kill": kill}));
            start = end;
        }
        let mut all: Vec<f64> = probes.iter().filter_map(|p| p.visible_ms).collect();
        all.sort_by(f64::total_cmp);
        let _ = writeln!(md, "\nAll {} probes: p50 {:?} ms, p99 {:?} ms, max {:?} ms.", probes.len(), quantile(&all, 0.5), quantile(&all, 0.99), quantile(&all, 1.0));

        // Kills.
        if !kills.is_empty() {
            let re: Vec<String> = kills.iter().map(|k| format!("{:.0} s ({})", k.at, k.reassigned_secs.map_or("not reassigned".to_owned(), |s| format!("partitions back after {s:.1} s")))).collect();
            let _ = writeln!(md, "\nSIGKILLs of the aggregator at: {}.", re.join(", "));
        }

        // Exact totals.
        let _ = writeln!(
            md,
            "\n### Exact totals\n\n| | events | tokens | cost (nano-USD) | revenue (nano-USD) |\n|---|---:|---:|---:|---:|\n| ground truth (generator + probes) | {} | {} | {} | {} |\n| query API | {} | {} | {} | {} |\n\n{} users expected, {} in the query API, {} differ; settled {:.1} s after the load ended. **Exact: {}**.",
            outcome.expected[0], outcome.expected[1], outcome.expected[2], outcome.expected[3],
            outcome.seen[0], outcome.seen[1], outcome.seen[2], outcome.seen[3],
            outcome.users_expected, outcome.users_seen, outcome.differing_users, settle_secs,
            if outcome.exact() { "yes" } else { "NO" }
        );
        let rules: Vec<String> = alerts.iter().map(|a| format!("{} ({})", a["rule"].as_str().unwrap_or("?"), a["state"].as_str().unwrap_or("?"))).collect();
        let _ = writeln!(md, "\nRunaway user's alerts: {} [{}]; the first seen {:?} s into the soak. **Alert raised: {}**.", alerts.len(), rules.join(", "), first_alert_at.map(|t| t.round()), if alerts.is_empty() { "NO" } else { "yes" });

        // Growth per million events.
        let last = samples.iter().rev().find(|s| !s.parts.is_empty() || s.db_bytes.is_some());
        let distinct = outcome.seen[0].max(1) as f64 / 1e6;
        let mut growth = serde_json::Map::new();
        let _ = writeln!(md, "\n### What grows, per million distinct events ({:.2} M in the store)\n", distinct);
        if let Some(s) = last {
            if !s.parts.is_empty() {
                let _ = writeln!(md, "| ClickHouse table | active parts at end | max parts | rows | bytes on disk | MiB per million events |\n|---|---:|---:|---:|---:|---:|");
                for (table, (p, rows, bytes)) in &s.parts {
                    let max_parts = samples.iter().filter_map(|x| x.parts.get(table).map(|v| v.0)).max().unwrap_or(0);
                    let per = *bytes as f64 / distinct / 1048576.0;
                    let _ = writeln!(md, "| {table} | {p} | {max_parts} | {rows} | {bytes} | {per:.2} |");
                    growth.insert(format!("clickhouse_{table}_bytes_per_million"), json!(*bytes as f64 / distinct));
                }
            }
            if let Some(db) = s.db_bytes {
                let _ = writeln!(md, "Embedded data directory: {db} bytes, {:.1} MiB per million events.", db as f64 / distinct / 1048576.0);
                growth.insert("embedded_db_bytes_per_million".into(), json!(db as f64 / distinct));
            }
        }
        let tansu: Vec<(f64, f64, f64)> = samples.iter().filter(|s| s.t <= load_secs).filter_map(|s| Some((s.t, *s.rss_kib.get("tansu")? as f64 * 1024.0, s.kafka_records? as f64))).collect();
        if let (Some(a), Some(b)) = (tansu.first(), tansu.last())
            && b.2 > a.2
        {
            let per = (b.1 - a.1) / ((b.2 - a.2) / 1e6);
            let _ = writeln!(md, "\nBroker (tansu, in-memory log): {:.0} records in the topic (copies and probes included), resident memory +{:.1} MiB over the load: {:.1} MiB per million records.", b.2, (b.1 - a.1) / 1048576.0, per / 1048576.0);
            growth.insert("tansu_rss_bytes_per_million_records".into(), json!(per));
            growth.insert("kafka_records".into(), json!(b.2));
        }
        if let Some((wire, raw)) = d.log_bytes {
            let _ = writeln!(
                md,
                "\nKafka log: {wire:.1} bytes per record as fetched from the broker (ingest's lz4 batches; {raw:.0} bytes of key and value uncompressed): {:.1} MiB per million records.",
                wire * 1e6 / 1048576.0
            );
            growth.insert("kafka_log_bytes_per_record".into(), json!(wire));
            growth.insert("kafka_raw_bytes_per_record".into(), json!(raw));
        }
        let json = json!({
            "bench": "soak",
            "mode": args.mode.as_str(),
            "duration_s": args.duration.as_secs(),
            "load_s": load_secs,
            "rate": args.rate,
            "rate_source": args.rate_source,
            "warmup_s": warm,
            "kill_every_s": args.kill_every.map(|k| k.as_secs()),
            "load": report,
            "memory": memory,
            "lag": lag_json,
            "freshness": fresh,
            "kills": kills.iter().map(|k| json!({"at_s": k.at, "reassigned_s": k.reassigned_secs})).collect::<Vec<_>>(),
            "totals": {"expected": outcome.expected, "seen": outcome.seen, "users_expected": outcome.users_expected, "users_seen": outcome.users_seen, "differing_users": outcome.differing_users, "exact": outcome.exact(), "settle_s": settle_secs},
            "runaway_alerts": alerts.len(),
            "first_alert_s": first_alert_at,
            "growth": growth,
        });
        Summary { json, markdown: md }
    }

    pub fn markdown(&self) -> &str {
        &self.markdown
    }

    pub fn json(&self) -> String {
        self.json.to_string()
    }

    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&self.json)?)?;
        std::fs::write(out.join("summary.md"), &self.markdown)?;
        Ok(())
    }
}
