//! The memory budget: what `buffer_max_bytes` bounds, and the leases that
//! hold a share of it while a record travels from an input to librdkafka.
//!
//! A [`Budget`] hands out [`Lease`]s: granted at once while there is room,
//! otherwise queued, in order (so a large request is not starved by small
//! ones), until enough comes back or the budget is closed. A lease gives its
//! bytes back when dropped, or in parts as the records it covers leave.
//! The buffer puts the queued chunks' lease under the full policy;
//! the sink's retries have a budget of their own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::stats::Stats;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
