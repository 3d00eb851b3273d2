//! A headless Chromium driven over WebDriver, for the dashboard's tests: a
//! private chromedriver on a free port, a fresh profile per browser, a
//! 1280x800 window, and waits that poll with deadlines.
//!
//! `scripts/stack install` installs Debian's `chromium` and
//! `chromium-driver`. The flags keep Chromium off the network: this machine
//! has none, and without them Chromium waits on connections it never gets.

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Chromium's flags: headless, no sandbox (tests may run as root), and none
/// of its background connections.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// One browser: its chromedriver process, its profile directory and the session.
#[derive(Debug)]
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session.
    pub async fn start() -> Browser {
        let chromedriver = std::env::var("METERLINE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium = std::env::var("METERLINE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let port = crate::free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {chromedriver}: {e}; run `scripts/stack install` (apt packages chromium chromium-driver)"));
        let url = format!("http://127.0.0.1:{port}");
        crate::poll_until(Duration::from_secs(20), "chromedriver to listen", || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
        let profile = crate::temp_dir("chromium-profile");
        let mut args: Vec<String> = FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push("--window-size=1280,800".to_owned());
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": chromium, "args": args }));
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("opening a Chromium session through chromedriver: {e}"));
        client.set_window_size(1280, 800).await.expect("window size");
        Browser { client, driver, profile }
    }

    /// Opens `url` and waits for the document.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Waits up to `deadline` for an element matching the CSS `selector`.
    pub async fn wait_for(&self, selector: &str, deadline: Duration) -> Element {
        let start = Instant::now();
        loop {
            if let Ok(el) = self.client.find(Locator::Css(selector)).await {
                return el;
            }
            if start.elapsed() > deadline {
                let text = self.text("body").await.unwrap_or_default();
                panic!("timed out after {deadline:?} waiting for {selector}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element at `selector` has text that `check` accepts; returns that text.
    pub async fn wait_for_text(&self, selector: &str, deadline: Duration, check: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(text) = self.text(selector).await
                && check(&text)
            {
                return text;
            }
            if start.elapsed() > deadline {
                let body = self.text("body").await.unwrap_or_default();
                panic!("timed out after {deadline:?} waiting for the text of {selector}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The visible text of the first element at `selector`, if there is one.
    pub async fn text(&self, selector: &str) -> Option<String> {
        let el = self.client.find(Locator::Css(selector)).await.ok()?;
        el.text().await.ok()
    }

    /// The attribute `name` of the first element at `selector`.
    pub async fn attr(&self, selector: &str, name: &str) -> Option<String> {
        let el = self.client.find(Locator::Css(selector)).await.ok()?;
        el.attr(name).await.ok().flatten()
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Sets the window to `width` x `height`.
    pub async fn resize(&self, width: u32, height: u32) {
        self.client.set_window_size(width, height).await.expect("window size");
    }

    /// Writes a PNG of the window to `target/screenshots/<name>.png`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("screenshots dir");
        let png = self.client.screenshot().await.expect("screenshot");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Ends the session, stops chromedriver and removes the profile.
    pub async fn stop(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    /// A panicking test still stops its chromedriver (Chromium exits with it).
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `target/screenshots` of the workspace.
pub fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("screenshots")
}
