//! The sink's settings, and the one librdkafka client configuration its
//! producer and topic admin share.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};

use super::super::batch::Thresholds;
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

/// The librdkafka configuration of the sink, for `brokers`. Its topic admin
/// uses the same.
pub fn client_config(settings: &KafkaSettings, brokers: &[String]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", "metrics-collector")
        .set(
            "compression.codec",
            if settings.compress_snappy {
                "snappy"
            } else {
                "none"
            },
        )
        .set(
            "message.max.bytes",
            (settings.thresholds.max_message_bytes + 4096).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            settings.queue_max_kbytes.max(1).to_string(),
        )
        .set("queue.buffering.max.messages", "1000000")
        .set("linger.ms", "5")
        // Never time a message out: an outage is held by the bounded
        // queues and the buffer's full policy, not turned into loss.
        .set("message.timeout.ms", "0")
        .set("reconnect.backoff.max.ms", "2000");
    if settings.require_all_acks {
        config.set("acks", "all").set("enable.idempotence", "true");
    } else {
        config.set("acks", "1").set("enable.idempotence", "false");
    }
    for (key, value) in &settings.librdkafka {
        config.set(key, value);
    }
    config
}

/// A client context that says nothing: for checking a configuration.
struct Silent;

impl ClientContext for Silent {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, _: KafkaError, _: &str) {}
}

impl ProducerContext for Silent {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Checks the sink's librdkafka configuration by making a producer that
/// connects to nothing: librdkafka refuses unknown options, bad values and
/// conflicting settings only then. The error names the option.
pub fn check_client_config(config: &crate::config::Config) -> Result<(), String> {
    let settings = KafkaSettings::from(config);
    let mut client = client_config(&settings, &[]);
    client.set("log_level", "0");
    client
        .create_with_context::<_, rdkafka::producer::BaseProducer<Silent>>(Silent)
        .map(drop)
        .map_err(|error| match error {
            KafkaError::ClientConfig(_, description, key, value) => {
                format!("{key}={value:?}: {description}")
            }
            other => other.to_string(),
        })
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
