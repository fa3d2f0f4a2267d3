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
pub mod enrich;
pub mod ingest;
pub mod mesos;
pub mod net;
pub mod partner;
pub mod pipeline;
pub mod route;
pub mod runtime;
pub mod sample;
pub mod shutdown;
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
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::buffer::Buffer;
use crate::config::Config;
use crate::enrich::Enrichment;
use crate::ingest::RateLimits;
use crate::mesos::poller::{Poller, PollerSettings};
use crate::partner::{PartnerHub, PartnerLimits};
use crate::pipeline::Pipeline;
use crate::route::Routing;
use crate::runtime::Runtime;
use crate::shutdown::{Shutdown, join_by};
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
    #[error(transparent)]
    Bind(#[from] net::BindError),
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
}

impl App {
    /// Validates the configuration and binds every listener (port 0 allowed).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let (ingest, ingest_addr) = net::bind(config.listen_endpoint).await?;
        let (api, api_addr) = net::bind(config.api_listen).await?;
        let (partner, partner_addr) = net::bind(config.partner_listen).await?;
        if !ingest_addr.ip().is_loopback() {
            warn!(%ingest_addr, "The TCP input listens beyond loopback; the original listened on loopback only.");
        }
        let stats = Arc::new(Stats::default());
        let buffer = Arc::new(Buffer::new(
            config.buffer_max_bytes,
            config.buffer_full_policy,
            stats.clone(),
        ));
        let partner_limits = watch::Sender::new(PartnerLimits::from(&config));
        let partner_hub = Arc::new(PartnerHub::new(partner_limits.subscribe(), stats.clone()));
        let runtime = Arc::new(Runtime::new(
            config.clone(),
            watch::Sender::new(Arc::new(Routing::from_config(&config))),
            watch::Sender::new(RateLimits::from(&config)),
            watch::Sender::new(SinkRuntime::from(&config)),
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

    /// Runs until `shutdown` resolves, then shuts down in one order, within
    /// `shutdown_grace_secs` whatever the state of the buffer and the
    /// brokers: stop accepting, let connections finish what they are
    /// sending (a block still waiting for room is counted as a `shutdown`
    /// drop), close the buffer, let the sink drain it and flush the
    /// producer, count anything left as dropped, and stop the API last (it
    /// answers `/health` with 503 "draining" meanwhile). Returns the final
    /// accounting, in which nothing is in flight. A task that panicked is
    /// logged and counted in `task_panics`, and what it held is counted as
    /// `internal_error`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Accounting {
        let config = self.config.clone();
        let stats = self.stats.clone();
        let buffer = self.buffer.clone();
        let api_state = self.api_state();
        let runtime = self.runtime.clone();
        let plan = Arc::new(Shutdown::new(Duration::from_secs(
            config.shutdown_grace_secs,
        )));
        let refresh = Arc::new(tokio::sync::Notify::new());
        let pipeline = Arc::new(Pipeline {
            stats: stats.clone(),
            buffer: buffer.clone(),
            routing: runtime.routing.subscribe(),
            enrichment: self.enrichment.subscribe(),
            refresh: refresh.clone(),
        });
        let shared = Arc::new(ingest::Shared::new(
            pipeline.clone(),
            runtime.rate_limits.subscribe(),
            ingest::IngestSettings::from(&config),
        ));
        let stop_api = tokio_util::sync::CancellationToken::new();
        let draining = self.draining.clone();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(ingest::serve(
            self.ingest,
            shared,
            plan.begun().clone(),
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
                settings: PollerSettings::from(&config),
                enrichment: self.enrichment.clone(),
                refresh,
                pipeline: pipeline.clone(),
            };
            tokio::spawn(poller.run(plan.begun().clone()))
        });
        let sink = if config.kafka {
            let sink = KafkaSink::new(
                KafkaSettings::from(&config),
                stats.clone(),
                buffer.clone(),
                self.broker_state.clone(),
            )
            .with_partners(self.partner_hub.clone())
            .with_runtime(runtime.sink.subscribe())
            .with_shutdown(plan.clone());
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
        let deadline = plan.begin();
        info!(
            grace_secs = config.shutdown_grace_secs,
            "Shutting down: no longer accepting input."
        );
        draining.store(true, Relaxed);
        join_by("input accept", accept, deadline, &stats).await;
        if let Some(poller) = poller {
            join_by("agent poller", poller, deadline, &stats).await;
        }
        connections.close();
        if tokio::time::timeout_at(deadline, connections.wait())
            .await
            .is_err()
        {
            error!("Input connections did not stop within the shutdown grace.");
        }
        buffer.close();
        join_by("sink", sink, deadline, &stats).await;
        stop_api.cancel();
        let last = shutdown::deadline_after(deadline, Duration::from_millis(500))
            .max(tokio::time::Instant::now() + Duration::from_millis(500));
        join_by("api", api_server, last, &stats).await;
        join_by("partner output", partners, last, &stats).await;
        // Every task has stopped: whatever is neither delivered nor dropped
        // now was held by one that panicked or was aborted.
        let lost = stats.count_unaccounted();
        if lost.records > 0 {
            error!(
                records = lost.records,
                datapoints = lost.datapoints,
                "Datapoints held by a failed task are counted as dropped (internal_error)."
            );
        }
        let accounting = stats.accounting();
        let dropped = accounting.dropped_total();
        info!(
            received = accounting.received.datapoints,
            delivered = accounting.delivered.datapoints,
            dropped = dropped.datapoints,
            buffer_high_water_bytes = stats.buffer_high_water_bytes.load(Relaxed),
            task_panics = stats.task_panics.load(Relaxed),
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

/// Binds and runs: the library's whole daemon.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Accounting, StartError> {
    Ok(App::bind(config).await?.run(shutdown).await)
}
