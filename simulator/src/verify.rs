//! The verifier: consumes the metrics topics (prefix `metrics-`) and the
//! sample topic while they are written, decodes every message, and accounts
//! per simulated producer for delivered, missing, duplicated and
//! out-of-order records, and the latency from `time_ms` to consume time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use collector::config::security::KafkaSecurity;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::producer::{PRODUCER_TAG, SEQ_TAG};

/// One producer's account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProducerAccount {
    /// Distinct records seen.
    pub records: u64,
    /// Datapoints in distinct records.
    pub datapoints: u64,
    /// Records seen more than once.
    pub duplicates: u64,
    /// Records seen after a higher sequence number of the same producer.
    pub out_of_order: u64,
    /// Highest sequence number seen.
    pub max_seq: Option<u64>,
    #[serde(skip)]
    seen: BTreeSet<u64>,
}

impl ProducerAccount {
    /// Sequence numbers below `sent` never seen.
    pub fn missing(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.seen.range(..sent).count() as u64)
    }
}

/// Everything seen so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seen {
    /// Per simulated producer.
    pub producers: BTreeMap<String, ProducerAccount>,
    /// Messages consumed.
    pub messages: u64,
    /// Messages that were not one valid OCF file.
    pub undecodable: u64,
    /// Records per topic.
    pub records_by_topic: BTreeMap<String, u64>,
    /// Datapoints in all records (simulated or not).
    pub datapoints: u64,
    /// Datapoints in records of the sample topic.
    pub sample_datapoints: u64,
    /// Sample topic: datapoint names per `executor_id` tag.
    pub sample_executors: BTreeMap<String, BTreeSet<String>>,
    /// statsd values of containers (records with `container_id` and
    /// `metric_type` tags), the latest of each series.
    #[serde(skip)]
    pub statsd: crate::statsd_module::StatsdSeen,
    #[serde(skip)]
    latencies_ms: Vec<u64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Worst.
    pub max: u64,
}

impl Seen {
    /// Latency percentiles of simulated records.
    pub fn latency(&self) -> Percentiles {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_unstable();
        let pick = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        Percentiles {
            p50: pick(0.5),
            p99: pick(0.99),
            max: sorted.last().copied().unwrap_or(0),
        }
    }

    /// Datapoints of simulated producers' distinct records.
    pub fn producer_datapoints(&self) -> u64 {
        self.producers.values().map(|p| p.datapoints).sum()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The collector's default `kafka_topic_prefix`: the module producers' and
/// the tasks' statsd topics start with it.
pub fn metrics_topic_prefix() -> String {
    collector::config::Config::default().kafka_topic_prefix
}

/// A verifier consuming in background threads, one per Kafka cluster, all
/// into one account (so a record found in two clusters counts as a
/// duplicate).
pub struct Verifier {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    prefix: String,
    sample_topic: String,
    threads: Vec<std::thread::JoinHandle<()>>,
    security: KafkaSecurity,
}

impl Verifier {
    /// Starts consuming from `bootstrap`: topics starting with `prefix`,
    /// and `sample_topic`; with TLS and SASL as `security` says (the
    /// collector's settings, the same client configuration).
    pub fn start(
        bootstrap: &str,
        prefix: &str,
        sample_topic: &str,
        security: KafkaSecurity,
    ) -> anyhow::Result<Self> {
        let mut verifier = Self {
            seen: Arc::new(Mutex::new(Seen::default())),
            stop: Arc::new(AtomicBool::new(false)),
            prefix: prefix.to_owned(),
            sample_topic: sample_topic.to_owned(),
            threads: Vec::new(),
            security,
        };
        verifier.add_cluster(bootstrap)?;
        Ok(verifier)
    }

    /// Also consumes another cluster (brokers that moved, say).
    pub fn add_cluster(&mut self, bootstrap: &str) -> anyhow::Result<()> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "simulator-verifier")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20");
        self.security.apply(&mut config)?;
        let consumer: BaseConsumer = config.create()?;
        let (seen, stop) = (self.seen.clone(), self.stop.clone());
        let (prefix, sample_topic) = (self.prefix.clone(), self.sample_topic.clone());
        self.threads.push(std::thread::spawn(move || {
            consume(consumer, &prefix, &sample_topic, &seen, &stop)
        }));
        Ok(())
    }

    /// What has been seen so far.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops consuming.
    pub fn stop(mut self) -> Seen {
        self.stop.store(true, Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.seen()
    }
}

fn consume(
    consumer: BaseConsumer,
    prefix: &str,
    sample_topic: &str,
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
) {
    let mut assigned: BTreeSet<(String, i32)> = BTreeSet::new();
    let mut last_refresh = Instant::now() - Duration::from_secs(10);
    while !stop.load(Relaxed) {
        // Topics appear as the collector creates them: re-read metadata.
        if last_refresh.elapsed() >= Duration::from_millis(500) {
            last_refresh = Instant::now();
            if let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(2)) {
                // Only the new partitions: re-assigning the whole list would
                // restart the old ones from the beginning (duplicates).
                let mut added = false;
                let mut list = TopicPartitionList::new();
                for topic in metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name().starts_with(prefix) || t.name() == sample_topic)
                {
                    for partition in topic.partitions() {
                        if assigned.insert((topic.name().to_owned(), partition.id())) {
                            let _ = list.add_partition_offset(
                                topic.name(),
                                partition.id(),
                                Offset::Beginning,
                            );
                            added = true;
                        }
                    }
                }
                if added {
                    let _ = consumer.incremental_assign(&list);
                }
            }
        }
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let consumed = now_ms();
        let topic = message.topic().to_owned();
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.messages += 1;
        let records = match schema::decode_all(
            message.payload().unwrap_or_default(),
            schema::Limits::default(),
        ) {
            Ok(records) => records,
            Err(_) => {
                seen.undecodable += 1;
                continue;
            }
        };
        for record in records {
            let datapoints = record.datapoints.len() as u64;
            *seen.records_by_topic.entry(topic.clone()).or_default() += 1;
            seen.datapoints += datapoints;
            if topic == sample_topic {
                seen.sample_datapoints += datapoints;
                if let Some(executor) = record.tag("executor_id") {
                    let names = seen
                        .sample_executors
                        .entry(executor.to_owned())
                        .or_default();
                    for point in &record.datapoints {
                        if !names.contains(&point.name) {
                            names.insert(point.name.clone());
                        }
                    }
                }
            }
            if let (Some(container), Some(_), None) = (
                record.tag("container_id"),
                record.tag("metric_type"),
                record.tag(PRODUCER_TAG),
            ) {
                let tags: BTreeMap<String, String> = record
                    .tags
                    .iter()
                    .map(|t| (t.key.clone(), t.value.clone()))
                    .collect();
                for point in &record.datapoints {
                    let series = seen
                        .statsd
                        .entry((container.to_owned(), point.name.clone()))
                        .or_default();
                    match series.iter_mut().find(|(t, ..)| *t == tags) {
                        Some(held) if held.1 > point.time_ms => {}
                        Some(held) => {
                            (held.1, held.2) = (point.time_ms, point.value);
                            held.3.clone_from(&topic);
                        }
                        None => {
                            series.push((tags.clone(), point.time_ms, point.value, topic.clone()))
                        }
                    }
                }
            }
            let (Some(producer), Some(seq)) = (
                record.tag(PRODUCER_TAG),
                record.tag(SEQ_TAG).and_then(|s| s.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if let Some(point) = record.datapoints.first() {
                let latency = (consumed - point.time_ms).max(0) as u64;
                seen.latencies_ms.push(latency);
            }
            let account = seen.producers.entry(producer.to_owned()).or_default();
            if !account.seen.insert(seq) {
                account.duplicates += 1;
                continue;
            }
            if account.max_seq.is_some_and(|max| seq < max) {
                account.out_of_order += 1;
            }
            account.max_seq = Some(account.max_seq.map_or(seq, |m| m.max(seq)));
            account.records += 1;
            account.datapoints += datapoints;
        }
    }
}

/// The collector's accounting, read from its `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CollectorCounts {
    /// `collector_received_datapoints_total`, all inputs.
    pub received: f64,
    /// `collector_delivered_datapoints_total`.
    pub delivered: f64,
    /// `collector_dropped_datapoints_total`, all reasons.
    pub dropped: f64,
    /// `collector_replayed_datapoints_total`: found in the disk spool at
    /// start, left by an earlier process.
    #[serde(default)]
    pub replayed: f64,
}

impl From<&collector::stats::Accounting> for CollectorCounts {
    fn from(accounting: &collector::stats::Accounting) -> Self {
        Self {
            received: accounting.received.datapoints as f64,
            delivered: accounting.delivered.datapoints as f64,
            dropped: accounting.dropped_total().datapoints as f64,
            replayed: accounting.replayed.datapoints as f64,
        }
    }
}

/// Scrapes a collector's `/metrics` with a Prometheus text parser.
pub async fn scrape(metrics_url: &str) -> anyhow::Result<CollectorCounts> {
    let body = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(metrics_url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    parse_counts(&body)
}

/// Reads the accounting counters out of a `/metrics` body.
pub fn parse_counts(body: &str) -> anyhow::Result<CollectorCounts> {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?;
    let sum = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    Ok(CollectorCounts {
        received: sum("collector_received_datapoints_total"),
        delivered: sum("collector_delivered_datapoints_total"),
        dropped: sum("collector_dropped_datapoints_total"),
        replayed: sum("collector_replayed_datapoints_total"),
    })
}

/// Conservation from the outside: the collector's identity holds
/// (`received + replayed = delivered + dropped`, nothing in flight), and
/// Kafka holds at least what it counted as delivered. Returns the failures, in words.
pub fn check_conservation(collector: &CollectorCounts, seen: &Seen) -> Vec<String> {
    let mut failures = Vec::new();
    if (collector.received + collector.replayed - collector.delivered - collector.dropped).abs()
        > 0.5
    {
        failures.push(format!(
            "collector: received {} + replayed {} != delivered {} + dropped {}",
            collector.received, collector.replayed, collector.delivered, collector.dropped
        ));
    }
    let in_kafka = (seen.datapoints - seen.sample_datapoints) as f64;
    if in_kafka < collector.delivered {
        failures.push(format!(
            "Kafka holds {in_kafka} datapoints, the collector counted {} delivered",
            collector.delivered
        ));
    }
    let duplicates: u64 = seen.producers.values().map(|p| p.duplicates).sum();
    if duplicates > 0 {
        failures.push(duplicates_failure(duplicates));
    }
    failures
}

/// How [`check_conservation`] says that records arrived twice (what an
/// at-least-once replay after a crash may do).
pub fn duplicates_failure(duplicates: u64) -> String {
    format!("{duplicates} duplicated records")
}

/// Prints every record of `topics` (from the beginning) as one JSON line,
/// until `count` records or `idle` without a message; with no topic, lists
/// the topics and their partitions.
pub fn print_topics(
    bootstrap: &str,
    topics: &[String],
    count: Option<u64>,
    idle: Duration,
) -> anyhow::Result<()> {
    use std::io::Write;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "simulator-consume")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    if topics.is_empty() {
        for topic in metadata.topics() {
            println!("{} ({} partitions)", topic.name(), topic.partitions().len());
        }
        return Ok(());
    }
    let mut list = TopicPartitionList::new();
    for name in topics {
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| anyhow::anyhow!("no topic {name} on {bootstrap}"))?;
        for partition in topic.partitions() {
            list.add_partition_offset(name, partition.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&list)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut printed = 0u64;
    let mut last = Instant::now();
    while last.elapsed() < idle && count.is_none_or(|c| printed < c) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        last = Instant::now();
        let records = schema::decode_all(
            message.payload().unwrap_or_default(),
            schema::Limits::default(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{} [{}] offset {}: not an OCF file: {e}",
                message.topic(),
                message.partition(),
                message.offset()
            )
        })?;
        for record in records {
            serde_json::to_writer(&mut out, &record)?;
            writeln!(out)?;
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use collector::stats::{Input, Stats};

    /// The counts read from a collector's `/metrics` are its accounting,
    /// replayed datapoints included.
    #[test]
    fn parse_counts_reads_the_collectors_accounting() {
        let stats = Stats::default();
        stats.count_received(Input::Tcp, 3, 30);
        stats.count_received(Input::Agent, 1, 5);
        stats.replayed.add(2, 482);
        stats.delivered.add(5, 500);
        stats.count_drop(collector::stats::DropReason::TooLarge, 1, 17);
        let body = collector::stats::prometheus::render(&stats, Default::default());
        let counts = parse_counts(&body).unwrap();
        assert_eq!(counts, CollectorCounts::from(&stats.accounting()));
        assert_eq!(counts.replayed, 482.0);
        assert_eq!(counts.received, 35.0);
    }
}
