//! The bounded buffer between the inputs and the sink, counted in bytes,
//! with an explicit full policy. This is the seam where a disk spool will go.
//!
//! - `block`: a push waits until there is room, so the input connection stops
//!   reading and its sender sees TCP backpressure. Nothing is dropped here.
//! - `drop_oldest`: a push evicts the oldest chunks to make room, and counts
//!   what it evicted as `buffer_full` drops.
//!
//! A chunk larger than the whole bound is admitted when the buffer is empty,
//! so that no input can deadlock.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::FullPolicy;
use crate::route::{Records, Routed};
use crate::stats::{DropReason, Stats};

/// What the buffer holds: the records routed from one input block.
pub type Chunk = Records;

impl Chunk {
    /// Heap bytes the chunk holds, as the allocator reserves them: its
    /// records' bytes (one allocation per topic and key, see
    /// [`Records`]) and their bookkeeping, each rounded up to the
    /// allocator's size class. The bound is on memory, not on payload.
    pub fn bytes(&self) -> usize {
        self.heap + allocated_size(self.items.capacity() * std::mem::size_of::<Routed>())
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

struct Inner {
    queue: VecDeque<(Chunk, usize)>,
    bytes: usize,
    closed: bool,
}

/// A bounded, byte-counted, multi-producer single-consumer queue.
pub struct Buffer {
    inner: Mutex<Inner>,
    capacity: usize,
    policy: Mutex<FullPolicy>,
    not_empty: Notify,
    not_full: Notify,
    stats: Arc<Stats>,
}

impl Buffer {
    /// A buffer of `capacity` bytes.
    pub fn new(capacity: usize, policy: FullPolicy, stats: Arc<Stats>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            capacity,
            policy: Mutex::new(policy),
            not_empty: Notify::new(),
            not_full: Notify::new(),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock can't leave Inner inconsistent
        // (every update is a single push/pop plus a counter), so recover.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes buffered now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The bound, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the full policy (a runtime setting).
    pub fn set_policy(&self, policy: FullPolicy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
        self.not_full.notify_waiters();
    }

    fn policy(&self) -> FullPolicy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a chunk, waiting for room under the `block` policy.
    pub async fn push(&self, chunk: Chunk) {
        if chunk.items.is_empty() {
            return;
        }
        let size = chunk.bytes();
        let mut waited = false;
        loop {
            let mut room = pin!(self.not_full.notified());
            room.as_mut().enable();
            {
                let mut inner = self.lock();
                if inner.closed {
                    // Inputs stop before the buffer closes; anything late is
                    // counted, never lost silently.
                    self.stats.count_drop(
                        DropReason::Shutdown,
                        chunk.items.len() as u64,
                        chunk.datapoints(),
                    );
                    return;
                }
                let fits = inner.bytes == 0 || inner.bytes + size <= self.capacity;
                if fits || self.policy() == FullPolicy::DropOldest {
                    while inner.bytes > 0 && inner.bytes + size > self.capacity {
                        let Some((old, old_size)) = inner.queue.pop_front() else {
                            break;
                        };
                        inner.bytes -= old_size;
                        self.stats.buffer_bytes_add(-(old_size as i64));
                        self.stats.count_drop(
                            DropReason::BufferFull,
                            old.items.len() as u64,
                            old.datapoints(),
                        );
                    }
                    inner.bytes += size;
                    inner.queue.push_back((chunk, size));
                    self.stats.buffer_bytes_add(size as i64);
                    drop(inner);
                    self.not_empty.notify_one();
                    return;
                }
            }
            if !waited {
                waited = true;
                self.stats
                    .buffer_full_waits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            room.await;
        }
    }

    /// Takes the oldest chunk, waiting for one; `None` once closed and empty.
    pub async fn pop(&self) -> Option<Chunk> {
        loop {
            let mut ready = pin!(self.not_empty.notified());
            ready.as_mut().enable();
            if let Some(chunk) = self.try_pop() {
                return Some(chunk);
            }
            if self.lock().closed {
                return None;
            }
            ready.await;
        }
    }

    /// Takes the oldest chunk if there is one.
    pub fn try_pop(&self) -> Option<Chunk> {
        let mut inner = self.lock();
        let (chunk, size) = inner.queue.pop_front()?;
        inner.bytes -= size;
        drop(inner);
        self.stats.buffer_bytes_add(-(size as i64));
        self.not_full.notify_waiters();
        Some(chunk)
    }

    /// Whether [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// No more pushes will come: `pop` drains, then returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_waiters();
        self.not_empty.notify_one();
        self.not_full.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A chunk of one record of `data` bytes: it counts for `data` + 80, the
    /// record's bookkeeping (72 bytes) in its size class.
    fn chunk(data: usize, datapoints: u32) -> Chunk {
        let chunk = Chunk {
            items: vec![Routed {
                topic: "t".into(),
                key: None,
                data: vec![0; data].into(),
                datapoints,
            }],
            heap: allocated_size(data),
        };
        assert_eq!(chunk.bytes(), data + 80);
        chunk
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

    #[tokio::test]
    async fn block_waits_for_room_and_drops_nothing() {
        let stats = Arc::new(Stats::default());
        let buffer = Arc::new(Buffer::new(1000, FullPolicy::Block, stats.clone()));
        buffer.push(chunk(512, 1)).await;
        let pusher = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.push(chunk(512, 1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pusher.is_finished(), "the second push must wait");
        assert_eq!(buffer.bytes(), 592);
        assert!(buffer.pop().await.is_some());
        pusher.await.unwrap();
        assert_eq!(buffer.bytes(), 592);
        assert_eq!(stats.accounting().dropped_total().datapoints, 0);
        assert_eq!(
            stats
                .buffer_full_waits
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn drop_oldest_evicts_and_counts() {
        let stats = Arc::new(Stats::default());
        let buffer = Buffer::new(1000, FullPolicy::DropOldest, stats.clone());
        buffer.push(chunk(512, 5)).await;
        buffer.push(chunk(512, 7)).await;
        assert_eq!(buffer.bytes(), 592);
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
    async fn close_drains_then_ends() {
        let buffer = Buffer::new(1000, FullPolicy::Block, Arc::new(Stats::default()));
        buffer.push(chunk(128, 1)).await;
        buffer.close();
        assert!(buffer.pop().await.is_some());
        assert!(buffer.pop().await.is_none());
    }

    #[tokio::test]
    async fn oversized_chunk_is_admitted_into_an_empty_buffer() {
        let buffer = Buffer::new(100, FullPolicy::Block, Arc::new(Stats::default()));
        buffer.push(chunk(512, 1)).await;
        assert_eq!(buffer.bytes(), 592);
    }
}
