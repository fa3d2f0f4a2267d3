//! The spool's on-disk format, kept apart from the files and the state
//! that hold it: a segment file is a header and a run of frames, one frame
//! per routed record.
//!
//! ```text
//! segment:  "MCSPOOL1" frame*
//! frame:    "MCF1" | len: u32 LE | crc: u32 LE | payload (len bytes)
//! payload:  seq: u64 LE | written_ms: u64 LE | datapoints: u32 LE
//!           | topic_len: u32 LE | topic | key_len: u32 LE (u32::MAX: none) | key
//!           | data (the record's Avro binary, to the end)
//! ```
//!
//! `crc` is CRC-32C (Castagnoli) over `len` and the payload, so a flipped
//! bit in the length is caught as surely as one in the data. The marker
//! lets the [`Scanner`] find the next frame after a damaged one: a torn
//! write, a flipped bit, zeros or a foreign file cost the bytes they
//! spoil, never the frames after them.

/// The first bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"MCSPOOL1";
/// The first bytes of every frame.
pub const FRAME_MAGIC: &[u8; 4] = b"MCF1";
/// Marker, length and CRC.
pub const FRAME_HEADER: usize = 12;
/// The payload's fixed part: seq, written_ms, datapoints, the two lengths.
const PAYLOAD_FIXED: usize = 8 + 8 + 4 + 4 + 4;
const NO_KEY: u32 = u32::MAX;

/// The bytes a frame of this record takes.
pub fn frame_len(topic: &str, key: Option<&str>, data_len: usize) -> usize {
    FRAME_HEADER + PAYLOAD_FIXED + topic.len() + key.map_or(0, str::len) + data_len
}

/// One record, as written and as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// The spool's sequence number of the record (from 1, increasing).
    pub seq: u64,
    /// When it was written, ms since the Unix epoch.
    pub written_ms: u64,
    /// Datapoints in it.
    pub datapoints: u32,
    /// Its Kafka topic.
    pub topic: &'a str,
    /// Its partition key.
    pub key: Option<&'a str>,
    /// The record's Avro binary.
    pub data: &'a [u8],
}

/// Appends `frame` to `out`.
pub fn encode(out: &mut Vec<u8>, frame: &FrameRef<'_>) {
    let len = frame_len(frame.topic, frame.key, frame.data.len()) - FRAME_HEADER;
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let start = out.len();
    out.extend_from_slice(FRAME_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&frame.seq.to_le_bytes());
    out.extend_from_slice(&frame.written_ms.to_le_bytes());
    out.extend_from_slice(&frame.datapoints.to_le_bytes());
    out.extend_from_slice(&(frame.topic.len() as u32).to_le_bytes());
    out.extend_from_slice(frame.topic.as_bytes());
    match frame.key {
        Some(key) => {
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
        }
        None => out.extend_from_slice(&NO_KEY.to_le_bytes()),
    }
    out.extend_from_slice(frame.data);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[start + 4..start + 8]),
        &out[start + FRAME_HEADER..],
    );
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// What the scanner found at one place of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// A whole, checked frame at `offset`.
    Frame {
        /// Where it starts, from the start of the scanned bytes.
        offset: usize,
        /// Its bytes, header included.
        len: usize,
        /// The record.
        frame: FrameRef<'a>,
    },
    /// Bytes that are not a valid frame, skipped.
    Corrupt {
        /// Where they start.
        offset: usize,
        /// How many were skipped.
        len: usize,
        /// What was wrong.
        why: &'static str,
    },
    /// A frame that may be whole once more bytes are read: the scan stops
    /// here, to resume from `offset` (only when more bytes follow).
    Incomplete {
        /// Where the frame starts.
        offset: usize,
    },
}

/// Reads frames from a window of a segment, skipping damage.
#[derive(Debug)]
pub struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
    max_payload: usize,
    more: bool,
    done: bool,
}

impl<'a> Scanner<'a> {
    /// Scans `buf`. `more` says that the segment goes on past it, so that a
    /// frame cut at its end is [`Item::Incomplete`] rather than damage;
    /// `max_frame` is the longest frame the writer writes.
    pub fn new(buf: &'a [u8], max_frame: usize, more: bool) -> Self {
        Self {
            buf,
            pos: 0,
            max_payload: max_frame.saturating_sub(FRAME_HEADER),
            more,
            done: false,
        }
    }

    /// Where the scan is.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Skips to the next frame marker after `from`: what lies before it is
    /// damage. Near the end of a window that goes on, a marker may straddle
    /// the edge: the last three bytes are kept for the next read.
    fn resync(&mut self, from: usize, why: &'static str) -> Item<'a> {
        let next = self.buf[from + 1..]
            .windows(FRAME_MAGIC.len())
            .position(|w| w == FRAME_MAGIC)
            .map(|i| from + 1 + i);
        let to = next.unwrap_or_else(|| {
            if self.more {
                self.buf
                    .len()
                    .saturating_sub(FRAME_MAGIC.len() - 1)
                    .max(from + 1)
            } else {
                self.buf.len()
            }
        });
        self.pos = to;
        Item::Corrupt {
            offset: from,
            len: to - from,
            why,
        }
    }
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    buf.get(at..at + 8).map(|b| {
        let mut a = [0; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

/// Parses a payload whose CRC matched.
fn parse(payload: &[u8]) -> Option<FrameRef<'_>> {
    let seq = u64_at(payload, 0)?;
    let written_ms = u64_at(payload, 8)?;
    let datapoints = u32_at(payload, 16)?;
    let topic_len = u32_at(payload, 20)? as usize;
    let topic_end = 24usize.checked_add(topic_len)?;
    let topic = std::str::from_utf8(payload.get(24..topic_end)?).ok()?;
    let key_len = u32_at(payload, topic_end)?;
    let key_start = topic_end + 4;
    let (key, data_start) = if key_len == NO_KEY {
        (None, key_start)
    } else {
        let end = key_start.checked_add(key_len as usize)?;
        (
            Some(std::str::from_utf8(payload.get(key_start..end)?).ok()?),
            end,
        )
    };
    if seq == 0 || topic.is_empty() {
        return None;
    }
    Some(FrameRef {
        seq,
        written_ms,
        datapoints,
        topic,
        key,
        data: payload.get(data_start..)?,
    })
}

impl<'a> Iterator for Scanner<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        if self.done || self.pos >= self.buf.len() {
            return None;
        }
        let at = self.pos;
        let rest = &self.buf[at..];
        if rest.len() < FRAME_HEADER {
            if self.more {
                self.done = true;
                return Some(Item::Incomplete { offset: at });
            }
            if !rest.starts_with(&FRAME_MAGIC[..rest.len().min(4)]) {
                return Some(self.resync(at, "no frame marker"));
            }
            self.pos = self.buf.len();
            return Some(Item::Corrupt {
                offset: at,
                len: rest.len(),
                why: "torn frame header",
            });
        }
        if &rest[..4] != FRAME_MAGIC {
            return Some(self.resync(at, "no frame marker"));
        }
        let len = u32_at(rest, 4).unwrap_or(0) as usize;
        if len < PAYLOAD_FIXED || len > self.max_payload {
            return Some(self.resync(at, "frame length out of range"));
        }
        let total = FRAME_HEADER + len;
        if rest.len() < total {
            if self.more {
                self.done = true;
                return Some(Item::Incomplete { offset: at });
            }
            return Some(self.resync(at, "torn frame"));
        }
        let stored = u32_at(rest, 8).unwrap_or(0);
        let payload = &rest[FRAME_HEADER..total];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&rest[4..8]), payload);
        if crc != stored {
            // The length may be what is damaged: look for the next marker
            // rather than trusting it.
            return Some(self.resync(at, "checksum mismatch"));
        }
        self.pos = at + total;
        Some(match parse(payload) {
            Some(frame) => Item::Frame {
                offset: at,
                len: total,
                frame,
            },
            None => Item::Corrupt {
                offset: at,
                len: total,
                why: "malformed frame",
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn frame(seq: u64, data: &[u8]) -> FrameRef<'_> {
        FrameRef {
            seq,
            written_ms: 1_700_000_000_000 + seq,
            datapoints: seq as u32 % 7,
            topic: "metrics-agent",
            key: seq.is_multiple_of(2).then_some("node-1"),
            data,
        }
    }

    fn segment(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=n {
            starts.push(out.len());
            let data = vec![seq as u8; 20 + seq as usize * 3];
            encode(&mut out, &frame(seq, &data));
        }
        (out, starts)
    }

    fn seqs(buf: &[u8], more: bool) -> (Vec<u64>, usize) {
        let mut seqs = Vec::new();
        let mut corrupt = 0;
        for item in Scanner::new(buf, MAX, more) {
            match item {
                Item::Frame { frame, .. } => seqs.push(frame.seq),
                Item::Corrupt { .. } => corrupt += 1,
                Item::Incomplete { .. } => {}
            }
        }
        (seqs, corrupt)
    }

    #[test]
    fn frames_read_back_as_written() {
        let data = b"avro bytes";
        let mut out = Vec::new();
        encode(&mut out, &frame(2, data));
        encode(&mut out, &frame(3, b""));
        assert_eq!(
            out.len(),
            frame_len("metrics-agent", Some("node-1"), data.len())
                + frame_len("metrics-agent", None, 0)
        );
        let items: Vec<_> = Scanner::new(&out, MAX, false).collect();
        assert_eq!(items.len(), 2);
        assert!(
            matches!(items[0], Item::Frame { offset: 0, frame, .. } if frame == self::frame(2, data))
        );
        assert!(
            matches!(items[1], Item::Frame { frame, .. } if frame.key.is_none() && frame.data.is_empty())
        );
    }

    /// A segment written by an encoder we did not write (fixtures/spool,
    /// Python, its own CRC-32C): our scanner reads exactly its frames, and
    /// our encoder writes exactly its bytes.
    #[test]
    fn a_segment_written_from_the_format_s_description_reads_back_and_is_what_we_write() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/spool");
        let segment = std::fs::read(root.join("segment.seg")).unwrap();
        let expected: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(root.join("segment.expected.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(&segment[..8], SEGMENT_MAGIC);
        let frames: Vec<FrameRef<'_>> = Scanner::new(&segment[8..], MAX, false)
            .map(|item| match item {
                Item::Frame { frame, .. } => frame,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(frames.len(), expected.len());
        let mut ours = SEGMENT_MAGIC.to_vec();
        for (frame, want) in frames.iter().zip(&expected) {
            assert_eq!(frame.seq, want["seq"].as_u64().unwrap());
            assert_eq!(frame.written_ms, want["written_ms"].as_u64().unwrap());
            assert_eq!(
                u64::from(frame.datapoints),
                want["datapoints"].as_u64().unwrap()
            );
            assert_eq!(frame.topic, want["topic"].as_str().unwrap());
            assert_eq!(frame.key, want["key"].as_str());
            let hex: String = frame.data.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, want["data_hex"].as_str().unwrap());
            encode(&mut ours, frame);
        }
        assert_eq!(ours, segment);
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    /// A torn last write, cut at every byte of the last frame: every frame
    /// before it reads back, the torn one is reported once, nothing else.
    #[test]
    fn a_torn_write_at_every_offset_of_the_last_frame_costs_only_that_frame() {
        let (seg, starts) = segment(5);
        let last = starts[4];
        for cut in last..seg.len() {
            let (read, corrupt) = seqs(&seg[..cut], false);
            assert_eq!(read, vec![1, 2, 3, 4], "cut at {cut}");
            assert_eq!(corrupt, usize::from(cut > last), "cut at {cut}");
        }
    }

    /// In a window that goes on, a cut frame is not damage: the scan stops
    /// at it, to read it whole next time.
    #[test]
    fn a_frame_cut_by_the_window_is_incomplete_not_corrupt() {
        let (seg, starts) = segment(5);
        for cut in starts[3] + 1..starts[4] {
            let items: Vec<_> = Scanner::new(&seg[..cut], MAX, true).collect();
            assert_eq!(
                items.last(),
                Some(&Item::Incomplete { offset: starts[3] }),
                "cut at {cut}"
            );
            assert!(!items.iter().any(|i| matches!(i, Item::Corrupt { .. })));
        }
    }

    #[test]
    fn zeros_a_foreign_file_and_a_too_long_length_are_skipped() {
        assert_eq!(seqs(&[0; 4096], false), (vec![], 1));
        assert_eq!(seqs(b"#!/bin/sh\necho not a segment\n", false), (vec![], 1));
        let (mut seg, starts) = segment(3);
        // Frame 2's length now claims more than any frame may be.
        seg[starts[1] + 4..starts[1] + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(seqs(&seg, false), (vec![1, 3], 1));
    }

    proptest! {
        /// Random bit flips: every frame the scan returns is one that was
        /// written, in order, and every frame the flips missed is returned.
        #[test]
        fn bit_flips_cost_only_the_frames_they_hit(flips in proptest::collection::vec(any::<(usize, u8)>(), 1..6)) {
            let (mut seg, starts) = segment(12);
            let original = seg.clone();
            for (at, bit) in flips {
                let at = at % seg.len();
                seg[at] ^= 1 << (bit % 8);
            }
            // The frames whose bytes changed (two flips of one bit cancel).
            let hit: std::collections::BTreeSet<usize> = (0..seg.len())
                .filter(|&i| seg[i] != original[i])
                .map(|i| starts.partition_point(|&s| s <= i))
                .collect();
            prop_assume!(!hit.is_empty());
            let (read, corrupt) = seqs(&seg, false);
            let untouched: Vec<u64> = (1..=12).filter(|s| !hit.contains(&(*s as usize))).collect();
            prop_assert!(read.windows(2).all(|w| w[0] < w[1]), "{read:?}");
            for seq in &untouched {
                prop_assert!(read.contains(seq), "frame {seq} lost: read {read:?}");
            }
            prop_assert!(read.iter().all(|s| untouched.contains(s)), "a damaged frame read back: {read:?}");
            prop_assert!(corrupt >= 1);
        }

        /// Any bytes at all: the scan ends, and never returns a frame whose
        /// CRC did not match.
        #[test]
        fn any_bytes_scan_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), more: bool) {
            let mut covered = 0;
            for item in Scanner::new(&bytes, MAX, more) {
                match item {
                    Item::Frame { offset, len, .. } | Item::Corrupt { offset, len, .. } => {
                        prop_assert_eq!(offset, covered);
                        covered += len;
                    }
                    Item::Incomplete { offset } => prop_assert_eq!(offset, covered),
                }
            }
        }
    }
}
