//! The syncer: what was written, the directory and the cursor, synced every
//! `spool_fsync_ms`; the gauges.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::faults::Health;
use super::{Spool, State, now_ms};

impl Spool {
    /// Syncs what was written since the last sync, the directory, and the
    /// cursor; updates the gauges.
    ///
    /// While the spool is degraded, the files written before are synced
    /// all the same (they hold records still to be read), and let go of
    /// either way: a handle kept on a segment deleted meanwhile would keep
    /// its space from the full disk that needs it.
    pub fn sync(&self) {
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.state();
        let degraded = matches!(state.health, Health::Degraded { .. });
        let files = std::mem::take(&mut state.unsynced);
        let dir = std::mem::take(&mut state.dir_unsynced);
        let cursor = Self::cursor(&mut state);
        // A spool that never took its directory's lock saves no cursor: the
        // directory may be another collector's, or not read yet.
        let cursor_changed = state.lock.is_some()
            && (state.ledger_changed || (cursor.watermark, cursor.last_read) != state.saved_cursor);
        if cursor_changed {
            state.ledger_changed = false;
        }
        let generation = state.cursor_generation;
        self.measure_room(&mut state);
        self.update_gauges(&state);
        drop(state);
        // What moved to the parked area before this cursor was taken is
        // synced there before the cursor says it is done here.
        self.sync_parked();
        if !files.is_empty() {
            let started = Instant::now();
            let failed = files.iter().find_map(|(_, file)| file.sync_data().err());
            drop(files);
            match failed {
                Some(error) if !degraded => {
                    let mut state = self.state();
                    self.write_failed(&mut state, &error);
                    return;
                }
                Some(_) => {}
                None => {
                    self.stats
                        .spool_fsync_ms
                        .observe(started.elapsed().as_secs_f64() * 1000.0);
                    self.stats.spool_fsyncs.fetch_add(1, Relaxed);
                }
            }
        }
        if dir && let Ok(dir) = File::open(&self.settings.dir) {
            let _ = dir.sync_all();
        }
        if cursor_changed {
            match cursor.save(&self.settings.dir, generation) {
                Ok(()) => {
                    let mut state = self.state();
                    state.saved_cursor = (cursor.watermark, cursor.last_read);
                    state.cursor_generation = generation + 1;
                }
                Err(error) => {
                    self.state().ledger_changed = true;
                    crate::telemetry::throttled_warn("spool_cursor", |repeats| {
                        warn!(dir = %self.settings.dir.display(), %error, repeats,
                            "Could not save the spool's cursor; a restart may replay records already done.");
                    });
                }
            }
        }
    }

    pub(super) fn update_gauges(&self, state: &State) {
        if self.role != super::Role::Main {
            return;
        }
        let stats = &self.stats;
        stats.spool_bytes.store(state.bytes as i64, Relaxed);
        stats
            .spool_segments
            .store(state.segments.len() as i64, Relaxed);
        let oldest = state
            .in_flight
            .values()
            .next()
            .map(|f| f.written_ms)
            .or_else(|| {
                state
                    .segments
                    .iter()
                    .skip(state.read)
                    .find(|s| s.unread().records > 0)
                    .map(|s| s.first_ms)
            });
        let age = oldest.map_or(0, |ms| now_ms().saturating_sub(ms) / 1000);
        stats
            .spool_oldest_unacked_age_seconds
            .store(age as i64, Relaxed);
    }

    /// Syncs every `spool_fsync_ms` (in `always` mode too: it saves the
    /// cursor and updates the gauges) until `stop` is cancelled; the last
    /// sync is [`close`](Self::close)'s.
    pub async fn run_syncer(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.fsync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let syncing = self.clone();
            let _ = tokio::task::spawn_blocking(move || syncing.sync()).await;
        }
    }
}
