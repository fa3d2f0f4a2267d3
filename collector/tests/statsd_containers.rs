//! The statsd registration API as DC/OS 1.12+'s mesos module calls it (its
//! requests written here byte for byte: method, headers, body, over the
//! unix socket), and each container's own listener fed by statsd clients
//! we did not write (PyPI's `statsd` and `datadog`, through
//! `STATSD_UDP_HOST` and `STATSD_UDP_PORT` as a task reads them): every
//! series' cumulative value served, the last flush of a deregistered
//! container arriving, registrations kept across a restart on the same
//! ports, and a launch never failed by the collector (204, counted) at the
//! limit, on a taken port or under a storm.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Running, eventually, http_get, prometheus_samples, start};

/// One call as the module makes it (`process::http::request` over the
/// unix socket: HTTP/1.1, JSON both ways); the status and the body.
fn module_call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_module_call(socket, method, path, body, common::PATIENCE).unwrap()
}

/// The module's `request_timeout`: a call not answered within it fails
/// the launch.
const MODULE_TIMEOUT: Duration = Duration::from_secs(5);

/// [`module_call`] answered within `timeout`, or why no answer came
/// (nothing listening, or no answer in time: the module then fails the
/// launch).
fn try_module_call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    // A connection closed unanswered fails the launch as a refused one.
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `POST /container` for `id`: the status and the answer's JSON.
fn register(socket: &Path, id: &str) -> (u16, serde_json::Value) {
    let (status, body) = module_call(
        socket,
        "POST",
        "/container",
        Some(&format!("{{\"container_id\":\"{id}\"}}")),
    );
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

struct Node {
    collector: Running,
    socket: PathBuf,
    state: PathBuf,
    dir: tempfile::TempDir,
}

/// A collector with the registration API on a unix socket, its state
/// kept, statsd flushed every second and served over Prometheus.
fn node_in(dir: tempfile::TempDir, extra: &[&str]) -> Node {
    let socket = dir.path().join("run/dcos_statsd.sock");
    let state = dir.path().join("containers");
    let listen = format!("--statsd-control-listen=unix:{}", socket.display());
    let state_dir = format!("--statsd-state-dir={}", state.display());
    let mut args = vec![
        listen.as_str(),
        state_dir.as_str(),
        "--statsd-flush-secs=1",
        "--prometheus-listen=127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Node {
        collector: start(&args, None),
        socket,
        state,
        dir,
    }
}

/// What Prometheus serves now.
fn served(collector: &Running) -> BTreeMap<String, f64> {
    http_get(collector.prometheus.unwrap(), "/metrics")
        .map(|(_, text)| prometheus_samples(&text))
        .unwrap_or_default()
}

#[test]
fn a_task_registered_as_the_module_registers_it_sends_statsd_and_its_last_flush_arrives() {
    let node = node_in(tempfile::tempdir().unwrap(), &[]);
    let Node {
        collector, socket, ..
    } = &node;
    let (status, answer) = register(socket, "c-1");
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["container_id"], "c-1");
    assert_eq!(answer["statsd_host"], "127.0.0.1");
    let port = answer["statsd_port"].as_u64().unwrap();
    assert!(port > 0);
    // The module retries after an agent restart: the same listener.
    assert_eq!(register(socket, "c-1"), (201, answer.clone()));
    assert_eq!(
        module_call(socket, "GET", "/containers", None),
        (200, format!("[{answer}]"))
    );
    assert_eq!(
        module_call(socket, "GET", "/container/c-1", None),
        (200, answer.to_string())
    );
    assert_eq!(module_call(socket, "GET", "/container/nope", None).0, 404);
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.state.join("c-1")).unwrap()).unwrap();
    assert_eq!(kept, answer, "the state file holds the answer");

    // A task's statsd, sent by real clients to what the module gave it.
    let sent = send_as_a_task(&answer, 20);
    let expected: BTreeMap<String, f64> = sent["expected"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let mut last = BTreeMap::new();
    eventually(
        "every series served with what was sent, tagged with its container",
        || {
            last = served(collector);
            expected.iter().all(|(k, v)| last.get(k) == Some(v))
        },
    );

    // A value sent just before the container is deleted is in its last
    // flush (loopback has queued it before the DELETE is sent).
    let task = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    task.send_to(b"late.counter:5|c", ("127.0.0.1", port as u16))
        .unwrap();
    assert_eq!(module_call(socket, "DELETE", "/container/c-1", None).0, 202);
    let late = r#"late_counter{container_id="c-1",metric_type="counter"}"#;
    eventually("the deleted container's last flush", || {
        served(collector).get(late) == Some(&5.0)
    });
    assert_eq!(
        module_call(socket, "DELETE", "/container/c-1", None),
        (404, "Container \"c-1\" not found".into())
    );
    assert_eq!(
        module_call(socket, "GET", "/containers", None),
        (200, "[]".into())
    );
    assert!(!node.state.join("c-1").exists(), "its state file removed");
    assert_eq!(
        collector.metric("collector_statsd_registrations_total"),
        1.0
    );
    assert_eq!(
        collector.metric("collector_statsd_deregistrations_total"),
        1.0
    );
    assert_eq!(collector.metric("collector_statsd_containers"), 0.0);
    assert_eq!(
        collector.metric("collector_statsd_registrations_refused_total"),
        0.0
    );
    let Node { collector, .. } = node;
    let final_line = collector.stop_balanced();
    assert_eq!(final_line["received"], final_line["served"], "{final_line}");
}

/// What `statsd_send.py --env ROUNDS` sent to a container's listener
/// (given by its registration's answer): its JSON report.
fn send_as_a_task(answer: &serde_json::Value, rounds: u32) -> serde_json::Value {
    let sender = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/statsd_send.py");
    let id = answer["container_id"].as_str().unwrap();
    let out = Command::new("python3")
        .arg(&sender)
        .args(["--env", &rounds.to_string()])
        .env("STATSD_UDP_HOST", answer["statsd_host"].as_str().unwrap())
        .env("STATSD_UDP_PORT", answer["statsd_port"].to_string())
        .env("EXPECT_LABELS", format!(r#"{{"container_id":"{id}"}}"#))
        .output()
        .expect("python3 runs (scripts/test installs statsd and datadog)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A container's statsd in Kafka, read back by clients we did not write
/// (confluent-kafka, fastavro): every series' latest value, with the
/// container's id, is what its task sent. Without agent polling no
/// framework names the container, so its topic is `statsd`.
#[test]
fn a_containers_statsd_in_kafka_as_an_independent_reader_reads_it() {
    let kafka = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let brokers = format!("--kafka-brokers={bootstrap}");
    let node = node_in(
        tempfile::tempdir().unwrap(),
        &["--kafka=true", &brokers, "--kafka-produce-period-ms=50"],
    );
    let (status, answer) = register(&node.socket, "c-kafka");
    assert_eq!(status, 201);
    let sent = send_as_a_task(&answer, 10);
    let expected: BTreeMap<String, f64> = sent["expected"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    eventually("every series flushed", || {
        let now = served(&node.collector);
        expected.iter().all(|(k, v)| now.get(k) == Some(v))
    });
    let Node { collector, .. } = node;
    let final_line = collector.stop_balanced();
    assert_eq!(
        final_line["received"], final_line["delivered"],
        "{final_line}"
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/read_statsd_kafka.py");
    let output = Command::new("python3")
        .args([script, &bootstrap, "metrics-statsd", "60"])
        .output()
        .expect("python3 runs (scripts/test installs confluent-kafka)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let read: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    for want in sent["expected_kafka"].as_array().unwrap() {
        let mut tags = want["tags"].as_object().unwrap().clone();
        tags.insert("container_id".into(), "c-kafka".into());
        let latest = read
            .iter()
            .filter(|r| r["name"] == want["name"])
            .filter(|r| tags.iter().all(|(k, v)| r["tags"][k] == *v))
            .max_by_key(|r| r["time_ms"].as_i64().unwrap());
        assert_eq!(
            latest
                .map(|r| &r["value"])
                .and_then(serde_json::Value::as_f64),
            want["value"].as_f64(),
            "{want}: {latest:?}"
        );
    }
}

/// A UDP port free now below the kernel's ephemeral range
/// (`ip_local_port_range`), so that no socket bound to port 0 (other tests
/// run beside) takes it meanwhile; `offset` below the range's start.
fn unclaimed_port(offset: u16) -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let start = low.saturating_sub(offset).max(1024);
    (start..low)
        .find(|p| std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// The UDP sockets process `pid` holds (its descriptors whose inode is in
/// the kernel's UDP tables).
fn udp_sockets(pid: u32) -> usize {
    let mut inodes = std::collections::BTreeSet::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            if let Some(inode) = line.split_whitespace().nth(9) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_owned(),
                    )
                })
                .filter(|inode| inodes.contains(inode))
                .count()
        })
        .unwrap_or(0)
}

/// `POST /container` for `id` on `port`.
fn register_on(socket: &Path, id: &str, port: u16) -> serde_json::Value {
    let body = format!(r#"{{"container_id":"{id}","statsd_port":{port}}}"#);
    let (status, answer) = module_call(socket, "POST", "/container", Some(&body));
    assert_eq!(status, 201, "{answer}");
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn registrations_are_bound_again_after_a_restart_on_their_ports() {
    let node = node_in(tempfile::tempdir().unwrap(), &[]);
    // Ports the kernel gives no other socket meanwhile (tests run side by
    // side, each binding ports of its own).
    let a = register_on(&node.socket, "c-a", unclaimed_port(12_000));
    let b = register_on(&node.socket, "c-b", unclaimed_port(8_000));
    let port = |c: &serde_json::Value| c["statsd_port"].as_u64().unwrap() as u16;
    let Node {
        collector,
        socket,
        state,
        dir,
    } = node;
    let (code, _) = collector.stop();
    assert_eq!(code, Some(0));
    // Meanwhile: c-b's port taken by another process, a file that is not
    // a registration, and a write a crash cut short.
    let squatter = std::net::UdpSocket::bind(("127.0.0.1", port(&b))).unwrap();
    std::fs::write(state.join("garbage"), b"{not json").unwrap();
    std::fs::write(state.join(".c-z.tmp"), b"{").unwrap();
    let node = node_in(dir, &[]);
    assert_eq!(node.socket, socket);
    let (status, list) = module_call(&socket, "GET", "/containers", None);
    assert_eq!(status, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0], a, "c-a on its port again");
    assert_eq!(list[1]["container_id"], "c-b");
    let moved = port(&list[1]);
    assert_ne!(moved, port(&b), "c-b on a new port, its own taken");
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("c-b")).unwrap()).unwrap();
    assert_eq!(kept, list[1], "c-b's file rewritten with its new port");
    assert_eq!(node.collector.log_lines("was taken meanwhile"), 1);
    assert_eq!(node.collector.log_lines("could not be read"), 1);
    assert!(!state.join(".c-z.tmp").exists());
    // Both listen.
    let task = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    task.send_to(b"after.restart:1|c", ("127.0.0.1", port(&a)))
        .unwrap();
    task.send_to(b"after.restart:2|c", ("127.0.0.1", moved))
        .unwrap();
    eventually("both restored listeners flush", || {
        let now = served(&node.collector);
        now.get(r#"after_restart{container_id="c-a",metric_type="counter"}"#) == Some(&1.0)
            && now.get(r#"after_restart{container_id="c-b",metric_type="counter"}"#) == Some(&2.0)
    });
    drop(squatter);
    node.collector.stop_balanced();
}

/// Registrations past the limit, ids that cannot name a file, a port
/// asked for that is taken, and a storm of 5,000 from 8 threads: every
/// answer is 201 or 204 (a launch is never failed), exactly the limit's
/// worth are served, every refusal is counted, and the descriptors come
/// back once they are deleted.
#[test]
fn a_registration_storm_past_the_limit_never_fails_a_launch() {
    let node = node_in(
        tempfile::tempdir().unwrap(),
        &["--statsd-max-containers=1000"],
    );
    let socket = node.socket.clone();
    let pid = node.collector.pid();
    let before = common::descriptors(pid);
    let storm: Vec<_> = (0..8)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut answers = BTreeMap::<u16, u64>::new();
                for i in 0..625 {
                    // Every id twice (as after an agent restart) among
                    // the first threads' ids.
                    let id = format!("storm-{}", (t % 4) * 625 + i);
                    *answers.entry(register(&socket, &id).0).or_default() += 1;
                }
                answers
            })
        })
        .collect();
    let mut answers = BTreeMap::<u16, u64>::new();
    for thread in storm {
        for (status, n) in thread.join().unwrap() {
            *answers.entry(status).or_default() += n;
        }
    }
    // 2,500 ids, each asked twice: 1,000 served (201 both times), the
    // other 1,500 refused (204 both times).
    assert_eq!(
        answers,
        BTreeMap::from([(201, 2000), (204, 3000)]),
        "{answers:?}"
    );
    let collector = &node.collector;
    assert_eq!(collector.metric("collector_statsd_containers"), 1000.0);
    assert_eq!(
        collector.metric("collector_statsd_registrations_total"),
        1000.0
    );
    assert_eq!(
        collector.metric("collector_statsd_registrations_refused_total"),
        3000.0
    );
    let (_, list) = module_call(&socket, "GET", "/containers", None);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let ports: std::collections::BTreeSet<u64> = list
        .iter()
        .map(|c| c["statsd_port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports.len(), 1000, "a port each");
    assert_eq!(std::fs::read_dir(&node.state).unwrap().count(), 1000);
    // A UDP socket each, and nothing else left open by the storm.
    assert_eq!(udp_sockets(pid), 1000);
    eventually("the storm's connections closed", || {
        common::descriptors(pid) <= before + 1000
    });

    // Bodies the module never sends: 400. Ids that cannot name a file, a
    // host that is no address: 204.
    for body in [
        "not json",
        "{}",
        r#"{"container_id":""}"#,
        r#"{"container_id":7}"#,
    ] {
        let (status, text) = module_call(&socket, "POST", "/container", Some(body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.starts_with("Could not decode request"), "{text}");
    }
    for list in list.iter().take(10) {
        let id = list["container_id"].as_str().unwrap();
        assert_eq!(
            module_call(&socket, "DELETE", &format!("/container/{id}"), None).0,
            202
        );
    }
    for body in [
        r#"{"container_id":"../escaped"}"#.to_owned(),
        r#"{"container_id":".hidden"}"#.to_owned(),
        format!(r#"{{"container_id":"{}"}}"#, "x".repeat(300)),
        r#"{"container_id":"h","statsd_host":"not-an-ip"}"#.to_owned(),
    ] {
        assert_eq!(
            module_call(&socket, "POST", "/container", Some(&body)).0,
            204,
            "{body}"
        );
    }
    // A port asked for that is taken.
    let squatter = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let body = format!(r#"{{"container_id":"p","statsd_port":{taken}}}"#);
    assert_eq!(
        module_call(&socket, "POST", "/container", Some(&body)).0,
        204
    );
    assert_eq!(
        collector.metric("collector_statsd_registrations_refused_total"),
        3005.0
    );
    // Nothing was written outside the state directory.
    assert!(!node.dir.path().join("escaped").exists());
    assert!(!node.dir.path().join(".escaped.tmp").exists());
    let written: Vec<PathBuf> = std::fs::read_dir(node.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(written.len(), 2, "{written:?}");
    assert!(
        written.contains(&node.state)
            && written.contains(&node.socket.parent().unwrap().to_owned())
    );
    assert!(
        std::fs::read_dir(&node.state).unwrap().all(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("storm-")),
        "only the storm's registrations"
    );

    for c in &list[10..] {
        let id = c["container_id"].as_str().unwrap();
        assert_eq!(
            module_call(&socket, "DELETE", &format!("/container/{id}"), None).0,
            202
        );
    }
    assert_eq!(collector.metric("collector_statsd_containers"), 0.0);
    eventually("every listener's socket closed", || udp_sockets(pid) == 0);
    assert_eq!(std::fs::read_dir(&node.state).unwrap().count(), 0);
    node.collector.stop_balanced();
}

/// What [`storm_during_a_restart`] saw of the calls made.
struct StormCalls {
    made: usize,
    refused: usize,
    unanswered: usize,
}

/// Launches while the collector restarts (stopped, then started on the
/// same socket and state directory), as systemd restarts it: every
/// answer is 201 or 204, and every container answered 201, by either
/// process, is registered in the new one on the port it was given, with a
/// UDP socket each and nothing else. With `passed`, the registration API's
/// socket is held outside the collector and passed to each process as
/// systemd's socket activation passes it (`LISTEN_FDS`). A call counts as
/// answered only within the module's 5 s; the next process starts 2 s
/// after the last one ended, as the unit's `RestartSec` has it.
/// Its containers ask for ports from `unclaimed_port(ports_below)` on.
fn storm_during_a_restart(passed: bool, ports_below: u16) -> StormCalls {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/dcos_statsd.sock");
    // The socket systemd would hold: inherited by the collector (its
    // close-on-exec flag cleared), named by LISTEN_FDS_FIRST_FD as
    // `listenfd` reads it (systemd passes it as descriptor 3).
    // Clearing the flag lets any process spawned meanwhile, by a test
    // running beside this one, inherit the socket too: harmless, as none
    // is told of it (no LISTEN_FDS) and none accepts on it.
    let held = passed.then(|| {
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
        listener
    });
    let envs: Vec<(&str, String)> = match &held {
        Some(listener) => {
            use std::os::fd::AsRawFd;
            vec![
                ("LISTEN_FDS", "1".to_owned()),
                ("LISTEN_FDS_FIRST_FD", listener.as_raw_fd().to_string()),
            ]
        }
        None => Vec::new(),
    };
    let start_node = |dir: tempfile::TempDir| {
        let listen = format!("--statsd-control-listen=unix:{}", socket.display());
        let state = format!(
            "--statsd-state-dir={}",
            dir.path().join("containers").display()
        );
        let collector = common::start_with(&[listen.as_str(), state.as_str()], None, &envs);
        (collector, dir)
    };
    let (collector, dir) = start_node(dir);
    if passed {
        assert_eq!(
            collector.log_lines("Listening on the socket systemd passed"),
            1
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Each container asks for a port below the kernel's ephemeral range
    // (the module lets the kernel choose; here the tests running beside
    // this one could be given a port freed by the restart, and the
    // container would move, rightly, to another).
    // Each test of it its own range, 4,000 ports wide: a container given a
    // port already held gets 204, which the assertions allow.
    let base = unclaimed_port(ports_below);
    let storm: Vec<_> = (0..4u16)
        .map(|t| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("restart-{t}-{i}");
                    let port = base + t * 1000 + (i % 1000) as u16;
                    i += 1;
                    let body = format!(r#"{{"container_id":"{id}","statsd_port":{port}}}"#);
                    let answer =
                        try_module_call(&socket, "POST", "/container", Some(&body), MODULE_TIMEOUT)
                            .map(|(status, body)| {
                                let port = serde_json::from_str::<serde_json::Value>(&body)
                                    .ok()
                                    .and_then(|a| a["statsd_port"].as_u64());
                                (status, port)
                            });
                    answers.push((id, answer));
                    // The module registers as tasks launch: a steady
                    // stream, not a flood that would hold every port.
                    std::thread::sleep(Duration::from_millis(10));
                }
                answers
            })
        })
        .collect();
    eventually("registrations under way", || {
        collector.metric("collector_statsd_containers") >= 50.0
    });
    let (code, _) = collector.stop();
    assert_eq!(code, Some(0));
    // systemd's RestartSec (the unit's 2 s) before the next process: the
    // gap a call made meanwhile has to wait out, within the module's 5 s.
    std::thread::sleep(Duration::from_secs(2));
    let (collector, dir) = start_node(dir);
    eventually("registrations with the new process", || {
        collector.metric("collector_statsd_registrations_total") >= 50.0
    });
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<_> = storm.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let mut served = BTreeMap::new();
    let (mut refused, mut unanswered) = (0, 0);
    for (id, answer) in &answers {
        match answer {
            Ok((201, Some(port))) => {
                served.insert(id.clone(), *port);
            }
            Ok((204, _)) => refused += 1,
            Ok(other) => panic!("{id}: {other:?}: the module fails this launch"),
            Err(_) => unanswered += 1,
        }
    }
    println!(
        "socket passed: {passed}: {} calls during the restart: {} answered 201, {refused} answered 204, {unanswered} with no process listening",
        answers.len(),
        served.len()
    );
    let (_, list) = module_call(&socket, "GET", "/containers", None);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let registered: BTreeMap<String, u64> = list
        .iter()
        .map(|c| {
            (
                c["container_id"].as_str().unwrap().to_owned(),
                c["statsd_port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        registered, served,
        "every container answered 201, on its port, and no other"
    );
    assert_eq!(
        collector.metric("collector_statsd_containers"),
        served.len() as f64
    );
    assert_eq!(udp_sockets(collector.pid()), served.len());
    assert_eq!(
        std::fs::read_dir(dir.path().join("containers"))
            .unwrap()
            .count(),
        served.len()
    );
    collector.stop_balanced();
    StormCalls {
        made: answers.len(),
        refused,
        unanswered,
    }
}

/// A collector that binds its own socket: the calls between the two
/// processes find nothing listening (the module fails those launches, as
/// it did with DC/OS's Telegraf; docs/statsd.md, "The registration API");
/// nothing registered is lost.
#[test]
fn a_registration_storm_during_a_restart_loses_no_registered_container() {
    let calls = storm_during_a_restart(false, 20_000);
    assert!(calls.made > calls.refused + calls.unanswered);
}

/// With the socket systemd holds and passes (the deploy files' socket
/// unit), no call goes unanswered while the collector restarts: each one
/// made between the two processes waits in the socket's backlog for the
/// new one.
#[test]
fn with_the_socket_passed_by_systemd_no_launch_fails_during_a_restart() {
    let calls = storm_during_a_restart(true, 26_000);
    assert_eq!(calls.unanswered, 0, "calls with no answer");
    assert!(calls.made > calls.refused);
}

/// 200 launches at once, past the API's 64 connections: every one is
/// answered 201 (a connection past the limit waits in the socket's backlog
/// for its turn, where another API's would be closed, and a closed one
/// fails the launch).
#[test]
fn a_burst_of_launches_past_the_connection_limit_waits_its_turn() {
    let node = node_in(tempfile::tempdir().unwrap(), &[]);
    let start = std::sync::Arc::new(std::sync::Barrier::new(200));
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let (socket, start) = (node.socket.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                register(&socket, &format!("burst-{i}")).0
            })
        })
        .collect();
    let answers: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(answers.iter().all(|s| *s == 201), "{answers:?}");
    assert_eq!(node.collector.metric("collector_statsd_containers"), 200.0);
    assert_eq!(
        node.collector
            .metric("collector_api_connections_refused_total"),
        0.0
    );
    node.collector.stop_balanced();
}

/// A container sending past `statsd_container_limit_kbytes` has the rest
/// of its packets dropped and counted, and another container is not
/// touched by it.
#[test]
fn a_container_past_its_byte_limit_has_its_packets_dropped_and_counted() {
    let node = node_in(
        tempfile::tempdir().unwrap(),
        &["--statsd-container-limit-kbytes=4"],
    );
    let (_, loud) = register(&node.socket, "loud");
    let (_, quiet) = register(&node.socket, "quiet");
    let port = |c: &serde_json::Value| c["statsd_port"].as_u64().unwrap() as u16;
    let task = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // 20 packets of 1,001 bytes: 4 fit the 4 KB (4,096 bytes) a minute.
    let packet = format!("loud.counter:1|c\n{}", "pad:1|g\n".repeat(123));
    assert_eq!(packet.len(), 1001);
    for _ in 0..20 {
        task.send_to(packet.as_bytes(), ("127.0.0.1", port(&loud)))
            .unwrap();
    }
    task.send_to(b"quiet.counter:1|c", ("127.0.0.1", port(&quiet)))
        .unwrap();
    let collector = &node.collector;
    eventually(
        "the loud container's packets past its limit counted",
        || {
            collector.metric("collector_statsd_packets_over_limit_total") == 16.0
                && collector.metric("collector_statsd_packets_total") == 5.0
        },
    );
    eventually("both flushed", || {
        let now = served(collector);
        now.get(r#"loud_counter{container_id="loud",metric_type="counter"}"#) == Some(&4.0)
            && now.get(r#"quiet_counter{container_id="quiet",metric_type="counter"}"#) == Some(&1.0)
    });
    let Node { collector, .. } = node;
    collector.stop_balanced();
}

/// A sender inventing series on 1,000 containers at once: what statsd
/// holds stays within `statsd_max_bytes`, the process within the memory
/// formula (which counts every container's listener), and every refusal
/// is counted.
#[test]
fn invented_series_on_a_thousand_containers_stay_within_the_memory_bound() {
    // Everything else small, so that the formula is close to what statsd
    // may take.
    let args = [
        "--statsd-max-containers=1000",
        "--statsd-max-bytes=8388608",
        "--buffer-max-bytes=8388608",
        "--statsd-container-limit-kbytes=0",
        "--max-connections=16",
        "--max-block-bytes=65536",
        "--input-buffer-max-bytes=327680",
        "--max-decompressed-block-bytes=65536",
        "--max-partners=1",
        "--store-max-series=20000",
    ];
    let node = node_in(tempfile::tempdir().unwrap(), &args);
    let ports: Vec<u16> = (0..1000)
        .map(|i| {
            let (status, answer) = register(&node.socket, &format!("mem-{i}"));
            assert_eq!(status, 201);
            answer["statsd_port"].as_u64().unwrap() as u16
        })
        .collect();
    let collector = &node.collector;
    let task = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent_lines = 0u64;
    for round in 0..10 {
        for (c, port) in ports.iter().enumerate() {
            // 20 new names a packet, each a timing (the costliest series).
            let packet: String = (0..20)
                .map(|i| format!("invented.{round}.{c}.{i}.{}:1|ms\n", "y".repeat(30)))
                .collect();
            task.send_to(packet.as_bytes(), ("127.0.0.1", *port))
                .unwrap();
            sent_lines += 20;
        }
        // Loopback's buffers are not what is tested here: let them drain.
        eventually("the listeners kept up", || {
            collector.metric("collector_statsd_lines_total") as u64 == sent_lines
        });
    }
    eventually("the refusals counted and a flush made", || {
        collector.metric("collector_statsd_series_refused_total") > 0.0
            && collector.metric("collector_statsd_bytes") > 0.0
    });
    let held = collector.metric("collector_statsd_bytes");
    assert!(held <= 8_388_608.0, "{held}");
    let peak_rss = collector.peak_rss();
    let config = collector::config::Config {
        agent_polling: false,
        node_metrics: false,
        kafka: false,
        statsd_control_listen: "unix:/x".parse().unwrap(),
        statsd_max_containers: 1000,
        statsd_max_bytes: 8 << 20,
        buffer_max_bytes: 8 << 20,
        max_connections: 16,
        max_block_bytes: 65_536,
        input_buffer_max_bytes: 327_680,
        max_decompressed_block_bytes: 65_536,
        max_partners: 1,
        store_max_series: 20_000,
        prometheus_listen: "127.0.0.1:0".parse().unwrap(),
        ..collector::config::Config::default()
    };
    let bound = config.memory_bound();
    eprintln!(
        "peak RSS {:.1} MiB, bound {:.1} MiB (statsd {:.1} MiB)",
        peak_rss as f64 / 1048576.0,
        bound.total as f64 / 1048576.0,
        bound.statsd as f64 / 1048576.0
    );
    assert!(
        peak_rss <= bound.total,
        "peak RSS {peak_rss} > bound {bound:?}"
    );
    let Node { collector, .. } = node;
    collector.stop_balanced();
}

#[test]
fn statsd_options_name_themselves_when_wrong() {
    for (flags, field) in [
        (
            &[
                "--statsd-control-listen=unix:/tmp/x.sock",
                "--statsd-host=0.0.0.0",
            ][..],
            "statsd_host",
        ),
        (&["--statsd-state-dir=/tmp/x"][..], "statsd_state_dir"),
        (
            &[
                "--statsd-control-listen=unix:/tmp/x.sock",
                "--statsd-max-containers=0",
            ][..],
            "statsd_max_containers",
        ),
        (
            &["--statsd-container-limit-secs=0"][..],
            "statsd_container_limit_secs",
        ),
        (&["--statsd-host=nope"][..], "statsd-host"),
    ] {
        let out = common::binary("collector")
            .arg("validate")
            .args(common::base_args())
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}");
        assert!(stderr.contains(field), "{flags:?}: {stderr}");
    }
    // A state directory that cannot be made stops the start, named.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let out = common::binary("collector")
        .args(common::base_args())
        .arg(format!(
            "--statsd-control-listen=unix:{}",
            dir.path().join("s.sock").display()
        ))
        .arg(format!("--statsd-state-dir={}", file.join("sub").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("statsd_state_dir"), "{stderr}");
}
