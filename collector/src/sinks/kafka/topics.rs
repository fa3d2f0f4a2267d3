//! Topics: known to exist, looked up (and created where the brokers do not
//! auto-create), refused by the brokers, or forgotten once idle.
//!
//! - Lookups run a few at a time ([`LOOKUP_CONCURRENCY`], each on a
//!   blocking thread for at most a few seconds), from a queue of at most
//!   [`LOOKUP_QUEUE`] topics: a sender inventing topics gets its lookups in
//!   turn, a topic that finds the queue full is deferred and counted (its
//!   waiting records, not the cache, remember it), and a topic known
//!   before flows on meanwhile. Topics are created through
//!   one admin client per producer, made when first needed.
//! - A topic the brokers refuse (`TOPIC_AUTHORIZATION_FAILED`: an ACL) is
//!   looked up again every 5 s, backing off to 30 s; its records wait
//!   apart meanwhile (see `parked`), and go once it can be written.
//! - The cache is bounded ([`TopicCache::CAPACITY`]): topics unused for
//!   [`IDLE`] are forgotten, and when it is full the least recently used
//!   tenth goes, never one being looked up. A refused topic can go then
//!   too (brokers that deny every topic must not grow the cache with an
//!   inventing sender); its records stay parked, `/health` stops naming it
//!   until its next lookup finds it refused again, and that refusal is
//!   counted anew.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::KafkaSink;
use super::SinkProducer;

/// Lookups running at once (each holds a blocking thread while it waits).
pub(super) const LOOKUP_CONCURRENCY: usize = 4;
/// Topics waiting for a lookup, at most; more are deferred, and counted.
pub(super) const LOOKUP_QUEUE: usize = 4096;
/// A topic unused this long is forgotten (looked up again if it comes back).
pub(super) const IDLE: Duration = Duration::from_secs(600);
/// How often a refused topic is asked after again: from this, doubling...
const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// ...to this.
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(30);

/// The admin client topics are created with: one per producer, made the
/// first time a topic must be created.
pub(super) type AdminCell = OnceLock<Result<AdminClient<DefaultClientContext>, String>>;

/// Creates `topic` through the admin API; an existing topic is success.
pub async fn create_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| e.to_string())?;
    create_with(&admin, topic, partitions, replication)
        .await
        .map_err(|e| e.to_string())
}

/// What creating a topic can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum CreateError {
    /// The brokers answered with this error.
    #[error("{0}")]
    Refused(RDKafkaErrorCode),
    /// No answer, or the client failed.
    #[error("{0}")]
    Failed(String),
}

async fn create_with(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), CreateError> {
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match admin
        .create_topics(&[new_topic], &options)
        .await
        .map_err(|e| CreateError::Failed(e.to_string()))?
        .into_iter()
        .next()
    {
        Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
        Some(Err((_, code))) => Err(CreateError::Refused(code)),
        None => Err(CreateError::Failed("no result".into())),
    }
}

/// Errors that say the brokers refuse the topic to this client: its
/// records wait apart until it can be written.
pub(super) fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::TopicAuthorizationFailed)
}

/// Errors of a topic's creation that may pass by themselves.
fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::RequestTimedOut
            | C::NotController
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NetworkException
            | C::NotEnoughReplicas
            | C::CoordinatorNotAvailable
            | C::OperationTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Unknown
    )
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The topic exists and can be written.
    Ready,
    /// The brokers refuse it.
    Refused(RDKafkaErrorCode),
    /// No answer, or an error that may pass: again after this.
    Retry(Duration),
}

/// Looks `topic` up on the brokers and creates it where it does not exist
/// (tansu and many production clusters do not auto-create). Never longer
/// than half a minute: a broker that does not answer means trying again.
pub(super) async fn look_up_topic(
    producer: Arc<SinkProducer>,
    admin: (Arc<AdminCell>, ClientConfig),
    topic: Arc<str>,
    partitions: i32,
    replication: i32,
) -> Outcome {
    let name = topic.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&name), Duration::from_secs(5))
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == &*name)
                    .map(|t| (t.error().map(RDKafkaErrorCode::from), t.partitions().len()))
            })
    })
    .await;
    match lookup {
        Ok(Ok(Some((None, partitions)))) if partitions > 0 => return Outcome::Ready,
        Ok(Ok(Some((Some(code), _)))) if is_refusal(code) => return Outcome::Refused(code),
        Ok(Ok(Some((None | Some(RDKafkaErrorCode::UnknownTopicOrPartition), _)) | None)) => {}
        Ok(Ok(Some((Some(code), _)))) => {
            crate::telemetry::throttled_warn("kafka topic metadata", |repeats| {
                warn!(%topic, error = %code, repeats, "Kafka metadata for a topic has an error; will look again.");
            });
            return Outcome::Retry(Duration::from_secs(2));
        }
        Ok(Err(error)) => {
            crate::telemetry::throttled_warn("kafka metadata", |repeats| {
                warn!(%topic, %error, repeats, "Could not read Kafka metadata for a topic; will retry.");
            });
            return Outcome::Retry(Duration::from_secs(2));
        }
        Err(_) => return Outcome::Retry(Duration::from_secs(2)),
    }
    let (cell, config) = admin;
    let admin = match cell.get_or_init(|| config.create().map_err(|e| e.to_string())) {
        Ok(admin) => admin,
        Err(error) => {
            error!(%topic, %error, "Could not make the Kafka admin client to create a topic; will retry.");
            return Outcome::Retry(Duration::from_secs(5));
        }
    };
    let create = create_with(admin, &topic, partitions, replication);
    match tokio::time::timeout(Duration::from_secs(20), create).await {
        Ok(Ok(())) => {
            info!(%topic, partitions, replication, "Created Kafka topic.");
            Outcome::Ready
        }
        // The brokers answered no: the topic can't be written until an
        // operator acts (an ACL, a creation policy, a bad replication
        // factor). Its records are kept apart meanwhile, as for a refused
        // topic, rather than pin the spool.
        Ok(Err(CreateError::Refused(code))) if !is_transient(code) => {
            crate::telemetry::throttled_warn("kafka topic create", |repeats| {
                error!(%topic, error = %code, repeats, "Kafka topic does not exist and the brokers refuse to create it; its records are kept apart and creation retried.");
            });
            Outcome::Refused(code)
        }
        Ok(Err(error)) => {
            crate::telemetry::throttled_warn("kafka topic create", |repeats| {
                error!(%topic, %error, repeats, "Kafka topic does not exist and could not be created; its data is held and creation retried.");
            });
            Outcome::Retry(Duration::from_secs(5))
        }
        Err(_) => {
            warn!(%topic, "No answer to creating a Kafka topic within 20 s; will retry.");
            Outcome::Retry(Duration::from_secs(5))
        }
    }
}

/// Where a topic's lookup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// It exists and can be written.
    Ready,
    /// Waiting for a lookup slot.
    Queued,
    /// A lookup is running.
    Pending,
    /// To look up (again) from then on.
    RetryAt(Instant),
}

/// The brokers refuse a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    /// Their error.
    pub(super) error: RDKafkaErrorCode,
    /// Since when.
    pub(super) since: std::time::Instant,
    /// Lookups that found it refused in a row.
    pub(super) attempts: u32,
}

impl Refusal {
    /// When to ask again.
    pub(super) fn retry_after(&self) -> Duration {
        REFUSED_RETRY
            .saturating_mul(1 << self.attempts.saturating_sub(1).min(8))
            .min(REFUSED_RETRY_MAX)
    }
}

/// What the sink knows of a topic.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) lookup: Lookup,
    pub(super) refusal: Option<Refusal>,
    used: Instant,
}

/// Whether a topic's records can go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// Batched and produced.
    Open,
    /// Wait in memory for its lookup.
    Wait,
    /// Wait apart: the brokers refuse it.
    Refused,
}

/// Topics the sink has seen. Bounded, so that a sender inventing topics
/// can't grow it forever.
#[derive(Debug, Default)]
pub(super) struct TopicCache {
    map: HashMap<Arc<str>, Entry>,
    /// The earliest time a topic is to be looked up again.
    next_retry: Option<Instant>,
}

impl TopicCache {
    pub(super) const CAPACITY: usize = 10_000;

    pub(super) fn get(&self, topic: &str) -> Option<Entry> {
        self.map.get(topic).copied()
    }

    /// Sets `topic`'s lookup state (its refusal stays).
    pub(super) fn set(&mut self, topic: &Arc<str>, lookup: Lookup) {
        let now = Instant::now();
        if !self.map.contains_key(topic) && self.map.len() >= Self::CAPACITY {
            self.evict();
        }
        let entry = self.map.entry(topic.clone()).or_insert(Entry {
            lookup,
            refusal: None,
            used: now,
        });
        entry.lookup = lookup;
        entry.used = now;
        if let Lookup::RetryAt(at) = lookup {
            self.retry_at(at);
        }
    }

    /// Notes that waiting topics are to be looked up again at `at`.
    pub(super) fn retry_at(&mut self, at: Instant) {
        self.next_retry = Some(self.next_retry.map_or(at, |next| next.min(at)));
    }

    /// Marks `topic` refused (or no longer, with `None`).
    pub(super) fn set_refusal(&mut self, topic: &Arc<str>, refusal: Option<Refusal>) {
        if let Some(entry) = self.map.get_mut(topic) {
            entry.refusal = refusal;
        }
    }

    /// Notes a use of a ready topic.
    pub(super) fn touch(&mut self, topic: &str, now: Instant) {
        if let Some(entry) = self.map.get_mut(topic) {
            entry.used = now;
        }
    }

    /// Forgets the least recently used tenth of what can be forgotten.
    fn evict(&mut self) {
        let mut idle: Vec<(Instant, Arc<str>)> = self
            .map
            .iter()
            .filter(|(_, e)| Self::forgettable(e))
            .map(|(t, e)| (e.used, t.clone()))
            .collect();
        idle.sort_unstable_by_key(|(used, _)| *used);
        for (_, topic) in idle.into_iter().take(Self::CAPACITY / 10) {
            self.map.remove(&topic);
        }
    }

    /// Not being looked up: its entry can go (a refused topic with
    /// records waiting is kept by `forget_idle`'s caller, and when the
    /// cache is full one is looked up again if it comes back).
    fn forgettable(entry: &Entry) -> bool {
        matches!(entry.lookup, Lookup::Ready | Lookup::RetryAt(_))
    }

    /// Forgets the topics not used for [`IDLE`], but those `keep` names
    /// (they have records waiting).
    pub(super) fn forget_idle(&mut self, now: Instant, keep: impl Fn(&str) -> bool) {
        self.map.retain(|topic, entry| {
            !Self::forgettable(entry) || now.duration_since(entry.used) < IDLE || keep(topic)
        });
    }

    /// After a producer switch: lookups under way are made again (their
    /// results, for the producer before, are not taken); with new brokers
    /// everything is looked up again. What is known to be refused stays so
    /// until then.
    pub(super) fn reset(&mut self, same_brokers: bool) {
        let now = Instant::now();
        if !same_brokers {
            self.map.retain(|_, entry| entry.refusal.is_some());
        }
        for entry in self.map.values_mut() {
            if !same_brokers || matches!(entry.lookup, Lookup::Queued | Lookup::Pending) {
                entry.lookup = Lookup::RetryAt(now);
                self.next_retry = Some(now);
            }
        }
    }

    /// The refused topics.
    pub(super) fn refused(&self) -> impl Iterator<Item = (&Arc<str>, &Refusal)> {
        self.map
            .iter()
            .filter_map(|(t, e)| e.refusal.as_ref().map(|r| (t, r)))
    }

    /// Topics known.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

impl KafkaSink {
    /// Whether `topic`'s records can go now; when it is not known, or its
    /// next lookup is due, a lookup is queued. Every other topic goes on
    /// meanwhile.
    pub(super) fn gate(&mut self, topic: &Arc<str>) -> Gate {
        let now = Instant::now();
        match self.topics.get(topic) {
            Some(Entry {
                lookup: Lookup::Ready,
                ..
            }) => {
                self.topics.touch(topic, now);
                Gate::Open
            }
            Some(entry) => {
                if matches!(entry.lookup, Lookup::RetryAt(at) if now >= at) {
                    self.queue_lookup(topic);
                }
                if entry.refusal.is_some() {
                    Gate::Refused
                } else {
                    Gate::Wait
                }
            }
            None => {
                self.queue_lookup(topic);
                Gate::Wait
            }
        }
    }

    /// Queues a lookup of `topic` (deferred, counted, when the queue is
    /// full), and starts what the concurrency allows.
    fn queue_lookup(&mut self, topic: &Arc<str>) {
        if self.producer.is_none() {
            // Looked up once a producer is made (see `switch_producer`).
            self.defer_lookup(topic);
            return;
        }
        if self.lookups.len() >= LOOKUP_QUEUE {
            // Its first lookup: no records of it wait yet.
            if self.topics.get(topic).is_none()
                && !self.parked.contains(topic)
                && !self.disk_parked.contains(topic)
            {
                self.stats.topic_lookups_deferred.fetch_add(1, Relaxed);
            }
            crate::telemetry::throttled_warn("topic_lookups_deferred", |repeats| {
                warn!(%topic, repeats, queued = LOOKUP_QUEUE,
                    "Too many Kafka topics waiting for a lookup; this one is looked up later.");
            });
            self.defer_lookup(topic);
            return;
        }
        self.topics.set(topic, Lookup::Queued);
        self.lookups.push_back(topic.clone());
        self.start_lookups();
    }

    /// Puts `topic`'s lookup off by a second. A topic the cache knows keeps
    /// its entry; one it does not know gets none, since the records waiting
    /// for it name it and `retry_topics` asks for it again: a flood of
    /// invented topics can't fill the cache and push out a topic known
    /// before it, whose records would then wait behind the flood's lookups.
    fn defer_lookup(&mut self, topic: &Arc<str>) {
        let at = Instant::now() + Duration::from_secs(1);
        if self.topics.get(topic).is_some() {
            self.topics.set(topic, Lookup::RetryAt(at));
        } else {
            self.topics.retry_at(at);
        }
    }

    /// Starts queued lookups while fewer than [`LOOKUP_CONCURRENCY`] run.
    pub(super) fn start_lookups(&mut self) {
        let (Some((producer, _)), Some(admin)) = (&self.producer, &self.admin) else {
            return;
        };
        while self.lookups_running < LOOKUP_CONCURRENCY {
            let Some(topic) = self.lookups.pop_front() else {
                return;
            };
            if !matches!(
                self.topics.get(&topic),
                Some(Entry {
                    lookup: Lookup::Queued,
                    ..
                })
            ) {
                continue;
            }
            self.topics.set(&topic, Lookup::Pending);
            self.lookups_running += 1;
            let producer = producer.clone();
            let admin = (self.admin_cell.clone(), admin.clone());
            let (partitions, replication) = (
                self.settings.topic_partitions,
                self.settings.topic_replication,
            );
            let generation = self.generation.load(Relaxed);
            let results = self.topic_tx.clone();
            tokio::spawn(async move {
                let outcome =
                    look_up_topic(producer, admin, topic.clone(), partitions, replication).await;
                let _ = results.send((generation, topic, outcome));
            });
        }
    }

    /// Takes in a lookup's outcome: a topic ready releases its waiting
    /// records; a refused one keeps them apart.
    pub(super) fn topic_known(&mut self, (generation, topic, outcome): TopicResult) {
        self.lookups_running = self.lookups_running.saturating_sub(1);
        if generation == self.generation.load(Relaxed) {
            match outcome {
                Outcome::Ready => {
                    // A broker answered: connected and authenticated.
                    self.set_state(|s| s.security_failure = None);
                    self.topic_ready(&topic);
                }
                Outcome::Refused(code) => self.topic_refused(&topic, code),
                Outcome::Retry(after) => {
                    self.topics
                        .set(&topic, Lookup::RetryAt(Instant::now() + after));
                }
            }
        }
        self.start_lookups();
    }

    /// The next time a topic may be looked up again (its records wait).
    pub(super) fn next_topic_retry(&self) -> Option<Instant> {
        self.topics.next_retry
    }

    /// Topics with records waiting, in memory or parked on disk.
    fn waiting_topics(&self) -> impl Iterator<Item = &Arc<str>> {
        self.parked.topics().chain(self.disk_parked.iter())
    }

    /// Looks up again the topics with records waiting whose time has come;
    /// notes when the next one's comes.
    pub(super) fn retry_topics(&mut self) {
        self.topics.next_retry = None;
        let now = Instant::now();
        let waiting: Vec<Arc<str>> = self.waiting_topics().cloned().collect();
        for topic in waiting {
            match self.topics.get(&topic).map(|e| e.lookup) {
                Some(Lookup::RetryAt(at)) if at > now => self.topics.retry_at(at),
                _ => {
                    if self.gate(&topic) == Gate::Open {
                        self.topic_ready(&topic);
                    }
                }
            }
        }
    }
}

/// The outcome of a topic lookup: the producer generation it was made
/// with, the topic, and what was found.
pub(super) type TopicResult = (u64, Arc<str>, Outcome);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_cache_is_bounded_and_forgets_the_least_used_not_everything() {
        let mut cache = TopicCache::default();
        for i in 0..TopicCache::CAPACITY {
            cache.set(&Arc::from(format!("t{i}")), Lookup::Ready);
        }
        // Being looked up (here, one of them refused before): never
        // forgotten.
        cache.set(&Arc::from("t0"), Lookup::Pending);
        cache.set(&Arc::from("t1"), Lookup::Queued);
        cache.set_refusal(
            &Arc::from("t1"),
            Some(Refusal {
                error: RDKafkaErrorCode::TopicAuthorizationFailed,
                since: std::time::Instant::now(),
                attempts: 1,
            }),
        );
        cache.set(&Arc::from("new"), Lookup::Ready);
        assert_eq!(
            cache.len(),
            TopicCache::CAPACITY - TopicCache::CAPACITY / 10 + 1
        );
        assert!(cache.get("t0").is_some() && cache.get("t1").is_some());
        assert!(cache.get("new").is_some());
        // Idle ones go, but for those with records waiting.
        let later = Instant::now() + IDLE + Duration::from_secs(1);
        cache.forget_idle(later, |t| t == "new");
        assert_eq!(cache.len(), 3, "t0, t1 and new stay");
        // A producer made anew for the same brokers: what is ready stays,
        // lookups under way are made again.
        cache.reset(true);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("new").unwrap().lookup, Lookup::Ready);
        assert!(matches!(
            cache.get("t0").unwrap().lookup,
            Lookup::RetryAt(_)
        ));
        // New brokers: refusals stay, to be looked up again.
        cache.reset(false);
        assert_eq!(cache.len(), 1);
        assert!(matches!(
            cache.get("t1").unwrap().lookup,
            Lookup::RetryAt(_)
        ));
    }

    #[test]
    fn a_refused_topic_is_asked_again_every_5_s_backing_off_to_30() {
        let refusal = |attempts| Refusal {
            error: RDKafkaErrorCode::TopicAuthorizationFailed,
            since: std::time::Instant::now(),
            attempts,
        };
        assert_eq!(refusal(1).retry_after(), Duration::from_secs(5));
        assert_eq!(refusal(2).retry_after(), Duration::from_secs(10));
        assert_eq!(refusal(40).retry_after(), Duration::from_secs(30));
    }
}
