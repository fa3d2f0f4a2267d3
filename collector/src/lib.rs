//! The metrics collector: a per-node agent for Mesos / DC/OS clusters.
//!
//! It takes Avro OCF metrics over TCP from the mesos-agent module and other
//! local processes, routes and tags them, and forwards them to Kafka, finding
//! the brokers through the Kafka framework's scheduler.
//!
//! # Layout
//!
//! - [`config`]: every option as flag, env var and TOML key; validation.
//! - [`ingest`]: the TCP listener and one task per connection.
//! - [`route`]: topic, key and tags for each record.
//! - [`buffer`]: the bounded buffer between inputs and sink, with its full policy.
//! - [`sink`]: the Kafka sink (batching, producing, delivery accounting) and the null sink.
//! - [`discovery`]: broker discovery through Mesos-DNS and the Kafka scheduler.
//! - [`mesos`]: the agent client, the JSON-to-MetricList mapping, and the
//!   agent poller with its enrichment tags.
//! - [`stats`]: every counter, and the accounting identity.
//! - [`sample`]: the sample-producer (`sample-producer` binary).
//! - [`decode`]: the `collector decode` tool.
//!
//! # Lifecycle
//!
//! [`App::bind`] binds every listener (port 0 allowed) and reports the
//! addresses; [`App::run`] runs until the shutdown future resolves, then shuts
//! down in a fixed order: stop accepting, let connections finish the frames
//! in flight, close the buffer, let the sink drain it and flush the producer
//! within the grace limit, and count anything left as dropped.

pub mod buffer;
pub mod config;
pub mod decode;
pub mod discovery;
pub mod ingest;
pub mod mesos;
pub mod route;
pub mod sample;
pub mod sink;
pub mod stats;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::buffer::Buffer;
use crate::config::Config;
use crate::discovery::BrokerSource;
use crate::ingest::RateLimits;
use crate::mesos::poller::{AgentAddress, Enrichment, Poller, PollerSettings, PollerStats};
use crate::route::Routing;
use crate::sink::batch::Thresholds;
use crate::sink::kafka::{BrokerState, KafkaSettings, KafkaSink};
use crate::stats::{Accounting, Stats};

/// Why the collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A collector with its listeners bound, ready to run.
pub struct App {
    config: Config,
    stats: Arc<Stats>,
    listener: TcpListener,
    ingest_addr: SocketAddr,
    broker_state: Arc<Mutex<BrokerState>>,
    routing: watch::Sender<Arc<Routing>>,
    enrichment: watch::Sender<Arc<Enrichment>>,
    rate_limits: watch::Sender<RateLimits>,
}

impl App {
    /// Validates the configuration and binds the listeners.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let addr = config.listen_endpoint;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let ingest_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        if !ingest_addr.ip().is_loopback() {
            warn!(%ingest_addr, "The TCP input listens beyond loopback; the original listened on loopback only.");
        }
        let rate_limits = rate_limits(&config);
        Ok(Self {
            stats: Arc::new(Stats::default()),
            listener,
            ingest_addr,
            broker_state: Arc::default(),
            routing: watch::Sender::new(Arc::new(Routing::from_config(&config))),
            enrichment: watch::Sender::new(Arc::new(if config.agent_polling {
                Enrichment::pending()
            } else {
                Enrichment::default()
            })),
            rate_limits: watch::Sender::new(rate_limits),
            config,
        })
    }

    /// The TCP input's bound address.
    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest_addr
    }

    /// The counters, readable while the collector runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The broker state, readable while the collector runs.
    pub fn broker_state(&self) -> Arc<Mutex<BrokerState>> {
        self.broker_state.clone()
    }

    /// Runs until `shutdown` resolves, then shuts down in order. Returns the
    /// final accounting, in which nothing is in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Accounting {
        let config = &self.config;
        let stats = self.stats.clone();
        let buffer = Arc::new(Buffer::new(
            config.buffer_max_bytes,
            config.buffer_full_policy,
            stats.clone(),
        ));
        let refresh = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(ingest::Shared::new(
            stats.clone(),
            buffer.clone(),
            self.routing.subscribe(),
            self.enrichment.subscribe(),
            refresh.clone(),
            self.rate_limits.subscribe(),
            schema::Limits {
                max_block_bytes: config.max_block_bytes,
                ..schema::Limits::default()
            },
            (config.idle_timeout_secs > 0).then(|| Duration::from_secs(config.idle_timeout_secs)),
        ));
        let stop_accepting = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(ingest::serve(
            self.listener,
            shared,
            config.max_connections,
            stop_accepting.clone(),
            connections.clone(),
        ));
        let poller = config.agent_polling.then(|| {
            let poller = Poller {
                settings: poller_settings(config),
                stats: stats.clone(),
                poller_stats: Arc::new(PollerStats::default()),
                enrichment: self.enrichment.clone(),
                refresh,
                buffer: buffer.clone(),
                routing: self.routing.subscribe(),
            };
            tokio::spawn(poller.run(stop_accepting.clone()))
        });
        let sink = if config.kafka {
            let sink = KafkaSink::new(
                kafka_settings(config),
                stats.clone(),
                buffer.clone(),
                self.broker_state.clone(),
            );
            tokio::spawn(sink.run())
        } else {
            tokio::spawn(sink::run_null(buffer.clone(), stats.clone()))
        };
        info!(input = %self.ingest_addr, sink = if config.kafka { "kafka" } else { "null" }, "Collector started.");

        shutdown.await;
        info!("Shutting down: no longer accepting input.");
        stop_accepting.cancel();
        let _ = accept.await;
        if let Some(poller) = poller {
            let _ = poller.await;
        }
        connections.close();
        connections.wait().await;
        buffer.close();
        let _ = sink.await;
        let accounting = stats.accounting();
        let dropped = accounting.dropped_total();
        info!(
            received = accounting.received.datapoints,
            delivered = accounting.delivered.datapoints,
            dropped = dropped.datapoints,
            buffer_high_water_bytes = stats.buffer_bytes_max.load(std::sync::atomic::Ordering::Relaxed),
            dropped_by_reason = %accounting
                .dropped
                .iter()
                .filter(|(_, c)| c.datapoints > 0 || c.records > 0)
                .map(|(r, c)| format!("{}={}", r.as_str(), c.datapoints))
                .collect::<Vec<_>>()
                .join(","),
            "Collector stopped: datapoints received, delivered and dropped."
        );
        accounting
    }
}

fn poller_settings(config: &Config) -> PollerSettings {
    PollerSettings {
        agent: match &config.agent_url {
            Some(url) => AgentAddress::Url(url.clone()),
            None => AgentAddress::IpCommand {
                command: config.agent_ip_command.clone(),
                port: config.agent_port,
            },
        },
        auth: config.auth_credential.clone(),
        timeout: Duration::from_secs(config.agent_timeout_secs),
        period: Duration::from_secs(config.agent_poll_period),
        snapshot_topic: config.agent_metrics_topic.clone(),
        metrics: true,
    }
}

fn rate_limits(config: &Config) -> RateLimits {
    RateLimits {
        per_connection_bytes: config.input_limit_amount_kbytes * 1024,
        per_connection_period: Duration::from_secs(config.input_limit_period),
        global_bytes: config.global_limit_amount_kbytes * 1024,
        global_period: Duration::from_secs(config.global_limit_period),
    }
}

/// The sink settings of a configuration.
pub fn kafka_settings(config: &Config) -> KafkaSettings {
    let source = if config.kafka_brokers.is_empty() {
        BrokerSource::Framework {
            name: config.kafka_framework.clone(),
            scheduler_url: config.kafka_scheduler_url.clone(),
            dns_server: config.dns_server,
        }
    } else {
        BrokerSource::Static(config.kafka_brokers.clone())
    };
    KafkaSettings {
        source,
        rediscover: Duration::from_secs(config.kafka_rediscover_secs),
        thresholds: Thresholds {
            max_records: config.kafka_produce_count,
            max_bytes: config.kafka_produce_kbytes * 1024,
            max_age: Duration::from_millis(config.kafka_produce_period_ms),
            max_message_bytes: config.kafka_max_message_bytes,
        },
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
    }
}

/// Binds and runs: the library's whole daemon.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Accounting, StartError> {
    Ok(App::bind(config).await?.run(shutdown).await)
}
