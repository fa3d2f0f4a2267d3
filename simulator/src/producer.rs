//! Module producers: OCF over TCP, like the mesos-agent module and other
//! local processes.
//!
//! Every MetricList carries the tags `sim_producer` (the producer's id) and
//! `sim_seq` (its record sequence number, from 0), so that a verifier can
//! find every missing, duplicated or reordered record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schema::ocf::MODULE_SYNC;
use schema::{Codec, Datapoint, MetricList, OcfEncoder, Tag};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Tag naming the producer of a record.
pub const PRODUCER_TAG: &str = "sim_producer";
/// Tag holding a record's sequence number within its producer.
pub const SEQ_TAG: &str = "sim_seq";

/// Ways to send a broken stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Random bytes, no header.
    Garbage,
    /// A valid header, then a block cut short before the connection closes.
    TruncatedBlock,
    /// A valid header and block whose sync marker is wrong.
    BadSync,
    /// A valid header, then a block declaring a 1 TiB size.
    HugeBlock,
}

/// What a producer sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerReport {
    /// The producer's id.
    pub id: String,
    /// Blocks written.
    pub blocks: u64,
    /// MetricLists written.
    pub records: u64,
    /// Datapoints written.
    pub datapoints: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Builds a producer. `module()` gives the mesos module's exact framing.
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    addr: SocketAddr,
    id: String,
    topic: String,
    codec: Codec,
    module_sync: bool,
    blocks: u64,
    records_per_block: usize,
    datapoints_per_record: usize,
    interval: Option<Duration>,
    malformed: Option<Malformed>,
    stop: Option<Arc<AtomicBool>>,
}

/// A producer sending to `addr`.
pub fn producer(addr: SocketAddr, id: impl Into<String>) -> ProducerBuilder {
    let id = id.into();
    ProducerBuilder {
        addr,
        topic: format!("framework-{id}"),
        id,
        codec: Codec::Null,
        module_sync: true,
        blocks: 10,
        records_per_block: 5,
        datapoints_per_record: 20,
        interval: None,
        malformed: None,
        stop: None,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ProducerBuilder {
    /// The mesos module's framing: null codec, sync `FEFEFEFEFEFEFEFE`, so
    /// its first 601 bytes equal the reference header.
    pub fn module(mut self) -> Self {
        self.codec = Codec::Null;
        self.module_sync = true;
        self
    }

    /// "Another process": this codec and a random sync.
    pub fn other_process(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self.module_sync = false;
        self
    }

    /// The record `topic` (the collector prefixes it).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// How many blocks to send.
    pub fn blocks(mut self, blocks: u64) -> Self {
        self.blocks = blocks;
        self
    }

    /// Records per block and datapoints per record.
    pub fn shape(mut self, records_per_block: usize, datapoints_per_record: usize) -> Self {
        self.records_per_block = records_per_block;
        self.datapoints_per_record = datapoints_per_record;
        self
    }

    /// Wait this long between blocks (default: as fast as possible).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Keep sending (up to `blocks`) until `stop` is set.
    pub fn until(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Send a broken stream instead.
    pub fn malformed(mut self, mode: Malformed) -> Self {
        self.malformed = Some(mode);
        self
    }

    /// The records of block `block`, numbered from `first_seq`.
    pub fn block_records(&self, first_seq: u64) -> Vec<MetricList> {
        let time_ms = now_ms();
        (0..self.records_per_block as u64)
            .map(|i| MetricList {
                topic: self.topic.clone(),
                tags: vec![
                    Tag::new(PRODUCER_TAG, &self.id),
                    Tag::new(SEQ_TAG, (first_seq + i).to_string()),
                    Tag::new("framework_id", &self.topic),
                ],
                datapoints: (0..self.datapoints_per_record)
                    .map(|j| {
                        Datapoint::new(
                            format!("usage.metric_{j}"),
                            time_ms,
                            (first_seq + i) as f64 + j as f64 / 100.0,
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    fn encoder(&self) -> OcfEncoder {
        if self.module_sync {
            OcfEncoder::with_sync(self.codec, MODULE_SYNC)
        } else {
            OcfEncoder::new(self.codec)
        }
    }

    /// Connects, sends, closes. Returns what was written.
    pub async fn run(self) -> std::io::Result<ProducerReport> {
        let mut stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let mut report = ProducerReport {
            id: self.id.clone(),
            ..ProducerReport::default()
        };
        let mut encoder = self.encoder();
        let mut out = Vec::with_capacity(64 * 1024);
        encoder.write_header(&mut out);
        if let Some(mode) = self.malformed {
            return self.run_malformed(stream, mode, out, report).await;
        }
        let mut seq = 0u64;
        for _ in 0..self.blocks {
            if self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                break;
            }
            let records = self.block_records(seq);
            seq += records.len() as u64;
            encoder.write_block(&records, &mut out);
            report.blocks += 1;
            report.records += records.len() as u64;
            report.datapoints += records
                .iter()
                .map(|r| r.datapoints.len() as u64)
                .sum::<u64>();
            if self.interval.is_some() || out.len() >= 32 * 1024 {
                stream.write_all(&out).await?;
                report.bytes += out.len() as u64;
                out.clear();
            }
            if let Some(interval) = self.interval {
                tokio::time::sleep(interval).await;
            }
        }
        stream.write_all(&out).await?;
        report.bytes += out.len() as u64;
        stream.shutdown().await?;
        Ok(report)
    }

    async fn run_malformed(
        &self,
        mut stream: TcpStream,
        mode: Malformed,
        mut out: Vec<u8>,
        mut report: ProducerReport,
    ) -> std::io::Result<ProducerReport> {
        let mut encoder = self.encoder();
        match mode {
            Malformed::Garbage => {
                out = (0..4096).map(|_| rand::random::<u8>()).collect();
                // Never let garbage start with the magic by chance.
                out[0] = b'G';
            }
            Malformed::TruncatedBlock => {
                let mut block = Vec::new();
                encoder.write_block(&self.block_records(0), &mut block);
                out.extend_from_slice(&block[..block.len() / 2]);
            }
            Malformed::BadSync => {
                encoder.write_block(&self.block_records(0), &mut out);
                let last = out.len() - 1;
                out[last] ^= 0xff;
            }
            Malformed::HugeBlock => {
                schema::datum::write_long(&mut out, 1);
                schema::datum::write_long(&mut out, 1 << 40);
            }
        }
        stream.write_all(&out).await?;
        report.bytes = out.len() as u64;
        let _ = stream.shutdown().await;
        Ok(report)
    }
}
