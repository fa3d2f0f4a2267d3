//! Routing: which Kafka topic (and key) a record goes to, and the tags added
//! on the way. Pure functions over records; the settings can change at
//! runtime, so callers fetch the current [`Routing`] for every block.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use schema::raw::RawRecord;
use schema::{MetricList, Tag};

use crate::config::{Config, is_valid_topic};
use crate::memory::{Lease, allocated_size};

/// The routing settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Prefix before `record.topic`.
    pub prefix: String,
    /// One topic for everything, when set.
    pub single_topic: Option<String>,
    /// Tags added to records that lack them.
    pub static_tags: Vec<Tag>,
    /// Tag whose value is the partition key.
    pub key_tag: Option<String>,
}

impl Routing {
    /// The routing part of a configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            prefix: config.kafka_topic_prefix.clone(),
            single_topic: config.kafka_single_topic.clone(),
            static_tags: config
                .static_tags
                .iter()
                .map(|(k, v)| Tag::new(k, v))
                .collect(),
            key_tag: config.kafka_partition_key_tag.clone(),
        }
    }
}

/// One record, routed and encoded: the unit that crosses the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Kafka topic.
    pub topic: Arc<str>,
    /// Partition key, if keyed by a tag.
    pub key: Option<Arc<str>>,
    /// The record in Avro binary (see `schema::datum::write_metric_list`).
    /// The records of one input block with the same topic and key share one
    /// allocation (see [`Records`]).
    pub data: Bytes,
    /// Datapoints in the record.
    pub datapoints: u32,
    /// The bytes of the buffer's bound this record stands for: its own, its
    /// bookkeeping, and (for the last record of an allocation) the
    /// allocation's size-class rounding. Held by its chunk's lease, then by
    /// the batch it joins, then by the Kafka message it goes out in.
    pub share: u32,
    /// Its sequence number in the disk spool, when it was read back from
    /// it (0: never spooled). Its final outcome is reported to the spool.
    pub seq: u64,
}

/// The spool's sequence numbers of records read back from the disk spool,
/// and their datapoints: what a batch or message must report to the spool
/// once its fate is known.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spooled {
    /// Sequence numbers, in order.
    pub seqs: Vec<u64>,
    /// Datapoints in those records.
    pub datapoints: u64,
}

impl Spooled {
    /// Adds a record's sequence number (0: not from the spool, skipped).
    pub fn add(&mut self, seq: u64, datapoints: u32) {
        if seq != 0 {
            self.seqs.push(seq);
            self.datapoints += u64::from(datapoints);
        }
    }

    /// Records and datapoints.
    pub fn counts(&self) -> crate::stats::Counts {
        crate::stats::Counts {
            records: self.seqs.len() as u64,
            datapoints: self.datapoints,
        }
    }
}

/// A record with its tags added and its topic and key chosen, not yet
/// encoded.
#[derive(Debug)]
pub struct Prepared {
    topic: Arc<str>,
    key: Option<Arc<str>>,
    record: MetricList,
    encoded_len: usize,
}

impl Prepared {
    /// The record, with every tag it carries to Kafka.
    pub fn record(&self) -> &MetricList {
        &self.record
    }
}

/// The records of one input block, ready for the buffer.
///
/// Their bytes are written into one exactly sized allocation per (topic,
/// key), so that a batch, which holds the records of one topic and key,
/// never keeps another topic's bytes alive while it waits. A block usually
/// has one topic, and so one allocation.
#[derive(Debug)]
pub struct Records {
    /// The records, in the block's order.
    pub items: Vec<Routed>,
    /// Heap their bytes take, in the allocator's size classes.
    pub heap: usize,
    /// Holds the records' shares against the buffer's bound.
    pub lease: Lease,
}

impl Records {
    /// The bytes of the bound the records hold.
    pub fn bytes(&self) -> usize {
        self.lease.bytes()
    }

    /// Datapoints in the records.
    pub fn datapoints(&self) -> u64 {
        self.items.iter().map(|r| u64::from(r.datapoints)).sum()
    }
}

/// Heap a record's bookkeeping takes wherever it waits (its [`Routed`]).
pub const RECORD_OVERHEAD: usize = std::mem::size_of::<Routed>();

impl Default for Records {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            heap: 0,
            lease: Lease::detached(),
        }
    }
}

/// One record's plan for [`write_grouped`].
struct Planned<R> {
    topic: Arc<str>,
    key: Option<Arc<str>>,
    len: usize,
    datapoints: u32,
    record: R,
}

/// Beyond this many (topic, key) groups in a block, groups are found by
/// hashing rather than by a scan.
const SCANNED_GROUPS: usize = 16;

/// Writes each planned record (`write` appends exactly `len` bytes) into
/// its (topic, key) group's allocation and hands it its slice. What the
/// allocations take (their size classes, and each record's bookkeeping) is
/// split off `lease` into the records' lease, and shared out over the
/// records (see [`Routed::share`]).
fn write_grouped<R>(
    plans: Vec<Planned<R>>,
    lease: &mut Lease,
    mut write: impl FnMut(R, &mut Vec<u8>),
) -> Records {
    let (group_of, sizes) = groups(&plans);
    let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut items = Vec::with_capacity(plans.len());
    let mut spans = Vec::with_capacity(plans.len());
    // The last record of each group also carries its allocation's rounding.
    let mut last_of = vec![0usize; sizes.len()];
    for (i, p) in plans.into_iter().enumerate() {
        let g = group_of.get(i).copied().unwrap_or(0);
        let buf = &mut bufs[g];
        let start = buf.len();
        write(p.record, buf);
        debug_assert_eq!(buf.len() - start, p.len);
        spans.push((g, start..buf.len()));
        last_of[g] = i;
        items.push(Routed {
            topic: p.topic,
            key: p.key,
            data: Bytes::new(),
            datapoints: p.datapoints,
            share: share(p.len + RECORD_OVERHEAD),
            seq: 0,
        });
    }
    let frozen: Vec<Bytes> = bufs.into_iter().map(Bytes::from).collect();
    for (item, (g, span)) in items.iter_mut().zip(spans) {
        item.data = frozen[g].slice(span);
    }
    for (&size, &last) in sizes.iter().zip(&last_of) {
        if let Some(item) = items.get_mut(last) {
            item.share = item
                .share
                .saturating_add(share(allocated_size(size) - size));
        }
    }
    let heap = sizes.iter().map(|&n| allocated_size(n)).sum();
    let total = items.iter().map(|r| r.share as usize).sum();
    Records {
        items,
        heap,
        lease: lease.split(total),
    }
}

fn share(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// The (topic, key) group of each record, and each group's size. The group
/// list is empty when the block has a single group, the usual case.
fn groups<R>(plans: &[Planned<R>]) -> (Vec<usize>, Vec<usize>) {
    type Group = (Arc<str>, Option<Arc<str>>);
    let same = |(topic, key): &Group, p: &Planned<R>| {
        (Arc::ptr_eq(topic, &p.topic) || *topic == p.topic)
            && match (key, &p.key) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                _ => false,
            }
    };
    let Some(first) = plans.first() else {
        return (Vec::new(), Vec::new());
    };
    let mut groups: Vec<Group> = vec![(first.topic.clone(), first.key.clone())];
    if plans[1..].iter().all(|p| same(&groups[0], p)) {
        return (Vec::new(), vec![plans.iter().map(|p| p.len).sum()]);
    }
    let mut index: HashMap<Group, usize> = HashMap::new();
    let mut sizes = vec![0];
    let mut group_of: Vec<usize> = Vec::with_capacity(plans.len());
    for p in plans {
        let g = match group_of.last() {
            Some(&g) if same(&groups[g], p) => g,
            _ => {
                let found = if groups.len() <= SCANNED_GROUPS {
                    groups.iter().position(|group| same(group, p))
                } else {
                    if index.is_empty() {
                        index = groups.iter().cloned().zip(0..).collect();
                    }
                    index.get(&(p.topic.clone(), p.key.clone())).copied()
                };
                found.unwrap_or_else(|| {
                    let group = (p.topic.clone(), p.key.clone());
                    if !index.is_empty() {
                        index.insert(group.clone(), groups.len());
                    }
                    groups.push(group);
                    sizes.push(0);
                    groups.len() - 1
                })
            }
        };
        sizes[g] += p.len;
        group_of.push(g);
    }
    (group_of, sizes)
}

/// Encodes prepared records, one exactly sized allocation per (topic, key)
/// (see [`Records`]), counted by `lease`.
pub fn encode_all(prepared: Vec<Prepared>, lease: &mut Lease) -> Records {
    let plans = prepared
        .into_iter()
        .map(|p| Planned {
            topic: p.topic,
            key: p.key,
            len: p.encoded_len,
            datapoints: p.record.datapoints.len() as u32,
            record: p.record,
        })
        .collect();
    write_grouped(plans, lease, |record, out| {
        schema::datum::write_metric_list(out, &record);
    })
}

/// The most tags enrichment adds to one record: the agent's, the
/// framework's and the application's, then its container's six metadata
/// tags and at most `enrich::MAX_LABELS` labels (a test holds
/// `enrich` to it).
pub const MAX_ENRICHMENT_TAGS: usize = 3 + 6 + 32;

/// The enrichment tags of one record, borrowed: at most three of the
/// agent and framework, then those of its container.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExtraTags<'a> {
    tags: [(&'a str, &'a str); 3],
    len: usize,
    container: &'a [(String, String)],
}

impl<'a> ExtraTags<'a> {
    /// Adds a tag; more than three are ignored (there are never more).
    pub fn push(&mut self, key: &'a str, value: &'a str) {
        if let Some(slot) = self.tags.get_mut(self.len) {
            *slot = (key, value);
            self.len += 1;
        }
    }

    /// Adds the tags of the record's container, after the others.
    pub fn extend(&mut self, container: &'a [(String, String)]) {
        self.container = container;
    }

    /// The tags, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        let container = self.container;
        self.tags
            .into_iter()
            .take(self.len)
            .chain(container.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// A block's records routed by [`Router::route_block`].
#[derive(Debug, Default)]
pub struct RoutedBlock {
    /// The records.
    pub records: Records,
    /// How many had their topic sanitized.
    pub sanitized: u64,
}

/// What a block is known to take before it is decoded: enough to reserve
/// its memory (see [`Routing::block_estimate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCost {
    /// Records in the block.
    pub records: u64,
    /// Bytes of its records, decompressed.
    pub data_len: usize,
    /// Whether those bytes are a decompressed copy (not the input's own).
    pub decompressed: bool,
    /// Whether its records are decoded into owned values (another schema)
    /// rather than read in place.
    pub decoded: bool,
}

/// Heap one record takes while its block is routed, besides its bytes: its
/// in-place view, its plan, its slice and its place in the output (checked
/// against the types' sizes by a test).
const ROUTING_PER_RECORD: usize = 512;

/// Heap records decoded into owned values take, per byte of their data: a
/// tag of two empty strings is 2 bytes on the wire and 48 in memory.
const DECODED_PER_BYTE: usize = 32;

/// Bytes a spliced tag takes: its key and value, each with its length.
fn tag_len(key: &str, value: &str) -> usize {
    key.len() + value.len() + 2 * 5
}

impl Routing {
    /// The most bytes routing adds to one record: the static tags and the
    /// enrichment tags (at most `enrichment_len` bytes, see
    /// `Enrichment::max_extra_len`), plus a rewritten array count.
    pub fn max_extra_len(&self, enrichment_len: usize) -> usize {
        self.static_tags
            .iter()
            .map(|t| tag_len(&t.key, &t.value))
            .sum::<usize>()
            + enrichment_len
            + 2 * 10
    }

    /// An upper bound on the heap decoding and routing a block takes, at its
    /// peak, to be reserved in the buffer before it is decoded: the
    /// decompressed copy, the records' views or decoded values, and what
    /// routing writes (each allocation in its size class, each record's
    /// bookkeeping).
    pub fn block_estimate(&self, cost: BlockCost, enrichment_len: usize) -> usize {
        let records = usize::try_from(cost.records).unwrap_or(usize::MAX);
        // Re-encoded records of another schema may grow; read in place, a
        // record only gains its tags.
        let own = if cost.decoded {
            cost.data_len.saturating_mul(2)
        } else {
            cost.data_len
        };
        let written =
            own.saturating_add(records.saturating_mul(self.max_extra_len(enrichment_len)));
        let allocations = written
            .saturating_add(written / 4)
            .saturating_add(records.saturating_mul(8));
        // Each tag spliced in takes at least 10 of `enrichment_len`'s
        // bytes, and there are never more than MAX_ENRICHMENT_TAGS.
        let enrichment_tags = (enrichment_len / 10).min(MAX_ENRICHMENT_TAGS);
        let per_record = RECORD_OVERHEAD
            + ROUTING_PER_RECORD
            + (self.static_tags.len() + enrichment_tags) * std::mem::size_of::<(&str, &str)>();
        let mut total = allocations.saturating_add(records.saturating_mul(per_record));
        if cost.decompressed {
            total = total.saturating_add(cost.data_len);
        }
        if cost.decoded {
            total = total.saturating_add(cost.data_len.saturating_mul(DECODED_PER_BYTE));
        }
        total
    }

    /// The heap `records`, decoded already, take once routed (for inputs
    /// that hold owned records, such as the agent poller): their encoded
    /// bytes with the tags they may gain, in size classes, and bookkeeping.
    pub fn records_estimate(&self, records: &[MetricList], enrichment_len: usize) -> usize {
        let extra = self.max_extra_len(enrichment_len);
        let written: usize = records
            .iter()
            .map(|r| schema::datum::encoded_len(r) + extra)
            .sum();
        written + written / 4 + records.len() * (8 + RECORD_OVERHEAD)
    }
}

/// A valid Kafka topic for `name`: characters outside `[A-Za-z0-9._-]`
/// become `_`, and it is cut to 249 bytes. Returns whether it changed.
pub fn sanitize_topic(name: &str) -> (String, bool) {
    if is_valid_topic(name) {
        return (name.to_owned(), false);
    }
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(249);
    if out.is_empty() || out == "." || out == ".." {
        out = "UNKNOWN_TOPIC_VAL".into();
    }
    (out, true)
}

/// Routes records for one input connection, caching topic names.
#[derive(Debug, Default)]
pub struct Router {
    topics: HashMap<String, (Arc<str>, bool)>,
    keys: HashMap<String, Arc<str>>,
    for_routing: Option<Routing>,
}

impl Router {
    /// Adds the static tags and `extra` tags the record lacks, picks its topic
    /// and key, and encodes it. Returns the routed record and whether its
    /// topic had to be sanitized.
    pub fn route(
        &mut self,
        routing: &Routing,
        extra: &[Tag],
        record: MetricList,
    ) -> (Routed, bool) {
        let (prepared, sanitized) = self.prepare(routing, extra, record);
        let routed = encode_all(vec![prepared], &mut Lease::detached())
            .items
            .pop()
            .expect("one in, one out");
        (routed, sanitized)
    }

    /// [`route`](Self::route) without the encoding, so that a block's records
    /// can be encoded together by [`encode_all`].
    pub fn prepare(
        &mut self,
        routing: &Routing,
        extra: &[Tag],
        mut record: MetricList,
    ) -> (Prepared, bool) {
        self.follow(routing);
        for tag in routing.static_tags.iter().chain(extra) {
            record.add_tag_if_absent(&tag.key, &tag.value);
        }
        let (topic, sanitized) = self.record_topic(routing, &record.topic);
        let key = routing
            .key_tag
            .as_deref()
            .and_then(|tag| record.tag(tag))
            .map(|value| self.key(value));
        let encoded_len = schema::datum::encoded_len(&record);
        (
            Prepared {
                topic,
                key,
                record,
                encoded_len,
            },
            sanitized,
        )
    }

    /// Routes a block of records read in place: adds the static tags and
    /// `extra(record)`'s tags each record lacks, by splicing its bytes (see
    /// `schema::raw`), picks topics and keys, and writes the records (see
    /// [`Records`]). Nothing is decoded into owned strings. `observe` is
    /// shown each record with the tags added to it, in order.
    pub fn route_block<'a>(
        &mut self,
        routing: &'a Routing,
        records: &[RawRecord<'a>],
        lease: &mut Lease,
        mut extra: impl FnMut(&RawRecord<'a>) -> ExtraTags<'a>,
        mut observe: impl FnMut(&RawRecord<'a>, &[(&'a str, &'a str)]),
    ) -> RoutedBlock {
        self.follow(routing);
        // Pass 1: what each record gets, and its size.
        let mut adds: Vec<(&'a str, &'a str)> = Vec::new();
        let mut plans = Vec::with_capacity(records.len());
        let mut sanitized_count = 0;
        for record in records {
            let start = adds.len();
            let statics = routing
                .static_tags
                .iter()
                .map(|t| (t.key.as_str(), t.value.as_str()));
            let enrichment = extra(record);
            for (key, value) in statics.chain(enrichment.iter()) {
                if record.tag(key).is_none() && !adds[start..].iter().any(|(k, _)| *k == key) {
                    adds.push((key, value));
                }
            }
            let mine = &adds[start..];
            observe(record, mine);
            let (topic, sanitized) = self.record_topic(routing, record.topic());
            sanitized_count += u64::from(sanitized);
            let key = routing.key_tag.as_deref().and_then(|tag| {
                record
                    .tag(tag)
                    .or_else(|| mine.iter().find(|(k, _)| *k == tag).map(|(_, v)| *v))
            });
            let key = key.map(|value| self.key(value));
            let len = record.encoded_len_with(mine);
            plans.push((topic, key, len, start..adds.len()));
        }
        // Pass 2: the bytes, one allocation per (topic, key).
        let plans = plans
            .into_iter()
            .zip(records)
            .map(|((topic, key, len, range), record)| Planned {
                topic,
                key,
                len,
                datapoints: record.datapoints(),
                record: (record, range),
            })
            .collect();
        let records = write_grouped(plans, lease, |(record, range), out| {
            record.write_with_tags(&adds[range], out);
        });
        RoutedBlock {
            records,
            sanitized: sanitized_count,
        }
    }

    /// Starts using `routing`; cached topic names are dropped when the
    /// settings changed.
    fn follow(&mut self, routing: &Routing) {
        if self.for_routing.as_ref() != Some(routing) {
            self.topics.clear();
            self.for_routing = Some(routing.clone());
        }
    }

    /// The topic of a record whose `topic` field is `name`.
    fn record_topic(&mut self, routing: &Routing, name: &str) -> (Arc<str>, bool) {
        match &routing.single_topic {
            Some(single) => self.topic(single, ""),
            None => self.topic(&routing.prefix, name),
        }
    }

    fn key(&mut self, value: &str) -> Arc<str> {
        if let Some(key) = self.keys.get(value) {
            return key.clone();
        }
        let key: Arc<str> = Arc::from(value);
        if self.keys.len() < 10_000 {
            self.keys.insert(value.to_owned(), key.clone());
        }
        key
    }

    fn topic(&mut self, prefix: &str, name: &str) -> (Arc<str>, bool) {
        if let Some((topic, sanitized)) = self.topics.get(name) {
            return (topic.clone(), *sanitized);
        }
        let (full, sanitized) = sanitize_topic(&format!("{prefix}{name}"));
        let topic: Arc<str> = Arc::from(full);
        // Bound the cache: a sender inventing topics can't grow it forever.
        if self.topics.len() < 10_000 {
            self.topics
                .insert(name.to_owned(), (topic.clone(), sanitized));
        }
        (topic, sanitized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::Datapoint;

    fn routing() -> Routing {
        Routing {
            prefix: "metrics-".into(),
            single_topic: None,
            static_tags: vec![Tag::new("dc", "eu"), Tag::new("framework_id", "static")],
            key_tag: Some("framework_id".into()),
        }
    }

    fn record(topic: &str) -> MetricList {
        MetricList {
            topic: topic.into(),
            tags: vec![Tag::new("framework_id", "fw-1")],
            datapoints: vec![Datapoint::new("d", 1, 2.0)],
        }
    }

    #[test]
    fn prefix_static_tags_and_key() {
        let (routed, sanitized) = Router::default().route(&routing(), &[], record("fw-1"));
        assert!(!sanitized);
        assert_eq!(&*routed.topic, "metrics-fw-1");
        assert_eq!(routed.key.as_deref(), Some("fw-1"));
        let back =
            schema::datum::read_metric_list(&mut schema::datum::Cursor::new(&routed.data)).unwrap();
        // The record's own framework_id wins over the static one.
        assert_eq!(
            back.tags,
            vec![Tag::new("framework_id", "fw-1"), Tag::new("dc", "eu")]
        );
        assert_eq!(
            back.topic, "fw-1",
            "the record's topic field is kept as sent"
        );
    }

    /// Start address of a record's bytes.
    fn addr(r: &Routed) -> usize {
        r.data.as_ptr() as usize
    }

    #[test]
    fn a_block_is_written_into_one_allocation_per_topic_and_key() {
        let mut router = Router::default();
        let topics = ["a", "b", "a", "c", "b", "a"];
        let prepared: Vec<Prepared> = topics
            .iter()
            .map(|t| router.prepare(&routing(), &[], record(t)).0)
            .collect();
        let records = encode_all(prepared, &mut Lease::detached());
        assert_eq!(records.items.len(), topics.len());
        for (r, topic) in records.items.iter().zip(topics) {
            assert_eq!(&*r.topic, format!("metrics-{topic}"));
            assert_eq!(
                r.data,
                Router::default()
                    .route(&routing(), &[], record(topic))
                    .0
                    .data
            );
        }
        // Each topic's records are adjacent slices of their own buffer, in
        // the block's order.
        let items = &records.items;
        for (first, next) in [(0, 2), (2, 5), (1, 4)] {
            assert_eq!(
                addr(&items[next]),
                addr(&items[first]) + items[first].data.len()
            );
        }
        let len = items[0].data.len();
        assert_eq!(
            records.heap,
            allocated_size(3 * len) + allocated_size(2 * len) + allocated_size(len)
        );
    }

    #[test]
    fn an_empty_block_takes_nothing() {
        let records = encode_all(Vec::new(), &mut Lease::detached());
        assert!(records.items.is_empty());
        assert_eq!(records.heap, 0);
    }

    #[test]
    fn many_topics_in_a_block_are_grouped_too() {
        // More groups than are found by a scan: found by hashing.
        let mut router = Router::default();
        let topics: Vec<String> = (0..2 * (SCANNED_GROUPS + 10))
            .map(|i| format!("t{:02}", i % (SCANNED_GROUPS + 10)))
            .collect();
        let prepared: Vec<Prepared> = topics
            .iter()
            .map(|t| router.prepare(&routing(), &[], record(t)).0)
            .collect();
        let records = encode_all(prepared, &mut Lease::detached());
        let half = SCANNED_GROUPS + 10;
        let items = &records.items;
        for i in 0..half {
            assert_eq!(items[i].topic, items[i + half].topic);
            assert_eq!(
                addr(&items[i + half]),
                addr(&items[i]) + items[i].data.len(),
                "{}",
                items[i].topic
            );
        }
        let len = items[0].data.len();
        assert!(items.iter().all(|r| r.data.len() == len));
        assert_eq!(records.heap, half * allocated_size(2 * len));
    }

    #[test]
    fn records_of_one_topic_with_different_keys_are_apart() {
        let mut router = Router::default();
        let prepared: Vec<Prepared> = ["k1", "k2", "k1"]
            .iter()
            .map(|k| {
                let r = MetricList {
                    tags: vec![Tag::new("framework_id", *k)],
                    ..record("same")
                };
                router.prepare(&routing(), &[], r).0
            })
            .collect();
        let records = encode_all(prepared, &mut Lease::detached());
        let items = &records.items;
        assert!(items.iter().all(|r| &*r.topic == "metrics-same"));
        assert_eq!(addr(&items[2]), addr(&items[0]) + items[0].data.len());
        let len = items[0].data.len();
        assert_eq!(records.heap, allocated_size(2 * len) + allocated_size(len));
    }

    #[test]
    fn a_block_read_in_place_routes_exactly_as_a_decoded_one() {
        let records = vec![
            record("fw-1"),
            MetricList {
                tags: vec![],
                ..record("a b")
            },
            MetricList {
                tags: vec![Tag::new("dc", "us"), Tag::new("framework_id", "fw-2")],
                ..record("fw-2")
            },
        ];
        let mut bytes = Vec::new();
        for r in &records {
            schema::datum::write_metric_list(&mut bytes, r);
        }
        let mut cursor = schema::datum::Cursor::new(&bytes);
        let raw: Vec<_> = (0..records.len())
            .map(|_| schema::raw::scan_metric_list(&mut cursor).unwrap())
            .collect();
        let routing = routing();
        let extra = |record: &RawRecord<'_>| {
            let mut extra = ExtraTags::default();
            extra.push("agent_id", "agent-1");
            if record.topic() == "a b" {
                // Static tags come first: this framework_id is not added.
                extra.push("framework_id", "from-state");
            }
            extra
        };
        // What the store is shown of each record: its tags and the tags
        // added, exactly the routed record's tags.
        let mut observed = Vec::new();
        let block = Router::default().route_block(
            &routing,
            &raw,
            &mut Lease::detached(),
            extra,
            |r, added| {
                observed.push(
                    r.tags()
                        .chain(added.iter().copied())
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect::<Vec<_>>(),
                );
            },
        );
        let mut router = Router::default();
        let mut sanitized = 0;
        let mut prepared = Vec::new();
        for (r, raw) in records.iter().zip(&raw) {
            let tags: Vec<Tag> = extra(raw).iter().map(|(k, v)| Tag::new(k, v)).collect();
            let (p, s) = router.prepare(&routing, &tags, r.clone());
            sanitized += u64::from(s);
            prepared.push(p);
        }
        let expected = encode_all(prepared, &mut Lease::detached());
        assert_eq!(block.records.items, expected.items);
        assert_eq!(block.records.heap, expected.heap);
        assert_eq!(block.sanitized, sanitized);
        assert_eq!(sanitized, 1);
        // The static framework_id came first for the tag-less record.
        assert_eq!(block.records.items[1].key.as_deref(), Some("static"));
        assert_eq!(block.records.items[2].key.as_deref(), Some("fw-2"));
        let routed_tags: Vec<Vec<(String, String)>> = block
            .records
            .items
            .iter()
            .map(|r| {
                let record =
                    schema::datum::read_metric_list(&mut schema::datum::Cursor::new(&r.data))
                        .unwrap();
                record.tags.into_iter().map(|t| (t.key, t.value)).collect()
            })
            .collect();
        assert_eq!(observed, routed_tags);
    }

    #[test]
    fn single_topic_wins() {
        let routing = Routing {
            single_topic: Some("all".into()),
            ..routing()
        };
        assert_eq!(
            &*Router::default().route(&routing, &[], record("x")).0.topic,
            "all"
        );
    }

    #[test]
    fn bad_topics_are_sanitized_not_dropped() {
        let (routed, sanitized) = Router::default().route(&routing(), &[], record("a b/ü"));
        assert!(sanitized);
        assert_eq!(&*routed.topic, "metrics-a_b__");
        let long = "x".repeat(400);
        assert_eq!(sanitize_topic(&long).0.len(), 249);
        assert_eq!(sanitize_topic("..").0, "UNKNOWN_TOPIC_VAL");
    }

    #[test]
    fn the_routing_transient_per_record_covers_its_types() {
        use std::mem::size_of;
        let planned = size_of::<Planned<(&RawRecord<'_>, std::ops::Range<usize>)>>()
            .max(size_of::<Planned<MetricList>>())
            .max(size_of::<(
                Arc<str>,
                Option<Arc<str>>,
                usize,
                std::ops::Range<usize>,
            )>());
        let per_record = size_of::<RawRecord<'_>>()
            + 2 * planned
            + size_of::<usize>()
            + size_of::<(usize, std::ops::Range<usize>)>()
            + size_of::<Routed>();
        assert!(
            per_record <= ROUTING_PER_RECORD,
            "{per_record} > {ROUTING_PER_RECORD}"
        );
    }

    #[test]
    fn a_block_never_takes_more_than_its_estimate() {
        let budget = crate::memory::Budget::new(usize::MAX / 2, None);
        let routing = routing();
        for records in [1usize, 7, 300] {
            let lists: Vec<MetricList> = (0..records)
                .map(|i| MetricList {
                    tags: vec![],
                    ..record(&format!("t{}", i % 5))
                })
                .collect();
            let mut bytes = Vec::new();
            for r in &lists {
                schema::datum::write_metric_list(&mut bytes, r);
            }
            let mut cursor = schema::datum::Cursor::new(&bytes);
            let raw: Vec<_> = (0..records)
                .map(|_| schema::raw::scan_metric_list(&mut cursor).unwrap())
                .collect();
            let enrichment = ("agent_id", "a".repeat(40));
            let cost = BlockCost {
                records: records as u64,
                data_len: bytes.len(),
                decompressed: false,
                decoded: false,
            };
            let estimate = routing.block_estimate(cost, tag_len(enrichment.0, &enrichment.1));
            let mut lease = budget.try_acquire(estimate).unwrap();
            let block = Router::default().route_block(
                &routing,
                &raw,
                &mut lease,
                |_| {
                    let mut extra = ExtraTags::default();
                    extra.push(enrichment.0, &enrichment.1);
                    extra
                },
                |_, _| {},
            );
            assert!(
                lease.bytes() > 0,
                "{records}: the estimate had room to spare"
            );
            drop(lease);
            assert!(
                budget.used() >= block.records.heap,
                "the allocations hold their leases"
            );
            let estimate = routing.records_estimate(&lists, tag_len(enrichment.0, &enrichment.1));
            let mut lease = budget.try_acquire(estimate).unwrap();
            let before = budget.used();
            let prepared: Vec<Prepared> = lists
                .iter()
                .map(|l| {
                    Router::default()
                        .prepare(
                            &routing,
                            &[Tag::new(enrichment.0, &enrichment.1)],
                            l.clone(),
                        )
                        .0
                })
                .collect();
            let encoded = encode_all(prepared, &mut lease);
            assert_eq!(
                budget.used(),
                before,
                "{records}: nothing beyond the estimate"
            );
            drop((block, encoded, lease));
            assert_eq!(budget.used(), 0);
        }
    }
}
