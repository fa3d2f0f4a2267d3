//! Per-topic batching. Each flushed batch becomes one Kafka message: a whole
//! OCF file (header, one block, sync), as in the original. Batches are cut so
//! that no message is larger than the Kafka message limit; a record that
//! can't fit alone is refused, to be dropped and counted by the caller.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use schema::{Codec, OcfEncoder};
use tokio::time::Instant;

use crate::memory::Lease;
use crate::route::{Routed, Spooled};

/// One Kafka message ready to produce.
#[derive(Debug)]
pub struct Message {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition key.
    pub key: Option<Arc<str>>,
    /// The OCF file.
    pub payload: Vec<u8>,
    /// Holds its records' shares of the buffer's bound until librdkafka has
    /// taken it.
    pub lease: Lease,
    /// Records in it.
    pub records: u32,
    /// Datapoints in it.
    pub datapoints: u64,
    /// When its oldest record was batched.
    pub created: Instant,
    /// How many times it has been produced before.
    pub attempts: u32,
    /// A failed message is produced again no earlier than this.
    pub not_before: Option<Instant>,
    /// Its records read from the disk spool, to report on.
    pub spooled: Spooled,
}

/// A record that can't fit in any message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a record of {size} bytes for topic {topic} can't fit in a {limit}-byte Kafka message")]
pub struct TooLarge {
    /// Topic.
    pub topic: Arc<str>,
    /// The record's encoded size.
    pub size: usize,
    /// The message limit.
    pub limit: usize,
    /// Datapoints in the record.
    pub datapoints: u32,
    /// Its spool sequence number (0: not spooled).
    pub seq: u64,
}

/// Flush thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Flush at this many records.
    pub max_records: usize,
    /// Flush at this many bytes of records.
    pub max_bytes: usize,
    /// Flush when the oldest record is this old.
    pub max_age: Duration,
    /// No message may be larger than this.
    pub max_message_bytes: usize,
}

impl From<&crate::config::Config> for Thresholds {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            max_records: config.kafka_produce_count,
            max_bytes: config.kafka_produce_kbytes * 1024,
            max_age: Duration::from_millis(config.kafka_produce_period_ms),
            max_message_bytes: config.kafka_max_message_bytes,
        }
    }
}

/// A batch in the making: the records' slices (of their input blocks'
/// allocations), copied once, into the message, when it is flushed.
#[derive(Debug)]
struct Pending {
    parts: Vec<Bytes>,
    bytes: usize,
    /// Its records' shares (see `Routed::share`).
    leased: usize,
    records: u32,
    datapoints: u64,
    since: Instant,
    spooled: Spooled,
}

/// Topic, key, and whether the records came from the disk spool: a batch
/// never mixes records with sequence numbers and records without, so that a
/// message handed back can be taken apart again record by record
/// ([`unbatch`]).
type BatchKey = (Arc<str>, Option<Arc<str>>, bool);

impl Pending {
    fn new(since: Instant) -> Self {
        Self {
            parts: Vec::new(),
            bytes: 0,
            leased: 0,
            records: 0,
            datapoints: 0,
            since,
            spooled: Spooled::default(),
        }
    }
}

/// Batches routed records per (topic, key).
#[derive(Debug)]
pub struct Batcher {
    thresholds: Thresholds,
    /// Writes every message's OCF file (null codec, one sync marker).
    encoder: OcfEncoder,
    pending: HashMap<BatchKey, Pending>,
    /// Holds the shares of every batched record, until its message takes
    /// them.
    held: Lease,
}

impl Batcher {
    /// A batcher writing null-codec OCF files with one random sync marker.
    pub fn new(thresholds: Thresholds) -> Self {
        Self::with_encoder(thresholds, OcfEncoder::new(Codec::Null))
    }

    /// A batcher whose files `encoder` writes.
    pub fn with_encoder(thresholds: Thresholds, encoder: OcfEncoder) -> Self {
        Self {
            thresholds,
            encoder,
            pending: HashMap::new(),
            held: Lease::detached(),
        }
    }

    /// Takes over the lease of records about to be added.
    pub fn hold(&mut self, lease: Lease) {
        self.held.merge(lease);
    }

    /// Changes the thresholds (a runtime setting); takes effect from the next record.
    pub fn set_thresholds(&mut self, thresholds: Thresholds) {
        self.thresholds = thresholds;
    }

    /// Bytes a message adds around its records.
    pub fn overhead(&self) -> usize {
        self.encoder.file_overhead()
    }

    /// Adds a record; full batches are appended to `out`.
    pub fn add(
        &mut self,
        item: Routed,
        now: Instant,
        out: &mut Vec<Message>,
    ) -> Result<(), TooLarge> {
        let limit = self.thresholds.max_message_bytes;
        let overhead = self.overhead();
        if item.data.len() + overhead > limit {
            // Its share goes back: it is dropped.
            drop(self.held.split(item.share as usize));
            return Err(TooLarge {
                topic: item.topic,
                size: item.data.len(),
                limit,
                datapoints: item.datapoints,
                seq: item.seq,
            });
        }
        let (seq, datapoints) = (item.seq, item.datapoints);
        let fits = |pending: &Pending| pending.bytes + item.data.len() + overhead <= limit;
        // One lookup a record: its batch, a new one, or (when the record
        // would take it past the message limit) its message out first.
        let mut entry = match self.pending.entry((item.topic, item.key, seq != 0)) {
            Entry::Occupied(entry) if !fits(entry.get()) => {
                let (key, full) = entry.remove_entry();
                out.push(message(&self.encoder, &mut self.held, key.clone(), full));
                self.pending.entry(key).insert_entry(Pending::new(now))
            }
            Entry::Occupied(entry) => entry,
            Entry::Vacant(entry) => entry.insert_entry(Pending::new(now)),
        };
        let pending = entry.get_mut();
        pending.bytes += item.data.len();
        pending.leased += item.share as usize;
        pending.spooled.add(seq, datapoints);
        pending.parts.push(item.data);
        pending.records += 1;
        pending.datapoints += u64::from(item.datapoints);
        if pending.records as usize >= self.thresholds.max_records
            || pending.bytes >= self.thresholds.max_bytes
        {
            let (key, pending) = entry.remove_entry();
            out.push(message(&self.encoder, &mut self.held, key, pending));
        }
        Ok(())
    }

    /// Flushes the batches whose oldest record is at least `max_age` old.
    pub fn flush_due(&mut self, now: Instant, out: &mut Vec<Message>) {
        let max_age = self.thresholds.max_age;
        let due: Vec<BatchKey> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) >= max_age)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(pending) = self.pending.remove(&key) {
                out.push(message(&self.encoder, &mut self.held, key, pending));
            }
        }
    }

    /// Flushes everything.
    pub fn flush_all(&mut self, out: &mut Vec<Message>) {
        for (key, pending) in std::mem::take(&mut self.pending) {
            out.push(message(&self.encoder, &mut self.held, key, pending));
        }
    }

    /// When the next batch falls due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| p.since + self.thresholds.max_age)
            .min()
    }

    /// Records and datapoints waiting in batches.
    pub fn pending(&self) -> (u64, u64) {
        self.pending.values().fold((0, 0), |(r, d), p| {
            (r + u64::from(p.records), d + p.datapoints)
        })
    }

    /// Whether nothing is batched.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes back the share of a record that is not added (it waits for
    /// its topic instead): it goes with the record.
    pub fn release(&mut self, share: u32) -> Lease {
        self.held.split(share as usize)
    }
}

/// The message of a batch: its OCF file, written by `encoder`, and its
/// records' shares, taken from `held`.
fn message(
    encoder: &OcfEncoder,
    held: &mut Lease,
    (topic, key, _): BatchKey,
    pending: Pending,
) -> Message {
    let payload = encoder.file_from_parts(pending.records as usize, &pending.parts);
    let lease = held.split(pending.leased);
    Message {
        topic,
        key,
        payload,
        lease,
        records: pending.records,
        datapoints: pending.datapoints,
        created: pending.since,
        attempts: 0,
        not_before: None,
        spooled: pending.spooled,
    }
}

/// Takes a message apart into its records again, each with its sequence
/// number (when its records came from the disk spool) and a part of the
/// message's lease; `None` when its payload is not a file the batcher
/// writes (it never is).
pub fn unbatch(message: Message) -> Option<Vec<(Routed, Lease)>> {
    let Message {
        topic,
        key,
        payload,
        mut lease,
        records,
        spooled,
        ..
    } = message;
    let payload = Bytes::from(payload);
    let mut decoder = schema::StreamDecoder::new(schema::Limits {
        max_block_bytes: payload.len(),
        max_decompressed_block_bytes: payload.len(),
        ..schema::Limits::default()
    });
    let mut out = Vec::with_capacity(records as usize);
    let mut at = 0;
    while at < payload.len() {
        let (used, block) = decoder.decode_view(&payload[at..]).ok()?;
        let base = at;
        at += used;
        let Some(schema::ocf::BlockView::Raw(block)) = block else {
            if used == 0 {
                return None;
            }
            continue;
        };
        for record in block.records {
            let bytes = record.bytes();
            let start = bytes.as_ptr() as usize - payload[base..].as_ptr() as usize + base;
            out.push(Routed {
                topic: topic.clone(),
                key: key.clone(),
                data: payload.slice(start..start + bytes.len()),
                datapoints: record.datapoints(),
                share: u32::try_from(bytes.len() + crate::route::RECORD_OVERHEAD)
                    .unwrap_or(u32::MAX),
                seq: 0,
            });
        }
    }
    if out.len() != records as usize
        || !(spooled.seqs.is_empty() || spooled.seqs.len() == out.len())
    {
        return None;
    }
    for (record, &seq) in out.iter_mut().zip(&spooled.seqs) {
        record.seq = seq;
    }
    Some(
        out.into_iter()
            .map(|record| {
                let share = lease.split(record.share as usize);
                (record, share)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Datapoint, MetricList};

    fn routed(topic: &str, points: usize) -> Routed {
        let record = MetricList {
            topic: topic.into(),
            tags: vec![],
            datapoints: (0..points)
                .map(|i| Datapoint::new("d", i as i64, 1.0))
                .collect(),
        };
        let mut data = Vec::new();
        schema::datum::write_metric_list(&mut data, &record);
        Routed {
            topic: topic.into(),
            key: None,
            share: data.len() as u32,
            data: data.into(),
            datapoints: points as u32,
            seq: 0,
        }
    }

    fn thresholds() -> Thresholds {
        Thresholds {
            max_records: 3,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(1),
            max_message_bytes: 4096,
        }
    }

    #[test]
    fn flushes_at_the_record_count_as_one_ocf_file() {
        let mut batcher = Batcher::new(thresholds());
        let mut out = Vec::new();
        let now = Instant::now();
        for _ in 0..4 {
            batcher.add(routed("a", 2), now, &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].records, 3);
        assert_eq!(out[0].datapoints, 6);
        let records = schema::decode_all(&out[0].payload, schema::Limits::default()).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(batcher.pending(), (1, 2));
    }

    #[test]
    fn a_message_is_the_file_our_encoder_writes_exactly_sized() {
        let sync = [7u8; 16];
        let mut batcher =
            Batcher::with_encoder(thresholds(), OcfEncoder::with_sync(Codec::Null, sync));
        let mut out = Vec::new();
        let now = Instant::now();
        batcher.add(routed("a", 2), now, &mut out).unwrap();
        batcher.add(routed("a", 200), now, &mut out).unwrap();
        batcher.flush_all(&mut out);
        let records = schema::decode_all(&out[0].payload, schema::Limits::default()).unwrap();
        let expected = OcfEncoder::with_sync(Codec::Null, sync).file(&records);
        assert_eq!(out[0].payload, expected);
        assert_eq!(out[0].payload.capacity(), out[0].payload.len());
    }

    #[test]
    fn messages_never_exceed_the_limit() {
        let mut batcher = Batcher::new(Thresholds {
            max_records: 1000,
            ..thresholds()
        });
        let mut out = Vec::new();
        let now = Instant::now();
        for _ in 0..100 {
            batcher.add(routed("a", 10), now, &mut out).unwrap();
        }
        batcher.flush_all(&mut out);
        assert!(out.len() > 1);
        assert!(
            out.iter().all(|m| m.payload.len() <= 4096),
            "{:?}",
            out.iter().map(|m| m.payload.len()).collect::<Vec<_>>()
        );
        assert_eq!(out.iter().map(|m| m.records).sum::<u32>(), 100);
    }

    #[test]
    fn a_record_too_large_alone_is_refused() {
        let mut batcher = Batcher::new(thresholds());
        let err = batcher
            .add(routed("big", 400), Instant::now(), &mut Vec::new())
            .unwrap_err();
        assert_eq!(&*err.topic, "big");
        assert_eq!(err.datapoints, 400);
        assert!(batcher.is_empty());
    }

    #[test]
    fn a_message_taken_apart_gives_back_its_records_in_order_with_their_sequence_numbers() {
        let mut batcher = Batcher::new(Thresholds {
            max_records: 100,
            ..thresholds()
        });
        let mut out = Vec::new();
        let now = Instant::now();
        let records: Vec<Routed> = (1..=5)
            .map(|i| Routed {
                seq: 40 + i as u64,
                ..routed("a", i)
            })
            .collect();
        for record in records.clone() {
            batcher.add(record, now, &mut out).unwrap();
        }
        // One from memory: a batch of its own.
        batcher.add(routed("a", 9), now, &mut out).unwrap();
        batcher.flush_all(&mut out);
        assert_eq!(out.len(), 2);
        out.sort_by_key(|m| std::cmp::Reverse(m.records));
        let apart = unbatch(out.remove(0)).expect("a batcher's file");
        let back: Vec<Routed> = apart.into_iter().map(|(r, _)| r).collect();
        assert_eq!(
            back.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![41, 42, 43, 44, 45]
        );
        for (got, sent) in back.iter().zip(&records) {
            assert_eq!((&got.data, got.datapoints), (&sent.data, sent.datapoints));
        }
        let alone = unbatch(out.remove(0)).expect("a batcher's file");
        assert_eq!(
            (alone.len(), alone[0].0.seq, alone[0].0.datapoints),
            (1, 0, 9)
        );
    }

    #[test]
    fn age_and_topics() {
        let mut batcher = Batcher::new(thresholds());
        let mut out = Vec::new();
        let start = Instant::now();
        batcher.add(routed("a", 1), start, &mut out).unwrap();
        batcher
            .add(routed("b", 1), start + Duration::from_millis(500), &mut out)
            .unwrap();
        assert_eq!(
            batcher.next_deadline(),
            Some(start + Duration::from_secs(1))
        );
        batcher.flush_due(start + Duration::from_secs(1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].topic, "a");
    }
}
