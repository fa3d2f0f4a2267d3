//! `simulator up`: a whole cluster in one process. Mesos-DNS, a Mesos agent,
//! the Kafka scheduler, the embedded broker (librdkafka's mock cluster),
//! module producers, the collector and the sample-producer (both as
//! libraries), and the verifier. It shows live progress, and with a
//! duration it ends with a verification report and an exit code.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use collector::config::{Config, Listen};
use collector::discovery::BrokerSource;
use collector::sample::{SampleConfig, SampleReport};
use collector::sources::agent::poller::AgentAddress;
use collector::stats::Accounting;
use rdkafka::mocking::MockCluster;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::agent::mesos_agent;
use crate::dns::mesos_dns;
use crate::producer::module_producer;
use crate::scheduler::kafka_scheduler;
use crate::statsd_module::{
    Control as StatsdControl, check_kafka as check_statsd_kafka,
    check_prometheus as check_statsd_prometheus, statsd_module,
};
use crate::verify::{CollectorCounts, Percentiles, Verifier, check_conservation};

/// A fault script to play during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every broker down for 20 s (or a third of the run), then back.
    BrokerOutage,
    /// The scheduler and Mesos-DNS move the brokers to a new cluster.
    SchedulerMove,
    /// A partner connects to the collector's partner output and never reads.
    PartnerStall,
}

/// Parses `20s`, `2m`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 20s, 2m or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s or m)")),
    }
}

/// The generation of the mesos module on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
pub enum ModuleGeneration {
    /// DC/OS 1.9 to 1.11: Avro over TCP to the collector's input.
    #[default]
    #[value(name = "1.11")]
    #[serde(rename = "1.11")]
    V1_11,
    /// DC/OS 1.12 and later: each container registered with the statsd
    /// registration API, its task's statsd on its own port.
    #[value(name = "1.12")]
    #[serde(rename = "1.12")]
    V1_12,
}

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct UpOptions {
    /// The mesos module's generation: 1.11 (module producers over TCP) or
    /// 1.12 (container registrations and per-container statsd).
    #[arg(long, value_enum, default_value = "1.11")]
    pub module: ModuleGeneration,
    /// Stop after this long and verify (e.g. 20s); without it, run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Module producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Containers on the agent.
    #[arg(long, default_value_t = 6)]
    pub containers: usize,
    /// Datapoints per second from each module producer (they flush a block
    /// every 100 datapoints or 10 s, as the module does).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Brokers in the embedded cluster.
    #[arg(long, default_value_t = 3)]
    pub brokers: i32,
    /// A fault script to play.
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,
    /// No live progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// The verification report.
#[derive(Debug, Clone, Serialize)]
pub struct UpReport {
    /// Seconds run.
    pub seconds: f64,
    /// Datapoints the module producers generated.
    pub producers_generated: u64,
    /// Datapoints the module producers dropped and counted (not connected,
    /// over their 256 KiB pending limit).
    pub producers_dropped: u64,
    /// Datapoints the module producers sent.
    pub producers_sent: u64,
    /// Datapoints of those the verifier found in Kafka (distinct records).
    pub producers_verified: u64,
    /// Records the verifier saw twice.
    pub duplicates: u64,
    /// The collector's final accounting.
    pub collector: Accounting,
    /// Times the collector switched to a new broker set.
    pub producer_switches: u64,
    /// Blocks dropped from slow partners' queues.
    pub partner_blocks_dropped: u64,
    /// Datapoints in Kafka's metrics topics (all sources, distinct).
    pub kafka_metrics_datapoints: u64,
    /// The sample-producer's report.
    pub sample_producer: SampleReport,
    /// Datapoints the verifier saw on the sample topic.
    pub sample_verified: u64,
    /// End-to-end latency of the producers' records.
    pub latency_ms: Percentiles,
    /// The containers Prometheus serves with their task's name:
    /// `(container id, task name)`.
    pub tasks_served: Vec<(String, String)>,
    /// With `--module 1.12`: the containers registered, and what their
    /// tasks sent.
    pub statsd: Option<StatsdSummary>,
    /// Every failed check, in words; empty when conservation holds.
    pub failures: Vec<String>,
}

/// What the 1.12 module and its tasks did, and what was checked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsdSummary {
    /// Containers registered (201).
    pub registered: usize,
    /// Of those, deregistered at the end (202).
    pub deregistered: usize,
    /// Packets their tasks sent.
    pub packets: u64,
    /// Packets the collector read.
    pub packets_read: u64,
    /// Series whose total was checked in Kafka.
    pub series_checked: usize,
}

impl UpReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn addrs(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>) -> Vec<SocketAddr> {
    cluster
        .bootstrap_servers()
        .split(',')
        .filter_map(|b| b.parse().ok())
        .collect()
}

/// Runs the cluster. `interrupt` ends a run without a duration.
pub async fn run(
    options: UpOptions,
    interrupt: impl std::future::Future<Output = ()>,
) -> anyhow::Result<UpReport> {
    let started = Instant::now();
    let kafka = MockCluster::new(options.brokers).context("starting the embedded broker")?;
    let dns = mesos_dns().run().await.context("starting Mesos-DNS")?;
    let scheduler = kafka_scheduler("kafka").run().await?;
    scheduler.set_brokers(&addrs(&kafka));
    dns.set_scheduler("kafka", Ipv4Addr::LOCALHOST, scheduler.addr.port());
    dns.set_brokers(
        "kafka",
        &vec![Ipv4Addr::LOCALHOST; options.brokers as usize],
    );
    let agent = mesos_agent()
        .containers(options.containers)
        .frameworks(2)
        .run()
        .await?;
    // A directory of this run's own: runs side by side in one process
    // (the tests) must not share or remove each other's socket.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let statsd_dir = std::env::temp_dir().join(format!(
        "simulator-up-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Relaxed)
    ));
    let statsd_socket = statsd_dir.join("dcos_statsd.sock");

    let config = Config {
        listen_endpoint: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        partner_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        input_limit_amount_kbytes: 0,
        global_limit_amount_kbytes: 0,
        kafka_framework: "kafka".into(),
        dns_server: Some(dns.addr),
        kafka_rediscover_secs: 2,
        kafka_produce_period_ms: 200,
        agent_url: Some(agent.url()),
        agent_poll_period: 2,
        shutdown_grace_secs: 20,
        // Every metric of the node served where operators read it: the
        // producers' sequence tag is for the Kafka accounting only.
        prometheus_listen: Listen::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        metrics_api_listen: Listen::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        store_drop_tags: vec![crate::producer::SEQ_TAG.to_owned()],
        node_poll_period: 10,
        // The 1.12 module registers containers on a unix socket.
        statsd_control_listen: match options.module {
            ModuleGeneration::V1_11 => Listen::Off,
            ModuleGeneration::V1_12 => Listen::Unix(statsd_socket.clone()),
        },
        statsd_flush_secs: 2,
        // A partner that stops reading fills a small queue within seconds.
        partner_buffer_kbytes: if options.scenario == Some(Scenario::PartnerStall) {
            64
        } else {
            Config::default().partner_buffer_kbytes
        },
        ..Config::default()
    };
    let app = collector::App::bind(config).await?;
    let (input, stats, brokers) = (app.ingest_addr(), app.stats(), app.broker_state());
    let prometheus = app
        .prometheus_addr()
        .ok_or_else(|| anyhow::anyhow!("the Prometheus listener is on"))?;
    let metrics_api = app.metrics_api_addr().unwrap_or_default();
    let partner_addr = app.partner_addr();
    let mut stalled_partner = None;
    let stop_collector = CancellationToken::new();
    let collector_task = tokio::spawn(app.run(stop_collector.clone().cancelled_owned()));

    let stop_sample = CancellationToken::new();
    let sample_task = tokio::spawn(collector::sample::run(
        SampleConfig {
            brokers: Some(BrokerSource::Framework {
                name: "kafka".into(),
                scheduler_url: None,
                dns_server: Some(dns.addr),
                credentials: Default::default(),
                tls: false,
            }),
            topic: "sample_metrics".into(),
            period: Duration::from_secs(1),
            agent: AgentAddress::Url(agent.url()),
            credentials: Default::default(),
            agent_timeout: Duration::from_secs(5),
            file_dir: None,
            max_pending: SampleConfig::MAX_PENDING,
            max_pending_bytes: SampleConfig::MAX_PENDING_BYTES,
            max_message_bytes: SampleConfig::MAX_MESSAGE_BYTES,
            max_body_bytes: SampleConfig::MAX_BODY_BYTES,
            compression: "snappy".into(),
            security: Default::default(),
            reload: Default::default(),
            librdkafka: Vec::new(),
        },
        stop_sample.clone(),
    ));

    let stop_producers = Arc::new(AtomicBool::new(false));
    let producers = match options.module {
        ModuleGeneration::V1_11 => options.producers,
        ModuleGeneration::V1_12 => 0,
    };
    // The 1.12 module registers the agent's containers (their framework is
    // their topic), and deregisters two at the end.
    let statsd_module = (options.module == ModuleGeneration::V1_12).then(|| {
        tokio::spawn(
            statsd_module(
                StatsdControl::Unix(statsd_socket.clone()),
                agent.container_ids(),
            )
            .rate(10.0)
            .deregister(2)
            .run(stop_producers.clone()),
        )
    });
    let producer_tasks: Vec<_> = (0..producers)
        .map(|i| {
            let module = module_producer(input, format!("module-{i}"))
                .containers(3)
                .rate(options.rate);
            tokio::spawn(module.run(stop_producers.clone()))
        })
        .collect();
    let mut verifier = Verifier::start(
        &kafka.bootstrap_servers(),
        &crate::verify::metrics_topic_prefix(),
        "sample_metrics",
        Default::default(),
    )?;
    println!(
        "simulator up: collector input {input}, Mesos-DNS {}, scheduler {}, agent {}, brokers {}",
        dns.addr,
        scheduler.url(),
        agent.url(),
        kafka.bootstrap_servers()
    );
    println!(
        "  Prometheus: curl -s http://{prometheus}/metrics | grep task_name; v0 API: curl -s http://{metrics_api}/v0/containers"
    );

    let mut moved: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>> = None;
    let scenario_at = options
        .duration
        .map(|d| d / 3)
        .unwrap_or(Duration::from_secs(20));
    let outage = options
        .duration
        .map(|d| (d / 3).min(Duration::from_secs(20)))
        .unwrap_or(Duration::from_secs(20));
    let mut scenario_state = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(interrupt);
    loop {
        tokio::select! {
            _ = &mut interrupt => break,
            _ = tick.tick() => {}
        }
        let elapsed = started.elapsed();
        if options.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        match (options.scenario, scenario_state) {
            (Some(Scenario::BrokerOutage), 0) if elapsed >= scenario_at => {
                println!("scenario: every broker down for {outage:?}");
                for broker in 1..=options.brokers {
                    kafka.broker_down(broker)?;
                }
                scenario_state = 1;
            }
            (Some(Scenario::BrokerOutage), 1) if elapsed >= scenario_at + outage => {
                println!("scenario: brokers back up");
                for broker in 1..=options.brokers {
                    kafka.broker_up(broker)?;
                }
                scenario_state = 2;
            }
            (Some(Scenario::PartnerStall), 0) if elapsed >= scenario_at => {
                println!("scenario: a partner connects and never reads");
                // A small receive window, so that what the collector sends
                // piles up in its queue rather than in socket buffers.
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_recv_buffer_size(4096)?;
                stalled_partner = Some(socket.connect(partner_addr).await?);
                scenario_state = 1;
            }
            (Some(Scenario::SchedulerMove), 0) if elapsed >= scenario_at => {
                let cluster = MockCluster::new(options.brokers)?;
                println!(
                    "scenario: the scheduler moves the brokers to {}",
                    cluster.bootstrap_servers()
                );
                scheduler.set_brokers(&addrs(&cluster));
                verifier.add_cluster(&cluster.bootstrap_servers())?;
                moved = Some(cluster);
                scenario_state = 1;
            }
            _ => {}
        }
        if !options.quiet {
            let accounting = stats.accounting();
            let seen = verifier.seen();
            let latency = seen.latency();
            let seen = seen.producer_datapoints();
            let state = brokers.lock().map(|s| s.clone()).unwrap_or_default();
            println!(
                "[{:>4}s] received {:>9} dp | delivered {:>9} | in flight {:>7} | dropped {:>5} | verified {:>9} | latency p50 {} ms p99 {} ms | brokers: {}",
                elapsed.as_secs(),
                accounting.received.datapoints,
                accounting.delivered.datapoints,
                accounting.in_flight().datapoints,
                accounting.dropped_total().datapoints,
                seen,
                latency.p50,
                latency.p99,
                match (&state.current, &state.last_error, state.all_brokers_down) {
                    (_, _, true) => "ALL DOWN".to_owned(),
                    (Some(current), _, _) =>
                        format!("{} via {}", current.brokers.len(), current.method),
                    (None, Some(error), _) => format!("not found: {error}"),
                    (None, None, _) => "discovering".to_owned(),
                }
            );
        }
    }

    // Every container the agent runs is served with its task's name.
    let tasks_served = served_task_names(prometheus).await;
    let containers = agent.container_count();

    // Stop the sources, then the collector (which drains), then the verifier.
    stop_producers.store(true, Relaxed);
    let (mut producers_sent, mut producers_dropped, mut producers_generated) = (0, 0, 0);
    for task in producer_tasks {
        let report = task.await?;
        producers_sent += report.sent;
        producers_dropped += report.dropped;
        producers_generated += report.generated;
    }
    let mut failures = Vec::new();
    let statsd_report = match statsd_module {
        Some(task) => Some(task.await?),
        None => None,
    };
    if let Some(report) = &statsd_report {
        failures.extend(report.failed_calls.iter().cloned());
        // The still registered containers' last values reach Prometheus
        // at their next flush.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut differences = Vec::new();
        while Instant::now() < deadline {
            let text = match reqwest::get(format!("http://{prometheus}/metrics")).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            differences = check_statsd_prometheus(report, &text);
            if differences.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        failures.extend(differences);
    }
    stop_sample.cancel();
    let sample_report = sample_task.await?;
    let partner_drops = stats.partner_blocks_dropped.load(Relaxed);
    drop(stalled_partner);
    stop_collector.cancel();
    let accounting = collector_task.await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let seen = verifier.seen();
        if seen.datapoints - seen.sample_datapoints >= accounting.delivered.datapoints
            && seen.sample_datapoints >= sample_report.datapoints_delivered
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = verifier.stop();
    let latency = seen.latency();
    drop(moved);
    if options.module == ModuleGeneration::V1_12 {
        let _ = std::fs::remove_dir_all(&statsd_dir);
    }

    let producers_verified = seen.producer_datapoints();
    let duplicates: u64 = seen.producers.values().map(|p| p.duplicates).sum();
    let dropped = accounting.dropped_total().datapoints;
    // The collector's identity, Kafka against the collector's count, no
    // duplicates: the checks the cluster's verifier makes too.
    failures.extend(check_conservation(
        &CollectorCounts::from(&accounting),
        &seen,
    ));
    let statsd = statsd_report.map(|report| {
        failures.extend(check_statsd_kafka(
            &report,
            &seen.statsd,
            &crate::verify::metrics_topic_prefix(),
        ));
        let packets_read = stats.statsd_packets.load(Relaxed);
        if packets_read != report.packets() {
            failures.push(format!(
                "statsd: the tasks sent {} packets, the collector read {packets_read} (the kernel dropped {})",
                report.packets(),
                stats.statsd_packets_dropped_by_kernel.load(Relaxed)
            ));
        }
        StatsdSummary {
            registered: report.containers.iter().filter(|c| c.status == 201).count(),
            deregistered: report.containers.iter().filter(|c| c.deregistered).count(),
            packets: report.packets(),
            packets_read,
            series_checked: report.containers.iter().map(|c| c.expected.len()).sum(),
        }
    });
    if statsd.as_ref().is_some_and(|s| s.registered != containers) {
        failures.push(format!(
            "statsd: {} of the agent's {containers} containers registered",
            statsd.as_ref().map_or(0, |s| s.registered)
        ));
    }
    if !accounting.balanced() {
        failures.push(format!(
            "collector identity broken (records): {accounting:?}"
        ));
    }
    if producers_generated != producers_sent + producers_dropped {
        failures.push(format!(
            "module producers generated {producers_generated} but sent {producers_sent} and dropped {producers_dropped}"
        ));
    }
    if producers_sent > producers_verified + dropped {
        failures.push(format!(
            "{} producer datapoints lost without a count: sent {producers_sent}, in Kafka {producers_verified}, counted drops {dropped}",
            producers_sent - producers_verified - dropped
        ));
    }
    let kafka_metrics = seen.datapoints - seen.sample_datapoints;
    if seen.sample_datapoints < sample_report.datapoints_delivered {
        failures.push(format!(
            "sample topic holds {} datapoints, the sample-producer delivered {}",
            seen.sample_datapoints, sample_report.datapoints_delivered
        ));
    }
    let sent_anything = producers_sent > 0 || statsd.as_ref().is_some_and(|s| s.packets > 0);
    if !sent_anything || accounting.delivered.datapoints == 0 {
        failures.push("nothing flowed".into());
    }
    let served_containers: std::collections::BTreeSet<&String> = tasks_served
        .iter()
        .map(|(container, _)| container)
        .collect();
    if served_containers.len() != containers {
        failures.push(format!(
            "Prometheus serves {} containers with their task's name ({tasks_served:?}); the agent runs {containers}",
            served_containers.len()
        ));
    }
    Ok(UpReport {
        seconds: started.elapsed().as_secs_f64(),
        producers_generated,
        producers_dropped,
        producers_sent,
        producers_verified,
        duplicates,
        collector: accounting,
        producer_switches: stats.producer_switches.load(Relaxed),
        partner_blocks_dropped: partner_drops,
        kafka_metrics_datapoints: kafka_metrics,
        sample_producer: sample_report,
        sample_verified: seen.sample_datapoints,
        latency_ms: latency,
        tasks_served: tasks_served.into_iter().collect(),
        statsd,
        failures,
    })
}

/// The containers whose metrics a scrape of the collector's Prometheus
/// listener at `addr` holds with their task's name: `(container id, task
/// name)`.
async fn served_task_names(addr: SocketAddr) -> std::collections::BTreeSet<(String, String)> {
    let Ok(response) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return Default::default();
    };
    let text = response.text().await.unwrap_or_default();
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)?
            .split('"')
            .next()
            .map(str::to_owned)
    };
    text.lines()
        .filter(|l| l.starts_with("dcos_metrics_container_"))
        .filter_map(|l| Some((label(l, "container_id")?, label(l, "task_name")?)))
        .filter(|(container, task)| !container.is_empty() && !task.is_empty())
        .collect()
}

/// Prints the report for a person.
pub fn print_report(report: &UpReport) {
    println!("\n=== verification report ({:.0} s) ===", report.seconds);
    println!(
        "Prometheus: {} containers served with their task's name",
        report.tasks_served.len()
    );
    println!(
        "module producers: generated {} datapoints = sent {} + dropped {} (their counted drops); {} in Kafka, {} duplicated records",
        report.producers_generated,
        report.producers_sent,
        report.producers_dropped,
        report.producers_verified,
        report.duplicates
    );
    let c = &report.collector;
    println!(
        "collector: received {} = delivered {} + dropped {} ({})",
        c.received.datapoints,
        c.delivered.datapoints,
        c.dropped_total().datapoints,
        c.dropped
            .iter()
            .filter(|(_, n)| n.datapoints > 0)
            .map(|(r, n)| format!("{}={}", r.as_str(), n.datapoints))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "kafka metrics topics: {} datapoints",
        report.kafka_metrics_datapoints
    );
    if let Some(statsd) = &report.statsd {
        println!(
            "statsd (1.12 module): {} containers registered, {} deregistered at the end; {} packets sent, {} read; {} series' totals checked in Kafka and Prometheus",
            statsd.registered,
            statsd.deregistered,
            statsd.packets,
            statsd.packets_read,
            statsd.series_checked
        );
    }
    println!(
        "sample-producer: {} polls, {} datapoints delivered, {} on the sample topic",
        report.sample_producer.polls,
        report.sample_producer.datapoints_delivered,
        report.sample_verified
    );
    println!(
        "latency: p50 {} ms, p99 {} ms, max {} ms",
        report.latency_ms.p50, report.latency_ms.p99, report.latency_ms.max
    );
    if report.passed() {
        println!(
            "conservation: OK (generated = in Kafka + the collector's and the producers' counted drops; Kafka holds exactly what was delivered)"
        );
    } else {
        for failure in &report.failures {
            println!("FAILED: {failure}");
        }
    }
}
