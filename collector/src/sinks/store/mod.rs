//! The node store: the latest value of every series (a datapoint's name and
//! its record's tags, sorted by key) from every input, for the outputs that
//! serve the node's metrics where operators read them ([`prometheus`]).
//!
//! It is fed by the pipeline as records are routed (see
//! [`crate::pipeline`] and [`Store::feed`]), from what routing has already
//! read of each record and the tags it adds, so it never waits for Kafka
//! and Kafka never waits for it. It exists only when an output reads it:
//! otherwise nothing is read for it.
//!
//! Bounded: at most `store_max_series` series, and at most
//! [`StoreSettings::memory_bound`] bytes for everything it holds (each
//! series' name, tags and entry, each family's name and label names, by
//! the allocator's size classes), and at most [`MAX_FAMILY_LABELS`] label
//! names ([`MAX_FAMILY_LABEL_BYTES`] of them) in one Prometheus family, so
//! that one scrape's text stays bounded too. A datapoint of a series not
//! held is refused past a bound and counted
//! (`collector_store_series_refused_total{reason}`), each time; the series
//! already held keep being updated. A series not updated for
//! `store_expiry_secs` is forgotten.
//!
//! The lock is held only for map updates: datapoints are hashed before it
//! is taken, a series held is found without its key being built, expired
//! series are removed a batch at a time, and a scrape works on a snapshot
//! whose keys are shared, not copied.

pub mod limits;
pub mod prometheus;

pub use limits::{
    FAMILY_OVERHEAD_BYTES, LABEL_OVERHEAD_BYTES, MAX_FAMILY_LABEL_BYTES, MAX_FAMILY_LABELS,
    Refusal, SERIES_BUDGET_BYTES, SERIES_OVERHEAD_BYTES, StoreSettings,
};

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use hashbrown::HashTable;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use schema::datum::Cursor;

use crate::memory::allocated_size;
use crate::route::Routed;
use crate::stats::Stats;

/// Expired series removed under one hold of the lock.
const EXPIRY_BATCH: usize = 1024;

/// Where a series came from: the v0 API serves each kind on its own route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The TCP input (the agent module and local processes).
    Input,
    /// The agent poller (containers and the agent itself).
    Agent,
    /// The node's own metrics.
    Node,
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

/// A series held: its key and that key's hash, its latest value, and its
/// Prometheus family (shared with the family's entry).
#[derive(Debug)]
struct Entry {
    key: Key,
    hash: u64,
    sample: Sample,
    family: Arc<str>,
}

/// A family's label names, with how many series use each.
#[derive(Debug, Default)]
struct Family {
    series: usize,
    labels: BTreeMap<Box<str>, usize>,
    label_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// The series, by [`Store::hash`] of their keys. That hash combines
    /// the name's with the hash of the record's tag part, so that a
    /// record's datapoints hash their names only, and a series held is
    /// found without its key being built.
    series: HashTable<Entry>,
    /// What everything held takes, by [`Store::cost`]'s reckoning.
    bytes: usize,
    families: HashMap<Arc<str>, Family>,
}

/// The node store (see the module's doc).
#[derive(Debug)]
pub struct Store {
    settings: StoreSettings,
    inner: Mutex<Inner>,
    /// Seeded per process; foldhash, as SipHash took a tenth of the busy
    /// node's CPU with the store on. The senders are local processes that
    /// see neither the hashes nor the map's order (scrapes and v0 answers
    /// are sorted), which is what foldhash's "minimal" DoS resistance
    /// covers.
    hasher: foldhash::fast::RandomState,
    stats: Arc<Stats>,
    began: Instant,
}

/// Writes one length-prefixed string of a key.
fn put(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// A key's name (with its length prefix) and its tag part.
fn split_key(key: &[u8]) -> (&[u8], &[u8]) {
    let len = key.get(..4).map_or(0, |b| {
        u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize
    });
    key.split_at((4 + len).min(key.len()))
}

/// Whether `key` is the key of the datapoint `name` with the tag part
/// `part`: compared apart, so that a name's end and the tags' start never
/// run together.
fn key_is(key: &[u8], name: &[u8], part: &[u8]) -> bool {
    let (held_name, held_part) = split_key(key);
    held_part == part && held_name.get(4..) == Some(name) && held_name.len() == name.len() + 4
}

/// The distinct Prometheus label names of a series' tag keys.
fn label_names<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut labels: Vec<String> = keys
        .filter_map(|k| prometheus::label_name(k).map(std::borrow::Cow::into_owned))
        .collect();
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

/// Datapoints taken under one hold of the lock, at most.
const POINTS_PER_TURN: usize = 4096;

/// Bytes of records' tag parts held for one turn, at most (and one
/// record's more).
const TAG_BYTES_PER_TURN: usize = 256 * 1024;

/// One datapoint fed, hashed before the lock is taken.
struct Point<'a> {
    name: &'a str,
    /// Its record's tag part, in [`Feed`]'s buffer.
    tags: std::ops::Range<usize>,
    hash: u64,
    sample: Sample,
}

/// Feeds the store the records of one block as they are routed (see
/// [`Store::feed`]). What it holds is applied a turn at a time, and the
/// rest when it is dropped.
pub struct Feed<'s, 'a> {
    store: &'s Store,
    source: Source,
    now: u32,
    tags: Vec<(&'a str, &'a str)>,
    parts: Vec<u8>,
    points: Vec<Point<'a>>,
}

impl<'a> Feed<'_, 'a> {
    /// Takes one record: its tags (its own, then those routing added,
    /// which the first of a key wins) and its datapoints.
    pub fn record(
        &mut self,
        tags: impl IntoIterator<Item = (&'a str, &'a str)>,
        datapoints: impl IntoIterator<Item = (&'a str, i64, f64)>,
    ) {
        let mut datapoints = datapoints.into_iter().peekable();
        if datapoints.peek().is_none() {
            return;
        }
        if self.parts.len() >= TAG_BYTES_PER_TURN {
            self.apply();
        }
        let drop = &self.store.settings.drop_tags;
        self.tags.clear();
        self.tags.extend(
            tags.into_iter()
                .filter(|(k, _)| !drop.iter().any(|d| d == k)),
        );
        // Sorted by key (stably); of a key given twice, the first is kept.
        self.tags.sort_by(|a, b| a.0.cmp(b.0));
        self.tags.dedup_by(|later, earlier| later.0 == earlier.0);
        let start = self.parts.len();
        for (k, v) in &self.tags {
            put(&mut self.parts, k);
            put(&mut self.parts, v);
        }
        let part = start..self.parts.len();
        let tags_hash = self.store.hasher.hash_one(&self.parts[part.clone()]);
        for (name, time_ms, value) in datapoints {
            if self.points.len() >= POINTS_PER_TURN {
                // The record's part is kept for its remaining datapoints.
                self.apply_points();
            }
            self.points.push(Point {
                name,
                tags: part.clone(),
                hash: self.store.hash(name.as_bytes(), tags_hash),
                sample: Sample {
                    value,
                    time_ms,
                    source: self.source,
                    seen: self.now,
                },
            });
        }
    }

    /// Applies what is held and empties it.
    fn apply(&mut self) {
        self.apply_points();
        self.parts.clear();
    }

    /// Applies the datapoints held under the lock.
    fn apply_points(&mut self) {
        if self.points.is_empty() {
            return;
        }
        let store = self.store;
        let mut inner = store.lock();
        let mut key = Vec::new();
        for point in self.points.drain(..) {
            let part = &self.parts[point.tags];
            let name = point.name.as_bytes();
            let same = |entry: &Entry| key_is(&entry.key, name, part);
            if let Some(held) = inner.series.find_mut(point.hash, same) {
                held.sample = point.sample;
                continue;
            }
            key.clear();
            put(&mut key, point.name);
            key.extend_from_slice(part);
            match store.admit(&mut inner, &key) {
                Ok(family) => {
                    inner.series.insert_unique(
                        point.hash,
                        Entry {
                            key: Key::from(key.as_slice()),
                            hash: point.hash,
                            sample: point.sample,
                            family,
                        },
                        |entry| entry.hash,
                    );
                }
                Err(refusal) => store.stats.count_store_refusal(refusal),
            }
        }
        store.publish(&inner);
    }
}

impl Drop for Feed<'_, '_> {
    fn drop(&mut self) {
        self.apply();
    }
}

impl Store {
    /// An empty store.
    pub fn new(settings: StoreSettings, stats: Arc<Stats>) -> Self {
        Self {
            settings,
            inner: Mutex::default(),
            hasher: foldhash::fast::RandomState::default(),
            stats,
            began: Instant::now(),
        }
    }

    /// The bounds in force.
    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before anything can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u32 {
        u32::try_from(self.began.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// A series' hash: its name's bytes with its tag part's hash.
    fn hash(&self, name: &[u8], tags_hash: u64) -> u64 {
        self.hasher.hash_one((name, tags_hash))
    }

    /// What a series with a key of `key_len` bytes takes.
    fn series_cost(key_len: usize) -> usize {
        allocated_size(key_len + 16) + SERIES_OVERHEAD_BYTES
    }

    /// What a family named `name` takes, without its labels.
    fn family_cost(name: &str) -> usize {
        allocated_size(name.len() + 16) + FAMILY_OVERHEAD_BYTES
    }

    /// What one label name of a family takes.
    fn label_cost(label: &str) -> usize {
        allocated_size(label.len()) + LABEL_OVERHEAD_BYTES
    }

    /// Feeds the store records as they are routed, from `source`: the
    /// pipeline gives each record's tags (with those routing adds) and
    /// datapoints from what it already read, so nothing is read twice.
    ///
    /// A datapoint's series is looked up by its name and its record's tag
    /// part (its tags sorted by key, built once a record) under the lock;
    /// only a new series' key is built. At most [`POINTS_PER_TURN`]
    /// datapoints and [`TAG_BYTES_PER_TURN`] bytes of tags are held before
    /// they are applied.
    pub fn feed<'a>(&self, source: Source) -> Feed<'_, 'a> {
        Feed {
            store: self,
            source,
            now: self.now(),
            tags: Vec::new(),
            parts: Vec::new(),
            points: Vec::new(),
        }
    }

    /// Takes the latest value of every datapoint of `records` (routed, with
    /// every tag they carry to Kafka), reading them again.
    pub fn observe(&self, source: Source, records: &[Routed]) {
        let mut feed = self.feed(source);
        for routed in records {
            if let Ok(record) = schema::raw::scan_metric_list(&mut Cursor::new(&routed.data)) {
                feed.record(record.tags(), record.datapoint_values());
            }
        }
    }

    /// Checks the bounds for a new series with `key`, registers its family
    /// and labels and counts what they take; returns its family.
    fn admit(&self, inner: &mut Inner, key: &[u8]) -> Result<Arc<str>, Refusal> {
        if inner.series.len() >= self.settings.max_series {
            return Err(Refusal::Series);
        }
        let (name, tags) = parse_key(key);
        let family_name = prometheus::sanitize(name);
        let labels = label_names(tags.map(|(k, _)| k));
        let family = inner.families.get_key_value(family_name.as_str());
        let mut cost = Self::series_cost(key.len());
        let (mut count, mut label_bytes) = (0, 0);
        match family {
            Some((_, f)) => {
                count = f.labels.len();
                label_bytes = f.label_bytes;
            }
            None => cost += Self::family_cost(&family_name),
        }
        for label in &labels {
            if family.is_none_or(|(_, f)| !f.labels.contains_key(label.as_str())) {
                count += 1;
                label_bytes += label.len();
                cost += Self::label_cost(label);
            }
        }
        if inner.bytes + cost > self.settings.memory_bound() {
            return Err(Refusal::Bytes);
        }
        if count > MAX_FAMILY_LABELS || label_bytes > MAX_FAMILY_LABEL_BYTES {
            return Err(Refusal::Labels);
        }
        inner.bytes += cost;
        let shared: Arc<str> = match inner.families.get_key_value(family_name.as_str()) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(family_name),
        };
        let family = inner.families.entry(shared.clone()).or_default();
        family.series += 1;
        for label in labels {
            let len = label.len();
            let uses = family.labels.entry(label.into()).or_insert(0);
            if *uses == 0 {
                family.label_bytes += len;
            }
            *uses += 1;
        }
        Ok(shared)
    }

    /// Forgets the series not updated within the expiry; returns how many.
    pub fn expire(&self) -> usize {
        let expiry = u32::try_from(self.settings.expiry.as_secs()).unwrap_or(u32::MAX);
        let now = self.now();
        self.remove_where(|_, sample| now.saturating_sub(sample.seen) >= expiry)
    }

    /// Forgets every series for which `gone` is true (asked again under the
    /// lock that removes it), a batch at a time.
    pub fn remove_where(&self, mut gone: impl FnMut(&[u8], &Sample) -> bool) -> usize {
        let doomed: Vec<(Key, u64)> = {
            let inner = self.lock();
            inner
                .series
                .iter()
                .filter(|entry| gone(&entry.key, &entry.sample))
                .map(|entry| (entry.key.clone(), entry.hash))
                .collect()
        };
        let mut removed = 0;
        for batch in doomed.chunks(EXPIRY_BATCH) {
            // The label names of each, worked out before the lock.
            let labels: Vec<Vec<String>> = batch
                .iter()
                .map(|(key, _)| label_names(parse_key(key).1.map(|(k, _)| k)))
                .collect();
            let mut inner = self.lock();
            for ((key, hash), labels) in batch.iter().zip(labels) {
                let Ok(found) = inner.series.find_entry(*hash, |entry| entry.key == *key) else {
                    continue;
                };
                if !gone(key, &found.get().sample) {
                    continue;
                }
                let (entry, _) = found.remove();
                removed += 1;
                let mut freed = Self::series_cost(key.len());
                if let Some(family) = inner.families.get_mut(&entry.family) {
                    family.series -= 1;
                    for label in labels {
                        if let Some(uses) = family.labels.get_mut(label.as_str()) {
                            *uses -= 1;
                            if *uses == 0 {
                                family.labels.remove(label.as_str());
                                family.label_bytes -= label.len();
                                freed += Self::label_cost(&label);
                            }
                        }
                    }
                    if family.series == 0 {
                        inner.families.remove(&entry.family);
                        freed += Self::family_cost(&entry.family);
                    }
                }
                inner.bytes = inner.bytes.saturating_sub(freed);
            }
            self.publish(&inner);
        }
        self.stats
            .store_series_expired
            .fetch_add(removed as u64, Relaxed);
        removed
    }

    fn publish(&self, inner: &Inner) {
        self.stats
            .store_series
            .store(inner.series.len() as i64, Relaxed);
        self.stats.store_bytes.store(inner.bytes as i64, Relaxed);
    }

    /// Every series held, with its family and latest value: a snapshot
    /// whose keys and family names are shared, not copied, so that a slow
    /// reader never holds the store.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Key, Sample)> {
        let inner = self.lock();
        inner
            .series
            .iter()
            .map(|entry| (entry.family.clone(), entry.key.clone(), entry.sample))
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
            let store = self.clone();
            let _ = tokio::task::spawn_blocking(move || store.expire()).await;
        }
    }
}

#[cfg(test)]
mod tests;
