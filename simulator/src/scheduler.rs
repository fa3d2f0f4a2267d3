//! The Kafka framework's scheduler: `/v1/connection`,
//! `/v1/connection/address` and `/v1/connection/dns`, in both reference
//! shapes (with and without `vip`); or, built with [`SchedulerBuilder::sdk`],
//! the SDK-era service's `/v1/endpoints/broker` and `/v1/endpoints/broker-tls`
//! (`fixtures/kafka/sdk-v1-endpoints-*`), also under
//! `/service/<framework>` as DC/OS's Admin Router serves them. It can serve
//! HTTPS and require `Authorization: token=<token>`, as in DC/OS strict
//! mode. The broker set changes at runtime, and faults (down, 503, a
//! missing `dns`) are switchable.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

use crate::listening::Listening;
use crate::tls::Issued;

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
    /// The SDK service's `broker-tls` endpoint: `ip:port`.
    tls_address: Vec<String>,
    /// The same by DNS name.
    tls_dns: Vec<String>,
}

/// What the scheduler serves, behind its handle.
#[derive(Debug)]
pub struct SchedulerState {
    framework: String,
    brokers: Brokers,
    fault: SchedulerFault,
    requests: u64,
    token: Option<String>,
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

    /// Sets the literal `broker-tls` lists (e.g. `dns` entries that are
    /// `host:port` a test can resolve).
    pub fn set_tls_lists(&self, dns: Vec<String>, address: Vec<String>) {
        let mut state = self.lock();
        state.brokers.tls_dns = dns;
        state.brokers.tls_address = address;
    }

    /// Requires `Authorization: token=<token>` from now on (401 without
    /// it, 403 with another).
    pub fn set_token(&self, token: Option<String>) {
        self.lock().token = token;
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
    sdk: bool,
    https: Option<Issued>,
    token: Option<String>,
}

/// A scheduler for the framework `framework`, on 127.0.0.1 with an
/// ephemeral port, with no brokers yet.
pub fn kafka_scheduler(framework: &str) -> SchedulerBuilder {
    SchedulerBuilder {
        framework: framework.to_owned(),
        bind: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
        sdk: false,
        https: None,
        token: None,
    }
}

impl SchedulerBuilder {
    /// Listens on `addr`.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Serves the SDK-era service's API (`/v1/endpoints/broker` and
    /// `/v1/endpoints/broker-tls`, at `/` and under `/service/<framework>`)
    /// instead of the original's `/v1/connection`.
    pub fn sdk(mut self) -> Self {
        self.sdk = true;
        self
    }

    /// Serves HTTPS with this certificate.
    pub fn https(mut self, identity: Issued) -> Self {
        self.https = Some(identity);
        self
    }

    /// Requires `Authorization: token=<token>`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Starts serving.
    pub async fn run(self) -> std::io::Result<SchedulerHandle> {
        let state = Arc::new(Mutex::new(SchedulerState {
            framework: self.framework.clone(),
            brokers: Brokers {
                dns: Vec::new(),
                address: Vec::new(),
                vip: None,
                tls_address: Vec::new(),
                tls_dns: Vec::new(),
            },
            fault: SchedulerFault::None,
            requests: 0,
            token: self.token,
        }));
        let listener = TcpListener::bind(self.bind).await?;
        let addr = listener.local_addr()?;
        let api = if self.sdk {
            Router::new()
                .route("/v1/endpoints/broker", get(endpoints_broker))
                .route("/v1/endpoints/broker-tls", get(endpoints_broker_tls))
        } else {
            Router::new()
                .route("/v1/connection", get(connection))
                .route("/v1/connection/address", get(address))
                .route("/v1/connection/dns", get(dns))
        };
        let mut app = api.clone();
        if self.sdk {
            app = app.nest(&format!("/service/{}", self.framework), api);
        }
        let app = app
            .route("/control/fault", post(set_fault))
            .route("/control/brokers", post(set_brokers))
            .with_state(state.clone());
        let https = self.https.is_some();
        let identity = self.https;
        Ok(Listening::spawn(addr, state, async move {
            let _ = crate::tls::serve(listener, app, identity.as_ref()).await;
        })
        .https(https))
    }
}

fn answer(
    state: &Shared,
    headers: &HeaderMap,
    body: impl FnOnce(&Brokers, SchedulerFault) -> serde_json::Value,
) -> Response {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.requests += 1;
    if let Some(token) = &state.token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match given {
            None => return (StatusCode::UNAUTHORIZED, "token required").into_response(),
            Some(given) if given != format!("token={token}") => {
                return (StatusCode::FORBIDDEN, "token refused").into_response();
            }
            Some(_) => {}
        }
    }
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

fn framework(state: &Shared) -> String {
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .framework
        .clone()
}

/// The SDK service's `/v1/endpoints/broker`: `address`, `dns` and `vip`.
async fn endpoints_broker(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let framework = framework(&state);
    answer(&state, &headers, |b, fault| {
        sdk_endpoint(
            &b.address,
            &b.dns,
            fault,
            format!("broker.{framework}.l4lb.thisdcos.directory:9092"),
        )
    })
}

/// The SDK service's `/v1/endpoints/broker-tls`.
async fn endpoints_broker_tls(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let framework = framework(&state);
    answer(&state, &headers, |b, fault| {
        sdk_endpoint(
            &b.tls_address,
            &b.tls_dns,
            fault,
            format!("broker-tls.{framework}.l4lb.thisdcos.directory:9093"),
        )
    })
}

fn sdk_endpoint(
    address: &[String],
    dns: &[String],
    fault: SchedulerFault,
    vip: String,
) -> serde_json::Value {
    let mut body = json!({"address": address, "vip": vip});
    if fault != SchedulerFault::MissingDns {
        body["dns"] = json!(dns);
    }
    body
}

async fn connection(State(state): State<Shared>, headers: HeaderMap) -> Response {
    answer(&state, &headers, |b, fault| {
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

async fn address(State(state): State<Shared>, headers: HeaderMap) -> Response {
    answer(&state, &headers, |b, _| json!({"address": b.address}))
}

async fn dns(State(state): State<Shared>, headers: HeaderMap) -> Response {
    answer(&state, &headers, |b, fault| {
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
