//! The `collector` binary as an operator runs it.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::unit_environment;

fn collector() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_collector"));
    // Start from a clean environment so the host's variables can't leak in.
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(path),
    )
    .unwrap()
}

#[test]
fn validate_accepts_a_good_config_and_names_the_bad_field() {
    let ok = collector()
        .args(["validate", "--kafka-brokers", "b:9092"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let bad = collector()
        .args(["validate", "--kafka-produce-count", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("kafka_produce_count"));

    // The original's env names, and its misspelt LISTEN_ENDPONT.
    let env = collector()
        .args(["validate"])
        .env("KAFKA_SINGLE_TOPIC", "not a topic")
        .output()
        .unwrap();
    assert_eq!(env.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&env.stderr).contains("kafka_single_topic"));
    let typo = collector()
        .args(["validate"])
        .env("LISTEN_ENDPONT", "127.0.0.1:9001")
        .output()
        .unwrap();
    assert!(typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stdout).contains("127.0.0.1:9001"));

    let dir = std::env::temp_dir().join(format!("collector-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "buffer_full_policy = \"sometimes\"\n").unwrap();
    let from_file = collector()
        .args(["validate", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(from_file.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&from_file.stderr).contains("buffer_full_policy"),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
}

#[test]
fn decode_prints_json_lines_and_fails_with_the_offset() {
    let out = collector()
        .args(["decode", "../fixtures/wire/seed-snappy.avro"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = String::from_utf8(fixture("wire/seed.expected.jsonl")).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().lines().count(),
        expected.lines().count()
    );

    let mut corrupt = fixture("wire/module-stream.avro");
    let at = corrupt.len() - 20;
    corrupt.truncate(at);
    let mut child = collector()
        .arg("decode")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&corrupt).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at byte offset"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.stdout.is_empty(),
        "what came before the corruption is printed"
    );
}

#[test]
fn sigterm_drains_and_logs_the_final_count() {
    let mut child = collector()
        .args([
            "--listen-endpoint",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--partner-listen",
            "127.0.0.1:0",
            "--agent-polling",
            "false",
            "--node-metrics",
            "false",
            "--kafka",
            "false",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        assert!(Instant::now() < deadline, "no start-up line");
        let line = lines.next().unwrap().unwrap();
        if line.contains("Collector started") {
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            // One line names every bound address.
            assert!(
                value["api"].as_str().is_some_and(|a| !a.ends_with(":0")),
                "{line}"
            );
            assert!(
                value["partner"]
                    .as_str()
                    .is_some_and(|a| !a.ends_with(":0")),
                "{line}"
            );
            break (
                value["input"].as_str().unwrap().to_owned(),
                value["api"].as_str().unwrap().to_owned(),
            );
        }
    };
    let (addr, api) = addr;
    // `collector health` (a health check for images without a shell).
    let health_url = format!("http://{api}/health");
    let health = collector()
        .args(["health", "--url", &health_url])
        .output()
        .unwrap();
    assert!(health.status.success(), "{health:?}");
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(&fixture("wire/module-stream.avro"))
        .unwrap();
    drop(stream);
    let expected: usize = String::from_utf8(fixture("wire/current.expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<schema::MetricList>(l)
                .unwrap()
                .datapoints
                .len()
        })
        .sum();
    // The collector has read the whole stream once it logs the close.
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("Input connection closed"))
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = lines
        .map_while(Result::ok)
        .find(|l| l.contains("Collector stopped"))
        .expect("a final line");
    let value: serde_json::Value = serde_json::from_str(&stopped).unwrap();
    assert_eq!(
        value["received"].as_u64(),
        Some(expected as u64),
        "{stopped}"
    );
    // Without Kafka (kafka = false), served, not delivered.
    assert_eq!(value["served"].as_u64(), Some(expected as u64), "{stopped}");
    assert_eq!(value["delivered"].as_u64(), Some(0), "{stopped}");
    assert_eq!(value["dropped"].as_u64(), Some(0));
    assert!(child.wait().unwrap().success(), "exit 0 after SIGTERM");
    // Nothing listens any more: unhealthy, saying where it asked.
    let health = collector()
        .args(["health", "--url", &health_url])
        .output()
        .unwrap();
    assert_eq!(health.status.code(), Some(1), "{health:?}");
    assert!(
        String::from_utf8_lossy(&health.stderr).contains(&health_url),
        "{health:?}"
    );
}

#[test]
fn deploy_files_pin_one_instance_per_agent_on_port_8124() {
    for app in [
        "collector.json",
        "collector-strict.json",
        "sample-producer.json",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/marathon")
            .join(app);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(json["portDefinitions"][0]["port"], 8124, "{app}");
        assert_eq!(json["requirePorts"], true, "{app}");
        assert_eq!(
            json["constraints"][0],
            serde_json::json!(["hostname", "UNIQUE"]),
            "{app}"
        );
    }
}

/// The shipped Marathon app and systemd unit run with the disk spool on a
/// directory that outlives the process (a host path, systemd's state
/// directory), and their settings validate.
#[test]
fn deploy_files_enable_the_disk_spool_on_a_persistent_directory() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let app: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("marathon/collector.json")).unwrap(),
    )
    .unwrap();
    let env: Vec<(String, String)> = app["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let get = |env: &[(String, String)], key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} is not set"))
    };
    assert_eq!(get(&env, "BUFFER_TYPE"), "disk");
    let spool = get(&env, "SPOOL_DIR");
    assert_eq!(spool, "/var/lib/metrics-collector/spool");
    let volume = &app["container"]["volumes"][0];
    assert_eq!(volume["containerPath"], spool.as_str());
    assert_eq!(volume["hostPath"], spool.as_str());
    assert_eq!(volume["mode"], "RW");

    let unit = std::fs::read_to_string(deploy.join("systemd/metrics-collector.service")).unwrap();
    let unit_env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(get(&unit_env, "BUFFER_TYPE"), "disk");
    // Prometheus on DC/OS's port, in both.
    assert_eq!(get(&env, "PROMETHEUS_LISTEN"), "0.0.0.0:61091");
    assert_eq!(get(&unit_env, "PROMETHEUS_LISTEN"), "0.0.0.0:61091");
    assert!(
        app["portDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 61091),
        "the app reserves 61091"
    );
    assert_eq!(get(&unit_env, "SPOOL_DIR"), spool);
    assert!(
        unit.lines()
            .any(|l| l == "StateDirectory=metrics-collector"),
        "the unit's spool directory is its state directory"
    );

    // Both validate, with the spool in a scratch directory of the test's.
    let scratch = std::env::temp_dir().join(format!("collector-deploy-{}", std::process::id()));
    for env in [&env, &unit_env] {
        let output = collector()
            .arg("validate")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SPOOL_DIR", &scratch)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A CA certificate made by Debian's `openssl` CLI, for validating the
/// deploy files' TLS settings.
fn scratch_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=deploy test CA",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    cert
}

/// The strict-mode Marathon app and the systemd drop-in: SASL_SSL with
/// SCRAM-SHA-512, secrets read from files (DC/OS file secrets, systemd
/// credentials), never inline, discovery over HTTPS with the token file;
/// and with their files in place, both validate.
#[test]
fn deploy_files_for_a_secured_kafka_keep_secrets_in_files_and_validate() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let scratch = std::env::temp_dir().join(format!("collector-strict-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("secrets")).unwrap();
    let ca = scratch_ca(&scratch);

    let app: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("marathon/collector-strict.json")).unwrap(),
    )
    .unwrap();
    let env: std::collections::BTreeMap<String, String> = app["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(env["KAFKA_SECURITY_PROTOCOL"], "sasl_ssl");
    assert_eq!(env["KAFKA_SASL_MECHANISM"], "SCRAM-SHA-512");
    assert!(env["KAFKA_SCHEDULER_URL"].starts_with("https://"));
    assert!(!env.contains_key("KAFKA_SASL_PASSWORD") && !env.contains_key("AUTH_CREDENTIAL"));
    // Each secret file is a DC/OS secret mounted in the sandbox.
    let volumes = app["container"]["volumes"].as_array().unwrap();
    for key in ["KAFKA_SASL_PASSWORD_FILE", "AUTH_CREDENTIAL_FILE"] {
        let volume = volumes
            .iter()
            .find(|v| v["containerPath"] == env[key].as_str())
            .unwrap_or_else(|| panic!("{key} is not a mounted secret"));
        let secret = volume["secret"].as_str().unwrap();
        assert!(app["secrets"][secret]["source"].is_string(), "{secret}");
        std::fs::write(scratch.join(&env[key]), "from-a-secret\n").unwrap();
    }
    // Validates with the CA files and the spool in the scratch directory.
    let validates = |dir: &std::path::Path, env: &[(String, String)]| {
        let output = collector()
            .current_dir(dir)
            .arg("validate")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SPOOL_DIR", scratch.join("spool"))
            .env("KAFKA_SSL_CA_FILE", &ca)
            .env("DCOS_CA_FILE", &ca)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    let pairs: Vec<(String, String)> = env.clone().into_iter().collect();
    validates(&scratch, &pairs);

    let dropin = std::fs::read_to_string(
        deploy.join("systemd/metrics-collector.service.d/secured-kafka.conf"),
    )
    .unwrap();
    let credentials_dir = "/run/credentials/metrics-collector.service/";
    let loaded: Vec<&str> = dropin
        .lines()
        .filter_map(|l| l.strip_prefix("LoadCredential="))
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .collect();
    let unit_env: std::collections::BTreeMap<String, String> = dropin
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(unit_env["KAFKA_SECURITY_PROTOCOL"], "sasl_ssl");
    for key in ["KAFKA_SASL_PASSWORD_FILE", "AUTH_CREDENTIAL_FILE"] {
        let name = unit_env[key]
            .strip_prefix(credentials_dir)
            .unwrap_or_else(|| panic!("{key} is not a systemd credential"));
        assert!(loaded.contains(&name), "{name} is not loaded");
    }
    // Validate with the credentials directory at the scratch one.
    let local: Vec<(String, String)> = unit_env
        .iter()
        .map(|(k, v)| {
            let v = v.replace(credentials_dir, &format!("{}/secrets/", scratch.display()));
            (k.clone(), v)
        })
        .collect();
    for name in &loaded {
        std::fs::write(scratch.join("secrets").join(name), "credential\n").unwrap();
    }
    validates(&std::env::temp_dir(), &local);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The v0 metrics API in the deploy files: a unix socket on the host, in a
/// directory the service owns (a host volume for Marathon, the unit's
/// runtime directory for systemd), of Admin Router's group; the systemd
/// drop-in for DC/OS puts the collector in that group and links Admin
/// Router's upstream path to the socket; with it, the unit validates.
#[test]
fn deploy_files_serve_the_v0_api_on_a_unix_socket_for_admin_router() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let environment = unit_environment;
    let socket_of = |listen: &str| {
        std::path::PathBuf::from(
            listen
                .strip_prefix("unix:")
                .unwrap_or_else(|| panic!("{listen} is not a unix socket")),
        )
    };
    // In strict mode the task runs as nobody, which cannot give a socket
    // Admin Router's group: that app leaves the v0 API to the systemd unit.
    let strict: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("marathon/collector-strict.json")).unwrap(),
    )
    .unwrap();
    assert!(strict["env"].get("METRICS_API_SOCKET_GROUP").is_none());
    assert!(strict["labels"]["METRICS_API"].is_string());
    {
        let app: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(deploy.join("marathon/collector.json")).unwrap(),
        )
        .unwrap();
        let socket = socket_of(app["env"]["METRICS_API_LISTEN"].as_str().unwrap());
        let dir = socket.parent().unwrap().to_str().unwrap();
        assert!(
            app["container"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| {
                    v["containerPath"] == dir && v["hostPath"] == dir && v["mode"] == "RW"
                }),
            "the socket's directory is the host's"
        );
        assert_eq!(app["env"]["METRICS_API_SOCKET_GROUP"], "dcos_adminrouter");
    }

    let unit = std::fs::read_to_string(deploy.join("systemd/metrics-collector.service")).unwrap();
    let mut env = environment(&unit);
    let socket = socket_of(&env["METRICS_API_LISTEN"]);
    let runtime = unit
        .lines()
        .find_map(|l| l.strip_prefix("RuntimeDirectory="))
        .expect("a runtime directory");
    assert_eq!(
        socket.parent().unwrap(),
        std::path::Path::new("/run").join(runtime)
    );
    let dropin = std::fs::read_to_string(
        deploy.join("systemd/metrics-collector.service.d/dcos-admin-router.conf"),
    )
    .unwrap();
    let dropin_env = environment(&dropin);
    let group = &dropin_env["METRICS_API_SOCKET_GROUP"];
    assert_eq!(group, "dcos_adminrouter");
    assert!(
        dropin
            .lines()
            .any(|l| l == format!("SupplementaryGroups={group}")),
        "the collector is in the group it gives the socket"
    );
    let link: Vec<&str> = dropin
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre=+"))
        .expect("a link made as root")
        .split_whitespace()
        .collect();
    assert_eq!(
        link,
        [
            "/bin/ln",
            "-sfn",
            socket.to_str().unwrap(),
            // Admin Router's upstream on DC/OS 1.12 and later.
            "/run/dcos/telegraf-dcos-metrics.sock"
        ]
    );
    env.extend(dropin_env);
    let scratch = tempfile::tempdir().unwrap();
    let output = collector()
        .arg("validate")
        .envs(&env)
        .env("SPOOL_DIR", scratch.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn deploy_files_take_the_dcos_1_12_statsd_registrations() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let environment = unit_environment;
    let unit = std::fs::read_to_string(deploy.join("systemd/metrics-collector.service")).unwrap();
    let runtime = std::path::Path::new("/run").join(
        unit.lines()
            .find_map(|l| l.strip_prefix("RuntimeDirectory="))
            .expect("a runtime directory"),
    );
    let dropin = std::fs::read_to_string(
        deploy.join("systemd/metrics-collector.service.d/dcos-statsd.conf"),
    )
    .unwrap();
    let env = environment(&dropin);
    let socket = env["STATSD_CONTROL_LISTEN"]
        .strip_prefix("unix:")
        .expect("a unix socket");
    // Where the module calls (DC/OS's gen/dcos-config.yaml).
    assert_eq!(socket, "/run/dcos/telegraf/dcos_statsd.sock");
    // systemd holds the socket there and passes it (socket activation):
    // the listener is on exactly its path, so the collector takes it.
    let socket_unit =
        std::fs::read_to_string(deploy.join("systemd/metrics-collector-statsd.socket")).unwrap();
    let setting = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(setting(&socket_unit, "ListenStream"), [socket]);
    assert_eq!(
        setting(&socket_unit, "Service"),
        ["metrics-collector.service"]
    );
    // DC/OS's own unit for the socket is stopped when ours starts.
    assert_eq!(
        setting(&socket_unit, "Conflicts"),
        ["dcos-telegraf-dcos_statsd.socket"]
    );
    for key in ["Sockets", "Requires"] {
        assert_eq!(
            setting(&dropin, key),
            ["metrics-collector-statsd.socket"],
            "{key}"
        );
    }
    // The collector writes nothing there (ProtectSystem=strict): no
    // command makes or links the socket.
    assert!(setting(&dropin, "ExecStartPre").is_empty());
    assert_eq!(env["STATSD_HOST"], "198.51.100.1", "dcos-net's address");
    // Registrations outlive a restart, not a reboot.
    assert!(std::path::Path::new(&env["STATSD_STATE_DIR"]).starts_with(&runtime));
    assert!(dropin.lines().any(|l| l == "RuntimeDirectoryPreserve=yes"));
    let mut all = environment(&unit);
    all.extend(env);
    let scratch = tempfile::tempdir().unwrap();
    let output = collector()
        .arg("validate")
        .envs(&all)
        .env("SPOOL_DIR", scratch.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    // The Marathon app says why it leaves the registrations to the unit.
    let app: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("marathon/collector.json")).unwrap(),
    )
    .unwrap();
    assert!(app["env"].get("STATSD_CONTROL_LISTEN").is_none());
    assert!(
        app["labels"]["STATSD"]
            .as_str()
            .unwrap()
            .contains("dcos-statsd.conf")
    );
}
