//! The metrics collector: a per-node agent for Mesos / DC/OS clusters.
//!
//! It takes Avro OCF metrics over TCP from the mesos-agent module and other
//! local processes, routes and tags them, and forwards them to Kafka, finding
//! the brokers through the Kafka framework's scheduler.
//!
//! # Layout
//!
//! The folders follow the data's path: [`sources`] → [`pipeline`]
//! ([`route`], [`enrich`], [`memory`]) → [`buffer`] (and [`spool`]) →
//! [`sinks`]; [`api`] serves what the sinks keep and takes changes.
//!
//! - [`sources`]: the inputs. `tcp` (the Avro OCF listener, one task per
//!   connection), `agent` (the Mesos agent's client, the JSON-to-MetricList
//!   mapping, the poller), `node` (the node's own metrics).
//! - [`pipeline`]: the bounded path every source's records take into the
//!   buffer: a memory reservation, routing, the counts, the store.
//! - [`route`]: topic, key and tags for each record; [`enrich`]: the tags
//!   the agent's `/state` gives (agent, framework, task metadata).
//! - [`memory`]: the memory budget `buffer_max_bytes` bounds, and its leases.
//! - [`buffer`]: the bounded buffer between sources and sinks, with its full
//!   policy; [`spool`]: the disk spool behind it (`buffer_type = disk`).
//! - [`sinks`]: the outputs. `kafka` (batching, producing, delivery
//!   accounting), the null sink (`kafka = false`), `partner` (the partner
//!   output), `store` (the node store: the latest value of every series,
//!   and its Prometheus text).
//! - [`api`]: the HTTP API (endpoints, config, metrics, health), the
//!   Prometheus listener and the DC/OS v0 metrics API.
//! - [`config`]: every option as flag, env var and TOML key; validation;
//!   [`runtime`]: configuration changes while running.
//! - [`discovery`]: broker discovery through Mesos-DNS and the Kafka
//!   scheduler; [`dcos`]: DC/OS's authenticated HTTPS (a CA file, a service
//!   account token), for the scheduler and the agent.
//! - [`stats`]: every counter, and the accounting identity.
//! - [`backoff`], [`net`], [`shutdown`], [`telemetry`]: retry back-off,
//!   listeners, the shutdown order, logging.
//! - [`sample`]: the sample-producer (`sample-producer` binary); [`decode`]:
//!   the `collector decode` tool.
//!
//! # Lifecycle
//!
//! [`App::bind`] binds every listener (port 0 allowed) and reports the
//! addresses; [`App::run`] spawns each subsystem and runs until the shutdown
//! future resolves; then [`shutdown`] stops them in its fixed order, within
//! the grace: inputs, the sink draining the buffer, the API and partners
//! last, and anything left counted as dropped.

pub mod api;
pub mod backoff;
pub mod buffer;
pub mod config;
pub mod dcos;
pub mod decode;
pub mod discovery;
pub mod enrich;
pub mod http;
pub mod memory;
pub mod net;
pub mod pipeline;
pub mod resident;
pub mod route;
pub mod runtime;
pub mod sample;
pub mod shutdown;
pub mod sinks;
pub mod sources;
pub mod spool;
pub mod stats;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::buffer::Buffer;
use crate::config::Config;
use crate::enrich::Enrichment;
use crate::pipeline::Pipeline;
use crate::route::Routing;
use crate::runtime::Runtime;
use crate::shutdown::{Shutdown, Tasks};
use crate::sinks::kafka::{BrokerState, KafkaSettings, KafkaSink, SinkRuntime};
use crate::sinks::partner::{PartnerHub, PartnerLimits};
use crate::sources::agent::poller::{Poller, PollerSettings};
use crate::sources::tcp::RateLimits;
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
    /// A unix socket could not be bound.
    #[error(transparent)]
    BindUnix(#[from] net::UnixBindError),
}

/// An HTTP listener on TCP or a unix socket (the v0 API, the statsd
/// registration API).
enum HttpListener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A collector with its listeners bound, ready to run.
pub struct App {
    config: Config,
    stats: Arc<Stats>,
    ingest: TcpListener,
    api: TcpListener,
    partner: TcpListener,
    prometheus: Option<TcpListener>,
    metrics_api: Option<HttpListener>,
    statsd: Option<std::net::UdpSocket>,
    /// Every statsd listener's settings (one budget for all).
    statsd_settings: sources::statsd::listener::StatsdSettings,
    /// The statsd registration API, and the containers restored at start.
    statsd_control: Option<(HttpListener, Vec<sources::statsd::registry::Restored>)>,
    store: Option<Arc<sinks::store::Store>>,
    endpoints: api::Endpoints,
    broker_state: Arc<Mutex<BrokerState>>,
    buffer: Arc<Buffer>,
    runtime: Arc<Runtime>,
    shutdown: Arc<Shutdown>,
    enrichment: watch::Sender<Arc<Enrichment>>,
    partner_hub: Arc<PartnerHub>,
    /// The connections each listener may hold.
    descriptors: net::Descriptors,
}

impl App {
    /// Validates the configuration and binds every listener (port 0 allowed).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let descriptors = net::fit_descriptors(
            config.max_connections,
            config.max_partners,
            usize::from(config.prometheus_listen.is_on())
                + usize::from(config.metrics_api_listen.is_on())
                + usize::from(config.statsd_control_listen.is_on()),
            if config.statsd_control_listen.is_on() {
                config.statsd_max_containers
            } else {
                0
            },
        );
        let (ingest, ingest_addr) = net::bind(config.listen_endpoint).await?;
        let (api, api_addr) = net::bind(config.api_listen).await?;
        let (partner, partner_addr) = net::bind(config.partner_listen).await?;
        let (prometheus, prometheus_addr) = match &config.prometheus_listen {
            config::Listen::Tcp(addr) => {
                let (listener, addr) = net::bind(*addr).await?;
                (Some(listener), Some(addr))
            }
            _ => (None, None),
        };
        let (metrics_api, metrics_api_addr) = match &config.metrics_api_listen {
            config::Listen::Tcp(addr) => {
                let (listener, addr) = net::bind(*addr).await?;
                (Some(HttpListener::Tcp(listener)), Some(addr.to_string()))
            }
            config::Listen::Unix(path) => (
                Some(HttpListener::Unix(
                    net::bind_unix(
                        path,
                        config
                            .metrics_api_socket_group
                            .as_deref()
                            .map(|name| net::SocketGroup {
                                option: "metrics_api_socket_group",
                                name,
                            }),
                    )
                    .await?,
                )),
                Some(format!("unix:{}", path.display())),
            ),
            config::Listen::Off => (None, None),
        };
        let (statsd, statsd_addr) = match &config.statsd_listen {
            config::Listen::Tcp(addr) => {
                let (socket, addr) =
                    sources::statsd::listener::bind(*addr).map_err(|source| net::BindError {
                        addr: *addr,
                        source,
                    })?;
                (Some(socket), Some(addr))
            }
            _ => (None, None),
        };
        let statsd_settings = sources::statsd::listener::StatsdSettings::new(&config);
        let (statsd_control, statsd_control_addr) = match &config.statsd_control_listen {
            config::Listen::Tcp(addr) => {
                let (listener, addr) = net::bind(*addr).await?;
                (Some(HttpListener::Tcp(listener)), Some(addr.to_string()))
            }
            config::Listen::Unix(path) => (
                Some(HttpListener::Unix(net::bind_unix(path, None).await?)),
                Some(format!("unix:{}", path.display())),
            ),
            config::Listen::Off => (None, None),
        };
        net::warn_unused_passed_sockets();
        // The registered containers bound again, before anything runs.
        let statsd_control = match statsd_control {
            Some(listener) => Some((
                listener,
                sources::statsd::registry::restore(
                    &sources::statsd::registry::RegistrySettings::new(
                        &config,
                        statsd_settings.clone(),
                    ),
                )
                .await?,
            )),
            None => None,
        };
        if !ingest_addr.ip().is_loopback() {
            warn!(%ingest_addr, "The TCP input listens beyond loopback; the original listened on loopback only.");
        }
        let stats = Arc::new(Stats::default());
        let store = config
            .store_settings()
            .map(|settings| Arc::new(sinks::store::Store::new(settings, stats.clone())));
        let mut buffer = Buffer::new(
            config.buffer_max_bytes,
            config.buffer_full_policy,
            stats.clone(),
        );
        if let Some(settings) = spool::SpoolSettings::from_config(&config) {
            buffer = buffer.with_spool(spool::Spool::open(settings, stats.clone()));
        }
        let buffer = Arc::new(buffer);
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
                prometheus: prometheus_addr,
                metrics_api: metrics_api_addr,
                statsd: statsd_addr,
                statsd_control: statsd_control_addr,
            },
            stats,
            ingest,
            api,
            partner,
            prometheus,
            metrics_api,
            statsd,
            statsd_settings,
            statsd_control,
            store,
            broker_state: Arc::default(),
            buffer,
            runtime,
            shutdown: Arc::new(Shutdown::new(Duration::from_secs(
                config.shutdown_grace_secs,
            ))),
            enrichment,
            partner_hub,
            descriptors,
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
            endpoints: self.endpoints.clone(),
            shutdown: self.shutdown.clone(),
            partners: self.partner_hub.clone(),
            spool: self.buffer.spool().cloned(),
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

    /// The Prometheus listener's bound address, when it listens.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.endpoints.prometheus
    }

    /// The v0 metrics API's address (`IP:PORT` or `unix:PATH`), when on.
    pub fn metrics_api_addr(&self) -> Option<String> {
        self.endpoints.metrics_api.clone()
    }

    /// The node-wide statsd listener's bound address, when it listens.
    pub fn statsd_addr(&self) -> Option<SocketAddr> {
        self.endpoints.statsd
    }

    /// The statsd registration API's address (`IP:PORT` or `unix:PATH`),
    /// when on.
    pub fn statsd_control_addr(&self) -> Option<String> {
        self.endpoints.statsd_control.clone()
    }

    /// The counters, readable while the collector runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The broker state, readable while the collector runs.
    pub fn broker_state(&self) -> Arc<Mutex<BrokerState>> {
        self.broker_state.clone()
    }

    /// The collector's shutdown, begun when [`App::run`]'s future resolves.
    pub fn shutdown(&self) -> Arc<Shutdown> {
        self.shutdown.clone()
    }

    /// Runs until `shutdown` resolves, then shuts down in the order
    /// [`shutdown`](mod@shutdown) owns, within `shutdown_grace_secs`
    /// whatever the state of the buffer and the brokers. Returns the final
    /// accounting, in which nothing is in flight.
    /// The settings in force, for reloads (SIGHUP) from outside.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Accounting {
        let config = &self.config;
        let plan = self.shutdown.clone();
        let api_state = self.api_state();
        let refresh = Arc::new(tokio::sync::Notify::new());
        let pipeline = Arc::new(Pipeline {
            stats: self.stats.clone(),
            buffer: self.buffer.clone(),
            routing: self.runtime.routing.subscribe(),
            enrichment: self.enrichment.subscribe(),
            refresh: refresh.clone(),
            store: self.store.clone(),
        });
        let mut inputs = vec![sources::tcp::spawn(
            self.ingest,
            Arc::new(sources::tcp::Shared::new(
                pipeline.clone(),
                self.runtime.rate_limits.subscribe(),
                sources::tcp::IngestSettings {
                    max_connections: self.descriptors.input,
                    ..sources::tcp::IngestSettings::from(config)
                },
            )),
            &plan,
        )];
        if config.node_metrics {
            inputs.push(
                sources::node::NodeSource {
                    settings: sources::node::NodeSettings::from(config),
                    pipeline: pipeline.clone(),
                }
                .spawn(&plan),
            );
        }
        if let Some(socket) = self.statsd {
            inputs.push(
                sources::statsd::listener::StatsdListener {
                    socket,
                    destination: sources::statsd::listener::Destination::Fixed {
                        topic: sources::statsd::listener::NODE_TOPIC.into(),
                        tags: Vec::new(),
                    },
                    settings: self.statsd_settings.clone(),
                    limit: None,
                    pipeline: pipeline.clone(),
                }
                .spawn(&plan),
            );
        }
        // The registration API answers until the outputs stop (204 once
        // the inputs stopped), so that no launch meets a closed socket while
        // the collector drains.
        let mut statsd_control = None;
        if let Some((listener, restored)) = self.statsd_control {
            let registry = sources::statsd::registry::Registry::new(
                sources::statsd::registry::RegistrySettings::new(
                    config,
                    self.statsd_settings.clone(),
                ),
                pipeline.clone(),
                plan.begun().clone(),
                restored,
            );
            inputs.push(shutdown::Task::spawn(
                "statsd containers",
                registry.clone().run(),
            ));
            let router = sources::statsd::control::router(registry);
            let (stop, stats) = (plan.outputs().clone(), self.stats.clone());
            let max = self.descriptors.statsd_control;
            statsd_control = Some(shutdown::Task::spawn("statsd control", async move {
                match listener {
                    HttpListener::Tcp(l) => {
                        api::serve(l, router, max, api::AtLimit::Wait, stop, stats).await
                    }
                    HttpListener::Unix(l) => {
                        api::serve(l, router, max, api::AtLimit::Wait, stop, stats).await
                    }
                }
            }));
        }
        if config.agent_polling {
            let poller = Poller {
                settings: PollerSettings::from(config),
                enrichment: self.enrichment.clone(),
                refresh,
                pipeline,
            };
            inputs.push(poller.spawn(&plan));
        }
        let sink = if config.kafka {
            KafkaSink::new(
                KafkaSettings::from(config),
                self.stats.clone(),
                self.buffer.clone(),
                self.broker_state.clone(),
            )
            .with_partners(self.partner_hub.clone())
            .with_runtime(self.runtime.sink.subscribe())
            .spawn(&plan)
        } else {
            sinks::spawn_null(self.buffer.clone(), self.stats.clone())
        };
        let mut outputs = vec![
            api::spawn(self.api, api_state, self.descriptors.api),
            sinks::partner::spawn(self.partner, self.partner_hub.clone(), &plan),
        ];
        outputs.extend(statsd_control);
        if let (Some(listener), Some(store)) = (self.metrics_api, &self.store) {
            let state = api::v0::V0State {
                store: store.clone(),
                enrichment: self.enrichment.subscribe(),
                cluster_id: config.cluster_id.clone().or_else(|| {
                    std::fs::read_to_string("/var/lib/dcos/cluster-id")
                        .ok()
                        .map(|id| id.trim().to_owned())
                        .filter(|id| !id.is_empty())
                }),
                turns: Arc::new(tokio::sync::Semaphore::new(
                    sinks::store::limits::MAX_ANSWERS,
                )),
            };
            let router = api::v0::router(state);
            let (stop, stats) = (plan.outputs().clone(), self.stats.clone());
            let max = self.descriptors.api;
            outputs.push(shutdown::Task::spawn("metrics api", async move {
                match listener {
                    HttpListener::Tcp(l) => {
                        api::serve(l, router, max, api::AtLimit::Close, stop, stats).await
                    }
                    HttpListener::Unix(l) => {
                        api::serve(l, router, max, api::AtLimit::Close, stop, stats).await
                    }
                }
            }));
        }
        if let (Some(listener), Some(store)) = (self.prometheus, &self.store) {
            outputs.push(api::prometheus::spawn(
                listener,
                api::prometheus::PrometheusState::new(
                    store.clone(),
                    self.stats.clone(),
                    self.broker_state.clone(),
                ),
                self.descriptors.api,
                plan.outputs().clone(),
            ));
        }
        // The store forgets expired series whichever output reads it.
        if let Some(store) = &self.store {
            outputs.push(shutdown::Task::spawn(
                "store",
                store.clone().run_janitor(plan.outputs().clone()),
            ));
        }
        if let Some(spool) = self.buffer.spool() {
            outputs.push(shutdown::Task::spawn(
                "spool",
                spool.clone().run_syncer(plan.outputs().clone()),
            ));
        }
        info!(
            input = %self.endpoints.ingest,
            api = %self.endpoints.api,
            partner = %self.endpoints.partner,
            prometheus = self.endpoints.prometheus.map(|a| a.to_string()).unwrap_or_default(),
            metrics_api = self.endpoints.metrics_api.clone().unwrap_or_default(),
            statsd = self.endpoints.statsd.map(|a| a.to_string()).unwrap_or_default(),
            statsd_control = self.endpoints.statsd_control.clone().unwrap_or_default(),
            sink = if config.kafka { "kafka" } else { "null" },
            buffer = if self.buffer.spool().is_some() { "disk" } else { "memory" },
            "Collector started."
        );

        shutdown.await;
        let tasks = Tasks {
            inputs,
            sink,
            outputs,
        };
        plan.run(tasks, &self.buffer, &self.stats).await
    }
}

/// Binds and runs: the library's whole daemon.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Accounting, StartError> {
    Ok(App::bind(config).await?.run(shutdown).await)
}
