//! The sink's settings, and the librdkafka client configuration
//! (`config::librdkafka`) its producer and topic admin share.

use std::time::Duration;

use rdkafka::ClientConfig;

use super::super::batch::Thresholds;
use crate::config::ConfigError;
use crate::config::librdkafka::ClientOptions;
use crate::config::security::{KafkaSecurity, SecurityFailure};
use crate::discovery::{BrokerSource, Discovered};

/// The producer settings (the Kafka part of the configuration).
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Where brokers come from.
    pub source: BrokerSource,
    /// Rediscovery period.
    pub rediscover: Duration,
    /// Batch thresholds.
    pub thresholds: Thresholds,
    /// Snappy compression.
    pub compress_snappy: bool,
    /// acks=all with idempotence.
    pub require_all_acks: bool,
    /// librdkafka queue bound, KB.
    pub queue_max_kbytes: usize,
    /// Partitions of created topics.
    pub topic_partitions: i32,
    /// Replication of created topics.
    pub topic_replication: i32,
    /// TLS and SASL.
    pub security: KafkaSecurity,
    /// Passthrough options, applied last.
    pub librdkafka: Vec<(String, String)>,
    /// How long shutdown may spend delivering.
    pub shutdown_grace: Duration,
    /// Bound on the records of refused topics (`kafka_parked_max_bytes`).
    pub parked_max_bytes: usize,
    /// Topics a producer keeps state for before it is made anew
    /// (`kafka_max_topics`).
    pub max_topics: usize,
}

impl From<&crate::config::Config> for KafkaSettings {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            source: BrokerSource::from(config),
            rediscover: Duration::from_secs(config.kafka_rediscover_secs),
            thresholds: Thresholds::from(config),
            compress_snappy: config.kafka_compress_snappy,
            require_all_acks: config.kafka_require_all_acks,
            queue_max_kbytes: config.kafka_queue_max_kbytes,
            topic_partitions: config.kafka_topic_partitions,
            topic_replication: config.kafka_topic_replication,
            security: KafkaSecurity::from(config),
            librdkafka: config.librdkafka_overrides(),
            shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
            parked_max_bytes: config.parked_max_bytes(),
            max_topics: config.kafka_max_topics,
        }
    }
}

impl From<&crate::config::Config> for SinkRuntime {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            thresholds: Thresholds::from(config),
            source: BrokerSource::from(config),
            security: KafkaSecurity::from(config),
            reloads: 0,
        }
    }
}

impl KafkaSettings {
    /// The librdkafka configuration of the sink, for `brokers`. Its topic
    /// admin uses the same. It reads the secret files now: an error names
    /// the option whose file could not be read.
    pub fn client_config(&self, brokers: &[String]) -> Result<ClientConfig, ConfigError> {
        crate::config::librdkafka::client_config(
            ClientOptions::collector(
                self.compress_snappy,
                self.thresholds.max_message_bytes,
                self.queue_max_kbytes,
                self.require_all_acks,
                &self.security,
                &self.librdkafka,
            ),
            brokers,
        )
    }
}

/// Sink settings that change at runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRuntime {
    /// Batch thresholds.
    pub thresholds: Thresholds,
    /// Where brokers come from.
    pub source: BrokerSource,
    /// TLS and SASL: a change makes the producer anew.
    pub security: KafkaSecurity,
    /// Bumped by each reload (SIGHUP, `POST /v1/kafka/reload`): the
    /// producer is made anew, reading the secret files again.
    pub reloads: u64,
}

/// The sink's view of the broker state, for the API and `/health`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BrokerState {
    /// Since when Kafka has been unreachable (no producer, or every broker
    /// down), if it is now.
    #[serde(skip)]
    pub unavailable_since: Option<std::time::Instant>,
    /// The brokers in use, and how they were found.
    pub current: Option<Discovered>,
    /// The last discovery error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Whether librdkafka reports every broker down.
    pub all_brokers_down: bool,
    /// A TLS or authentication failure that retrying will not mend.
    /// Cleared once a broker answers.
    #[serde(skip)]
    pub security_failure: Option<SecurityFailureState>,
    /// Topics the brokers refuse, with what is kept for each.
    #[serde(skip)]
    pub refused_topics: Vec<RefusedTopic>,
}

/// A topic the brokers refuse, as `/health` tells it.
#[derive(Debug, Clone)]
pub struct RefusedTopic {
    /// The topic.
    pub topic: String,
    /// The brokers' error.
    pub error: String,
    /// Since when.
    pub since: std::time::Instant,
    /// Its records kept until it can be written (in memory and on disk).
    pub kept: crate::stats::Counts,
}

impl std::fmt::Display for RefusedTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Kafka refuses topic {} ({}) for {} s; {} datapoints kept for it",
            self.topic,
            self.error,
            self.since.elapsed().as_secs(),
            self.kept.datapoints
        )
    }
}

/// A TLS or authentication failure, as `/health` tells it.
#[derive(Debug, Clone)]
pub struct SecurityFailureState {
    /// What kind.
    pub kind: SecurityFailure,
    /// librdkafka's words.
    pub reason: String,
    /// For a TLS failure, why the certificate check failed, in OpenSSL's
    /// words ([`KafkaSecurity::diagnose_tls`]), once known.
    pub diagnosis: Option<String>,
}

impl std::fmt::Display for SecurityFailureState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind.describe())?;
        if let Some(diagnosis) = &self.diagnosis {
            write!(f, ": {diagnosis}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl BrokerState {
    /// The `collector_kafka_*` gauges of `/metrics`.
    pub fn gauges(&self) -> crate::stats::prometheus::BrokerGauges {
        crate::stats::prometheus::BrokerGauges {
            brokers: self.current.as_ref().map_or(0, |c| c.brokers.len()),
            all_down: self.all_brokers_down,
            unavailable_secs: self
                .unavailable_since
                .map_or(0, |since| since.elapsed().as_secs()),
            refused_topics: self
                .refused_topics
                .iter()
                .take(crate::stats::TOPIC_CARDINALITY_CAP)
                .map(|r| (r.topic.clone(), r.kept.datapoints))
                .collect(),
        }
    }
}
