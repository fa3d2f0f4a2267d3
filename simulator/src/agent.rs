//! A Mesos agent: `/monitor/statistics.json`, `/monitor/statistics`,
//! `/containers`, `/state` and `/metrics/snapshot`, in the real shapes.
//!
//! Containers have evolving counters (CPU times that grow, memory within its
//! limit), belong to frameworks whose executors carry Marathon labels, and
//! some carry nested `perf`, `net_snmp_statistics`, `net_traffic_control_statistics`
//! or `blkio_statistics`. Replaying the recorded real responses is a mode.
//! Containers and faults change at runtime, through the handle or the
//! control API under `/control`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::listening::Listening;

/// Recorded real responses, for replay mode.
pub mod reference {
    /// A real DC/OS 1.8 `/containers`.
    pub const CONTAINERS: &str =
        include_str!("../../fixtures/mesos/mesos-agent-containers-response-1.json");
    /// A real `/state`.
    pub const STATE: &str = include_str!("../../fixtures/mesos/mesos-agent-state-response.json");
    /// A real `/metrics/snapshot`.
    pub const SNAPSHOT: &str =
        include_str!("../../fixtures/mesos/mesos-agent-metrics-snapshot-response.json");
    /// The Mesos docs' `/monitor/statistics` example.
    pub const STATISTICS: &str =
        include_str!("../../fixtures/mesos/mesos-monitor-statistics-doc-example.json");
}

/// A fault the agent can be told to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "fault")]
pub enum AgentFault {
    /// Healthy.
    None,
    /// Running no containers: `[]`.
    NoContainers,
    /// HTTP 500 (the usage future failed).
    ServerError,
    /// Replies after this many milliseconds.
    Slow {
        /// Delay.
        ms: u64,
    },
    /// A body that is not JSON.
    Malformed,
    /// Entries without `statistics` (usage() failed for them).
    MissingStatistics,
    /// HTTP 401.
    Unauthorized,
}

#[derive(Debug, Clone)]
struct Container {
    container_id: String,
    executor_id: String,
    executor_name: String,
    framework: usize,
    cpu_share: f64,
    mem_limit: u64,
}

/// What the agent serves, behind its handle.
#[derive(Debug)]
pub struct AgentState {
    agent_id: String,
    frameworks: Vec<(String, String, String)>,
    containers: Vec<Container>,
    fault: AgentFault,
    replay: bool,
    token: Option<String>,
    started: Instant,
    requests: u64,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl AgentState {
    fn make_containers(&mut self, count: usize) {
        self.containers = (0..count)
            .map(|i| {
                let framework = i % self.frameworks.len();
                let app = &self.frameworks[framework].2;
                Container {
                    container_id: format!("c7b0ab1f-5e4a-4a0e-9f8d-{i:012x}"),
                    executor_id: format!(
                        "{}.{i:08x}-1dd2-11b2-8d0d-0242ac110002",
                        app.trim_start_matches('/')
                    ),
                    executor_name: format!(
                        "Command Executor (Task: {app}.{i}) (Command: sh -c 'run')"
                    ),
                    framework,
                    cpu_share: 0.05 + (i % 10) as f64 * 0.1,
                    mem_limit: 128 * 1024 * 1024 * (1 + (i % 4) as u64),
                }
            })
            .collect();
    }

    fn statistics(&self, i: usize, container: &Container) -> Value {
        let elapsed = self.started.elapsed().as_secs_f64() + 100.0;
        let wobble = (elapsed / 7.0 + i as f64).sin().abs();
        let mem = (container.mem_limit as f64 * (0.3 + 0.5 * wobble)) as u64;
        let mut stats = json!({
            "timestamp": now_secs(),
            "cpus_limit": 1.1,
            "cpus_user_time_secs": (elapsed * container.cpu_share * 100.0).round() / 100.0,
            "cpus_system_time_secs": (elapsed * container.cpu_share * 30.0).round() / 100.0,
            "cpus_nr_periods": (elapsed * 10.0) as u64,
            "cpus_nr_throttled": (elapsed * container.cpu_share) as u64,
            "cpus_throttled_time_secs": elapsed * container.cpu_share / 50.0,
            "mem_limit_bytes": container.mem_limit,
            "mem_total_bytes": mem,
            "mem_rss_bytes": mem * 9 / 10,
            "mem_anon_bytes": mem * 8 / 10,
            "mem_cache_bytes": mem / 10,
            "mem_file_bytes": mem / 10,
            "mem_mapped_file_bytes": 40960,
            "mem_swap_bytes": 0,
            "mem_unevictable_bytes": 0,
            "mem_low_pressure_counter": 0,
            "mem_medium_pressure_counter": 0,
            "mem_critical_pressure_counter": 0,
        });
        let map = stats.as_object_mut().expect("a JSON object");
        if i % 3 == 1 {
            map.insert(
                "perf".into(),
                json!({"timestamp": now_secs(), "duration": 0.1, "cycles": (elapsed * 1e9) as u64,
                       "instructions": (elapsed * 2e9) as u64, "task_clock": elapsed, "context_switches": (elapsed * 100.0) as u64}),
            );
            map.insert(
                "net_snmp_statistics".into(),
                json!({"ip_stats": {"Forwarding": 1, "InReceives": (elapsed * 50.0) as i64, "OutRequests": (elapsed * 40.0) as i64},
                       "tcp_stats": {"ActiveOpens": (elapsed / 2.0) as i64, "CurrEstab": 4, "RetransSegs": 2}}),
            );
        }
        if i % 4 == 2 {
            map.insert(
                "net_traffic_control_statistics".into(),
                json!([{"id": "bw_limit", "backlog": 0, "bytes": (elapsed * 1000.0) as u64, "drops": 0, "packets": (elapsed * 10.0) as u64}]),
            );
            map.insert(
                "blkio_statistics".into(),
                json!({"cfq": [{"io_serviced": [{"op": "TOTAL", "value": (elapsed * 3.0) as u64}]}],
                       "throttling": [{"device": {"major": 8, "minor": 0},
                                       "io_service_bytes": [{"op": "READ", "value": (elapsed * 4096.0) as u64}, {"op": "TOTAL", "value": (elapsed * 8192.0) as u64}]}]}),
            );
        }
        stats
    }

    fn entries(&self, with_container: bool) -> Value {
        let entries: Vec<Value> = self
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (framework_id, _, app) = &self.frameworks[c.framework];
                let mut entry = json!({
                    "executor_id": c.executor_id,
                    "executor_name": c.executor_name,
                    "framework_id": framework_id,
                    "source": app.trim_start_matches('/'),
                });
                let map = entry.as_object_mut().expect("a JSON object");
                if self.fault != AgentFault::MissingStatistics || i % 2 == 0 {
                    map.insert("statistics".into(), self.statistics(i, c));
                }
                if with_container {
                    map.insert("container_id".into(), json!(c.container_id));
                    map.insert("status".into(), json!({"executor_pid": 1000 + i}));
                }
                entry
            })
            .collect();
        Value::Array(entries)
    }

    fn state(&self) -> Value {
        let frameworks: Vec<Value> = self
            .frameworks
            .iter()
            .enumerate()
            .map(|(f, (id, name, app))| {
                let executors: Vec<Value> = self
                    .containers
                    .iter()
                    .filter(|c| c.framework == f)
                    .map(|c| {
                        let label = if f % 2 == 0 { "MARATHON_APP_ID" } else { "DCOS_SPACE" };
                        // As Marathon launches a command task: the task's
                        // id is its executor's, its labels are the app's
                        // (with one Cosmos bookkeeping label, which the
                        // collector leaves out), and its running status
                        // names the executor's container. One label of
                        // each is its own (`SIM_LABELLED_BY`), so that a
                        // reader tells the executor's from the task's.
                        let labels = |by: &str| {
                            json!([
                                {"key": label, "value": app},
                                {"key": "DCOS_SERVICE_NAME", "value": app.trim_start_matches('/')},
                                {"key": "DCOS_PACKAGE_FRAMEWORK_NAME", "value": name},
                                {"key": "SIM_LABELLED_BY", "value": by},
                            ])
                        };
                        let task = json!({
                            "id": c.executor_id,
                            "name": app.trim_start_matches('/'),
                            "framework_id": id,
                            "executor_id": "",
                            "state": "TASK_RUNNING",
                            "labels": labels("task"),
                            "statuses": [{
                                "state": "TASK_RUNNING",
                                "timestamp": now_secs(),
                                "container_status": {"container_id": {"value": c.container_id}},
                            }],
                        });
                        json!({"id": c.executor_id, "name": c.executor_name, "source": app.trim_start_matches('/'),
                               "container": c.container_id, "labels": labels("executor"), "tasks": [task],
                               "queued_tasks": [], "completed_tasks": []})
                    })
                    .collect();
                json!({"id": id, "name": name, "role": "slave_public", "principal": format!("{name}-principal"),
                       "executors": executors, "completed_executors": []})
            })
            .collect();
        json!({"id": self.agent_id, "hostname": "agent.sim", "version": "1.0.1", "frameworks": frameworks, "completed_frameworks": []})
    }

    fn snapshot(&self) -> Value {
        let elapsed = self.started.elapsed().as_secs_f64();
        json!({
            "slave/executors_running": self.containers.len() as f64,
            "slave/tasks_running": self.containers.len() as f64,
            "slave/uptime_secs": elapsed,
            "slave/cpus_total": 4.0,
            "slave/mem_total": 14_861.0,
            "system/load_1min": 0.5 + (elapsed / 10.0).sin().abs(),
            "containerizer/mesos/container_destroy_errors": 0.0,
        })
    }
}

/// The agent's state, shared by its handle and its routes.
pub type Shared = Arc<Mutex<AgentState>>;

/// Builds an agent.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    containers: usize,
    frameworks: usize,
    replay: bool,
    token: Option<String>,
    bind: SocketAddr,
    agent_id: String,
    https: Option<crate::tls::Issued>,
}

/// An agent on 127.0.0.1 with an ephemeral port.
pub fn mesos_agent() -> AgentBuilder {
    AgentBuilder {
        containers: 4,
        frameworks: 2,
        replay: false,
        token: None,
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        agent_id: "4b2f7a29-8b3c-4d7e-9e5a-0c1f2e3d4a5b-S0".into(),
        https: None,
    }
}

impl AgentBuilder {
    /// Running containers.
    pub fn containers(mut self, n: usize) -> Self {
        self.containers = n;
        self
    }

    /// Frameworks the containers belong to.
    pub fn frameworks(mut self, n: usize) -> Self {
        self.frameworks = n.max(1);
        self
    }

    /// Serve the recorded real responses instead of generated ones.
    pub fn replay(mut self, replay: bool) -> Self {
        self.replay = replay;
        self
    }

    /// Require `Authorization: token=<token>` (401 otherwise).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Serves HTTPS with this certificate, as a DC/OS strict-mode agent.
    pub fn https(mut self, identity: crate::tls::Issued) -> Self {
        self.https = Some(identity);
        self
    }

    /// Listen here instead.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// The agent id `/state` reports.
    pub fn agent_id(mut self, id: impl Into<String>) -> Self {
        self.agent_id = id.into();
        self
    }

    /// Starts serving.
    pub async fn run(self) -> std::io::Result<AgentHandle> {
        let mut state = AgentState {
            agent_id: self.agent_id,
            frameworks: (0..self.frameworks)
                .map(|f| {
                    (
                        format!("5349f49b-68b3-4638-aab2-fc4ec845f993-{f:04}"),
                        if f == 0 {
                            "marathon".to_owned()
                        } else {
                            format!("framework-{f}")
                        },
                        format!("/app-{f}"),
                    )
                })
                .collect(),
            containers: Vec::new(),
            fault: AgentFault::None,
            replay: self.replay,
            token: self.token,
            started: Instant::now(),
            requests: 0,
        };
        state.make_containers(self.containers);
        let shared = Arc::new(Mutex::new(state));
        let listener = TcpListener::bind(self.bind).await?;
        let addr = listener.local_addr()?;
        let app = router(shared.clone());
        let https = self.https.is_some();
        let identity = self.https;
        Ok(Listening::spawn(addr, shared, async move {
            let _ = crate::tls::serve(listener, app, identity.as_ref()).await;
        })
        .https(https))
    }
}

/// A running agent.
pub type AgentHandle = Listening<Shared>;

impl AgentHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shows a fault from now on.
    pub fn set_fault(&self, fault: AgentFault) {
        self.lock().fault = fault;
    }

    /// Runs this many containers from now on.
    pub fn set_containers(&self, count: usize) {
        self.lock().make_containers(count);
    }

    /// The ids of the containers it runs (as `/state` names them).
    pub fn container_ids(&self) -> Vec<String> {
        self.lock()
            .containers
            .iter()
            .map(|c| c.container_id.clone())
            .collect()
    }

    /// Containers it runs.
    pub fn container_count(&self) -> usize {
        self.lock().containers.len()
    }

    /// Data requests served so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// The generated `/monitor/statistics` body, as served now.
    pub fn statistics_json(&self) -> Value {
        self.lock().entries(false)
    }
}

/// The agent's routes, for tests with `oneshot`.
fn router(state: Shared) -> Router {
    Router::new()
        .route("/monitor/statistics.json", get(statistics))
        .route("/monitor/statistics", get(statistics))
        .route("/containers", get(containers))
        .route("/state", get(agent_state))
        .route("/metrics/snapshot", get(snapshot))
        .route("/control/fault", post(set_fault))
        .route("/control/containers", post(set_containers))
        .with_state(state)
}

enum Which {
    Statistics,
    Containers,
    State,
    Snapshot,
}

async fn serve(state: Shared, headers: HeaderMap, which: Which) -> Response {
    let (fault, body) = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.requests += 1;
        if let Some(token) = &state.token {
            let expected = format!("token={token}");
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str())
            {
                return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
            }
        }
        let body = match (which, state.replay) {
            (Which::Statistics, true) => reference::STATISTICS.to_owned(),
            (Which::Containers, true) => reference::CONTAINERS.to_owned(),
            (Which::State, true) => reference::STATE.to_owned(),
            (Which::Snapshot, true) => reference::SNAPSHOT.to_owned(),
            (Which::Statistics, false) if state.fault == AgentFault::NoContainers => {
                "[]".to_owned()
            }
            (Which::Containers, false) if state.fault == AgentFault::NoContainers => {
                "[]".to_owned()
            }
            (Which::Statistics, false) => state.entries(false).to_string(),
            (Which::Containers, false) => state.entries(true).to_string(),
            (Which::State, false) => state.state().to_string(),
            (Which::Snapshot, false) => state.snapshot().to_string(),
        };
        (state.fault, body)
    };
    match fault {
        AgentFault::ServerError => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Failed to get resource usage",
            )
                .into_response();
        }
        AgentFault::Unauthorized => {
            return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
        }
        AgentFault::Malformed => {
            return (
                [("content-type", "application/json")],
                "{\"statistics\": [1, 2,",
            )
                .into_response();
        }
        AgentFault::Slow { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
        _ => {}
    }
    ([("content-type", "application/json")], body).into_response()
}

async fn statistics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    serve(state, headers, Which::Statistics).await
}

async fn containers(State(state): State<Shared>, headers: HeaderMap) -> Response {
    serve(state, headers, Which::Containers).await
}

async fn agent_state(State(state): State<Shared>, headers: HeaderMap) -> Response {
    serve(state, headers, Which::State).await
}

async fn snapshot(State(state): State<Shared>, headers: HeaderMap) -> Response {
    serve(state, headers, Which::Snapshot).await
}

async fn set_fault(State(state): State<Shared>, Json(fault): Json<AgentFault>) -> StatusCode {
    state.lock().unwrap_or_else(|p| p.into_inner()).fault = fault;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ContainerCount {
    count: usize,
}

async fn set_containers(
    State(state): State<Shared>,
    Json(body): Json<ContainerCount>,
) -> StatusCode {
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .make_containers(body.count);
    StatusCode::NO_CONTENT
}
