//! The distributed limits deployment of one test: ingest processes serving reservations over a private Redis, the aggregator counting into it, the stack's broker and ClickHouse.

use serde_json::Value;
use std::time::Duration;

use crate::stack::{ClickHouse, Process, Redis};
use crate::{create_topic, free_port, poll_until, stack_var, tenants_toml, unique_topic};

/// An aggregator's config over `topic` and `database`, counting into `redis`.
pub fn aggregator_toml(topic: &str, ch: &ClickHouse, database: &str, port: u16, redis: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_secs = 10\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\ngroup_id = \"agg-{topic}\"\nsession_timeout_ms = 2000\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\nrequest_timeout_ms = 5000\n\
         [flush]\ninterval_ms = 100\nmax_backoff_ms = 500\n[dedupe]\nexpected_keys_per_slice = 100000\n\
         [limits]\nredis_url = \"{redis}\"\n{}",
        stack_var("METERLINE_TEST_KAFKA_BROKERS"),
        ch.url,
        tenants_toml()
    )
}

/// An ingest config serving limits over `redis`, with `limits` lines added to its `[limits]`.
pub fn ingest_toml(topic: &str, port: u16, redis: &str, limits: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_secs = 5\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\npartitions = 4\nproduce_timeout_ms = 3000\n\
         [limits]\nredis_url = \"{redis}\"\n{limits}\n{}",
        stack_var("METERLINE_TEST_KAFKA_BROKERS"),
        tenants_toml()
    )
}

/// The deployment: `servers` ingest processes, one aggregator, one Redis.
#[derive(Debug)]
pub struct Distributed {
    pub ch: ClickHouse,
    pub database: String,
    pub redis: Redis,
    pub aggregator: Process,
    /// The aggregator's config, for commands that read the same stores.
    pub aggregator_toml: String,
    pub servers: Vec<(Process, String)>,
}

impl Distributed {
    /// Starts everything and waits until every ingest process answers.
    pub async fn start(name: &str, servers: usize, limits: &str) -> Distributed {
        let ch = ClickHouse::shared();
        let topic = unique_topic(name);
        let database = ch.database(&format!("l_{name}_{}", free_port())).await;
        create_topic(&stack_var("METERLINE_TEST_KAFKA_BROKERS"), &topic, 4).await;
        let redis = Redis::private().await;
        let aggregator_toml = aggregator_toml(&topic, &ch, &database, free_port(), &redis.url());
        let aggregator = Process::start("meterline-aggregator", &aggregator_toml);
        let mut list = Vec::new();
        for _ in 0..servers {
            let port = free_port();
            let process = Process::start("meterline-ingest", &ingest_toml(&topic, port, &redis.url(), limits));
            list.push((process, format!("http://127.0.0.1:{port}")));
        }
        for (_, url) in &list {
            poll_until(Duration::from_secs(30), "ingest to answer", || async {
                reqwest::get(format!("{url}/healthz")).await.ok().filter(|r| r.status().is_success()).map(|_| ())
            })
            .await;
        }
        Distributed { ch, database, redis, aggregator, aggregator_toml, servers: list }
    }

    /// The `i`-th server's URL, round robin.
    pub fn url(&self, i: usize) -> &str {
        &self.servers[i % self.servers.len()].1
    }
}

/// A JSON request with a bearer key: the status and the JSON body; `(0, null)`
/// when no answer came (a killed server: the client would retry).
pub async fn call(method: reqwest::Method, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url).bearer_auth(key).timeout(Duration::from_secs(10));
    if let Some(b) = body {
        request = request.json(&b);
    }
    match request.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}
