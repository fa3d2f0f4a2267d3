//! Messages the collector writes with zstd (librdkafka is built with it),
//! read back by a client we did not write: Python's confluent-kafka, with
//! its own librdkafka build, decoding the values with fastavro. Its fetch
//! log names the codec of each message set, so the test knows the messages
//! were compressed with zstd and not sent plain.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;

use rdkafka::mocking::MockCluster;
use schema::{Codec, Datapoint, MetricList, OcfEncoder};

mod common;
use common::*;

const TOPIC: &str = "zstd";
const RECORDS: i64 = 500;
const POINTS: i64 = 4;

#[test]
fn zstd_messages_are_read_back_by_an_independent_client() {
    let kafka = MockCluster::new(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let collector = start(
        &[
            "--kafka=true",
            &format!("--kafka-brokers={bootstrap}"),
            &format!("--kafka-single-topic={TOPIC}"),
            "--kafka-produce-period-ms=50",
            "--kafka-produce-count=100",
            "--kafka-compress-snappy=false",
            "--librdkafka=compression.codec=zstd",
        ],
        None,
    );
    let mut encoder = OcfEncoder::new(Codec::Null);
    let mut wire = Vec::new();
    encoder.write_header(&mut wire);
    let lists: Vec<MetricList> = (0..RECORDS)
        .map(|r| MetricList {
            topic: TOPIC.into(),
            tags: Vec::new(),
            datapoints: (0..POINTS)
                .map(|p| Datapoint::new("id", r * POINTS + p, 1.5))
                .collect(),
        })
        .collect();
    encoder.write_block(&lists, &mut wire);
    TcpStream::connect(collector.input)
        .unwrap()
        .write_all(&wire)
        .unwrap();
    let total = (RECORDS * POINTS) as f64;
    eventually("everything delivered", || {
        collector.metric("collector_delivered_datapoints_total") == total
    });
    let messages = collector.metric("collector_kafka_messages_delivered_total") as u64;
    assert!(messages >= 1);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/read_kafka.py");
    let output = Command::new("python3")
        .args([script, &bootstrap, TOPIC, &messages.to_string(), "60"])
        .output()
        .expect("python3 runs (scripts/test installs confluent-kafka)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(read["codecs"], serde_json::json!(["zstd"]), "{stderr}");
    assert_eq!(read["messages"], messages, "{stderr}");
    let mut times: Vec<i64> = read["times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    times.sort_unstable();
    assert_eq!(times, (0..RECORDS * POINTS).collect::<Vec<_>>());

    let (code, last) = collector.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
}
