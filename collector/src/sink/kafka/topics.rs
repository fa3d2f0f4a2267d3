//! Topics: known to exist, or looked up (and created where the brokers do
//! not auto-create) in tasks of their own, so that a topic being created
//! holds up only its own messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
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
pub(super) async fn look_up_topic(
    producer: Arc<SinkProducer>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TopicState {
    Ready,
    /// A lookup (and creation, if need be) is running in a task of its own.
    Pending,
    RetryAt(Instant),
}

/// Messages waiting for their topics' lookups may hold a quarter of the
/// buffer; beyond, the sink stops taking from the buffer (whose full policy
/// then applies) until a topic is known.
pub(super) const PARKED_SHARE: usize = 4;

/// The outcome of a topic lookup: the producer generation it was made
/// with, the topic, and what is known of it now.
pub(super) type TopicResult = (u64, Arc<str>, TopicState);

/// Topics the sink has seen: known to exist, or to look up again at a time.
/// Bounded, so that a sender inventing topics can't grow it forever: when
/// it is full, it forgets everything, and each topic is looked up again.
#[derive(Debug, Default)]
pub(super) struct TopicCache {
    pub(super) map: HashMap<Arc<str>, TopicState>,
}

impl TopicCache {
    pub(super) const CAPACITY: usize = 10_000;

    pub(super) fn get(&self, topic: &str) -> Option<TopicState> {
        self.map.get(topic).copied()
    }

    pub(super) fn insert(&mut self, topic: Arc<str>, state: TopicState) {
        if self.map.len() >= Self::CAPACITY && !self.map.contains_key(&topic) {
            self.map.clear();
        }
        self.map.insert(topic, state);
    }

    pub(super) fn remove(&mut self, topic: &str) {
        self.map.remove(topic);
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
    }
}

impl KafkaSink {
    /// Whether `topic` is known to exist. When it is not known yet, a task
    /// looks it up (and creates it through the admin API where the broker
    /// does not auto-create) and reports back; meanwhile its messages wait,
    /// and every other topic goes on.
    pub(super) fn ensure_topic(&mut self, topic: &Arc<str>) -> bool {
        match self.topics.get(topic) {
            Some(TopicState::Ready) => return true,
            Some(TopicState::Pending) => return false,
            Some(TopicState::RetryAt(at)) if Instant::now() < at => return false,
            _ => {}
        }
        let (Some((producer, _)), Some(admin)) = (&self.producer, &self.admin) else {
            return false;
        };
        let producer = producer.clone();
        let admin = admin.clone();
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
    pub(super) fn topic_known(&mut self, (generation, topic, state): TopicResult) {
        if generation != self.generation.load(Relaxed) {
            return; // made with a producer since replaced
        }
        self.topics.insert(topic.clone(), state);
        if state == TopicState::Ready {
            // A broker answered: connected and authenticated.
            self.set_state(|s| s.security_failure = None);
        }
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
    pub(super) fn next_topic_retry(&self) -> Option<Instant> {
        self.parked
            .keys()
            .filter_map(|topic| match self.topics.get(topic) {
                Some(TopicState::RetryAt(at)) => Some(at),
                _ => None,
            })
            .min()
    }

    pub(super) fn retry_topics(&mut self) {
        let due: Vec<Arc<str>> = self.parked.keys().cloned().collect();
        for topic in due {
            if self.ensure_topic(&topic) {
                self.topic_known((self.generation.load(Relaxed), topic, TopicState::Ready));
            }
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
}
