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
    // Every series is filtered by the dashboard's namespace and stage variables, and every
    // panel reads the data source the user picked.
    for expr in &expressions {
        for occurrence in expr.split("gridtalk_").skip(1) {
            let after = occurrence.trim_start_matches(|c: char| c.is_ascii_lowercase() || c == '_');
            assert!(
                after.starts_with("{namespace=~\"$namespace\", component=~\"$stage\""),
                "gridtalk_{occurrence} in {expr} is not filtered by $namespace and $stage"
            );
        }
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("dashboard variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "stage"]);
    let text = read("deploy/grafana/dashboards/gridtalk.json");
    assert!(
        !text.contains("\"uid\": \"prometheus\""),
        "a hard-coded data source uid"
    );
    let monitor = read("deploy/components/servicemonitor/servicemonitor.yaml");
    assert!(
        monitor.contains("targetLabel: component"),
        "the stage label"
    );
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

/// Every document of the YAML files given.
fn documents(paths: &[&str]) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    paths
        .iter()
        .flat_map(|path| {
            let text = read(path);
            serde_yaml::Deserializer::from_str(&text)
                .map(|d| {
                    serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_kubernetes_base_is_hardened_least_privileged_and_keda_is_optional() {
    let base = documents(&[
        "deploy/kubernetes/route.yaml",
        "deploy/kubernetes/send.yaml",
        "deploy/kubernetes/ingest.yaml",
        "deploy/kubernetes/converse.yaml",
        "deploy/kubernetes/networkpolicy.yaml",
        "deploy/kubernetes/pdb.yaml",
        "deploy/kubernetes/serviceaccount.yaml",
    ]);
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    assert!(
        kustomization["resources"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|r| !r.as_str().unwrap_or("").contains("keda")),
        "the base applies without KEDA"
    );
    // Which secrets each stage may read.
    let allowed = [
        ("route", vec!["gridtalk-buttons"]),
        ("send", vec!["gridtalk-whatsapp-token"]),
        ("ingest", vec!["gridtalk-webhook"]),
        ("converse", vec!["gridtalk-buttons"]),
    ];
    let deployments: Vec<&serde_yaml::Value> =
        base.iter().filter(|d| d["kind"] == "Deployment").collect();
    assert_eq!(deployments.len(), 4);
    for deployment in deployments {
        let stage = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .expect("component label");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "gridtalk", "{stage}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{stage}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{stage}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{stage}"
        );
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{stage}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{stage}");
        assert_eq!(security["capabilities"]["drop"][0], "ALL", "{stage}");
        assert!(
            container["resources"]["requests"]["memory"].is_string()
                && container["resources"]["limits"]["memory"].is_string(),
            "{stage}: requests and limits"
        );
        // The secrets it mounts or reads from its environment are its own.
        let (_, own) = allowed
            .iter()
            .find(|(s, _)| *s == stage)
            .expect("known stage");
        let mounted: Vec<&str> = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        let from_env: Vec<&str> = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str())
            .collect();
        assert!(!mounted.is_empty(), "{stage} mounts its secret");
        for secret in mounted.iter().chain(&from_env) {
            assert!(own.contains(secret), "{stage} reads {secret}, not its own");
        }
        // The bootstrap is one setting, which the KEDA scaler reads too.
        assert!(
            container["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "GRIDTALK__KAFKA__BOOTSTRAP_SERVERS"
                    && e["valueFrom"]["configMapKeyRef"]["name"] == "gridtalk-kafka"),
            "{stage}"
        );
        if stage == "route" {
            assert!(
                deployment["spec"].get("replicas").is_none(),
                "the autoscaler owns the route stage's replicas"
            );
        }
        if stage == "send" {
            assert!(
                deployment["spec"]["replicas"].as_u64() >= Some(2),
                "a node drain leaves a send replica"
            );
        }
    }
    let send_budget = base
        .iter()
        .find(|d| d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == "gridtalk-send")
        .expect("a budget for send");
    assert_eq!(send_budget["spec"]["minAvailable"], 1);
    let policies: Vec<&serde_yaml::Value> = base
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    let all = policies
        .iter()
        .find(|p| {
            p["spec"]["podSelector"]["matchLabels"]
                .as_mapping()
                .map(|m| m.len())
                == Some(1)
        })
        .expect("a policy over every gridtalk pod");
    assert_eq!(all["spec"]["policyTypes"][0], "Ingress");
    assert_eq!(all["spec"]["policyTypes"][1], "Egress");
    assert_eq!(all["spec"]["ingress"][0]["ports"][0]["port"], "admin");

    // KEDA: the scaler authenticates and reads the bootstrap from the route container.
    let keda = documents(&["deploy/components/keda/scaledobject.yaml"]);
    let scaled = keda.iter().find(|d| d["kind"] == "ScaledObject").unwrap();
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(
        trigger["metadata"]["bootstrapServersFromEnv"],
        "GRIDTALK__KAFKA__BOOTSTRAP_SERVERS"
    );
    assert!(trigger["metadata"].get("bootstrapServers").is_none());
    let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
    assert!(keda
        .iter()
        .any(|d| d["kind"] == "TriggerAuthentication" && d["metadata"]["name"] == auth));
    let production = yaml("deploy/overlays/production/kustomization.yaml");
    assert_eq!(
        production["components"].as_sequence().map(Vec::len),
        Some(2)
    );
}

/// Runs `gridtalk` with `args` in `dir` with no `GRIDTALK__*` variables; (exit code, stdout,
/// stderr).
fn gridtalk(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gridtalk"));
    command
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1");
    for (key, _) in std::env::vars() {
        if key.starts_with("GRIDTALK") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("gridtalk runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gridtalk-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn gridtalk_check_reports_every_problem_at_once_with_its_key_path_and_never_a_secret() {
    let dir = scratch("check");
    std::fs::write(
        dir.join("directory.toml"),
        r#"
[[partners]]
id = "ACME"
name = "Acme"

[[contacts]]
id = "c1"
name = "One"
phone = "555-CALL-ME"
partner = "ACME"

[[contacts]]
id = "c1"
name = "Two"
phone = "+14155550102"
partner = "NOBODY"
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("gridtalk.toml"),
        r#"
[kafka]
bootstrap_servers = "kafka:9092"
sesion_timeout_ms = 6000

[send]
phone_number_id = "CHANGE-ME"
access_token_file = "missing-token"
pair_burst = "hunter2-secret"

[ingest]
verify_token = "v"
app_secret = "a-secret-value"

[route]
offset_reset = "sometimes"

[directory]
file = "directory.toml"

[[templates]]
name = "po_ack_request"
languages = ["en_US"]
text = "PO {{1}} needs your acknowledgement."
document_key = "/payload/po_number"
body = [{ path = "/payload/po_numbr" }]
buttons = [{ action = "ACCEPT", title = "Accept" }]
"#,
    )
    .unwrap();
    // Wrong types and unknown keys first: every one of them in one run, with its path.
    let (code, _, stderr) = gridtalk(&dir, &["check", "--config", "gridtalk.toml"], &[]);
    assert_eq!(code, 1, "{stderr}");
    for expected in ["kafka.sesion_timeout_ms", "send.pair_burst"] {
        assert!(stderr.contains(expected), "{expected} missing:\n{stderr}");
    }
    assert!(!stderr.contains("hunter2"), "a value is echoed:\n{stderr}");
    assert!(!stderr.contains("stack backtrace"), "{stderr}");

    // With the types right, everything else, at once.
    let text = std::fs::read_to_string(dir.join("gridtalk.toml")).unwrap();
    let text = text
        .replace("sesion_timeout_ms = 6000\n", "")
        .replace("pair_burst = \"hunter2-secret\"", "pair_burst = 0");
    std::fs::write(dir.join("gridtalk.toml"), text).unwrap();
    let (code, _, stderr) = gridtalk(&dir, &["check", "--config", "gridtalk.toml"], &[]);
    assert_eq!(code, 1, "{stderr}");
    let problems: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  - ")).collect();
    for expected in [
        "send.pair_burst",
        "route.offset_reset",
        "send.phone_number_id",
        "send.access_token_file",
        "route.button_secret",
        "templates.po_ack_request.body[0].path",
        "contacts[0] (c1).phone",
        "contacts[1]: id \"c1\" is defined twice",
        "contacts[1] (c1).partner",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected} missing:\n{stderr}"
        );
    }
    assert!(problems.len() >= 9, "{stderr}");
    assert!(
        stderr.contains("(gridtalk.toml:"),
        "a file line is named:\n{stderr}"
    );
    assert!(!stderr.contains("a-secret-value"), "{stderr}");
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
}

#[test]
fn a_user_template_replaces_its_built_in_namesake_and_keeps_the_others() {
    let dir = scratch("templates");
    let builtin = Config::load(None, std::iter::empty()).unwrap();
    let user = r#"
[[templates]]
name = "po_ack_request"
languages = ["de_DE"]
text = "Bestellung {{1}} bitte bestätigen."
document_key = "/payload/po_number"
body = [{ path = "/payload/po_number" }]
buttons = [{ action = "ACCEPT", title = "Annehmen" }, { action = "REJECT", title = "Ablehnen" }]

[[templates]]
name = "our_own_notice"
languages = ["en_US"]
text = "Notice {{1}}"
document_key = "/payload/po_number"
body = [{ path = "/payload/po_number" }]
"#;
    let config = Config::load_text(Some(("user.toml", user)), std::iter::empty()).unwrap();
    assert_eq!(config.templates.len(), builtin.templates.len() + 1);
    let po = config
        .templates
        .iter()
        .find(|t| t.name == "po_ack_request")
        .unwrap();
    assert_eq!(po.languages, ["de_DE"]);
    for t in &builtin.templates {
        assert!(
            config.templates.iter().any(|c| c.name == t.name),
            "{} lost",
            t.name
        );
    }
    // Saying so replaces them all (the confirmation template must then be defined too).
    let only = format!("replace_builtin_templates = true\n{user}");
    let errors = Config::load_text(Some(("user.toml", &only)), std::iter::empty())
        .unwrap_err()
        .0
        .join("\n");
    assert!(
        errors.contains("converse.confirmation_template"),
        "{errors}"
    );

    // `gridtalk config show` names the source of each value and never shows a secret.
    std::fs::write(
        dir.join("user.toml"),
        format!("[send]\npair_burst = 3\n{user}"),
    )
    .unwrap();
    let (code, stdout, stderr) = gridtalk(
        &dir,
        &["config", "show", "--config", "user.toml"],
        &[
            ("GRIDTALK__SEND__ACCESS_TOKEN", "tok-secret-1234"),
            ("GRIDTALK__SEND__MAX_IN_FLIGHT", "32"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("tok-secret-1234"), "{stdout}");
    for expected in [
        "pair_burst = 3  # file user.toml",
        "max_in_flight = 32  # env GRIDTALK__SEND__MAX_IN_FLIGHT",
        "access_token = \"***\"  # env GRIDTALK__SEND__ACCESS_TOKEN",
        "max_messages_per_second = 80  # default",
        "[[templates]]  # file user.toml",
        "[[templates]]  # default",
    ] {
        assert!(stdout.contains(expected), "{expected} missing:\n{stdout}");
    }
    // What show prints loads again as the same configuration (secrets aside).
    let shown = Config::load_text(Some(("shown.toml", &stdout)), std::iter::empty()).unwrap();
    assert_eq!(shown.templates, config.templates);
    assert_eq!(shown.send.pair_burst, 3);
}

/// The environment variables a documented example names in its comments (`GRIDTALK__…`).
fn variables_named_in(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("GRIDTALK__") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_' || *c == '.')
            .collect();
        let name = name.trim_end_matches('.').to_string();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Every `[kafka]` example of `docs/kafka-security.md` (Confluent Cloud with an API key and with
/// OAuth/OIDC, MSK with SCRAM, Strimzi with mutual TLS and SCRAM, Kerberos) passes `gridtalk
/// check`, with the secrets its comments name given in the environment and the certificate files
/// it names made for the test: librdkafka accepted every setting. A value librdkafka refuses is
/// reported under `kafka.client`.
#[test]
fn gridtalk_check_accepts_every_documented_secured_cluster_example() {
    let dir = scratch("kafka-examples");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let openssl = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=gridtalk", "-keyout"])
        .arg(certs.join("user.key"))
        .arg("-out")
        .arg(certs.join("user.crt"))
        .output()
        .expect("openssl runs");
    assert!(openssl.status.success(), "{openssl:?}");
    std::fs::copy(certs.join("user.crt"), certs.join("ca.crt")).unwrap();

    let doc = read("docs/kafka-security.md");
    let examples: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|block| block.split_once("```").expect("a closed block").0)
        .collect();
    assert!(examples.len() >= 6, "{} examples", examples.len());
    let stage_secrets = [
        ("GRIDTALK__SEND__ACCESS_TOKEN", "EAAG-test-token"),
        ("GRIDTALK__SEND__PHONE_NUMBER_ID", "106540352242922"),
        ("GRIDTALK__INGEST__VERIFY_TOKEN", "verify"),
        ("GRIDTALK__INGEST__APP_SECRET", "app-secret"),
        (
            "GRIDTALK__ROUTE__BUTTON_SECRET",
            "0123456789abcdef0123456789abcdef",
        ),
    ];
    let check = |name: &str, text: &str| {
        let text = text
            .replace(
                "/etc/kafka/cluster-ca/ca.crt",
                certs.join("ca.crt").to_str().unwrap(),
            )
            .replace(
                "/etc/kafka/user/user.crt",
                certs.join("user.crt").to_str().unwrap(),
            )
            .replace(
                "/etc/kafka/user/user.key",
                certs.join("user.key").to_str().unwrap(),
            );
        std::fs::write(dir.join(name), &text).unwrap();
        let named = variables_named_in(&text);
        let mut env: Vec<(&str, &str)> = stage_secrets.to_vec();
        env.extend(named.iter().map(|n| (n.as_str(), "a-documented-secret")));
        gridtalk(&dir, &["check", "--config", name], &env)
    };
    for (i, example) in examples.iter().enumerate() {
        let (code, _, stderr) = check(&format!("example-{i}.toml"), example);
        assert_eq!(code, 0, "example {i} refused:\n{example}\n{stderr}");
        assert!(!stderr.contains("a-documented-secret"), "{stderr}");
    }
    // The first example with its protocol misspelt: refused, under the key librdkafka names.
    let broken = examples[0].replace("\"SASL_SSL\"", "\"SASL_SSSL\"");
    let (code, _, stderr) = check("broken.toml", &broken);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("kafka.client"), "{stderr}");
    assert!(stderr.contains("security.protocol"), "{stderr}");
}
