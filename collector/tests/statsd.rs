//! The node-wide statsd listener against statsd clients we did not write
//! (PyPI's `statsd` and `datadog`, sent by `statsd_send.py`): every series'
//! cumulative value on the Prometheus endpoint equals what the clients
//! sent, malformed lines are counted while the rest of their packet
//! counts, and the accounting balances.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{balanced, eventually, http_get, prometheus_samples, start};

#[test]
fn statsd_from_real_clients_is_aggregated_and_served() {
    let collector = start(
        &[
            "--statsd-listen=127.0.0.1:0",
            "--statsd-flush-secs=1",
            "--prometheus-listen=127.0.0.1:0",
        ],
        None,
    );
    let statsd = collector
        .statsd
        .expect("the start-up line names the listener");
    let target = collector.prometheus.unwrap();
    let sender = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/statsd_send.py");
    let out = Command::new("python3")
        .arg(&sender)
        .arg(statsd.ip().to_string())
        .arg(statsd.port().to_string())
        .arg("20")
        .output()
        .expect("python3 runs (scripts/test installs statsd and datadog)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected: BTreeMap<String, f64> = sent["expected"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let lines = sent["lines"].as_f64().unwrap();
    let malformed = sent["malformed"].as_f64().unwrap();

    let mut last = BTreeMap::new();
    eventually("every series served with what was sent", || {
        let Ok((200, text)) = http_get(target, "/metrics") else {
            return false;
        };
        last = prometheus_samples(&text);
        expected.iter().all(|(k, v)| last.get(k) == Some(v))
    });
    // Every line read: the good ones aggregated, the malformed counted.
    eventually("every line counted", || {
        collector.metric("collector_statsd_lines_total") == lines
            && collector.metric("collector_statsd_lines_malformed_total") == malformed
    });
    let (code, final_line) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&final_line), "{final_line}");
    assert!(final_line["received"].as_u64().unwrap() > 0, "{final_line}");
    assert_eq!(
        final_line["received"], final_line["served"],
        "without Kafka, every datapoint served"
    );
}

#[test]
fn statsd_listen_must_be_udp_ip_port() {
    let out = common::binary("collector")
        .arg("validate")
        .args(common::base_args())
        .arg("--statsd-listen=unix:/tmp/x.sock")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("statsd_listen"), "{stderr}");
    for (flag, field) in [
        ("--statsd-percentiles=0", "statsd_percentiles"),
        ("--statsd-percentiles=101", "statsd_percentiles"),
        ("--statsd-percentiles=x", "statsd_percentiles"),
        ("--statsd-flush-secs=0", "statsd_flush_secs"),
        (
            "--statsd-max-series-per-container=0",
            "statsd_max_series_per_container",
        ),
    ] {
        let out = common::binary("collector")
            .arg("validate")
            .args(common::base_args())
            .arg(flag)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}");
        assert!(stderr.contains(field), "{flag}: {stderr}");
    }
}

/// A sender inventing names, and a 64 KiB packet of one line: the series
/// held stay within `statsd_max_series_per_container` and `statsd_max_bytes`,
/// every value past them is counted, and the collector keeps serving.
#[test]
fn invented_series_and_huge_lines_are_held_to_the_bounds() {
    let collector = start(
        &[
            "--statsd-listen=127.0.0.1:0",
            "--statsd-flush-secs=1",
            "--statsd-max-series-per-container=1000",
            "--statsd-max-bytes=262144",
        ],
        None,
    );
    let statsd = collector.statsd.unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // 20,000 names, 50 lines a packet.
    let mut sent_lines = 0u64;
    for batch in 0..400 {
        let packet: String = (0..50)
            .map(|i| format!("invented.{batch}.{i}.{}:1|ms\n", "x".repeat(40)))
            .collect();
        socket.send_to(packet.as_bytes(), statsd).unwrap();
        sent_lines += 50;
        if batch % 20 == 0 {
            // Loopback's buffer is not what is tested here: let it drain.
            eventually("the listener kept up", || {
                collector.metric("collector_statsd_lines_total") as u64 == sent_lines
            });
        }
    }
    // One line filling a whole datagram: refused for its length.
    let huge = format!("{}:1|c", "h".repeat(65_000));
    socket.send_to(huge.as_bytes(), statsd).unwrap();
    sent_lines += 1;
    // Each line is one value of a new series: at most 1,000 of them held
    // (fewer within the bytes), the rest refused and counted as they come.
    eventually("every line read and the refusals counted", || {
        collector.metric("collector_statsd_lines_total") as u64 == sent_lines
            && collector.metric("collector_statsd_series_refused_total") as u64 >= sent_lines - 1000
            && collector.metric("collector_statsd_bytes") > 0.0
    });
    let held_bytes = collector.metric("collector_statsd_bytes");
    assert!(held_bytes <= 262_144.0, "{held_bytes}");
    let (code, final_line) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&final_line), "{final_line}");
    assert!(final_line["received"].as_u64().unwrap() > 0, "{final_line}");
}

/// Packets the kernel drops while the listener cannot read (the process
/// stopped, its receive buffer full) are counted: read and dropped add up
/// to what was sent.
#[test]
fn kernel_drops_of_a_full_receive_buffer_are_counted() {
    let collector = start(
        &["--statsd-listen=127.0.0.1:0", "--statsd-flush-secs=1"],
        None,
    );
    let statsd = collector.statsd.unwrap();
    let pid = collector.pid().to_string();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let packet = format!("filler:1|c\n{}", "pad:1|g\n".repeat(120));
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    // About 3 MB into a receive buffer of 2 MiB at most (the collector
    // asks for 1 MiB; the kernel grants twice what net.core.rmem_max lets
    // it ask, 416 KiB by default).
    let sent = 3000u64;
    for _ in 0..sent {
        socket.send_to(packet.as_bytes(), statsd).unwrap();
    }
    signal("-CONT");
    eventually("every packet read or counted as dropped", || {
        let read = collector.metric("collector_statsd_packets_total") as u64;
        let dropped = collector.metric("collector_statsd_packets_dropped_by_kernel_total") as u64;
        read + dropped == sent && dropped > 0
    });
    let (code, final_line) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&final_line), "{final_line}");
}
