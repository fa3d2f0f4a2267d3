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
//! Bounded: at most `max_series` series; a value of a new series past it
//! is refused and counted ([`Refused`]).

use std::collections::{HashMap, HashSet};

use schema::{Datapoint, MetricList, Tag};

use super::parse::{Kind, Line, Value};

/// Members one set holds, at most.
pub const MAX_SET_MEMBERS: usize = 1024;

/// Values a timing or histogram keeps for its percentiles, at most.
pub const PERCENTILE_SAMPLES: usize = 256;

/// What was refused, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Values of new series past `max_series`.
    pub series: u64,
    /// New members of a full set.
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
    Set(HashSet<Box<str>>),
    Stats(Box<Stats>),
}

/// A series' key: its type, its name and its tags (sorted, the last of a
/// key), each string length-prefixed.
type Key = Box<[u8]>;

fn put(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Reads a key back: its type, name and tags.
fn parse_key(key: &[u8]) -> (Kind, &str, Vec<(&str, &str)>) {
    let kind = match key.first() {
        Some(0) => Kind::Counter,
        Some(1) => Kind::Gauge,
        Some(2) => Kind::Set,
        Some(3) => Kind::Timing,
        _ => Kind::Histogram,
    };
    let mut rest = key.get(1..).unwrap_or_default();
    let mut next = move || -> Option<&str> {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
        rest = &rest[4 + len..];
        Some(s)
    };
    let name = next().unwrap_or_default();
    let mut tags = Vec::new();
    while let (Some(k), Some(v)) = (next(), next()) {
        tags.push((k, v));
    }
    (kind, name, tags)
}

/// Aggregates one source's statsd values (a container's, or the node's).
#[derive(Debug)]
pub struct Aggregator {
    series: HashMap<Key, Series>,
    max_series: usize,
    percentiles: Vec<f64>,
    refused: Refused,
    /// Scratch for keys and tags.
    key: Vec<u8>,
    seeds: u64,
}

impl Aggregator {
    /// An empty aggregator holding at most `max_series` series, giving the
    /// `percentiles` (each in (0, 100]) of its timings and histograms.
    pub fn new(max_series: usize, percentiles: &[f64]) -> Self {
        Self {
            series: HashMap::new(),
            max_series,
            percentiles: percentiles.to_vec(),
            refused: Refused::default(),
            key: Vec::new(),
            seeds: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Series held.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether no series is held.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// What was refused so far.
    pub fn refused(&self) -> Refused {
        self.refused
    }

    /// Takes every value of a line read whole.
    pub fn add<'a>(&mut self, line: &Line<'a>, tags: &mut Vec<(&'a str, &'a str)>) {
        for &(kind, value) in &line.values {
            line.tags_for(kind, tags);
            self.key.clear();
            self.key.push(match kind {
                Kind::Counter => 0,
                Kind::Gauge => 1,
                Kind::Set => 2,
                Kind::Timing => 3,
                Kind::Histogram => 4,
            });
            put(&mut self.key, line.name);
            for (k, v) in tags.iter() {
                put(&mut self.key, k);
                put(&mut self.key, v);
            }
            if !self.series.contains_key(self.key.as_slice()) {
                if self.series.len() >= self.max_series {
                    self.refused.series += 1;
                    continue;
                }
                self.seeds = self.seeds.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let new = match kind {
                    Kind::Counter => Series::Counter(0),
                    Kind::Gauge => Series::Gauge(0.0),
                    Kind::Set => Series::Set(HashSet::new()),
                    Kind::Timing | Kind::Histogram => {
                        Series::Stats(Box::new(Stats::new(self.seeds)))
                    }
                };
                self.series.insert(self.key.as_slice().into(), new);
            }
            let Some(series) = self.series.get_mut(self.key.as_slice()) else {
                continue;
            };
            match (series, value) {
                (Series::Counter(sum), Value::Count(n)) => *sum = sum.saturating_add(n),
                (Series::Gauge(last), Value::Gauge { value, delta }) => {
                    *last = if delta { *last + value } else { value };
                }
                (Series::Set(members), Value::Member(member)) if !members.contains(member) => {
                    if members.len() < MAX_SET_MEMBERS {
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
    }

    /// The current value of every series, as records: one per distinct tag
    /// set, with `tags` before the series' own (the source's tags), on
    /// `topic`, stamped `time_ms`.
    pub fn records(&self, topic: &str, tags: &[Tag], time_ms: i64) -> Vec<MetricList> {
        let mut by_tags: HashMap<Vec<(&str, &str)>, Vec<Datapoint>> = HashMap::new();
        for (key, series) in &self.series {
            let (kind, name, series_tags) = parse_key(key);
            let points = by_tags.entry(series_tags).or_default();
            let mut point = |suffix: &str, value: f64| {
                let name = if suffix.is_empty() {
                    name.to_owned()
                } else {
                    format!("{name}.{suffix}")
                };
                points.push(Datapoint::new(name, time_ms, value));
            };
            match series {
                Series::Counter(sum) => point("", *sum as f64),
                Series::Gauge(last) => point("", *last),
                Series::Set(members) => point("", members.len() as f64),
                Series::Stats(stats) => {
                    debug_assert!(matches!(kind, Kind::Timing | Kind::Histogram));
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
        let mut records: Vec<MetricList> = by_tags
            .into_iter()
            .map(|(series_tags, mut datapoints)| {
                datapoints.sort_by(|a, b| a.name.cmp(&b.name));
                let mut all = tags.to_vec();
                for (k, v) in series_tags {
                    if !all.iter().any(|t| t.key == k) {
                        all.push(Tag::new(k, v));
                    }
                }
                MetricList {
                    topic: topic.to_owned(),
                    tags: all,
                    datapoints,
                }
            })
            .collect();
        records.sort_by(|a, b| {
            let tags = |r: &'_ MetricList| {
                r.tags
                    .iter()
                    .map(|t| (t.key.clone(), t.value.clone()))
                    .collect::<Vec<_>>()
            };
            tags(a).cmp(&tags(b))
        });
        records
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
        let mut aggregator = Aggregator::new(100, &[90.0]);
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
        let mut aggregator = Aggregator::new(2, &[]);
        add_all(&mut aggregator, &lines);
        assert_eq!(aggregator.len(), 2);
        assert_eq!(aggregator.refused().series, 3);
        let texts: Vec<String> = (0..MAX_SET_MEMBERS + 10)
            .map(|i| format!("s:{i}|s"))
            .collect();
        let lines: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut aggregator = Aggregator::new(2, &[]);
        add_all(&mut aggregator, &lines);
        assert_eq!(aggregator.refused().set_members, 10);
        assert_eq!(values(&aggregator)[0].2, MAX_SET_MEMBERS as f64);
    }

    #[test]
    fn a_timing_keeps_a_bounded_reservoir() {
        let texts: Vec<String> = (0..10_000).map(|i| format!("t:{}|ms", i % 100)).collect();
        let lines: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut aggregator = Aggregator::new(2, &[50.0]);
        add_all(&mut aggregator, &lines);
        let Some(Series::Stats(stats)) = aggregator.series.values().next() else {
            panic!("a timing");
        };
        assert_eq!(stats.samples.len(), PERCENTILE_SAMPLES);
        assert_eq!(stats.count, 10_000);
        assert_eq!(format_percentile(99.9), "99_9");
    }
}
