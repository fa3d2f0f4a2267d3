//! The HTTP API (axum), loopback by default.
//!
//! - `GET /v1/endpoints`: every input and output with its bound address,
//!   protocol and format, the Kafka brokers in use and how they were found,
//!   and the topic mapping.
//! - `GET /v1/config`: the effective configuration, secrets redacted.
//! - `PATCH /v1/config`: a JSON merge patch; 400 naming the field when
//!   invalid, 409 listing the settings that need a restart.
//! - `GET /metrics`: Prometheus text format.
//! - `POST /v1/kafka/reload`: makes the Kafka clients anew, reading the
//!   security settings' files again (as SIGHUP does).
//! - `GET /health`: 200 when healthy; 503 while draining, at once on a
//!   Kafka TLS or authentication failure, or when Kafka has been
//!   unreachable for too long. The body says why.
//!
//! With a token configured, mutating requests need `Authorization: Bearer
//! <token>`. Bodies are limited (413) and requests time out (408). At most
//! a fitted number of connections are open at once (see
//! [`crate::net::fit_descriptors`]; more are closed at once and counted),
//! and a request's head must arrive within [`HEAD_TIMEOUT`]: half-open
//! connections can't hold the descriptors the inputs need.

pub mod prometheus;
pub mod v0;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::runtime::{PatchError, Runtime};
use crate::shutdown::{Shutdown, Task};
use crate::sinks::kafka::BrokerState;
use crate::sinks::partner::PartnerHub;
use crate::stats::Stats;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head (its line and headers) must arrive within this, and
/// an idle kept-alive connection is closed after it.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound addresses, for `/v1/endpoints`.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// TCP input.
    pub ingest: SocketAddr,
    /// This API.
    pub api: SocketAddr,
    /// Partner output.
    pub partner: SocketAddr,
    /// Prometheus listener, when on.
    pub prometheus: Option<SocketAddr>,
    /// The v0 metrics API, when on (`IP:PORT` or `unix:PATH`).
    pub metrics_api: Option<String>,
    /// The node-wide statsd listener (UDP), when on.
    pub statsd: Option<SocketAddr>,
    /// The statsd registration API (`IP:PORT` or `unix:PATH`), when on.
    pub statsd_control: Option<String>,
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Settings in force.
    pub runtime: Arc<Runtime>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Broker state.
    pub brokers: Arc<Mutex<BrokerState>>,
    /// Bound addresses.
    pub endpoints: Endpoints,
    /// The collector's shutdown: `/health` says "draining" once it has begun.
    pub shutdown: Arc<Shutdown>,
    /// The partner fan-out.
    pub partners: Arc<PartnerHub>,
    /// The disk spool, with `buffer_type = disk`.
    pub spool: Option<Arc<crate::spool::Spool>>,
}

/// Spawns the API server, holding at most `max_connections` at once; it
/// stops with the outputs, last, so that `/health` answers "draining" while
/// the others stop.
pub fn spawn(listener: tokio::net::TcpListener, state: ApiState, max_connections: usize) -> Task {
    let stop = state.shutdown.outputs().clone();
    let stats = state.stats.clone();
    let app = router(state);
    Task::spawn(
        "api",
        serve(listener, app, max_connections, AtLimit::Close, stop, stats),
    )
}

/// What a listener does with a connection past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtLimit {
    /// Closes it at once, counted: a flood ends at the limit.
    Close,
    /// Leaves it in the kernel's backlog until a connection ends: for a
    /// caller that must be answered (the statsd registrations, each of
    /// which a task's launch waits on). At stop, a connection accepted
    /// is answered too, for up to [`ANSWER_AT_STOP`], before it is closed:
    /// its request may not have been read yet.
    Wait,
}

/// How long a connection accepted by an [`AtLimit::Wait`] listener has,
/// at stop, for its answer before it is closed: a registration's own
/// deadline (3 s, then 204) with room to write it.
const ANSWER_AT_STOP: Duration = Duration::from_secs(4);

/// A connection older than this is closed once its answer in progress is
/// written (a client reconnects), and at most [`CLOSING_GRACE`] later
/// whatever it is doing: a reader that stalls can't hold what its answer
/// holds for ever.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// How long a connection being closed for its age may take to finish.
pub const CLOSING_GRACE: Duration = Duration::from_secs(30);

/// A reader must take each chunk of a streamed answer (a scrape, a v0
/// message) within this; one that stalls longer has its answer cut short
/// (the connection is aborted, so it sees a failure, never a short
/// answer), and its turn and snapshot are let go of at once.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits up to [`REQUEST_TIMEOUT`] for a turn to write a large answer.
pub(crate) async fn take_turn(
    turns: &Arc<tokio::sync::Semaphore>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    tokio::time::timeout(REQUEST_TIMEOUT, turns.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

/// A large answer written a chunk at a time (a scrape, a v0 message).
pub(crate) trait Chunks: Send + 'static {
    /// The next chunk, or `None` at the end.
    fn next_chunk(&mut self) -> Option<String>;

    /// Told, once writing ends, whether all was sent.
    fn finished(self, _complete: bool)
    where
        Self: Sized,
    {
    }
}

/// A body streamed from a task holding `turn`: the chunks of `answer`,
/// each sent as the reader takes the last (two wait at most). A reader
/// that takes nothing for [`WRITE_TIMEOUT`] ends it early, and the body
/// then ends with an error, so the connection is aborted.
pub(crate) fn chunked_body(
    turn: tokio::sync::OwnedSemaphorePermit,
    mut answer: impl Chunks,
) -> axum::body::Body {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (chunks, receiver) = tokio::sync::mpsc::channel::<Bytes>(2);
    let finished = Arc::new(AtomicBool::new(false));
    let finishing = finished.clone();
    tokio::spawn(async move {
        let _turn = turn;
        let mut complete = true;
        while let Some(chunk) = answer.next_chunk() {
            let sent = tokio::time::timeout(WRITE_TIMEOUT, chunks.send(Bytes::from(chunk))).await;
            if !matches!(sent, Ok(Ok(()))) {
                complete = false;
                break;
            }
        }
        finishing.store(complete, Ordering::Release);
        answer.finished(complete);
    });
    let body = futures::stream::unfold(Some(receiver), move |receiver| {
        let finished = finished.clone();
        async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Some(chunk) => Some((Ok(chunk), Some(receiver))),
                None if finished.load(Ordering::Acquire) => None,
                None => Some((Err(std::io::Error::other("the answer was cut short")), None)),
            }
        }
    });
    axum::body::Body::from_stream(body)
}

/// Accepts connections until `stop`, at most `max_connections` open (one
/// more is closed as soon as it is accepted, counted, or with
/// [`AtLimit::Wait`] left in the kernel's backlog); each is served over
/// HTTP/1 with [`HEAD_TIMEOUT`] for a request's head, for at most
/// [`MAX_CONNECTION_AGE`]. At `stop`, what is being answered gets half a
/// second ([`ANSWER_AT_STOP`] with [`AtLimit::Wait`]).
pub(crate) async fn serve<L: crate::net::Acceptor>(
    listener: L,
    app: Router,
    max_connections: usize,
    at_limit: AtLimit,
    stop: tokio_util::sync::CancellationToken,
    stats: Arc<Stats>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut connections = tokio::task::JoinSet::new();
    let mut failures = 0;
    loop {
        let waited = match at_limit {
            AtLimit::Close => None,
            AtLimit::Wait => tokio::select! {
                permit = open.clone().acquire_owned() => permit.ok(),
                () = stop.cancelled() => break,
            },
        };
        let Some((stream, peer)) =
            crate::net::accept(&listener, "api accept", &mut failures, &stats, &stop).await
        else {
            break;
        };
        while connections.try_join_next().is_some() {}
        let Some(permit) = waited.or_else(|| open.clone().try_acquire_owned().ok()) else {
            stats.api_connections_refused.fetch_add(1, Relaxed);
            crate::telemetry::throttled_warn("api refused", |repeats| {
                tracing::warn!(%peer, max_connections, repeats, "Refused an API connection: at the connection limit.");
            });
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _open = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT);
            let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    // Closing a connection whose request is not read yet
                    // would leave its caller unanswered.
                    if at_limit == AtLimit::Wait
                        && tokio::time::timeout(ANSWER_AT_STOP, connection.as_mut())
                            .await
                            .is_ok()
                    {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_millis(500), connection).await;
                }
                () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = tokio::time::timeout(CLOSING_GRACE, connection) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        });
    }
    let answering = match at_limit {
        AtLimit::Close => Duration::ZERO,
        AtLimit::Wait => ANSWER_AT_STOP,
    };
    let _ = tokio::time::timeout(answering + Duration::from_millis(500), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}

/// The API's routes, testable with `oneshot`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/endpoints", get(endpoints))
        .route("/v1/config", get(get_config).patch(patch_config))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/v1/kafka/reload", post(reload_kafka))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(timeout))
        .with_state(state)
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

async fn timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            json!({"error": "request timed out"}),
        ),
    }
}

async fn authorize(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let mutating = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if mutating && let Some(token) = state.runtime.config().api_token {
        let expected = format!("Bearer {token}");
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                json!({"error": "this request needs Authorization: Bearer <api_token>"}),
            );
        }
    }
    next.run(request).await
}

async fn endpoints(State(state): State<ApiState>) -> Json<Value> {
    let config = state.runtime.config();
    let brokers = state.brokers.lock().map(|b| b.clone()).unwrap_or_default();
    let mut outputs = vec![json!({
        "name": "partner",
        "address": state.endpoints.partner.to_string(),
        "protocol": "tcp",
        "format": "avro-ocf",
        "filter": "send `topics=<comma list or regex>\\n` first (optional)",
        "connected": state.partners.count(),
    })];
    // Without Kafka (kafka = false) there is no Kafka output to show.
    if config.kafka {
        outputs.push(json!({
            "name": "kafka",
            "protocol": "kafka",
            "format": "avro-ocf, one file per message",
            "enabled": config.kafka,
            "brokers": brokers.current.as_ref().map(|c| c.brokers.clone()).unwrap_or_default(),
            "discovered_by": brokers.current.as_ref().map(|c| c.method.clone()),
            "discovery_error": brokers.last_error,
            "topic_mapping": match &config.kafka_single_topic {
                Some(topic) => json!({"single_topic": topic}),
                None => json!({"prefix": config.kafka_topic_prefix, "topic": "<prefix><record.topic>"}),
            },
        }));
    }
    if let Some(address) = &state.endpoints.metrics_api {
        outputs.push(json!({
            "name": "metrics_api",
            "address": address,
            "protocol": "http",
            "path": "/v0/",
            "format": "dcos-metrics v0 JSON",
        }));
    }
    if let Some(address) = state.endpoints.prometheus {
        outputs.push(json!({
            "name": "prometheus",
            "address": address.to_string(),
            "protocol": "http",
            "path": "/metrics",
            "format": "prometheus text 0.0.4",
        }));
    }
    let mut inputs = vec![json!({
        "name": "tcp",
        "address": state.endpoints.ingest.to_string(),
        "protocol": "tcp",
        "format": "avro-ocf",
        "schema": "dcos.metrics.MetricList",
        "codecs": ["null", "deflate", "snappy"],
    })];
    if let Some(address) = state.endpoints.statsd {
        inputs.push(json!({
            "name": "statsd",
            "address": address.to_string(),
            "protocol": "udp",
            "format": "statsd lines, DogStatsD tags",
            "topic": "statsd",
        }));
    }
    if let Some(address) = &state.endpoints.statsd_control {
        inputs.push(json!({
            "name": "statsd_containers",
            "address": address,
            "protocol": "http",
            "path": "/container",
            "format": "the DC/OS 1.12+ mesos module's container registrations; each container's statsd on a UDP port of its own",
            "topic": "<the container's framework id>",
        }));
    }
    Json(json!({
        "inputs": inputs,
        "outputs": outputs,
        "api": {"address": state.endpoints.api.to_string(), "protocol": "http"},
    }))
}

async fn get_config(State(state): State<ApiState>) -> Json<Value> {
    Json(serde_json::to_value(state.runtime.config().redacted()).unwrap_or(Value::Null))
}

async fn patch_config(State(state): State<ApiState>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("body is not JSON: {e}"), "field": "(body)"}),
            );
        }
    };
    match state.runtime.patch(&patch) {
        Ok(config) => {
            Json(serde_json::to_value(config.redacted()).unwrap_or(Value::Null)).into_response()
        }
        Err(PatchError::Invalid(e)) => error(
            StatusCode::BAD_REQUEST,
            json!({"error": e.message, "field": e.field}),
        ),
        Err(PatchError::RestartRequired(fields)) => error(
            StatusCode::CONFLICT,
            json!({"error": "these settings need a restart; nothing was changed", "fields": fields, "restart_required": true}),
        ),
    }
}

/// Makes the Kafka clients anew, reading the security settings' files
/// again (a rotated password or certificate): 200, or 400 naming the
/// option whose file can't be used (the clients in use then stay).
async fn reload_kafka(State(state): State<ApiState>) -> Response {
    match state.runtime.reload_kafka() {
        Ok(()) => Json(json!({"reloaded": true})).into_response(),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            json!({"error": e.message, "field": e.field}),
        ),
    }
}

async fn health(State(state): State<ApiState>) -> Response {
    let config = state.runtime.config();
    let brokers = state.brokers.lock().map(|b| b.clone()).unwrap_or_default();
    let accounting = state.stats.accounting();
    let spool = state.spool.as_ref().map(|spool| spool.report());
    let mut details = json!({
        "brokers": brokers.current.as_ref().map(|c| c.brokers.clone()),
        "all_brokers_down": brokers.all_brokers_down,
        "connections_open": state.stats.connections_open.load(Relaxed),
        "buffer_bytes": state.stats.buffer_bytes.load(Relaxed),
        "in_flight_datapoints": accounting.in_flight().datapoints,
        "refused_topics": brokers.refused_topics.iter().map(|r| json!({
            "topic": r.topic,
            "error": r.error,
            "refused_for_secs": r.since.elapsed().as_secs(),
            "kept_records": r.kept.records,
            "kept_datapoints": r.kept.datapoints,
        })).collect::<Vec<_>>(),
        "spool": spool.as_ref().map(|report| json!({
            "state": if report.reason.is_some() { "degraded" } else { "ok" },
            "reason": report.reason,
            "bound_bytes": report.bound,
            "bound_set_by": if report.limited_by_filesystem { "filesystem free space" } else { "spool_max_bytes" },
            "bytes": state.stats.spool_bytes.load(Relaxed),
            "segments": state.stats.spool_segments.load(Relaxed),
            "oldest_unacked_age_seconds": state.stats.spool_oldest_unacked_age_seconds.load(Relaxed),
        })),
    });
    if !config.kafka
        && let Some(details) = details.as_object_mut()
    {
        // Without Kafka there is no Kafka state to report.
        for key in ["brokers", "all_brokers_down", "refused_topics"] {
            details.remove(key);
        }
    }
    if state.shutdown.begun().is_cancelled() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining", "reasons": ["shutting down: draining queued data"], "details": details}),
        );
    }
    if config.kafka
        && let Some(failure) = &brokers.security_failure
    {
        // Retrying will not mend it: unhealthy at once, naming the cause.
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unhealthy", "reasons": [failure.to_string()], "details": details}),
        );
    }
    if config.kafka
        && let Some(since) = brokers.unavailable_since
        && since.elapsed() >= Duration::from_secs(config.health_kafka_unavailable_secs)
    {
        let reason = format!(
            "Kafka unreachable for {} s: {}",
            since.elapsed().as_secs(),
            brokers
                .last_error
                .as_deref()
                .unwrap_or(if brokers.all_brokers_down {
                    "all brokers down"
                } else {
                    "no broker"
                })
        );
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unhealthy", "reasons": [reason], "details": details}),
        );
    }
    // Still delivering: degraded, not unhealthy.
    let mut degraded: Vec<String> = spool
        .and_then(|report| report.reason)
        .map(|reason| format!("disk spool unusable, buffering in memory: {reason}"))
        .into_iter()
        .collect();
    if config.kafka {
        const LISTED: usize = 20;
        degraded.extend(
            brokers
                .refused_topics
                .iter()
                .take(LISTED)
                .map(|r| r.to_string()),
        );
        if brokers.refused_topics.len() > LISTED {
            degraded.push(format!(
                "and {} more topics Kafka refuses",
                brokers.refused_topics.len() - LISTED
            ));
        }
    }
    if !degraded.is_empty() {
        return (
            StatusCode::OK,
            Json(json!({"status": "degraded", "reasons": degraded, "details": details})),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        Json(json!({"status": "ok", "details": details})),
    )
        .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let brokers = state.brokers.lock().map(|b| b.gauges()).unwrap_or_default();
    let body = crate::stats::prometheus::render(&state.stats, brokers);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener of `at_limit` answering `ok` on `/`, and its stop.
    async fn listening(
        at_limit: AtLimit,
    ) -> (
        SocketAddr,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let served = tokio::spawn(serve(
            listener,
            app,
            4,
            at_limit,
            stop.clone(),
            Arc::new(Stats::default()),
        ));
        (addr, stop, served)
    }

    /// Connects, lets the listener accept, stops it, then sends a request;
    /// what comes back.
    async fn request_sent_after_stop(at_limit: AtLimit) -> String {
        let (addr, stop, served) = listening(at_limit).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Accepted once an answer to an earlier request on its own
        // connection comes back.
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("ok"), "{answer}");
        stop.cancel();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        served.await.unwrap();
        answer
    }

    /// A registration connection accepted before the stop, its request
    /// sent after it, is answered (closed unanswered, the module would
    /// fail the launch).
    #[tokio::test]
    async fn at_stop_a_waiting_listener_answers_what_it_accepted() {
        let answer = request_sent_after_stop(AtLimit::Wait).await;
        assert!(answer.ends_with("ok"), "{answer:?}");
    }
}
