//! The collector's agent poller (the original's `-agent-polling`).
//!
//! Every period it fetches `/state` for enrichment, `/containers` (one
//! MetricList per container, topic = framework_id, datapoints named
//! `dcos.metrics.container.<statistic>`) and `/metrics/snapshot` (topic
//! `agent`, datapoints `dcos.metrics.agent.<key with / as .>`). A record
//! naming a framework id the cached state doesn't know forces a refresh,
//! at most every few seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schema::{MetricList, Tag};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::{AgentClient, AgentError};
use super::mapping::{Naming, map_entries, map_snapshot};
use crate::buffer::Buffer;
use crate::discovery::Backoff;
use crate::route::{Router, Routing};
use crate::stats::Stats;

/// The original's value before the first `/state` arrives.
pub const UNKNOWN_AGENT: &str = "UNKNOWN_AGENT_STATE";
/// The original's value for a framework id `/state` doesn't list.
pub const UNKNOWN_FRAMEWORK: &str = "UNKNOWN_FRAMEWORK_ID";

/// What `/state` tells about the records' sources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Enrichment {
    /// Whether enrichment is on at all (agent polling enabled).
    pub enabled: bool,
    /// `state.id`.
    pub agent_id: Option<String>,
    /// framework id → name.
    pub frameworks: HashMap<String, String>,
    /// executor id → application name (label `MARATHON_APP_ID` or
    /// `DCOS_SPACE`, leading `/` trimmed).
    pub applications: HashMap<String, String>,
}

impl Enrichment {
    /// Enrichment turned on, before any `/state` arrived.
    pub fn pending() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    /// Reads a `/state` body; tolerant of missing parts.
    pub fn from_state(state: &Value) -> Self {
        let mut enrichment = Self::pending();
        enrichment.agent_id = state.get("id").and_then(Value::as_str).map(str::to_owned);
        for framework in state
            .get("frameworks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(name)) = (
                framework.get("id").and_then(Value::as_str),
                framework.get("name").and_then(Value::as_str),
            ) else {
                continue;
            };
            enrichment.frameworks.insert(id.to_owned(), name.to_owned());
            for executor in framework
                .get("executors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(executor_id) = executor.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let labels = executor
                    .get("labels")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten();
                let app = labels
                    .filter_map(|l| Some((l.get("key")?.as_str()?, l.get("value")?.as_str()?)))
                    .filter(|(k, _)| *k == "MARATHON_APP_ID" || *k == "DCOS_SPACE")
                    .min_by_key(|(k, _)| *k != "MARATHON_APP_ID")
                    .map(|(_, v)| v.trim_start_matches('/').to_owned());
                if let Some(app) = app {
                    enrichment.applications.insert(executor_id.to_owned(), app);
                }
            }
        }
        enrichment
    }

    /// The tags to add to `record` (added only where absent), and whether its
    /// framework id is unknown to the cached state.
    pub fn tags_for(&self, record: &MetricList) -> (Vec<Tag>, bool) {
        let (extra, unknown) = self.tags_for_lookup(|key| record.tag(key));
        (
            extra
                .as_slice()
                .iter()
                .map(|(k, v)| Tag::new(*k, *v))
                .collect(),
            unknown,
        )
    }

    /// [`tags_for`](Self::tags_for) for a record known only by a tag
    /// lookup, without allocating: the tags borrow from `self`.
    pub fn tags_for_lookup<'r>(
        &self,
        tag: impl Fn(&str) -> Option<&'r str>,
    ) -> (crate::route::ExtraTags<'_>, bool) {
        let mut extra = crate::route::ExtraTags::default();
        if !self.enabled {
            return (extra, false);
        }
        extra.push(
            "agent_id",
            self.agent_id.as_deref().unwrap_or(UNKNOWN_AGENT),
        );
        let mut unknown = false;
        if let Some(framework_id) = tag("framework_id") {
            match self.frameworks.get(framework_id) {
                Some(name) => extra.push("framework_name", name),
                None => {
                    unknown = self.agent_id.is_some();
                    extra.push("framework_name", UNKNOWN_FRAMEWORK);
                }
            }
        }
        if let Some(app) = tag("executor_id").and_then(|e| self.applications.get(e)) {
            extra.push("application_name", app);
        }
        (extra, unknown)
    }
}

/// The poller's settings.
#[derive(Debug, Clone)]
pub struct PollerSettings {
    /// The agent, or how to find it.
    pub agent: AgentAddress,
    /// Credential for `Authorization: token=<x>`.
    pub auth: Option<String>,
    /// Request timeout.
    pub timeout: Duration,
    /// Poll period.
    pub period: Duration,
    /// Topic of `/metrics/snapshot` data.
    pub snapshot_topic: String,
    /// Also poll `/containers` and `/metrics/snapshot` (not only `/state`).
    pub metrics: bool,
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

/// Counters of the poller.
#[derive(Debug, Default)]
pub struct PollerStats {
    /// Requests made.
    pub queries: AtomicU64,
    /// Requests that failed.
    pub query_failures: AtomicU64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Everything the poller task needs.
pub struct Poller {
    /// Settings.
    pub settings: PollerSettings,
    /// Collector counters.
    pub stats: Arc<Stats>,
    /// Poller counters.
    pub poller_stats: Arc<PollerStats>,
    /// Where the enrichment goes.
    pub enrichment: watch::Sender<Arc<Enrichment>>,
    /// Signalled by inputs that met an unknown framework id.
    pub refresh: Arc<Notify>,
    /// Where polled records go.
    pub buffer: Arc<Buffer>,
    /// Routing settings in force.
    pub routing: watch::Receiver<Arc<Routing>>,
}

impl Poller {
    fn failed(&self, what: &str, error: &AgentError) {
        self.poller_stats.query_failures.fetch_add(1, Relaxed);
        match error {
            AgentError::Unauthorized { .. } => {
                tracing::error!(%error, "Agent refused the collector's credential; set auth_credential.")
            }
            _ => warn!(%error, what, "Agent poll failed; retrying next period."),
        }
    }

    async fn push(&self, router: &mut Router, lists: Vec<MetricList>) {
        if lists.is_empty() {
            return;
        }
        let routing = self.routing.borrow().clone();
        let enrichment = self.enrichment.borrow().clone();
        let (records, datapoints) = (
            lists.len() as u64,
            lists.iter().map(|l| l.datapoints.len() as u64).sum(),
        );
        self.stats
            .count_received(crate::stats::Input::Agent, records, datapoints);
        let prepared = lists
            .into_iter()
            .map(|list| {
                let (tags, _) = enrichment.tags_for(&list);
                router.prepare(&routing, &tags, list).0
            })
            .collect::<Vec<_>>();
        let records = crate::route::encode_all(prepared);
        crate::ingest::count_topics(&self.stats, &records.items);
        self.buffer.push(records).await;
    }

    /// Fetches `/state`. A cached state older than four poll periods expires:
    /// records then get the `UNKNOWN_*` values again rather than stale tags.
    async fn poll_state(&self, client: &AgentClient, last_ok: &mut Option<Instant>) {
        self.poller_stats.queries.fetch_add(1, Relaxed);
        match client.state().await {
            Ok(state) => {
                *last_ok = Some(Instant::now());
                let enrichment = Enrichment::from_state(&state);
                if self.enrichment.borrow().agent_id.is_none() {
                    info!(
                        agent_id = enrichment.agent_id.as_deref().unwrap_or("?"),
                        frameworks = enrichment.frameworks.len(),
                        "Agent state received; enrichment is on."
                    );
                }
                self.enrichment.send_replace(Arc::new(enrichment));
            }
            Err(error) => {
                self.failed("/state", &error);
                if last_ok.is_some_and(|at| at.elapsed() >= self.settings.period * 4) {
                    warn!(
                        "Agent state expired: records get UNKNOWN_* tags until /state answers again."
                    );
                    *last_ok = None;
                    self.enrichment
                        .send_replace(Arc::new(Enrichment::pending()));
                }
            }
        }
    }

    /// Polls until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(url) = agent_url(&self.settings.agent, &shutdown).await else {
            return;
        };
        let client = match AgentClient::new(&url, self.settings.auth.clone(), self.settings.timeout)
        {
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
        let mut last_ok: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.refresh.notified() => {
                    if last_refresh.elapsed() >= Duration::from_secs(5) {
                        last_refresh = Instant::now();
                        self.poll_state(&client, &mut last_ok).await;
                    }
                    continue;
                }
            }
            self.poll_state(&client, &mut last_ok).await;
            last_refresh = Instant::now();
            if !self.settings.metrics {
                continue;
            }
            self.poller_stats.queries.fetch_add(1, Relaxed);
            match client.containers().await {
                Ok(body) => {
                    let mapped = map_entries(
                        &body,
                        Naming {
                            topic: None,
                            prefix: "dcos.metrics.container.",
                        },
                        now_ms(),
                    );
                    for reason in &mapped.skipped {
                        warn!(reason, "Skipped a /containers entry.");
                    }
                    self.push(&mut router, mapped.lists).await;
                }
                Err(error) => self.failed("/containers", &error),
            }
            self.poller_stats.queries.fetch_add(1, Relaxed);
            match client.snapshot().await {
                Ok(body) => {
                    let mapped = map_snapshot(
                        &body,
                        &self.settings.snapshot_topic,
                        "dcos.metrics.agent.",
                        now_ms(),
                    );
                    self.push(&mut router, mapped.lists).await;
                }
                Err(error) => self.failed("/metrics/snapshot", &error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_state_enriches_with_names_and_apps() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos/mesos-agent-state-response.json");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let enrichment = Enrichment::from_state(&state);
        let framework_id = "8b4e6d80-0271-4be0-9f08-0aeff7f0d751-0002";
        let record = MetricList {
            tags: vec![Tag::new("framework_id", framework_id)],
            ..MetricList::default()
        };
        let (tags, unknown) = enrichment.tags_for(&record);
        assert!(!unknown);
        assert!(tags.contains(&Tag::new("framework_name", "kafka")));
        assert_eq!(tags[0].key, "agent_id");
        assert_ne!(tags[0].value, UNKNOWN_AGENT);
        let (_, executor) = enrichment
            .applications
            .iter()
            .find(|(e, _)| e.starts_with("metrics-collector"))
            .unwrap();
        assert_eq!(
            executor, "metrics-collector",
            "DCOS_SPACE with its leading / trimmed"
        );
        let stranger = MetricList {
            tags: vec![Tag::new("framework_id", "nope")],
            ..MetricList::default()
        };
        let (tags, unknown) = enrichment.tags_for(&stranger);
        assert!(unknown);
        assert!(tags.contains(&Tag::new("framework_name", UNKNOWN_FRAMEWORK)));
    }

    #[test]
    fn before_any_state_the_original_unknown_values() {
        let record = MetricList {
            tags: vec![Tag::new("framework_id", "f")],
            ..MetricList::default()
        };
        let (tags, unknown) = Enrichment::pending().tags_for(&record);
        assert!(!unknown, "no refresh storm before the first state");
        assert_eq!(
            tags,
            vec![
                Tag::new("agent_id", UNKNOWN_AGENT),
                Tag::new("framework_name", UNKNOWN_FRAMEWORK)
            ]
        );
        assert!(
            Enrichment::default().tags_for(&record).0.is_empty(),
            "disabled: nothing added"
        );
    }

    #[tokio::test]
    async fn detect_ip_checks_its_output() {
        assert_eq!(detect_ip("echo 10.0.0.5").await.unwrap(), "10.0.0.5");
        assert!(detect_ip("echo not-an-ip").await.is_err());
        assert!(detect_ip("exit 3").await.is_err());
    }
}
