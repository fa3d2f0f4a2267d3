//! Replay at start: the cursor and every segment an earlier run left,
//! scanned for their ledgers, with damage skipped and counted.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{error, info, warn};

use super::faults::Health;
use super::frame::{self, Item, Scanner};
use super::ledger::{Cursor, is_cursor_file};
use super::segment::{Segment, parse_segment_name};
use super::{LOCK, Spool, State};
use crate::stats::Counts;

impl Spool {
    /// Takes the directory: its lock, the segments an earlier run left, the
    /// cursor, and a new segment to write.
    pub(super) fn recover(&self, state: &mut State) -> Result<(), String> {
        let dir = &self.settings.dir;
        fs::create_dir_all(dir).map_err(|e| format!("{}: can't be created: {e}", dir.display()))?;
        if state.lock.is_none() {
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(LOCK))
                .map_err(|e| format!("{}: lock file: {e}", dir.display()))?;
            match lock.try_lock() {
                Ok(()) => state.lock = Some(lock),
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(format!("{}: in use by another collector", dir.display()));
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(format!("{}: lock: {e}", dir.display()));
                }
            }
            self.scan(state)?;
            // The parked area is read once the directory is ours.
            if let Some(area) = &self.area {
                area.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .load(&self.settings, &self.stats);
            }
        }
        self.start_segment(state)
            .map_err(|e| format!("{}: can't write a segment: {e}", dir.display()))?;
        if !matches!(state.health, Health::Ok) {
            info!(dir = %dir.display(), "The disk spool is usable again.");
        }
        state.health = Health::Ok;
        self.degraded.store(false, Relaxed);
        self.set_degraded_gauge(0);
        Ok(())
    }

    /// Reads the cursor and every segment left by an earlier run.
    pub(super) fn scan(&self, state: &mut State) -> Result<(), String> {
        let dir = &self.settings.dir;
        let (cursor, generation) = Cursor::load(dir);
        let (watermark, last_read) = (cursor.watermark, cursor.last_read);
        state.skip_below = watermark;
        state.saved_cursor = (watermark, last_read);
        state.cursor_generation = generation + 1;
        state.read_before = last_read;
        state.done_before = std::sync::Arc::new(cursor.done.clone());
        let mut found = Vec::new();
        let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            match parse_segment_name(&name) {
                Some(first) => found.push((first, entry.path())),
                None if is_cursor_file(&name) || [LOCK, "parked", "topic"].contains(&&*name) => {}
                None => {
                    warn!(dir = %dir.display(), file = %name,
                        "A file in the spool directory is not a spool segment; it is left alone.");
                }
            }
        }
        found.sort();
        let mut replayed = Counts::default();
        let mut duplicates = 0;
        for (first_seq, path) in found {
            let mut segment = Segment::new(first_seq, path, 0, true);
            let whole = self.scan_segment(&mut segment, &cursor, &mut duplicates);
            state.next_seq = state.next_seq.max(segment.last_seq.saturating_add(1));
            // Its name says where its numbers start: new ones go past it.
            state.next_seq = state.next_seq.max(first_seq.saturating_add(1));
            if !whole {
                continue;
            }
            if segment.records == 0 {
                let _ = fs::remove_file(&segment.path);
                continue;
            }
            replayed.records += segment.records;
            replayed.datapoints += segment.datapoints;
            state.bytes += segment.bytes;
            state.segments.push_back(segment);
        }
        state.next_seq = state
            .next_seq
            .max(watermark)
            .max(last_read.saturating_add(1));
        state.read_pos = frame::SEGMENT_MAGIC.len() as u64;
        if let Some(first) = state.segments.front() {
            state.read_pos = if first.end > 0 {
                self.data_start(first)
            } else {
                0
            };
        }
        if replayed.records > 0 {
            info!(dir = %dir.display(), records = replayed.records, datapoints = replayed.datapoints,
                segments = state.segments.len(), possible_duplicates = duplicates,
                "Replaying what the disk spool holds from before the restart.");
        }
        self.stats
            .replayed
            .add(replayed.records, replayed.datapoints);
        self.stats
            .spool_possible_duplicates
            .fetch_add(duplicates, Relaxed);
        self.update_gauges(state);
        Ok(())
    }

    /// Reads a whole segment, window by window, for its ledger.
    /// Returns false when the segment could not be read to its end (it is
    /// then left on disk, untouched).
    pub(super) fn scan_segment(
        &self,
        segment: &mut Segment,
        cursor: &Cursor,
        dups: &mut u64,
    ) -> bool {
        let file = match File::open(&segment.path) {
            Ok(file) => file,
            Err(error) => {
                error!(segment = %segment.path.display(), %error,
                    "A spool segment can't be read; it is left on disk and not replayed.");
                return false;
            }
        };
        let len = file.metadata().map_or(0, |m| m.len());
        segment.bytes = len;
        segment.end = len;
        let start = if len >= 8 && self.data_start(segment) == 8 {
            8
        } else {
            if len > 0 {
                self.corrupt(
                    &segment.path,
                    0,
                    len.min(8) as usize,
                    "not a segment header",
                );
            }
            0
        };
        let window = self.settings.read_window();
        let mut pos = start;
        let mut buf = Vec::new();
        while pos < len {
            let n = (len - pos).min(window as u64) as usize;
            buf.resize(n, 0);
            if let Err(error) = file.read_exact_at(&mut buf, pos) {
                error!(segment = %segment.path.display(), offset = pos, %error,
                    "A spool segment could not be read to its end; it is left on disk and not replayed.");
                return false;
            }
            let more = pos + (n as u64) < len;
            let mut scanner = Scanner::new(&buf, self.settings.max_frame(), more);
            for item in scanner.by_ref() {
                match item {
                    Item::Frame { frame, .. } => {
                        segment.last_seq = segment.last_seq.max(frame.seq);
                        if frame.seq < cursor.watermark || cursor.done.contains(frame.seq) {
                            continue;
                        }
                        if frame.seq <= cursor.last_read {
                            *dups += 1;
                        }
                        if segment.records == 0 {
                            segment.first_ms = frame.written_ms;
                        }
                        segment.records += 1;
                        segment.datapoints += u64::from(frame.datapoints);
                    }
                    Item::Corrupt { offset, len, why } => {
                        self.corrupt(&segment.path, pos + offset as u64, len, why);
                    }
                    Item::Incomplete { .. } => {}
                }
            }
            pos += (scanner.pos() as u64).max(1);
        }
        true
    }

    pub(super) fn corrupt(&self, path: &Path, offset: u64, len: usize, why: &str) {
        self.stats.spool_corrupt.fetch_add(1, Relaxed);
        crate::telemetry::throttled_warn("spool_corrupt", |repeats| {
            warn!(segment = %path.display(), offset, bytes = len, why, repeats,
                "Skipped damaged bytes in a spool segment.");
        });
    }
}
