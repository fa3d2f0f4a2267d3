//! The bounded buffer between the inputs and the sink, with its full policy,
//! and the seam where the disk spool goes (`buffer_type = disk`, see
//! [`crate::spool`]).
//!
//! With the spool, a pushed chunk is written to disk and its memory given
//! back at once; the sink reads records back from the spool in order,
//! under a lease of the same budget. `spool_max_bytes` bounds the disk,
//! and the full policy applies to it as to memory: `block` waits for
//! Kafka to acknowledge a segment, `drop_oldest` deletes the oldest
//! segment not yet read. While the disk can't be used (degraded), chunks
//! wait in memory as without a spool.
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
use crate::spool::{Refused, Spool};
use crate::stats::{Counts, DropReason, Stats};

/// Counts a push waiting for disk room while it lives.
struct DiskWaiter<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> DiskWaiter<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for DiskWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Runs a sync to disk from a task: on the multi-threaded runtime the
/// worker hands its other tasks on meanwhile (`block_in_place`). Writes and
/// reads, which the page cache serves, run in place: handing them to other
/// threads made mimalloc keep each thread's freed pages (RSS 480 MiB for a
/// buffer of 64 MiB, BENCHMARKS.md).
pub(crate) fn blocking<T>(io: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(io),
        _ => io(),
    }
}

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
    spool: Option<Arc<Spool>>,
    closed: tokio_util::sync::CancellationToken,
    /// Pushes waiting for the spool's disk bound, holding their leases:
    /// the reader must not wait for memory then (see `read_ahead`).
    disk_waiters: std::sync::atomic::AtomicUsize,
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
            spool: None,
            closed: tokio_util::sync::CancellationToken::new(),
            disk_waiters: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Writes every chunk to `spool`, and reads them back from it.
    pub fn with_spool(mut self, spool: Arc<Spool>) -> Self {
        self.spool = Some(spool);
        self
    }

    /// The disk spool, with `buffer_type = disk`.
    pub fn spool(&self) -> Option<&Arc<Spool>> {
        self.spool.as_ref()
    }

    /// Reports the final outcome of records of `topic` read from the
    /// spool.
    pub fn ack(&self, topic: &str, seqs: &[u64]) {
        if let Some(spool) = &self.spool {
            spool.ack(topic, seqs);
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

    /// Queues a routed chunk; its bytes are already counted by its leases.
    /// With the spool, the chunk is written to disk instead (waiting under
    /// `block` while the disk bound is reached). After `close`, the chunk
    /// is counted as a `shutdown` drop: nothing is lost silently.
    /// When `give_up` resolves while it waits, the chunk is counted as a
    /// `shutdown` drop.
    pub async fn push(&self, chunk: Chunk, give_up: impl std::future::Future<Output = ()>) {
        if chunk.items.is_empty() {
            return;
        }
        if self.is_closed() {
            self.count_closed(&chunk);
            return;
        }
        let chunk = match &self.spool {
            Some(spool) => match self.spool_push(spool, chunk, give_up).await {
                Some(chunk) => chunk,
                None => return,
            },
            None => chunk,
        };
        let mut queue = self.queue();
        if queue.closed {
            drop(queue);
            self.count_closed(&chunk);
            return;
        }
        queue.chunks.push_back(chunk);
        drop(queue);
        self.queued.notify_waiters();
    }

    fn count_closed(&self, chunk: &Chunk) {
        self.stats.count_drop(
            DropReason::Shutdown,
            chunk.items.len() as u64,
            chunk.datapoints(),
        );
    }

    /// Writes `chunk` to the spool; gives it back when the disk can't be
    /// used, to be kept in memory.
    async fn spool_push(
        &self,
        spool: &Arc<Spool>,
        chunk: Chunk,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Option<Chunk> {
        let mut give_up = pin!(give_up);
        let mut waited = false;
        loop {
            let room = spool.room().notified();
            let mut room = pin!(room);
            room.as_mut().enable();
            // A write to the page cache is as quick as a copy: done in
            // place. Only a sync (`always`) may wait on the disk.
            let result = if spool.settings().fsync == crate::spool::FsyncMode::Always {
                blocking(|| spool.append(&chunk.items))
            } else {
                spool.append(&chunk.items)
            };
            tokio::task::consume_budget().await;
            match result {
                Ok(()) => {
                    // On disk: the memory goes back now.
                    drop(chunk);
                    self.queued.notify_waiters();
                    return None;
                }
                Err(Refused::Unavailable) => return Some(chunk),
                Err(Refused::Full) => {}
            }
            if self.policy() == FullPolicy::DropOldest {
                if spool.drop_oldest() {
                    continue;
                }
                // Nothing older to drop: the newest records go.
                self.stats.count_drop(
                    DropReason::BufferFull,
                    chunk.items.len() as u64,
                    chunk.datapoints(),
                );
                return None;
            }
            if !std::mem::replace(&mut waited, true) {
                self.stats
                    .buffer_full_waits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let _waiting = DiskWaiter::new(&self.disk_waiters);
            tokio::select! {
                () = room => {}
                () = self.closed.cancelled() => {
                    self.count_closed(&chunk);
                    return None;
                }
                () = &mut give_up => {
                    self.count_closed(&chunk);
                    return None;
                }
                // The policy may change meanwhile.
                () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
    }

    /// Takes the oldest chunk, waiting for one; `None` once closed and
    /// empty. With the spool, chunks kept in memory come first, then
    /// records read back from disk (not after `close`: what is on disk
    /// then stays there for the next start).
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
            if let Some(spool) = &self.spool {
                // Disk I/O is no tokio resource: without this, a sink that
                // always finds records on disk would never yield.
                tokio::task::consume_budget().await;
                if let Some((read, mut lease)) = spool.take_ready() {
                    let total = read.items.iter().map(|r| r.share as usize).sum();
                    return Some(Chunk {
                        items: read.items,
                        heap: read.heap,
                        lease: lease.split(total),
                    });
                }
                if spool.has_unread() {
                    self.read_ahead(spool).await;
                    continue;
                }
            }
            ready.await;
        }
    }

    /// Has the spool read its next records, under a lease of the budget.
    /// Cancel-safe: once the lease is granted, the read runs to its end
    /// without a pause, and what it reads waits in the spool for `pop`. A
    /// read the page cache can't serve (a replay after a reboot) waits on
    /// the disk in place: the sink has nothing else to do meanwhile.
    async fn read_ahead(&self, spool: &Arc<Spool>) {
        // Twice the window covers each record's bookkeeping too; what the
        // read does not use goes back when it is taken.
        let window = spool.settings().read_window();
        let ask = (2 * window).min(self.capacity().max(window));
        // While pushes wait for the disk bound, they hold the memory this
        // read would wait for, and only this read frees the disk: it then
        // goes over the bound, by one read at most, rather than deadlock.
        let lease = loop {
            if self.disk_waiters.load(std::sync::atomic::Ordering::Acquire) > 0 {
                break self
                    .budget
                    .try_acquire(ask)
                    .unwrap_or_else(|| self.budget.force(ask));
            }
            match tokio::time::timeout(
                std::time::Duration::from_millis(200),
                self.budget.acquire(ask),
            )
            .await
            {
                Ok(Some(lease)) => break lease,
                Ok(None) => return,
                Err(_) => {}
            }
        };
        spool.read_ahead(lease);
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
        self.closed.cancel();
        self.queued.notify_waiters();
    }

    /// At the very end, once the sink has stopped: syncs the spool, and
    /// counts what it holds unread as `spooled`, left for the next start.
    pub fn close_spool(&self) -> Counts {
        let Some(spool) = &self.spool else {
            return Counts::default();
        };
        let left = spool.close();
        self.stats.spooled.add(left.records, left.datapoints);
        left
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
                seq: 0,
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
        buffer.push(chunk(first, 1), std::future::pending()).await;
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
        buffer.push(chunk(lease, 5), std::future::pending()).await;
        let lease = buffer.reserve(600).await.unwrap();
        buffer.push(chunk(lease, 7), std::future::pending()).await;
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
        buffer.push(chunk(held, 1), std::future::pending()).await;
        buffer.close();
        assert!(
            waiting.await.unwrap(),
            "a waiting reservation gives up at close"
        );
        assert!(buffer.pop().await.is_some());
        assert!(buffer.pop().await.is_none());
        // A chunk routed under a lease granted before the close is counted.
        buffer
            .push(chunk(Lease::detached(), 3), std::future::pending())
            .await;
        assert_eq!(
            stats
                .accounting()
                .dropped_for(DropReason::Shutdown)
                .datapoints,
            3
        );
    }

    fn spool(dir: &std::path::Path, max_bytes: u64, stats: &Arc<Stats>) -> Arc<Spool> {
        Spool::open(
            crate::spool::SpoolSettings {
                dir: dir.to_owned(),
                max_bytes,
                fsync: crate::spool::FsyncMode::Interval,
                fsync_interval: std::time::Duration::from_millis(100),
                max_record_bytes: 64 * 1024,
                memory_bytes: 1 << 20,
                retry: std::time::Duration::ZERO,
                parked_max_bytes: 0,
            },
            stats.clone(),
        )
    }

    /// A chunk of `n` records of 1 KiB, holding `lease`.
    fn kib_chunk(lease: Lease, n: usize) -> Chunk {
        Chunk {
            items: (0..n)
                .map(|_| Routed {
                    topic: "t".into(),
                    key: None,
                    data: vec![7; 1024].into(),
                    datapoints: 2,
                    share: 0,
                    seq: 0,
                })
                .collect(),
            heap: 0,
            lease,
        }
    }

    #[tokio::test]
    async fn with_the_spool_a_chunk_goes_to_disk_its_memory_back_and_it_comes_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let stats = stats();
        let buffer = Buffer::new(1 << 20, FullPolicy::Block, stats.clone()).with_spool(spool(
            dir.path(),
            1 << 20,
            &stats,
        ));
        for _ in 0..3 {
            let lease = buffer.reserve(10_000).await.unwrap();
            buffer
                .push(kib_chunk(lease, 4), std::future::pending())
                .await;
        }
        assert_eq!(buffer.bytes(), 0, "on disk, the memory goes back");
        let popped = buffer.pop().await.unwrap();
        assert_eq!(popped.items.len(), 12);
        let seqs: Vec<u64> = popped.items.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
        assert_eq!(popped.lease.bytes(), buffer.bytes(), "the read is leased");
        assert!(buffer.bytes() >= 12 * 1024);
        buffer.ack("t", &seqs);
        buffer.close();
        assert!(buffer.pop().await.is_none());
        assert_eq!(buffer.close_spool(), Counts::default());
    }

    async fn until_a_push_waits(stats: &Stats) {
        while stats.buffer_full_waits.load(Relaxed) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn with_the_spool_full_block_waits_and_gives_up_at_close_counted() {
        let dir = tempfile::tempdir().unwrap();
        let stats = stats();
        let buffer = Arc::new(
            Buffer::new(1 << 20, FullPolicy::Block, stats.clone()).with_spool(spool(
                dir.path(),
                256 * 1024,
                &stats,
            )),
        );
        let mut written = 0;
        // Fill the disk: the push that does not fit waits.
        let waiting = loop {
            let lease = buffer.reserve(40_000).await.unwrap();
            let mut push = tokio::spawn({
                let buffer = buffer.clone();
                async move {
                    buffer
                        .push(kib_chunk(lease, 32), std::future::pending())
                        .await
                }
            });
            tokio::select! {
                _ = &mut push => written += 32,
                () = until_a_push_waits(&stats) => break push,
            }
            assert!(written < 10_000, "the disk bound never held");
        };
        assert!(!waiting.is_finished());
        buffer.close();
        waiting.await.unwrap();
        let shutdown = stats.accounting().dropped_for(DropReason::Shutdown);
        assert_eq!(shutdown.records, 32, "the waiting chunk is counted");
        assert_eq!(buffer.close_spool().records, written);
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
