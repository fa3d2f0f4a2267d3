//! When the statsd sockets are read: at a pace, not at each packet.
//!
//! statsd is aggregated and flushed every `statsd_flush_secs`, so a packet
//! read 200 ms after it arrived loses nothing; but a process woken for each
//! packet pays a wake-up for each (most of the CPU at a few thousand
//! packets a second, and on a node of many containers each sends a few).
//! So the statsd sockets are not in the runtime's reactor: they are in an
//! epoll set of their own, never waited on, which one thread looks at
//! without blocking, at a pace, reading each socket that received packets
//! since the last look into its listener's aggregator. The set is
//! edge-triggered: a look is told only of the sockets that received since
//! the last one (a level-triggered set would check again, at each look,
//! every socket it reported at the one before), and a socket whose turn
//! may have left packets is read again at the next look. After a look
//! that read [`BUSY_PACKETS`] from one socket the next comes [`SOON`], and
//! at once after one that read as many as a turn may, so a socket that
//! receives faster than a turn reads is read continuously; after a look
//! that could not read a socket, the next comes within [`PACE`]; after a
//! quiet one, within [`quiet_pace`] (50 to 200 ms), so a quiet node is
//! looked at 5 to 20 times a second, whatever its number of sockets.
//!
//! What waits meanwhile is in the socket's receive buffer; each statsd
//! socket asks for [`RECEIVE_BUFFER`] (the kernel caps it at
//! `net.core.rmem_max`), and what the kernel drops when one is full is
//! counted (`collector_statsd_packets_dropped_by_kernel_total`).
//! The pace between quiet looks follows the smallest buffer the kernel
//! grants: [`PACE`] with Linux's default cap, longer (to [`LONGEST_PACE`])
//! where the cap is higher. A quiet socket so takes, until the next look,
//! a burst at the rate that fills a default buffer in [`PACE`] (about
//! 8.5 MB/s of the kernel's memory, some 10,000 small packets a second),
//! wherever every buffer granted is at least the default: where the cap
//! is raised, the larger buffer is spent on fewer wake-ups (each costs
//! CPU, whatever the look finds) rather than on a faster burst.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rustix::event::epoll;
use tracing::{info, warn};

/// How often the statsd sockets are looked at, at most, when all are
/// quiet and their buffers are of Linux's default size.
pub const PACE: Duration = Duration::from_millis(50);

/// The longest wait between two looks, whatever the buffers hold.
pub const LONGEST_PACE: Duration = Duration::from_millis(200);

/// The receive buffer Linux grants by default at most, in bytes: twice
/// the default `net.core.rmem_max` (212,992), about 500 small packets.
pub const DEFAULT_GRANTED: usize = 2 * 212_992;

/// Packets one socket's turn reads, at most; a look at which one read as
/// many is followed by another at once.
pub const READS_PER_TURN: usize = 256;

/// Packets of one socket's turn past which the next look comes after
/// [`SOON`] rather than the quiet pace: a busy socket is read before its
/// buffer fills.
const BUSY_PACKETS: usize = 32;

/// How soon the next look comes after a busy one.
const SOON: Duration = Duration::from_millis(2);

/// The receive buffer each statsd socket asks for, in bytes (the kernel
/// doubles it, within `net.core.rmem_max`).
pub const RECEIVE_BUFFER: usize = 1 << 20;

/// A socket the pacer reads.
pub trait Source: Send + Sync {
    /// Reads at most `packets` packets of what the socket holds now, until
    /// it holds none; how many it read, or none when it could not read
    /// until then (its listener is flushing or stopping, or a read failed;
    /// the next look tries again). The set reports a socket only when
    /// packets arrive, so fewer than `packets` must mean it was emptied.
    fn read_turn(&self, packets: usize) -> Option<usize>;

    /// A read panicked (a bug): counted and logged; the socket is read on.
    fn panicked(&self);
}

/// The statsd sockets' epoll set, and what each is read into.
pub struct Pacer {
    epoll: Option<OwnedFd>,
    sources: Mutex<Sources>,
    next: AtomicU64,
    /// Looks so far.
    looks: AtomicU64,
    /// Whether the thread that looks is running.
    looking: Mutex<bool>,
    /// The smallest receive buffer granted to a socket paced now, in bytes
    /// (`usize::MAX` when none is), kept by [`Pacer::insert`] and
    /// [`Pacer::remove`] under the sources' lock.
    granted: AtomicUsize,
    /// The thread that looks, woken when a socket joins whose buffer
    /// shortens the pace.
    thread: Mutex<Option<std::thread::Thread>>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("epoll", &self.epoll)
            .field("sources", &lock(&self.sources).paces.len())
            .finish_non_exhaustive()
    }
}

impl Default for Pacer {
    fn default() -> Self {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .inspect_err(|error| {
                warn!(%error, "No epoll set for the statsd sockets: every one is read at each look.");
            })
            .ok();
        Self {
            epoll,
            sources: Mutex::default(),
            next: AtomicU64::new(0),
            looks: AtomicU64::new(0),
            looking: Mutex::new(false),
            granted: AtomicUsize::new(usize::MAX),
            thread: Mutex::new(None),
        }
    }
}

impl Pacer {
    /// Reads `source` whenever its `socket` holds packets, from the next
    /// look on, until the returned [`Paced`] leaves. Starts the thread
    /// that looks when it is not running.
    pub fn pace(self: &Arc<Self>, socket: BorrowedFd<'_>, source: Arc<dyn Source>) -> Paced {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(socket, RECEIVE_BUFFER);
        // Unknown: taken as the smallest (the shortest pace).
        let granted = rustix::net::sockopt::socket_recv_buffer_size(socket).unwrap_or(0);
        let id = self.next.fetch_add(1, Relaxed);
        let in_set = self.epoll.as_ref().is_some_and(|epoll| {
            epoll::add(
                epoll,
                socket,
                epoll::EventData::new_u64(id),
                epoll::EventFlags::IN | epoll::EventFlags::ET,
            )
            .inspect_err(|error| {
                crate::telemetry::throttled_warn("statsd epoll add", |repeats| {
                    warn!(%error, repeats, "A statsd socket could not join the epoll set: it is read at every look.");
                });
            })
            .is_ok()
        });
        self.insert(
            id,
            Paces {
                source,
                in_set,
                look: 0,
                granted,
            },
        );
        let mut looking = lock(&self.looking);
        if !*looking {
            // A thread that ended may have taken reports it did not read:
            // the next one reads every socket once.
            let mut sources = lock(&self.sources);
            let Sources { paces, again, .. } = &mut *sources;
            again.extend(paces.keys().copied());
            drop(sources);
            let pacer = Arc::downgrade(self);
            match std::thread::Builder::new()
                .name("statsd".into())
                .spawn(move || {
                    // Whatever ends the thread, the next socket paced
                    // starts another.
                    let _ended = Ended(pacer.clone());
                    look(&pacer);
                }) {
                Ok(handle) => {
                    *looking = true;
                    *lock(&self.thread) = Some(handle.thread().clone());
                    let granted = self.granted.load(Relaxed);
                    info!(
                        receive_buffer_bytes = granted,
                        quiet_pace_ms = self.quiet_pace().as_millis() as u64,
                        "The statsd sockets are read by their own thread, at each look: every quiet_pace_ms while they are quiet (50 ms with Linux's default net.core.rmem_max, to 200 ms from 832 KiB), sooner while one is busy."
                    );
                }
                Err(error) => {
                    crate::telemetry::throttled_warn("statsd thread", |repeats| {
                        warn!(%error, repeats, "The thread that reads the statsd sockets could not start; the next registration tries again. Until it does, what they receive is dropped by the kernel, counted.");
                    });
                }
            }
        }
        Paced {
            id,
            in_set,
            pacer: self.clone(),
        }
    }

    /// Puts in `ready` the sources to read at this look: those whose
    /// socket received packets since the last look, those whose last turn
    /// may have left some, and those not in the set (every source, where
    /// the set is missing or did not answer). `events` is the look's
    /// scratch.
    fn ready(&self, events: &mut Vec<epoll::Event>, ready: &mut Vec<(u64, Arc<dyn Source>)>) {
        ready.clear();
        events.clear();
        let mut sources = lock(&self.sources);
        let Sources {
            paces,
            again,
            outside,
        } = &mut *sources;
        let every = |ready: &mut Vec<_>| {
            ready.extend(paces.iter().map(|(id, p)| (*id, p.source.clone())));
        };
        let Some(epoll) = &self.epoll else {
            again.clear();
            return every(ready);
        };
        // Room for every socket: one call sees them all.
        events.reserve(paces.len().max(1));
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if epoll::wait(
            epoll,
            rustix::buffer::spare_capacity(events),
            Some(&timeout),
        )
        .is_err()
        {
            again.clear();
            return every(ready);
        }
        let look = self.looks.fetch_add(1, Relaxed) + 1;
        let reported = events.iter().map(|event| event.data.u64());
        for id in reported.chain(again.drain(..)) {
            // A source both reported and to read again is read once.
            if let Some(p) = paces.get_mut(&id)
                && p.look != look
            {
                p.look = look;
                ready.push((id, p.source.clone()));
            }
        }
        if *outside > 0 {
            for (id, p) in paces.iter_mut() {
                if !p.in_set && p.look != look {
                    p.look = look;
                    ready.push((*id, p.source.clone()));
                }
            }
        }
    }

    /// The wait after a quiet look: see [`quiet_pace`].
    fn quiet_pace(&self) -> Duration {
        quiet_pace(self.granted.load(Relaxed))
    }

    /// Adds source `id`, to read at the next look (its socket may hold
    /// packets already).
    fn insert(&self, id: u64, paces: Paces) {
        let granted = paces.granted;
        let mut sources = lock(&self.sources);
        sources.outside += usize::from(!paces.in_set);
        let before = self.granted.fetch_min(granted, Relaxed);
        sources.paces.insert(id, paces);
        sources.again.push(id);
        drop(sources);
        if quiet_pace(granted) < quiet_pace(before) {
            // The thread may be waiting a longer pace than this socket's
            // buffer allows: it looks now, and at the shorter pace after.
            if let Some(thread) = &*lock(&self.thread) {
                thread.unpark();
            }
        }
    }

    /// Forgets source `id`.
    fn remove(&self, id: u64) {
        let mut sources = lock(&self.sources);
        if let Some(paces) = sources.paces.remove(&id) {
            sources.outside -= usize::from(!paces.in_set);
            if paces.granted <= self.granted.load(Relaxed) {
                // It may have been the smallest: the pace may lengthen.
                let smallest = sources.paces.values().map(|p| p.granted).min();
                self.granted.store(smallest.unwrap_or(usize::MAX), Relaxed);
            }
        }
        sources.again.retain(|again| *again != id);
    }

    /// Marks sources to read at the next look (their turn read all it
    /// could, or could not read).
    fn again(&self, ids: &[u64]) {
        lock(&self.sources).again.extend_from_slice(ids);
    }
}

/// The paced sources.
#[derive(Default)]
struct Sources {
    paces: HashMap<u64, Paces>,
    /// Sources to read at the next look whatever the set reports: their
    /// socket may hold packets it will not report (a turn read all it
    /// could, or none; or it just joined).
    again: Vec<u64>,
    /// Sources whose socket is not in the set.
    outside: usize,
}

/// A paced source.
struct Paces {
    source: Arc<dyn Source>,
    /// Whether its socket is in the set (one that could not join is read
    /// at every look).
    in_set: bool,
    /// The last look that read it.
    look: u64,
    /// The receive buffer the kernel granted its socket, in bytes.
    granted: usize,
}

/// Looks at the set at its pace (see the module) while the pacer lives,
/// and reads the sockets that received packets: a thread of its own,
/// woken once a look, whatever the runtime's threads are doing.
fn look(pacer: &Weak<Pacer>) {
    let mut wait = PACE;
    let mut events = Vec::new();
    let mut ready = Vec::new();
    let mut again = Vec::new();
    loop {
        if !wait.is_zero() {
            // Woken sooner when a socket joins whose buffer shortens the
            // pace (or, rarely, for nothing: one more look).
            std::thread::park_timeout(wait);
        }
        let Some(pacer) = pacer.upgrade() else {
            return;
        };
        pacer.ready(&mut events, &mut ready);
        let mut most = 0;
        again.clear();
        for (id, source) in ready.drain(..) {
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                source.read_turn(READS_PER_TURN)
            }))
            .unwrap_or_else(|_| {
                source.panicked();
                None
            });
            // A turn that read all it could may have left packets, and
            // one that could not read left them all.
            if read.is_none_or(|read| read >= READS_PER_TURN) {
                again.push(id);
            }
            most = most.max(read.unwrap_or(0));
        }
        if !again.is_empty() {
            pacer.again(&again);
        }
        wait = if most >= READS_PER_TURN {
            Duration::ZERO
        } else if most >= BUSY_PACKETS {
            SOON
        } else if !again.is_empty() {
            // A socket could not be read (its listener was flushing, or a
            // read failed): no later than at the default pace.
            PACE
        } else {
            pacer.quiet_pace()
        };
        drop(pacer);
    }
}

/// The wait after a quiet look, when the smallest receive buffer granted
/// is `granted` bytes: [`PACE`] scaled by `granted` against
/// [`DEFAULT_GRANTED`], within [`PACE`] and [`LONGEST_PACE`]. With a
/// buffer of the default size or larger, a burst at the rate that fills a
/// default buffer in [`PACE`] fills it no sooner than the next look (with
/// Linux's defaults, the pace is [`PACE`]); a node whose kernel grants
/// more is woken less often, not read sooner.
pub fn quiet_pace(granted: usize) -> Duration {
    PACE.mul_f64(granted as f64 / DEFAULT_GRANTED as f64)
        .clamp(PACE, LONGEST_PACE)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks the thread that looks as ended when dropped.
struct Ended(Weak<Pacer>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some(pacer) = self.0.upgrade() {
            *lock(&pacer.looking) = false;
        }
    }
}

/// A paced socket's place in the pacer; it leaves when dropped (or, to let
/// the socket go of the set before it closes, by [`Paced::leave`]).
#[derive(Debug)]
pub struct Paced {
    id: u64,
    in_set: bool,
    pacer: Arc<Pacer>,
}

impl Paced {
    /// Leaves the pacer: `socket` (the one paced) is read no more.
    pub fn leave(mut self, socket: BorrowedFd<'_>) {
        self.pacer.remove(self.id);
        if self.in_set
            && let Some(epoll) = &self.pacer.epoll
        {
            let _ = epoll::delete(epoll, socket);
        }
        self.in_set = false;
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        // A socket still in the set leaves it when it closes.
        self.pacer.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Instant;

    use super::*;

    /// Counts what it reads.
    struct Counting {
        socket: UdpSocket,
        read: AtomicUsize,
        turns: AtomicUsize,
        panics: std::sync::atomic::AtomicBool,
        panicked: AtomicUsize,
    }

    impl Source for Counting {
        fn read_turn(&self, packets: usize) -> Option<usize> {
            let mut buf = [0; 64];
            let mut read = 0;
            while read < packets && self.socket.recv(&mut buf).is_ok() {
                read += 1;
            }
            self.read.fetch_add(read, Relaxed);
            self.turns.fetch_add(1, Relaxed);
            assert!(!self.panics.load(Relaxed), "a bug");
            Some(read)
        }

        fn panicked(&self) {
            self.panicked.fetch_add(1, Relaxed);
        }
    }

    fn counting() -> Arc<Counting> {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        Arc::new(Counting {
            socket,
            read: AtomicUsize::new(0),
            turns: AtomicUsize::new(0),
            panics: std::sync::atomic::AtomicBool::new(false),
            panicked: AtomicUsize::new(0),
        })
    }

    /// Waits (at most 10 s) until `source` read `packets`.
    fn wait_for(source: &Counting, packets: usize) {
        let start = Instant::now();
        while source.read.load(Relaxed) < packets {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "read {} of {packets}",
                source.read.load(Relaxed)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `packets` to `source`, never more than 100 ahead of what it
    /// read (its buffer never fills); returns once it read them all.
    fn send(source: &Counting, packets: usize) {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = source.socket.local_addr().unwrap();
        let before = source.read.load(Relaxed);
        for sent in 0..packets {
            if sent % 100 == 0 {
                wait_for(source, before + sent.saturating_sub(100));
            }
            sender.send_to(b"a:1|c", to).unwrap();
        }
        wait_for(source, before + packets);
    }

    fn paced(pacer: &Arc<Pacer>, sources: &[Arc<Counting>]) -> Vec<Paced> {
        sources
            .iter()
            .map(|s| pacer.pace(s.socket.as_fd(), s.clone() as Arc<dyn Source>))
            .collect()
    }

    /// Every socket is read, the quiet ones and a busy one (more than
    /// a turn reads, so read at once again); a socket let go is read no
    /// more and its place is gone.
    #[test]
    fn every_socket_that_holds_packets_is_read_until_it_leaves() {
        let pacer = Arc::new(Pacer::default());
        assert!(pacer.epoll.is_some());
        let sources: Vec<Arc<Counting>> = (0..3).map(|_| counting()).collect();
        let mut places = paced(&pacer, &sources);
        send(&sources[0], 1);
        send(&sources[1], 10);
        send(&sources[2], 3 * READS_PER_TURN);
        assert_eq!(sources[0].read.load(Relaxed), 1);
        assert_eq!(sources[1].read.load(Relaxed), 10);
        // Only the sockets that held packets were read.
        let turns = sources[0].turns.load(Relaxed);
        assert!(turns <= 2, "{turns}");
        // Let go: out of the set and of the pacer.
        let last = places.pop().unwrap();
        last.leave(sources[2].socket.as_fd());
        assert_eq!(lock(&pacer.sources).paces.len(), 2);
        drop(places);
        assert!(lock(&pacer.sources).paces.is_empty());
    }

    /// The set reports a socket only when packets arrive: one that held
    /// packets when it joined, more than a turn reads, is read to its last
    /// packet though none arrives after.
    #[test]
    fn a_socket_left_holding_packets_is_read_again_though_none_arrives() {
        let pacer = Arc::new(Pacer::default());
        let source = counting();
        rustix::net::sockopt::set_socket_recv_buffer_size(&source.socket, RECEIVE_BUFFER).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = source.socket.local_addr().unwrap();
        let packets = READS_PER_TURN + 20;
        for _ in 0..packets {
            sender.send_to(b"a:1|c", to).unwrap();
        }
        let _place = pacer.pace(source.socket.as_fd(), source.clone() as Arc<dyn Source>);
        wait_for(&source, packets);
        assert!(source.turns.load(Relaxed) >= 2);
    }

    /// A socket that could not join the set (here: its descriptor is in
    /// it already) is read at every look; a read that panics is counted
    /// and the thread reads on.
    #[test]
    fn a_socket_outside_the_set_is_read_and_a_panic_is_counted() {
        let pacer = Arc::new(Pacer::default());
        let a = counting();
        let b = counting();
        let _a = pacer.pace(a.socket.as_fd(), a.clone() as Arc<dyn Source>);
        let _b = pacer.pace(a.socket.as_fd(), b.clone() as Arc<dyn Source>);
        assert!(!_b.in_set);
        send(&b, 2 * READS_PER_TURN);
        b.panics.store(true, Relaxed);
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"a:1|c", b.socket.local_addr().unwrap())
            .unwrap();
        let start = Instant::now();
        while b.panicked.load(Relaxed) == 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        b.panics.store(false, Relaxed);
        send(&a, 3);
        assert!(*lock(&pacer.looking), "the thread reads on");
    }

    /// The wait between quiet looks follows the smallest buffer granted:
    /// no longer, against a default buffer's, than the default pace.
    #[test]
    fn quiet_looks_are_paced_by_the_smallest_buffer_granted() {
        assert_eq!(quiet_pace(DEFAULT_GRANTED), PACE);
        assert_eq!(quiet_pace(2 * DEFAULT_GRANTED), 2 * PACE);
        assert_eq!(quiet_pace(DEFAULT_GRANTED / 2), PACE);
        assert_eq!(quiet_pace(100 * DEFAULT_GRANTED), LONGEST_PACE);
        assert_eq!(quiet_pace(usize::MAX), LONGEST_PACE);
        assert_eq!(quiet_pace(0), PACE);
        // Each socket paced is asked for its buffer, and the smallest
        // kept.
        let pacer = Arc::new(Pacer::default());
        let small = counting();
        let _small = pacer.pace(small.socket.as_fd(), small.clone() as Arc<dyn Source>);
        let granted = rustix::net::sockopt::socket_recv_buffer_size(&small.socket).unwrap();
        assert_eq!(pacer.granted.load(Relaxed), granted);
        assert_eq!(pacer.quiet_pace(), quiet_pace(granted));
        // A smaller buffer shortens the pace for all while it is paced,
        // and no longer.
        let other = counting();
        pacer.insert(
            u64::MAX,
            Paces {
                source: other,
                in_set: false,
                look: 0,
                granted: 4096,
            },
        );
        assert_eq!(pacer.granted.load(Relaxed), 4096);
        assert_eq!(pacer.quiet_pace(), PACE);
        pacer.remove(u64::MAX);
        assert_eq!(pacer.granted.load(Relaxed), granted);
        drop(_small);
        assert_eq!(pacer.granted.load(Relaxed), usize::MAX);
    }

    /// Without an epoll set, every socket is read at every look.
    #[test]
    fn without_an_epoll_set_every_socket_is_read_at_every_look() {
        let pacer = Arc::new(Pacer {
            epoll: None,
            ..Pacer::default()
        });
        let sources: Vec<Arc<Counting>> = (0..2).map(|_| counting()).collect();
        let _places = paced(&pacer, &sources);
        send(&sources[0], 5);
        send(&sources[1], 2 * READS_PER_TURN);
        // The quiet one was looked at too.
        let start = Instant::now();
        while sources[0].turns.load(Relaxed) < 3 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
