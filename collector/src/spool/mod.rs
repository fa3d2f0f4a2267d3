//! The disk spool (`buffer_type = disk`): routed records written to
//! checksummed segment files as they are read, read back by the sink, and
//! deleted only once Kafka has reported on every record in them.
//!
//! - **Segments** (`segment.rs`). `spool_dir` holds `<first seq>.seg` files
//!   (the format is in [`frame`]), the cursor's two slots and a `lock`
//!   file. Writes go to the newest segment, which is sealed at an eighth of
//!   the bound in force (at most 64 MiB) so that space comes back in
//!   steps. The bound is `spool_max_bytes`, or less where the filesystem
//!   has less room (statvfs): a small disk fills by the spool's own bound,
//!   and then records wait in memory, with no write failing.
//! - **Acknowledgement** (`ledger.rs`). Every record gets a sequence number.
//!   The sink reads records in that order (`reader.rs`) and reports each
//!   final outcome (delivered, or dropped and counted) with [`Spool::ack`].
//!   All records below the *watermark* are done; a segment is deleted once
//!   the reader is past it and its last record is below the watermark. The
//!   cursor saves the watermark and a bitmap of the records done above it.
//! - **Durability** (`syncer.rs`). `spool_fsync = interval` syncs the
//!   newest segment (and segments just sealed, the directory, the parked
//!   area and the cursor) every `spool_fsync_ms`; `always` syncs each write
//!   before the input goes on.
//! - **Restart** (`replay.rs`). [`Spool::open`] scans every segment, counts
//!   what the cursor does not say is done as `replayed`, and the reader
//!   delivers it before anything newer. Records read before the restart but
//!   not yet acknowledged may have reached Kafka: they are counted as
//!   `spool_possible_duplicates`.
//! - **Parked area** (`parked.rs`). The records of topics the brokers refuse
//!   are moved to a spool of their own per topic, so that they pin none of
//!   the main spool's segments, and read back once the topic can be written.
//! - **Damage.** A torn, flipped or foreign byte costs the frames it
//!   spoils: the scanner skips to the next frame marker, logs the offset
//!   and counts `spool_corrupt`. Each segment keeps a ledger of the records
//!   and datapoints it holds; what the reader could not read back of them
//!   is counted as dropped (`spool_corrupt`), so the identity stays exact.
//! - **No disk** (`faults.rs`). A directory that is missing and can't be
//!   made, is read only, is used by another collector, or a write failing
//!   (ENOSPC, EIO): the spool is *degraded*, the buffer keeps records in
//!   memory under its own bound, `/health` says why, and the spool is tried
//!   again every few seconds.
mod faults;
pub mod frame;
mod ledger;
mod parked;
mod reader;
mod replay;
mod segment;
mod syncer;

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::memory::Lease;
use crate::route::Routed;
use crate::stats::{Counts, DropReason, Stats};
use frame::FrameRef;

pub use faults::Faults;
use faults::Health;
pub use ledger::Cursor;
use ledger::InFlight;
pub use parked::PARKED_SEQ;
use segment::Segment;

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
    /// Bound on the parked area, where the records of topics the brokers
    /// refuse wait (0: no parked area; see `parked.rs`).
    pub parked_max_bytes: u64,
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
            parked_max_bytes: config.parked_max_bytes() as u64,
        })
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

/// The spool's state, as `/health` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Why records wait in memory instead, when they do.
    pub reason: Option<String>,
    /// The bound in force, bytes.
    pub bound: u64,
    /// Whether the filesystem's free space sets the bound, below
    /// `spool_max_bytes`.
    pub limited_by_filesystem: bool,
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
const LOCK: &str = "lock";
/// How long a degraded spool waits before trying the disk again.
const RETRY: Duration = Duration::from_secs(2);

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
    /// Records above `skip_below` done before this start: skipped too.
    done_before: Arc<ledger::DoneSet>,
    bytes: u64,
    /// Files written since the last sync, by their segment's first
    /// sequence number (a deleted segment's is let go of at once).
    unsynced: Vec<(u64, Arc<File>)>,
    dir_unsynced: bool,
    /// The watermark and last read record the cursor holds.
    saved_cursor: (u64, u64),
    /// A record above the watermark got its outcome since the cursor was
    /// saved.
    ledger_changed: bool,
    /// The generation of the cursor's next save.
    cursor_generation: u64,
    /// The last record read before this start (from the cursor): kept in
    /// the cursor until the reader passes it.
    read_before: u64,
    /// The bound in force: `spool_max_bytes`, or what the filesystem has
    /// room for when that is less (`fs_limited`).
    bound: u64,
    fs_limited: bool,
    /// Writes are refused because the filesystem's room is used up.
    fs_full: bool,
    /// Read and not yet taken by the sink.
    ready: Option<(ReadChunk, Lease)>,
    /// Closed: nothing more is read.
    closed: bool,
}

/// A read of the spool: records with their sequence numbers.
#[derive(Debug)]
pub struct ReadChunk {
    /// The records, in order.
    pub items: Vec<Routed>,
    /// Heap they take: the read buffer.
    pub heap: usize,
}

/// What a spool is for: the gauges and `/health` speak of the main one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The spool of every record routed (`spool_dir`).
    Main,
    /// A refused topic's records, moved aside (see [`parked`]).
    Parked,
}

/// The disk spool.
pub struct Spool {
    settings: SpoolSettings,
    role: Role,
    /// The parked topics' spools (the main spool's, with a parked bound).
    area: Option<Mutex<parked::Area>>,
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
        Self::open_as(settings, stats, Role::Main)
    }

    fn open_as(settings: SpoolSettings, stats: Arc<Stats>, role: Role) -> Arc<Self> {
        let area = (role == Role::Main && settings.parked_max_bytes > 0)
            .then(|| Mutex::new(parked::Area::new(&settings)));
        let spool = Arc::new(Self {
            role,
            area,
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
                done_before: Arc::default(),
                bytes: 0,
                unsynced: Vec::new(),
                dir_unsynced: false,
                saved_cursor: (0, 0),
                ledger_changed: false,
                cursor_generation: 1,
                read_before: 0,
                bound: settings.max_bytes,
                fs_limited: false,
                fs_full: false,
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

    /// Why the disk is not in use, when it is not: it failed, or its
    /// filesystem is full.
    pub fn degraded(&self) -> Option<String> {
        self.report().reason
    }

    /// The spool's state, for `/health`.
    pub fn report(&self) -> Report {
        let state = self.state();
        let reason = match &state.health {
            Health::Degraded { reason, .. } => Some(reason.clone()),
            Health::Ok if state.fs_full => Some(format!(
                "its filesystem is full: {} holds {} bytes of segments, all its free space allows \
                 (spool_max_bytes is {}); records wait in memory until Kafka frees a segment",
                self.settings.dir.display(),
                state.bytes,
                self.settings.max_bytes
            )),
            Health::Ok => None,
        };
        Report {
            reason,
            bound: state.bound,
            limited_by_filesystem: state.fs_limited,
        }
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
        if state.bytes + len > state.bound && has_unread {
            if !state.fs_limited {
                return Err(Refused::Full);
            }
            // The filesystem is the bound: a full disk, met before the
            // kernel refuses a write. The records wait in memory.
            if !state.fs_full {
                state.fs_full = true;
                self.set_degraded_gauge(1);
                warn!(dir = %self.settings.dir.display(), bytes = state.bytes, bound = state.bound,
                    "The disk spool's filesystem is full; records wait in memory until Kafka frees a segment.");
            }
            return Err(Refused::Unavailable);
        }
        if state.fs_full {
            state.fs_full = false;
            if matches!(state.health, Health::Ok) {
                self.set_degraded_gauge(0);
            }
            info!(dir = %self.settings.dir.display(), "The disk spool has room again.");
        }
        let active_len = state.segments.back().map_or(0, |s| s.bytes);
        let active_used = state.segments.back().is_some_and(|s| s.records > 0);
        if active_used
            && active_len + len > Self::segment_bytes(&state)
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
        if self.role == Role::Main {
            self.stats.spool_bytes.store(state.bytes as i64, Relaxed);
        }
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
        } else if !state.unsynced.iter().any(|(_, f)| Arc::ptr_eq(f, &writer))
            && let Some(segment) = state.segments.back()
        {
            let first_seq = segment.first_seq;
            state.unsynced.push((first_seq, writer));
        }
        Ok(())
    }

    /// At shutdown, once the sink has stopped: syncs, and returns what is
    /// left unread (it stays on disk for the next start).
    /// Records read but never taken count as left too.
    pub fn close(&self) -> Counts {
        self.sync();
        let parked = self.close_parked();
        let mut state = self.state();
        state.closed = true;
        let left = Self::unread_in(&state);
        state.ready = None;
        Counts {
            records: left.records + parked.records,
            datapoints: left.datapoints + parked.datapoints,
        }
    }

    /// Records a final outcome (delivered, or dropped and counted) for
    /// these records of `topic`: read back from the main spool, or from
    /// the topic's parked spool ([`PARKED_SEQ`] set).
    pub fn ack(&self, topic: &str, seqs: &[u64]) {
        if seqs.iter().any(|s| s & PARKED_SEQ != 0) {
            let (parked, main): (Vec<u64>, Vec<u64>) =
                seqs.iter().partition(|&&s| s & PARKED_SEQ != 0);
            let parked: Vec<u64> = parked.into_iter().map(|s| s & !PARKED_SEQ).collect();
            self.ack_parked(topic, &parked);
            self.ack_seqs(&main);
        } else {
            self.ack_seqs(seqs);
        }
    }

    /// Bytes of its segments.
    fn bytes(&self) -> u64 {
        self.state().bytes
    }

    /// What it holds unread (read back and not yet taken counts as unread).
    fn unread(&self) -> Counts {
        Self::unread_in(&self.state())
    }

    fn unread_in(state: &State) -> Counts {
        let ready = state
            .ready
            .as_ref()
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

    /// Whether it holds its lock, is in use, and its directory holds no
    /// segment it does not know of (one it could not read, say).
    fn owns_its_files(&self) -> bool {
        let state = self.state();
        if state.lock.is_none() || !matches!(state.health, Health::Ok) {
            return false;
        }
        let on_disk = fs::read_dir(&self.settings.dir).map_or(usize::MAX, |entries| {
            entries
                .flatten()
                .filter(|e| segment::parse_segment_name(&e.file_name().to_string_lossy()).is_some())
                .count()
        });
        on_disk == state.segments.len()
    }

    /// Whether it holds nothing: nothing unread, nothing read without an
    /// outcome.
    fn is_empty(&self) -> bool {
        let state = self.state();
        state.in_flight.is_empty()
            && state.ready.is_none()
            && state.segments.iter().all(|s| s.unread().records == 0)
    }

    /// `collector_spool_degraded`, for the main spool.
    fn set_degraded_gauge(&self, value: i64) {
        if self.role == Role::Main {
            self.stats.spool_degraded.store(value, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
