//! The Prometheus listener (`prometheus_listen`): `GET /metrics` serves
//! the collector's own `collector_*` families, then the latest value of
//! every series in the node store (see [`crate::sinks::store::prometheus`] for the
//! names, labels and values), so that one target per node gives everything.
//!
//! A scrape renders a snapshot of the store a chunk at a time, as the
//! client reads: it never holds the store while it writes, and never holds
//! its whole text. At most [`MAX_SCRAPES`] are rendered at once; another
//! waits for its turn up to [`crate::api::REQUEST_TIMEOUT`], then gets 503.
//! A scraper that takes nothing for [`super::WRITE_TIMEOUT`] loses its
//! turn.
//! Connections are held as the API's are (a limit, a head timeout, a
//! maximum age).

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

use crate::shutdown::Task;
use crate::sinks::kafka::BrokerState;
use crate::sinks::store::Store;
use crate::sinks::store::prometheus::{Renderer, declared_names};
use crate::stats::Stats;

use crate::sinks::store::limits::MAX_SCRAPES;
/// Text written to the client at a time, at least (a line is never split).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// What a scrape reads.
#[derive(Clone)]
pub struct PrometheusState {
    /// The node store.
    pub store: Arc<Store>,
    /// The collector's own counters.
    pub stats: Arc<Stats>,
    /// The brokers, for the `collector_kafka_*` gauges.
    pub brokers: Arc<Mutex<BrokerState>>,
    /// Turns to render.
    pub scrapes: Arc<Semaphore>,
}

impl PrometheusState {
    /// The state of a listener serving `store`.
    pub fn new(store: Arc<Store>, stats: Arc<Stats>, brokers: Arc<Mutex<BrokerState>>) -> Self {
        Self {
            store,
            stats,
            brokers,
            scrapes: Arc::new(Semaphore::new(MAX_SCRAPES)),
        }
    }
}

/// The listener's routes.
pub fn router(state: PrometheusState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Spawns the listener, holding at most `max_connections` at once; it stops
/// with the outputs.
pub fn spawn(
    listener: tokio::net::TcpListener,
    state: PrometheusState,
    max_connections: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Task {
    let stats = state.stats.clone();
    Task::spawn(
        "prometheus",
        super::serve(
            listener,
            router(state),
            max_connections,
            super::AtLimit::Close,
            stop,
            stats,
        ),
    )
}

async fn metrics(State(state): State<PrometheusState>) -> Response {
    let Some(turn) = super::take_turn(&state.scrapes).await else {
        state.stats.prometheus_scrapes_refused.fetch_add(1, Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "other scrapes are being written; try again\n",
        )
            .into_response();
    };
    let brokers = state.brokers.lock().map(|b| b.gauges()).unwrap_or_default();
    let own = crate::stats::prometheus::render(&state.stats, brokers);
    let reserved: HashSet<String> = declared_names(&own);
    // The snapshot and its sort, off the runtime's threads.
    let store = state.store.clone();
    let Ok(renderer) =
        tokio::task::spawn_blocking(move || Renderer::new(store.snapshot(), reserved)).await
    else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let scrape = Scrape {
        own: Some(own),
        renderer,
        stats: state.stats.clone(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::chunked_body(turn, scrape),
    )
        .into_response()
}

/// One scrape: the collector's own families, then the store's.
struct Scrape {
    own: Option<String>,
    renderer: Renderer,
    stats: Arc<Stats>,
}

impl super::Chunks for Scrape {
    fn next_chunk(&mut self) -> Option<String> {
        self.own
            .take()
            .or_else(|| self.renderer.next_chunk(CHUNK_BYTES))
    }

    fn finished(self, complete: bool) {
        let skipped = self.renderer.skipped();
        let stats = &self.stats;
        stats
            .store_skipped_duplicate
            .fetch_add(skipped.duplicate, Relaxed);
        stats
            .store_skipped_name_taken
            .fetch_add(skipped.name_taken, Relaxed);
        if complete {
            stats.prometheus_scrapes.fetch_add(1, Relaxed);
        } else {
            stats.prometheus_scrapes_cut.fetch_add(1, Relaxed);
            crate::telemetry::throttled_warn("prometheus scrape cut", |repeats| {
                tracing::warn!(
                    repeats,
                    "Cut a Prometheus scrape short: the scraper took nothing for 10 s."
                );
            });
        }
    }
}
