//! Harness for the end-to-end tests: the stack's addresses, private brokers
//! that tests may kill, services on port 0, and polling with deadlines.
//!
//! Addresses come from the variables `scripts/stack up` prints. A test that
//! needs them and finds them unset fails with instructions; it never passes
//! without having run.

pub mod browser;
pub mod limits;
pub mod load;
pub mod stack;
pub mod webhook;
pub mod workload;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// An environment variable the stack sets, or a panic telling how to set it.
pub fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs the real stack. Run `scripts/test`, or \
             `eval \"$(scripts/stack up)\"` and then cargo test"
        )
    })
}

/// Polls `check` until it returns `Some`, or panics after `deadline` with `what`.
pub async fn poll_until<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// A free loopback port (bound and released; good enough for private servers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A private tansu broker that a test may kill and restart on the same port.
#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    child: Option<tokio::process::Child>,
}

impl Broker {
    pub async fn start() -> Broker {
        let mut broker = Broker { port: free_port(), child: None };
        broker.restart().await;
        broker
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process (again) on its port and waits until it accepts connections.
    pub async fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = tokio::process::Command::new(stack_var("METERLINE_TANSU_BIN"))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let addr: SocketAddr = self.addr().parse().expect("addr");
        poll_until(Duration::from_secs(20), "the broker to listen", || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
    }

    /// SIGKILLs the broker and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill tansu");
            child.wait().await.expect("reap tansu");
        }
    }
}

/// Creates `topic` with `partitions` on `brokers`.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let results = admin
        .create_topics([&NewTopic::new(topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in results {
        if let Err((_, code)) = r {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "create {topic}");
        }
    }
}

/// One record read back from the topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Reads every partition of `topic` from the beginning until `expected` records
/// have arrived (then waits `settle` more to catch extras), or the deadline passes.
pub fn read_topic(brokers: &str, topic: &str, expected: usize, deadline: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "meterline-tests-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            assignment.add_partition_offset(topic, p.id(), Offset::Beginning).expect("assign");
        }
    }
    consumer.assign(&assignment).expect("assign");
    let start = Instant::now();
    let mut records = Vec::new();
    // Once the expected count is in, keep reading briefly so that extra
    // (duplicate) records would be seen too.
    let mut settle_until: Option<Instant> = None;
    loop {
        if let Some(until) = settle_until {
            if Instant::now() > until {
                break;
            }
        } else if records.len() >= expected {
            settle_until = Some(Instant::now() + Duration::from_millis(500));
        }
        if start.elapsed() > deadline {
            break;
        }
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            let m = result.expect("consume");
            records.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    records
}

/// An ingest server running in this process on a port-0 listener.
#[derive(Debug)]
pub struct Ingest {
    pub url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ingest {
    pub async fn start(config: meterline_ingest::Config) -> Ingest {
        init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            meterline_ingest::serve(config, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("ingest serve");
        });
        Ingest { url, shutdown: Some(tx), task }
    }

    /// Asks for graceful shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("ingest task");
    }
}

/// Keys of the test tenants: (tenant, ingest key, read key).
pub const TENANTS: &[(&str, &str, &str)] =
    &[("acme", "acme-ingest-key", "acme-read-key"), ("globex", "globex-ingest-key", "globex-read-key")];

/// The test tenants' admin keys (plans and subscriptions), in `TENANTS` order.
pub const ADMIN_KEYS: &[&str] = &["acme-admin-key", "globex-admin-key"];

/// The test tenants as `[[tenants]]` TOML: their keys, and a credit price of 0.001 USD.
pub fn tenants_toml() -> String {
    tenants_toml_with(&[])
}

/// [`tenants_toml`] with more keys for some tenants: `(tenant, TOML lines)`
/// (say `portal_secret = "…"`), written into that tenant's entry.
pub fn tenants_toml_with(fields: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for ((tenant, ingest, read), admin) in TENANTS.iter().zip(ADMIN_KEYS) {
        let more: String = fields.iter().filter(|(t, _)| t == tenant).map(|(_, lines)| format!("{lines}\n")).collect();
        text.push_str(&format!(
            "[[tenants]]\nid = \"{tenant}\"\ncredit_price_usd = \"0.001\"\n{more}\
             [[tenants.keys]]\nname = \"ingest\"\nsha256 = \"{}\"\nscopes = [\"ingest\"]\n\
             [[tenants.keys]]\nname = \"read\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n\
             [[tenants.keys]]\nname = \"admin\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
            meterline_schemas::tenants::hash_key(ingest),
            meterline_schemas::tenants::hash_key(read),
            meterline_schemas::tenants::hash_key(admin),
        ));
    }
    text
}

/// A test's own slice of the shared stack: a fresh 4-partition topic, a
/// fresh ClickHouse database, and ingest in this process in front of them.
#[derive(Debug)]
pub struct Pipeline {
    pub brokers: String,
    pub ch: stack::ClickHouse,
    pub topic: String,
    pub database: String,
    pub ingest: Ingest,
}

impl Pipeline {
    /// Names the topic and the database after `test`.
    pub async fn start(test: &str) -> Pipeline {
        let brokers = stack_var("METERLINE_TEST_KAFKA_BROKERS");
        let ch = stack::ClickHouse::shared();
        let topic = unique_topic(test);
        let database = ch.database(&format!("{test}_{}", free_port())).await;
        create_topic(&brokers, &topic, 4).await;
        let ingest = Ingest::start(ingest_config(&brokers, &topic, "")).await;
        Pipeline { brokers, ch, topic, database, ingest }
    }
}

/// An aggregator config on the test stack: HTTP on `listen`, a 200 ms flush,
/// 2 s group sessions (tansu joins take half of it), the test tenants, and
/// `extra` sections.
pub fn aggregator_config(listen: u16, brokers: &str, topic: &str, clickhouse_url: &str, database: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{listen}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup_id = \"g-{topic}\"\n\
         session_timeout_ms = 2000\n[clickhouse]\nurl = \"{clickhouse_url}\"\ndatabase = \"{database}\"\n[flush]\ninterval_ms = 200\n{extra}\n{}",
        tenants_toml()
    )
}

/// An ingest config for `brokers` and `topic` with the test tenants.
pub fn ingest_config(brokers: &str, topic: &str, extra: &str) -> meterline_ingest::Config {
    let text = format!(
        "{extra}\n[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\npartitions = 4\nproduce_timeout_ms = 3000\n{}",
        tenants_toml()
    );
    meterline_ingest::Config::load(&text, []).expect("test config")
}

/// The all-in-one server running in this process over a data directory.
#[derive(Debug)]
pub struct Embedded {
    pub url: String,
    pub dir: std::path::PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Embedded {
    /// Starts it on a port-0 listener with the test tenants and `extra` TOML.
    pub async fn start(dir: &std::path::Path, extra: &str) -> Embedded {
        Embedded::start_with_tenants(dir, extra, &tenants_toml()).await
    }

    /// The same with `tenants` as the `[[tenants]]` TOML (see [`tenants_toml_with`]).
    pub async fn start_with_tenants(dir: &std::path::Path, extra: &str, tenants: &str) -> Embedded {
        init_tracing();
        let config = meterline::Config::load(&format!("{extra}\n{tenants}"), []).expect("embedded config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let data = dir.to_owned();
        let task = tokio::spawn(async move {
            meterline::serve(config, &data, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("embedded serve");
        });
        Embedded { url, dir: dir.to_owned(), shutdown: Some(tx), task }
    }

    /// Stops it and waits for the writer's last commit.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("embedded task");
    }
}

/// A fresh, empty temp directory for one test.
pub fn temp_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("meterline-{test}-{}-{}", std::process::id(), free_port()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// GETs `url` with `key`: the status and JSON body.
pub async fn get_json(url: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(k) = key {
        request = request.bearer_auth(k);
    }
    let response = request.send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

/// A unique topic name for one test.
pub fn unique_topic(test: &str) -> String {
    format!("t-{test}-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ rand_u64())
}

fn rand_u64() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    u128::from(h.finish())
}

/// A valid event for `user` with a key unique to `n`, stamped a minute ago.
pub fn event(user: &str, n: usize) -> serde_json::Value {
    serde_json::json!({
        "idempotency_key": format!("{user}-{n}"),
        "timestamp": (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339(),
        "user_id": user,
        "customer_id": "cust-1",
        "feature": "chat",
        "model": "gpt-4o",
        "input_tokens": 100 + n,
        "output_tokens": 20,
        "cost_usd": format!("0.{:09}", n + 1),
    })
}

/// Sends service logs to the test's captured output (shown when a test fails).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
}

/// A query API server running in this process on a port-0 listener.
#[derive(Debug)]
pub struct QueryApi {
    pub url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl QueryApi {
    /// Starts the query API over `clickhouse_url`/`database` with the test tenants' keys.
    pub async fn start(clickhouse_url: &str, database: &str) -> QueryApi {
        QueryApi::start_with(clickhouse_url, database, "").await
    }

    /// The same, with `server` as the `[server]` section's keys.
    pub async fn start_with(clickhouse_url: &str, database: &str, server: &str) -> QueryApi {
        init_tracing();
        let mut text = format!("[server]\n{server}\n[clickhouse]\nurl = \"{clickhouse_url}\"\ndatabase = \"{database}\"\n");
        for (tenant, ingest, read) in TENANTS {
            text.push_str(&format!(
                "[[tenants]]\nid = \"{tenant}\"\n[[tenants.keys]]\nname = \"ingest\"\nsha256 = \"{}\"\nscopes = [\"ingest\"]\n\
                 [[tenants.keys]]\nname = \"read\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
                meterline_schemas::tenants::hash_key(ingest),
                meterline_schemas::tenants::hash_key(read),
            ));
        }
        let config = meterline_query_api::Config::load(&text, []).expect("query config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            meterline_query_api::serve(config, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("query api serve");
        });
        QueryApi { url, shutdown: Some(tx) }
    }

    /// GET `path` with `key`; the status and JSON body.
    pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
        get_json(&format!("{}{path}", self.url), key).await
    }
}

impl Drop for QueryApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Runs `promtool` (from the stack) with `args` and `stdin`; its status and output.
pub fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(stack_var("METERLINE_PROMTOOL"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("promtool stdin");
    }
    let out = child.wait_with_output().expect("promtool");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Asserts that `body`, answered `status` to a GET of `path` (with its query),
/// has the shape the query API's OpenAPI document gives that route and status.
pub fn assert_documented(path: &str, status: u16, body: &serde_json::Value) {
    let doc: serde_json::Value = serde_json::from_str(meterline_query_api::OPENAPI).expect("openapi.json parses");
    let route = path.split('?').next().unwrap_or(path);
    let template = doc["paths"]
        .as_object()
        .and_then(|paths| {
            paths.keys().find(|t| {
                let (t, r): (Vec<&str>, Vec<&str>) = (t.split('/').collect(), route.split('/').collect());
                t.len() == r.len() && t.iter().zip(&r).all(|(a, b)| a == b || a.starts_with('{'))
            })
        })
        .unwrap_or_else(|| panic!("{route} is not documented"))
        .clone();
    let mut schema = doc["paths"][&template]["get"]["responses"][status.to_string()]["content"]["application/json"]["schema"].clone();
    assert!(schema.is_object(), "{template} documents no {status} answer");
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{path} ({status}) does not match the OpenAPI document: {errors:?}\n{body}");
}
