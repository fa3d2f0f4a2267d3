//! The `collector` binary: argument parsing only; the work is in the library.
#![forbid(unsafe_code)] // the one audited exception is collector::resident

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use collector::config::{ConfigArgs, usage_error, with_defaults_in_help};
use collector::decode::{DecodeFailure, decode_to};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits(3) EX_USAGE: the configuration is wrong.
const EX_USAGE: u8 = 64;

/// Per-node metrics agent for Mesos / DC/OS: Avro OCF over TCP in, Kafka out.
///
/// With no subcommand it runs the daemon. Every option is also an env var
/// (upper case, `_` for `-`) and a key in the `--config` TOML file.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Check the configuration (flags, env and file) and exit: 0 if valid,
    /// 64 with the field in error if not.
    Validate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Decode OCF files or streams (for example `kcat -C -t TOPIC -e -f '%s'`
    /// output) and print one JSON object per MetricList, one per line.
    Decode {
        /// Files to read, in order; none, or `-`, reads standard input.
        files: Vec<PathBuf>,
        /// Largest block accepted, in bytes.
        #[arg(long, default_value_t = schema::Limits::default().max_block_bytes)]
        max_block_bytes: usize,
    },
    /// Ask a running collector's `/health`: exit 0 when healthy, 1 with the
    /// reasons when not (a health check for images without a shell).
    Health {
        /// The collector's health URL.
        #[arg(long, default_value = "http://127.0.0.1:8123/health")]
        url: String,
    },
}

fn legacy_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// sysexits(3) EX_SOFTWARE: a task panicked (a bug), though the count balanced.
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    // Transparent huge pages would make every 2 MiB region the allocators
    // touch resident in full (mimalloc is built not to ask for them; this
    // covers hosts where they are on for every process).
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let command = with_defaults_in_help(Cli::command())
        .mut_subcommand("run", with_defaults_in_help)
        .mut_subcommand("validate", with_defaults_in_help);
    let cli = match command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(error) => return usage_error("collector", error),
    };
    match cli.command {
        None => run(cli.config),
        Some(Command::Run { config }) => run(config),
        Some(Command::Validate { config }) => match config.load(legacy_env).and_then(|config| {
            collector::spool::check_config_dir(&config)?;
            Ok(config)
        }) {
            Ok(config) => {
                println!("configuration is valid");
                let bound = config.memory_bound();
                let mib = |n: u64| n as f64 / 1048576.0;
                println!(
                    "memory bound: {:.1} MiB (buffer {:.1}, input buffers {:.1}, inflating {:.1}, kafka {:.1}, partners {:.1}, agent {:.1}, store {:.1}, statsd {:.1}, base {:.1})",
                    mib(bound.total),
                    mib(bound.buffer),
                    mib(bound.input_buffers),
                    mib(bound.inflating),
                    mib(bound.kafka),
                    mib(bound.partners),
                    mib(bound.agent),
                    mib(bound.store),
                    mib(bound.statsd),
                    mib(bound.base)
                );
                println!(
                    "{}",
                    toml::to_string(&config.redacted()).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("collector: {error}");
                ExitCode::from(EX_USAGE)
            }
        },
        Some(Command::Decode {
            files,
            max_block_bytes,
        }) => decode(files, max_block_bytes),
        Some(Command::Health { url }) => health(&url),
    }
}

fn health(url: &str) -> ExitCode {
    // Plain HTTP makes no TLS context: a health check run every few
    // seconds does not read the system's CA bundle each time.
    let check = async {
        let client = collector::http::HttpClient::new(
            url,
            &collector::dcos::Credentials::default(),
            std::time::Duration::from_secs(3),
        )
        .map_err(|e| e.to_string())?;
        let mut response = client.get(url, &[]).await.map_err(|e| e.to_string())?;
        let healthy = (200..300).contains(&response.status());
        // Its first 64 KiB, to say why.
        let mut body = Vec::new();
        while body.len() < 64 * 1024 {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(64 * 1024);
        let body = String::from_utf8_lossy(&body).into_owned();
        Ok::<_, String>((healthy, body))
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| runtime.block_on(check));
    match result {
        Ok((true, _)) => ExitCode::SUCCESS,
        Ok((false, body)) => {
            eprintln!("collector health: {url}: unhealthy: {body}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("collector health: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: ConfigArgs) -> ExitCode {
    // While this is the only thread: it takes LISTEN_FDS out of the
    // environment.
    collector::net::take_passed_sockets();
    // While this is the only thread (mallopt is not thread-safe).
    let malloc = collector::resident::keep_message_memory();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("collector: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Signals first, before the configuration is even read: from here on
    // a SIGTERM stops the collector cleanly, with its final count, instead
    // of killing it while it starts.
    let mut signals = {
        let _context = runtime.enter();
        match collector::telemetry::Signals::install() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("collector: cannot install the signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        }
    };
    let config = match args.load(legacy_env) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("collector: {error}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let log = collector::telemetry::init(&config.log_level, config.log_format);
    tracing::debug!(
        ?malloc,
        "glibc malloc's mmap and trim thresholds (collector::resident)."
    );
    let result = runtime.block_on(async {
        let app = collector::App::bind(config).await?.with_log_control(log);
        let runtime = app.runtime();
        signals.on_hangup(move || {
            if let Err(error) = runtime.reload_kafka() {
                tracing::error!(%error, "SIGHUP: the Kafka security settings were not reloaded; the clients in use stay.");
            }
        });
        let stats = app.stats();
        // The code that ran only to start need not stay resident.
        tokio::spawn(collector::resident::page_out_after_settle());
        app.run(signals.recv()).await;
        Ok::<_, collector::StartError>(stats)
    });
    // What is left (a topic lookup waiting on its brokers, a producer being
    // dropped) is not waited for: the shutdown grace is over.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(stats) if stats.task_panics.load(std::sync::atomic::Ordering::Relaxed) > 0 => {
            ExitCode::from(EX_SOFTWARE)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Collector failed to start.");
            eprintln!("collector: {error}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn decode(files: Vec<PathBuf>, max_block_bytes: usize) -> ExitCode {
    let limits = schema::Limits {
        max_block_bytes,
        ..schema::Limits::default()
    };
    let files = if files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        files
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for path in files {
        let name = path.display().to_string();
        let result = if name == "-" {
            decode_to(io::stdin().lock(), &mut out, limits)
        } else {
            match File::open(&path) {
                Ok(file) => decode_to(file, &mut out, limits),
                Err(error) => {
                    eprintln!("collector decode: {name}: {error}");
                    return ExitCode::from(66);
                }
            }
        };
        match result {
            Ok(_) => {}
            Err(DecodeFailure::Corrupt(error)) => {
                eprintln!("collector decode: {name}: corrupt stream: {error}");
                return ExitCode::from(65);
            }
            Err(DecodeFailure::Io(error)) if error.kind() == io::ErrorKind::BrokenPipe => {
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                eprintln!("collector decode: {name}: {error}");
                return ExitCode::from(74);
            }
        }
    }
    ExitCode::SUCCESS
}
