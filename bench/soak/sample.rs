//! The soak's sampler: every `--sample-every`, each process's resident memory
//! from /proc, consumer lag from the broker, ClickHouse's active parts and
//! bytes per table, the embedded database's size, and the query loop's
//! window, as rows of `samples.csv` and `parts.csv`.

use crate::traffic::QueryStats;
use crate::{Args, Deployment};
use meterline_tests::stack::ClickHouse;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The processes sampled, by the name their binary gives `/proc/<pid>/comm`
/// (15 characters at most): the soak's own children, found by parent pid so
/// that a restarted aggregator is followed without being told.
pub const PROCESSES: [(&str, &str); 6] = [
    ("ingest", "meterline-inges"),
    ("aggregator", "meterline-aggre"),
    ("query_api", "meterline-query"),
    ("all_in_one", "meterline"),
    ("tansu", "tansu"),
    ("clickhouse", "clickhouse"),
];

/// The Meterline processes, whose memory must stay flat (the broker keeps
/// its whole log in memory by design; ClickHouse caches what it reads).
pub const SERVICES: [&str; 4] = ["ingest", "aggregator", "query_api", "all_in_one"];

/// One sampling instant.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub t: f64,
    /// Resident KiB by `PROCESSES` name (absent: not running at that instant).
    pub rss_kib: BTreeMap<&'static str, u64>,
    /// The load generator and this bench, in one process.
    pub bench_rss_kib: u64,
    /// High watermark minus the group's committed offset, summed over partitions.
    pub lag: Option<i64>,
    /// The aggregator's own `consumer_lag_messages` (absent while it restarts).
    pub lag_metric: Option<i64>,
    /// Records in the topic (every copy and probe included).
    pub kafka_records: Option<i64>,
    /// Per ClickHouse table: active parts, rows, bytes on disk.
    pub parts: BTreeMap<String, (u64, u64, u64)>,
    pub db_bytes: Option<u64>,
    pub queries: u64,
    pub query_errors: u64,
    pub query_p99_ms: Option<f64>,
    /// The query side's `meterline_query_ranking_cache_groups`: the ranking
    /// cache's groups, one entry per standing question once warm.
    pub ranking_groups: Option<i64>,
    /// Ingest's mean time from handing a request's events to the broker to
    /// the last ack, over the interval since the sample before: a request
    /// holds its records for that long.
    pub produce_ms: Option<f64>,
}

impl Sample {
    pub fn ch_events(&self) -> Option<u64> {
        self.parts.get("events").map(|p| p.1)
    }
}

/// Consumer lag as the broker sees it: an rdkafka client in the
/// aggregator's group that never joins it, only reads watermarks and the
/// group's committed offsets (which the aggregator commits after each flush).
pub struct KafkaLag {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
}

impl std::fmt::Debug for KafkaLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLag").field("topic", &self.topic).field("partitions", &self.partitions).finish_non_exhaustive()
    }
}

impl KafkaLag {
    pub fn new(brokers: &str, topic: &str, group: &str, partitions: i32) -> anyhow::Result<KafkaLag> {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).set("enable.auto.commit", "false").create()?;
        Ok(KafkaLag { consumer: Arc::new(consumer), topic: topic.to_owned(), partitions })
    }

    /// (lag, records in the topic), or `None` if the broker did not answer.
    pub async fn read(&self) -> Option<(i64, i64)> {
        let (consumer, topic, partitions) = (self.consumer.clone(), self.topic.clone(), self.partitions);
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let mut list = TopicPartitionList::new();
            let mut marks = Vec::new();
            for p in 0..partitions {
                marks.push(consumer.fetch_watermarks(&topic, p, timeout).ok()?);
                list.add_partition(&topic, p);
            }
            let committed = consumer.committed_offsets(list, timeout).ok()?;
            let (mut lag, mut records) = (0, 0);
            for (p, (low, high)) in (0..partitions).zip(marks) {
                let at = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                lag += (high - at).max(0);
                records += high;
            }
            Some((lag, records))
        })
        .await
        .ok()
        .flatten()
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident KiB of this process's children, by `PROCESSES` name.
fn children_rss() -> BTreeMap<&'static str, u64> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = &stat[open + 1..close];
        let ppid: Option<u32> = stat[close + 1..].split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid != Some(me) {
            continue;
        }
        let name = PROCESSES.iter().find(|(_, c)| if *c == "meterline" { comm == "meterline" } else { comm.starts_with(c) }).map(|(n, _)| *n);
        if let (Some(name), Some(kib)) = (name, rss_kib(pid)) {
            *out.entry(name).or_insert(0) += kib;
        }
    }
    out
}

/// Bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Active parts, rows and bytes on disk per table of `db`.
pub async fn parts(ch: &ClickHouse, db: &str) -> BTreeMap<String, (u64, u64, u64)> {
    let sql = format!("SELECT table, count(), sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND database = '{db}' GROUP BY table ORDER BY table FORMAT TSV");
    let text = ch.try_query(&sql).await.unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Some((f.first()?.to_string(), (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        })
        .collect()
}

/// The Prometheus text page at `url`, if it answers in time.
async fn metrics_page(url: &str) -> Option<String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    client.get(url).send().await.ok()?.text().await.ok()
}

/// The sum of `name`'s series in a Prometheus text page, if it has any.
fn series_sum(page: &str, name: &str) -> Option<f64> {
    let lines: Vec<f64> = page
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!lines.is_empty()).then(|| lines.iter().sum::<f64>())
}

/// The sum of `name`'s series at `url`, if it has any.
async fn metric_sum(url: &str, name: &str) -> Option<f64> {
    series_sum(&metrics_page(url).await?, name)
}

/// Samples until told to stop, then once more; returns every sample.
pub struct Sampler {
    every: Duration,
    started: Instant,
    kafka: Option<KafkaLag>,
    metrics_url: Option<String>,
    /// The query API's (or the all-in-one's) `/metrics`.
    query_metrics_url: String,
    /// Ingest's (or the all-in-one's) `/metrics`.
    ingest_metrics_url: String,
    /// Ingest's produce-duration histogram (sum of seconds, count) at the
    /// sample before.
    produce_before: Option<(f64, f64)>,
    clickhouse: Option<(Arc<ClickHouse>, String)>,
    data_dir: Option<PathBuf>,
    queries: Arc<QueryStats>,
    samples_csv: std::fs::File,
    parts_csv: std::fs::File,
}

impl Sampler {
    pub fn new(args: &Args, d: &Deployment, started: Instant, queries: Arc<QueryStats>) -> anyhow::Result<Sampler> {
        let mut samples_csv = std::fs::File::create(args.out.join("samples.csv"))?;
        let names: Vec<String> = PROCESSES.iter().map(|(n, _)| format!("rss_{n}_kib")).collect();
        writeln!(
            samples_csv,
            "t_s,{},rss_bench_kib,lag_messages,lag_metric_messages,kafka_records,ch_events,ch_parts,ch_bytes,db_bytes,queries,query_errors,query_p99_ms,ranking_cache_groups,ingest_produce_ms",
            names.join(",")
        )?;
        let mut parts_csv = std::fs::File::create(args.out.join("parts.csv"))?;
        writeln!(parts_csv, "t_s,table,parts,rows,bytes_on_disk")?;
        // The same client as the deployment's, shared.
        let kafka = d.kafka.as_ref().map(|k| KafkaLag { consumer: k.consumer.clone(), topic: k.topic.clone(), partitions: k.partitions });
        Ok(Sampler {
            every: args.sample_every,
            started,
            kafka,
            metrics_url: d.metrics_url.clone(),
            query_metrics_url: format!("{}/metrics", d.query_url),
            ingest_metrics_url: format!("{}/metrics", d.ingest_url),
            produce_before: None,
            clickhouse: d.clickhouse.clone(),
            data_dir: d.data_dir.clone(),
            queries,
            samples_csv,
            parts_csv,
        })
    }

    async fn take(&mut self) -> anyhow::Result<Sample> {
        let t = self.started.elapsed().as_secs_f64();
        let mut s = Sample { t, rss_kib: children_rss(), bench_rss_kib: rss_kib(std::process::id()).unwrap_or(0), ..Sample::default() };
        if let Some(k) = &self.kafka
            && let Some((lag, records)) = k.read().await
        {
            s.lag = Some(lag);
            s.kafka_records = Some(records);
        }
        if let Some(url) = &self.metrics_url {
            s.lag_metric = metric_sum(url, meterline_aggregator::metrics::CONSUMER_LAG).await.map(|v| v as i64);
        }
        s.ranking_groups = metric_sum(&self.query_metrics_url, meterline_query_api::metrics::RANKING_CACHE_GROUPS).await.map(|v| v as i64);
        s.produce_ms = self.produce_ms().await;
        if let Some((ch, db)) = &self.clickhouse {
            s.parts = parts(ch, db).await;
        }
        s.db_bytes = self.data_dir.as_deref().map(dir_bytes);
        (s.queries, s.query_errors, s.query_p99_ms) = self.queries.drain();
        let opt = |v: Option<String>| v.unwrap_or_default();
        let rss: Vec<String> = PROCESSES.iter().map(|(n, _)| opt(s.rss_kib.get(n).map(u64::to_string))).collect();
        let (parts, bytes): (u64, u64) = s.parts.values().fold((0, 0), |(p, b), v| (p + v.0, b + v.2));
        writeln!(
            self.samples_csv,
            "{t:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            rss.join(","),
            s.bench_rss_kib,
            opt(s.lag.map(|v| v.to_string())),
            opt(s.lag_metric.map(|v| v.to_string())),
            opt(s.kafka_records.map(|v| v.to_string())),
            opt(s.ch_events().map(|v| v.to_string())),
            if s.parts.is_empty() { String::new() } else { parts.to_string() },
            if s.parts.is_empty() { String::new() } else { bytes.to_string() },
            opt(s.db_bytes.map(|v| v.to_string())),
            s.queries,
            s.query_errors,
            opt(s.query_p99_ms.map(|v| format!("{v:.1}"))),
            opt(s.ranking_groups.map(|v| v.to_string())),
            opt(s.produce_ms.map(|v| format!("{v:.1}"))),
        )?;
        for (table, (p, rows, bytes)) in &s.parts {
            writeln!(self.parts_csv, "{t:.1},{table},{p},{rows},{bytes}")?;
        }
        Ok(s)
    }

    /// Ingest's mean produce time since the sample before, from its
    /// histogram's sum and count; `None` on the first sample, when nothing was
    /// produced in between, or when ingest did not answer.
    async fn produce_ms(&mut self) -> Option<f64> {
        let name = meterline_ingest::metrics::PRODUCE_DURATION;
        // Both from one scrape, so the mean is of the same requests.
        let page = metrics_page(&self.ingest_metrics_url).await?;
        let now = (series_sum(&page, &format!("{name}_sum"))?, series_sum(&page, &format!("{name}_count"))?);
        let before = self.produce_before.replace(now)?;
        let produced = now.1 - before.1;
        (produced > 0.0).then(|| (now.0 - before.0) / produced * 1000.0)
    }

    /// Samples every `every` (on a fixed schedule) until `stop` turns true,
    /// then takes a last sample; a progress line every minute.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<Vec<Sample>> {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let per_line = (60.0 / self.every.as_secs_f64()).round().max(1.0) as usize;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
            let s = self.take().await?;
            if samples.len() % per_line == 0 {
                let rss: Vec<String> = s.rss_kib.iter().map(|(n, k)| format!("{n} {:.0} MiB", *k as f64 / 1024.0)).collect();
                eprintln!(
                    "soak-bench: {:.0} s: {}; lag {:?}; events in ClickHouse {:?}; parts {}; db {:?} bytes; {} queries ({} errors)",
                    s.t,
                    rss.join(", "),
                    s.lag,
                    s.ch_events(),
                    s.parts.values().map(|p| p.0).sum::<u64>(),
                    s.db_bytes,
                    s.queries,
                    s.query_errors
                );
            }
            samples.push(s);
            if *stop.borrow() {
                return Ok(samples);
            }
        }
    }
}

/// The latest librdkafka statistics: bytes and messages fetched.
#[derive(Debug, Default)]
struct FetchStats(std::sync::Mutex<(u64, u64)>);

impl rdkafka::ClientContext for FetchStatsContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        // The partitions' rxbytes count message bytes after decompression;
        // the brokers' count what came over the wire (the log's batches, plus
        // a little protocol framing).
        let wire: u64 = statistics.brokers.values().map(|b| b.rxbytes).sum();
        let msgs: u64 = statistics.topics.values().flat_map(|t| t.partitions.values()).map(|p| p.rxmsgs).sum();
        *self.0.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (wire, msgs);
    }
}

#[derive(Debug, Default, Clone)]
struct FetchStatsContext(Arc<FetchStats>);

impl rdkafka::consumer::ConsumerContext for FetchStatsContext {}

/// What a Kafka log holds per record, from up to `max` records of partition
/// 0 read back: (bytes fetched from the broker per record, i.e. the record
/// batches as ingest produced them, lz4-compressed; key and value bytes per
/// record uncompressed).
pub fn kafka_bytes_per_record(brokers: &str, topic: &str, max: usize) -> Option<(f64, f64)> {
    use rdkafka::message::Message;
    let context = FetchStatsContext::default();
    let consumer: BaseConsumer<FetchStatsContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "soak-log-size")
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "500")
        .create_with_context(context.clone())
        .ok()?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning).ok()?;
    consumer.assign(&list).ok()?;
    let (mut n, mut raw) = (0usize, 0usize);
    let started = Instant::now();
    while n < max && started.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            n += 1;
            raw += m.payload_len() + m.key().map_or(0, <[u8]>::len);
        }
    }
    // Let a statistics report cover every fetch: no more are made once paused.
    consumer.pause(&consumer.assignment().ok()?).ok()?;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    let (bytes, msgs) = *context.0.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    (n > 0 && msgs > 0).then(|| (bytes as f64 / msgs as f64, raw as f64 / n as f64))
}
