//! Secured Kafka against real servers, no mocks: tansu 0.6 with SCRAM users
//! (`tests/src/secured.rs`), and stunnel4 terminating TLS in front of it,
//! with certificates made here (`simulator::tls`). What is checked: the
//! collector and the sample-producer deliver with SCRAM-SHA-512 and
//! SCRAM-SHA-256, over TLS and mutual TLS, with zstd; and every failure
//! (a wrong password, a mechanism the broker does not offer, an unknown CA,
//! an expired certificate, a hostname mismatch, a missing client
//! certificate, TLS against a plaintext port and the reverse) is counted
//! and turns `/health` 503 at once, naming its cause.

use std::path::PathBuf;

use collector::config::Config;
use collector::config::security::{KafkaSecurity, SaslMechanism, SecurityProtocol};
use collector::discovery::BrokerSource;
use collector::sample::run as run_sample;
use e2e::secured::{ClientAuth, ScramUser, Stunnel, Tansu, free_port};
use e2e::{TestCollector, assert_balanced, assert_eventually, spawn_collector, test_config};
use serde_json::Value;
use simulator::producer::producer;
use simulator::tls::{CertSpec, TestCa};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// A CA and the files the tests point at.
struct Pki {
    dir: TempDir,
    ca: TestCa,
    ca_file: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("metrics-collector test CA").unwrap();
        let ca_file = dir.path().join("ca.crt");
        ca.write(&ca_file).unwrap();
        Self { dir, ca, ca_file }
    }

    /// Issues `spec` and writes it as `NAME.crt` and `NAME.key`.
    fn issue(&self, name: &str, spec: &CertSpec) -> (PathBuf, PathBuf) {
        self.ca
            .issue(spec)
            .unwrap()
            .write(self.dir.path(), name)
            .unwrap()
    }

    /// Writes `content` to `NAME` and returns its path.
    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

fn users() -> Vec<ScramUser> {
    vec![
        ScramUser {
            name: "alice".into(),
            password: "alice-secret-512".into(),
            mechanism: "scram512",
        },
        ScramUser {
            name: "bob".into(),
            password: "bob-secret-256".into(),
            mechanism: "scram256",
        },
    ]
}

/// A collector configuration for `bootstrap` (`localhost:PORT`): no snappy
/// (tansu's sqlite storage cannot serve it), IPv4 (the servers listen on
/// 127.0.0.1), a short grace.
fn secured_config(bootstrap: &str) -> Config {
    let mut config = test_config(bootstrap);
    config.kafka_compress_snappy = false;
    config.shutdown_grace_secs = 3;
    config
        .librdkafka
        .insert("broker.address.family".into(), "v4".into());
    config
}

fn sasl(config: &mut Config, mechanism: SaslMechanism, user: &str, password_file: PathBuf) {
    config.kafka_sasl_mechanism = Some(mechanism);
    config.kafka_sasl_username = Some(user.into());
    config.kafka_sasl_password_file = Some(password_file);
}

async fn health(collector: &TestCollector) -> (u16, Value) {
    let response = reqwest::get(format!("http://{}/health", collector.api))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Waits until `/health` answers 503 with a reason holding every one of
/// `words`, and returns the reason.
async fn unhealthy_naming(collector: &TestCollector, words: &[&str]) -> String {
    let reason = e2e::eventually(&format!("/health 503 naming {words:?}"), || async move {
        let (status, body) = health(collector).await;
        let reason = body["reasons"][0].as_str().unwrap_or("").to_owned();
        if status == 503 && words.iter().all(|w| reason.contains(w)) {
            Ok(reason)
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
    eprintln!("/health 503: {reason}");
    reason
}

/// Waits until the Kafka output of `/v1/endpoints` satisfies `holds`, and
/// returns it.
async fn kafka_output(
    collector: &TestCollector,
    holds: impl Fn(&Value) -> bool,
    what: &str,
) -> Value {
    let holds = &holds;
    e2e::eventually(what, || async move {
        let output = reqwest::get(format!("http://{}/v1/endpoints", collector.api))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["outputs"][1]
            .clone();
        if holds(&output) {
            Ok(output)
        } else {
            Err(output.to_string())
        }
    })
    .await
}

/// Sends a few blocks and waits until all are delivered (acks=all from the
/// real broker).
async fn delivers(collector: &TestCollector, name: &str) {
    let report = collector
        .deliver(producer(collector.addr, name).blocks(20))
        .await;
    assert!(report.datapoints > 0);
    let (status, body) = health(collector).await;
    assert_eq!(status, 200, "{body}");
}

/// Sends a few blocks, which can't be delivered, and waits until `/health`
/// answers 503 naming all of `words`; nothing is delivered, the failure is
/// counted, and the accounting balances at shutdown.
async fn fails_with(collector: TestCollector, words: &[&str]) -> String {
    producer(collector.addr, "refused")
        .blocks(5)
        .run()
        .await
        .unwrap();
    let reason = unhealthy_naming(&collector, words).await;
    let stats = &collector.stats;
    let counted = stats
        .kafka_authentication_failures
        .load(std::sync::atomic::Ordering::Relaxed)
        + stats
            .kafka_tls_failures
            .load(std::sync::atomic::Ordering::Relaxed);
    assert!(counted > 0, "the failure is counted");
    assert_eq!(collector.accounting().delivered.datapoints, 0);
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_delivers_with_scram_sha_512_and_scram_sha_256() {
    let pki = Pki::new();
    let tansu = Tansu::start(&users(), None).await;
    let bootstrap = format!("localhost:{}", tansu.addr.port());
    for (mechanism, user) in [
        (SaslMechanism::ScramSha512, &users()[0]),
        (SaslMechanism::ScramSha256, &users()[1]),
    ] {
        let mut config = secured_config(&bootstrap);
        config.kafka_security_protocol = SecurityProtocol::SaslPlaintext;
        let password = pki.file(
            &format!("{}.password", user.name),
            &format!("{}\n", user.password),
        );
        sasl(&mut config, mechanism, &user.name, password);
        let collector = spawn_collector(config).await;
        delivers(&collector, mechanism.as_str()).await;
        let accounting = collector.shutdown().await;
        assert_balanced(&accounting);
        assert_eq!(accounting.dropped_total().datapoints, 0);
    }
}

/// A wrong password: 503 at once naming authentication, counted; the right
/// password written to the file and `POST /v1/kafka/reload` mend it, and
/// what waited is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_named_at_once_and_a_reload_mends_it() {
    let pki = Pki::new();
    let tansu = Tansu::start(&users(), None).await;
    let mut config = secured_config(&format!("localhost:{}", tansu.addr.port()));
    config.kafka_security_protocol = SecurityProtocol::SaslPlaintext;
    let password = pki.file("alice.password", "not-her-password\n");
    sasl(
        &mut config,
        SaslMechanism::ScramSha512,
        "alice",
        password.clone(),
    );
    config.shutdown_grace_secs = 10;
    let collector = spawn_collector(config).await;
    let report = producer(collector.addr, "waits")
        .blocks(10)
        .run()
        .await
        .unwrap();
    unhealthy_naming(&collector, &["Kafka authentication failed"]).await;
    assert!(
        collector
            .stats
            .kafka_authentication_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert_eq!(collector.accounting().delivered.datapoints, 0);

    std::fs::write(&password, "alice-secret-512\n").unwrap();
    let reload = reqwest::Client::new()
        .post(format!("http://{}/v1/kafka/reload", collector.api))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status().as_u16(), 200);
    assert_eventually!(
        collector.accounting().delivered.datapoints == report.datapoints,
        "what waited is delivered after the reload"
    );
    assert_eventually!(health(&collector).await.0 == 200, "healthy again");
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(accounting.dropped_total().datapoints, 0);
}

/// tansu offers SCRAM only: PLAIN is refused by the broker, and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mechanism_the_broker_does_not_offer_is_named() {
    let pki = Pki::new();
    let tansu = Tansu::start(&users(), None).await;
    let mut config = secured_config(&format!("localhost:{}", tansu.addr.port()));
    config.kafka_security_protocol = SecurityProtocol::SaslPlaintext;
    let password = pki.file("alice.password", "alice-secret-512");
    sasl(&mut config, SaslMechanism::Plain, "alice", password);
    let collector = spawn_collector(config).await;
    fails_with(collector, &["Kafka authentication failed", "PLAIN"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_producer_delivers_with_scram() {
    let pki = Pki::new();
    let tansu = Tansu::start(&users(), None).await;
    let agent = simulator::agent::mesos_agent().run().await.unwrap();
    let mut config = crate::agent::sample_config(agent.url(), "unused:1");
    config.brokers = Some(BrokerSource::Static(vec![format!(
        "localhost:{}",
        tansu.addr.port()
    )]));
    config.compression = "none".into();
    config.librdkafka = vec![("broker.address.family".into(), "v4".into())];
    config.security = KafkaSecurity {
        protocol: SecurityProtocol::SaslPlaintext,
        mechanism: Some(SaslMechanism::ScramSha512),
        username: Some("alice".into()),
        password_file: Some(pki.file("alice.password", "alice-secret-512\n")),
        ..KafkaSecurity::default()
    };
    config.security.check().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_sample(config, shutdown.clone()));
    assert_eventually!(agent.requests() >= 3, "polled a few times");
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(report.messages_delivered >= 1, "{report:?}");
    assert_eq!(report.datapoints_dropped, 0, "{report:?}");
}

/// The sample-producer with a wrong password delivers nothing and keeps
/// its polls; the right password in the file and a reload (its SIGHUP)
/// deliver them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_producer_reloads_a_mended_password() {
    let pki = Pki::new();
    let tansu = Tansu::start(&users(), None).await;
    let agent = simulator::agent::mesos_agent().run().await.unwrap();
    let mut config = crate::agent::sample_config(agent.url(), "unused:1");
    config.brokers = Some(BrokerSource::Static(vec![format!(
        "localhost:{}",
        tansu.addr.port()
    )]));
    config.compression = "none".into();
    config.librdkafka = vec![("broker.address.family".into(), "v4".into())];
    let password = pki.file("alice.password", "wrong\n");
    config.security = KafkaSecurity {
        protocol: SecurityProtocol::SaslPlaintext,
        mechanism: Some(SaslMechanism::ScramSha512),
        username: Some("alice".into()),
        password_file: Some(password.clone()),
        ..KafkaSecurity::default()
    };
    let reload = config.reload.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_sample(config, shutdown.clone()));
    // Its first send waits for its delivery report, which a producer that
    // can't authenticate never gets: a few polls pile up meanwhile.
    assert_eventually!(agent.requests() >= 4, "polled a few times");
    std::fs::write(&password, "alice-secret-512\n").unwrap();
    reload.request();
    let before = agent.requests();
    assert_eventually!(agent.requests() >= before + 3, "polled on");
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(
        report.messages_delivered >= 4,
        "the waiting polls too: {report:?}"
    );
    assert_eq!(report.datapoints_dropped, 0, "{report:?}");
}

/// Server TLS through stunnel; then mutual TLS (stunnel `verify = 2`) with
/// SASL_SSL, SCRAM-SHA-512 and zstd all at once; the same without the
/// client certificate is refused, and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_with_sasl_and_zstd_deliver() {
    let pki = Pki::new();
    let (server_cert, server_key) = pki.issue("server", &CertSpec::localhost());
    // The client's key is encrypted, with its password in a file.
    let client = pki.ca.issue(&CertSpec::client("collector")).unwrap();
    let (client_cert, _) = client.write(pki.dir.path(), "client").unwrap();
    let client_key = pki.dir.path().join("client-encrypted.key");
    std::fs::write(
        &client_key,
        client.encrypted_key_pem("client-key-pass").unwrap(),
    )
    .unwrap();
    let key_password = pki.file("client-key.password", "client-key-pass\n");

    // Server TLS, no authentication.
    let port = free_port();
    let plain = Tansu::start(&[], Some(port)).await;
    let _tls = Stunnel::start(
        port,
        plain.addr,
        &server_cert,
        &server_key,
        &pki.ca_file,
        ClientAuth::None,
    )
    .await;
    let mut config = secured_config(&format!("localhost:{port}"));
    config.kafka_security_protocol = SecurityProtocol::Ssl;
    config.kafka_ssl_ca_file = Some(pki.ca_file.clone());
    config.validate().unwrap();
    let collector = spawn_collector(config).await;
    delivers(&collector, "tls").await;
    assert_balanced(&collector.shutdown().await);

    // Mutual TLS, SCRAM-SHA-512 and zstd.
    let port = free_port();
    let tansu = Tansu::start(&users(), Some(port)).await;
    let _mtls = Stunnel::start(
        port,
        tansu.addr,
        &server_cert,
        &server_key,
        &pki.ca_file,
        ClientAuth::Required,
    )
    .await;
    let mut config = secured_config(&format!("localhost:{port}"));
    config.kafka_security_protocol = SecurityProtocol::SaslSsl;
    config.kafka_ssl_ca_file = Some(pki.ca_file.clone());
    config.kafka_ssl_certificate_file = Some(client_cert.clone());
    config.kafka_ssl_key_file = Some(client_key.clone());
    config.kafka_ssl_key_password_file = Some(key_password);
    sasl(
        &mut config,
        SaslMechanism::ScramSha512,
        "alice",
        pki.file("alice.password", "alice-secret-512"),
    );
    config
        .librdkafka
        .insert("compression.codec".into(), "zstd".into());
    config.validate().unwrap();
    let collector = spawn_collector(config.clone()).await;
    delivers(&collector, "mtls").await;
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(accounting.dropped_total().datapoints, 0);

    // The same without the client certificate: refused by stunnel.
    config.kafka_ssl_certificate_file = None;
    config.kafka_ssl_key_file = None;
    config.kafka_ssl_key_password_file = None;
    config.validate().unwrap();
    let collector = spawn_collector(config).await;
    fails_with(collector, &["Kafka TLS handshake failed"]).await;
}

/// A failure mended on the broker's side clears with no data to deliver:
/// while it is reported, the collector asks the brokers for metadata, and
/// an answer clears it. Here stunnel first requires a client certificate
/// the collector does not have, then is started again without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mended_on_the_brokers_side_clears_without_data() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", &CertSpec::localhost());
    let port = free_port();
    let tansu = Tansu::start(&[], Some(port)).await;
    let stunnel = Stunnel::start(
        port,
        tansu.addr,
        &cert,
        &key,
        &pki.ca_file,
        ClientAuth::Required,
    )
    .await;
    let mut config = secured_config(&format!("localhost:{port}"));
    config.kafka_security_protocol = SecurityProtocol::Ssl;
    config.kafka_ssl_ca_file = Some(pki.ca_file.clone());
    let collector = spawn_collector(config).await;
    unhealthy_naming(
        &collector,
        &["Kafka TLS handshake failed", "certificate required"],
    )
    .await;
    drop(stunnel);
    let _stunnel = Stunnel::start(
        port,
        tansu.addr,
        &cert,
        &key,
        &pki.ca_file,
        ClientAuth::None,
    )
    .await;
    assert_eventually!(
        health(&collector).await.0 == 200,
        "healthy again, with no data sent"
    );
    assert_eq!(collector.accounting().received.datapoints, 0);
    assert_balanced(&collector.shutdown().await);
}

/// Each TLS failure is counted and named at once in `/health`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_named() {
    let pki = Pki::new();
    let other_ca = TestCa::new("some other CA").unwrap();
    let other_ca_file = pki.dir.path().join("other-ca.crt");
    other_ca.write(&other_ca_file).unwrap();
    let (good_cert, good_key) = pki.issue("server", &CertSpec::localhost());
    let (expired_cert, expired_key) = pki.issue("expired", &CertSpec::localhost().expired());
    let (other_host_cert, other_host_key) =
        pki.issue("other-host", &CertSpec::server(&["kafka.example.org"]));

    let port = free_port();
    let tansu = Tansu::start(&[], Some(port)).await;
    let tls_config = |port: u16, ca: &PathBuf| {
        let mut config = secured_config(&format!("localhost:{port}"));
        config.kafka_security_protocol = SecurityProtocol::Ssl;
        config.kafka_ssl_ca_file = Some(ca.clone());
        config
    };

    // A CA the broker's certificate does not chain to.
    let stunnel = Stunnel::start(
        port,
        tansu.addr,
        &good_cert,
        &good_key,
        &pki.ca_file,
        ClientAuth::None,
    )
    .await;
    fails_with(
        spawn_collector(tls_config(port, &other_ca_file)).await,
        &[
            "Kafka TLS handshake failed",
            "unable to get local issuer certificate",
            "certificate verify failed",
        ],
    )
    .await;

    // A plaintext client talking to the TLS port.
    let mut config = secured_config(&format!("localhost:{port}"));
    config.kafka_security_protocol = SecurityProtocol::Plaintext;
    fails_with(
        spawn_collector(config).await,
        &["kafka_security_protocol", "APIVERSION_QUERY"],
    )
    .await;
    drop(stunnel);

    // An expired certificate.
    let stunnel = Stunnel::start(
        port,
        tansu.addr,
        &expired_cert,
        &expired_key,
        &pki.ca_file,
        ClientAuth::None,
    )
    .await;
    fails_with(
        spawn_collector(tls_config(port, &pki.ca_file)).await,
        &["Kafka TLS handshake failed", "certificate has expired"],
    )
    .await;
    drop(stunnel);

    // A certificate for another host name; accepted once hostname
    // verification is switched off.
    let _stunnel = Stunnel::start(
        port,
        tansu.addr,
        &other_host_cert,
        &other_host_key,
        &pki.ca_file,
        ClientAuth::None,
    )
    .await;
    fails_with(
        spawn_collector(tls_config(port, &pki.ca_file)).await,
        &["Kafka TLS handshake failed", "hostname mismatch"],
    )
    .await;
    let mut config = tls_config(port, &pki.ca_file);
    config.kafka_ssl_verify_hostname = false;
    let collector = spawn_collector(config).await;
    delivers(&collector, "no-hostname-check").await;
    assert_balanced(&collector.shutdown().await);

    // A TLS client talking to tansu's plaintext port: tansu waits for the
    // rest of the "request" the ClientHello seems to start, and the
    // handshake times out (a Kafka broker would hang up: a failed
    // handshake).
    let mut config = tls_config(tansu.addr.port(), &pki.ca_file);
    config
        .librdkafka
        .insert("socket.connection.setup.timeout.ms".into(), "2000".into());
    fails_with(
        spawn_collector(config).await,
        &["Kafka TLS handshake failed", "SSL_HANDSHAKE"],
    )
    .await;
}

/// `validate` (and so `collector validate` and `PATCH /v1/config`)
/// explains every bad security setting, naming the option, and never shows
/// a secret.
#[test]
fn validate_explains_every_bad_security_setting() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("client", &CertSpec::client("collector"));
    let (other_cert, _) = pki.issue("other", &CertSpec::client("someone else"));
    let (expired_cert, expired_key) = pki.issue("expired", &CertSpec::client("old").expired());
    let issued = pki.ca.issue(&CertSpec::client("locked")).unwrap();
    let (locked_cert, _) = issued.write(pki.dir.path(), "locked").unwrap();
    let locked_key = pki.dir.path().join("locked-encrypted.key");
    std::fs::write(&locked_key, issued.encrypted_key_pem("key-pass").unwrap()).unwrap();
    let key_password = pki.file("key.password", "key-pass\n");
    let wrong_key_password = pki.file("wrong-key.password", "nope\n");
    let expired_ca = pki.dir.path().join("expired-ca.crt");
    std::fs::copy(&expired_cert, &expired_ca).unwrap();
    let not_pem = pki.file("not.pem", "hello\n");
    let password = pki.file("password", "s3cret-Pa55\n");
    let empty = pki.file("empty", "\n");
    let missing = pki.dir.path().join("missing");

    let base = || Config {
        kafka_brokers: vec!["localhost:9093".into()],
        ..Config::default()
    };
    let tls = || Config {
        kafka_security_protocol: SecurityProtocol::Ssl,
        ..base()
    };
    let sasl = || Config {
        kafka_security_protocol: SecurityProtocol::SaslSsl,
        kafka_sasl_mechanism: Some(SaslMechanism::ScramSha512),
        kafka_sasl_username: Some("alice".into()),
        kafka_sasl_password_file: Some(password.clone()),
        ..base()
    };
    type Case = (&'static str, Config, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (
            "TLS files without TLS",
            Config {
                kafka_ssl_ca_file: Some(pki.ca_file.clone()),
                ..base()
            },
            "kafka_ssl_ca_file",
            "does not use TLS",
        ),
        (
            "SASL settings without SASL",
            Config {
                kafka_sasl_username: Some("alice".into()),
                ..tls()
            },
            "kafka_sasl_username",
            "does not use SASL",
        ),
        (
            "no mechanism",
            Config {
                kafka_sasl_mechanism: None,
                ..sasl()
            },
            "kafka_sasl_mechanism",
            "SCRAM-SHA-512",
        ),
        (
            "no username",
            Config {
                kafka_sasl_username: None,
                ..sasl()
            },
            "kafka_sasl_username",
            "needs a username",
        ),
        (
            "no password",
            Config {
                kafka_sasl_password_file: None,
                ..sasl()
            },
            "kafka_sasl_password_file",
            "needs a password",
        ),
        (
            "two passwords",
            Config {
                kafka_sasl_password: Some("inline-s3cret".into()),
                ..sasl()
            },
            "kafka_sasl_password",
            "only one",
        ),
        (
            "a missing password file",
            Config {
                kafka_sasl_password_file: Some(missing.clone()),
                ..sasl()
            },
            "kafka_sasl_password_file",
            "No such file",
        ),
        (
            "an empty password file",
            Config {
                kafka_sasl_password_file: Some(empty.clone()),
                ..sasl()
            },
            "kafka_sasl_password_file",
            "is empty",
        ),
        (
            "a directory for a file",
            Config {
                kafka_ssl_ca_file: Some(pki.dir.path().to_owned()),
                ..tls()
            },
            "kafka_ssl_ca_file",
            "directory",
        ),
        (
            "a CA file that is not PEM",
            Config {
                kafka_ssl_ca_file: Some(not_pem.clone()),
                ..tls()
            },
            "kafka_ssl_ca_file",
            "PEM",
        ),
        (
            "an expired CA",
            Config {
                kafka_ssl_ca_file: Some(expired_ca.clone()),
                ..tls()
            },
            "kafka_ssl_ca_file",
            "expired",
        ),
        (
            "a certificate without its key",
            Config {
                kafka_ssl_certificate_file: Some(cert.clone()),
                ..tls()
            },
            "kafka_ssl_key_file",
            "private key",
        ),
        (
            "a key that is not the certificate's",
            Config {
                kafka_ssl_certificate_file: Some(other_cert.clone()),
                kafka_ssl_key_file: Some(key.clone()),
                ..tls()
            },
            "kafka_ssl_key_file",
            "does not match",
        ),
        (
            "an expired client certificate",
            Config {
                kafka_ssl_certificate_file: Some(expired_cert.clone()),
                kafka_ssl_key_file: Some(expired_key.clone()),
                ..tls()
            },
            "kafka_ssl_certificate_file",
            "expired",
        ),
        (
            "an encrypted key without its password",
            Config {
                kafka_ssl_certificate_file: Some(locked_cert.clone()),
                kafka_ssl_key_file: Some(locked_key.clone()),
                ..tls()
            },
            "kafka_ssl_key_file",
            "kafka_ssl_key_password_file",
        ),
        (
            "an encrypted key with a wrong password",
            Config {
                kafka_ssl_certificate_file: Some(locked_cert.clone()),
                kafka_ssl_key_file: Some(locked_key.clone()),
                kafka_ssl_key_password_file: Some(wrong_key_password.clone()),
                ..tls()
            },
            "kafka_ssl_key_password_file",
            "password",
        ),
    ];
    for (what, config, field, words) in cases {
        let error = config.validate().expect_err(&format!("{what} is refused"));
        assert_eq!(error.field, field, "{what}: {error}");
        assert!(error.message.contains(words), "{what}: {error}");
        let shown = error.to_string();
        for secret in ["s3cret-Pa55", "inline-s3cret", "key-pass"] {
            assert!(!shown.contains(secret), "{what} shows a secret: {shown}");
        }
    }

    // What is right passes: mutual TLS with an encrypted key, and SASL.
    let good = Config {
        kafka_ssl_ca_file: Some(pki.ca_file.clone()),
        kafka_ssl_certificate_file: Some(locked_cert),
        kafka_ssl_key_file: Some(locked_key),
        kafka_ssl_key_password_file: Some(key_password),
        ..sasl()
    };
    good.validate().unwrap();
    let shown = serde_json::to_string(
        &Config {
            kafka_sasl_password_file: None,
            kafka_sasl_password: Some("inline-s3cret".into()),
            ..good
        }
        .redacted(),
    )
    .unwrap();
    assert!(!shown.contains("inline-s3cret"), "{shown}");
}

/// DC/OS strict mode: the Kafka service's SDK API through Admin Router
/// (`/service/kafka/v1/endpoints/broker`), over HTTPS with the cluster's CA
/// and `Authorization: token=…` read from a file; a rotated token is used
/// as soon as the file holds it, and a refused one is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_are_found_through_admin_router_over_https_with_a_token_file() {
    let pki = Pki::new();
    let kafka = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let scheduler = simulator::scheduler::kafka_scheduler("kafka")
        .sdk()
        .https(pki.ca.issue(&CertSpec::localhost()).unwrap())
        .token("token-1")
        .run()
        .await
        .unwrap();
    scheduler.set_lists(vec![bootstrap.clone()], vec![bootstrap.clone()]);
    let token = pki.file("token", "token-1\n");
    let mut config = test_config("");
    config.kafka_brokers.clear();
    config.kafka_scheduler_url = Some(format!("{}/service/kafka", scheduler.url()));
    config.dcos_ca_file = Some(pki.ca_file.clone());
    config.auth_credential_file = Some(token.clone());
    config.validate().unwrap();
    let collector = spawn_collector(config).await;
    collector.warm_up(5).await;
    let output = kafka_output(&collector, |_| true, "").await;
    assert!(
        output["discovered_by"]
            .as_str()
            .unwrap()
            .contains("/service/kafka/v1/endpoints/broker"),
        "{output}"
    );

    // The token is rotated by the cluster before the file holds it: named.
    scheduler.set_token(Some("token-2".into()));
    kafka_output(
        &collector,
        |out| {
            out["discovery_error"]
                .as_str()
                .is_some_and(|e| e.contains("403") && e.contains("auth_credential_file"))
        },
        "a refused token is named",
    )
    .await;
    std::fs::write(&token, "token-2\n").unwrap();
    kafka_output(
        &collector,
        |out| out["discovery_error"].is_null(),
        "the new token from the file is used",
    )
    .await;
    collector
        .deliver(producer(collector.addr, "after-rotation").blocks(5))
        .await;
    assert_balanced(&collector.shutdown().await);

    // A CA the scheduler's certificate does not chain to: named.
    let other_ca = TestCa::new("some other CA").unwrap();
    let other_ca_file = pki.dir.path().join("other-ca.crt");
    other_ca.write(&other_ca_file).unwrap();
    let mut config = test_config("");
    config.kafka_brokers.clear();
    config.kafka_scheduler_url = Some(format!("{}/service/kafka", scheduler.url()));
    config.dcos_ca_file = Some(other_ca_file);
    config.auth_credential_file = Some(token);
    let collector = spawn_collector(config).await;
    kafka_output(
        &collector,
        |out| {
            out["discovery_error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate verify failed"))
        },
        "an unknown CA is named",
    )
    .await;
    assert_balanced(&collector.shutdown().await);
}

/// With TLS to the brokers, discovery picks the SDK service's `broker-tls`
/// endpoint: here only its brokers (stunnel in front of tansu) can be
/// reached over TLS, and the data arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_tls_is_discovered_when_the_brokers_are_reached_over_tls() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", &CertSpec::localhost());
    let port = free_port();
    let tansu = Tansu::start(&[], Some(port)).await;
    let _tls = Stunnel::start(
        port,
        tansu.addr,
        &cert,
        &key,
        &pki.ca_file,
        ClientAuth::None,
    )
    .await;
    let scheduler = simulator::scheduler::kafka_scheduler("kafka")
        .sdk()
        .run()
        .await
        .unwrap();
    let plain = format!("localhost:{}", tansu.addr.port());
    scheduler.set_lists(vec![plain.clone()], vec![plain]);
    let tls = format!("localhost:{port}");
    scheduler.set_tls_lists(vec![tls.clone()], vec![tls]);
    let mut config = secured_config("");
    config.kafka_brokers.clear();
    config.kafka_scheduler_url = Some(scheduler.url());
    config.kafka_security_protocol = SecurityProtocol::Ssl;
    config.kafka_ssl_ca_file = Some(pki.ca_file.clone());
    let collector = spawn_collector(config).await;
    delivers(&collector, "tls-discovered").await;
    let brokers = collector.brokers.lock().unwrap().current.clone().unwrap();
    assert!(
        brokers.method.contains("/v1/endpoints/broker-tls"),
        "{brokers:?}"
    );
    assert_eq!(brokers.brokers, vec![format!("localhost:{port}")]);
    assert_balanced(&collector.shutdown().await);
}

/// A DC/OS strict-mode agent: HTTPS with the cluster's CA, and a token. The
/// collector's poller and the sample-producer both reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_and_the_sample_producer_reach_an_https_agent_with_a_token() {
    let pki = Pki::new();
    let kafka = rdkafka::mocking::MockCluster::new(1).unwrap();
    let agent = simulator::agent::mesos_agent()
        .https(pki.ca.issue(&CertSpec::localhost()).unwrap())
        .token("agent-token")
        .run()
        .await
        .unwrap();
    assert!(agent.url().starts_with("https://"));
    let token = pki.file("token", "agent-token\n");
    let credentials = collector::dcos::Credentials {
        ca_file: Some(pki.ca_file.clone()),
        token_file: Some(token.clone()),
        token: None,
    };

    let mut config = test_config(&kafka.bootstrap_servers());
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    config.dcos_ca_file = credentials.ca_file.clone();
    config.auth_credential_file = credentials.token_file.clone();
    let collector = spawn_collector(config).await;
    let stats = collector.stats.clone();
    assert_eventually!(
        stats
            .agent_requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
            && stats
                .received(collector::stats::Input::Agent)
                .get()
                .datapoints
                > 0,
        "the poller reads the HTTPS agent"
    );
    assert_eq!(
        stats
            .agent_request_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_balanced(&collector.shutdown().await);

    let mut sample = crate::agent::sample_config(agent.url(), &kafka.bootstrap_servers());
    sample.credentials = credentials;
    let shutdown = CancellationToken::new();
    let before = agent.requests();
    let task = tokio::spawn(run_sample(sample, shutdown.clone()));
    assert_eventually!(agent.requests() >= before + 3, "polled a few times");
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(report.messages_delivered >= 1, "{report:?}");
    assert_eq!(report.failed_polls, 0, "{report:?}");
}
