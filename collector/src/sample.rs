//! The sample-producer, as the original (2016) behaved, without giving up:
//! every period it polls the agent's `/monitor/statistics.json`, maps it to
//! one MetricList per executor, and sends the poll as one Kafka message (one
//! OCF file) to the sample topic.
//!
//! - No containers: "No containers returned in stats, trying again in Ns".
//! - Agent, ipcmd, scheduler or brokers unreachable: a clear log line, then
//!   a retry with capped backoff. As soon as the situation changes, data flows.
//! - A poll that can't be delivered yet is kept (up to `max_pending` polls,
//!   the oldest dropped and counted beyond that) and sent when Kafka returns.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema::{Codec, OcfEncoder};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::discovery::{Backoff, BrokerSource, discover};
use crate::mesos::client::AgentClient;
use crate::mesos::mapping::{Naming, map_entries};
use crate::mesos::poller::{AgentAddress, agent_url};

/// What the sample-producer does.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    /// Where brokers come from; `None` when Kafka is off.
    pub brokers: Option<BrokerSource>,
    /// The topic (and each MetricList's `topic`).
    pub topic: String,
    /// Seconds between polls.
    pub period: Duration,
    /// The agent, or the command that finds its IP.
    pub agent: AgentAddress,
    /// Agent credential.
    pub auth: Option<String>,
    /// Agent request timeout.
    pub agent_timeout: Duration,
    /// Write each poll to `chunk-N.avro` in this folder.
    pub file_dir: Option<PathBuf>,
    /// Polls kept while Kafka is unreachable.
    pub max_pending: usize,
    /// librdkafka's `compression.codec` (the original used snappy).
    pub compression: String,
    /// Any other librdkafka producer option, applied last.
    pub librdkafka: Vec<(String, String)>,
}

/// What a run did, logged at shutdown.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SampleReport {
    /// Polls made.
    pub polls: u64,
    /// Polls that found no containers.
    pub empty_polls: u64,
    /// Polls that failed (agent unreachable, malformed, ...).
    pub failed_polls: u64,
    /// Kafka messages delivered.
    pub messages_delivered: u64,
    /// Datapoints delivered.
    pub datapoints_delivered: u64,
    /// Datapoints dropped: pending polls beyond `max_pending`, or left at shutdown.
    pub datapoints_dropped: u64,
    /// Files written.
    pub files_written: u64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn producer_config(brokers: &[String], options: &ProducerOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", "sample-producer")
        .set("compression.codec", &options.compression)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000");
    for (key, value) in &options.librdkafka {
        config.set(key, value);
    }
    config
}

/// How the Kafka producer is configured.
#[derive(Clone)]
struct ProducerOptions {
    compression: String,
    librdkafka: Vec<(String, String)>,
}

struct Pending {
    payload: Vec<u8>,
    datapoints: u64,
}

#[derive(Default)]
struct Shared {
    queue: std::sync::Mutex<VecDeque<Pending>>,
    ready: tokio::sync::Notify,
    delivered_messages: AtomicU64,
    delivered_datapoints: AtomicU64,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Delivers pending polls in order, looking brokers up again after every
/// failure, until `shutdown` and then for at most `grace` more.
async fn send_pending(
    source: BrokerSource,
    topic: String,
    options: ProducerOptions,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let http = reqwest::Client::new();
    let mut producer: Option<(FutureProducer, Vec<String>)> = None;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if shutdown.is_cancelled() && deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return;
        }
        let next = shared
            .queue()
            .front()
            .map(|p| (p.payload.clone(), p.datapoints));
        let Some((payload, datapoints)) = next else {
            if shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = shared.ready.notified() => {}
                _ = shutdown.cancelled() => {}
            }
            continue;
        };
        if producer.is_none() {
            match discover(&source, &http).await {
                Ok(found) => {
                    let config = producer_config(&found.brokers, &options);
                    match config.create::<FutureProducer>() {
                        Ok(p) => {
                            info!(brokers = ?found.brokers, method = %found.method, "Using Kafka brokers.");
                            // Brokers that do not auto-create topics (tansu, many
                            // production clusters) would time the send out.
                            let create = crate::sink::kafka::create_topic(&config, &topic, 1, 1);
                            match tokio::time::timeout(Duration::from_secs(5), create).await {
                                Ok(Ok(())) => info!(%topic, "Kafka topic exists."),
                                Ok(Err(error)) => {
                                    warn!(%topic, %error, "Could not make sure the Kafka topic exists; sending anyway.")
                                }
                                Err(_) => {
                                    warn!(%topic, "No answer to creating the Kafka topic within 5 s; sending anyway.")
                                }
                            }
                            producer = Some((p, found.brokers));
                        }
                        Err(error) => error!(%error, "Could not create the Kafka producer."),
                    }
                }
                Err(error) => warn!(%error, "Broker lookup failed; retrying."),
            }
        }
        let failed = match &producer {
            Some((p, brokers)) => {
                let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic).payload(&payload);
                match p.send(record, Duration::from_secs(5)).await {
                    Ok(_) => {
                        shared.queue().pop_front();
                        shared.delivered_messages.fetch_add(1, Relaxed);
                        shared.delivered_datapoints.fetch_add(datapoints, Relaxed);
                        backoff.reset();
                        false
                    }
                    Err((error, _)) => {
                        warn!(%error, "Sending to Kafka failed; the poll is kept and retried.");
                        if error.rdkafka_error_code()
                            == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                        {
                            match crate::sink::kafka::create_topic(
                                &producer_config(brokers, &options),
                                &topic,
                                1,
                                1,
                            )
                            .await
                            {
                                Ok(()) => info!(%topic, "Created Kafka topic."),
                                Err(error) => {
                                    error!(%topic, %error, "Could not create the Kafka topic.")
                                }
                            }
                        }
                        true
                    }
                }
            }
            None => true,
        };
        if failed {
            // Brokers may have moved: look them up again.
            producer = None;
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled(), if deadline.is_none() => {}
            }
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(config: SampleConfig, shutdown: CancellationToken) -> SampleReport {
    let mut report = SampleReport::default();
    let Some(url) = agent_url(&config.agent, &shutdown).await else {
        return report;
    };
    let client = match AgentClient::new(&url, config.auth.clone(), config.agent_timeout) {
        Ok(client) => client,
        Err(error) => {
            error!(%error, "Bad agent address.");
            return report;
        }
    };
    info!(agent = %url, topic = %config.topic, period = ?config.period, "Sample producer started.");
    let shared = Arc::new(Shared::default());
    let stop_sending = CancellationToken::new();
    let sender = config.brokers.clone().map(|source| {
        tokio::spawn(send_pending(
            source,
            config.topic.clone(),
            ProducerOptions {
                compression: config.compression.clone(),
                librdkafka: config.librdkafka.clone(),
            },
            shared.clone(),
            stop_sending.clone(),
            Duration::from_secs(5),
        ))
    });
    let mut poll_backoff = Backoff::new(
        Duration::from_secs(1),
        config.period.max(Duration::from_secs(1)),
    );
    let mut next_poll = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next_poll) => {}
        }
        report.polls += 1;
        let body = match client.statistics().await {
            Ok(body) => body,
            Err(error) => {
                report.failed_polls += 1;
                let delay = poll_backoff.next_delay();
                warn!(%error, retry_in = ?delay, "Agent poll failed; retrying.");
                next_poll = tokio::time::Instant::now() + delay;
                continue;
            }
        };
        poll_backoff.reset();
        next_poll = tokio::time::Instant::now() + config.period;
        let mapped = map_entries(
            &body,
            Naming {
                topic: Some(&config.topic),
                prefix: "",
            },
            now_ms(),
        );
        for reason in &mapped.skipped {
            warn!(reason, "Skipped a statistics entry.");
        }
        if mapped.lists.is_empty() {
            report.empty_polls += 1;
            info!(
                "No containers returned in stats, trying again in {}s",
                config.period.as_secs()
            );
            continue;
        }
        let datapoints = mapped.lists.iter().map(|l| l.datapoints.len() as u64).sum();
        let payload = OcfEncoder::new(Codec::Null).file(&mapped.lists);
        if let Some(dir) = &config.file_dir {
            let path = dir.join(format!("chunk-{}.avro", report.files_written));
            match std::fs::write(&path, &payload) {
                Ok(()) => report.files_written += 1,
                Err(error) => {
                    warn!(path = %path.display(), %error, "Could not write the poll to a file.")
                }
            }
        }
        if sender.is_some() {
            let mut queue = shared.queue();
            queue.push_back(Pending {
                payload,
                datapoints,
            });
            while queue.len() > config.max_pending {
                if let Some(old) = queue.pop_front() {
                    report.datapoints_dropped += old.datapoints;
                    warn!(
                        datapoints = old.datapoints,
                        "Kafka unreachable for too long: dropped the oldest pending poll."
                    );
                }
            }
            drop(queue);
            shared.ready.notify_one();
        }
    }
    stop_sending.cancel();
    if let Some(sender) = sender {
        let _ = sender.await;
    }
    report.messages_delivered = shared.delivered_messages.load(Relaxed);
    report.datapoints_delivered = shared.delivered_datapoints.load(Relaxed);
    report.datapoints_dropped += shared.queue().iter().map(|p| p.datapoints).sum::<u64>();
    info!(
        polls = report.polls,
        messages_delivered = report.messages_delivered,
        datapoints_delivered = report.datapoints_delivered,
        datapoints_dropped = report.datapoints_dropped,
        files_written = report.files_written,
        "Sample producer stopped."
    );
    report
}
