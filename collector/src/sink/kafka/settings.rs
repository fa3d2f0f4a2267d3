//! The sink's settings, and the librdkafka client configuration
//! (`config::librdkafka`) its producer and topic admin share.

use std::time::Duration;

use rdkafka::ClientConfig;

use super::super::batch::Thresholds;
use crate::config::librdkafka::ClientOptions;
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
    /// Passthrough options, applied last.
    pub librdkafka: Vec<(String, String)>,
    /// How long shutdown may spend delivering.
    pub shutdown_grace: Duration,
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
            librdkafka: config
                .librdkafka
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
        }
    }
}

impl From<&crate::config::Config> for SinkRuntime {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            thresholds: Thresholds::from(config),
            source: BrokerSource::from(config),
        }
    }
}

impl KafkaSettings {
    /// The librdkafka configuration of the sink, for `brokers`. Its topic
    /// admin uses the same.
    pub fn client_config(&self, brokers: &[String]) -> ClientConfig {
        crate::config::librdkafka::client_config(
            ClientOptions {
                compress_snappy: self.compress_snappy,
                max_message_bytes: self.thresholds.max_message_bytes,
                queue_max_kbytes: self.queue_max_kbytes,
                require_all_acks: self.require_all_acks,
                overrides: &self.librdkafka,
            },
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
        }
    }
}
