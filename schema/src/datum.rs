//! The Avro binary *format* of our known schemas: a hand-written reader and
//! writer, with no `apache_avro::types::Value` on the hot path.
//!
//! Everything here is a pure function over byte slices. Framing (headers,
//! blocks, sync markers, codecs) lives in [`crate::ocf`].

use crate::model::{Datapoint, MetricList, Tag};

/// Why a datum could not be read. `pos` is relative to the start of the
/// slice the [`Cursor`] was made from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at datum byte {pos}")]
pub struct DatumError {
    /// What went wrong, for humans.
    pub what: &'static str,
    /// Where, relative to the start of the block's data.
    pub pos: usize,
}

/// A read position over Avro binary data.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The bytes from `start` up to the current position.
    pub fn consumed_since(&self, start: usize) -> &'a [u8] {
        &self.buf[start.min(self.pos)..self.pos]
    }

    fn fail<T>(&self, what: &'static str) -> Result<T, DatumError> {
        Err(DatumError {
            what,
            pos: self.pos,
        })
    }

    /// Reads a zigzag varint `long`.
    #[inline]
    pub fn read_long(&mut self) -> Result<i64, DatumError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&byte) = self.buf.get(self.pos) else {
                return self.fail("truncated varint");
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
            shift += 7;
            if shift > 63 {
                return self.fail("varint longer than 10 bytes");
            }
        }
    }

    /// Steps over a zigzag varint `long`, failing exactly as
    /// [`read_long`](Self::read_long) would.
    #[inline]
    pub fn skip_long(&mut self) -> Result<(), DatumError> {
        // Fast path: the varint ends within the next 8 bytes.
        if let Some(word) = self.buf.get(self.pos..self.pos + 8) {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            let ends = !word & 0x8080_8080_8080_8080;
            if ends != 0 {
                self.pos += ends.trailing_zeros() as usize / 8 + 1;
                return Ok(());
            }
        }
        self.read_long().map(|_| ())
    }

    /// Steps over a UTF-8 `string`, failing exactly as
    /// [`read_str`](Self::read_str) would.
    #[inline]
    pub fn skip_str(&mut self) -> Result<(), DatumError> {
        let start = self.pos;
        let bytes = self.read_bytes()?;
        if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
            Ok(())
        } else {
            Err(DatumError {
                what: "string is not UTF-8",
                pos: start,
            })
        }
    }

    /// Reads a little-endian IEEE 754 `double`.
    #[inline]
    pub fn read_double(&mut self) -> Result<f64, DatumError> {
        match self.buf.get(self.pos..self.pos + 8) {
            Some(bytes) => {
                self.pos += 8;
                let mut raw = [0u8; 8];
                raw.copy_from_slice(bytes);
                Ok(f64::from_le_bytes(raw))
            }
            None => self.fail("truncated double"),
        }
    }

    /// Reads a length-prefixed byte string without copying it.
    #[inline]
    pub fn read_bytes(&mut self) -> Result<&'a [u8], DatumError> {
        let start = self.pos;
        let len = self.read_long()?;
        let Ok(len) = usize::try_from(len) else {
            self.pos = start;
            return self.fail("negative length");
        };
        match self.buf.get(self.pos..self.pos.saturating_add(len)) {
            Some(bytes) => {
                self.pos += len;
                Ok(bytes)
            }
            None => {
                self.pos = start;
                self.fail("length runs past the end of the data")
            }
        }
    }

    /// Reads a UTF-8 `string`.
    #[inline]
    pub fn read_str(&mut self) -> Result<&'a str, DatumError> {
        let start = self.pos;
        let bytes = self.read_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| DatumError {
            what: "string is not UTF-8",
            pos: start,
        })
    }

    /// Reads a UTF-8 `string` into an owned `String`.
    #[inline]
    pub fn read_string(&mut self) -> Result<String, DatumError> {
        self.read_str().map(str::to_owned)
    }

    /// Reads an Avro array of items, each at least `min_item_len` bytes long,
    /// so that a hostile count can't make us reserve memory the data could
    /// never fill.
    #[inline]
    pub fn read_array<T>(
        &mut self,
        min_item_len: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DatumError>,
    ) -> Result<Vec<T>, DatumError> {
        let mut out = Vec::new();
        while let Some((count, _)) = self.read_block_count(min_item_len)? {
            out.reserve(count as usize);
            for _ in 0..count {
                out.push(item(self)?);
            }
        }
        Ok(out)
    }

    /// Reads the count that starts an array block: `None` for the zero that
    /// ends the array, else the number of items and whether it was written
    /// positive (a negative count is followed by the block's size in bytes,
    /// read here too). Refuses a count the data left could not hold at
    /// `min_item_len` bytes an item.
    #[inline]
    pub(crate) fn read_block_count(
        &mut self,
        min_item_len: usize,
    ) -> Result<Option<(u64, bool)>, DatumError> {
        let count = self.read_long()?;
        if count == 0 {
            return Ok(None);
        }
        let positive = count > 0;
        let count = if positive {
            count
        } else {
            let count = count
                .checked_neg()
                .map_or_else(|| self.fail("bad array count"), Ok)?;
            self.read_long()?;
            count
        };
        // count is positive here; the cast can't lose a sign.
        let count = count as u64;
        if count > (self.remaining() / min_item_len.max(1)) as u64 {
            return self.fail("array count larger than the data left");
        }
        Ok(Some((count, positive)))
    }
}

/// Smallest encoding of each record, used to bound counts.
pub(crate) const MIN_TAG_LEN: usize = 2;
pub(crate) const MIN_DATAPOINT_LEN: usize = 10;
pub(crate) const MIN_METRIC_LIST_LEN: usize = 3;
const MIN_SEED_METRIC_LEN: usize = 2;
const MIN_SEED_DATAPOINT_LEN: usize = 9;

fn read_tags(c: &mut Cursor<'_>) -> Result<Vec<Tag>, DatumError> {
    c.read_array(MIN_TAG_LEN, |c| {
        Ok(Tag {
            key: c.read_string()?,
            value: c.read_string()?,
        })
    })
}

/// Reads one `dcos.metrics.MetricList` written with the current schema.
#[inline]
pub fn read_metric_list(c: &mut Cursor<'_>) -> Result<MetricList, DatumError> {
    let topic = c.read_string()?;
    let tags = read_tags(c)?;
    let datapoints = c.read_array(MIN_DATAPOINT_LEN, |c| {
        Ok(Datapoint {
            name: c.read_string()?,
            time_ms: c.read_long()?,
            value: c.read_double()?,
        })
    })?;
    Ok(MetricList {
        topic,
        tags,
        datapoints,
    })
}

/// Reads one MetricList written with the seed-era schema
/// (`metrics: [Metric{name, datapoints: [{time, value}]}]`) and flattens it:
/// each Metric's datapoints become Datapoints named after the Metric.
pub fn read_seed_metric_list(c: &mut Cursor<'_>) -> Result<MetricList, DatumError> {
    let topic = c.read_string()?;
    let tags = read_tags(c)?;
    let mut datapoints = Vec::new();
    let metrics = c.read_array(MIN_SEED_METRIC_LEN, |c| {
        let name = c.read_str()?;
        let points = c.read_array(MIN_SEED_DATAPOINT_LEN, |c| {
            Ok((c.read_long()?, c.read_double()?))
        })?;
        Ok((name, points))
    })?;
    for (name, points) in metrics {
        datapoints.extend(
            points
                .into_iter()
                .map(|(time_ms, value)| Datapoint::new(name, time_ms, value)),
        );
    }
    Ok(MetricList {
        topic,
        tags,
        datapoints,
    })
}

/// Appends a zigzag varint `long`.
#[inline]
pub fn write_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Bytes [`write_long`] appends for `value`.
#[inline]
pub fn long_len(value: i64) -> usize {
    let n = ((value << 1) ^ (value >> 63)) as u64;
    (64 - n.leading_zeros() as usize).div_ceil(7).max(1)
}

/// Appends a length-prefixed byte string.
#[inline]
pub fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// Appends one `dcos.metrics.MetricList` in the current schema.
pub fn write_metric_list(out: &mut Vec<u8>, list: &MetricList) {
    write_bytes(out, list.topic.as_bytes());
    if !list.tags.is_empty() {
        write_long(out, list.tags.len() as i64);
        for tag in &list.tags {
            write_bytes(out, tag.key.as_bytes());
            write_bytes(out, tag.value.as_bytes());
        }
    }
    write_long(out, 0);
    if !list.datapoints.is_empty() {
        write_long(out, list.datapoints.len() as i64);
        for point in &list.datapoints {
            write_bytes(out, point.name.as_bytes());
            write_long(out, point.time_ms);
            out.extend_from_slice(&point.value.to_le_bytes());
        }
    }
    write_long(out, 0);
}

/// The exact number of bytes [`write_metric_list`] appends for `list`,
/// without writing them.
pub fn encoded_len(list: &MetricList) -> usize {
    fn bytes_len(bytes: &str) -> usize {
        long_len(bytes.len() as i64) + bytes.len()
    }
    let mut len = bytes_len(&list.topic) + 2;
    if !list.tags.is_empty() {
        len += long_len(list.tags.len() as i64);
        len += list
            .tags
            .iter()
            .map(|t| bytes_len(&t.key) + bytes_len(&t.value))
            .sum::<usize>();
    }
    if !list.datapoints.is_empty() {
        len += long_len(list.datapoints.len() as i64);
        len += list
            .datapoints
            .iter()
            .map(|d| bytes_len(&d.name) + long_len(d.time_ms) + 8)
            .sum::<usize>();
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_matches_the_avro_spec_examples() {
        // From the Avro specification's table of zigzag encodings.
        for (value, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-2, vec![3]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            write_long(&mut out, value);
            assert_eq!(out, bytes, "encoding {value}");
            assert_eq!(Cursor::new(&bytes).read_long().unwrap(), value);
        }
    }

    #[test]
    fn extremes_round_trip() {
        for value in [i64::MIN, i64::MAX, 0, -1, 1 << 62] {
            let mut out = Vec::new();
            write_long(&mut out, value);
            assert!(out.len() <= 10);
            assert_eq!(long_len(value), out.len());
            assert_eq!(Cursor::new(&out).read_long().unwrap(), value);
        }
    }

    #[test]
    fn skipping_agrees_with_reading() {
        for value in [
            0i64,
            -1,
            63,
            64,
            1 << 20,
            1_764_000_000_000,
            i64::MIN,
            i64::MAX,
        ] {
            let mut bytes = Vec::new();
            write_long(&mut bytes, value);
            let end = bytes.len();
            // With and without 8 bytes left after the varint's start.
            for padding in [0, 8] {
                let mut padded = bytes.clone();
                padded.extend(std::iter::repeat_n(0xff, padding));
                let mut c = Cursor::new(&padded);
                c.skip_long().unwrap();
                assert_eq!(c.position(), end, "{value} padded {padding}");
            }
        }
        let overlong = [0xffu8; 12];
        assert_eq!(
            Cursor::new(&overlong).skip_long(),
            Cursor::new(&overlong).read_long().map(|_| ())
        );
        let mut s = Vec::new();
        write_bytes(&mut s, "ünï".as_bytes());
        write_bytes(&mut s, b"\xff");
        let mut c = Cursor::new(&s);
        c.skip_str().unwrap();
        let at = c.position();
        assert_eq!(
            c.skip_str().unwrap_err(),
            DatumError {
                what: "string is not UTF-8",
                pos: at
            }
        );
    }

    #[test]
    fn overlong_varint_is_an_error_not_a_panic() {
        let bytes = [0xffu8; 11];
        assert_eq!(
            Cursor::new(&bytes).read_long().unwrap_err().what,
            "varint longer than 10 bytes"
        );
    }

    #[test]
    fn hostile_array_count_is_refused_before_allocating() {
        let mut data = Vec::new();
        write_long(&mut data, 1 << 40);
        let err = Cursor::new(&data)
            .read_array(1, |c| c.read_long())
            .unwrap_err();
        assert_eq!(err.what, "array count larger than the data left");
    }

    #[test]
    fn negative_array_counts_carry_a_byte_size() {
        let mut data = Vec::new();
        write_long(&mut data, -2);
        write_long(&mut data, 2);
        write_long(&mut data, 7);
        write_long(&mut data, 8);
        write_long(&mut data, 0);
        assert_eq!(
            Cursor::new(&data).read_array(1, |c| c.read_long()).unwrap(),
            vec![7, 8]
        );
    }
}
