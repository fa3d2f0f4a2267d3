//! Delivery: what each message carries through librdkafka, and what its
//! delivery report decides (delivered, produced again after a backoff, or
//! dropped for good), plus librdkafka's logs and errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::super::batch::Message;
use super::{BrokerState, SecurityFailureState};
use crate::config::security::{KafkaSecurity, SecurityFailure};
use crate::memory::{Budget, allocated_size};
use crate::route::Spooled;
use crate::spool::Spool;
use crate::stats::{Counts, DropReason, Stats};

/// Per-message bookkeeping carried through librdkafka.
pub(super) struct Meta {
    pub(super) topic: Arc<str>,
    pub(super) key: Option<Arc<str>>,
    pub(super) records: u32,
    pub(super) datapoints: u64,
    pub(super) created: Instant,
    pub(super) attempts: u32,
    /// Its records read from the disk spool.
    pub(super) spooled: Spooled,
}

impl Meta {
    fn counts(&self) -> Counts {
        Counts {
            records: u64::from(self.records),
            datapoints: self.datapoints,
        }
    }
}

pub(super) struct Context {
    pub(super) stats: Arc<Stats>,
    /// Held weakly: a producer being destroyed after shutdown (see
    /// [`KafkaProducer`](super::KafkaProducer)) keeps neither the
    /// partner hub nor the spool (and its lock).
    pub(super) partners: Option<Weak<crate::sinks::partner::PartnerHub>>,
    /// Where messages to produce again, and messages of a topic the
    /// brokers refuse, go. Not bounded by count: only messages librdkafka
    /// held come back, so it never holds more than librdkafka's queue did;
    /// their bytes are counted (`kafka_retry_bytes`, see
    /// [`retry_budget`](KafkaSink::retry_budget)).
    pub(super) retry: mpsc::UnboundedSender<Returned>,
    pub(super) retry_budget: Arc<Budget>,
    pub(super) room: Arc<Notify>,
    pub(super) brokers_down: Arc<Notify>,
    pub(super) state: Arc<Mutex<BrokerState>>,
    /// This producer's number, and the number of the producer in use: only
    /// the producer in use speaks for the broker state (`/health`, gauges).
    pub(super) generation: u64,
    pub(super) current: Arc<AtomicU64>,
    /// Set when librdkafka reports every broker of this producer down.
    pub(super) all_down: AtomicBool,
    /// Set at the end of shutdown: purged messages are then counted as
    /// dropped instead of being retried.
    pub(super) final_purge: AtomicBool,
    /// Set when shutdown has taken the final count while this producer's
    /// event thread was still running (it did not stop within the reserve):
    /// a report it serves afterwards is not counted a second time.
    pub(super) counted: AtomicBool,
    /// The disk spool, told each final outcome.
    pub(super) spool: Option<Weak<Spool>>,
    /// Whether this producer speaks TLS.
    pub(super) tls: bool,
    /// Its brokers and security settings, for the TLS diagnosis.
    pub(super) brokers: Vec<String>,
    pub(super) security: KafkaSecurity,
    /// Set once the TLS diagnosis has been started.
    pub(super) diagnosed: AtomicBool,
    /// Wakes the sink when a security failure is reported, so that it
    /// starts asking the brokers whether it has cleared.
    pub(super) failure_reported: Arc<Notify>,
    /// Refused topics waiting for a delivery, and where to say one came.
    pub(super) probing: Arc<Probing>,
    pub(super) confirmed: mpsc::UnboundedSender<Arc<str>>,
}

impl Context {
    pub(super) fn is_current(&self) -> bool {
        self.current.load(Relaxed) == self.generation
    }
}

/// Refused topics whose metadata answers again: the first delivery to one
/// says it can be written (the sink then releases what was kept for it).
#[derive(Debug, Default)]
pub(super) struct Probing {
    /// Whether any topic is probed: one load per delivery report, no lock,
    /// when none is.
    any: AtomicBool,
    topics: Mutex<std::collections::HashSet<Arc<str>>>,
}

impl Probing {
    pub(super) fn begin(&self, topic: &Arc<str>) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.insert(topic.clone());
        self.any.store(true, Relaxed);
    }

    pub(super) fn end(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.remove(topic);
        self.any.store(!topics.is_empty(), Relaxed);
    }

    /// Whether `topic` was probed (it is no more).
    fn delivered(&self, topic: &str) -> bool {
        if !self.any.load(Relaxed) {
            return false;
        }
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let was = topics.remove(topic);
        self.any.store(!topics.is_empty(), Relaxed);
        was
    }
}

/// A message librdkafka handed back to the sink.
#[derive(Debug)]
pub(super) enum Returned {
    /// To produce again (after its backoff).
    Retry(Message),
    /// Its topic is refused by the brokers: its records wait apart until it
    /// can be written.
    Refused(Message, RDKafkaErrorCode),
}

impl Returned {
    fn message(self) -> Message {
        match self {
            Returned::Retry(message) | Returned::Refused(message, _) => message,
        }
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
pub(super) const MAX_ATTEMPTS: u32 = 50;

pub(super) fn retry_backoff(attempts: u32) -> Duration {
    Duration::from_millis(100)
        .saturating_mul(1 << attempts.min(6))
        .min(Duration::from_secs(5))
}

impl Context {
    /// Finds out, once per producer and off librdkafka's threads, why the
    /// TLS handshake fails: librdkafka says only "certificate verify
    /// failed"; OpenSSL, connecting with the same settings, says whether
    /// the certificate expired, names another host, or chains to no CA in
    /// the CA file. `/health` shows it.
    fn diagnose_tls(&self) {
        let Some(broker) = self.brokers.first().cloned() else {
            return;
        };
        let (security, state) = (self.security.clone(), self.state.clone());
        let (generation, current) = (self.generation, self.current.clone());
        let spawned = std::thread::Builder::new()
            .name("tls-diagnosis".into())
            .spawn(move || {
                let Some(diagnosis) = security.diagnose_tls(&broker) else {
                    return;
                };
                if current.load(Relaxed) != generation {
                    return;
                }
                warn!(%broker, %diagnosis, "Kafka TLS: why the broker's certificate is refused.");
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(failure) = &mut state.security_failure
                    && failure.kind == SecurityFailure::Tls
                {
                    failure.diagnosis = Some(diagnosis);
                }
            });
        if let Err(error) = spawned {
            debug!(%error, "No thread for the TLS diagnosis.");
        }
    }

    /// A TLS or authentication failure: counted, named at once in
    /// `/health`, logged (at most once per throttle interval).
    fn security_failure(
        &self,
        failure: SecurityFailure,
        error: &dyn std::fmt::Display,
        reason: &str,
    ) {
        let counter = match failure {
            SecurityFailure::Authentication => &self.stats.kafka_authentication_failures,
            SecurityFailure::Tls | SecurityFailure::ProtocolMismatch => {
                &self.stats.kafka_tls_failures
            }
        };
        counter.fetch_add(1, Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let diagnosis = state
            .security_failure
            .take()
            .filter(|known| known.kind == failure)
            .and_then(|known| known.diagnosis);
        state.security_failure = Some(SecurityFailureState {
            kind: failure,
            reason: reason.to_owned(),
            diagnosis,
        });
        state
            .unavailable_since
            .get_or_insert_with(std::time::Instant::now);
        drop(state);
        self.failure_reported.notify_one();
        if failure == SecurityFailure::Tls && !self.diagnosed.swap(true, Relaxed) {
            self.diagnose_tls();
        }
        crate::telemetry::throttled_warn("kafka_security_failure", |repeats| {
            error!(%error, reason, repeats, "{}: check the Kafka security settings (kafka_security_protocol, kafka_ssl_*, kafka_sasl_*). Nothing is delivered until it is mended; data is buffered.", failure.describe());
        });
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if fac == "FAIL" {
            // A connection failed: librdkafka retries at once and says so
            // each time, up to 20 times a second; one line per throttle
            // interval, with the count, says as much.
            // Some failures come only this way: a TLS handshake that timed
            // out ("in state SSL_HANDSHAKE"), and a broker that hangs up on
            // the first request, which is a TLS listener talked to in
            // plaintext (a TLS client at a plaintext port fails its
            // handshake instead).
            let failure = if !self.tls
                && message.contains("Disconnected")
                && message.contains("APIVERSION_QUERY")
            {
                Some(SecurityFailure::ProtocolMismatch)
            } else {
                SecurityFailure::of(None, message)
            };
            if let Some(failure) = failure
                && self.is_current()
            {
                self.security_failure(failure, &"connection failed", message);
            }
            crate::telemetry::throttled_warn("librdkafka_connection_failed", |repeats| {
                warn!(target: "librdkafka", facility = fac, repeats, "{message}");
            });
            return;
        }
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
        if let Some(failure) = SecurityFailure::of(error.rdkafka_error_code(), reason) {
            self.security_failure(failure, &error, reason);
            if !all_down {
                return;
            }
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
        if self.counted.load(Relaxed) {
            return;
        }
        self.stats
            .kafka_in_flight
            .sub(u64::from(meta.records), meta.datapoints);
        let spooled = meta.spooled.counts();
        self.stats
            .kafka_in_flight_spooled
            .sub(spooled.records, spooled.datapoints);
        let done = |meta: &Meta| {
            if let Some(spool) = self.spool.as_ref().and_then(Weak::upgrade) {
                spool.ack(&meta.topic, &meta.spooled.seqs);
            }
        };
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
                if let Some(partners) = self.partners.as_ref().and_then(Weak::upgrade) {
                    partners.publish(&meta.topic, message.payload().unwrap_or_default());
                }
                done(&meta);
                if self.probing.delivered(&meta.topic) {
                    let _ = self.confirmed.send(meta.topic.clone());
                }
                self.all_down.store(false, Relaxed);
                if self.is_current() {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.all_brokers_down = false;
                    state.unavailable_since = None;
                    state.security_failure = None;
                }
            }
            Err((error, message)) => {
                let code = error
                    .rdkafka_error_code()
                    .unwrap_or(RDKafkaErrorCode::Unknown);
                let size = message.payload_len();
                if self.final_purge.load(Relaxed) {
                    self.stats
                        .count_left_at_shutdown(meta.counts(), meta.spooled.counts());
                } else if super::topics::is_refusal(code) {
                    // Not this message's fault: its topic waits apart until
                    // the brokers let it be written.
                    let refused = retry_of(
                        *meta,
                        message.payload().unwrap_or_default(),
                        true,
                        &self.retry_budget,
                    );
                    self.hand_back(Returned::Refused(refused, code));
                } else if is_permanent(code) || meta.attempts + 1 >= MAX_ATTEMPTS {
                    self.stats.count_drop(
                        DropReason::KafkaRejected,
                        u64::from(meta.records),
                        meta.datapoints,
                    );
                    done(&meta);
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
                    self.hand_back(Returned::Retry(retry));
                }
            }
        }
        self.room.notify_one();
    }
}

impl Context {
    /// Hands a message back to the sink; after shutdown, when the sink is
    /// gone, it is counted instead.
    fn hand_back(&self, returned: Returned) {
        if let Err(mpsc::error::SendError(lost)) = self.retry.send(returned) {
            let lost = lost.message();
            self.stats.count_left_at_shutdown(
                Counts {
                    records: u64::from(lost.records),
                    datapoints: lost.datapoints,
                },
                lost.spooled.counts(),
            );
        }
    }
}

/// The message to produce again after a failure, its payload copied out
/// of librdkafka and counted in `retry_budget` (`kafka_retry_bytes`) until
/// it is produced again: only messages librdkafka held come back, so these
/// never hold more than its queue did. A purge (a broker switch moving the
/// queue) is not the message's failure: it goes again at once, without
/// counting an attempt.
pub(super) fn retry_of(
    meta: Meta,
    payload: &[u8],
    purged: bool,
    retry_budget: &Arc<Budget>,
) -> Message {
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
        spooled: meta.spooled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let budget = Budget::for_gauge(stats.clone(), crate::memory::Gauge::KafkaRetryBytes);
        let meta = || Meta {
            topic: "t".into(),
            key: None,
            records: 3,
            datapoints: 30,
            created: Instant::now(),
            attempts: 2,
            spooled: Spooled::default(),
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
