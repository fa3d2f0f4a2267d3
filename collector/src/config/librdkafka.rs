//! The librdkafka client configuration the options make: one for the sink's
//! producer, its topic admin and the sample-producer, and checked by
//! `validate`, since
//! librdkafka refuses unknown options, bad values and conflicting settings
//! only when a client is made.

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};

use super::security::KafkaSecurity;
use super::{Config, ConfigError};

/// What of the configuration goes into a librdkafka client. The collector's
/// sink, its topic admin and the sample-producer all make theirs here.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions<'a> {
    /// `client.id`.
    pub client_id: &'a str,
    /// `compression.codec` (`kafka_compress_snappy`: `snappy` or `none`).
    pub compression: &'a str,
    /// `kafka_max_message_bytes` in force (it may change at runtime).
    pub max_message_bytes: usize,
    /// `kafka_queue_max_kbytes`.
    pub queue_max_kbytes: usize,
    /// `kafka_require_all_acks`.
    pub require_all_acks: bool,
    /// `message.timeout.ms`: 0 (never) for the collector, whose outages
    /// are held by its bounded buffer.
    pub message_timeout_ms: u64,
    /// TLS and SASL.
    pub security: &'a KafkaSecurity,
    /// `librdkafka` pass-through options, applied last.
    pub overrides: &'a [(String, String)],
}

impl<'a> ClientOptions<'a> {
    /// The collector's options, from its configuration (`overrides` holds
    /// its `librdkafka` pairs).
    pub fn of(
        config: &'a Config,
        security: &'a KafkaSecurity,
        overrides: &'a [(String, String)],
    ) -> Self {
        Self::collector(
            config.kafka_compress_snappy,
            config.kafka_max_message_bytes,
            config.kafka_queue_max_kbytes,
            config.kafka_require_all_acks,
            security,
            overrides,
        )
    }

    /// The collector's options, from its settings (the sink keeps them
    /// apart from the configuration: `max_message_bytes` changes at
    /// runtime).
    pub fn collector(
        compress_snappy: bool,
        max_message_bytes: usize,
        queue_max_kbytes: usize,
        require_all_acks: bool,
        security: &'a KafkaSecurity,
        overrides: &'a [(String, String)],
    ) -> Self {
        Self {
            client_id: "metrics-collector",
            compression: if compress_snappy { "snappy" } else { "none" },
            max_message_bytes,
            queue_max_kbytes,
            require_all_acks,
            message_timeout_ms: 0,
            security,
            overrides,
        }
    }
}

/// The librdkafka configuration for `brokers`. Reads the secret files
/// named by the security settings; the error names the option.
pub fn client_config(
    options: ClientOptions<'_>,
    brokers: &[String],
) -> Result<ClientConfig, ConfigError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", options.client_id)
        .set("compression.codec", options.compression)
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
        // 0 never times a message out: an outage is held by the bounded
        // queues and the buffer's full policy, not turned into loss.
        .set("message.timeout.ms", options.message_timeout_ms.to_string())
        .set("reconnect.backoff.max.ms", "2000");
    if options.require_all_acks {
        config.set("acks", "all").set("enable.idempotence", "true");
    } else {
        config.set("acks", "1").set("enable.idempotence", "false");
    }
    // Connection failures come at info level ("Disconnected … in state
    // APIVERSION_QUERY": a TLS listener spoken to in plaintext); the client
    // context reads them whatever the log filter lets through.
    config.set_log_level(RDKafkaLogLevel::Info);
    options.security.apply(&mut config)?;
    for (key, value) in options.overrides {
        config.set(key, value);
    }
    Ok(config)
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

/// Checks a librdkafka configuration by making a producer that connects
/// to nothing: librdkafka refuses unknown options, bad values and
/// conflicting settings (a CA file it can't load, say) only then. The
/// error names the librdkafka option.
pub fn check_client_config(options: ClientOptions<'_>) -> Result<(), ConfigError> {
    let mut client = client_config(options, &[])?;
    client.set("log_level", "0");
    client
        .create_with_context::<_, rdkafka::producer::BaseProducer<Silent>>(Silent)
        .map(drop)
        .map_err(|error| {
            let message = match error {
                KafkaError::ClientConfig(_, description, key, value) => {
                    let value = if is_secret_key(&key) {
                        super::REDACTED.to_owned()
                    } else {
                        value
                    };
                    format!("{key}={value:?}: {description}")
                }
                other => other.to_string(),
            };
            ConfigError::new("librdkafka", message)
        })
}

/// Whether a librdkafka option holds a secret (never shown): passwords,
/// secrets and tokens, an inline private key (`ssl.key.pem`), OAuth's
/// configuration.
pub fn is_secret_key(key: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|secret| key.contains(secret))
}
