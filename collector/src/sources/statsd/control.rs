//! The statsd registration API (`statsd_control_listen`), as DC/OS 1.12+'s
//! mesos module (`com_mesosphere_dcos_MetricsIsolatorModule`) calls it for
//! every container it launches, and as DC/OS's Telegraf (`dcos_statsd`)
//! answered it, but where a container could not be served: a task's
//! launch fails on any answer but 201 and 204, so that is answered 204.
//!
//! | call | answer |
//! | --- | --- |
//! | `POST /container` `{"container_id", "statsd_host"?, "statsd_port"?}` | 201 `{"container_id", "statsd_host", "statsd_port"}`, the same for a container registered already; 204 when it cannot be served ([`Refused`](super::registry::Refused)); 400 `Could not decode request` |
//! | `DELETE /container/{id}` | 202 (its listener flushes and closes), or 404 `Container "{id}" not found` |
//! | `GET /containers` | 200 `[{"container_id", "statsd_host", "statsd_port"}]`, by id |
//! | `GET /container/{id}` | 200 the container, or 404 |
//!
//! Anything else is 404 `Not Found` (405 for a known path with another
//! method).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::registry::{Registered, Registry, Request};

/// Bytes of a request body, at most (the module's are about 60).
pub const MAX_BODY_BYTES: usize = 4096;

/// The registration API's routes.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/container", post(register))
        .route("/container/{id}", get(container).delete(deregister))
        .route("/containers", get(containers))
        .fallback(|| async { (StatusCode::NOT_FOUND, "Not Found") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(registry)
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(value).unwrap_or_default(),
    )
        .into_response()
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("Container {id:?} not found"),
    )
        .into_response()
}

async fn register(State(registry): State<Arc<Registry>>, body: Bytes) -> Response {
    let request = match Request::from_json(&body) {
        Ok(request) => request,
        Err(reason) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("Could not decode request: {reason}"),
            )
                .into_response();
        }
    };
    match registry.register(request).await {
        Ok(Registered::New(container) | Registered::Known(container)) => {
            json(StatusCode::CREATED, &container)
        }
        // Counted and logged by the registry: the task runs without statsd.
        Err(_) => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn deregister(State(registry): State<Arc<Registry>>, Path(id): Path<String>) -> Response {
    if registry.deregister(&id).await {
        StatusCode::ACCEPTED.into_response()
    } else {
        not_found(&id)
    }
}

async fn containers(State(registry): State<Arc<Registry>>) -> Response {
    json(StatusCode::OK, &registry.containers().await)
}

async fn container(State(registry): State<Arc<Registry>>, Path(id): Path<String>) -> Response {
    match registry.container(&id).await {
        Some(container) => json(StatusCode::OK, &container),
        None => not_found(&id),
    }
}
