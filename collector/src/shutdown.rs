//! Shutdown: one sequence, under one time limit, `shutdown_grace_secs`.
//!
//! When it begins, the deadline is fixed: every step after it (inputs
//! draining, the sink delivering, the final purge and count) works towards
//! that one instant, whatever state the buffer and the brokers are in. The
//! sink stops delivering a little before it ([`Shutdown::sink_deadline`]),
//! so that purging and counting what is left fits inside the grace too.
//!
//! Each subsystem spawns itself (`ingest::spawn`, `Poller::spawn`,
//! `sink::spawn`, `partner::spawn`, `api::spawn`) and hands back a [`Task`];
//! [`Shutdown::run`] stops them in one order:
//!
//! 1. the inputs (the TCP input with its connections, the agent poller)
//!    stop taking data and finish what they hold, until the deadline;
//! 2. the buffer is closed, and the sink drains it and flushes the producer,
//!    until the sink deadline, counting what is left as dropped (or, with
//!    the disk spool, as spooled: it stays on disk for the next start),
//!    and the spool is synced;
//! 3. the outputs that report on the others (the HTTP API, which answers
//!    503 "draining" meanwhile, and the partner output) stop last;
//! 4. what a failed task held is counted as `internal_error`, and the final
//!    line is logged.
//!
//! Tasks are awaited through [`join`]: a task that panicked is logged and
//! counted, never dropped on the floor.

use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::buffer::Buffer;
use crate::stats::{Accounting, Stats};

/// How long the outputs that stop last (API, partners) get past the
/// deadline, at least: enough to answer a request in flight.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// `from + duration`, saturating instead of overflowing: an instant so far
/// off that it never comes.
pub fn deadline_after(from: Instant, duration: Duration) -> Instant {
    from.checked_add(duration)
        .or_else(|| from.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(from)
}

/// The shutdown of one collector: when it began and when it must end.
#[derive(Debug)]
pub struct Shutdown {
    grace: Duration,
    begun: CancellationToken,
    outputs: CancellationToken,
    deadline: OnceLock<Instant>,
}

/// A spawned task of the collector, with the name its failures are logged
/// under.
#[derive(Debug)]
pub struct Task {
    name: &'static str,
    handle: JoinHandle<()>,
}

impl Task {
    /// Spawns `future` as the task `name`.
    pub fn spawn(
        name: &'static str,
        future: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self {
            name,
            handle: tokio::spawn(future),
        }
    }
}

/// The collector's tasks, grouped by when they stop.
#[derive(Debug)]
pub struct Tasks {
    /// Stop when the shutdown begins: the TCP input, the agent poller.
    pub inputs: Vec<Task>,
    /// Drains the buffer once it is closed.
    pub sink: Task,
    /// Stop last, on [`Shutdown::outputs`]: the API, the partner output.
    pub outputs: Vec<Task>,
}

impl Shutdown {
    /// A shutdown that will have `grace` once it begins.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            begun: CancellationToken::new(),
            outputs: CancellationToken::new(),
            deadline: OnceLock::new(),
        }
    }

    /// Begins the shutdown (once; later calls change nothing) and returns
    /// its deadline.
    pub fn begin(&self) -> Instant {
        let deadline = *self
            .deadline
            .get_or_init(|| deadline_after(Instant::now(), self.grace));
        self.begun.cancel();
        deadline
    }

    /// Cancelled once the shutdown has begun.
    pub fn begun(&self) -> &CancellationToken {
        &self.begun
    }

    /// Cancelled once the sink has stopped: the outputs that report on the
    /// others (API, partners) stop then.
    pub fn outputs(&self) -> &CancellationToken {
        &self.outputs
    }

    /// The deadline, once the shutdown has begun.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    /// What the last steps (purging undelivered messages, counting what is
    /// left, stopping the API) are given: a quarter of the grace, at most
    /// two seconds.
    pub fn reserve(&self) -> Duration {
        (self.grace / 4).min(Duration::from_secs(2))
    }

    /// When the sink must stop delivering, once the shutdown has begun.
    pub fn sink_deadline(&self) -> Option<Instant> {
        self.deadline()
            .map(|deadline| deadline.checked_sub(self.reserve()).unwrap_or(deadline))
    }
}

impl Shutdown {
    /// Begins the shutdown and stops `tasks` in the module's order, within
    /// the grace; then counts what a failed task held and logs the final
    /// line. Returns the final accounting, in which nothing is in flight.
    pub async fn run(&self, tasks: Tasks, buffer: &Buffer, stats: &Stats) -> Accounting {
        let deadline = self.begin();
        info!(
            grace_secs = self.grace.as_secs(),
            "Shutting down: no longer accepting input."
        );
        join_all_by(tasks.inputs, deadline, stats).await;
        buffer.close();
        join_by(tasks.sink.name, tasks.sink.handle, deadline, stats).await;
        // What the disk spool holds unread stays there for the next start.
        let spooled = buffer.close_spool();
        if spooled.records > 0 {
            info!(
                records = spooled.records,
                datapoints = spooled.datapoints,
                "The disk spool keeps undelivered records for the next start."
            );
        }
        self.outputs.cancel();
        let last = deadline_after(deadline, LAST_WORDS).max(Instant::now() + LAST_WORDS);
        join_all_by(tasks.outputs, last, stats).await;
        // Every task has stopped: whatever is neither delivered nor dropped
        // now was held by one that panicked or was aborted.
        let lost = stats.count_unaccounted();
        if lost.records > 0 {
            error!(
                records = lost.records,
                datapoints = lost.datapoints,
                "Datapoints held by a failed task are counted as dropped (internal_error)."
            );
        }
        let accounting = stats.accounting();
        let dropped = accounting.dropped_total();
        info!(
            received = accounting.received.datapoints,
            replayed = accounting.replayed.datapoints,
            delivered = accounting.delivered.datapoints,
            served = accounting.served.datapoints,
            dropped = dropped.datapoints,
            spooled = accounting.spooled.datapoints,
            buffer_high_water_bytes = stats.buffer_high_water_bytes.load(Relaxed),
            task_panics = stats.task_panics.load(Relaxed),
            dropped_by_reason = %accounting
                .dropped
                .iter()
                .filter(|(_, c)| c.datapoints > 0 || c.records > 0)
                .map(|(r, c)| format!("{}={}", r.as_str(), c.datapoints))
                .collect::<Vec<_>>()
                .join(","),
            "Collector stopped: datapoints received and replayed, delivered, served, dropped and spooled."
        );
        accounting
    }
}

/// Awaits a task. A panic is logged with the task's name and counted in
/// `task_panics`; `None` then, or when the task was aborted.
pub async fn join<T>(
    name: &str,
    handle: impl std::future::Future<Output = Result<T, tokio::task::JoinError>>,
    stats: &Stats,
) -> Option<T> {
    match handle.await {
        Ok(value) => Some(value),
        Err(error) => {
            if error.is_panic() {
                stats.task_panics.fetch_add(1, Relaxed);
                let message = panic_message(error.into_panic());
                error!(task = name, panic = %message, "A collector task panicked; what it held is counted as dropped (internal_error).");
            }
            None
        }
    }
}

/// Awaits `tasks` together until `deadline`; those still running then are
/// aborted (logged).
async fn join_all_by(tasks: Vec<Task>, deadline: Instant, stats: &Stats) {
    futures::future::join_all(
        tasks
            .into_iter()
            .map(|task| join_by(task.name, task.handle, deadline, stats)),
    )
    .await;
}

/// Awaits a task until `deadline`, then aborts it (logged).
pub async fn join_by<T>(
    name: &str,
    mut handle: JoinHandle<T>,
    deadline: Instant,
    stats: &Stats,
) -> Option<T> {
    tokio::select! {
        biased;
        result = join(name, &mut handle, stats) => result,
        () = tokio::time::sleep_until(deadline) => {
            handle.abort();
            error!(task = name, "A collector task did not stop within the shutdown grace; it was aborted.");
            None
        }
    }
}

/// A panic's message, when it has one.
pub fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_saturate_instead_of_overflowing() {
        let now = Instant::now();
        let far = deadline_after(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(
            deadline_after(now, Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_fixed_when_the_shutdown_begins() {
        let shutdown = Shutdown::new(Duration::from_secs(30));
        assert_eq!(shutdown.deadline(), None);
        let start = Instant::now();
        let deadline = shutdown.begin();
        assert_eq!(deadline, start + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            shutdown.begin(),
            deadline,
            "a second signal changes nothing"
        );
        assert!(shutdown.begun().is_cancelled());
        assert_eq!(
            shutdown.sink_deadline(),
            Some(deadline - Duration::from_secs(2))
        );
        let short = Shutdown::new(Duration::from_secs(1));
        let deadline = short.begin();
        assert_eq!(
            short.sink_deadline(),
            Some(deadline - Duration::from_millis(250))
        );
    }

    #[tokio::test]
    async fn a_panicking_task_is_counted_not_lost() {
        let stats = Stats::default();
        let handle = tokio::spawn(async {
            if stats_never_zero() {
                panic!("boom");
            }
        });
        assert_eq!(join("test", handle, &stats).await, None);
        assert_eq!(stats.task_panics.load(Relaxed), 1);
        let fine = tokio::spawn(async { 7 });
        assert_eq!(join("fine", fine, &stats).await, Some(7));
        assert_eq!(stats.task_panics.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_past_the_deadline_is_aborted() {
        let stats = Stats::default();
        let stuck = tokio::spawn(std::future::pending::<()>());
        let deadline = Instant::now() + Duration::from_secs(1);
        assert_eq!(join_by("stuck", stuck, deadline, &stats).await, None);
        assert_eq!(stats.task_panics.load(Relaxed), 0);
    }

    fn stats_never_zero() -> bool {
        std::hint::black_box(true)
    }
}
