//! The binaries' Kafka security settings as an operator gives them: flags
//! and env vars, explained by `collector validate` and by the
//! sample-producer at start, secrets never shown; SIGHUP reloads.
//! (Against real brokers: `tests/e2e/secured.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::{eventually, output as run, start};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("collector-security-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `collector validate` names the option of each bad security setting,
/// whether it came as a flag or from the environment, and shows no secret.
#[test]
fn collector_validate_explains_bad_security_settings() {
    let dir = scratch("validate");
    let password = dir.join("password");
    std::fs::write(&password, "Sup3r-s3cret\n").unwrap();
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let password_file = format!("--kafka-sasl-password-file={}", password.display());
    // Flags, env vars, and the option the error must name.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--kafka-security-protocol=tls"],
            vec![],
            "kafka_security_protocol",
        ),
        (
            vec![],
            vec![("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")],
            "kafka_sasl_mechanism",
        ),
        (
            vec![
                "--kafka-security-protocol=sasl_plaintext",
                "--kafka-sasl-mechanism=GSSAPI",
            ],
            vec![],
            "kafka_sasl_mechanism",
        ),
        (
            vec![
                "--kafka-security-protocol=sasl_plaintext",
                "--kafka-sasl-mechanism=SCRAM-SHA-512",
            ],
            vec![("KAFKA_SASL_PASSWORD_FILE", password.to_str().unwrap())],
            "kafka_sasl_username",
        ),
        (
            vec!["--kafka-security-protocol=ssl"],
            vec![("KAFKA_SSL_CA_FILE", missing)],
            "kafka_ssl_ca_file",
        ),
        (
            vec!["--kafka-security-protocol=plaintext", &password_file],
            vec![],
            "kafka_sasl_password_file",
        ),
        (
            vec![
                "--kafka-security-protocol=sasl_ssl",
                "--kafka-sasl-mechanism=SCRAM-SHA-256",
                "--kafka-sasl-username=alice",
                &password_file,
            ],
            vec![("KAFKA_SASL_PASSWORD", "Sup3r-s3cret")],
            "kafka_sasl_password",
        ),
        (vec!["--dcos-ca-file", missing], vec![], "dcos_ca_file"),
        (
            vec![],
            vec![("AUTH_CREDENTIAL_FILE", missing)],
            "auth_credential_file",
        ),
    ];
    for (args, env, field) in cases {
        let mut all = vec!["validate", "--kafka-brokers=localhost:9093"];
        all.extend(args.iter().copied());
        let (code, _, stderr) = run("collector", &all, &env);
        assert_eq!(code, Some(64), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{args:?} {env:?}: want {field}: {stderr}"
        );
        assert!(!stderr.contains("Sup3r-s3cret"), "a secret shown: {stderr}");
    }

    // A good SASL setting validates, and the password given inline is
    // redacted in what validate prints.
    let (code, stdout, stderr) = run(
        "collector",
        &[
            "validate",
            "--kafka-brokers=localhost:9093",
            "--kafka-security-protocol=sasl_ssl",
            "--kafka-sasl-mechanism=SCRAM-SHA-512",
            "--kafka-sasl-username=alice",
        ],
        &[("KAFKA_SASL_PASSWORD", "Sup3r-s3cret")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("kafka_sasl_password = \"<redacted>\""),
        "{stdout}"
    );
    assert!(!stdout.contains("Sup3r-s3cret") && !stderr.contains("Sup3r-s3cret"));
}

/// The sample-producer takes the collector's security options, by the
/// same flags and env vars, checked at start.
#[test]
fn the_sample_producer_takes_the_same_security_options() {
    let dir = scratch("sample");
    let missing = dir.join("missing");
    for (args, env, field) in [
        (
            vec!["--kafka-security-protocol=sasl_ssl"],
            vec![],
            "kafka_sasl_mechanism",
        ),
        (
            vec![],
            vec![("KAFKA_SECURITY_PROTOCOL", "nope")],
            "kafka_security_protocol",
        ),
        (
            vec![
                "--kafka-security-protocol=sasl_plaintext",
                "--kafka-sasl-mechanism=SCRAM-SHA-512",
                "--kafka-sasl-username=alice",
            ],
            vec![("KAFKA_SASL_PASSWORD_FILE", missing.to_str().unwrap())],
            "kafka_sasl_password_file",
        ),
        (
            vec![],
            vec![("DCOS_CA_FILE", missing.to_str().unwrap())],
            "dcos_ca_file",
        ),
    ] {
        let mut all = vec!["-brokers", "localhost:9093"];
        all.extend(args.iter().copied());
        let (code, _, stderr) = run("sample-producer", &all, &env);
        assert_eq!(code, Some(64), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{args:?} {env:?}: want {field}: {stderr}"
        );
    }
    let (code, help, _) = run("sample-producer", &["--help"], &[]);
    assert_eq!(code, Some(0));
    for flag in [
        "--kafka-security-protocol",
        "--kafka-ssl-ca-file",
        "--kafka-sasl-password-file",
        "--auth-credential-file",
        "--dcos-ca-file",
    ] {
        assert!(help.contains(flag), "{flag} in --help: {help}");
    }
}

/// SIGHUP makes the Kafka clients anew (counted), and the collector runs
/// on; a secret file that can no longer be read is refused, and named, and
/// the clients in use stay. Nothing it logs, at debug level, holds the
/// password.
#[test]
fn sighup_reloads_the_kafka_clients() {
    const PASSWORD: &str = "Sw0rdfish-in-a-file";
    let dir = scratch("sighup");
    let password = dir.join("password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let password_file = format!("--kafka-sasl-password-file={}", password.display());
    let running = start(
        &[
            "--kafka=true",
            "--kafka-brokers=127.0.0.1:9",
            "--kafka-security-protocol=sasl_plaintext",
            "--kafka-sasl-mechanism=SCRAM-SHA-512",
            "--kafka-sasl-username=alice",
            &password_file,
            "--log-level=debug",
        ],
        None,
    );
    eventually("a producer made", || {
        running.log_lines("Using Kafka brokers") >= 1
    });
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &running.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup();
    eventually("a reload counted, and the producer made anew", || {
        running.metric("collector_kafka_reloads_total") >= 1.0
            && running.metric("collector_producer_switches_total") >= 1.0
    });
    std::fs::write(&password, "").unwrap();
    hup();
    eventually("an empty password file named", || {
        running.log_lines("kafka_sasl_password_file") >= 1
    });
    assert_eq!(running.metric("collector_kafka_reloads_total"), 1.0);
    let log = running.log.clone();
    let (code, last) = running.stop();
    assert_eq!(code, Some(0));
    assert!(common::balanced(&last), "{last}");
    let log = log.lock().unwrap();
    assert!(log.len() > 5, "a debug log: {log:?}");
    assert!(
        log.iter().all(|line| !line.contains(PASSWORD)),
        "the password is logged"
    );
}
