//! The collector's agent poller (the original's `-agent-polling`).
//!
//! Every period it fetches `/state` for enrichment, `/containers` (one
//! MetricList per container, topic = framework_id, datapoints named
//! `dcos.metrics.container.<statistic>`) and `/metrics/snapshot` (topic
//! `agent`, datapoints `dcos.metrics.agent.<key with / as .>`). A record
//! naming a framework or container id the cached state doesn't know forces
//! a refresh of `/state` (see [`crate::enrich`]), at most every
//! [`REFRESH_SPACING`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use schema::MetricList;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use super::client::{AgentClient, AgentError};
use super::mapping::{Naming, map_snapshot};
use crate::backoff::Backoff;
use crate::enrich::{Enrichment, UNKNOWN_AGENT};
use crate::pipeline::Pipeline;
use crate::route::Router;
use crate::shutdown::{Shutdown, Task};
use crate::sources::now_ms;
use crate::stats::Input;

/// The least time between two fetches of `/state`.
pub const REFRESH_SPACING: Duration = Duration::from_secs(5);

/// The containers whose task `now` names and `before` did not.
fn newly_tasked(before: &Enrichment, now: &Enrichment) -> std::collections::HashSet<String> {
    let tasked = |e: &Enrichment, id: &str| {
        e.containers.get(id).is_some_and(|c| {
            c.tags(crate::enrich::Kind::App)
                .iter()
                .any(|(k, _)| k == "task_id")
        })
    };
    now.containers
        .keys()
        .filter(|id| tasked(now, id) && !tasked(before, id))
        .cloned()
        .collect()
}

/// The poller's settings.
#[derive(Debug, Clone)]
pub struct PollerSettings {
    /// The agent, or how to find it.
    pub agent: AgentAddress,
    /// Credential for `Authorization: token=<x>`.
    pub credentials: crate::dcos::Credentials,
    /// Request timeout.
    pub timeout: Duration,
    /// Largest response body read.
    pub max_body_bytes: usize,
    /// Poll period.
    pub period: Duration,
    /// Topic of `/metrics/snapshot` data.
    pub snapshot_topic: String,
    /// Also poll `/containers` and `/metrics/snapshot` (not only `/state`).
    pub metrics: bool,
}

impl From<&crate::config::Config> for PollerSettings {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            agent: match &config.agent_url {
                Some(url) => AgentAddress::Url(url.clone()),
                None => AgentAddress::IpCommand {
                    command: config.agent_ip_command.clone(),
                    port: config.agent_port,
                },
            },
            credentials: crate::dcos::Credentials::from(config),
            timeout: Duration::from_secs(config.agent_timeout_secs),
            max_body_bytes: config.agent_max_body_bytes,
            period: Duration::from_secs(config.agent_poll_period),
            snapshot_topic: config.agent_metrics_topic.clone(),
            metrics: true,
        }
    }
}

/// Where the agent is.
#[derive(Debug, Clone)]
pub enum AgentAddress {
    /// A base URL.
    Url(String),
    /// Run this command for the agent's IP (like `detect_ip`), then use this port.
    IpCommand {
        /// The command line, run with `sh -c`.
        command: String,
        /// The agent port, 5051.
        port: u16,
    },
}

/// Runs `command` with `sh -c` and returns its trimmed output, an IP.
pub async fn detect_ip(command: &str) -> Result<String, String> {
    let output = tokio::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .await
        .map_err(|e| format!("could not run {command:?}: {e}"))?;
    let ip = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() {
        return Err(format!(
            "{command:?} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    if ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("{command:?} printed {ip:?}, not an IP address"));
    }
    Ok(ip)
}

/// Resolves the agent's base URL, retrying with backoff until it works or
/// `shutdown` fires.
pub async fn agent_url(address: &AgentAddress, shutdown: &CancellationToken) -> Option<String> {
    let (command, port) = match address {
        AgentAddress::Url(url) => return Some(url.clone()),
        AgentAddress::IpCommand { command, port } => (command, *port),
    };
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        match detect_ip(command).await {
            Ok(ip) => return Some(format!("http://{ip}:{port}")),
            Err(error) => {
                warn!(%error, "Could not find the agent's IP; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// How long records already polled may still wait for room once shutdown
/// has begun: the TCP inputs' drain time.
const DRAIN: Duration = Duration::from_secs(1);

/// What the poller remembers of `/state` between polls.
#[derive(Debug, Default)]
struct StateClock {
    /// When it last answered.
    last_ok: Option<Instant>,
    /// How many more answers take the series recorded before the agent's
    /// id was known out of the store: two, so that records routed with the
    /// state before are gone too.
    forget_unknown: u8,
}

/// Everything the poller task needs.
pub struct Poller {
    /// Settings.
    pub settings: PollerSettings,
    /// Where the enrichment goes.
    pub enrichment: watch::Sender<Arc<Enrichment>>,
    /// Signalled by inputs that met an unknown framework id.
    pub refresh: Arc<Notify>,
    /// The way into the buffer, shared with the TCP input.
    pub pipeline: Arc<Pipeline>,
}

impl Poller {
    fn failed(&self, what: &str, error: &AgentError) {
        let stats = &self.pipeline.stats;
        stats.agent_request_failures.fetch_add(1, Relaxed);
        if matches!(error, AgentError::TooLarge { .. }) {
            stats.agent_responses_too_large.fetch_add(1, Relaxed);
        }
        match error {
            AgentError::Unauthorized { .. } => {
                tracing::error!(%error, "Agent refused the collector's credential; set auth_credential_file (or auth_credential).")
            }
            _ => warn!(%error, what, "Agent poll failed; retrying next period."),
        }
    }

    /// Pushes polled records through the bounded path; at shutdown, what
    /// still waits for room is counted as dropped.
    async fn push(
        &self,
        router: &mut Router,
        lists: Vec<MetricList>,
        shutdown: &CancellationToken,
    ) {
        if lists.is_empty() {
            return;
        }
        // Once shutdown has begun, what still waits for room after the
        // inputs' drain time is counted as dropped.
        let give_up = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN).await;
        };
        self.pipeline
            .push_owned(router, Input::Agent, lists, give_up)
            .await;
    }

    /// Fetches `/state`. A cached state older than four poll periods expires:
    /// records then get the `UNKNOWN_*` values again rather than stale tags.
    /// Fetches `/state` and publishes what it says; `asked`: because a
    /// record named an id the state in force did not know.
    async fn poll_state(&self, client: &AgentClient, clock: &mut StateClock, asked: bool) {
        self.pipeline.stats.agent_requests.fetch_add(1, Relaxed);
        match client.state().await {
            Ok(state) => {
                clock.last_ok = Some(Instant::now());
                let mut enrichment = Enrichment::from_state(&state);
                if asked {
                    enrichment.keep_asked(&self.enrichment.borrow());
                }
                let tasks_named = newly_tasked(&self.enrichment.borrow(), &enrichment);
                enrichment.node_host = reqwest::Url::parse(client.base())
                    .ok()
                    .and_then(|url| url.host_str().map(str::to_owned));
                let left_out = enrichment.labels_left_out;
                let stats = &self.pipeline.stats;
                let was = (
                    stats
                        .agent_labels_too_long
                        .swap(left_out.too_long as i64, Relaxed),
                    stats
                        .agent_labels_too_many
                        .swap(left_out.too_many as i64, Relaxed),
                );
                if was != (left_out.too_long as i64, left_out.too_many as i64)
                    && (left_out.too_long, left_out.too_many) != (0, 0)
                {
                    warn!(
                        too_long = left_out.too_long,
                        too_many = left_out.too_many,
                        "Agent state: task and executor labels left off the metrics (a key or value over {} bytes, or past {} labels or {} bytes of one container).",
                        crate::enrich::MAX_LABEL_LEN,
                        crate::enrich::MAX_LABELS,
                        crate::enrich::MAX_LABELS_BYTES,
                    );
                }
                if self.enrichment.borrow().agent_id.is_none() {
                    info!(
                        agent_id = enrichment.agent_id.as_deref().unwrap_or("?"),
                        frameworks = enrichment.frameworks.len(),
                        "Agent state received; enrichment is on."
                    );
                    clock.forget_unknown = 2;
                }
                self.enrichment.send_replace(Arc::new(enrichment));
                self.forget_untasked(&tasks_named);
                if clock.forget_unknown > 0 {
                    clock.forget_unknown -= 1;
                    self.forget_unknown_agent();
                }
            }
            Err(error) => {
                self.failed("/state", &error);
                if clock
                    .last_ok
                    .is_some_and(|at| at.elapsed() >= self.settings.period * 4)
                {
                    warn!(
                        "Agent state expired: records get UNKNOWN_* tags until /state answers again."
                    );
                    clock.last_ok = None;
                    let mut pending = Enrichment::pending();
                    pending.node_host = self.enrichment.borrow().node_host.clone();
                    self.enrichment.send_replace(Arc::new(pending));
                }
            }
        }
    }

    /// Spawns the poller; it stops when the shutdown begins.
    pub fn spawn(self, shutdown: &Shutdown) -> Task {
        Task::spawn("agent poller", self.run(shutdown.begun().clone()))
    }

    /// Polls until `shutdown`.
    async fn run(self, shutdown: CancellationToken) {
        let Some(url) = agent_url(&self.settings.agent, &shutdown).await else {
            return;
        };
        let client = match AgentClient::new(
            &url,
            self.settings.credentials.clone(),
            self.settings.timeout,
            self.settings.max_body_bytes,
        ) {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "Agent polling is off: bad agent address.");
                return;
            }
        };
        info!(agent = %url, period = ?self.settings.period, "Polling the Mesos agent.");
        let mut router = Router::default();
        let mut tick = tokio::time::interval(self.settings.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = Instant::now();
        // A refresh asked for sooner than REFRESH_SPACING after the last
        // fetch of `/state` waits until then, rather than being lost.
        let mut refresh_due: Option<Instant> = None;
        let mut clock = StateClock::default();
        let mut containers_seen = std::collections::HashSet::new();
        loop {
            let deferred = async {
                match refresh_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.refresh.notified() => {
                    refresh_due = Some(refresh_due.unwrap_or(last_refresh + REFRESH_SPACING));
                    continue;
                }
                () = deferred => {
                    refresh_due = None;
                    last_refresh = Instant::now();
                    tokio::select! {
                        () = self.poll_state(&client, &mut clock, true) => {}
                        () = shutdown.cancelled() => return,
                    }
                    continue;
                }
            }
            let span = tracing::info_span!("agent poll", agent = %url);
            if !self
                .poll(
                    &client,
                    &mut router,
                    &mut clock,
                    &mut containers_seen,
                    &shutdown,
                )
                .instrument(span)
                .await
            {
                return;
            }
            last_refresh = Instant::now();
            refresh_due = None;
        }
    }

    /// Takes out of the node store the series recorded before the agent's
    /// id was known (tagged `agent_id` [`UNKNOWN_AGENT`]): the same
    /// datapoints now come with the agent's id and their task's metadata,
    /// and would otherwise be served twice until they expire.
    fn forget_unknown_agent(&self) {
        if let Some(store) = &self.pipeline.store {
            let removed = store.remove_where(|key, _| {
                crate::sinks::store::parse_key(key)
                    .1
                    .any(|(k, v)| k == "agent_id" && v == UNKNOWN_AGENT)
            });
            tracing::debug!(
                series = removed,
                "Forgot the series recorded before the agent's state."
            );
        }
    }

    /// Takes out of the node store the series of `containers` (whose task
    /// the agent's state has just named) recorded without their task's
    /// metadata: the same datapoints now come with it, and would otherwise
    /// be served twice until they expire.
    fn forget_untasked(&self, containers: &std::collections::HashSet<String>) {
        if containers.is_empty() {
            return;
        }
        if let Some(store) = &self.pipeline.store {
            let removed = store.remove_where(|key, _| {
                let (_, tags) = crate::sinks::store::parse_key(key);
                let (mut ours, mut tasked) = (false, false);
                for (k, v) in tags {
                    ours |= k == "container_id" && containers.contains(v);
                    tasked |= k == "task_id";
                }
                ours && !tasked
            });
            tracing::debug!(
                containers = containers.len(),
                series = removed,
                "Forgot the series recorded before their task was known."
            );
        }
    }

    /// Forgets, in the node store, the series of the containers the agent
    /// listed last time and no longer lists: a stopped container's series
    /// go at once, not after `store_expiry_secs`.
    fn forget_stopped(
        &self,
        seen: &mut std::collections::HashSet<String>,
        now: std::collections::HashSet<String>,
    ) {
        let gone: std::collections::HashSet<String> = seen.difference(&now).cloned().collect();
        *seen = now;
        if gone.is_empty() {
            return;
        }
        if let Some(store) = &self.pipeline.store {
            let removed = store.remove_where(|key, sample| {
                sample.source != crate::sinks::store::Source::Node
                    && crate::sinks::store::parse_key(key)
                        .1
                        .any(|(k, v)| k == "container_id" && gone.contains(v))
            });
            tracing::debug!(
                containers = gone.len(),
                series = removed,
                "Forgot the series of stopped containers."
            );
        }
    }

    /// One poll: `/state`, then (with `metrics`) `/containers` and
    /// `/metrics/snapshot`. False once shutdown has begun.
    async fn poll(
        &self,
        client: &AgentClient,
        router: &mut Router,
        clock: &mut StateClock,
        containers_seen: &mut std::collections::HashSet<String>,
        shutdown: &CancellationToken,
    ) -> bool {
        tokio::select! {
            () = self.poll_state(client, clock, false) => {}
            () = shutdown.cancelled() => return false,
        }
        if !self.settings.metrics {
            return true;
        }
        self.pipeline.stats.agent_requests.fetch_add(1, Relaxed);
        let naming = Naming {
            topic: None,
            prefix: "dcos.metrics.container.",
        };
        let containers = tokio::select! {
            mapped = client.containers_mapped(naming, now_ms()) => mapped,
            () = shutdown.cancelled() => return false,
        };
        match containers {
            Ok(mapped) => {
                for reason in &mapped.skipped {
                    warn!(reason, "Skipped a /containers entry.");
                }
                let now: std::collections::HashSet<String> = mapped
                    .lists
                    .iter()
                    .filter_map(|l| l.tag("container_id").map(str::to_owned))
                    .collect();
                self.forget_stopped(containers_seen, now);
                self.push(router, mapped.lists, shutdown).await;
            }
            Err(error) => self.failed("/containers", &error),
        }
        self.pipeline.stats.agent_requests.fetch_add(1, Relaxed);
        let snapshot = tokio::select! {
            body = client.snapshot() => body,
            () = shutdown.cancelled() => return false,
        };
        match snapshot {
            Ok(body) => {
                let mapped = map_snapshot(
                    &body,
                    &self.settings.snapshot_topic,
                    "dcos.metrics.agent.",
                    now_ms(),
                );
                drop(body);
                self.push(router, mapped.lists, shutdown).await;
            }
            Err(error) => self.failed("/metrics/snapshot", &error),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detect_ip_checks_its_output() {
        assert_eq!(detect_ip("echo 10.0.0.5").await.unwrap(), "10.0.0.5");
        assert!(detect_ip("echo not-an-ip").await.is_err());
        assert!(detect_ip("exit 3").await.is_err());
    }
}
