//! statsd values aggregated per series (a name, its type and its tags), as
//! Telegraf's statsd input aggregates them with `dcos_statsd`'s settings:
//! cumulative over the source's life (nothing is reset at a flush).
//!
//! | type | datapoints at each flush |
//! | --- | --- |
//! | counter | `name`: the sum of every increment |
//! | gauge | `name`: the last value, a signed one added to it |
//! | set | `name`: distinct members seen (at most [`MAX_SET_MEMBERS`] held; past them, new members are counted as refused) |
//! | timing, histogram | `name.count`, `.sum`, `.mean`, `.stddev` (population), `.upper`, `.lower`, and `.<p>_percentile` for each configured percentile, over the last [`PERCENTILE_SAMPLES`] values kept (a reservoir, as Telegraf's) |
//!
//! Bounded: at most `max_series` series, a name and tags of at most
//! [`MAX_KEY_BYTES`], set members of at most [`MAX_MEMBER_BYTES`], and what
//! every aggregator holds together within one [`Budget`]; a value past a
//! bound is refused and counted ([`Refused`]).

use std::collections::HashSet;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use schema::{Datapoint, MetricList, Tag};

use super::parse::{Kind, Line, Value};
use crate::memory::allocated_size;

/// Members one set holds, at most.
pub const MAX_SET_MEMBERS: usize = 1024;

/// Values a timing or histogram keeps for its percentiles, at most.
pub const PERCENTILE_SAMPLES: usize = 256;

/// Bytes of a series' name and tags, at most.
pub const MAX_KEY_BYTES: usize = 1024;

/// Bytes of a set member, at most.
pub const MAX_MEMBER_BYTES: usize = 256;

/// What one series takes besides its members: its key, its entry, with
/// the room the vector of entries may hold for it (it doubles as it
/// grows), its places in the two indexes, a timing's statistics with its
/// full reservoir, and a set's table as first made.
fn series_cost(kind: Kind, key_len: usize) -> usize {
    allocated_size(key_len)
        + 2 * std::mem::size_of::<Entry>()
        + INDEX_SLOTS
        + match kind {
            Kind::Timing | Kind::Histogram => {
                std::mem::size_of::<Stats>() + PERCENTILE_SAMPLES * std::mem::size_of::<f64>()
            }
            Kind::Set => allocated_size(std::mem::size_of::<HashSet<Box<str>>>()) + SET_TABLE,
            Kind::Counter | Kind::Gauge => 0,
        }
}

/// What one item takes of a hash table whose slots are `slot` bytes (the
/// item and its control byte): the table holds at most 16/7 slots an item
/// (it doubles when 7/8 full), and its allocation rounds up by a quarter
/// at most.
const fn table_share(slot: usize) -> usize {
    (slot * 16 * 5).div_ceil(7 * 4)
}

/// A series' share of the two indexes (by key, and by name for a series
/// without tags): a `u32` and a control byte in each, 15 bytes.
const INDEX_SLOTS: usize = 2 * table_share(std::mem::size_of::<u32>() + 1);

/// A slot of a set's table: a member's box and its control byte.
const SET_SLOT: usize = std::mem::size_of::<Box<str>>() + 1;

/// A set's table as first made: 4 slots and a group of control bytes, as
/// allocated.
const SET_TABLE: usize = 96;

/// What one set member takes: its string as allocated, and its share of
/// the set's table past [`SET_TABLE`] (49 bytes).
fn member_cost(member: &str) -> usize {
    allocated_size(member.len()) + table_share(SET_SLOT)
}

/// The bytes every aggregator of the collector may hold together
/// (`statsd_max_bytes`).
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Relaxed, Relaxed, |used| {
                (used + bytes <= self.max).then_some(used + bytes)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Relaxed);
    }
}

/// What was refused, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Values of new series past `max_series`, or past the budget.
    pub series: u64,
    /// Values whose name and tags are over [`MAX_KEY_BYTES`].
    pub too_long: u64,
    /// New members of a full set, over [`MAX_MEMBER_BYTES`], or past the
    /// budget.
    pub set_members: u64,
}

/// A series' running statistics.
#[derive(Debug, Clone)]
struct Stats {
    count: u64,
    sum: f64,
    mean: f64,
    /// Sum of squared differences from the mean (Welford).
    m2: f64,
    upper: f64,
    lower: f64,
    samples: Vec<f64>,
    /// The reservoir's random state.
    rng: u64,
}

impl Stats {
    fn new(seed: u64) -> Self {
        Self {
            count: 0,
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            upper: f64::NEG_INFINITY,
            lower: f64::INFINITY,
            samples: Vec::new(),
            rng: seed | 1,
        }
    }

    /// Takes `value`, seen `times` times, in O(1).
    fn add(&mut self, value: f64, times: u64) {
        // Welford's update for `times` equal values at once.
        let n = times as f64;
        let total = self.count as f64 + n;
        let delta = value - self.mean;
        self.mean += delta * n / total;
        self.m2 += delta * delta * self.count as f64 * n / total;
        self.count = self.count.saturating_add(times);
        self.sum += value * n;
        self.upper = self.upper.max(value);
        self.lower = self.lower.min(value);
        if self.samples.len() < PERCENTILE_SAMPLES {
            self.samples.push(value);
        } else {
            // xorshift64: replaces a random sample, as Telegraf's reservoir.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let at = (self.rng % PERCENTILE_SAMPLES as u64) as usize;
            self.samples[at] = value;
        }
    }

    fn stddev(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / self.count as f64).max(0.0).sqrt()
        }
    }

    /// The `p`th percentile of the samples kept, by nearest rank, as
    /// Telegraf's.
    fn percentile(&self, sorted: &[f64], p: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let at = (sorted.len() as f64 * p / 100.0) as usize;
        sorted[at.min(sorted.len() - 1)]
    }
}

#[derive(Debug, Clone)]
enum Series {
    Counter(i64),
    Gauge(f64),
    /// Boxed, as `Stats`: a series of every type is two words and every
    /// entry four, 40 bytes less a series than with the table in line.
    #[allow(clippy::box_collection)]
    Set(Box<HashSet<Box<str>>>),
    Stats(Box<Stats>),
}

/// A series' key: its tag part (the length of what follows it, then its
/// tags sorted, the last of a key, each string length-prefixed), its type,
/// and its name. Keys sorted as bytes keep the series of one tag set
/// together.
type Key = Box<[u8]>;

fn put(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Writes a key into `key`.
fn write_key(key: &mut Vec<u8>, kind: Kind, name: &str, tags: &[(&str, &str)]) {
    key.clear();
    key.extend_from_slice(&[0; 4]);
    for (k, v) in tags {
        put(key, k);
        put(key, v);
    }
    let tags_len = u32::try_from(key.len() - 4).unwrap_or(u32::MAX);
    key[..4].copy_from_slice(&tags_len.to_le_bytes());
    key.push(kind_byte(kind));
    key.extend_from_slice(name.as_bytes());
}

/// A key's tag part (to compare), its type and its name.
fn split_key(key: &[u8]) -> (&[u8], Kind, &str) {
    let tags_len = key.get(..4).map_or(0, |b| {
        u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize
    });
    let tags = key.get(4..4 + tags_len).unwrap_or_default();
    let rest = key.get(4 + tags_len..).unwrap_or_default();
    let kind = match rest.first() {
        Some(0) => Kind::Counter,
        Some(1) => Kind::Gauge,
        Some(2) => Kind::Set,
        Some(3) => Kind::Timing,
        _ => Kind::Histogram,
    };
    let name = std::str::from_utf8(rest.get(1..).unwrap_or_default()).unwrap_or_default();
    (tags, kind, name)
}

/// A tag part's tags.
fn tags_of(mut part: &[u8]) -> Vec<(&str, &str)> {
    let mut next = move || -> Option<&str> {
        let len = u32::from_le_bytes(part.get(..4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(part.get(4..4 + len)?).ok()?;
        part = &part[4 + len..];
        Some(s)
    };
    let mut tags = Vec::new();
    while let (Some(k), Some(v)) = (next(), next()) {
        tags.push((k, v));
    }
    tags
}

/// A series and its key.
#[derive(Debug)]
struct Entry {
    key: Key,
    series: Series,
}

/// Aggregates one source's statsd values (a container's, or the node's).
///
/// Series are never removed (their values are cumulative over the
/// source's life), so each keeps its place in `entries`, and the indexes
/// name it by that place: `index` by its whole key, and `plain`, for the
/// lines without tags (most lines), one table a type, by its name alone, so
/// that such a line costs one short hash, no key built, and one comparison
/// of its name.
#[derive(Debug)]
pub struct Aggregator {
    entries: Vec<Entry>,
    index: HashTable<u32>,
    plain: [HashTable<u32>; 5],
    hasher: foldhash::fast::RandomState,
    /// The key of a line without tags, its name apart, for each type.
    plain_prefix: [Key; 5],
    max_series: usize,
    percentiles: Vec<f64>,
    refused: Refused,
    budget: Arc<Budget>,
    /// What this aggregator took of the budget.
    bytes: usize,
    /// Scratch for keys and tags.
    key: Vec<u8>,
    seeds: u64,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// Whether `a` and `b` are the same bytes: compared eight at a time, in
/// line (names are short: a call to `memcmp` costs more than comparing).
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    a_words
        .iter()
        .zip(b_words)
        .all(|(x, y)| u64::from_ne_bytes(*x) == u64::from_ne_bytes(*y))
        && a_rest.iter().zip(b_rest).all(|(x, y)| x == y)
}

/// The key's type byte.
fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Counter => 0,
        Kind::Gauge => 1,
        Kind::Set => 2,
        Kind::Timing => 3,
        Kind::Histogram => 4,
    }
}

impl Aggregator {
    /// An empty aggregator holding at most `max_series` series within
    /// `budget`, giving the `percentiles` (each in (0, 100]) of its
    /// timings and histograms.
    pub fn new(max_series: usize, percentiles: &[f64], budget: Arc<Budget>) -> Self {
        let plain_prefix = [
            Kind::Counter,
            Kind::Gauge,
            Kind::Set,
            Kind::Timing,
            Kind::Histogram,
        ]
        .map(|kind| {
            let mut key = Vec::new();
            write_key(&mut key, kind, "", &[("metric_type", kind.tag())]);
            key.into_boxed_slice()
        });
        Self {
            entries: Vec::new(),
            index: HashTable::new(),
            plain: Default::default(),
            hasher: foldhash::fast::RandomState::default(),
            plain_prefix,
            max_series,
            percentiles: percentiles.to_vec(),
            refused: Refused::default(),
            budget,
            bytes: 0,
            key: Vec::new(),
            seeds: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Bytes held, by the budget's reckoning.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Series held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no series is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What was refused so far.
    pub fn refused(&self) -> Refused {
        self.refused
    }

    /// What was refused since the last call.
    pub fn take_refused(&mut self) -> Refused {
        std::mem::take(&mut self.refused)
    }

    /// Takes every value of a line read whole.
    ///
    /// The line's tags are sorted once, and a key is built once for each
    /// type the line's values have (most lines have one); a line without
    /// tags is looked up by its name and type alone.
    pub fn add<'a>(&mut self, line: &Line<'a>, tags: &mut Vec<(&'a str, &'a str)>) {
        if line.tags.is_empty() {
            for &(kind, value) in &line.values {
                self.add_plain(kind, line.name.as_bytes(), value);
            }
            return;
        }
        line.sorted_tags(tags);
        let typed = tags.binary_search_by(|(k, _)| (*k).cmp("metric_type"));
        // The key's length with the longest type's tag: over the bound, no
        // value of the line is taken, before any key is built.
        let longest = tags
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
            + typed.map_or(8 + "metric_type".len() + "histogram".len(), |_| 0)
            + 5
            + line.name.len();
        if longest > MAX_KEY_BYTES {
            self.refused.too_long += line.values.len() as u64;
            return;
        }
        let mut keyed: Option<(Kind, Option<usize>)> = None;
        for &(kind, value) in &line.values {
            let at = match keyed {
                Some((k, at)) if k == kind => at,
                _ => {
                    match typed {
                        Ok(_) => write_key(&mut self.key, kind, line.name, tags),
                        Err(at) => {
                            tags.insert(at, ("metric_type", kind.tag()));
                            write_key(&mut self.key, kind, line.name, tags);
                            tags.remove(at);
                        }
                    }
                    self.series(kind)
                }
            };
            // A series refused is not asked for again for the line's next
            // value of its type, but counted again.
            keyed = Some((kind, at));
            match at {
                Some(at) => self.take(at, value),
                None => self.refused.series += 1,
            }
        }
    }

    /// Takes a value of a line without tags, of `kind` and `name` (as
    /// [`Aggregator::add`] takes a [`Line`] without tags and that one
    /// value; `name` is UTF-8).
    #[inline]
    pub fn add_plain(&mut self, kind: Kind, name: &[u8], value: Value<'_>) {
        if 8 + "metric_type".len() + "histogram".len() + 5 + name.len() > MAX_KEY_BYTES {
            self.refused.too_long += 1;
            return;
        }
        if let Some(at) = self.plain_series(kind, name) {
            self.take(at, value);
        }
    }

    /// The place of the series of a line without tags, of `kind` and
    /// `name`, made if new; none when refused (not counted). Every series
    /// in the type's table has the type's prefix: only names are compared.
    #[inline]
    fn plain_series(&mut self, kind: Kind, name: &[u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(name);
        let kind_at = kind_byte(kind) as usize;
        let skip = self.plain_prefix[kind_at].len();
        let entries = &self.entries;
        let found = self.plain[kind_at].find(hash, |&at| {
            same_bytes(
                entries[at as usize].key.get(skip..).unwrap_or_default(),
                name,
            )
        });
        if let Some(&at) = found {
            return Some(at as usize);
        }
        self.key.clear();
        self.key.extend_from_slice(&self.plain_prefix[kind_at]);
        self.key.extend_from_slice(name);
        let Some(at) = self.series(kind) else {
            self.refused.series += 1;
            return None;
        };
        let hasher = &self.hasher;
        let entries = &self.entries;
        self.plain[kind_at].insert_unique(hash, at as u32, |&at| {
            hasher.hash_one(entries[at as usize].key.get(skip..).unwrap_or_default())
        });
        Some(at)
    }

    /// The place of the series of the key in `self.key`, of `kind`, made if
    /// new; none when refused (not counted).
    fn series(&mut self, kind: Kind) -> Option<usize> {
        let hash = self.hasher.hash_one(self.key.as_slice());
        let entries = &self.entries;
        let key = &self.key;
        if let Some(&at) = self
            .index
            .find(hash, |&at| *entries[at as usize].key == **key)
        {
            return Some(at as usize);
        }
        let cost = series_cost(kind, self.key.len());
        if self.entries.len() >= self.max_series.min(u32::MAX as usize) || !self.budget.take(cost) {
            return None;
        }
        self.bytes += cost;
        self.seeds = self.seeds.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let series = match kind {
            Kind::Counter => Series::Counter(0),
            Kind::Gauge => Series::Gauge(0.0),
            Kind::Set => Series::Set(Box::default()),
            Kind::Timing | Kind::Histogram => Series::Stats(Box::new(Stats::new(self.seeds))),
        };
        let at = self.entries.len();
        self.entries.push(Entry {
            key: self.key.as_slice().into(),
            series,
        });
        let hasher = &self.hasher;
        let entries = &self.entries;
        self.index.insert_unique(hash, at as u32, |&at| {
            hasher.hash_one(&*entries[at as usize].key)
        });
        Some(at)
    }

    /// Takes `value` into the series at `at`.
    fn take(&mut self, at: usize, value: Value<'_>) {
        let Some(entry) = self.entries.get_mut(at) else {
            return;
        };
        match (&mut entry.series, value) {
            (Series::Counter(sum), Value::Count(n)) => *sum = sum.saturating_add(n),
            (Series::Gauge(last), Value::Gauge { value, delta }) => {
                *last = if delta { *last + value } else { value };
            }
            (Series::Set(members), Value::Member(member)) if !members.contains(member) => {
                let cost = member_cost(member);
                if members.len() < MAX_SET_MEMBERS
                    && member.len() <= MAX_MEMBER_BYTES
                    && self.budget.take(cost)
                {
                    self.bytes += cost;
                    members.insert(member.into());
                } else {
                    self.refused.set_members += 1;
                }
            }
            (Series::Stats(stats), Value::Sample { value, times }) => stats.add(value, times),
            // The key holds the type, so a series always gets its own
            // type's values.
            _ => {}
        }
    }

    /// The series' keys in the order records are written: those of one
    /// tag set together.
    pub fn order(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.entries.len() as u32).collect();
        order.sort_unstable_by(|a, b| {
            self.entries[*a as usize]
                .key
                .cmp(&self.entries[*b as usize].key)
        });
        order
    }

    /// The current value of the series of `order[*next..]`, as records of
    /// `topic` stamped `time_ms` (one per tag set, with `tags`, the
    /// source's, before the series' own), until about `max_bytes` of
    /// datapoints; moves `next` past them. Empty once `next` is at the end.
    pub fn records_from(
        &self,
        order: &[u32],
        next: &mut usize,
        topic: &str,
        tags: &[Tag],
        time_ms: i64,
        max_bytes: usize,
    ) -> Vec<MetricList> {
        let mut records: Vec<MetricList> = Vec::new();
        let mut bytes = 0;
        let mut last_tags: Option<&[u8]> = None;
        while let Some(at) = order.get(*next) {
            if bytes >= max_bytes {
                break;
            }
            *next += 1;
            let Some(Entry { key, series }) = self.entries.get(*at as usize) else {
                continue;
            };
            let (part, _, name) = split_key(key);
            if last_tags != Some(part) {
                let mut all = tags.to_vec();
                for (k, v) in tags_of(part) {
                    if !all.iter().any(|t| t.key == k) {
                        all.push(Tag::new(k, v));
                    }
                }
                bytes += all
                    .iter()
                    .map(|t| t.key.len() + t.value.len() + 16)
                    .sum::<usize>();
                records.push(MetricList {
                    topic: topic.to_owned(),
                    tags: all,
                    datapoints: Vec::new(),
                });
                last_tags = Some(part);
            }
            let Some(points) = records.last_mut().map(|r| &mut r.datapoints) else {
                continue;
            };
            let mut point = |suffix: &str, value: f64| {
                let name = if suffix.is_empty() {
                    name.to_owned()
                } else {
                    format!("{name}.{suffix}")
                };
                // The datapoint, its name's allocation, the vector's room.
                bytes += name.len() + 96;
                points.push(Datapoint::new(name, time_ms, value));
            };
            match series {
                Series::Counter(sum) => point("", *sum as f64),
                Series::Gauge(last) => point("", *last),
                Series::Set(members) => point("", members.len() as f64),
                Series::Stats(stats) => {
                    point("count", stats.count as f64);
                    point("sum", stats.sum);
                    point("mean", stats.mean);
                    point("stddev", stats.stddev());
                    point("upper", stats.upper);
                    point("lower", stats.lower);
                    let mut sorted = stats.samples.clone();
                    sorted.sort_by(f64::total_cmp);
                    for p in &self.percentiles {
                        let label = format!("{}_percentile", format_percentile(*p));
                        point(&label, stats.percentile(&sorted, *p));
                    }
                }
            }
        }
        records
    }

    /// Every series' current value, as [`records_from`](Self::records_from)
    /// writes them, at once (for tests and small sources).
    pub fn records(&self, topic: &str, tags: &[Tag], time_ms: i64) -> Vec<MetricList> {
        let order = self.order();
        let mut next = 0;
        self.records_from(&order, &mut next, topic, tags, time_ms, usize::MAX)
    }
}

/// `90` for 90.0, `99_9` for 99.9, as Telegraf names its percentiles.
fn format_percentile(p: f64) -> String {
    let text = format!("{p}");
    text.replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_all(aggregator: &mut Aggregator, lines: &[&str]) {
        let mut line = Line::default();
        let mut tags = Vec::new();
        for text in lines {
            line.read(text).unwrap();
            aggregator.add(&line, &mut tags);
        }
    }

    fn aggregate(lines: &[&str]) -> Aggregator {
        let mut aggregator = Aggregator::new(100, &[90.0], Budget::new(usize::MAX));
        add_all(&mut aggregator, lines);
        aggregator
    }

    type Flat = Vec<(String, Vec<(String, String)>, f64)>;

    fn values(aggregator: &Aggregator) -> Flat {
        let mut out: Vec<_> = aggregator
            .records("t", &[Tag::new("container_id", "c")], 1_000)
            .into_iter()
            .flat_map(|r| {
                let tags: Vec<(String, String)> = r
                    .tags
                    .iter()
                    .skip(1)
                    .map(|t| (t.key.clone(), t.value.clone()))
                    .collect();
                r.datapoints
                    .into_iter()
                    .map(move |d| (d.name, tags.clone(), d.value))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        out
    }

    fn tagged(kind: &str) -> Vec<(String, String)> {
        vec![("metric_type".to_owned(), kind.to_owned())]
    }

    #[test]
    fn counters_sum_gauges_keep_the_last_sets_count_distinct() {
        let aggregator = aggregate(&[
            "hits:1|c",
            "hits:2|c:3|c",
            "hits:1|c|@0.5",
            "temp:20|g",
            "temp:+5|g",
            "temp:-1|g",
            "users:a|s",
            "users:b|s:a|s",
        ]);
        assert_eq!(
            values(&aggregator),
            [
                ("hits".to_owned(), tagged("counter"), 8.0),
                ("temp".to_owned(), tagged("gauge"), 24.0),
                ("users".to_owned(), tagged("set"), 2.0),
            ]
        );
    }

    #[test]
    fn timings_give_their_statistics() {
        let aggregator = aggregate(&["t:1|ms", "t:2|ms:3|ms", "t:4|ms|@0.5"]);
        let got = values(&aggregator);
        let field = |f: &str| {
            got.iter()
                .find(|(n, _, _)| n == &format!("t.{f}"))
                .unwrap_or_else(|| panic!("t.{f} in {got:?}"))
                .2
        };
        // 1, 2, 3, 4, 4
        assert_eq!(field("count"), 5.0);
        assert_eq!(field("sum"), 14.0);
        assert_eq!(field("mean"), 2.8);
        assert_eq!(field("upper"), 4.0);
        assert_eq!(field("lower"), 1.0);
        let mean = 2.8f64;
        let var = [1.0f64, 2.0, 3.0, 4.0, 4.0]
            .iter()
            .map(|v| (v - mean).powi(2))
            .sum::<f64>()
            / 5.0;
        assert!((field("stddev") - var.sqrt()).abs() < 1e-12);
        assert_eq!(field("90_percentile"), 4.0);
        assert_eq!(got.len(), 7);
    }

    #[test]
    fn the_same_name_with_other_tags_or_type_is_another_series() {
        let aggregator = aggregate(&["a:1|c|#k:1", "a:1|c|#k:2", "a:1|g", "a:5|c|#k:1"]);
        assert_eq!(aggregator.len(), 3);
        let got = values(&aggregator);
        assert!(got.contains(&(
            "a".to_owned(),
            vec![
                ("k".into(), "1".into()),
                ("metric_type".into(), "counter".into())
            ],
            6.0
        )));
    }

    #[test]
    fn past_the_bounds_new_series_and_members_are_refused_and_counted() {
        let texts: Vec<String> = (0..5).map(|i| format!("m{i}:1|c")).collect();
        let mut lines: Vec<&str> = texts.iter().map(String::as_str).collect();
        lines.push("m0:1|c");
        let mut aggregator = Aggregator::new(2, &[], Budget::new(usize::MAX));
        add_all(&mut aggregator, &lines);
        assert_eq!(aggregator.len(), 2);
        assert_eq!(aggregator.refused().series, 3);
        let texts: Vec<String> = (0..MAX_SET_MEMBERS + 10)
            .map(|i| format!("s:{i}|s"))
            .collect();
        let lines: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut aggregator = Aggregator::new(2, &[], Budget::new(usize::MAX));
        add_all(&mut aggregator, &lines);
        assert_eq!(aggregator.refused().set_members, 10);
        assert_eq!(values(&aggregator)[0].2, MAX_SET_MEMBERS as f64);
    }

    #[test]
    fn the_budget_is_shared_and_given_back_and_long_keys_are_refused() {
        let mut key = Vec::new();
        write_key(
            &mut key,
            Kind::Counter,
            "aaaaaaaaaaa",
            &[("metric_type", "counter")],
        );
        let budget = Budget::new(2 * series_cost(Kind::Counter, key.len()) + 10);
        let mut a = Aggregator::new(100, &[], budget.clone());
        let mut b = Aggregator::new(100, &[], budget.clone());
        add_all(&mut a, &["aaaaaaaaaaa:1|c"]);
        add_all(&mut b, &["bbbbbbbbbbb:1|c", "ccccccccccc:1|c"]);
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!(b.refused().series, 1);
        assert_eq!(budget.used(), a.bytes() + b.bytes());
        drop(a);
        add_all(&mut b, &["ccccccccccc:1|c"]);
        assert_eq!(b.len(), 2, "what a dropped aggregator held is given back");
        drop(b);
        assert_eq!(budget.used(), 0);

        let long = format!("{}:1|c", "n".repeat(MAX_KEY_BYTES));
        let member = format!("s:{}|s", "m".repeat(MAX_MEMBER_BYTES + 1));
        let mut c = Aggregator::new(100, &[], Budget::new(usize::MAX));
        add_all(&mut c, &[&long, &member]);
        assert_eq!(c.refused().too_long, 1);
        assert_eq!(c.refused().set_members, 1);
    }

    /// A 64 KiB line of 8,000 values and 5,000 tags: its tags are sorted
    /// once and it is refused whole for its length, each value counted.
    #[test]
    fn a_line_of_many_values_and_tags_is_refused_whole() {
        let tags: Vec<String> = (0..5000).rev().map(|i| format!("k{i}")).collect();
        let text = format!("a:{}1|c|#{}", "1|c:".repeat(8000), tags.join(","));
        let mut aggregator = Aggregator::new(100, &[], Budget::new(usize::MAX));
        add_all(&mut aggregator, &[&text]);
        assert_eq!(aggregator.len(), 0);
        assert_eq!(aggregator.refused().too_long, 8001);
        // Values of several types on one line get one key per type.
        add_all(&mut aggregator, &["m:1|c:2|g:3|c:4|ms"]);
        assert_eq!(aggregator.len(), 3);
    }

    #[test]
    fn records_in_chunks_are_the_records_at_once() {
        let texts: Vec<String> = (0..300)
            .map(|i| format!("m{}:{i}|ms|#k:{}", i % 50, i % 3))
            .collect();
        let lines: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut aggregator = Aggregator::new(1000, &[90.0], Budget::new(usize::MAX));
        add_all(&mut aggregator, &lines);
        let flat = |records: Vec<MetricList>| -> Vec<(Vec<Tag>, String, f64)> {
            records
                .into_iter()
                .flat_map(|r| {
                    let tags = r.tags.clone();
                    r.datapoints
                        .into_iter()
                        .map(move |d| (tags.clone(), d.name, d.value))
                })
                .collect()
        };
        let whole = flat(aggregator.records("t", &[], 1));
        let order = aggregator.order();
        let (mut next, mut pieces, mut chunks) = (0, Vec::new(), 0);
        loop {
            let part = aggregator.records_from(&order, &mut next, "t", &[], 1, 500);
            if part.is_empty() {
                break;
            }
            chunks += 1;
            pieces.extend(flat(part));
        }
        assert!(chunks > 10, "{chunks}");
        assert_eq!(pieces, whole);
        assert_eq!(whole.len(), 150 * 7);
    }

    #[test]
    fn a_sets_table_is_within_what_its_members_are_charged() {
        // What the table takes as it grows, member by member, from its
        // capacity (buckets less an eighth, or less one below 8), against
        // what the set and its members are charged past their strings.
        let mut set: HashSet<Box<str>> = HashSet::new();
        for n in 1..=MAX_SET_MEMBERS {
            set.insert(n.to_string().into());
            let capacity = set.capacity();
            let buckets = if capacity < 8 {
                capacity + 1
            } else {
                capacity * 8 / 7
            };
            let table = allocated_size(buckets * SET_SLOT + 16);
            let charged = SET_TABLE + n * (member_cost("") - allocated_size(0));
            assert!(table <= charged, "{n} members: table {table} > {charged}");
        }
    }

    #[test]
    fn an_entry_is_four_words() {
        // A key and a series of two words (a set's table or a timing's
        // statistics are boxed): two entries a cache line.
        assert_eq!(
            std::mem::size_of::<Entry>(),
            4 * std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn a_timing_keeps_a_bounded_reservoir() {
        let texts: Vec<String> = (0..10_000).map(|i| format!("t:{}|ms", i % 100)).collect();
        let lines: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut aggregator = Aggregator::new(2, &[50.0], Budget::new(usize::MAX));
        add_all(&mut aggregator, &lines);
        let Some(Series::Stats(stats)) = aggregator.entries.first().map(|e| &e.series) else {
            panic!("a timing");
        };
        assert_eq!(stats.samples.len(), PERCENTILE_SAMPLES);
        assert_eq!(stats.count, 10_000);
        assert_eq!(format_percentile(99.9), "99_9");
    }
}
