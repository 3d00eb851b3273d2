//! Every metric the aggregator exports, named `meterline_aggregator_*`, in one place.
//!
//! Labels are bounded: `tenant` comes from configuration or the topic's
//! tenants (bounded by configuration at ingest), `partition` by the topic's
//! partition count, `reason` and `table` by fixed sets.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;

pub const EVENTS_IN: &str = "meterline_aggregator_events_in_total";
pub const EVENTS_WRITTEN: &str = "meterline_aggregator_events_written_total";
pub const DUPLICATES: &str = "meterline_aggregator_duplicates_total";
pub const UNPRICED: &str = "meterline_aggregator_unpriced_events_total";
pub const DEAD_LETTERS: &str = "meterline_aggregator_dead_letters_total";
pub const EXACT_LOOKUPS: &str = "meterline_aggregator_dedupe_exact_lookups_total";
pub const BLOOM_FALSE_POSITIVES: &str = "meterline_aggregator_bloom_false_positives_total";
pub const BLOOM_FILL: &str = "meterline_aggregator_bloom_fill_ratio";
pub const DEDUPE_BYTES: &str = "meterline_aggregator_dedupe_memory_bytes";
pub const FLUSH_DURATION: &str = "meterline_aggregator_flush_duration_seconds";
pub const FLUSH_ROWS: &str = "meterline_aggregator_flush_rows";
pub const WRITE_RETRIES: &str = "meterline_aggregator_write_retries_total";
pub const REPAIRS: &str = "meterline_aggregator_rollup_repairs_total";
pub const CONSUMER_LAG: &str = "meterline_aggregator_consumer_lag_messages";
pub const BUFFERED: &str = "meterline_aggregator_buffered_events";
pub const PARTITIONS: &str = "meterline_aggregator_assigned_partitions";
pub const UNWRITTEN: &str = "meterline_aggregator_unwritten_flushes";
pub const REFUSED_BATCHES: &str = "meterline_aggregator_refused_batches_total";
pub const SNAPSHOTS: &str = "meterline_aggregator_dedupe_snapshots_total";
pub const SNAPSHOT_BYTES: &str = "meterline_aggregator_dedupe_snapshot_bytes";
pub const SNAPSHOT_DURATION: &str = "meterline_aggregator_dedupe_snapshot_seconds";
pub const PARTITION_LOAD: &str = "meterline_aggregator_partition_load_seconds";
pub const FORWARDED: &str = "meterline_aggregator_forwarded_records_total";
pub const TRANSITION_LOOKUPS: &str = "meterline_aggregator_keying_transition_lookups_total";
pub const RETENTION_PARTITIONS: &str = "meterline_aggregator_retention_dropped_partitions_total";
pub const RETENTION_ROWS: &str = "meterline_aggregator_retention_dropped_rows_total";
pub const RETENTION_HELD: &str = "meterline_aggregator_retention_held_total";

/// Bucket bounds of the aggregator's histograms other than `*_seconds`.
pub const BUCKETS: &[(&str, &[f64])] = &[(FLUSH_ROWS, &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0])];

/// The process-wide Prometheus recorder (shared with any other service in
/// the process), with the aggregator's metrics described.
pub fn handle() -> PrometheusHandle {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    let handle = meterline_http::install_recorder(BUCKETS);
    DESCRIBED.call_once(describe);
    handle
}

fn describe() {
    describe_counter!(EVENTS_IN, "Records consumed from the events topic.");
    describe_counter!(EVENTS_WRITTEN, "Unique events written to ClickHouse, by tenant.");
    describe_counter!(DUPLICATES, "Copies dropped as duplicates, by reason (retry: same payload; conflict: different payload).");
    describe_counter!(UNPRICED, "Events written with no cost_usd and no price for their model, by tenant.");
    describe_counter!(DEAD_LETTERS, "Records sent to the dead_letters table: undecodable, or refused by ClickHouse as events.");
    describe_counter!(FORWARDED, "Records found off their key's home partition (the user keying's) and produced to it, uncounted where they were.");
    describe_counter!(TRANSITION_LOOKUPS, "Keys new to their home partition checked in ClickHouse while rows counted under the user keying are in the dedupe window.");
    describe_counter!(EXACT_LOOKUPS, "Keys checked in ClickHouse because a bloom filter held them.");
    describe_counter!(BLOOM_FALSE_POSITIVES, "Exact look-ups that found the key new: bloom false positives.");
    describe_gauge!(BLOOM_FILL, "Inserted keys over design capacity of the fullest bloom slice, by partition.");
    describe_gauge!(DEDUPE_BYTES, "Approximate bytes of dedupe state, by partition.");
    describe_histogram!(FLUSH_DURATION, metrics::Unit::Seconds, "Time to write one flush to ClickHouse and commit.");
    describe_histogram!(FLUSH_ROWS, "Events written per flush.");
    describe_counter!(WRITE_RETRIES, "Failed writes that will be retried, by table (`forward`: records produced to their home partition).");
    describe_counter!(REPAIRS, "Rollups rebuilt from raw events after a crash between the two inserts.");
    describe_counter!(RETENTION_PARTITIONS, "Table partitions dropped past their retention horizon, by table.");
    describe_counter!(RETENTION_ROWS, "Rows removed past their retention horizon (dropped partitions, deleted alerts, embedded purges), by table.");
    describe_counter!(RETENTION_HELD, "Retention runs that left a table alone because events past a progress marker await repair, by table.");
    describe_gauge!(CONSUMER_LAG, "Messages between the partition's end and the aggregator's position, by partition.");
    describe_gauge!(BUFFERED, "Events consumed and not yet written.");
    describe_gauge!(PARTITIONS, "Partitions assigned to this aggregator.");
    describe_gauge!(UNWRITTEN, "Flushes decided and not yet durable: the one being written and those queued behind it (at most 2).");
    describe_counter!(SNAPSHOTS, "Dedupe snapshots written or failed, by result.");
    describe_gauge!(SNAPSHOT_BYTES, "Bytes of the partition's last dedupe snapshot, by partition.");
    describe_histogram!(SNAPSHOT_DURATION, metrics::Unit::Seconds, "Time to serialize and write one dedupe snapshot.");
    describe_histogram!(PARTITION_LOAD, metrics::Unit::Seconds, "Time to rebuild an assigned partition's dedupe state, by source (snapshot or events).");
    describe_counter!(
        REFUSED_BATCHES,
        "Inserts ClickHouse refused as bad data (permanent), by table: events (the flush's events went to dead_letters instead) or dead_letters (those dead letters were dropped)."
    );
    describe_counter!(USAGE_EVENTS, "Unique events written, by tenant, model and feature (capped label values fold into other).");
    describe_counter!(USAGE_TOKENS, "Tokens of written events (all four kinds), by tenant, model and feature.");
    describe_counter!(USAGE_COST, "Cost of written events in nano-USD, by tenant, model and feature.");
    describe_counter!(USAGE_REVENUE, "Revenue of written events in nano-USD, by tenant, model and feature.");
    describe_gauge!(ALERTS_OPEN, "Open runaway-user alerts, by tenant and rule.");
    describe_counter!(ALERTS_OPENED, "Runaway-user alerts opened, by tenant and rule.");
    describe_counter!(WEBHOOK_FAILURES, "Alert notifications given up on after every retry.");
}

/// The metrics updated for every record taken, registered once: a registry
/// look-up per record (key built and hashed, map searched) cost more than
/// buffering the record. Made after the recorder is installed (`serve`).
#[derive(Debug, Clone)]
pub(crate) struct PerRecord {
    consumed: metrics::Counter,
    buffered: metrics::Gauge,
}

impl PerRecord {
    pub(crate) fn new() -> PerRecord {
        PerRecord { consumed: counter!(EVENTS_IN), buffered: gauge!(BUFFERED) }
    }

    /// One record consumed and kept; `buffered` now in all.
    pub(crate) fn taken(&self, buffered: usize) {
        self.consumed.increment(1);
        self.buffered.set(buffered as f64);
    }
}
pub fn written(tenant: &str, n: u64) {
    counter!(EVENTS_WRITTEN, "tenant" => tenant.to_owned()).increment(n);
}
pub fn duplicate(reason: &'static str) {
    duplicates(reason, 1);
}
pub fn duplicates(reason: &'static str, n: u64) {
    if n > 0 {
        counter!(DUPLICATES, "reason" => reason).increment(n);
    }
}
pub fn unpriced(tenant: &str, n: u64) {
    counter!(UNPRICED, "tenant" => tenant.to_owned()).increment(n);
}
pub fn dead_letters(n: u64) {
    counter!(DEAD_LETTERS).increment(n);
}
pub fn exact_lookups(n: u64, false_positives: u64) {
    counter!(EXACT_LOOKUPS).increment(n);
    counter!(BLOOM_FALSE_POSITIVES).increment(false_positives);
}
pub fn forwarded(n: u64) {
    counter!(FORWARDED).increment(n);
}
pub fn transition_lookups(n: u64) {
    counter!(TRANSITION_LOOKUPS).increment(n);
}
pub fn dedupe_state(partition: i32, fill: f64, bytes: usize) {
    gauge!(BLOOM_FILL, "partition" => partition.to_string()).set(fill);
    gauge!(DEDUPE_BYTES, "partition" => partition.to_string()).set(bytes as f64);
}
pub fn flushed(seconds: f64, rows: usize) {
    histogram!(FLUSH_DURATION).record(seconds);
    histogram!(FLUSH_ROWS).record(rows as f64);
}
pub fn write_retry(table: &'static str) {
    counter!(WRITE_RETRIES, "table" => table).increment(1);
}
/// An insert ClickHouse refused as bad data; `table` is `events` or `dead_letters`.
pub fn refused(table: &'static str) {
    counter!(REFUSED_BATCHES, "table" => table).increment(1);
}
pub fn snapshot_written(partition: i32, bytes: usize, seconds: f64) {
    counter!(SNAPSHOTS, "result" => "written").increment(1);
    gauge!(SNAPSHOT_BYTES, "partition" => partition.to_string()).set(bytes as f64);
    histogram!(SNAPSHOT_DURATION).record(seconds);
}
pub fn snapshot_failed() {
    counter!(SNAPSHOTS, "result" => "failed").increment(1);
}
/// `source` is `snapshot` or `events`.
pub fn partition_loaded(source: &'static str, seconds: f64) {
    histogram!(PARTITION_LOAD, "source" => source).record(seconds);
}
pub fn repaired() {
    counter!(REPAIRS).increment(1);
}
/// What retention removed from `table` (a fixed table name).
pub fn retention_dropped(table: &'static str, partitions: u64, rows: u64) {
    counter!(RETENTION_PARTITIONS, "table" => table).increment(partitions);
    counter!(RETENTION_ROWS, "table" => table).increment(rows);
}
pub fn retention_held(table: &'static str) {
    counter!(RETENTION_HELD, "table" => table).increment(1);
}
pub fn lag(partition: i32, messages: i64) {
    gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(messages as f64);
}
pub fn buffered(n: usize) {
    gauge!(BUFFERED).set(n as f64);
}
pub fn partitions(n: usize) {
    gauge!(PARTITIONS).set(n as f64);
}
pub fn unwritten(n: usize) {
    gauge!(UNWRITTEN).set(n as f64);
}

pub const USAGE_EVENTS: &str = "meterline_aggregator_usage_events_total";
pub const USAGE_TOKENS: &str = "meterline_aggregator_usage_tokens_total";
pub const USAGE_COST: &str = "meterline_aggregator_usage_cost_nano_usd_total";
pub const USAGE_REVENUE: &str = "meterline_aggregator_usage_revenue_nano_usd_total";

/// Business counters by tenant, model and feature, with each tenant's model
/// and feature values capped: past `cap` distinct values a tenant's further
/// values fold into `other`, so a client inventing names cannot blow up the
/// series count. Per-user numbers never become labels; they come from the
/// query API. Money is counted in integer nano-USD (divide by 1e9 in PromQL).
#[derive(Debug, Default)]
pub struct BusinessLabels {
    cap: usize,
    seen: std::collections::HashMap<(String, &'static str), std::collections::HashSet<String>>,
}

impl BusinessLabels {
    pub fn new(cap: usize) -> BusinessLabels {
        BusinessLabels { cap, seen: Default::default() }
    }

    fn bounded(&mut self, tenant: &str, dimension: &'static str, value: &str) -> String {
        let set = self.seen.entry((tenant.to_owned(), dimension)).or_default();
        if set.contains(value) || set.len() < self.cap {
            set.insert(value.to_owned());
            value.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// Counts one written event.
    pub fn record(&mut self, row: &meterline_domain::EventRow) {
        self.record_all(std::iter::once(row));
    }

    /// Counts a flush's written events. Rows are summed per label set first,
    /// so the registry is looked up once per set rather than four times per
    /// row (per row it was a quarter of the aggregator's CPU). Label values
    /// are capped at each set's first row, in row order, so the values that
    /// fold into `other` are the ones they would be row by row.
    pub fn record_all<'a>(&mut self, rows: impl IntoIterator<Item = &'a meterline_domain::EventRow>) {
        #[derive(Default)]
        struct Sums {
            events: u64,
            tokens: u64,
            cost: u64,
            revenue: u64,
        }
        let mut index: std::collections::HashMap<(&str, &str, &str), usize> = std::collections::HashMap::new();
        let mut sets: Vec<([(&'static str, String); 3], Sums)> = Vec::new();
        for row in rows {
            let at = match index.get(&(row.tenant.as_str(), row.model.as_str(), row.feature.as_str())) {
                Some(at) => *at,
                None => {
                    let model = self.bounded(&row.tenant, "model", &row.model);
                    let feature = self.bounded(&row.tenant, "feature", &row.feature);
                    sets.push(([("tenant", row.tenant.clone()), ("model", model), ("feature", feature)], Sums::default()));
                    index.insert((&row.tenant, &row.model, &row.feature), sets.len() - 1);
                    sets.len() - 1
                }
            };
            let Some((_, sums)) = sets.get_mut(at) else { continue };
            // Wrapping, as the counters' own atomic adds are.
            sums.events = sums.events.wrapping_add(1);
            sums.tokens = sums
                .tokens
                .wrapping_add(row.input_tokens + row.output_tokens + row.cached_input_tokens + row.reasoning_tokens);
            sums.cost = sums.cost.wrapping_add(u64::try_from(row.cost_nanos).unwrap_or(0));
            sums.revenue = sums.revenue.wrapping_add(u64::try_from(row.revenue_nanos).unwrap_or(0));
        }
        for (labels, sums) in sets {
            counter!(USAGE_EVENTS, &labels).increment(sums.events);
            counter!(USAGE_TOKENS, &labels).increment(sums.tokens);
            counter!(USAGE_COST, &labels).increment(sums.cost);
            counter!(USAGE_REVENUE, &labels).increment(sums.revenue);
        }
    }
}

pub const ALERTS_OPEN: &str = "meterline_aggregator_alerts_open";
pub const ALERTS_OPENED: &str = "meterline_aggregator_alerts_opened_total";
pub const WEBHOOK_FAILURES: &str = "meterline_aggregator_alert_webhook_failures_total";

/// Open runaway alerts by tenant and rule (every known pair is set, so a
/// resolved alert brings its series back to 0).
pub fn alerts_open(open: &std::collections::BTreeMap<(&str, &str), usize>) {
    static KNOWN: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    for (t, r) in open.keys() {
        known.insert(((*t).to_owned(), (*r).to_owned()));
    }
    for (t, r) in known.iter() {
        let n = open.get(&(t.as_str(), r.as_str())).copied().unwrap_or(0);
        gauge!(ALERTS_OPEN, "tenant" => t.clone(), "rule" => r.clone()).set(n as f64);
    }
}

pub fn alert_opened(tenant: &str, rule: &str) {
    counter!(ALERTS_OPENED, "tenant" => tenant.to_owned(), "rule" => rule.to_owned()).increment(1);
}

pub fn webhook_failed() {
    counter!(WEBHOOK_FAILURES).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_domain::EventRow;

    fn row(model: &str, feature: &str, cost_nanos: i64) -> EventRow {
        EventRow {
            tenant: "t".into(),
            idempotency_key: String::new(),
            fingerprint: 0,
            event_time: 0,
            event_time_ns: 0,
            user_id: "u".into(),
            customer_id: String::new(),
            feature: feature.into(),
            model: model.into(),
            provider: String::new(),
            environment: String::new(),
            billable: 1,
            input_tokens: 3,
            output_tokens: 2,
            cached_input_tokens: 1,
            reasoning_tokens: 0,
            cost_nanos,
            cost_source: 1,
            revenue_nanos: 7,
            credits_nanos: 0,
            metadata: String::new(),
            received_at: 0,
            kafka_topic: String::new(),
            kafka_partition: 0,
            kafka_offset: 0,
            written_at: 0,
        }
    }

    fn rendered(record: impl FnOnce(&mut BusinessLabels)) -> Vec<String> {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut labels = BusinessLabels::new(1);
        metrics::with_local_recorder(&recorder, || record(&mut labels));
        let mut lines: Vec<String> = handle.render().lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_flush_counts_as_its_rows_would_one_by_one() {
        // A cap of one value: m2 and f2 arrive after the cap and fold into `other`.
        let rows = [row("m1", "f1", 5), row("m2", "f1", -1), row("m1", "f2", 9), row("m2", "f1", 4), row("m1", "f1", 5)];
        let one_by_one = rendered(|b| rows.iter().for_each(|r| b.record(r)));
        let summed = rendered(|b| b.record_all(&rows));
        assert_eq!(summed, one_by_one);
        assert!(summed.iter().any(|l| l.contains("usage_events_total{tenant=\"t\",model=\"m1\",feature=\"f1\"} 2")), "{summed:?}");
        assert!(summed.iter().any(|l| l.contains("usage_events_total{tenant=\"t\",model=\"other\",feature=\"f1\"} 2")), "{summed:?}");
    }
}
