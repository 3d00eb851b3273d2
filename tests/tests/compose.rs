//! docker-compose.yml cannot run here (no Docker engine), so its structure is
//! checked instead: every service's command, config, ports, mounts and
//! environment overrides refer to things that exist and validate.

use std::collections::BTreeSet;
use std::path::Path;
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn load(path: &str) -> Yaml {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}")).remove(0)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn env(service: &Yaml) -> Vec<(String, String)> {
    service["environment"]
        .as_hash()
        .map(|h| h.iter().filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

#[test]
fn compose_services_refer_to_what_exists() {
    let compose = load("docker-compose.yml");
    let services = compose["services"].as_hash().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for wanted in ["kafka", "clickhouse", "ingest", "aggregator", "query-api", "prometheus", "grafana"] {
        assert!(names.contains(wanted), "service {wanted} missing");
    }
    let kafka = &compose["services"]["kafka"];
    assert!(env(kafka).iter().any(|(k, v)| k == "KAFKA_PROCESS_ROLES" && v.contains("controller")), "Kafka runs in KRaft mode");
    let mut listen_ports = Vec::new();
    for (name, service) in services {
        let name = name.as_str().expect("name");
        assert!(!service["image"].is_badvalue() || !service["build"].is_badvalue(), "{name}: image or build");
        if service["build"].as_str() == Some(".") {
            assert!(Path::new(ROOT).join("Dockerfile").is_file());
        }
        for port in strings(&service["ports"]) {
            let parts: Vec<&str> = port.split(':').collect();
            assert!(parts.len() == 2 && parts.iter().all(|p| p.parse::<u16>().is_ok()), "{name}: port {port}");
        }
        for volume in strings(&service["volumes"]) {
            if let Some(source) = volume.strip_prefix("./") {
                let source = source.split(':').next().expect("source");
                assert!(Path::new(ROOT).join(source).exists(), "{name}: mounted {source} is not in the repo");
            }
        }
        let command = strings(&service["command"]);
        if let Some(binary) = command.first().filter(|c| c.starts_with("meterline-")) {
            let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("Dockerfile");
            assert!(dockerfile.contains(&format!("-p {binary}")), "{name}: the image does not build {binary}");
            let config = command.iter().skip_while(|c| *c != "--config").nth(1).expect("--config FILE");
            let file = config.strip_prefix("/etc/meterline/").expect("configs are mounted at /etc/meterline");
            let text = std::fs::read_to_string(Path::new(ROOT).join("config").join(file)).expect("config file in the repo");
            let vars = env(service);
            // The service's own config loader must accept the file with the compose overrides.
            let listen = match binary.as_str() {
                "meterline-ingest" => meterline_ingest::Config::load(&text, vars).map(|c| c.server.listen).map_err(|e| e.to_string()),
                "meterline-aggregator" => meterline_aggregator::Config::load(&text, vars).map(|c| c.server.listen).map_err(|e| e.to_string()),
                "meterline-query-api" => meterline_query_api::Config::load(&text, vars).map(|c| c.server.listen).map_err(|e| e.to_string()),
                other => panic!("{name}: unknown binary {other}"),
            }
            .unwrap_or_else(|e| panic!("{name}: {file}: {e}"));
            assert!(listen.ip().is_unspecified(), "{name}: must listen on 0.0.0.0 inside the container");
            assert!(strings(&service["ports"]).iter().any(|p| p.ends_with(&format!(":{}", listen.port()))), "{name}: port {} not published", listen.port());
            listen_ports.push((name.to_owned(), listen.port()));
        }
    }
    // Prometheus scrapes exactly the services, on their listen ports.
    let prometheus = load("deploy/prometheus/prometheus.yml");
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_vec()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| job["static_configs"].as_vec().cloned().unwrap_or_default())
        .flat_map(|c| strings(&c["targets"]))
        .collect();
    let expected: BTreeSet<String> = listen_ports.iter().map(|(n, p)| format!("{n}:{p}")).collect();
    assert_eq!(targets, expected);
}

#[test]
fn dashboard_uses_only_metrics_that_exist() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/dashboards/meterline.json")).expect("dashboard")).expect("json");
    let known = [
        include_str!("../../ingest/src/metrics.rs"),
        include_str!("../../aggregator/src/metrics.rs"),
        include_str!("../../query-api/src/metrics.rs"),
        include_str!("../../deploy/prometheus/alerts.yml"),
    ]
    .concat();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            exprs += 1;
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                let name = word.trim_end_matches("_bucket");
                if name.starts_with("meterline_") || name.starts_with("tenant:meterline") {
                    assert!(known.contains(name), "dashboard uses {name}, which nothing exports or records");
                }
            }
        }
    }
    assert!(exprs >= 9);
}
