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
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::FullPolicy;
use crate::memory::{Budget, Lease};
use crate::route::Records;
use crate::stats::{DropReason, Stats};

/// What the buffer holds: the records routed from one input block, with
/// the lease on what they take.
pub type Chunk = Records;

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
    use crate::route::Routed;
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
