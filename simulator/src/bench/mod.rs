//! `simulator bench`: the load harness for the collector's performance goals.
//!
//! It runs the real collector binary as a child process, drives it with N TCP
//! connections from this process, and reports datapoints/s, MiB/s, latency
//! percentiles (Kafka sink), and the collector's RSS and CPU from /proc. With
//! the Kafka sink it runs, in the same invocation and against the same mock
//! cluster, a bare rdkafka producer sending the same pre-encoded messages,
//! and prints the ratio.
//!
//! `--profile node` runs instead what a node pays for a collector
//! ([`node`]): idle, a busy node, CPU per datapoint by thread group,
//! latency, and the figures already won.

pub mod node;
pub mod threads;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use schema::{Codec, Datapoint, MetricList, OcfEncoder, Tag};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::process::{CollectorProcess, FinalCounts};

/// Where the collector sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// The null sink: counts and discards.
    Null,
    /// librdkafka's mock cluster, in this process.
    Kafka,
}

/// A fixed set of measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// What a collector costs a node ([`node`]).
    Node,
    /// The node profile's busy node alone (memory buffer, `--busy-secs`):
    /// to set builds or settings side by side.
    Busy,
}

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Run a fixed set of measurements instead of one sweep; `--sink`,
    /// `--connections`, `--rate` and `--seconds` are then the profile's.
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// Node profile: seconds of idle measured.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
    /// Node profile: seconds of the busy node measured, per buffer type.
    #[arg(long, default_value_t = 120)]
    pub busy_secs: u64,
    /// The collector binary [default: `collector` next to this executable].
    #[arg(long)]
    pub collector_bin: Option<PathBuf>,
    /// Sink.
    #[arg(long, value_enum, default_value = "null")]
    pub sink: SinkKind,
    /// Connection counts to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub connections: Vec<usize>,
    /// Seconds of load per point.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Records per block.
    #[arg(long, default_value_t = 10)]
    pub records_per_block: usize,
    /// Datapoints per record.
    #[arg(long, default_value_t = 30)]
    pub datapoints: usize,
    /// Block codec of the producers.
    #[arg(long, default_value = "null")]
    pub codec: Codec,
    /// Blocks per second per connection (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Brokers in the mock cluster.
    #[arg(long, default_value_t = 3)]
    pub brokers: i32,
    /// Take every broker down for this many seconds in the middle of the
    /// load (Kafka sink), and report the RSS during the outage.
    #[arg(long)]
    pub outage_secs: Option<u64>,
    /// Start each connection at a random point of its first interval (with
    /// `--rate`), as independent producers do, instead of all at once.
    #[arg(long)]
    pub stagger: bool,
    /// Collector buffer bound, bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub buffer_max_bytes: usize,
    /// Environment for the collector process, KEY=VALUE (repeatable), e.g.
    /// glibc malloc tunables.
    #[arg(long = "collector-env", value_parser = parse_env)]
    pub collector_env: Vec<(String, String)>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput and RSS against connections here (SVG).
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Worst.
    pub max: u64,
    /// How many records were sampled.
    pub samples: usize,
}

/// One point of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct PointResult {
    /// Concurrent connections.
    pub connections: usize,
    /// Sink.
    pub sink: SinkKind,
    /// Seconds of load.
    pub seconds: f64,
    /// Datapoints the producers wrote.
    pub datapoints_sent: u64,
    /// Bytes the producers wrote.
    pub bytes_sent: u64,
    /// Datapoints per second through the collector.
    pub datapoints_per_sec: f64,
    /// MiB per second of input through the collector.
    pub mib_per_sec: f64,
    /// The collector's final counts.
    pub collector: FinalCounts,
    /// RSS before load, MiB.
    pub rss_idle_mib: f64,
    /// Highest RSS under load, MiB.
    pub rss_max_mib: f64,
    /// Highest RSS during the broker outage, MiB.
    pub rss_outage_max_mib: Option<f64>,
    /// Collector CPU, percent of one core, under load.
    pub cpu_percent: f64,
    /// The collector's CPU under load by thread group.
    pub cpu: threads::CpuSplit,
    /// Kafka sink: end-to-end latency from record time to consume time.
    pub latency_ms: Option<Latency>,
    /// Kafka sink: the bare rdkafka producer's datapoints/s on the same cluster.
    pub baseline_datapoints_per_sec: Option<f64>,
    /// Kafka sink: collector / baseline.
    pub ratio: Option<f64>,
    /// Kafka sink: the baseline's run.
    pub baseline: Option<Baseline>,
}

/// The bare producer's run: its rate, and the CPU of its threads (the
/// sending thread counts as its own).
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// Datapoints acknowledged per second.
    pub datapoints_per_sec: f64,
    /// Datapoints acknowledged.
    pub datapoints: u64,
    /// CPU by thread group.
    pub cpu: threads::CpuSplit,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn records(options: &BenchOptions, connection: usize) -> Vec<MetricList> {
    (0..options.records_per_block)
        .map(|i| MetricList {
            topic: "bench".into(),
            tags: vec![
                Tag::new("framework_id", "5349f49b-68b3-4638-aab2-fc4ec845f993-0001"),
                Tag::new("executor_id", format!("bench-executor-{connection}")),
                Tag::new("container_id", format!("c7b0ab1f-5e4a-4a0e-9f8d-{i:012x}")),
            ],
            datapoints: (0..options.datapoints)
                .map(|j| {
                    Datapoint::new(format!("usage.cpus_user_time_secs_{j}"), 0, j as f64 * 0.5)
                })
                .collect(),
        })
        .collect()
}

/// The next varied value (xorshift64, cheap and varied).
fn next_value(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed % 1_000_000) as f64 / 1000.0
}

/// Gives a record fresh times and values.
fn vary(record: &mut MetricList, time_ms: i64, seed: &mut u64) {
    for point in &mut record.datapoints {
        point.time_ms = time_ms;
        point.value = next_value(seed);
    }
}

/// One block's records, encoded once. Each block after that only patches
/// the datapoints' times and values where they lie, so every block is
/// distinct, like real counters (and like the baseline's messages, which
/// matters to compression), while the generator, which shares the two
/// cores with the collector, costs little beyond its TCP writes.
struct BlockTemplate {
    records: usize,
    data: Vec<u8>,
    /// Offsets of each datapoint's time (a varint) and value (8 bytes).
    fields: Vec<(usize, usize)>,
    time_len: usize,
}

impl BlockTemplate {
    fn new(records: &[MetricList], time_ms: i64) -> anyhow::Result<Self> {
        let mut data = Vec::new();
        let mut fields = Vec::new();
        for record in records {
            let mut record = record.clone();
            for point in &mut record.datapoints {
                point.time_ms = time_ms;
            }
            let start = data.len();
            schema::datum::write_metric_list(&mut data, &record);
            // Find the fields with the reader, so the layout is the codec's.
            let mut c = schema::datum::Cursor::new(&data[start..]);
            c.skip_str()?;
            c.read_array(1, |c| {
                c.skip_str()?;
                c.skip_str()
            })?;
            c.read_array(1, |c| {
                c.skip_str()?;
                let time = c.position();
                c.skip_long()?;
                let value = c.position();
                c.read_double()?;
                fields.push((start + time, start + value));
                Ok(())
            })?;
        }
        Ok(Self {
            records: records.len(),
            data,
            fields,
            time_len: schema::datum::long_len(time_ms),
        })
    }

    /// Writes fresh times and values into the template; false if the time
    /// no longer has the template's varint length (build a new template).
    fn refresh(&mut self, time_ms: i64, seed: &mut u64) -> bool {
        if schema::datum::long_len(time_ms) != self.time_len {
            return false;
        }
        let mut time = Vec::with_capacity(10);
        schema::datum::write_long(&mut time, time_ms);
        for &(t, v) in &self.fields {
            self.data[t..t + time.len()].copy_from_slice(&time);
            self.data[v..v + 8].copy_from_slice(&next_value(seed).to_le_bytes());
        }
        true
    }
}

/// Drives one connection until `stop`; returns (datapoints, bytes).
async fn drive(
    addr: String,
    options: BenchOptions,
    connection: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64)> {
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    let encoder = if options.codec == Codec::Null {
        OcfEncoder::with_sync(Codec::Null, schema::ocf::MODULE_SYNC)
    } else {
        OcfEncoder::new(options.codec)
    };
    let template = records(&options, connection);
    let mut block = BlockTemplate::new(&template, now_ms())?;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ connection as u64;
    let per_block = (options.records_per_block * options.datapoints) as u64;
    let mut out = Vec::with_capacity(256 * 1024);
    encoder.write_header(&mut out);
    let (mut datapoints, mut bytes) = (0u64, 0u64);
    let interval = (options.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / options.rate));
    let mut next = tokio::time::Instant::now();
    if let (Some(interval), true) = (interval, options.stagger) {
        next += interval.mul_f64(rand::random::<f64>());
        tokio::time::sleep_until(next).await;
    }
    while !stop.load(Relaxed) {
        // Fresh timestamps per write, for the latency measurement, and
        // values that vary like real counters in every block, so that
        // compression sees realistic bytes rather than the same record over
        // and over.
        let time_ms = now_ms();
        let blocks = if interval.is_some() { 1 } else { 8 };
        for _ in 0..blocks {
            if !block.refresh(time_ms, &mut seed) {
                block = BlockTemplate::new(&template, time_ms)?;
                block.refresh(time_ms, &mut seed);
            }
            encoder.write_encoded_block(block.records, &block.data, &mut out);
        }
        stream.write_all(&out).await?;
        bytes += out.len() as u64;
        datapoints += per_block * blocks;
        out.clear();
        if let Some(interval) = interval {
            next += interval;
            tokio::time::sleep_until(next).await;
        }
    }
    stream.shutdown().await?;
    Ok((datapoints, bytes))
}

struct Sampler {
    max_rss: AtomicU64,
    stop: AtomicBool,
}

/// How the latency sampler reads Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LatencyMode {
    /// Every message (every 8th decoded): paced runs, where the reader's
    /// cost is small and an outage's backlog must be seen.
    Every,
    /// Ten times a second, the newest message of one partition (taking
    /// them in turn), if that partition has grown since it last looked:
    /// saturating runs. A reader of every message would decompress the
    /// whole stream on the two cores the collector is measured on; that cost
    /// the collector about a fifth of its throughput, and the baseline runs
    /// with no such reader.
    Newest,
}

/// Samples end-to-end latency from Kafka while the load runs: now minus the
/// time of the records in the messages it reads.
fn sample_latency(
    bootstrap: String,
    topic: String,
    mode: LatencyMode,
    stop: Arc<AtomicBool>,
) -> Latency {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "bench-latency")
        .set("enable.auto.commit", "false")
        // The default 500 ms fetch wait would dominate what we measure.
        .set("fetch.wait.max.ms", "5")
        // The mock keeps 5 MiB a partition: a reader that falls behind that
        // (after an outage) goes on from the oldest message kept.
        .set("auto.offset.reset", "earliest");
    if mode == LatencyMode::Newest {
        // Fetch no more than the one message batch asked for.
        config
            .set("max.partition.fetch.bytes", "1")
            .set("queued.max.messages.kbytes", "1");
    }
    let Ok(consumer) = config.create::<BaseConsumer>() else {
        return Latency::default();
    };
    let mut latencies = Vec::new();
    let mut record = |message: &rdkafka::message::BorrowedMessage<'_>| {
        let now = now_ms();
        if let Ok(records) = schema::decode_all(
            message.payload().unwrap_or_default(),
            schema::Limits::default(),
        ) {
            for record in records.iter().step_by(16) {
                if let Some(point) = record.datapoints.first() {
                    latencies.push((now - point.time_ms).max(0) as u64);
                }
            }
        }
    };
    let mut partitions: Vec<i32> = Vec::new();
    let mut last_high = std::collections::HashMap::new();
    let mut turn = 0usize;
    let mut seen = 0u64;
    while !stop.load(Relaxed) {
        if partitions.is_empty() {
            if let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(1))
                && let Some(t) = metadata.topics().first()
            {
                partitions = t.partitions().iter().map(|p| p.id()).collect();
            }
            if partitions.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            } else if mode == LatencyMode::Every {
                let mut list = rdkafka::TopicPartitionList::new();
                for &p in &partitions {
                    let _ = list.add_partition_offset(&topic, p, rdkafka::Offset::End);
                }
                if consumer.assign(&list).is_err() {
                    partitions.clear();
                }
            }
            continue;
        }
        if mode == LatencyMode::Every {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                seen += 1;
                if seen.is_multiple_of(8) {
                    record(&message);
                }
            }
            continue;
        }
        std::thread::sleep(Duration::from_millis(100));
        let partition = partitions[turn % partitions.len()];
        turn += 1;
        let Ok((low, high)) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(1))
        else {
            continue;
        };
        if high <= low || last_high.insert(partition, high) == Some(high) {
            continue;
        }
        let mut list = rdkafka::TopicPartitionList::new();
        if list
            .add_partition_offset(&topic, partition, rdkafka::Offset::Offset(high - 1))
            .is_err()
            || consumer.assign(&list).is_err()
        {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && !stop.load(Relaxed) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                record(&message);
                break;
            }
        }
        let _ = consumer.unassign();
    }
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    Latency {
        p50: pick(0.5),
        p99: pick(0.99),
        max: latencies.last().copied().unwrap_or(0),
        samples: latencies.len(),
    }
}

struct CountAcks {
    datapoints: Arc<AtomicU64>,
}

impl rdkafka::ClientContext for CountAcks {}
impl ProducerContext for CountAcks {
    type DeliveryOpaque = Box<u64>;
    fn delivery(&self, result: &DeliveryResult<'_>, datapoints: Box<u64>) {
        if result.is_ok() {
            self.datapoints.fetch_add(*datapoints, Relaxed);
        }
    }
}

/// The baseline: a bare rdkafka producer with the collector's settings
/// sending pre-encoded OCF messages of the collector's batch shape.
fn baseline(bootstrap: &str, options: &BenchOptions, seconds: u64) -> anyhow::Result<Baseline> {
    let acked = Arc::new(AtomicU64::new(0));
    let me = std::process::id();
    let sender = threads::current_tid();
    let before = threads::sample(me)?;
    let producer: ThreadedProducer<CountAcks> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.codec", "snappy")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "32768")
        .set("message.timeout.ms", "0")
        .create_with_context(CountAcks {
            datapoints: acked.clone(),
        })?;
    // The collector's batches: up to 1024 records or 512 KB per message.
    let one = records(options, 0);
    let record_bytes = one.iter().map(schema::datum::encoded_len).sum::<usize>() / one.len().max(1);
    let per_message = (512 * 1024 / record_bytes.max(1)).clamp(1, 1024);
    // Several distinct messages with varied values, like the collector's.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut encoder = OcfEncoder::new(Codec::Null);
    let payloads: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            let mut batch: Vec<MetricList> =
                one.iter().cycle().take(per_message).cloned().collect();
            for record in &mut batch {
                vary(record, now_ms(), &mut seed);
            }
            encoder.file(&batch)
        })
        .collect();
    let datapoints = (per_message * options.datapoints) as u64;
    // From here on: what producing costs (its threads, and this one's share
    // from now, not the encoding above).
    let sending = threads::sample(me)?;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut next = 0usize;
    while Instant::now() < end {
        let payload = &payloads[next % payloads.len()];
        next += 1;
        let record =
            BaseRecord::with_opaque_to("metrics-baseline", Box::new(datapoints)).payload(payload);
        if let Err((error, _)) = producer.send::<(), _>(record) {
            if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                bail!("baseline produce failed: {error}");
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let elapsed = start.elapsed().as_secs_f64();
    // Its threads: those born since it was made, and this one.
    let cpu = threads::sample(me)?.since(&sending, |tid| {
        Some(tid) == sender || before.tids().all(|t| t != tid)
    });
    let datapoints = acked.load(Relaxed);
    Ok(Baseline {
        datapoints_per_sec: datapoints as f64 / elapsed,
        datapoints,
        cpu,
    })
}

/// The collector binary the bench runs.
pub(crate) fn collector_bin(options: &BenchOptions) -> PathBuf {
    options
        .collector_bin
        .clone()
        .unwrap_or_else(crate::process::sibling_collector)
}

/// The collector's environment: `--collector-env`, after `NODE_METRICS=false`
/// (an env var rather than a flag, so that a build from before node
/// metrics, given with `--collector-bin` to compare, runs as well).
pub(crate) fn collector_env(options: &BenchOptions) -> Vec<(String, String)> {
    std::iter::once(("NODE_METRICS".to_owned(), "false".to_owned()))
        .chain(options.collector_env.iter().cloned())
        .collect()
}

/// The collector's arguments: ephemeral ports, no agent polling, no input
/// limits, the buffer bound asked for, and Kafka at `bootstrap` (none: the
/// null sink). Node metrics are off through [`collector_env`].
pub(crate) fn collector_args(options: &BenchOptions, bootstrap: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen-endpoint=127.0.0.1:0",
        "--api-listen=127.0.0.1:0",
        "--partner-listen=127.0.0.1:0",
        "--agent-polling=false",
        "--input-limit-amount-kbytes=0",
        "--global-limit-amount-kbytes=0",
        "--max-connections=100000",
        "--log-level=warn,collector=info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--buffer-max-bytes={}", options.buffer_max_bytes));
    match bootstrap {
        Some(bootstrap) => {
            args.push(format!("--kafka-brokers={bootstrap}"));
            args.push("--kafka-topic-prefix=metrics-".into());
        }
        None => args.push("--kafka=false".into()),
    }
    args
}

/// Runs one point of the sweep.
pub async fn run_point(
    options: &BenchOptions,
    connections: usize,
    kafka: Option<&MockCluster<'_, rdkafka::producer::DefaultProducerContext>>,
) -> anyhow::Result<PointResult> {
    let args = collector_args(options, kafka.map(|c| c.bootstrap_servers()).as_deref());
    let collector =
        CollectorProcess::start(&collector_bin(options), &args, &collector_env(options))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = collector.rss_bytes();
    let sampler = Arc::new(Sampler {
        max_rss: AtomicU64::new(rss_idle),
        stop: AtomicBool::new(false),
    });
    let outage_max = Arc::new(AtomicU64::new(0));
    let in_outage = Arc::new(AtomicBool::new(false));
    let pid = collector.pid();
    let sampler_task = {
        let (sampler, outage_max, in_outage) =
            (sampler.clone(), outage_max.clone(), in_outage.clone());
        std::thread::spawn(move || {
            while !sampler.stop.load(Relaxed) {
                let rss = crate::process::rss_of(pid);
                sampler.max_rss.fetch_max(rss, Relaxed);
                if in_outage.load(Relaxed) {
                    outage_max.fetch_max(rss, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let latency_task = kafka.map(|cluster| {
        let (bootstrap, stop) = (cluster.bootstrap_servers(), stop.clone());
        let mode = if options.rate > 0.0 {
            LatencyMode::Every
        } else {
            LatencyMode::Newest
        };
        std::thread::spawn(move || sample_latency(bootstrap, "metrics-bench".into(), mode, stop))
    });
    let cpu_start = collector.cpu_time();
    let threads_start = threads::sample(pid)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for connection in 0..connections {
        tasks.push(tokio::spawn(drive(
            collector.input.clone(),
            options.clone(),
            connection,
            stop.clone(),
        )));
    }
    match (options.outage_secs, kafka) {
        (Some(outage), Some(cluster)) => {
            let before = options.seconds.saturating_sub(outage) / 2;
            tokio::time::sleep(Duration::from_secs(before)).await;
            for broker in 1..=options.brokers {
                cluster.broker_down(broker)?;
            }
            in_outage.store(true, Relaxed);
            tokio::time::sleep(Duration::from_secs(outage)).await;
            in_outage.store(false, Relaxed);
            for broker in 1..=options.brokers {
                cluster.broker_up(broker)?;
            }
            tokio::time::sleep(Duration::from_secs(
                options.seconds.saturating_sub(outage + before),
            ))
            .await;
        }
        _ => tokio::time::sleep(Duration::from_secs(options.seconds)).await,
    }
    stop.store(true, Relaxed);
    let (mut datapoints, mut bytes) = (0, 0);
    for task in tasks {
        let (d, b) = task.await?.with_context(|| {
            format!(
                "a producer connection failed; the collector's last log lines:\n{}",
                collector.recent_log()
            )
        })?;
        datapoints += d;
        bytes += b;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = collector.cpu_time().saturating_sub(cpu_start).as_secs_f64();
    // What was sent may still be in the sockets (a collector slower than
    // the load, such as one syncing every write): let it read everything
    // before it is stopped, as a producer that waits would.
    let caught_up = std::time::Instant::now() + Duration::from_secs(120);
    while collector.received().unwrap_or(0) < datapoints && std::time::Instant::now() < caught_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The CPU it took to handle all of it: read once Kafka has it.
    if kafka.is_some() {
        while collector
            .metric("collector_delivered_datapoints_total")
            .unwrap_or(0)
            < datapoints
            && std::time::Instant::now() < caught_up
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let split = threads::sample(pid)?.since(&threads_start, |_| true);
    let final_counts = tokio::task::spawn_blocking(move || collector.stop()).await??;
    sampler.stop.store(true, Relaxed);
    let _ = sampler_task.join();
    let latency = latency_task.and_then(|t| t.join().ok());
    if final_counts.received != datapoints {
        bail!(
            "the collector received {} datapoints but {} were sent",
            final_counts.received,
            datapoints
        );
    }
    if final_counts.delivered + final_counts.served != datapoints || final_counts.dropped != 0 {
        bail!("the collector did not deliver everything it received: {final_counts:?}");
    }
    let baseline = match kafka {
        Some(cluster) => {
            let (bootstrap, opts, secs) = (
                cluster.bootstrap_servers(),
                options.clone(),
                options.seconds,
            );
            Some(tokio::task::spawn_blocking(move || baseline(&bootstrap, &opts, secs)).await??)
        }
        None => None,
    };
    let rate = datapoints as f64 / elapsed;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(PointResult {
        connections,
        sink: options.sink,
        seconds: elapsed,
        datapoints_sent: datapoints,
        bytes_sent: bytes,
        datapoints_per_sec: rate,
        mib_per_sec: mib(bytes) / elapsed,
        collector: final_counts,
        rss_idle_mib: mib(rss_idle),
        rss_max_mib: mib(sampler.max_rss.load(Relaxed)),
        rss_outage_max_mib: options.outage_secs.map(|_| mib(outage_max.load(Relaxed))),
        cpu_percent: 100.0 * cpu / elapsed,
        cpu: split,
        latency_ms: latency,
        baseline_datapoints_per_sec: baseline.as_ref().map(|b| b.datapoints_per_sec),
        ratio: baseline.as_ref().map(|b| rate / b.datapoints_per_sec),
        baseline,
    })
}

/// Runs the sweep, prints a table, and writes JSON and the chart.
pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<PointResult>> {
    match options.profile {
        Some(Profile::Node) => {
            node::run(&options).await?;
            return Ok(Vec::new());
        }
        Some(Profile::Busy) => {
            node::run_busy(&options).await?;
            return Ok(Vec::new());
        }
        None => {}
    }
    let mut results = Vec::new();
    for &connections in &options.connections {
        let cluster = match options.sink {
            SinkKind::Kafka => Some(MockCluster::new(options.brokers)?),
            SinkKind::Null => None,
        };
        let result = run_point(&options, connections, cluster.as_ref()).await?;
        println!(
            "connections={:>5} sink={:?} {:>12.0} datapoints/s {:>8.1} MiB/s  rss idle {:.1} MiB max {:.1} MiB{}  buffer hwm {:.1} MiB  cpu {:.0}%{}{}",
            result.connections,
            result.sink,
            result.datapoints_per_sec,
            result.mib_per_sec,
            result.rss_idle_mib,
            result.rss_max_mib,
            result
                .rss_outage_max_mib
                .map(|m| format!(" outage max {m:.1} MiB"))
                .unwrap_or_default(),
            result.collector.buffer_high_water_bytes as f64 / 1048576.0,
            result.cpu_percent,
            result
                .latency_ms
                .map(|l| format!("  latency p50 {} p99 {} max {} ms", l.p50, l.p99, l.max))
                .unwrap_or_default(),
            match (result.baseline_datapoints_per_sec, result.ratio) {
                (Some(b), Some(r)) => format!("  baseline {b:.0} datapoints/s  ratio {r:.2}"),
                _ => String::new(),
            }
        );
        results.push(result);
    }
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    if let Some(path) = &options.chart {
        chart(path, &results)?;
    }
    Ok(results)
}

fn chart(path: &std::path::Path, results: &[PointResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(450);
    let xs: Vec<f64> = results
        .iter()
        .map(|r| (r.connections.max(1) as f64).log10())
        .collect();
    let x_max = xs.iter().cloned().fold(0.5, f64::max) + 0.2;
    let draw = |area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
                title: &str,
                ys: Vec<f64>,
                color: RGBColor|
     -> anyhow::Result<()> {
        let y_max = ys.iter().cloned().fold(1.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("connections (log10)")
            .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
            .draw()?;
        chart.draw_series(LineSeries::new(
            xs.iter().cloned().zip(ys.iter().cloned()),
            &color,
        ))?;
        chart.draw_series(
            xs.iter()
                .cloned()
                .zip(ys)
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
        Ok(())
    };
    draw(
        &left,
        "throughput, MiB/s",
        results.iter().map(|r| r.mib_per_sec).collect(),
        BLUE,
    )?;
    draw(
        &right,
        "collector max RSS, MiB",
        results.iter().map(|r| r.rss_max_mib).collect(),
        RED,
    )?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        options: BenchOptions,
    }

    #[test]
    fn a_refreshed_template_encodes_what_the_encoder_would() {
        use clap::Parser as _;
        let options =
            Wrap::parse_from(["bench", "--records-per-block=3", "--datapoints=4"]).options;
        let template = records(&options, 7);
        let time_ms = now_ms();
        let mut block = BlockTemplate::new(&template, time_ms - 5_000).unwrap();
        let (mut seed, mut expected_seed) = (42u64, 42u64);
        for tick in 0..3 {
            assert!(block.refresh(time_ms + tick, &mut seed));
            let mut expected = template.clone();
            for record in &mut expected {
                vary(record, time_ms + tick, &mut expected_seed);
            }
            let mut encoded = Vec::new();
            for record in &expected {
                schema::datum::write_metric_list(&mut encoded, record);
            }
            assert_eq!(block.data, encoded, "tick {tick}");
        }
        // A time whose varint is longer needs a new template.
        assert!(!block.refresh(i64::MAX, &mut seed));
    }
}
