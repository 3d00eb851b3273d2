//! The README's quick start, run as written: its shell blocks against the
//! real binary started the way the README starts it (no config, default data
//! directory), on a free port instead of 8080.

use meterline_tests::stack::Process;
use meterline_tests::*;
use serde_json::Value;
use std::ffi::OsStr;
use std::time::Duration;

/// The shell block after `<!-- readme-test: NAME -->`.
fn block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- readme-test: {name} -->");
    let at = readme.find(&marker).unwrap_or_else(|| panic!("README lost its {marker} block"));
    let rest = &readme[at + marker.len()..];
    let start = rest.find("```sh\n").expect("a sh block after the marker") + 6;
    let end = rest[start..].find("```").expect("the block's end");
    rest[start..start + end].to_owned()
}

fn sh(script: &str, cwd: &std::path::Path) -> Value {
    let out = std::process::Command::new("bash").arg("-euc").arg(script).current_dir(cwd).output().expect("bash");
    assert!(out.status.success(), "README block failed: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("README block printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn the_quick_start_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
    assert!(readme.contains("| `cargo run --release` |"), "the README's first command is the all-in-one binary");
    let dir = temp_dir("readme");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = Process::start_in("meterline", &["--listen".as_ref(), OsStr::new(&listen)], Some(&dir));
    poll_until(Duration::from_secs(60), "the binary to be ready", || async {
        reqwest::get(format!("http://{listen}/readyz")).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;

    let on_port = |script: String| script.replace("127.0.0.1:8080", &listen);
    let posted = sh(&on_port(block(&readme, "post")), &dir);
    assert_eq!(posted["accepted"], 1, "{posted}");
    assert_eq!(posted["rejected"][0]["errors"][0]["field"], "timestamp", "{posted}");

    let top = sh(&on_port(block(&readme, "top-spenders")), &dir);
    let row = &top["rows"][0];
    assert_eq!(
        (row["user_id"].as_str(), row["cost_usd"].as_str(), row["revenue_usd"].as_str(), row["margin_usd"].as_str(), row["share"].as_str()),
        (Some("user-42"), Some("0.006"), Some("0.02"), Some("0.014"), Some("1.000000")),
        "{top}"
    );

    let committed = sh(&on_port(block(&readme, "limits")), &dir);
    assert_eq!(committed["state"], "committed", "{committed}");
    let limit = &committed["limits"][0];
    assert_eq!((limit["name"].as_str(), limit["used"].as_str(), limit["remaining"].as_str()), (Some("daily-gens"), Some("1"), Some("9")), "{committed}");
    server.stop().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}
