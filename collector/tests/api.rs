//! The HTTP API's router, through `oneshot`: every endpoint, status and error.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use collector::config::Config;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn config() -> Config {
    Config {
        listen_endpoint: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        partner_listen: "127.0.0.1:0".parse().unwrap(),
        kafka_brokers: vec!["127.0.0.1:9".into()],
        agent_polling: false,
        node_metrics: false,
        auth_credential: Some("agent-secret".into()),
        ..Config::default()
    }
}

async fn app(config: Config) -> collector::App {
    collector::App::bind(config).await.unwrap()
}

async fn call(
    app: &collector::App,
    method: &str,
    uri: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_owned()));
    let response = collector::api::router(app.api_state())
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap()
}

#[tokio::test]
async fn endpoints_report_real_bound_addresses() {
    let app = app(config()).await;
    let (status, body) = call(&app, "GET", "/v1/endpoints", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let body = json(&body);
    assert_eq!(body["inputs"][0]["address"], app.ingest_addr().to_string());
    assert_eq!(body["inputs"][0]["format"], "avro-ocf");
    assert_eq!(
        body["outputs"][0]["address"],
        app.partner_addr().to_string()
    );
    assert_eq!(body["outputs"][1]["topic_mapping"]["prefix"], "metrics-");
    assert_eq!(body["api"]["address"], app.api_addr().to_string());
}

#[tokio::test]
async fn config_is_shown_with_secrets_redacted() {
    let app = app(config()).await;
    let (status, body) = call(&app, "GET", "/v1/config", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("agent-secret"));
    assert_eq!(json(&body)["auth_credential"], "<redacted>");
}

#[tokio::test]
async fn a_valid_patch_applies_and_an_invalid_one_changes_nothing() {
    let app = app(config()).await;
    let (status, body) = call(
        &app,
        "PATCH",
        "/v1/config",
        Some(r#"{"kafka_topic_prefix": "new-", "static_tags": {"dc": "eu"}}"#),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["kafka_topic_prefix"], "new-");
    assert_eq!(app.stats().config_changes.load(Relaxed), 1);

    for (patch, field) in [
        (r#"{"kafka_topic_prefixx": "x"}"#, "kafka_topic_prefixx"),
        (r#"{"kafka_produce_count": 0}"#, "kafka_produce_count"),
        (r#"{"kafka_produce_count": "many"}"#, "kafka_produce_count"),
        (
            r#"{"kafka_single_topic": "bad topic", "kafka_topic_prefix": "other-"}"#,
            "kafka_single_topic",
        ),
        (r#"[1, 2]"#, "(body)"),
        ("not json", "(body)"),
        // An unusable broker string used to be accepted, and the sink
        // switched to it.
        (
            r#"{"kafka_brokers": ["not a broker :::"]}"#,
            "kafka_brokers",
        ),
        (r#"{"kafka_brokers": ["host:99999"]}"#, "kafka_brokers"),
        (
            r#"{"shutdown_grace_secs": 18446744073709551615}"#,
            "shutdown_grace_secs",
        ),
    ] {
        let (status, body) = call(&app, "PATCH", "/v1/config", Some(patch), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{patch}: {body}");
        assert_eq!(json(&body)["field"], field, "{patch}: {body}");
    }
    let (_, body) = call(&app, "GET", "/v1/config", None, None).await;
    assert_eq!(json(&body)["kafka_topic_prefix"], "new-", "nothing changed");
    assert_eq!(app.stats().config_changes.load(Relaxed), 1);
}

#[tokio::test]
async fn settings_that_need_a_restart_are_refused_with_409() {
    let app = app(config()).await;
    let (status, body) = call(
        &app,
        "PATCH",
        "/v1/config",
        Some(r#"{"listen_endpoint": "127.0.0.1:9999", "kafka_topic_prefix": "x-"}"#),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let body = json(&body);
    assert_eq!(body["fields"], json!(["listen_endpoint"]));
    assert_eq!(body["restart_required"], true);
    let (_, config) = call(&app, "GET", "/v1/config", None, None).await;
    assert_eq!(
        json(&config)["kafka_topic_prefix"],
        "metrics-",
        "nothing changed"
    );
}

#[tokio::test]
async fn bodies_are_limited() {
    let app = app(config()).await;
    let huge = format!(r#"{{"kafka_topic_prefix": "{}"}}"#, "x".repeat(100_000));
    let (status, _) = call(&app, "PATCH", "/v1/config", Some(&huge), None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn the_token_guards_mutating_requests() {
    let mut config = config();
    config.api_token = Some("t0ken".into());
    let app = app(config).await;
    let patch = Some(r#"{"kafka_topic_prefix": "a-"}"#);
    assert_eq!(
        call(&app, "PATCH", "/v1/config", patch, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "PATCH", "/v1/config", patch, Some("wrong"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "PATCH", "/v1/config", patch, Some("t0ken"))
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = call(&app, "GET", "/v1/config", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("t0ken"));
}

#[test]
fn a_non_loopback_api_needs_a_token() {
    let config = Config {
        api_listen: "0.0.0.0:8123".parse().unwrap(),
        ..config()
    };
    assert_eq!(config.validate().unwrap_err().field, "api_token");
    let config = Config {
        api_token: Some("t".into()),
        ..config
    };
    config.validate().unwrap();
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_hold_the_identity() {
    let app = app(config()).await;
    app.stats()
        .count_received(collector::stats::Input::Tcp, 3, 30);
    app.stats().delivered.add(2, 20);
    app.stats()
        .count_drop(collector::stats::DropReason::TooLarge, 1, 10);
    let (status, body) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let sum = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let received = sum("collector_received_datapoints_total");
    let delivered = sum("collector_delivered_datapoints_total");
    let dropped = sum("collector_dropped_datapoints_total");
    let in_flight = sum("collector_in_flight_datapoints");
    assert_eq!(
        (received, delivered, dropped, in_flight),
        (30.0, 20.0, 10.0, 0.0)
    );
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "collector_delivery_latency_seconds")
    );
}

#[tokio::test]
async fn health_is_ok_then_503_while_draining() {
    let app = app(config()).await;
    let (status, body) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["status"], "ok");
    app.shutdown().begin();
    let (status, body) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["status"], "draining");
}

#[tokio::test]
async fn health_is_503_when_kafka_has_been_unreachable_too_long() {
    let mut config = config();
    config.health_kafka_unavailable_secs = 1;
    let app = app(config).await;
    {
        let state = app.broker_state();
        let mut state = state.lock().unwrap();
        state.unavailable_since =
            Some(std::time::Instant::now() - std::time::Duration::from_secs(5));
        state.last_error = Some("Kafka scheduler http://x unreachable".into());
    }
    let (status, body) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        json(&body)["reasons"][0]
            .as_str()
            .unwrap()
            .contains("unreachable for"),
        "{body}"
    );
}

/// With the disk spool: `/health` shows its state, and a spool that can't
/// use its directory makes the collector `degraded` (still 200: it runs
/// on memory), with the reason, and the gauge set.
#[tokio::test]
async fn health_shows_the_spool_and_is_degraded_when_its_disk_is_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.buffer_type = collector::spool::BufferType::Disk;
    config.spool_dir = Some(dir.path().join("spool"));
    let good = app(config.clone()).await;
    let (status, body) = call(&good, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["status"], "ok");
    assert_eq!(json(&body)["details"]["spool"]["state"], "ok", "{body}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    config.spool_dir = Some(file.join("spool"));
    let bad = app(config).await;
    let (status, body) = call(&bad, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body = json(&body);
    assert_eq!(body["status"], "degraded");
    assert!(
        body["reasons"][0].as_str().unwrap().contains("disk spool"),
        "{body}"
    );
    assert_eq!(body["details"]["spool"]["state"], "degraded");
    assert_eq!(bad.stats().spool_degraded.load(Relaxed), 1);
    let (_, metrics) = call(&bad, "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("\ncollector_spool_degraded 1\n"),
        "{metrics}"
    );
}

/// The Kafka security settings change at runtime through `PATCH`, checked
/// like any other (400 naming the option); the inline password is redacted
/// in what the API shows, and sending the redacted form back changes
/// nothing. `POST /v1/kafka/reload` reloads, or says which file it can't.
#[tokio::test]
async fn security_settings_patch_redact_and_reload() {
    let app = app(config()).await;
    let (status, body) = call(
        &app,
        "PATCH",
        "/v1/config",
        Some(r#"{"kafka_security_protocol": "sasl_ssl"}"#),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(json(&body)["field"], "kafka_sasl_mechanism", "{body}");
    let (status, body) = call(
        &app,
        "PATCH",
        "/v1/config",
        Some(r#"{"kafka_security_protocol": "sasl_plaintext", "kafka_sasl_mechanism": "SCRAM-SHA-256", "kafka_sasl_username": "alice", "kafka_sasl_password": "Pa55-w0rd"}"#),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body.contains("Pa55-w0rd"), "{body}");
    assert_eq!(json(&body)["kafka_sasl_password"], "<redacted>");
    // GET, then PATCH back what it showed: the password stays.
    let (_, shown) = call(&app, "GET", "/v1/config", None, None).await;
    assert!(!shown.contains("Pa55-w0rd"), "{shown}");
    let (status, body) = call(&app, "PATCH", "/v1/config", Some(&shown), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        app.runtime().config().kafka_sasl_password.as_deref(),
        Some("Pa55-w0rd")
    );
    let (status, body) = call(&app, "POST", "/v1/kafka/reload", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.stats().kafka_reloads.load(Relaxed), 1);

    // A password file that goes missing: the reload is refused, named.
    let dir = std::env::temp_dir().join(format!("collector-api-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let patch = json!({"kafka_sasl_password": null, "kafka_sasl_password_file": file}).to_string();
    let (status, body) = call(&app, "PATCH", "/v1/config", Some(&patch), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    std::fs::remove_file(&file).unwrap();
    let (status, body) = call(&app, "POST", "/v1/kafka/reload", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(json(&body)["field"], "kafka_sasl_password_file", "{body}");
    assert_eq!(
        app.stats().kafka_reloads.load(Relaxed),
        1,
        "a refused reload is not one"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // Nor can PATCH name a file that is not there.
    let (status, body) = call(
        &app,
        "PATCH",
        "/v1/config",
        Some(
            r#"{"kafka_sasl_password": null, "kafka_sasl_password_file": "/nonexistent/password"}"#,
        ),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(json(&body)["field"], "kafka_sasl_password_file", "{body}");
}

/// Without Kafka (`kafka = false`) nothing of Kafka is reported: no Kafka
/// output in `/v1/endpoints`, no broker state in `/health`.
#[tokio::test]
async fn without_kafka_no_kafka_state_is_reported() {
    let app = app(Config {
        kafka: false,
        ..config()
    })
    .await;
    let (status, body) = call(&app, "GET", "/v1/endpoints", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let endpoints = json(&body);
    let names: Vec<&str> = endpoints["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["partner"]);
    let (status, body) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let health = json(&body);
    assert_eq!(health["status"], "ok");
    for key in ["brokers", "all_brokers_down", "refused_topics"] {
        assert!(health["details"].get(key).is_none(), "{key}: {health}");
    }
}
