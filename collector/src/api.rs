//! The HTTP API (axum), loopback by default.
//!
//! - `GET /v1/endpoints`: every input and output with its bound address,
//!   protocol and format, the Kafka brokers in use and how they were found,
//!   and the topic mapping.
//! - `GET /v1/config`: the effective configuration, secrets redacted.
//! - `PATCH /v1/config`: a JSON merge patch; 400 naming the field when
//!   invalid, 409 listing the settings that need a restart.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /health`: 200 when healthy; 503 while draining or when Kafka has
//!   been unreachable for too long. The body says why.
//!
//! With a token configured, mutating requests need `Authorization: Bearer
//! <token>`. Bodies are limited (413) and requests time out (408).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::partner::PartnerHub;
use crate::runtime::{PatchError, Runtime};
use crate::sink::kafka::BrokerState;
use crate::stats::{DropReason, Histogram, Stats};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound addresses, for `/v1/endpoints`.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    /// TCP input.
    pub ingest: SocketAddr,
    /// This API.
    pub api: SocketAddr,
    /// Partner output.
    pub partner: SocketAddr,
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
    /// Set once shutdown starts.
    pub draining: Arc<AtomicBool>,
    /// The partner fan-out.
    pub partners: Arc<PartnerHub>,
}

/// The API's routes, testable with `oneshot`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/endpoints", get(endpoints))
        .route("/v1/config", get(get_config).patch(patch_config))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
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
    Json(json!({
        "inputs": [{
            "name": "tcp",
            "address": state.endpoints.ingest.to_string(),
            "protocol": "tcp",
            "format": "avro-ocf",
            "schema": "dcos.metrics.MetricList",
            "codecs": ["null", "deflate", "snappy"],
        }],
        "outputs": [
            {
                "name": "partner",
                "address": state.endpoints.partner.to_string(),
                "protocol": "tcp",
                "format": "avro-ocf",
                "filter": "send `topics=<comma list or regex>\\n` first (optional)",
                "connected": state.partners.count(),
            },
            {
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
            },
        ],
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

async fn health(State(state): State<ApiState>) -> Response {
    let config = state.runtime.config();
    let brokers = state.brokers.lock().map(|b| b.clone()).unwrap_or_default();
    let accounting = state.stats.accounting();
    let details = json!({
        "brokers": brokers.current.as_ref().map(|c| c.brokers.clone()),
        "all_brokers_down": brokers.all_brokers_down,
        "connections_open": state.stats.connections_open.load(Relaxed),
        "buffer_bytes": state.stats.buffer_bytes.load(Relaxed),
        "in_flight_datapoints": accounting.in_flight().datapoints,
    });
    if state.draining.load(Relaxed) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining", "reasons": ["shutting down: draining queued data"], "details": details}),
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
    (
        StatusCode::OK,
        Json(json!({"status": "ok", "details": details})),
    )
        .into_response()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, "histogram", help);
        let mut cumulative = 0;
        for (i, bound) in histogram.bounds.iter().enumerate() {
            cumulative += histogram.counts[i].load(Relaxed);
            self.sample(
                &format!("{name}_bucket"),
                &format!("le=\"{bound}\""),
                cumulative,
            );
        }
        cumulative += histogram.counts[histogram.bounds.len()].load(Relaxed);
        self.sample(&format!("{name}_bucket"), "le=\"+Inf\"", cumulative);
        self.sample(&format!("{name}_sum"), "", histogram.sum.load(Relaxed));
        self.sample(&format!("{name}_count"), "", cumulative);
    }
}

/// Renders every counter in Prometheus text format.
pub fn render_metrics(stats: &Stats, brokers: &BrokerState, partners: usize) -> String {
    let mut t = Text(String::with_capacity(8192));
    let acc = stats.accounting();
    for (unit, received_tcp, received_agent, delivered) in [
        (
            "datapoints",
            stats.received_tcp.datapoints.load(Relaxed),
            stats.received_agent.datapoints.load(Relaxed),
            acc.delivered.datapoints,
        ),
        (
            "records",
            stats.received_tcp.records.load(Relaxed),
            stats.received_agent.records.load(Relaxed),
            acc.delivered.records,
        ),
    ] {
        let name = format!("collector_received_{unit}_total");
        t.family(
            &name,
            "counter",
            &format!("{unit} decoded from an input, by input"),
        );
        t.sample(&name, "input=\"tcp\"", received_tcp);
        t.sample(&name, "input=\"agent\"", received_agent);
        t.one(
            &format!("collector_delivered_{unit}_total"),
            "counter",
            &format!("{unit} acknowledged by Kafka"),
            delivered,
        );
        let name = format!("collector_dropped_{unit}_total");
        t.family(&name, "counter", &format!("{unit} dropped, by reason"));
        for reason in DropReason::ALL {
            let counts = acc.dropped_for(reason);
            let value = if unit == "datapoints" {
                counts.datapoints
            } else {
                counts.records
            };
            t.sample(&name, &format!("reason=\"{}\"", reason.as_str()), value);
        }
        let in_flight = if unit == "datapoints" {
            acc.in_flight().datapoints
        } else {
            acc.in_flight().records
        };
        t.one(
            &format!("collector_in_flight_{unit}"),
            "gauge",
            &format!("{unit} received and not yet delivered or dropped"),
            in_flight,
        );
    }
    let topics = stats.topics.lock().map(|t| t.clone()).unwrap_or_default();
    t.family(
        "collector_topic_received_datapoints_total",
        "counter",
        "datapoints routed to a Kafka topic (at most 200 topics; the rest as _other)",
    );
    for (topic, counts) in &topics {
        t.sample(
            "collector_topic_received_datapoints_total",
            &format!("topic=\"{}\"", escape(topic)),
            counts.received,
        );
    }
    t.family(
        "collector_topic_delivered_datapoints_total",
        "counter",
        "datapoints delivered to a Kafka topic (at most 200 topics; the rest as _other)",
    );
    for (topic, counts) in &topics {
        t.sample(
            "collector_topic_delivered_datapoints_total",
            &format!("topic=\"{}\"", escape(topic)),
            counts.delivered,
        );
    }
    t.one(
        "collector_connections_open",
        "gauge",
        "input connections open",
        stats.connections_open.load(Relaxed),
    );
    t.one(
        "collector_connections_accepted_total",
        "counter",
        "input connections accepted",
        stats.connections_accepted.load(Relaxed),
    );
    t.one(
        "collector_connections_refused_total",
        "counter",
        "input connections refused at the limit",
        stats.connections_refused.load(Relaxed),
    );
    t.one(
        "collector_connections_malformed_total",
        "counter",
        "input connections closed for a malformed stream",
        stats.connections_malformed.load(Relaxed),
    );
    t.one(
        "collector_connections_idle_closed_total",
        "counter",
        "input connections closed when idle",
        stats.connections_idle_closed.load(Relaxed),
    );
    for (name, help, value) in [
        (
            "collector_connections_empty_total",
            "input connections closed before sending anything",
            stats.connections_empty.load(Relaxed),
        ),
        (
            "collector_connections_frame_timeout_total",
            "input connections closed for a header or block not arriving whole within the frame timeout",
            stats.connections_frame_timeout.load(Relaxed),
        ),
        (
            "collector_connections_oversized_total",
            "input connections closed for a block too large for the buffer",
            stats.connections_oversized.load(Relaxed),
        ),
        (
            "collector_accept_failures_total",
            "failed accepts on any listener (out of descriptors, for example)",
            stats.accept_failures.load(Relaxed),
        ),
        (
            "collector_partners_refused_total",
            "partner connections refused at the partner limit",
            stats.partners_refused.load(Relaxed),
        ),
        (
            "collector_agent_requests_total",
            "requests the agent poller made",
            stats.agent_requests.load(Relaxed),
        ),
        (
            "collector_agent_request_failures_total",
            "agent requests that failed",
            stats.agent_request_failures.load(Relaxed),
        ),
        (
            "collector_agent_responses_too_large_total",
            "agent answers refused for being larger than agent_max_body_bytes",
            stats.agent_responses_too_large.load(Relaxed),
        ),
        (
            "collector_task_panics_total",
            "collector tasks that panicked (a bug; what they held is counted as internal_error)",
            stats.task_panics.load(Relaxed),
        ),
    ] {
        t.one(name, "counter", help, value);
    }
    t.one(
        "collector_input_buffer_bytes",
        "gauge",
        "bytes input read buffers hold from the shared pool",
        stats.input_buffer_bytes.load(Relaxed),
    );
    t.one(
        "collector_kafka_retry_bytes",
        "gauge",
        "bytes of messages librdkafka handed back, waiting to be produced again",
        stats.kafka_retry_bytes.load(Relaxed),
    );
    t.one(
        "collector_bytes_received_total",
        "counter",
        "bytes read from inputs",
        stats.bytes_received.load(Relaxed),
    );
    t.one(
        "collector_blocks_received_total",
        "counter",
        "OCF blocks decoded",
        stats.blocks_received.load(Relaxed),
    );
    t.one(
        "collector_topics_sanitized_total",
        "counter",
        "records whose topic name had to be sanitized",
        stats.topics_sanitized.load(Relaxed),
    );
    t.one(
        "collector_buffer_bytes",
        "gauge",
        "bytes held against the buffer bound (queued, batched, or waiting for librdkafka)",
        stats.buffer_bytes.load(Relaxed),
    );
    t.one(
        "collector_buffer_high_water_bytes",
        "gauge",
        "most bytes the buffer held",
        stats.buffer_bytes_max.load(Relaxed),
    );
    t.one(
        "collector_buffer_full_waits_total",
        "counter",
        "times an input waited on a full buffer",
        stats.buffer_full_waits.load(Relaxed),
    );
    t.one(
        "collector_kafka_messages_produced_total",
        "counter",
        "Kafka messages produced",
        stats.messages_produced.load(Relaxed),
    );
    t.one(
        "collector_kafka_messages_delivered_total",
        "counter",
        "Kafka messages acknowledged",
        stats.messages_delivered.load(Relaxed),
    );
    t.one(
        "collector_kafka_messages_retried_total",
        "counter",
        "Kafka messages produced again",
        stats.messages_retried.load(Relaxed),
    );
    t.one(
        "collector_kafka_queue_full_waits_total",
        "counter",
        "times the sink waited on a full librdkafka queue",
        stats.kafka_queue_full_waits.load(Relaxed),
    );
    t.one(
        "collector_kafka_brokers",
        "gauge",
        "brokers in use",
        brokers.current.as_ref().map_or(0, |c| c.brokers.len()),
    );
    t.one(
        "collector_kafka_all_brokers_down",
        "gauge",
        "1 when every broker is down",
        u8::from(brokers.all_brokers_down),
    );
    t.one(
        "collector_kafka_unavailable_seconds",
        "gauge",
        "seconds Kafka has been unreachable (0 when reachable)",
        brokers
            .unavailable_since
            .map_or(0, |s| s.elapsed().as_secs()),
    );
    t.one(
        "collector_discoveries_total",
        "counter",
        "broker discoveries that succeeded",
        stats.discoveries.load(Relaxed),
    );
    t.one(
        "collector_discovery_failures_total",
        "counter",
        "broker discoveries that failed",
        stats.discovery_failures.load(Relaxed),
    );
    t.one(
        "collector_producer_switches_total",
        "counter",
        "switches to a new broker set",
        stats.producer_switches.load(Relaxed),
    );
    t.histogram(
        "collector_kafka_batch_records",
        "records per Kafka message",
        &stats.batch_records,
    );
    t.histogram(
        "collector_delivery_latency_ms",
        "milliseconds from batching to Kafka's acknowledgement",
        &stats.delivery_latency_ms,
    );
    t.one(
        "collector_partners_connected",
        "gauge",
        "partners connected",
        partners,
    );
    t.one(
        "collector_partner_bytes_sent_total",
        "counter",
        "bytes written to partners",
        stats.partner_bytes_sent.load(Relaxed),
    );
    t.one(
        "collector_partner_blocks_dropped_total",
        "counter",
        "blocks dropped from slow partners' queues",
        stats.partner_blocks_dropped.load(Relaxed),
    );
    t.one(
        "collector_partners_disconnected_slow_total",
        "counter",
        "partners disconnected for falling behind",
        stats.partners_disconnected_slow.load(Relaxed),
    );
    t.one(
        "collector_config_changes_total",
        "counter",
        "configuration changes applied through the API",
        stats.config_changes.load(Relaxed),
    );
    t.0
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let brokers = state.brokers.lock().map(|b| b.clone()).unwrap_or_default();
    let body = render_metrics(&state.stats, &brokers, state.partners.count());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
