//! TCP input: one task per connection decodes its OCF stream with the
//! `schema` crate, routes the records and pushes them into the buffer.
//!
//! Every byte a connection makes the collector hold is bounded:
//!
//! - **Read buffers.** Each connection may hold 16 KiB of a header or block
//!   on its own (the module's blocks fit); beyond that it draws on one pool
//!   shared by every connection, `input_buffer_max_bytes`. A connection
//!   that needs more waits for it and stops reading meanwhile; a block whose
//!   size is known asks for all of it at once. Nothing is held while a
//!   connection waits for its sender.
//! - **Decoding.** Before a block is decoded, what decoding and routing it
//!   can take at most is reserved in the buffer (see
//!   [`Routing::block_estimate`]). Compressed blocks are decompressed one at
//!   a time, into one buffer the collector keeps for that (at most
//!   `max_decompressed_block_bytes`); deflate does not say how large a block
//!   inflates to, so it is reserved for once that is known. A connection
//!   never keeps a decompressed copy. A block too large to ever fit in the
//!   buffer closes its connection, counted (`connections_oversized`).
//! - **Time.** A header or block that has started must arrive whole within
//!   `frame_timeout_secs`, or the connection is closed and counted: a
//!   trickle of bytes can't hold a connection slot forever. An idle
//!   connection is closed after `idle_timeout_secs`.
//!
//! A malformed stream closes only its own connection, with one log line
//! naming the peer, the byte offset and the reason (throttled per reason).
//! A full buffer under the `block` policy makes the connection stop
//! reading, which the sender sees as TCP backpressure. At shutdown a
//! connection is half-closed and read until its sender closes or the drain
//! timeout ends; a block still waiting for room then is counted as a
//! `shutdown` drop.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use schema::StreamDecoder;
use schema::ocf::{BlockInfo, BlockView, Next};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{OWN_READ_BYTES, READ_AHEAD_BYTES};
use crate::pipeline::Pipeline;
use crate::route::{BlockCost, Router};
use crate::shutdown::{Shutdown, Task};
use crate::stats::{DropReason, Input};

/// Smallest read per syscall on an input connection.
const MIN_READ: usize = 4 * 1024;

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

impl From<&crate::config::Config> for RateLimits {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            per_connection_bytes: config.input_limit_amount_kbytes * 1024,
            per_connection_period: Duration::from_secs(config.input_limit_period),
            global_bytes: config.global_limit_amount_kbytes * 1024,
            global_period: Duration::from_secs(config.global_limit_period),
        }
    }
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

/// The input's settings.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Decoder limits.
    pub decode_limits: schema::Limits,
    /// Close connections idle this long.
    pub idle_timeout: Option<Duration>,
    /// Close connections whose header or block does not complete within this.
    pub frame_timeout: Option<Duration>,
    /// How long a connection may keep reading after shutdown starts (the
    /// collector half-closes it and reads until the sender closes, or this).
    pub drain_timeout: Duration,
    /// The read-buffer pool shared by every connection, in bytes.
    pub read_pool_bytes: usize,
}

impl From<&crate::config::Config> for IngestSettings {
    fn from(config: &crate::config::Config) -> Self {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Self {
            max_connections: config.max_connections,
            decode_limits: schema::Limits {
                max_block_bytes: config.max_block_bytes,
                max_decompressed_block_bytes: config.max_decompressed_block_bytes,
                ..schema::Limits::default()
            },
            idle_timeout: secs(config.idle_timeout_secs),
            frame_timeout: secs(config.frame_timeout_secs),
            drain_timeout: Duration::from_secs(1),
            read_pool_bytes: config.input_buffer_max_bytes,
        }
    }
}

/// What every connection task shares.
pub struct Shared {
    /// The way into the buffer.
    pub pipeline: Arc<Pipeline>,
    /// Rate limits in force.
    pub rate_limits: tokio::sync::watch::Receiver<RateLimits>,
    /// Settings.
    pub settings: IngestSettings,
    /// Read-buffer bytes beyond each connection's own allowance.
    read_pool: Arc<Semaphore>,
    /// The one buffer compressed blocks are decompressed into, one block at
    /// a time: its size is bounded once, whatever the connections do.
    inflating: tokio::sync::Mutex<Vec<u8>>,
    global: Mutex<Window>,
}

impl Shared {
    /// The shared state of every input connection.
    pub fn new(
        pipeline: Arc<Pipeline>,
        rate_limits: tokio::sync::watch::Receiver<RateLimits>,
        settings: IngestSettings,
    ) -> Self {
        Self {
            read_pool: Arc::new(Semaphore::new(settings.read_pool_bytes)),
            inflating: tokio::sync::Mutex::new(Vec::new()),
            pipeline,
            rate_limits,
            settings,
            global: Mutex::new(Window::new()),
        }
    }
}

/// Spawns the TCP input: it accepts connections until the shutdown begins,
/// then waits, until the shutdown's deadline, for its connections to finish
/// the frames in flight.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>, shutdown: &Arc<Shutdown>) -> Task {
    let shutdown = shutdown.clone();
    Task::spawn("input", async move {
        let connections = TaskTracker::new();
        let accepted = std::panic::AssertUnwindSafe(serve(
            listener,
            shared,
            shutdown.begun().clone(),
            connections.clone(),
        ))
        .catch_unwind()
        .await;
        // However accepting ended, the connections finish what they hold.
        connections.close();
        let deadline = shutdown.deadline().unwrap_or_else(Instant::now);
        if tokio::time::timeout_at(deadline, connections.wait())
            .await
            .is_err()
        {
            tracing::error!("Input connections did not stop within the shutdown grace.");
        }
        if let Err(panic) = accepted {
            // Counted and logged where the task is joined.
            std::panic::resume_unwind(panic);
        }
    })
}

/// Accepts connections until `shutdown`; the connection tasks are in
/// `tracker`.
async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let max_connections = shared.settings.max_connections;
    let permits = Arc::new(Semaphore::new(max_connections));
    let stats = shared.pipeline.stats.clone();
    let mut failures = 0;
    while let Some((stream, peer)) =
        crate::net::accept(&listener, "input accept", &mut failures, &stats, &shutdown).await
    {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.connections_refused.fetch_add(1, Relaxed);
            crate::telemetry::throttled_warn("input refused", |repeats| {
                warn!(%peer, max_connections, repeats, "Refused an input connection: at the connection limit.");
            });
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let served =
                    std::panic::AssertUnwindSafe(connection(stream, &shared, shutdown))
                        .catch_unwind()
                        .await;
                if let Err(panic) = served {
                    // A bug: counted and logged, and the connection's slot
                    // and gauge are given back. What it held is counted as
                    // internal_error at shutdown.
                    let stats = &shared.pipeline.stats;
                    stats.task_panics.fetch_add(1, Relaxed);
                    stats.connections_open.fetch_sub(1, Relaxed);
                    tracing::error!(panic = %crate::shutdown::panic_message(panic), "An input connection's task panicked; the connection was closed.");
                }
                drop(permit);
            }
            .instrument(info_span!("input", %peer)),
        );
    }
    debug!("Stopped accepting input connections.");
}

/// Why a connection ended.
enum End {
    Closed,
    Empty,
    Idle,
    FrameTimeout,
    Drained,
    Malformed,
    Oversized,
    Io(std::io::Error),
}

/// A connection's read buffer: the bytes not yet decoded, and what it may
/// hold (its own allowance, plus what it took from the shared pool).
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    pool: Option<OwnedSemaphorePermit>,
}

impl ReadBuf {
    fn new() -> Self {
        Self {
            data: Vec::new(),
            start: 0,
            pool: None,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }

    fn len(&self) -> usize {
        self.data.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }

    fn pooled(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.num_permits())
    }

    /// What the buffer may take in all.
    fn allowance(&self) -> usize {
        OWN_READ_BYTES + self.pooled()
    }

    fn take_pool(&mut self, permit: OwnedSemaphorePermit, stats: &crate::stats::Stats) {
        stats
            .input_buffer_bytes
            .fetch_add(permit.num_permits() as i64, Relaxed);
        match &mut self.pool {
            Some(held) => held.merge(permit),
            None => self.pool = Some(permit),
        }
    }

    /// Gives back everything once nothing is buffered: a connection waiting
    /// for its sender holds no memory.
    fn release_if_empty(&mut self, stats: &crate::stats::Stats) {
        if self.is_empty() {
            self.data = Vec::new();
            self.start = 0;
            if let Some(pool) = self.pool.take() {
                stats
                    .input_buffer_bytes
                    .fetch_sub(pool.num_permits() as i64, Relaxed);
            }
        }
    }

    /// Makes the buffer able to hold `total` bytes (those it has and those
    /// to read), in an allocation of at most the allowance.
    fn make_room(&mut self, total: usize) {
        let total = total.min(self.allowance());
        if self.start > 0 && self.data.capacity() - self.data.len() < total - self.len() {
            self.data.drain(..self.start);
            self.start = 0;
        }
        if self.data.capacity() < total {
            self.data.reserve_exact(total - self.data.len());
        }
    }

    /// Room left in the allocation (never zero after `make_room` for more
    /// than is held: a read never grows the buffer by itself).
    fn spare(&self) -> usize {
        self.data.capacity() - self.data.len()
    }
}

/// One connection: its decoder, its routing state, and its buffer.
struct Connection<'a> {
    shared: &'a Shared,
    decoder: StreamDecoder,
    admission: Admission,
    buf: ReadBuf,
    /// What the block at the front needs in all, once its size is known.
    needed: Option<usize>,
    read_size: usize,
}

/// A connection's routing caches and rate-limit window.
struct Admission {
    router: Router,
    window: Window,
    throttled_logged: bool,
}

/// Why decoding stopped.
enum Stop {
    /// Nothing more to decode in the buffer.
    NeedMore,
    /// The connection must close.
    End(End),
}

/// Resolves when a block waiting for room stops waiting: at the drain
/// deadline, once shutdown has begun.
async fn give_up(shutdown: &CancellationToken, drain_until: Option<Instant>, drain: Duration) {
    match drain_until {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        }
    }
}

fn malformed(error: &schema::DecodeError) -> End {
    let reason = error.kind.reason();
    crate::telemetry::throttled_warn(reason, |repeats| {
        warn!(offset = error.offset, reason, %error, repeats, "Closed input connection: malformed stream.");
    });
    End::Malformed
}

fn oversized(shared: &Shared, estimate: usize) -> End {
    let capacity = shared.pipeline.buffer.capacity();
    crate::telemetry::throttled_warn("oversized block", |repeats| {
        warn!(
            estimate,
            buffer_max_bytes = capacity,
            repeats,
            "Closed input connection: a block whose records could take more memory than the buffer holds."
        );
    });
    End::Oversized
}

/// A block received and dropped for shutdown (it waited for room until the
/// drain ended, or the buffer closed).
fn count_shutdown(shared: &Shared, records: u64, datapoints: u64) {
    let stats = &shared.pipeline.stats;
    stats.blocks_received.fetch_add(1, Relaxed);
    stats.count_received(Input::Tcp, records, datapoints);
    stats.count_drop(DropReason::Shutdown, records, datapoints);
}

impl Connection<'_> {
    /// Decodes every whole block in the buffer and pushes its records.
    async fn decode(&mut self, shutdown: &CancellationToken, drain_until: Option<Instant>) -> Stop {
        loop {
            let (used, next) = match self.decoder.peek(self.buf.bytes()) {
                Ok(peeked) => peeked,
                Err(error) => return Stop::End(malformed(&error)),
            };
            self.buf.consume(used);
            let info = match next {
                Next::Block(info) => info,
                Next::Incomplete { needed } => {
                    self.needed = needed;
                    return Stop::NeedMore;
                }
            };
            self.needed = None;
            let give_up = give_up(shutdown, drain_until, self.shared.settings.drain_timeout);
            let mut inflating = None;
            let outcome = block(
                self.shared,
                &mut self.decoder,
                &mut self.admission,
                self.buf.bytes(),
                info,
                &mut inflating,
                give_up,
            )
            .await;
            // The inflated copy goes before the turn to inflate passes on:
            // never two at once.
            self.decoder.release_scratch();
            drop(inflating);
            match outcome {
                Ok(used) => self.buf.consume(used),
                Err(end) => return Stop::End(end),
            }
        }
    }

    /// What the next read needs: the bytes that complete the block at the
    /// front (or a little more, when its size is not known yet), and what it
    /// may read ahead.
    fn read_plan(&self) -> (usize, usize) {
        let len = self.buf.len();
        match self.needed {
            Some(total) => (total, total.max(len + self.read_size)),
            None => (len + MIN_READ, len + self.read_size),
        }
    }
}

/// Decodes, routes and pushes the whole block at the front of `input`,
/// which `peek` described as `info`. Returns the bytes it took, or why the
/// connection must close.
/// A compressed block takes the collector's one decompression buffer into
/// `inflating`, and holds it until its records are routed.
async fn block<'s>(
    shared: &'s Shared,
    decoder: &mut StreamDecoder,
    admission: &mut Admission,
    input: &[u8],
    info: BlockInfo,
    inflating: &mut Option<tokio::sync::MutexGuard<'s, Vec<u8>>>,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<usize, End> {
    let pipeline = &shared.pipeline;
    let budget = pipeline.buffer.budget();
    let (routing, enrichment) = pipeline.settings();
    let enrichment_len = enrichment.max_extra_len();
    let compressed = info.codec != schema::Codec::Null;
    // The decompressed copy is in the one shared buffer, outside the
    // buffer's bound (a fixed part of the memory bound).
    let cost = |data_len| BlockCost {
        records: info.records,
        data_len,
        decompressed: false,
        decoded: !info.in_place,
    };
    tokio::pin!(give_up);
    // What is known before decoding: everything but a deflate block's
    // inflated size, which is reserved for once it is known.
    let known = routing.block_estimate(cost(info.data_len.unwrap_or(0)), enrichment_len);
    if known > budget.capacity() {
        return Err(oversized(shared, known));
    }
    if compressed {
        *inflating = tokio::select! {
            guard = shared.inflating.lock() => Some(guard),
            () = &mut give_up => None,
        };
    }
    let lease = if compressed && inflating.is_none() {
        None
    } else {
        tokio::select! {
            lease = pipeline.buffer.reserve(known) => lease,
            () = &mut give_up => None,
        }
    };
    let decoded = match inflating.as_deref_mut() {
        Some(scratch) => {
            // Reserved once for the largest block: it never grows by
            // doubling (whose cast-offs the allocator would keep a while).
            let room = shared.settings.decode_limits.max_decompressed_block_bytes + 1;
            if scratch.capacity() < room {
                scratch.reserve_exact(room - scratch.len());
            }
            decoder.decode_view_into(input, scratch)
        }
        // Shutdown: decoded with the decoder's own buffer, only to count it.
        None => decoder.decode_view(input),
    };
    let (used, view) = match decoded {
        Ok((used, Some(view))) => (used, view),
        Ok((_, None)) => {
            // `peek` promised a whole block; its property test holds the
            // decoder to that. Should it ever break it, close rather than
            // loop.
            tracing::error!(
                records = info.records,
                "Closed input connection: the decoder announced a block it then did not return."
            );
            return Err(End::Malformed);
        }
        Err(error) => return Err(malformed(&error)),
    };
    let (records, datapoints) = view_counts(&view);
    let Some(mut lease) = lease else {
        // Shutdown while waiting for room: counted, not routed.
        count_shutdown(shared, records, datapoints);
        return Err(End::Drained);
    };
    if info.data_len.is_none() {
        // Inflated: its size is known now; reserve the rest.
        let data_len = match &view {
            BlockView::Raw(block) => block.data_len,
            BlockView::Decoded(block) => block.data_len,
        };
        let full = routing.block_estimate(cost(data_len), enrichment_len);
        if full > budget.capacity() {
            return Err(oversized(shared, full));
        }
        let more = tokio::select! {
            more = pipeline.buffer.reserve(full.saturating_sub(known)) => more,
            () = &mut give_up => None,
        };
        match more {
            Some(more) => lease.merge(more),
            None => {
                count_shutdown(shared, records, datapoints);
                return Err(End::Drained);
            }
        }
    }
    let stats = &pipeline.stats;
    stats.blocks_received.fetch_add(1, Relaxed);
    stats.count_received(Input::Tcp, records, datapoints);
    if !admission.admit(shared, records, datapoints, info.wire_len as u64) {
        return Ok(used);
    }
    let routed = match view {
        // The current schema: validated in place, tags spliced in.
        BlockView::Raw(block) => pipeline.route_raw(
            &mut admission.router,
            &routing,
            &enrichment,
            &block.records,
            &mut lease,
        ),
        // Other schemas: decoded, converted, re-encoded.
        BlockView::Decoded(block) => pipeline.route_owned(
            crate::sinks::store::Source::Input,
            &mut admission.router,
            &routing,
            &enrichment,
            block.records,
            &mut lease,
        ),
    };
    // What routing did not use goes back now; the records hold the rest.
    drop(lease);
    pipeline.buffer.push(routed, &mut give_up).await;
    Ok(used)
}

impl Admission {
    /// Applies the rate limits to a block already counted as received;
    /// false when it is over them (its records are then counted as
    /// dropped).
    fn admit(&mut self, shared: &Shared, records: u64, datapoints: u64, wire: u64) -> bool {
        let limits = *shared.rate_limits.borrow();
        let mine = self.window.admit(
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
            shared
                .pipeline
                .stats
                .count_drop(DropReason::RateLimited, records, datapoints);
            if !self.throttled_logged {
                self.throttled_logged = true;
                crate::telemetry::throttled_warn("input rate limit", |repeats| {
                    warn!(
                        repeats,
                        "Input rate limit reached: dropping a connection's records until the period ends."
                    );
                });
            }
        }
        global
    }
}

fn view_counts(view: &BlockView<'_>) -> (u64, u64) {
    match view {
        BlockView::Raw(block) => (
            block.records.len() as u64,
            block
                .records
                .iter()
                .map(|r| u64::from(r.datapoints()))
                .sum(),
        ),
        BlockView::Decoded(block) => (block.records.len() as u64, block.datapoints() as u64),
    }
}

async fn connection(mut stream: TcpStream, shared: &Shared, shutdown: CancellationToken) {
    let stats = shared.pipeline.stats.clone();
    stats.connections_accepted.fetch_add(1, Relaxed);
    stats.connections_open.fetch_add(1, Relaxed);
    debug!("Input connection opened.");
    let mut conn = Connection {
        shared,
        decoder: StreamDecoder::new(shared.settings.decode_limits),
        admission: Admission {
            router: Router::default(),
            window: Window::new(),
            throttled_logged: false,
        },
        buf: ReadBuf::new(),
        needed: None,
        read_size: MIN_READ,
    };
    let mut drain_until: Option<Instant> = None;
    let mut last_progress = Instant::now();
    let mut received_any = false;
    let end = 'connection: loop {
        // Room for the next read: what completes the block at the front is
        // waited for (stopping reads meanwhile); read-ahead is taken only
        // if the pool has it to spare.
        let (required, wanted) = conn.read_plan();
        if required > conn.buf.allowance() {
            let want = u32::try_from(required - conn.buf.allowance()).unwrap_or(u32::MAX);
            let frame_deadline = frame_deadline(shared, last_progress);
            let permit = tokio::select! {
                permit = shared.read_pool.clone().acquire_many_owned(want) => permit.ok(),
                () = shutdown.cancelled(), if drain_until.is_none() => None,
                () = sleep_until_or_never(drain_until) => break 'connection End::Drained,
                () = sleep_until_or_never(frame_deadline) => break 'connection End::FrameTimeout,
            };
            match permit {
                Some(permit) => conn.buf.take_pool(permit, &stats),
                None => {
                    // Shutdown began while waiting: half-close, then drain.
                    let _ = stream.shutdown().await;
                    drain_until = Some(Instant::now() + shared.settings.drain_timeout);
                    continue;
                }
            }
        }
        if wanted > conn.buf.allowance() {
            let extra = u32::try_from(wanted - conn.buf.allowance()).unwrap_or(u32::MAX);
            if let Ok(permit) = shared.read_pool.clone().try_acquire_many_owned(extra) {
                conn.buf.take_pool(permit, &stats);
            }
        }
        let frame_deadline = if conn.buf.is_empty() {
            None
        } else {
            frame_deadline(shared, last_progress)
        };
        let idle = shared
            .settings
            .idle_timeout
            .map(|timeout| Instant::now() + timeout);
        let ready = tokio::select! {
            () = shutdown.cancelled(), if drain_until.is_none() => {
                // Half-close: a sender that reads its socket sees EOF, stops
                // writing and closes. Reading on until it does (or the drain
                // timeout) loses nothing it wrote before it saw the EOF.
                let _ = stream.shutdown().await;
                drain_until = Some(Instant::now() + shared.settings.drain_timeout);
                continue;
            }
            () = sleep_until_or_never(drain_until) => break End::Drained,
            () = sleep_until_or_never(idle) => break End::Idle,
            () = sleep_until_or_never(frame_deadline) => break End::FrameTimeout,
            ready = stream.readable() => ready,
        };
        if let Err(error) = ready {
            break End::Io(error);
        }
        let was_empty = conn.buf.is_empty();
        conn.buf.make_room(wanted);
        let room = conn.buf.spare();
        match stream.try_read_buf(&mut conn.buf.data) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                conn.buf.release_if_empty(&stats);
                continue;
            }
            Ok(0) => {
                if !received_any {
                    break End::Empty;
                }
                match conn.decoder.finish(conn.buf.bytes()) {
                    Ok(()) => break End::Closed,
                    Err(error) => break malformed(&error),
                }
            }
            Ok(n) => {
                received_any = true;
                if was_empty {
                    // A header or block starts: its frame timeout runs from now.
                    last_progress = Instant::now();
                }
                stats.bytes_received.fetch_add(n as u64, Relaxed);
                conn.read_size = if n >= room {
                    (conn.read_size * 2).min(READ_AHEAD_BYTES)
                } else {
                    MIN_READ.max(conn.read_size / 2)
                };
            }
            Err(error) => break End::Io(error),
        }
        let before = (conn.decoder.offset(), conn.buf.len());
        match conn.decode(&shutdown, drain_until).await {
            Stop::NeedMore => {}
            Stop::End(end) => break end,
        }
        if conn.decoder.offset() != before.0 || conn.buf.is_empty() {
            last_progress = Instant::now();
        }
        // Everything read is decoded: give the buffer back while waiting,
        // so that a thousand module connections cost next to nothing between
        // blocks. (A saturated connection rarely drains to exactly empty, so
        // this costs it nothing.)
        conn.buf.release_if_empty(&stats);
    };
    stats.connections_open.fetch_sub(1, Relaxed);
    match end {
        End::Closed | End::Drained => debug!("Input connection closed."),
        End::Empty => {
            stats.connections_empty.fetch_add(1, Relaxed);
            debug!("Input connection closed without sending anything.");
        }
        End::Idle => {
            stats.connections_idle_closed.fetch_add(1, Relaxed);
            info!("Closed an idle input connection.");
        }
        End::FrameTimeout => {
            stats.connections_frame_timeout.fetch_add(1, Relaxed);
            crate::telemetry::throttled_warn("frame timeout", |repeats| {
                warn!(
                    buffered = conn.buf.len(),
                    repeats,
                    "Closed input connection: a header or block did not arrive whole within the frame timeout."
                );
            });
        }
        End::Malformed => {
            stats.connections_malformed.fetch_add(1, Relaxed);
        }
        End::Oversized => {
            stats.connections_oversized.fetch_add(1, Relaxed);
        }
        End::Io(ref error) => crate::telemetry::throttled_warn("input failed", |repeats| {
            info!(%error, repeats, "Input connection failed.");
        }),
    }
    if !conn.buf.is_empty() && matches!(end, End::Drained) {
        warn!(
            bytes = conn.buf.len(),
            "Shutdown: closed an input connection in the middle of a block; its bytes were not decoded."
        );
    }
    conn.buf.consume(conn.buf.len());
    conn.buf.release_if_empty(&stats);
}

fn frame_deadline(shared: &Shared, last_progress: Instant) -> Option<Instant> {
    shared
        .settings
        .frame_timeout
        .map(|timeout| crate::shutdown::deadline_after(last_progress, timeout))
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
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

    #[test]
    fn a_read_buffer_stays_within_its_allowance() {
        let mut buf = ReadBuf::new();
        buf.make_room(1 << 20);
        assert!(
            buf.data.capacity() <= OWN_READ_BYTES,
            "{}",
            buf.data.capacity()
        );
        buf.data.extend_from_slice(&[1; 10_000]);
        buf.consume(9_000);
        buf.make_room(OWN_READ_BYTES);
        assert!(buf.data.capacity() <= OWN_READ_BYTES);
        assert_eq!(buf.bytes(), &[1; 1000][..]);
        assert!(buf.spare() >= OWN_READ_BYTES - 1000 - 64);
    }
}
