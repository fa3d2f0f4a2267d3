//! TCP input: one task per connection decodes its OCF stream with the
//! `schema` crate, routes the records and pushes them into the buffer.
//!
//! A malformed stream closes only its own connection, with one log line
//! naming the peer, the byte offset and the reason. A full buffer under the
//! `block` policy makes the connection stop reading, which the sender sees as
//! TCP backpressure.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use schema::StreamDecoder;
use schema::ocf::BlockView;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::buffer::Buffer;
use crate::mesos::poller::Enrichment;
use crate::route::{Router, Routing};
use crate::stats::{DropReason, Stats};

/// Smallest and largest read per syscall on an input connection.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Input rate limits, changeable at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Per connection: bytes per period (0: none).
    pub per_connection_bytes: u64,
    /// Per connection: the period.
    pub per_connection_period: Duration,
    /// All connections together: bytes per period (0: none).
    pub global_bytes: u64,
    /// All connections: the period.
    pub global_period: Duration,
}

/// A fixed-window byte budget, like the original's throttle.
#[derive(Debug)]
struct Window {
    start: Instant,
    used: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            used: 0,
        }
    }

    /// Spends `bytes`; false when that goes over `limit` in this period.
    fn admit(&mut self, bytes: u64, limit: u64, period: Duration) -> bool {
        if limit == 0 {
            return true;
        }
        let now = Instant::now();
        if now.duration_since(self.start) >= period {
            self.start = now;
            self.used = 0;
        }
        self.used += bytes;
        self.used <= limit
    }
}

/// What every connection task shares.
pub struct Shared {
    /// Counters.
    pub stats: Arc<Stats>,
    /// Where routed records go.
    pub buffer: Arc<Buffer>,
    /// Routing settings in force.
    pub routing: watch::Receiver<Arc<Routing>>,
    /// What the agent's `/state` says, for tags added when absent.
    pub enrichment: watch::Receiver<Arc<Enrichment>>,
    /// Told when a record names a framework id `/state` doesn't know.
    pub refresh: Arc<tokio::sync::Notify>,
    /// Rate limits in force.
    pub rate_limits: watch::Receiver<RateLimits>,
    /// Decoder limits.
    pub decode_limits: schema::Limits,
    /// Close connections idle this long.
    pub idle_timeout: Option<Duration>,
    /// How long a connection may keep reading after shutdown starts (the
    /// collector half-closes it and reads until the sender closes, or this).
    pub drain_timeout: Duration,
    global: Mutex<Window>,
}

impl Shared {
    /// Builds the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stats: Arc<Stats>,
        buffer: Arc<Buffer>,
        routing: watch::Receiver<Arc<Routing>>,
        enrichment: watch::Receiver<Arc<Enrichment>>,
        refresh: Arc<tokio::sync::Notify>,
        rate_limits: watch::Receiver<RateLimits>,
        decode_limits: schema::Limits,
        idle_timeout: Option<Duration>,
    ) -> Self {
        Self {
            stats,
            buffer,
            routing,
            enrichment,
            refresh,
            rate_limits,
            decode_limits,
            idle_timeout,
            drain_timeout: Duration::from_secs(1),
            global: Mutex::new(Window::new()),
        }
    }
}

/// Accepts connections until `shutdown`, then waits for nothing: the
/// connection tasks are in `tracker`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut accept_errors = 0u32;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                accept_errors = 0;
                pair
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                accept_errors = (accept_errors + 1).min(8);
                warn!(%error, "Failed to accept an input connection.");
                tokio::time::sleep(Duration::from_millis(10 << accept_errors)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.stats.connections_refused.fetch_add(1, Relaxed);
            warn!(%peer, max_connections, "Refused an input connection: at the connection limit.");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            connection(stream, peer, &shared, shutdown).await;
            drop(permit);
        });
    }
    debug!("Stopped accepting input connections.");
}

enum End {
    Closed,
    Idle,
    Drained,
    Malformed,
    Io(std::io::Error),
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: CancellationToken,
) {
    let stats = &shared.stats;
    stats.connections_accepted.fetch_add(1, Relaxed);
    stats.connections_open.fetch_add(1, Relaxed);
    debug!(%peer, "Input connection opened.");
    let mut decoder = StreamDecoder::new(shared.decode_limits);
    // A connection holds no read buffer while it waits (a thousand module
    // connections, each sending a block now and then, must stay cheap): the
    // buffer is taken when the socket is readable and given back once
    // everything read is decoded. The read size grows only while reads keep
    // filling it.
    let mut buf = BytesMut::new();
    let mut read_size = MIN_READ;
    let mut router = Router::default();
    let mut window = Window::new();
    let mut drain_until: Option<Instant> = None;
    let mut throttled_logged = false;
    let end = loop {
        let idle = async {
            match shared.idle_timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        let drain = async {
            match drain_until {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                // Half-close: a sender that reads its socket sees EOF, stops
                // writing and closes. Reading on until it does (or the drain
                // timeout) loses nothing it wrote before it saw the EOF.
                let _ = stream.shutdown().await;
                drain_until = Some(Instant::now() + shared.drain_timeout);
                continue;
            }
            _ = drain => break End::Drained,
            _ = idle => break End::Idle,
            readable = stream.readable() => readable,
        };
        if let Err(error) = read {
            break End::Io(error);
        }
        buf.reserve(read_size);
        let room = buf.capacity() - buf.len();
        match stream.try_read_buf(&mut buf) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                continue;
            }
            Ok(0) => match decoder.finish(&buf) {
                Ok(()) => break End::Closed,
                Err(error) => {
                    log_malformed(peer, &error);
                    break End::Malformed;
                }
            },
            Ok(n) => {
                stats.bytes_received.fetch_add(n as u64, Relaxed);
                read_size = if n >= room {
                    (read_size * 2).min(MAX_READ)
                } else {
                    MIN_READ.max(read_size / 2)
                };
            }
            Err(error) => break End::Io(error),
        }
        let mut malformed = false;
        loop {
            // Route synchronously while the block borrows `buf`, then push.
            let (used, routed) = match decoder.decode_view(&buf) {
                Ok((used, Some(view))) => (
                    used,
                    Some(route_view(view, shared, &mut router, &mut window)),
                ),
                Ok((used, None)) => (used, None),
                Err(error) => {
                    log_malformed(peer, &error);
                    malformed = true;
                    break;
                }
            };
            buf.advance(used);
            match routed {
                Some(Some(records)) => shared.buffer.push(records).await,
                Some(None) => {
                    if !throttled_logged {
                        throttled_logged = true;
                        warn!(%peer, "Input rate limit reached: dropping this connection's records until the period ends.");
                    }
                }
                None => break,
            }
        }
        if malformed {
            break End::Malformed;
        }
        // Everything read is decoded: give the buffer back while waiting,
        // so that a thousand module connections cost next to nothing between
        // blocks. (A saturated connection rarely drains to exactly empty, so
        // this costs it nothing.)
        if buf.is_empty() {
            buf = BytesMut::new();
        }
    };
    stats.connections_open.fetch_sub(1, Relaxed);
    match end {
        End::Closed | End::Drained => debug!(%peer, "Input connection closed."),
        End::Idle => {
            stats.connections_idle_closed.fetch_add(1, Relaxed);
            info!(%peer, "Closed an idle input connection.");
        }
        End::Malformed => {
            stats.connections_malformed.fetch_add(1, Relaxed);
        }
        End::Io(ref error) => info!(%peer, %error, "Input connection failed."),
    }
    if !buf.is_empty() && matches!(end, End::Drained) {
        warn!(%peer, bytes = buf.len(), "Shutdown: closed an input connection in the middle of a block; its bytes were not decoded.");
    }
}

fn log_malformed(peer: SocketAddr, error: &schema::DecodeError) {
    warn!(%peer, offset = error.offset, reason = error.kind.reason(), %error, "Closed input connection: malformed stream.");
}

/// Counts a block as received and applies the rate limits; false when it
/// is over them (its records are then counted as dropped).
fn admit(shared: &Shared, window: &mut Window, records: u64, datapoints: u64, wire: u64) -> bool {
    let stats = &shared.stats;
    stats.blocks_received.fetch_add(1, Relaxed);
    stats.count_received(crate::stats::Input::Tcp, records, datapoints);
    let limits = *shared.rate_limits.borrow();
    let mine = window.admit(
        wire,
        limits.per_connection_bytes,
        limits.per_connection_period,
    );
    let global = mine
        && shared
            .global
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(wire, limits.global_bytes, limits.global_period);
    if !global {
        stats.count_drop(DropReason::RateLimited, records, datapoints);
    }
    global
}

/// Routes one block: its records ready for the buffer, or `None` when the
/// rate limits dropped it (counted).
fn route_view(
    view: BlockView<'_>,
    shared: &Shared,
    router: &mut Router,
    window: &mut Window,
) -> Option<crate::route::Records> {
    let stats = &shared.stats;
    let routing = shared.routing.borrow().clone();
    let enrichment = shared.enrichment.borrow().clone();
    let records = match view {
        // The current schema: validated in place, tags spliced in.
        BlockView::Raw(block) => {
            let datapoints = block
                .records
                .iter()
                .map(|r| u64::from(r.datapoints()))
                .sum();
            let records = block.records.len() as u64;
            if !admit(shared, window, records, datapoints, block.wire_len as u64) {
                return None;
            }
            let mut unknown_framework = false;
            let routed = router.route_block(&routing, &block.records, |record| {
                let (extra, unknown) = enrichment.tags_for_lookup(|key| record.tag(key));
                unknown_framework |= unknown;
                extra
            });
            if unknown_framework {
                shared.refresh.notify_one();
            }
            if routed.sanitized > 0 {
                stats.topics_sanitized.fetch_add(routed.sanitized, Relaxed);
            }
            routed.records
        }
        // Other schemas: decoded, converted, re-encoded.
        BlockView::Decoded(block) => {
            let records = block.records.len() as u64;
            let datapoints = block.datapoints() as u64;
            if !admit(shared, window, records, datapoints, block.wire_len as u64) {
                return None;
            }
            let mut prepared = Vec::with_capacity(block.records.len());
            for record in block.records {
                let (extra, unknown_framework) = enrichment.tags_for(&record);
                if unknown_framework {
                    shared.refresh.notify_one();
                }
                let (record, sanitized) = router.prepare(&routing, &extra, record);
                if sanitized {
                    stats.topics_sanitized.fetch_add(1, Relaxed);
                }
                prepared.push(record);
            }
            crate::route::encode_all(prepared)
        }
    };
    count_topics(stats, &records.items);
    Some(records)
}

/// Per-topic received counts, one lock per block.
pub fn count_topics(stats: &Stats, items: &[crate::route::Routed]) {
    let mut run: Option<(&Arc<str>, u64)> = None;
    for item in items {
        match &mut run {
            Some((topic, n)) if Arc::ptr_eq(topic, &item.topic) => *n += u64::from(item.datapoints),
            _ => {
                if let Some((topic, n)) = run.take() {
                    stats.count_topic(topic, |c| c.received += n);
                }
                run = Some((&item.topic, u64::from(item.datapoints)));
            }
        }
    }
    if let Some((topic, n)) = run {
        stats.count_topic(topic, |c| c.received += n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_refuses_over_the_limit_and_resets() {
        let mut window = Window::new();
        assert!(window.admit(600, 1000, Duration::from_secs(3600)));
        assert!(!window.admit(600, 1000, Duration::from_secs(3600)));
        assert!(
            window.admit(600, 0, Duration::from_secs(3600)),
            "0 is unlimited"
        );
        let mut window = Window::new();
        assert!(window.admit(600, 1000, Duration::ZERO));
        assert!(
            window.admit(600, 1000, Duration::ZERO),
            "a new period starts"
        );
    }
}
