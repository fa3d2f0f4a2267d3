//! The `simulator` binary: subcommands over the simulator library. Each
//! fake prints its address and runs until Ctrl-C.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Emulates every system around the metrics collector.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A whole cluster in one process: DNS, agent, scheduler, broker,
    /// module producers, collector, sample-producer and verifier.
    Up(simulator::up::UpOptions),
    /// Load harness: drives the collector binary and measures it.
    Bench(simulator::bench::BenchOptions),
    /// A Mesos agent (control API under /control).
    Agent {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:5051")]
        listen: SocketAddr,
        /// Running containers.
        #[arg(long, default_value_t = 6)]
        containers: usize,
        /// Serve the recorded real responses.
        #[arg(long)]
        replay: bool,
    },
    /// Mesos-DNS for one Kafka framework.
    Dns {
        /// Listen address (UDP and TCP).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Framework name.
        #[arg(long, default_value = "kafka")]
        framework: String,
        /// The scheduler task's IP:PORT (SRV and A records).
        #[arg(long)]
        scheduler: SocketAddr,
        /// Broker IPs, for broker-N.<framework>.mesos.
        #[arg(long, value_delimiter = ',')]
        brokers: Vec<Ipv4Addr>,
    },
    /// The Kafka framework's scheduler (control API under /control).
    Scheduler {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Framework name.
        #[arg(long, default_value = "kafka")]
        framework: String,
        /// Brokers, IP:PORT, comma-separated.
        #[arg(long, value_delimiter = ',')]
        brokers: Vec<SocketAddr>,
    },
    /// The embedded broker: librdkafka's mock cluster, with a control API:
    /// POST /brokers/<id>/down, POST /brokers/<id>/up.
    Kafka {
        /// Brokers.
        #[arg(long, default_value_t = 3)]
        brokers: i32,
        /// Control API address.
        #[arg(long, default_value = "127.0.0.1:0")]
        control: SocketAddr,
    },
    /// Module producers sending to a collector, until Ctrl-C.
    Producers {
        /// The collector's TCP input.
        #[arg(long, default_value = "127.0.0.1:8124")]
        collector: SocketAddr,
        /// How many.
        #[arg(long, default_value_t = 2)]
        count: usize,
        /// Datapoints per second, each.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Name prefix of the producers.
        #[arg(long, default_value = "module")]
        id: String,
    },
    /// Consumes the metrics and sample topics and reports what arrived.
    Verify {
        /// Bootstrap servers.
        #[arg(long)]
        brokers: String,
        /// Stop after this long (e.g. 60s); otherwise at Ctrl-C.
        #[arg(long, value_parser = simulator::up::parse_duration)]
        duration: Option<Duration>,
        /// The collector's /metrics URL: at the end, check conservation
        /// against it and exit non-zero when it does not hold.
        #[arg(long)]
        metrics: Option<String>,
    },
}

/// SIGINT or SIGTERM (docker stops containers with SIGTERM).
async fn ctrl_c() {
    collector::telemetry::shutdown_signal().await;
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(options) => {
            let report = simulator::up::run(options, ctrl_c()).await?;
            simulator::up::print_report(&report);
            anyhow::ensure!(report.passed(), "verification failed");
        }
        Command::Bench(options) => {
            simulator::bench::run(options).await?;
        }
        Command::Agent {
            listen,
            containers,
            replay,
        } => {
            let agent = simulator::agent::mesos_agent()
                .bind(listen)
                .containers(containers)
                .replay(replay)
                .run()
                .await?;
            println!("agent listening on {}", agent.url());
            ctrl_c().await;
        }
        Command::Dns {
            listen,
            framework,
            scheduler,
            brokers,
        } => {
            let dns = simulator::dns::mesos_dns_on(listen).await?;
            let SocketAddr::V4(scheduler) = scheduler else {
                anyhow::bail!("--scheduler must be IPv4")
            };
            dns.set_scheduler(&framework, *scheduler.ip(), scheduler.port());
            dns.set_brokers(&framework, &brokers);
            println!("Mesos-DNS listening on {} (udp+tcp)", dns.addr);
            ctrl_c().await;
        }
        Command::Scheduler {
            listen,
            framework,
            brokers,
        } => {
            let scheduler = simulator::scheduler::kafka_scheduler(&framework, listen).await?;
            scheduler.set_brokers(&brokers);
            println!("Kafka scheduler listening on {}", scheduler.url());
            ctrl_c().await;
        }
        Command::Producers {
            collector,
            count,
            rate,
            id,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            let tasks: Vec<_> = (0..count)
                .map(|i| {
                    tokio::spawn(
                        simulator::producer::module_producer(collector, format!("{id}-{i}"))
                            .rate(rate)
                            .run(stop.clone()),
                    )
                })
                .collect();
            println!("{count} module producers sending to {collector}");
            ctrl_c().await;
            stop.store(true, Ordering::Relaxed);
            for task in tasks {
                let report = task.await?;
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Command::Verify {
            brokers,
            duration,
            metrics,
        } => {
            let verifier =
                simulator::verify::Verifier::start(&brokers, "metrics-", "sample_metrics")?;
            let stop = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => ctrl_c().await,
                }
            };
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => {
                        let seen = verifier.seen();
                        let latency = seen.latency();
                        println!("verified {} datapoints in {} messages ({} producers, {} duplicates) latency p50 {} ms p99 {} ms",
                            seen.datapoints, seen.messages, seen.producers.len(),
                            seen.producers.values().map(|p| p.duplicates).sum::<u64>(), latency.p50, latency.p99);
                    }
                }
            }
            let seen = verifier.stop();
            println!("{}", serde_json::to_string_pretty(&seen)?);
            if let Some(url) = metrics {
                let counts = simulator::verify::scrape(&url).await?;
                let failures = simulator::verify::check_conservation(&counts, &seen);
                println!("collector: {}", serde_json::to_string(&counts)?);
                for failure in &failures {
                    println!("FAILED: {failure}");
                }
                anyhow::ensure!(failures.is_empty(), "conservation does not hold");
                println!("conservation: OK");
            }
        }
        Command::Kafka { .. } => unreachable!("handled on the main thread"),
    }
    Ok(())
}

/// The mock cluster is not `Send`: it lives on the main thread, and the
/// control API (on its own runtime thread) sends it commands.
fn kafka(brokers: i32, control: SocketAddr) -> anyhow::Result<()> {
    use axum::extract::Path;
    use axum::routing::post;
    let cluster = rdkafka::mocking::MockCluster::new(brokers)?;
    println!("bootstrap servers: {}", cluster.bootstrap_servers());
    let (tx, rx) = std::sync::mpsc::channel::<Option<(i32, bool)>>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(control).await?;
            let _ = bound_tx.send(listener.local_addr()?);
            let commands = tx.clone();
            let app = axum::Router::new().route(
                "/brokers/{id}/{state}",
                post(move |Path((id, state)): Path<(i32, String)>| {
                    let commands = commands.clone();
                    async move {
                        match state.as_str() {
                            "down" | "up" => {
                                let _ = commands.send(Some((id, state == "up")));
                                axum::http::StatusCode::NO_CONTENT
                            }
                            _ => axum::http::StatusCode::NOT_FOUND,
                        }
                    }
                }),
            );
            let server = axum::serve(listener, app);
            tokio::select! {
                _ = server => {}
                _ = tokio::signal::ctrl_c() => { let _ = tx.send(None); }
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    println!(
        "control API: http://{}/brokers/<id>/down|up",
        bound_rx.recv()?
    );
    while let Ok(Some((id, up))) = rx.recv() {
        let result = if up {
            cluster.broker_up(id)
        } else {
            cluster.broker_down(id)
        };
        match result {
            Ok(()) => println!("broker {id} {}", if up { "up" } else { "down" }),
            Err(error) => eprintln!("broker {id}: {error}"),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let result = match cli.command {
        Command::Kafka { brokers, control } => kafka(brokers, control),
        command => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(run(command)),
            Err(error) => Err(error.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("simulator: {error:#}");
            ExitCode::FAILURE
        }
    }
}
