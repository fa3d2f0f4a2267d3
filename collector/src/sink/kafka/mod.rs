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

mod delivery;
mod poll;
mod producer;
mod settings;
mod topics;

pub use settings::{BrokerState, KafkaSettings, SecurityFailureState, SinkRuntime};
pub use topics::create_topic;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{error, warn};

use super::batch::{Batcher, Message};
use crate::buffer::Buffer;
use crate::discovery::{BrokerSource, Discovered};
use crate::memory::{Budget, Gauge};
use crate::stats::{Counts, DropReason, Stats};
use delivery::Meta;
pub(crate) use delivery::is_permanent;
pub(crate) use poll::KafkaProducer;
use topics::{PARKED_SHARE, TopicCache, TopicResult};

/// The sink's producer: its delivery reports go to [`delivery::Context`].
type SinkProducer = KafkaProducer<delivery::Context>;

/// How often the brokers are asked for metadata while a TLS or
/// authentication failure is reported (see `probe_brokers`).
const SECURITY_PROBE_PERIOD: Duration = Duration::from_secs(5);

/// The Kafka sink task's state.
pub struct KafkaSink {
    settings: KafkaSettings,
    stats: Arc<Stats>,
    buffer: Arc<Buffer>,
    batcher: Batcher,
    outbox: VecDeque<Message>,
    producer: Option<(Arc<SinkProducer>, Discovered)>,
    /// The topic admin's configuration, made with the producer.
    admin: Option<rdkafka::ClientConfig>,
    /// Brokers whose producer could not be made: a reload tries again.
    unmade: Option<Discovered>,
    /// Told when a TLS or authentication failure is reported.
    failure_reported: Arc<Notify>,
    retry_tx: mpsc::UnboundedSender<Message>,
    retry_rx: mpsc::UnboundedReceiver<Message>,
    /// Counts the bytes of messages handed back for a retry.
    retry_budget: Arc<Budget>,
    /// Producers replaced by a broker switch, still flushing to the old
    /// brokers; shutdown waits for them too, so the final count is exact.
    retiring: Vec<Arc<SinkProducer>>,
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
    /// The reloads taken in so far (see [`SinkRuntime::reloads`]).
    reloads: u64,
    shutdown: Option<Arc<crate::shutdown::Shutdown>>,
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
            batcher: Batcher::new(settings.thresholds),
            retry_budget: Budget::for_gauge(stats.clone(), Gauge::KafkaRetryBytes),
            partners: None,
            runtime: None,
            reloads: 0,
            shutdown: None,
            settings,
            stats,
            buffer,
            outbox: VecDeque::new(),
            producer: None,
            admin: None,
            unmade: None,
            failure_reported: Arc::new(Notify::new()),
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

    /// Spawns the sink; at shutdown it delivers until this shutdown's sink
    /// deadline.
    pub fn spawn(mut self, shutdown: &Arc<crate::shutdown::Shutdown>) -> crate::shutdown::Task {
        self.shutdown = Some(shutdown.clone());
        crate::shutdown::Task::spawn("sink", self.run())
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
                spooled: message.spooled.clone(),
            });
            let mut record =
                BaseRecord::with_opaque_to(&message.topic, meta).payload(&message.payload);
            if let Some(key) = &message.key {
                record = record.key(key.as_bytes());
            }
            // Counted before the send: its delivery report may come first.
            let in_flight = &self.stats.kafka_in_flight;
            let spooled = message.spooled.counts();
            in_flight.add(u64::from(message.records), message.datapoints);
            self.stats
                .kafka_in_flight_spooled
                .add(spooled.records, spooled.datapoints);
            let sent = producer.send(record);
            if sent.is_err() {
                in_flight.sub(u64::from(message.records), message.datapoints);
                self.stats
                    .kafka_in_flight_spooled
                    .sub(spooled.records, spooled.datapoints);
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
                        self.buffer.ack(&message.spooled.seqs);
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
                if too_large.seq != 0 {
                    self.buffer.ack(&[too_large.seq]);
                }
                error!(topic = %too_large.topic, bytes = too_large.size, limit = too_large.limit,
                    "Dropped a record too large for a Kafka message.");
            }
        }
        self.outbox.extend(out);
    }

    /// Runs until the buffer is closed and drained, then delivers what it
    /// can within the shutdown grace and counts the rest as dropped.
    async fn run(mut self) {
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
        // Armed when a security failure is reported; disarmed once the
        // state says it cleared (the lock is taken only then).
        let mut probe_armed = false;
        let mut next_probe = Instant::now();
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
            // Done once input is, with nothing left here: delivered to
            // librdkafka, or nothing to deliver at all (no producer was
            // ever made, and nothing came in).
            if input_done
                && (flowing || self.producer.is_none())
                && self.outbox.is_empty()
                && self.parked.is_empty()
            {
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
                _ = self.failure_reported.notified() => probe_armed = true,
                _ = tokio::time::sleep_until(next_probe), if probe_armed && self.producer.is_some() => {
                    if self.security_failure_reported() {
                        self.probe_brokers();
                        next_probe = Instant::now() + SECURITY_PROBE_PERIOD;
                    } else {
                        probe_armed = false;
                    }
                }
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
                    if change.security != self.settings.security || change.reloads != self.reloads {
                        self.settings.security = change.security;
                        self.reloads = change.reloads;
                        self.remake_producer();
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
                for producer in &producers {
                    let remaining = until.saturating_duration_since(std::time::Instant::now());
                    if producer.flush(remaining).is_err() {
                        all_flushed = false;
                        producer.context().final_purge.store(true, Relaxed);
                        producer.purge(PurgeConfig::default().queue().inflight());
                        let _ = producer.flush(purge_time);
                    }
                }
                // The event threads let go of their producers (within half
                // a second, their turn), so that dropping them here
                // destroys them before the process exits. One that does not
                // within the reserve is left to end on a thread of its own;
                // what it reports from now on is not counted again.
                let join_by = std::time::Instant::now() + purge_time;
                let mut late = Vec::new();
                for producer in producers {
                    let wait = join_by.saturating_duration_since(std::time::Instant::now());
                    if !producer.stop_events(wait) {
                        producer.context().counted.store(true, Relaxed);
                        late.push(producer);
                    }
                }
                if !late.is_empty() {
                    let _ = std::thread::Builder::new()
                        .name("kafka-late".into())
                        .spawn(move || drop(late));
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
        // Every producer has served its reports, or will not count them:
        // what got no delivery report is counted here.
        let unreported = self.stats.kafka_in_flight.take();
        let unreported_spooled = self.stats.kafka_in_flight_spooled.take();
        if unreported.records > 0 || unreported.datapoints > 0 {
            warn!(
                records = unreported.records,
                datapoints = unreported.datapoints,
                spooled_records = unreported_spooled.records,
                "Shutdown: Kafka messages without a delivery report are counted as dropped, or as spooled when they are in the disk spool."
            );
            self.stats
                .count_left_at_shutdown(unreported, unreported_spooled);
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
            self.stats.count_left_at_shutdown(
                Counts {
                    records: u64::from(message.records),
                    datapoints: message.datapoints,
                },
                message.spooled.counts(),
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
