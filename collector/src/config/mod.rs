//! Configuration: every option is a CLI flag, an env var, and a key in an
//! optional TOML file. Flags beat env, env beats the file, the file beats the
//! defaults. Flag `--kafka-brokers` is env `KAFKA_BROKERS` and file key
//! `kafka_brokers`, as in the original, whose env names work unchanged
//! (including its misspelt `LISTEN_ENDPONT`). The options are declared once,
//! in [`options`]; this module validates them and reads files.

pub mod librdkafka;
mod options;
pub mod security;

pub use options::{
    Config, ConfigArgs, OPTIONS, OptionInfo, clap_args, default_text, from_matches, is_runtime,
    markdown_table, with_defaults_in_help,
};

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What to do when the buffer between the inputs and Kafka is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Stop reading the TCP inputs until there is room: senders see TCP
    /// backpressure, nothing is dropped here.
    Block,
    /// Drop the oldest buffered records to make room, counted as
    /// `buffer_full` drops.
    DropOldest,
}

/// Where records wait between the inputs and the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum BufferType {
    /// In memory only: lost if the process dies.
    Memory,
    /// In segment files under `spool_dir`, replayed after a restart.
    Disk,
}

/// When the spool syncs what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum FsyncMode {
    /// Every `spool_fsync_ms`: a crash loses at most that last interval.
    Interval,
    /// Before each write returns: a crash loses nothing written.
    Always,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A listener's address, or none: `IP:PORT`, `unix:PATH`, or empty (off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Listen {
    /// Not listening.
    #[default]
    Off,
    /// A TCP address (port 0: one the kernel picks, reported back).
    Tcp(std::net::SocketAddr),
    /// A unix socket's path.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::Off);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path (unix:/run/x.sock)".into());
            }
            return Ok(Self::Unix(path.into()));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{s:?} is not IP:PORT (0.0.0.0:61091), unix:PATH, or empty (off)"))
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Listen> for String {
    fn from(listen: Listen) -> Self {
        listen.to_string()
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => Ok(()),
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Listen {
    /// Whether it listens at all.
    pub fn is_on(&self) -> bool {
        *self != Self::Off
    }
}

/// What every output shows in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// A configuration value that is wrong, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct ConfigError {
    /// The option's file key (its flag is the same with dashes).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Whether `name` is a topic name Kafka accepts.
pub fn is_valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The longest period or timeout accepted, in seconds.
pub const MAX_PERIOD_SECS: u64 = 7 * 24 * 3600;
/// The longest shutdown grace accepted, in seconds.
pub const MAX_GRACE_SECS: u64 = 24 * 3600;
/// The largest block, decompressed block or agent body accepted, in bytes.
const MAX_BLOCK_BYTES: u64 = 1 << 30;
/// The largest memory bound accepted, in bytes.
const MAX_BUFFER_BYTES: u64 = 1 << 40;
/// What an input connection may read beyond the block it waits for.
pub const READ_AHEAD_BYTES: usize = 256 * 1024;

/// What a connection may hold in its read buffer without drawing on the
/// shared pool.
pub const OWN_READ_BYTES: usize = 16 * 1024;

fn at_most(field: &str, value: u64, max: u64, unit: &str) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("{value} is too large: at most {max} {unit}"),
        ));
    }
    Ok(())
}

/// Checks one bootstrap broker: `[PROTOCOL://]HOST:PORT`, with a host name,
/// an IPv4 address or a bracketed IPv6 address.
pub fn check_broker(broker: &str) -> Result<(), String> {
    let address = match broker.split_once("://") {
        Some((protocol, rest))
            if !protocol.is_empty()
                && protocol
                    .bytes()
                    .all(|b| b.is_ascii_alphabetic() || b == b'_') =>
        {
            rest
        }
        Some(_) => return Err("not a [PROTOCOL://]HOST:PORT address".into()),
        None => broker,
    };
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("missing :PORT".into());
    };
    match port.parse::<u16>() {
        Ok(port) if port > 0 => {}
        _ => return Err(format!("{port:?} is not a port (1 to 65535)")),
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if !host_ok {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(())
}

/// Parses a boolean the way the original (Go's `strconv.ParseBool`) did:
/// `1`, `t`, `T`, `TRUE`, `true`, `True`, and their opposites, so that
/// settings such as `KAFKA_COMPRESS_SNAPPY=0` keep working.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "{s:?} is not a boolean (true, false, 1, 0, t, f, TRUE, FALSE, True, False)"
        )),
    }
}

/// What the collector may take in memory at most, by part, under any
/// input: see [`Config::memory_bound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryBound {
    /// The buffer: records from decoding to librdkafka (`buffer_max_bytes`).
    pub buffer: u64,
    /// Input read buffers: the shared pool and each connection's own 16 KiB.
    pub input_buffers: u64,
    /// The one buffer compressed blocks are decompressed into.
    pub inflating: u64,
    /// librdkafka's queue, messages it hands back to be produced again,
    /// and each topic's state (in librdkafka and in the sink).
    pub kafka: u64,
    /// The partners' queues.
    pub partners: u64,
    /// An agent answer being parsed and mapped.
    pub agent: u64,
    /// The node store, and the scrapes reading it (with Prometheus on).
    pub store: u64,
    /// statsd's series, a packet being read and a flush's piece being made.
    pub statsd: u64,
    /// The program itself: code, runtime, librdkafka's threads and buffers.
    pub base: u64,
    /// All of it.
    pub total: u64,
}

/// What one topic's state takes at most: librdkafka's topic and partition
/// objects and metadata, and the sink's lookup, cache and batch entries
/// (see the topic flood test in `collector/tests/hostile.rs`).
pub const TOPIC_STATE_BYTES: u64 = 16 * 1024;

/// What statsd takes besides its series: a packet's buffer (64 KiB), a
/// flush's piece of records (about 256 KiB, counted generously), and the
/// order of its keys (16 bytes a series, 160 KB at 10,000).
pub const STATSD_TRANSIENT_BYTES: u64 = 2 * 1024 * 1024;

/// Heap an agent answer takes while it is parsed and mapped, per byte of
/// it, at most (measured in the test that holds RSS to the bound).
pub const AGENT_BODY_FACTOR: u64 = 10;

/// What the program takes before any input: code, runtime, librdkafka's
/// threads and their buffers (idle RSS with Kafka connected is about 16 MiB,
/// and 10.5 to 12.7 MiB where the code that ran to start is paged out; see
/// BENCHMARKS.md section 1).
pub const BASE_BYTES: u64 = 32 * 1024 * 1024;

/// The most containers `statsd_max_containers` may ask for (a UDP port
/// and a descriptor each).
pub const MAX_STATSD_CONTAINERS: u64 = 30_000;

/// What one registered container's listener takes besides its series: its
/// task, timer, socket and registry entry (measured in the test that
/// registers 1,000 containers, `collector/tests/statsd_containers.rs`).
pub const STATSD_CONTAINER_BYTES: u64 = 8 * 1024;

/// The most series `store_max_series` may ask for.
pub const MAX_STORE_SERIES: u64 = 10_000_000;

impl Config {
    /// The percentiles of statsd timings, as numbers (validated).
    pub fn statsd_percentile_values(&self) -> Vec<f64> {
        self.statsd_percentiles
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Whether an output reads the node store (Prometheus, the v0 API):
    /// otherwise there is none, and nothing is decoded for it.
    pub fn store_settings(&self) -> Option<crate::sinks::store::limits::StoreSettings> {
        (self.prometheus_listen.is_on() || self.metrics_api_listen.is_on()).then(|| {
            crate::sinks::store::limits::StoreSettings {
                max_series: self.store_max_series,
                expiry: std::time::Duration::from_secs(self.store_expiry_secs),
                drop_tags: self.store_drop_tags.clone(),
            }
        })
    }

    /// The memory the collector may take at most, whatever its input:
    ///
    /// ```text
    /// buffer_max_bytes
    ///   + input_buffer_max_bytes + max_connections × 16 KiB
    ///   + max_decompressed_block_bytes
    ///   + 2 × kafka_queue_max_kbytes + kafka_max_topics × 16 KiB
    ///   + max_partners × partner_buffer_kbytes
    ///   + 10 × agent_max_body_bytes            (with agent polling)
    ///   + store_max_series × 352 B              (with prometheus_listen or metrics_api_listen)
    ///   + store_max_series × 2 × 128 B         (each of them on: two answers' snapshots)
    ///   + statsd_max_bytes + 2 MiB              (with statsd_listen or statsd_control_listen: the series, packets, flushes)
    ///   + statsd_max_containers × 8 KiB         (with statsd_control_listen: each container's listener)
    ///   + 32 MiB
    /// ```
    pub fn memory_bound(&self) -> MemoryBound {
        let buffer = self.buffer_max_bytes as u64;
        let input_buffers = self.input_buffer_max_bytes as u64
            + self.max_connections as u64 * OWN_READ_BYTES as u64;
        let inflating = self.max_decompressed_block_bytes as u64;
        let kafka = if self.kafka {
            2 * self.kafka_queue_max_kbytes as u64 * 1024
                + self.kafka_max_topics as u64 * TOPIC_STATE_BYTES
        } else {
            0
        };
        let partners = self.max_partners as u64 * self.partner_buffer_kbytes as u64 * 1024;
        let agent = if self.agent_polling {
            AGENT_BODY_FACTOR * self.agent_max_body_bytes as u64
        } else {
            0
        };
        let store = self.store_settings().map_or(0, |store| {
            let readers = usize::from(self.prometheus_listen.is_on())
                * crate::sinks::store::limits::MAX_SCRAPES
                + usize::from(self.metrics_api_listen.is_on())
                    * crate::sinks::store::limits::MAX_ANSWERS;
            (store.memory_bound()
                + readers * store.max_series * crate::sinks::store::limits::SCRAPE_BYTES_PER_SERIES)
                as u64
        });
        let statsd = if self.statsd_listen.is_on() || self.statsd_control_listen.is_on() {
            let containers = if self.statsd_control_listen.is_on() {
                self.statsd_max_containers as u64 * STATSD_CONTAINER_BYTES
            } else {
                0
            };
            self.statsd_max_bytes as u64 + STATSD_TRANSIENT_BYTES + containers
        } else {
            0
        };
        MemoryBound {
            buffer,
            input_buffers,
            inflating,
            kafka,
            partners,
            agent,
            store,
            statsd,
            base: BASE_BYTES,
            total: buffer
                + input_buffers
                + inflating
                + kafka
                + partners
                + agent
                + store
                + statsd
                + BASE_BYTES,
        }
    }

    /// The bound on records waiting for their topic (`kafka_parked_max_bytes`,
    /// by default a quarter of `buffer_max_bytes`).
    pub fn parked_max_bytes(&self) -> usize {
        match self.kafka_parked_max_bytes {
            0 => self.buffer_max_bytes / 4,
            bytes => bytes,
        }
    }

    /// Checks every setting and how they fit together, without asking
    /// librdkafka about its options.
    pub fn validate_settings(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, value: u64| {
            if value == 0 {
                Err(ConfigError::new(field, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "max_connections",
                "must be greater than 0",
            ));
        }
        // Every duration must fit the clock's arithmetic with room to spare:
        // an absurd value is a typo, refused here rather than overflowing
        // later.
        for (field, value) in [
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("frame_timeout_secs", self.frame_timeout_secs),
            ("input_limit_period", self.input_limit_period),
            ("global_limit_period", self.global_limit_period),
            ("kafka_rediscover_secs", self.kafka_rediscover_secs),
            ("agent_poll_period", self.agent_poll_period),
            ("node_poll_period", self.node_poll_period),
            ("agent_timeout_secs", self.agent_timeout_secs),
            (
                "health_kafka_unavailable_secs",
                self.health_kafka_unavailable_secs,
            ),
            (
                "partner_write_timeout_secs",
                self.partner_write_timeout_secs,
            ),
        ] {
            at_most(field, value, MAX_PERIOD_SECS, "seconds (7 days)")?;
        }
        at_most(
            "kafka_produce_period_ms",
            self.kafka_produce_period_ms,
            MAX_PERIOD_SECS * 1000,
            "milliseconds (7 days)",
        )?;
        at_most(
            "shutdown_grace_secs",
            self.shutdown_grace_secs,
            MAX_GRACE_SECS,
            "seconds (a day)",
        )?;
        positive("shutdown_grace_secs", self.shutdown_grace_secs)?;
        positive(
            "partner_write_timeout_secs",
            self.partner_write_timeout_secs,
        )?;
        positive("max_partners", self.max_partners as u64)?;
        if let Listen::Unix(_) = self.prometheus_listen {
            return Err(ConfigError::new(
                "prometheus_listen",
                "Prometheus scrapes over TCP: give IP:PORT (0.0.0.0:61091), or leave it empty",
            ));
        }
        if let Some(group) = &self.metrics_api_socket_group {
            if !matches!(self.metrics_api_listen, Listen::Unix(_)) {
                return Err(ConfigError::new(
                    "metrics_api_socket_group",
                    "applies only to a unix socket: set metrics_api_listen = unix:PATH, or leave it empty",
                ));
            }
            if group.is_empty() || group.contains([':', '\n']) {
                return Err(ConfigError::new(
                    "metrics_api_socket_group",
                    format!("{group:?} is not a group name or number"),
                ));
            }
        }
        if let Listen::Unix(_) = self.statsd_listen {
            return Err(ConfigError::new(
                "statsd_listen",
                "statsd comes over UDP: give IP:PORT (127.0.0.1:61825), or leave it empty",
            ));
        }
        positive("statsd_flush_secs", self.statsd_flush_secs)?;
        at_most(
            "statsd_max_bytes",
            self.statsd_max_bytes as u64,
            MAX_BUFFER_BYTES,
            "bytes (1 TiB)",
        )?;
        if self.statsd_max_bytes < 64 * 1024 {
            return Err(ConfigError::new(
                "statsd_max_bytes",
                "must be at least 65536",
            ));
        }
        positive(
            "statsd_max_series_per_container",
            self.statsd_max_series_per_container as u64,
        )?;
        at_most(
            "statsd_max_series_per_container",
            self.statsd_max_series_per_container as u64,
            MAX_STORE_SERIES,
            "series",
        )?;
        if self.statsd_percentiles.len() > 16 {
            return Err(ConfigError::new(
                "statsd_percentiles",
                "at most 16 percentiles",
            ));
        }
        for p in &self.statsd_percentiles {
            if !p.parse::<f64>().is_ok_and(|p| p > 0.0 && p <= 100.0) {
                return Err(ConfigError::new(
                    "statsd_percentiles",
                    format!("{p:?} is not a number in (0, 100]"),
                ));
            }
        }
        if self.statsd_control_listen.is_on() {
            positive("statsd_max_containers", self.statsd_max_containers as u64)?;
            at_most(
                "statsd_max_containers",
                self.statsd_max_containers as u64,
                MAX_STATSD_CONTAINERS,
                "containers (a UDP port each)",
            )?;
            if self.statsd_host.is_unspecified() {
                return Err(ConfigError::new(
                    "statsd_host",
                    format!(
                        "{} is given to tasks as the address to send to: give one they can reach (127.0.0.1, or DC/OS's 198.51.100.1)",
                        self.statsd_host
                    ),
                ));
            }
        } else if self.statsd_state_dir.is_some() {
            return Err(ConfigError::new(
                "statsd_state_dir",
                "keeps the registered containers of statsd_control_listen, which is off: set it, or leave statsd_state_dir empty",
            ));
        }
        positive(
            "statsd_container_limit_secs",
            self.statsd_container_limit_secs,
        )?;
        at_most(
            "statsd_container_limit_secs",
            self.statsd_container_limit_secs,
            MAX_PERIOD_SECS,
            "seconds (7 days)",
        )?;
        at_most(
            "statsd_container_limit_kbytes",
            self.statsd_container_limit_kbytes,
            MAX_BUFFER_BYTES / 1024,
            "KB (1 TiB)",
        )?;
        positive("store_max_series", self.store_max_series as u64)?;
        at_most(
            "store_max_series",
            self.store_max_series as u64,
            MAX_STORE_SERIES,
            "series",
        )?;
        positive("store_expiry_secs", self.store_expiry_secs)?;
        if self.node_metrics {
            positive("node_poll_period", self.node_poll_period)?;
        }
        at_most(
            "store_expiry_secs",
            self.store_expiry_secs,
            MAX_PERIOD_SECS,
            "seconds (7 days)",
        )?;
        for (field, value, min) in [
            ("max_block_bytes", self.max_block_bytes, 1024),
            (
                "max_decompressed_block_bytes",
                self.max_decompressed_block_bytes,
                1024,
            ),
            ("agent_max_body_bytes", self.agent_max_body_bytes, 64 * 1024),
        ] {
            if value < min {
                return Err(ConfigError::new(field, format!("must be at least {min}")));
            }
            at_most(field, value as u64, MAX_BLOCK_BYTES, "bytes (1 GiB)")?;
        }
        let smallest_pool = self.max_block_bytes + READ_AHEAD_BYTES;
        if self.input_buffer_max_bytes < smallest_pool {
            return Err(ConfigError::new(
                "input_buffer_max_bytes",
                format!(
                    "must be at least max_block_bytes + 256 KiB ({smallest_pool}), so that the largest block can be read"
                ),
            ));
        }
        at_most(
            "input_buffer_max_bytes",
            self.input_buffer_max_bytes as u64,
            MAX_BUFFER_BYTES,
            "bytes (1 TiB)",
        )?;
        at_most(
            "buffer_max_bytes",
            self.buffer_max_bytes as u64,
            MAX_BUFFER_BYTES,
            "bytes (1 TiB)",
        )?;
        if self.input_limit_amount_kbytes > 0 {
            positive("input_limit_period", self.input_limit_period)?;
        }
        if self.global_limit_amount_kbytes > 0 {
            positive("global_limit_period", self.global_limit_period)?;
        }
        if self.max_block_bytes < 1024 {
            return Err(ConfigError::new("max_block_bytes", "must be at least 1024"));
        }
        let prefix_ok = self.kafka_topic_prefix.len() < 200
            && self
                .kafka_topic_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !prefix_ok {
            return Err(ConfigError::new(
                "kafka_topic_prefix",
                "may only hold [A-Za-z0-9._-] and be under 200 characters",
            ));
        }
        if let Some(topic) = &self.kafka_single_topic
            && !is_valid_topic(topic)
        {
            return Err(ConfigError::new(
                "kafka_single_topic",
                format!(
                    "{topic:?} is not a valid Kafka topic ([A-Za-z0-9._-], 1 to 249 characters)"
                ),
            ));
        }
        if self.kafka && self.kafka_brokers.is_empty() && self.kafka_framework.is_empty() {
            return Err(ConfigError::new(
                "kafka_brokers",
                "either kafka_brokers or kafka_framework must be set",
            ));
        }
        if let Some(url) = &self.kafka_scheduler_url
            && reqwest::Url::parse(url).is_err()
        {
            return Err(ConfigError::new(
                "kafka_scheduler_url",
                format!("{url:?} is not a URL"),
            ));
        }
        positive("kafka_produce_count", self.kafka_produce_count as u64)?;
        positive("kafka_produce_kbytes", self.kafka_produce_kbytes as u64)?;
        positive("kafka_produce_period_ms", self.kafka_produce_period_ms)?;
        positive("kafka_rediscover_secs", self.kafka_rediscover_secs)?;
        if self.kafka_max_message_bytes < 4096 {
            return Err(ConfigError::new(
                "kafka_max_message_bytes",
                "must be at least 4096",
            ));
        }
        if self.kafka_topic_partitions < 1 {
            return Err(ConfigError::new(
                "kafka_topic_partitions",
                "must be at least 1",
            ));
        }
        if self.kafka_topic_replication < 1 {
            return Err(ConfigError::new(
                "kafka_topic_replication",
                "must be at least 1",
            ));
        }
        if self.buffer_max_bytes < self.kafka_max_message_bytes {
            return Err(ConfigError::new(
                "buffer_max_bytes",
                "must be at least kafka_max_message_bytes",
            ));
        }
        if self.kafka_parked_max_bytes != 0 && self.kafka_parked_max_bytes < 64 * 1024 {
            return Err(ConfigError::new(
                "kafka_parked_max_bytes",
                "must be 0 (a quarter of buffer_max_bytes) or at least 65536",
            ));
        }
        if self.kafka_parked_max_bytes > self.buffer_max_bytes / 2 {
            return Err(ConfigError::new(
                "kafka_parked_max_bytes",
                format!(
                    "must be at most half of buffer_max_bytes ({}), so that a refused topic leaves the others room",
                    self.buffer_max_bytes / 2
                ),
            ));
        }
        if !(1..=100_000).contains(&self.kafka_max_topics) {
            return Err(ConfigError::new(
                "kafka_max_topics",
                "must be between 1 and 100000",
            ));
        }
        if self.buffer_type == BufferType::Disk {
            match &self.spool_dir {
                None => {
                    return Err(ConfigError::new(
                        "spool_dir",
                        "buffer_type = disk needs spool_dir",
                    ));
                }
                Some(dir) if dir.as_os_str().is_empty() => {
                    return Err(ConfigError::new("spool_dir", "must not be empty"));
                }
                Some(_) => {}
            }
            if self.spool_max_bytes < self.buffer_max_bytes as u64 {
                return Err(ConfigError::new(
                    "spool_max_bytes",
                    format!(
                        "must be at least buffer_max_bytes ({}), so that what the memory buffer holds fits on disk",
                        self.buffer_max_bytes
                    ),
                ));
            }
            at_most(
                "spool_max_bytes",
                self.spool_max_bytes,
                MAX_BUFFER_BYTES,
                "bytes (1 TiB)",
            )?;
            positive("spool_fsync_ms", self.spool_fsync_ms)?;
            at_most(
                "spool_fsync_ms",
                self.spool_fsync_ms,
                60 * 1000,
                "milliseconds (a minute)",
            )?;
        }
        for broker in &self.kafka_brokers {
            check_broker(broker).map_err(|message| {
                ConfigError::new("kafka_brokers", format!("{broker:?}: {message}"))
            })?;
        }
        if self.agent_polling {
            positive("agent_poll_period", self.agent_poll_period)?;
            positive("agent_timeout_secs", self.agent_timeout_secs)?;
            if let Some(url) = &self.agent_url
                && reqwest::Url::parse(url).is_err()
            {
                return Err(ConfigError::new(
                    "agent_url",
                    format!("{url:?} is not a URL"),
                ));
            }
        }
        if !self.api_listen.ip().is_loopback()
            && self.api_token.as_deref().is_none_or(str::is_empty)
        {
            return Err(ConfigError::new(
                "api_token",
                format!(
                    "the API listens beyond loopback ({}): set api_token",
                    self.api_listen
                ),
            ));
        }
        positive("partner_buffer_kbytes", self.partner_buffer_kbytes as u64)?;
        positive(
            "health_kafka_unavailable_secs",
            self.health_kafka_unavailable_secs,
        )?;
        // Span field filters (`[span{field=value}]`) are refused: their
        // values are regular expressions whose matchers are built eagerly
        // as DFAs, and `a.{16}b` takes half a minute to build, a few more
        // dots hours, in the request that sets it (found by fuzzing
        // config_patch).
        if self.log_level.len() > MAX_LOG_LEVEL_BYTES {
            return Err(ConfigError::new(
                "log_level",
                format!("at most {MAX_LOG_LEVEL_BYTES} bytes"),
            ));
        }
        if !self.log_level.is_ascii() {
            // tracing-subscriber's directive parser panics on some
            // non-ASCII span names (found by fuzzing config_patch:
            // `[e 0 ɤ]`); targets and spans are ASCII names anyway.
            return Err(ConfigError::new("log_level", "must be ASCII"));
        }
        if self.log_level.contains('{') {
            return Err(ConfigError::new(
                "log_level",
                "span field filters (`{…}`) are not accepted: name targets and spans, \
                 e.g. `collector=debug` or `collector[input]=debug`",
            ));
        }
        // A panic of the parser on some other input is an error too.
        let parsed = std::panic::catch_unwind(|| {
            tracing_subscriber::EnvFilter::try_new(&self.log_level).map(drop)
        });
        match parsed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(ConfigError::new("log_level", error.to_string())),
            Err(_) => return Err(ConfigError::new("log_level", "not a log filter")),
        }
        for key in self.static_tags.keys() {
            if key.is_empty() {
                return Err(ConfigError::new("static_tags", "tag keys may not be empty"));
            }
        }
        Ok(())
    }

    /// Checks the configuration as a whole: [`validate_settings`], then the
    /// librdkafka options.
    ///
    /// [`validate_settings`]: Self::validate_settings
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_settings()?;
        security::Credentials::from(self).check()?;
        if self.kafka {
            // librdkafka checks its options when a client is made: make one
            // (connected to nothing), so that a bad option is refused here
            // rather than logged in a loop by a daemon that delivers nothing.
            let security = security::KafkaSecurity::from(self);
            security.check()?;
            let overrides = self.librdkafka_overrides();
            librdkafka::check_client_config(librdkafka::ClientOptions::of(
                self, &security, &overrides,
            ))?;
        }
        Ok(())
    }

    /// The `librdkafka` pass-through options, as pairs.
    pub fn librdkafka_overrides(&self) -> Vec<(String, String)> {
        self.librdkafka
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Reads a TOML file. Errors name the key and give the file, line and
    /// column; a syntax error names the file itself (`config`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("config", format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>| {
            span.map(|span| {
                let start = span.start.min(text.len());
                let line = text[..start].matches('\n').count() + 1;
                let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
                let column = text[line_start..start].chars().count() + 1;
                (format!("{origin}:{line}:{column}"), line_start)
            })
            .unwrap_or_else(|| (origin.to_owned(), text.len()))
        };
        if let Err(e) = text.parse::<toml::Table>() {
            let (place, _) = at(e.span());
            return Err(ConfigError::new(
                "config",
                format!("{place}: not valid TOML: {}", e.message().trim()),
            ));
        }
        toml::from_str(text).map_err(|e| {
            let (place, line_start) = at(e.span());
            // An unknown key is named by the message; a bad value by the key
            // on its line.
            let field = unknown_field(e.message()).unwrap_or_else(|| {
                let line = text[line_start..].lines().next().unwrap_or_default();
                line.split('=').next().unwrap_or(line).trim().to_owned()
            });
            // An empty key is still named (found by fuzzing: `"" = 1`).
            let field = if field.is_empty() || field == "\"\"" {
                "(an empty key)".to_owned()
            } else {
                field
            };
            ConfigError::new(&field, format!("{place}: {}", e.message().trim()))
        })
    }
}

/// sysexits(3) EX_USAGE: the configuration is wrong.
pub const EX_USAGE: u8 = 64;

/// Reports a command-line error the way every configuration error is
/// reported: help and version are printed as asked; anything else names the
/// option and exits 64 (not clap's 2).
pub fn usage_error(program: &str, error: clap::Error) -> std::process::ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => error.exit(),
        _ => {}
    }
    let field = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg
            .trim_start_matches('-')
            .split([' ', '='])
            .next()
            .unwrap_or_default()
            .replace('-', "_"),
        _ => "arguments".to_owned(),
    };
    let text = error.to_string();
    let message = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    eprintln!("{program}: invalid configuration: {field}: {message} (see {program} --help)");
    std::process::ExitCode::from(EX_USAGE)
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// The longest `log_level` accepted.
pub const MAX_LOG_LEVEL_BYTES: usize = 1024;

/// The key serde names in an "unknown field" message, for errors that name
/// the field (TOML files and `PATCH /v1/config` bodies).
pub(crate) fn unknown_field(message: &str) -> Option<String> {
    let start = message.find("unknown field `")? + "unknown field `".len();
    let end = message[start..].find('`')?;
    Some(message[start..start + end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option table of `docs/configuration.md` is the declaration's:
    /// regenerate it with `UPDATE_DOCS=1 cargo test -p collector --lib
    /// options_table`.
    #[test]
    fn the_options_table_in_the_docs_is_the_declaration() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = ("<!-- options:begin -->\n", "<!-- options:end -->");
        let start = readme
            .find(begin)
            .expect("docs/configuration.md has the options markers")
            + begin.len();
        let stop = readme[start..].find(end).expect("the end marker") + start;
        let table = markdown_table();
        if readme[start..stop] != table {
            if std::env::var_os("UPDATE_DOCS").is_some() {
                let updated = format!("{}{table}{}", &readme[..start], &readme[stop..]);
                std::fs::write(&path, updated).unwrap();
            } else {
                panic!(
                    "docs/configuration.md's option table differs from the declaration; run UPDATE_DOCS=1 cargo test -p collector --lib options_table"
                );
            }
        }
        for option in OPTIONS {
            assert!(!option.doc.trim().is_empty(), "{} has no doc", option.name);
            assert!(
                option
                    .env
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_'),
                "{}",
                option.env
            );
        }
    }

    #[test]
    fn the_declared_runtime_keys_are_the_ones_patch_may_change() {
        for key in [
            "kafka_topic_prefix",
            "static_tags",
            "buffer_full_policy",
            "log_level",
        ] {
            assert!(is_runtime(key), "{key}");
        }
        for key in [
            "listen_endpoint",
            "librdkafka",
            "kafka",
            "shutdown_grace_secs",
        ] {
            assert!(!is_runtime(key), "{key}");
        }
        assert!(!is_runtime("no_such_key"));
    }
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConfigArgs,
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("collector-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "kafka_topic_prefix = \"file-\"\nkafka_produce_count = 7\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            file.to_str().unwrap(),
            "--kafka-produce-count",
            "9",
        ]);
        let config = cli.args.load(no_env).unwrap();
        assert_eq!(config.kafka_topic_prefix, "file-");
        assert_eq!(config.kafka_produce_count, 9);
        assert_eq!(config.kafka_produce_kbytes, 512);
    }

    #[test]
    fn unknown_file_keys_name_the_field() {
        let dir = std::env::temp_dir().join(format!("collector-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "kafka_topic_prefixx = \"a\"\n").unwrap();
        let err = Config::from_file(&file).unwrap_err();
        assert_eq!(err.field, "kafka_topic_prefixx", "{err}");
        std::fs::write(
            &file,
            "kafka_topic_prefix = \"ok\"\nbuffer_full_policy = \"sometimes\"\n",
        )
        .unwrap();
        let err = Config::from_file(&file).unwrap_err();
        assert_eq!(err.field, "buffer_full_policy", "{err}");
    }

    /// Found by fuzzing (config_patch): a span field filter's value is a
    /// regular expression that tracing builds as a DFA at once; `a.{24}b`
    /// took over four minutes of CPU in the `PATCH /v1/config` that set it.
    #[test]
    fn log_levels_whose_filters_take_minutes_to_build_are_refused() {
        let dots = ".".repeat(24);
        for log_level in [
            format!("x[s{{f=a{dots}b}}]=debug"),
            "x".repeat(2000),
            // Found by fuzzing too: tracing-subscriber panicked parsing it.
            "[e  [0],8[[[[0],l.g_[8],[[[[0], [e 0 \u{264}],[%[[0]".to_owned(),
        ] {
            let config = Config {
                log_level,
                ..Config::default()
            };
            let err = config.validate_settings().unwrap_err();
            assert_eq!(err.field, "log_level", "{err}");
        }
        for fine in ["info", "collector=debug,info", "collector[input]=debug"] {
            let config = Config {
                log_level: fine.into(),
                ..Config::default()
            };
            config.validate_settings().unwrap();
        }
    }

    /// Found by fuzzing (config_toml): an empty key gave an error naming no
    /// field.
    #[test]
    fn an_empty_key_is_named_too() {
        let err = Config::from_toml("\"\"=\"f\"", "c.toml").unwrap_err();
        assert_eq!(err.field, "(an empty key)", "{err}");
    }

    #[test]
    fn the_original_misspelt_env_name_works() {
        let cli = Cli::parse_from(["x"]);
        let config = cli
            .args
            .load(|k| (k == "LISTEN_ENDPONT").then(|| "127.0.0.1:9999".into()))
            .unwrap();
        assert_eq!(config.listen_endpoint.port(), 9999);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cli = Cli::parse_from(["x", "--kafka-single-topic", "bad topic!"]);
        assert_eq!(
            cli.args.load(no_env).unwrap_err().field,
            "kafka_single_topic"
        );
        let cli = Cli::parse_from(["x", "--kafka-produce-count", "0"]);
        assert_eq!(
            cli.args.load(no_env).unwrap_err().field,
            "kafka_produce_count"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let cli = Cli::parse_from([
            "x",
            "--auth-credential",
            "s3cret",
            "--librdkafka",
            "sasl.password=pw",
        ]);
        let config = cli.args.load(no_env).unwrap();
        let shown = toml::to_string(&config.redacted()).unwrap();
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw\""),
            "{shown}"
        );
        assert_eq!(config.auth_credential.as_deref(), Some("s3cret"));
    }

    #[test]
    fn repeated_pairs_parse() {
        let cli = Cli::parse_from([
            "x",
            "--static-tag",
            "dc=eu,rack=r1",
            "--librdkafka",
            "linger.ms=7",
        ]);
        let config = cli.args.load(no_env).unwrap();
        assert_eq!(
            config.static_tags.get("rack").map(String::as_str),
            Some("r1")
        );
        assert_eq!(
            config.librdkafka.get("linger.ms").map(String::as_str),
            Some("7")
        );
    }
}
