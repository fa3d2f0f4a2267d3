//! `sample-producer`: sends the agent's per-container statistics to Kafka in
//! Metrics Avro format. Accepts the original's `-flag` forms as well as
//! `--flag`, so `sample-producer -framework kafka` works as written.
#![forbid(unsafe_code)] // the one audited exception is collector::resident

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use collector::config::security::{KafkaSecurity, SECURITY_OPTIONS};
use collector::dcos::Credentials;
use collector::discovery::BrokerSource;
use collector::sample::{ProducerOptions, SampleConfig, run};
use collector::sources::agent::poller::AgentAddress;
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
    #[arg(long, env = "KAFKA_ENABLED", default_value_t = true, action = ArgAction::Set, value_parser = collector::config::parse_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    kafka: bool,
    /// Also write each poll to chunk-N.avro in the working directory.
    #[arg(long, env = "FILE_ENABLED", default_value_t = false, action = ArgAction::Set, value_parser = collector::config::parse_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    file: bool,
    /// Debug logging.
    #[arg(long, default_value_t = false, action = ArgAction::Set, value_parser = collector::config::parse_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    verbose: bool,
    /// The agent's base URL, instead of -ipcmd and port 5051.
    #[arg(long, env = "AGENT_URL")]
    agent_url: Option<String>,
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
    /// Polls kept while Kafka is unreachable (the oldest dropped beyond).
    #[arg(long, env = "MAX_PENDING", default_value_t = SampleConfig::MAX_PENDING)]
    max_pending: usize,
    /// Bytes of polls kept while Kafka is unreachable.
    #[arg(long, env = "MAX_PENDING_BYTES", default_value_t = SampleConfig::MAX_PENDING_BYTES)]
    max_pending_bytes: usize,
    /// Largest Kafka message; a poll is split below it.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = SampleConfig::MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Largest agent answer read; a larger one is refused.
    #[arg(long, env = "AGENT_MAX_BODY_BYTES", default_value_t = SampleConfig::MAX_BODY_BYTES)]
    max_body_bytes: usize,
}

/// The collector's options the sample-producer takes too: Kafka security
/// and the DC/OS credentials for the agent and the scheduler.
fn shared() -> Vec<&'static str> {
    SECURITY_OPTIONS
        .iter()
        .copied()
        .chain(["auth_credential", "auth_credential_file", "dcos_ca_file"])
        .collect()
}

/// Checks what would otherwise fail only later, in a loop: the agent URL,
/// the limits, the security settings and their files, and the librdkafka
/// options (codec included).
fn check(args: &Args, security: &KafkaSecurity) -> Result<(), String> {
    if let Some(url) = &args.agent_url
        && reqwest::Url::parse(url).is_err()
    {
        return Err(format!("agent_url: {url:?} is not a URL"));
    }
    if let Some(url) = &args.kafka_scheduler_url
        && reqwest::Url::parse(url).is_err()
    {
        return Err(format!("kafka_scheduler_url: {url:?} is not a URL"));
    }
    if args.max_message_bytes < 4096 {
        return Err("max_message_bytes: must be at least 4096".into());
    }
    if args.max_body_bytes < 64 * 1024 {
        return Err("max_body_bytes: must be at least 65536".into());
    }
    if args.max_pending == 0 {
        return Err("max_pending: must be greater than 0".into());
    }
    for broker in args
        .brokers
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        collector::config::check_broker(broker).map_err(|e| format!("brokers: {broker:?}: {e}"))?;
    }
    if args.kafka {
        ProducerOptions {
            compression: args.compression.clone(),
            max_message_bytes: args.max_message_bytes,
            security: security.clone(),
            librdkafka: args.librdkafka.clone(),
        }
        .check()
        .map_err(|e| {
            if e.message.starts_with("compression.codec") {
                format!("compression: {}", e.message)
            } else {
                format!("{}: {}", e.field, e.message)
            }
        })?;
    }
    Ok(())
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
    // The Kafka security options and the DC/OS credentials are the
    // collector's, from its declaration.
    let command = Args::command().args(collector::config::clap_args(&shared()));
    let parsed = command
        .try_get_matches_from(normalize(std::env::args()))
        .and_then(|matches| Args::from_arg_matches(&matches).map(|args| (args, matches)));
    let (args, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return collector::config::usage_error("sample-producer", error),
    };
    let shared = match collector::config::from_matches(&shared(), &matches) {
        Ok(shared) => shared,
        Err(error) => {
            eprintln!("sample-producer: {error}");
            return ExitCode::from(64);
        }
    };
    let security = KafkaSecurity::from(&shared);
    let credentials = Credentials::from(&shared);
    if let Err(error) = credentials.check() {
        eprintln!("sample-producer: {error}");
        return ExitCode::from(64);
    }
    if args.kafka && args.framework.is_empty() && args.brokers.is_empty() {
        eprintln!("Either -framework or -brokers must be specified, or -kafka must be false.");
        return ExitCode::from(64);
    }
    if let Err(error) = check(&args, &security) {
        eprintln!("sample-producer: invalid configuration: {error}");
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
                credentials: credentials.clone(),
                tls: security.protocol.uses_tls(),
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
        credentials,
        agent_timeout: Duration::from_secs(5),
        file_dir: args.file.then(|| PathBuf::from(".")),
        max_pending: args.max_pending,
        max_pending_bytes: args.max_pending_bytes,
        max_message_bytes: args.max_message_bytes,
        max_body_bytes: args.max_body_bytes,
        compression: args.compression,
        security,
        reload: Default::default(),
        librdkafka: args.librdkafka,
    };
    let reload = config.reload.clone();
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
        let mut signals = match collector::telemetry::Signals::install() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("sample-producer: cannot install the signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        signals.on_hangup(move || reload.request());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, shutdown.clone()));
        signals.recv().await;
        shutdown.cancel();
        match task.await {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("sample-producer: {error}");
                ExitCode::from(70)
            }
        }
    })
}
