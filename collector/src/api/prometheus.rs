//! The Prometheus listener (`prometheus_listen`): `GET /metrics` serves
//! the collector's own `collector_*` families, then the latest value of
//! every series in the node store (see [`crate::store::prometheus`] for the
//! names, labels and values), so that one target per node gives everything.
//!
//! A scrape renders a snapshot of the store a chunk at a time, as the
//! client reads: it never holds the store while it writes, and never holds
//! its whole text. At most [`MAX_SCRAPES`] are rendered at once; another
//! waits for its turn up to [`crate::api::REQUEST_TIMEOUT`], then gets 503.
//! A scraper that takes nothing for [`WRITE_TIMEOUT`] loses its turn.
//! Connections are held as the API's are (a limit, a head timeout, a
//! maximum age).

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{Semaphore, mpsc};

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

/// A scraper must take each chunk within this; one that stalls longer has
/// its scrape cut short (the connection is aborted, so the scraper sees a
/// failed scrape, never a short one), and its turn and snapshot are let go
/// of at once.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn metrics(State(state): State<PrometheusState>) -> Response {
    let turn = tokio::time::timeout(
        super::REQUEST_TIMEOUT,
        state.scrapes.clone().acquire_owned(),
    )
    .await;
    let Ok(Ok(turn)) = turn else {
        state.stats.prometheus_scrapes_refused.fetch_add(1, Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "other scrapes are being written; try again\n",
        )
            .into_response();
    };
    let (chunks, from_renderer) = mpsc::channel::<Bytes>(2);
    let finished = Arc::new(AtomicBool::new(false));
    tokio::spawn(render(state, turn, chunks, finished.clone()));
    let body = futures::stream::unfold(Some(from_renderer), move |receiver| {
        let finished = finished.clone();
        async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Some(chunk) => Some((Ok(chunk), Some(receiver))),
                None if finished.load(Ordering::Acquire) => None,
                None => Some((Err(std::io::Error::other("the scrape was cut short")), None)),
            }
        }
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from_stream(body),
    )
        .into_response()
}

/// Renders one scrape into `chunks`: the collector's own families, then
/// the store, a chunk at a time as the scraper takes them. Sets `finished`
/// once all is sent; a scraper that takes nothing for [`WRITE_TIMEOUT`]
/// ends it early.
async fn render(
    state: PrometheusState,
    turn: tokio::sync::OwnedSemaphorePermit,
    chunks: mpsc::Sender<Bytes>,
    finished: Arc<AtomicBool>,
) {
    let _turn = turn;
    let send = |chunk: String| {
        let chunks = chunks.clone();
        async move {
            matches!(
                tokio::time::timeout(WRITE_TIMEOUT, chunks.send(Bytes::from(chunk))).await,
                Ok(Ok(()))
            )
        }
    };
    let brokers = state.brokers.lock().map(|b| b.gauges()).unwrap_or_default();
    let own = crate::stats::prometheus::render(&state.stats, brokers);
    let reserved: HashSet<String> = declared_names(&own);
    if !send(own).await {
        state.stats.prometheus_scrapes_cut.fetch_add(1, Relaxed);
        return;
    }
    // The snapshot and its sort, off the runtime's threads.
    let store = state.store.clone();
    let Ok(mut renderer) =
        tokio::task::spawn_blocking(move || Renderer::new(store.snapshot(), reserved)).await
    else {
        return;
    };
    let mut complete = true;
    while let Some(chunk) = renderer.next_chunk(CHUNK_BYTES) {
        if !send(chunk).await {
            complete = false;
            break;
        }
    }
    let skipped = renderer.skipped();
    state
        .stats
        .store_skipped_duplicate
        .fetch_add(skipped.duplicate, Relaxed);
    state
        .stats
        .store_skipped_name_taken
        .fetch_add(skipped.name_taken, Relaxed);
    if complete {
        state.stats.prometheus_scrapes.fetch_add(1, Relaxed);
        finished.store(true, Ordering::Release);
    } else {
        state.stats.prometheus_scrapes_cut.fetch_add(1, Relaxed);
        crate::telemetry::throttled_warn("prometheus scrape cut", |repeats| {
            tracing::warn!(
                repeats,
                "Cut a Prometheus scrape short: the scraper took nothing for 10 s."
            );
        });
    }
}
