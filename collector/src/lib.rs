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
//! - [`api`]: the HTTP API (endpoints, config, metrics, health).
//! - [`runtime`]: configuration changes while running.
//! - [`partner`]: the partner output.
//! - [`telemetry`]: logging, with a runtime-changeable filter.
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

pub mod api;
pub mod buffer;
pub mod config;
pub mod decode;
pub mod discovery;
pub mod ingest;
pub mod mesos;
pub mod partner;
pub mod route;
pub mod runtime;
pub mod sample;
pub mod sink;
pub mod stats;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
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
use crate::partner::{PartnerHub, PartnerLimits};
use crate::route::Routing;
use crate::runtime::Runtime;
use crate::sink::batch::Thresholds;
use crate::sink::kafka::{BrokerState, KafkaSettings, KafkaSink, SinkRuntime};
use crate::stats::{Accounting, Stats};
use crate::telemetry::LogControl;

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

/// Pending connections the kernel may queue before `accept`. tokio's
/// default is 1024; a thousand module connections arriving at once (every
/// process reconnecting after a restart) overflowed it now and then, and a
/// connection was reset.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let error = |source| StartError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(error)?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// A collector with its listeners bound, ready to run.
pub struct App {
    config: Config,
    stats: Arc<Stats>,
    ingest: TcpListener,
    api: TcpListener,
    partner: TcpListener,
    endpoints: api::Endpoints,
    broker_state: Arc<Mutex<BrokerState>>,
    buffer: Arc<Buffer>,
    runtime: Arc<Runtime>,
    draining: Arc<AtomicBool>,
    enrichment: watch::Sender<Arc<Enrichment>>,
    partner_hub: Arc<PartnerHub>,
    sync: [u8; 16],
}

impl App {
    /// Validates the configuration and binds every listener (port 0 allowed).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let (ingest, ingest_addr) = bind(config.listen_endpoint).await?;
        let (api, api_addr) = bind(config.api_listen).await?;
        let (partner, partner_addr) = bind(config.partner_listen).await?;
        if !ingest_addr.ip().is_loopback() {
            warn!(%ingest_addr, "The TCP input listens beyond loopback; the original listened on loopback only.");
        }
        let stats = Arc::new(Stats::default());
        let buffer = Arc::new(Buffer::new(
            config.buffer_max_bytes,
            config.buffer_full_policy,
            stats.clone(),
        ));
        let partner_limits = watch::Sender::new(partner_limits(&config));
        let sync: [u8; 16] = rand::random();
        let partner_hub = Arc::new(PartnerHub::new(
            sync,
            partner_limits.subscribe(),
            stats.clone(),
        ));
        let runtime = Arc::new(Runtime::new(
            config.clone(),
            watch::Sender::new(Arc::new(Routing::from_config(&config))),
            watch::Sender::new(rate_limits(&config)),
            watch::Sender::new(sink_runtime(&config)),
            partner_limits,
            buffer.clone(),
            stats.clone(),
        ));
        let enrichment = watch::Sender::new(Arc::new(if config.agent_polling {
            Enrichment::pending()
        } else {
            Enrichment::default()
        }));
        Ok(Self {
            endpoints: api::Endpoints {
                ingest: ingest_addr,
                api: api_addr,
                partner: partner_addr,
            },
            stats,
            ingest,
            api,
            partner,
            broker_state: Arc::default(),
            buffer,
            runtime,
            draining: Arc::new(AtomicBool::new(false)),
            enrichment,
            partner_hub,
            sync,
            config,
        })
    }

    /// Lets `PATCH /v1/config` change the global log filter.
    pub fn with_log_control(self, log: LogControl) -> Self {
        self.runtime.set_log_control(log);
        self
    }

    /// The API's shared state, for testing its router with `oneshot`.
    pub fn api_state(&self) -> api::ApiState {
        api::ApiState {
            runtime: self.runtime.clone(),
            stats: self.stats.clone(),
            brokers: self.broker_state.clone(),
            endpoints: self.endpoints,
            draining: self.draining.clone(),
            partners: self.partner_hub.clone(),
        }
    }

    /// The TCP input's bound address.
    pub fn ingest_addr(&self) -> SocketAddr {
        self.endpoints.ingest
    }

    /// The HTTP API's bound address.
    pub fn api_addr(&self) -> SocketAddr {
        self.endpoints.api
    }

    /// The partner output's bound address.
    pub fn partner_addr(&self) -> SocketAddr {
        self.endpoints.partner
    }

    /// The counters, readable while the collector runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The broker state, readable while the collector runs.
    pub fn broker_state(&self) -> Arc<Mutex<BrokerState>> {
        self.broker_state.clone()
    }

    /// Runs until `shutdown` resolves, then shuts down in order: stop
    /// accepting, let connections finish the frames in flight, close the
    /// buffer, let the sink drain it and flush the producer within the
    /// grace, count anything left as dropped, and stop the API last (it
    /// answers `/health` with 503 "draining" meanwhile). Returns the final
    /// accounting, in which nothing is in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Accounting {
        let config = self.config.clone();
        let stats = self.stats.clone();
        let buffer = self.buffer.clone();
        let api_state = self.api_state();
        let runtime = self.runtime.clone();
        let refresh = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(ingest::Shared::new(
            stats.clone(),
            buffer.clone(),
            runtime.routing.subscribe(),
            self.enrichment.subscribe(),
            refresh.clone(),
            runtime.rate_limits.subscribe(),
            schema::Limits {
                max_block_bytes: config.max_block_bytes,
                ..schema::Limits::default()
            },
            (config.idle_timeout_secs > 0).then(|| Duration::from_secs(config.idle_timeout_secs)),
        ));
        let stop_accepting = CancellationToken::new();
        let stop_api = CancellationToken::new();
        let draining = self.draining.clone();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(ingest::serve(
            self.ingest,
            shared,
            config.max_connections,
            stop_accepting.clone(),
            connections.clone(),
        ));
        let partners = tokio::spawn(partner::serve(
            self.partner,
            self.partner_hub.clone(),
            stop_api.clone(),
        ));
        let api_server = {
            let stop_api = stop_api.clone();
            let app = api::router(api_state);
            let listener = self.api;
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop_api.cancelled_owned())
                    .await;
            })
        };
        let poller = config.agent_polling.then(|| {
            let poller = Poller {
                settings: poller_settings(&config),
                stats: stats.clone(),
                poller_stats: Arc::new(PollerStats::default()),
                enrichment: self.enrichment.clone(),
                refresh,
                buffer: buffer.clone(),
                routing: runtime.routing.subscribe(),
            };
            tokio::spawn(poller.run(stop_accepting.clone()))
        });
        let sink = if config.kafka {
            let mut settings = kafka_settings(&config);
            settings.sync = self.sync;
            let sink = KafkaSink::new(
                settings,
                stats.clone(),
                buffer.clone(),
                self.broker_state.clone(),
            )
            .with_partners(self.partner_hub.clone())
            .with_runtime(runtime.sink.subscribe());
            tokio::spawn(sink.run())
        } else {
            tokio::spawn(sink::run_null(buffer.clone(), stats.clone()))
        };
        info!(
            input = %self.endpoints.ingest,
            api = %self.endpoints.api,
            partner = %self.endpoints.partner,
            sink = if config.kafka { "kafka" } else { "null" },
            "Collector started."
        );

        shutdown.await;
        info!("Shutting down: no longer accepting input.");
        draining.store(true, Relaxed);
        stop_accepting.cancel();
        let _ = accept.await;
        if let Some(poller) = poller {
            let _ = poller.await;
        }
        connections.close();
        connections.wait().await;
        buffer.close();
        let _ = sink.await;
        stop_api.cancel();
        let _ = api_server.await;
        let _ = partners.await;
        let accounting = stats.accounting();
        let dropped = accounting.dropped_total();
        info!(
            received = accounting.received.datapoints,
            delivered = accounting.delivered.datapoints,
            dropped = dropped.datapoints,
            buffer_high_water_bytes = stats.buffer_bytes_max.load(Relaxed),
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

pub(crate) fn rate_limits(config: &Config) -> RateLimits {
    RateLimits {
        per_connection_bytes: config.input_limit_amount_kbytes * 1024,
        per_connection_period: Duration::from_secs(config.input_limit_period),
        global_bytes: config.global_limit_amount_kbytes * 1024,
        global_period: Duration::from_secs(config.global_limit_period),
    }
}

pub(crate) fn partner_limits(config: &Config) -> PartnerLimits {
    PartnerLimits {
        buffer_bytes: config.partner_buffer_kbytes * 1024,
        disconnect_after_dropped_bytes: config.partner_disconnect_after_dropped_kbytes * 1024,
    }
}

fn broker_source(config: &Config) -> BrokerSource {
    if config.kafka_brokers.is_empty() {
        BrokerSource::Framework {
            name: config.kafka_framework.clone(),
            scheduler_url: config.kafka_scheduler_url.clone(),
            dns_server: config.dns_server,
        }
    } else {
        BrokerSource::Static(config.kafka_brokers.clone())
    }
}

fn thresholds(config: &Config) -> Thresholds {
    Thresholds {
        max_records: config.kafka_produce_count,
        max_bytes: config.kafka_produce_kbytes * 1024,
        max_age: Duration::from_millis(config.kafka_produce_period_ms),
        max_message_bytes: config.kafka_max_message_bytes,
    }
}

pub(crate) fn sink_runtime(config: &Config) -> SinkRuntime {
    SinkRuntime {
        thresholds: thresholds(config),
        source: broker_source(config),
    }
}

/// The sink settings of a configuration.
pub fn kafka_settings(config: &Config) -> KafkaSettings {
    KafkaSettings {
        source: broker_source(config),
        rediscover: Duration::from_secs(config.kafka_rediscover_secs),
        thresholds: thresholds(config),
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
        sync: rand::random(),
    }
}

/// Binds and runs: the library's whole daemon.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Accounting, StartError> {
    Ok(App::bind(config).await?.run(shutdown).await)
}
