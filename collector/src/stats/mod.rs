//! Every counter the collector keeps, named after the event it counts.
//!
//! The accounting identity, exact once the queues are drained and after
//! shutdown, in datapoints and in records alike:
//!
//! ```text
//! received + replayed = delivered + Σ dropped[reason] + spooled + in_flight
//! ```
//!
//! where `in_flight` is what sits in the buffer, in topic batches, or in the
//! producer's queue, and is 0 after shutdown. With the disk spool,
//! `replayed` is what an earlier run left in the spool, found at start, and
//! `spooled` what this run leaves there at exit, for the next one: across
//! restarts, one run's `spooled` is the next one's `replayed`, less what a
//! crash cut off after the last sync.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub mod prometheus;

/// Why datapoints were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Over the per-connection or global input rate limit.
    RateLimited,
    /// Evicted by the `drop_oldest` policy of a full buffer.
    BufferFull,
    /// A single record larger than a Kafka message may be.
    TooLarge,
    /// Kafka refused the message with a permanent error.
    KafkaRejected,
    /// Still queued when the shutdown grace ran out, or arriving after it.
    Shutdown,
    /// Held by a task that panicked: counted once every task has stopped,
    /// so that nothing is lost silently even to a bug.
    InternalError,
    /// Written to the disk spool and damaged there (a flipped bit, a
    /// truncated or deleted segment) before it could be read back.
    SpoolCorrupt,
    /// For a topic the brokers refuse (an ACL), kept apart until it can be
    /// written, and the oldest past `kafka_parked_max_bytes`.
    TopicRefused,
}

impl DropReason {
    /// Every reason, in a fixed order.
    pub const ALL: [DropReason; 8] = [
        DropReason::RateLimited,
        DropReason::BufferFull,
        DropReason::TooLarge,
        DropReason::KafkaRejected,
        DropReason::Shutdown,
        DropReason::InternalError,
        DropReason::SpoolCorrupt,
        DropReason::TopicRefused,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RateLimited => "rate_limited",
            DropReason::BufferFull => "buffer_full",
            DropReason::TooLarge => "too_large",
            DropReason::KafkaRejected => "kafka_rejected",
            DropReason::Shutdown => "shutdown",
            DropReason::InternalError => "internal_error",
            DropReason::SpoolCorrupt => "spool_corrupt",
            DropReason::TopicRefused => "topic_refused",
        }
    }
}

/// A records-and-datapoints pair of counters.
#[derive(Debug, Default)]
pub struct Amount {
    /// MetricLists.
    pub records: AtomicU64,
    /// Datapoints across them.
    pub datapoints: AtomicU64,
}

impl Amount {
    /// Adds to both.
    pub fn add(&self, records: u64, datapoints: u64) {
        self.records.fetch_add(records, Relaxed);
        self.datapoints.fetch_add(datapoints, Relaxed);
    }

    /// Takes from both.
    pub fn sub(&self, records: u64, datapoints: u64) {
        self.records.fetch_sub(records, Relaxed);
        self.datapoints.fetch_sub(datapoints, Relaxed);
    }

    /// Reads both and sets them to zero.
    pub fn take(&self) -> Counts {
        Counts {
            records: self.records.swap(0, Relaxed),
            datapoints: self.datapoints.swap(0, Relaxed),
        }
    }

    /// Reads both.
    pub fn get(&self) -> Counts {
        Counts {
            records: self.records.load(Relaxed),
            datapoints: self.datapoints.load(Relaxed),
        }
    }
}

/// A histogram with fixed upper bounds, for Prometheus.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, ascending; an implicit `+Inf` follows.
    pub bounds: &'static [f64],
    /// Non-cumulative counts per bucket, the last one for `+Inf`.
    pub counts: Vec<AtomicU64>,
    /// Sum of the observations.
    pub sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum.fetch_add(value.max(0.0) as u64, Relaxed);
    }
}

/// Milliseconds from batching to Kafka's acknowledgement.
pub const LATENCY_BOUNDS_MS: &[f64] = &[
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];
/// Records per Kafka message.
pub const BATCH_BOUNDS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0];

/// Milliseconds a spool sync takes.
pub const FSYNC_BOUNDS_MS: &[f64] = &[0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0];

/// Inputs, for per-input counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The TCP input.
    Tcp,
    /// The agent poller.
    Agent,
    /// The node's own metrics.
    Node,
    /// statsd.
    Statsd,
}

impl Input {
    /// Every input, in the order of [`Stats::received`].
    pub const ALL: [Self; 4] = [Self::Tcp, Self::Agent, Self::Node, Self::Statsd];

    /// The `input` label's value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Agent => "agent",
            Self::Node => "node",
            Self::Statsd => "statsd",
        }
    }
}

/// Per-topic counts are kept for at most this many topics; the rest are
/// summed under the topic label `_other`.
pub const TOPIC_CARDINALITY_CAP: usize = 200;

/// Datapoints per topic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TopicCounts {
    /// Received (routed to the topic).
    pub received: u64,
    /// Delivered.
    pub delivered: u64,
}

/// Declares the plain counters and gauges once: each becomes a field of
/// [`Stats`], starts at zero, and is rendered in `/metrics` as
/// `collector_<name>_total` (a counter) or `collector_<name>` (a gauge),
/// with its doc as the help text.
macro_rules! stats {
    (
        counters { $( #[doc = $cdoc:literal] $counter:ident, )* }
        gauges { $( #[doc = $gdoc:literal] $gauge:ident, )* }
    ) => {
        /// Every counter. Shared as `Arc<Stats>`; all updates are relaxed
        /// atomics.
        #[derive(Debug)]
        pub struct Stats {
            $( #[doc = $cdoc] pub $counter: AtomicU64, )*
            $( #[doc = $gdoc] pub $gauge: AtomicI64, )*
            /// Received from each input, before any drop (indexed like
            /// [`Input::ALL`]; see [`Stats::received`]).
            pub received: [Amount; Input::ALL.len()],
            /// Acknowledged by Kafka.
            pub delivered: Amount,
            /// Without Kafka (`kafka = false`): at the end of the
            /// pipeline, served by the node's own outputs (the store, the
            /// partners) and sent no further.
            pub served: Amount,
            /// Dropped, by reason (indexed like [`DropReason::ALL`]).
            pub dropped: [Amount; DropReason::ALL.len()],
            /// Produced to librdkafka and not yet reported on.
            pub kafka_in_flight: Amount,
            /// The part of `kafka_in_flight` read from the disk spool.
            pub kafka_in_flight_spooled: Amount,
            /// Found in the disk spool at start, left by an earlier run.
            pub replayed: Amount,
            /// Left in the disk spool at exit, for the next run.
            pub spooled: Amount,
            /// Per-topic datapoints, capped.
            pub topics: Mutex<HashMap<Arc<str>, TopicCounts>>,
            /// Milliseconds from batching to Kafka's acknowledgement.
            pub delivery_latency_ms: Histogram,
            /// Records per Kafka message.
            pub batch_records: Histogram,
            /// Milliseconds each spool sync took.
            pub spool_fsync_ms: Histogram,
            /// New series the node store refused, by reason (indexed like
            /// [`crate::sinks::store::limits::Refusal::ALL`]).
            pub store_refused: [AtomicU64; crate::sinks::store::limits::Refusal::ALL.len()],
            /// Samples left out of Prometheus scrapes: duplicates, and
            /// families named like the collector's own.
            pub store_skipped_duplicate: AtomicU64,
            /// See `store_skipped_duplicate`.
            pub store_skipped_name_taken: AtomicU64,
        }

        impl Default for Stats {
            fn default() -> Self {
                Self {
                    $( $counter: AtomicU64::new(0), )*
                    $( $gauge: AtomicI64::new(0), )*
                    received: Default::default(),
                    delivered: Amount::default(),
                    served: Amount::default(),
                    dropped: Default::default(),
                    kafka_in_flight: Amount::default(),
                    kafka_in_flight_spooled: Amount::default(),
                    replayed: Amount::default(),
                    spooled: Amount::default(),
                    topics: Mutex::new(HashMap::new()),
                    delivery_latency_ms: Histogram::new(LATENCY_BOUNDS_MS),
                    batch_records: Histogram::new(BATCH_BOUNDS),
                    spool_fsync_ms: Histogram::new(FSYNC_BOUNDS_MS),
                    store_refused: Default::default(),
                    store_skipped_duplicate: AtomicU64::new(0),
                    store_skipped_name_taken: AtomicU64::new(0),
                }
            }
        }

        impl Stats {
            /// Every plain counter and gauge, as `/metrics` shows it.
            pub fn scalars(&self) -> Vec<Scalar> {
                vec![
                    $( Scalar {
                        name: concat!("collector_", stringify!($counter), "_total"),
                        kind: "counter",
                        help: $cdoc,
                        value: i64::try_from(self.$counter.load(Relaxed)).unwrap_or(i64::MAX),
                    }, )*
                    $( Scalar {
                        name: concat!("collector_", stringify!($gauge)),
                        kind: "gauge",
                        help: $gdoc,
                        value: self.$gauge.load(Relaxed),
                    }, )*
                ]
            }
        }
    };
}

/// One plain counter or gauge, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scalar {
    /// Its metric name.
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Its help text.
    pub help: &'static str,
    /// Its value.
    pub value: i64,
}

stats! {
    counters {
        /// Input connections accepted.
        connections_accepted,
        /// Input connections refused at the connection limit.
        connections_refused,
        /// Input connections closed for a malformed stream.
        connections_malformed,
        /// Input connections closed after the idle timeout.
        connections_idle_closed,
        /// Input connections closed before sending anything (probes, port scans).
        connections_empty,
        /// Input connections closed for a header or block not arriving whole within the frame timeout.
        connections_frame_timeout,
        /// Input connections closed for a block whose records could not fit in the buffer.
        connections_oversized,
        /// Failed accepts on any listener (out of descriptors, for example).
        accept_failures,
        /// Bytes read from the inputs.
        bytes_received,
        /// OCF blocks decoded.
        blocks_received,
        /// Records whose topic name had to be sanitized.
        topics_sanitized,
        /// Times an input waited for room in a full buffer.
        buffer_full_waits,
        /// Kafka messages produced (each one OCF file).
        kafka_messages_produced,
        /// Kafka messages acknowledged.
        kafka_messages_delivered,
        /// Kafka messages produced again, after a failure, a purge or a broker switch.
        kafka_messages_retried,
        /// Times the sink waited on a full librdkafka queue.
        kafka_queue_full_waits,
        /// Broker discoveries that succeeded.
        discoveries,
        /// Broker discoveries that failed.
        discovery_failures,
        /// Kafka SASL authentication failures (a wrong password or user, a mechanism the broker refuses).
        kafka_authentication_failures,
        /// Kafka TLS failures (an unknown CA, an expired certificate, a hostname mismatch, a refused client certificate, a protocol that does not match the listener).
        kafka_tls_failures,
        /// Kafka clients that could not be made (a secret file unreadable, an option librdkafka refused).
        kafka_client_failures,
        /// Reloads of the Kafka security settings and secret files (SIGHUP, `POST /v1/kafka/reload`).
        kafka_reloads,
        /// Switches to a new broker set.
        producer_switches,
        /// Bytes written to partners.
        partner_bytes_sent,
        /// Blocks dropped from slow partners' queues.
        partner_blocks_dropped,
        /// Partners disconnected for falling behind or taking nothing of a write.
        partners_disconnected_slow,
        /// Partner connections refused at the partner limit.
        partners_refused,
        /// HTTP API connections refused at the API's connection limit.
        api_connections_refused,
        /// Collector tasks that panicked (a bug; what they held is counted as internal_error).
        task_panics,
        /// Configuration changes applied through the API.
        config_changes,
        /// Requests the agent poller made.
        agent_requests,
        /// Agent requests that failed.
        agent_request_failures,
        /// Agent answers refused for being larger than agent_max_body_bytes.
        agent_responses_too_large,
        /// Damaged stretches of spool segments skipped (each logged with its offset).
        spool_corrupt,
        /// Replayed records that were handed to Kafka before the restart without an acknowledgement: they may arrive twice.
        spool_possible_duplicates,
        /// Spool writes or syncs that failed (the spool is then degraded).
        spool_write_errors,
        /// Spool syncs (fsync) done.
        spool_fsyncs,
        /// Topics the brokers began to refuse (TOPIC_AUTHORIZATION_FAILED): their records wait apart.
        kafka_topics_refused,
        /// Topics whose first lookup was put off because too many topics were waiting for one.
        topic_lookups_deferred,
        /// Series the node store forgot, not updated within store_expiry_secs.
        store_series_expired,
        /// Prometheus scrapes written whole.
        prometheus_scrapes,
        /// Prometheus scrapes cut short: the scraper took nothing for 10 s (its connection is aborted, so it sees a failed scrape).
        prometheus_scrapes_cut,
        /// Prometheus scrapes refused with 503: two others were being written for 10 s.
        prometheus_scrapes_refused,
        /// statsd packets read.
        statsd_packets,
        /// statsd lines read whole.
        statsd_lines,
        /// statsd packets the kernel dropped, the listener's receive buffer full (from /proc/net/udp, at each flush).
        statsd_packets_dropped_by_kernel,
        /// statsd lines refused as malformed (the rest of their packet is read).
        statsd_lines_malformed,
        /// statsd values of a new series refused: past statsd_max_series_per_container or statsd_max_bytes, or a name and tags over 1 KiB.
        statsd_series_refused,
        /// statsd set members refused: their set held 1,024 already, the member is over 256 bytes, or past statsd_max_bytes.
        statsd_set_members_refused,
        /// statsd packets of a container dropped past its statsd_container_limit_kbytes.
        statsd_packets_over_limit,
        /// statsd lines (not empty) in the packets dropped past statsd_container_limit_kbytes.
        statsd_lines_over_limit,
        /// Containers registered through the statsd registration API (a new listener each; a repeated registration is not counted).
        statsd_registrations,
        /// Registrations answered 204, so that the task runs without statsd (logged with the reason): at statsd_max_containers, a port that could not be bound, a state file that could not be written, an id that cannot name a file, or the collector shutting down.
        statsd_registrations_refused,
        /// Containers deregistered (DELETE /container/{id}, or gone from the agent's /state after it named them): their listener flushes and closes.
        statsd_deregistrations,
    }
    gauges {
        /// Task and executor labels in the agent's latest /state left off the metrics: a key or value over 128 bytes.
        agent_labels_too_long,
        /// Task and executor labels in the agent's latest /state left off the metrics: past 32, or 2 KiB, of one container.
        agent_labels_too_many,
        /// Input connections open.
        connections_open,
        /// Bytes input read buffers hold from the shared pool.
        input_buffer_bytes,
        /// Bytes held against the buffer's bound (queued, batched, or waiting for librdkafka).
        buffer_bytes,
        /// Most bytes the buffer held.
        buffer_high_water_bytes,
        /// Bytes of messages librdkafka handed back, waiting to be produced again.
        kafka_retry_bytes,
        /// Partners connected.
        partners_connected,
        /// Bytes of the disk spool's segments.
        spool_bytes,
        /// Segments in the disk spool.
        spool_segments,
        /// Age of the oldest record in the disk spool without a Kafka report, seconds.
        spool_oldest_unacked_age_seconds,
        /// 1 while the disk spool can't be used (it failed, or its filesystem is full) and records are kept in memory.
        spool_degraded,
        /// The disk spool's bound in force, bytes: spool_max_bytes, or less where its filesystem has less room.
        spool_bound_bytes,
        /// Topics the brokers refuse now.
        kafka_topics_refused_now,
        /// Bytes of records waiting for their topic (looked up, or refused), in memory and in the spool's parked area.
        parked_bytes,
        /// Series the node store holds.
        store_series,
        /// Bytes the node store holds (names, tags and each series' overhead).
        store_bytes,
        /// Bytes every statsd series holds (names, tags, set members, timing samples), as of the last flush.
        statsd_bytes,
        /// Containers with a statsd listener of their own (registered, not yet deregistered).
        statsd_containers,
    }
}

/// A read-out of a records-and-datapoints pair.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// MetricLists.
    pub records: u64,
    /// Datapoints.
    pub datapoints: u64,
}

/// A consistent-enough read-out of the accounting counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Accounting {
    /// Decoded input.
    pub received: Counts,
    /// Delivered to Kafka.
    pub delivered: Counts,
    /// Served by the node's own outputs, without Kafka (`kafka = false`).
    pub served: Counts,
    /// Dropped, by reason.
    pub dropped: Vec<(DropReason, Counts)>,
    /// Found in the disk spool at start.
    pub replayed: Counts,
    /// Left in the disk spool at exit.
    pub spooled: Counts,
}

impl Accounting {
    /// Total dropped over every reason.
    pub fn dropped_total(&self) -> Counts {
        self.dropped
            .iter()
            .fold(Counts::default(), |a, (_, c)| Counts {
                records: a.records + c.records,
                datapoints: a.datapoints + c.datapoints,
            })
    }

    /// Dropped for one reason.
    pub fn dropped_for(&self, reason: DropReason) -> Counts {
        self.dropped
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }

    /// delivered + served + dropped + spooled: what got its outcome.
    fn done(&self) -> Counts {
        let dropped = self.dropped_total();
        Counts {
            records: self.delivered.records
                + self.served.records
                + dropped.records
                + self.spooled.records,
            datapoints: self.delivered.datapoints
                + self.served.datapoints
                + dropped.datapoints
                + self.spooled.datapoints,
        }
    }

    /// received + replayed − delivered − served − dropped − spooled: what
    /// is still queued.
    pub fn in_flight(&self) -> Counts {
        let done = self.done();
        Counts {
            records: (self.received.records + self.replayed.records).saturating_sub(done.records),
            datapoints: (self.received.datapoints + self.replayed.datapoints)
                .saturating_sub(done.datapoints),
        }
    }

    /// Whether everything received or replayed is delivered, served,
    /// counted as dropped, or left in the spool.
    pub fn balanced(&self) -> bool {
        let done = self.done();
        self.received.records + self.replayed.records == done.records
            && self.received.datapoints + self.replayed.datapoints == done.datapoints
    }
}

impl Stats {
    /// Counts input (the total is the inputs' sum).
    pub fn received(&self, input: Input) -> &Amount {
        &self.received[input as usize]
    }

    /// Counts records received from `input`.
    pub fn count_received(&self, input: Input, records: u64, datapoints: u64) {
        self.received(input).add(records, datapoints);
    }

    /// Adds to one topic's counts (capped cardinality).
    pub fn count_topic(&self, topic: &Arc<str>, update: impl FnOnce(&mut TopicCounts)) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if !topics.contains_key(topic) && topics.len() >= TOPIC_CARDINALITY_CAP {
            update(topics.entry(Arc::from("_other")).or_default());
        } else {
            update(topics.entry(topic.clone()).or_default());
        }
    }

    /// Counts a new series the node store refused.
    pub fn count_store_refusal(&self, refusal: crate::sinks::store::limits::Refusal) {
        self.store_refused[refusal as usize].fetch_add(1, Relaxed);
    }

    /// Counts a drop.
    pub fn count_drop(&self, reason: DropReason, records: u64, datapoints: u64) {
        self.dropped[reason as usize].add(records, datapoints);
    }

    /// Reads the accounting counters.
    pub fn accounting(&self) -> Accounting {
        let received = self.received.iter().map(Amount::get);
        Accounting {
            received: Counts {
                records: received.clone().map(|c| c.records).sum(),
                datapoints: received.map(|c| c.datapoints).sum(),
            },
            delivered: self.delivered.get(),
            served: self.served.get(),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, self.dropped[*r as usize].get()))
                .collect(),
            replayed: self.replayed.get(),
            spooled: self.spooled.get(),
        }
    }

    /// Counts what shutdown left undelivered: the part read from the disk
    /// spool stays there for the next run (`spooled`), the rest is a
    /// `shutdown` drop.
    pub fn count_left_at_shutdown(&self, total: Counts, spooled: Counts) {
        let spooled = Counts {
            records: spooled.records.min(total.records),
            datapoints: spooled.datapoints.min(total.datapoints),
        };
        self.count_drop(
            DropReason::Shutdown,
            total.records - spooled.records,
            total.datapoints - spooled.datapoints,
        );
        self.spooled.add(spooled.records, spooled.datapoints);
    }

    /// Sets the buffer gauge and its high-water mark.
    pub fn set_buffer_bytes(&self, bytes: usize) {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.buffer_bytes.store(bytes, Relaxed);
        self.buffer_high_water_bytes.fetch_max(bytes, Relaxed);
    }

    /// Per-topic received counts of routed records, given as (topic,
    /// datapoints): one lock per run of records with the same topic.
    pub fn count_topics<'a>(&self, records: impl IntoIterator<Item = (&'a Arc<str>, u32)>) {
        let mut run: Option<(&Arc<str>, u64)> = None;
        for (record_topic, datapoints) in records {
            match &mut run {
                Some((topic, n)) if Arc::ptr_eq(topic, record_topic) => *n += u64::from(datapoints),
                _ => {
                    if let Some((topic, n)) = run.take() {
                        self.count_topic(topic, |c| c.received += n);
                    }
                    run = Some((record_topic, u64::from(datapoints)));
                }
            }
        }
        if let Some((topic, n)) = run {
            self.count_topic(topic, |c| c.received += n);
        }
    }

    /// Counts whatever is neither delivered nor dropped as lost to a bug
    /// (`internal_error`). Only for the very end, once every task has
    /// stopped and nothing can still be in flight. Returns what it counted.
    pub fn count_unaccounted(&self) -> Counts {
        let left = self.accounting().in_flight();
        if left.records > 0 || left.datapoints > 0 {
            self.count_drop(DropReason::InternalError, left.records, left.datapoints);
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_counters() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        let stats = Stats::default();
        stats.count_received(Input::Tcp, 2, 20);
        stats.count_received(Input::Agent, 1, 10);
        stats.delivered.add(1, 10);
        stats.count_drop(DropReason::TooLarge, 1, 10);
        let acc = stats.accounting();
        assert!(!acc.balanced());
        assert_eq!(
            acc.in_flight(),
            Counts {
                records: 1,
                datapoints: 10
            }
        );
        stats.count_drop(DropReason::Shutdown, 1, 10);
        assert!(stats.accounting().balanced());
        assert_eq!(
            stats
                .accounting()
                .dropped_for(DropReason::Shutdown)
                .datapoints,
            10
        );
    }
}
