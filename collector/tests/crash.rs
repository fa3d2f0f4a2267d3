//! The disk spool under the faults it is for, against the `collector`
//! binary and librdkafka's mock cluster: SIGKILL with the brokers down and
//! input flowing, and SIGTERM with the brokers down, each followed by a
//! start on the same spool with the brokers back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use schema::{Codec, Datapoint, MetricList, OcfEncoder};

mod common;
use common::*;

const TOPIC: &str = "crash";
const PER_BLOCK: u64 = 100;
const POINTS: u64 = 10;

/// The collector flags of these tests: Kafka at `bootstrap`, the disk
/// spool in `dir`.
fn spool_args(bootstrap: &str, dir: &std::path::Path) -> Vec<String> {
    vec![
        "--kafka=true".into(),
        format!("--kafka-brokers={bootstrap}"),
        format!("--kafka-single-topic={TOPIC}"),
        "--kafka-produce-period-ms=50".into(),
        "--kafka-compress-snappy=false".into(),
        "--buffer-type=disk".into(),
        format!("--spool-dir={}", dir.display()),
        "--spool-fsync-ms=100".into(),
        "--shutdown-grace-secs=5".into(),
    ]
}

fn start_spooling(bootstrap: &str, dir: &std::path::Path) -> Running {
    let args = spool_args(bootstrap, dir);
    start(&args.iter().map(String::as_str).collect::<Vec<_>>(), None)
}

/// An OCF stream header, then block `n` holds records whose datapoints are
/// numbered `n × 1000` on (their `time_ms`): each datapoint says which it is.
struct Stream {
    encoder: OcfEncoder,
}

impl Stream {
    fn header() -> (Self, Vec<u8>) {
        let encoder = OcfEncoder::new(Codec::Null);
        let mut out = Vec::new();
        encoder.write_header(&mut out);
        (Self { encoder }, out)
    }

    fn block(&mut self, n: u64) -> Vec<u8> {
        let lists: Vec<MetricList> = (0..PER_BLOCK)
            .map(|r| MetricList {
                topic: TOPIC.into(),
                tags: Vec::new(),
                datapoints: (0..POINTS)
                    .map(|p| {
                        let id = (n * PER_BLOCK + r) * POINTS + p;
                        Datapoint::new("id", id as i64, 1.0)
                    })
                    .collect(),
            })
            .collect();
        let mut out = Vec::new();
        self.encoder.write_block(&lists, &mut out);
        out
    }
}

/// Sends blocks `from..to` on one connection.
fn send(collector: &Running, from: u64, to: u64) {
    let (mut stream, header) = Stream::header();
    let mut tcp = TcpStream::connect(collector.input).unwrap();
    tcp.write_all(&header).unwrap();
    for n in from..to {
        tcp.write_all(&stream.block(n)).unwrap();
    }
}

/// Every datapoint id in the topic (all its partitions), with how often it
/// arrived.
fn arrived(bootstrap: &str) -> BTreeMap<i64, u32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "crash-verifier")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(TOPIC), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer
            .fetch_watermarks(TOPIC, partition.id(), Duration::from_secs(10))
            .unwrap();
        if high > low {
            assignment
                .add_partition_offset(TOPIC, partition.id(), Offset::Offset(low))
                .unwrap();
            ends.insert(partition.id(), high);
        }
    }
    let mut ids = BTreeMap::new();
    if ends.is_empty() {
        return ids;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !ends.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "consuming timed out: {ends:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        if ends
            .get(&message.partition())
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            ends.remove(&message.partition());
        }
        for list in
            schema::decode_all(message.payload().unwrap(), schema::Limits::default()).unwrap()
        {
            for point in list.datapoints {
                *ids.entry(point.time_ms).or_insert(0) += 1;
            }
        }
    }
    ids
}

/// Warm up: block 0 sent and delivered, so the topic exists and the
/// producer is connected.
fn warm_up(collector: &Running) {
    send(collector, 0, 1);
    eventually("the first block delivered", || {
        collector.metric("collector_delivered_datapoints_total") as u64 == PER_BLOCK * POINTS
    });
}

fn received(collector: &Running) -> u64 {
    collector.metric("collector_received_datapoints_total{input=\"tcp\"}") as u64
}

/// Brokers down, input flowing, SIGKILL. Started again with the brokers
/// back, the collector replays the spool: every datapoint it had received
/// two syncs before the kill arrives, the only ones missing are the last
/// ones before the kill (the fsync window and the socket buffers), and
/// duplicates are no more than it counted as possible.
#[test]
fn sigkill_with_the_brokers_down_loses_only_what_the_last_sync_had_not_reached() {
    let kafka = MockCluster::new(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();

    let first = start_spooling(&bootstrap, dir.path());
    warm_up(&first);
    assert_eq!(arrived(&bootstrap).len() as u64, PER_BLOCK * POINTS);
    kafka.broker_down(1).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let blocks_sent = Arc::new(AtomicU64::new(1));
    let sender = std::thread::spawn({
        let (stop, blocks_sent, input) = (stop.clone(), blocks_sent.clone(), first.input);
        move || {
            let (mut stream, header) = Stream::header();
            let mut tcp = TcpStream::connect(input).unwrap();
            tcp.write_all(&header).unwrap();
            let mut n = 1;
            while !stop.load(Relaxed) {
                if tcp.write_all(&stream.block(n)).is_err() {
                    break;
                }
                n += 1;
                blocks_sent.store(n, Relaxed);
                // Paced (about 250 blocks a second), so that what the run
                // sends stays within what the mock cluster keeps of a
                // partition (5 MiB): the check reads all of it back.
                std::thread::sleep(Duration::from_millis(4));
            }
        }
    });
    eventually("input received and spooled", || {
        received(&first) >= 100 * PER_BLOCK * POINTS
    });
    // Everything received by now is synced once two more syncs are done.
    let synced = received(&first);
    let fsyncs = first.metric("collector_spool_fsyncs_total");
    eventually("two syncs later", || {
        first.metric("collector_spool_fsyncs_total") >= fsyncs + 2.0
    });
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    stop.store(true, Relaxed);
    sender.join().unwrap();
    let sent = blocks_sent.load(Relaxed) * PER_BLOCK * POINTS;
    drop(first);

    kafka.broker_up(1).unwrap();
    let second = start_spooling(&bootstrap, dir.path());
    let replayed = second.metric("collector_replayed_datapoints_total") as u64;
    assert!(
        replayed + PER_BLOCK * POINTS >= synced,
        "replayed {replayed} of {synced} synced"
    );
    eventually("the replay delivered", || {
        second.metric("collector_delivered_datapoints_total") as u64 >= replayed
    });
    let possible_duplicates = second.metric("collector_spool_possible_duplicates_total") as u64;
    let (code, last) = second.stop();
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
    assert_eq!(last["replayed"], replayed);
    assert_eq!(last["dropped"], 0, "{last}");

    let ids = arrived(&bootstrap);
    let missing: Vec<u64> = (0..sent)
        .filter(|id| !ids.contains_key(&(*id as i64)))
        .collect();
    assert!(
        missing.iter().all(|&id| id >= synced),
        "{} datapoints synced before the kill are missing, from {:?} to {:?}",
        missing.iter().filter(|&&id| id < synced).count(),
        missing.first(),
        missing.iter().rfind(|&&id| id < synced)
    );
    let duplicates: u64 = ids.values().map(|&n| u64::from(n - 1)).sum();
    assert!(
        duplicates <= possible_duplicates * POINTS,
        "{duplicates} duplicate datapoints, {possible_duplicates} records counted as possible"
    );
    println!(
        "sent {sent}, received and synced {synced} two syncs before the kill, replayed {replayed}, lost {} (all sent after that), duplicates {duplicates}",
        missing.len()
    );
}

/// Brokers down, a SIGTERM: the buffer stays in the spool, nothing is
/// dropped, the collector exits within its grace, and the next start
/// delivers all of it.
#[test]
fn sigterm_with_the_brokers_down_keeps_everything_for_the_next_start() {
    let kafka = MockCluster::new(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let first = start_spooling(&bootstrap, dir.path());
    warm_up(&first);
    kafka.broker_down(1).unwrap();
    send(&first, 1, 51);
    let total = 51 * PER_BLOCK * POINTS;
    eventually("everything received", || received(&first) == total);
    let started = std::time::Instant::now();
    let (code, last) = first.stop();
    assert!(
        started.elapsed() < Duration::from_secs(5 + 5),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(code, Some(0));
    assert!(balanced(&last), "{last}");
    assert_eq!(last["dropped"], 0, "{last}");
    assert_eq!(last["spooled"], total - PER_BLOCK * POINTS, "{last}");

    kafka.broker_up(1).unwrap();
    let second = start_spooling(&bootstrap, dir.path());
    assert_eq!(
        second.metric("collector_replayed_datapoints_total") as u64,
        total - PER_BLOCK * POINTS
    );
    eventually("the spool delivered", || {
        second.metric("collector_delivered_datapoints_total") as u64 == total - PER_BLOCK * POINTS
    });
    let (_, last) = second.stop();
    assert!(balanced(&last), "{last}");
    assert_eq!(last["spooled"], 0, "{last}");
    let ids = arrived(&bootstrap);
    assert!(
        (0..total as i64).all(|id| ids.contains_key(&id)),
        "a datapoint is missing"
    );
}
