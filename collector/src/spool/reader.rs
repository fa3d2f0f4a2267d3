//! The reader: records read back in order, a window at a time, under a
//! lease of the memory budget.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use bytes::Bytes;
use tracing::{error, warn};

use super::frame::{Item, Scanner};
use super::ledger::InFlight;
use super::{MAX_CHUNK_SPAN, ReadChunk, Spool, State};
use crate::memory::{Lease, allocated_size};
use crate::route::{RECORD_OVERHEAD, Routed};
use crate::stats::DropReason;

impl Spool {
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
            let (skip_below, done_before) = (state.skip_below, state.done_before.clone());
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
            // Records done before this start are passed over, as read and
            // done.
            let mut passed = 0;
            for item in scanner.by_ref() {
                match item {
                    Item::Frame { frame, len, offset } => {
                        if frame.seq < skip_below {
                            continue;
                        }
                        if frame.seq > prev_seq && done_before.contains(frame.seq) {
                            prev_seq = frame.seq;
                            passed = frame.seq;
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
            state.last_read_seq = state.last_read_seq.max(last_seq).max(passed);
            let Some((first_seq, written_ms)) = first else {
                continue;
            };
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
    pub(super) fn finish_segment(&self, state: &mut State) {
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
}
