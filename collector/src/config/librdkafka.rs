//! The librdkafka client configuration the options make: one for the sink's
//! producer and its topic admin, and checked by `validate`, since
//! librdkafka refuses unknown options, bad values and conflicting settings
//! only when a client is made.

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};

use super::Config;

/// What of the configuration goes into the librdkafka client.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions<'a> {
    /// `kafka_compress_snappy`.
    pub compress_snappy: bool,
    /// `kafka_max_message_bytes` in force (it may change at runtime).
    pub max_message_bytes: usize,
    /// `kafka_queue_max_kbytes`.
    pub queue_max_kbytes: usize,
    /// `kafka_require_all_acks`.
    pub require_all_acks: bool,
    /// `librdkafka` pass-through options, applied last.
    pub overrides: &'a [(String, String)],
}

/// The librdkafka configuration for `brokers`.
pub fn client_config(options: ClientOptions<'_>, brokers: &[String]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", "metrics-collector")
        .set(
            "compression.codec",
            if options.compress_snappy {
                "snappy"
            } else {
                "none"
            },
        )
        .set(
            "message.max.bytes",
            (options.max_message_bytes + 4096).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            options.queue_max_kbytes.max(1).to_string(),
        )
        .set("queue.buffering.max.messages", "1000000")
        .set("linger.ms", "5")
        // Never time a message out: an outage is held by the bounded
        // queues and the buffer's full policy, not turned into loss.
        .set("message.timeout.ms", "0")
        .set("reconnect.backoff.max.ms", "2000");
    if options.require_all_acks {
        config.set("acks", "all").set("enable.idempotence", "true");
    } else {
        config.set("acks", "1").set("enable.idempotence", "false");
    }
    for (key, value) in options.overrides {
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

/// Checks `config`'s librdkafka configuration by making a producer that
/// connects to nothing. The error names the option.
pub fn check_client_config(config: &Config) -> Result<(), String> {
    let overrides: Vec<(String, String)> = config
        .librdkafka
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let options = ClientOptions {
        compress_snappy: config.kafka_compress_snappy,
        max_message_bytes: config.kafka_max_message_bytes,
        queue_max_kbytes: config.kafka_queue_max_kbytes,
        require_all_acks: config.kafka_require_all_acks,
        overrides: &overrides,
    };
    let mut client = client_config(options, &[]);
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
