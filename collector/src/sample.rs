//! The sample-producer, as the original (2016) behaved, without giving up:
//! every period it polls the agent's `/monitor/statistics.json`, maps it to
//! one MetricList per executor, and sends the poll as one Kafka message (one
//! OCF file) to the sample topic.
//!
//! - No containers: "No containers returned in stats, trying again in Ns".
//! - Agent, ipcmd, scheduler or brokers unreachable: a clear log line, then
//!   a retry with capped backoff. As soon as the situation changes, data flows.
//! - A poll that can't be delivered yet is kept (up to `max_pending` polls
//!   and `max_pending_bytes`, the oldest dropped and counted beyond that) and
//!   sent when Kafka returns.
//! - A poll is sent as messages no larger than `max_message_bytes`; one the
//!   brokers still refuse as too large is split in two and sent again, and a
//!   single executor's record too large alone is dropped and counted. Other
//!   permanent errors (an invalid or forbidden topic) drop and count the
//!   poll with the reason: nothing permanent is retried forever.
//! - An agent answer larger than `max_body_bytes` is refused.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext};
use schema::{Codec, MetricList, OcfEncoder};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::ConfigError;
use crate::config::librdkafka::ClientOptions;
use crate::config::security::KafkaSecurity;
use crate::discovery::{BrokerSource, discover};
use crate::sinks::kafka::KafkaProducer;
use crate::sources::agent::client::AgentClient;
use crate::sources::agent::mapping::Naming;
use crate::sources::agent::poller::{AgentAddress, agent_url};

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
    pub credentials: crate::dcos::Credentials,
    /// Agent request timeout.
    pub agent_timeout: Duration,
    /// Write each poll to `chunk-N.avro` in this folder.
    pub file_dir: Option<PathBuf>,
    /// Polls kept while Kafka is unreachable.
    pub max_pending: usize,
    /// Bytes of polls kept while Kafka is unreachable.
    pub max_pending_bytes: usize,
    /// Largest Kafka message sent; a poll is split below it.
    pub max_message_bytes: usize,
    /// Largest agent answer read.
    pub max_body_bytes: usize,
    /// librdkafka's `compression.codec` (the original used snappy).
    pub compression: String,
    /// TLS and SASL for Kafka, as the collector's.
    pub security: KafkaSecurity,
    /// Asks for the Kafka producer to be made anew, reading the secret
    /// files again (the binary's SIGHUP).
    pub reload: Reload,
    /// Any other librdkafka producer option, applied last.
    pub librdkafka: Vec<(String, String)>,
}

impl SampleConfig {
    /// Polls kept while Kafka is unreachable, by default.
    pub const MAX_PENDING: usize = 64;
    /// Bytes of polls kept while Kafka is unreachable, by default.
    pub const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
    /// Largest Kafka message, by default (librdkafka's and Kafka's default).
    pub const MAX_MESSAGE_BYTES: usize = 1_000_000;
    /// Largest agent answer read, by default.
    pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
}

/// A request to make the Kafka producer anew (SIGHUP): a send waiting for
/// its delivery report is given up (its poll is kept and sent again), and
/// the next send makes the producer, reading the secret files again. A
/// message the old producer had already sent may then arrive twice.
#[derive(Debug, Clone)]
pub struct Reload(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for Reload {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl Reload {
    /// Asks for it.
    pub fn request(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
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
    /// Datapoints dropped, for every reason: pending polls beyond the
    /// limits, records too large, permanent Kafka errors, left at shutdown.
    pub datapoints_dropped: u64,
    /// Of those, records too large for a Kafka message even alone.
    pub datapoints_too_large: u64,
    /// Of those, refused by Kafka with a permanent error.
    pub datapoints_rejected: u64,
    /// Files written.
    pub files_written: u64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The sample-producer's librdkafka configuration: the collector's
/// (`config::librdkafka`), as its own client, with its codec and a message
/// timeout (a poll not delivered in time is kept and sent again).
pub fn producer_config(
    brokers: &[String],
    options: &ProducerOptions,
) -> Result<ClientConfig, ConfigError> {
    crate::config::librdkafka::client_config(options.client_options(), brokers)
}

/// How the Kafka producer is configured.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// librdkafka's `compression.codec`.
    pub compression: String,
    /// Largest message value sent.
    pub max_message_bytes: usize,
    /// TLS and SASL, as the collector's.
    pub security: KafkaSecurity,
    /// Any other librdkafka option, applied last.
    pub librdkafka: Vec<(String, String)>,
}

impl ProducerOptions {
    fn client_options(&self) -> ClientOptions<'_> {
        ClientOptions {
            client_id: "sample-producer",
            compression: &self.compression,
            max_message_bytes: self.max_message_bytes,
            queue_max_kbytes: SampleConfig::MAX_PENDING_BYTES / 1024,
            require_all_acks: true,
            message_timeout_ms: 30_000,
            security: &self.security,
            overrides: &self.librdkafka,
        }
    }

    /// Checks the options: the security settings and their files, then
    /// the librdkafka options, by making a producer connected to nothing
    /// (librdkafka refuses a bad codec or option only then).
    pub fn check(&self) -> Result<(), ConfigError> {
        self.security.check()?;
        crate::config::librdkafka::check_client_config(self.client_options())
    }
}

/// One Kafka message to send: a whole OCF file of some executors' records.
struct Pending {
    payload: Vec<u8>,
    records: usize,
    datapoints: u64,
}

impl Pending {
    fn of(lists: &[MetricList]) -> Self {
        Self {
            payload: OcfEncoder::new(Codec::Null).file(lists),
            records: lists.len(),
            datapoints: lists.iter().map(|l| l.datapoints.len() as u64).sum(),
        }
    }
}

/// A poll as messages of at most `max_bytes` each, in order, and the
/// records too large for any message (with their datapoints).
fn messages(lists: Vec<MetricList>, max_bytes: usize) -> (Vec<Pending>, Vec<(String, u64)>) {
    let overhead = OcfEncoder::new(Codec::Null).file_overhead();
    let mut out = Vec::new();
    let mut too_large = Vec::new();
    let mut group: Vec<MetricList> = Vec::new();
    let mut size = overhead;
    for list in lists {
        let len = schema::datum::encoded_len(&list);
        if len + overhead > max_bytes {
            let who = list.tag("executor_id").unwrap_or("?").to_owned();
            too_large.push((who, list.datapoints.len() as u64));
            continue;
        }
        if !group.is_empty() && size + len > max_bytes {
            out.push(Pending::of(&group));
            group.clear();
            size = overhead;
        }
        size += len;
        group.push(list);
    }
    if !group.is_empty() {
        out.push(Pending::of(&group));
    }
    (out, too_large)
}

/// The polls waiting for Kafka, bounded in count and bytes.
#[derive(Default)]
struct Queue {
    messages: VecDeque<Pending>,
    bytes: usize,
}

#[derive(Default)]
struct Shared {
    queue: std::sync::Mutex<Queue>,
    ready: tokio::sync::Notify,
    delivered_messages: AtomicU64,
    delivered_datapoints: AtomicU64,
    dropped_too_large: AtomicU64,
    dropped_rejected: AtomicU64,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_front(&self) -> Option<Pending> {
        let mut queue = self.queue();
        let pending = queue.messages.pop_front()?;
        queue.bytes -= pending.payload.len();
        Some(pending)
    }

    fn put_back(&self, pending: Vec<Pending>) {
        let mut queue = self.queue();
        for pending in pending.into_iter().rev() {
            queue.bytes += pending.payload.len();
            queue.messages.push_front(pending);
        }
    }
}

/// What to do after a failed send.
enum Failure {
    /// Try again after a pause, with the same producer.
    Retry,
    /// Try again after a pause, looking the brokers up again first.
    Rediscover,
    /// Never retried: counted as dropped.
    Permanent,
    /// The brokers refuse the message as too large: split it.
    TooLarge,
}

fn classify(error: &rdkafka::error::KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize) => {
            Failure::TooLarge
        }
        Some(code) if crate::sinks::kafka::is_permanent(code) => Failure::Permanent,
        Some(
            C::MessageTimedOut
            | C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::RequestTimedOut
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::Resolve,
        ) => Failure::Rediscover,
        _ => Failure::Retry,
    }
}

/// Hands each delivery report to the send waiting for it. The producer's
/// events are served by a thread that sleeps while there are none
/// ([`KafkaProducer`]; rust-rdkafka's `FutureProducer` polled without
/// waiting for part of every 100 ms: 0.8 % of a core, idle).
struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<tokio::sync::oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Self::DeliveryOpaque) {
        let _ = report.send(
            result
                .as_ref()
                .map(drop)
                .map_err(|(error, _)| error.clone()),
        );
    }
}

/// Sends `payload` to `topic` and waits for its delivery report.
async fn send(
    producer: &KafkaProducer<Reports>,
    topic: &str,
    payload: &[u8],
) -> Result<(), KafkaError> {
    let (report, reported) = tokio::sync::oneshot::channel();
    let record =
        BaseRecord::<(), [u8], _>::with_opaque_to(topic, Box::new(report)).payload(payload);
    match producer.send(record) {
        // A producer dropped meanwhile purges the message: its report says so.
        Ok(()) => reported.await.unwrap_or(Err(KafkaError::Canceled)),
        Err((error, _)) => Err(error),
    }
}

/// Delivers pending polls in order until `shutdown`, then for at most
/// `grace` more. Brokers are looked up again when they stop answering.
async fn send_pending(
    source: BrokerSource,
    topic: String,
    options: ProducerOptions,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    grace: Duration,
    reload: Reload,
) {
    let mut producer: Option<(KafkaProducer<Reports>, ClientConfig)> = None;
    let mut reloads = reload.subscribe();
    // Set when a reload gave up a send.
    let mut reload_now = false;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if shutdown.is_cancelled() && deadline.is_none() {
            deadline = Some(crate::shutdown::deadline_after(
                tokio::time::Instant::now(),
                grace,
            ));
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return;
        }
        if std::mem::take(&mut reload_now) || reloads.has_changed().unwrap_or(false) {
            reloads.mark_unchanged();
            if producer.take().is_some() {
                info!("Reload: the Kafka producer is made anew, reading the secret files again.");
            }
        }
        let Some(pending) = shared.take_front() else {
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
            let found = match source.fixed() {
                Some(fixed) => Ok(fixed),
                None => match source.http_client() {
                    Ok(http) => discover(&source, &http).await,
                    Err(error) => Err(error),
                },
            };
            match found {
                Ok(found) => {
                    let made = producer_config(&found.brokers, &options).and_then(|config| {
                        KafkaProducer::create(&config, Reports)
                            .map(|p| (p, config))
                            .map_err(|e| ConfigError::new("librdkafka", e.to_string()))
                    });
                    match made {
                        Ok((p, config)) => {
                            info!(brokers = ?found.brokers, method = %found.method, "Using Kafka brokers.");
                            // Brokers that do not auto-create topics (tansu, many
                            // production clusters) would time the send out: the
                            // topic is created where the brokers' metadata lacks
                            // it, and only there (some brokers, librdkafka's mock
                            // cluster among them, never answer CreateTopics).
                            let exists = topic_exists(&p, &topic);
                            if exists == Some(true) {
                                info!(%topic, "Kafka topic exists.");
                            } else {
                                let create =
                                    crate::sinks::kafka::create_topic(&config, &topic, 1, 1);
                                match tokio::time::timeout(Duration::from_secs(5), create).await {
                                    Ok(Ok(())) => info!(%topic, "Kafka topic exists."),
                                    Ok(Err(error)) => {
                                        warn!(%topic, %error, "Could not make sure the Kafka topic exists; sending anyway.")
                                    }
                                    Err(_) => {
                                        warn!(%topic, "No answer to creating the Kafka topic within 5 s; sending anyway.")
                                    }
                                }
                            }
                            producer = Some((p, config));
                        }
                        Err(error) => error!(%error, "Could not create the Kafka producer."),
                    }
                }
                Err(error) => warn!(%error, "Broker lookup failed; retrying."),
            }
        }
        let failure = match &producer {
            Some((p, config)) => {
                // A send waits for its delivery report, up to the message
                // timeout: shutdown's grace ends it sooner.
                let sent = {
                    let send = send(p, &topic, &pending.payload);
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            sent = &mut send => break Some(sent),
                            () = shutdown.cancelled(), if deadline.is_none() => {
                                deadline = Some(crate::shutdown::deadline_after(
                                    tokio::time::Instant::now(),
                                    grace,
                                ));
                            }
                            () = sleep_until_or_never(deadline) => break None,
                            Ok(()) = reloads.changed() => {
                                reload_now = true;
                                break None;
                            }
                        }
                    }
                };
                let Some(sent) = sent else {
                    shared.put_back(vec![pending]);
                    if reload_now {
                        continue;
                    }
                    return;
                };
                match sent {
                    Ok(()) => {
                        shared.delivered_messages.fetch_add(1, Relaxed);
                        shared
                            .delivered_datapoints
                            .fetch_add(pending.datapoints, Relaxed);
                        backoff.reset();
                        continue;
                    }
                    Err(error) => {
                        let failure = classify(&error);
                        if error.rdkafka_error_code()
                            == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                        {
                            match crate::sinks::kafka::create_topic(config, &topic, 1, 1).await {
                                Ok(()) => info!(%topic, "Created Kafka topic."),
                                Err(error) => {
                                    error!(%topic, %error, "Could not create the Kafka topic.")
                                }
                            }
                        }
                        match failure {
                            Failure::TooLarge => {
                                split_too_large(&shared, pending, &error);
                                continue;
                            }
                            Failure::Permanent => {
                                shared
                                    .dropped_rejected
                                    .fetch_add(pending.datapoints, Relaxed);
                                error!(%error, datapoints = pending.datapoints,
                                    "Kafka refused a poll with a permanent error; its datapoints are dropped.");
                                continue;
                            }
                            other => {
                                warn!(%error, "Sending to Kafka failed; the poll is kept and retried.");
                                shared.put_back(vec![pending]);
                                other
                            }
                        }
                    }
                }
            }
            None => {
                shared.put_back(vec![pending]);
                Failure::Rediscover
            }
        };
        if matches!(failure, Failure::Rediscover) {
            // The brokers may have moved: look them up again.
            producer = None;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled(), if deadline.is_none() => {}
        }
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A message the brokers refused as too large goes back as two halves;
/// a single record too large is dropped and counted.
fn split_too_large(shared: &Shared, pending: Pending, error: &rdkafka::error::KafkaError) {
    let lists = schema::decode_all(&pending.payload, schema::Limits::default()).unwrap_or_default();
    if lists.len() < 2 {
        shared
            .dropped_too_large
            .fetch_add(pending.datapoints, Relaxed);
        error!(%error, bytes = pending.payload.len(), datapoints = pending.datapoints,
            "Kafka refused an executor's statistics as too large even alone; they are dropped.");
        return;
    }
    warn!(%error, bytes = pending.payload.len(), records = pending.records,
        "Kafka refused a poll as too large; sending it in two halves.");
    let (first, second) = lists.split_at(lists.len() / 2);
    shared.put_back(vec![Pending::of(first), Pending::of(second)]);
}

/// Runs until `shutdown`.
pub async fn run(config: SampleConfig, shutdown: CancellationToken) -> SampleReport {
    let mut report = SampleReport::default();
    let Some(url) = agent_url(&config.agent, &shutdown).await else {
        return report;
    };
    let client = match AgentClient::new(
        &url,
        config.credentials.clone(),
        config.agent_timeout,
        config.max_body_bytes,
    ) {
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
                max_message_bytes: config.max_message_bytes,
                security: config.security.clone(),
                librdkafka: config.librdkafka.clone(),
            },
            shared.clone(),
            stop_sending.clone(),
            Duration::from_secs(5),
            config.reload.clone(),
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
        let naming = Naming {
            topic: Some(&config.topic),
            prefix: "",
        };
        let mapped = match client.statistics_mapped(naming, now_ms()).await {
            Ok(mapped) => mapped,
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
        if let Some(dir) = &config.file_dir {
            let payload = OcfEncoder::new(Codec::Null).file(&mapped.lists);
            let path = dir.join(format!("chunk-{}.avro", report.files_written));
            match std::fs::write(&path, &payload) {
                Ok(()) => report.files_written += 1,
                Err(error) => {
                    warn!(path = %path.display(), %error, "Could not write the poll to a file.")
                }
            }
        }
        if sender.is_some() {
            let (messages, too_large) = messages(mapped.lists, config.max_message_bytes);
            for (executor, datapoints) in too_large {
                report.datapoints_too_large += datapoints;
                report.datapoints_dropped += datapoints;
                error!(%executor, datapoints, limit = config.max_message_bytes,
                    "An executor's statistics are too large for one Kafka message; they are dropped.");
            }
            let mut queue = shared.queue();
            for message in messages {
                queue.bytes += message.payload.len();
                queue.messages.push_back(message);
            }
            while queue.messages.len() > config.max_pending
                || (queue.bytes > config.max_pending_bytes && queue.messages.len() > 1)
            {
                if let Some(old) = queue.messages.pop_front() {
                    queue.bytes -= old.payload.len();
                    report.datapoints_dropped += old.datapoints;
                    warn!(
                        datapoints = old.datapoints,
                        pending = queue.messages.len(),
                        pending_bytes = queue.bytes,
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
    let too_large = shared.dropped_too_large.load(Relaxed);
    let rejected = shared.dropped_rejected.load(Relaxed);
    report.datapoints_too_large += too_large;
    report.datapoints_rejected += rejected;
    report.datapoints_dropped += too_large
        + rejected
        + shared
            .queue()
            .messages
            .iter()
            .map(|p| p.datapoints)
            .sum::<u64>();
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

/// Whether the brokers' metadata has `topic` with its partitions: `None`
/// when they do not answer within 5 s. On the multi-threaded runtime the
/// worker hands its other tasks on while it waits.
fn topic_exists<C: rdkafka::producer::ProducerContext + 'static>(
    producer: &KafkaProducer<C>,
    topic: &str,
) -> Option<bool> {
    use rdkafka::producer::Producer as _;
    let ask = || {
        producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
    };
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(ask),
        _ => ask(),
    }
}
