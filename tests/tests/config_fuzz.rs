//! Property tests over every service's config loader: documents built from
//! the real keys (walked from `config/*.example.toml` and the all-in-one's
//! generated file) with mutated values (wrong types, negative, huge, empty,
//! nested), unknown keys, and arbitrary `METERLINE_<SECTION>__<KEY>`
//! overrides. The loader never panics, and a refusal names a key it was
//! given: the message holds a mutated key's name or the unknown key's.

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use std::path::Path;

/// CI runs the same cases every time; `METERLINE_FUZZ_SEED=<u64>` explores others.
const SEED: u64 = 0x6d65_7465_726c_696e;

fn seed() -> u64 {
    std::env::var("METERLINE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED)
}
const CASES: u32 = 256;

/// A loader under test: its error message, or `None` when it loaded.
type Loader = fn(&str, Vec<(String, String)>) -> Option<String>;

fn ingest(text: &str, vars: Vec<(String, String)>) -> Option<String> {
    meterline_ingest::Config::load(text, vars).err().map(|e| e.to_string())
}
fn aggregator(text: &str, vars: Vec<(String, String)>) -> Option<String> {
    meterline_aggregator::Config::load(text, vars).err().map(|e| e.to_string())
}
fn query_api(text: &str, vars: Vec<(String, String)>) -> Option<String> {
    meterline_query_api::Config::load(text, vars).err().map(|e| e.to_string())
}
fn all_in_one(text: &str, vars: Vec<(String, String)>) -> Option<String> {
    meterline::Config::load(text, vars).err().map(|e| e.to_string())
}

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The all-in-one's first-run config, as `cargo run` writes it.
fn all_in_one_text() -> String {
    let dir = std::env::temp_dir().join(format!("meterline-config-fuzz-{}", std::process::id()));
    let (path, _) = meterline::devconfig::ensure(&dir).expect("first-run config");
    let text = std::fs::read_to_string(path).expect("read");
    let _ = std::fs::remove_dir_all(&dir);
    text
}

/// Every leaf's dotted path in `table` (arrays of tables by their first entry).
fn leaves(table: &toml::Table, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for (k, v) in table {
        let mut path = prefix.to_vec();
        path.push(k.clone());
        match v {
            toml::Value::Table(t) => leaves(t, &path, out),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_table) && !items.is_empty() => {
                if let Some(toml::Value::Table(t)) = items.first() {
                    leaves(t, &path, out);
                }
            }
            _ => out.push(path),
        }
    }
}

/// The table at `path` (an array of tables: its first entry), made if missing.
fn table_at<'a>(root: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut t = root;
    for p in path {
        t = match t.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
            toml::Value::Table(inner) => inner,
            toml::Value::Array(items) => match items.first_mut() {
                Some(toml::Value::Table(inner)) => inner,
                _ => return None,
            },
            _ => return None,
        };
    }
    Some(t)
}

/// A value of any type and size a hand or a script could write.
fn wild() -> impl Strategy<Value = toml::Value> {
    use toml::Value as V;
    prop_oneof![
        any::<i64>().prop_map(V::Integer),
        proptest::sample::select(&[0i64, -1, 1, i64::MAX, i64::MIN, u32::MAX as i64 + 1, u16::MAX as i64 + 1, 86_400_000_000][..]).prop_map(V::Integer),
        any::<f64>().prop_map(V::Float),
        any::<bool>().prop_map(V::Boolean),
        ".{0,20}".prop_map(V::String),
        proptest::sample::select(&["", " ", "0", "-1", "5s", "500ms", "2m", "1h", "1d", "1y", "-5s", "99999999999999999999d", "ms", "1.5s", "allow", "deny", "lz4", "127.0.0.1:0", "[::1]:8080", "host", "redis://", "http://", "\u{0}"][..])
            .prop_map(|s| V::String(s.to_owned())),
        Just(V::Array(vec![])),
        Just(V::Array(vec![V::Integer(1), V::String("a".into())])),
        Just(V::Table(toml::Table::new())),
        Just(V::Table([("zz_nested".to_owned(), V::Integer(1))].into_iter().collect())),
        Just(V::Datetime("2026-01-01T00:00:00Z".parse().expect("datetime"))),
    ]
}

/// One change to a document.
#[derive(Debug, Clone)]
enum Change {
    /// Set the `index`th leaf (mod their count) to a value.
    Set(usize, toml::Value),
    /// Remove the `index`th leaf.
    Remove(usize),
    /// Add an unknown key beside the `index`th leaf.
    Unknown(usize, String),
    /// Override the `index`th leaf from the environment with this text.
    Env(usize, String),
    /// An override variable of junk.
    EnvJunk(String, String),
}

fn change() -> impl Strategy<Value = Change> {
    let env_text = prop_oneof![
        wild().prop_map(|v| match v {
            toml::Value::String(s) => s,
            other => other.to_string(),
        }),
        proptest::sample::select(&["", "[", "{", "\"", "'", "=", "a = 1", "{x = 1}", "[1, \"a\"]", "1e400", "nan", "inf", "0x10", "1_000"][..]).prop_map(str::to_owned),
    ];
    prop_oneof![
        4 => (any::<usize>(), wild()).prop_map(|(i, v)| Change::Set(i, v)),
        1 => any::<usize>().prop_map(Change::Remove),
        2 => (any::<usize>(), "zz_[a-z]{1,8}").prop_map(|(i, k)| Change::Unknown(i, k)),
        3 => (any::<usize>(), env_text).prop_map(|(i, v)| Change::Env(i, v)),
        1 => ("METERLINE_[A-Z_]{0,20}", ".{0,10}").prop_map(|(k, v)| Change::EnvJunk(k, v)),
    ]
}

/// The document and variables `changes` make of `base`, and every key name
/// a refusal may name (each changed leaf's path and name, each unknown key).
fn apply(base: &toml::Table, paths: &[Vec<String>], changes: &[Change]) -> (String, Vec<(String, String)>, Vec<String>) {
    let mut doc = base.clone();
    let mut vars = Vec::new();
    let mut names = Vec::new();
    let named = |path: &[String], names: &mut Vec<String>| {
        names.push(path.join("."));
        names.extend(path.last().cloned());
    };
    for c in changes {
        match c {
            Change::Set(i, v) => {
                let path = &paths[i % paths.len()];
                if let Some(t) = table_at(&mut doc, &path[..path.len() - 1]) {
                    t.insert(path[path.len() - 1].clone(), v.clone());
                    named(path, &mut names);
                }
            }
            Change::Remove(i) => {
                let path = &paths[i % paths.len()];
                if let Some(t) = table_at(&mut doc, &path[..path.len() - 1]) {
                    t.remove(&path[path.len() - 1]);
                    named(path, &mut names);
                }
            }
            Change::Unknown(i, key) => {
                let path = &paths[i % paths.len()];
                if let Some(t) = table_at(&mut doc, &path[..path.len() - 1]) {
                    t.insert(key.clone(), toml::Value::Integer(1));
                    names.push(key.clone());
                }
            }
            Change::Env(i, value) => {
                let path = &paths[i % paths.len()];
                vars.push((format!("METERLINE_{}", path.join("__").to_uppercase()), value.clone()));
                named(path, &mut names);
            }
            Change::EnvJunk(k, v) => {
                vars.push((k.clone(), v.clone()));
                // Below the prefix, the variable's path, lowercased, is the key.
                let rest = k.trim_start_matches("METERLINE_").to_lowercase();
                names.push(rest.replace("__", "."));
                names.extend(rest.split("__").map(str::to_owned));
            }
        }
    }
    (toml::to_string(&doc).expect("a table serializes"), vars, names)
}

fn fuzz(name: &str, text: &str, load: Loader) {
    assert_eq!(load(text, vec![]), None, "{name}: the base document loads");
    let base: toml::Table = text.parse().expect("base parses");
    let mut paths = Vec::new();
    leaves(&base, &[], &mut paths);
    assert!(paths.len() > 5, "{name}: keys found: {paths:?}");
    let name = name.to_owned();
    let outcome = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let mut runner = TestRunner::new(RunnerConfig { cases: CASES, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(seed()), ..RunnerConfig::default() });
            runner
                .run(&proptest::collection::vec(change(), 1..4), |changes| {
                    let (doc, vars, names) = apply(&base, &paths, &changes);
                    let result = std::panic::catch_unwind(|| load(&doc, vars.clone()));
                    let Ok(result) = result else { return Err(TestCaseError::fail(format!("{name}: the loader panicked on\n{doc}\nwith {vars:?}"))) };
                    if let Some(message) = result {
                        prop_assert!(
                            names.iter().any(|n| !n.is_empty() && message.contains(n.as_str())),
                            "{name}: the refusal names none of the keys changed ({names:?}):\n{message}\n--- document:\n{doc}\n--- env: {vars:?}"
                        );
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())
        })
        .expect("thread")
        .join()
        .expect("the runner does not panic");
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

#[test]
fn ingest_config() {
    fuzz("ingest", &example("ingest.example.toml"), ingest);
}

#[test]
fn aggregator_config() {
    fuzz("aggregator", &example("aggregator.example.toml"), aggregator);
}

#[test]
fn query_api_config() {
    fuzz("query-api", &example("query-api.example.toml"), query_api);
}

#[test]
fn all_in_one_config() {
    fuzz("all-in-one", &all_in_one_text(), all_in_one);
}
