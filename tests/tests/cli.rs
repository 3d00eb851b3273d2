//! The `meterline` binary's command line, without servers: help, `keys new`
//! and `config check`. Run against the built binary (`cargo build -p meterline`
//! first; `scripts/test` does).

use meterline_schemas::tenants::{KeyRing, Scope};
use meterline_tests::stack::service_binary;
use meterline_tests::temp_dir;
use std::path::Path;
use std::process::Output;

/// Runs `meterline args` with no inherited `METERLINE_*` variables but `env`.
fn meterline(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(service_binary("meterline"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("METERLINE_") {
            command.env_remove(name);
        }
    }
    command.args(args).envs(env.iter().copied()).env("RUST_BACKTRACE", "0").output().expect("run meterline")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn help_lists_the_subcommands_and_flags() {
    let out = meterline(&["--help"], &[]);
    let (help, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for word in ["run", "demo", "ingest", "aggregator", "query-api", "config", "keys", "--data-dir", "--config", "--listen", "--demo", "--demo-rate"] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    for (args, words) in [
        (&["ingest", "--help"][..], &["--config", "METERLINE_CONFIG"][..]),
        (&["config", "check", "--help"], &["FILE", "--role", "all-in-one", "query-api"]),
        (&["keys", "new", "--help"], &["--tenant", "--scopes", "--name", "admin"]),
        (&["stripe-sync", "--help"], &["--config", "--data-dir", "METERLINE_STRIPE_SECRET_KEY"]),
    ] {
        let out = meterline(args, &[]);
        let (help, stderr) = text(&out);
        assert!(out.status.success(), "{args:?}: {stderr}");
        for word in words {
            assert!(help.contains(word), "{args:?} lacks {word}:\n{help}");
        }
    }
}

#[test]
fn keys_new_prints_a_key_its_block_authenticates() {
    let out = meterline(&["keys", "new", "--tenant", "acme", "--scopes", "ingest,read"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let key = stdout.lines().map(str::trim).find(|l| l.starts_with("mlk_")).unwrap_or_else(|| panic!("no key printed:\n{stdout}"));
    let block = &stdout[stdout.find("[[tenants.keys]]").unwrap_or_else(|| panic!("no block printed:\n{stdout}"))..];
    assert!(!block.contains(key), "the block must hold the hash, not the key:\n{block}");

    // Pasted under its tenant, the block loads as config and the key authenticates.
    let config = meterline::Config::load(&format!("[[tenants]]\nid = \"acme\"\n\n{block}"), []).unwrap_or_else(|e| panic!("{e}:\n{block}"));
    let ring = KeyRing::from_config(&config.tenants).expect("key ring");
    let principal = ring.authenticate(key).expect("the printed key authenticates");
    assert_eq!((principal.tenant.as_str(), principal.key_name.as_str()), ("acme", "acme-ingest-read"));
    assert!(principal.allows(Scope::Ingest) && principal.allows(Scope::Read) && !principal.allows(Scope::Admin));
    assert!(ring.authenticate("mlk_other").is_none());

    // Every run makes a new key.
    let again = text(&meterline(&["keys", "new", "--tenant", "acme", "--scopes", "admin", "--name", "ops"], &[])).0;
    assert!(!again.contains(key) && again.contains("name = \"ops\"") && again.contains("scopes = [\"admin\"]"), "{again}");
}

#[test]
fn keys_new_refuses_unknown_scopes_and_bad_tenants() {
    let out = meterline(&["keys", "new", "--tenant", "acme", "--scopes", "ingest,owner"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("owner"), "{stderr}");
    assert!(!stdout.contains("mlk_"), "no key on error: {stdout}");
    let out = meterline(&["keys", "new", "--tenant", "Not/Valid", "--scopes", "read"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("Not/Valid"), "{stderr}");
    assert!(!stdout.contains("mlk_"), "no key on error: {stdout}");
}

/// The `sha256 = "..."` values in a config file.
fn hashes(config: &str) -> Vec<String> {
    config.lines().filter_map(|l| l.trim().strip_prefix("sha256 = \"")?.strip_suffix('"').map(str::to_owned)).collect()
}

#[test]
fn config_check_accepts_the_examples_and_masks_secrets() {
    let password = "s3cret-pw-not-shown";
    for role in ["ingest", "aggregator", "query-api"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../config/{role}.example.toml"));
        let file = std::fs::read_to_string(&path).expect("example config");
        let out = meterline(&["config", "check", path.to_str().expect("utf-8 path"), "--role", role], &[("METERLINE_CLICKHOUSE__PASSWORD", password)]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{role}: {stderr}");
        assert!(stdout.contains("listen") && stdout.contains("\"demo\""), "{role} prints its config:\n{stdout}");
        assert!(!stdout.contains(password), "{role} shows the ClickHouse password:\n{stdout}");
        if role != "ingest" {
            assert!(stdout.contains("password: \"***\""), "{role}:\n{stdout}");
        }
        for hash in hashes(&file) {
            assert!(!stdout.contains(&hash), "{role} shows a key hash:\n{stdout}");
        }
        if !hashes(&file).is_empty() {
            assert!(stdout.contains("sha256: \"***\""), "{role}:\n{stdout}");
        }
    }

    // The all-in-one default: the config generated on first run.
    let dir = temp_dir("cli-check");
    let (path, keys) = meterline::devconfig::ensure(&dir).expect("generated config");
    let keys = keys.expect("keys generated now");
    let file = std::fs::read_to_string(&path).expect("config");
    let out = meterline(&["config", "check", path.to_str().expect("utf-8 path")], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"dev\"") && stdout.contains("sha256: \"***\""), "{stdout}");
    for secret in hashes(&file).into_iter().chain([keys.ingest, keys.read]) {
        assert!(!stdout.contains(&secret), "all-in-one shows a secret:\n{stdout}");
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = temp_dir("cli-check-bad");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/query-api.example.toml")).expect("example");
    for (name, edit, key) in [
        ("typo.toml", example.replace("ranking_cache_groups =", "ranking_cache_grups ="), "ranking_cache_grups"),
        ("invalid.toml", example.replace("max_range_days = 400", "max_range_days = 0"), "server.max_range_days"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, edit).expect("write config");
        let out = meterline(&["config", "check", path.to_str().expect("utf-8 path"), "--role", "query-api"], &[]);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{name} passed the check");
        assert!(stderr.contains(key), "{name}: the error should name {key}:\n{stderr}");
    }
    // The same file for the wrong role fails too (query-api has no [kafka]; ingest requires it).
    let out = meterline(&["config", "check", dir.join("typo.toml").to_str().expect("utf-8 path"), "--role", "ingest"], &[]);
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).expect("clean up");
}
