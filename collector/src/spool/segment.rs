//! Segments and their files: naming, starting a new one, deleting the done
//! ones, and `drop_oldest`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{info, warn};

use super::{SEGMENT_SUFFIX, Spool, State, frame};
use crate::stats::{Counts, DropReason};

#[derive(Debug)]
pub(super) struct Segment {
    pub(super) first_seq: u64,
    pub(super) path: PathBuf,
    /// Bytes on disk.
    pub(super) bytes: u64,
    /// Bytes the reader may read (whole frames).
    pub(super) end: u64,
    /// The ledger: records and datapoints in it, not yet delivered before a
    /// restart.
    pub(super) records: u64,
    pub(super) datapoints: u64,
    pub(super) read_records: u64,
    pub(super) read_datapoints: u64,
    /// Its highest sequence number (0: none).
    pub(super) last_seq: u64,
    /// When its first record was written, ms since the epoch.
    pub(super) first_ms: u64,
    /// Found at start: its damage was counted by the scan.
    pub(super) scanned: bool,
    /// Written no more (the writer moved on, or the disk failed): once read
    /// and acknowledged, it can go.
    pub(super) sealed: bool,
    pub(super) reader: Option<Arc<File>>,
}

impl Segment {
    /// A segment of `bytes` (its header), nothing in its ledger yet;
    /// `scanned` when an earlier run left it (sealed then).
    pub(super) fn new(first_seq: u64, path: PathBuf, bytes: u64, scanned: bool) -> Self {
        Self {
            first_seq,
            path,
            bytes,
            end: bytes,
            records: 0,
            datapoints: 0,
            read_records: 0,
            read_datapoints: 0,
            last_seq: 0,
            first_ms: 0,
            scanned,
            sealed: scanned,
            reader: None,
        }
    }

    pub(super) fn unread(&self) -> Counts {
        Counts {
            records: self.records.saturating_sub(self.read_records),
            datapoints: self.datapoints.saturating_sub(self.read_datapoints),
        }
    }
}

pub(super) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Room left free on the spool's filesystem, at least: 1/50 of it, and at
/// least this.
const FS_RESERVE: u64 = 16 * 1024;
/// The smallest segment sealed.
const MIN_SEGMENT: u64 = 16 * 1024;

impl Spool {
    /// Where a segment's frames start: after its header, or at 0 when the
    /// header is damaged (the scanner then finds the frames).
    pub(super) fn data_start(&self, segment: &Segment) -> u64 {
        let mut header = [0; 8];
        match File::open(&segment.path).and_then(|f| f.read_exact_at(&mut header, 0)) {
            Ok(()) if &header == frame::SEGMENT_MAGIC => 8,
            _ => 0,
        }
    }

    /// Sets the bound in force: `spool_max_bytes`, or less where the
    /// filesystem has less room (what the segments take plus what is free,
    /// less a reserve for the cursor, the directory and other writers), so
    /// that a small disk is filled by the spool's own bound, in segments
    /// sized to it, and never by a write the kernel refuses.
    pub(super) fn measure_room(&self, state: &mut State) {
        let max = self.settings.max_bytes;
        let simulated = *self
            .faults
            .filesystem_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let filesystem = match simulated {
            Some(total) => Some((total.saturating_sub(state.bytes), total)),
            None => rustix::fs::statvfs(&self.settings.dir).ok().map(|fs| {
                (
                    fs.f_bavail.saturating_mul(fs.f_frsize),
                    fs.f_blocks.saturating_mul(fs.f_frsize),
                )
            }),
        };
        let room = filesystem.map(|(free, total)| {
            state
                .bytes
                .saturating_add(free)
                .saturating_sub((total / 50).max(FS_RESERVE))
        });
        let (bound, limited) = match room {
            Some(room) if room < max => (room, true),
            _ => (max, false),
        };
        if limited && !state.fs_limited {
            info!(dir = %self.settings.dir.display(), bound, spool_max_bytes = max,
                "The disk spool's filesystem has less room than spool_max_bytes: its free space bounds the spool.");
        }
        state.bound = bound;
        state.fs_limited = limited;
        if self.role == super::Role::Main {
            self.stats.spool_bound_bytes.store(bound as i64, Relaxed);
        }
    }

    /// A segment is sealed past this many bytes: an eighth of the bound in
    /// force, so that space comes back in steps.
    pub(super) fn segment_bytes(state: &State) -> u64 {
        (state.bound / 8).clamp(MIN_SEGMENT, 64 * 1024 * 1024)
    }

    /// Seals the newest segment (if any) and starts a new one.
    pub(super) fn start_segment(&self, state: &mut State) -> io::Result<()> {
        self.measure_room(state);
        if let Some(writer) = state.writer.take()
            && let Some(segment) = state.segments.back()
        {
            let first_seq = segment.first_seq;
            state.unsynced.push((first_seq, writer));
        }
        if let Some(last) = state.segments.back_mut() {
            last.sealed = true;
        }
        let first_seq = state.next_seq;
        let path = self.settings.dir.join(segment_name(first_seq));
        // An empty segment left behind by the last one started is replaced;
        // any other file of that name is never overwritten.
        if state
            .segments
            .back()
            .is_some_and(|s| s.first_seq == first_seq)
            && let Some(old) = state.segments.pop_back()
        {
            state.bytes -= old.bytes;
            Self::let_go(state, &old);
            let _ = fs::remove_file(&old.path);
        }
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)?;
        if let Some(kind) = *self.faults.write.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = fs::remove_file(&path);
            return Err(io::Error::from(kind));
        }
        if let Err(error) = file.write_all(frame::SEGMENT_MAGIC) {
            let _ = fs::remove_file(&path);
            return Err(error);
        }
        let header = frame::SEGMENT_MAGIC.len() as u64;
        if state.read >= state.segments.len() {
            // The reader is past every segment: it starts on this one.
            state.read = state.segments.len();
            state.read_pos = header;
        }
        state
            .segments
            .push_back(Segment::new(first_seq, path, header, false));
        state.bytes += header;
        state.writer = Some(Arc::new(file));
        state.dir_unsynced = true;
        Ok(())
    }

    /// Moves the reader past sealed segments it has read to their end, so
    /// that they can be deleted even when nothing more is read (a segment
    /// sealed by a full disk, whose space is what the disk needs back).
    pub(super) fn pass_read_segments(&self, state: &mut State) {
        while let Some(segment) = state.segments.get(state.read)
            && segment.sealed
            && state.read_pos >= segment.end
        {
            self.finish_segment(state);
        }
    }

    /// Lets go of every handle on `segment`'s file but its own (which goes
    /// with it), so that deleting the file gives its space back at once.
    pub(super) fn let_go(state: &mut State, segment: &Segment) {
        state
            .unsynced
            .retain(|(first, _)| *first != segment.first_seq);
    }

    /// Deletes the segments the reader is past whose records are all done.
    pub(super) fn delete_done(&self, state: &mut State) {
        self.pass_read_segments(state);
        let mut freed = false;
        while state.read > 0 {
            let watermark = Self::watermark(state);
            let Some(front) = state.segments.front() else {
                break;
            };
            if front.last_seq >= watermark {
                break;
            }
            let Some(segment) = state.segments.pop_front() else {
                break;
            };
            state.read -= 1;
            state.bytes -= segment.bytes;
            Self::let_go(state, &segment);
            if let Err(error) = fs::remove_file(&segment.path)
                && error.kind() != io::ErrorKind::NotFound
            {
                warn!(segment = %segment.path.display(), %error, "Could not delete a delivered spool segment.");
            }
            freed = true;
        }
        if freed {
            state.dir_unsynced = true;
            self.update_gauges(state);
            self.room.notify_waiters();
        }
    }

    /// `drop_oldest` on a full spool: deletes the oldest segment nothing
    /// has been read from, counting its records as `buffer_full` drops.
    /// False when there is none (the newest is the only one unread).
    pub fn drop_oldest(&self) -> bool {
        self.drop_oldest_segment(DropReason::BufferFull, false)
    }

    /// Deletes the oldest segment nothing has been read from, counting its
    /// records as dropped for `reason`; with `seal_active`, the segment
    /// being written may go too (sealed first). False when there is none.
    pub(super) fn drop_oldest_segment(&self, reason: DropReason, seal_active: bool) -> bool {
        let mut state = self.state();
        if seal_active
            && state.segments.len() == state.read + 1
            && state
                .segments
                .back()
                .is_some_and(|s| !s.sealed && s.records > 0 && s.read_records == 0)
            && state.read_pos <= self.data_start(&state.segments[state.read])
            && self.start_segment(&mut state).is_err()
        {
            return false;
        }
        let candidate = (state.read..state.segments.len()).find(|&i| {
            let s = &state.segments[i];
            s.sealed
                && s.read_records == 0
                && !(i == state.read && state.read_pos > self.data_start(s))
        });
        let Some(index) = candidate else {
            return false;
        };
        let Some(segment) = state.segments.remove(index) else {
            return false;
        };
        let lost = segment.unread();
        self.stats.count_drop(reason, lost.records, lost.datapoints);
        state.bytes -= segment.bytes;
        Self::let_go(&mut state, &segment);
        if index == state.read {
            state.read_pos = state.segments.get(index).map_or(0, |s| self.data_start(s));
        }
        let _ = fs::remove_file(&segment.path);
        state.dir_unsynced = true;
        self.update_gauges(&state);
        true
    }
}
