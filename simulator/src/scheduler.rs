//! The Kafka framework's scheduler: `/v1/connection`,
//! `/v1/connection/address` and `/v1/connection/dns`, in both reference
//! shapes (with and without `vip`). The broker set changes at runtime, and
//! faults (down, 503, a missing `dns`) are switchable.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

use crate::listening::Listening;

/// A fault the scheduler can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "fault")]
pub enum SchedulerFault {
    /// Healthy.
    None,
    /// HTTP 503.
    Unavailable,
    /// The answer lacks `dns` (the original panicked on this).
    MissingDns,
    /// The connection is closed without an answer.
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Brokers {
    /// `host:port` by DNS name, e.g. `broker-0.kafka.mesos:9092`.
    dns: Vec<String>,
    /// `ip:port`.
    address: Vec<String>,
    /// The later `vip` key, if set.
    vip: Option<String>,
}

/// What the scheduler serves, behind its handle.
#[derive(Debug)]
pub struct SchedulerState {
    framework: String,
    brokers: Brokers,
    fault: SchedulerFault,
    requests: u64,
}

/// The scheduler's state, shared by its handle and its routes.
pub type Shared = Arc<Mutex<SchedulerState>>;

/// A running scheduler fake.
pub type SchedulerHandle = Listening<Shared>;

impl SchedulerHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, SchedulerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the brokers: `address` gets `ip:port`, `dns` gets
    /// `broker-N.<framework>.mesos:port`, as the real scheduler builds them.
    pub fn set_brokers(&self, brokers: &[SocketAddr]) {
        let mut state = self.lock();
        let framework = state.framework.clone();
        state.brokers.address = brokers.iter().map(ToString::to_string).collect();
        state.brokers.dns = brokers
            .iter()
            .enumerate()
            .map(|(i, b)| format!("broker-{i}.{framework}.mesos:{}", b.port()))
            .collect();
    }

    /// Sets literal lists (e.g. `dns` entries that are `ip:port`).
    pub fn set_lists(&self, dns: Vec<String>, address: Vec<String>) {
        let mut state = self.lock();
        state.brokers.dns = dns;
        state.brokers.address = address;
    }

    /// Adds or removes the `vip` key.
    pub fn set_vip(&self, vip: Option<String>) {
        self.lock().brokers.vip = vip;
    }

    /// Shows a fault from now on.
    pub fn set_fault(&self, fault: SchedulerFault) {
        self.lock().fault = fault;
    }

    /// Requests served.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }
}

/// Builds a Kafka scheduler fake.
#[derive(Debug, Clone)]
pub struct SchedulerBuilder {
    framework: String,
    bind: SocketAddr,
}

/// A scheduler for the framework `framework`, on 127.0.0.1 with an
/// ephemeral port, with no brokers yet.
pub fn kafka_scheduler(framework: &str) -> SchedulerBuilder {
    SchedulerBuilder {
        framework: framework.to_owned(),
        bind: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
    }
}

impl SchedulerBuilder {
    /// Listens on `addr`.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Starts serving.
    pub async fn run(self) -> std::io::Result<SchedulerHandle> {
        serve(&self.framework, self.bind).await
    }
}

async fn serve(framework: &str, bind: SocketAddr) -> std::io::Result<SchedulerHandle> {
    let state = Arc::new(Mutex::new(SchedulerState {
        framework: framework.to_owned(),
        brokers: Brokers {
            dns: Vec::new(),
            address: Vec::new(),
            vip: None,
        },
        fault: SchedulerFault::None,
        requests: 0,
    }));
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/v1/connection", get(connection))
        .route("/v1/connection/address", get(address))
        .route("/v1/connection/dns", get(dns))
        .route("/control/fault", post(set_fault))
        .route("/control/brokers", post(set_brokers))
        .with_state(state.clone());
    Ok(Listening::spawn(addr, state, async move {
        let _ = axum::serve(listener, app).await;
    }))
}

fn answer(
    state: &Shared,
    body: impl FnOnce(&Brokers, SchedulerFault) -> serde_json::Value,
) -> Response {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.requests += 1;
    match state.fault {
        SchedulerFault::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "scheduler not ready").into_response()
        }
        // The closest an HTTP handler gets to a dead scheduler: no answer body
        // a client could use, and the connection closed.
        SchedulerFault::Down => {
            (StatusCode::BAD_GATEWAY, [("connection", "close")], "").into_response()
        }
        fault => Json(body(&state.brokers, fault)).into_response(),
    }
}

async fn connection(State(state): State<Shared>) -> Response {
    answer(&state, |b, fault| {
        let mut body = json!({"address": b.address, "zookeeper": "master.mesos:2181/kafka"});
        if fault != SchedulerFault::MissingDns {
            body["dns"] = json!(b.dns);
        }
        if let Some(vip) = &b.vip {
            body["vip"] = json!(vip);
        }
        body
    })
}

async fn address(State(state): State<Shared>) -> Response {
    answer(&state, |b, _| json!({"address": b.address}))
}

async fn dns(State(state): State<Shared>) -> Response {
    answer(&state, |b, fault| {
        if fault == SchedulerFault::MissingDns {
            json!({})
        } else {
            json!({"dns": b.dns})
        }
    })
}

async fn set_fault(State(state): State<Shared>, Json(fault): Json<SchedulerFault>) -> StatusCode {
    state.lock().unwrap_or_else(|p| p.into_inner()).fault = fault;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct BrokerLists {
    dns: Vec<String>,
    address: Vec<String>,
}

async fn set_brokers(State(state): State<Shared>, Json(lists): Json<BrokerLists>) -> StatusCode {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.brokers.dns = lists.dns;
    state.brokers.address = lists.address;
    StatusCode::NO_CONTENT
}
