//! Node metrics against Debian's `prometheus-node-exporter` on the same
//! machine (installed by `scripts/test`): what both read of the same
//! kernel counters agrees, and `promtool` reads the collector's scrape.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command};

use common::{balanced, eventually, http_get, start};

/// Every sample of a Prometheus text: (name, labels) → value.
fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").unwrap();
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        let value = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap(),
        };
        out.insert((name, labels), value);
    }
    out
}

fn one(
    all: &BTreeMap<(String, BTreeMap<String, String>), f64>,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    all.iter()
        .find(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
}

struct NodeExporter {
    child: Child,
    addr: SocketAddr,
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeExporter {
    fn start() -> Self {
        let mut command = Command::new("prometheus-node-exporter");
        command.arg("--web.listen-address=127.0.0.1:0");
        let (child, addr) = common::spawn_listening(command, "prometheus-node-exporter");
        Self { child, addr }
    }

    fn scrape(&self) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
        let (status, body) = http_get(self.addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        samples(&body)
    }
}

#[test]
fn node_metrics_agree_with_node_exporter_and_promtool_reads_them() {
    let collector = start(
        &[
            "--prometheus-listen=127.0.0.1:0",
            "--node-metrics=true",
            "--node-poll-period=1",
        ],
        None,
    );
    let target = collector.prometheus.unwrap();
    let mut ours = BTreeMap::new();
    eventually("a node poll served", || {
        let Ok((_, text)) = http_get(target, "/metrics") else {
            return false;
        };
        ours = samples(&text);
        collector.metric("collector_received_records_total{input=\"node\"}") >= 2.0
            && one(&ours, "network_in", &[]).is_some()
    });
    let exporter = NodeExporter::start();
    let theirs = exporter.scrape();

    // The same kernel figures, read by both.
    let same = |ours_name: &str,
                ours_labels: &[(&str, &str)],
                theirs_name: &str,
                theirs_labels: &[(&str, &str)]| {
        let a = one(&ours, ours_name, ours_labels).unwrap_or_else(|| panic!("no {ours_name}"));
        let b =
            one(&theirs, theirs_name, theirs_labels).unwrap_or_else(|| panic!("no {theirs_name}"));
        assert_eq!(a, b, "{ours_name} vs {theirs_name}");
    };
    same("memory_total", &[], "node_memory_MemTotal_bytes", &[]);
    same("swap_total", &[], "node_memory_SwapTotal_bytes", &[]);
    // A filesystem both measure: `/` where both have it (a root on overlay
    // is left out by both), else the first both have.
    let paths =
        |all: &BTreeMap<(String, BTreeMap<String, String>), f64>, name: &str, label: &str| {
            all.keys()
                .filter(|(n, _)| n == name)
                .filter_map(|(_, l)| l.get(label).cloned())
                .collect::<std::collections::BTreeSet<String>>()
        };
    let ours_paths = paths(&ours, "filesystem_capacity_total", "path");
    let both: Vec<String> = paths(&theirs, "node_filesystem_size_bytes", "mountpoint")
        .intersection(&ours_paths)
        .cloned()
        .collect();
    let path = if both.iter().any(|p| p == "/") {
        "/".to_owned()
    } else {
        both.first().cloned().expect("a filesystem both measure")
    };
    same(
        "filesystem_capacity_total",
        &[("path", &path)],
        "node_filesystem_size_bytes",
        &[("mountpoint", &path)],
    );
    same(
        "filesystem_inode_total",
        &[("path", &path)],
        "node_filesystem_files",
        &[("mountpoint", &path)],
    );
    let cpus: std::collections::BTreeSet<&String> = theirs
        .keys()
        .filter(|(n, _)| n == "node_cpu_seconds_total")
        .filter_map(|(_, l)| l.get("cpu"))
        .collect();
    assert_eq!(one(&ours, "cpu_cores", &[]), Some(cpus.len() as f64));
    // Counters read by the collector before node-exporter read them.
    // (node-exporter leaves `lo` out: the busiest interface both read.)
    let (device, received) = ours
        .iter()
        .filter(|((n, _), _)| n == "network_in")
        .filter_map(|((_, l), v)| {
            let device = l["interface"].as_str();
            one(
                &theirs,
                "node_network_receive_bytes_total",
                &[("device", device)],
            )
            .map(|later| (device.to_owned(), (*v, later)))
        })
        .max_by(|a, b| a.1.0.total_cmp(&b.1.0))
        .expect("an interface both read");
    assert!(
        received.0 > 0.0 && received.0 <= received.1,
        "{device}: {} then {}",
        received.0,
        received.1
    );
    let uptime = one(&ours, "system_uptime", &[]).unwrap();
    let uptime_later = one(&theirs, "node_time_seconds", &[]).unwrap()
        - one(&theirs, "node_boot_time_seconds", &[]).unwrap();
    assert!(
        uptime > 0.0 && uptime <= uptime_later + 1.0,
        "{uptime} then {uptime_later}"
    );
    for name in [
        "cpu_user",
        "cpu_system",
        "cpu_idle",
        "cpu_wait",
        "cpu_total",
    ] {
        let pct = one(&ours, name, &[]).unwrap();
        assert!((0.0..=100.0).contains(&pct), "{name} {pct}");
    }
    // No pseudo filesystem.
    for (name, labels) in ours.keys() {
        if name == "filesystem_capacity_total" {
            let path = &labels["path"];
            assert!(
                !["/proc", "/sys", "/dev", "/dev/shm", "/run"].contains(&path.as_str())
                    && !path.starts_with("/sys/")
                    && !path.starts_with("/proc/"),
                "{path}"
            );
        }
    }

    // promtool reads the scrape; its only lints are on names dcos-metrics
    // chose and the collector keeps, for the dashboards built on them.
    let (_, text) = http_get(target, "/metrics").unwrap();
    let (_, report) = common::promtool(&text);
    assert!(!report.contains("error"), "{report}");
    let kept = [
        "cpu_total",
        "memory_total",
        "swap_total",
        "filesystem_capacity_total",
        "filesystem_inode_total",
        "process_count",
    ];
    for line in report.lines() {
        let name = line.split(' ').next().unwrap_or_default();
        assert!(
            kept.contains(&name),
            "a lint on a name the collector chose: {line}"
        );
    }
    let (code, last) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
}
