//! Configuration: every option is a CLI flag, an env var, and a key in an
//! optional TOML file. Flags beat env, env beats the file, the file beats the
//! defaults. Flag `--kafka-brokers` is env `KAFKA_BROKERS` and file key
//! `kafka_brokers`, as in the original, whose env names work unchanged
//! (including its misspelt `LISTEN_ENDPONT`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Args};
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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The collector's whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP input address. Loopback by default, as in the original.
    pub listen_endpoint: SocketAddr,
    /// Most TCP input connections open at once; more are refused.
    pub max_connections: usize,
    /// Close an input connection that sends nothing for this long (0: never).
    pub idle_timeout_secs: u64,
    /// Per-connection input limit in KB per `input_limit_period` (0: none).
    /// Records over the limit are read and dropped, counted as `rate_limited`.
    pub input_limit_amount_kbytes: u64,
    /// Period of the per-connection limit, in seconds.
    pub input_limit_period: u64,
    /// Limit over all connections together, in KB per period (0: none).
    pub global_limit_amount_kbytes: u64,
    /// Period of the global limit, in seconds.
    pub global_limit_period: u64,
    /// Largest OCF block accepted on an input, in bytes.
    pub max_block_bytes: usize,
    /// Largest OCF block accepted on an input once decompressed, in bytes.
    pub max_decompressed_block_bytes: usize,
    /// A header or block that has started must arrive whole within this
    /// many seconds, or the connection is closed (0: no limit).
    pub frame_timeout_secs: u64,
    /// Bound on the read buffers of all input connections together, beyond
    /// the 16 KiB each may hold on its own, in bytes.
    pub input_buffer_max_bytes: usize,

    /// Kafka topic = this prefix + the record's `topic`.
    pub kafka_topic_prefix: String,
    /// When set, every record goes to this one topic instead.
    pub kafka_single_topic: Option<String>,
    /// Tags added to every record that lacks them.
    pub static_tags: BTreeMap<String, String>,

    /// Send to Kafka. When false, records are counted and discarded (a null
    /// sink, for benchmarks and dry runs).
    pub kafka: bool,
    /// Static broker list; wins over framework discovery.
    pub kafka_brokers: Vec<String>,
    /// Kafka framework to discover brokers from, via Mesos-DNS SRV
    /// `_NAME._tcp.marathon.mesos` and the scheduler's `/v1/connection`.
    pub kafka_framework: String,
    /// Use this scheduler URL instead of the DNS lookup.
    pub kafka_scheduler_url: Option<String>,
    /// DNS server to ask for the SRV and A records (default: the system's).
    pub dns_server: Option<SocketAddr>,
    /// Rediscover brokers this often, in seconds (and whenever all are down).
    pub kafka_rediscover_secs: u64,
    /// Flush a topic's batch at this many records.
    pub kafka_produce_count: usize,
    /// Flush a topic's batch at this many KB.
    pub kafka_produce_kbytes: usize,
    /// Flush a topic's batch when its oldest record is this old, in ms.
    pub kafka_produce_period_ms: u64,
    /// Snappy compression of Kafka messages (the original's default).
    pub kafka_compress_snappy: bool,
    /// acks=all with idempotence (default); false means acks=1.
    pub kafka_require_all_acks: bool,
    /// Partition by the value of this tag (default: no key, as the original).
    pub kafka_partition_key_tag: Option<String>,
    /// Largest Kafka message value; batches are split below it.
    pub kafka_max_message_bytes: usize,
    /// Partitions for topics the collector creates.
    pub kafka_topic_partitions: i32,
    /// Replication factor for topics the collector creates.
    pub kafka_topic_replication: i32,
    /// Bound on librdkafka's own queue, in KB.
    pub kafka_queue_max_kbytes: usize,
    /// Any other librdkafka option, passed through last.
    pub librdkafka: BTreeMap<String, String>,

    /// Bound on the buffer between the inputs and the sink, in bytes.
    pub buffer_max_bytes: usize,
    /// What a full buffer does.
    pub buffer_full_policy: FullPolicy,
    /// How long shutdown may take to deliver what is queued, in seconds.
    pub shutdown_grace_secs: u64,

    /// Poll the Mesos agent for enrichment and its own metrics (the
    /// original's `-agent-polling`).
    pub agent_polling: bool,
    /// The agent's base URL; when unset, `agent_ip_command` finds its IP.
    pub agent_url: Option<String>,
    /// Command printing the agent's IP (the original's `-agent-ip-command`).
    pub agent_ip_command: String,
    /// Agent port, with `agent_ip_command`.
    pub agent_port: u16,
    /// Agent poll period, seconds.
    pub agent_poll_period: u64,
    /// Agent request timeout, seconds.
    pub agent_timeout_secs: u64,
    /// Largest agent response body read, in bytes; a larger one is refused.
    pub agent_max_body_bytes: usize,
    /// Topic of the agent's `/metrics/snapshot` data.
    pub agent_metrics_topic: String,
    /// Sent to the agent as `Authorization: token=<x>`. Secret: redacted in
    /// every output.
    pub auth_credential: Option<String>,

    /// HTTP API address (loopback by default; port 0 allowed).
    pub api_listen: SocketAddr,
    /// Bearer token for mutating API requests; required when the API listens
    /// beyond loopback. Secret: redacted in every output.
    pub api_token: Option<String>,
    /// Partner output address (loopback by default; port 0 allowed).
    pub partner_listen: SocketAddr,
    /// Bytes queued per partner before its oldest blocks are dropped, KB.
    pub partner_buffer_kbytes: usize,
    /// A partner that has lost more than this is disconnected, KB.
    pub partner_disconnect_after_dropped_kbytes: usize,
    /// Most partners connected at once; more are refused.
    pub max_partners: usize,
    /// A partner that takes no bytes of a write for this long is
    /// disconnected, seconds.
    pub partner_write_timeout_secs: u64,
    /// `/health` answers 503 once Kafka has been unreachable this long, seconds.
    pub health_kafka_unavailable_secs: u64,

    /// Log filter, e.g. `info` or `collector=debug`.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_endpoint: SocketAddr::from(([127, 0, 0, 1], 8124)),
            max_connections: 1024,
            idle_timeout_secs: 300,
            input_limit_amount_kbytes: 20480,
            input_limit_period: 60,
            global_limit_amount_kbytes: 40960,
            global_limit_period: 60,
            max_block_bytes: schema::Limits::default().max_block_bytes,
            max_decompressed_block_bytes: 16 * 1024 * 1024,
            frame_timeout_secs: 60,
            input_buffer_max_bytes: 16 * 1024 * 1024,
            kafka_topic_prefix: "metrics-".into(),
            kafka_single_topic: None,
            static_tags: BTreeMap::new(),
            kafka: true,
            kafka_brokers: Vec::new(),
            kafka_framework: "kafka".into(),
            kafka_scheduler_url: None,
            dns_server: None,
            kafka_rediscover_secs: 60,
            kafka_produce_count: 1024,
            kafka_produce_kbytes: 512,
            kafka_produce_period_ms: 1000,
            kafka_compress_snappy: true,
            kafka_require_all_acks: true,
            kafka_partition_key_tag: None,
            kafka_max_message_bytes: 1_000_000,
            kafka_topic_partitions: 1,
            kafka_topic_replication: 1,
            // The bounded buffer holds an outage; librdkafka only needs enough to
            // keep the brokers busy: 4 MiB kept the throughput of 8 MiB and
            // took 6 MiB off the outage RSS; 2 MiB cost 17 % (BENCHMARKS.md).
            kafka_queue_max_kbytes: 4 * 1024,
            librdkafka: BTreeMap::new(),
            buffer_max_bytes: 64 * 1024 * 1024,
            buffer_full_policy: FullPolicy::Block,
            shutdown_grace_secs: 30,
            agent_polling: true,
            agent_url: None,
            agent_ip_command: "/opt/mesosphere/bin/detect_ip".into(),
            agent_port: 5051,
            agent_poll_period: 15,
            agent_timeout_secs: 5,
            agent_max_body_bytes: 8 * 1024 * 1024,
            agent_metrics_topic: "agent".into(),
            auth_credential: None,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8123)),
            api_token: None,
            partner_listen: SocketAddr::from(([127, 0, 0, 1], 8126)),
            partner_buffer_kbytes: 4096,
            partner_disconnect_after_dropped_kbytes: 65536,
            max_partners: 8,
            partner_write_timeout_secs: 10,
            health_kafka_unavailable_secs: 60,
            log_level: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

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
    fn new(field: &str, message: impl Into<String>) -> Self {
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
    /// librdkafka's queue, and messages it hands back to be produced again.
    pub kafka: u64,
    /// The partners' queues.
    pub partners: u64,
    /// An agent answer being parsed and mapped.
    pub agent: u64,
    /// The program itself: code, runtime, librdkafka's threads and buffers.
    pub base: u64,
    /// All of it.
    pub total: u64,
}

/// Heap an agent answer takes while it is parsed and mapped, per byte of
/// it, at most (measured in the test that holds RSS to the bound).
pub const AGENT_BODY_FACTOR: u64 = 10;

/// What the program takes before any input: code, runtime, librdkafka's
/// threads and their buffers (idle RSS is 15 to 20 MiB; see BENCHMARKS.md).
pub const BASE_BYTES: u64 = 32 * 1024 * 1024;

impl Config {
    /// The memory the collector may take at most, whatever its input:
    ///
    /// ```text
    /// buffer_max_bytes
    ///   + input_buffer_max_bytes + max_connections × 16 KiB
    ///   + max_decompressed_block_bytes
    ///   + 2 × kafka_queue_max_kbytes
    ///   + max_partners × partner_buffer_kbytes
    ///   + 10 × agent_max_body_bytes            (with agent polling)
    ///   + 32 MiB
    /// ```
    pub fn memory_bound(&self) -> MemoryBound {
        let buffer = self.buffer_max_bytes as u64;
        let input_buffers = self.input_buffer_max_bytes as u64
            + self.max_connections as u64 * crate::ingest::OWN_READ_BYTES as u64;
        let inflating = self.max_decompressed_block_bytes as u64;
        let kafka = if self.kafka {
            2 * self.kafka_queue_max_kbytes as u64 * 1024
        } else {
            0
        };
        let partners = self.max_partners as u64 * self.partner_buffer_kbytes as u64 * 1024;
        let agent = if self.agent_polling {
            AGENT_BODY_FACTOR * self.agent_max_body_bytes as u64
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
            base: BASE_BYTES,
            total: buffer + input_buffers + inflating + kafka + partners + agent + BASE_BYTES,
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
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(ConfigError::new("log_level", error.to_string()));
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
        if self.kafka {
            // librdkafka checks its options when a client is made: make one
            // (connected to nothing), so that a bad option is refused here
            // rather than logged in a loop by a daemon that delivers nothing.
            crate::sink::kafka::check_client_config(self)
                .map_err(|message| ConfigError::new("librdkafka", message))?;
        }
        Ok(())
    }

    /// The configuration with every secret replaced by `<redacted>`, for
    /// output.
    pub fn redacted(&self) -> Self {
        let mut config = self.clone();
        if config.auth_credential.is_some() {
            config.auth_credential = Some("<redacted>".into());
        }
        if config.api_token.is_some() {
            config.api_token = Some("<redacted>".into());
        }
        for (key, value) in &mut config.librdkafka {
            if key.contains("password") || key.contains("secret") || key.contains("token") {
                *value = "<redacted>".into();
            }
        }
        config
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
            let field = crate::runtime::unknown_field(e.message()).unwrap_or_else(|| {
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

/// The command-line (and env) form of [`Config`]. Every field is optional so
/// that what was not given falls through to the file and the defaults.
#[derive(Debug, Default, Clone, Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "COLLECTOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// TCP input address [default: 127.0.0.1:8124] (also env LISTEN_ENDPONT).
    #[arg(long, env = "LISTEN_ENDPOINT")]
    pub listen_endpoint: Option<SocketAddr>,
    /// Most input connections at once [default: 1024].
    #[arg(long, env = "MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Idle input connection timeout, seconds, 0 for none [default: 300].
    #[arg(long, env = "IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Per-connection input limit, KB per period, 0 for none [default: 20480].
    #[arg(long, env = "INPUT_LIMIT_AMOUNT_KBYTES")]
    pub input_limit_amount_kbytes: Option<u64>,
    /// Per-connection limit period, seconds [default: 60].
    #[arg(long, env = "INPUT_LIMIT_PERIOD")]
    pub input_limit_period: Option<u64>,
    /// Global input limit, KB per period, 0 for none [default: 40960].
    #[arg(long, env = "GLOBAL_LIMIT_AMOUNT_KBYTES")]
    pub global_limit_amount_kbytes: Option<u64>,
    /// Global limit period, seconds [default: 60].
    #[arg(long, env = "GLOBAL_LIMIT_PERIOD")]
    pub global_limit_period: Option<u64>,
    /// Largest input OCF block, bytes [default: 8 MiB].
    #[arg(long, env = "MAX_BLOCK_BYTES")]
    pub max_block_bytes: Option<usize>,
    /// Largest input OCF block once decompressed, bytes [default: 16 MiB].
    #[arg(long, env = "MAX_DECOMPRESSED_BLOCK_BYTES")]
    pub max_decompressed_block_bytes: Option<usize>,
    /// A started header or block must arrive within this, seconds, 0 for none [default: 60].
    #[arg(long, env = "FRAME_TIMEOUT_SECS")]
    pub frame_timeout_secs: Option<u64>,
    /// Bound on all input read buffers beyond 16 KiB each, bytes [default: 16 MiB].
    #[arg(long, env = "INPUT_BUFFER_MAX_BYTES")]
    pub input_buffer_max_bytes: Option<usize>,
    /// Kafka topic prefix [default: metrics-].
    #[arg(long, env = "KAFKA_TOPIC_PREFIX")]
    pub kafka_topic_prefix: Option<String>,
    /// Send every record to this one topic.
    #[arg(long, env = "KAFKA_SINGLE_TOPIC")]
    pub kafka_single_topic: Option<String>,
    /// Static tag KEY=VALUE added to records that lack it (repeatable; env: comma list).
    #[arg(long = "static-tag", env = "STATIC_TAGS", value_delimiter = ',', value_parser = parse_pair)]
    pub static_tags: Option<Vec<(String, String)>>,
    /// Send to Kafka; false discards (null sink) [default: true].
    #[arg(long, env = "KAFKA", action = ArgAction::Set, value_parser = parse_bool)]
    pub kafka: Option<bool>,
    /// Static comma-separated broker list; wins over discovery.
    #[arg(long, env = "KAFKA_BROKERS", value_delimiter = ',')]
    pub kafka_brokers: Option<Vec<String>>,
    /// Kafka framework name to discover brokers from [default: kafka].
    #[arg(long, env = "KAFKA_FRAMEWORK")]
    pub kafka_framework: Option<String>,
    /// Kafka scheduler base URL, instead of the DNS lookup.
    #[arg(long, env = "KAFKA_SCHEDULER_URL")]
    pub kafka_scheduler_url: Option<String>,
    /// DNS server (IP:PORT) for the SRV and A lookups.
    #[arg(long, env = "DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Broker rediscovery period, seconds [default: 60].
    #[arg(long, env = "KAFKA_REDISCOVER_SECS")]
    pub kafka_rediscover_secs: Option<u64>,
    /// Flush a topic batch at this many records [default: 1024].
    #[arg(long, env = "KAFKA_PRODUCE_COUNT")]
    pub kafka_produce_count: Option<usize>,
    /// Flush a topic batch at this many KB [default: 512].
    #[arg(long, env = "KAFKA_PRODUCE_KBYTES")]
    pub kafka_produce_kbytes: Option<usize>,
    /// Flush a topic batch at this age, ms [default: 1000].
    #[arg(long, env = "KAFKA_PRODUCE_PERIOD_MS")]
    pub kafka_produce_period_ms: Option<u64>,
    /// Snappy-compress Kafka messages [default: true].
    #[arg(long, env = "KAFKA_COMPRESS_SNAPPY", action = ArgAction::Set, value_parser = parse_bool)]
    pub kafka_compress_snappy: Option<bool>,
    /// acks=all with idempotence [default: true].
    #[arg(long, env = "KAFKA_REQUIRE_ALL_ACKS", action = ArgAction::Set, value_parser = parse_bool)]
    pub kafka_require_all_acks: Option<bool>,
    /// Partition key: the value of this tag.
    #[arg(long, env = "KAFKA_PARTITION_KEY_TAG")]
    pub kafka_partition_key_tag: Option<String>,
    /// Largest Kafka message value, bytes [default: 1000000].
    #[arg(long, env = "KAFKA_MAX_MESSAGE_BYTES")]
    pub kafka_max_message_bytes: Option<usize>,
    /// Partitions of topics the collector creates [default: 1].
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS")]
    pub kafka_topic_partitions: Option<i32>,
    /// Replication of topics the collector creates [default: 1].
    #[arg(long, env = "KAFKA_TOPIC_REPLICATION")]
    pub kafka_topic_replication: Option<i32>,
    /// Bound on librdkafka's queue, KB [default: 4096].
    #[arg(long, env = "KAFKA_QUEUE_MAX_KBYTES")]
    pub kafka_queue_max_kbytes: Option<usize>,
    /// librdkafka option KEY=VALUE (repeatable; env: comma list).
    #[arg(long = "librdkafka", env = "LIBRDKAFKA", value_delimiter = ',', value_parser = parse_pair)]
    pub librdkafka: Option<Vec<(String, String)>>,
    /// Buffer bound, bytes [default: 64 MiB].
    #[arg(long, env = "BUFFER_MAX_BYTES")]
    pub buffer_max_bytes: Option<usize>,
    /// Full-buffer policy [default: block].
    #[arg(long, env = "BUFFER_FULL_POLICY")]
    pub buffer_full_policy: Option<FullPolicy>,
    /// Shutdown grace, seconds [default: 30].
    #[arg(long, env = "SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Poll the Mesos agent [default: true].
    #[arg(long, env = "AGENT_POLLING", action = ArgAction::Set, value_parser = parse_bool)]
    pub agent_polling: Option<bool>,
    /// Agent base URL (instead of agent_ip_command + agent_port).
    #[arg(long, env = "AGENT_URL")]
    pub agent_url: Option<String>,
    /// Command printing the agent IP [default: /opt/mesosphere/bin/detect_ip].
    #[arg(long, env = "AGENT_IP_COMMAND")]
    pub agent_ip_command: Option<String>,
    /// Agent port [default: 5051].
    #[arg(long, env = "AGENT_PORT")]
    pub agent_port: Option<u16>,
    /// Agent poll period, seconds [default: 15].
    #[arg(long, env = "AGENT_POLL_PERIOD")]
    pub agent_poll_period: Option<u64>,
    /// Agent request timeout, seconds [default: 5].
    #[arg(long, env = "AGENT_TIMEOUT_SECS")]
    pub agent_timeout_secs: Option<u64>,
    /// Largest agent response body, bytes [default: 8 MiB].
    #[arg(long, env = "AGENT_MAX_BODY_BYTES")]
    pub agent_max_body_bytes: Option<usize>,
    /// Topic for the agent's /metrics/snapshot [default: agent].
    #[arg(long, env = "AGENT_METRICS_TOPIC")]
    pub agent_metrics_topic: Option<String>,
    /// Agent credential, sent as `Authorization: token=<x>` (secret).
    #[arg(long, env = "AUTH_CREDENTIAL", hide_env_values = true)]
    pub auth_credential: Option<String>,
    /// HTTP API address [default: 127.0.0.1:8123].
    #[arg(long, env = "API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Bearer token for mutating API requests (secret).
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Partner output address [default: 127.0.0.1:8126].
    #[arg(long, env = "PARTNER_LISTEN")]
    pub partner_listen: Option<SocketAddr>,
    /// Per-partner queue, KB [default: 4096].
    #[arg(long, env = "PARTNER_BUFFER_KBYTES")]
    pub partner_buffer_kbytes: Option<usize>,
    /// Disconnect a partner after it lost this much, KB [default: 65536].
    #[arg(long, env = "PARTNER_DISCONNECT_AFTER_DROPPED_KBYTES")]
    pub partner_disconnect_after_dropped_kbytes: Option<usize>,
    /// Most partners at once [default: 8].
    #[arg(long, env = "MAX_PARTNERS")]
    pub max_partners: Option<usize>,
    /// Disconnect a partner that takes nothing for this long, seconds [default: 10].
    #[arg(long, env = "PARTNER_WRITE_TIMEOUT_SECS")]
    pub partner_write_timeout_secs: Option<u64>,
    /// /health turns 503 after Kafka is unreachable this long, s [default: 60].
    #[arg(long, env = "HEALTH_KAFKA_UNAVAILABLE_SECS")]
    pub health_kafka_unavailable_secs: Option<u64>,
    /// Log filter [default: info].
    #[arg(long, env = "LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

macro_rules! overlay {
    ($config:ident, $args:ident, $($field:ident),* $(,)?) => {
        $( if let Some(value) = $args.$field { $config.$field = value; } )*
    };
}

impl ConfigArgs {
    /// Builds the effective configuration: defaults, then the file, then env
    /// and flags (clap has already let flags beat env). `legacy_env` looks up
    /// the original's env names that clap can't attach (`LISTEN_ENDPONT`).
    pub fn load(self, legacy_env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let mut args = self;
        if args.listen_endpoint.is_none()
            && let Some(value) = legacy_env("LISTEN_ENDPONT")
        {
            args.listen_endpoint = Some(value.parse().map_err(|e| {
                ConfigError::new("listen_endpoint", format!("LISTEN_ENDPONT={value:?}: {e}"))
            })?);
        }
        if let Some(tags) = args.static_tags.take() {
            config.static_tags = tags.into_iter().collect();
        }
        if let Some(options) = args.librdkafka.take() {
            config.librdkafka = options.into_iter().collect();
        }
        if let Some(topic) = args.kafka_single_topic.take() {
            config.kafka_single_topic = (!topic.is_empty()).then_some(topic);
        }
        if let Some(url) = args.kafka_scheduler_url.take() {
            config.kafka_scheduler_url = (!url.is_empty()).then_some(url);
        }
        if let Some(tag) = args.kafka_partition_key_tag.take() {
            config.kafka_partition_key_tag = (!tag.is_empty()).then_some(tag);
        }
        if let Some(url) = args.agent_url.take() {
            config.agent_url = (!url.is_empty()).then_some(url);
        }
        if let Some(credential) = args.auth_credential.take() {
            config.auth_credential = (!credential.is_empty()).then_some(credential);
        }
        if let Some(token) = args.api_token.take() {
            config.api_token = (!token.is_empty()).then_some(token);
        }
        if let Some(server) = args.dns_server.take() {
            config.dns_server = Some(server);
        }
        if let Some(brokers) = args.kafka_brokers.take() {
            config.kafka_brokers = brokers
                .into_iter()
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty())
                .collect();
        }
        overlay!(
            config,
            args,
            listen_endpoint,
            max_connections,
            idle_timeout_secs,
            input_limit_amount_kbytes,
            input_limit_period,
            global_limit_amount_kbytes,
            global_limit_period,
            max_block_bytes,
            max_decompressed_block_bytes,
            frame_timeout_secs,
            input_buffer_max_bytes,
            kafka_topic_prefix,
            kafka,
            kafka_framework,
            kafka_rediscover_secs,
            kafka_produce_count,
            kafka_produce_kbytes,
            kafka_produce_period_ms,
            kafka_compress_snappy,
            kafka_require_all_acks,
            kafka_max_message_bytes,
            kafka_topic_partitions,
            kafka_topic_replication,
            kafka_queue_max_kbytes,
            buffer_max_bytes,
            buffer_full_policy,
            shutdown_grace_secs,
            agent_polling,
            agent_ip_command,
            agent_port,
            agent_poll_period,
            agent_timeout_secs,
            agent_max_body_bytes,
            agent_metrics_topic,
            api_listen,
            partner_listen,
            partner_buffer_kbytes,
            partner_disconnect_after_dropped_kbytes,
            max_partners,
            partner_write_timeout_secs,
            health_kafka_unavailable_secs,
            log_level,
            log_format,
        );
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
