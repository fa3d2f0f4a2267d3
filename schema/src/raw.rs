//! Records of the current schema read *in place*: validated exactly as
//! [`datum::read_metric_list`] would read them, but never decoded into owned
//! strings, and written out again by splicing their bytes.
//!
//! This is the collector's hot path. A record only needs its topic, a few tag
//! lookups and tags added where absent; its datapoints (the bulk of its bytes)
//! are copied verbatim. Pure functions over byte slices, like [`datum`].

use crate::datum::{self, Cursor, DatumError, MIN_DATAPOINT_LEN, MIN_TAG_LEN, long_len};

/// One `dcos.metrics.MetricList` validated in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    bytes: &'a [u8],
    topic: &'a str,
    /// Offset of the tags array's first block count.
    tags_start: usize,
    /// Offset of the tags array's terminating zero count.
    tags_end: usize,
    /// When the tags are one block with a positive count (as every encoder
    /// we know writes them): that count and where its items start.
    single_block: Option<(u64, usize)>,
    datapoints: u32,
}

/// How an array was laid out on the wire.
struct ArrayLayout {
    /// Offset of the terminating zero count.
    end: usize,
    /// A single block with a positive count: that count and where its
    /// items start.
    single_block: Option<(u64, usize)>,
    /// Items in all blocks.
    items: u64,
}

/// Reads one array's blocks, checking each item with `item`.
fn scan_array<'a>(
    c: &mut Cursor<'a>,
    min_item_len: usize,
    mut item: impl FnMut(&mut Cursor<'a>) -> Result<(), DatumError>,
) -> Result<ArrayLayout, DatumError> {
    let mut single = None;
    let mut first = true;
    let mut items = 0u64;
    loop {
        let block_start = c.position();
        let Some((count, positive)) = c.read_block_count(min_item_len)? else {
            return Ok(ArrayLayout {
                end: block_start,
                single_block: single,
                items,
            });
        };
        single = (first && positive).then_some((count, c.position()));
        first = false;
        for _ in 0..count {
            item(c)?;
        }
        items += count;
    }
}

/// Reads one MetricList of the current schema at the cursor without copying
/// it. Accepts and refuses exactly what [`datum::read_metric_list`] does,
/// with the same error and position.
pub fn scan_metric_list<'a>(c: &mut Cursor<'a>) -> Result<RawRecord<'a>, DatumError> {
    let start = c.position();
    let topic = c.read_str()?;
    let tags_start = c.position() - start;
    let tags = scan_array(c, MIN_TAG_LEN, |c| {
        c.read_str()?;
        c.read_str()?;
        Ok(())
    })?;
    let datapoints = scan_array(c, MIN_DATAPOINT_LEN, |c| {
        c.skip_str()?;
        c.skip_long()?;
        c.read_double()?;
        Ok(())
    })?;
    Ok(RawRecord {
        bytes: c.consumed_since(start),
        topic,
        tags_start,
        tags_end: tags.end - start,
        single_block: tags.single_block.map(|(n, at)| (n, at - start)),
        datapoints: u32::try_from(datapoints.items).unwrap_or(u32::MAX),
    })
}

impl<'a> RawRecord<'a> {
    /// The record's Avro bytes, as received.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The record's `topic` field.
    pub fn topic(&self) -> &'a str {
        self.topic
    }

    /// Datapoints in the record.
    pub fn datapoints(&self) -> u32 {
        self.datapoints
    }

    /// The tags, in wire order.
    pub fn tags(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        let mut c = Cursor::new(&self.bytes[..self.tags_end]);
        // Validated by scan_metric_list: skip to the tags and read them back.
        let _ = c.read_bytes();
        array_items(c, |c| Some((c.read_str().ok()?, c.read_str().ok()?)))
    }

    /// The datapoints, in wire order, as `(name, time_ms, value)`.
    pub fn datapoint_values(&self) -> impl Iterator<Item = (&'a str, i64, f64)> + use<'a> {
        let mut c = Cursor::new(&self.bytes[self.tags_end..]);
        // Validated by scan_metric_list: the tags' terminating zero count,
        // then the datapoints' blocks.
        let _ = c.read_long();
        array_items(c, |c| {
            Some((
                c.read_str().ok()?,
                c.read_long().ok()?,
                c.read_double().ok()?,
            ))
        })
    }

    /// The value of the first tag named `key`.
    pub fn tag(&self, key: &str) -> Option<&'a str> {
        self.tags().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Bytes [`write_with_tags`](Self::write_with_tags) appends.
    pub fn encoded_len_with(&self, extra: &[(&str, &str)]) -> usize {
        if extra.is_empty() {
            return self.bytes.len();
        }
        let items: usize = extra
            .iter()
            .map(|(k, v)| bytes_len(k.len()) + bytes_len(v.len()))
            .sum();
        match self.single_block {
            Some((count, items_start)) => {
                self.bytes.len() - (items_start - self.tags_start)
                    + long_len(count as i64 + extra.len() as i64)
                    + items
            }
            None => self.bytes.len() + long_len(extra.len() as i64) + items,
        }
    }

    /// Appends the record with `extra` tags added after its own. A record
    /// whose tags are one block (the usual case) comes out exactly as
    /// [`datum::write_metric_list`] would write it with those tags; any other
    /// layout gets the tags as one more array block, which is equally valid
    /// Avro. The datapoints are copied byte for byte.
    pub fn write_with_tags(&self, extra: &[(&str, &str)], out: &mut Vec<u8>) {
        if extra.is_empty() {
            out.extend_from_slice(self.bytes);
            return;
        }
        match self.single_block {
            Some((count, items_start)) => {
                out.extend_from_slice(&self.bytes[..self.tags_start]);
                datum::write_long(out, count as i64 + extra.len() as i64);
                out.extend_from_slice(&self.bytes[items_start..self.tags_end]);
            }
            None => {
                out.extend_from_slice(&self.bytes[..self.tags_end]);
                datum::write_long(out, extra.len() as i64);
            }
        }
        for (key, value) in extra {
            datum::write_bytes(out, key.as_bytes());
            datum::write_bytes(out, value.as_bytes());
        }
        // The terminating zero count, then the datapoints.
        out.extend_from_slice(&self.bytes[self.tags_end..]);
    }
}

/// The items of an array validated before, read block by block from `c`
/// (at the array's first block count) with `item`, until its terminating
/// zero count or the end of `c`.
fn array_items<'a, T>(
    mut c: Cursor<'a>,
    mut item: impl FnMut(&mut Cursor<'a>) -> Option<T>,
) -> impl Iterator<Item = T> {
    let mut left = 0u64;
    std::iter::from_fn(move || {
        while left == 0 {
            let count = c.read_long().ok()?;
            if count == 0 {
                return None;
            }
            left = if count < 0 {
                c.read_long().ok()?;
                count.unsigned_abs()
            } else {
                count as u64
            };
        }
        left -= 1;
        item(&mut c)
    })
}

fn bytes_len(len: usize) -> usize {
    long_len(len as i64) + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datum::{read_metric_list, write_bytes, write_long, write_metric_list};
    use crate::model::{Datapoint, MetricList, Tag};

    fn sample() -> MetricList {
        MetricList {
            topic: "fw-1".into(),
            tags: vec![Tag::new("framework_id", "fw-1"), Tag::new("k", "v")],
            datapoints: vec![
                Datapoint::new("cpus", 5, 0.5),
                Datapoint::new("mem", -1, f64::NAN),
            ],
        }
    }

    #[test]
    fn reads_the_topic_tags_and_count_in_place() {
        let mut bytes = Vec::new();
        write_metric_list(&mut bytes, &sample());
        bytes.push(0xff); // the next record's first byte
        let mut c = Cursor::new(&bytes);
        let raw = scan_metric_list(&mut c).unwrap();
        assert_eq!(c.position(), bytes.len() - 1);
        assert_eq!(raw.bytes(), &bytes[..bytes.len() - 1]);
        assert_eq!(raw.topic(), "fw-1");
        assert_eq!(raw.datapoints(), 2);
        assert_eq!(
            raw.tags().collect::<Vec<_>>(),
            vec![("framework_id", "fw-1"), ("k", "v")]
        );
        assert_eq!(raw.tag("k"), Some("v"));
        let points: Vec<_> = raw.datapoint_values().collect();
        assert_eq!(points.len(), 2);
        assert_eq!((points[0].0, points[0].1, points[0].2), ("cpus", 5, 0.5));
        assert_eq!((points[1].0, points[1].1), ("mem", -1));
        assert!(points[1].2.is_nan());
        assert_eq!(raw.tag("nope"), None);
    }

    #[test]
    fn spliced_tags_give_the_bytes_of_a_full_re_encoding() {
        for tags in [vec![], sample().tags] {
            let record = MetricList { tags, ..sample() };
            let mut bytes = Vec::new();
            write_metric_list(&mut bytes, &record);
            let raw = scan_metric_list(&mut Cursor::new(&bytes)).unwrap();
            let extra = [("agent_id", "a-1"), ("framework_name", "marathon")];
            let mut spliced = Vec::new();
            raw.write_with_tags(&extra, &mut spliced);
            let mut expected = record.clone();
            for (k, v) in extra {
                expected.add_tag_if_absent(k, v);
            }
            let mut reencoded = Vec::new();
            write_metric_list(&mut reencoded, &expected);
            assert_eq!(spliced, reencoded);
            assert_eq!(raw.encoded_len_with(&extra), spliced.len());
        }
    }

    #[test]
    fn tags_in_several_blocks_get_one_more_block() {
        // tags: a block of -1 items (with its byte size), then a block of 1.
        let mut bytes = Vec::new();
        write_bytes(&mut bytes, b"t");
        let mut item = Vec::new();
        write_bytes(&mut item, b"a");
        write_bytes(&mut item, b"1");
        write_long(&mut bytes, -1);
        write_long(&mut bytes, item.len() as i64);
        bytes.extend_from_slice(&item);
        write_long(&mut bytes, 1);
        write_bytes(&mut bytes, b"b");
        write_bytes(&mut bytes, b"2");
        write_long(&mut bytes, 0);
        write_long(&mut bytes, 0); // no datapoints
        let raw = scan_metric_list(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(raw.tags().collect::<Vec<_>>(), vec![("a", "1"), ("b", "2")]);
        let mut spliced = Vec::new();
        raw.write_with_tags(&[("c", "3")], &mut spliced);
        assert_eq!(raw.encoded_len_with(&[("c", "3")]), spliced.len());
        let back = read_metric_list(&mut Cursor::new(&spliced)).unwrap();
        assert_eq!(
            back.tags,
            vec![Tag::new("a", "1"), Tag::new("b", "2"), Tag::new("c", "3")]
        );
    }

    #[test]
    fn refuses_what_the_decoder_refuses_at_the_same_place() {
        let mut bytes = Vec::new();
        write_metric_list(&mut bytes, &sample());
        for cut in 0..bytes.len() {
            let expected = read_metric_list(&mut Cursor::new(&bytes[..cut])).unwrap_err();
            let got = scan_metric_list(&mut Cursor::new(&bytes[..cut])).unwrap_err();
            assert_eq!(got, expected, "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[2] = 0xff; // inside "fw-1": not UTF-8
        assert_eq!(
            scan_metric_list(&mut Cursor::new(&bad)).unwrap_err(),
            read_metric_list(&mut Cursor::new(&bad)).unwrap_err()
        );
    }
}
