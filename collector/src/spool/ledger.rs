//! The ledger: which records read back have their final outcome, the
//! watermark below which every record is done, acknowledgement, and the
//! cursor that saves all of it across restarts.
//!
//! The cursor says what a restart must not replay: every record below the
//! watermark is done, and so is every record whose bit is set in one of its
//! bitmaps (records done above the watermark: delivered, or dropped and
//! counted, out of order). It is written in place, in turn, to one of two
//! slot files, each with a generation and a CRC-32C, and synced: a torn
//! write leaves the other slot, one sync older.
//!
//! ```text
//! slot:  "MCCURSR2" | generation u64 | watermark u64 | last_read u64
//!        | chunks u32 | { first u64 | last u64 | words u32 | word u64 × words }
//!        | crc32c u32 (of everything before it)
//! ```
//!
//! (little-endian). A start also reads the cursor of earlier versions, a
//! text file `cursor` holding "watermark last_read".

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use super::{Spool, State};

/// The cursor file of earlier versions (text: "watermark last_read").
const LEGACY_CURSOR: &str = "cursor";
/// The two slot files the cursor is written to in turn.
const SLOTS: [&str; 2] = ["cursor.0", "cursor.1"];
const MAGIC: &[u8; 8] = b"MCCURSR2";
/// A cursor larger than this is damage, not a cursor (1M chunks).
const MAX_CURSOR_BYTES: u64 = 64 * 1024 * 1024;

/// Whether `name` is one of the cursor's files (left alone by the scan).
pub(super) fn is_cursor_file(name: &str) -> bool {
    name == LEGACY_CURSOR || SLOTS.contains(&name) || name == "cursor.tmp"
}

/// One bit per sequence number from `first`, to `last`: set when done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bitmap {
    pub(super) last: u64,
    pub(super) words: Vec<u64>,
}

impl Bitmap {
    fn is_set(&self, first: u64, seq: u64) -> bool {
        if seq < first || seq > self.last {
            return false;
        }
        let i = seq - first;
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Records done above the watermark, found in the cursor at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DoneSet {
    /// Bitmaps by their first sequence number; they never overlap.
    chunks: BTreeMap<u64, Bitmap>,
}

impl DoneSet {
    /// Whether `seq` was done before this start.
    pub fn contains(&self, seq: u64) -> bool {
        self.chunks
            .range(..=seq)
            .next_back()
            .is_some_and(|(&first, bitmap)| bitmap.is_set(first, seq))
    }

    /// Forgets the bitmaps wholly below `watermark`: those records are done
    /// by the watermark alone.
    pub(super) fn prune_below(&mut self, watermark: u64) {
        self.chunks.retain(|_, bitmap| bitmap.last >= watermark);
    }

    /// Whether it holds nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Adds the set bits of `bitmap` (from `first`), merged with every
    /// bitmap it overlaps, so that bitmaps never overlap.
    pub(super) fn add(&mut self, first: u64, bitmap: Bitmap) {
        let overlapping: Vec<u64> = self
            .chunks
            .range(..=bitmap.last)
            .rev()
            .take_while(|(_, b)| b.last >= first)
            .map(|(&f, _)| f)
            .collect();
        if overlapping.is_empty() {
            self.chunks.insert(first, bitmap);
            return;
        }
        let mut parts = vec![(first, bitmap)];
        parts.extend(
            overlapping
                .into_iter()
                .filter_map(|f| self.chunks.remove(&f).map(|b| (f, b))),
        );
        let start = parts.iter().map(|(f, _)| *f).min().unwrap_or(first);
        let last = parts.iter().map(|(_, b)| b.last).max().unwrap_or(start);
        let mut words = vec![0u64; ((last - start) / 64 + 1) as usize];
        for (f, b) in &parts {
            for (w, &word) in b.words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let seq = f + w as u64 * 64 + bit;
                    if seq <= b.last {
                        let i = seq - start;
                        words[(i / 64) as usize] |= 1 << (i % 64);
                    }
                }
            }
        }
        self.chunks.insert(start, Bitmap { last, words });
    }
}

/// What the cursor saves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every record below it is done.
    pub(super) watermark: u64,
    /// The last record read (sent, perhaps) before the restart: replayed
    /// records up to it are possible duplicates.
    pub(super) last_read: u64,
    /// Records done above the watermark.
    pub(super) done: DoneSet,
}

impl Cursor {
    /// Whether the cursor says `seq` is done (below the watermark, or
    /// marked done above it).
    pub fn is_done(&self, seq: u64) -> bool {
        seq < self.watermark || self.done.contains(seq)
    }
}

impl Cursor {
    /// Reads the newest whole slot in `dir`, or the text cursor of earlier
    /// versions; `(cursor, generation)`, or a default cursor at generation
    /// 0 when there is none.
    pub(super) fn load(dir: &Path) -> (Cursor, u64) {
        let newest = SLOTS
            .iter()
            .filter_map(|slot| {
                let file = File::open(dir.join(slot)).ok()?;
                let len = file.metadata().ok()?.len();
                if len > MAX_CURSOR_BYTES {
                    return None;
                }
                let mut bytes = vec![0; len as usize];
                file.read_exact_at(&mut bytes, 0).ok()?;
                Cursor::decode(&bytes)
            })
            .max_by_key(|(_, generation)| *generation);
        if let Some(found) = newest {
            return found;
        }
        let legacy = fs::read_to_string(dir.join(LEGACY_CURSOR))
            .ok()
            .and_then(|text| {
                let mut parts = text.split_whitespace().map(str::parse::<u64>);
                Some((parts.next()?.ok()?, parts.next()?.ok()?))
            });
        match legacy {
            Some((watermark, last_read)) => (
                Cursor {
                    watermark,
                    last_read,
                    done: DoneSet::default(),
                },
                0,
            ),
            None => (Cursor::default(), 0),
        }
    }

    /// The slot's bytes for `generation`.
    pub fn encode(&self, generation: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            40 + self
                .done
                .chunks
                .values()
                .map(|b| 20 + 8 * b.words.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        for value in [generation, self.watermark, self.last_read] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&(self.done.chunks.len() as u32).to_le_bytes());
        for (first, bitmap) in &self.done.chunks {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&bitmap.last.to_le_bytes());
            out.extend_from_slice(&(bitmap.words.len() as u32).to_le_bytes());
            for word in &bitmap.words {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// A slot's cursor and generation; `None` when it is torn or damaged.
    pub fn decode(bytes: &[u8]) -> Option<(Cursor, u64)> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut rest = body.strip_prefix(MAGIC.as_slice())?;
        let mut u64_ = || -> Option<u64> {
            let (value, tail) = rest.split_at_checked(8)?;
            rest = tail;
            Some(u64::from_le_bytes(value.try_into().ok()?))
        };
        let (generation, watermark, last_read) = (u64_()?, u64_()?, u64_()?);
        let take_u32 = |rest: &mut &[u8]| -> Option<u32> {
            let (value, tail) = rest.split_at_checked(4)?;
            *rest = tail;
            Some(u32::from_le_bytes(value.try_into().ok()?))
        };
        let take_u64 = |rest: &mut &[u8]| -> Option<u64> {
            let (value, tail) = rest.split_at_checked(8)?;
            *rest = tail;
            Some(u64::from_le_bytes(value.try_into().ok()?))
        };
        let count = take_u32(&mut rest)?;
        let mut done = DoneSet::default();
        // The lowest first the next bitmap may have; none once one ends at
        // u64::MAX.
        let mut next_first = Some(0);
        for _ in 0..count {
            let first = take_u64(&mut rest)?;
            let last = take_u64(&mut rest)?;
            let words = take_u32(&mut rest)? as usize;
            // In order, not overlapping, and sized to their span.
            if last < first || first < next_first? {
                return None;
            }
            if (words as u64) != (last - first) / 64 + 1 || words * 8 > rest.len() {
                return None;
            }
            let words = (0..words)
                .map(|_| take_u64(&mut rest))
                .collect::<Option<Vec<u64>>>()?;
            next_first = last.checked_add(1);
            done.chunks.insert(first, Bitmap { last, words });
        }
        rest.is_empty().then_some((
            Cursor {
                watermark,
                last_read,
                done,
            },
            generation,
        ))
    }

    /// Writes the cursor in place to its slot (`generation` picks which),
    /// and syncs it: the other slot keeps the cursor before it.
    pub(super) fn save(&self, dir: &Path, generation: u64) -> io::Result<()> {
        let slot = dir.join(SLOTS[(generation % 2) as usize]);
        let new = !slot.exists();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&slot)?;
        let bytes = self.encode(generation);
        file.write_all_at(&bytes, 0)?;
        file.set_len(bytes.len() as u64)?;
        file.sync_data()?;
        if new {
            File::open(dir)?.sync_all()?;
        }
        // The text cursor of earlier versions is superseded.
        if generation >= 1 {
            for old in [LEGACY_CURSOR, "cursor.tmp"] {
                let _ = fs::remove_file(dir.join(old));
            }
        }
        Ok(())
    }
}

/// A read chunk's records without a final outcome yet.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) remaining: u32,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) written_ms: u64,
    /// One bit per sequence number from `first_seq`: set once done (gaps,
    /// numbers of records not in the chunk, start set).
    pub(super) done: Vec<u64>,
    /// The lowest sequence number in it not yet done.
    pub(super) next_undone: u64,
}

impl InFlight {
    pub(super) fn new(seqs: &[u64], written_ms: u64) -> Self {
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
    pub(super) fn ack(&mut self, seq: u64) -> bool {
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

    /// Its bitmap, for the cursor: the bits past the span are clear.
    fn bitmap(&self) -> Bitmap {
        let mut words = self.done.clone();
        let span = self.last_seq - self.first_seq + 1;
        if !span.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (span % 64)) - 1;
        }
        Bitmap {
            last: self.last_seq,
            words,
        }
    }
}

impl Spool {
    /// All records below this are done (delivered or dropped and counted).
    pub(super) fn watermark(state: &State) -> u64 {
        state
            .in_flight
            .values()
            .next()
            .map_or(state.last_read_seq.saturating_add(1), |f| f.next_undone)
            .max(state.skip_below)
    }

    /// What the cursor would save now: the watermark, the last record
    /// read, and every record done above the watermark (in the read
    /// chunks still in flight, and those done before this start).
    pub(super) fn cursor(state: &mut State) -> Cursor {
        let watermark = Self::watermark(state);
        if !state.done_before.is_empty() {
            std::sync::Arc::make_mut(&mut state.done_before).prune_below(watermark);
        }
        let mut done = DoneSet::clone(&state.done_before);
        for chunk in state.in_flight.values() {
            if chunk.last_seq >= watermark {
                done.add(chunk.first_seq, chunk.bitmap());
            }
        }
        Cursor {
            watermark,
            last_read: state.last_read_seq.max(state.read_before),
            done,
        }
    }

    /// Records a final outcome (delivered, or dropped and counted) for
    /// these sequence numbers of this spool.
    pub(super) fn ack_seqs(&self, seqs: &[u64]) {
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
            let Some(key) = key else {
                continue;
            };
            let Some(chunk) = state.in_flight.get_mut(&key) else {
                continue;
            };
            if !chunk.ack(seq) {
                continue;
            }
            state.ledger_changed = true;
        }
        // A chunk done ahead of an earlier one stays, for the cursor to
        // save what it holds; chunks go once all before them are done.
        while let Some(entry) = state.in_flight.first_entry()
            && entry.get().remaining == 0
        {
            entry.remove();
        }
        self.delete_done(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_a_torn_one_is_refused() {
        let mut done = DoneSet::default();
        done.chunks.insert(
            100,
            Bitmap {
                last: 170,
                words: vec![0b1011, 1 << 6],
            },
        );
        let cursor = Cursor {
            watermark: 90,
            last_read: 180,
            done,
        };
        let bytes = cursor.encode(7);
        assert_eq!(Cursor::decode(&bytes), Some((cursor.clone(), 7)));
        for cut in 0..bytes.len() {
            assert_eq!(Cursor::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert_eq!(Cursor::decode(&flipped), None);
        assert!(cursor.done.contains(100) && cursor.done.contains(101));
        assert!(!cursor.done.contains(102) && cursor.done.contains(103));
        assert!(cursor.done.contains(170) && !cursor.done.contains(171));
        assert!(!cursor.done.contains(99));
    }

    /// The fuzz seed written by `fuzz/make_seeds.py` (Python's `struct`
    /// and a CRC-32C of its own) is a cursor this decoder reads as meant.
    #[test]
    fn a_slot_written_by_another_encoder_decodes() {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/spool_cursor/bitmaps");
        let bytes = fs::read(seed).unwrap();
        let (cursor, generation) = Cursor::decode(&bytes[1..]).expect("a whole slot");
        assert_eq!(
            (generation, cursor.watermark, cursor.last_read),
            (7, 90, 180)
        );
        let done: Vec<u64> = (0..300).filter(|&s| cursor.done.contains(s)).collect();
        assert_eq!(done, vec![100, 101, 103, 170, 200]);
        assert!(cursor.is_done(89) && !cursor.is_done(90));
    }

    /// Found by the fuzzer: a bitmap ending at u64::MAX leaves no room
    /// for another; a second one from u64::MAX overlaps it and is refused
    /// (it was taken, and replaced the first in the map).
    #[test]
    fn no_bitmap_follows_one_that_ends_at_the_last_sequence_number() {
        let mut body = MAGIC.to_vec();
        for value in [1u64, 0, 0] {
            body.extend_from_slice(&value.to_le_bytes());
        }
        body.extend_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            body.extend_from_slice(&u64::MAX.to_le_bytes());
            body.extend_from_slice(&u64::MAX.to_le_bytes());
            body.extend_from_slice(&1u32.to_le_bytes());
            body.extend_from_slice(&1u64.to_le_bytes());
        }
        let mut slot = body.clone();
        slot.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        assert_eq!(Cursor::decode(&slot), None);
        // One such bitmap alone is a cursor, and re-encodes to its bytes.
        let mut one = DoneSet::default();
        one.chunks.insert(
            u64::MAX,
            Bitmap {
                last: u64::MAX,
                words: vec![1],
            },
        );
        let cursor = Cursor {
            done: one,
            ..Cursor::default()
        };
        let bytes = cursor.encode(1);
        assert_eq!(Cursor::decode(&bytes), Some((cursor, 1)));
    }

    #[test]
    fn overlapping_bitmaps_merge_into_one_that_holds_both() {
        let mut done = DoneSet::default();
        done.add(
            10,
            Bitmap {
                last: 20,
                words: vec![1 | 1 << 10],
            },
        );
        done.add(
            15,
            Bitmap {
                last: 100,
                words: vec![1, 1 << 20],
            },
        );
        done.add(
            200,
            Bitmap {
                last: 210,
                words: vec![1],
            },
        );
        let held: Vec<u64> = (0..300).filter(|&s| done.contains(s)).collect();
        assert_eq!(held, vec![10, 15, 20, 99, 200]);
        assert_eq!(done.chunks.len(), 2);
        let cursor = Cursor {
            done,
            ..Cursor::default()
        };
        assert_eq!(
            Cursor::decode(&cursor.encode(1)).map(|(c, _)| c),
            Some(cursor)
        );
    }

    #[test]
    fn the_newest_whole_slot_wins_and_the_legacy_text_cursor_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Cursor::load(dir.path()), (Cursor::default(), 0));
        fs::write(dir.path().join(LEGACY_CURSOR), "12 40\n").unwrap();
        let (legacy, generation) = Cursor::load(dir.path());
        assert_eq!(
            (legacy.watermark, legacy.last_read, generation),
            (12, 40, 0)
        );
        let at = |watermark| Cursor {
            watermark,
            ..Cursor::default()
        };
        at(20).save(dir.path(), 1).unwrap();
        assert!(!dir.path().join(LEGACY_CURSOR).exists());
        at(30).save(dir.path(), 2).unwrap();
        assert_eq!(Cursor::load(dir.path()), (at(30), 2));
        // A torn write of the newer slot leaves the older one.
        let slot = dir.path().join(SLOTS[0]);
        let bytes = fs::read(&slot).unwrap();
        fs::write(&slot, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(Cursor::load(dir.path()), (at(20), 1));
    }
}
