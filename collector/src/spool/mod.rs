//! The disk spool (`buffer_type = disk`): routed records written to
//! checksummed segment files as they are read, read back by the sink, and
//! deleted only once Kafka has reported on every record in them.
//!
//! - **Segments.** `spool_dir` holds `<first seq>.seg` files (the format is
//!   in [`frame`]), a `cursor` file and a `lock` file. Writes go to the
//!   newest segment, which is sealed at an eighth of `spool_max_bytes` (at
//!   most 64 MiB) so that space comes back in steps.
//! - **Acknowledgement.** Every record gets a sequence number. The sink
//!   reads records in that order and reports each final outcome
//!   (delivered, or dropped and counted) with [`Spool::ack`]. All records
//!   below the *watermark* are done; a segment is deleted once the reader
//!   is past it and its last record is below the watermark.
//! - **Durability.** `spool_fsync = interval` syncs the newest segment (and
//!   segments just sealed, the directory and the cursor) every
//!   `spool_fsync_ms`; `always` syncs each write before the input goes on.
//! - **Restart.** [`Spool::open`] scans every segment, counts what is not
//!   below the saved watermark as `replayed`, and the reader delivers it
//!   before anything newer. Records read before the restart but not yet
//!   acknowledged may have reached Kafka: they are counted as
//!   `spool_possible_duplicates`.
//! - **Damage.** A torn, flipped or foreign byte costs the frames it
//!   spoils: the scanner skips to the next frame marker, logs the offset
//!   and counts `spool_corrupt`. Each segment keeps a ledger of the records
//!   and datapoints it holds; what the reader could not read back of them
//!   is counted as dropped (`spool_corrupt`), so the identity stays exact.
//! - **No disk.** A directory that is missing and can't be made, is read
//!   only, is used by another collector, or a write failing (ENOSPC, EIO):
//!   the spool is *degraded*, the buffer keeps records in memory under its
//!   own bound, `/health` says why, and the spool is tried again every
//!   few seconds.

pub mod frame;

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::memory::{Lease, allocated_size};
use crate::route::{RECORD_OVERHEAD, Routed};
use crate::stats::{Counts, DropReason, Stats};
use frame::{FrameRef, Item, Scanner};

pub use crate::config::{BufferType, FsyncMode};
use crate::config::{Config, ConfigError};

/// What the spool needs to know.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// Where the segments are.
    pub dir: PathBuf,
    /// Bound on the segments' bytes.
    pub max_bytes: u64,
    /// When to sync.
    pub fsync: FsyncMode,
    /// How often to sync, in `interval` mode.
    pub fsync_interval: Duration,
    /// The largest record worth spooling: larger ones can't be sent.
    pub max_record_bytes: usize,
    /// The memory buffer's bound: reads back take a part of it.
    pub memory_bytes: usize,
    /// How long a degraded spool waits before trying the disk again.
    pub retry: Duration,
}

impl SpoolSettings {
    /// From the configuration (`buffer_type = disk`).
    pub fn from_config(config: &crate::config::Config) -> Option<Self> {
        (config.buffer_type == BufferType::Disk).then(|| Self {
            dir: config.spool_dir.clone().unwrap_or_default(),
            max_bytes: config.spool_max_bytes,
            fsync: config.spool_fsync,
            fsync_interval: Duration::from_millis(config.spool_fsync_ms),
            max_record_bytes: config.kafka_max_message_bytes,
            memory_bytes: config.buffer_max_bytes,
            retry: RETRY,
        })
    }

    /// A segment is sealed past this many bytes.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024)
    }

    /// The longest frame written: the largest record, its topic and a key.
    pub fn max_frame(&self) -> usize {
        self.max_record_bytes + 64 * 1024
    }

    /// What the reader reads at once: an eighth of the memory bound, at
    /// most 4 MiB, and at least the longest frame.
    pub fn read_window(&self) -> usize {
        (self.memory_bytes / 8)
            .min(4 * 1024 * 1024)
            .max(self.max_frame())
    }
}

/// Why a write was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The spool holds `spool_max_bytes`: the full policy decides.
    Full,
    /// The disk can't be used now: keep the records in memory.
    Unavailable,
}

const SEGMENT_SUFFIX: &str = ".seg";
/// The widest range of sequence numbers one read chunk spans (its
/// acknowledgement bitmap: 128 KiB).
const MAX_CHUNK_SPAN: u64 = 1 << 20;
const CURSOR: &str = "cursor";
const LOCK: &str = "lock";
/// How long a degraded spool waits before trying the disk again.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Bytes on disk.
    bytes: u64,
    /// Bytes the reader may read (whole frames).
    end: u64,
    /// The ledger: records and datapoints in it, not yet delivered before a
    /// restart.
    records: u64,
    datapoints: u64,
    read_records: u64,
    read_datapoints: u64,
    /// Its highest sequence number (0: none).
    last_seq: u64,
    /// When its first record was written, ms since the epoch.
    first_ms: u64,
    /// Found at start: its damage was counted by the scan.
    scanned: bool,
    /// Written no more (the writer moved on, or the disk failed): once read
    /// and acknowledged, it can go.
    sealed: bool,
    reader: Option<Arc<File>>,
}

impl Segment {
    fn unread(&self) -> Counts {
        Counts {
            records: self.records.saturating_sub(self.read_records),
            datapoints: self.datapoints.saturating_sub(self.read_datapoints),
        }
    }
}

/// A read chunk's records without a final outcome yet.
#[derive(Debug)]
struct InFlight {
    remaining: u32,
    first_seq: u64,
    last_seq: u64,
    written_ms: u64,
    /// One bit per sequence number from `first_seq`: set once done (gaps,
    /// numbers of records not in the chunk, start set).
    done: Vec<u64>,
    /// The lowest sequence number in it not yet done.
    next_undone: u64,
}

impl InFlight {
    fn new(seqs: &[u64], written_ms: u64) -> Self {
        let first_seq = seqs.first().copied().unwrap_or(0);
        let last_seq = seqs.last().copied().unwrap_or(0);
        let span = (last_seq - first_seq + 1) as usize;
        let mut done = vec![u64::MAX; span.div_ceil(64)];
        for seq in seqs {
            let i = (seq - first_seq) as usize;
            done[i / 64] &= !(1 << (i % 64));
        }
        Self {
            remaining: seqs.len() as u32,
            first_seq,
            last_seq,
            written_ms,
            done,
            next_undone: first_seq,
        }
    }

    fn is_done(&self, seq: u64) -> bool {
        let i = (seq - self.first_seq) as usize;
        self.done[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks `seq` done (once); true when it was not yet.
    fn ack(&mut self, seq: u64) -> bool {
        if seq < self.first_seq || seq > self.last_seq || self.is_done(seq) {
            return false;
        }
        let i = (seq - self.first_seq) as usize;
        self.done[i / 64] |= 1 << (i % 64);
        self.remaining -= 1;
        while self.next_undone <= self.last_seq && self.is_done(self.next_undone) {
            self.next_undone += 1;
        }
        true
    }
}

#[derive(Debug)]
enum Health {
    Ok,
    Degraded { reason: String, retry_at: Instant },
}

#[derive(Debug)]
struct State {
    health: Health,
    lock: Option<File>,
    segments: VecDeque<Segment>,
    /// The newest segment's file, open for appending (the back segment).
    writer: Option<Arc<File>>,
    next_seq: u64,
    /// The reader is in `segments[read]` at `read_pos`.
    read: usize,
    read_pos: u64,
    last_read_seq: u64,
    /// Read chunks not yet fully acknowledged, by first sequence number.
    in_flight: BTreeMap<u64, InFlight>,
    /// Records below this were done before this start: skipped.
    skip_below: u64,
    bytes: u64,
    /// Files written since the last sync.
    unsynced: Vec<Arc<File>>,
    dir_unsynced: bool,
    saved_cursor: (u64, u64),
    /// The last record read before this start (from the cursor): kept in
    /// the cursor until the reader passes it.
    read_before: u64,
    /// Read and not yet taken by the sink.
    ready: Option<(ReadChunk, Lease)>,
    /// Closed: nothing more is read.
    closed: bool,
}

/// Faults a test injects into the spool's writes.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every write fails with this.
    pub write: Mutex<Option<io::ErrorKind>>,
}

/// A read of the spool: records with their sequence numbers.
#[derive(Debug)]
pub struct ReadChunk {
    /// The records, in order.
    pub items: Vec<Routed>,
    /// Heap they take: the read buffer.
    pub heap: usize,
}

/// The disk spool.
pub struct Spool {
    settings: SpoolSettings,
    stats: Arc<Stats>,
    state: Mutex<State>,
    /// Space came back (a segment was deleted).
    room: Notify,
    faults: Faults,
    degraded: AtomicBool,
    /// One sync at a time (the syncer's and the last one at close share
    /// `cursor.tmp`).
    syncing: Mutex<()>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.settings.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// With `buffer_type = disk`: checks that `spool_dir` exists or can be
/// made, and can be written (`collector validate`; the daemon itself runs
/// on, degraded, when it can't).
pub fn check_config_dir(config: &Config) -> Result<(), ConfigError> {
    match (&config.buffer_type, &config.spool_dir) {
        (BufferType::Disk, Some(dir)) => {
            check_dir(dir).map_err(|e| ConfigError::new("spool_dir", e))
        }
        _ => Ok(()),
    }
}

/// Checks that `dir` can hold the spool: it exists or can be made, it is a
/// directory, and a file can be written in it. For `collector validate`.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: can't be created: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let probe = dir.join(".write-test");
    fs::write(&probe, b"ok").map_err(|e| format!("{}: not writable: {e}", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

impl Spool {
    /// Opens the spool in `settings.dir`, scanning what an earlier run left
    /// (counted as `replayed`). Never fails: a directory that can't be used
    /// leaves the spool degraded, to be tried again.
    pub fn open(settings: SpoolSettings, stats: Arc<Stats>) -> Arc<Self> {
        let spool = Arc::new(Self {
            state: Mutex::new(State {
                health: Health::Ok,
                lock: None,
                segments: VecDeque::new(),
                writer: None,
                next_seq: 1,
                read: 0,
                read_pos: frame::SEGMENT_MAGIC.len() as u64,
                last_read_seq: 0,
                in_flight: BTreeMap::new(),
                skip_below: 0,
                bytes: 0,
                unsynced: Vec::new(),
                dir_unsynced: false,
                saved_cursor: (0, 0),
                read_before: 0,
                ready: None,
                closed: false,
            }),
            settings,
            stats,
            room: Notify::new(),
            faults: Faults::default(),
            degraded: AtomicBool::new(false),
            syncing: Mutex::new(()),
        });
        let mut state = spool.state();
        if let Err(reason) = spool.recover(&mut state) {
            spool.degrade(&mut state, reason);
        }
        drop(state);
        spool
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings in force.
    pub fn settings(&self) -> &SpoolSettings {
        &self.settings
    }

    /// Faults to inject, for tests.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Notified when space comes back.
    pub fn room(&self) -> &Notify {
        &self.room
    }

    /// Why the disk is not in use, when it is not.
    pub fn degraded(&self) -> Option<String> {
        match &self.state().health {
            Health::Ok => None,
            Health::Degraded { reason, .. } => Some(reason.clone()),
        }
    }

    fn degrade(&self, state: &mut State, reason: String) {
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
        self.stats.spool_degraded.store(1, Relaxed);
        // What is sealed and done goes now: a full disk needs the space.
        self.delete_done(state);
    }

    /// Takes the directory: its lock, the segments an earlier run left, the
    /// cursor, and a new segment to write.
    fn recover(&self, state: &mut State) -> Result<(), String> {
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
        }
        self.start_segment(state)
            .map_err(|e| format!("{}: can't write a segment: {e}", dir.display()))?;
        if !matches!(state.health, Health::Ok) {
            info!(dir = %dir.display(), "The disk spool is usable again.");
        }
        state.health = Health::Ok;
        self.degraded.store(false, Relaxed);
        self.stats.spool_degraded.store(0, Relaxed);
        Ok(())
    }

    /// Reads the cursor and every segment left by an earlier run.
    fn scan(&self, state: &mut State) -> Result<(), String> {
        let dir = &self.settings.dir;
        let (watermark, last_read) = fs::read_to_string(dir.join(CURSOR))
            .ok()
            .and_then(|text| {
                let mut parts = text.split_whitespace().map(str::parse::<u64>);
                Some((parts.next()?.ok()?, parts.next()?.ok()?))
            })
            .unwrap_or((0, 0));
        state.skip_below = watermark;
        state.saved_cursor = (watermark, last_read);
        state.read_before = last_read;
        let mut found = Vec::new();
        let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            match parse_segment_name(&name) {
                Some(first) => found.push((first, entry.path())),
                None if name == CURSOR || name == LOCK => {}
                None if name == "cursor.tmp" => {
                    let _ = fs::remove_file(entry.path());
                }
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
            let mut segment = Segment {
                first_seq,
                path,
                bytes: 0,
                end: 0,
                records: 0,
                datapoints: 0,
                read_records: 0,
                read_datapoints: 0,
                last_seq: 0,
                first_ms: 0,
                scanned: true,
                sealed: true,
                reader: None,
            };
            let whole = self.scan_segment(&mut segment, watermark, last_read, &mut duplicates);
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

    /// Where a segment's frames start: after its header, or at 0 when the
    /// header is damaged (the scanner then finds the frames).
    fn data_start(&self, segment: &Segment) -> u64 {
        let mut header = [0; 8];
        match File::open(&segment.path).and_then(|f| f.read_exact_at(&mut header, 0)) {
            Ok(()) if &header == frame::SEGMENT_MAGIC => 8,
            _ => 0,
        }
    }

    /// Reads a whole segment, window by window, for its ledger.
    /// Returns false when the segment could not be read to its end (it is
    /// then left on disk, untouched).
    fn scan_segment(
        &self,
        segment: &mut Segment,
        watermark: u64,
        last_read: u64,
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
                        if frame.seq < watermark {
                            continue;
                        }
                        if frame.seq <= last_read {
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

    fn corrupt(&self, path: &Path, offset: u64, len: usize, why: &str) {
        self.stats.spool_corrupt.fetch_add(1, Relaxed);
        crate::telemetry::throttled_warn("spool_corrupt", |repeats| {
            warn!(segment = %path.display(), offset, bytes = len, why, repeats,
                "Skipped damaged bytes in a spool segment.");
        });
    }

    /// Seals the newest segment (if any) and starts a new one.
    fn start_segment(&self, state: &mut State) -> io::Result<()> {
        if let Some(writer) = state.writer.take() {
            state.unsynced.push(writer);
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
        state.segments.push_back(Segment {
            first_seq,
            path,
            bytes: header,
            end: header,
            records: 0,
            datapoints: 0,
            read_records: 0,
            read_datapoints: 0,
            last_seq: 0,
            first_ms: 0,
            scanned: false,
            sealed: false,
            reader: None,
        });
        state.bytes += header;
        state.writer = Some(Arc::new(file));
        state.dir_unsynced = true;
        Ok(())
    }

    /// Writes `records` (the routed records of one input block) as frames
    /// to the newest segment. `always` syncs them before returning. A
    /// record too large to send is dropped and counted here.
    pub fn append(&self, records: &[Routed]) -> Result<(), Refused> {
        let mut state = self.state();
        if let Health::Degraded { retry_at, .. } = &state.health {
            if Instant::now() < *retry_at {
                return Err(Refused::Unavailable);
            }
            if let Err(reason) = self.recover(&mut state) {
                self.degrade(&mut state, reason);
                return Err(Refused::Unavailable);
            }
        }
        let written_ms = now_ms();
        let max_frame = self.settings.max_frame();
        let mut out = Vec::with_capacity(
            records
                .iter()
                .map(|r| frame::frame_len(&r.topic, r.key.as_deref(), r.data.len()))
                .sum(),
        );
        let mut seq = state.next_seq;
        let (mut count, mut datapoints) = (0u64, 0u64);
        // Records too large to send are dropped, and counted only once the
        // write is taken: a refused write keeps them in its chunk.
        let mut too_large = Vec::new();
        for record in records {
            if frame::frame_len(&record.topic, record.key.as_deref(), record.data.len()) > max_frame
            {
                too_large.push(record);
                continue;
            }
            frame::encode(
                &mut out,
                &FrameRef {
                    seq,
                    written_ms,
                    datapoints: record.datapoints,
                    topic: &record.topic,
                    key: record.key.as_deref(),
                    data: &record.data,
                },
            );
            seq = seq.saturating_add(1);
            count += 1;
            datapoints += u64::from(record.datapoints);
        }
        let count_too_large = || {
            for record in &too_large {
                self.stats
                    .count_drop(DropReason::TooLarge, 1, u64::from(record.datapoints));
                error!(topic = %record.topic, bytes = record.data.len(), limit = self.settings.max_record_bytes,
                    "Dropped a record too large for a Kafka message.");
            }
        };
        if count == 0 {
            count_too_large();
            return Ok(());
        }
        let len = out.len() as u64;
        let has_unread = state.segments.iter().any(|s| s.records > 0);
        if state.bytes + len > self.settings.max_bytes && has_unread {
            return Err(Refused::Full);
        }
        let active_len = state.segments.back().map_or(0, |s| s.bytes);
        let active_used = state.segments.back().is_some_and(|s| s.records > 0);
        if active_used
            && active_len + len > self.settings.segment_bytes()
            && let Err(error) = self.start_segment(&mut state)
        {
            self.write_failed(&mut state, &error);
            return Err(Refused::Unavailable);
        }
        let Some(writer) = state.writer.clone() else {
            return Err(Refused::Unavailable);
        };
        let Some(at) = state.segments.back().map(|s| s.bytes) else {
            return Err(Refused::Unavailable);
        };
        let fault = *self.faults.write.lock().unwrap_or_else(|p| p.into_inner());
        let written = match fault {
            Some(kind) => Err(io::Error::from(kind)),
            None => writer.write_all_at(&out, at),
        };
        if let Err(error) = written {
            // A partial write is cut off, so that the segment ends whole.
            let _ = writer.set_len(at);
            self.write_failed(&mut state, &error);
            return Err(Refused::Unavailable);
        }
        let first = state.next_seq;
        state.next_seq = state.next_seq.saturating_add(count);
        if let Some(segment) = state.segments.back_mut() {
            if segment.records == 0 {
                segment.first_ms = written_ms;
            }
            segment.bytes += len;
            segment.end += len;
            segment.records += count;
            segment.datapoints += datapoints;
            segment.last_seq = first.saturating_add(count - 1);
        }
        state.bytes += len;
        self.stats.spool_bytes.store(state.bytes as i64, Relaxed);
        count_too_large();
        if self.settings.fsync == FsyncMode::Always {
            drop(state);
            let started = Instant::now();
            if let Err(error) = writer.sync_data() {
                let mut state = self.state();
                self.write_failed(&mut state, &error);
                return Ok(());
            }
            self.stats
                .spool_fsync_ms
                .observe(started.elapsed().as_secs_f64() * 1000.0);
            self.stats.spool_fsyncs.fetch_add(1, Relaxed);
        } else if !state.unsynced.iter().any(|f| Arc::ptr_eq(f, &writer)) {
            state.unsynced.push(writer);
        }
        Ok(())
    }

    fn write_failed(&self, state: &mut State, error: &io::Error) {
        self.stats.spool_write_errors.fetch_add(1, Relaxed);
        let reason =
            if error.raw_os_error() == Some(28) || error.kind() == io::ErrorKind::StorageFull {
                format!("disk full writing {}: {error}", self.settings.dir.display())
            } else {
                format!("write to {} failed: {error}", self.settings.dir.display())
            };
        self.degrade(state, reason);
    }

    /// Whether there are records the reader has not read.
    pub fn has_unread(&self) -> bool {
        let state = self.state();
        state
            .segments
            .iter()
            .skip(state.read)
            .enumerate()
            .any(|(i, s)| s.end > if i == 0 { state.read_pos } else { 0 } && s.unread().records > 0)
    }

    /// Reads the next records and takes them off the disk's queue: a test's
    /// shorthand for [`read_ahead`](Self::read_ahead) and
    /// [`take_ready`](Self::take_ready).
    pub fn read(&self) -> Option<ReadChunk> {
        self.read_ahead(Lease::detached());
        self.take_ready().map(|(chunk, _)| chunk)
    }

    /// The records [`read_ahead`](Self::read_ahead) read, with the lease
    /// they hold.
    pub fn take_ready(&self) -> Option<(ReadChunk, Lease)> {
        self.state().ready.take()
    }

    /// Reads the next records, at most [`SpoolSettings::read_window`] bytes
    /// of frames, skipping damage, and keeps them, holding `lease`, for
    /// [`take_ready`](Self::take_ready): what is read is never lost to a
    /// reader that stopped waiting. Nothing when everything is read, when
    /// records read before are still waiting, or after `close`.
    pub fn read_ahead(&self, lease: Lease) {
        let window = self.settings.read_window();
        loop {
            let mut guard = self.state();
            let state = &mut *guard;
            if state.closed || state.ready.is_some() {
                return;
            }
            let read = state.read;
            let Some(segment) = state.segments.get_mut(read) else {
                return;
            };
            let sealed = segment.sealed;
            if state.read_pos >= segment.end || segment.unread().records == 0 && sealed {
                if !sealed {
                    return;
                }
                self.finish_segment(state);
                self.delete_done(state);
                continue;
            }
            let path = segment.path.clone();
            let file = match &segment.reader {
                Some(file) => file.clone(),
                None => match File::open(&segment.path) {
                    Ok(file) => {
                        let file = Arc::new(file);
                        segment.reader = Some(file.clone());
                        file
                    }
                    Err(error) => {
                        warn!(segment = %path.display(), %error, "A spool segment can't be read; it is skipped.");
                        segment.end = 0;
                        if !sealed {
                            return;
                        }
                        continue;
                    }
                },
            };
            let (pos, end, first_seq, scanned) = (
                state.read_pos,
                segment.end,
                segment.first_seq,
                segment.scanned,
            );
            let skip_below = state.skip_below;
            let last_read_seq = state.last_read_seq;
            drop(guard);

            let n = (end - pos).min(window as u64) as usize;
            let mut buf = vec![0; n];
            if let Err(error) = file.read_exact_at(&mut buf, pos) {
                warn!(segment = %path.display(), offset = pos, %error,
                    "A spool segment could not be read to its end; the rest is skipped.");
                let mut guard = self.state();
                let state = &mut *guard;
                if let Some(segment) = state.segments.get_mut(state.read)
                    && segment.first_seq == first_seq
                {
                    segment.end = pos;
                }
                continue;
            }
            let buf = Bytes::from(buf);
            let mut items = Vec::new();
            let mut frames_len = 0;
            let mut datapoints = 0u64;
            let mut first: Option<(u64, u64)> = None;
            let mut last_seq = 0;
            let mut scanner = Scanner::new(&buf, self.settings.max_frame(), pos + (n as u64) < end);
            let mut topic: Option<Arc<str>> = None;
            // Sequence numbers only grow: one that does not (a file
            // copied in, concatenated, restored) is damage, and a chunk
            // ends before a gap too wide for its bookkeeping.
            let mut prev_seq = last_read_seq;
            let mut stop_at = None;
            for item in scanner.by_ref() {
                match item {
                    Item::Frame { frame, len, offset } => {
                        if frame.seq < skip_below {
                            continue;
                        }
                        if frame.seq <= prev_seq {
                            if !scanned {
                                self.corrupt(
                                    &path,
                                    pos + offset as u64,
                                    len,
                                    "sequence number out of order",
                                );
                            }
                            continue;
                        }
                        if first.is_some_and(|(first, _)| frame.seq - first > MAX_CHUNK_SPAN) {
                            stop_at = Some(offset);
                            break;
                        }
                        prev_seq = frame.seq;
                        let topic = match &topic {
                            Some(t) if **t == *frame.topic => t.clone(),
                            _ => {
                                let t: Arc<str> = frame.topic.into();
                                topic = Some(t.clone());
                                t
                            }
                        };
                        let data_at = offset + len - frame.data.len();
                        first.get_or_insert((frame.seq, frame.written_ms));
                        last_seq = frame.seq;
                        frames_len += len;
                        datapoints += u64::from(frame.datapoints);
                        items.push(Routed {
                            topic,
                            key: frame.key.map(Arc::from),
                            data: buf.slice(data_at..offset + len),
                            datapoints: frame.datapoints,
                            share: u32::try_from(len + RECORD_OVERHEAD).unwrap_or(u32::MAX),
                            seq: frame.seq,
                        });
                    }
                    Item::Corrupt { offset, len, why } => {
                        if !scanned {
                            self.corrupt(&path, pos + offset as u64, len, why);
                        }
                    }
                    Item::Incomplete { .. } => {}
                }
            }
            let consumed = stop_at.unwrap_or_else(|| scanner.pos()) as u64;
            let mut guard = self.state();
            let state = &mut *guard;
            let read = state.read;
            if state.closed {
                return;
            }
            let Some(segment) = state.segments.get_mut(read) else {
                continue;
            };
            if segment.first_seq != first_seq || state.read_pos != pos {
                // The segment was dropped meanwhile (drop_oldest).
                continue;
            }
            segment.read_records += items.len() as u64;
            segment.read_datapoints += datapoints;
            state.read_pos = pos + consumed.max(1);
            let Some((first_seq, written_ms)) = first else {
                continue;
            };
            state.last_read_seq = last_seq;
            let seqs: Vec<u64> = items.iter().map(|r| r.seq).collect();
            state
                .in_flight
                .insert(first_seq, InFlight::new(&seqs, written_ms));
            let heap = allocated_size(n);
            // The last record also carries the buffer's headers, damage and
            // rounding: the shares add up to what the read holds.
            if let Some(last) = items.last_mut() {
                last.share = last
                    .share
                    .saturating_add(u32::try_from(heap - frames_len).unwrap_or(u32::MAX));
            }
            state.ready = Some((ReadChunk { items, heap }, lease));
            return;
        }
    }

    /// The reader is past the segment at `state.read`: what its ledger
    /// holds that was not read back was lost to damage, and is counted.
    fn finish_segment(&self, state: &mut State) {
        let read = state.read;
        let Some(segment) = state.segments.get_mut(read) else {
            return;
        };
        let lost = segment.unread();
        if lost.records > 0 || lost.datapoints > 0 {
            error!(segment = %segment.path.display(), records = lost.records, datapoints = lost.datapoints,
                "Records in a damaged spool segment could not be read back; they are counted as dropped (spool_corrupt).");
            self.stats
                .count_drop(DropReason::SpoolCorrupt, lost.records, lost.datapoints);
            segment.read_records = segment.records;
            segment.read_datapoints = segment.datapoints;
        }
        segment.reader = None;
        state.read += 1;
        state.read_pos = 0;
        let data_start = state.segments.get(state.read).map(|s| self.data_start(s));
        if let Some(start) = data_start {
            state.read_pos = start;
        }
    }

    /// Moves the reader past sealed segments it has read to their end, so
    /// that they can be deleted even when nothing more is read (a segment
    /// sealed by a full disk, whose space is what the disk needs back).
    fn pass_read_segments(&self, state: &mut State) {
        while let Some(segment) = state.segments.get(state.read)
            && segment.sealed
            && state.read_pos >= segment.end
        {
            self.finish_segment(state);
        }
    }

    /// All records below this are done (delivered or dropped and counted).
    fn watermark(state: &State) -> u64 {
        state
            .in_flight
            .values()
            .next()
            .map_or(state.last_read_seq.saturating_add(1), |f| f.next_undone)
            .max(state.skip_below)
    }

    /// Deletes the segments the reader is past whose records are all done.
    fn delete_done(&self, state: &mut State) {
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

    /// Records a final outcome (delivered, or dropped and counted) for
    /// these sequence numbers.
    pub fn ack(&self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let mut state = self.state();
        for &seq in seqs {
            let key = state
                .in_flight
                .range(..=seq)
                .next_back()
                .filter(|(_, f)| seq <= f.last_seq)
                .map(|(k, _)| *k);
            if let Some(key) = key
                && let Some(chunk) = state.in_flight.get_mut(&key)
                && chunk.ack(seq)
                && chunk.remaining == 0
            {
                state.in_flight.remove(&key);
            }
        }
        self.delete_done(&mut state);
    }

    /// `drop_oldest` on a full spool: deletes the oldest segment nothing
    /// has been read from, counting its records as `buffer_full` drops.
    /// False when there is none (the newest is the only one unread).
    pub fn drop_oldest(&self) -> bool {
        let mut state = self.state();
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
        self.stats
            .count_drop(DropReason::BufferFull, lost.records, lost.datapoints);
        state.bytes -= segment.bytes;
        if index == state.read {
            state.read_pos = state.segments.get(index).map_or(0, |s| self.data_start(s));
        }
        let _ = fs::remove_file(&segment.path);
        state.dir_unsynced = true;
        self.update_gauges(&state);
        true
    }

    /// Syncs what was written since the last sync, the directory, and the
    /// cursor; updates the gauges.
    pub fn sync(&self) {
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.state();
        if matches!(state.health, Health::Degraded { .. }) {
            self.update_gauges(&state);
            return;
        }
        let files = std::mem::take(&mut state.unsynced);
        let dir = std::mem::take(&mut state.dir_unsynced);
        let cursor = (
            Self::watermark(&state),
            state.last_read_seq.max(state.read_before),
        );
        let cursor_changed = cursor != state.saved_cursor;
        self.update_gauges(&state);
        drop(state);
        if !files.is_empty() {
            let started = Instant::now();
            for file in &files {
                if let Err(error) = file.sync_data() {
                    let mut state = self.state();
                    self.write_failed(&mut state, &error);
                    return;
                }
            }
            self.stats
                .spool_fsync_ms
                .observe(started.elapsed().as_secs_f64() * 1000.0);
            self.stats.spool_fsyncs.fetch_add(1, Relaxed);
        }
        if dir && let Ok(dir) = File::open(&self.settings.dir) {
            let _ = dir.sync_all();
        }
        if cursor_changed {
            let tmp = self.settings.dir.join("cursor.tmp");
            let saved = fs::write(&tmp, format!("{} {}\n", cursor.0, cursor.1))
                .and_then(|()| fs::rename(&tmp, self.settings.dir.join(CURSOR)));
            if saved.is_ok() {
                self.state().saved_cursor = cursor;
            }
        }
    }

    fn update_gauges(&self, state: &State) {
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

    /// Spawns the task that syncs every `spool_fsync_ms` (in `always` mode
    /// too: it saves the cursor and updates the gauges); it stops with the
    /// outputs, after [`close`](Self::close) has synced one last time.
    pub fn spawn_syncer(
        self: &Arc<Self>,
        shutdown: &Arc<crate::shutdown::Shutdown>,
    ) -> crate::shutdown::Task {
        let spool = self.clone();
        let stop = shutdown.outputs().clone();
        crate::shutdown::Task::spawn("spool", async move {
            let mut tick = tokio::time::interval(spool.settings.fsync_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let syncing = spool.clone();
                let _ = tokio::task::spawn_blocking(move || syncing.sync()).await;
            }
        })
    }

    /// At shutdown, once the sink has stopped: syncs, and returns what is
    /// left unread (it stays on disk for the next start).
    /// Records read but never taken count as left too.
    pub fn close(&self) -> Counts {
        self.sync();
        let mut state = self.state();
        state.closed = true;
        let ready = state
            .ready
            .take()
            .map_or(Counts::default(), |(chunk, _)| Counts {
                records: chunk.items.len() as u64,
                datapoints: chunk.items.iter().map(|r| u64::from(r.datapoints)).sum(),
            });
        state.segments.iter().skip(state.read).fold(ready, |a, s| {
            let u = s.unread();
            Counts {
                records: a.records + u.records,
                datapoints: a.datapoints + u.datapoints,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> SpoolSettings {
        SpoolSettings {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_millis(100),
            max_record_bytes: 4096,
            memory_bytes: 1 << 20,
            retry: Duration::ZERO,
        }
    }

    /// `n` records of `points` datapoints each, numbered from `from` in
    /// their data.
    fn records(from: u32, n: u32, points: u32) -> Vec<Routed> {
        (from..from + n)
            .map(|i| Routed {
                topic: "metrics".into(),
                key: i.is_multiple_of(3).then(|| Arc::from("node-1")),
                data: Bytes::from(format!("record {i:06} {}", "x".repeat(40))),
                datapoints: points,
                share: 0,
                seq: 0,
            })
            .collect()
    }

    fn read_all(spool: &Spool) -> Vec<Routed> {
        let mut out = Vec::new();
        while let Some(chunk) = spool.read() {
            out.extend(chunk.items);
        }
        out
    }

    fn names(records: &[Routed]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.data[..13]).into_owned())
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn records_read_back_in_order_with_their_topic_key_and_datapoints() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats.clone());
        assert_eq!(spool.degraded(), None);
        spool.append(&records(0, 10, 2)).unwrap();
        spool.append(&records(10, 10, 2)).unwrap();
        let read = read_all(&spool);
        assert_eq!(names(&read), names(&records(0, 20, 2)));
        let seqs: Vec<u64> = read.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        assert_eq!(read[3].key.as_deref(), Some("node-1"));
        assert_eq!(read[4].key, None);
        assert!(
            read.iter()
                .all(|r| &*r.topic == "metrics" && r.datapoints == 2)
        );
        assert!(!spool.has_unread());
    }

    #[test]
    fn a_segment_is_deleted_only_once_every_record_in_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings(dir.path());
        settings.max_bytes = 512 * 1024; // 64 KiB segments
        let spool = Spool::open(settings, Arc::new(Stats::default()));
        for i in 0..40 {
            spool.append(&records(i * 50, 50, 1)).unwrap();
        }
        let before = segment_files(dir.path()).len();
        assert!(before >= 3, "{before} segments");
        let read = read_all(&spool);
        assert_eq!(read.len(), 2000);
        assert_eq!(
            segment_files(dir.path()).len(),
            before,
            "read is not acknowledged"
        );
        // Everything but one early record: nothing from its segment on can go.
        let held = read[10].seq;
        let others: Vec<u64> = read.iter().map(|r| r.seq).filter(|&s| s != held).collect();
        spool.ack(&others);
        assert_eq!(segment_files(dir.path()).len(), before);
        spool.ack(&[held]);
        // Only the newest (still written to) stays.
        assert_eq!(segment_files(dir.path()).len(), 1);
    }

    #[test]
    fn a_restart_replays_what_was_not_acknowledged_and_counts_possible_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats);
        spool.append(&records(0, 30, 3)).unwrap();
        let first = spool.read().unwrap().items;
        assert_eq!(first.len(), 30);
        // The first ten acknowledged; the rest read (sent) but not.
        spool.ack(&first[..10].iter().map(|r| r.seq).collect::<Vec<_>>());
        spool.append(&records(30, 5, 3)).unwrap();
        spool.sync();
        drop(spool);

        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats.clone());
        let replayed = stats.replayed.get();
        assert_eq!((replayed.records, replayed.datapoints), (25, 75));
        assert_eq!(stats.spool_possible_duplicates.load(Relaxed), 20);
        // Replayed first, in order; new input after it.
        spool.append(&records(100, 2, 3)).unwrap();
        let read = read_all(&spool);
        let mut expected = names(&records(10, 25, 3));
        expected.extend(names(&records(100, 2, 3)));
        assert_eq!(names(&read), expected);
        let seqs: Vec<u64> = read.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }

    #[test]
    fn close_counts_what_stays_unread() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        spool.append(&records(0, 7, 4)).unwrap();
        assert_eq!(
            spool.close(),
            Counts {
                records: 7,
                datapoints: 28
            }
        );
    }

    #[test]
    fn the_disk_bound_refuses_and_drop_oldest_deletes_an_unread_segment_counted() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let mut settings = settings(dir.path());
        settings.max_bytes = 512 * 1024;
        let spool = Spool::open(settings, stats.clone());
        let mut appended = 0u64;
        let full = loop {
            match spool.append(&records(0, 100, 1)) {
                Ok(()) => appended += 100,
                Err(refused) => break refused,
            }
            assert!(appended < 100_000, "the bound never refused");
        };
        assert_eq!(full, Refused::Full);
        let on_disk: u64 = segment_files(dir.path())
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk <= 512 * 1024, "{on_disk} bytes on disk");
        assert!(spool.drop_oldest());
        let dropped = stats.accounting().dropped_for(DropReason::BufferFull);
        assert!(
            dropped.records > 0 && dropped.records.is_multiple_of(100),
            "{dropped:?}"
        );
        spool.append(&records(0, 100, 1)).unwrap();
        let read = read_all(&spool);
        assert_eq!(read.len() as u64 + dropped.records, appended + 100);
    }

    #[test]
    fn a_full_disk_degrades_to_memory_and_the_disk_is_used_again_when_it_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats.clone());
        spool.append(&records(0, 5, 1)).unwrap();
        *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::StorageFull);
        assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
        let reason = spool.degraded().expect("degraded");
        assert!(reason.contains("disk full"), "{reason}");
        assert_eq!(stats.spool_degraded.load(Relaxed), 1);
        assert_eq!(stats.spool_write_errors.load(Relaxed), 1);
        // Still failing: still degraded.
        assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
        *spool.faults().write.lock().unwrap() = None;
        spool.append(&records(10, 5, 1)).unwrap();
        assert_eq!(spool.degraded(), None);
        assert_eq!(stats.spool_degraded.load(Relaxed), 0);
        let mut expected = names(&records(0, 5, 1));
        expected.extend(names(&records(10, 5, 1)));
        assert_eq!(
            names(&read_all(&spool)),
            expected,
            "what was written before is kept"
        );
    }

    /// The segment a full disk sealed is deleted once Kafka has reported
    /// on it, with nothing more to read: its space is what lets the disk
    /// be used again.
    #[test]
    fn a_segment_sealed_by_a_full_disk_frees_its_space_once_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        spool.append(&records(0, 5, 1)).unwrap();
        let read = read_all(&spool);
        assert_eq!(read.len(), 5);
        *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::StorageFull);
        assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
        assert_eq!(segment_files(dir.path()).len(), 1);
        spool.ack(&read.iter().map(|r| r.seq).collect::<Vec<_>>());
        assert_eq!(
            segment_files(dir.path()).len(),
            0,
            "the sealed segment went"
        );
        *spool.faults().write.lock().unwrap() = None;
        spool.append(&records(10, 5, 1)).unwrap();
        assert_eq!(spool.degraded(), None);
        assert_eq!(names(&read_all(&spool)), names(&records(10, 5, 1)));
    }

    /// A record too large to send is counted once, when its write is
    /// taken: a write the disk bound refused leaves it in its chunk.
    #[test]
    fn a_record_too_large_is_counted_once_even_when_its_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let mut settings = settings(dir.path());
        settings.max_bytes = 512 * 1024;
        let spool = Spool::open(settings, stats.clone());
        let mut chunk = records(0, 10, 1);
        chunk[3].data = Bytes::from(vec![0; 200 * 1024]);
        while spool.append(&records(0, 9, 1)).is_ok() {}
        assert_eq!(spool.append(&chunk), Err(Refused::Full));
        assert_eq!(spool.append(&chunk), Err(Refused::Full));
        assert_eq!(
            stats.accounting().dropped_for(DropReason::TooLarge).records,
            0
        );
        assert!(spool.drop_oldest());
        spool.append(&chunk).unwrap();
        assert_eq!(
            stats.accounting().dropped_for(DropReason::TooLarge).records,
            1
        );
    }

    /// Frames whose sequence numbers go back, repeat or jump (segments
    /// copied or concatenated by hand) are skipped as damage, never a panic
    /// or a bookkeeping blow-up, and the others are read.
    #[test]
    fn sequence_numbers_out_of_order_are_damage_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = frame::SEGMENT_MAGIC.to_vec();
        for seq in [5u64, 6, 3, 6, 7, 7 + 3 * MAX_CHUNK_SPAN, u64::MAX] {
            frame::encode(
                &mut seg,
                &FrameRef {
                    seq,
                    written_ms: 1,
                    datapoints: 1,
                    topic: "metrics",
                    key: None,
                    data: b"x",
                },
            );
        }
        fs::write(dir.path().join(segment_name(5)), &seg).unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats.clone());
        assert_eq!(spool.degraded(), None);
        let seqs: Vec<u64> = read_all(&spool).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![5, 6, 7, 7 + 3 * MAX_CHUNK_SPAN, u64::MAX]);
        let lost = stats.accounting().dropped_for(DropReason::SpoolCorrupt);
        assert_eq!(lost.records, 2, "the two out of order");
        assert_eq!(spool.append(&records(0, 1, 1)), Ok(()));
    }

    /// A segment that can't be read at start is left on disk, and no new
    /// segment takes its name.
    #[test]
    fn an_unreadable_segment_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join(segment_name(1));
        fs::create_dir(&name).unwrap();
        let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        assert_eq!(spool.degraded(), None);
        spool.append(&records(0, 3, 1)).unwrap();
        assert!(name.is_dir(), "left alone");
        assert_eq!(read_all(&spool).len(), 3);
    }

    #[test]
    fn a_read_only_disk_degrades_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::ReadOnlyFilesystem);
        assert_eq!(spool.append(&records(0, 5, 1)), Err(Refused::Unavailable));
        let reason = spool.degraded().expect("degraded");
        assert!(
            reason.contains("read-only") || reason.contains("Read-only"),
            "{reason}"
        );
    }

    #[test]
    fn a_directory_that_cannot_be_made_leaves_the_spool_degraded_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(&file.join("spool")), stats.clone());
        let reason = spool.degraded().expect("degraded");
        assert!(reason.contains("can't be created"), "{reason}");
        assert_eq!(spool.append(&records(0, 1, 1)), Err(Refused::Unavailable));
        assert!(check_dir(&file.join("spool")).is_err());
        assert!(check_dir(dir.path()).is_ok());
    }

    #[test]
    fn a_second_collector_on_the_same_directory_is_refused_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        let second = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        assert_eq!(first.degraded(), None);
        let reason = second.degraded().expect("degraded");
        assert!(reason.contains("in use by another collector"), "{reason}");
    }

    /// A crash in the middle of the last write, at every byte of its last
    /// frame: a restart replays every whole frame, counts the torn one, and
    /// goes on writing.
    #[test]
    fn a_torn_last_write_at_every_offset_costs_only_the_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        spool.append(&records(0, 4, 1)).unwrap();
        spool.sync();
        drop(spool);
        let segment = segment_files(dir.path()).remove(0);
        let whole = fs::read(&segment).unwrap();
        let last_record = &records(3, 1, 1)[0];
        let last = frame::frame_len(
            "metrics",
            last_record.key.as_deref(),
            last_record.data.len(),
        );
        let last_start = whole.len() - last;
        for cut in last_start..whole.len() {
            let copy = tempfile::tempdir().unwrap();
            fs::write(
                copy.path().join(segment.file_name().unwrap()),
                &whole[..cut],
            )
            .unwrap();
            let stats = Arc::new(Stats::default());
            let spool = Spool::open(settings(copy.path()), stats.clone());
            assert_eq!(stats.replayed.get().records, 3, "cut at {cut}");
            assert_eq!(
                stats.spool_corrupt.load(Relaxed),
                u64::from(cut > last_start),
                "cut at {cut}"
            );
            spool.append(&records(9, 1, 1)).unwrap();
            let read = read_all(&spool);
            assert_eq!(read.len(), 4, "cut at {cut}");
            assert!(read[3].seq > read[2].seq);
        }
    }

    #[test]
    fn damaged_foreign_zero_length_and_truncated_files_never_stop_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
        spool.append(&records(0, 20, 1)).unwrap();
        spool.sync();
        drop(spool);
        let segment = segment_files(dir.path()).remove(0);
        let mut bytes = fs::read(&segment).unwrap();
        // A flipped bit in the fifth frame's data.
        let frame = bytes.len() / 20;
        bytes[8 + 4 * frame + frame / 2] ^= 0x10;
        fs::write(&segment, &bytes).unwrap();
        // A zero-length segment, a segment of garbage, and a stranger.
        fs::write(dir.path().join(segment_name(9000)), b"").unwrap();
        fs::write(dir.path().join(segment_name(9100)), vec![0xAB; 3000]).unwrap();
        fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();

        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats.clone());
        assert_eq!(spool.degraded(), None);
        assert_eq!(stats.replayed.get().records, 19);
        assert!(stats.spool_corrupt.load(Relaxed) >= 2);
        let read = read_all(&spool);
        assert_eq!(read.len(), 19);
        assert!(!names(&read).contains(&"record 000004".to_owned()));
        assert!(
            dir.path().join("notes.txt").exists(),
            "a stranger is left alone"
        );
        assert!(
            !dir.path().join(segment_name(9000)).exists(),
            "an empty segment goes"
        );
    }

    /// A segment damaged after it was written (here, truncated while the
    /// collector runs): what can't be read back is counted as dropped, so
    /// the count still balances.
    #[test]
    fn records_lost_to_damage_after_writing_are_counted_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let mut settings = settings(dir.path());
        settings.max_bytes = 512 * 1024;
        let spool = Spool::open(settings, stats.clone());
        for i in 0..30 {
            spool.append(&records(i * 50, 50, 2)).unwrap();
        }
        let first = segment_files(dir.path()).remove(0);
        let len = fs::metadata(&first).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let read = read_all(&spool);
        let lost = stats.accounting().dropped_for(DropReason::SpoolCorrupt);
        assert!(lost.records > 0);
        assert_eq!(read.len() as u64 + lost.records, 1500);
        assert_eq!(lost.datapoints, 2 * lost.records);
    }
}
