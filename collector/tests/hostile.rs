//! The `collector` and `sample-producer` binaries tried as a hostile user
//! would: bad settings, descriptor exhaustion, decompression bombs, huge
//! agent answers, signals at start-up, log floods. Each test is the
//! regression test of a defect found that way.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use schema::{Codec, MetricList, OcfEncoder, Tag};

mod common;
use common::*;

/// A block of `records` records, each with one tag of `tag_bytes` bytes: it
/// deflates to almost nothing.
fn deflate_stream(records: usize, tag_bytes: usize) -> Vec<u8> {
    let list = MetricList {
        topic: "bomb".into(),
        tags: vec![Tag::new("k", "x".repeat(tag_bytes))],
        datapoints: Vec::new(),
    };
    let lists = vec![list; records];
    let mut encoder = OcfEncoder::new(Codec::Deflate);
    let mut out = Vec::new();
    encoder.write_header(&mut out);
    encoder.write_block(&lists, &mut out);
    out
}

/// Many connections each send a deflate block that inflates a thousand
/// times over, and stay open. RSS stays under the documented bound. Each
/// connection used to keep its inflated block (30 MiB) while it was open.
#[test]
fn deflate_bombs_on_many_connections_stay_under_the_memory_bound() {
    // 100 records of 300 KB: 30 MB inflated, too large for the buffer.
    let bomb = deflate_stream(100, 300_000);
    // 100 records of 20 KB: 2 MB inflated, routed and delivered.
    let fits = deflate_stream(100, 20_000);
    assert!(bomb.len() < 100_000 && fits.len() < 20_000);
    let args = [
        "--buffer-max-bytes=16777216",
        "--input-buffer-max-bytes=9437184",
        "--max-connections=200",
        "--max-decompressed-block-bytes=33554432",
        "--max-partners=1",
        "--partner-buffer-kbytes=64",
    ];
    let collector = start(&args, None);
    let mut open = Vec::new();
    for i in 0..100 {
        let mut stream = TcpStream::connect(collector.input).unwrap();
        stream
            .write_all(if i % 2 == 0 { &bomb } else { &fits })
            .unwrap();
        open.push(stream);
    }
    eventually("every block taken in or refused", || {
        collector.metric("collector_connections_oversized_total") == 50.0
            && collector.metric("collector_delivered_records_total") == 50.0 * 100.0
    });
    let peak = collector.peak_rss();
    let mut config = collector::config::Config {
        kafka: false,
        agent_polling: false,
        buffer_max_bytes: 16 * 1024 * 1024,
        input_buffer_max_bytes: 9 * 1024 * 1024,
        max_connections: 200,
        max_decompressed_block_bytes: 32 * 1024 * 1024,
        max_partners: 1,
        partner_buffer_kbytes: 64,
        ..collector::config::Config::default()
    };
    config.kafka_queue_max_kbytes = 0;
    let bound = config.memory_bound();
    eprintln!(
        "peak RSS {:.1} MiB, bound {:.1} MiB",
        peak as f64 / 1048576.0,
        bound.total as f64 / 1048576.0
    );
    assert!(peak <= bound.total, "peak RSS {peak} > bound {bound:?}");
    drop(open);
    let (code, last) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
}

/// A fake agent: `/containers` answers `containers`, everything else `{}`.
fn fake_agent(containers: Arc<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let containers = containers.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let n = stream.read(&mut request).unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..n]);
                let body: &[u8] = if request.starts_with("GET /containers") {
                    &containers
                } else {
                    b"{}"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(body);
            });
        }
    });
    addr
}

/// A `/containers` of about `bytes`: the real response's entries, repeated
/// under new executor ids.
fn containers_of(bytes: usize) -> Vec<u8> {
    let real: Vec<serde_json::Value> =
        serde_json::from_slice(&fixture("mesos/mesos-agent-containers-response-1.json")).unwrap();
    let mut out = Vec::with_capacity(bytes + 4096);
    out.push(b'[');
    let mut i = 0;
    while out.len() < bytes {
        let mut entry = real[i % real.len()].clone();
        entry["executor_id"] = format!("executor-{i}").into();
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &entry).unwrap();
        i += 1;
    }
    out.push(b']');
    out
}

/// A huge agent answer (56 MiB) is refused without being held, and one
/// just under the limit is mapped and pushed in pieces: RSS stays under the
/// documented bound, the buffer under its own. A 56 MiB answer used to take
/// RSS to 461 MB and the buffer past its bound.
#[test]
fn huge_agent_answers_stay_under_the_memory_bound() {
    for (size, refused) in [(56 << 20, true), (7 << 20, false)] {
        let agent = fake_agent(Arc::new(containers_of(size)));
        let url = format!("--agent-url=http://{agent}");
        let args = [
            "--agent-polling=true",
            url.as_str(),
            "--agent-poll-period=1",
            "--buffer-max-bytes=8388608",
            "--max-partners=1",
            "--partner-buffer-kbytes=64",
        ];
        let collector = start(&args, None);
        if refused {
            eventually("the answer refused twice", || {
                collector.metric("collector_agent_responses_too_large_total") >= 2.0
            });
        } else {
            eventually("a whole /containers delivered", || {
                collector.metric("collector_delivered_records_total") > 5000.0
            });
        }
        let peak = collector.peak_rss();
        let high_water = collector.metric("collector_buffer_high_water_bytes");
        let config = collector::config::Config {
            kafka: false,
            agent_polling: true,
            buffer_max_bytes: 8 << 20,
            max_partners: 1,
            partner_buffer_kbytes: 64,
            ..collector::config::Config::default()
        };
        let bound = config.memory_bound();
        eprintln!(
            "{} MiB answer: peak RSS {:.1} MiB, bound {:.1} MiB, buffer high water {:.1} MiB",
            size >> 20,
            peak as f64 / 1048576.0,
            bound.total as f64 / 1048576.0,
            high_water / 1048576.0
        );
        assert!(peak <= bound.total, "peak RSS {peak} > bound {bound:?}");
        assert!(high_water <= (8 << 20) as f64, "{high_water}");
        let (code, last) = collector.stop();
        assert_eq!(code, Some(0));
        assert!(balanced(&last), "{last}");
    }
}

/// Out of descriptors, the accept loops pause instead of spinning, log
/// once per interval with the count, and recover as soon as descriptors
/// are free again; partners that come and go leak none.
#[test]
fn out_of_descriptors_the_collector_backs_off_and_recovers() {
    let collector = start(&[], Some(96));
    // More connections than the limit leaves: accepts fail with EMFILE.
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(stream) = TcpStream::connect(collector.input) {
            held.push(stream);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let lines = collector.log_lines("Failed to accept a connection");
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines about failed accepts in 3 s"
    );
    drop(held);
    eventually("healthy again", || {
        http_get(collector.api, "/health").is_ok_and(|(status, _)| status == 200)
    });
    assert!(collector.metric("collector_accept_failures_total") >= 1.0);
    // Partners that connect, ask for a topic that never gets data, and
    // close: far more than the descriptor limit, and none stays.
    for _ in 0..300 {
        let mut partner = TcpStream::connect(collector.partner).unwrap();
        partner.write_all(b"topics=nonexistent\n").unwrap();
    }
    eventually("no partner left", || {
        collector.metric("collector_partners_connected") == 0.0
    });
    assert_eq!(
        http_get(collector.api, "/health").unwrap().0,
        200,
        "the API still answers"
    );
    let (code, last) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
}

/// Refused connections are logged once per interval, with the count, not
/// once each: a burst of them used to write a line each (1,976 lines).
#[test]
fn a_burst_of_refused_connections_is_logged_once() {
    let collector = start(&["--max-connections=1"], None);
    let _kept = TcpStream::connect(collector.input).unwrap();
    eventually("the one connection is open", || {
        collector.metric("collector_connections_open") == 1.0
    });
    for _ in 0..500 {
        drop(TcpStream::connect(collector.input).unwrap());
    }
    eventually("every refusal counted", || {
        collector.metric("collector_connections_refused_total") == 500.0
    });
    assert_eq!(collector.log_lines("Refused an input connection"), 1);
    let (code, _) = collector.stop();
    assert_eq!(code, Some(0));
}

/// A stream fastavro wrote (its schema has `logicalType`s apache-avro
/// ignores) logs no warning; it used to log one per connection.
#[test]
fn a_fastavro_stream_logs_no_warning() {
    let collector = start(&["--log-level=debug"], None);
    for _ in 0..3 {
        let mut stream = TcpStream::connect(collector.input).unwrap();
        stream
            .write_all(&fixture("wire/current-null.avro"))
            .unwrap();
    }
    eventually("the streams decoded", || {
        collector.metric("collector_blocks_received_total") >= 3.0
    });
    let warnings: Vec<String> = collector
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"WARN\"") || l.contains("Ignored"))
        .cloned()
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
    let (code, last) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
}

/// A SIGTERM that arrives while the collector is still starting (here:
/// still reading its configuration, from a FIFO) stops it cleanly, with its
/// final line. Handlers used to be installed only after the listeners were
/// bound; such a signal killed it (exit 143, no final line).
#[test]
fn a_signal_during_start_up_stops_the_collector_cleanly() {
    let dir = tempdir("signal");
    let fifo = dir.join("config.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut args = base_args();
    args.push(format!("--config={}", fifo.display()));
    let mut child = binary("collector")
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The process has installed its SIGTERM handler (bit 15 of the caught
    // set, `SigCgt` in /proc) and is blocked opening the FIFO.
    let status = format!("/proc/{}/status", child.id());
    eventually("the SIGTERM handler installed", || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .is_some_and(|caught| caught & (1 << 14) != 0)
    });
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // A window to see it not die: a default SIGTERM kills at once, so 200 ms
    // is ample; this is an observation, not a wait for something to happen.
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "killed by the signal");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(b"kafka_topic_prefix = \"from-fifo-\"\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Collector stopped"), "{stderr}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("collector-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn validate(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut all = vec!["validate"];
    all.extend(args);
    common::output("collector", &all, env)
}

/// A value clap can't parse exits 64 (not clap's 2), naming the option,
/// whether it came as a flag or from the environment.
#[test]
fn unparsable_values_exit_64_naming_the_option() {
    let (code, _, stderr) = validate(&["--kafka-produce-count=many"], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("kafka_produce_count"), "{stderr}");
    let (code, _, stderr) = validate(&[], &[("KAFKA_PRODUCE_COUNT", "many")]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("kafka_produce_count"), "{stderr}");
    let (code, _, stderr) = validate(&["--no-such-option"], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    // Help is not an error.
    assert_eq!(validate(&["--help"], &[]).0, Some(0));
}

/// Go's `strconv.ParseBool` spellings, as the original accepted them.
#[test]
fn the_originals_boolean_spellings_are_accepted() {
    for (value, expected) in [
        ("0", false),
        ("f", false),
        ("F", false),
        ("FALSE", false),
        ("False", false),
        ("false", false),
        ("1", true),
        ("t", true),
        ("T", true),
        ("TRUE", true),
        ("True", true),
        ("true", true),
    ] {
        let (code, stdout, stderr) = validate(&[], &[("KAFKA_COMPRESS_SNAPPY", value)]);
        assert_eq!(code, Some(0), "{value}: {stderr}");
        assert!(
            stdout.contains(&format!("kafka_compress_snappy = {expected}")),
            "{value}: {stdout}"
        );
    }
    let (code, _, stderr) = validate(&[], &[("KAFKA_COMPRESS_SNAPPY", "yes")]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("kafka_compress_snappy"), "{stderr}");
}

/// Settings that would only fail later, in a loop, are refused up front.
#[test]
fn unusable_settings_are_refused_by_validate() {
    for (args, env, field) in [
        (
            vec!["--kafka-brokers=not a broker :::"],
            vec![],
            "kafka_brokers",
        ),
        (vec!["--kafka-brokers=b:0"], vec![], "kafka_brokers"),
        (
            vec!["--kafka-brokers=b:9092", "--librdkafka=bogus.key=1"],
            vec![],
            "librdkafka",
        ),
        (
            vec![
                "--kafka-brokers=b:9092",
                "--librdkafka=compression.codec=zstdx",
            ],
            vec![],
            "librdkafka",
        ),
        (
            vec!["--kafka-brokers=b:9092"],
            vec![("SHUTDOWN_GRACE_SECS", "18446744073709551615")],
            "shutdown_grace_secs",
        ),
        (
            vec!["--kafka-brokers=b:9092", "--idle-timeout-secs=99999999999"],
            vec![],
            "idle_timeout_secs",
        ),
        (
            vec!["--kafka-brokers=b:9092", "--input-buffer-max-bytes=1024"],
            vec![],
            "input_buffer_max_bytes",
        ),
        (
            vec!["--kafka-brokers=b:9092", "--buffer-type=disk"],
            vec![],
            "spool_dir",
        ),
        (
            vec![
                "--kafka-brokers=b:9092",
                "--buffer-type=disk",
                "--spool-dir=/tmp/x",
                "--spool-max-bytes=1000",
            ],
            vec![],
            "spool_max_bytes",
        ),
        (
            vec![
                "--kafka-brokers=b:9092",
                "--buffer-type=disk",
                "--spool-dir=/tmp/x",
                "--spool-fsync-ms=0",
            ],
            vec![],
            "spool_fsync_ms",
        ),
        (
            vec!["--kafka-brokers=b:9092"],
            vec![
                ("BUFFER_TYPE", "disk"),
                ("SPOOL_DIR", "/proc/version/spool"),
            ],
            "spool_dir",
        ),
        (
            vec!["--kafka-brokers=b:9092", "--spool-fsync=sometimes"],
            vec![],
            "spool-fsync",
        ),
    ] {
        let (code, _, stderr) = validate(&args, &env);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
    let (code, stdout, stderr) =
        validate(&["--kafka-brokers=SSL://b-1.kafka:9093,[::1]:9092"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("memory bound:"), "{stdout}");
}

/// A TOML syntax error gives the file, line and column; a bad value names
/// its key, with the line.
#[test]
fn toml_errors_give_file_line_and_column() {
    let dir = tempdir("toml");
    let file = dir.join("collector.toml");
    std::fs::write(
        &file,
        "kafka_topic_prefix = \"ok\"\nkafka_produce_count = = 3\n",
    )
    .unwrap();
    let path = file.display().to_string();
    let (code, _, stderr) = validate(&["--config", &path], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(&format!("{path}:2:")), "{stderr}");
    assert!(stderr.contains("config:"), "{stderr}");
    std::fs::write(
        &file,
        "kafka_topic_prefix = \"ok\"\n\nkafka_produce_count = \"x\"\n",
    )
    .unwrap();
    let (code, _, stderr) = validate(&["--config", &path], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("kafka_produce_count"), "{stderr}");
    assert!(stderr.contains(&format!("{path}:3:")), "{stderr}");
}

/// The largest durations `validate` accepts shut down cleanly, with data
/// in flight to a real (mock) Kafka: the grace no longer overflows the
/// clock. `u64::MAX` seconds used to pass `validate` and panic the sink at
/// SIGTERM, which then reported nothing delivered and exited 0.
#[test]
fn the_largest_accepted_durations_shut_down_cleanly() {
    let kafka = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = format!("--kafka-brokers={}", kafka.bootstrap_servers());
    let week = collector::config::MAX_PERIOD_SECS.to_string();
    let week_ms = (collector::config::MAX_PERIOD_SECS * 1000).to_string();
    let grace = collector::config::MAX_GRACE_SECS.to_string();
    let args: Vec<String> = [
        ("--kafka", "true"),
        ("--idle-timeout-secs", week.as_str()),
        ("--frame-timeout-secs", week.as_str()),
        ("--kafka-rediscover-secs", week.as_str()),
        ("--kafka-produce-period-ms", week_ms.as_str()),
        ("--health-kafka-unavailable-secs", week.as_str()),
        ("--partner-write-timeout-secs", week.as_str()),
        ("--shutdown-grace-secs", grace.as_str()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .chain([brokers])
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let collector = start(&args, None);
    let mut stream = TcpStream::connect(collector.input).unwrap();
    stream
        .write_all(&fixture("wire/module-stream.avro"))
        .unwrap();
    drop(stream);
    eventually("the stream received", || {
        collector.metric("collector_received_datapoints_total{input=\"tcp\"}") > 0.0
    });
    let (code, last) = collector.stop();
    assert_eq!(code, Some(0), "{last}");
    assert!(balanced(&last), "{last}");
    assert!(last["delivered"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["task_panics"].as_u64(), Some(0), "{last}");
}

/// The sample-producer's fatal settings exit 64 at once with the reason;
/// they used to log once and sit idle, or log every second forever.
#[test]
fn sample_producer_refuses_fatal_settings_at_start() {
    for (args, reason) in [
        (
            vec!["-brokers", "b:9092", "--agent-url", "not a url"],
            "agent_url",
        ),
        (
            vec!["-brokers", "b:9092", "-compression", "zstdx"],
            "compression",
        ),
        (vec!["-brokers", "b:9092", "-kafka=maybe"], "kafka"),
    ] {
        let output = binary("sample-producer").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}
