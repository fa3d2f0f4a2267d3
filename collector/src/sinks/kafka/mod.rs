//! The Kafka sink (rdkafka). Each message is one OCF file. Delivery reports,
//! not `send` returning, decide what is delivered.
//!
//! - `QueueFull`: the sink stops taking from the buffer until librdkafka has
//!   room, so the buffer fills and its full policy applies.
//! - Permanent errors (message too large, invalid topic) drop the message,
//!   counted as `kafka_rejected`, with its topic and size logged. They are
//!   never retried.
//! - A topic the brokers refuse (`TOPIC_AUTHORIZATION_FAILED`, at lookup,
//!   at produce or in a delivery report) costs only its own records: they
//!   wait apart (`parked`; with the disk spool, in its parked area), up to
//!   `kafka_parked_max_bytes`, the oldest past it dropped as
//!   `topic_refused`, and go once the topic can be written. `/health` names
//!   the refused topics.
//! - Purged or timed-out messages (a producer switch, or the rare transient
//!   failure) are produced again.
//! - Brokers are rediscovered periodically and when all brokers are down; a
//!   changed set gets a new producer, and the old one's queue is moved over.

mod delivery;
mod parked;
mod poll;
mod producer;
mod settings;
mod topics;

pub use settings::{BrokerState, KafkaSettings, RefusedTopic, SecurityFailureState, SinkRuntime};
pub use topics::create_topic;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::batch::{Batcher, Message, unbatch};
use crate::buffer::Buffer;
use crate::discovery::{BrokerSource, Discovered};
use crate::memory::{Budget, Gauge, Lease};
use crate::route::Routed;
use crate::stats::{Counts, DropReason, Stats};
pub(crate) use delivery::is_permanent;
use delivery::{Meta, Returned};
use parked::Parked;
pub(crate) use poll::KafkaProducer;
use topics::{AdminCell, Gate, Lookup, Refusal, TopicCache, TopicResult};

/// The sink's producer: its delivery reports go to [`delivery::Context`].
type SinkProducer = KafkaProducer<delivery::Context>;

/// How often the brokers are asked for metadata while a TLS or
/// authentication failure is reported (see `probe_brokers`).
const SECURITY_PROBE_PERIOD: Duration = Duration::from_secs(5);

/// Producers alive at once, at most: the one in use and those still
/// flushing to their brokers after a switch or a reload. A reload storm
/// waits for them rather than multiplying Kafka clients.
const MAX_PRODUCERS: usize = 3;
/// A new producer is made at most this often; what asks for one meanwhile
/// is taken in at the next (the latest brokers, the latest settings).
const REMAKE_INTERVAL: Duration = Duration::from_millis(500);
/// How often the sink tidies up while there is something to tidy: emptied
/// parked spools, producers done flushing, the refused topics `/health`
/// shows.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often otherwise (topics idle for [`topics::IDLE`] are forgotten):
/// an idle collector's runtime does not wake each second.
const HOUSEKEEPING_CALM: Duration = Duration::from_secs(60);

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
    retry_tx: mpsc::UnboundedSender<Returned>,
    retry_rx: mpsc::UnboundedReceiver<Returned>,
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
    /// Topics waiting for a lookup slot, in order (see `topics`).
    lookups: VecDeque<Arc<str>>,
    /// Lookups running.
    lookups_running: usize,
    /// The admin client topics are created with, for this producer.
    admin_cell: Arc<AdminCell>,
    /// Topic lookups report here (see [`TopicResult`]).
    topic_tx: mpsc::UnboundedSender<TopicResult>,
    topic_rx: mpsc::UnboundedReceiver<TopicResult>,
    /// Records waiting for their topic, in memory: a topic being looked
    /// up or refused never holds up the others.
    parked: Parked,
    /// Topics with records in the disk spool's parked area.
    disk_parked: HashSet<Arc<str>>,
    /// Topics whose parked records are being read back, now that they can
    /// be written.
    releasing: VecDeque<Arc<str>>,
    /// Topics the producer in use has produced to (see `kafka_max_topics`).
    produced_topics: HashSet<Arc<str>>,
    /// A new producer is wanted (a reload, a settings change, too many
    /// topics), for these brokers when they changed.
    remake: Option<Option<Discovered>>,
    /// When the last producer was made.
    last_made: Option<Instant>,
    /// Refused topics whose lookup answers again, waiting for a delivery
    /// to say they can be written; the delivery reports tell.
    probing: Arc<delivery::Probing>,
    /// Topics a delivery confirmed (see `probing`).
    confirmed_tx: mpsc::UnboundedSender<Arc<str>>,
    confirmed_rx: mpsc::UnboundedReceiver<Arc<str>>,
    /// The broker source the discovery task follows.
    source: tokio::sync::watch::Sender<BrokerSource>,
    partners: Option<Arc<crate::sinks::partner::PartnerHub>>,
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
        let (confirmed_tx, confirmed_rx) = mpsc::unbounded_channel();
        Self {
            probing: Arc::default(),
            confirmed_tx,
            confirmed_rx,
            topic_tx,
            topic_rx,
            lookups: VecDeque::new(),
            lookups_running: 0,
            admin_cell: Arc::default(),
            parked: Parked::new(settings.parked_max_bytes),
            disk_parked: HashSet::new(),
            releasing: VecDeque::new(),
            produced_topics: HashSet::new(),
            remake: None,
            last_made: None,
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
    pub fn with_partners(mut self, partners: Arc<crate::sinks::partner::PartnerHub>) -> Self {
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
            let Some((producer, _)) = &self.producer else {
                self.outbox.push_front(message);
                return false;
            };
            let producer = producer.clone();
            if self.gate(&message.topic) != Gate::Open {
                // Its topic is being looked up again, or refused: its
                // records wait apart, and the other topics go on.
                self.hold_back(message, None);
                continue;
            }
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
                    if !self.produced_topics.contains(&message.topic) {
                        self.produced_topics.insert(message.topic.clone());
                        if self.produced_topics.len() > self.settings.max_topics {
                            self.too_many_topics();
                        }
                    }
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
                    if topics::is_refusal(code) {
                        self.topic_refused(&message.topic, code);
                        self.hold_back(message, Some(code));
                    } else if is_permanent(code) {
                        self.stats.count_drop(
                            DropReason::KafkaRejected,
                            u64::from(message.records),
                            message.datapoints,
                        );
                        error!(topic = %message.topic, bytes = message.payload.len(), %error,
                            "Kafka refused a message; its datapoints are dropped.");
                        self.buffer.ack(&message.topic, &message.spooled.seqs);
                    } else {
                        warn!(topic = %message.topic, %error, "Could not produce a Kafka message; will retry.");
                        // Looked up again before it goes.
                        self.topics
                            .set(&message.topic, Lookup::RetryAt(Instant::now()));
                        self.outbox.push_front(message);
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The producer in use has produced to more topics than
    /// `kafka_max_topics`: librdkafka keeps each topic's state until the
    /// producer goes, so a new one is made.
    fn too_many_topics(&mut self) {
        crate::telemetry::throttled_warn("kafka_max_topics", |repeats| {
            warn!(
                limit = self.settings.max_topics,
                repeats,
                "The Kafka producer has produced to more topics than kafka_max_topics; it is made anew to let go of their state."
            );
        });
        self.produced_topics.clear();
        self.remake.get_or_insert(None);
    }

    /// Adds one record to its topic's batch, or parks it while its topic
    /// can't be written. `lease` is its share of the buffer's bound.
    fn add_record(&mut self, item: Routed, lease: Lease, out: &mut Vec<Message>) {
        let gate = self.gate(&item.topic);
        self.add_gated(gate, item, lease, Instant::now(), out);
    }

    /// `now`: when the record's chunk was taken (one clock read a chunk).
    fn add_gated(
        &mut self,
        gate: Gate,
        item: Routed,
        lease: Lease,
        now: Instant,
        out: &mut Vec<Message>,
    ) {
        match gate {
            Gate::Open => {
                self.batcher.hold(lease);
                if let Err(too_large) = self.batcher.add(item, now, out) {
                    self.stats
                        .count_drop(DropReason::TooLarge, 1, u64::from(too_large.datapoints));
                    if too_large.seq != 0 {
                        self.buffer.ack(&too_large.topic, &[too_large.seq]);
                    }
                    error!(topic = %too_large.topic, bytes = too_large.size, limit = too_large.limit,
                        "Dropped a record too large for a Kafka message.");
                }
            }
            Gate::Wait => self.parked.park(item, lease, false),
            Gate::Refused => self.park_refused(vec![(item, lease)]),
        }
    }

    fn batch(&mut self, chunk: crate::buffer::Chunk) {
        let mut out = Vec::new();
        let mut lease = chunk.lease;
        let now = Instant::now();
        // A block's records mostly share one topic: it is looked at once.
        let mut open: Option<Arc<str>> = None;
        for item in chunk.items {
            let share = lease.split(item.share as usize);
            let gate = match &open {
                Some(topic) if Arc::ptr_eq(topic, &item.topic) || *topic == item.topic => {
                    Gate::Open
                }
                _ => self.gate(&item.topic),
            };
            open = (gate == Gate::Open).then(|| item.topic.clone());
            self.add_gated(gate, item, share, now, &mut out);
        }
        // What no record took (rounding) goes with the batches.
        self.batcher.hold(lease);
        self.outbox.extend(out);
    }

    /// Takes a message whose topic can't be written now apart into its
    /// records, and parks them: refused (`refusal`), or waiting for the
    /// topic's lookup.
    fn hold_back(&mut self, message: Message, refusal: Option<RDKafkaErrorCode>) {
        let (topic, records, datapoints) =
            (message.topic.clone(), message.records, message.datapoints);
        let seqs = message.spooled.seqs.clone();
        let Some(records) = unbatch(message) else {
            // Never: every message is a file the batcher wrote.
            self.stats
                .count_drop(DropReason::InternalError, u64::from(records), datapoints);
            self.buffer.ack(&topic, &seqs);
            error!(%topic, "A Kafka message could not be taken apart to wait for its topic; its datapoints are dropped (internal_error).");
            return;
        };
        // Their shares move from the retry budget (or the message) to the
        // buffer's bound, as records in the buffer hold them.
        let budget = self.buffer.budget().clone();
        let records: Vec<(Routed, Lease)> = records
            .into_iter()
            .map(|(record, held)| {
                let lease = budget.force(held.bytes());
                drop(held);
                (record, lease)
            })
            .collect();
        if refusal.is_some() || self.topics.get(&topic).is_some_and(|e| e.refusal.is_some()) {
            self.park_refused(records);
        } else {
            for (record, lease) in records {
                self.parked.park(record, lease, false);
            }
        }
    }

    /// Parks records of a refused topic: with the disk spool, in its parked
    /// area (their memory goes back); else in memory. Past
    /// `kafka_parked_max_bytes` the oldest go, counted as `topic_refused`.
    fn park_refused(&mut self, records: Vec<(Routed, Lease)>) {
        let Some(topic) = records.first().map(|(r, _)| r.topic.clone()) else {
            return;
        };
        if let Some(spool) = self.buffer.spool().cloned() {
            let items: Vec<Routed> = records.iter().map(|(r, _)| r.clone()).collect();
            // With `spool_fsync = always` the write is synced before it is
            // taken: the worker hands its other tasks on meanwhile.
            let parked = if spool.settings().fsync == crate::spool::FsyncMode::Always {
                crate::buffer::blocking(|| spool.park(&topic, &items))
            } else {
                spool.park(&topic, &items)
            };
            match parked {
                Ok(()) => {
                    self.disk_parked.insert(topic);
                    return;
                }
                Err(crate::spool::Refused::Full) => {
                    // The parked area can't make room: these, the newest,
                    // go.
                    for (record, _) in &records {
                        self.drop_refused(record);
                    }
                    return;
                }
                // Its disk can't be used: they wait in memory.
                Err(crate::spool::Refused::Unavailable) => {}
            }
        }
        for (record, lease) in records {
            self.parked.park(record, lease, true);
        }
        while let Some((record, _lease)) = self.parked.over_bound() {
            self.drop_refused(&record);
        }
    }

    /// Drops a record of a refused topic for want of room, counted.
    fn drop_refused(&self, record: &Routed) {
        self.stats
            .count_drop(DropReason::TopicRefused, 1, u64::from(record.datapoints));
        if record.seq != 0 {
            self.buffer.ack(&record.topic, &[record.seq]);
        }
        crate::telemetry::throttled_warn("topic_refused_dropped", |repeats| {
            warn!(topic = %record.topic, repeats, limit = self.settings.parked_max_bytes,
                "Records kept for a topic the brokers refuse reached kafka_parked_max_bytes; the oldest are dropped (topic_refused).");
        });
    }

    /// The brokers refuse `topic`: its records wait apart from now on, and
    /// it is asked after again later.
    fn topic_refused(&mut self, topic: &Arc<str>, error: RDKafkaErrorCode) {
        let now = Instant::now();
        let known = self.topics.get(topic);
        let previous = known.and_then(|e| e.refusal);
        // More refusals before the next lookup (messages that were in
        // flight) are the same round: the lookup is not put off for them.
        let same_round = previous.is_some()
            && matches!(known.map(|e| e.lookup), Some(Lookup::RetryAt(at)) if at > now);
        let refusal = Refusal {
            error,
            since: previous.map_or_else(std::time::Instant::now, |r| r.since),
            attempts: match previous {
                None => 1,
                Some(r) if same_round => r.attempts,
                Some(r) => r.attempts + 1,
            },
        };
        if previous.is_none() {
            self.stats.kafka_topics_refused.fetch_add(1, Relaxed);
        }
        if !same_round {
            self.topics
                .set(topic, Lookup::RetryAt(now + refusal.retry_after()));
        }
        self.topics.set_refusal(topic, Some(refusal));
        self.probing.end(topic);
        crate::telemetry::throttled_warn("topic_refused", |repeats| {
            error!(%topic, %error, repeats, limit = self.settings.parked_max_bytes,
                "Kafka refuses a topic; its records are kept apart until it can be written (up to kafka_parked_max_bytes, then the oldest are dropped as topic_refused), and the other topics go on.");
        });
        self.parked.set_refused(topic, true);
        if self.buffer.spool().is_some() {
            // To the parked area: no segment of the spool stays for them.
            let waiting = self.parked.take(topic);
            if !waiting.is_empty() {
                self.park_refused(waiting);
            }
        }
        // `/health` says so at once while the refused are few; a flood of
        // them is told by the housekeeping, once a second.
        if self.stats.kafka_topics_refused_now.load(Relaxed) < 100 {
            self.publish_refused();
        }
    }

    /// `topic` can be written: what waited for it goes to its batches, in
    /// order, and what its parked area holds is read back.
    fn topic_ready(&mut self, topic: &Arc<str>) {
        self.topics.set(topic, Lookup::Ready);
        if self.topics.get(topic).and_then(|e| e.refusal).is_some() {
            // Its metadata answers, but only a delivery says it can be
            // written (an ACL may let it be described and not written):
            // one record goes first, the rest once it is delivered.
            self.probing.begin(topic);
            if let Some((record, lease)) = self.parked.take_first(topic) {
                let mut out = Vec::new();
                self.add_record(record, lease, &mut out);
                self.outbox.extend(out);
            } else if self.disk_parked.contains(topic) && !self.releasing.contains(topic) {
                self.releasing.push_back(topic.clone());
            }
            return;
        }
        self.release_all(topic);
    }

    /// A delivery to a topic that was refused: it can be written again.
    fn topic_confirmed(&mut self, topic: &Arc<str>) {
        if let Some(refusal) = self.topics.get(topic).and_then(|e| e.refusal) {
            info!(%topic, refused_for_secs = refusal.since.elapsed().as_secs(),
                "Kafka accepts a topic it refused; what was kept for it is delivered.");
            self.topics.set_refusal(topic, None);
            self.parked.set_refused(topic, false);
            self.publish_refused();
        }
        if self
            .topics
            .get(topic)
            .is_some_and(|e| e.lookup == Lookup::Ready)
        {
            self.release_all(topic);
        }
    }

    /// Everything kept for `topic` goes to its batches: what waits in
    /// memory at once, in order, and what its parked area holds, read back.
    fn release_all(&mut self, topic: &Arc<str>) {
        let waiting = self.parked.take(topic);
        if !waiting.is_empty() {
            let mut out = Vec::new();
            for (record, lease) in waiting {
                self.add_record(record, lease, &mut out);
            }
            self.outbox.extend(out);
        }
        if self.disk_parked.contains(topic) && !self.releasing.contains(topic) {
            self.releasing.push_back(topic.clone());
        }
    }

    /// Reads back one window of a released topic's parked records, when
    /// the budget has room for it; true when it read something.
    fn release_parked(&mut self) -> bool {
        let Some(spool) = self.buffer.spool().cloned() else {
            self.releasing.clear();
            return false;
        };
        while let Some(topic) = self.releasing.front().cloned() {
            if self.gate(&topic) != Gate::Open {
                // Refused again: it stays parked.
                self.releasing.pop_front();
                continue;
            }
            let window = spool.settings().read_window();
            let ask = (2 * window).min(self.buffer.capacity().max(window));
            let Some(lease) = self.buffer.budget().try_acquire(ask) else {
                return false;
            };
            match spool.release(&topic, lease) {
                Some((read, mut lease)) => {
                    let total = read.items.iter().map(|r| r.share as usize).sum();
                    self.batch(crate::buffer::Chunk {
                        items: read.items,
                        heap: read.heap,
                        lease: lease.split(total),
                    });
                    if self.topics.get(&topic).is_some_and(|e| e.refusal.is_some()) {
                        // A probe: the rest once it is delivered.
                        self.releasing.pop_front();
                    }
                    return true;
                }
                None => {
                    self.releasing.pop_front();
                }
            }
        }
        false
    }

    /// The refused topics, for `/health` and `/metrics`.
    fn publish_refused(&self) {
        let parked_disk: std::collections::HashMap<Arc<str>, Counts> = self
            .buffer
            .spool()
            .map(|spool| spool.parked_topics().into_iter().collect())
            .unwrap_or_default();
        let refused: Vec<RefusedTopic> = self
            .topics
            .refused()
            .map(|(topic, refusal)| {
                let memory = self.parked.counts(topic);
                let disk = parked_disk.get(topic).copied().unwrap_or_default();
                RefusedTopic {
                    topic: topic.to_string(),
                    error: refusal.error.to_string(),
                    since: refusal.since,
                    kept: Counts {
                        records: memory.records + disk.records,
                        datapoints: memory.datapoints + disk.datapoints,
                    },
                }
            })
            .collect();
        let (waiting, refused_bytes) = self.parked.bytes();
        let disk_bytes = self.buffer.spool().map_or(0, |s| s.parked_bytes());
        self.stats
            .kafka_topics_refused_now
            .store(refused.len() as i64, Relaxed);
        self.stats.parked_bytes.store(
            (waiting + refused_bytes) as i64 + disk_bytes as i64,
            Relaxed,
        );
        self.set_state(|s| s.refused_topics = refused);
    }

    /// Whether anything needs the housekeeping each second: a disk spool
    /// (its parked topics), producers flushing, records parked or being
    /// released, a refused topic (or one `/health` still shows, so that it
    /// is told it cleared). Asked at every turn of the sink's loop, so it
    /// looks at counts only, never at every topic: a refusal is published
    /// at once while fewer than 100 are (`topic_refused`), so the count
    /// `/health` shows is never 0 while a topic is refused.
    fn housekeeping_due_often(&self) -> bool {
        self.buffer.spool().is_some()
            || !self.retiring.is_empty()
            || !self.releasing.is_empty()
            || !self.disk_parked.is_empty()
            || self.parked.bytes() != (0, 0)
            || self.stats.kafka_topics_refused_now.load(Relaxed) > 0
    }

    /// Tidies up ([`HOUSEKEEPING`], or [`HOUSEKEEPING_CALM`]): forgets idle
    /// topics, emptied parked spools and producers done flushing;
    /// refreshes what `/health` shows.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let parked = &self.parked;
        let disk_parked = &self.disk_parked;
        let releasing = &self.releasing;
        self.topics.forget_idle(now, |topic| {
            parked.counts(topic).records > 0
                || disk_parked.contains(topic)
                || releasing.iter().any(|t| &**t == topic)
        });
        if let Some(spool) = self.buffer.spool().cloned() {
            let held: HashSet<Arc<str>> = spool
                .parked_topics()
                .into_iter()
                .filter(|(_, counts)| counts.records > 0)
                .map(|(topic, _)| topic)
                .collect();
            // A topic that can be written and holds nothing more parked
            // loses its parked spool once every record in it has an outcome.
            for topic in spool.parked_topics().into_iter().map(|(t, _)| t) {
                if !held.contains(&topic)
                    && !self.releasing.contains(&topic)
                    && self
                        .topics
                        .get(&topic)
                        .is_some_and(|e| e.lookup == Lookup::Ready)
                {
                    spool.forget_parked(&topic);
                }
            }
            for topic in &held {
                if !self.disk_parked.contains(topic) {
                    self.disk_parked.insert(topic.clone());
                }
            }
            self.disk_parked.retain(|topic| held.contains(topic));
        }
        let (done, flushing): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|p| p.in_flight_count() == 0);
        self.retiring = flushing;
        if !done.is_empty() {
            // A producer's drop purges and flushes: off the runtime's threads.
            tokio::task::spawn_blocking(move || drop(done));
        }
        self.publish_refused();
    }

    /// Takes a message librdkafka handed back: produced again (`first`:
    /// before what is queued), or its records parked when its topic is
    /// refused.
    fn returned(&mut self, returned: Returned, first: bool) {
        match returned {
            Returned::Retry(message) if first => self.outbox.push_front(message),
            Returned::Retry(message) => self.outbox.push_back(message),
            Returned::Refused(message, code) => {
                let topic = message.topic.clone();
                self.topic_refused(&topic, code);
                self.hold_back(message, Some(code));
            }
        }
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
        let mut housekept = Instant::now();
        // What an earlier run parked on disk is looked up first.
        if let Some(spool) = self.buffer.spool() {
            self.disk_parked = spool
                .parked_topics()
                .into_iter()
                .filter(|(_, counts)| counts.records > 0)
                .map(|(topic, _)| topic)
                .collect();
        }
        loop {
            // Shutdown: the grace ends at its deadline, even while Kafka
            // takes nothing (no producer, brokers down, a full outbox).
            if deadline.is_none() && self.buffer.is_closed() {
                deadline = Some(self.stop_delivering_at());
            }
            while let Ok(returned) = self.retry_rx.try_recv() {
                self.returned(returned, true);
            }
            self.remake_when_allowed();
            if input_done && !self.batcher.is_empty() {
                // Once input has stopped, what a topic's lookup released
                // into its batch since goes at once, not at its period.
                let mut out = Vec::new();
                self.batcher.flush_all(&mut out);
                self.outbox.extend(out);
            }
            let flowing = self.producer.is_some() && self.produce_outbox();
            if flowing && !input_done && !self.releasing.is_empty() && self.release_parked() {
                tokio::task::consume_budget().await;
                continue;
            }
            // Done once input is, with nothing left here: delivered to
            // librdkafka, or nothing to deliver at all (no producer was
            // ever made, and nothing came in). Records of refused topics
            // are not waited for.
            if input_done
                && (flowing || self.producer.is_none())
                && self.outbox.is_empty()
                && self.parked.bytes().0 == 0
            {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let batch_deadline = self.batcher.next_deadline();
            let topic_retry = self.next_topic_retry();
            let remake_at = self.remake_at();
            let wait_for_room = !self.outbox.is_empty() || self.parked.waiting_full();
            let housekeeping_at = housekept
                + if self.housekeeping_due_often() {
                    HOUSEKEEPING
                } else {
                    HOUSEKEEPING_CALM
                };
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
                Some(returned) = self.retry_rx.recv() => self.returned(returned, false),
                Some(result) = self.topic_rx.recv() => self.topic_known(result),
                Some(topic) = self.confirmed_rx.recv() => self.topic_confirmed(&topic),
                Some(result) = found.recv() => self.apply_discovery(result),
                _ = tokio::time::sleep_until(topic_retry.unwrap_or_else(Instant::now)), if topic_retry.is_some() => {
                    self.retry_topics();
                }
                _ = tokio::time::sleep_until(remake_at.unwrap_or_else(Instant::now)), if remake_at.is_some() => {}
                _ = tokio::time::sleep_until(housekeeping_at) => {
                    self.housekeeping();
                    housekept = Instant::now();
                }
                _ = self.room.notified(), if wait_for_room || !self.releasing.is_empty() => {}
                _ = self.failure_reported.notified() => probe_armed = true,
                _ = tokio::time::sleep_until(next_probe), if probe_armed && self.producer.is_some() => {
                    if self.security_failure_reported() {
                        self.probe_brokers();
                        next_probe = Instant::now() + SECURITY_PROBE_PERIOD;
                    } else {
                        probe_armed = false;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)), if wait_for_room || !self.releasing.is_empty() => {}
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
                        self.remake.get_or_insert(None);
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
        while let Ok(returned) = self.retry_rx.try_recv() {
            self.outbox.push_back(match returned {
                Returned::Retry(message) | Returned::Refused(message, _) => message,
            });
        }
        let mut out = Vec::new();
        self.batcher.flush_all(&mut out);
        self.outbox.extend(out);
        // Records waiting for their topic: those from the disk spool stay
        // there (spooled), the others are counted as dropped for shutdown.
        for (record, _) in self.parked.take_all() {
            let spooled = if record.seq != 0 {
                Counts {
                    records: 1,
                    datapoints: u64::from(record.datapoints),
                }
            } else {
                Counts::default()
            };
            self.stats.count_left_at_shutdown(
                Counts {
                    records: 1,
                    datapoints: u64::from(record.datapoints),
                },
                spooled,
            );
        }
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
