//! Every option, declared once: its file key (and so its flag,
//! `--kafka-topic-prefix` for `kafka_topic_prefix`), type, default, env
//! name and the original's aliases, whether it may change while the
//! collector runs, whether it is a secret, and its one-line doc. The
//! [`Config`] struct, its `Default`, the command line ([`ConfigArgs`]),
//! how flags and env overlay the file, the runtime keys, redaction and the
//! table in `docs/configuration.md` ([`markdown_table`]) all come from this
//! one list.
//!
//! The keys are a compatibility contract (env names of the original, flat
//! TOML keys, `PATCH /v1/config` keys): never rename one.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{ArgAction, Args};
use serde::{Deserialize, Serialize};

use super::security::{SaslMechanism, SecurityProtocol};
use super::{
    BufferType, ConfigError, FsyncMode, FullPolicy, Listen, LogFormat, parse_bool, parse_pair,
};

/// What the declaration says of one option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionInfo {
    /// The TOML and `PATCH` key; the flag is the same with dashes.
    pub name: &'static str,
    /// The flag, when it is not the key with dashes (`--static-tag`).
    pub flag_override: Option<&'static str>,
    /// The env var.
    pub env: &'static str,
    /// Other env names the original used, still accepted.
    pub aliases: &'static [&'static str],
    /// Whether `PATCH /v1/config` may change it while running.
    pub runtime: bool,
    /// Whether it is redacted in every output.
    pub secret: bool,
    /// What it does, in one line.
    pub doc: &'static str,
}

impl OptionInfo {
    /// The flag, without its dashes.
    pub fn flag(&self) -> String {
        self.flag_override
            .map_or_else(|| self.name.replace('_', "-"), str::to_owned)
    }
}

/// Whether `key` may change while the collector runs.
pub fn is_runtime(key: &str) -> bool {
    OPTIONS.iter().any(|o| o.name == key && o.runtime)
}

macro_rules! options {
    (
        $(
            #[doc = $doc:literal]
            $name:ident : $ty:ty = $default:expr ;
            $kind:ident $( ( $($karg:tt)* ) )? , env $env:literal $( or $alias:literal )? , $when:ident $( [$secret:ident] )? ;
        )*
    ) => {
        /// The collector's whole configuration (see the module's doc for
        /// where each option comes from).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( #[doc = $doc] pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Every option, in the order of the declaration.
        pub const OPTIONS: &[OptionInfo] = &[
            $( OptionInfo {
                name: stringify!($name),
                flag_override: options!(@flag $kind $( ($($karg)*) )?),
                env: $env,
                aliases: &[$($alias)?],
                runtime: options!(@runtime $when),
                secret: options!(@secret $($secret)?),
                doc: $doc,
            }, )*
        ];

        options!(@args [] $( [$doc] $name [$ty] $kind [$( $($karg)* )?] $env [$($secret)?] )*);

        impl ConfigArgs {
            /// Lays what was given on the command line or in the env over
            /// `config`. `legacy_env` looks up the original's env names that
            /// clap can't attach.
            fn overlay(
                args: Self,
                config: &mut Config,
                legacy_env: &dyn Fn(&str) -> Option<String>,
            ) -> Result<(), ConfigError> {
                #[allow(unused_mut)]
                let mut args = args;
                $( options!(@apply args config legacy_env $name $kind [$( $($karg)* )?] [$($alias)?]); )*
                Ok(())
            }
        }

        impl Config {
            /// The configuration with every secret replaced by
            /// `<redacted>`, for output: the declared secrets, and librdkafka
            /// options whose key names a password, secret or token.
            pub fn redacted(&self) -> Self {
                let mut config = self.clone();
                $( options!(@redact config $name [$($secret)?]); )*
                for (key, value) in &mut config.librdkafka {
                    if super::librdkafka::is_secret_key(key) {
                        *value = super::REDACTED.into();
                    }
                }
                config
            }
        }
    };

    (@flag pairs ($flag:literal)) => { Some($flag) };
    (@flag $kind:ident $( ($($karg:tt)*) )?) => { None };
    (@runtime runtime) => { true };
    (@runtime restart) => { false };
    (@secret secret) => { true };
    (@secret) => { false };

    // The command line, one field at a time.
    (@args [$($done:tt)*]) => {
        /// The command-line (and env) form of [`Config`]. Every field is
        /// optional so that what was not given falls through to the file and
        /// the defaults.
        #[derive(Debug, Default, Clone, Args)]
        pub struct ConfigArgs {
            /// TOML configuration file.
            #[arg(long, env = "COLLECTOR_CONFIG")]
            pub config: Option<PathBuf>,
            $($done)*
        }
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] plain [] $env:literal [] $($rest:tt)*) => {
        options!(@args [$($done)* #[doc = $doc] #[arg(long, env = $env)] pub $name: Option<$ty>,] $($rest)*);
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] flag [] $env:literal [] $($rest:tt)*) => {
        options!(@args [$($done)*
            #[doc = $doc]
            #[arg(long, env = $env, action = ArgAction::Set, value_parser = parse_bool)]
            pub $name: Option<bool>,] $($rest)*);
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] maybe [] $env:literal [] $($rest:tt)*) => {
        options!(@args [$($done)* #[doc = $doc] #[arg(long, env = $env)] pub $name: Option<String>,] $($rest)*);
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] maybe [] $env:literal [secret] $($rest:tt)*) => {
        options!(@args [$($done)*
            #[doc = $doc]
            #[arg(long, env = $env, hide_env_values = true)]
            pub $name: Option<String>,] $($rest)*);
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] some [$inner:ty] $env:literal [] $($rest:tt)*) => {
        options!(@args [$($done)* #[doc = $doc] #[arg(long, env = $env)] pub $name: Option<$inner>,] $($rest)*);
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] list [] $env:literal [] $($rest:tt)*) => {
        options!(@args [$($done)*
            #[doc = $doc]
            #[arg(long, env = $env, value_delimiter = ',')]
            pub $name: Option<Vec<String>>,] $($rest)*);
    };
    (@args [$($done:tt)*] [$doc:literal] $name:ident [$ty:ty] pairs [$flag:literal] $env:literal [] $($rest:tt)*) => {
        options!(@args [$($done)*
            #[doc = $doc]
            #[arg(long = $flag, env = $env, value_delimiter = ',', value_parser = parse_pair)]
            pub $name: Option<Vec<(String, String)>>,] $($rest)*);
    };

    // How a given value lands in the configuration.
    (@apply $args:ident $config:ident $legacy:ident $name:ident plain [] [$alias:literal]) => {
        if $args.$name.is_none()
            && let Some(value) = $legacy($alias)
        {
            $args.$name = Some(value.parse().map_err(|e| {
                ConfigError::new(stringify!($name), format!("{}={value:?}: {e}", $alias))
            })?);
        }
        options!(@apply $args $config $legacy $name plain [] []);
    };
    (@apply $args:ident $config:ident $legacy:ident $name:ident plain [] []) => {
        if let Some(value) = $args.$name.take() {
            $config.$name = value;
        }
    };
    (@apply $args:ident $config:ident $legacy:ident $name:ident flag [] []) => {
        if let Some(value) = $args.$name.take() {
            $config.$name = value;
        }
    };
    // An empty value means "none".
    (@apply $args:ident $config:ident $legacy:ident $name:ident maybe [] []) => {
        if let Some(value) = $args.$name.take() {
            $config.$name = (!value.is_empty()).then_some(value);
        }
    };
    (@apply $args:ident $config:ident $legacy:ident $name:ident some [$inner:ty] []) => {
        if let Some(value) = $args.$name.take() {
            $config.$name = Some(value);
        }
    };
    // Comma-separated; blanks around and between are ignored.
    (@apply $args:ident $config:ident $legacy:ident $name:ident list [] []) => {
        if let Some(values) = $args.$name.take() {
            $config.$name = values
                .into_iter()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
        }
    };
    (@apply $args:ident $config:ident $legacy:ident $name:ident pairs [$flag:literal] []) => {
        if let Some(pairs) = $args.$name.take() {
            $config.$name = pairs.into_iter().collect();
        }
    };

    (@redact $config:ident $name:ident [secret]) => {
        if $config.$name.is_some() {
            $config.$name = Some(super::REDACTED.into());
        }
    };
    (@redact $config:ident $name:ident []) => {};
}

options! {
    /// TCP input address; loopback, as in the original.
    listen_endpoint: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8124));
        plain, env "LISTEN_ENDPOINT" or "LISTEN_ENDPONT", restart;
    /// Most TCP input connections open at once; more are refused and counted.
    max_connections: usize = 1024;
        plain, env "MAX_CONNECTIONS", restart;
    /// Close an input connection that sends nothing for this long, seconds (0: never).
    idle_timeout_secs: u64 = 300;
        plain, env "IDLE_TIMEOUT_SECS", restart;
    /// Per-connection input limit, KB per `input_limit_period` (0: none); over it, records are read and dropped (`rate_limited`).
    input_limit_amount_kbytes: u64 = 20480;
        plain, env "INPUT_LIMIT_AMOUNT_KBYTES", runtime;
    /// Period of the per-connection limit, seconds.
    input_limit_period: u64 = 60;
        plain, env "INPUT_LIMIT_PERIOD", runtime;
    /// Limit over all connections together, KB per `global_limit_period` (0: none).
    global_limit_amount_kbytes: u64 = 40960;
        plain, env "GLOBAL_LIMIT_AMOUNT_KBYTES", runtime;
    /// Period of the global limit, seconds.
    global_limit_period: u64 = 60;
        plain, env "GLOBAL_LIMIT_PERIOD", runtime;
    /// Largest OCF block an input may send, bytes on the wire; larger closes the connection.
    max_block_bytes: usize = schema::Limits::default().max_block_bytes;
        plain, env "MAX_BLOCK_BYTES", restart;
    /// Largest OCF block once decompressed, bytes; larger closes the connection.
    max_decompressed_block_bytes: usize = 16 * 1024 * 1024;
        plain, env "MAX_DECOMPRESSED_BLOCK_BYTES", restart;
    /// A started header or block must arrive whole within this, seconds, or its connection is closed (0: no limit).
    frame_timeout_secs: u64 = 60;
        plain, env "FRAME_TIMEOUT_SECS", restart;
    /// Read buffers of all input connections together, beyond the 16 KiB each holds on its own, bytes.
    input_buffer_max_bytes: usize = 16 * 1024 * 1024;
        plain, env "INPUT_BUFFER_MAX_BYTES", restart;
    /// Kafka topic = this prefix + the record's `topic`.
    kafka_topic_prefix: String = "metrics-".into();
        plain, env "KAFKA_TOPIC_PREFIX", runtime;
    /// Send every record to this one topic instead.
    kafka_single_topic: Option<String> = None;
        maybe, env "KAFKA_SINGLE_TOPIC", runtime;
    /// Tags `KEY=VALUE` added to every record that lacks them (repeatable; env: a comma list).
    static_tags: BTreeMap<String, String> = BTreeMap::new();
        pairs("static-tag"), env "STATIC_TAGS", runtime;
    /// Send to Kafka; false: no Kafka at all (serve the node's metrics over Prometheus and the v0 API only; `/health` and `/v1/endpoints` show no Kafka state; what reaches the end of the pipeline counts as served, not delivered).
    kafka: bool = true;
        flag, env "KAFKA", restart;
    /// Static comma-separated broker list; wins over framework discovery.
    kafka_brokers: Vec<String> = Vec::new();
        list, env "KAFKA_BROKERS", runtime;
    /// Kafka framework whose brokers are discovered: SRV `_NAME._tcp.marathon.mesos`, then its scheduler's `/v1/connection`.
    kafka_framework: String = "kafka".into();
        plain, env "KAFKA_FRAMEWORK", runtime;
    /// Kafka scheduler base URL, instead of the DNS lookup.
    kafka_scheduler_url: Option<String> = None;
        maybe, env "KAFKA_SCHEDULER_URL", runtime;
    /// DNS server (IP:PORT) for the SRV and A lookups, instead of the system's.
    dns_server: Option<SocketAddr> = None;
        some(SocketAddr), env "DNS_SERVER", runtime;
    /// Rediscover the brokers this often, seconds (and whenever all are down).
    kafka_rediscover_secs: u64 = 60;
        plain, env "KAFKA_REDISCOVER_SECS", restart;
    /// Flush a topic's batch at this many records.
    kafka_produce_count: usize = 1024;
        plain, env "KAFKA_PRODUCE_COUNT", runtime;
    /// Flush a topic's batch at this many KB.
    kafka_produce_kbytes: usize = 512;
        plain, env "KAFKA_PRODUCE_KBYTES", runtime;
    /// Flush a topic's batch when its oldest record is this old, ms.
    kafka_produce_period_ms: u64 = 1000;
        plain, env "KAFKA_PRODUCE_PERIOD_MS", runtime;
    /// Snappy compression of Kafka messages, as the original.
    kafka_compress_snappy: bool = true;
        flag, env "KAFKA_COMPRESS_SNAPPY", restart;
    /// acks=all with idempotence; false means acks=1.
    kafka_require_all_acks: bool = true;
        flag, env "KAFKA_REQUIRE_ALL_ACKS", restart;
    /// Partition by the value of this tag (default: no key, as the original).
    kafka_partition_key_tag: Option<String> = None;
        maybe, env "KAFKA_PARTITION_KEY_TAG", runtime;
    /// Largest Kafka message value, bytes; batches are split below it, and a record too large alone is dropped and counted.
    kafka_max_message_bytes: usize = 1_000_000;
        plain, env "KAFKA_MAX_MESSAGE_BYTES", restart;
    /// Partitions of the topics the collector creates.
    kafka_topic_partitions: i32 = 1;
        plain, env "KAFKA_TOPIC_PARTITIONS", restart;
    /// Replication factor of the topics the collector creates.
    kafka_topic_replication: i32 = 1;
        plain, env "KAFKA_TOPIC_REPLICATION", restart;
    /// Bound on librdkafka's own queue, KB; with the buffer it bounds memory during an outage.
    kafka_queue_max_kbytes: usize = 4 * 1024;
        plain, env "KAFKA_QUEUE_MAX_KBYTES", restart;
    /// Records of topics the brokers refuse (an ACL) kept until the topic can be written, bytes (0: a quarter of `buffer_max_bytes`): in memory, or on disk in `spool_dir/parked` with `buffer_type = disk`; past it the oldest are dropped (`topic_refused`). Records of topics still being looked up wait within the same bound in memory.
    kafka_parked_max_bytes: usize = 0;
        plain, env "KAFKA_PARKED_MAX_BYTES", restart;
    /// Topics the Kafka producer keeps state for (librdkafka lets go of a topic's only with the producer): past it, the producer is made anew.
    kafka_max_topics: usize = 1000;
        plain, env "KAFKA_MAX_TOPICS", restart;
    /// `plaintext`, `ssl` (TLS), `sasl_plaintext` or `sasl_ssl` (SASL over TLS), for every Kafka client.
    kafka_security_protocol: SecurityProtocol = SecurityProtocol::Plaintext;
        plain, env "KAFKA_SECURITY_PROTOCOL", runtime;
    /// CA certificates (PEM) that the brokers' certificates must chain to (default: the system's).
    kafka_ssl_ca_file: Option<PathBuf> = None;
        some(PathBuf), env "KAFKA_SSL_CA_FILE", runtime;
    /// Client certificate (PEM), for mutual TLS; with `kafka_ssl_key_file`.
    kafka_ssl_certificate_file: Option<PathBuf> = None;
        some(PathBuf), env "KAFKA_SSL_CERTIFICATE_FILE", runtime;
    /// The client certificate's private key (PEM).
    kafka_ssl_key_file: Option<PathBuf> = None;
        some(PathBuf), env "KAFKA_SSL_KEY_FILE", runtime;
    /// File holding the private key's password, if it is encrypted.
    kafka_ssl_key_password_file: Option<PathBuf> = None;
        some(PathBuf), env "KAFKA_SSL_KEY_PASSWORD_FILE", runtime;
    /// Check that a broker's certificate names the host connected to.
    kafka_ssl_verify_hostname: bool = true;
        flag, env "KAFKA_SSL_VERIFY_HOSTNAME", runtime;
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    kafka_sasl_mechanism: Option<SaslMechanism> = None;
        some(SaslMechanism), env "KAFKA_SASL_MECHANISM", runtime;
    /// SASL username.
    kafka_sasl_username: Option<String> = None;
        maybe, env "KAFKA_SASL_USERNAME", runtime;
    /// File holding the SASL password (re-read on SIGHUP and `POST /v1/kafka/reload`).
    kafka_sasl_password_file: Option<PathBuf> = None;
        some(PathBuf), env "KAFKA_SASL_PASSWORD_FILE", runtime;
    /// The SASL password itself; prefer `kafka_sasl_password_file`, since the environment shows in `/proc`.
    kafka_sasl_password: Option<String> = None;
        maybe, env "KAFKA_SASL_PASSWORD", runtime [secret];
    /// Any librdkafka option `KEY=VALUE`, applied last (repeatable; env: a comma list).
    librdkafka: BTreeMap<String, String> = BTreeMap::new();
        pairs("librdkafka"), env "LIBRDKAFKA", restart;
    /// Bound on the memory records take from decoding to librdkafka, bytes.
    buffer_max_bytes: usize = 64 * 1024 * 1024;
        plain, env "BUFFER_MAX_BYTES", restart;
    /// When the buffer is full: `block` stops reading the inputs, `drop_oldest` drops the oldest and counts them.
    buffer_full_policy: FullPolicy = FullPolicy::Block;
        plain, env "BUFFER_FULL_POLICY", runtime;
    /// Where records wait for Kafka: `memory`, or `disk` (segment files in `spool_dir`, replayed after a crash or restart).
    buffer_type: BufferType = BufferType::Memory;
        plain, env "BUFFER_TYPE", restart;
    /// The disk spool's directory (`buffer_type = disk`); made if missing.
    spool_dir: Option<PathBuf> = None;
        some(PathBuf), env "SPOOL_DIR", restart;
    /// Bound on the disk spool's bytes; when full, `buffer_full_policy` applies.
    spool_max_bytes: u64 = 1024 * 1024 * 1024;
        plain, env "SPOOL_MAX_BYTES", restart;
    /// `interval`: sync the spool every `spool_fsync_ms`; `always`: sync each write before reading on.
    spool_fsync: FsyncMode = FsyncMode::Interval;
        plain, env "SPOOL_FSYNC", restart;
    /// How often the spool is synced in `interval` mode, ms: a crash loses at most this much input.
    spool_fsync_ms: u64 = 100;
        plain, env "SPOOL_FSYNC_MS", restart;
    /// Shutdown ends within this, seconds: stop accepting, drain, flush, count what is left as dropped.
    shutdown_grace_secs: u64 = 30;
        plain, env "SHUTDOWN_GRACE_SECS", restart;
    /// Poll the Mesos agent for enrichment and its own metrics, as the original's `-agent-polling`.
    agent_polling: bool = true;
        flag, env "AGENT_POLLING", restart;
    /// The agent's base URL, instead of `agent_ip_command` and `agent_port`.
    agent_url: Option<String> = None;
        maybe, env "AGENT_URL", restart;
    /// Command printing the agent's IP, as the original's `-agent-ip-command`.
    agent_ip_command: String = "/opt/mesosphere/bin/detect_ip".into();
        plain, env "AGENT_IP_COMMAND", restart;
    /// Agent port, with `agent_ip_command`.
    agent_port: u16 = 5051;
        plain, env "AGENT_PORT", restart;
    /// Agent poll period, seconds.
    agent_poll_period: u64 = 15;
        plain, env "AGENT_POLL_PERIOD", restart;
    /// Agent request timeout, seconds.
    agent_timeout_secs: u64 = 5;
        plain, env "AGENT_TIMEOUT_SECS", restart;
    /// Largest agent answer read, bytes; a larger one is refused and counted.
    agent_max_body_bytes: usize = 8 * 1024 * 1024;
        plain, env "AGENT_MAX_BODY_BYTES", restart;
    /// Read the node's own metrics (CPU, load, memory, swap, filesystems, network, processes) as dcos-metrics named them, to topic `node` and the node store.
    node_metrics: bool = true;
        flag, env "NODE_METRICS", restart;
    /// Node metrics poll period, seconds.
    node_poll_period: u64 = 60;
        plain, env "NODE_POLL_PERIOD", restart;
    /// Where the node's procfs is mounted (a host's `/proc` mounted into a container, for example).
    node_proc_path: PathBuf = PathBuf::from("/proc");
        plain, env "NODE_PROC_PATH", restart;
    /// Topic of the agent's `/metrics/snapshot` data.
    agent_metrics_topic: String = "agent".into();
        plain, env "AGENT_METRICS_TOPIC", restart;
    /// Sent to the agent and the Kafka scheduler as `Authorization: token=<x>`; prefer `auth_credential_file`.
    auth_credential: Option<String> = None;
        maybe, env "AUTH_CREDENTIAL", restart [secret];
    /// File holding the token for `Authorization: token=<x>` (DC/OS: the service account's), read at every request, so a refreshed token is used at once.
    auth_credential_file: Option<PathBuf> = None;
        some(PathBuf), env "AUTH_CREDENTIAL_FILE", restart;
    /// CA certificates (PEM) for HTTPS to the agent and the Kafka scheduler, beside the system's (DC/OS: the cluster's CA bundle).
    dcos_ca_file: Option<PathBuf> = None;
        some(PathBuf), env "DCOS_CA_FILE", restart;
    /// HTTP API address; loopback by default, port 0 allowed.
    api_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8123));
        plain, env "API_LISTEN", restart;
    /// Bearer token for mutating API requests; required when the API listens beyond loopback.
    api_token: Option<String> = None;
        maybe, env "API_TOKEN", restart [secret];
    /// Prometheus exposition address, `IP:PORT` (empty: off): `GET /metrics` serves the latest value of every series of the node's inputs, and the collector's own families. DC/OS used `0.0.0.0:61091`.
    prometheus_listen: Listen = Listen::Off;
        plain, env "PROMETHEUS_LISTEN", restart;
    /// The DC/OS v0 metrics API's address, `IP:PORT` or `unix:PATH` (empty: off), as dcos-metrics served it; DC/OS's Admin Router proxies `/system/v1/metrics/` to a unix socket.
    metrics_api_listen: Listen = Listen::Off;
        plain, env "METRICS_API_LISTEN", restart;
    /// The group of the v0 API's unix socket (mode 0660), a name from `/etc/group` or a number (default: the collector's own): on DC/OS, Admin Router's `dcos_adminrouter`, of which the collector must then be a member (systemd: `SupplementaryGroups=`).
    metrics_api_socket_group: Option<String> = None;
        maybe, env "METRICS_API_SOCKET_GROUP", restart;
    /// The cluster's id in the v0 API's `cluster_id` (default: `/var/lib/dcos/cluster-id`, when there).
    cluster_id: Option<String> = None;
        maybe, env "CLUSTER_ID", restart;
    /// Most series the node store holds for Prometheus and the v0 API; new ones beyond it are refused and counted.
    store_max_series: usize = 100_000;
        plain, env "STORE_MAX_SERIES", restart;
    /// A series not updated for this long leaves the node store, seconds.
    store_expiry_secs: u64 = 120;
        plain, env "STORE_EXPIRY_SECS", restart;
    /// Tag keys left out of the series the node store serves (Prometheus labels, v0 tags), comma-separated: a tag unique to each record, such as a sequence number, would make every record a series of its own. Kafka records keep them.
    store_drop_tags: Vec<String> = Vec::new();
        list, env "STORE_DROP_TAGS", restart;
    /// UDP address of a node-wide statsd listener, `IP:PORT` (empty: off), for the node's own processes (DC/OS ran one on `localhost:61825`): its series go to topic `statsd` (see docs/statsd.md).
    statsd_listen: Listen = Listen::Off;
        plain, env "STATSD_LISTEN", restart;
    /// How often every statsd series' value (cumulative) is pushed, seconds.
    statsd_flush_secs: u64 = 10;
        plain, env "STATSD_FLUSH_SECS", restart;
    /// Percentiles of statsd timings and histograms, each in (0, 100], comma-separated (`90` gives `NAME.90_percentile`).
    statsd_percentiles: Vec<String> = vec!["90".into()];
        list, env "STATSD_PERCENTILES", restart;
    /// Most statsd series one container (or the node-wide listener) holds; values of new ones beyond it are refused and counted.
    statsd_max_series_per_container: usize = 10_000;
        plain, env "STATSD_MAX_SERIES_PER_CONTAINER", restart;
    /// Bytes all statsd series may take together (names, tags, set members, timing samples); values of new series beyond it are refused and counted.
    statsd_max_bytes: usize = 64 * 1024 * 1024;
        plain, env "STATSD_MAX_BYTES", restart;
    /// The statsd registration API's address, `IP:PORT` or `unix:PATH` (empty: off), where DC/OS 1.12+'s mesos module registers every container it launches (`POST /container`) and gets that container's own statsd port (DC/OS: `unix:/run/dcos/telegraf/dcos_statsd.sock`; see docs/statsd.md).
    statsd_control_listen: Listen = Listen::Off;
        plain, env "STATSD_CONTROL_LISTEN", restart;
    /// The address every container's statsd listener binds and the registration API gives its task (DC/OS: `198.51.100.1`, the dcos-net interface).
    statsd_host: IpAddr = IpAddr::from([127, 0, 0, 1]);
        plain, env "STATSD_HOST", restart;
    /// Where registered containers are kept, one file each, so that a restart binds them again on the same ports (empty: not kept; DC/OS's Telegraf kept them in `/run/dcos/telegraf/dcos_statsd/containers`, in the same format).
    statsd_state_dir: Option<PathBuf> = None;
        some(PathBuf), env "STATSD_STATE_DIR", restart;
    /// Most containers registered at once; a registration beyond it is answered 204 (the task runs without statsd), counted and logged.
    statsd_max_containers: usize = 1024;
        plain, env "STATSD_MAX_CONTAINERS", restart;
    /// Bytes of statsd one container may send per `statsd_container_limit_secs`, KB (the DC/OS 1.11 module's `container_limit_amount_kbytes`; 0: none); packets past it are dropped and counted.
    statsd_container_limit_kbytes: u64 = 10240;
        plain, env "STATSD_CONTAINER_LIMIT_KBYTES", restart;
    /// Period of `statsd_container_limit_kbytes`, seconds.
    statsd_container_limit_secs: u64 = 60;
        plain, env "STATSD_CONTAINER_LIMIT_SECS", restart;
    /// Partner output address; loopback by default, port 0 allowed.
    partner_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8126));
        plain, env "PARTNER_LISTEN", restart;
    /// Bytes queued per partner before its oldest blocks are dropped, KB.
    partner_buffer_kbytes: usize = 4096;
        plain, env "PARTNER_BUFFER_KBYTES", runtime;
    /// A partner that has lost more than this is disconnected, KB.
    partner_disconnect_after_dropped_kbytes: usize = 65536;
        plain, env "PARTNER_DISCONNECT_AFTER_DROPPED_KBYTES", runtime;
    /// Most partners connected at once; more are refused and counted.
    max_partners: usize = 8;
        plain, env "MAX_PARTNERS", runtime;
    /// A partner that takes nothing of a write this long is disconnected, seconds.
    partner_write_timeout_secs: u64 = 10;
        plain, env "PARTNER_WRITE_TIMEOUT_SECS", runtime;
    /// `/health` answers 503 once Kafka has been unreachable this long, seconds.
    health_kafka_unavailable_secs: u64 = 60;
        plain, env "HEALTH_KAFKA_UNAVAILABLE_SECS", runtime;
    /// Log filter, for example `info`, `collector=debug` or `collector[input]=debug` (no span field filters).
    log_level: String = "info".into();
        plain, env "LOG_LEVEL", runtime;
    /// Log format: `text`, or `json` (one object per line).
    log_format: LogFormat = LogFormat::Text;
        plain, env "LOG_FORMAT", restart;
}

impl ConfigArgs {
    /// Builds the effective configuration: defaults, then the file, then env
    /// and flags (clap has already let flags beat env), then validation.
    /// `legacy_env` looks up the original's env names clap can't attach
    /// (the declared aliases, such as `LISTEN_ENDPONT`).
    pub fn load(self, legacy_env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        Self::overlay(self, &mut config, &legacy_env)?;
        config.validate()?;
        Ok(config)
    }
}

/// Some of the options as command-line arguments (flag, env var and help
/// from the declaration), for another program that shares them (the
/// sample-producer); [`from_matches`] reads them back.
pub fn clap_args(names: &[&str]) -> Vec<clap::Arg> {
    names
        .iter()
        .filter_map(|name| OPTIONS.iter().find(|o| o.name == *name))
        .map(|option| {
            clap::Arg::new(option.name)
                .long(option.flag())
                .env(option.env)
                .hide_env_values(option.secret)
                .value_name("VALUE")
                .help(option.doc.trim().to_owned())
        })
        .collect()
}

/// The options `names` given as [`clap_args`], over the defaults, checked
/// like a configuration file's values: an error names the option. An empty
/// value means "not given".
pub fn from_matches(names: &[&str], matches: &clap::ArgMatches) -> Result<Config, ConfigError> {
    let defaults = serde_json::to_value(Config::default())
        .map_err(|e| ConfigError::new("(config)", e.to_string()))?;
    let mut given = serde_json::Map::new();
    for name in names {
        let Some(value) = matches.get_one::<String>(name) else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        let value = if defaults
            .get(*name)
            .is_some_and(serde_json::Value::is_boolean)
        {
            serde_json::Value::Bool(parse_bool(value).map_err(|e| ConfigError::new(name, e))?)
        } else {
            serde_json::Value::String(value.clone())
        };
        given.insert((*name).to_owned(), value);
    }
    serde_path_to_error::deserialize(serde_json::Value::Object(given))
        .map_err(|e| ConfigError::new(&e.path().to_string(), e.inner().to_string()))
}

/// Shows each option's default in its `--help` line, from [`Config`]'s
/// `Default` (which the declaration gave).
pub fn with_defaults_in_help(command: clap::Command) -> clap::Command {
    command.mut_args(|arg| {
        let id = arg.get_id().as_str().to_owned();
        match default_text(&id) {
            Some(default) => {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {default}]"))
            }
            None => arg,
        }
    })
}

/// An option's default as the docs and `--help` show it; `None` when it
/// has none worth showing (empty, unset).
pub fn default_text(name: &str) -> Option<String> {
    let defaults = serde_json::to_value(Config::default()).ok()?;
    match defaults.get(name)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) if s.is_empty() => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) if a.is_empty() => None,
        serde_json::Value::Object(o) if o.is_empty() => None,
        other => Some(other.to_string()),
    }
}

/// The table of every option in `docs/configuration.md`, from the
/// declaration (a test holds the page to it).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| option (TOML key) | flag | env | default | runtime | what |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for option in OPTIONS {
        let env = std::iter::once(option.env)
            .chain(option.aliases.iter().copied())
            .map(|e| format!("`{e}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let default =
            default_text(option.name).map_or_else(|| "—".to_owned(), |d| format!("`{d}`"));
        let runtime = if option.runtime { "yes" } else { "" };
        let secret = if option.secret {
            " Secret: redacted in every output."
        } else {
            ""
        };
        out.push_str(&format!(
            "| `{}` | `--{}` | {env} | {default} | {runtime} | {}{secret} |\n",
            option.name,
            option.flag(),
            option.doc.trim().replace('|', "\\|"),
        ));
    }
    out
}
