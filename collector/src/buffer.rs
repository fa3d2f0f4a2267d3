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
use crate::route::Routed;
use crate::stats::{DropReason, Stats};

/// Records routed from one input block.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The records.
    pub items: Vec<Routed>,
}

impl Chunk {
    /// Bytes the chunk accounts for: its records (one allocation per
    /// chunk, see `route::encode_all`) and their bookkeeping.
    pub fn bytes(&self) -> usize {
        self.items
            .iter()
            .map(|r| r.data.len() + std::mem::size_of::<Routed>())
            .sum()
    }

    /// Datapoints in the chunk.
    pub fn datapoints(&self) -> u64 {
        self.items.iter().map(|r| u64::from(r.datapoints)).sum()
    }
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

    fn chunk(bytes: usize, datapoints: u32) -> Chunk {
        Chunk {
            items: vec![Routed {
                topic: "t".into(),
                key: None,
                data: vec![0; bytes - std::mem::size_of::<Routed>()].into(),
                datapoints,
            }],
        }
    }

    #[tokio::test]
    async fn block_waits_for_room_and_drops_nothing() {
        let stats = Arc::new(Stats::default());
        let buffer = Arc::new(Buffer::new(1000, FullPolicy::Block, stats.clone()));
        buffer.push(chunk(600, 1)).await;
        let pusher = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.push(chunk(600, 1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pusher.is_finished(), "the second push must wait");
        assert_eq!(buffer.bytes(), 600);
        assert!(buffer.pop().await.is_some());
        pusher.await.unwrap();
        assert_eq!(buffer.bytes(), 600);
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
        buffer.push(chunk(600, 5)).await;
        buffer.push(chunk(600, 7)).await;
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
    async fn close_drains_then_ends() {
        let buffer = Buffer::new(1000, FullPolicy::Block, Arc::new(Stats::default()));
        buffer.push(chunk(100, 1)).await;
        buffer.close();
        assert!(buffer.pop().await.is_some());
        assert!(buffer.pop().await.is_none());
    }

    #[tokio::test]
    async fn oversized_chunk_is_admitted_into_an_empty_buffer() {
        let buffer = Buffer::new(100, FullPolicy::Block, Arc::new(Stats::default()));
        buffer.push(chunk(500, 1)).await;
        assert_eq!(buffer.bytes(), 500);
    }
}
