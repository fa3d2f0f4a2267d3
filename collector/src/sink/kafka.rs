//! The Kafka sink (rdkafka). Each message is one OCF file. Delivery reports,
//! not `send` returning, decide what is delivered.
//!
//! - `QueueFull`: the sink stops taking from the buffer until librdkafka has
//!   room, so the buffer fills and its full policy applies.
//! - Permanent errors (message too large, invalid topic, authorization) drop
//!   the message, counted as `kafka_rejected`, with its topic and size logged.
//!   They are never retried.
//! - Purged or timed-out messages (a producer switch, or the rare transient
//!   failure) are produced again.
//! - Brokers are rediscovered periodically and when all brokers are down; a
//!   changed set gets a new producer, and the old one's queue is moved over.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::batch::{Batcher, Message, Thresholds};
use crate::buffer::{Budget, Buffer, allocated_size};
use crate::discovery::{BrokerSource, Discovered};
use crate::stats::{DropReason, Stats};

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
    /// Sync marker of every message (shared with the partner output).
    pub sync: [u8; 16],
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
            sync: rand::random(),
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

/// Per-message bookkeeping carried through librdkafka.
struct Meta {
    topic: Arc<str>,
    key: Option<Arc<str>>,
    records: u32,
    datapoints: u64,
    created: Instant,
    attempts: u32,
}

struct Context {
    stats: Arc<Stats>,
    partners: Option<Arc<crate::partner::PartnerHub>>,
    /// Where messages to produce again go. Not bounded by count: only
    /// messages librdkafka held come back, so it never holds more than
    /// librdkafka's queue did; their bytes are counted
    /// (`kafka_retry_bytes`, see [`retry_budget`](KafkaSink::retry_budget)).
    retry: mpsc::UnboundedSender<Message>,
    retry_budget: Arc<Budget>,
    room: Arc<Notify>,
    brokers_down: Arc<Notify>,
    state: Arc<Mutex<BrokerState>>,
    /// This producer's number, and the number of the producer in use: only
    /// the producer in use speaks for the broker state (`/health`, gauges).
    generation: u64,
    current: Arc<AtomicU64>,
    /// Set when librdkafka reports every broker of this producer down.
    all_down: AtomicBool,
    /// Set at the end of shutdown: purged messages are then counted as
    /// dropped instead of being retried.
    final_purge: AtomicBool,
}

impl Context {
    fn is_current(&self) -> bool {
        self.current.load(Relaxed) == self.generation
    }
}

/// Errors that will fail the same way however often they are retried.
pub(crate) fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::MessageBatchTooLarge
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::InvalidRequiredAcks
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::UnsupportedVersion
    )
}

/// A message failing with errors that are not permanent is produced again
/// after a backoff of 100 ms doubling to 5 s, up to this many times (about
/// four minutes in all: a broker restart, not a broker that always refuses),
/// then dropped and counted.
const MAX_ATTEMPTS: u32 = 50;

fn retry_backoff(attempts: u32) -> Duration {
    Duration::from_millis(100)
        .saturating_mul(1 << attempts.min(6))
        .min(Duration::from_secs(5))
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", facility = fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let all_down = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        if all_down {
            self.all_down.store(true, Relaxed);
        }
        if !self.is_current() {
            // A producer replaced by a broker switch, still flushing to the
            // old brokers: it no longer speaks for Kafka's state.
            debug!(%error, reason, "Kafka client error on a replaced producer.");
            return;
        }
        if all_down {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.all_brokers_down = true;
            state
                .unavailable_since
                .get_or_insert_with(std::time::Instant::now);
            drop(state);
            self.brokers_down.notify_one();
            crate::telemetry::throttled_warn("kafka_all_brokers_down", |repeats| {
                warn!(%error, reason, repeats, "All Kafka brokers are down; data is buffered until they return or are rediscovered.");
            });
        } else {
            crate::telemetry::throttled_warn("kafka_client_error", |repeats| {
                warn!(%error, reason, repeats, "Kafka client error.");
            });
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Meta>;

    fn delivery(&self, result: &DeliveryResult<'_>, meta: Box<Meta>) {
        self.stats
            .kafka_in_flight
            .sub(u64::from(meta.records), meta.datapoints);
        match result {
            Ok(message) => {
                self.stats
                    .delivered
                    .add(u64::from(meta.records), meta.datapoints);
                self.stats.kafka_messages_delivered.fetch_add(1, Relaxed);
                self.stats
                    .delivery_latency_ms
                    .observe(meta.created.elapsed().as_secs_f64() * 1000.0);
                self.stats
                    .count_topic(&meta.topic, |c| c.delivered += meta.datapoints);
                if let Some(partners) = &self.partners {
                    partners.publish(&meta.topic, message.payload().unwrap_or_default());
                }
                self.all_down.store(false, Relaxed);
                if self.is_current() {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.all_brokers_down = false;
                    state.unavailable_since = None;
                }
            }
            Err((error, message)) => {
                let code = error
                    .rdkafka_error_code()
                    .unwrap_or(RDKafkaErrorCode::Unknown);
                let size = message.payload_len();
                if self.final_purge.load(Relaxed) {
                    self.stats.count_drop(
                        DropReason::Shutdown,
                        u64::from(meta.records),
                        meta.datapoints,
                    );
                } else if is_permanent(code) || meta.attempts + 1 >= MAX_ATTEMPTS {
                    self.stats.count_drop(
                        DropReason::KafkaRejected,
                        u64::from(meta.records),
                        meta.datapoints,
                    );
                    error!(topic = %meta.topic, bytes = size, datapoints = meta.datapoints, attempts = meta.attempts + 1, %error,
                        "Kafka rejected a message; its datapoints are dropped.");
                } else {
                    let purged = matches!(
                        code,
                        RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
                    );
                    debug!(topic = %meta.topic, %error, purged, "Kafka message failed; producing it again.");
                    self.stats.kafka_messages_retried.fetch_add(1, Relaxed);
                    let retry = retry_of(
                        *meta,
                        message.payload().unwrap_or_default(),
                        purged,
                        &self.retry_budget,
                    );
                    if let Err(mpsc::error::SendError(lost)) = self.retry.send(retry) {
                        // The sink is gone (only after shutdown): count it.
                        self.stats.count_drop(
                            DropReason::Shutdown,
                            u64::from(lost.records),
                            lost.datapoints,
                        );
                    }
                }
            }
        }
        self.room.notify_one();
    }
}

/// The message to produce again after a failure, its payload copied out
/// of librdkafka and counted in `retry_budget` (`kafka_retry_bytes`) until
/// it is produced again: only messages librdkafka held come back, so these
/// never hold more than its queue did. A purge (a broker switch moving the
/// queue) is not the message's failure: it goes again at once, without
/// counting an attempt.
fn retry_of(meta: Meta, payload: &[u8], purged: bool, retry_budget: &Arc<Budget>) -> Message {
    Message {
        topic: meta.topic,
        key: meta.key,
        lease: retry_budget.force(allocated_size(payload.len())),
        payload: payload.to_vec(),
        records: meta.records,
        datapoints: meta.datapoints,
        created: meta.created,
        attempts: if purged {
            meta.attempts
        } else {
            meta.attempts + 1
        },
        not_before: (!purged).then(|| Instant::now() + retry_backoff(meta.attempts)),
    }
}

type KafkaProducer = ThreadedProducer<Context>;

/// Creates `topic` through the admin API; an existing topic is success.
pub async fn create_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| e.to_string())?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match admin
        .create_topics(&[new_topic], &options)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
    {
        Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
        Some(Err((_, code))) => Err(code.to_string()),
        None => Err("no result".into()),
    }
}

/// Looks `topic` up on the brokers and creates it where it does not exist
/// (tansu and many production clusters do not auto-create). Never longer
/// than half a minute: a broker that does not answer means trying again.
async fn look_up_topic(
    producer: Arc<KafkaProducer>,
    admin: &ClientConfig,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> TopicState {
    let later = |secs| TopicState::RetryAt(Instant::now() + Duration::from_secs(secs));
    let name = topic.to_owned();
    let lookup = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&name), Duration::from_secs(5))
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            })
    })
    .await;
    match lookup {
        Ok(Ok(true)) => return TopicState::Ready,
        Ok(Ok(false)) => {}
        Ok(Err(error)) => {
            crate::telemetry::throttled_warn("kafka metadata", |repeats| {
                warn!(%topic, %error, repeats, "Could not read Kafka metadata for a topic; will retry.");
            });
            return later(2);
        }
        Err(_) => return later(2),
    }
    let create = create_topic(admin, topic, partitions, replication);
    match tokio::time::timeout(Duration::from_secs(20), create).await {
        Ok(Ok(())) => {
            info!(%topic, partitions, replication, "Created Kafka topic.");
            TopicState::Ready
        }
        Ok(Err(error)) => {
            error!(%topic, %error, "Kafka topic does not exist and could not be created; its data is held and creation retried.");
            later(5)
        }
        Err(_) => {
            warn!(%topic, "No answer to creating a Kafka topic within 20 s; will retry.");
            later(5)
        }
    }
}

/// The Kafka sink task's state.
pub struct KafkaSink {
    settings: KafkaSettings,
    stats: Arc<Stats>,
    buffer: Arc<Buffer>,
    batcher: Batcher,
    outbox: VecDeque<Message>,
    producer: Option<(Arc<KafkaProducer>, Discovered)>,
    retry_tx: mpsc::UnboundedSender<Message>,
    retry_rx: mpsc::UnboundedReceiver<Message>,
    /// Counts the bytes of messages handed back for a retry.
    retry_budget: Arc<Budget>,
    /// Producers replaced by a broker switch, still flushing to the old
    /// brokers; shutdown waits for them too, so the final count is exact.
    retiring: Vec<Arc<KafkaProducer>>,
    /// The number of the producer in use (see `Context::generation`).
    generation: Arc<AtomicU64>,
    room: Arc<Notify>,
    brokers_down: Arc<Notify>,
    state: Arc<Mutex<BrokerState>>,
    topics: TopicCache,
    /// Topic lookups report here (see [`TopicResult`]).
    topic_tx: mpsc::UnboundedSender<TopicResult>,
    topic_rx: mpsc::UnboundedReceiver<TopicResult>,
    /// Messages waiting for their topic's lookup, per topic, in order: a
    /// topic being created never holds up the others.
    parked: HashMap<Arc<str>, VecDeque<Message>>,
    /// Bytes of the parked messages: past [`PARKED_SHARE`] of the buffer,
    /// the sink takes no more from the buffer, so that what waits stays
    /// where the full policy can reach it.
    parked_bytes: usize,
    /// The broker source the discovery task follows.
    source: tokio::sync::watch::Sender<BrokerSource>,
    partners: Option<Arc<crate::partner::PartnerHub>>,
    runtime: Option<tokio::sync::watch::Receiver<SinkRuntime>>,
    shutdown: Option<Arc<crate::shutdown::Shutdown>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicState {
    Ready,
    /// A lookup (and creation, if need be) is running in a task of its own.
    Pending,
    RetryAt(Instant),
}

/// Messages waiting for their topics' lookups may hold a quarter of the
/// buffer; beyond, the sink stops taking from the buffer (whose full policy
/// then applies) until a topic is known.
const PARKED_SHARE: usize = 4;

/// The outcome of a topic lookup: the producer generation it was made
/// with, the topic, and what is known of it now.
type TopicResult = (u64, Arc<str>, TopicState);

/// Topics the sink has seen: known to exist, or to look up again at a time.
/// Bounded, so that a sender inventing topics can't grow it forever: when
/// it is full, it forgets everything, and each topic is looked up again.
#[derive(Debug, Default)]
struct TopicCache {
    map: HashMap<Arc<str>, TopicState>,
}

impl TopicCache {
    const CAPACITY: usize = 10_000;

    fn get(&self, topic: &str) -> Option<TopicState> {
        self.map.get(topic).copied()
    }

    fn insert(&mut self, topic: Arc<str>, state: TopicState) {
        if self.map.len() >= Self::CAPACITY && !self.map.contains_key(&topic) {
            self.map.clear();
        }
        self.map.insert(topic, state);
    }

    fn remove(&mut self, topic: &str) {
        self.map.remove(topic);
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

impl KafkaSink {
    /// A sink reading from `buffer`.
    pub fn new(
        settings: KafkaSettings,
        stats: Arc<Stats>,
        buffer: Arc<Buffer>,
        state: Arc<Mutex<BrokerState>>,
    ) -> Self {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let (topic_tx, topic_rx) = mpsc::unbounded_channel();
        Self {
            topic_tx,
            topic_rx,
            parked: HashMap::new(),
            parked_bytes: 0,
            source: tokio::sync::watch::Sender::new(settings.source.clone()),
            batcher: Batcher::with_sync(settings.thresholds, settings.sync),
            retry_budget: Budget::for_gauge(stats.clone(), crate::buffer::Gauge::KafkaRetryBytes),
            partners: None,
            runtime: None,
            shutdown: None,
            settings,
            stats,
            buffer,
            outbox: VecDeque::new(),
            producer: None,
            retry_tx,
            retry_rx,
            retiring: Vec::new(),
            generation: Arc::new(AtomicU64::new(0)),
            room: Arc::new(Notify::new()),
            brokers_down: Arc::new(Notify::new()),
            state,
            topics: TopicCache::default(),
        }
    }

    /// Hands delivered messages to these partners too.
    pub fn with_partners(mut self, partners: Arc<crate::partner::PartnerHub>) -> Self {
        self.partners = Some(partners);
        self
    }

    /// Follows runtime changes of thresholds and broker source.
    pub fn with_runtime(mut self, runtime: tokio::sync::watch::Receiver<SinkRuntime>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Delivers at shutdown until this shutdown's sink deadline.
    pub fn with_shutdown(mut self, shutdown: Arc<crate::shutdown::Shutdown>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// When delivering must stop, once input has stopped: the shutdown's
    /// sink deadline, or the grace from now without one.
    fn stop_delivering_at(&self) -> Instant {
        self.shutdown
            .as_ref()
            .and_then(|s| s.sink_deadline())
            .unwrap_or_else(|| {
                crate::shutdown::deadline_after(Instant::now(), self.settings.shutdown_grace)
            })
    }

    fn create_producer(&self, discovered: &Discovered) -> Result<KafkaProducer, KafkaError> {
        let generation = self.generation.load(Relaxed) + 1;
        let context = Context {
            stats: self.stats.clone(),
            partners: self.partners.clone(),
            retry: self.retry_tx.clone(),
            retry_budget: self.retry_budget.clone(),
            room: self.room.clone(),
            brokers_down: self.brokers_down.clone(),
            state: self.state.clone(),
            generation,
            current: self.generation.clone(),
            all_down: AtomicBool::new(false),
            final_purge: AtomicBool::new(false),
        };
        client_config(&self.settings, &discovered.brokers).create_with_context(context)
    }

    fn set_state(&self, update: impl FnOnce(&mut BrokerState)) {
        update(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Takes in what the discovery task found: a changed broker set gets a
    /// new producer, and the old one's messages move over.
    fn apply_discovery(&mut self, result: Result<Discovered, String>) {
        let discovered = match result {
            Ok(discovered) => discovered,
            Err(error) => {
                let has_producer = self.producer.is_some();
                self.set_state(|s| {
                    s.last_error = Some(error);
                    if !has_producer {
                        s.unavailable_since
                            .get_or_insert_with(std::time::Instant::now);
                    }
                });
                return;
            }
        };
        self.set_state(|s| s.last_error = None);
        if let Some((_, current)) = &self.producer
            && current.brokers == discovered.brokers
        {
            return;
        }
        let producer = match self.create_producer(&discovered) {
            Ok(producer) => Arc::new(producer),
            Err(error) => {
                error!(%error, brokers = ?discovered.brokers, "Could not create the Kafka producer; check the librdkafka options.");
                let has_producer = self.producer.is_some();
                self.set_state(|s| {
                    s.last_error = Some(format!("could not create the Kafka producer: {error}"));
                    if !has_producer {
                        s.unavailable_since
                            .get_or_insert_with(std::time::Instant::now);
                    }
                });
                return;
            }
        };
        info!(brokers = ?discovered.brokers, method = %discovered.method, "Using Kafka brokers.");
        // From here on, only the new producer speaks for the broker state.
        self.generation.fetch_add(1, Relaxed);
        self.set_state(|s| {
            s.current = Some(discovered.clone());
            s.all_brokers_down = false;
            s.unavailable_since = None;
        });
        self.topics.clear();
        let old = self.producer.replace((producer, discovered));
        // Topics are looked up again on the new brokers.
        let parked: Vec<Arc<str>> = self.parked.keys().cloned().collect();
        for topic in parked {
            self.ensure_topic(&topic);
        }
        if let Some((old, old_brokers)) = old {
            self.stats.producer_switches.fetch_add(1, Relaxed);
            info!(old = ?old_brokers.brokers, "Kafka brokers changed: moving queued messages to the new brokers.");
            // What the old producer holds goes to the old brokers while
            // they answer: re-sending a request in flight blindly would
            // duplicate whatever they had written, and purging only the
            // queue makes an idempotent producer stall on its sequence gap.
            // What has no answer after 30 s, or everything at once when the
            // old brokers are all down, is purged; it comes back to be
            // produced again at once to the new brokers.
            self.retiring.retain(|p| p.in_flight_count() > 0);
            self.retiring.push(old.clone());
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                loop {
                    if old.flush(Duration::from_millis(200)).is_ok() {
                        return;
                    }
                    if old.context().all_down.load(Relaxed)
                        || started.elapsed() >= Duration::from_secs(30)
                    {
                        break;
                    }
                }
                old.purge(PurgeConfig::default().queue().inflight());
                let _ = old.flush(Duration::from_secs(1));
            });
        }
    }

    /// Whether `topic` is known to exist. When it is not known yet, a task
    /// looks it up (and creates it through the admin API where the broker
    /// does not auto-create) and reports back; meanwhile its messages wait,
    /// and every other topic goes on.
    fn ensure_topic(&mut self, topic: &Arc<str>) -> bool {
        match self.topics.get(topic) {
            Some(TopicState::Ready) => return true,
            Some(TopicState::Pending) => return false,
            Some(TopicState::RetryAt(at)) if Instant::now() < at => return false,
            _ => {}
        }
        let Some((producer, discovered)) = &self.producer else {
            return false;
        };
        let producer = producer.clone();
        let admin = client_config(&self.settings, &discovered.brokers);
        let (partitions, replication) = (
            self.settings.topic_partitions,
            self.settings.topic_replication,
        );
        let generation = self.generation.load(Relaxed);
        let results = self.topic_tx.clone();
        let name = topic.clone();
        self.topics.insert(topic.clone(), TopicState::Pending);
        tokio::spawn(async move {
            let state = look_up_topic(producer, &admin, &name, partitions, replication).await;
            let _ = results.send((generation, name, state));
        });
        false
    }

    /// Takes in a topic lookup's outcome: a topic ready releases its
    /// waiting messages.
    fn topic_known(&mut self, (generation, topic, state): TopicResult) {
        if generation != self.generation.load(Relaxed) {
            return; // made with a producer since replaced
        }
        self.topics.insert(topic.clone(), state);
        if state == TopicState::Ready
            && let Some(waiting) = self.parked.remove(&topic)
        {
            for message in waiting.into_iter().rev() {
                self.parked_bytes -= message.payload.len();
                self.outbox.push_front(message);
            }
        }
    }

    /// The next time a parked topic may be looked up again.
    fn next_topic_retry(&self) -> Option<Instant> {
        self.parked
            .keys()
            .filter_map(|topic| match self.topics.get(topic) {
                Some(TopicState::RetryAt(at)) => Some(at),
                _ => None,
            })
            .min()
    }

    fn retry_topics(&mut self) {
        let due: Vec<Arc<str>> = self.parked.keys().cloned().collect();
        for topic in due {
            if self.ensure_topic(&topic) {
                self.topic_known((self.generation.load(Relaxed), topic, TopicState::Ready));
            }
        }
    }

    /// Produces from the outbox until it is empty or librdkafka is full.
    /// Returns false when it stopped on a full queue or a backing-off retry.
    fn produce_outbox(&mut self) -> bool {
        while let Some(message) = self.outbox.pop_front() {
            if message.not_before.is_some_and(|t| Instant::now() < t) {
                // A retry backing off; the caller polls again shortly.
                self.outbox.push_front(message);
                return false;
            }
            if self.parked.contains_key(&message.topic) || !self.ensure_topic(&message.topic) {
                // Its topic is being looked up: it waits apart, and the
                // other topics go on.
                self.parked_bytes += message.payload.len();
                self.parked
                    .entry(message.topic.clone())
                    .or_default()
                    .push_back(message);
                continue;
            }
            let Some((producer, _)) = &self.producer else {
                self.outbox.push_front(message);
                return false;
            };
            let meta = Box::new(Meta {
                topic: message.topic.clone(),
                key: message.key.clone(),
                records: message.records,
                datapoints: message.datapoints,
                created: message.created,
                attempts: message.attempts,
            });
            let mut record =
                BaseRecord::with_opaque_to(&message.topic, meta).payload(&message.payload);
            if let Some(key) = &message.key {
                record = record.key(key.as_bytes());
            }
            // Counted before the send: its delivery report may come first.
            let in_flight = &self.stats.kafka_in_flight;
            in_flight.add(u64::from(message.records), message.datapoints);
            let sent = producer.send(record);
            if sent.is_err() {
                in_flight.sub(u64::from(message.records), message.datapoints);
            }
            match sent {
                Ok(()) => {
                    self.stats.kafka_messages_produced.fetch_add(1, Relaxed);
                    self.stats.batch_records.observe(f64::from(message.records));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.stats.kafka_queue_full_waits.fetch_add(1, Relaxed);
                    self.outbox.push_front(message);
                    return false;
                }
                Err((error, _)) => {
                    let code = error
                        .rdkafka_error_code()
                        .unwrap_or(RDKafkaErrorCode::Unknown);
                    if is_permanent(code) {
                        self.stats.count_drop(
                            DropReason::KafkaRejected,
                            u64::from(message.records),
                            message.datapoints,
                        );
                        error!(topic = %message.topic, bytes = message.payload.len(), %error,
                            "Kafka refused a message; its datapoints are dropped.");
                    } else {
                        warn!(topic = %message.topic, %error, "Could not produce a Kafka message; will retry.");
                        self.topics.remove(&message.topic);
                        self.outbox.push_front(message);
                        return false;
                    }
                }
            }
        }
        true
    }

    fn batch(&mut self, chunk: crate::buffer::Chunk) {
        let now = Instant::now();
        let mut out = Vec::new();
        self.batcher.hold(chunk.lease);
        for item in chunk.items {
            if let Err(too_large) = self.batcher.add(item, now, &mut out) {
                self.stats
                    .count_drop(DropReason::TooLarge, 1, u64::from(too_large.datapoints));
                error!(topic = %too_large.topic, bytes = too_large.size, limit = too_large.limit,
                    "Dropped a record too large for a Kafka message.");
            }
        }
        self.outbox.extend(out);
    }

    /// Runs until the buffer is closed and drained, then delivers what it
    /// can within the shutdown grace and counts the rest as dropped.
    pub async fn run(mut self) {
        let (found_tx, mut found) = mpsc::channel(4);
        let stop_discovery = tokio_util::sync::CancellationToken::new();
        let discovery = tokio::spawn(crate::discovery::watch(
            self.source.subscribe(),
            self.settings.rediscover,
            self.brokers_down.clone(),
            found_tx,
            self.stats.clone(),
            stop_discovery.clone(),
        ));
        let mut input_done = false;
        let mut deadline: Option<Instant> = None;
        loop {
            // Shutdown: the grace ends at its deadline, even while Kafka
            // takes nothing (no producer, brokers down, a full outbox).
            if deadline.is_none() && self.buffer.is_closed() {
                deadline = Some(self.stop_delivering_at());
            }
            while let Ok(message) = self.retry_rx.try_recv() {
                self.outbox.push_front(message);
            }
            let flowing = self.producer.is_some() && self.produce_outbox();
            if input_done && flowing && self.outbox.is_empty() && self.parked.is_empty() {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let batch_deadline = self.batcher.next_deadline();
            let topic_retry = self.next_topic_retry();
            let wait_for_room = !self.outbox.is_empty()
                || self.parked_bytes > self.buffer.capacity() / PARKED_SHARE;
            tokio::select! {
                chunk = self.buffer.pop(), if !wait_for_room && !input_done => match chunk {
                    Some(chunk) => self.batch(chunk),
                    None => {
                        input_done = true;
                        let stop = self.stop_delivering_at();
                        deadline.get_or_insert(stop);
                        let mut out = Vec::new();
                        self.batcher.flush_all(&mut out);
                        self.outbox.extend(out);
                    }
                },
                _ = tokio::time::sleep_until(batch_deadline.unwrap_or_else(Instant::now)), if batch_deadline.is_some() => {
                    let mut out = Vec::new();
                    self.batcher.flush_due(Instant::now(), &mut out);
                    self.outbox.extend(out);
                }
                Some(message) = self.retry_rx.recv() => self.outbox.push_back(message),
                Some(result) = self.topic_rx.recv() => self.topic_known(result),
                Some(result) = found.recv() => self.apply_discovery(result),
                _ = tokio::time::sleep_until(topic_retry.unwrap_or_else(Instant::now)), if topic_retry.is_some() => {
                    self.retry_topics();
                }
                _ = self.room.notified(), if wait_for_room => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if wait_for_room => {}
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
                Some(change) = async {
                    match self.runtime.as_mut() {
                        Some(runtime) => runtime.changed().await.ok().map(|()| runtime.borrow_and_update().clone()),
                        None => std::future::pending().await,
                    }
                } => {
                    self.batcher.set_thresholds(change.thresholds);
                    self.settings.thresholds = change.thresholds;
                    if change.source != self.settings.source {
                        self.settings.source = change.source.clone();
                        self.source.send_replace(change.source);
                    }
                }
            }
        }
        stop_discovery.cancel();
        let _ = discovery.await;
        let deadline = deadline.unwrap_or_else(|| self.stop_delivering_at());
        self.finish(deadline).await;
    }

    /// Flushes the producer until `deadline`, then counts whatever is left
    /// anywhere as dropped for shutdown, so the identity holds exactly.
    async fn finish(mut self, deadline: Instant) {
        // The current producer and any still flushing after a broker switch:
        // every message gets its delivery report before the final count.
        let producers: Vec<_> = self
            .producer
            .take()
            .map(|(producer, _)| producer)
            .into_iter()
            .chain(self.retiring.drain(..))
            .collect();
        if !producers.is_empty() {
            let until = deadline.into_std();
            // What is purged gets its delivery report within this, counted
            // as a shutdown drop; whatever still has none is counted below.
            let purge_time = self
                .shutdown
                .as_ref()
                .map_or(Duration::from_secs(2), |s| s.reserve() / 2);
            let flushed = tokio::task::spawn_blocking(move || {
                let mut all_flushed = true;
                for producer in producers {
                    let remaining = until.saturating_duration_since(std::time::Instant::now());
                    if producer.flush(remaining).is_err() {
                        all_flushed = false;
                        producer.context().final_purge.store(true, Relaxed);
                        producer.purge(PurgeConfig::default().queue().inflight());
                        let _ = producer.flush(purge_time);
                    }
                }
                all_flushed
            })
            .await;
            if !matches!(flushed, Ok(true)) {
                warn!(
                    "Shutdown grace ran out with Kafka messages undelivered; they are counted as dropped."
                );
            }
        }
        // Every producer is gone: what got no delivery report never will.
        let unreported = self.stats.kafka_in_flight.take();
        if unreported.records > 0 || unreported.datapoints > 0 {
            warn!(
                records = unreported.records,
                datapoints = unreported.datapoints,
                "Shutdown: Kafka messages without a delivery report are counted as dropped."
            );
            self.stats.count_drop(
                DropReason::Shutdown,
                unreported.records,
                unreported.datapoints,
            );
        }
        // Whatever a delivery callback sent back, and whatever never got out.
        self.retry_rx.close();
        while let Ok(message) = self.retry_rx.try_recv() {
            self.outbox.push_back(message);
        }
        let mut out = Vec::new();
        self.batcher.flush_all(&mut out);
        self.outbox.extend(out);
        for (_, waiting) in self.parked.drain() {
            self.outbox.extend(waiting);
        }
        self.parked_bytes = 0;
        for message in self.outbox.drain(..) {
            self.stats.count_drop(
                DropReason::Shutdown,
                u64::from(message.records),
                message.datapoints,
            );
        }
        while let Some(chunk) = self.buffer.try_pop() {
            self.stats.count_drop(
                DropReason::Shutdown,
                chunk.items.len() as u64,
                chunk.datapoints(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_cache_is_bounded_and_forgets_rather_than_grows() {
        let mut cache = TopicCache::default();
        for i in 0..TopicCache::CAPACITY {
            cache.insert(Arc::from(format!("t{i}")), TopicState::Ready);
        }
        assert_eq!(cache.map.len(), TopicCache::CAPACITY);
        // A known topic changes state in place.
        let later = Instant::now() + Duration::from_secs(5);
        cache.insert(Arc::from("t7"), TopicState::RetryAt(later));
        assert_eq!(cache.get("t7"), Some(TopicState::RetryAt(later)));
        assert_eq!(cache.map.len(), TopicCache::CAPACITY);
        // One more topic: the rest are forgotten, to be looked up again.
        cache.insert(Arc::from("new"), TopicState::Ready);
        assert_eq!(cache.map.len(), 1);
        assert_eq!(cache.get("new"), Some(TopicState::Ready));
        assert_eq!(cache.get("t0"), None);
    }

    #[test]
    fn retries_back_off_to_five_seconds_and_stop_after_minutes() {
        assert_eq!(retry_backoff(0), Duration::from_millis(100));
        assert_eq!(retry_backoff(3), Duration::from_millis(800));
        assert_eq!(retry_backoff(6), Duration::from_secs(5));
        assert_eq!(retry_backoff(40), Duration::from_secs(5));
        let total: Duration = (0..MAX_ATTEMPTS).map(retry_backoff).sum();
        // Long enough for a broker restart, short of retrying forever.
        assert!(total > Duration::from_secs(120) && total < Duration::from_secs(600));
    }

    #[test]
    fn size_and_schema_errors_are_permanent_but_a_broker_error_is_not() {
        assert!(is_permanent(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(is_permanent(RDKafkaErrorCode::InvalidTopic));
        assert!(!is_permanent(RDKafkaErrorCode::Unknown));
        assert!(!is_permanent(RDKafkaErrorCode::NotEnoughReplicas));
    }

    #[test]
    fn a_message_handed_back_is_counted_until_it_goes_again() {
        let stats = Arc::new(Stats::default());
        let budget = Budget::for_gauge(stats.clone(), crate::buffer::Gauge::KafkaRetryBytes);
        let meta = || Meta {
            topic: "t".into(),
            key: None,
            records: 3,
            datapoints: 30,
            created: Instant::now(),
            attempts: 2,
        };
        let failed = retry_of(meta(), &[7; 1000], false, &budget);
        assert_eq!(failed.payload, vec![7; 1000]);
        assert_eq!(failed.attempts, 3);
        assert!(failed.not_before.is_some(), "a failure backs off");
        let purged = retry_of(meta(), &[7; 1000], true, &budget);
        assert_eq!(purged.attempts, 2);
        assert_eq!(purged.not_before, None, "a purge goes again at once");
        assert_eq!(
            stats.kafka_retry_bytes.load(Relaxed),
            2 * allocated_size(1000) as i64
        );
        drop((failed, purged));
        assert_eq!(stats.kafka_retry_bytes.load(Relaxed), 0);
    }
}
