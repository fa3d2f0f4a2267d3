//! `simulator bench --profile node`: what a collector costs the node it
//! runs on, measured in one run against the goals (BENCHMARKS.md, "What a
//! node pays"):
//!
//! 1. idle: Kafka connected, no input; beside it, in the same window, a
//!    bare librdkafka producer connected to the same cluster;
//! 2. a busy node: 200 module connections at 50 datapoints/s each, agent
//!    polling of 50 containers, Kafka sink; with the memory buffer, then
//!    with the disk spool;
//! 3. CPU per datapoint at saturation by thread group, beside the bare
//!    producer sending the same messages;
//! 4. latency at 100,000 datapoints/s, with the default batch period and
//!    with the low-latency one;
//! 5. the figures already won: TCP → null, RSS with 1,000 connections, RSS
//!    during an outage.
//!
//! Every phase checks the collector's accounting: everything sent was
//! received and delivered, nothing dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::Serialize;

use super::threads::{self, CpuSplit, percent};
use super::{
    BenchOptions, PointResult, SinkKind, collector_args, collector_bin, collector_env, run_point,
};
use crate::process::{CollectorProcess, FinalCounts};
use crate::producer::{module_producer, producer};

/// Brokers of every mock cluster of the profile.
const BROKERS: i32 = 3;
/// The busy node: module connections, datapoints/s each, containers polled.
const MODULES: usize = 200;
const MODULE_RATE: f64 = 50.0;
const CONTAINERS: usize = 50;
/// Latency load: connections × blocks/s × 300 datapoints ≈ 100,000/s.
const LATENCY_CONNECTIONS: usize = 34;
const LATENCY_BLOCKS_PER_SEC: f64 = 10.0;
/// The low-latency setting measured: `kafka_produce_period_ms`.
pub const LOW_LATENCY_PERIOD_MS: u64 = 5;
/// The idle window starts this long after the collector's start: it
/// pages its code out 10 s after it (`collector/src/resident.rs`), a
/// once-only cost that is not idling.
const IDLE_AFTER: Duration = Duration::from_secs(12);

/// The whole profile.
#[derive(Debug, Clone, Serialize)]
pub struct NodeProfile {
    /// Idle, beside a bare producer.
    pub idle: Idle,
    /// The busy node, memory buffer then disk spool.
    pub busy: Vec<Busy>,
    /// CPU per datapoint at saturation.
    pub saturation: Saturation,
    /// Latency at about 100,000 datapoints/s.
    pub latency: Vec<LatencyPoint>,
    /// The figures already won.
    pub kept: Kept,
    /// Each goal and what was measured.
    pub goals: Vec<Goal>,
}

/// Idle: Kafka connected, no input.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    /// Seconds measured.
    pub seconds: f64,
    /// The collector's CPU, percent of one core.
    pub collector_percent: f64,
    /// The collector's CPU by thread, ns.
    pub collector: CpuSplit,
    /// The collector's RSS at the end, MiB.
    pub rss_mib: f64,
    /// The bare producer's threads' CPU, percent of one core.
    pub bare_producer_percent: f64,
    /// The bare producer's CPU by thread, ns.
    pub bare_producer: CpuSplit,
}

/// A busy node.
#[derive(Debug, Clone, Serialize)]
pub struct Busy {
    /// `memory` or `disk`.
    pub buffer: &'static str,
    /// Seconds measured.
    pub seconds: f64,
    /// Datapoints/s received over the window (TCP and agent).
    pub datapoints_per_sec: f64,
    /// CPU, percent of one core.
    pub cpu_percent: f64,
    /// CPU by thread, ns.
    pub cpu: CpuSplit,
    /// Highest and mean RSS over the window, MiB.
    pub rss_max_mib: f64,
    /// Mean RSS, MiB.
    pub rss_mean_mib: f64,
    /// The collector's final counts.
    pub collector: FinalCounts,
}

/// CPU per datapoint at saturation, and the bare producer's for the same
/// messages.
#[derive(Debug, Clone, Serialize)]
pub struct Saturation {
    /// Datapoints/s through the collector.
    pub datapoints_per_sec: f64,
    /// The collector's own threads, ns per datapoint.
    pub own_ns_per_datapoint: f64,
    /// The collector's librdkafka threads, ns per datapoint.
    pub librdkafka_ns_per_datapoint: f64,
    /// The bare producer's librdkafka threads, ns per datapoint.
    pub bare_librdkafka_ns_per_datapoint: f64,
    /// The bare producer's other threads (its sending thread, and
    /// rust-rdkafka's polling thread that serves its reports), ns per
    /// datapoint.
    pub bare_own_ns_per_datapoint: f64,
    /// Collector librdkafka / bare librdkafka, per datapoint.
    pub librdkafka_ratio: f64,
    /// The old throughput ratio, collector / bare producer.
    pub throughput_ratio: f64,
    /// The whole point.
    pub point: PointResult,
}

/// Latency at a paced load.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    /// `default` or `low-latency`.
    pub setting: &'static str,
    /// `kafka_produce_period_ms`.
    pub produce_period_ms: u64,
    /// Datapoints/s offered.
    pub datapoints_per_sec: f64,
    /// From a block's write to its message read from Kafka, ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Worst, ms.
    pub max_ms: u64,
    /// Records sampled.
    pub samples: usize,
    /// The collector's CPU, percent of one core: what the setting costs.
    pub cpu_percent: f64,
}

/// The figures already won.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    /// TCP → null sink, GiB/s of input.
    pub null_gib_per_sec: f64,
    /// Highest RSS with 1,000 connections (Kafka sink), MiB.
    pub rss_1000_connections_mib: f64,
    /// Highest RSS while every broker is down, MiB.
    pub outage_rss_mib: f64,
    /// The buffer bound, MiB.
    pub buffer_mib: f64,
}

/// One goal.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// What is measured.
    pub name: String,
    /// The figure.
    pub measured: f64,
    /// The goal.
    pub goal: f64,
    /// Its unit.
    pub unit: &'static str,
    /// Whether the goal is an upper bound (else a lower one).
    pub at_most: bool,
    /// Whether it is met.
    pub met: bool,
    /// Reported against the same line, not a goal of its own (the busy
    /// node with the disk spool).
    pub reported_only: bool,
}

impl Goal {
    fn new(
        name: impl Into<String>,
        measured: f64,
        goal: f64,
        unit: &'static str,
        at_most: bool,
    ) -> Self {
        let met = if at_most {
            measured <= goal
        } else {
            measured >= goal
        };
        Self {
            name: name.into(),
            measured,
            goal,
            unit,
            at_most,
            met,
            reported_only: false,
        }
    }

    fn reported_only(mut self) -> Self {
        self.reported_only = true;
        self
    }

    /// Measured against the goal, so that at most 1 is met either way.
    fn load(&self) -> f64 {
        if self.at_most {
            self.measured / self.goal
        } else {
            self.goal / self.measured.max(1e-9)
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the profile, prints the goals, and writes the JSON and the chart.
pub async fn run(options: &BenchOptions) -> anyhow::Result<NodeProfile> {
    println!("node profile: idle, {} s", options.idle_secs);
    let idle = idle(options).await.context("idle")?;
    let mut busy = Vec::new();
    for disk in [false, true] {
        println!(
            "node profile: busy node, {} buffer, {} s",
            if disk { "disk" } else { "memory" },
            options.busy_secs
        );
        busy.push(busy_node(options, disk).await.context("busy node")?);
    }
    println!("node profile: saturation, {} s", options.seconds);
    let saturation = saturation(options).await.context("saturation")?;
    let mut latency = Vec::new();
    for period in [None, Some(LOW_LATENCY_PERIOD_MS)] {
        println!("node profile: latency, period {period:?} ms");
        latency.push(latency_point(options, period).await.context("latency")?);
    }
    println!("node profile: the figures already won");
    let kept = kept(options).await.context("kept figures")?;
    let goals = goals(&idle, &busy, &saturation, &latency, &kept);
    for goal in &goals {
        println!(
            "{:<58} {:>10.3} {:<8} goal {} {:<8} {}",
            goal.name,
            goal.measured,
            goal.unit,
            if goal.at_most { "≤" } else { "≥" },
            goal.goal,
            match (goal.met, goal.reported_only) {
                (_, true) => "reported",
                (true, false) => "met",
                (false, false) => "NOT MET",
            }
        );
    }
    let profile = NodeProfile {
        idle,
        busy,
        saturation,
        latency,
        kept,
        goals,
    };
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&profile)?)?;
    }
    if let Some(path) = &options.chart {
        chart(path, &profile.goals)?;
    }
    Ok(profile)
}

/// The busy node alone, memory buffer: prints its CPU and RSS, and writes
/// them as JSON.
pub async fn run_busy(options: &BenchOptions) -> anyhow::Result<Busy> {
    let busy = busy_node(options, false).await.context("busy node")?;
    println!(
        "busy node, memory buffer, {:.0} s: {:.0} datapoints/s, CPU {:.3} % of one core, RSS max {:.1} MiB mean {:.1} MiB",
        busy.seconds,
        busy.datapoints_per_sec,
        busy.cpu_percent,
        busy.rss_max_mib,
        busy.rss_mean_mib
    );
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&busy)?)?;
    }
    Ok(busy)
}

fn goals(
    idle: &Idle,
    busy: &[Busy],
    saturation: &Saturation,
    latency: &[LatencyPoint],
    kept: &Kept,
) -> Vec<Goal> {
    let mut goals = vec![
        Goal::new(
            "idle: CPU, % of one core",
            idle.collector_percent,
            0.1,
            "%",
            true,
        ),
        Goal::new(
            "idle: CPU against the bare producer's, same window",
            idle.collector_percent / idle.bare_producer_percent.max(1e-6),
            1.5,
            "×",
            true,
        ),
        Goal::new("idle: RSS", idle.rss_mib, 12.0, "MiB", true),
    ];
    for b in busy {
        let reported = |goal: Goal| {
            if b.buffer == "disk" {
                goal.reported_only()
            } else {
                goal
            }
        };
        goals.push(reported(Goal::new(
            format!("busy node, {} buffer: CPU, % of one core", b.buffer),
            b.cpu_percent,
            0.5,
            "%",
            true,
        )));
        goals.push(reported(Goal::new(
            format!("busy node, {} buffer: highest RSS", b.buffer),
            b.rss_max_mib,
            24.0,
            "MiB",
            true,
        )));
    }
    goals.push(Goal::new(
        "saturation: collector's own threads per datapoint",
        saturation.own_ns_per_datapoint,
        25.0,
        "ns",
        true,
    ));
    goals.push(Goal::new(
        "saturation: librdkafka per datapoint against the bare producer's",
        saturation.librdkafka_ratio,
        1.1,
        "×",
        true,
    ));
    if let Some(low) = latency.iter().find(|l| l.setting == "low-latency") {
        goals.push(Goal::new(
            format!(
                "latency p99, {} datapoints/s, low-latency setting",
                low.datapoints_per_sec.round()
            ),
            low.p99_ms as f64,
            20.0,
            "ms",
            true,
        ));
    }
    goals.push(Goal::new(
        "TCP → null",
        kept.null_gib_per_sec,
        2.5,
        "GiB/s",
        false,
    ));
    goals.push(Goal::new(
        "RSS with 1,000 connections",
        kept.rss_1000_connections_mib,
        64.0,
        "MiB",
        true,
    ));
    goals.push(Goal::new(
        "RSS during an outage (buffer + 32 MiB)",
        kept.outage_rss_mib,
        kept.buffer_mib + 32.0,
        "MiB",
        true,
    ));
    goals
}

/// A mock cluster with the profile's brokers.
fn mock_cluster() -> anyhow::Result<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>
{
    Ok(MockCluster::new(BROKERS)?)
}

/// Sends one block and waits until Kafka has acknowledged it: the
/// collector's producer is then connected. Returns its datapoints.
async fn connect(collector: &CollectorProcess) -> anyhow::Result<u64> {
    let addr: SocketAddr = collector.input.parse()?;
    let sent = producer(addr, "warm-up").blocks(1).run().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = collector.metric("collector_delivered_datapoints_total")?;
        if delivered >= sent.datapoints {
            return Ok(sent.datapoints);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the warm-up block was not delivered within 60 s; the collector's last lines:\n{}",
                collector.recent_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the collector and checks that everything it received was
/// delivered.
async fn stop_balanced(collector: CollectorProcess) -> anyhow::Result<FinalCounts> {
    let counts = tokio::task::spawn_blocking(move || collector.stop()).await??;
    ensure!(
        counts.dropped == 0 && counts.delivered + counts.served == counts.received,
        "the collector did not deliver everything: {counts:?}"
    );
    Ok(counts)
}

async fn idle(options: &BenchOptions) -> anyhow::Result<Idle> {
    let cluster = mock_cluster()?;
    let bootstrap = cluster.bootstrap_servers();
    let started = tokio::time::Instant::now();
    let collector = CollectorProcess::start(
        &collector_bin(options),
        &collector_args(options, Some(&bootstrap)),
        &collector_env(options),
    )?;
    connect(&collector).await?;
    // The bare producer, connected the same way: one message acknowledged.
    // It has no thread of its own beside librdkafka's (nothing to poll).
    let me = std::process::id();
    let before = threads::sample(me)?;
    let bare: BaseProducer = bare_config(&bootstrap).create()?;
    bare.send(BaseRecord::<(), _>::to("metrics-baseline").payload(&[0u8; 64][..]))
        .map_err(|(e, _)| e)?;
    bare.flush(Duration::from_secs(30))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::sleep_until(started + IDLE_AFTER).await;
    let pid = collector.pid();
    let (collector_start, bare_start) = (threads::sample(pid)?, threads::sample(me)?);
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(options.idle_secs)).await;
    let seconds = start.elapsed().as_secs_f64();
    let collector_cpu = threads::sample(pid)?.since(&collector_start, |_| true);
    let bare_cpu = threads::sample(me)?.since(&bare_start, |tid| before.tids().all(|t| t != tid));
    let rss_mib = collector.rss_bytes() as f64 / MIB;
    drop(bare);
    stop_balanced(collector).await?;
    Ok(Idle {
        seconds,
        collector_percent: percent(collector_cpu.total_ns(), seconds),
        collector: collector_cpu,
        rss_mib,
        bare_producer_percent: percent(bare_cpu.total_ns(), seconds),
        bare_producer: bare_cpu,
    })
}

/// The collector's producer settings, for the bare producer.
fn bare_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.codec", "snappy")
        .set("linger.ms", "5");
    config
}

async fn busy_node(options: &BenchOptions, disk: bool) -> anyhow::Result<Busy> {
    let cluster = mock_cluster()?;
    let agent = crate::agent::mesos_agent()
        .containers(CONTAINERS)
        .run()
        .await?;
    let mut args = collector_args(options, Some(&cluster.bootstrap_servers()));
    args.retain(|a| a != "--agent-polling=false");
    args.push("--agent-polling=true".into());
    args.push(format!("--agent-url={}", agent.url()));
    let mut env = collector_env(options);
    let spool = disk.then(|| {
        std::env::temp_dir().join(format!(
            "collector-bench-spool-{}-{}",
            std::process::id(),
            super::now_ms()
        ))
    });
    if let Some(dir) = &spool {
        env.push(("BUFFER_TYPE".into(), "disk".into()));
        env.push(("SPOOL_DIR".into(), dir.display().to_string()));
    }
    let result = busy_run(options, &args, &env, disk).await;
    if let Some(dir) = spool {
        let _ = std::fs::remove_dir_all(dir);
    }
    agent.stop();
    result
}

async fn busy_run(
    options: &BenchOptions,
    args: &[String],
    env: &[(String, String)],
    disk: bool,
) -> anyhow::Result<Busy> {
    let collector = CollectorProcess::start(&collector_bin(options), args, env)?;
    let warm_up = connect(&collector).await?;
    let addr: SocketAddr = collector.input.parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let modules: Vec<_> = (0..MODULES)
        .map(|i| {
            tokio::spawn(
                module_producer(addr, format!("node-{i}"))
                    .rate(MODULE_RATE)
                    .run(stop.clone()),
            )
        })
        .collect();
    // Connections made and the first blocks flushed (a module flushes at
    // 100 datapoints: every 2 s at 50/s), and a first agent poll.
    tokio::time::sleep(Duration::from_secs(options.busy_secs.min(10))).await;
    let pid = collector.pid();
    let rss = RssSampler::start(pid);
    let received = |c: &CollectorProcess| c.metric("collector_received_datapoints_total{");
    let (start_threads, start_received) = (threads::sample(pid)?, received(&collector)?);
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(options.busy_secs)).await;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = threads::sample(pid)?.since(&start_threads, |_| true);
    let window_received = received(&collector)?.saturating_sub(start_received);
    let (rss_max, rss_mean) = rss.stop();
    stop.store(true, Relaxed);
    let (mut sent, mut dropped) = (0, 0);
    for module in modules {
        let report = module.await?;
        sent += report.sent;
        dropped += report.dropped;
    }
    ensure!(
        sent > 0 && dropped == 0,
        "the modules sent {sent} datapoints and dropped {dropped}"
    );
    let tcp = |c: &CollectorProcess| c.metric("collector_received_datapoints_total{input=\"tcp\"}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut over_tcp = tcp(&collector)?;
    while over_tcp < sent + warm_up && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        over_tcp = tcp(&collector)?;
    }
    ensure!(
        over_tcp == sent + warm_up,
        "the modules sent {sent} datapoints (and the warm-up {warm_up}), the collector received {over_tcp} over TCP"
    );
    let counts = stop_balanced(collector).await?;
    Ok(Busy {
        buffer: if disk { "disk" } else { "memory" },
        seconds,
        datapoints_per_sec: window_received as f64 / seconds,
        cpu_percent: percent(cpu.total_ns(), seconds),
        cpu,
        rss_max_mib: rss_max as f64 / MIB,
        rss_mean_mib: rss_mean / MIB,
        collector: counts,
    })
}

/// Samples a process's RSS every 100 ms: the highest and the mean.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, f64)>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut max, mut sum, mut n) = (0u64, 0u64, 0u64);
            while !flag.load(Relaxed) {
                let rss = crate::process::rss_of(pid);
                max = max.max(rss);
                sum += rss;
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (max, sum as f64 / n.max(1) as f64)
        });
        Self { stop, thread }
    }

    fn stop(self) -> (u64, f64) {
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A point of the profile: `options` with these settings.
fn point_options(
    options: &BenchOptions,
    sink: SinkKind,
    seconds: u64,
    rate: f64,
    env: &[(&str, String)],
) -> BenchOptions {
    let mut point = options.clone();
    point.profile = None;
    point.sink = sink;
    point.seconds = seconds;
    point.rate = rate;
    point.brokers = BROKERS;
    point.outage_secs = None;
    point.stagger = rate > 0.0;
    point
        .collector_env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    point
}

async fn saturation(options: &BenchOptions) -> anyhow::Result<Saturation> {
    let cluster = mock_cluster()?;
    let point = point_options(options, SinkKind::Kafka, options.seconds, 0.0, &[]);
    let result = run_point(&point, 4, Some(&cluster)).await?;
    let baseline = result.baseline.clone().context("the baseline ran")?;
    // The threads alive at the end hold what the process spent (the
    // clock-tick total counts exited threads too).
    let ticks = result.cpu_percent / 100.0 * result.seconds * 1e9;
    ensure!(
        result.cpu.total_ns() as f64 >= 0.9 * ticks,
        "the collector's threads account for {} ns of the {ticks:.0} ns it used",
        result.cpu.total_ns()
    );
    let per = |ns: u64, datapoints: u64| ns as f64 / datapoints.max(1) as f64;
    let own = per(result.cpu.own_ns, result.datapoints_sent);
    let rdk = per(result.cpu.librdkafka_ns, result.datapoints_sent);
    let bare_rdk = per(baseline.cpu.librdkafka_ns, baseline.datapoints);
    Ok(Saturation {
        datapoints_per_sec: result.datapoints_per_sec,
        own_ns_per_datapoint: own,
        librdkafka_ns_per_datapoint: rdk,
        bare_librdkafka_ns_per_datapoint: bare_rdk,
        bare_own_ns_per_datapoint: per(baseline.cpu.own_ns, baseline.datapoints),
        librdkafka_ratio: rdk / bare_rdk.max(1e-9),
        throughput_ratio: result.ratio.unwrap_or(0.0),
        point: result,
    })
}

async fn latency_point(
    options: &BenchOptions,
    period_ms: Option<u64>,
) -> anyhow::Result<LatencyPoint> {
    let cluster = mock_cluster()?;
    let env: Vec<(&str, String)> = period_ms
        .map(|p| ("KAFKA_PRODUCE_PERIOD_MS", p.to_string()))
        .into_iter()
        .collect();
    let point = point_options(
        options,
        SinkKind::Kafka,
        options.seconds.max(5),
        LATENCY_BLOCKS_PER_SEC,
        &env,
    );
    let result = run_point(&point, LATENCY_CONNECTIONS, Some(&cluster)).await?;
    let latency = result.latency_ms.context("latency sampled")?;
    ensure!(latency.samples > 0, "no latency sample");
    Ok(LatencyPoint {
        setting: if period_ms.is_some() {
            "low-latency"
        } else {
            "default"
        },
        produce_period_ms: period_ms.unwrap_or(1000),
        datapoints_per_sec: result.datapoints_per_sec,
        p50_ms: latency.p50,
        p99_ms: latency.p99,
        max_ms: latency.max,
        samples: latency.samples,
        cpu_percent: result.cpu_percent,
    })
}

async fn kept(options: &BenchOptions) -> anyhow::Result<Kept> {
    let null = run_point(
        &point_options(options, SinkKind::Null, options.seconds, 0.0, &[]),
        4,
        None,
    )
    .await?;
    let cluster = mock_cluster()?;
    let thousand = run_point(
        &point_options(options, SinkKind::Kafka, options.seconds, 10.0, &[]),
        1000,
        Some(&cluster),
    )
    .await?;
    drop(cluster);
    let cluster = mock_cluster()?;
    let mut outage = point_options(options, SinkKind::Kafka, options.seconds * 4, 100.0, &[]);
    outage.outage_secs = Some(options.seconds * 3);
    let outage = run_point(&outage, 4, Some(&cluster)).await?;
    Ok(Kept {
        null_gib_per_sec: null.mib_per_sec / 1024.0,
        rss_1000_connections_mib: thousand.rss_max_mib,
        outage_rss_mib: outage.rss_outage_max_mib.unwrap_or(0.0),
        buffer_mib: options.buffer_max_bytes as f64 / MIB,
    })
}

/// Each goal as measured / goal (goal / measured for a lower bound): a bar
/// short of the line at 1 is met.
fn chart(path: &std::path::Path, goals: &[Goal]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let n = goals.len();
    let height = 80 + 40 * n as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = goals.iter().map(Goal::load).fold(1.2, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "what a node pays: measured / goal, or goal / measured for a lower bound (at most 1 is met)",
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(560)
        .build_cartesian_2d(0.0..x_max, (0..n).into_segmented())?;
    let labels: Vec<String> = goals
        .iter()
        .map(|g| {
            let bound = if g.at_most { "≤" } else { "≥" };
            let kind = if g.reported_only {
                "reported beside"
            } else {
                "goal"
            };
            format!(
                "{}: {:.3} {} ({kind} {bound} {} {})",
                g.name, g.measured, g.unit, g.goal, g.unit
            )
        })
        .collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_style(("sans-serif", 13))
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) if *i < n => labels[n - 1 - *i].clone(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(goals.iter().enumerate().map(|(i, goal)| {
        let y = n - 1 - i;
        let color = match (goal.met, goal.reported_only) {
            (_, true) => BLUE.mix(0.5),
            (true, false) => GREEN.mix(0.7),
            (false, false) => RED.mix(0.7),
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(y)),
                (goal.load(), SegmentValue::Exact(y + 1)),
            ],
            color.filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    chart.draw_series(LineSeries::new(
        [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
        BLACK.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}
