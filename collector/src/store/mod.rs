//! The node store: the latest value of every series (a datapoint's name and
//! its record's tags, sorted by key) from every input, for the outputs that
//! serve the node's metrics where operators read them ([`prometheus`]).
//!
//! It is fed by the pipeline as records are routed (see
//! [`crate::pipeline`]), from the bytes that go to the buffer, so it never
//! waits for Kafka and Kafka never waits for it. It exists only when an
//! output reads it: otherwise nothing is decoded for it.
//!
//! Bounded: at most `store_max_series` series, whose names and tags take at
//! most [`SERIES_BUDGET_BYTES`] each on average, and at most
//! [`MAX_FAMILY_LABELS`] label names (and [`MAX_FAMILY_LABEL_BYTES`] of
//! them) in one Prometheus family, so that one scrape's text stays bounded
//! too. A new series beyond a bound is refused and counted
//! (`collector_store_series_refused_total{reason}`); the series already held
//! keep being updated. A series not updated for `store_expiry_secs` is
//! forgotten.

pub mod prometheus;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use schema::datum::Cursor;

use crate::route::Routed;
use crate::stats::Stats;

/// The average bytes of name and tags a series may take: the store's byte
/// bound is `store_max_series` times this.
pub const SERIES_BUDGET_BYTES: usize = 256;
/// What a series takes beyond its key: its entry in the map, its value and
/// times, and the key's allocation header.
pub const SERIES_OVERHEAD_BYTES: usize = 96;
/// Label names one Prometheus family may have (the union of its series'
/// tag keys, sanitized).
pub const MAX_FAMILY_LABELS: usize = 64;
/// Bytes of those label names together.
pub const MAX_FAMILY_LABEL_BYTES: usize = 1024;

/// Where a series came from: the v0 API serves each kind on its own route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The TCP input (the agent module and local processes).
    Input,
    /// The agent poller (containers and the agent itself).
    Agent,
}

/// Why a new series was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `store_max_series` series are held.
    Series,
    /// The byte bound is reached.
    Bytes,
    /// Its family would have too many label names.
    Labels,
}

impl Refusal {
    /// Every reason, for the counters.
    pub const ALL: [Refusal; 3] = [Refusal::Series, Refusal::Bytes, Refusal::Labels];

    /// The reason's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Series => "series",
            Refusal::Bytes => "bytes",
            Refusal::Labels => "labels",
        }
    }
}

/// The store's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Most series held.
    pub max_series: usize,
    /// A series not updated for this long is forgotten.
    pub expiry: Duration,
}

impl StoreSettings {
    /// The bytes of names and tags the store holds at most.
    pub fn max_key_bytes(&self) -> usize {
        self.max_series.saturating_mul(SERIES_BUDGET_BYTES)
    }

    /// What the store takes at most: its keys, and each series' overhead.
    pub fn memory_bound(&self) -> usize {
        self.max_key_bytes()
            .saturating_add(self.max_series.saturating_mul(SERIES_OVERHEAD_BYTES))
    }
}

/// One series' latest value.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The value.
    pub value: f64,
    /// The datapoint's own time, ms since the epoch.
    pub time_ms: i64,
    /// Where it came from.
    pub source: Source,
    /// When it was last updated, seconds since the store began.
    seen: u32,
}

/// A series' key: its name, then its tags sorted by key, each string
/// length-prefixed (so that any byte, NUL included, may appear in them).
pub type Key = Arc<[u8]>;

/// A family's label names, with how many series use each.
#[derive(Debug, Default)]
struct Family {
    series: usize,
    labels: BTreeMap<Box<str>, usize>,
    label_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    series: HashMap<Key, Sample>,
    key_bytes: usize,
    families: HashMap<Box<str>, Family>,
}

/// The node store (see the module's doc).
#[derive(Debug)]
pub struct Store {
    settings: StoreSettings,
    inner: Mutex<Inner>,
    stats: Arc<Stats>,
    began: Instant,
}

/// Writes one length-prefixed string of a key.
fn put(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// The distinct Prometheus label names of a series' tag keys.
fn label_names<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut labels: Vec<String> = keys.filter_map(prometheus::label_name).collect();
    labels.sort_unstable();
    labels.dedup();
    labels
}

/// Reads a key back: its name and its tags in key order.
pub fn parse_key(key: &[u8]) -> (&str, impl Iterator<Item = (&str, &str)>) {
    let mut rest = key;
    let mut next = move || -> Option<&str> {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
        rest = &rest[4 + len..];
        Some(s)
    };
    let name = next().unwrap_or_default();
    let tags = std::iter::from_fn(move || Some((next()?, next()?)));
    (name, tags)
}

impl Store {
    /// An empty store.
    pub fn new(settings: StoreSettings, stats: Arc<Stats>) -> Self {
        Self {
            settings,
            inner: Mutex::default(),
            stats,
            began: Instant::now(),
        }
    }

    /// The bounds in force.
    pub fn settings(&self) -> StoreSettings {
        self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before anything can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u32 {
        u32::try_from(self.began.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Takes the latest value of every datapoint of `records` (routed, with
    /// every tag they carry to Kafka).
    pub fn observe(&self, source: Source, records: &[Routed]) {
        let now = self.now();
        let mut tags: Vec<(&str, &str)> = Vec::new();
        let mut tag_part = Vec::new();
        let mut key = Vec::new();
        let mut inner = self.lock();
        for routed in records {
            let Ok(record) = schema::raw::scan_metric_list(&mut Cursor::new(&routed.data)) else {
                continue;
            };
            tags.clear();
            tags.extend(record.tags());
            // Sorted by key; of a key given twice, the first is kept (a
            // record's own tag comes before the ones added to it).
            tags.sort_by(|a, b| a.0.cmp(b.0));
            tags.dedup_by(|later, earlier| later.0 == earlier.0);
            tag_part.clear();
            for (k, v) in &tags {
                put(&mut tag_part, k);
                put(&mut tag_part, v);
            }
            for (name, time_ms, value) in record.datapoint_values() {
                key.clear();
                put(&mut key, name);
                key.extend_from_slice(&tag_part);
                let sample = Sample {
                    value,
                    time_ms,
                    source,
                    seen: now,
                };
                if let Some(held) = inner.series.get_mut(key.as_slice()) {
                    *held = sample;
                    continue;
                }
                if let Err(refusal) = self.admit(&mut inner, name, &tags, key.len()) {
                    self.stats.count_store_refusal(refusal);
                    continue;
                }
                inner.key_bytes += key.len();
                inner.series.insert(Key::from(key.as_slice()), sample);
            }
        }
        self.publish(&inner);
    }

    /// Checks the bounds for a new series and registers its labels.
    fn admit(
        &self,
        inner: &mut Inner,
        name: &str,
        tags: &[(&str, &str)],
        key_len: usize,
    ) -> Result<(), Refusal> {
        if inner.series.len() >= self.settings.max_series {
            return Err(Refusal::Series);
        }
        if inner.key_bytes + key_len > self.settings.max_key_bytes() {
            return Err(Refusal::Bytes);
        }
        let family_name = prometheus::sanitize(name);
        let labels = label_names(tags.iter().map(|(k, _)| *k));
        let family = inner.families.get(family_name.as_str());
        let (mut count, mut bytes) = family.map_or((0, 0), |f| (f.labels.len(), f.label_bytes));
        for label in &labels {
            if family.is_none_or(|f| !f.labels.contains_key(label.as_str())) {
                count += 1;
                bytes += label.len();
            }
        }
        if count > MAX_FAMILY_LABELS || bytes > MAX_FAMILY_LABEL_BYTES {
            return Err(Refusal::Labels);
        }
        let family = inner.families.entry(family_name.into()).or_default();
        family.series += 1;
        for label in labels {
            let len = label.len();
            let uses = family.labels.entry(label.into()).or_insert(0);
            if *uses == 0 {
                family.label_bytes += len;
            }
            *uses += 1;
        }
        Ok(())
    }

    /// Forgets the series not updated within the expiry; returns how many.
    pub fn expire(&self) -> usize {
        let expiry = u32::try_from(self.settings.expiry.as_secs()).unwrap_or(u32::MAX);
        let now = self.now();
        self.remove_where(|_, sample| now.saturating_sub(sample.seen) >= expiry)
    }

    /// Forgets every series for which `gone` is true.
    pub fn remove_where(&self, mut gone: impl FnMut(&[u8], &Sample) -> bool) -> usize {
        let mut inner = self.lock();
        let doomed: Vec<Key> = inner
            .series
            .iter()
            .filter(|(key, sample)| gone(key, sample))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &doomed {
            inner.series.remove(key);
            inner.key_bytes -= key.len();
            let (name, tags) = parse_key(key);
            let family_name = prometheus::sanitize(name);
            let labels = label_names(tags.map(|(k, _)| k));
            if let Some(family) = inner.families.get_mut(family_name.as_str()) {
                family.series -= 1;
                for label in labels {
                    if let Some(uses) = family.labels.get_mut(label.as_str()) {
                        *uses -= 1;
                        if *uses == 0 {
                            family.labels.remove(label.as_str());
                            family.label_bytes -= label.len();
                        }
                    }
                }
                if family.series == 0 {
                    inner.families.remove(family_name.as_str());
                }
            }
        }
        self.stats
            .store_series_expired
            .fetch_add(doomed.len() as u64, Relaxed);
        self.publish(&inner);
        doomed.len()
    }

    fn publish(&self, inner: &Inner) {
        self.stats
            .store_series
            .store(inner.series.len() as i64, Relaxed);
        self.stats.store_bytes.store(
            (inner.key_bytes + inner.series.len() * SERIES_OVERHEAD_BYTES) as i64,
            Relaxed,
        );
    }

    /// Every series held, with its latest value: a snapshot (the keys are
    /// shared, not copied), so that a slow reader never holds the store.
    pub fn snapshot(&self) -> Vec<(Key, Sample)> {
        let inner = self.lock();
        inner
            .series
            .iter()
            .map(|(key, sample)| (key.clone(), *sample))
            .collect()
    }

    /// Series held.
    pub fn len(&self) -> usize {
        self.lock().series.len()
    }

    /// Whether no series is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets expired series every quarter of the expiry (at most every
    /// 15 s) until `stop`.
    pub async fn run_janitor(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period =
            (self.settings.expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.expire();
        }
    }
}

#[cfg(test)]
mod tests;
