//! Real server processes for the tests: private ClickHouse and Redis
//! instances, the service binaries, and HTTP queries against ClickHouse.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::{free_port, poll_until, stack_var};

/// A ClickHouse server: the stack's shared one, or a private one a test may kill.
#[derive(Debug)]
pub struct ClickHouse {
    pub url: String,
    http_port: u16,
    dir: Option<PathBuf>,
    child: Option<tokio::process::Child>,
}

impl ClickHouse {
    /// The stack's shared server.
    pub fn shared() -> ClickHouse {
        let url = stack_var("METERLINE_TEST_CLICKHOUSE_URL");
        let http_port = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        ClickHouse { url, http_port, dir: None, child: None }
    }

    /// A private server on free ports with its data in a temp dir.
    pub async fn private() -> ClickHouse {
        ClickHouse::private_in("UTC").await
    }

    /// A private server whose time zone is `timezone` (an IANA name).
    pub async fn private_in(timezone: &str) -> ClickHouse {
        let dir = std::env::temp_dir().join(format!("meterline-ch-{}-{}", std::process::id(), free_port()));
        let (http, tcp) = (free_port(), free_port());
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("ch dirs");
        }
        let d = dir.display();
        std::fs::write(
            dir.join("config.xml"),
            format!(
                "<?xml version=\"1.0\"?><yandex>\
                 <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/server.err.log</errorlog></logger>\
                 <listen_host>127.0.0.1</listen_host><http_port>{http}</http_port><tcp_port>{tcp}</tcp_port>\
                 <max_connections>256</max_connections><max_concurrent_queries>64</max_concurrent_queries>\
                 <uncompressed_cache_size>67108864</uncompressed_cache_size><mark_cache_size>67108864</mark_cache_size>\
                 <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\
                 <format_schema_path>{d}/format_schemas/</format_schema_path><users_config>users.xml</users_config>\
                 <default_profile>default</default_profile><default_database>default</default_database>\
                 <timezone>{timezone}</timezone><mlock_executable>false</mlock_executable></yandex>"
            ),
        )
        .expect("ch config");
        std::fs::write(
            dir.join("users.xml"),
            "<?xml version=\"1.0\"?><yandex><profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>\
             <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>\
             <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas></yandex>",
        )
        .expect("ch users");
        let mut ch = ClickHouse { url: format!("http://127.0.0.1:{http}"), http_port: http, dir: Some(dir), child: None };
        ch.restart().await;
        ch
    }

    /// (Re)starts a private server on its ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        let dir = self.dir.clone().expect("only a private server can be restarted");
        let binary = which("clickhouse-server");
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config-file={}", dir.join("config.xml").display()))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn clickhouse-server");
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/ping", self.http_port);
        poll_until(Duration::from_secs(60), "ClickHouse to answer", || {
            let url = url.clone();
            async move { reqwest::get(url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
    }

    /// SIGKILLs a private server.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill clickhouse");
            child.wait().await.expect("reap clickhouse");
        }
    }

    /// Runs `sql` and returns the body; panics on an error answer.
    pub async fn query(&self, sql: &str) -> String {
        let response = reqwest::Client::new().post(&self.url).body(sql.to_owned()).send().await.expect("clickhouse request");
        let status = response.status();
        let body = response.text().await.expect("clickhouse body");
        assert!(status.is_success(), "ClickHouse refused {sql}: {body}");
        body
    }

    /// Runs `sql`; `None` on an error answer (a table the services have not
    /// created yet, while a test polls).
    pub async fn try_query(&self, sql: &str) -> Option<String> {
        let response = reqwest::Client::new().post(&self.url).body(sql.to_owned()).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    }

    /// True once the aggregator has migrated `database`.
    pub async fn migrated(&self, database: &str) -> bool {
        self.try_query(&format!("EXISTS TABLE {database}.rollups_daily_by_dims")).await.is_some_and(|t| t.trim() == "1")
    }

    /// Rows of `sql` (which must end in `FORMAT JSONEachRow`) as JSON values.
    pub async fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(sql).await.lines().map(|l| serde_json::from_str(l).expect("JSONEachRow line")).collect()
    }

    /// A fresh database for one test.
    pub async fn database(&self, name: &str) -> String {
        self.query(&format!("CREATE DATABASE IF NOT EXISTS {name}")).await;
        name.to_owned()
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A private Redis server (the stack's Debian `redis-server`) with AOF on and
/// an fsync per write, which a test may SIGKILL and restart on the same port
/// and data: what it acknowledged survives.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Redis {
    /// Starts one on a free port with a fresh temp data dir, and waits until it answers `PING`.
    pub async fn private() -> Redis {
        let mut redis = Redis { port: free_port(), dir: crate::temp_dir("redis"), child: None };
        redis.start().await;
        redis
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its data directory (the AOF is in `appendonlydir/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILLs it if running, starts it again on the same port and data, and
    /// waits until it answers `PING` (after it has replayed the AOF).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start().await;
    }

    /// SIGKILL: no final fsync, no rewrite; waits for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill redis-server");
            child.wait().await.expect("reap redis-server");
        }
    }

    async fn start(&mut self) {
        let binary = std::env::var_os("METERLINE_REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| which("redis-server"));
        let log = self.dir.join("redis.log");
        let mut child = tokio::process::Command::new(&binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "yes"])
            .arg("--logfile")
            .arg(&log)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let addr = self.addr();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(10);
        loop {
            if redis_pong(&addr).await {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server on {addr} exited ({status}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(std::time::Instant::now() < deadline, "timed out waiting for redis-server on {addr} to answer PING");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        self.child = Some(child);
    }

    /// Kills the process without waiting for it (what `Drop` does).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// True when a `PING` on a fresh connection to `addr` gets `+PONG` within a second.
async fn redis_pong(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 64];
        while !reply.ends_with(b"\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Some(reply.starts_with(b"+PONG"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Some(true)))
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: run scripts/stack install"))
}

/// The path of a workspace binary built in this profile (`scripts/test` builds them first).
pub fn service_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from target/<profile>/deps/<test>, a bench binary from
    // target/<profile>/<bench>: the services are in target/<profile>/ either way.
    let exe_dir = exe.parent().expect("exe dir");
    let profile_dir = if exe_dir.ends_with("deps") { exe_dir.parent().expect("target dir") } else { exe_dir };
    let path = profile_dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace --bins` (scripts/test does)", path.display());
    path
}

/// A service binary running as its own process, which a test may SIGKILL.
#[derive(Debug)]
pub struct Process {
    name: String,
    args: Vec<std::ffi::OsString>,
    cwd: Option<PathBuf>,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    /// Extra environment for every start (a secret a test hands the process).
    env: Vec<(String, String)>,
}

impl Process {
    /// Writes `config` to a temp file and starts `binary --config FILE`.
    pub fn start(binary: &str, config: &str) -> Process {
        Process::start_config_env(binary, config, &[])
    }

    /// [`Process::start`] with the extra environment `env` (kept for restarts).
    pub fn start_config_env(binary: &str, config: &str, env: &[(&str, &str)]) -> Process {
        let tag = format!("{binary}-{}-{}", std::process::id(), free_port());
        let path = std::env::temp_dir().join(format!("{tag}.toml"));
        std::fs::write(&path, config).expect("write config");
        Process::start_env(binary, &["--config".as_ref(), path.as_os_str()], env)
    }

    /// Starts `binary` with `args`.
    pub fn start_args(binary: &str, args: &[&std::ffi::OsStr]) -> Process {
        Process::start_in(binary, args, None)
    }

    /// Starts `binary` with `args` in the working directory `cwd`.
    pub fn start_in(binary: &str, args: &[&std::ffi::OsStr], cwd: Option<&Path>) -> Process {
        let tag = format!("{binary}-{}-{}", std::process::id(), free_port());
        let log = std::env::temp_dir().join(format!("{tag}.log"));
        let args = args.iter().map(|a| a.to_os_string()).collect();
        let mut p = Process { name: binary.to_owned(), args, cwd: cwd.map(Path::to_owned), log, child: None, env: Vec::new() };
        p.restart();
        p
    }

    /// Starts `binary` with `args` and the extra environment `env` (kept for restarts).
    pub fn start_env(binary: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Process {
        let tag = format!("{binary}-{}-{}", std::process::id(), free_port());
        let log = std::env::temp_dir().join(format!("{tag}.log"));
        let args = args.iter().map(|a| a.to_os_string()).collect();
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut p = Process { name: binary.to_owned(), args, cwd: None, log, child: None, env };
        p.restart();
        p
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut command = tokio::process::Command::new(service_binary(&self.name));
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        let child = command
            .args(&self.args)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn service");
        self.child = Some(child);
    }

    /// The running process's id (to read its memory from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// SIGKILL: no flush, no commit, no goodbye.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill");
            child.wait().await.expect("reap");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
            assert!(matches!(status, Ok(Ok(s)) if s.success()), "{} did not stop cleanly: {status:?}\n{}", self.name, self.log_tail());
        }
    }

    /// Everything the process logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}
