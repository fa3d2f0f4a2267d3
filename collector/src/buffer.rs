//! The bounded buffer between the inputs and the sink, with its full policy.
//! This is the seam where a disk spool will go.
//!
//! The bound, `buffer_max_bytes`, is a **memory budget**: every byte a
//! record holds from the moment an input starts decoding its block until
//! librdkafka has taken it is counted against it, through [`Lease`]s.
//!
//! - An input asks for a lease on what decoding and routing a block can take
//!   at most ([`Buffer::reserve`]), before it decodes. Routing keeps what its
//!   records take (each record's share: its bytes, its bookkeeping, its part
//!   of its allocation's size class) and the rest goes back at once.
//! - The records' lease moves with them: the queued chunk holds it, then the
//!   batch a record joins, then the Kafka message it goes out in, until
//!   librdkafka has copied it. A record dropped on the way gives its share
//!   back.
//! - `block`: a reservation waits until there is room, so the input
//!   connection stops reading and its sender sees TCP backpressure. Waiters
//!   are served in order, so a large block is not starved by small ones.
//! - `drop_oldest`: a reservation evicts the oldest queued chunks to make
//!   room, and counts what it evicted as `buffer_full` drops.
//!
//! A request larger than the whole bound is granted only when nothing else
//! is held, so that no input can deadlock; inputs refuse blocks that large
//! before asking.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::FullPolicy;
use crate::route::{Records, Routed};
use crate::stats::{DropReason, Stats};

/// What the buffer holds: the records routed from one input block, with
/// the lease on what they take.
pub type Chunk = Records;

impl Chunk {
    /// The bytes of the bound the chunk holds.
    pub fn bytes(&self) -> usize {
        self.lease.bytes()
    }

    /// Datapoints in the chunk.
    pub fn datapoints(&self) -> u64 {
        self.items.iter().map(|r| u64::from(r.datapoints)).sum()
    }
}

/// What an allocation of `n` bytes takes in the collector's allocator
/// (mimalloc): sizes up to 64 bytes are rounded to 8, larger ones to one of
/// four size classes per power of two, so a request can take up to a
/// quarter more than it asked for. With another allocator this slightly
/// over-counts, which keeps the bound on the safe side.
pub fn allocated_size(n: usize) -> usize {
    if n <= 64 {
        return n.next_multiple_of(8);
    }
    let log2 = usize::BITS - 1 - (n - 1).leading_zeros();
    n.next_multiple_of(1 << (log2 - 2))
}

/// Heap a record's bookkeeping takes wherever it waits (its [`Routed`]).
pub const RECORD_OVERHEAD: usize = std::mem::size_of::<Routed>();

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CLOSED: u8 = 2;

struct Waiter {
    want: usize,
    state: AtomicU8,
    notify: Notify,
}

struct BudgetState {
    used: usize,
    waiters: VecDeque<Arc<Waiter>>,
    closed: bool,
}

/// The gauge a budget keeps up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// `buffer_bytes` and its high-water mark.
    BufferBytes,
    /// `kafka_retry_bytes`.
    KafkaRetryBytes,
}

/// A byte budget with fair waiting: requests are granted in the order they
/// were made.
pub struct Budget {
    capacity: usize,
    state: Mutex<BudgetState>,
    gauge: Option<(Arc<Stats>, Gauge)>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget({} of {})", self.used(), self.capacity)
    }
}

impl Budget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: usize, stats: Option<Arc<Stats>>) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            state: Mutex::new(BudgetState {
                used: 0,
                waiters: VecDeque::new(),
                closed: false,
            }),
            gauge: stats.map(|stats| (stats, Gauge::BufferBytes)),
        })
    }

    /// An unbounded budget that only counts, into `gauge`: for bytes bounded
    /// elsewhere that should still be seen.
    pub fn for_gauge(stats: Arc<Stats>, gauge: Gauge) -> Arc<Self> {
        let mut budget = Self::new(usize::MAX, None);
        if let Some(budget) = Arc::get_mut(&mut budget) {
            budget.gauge = Some((stats, gauge));
        }
        budget
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        // Every update is a few integer operations and queue moves: a panic
        // elsewhere can't leave the state half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn fits(&self, used: usize, want: usize) -> bool {
        used == 0 || used.saturating_add(want) <= self.capacity
    }

    fn publish(&self, used: usize) {
        match &self.gauge {
            Some((stats, Gauge::BufferBytes)) => stats.set_buffer_bytes(used),
            Some((stats, Gauge::KafkaRetryBytes)) => stats.kafka_retry_bytes.store(
                i64::try_from(used).unwrap_or(i64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            ),
            None => {}
        }
    }

    /// Takes `n` bytes if they fit now and nobody is waiting before us.
    pub fn try_acquire(self: &Arc<Self>, n: usize) -> Option<Lease> {
        let mut state = self.lock();
        if state.closed || !state.waiters.is_empty() || !self.fits(state.used, n) {
            return None;
        }
        state.used += n;
        self.publish(state.used);
        Some(self.lease(n))
    }

    /// Waits for `n` bytes, in turn. `None` once the budget is closed.
    pub async fn acquire(self: &Arc<Self>, n: usize) -> Option<Lease> {
        let waiter = {
            let mut state = self.lock();
            if state.closed {
                return None;
            }
            if state.waiters.is_empty() && self.fits(state.used, n) {
                state.used += n;
                self.publish(state.used);
                return Some(self.lease(n));
            }
            let waiter = Arc::new(Waiter {
                want: n,
                state: AtomicU8::new(WAITING),
                notify: Notify::new(),
            });
            state.waiters.push_back(waiter.clone());
            waiter
        };
        // If this future is dropped while waiting (the caller gave up), the
        // guard takes the request back, or returns what was just granted.
        let guard = WaitGuard {
            budget: self,
            waiter: &waiter,
        };
        loop {
            match waiter.state.load(Ordering::Acquire) {
                GRANTED => {
                    std::mem::forget(guard);
                    return Some(self.lease(n));
                }
                CLOSED => {
                    std::mem::forget(guard);
                    return None;
                }
                _ => waiter.notify.notified().await,
            }
        }
    }

    /// Takes `n` bytes without waiting, beyond the bound if need be: for
    /// bytes that can't wait (a message handed back by librdkafka).
    pub fn force(self: &Arc<Self>, n: usize) -> Lease {
        let mut state = self.lock();
        state.used += n;
        self.publish(state.used);
        self.lease(n)
    }

    fn lease(self: &Arc<Self>, bytes: usize) -> Lease {
        Lease {
            budget: Some(self.clone()),
            bytes,
        }
    }

    fn release(&self, n: usize) {
        let mut state = self.lock();
        state.used -= n.min(state.used);
        self.grant_waiters(&mut state);
        self.publish(state.used);
    }

    fn grant_waiters(&self, state: &mut BudgetState) {
        while let Some(front) = state.waiters.front() {
            if !self.fits(state.used, front.want) {
                break;
            }
            state.used += front.want;
            front.state.store(GRANTED, Ordering::Release);
            front.notify.notify_one();
            state.waiters.pop_front();
        }
    }

    /// No more reservations: every waiter, and every later request, gets
    /// `None`. Leases already granted stay valid.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for waiter in state.waiters.drain(..) {
            waiter.state.store(CLOSED, Ordering::Release);
            waiter.notify.notify_one();
        }
    }
}

struct WaitGuard<'a> {
    budget: &'a Budget,
    waiter: &'a Arc<Waiter>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        match self.waiter.state.load(Ordering::Acquire) {
            GRANTED => {
                state.used -= self.waiter.want.min(state.used);
                self.budget.grant_waiters(&mut state);
                self.budget.publish(state.used);
            }
            WAITING => {
                state.waiters.retain(|w| !Arc::ptr_eq(w, self.waiter));
                // A large request leaving the head may let smaller ones in.
                self.budget.grant_waiters(&mut state);
            }
            _ => {}
        }
    }
}

/// Bytes held against a [`Budget`], given back when dropped.
pub struct Lease {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.bytes)
    }
}

impl Lease {
    /// A lease on no budget, for records made outside the collector's
    /// pipeline (tests, tools): it counts nothing.
    pub fn detached() -> Self {
        Self {
            budget: None,
            bytes: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Moves `n` of this lease's bytes into a lease of their own. When this
    /// lease holds fewer, the difference is taken from the budget without
    /// waiting (an estimate fell short; it never should).
    pub fn split(&mut self, n: usize) -> Lease {
        let taken = n.min(self.bytes);
        self.bytes -= taken;
        match &self.budget {
            Some(budget) if n > taken => {
                let mut extra = budget.force(n - taken);
                extra.bytes += taken;
                extra
            }
            budget => Lease {
                budget: budget.clone(),
                bytes: if budget.is_some() { n } else { 0 },
            },
        }
    }

    /// Adds another lease's bytes to this one.
    pub fn merge(&mut self, mut other: Lease) {
        if self.budget.is_none() {
            self.budget = other.budget.clone();
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.bytes > 0
            && let Some(budget) = &self.budget
        {
            budget.release(self.bytes);
        }
    }
}

struct Queue {
    chunks: VecDeque<Chunk>,
    closed: bool,
}

/// A bounded, memory-counted, multi-producer single-consumer queue.
pub struct Buffer {
    budget: Arc<Budget>,
    queue: Mutex<Queue>,
    policy: Mutex<FullPolicy>,
    /// A chunk was queued (the sink pops; `drop_oldest` may evict).
    queued: Notify,
    stats: Arc<Stats>,
}

impl Buffer {
    /// A buffer bounded to `capacity` bytes.
    pub fn new(capacity: usize, policy: FullPolicy, stats: Arc<Stats>) -> Self {
        Self {
            budget: Budget::new(capacity, Some(stats.clone())),
            queue: Mutex::new(Queue {
                chunks: VecDeque::new(),
                closed: false,
            }),
            policy: Mutex::new(policy),
            queued: Notify::new(),
            stats,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A single push or pop per update: nothing to leave half-done.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The memory budget every lease draws on.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Bytes held now, queued or not.
    pub fn bytes(&self) -> usize {
        self.budget.used()
    }

    /// The bound, in bytes.
    pub fn capacity(&self) -> usize {
        self.budget.capacity()
    }

    /// Changes the full policy (a runtime setting).
    pub fn set_policy(&self, policy: FullPolicy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn policy(&self) -> FullPolicy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `n` bytes for decoding and routing one block. Under `block`
    /// it waits for room (counted once as a full-buffer wait); under
    /// `drop_oldest` it evicts queued chunks, counted as `buffer_full`.
    /// `None` once the buffer is closed: the caller counts its block as a
    /// `shutdown` drop.
    pub async fn reserve(&self, n: usize) -> Option<Lease> {
        if let Some(lease) = self.budget.try_acquire(n) {
            return Some(lease);
        }
        let mut waited = false;
        let mut count_wait = || {
            if !std::mem::replace(&mut waited, true) {
                self.stats
                    .buffer_full_waits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        loop {
            if self.policy() == FullPolicy::Block {
                count_wait();
                return self.budget.acquire(n).await;
            }
            while let Some(old) = self.evict_oldest() {
                self.stats.count_drop(
                    DropReason::BufferFull,
                    old.items.len() as u64,
                    old.datapoints(),
                );
                // Dropped here, outside every lock: its leases go back.
                drop(old);
                if let Some(lease) = self.budget.try_acquire(n) {
                    return Some(lease);
                }
            }
            // Nothing left to evict: what is held is batched or in flight.
            // Wait for room, or for a chunk to evict.
            let mut queued = pin!(self.queued.notified());
            queued.as_mut().enable();
            if !self.queue().chunks.is_empty() {
                continue;
            }
            count_wait();
            tokio::select! {
                lease = self.budget.acquire(n) => return lease,
                () = queued => {}
            }
        }
    }

    fn evict_oldest(&self) -> Option<Chunk> {
        self.queue().chunks.pop_front()
    }

    /// Queues a routed chunk; its bytes are already counted by its leases,
    /// so this never waits. After `close`, the chunk is counted as a
    /// `shutdown` drop: nothing is lost silently.
    pub fn push(&self, chunk: Chunk) {
        if chunk.items.is_empty() {
            return;
        }
        let mut queue = self.queue();
        if queue.closed {
            drop(queue);
            self.stats.count_drop(
                DropReason::Shutdown,
                chunk.items.len() as u64,
                chunk.datapoints(),
            );
            return;
        }
        queue.chunks.push_back(chunk);
        drop(queue);
        self.queued.notify_waiters();
    }

    /// Takes the oldest chunk, waiting for one; `None` once closed and empty.
    pub async fn pop(&self) -> Option<Chunk> {
        loop {
            let mut ready = pin!(self.queued.notified());
            ready.as_mut().enable();
            {
                let mut queue = self.queue();
                if let Some(chunk) = queue.chunks.pop_front() {
                    return Some(chunk);
                }
                if queue.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// Takes the oldest chunk if there is one.
    pub fn try_pop(&self) -> Option<Chunk> {
        self.queue().chunks.pop_front()
    }

    /// Whether [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.queue().closed
    }

    /// No more input: waiting reservations get `None`, `pop` drains, then
    /// returns `None`.
    pub fn close(&self) {
        self.queue().closed = true;
        self.budget.close();
        self.queued.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn stats() -> Arc<Stats> {
        Arc::new(Stats::default())
    }

    /// A chunk of one record, holding `lease`.
    fn chunk(lease: Lease, datapoints: u32) -> Chunk {
        Chunk {
            items: vec![Routed {
                topic: "t".into(),
                key: None,
                data: vec![0; 8].into(),
                datapoints,
                share: u32::try_from(lease.bytes()).unwrap(),
            }],
            heap: 8,
            lease,
        }
    }

    #[test]
    fn sizes_are_counted_in_the_allocators_size_classes() {
        // mimalloc's bins: 8-byte steps to 64, then four per power of two.
        let classes = [
            (1, 8),
            (64, 64),
            (65, 80),
            (80, 80),
            (81, 96),
            (129, 160),
            (200, 224),
            (257, 320),
            (13_500, 14_336),
            (16_384, 16_384),
            (16_385, 20_480),
        ];
        for (asked, taken) in classes {
            assert_eq!(allocated_size(asked), taken, "{asked}");
        }
        for n in 1..100_000 {
            let taken = allocated_size(n);
            assert!(taken >= n && taken <= n + n / 4 + 8, "{n} -> {taken}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn block_waits_for_room_and_drops_nothing() {
        let stats = stats();
        let buffer = Arc::new(Buffer::new(1000, FullPolicy::Block, stats.clone()));
        let first = buffer.reserve(600).await.unwrap();
        buffer.push(chunk(first, 1));
        let waiting = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.reserve(600).await.map(|l| l.bytes()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the second reservation must wait");
        assert_eq!(buffer.bytes(), 600);
        let popped = buffer.pop().await.unwrap();
        assert!(
            !waiting.is_finished(),
            "the popped chunk still holds its bytes"
        );
        drop(popped);
        assert_eq!(waiting.await.unwrap(), Some(600));
        assert_eq!(stats.accounting().dropped_total().datapoints, 0);
        assert_eq!(stats.buffer_full_waits.load(Relaxed), 1);
        assert_eq!(stats.buffer_high_water_bytes.load(Relaxed), 600);
    }

    #[tokio::test]
    async fn drop_oldest_evicts_and_counts() {
        let stats = stats();
        let buffer = Buffer::new(1000, FullPolicy::DropOldest, stats.clone());
        let lease = buffer.reserve(600).await.unwrap();
        buffer.push(chunk(lease, 5));
        let lease = buffer.reserve(600).await.unwrap();
        buffer.push(chunk(lease, 7));
        assert_eq!(buffer.bytes(), 600);
        assert_eq!(
            stats
                .accounting()
                .dropped_for(DropReason::BufferFull)
                .datapoints,
            5
        );
        assert_eq!(buffer.pop().await.unwrap().datapoints(), 7);
    }

    #[tokio::test]
    async fn close_drains_then_ends_and_refuses_reservations() {
        let stats = stats();
        let buffer = Arc::new(Buffer::new(1000, FullPolicy::Block, stats.clone()));
        let held = buffer.reserve(900).await.unwrap();
        let waiting = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.reserve(900).await.is_none() }
        });
        tokio::task::yield_now().await;
        buffer.push(chunk(held, 1));
        buffer.close();
        assert!(
            waiting.await.unwrap(),
            "a waiting reservation gives up at close"
        );
        assert!(buffer.pop().await.is_some());
        assert!(buffer.pop().await.is_none());
        // A chunk routed under a lease granted before the close is counted.
        buffer.push(chunk(Lease::detached(), 3));
        assert_eq!(
            stats
                .accounting()
                .dropped_for(DropReason::Shutdown)
                .datapoints,
            3
        );
    }

    #[tokio::test]
    async fn a_request_larger_than_the_bound_is_granted_only_when_nothing_is_held() {
        let buffer = Arc::new(Buffer::new(100, FullPolicy::Block, stats()));
        assert_eq!(buffer.reserve(512).await.unwrap().bytes(), 512);
        let small = buffer.reserve(10).await.unwrap();
        let large = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.reserve(512).await.map(|l| l.bytes()) }
        });
        tokio::task::yield_now().await;
        assert!(!large.is_finished());
        drop(small);
        assert_eq!(large.await.unwrap(), Some(512));
    }

    #[tokio::test]
    async fn waiters_are_served_in_order() {
        let budget = Budget::new(100, None);
        let held = budget.acquire(90).await.unwrap();
        let big = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire(80).await.map(|l| l.bytes()) }
        });
        tokio::task::yield_now().await;
        // A small request that would fit must not overtake the waiting one.
        assert!(budget.try_acquire(5).is_none());
        drop(held);
        assert_eq!(big.await.unwrap(), Some(80));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_reservation_given_up_returns_its_bytes_and_its_turn() {
        let budget = Budget::new(100, None);
        let held = budget.acquire(90).await.unwrap();
        let given_up =
            tokio::time::timeout(std::time::Duration::from_millis(10), budget.acquire(80)).await;
        assert!(given_up.is_err());
        drop(held);
        assert_eq!(budget.used(), 0, "nothing is held for the waiter that left");
        assert_eq!(budget.try_acquire(100).map(|l| l.bytes()), Some(100));
    }

    #[test]
    fn leases_split_merge_and_come_back_exactly() {
        let budget = Budget::new(1000, None);
        let mut lease = budget.try_acquire(900).unwrap();
        assert!(budget.try_acquire(101).is_none());
        let part = lease.split(300);
        assert_eq!((lease.bytes(), part.bytes()), (600, 300));
        // A split beyond what is held takes the rest from the budget.
        let over = lease.split(700);
        assert_eq!((lease.bytes(), over.bytes(), budget.used()), (0, 700, 1000));
        let mut message = budget.force(50);
        message.merge(part);
        assert_eq!((message.bytes(), budget.used()), (350, 1050));
        drop(over);
        drop(message);
        drop(lease);
        assert_eq!(budget.used(), 0);
    }
}
