//! `sample-producer`: sends the agent's per-container statistics to Kafka in
//! Metrics Avro format. Accepts the original's `-flag` forms as well as
//! `--flag`, so `sample-producer -framework kafka` works as written.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use collector::discovery::BrokerSource;
use collector::mesos::poller::AgentAddress;
use collector::sample::{SampleConfig, run};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Sends various stats in Metrics Avro format to the provided Kafka service"
)]
struct Args {
    /// Kafka framework to query for brokers; overrides -brokers.
    #[arg(long, env = "KAFKA_FRAMEWORK", default_value = "")]
    framework: String,
    /// Comma-separated brokers.
    #[arg(long, env = "KAFKA_PEERS", default_value = "")]
    brokers: String,
    /// Kafka topic (and each MetricList's topic).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "sample_metrics")]
    topic: String,
    /// Seconds between polls and between retries.
    #[arg(long, env = "PERIOD", default_value_t = 15)]
    period: u64,
    /// Command printing the agent's IP.
    #[arg(
        long,
        env = "DETECT_IP",
        default_value = "/opt/mesosphere/bin/detect_ip"
    )]
    ipcmd: String,
    /// Send to Kafka.
    #[arg(long, env = "KAFKA_ENABLED", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    kafka: bool,
    /// Also write each poll to chunk-N.avro in the working directory.
    #[arg(long, env = "FILE_ENABLED", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    file: bool,
    /// Debug logging.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    verbose: bool,
    /// The agent's base URL, instead of -ipcmd and port 5051.
    #[arg(long, env = "AGENT_URL")]
    agent_url: Option<String>,
    /// Agent credential, sent as `Authorization: token=<x>`.
    #[arg(long, env = "AUTH_CREDENTIAL", hide_env_values = true)]
    auth_credential: Option<String>,
    /// Kafka scheduler base URL, instead of the DNS lookup.
    #[arg(long, env = "KAFKA_SCHEDULER_URL")]
    kafka_scheduler_url: Option<String>,
    /// Kafka compression codec: snappy (the original's), lz4, gzip or none.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "snappy")]
    compression: String,
    /// Any librdkafka producer option, KEY=VALUE (repeatable), applied last.
    #[arg(long, value_parser = parse_pair)]
    librdkafka: Vec<(String, String)>,
    /// DNS server (IP:PORT) for the SRV and A lookups.
    #[arg(long, env = "DNS_SERVER")]
    dns_server: Option<std::net::SocketAddr>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// `-flag` → `--flag`, as Go's flag package accepts both.
fn normalize(args: impl Iterator<Item = String>) -> Vec<String> {
    args.enumerate()
        .map(|(i, a)| {
            if i > 0
                && a.starts_with('-')
                && !a.starts_with("--")
                && a.len() > 2
                && a.as_bytes()[1].is_ascii_alphabetic()
            {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse_from(normalize(std::env::args()));
    if args.kafka && args.framework.is_empty() && args.brokers.is_empty() {
        eprintln!("Either -framework or -brokers must be specified, or -kafka must be false.");
        return ExitCode::from(64);
    }
    let level = if args.verbose { "debug" } else { "info" };
    let _log = collector::telemetry::init(level, collector::config::LogFormat::Text);
    let brokers = args.kafka.then(|| {
        if !args.framework.is_empty() {
            BrokerSource::Framework {
                name: args.framework.clone(),
                scheduler_url: args.kafka_scheduler_url.clone(),
                dns_server: args.dns_server,
            }
        } else {
            BrokerSource::Static(
                args.brokers
                    .split(',')
                    .map(|b| b.trim().to_owned())
                    .filter(|b| !b.is_empty())
                    .collect(),
            )
        }
    });
    let config = SampleConfig {
        brokers,
        topic: args.topic,
        period: Duration::from_secs(args.period.max(1)),
        agent: match args.agent_url {
            Some(url) => AgentAddress::Url(url),
            None => AgentAddress::IpCommand {
                command: args.ipcmd,
                port: 5051,
            },
        },
        auth: args.auth_credential,
        agent_timeout: Duration::from_secs(5),
        file_dir: args.file.then(|| PathBuf::from(".")),
        max_pending: 64,
        compression: args.compression,
        librdkafka: args.librdkafka,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sample-producer: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, shutdown.clone()));
        collector::telemetry::shutdown_signal().await;
        shutdown.cancel();
        let _ = task.await;
    });
    ExitCode::SUCCESS
}
