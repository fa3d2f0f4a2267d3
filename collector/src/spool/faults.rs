//! Faults: a disk that can't be used degrades the spool to memory, and
//! faults a test injects.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tracing::error;

use super::{Spool, State};

#[derive(Debug)]
pub(super) enum Health {
    Ok,
    Degraded { reason: String, retry_at: Instant },
}

/// Faults a test injects into the spool's writes.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every write fails with this.
    pub write: Mutex<Option<io::ErrorKind>>,
    /// The spool's filesystem holds this many bytes in all, and nothing
    /// but the spool uses it (instead of what statvfs says).
    pub filesystem_bytes: Mutex<Option<u64>>,
}

impl Spool {
    pub(super) fn degrade(&self, state: &mut State, reason: String) {
        if matches!(state.health, Health::Ok) {
            error!(dir = %self.settings.dir.display(), %reason,
                "The disk spool can't be used; records are kept in memory until it can.");
        }
        state.health = Health::Degraded {
            reason,
            retry_at: Instant::now() + self.settings.retry,
        };
        state.writer = None;
        if let Some(last) = state.segments.back_mut() {
            last.sealed = true;
        }
        self.degraded.store(true, Relaxed);
        self.set_degraded_gauge(1);
        // What is sealed and done goes now: a full disk needs the space.
        self.delete_done(state);
    }

    pub(super) fn write_failed(&self, state: &mut State, error: &io::Error) {
        self.stats.spool_write_errors.fetch_add(1, Relaxed);
        let reason =
            if error.raw_os_error() == Some(28) || error.kind() == io::ErrorKind::StorageFull {
                format!("disk full writing {}: {error}", self.settings.dir.display())
            } else {
                format!("write to {} failed: {error}", self.settings.dir.display())
            };
        self.degrade(state, reason);
    }
}
