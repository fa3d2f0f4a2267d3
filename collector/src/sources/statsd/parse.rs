//! statsd lines, read as Telegraf's statsd input reads them with DogStatsD
//! tags on (the way DC/OS's `dcos_statsd` configured it, 1.12 and later;
//! `docs/statsd.md` has the table):
//!
//! - a packet is split on `\n`; each line is trimmed, and an empty one
//!   skipped;
//! - from the first `|#` on, the line is DogStatsD's: its `#k:v,k2`
//!   sections are tags (a key without `:` gets `""`), and its other
//!   sections (a container id, a timestamp) are left alone; so are those
//!   sections where they end a line without tags (`a:1|c|c:abc`);
//! - before it, `bucket:value|type[|@rate]`, with several values on one line
//!   (`a:1|c:2|c`); the bucket may carry Influx-style tags, `name,k=v`;
//! - types `c`, `g`, `s`, `ms`, `h`; a `+` or `-` sign only for `c` and `g`
//!   (for a gauge it adds);
//! - `@rate` divides a counter's value (`int64(value / rate)`, as Telegraf)
//!   and counts a timing or histogram value `1 / rate` times; a rate that
//!   is not a number in (0, 1] is ignored, as Telegraf ignores one it
//!   cannot read.
//!
//! A line is checked whole before any of it is used: a malformed line is
//! refused with its reason and takes nothing, and the rest of its packet
//! is read. Pure functions over string slices (and, for the lines of the
//! simplest form, [`plain_line`], over bytes), no allocation beyond the
//! caller's reused vectors.

use std::fmt;

/// A statsd metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `c`: summed, cumulative.
    Counter,
    /// `g`: the last value, or added to with a sign.
    Gauge,
    /// `s`: distinct values counted.
    Set,
    /// `ms`: statistics of the values.
    Timing,
    /// `h`: as a timing.
    Histogram,
}

impl Kind {
    /// The `metric_type` tag's value, as Telegraf's.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Set => "set",
            Self::Timing => "timing",
            Self::Histogram => "histogram",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "c" => Self::Counter,
            "g" => Self::Gauge,
            "s" => Self::Set,
            "ms" => Self::Timing,
            "h" => Self::Histogram,
            _ => return None,
        })
    }
}

/// One value of a line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// A counter's increment, divided by its sample rate.
    Count(i64),
    /// A gauge's value; `delta`: signed, so added to the last one.
    Gauge {
        /// The value.
        value: f64,
        /// Whether it adds to the last value.
        delta: bool,
    },
    /// A set's member.
    Member(&'a str),
    /// A timing's or histogram's value, seen `times` times (`1 / rate`).
    Sample {
        /// The value.
        value: f64,
        /// How many times it counts.
        times: u64,
    },
}

/// Why a line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// No `:` after the bucket.
    NoValue,
    /// An empty metric name.
    EmptyName,
    /// A name with a '|'.
    BadName,
    /// A value without `|type`.
    NoType,
    /// A type other than `c`, `g`, `s`, `ms` and `h`.
    UnknownType,
    /// A value that is not a number (or an integer, for a counter).
    BadValue,
    /// A `+` or `-` on a set, timing or histogram.
    SignNotAllowed,
    /// Not UTF-8.
    NotUtf8,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoValue => "no ':' and value after the name",
            Self::EmptyName => "an empty name",
            Self::BadName => "a '|' in the name",
            Self::NoType => "a value without '|type'",
            Self::UnknownType => "a type other than c, g, s, ms and h",
            Self::BadValue => "a value that is not a number",
            Self::SignNotAllowed => "a '+' or '-' on a set, timing or histogram",
            Self::NotUtf8 => "not UTF-8",
        })
    }
}

/// One line, read: its name, its tags (the bucket's Influx-style tags,
/// then the DogStatsD tags; of a key given twice the last wins, as in
/// Telegraf) and its values, each with its type.
#[derive(Debug, Default)]
pub struct Line<'a> {
    /// The bucket without its tags.
    pub name: &'a str,
    /// Tags in the order given.
    pub tags: Vec<(&'a str, &'a str)>,
    /// Values, with their types.
    pub values: Vec<(Kind, Value<'a>)>,
}

impl<'a> Line<'a> {
    /// Reads `line` (one trimmed, non-empty line) into `self`, replacing
    /// what it held. On an error `self` is left empty of values.
    pub fn read(&mut self, line: &'a str) -> Result<(), LineError> {
        self.tags.clear();
        self.values.clear();
        // Most lines are one value without tags: read in one pass, with
        // the result [`Line::read_general`] gives (the fuzz target
        // `statsd_packet` and a property test hold the two equal).
        if let Some((name, kind, value, length)) = plain_line(line.as_bytes())
            && length == line.len()
        {
            // ASCII.
            self.name = line.get(..name.len()).unwrap_or_default();
            self.values.push((kind, value));
            return Ok(());
        }
        self.read_general(line)
    }

    /// Reads `line` as [`Line::read`] does, without its path for the
    /// simplest lines.
    #[doc(hidden)]
    pub fn read_general(&mut self, line: &'a str) -> Result<(), LineError> {
        self.tags.clear();
        self.values.clear();
        let result = self.read_inner(line);
        if result.is_err() {
            self.tags.clear();
            self.values.clear();
        }
        result
    }

    fn read_inner(&mut self, line: &'a str) -> Result<(), LineError> {
        // From the first '|#' on: DogStatsD's sections. Those that begin
        // with '#' are tags; the others (a container id, a timestamp) are
        // left alone.
        let (statsd, extensions) = match line.find("|#") {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, ""),
        };
        let statsd = strip_extensions(statsd);
        for segment in extensions.split('|') {
            if let Some(tags) = segment.strip_prefix('#') {
                self.dogstatsd_tags(tags);
            }
        }
        let (bucket, values) = statsd.split_once(':').ok_or(LineError::NoValue)?;
        let mut bucket_parts = bucket.split(',');
        self.name = bucket_parts.next().unwrap_or_default();
        if self.name.is_empty() {
            return Err(LineError::EmptyName);
        }
        if self.name.contains('|') {
            return Err(LineError::BadName);
        }
        // The bucket's tags come first, so that DogStatsD's win.
        let dogstatsd = self.tags.len();
        self.tags.extend(bucket_parts.filter_map(|tag| {
            let (k, v) = tag.split_once('=')?;
            (!k.is_empty()).then_some((k, v))
        }));
        self.tags.rotate_left(dogstatsd);
        for bit in values.split(':') {
            self.values.push(value(bit)?);
        }
        Ok(())
    }

    fn dogstatsd_tags(&mut self, tags: &'a str) {
        for tag in tags.split(',').filter(|t| !t.is_empty()) {
            let (k, v) = tag.split_once(':').unwrap_or((tag, ""));
            if !k.is_empty() {
                self.tags.push((k, v));
            }
        }
    }

    /// The tags with the last of each key only, in key order, and
    /// `metric_type` where no tag gives it.
    pub fn tags_for(&self, kind: Kind, out: &mut Vec<(&'a str, &'a str)>) {
        self.sorted_tags(out);
        if let Err(at) = out.binary_search_by(|(k, _)| (*k).cmp("metric_type")) {
            out.insert(at, ("metric_type", kind.tag()));
        }
    }

    /// The tags with the last of each key only, in key order, without the
    /// type's.
    pub fn sorted_tags(&self, out: &mut Vec<(&'a str, &'a str)>) {
        out.clear();
        // Later tags win: reversed, then a stable sort and the first kept.
        out.extend(self.tags.iter().rev().copied());
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.dedup_by(|later, earlier| later.0 == earlier.0);
    }
}

/// `line` without the DogStatsD sections that end it: a container id
/// (`c:…`), external data (`e:…`), a timestamp (`T` and digits). Clients
/// write them after the type and rate (and after the tags, which are cut
/// before); a line's first section is its name and value, never one.
fn strip_extensions(mut line: &str) -> &str {
    while let Some((head, last)) = line.rsplit_once('|') {
        let extension = last.starts_with("c:")
            || last.starts_with("e:")
            || (last.len() > 1
                && last.starts_with('T')
                && last[1..].bytes().all(|b| b.is_ascii_digit()));
        if !extension {
            break;
        }
        line = head;
    }
    line
}

/// Where the name of a line of the simplest form ends: the first `:` of
/// `bytes`, unless a `|`, `,`, `#`, `\n` or a byte above ASCII comes
/// before it (then none, as for no `:`).
///
/// Eight bytes at a time while eight are left: a byte equal to one of those
/// is found by the zero-byte test of the word XORed with it repeated. That
/// test can also flag a byte above a true zero (a borrow), never below
/// one, so the lowest byte flagged by any of the tests is a true match.
#[inline(always)]
fn name_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let each = |byte: u8| ONES * u64::from(byte);
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let found = zero(word ^ each(b':'))
            | zero(word ^ each(b'|'))
            | zero(word ^ each(b','))
            | zero(word ^ each(b'#'))
            | zero(word ^ each(b'\n'))
            | (word & HIGHS);
        if found != 0 {
            let first = at + (found.trailing_zeros() / 8) as usize;
            return (bytes[first] == b':').then_some(first);
        }
        at += 8;
    }
    loop {
        match *bytes.get(at)? {
            b':' => return Some(at),
            b'|' | b',' | b'#' | b'\n' | 0x80.. => return None,
            _ => at += 1,
        }
    }
}

/// A line of the simplest form, read from the start of `bytes` to its
/// end (a `\n`, or the end of `bytes`): `name:number|type` or
/// `name:number|type|@rate`, in ASCII, with no `,`, `#` or `|` in the name,
/// no `:` or `#` after it, and no white space at either end. Gives its
/// name, type and value, as [`Line::read_general`] reads them from the
/// line, and the line's length (without its `\n`); none for any other
/// line, or one in error (which [`Line::read_general`] reads, or refuses
/// with its reason).
///
/// One pass over the bytes, which finds the line's end as it goes (the
/// name's end eight bytes at a time, [`name_end`]; the rest is short, and
/// a loop is faster there than a search per delimiter) and reads
/// an unsigned integer of up to 18 digits (such a number is exact as an
/// `i64`, and rounds to the same `f64` as its text does); any other number
/// is read by [`value_of`]. A line of this form is ASCII, so its name is
/// UTF-8 without a check, and a line that is not takes the general path.
#[inline(always)]
pub fn plain_line(bytes: &[u8]) -> Option<(&[u8], Kind, Value<'_>, usize)> {
    if bytes.first()?.is_ascii_whitespace() {
        return None;
    }
    let colon = name_end(bytes)?;
    if colon == 0 {
        return None;
    }
    let mut at = colon + 1;
    let mut integer: u64 = 0;
    let mut digits = 0;
    let mut other = false;
    let bar = loop {
        match *bytes.get(at)? {
            b'|' => break at,
            b':' | b'#' | b'\n' | 0x80.. => return None,
            digit @ b'0'..=b'9' => {
                integer = integer
                    .wrapping_mul(10)
                    .wrapping_add(u64::from(digit - b'0'));
                digits += 1;
            }
            _ => other = true,
        }
        at += 1;
    };
    at += 1;
    let kind = match (bytes.get(at), bytes.get(at + 1)) {
        (Some(b'c'), _) => Kind::Counter,
        (Some(b'g'), _) => Kind::Gauge,
        (Some(b's'), _) => Kind::Set,
        (Some(b'h'), _) => Kind::Histogram,
        (Some(b'm'), Some(b's')) => {
            at += 1;
            Kind::Timing
        }
        _ => return None,
    };
    at += 1;
    // The line's end, or one more section, a rate, then the end.
    let mut rate = None;
    match bytes.get(at) {
        None | Some(b'\n') => {}
        Some(b'|') if bytes.get(at + 1) == Some(&b'@') => {
            let start = at + 1;
            while let Some(&b) = bytes.get(at + 1) {
                match b {
                    b'\n' => break,
                    b'|' | b':' | b'#' | 0x80.. => return None,
                    b if b.is_ascii_whitespace() => return None,
                    _ => at += 1,
                }
            }
            at += 1;
            rate = Some(&bytes[start..at]);
        }
        Some(_) => return None,
    }
    let name = &bytes[..colon];
    let number = &bytes[colon + 1..bar];
    // ASCII: the number and rate are str.
    let text = |bytes| std::str::from_utf8(bytes).ok();
    if rate.is_none() && !other && (1..=18).contains(&digits) {
        let value = match kind {
            Kind::Counter => Value::Count(integer as i64),
            Kind::Gauge => Value::Gauge {
                value: integer as f64,
                delta: false,
            },
            Kind::Set => Value::Member(text(number)?),
            Kind::Timing | Kind::Histogram => Value::Sample {
                value: integer as f64,
                times: 1,
            },
        };
        return Some((name, kind, value, at));
    }
    let rate = match rate {
        Some(rate) => Some(text(rate)?),
        None => None,
    };
    let (kind, value) = value_of(text(number)?, kind, rate).ok()?;
    Some((name, kind, value, at))
}

/// One `value|type[|@rate]`.
fn value(bit: &str) -> Result<(Kind, Value<'_>), LineError> {
    let mut segments = bit.split('|');
    let number = segments.next().unwrap_or_default();
    let kind = segments.next().ok_or(LineError::NoType)?;
    let kind = Kind::parse(kind).ok_or(LineError::UnknownType)?;
    value_of(number, kind, segments.next())
}

/// A value of `kind` from its `number` and its third section, a rate
/// when it is `@` and a number in (0, 1].
#[inline(always)]
fn value_of<'a>(
    number: &'a str,
    kind: Kind,
    rate: Option<&str>,
) -> Result<(Kind, Value<'a>), LineError> {
    let rate = rate
        .and_then(|s| s.strip_prefix('@'))
        .and_then(|r| r.parse::<f64>().ok())
        .filter(|r| *r > 0.0 && *r <= 1.0);
    let signed = number.starts_with(['+', '-']);
    if signed && !matches!(kind, Kind::Counter | Kind::Gauge) {
        return Err(LineError::SignNotAllowed);
    }
    let float = || {
        number
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or(LineError::BadValue)
    };
    let value = match kind {
        Kind::Counter => {
            let count = match number.parse::<i64>() {
                Ok(v) => v,
                // As Telegraf: a float counter is truncated.
                Err(_) => float()? as i64,
            };
            Value::Count(match rate {
                Some(rate) => divided(count, rate),
                None => count,
            })
        }
        Kind::Gauge => Value::Gauge {
            value: float()?,
            delta: signed,
        },
        Kind::Set => Value::Member(number),
        Kind::Timing | Kind::Histogram => Value::Sample {
            value: float()?,
            times: rate.map_or(1, |r| (1.0 / r) as u64).max(1),
        },
    };
    Ok((kind, value))
}

/// A counter's `count` sent at `rate`, as Telegraf counts it. Out of line:
/// most counters have no rate, and a division made without a branch for
/// them would cost every line its latency.
#[cold]
#[inline(never)]
fn divided(count: i64, rate: f64) -> i64 {
    (count as f64 / rate) as i64
}

/// The lines of a packet: split on `\n`, trimmed, empty ones left out.
pub fn lines(packet: &[u8]) -> impl Iterator<Item = Result<&str, LineError>> {
    raw_lines(packet).map(|line| std::str::from_utf8(line).map_err(|_| LineError::NotUtf8))
}

/// The lines of a packet as [`lines`] gives them, not yet checked as
/// UTF-8.
pub fn raw_lines(packet: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = packet;
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let line = next_line(&mut rest);
            if !line.is_empty() {
                return Some(line);
            }
        }
        None
    })
}

/// The first line of `rest`, trimmed (empty, for an empty line), and
/// `rest` moved past it and its `\n`.
pub fn next_line<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let text = match memchr::memchr(b'\n', rest) {
        Some(end) => {
            let text = &rest[..end];
            *rest = &rest[end + 1..];
            text
        }
        None => std::mem::take(rest),
    };
    text.trim_ascii()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The path for the simplest lines reads every line as the
        /// general one does: lines made of the characters that matter
        /// (every delimiter, signs, digits, rates, type letters).
        #[test]
        fn the_simple_path_reads_as_the_general_one(
            line in "[a-c:|@#,=.+\\-0-9 smghTe]{1,24}|[a-z.]{1,8}:[-+]?[0-9.]{1,6}\\|(c|g|s|ms|h|x)(\\|@[0-9.]{1,4})?(\\|[@#Tc:0-9a-z]{0,6})?"
        ) {
            let mut fast = Line::default();
            let mut general = Line::default();
            let got = fast.read(&line);
            prop_assert_eq!(got, general.read_general(&line));
            prop_assert_eq!(fast.name, general.name);
            prop_assert_eq!(&fast.tags, &general.tags);
            prop_assert_eq!(&fast.values, &general.values);
        }
    }

    proptest! {
        /// The name's end found eight bytes at a time is the first `:`
        /// found one byte at a time, before any byte that ends the simple
        /// form: after a run of name bytes of any length (so in every
        /// word and in the bytes after the last whole one), with the
        /// bytes one above or below a delimiter (whose zero test borrows
        /// into the next byte up) and bytes above ASCII.
        #[test]
        fn a_names_end_is_found_as_byte_by_byte(
            name in prop::collection::vec(
                prop::sample::select(vec![b'a', b'.', b'_', b';', b'9', b'}', b'{', b'-', b'+', b'"', b'$', 0x0b, 0x09, 0x00, 0x7f]),
                0..32,
            ),
            rest in prop::collection::vec(
                prop::sample::select(vec![b'a', b':', b'|', b',', b'#', b'\n', b';', b'}', b'-', b'"', 0x0b, 0x80, 0xff]),
                0..12,
            )
        ) {
            let bytes = [name, rest].concat();
            let byte_by_byte = bytes
                .iter()
                .position(|b| matches!(b, b':' | b'|' | b',' | b'#' | b'\n' | 0x80..))
                .filter(|&at| bytes[at] == b':');
            prop_assert_eq!(name_end(&bytes), byte_by_byte);
        }
    }

    type Read<'a> = (String, Vec<(String, String)>, Vec<(Kind, Value<'a>)>);

    fn read(line: &str) -> Result<Read<'_>, LineError> {
        let mut parsed = Line::default();
        parsed.read(line)?;
        let tags = parsed
            .tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Ok((parsed.name.to_owned(), tags, parsed.values.clone()))
    }

    fn values(line: &str) -> Vec<(Kind, Value<'_>)> {
        read(line).unwrap().2
    }

    #[test]
    fn every_type_with_its_value() {
        assert_eq!(values("a:3|c"), [(Kind::Counter, Value::Count(3))]);
        assert_eq!(
            values("a:-2.5|g"),
            [(
                Kind::Gauge,
                Value::Gauge {
                    value: -2.5,
                    delta: true
                }
            )]
        );
        assert_eq!(
            values("a:7|g"),
            [(
                Kind::Gauge,
                Value::Gauge {
                    value: 7.0,
                    delta: false
                }
            )]
        );
        assert_eq!(values("a:bob|s"), [(Kind::Set, Value::Member("bob"))]);
        assert_eq!(
            values("a:12.5|ms"),
            [(
                Kind::Timing,
                Value::Sample {
                    value: 12.5,
                    times: 1
                }
            )]
        );
        assert_eq!(
            values("a:4|h"),
            [(
                Kind::Histogram,
                Value::Sample {
                    value: 4.0,
                    times: 1
                }
            )]
        );
        // A float counter is truncated, as Telegraf's.
        assert_eq!(values("a:2.9|c"), [(Kind::Counter, Value::Count(2))]);
        assert_eq!(values("a:+4|c"), [(Kind::Counter, Value::Count(4))]);
    }

    #[test]
    fn several_values_on_one_line() {
        assert_eq!(
            values("a:1|c:2|c:5|g"),
            [
                (Kind::Counter, Value::Count(1)),
                (Kind::Counter, Value::Count(2)),
                (
                    Kind::Gauge,
                    Value::Gauge {
                        value: 5.0,
                        delta: false
                    }
                ),
            ]
        );
    }

    #[test]
    fn sample_rates_divide_counters_and_repeat_timings_only() {
        assert_eq!(values("a:1|c|@0.1"), [(Kind::Counter, Value::Count(10))]);
        assert_eq!(values("a:3|c|@0.5"), [(Kind::Counter, Value::Count(6))]);
        assert_eq!(
            values("a:8|ms|@0.25"),
            [(
                Kind::Timing,
                Value::Sample {
                    value: 8.0,
                    times: 4
                }
            )]
        );
        assert_eq!(
            values("a:8|g|@0.25"),
            [(
                Kind::Gauge,
                Value::Gauge {
                    value: 8.0,
                    delta: false
                }
            )]
        );
        // A rate that is not in (0, 1] is ignored.
        for rate in ["@0", "@-1", "@2", "@x", "0.5", "@NaN"] {
            assert_eq!(
                values(&format!("a:3|c|{rate}")),
                [(Kind::Counter, Value::Count(3))],
                "{rate}"
            );
        }
        // A tiny rate saturates, never loops.
        assert_eq!(
            values("a:1|ms|@1e-300"),
            [(
                Kind::Timing,
                Value::Sample {
                    value: 1.0,
                    times: u64::MAX
                }
            )]
        );
    }

    #[test]
    fn dogstatsd_and_bucket_tags() {
        let (name, tags, vals) = read(
            "page.views,region=eu,zone=a:1|c|@0.5|#env:prod,shard,url:http://x|c:abc|T1656581400",
        )
        .unwrap();
        assert_eq!(name, "page.views");
        let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            tags,
            [
                ("region", "eu"),
                ("zone", "a"),
                ("env", "prod"),
                ("shard", ""),
                ("url", "http://x")
            ]
        );
        assert_eq!(vals, [(Kind::Counter, Value::Count(2))]);
        let (_, tags, _) = read("a:1|c|#k:1|#k:2").unwrap();
        assert_eq!(tags.len(), 2);
        // DogStatsD's container id, external data and timestamp without
        // tags; several values on a line are not taken for them.
        assert_eq!(
            read("a:1|c|c:abc-123|e:it-x|T1656581400").unwrap().2,
            [(Kind::Counter, Value::Count(1))]
        );
        assert_eq!(
            read("a:1|c|@0.5|c:abc").unwrap().2,
            [(Kind::Counter, Value::Count(2))]
        );
        assert_eq!(
            read("c:1|c:2|c").unwrap().2,
            [
                (Kind::Counter, Value::Count(1)),
                (Kind::Counter, Value::Count(2))
            ]
        );
    }

    #[test]
    fn tags_for_a_value_sorted_with_the_last_of_a_key_and_its_type() {
        let mut line = Line::default();
        line.read("a,z=1,b=1:1|c|#b:2,zz:3").unwrap();
        let mut out = Vec::new();
        line.tags_for(Kind::Counter, &mut out);
        assert_eq!(
            out,
            [
                ("b", "2"),
                ("metric_type", "counter"),
                ("z", "1"),
                ("zz", "3")
            ]
        );
        line.read("a:1|ms|#metric_type:mine").unwrap();
        line.tags_for(Kind::Timing, &mut out);
        assert_eq!(out, [("metric_type", "mine")]);
        line.read("a:1|g").unwrap();
        line.tags_for(Kind::Gauge, &mut out);
        assert_eq!(out, [("metric_type", "gauge")]);
    }

    #[test]
    fn malformed_lines_are_refused_with_their_reason_and_take_nothing() {
        for (line, error) in [
            ("a", LineError::NoValue),
            (":1|c", LineError::EmptyName),
            ("a:1", LineError::NoType),
            ("a:1|x", LineError::UnknownType),
            ("a:1|c:2", LineError::NoType),
            ("a:x|g", LineError::BadValue),
            ("a:inf|g", LineError::BadValue),
            ("a:1|c:x|ms", LineError::BadValue),
            ("a:+1|ms", LineError::SignNotAllowed),
            ("a:-1|s", LineError::SignNotAllowed),
            ("a|b:1|c", LineError::BadName),
        ] {
            let mut parsed = Line::default();
            assert_eq!(parsed.read(line), Err(error), "{line}");
            assert!(parsed.values.is_empty() && parsed.tags.is_empty(), "{line}");
        }
    }

    #[test]
    fn a_packets_lines_are_split_trimmed_and_checked_for_utf8() {
        let packet = b"a:1|c\n\n  b:2|g \r\n\xff:1|c\nc:3|ms";
        let lines: Vec<_> = lines(packet).collect();
        assert_eq!(
            lines,
            [
                Ok("a:1|c"),
                Ok("b:2|g"),
                Err(LineError::NotUtf8),
                Ok("c:3|ms")
            ]
        );
    }
}
