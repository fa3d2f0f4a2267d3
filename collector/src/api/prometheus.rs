//! The Prometheus listener (`prometheus_listen`): `GET /metrics` serves
//! the collector's own `collector_*` families, then the latest value of
//! every series in the node store (see [`crate::store::prometheus`] for the
//! names, labels and values), so that one target per node gives everything.
//!
//! A scrape renders a snapshot of the store a chunk at a time, as the
//! client reads: it never holds the store while it writes, and never holds
//! its whole text. At most [`MAX_SCRAPES`] are rendered at once; another
//! waits for its turn up to [`crate::api::REQUEST_TIMEOUT`], then gets 503.
//! Connections are held as the API's are (a limit, a head timeout, a
//! maximum age).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

use crate::shutdown::Task;
use crate::sink::kafka::BrokerState;
use crate::stats::Stats;
use crate::store::Store;
use crate::store::prometheus::{Renderer, declared_names};

/// Scrapes rendered at once, at most.
pub const MAX_SCRAPES: usize = 2;
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
        super::serve(listener, router(state), max_connections, stop, stats),
    )
}

async fn metrics(State(state): State<PrometheusState>) -> Response {
    let turn = tokio::time::timeout(
        super::REQUEST_TIMEOUT,
        state.scrapes.clone().acquire_owned(),
    )
    .await;
    let Ok(Ok(turn)) = turn else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "other scrapes are being written; try again\n",
        )
            .into_response();
    };
    let brokers = state.brokers.lock().map(|b| b.gauges()).unwrap_or_default();
    let own = crate::stats::prometheus::render(&state.stats, brokers);
    let reserved: HashSet<String> = declared_names(&own);
    let renderer = Renderer::new(state.store.snapshot(), reserved);
    let stats = state.stats.clone();
    struct Scrape {
        own: Option<String>,
        renderer: Renderer,
        stats: Arc<Stats>,
        _turn: tokio::sync::OwnedSemaphorePermit,
    }
    impl Drop for Scrape {
        fn drop(&mut self) {
            let skipped = self.renderer.skipped();
            self.stats
                .store_skipped_duplicate
                .fetch_add(skipped.duplicate, Relaxed);
            self.stats
                .store_skipped_name_taken
                .fetch_add(skipped.name_taken, Relaxed);
        }
    }
    let scrape = Scrape {
        own: Some(own),
        renderer,
        stats,
        _turn: turn,
    };
    let chunks = futures::stream::unfold(scrape, |mut scrape| async move {
        let chunk = match scrape.own.take() {
            Some(own) => own,
            None => scrape.renderer.next_chunk(CHUNK_BYTES)?,
        };
        Some((Ok::<_, Infallible>(Bytes::from(chunk)), scrape))
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from_stream(chunks),
    )
        .into_response()
}
