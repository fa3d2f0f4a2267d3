//! The DC/OS v0 metrics API on a unix socket, as Admin Router reaches it:
//! routes, status codes and shapes as dcos-metrics' code served them, every
//! answer validated against its swagger file (with the fields its code
//! added) by Python's jsonschema, and the values those of a stream
//! fastavro wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use common::{balanced, eventually, fixture, start};
use serde_json::Value;

/// A GET over HTTP/1.0 on a unix socket: status, content type, body.
fn get(socket: &str, path: &str) -> (u16, String, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: metrics\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

/// Validates answers against the swagger file's definitions.
fn swagger(answers: &[(&str, &Value)]) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("python3")
        .arg(root.join("tests/v0_swagger.py"))
        .arg(root.join("../fixtures/dcos/dcos-metrics-v0-HTTP_API.yml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    for (definition, body) in answers {
        writeln!(
            input,
            "{}",
            serde_json::json!({"definition": definition, "body": body})
        )
        .unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert_eq!(report.trim(), format!("ok {}", answers.len()));
}

#[test]
fn the_v0_api_serves_what_dcos_metrics_served_and_its_swagger_allows() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("metrics.sock");
    let listen = format!("--metrics-api-listen=unix:{}", socket.display());
    let collector = start(
        &[
            listen.as_str(),
            "--cluster-id=test-cluster",
            "--node-metrics=true",
            "--node-poll-period=1",
        ],
        None,
    );
    assert_eq!(
        collector.metrics_api.as_deref(),
        Some(format!("unix:{}", socket.display()).as_str())
    );
    let socket = socket.to_str().unwrap();

    // Before any app metrics: the containers are [], never 204.
    let (status, _, body) = get(socket, "/v0/containers");
    assert_eq!((status, body.as_str()), (200, "[]\n"));
    let (status, _, body) = get(socket, "/v0/containers/nope/app");
    assert_eq!((status, body.as_str()), (204, ""));

    TcpStream::connect(collector.input)
        .unwrap()
        .write_all(&fixture("wire/current-null.avro"))
        .unwrap();
    let expected = String::from_utf8(fixture("wire/current.expected.jsonl")).unwrap();
    // The last value of each (container, name) in the stream.
    let mut last: BTreeMap<(String, String), Value> = BTreeMap::new();
    for line in expected.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line).unwrap();
        let Some(container) = record["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == "container_id")
        else {
            continue;
        };
        for point in record["datapoints"].as_array().unwrap() {
            last.insert(
                (
                    container["value"].as_str().unwrap().to_owned(),
                    point["name"].as_str().unwrap().to_owned(),
                ),
                point["value"].clone(),
            );
        }
    }
    let containers: std::collections::BTreeSet<&String> = last.keys().map(|(c, _)| c).collect();
    eventually("the app metrics and a node poll served", || {
        let (_, _, body) = get(socket, "/v0/containers");
        serde_json::from_str::<Vec<String>>(&body).is_ok_and(|ids| ids.len() == containers.len())
            && get(socket, "/v0/node").0 == 200
    });

    let mut answers: Vec<(&str, Value)> = Vec::new();
    let (status, content_type, body) = get(socket, "/v0/ping");
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json; charset=UTF-8");
    assert!(body.ends_with('\n'));
    let ping: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ping["ok"], true);
    answers.push(("Ping", ping));

    let (_, _, body) = get(socket, "/v0/containers");
    let ids: Value = serde_json::from_str(&body).unwrap();
    let listed: std::collections::BTreeSet<&str> = ids
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, containers.iter().map(|c| c.as_str()).collect());
    answers.push(("Containers", ids.clone()));

    for container in &containers {
        let (status, _, body) = get(socket, &format!("/v0/containers/{container}/app"));
        assert_eq!(status, 200, "{container}");
        let message: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(message["dimensions"]["container_id"], container.as_str());
        assert_eq!(message["dimensions"]["cluster_id"], "test-cluster");
        for point in message["datapoints"].as_array().unwrap() {
            let want = &last[&(
                container.to_string(),
                point["name"].as_str().unwrap().to_owned(),
            )];
            match want {
                Value::String(s) if s == "NaN" => assert_eq!(point["value"], "NaN"),
                Value::String(s) => assert_eq!(point["value"], s.as_str()),
                number => assert_eq!(point["value"].as_f64(), number.as_f64(), "{point}"),
            }
            assert_eq!(point["unit"], "");
            let timestamp = point["timestamp"].as_str().unwrap();
            assert!(
                timestamp.ends_with('Z') && !timestamp.contains('.'),
                "{timestamp}"
            );
            assert!(
                point
                    .get("tags")
                    .is_none_or(|t| t.get("container_id").is_none())
            );
        }
        let names = message["datapoints"].as_array().unwrap().len();
        assert_eq!(names, last.keys().filter(|(c, _)| c == *container).count());
        answers.push(("MetricsMessage", message));
        // One metric of it.
        let name = last
            .keys()
            .find(|(c, _)| c == *container)
            .unwrap()
            .1
            .clone();
        let (status, _, body) = get(socket, &format!("/v0/containers/{container}/app/{name}"));
        assert_eq!(status, 200);
        let one: Value = serde_json::from_str(&body).unwrap();
        assert!(
            one["datapoints"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["name"] == name.as_str())
        );
        answers.push(("MetricsMessage", one));
        // No container metrics from the agent (no polling): 204.
        let (status, _, body) = get(socket, &format!("/v0/containers/{container}"));
        assert_eq!((status, body.as_str()), (204, ""));
    }

    let (status, _, body) = get(socket, "/v0/node");
    assert_eq!(status, 200);
    let node: Value = serde_json::from_str(&body).unwrap();
    let points = node["datapoints"].as_array().unwrap();
    let find = |name: &str| {
        points
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(find("memory.total")["unit"], "bytes");
    assert_eq!(find("cpu.total")["unit"], "percent");
    assert_eq!(find("load.1min")["unit"], "count");
    assert!(find("filesystem.capacity.total")["tags"]["path"].is_string());
    assert!(node["dimensions"].get("container_id").is_none());
    assert!(
        find("memory.total")["timestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    answers.push(("MetricsMessage", node));

    let (status, _, body) = get(socket, "/v0/debug");
    assert_eq!(status, 200);
    answers.push(("MetricsMessage", serde_json::from_str(&body).unwrap()));

    // A message larger than a chunk (64 KiB), and a series the agent's
    // state completed later: given once, its newest.
    let mut encoder = schema::OcfEncoder::new(schema::Codec::Null);
    let mut bytes = encoder.header().to_vec();
    let big = |framework: &str, time: i64, value: f64| schema::MetricList {
        topic: "big".into(),
        tags: vec![
            schema::Tag::new("container_id", "big"),
            schema::Tag::new("framework_name", framework),
        ],
        datapoints: (0..3000)
            .map(|i| schema::Datapoint::new(format!("app.metric.{i:04}"), time, value))
            .collect(),
    };
    encoder.write_block(&[big("UNKNOWN_FRAMEWORK_ID", 1_000, 1.0)], &mut bytes);
    encoder.write_block(&[big("marathon", 2_000, 2.0)], &mut bytes);
    TcpStream::connect(collector.input)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    eventually("the big container served", || {
        let (status, _, body) = get(socket, "/v0/containers/big/app");
        status == 200
            && serde_json::from_str::<Value>(&body).is_ok_and(|m| {
                m["datapoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| p["value"] == 2.0)
            })
    });
    let (_, _, body) = get(socket, "/v0/containers/big/app");
    assert!(body.len() > 64 * 1024);
    let message: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["datapoints"].as_array().unwrap().len(), 3000);
    assert_eq!(message["dimensions"]["framework_name"], "marathon");
    answers.push(("MetricsMessage", message));

    let answers: Vec<(&str, &Value)> = answers.iter().map(|(d, v)| (*d, v)).collect();
    swagger(&answers);

    let (code, last_line) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last_line), "{last_line}");
}

/// A group of `/etc/group` the test process is not in as its own, with
/// its id.
fn another_group() -> (String, u32) {
    let own = rustix::process::getegid().as_raw();
    std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let (name, _, gid) = (f.next()?, f.next()?, f.next()?.parse::<u32>().ok()?);
            (gid != own).then(|| (name.to_owned(), gid))
        })
        .next()
        .expect("a group in /etc/group other than the test's own")
}

/// The v0 socket is given the group asked for (Admin Router's on DC/OS),
/// by name or by number, with mode 0660; a group that does not exist, or
/// one the collector may not give it, stops the start with an error
/// naming the option; the option without a unix socket is refused.
#[test]
fn the_v0_socket_is_given_the_readers_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("metrics.sock");
    let listen = format!("--metrics-api-listen=unix:{}", socket.display());
    let (group, gid) = another_group();
    let root = rustix::process::geteuid().is_root();
    for given in [group.clone(), gid.to_string()] {
        let option = format!("--metrics-api-socket-group={given}");
        if root {
            // Root may give it any group.
            let collector = start(&[listen.as_str(), option.as_str()], None);
            let meta = std::fs::metadata(&socket).unwrap();
            assert_eq!(meta.gid(), gid, "{given}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o660);
            let (status, _, _) = get(socket.to_str().unwrap(), "/v0/ping");
            assert_eq!(status, 200);
            drop(collector);
        } else {
            let out = common::binary("collector")
                .args(common::base_args())
                .args([listen.as_str(), option.as_str()])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                stderr.contains(&format!("metrics_api_socket_group = {given}: the collector is not a member of group {given}")),
                "{stderr}"
            );
        }
    }
    let out = common::binary("collector")
        .args(common::base_args())
        .args([listen.as_str(), "--metrics-api-socket-group=no-such-group"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "metrics_api_socket_group = no-such-group: no group no-such-group in /etc/group"
        ),
        "{stderr}"
    );
    let out = common::binary("collector")
        .arg("validate")
        .args(common::base_args())
        .arg("--metrics-api-socket-group=daemon")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("metrics_api_socket_group") && stderr.contains("unix:PATH"),
        "{stderr}"
    );
}
