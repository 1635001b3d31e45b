//! The deployment files stay true to the code: the shipped configuration and directories load and
//! validate, every metric the dashboard and alerts query exists, and every file the compose stack
//! mounts is in the repository. (Rendering with `docker compose config` and `kubectl kustomize`
//! happens in `scripts/check-deploy` where those tools exist.)

use std::path::{Path, PathBuf};

use gridtalk_config::Config;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_shipped_configuration_and_directories_are_valid() {
    let config = Config::load(
        Some(&repo("deploy/kubernetes/gridtalk.toml")),
        std::iter::empty(),
    )
    .unwrap_or_else(|e| panic!("deploy/kubernetes/gridtalk.toml: {e}"));
    assert_eq!(
        config.admin.listen.port(),
        9464,
        "the port the manifests probe"
    );
    assert_eq!(config.admin.log_format, "json");
    for directory in [
        "deploy/kubernetes/directory.toml",
        "deploy/demo/directory.toml",
    ] {
        let loaded = gridtalk_route::Directory::load(&repo(directory))
            .unwrap_or_else(|e| panic!("{directory}: {e}"));
        assert!(loaded.counts().1 > 0, "{directory} has contacts");
    }
}

/// Metric names the telemetry crate defines.
fn defined_metrics() -> Vec<String> {
    let source = read("crates/gridtalk-telemetry/src/lib.rs");
    source
        .split('"')
        .filter(|s| {
            s.starts_with("gridtalk_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// `gridtalk_…` identifiers used in a query file, without histogram suffixes.
fn queried_metrics(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("gridtalk_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
        found.push(base.to_string());
        rest = &tail[end..];
    }
    found
}

#[test]
fn dashboards_and_alerts_query_metrics_that_exist() {
    let defined = defined_metrics();
    assert!(defined.len() >= 10, "{defined:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/gridtalk.json"))
            .expect("dashboard JSON");
    let expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(!expressions.is_empty());
    let alerts = read("deploy/prometheus/alerts.yml");
    for name in expressions
        .iter()
        .flat_map(|e| queried_metrics(e))
        .chain(queried_metrics(&alerts))
    {
        assert!(
            defined.contains(&name),
            "{name} is queried but not defined by gridtalk-telemetry"
        );
    }
}

#[test]
fn every_file_the_compose_stack_and_image_use_exists() {
    let compose = read("docker-compose.yml");
    let mounted: Vec<&str> = compose
        .split(|c: char| c.is_whitespace() || c == '"')
        .filter_map(|w| w.strip_prefix("./"))
        .map(|w| w.split(':').next().unwrap_or(w))
        .collect();
    assert!(mounted.len() >= 5, "{mounted:?}");
    for path in mounted {
        assert!(
            repo(path).exists(),
            "docker-compose.yml mounts ./{path}, which is missing"
        );
    }
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains("cargo build --release --locked -p gridtalk"),
        "production build"
    );
    assert!(
        !dockerfile.contains("demo"),
        "the production image carries neither the sandbox nor the embedded broker"
    );
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY deploy/")) {
        let source = line.split_whitespace().nth(1).expect("COPY source");
        assert!(
            repo(source).exists(),
            "Dockerfile copies {source}, which is missing"
        );
    }
}

fn yaml(path: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_compose_stack_keeps_kafka_data_on_its_volume_and_suits_both_compose_tools() {
    let compose = yaml("docker-compose.yml");
    // Debian's docker-compose (1.29) refuses a top-level `name`; `docker compose` needs none.
    let top: Vec<&str> = compose
        .as_mapping()
        .expect("a mapping")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    for key in &top {
        assert!(
            ["services", "secrets", "volumes", "networks", "configs"].contains(key)
                || key.starts_with("x-"),
            "top-level key {key:?} is not valid for docker-compose 1.29"
        );
    }
    let kafka = &compose["services"]["kafka"];
    let log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
        .as_str()
        .expect("KAFKA_LOG_DIRS is set: the image's default is a directory of the container");
    let volumes: Vec<&str> = kafka["volumes"]
        .as_sequence()
        .expect("kafka mounts a volume")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let data = volumes
        .iter()
        .find_map(|v| v.strip_suffix(&format!(":{log_dirs}")))
        .unwrap_or_else(|| panic!("no volume is mounted at {log_dirs}: {volumes:?}"));
    assert!(
        compose["volumes"].get(data).is_some(),
        "{data} is a named volume of the stack"
    );
    // Where the image prepares a directory its user may write (apache/kafka's Dockerfile).
    assert_eq!(log_dirs, "/var/lib/kafka/data");
}
