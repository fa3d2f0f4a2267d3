//! The `simulator` binary: subcommands over the simulator library. Each
//! fake prints its address and runs until Ctrl-C.
#![forbid(unsafe_code)] // the one audited exception is collector::resident

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use collector::config::security::{KafkaSecurity, SECURITY_OPTIONS};

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
        /// The scheduler task, HOST:PORT (SRV and A records); a host name is
        /// resolved once at start, retrying for up to 60 s.
        #[arg(long)]
        scheduler: String,
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
        /// Brokers, HOST:PORT, comma-separated: the `dns` list as given,
        /// the `address` list resolved to IP:PORT.
        #[arg(long, value_delimiter = ',')]
        brokers: Vec<String>,
        /// Serve the SDK-era service's `/v1/endpoints/broker[-tls]` (also
        /// under `/service/<framework>`) instead of `/v1/connection`.
        #[arg(long)]
        sdk: bool,
        /// The brokers' TLS ports, HOST:PORT, for `/v1/endpoints/broker-tls`.
        #[arg(long, value_delimiter = ',')]
        tls_brokers: Vec<String>,
        /// Serve HTTPS with this certificate (PEM), and `--https-key`.
        #[arg(long, requires = "https_key")]
        https_cert: Option<std::path::PathBuf>,
        /// The certificate's private key (PEM, PKCS#8).
        #[arg(long, requires = "https_cert")]
        https_key: Option<std::path::PathBuf>,
        /// Require `Authorization: token=<token>`.
        #[arg(long)]
        token: Option<String>,
    },
    /// The embedded broker: librdkafka's mock cluster, with a control API:
    /// POST /brokers/<id>/down, POST /brokers/<id>/up; POST
    /// /topics/<name>/error {"error": "TOPIC_AUTHORIZATION_FAILED"} (any
    /// librdkafka error name) refuses a topic, DELETE /topics/<name>/error
    /// mends it.
    Kafka {
        /// Brokers.
        #[arg(long, default_value_t = 3)]
        brokers: i32,
        /// Control API address.
        #[arg(long, default_value = "127.0.0.1:0")]
        control: SocketAddr,
        /// Also take Kafka clients' first connection here, passed on to
        /// the first broker: a fixed bootstrap address for clients in this
        /// network namespace (the brokers themselves listen on 127.0.0.1,
        /// on ports of their own).
        #[arg(long)]
        bootstrap: Option<SocketAddr>,
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
        /// Name prefix of the producers (unique per node).
        #[arg(long, default_value = "module")]
        id: String,
        /// Control API: GET /report, POST /stop.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// The DC/OS 1.12+ mesos module: registers containers with a
    /// collector's statsd registration API, runs their tasks' statsd until
    /// Ctrl-C, deregisters the last `--deregister` of them, and prints
    /// what every series must total (JSON).
    Module {
        /// The registration API: unix:PATH or IP:PORT.
        #[arg(long, default_value = "unix:/run/dcos/telegraf/dcos_statsd.sock")]
        control: simulator::statsd_module::Control,
        /// Containers (made-up ids, unless --agent gives them).
        #[arg(long, default_value_t = 3)]
        containers: usize,
        /// A Mesos agent's URL: register the containers its /state names.
        #[arg(long)]
        agent: Option<String>,
        /// Packets per second from each task (six lines each).
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Containers deregistered at the end.
        #[arg(long, default_value_t = 1)]
        deregister: usize,
        /// Prefix of made-up container ids (unique per node).
        #[arg(long, default_value = "module")]
        id: String,
        /// Control API: GET /report (final once stopped), POST /stop (stop
        /// the tasks, deregister, answer the final report).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Malformed streams sent to a collector, one connection per interval,
    /// until Ctrl-C.
    Garbage {
        /// The collector's TCP input.
        #[arg(long, default_value = "127.0.0.1:8124")]
        collector: SocketAddr,
        /// Time between connections (e.g. 500ms).
        #[arg(long, default_value = "1s", value_parser = simulator::up::parse_duration)]
        every: Duration,
    },
    /// Consumes the metrics and sample topics and reports what arrived.
    Verify {
        /// Bootstrap servers of one cluster; repeat for clusters that the
        /// brokers move between.
        #[arg(long, required = true)]
        brokers: Vec<String>,
        /// Stop after this long (e.g. 60s); otherwise at Ctrl-C.
        #[arg(long, value_parser = simulator::up::parse_duration)]
        duration: Option<Duration>,
        /// A collector's /metrics URL (repeatable): at the end, check
        /// conservation against them and exit non-zero when it fails.
        #[arg(long)]
        metrics: Vec<String>,
        /// A node's producers control URL (repeatable), for the balance of
        /// generated, dropped and arrived datapoints.
        #[arg(long)]
        producers: Vec<String>,
        /// Serve GET /report (JSON) here.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// A Prometheus server scraping the collectors (http://HOST:PORT):
        /// the report says what its query API has of every module producer.
        #[arg(long)]
        prometheus: Option<String>,
        /// A 1.12 module's control URL (`simulator module --listen`;
        /// repeatable): once it is stopped, every total its tasks sent is
        /// checked in Kafka and in the Prometheus server.
        #[arg(long)]
        statsd_module: Vec<String>,
        /// Summary line interval.
        #[arg(long, default_value = "5s", value_parser = simulator::up::parse_duration)]
        interval: Duration,
    },
    /// Prints the records of Kafka topics as JSON lines (one per
    /// MetricList), from the beginning, then exits after --idle of quiet.
    /// Works against tansu, which Debian's kcat cannot read.
    Consume {
        /// Bootstrap servers.
        #[arg(long)]
        brokers: String,
        /// Topics (repeatable); none lists the topics instead.
        #[arg(long)]
        topic: Vec<String>,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop once nothing arrives for this long (e.g. 5s).
        #[arg(long, default_value = "5s", value_parser = simulator::up::parse_duration)]
        idle: Duration,
    },
    /// Writes a Prometheus configuration scraping the targets and runs
    /// Prometheus on it in this process's place (the prometheus image has
    /// no shell).
    Prometheus {
        /// A target, HOST:PORT (repeatable).
        #[arg(long, required = true)]
        target: Vec<String>,
        /// Scrape interval (e.g. 5s).
        #[arg(long, default_value = "5s", value_parser = simulator::up::parse_duration)]
        interval: Duration,
        /// Prometheus's HTTP listener.
        #[arg(long, default_value = "0.0.0.0:9090")]
        listen: String,
        /// Where its configuration and data go.
        #[arg(long, default_value = "/data")]
        data: std::path::PathBuf,
        /// The Prometheus binary.
        #[arg(long, default_value = "/bin/prometheus")]
        binary: std::path::PathBuf,
    },
    /// Health probe for images without a shell: exits 0 when an http://
    /// URL answers 2xx or a tcp://HOST:PORT accepts.
    Probe {
        /// URL or tcp://HOST:PORT.
        target: String,
    },
}

/// Resolves HOST:PORT, retrying until `patience` runs out (a container's
/// name resolves only once it has started).
async fn resolve(target: &str, patience: Duration) -> anyhow::Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::net::lookup_host(target).await {
            Ok(mut addrs) => {
                if let Some(addr) = addrs.find(SocketAddr::is_ipv4) {
                    return Ok(addr);
                }
            }
            Err(error) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("cannot resolve {target}: {error}")
            }
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{target} has no IPv4 address");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGINT or SIGTERM (docker stops containers with SIGTERM).
async fn ctrl_c() {
    collector::telemetry::Signals::install()
        .expect("signal handlers")
        .recv()
        .await;
}

/// `security`: the Kafka security settings given to `verify` (the
/// collector's options, by the same flags and env vars).
async fn run(command: Command, security: KafkaSecurity) -> anyhow::Result<()> {
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
            let dns = simulator::dns::mesos_dns().bind(listen).run().await?;
            let SocketAddr::V4(scheduler) = resolve(&scheduler, Duration::from_secs(60)).await?
            else {
                anyhow::bail!("--scheduler must resolve to IPv4")
            };
            dns.set_scheduler(&framework, *scheduler.ip(), scheduler.port());
            dns.set_brokers(&framework, &brokers);
            println!(
                "Mesos-DNS listening on {} (udp+tcp), _{framework}._tcp.marathon.mesos -> {scheduler}",
                dns.addr
            );
            ctrl_c().await;
        }
        Command::Scheduler {
            listen,
            framework,
            brokers,
            sdk,
            tls_brokers,
            https_cert,
            https_key,
            token,
        } => {
            let mut builder = simulator::scheduler::kafka_scheduler(&framework).bind(listen);
            if sdk {
                builder = builder.sdk();
            }
            if let (Some(cert), Some(key)) = (https_cert, https_key) {
                builder = builder.https(simulator::tls::Issued {
                    cert_pem: std::fs::read(&cert)?,
                    key_pem: std::fs::read(&key)?,
                });
            }
            if let Some(token) = token {
                builder = builder.token(token);
            }
            let scheduler = builder.run().await?;
            let resolve_all = |list: Vec<String>| async move {
                let mut addresses = Vec::new();
                for broker in &list {
                    addresses.push(resolve(broker, Duration::from_secs(60)).await?.to_string());
                }
                anyhow::Ok((list, addresses))
            };
            let (brokers, addresses) = resolve_all(brokers).await?;
            scheduler.set_lists(brokers, addresses);
            let (tls_brokers, tls_addresses) = resolve_all(tls_brokers).await?;
            scheduler.set_tls_lists(tls_brokers, tls_addresses);
            println!("Kafka scheduler listening on {}", scheduler.url());
            ctrl_c().await;
        }
        Command::Module {
            control,
            containers,
            agent,
            rate,
            deregister,
            id,
            listen,
        } => {
            let ids = match agent {
                Some(url) => {
                    let state: serde_json::Value =
                        reqwest::get(format!("{url}/state")).await?.json().await?;
                    state["frameworks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|f| f["executors"].as_array().into_iter().flatten())
                        .filter_map(|e| e["container"].as_str().map(str::to_owned))
                        .collect()
                }
                None => (0..containers)
                    .map(|i| format!("{id}-container-{i}"))
                    .collect(),
            };
            let module = simulator::statsd_module::ModuleRun::start(
                simulator::statsd_module::statsd_module(control, ids)
                    .rate(rate)
                    .deregister(deregister),
            );
            if let Some(listen) = listen {
                let addr = module.clone().serve(listen).await?;
                println!("module control API on http://{addr}");
            }
            println!("module (1.12) running; Ctrl-C deregisters and reports");
            ctrl_c().await;
            let report = module.stop().await;
            println!("{}", serde_json::to_string_pretty(&report)?);
            anyhow::ensure!(
                report.failed_calls.is_empty(),
                "calls failed: {:?}",
                report.failed_calls
            );
        }
        Command::Producers {
            collector,
            count,
            rate,
            id,
            listen,
        } => {
            let report =
                simulator::cluster::run_producers(collector, count, rate, &id, listen, ctrl_c())
                    .await?;
            for producer in &report.producers {
                println!("{}", serde_json::to_string(producer)?);
            }
        }
        Command::Garbage { collector, every } => {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(every);
            let interrupt = ctrl_c();
            tokio::pin!(interrupt);
            println!("sending a malformed stream to {collector} every {every:?}");
            loop {
                tokio::select! {
                    _ = &mut interrupt => break,
                    _ = tick.tick() => {}
                }
                let mode = match sent % 4 {
                    0 => simulator::producer::Malformed::Garbage,
                    1 => simulator::producer::Malformed::TruncatedBlock,
                    2 => simulator::producer::Malformed::BadSync,
                    _ => simulator::producer::Malformed::HugeBlock,
                };
                let garbage = simulator::producer::producer(collector, format!("garbage-{sent}"))
                    .malformed(mode);
                match garbage.run().await {
                    Ok(_) => sent += 1,
                    Err(error) => eprintln!("garbage: {collector}: {error}"),
                }
            }
            println!("sent {sent} malformed streams");
        }
        Command::Verify {
            brokers,
            duration,
            metrics,
            producers,
            listen,
            prometheus,
            statsd_module,
            interval,
        } => {
            let require_balance = !producers.is_empty();
            let require_identity = !metrics.is_empty();
            let mut verifier =
                simulator::cluster::ClusterVerifier::start(&brokers, producers, metrics, security)?;
            verifier.prometheus = prometheus;
            verifier.statsd_modules = statsd_module;
            let verifier = Arc::new(verifier);
            if let Some(listen) = listen {
                let addr = verifier.clone().serve(listen).await?;
                println!("verifier report on http://{addr}/report");
            }
            let stop = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => ctrl_c().await,
                }
            };
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => println!("{}", verifier.report().await.summary()),
                }
            }
            let report = verifier.report().await;
            println!("{}", serde_json::to_string_pretty(&report)?);
            for failure in &report.conservation.failures {
                println!("FAILED: {failure}");
            }
            for (url, check) in &report.statsd {
                for failure in &check.failures {
                    println!("FAILED: {url}: {failure}");
                }
            }
            if require_balance {
                anyhow::ensure!(
                    report.conservation.holds,
                    "conservation does not hold: {}",
                    report.summary()
                );
                println!("conservation: OK");
            } else if require_identity {
                anyhow::ensure!(
                    report.conservation.failures.is_empty(),
                    "conservation does not hold"
                );
                println!("conservation: OK");
            }
            for url in report
                .statsd
                .iter()
                .filter(|(_, c)| c.running)
                .map(|(url, _)| url)
            {
                println!(
                    "FAILED: {url}: the module still runs (POST /statsd/stop first): nothing checked"
                );
            }
            anyhow::ensure!(
                report.statsd.values().all(|c| c.holds()),
                "statsd totals not checked or differ"
            );
        }
        Command::Probe { target } => simulator::cluster::probe(&target).await?,
        Command::Prometheus {
            target,
            interval,
            listen,
            data,
            binary,
        } => {
            return Err(simulator::prometheus::exec(
                &binary, &target, interval, &listen, &data,
            ));
        }
        Command::Consume {
            brokers,
            topic,
            count,
            idle,
        } => {
            tokio::task::spawn_blocking(move || {
                simulator::verify::print_topics(&brokers, &topic, count, idle)
            })
            .await??;
        }
        Command::Kafka { .. } => unreachable!("handled on the main thread"),
    }
    Ok(())
}

fn main() -> ExitCode {
    // `verify` takes the collector's Kafka security options, from their
    // declaration.
    let matches = Cli::command()
        .mut_subcommand("verify", |verify| {
            verify.args(collector::config::clap_args(SECURITY_OPTIONS))
        })
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let security = match matches.subcommand_matches("verify") {
        Some(verify) => match collector::config::from_matches(SECURITY_OPTIONS, verify) {
            Ok(config) => KafkaSecurity::from(&config),
            Err(error) => {
                eprintln!("simulator verify: {error}");
                return ExitCode::from(64);
            }
        },
        None => KafkaSecurity::default(),
    };
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let result = match cli.command {
        Command::Kafka {
            brokers,
            control,
            bootstrap,
        } => simulator::kafka::run(brokers, control, bootstrap),
        command => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(run(command, security)),
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
