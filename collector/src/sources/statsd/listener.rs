//! A statsd UDP listener: its packets are read and their lines aggregated
//! (see [`super::aggregate`]) by the pacer's thread (see [`super::pace`])
//! and, every `statsd_flush_secs`, its task pushes every series' value into
//! the pipeline, as records of its [`Destination`] (every listener flushes
//! at the same moments). At its stop (the shutdown, or its container
//! deregistered), what the socket still holds is read and flushed before it
//! closes.
//!
//! Every listener of the collector (the node-wide one and one per
//! registered container) shares one packet buffer per thread (a packet is
//! read and taken without awaiting) and [`FLUSH_TURNS`] flushes at once, so
//! what they take besides their series does not grow with their number.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use schema::Tag;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::aggregate::{Aggregator, Budget};
use super::pace::{Pacer, Source};
use super::parse::{Line, LineError, next_line, plain_line, raw_lines};
use crate::enrich::Kind;
use crate::pipeline::Pipeline;
use crate::route::Router;
use crate::shutdown::{Shutdown, Task};
use crate::stats::{Input, Stats};

/// The largest UDP datagram.
const MAX_PACKET: usize = 65_536;

/// Packets read at a stop, at most, before the last flush.
const DRAIN_PACKETS: usize = 10_000;

/// Bytes of datapoints made for one push, about: a flush of many series is
/// pushed in pieces, never made whole.
const FLUSH_PIECE_BYTES: usize = 256 * 1024;

/// Flushes of every listener under way at once, at most: each holds a
/// piece of records (about [`FLUSH_PIECE_BYTES`]) until the buffer takes it.
pub const FLUSH_TURNS: usize = 2;

/// Flushes a container's records wait for the agent's `/state` to name it
/// (its framework is the topic), before they go to topic `statsd` with its
/// id alone; the values are cumulative, so a flush put off loses nothing.
pub const UNKNOWN_CONTAINER_FLUSHES: u32 = 3;

/// The topic of the node-wide listener, and of a container `/state` does
/// not name.
pub const NODE_TOPIC: &str = "statsd";

thread_local! {
    /// This thread's packet buffer: the `statsd` thread's, for every
    /// socket it reads; a runtime thread's, for a listener's last read at
    /// its stop.
    static PACKET: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_PACKET].into_boxed_slice());
}

/// What one listener does with what it reads.
#[derive(Debug, Clone)]
pub struct StatsdSettings {
    /// How often every series' value is pushed.
    pub flush: Duration,
    /// Percentiles of timings and histograms, each in (0, 100].
    pub percentiles: Vec<f64>,
    /// Series held, at most.
    pub max_series: usize,
    /// What every statsd series of the collector may take together.
    pub budget: Arc<Budget>,
    /// The flushes under way, of every listener ([`FLUSH_TURNS`]).
    pub flushing: Arc<Semaphore>,
    /// The kernel's drop counts, read for every listener at once.
    pub kernel_drops: Arc<KernelDrops>,
    /// When the sockets are read.
    pub pacer: Arc<Pacer>,
    /// Every listener flushes at this instant plus a whole number of
    /// `flush` periods: together, in one wake-up of the process, with
    /// one read of the kernel's drop table.
    pub flush_epoch: Instant,
}

impl StatsdSettings {
    /// The configuration's settings, for every listener of the collector.
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            flush: Duration::from_secs(config.statsd_flush_secs),
            percentiles: config.statsd_percentile_values(),
            max_series: config.statsd_max_series_per_container,
            budget: Budget::new(config.statsd_max_bytes),
            flushing: Arc::new(Semaphore::new(FLUSH_TURNS)),
            kernel_drops: Arc::default(),
            pacer: Arc::default(),
            flush_epoch: Instant::now(),
        }
    }

    /// The first flush after `now`: the next whole number of periods
    /// after [`flush_epoch`](Self::flush_epoch).
    pub fn next_flush(&self, now: Instant) -> Instant {
        let period = self.flush.max(Duration::from_millis(1));
        let since = now.saturating_duration_since(self.flush_epoch).as_nanos();
        u32::try_from(since / period.as_nanos() + 1)
            .ok()
            .and_then(|periods| period.checked_mul(periods))
            .and_then(|after| self.flush_epoch.checked_add(after))
            .or_else(|| now.checked_add(period))
            .unwrap_or(now)
    }
}

/// Bytes a container may send per period (`statsd_container_limit_kbytes`
/// per `statsd_container_limit_secs`); past them its packets are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteLimit {
    /// Bytes per period.
    pub bytes: u64,
    /// The period.
    pub period: Duration,
}

impl ByteLimit {
    /// The configuration's limit; none when `statsd_container_limit_kbytes`
    /// is 0.
    pub fn from_config(config: &crate::config::Config) -> Option<Self> {
        (config.statsd_container_limit_kbytes > 0).then(|| Self {
            bytes: config.statsd_container_limit_kbytes.saturating_mul(1024),
            period: Duration::from_secs(config.statsd_container_limit_secs),
        })
    }
}

/// Where a listener's records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// One topic, with these tags before the series' own (the node-wide
    /// listener: [`NODE_TOPIC`], no tags).
    Fixed {
        /// The topic.
        topic: String,
        /// The tags.
        tags: Vec<Tag>,
    },
    /// A registered container's: its framework's id is the topic, and
    /// `container_id`, `executor_id` and `framework_id` its tags, from the
    /// agent's `/state` (the pipeline adds the task's metadata). A
    /// container `/state` does not name after [`UNKNOWN_CONTAINER_FLUSHES`]
    /// (or without agent polling) goes to [`NODE_TOPIC`] with its id alone.
    Container(String),
}

/// Binds a non-blocking UDP socket at `addr` (port 0: the kernel's
/// choice); returns it with its address.
pub fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// A statsd listener and where its records go.
pub struct StatsdListener {
    /// The socket, non-blocking.
    pub socket: UdpSocket,
    /// Where its records go.
    pub destination: Destination,
    /// Settings.
    pub settings: StatsdSettings,
    /// Bytes its senders may send per period (none: no limit).
    pub limit: Option<ByteLimit>,
    /// Where records go.
    pub pipeline: Arc<Pipeline>,
}

/// The socket's inode, by which the kernel's tables name it.
fn inode(socket: &UdpSocket) -> Option<u64> {
    rustix::fs::fstat(socket).ok().map(|st| st.st_ino)
}

/// Datagrams the kernel dropped for each UDP socket (its receive buffer
/// full), by inode, from the `drops` column of `/proc/net/udp` and `udp6`
/// (in `proc_net`).
pub fn kernel_drops(proc_net: &std::path::Path) -> HashMap<u64, u64> {
    let mut drops = HashMap::new();
    for table in ["udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(proc_net.join(table)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            let mut fields = line.split_whitespace();
            let (Some(inode), Some(count)) = (fields.nth(9), fields.nth(2)) else {
                continue;
            };
            if let (Ok(inode), Ok(count)) = (inode.parse(), count.parse()) {
                drops.insert(inode, count);
            }
        }
    }
    drops
}

/// The kernel's drop counts of every UDP socket, read once for every
/// listener asking about the same moment: `/proc/net/udp` lists every
/// socket of the node, so a thousand listeners reading it each at every
/// flush would cost the node more than their statsd (the listeners flush
/// together, so one read serves them all).
/// The table is read on a blocking thread (it is megabytes on a node of
/// many sockets).
#[derive(Debug, Default)]
pub struct KernelDrops(tokio::sync::Mutex<Option<DropTable>>);

/// When a read of the drop table began, and what it read (none: it failed).
type DropTable = (Instant, Option<HashMap<u64, u64>>);

impl KernelDrops {
    /// The drops of the socket `inode`, as of a read begun at `since` or
    /// later (begun now when the last is older). None when that read did
    /// not succeed: the table cannot be read, or it took longer than
    /// [`DROPS_READ_DEADLINE`] (a flush then counts at the next, nothing
    /// is lost; a read that failed is not tried again for the same
    /// moment). A flush waits for a read under way (the listeners flush
    /// together, so all but one take the table it reads); only a flush
    /// waits here, never a read of a socket.
    pub async fn of(&self, inode: u64, since: Instant) -> Option<u64> {
        let mut table = self.0.lock().await;
        if table.as_ref().is_none_or(|(taken, _)| *taken < since) {
            let taken = Instant::now();
            let read = tokio::time::timeout(
                DROPS_READ_DEADLINE,
                tokio::task::spawn_blocking(|| kernel_drops("/proc/net".as_ref())),
            )
            .await;
            *table = Some((taken, read.ok().and_then(Result::ok)));
        }
        table.as_ref()?.1.as_ref()?.get(&inode).copied()
    }
}

/// How long reading the kernel's drop table may take.
const DROPS_READ_DEADLINE: Duration = Duration::from_millis(500);

/// How old a drop count a listener's flush takes.
const DROPS_FRESH: Duration = Duration::from_secs(1);

/// Counts into `stats` what the kernel dropped for the socket of `inode`
/// since `seen` (as of a read made at `since` or later), and logs it.
async fn count_kernel_drops(
    inode: Option<u64>,
    seen: &mut u64,
    settings: &StatsdSettings,
    since: Instant,
    stats: &Stats,
) {
    let Some(inode) = inode else {
        return;
    };
    let Some(drops) = settings.kernel_drops.of(inode, since).await else {
        return;
    };
    let new = drops.saturating_sub(*seen);
    *seen = drops;
    if new > 0 {
        stats
            .statsd_packets_dropped_by_kernel
            .fetch_add(new, Relaxed);
        crate::telemetry::throttled_warn("statsd kernel drops", |repeats| {
            warn!(
                dropped = new,
                repeats,
                "The kernel dropped statsd packets: the listener's receive buffer was full."
            );
        });
    }
}

/// Counts what a packet held into `stats` and `aggregator`.
pub fn take_packet(packet: &[u8], aggregator: &mut Aggregator, stats: &Stats) {
    stats.statsd_packets.fetch_add(1, Relaxed);
    let mut line = Line::default();
    let mut tags = Vec::new();
    // Counted once a packet: the counters are shared by every thread.
    let mut taken = 0;
    let mut rest = packet;
    while !rest.is_empty() {
        // Most lines are of the simplest form: read to their end in one
        // pass, without a `Line`.
        if let Some((name, kind, value, length)) = plain_line(rest) {
            taken += 1;
            aggregator.add_plain(kind, name, value);
            rest = rest.get(length + 1..).unwrap_or_default();
            continue;
        }
        let text = next_line(&mut rest);
        if text.is_empty() {
            continue;
        }
        let read = std::str::from_utf8(text)
            .map_err(|_| LineError::NotUtf8)
            .and_then(|text| line.read_general(text));
        match read {
            Ok(()) => {
                taken += 1;
                aggregator.add(&line, &mut tags);
            }
            Err(reason) => {
                stats.statsd_lines_malformed.fetch_add(1, Relaxed);
                crate::telemetry::throttled_warn("statsd line malformed", |repeats| {
                    warn!(%reason, repeats, "A statsd line was refused; the rest of its packet is read.");
                });
            }
        }
    }
    stats.statsd_lines.fetch_add(taken, Relaxed);
    // What the packet's values could not be taken for, counted at once.
    let refused = aggregator.take_refused();
    if refused != Default::default() {
        stats
            .statsd_series_refused
            .fetch_add(refused.series + refused.too_long, Relaxed);
        stats
            .statsd_set_members_refused
            .fetch_add(refused.set_members, Relaxed);
    }
}

/// The bytes a listener's senders sent in the current period.
struct Window {
    start: Instant,
    used: u64,
}

impl Window {
    /// Whether a packet of `len` bytes is within `limit` (and counts it).
    fn admits(&mut self, limit: Option<ByteLimit>, len: usize) -> bool {
        let Some(limit) = limit else {
            return true;
        };
        if self.start.elapsed() >= limit.period {
            self.start = Instant::now();
            self.used = 0;
        }
        let len = len as u64;
        if self.used.saturating_add(len) > limit.bytes {
            return false;
        }
        self.used += len;
        true
    }
}

impl StatsdListener {
    /// Runs until the shutdown begins, then reads what the socket holds,
    /// flushes and stops.
    pub fn spawn(self, shutdown: &Shutdown) -> Task {
        let stop = shutdown.begun().clone();
        Task::spawn("statsd", self.run(stop.clone(), stop))
    }

    /// Runs until `stop`, then reads what the socket holds, flushes and
    /// returns. A flush waiting for room in the buffer gives up 1 s after
    /// `shutdown` (its values counted as a `shutdown` drop).
    pub async fn run(self, stop: CancellationToken, shutdown: CancellationToken) {
        let StatsdListener {
            socket,
            destination,
            settings,
            limit,
            pipeline,
        } = self;
        let this = Parts {
            destination,
            settings,
            pipeline,
        };
        let local = socket.local_addr().ok();
        match &this.destination {
            Destination::Fixed { topic, .. } => {
                info!(address = ?local, %topic, flush = ?this.settings.flush, "Listening for statsd.");
            }
            Destination::Container(id) => {
                debug!(address = ?local, container_id = %id, "Listening for a container's statsd.");
            }
        }
        let mut state = FlushState {
            drops_seen: 0,
            unknown_flushes: 0,
        };
        let mut router = Router::default();
        let inode = inode(&socket);
        let reader = Arc::new(Reader {
            shared: tokio::sync::Mutex::new(Shared {
                aggregator: Aggregator::new(
                    this.settings.max_series,
                    &this.settings.percentiles,
                    this.settings.budget.clone(),
                ),
                window: Window {
                    start: Instant::now(),
                    used: 0,
                },
                socket: None,
            }),
            limit,
            stats: this.pipeline.stats.clone(),
            destination: this.destination.clone(),
        });
        let paced = this.settings.pacer.pace(socket.as_fd(), reader.clone());
        reader.shared.lock().await.socket = Some(socket);
        // A whole period at least before the first flush (a container
        // `/state` does not name yet has its flushes to wait for it).
        let mut tick = tokio::time::interval_at(
            this.settings
                .next_flush(
                    Instant::now()
                        .checked_add(this.settings.flush)
                        .unwrap_or_else(Instant::now),
                )
                .into(),
            this.settings.flush,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stats = this.pipeline.stats.clone();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    let since = Instant::now().checked_sub(DROPS_FRESH).unwrap_or_else(Instant::now);
                    count_kernel_drops(inode, &mut state.drops_seen, &this.settings, since, &stats).await;
                    if !this.flush(&reader.shared, &mut state, &mut router, &shutdown, false).await {
                        return;
                    }
                }
            }
        }
        // What arrived before the stop is flushed with the rest, and the
        // drops counted as of the stop (listeners stopping together share
        // one read of the table).
        let mut shared = reader.shared.lock().await;
        if let Some(socket) = &shared.socket {
            paced.leave(socket.as_fd());
        }
        let stopped = Instant::now();
        let _ = reader.read(&mut shared, DRAIN_PACKETS);
        drop(shared);
        count_kernel_drops(
            inode,
            &mut state.drops_seen,
            &this.settings,
            stopped,
            &stats,
        )
        .await;
        // What arrived while the drops were counted, then the port is let
        // go of before the last flush, which may wait for room in the
        // buffer: a deregistered container holds no descriptor meanwhile.
        let mut shared = reader.shared.lock().await;
        let _ = reader.read(&mut shared, DRAIN_PACKETS);
        shared.socket = None;
        drop(shared);
        this.flush(&reader.shared, &mut state, &mut router, &shutdown, true)
            .await;
    }
}

/// What a listener does with what it reads, its socket apart.
struct Parts {
    destination: Destination,
    settings: StatsdSettings,
    pipeline: Arc<Pipeline>,
}

/// What a listener's socket is read into: by the pacer's thread, and by
/// the listener's task at its stop; its flushes hold it only while they
/// make each piece of records.
struct Shared {
    /// Until the listener's stop.
    socket: Option<UdpSocket>,
    aggregator: Aggregator,
    window: Window,
}

/// A listener's socket and aggregator, as the pacer reads them.
struct Reader {
    shared: tokio::sync::Mutex<Shared>,
    /// Bytes its senders may send per period (none: no limit).
    limit: Option<ByteLimit>,
    stats: Arc<Stats>,
    destination: Destination,
}

impl Reader {
    /// Reads at most `packets` packets the socket holds now, each into
    /// the thread's buffer and taken at once; returns how many it read,
    /// as an error when a read failed before the socket was emptied.
    fn read(&self, shared: &mut Shared, packets: usize) -> Result<usize, usize> {
        let Shared {
            socket,
            aggregator,
            window,
        } = shared;
        let Some(socket) = socket else {
            return Ok(0);
        };
        PACKET.with_borrow_mut(|buffer| {
            let mut read = 0;
            while read < packets {
                match socket.recv(buffer) {
                    Ok(length) => {
                        read += 1;
                        self.take(&buffer[..length], aggregator, window);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        crate::telemetry::throttled_warn("statsd read failed", |repeats| {
                            warn!(%error, repeats, "A statsd read failed; the socket is read again at the next look.");
                        });
                        return Err(read);
                    }
                }
            }
            Ok(read)
        })
    }

    /// Takes one packet read, within the container's byte limit.
    fn take(&self, packet: &[u8], aggregator: &mut Aggregator, window: &mut Window) {
        let stats = &self.stats;
        if window.admits(self.limit, packet.len()) {
            take_packet(packet, aggregator, stats);
            return;
        }
        stats.statsd_packets_over_limit.fetch_add(1, Relaxed);
        let lines = raw_lines(packet).count();
        stats
            .statsd_lines_over_limit
            .fetch_add(lines as u64, Relaxed);
        crate::telemetry::throttled_warn("statsd over limit", |repeats| {
            warn!(
                destination = ?self.destination,
                repeats,
                "statsd packets were dropped: their container sent more than statsd_container_limit_kbytes in statsd_container_limit_secs."
            );
        });
    }
}

impl Source for Reader {
    fn read_turn(&self, packets: usize) -> Option<usize> {
        let mut shared = self.shared.try_lock().ok()?;
        self.read(&mut shared, packets).ok()
    }

    fn panicked(&self) {
        self.stats.task_panics.fetch_add(1, Relaxed);
        tracing::error!(destination = ?self.destination, "Reading a statsd socket panicked (a bug); its packet is lost, the socket is read on.");
    }
}

impl Parts {
    /// The topic and tags of this flush's records; none while a
    /// container's `/state` is awaited.
    fn resolve(&self, state: &mut FlushState, last: bool) -> Option<(String, Vec<Tag>)> {
        let id = match &self.destination {
            Destination::Fixed { topic, tags } => return Some((topic.clone(), tags.clone())),
            Destination::Container(id) => id,
        };
        let enrichment = self.pipeline.enrichment.borrow().clone();
        if let Some((framework, executor)) = enrichment.containers.get(id).and_then(|c| c.ids()) {
            return Some((
                framework.to_owned(),
                vec![
                    Tag::new("container_id", id),
                    Tag::new("executor_id", executor),
                    Tag::new("framework_id", framework),
                ],
            ));
        }
        if enrichment.enabled && !last && state.unknown_flushes < UNKNOWN_CONTAINER_FLUSHES {
            state.unknown_flushes += 1;
            // A container started since the last `/state`: a refresh names
            // it within seconds.
            let (_, unknown) = enrichment.tags_for_lookup(Kind::App, |key| {
                (key == "container_id").then_some(id.as_str())
            });
            if unknown {
                self.pipeline.refresh.notify_one();
            }
            return None;
        }
        Some((NODE_TOPIC.to_owned(), vec![Tag::new("container_id", id)]))
    }

    /// Pushes every series' value; false when the pipeline gave up (the
    /// shutdown's drain ended first).
    async fn flush(
        &self,
        shared: &tokio::sync::Mutex<Shared>,
        state: &mut FlushState,
        router: &mut Router,
        shutdown: &CancellationToken,
        last: bool,
    ) -> bool {
        let stats = &self.pipeline.stats;
        stats
            .statsd_bytes
            .store(self.settings.budget.used() as i64, Relaxed);
        if shared.lock().await.aggregator.is_empty() {
            return true;
        }
        let Some((topic, tags)) = self.resolve(state, last) else {
            return true;
        };
        let give_up = move || async move {
            shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        // One of FLUSH_TURNS: a piece is made only once it may be pushed.
        let turn = tokio::select! {
            turn = self.settings.flushing.acquire() => turn.ok(),
            () = give_up() => None,
        };
        let Some(_turn) = turn else {
            // The values stay in the aggregator; a listener that stops here
            // had its shutdown's drain end (what it held is not counted as
            // received, so nothing is lost from the accounting).
            return false;
        };
        // The aggregator is held while each piece is made, never while a
        // piece waits for room: the pacer reads the socket meanwhile (a
        // series made since is in the next flush; the values are
        // cumulative, so a piece made later only has newer ones).
        let order = shared.lock().await.aggregator.order();
        let mut next = 0;
        let time_ms = crate::sources::now_ms();
        loop {
            let records = shared.lock().await.aggregator.records_from(
                &order,
                &mut next,
                &topic,
                &tags,
                time_ms,
                FLUSH_PIECE_BYTES,
            );
            if records.is_empty() {
                return true;
            }
            if !self
                .pipeline
                .push_owned(router, Input::Statsd, records, give_up())
                .await
            {
                return false;
            }
        }
    }
}

/// What one listener keeps from one flush to the next.
struct FlushState {
    /// The kernel's drop count at the last look.
    drops_seen: u64,
    /// Flushes put off so far, the container unknown to `/state`.
    unknown_flushes: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A packet is taken as its lines, read one by one by the general
        /// reader, are (the path for the simplest lines, which builds no
        /// `Line` and finds each line's end as it reads, agrees with it):
        /// lines of every delimiter and white space, digits long and
        /// short, rates, types known and not.
        #[test]
        fn a_packet_is_taken_as_the_general_reader_reads_its_lines(
            lines in proptest::collection::vec(
                "[a-c:|@#,.+\\-0-9 smghe\t\r\u{e9}]{0,16}|[a-z.]{1,8}:[0-9]{1,20}\\|(c|g|s|ms|h|m|x)(\\|@[0-9.]{1,4}|\\|c:[a-z]{1,3})?[ \r\t]?",
                0..8,
            )
        ) {
            let packet = lines.join("\n");
            let stats = Stats::default();
            let mut taken = Aggregator::new(100, &[90.0], Budget::new(1 << 20));
            take_packet(packet.as_bytes(), &mut taken, &stats);
            let mut general = Aggregator::new(100, &[90.0], Budget::new(1 << 20));
            let (mut line, mut tags) = (Line::default(), Vec::new());
            let (mut read, mut refused) = (0, 0);
            for text in super::super::parse::lines(packet.as_bytes()) {
                match text.and_then(|text| line.read_general(text)) {
                    Ok(()) => {
                        read += 1;
                        general.add(&line, &mut tags);
                    }
                    Err(_) => refused += 1,
                }
            }
            proptest::prop_assert_eq!(stats.statsd_lines.load(Relaxed), read);
            proptest::prop_assert_eq!(stats.statsd_lines_malformed.load(Relaxed), refused);
            proptest::prop_assert_eq!(
                format!("{:?}", taken.records("t", &[], 0)),
                format!("{:?}", general.records("t", &[], 0))
            );
        }
    }

    fn listener(destination: Destination, enrichment: crate::enrich::Enrichment) -> Parts {
        Parts {
            destination,
            settings: StatsdSettings::new(&crate::config::Config::default()),
            pipeline: crate::pipeline::test_pipeline(enrichment).0,
        }
    }

    fn read_state() -> FlushState {
        FlushState {
            drops_seen: 0,
            unknown_flushes: 0,
        }
    }

    /// A container's records go to its framework's topic with its ids;
    /// while `/state` does not name it, a few flushes wait (and ask for a
    /// refresh), then they go to `statsd` with its id alone; the last
    /// flush never waits.
    #[tokio::test]
    async fn a_containers_records_go_to_its_framework_once_state_names_it() {
        let state = serde_json::json!({
            "id": "agent",
            "frameworks": [{"id": "fw", "name": "marathon", "executors": [
                {"id": "ex", "container": "c", "tasks": []}
            ]}]
        });
        let known = crate::enrich::Enrichment::from_state(&state);
        let ids = |id: &str, ex: &str, fw: &str| {
            vec![
                Tag::new("container_id", id),
                Tag::new("executor_id", ex),
                Tag::new("framework_id", fw),
            ]
        };
        let l = listener(Destination::Container("c".into()), known.clone());
        assert_eq!(
            l.resolve(&mut read_state(), false),
            Some(("fw".into(), ids("c", "ex", "fw")))
        );
        let l = listener(Destination::Container("new".into()), known);
        let mut state = read_state();
        for _ in 0..UNKNOWN_CONTAINER_FLUSHES {
            assert_eq!(l.resolve(&mut state, false), None);
        }
        let alone = Some((NODE_TOPIC.to_owned(), vec![Tag::new("container_id", "new")]));
        assert_eq!(l.resolve(&mut state, false), alone);
        assert_eq!(l.resolve(&mut read_state(), true), alone, "the last flush");
        // Asked for once.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), l.pipeline.refresh.notified())
                .await
                .is_ok()
        );
        // Without agent polling nothing will name it: no wait.
        let l = listener(
            Destination::Container("c".into()),
            crate::enrich::Enrichment::default(),
        );
        assert_eq!(
            l.resolve(&mut read_state(), false),
            Some((NODE_TOPIC.to_owned(), vec![Tag::new("container_id", "c")]))
        );
        let fixed = Destination::Fixed {
            topic: "t".into(),
            tags: vec![Tag::new("k", "v")],
        };
        let l = listener(fixed, crate::enrich::Enrichment::default());
        assert_eq!(
            l.resolve(&mut read_state(), false),
            Some(("t".into(), vec![Tag::new("k", "v")]))
        );
    }

    /// Every listener flushes on one grid: the next point after `now`,
    /// whole periods after the epoch, within one period.
    #[test]
    fn flushes_fall_on_one_grid() {
        let settings = StatsdSettings::new(&crate::config::Config::default());
        let epoch = settings.flush_epoch;
        for after in [0, 1, 9_999, 10_000, 10_001, 123_456] {
            let now = epoch + Duration::from_millis(after);
            let next = settings.next_flush(now);
            assert!(next > now && next <= now + settings.flush, "{after}");
            assert_eq!(
                (next - epoch).as_nanos() % settings.flush.as_nanos(),
                0,
                "{after}"
            );
        }
        // At the epoch itself (a listener started as the settings were
        // made): one period after it.
        assert_eq!(settings.next_flush(epoch), epoch + settings.flush);
    }

    #[test]
    fn a_byte_limit_admits_its_bytes_a_period() {
        let limit = Some(ByteLimit {
            bytes: 100,
            period: Duration::from_secs(3600),
        });
        let mut window = Window {
            start: Instant::now(),
            used: 0,
        };
        assert!(window.admits(limit, 60));
        assert!(window.admits(limit, 40));
        assert!(!window.admits(limit, 1));
        assert!(window.admits(None, 1_000_000));
        // A period over: the window starts again.
        let over = Some(ByteLimit {
            bytes: 100,
            period: Duration::ZERO,
        });
        assert!(window.admits(over, 100));
        assert!(window.admits(over, 100));
    }

    #[test]
    fn kernel_drops_are_read_by_inode_from_either_table() {
        let dir = tempfile::tempdir().unwrap();
        let header = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n";
        std::fs::write(
            dir.path().join("udp"),
            format!("{header}  12: 0100007F:A3D5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("udp6"),
            format!("{header}   3: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 5\n"),
        )
        .unwrap();
        let drops = kernel_drops(dir.path());
        assert_eq!(drops.get(&4242), Some(&17));
        assert_eq!(drops.get(&777), Some(&5));
        assert_eq!(drops.get(&1), None);
        assert_eq!(drops.len(), 2);
    }
}
