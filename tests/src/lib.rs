//! The end-to-end harness: the real collector, in-process, against the
//! simulator's fakes and librdkafka's mock cluster. No Docker. Also the
//! cluster's topology ([`topology`]), which the Docker tier starts and
//! `docker-compose.yml` is rendered from.
#![forbid(unsafe_code)] // the one audited exception is collector::resident
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: failing loudly is the point

pub mod prometheus;
pub mod secured;
pub mod topology;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use collector::config::Config;
use collector::sinks::kafka::BrokerState;
use collector::stats::{Accounting, Stats};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Offset, TopicPartitionList};
use schema::MetricList;
use simulator::producer::{PRODUCER_TAG, ProducerBuilder, ProducerReport, SEQ_TAG, producer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long eventual assertions wait: `RUST_TEST_PATIENCE_MS`, default 30 s.
pub fn patience() -> Duration {
    std::env::var("RUST_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30))
}

/// Retries a condition every 20 ms until it holds, or fails after
/// [`patience`] with the message. Never a bare sleep.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let patience = $crate::patience();
        let start = std::time::Instant::now();
        loop {
            if $cond {
                break;
            }
            if start.elapsed() > patience {
                panic!("not true after {:?}: {}", patience, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// Polls `check` every `every` until it returns `Some`, or `None` after
/// `timeout`: the bounded wait every harness here shares (for a plain
/// condition, [`assert_eventually!`]).
pub async fn poll_until<T, F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `check` until it returns `Ok`, and returns its value; after
/// [`patience`], fails naming `what` and what `check` last said (its `Err`).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let last = std::cell::RefCell::new(String::new());
    let found = poll_until(patience(), Duration::from_millis(50), || {
        let seen = check();
        let last = &last;
        async move { seen.await.map_err(|seen| *last.borrow_mut() = seen).ok() }
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "not true after {:?}: {what}; last: {}",
            patience(),
            last.borrow()
        )
    })
}

/// Logs go to the test output only when `TEST_LOG` is set.
pub fn trace_init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into());
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// A file under `fixtures/`.
pub fn fixture(path: &str) -> Vec<u8> {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(path);
    std::fs::read(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// A collector configuration for tests: port 0, no rate limits, quick flushes.
pub fn test_config(brokers: &str) -> Config {
    Config {
        listen_endpoint: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        partner_listen: "127.0.0.1:0".parse().unwrap(),
        input_limit_amount_kbytes: 0,
        global_limit_amount_kbytes: 0,
        kafka_brokers: brokers.split(',').map(str::to_owned).collect(),
        kafka_produce_period_ms: 50,
        shutdown_grace_secs: 10,
        kafka_rediscover_secs: 1,
        agent_polling: false,
        node_metrics: false,
        ..Config::default()
    }
}

/// A collector running in this process.
pub struct TestCollector {
    /// Its TCP input.
    pub addr: SocketAddr,
    /// Its HTTP API.
    pub api: SocketAddr,
    /// Its partner output.
    pub partner: SocketAddr,
    /// Its Prometheus listener, when on.
    pub prometheus: Option<SocketAddr>,
    /// Its v0 metrics API (`IP:PORT` or `unix:PATH`), when on.
    pub metrics_api: Option<String>,
    /// Its counters.
    pub stats: Arc<Stats>,
    /// Its broker state.
    pub brokers: Arc<Mutex<BrokerState>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Accounting>,
}

/// Binds and starts a collector.
pub async fn spawn_collector(config: Config) -> TestCollector {
    trace_init();
    let app = collector::App::bind(config)
        .await
        .expect("collector starts");
    let (stop, stopped) = oneshot::channel();
    let addr = app.ingest_addr();
    let (api, partner, prometheus) = (app.api_addr(), app.partner_addr(), app.prometheus_addr());
    let metrics_api = app.metrics_api_addr();
    let stats = app.stats();
    let brokers = app.broker_state();
    let task = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    TestCollector {
        addr,
        api,
        partner,
        prometheus,
        metrics_api,
        stats,
        brokers,
        stop,
        task,
    }
}

impl TestCollector {
    /// Shuts down in order and returns the final accounting.
    pub async fn shutdown(self) -> Accounting {
        let _ = self.stop.send(());
        self.task.await.expect("collector task")
    }

    /// Datapoints received, delivered and dropped so far.
    pub fn accounting(&self) -> Accounting {
        self.stats.accounting()
    }

    /// Runs `producer` to its end, then waits until what it sent is
    /// delivered.
    pub async fn deliver(&self, producer: ProducerBuilder) -> ProducerReport {
        let before = self.accounting().delivered.datapoints;
        let report = producer.run().await.expect("the producer ran");
        assert_eventually!(
            self.accounting().delivered.datapoints == before + report.datapoints,
            "{} datapoints delivered",
            report.datapoints
        );
        report
    }

    /// Sends `blocks` blocks from the producer "warm" and waits until they
    /// are delivered: the topic exists and the producer is connected.
    pub async fn warm_up(&self, blocks: u64) -> ProducerReport {
        self.deliver(producer(self.addr, "warm").blocks(blocks))
            .await
    }
}

/// Takes brokers 1 to `count` of `kafka` down.
pub fn all_brokers_down(kafka: &MockCluster<'_, DefaultProducerContext>, count: i32) {
    for broker in 1..=count {
        kafka.broker_down(broker).expect("broker down");
    }
}

/// Brings brokers 1 to `count` of `kafka` back up.
pub fn all_brokers_up(kafka: &MockCluster<'_, DefaultProducerContext>, count: i32) {
    for broker in 1..=count {
        kafka.broker_up(broker).expect("broker up");
    }
}

/// Everything read back from Kafka.
#[derive(Debug, Default)]
pub struct Collected {
    /// (topic, payload) of every message.
    pub messages: Vec<(String, Vec<u8>)>,
    /// Decoded records, with their topic.
    pub records: Vec<(String, MetricList)>,
}

impl Collected {
    /// Datapoints across all records.
    pub fn datapoints(&self) -> u64 {
        self.records
            .iter()
            .map(|(_, r)| r.datapoints.len() as u64)
            .sum()
    }

    /// Sequence numbers per simulator producer, and how many were duplicates.
    pub fn sequences(&self) -> (BTreeMap<String, BTreeSet<u64>>, u64) {
        let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        let mut duplicates = 0;
        for (_, record) in &self.records {
            if let (Some(producer), Some(seq)) = (record.tag(PRODUCER_TAG), record.tag(SEQ_TAG))
                && !seen
                    .entry(producer.to_owned())
                    .or_default()
                    .insert(seq.parse().unwrap())
            {
                duplicates += 1;
            }
        }
        (seen, duplicates)
    }
}

/// Reads every message of every topic matching `prefix` from the start to
/// the current end, and decodes each as one OCF file.
pub fn consume_all(bootstrap: &str, prefix: &str) -> Collected {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "e2e-verifier")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix))
    {
        for partition in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(10))
                .unwrap();
            if high > low {
                assignment
                    .add_partition_offset(topic.name(), partition.id(), Offset::Offset(low))
                    .unwrap();
                ends.insert((topic.name().to_owned(), partition.id()), high);
            }
        }
    }
    let mut collected = Collected::default();
    if ends.is_empty() {
        return collected;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "consuming timed out; left: {ends:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("consume");
        let topic = message.topic().to_owned();
        let payload = message.payload().unwrap_or_default().to_vec();
        let records = schema::decode_all(&payload, schema::Limits::default()).unwrap_or_else(|e| {
            panic!("a Kafka message on {topic} is not one valid OCF file: {e}")
        });
        collected
            .records
            .extend(records.into_iter().map(|r| (topic.clone(), r)));
        collected.messages.push((topic.clone(), payload));
        let key = (topic, message.partition());
        if ends
            .get(&key)
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            ends.remove(&key);
        }
    }
    collected
}

/// [`consume_all`] off the async runtime's threads.
pub async fn consume(bootstrap: String, prefix: &str) -> Collected {
    let prefix = prefix.to_owned();
    tokio::task::spawn_blocking(move || consume_all(&bootstrap, &prefix))
        .await
        .expect("consumer thread")
}

/// Asserts the identity: received = delivered + dropped, nothing in flight.
pub fn assert_balanced(accounting: &Accounting) {
    assert!(
        accounting.balanced(),
        "accounting identity broken: {accounting:#?}"
    );
}
