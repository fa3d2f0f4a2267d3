//! The Prometheus listener against real Prometheus software (Debian's
//! `prometheus` package, installed by `scripts/test`): `promtool check
//! metrics` reads every scrape, and a Prometheus server scrapes the
//! collector and answers, through its own query API, with the values a
//! stream fastavro wrote carried.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};

use common::{balanced, eventually, fixture, http_get, start};

/// The naming rule (docs/prometheus-and-v0.md), written here on its own: every character
/// outside `[a-zA-Z0-9_:]` (`[a-zA-Z0-9_]` for a label) as `_`, and `_`
/// before a leading digit or for an empty name.
fn prometheus_name(name: &str, label: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (!label && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Each series of the fastavro fixture with the last value the stream
/// gave it: (metric name, labels) → value as the expected file spells it.
fn expected_series() -> BTreeMap<(String, BTreeMap<String, String>), serde_json::Value> {
    let text = String::from_utf8(fixture("wire/current.expected.jsonl")).unwrap();
    let mut series = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut labels = BTreeMap::new();
        for tag in record["tags"].as_array().unwrap() {
            labels
                .entry(prometheus_name(tag["key"].as_str().unwrap(), true))
                .or_insert_with(|| tag["value"].as_str().unwrap().to_owned());
        }
        for point in record["datapoints"].as_array().unwrap() {
            let name = prometheus_name(point["name"].as_str().unwrap(), false);
            series.insert((name, labels.clone()), point["value"].clone());
        }
    }
    series
}

/// Checks a scrape with promtool: it parses (exit 0, or 3 for lint
/// problems only), and no lint problem names a family the collector names
/// itself.
fn assert_promtool_reads(text: &str) {
    let (code, out) = common::promtool(text);
    assert!(code == 0 || code == 3, "promtool exit {code}: {out}");
    assert!(!out.contains("error"), "{out}");
    for line in out.lines() {
        assert!(
            !line.starts_with("collector_"),
            "a lint on our own name: {line}"
        );
    }
}

/// A Prometheus server scraping one target every second.
struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: collector\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0");
        let (child, addr) = common::spawn_listening(command, "prometheus");
        eventually("Prometheus ready", || {
            http_get(addr, "/-/ready").is_ok_and(|(status, _)| status == 200)
        });
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// An instant query's result vector.
    fn query(&self, query: &str) -> Vec<serde_json::Value> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let (status, body) =
            http_get(self.addr, &format!("/api/v1/query?query={encoded}")).unwrap();
        assert_eq!(status, 200, "{query}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        answer["data"]["result"].as_array().unwrap().clone()
    }

    /// One counter of Prometheus's own `/metrics`.
    fn own_metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.addr, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in Prometheus's own metrics"))
    }
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn a_real_prometheus_reads_every_series_a_fastavro_stream_carried() {
    let collector = start(&["--prometheus-listen=127.0.0.1:0"], None);
    let target = collector
        .prometheus
        .expect("the start-up line names the listener");
    // Before any input: the collector's own families, which promtool reads
    // without a lint.
    let (code, out) = common::promtool(&scrape(target));
    assert_eq!(code, 0, "{out}");

    TcpStream::connect(collector.input)
        .unwrap()
        .write_all(&fixture("wire/current-null.avro"))
        .unwrap();
    let expected = expected_series();
    eventually("every series is served", || {
        collector
            .try_metric("collector_store_series")
            .is_some_and(|n| n as usize == expected.len())
    });
    let text = scrape(target);
    assert_promtool_reads(&text);
    // The API's own /metrics stays the collector's own.
    let (_, api_text) = http_get(collector.api, "/metrics").unwrap();
    assert!(!api_text.contains("cpu_usage"), "{api_text}");

    let prometheus = PrometheusServer::start(target);
    eventually("Prometheus scraped the collector", || {
        prometheus
            .query("up{job=\"collector\"}")
            .first()
            .is_some_and(|s| s["value"][1] == "1")
    });
    for ((name, labels), value) in &expected {
        // By `__name__`: a name such as `inf` is also a PromQL number.
        let matchers: Vec<String> = std::iter::once(("__name__", name.as_str()))
            .chain(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map(|(k, v)| format!("{k}={}", serde_json::Value::from(v)))
            .collect();
        let query = format!("{{{}}}", matchers.join(","));
        let result = prometheus.query(&query);
        assert_eq!(result.len(), 1, "{query}: {result:?}");
        let served = result[0]["value"][1].as_str().unwrap();
        match value {
            serde_json::Value::String(s) => {
                let want = match s.as_str() {
                    "Infinity" => "+Inf",
                    "-Infinity" => "-Inf",
                    other => other,
                };
                assert_eq!(served, want, "{query}");
            }
            number => assert_eq!(
                served.parse::<f64>().unwrap(),
                number.as_f64().unwrap(),
                "{query}"
            ),
        }
        // Every label of the family is on the sample, "" where it lacks one
        // (Prometheus stores an empty label as absent).
        let got: BTreeMap<String, String> = result[0]["metric"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !["__name__", "job", "instance"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let want: BTreeMap<String, String> = labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(got, want, "{query}");
    }
    for failure in [
        "prometheus_target_scrapes_sample_duplicate_timestamp_total",
        "prometheus_target_scrapes_sample_out_of_order_total",
        "prometheus_target_scrapes_sample_out_of_bounds_total",
        "prometheus_target_scrapes_exceeded_sample_limit_total",
    ] {
        assert_eq!(prometheus.own_metric(failure), 0.0, "{failure}");
    }
    let (code, last) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
}

#[test]
fn off_by_default_no_port_is_opened_and_nothing_is_stored() {
    let collector = start(&[], None);
    assert_eq!(collector.prometheus, None);
    TcpStream::connect(collector.input)
        .unwrap()
        .write_all(&fixture("wire/current-null.avro"))
        .unwrap();
    eventually("the stream decoded", || {
        collector.metric("collector_blocks_received_total") >= 1.0
    });
    assert_eq!(collector.metric("collector_store_series"), 0.0);
    let log = collector.log.clone();
    let (code, _) = collector.stop();
    assert_eq!(code, Some(0));
    // Without Kafka (these collectors run with kafka = false), nothing of
    // Kafka is warned about.
    let kafka_warnings: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .filter(|l| l.to_lowercase().contains("kafka") || l.contains("broker"))
        .cloned()
        .collect();
    assert!(kafka_warnings.is_empty(), "{kafka_warnings:?}");
}
